/* CLIP text encoder against transformers (tests/reference/make_clip_text_fixtures.py).
 * Tolerance: max abs error <= 1e-4 * max abs of the expected tensor. */
#include "testutil.h"
#include <diffuse/clip_text.h>

#include <string.h>

#define RTOL 1e-4

typedef struct {
  DiffuseConfig *config;
  DiffuseWeights *weights;
  DiffuseSafetensors *io;
  int32_t *ids;
  int32_t *mask;
  int batch, seq;
} Case;

static int32_t *
int_tensor (DiffuseSafetensors *st, const char *name, int *rows, int *cols)
{
  DiffuseTensor *t = tu_get (st, name);
  g_assert_cmpint (t->ndim, ==, 2);
  int64_t n = diffuse_tensor_numel (t);
  int32_t *v = g_new (int32_t, n);
  const float *f = diffuse_tensor_f32 (t);
  for (int64_t i = 0; i < n; i++)
    v[i] = (int32_t) f[i];
  if (rows)
    *rows = (int) t->shape[0];
  if (cols)
    *cols = (int) t->shape[1];
  diffuse_tensor_unref (t);
  return v;
}

static gboolean
case_open (Case *c, const char *name)
{
  g_autofree char *cfg_rel = g_strdup_printf ("clip_text/%s/config.json", name);
  g_autofree char *io_rel = g_strdup_printf ("clip_text/%s/io.safetensors", name);
  g_autofree char *w_rel = g_strdup_printf ("clip_text/%s/model.safetensors", name);
  if (!tu_have_fixture (cfg_rel) || !tu_have_fixture (io_rel) || !tu_have_fixture (w_rel))
    return FALSE;
  memset (c, 0, sizeof *c);
  GError *err = NULL;
  g_autofree char *cfg = tu_fixture (cfg_rel);
  c->config = diffuse_config_load (cfg, &err);
  g_assert_no_error (err);
  g_autofree char *wp = tu_fixture (w_rel);
  const char *paths[] = { wp, NULL };
  c->weights = diffuse_weights_open (paths, &err);
  g_assert_no_error (err);
  c->io = tu_open (io_rel);
  c->ids = int_tensor (c->io, "input_ids", &c->batch, &c->seq);
  if (diffuse_safetensors_find (c->io, "attention_mask"))
    c->mask = int_tensor (c->io, "attention_mask", NULL, NULL);
  return TRUE;
}

static void
case_close (Case *c)
{
  diffuse_config_unref (c->config);
  diffuse_weights_unref (c->weights);
  diffuse_safetensors_unref (c->io);
  g_free (c->ids);
  g_free (c->mask);
}

static void
check (DiffuseSafetensors *io, const char *name, DiffuseTensor *got, const char *label)
{
  DiffuseTensor *want = tu_get (io, name);
  g_autofree char *what = g_strdup_printf ("%s %s", label, name);
  tu_assert_close (got, want, 0.0, RTOL, what);
  diffuse_tensor_unref (want);
}

static DiffuseClipText *
new_model (Case *c)
{
  GError *err = NULL;
  DiffuseClipText *m = diffuse_clip_text_new (c->config, c->weights, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  g_assert_no_error (err);
  g_assert_nonnull (m);
  return m;
}

static void
run_case (const char *name, int n_layers, gboolean legacy_eos, int proj_dim)
{
  Case c;
  if (!case_open (&c, name))
    return;
  if (proj_dim > 0)
    g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING, "*unexpected*text_model.some_unused.weight*");
  DiffuseClipText *m = new_model (&c);
  g_test_assert_expected_messages ();
  g_assert_cmpint (diffuse_clip_text_num_layers (m), ==, n_layers);
  g_assert_cmpint (diffuse_clip_text_projection_dim (m), ==, proj_dim);
  g_assert_cmpint (diffuse_clip_text_eos_token_id (m) == 2, ==, legacy_eos);
  g_assert_cmpint (diffuse_clip_text_uses_attention_mask (m), ==, c.mask != NULL);

  DiffuseClipTextParams p;
  diffuse_clip_text_default_params (&p);
  p.attention_mask = c.mask;
  p.output_hidden_states = TRUE;
  DiffuseClipTextOutput out;
  GError *err = NULL;
  g_assert_true (diffuse_clip_text_forward (m, c.ids, c.batch, c.seq, &p, &out, &err));
  g_assert_no_error (err);
  check (c.io, "last_hidden_state", out.last_hidden_state, name);
  check (c.io, "pooled", out.pooled, name);
  check (c.io, "last_hidden_state", out.prompt_embeds, name);
  if (proj_dim > 0)
    check (c.io, "text_embeds", out.text_embeds, name);
  else
    g_assert_null (out.text_embeds);
  g_assert_cmpint (out.n_hidden_states, ==, n_layers + 1);
  for (int i = 0; i <= n_layers; i++) {
    g_autofree char *hn = g_strdup_printf ("hidden_state_%d", i);
    check (c.io, hn, out.hidden_states[i], name);
  }
  diffuse_clip_text_output_clear (&out);

  if (c.mask) {
    /* the mask matters on this input: without it the padded rows differ */
    p.attention_mask = NULL;
    g_assert_true (diffuse_clip_text_forward (m, c.ids, c.batch, c.seq, &p, &out, &err));
    DiffuseTensor *want = tu_get (c.io, "last_hidden_state");
    g_assert_cmpfloat (diffuse_tensor_max_abs_diff (out.last_hidden_state, want), >, 1e-2);
    diffuse_tensor_unref (want);
    diffuse_clip_text_output_clear (&out);
    p.attention_mask = c.mask;
  }

  /* diffusers' clip_skip: final_layer_norm (hidden_states[-(n + 1)]) */
  for (int n = 1; n <= n_layers; n++) {
    g_autofree char *sn = g_strdup_printf ("clip_skip_%d", n);
    if (!diffuse_safetensors_find (c.io, sn))
      continue;
    p.output_hidden_states = FALSE;
    p.clip_skip = n;
    g_assert_true (diffuse_clip_text_forward (m, c.ids, c.batch, c.seq, &p, &out, &err));
    g_assert_no_error (err);
    g_assert_null (out.hidden_states);
    check (c.io, sn, out.prompt_embeds, name);
    check (c.io, "last_hidden_state", out.last_hidden_state, name);
    diffuse_clip_text_output_clear (&out);
  }

  /* one row alone gives that row of the batch (no cross-batch leakage) */
  p.clip_skip = 0;
  int last = c.batch - 1;
  p.attention_mask = c.mask ? c.mask + last * c.seq : NULL;
  g_assert_true (diffuse_clip_text_forward (m, c.ids + last * c.seq, 1, c.seq, &p, &out, &err));
  g_assert_no_error (err);
  DiffuseTensor *want = tu_get (c.io, "last_hidden_state");
  DiffuseTensor *row = diffuse_narrow (want, 0, last, 1);
  DiffuseTensor *rowc = diffuse_contiguous (row);
  tu_assert_close (out.last_hidden_state, rowc, 0.0, RTOL, "single row");
  diffuse_tensor_unref (rowc);
  diffuse_tensor_unref (row);
  diffuse_tensor_unref (want);
  diffuse_clip_text_output_clear (&out);

  diffuse_clip_text_unref (m);
  case_close (&c);
}

static void test_quick2l (void) { run_case ("quick2l", 2, TRUE, 0); }
static void test_gelu1l (void) { run_case ("gelu1l", 1, FALSE, 0); }
static void test_proj3l (void) { run_case ("proj3l", 3, FALSE, 20); }

/* The legacy rule really differs from the first-EOS rule on these inputs: a
 * model that pooled at the wrong position would fail the pooled checks. */
static void
test_pooling_rule_matters (void)
{
  Case c;
  if (!case_open (&c, "gelu1l"))
    return;
  DiffuseClipText *m = new_model (&c);
  DiffuseClipTextOutput out;
  GError *err = NULL;
  g_assert_true (diffuse_clip_text_forward (m, c.ids, c.batch, c.seq, NULL, &out, &err));
  /* argmax of ids (position 0 here) differs from the first EOS position */
  DiffuseTensor *flat = diffuse_reshape (out.last_hidden_state, 2,
                                         (const int64_t[]) { (int64_t) c.batch * c.seq, diffuse_clip_text_hidden_size (m) });
  DiffuseTensor *first = diffuse_narrow (flat, 0, 0, 1);
  DiffuseTensor *p0 = diffuse_narrow (out.pooled, 0, 0, 1);
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (first, p0), >, 1e-3);
  diffuse_tensor_unref (first);
  diffuse_tensor_unref (p0);
  diffuse_tensor_unref (flat);
  diffuse_clip_text_output_clear (&out);
  diffuse_clip_text_unref (m);
  case_close (&c);
}

static void
test_bad_inputs (void)
{
  Case c;
  if (!case_open (&c, "quick2l"))
    return;
  DiffuseClipText *m = new_model (&c);
  DiffuseClipTextOutput out;
  DiffuseClipTextParams p;
  diffuse_clip_text_default_params (&p);
  GError *err = NULL;

  /* sequence longer than max_position_embeddings */
  int32_t *ids = g_new0 (int32_t, 17);
  g_assert_false (diffuse_clip_text_forward (m, ids, 1, 17, &p, &out, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  g_assert_null (out.last_hidden_state);

  /* id outside the vocabulary */
  ids[3] = 64;
  g_assert_false (diffuse_clip_text_forward (m, ids, 1, 16, &p, &out, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  ids[3] = -1;
  g_assert_false (diffuse_clip_text_forward (m, ids, 1, 16, &p, &out, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  ids[3] = 5;

  /* clip_skip beyond the layers (diffusers would index out of the tuple) */
  p.clip_skip = 3;
  g_assert_false (diffuse_clip_text_forward (m, ids, 1, 16, &p, &out, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  p.clip_skip = 2;   /* == num_layers: hidden_states[-3] = the embeddings */
  g_assert_true (diffuse_clip_text_forward (m, ids, 1, 16, &p, &out, &err));
  g_assert_no_error (err);
  diffuse_clip_text_output_clear (&out);
  g_free (ids);
  diffuse_clip_text_unref (m);
  case_close (&c);
}

/* A file lacking one tensor: NOT_FOUND naming the key and the component. */
static void
test_missing_tensor (void)
{
  Case c;
  if (!case_open (&c, "gelu1l"))
    return;
  const char *drop = "text_model.encoder.layers.0.mlp.fc2.bias";
  g_autofree char *wp = tu_fixture ("clip_text/gelu1l/model.safetensors");
  DiffuseSafetensors *st = tu_open ("clip_text/gelu1l/model.safetensors");
  DiffuseStWriter *w = diffuse_st_writer_new ();
  DiffuseTensor *keep[64];
  guint nk = 0;
  for (guint i = 0; i < diffuse_safetensors_n_tensors (st); i++) {
    const DiffuseStEntry *e = diffuse_safetensors_entry (st, i);
    if (g_str_equal (e->name, drop) || e->dtype != DIFFUSE_ST_F32)
      continue;
    g_assert_cmpuint (nk, <, G_N_ELEMENTS (keep));
    keep[nk] = tu_get (st, e->name);
    diffuse_st_writer_add (w, e->name, keep[nk]);
    nk++;
  }
  char *dir = tu_mkdtemp ();
  char *path = g_build_filename (dir, "model.safetensors", NULL);
  GError *err = NULL;
  g_assert_true (diffuse_st_writer_write (w, path, &err));
  g_assert_no_error (err);
  diffuse_st_writer_free (w);
  for (guint i = 0; i < nk; i++)
    diffuse_tensor_unref (keep[i]);
  diffuse_safetensors_unref (st);

  const char *paths[] = { path, NULL };
  DiffuseWeights *ws = diffuse_weights_open (paths, &err);
  g_assert_no_error (err);
  DiffuseClipText *m = diffuse_clip_text_new (c.config, ws, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  g_assert_null (m);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, drop));
  g_assert_nonnull (strstr (err->message, "CLIPTextModel"));
  g_clear_error (&err);
  diffuse_weights_unref (ws);
  tu_rm_rf (dir);
  g_free (path);
  g_free (dir);
  case_close (&c);
}

/* A config that does not fit the tensors: CONFIG naming the tensor. */
static void
test_config_mismatch (void)
{
  Case c;
  if (!case_open (&c, "quick2l"))
    return;
  GError *err = NULL;
  DiffuseConfig *bad = diffuse_config_from_string (
      "{\"hidden_size\": 32, \"intermediate_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
      " \"max_position_embeddings\": 16, \"vocab_size\": 64, \"hidden_act\": \"quick_gelu\"}", "bad.json", &err);
  g_assert_no_error (err);
  DiffuseClipText *m = diffuse_clip_text_new (bad, c.weights, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  g_assert_null (m);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_assert_nonnull (strstr (err->message, "mlp.fc1.weight"));
  g_clear_error (&err);
  diffuse_config_unref (bad);

  bad = diffuse_config_from_string ("{\"hidden_size\": 32, \"num_attention_heads\": 5}", "bad2.json", &err);
  g_assert_no_error (err);
  m = diffuse_clip_text_new (bad, c.weights, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  g_assert_null (m);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_clear_error (&err);
  diffuse_config_unref (bad);

  bad = diffuse_config_from_string ("{\"hidden_act\": \"no_such_act\"}", "bad3.json", &err);
  g_assert_no_error (err);
  m = diffuse_clip_text_new (bad, c.weights, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  g_assert_null (m);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_clear_error (&err);
  diffuse_config_unref (bad);
  case_close (&c);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/clip-text/quick-gelu-2-layers-legacy-eos", test_quick2l);
  g_test_add_func ("/clip-text/gelu-1-layer-eos-id-prefixed", test_gelu1l);
  g_test_add_func ("/clip-text/projection-3-layers-mask", test_proj3l);
  g_test_add_func ("/clip-text/pooling-rule-matters", test_pooling_rule_matters);
  g_test_add_func ("/clip-text/bad-inputs", test_bad_inputs);
  g_test_add_func ("/clip-text/missing-tensor", test_missing_tensor);
  g_test_add_func ("/clip-text/config-mismatch", test_config_mismatch);
  return g_test_run ();
}

/* UNet2DConditionModel against diffusers (fixtures from
 * tests/reference/make_unet_fixtures.py). */
#include "testutil.h"
#include <diffuse/unet.h>
#include <string.h>

typedef struct {
  DiffuseSafetensors *io;
  DiffuseTensor *sample, *ehs, *timestep, *cond, *want;
  float *t;
  int nt;
} Case;

static void
case_open (Case *c, const char *name)
{
  memset (c, 0, sizeof *c);
  char *rel = g_strdup_printf ("unet/%s/io.safetensors", name);
  c->io = tu_open (rel);
  g_free (rel);
  c->sample = tu_get (c->io, "sample");
  c->ehs = tu_get (c->io, "encoder_hidden_states");
  c->timestep = tu_get (c->io, "timestep");
  c->want = tu_get (c->io, "output");
  if (diffuse_safetensors_find (c->io, "timestep_cond"))
    c->cond = tu_get (c->io, "timestep_cond");
  c->nt = (int) diffuse_tensor_numel (c->timestep);
  c->t = diffuse_tensor_f32 (c->timestep);
}

static void
case_close (Case *c)
{
  diffuse_tensor_unref (c->sample);
  diffuse_tensor_unref (c->ehs);
  diffuse_tensor_unref (c->timestep);
  diffuse_tensor_unref (c->cond);
  diffuse_tensor_unref (c->want);
  diffuse_safetensors_unref (c->io);
}

static DiffuseUNet *
load_unet (const char *name, DiffuseDType dt, GError **error)
{
  char *rel = g_strdup_printf ("unet/%s", name);
  char *dir = tu_fixture (rel);
  DiffuseUNetParams p;
  diffuse_unet_default_params (&p);
  p.dtype = dt;
  DiffuseUNet *u = diffuse_unet_new_from_dir (dir, &p, error);
  g_free (dir);
  g_free (rel);
  return u;
}

static DiffuseTensor *
run (DiffuseUNet *u, Case *c, const DiffuseUNetForwardArgs *extra, GError **error)
{
  DiffuseUNetForwardArgs args = { 0 };
  if (extra)
    args = *extra;
  args.timestep_cond = c->cond;
  return diffuse_unet_forward (u, c->sample, c->t, c->nt, c->ehs, &args, error);
}

/* f32: max abs error <= 1e-4 of the output's max abs */
static void
test_case (gconstpointer data)
{
  const char *name = data;
  char *rel = g_strdup_printf ("unet/%s/io.safetensors", name);
  gboolean have = tu_have_fixture (rel);
  g_free (rel);
  if (!have)
    return;
  Case c;
  case_open (&c, name);
  GError *err = NULL;
  DiffuseUNet *u = load_unet (name, DIFFUSE_DTYPE_F32, &err);
  g_assert_no_error (err);
  g_assert_nonnull (u);

  DiffuseTensor *np = tu_get (c.io, "n_params");
  g_assert_cmpuint (diffuse_unet_n_params (u), ==, (guint64) diffuse_tensor_f32 (np)[0]);
  diffuse_tensor_unref (np);
  g_assert_null (diffuse_unet_unused_keys (u)[0]);
  g_assert_cmpint (diffuse_unet_in_channels (u), ==, c.sample->shape[1]);
  g_assert_cmpint (diffuse_unet_out_channels (u), ==, c.want->shape[1]);
  g_assert_cmpint (diffuse_unet_cross_attention_dim (u), ==, c.ehs->shape[2]);

  DiffuseTensor *got = run (u, &c, NULL, &err);
  g_assert_no_error (err);
  g_assert_nonnull (got);
  char *what = g_strdup_printf ("%s f32", name);
  tu_assert_close (got, c.want, 0.0, 1e-4, what);
  g_free (what);
  diffuse_tensor_unref (got);

  /* ControlNet residuals */
  if (diffuse_safetensors_find (c.io, "output_residuals")) {
    DiffuseTensor *downs[32];
    int nd = 0;
    for (; nd < 32; nd++) {
      char *k = g_strdup_printf ("down_res_%d", nd);
      gboolean has = diffuse_safetensors_find (c.io, k) != NULL;
      if (has)
        downs[nd] = tu_get (c.io, k);
      g_free (k);
      if (!has)
        break;
    }
    DiffuseTensor *mid = tu_get (c.io, "mid_res");
    DiffuseTensor *want_r = tu_get (c.io, "output_residuals");
    DiffuseUNetForwardArgs a = { .down_block_additional_residuals = downs,
                                 .n_down_block_additional_residuals = nd,
                                 .mid_block_additional_residual = mid };
    got = run (u, &c, &a, &err);
    g_assert_no_error (err);
    what = g_strdup_printf ("%s residuals", name);
    tu_assert_close (got, want_r, 0.0, 1e-4, what);
    g_free (what);
    diffuse_tensor_unref (got);
    /* a wrong count is an argument error */
    a.n_down_block_additional_residuals = nd - 1;
    got = run (u, &c, &a, &err);
    g_assert_null (got);
    g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
    g_clear_error (&err);
    for (int i = 0; i < nd; i++)
      diffuse_tensor_unref (downs[i]);
    diffuse_tensor_unref (mid);
    diffuse_tensor_unref (want_r);
  }
  diffuse_unet_unref (u);
  case_close (&c);
}

/* f16 / bf16 weights and activations: same result within their precision */
static void
test_half (void)
{
  if (!tu_have_fixture ("unet/sd15/io.safetensors"))
    return;
  static const struct { DiffuseDType dt; double rtol; } cases[] = {
    { DIFFUSE_DTYPE_F16, 1e-2 },
    { DIFFUSE_DTYPE_BF16, 6e-2 },
  };
  Case c;
  case_open (&c, "sd15");
  for (guint i = 0; i < G_N_ELEMENTS (cases); i++) {
    GError *err = NULL;
    DiffuseUNet *u = load_unet ("sd15", cases[i].dt, &err);
    g_assert_no_error (err);
    g_assert_cmpint (diffuse_unet_dtype (u), ==, cases[i].dt);
    DiffuseTensor *got = run (u, &c, NULL, &err);
    g_assert_no_error (err);
    g_assert_cmpint (got->dtype, ==, cases[i].dt);
    DiffuseTensor *g32 = diffuse_cast (got, DIFFUSE_DTYPE_F32);
    char *what = g_strdup_printf ("sd15 %s", diffuse_dtype_name (cases[i].dt));
    tu_assert_close (g32, c.want, 0.0, cases[i].rtol, what);
    /* and not bit-identical to f32: the dtype was really used */
    g_assert_cmpfloat (diffuse_tensor_max_abs_diff (g32, c.want), >, 0.0);
    g_free (what);
    diffuse_tensor_unref (g32);
    diffuse_tensor_unref (got);
    diffuse_unet_unref (u);
  }
  case_close (&c);
}

/* ---- loading errors ------------------------------------------------------ */

static DiffuseConfig *
fixture_config (const char *name)
{
  char *rel = g_strdup_printf ("unet/%s/config.json", name);
  char *p = tu_fixture (rel);
  GError *err = NULL;
  DiffuseConfig *c = diffuse_config_load (p, &err);
  g_assert_no_error (err);
  g_free (p);
  g_free (rel);
  return c;
}

static DiffuseWeights *
fixture_weights (const char *name)
{
  char *rel = g_strdup_printf ("unet/%s/diffusion_pytorch_model.safetensors", name);
  char *p = tu_fixture (rel);
  const char *paths[2] = { p, NULL };
  GError *err = NULL;
  DiffuseWeights *w = diffuse_weights_open (paths, &err);
  g_assert_no_error (err);
  g_free (p);
  g_free (rel);
  return w;
}

/* The fixture config with one member replaced (JSON text of the value). */
static DiffuseConfig *
config_with (const char *name, const char *key, const char *json_value)
{
  DiffuseConfig *base = fixture_config (name);
  JsonObject *obj = json_object_new ();
  JsonObject *src = diffuse_config_object (base);
  GList *members = json_object_get_members (src);
  for (GList *m = members; m; m = m->next)
    json_object_set_member (obj, m->data, json_node_copy (json_object_get_member (src, m->data)));
  g_list_free (members);
  GError *err = NULL;
  JsonNode *v = json_from_string (json_value, &err);
  g_assert_no_error (err);
  json_object_set_member (obj, key, v);
  DiffuseConfig *c = diffuse_config_from_object (obj, "modified config.json");
  json_object_unref (obj);
  diffuse_config_unref (base);
  return c;
}

static void
expect_new_error (DiffuseConfig *config, DiffuseWeights *w, int code, const char *needle)
{
  GError *err = NULL;
  DiffuseUNet *u = diffuse_unet_new (config, w, NULL, &err);
  g_assert_null (u);
  g_assert_error (err, DIFFUSE_ERROR, code);
  if (needle && !strstr (err->message, needle))
    g_error ("message \"%s\" does not name \"%s\"", err->message, needle);
  g_test_message ("%s", err->message);
  g_error_free (err);
}

static void
test_config_errors (void)
{
  if (!tu_have_fixture ("unet/sd15/config.json"))
    return;
  DiffuseWeights *w = fixture_weights ("sd15");
  static const struct { const char *key, *value; int code; const char *needle; } cases[] = {
    { "class_embed_type", "\"timestep\"", DIFFUSE_ERROR_UNSUPPORTED, "class_embed_type" },
    { "num_class_embeds", "10", DIFFUSE_ERROR_UNSUPPORTED, "num_class_embeds" },
    { "addition_embed_type", "\"text_image\"", DIFFUSE_ERROR_UNSUPPORTED, "addition_embed_type" },
    /* SDXL's, without its addition_time_embed_dim / projection_class_embeddings_input_dim */
    { "addition_embed_type", "\"text_time\"", DIFFUSE_ERROR_CONFIG, "addition_time_embed_dim" },
    { "encoder_hid_dim", "64", DIFFUSE_ERROR_UNSUPPORTED, "encoder_hid_dim" },
    { "time_embedding_type", "\"fourier\"", DIFFUSE_ERROR_UNSUPPORTED, "fourier" },
    { "num_attention_heads", "4", DIFFUSE_ERROR_CONFIG, "num_attention_heads" },
    { "act_fn", "\"mish\"", DIFFUSE_ERROR_UNSUPPORTED, "mish" },
    { "down_block_types", "[\"AttnDownBlock2D\", \"DownBlock2D\"]", DIFFUSE_ERROR_UNSUPPORTED, "AttnDownBlock2D" },
    { "mid_block_type", "\"UNetMidBlock2DSimpleCrossAttn\"", DIFFUSE_ERROR_UNSUPPORTED, "SimpleCrossAttn" },
    { "resnet_time_scale_shift", "\"spatial\"", DIFFUSE_ERROR_UNSUPPORTED, "spatial" },
    { "dual_cross_attention", "true", DIFFUSE_ERROR_UNSUPPORTED, "dual_cross_attention" },
    { "up_block_types", "[\"UpBlock2D\"]", DIFFUSE_ERROR_CONFIG, "up_block_types" },
    { "attention_head_dim", "[4, 4, 4]", DIFFUSE_ERROR_CONFIG, "attention_head_dim" },
    { "only_cross_attention", "[true]", DIFFUSE_ERROR_CONFIG, "only_cross_attention" },
    { "norm_num_groups", "\"eight\"", DIFFUSE_ERROR_CONFIG, "norm_num_groups" },
    { "norm_num_groups", "5", DIFFUSE_ERROR_CONFIG, "groups" },
    /* shapes that no longer fit the weights */
    { "cross_attention_dim", "21", DIFFUSE_ERROR_CONFIG, "attn2.to_k.weight" },
    { "block_out_channels", "[16, 32]", DIFFUSE_ERROR_CONFIG, "has shape" },
    { "layers_per_block", "1", DIFFUSE_ERROR_CONFIG, "up_blocks.0.resnets.1" },
    { "use_linear_projection", "true", DIFFUSE_ERROR_CONFIG, "proj_in.weight" },
    { "resnet_time_scale_shift", "\"scale_shift\"", DIFFUSE_ERROR_CONFIG, "time_emb_proj.weight" },
    /* a weight the config implies and the file lacks */
    { "time_cond_proj_dim", "8", DIFFUSE_ERROR_NOT_FOUND, "time_embedding.cond_proj.weight" },
    { "layers_per_block", "3", DIFFUSE_ERROR_NOT_FOUND, "down_blocks.0.resnets.2" },
    { "transformer_layers_per_block", "2", DIFFUSE_ERROR_NOT_FOUND, "transformer_blocks.1" },
  };
  for (guint i = 0; i < G_N_ELEMENTS (cases); i++) {
    DiffuseConfig *c = config_with ("sd15", cases[i].key, cases[i].value);
    expect_new_error (c, w, cases[i].code, cases[i].needle);
    diffuse_config_unref (c);
  }
  diffuse_weights_unref (w);
}

/* A copy of a weights file without `drop` and with `extra` added. */
static char *
rewrite_weights (const char *name, const char *dir, const char *drop, const char *extra)
{
  DiffuseWeights *w = fixture_weights (name);
  DiffuseStWriter *wr = diffuse_st_writer_new ();
  guint n = 0;
  const char **names = diffuse_weights_names (w, &n);
  GError *err = NULL;
  for (guint i = 0; i < n; i++) {
    if (drop && strcmp (names[i], drop) == 0)
      continue;
    DiffuseTensor *t = diffuse_weights_get (w, names[i], DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
    g_assert_no_error (err);
    diffuse_st_writer_add (wr, names[i], t);
    diffuse_tensor_unref (t);
  }
  g_free (names);
  if (extra) {
    float v[3] = { 1, 2, 3 };
    DiffuseTensor *t = diffuse_tensor_from_f32 (v, 1, (int64_t[]) { 3 });
    diffuse_st_writer_add (wr, extra, t);
    diffuse_tensor_unref (t);
  }
  char *path = g_build_filename (dir, "w.safetensors", NULL);
  g_assert_true (diffuse_st_writer_write (wr, path, &err));
  g_assert_no_error (err);
  diffuse_st_writer_free (wr);
  diffuse_weights_unref (w);
  return path;
}

static void
test_weight_keys (void)
{
  if (!tu_have_fixture ("unet/lcm/config.json"))
    return;
  char *dir = tu_mkdtemp ();
  DiffuseConfig *config = fixture_config ("lcm");
  GError *err = NULL;

  /* missing key: NOT_FOUND naming it and the component */
  const char *drop = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight";
  char *path = rewrite_weights ("lcm", dir, drop, NULL);
  const char *paths[2] = { path, NULL };
  DiffuseWeights *w = diffuse_weights_open (paths, &err);
  g_assert_no_error (err);
  expect_new_error (config, w, DIFFUSE_ERROR_NOT_FOUND, drop);
  DiffuseUNetParams p;
  diffuse_unet_default_params (&p);
  p.component = "my_unet";
  g_assert_null (diffuse_unet_new (config, w, &p, &err));
  g_assert_nonnull (strstr (err->message, "my_unet"));
  g_clear_error (&err);
  diffuse_weights_unref (w);
  g_free (path);

  /* unexpected key: a warning, the model loads and runs as before */
  path = rewrite_weights ("lcm", dir, NULL, "down_blocks.0.extra.weight");
  paths[0] = path;
  w = diffuse_weights_open (paths, &err);
  g_assert_no_error (err);
  g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING, "*not used*down_blocks.0.extra.weight*");
  DiffuseUNet *u = diffuse_unet_new (config, w, NULL, &err);
  g_test_assert_expected_messages ();
  g_assert_no_error (err);
  const char *const *unused = diffuse_unet_unused_keys (u);
  g_assert_cmpstr (unused[0], ==, "down_blocks.0.extra.weight");
  g_assert_null (unused[1]);
  Case c;
  case_open (&c, "lcm");
  DiffuseTensor *got = run (u, &c, NULL, &err);
  g_assert_no_error (err);
  tu_assert_close (got, c.want, 0.0, 1e-4, "lcm with an unused key");
  diffuse_tensor_unref (got);
  case_close (&c);
  diffuse_unet_unref (u);
  diffuse_weights_unref (w);
  g_free (path);

  diffuse_config_unref (config);
  tu_rm_rf (dir);
  g_free (dir);
}

/* ---- forward argument errors ------------------------------------------------- */

static void
expect_forward_error (DiffuseUNet *u, DiffuseTensor *sample, const float *t, int nt, DiffuseTensor *ehs,
                      DiffuseTensor *cond)
{
  GError *err = NULL;
  DiffuseUNetForwardArgs a = { .timestep_cond = cond };
  DiffuseTensor *out = diffuse_unet_forward (u, sample, t, nt, ehs, &a, &err);
  g_assert_null (out);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_test_message ("%s", err->message);
  g_error_free (err);
}

static void
test_forward_errors (void)
{
  if (!tu_have_fixture ("unet/sd15/io.safetensors"))
    return;
  GError *err = NULL;
  DiffuseUNet *u = load_unet ("sd15", DIFFUSE_DTYPE_F32, &err);
  g_assert_no_error (err);
  Case c;
  case_open (&c, "sd15");
  float t3[3] = { 1, 2, 3 };
  DiffuseTensor *s3 = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 4, (int64_t[]) { 2, 3, 8, 8 });
  DiffuseTensor *e = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 3, (int64_t[]) { 2, 7, 21 });
  DiffuseTensor *e1 = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 3, (int64_t[]) { 1, 7, 20 });
  DiffuseTensor *tc = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 2, (int64_t[]) { 2, 8 });
  expect_forward_error (u, s3, c.t, c.nt, c.ehs, NULL);       /* 3 channels */
  expect_forward_error (u, c.sample, t3, 3, c.ehs, NULL);     /* 3 timesteps, batch 2 */
  expect_forward_error (u, c.sample, c.t, c.nt, e, NULL);     /* 21 features */
  expect_forward_error (u, c.sample, c.t, c.nt, e1, NULL);    /* batch 1 context */
  expect_forward_error (u, c.sample, c.t, c.nt, c.ehs, tc);   /* no time_cond_proj_dim */
  diffuse_tensor_unref (s3);
  diffuse_tensor_unref (e);
  diffuse_tensor_unref (e1);
  diffuse_tensor_unref (tc);

  /* a scalar timestep broadcasts: same as passing it twice */
  float tt[2] = { c.t[0], c.t[0] };
  DiffuseTensor *a = diffuse_unet_forward (u, c.sample, c.t, 1, c.ehs, NULL, &err);
  g_assert_no_error (err);
  DiffuseTensor *b = diffuse_unet_forward (u, c.sample, tt, 2, c.ehs, NULL, &err);
  g_assert_no_error (err);
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (a, b), ==, 0.0);
  /* and differs from the fixture's two-timestep output */
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (a, c.want), >, 1e-3);
  diffuse_tensor_unref (a);
  diffuse_tensor_unref (b);
  case_close (&c);
  diffuse_unet_unref (u);
}

/* diffuse_unet_forward_t: the timesteps as a [B] tensor (the form a CUDA
 * graph captures) give the fixture's output, bit for bit the float form's */
static void
test_timestep_tensor (void)
{
  if (!tu_have_fixture ("unet/sd15/io.safetensors"))
    return;
  GError *err = NULL;
  DiffuseUNet *u = load_unet ("sd15", DIFFUSE_DTYPE_F32, &err);
  g_assert_no_error (err);
  Case c;
  case_open (&c, "sd15");
  g_assert_cmpint (c.nt, ==, c.sample->shape[0]);
  g_assert_cmpfloat (c.t[0], !=, c.t[1]);   /* two different timesteps: the order matters */
  DiffuseTensor *got = diffuse_unet_forward_t (u, c.sample, c.timestep, c.ehs, NULL, &err);
  g_assert_no_error (err);
  tu_assert_close (got, c.want, 0.0, 1e-4, "sd15 forward_t");
  DiffuseTensor *ref = diffuse_unet_forward (u, c.sample, c.t, c.nt, c.ehs, NULL, &err);
  g_assert_no_error (err);
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (got, ref), ==, 0.0);
  diffuse_tensor_unref (got);
  diffuse_tensor_unref (ref);

  /* one timestep per sample, as a 1-D tensor */
  DiffuseTensor *t3 = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 1, (int64_t[]) { 3 });
  DiffuseTensor *t21 = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 2, (int64_t[]) { 2, 1 });
  DiffuseTensor *bad[2] = { t3, t21 };
  for (int i = 0; i < 2; i++) {
    DiffuseTensor *o = diffuse_unet_forward_t (u, c.sample, bad[i], c.ehs, NULL, &err);
    g_assert_null (o);
    g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
    g_assert_nonnull (strstr (err->message, "timesteps"));
    g_test_message ("%s", err->message);
    g_clear_error (&err);
    diffuse_tensor_unref (bad[i]);
  }
  case_close (&c);
  diffuse_unet_unref (u);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_data_func ("/unet/sd15", "sd15", test_case);
  g_test_add_data_func ("/unet/sd2", "sd2", test_case);
  g_test_add_data_func ("/unet/lcm", "lcm", test_case);
  g_test_add_data_func ("/unet/mid2d", "mid2d", test_case);
  g_test_add_func ("/unet/half", test_half);
  g_test_add_func ("/unet/config-errors", test_config_errors);
  g_test_add_func ("/unet/weight-keys", test_weight_keys);
  g_test_add_func ("/unet/forward-errors", test_forward_errors);
  g_test_add_func ("/unet/timestep-tensor", test_timestep_tensor);
  return g_test_run ();
}

/* PyTorch checkpoints (torch.save zip archives) read through the safetensors
 * handle, against torch (tests/reference/make_pickle_fixtures.py): every
 * tensor of X.bin equals what torch.load(X.bin, weights_only=True) returned
 * (X.safetensors, nested dicts flattened with "."), views share the mapping,
 * a pickle naming os.system is refused by name, files torch cannot read
 * (truncated, cut pickle, short storage) are CORRUPT errors naming the file,
 * files we do not read (non-contiguous, legacy, compressed, big-endian) are
 * UNSUPPORTED; every truncation and a byte flip at every position of a real
 * file is an error or a load, never a crash; and the tiny SD pipeline saved
 * as .bin (sharded unet) loads with use_safetensors=False into diffusers'
 * image. */
#include "testutil.h"
#include <diffuse/pipeline.h>
#include <diffuse/sd.h>
#include <json-glib/json-glib.h>
#include <string.h>

static void
assert_same_as_torch (const char *name)
{
  char *bin_rel = g_strdup_printf ("pickle/%s.bin", name), *st_rel = g_strdup_printf ("pickle/%s.safetensors", name);
  char *bin_path = tu_fixture (bin_rel);
  GError *err = NULL;
  DiffuseSafetensors *got = diffuse_safetensors_open (bin_path, &err);
  g_assert_no_error (err);
  DiffuseSafetensors *want = tu_open (st_rel);
  g_assert_cmpuint (diffuse_safetensors_n_tensors (got), ==, diffuse_safetensors_n_tensors (want));
  g_assert_null (diffuse_safetensors_metadata (got));
  for (guint i = 0; i < diffuse_safetensors_n_tensors (want); i++) {
    const DiffuseStEntry *w = diffuse_safetensors_entry (want, i), *g = diffuse_safetensors_entry (got, i);
    g_assert_cmpstr (g->name, ==, w->name);
    g_assert_cmpint (g->dtype, ==, w->dtype);
    g_assert_cmpint (g->ndim, ==, w->ndim);
    for (int d = 0; d < w->ndim; d++)
      g_assert_cmpint (g->shape[d], ==, w->shape[d]);
    g_assert_cmpuint (g->nbytes, ==, w->nbytes);
    g_assert_true (w->nbytes == 0 || memcmp (g->data, w->data, w->nbytes) == 0);
    /* float tensors in their own dtype borrow the mapping (no copy) */
    DiffuseDType dt = g->dtype == DIFFUSE_ST_F16 ? DIFFUSE_DTYPE_F16
                      : g->dtype == DIFFUSE_ST_BF16 ? DIFFUSE_DTYPE_BF16 : DIFFUSE_DTYPE_F32;
    if (w->nbytes && (g->dtype == DIFFUSE_ST_F32 || g->dtype == DIFFUSE_ST_F16 || g->dtype == DIFFUSE_ST_BF16)) {
      DiffuseTensor *t = diffuse_safetensors_tensor (got, g->name, dt, NULL, &err);
      g_assert_no_error (err);
      g_assert_true (diffuse_tensor_data (t) == g->data);
      diffuse_tensor_unref (t);
    }
  }
  g_test_message ("%s.bin: %u tensors as torch.load reads them", name, diffuse_safetensors_n_tensors (got));
  diffuse_safetensors_unref (got);
  diffuse_safetensors_unref (want);
  g_free (bin_path);
  g_free (bin_rel);
  g_free (st_rel);
}

static void
test_tensors (void)
{
  assert_same_as_torch ("tensors");    /* f32/f16/bf16/f64/int/bool, 0-dim, empty, Parameter */
  assert_same_as_torch ("statedict");  /* nn.Module.state_dict () with its _metadata */
  assert_same_as_torch ("views");
  assert_same_as_torch ("nested");

  /* a f64 tensor converts to f32 as torch's .float () */
  GError *err = NULL;
  char *p = tu_fixture ("pickle/tensors.bin");
  DiffuseSafetensors *st = diffuse_safetensors_open (p, &err);
  g_assert_no_error (err);
  DiffuseTensor *t = diffuse_safetensors_tensor (st, "f64", DIFFUSE_DTYPE_F32, NULL, &err);
  g_assert_no_error (err);
  const double *src = diffuse_safetensors_find (st, "f64")->data;
  for (int i = 0; i < 4; i++)
    g_assert_cmpfloat (diffuse_tensor_f32 (t)[i], ==, (float) src[i]);
  diffuse_tensor_unref (t);
  /* integer tensors are read but not loadable as floats, as for safetensors */
  g_assert_null (diffuse_safetensors_tensor (st, "i64", DIFFUSE_DTYPE_F32, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED);
  g_clear_error (&err);
  diffuse_safetensors_unref (st);
  g_free (p);
}

static void
test_names_and_views (void)
{
  GError *err = NULL;
  char *p = tu_fixture ("pickle/nested.bin");
  DiffuseSafetensors *st = diffuse_safetensors_open (p, &err);
  g_assert_no_error (err);
  /* the IP-Adapter layout, named as its safetensors twin */
  g_assert_nonnull (diffuse_safetensors_find (st, "image_proj.proj.weight"));
  g_assert_nonnull (diffuse_safetensors_find (st, "ip_adapter.1.to_k_ip.weight"));
  g_assert_null (diffuse_safetensors_find (st, "image_proj"));
  diffuse_safetensors_unref (st);
  g_free (p);

  /* views of one storage point into it */
  p = tu_fixture ("pickle/views.bin");
  st = diffuse_safetensors_open (p, &err);
  g_assert_no_error (err);
  const guint8 *base = diffuse_safetensors_find (st, "base")->data;
  g_assert_true ((const guint8 *) diffuse_safetensors_find (st, "a")->data == base + 3 * 4);
  g_assert_true ((const guint8 *) diffuse_safetensors_find (st, "b")->data == base + 8 * 4);
  g_assert_true ((const guint8 *) diffuse_safetensors_find (st, "c")->data == base + 19 * 4);
  diffuse_safetensors_unref (st);
  g_free (p);
}

static void
assert_refused (const char *file, int code, const char *what)
{
  char *rel = g_strdup_printf ("pickle/%s", file);
  char *p = tu_fixture (rel);
  GError *err = NULL;
  g_assert_null (diffuse_safetensors_open (p, &err));
  g_assert_error (err, DIFFUSE_ERROR, code);
  g_test_message ("%s", err->message);
  g_assert_nonnull (strstr (err->message, p));
  if (what && !strstr (err->message, what))
    g_error ("%s: \"%s\" not in \"%s\"", file, what, err->message);
  g_error_free (err);
  g_free (p);
  g_free (rel);
}

static void
test_errors (void)
{
  /* never executed, refused by name, as torch.load(weights_only=True) */
  assert_refused ("forbidden.bin", DIFFUSE_ERROR_UNSUPPORTED, "os.system");
  /* torch refuses these too */
  assert_refused ("truncated.bin", DIFFUSE_ERROR_CORRUPT, "end-of-central-directory");
  assert_refused ("badpickle.bin", DIFFUSE_ERROR_CORRUPT, "data.pkl");
  assert_refused ("shortstorage.bin", DIFFUSE_ERROR_CORRUPT, "storage 0");
  /* valid for torch, not read here */
  assert_refused ("noncontig.bin", DIFFUSE_ERROR_UNSUPPORTED, "not contiguous");
  assert_refused ("legacy.bin", DIFFUSE_ERROR_UNSUPPORTED, "legacy");
  assert_refused ("compressed.bin", DIFFUSE_ERROR_UNSUPPORTED, "compressed");
  assert_refused ("bigendian.bin", DIFFUSE_ERROR_UNSUPPORTED, "little-endian");
  /* one dict reused at every level: refused quickly, not 2^40 names */
  assert_refused ("dag.bin", DIFFUSE_ERROR_UNSUPPORTED, "reused");
}

/* Every prefix and a flipped byte at every position: an error (or, for a
 * flip in tensor data, a load), never a crash or a read outside the buffer
 * (open_bytes copies into a buffer of exactly that size: ASan/valgrind see
 * any overrun). */
static void
test_damage (void)
{
  const char *files[] = { "pickle/tensors.bin", "pickle/nested.bin", "pickle/forbidden.bin" };
  for (guint f = 0; f < G_N_ELEMENTS (files); f++) {
    char *p = tu_fixture (files[f]);
    gchar *data = NULL;
    gsize len = 0;
    g_assert_true (g_file_get_contents (p, &data, &len, NULL));
    guint n_corrupt = 0, n_loaded = 0, n_other = 0;
    for (gsize n = 0; n < len; n++) {
      GError *err = NULL;
      DiffuseSafetensors *st = diffuse_safetensors_open_bytes (data, n, "cut.bin", &err);
      g_assert_null (st);
      g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT);
      g_assert_nonnull (strstr (err->message, "cut.bin"));
      g_error_free (err);
    }
    guint8 *copy = g_memdup2 (data, len);
    for (gsize i = 0; i < len; i++) {
      copy[i] ^= 0xff;
      GError *err = NULL;
      DiffuseSafetensors *st = diffuse_safetensors_open_bytes (copy, len, "flip.bin", &err);
      if (st) {
        /* whatever was read stays inside the buffer */
        for (guint k = 0; k < diffuse_safetensors_n_tensors (st); k++) {
          const DiffuseStEntry *e = diffuse_safetensors_entry (st, k);
          volatile guint8 sink = 0;
          for (size_t b = 0; b < e->nbytes; b++)
            sink ^= ((const guint8 *) e->data)[b];
          (void) sink;
        }
        n_loaded++;
        diffuse_safetensors_unref (st);
      } else {
        g_assert_true (err->domain == DIFFUSE_ERROR);
        if (err->code == DIFFUSE_ERROR_CORRUPT)
          n_corrupt++;
        else
          n_other++;
        g_error_free (err);
      }
      copy[i] ^= 0xff;
    }
    g_test_message ("%s: %zu prefixes refused; byte flips: %u loaded (data bytes), %u corrupt, %u other errors",
                    files[f], len, n_loaded, n_corrupt, n_other);
    g_free (copy);
    g_free (data);
    g_free (p);
  }
}

/* The tiny SD pipeline saved as .bin: use_safetensors=False loads it (the
 * unet from its .bin shards) and gives diffusers' image; AUTO falls back to
 * the .bin files as diffusers does; REQUIRE refuses. */
static void
test_pipeline (void)
{
  if (!tu_have_fixture ("pickle/images.safetensors"))
    return;
  GError *err = NULL;
  char *dir = tu_fixture ("pickle/tiny-sd-bin");
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");

  lp.use_safetensors = DIFFUSE_SAFETENSORS_REQUIRE;
  g_assert_null (diffuse_pipeline_model_load (dir, &lp, cache, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_test_message ("use_safetensors=True: %s", err->message);
  g_clear_error (&err);

  lp.use_safetensors = DIFFUSE_SAFETENSORS_AUTO;
  DiffusePipelineModel *pm_auto = diffuse_pipeline_model_load (dir, &lp, cache, &err);
  g_assert_no_error (err);

  lp.use_safetensors = DIFFUSE_SAFETENSORS_ALLOW_BIN;
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (dir, &lp, cache, &err);
  g_assert_no_error (err);
  const char *const *files = diffuse_component_files (diffuse_pipeline_model_get (pm, "unet"));
  g_assert_cmpuint (g_strv_length ((char **) files), ==, 3);
  g_assert_true (g_str_has_suffix (files[0], ".bin"));
  files = diffuse_component_files (diffuse_pipeline_model_get (pm, "text_encoder"));
  g_assert_true (g_str_has_suffix (files[0], "pytorch_model.bin"));

  JsonParser *parser = json_parser_new ();
  char *jpath = tu_fixture ("pickle/refusals.json");
  g_assert_true (json_parser_load_from_file (parser, jpath, NULL));
  JsonObject *gen = json_object_get_object_member (json_node_get_object (json_parser_get_root (parser)), "generate");
  DiffuseSafetensors *images = tu_open ("pickle/images.safetensors");
  DiffusePipelineModel *models[2] = { pm, pm_auto };
  for (int m = 0; m < 2; m++) {
    DiffuseSD *sd = diffuse_sd_new (models[m], DIFFUSE_SD_TEXT2IMG, &err);
    g_assert_no_error (err);
    DiffuseSDParams p;
    diffuse_sd_default_params (&p);
    p.prompt = json_object_get_string_member (gen, "prompt");
    p.num_inference_steps = (int) json_object_get_int_member (gen, "num_inference_steps");
    p.width = (int) json_object_get_int_member (gen, "width");
    p.height = (int) json_object_get_int_member (gen, "height");
    p.guidance_scale = (float) json_object_get_double_member (gen, "guidance_scale");
    p.seed = (guint64) json_object_get_int_member (gen, "seed");
    GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);
    g_assert_no_error (err);
    int d = tu_max_level_diff (g_ptr_array_index (imgs, 0), diffuse_safetensors_find (images, "bin"));
    g_test_message ("tiny-sd-bin (%s): %d levels from diffusers' image", m ? "auto" : "use_safetensors=False", d);
    g_assert_cmpint (d, <=, 1);
    g_ptr_array_unref (imgs);
    diffuse_sd_unref (sd);
  }
  diffuse_safetensors_unref (images);
  g_object_unref (parser);
  g_free (jpath);
  diffuse_pipeline_model_unref (pm);
  diffuse_pipeline_model_unref (pm_auto);
  diffuse_component_cache_unref (cache);
  g_free (dir);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  if (!tu_require_fixture ("pickle/tensors.bin", "make_pickle_fixtures.py"))
    return 77;
  g_test_add_func ("/pickle/tensors", test_tensors);
  g_test_add_func ("/pickle/names-and-views", test_names_and_views);
  g_test_add_func ("/pickle/errors", test_errors);
  g_test_add_func ("/pickle/damage", test_damage);
  g_test_add_func ("/pickle/pipeline", test_pipeline);
  return g_test_run ();
}

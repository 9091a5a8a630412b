/* AutoencoderKL against diffusers (tests/reference/make_vae_fixtures.py).
 * Tolerance: max abs error <= 1e-4 * max abs of the expected tensor. */
#include "testutil.h"
#include <diffuse/vae.h>
#include "tensor/ops_extra2.h"

#include <math.h>
#include <string.h>

#define RTOL 1e-4

typedef struct {
  DiffuseConfig *config;
  DiffuseWeights *weights;
  DiffuseSafetensors *io;
  DiffuseVae *vae;
  const char *name;
} Case;

static gboolean
case_open (Case *c, const char *name)
{
  g_autofree char *cfg_rel = g_strdup_printf ("vae/%s/config.json", name);
  g_autofree char *io_rel = g_strdup_printf ("vae/%s/io.safetensors", name);
  g_autofree char *w_rel = g_strdup_printf ("vae/%s/diffusion_pytorch_model.safetensors", name);
  if (!tu_have_fixture (cfg_rel) || !tu_have_fixture (io_rel) || !tu_have_fixture (w_rel))
    return FALSE;
  memset (c, 0, sizeof *c);
  c->name = name;
  GError *err = NULL;
  g_autofree char *cfg = tu_fixture (cfg_rel);
  c->config = diffuse_config_load (cfg, &err);
  g_assert_no_error (err);
  g_autofree char *wp = tu_fixture (w_rel);
  const char *paths[] = { wp, NULL };
  c->weights = diffuse_weights_open (paths, &err);
  g_assert_no_error (err);
  c->io = tu_open (io_rel);
  c->vae = diffuse_vae_new (c->config, c->weights, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  g_assert_no_error (err);
  g_assert_nonnull (c->vae);
  return TRUE;
}

static void
case_close (Case *c)
{
  diffuse_vae_unref (c->vae);
  diffuse_config_unref (c->config);
  diffuse_weights_unref (c->weights);
  diffuse_safetensors_unref (c->io);
}

static void
check (Case *c, const char *name, DiffuseTensor *got, const char *how)
{
  DiffuseTensor *want = tu_get (c->io, name);
  g_autofree char *what = g_strdup_printf ("%s %s%s", c->name, name, how);
  tu_assert_close (got, want, 0.0, RTOL, what);
  diffuse_tensor_unref (want);
}

/* encode (mean, logvar), posterior sample, decode */
static void
check_roundtrip (Case *c, const DiffuseVaeParams *p, const char *how)
{
  GError *err = NULL;
  DiffuseTensor *image = tu_get (c->io, "image");
  DiffuseTensor *mean = NULL, *logvar = NULL;
  g_assert_true (diffuse_vae_encode (c->vae, image, p, &mean, &logvar, &err));
  g_assert_no_error (err);
  check (c, "mean", mean, how);
  check (c, "logvar", logvar, how);

  DiffuseTensor *noise = tu_get (c->io, "noise");
  DiffuseTensor *sample = diffuse_vae_posterior_sample (mean, logvar, diffuse_tensor_f32 (noise), &err);
  g_assert_no_error (err);
  check (c, "sample", sample, how);

  DiffuseTensor *latents = tu_get (c->io, "latents");
  DiffuseTensor *dec = diffuse_vae_decode (c->vae, latents, p, &err);
  g_assert_no_error (err);
  check (c, "decoded", dec, how);

  diffuse_tensor_unref (dec);
  diffuse_tensor_unref (latents);
  diffuse_tensor_unref (sample);
  diffuse_tensor_unref (noise);
  diffuse_tensor_unref (mean);
  diffuse_tensor_unref (logvar);
  diffuse_tensor_unref (image);
}

static void
run_case (const char *name)
{
  Case c;
  if (!case_open (&c, name))
    return;
  DiffuseVaeParams p;
  diffuse_vae_default_params (&p);
  check_roundtrip (&c, &p, "");
  /* slicing (one image at a time) gives the same result */
  p.slicing = TRUE;
  check_roundtrip (&c, &p, " (sliced)");
  /* tiling enabled but the inputs fit one tile: the plain path (not for
   * "tiled", whose latents are bigger than a tile: see test_tiled) */
  p.slicing = FALSE;
  p.tiling = TRUE;
  if (!g_str_equal (name, "tiled"))
    check_roundtrip (&c, &p, " (tiling on, one tile)");
  case_close (&c);
}

static void
test_base (void)
{
  run_case ("base");
  Case c;
  if (!case_open (&c, "base"))
    return;
  double shift = -1;
  g_assert_cmpfloat_with_epsilon (diffuse_vae_scaling_factor (c.vae), 0.18215, 1e-12);
  g_assert_false (diffuse_vae_shift_factor (c.vae, &shift));
  g_assert_cmpfloat (shift, ==, 0.0);
  g_assert_true (diffuse_vae_force_upcast (c.vae));
  g_assert_cmpint (diffuse_vae_latent_channels (c.vae), ==, 4);
  g_assert_cmpint (diffuse_vae_scale_factor (c.vae), ==, 2);
  g_assert_cmpint (diffuse_vae_sample_size (c.vae), ==, 32);
  g_assert_cmpuint (diffuse_vae_latents_mean (c.vae, NULL), ==, 0);
  case_close (&c);
}

/* 3 blocks, 2 layers, gelu, latent 8, no quant convs, old conv-shaped attention keys */
static void
test_old3 (void)
{
  run_case ("old3");
  Case c;
  if (!case_open (&c, "old3"))
    return;
  double shift = 0;
  g_assert_cmpfloat_with_epsilon (diffuse_vae_scaling_factor (c.vae), 0.3611, 1e-12);
  g_assert_true (diffuse_vae_shift_factor (c.vae, &shift));
  g_assert_cmpfloat_with_epsilon (shift, 0.1159, 1e-12);
  g_assert_false (diffuse_vae_force_upcast (c.vae));
  g_assert_cmpint (diffuse_vae_latent_channels (c.vae), ==, 8);
  g_assert_cmpint (diffuse_vae_scale_factor (c.vae), ==, 4);
  case_close (&c);
}

static void test_noattn (void) { run_case ("noattn"); }

/* diffusers' enable_tiling(): tiled decode of a 20x14 latent (tiles of 8,
 * overlap 6, blend 4, the last row/column of tiles cut short) and tiled
 * encode of a 40x28 image, plus the plain paths of the same model */
static void
test_tiled (void)
{
  run_case ("tiled");
  Case c;
  if (!case_open (&c, "tiled"))
    return;
  GError *err = NULL;
  DiffuseVaeParams p;
  diffuse_vae_default_params (&p);
  p.tiling = TRUE;
  DiffuseTensor *latents = tu_get (c.io, "latents");
  DiffuseTensor *dec = diffuse_vae_decode (c.vae, latents, &p, &err);
  g_assert_no_error (err);
  check (&c, "tiled_decoded", dec, " (tiled)");
  /* and it is not the untiled result */
  DiffuseTensor *plain = tu_get (c.io, "decoded");
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (dec, plain), >, 1e-3);
  diffuse_tensor_unref (plain);
  diffuse_tensor_unref (dec);

  DiffuseTensor *image = tu_get (c.io, "tiled_image");
  DiffuseTensor *mean = NULL, *logvar = NULL;
  g_assert_true (diffuse_vae_encode (c.vae, image, &p, &mean, &logvar, &err));
  g_assert_no_error (err);
  check (&c, "tiled_mean", mean, " (tiled)");
  check (&c, "tiled_logvar", logvar, " (tiled)");
  diffuse_tensor_unref (mean);
  diffuse_tensor_unref (logvar);
  diffuse_tensor_unref (image);

  /* tiled + sliced on a batch of two copies: each half equals the tiled result */
  DiffuseTensor *pair[2] = { latents, latents };
  DiffuseTensor *two = diffuse_concat (pair, 2, 0);
  p.slicing = TRUE;
  dec = diffuse_vae_decode (c.vae, two, &p, &err);
  g_assert_no_error (err);
  DiffuseTensor *want = tu_get (c.io, "tiled_decoded");
  for (int b = 0; b < 2; b++) {
    DiffuseTensor *half = diffuse_narrow (dec, 0, b, 1);
    tu_assert_close (half, want, 0.0, RTOL, "tiled sliced batch element");
    diffuse_tensor_unref (half);
  }
  diffuse_tensor_unref (want);
  diffuse_tensor_unref (dec);
  diffuse_tensor_unref (two);
  diffuse_tensor_unref (latents);
  case_close (&c);
}

static void
test_errors (void)
{
  Case c;
  if (!case_open (&c, "base"))
    return;
  GError *err = NULL;

  /* wrong channel count */
  DiffuseTensor *image = tu_get (c.io, "image");
  DiffuseTensor *dec = diffuse_vae_decode (c.vae, image, NULL, &err);
  g_assert_null (dec);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);

  /* tiling that cannot advance */
  DiffuseVaeParams p;
  diffuse_vae_default_params (&p);
  p.tiling = TRUE;
  p.tile_overlap_factor = 1.0f;
  DiffuseTensor *mean = NULL, *logvar = NULL;
  g_assert_false (diffuse_vae_encode (c.vae, image, &p, &mean, &logvar, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_assert_null (mean);
  g_clear_error (&err);
  diffuse_tensor_unref (image);

  /* a block type we do not implement */
  DiffuseConfig *bad = diffuse_config_from_string (
      "{\"down_block_types\": [\"DownEncoderBlock2D\", \"AttnDownEncoderBlock2D\"],"
      " \"up_block_types\": [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\"], \"block_out_channels\": [8, 16],"
      " \"norm_num_groups\": 4}", "bad.json", &err);
  g_assert_no_error (err);
  DiffuseVae *v = diffuse_vae_new (bad, c.weights, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  g_assert_null (v);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED);
  g_clear_error (&err);
  diffuse_config_unref (bad);

  /* the weights lack what the config asks for (a third level) */
  bad = diffuse_config_from_string (
      "{\"down_block_types\": [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\", \"DownEncoderBlock2D\"],"
      " \"up_block_types\": [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\", \"UpDecoderBlock2D\"],"
      " \"block_out_channels\": [8, 16, 16], \"norm_num_groups\": 4}", "bad2.json", &err);
  g_assert_no_error (err);
  v = diffuse_vae_new (bad, c.weights, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  g_assert_null (v);
  g_assert_nonnull (err);
  g_assert_true (err->code == DIFFUSE_ERROR_NOT_FOUND || err->code == DIFFUSE_ERROR_CONFIG);
  g_assert_nonnull (strstr (err->message, "AutoencoderKL"));
  g_clear_error (&err);
  diffuse_config_unref (bad);

  /* norm_num_groups not dividing the channels */
  bad = diffuse_config_from_string ("{\"block_out_channels\": [8, 16], \"norm_num_groups\": 3,"
                                    " \"down_block_types\": [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\"],"
                                    " \"up_block_types\": [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\"]}",
                                    "bad3.json", &err);
  g_assert_no_error (err);
  v = diffuse_vae_new (bad, c.weights, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  g_assert_null (v);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_clear_error (&err);
  diffuse_config_unref (bad);
  case_close (&c);
}

/* Writes a copy of vae/base's weights into a temp dir, without `drop` and
 * with an extra tensor `extra` (either may be NULL); returns the file path. */
static char *
write_variant (const char *drop, const char *extra, char **dir)
{
  DiffuseSafetensors *st = tu_open ("vae/base/diffusion_pytorch_model.safetensors");
  DiffuseStWriter *w = diffuse_st_writer_new ();
  guint n = diffuse_safetensors_n_tensors (st);
  DiffuseTensor **keep = g_new0 (DiffuseTensor *, n);
  for (guint i = 0; i < n; i++) {
    const DiffuseStEntry *e = diffuse_safetensors_entry (st, i);
    if (drop && g_str_equal (e->name, drop))
      continue;
    keep[i] = tu_get (st, e->name);
    diffuse_st_writer_add (w, e->name, keep[i]);
  }
  DiffuseTensor *x = NULL;
  if (extra) {
    x = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 1, (const int64_t[]) { 3 });
    diffuse_st_writer_add (w, extra, x);
  }
  *dir = tu_mkdtemp ();
  char *path = g_build_filename (*dir, "diffusion_pytorch_model.safetensors", NULL);
  GError *err = NULL;
  g_assert_true (diffuse_st_writer_write (w, path, &err));
  g_assert_no_error (err);
  diffuse_st_writer_free (w);
  for (guint i = 0; i < n; i++)
    diffuse_tensor_clear (&keep[i]);
  g_free (keep);
  diffuse_tensor_clear (&x);
  diffuse_safetensors_unref (st);
  return path;
}

/* A file lacking one tensor: NOT_FOUND naming the key and the component. */
static void
test_missing_tensor (void)
{
  Case c;
  if (!case_open (&c, "base"))
    return;
  const char *drop = "decoder.up_blocks.0.resnets.0.conv1.weight";
  char *dir = NULL;
  char *path = write_variant (drop, NULL, &dir);
  GError *err = NULL;
  const char *paths[] = { path, NULL };
  DiffuseWeights *ws = diffuse_weights_open (paths, &err);
  g_assert_no_error (err);
  DiffuseVae *v = diffuse_vae_new (c.config, ws, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  g_assert_null (v);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, drop));
  g_assert_nonnull (strstr (err->message, "AutoencoderKL"));
  g_clear_error (&err);
  diffuse_weights_unref (ws);
  tu_rm_rf (dir);
  g_free (path);
  g_free (dir);
  case_close (&c);
}

/* An unexpected tensor: a warning (as diffusers logs), and the model works. */
static void
test_unexpected_tensor (void)
{
  Case c;
  if (!case_open (&c, "base"))
    return;
  char *dir = NULL;
  char *path = write_variant (NULL, "encoder.some_unused.weight", &dir);
  GError *err = NULL;
  const char *paths[] = { path, NULL };
  DiffuseWeights *ws = diffuse_weights_open (paths, &err);
  g_assert_no_error (err);
  g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING, "*encoder.some_unused.weight*");
  DiffuseVae *v = diffuse_vae_new (c.config, ws, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  g_test_assert_expected_messages ();
  g_assert_no_error (err);
  g_assert_nonnull (v);
  DiffuseTensor *latents = tu_get (c.io, "latents");
  DiffuseTensor *dec = diffuse_vae_decode (v, latents, NULL, &err);
  g_assert_no_error (err);
  check (&c, "decoded", dec, " (extra key)");
  diffuse_tensor_unref (dec);
  diffuse_tensor_unref (latents);
  diffuse_vae_unref (v);
  diffuse_weights_unref (ws);
  tu_rm_rf (dir);
  g_free (path);
  g_free (dir);
  case_close (&c);
}

/* The posterior's helpers: logvar clamp to [-30, 20] and exp (0.5 * logvar). */
static void
test_posterior_ops (void)
{
  const float lv[6] = { -45.0f, -30.0f, -1.5f, 0.0f, 19.5f, 33.0f };
  DiffuseTensor *t = diffuse_tensor_from_f32 (lv, 4, (const int64_t[]) { 1, 6, 1, 1 });
  DiffuseTensor *c = diffuse_clamp (t, -30.0f, 20.0f);
  g_assert_nonnull (c);
  const float want_c[6] = { -30.0f, -30.0f, -1.5f, 0.0f, 19.5f, 20.0f };
  for (int i = 0; i < 6; i++)
    g_assert_cmpfloat (diffuse_tensor_f32 (c)[i], ==, want_c[i]);
  DiffuseTensor *e = diffuse_exp (c, 0.5f);
  for (int i = 0; i < 6; i++)
    g_assert_cmpfloat (diffuse_tensor_f32 (e)[i], ==, expf (0.5f * want_c[i]));
  /* NaN passes through the clamp as torch.clamp lets it */
  const float nan_in[1] = { NAN };
  DiffuseTensor *tn = diffuse_tensor_from_f32 (nan_in, 1, (const int64_t[]) { 1 });
  DiffuseTensor *cn = diffuse_clamp (tn, -30.0f, 20.0f);
  g_assert_true (isnan (diffuse_tensor_f32 (cn)[0]));
  /* sample = mean + exp (0.5 * clamped logvar) * noise */
  const float mean[6] = { 1, 2, 3, 4, 5, 6 }, noise[6] = { 0.5f, -1, 2, 0, 1, -0.25f };
  DiffuseTensor *m = diffuse_tensor_from_f32 (mean, 4, (const int64_t[]) { 1, 6, 1, 1 });
  GError *err = NULL;
  DiffuseTensor *s = diffuse_vae_posterior_sample (m, c, noise, &err);
  g_assert_no_error (err);
  for (int i = 0; i < 6; i++)
    g_assert_cmpfloat (diffuse_tensor_f32 (s)[i], ==, mean[i] + expf (0.5f * want_c[i]) * noise[i]);
  diffuse_tensor_unref (s);
  diffuse_tensor_unref (m);
  diffuse_tensor_unref (cn);
  diffuse_tensor_unref (tn);
  diffuse_tensor_unref (e);
  diffuse_tensor_unref (c);
  diffuse_tensor_unref (t);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/vae/base", test_base);
  g_test_add_func ("/vae/old-names-3-blocks", test_old3);
  g_test_add_func ("/vae/no-mid-attention-1-block", test_noattn);
  g_test_add_func ("/vae/tiled", test_tiled);
  g_test_add_func ("/vae/errors", test_errors);
  g_test_add_func ("/vae/missing-tensor", test_missing_tensor);
  g_test_add_func ("/vae/unexpected-tensor", test_unexpected_tensor);
  g_test_add_func ("/vae/posterior-ops", test_posterior_ops);
  return g_test_run ();
}

/* fp16 pipelines against diffusers in float16 (tests/reference/make_sd_f16_fixtures.py).
 *
 * diffusers with torch_dtype=float16 draws its noise in float16 (another
 * random stream than float32) and runs the models in float16.  The C pipeline
 * loaded with dtype f16 must draw the same noise (rng.h: float16 values, which
 * for a count that is not a multiple of 16 also end differently); the models
 * then differ from torch's CPU float16 kernels only by rounding, so the images
 * must agree to PSNR >= 35 dB (issue 7's bar for fp16 against diffusers).  The
 * f32 pipeline's PSNR against the same fp16 image is printed for comparison.
 *
 * DIFFUSE_TEST_DEVICE=cuda:0 runs the f16 cases on a GPU (tests/bench/gpu/run.sh). */
#include "testutil.h"
#include <diffuse/sd.h>
#include <json-glib/json-glib.h>
#include <math.h>
#include <string.h>

static DiffuseComponentCache *cache;
static DiffuseSafetensors *images, *init_images;

static DiffusePipelineModel *
load (const char *rel, DiffuseDType dt, const char *device)
{
  GError *err = NULL;
  char *path = tu_fixture (rel);
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = device;
  lp.have_dtype = TRUE;
  lp.dtype = dt;
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (path, &lp, cache, &err);
  g_assert_no_error (err);
  g_free (path);
  return pm;
}

/* PSNR (dB) of our image of case c, run with the model in dtype dt, against diffusers' */
static double
run_psnr (JsonObject *c, DiffuseDType dt, const char *device, int *worst)
{
  const char *id = json_object_get_string_member (c, "id");
  const char *task = json_object_get_string_member (c, "task");
  gboolean i2i = strcmp (task, "img2img") == 0;
  DiffusePipelineModel *pm = load (json_object_get_string_member (c, "model"), dt, device);
  GError *err = NULL;
  DiffuseSD *sd = diffuse_sd_new (pm, i2i ? DIFFUSE_SD_IMG2IMG : DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = json_object_get_string_member (c, "prompt");
  p.width = (int) json_object_get_int_member (c, "width");
  p.height = (int) json_object_get_int_member (c, "height");
  p.num_inference_steps = (int) json_object_get_int_member (c, "steps");
  p.guidance_scale = (float) json_object_get_double_member (c, "guidance");
  p.seed = (guint64) json_object_get_int_member (c, "seed");
  p.scheduler = json_object_get_string_member (c, "scheduler");
  DiffuseImage *init = NULL;
  if (i2i) {
    init = tu_st_image (init_images, "init_image");
    p.image = init;
    p.strength = (float) json_object_get_double_member (c, "strength");
  }
  GPtrArray *out = diffuse_sd_generate (sd, &p, &err);
  g_assert_no_error (err);
  const DiffuseStEntry *e = diffuse_safetensors_find (images, id);
  g_assert_nonnull (e);
  int h = (int) e->shape[1], w = (int) e->shape[2];
  DiffuseImage *img = g_ptr_array_index (out, 0);
  g_assert_cmpint (img->width, ==, w);
  g_assert_cmpint (img->height, ==, h);
  guint8 *got = g_malloc ((size_t) h * w * 3);
  diffuse_image_to_rgb8 (img, got, w * 3);
  const guint8 *want = e->data;
  double se = 0;
  *worst = 0;
  for (int i = 0; i < h * w * 3; i++) {
    int d = abs ((int) got[i] - (int) want[i]);
    *worst = MAX (*worst, d);
    se += (double) d * d;
  }
  double mse = se / (h * w * 3);
  g_free (got);
  g_ptr_array_unref (out);
  diffuse_image_free (init);
  diffuse_sd_unref (sd);
  diffuse_pipeline_model_unref (pm);
  return mse == 0 ? INFINITY : 10.0 * log10 (255.0 * 255.0 / mse);
}

static void
run_case (gconstpointer data)
{
  JsonObject *c = (JsonObject *) data;
  const char *id = json_object_get_string_member (c, "id");
  int worst = 0, worst32 = 0;
  double db = run_psnr (c, DIFFUSE_DTYPE_F16, g_getenv ("DIFFUSE_TEST_DEVICE"), &worst);
  double db32 = run_psnr (c, DIFFUSE_DTYPE_F32, NULL, &worst32);
  g_test_message ("%s: f16 %.2f dB (max diff %d levels); the f32 pipeline against the same image %.2f dB (max %d)", id, db,
                  worst, db32, worst32);
  g_assert_cmpfloat (db, >=, 35.0);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  GError *err = NULL;
  cache = diffuse_component_cache_new ();
  char *dir = tu_fixture ("sd-f16");
  char *jp = g_build_filename (dir, "cases.json", NULL);
  char *ip = g_build_filename (dir, "images.safetensors", NULL);
  char *initp = tu_fixture ("sd/images.safetensors");
  JsonParser *parser = json_parser_new ();
  g_assert_true (json_parser_load_from_file (parser, jp, &err));
  images = diffuse_safetensors_open (ip, &err);
  g_assert_no_error (err);
  init_images = diffuse_safetensors_open (initp, &err);
  g_assert_no_error (err);
  JsonArray *cases = json_object_get_array_member (json_node_get_object (json_parser_get_root (parser)), "cases");
  for (guint i = 0; i < json_array_get_length (cases); i++) {
    JsonObject *c = json_array_get_object_element (cases, i);
    char *name = g_strdup_printf ("/sd-f16/%s", json_object_get_string_member (c, "id"));
    g_test_add_data_func (name, c, run_case);
    g_free (name);
  }
  int rc = g_test_run ();
  g_object_unref (parser);
  diffuse_safetensors_unref (images);
  diffuse_safetensors_unref (init_images);
  diffuse_component_cache_unref (cache);
  g_free (dir);
  g_free (jp);
  g_free (ip);
  g_free (initp);
  return rc;
}

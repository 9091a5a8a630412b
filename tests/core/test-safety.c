/* The safety checker against diffusers/transformers
 * (tests/reference/make_safety_fixtures.py, tests/fixtures/safety):
 *
 *   /safety/processor   CLIPImageProcessor's pixel_values of 8-bit images of
 *                       several sizes (down- and upscaled, square or not)
 *   /safety/checker     pooled output, image_embeds, cosine distances and
 *                       has_nsfw_concept of StableDiffusionSafetyChecker
 *   /safety/pipeline    the tiny SD pipeline with the checker: diffusers'
 *                       images (the flagged one black) and flags
 *   /safety/errors      a checker without a feature extractor, safety_checker
 *                       = none, a damaged checker config */
#include <string.h>
#include <unistd.h>
#include "testutil.h"

static DiffuseSafetensors *expect;

static guint8 *
u8_image (const char *name, int *w, int *h)
{
  DiffuseTensor *t = tu_get (expect, name);   /* [h, w, 3] levels */
  *h = (int) t->shape[0];
  *w = (int) t->shape[1];
  const float *v = diffuse_tensor_f32 (t);
  guint8 *rgb = g_new (guint8, (size_t) *w * *h * 3);
  for (size_t i = 0; i < (size_t) *w * *h * 3; i++)
    rgb[i] = (guint8) v[i];
  diffuse_tensor_unref (t);
  return rgb;
}

static DiffuseClipImageProcessor *
load_processor (void)
{
  GError *err = NULL;
  char *path = tu_fixture ("safety/feature_extractor/preprocessor_config.json");
  DiffuseConfig *c = diffuse_config_load (path, &err);
  g_assert_no_error (err);
  DiffuseClipImageProcessor *p = diffuse_clip_image_processor_new (c, &err);
  g_assert_no_error (err);
  diffuse_config_unref (c);
  g_free (path);
  return p;
}

static void
test_processor (void)
{
  DiffuseClipImageProcessor *p = load_processor ();
  int n = 0;
  for (;; n++) {
    char *name = g_strdup_printf ("processor.%d.image", n);
    gboolean has = diffuse_safetensors_find (expect, name) != NULL;
    g_free (name);
    if (!has)
      break;
    char *iname = g_strdup_printf ("processor.%d.image", n), *pname = g_strdup_printf ("processor.%d.pixel_values", n);
    int w, h;
    guint8 *rgb = u8_image (iname, &w, &h);
    GError *err = NULL;
    const guint8 *one[1] = { rgb };
    DiffuseTensor *got = diffuse_clip_image_processor_preprocess (p, one, &w, &h, NULL, 1, &err);
    g_assert_no_error (err);
    DiffuseTensor *want = tu_get (expect, pname);
    DiffuseTensor *g3 = diffuse_reshape (got, 3, want->shape);
    char *what = g_strdup_printf ("pixel_values of a %dx%d image", w, h);
    /* the same 8-bit levels, then the same f32 normalisation: one f32 ulp or so */
    tu_assert_close (g3, want, 1e-6, 1e-6, what);
    g_free (what);
    diffuse_tensor_unref (g3);
    diffuse_tensor_unref (got);
    diffuse_tensor_unref (want);
    g_free (rgb);
    g_free (iname);
    g_free (pname);
  }
  g_assert_cmpint (n, >=, 6);

  /* the older form of the same settings (Stable Diffusion 1.x checkpoints' CLIPFeatureExtractor
   * config: sizes as numbers, mean/std implied): the same pixel_values */
  GError *err = NULL;
  DiffuseConfig *c = diffuse_config_from_string ("{\"crop_size\": 32, \"do_center_crop\": true, \"do_normalize\": true, "
                                                 "\"do_resize\": true, \"feature_extractor_type\": "
                                                 "\"CLIPFeatureExtractor\", \"resample\": 3, \"size\": 32}",
                                                 "old-style", &err);
  g_assert_no_error (err);
  DiffuseClipImageProcessor *old = diffuse_clip_image_processor_new (c, &err);
  g_assert_no_error (err);
  int w, h;
  guint8 *rgb = u8_image ("processor.1.image", &w, &h);
  const guint8 *one[1] = { rgb };
  DiffuseTensor *a = diffuse_clip_image_processor_preprocess (p, one, &w, &h, NULL, 1, &err);
  DiffuseTensor *b = diffuse_clip_image_processor_preprocess (old, one, &w, &h, NULL, 1, &err);
  g_assert_no_error (err);
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (a, b), ==, 0.0);
  diffuse_tensor_unref (a);
  diffuse_tensor_unref (b);
  g_free (rgb);
  diffuse_clip_image_processor_free (old);
  diffuse_config_unref (c);
  diffuse_clip_image_processor_free (p);
}

static DiffuseSafetyChecker *
load_checker (const char *config_text, GError **error)
{
  char *cpath = tu_fixture ("safety/safety_checker/config.json");
  char *wpath = tu_fixture ("safety/safety_checker/model.safetensors");
  DiffuseConfig *c = config_text ? diffuse_config_from_string (config_text, cpath, error)
                                 : diffuse_config_load (cpath, error);
  g_assert_nonnull (c);
  const char *paths[] = { wpath, NULL };
  DiffuseWeights *w = diffuse_weights_open (paths, error);
  g_assert_nonnull (w);
  DiffuseSafetyChecker *sc = diffuse_safety_checker_new (c, w, diffuse_device_cpu (), DIFFUSE_DTYPE_F32, error);
  diffuse_weights_unref (w);
  diffuse_config_unref (c);
  g_free (cpath);
  g_free (wpath);
  return sc;
}

static void
test_checker (void)
{
  GError *err = NULL;
  DiffuseSafetyChecker *sc = load_checker (NULL, &err);
  g_assert_no_error (err);
  g_assert_cmpint (diffuse_safety_checker_image_size (sc), ==, 32);
  DiffuseTensor *pv = tu_get (expect, "checker.pixel_values");
  const int B = (int) pv->shape[0];
  gboolean *nsfw = g_new0 (gboolean, B);
  DiffuseSafetyScores s;
  g_assert_true (diffuse_safety_checker_check (sc, pv, nsfw, &s, &err));
  g_assert_no_error (err);
  const char *names[] = { "checker.pooled", "checker.image_embeds", "checker.special_cos_dist", "checker.cos_dist" };
  DiffuseTensor *got[] = { s.pooled, s.image_embeds, s.special_cos_dist, s.cos_dist };
  for (int i = 0; i < 4; i++) {
    DiffuseTensor *want = tu_get (expect, names[i]);
    tu_assert_close (got[i], want, 1e-5, 1e-4, names[i]);
    diffuse_tensor_unref (want);
  }
  DiffuseTensor *wf = tu_get (expect, "checker.nsfw");
  int n_flagged = 0;
  for (int b = 0; b < B; b++) {
    g_assert_cmpint (nsfw[b], ==, diffuse_tensor_f32 (wf)[b] != 0.0f);
    n_flagged += nsfw[b];
  }
  g_assert_cmpint (n_flagged, >, 0);      /* both outcomes occur */
  g_assert_cmpint (n_flagged, <, B);
  diffuse_tensor_unref (wf);
  diffuse_safety_scores_clear (&s);
  diffuse_tensor_unref (pv);
  g_free (nsfw);
  diffuse_safety_checker_unref (sc);
}

/* tiny-sd's components + the fixture checker (+ feature extractor), in a temp folder */
static char *
make_pipeline_dir (gboolean with_feature_extractor)
{
  char *dir = tu_mkdtemp ();
  char *sd = tu_fixture ("pipelines/tiny-sd"), *safety = tu_fixture ("safety");
  const char *comps[] = { "unet", "vae", "text_encoder", "tokenizer", "scheduler" };
  for (guint i = 0; i < G_N_ELEMENTS (comps); i++) {
    char *src = g_build_filename (sd, comps[i], NULL), *dst = g_build_filename (dir, comps[i], NULL);
    g_assert_cmpint (symlink (src, dst), ==, 0);
    g_free (src);
    g_free (dst);
  }
  const char *extra[] = { "safety_checker", "feature_extractor" };
  for (guint i = 0; i < (with_feature_extractor ? 2u : 1u); i++) {
    char *src = g_build_filename (safety, extra[i], NULL), *dst = g_build_filename (dir, extra[i], NULL);
    g_assert_cmpint (symlink (src, dst), ==, 0);
    g_free (src);
    g_free (dst);
  }
  char *index = g_strdup_printf (
      "{\"_class_name\": \"StableDiffusionPipeline\", \"_diffusers_version\": \"0.42.1\",\n"
      " \"feature_extractor\": %s,\n"
      " \"safety_checker\": [\"stable_diffusion\", \"StableDiffusionSafetyChecker\"],\n"
      " \"requires_safety_checker\": true,\n"
      " \"scheduler\": [\"diffusers\", \"PNDMScheduler\"], \"text_encoder\": [\"transformers\", \"CLIPTextModel\"],\n"
      " \"tokenizer\": [\"transformers\", \"CLIPTokenizer\"], \"unet\": [\"diffusers\", \"UNet2DConditionModel\"],\n"
      " \"vae\": [\"diffusers\", \"AutoencoderKL\"]}\n",
      with_feature_extractor ? "[\"transformers\", \"CLIPImageProcessor\"]" : "[null, null]");
  char *ip = g_build_filename (dir, "model_index.json", NULL);
  g_assert_true (g_file_set_contents (ip, index, -1, NULL));
  g_free (ip);
  g_free (index);
  g_free (sd);
  g_free (safety);
  return dir;
}

static void
test_pipeline (void)
{
  char *dir = make_pipeline_dir (TRUE);
  GError *err = NULL;
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (dir, &lp, cache, &err);
  g_assert_no_error (err);
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  g_assert_true (diffuse_sd_has_safety_checker (sd));
  const char *prompts[] = { "a red circle", "a small blue square at the top left",
                            "a green triangle on a white background" };
  for (int i = 0; i < 3; i++) {
    DiffuseSDParams p;
    diffuse_sd_default_params (&p);
    p.prompt = prompts[i];
    p.seed = 100 + i;
    p.num_inference_steps = 4;
    p.width = p.height = 64;
    char *iname = g_strdup_printf ("pipeline.%d.image", i), *fname = g_strdup_printf ("pipeline.%d.nsfw", i);
    DiffuseTensor *wf = tu_get (expect, fname);
    const gboolean want_flag = diffuse_tensor_f32 (wf)[0] != 0.0f;
    diffuse_tensor_unref (wf);
    if (want_flag)   /* diffusers' warning, once */
      g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING, "Potential NSFW content was detected*");
    GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);
    g_assert_no_error (err);
    g_test_assert_expected_messages ();
    DiffuseImage *img = g_ptr_array_index (imgs, 0);
    g_assert_cmpint (img->nsfw, ==, want_flag);
    int w, h;
    guint8 *want = u8_image (iname, &w, &h);
    g_assert_cmpint (w, ==, img->width);
    guint8 *got = g_new (guint8, (size_t) w * h * 3);
    diffuse_image_to_rgb8 (img, got, w * 3);
    int maxd = 0;
    for (size_t k = 0; k < (size_t) w * h * 3; k++)
      maxd = MAX (maxd, ABS ((int) got[k] - (int) want[k]));
    g_test_message ("prompt %d: nsfw %d, max difference %d levels", i, want_flag, maxd);
    g_assert_cmpint (maxd, <=, 1);
    if (want_flag)
      for (size_t k = 0; k < (size_t) w * h * 3; k++)
        g_assert_cmpint (got[k], ==, 0);
    g_free (got);
    g_free (want);
    g_free (iname);
    g_free (fname);
    g_ptr_array_unref (imgs);
  }
  diffuse_sd_unref (sd);

  /* safety_checker = none: no check (the loader warns: the model asks for one) */
  GHashTable *ov = g_hash_table_new (g_str_hash, g_str_equal);
  g_hash_table_insert (ov, (gpointer) "safety_checker", NULL);
  lp.overrides = ov;
  g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING, "*safety checker is disabled*");
  DiffusePipelineModel *pm2 = diffuse_pipeline_model_load (dir, &lp, cache, &err);
  g_assert_no_error (err);
  g_test_assert_expected_messages ();
  DiffuseSD *sd2 = diffuse_sd_new (pm2, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  g_assert_false (diffuse_sd_has_safety_checker (sd2));
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = prompts[0];
  p.seed = 100;
  p.num_inference_steps = 4;
  p.width = p.height = 64;
  GPtrArray *imgs = diffuse_sd_generate (sd2, &p, &err);
  g_assert_no_error (err);
  DiffuseImage *img = g_ptr_array_index (imgs, 0);
  g_assert_false (img->nsfw);
  double sum = 0;
  for (size_t k = 0; k < (size_t) img->width * img->height * 3; k++)
    sum += img->pixels[k];
  g_assert_cmpfloat (sum, >, 0.0);   /* the picture, not black */
  g_ptr_array_unref (imgs);
  diffuse_sd_unref (sd2);
  g_hash_table_unref (ov);
  diffuse_pipeline_model_unref (pm2);
  diffuse_pipeline_model_unref (pm);
  diffuse_component_cache_unref (cache);
  tu_rm_rf (dir);
  g_free (dir);
}

static void
test_errors (void)
{
  GError *err = NULL;
  /* a checker without a feature extractor: a clear error, as diffusers' ValueError */
  char *dir = make_pipeline_dir (FALSE);
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  DiffuseLoadParams lp = diffuse_load_default_params ();
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (dir, &lp, cache, &err);
  g_assert_no_error (err);
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_null (sd);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, "feature_extractor"));
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  diffuse_pipeline_model_unref (pm);
  diffuse_component_cache_unref (cache);
  tu_rm_rf (dir);
  g_free (dir);

  /* no vision_config */
  DiffuseSafetyChecker *sc = load_checker ("{\"projection_dim\": 16}", &err);
  g_assert_null (sc);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  /* a vision config that does not fit the weights: the tensor named */
  sc = load_checker ("{\"projection_dim\": 16, \"vision_config\": {\"hidden_size\": 32, \"intermediate_size\": 37, "
                     "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"image_size\": 64, \"patch_size\": 8}}",
                     &err);
  g_assert_null (sc);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_assert_nonnull (strstr (err->message, "position_embedding"));
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  /* a processor config with an unsupported filter */
  DiffuseConfig *c = diffuse_config_from_string ("{\"size\": 32, \"crop_size\": 32, \"resample\": 1}", "pp", &err);
  g_assert_null (diffuse_clip_image_processor_new (c, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED);
  g_clear_error (&err);
  diffuse_config_unref (c);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  if (!tu_require_fixture ("safety/expected.safetensors", "make_safety_fixtures.py"))
    return 77;
  expect = tu_open ("safety/expected.safetensors");
  g_test_add_func ("/safety/processor", test_processor);
  g_test_add_func ("/safety/checker", test_checker);
  g_test_add_func ("/safety/pipeline", test_pipeline);
  g_test_add_func ("/safety/errors", test_errors);
  int r = g_test_run ();
  diffuse_safetensors_unref (expect);
  return r;
}

/* text2img / img2img end to end against diffusers (tests/reference/make_sd_fixtures.py):
 * every scheduler on two tiny configurations, img2img at strengths 0.3 and 0.8,
 * and the pipeline options (no CFG, negative prompt with two images, clip skip,
 * guidance rescale at a non-square size, Karras sigmas).  The 8-bit images must
 * be within one level of diffusers' output_type="np" images. */
#include "testutil.h"
#include <diffuse/sd.h>
#include <diffuse/scheduler.h>
#include <diffuse/clip_text.h>
#include <diffuse/clip_tokenizer.h>
#include <json-glib/json-glib.h>
#include <string.h>

static DiffuseComponentCache *cache;
static GHashTable *models;   /* rel path -> DiffusePipelineModel */
static DiffuseSafetensors *images;

static DiffusePipelineModel *
get_model (const char *rel)
{
  DiffusePipelineModel *pm = g_hash_table_lookup (models, rel);
  if (pm)
    return pm;
  GError *err = NULL;
  char *path = tu_fixture (rel);
  /* DIFFUSE_TEST_DEVICE=cuda:0 runs the same cases on a GPU (tests/bench/gpu/run.sh) */
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  pm = diffuse_pipeline_model_load (path, &lp, cache, &err);
  g_assert_no_error (err);
  g_free (path);
  g_hash_table_insert (models, g_strdup (rel), pm);
  return pm;
}

static const guint8 *
expected (const char *id, int *n, int *h, int *w)
{
  const DiffuseStEntry *e = diffuse_safetensors_find (images, id);
  g_assert_nonnull (e);
  g_assert_cmpint (e->dtype, ==, DIFFUSE_ST_U8);
  *n = (int) e->shape[0];
  *h = (int) e->shape[1];
  *w = (int) e->shape[2];
  return e->data;
}

static void
run_case (gconstpointer data)
{
  JsonObject *c = (JsonObject *) data;
  const char *id = json_object_get_string_member (c, "id");
  const char *task = json_object_get_string_member (c, "task");
  DiffusePipelineModel *pm = diffuse_pipeline_model_ref (get_model (json_object_get_string_member (c, "model")));
  GError *err = NULL;
  if (json_object_has_member (c, "scheduler_from")) {
    /* Scheduler.from_pretrained(other_repo, subfolder="scheduler") passed as the pipeline's scheduler */
    char *other = tu_fixture (json_object_get_string_member (c, "scheduler_from"));
    DiffuseComponent *sc = diffuse_component_load (cache, other, "scheduler", "scheduler", NULL, &err);
    g_assert_no_error (err);
    g_free (other);
    GHashTable *ov = g_hash_table_new (g_str_hash, g_str_equal);
    g_hash_table_insert (ov, (gpointer) "scheduler", sc);
    DiffusePipelineModel *derived = diffuse_pipeline_model_derive (pm, NULL, ov, &err);
    g_assert_no_error (err);
    g_hash_table_unref (ov);
    diffuse_component_unref (sc);
    diffuse_pipeline_model_unref (pm);
    pm = derived;
  }
  DiffuseSD *sd = diffuse_sd_new (pm, strcmp (task, "img2img") == 0 ? DIFFUSE_SD_IMG2IMG : DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);

  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = json_object_get_string_member (c, "prompt");
  JsonNode *neg = json_object_get_member (c, "negative_prompt");
  p.negative_prompt = JSON_NODE_HOLDS_NULL (neg) ? NULL : json_node_get_string (neg);
  p.width = (int) json_object_get_int_member (c, "width");
  p.height = (int) json_object_get_int_member (c, "height");
  p.num_inference_steps = (int) json_object_get_int_member (c, "steps");
  p.guidance_scale = (float) json_object_get_double_member (c, "guidance");
  p.seed = (guint64) json_object_get_int_member (c, "seed");
  p.num_images = (int) json_object_get_int_member (c, "num_images");
  p.clip_skip = (int) json_object_get_int_member (c, "clip_skip");
  p.guidance_rescale = (float) json_object_get_double_member (c, "guidance_rescale");
  p.scheduler = json_object_get_string_member (c, "scheduler");
  DiffuseConfig *opts = NULL;
  if (json_object_has_member (c, "scheduler_options")) {
    /* the checkpoint's scheduler config with the options on top (from_config(config, **kwargs)) */
    JsonObject *base = diffuse_config_object (diffuse_component_config (diffuse_pipeline_model_get (pm, "scheduler")));
    JsonObject *o = json_object_get_object_member (c, "scheduler_options");
    /* a new object: the component's config is shared and must not change */
    JsonObject *merged = json_object_new ();
    GList *keys = json_object_get_members (base);
    for (GList *l = keys; l; l = l->next)
      json_object_set_member (merged, l->data, json_node_copy (json_object_get_member (base, l->data)));
    g_list_free (keys);
    keys = json_object_get_members (o);
    for (GList *l = keys; l; l = l->next)
      json_object_set_member (merged, l->data, json_node_copy (json_object_get_member (o, l->data)));
    g_list_free (keys);
    opts = diffuse_config_from_object (merged, "scheduler_options");
    json_object_unref (merged);
    p.scheduler_config = opts;
  }
  DiffuseImage *init = NULL;
  if (strcmp (task, "img2img") == 0) {
    init = tu_st_image (images, "init_image");
    p.image = init;
    p.strength = (float) json_object_get_double_member (c, "strength");
  }

  GPtrArray *out = diffuse_sd_generate (sd, &p, &err);
  g_assert_no_error (err);
  int n, h, w;
  const guint8 *want = expected (id, &n, &h, &w);
  g_assert_cmpint (out->len, ==, n);
  int worst = 0;
  guint64 off_by_one = 0;
  guint8 *got = g_malloc ((size_t) h * w * 3);
  for (int b = 0; b < n; b++) {
    DiffuseImage *img = g_ptr_array_index (out, b);
    g_assert_cmpint (img->width, ==, w);
    g_assert_cmpint (img->height, ==, h);
    diffuse_image_to_rgb8 (img, got, w * 3);
    const guint8 *ref = want + (size_t) b * h * w * 3;
    for (int i = 0; i < h * w * 3; i++) {
      int d = abs ((int) got[i] - (int) ref[i]);
      worst = MAX (worst, d);
      off_by_one += d == 1;
    }
  }
  g_test_message ("%s: max diff %d levels, %" G_GUINT64_FORMAT " values off by one", id, worst, off_by_one);
  g_assert_cmpint (worst, <=, 1);
  g_free (got);
  g_ptr_array_unref (out);
  diffuse_image_free (init);
  if (opts)
    diffuse_config_unref (opts);
  diffuse_sd_unref (sd);
  diffuse_pipeline_model_unref (pm);
}

static void
test_shared_components (void)
{
  /* text2img and img2img over one checkpoint share every loaded component */
  GError *err = NULL;
  DiffusePipelineModel *pm = get_model ("pipelines/tiny-sd");
  DiffuseCacheStats before, after;
  diffuse_component_cache_get_stats (cache, &before);
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.pipeline_class = "StableDiffusionImg2ImgPipeline";
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  char *path = tu_fixture ("pipelines/tiny-sd");
  DiffusePipelineModel *pm2 = diffuse_pipeline_model_load (path, &lp, cache, &err);
  g_free (path);
  g_assert_no_error (err);
  diffuse_component_cache_get_stats (cache, &after);
  g_assert_cmpuint (after.n_loads, ==, before.n_loads);
  g_assert_cmpuint (after.resident_bytes, ==, before.resident_bytes);
  g_assert_cmpstr (diffuse_pipeline_model_class (pm2), ==, "StableDiffusionImg2ImgPipeline");
  g_assert_true (diffuse_pipeline_model_get (pm, "unet") == diffuse_pipeline_model_get (pm2, "unet"));
  DiffuseSD *a = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  DiffuseSD *b = diffuse_sd_new (pm2, DIFFUSE_SD_IMG2IMG, &err);
  g_assert_no_error (err);
  const char *const *compat = diffuse_sd_compatible_schedulers (a);
  g_assert_true (compat && g_strv_contains (compat, "EulerDiscreteScheduler"));
  diffuse_sd_unref (a);
  diffuse_sd_unref (b);
  diffuse_pipeline_model_unref (pm2);
}

/* Precomputed prompt embeddings give the same image as the prompt: the
 * clip-skip case (diffusers made it from prompt_embeds) through both paths. */
/* from_pretrained (tiny-sd, vae=AutoencoderKL.from_pretrained (other)): a VAE
 * from a component folder (no model_index.json), as the guide's
 * "madebyollin/sdxl-vae-fp16-fix" (make_vae_swap_fixtures.py) */
static void
test_vae_swap (void)
{
  if (!tu_have_fixture ("vae-swap/images.safetensors"))
    return;
  GError *err = NULL;
  char *dir = tu_fixture ("vae-swap/vae");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  DiffuseComponent *vc = diffuse_component_load (cache, dir, NULL, "vae", &lp, &err);
  g_assert_no_error (err);
  g_free (dir);
  GHashTable *ov = g_hash_table_new (g_str_hash, g_str_equal);
  g_hash_table_insert (ov, (gpointer) "vae", vc);
  lp.overrides = ov;
  char *model = tu_fixture ("pipelines/tiny-sd");
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, &lp, cache, &err);
  g_assert_no_error (err);
  g_free (model);
  g_hash_table_unref (ov);
  g_assert_true (diffuse_pipeline_model_get (pm, "vae") == vc);
  diffuse_component_unref (vc);
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = "a red circle";
  p.num_inference_steps = 3;
  p.width = p.height = 32;
  p.seed = 21;
  GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);
  g_assert_no_error (err);
  DiffuseSafetensors *want = tu_open ("vae-swap/images.safetensors");
  const int maxd = tu_max_level_diff (g_ptr_array_index (imgs, 0), diffuse_safetensors_find (want, "swapped"));
  const int maxo = tu_max_level_diff (g_ptr_array_index (imgs, 0), diffuse_safetensors_find (want, "own"));
  g_test_message ("vae swapped: max difference %d levels (%d from the image with the model's own VAE)", maxd, maxo);
  g_assert_cmpint (maxd, <=, 1);
  g_assert_cmpint (maxo, >, 5);
  g_ptr_array_unref (imgs);
  diffuse_safetensors_unref (want);
  diffuse_sd_unref (sd);
  diffuse_pipeline_model_unref (pm);
}

static void
test_prompt_embeds (void)
{
  GError *err = NULL;
  DiffusePipelineModel *pm = get_model ("pipelines/tiny-sd");
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  DiffuseComponent *tc = diffuse_pipeline_model_get (pm, "text_encoder");
  DiffuseClipText *te = diffuse_clip_text_new (diffuse_component_config (tc), diffuse_component_weights (tc),
                                               diffuse_device_cpu (), DIFFUSE_DTYPE_F32, &err);
  char *tdir = tu_fixture ("pipelines/tiny-sd/tokenizer");
  DiffuseClipTokenizer *tok = diffuse_clip_tokenizer_load (tdir, &err);
  g_assert_no_error (err);
  g_free (tdir);
  int32_t ids[77];
  int n = diffuse_clip_tokenizer_encode (tok, "a small blue square at the top left", TRUE, ids, 77, &err);
  DiffuseClipTextParams tp;
  diffuse_clip_text_default_params (&tp);
  tp.clip_skip = 1;
  DiffuseClipTextOutput out = { 0 };
  g_assert_true (diffuse_clip_text_forward (te, ids, 1, n, &tp, &out, &err));
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt_embeds = out.prompt_embeds;
  p.num_inference_steps = 4;
  p.seed = 123;
  p.width = p.height = 32;
  GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);
  g_assert_no_error (err);
  int nn, h, w;
  const guint8 *want = expected ("A-clipskip", &nn, &h, &w);
  guint8 *got = g_malloc ((size_t) h * w * 3);
  diffuse_image_to_rgb8 (g_ptr_array_index (imgs, 0), got, w * 3);
  int worst = 0;
  for (int i = 0; i < h * w * 3; i++)
    worst = MAX (worst, abs ((int) got[i] - (int) want[i]));
  g_assert_cmpint (worst, <=, 1);
  g_free (got);
  g_ptr_array_unref (imgs);
  diffuse_clip_text_output_clear (&out);
  diffuse_clip_text_unref (te);
  diffuse_clip_tokenizer_unref (tok);
  diffuse_sd_unref (sd);
}

static gboolean
cancel_at_two (int step, int total, gpointer user_data)
{
  int *calls = user_data;
  (*calls)++;
  return step < 2;
}

static void
test_cancel_and_errors (void)
{
  GError *err = NULL;
  DiffuseSD *sd = diffuse_sd_new (get_model ("pipelines/tiny-sd"), DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = "x";
  p.num_inference_steps = 6;
  int calls = 0;
  p.on_step = cancel_at_two;
  p.user_data = &calls;
  GPtrArray *out = diffuse_sd_generate (sd, &p, &err);
  g_assert_null (out);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED);
  g_assert_cmpint (calls, ==, 2);
  g_clear_error (&err);

  diffuse_sd_default_params (&p);
  p.prompt = "x";
  p.width = 30;
  g_assert_null (diffuse_sd_generate (sd, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);

  p.width = 0;
  p.scheduler = "NoSuchScheduler";
  g_assert_null (diffuse_sd_generate (sd, &p, &err));
  g_assert_nonnull (err);
  g_assert_nonnull (strstr (err->message, "NoSuchScheduler"));
  g_clear_error (&err);
  diffuse_sd_unref (sd);

  DiffuseSD *i2i = diffuse_sd_new (get_model ("pipelines/tiny-sd"), DIFFUSE_SD_IMG2IMG, &err);
  diffuse_sd_default_params (&p);
  p.prompt = "x";
  g_assert_null (diffuse_sd_generate (i2i, &p, &err));   /* no image */
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  guint8 px[16 * 16 * 3] = { 0 };
  DiffuseImage *img = diffuse_image_from_rgb8 (px, 16, 16, 48);
  p.image = img;
  p.strength = 0.1f;
  p.num_inference_steps = 5;   /* int(5 * 0.1) = 0 steps left */
  g_assert_null (diffuse_sd_generate (i2i, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  diffuse_image_free (img);
  diffuse_sd_unref (i2i);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  if (!tu_have_fixture ("sd/cases.json"))
    return 0;
  cache = diffuse_component_cache_new ();
  models = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, (GDestroyNotify) diffuse_pipeline_model_unref);
  images = tu_open ("sd/images.safetensors");
  char *path = tu_fixture ("sd/cases.json");
  JsonParser *parser = json_parser_new ();
  GError *err = NULL;
  json_parser_load_from_file (parser, path, &err);
  g_assert_no_error (err);
  g_free (path);
  JsonArray *cases = json_object_get_array_member (json_node_get_object (json_parser_get_root (parser)), "cases");
  for (guint i = 0; i < json_array_get_length (cases); i++) {
    JsonObject *c = json_array_get_object_element (cases, i);
    char *name = g_strdup_printf ("/sd/%s", json_object_get_string_member (c, "id"));
    g_test_add_data_func (name, c, run_case);
    g_free (name);
  }
  g_test_add_func ("/sd/shared-components", test_shared_components);
  g_test_add_func ("/sd/prompt-embeds", test_prompt_embeds);
  g_test_add_func ("/sd/vae-swap", test_vae_swap);
  g_test_add_func ("/sd/cancel-and-errors", test_cancel_and_errors);
  int rc = g_test_run ();
  g_object_unref (parser);
  g_hash_table_destroy (models);
  diffuse_safetensors_unref (images);
  diffuse_component_cache_unref (cache);
  return rc;
}

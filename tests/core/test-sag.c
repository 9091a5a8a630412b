/* Self-attention guidance against diffusers' StableDiffusionSAGPipeline
 * (tests/reference/make_sag_fixtures.py, tests/fixtures/sag): the tiny SD
 * pipeline with and without classifier-free guidance, PNDM and DDIM, two
 * sizes; 8-bit images within one level.  Plus the errors: a scheduler with
 * fractional timesteps, latents too small to blur. */
#include <json-glib/json-glib.h>
#include <string.h>
#include "testutil.h"

static DiffuseSafetensors *images;
static DiffuseSD *sd;

static void
run_case (gconstpointer data)
{
  JsonObject *c = (JsonObject *) data;
  const char *id = json_object_get_string_member (c, "id");
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = json_object_get_string_member (c, "prompt");
  p.scheduler = json_object_get_string_member (c, "scheduler");
  p.guidance_scale = (float) json_object_get_double_member (c, "guidance");
  p.sag_scale = (float) json_object_get_double_member (c, "sag_scale");
  p.seed = (guint64) json_object_get_int_member (c, "seed");
  p.num_inference_steps = (int) json_object_get_int_member (c, "steps");
  p.width = (int) json_object_get_int_member (c, "width");
  p.height = (int) json_object_get_int_member (c, "height");
  GError *err = NULL;
  GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);
  g_assert_no_error (err);
  const DiffuseStEntry *e = diffuse_safetensors_find (images, id);
  const int maxd = tu_max_level_diff (g_ptr_array_index (imgs, 0), e);
  /* and SAG changed the picture (diffusers' own images differ by this much) */
  DiffuseSDParams q = p;
  q.sag_scale = 0.0f;
  GPtrArray *plain = diffuse_sd_generate (sd, &q, &err);
  g_assert_no_error (err);
  const int maxp = tu_max_level_diff (g_ptr_array_index (plain, 0), e);
  g_test_message ("%s: max difference %d levels (without SAG: %d, diffusers: %" G_GINT64_FORMAT ")", id, maxd, maxp,
                  json_object_get_int_member (c, "max_diff_to_plain"));
  g_assert_cmpint (maxd, <=, 1);
  g_assert_cmpint (maxp, >, 2);
  g_ptr_array_unref (plain);
  g_ptr_array_unref (imgs);
}

static void
test_errors (void)
{
  GError *err = NULL;
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = "a red circle";
  p.num_inference_steps = 3;
  p.sag_scale = 0.75f;
  p.width = p.height = 32;
  /* Euler's timesteps are fractional: no alphas_cumprod entry (diffusers fails too) */
  p.scheduler = "EulerDiscreteScheduler";
  g_assert_null (diffuse_sd_generate (sd, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_assert_nonnull (strstr (err->message, "integer timesteps"));
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  /* 8x8 pixels: 4x4 latents, under the blur's reflect padding */
  p.scheduler = NULL;
  p.width = p.height = 8;
  g_assert_null (diffuse_sd_generate (sd, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
}

/* the guide's from_pipe example: SAG on a pipeline with an IP-Adapter
 * (make_sag_ip_fixtures.py): without CFG (the degraded pass gets the image
 * tokens) and with (the unconditional ones).  The CFG reference is diffusers
 * with its SAG pipeline's batching of the image embeddings corrected (it
 * passes only the positive ones to the [uncond, cond] call; see the script):
 * the uncorrected image is 255 levels away, ours is what every other
 * diffusers pipeline computes. */
static void
test_ip_adapter (void)
{
  if (!tu_have_fixture ("sag/ip-adapter/cases.json"))
    return;
  GError *err = NULL;
  char *path = tu_fixture ("sag/ip-adapter/cases.json");
  JsonParser *parser = json_parser_new ();
  g_assert_true (json_parser_load_from_file (parser, path, NULL));
  g_free (path);
  JsonObject *root = json_node_get_object (json_parser_get_root (parser));
  JsonObject *gen = json_object_get_object_member (root, "generate");
  DiffuseSafetensors *want = tu_open ("sag/ip-adapter/images.safetensors");
  char *png = tu_fixture ("ip-adapter/input.png");
  DiffuseImage *img = diffuse_image_load_png (png, &err);
  g_assert_no_error (err);
  char *dir = tu_fixture ("ip-adapter");
  g_assert_true (diffuse_sd_load_ip_adapter (sd, dir, "models", json_object_get_string_member (root, "weight_name"),
                                             &err));
  g_assert_no_error (err);
  JsonArray *cases = json_object_get_array_member (root, "cases");
  for (guint i = 0; i < json_array_get_length (cases); i++) {
    JsonObject *c = json_array_get_object_element (cases, i);
    const char *id = json_object_get_string_member (c, "id");
    diffuse_sd_set_ip_adapter_scale (sd, (float) json_object_get_double_member (c, "ip_scale"));
    DiffuseSDParams p;
    diffuse_sd_default_params (&p);
    p.prompt = json_object_get_string_member (gen, "prompt");
    p.negative_prompt = json_object_get_string_member (gen, "negative_prompt");
    p.num_inference_steps = (int) json_object_get_int_member (gen, "num_inference_steps");
    p.width = (int) json_object_get_int_member (gen, "width");
    p.height = (int) json_object_get_int_member (gen, "height");
    p.scheduler = json_object_get_string_member (root, "scheduler");
    p.guidance_scale = (float) json_object_get_double_member (c, "guidance");
    p.sag_scale = (float) json_object_get_double_member (c, "sag_scale");
    p.seed = (guint64) json_object_get_int_member (c, "seed");
    p.ip_adapter_image = img;
    GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);
    g_assert_no_error (err);
    const int maxd = tu_max_level_diff (g_ptr_array_index (imgs, 0), diffuse_safetensors_find (want, id));
    g_test_message ("%s: max difference %d levels (SAG moves diffusers' image %d)", id, maxd,
                    (int) json_object_get_int_member (c, "max_diff_to_no_sag"));
    g_assert_cmpint (maxd, <=, 1);
    g_ptr_array_unref (imgs);
  }
  diffuse_sd_unload_ip_adapter (sd);
  diffuse_image_free (img);
  diffuse_safetensors_unref (want);
  g_object_unref (parser);
  g_free (dir);
  g_free (png);
}

/* StableDiffusionSAGPipeline is a known class: loading the tiny checkpoint as
 * one (diffusers' from_pipe / from_pretrained with that class) works */
static void
test_class (void)
{
  GError *err = NULL;
  char *model = tu_fixture ("pipelines/tiny-sd");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.pipeline_class = "StableDiffusionSAGPipeline";
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, &lp, NULL, &err);
  g_assert_no_error (err);
  g_assert_cmpstr (diffuse_pipeline_model_class (pm), ==, "StableDiffusionSAGPipeline");
  DiffuseSD *s = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  diffuse_sd_unref (s);
  diffuse_pipeline_model_unref (pm);
  g_free (model);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  if (!tu_require_fixture ("sag/cases.json", "make_sag_fixtures.py"))
    return 77;
  GError *err = NULL;
  char *path = tu_fixture ("sag/cases.json");
  JsonParser *parser = json_parser_new ();
  if (!json_parser_load_from_file (parser, path, &err))
    g_error ("%s: %s", path, err->message);
  g_free (path);
  images = tu_open ("sag/images.safetensors");
  char *model = tu_fixture ("pipelines/tiny-sd");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, &lp, NULL, &err);
  g_assert_no_error (err);
  g_free (model);
  sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  JsonArray *cases = json_object_get_array_member (json_node_get_object (json_parser_get_root (parser)), "cases");
  for (guint i = 0; i < json_array_get_length (cases); i++) {
    JsonObject *c = json_array_get_object_element (cases, i);
    char *name = g_strdup_printf ("/sag/%s", json_object_get_string_member (c, "id"));
    g_test_add_data_func (name, c, run_case);
    g_free (name);
  }
  g_test_add_func ("/sag/errors", test_errors);
  g_test_add_func ("/sag/ip-adapter", test_ip_adapter);
  g_test_add_func ("/sag/class", test_class);
  int r = g_test_run ();
  diffuse_sd_unref (sd);
  diffuse_pipeline_model_unref (pm);
  diffuse_safetensors_unref (images);
  g_object_unref (parser);
  return r;
}

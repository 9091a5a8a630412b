/* Stable Diffusion XL against diffusers (tests/reference/make_sdxl_fixtures.py,
 * tests/fixtures/pipelines/tiny-sdxl, tests/fixtures/sdxl): a tiny
 * StableDiffusionXLPipeline — two text encoders (the second's pad token "!"),
 * pooled text embeddings and time ids through the UNet's "text_time"
 * addition embedding, force_zeros_for_empty_prompt — with and without CFG,
 * a negative prompt, clip_skip, a non-square size, the guide's
 * HeunDiscreteScheduler swap, and StableDiffusionXLImg2ImgPipeline.from_pipe
 * at two strengths: 8-bit images within one level of diffusers'; loaded in
 * float16 within two levels of diffusers' float16 run; LoRA, IP-Adapter and
 * caller-given (pooled) prompt embeddings.  Plus the errors (SAG, clip_skip,
 * prompt_embeds without the pooled ones) and the model's class. */
#include <diffuse/diffuse.h>
#include <json-glib/json-glib.h>
#include <string.h>
#include "testutil.h"

static DiffuseSafetensors *images;
static DiffusePipelineModel *pm;
static DiffuseSD *t2i, *i2i;

static void
fill_params (DiffuseSDParams *p, JsonObject *c)
{
  diffuse_sd_default_params (p);
  p->prompt = json_object_get_string_member (c, "prompt");
  if (json_object_has_member (c, "negative_prompt"))
    p->negative_prompt = json_object_get_string_member (c, "negative_prompt");
  p->guidance_scale = (float) json_object_get_double_member (c, "guidance");
  p->num_inference_steps = (int) json_object_get_int_member (c, "steps");
  p->seed = (guint64) json_object_get_int_member (c, "seed");
  if (json_object_has_member (c, "clip_skip"))
    p->clip_skip = (int) json_object_get_int_member (c, "clip_skip");
  if (json_object_has_member (c, "scheduler"))
    p->scheduler = json_object_get_string_member (c, "scheduler");
}

/* generate with p and compare the image with st's entry id (diffusers'):
 * at most `limit` levels apart; returns the difference */
static int
check_in (DiffuseSafetensors *st, const char *id, DiffuseSD *sd, const DiffuseSDParams *p, int limit)
{
  GError *err = NULL;
  GPtrArray *imgs = diffuse_sd_generate (sd, p, &err);
  g_assert_no_error (err);
  const DiffuseStEntry *e = diffuse_safetensors_find (st, id);
  g_assert_nonnull (e);
  const int maxd = tu_max_level_diff (g_ptr_array_index (imgs, 0), e);
  g_test_message ("%s: max difference %d levels", id, maxd);
  g_assert_cmpint (maxd, <=, limit);
  g_ptr_array_unref (imgs);
  return maxd;
}

static void
check (const char *id, DiffuseSD *sd, const DiffuseSDParams *p)
{
  check_in (images, id, sd, p, 1);
}

static void
run_t2i (gconstpointer data)
{
  JsonObject *c = (JsonObject *) data;
  DiffuseSDParams p;
  fill_params (&p, c);
  p.width = (int) json_object_get_int_member (c, "width");
  p.height = (int) json_object_get_int_member (c, "height");
  check (json_object_get_string_member (c, "id"), t2i, &p);
}

static void
run_i2i (gconstpointer data)
{
  JsonObject *c = (JsonObject *) data;
  DiffuseSDParams p;
  fill_params (&p, c);
  DiffuseImage *in = tu_st_image (images, "i2i-input");
  p.image = in;
  p.strength = (float) json_object_get_double_member (c, "strength");
  check (json_object_get_string_member (c, "id"), i2i, &p);
  diffuse_image_free (in);
}

static void
test_model (void)
{
  g_assert_cmpstr (diffuse_pipeline_model_class (pm), ==, "StableDiffusionXLPipeline");
  g_assert_nonnull (diffuse_pipeline_model_get (pm, "text_encoder_2"));
  g_assert_nonnull (diffuse_pipeline_model_get (pm, "tokenizer_2"));
  /* the default size: unet sample_size x the VAE's scale factor */
  int w = 0, h = 0;
  diffuse_sd_default_size (t2i, &w, &h);
  g_assert_cmpint (w, ==, 32);
  g_assert_cmpint (h, ==, 32);
}

/* loaded in float16, as torch_dtype=torch.float16: noise drawn in float16
 * and, force_upcast, the VAE decoding in float32 (diffusers' needs_upcasting) */
static void
test_f16 (void)
{
  GError *err = NULL;
  char *model = tu_fixture ("pipelines/tiny-sdxl");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  lp.have_dtype = TRUE;
  lp.dtype = DIFFUSE_DTYPE_F16;
  DiffusePipelineModel *m16 = diffuse_pipeline_model_load (model, &lp, NULL, &err);
  g_assert_no_error (err);
  g_free (model);
  DiffuseSD *sd16 = diffuse_sd_new (m16, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = "a red circle";
  p.negative_prompt = "blurry, dark";
  p.guidance_scale = 6.0f;
  p.num_inference_steps = 4;
  p.width = p.height = 32;
  p.seed = 5;
  check_in (images, "f16-cfg-neg", sd16, &p, 2);
  diffuse_sd_unref (sd16);
  diffuse_pipeline_model_unref (m16);
}

/* LoRA on SDXL (make_sdxl_lora_fixtures.py): a UNet adapter (peft) at
 * weight 1 and 0.7, and adapters on both text encoders in diffusers' peft
 * names and in kohya-ss' lora_te1_ / lora_te2_ names; unloading restores */
static void
test_lora (void)
{
  if (!tu_have_fixture ("sdxl/lora/images.safetensors"))
    return;
  GError *err = NULL;
  DiffuseSafetensors *want = tu_open ("sdxl/lora/images.safetensors");
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = "a red circle";
  p.negative_prompt = "dark";
  p.num_inference_steps = 3;
  p.width = p.height = 32;
  p.guidance_scale = 5.0f;
  p.seed = 23;
  char *u = tu_fixture ("sdxl/lora/u"), *t = tu_fixture ("sdxl/lora/t"),
       *tk = tu_fixture ("sdxl/lora/t-kohya.safetensors");
  struct { const char *id, *load, *name; double w; } steps[] = {
    { "base", NULL, NULL, 1.0 }, { "u", u, "u", 1.0 }, { "u0.7", NULL, "u", 0.7 },
    { "t", t, "t", 1.0 }, { "t", tk, "tk", 1.0 }, { "base", NULL, NULL, 0.0 },
  };
  for (guint i = 0; i < G_N_ELEMENTS (steps); i++) {
    if (steps[i].load)
      g_assert_true (diffuse_sd_load_lora_weights (sd, steps[i].load, steps[i].name, &err));
    g_assert_no_error (err);
    if (steps[i].name) {
      const char *names[] = { steps[i].name };
      g_assert_true (diffuse_sd_set_adapters (sd, names, &steps[i].w, 1, &err));
      g_assert_no_error (err);
    } else if (i > 0) {
      diffuse_sd_unload_lora_weights (sd);
    }
    g_test_message ("adapter %s", steps[i].name ? steps[i].name : "none");
    check_in (want, steps[i].id, sd, &p, 1);
  }
  g_free (u);
  g_free (t);
  g_free (tk);
  diffuse_sd_unref (sd);
  diffuse_safetensors_unref (want);
}

/* an IP-Adapter on SDXL (make_sdxl_ip_fixtures.py: sdxl_models layout),
 * with CFG at scale 0.6 and without CFG at 1 */
static void
test_ip_adapter (void)
{
  if (!tu_have_fixture ("sdxl/ip-adapter/cases.json"))
    return;
  GError *err = NULL;
  DiffuseSafetensors *want = tu_open ("sdxl/ip-adapter/images.safetensors");
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  char *dir = tu_fixture ("sdxl/ip-adapter"), *png = tu_fixture ("ip-adapter/input.png");
  DiffuseImage *img = diffuse_image_load_png (png, &err);
  g_assert_no_error (err);
  g_assert_true (diffuse_sd_load_ip_adapter (sd, dir, "sdxl_models", "ip-adapter_tiny_sdxl.safetensors", &err));
  g_assert_no_error (err);
  const struct { const char *id; float scale, guidance; guint64 seed; } cases[] = {
    { "cfg-s0.6", 0.6f, 5.0f, 33 }, { "nocfg-s1", 1.0f, 1.0f, 9 },
  };
  for (guint i = 0; i < G_N_ELEMENTS (cases); i++) {
    diffuse_sd_set_ip_adapter_scale (sd, cases[i].scale);
    DiffuseSDParams p;
    diffuse_sd_default_params (&p);
    p.prompt = "bear eats pizza";
    p.num_inference_steps = 3;
    p.width = p.height = 32;
    p.guidance_scale = cases[i].guidance;
    p.seed = cases[i].seed;
    p.ip_adapter_image = img;
    check_in (want, cases[i].id, sd, &p, 1);
  }
  diffuse_image_free (img);
  g_free (dir);
  g_free (png);
  diffuse_sd_unref (sd);
  diffuse_safetensors_unref (want);
}

/* prompt_embeds + pooled_prompt_embeds (and the negatives) from the caller:
 * diffusers' encode_prompt output, weighted (make_sdxl_embeds_fixtures.py) */
static void
test_prompt_embeds (void)
{
  if (!tu_have_fixture ("sdxl/embeds.safetensors"))
    return;
  GError *err = NULL;
  DiffuseSafetensors *st = tu_open ("sdxl/embeds.safetensors");
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt_embeds = tu_get (st, "prompt_embeds");
  p.negative_prompt_embeds = tu_get (st, "negative_prompt_embeds");
  p.pooled_prompt_embeds = tu_get (st, "pooled_prompt_embeds");
  p.negative_pooled_prompt_embeds = tu_get (st, "negative_pooled_prompt_embeds");
  p.guidance_scale = 6.0f;
  p.num_inference_steps = 3;
  p.width = p.height = 32;
  p.seed = 4;
  check_in (st, "image", t2i, &p, 1);
  /* without the pooled ones: diffusers' error */
  DiffuseTensor *pooled = p.pooled_prompt_embeds;
  p.pooled_prompt_embeds = NULL;
  g_assert_null (diffuse_sd_generate (t2i, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_assert_nonnull (strstr (err->message, "pooled_prompt_embeds"));
  g_clear_error (&err);
  diffuse_tensor_unref (pooled);
  diffuse_tensor_unref (p.prompt_embeds);
  diffuse_tensor_unref (p.negative_prompt_embeds);
  diffuse_tensor_unref (p.negative_pooled_prompt_embeds);
  diffuse_safetensors_unref (st);
}

/* the refiner (make_sdxl_refiner_fixtures.py): text_encoder_2 alone, time
 * ids ending with an aesthetic score, img2img only */
static void
run_refiner (gconstpointer data)
{
  JsonObject *c = (JsonObject *) data;
  GError *err = NULL;
  char *model = tu_fixture ("pipelines/tiny-sdxl-refiner");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  DiffusePipelineModel *rm = diffuse_pipeline_model_load (model, &lp, NULL, &err);
  g_assert_no_error (err);
  g_free (model);
  g_assert_null (diffuse_pipeline_model_get (rm, "text_encoder"));
  /* text-to-image: not how diffusers runs a refiner */
  g_assert_null (diffuse_sd_new (rm, DIFFUSE_SD_TEXT2IMG, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED);
  g_clear_error (&err);
  DiffuseSD *sd = diffuse_sd_new (rm, DIFFUSE_SD_IMG2IMG, &err);
  g_assert_no_error (err);
  DiffuseSDParams p;
  fill_params (&p, c);
  if (json_object_has_member (c, "aesthetic_score"))
    p.aesthetic_score = (float) json_object_get_double_member (c, "aesthetic_score");
  if (json_object_has_member (c, "negative_aesthetic_score"))
    p.negative_aesthetic_score = (float) json_object_get_double_member (c, "negative_aesthetic_score");
  DiffuseImage *in = tu_st_image (images, "i2i-input");
  p.image = in;
  p.strength = (float) json_object_get_double_member (c, "strength");
  check (json_object_get_string_member (c, "id"), sd, &p);
  diffuse_image_free (in);
  diffuse_sd_unref (sd);
  diffuse_pipeline_model_unref (rm);
}

/* the ensemble of experts (make_sdxl_ensemble_fixtures.py): the base with
 * denoising_end 0.8 -> latents (diffuse_sd_generate_latents), the refiner
 * img2img on them with denoising_start 0.8; Euler and Heun (2nd order) */
static void
test_ensemble (void)
{
  if (!tu_have_fixture ("sdxl/ensemble.safetensors"))
    return;
  GError *err = NULL;
  DiffuseSafetensors *st = tu_open ("sdxl/ensemble.safetensors");
  char *model = tu_fixture ("pipelines/tiny-sdxl-refiner");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  DiffusePipelineModel *rm = diffuse_pipeline_model_load (model, &lp, NULL, &err);
  g_assert_no_error (err);
  g_free (model);
  DiffuseSD *ref = diffuse_sd_new (rm, DIFFUSE_SD_IMG2IMG, &err);
  g_assert_no_error (err);
  const struct { const char *id, *scheduler; int steps; guint64 seed; } cases[] = {
    { "euler", NULL, 10, 8 }, { "heun", "HeunDiscreteScheduler", 6, 9 },
  };
  for (guint i = 0; i < G_N_ELEMENTS (cases); i++) {
    DiffuseSDParams p;
    diffuse_sd_default_params (&p);
    p.prompt = "a red circle";
    p.negative_prompt = "dark";
    p.guidance_scale = 5.0f;
    p.width = p.height = 32;
    p.num_inference_steps = cases[i].steps;
    p.scheduler = cases[i].scheduler;
    p.seed = cases[i].seed;
    p.denoising_end = 0.8f;
    DiffuseTensor *lat = diffuse_sd_generate_latents (t2i, &p, &err);
    g_assert_no_error (err);
    char *key = g_strdup_printf ("%s.latents", cases[i].id);
    DiffuseTensor *want = tu_get (st, key);
    g_free (key);
    const double d = diffuse_tensor_max_abs_diff (lat, want);
    g_test_message ("%s: base latents after denoising_end 0.8: max abs diff %.3g", cases[i].id, d);
    g_assert_cmpfloat (d, <, 1e-3);
    /* the refiner from those latents, and from diffusers' */
    p.denoising_end = 0.0f;
    p.denoising_start = 0.8f;
    p.seed = cases[i].seed + 100;
    char *ikey = g_strdup_printf ("%s.image", cases[i].id);
    for (int k = 0; k < 2; k++) {
      p.image_latents = k ? want : lat;
      g_test_message ("the refiner from %s latents", k ? "diffusers'" : "our");
      check_in (st, ikey, ref, &p, 1);
    }
    g_free (ikey);
    diffuse_tensor_unref (lat);
    diffuse_tensor_unref (want);
  }
  diffuse_sd_unref (ref);
  diffuse_pipeline_model_unref (rm);
  diffuse_safetensors_unref (st);
}

static void
test_errors (void)
{
  GError *err = NULL;
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = "a red circle";
  p.num_inference_steps = 2;
  p.sag_scale = 0.75f;
  g_assert_null (diffuse_sd_generate (t2i, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  p.sag_scale = 0.0f;
  /* clip_skip beyond the encoders' layers */
  p.clip_skip = 2;
  g_assert_null (diffuse_sd_generate (t2i, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  if (!tu_require_fixture ("sdxl/cases.json", "make_sdxl_fixtures.py"))
    return 77;
  GError *err = NULL;
  char *path = tu_fixture ("sdxl/cases.json");
  JsonParser *parser = json_parser_new ();
  if (!json_parser_load_from_file (parser, path, &err))
    g_error ("%s: %s", path, err->message);
  g_free (path);
  images = tu_open ("sdxl/images.safetensors");
  char *model = tu_fixture ("pipelines/tiny-sdxl");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  pm = diffuse_pipeline_model_load (model, &lp, NULL, &err);
  g_assert_no_error (err);
  g_free (model);
  t2i = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  i2i = diffuse_sd_new (pm, DIFFUSE_SD_IMG2IMG, &err);
  g_assert_no_error (err);
  JsonObject *root = json_node_get_object (json_parser_get_root (parser));
  const char *groups[3] = { "cases", "img2img", "refiner" };
  const GTestDataFunc runs[3] = { run_t2i, run_i2i, run_refiner };
  for (int g = 0; g < 3; g++) {
    if (!json_object_has_member (root, groups[g]))
      continue;
    JsonArray *cases = json_object_get_array_member (root, groups[g]);
    for (guint i = 0; i < json_array_get_length (cases); i++) {
      JsonObject *c = json_array_get_object_element (cases, i);
      char *name = g_strdup_printf ("/sdxl/%s", json_object_get_string_member (c, "id"));
      g_test_add_data_func (name, c, runs[g]);
      g_free (name);
    }
  }
  g_test_add_func ("/sdxl/model", test_model);
  g_test_add_func ("/sdxl/errors", test_errors);
  g_test_add_func ("/sdxl/f16", test_f16);
  g_test_add_func ("/sdxl/lora", test_lora);
  g_test_add_func ("/sdxl/ip-adapter", test_ip_adapter);
  g_test_add_func ("/sdxl/prompt-embeds", test_prompt_embeds);
  g_test_add_func ("/sdxl/ensemble", test_ensemble);
  int r = g_test_run ();
  diffuse_sd_unref (i2i);
  diffuse_sd_unref (t2i);
  diffuse_pipeline_model_unref (pm);
  diffuse_safetensors_unref (images);
  g_object_unref (parser);
  return r;
}

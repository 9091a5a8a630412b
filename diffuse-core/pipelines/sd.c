/* gst-diffuse — StableDiffusionPipeline and StableDiffusionImg2ImgPipeline.
 *
 * The steps follow diffusers' pipeline_stable_diffusion.py and
 * pipeline_stable_diffusion_img2img.py (__call__, encode_prompt,
 * prepare_latents, get_timesteps, rescale_noise_cfg,
 * get_guidance_scale_embedding) so that one seed gives one picture. */
#include <diffuse/sd.h>
#include "pipelines-private.h"
#include <diffuse/unet.h>
#include <diffuse/vae.h>
#include <diffuse/clip_text.h>
#include <diffuse/clip_tokenizer.h>
#include <diffuse/scheduler.h>
#include <diffuse/rng.h>
#include <diffuse/error.h>
#include "diffuse-config.h"
#if DIFFUSE_HAVE_CUDA
#include "diffuse-cuda.h"
#endif
#include <math.h>
#include <string.h>

struct _DiffuseSD {
  gint ref_count;
  DiffuseSDTask task;
  DiffusePipelineModel *pm;
  DiffuseUNet *unet;              /* borrowed from the component (shared) */
  DiffuseVae *vae;
  DiffuseClipText *text_encoder;
  DiffuseClipTokenizer *tokenizer;
  DiffuseSafetyChecker *safety_checker;          /* NULL: none */
  /* LoRA (diffuse_sd_load_lora_weights): unet / text_encoder above are then
   * models of their own, built with the active adapters merged in */
  DiffuseUNet *base_unet;                        /* the component's (borrowed) */
  DiffuseClipText *base_text_encoder;
  DiffuseUNet *lora_unet;                        /* owned, or NULL */
  DiffuseClipText *lora_text_encoder;
  DiffuseClipText *base_text_encoder_2;          /* SDXL: the component's (borrowed) */
  DiffuseClipText *lora_text_encoder_2;          /* owned, or NULL */
  DiffuseLoraSet lora;
  DiffuseIpAdapter *ip_adapter;                  /* NULL: none */
  DiffuseClipImageProcessor *feature_extractor;  /* with the checker */
  DiffuseConfig *scheduler_config;
  char *scheduler_class;
  /* Stable Diffusion XL: a second text encoder (with projection) and
   * tokenizer, pooled text embeddings and time ids for the UNet */
  gboolean xl;
  DiffuseClipText *text_encoder_2;               /* borrowed */
  DiffuseClipTokenizer *tokenizer_2;
  gboolean force_zeros;                          /* force_zeros_for_empty_prompt */
  gboolean aesthetics;                           /* requires_aesthetics_score (the refiner) */
  DiffuseVae *vae_f32;                           /* force_upcast: the VAE in f32 for a 16-bit pipeline, or NULL */
  GMutex lock;                    /* one generate() at a time */
};

static gboolean sd_lora_apply (gpointer owner, DiffuseLoraAdapter *const *ads, const double *ws, int n,
                               GError **error);

/* ---- images ------------------------------------------------------------- */

void
diffuse_image_free (DiffuseImage *img)
{
  if (!img)
    return;
  g_free (img->pixels);
  g_free (img);
}

void
diffuse_image_to_rgb8 (const DiffuseImage *img, guint8 *dst, int stride)
{
  for (int y = 0; y < img->height; y++) {
    const float *s = img->pixels + (size_t) y * img->width * 3;
    guint8 *d = dst + (size_t) y * stride;
    for (int i = 0; i < img->width * 3; i++) {
      /* numpy_to_pil: (images * 255).round().astype("uint8") on [0, 1] values */
      float v = s[i] * 255.0f;
      v = nearbyintf (v);
      d[i] = (guint8) CLAMP (v, 0.0f, 255.0f);
    }
  }
}

DiffuseImage *
diffuse_image_from_rgb8 (const guint8 *src, int width, int height, int stride)
{
  DiffuseImage *img = g_new0 (DiffuseImage, 1);
  img->width = width;
  img->height = height;
  img->pixels = g_new (float, (size_t) width * height * 3);
  for (int y = 0; y < height; y++)
    for (int i = 0; i < width * 3; i++)
      img->pixels[(size_t) y * width * 3 + i] = src[(size_t) y * stride + i] / 255.0f;
  return img;
}

/* ---- construction ------------------------------------------------------- */

void
diffuse_sd_default_params (DiffuseSDParams *p)
{
  memset (p, 0, sizeof *p);
  p->num_inference_steps = 50;
  p->guidance_scale = 7.5f;
  p->num_images = 1;
  p->strength = 0.8f;
  p->lora_scale = 1.0f;
  p->aesthetic_score = 6.0f;
  p->negative_aesthetic_score = 2.5f;
}

static gpointer
build_vae_f32 (DiffuseComponent *c, gpointer user_data, GError **error)
{
  return diffuse_vae_new (diffuse_component_config (c), diffuse_component_weights (c), diffuse_component_device (c),
                          DIFFUSE_DTYPE_F32, error);
}

/* A Stable Diffusion XL pipeline (text_encoder_2 in the model): its second
 * encoder and tokenizer, force_zeros_for_empty_prompt, and, as diffusers'
 * needs_upcasting, an f32 VAE when the VAE is 16-bit with force_upcast. */
static gboolean
sd_setup_xl (DiffuseSD *sd, GError **error)
{
  DiffuseConfig *index = diffuse_pipeline_model_index (sd->pm);
  const char *cls = diffuse_pipeline_model_class (sd->pm);
  sd->xl = diffuse_pipeline_model_get (sd->pm, "text_encoder_2") != NULL || g_str_has_prefix (cls, "StableDiffusionXL");
  if (!sd->xl)
    return TRUE;
  /* the refiner's time ids end with an aesthetic score; diffusers runs it
   * as StableDiffusionXLImg2ImgPipeline (its text2img class has no such ids) */
  sd->aesthetics = diffuse_config_get_bool (index, "requires_aesthetics_score", FALSE);
  if (sd->aesthetics && sd->task != DIFFUSE_SD_IMG2IMG) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: an SDXL refiner (requires_aesthetics_score) runs as image-to-image "
                 "(StableDiffusionXLImg2ImgPipeline), not text-to-image", diffuse_pipeline_model_folder (sd->pm));
    return FALSE;
  }
  sd->text_encoder_2 = _diffuse_pipeline_text_encoder_2 (sd->pm, error);
  if (sd->text_encoder_2)
    sd->tokenizer_2 = _diffuse_pipeline_tokenizer_2 (sd->pm, error);
  if (!sd->tokenizer_2)
    return FALSE;
  if (diffuse_clip_text_projection_dim (sd->text_encoder_2) <= 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: text_encoder_2 has no text projection (a CLIPTextModelWithProjection is needed for the pooled "
                 "text embeddings)", diffuse_pipeline_model_folder (sd->pm));
    return FALSE;
  }
  sd->base_text_encoder_2 = sd->text_encoder_2;
  sd->force_zeros = diffuse_config_get_bool (index, "force_zeros_for_empty_prompt", TRUE);
  DiffuseComponent *vc = diffuse_pipeline_model_get (sd->pm, "vae");
  if (diffuse_vae_dtype (sd->vae) != DIFFUSE_DTYPE_F32 &&
      diffuse_config_get_bool (diffuse_component_config (vc), "force_upcast", TRUE)) {
    sd->vae_f32 = diffuse_component_get_object (vc, "model-f32", build_vae_f32, NULL,
                                                (GDestroyNotify) diffuse_vae_unref, error);
    if (!sd->vae_f32)
      return FALSE;
  }
  return TRUE;
}

DiffuseSD *
diffuse_sd_new (DiffusePipelineModel *pm, DiffuseSDTask task, GError **error)
{
  DiffuseSD *sd = g_new0 (DiffuseSD, 1);
  sd->ref_count = 1;
  sd->task = task;
  sd->pm = diffuse_pipeline_model_ref (pm);
  g_mutex_init (&sd->lock);
  sd->unet = _diffuse_pipeline_unet (pm, error);
  if (sd->unet)
    sd->vae = _diffuse_pipeline_vae (pm, error);
  /* an SDXL refiner has text_encoder_2 alone */
  const gboolean te2_only = diffuse_pipeline_model_get (pm, "text_encoder_2") &&
                            !diffuse_pipeline_model_get (pm, "text_encoder");
  if (sd->vae && !te2_only)
    sd->text_encoder = _diffuse_pipeline_text_encoder (pm, error);
  if (sd->text_encoder)
    sd->tokenizer = _diffuse_pipeline_tokenizer (pm, error);
  if (!sd->vae || (!te2_only && !sd->tokenizer)) {
    diffuse_sd_unref (sd);
    return NULL;
  }
  if (!sd_setup_xl (sd, error)) {
    diffuse_sd_unref (sd);
    return NULL;
  }
  sd->base_unet = sd->unet;
  sd->base_text_encoder = sd->text_encoder;
  _diffuse_lora_set_init (&sd->lora, sd_lora_apply, sd);
  DiffuseComponent *sched = diffuse_pipeline_model_get (pm, "scheduler");
  if (!sched) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "%s: the pipeline has no scheduler",
                 diffuse_pipeline_model_folder (pm));
    diffuse_sd_unref (sd);
    return NULL;
  }
  sd->scheduler_config = diffuse_config_ref (diffuse_component_config (sched));
  /* model_index.json's class wins over the config's own _class_name (diffusers) */
  sd->scheduler_class = g_strdup (diffuse_component_class (sched));
  if (!diffuse_scheduler_class_supported (sd->scheduler_class)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: scheduler %s is not implemented",
                 diffuse_pipeline_model_folder (pm), sd->scheduler_class);
    diffuse_sd_unref (sd);
    return NULL;
  }
  if (diffuse_pipeline_model_get (pm, "safety_checker")) {
    if (!diffuse_pipeline_model_get (pm, "feature_extractor")) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                   "%s: the pipeline has a safety checker but no feature extractor; make sure to define a "
                   "feature_extractor if you want to use the safety checker, or load it with safety_checker = none",
                   diffuse_pipeline_model_folder (pm));
      diffuse_sd_unref (sd);
      return NULL;
    }
    sd->safety_checker = _diffuse_pipeline_safety_checker (pm, error);
    if (sd->safety_checker)
      sd->feature_extractor = _diffuse_pipeline_feature_extractor (pm, error);
    if (!sd->feature_extractor) {
      diffuse_sd_unref (sd);
      return NULL;
    }
  }
  return sd;
}

gboolean
diffuse_sd_has_safety_checker (DiffuseSD *sd)
{
  return sd->safety_checker != NULL;
}

/* ---- LoRA ---------------------------------------------------------------- */

/* DiffuseLoraApplyFunc: the UNet and text encoder rebuilt with the adapters
 * merged (lock held) */
static gboolean
sd_lora_apply (gpointer owner, DiffuseLoraAdapter *const *ads, const double *ws, int n, GError **error)
{
  DiffuseSD *sd = owner;
  DiffuseUNet *unet = NULL;
  DiffuseClipText *te = NULL, *te2 = NULL;
  gboolean want[DIFFUSE_LORA_N_TARGETS] = { FALSE, FALSE, FALSE };
  for (int i = 0; i < n; i++)
    for (int t = 0; t < DIFFUSE_LORA_N_TARGETS; t++)
      want[t] = want[t] || _diffuse_lora_adapter_has (ads[i], (DiffuseLoraTarget) t);
  if (want[DIFFUSE_LORA_UNET]) {
    unet = _diffuse_pipeline_unet_with_lora (sd->pm, ads, ws, n, DIFFUSE_LORA_ALL, error);
    if (!unet)
      return FALSE;
  }
  if (want[DIFFUSE_LORA_TEXT_ENCODER]) {
    te = _diffuse_pipeline_text_encoder_with_lora (sd->pm, DIFFUSE_LORA_TEXT_ENCODER, ads, ws, n, error);
    if (!te) {
      g_clear_pointer (&unet, diffuse_unet_unref);
      return FALSE;
    }
  }
  /* SDXL's second text encoder (peft "text_encoder_2.", kohya "lora_te2_") */
  if (want[DIFFUSE_LORA_TEXT_ENCODER_2]) {
    te2 = _diffuse_pipeline_text_encoder_with_lora (sd->pm, DIFFUSE_LORA_TEXT_ENCODER_2, ads, ws, n, error);
    if (!te2) {
      g_clear_pointer (&unet, diffuse_unet_unref);
      g_clear_pointer (&te, diffuse_clip_text_unref);
      return FALSE;
    }
  }
  g_clear_pointer (&sd->lora_unet, diffuse_unet_unref);
  g_clear_pointer (&sd->lora_text_encoder, diffuse_clip_text_unref);
  g_clear_pointer (&sd->lora_text_encoder_2, diffuse_clip_text_unref);
  sd->lora_unet = unet;
  sd->lora_text_encoder = te;
  sd->lora_text_encoder_2 = te2;
  sd->unet = unet ? unet : sd->base_unet;
  sd->text_encoder = te ? te : sd->base_text_encoder;
  if (sd->xl)
    sd->text_encoder_2 = te2 ? te2 : sd->base_text_encoder_2;
  return TRUE;
}

gboolean
diffuse_sd_load_ip_adapter (DiffuseSD *sd, const char *ref, const char *subfolder, const char *weight_name,
                            GError **error)
{
  g_return_val_if_fail (sd != NULL && ref != NULL && weight_name != NULL, FALSE);
  g_mutex_lock (&sd->lock);
  DiffuseIpAdapter *ip = _diffuse_ip_adapter_load (sd->pm, ref, subfolder, weight_name,
                                                   diffuse_unet_device (sd->unet), diffuse_unet_dtype (sd->unet),
                                                   error);
  if (ip) {
    g_clear_pointer (&sd->ip_adapter, _diffuse_ip_adapter_free);
    sd->ip_adapter = ip;
  }
  g_mutex_unlock (&sd->lock);
  return ip != NULL;
}

void
diffuse_sd_set_ip_adapter_scale (DiffuseSD *sd, float scale)
{
  g_mutex_lock (&sd->lock);
  if (sd->ip_adapter)
    _diffuse_ip_adapter_set_scale (sd->ip_adapter, scale);
  g_mutex_unlock (&sd->lock);
}

void
diffuse_sd_unload_ip_adapter (DiffuseSD *sd)
{
  g_mutex_lock (&sd->lock);
  g_clear_pointer (&sd->ip_adapter, _diffuse_ip_adapter_free);
  g_mutex_unlock (&sd->lock);
}

gboolean
diffuse_sd_has_ip_adapter (DiffuseSD *sd)
{
  return sd->ip_adapter != NULL;
}

gboolean
diffuse_sd_load_lora_weights (DiffuseSD *sd, const char *path, const char *adapter_name, GError **error)
{
  g_return_val_if_fail (sd != NULL && path != NULL, FALSE);
  g_mutex_lock (&sd->lock);
  gboolean ok = _diffuse_lora_set_load (&sd->lora, path, adapter_name, error);
  g_mutex_unlock (&sd->lock);
  return ok;
}

gboolean
diffuse_sd_set_adapters (DiffuseSD *sd, const char *const *names, const double *weights, int n, GError **error)
{
  g_return_val_if_fail (sd != NULL && (n == 0 || names != NULL), FALSE);
  g_mutex_lock (&sd->lock);
  gboolean ok = _diffuse_lora_set_activate (&sd->lora, names, weights, n, error);
  g_mutex_unlock (&sd->lock);
  return ok;
}

void
diffuse_sd_unload_lora_weights (DiffuseSD *sd)
{
  g_return_if_fail (sd != NULL);
  g_mutex_lock (&sd->lock);
  _diffuse_lora_set_unload (&sd->lora);
  g_mutex_unlock (&sd->lock);
}

gboolean
diffuse_sd_load_lora_spec (DiffuseSD *sd, const char *spec, GError **error)
{
  g_return_val_if_fail (sd != NULL && spec != NULL, FALSE);
  g_mutex_lock (&sd->lock);
  gboolean ok = _diffuse_lora_set_load_spec (&sd->lora, spec, error);
  g_mutex_unlock (&sd->lock);
  return ok;
}

char **
diffuse_sd_get_active_adapters (DiffuseSD *sd)
{
  g_mutex_lock (&sd->lock);
  char **v = _diffuse_lora_set_names (&sd->lora, TRUE);
  g_mutex_unlock (&sd->lock);
  return v;
}

char **
diffuse_sd_list_adapters (DiffuseSD *sd)
{
  g_mutex_lock (&sd->lock);
  char **v = _diffuse_lora_set_names (&sd->lora, FALSE);
  g_mutex_unlock (&sd->lock);
  return v;
}

/* diffusers' run_safety_checker: the images as 8-bit RGB (numpy_to_pil)
 * through the feature extractor, the checker; flagged images become black. */
static gboolean
run_safety_checker (DiffuseSD *sd, GPtrArray *images, GError **error)
{
  const int n = (int) images->len;
  guint8 **rgb = g_new0 (guint8 *, n);
  int *w = g_new (int, n), *h = g_new (int, n);
  gboolean *flags = g_new0 (gboolean, n);
  for (int i = 0; i < n; i++) {
    const DiffuseImage *img = g_ptr_array_index (images, i);
    w[i] = img->width;
    h[i] = img->height;
    rgb[i] = g_new (guint8, (size_t) img->width * img->height * 3);
    diffuse_image_to_rgb8 (img, rgb[i], img->width * 3);
  }
  DiffuseTensor *pv = diffuse_clip_image_processor_preprocess (sd->feature_extractor, (const guint8 *const *) rgb, w,
                                                               h, NULL, n, error);
  gboolean ok = pv && diffuse_safety_checker_check (sd->safety_checker, pv, flags, NULL, error);
  gboolean any = FALSE;
  for (int i = 0; ok && i < n; i++) {
    DiffuseImage *img = g_ptr_array_index (images, i);
    img->nsfw = flags[i];
    if (flags[i]) {
      memset (img->pixels, 0, sizeof (float) * (size_t) img->width * img->height * 3);
      any = TRUE;
    }
  }
  if (any)
    g_warning ("Potential NSFW content was detected in one or more images. A black image will be returned instead. "
               "Try again with a different prompt and/or seed.");
  diffuse_tensor_clear (&pv);
  for (int i = 0; i < n; i++)
    g_free (rgb[i]);
  g_free (rgb);
  g_free (w);
  g_free (h);
  g_free (flags);
  return ok;
}

DiffuseSD *
diffuse_sd_ref (DiffuseSD *sd)
{
  g_atomic_int_inc (&sd->ref_count);
  return sd;
}

void
diffuse_sd_unref (DiffuseSD *sd)
{
  if (!sd || !g_atomic_int_dec_and_test (&sd->ref_count))
    return;
  g_clear_pointer (&sd->scheduler_config, diffuse_config_unref);
  g_free (sd->scheduler_class);
  g_clear_pointer (&sd->lora_unet, diffuse_unet_unref);
  g_clear_pointer (&sd->lora_text_encoder, diffuse_clip_text_unref);
  g_clear_pointer (&sd->lora_text_encoder_2, diffuse_clip_text_unref);
  if (sd->lora.adapters)
    _diffuse_lora_set_clear (&sd->lora);
  g_clear_pointer (&sd->ip_adapter, _diffuse_ip_adapter_free);
  diffuse_pipeline_model_unref (sd->pm);
  g_mutex_clear (&sd->lock);
  g_free (sd);
}

DiffusePipelineModel *diffuse_sd_get_model (DiffuseSD *sd) { return sd->pm; }
DiffuseSDTask diffuse_sd_get_task (DiffuseSD *sd) { return sd->task; }
const char *diffuse_sd_scheduler_class (DiffuseSD *sd) { return sd->scheduler_class; }

const char *const *
diffuse_sd_compatible_schedulers (DiffuseSD *sd)
{
  return diffuse_scheduler_compatibles (sd->scheduler_class);
}

void
diffuse_sd_default_size (DiffuseSD *sd, int *width, int *height)
{
  int s = diffuse_unet_sample_size (sd->unet) * diffuse_vae_scale_factor (sd->vae);
  if (width)
    *width = s;
  if (height)
    *height = s;
}

/* ---- prompt encoding ------------------------------------------------------ */


static gboolean op_error (GError **error, const char *what);

/* SDXL's encode_prompt for one text: each encoder's hidden_states[-(skip + 2)]
 * (no final layer norm) over the 77 padded tokens (each tokenizer's own pad
 * token), concatenated along features, in the second encoder's dtype; and
 * the second encoder's projected pooled output [1, P].  A refiner has the
 * second encoder alone. */
static gboolean
encode_xl (DiffuseSD *sd, const char *text, int skip, DiffuseTensor **embeds, DiffuseTensor **pooled, GError **error)
{
  DiffuseTensor *h[2] = { NULL, NULL };
  gboolean ok = TRUE;
  for (int k = sd->text_encoder ? 0 : 1; ok && k < 2; k++) {
    DiffuseClipTokenizer *tok = k ? sd->tokenizer_2 : sd->tokenizer;
    DiffuseClipText *te = k ? sd->text_encoder_2 : sd->text_encoder;
    const int max = diffuse_clip_tokenizer_model_max_length (tok);
    int32_t *ids = g_new0 (int32_t, max);
    const int n = diffuse_clip_tokenizer_encode (tok, text ? text : "", TRUE, ids, max, error);
    DiffuseClipTextParams cp;
    diffuse_clip_text_default_params (&cp);
    cp.output_hidden_states = TRUE;
    DiffuseClipTextOutput out = { 0 };
    ok = n > 0 && diffuse_clip_text_forward (te, ids, 1, n, &cp, &out, error);
    g_free (ids);
    if (ok && out.n_hidden_states < skip + 2) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                   "clip_skip %d needs %d hidden states, text encoder %d has %d", skip, skip + 2, k + 1,
                   out.n_hidden_states);
      ok = FALSE;
    }
    if (ok) {
      h[k] = diffuse_tensor_ref (out.hidden_states[out.n_hidden_states - (skip + 2)]);
      if (k == 1)
        *pooled = diffuse_tensor_ref (out.text_embeds);
    }
    diffuse_clip_text_output_clear (&out);
  }
  if (ok) {
    const DiffuseDType dt = diffuse_clip_text_dtype (sd->text_encoder_2);
    ok = (!h[0] || _diffuse_pipeline_place (&h[0], diffuse_clip_text_device (sd->text_encoder_2), dt)) &&
         _diffuse_pipeline_place (&h[1], diffuse_clip_text_device (sd->text_encoder_2), dt);
    *embeds = !ok ? NULL : h[0] ? diffuse_concat (h, 2, 2) : diffuse_tensor_ref (h[1]);
    ok = *embeds != NULL;
    if (!ok)
      op_error (error, "SDXL prompt embedding");
  }
  diffuse_tensor_clear (&h[0]);
  diffuse_tensor_clear (&h[1]);
  if (!ok)
    diffuse_tensor_clear (pooled);
  return ok;
}

/* Repeats [1, L, D] (or [k, L, D] with k == n) to [n, L, D]. */
static DiffuseTensor *
repeat_batch (DiffuseTensor *e, int n)
{
  if (e->shape[0] == n)
    return diffuse_tensor_ref (e);
  DiffuseTensor **v = g_new (DiffuseTensor *, n);
  for (int i = 0; i < n; i++)
    v[i] = e;
  DiffuseTensor *r = diffuse_concat (v, n, 0);
  g_free (v);
  return r;
}

/* diffusers' get_guidance_scale_embedding (LCM): [n, dim]. */
static DiffuseTensor *
guidance_embedding (float w, int n, int dim)
{
  int64_t shape[2] = { n, dim };
  DiffuseTensor *t = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 2, shape);
  float *p = diffuse_tensor_f32 (t);
  int half = dim / 2;
  float ww = w * 1000.0f;
  float base = logf (10000.0f) / (float) (half - 1);
  for (int i = 0; i < half; i++) {
    float f = expf ((float) i * -base);
    float a = ww * f;
    for (int b = 0; b < n; b++) {
      p[b * dim + i] = sinf (a);
      p[b * dim + half + i] = cosf (a);
    }
  }
  return t;
}

/* rescale_noise_cfg (Common Diffusion Noise Schedules, Sec. 3.4), per sample. */
static void
rescale_cfg (float *cfg, const float *text, int n, size_t per, float phi)
{
  for (int b = 0; b < n; b++) {
    const float *t = text + b * per;
    float *c = cfg + b * per;
    double mt = 0, mc = 0;
    for (size_t i = 0; i < per; i++) {
      mt += t[i];
      mc += c[i];
    }
    mt /= per;
    mc /= per;
    double vt = 0, vc = 0;
    for (size_t i = 0; i < per; i++) {
      vt += (t[i] - mt) * (t[i] - mt);
      vc += (c[i] - mc) * (c[i] - mc);
    }
    float st = (float) sqrt (vt / (per - 1)), sc = (float) sqrt (vc / (per - 1));
    float ratio = st / sc;
    for (size_t i = 0; i < per; i++) {
      float rescaled = c[i] * ratio;
      c[i] = phi * rescaled + (1.0f - phi) * c[i];
    }
  }
}

/* ---- generation ----------------------------------------------------------- */

static gboolean
cancelled (const DiffuseSDParams *p, GError **error)
{
  if (p->cancellable && g_cancellable_is_cancelled (p->cancellable)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "Generation was cancelled");
    return TRUE;
  }
  return FALSE;
}

static gboolean
op_error (GError **error, const char *what)
{
  if (!diffuse_tensor_take_error (error))
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s failed", what);
  return FALSE;
}

/* The UNet call of a denoising step.  On a CUDA device with
 * DIFFUSE_CUDA_GRAPH=1 the step's inputs are copied into fixed device
 * tensors; the first call runs eagerly (it warms the pool and cuBLAS), the
 * second is captured as a CUDA graph and replayed, and every later call only
 * replays it: one launch instead of a thousand (cuda/diffuse-cuda.h).  A
 * capture that fails is reported once and the loop goes on eagerly.  On by
 * default (UNet step 36.1 -> 34.8 ms on an H200, docs/benchmarks.md);
 * DIFFUSE_CUDA_GRAPH=0 turns it off. */
typedef struct {
  DiffuseUNet *unet;
  DiffuseTensor *ehs, *tcond;   /* borrowed: alive until unet_step_clear */
  int batch;
  DiffuseIpAdapter *ip;         /* IP-Adapter and its image tokens (borrowed), or NULL */
  DiffuseTensor *ip_tokens;
  DiffuseTensor *sag_probs;     /* SAG: the mid block's self-attention probabilities of the last call */
  int sag_map_hw[2];
  gboolean sag;
  gboolean use_graph;
  int calls;
  DiffuseTensor *x_in, *t_in;   /* the fixed inputs */
  DiffuseTensor *out;           /* the captured forward's output */
  DiffuseTensor *text_embeds, *time_ids;   /* SDXL's added conditions (borrowed), or NULL */
#if DIFFUSE_HAVE_CUDA
  DiffuseCudaGraph *graph;
#endif
} UNetStep;

static void
unet_step_init (UNetStep *s, DiffuseUNet *unet, DiffuseTensor *ehs, DiffuseTensor *tcond, int batch, gboolean sag)
{
  memset (s, 0, sizeof *s);
  s->unet = unet;
  s->ehs = ehs;
  s->tcond = tcond;
  s->batch = batch;
  s->sag = sag;
#if DIFFUSE_HAVE_CUDA
  /* (SAG reads the attention probabilities on the host each step: eager) */
  const char *e = g_getenv ("DIFFUSE_CUDA_GRAPH");
  s->use_graph = !sag && diffuse_device_is_cuda (diffuse_unet_device (unet)) && !(e && g_str_equal (e, "0"));
#endif
}

static void
unet_step_clear (UNetStep *s)
{
#if DIFFUSE_HAVE_CUDA
  g_clear_pointer (&s->graph, diffuse_cuda_graph_free);
#endif
  diffuse_tensor_clear (&s->out);
  diffuse_tensor_clear (&s->x_in);
  diffuse_tensor_clear (&s->t_in);
  diffuse_tensor_clear (&s->sag_probs);
}

/* x: [batch, C, h, w] in the UNet's dtype on its device */
static DiffuseTensor *
unet_step_run (UNetStep *s, DiffuseTensor *x, double t, GError **error)
{
  DiffuseUNetForwardArgs args = { 0 };
  args.timestep_cond = s->tcond;
  if (s->sag) {
    args.mid_self_attn_probs = &s->sag_probs;
    args.mid_map_hw = s->sag_map_hw;
  }
  if (s->ip)
    _diffuse_ip_adapter_args (s->ip, s->ip_tokens, &args);
  args.text_embeds = s->text_embeds;
  args.time_ids = s->time_ids;
  float *tv = g_new (float, s->batch);
  for (int b = 0; b < s->batch; b++)
    tv[b] = (float) t;
  if (!s->use_graph) {
    DiffuseTensor *out = diffuse_unet_forward (s->unet, x, tv, s->batch, s->ehs, &args, error);
    g_free (tv);
    return out;
  }
  DiffuseDevice *dev = diffuse_unet_device (s->unet);
  DiffuseTensor *th = diffuse_tensor_from_f32 (tv, 1, (int64_t[]) { s->batch });
  g_free (tv);
  if (!s->x_in) {
    s->x_in = diffuse_tensor_new (dev, x->dtype, x->ndim, x->shape);
    s->t_in = diffuse_tensor_new (dev, DIFFUSE_DTYPE_F32, 1, (int64_t[]) { s->batch });
  }
  gboolean ok = th && s->x_in && s->t_in && diffuse_copy_into (s->x_in, x) && diffuse_copy_into (s->t_in, th);
  diffuse_tensor_clear (&th);
  if (!ok) {
    op_error (error, "UNet inputs");
    return NULL;
  }
#if DIFFUSE_HAVE_CUDA
  if (s->graph) {
    if (!diffuse_cuda_graph_replay (s->graph, error))
      return NULL;
    return diffuse_tensor_ref (s->out);
  }
  if (s->calls++ == 1) {
    GError *err = NULL;
    DiffuseTensor *o = NULL;
    DiffuseCudaGraph *g = NULL;
    if (diffuse_cuda_graph_begin (dev, &err)) {
      o = diffuse_unet_forward_t (s->unet, s->x_in, s->t_in, s->ehs, &args, &err);
      g = diffuse_cuda_graph_end (dev, err ? NULL : &err);   /* ends the capture in any case */
    }
    if (g && o) {
      s->graph = g;
      s->out = o;
      if (!diffuse_cuda_graph_replay (s->graph, error))
        return NULL;
      return diffuse_tensor_ref (s->out);
    }
    g_message ("%s: the UNet step could not be captured as a CUDA graph (%s); running it eagerly",
               diffuse_device_name (dev), err ? err->message : "unknown reason");
    g_clear_error (&err);
    g_clear_pointer (&g, diffuse_cuda_graph_free);
    diffuse_tensor_clear (&o);
    s->use_graph = FALSE;
  }
#endif
  return diffuse_unet_forward_t (s->unet, s->x_in, s->t_in, s->ehs, &args, error);
}

/* ---- self-attention guidance (diffusers' StableDiffusionSAGPipeline) ----- */

/* gaussian_blur_2d (img, kernel_size=9, sigma=1.0) of each [h, w] plane:
 * reflect padding, the 9x9 kernel the outer product of the normalized 1-D one */
static void
sag_blur (const float *in, float *out, int planes, int h, int w)
{
  float k1[9], sum = 0.0f;
  for (int i = 0; i < 9; i++) {
    const float x = (float) (i - 4);
    k1[i] = expf (-0.5f * x * x);
    sum += k1[i];
  }
  for (int i = 0; i < 9; i++)
    k1[i] /= sum;
  for (int pl = 0; pl < planes; pl++) {
    const float *src = in + (size_t) pl * h * w;
    float *dst = out + (size_t) pl * h * w;
    for (int y = 0; y < h; y++)
      for (int x = 0; x < w; x++) {
        float acc = 0.0f;
        for (int dy = 0; dy < 9; dy++) {
          int sy = y + dy - 4;
          sy = sy < 0 ? -sy : (sy >= h ? 2 * h - 2 - sy : sy);
          for (int dx = 0; dx < 9; dx++) {
            int sx = x + dx - 4;
            sx = sx < 0 ? -sx : (sx >= w ? 2 * w - 2 - sx : sx);
            acc += (k1[dy] * k1[dx]) * src[(size_t) sy * w + sx];
          }
        }
        dst[(size_t) y * w + x] = acc;
      }
  }
}

/* One step's guidance, added to eps (the CFG-combined prediction):
 *   x0 = pred_x0 (latents, uncond prediction); mask = where the mid block's
 *   self-attention (unconditional half, mean over heads, summed over queries)
 *   is above 1, nearest-upsampled to the latent size; degraded = blur (x0)
 *   in the mask, x0 elsewhere, noised back to t with pred_epsilon; a UNet
 *   pass of it on the unconditional embeddings (and, with an IP-Adapter,
 *   the unconditional image tokens; without CFG the prompt's and the
 *   image's, as diffusers' added_uncond_kwargs / added_cond_kwargs);
 *   eps += sag_scale * (uncond prediction - that pass). */
static gboolean
sag_guidance (DiffuseSD *sd, DiffuseScheduler *sched, const DiffuseSDParams *p, gboolean cfg, int n, int C, int h,
              int w, const float *lat, const float *op, DiffuseTensor *probs, const int *map_hw,
              DiffuseTensor *embeds, const UNetStep *step, double t, float *eps, GError **error)
{
  const size_t per = (size_t) C * h * w, total = per * n;
  if (!probs) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "self-attention guidance: no attention map");
    return FALSE;
  }
  if (h < 5 || w < 5) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "self-attention guidance blurs the latents with a 9x9 kernel: they must be at least 5x5 (got %dx%d)",
                 w, h);
    return FALSE;
  }
  float a;
  if (!diffuse_scheduler_alpha_cumprod (sched, t, &a, error))
    return FALSE;
  const char *pt = diffuse_scheduler_prediction_type (sched);
  const float b = 1.0f - a, sa = sqrtf (a), sb = sqrtf (b);
  const float *mo = op;   /* the unconditional half with CFG, else the prediction itself */
  float *x0 = g_new (float, total), *pe = g_new (float, total), *deg = g_new (float, total);
  for (size_t i = 0; i < total; i++) {
    if (g_str_equal (pt, "v_prediction")) {
      x0[i] = sa * lat[i] - sb * mo[i];
      pe[i] = sb * lat[i] + sa * mo[i];
    } else if (g_str_equal (pt, "sample")) {
      x0[i] = mo[i];
      pe[i] = (lat[i] - sa * mo[i]) / sb;
    } else {
      x0[i] = (lat[i] - sb * mo[i]) / sa;
      pe[i] = mo[i];
    }
  }
  /* the mask from the (unconditional) attention map */
  DiffuseTensor *hp = diffuse_to_host_f32 (probs);
  gboolean ok = hp != NULL;
  const int L = map_hw[0] * map_hw[1];
  const int64_t rows = hp ? hp->shape[0] : 0;
  const int batch = cfg ? 2 * n : n;
  const int H = rows % batch == 0 ? (int) (rows / batch) : 0;
  if (ok && (H < 1 || hp->shape[1] != L || hp->shape[2] != L)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "self-attention guidance: unexpected attention map");
    ok = FALSE;
  }
  float *mask = ok ? g_new0 (float, (size_t) n * h * w) : NULL;
  for (int img = 0; ok && img < n; img++) {
    const float *P = diffuse_tensor_f32 (hp) + (size_t) img * H * L * L;
    uint8_t *m = g_new0 (uint8_t, L);
    for (int j = 0; j < L; j++) {
      float s = 0.0f;
      for (int i = 0; i < L; i++) {
        float hs = 0.0f;
        for (int hh = 0; hh < H; hh++)
          hs += P[((size_t) hh * L + i) * L + j];
        s += hs / (float) H;
      }
      m[j] = s > 1.0f;
    }
    /* F.interpolate (mode="nearest") to the latent size */
    const float fy = (float) map_hw[0] / (float) h, fx = (float) map_hw[1] / (float) w;
    for (int y = 0; y < h; y++)
      for (int x = 0; x < w; x++) {
        int sy = MIN ((int) floorf (y * fy), map_hw[0] - 1), sx = MIN ((int) floorf (x * fx), map_hw[1] - 1);
        mask[((size_t) img * h + y) * w + x] = m[sy * map_hw[1] + sx];
      }
    g_free (m);
  }
  diffuse_tensor_clear (&hp);
  if (ok) {
    sag_blur (x0, deg, n * C, h, w);
    for (int img = 0; img < n; img++)
      for (int c = 0; c < C; c++)
        for (size_t i = 0; i < (size_t) h * w; i++) {
          const size_t k = ((size_t) img * C + c) * h * w + i;
          const float mk = mask[(size_t) img * h * w + i];
          deg[k] = deg[k] * mk + x0[k] * (1.0f - mk);
        }
    ok = diffuse_scheduler_add_noise (sched, deg, pe, deg, total, t, error);
  }
  g_free (mask);
  /* the UNet on the degraded latents, with the unconditional embeddings under CFG */
  DiffuseTensor *ho = NULL;
  if (ok) {
    int64_t shape[4] = { n, C, h, w };
    DiffuseTensor *xh = diffuse_tensor_from_f32 (deg, 4, shape);
    DiffuseTensor *xd = xh ? diffuse_to_device (xh, diffuse_unet_device (sd->unet)) : NULL;
    diffuse_tensor_clear (&xh);
    DiffuseTensor *x = xd ? diffuse_cast (xd, diffuse_unet_dtype (sd->unet)) : NULL;
    diffuse_tensor_clear (&xd);
    DiffuseTensor *e = cfg ? diffuse_narrow (embeds, 0, 0, n) : diffuse_tensor_ref (embeds);
    DiffuseTensor *it = NULL;
    DiffuseUNetForwardArgs args = { 0 };
    if (step->ip) {
      it = cfg ? diffuse_narrow (step->ip_tokens, 0, 0, n) : diffuse_tensor_ref (step->ip_tokens);
      _diffuse_ip_adapter_args (step->ip, it, &args);
    }
    float *tv = g_new (float, n);
    for (int i = 0; i < n; i++)
      tv[i] = (float) t;
    DiffuseTensor *out = x && e && (it || !step->ip) ? diffuse_unet_forward (sd->unet, x, tv, n, e, &args, error)
                                                     : NULL;
    g_free (tv);
    diffuse_tensor_clear (&x);
    diffuse_tensor_clear (&e);
    diffuse_tensor_clear (&it);
    ho = out ? diffuse_to_host_f32 (out) : NULL;
    diffuse_tensor_clear (&out);
    if (!ho) {
      if (error && !*error)
        op_error (error, "self-attention guidance UNet pass");
      ok = FALSE;
    }
  }
  if (ok) {
    const float *dp = diffuse_tensor_f32 (ho);
    for (size_t i = 0; i < total; i++)
      eps[i] += p->sag_scale * (mo[i] - dp[i]);
  }
  diffuse_tensor_clear (&ho);
  g_free (x0);
  g_free (pe);
  g_free (deg);
  return ok;
}

static GPtrArray *generate (DiffuseSD *sd, const DiffuseSDParams *params, DiffuseSDTimings *tm,
                             DiffuseTensor **latents_out, GError **error);

GPtrArray *
diffuse_sd_generate (DiffuseSD *sd, const DiffuseSDParams *params, GError **error)
{
  DiffuseSDTimings t;
  return generate (sd, params, &t, NULL, error);
}

GPtrArray *
diffuse_sd_generate_timed (DiffuseSD *sd, const DiffuseSDParams *params, DiffuseSDTimings *tm, GError **error)
{
  return generate (sd, params, tm, NULL, error);
}

DiffuseTensor *
diffuse_sd_generate_latents (DiffuseSD *sd, const DiffuseSDParams *params, GError **error)
{
  DiffuseSDTimings t;
  DiffuseTensor *latents = NULL;
  GPtrArray *none = generate (sd, params, &t, &latents, error);
  if (none)
    g_ptr_array_unref (none);
  return latents;
}

/* denoising_start / denoising_end: round (T - x * T) as diffusers' int (round ()) */
static double
timestep_cutoff (DiffuseScheduler *sched, float x)
{
  const double T = diffuse_scheduler_num_train_timesteps (sched);
  return nearbyint (T - (double) x * T);
}

/* img2img with denoising_start (diffusers' SDXL get_timesteps): the
 * timesteps below the cutoff, one more for a 2nd-order scheduler when their
 * count is even; strength does not count.  Returns the begin index. */
static guint
begin_at_denoising_start (DiffuseScheduler *sched, float start, guint *n_steps)
{
  guint nt = 0;
  const double *all = diffuse_scheduler_timesteps (sched, &nt);
  const double cutoff = timestep_cutoff (sched, start);
  guint k = 0;
  for (guint i = 0; i < nt; i++)
    k += all[i] < cutoff;
  if (diffuse_scheduler_order (sched) == 2 && k % 2 == 0)
    k++;
  k = MIN (k, nt);
  diffuse_scheduler_set_begin_index (sched, nt - k);
  *n_steps = k;
  return nt - k;
}

/* img2img's init latents from an image: VaeImageProcessor.normalize, the
 * VAE's encode (in f32 for SDXL's force_upcast), latent_dist.sample
 * (generator) — the generator's first draw — times the scaling factor, for
 * each of the n images, rounded to the pipeline's dtype. */
static gboolean
encode_image_latents (DiffuseSD *sd, const DiffuseImage *image, DiffuseRng *rng, DiffuseRngDType rdt, float *lat,
                      int n, size_t per, GError **error)
{
  const int W = image->width, H = image->height;
  DiffuseTensor *img = diffuse_tensor_new (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 4, (int64_t[]) { 1, 3, H, W });
  if (!img)
    return op_error (error, "VAE encode");
  float *ip = diffuse_tensor_f32 (img);
  const size_t plane = (size_t) W * H;
  for (size_t i = 0; i < plane; i++)
    for (int c = 0; c < 3; c++)
      ip[c * plane + i] = 2.0f * image->pixels[i * 3 + c] - 1.0f;
  DiffuseVae *evae = sd->vae_f32 ? sd->vae_f32 : sd->vae;
  DiffuseTensor *dimg = diffuse_to_device (img, diffuse_vae_device (evae));
  DiffuseTensor *dimg2 = dimg ? diffuse_cast (dimg, diffuse_vae_dtype (evae)) : NULL;
  diffuse_tensor_unref (img);
  diffuse_tensor_clear (&dimg);
  DiffuseTensor *mean = NULL, *logvar = NULL;
  DiffuseVaeParams vp;
  diffuse_vae_default_params (&vp);
  gboolean ok = dimg2 && diffuse_vae_encode (evae, dimg2, &vp, &mean, &logvar, error);
  diffuse_tensor_clear (&dimg2);
  if (!ok)
    return error && *error ? FALSE : op_error (error, "VAE encode");
  const size_t nl = (size_t) diffuse_tensor_numel (mean);
  float *noise = g_new (float, nl);
  diffuse_rng_randn_as (rng, _diffuse_pipeline_rng_dtype (diffuse_vae_dtype (evae)), noise, nl);
  DiffuseTensor *z = diffuse_vae_posterior_sample (mean, logvar, noise, error);
  g_free (noise);
  diffuse_tensor_unref (mean);
  diffuse_tensor_unref (logvar);
  DiffuseTensor *zh = z ? diffuse_to_host_f32 (z) : NULL;
  diffuse_tensor_clear (&z);
  if (!zh)
    return error && *error ? FALSE : op_error (error, "VAE encode");
  const float sf = (float) diffuse_vae_scaling_factor (sd->vae);
  const float *zp = diffuse_tensor_f32 (zh);
  for (int b = 0; b < n; b++)
    for (size_t i = 0; i < per; i++)
      lat[b * per + i] = sf * zp[i];
  diffuse_tensor_unref (zh);
  diffuse_rng_round (rdt, lat, (size_t) n * per);
  return TRUE;
}

/* The steps of a generate(): params as given (latents_out NULL: decoded
 * images) or the final latents in *latents_out (and an empty array). */
static GPtrArray *
generate (DiffuseSD *sd, const DiffuseSDParams *params, DiffuseSDTimings *tm, DiffuseTensor **latents_out,
          GError **error)
{
  DiffuseSDParams p = *params;
  memset (tm, 0, sizeof *tm);
  gint64 t_mark = g_get_monotonic_time ();
  GPtrArray *images = NULL;
  DiffuseScheduler *sched = NULL;
  DiffuseRng *rng = NULL;
  DiffuseTensor *embeds = NULL, *cond = NULL, *uncond = NULL, *latents = NULL, *tcond = NULL;
  DiffuseTensor *pooled = NULL, *upooled = NULL, *text_embeds = NULL, *time_ids = NULL;
  float *noise_buf = NULL;
  DiffuseDevice *dev = diffuse_unet_device (sd->unet);

  int def_w, def_h;
  diffuse_sd_default_size (sd, &def_w, &def_h);
  const int vsf = diffuse_vae_scale_factor (sd->vae);
  DiffuseTensor *il = sd->task == DIFFUSE_SD_IMG2IMG ? p.image_latents : NULL;
  if (il && (il->ndim != 4 || il->shape[1] != diffuse_unet_in_channels (sd->unet) ||
             (il->shape[0] != 1 && il->shape[0] != MAX (p.num_images, 1)))) {
    char *d = diffuse_tensor_describe (il);
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "image_latents %s should be [1 or %d, %d, h, w]",
                 d, MAX (p.num_images, 1), diffuse_unet_in_channels (sd->unet));
    g_free (d);
    return NULL;
  }
  if (il) {   /* the size the latents decode to (diffusers: latents.shape[-2:] * vae_scale_factor) */
    p.width = (int) il->shape[3] * vsf;
    p.height = (int) il->shape[2] * vsf;
  }
  if (p.width <= 0)
    p.width = sd->task == DIFFUSE_SD_IMG2IMG && p.image ? p.image->width : def_w;
  if (p.height <= 0)
    p.height = sd->task == DIFFUSE_SD_IMG2IMG && p.image ? p.image->height : def_h;
  if (!(p.denoising_end >= 0.0f && p.denoising_end <= 1.0f) ||
      !(p.denoising_start >= 0.0f && p.denoising_start <= 1.0f)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "denoising_start / denoising_end must be in [0, 1] (got %g, %g)", p.denoising_start,
                 p.denoising_end);
    return NULL;
  }
  const gboolean use_start = sd->task == DIFFUSE_SD_IMG2IMG && p.denoising_start > 0.0f && p.denoising_start < 1.0f;
  const gboolean use_end = p.denoising_end > 0.0f && p.denoising_end < 1.0f;
  if (use_start && use_end && p.denoising_start >= p.denoising_end) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "`denoising_start`: %g cannot be larger than or equal to `denoising_end`: %g", p.denoising_start,
                 p.denoising_end);
    return NULL;
  }
  if (p.width % 8 || p.height % 8 || p.width % vsf || p.height % vsf) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "width and height must be multiples of 8 (got %dx%d)", p.width, p.height);
    return NULL;
  }
  if (p.num_inference_steps < 1 || p.num_images < 1 || p.num_images > 64) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "num_inference_steps must be >= 1 and num_images 1..64 (got %d, %d)", p.num_inference_steps,
                 p.num_images);
    return NULL;
  }
  if (sd->task == DIFFUSE_SD_IMG2IMG) {
    if (!p.image && !il) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "img2img needs an input image");
      return NULL;
    }
    if (!il && (p.image->width != p.width || p.image->height != p.height)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                   "the input image is %dx%d, the output %dx%d: resize it first", p.image->width, p.image->height,
                   p.width, p.height);
      return NULL;
    }
    if (!(p.strength >= 0.0f && p.strength <= 1.0f)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                   "The value of strength should be in [0.0, 1.0] but is %g", p.strength);
      return NULL;
    }
  }
  DiffuseClipText *te_first = sd->text_encoder ? sd->text_encoder : sd->text_encoder_2;
  if (p.clip_skip < 0 || p.clip_skip >= diffuse_clip_text_num_layers (te_first)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "clip_skip must be 0..%d (got %d)",
                 diffuse_clip_text_num_layers (te_first) - 1, p.clip_skip);
    return NULL;
  }

  if (sd->xl && ((p.prompt_embeds && !p.pooled_prompt_embeds) ||
                  (p.negative_prompt_embeds && !p.negative_pooled_prompt_embeds))) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "If `%sprompt_embeds` are provided, `%spooled_prompt_embeds` also have to be passed (Stable "
                 "Diffusion XL)", p.prompt_embeds && !p.pooled_prompt_embeds ? "" : "negative_",
                 p.prompt_embeds && !p.pooled_prompt_embeds ? "" : "negative_");
    return NULL;
  }
  if (sd->xl && p.sag_scale > 0.0f) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "self-attention guidance (StableDiffusionSAGPipeline) is for Stable Diffusion 1.x/2.x, not XL");
    return NULL;
  }

  g_mutex_lock (&sd->lock);
  if (sd->ip_adapter && !p.ip_adapter_image) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "an IP-Adapter is loaded: give an ip_adapter_image (or unload it)");
    goto out;
  }
  if (!sd->ip_adapter && p.ip_adapter_image) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "an ip_adapter_image was given but no IP-Adapter is loaded (diffuse_sd_load_ip_adapter)");
    goto out;
  }
  /* cross_attention_kwargs={"scale": s}: the adapters merged again at that scale */
  if (!_diffuse_lora_set_rescale (&sd->lora, p.lora_scale, error))
    goto out;
  const int n = p.num_images;
  const gboolean lcm_cond = diffuse_unet_time_cond_proj_dim (sd->unet) > 0;
  const gboolean cfg = p.guidance_scale > 1.0f && !lcm_cond;

  /* 1. prompt embeddings (cond) and, with CFG, the negative ones first */
  if (p.prompt_embeds) {
    cond = diffuse_tensor_ref (p.prompt_embeds);
    if (sd->xl)
      pooled = diffuse_tensor_ref (p.pooled_prompt_embeds);
  } else if (sd->xl) {
    if (!encode_xl (sd, p.prompt, p.clip_skip, &cond, &pooled, error))
      goto out;
  } else
    cond = _diffuse_pipeline_encode_prompt (sd->tokenizer, sd->text_encoder, p.prompt, p.clip_skip, error);
  if (!cond)
    goto out;
  {
    DiffuseTensor *r = repeat_batch (cond, n);
    diffuse_tensor_unref (cond);
    cond = r;
    if (pooled) {
      r = repeat_batch (pooled, n);
      diffuse_tensor_unref (pooled);
      pooled = r;
    }
  }
  if (cfg) {
    if (p.negative_prompt_embeds) {
      uncond = diffuse_tensor_ref (p.negative_prompt_embeds);
      if (sd->xl)
        upooled = diffuse_tensor_ref (p.negative_pooled_prompt_embeds);
    } else if (sd->xl && !p.negative_prompt && sd->force_zeros) {
      /* force_zeros_for_empty_prompt: zeros, not the empty prompt's embedding */
      uncond = diffuse_tensor_zeros (diffuse_tensor_device (cond), cond->dtype, cond->ndim, cond->shape);
      upooled = diffuse_tensor_zeros (diffuse_tensor_device (pooled), pooled->dtype, pooled->ndim, pooled->shape);
    } else if (sd->xl) {
      /* (always hidden_states[-2]: diffusers applies clip_skip to the prompt only) */
      if (!encode_xl (sd, p.negative_prompt ? p.negative_prompt : "", 0, &uncond, &upooled, error))
        goto out;
    } else
      uncond = _diffuse_pipeline_encode_prompt (sd->tokenizer, sd->text_encoder,
                                                p.negative_prompt ? p.negative_prompt : "", 0, error);
    if (!uncond || (sd->xl && !upooled)) {
      op_error (error, "negative prompt embedding");
      goto out;
    }
    DiffuseTensor *r = repeat_batch (uncond, n);
    diffuse_tensor_unref (uncond);
    uncond = r;
    if (upooled) {
      r = repeat_batch (upooled, n);
      diffuse_tensor_unref (upooled);
      upooled = r;
    }
    /* both where the UNet runs (prompt_embeds given by the caller may be elsewhere) */
    if (!_diffuse_pipeline_place (&cond, dev, diffuse_unet_dtype (sd->unet)) ||
        !_diffuse_pipeline_place (&uncond, dev, diffuse_unet_dtype (sd->unet))) {
      op_error (error, "prompt embedding");
      goto out;
    }
    DiffuseTensor *pair[2] = { uncond, cond };
    embeds = diffuse_concat (pair, 2, 0);
  } else {
    embeds = diffuse_tensor_ref (cond);
  }
  if (!embeds) {
    op_error (error, "prompt embedding");
    goto out;
  }
  if (sd->xl) {
    /* added_cond_kwargs: text_embeds = the pooled embeddings ([negative;
     * prompt] with CFG), time_ids = original size, crop top-left, target
     * size: (h, w, 0, 0, h, w) per row, in the pipeline's dtype */
    /* (pooled embeddings given by the caller may be elsewhere) */
    if (!_diffuse_pipeline_place (&pooled, dev, diffuse_unet_dtype (sd->unet)) ||
        (cfg && !_diffuse_pipeline_place (&upooled, dev, diffuse_unet_dtype (sd->unet)))) {
      op_error (error, "pooled prompt embedding");
      goto out;
    }
    if (pooled->ndim != 2 || pooled->shape[0] != n || (cfg && !diffuse_tensor_same_shape (pooled, upooled))) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                   "pooled_prompt_embeds (and negative_pooled_prompt_embeds) should be [1 or %d, P], the same", n);
      goto out;
    }
    if (cfg) {
      DiffuseTensor *pp[2] = { upooled, pooled };
      text_embeds = diffuse_concat (pp, 2, 0);
    } else {
      text_embeds = diffuse_tensor_ref (pooled);
    }
    /* the refiner: (h, w, 0, 0, aesthetic_score), the negative rows with
     * negative_aesthetic_score */
    const int rows = cfg ? 2 * n : n, nid = sd->aesthetics ? 5 : 6;
    float *ids = g_new (float, (size_t) rows * nid);
    for (int r = 0; r < rows; r++) {
      const gboolean neg = cfg && r < n;
      const float v[6] = { (float) p.height, (float) p.width, 0.0f, 0.0f,
                           sd->aesthetics ? (neg ? p.negative_aesthetic_score : p.aesthetic_score) : (float) p.height,
                           (float) p.width };
      memcpy (ids + (size_t) r * nid, v, sizeof (float) * nid);
    }
    time_ids = diffuse_tensor_from_f32 (ids, 2, (const int64_t[]) { rows, nid });
    g_free (ids);
    if (!text_embeds || !time_ids || !_diffuse_pipeline_place (&text_embeds, dev, diffuse_unet_dtype (sd->unet)) ||
        !_diffuse_pipeline_place (&time_ids, dev, diffuse_unet_dtype (sd->unet))) {
      op_error (error, "SDXL added conditions");
      goto out;
    }
  }
  tm->encode_us = g_get_monotonic_time () - t_mark;
  t_mark = g_get_monotonic_time ();
  if (lcm_cond)
    tcond = guidance_embedding (p.guidance_scale - 1.0f, n, diffuse_unet_time_cond_proj_dim (sd->unet));

  /* 2. scheduler */
  sched = diffuse_scheduler_new_by_name (p.scheduler ? p.scheduler : sd->scheduler_class,
                                         p.scheduler_config ? p.scheduler_config : sd->scheduler_config, error);
  if (!sched || !diffuse_scheduler_set_timesteps (sched, (guint) p.num_inference_steps, error))
    goto out;
  diffuse_scheduler_set_eta (sched, p.eta);
  /* diffusers draws every noise in the pipeline's dtype (randn_tensor (...,
   * dtype=prompt_embeds.dtype / model_output.dtype)): an f16 pipeline's noise
   * is f16 values (rng.h: rounded, and a different tail when n % 16 != 0) */
  const DiffuseRngDType rdt = _diffuse_pipeline_rng_dtype (diffuse_unet_dtype (sd->unet));
  diffuse_scheduler_set_noise_dtype (sched, rdt);
  rng = diffuse_rng_new (p.seed);

  const int C = diffuse_unet_in_channels (sd->unet);
  const int h = p.height / vsf, w = p.width / vsf;
  const size_t per = (size_t) C * h * w, total = per * n;
  int64_t lshape[4] = { n, C, h, w };
  latents = diffuse_tensor_new (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 4, lshape);
  if (!latents) {
    op_error (error, "latents");
    goto out;
  }
  float *lat = diffuse_tensor_f32 (latents);
  guint begin = 0;

  if (sd->task == DIFFUSE_SD_TEXT2IMG) {
    /* 3. prepare_latents: randn(shape, generator) * init_noise_sigma */
    _diffuse_pipeline_initial_latents (rng, sched, rdt, lat, total);
  } else {
    /* 3'. get_timesteps + prepare_latents of the img2img pipeline */
    guint steps_left = 0;
    begin = use_start ? begin_at_denoising_start (sched, p.denoising_start, &steps_left)
                      : diffuse_scheduler_apply_strength (sched, p.strength, &steps_left);
    if (steps_left < 1) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                   "After adjusting num_inference_steps by strength (%g), %d steps become 0: raise strength or "
                   "num_inference_steps", p.strength, p.num_inference_steps);
      goto out;
    }
    const double *ts = diffuse_scheduler_timesteps (sched, NULL);
    if (il) {
      /* latents given: init_latents = image (no VAE), in the pipeline's dtype */
      DiffuseTensor *hl = diffuse_to_host_f32 (il);
      if (!hl) {
        op_error (error, "image_latents");
        goto out;
      }
      const float *src = diffuse_tensor_f32 (hl);
      for (int b = 0; b < n; b++)
        memcpy (lat + (size_t) b * per, src + (il->shape[0] == 1 ? 0 : (size_t) b * per), per * sizeof (float));
      diffuse_tensor_unref (hl);
      diffuse_rng_round (rdt, lat, total);
    } else if (!encode_image_latents (sd, p.image, rng, rdt, lat, n, per, error)) {
      goto out;
    }
    /* noise = randn(shape, generator); add_noise at the first timestep
     * (not with denoising_start: the latents are already that far) */
    if (!use_start) {
      noise_buf = g_new (float, total);
      diffuse_rng_randn_as (rng, rdt, noise_buf, total);
      if (!diffuse_scheduler_add_noise (sched, lat, noise_buf, lat, total, ts[begin], error))
        goto out;
      diffuse_rng_round (rdt, lat, total);
    }
  }

  /* 4. denoising loop */
  tm->prepare_us = g_get_monotonic_time () - t_mark;
  gint64 loop_start = g_get_monotonic_time ();
  guint n_ts = 0;
  const double *all_ts = diffuse_scheduler_timesteps (sched, &n_ts);
  if (use_end) {
    /* denoising_end: only the timesteps >= the cutoff (from where this run begins) */
    const double cutoff = timestep_cutoff (sched, p.denoising_end);
    guint k = 0;
    for (guint i = begin; i < n_ts; i++)
      k += all_ts[i] >= cutoff;
    n_ts = begin + k;
  }
  const int batch = cfg ? 2 * n : n;
  int64_t mshape[4] = { batch, C, h, w };
  DiffuseTensor *model_in = diffuse_tensor_new (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 4, mshape);
  float *eps = g_new (float, total);
  int total_steps = (int) (n_ts - begin), step = 0;
  DiffuseDevice *udev = dev;
  DiffuseDType udt = diffuse_unet_dtype (sd->unet);
  DiffuseTensor *dembeds = diffuse_to_device (embeds, udev);
  DiffuseTensor *dembeds2 = diffuse_cast (dembeds, udt);
  diffuse_tensor_clear (&dembeds);
  DiffuseTensor *dtcond = tcond ? diffuse_to_device (tcond, udev) : NULL;
  gboolean ok = model_in && dembeds2;
  if (!ok)
    op_error (error, "UNet inputs");
  UNetStep ustep;
  const gboolean sag = p.sag_scale > 0.0f;
  /* IP-Adapter: the image tokens of this generation */
  DiffuseTensor *ip_tokens = NULL;
  if (ok && sd->ip_adapter) {
    ip_tokens = _diffuse_ip_adapter_tokens (sd->ip_adapter, p.ip_adapter_image, n, cfg, error);
    ok = ip_tokens != NULL;
  }
  unet_step_init (&ustep, sd->unet, dembeds2, dtcond, batch, sag);
  ustep.text_embeds = text_embeds;
  ustep.time_ids = time_ids;
  if (ip_tokens) {
    ustep.ip = sd->ip_adapter;
    ustep.ip_tokens = ip_tokens;
    ustep.use_graph = FALSE;
  }
  while (ok && diffuse_scheduler_position (sched) < n_ts) {
    if (cancelled (&p, error)) {
      ok = FALSE;
      break;
    }
    double t = diffuse_scheduler_current_timestep (sched);
    float *mi = diffuse_tensor_f32 (model_in);
    memcpy (mi, lat, total * sizeof (float));
    if (cfg)
      memcpy (mi + total, lat, total * sizeof (float));
    diffuse_scheduler_scale_model_input (sched, mi, (size_t) batch * per);
    gint64 u0 = g_get_monotonic_time ();
    DiffuseTensor *x = diffuse_to_device (model_in, udev);
    DiffuseTensor *x2 = diffuse_cast (x, udt);
    diffuse_tensor_clear (&x);
    DiffuseTensor *out = x2 ? unet_step_run (&ustep, x2, t, error) : NULL;
    diffuse_tensor_clear (&x2);
    DiffuseTensor *ho = out ? diffuse_to_host_f32 (out) : NULL;
    diffuse_tensor_clear (&out);
    tm->unet_us += g_get_monotonic_time () - u0;
    tm->n_unet_calls++;
    if (!ho) {
      if (error && !*error)
        op_error (error, "UNet");
      ok = FALSE;
      break;
    }
    const float *op = diffuse_tensor_f32 (ho);
    if (cfg) {
      const float g = p.guidance_scale;
      const float *u = op, *tx = op + total;
      for (size_t i = 0; i < total; i++) {
        float d = tx[i] - u[i];
        float m = g * d;
        eps[i] = u[i] + m;
      }
      if (p.guidance_rescale > 0.0f)
        rescale_cfg (eps, tx, n, per, p.guidance_rescale);
    } else {
      memcpy (eps, op, total * sizeof (float));
    }
    if (sag && !sag_guidance (sd, sched, &p, cfg, n, C, h, w, lat, op, ustep.sag_probs, ustep.sag_map_hw, dembeds2,
                              &ustep, t, eps, error)) {
      diffuse_tensor_unref (ho);
      ok = FALSE;
      break;
    }
    diffuse_tensor_unref (ho);
    if (!diffuse_scheduler_step (sched, eps, lat, total, rng, error)) {
      ok = FALSE;
      break;
    }
    step++;
    if (p.on_step && !p.on_step (step, total_steps, p.user_data)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "Generation was cancelled");
      ok = FALSE;
      break;
    }
  }
  tm->step_other_us = g_get_monotonic_time () - loop_start - tm->unet_us;
  t_mark = g_get_monotonic_time ();
  unet_step_clear (&ustep);
  diffuse_tensor_clear (&ip_tokens);
  g_free (eps);
  diffuse_tensor_clear (&model_in);
  diffuse_tensor_clear (&dembeds2);
  diffuse_tensor_clear (&dtcond);
  if (!ok)
    goto out;

  /* output_type="latent": the latents as they are */
  if (latents_out) {
    *latents_out = diffuse_tensor_ref (latents);
    images = g_ptr_array_new ();
    goto out;
  }

  /* 5. decode: vae.decode(latents / scaling_factor), then (x / 2 + 0.5).clamp(0, 1) */
  {
    const float sf = (float) diffuse_vae_scaling_factor (sd->vae);
    for (size_t i = 0; i < total; i++)
      lat[i] = lat[i] / sf;
    /* SDXL's needs_upcasting: an f16 VAE with force_upcast decodes in f32 */
    DiffuseVae *dvae = sd->vae_f32 && diffuse_vae_dtype (sd->vae) == DIFFUSE_DTYPE_F16 ? sd->vae_f32 : sd->vae;
    DiffuseTensor *dl = diffuse_to_device (latents, diffuse_vae_device (dvae));
    DiffuseTensor *dl2 = diffuse_cast (dl, diffuse_vae_dtype (dvae));
    diffuse_tensor_clear (&dl);
    DiffuseVaeParams vp;
    diffuse_vae_default_params (&vp);
    DiffuseTensor *dec = dl2 ? diffuse_vae_decode (dvae, dl2, &vp, error) : NULL;
    diffuse_tensor_clear (&dl2);
    DiffuseTensor *hd = dec ? diffuse_to_host_f32 (dec) : NULL;
    diffuse_tensor_clear (&dec);
    if (!hd) {
      if (error && !*error)
        op_error (error, "VAE decode");
      goto out;
    }
    const int H = (int) hd->shape[2], W = (int) hd->shape[3];
    const float *dp = diffuse_tensor_f32 (hd);
    images = g_ptr_array_new_with_free_func ((GDestroyNotify) diffuse_image_free);
    for (int b = 0; b < n; b++) {
      DiffuseImage *img = g_new0 (DiffuseImage, 1);
      img->width = W;
      img->height = H;
      img->pixels = g_new (float, (size_t) W * H * 3);
      const size_t plane = (size_t) W * H;
      for (int c = 0; c < 3; c++) {
        const float *src = dp + ((size_t) b * 3 + c) * plane;
        for (size_t i = 0; i < plane; i++) {
          float v = src[i] / 2.0f + 0.5f;
          img->pixels[i * 3 + c] = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
        }
      }
      g_ptr_array_add (images, img);
    }
    diffuse_tensor_unref (hd);
  }
  tm->decode_us = g_get_monotonic_time () - t_mark;
  if (sd->safety_checker) {
    t_mark = g_get_monotonic_time ();
    if (!run_safety_checker (sd, images, error))
      g_clear_pointer (&images, g_ptr_array_unref);
    tm->safety_us = g_get_monotonic_time () - t_mark;
  }

out:
  g_mutex_unlock (&sd->lock);
  g_free (noise_buf);
  diffuse_tensor_clear (&cond);
  diffuse_tensor_clear (&uncond);
  diffuse_tensor_clear (&embeds);
  diffuse_tensor_clear (&latents);
  diffuse_tensor_clear (&tcond);
  diffuse_tensor_clear (&pooled);
  diffuse_tensor_clear (&upooled);
  diffuse_tensor_clear (&text_embeds);
  diffuse_tensor_clear (&time_ids);
  if (sched)
    diffuse_scheduler_free (sched);
  if (rng)
    diffuse_rng_free (rng);
  return images;
}

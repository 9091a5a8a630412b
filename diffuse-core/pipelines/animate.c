/* gst-diffuse — AnimateDiffPipeline.
 *
 * The steps follow diffusers' pipeline_animatediff.py (__call__,
 * encode_prompt, prepare_latents, decode_latents) and the video processor's
 * postprocess_video, so that one seed gives one clip:
 *   embeddings [negative, prompt] (CFG in one batch), repeated over frames
 *   latents = randn([1, C, F, h, w], generator) * init_noise_sigma
 *   per step: UNetMotionModel on [2, C, F, h, w], guidance, scheduler.step
 *   decode: latents / scaling_factor, frames in chunks of decode_chunk_size,
 *           (x / 2 + 0.5).clamp(0, 1). */
#include "pipelines-private.h"
#include <diffuse/animate.h>
#include <diffuse/unet.h>
#include <diffuse/vae.h>
#include <diffuse/clip_text.h>
#include <diffuse/clip_tokenizer.h>
#include <diffuse/scheduler.h>
#include <diffuse/rng.h>
#include <diffuse/error.h>
#include <string.h>

struct _DiffuseAnimate {
  gint ref_count;
  DiffusePipelineModel *pm;
  DiffuseUNet *unet;              /* borrowed from the unet component (shared with text2img),
                                   * or from motion when the unet is a UNetMotionModel */
  DiffuseMotionAdapter *adapter;  /* borrowed from the motion_adapter component, or from motion */
  DiffuseUNetMotion *motion;      /* a reference: refs unet + adapter (the unet component's
                                   * own object when it is a UNetMotionModel) */
  DiffuseVae *vae;
  DiffuseClipText *text_encoder;
  DiffuseClipTokenizer *tokenizer;
  DiffuseConfig *scheduler_config;
  char *scheduler_class;
  GMutex lock;                    /* one generate() at a time */
  /* LoRA: motion / text_encoder above are then models of their own */
  gboolean motion_unet_component; /* the unet component is a UNetMotionModel (no LoRA here yet) */
  DiffuseUNetMotion *base_motion; /* a reference */
  DiffuseClipText *base_text_encoder;
  DiffuseClipText *lora_text_encoder;   /* owned, or NULL */
  DiffuseLoraSet lora;
  DiffuseIpAdapter *ip_adapter;           /* NULL: none */
};

/* DiffuseLoraApplyFunc: the 2-D UNet (modules outside motion_modules), the
 * motion adapter (motion_modules) and the text encoder rebuilt with the
 * adapters merged, and a UNetMotionModel of the two (lock held) */
static gboolean
animate_lora_apply (gpointer owner, DiffuseLoraAdapter *const *ads, const double *ws, int n, GError **error)
{
  DiffuseAnimate *a = owner;
  gboolean want_2d = FALSE, want_motion = FALSE, want_te = FALSE;
  for (int i = 0; i < n; i++) {
    want_2d = want_2d || _diffuse_lora_adapter_has_filtered (ads[i], DIFFUSE_LORA_UNET, DIFFUSE_LORA_NO_MOTION);
    want_motion = want_motion || _diffuse_lora_adapter_has_filtered (ads[i], DIFFUSE_LORA_UNET,
                                                                     DIFFUSE_LORA_ONLY_MOTION);
    want_te = want_te || _diffuse_lora_adapter_has (ads[i], DIFFUSE_LORA_TEXT_ENCODER);
  }
  if ((want_2d || want_motion) && a->motion_unet_component) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: LoRA on a saved AnimateDiff pipeline (its unet a UNetMotionModel) is not supported yet; load "
                 "the Stable Diffusion checkpoint with a motion adapter instead", diffuse_pipeline_model_folder (a->pm));
    return FALSE;
  }
  DiffuseUNet *unet = NULL;
  DiffuseMotionAdapter *adapter = NULL;
  DiffuseUNetMotion *motion = NULL;
  DiffuseClipText *te = NULL;
  gboolean ok = TRUE;
  if (want_2d) {
    unet = _diffuse_pipeline_unet_with_lora (a->pm, ads, ws, n, DIFFUSE_LORA_NO_MOTION, error);
    ok = unet != NULL;
  }
  if (ok && want_motion) {
    DiffuseComponent *c = diffuse_pipeline_model_get (a->pm, "motion_adapter");
    DiffuseWeights *w = _diffuse_lora_merge (diffuse_component_weights (c), ads, ws, n, DIFFUSE_LORA_UNET,
                                             DIFFUSE_LORA_ONLY_MOTION, error);
    DiffuseMotionAdapterParams p;
    diffuse_motion_adapter_default_params (&p);
    p.dtype = diffuse_component_dtype (c);
    p.device = diffuse_component_device (c);
    p.component = diffuse_component_name (c);
    adapter = w ? diffuse_motion_adapter_new (diffuse_component_config (c), w, &p, error) : NULL;
    g_clear_pointer (&w, diffuse_weights_unref);
    ok = adapter != NULL;
  }
  if (ok && (unet || adapter)) {
    motion = diffuse_unet_motion_new (unet ? unet : a->unet, adapter ? adapter : a->adapter, error);
    ok = motion != NULL;
  }
  if (ok && want_te) {
    te = _diffuse_pipeline_text_encoder_with_lora (a->pm, DIFFUSE_LORA_TEXT_ENCODER, ads, ws, n, error);
    ok = te != NULL;
  }
  /* the UNetMotionModel holds its own references to the 2-D UNet and the adapter */
  g_clear_pointer (&unet, diffuse_unet_unref);
  g_clear_pointer (&adapter, diffuse_motion_adapter_unref);
  if (!ok) {
    g_clear_pointer (&motion, diffuse_unet_motion_unref);
    g_clear_pointer (&te, diffuse_clip_text_unref);
    return FALSE;
  }
  g_clear_pointer (&a->motion, diffuse_unet_motion_unref);
  a->motion = motion ? motion : diffuse_unet_motion_ref (a->base_motion);
  g_clear_pointer (&a->lora_text_encoder, diffuse_clip_text_unref);
  a->lora_text_encoder = te;
  a->text_encoder = te ? te : a->base_text_encoder;
  return TRUE;
}

void
diffuse_animate_default_params (DiffuseAnimateParams *p)
{
  memset (p, 0, sizeof *p);
  p->num_frames = 16;
  p->num_inference_steps = 50;
  p->guidance_scale = 7.5f;
  p->decode_chunk_size = 16;
  p->lora_scale = 1.0f;
}

/* ---- components ------------------------------------------------------------ */

/* The shared models come from pipelines-private.h (the same objects text2img
 * uses); the adapter is built here. */
static gpointer
build_adapter (DiffuseComponent *c, gpointer user_data, GError **error)
{
  DiffuseMotionAdapterParams p;
  diffuse_motion_adapter_default_params (&p);
  p.dtype = diffuse_component_dtype (c);
  p.device = diffuse_component_device (c);
  p.component = diffuse_component_name (c);
  return diffuse_motion_adapter_new (diffuse_component_config (c), diffuse_component_weights (c), &p, error);
}

/* A unet component that is a UNetMotionModel (AnimateDiffPipeline.save_pretrained
 * writes one): its 2-D part and its own motion modules, built once per component. */
static gpointer
build_unet_motion (DiffuseComponent *c, gpointer user_data, GError **error)
{
  DiffuseUNetMotionParams p;
  diffuse_unet_motion_default_params (&p);
  p.dtype = diffuse_component_dtype (c);
  p.device = diffuse_component_device (c);
  p.component = diffuse_component_name (c);
  return diffuse_unet_motion_new_from_weights (diffuse_component_config (c), diffuse_component_weights (c), &p,
                                               error);
}

gboolean
diffuse_animate_model_has_motion_unet (DiffusePipelineModel *pm)
{
  g_return_val_if_fail (pm != NULL, FALSE);
  DiffuseComponent *u = diffuse_pipeline_model_get (pm, "unet");
  return u && strcmp (diffuse_component_class (u), "UNetMotionModel") == 0;
}

DiffuseAnimate *
diffuse_animate_new (DiffusePipelineModel *pm, GError **error)
{
  g_return_val_if_fail (pm != NULL, NULL);
  DiffuseAnimate *a = g_new0 (DiffuseAnimate, 1);
  a->ref_count = 1;
  a->pm = diffuse_pipeline_model_ref (pm);
  g_mutex_init (&a->lock);
  a->motion_unet_component = diffuse_animate_model_has_motion_unet (pm);
  if (a->motion_unet_component) {
    /* diffusers' AnimateDiffPipeline.__init__ converts only a UNet2DConditionModel:
     * a UNetMotionModel runs its own motion modules and motion_adapter is unused */
    DiffuseUNetMotion *m = _diffuse_pipeline_object (pm, "unet", "UNetMotionModel", build_unet_motion,
                                                     (GDestroyNotify) diffuse_unet_motion_unref, error);
    if (m) {
      a->motion = diffuse_unet_motion_ref (m);
      a->unet = diffuse_unet_motion_get_unet (m);
      a->adapter = diffuse_unet_motion_get_adapter (m);
    }
  } else {
    a->unet = _diffuse_pipeline_unet (pm, error);
    if (a->unet)
      a->adapter = _diffuse_pipeline_object (pm, "motion_adapter", "MotionAdapter", build_adapter,
                                             (GDestroyNotify) diffuse_motion_adapter_unref, error);
    if (a->adapter && diffuse_motion_adapter_conv_in_channels (a->adapter) > 0) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                   "%s: the motion adapter has conv_in_channels %d (a PIA adapter): AnimateDiffPipeline cannot use it",
                   diffuse_pipeline_model_folder (pm), diffuse_motion_adapter_conv_in_channels (a->adapter));
      diffuse_animate_unref (a);
      return NULL;
    }
    if (a->adapter)
      a->motion = diffuse_unet_motion_new (a->unet, a->adapter, error);
  }
  if (a->motion)
    a->vae = _diffuse_pipeline_vae (pm, error);
  if (a->vae)
    a->text_encoder = _diffuse_pipeline_text_encoder (pm, error);
  if (a->text_encoder)
    a->tokenizer = _diffuse_pipeline_tokenizer (pm, error);
  if (!a->tokenizer) {
    diffuse_animate_unref (a);
    return NULL;
  }
  a->base_motion = diffuse_unet_motion_ref (a->motion);
  a->base_text_encoder = a->text_encoder;
  _diffuse_lora_set_init (&a->lora, animate_lora_apply, a);
  DiffuseComponent *sched = diffuse_pipeline_model_get (pm, "scheduler");
  if (!sched) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "%s: the pipeline has no scheduler",
                 diffuse_pipeline_model_folder (pm));
    diffuse_animate_unref (a);
    return NULL;
  }
  a->scheduler_config = diffuse_config_ref (diffuse_component_config (sched));
  a->scheduler_class = g_strdup (diffuse_component_class (sched));
  if (!diffuse_scheduler_class_supported (a->scheduler_class)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: scheduler %s is not implemented",
                 diffuse_pipeline_model_folder (pm), a->scheduler_class);
    diffuse_animate_unref (a);
    return NULL;
  }
  return a;
}

DiffuseAnimate *
diffuse_animate_new_from_pipe (DiffusePipelineModel *sd_pm, DiffuseComponent *motion_adapter, GError **error)
{
  g_return_val_if_fail (sd_pm != NULL && motion_adapter != NULL, NULL);
  GHashTable *over = g_hash_table_new (g_str_hash, g_str_equal);
  g_hash_table_insert (over, (gpointer) "motion_adapter", motion_adapter);
  DiffusePipelineModel *pm = diffuse_pipeline_model_derive (sd_pm, "AnimateDiffPipeline", over, error);
  g_hash_table_unref (over);
  if (!pm)
    return NULL;
  DiffuseAnimate *a = diffuse_animate_new (pm, error);
  diffuse_pipeline_model_unref (pm);
  return a;
}

DiffuseComponent *
diffuse_animate_load_adapter (DiffusePipelineModel *pm, const char *ref, const DiffuseLoadParams *params,
                              GError **error)
{
  g_return_val_if_fail (pm != NULL && ref != NULL, NULL);
  DiffuseLoadParams lp;
  if (params) {
    lp = *params;
  } else {
    lp = diffuse_load_default_params ();
    DiffuseComponent *u = diffuse_pipeline_model_get (pm, "unet");
    if (u) {
      lp.have_dtype = TRUE;
      lp.dtype = diffuse_component_dtype (u);
      lp.device = diffuse_device_name (diffuse_component_device (u));
    }
  }
  DiffuseComponent *c = diffuse_component_load (diffuse_pipeline_model_cache (pm), ref, NULL, "motion_adapter", &lp,
                                                error);
  if (c && strcmp (diffuse_component_class (c), "MotionAdapter") != 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s is a %s, not a MotionAdapter", ref,
                 diffuse_component_class (c));
    diffuse_component_unref (c);
    return NULL;
  }
  return c;
}

DiffuseAnimate *
diffuse_animate_ref (DiffuseAnimate *a)
{
  g_return_val_if_fail (a != NULL, NULL);
  g_atomic_int_inc (&a->ref_count);
  return a;
}

void
diffuse_animate_unref (DiffuseAnimate *a)
{
  if (!a || !g_atomic_int_dec_and_test (&a->ref_count))
    return;
  g_clear_pointer (&a->motion, diffuse_unet_motion_unref);
  g_clear_pointer (&a->base_motion, diffuse_unet_motion_unref);
  g_clear_pointer (&a->lora_text_encoder, diffuse_clip_text_unref);
  g_clear_pointer (&a->ip_adapter, _diffuse_ip_adapter_free);
  if (a->lora.adapters)
    _diffuse_lora_set_clear (&a->lora);
  g_clear_pointer (&a->scheduler_config, diffuse_config_unref);
  g_free (a->scheduler_class);
  diffuse_pipeline_model_unref (a->pm);
  g_mutex_clear (&a->lock);
  g_free (a);
}

gboolean
diffuse_animate_load_lora_weights (DiffuseAnimate *a, const char *path, const char *adapter_name, GError **error)
{
  g_return_val_if_fail (a != NULL && path != NULL, FALSE);
  g_mutex_lock (&a->lock);
  gboolean ok = _diffuse_lora_set_load (&a->lora, path, adapter_name, error);
  g_mutex_unlock (&a->lock);
  return ok;
}

gboolean
diffuse_animate_set_adapters (DiffuseAnimate *a, const char *const *names, const double *weights, int n,
                              GError **error)
{
  g_return_val_if_fail (a != NULL && (n == 0 || names != NULL), FALSE);
  g_mutex_lock (&a->lock);
  gboolean ok = _diffuse_lora_set_activate (&a->lora, names, weights, n, error);
  g_mutex_unlock (&a->lock);
  return ok;
}

void
diffuse_animate_unload_lora_weights (DiffuseAnimate *a)
{
  g_mutex_lock (&a->lock);
  _diffuse_lora_set_unload (&a->lora);
  g_mutex_unlock (&a->lock);
}

gboolean
diffuse_animate_load_lora_spec (DiffuseAnimate *a, const char *spec, GError **error)
{
  g_return_val_if_fail (a != NULL && spec != NULL, FALSE);
  g_mutex_lock (&a->lock);
  gboolean ok = _diffuse_lora_set_load_spec (&a->lora, spec, error);
  g_mutex_unlock (&a->lock);
  return ok;
}

gboolean
diffuse_animate_load_ip_adapter (DiffuseAnimate *a, const char *ref, const char *subfolder, const char *weight_name,
                                 GError **error)
{
  g_return_val_if_fail (a != NULL && ref != NULL && weight_name != NULL, FALSE);
  g_mutex_lock (&a->lock);
  DiffuseIpAdapter *ip = _diffuse_ip_adapter_load (a->pm, ref, subfolder, weight_name,
                                                   diffuse_unet_device (a->unet), diffuse_unet_dtype (a->unet),
                                                   error);
  if (ip) {
    g_clear_pointer (&a->ip_adapter, _diffuse_ip_adapter_free);
    a->ip_adapter = ip;
  }
  g_mutex_unlock (&a->lock);
  return ip != NULL;
}

void
diffuse_animate_set_ip_adapter_scale (DiffuseAnimate *a, float scale)
{
  g_mutex_lock (&a->lock);
  if (a->ip_adapter)
    _diffuse_ip_adapter_set_scale (a->ip_adapter, scale);
  g_mutex_unlock (&a->lock);
}

void
diffuse_animate_unload_ip_adapter (DiffuseAnimate *a)
{
  g_mutex_lock (&a->lock);
  g_clear_pointer (&a->ip_adapter, _diffuse_ip_adapter_free);
  g_mutex_unlock (&a->lock);
}

gboolean
diffuse_animate_has_ip_adapter (DiffuseAnimate *a)
{
  return a->ip_adapter != NULL;
}

DiffusePipelineModel *diffuse_animate_get_model (DiffuseAnimate *a) { return a->pm; }
DiffuseUNetMotion *diffuse_animate_get_unet_motion (DiffuseAnimate *a) { return a->motion; }
int diffuse_animate_max_frames (DiffuseAnimate *a) { return diffuse_unet_motion_max_frames (a->motion); }
const char *diffuse_animate_scheduler_class (DiffuseAnimate *a) { return a->scheduler_class; }

const char *const *
diffuse_animate_compatible_schedulers (DiffuseAnimate *a)
{
  return diffuse_scheduler_compatibles (a->scheduler_class);
}

void
diffuse_animate_default_size (DiffuseAnimate *a, int *width, int *height)
{
  int s = diffuse_unet_sample_size (a->unet) * diffuse_vae_scale_factor (a->vae);
  if (width)
    *width = s;
  if (height)
    *height = s;
}

/* ---- helpers ------------------------------------------------------------------ */


/* base with the members of over set on top: a new config (json_node_copy
 * shares objects, so the top level is rebuilt; base is never modified). */
static DiffuseConfig *
merge_config (DiffuseConfig *base, DiffuseConfig *over)
{
  JsonObject *merged = json_object_new ();
  JsonObject *srcs[2] = { diffuse_config_object (base), diffuse_config_object (over) };
  for (int k = 0; k < 2; k++) {
    GList *keys = json_object_get_members (srcs[k]);
    for (GList *l = keys; l; l = l->next)
      json_object_set_member (merged, l->data, json_node_copy (json_object_get_member (srcs[k], l->data)));
    g_list_free (keys);
  }
  DiffuseConfig *c = diffuse_config_from_object (merged, diffuse_config_label (base));
  json_object_unref (merged);
  return c;
}

static void
op_error (GError **error, const char *what)
{
  if (error && *error)
    return;
  if (!diffuse_tensor_take_error (error))
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s failed", what);
}

static gboolean
cancelled (const DiffuseAnimateParams *p, GError **error)
{
  if (p->cancellable && g_cancellable_is_cancelled (p->cancellable)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "Generation was cancelled");
    return TRUE;
  }
  return FALSE;
}

static gboolean
check_params (DiffuseAnimate *a, DiffuseAnimateParams *p, GError **error)
{
  int def_w, def_h;
  diffuse_animate_default_size (a, &def_w, &def_h);
  if (p->width <= 0)
    p->width = def_w;
  if (p->height <= 0)
    p->height = def_h;
  if (p->decode_chunk_size <= 0)
    p->decode_chunk_size = 16;
  const int vsf = diffuse_vae_scale_factor (a->vae);
  if (p->width % 8 || p->height % 8 || p->width % vsf || p->height % vsf) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "`height` and `width` have to be divisible by 8 but are %d and %d", p->height, p->width);
    return FALSE;
  }
  const int max_frames = diffuse_animate_max_frames (a);
  if (p->num_frames < 1 || p->num_frames > max_frames) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "num_frames must be 1..%d (the motion adapter's motion_max_seq_length), got %d", max_frames,
                 p->num_frames);
    return FALSE;
  }
  if (p->num_inference_steps < 1) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "num_inference_steps must be >= 1 (got %d)",
                 p->num_inference_steps);
    return FALSE;
  }
  if (p->clip_skip < 0 || p->clip_skip >= diffuse_clip_text_num_layers (a->text_encoder)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "clip_skip must be 0..%d (got %d)",
                 diffuse_clip_text_num_layers (a->text_encoder) - 1, p->clip_skip);
    return FALSE;
  }
  if (!p->prompt && !p->prompt_embeds) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "Provide either `prompt` or `prompt_embeds`");
    return FALSE;
  }
  for (int k = 0; k < 2; k++) {
    DiffuseTensor *e = k ? p->negative_prompt_embeds : p->prompt_embeds;
    if (e && (e->ndim != 3 || e->shape[0] != 1)) {
      char *d = diffuse_tensor_describe (e);
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s %s should be [1, L, D]",
                   k ? "negative_prompt_embeds" : "prompt_embeds", d);
      g_free (d);
      return FALSE;
    }
  }
  return TRUE;
}

/* Decodes latents [1, C, F, h, w] (host f32, already divided by the scaling
 * factor) frame chunk by frame chunk; appends the frames to images. */
static gboolean
decode_frames (DiffuseAnimate *a, const DiffuseAnimateParams *p, DiffuseTensor *latents, GPtrArray *images,
               GError **error)
{
  const int64_t C = latents->shape[1], F = latents->shape[2], h = latents->shape[3], w = latents->shape[4];
  /* [1, C, F, h, w] -> [F, C, h, w] */
  DiffuseTensor *lp = diffuse_permute (latents, (int[]) { 0, 2, 1, 3, 4 });
  DiffuseTensor *lc = diffuse_contiguous (lp);
  diffuse_tensor_unref (lp);
  DiffuseTensor *frames = lc ? diffuse_reshape_4d (lc, F, C, h, w) : NULL;
  diffuse_tensor_unref (lc);
  if (!frames) {
    op_error (error, "latent frames");
    return FALSE;
  }
  DiffuseVaeParams vp;
  diffuse_vae_default_params (&vp);
  gboolean ok = TRUE;
  for (int64_t f0 = 0; ok && f0 < F; f0 += p->decode_chunk_size) {
    const int64_t nf = MIN ((int64_t) p->decode_chunk_size, F - f0);
    DiffuseTensor *chunk = diffuse_narrow (frames, 0, f0, nf);
    DiffuseTensor *dc = chunk ? diffuse_to_device (chunk, diffuse_vae_device (a->vae)) : NULL;
    diffuse_tensor_unref (chunk);
    DiffuseTensor *dc2 = dc ? diffuse_cast (dc, diffuse_vae_dtype (a->vae)) : NULL;
    diffuse_tensor_unref (dc);
    DiffuseTensor *dcc = dc2 ? diffuse_contiguous (dc2) : NULL;
    diffuse_tensor_unref (dc2);
    DiffuseTensor *dec = dcc ? diffuse_vae_decode (a->vae, dcc, &vp, error) : NULL;
    diffuse_tensor_unref (dcc);
    DiffuseTensor *hd = dec ? diffuse_to_host_f32 (dec) : NULL;
    diffuse_tensor_unref (dec);
    if (!hd) {
      op_error (error, "VAE decode");
      ok = FALSE;
      break;
    }
    const int H = (int) hd->shape[2], W = (int) hd->shape[3];
    const size_t plane = (size_t) W * H;
    const float *dp = diffuse_tensor_f32 (hd);
    for (int64_t k = 0; ok && k < nf; k++) {
      DiffuseImage *img = g_new0 (DiffuseImage, 1);
      img->width = W;
      img->height = H;
      img->pixels = g_new (float, plane * 3);
      for (int c = 0; c < 3; c++) {
        const float *src = dp + ((size_t) k * 3 + c) * plane;
        for (size_t i = 0; i < plane; i++) {
          float v = src[i] / 2.0f + 0.5f;
          img->pixels[i * 3 + c] = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
        }
      }
      g_ptr_array_add (images, img);
      if (p->on_frame && !p->on_frame ((int) (f0 + k), (int) F, img, p->user_data)) {
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "Generation was cancelled");
        ok = FALSE;
      }
    }
    diffuse_tensor_unref (hd);
    if (ok && cancelled (p, error))
      ok = FALSE;
  }
  diffuse_tensor_unref (frames);
  return ok;
}

/* ---- generation --------------------------------------------------------------- */

GPtrArray *
diffuse_animate_generate (DiffuseAnimate *a, const DiffuseAnimateParams *params, GError **error)
{
  g_return_val_if_fail (a != NULL && params != NULL, NULL);
  DiffuseAnimateParams p = *params;
  if (!check_params (a, &p, error))
    return NULL;

  GPtrArray *images = NULL;
  DiffuseScheduler *sched = NULL;
  DiffuseConfig *merged = NULL;
  DiffuseRng *rng = NULL;
  DiffuseTensor *cond = NULL, *uncond = NULL, *embeds = NULL, *dembeds = NULL, *latents = NULL;
  DiffuseTensor *model_in = NULL, *ip_tokens = NULL;
  DiffuseUNetForwardArgs uargs = { 0 };
  float *eps = NULL;
  const DiffuseDType udt = diffuse_unet_dtype (a->unet);
  DiffuseDevice *udev = diffuse_unet_device (a->unet);

  g_mutex_lock (&a->lock);
  const gboolean cfg = p.guidance_scale > 1.0f;
  if (a->ip_adapter && !p.ip_adapter_image) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "an IP-Adapter is loaded: give an ip_adapter_image (or unload it)");
    goto out;
  }
  if (!a->ip_adapter && p.ip_adapter_image) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "an ip_adapter_image was given but no IP-Adapter is loaded (diffuse_animate_load_ip_adapter)");
    goto out;
  }
  /* cross_attention_kwargs={"scale": s}: the LoRA adapters merged again at that scale */
  if (!_diffuse_lora_set_rescale (&a->lora, p.lora_scale, error))
    goto out;

  /* 1. prompt embeddings; with CFG [negative, prompt] in one batch (the
   * motion UNet repeats them over the frames, as repeat_interleave) */
  cond = p.prompt_embeds ? diffuse_tensor_ref (p.prompt_embeds)
                         : _diffuse_pipeline_encode_prompt (a->tokenizer, a->text_encoder, p.prompt, p.clip_skip, error);
  if (!cond)
    goto out;
  if (cfg) {
    uncond = p.negative_prompt_embeds ? diffuse_tensor_ref (p.negative_prompt_embeds)
                                      : _diffuse_pipeline_encode_prompt (a->tokenizer, a->text_encoder,
                                                                         p.negative_prompt ? p.negative_prompt : "", 0, error);
    if (!uncond)
      goto out;
    if (!diffuse_tensor_same_shape (uncond, cond)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                   "`prompt_embeds` and `negative_prompt_embeds` must have the same shape");
      goto out;
    }
    if (!_diffuse_pipeline_place (&cond, udev, udt) || !_diffuse_pipeline_place (&uncond, udev, udt)) {
      op_error (error, "prompt embedding");
      goto out;
    }
    DiffuseTensor *pair[2] = { uncond, cond };
    embeds = diffuse_concat (pair, 2, 0);
  } else {
    embeds = diffuse_tensor_ref (cond);
  }
  if (embeds) {
    DiffuseTensor *d = diffuse_to_device (embeds, udev);
    dembeds = d ? diffuse_cast (d, udt) : NULL;
    diffuse_tensor_clear (&d);
  }
  if (!dembeds) {
    op_error (error, "prompt embedding");
    goto out;
  }

  /* IP-Adapter: image tokens [uncond (zero embeds); cond] for the one clip,
   * repeated over the frames inside the motion UNet */
  if (a->ip_adapter) {
    ip_tokens = _diffuse_ip_adapter_tokens (a->ip_adapter, p.ip_adapter_image, 1, cfg, error);
    if (!ip_tokens)
      goto out;
    _diffuse_ip_adapter_args (a->ip_adapter, ip_tokens, &uargs);
  }

  /* 2. scheduler (class swap, config replaced and/or overridden) */
  {
    DiffuseConfig *base = p.scheduler_config ? p.scheduler_config : a->scheduler_config;
    if (p.scheduler_overrides)
      base = merged = merge_config (base, p.scheduler_overrides);
    sched = diffuse_scheduler_new_by_name (p.scheduler ? p.scheduler : a->scheduler_class, base, error);
  }
  if (!sched || !diffuse_scheduler_set_timesteps (sched, (guint) p.num_inference_steps, error))
    goto out;
  diffuse_scheduler_set_eta (sched, p.eta);
  rng = diffuse_rng_new (p.seed);

  /* 3. prepare_latents: randn([1, C, F, h, w], generator) * init_noise_sigma, one draw */
  const int vsf = diffuse_vae_scale_factor (a->vae);
  const int C = diffuse_unet_motion_in_channels (a->motion);
  const int F = p.num_frames, h = p.height / vsf, w = p.width / vsf;
  const size_t total = (size_t) C * F * h * w;
  latents = diffuse_tensor_new (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 5, (int64_t[]) { 1, C, F, h, w });
  const int batch = cfg ? 2 : 1;
  model_in = diffuse_tensor_new (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 5, (int64_t[]) { batch, C, F, h, w });
  if (!latents || !model_in) {
    op_error (error, "latents");
    goto out;
  }
  float *lat = diffuse_tensor_f32 (latents);
  /* in the pipeline's dtype, as diffusers' randn_tensor (see sd.c) */
  const DiffuseRngDType rdt = _diffuse_pipeline_rng_dtype (udt);
  diffuse_scheduler_set_noise_dtype (sched, rdt);
  _diffuse_pipeline_initial_latents (rng, sched, rdt, lat, total);

  /* 4. denoising loop */
  guint n_ts = 0;
  diffuse_scheduler_timesteps (sched, &n_ts);
  eps = g_new (float, total);
  int step = 0;
  gboolean ok = TRUE;
  while (ok && diffuse_scheduler_position (sched) < n_ts) {
    if (cancelled (&p, error)) {
      ok = FALSE;
      break;
    }
    const float t = (float) diffuse_scheduler_current_timestep (sched);
    float *mi = diffuse_tensor_f32 (model_in);
    memcpy (mi, lat, total * sizeof (float));
    if (cfg)
      memcpy (mi + total, lat, total * sizeof (float));
    diffuse_scheduler_scale_model_input (sched, mi, (size_t) batch * total);
    DiffuseTensor *x = diffuse_to_device (model_in, udev);
    DiffuseTensor *x2 = x ? diffuse_cast (x, udt) : NULL;
    diffuse_tensor_clear (&x);
    DiffuseTensor *out = x2 ? diffuse_unet_motion_forward (a->motion, x2, &t, 1, dembeds, ip_tokens ? &uargs : NULL,
                                                           error) : NULL;
    diffuse_tensor_clear (&x2);
    DiffuseTensor *ho = out ? diffuse_to_host_f32 (out) : NULL;
    diffuse_tensor_clear (&out);
    if (!ho) {
      op_error (error, "UNetMotionModel");
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
    } else {
      memcpy (eps, op, total * sizeof (float));
    }
    diffuse_tensor_unref (ho);
    if (!diffuse_scheduler_step (sched, eps, lat, total, rng, error)) {
      ok = FALSE;
      break;
    }
    step++;
    if (p.on_step && !p.on_step (step, (int) n_ts, p.user_data)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "Generation was cancelled");
      ok = FALSE;
    }
  }
  if (!ok)
    goto out;

  /* 5. decode_latents + postprocess_video */
  {
    const float sf = (float) diffuse_vae_scaling_factor (a->vae);
    for (size_t i = 0; i < total; i++)
      lat[i] = lat[i] / sf;
    images = g_ptr_array_new_with_free_func ((GDestroyNotify) diffuse_image_free);
    if (!decode_frames (a, &p, latents, images, error))
      g_clear_pointer (&images, g_ptr_array_unref);
  }

out:
  g_mutex_unlock (&a->lock);
  g_free (eps);
  diffuse_tensor_clear (&cond);
  diffuse_tensor_clear (&uncond);
  diffuse_tensor_clear (&embeds);
  diffuse_tensor_clear (&dembeds);
  diffuse_tensor_clear (&latents);
  diffuse_tensor_clear (&model_in);
  diffuse_tensor_clear (&ip_tokens);
  if (merged)
    diffuse_config_unref (merged);
  if (sched)
    diffuse_scheduler_free (sched);
  if (rng)
    diffuse_rng_free (rng);
  return images;
}

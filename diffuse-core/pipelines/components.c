/* gst-diffuse — building the models of a pipeline's components, once per
 * component, for every task pipeline (see pipelines-private.h). */
#include "pipelines-private.h"
#include <diffuse/error.h>

/* the component's UNet over weights w (its own, or LoRA-merged ones) */
static DiffuseUNet *
build_unet_from (DiffuseComponent *c, DiffuseWeights *w, GError **error)
{
  DiffuseUNetParams p;
  diffuse_unet_default_params (&p);
  p.dtype = diffuse_component_dtype (c);
  p.device = diffuse_component_device (c);
  p.component = diffuse_component_name (c);
  return diffuse_unet_new (diffuse_component_config (c), w, &p, error);
}

static gpointer
build_unet (DiffuseComponent *c, gpointer user_data, GError **error)
{
  return build_unet_from (c, diffuse_component_weights (c), error);
}

static gpointer
build_vae (DiffuseComponent *c, gpointer user_data, GError **error)
{
  return diffuse_vae_new (diffuse_component_config (c), diffuse_component_weights (c), diffuse_component_device (c),
                          diffuse_component_dtype (c), error);
}

static gpointer
build_text (DiffuseComponent *c, gpointer user_data, GError **error)
{
  return diffuse_clip_text_new (diffuse_component_config (c), diffuse_component_weights (c),
                                diffuse_component_device (c), diffuse_component_dtype (c), error);
}

static gpointer
build_tokenizer (DiffuseComponent *c, gpointer user_data, GError **error)
{
  return diffuse_clip_tokenizer_load (diffuse_component_folder (c), error);
}

static gpointer
build_safety_checker (DiffuseComponent *c, gpointer user_data, GError **error)
{
  return diffuse_safety_checker_new (diffuse_component_config (c), diffuse_component_weights (c),
                                     diffuse_component_device (c), diffuse_component_dtype (c), error);
}

static gpointer
build_image_processor (DiffuseComponent *c, gpointer user_data, GError **error)
{
  return diffuse_clip_image_processor_new (diffuse_component_config (c), error);
}

gpointer
_diffuse_pipeline_object (DiffusePipelineModel *pm, const char *name, const char *want_class, DiffuseComponentBuildFunc build,
                  GDestroyNotify destroy, GError **error)
{
  DiffuseComponent *c = diffuse_pipeline_model_get (pm, name);
  if (!c) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "%s: the %s has no %s",
                 diffuse_pipeline_model_folder (pm), diffuse_pipeline_model_class (pm), name);
    return NULL;
  }
  if (want_class && !g_str_has_prefix (diffuse_component_class (c), want_class)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: component '%s' is a %s; expected a %s",
                 diffuse_pipeline_model_folder (pm), name, diffuse_component_class (c), want_class);
    return NULL;
  }
  return diffuse_component_get_object (c, "model", build, NULL, destroy, error);
}

DiffuseUNet *
_diffuse_pipeline_unet (DiffusePipelineModel *pm, GError **error)
{
  return _diffuse_pipeline_object (pm, "unet", "UNet2DConditionModel", build_unet, (GDestroyNotify) diffuse_unet_unref,
                                   error);
}

DiffuseVae *
_diffuse_pipeline_vae (DiffusePipelineModel *pm, GError **error)
{
  return _diffuse_pipeline_object (pm, "vae", "AutoencoderKL", build_vae, (GDestroyNotify) diffuse_vae_unref, error);
}

DiffuseClipText *
_diffuse_pipeline_text_encoder (DiffusePipelineModel *pm, GError **error)
{
  return _diffuse_pipeline_object (pm, "text_encoder", "CLIPTextModel", build_text,
                                   (GDestroyNotify) diffuse_clip_text_unref, error);
}

DiffuseClipText *
_diffuse_pipeline_text_encoder_2 (DiffusePipelineModel *pm, GError **error)
{
  return _diffuse_pipeline_object (pm, "text_encoder_2", "CLIPTextModel", build_text,
                                   (GDestroyNotify) diffuse_clip_text_unref, error);
}

DiffuseClipTokenizer *
_diffuse_pipeline_tokenizer_2 (DiffusePipelineModel *pm, GError **error)
{
  return _diffuse_pipeline_object (pm, "tokenizer_2", "CLIPTokenizer", build_tokenizer,
                                   (GDestroyNotify) diffuse_clip_tokenizer_unref, error);
}

DiffuseClipTokenizer *
_diffuse_pipeline_tokenizer (DiffusePipelineModel *pm, GError **error)
{
  return _diffuse_pipeline_object (pm, "tokenizer", "CLIPTokenizer", build_tokenizer,
                                   (GDestroyNotify) diffuse_clip_tokenizer_unref, error);
}

DiffuseSafetyChecker *
_diffuse_pipeline_safety_checker (DiffusePipelineModel *pm, GError **error)
{
  return _diffuse_pipeline_object (pm, "safety_checker", "StableDiffusionSafetyChecker", build_safety_checker,
                                   (GDestroyNotify) diffuse_safety_checker_unref, error);
}

DiffuseClipImageProcessor *
_diffuse_pipeline_feature_extractor (DiffusePipelineModel *pm, GError **error)
{
  /* CLIPImageProcessor, or CLIPFeatureExtractor in older checkpoints */
  return _diffuse_pipeline_object (pm, "feature_extractor", "CLIP", build_image_processor,
                                   (GDestroyNotify) diffuse_clip_image_processor_free, error);
}

/* [1, L, D] embeddings of one prompt as diffusers' encode_prompt makes them:
 * padded to model_max_length, clip_skip applied, truncation reported. */
DiffuseTensor *
_diffuse_pipeline_encode_prompt (DiffuseClipTokenizer *tokenizer, DiffuseClipText *text_encoder, const char *text,
                                 int clip_skip, GError **error)
{
  int max = diffuse_clip_tokenizer_model_max_length (tokenizer);
  int32_t *ids = g_new0 (int32_t, max);
  int n = diffuse_clip_tokenizer_encode (tokenizer, text ? text : "", TRUE, ids, max, error);
  if (n < 0) {
    g_free (ids);
    return NULL;
  }
  char *cut = diffuse_clip_tokenizer_truncated_text (tokenizer, text ? text : "");
  if (cut && *cut)
    g_warning ("The following part of your input was truncated because CLIP can only handle sequences up to %d "
               "tokens: %s", max, cut);
  g_free (cut);
  DiffuseClipTextParams p;
  diffuse_clip_text_default_params (&p);
  p.clip_skip = clip_skip;
  DiffuseClipTextOutput out = { 0 };
  gboolean ok = diffuse_clip_text_forward (text_encoder, ids, 1, n, &p, &out, error);
  g_free (ids);
  if (!ok)
    return NULL;
  DiffuseTensor *e = diffuse_tensor_ref (out.prompt_embeds);
  diffuse_clip_text_output_clear (&out);
  return e;
}

gboolean
_diffuse_pipeline_place (DiffuseTensor **t, DiffuseDevice *dev, DiffuseDType dt)
{
  if (!*t)
    return FALSE;
  DiffuseTensor *d = diffuse_to_device (*t, dev);
  DiffuseTensor *c = d ? diffuse_cast (d, dt) : NULL;
  diffuse_tensor_clear (&d);
  diffuse_tensor_clear (t);
  *t = c;
  return c != NULL;
}

DiffuseRngDType
_diffuse_pipeline_rng_dtype (DiffuseDType dt)
{
  return dt == DIFFUSE_DTYPE_F16 ? DIFFUSE_RNG_F16 : dt == DIFFUSE_DTYPE_BF16 ? DIFFUSE_RNG_BF16 : DIFFUSE_RNG_F32;
}

void
_diffuse_pipeline_initial_latents (DiffuseRng *rng, DiffuseScheduler *sched, DiffuseRngDType rdt, float *lat,
                                   size_t n)
{
  diffuse_rng_randn_as (rng, rdt, lat, n);
  const float sigma = diffuse_scheduler_init_noise_sigma (sched);
  for (size_t i = 0; i < n; i++)
    lat[i] = lat[i] * sigma;
  diffuse_rng_round (rdt, lat, n);
}

/* ---- LoRA rebuilds: a component's model with adapters merged (lora.c) ------ */

DiffuseUNet *
_diffuse_pipeline_unet_with_lora (DiffusePipelineModel *pm, DiffuseLoraAdapter *const *ads, const double *ws, int n,
                                  DiffuseLoraFilter filter, GError **error)
{
  DiffuseComponent *c = diffuse_pipeline_model_get (pm, "unet");
  DiffuseWeights *w = _diffuse_lora_merge (diffuse_component_weights (c), ads, ws, n, DIFFUSE_LORA_UNET, filter,
                                           error);
  if (!w)
    return NULL;
  DiffuseUNet *u = build_unet_from (c, w, error);
  diffuse_weights_unref (w);
  return u;
}

DiffuseClipText *
_diffuse_pipeline_text_encoder_with_lora (DiffusePipelineModel *pm, DiffuseLoraTarget target,
                                          DiffuseLoraAdapter *const *ads, const double *ws, int n, GError **error)
{
  const char *name = target == DIFFUSE_LORA_TEXT_ENCODER_2 ? "text_encoder_2" : "text_encoder";
  DiffuseComponent *c = diffuse_pipeline_model_get (pm, name);
  if (!c) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "LoRA: the adapters have %s modules but %s has no %s", name, diffuse_pipeline_model_folder (pm),
                 name);
    return NULL;
  }
  DiffuseWeights *w = _diffuse_lora_merge (diffuse_component_weights (c), ads, ws, n, target, DIFFUSE_LORA_ALL,
                                           error);
  if (!w)
    return NULL;
  DiffuseClipText *t = diffuse_clip_text_new (diffuse_component_config (c), w, diffuse_component_device (c),
                                              diffuse_component_dtype (c), error);
  diffuse_weights_unref (w);
  return t;
}

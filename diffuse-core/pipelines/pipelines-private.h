/* Private to the pipelines layer: the model objects every task pipeline
 * builds from its components.  Each is made once per component (under the
 * key "model") and shared by text2img, img2img and animate. */
#pragma once

#include <diffuse/pipeline.h>
#include <diffuse/unet.h>
#include <diffuse/vae.h>
#include <diffuse/clip_text.h>
#include <diffuse/safety_checker.h>
#include <diffuse/sd.h>
#include <diffuse/clip_tokenizer.h>
#include <diffuse/rng.h>
#include <diffuse/scheduler.h>

G_BEGIN_DECLS

/* The object of component `name` of pm (borrowed; NULL + error when the
 * component is absent or its class does not start with want_class). */
gpointer _diffuse_pipeline_object (DiffusePipelineModel *pm, const char *name, const char *want_class,
                                   DiffuseComponentBuildFunc build, GDestroyNotify destroy, GError **error);

DiffuseUNet *_diffuse_pipeline_unet (DiffusePipelineModel *pm, GError **error);
DiffuseVae *_diffuse_pipeline_vae (DiffusePipelineModel *pm, GError **error);
DiffuseClipText *_diffuse_pipeline_text_encoder (DiffusePipelineModel *pm, GError **error);
DiffuseClipTokenizer *_diffuse_pipeline_tokenizer (DiffusePipelineModel *pm, GError **error);
/* SDXL's second text encoder (CLIPTextModelWithProjection) and tokenizer */
DiffuseClipText *_diffuse_pipeline_text_encoder_2 (DiffusePipelineModel *pm, GError **error);
DiffuseClipTokenizer *_diffuse_pipeline_tokenizer_2 (DiffusePipelineModel *pm, GError **error);
/* LoRA adapters (lora.c) */
typedef struct _DiffuseLoraAdapter DiffuseLoraAdapter;
typedef enum { DIFFUSE_LORA_UNET, DIFFUSE_LORA_TEXT_ENCODER, DIFFUSE_LORA_TEXT_ENCODER_2, DIFFUSE_LORA_N_TARGETS }
  DiffuseLoraTarget;
/* path: a .safetensors file, or a folder with pytorch_lora_weights.safetensors */
DiffuseLoraAdapter *_diffuse_lora_adapter_load (const char *path, const char *name, GError **error);
void _diffuse_lora_adapter_free (DiffuseLoraAdapter *a);
const char *_diffuse_lora_adapter_name (DiffuseLoraAdapter *a);
gboolean _diffuse_lora_adapter_has (DiffuseLoraAdapter *a, DiffuseLoraTarget target);
/* Which of the UNet's modules a merge takes: all, all but the motion modules
 * (an AnimateDiff UNet's 2-D part), or only those (the MotionAdapter's). */
typedef enum { DIFFUSE_LORA_ALL, DIFFUSE_LORA_NO_MOTION, DIFFUSE_LORA_ONLY_MOTION } DiffuseLoraFilter;
/* base with the n adapters (weights[i] each) merged into the target's modules */
DiffuseWeights *_diffuse_lora_merge (DiffuseWeights *base, DiffuseLoraAdapter *const *adapters, const double *weights,
                                     int n, DiffuseLoraTarget target, DiffuseLoraFilter filter, GError **error);
/* any module of the target passing filter */
gboolean _diffuse_lora_adapter_has_filtered (DiffuseLoraAdapter *a, DiffuseLoraTarget target,
                                             DiffuseLoraFilter filter);

/* The unet / text_encoder component's model with the adapters merged (components.c) */
DiffuseUNet *_diffuse_pipeline_unet_with_lora (DiffusePipelineModel *pm, DiffuseLoraAdapter *const *ads,
                                               const double *ws, int n, DiffuseLoraFilter filter, GError **error);
/* target DIFFUSE_LORA_TEXT_ENCODER or _2: the text_encoder / text_encoder_2 component */
DiffuseClipText *_diffuse_pipeline_text_encoder_with_lora (DiffusePipelineModel *pm, DiffuseLoraTarget target,
                                                           DiffuseLoraAdapter *const *ads,
                                                           const double *ws, int n, GError **error);

/* A pipeline's adapters, as diffusers' load_lora_weights / set_adapters /
 * unload_lora_weights keep them; apply (owner, active, weights * scale, n)
 * rebuilds the owner's models with them merged (n = 0: the plain ones) and
 * leaves everything as it was when it fails. */
typedef gboolean (*DiffuseLoraApplyFunc) (gpointer owner, DiffuseLoraAdapter *const *active, const double *weights,
                                          int n, GError **error);
typedef struct {
  GPtrArray *adapters;     /* DiffuseLoraAdapter*, owned, in load order */
  GPtrArray *active;       /* borrowed, set_adapters order */
  GArray *weights;         /* double, their weights */
  double merged_scale;     /* the lora_scale the models were merged with */
  DiffuseLoraApplyFunc apply;
  gpointer owner;
} DiffuseLoraSet;

void _diffuse_lora_set_init (DiffuseLoraSet *s, DiffuseLoraApplyFunc apply, gpointer owner);
void _diffuse_lora_set_clear (DiffuseLoraSet *s);
gboolean _diffuse_lora_set_load (DiffuseLoraSet *s, const char *path, const char *adapter_name, GError **error);
gboolean _diffuse_lora_set_activate (DiffuseLoraSet *s, const char *const *names, const double *weights, int n,
                                     GError **error);
void _diffuse_lora_set_unload (DiffuseLoraSet *s);
/* merges again when scale differs from the last merge's */
gboolean _diffuse_lora_set_rescale (DiffuseLoraSet *s, double scale, GError **error);
char **_diffuse_lora_set_names (DiffuseLoraSet *s, gboolean active_only);
gboolean _diffuse_lora_set_load_spec (DiffuseLoraSet *s, const char *spec, GError **error);

/* IP-Adapter (ip_adapter.c) */
typedef struct _DiffuseIpAdapter DiffuseIpAdapter;
/* ref: a local folder or a Hub repo id; <subfolder>/<weight_name> and
 * <subfolder>/image_encoder/{config.json,model.safetensors}; weights in
 * dtype on dev; images preprocessed by pm's feature_extractor when it has
 * one (borrowed: the adapter must not outlive pm), else a
 * CLIPImageProcessor (image_size) of its own, as diffusers */
DiffuseIpAdapter *_diffuse_ip_adapter_load (DiffusePipelineModel *pm, const char *ref, const char *subfolder,
                                            const char *weight_name, DiffuseDevice *dev, DiffuseDType dtype,
                                            GError **error);
void _diffuse_ip_adapter_free (DiffuseIpAdapter *ip);
void _diffuse_ip_adapter_set_scale (DiffuseIpAdapter *ip, float scale);
/* image tokens [(cfg ? 2 : 1) * n, T, D]: unconditional (zero embeds) first */
DiffuseTensor *_diffuse_ip_adapter_tokens (DiffuseIpAdapter *ip, const DiffuseImage *image, int n, gboolean cfg,
                                           GError **error);
void _diffuse_ip_adapter_args (DiffuseIpAdapter *ip, DiffuseTensor *tokens, DiffuseUNetForwardArgs *args);

DiffuseSafetyChecker *_diffuse_pipeline_safety_checker (DiffusePipelineModel *pm, GError **error);
DiffuseClipImageProcessor *_diffuse_pipeline_feature_extractor (DiffusePipelineModel *pm, GError **error);

/* [1, L, D] prompt embeddings (diffusers' encode_prompt for one prompt; clip_skip 0 = none). */
DiffuseTensor *_diffuse_pipeline_encode_prompt (DiffuseClipTokenizer *tokenizer, DiffuseClipText *text_encoder,
                                                const char *text, int clip_skip, GError **error);

/* *t moved to dev and cast to dt (in place; the old reference is dropped).
 * Caller-supplied embeddings live wherever the caller made them (diffusers'
 * prompt_embeds.to(device, dtype)).  FALSE (and *t NULL) on failure. */
gboolean _diffuse_pipeline_place (DiffuseTensor **t, DiffuseDevice *dev, DiffuseDType dt);

/* The dtype diffusers' randn_tensor draws in for tensors of dtype dt. */
DiffuseRngDType _diffuse_pipeline_rng_dtype (DiffuseDType dt);

/* prepare_latents of text2img / AnimateDiff: randn_tensor (n values, dtype
 * rdt) * init_noise_sigma, the product rounded to rdt (a tensor of that dtype
 * in diffusers). */
void _diffuse_pipeline_initial_latents (DiffuseRng *rng, DiffuseScheduler *sched, DiffuseRngDType rdt, float *lat,
                                        size_t n);

G_END_DECLS

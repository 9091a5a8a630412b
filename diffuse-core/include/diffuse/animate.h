/* gst-diffuse — the AnimateDiff pipeline: prompt -> a clip of frames, equal
 * to diffusers' AnimateDiffPipeline (pipelines/animatediff/
 * pipeline_animatediff.py) for the same seed.
 *
 * A DiffuseAnimate is built from a DiffusePipelineModel of class
 * AnimateDiffPipeline (vae, text_encoder, tokenizer, unet, motion_adapter,
 * scheduler).  diffuse_animate_new_from_pipe () makes one from an already
 * loaded Stable Diffusion pipeline model plus a MotionAdapter component
 * (diffusers' AnimateDiffPipeline.from_pipe (sd_pipe, motion_adapter=...)):
 * the SD components are shared through the component cache, so the
 * resident bytes grow by the adapter's weights only, and the motion UNet
 * runs the very DiffuseUNet that text2img uses.
 *
 * A folder written by diffusers' AnimateDiffPipeline.save_pretrained () (unet/
 * a UNetMotionModel, motion_adapter/ next to it) loads with
 * diffuse_pipeline_model_load () and runs with diffuse_animate_new (): the
 * unet's own motion modules are used, motion_adapter/ is not (as
 * AnimateDiffPipeline.from_pretrained does).  diffuse_pipeline_model_save ()
 * writes such a model back unchanged.
 *
 * Each generate() call has its own scheduler state and RNG; calls on one
 * DiffuseAnimate are serialised internally. */
#pragma once

#include <diffuse/pipeline.h>
#include <diffuse/sd.h>
#include <diffuse/motion.h>

G_BEGIN_DECLS

typedef struct _DiffuseAnimate DiffuseAnimate;

/* A frame was decoded (index is 0-based, in clip order; frames arrive a
 * decode chunk at a time).  The frame belongs to the result array: copy it
 * to keep it past generate().  Return FALSE to cancel (generate() then fails
 * with DIFFUSE_ERROR_CANCELLED). */
typedef gboolean (*DiffuseFrameFunc) (int index, int total, const DiffuseImage *frame, gpointer user_data);

typedef struct {
  const char *prompt;
  const char *negative_prompt;        /* NULL or "": the empty prompt's embedding */
  int width, height;                  /* 0: unet sample_size * vae scale factor; multiples of 8 */
  int num_frames;                     /* 16; at most the adapter's motion_max_seq_length */
  int num_inference_steps;            /* 50 */
  float guidance_scale;               /* 7.5; <= 1 runs no unconditional pass */
  guint64 seed;                       /* torch.Generator("cpu").manual_seed(seed) */
  int clip_skip;                      /* 0 = none */
  float eta;                          /* DDIM eta, 0 */
  const char *scheduler;              /* a scheduler class name, NULL = the pipeline's */
  DiffuseConfig *scheduler_config;    /* replaces the pipeline's scheduler config, NULL = keep */
  /* Keys set on top of that config, as Scheduler.from_config (config, **overrides);
   * the seed's example: {"beta_schedule": "linear", "clip_sample": false,
   * "timestep_spacing": "linspace", "steps_offset": 1} with DDIMScheduler. */
  DiffuseConfig *scheduler_overrides;
  DiffuseTensor *prompt_embeds;       /* optional, [1, 77, D]: replaces prompt */
  DiffuseTensor *negative_prompt_embeds;
  int decode_chunk_size;              /* frames per VAE decode call, 16 (0 = default) */
  float lora_scale;                   /* 1: cross_attention_kwargs={"scale": s} for the LoRA adapters */
  /* IP-Adapter (diffuse_animate_load_ip_adapter): the image prompt, any size;
   * its tokens are repeated over the frames as the text is */
  const DiffuseImage *ip_adapter_image;
  DiffuseStepFunc on_step;            /* after each denoising step */
  DiffuseFrameFunc on_frame;          /* after each decoded frame */
  gpointer user_data;                 /* for both callbacks */
  GCancellable *cancellable;
} DiffuseAnimateParams;

void diffuse_animate_default_params (DiffuseAnimateParams *p);

/* pm: an AnimateDiffPipeline model.  As diffusers' AnimateDiffPipeline.__init__:
 *   - unet a UNet2DConditionModel: UNetMotionModel.from_unet2d (unet,
 *     motion_adapter) (the pipeline must have a motion_adapter);
 *   - unet a UNetMotionModel (what AnimateDiffPipeline.save_pretrained
 *     writes): the unet's own motion modules (see motion.h,
 *     diffuse_unet_motion_new_from_weights); the motion_adapter component,
 *     loaded with the folder, is not used (nor needed) then.  The model is
 *     built once per unet component and shared by every DiffuseAnimate on it.
 * Errors: DIFFUSE_ERROR_NOT_FOUND (a component is missing),
 * DIFFUSE_ERROR_UNSUPPORTED (a component of another class, a PIA-style
 * adapter with conv_in_channels), DIFFUSE_ERROR_CONFIG (the adapter does not
 * fit the UNet, a UNetMotionModel config that does not fit its weights), or
 * a model's load error. */
DiffuseAnimate *diffuse_animate_new (DiffusePipelineModel *pm, GError **error);
/* TRUE when pm's unet component is a UNetMotionModel (so a motion_adapter
 * given to it, or to from_pipe, is not used). */
gboolean diffuse_animate_model_has_motion_unet (DiffusePipelineModel *pm);
/* from_pipe: diffuse_pipeline_model_derive (sd_pm, "AnimateDiffPipeline",
 * {"motion_adapter": motion_adapter}) then diffuse_animate_new ().  As in
 * diffusers, when sd_pm's unet is already a UNetMotionModel (sd_pm is a
 * saved AnimateDiff pipeline) the new adapter is registered but unused. */
DiffuseAnimate *diffuse_animate_new_from_pipe (DiffusePipelineModel *sd_pm, DiffuseComponent *motion_adapter,
                                               GError **error);
/* Loads a MotionAdapter (a folder or a Hub repo id, e.g.
 * "guoyww/animatediff-motion-adapter-v1-5-2") into pm's component cache as
 * component "motion_adapter".  params NULL: defaults with the dtype and
 * device of pm's unet (the adapter must match them). */
DiffuseComponent *diffuse_animate_load_adapter (DiffusePipelineModel *pm, const char *ref,
                                                const DiffuseLoadParams *params, GError **error);

DiffuseAnimate *diffuse_animate_ref (DiffuseAnimate *a);
/* LoRA, as pipe_animate.load_lora_weights / set_adapters / unload_lora_weights
 * (sd.h's diffuse_sd_load_lora_weights for the formats): modules inside
 * "motion_modules" (a motion LoRA) go to the motion adapter, the others to
 * the 2-D UNet, "text_encoder." ones to the text encoder; merged into this
 * pipeline's own copies.  A pipeline whose unet is a saved UNetMotionModel:
 * DIFFUSE_ERROR_UNSUPPORTED. */
gboolean diffuse_animate_load_lora_weights (DiffuseAnimate *a, const char *path, const char *adapter_name,
                                            GError **error);
gboolean diffuse_animate_set_adapters (DiffuseAnimate *a, const char *const *names, const double *weights, int n,
                                      GError **error);
void diffuse_animate_unload_lora_weights (DiffuseAnimate *a);
gboolean diffuse_animate_load_lora_spec (DiffuseAnimate *a, const char *spec, GError **error);

/* IP-Adapter on AnimateDiff, as the guide's pipe_animate.load_ip_adapter
 * ("h94/IP-Adapter", subfolder="models", weight_name=...) /
 * set_ip_adapter_scale / unload_ip_adapter: the same adapters as
 * diffuse_sd_load_ip_adapter (sd.h), applied to the spatial cross-attention
 * layers of the motion UNet (not the motion modules), with LoRA adapters
 * too.  While one is loaded, generate() needs params->ip_adapter_image. */
gboolean diffuse_animate_load_ip_adapter (DiffuseAnimate *a, const char *ref, const char *subfolder,
                                          const char *weight_name, GError **error);
void diffuse_animate_set_ip_adapter_scale (DiffuseAnimate *a, float scale);
void diffuse_animate_unload_ip_adapter (DiffuseAnimate *a);
gboolean diffuse_animate_has_ip_adapter (DiffuseAnimate *a);
void diffuse_animate_unref (DiffuseAnimate *a);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (DiffuseAnimate, diffuse_animate_unref)

DiffusePipelineModel *diffuse_animate_get_model (DiffuseAnimate *a);
DiffuseUNetMotion *diffuse_animate_get_unet_motion (DiffuseAnimate *a);   /* borrowed */
/* unet sample_size * vae scale factor */
void diffuse_animate_default_size (DiffuseAnimate *a, int *width, int *height);
/* The most frames one clip may have (the adapter's motion_max_seq_length). */
int diffuse_animate_max_frames (DiffuseAnimate *a);
const char *diffuse_animate_scheduler_class (DiffuseAnimate *a);
const char *const *diffuse_animate_compatible_schedulers (DiffuseAnimate *a);

/* Generates one clip of params->num_frames frames into a new array of
 * DiffuseImage* (RGB float in [0, 1], free with g_ptr_array_unref). */
GPtrArray *diffuse_animate_generate (DiffuseAnimate *a, const DiffuseAnimateParams *params, GError **error);

G_END_DECLS

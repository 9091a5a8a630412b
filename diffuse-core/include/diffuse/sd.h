/* gst-diffuse — the Stable Diffusion task pipelines: text-to-image and
 * image-to-image, equal to diffusers' StableDiffusionPipeline and
 * StableDiffusionImg2ImgPipeline for the same seed.
 *
 * A DiffuseSD is built from a DiffusePipelineModel (one loaded checkpoint;
 * its models are shared through the component cache, so a text2img and an
 * img2img DiffuseSD over one checkpoint hold one copy of the weights).  The
 * models are immutable; each generate() call creates its own scheduler
 * state, so one DiffuseSD may serve several threads one call at a time
 * each (calls are serialised internally). */
#pragma once

#include <diffuse/pipeline.h>

G_BEGIN_DECLS

typedef struct _DiffuseSD DiffuseSD;

typedef enum {
  DIFFUSE_SD_TEXT2IMG,
  DIFFUSE_SD_IMG2IMG,
} DiffuseSDTask;

/* One denoising step finished (step is 1-based).  Return FALSE to cancel:
 * generate() then fails with DIFFUSE_ERROR_CANCELLED. */
typedef gboolean (*DiffuseStepFunc) (int step, int total, gpointer user_data);

/* An RGB image, values in [0, 1], height x width x 3, row-major (diffusers'
 * output_type="np" for one image). */
typedef struct {
  int width, height;
  float *pixels;
  /* has_nsfw_concept: the pipeline's safety checker flagged the image, and
   * its pixels are black (0), as diffusers returns it.  FALSE when the
   * pipeline has no safety checker. */
  gboolean nsfw;
} DiffuseImage;

void diffuse_image_free (DiffuseImage *img);
/* 8-bit RGB as diffusers' numpy_to_pil: round(x * 255) after clamping. */
void diffuse_image_to_rgb8 (const DiffuseImage *img, guint8 *dst, int stride);
/* An image from 8-bit RGB (for img2img input). */
DiffuseImage *diffuse_image_from_rgb8 (const guint8 *src, int width, int height, int stride);
/* A PNG file (8-bit grey, grey+alpha, RGB or RGBA, not interlaced; alpha is
 * dropped as PIL's convert ("RGB") does).  DIFFUSE_ERROR_CORRUPT naming the
 * file for anything else or a damaged file; a GFileError when unreadable. */
DiffuseImage *diffuse_image_load_png (const char *path, GError **error);

typedef struct {
  const char *prompt;
  const char *negative_prompt;     /* NULL or "": the unconditional (empty prompt) embedding */
  int width, height;               /* 0: unet sample_size * vae scale factor; multiples of 8 */
  int num_inference_steps;         /* 50 */
  float guidance_scale;            /* 7.5; <= 1 runs no unconditional pass */
  guint64 seed;                    /* torch.Generator("cpu").manual_seed(seed) */
  int num_images;                  /* num_images_per_prompt, 1 */
  int clip_skip;                   /* 0 = none */
  float guidance_rescale;          /* 0 */
  float lora_scale;                /* 1: diffusers' cross_attention_kwargs={"scale": s}, multiplying every
                                    * active LoRA adapter's weight (the merge is redone when it changes) */
  float sag_scale;                 /* self-attention guidance (StableDiffusionSAGPipeline's sag_scale;
                                    * its default is 0.75), 0 = off.  Needs a scheduler with integer
                                    * timesteps (DDIM, PNDM, DDPM, ...) and a mid block with attention. */
  float eta;                       /* DDIM eta, 0 */
  const char *scheduler;           /* a compatible scheduler class name, NULL = the checkpoint's */
  DiffuseConfig *scheduler_config; /* replaces the checkpoint's scheduler config (diffusers'
                                    * from_config(config, use_karras_sigmas=True, ...)), NULL = keep */
  DiffuseTensor *prompt_embeds;    /* optional, [n, 77, D]: replaces prompt */
  DiffuseTensor *negative_prompt_embeds;
  /* Stable Diffusion XL, with prompt_embeds / negative_prompt_embeds: the
   * pooled, projected embeddings [n, P] of text_encoder_2 (required with
   * them, as diffusers; ignored by other pipelines) */
  DiffuseTensor *pooled_prompt_embeds;
  DiffuseTensor *negative_pooled_prompt_embeds;
  /* an SDXL refiner (requires_aesthetics_score): the last time id, 6 and
   * 2.5 by default as diffusers' */
  float aesthetic_score, negative_aesthetic_score;
  /* IP-Adapter (diffuse_sd_load_ip_adapter): the image prompt, any size */
  const DiffuseImage *ip_adapter_image;
  /* img2img */
  const DiffuseImage *image;       /* the input, already at width x height */
  float strength;                  /* 0.8 */
  /* img2img from latents instead of an image ([1 or n, C, h, w], e.g. another
   * pipeline's diffuse_sd_generate_latents, already scaled): no VAE encode;
   * width x height follow from them */
  DiffuseTensor *image_latents;
  /* SDXL's ensemble of experts (any pipeline, as diffusers' SDXL ones):
   * denoising_end in (0, 1) stops after the timesteps >= round (T - end * T)
   * (T = num_train_timesteps); denoising_start in (0, 1), img2img, starts at
   * the timesteps < round (T - start * T) (one more for a 2nd-order
   * scheduler when even), ignoring strength and adding no noise.  0 = off. */
  float denoising_end, denoising_start;
  DiffuseStepFunc on_step;
  gpointer user_data;
  GCancellable *cancellable;
} DiffuseSDParams;

void diffuse_sd_default_params (DiffuseSDParams *p);

/* Where the time of one generate() went (microseconds), for benchmarks. */
typedef struct {
  gint64 encode_us;       /* tokenizer + text encoder */
  gint64 prepare_us;      /* scheduler setup, initial latents (img2img: VAE encode) */
  gint64 unet_us;         /* UNet forwards, including moving their inputs/outputs */
  gint64 step_other_us;   /* the rest of the loop: scale_model_input, CFG combine, scheduler step */
  gint64 decode_us;       /* VAE decode and conversion to images */
  gint64 safety_us;       /* the safety checker (feature extractor + CLIP vision model) */
  int n_unet_calls;
} DiffuseSDTimings;

/* Like diffuse_sd_generate, filling *timings. */
GPtrArray *diffuse_sd_generate_timed (DiffuseSD *sd, const DiffuseSDParams *params, DiffuseSDTimings *timings,
                                      GError **error);

/* A pipeline whose model has a safety_checker component runs it on every
 * generated image, as diffusers' run_safety_checker (DiffuseImage.nsfw);
 * that needs the feature_extractor component too (DIFFUSE_ERROR_NOT_FOUND
 * otherwise).  Load with the override safety_checker = none to turn it off
 * (the loader warns when the model asks for it: requires_safety_checker). */
DiffuseSD *diffuse_sd_new (DiffusePipelineModel *pm, DiffuseSDTask task, GError **error);
/* TRUE when generate() runs a safety checker. */
gboolean diffuse_sd_has_safety_checker (DiffuseSD *sd);

/* LoRA adapters, as diffusers' pipe.load_lora_weights / set_adapters /
 * unload_lora_weights.  path: a .safetensors file or a torch.save .bin/.pt
 * one (read without executing it, as torch.load(weights_only=True)), a folder
 * holding pytorch_lora_weights.safetensors (else pytorch_lora_weights.bin),
 * or a Hub repo id "org/name" (that file, else the repo's one top-level
 * .safetensors, else pytorch_lora_weights.bin) or "org/name/file.safetensors"
 * (weight_name), fetched into the Hub cache under the same environment as
 * models (HF_ENDPOINT, HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE); diffusers'
 * (peft) format or kohya-ss' ("lora_unet_..."/"lora_te_..." with
 * lora_down/lora_up/alpha), adapting
 * the UNet and/or the text encoder; adapter_name NULL = "default_<n>".  The
 * adapter just loaded becomes the only active one (weight 1), as in
 * diffusers.  The active adapters are merged into this pipeline's own copy
 * of the adapted modules (fused; the components shared with other pipelines
 * are not modified).  Errors: DIFFUSE_ERROR_NOT_FOUND (no file),
 * DIFFUSE_ERROR_UNSUPPORTED (DoRA, LyCORIS, .ckpt files), DIFFUSE_ERROR_CONFIG
 * (a module the model does not have or of another shape),
 * DIFFUSE_ERROR_INVALID_ARGUMENT (a name in use / unknown). */
gboolean diffuse_sd_load_lora_weights (DiffuseSD *sd, const char *path, const char *adapter_name, GError **error);
/* names[n] active with weights[n] (NULL: 1 each); n = 0 disables every adapter. */
gboolean diffuse_sd_set_adapters (DiffuseSD *sd, const char *const *names, const double *weights, int n,
                                  GError **error);
void diffuse_sd_unload_lora_weights (DiffuseSD *sd);
/* IP-Adapter, as diffusers' pipe.load_ip_adapter (ref, subfolder,
 * weight_name) / set_ip_adapter_scale / unload_ip_adapter: ref a local
 * folder or a Hub repo id ("h94/IP-Adapter", "models",
 * "ip-adapter_sd15.safetensors", or the torch.save file "ip-adapter_sd15.bin",
 * read without executing it as torch.load(weights_only=True), its nested
 * {"image_proj": ..., "ip_adapter": ...} named as in the safetensors file);
 * the image encoder from <subfolder>/image_encoder (model.safetensors, else
 * pytorch_model.bin, as transformers).  The original
 * IP-Adapter's image projection (Plus / Face variants:
 * DIFFUSE_ERROR_UNSUPPORTED).
 * While one is loaded, generate() needs params->ip_adapter_image.  One at a
 * time (loading another replaces it). */
gboolean diffuse_sd_load_ip_adapter (DiffuseSD *sd, const char *ref, const char *subfolder, const char *weight_name,
                                     GError **error);
void diffuse_sd_set_ip_adapter_scale (DiffuseSD *sd, float scale);
void diffuse_sd_unload_ip_adapter (DiffuseSD *sd);
gboolean diffuse_sd_has_ip_adapter (DiffuseSD *sd);

/* "PATH[:WEIGHT][,PATH[:WEIGHT]...]" (the CLI's --lora, the elements'
 * "lora"): loads each (named after its file, or its folder for
 * pytorch_lora_weights.safetensors) and makes them all active with their
 * weights (1 when none is given). */
gboolean diffuse_sd_load_lora_spec (DiffuseSD *sd, const char *spec, GError **error);
/* NULL-terminated (g_strfreev) */
char **diffuse_sd_get_active_adapters (DiffuseSD *sd);
char **diffuse_sd_list_adapters (DiffuseSD *sd);
DiffuseSD *diffuse_sd_ref (DiffuseSD *sd);
void diffuse_sd_unref (DiffuseSD *sd);

DiffusePipelineModel *diffuse_sd_get_model (DiffuseSD *sd);
DiffuseSDTask diffuse_sd_get_task (DiffuseSD *sd);
/* The default output size (unet sample_size * vae scale factor). */
void diffuse_sd_default_size (DiffuseSD *sd, int *width, int *height);
/* The scheduler class used when params->scheduler is NULL. */
const char *diffuse_sd_scheduler_class (DiffuseSD *sd);
/* NULL-terminated scheduler class names the checkpoint's scheduler may be swapped for. */
const char *const *diffuse_sd_compatible_schedulers (DiffuseSD *sd);

/* Generates params->num_images images into a new array of DiffuseImage*
 * (free with g_ptr_array_unref). */
GPtrArray *diffuse_sd_generate (DiffuseSD *sd, const DiffuseSDParams *params, GError **error);

/* The same run without the VAE decode (diffusers' output_type="latent"):
 * the final latents [n, C, h, w], f32 on the CPU, not divided by the VAE's
 * scaling factor — the input of another pipeline's image_latents (the
 * SDXL base with denoising_end, then the refiner with denoising_start). */
DiffuseTensor *diffuse_sd_generate_latents (DiffuseSD *sd, const DiffuseSDParams *params, GError **error);

G_END_DECLS

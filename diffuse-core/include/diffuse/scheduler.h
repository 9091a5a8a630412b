/* gst-diffuse — diffusers noise schedulers.
 *
 * Each scheduler is built from a scheduler_config.json (a DiffuseConfig) with
 * diffusers' from_config rules: "_class_name" picks the class, absent or null
 * keys take that class's defaults, keys listed in "_use_default_values" are
 * dropped (so a swapped class uses its own defaults for them), unknown keys
 * are kept in the config and ignored.
 *
 * Classes: PNDMScheduler, DDIMScheduler, DDPMScheduler, LMSDiscreteScheduler,
 * EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
 * HeunDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
 * LCMScheduler.  Options diffusers has but this code does not (thresholding,
 * learned variances, flow sigmas, beta sigmas, ...) are reported as
 * DIFFUSE_ERROR_UNSUPPORTED when enabled, never silently ignored.
 *
 * All work is host-side on contiguous float arrays (the latents): a batch of
 * N images is one flat array, exactly as diffusers treats the tensor.
 * Arithmetic follows diffusers: float32 where torch computes in float32,
 * double where numpy computes in float64.
 *
 * Denoising loop, as a diffusers pipeline runs it:
 *
 *     diffuse_scheduler_set_timesteps (s, steps, &err);
 *     latents = noise * diffuse_scheduler_init_noise_sigma (s);
 *     for (i = 0; i < n_timesteps; i++) {
 *       t = timesteps[i];                               // what the UNet gets
 *       copy = latents; diffuse_scheduler_scale_model_input (s, copy, n);
 *       eps = unet (copy, t);
 *       diffuse_scheduler_step (s, eps, latents, n, rng, &err);
 *     }
 *
 * The scheduler keeps the position itself: scale_model_input and step act on
 * the timestep at diffuse_scheduler_position (), and step moves to the next.
 * HeunDiscreteScheduler (order 2) lists each inner timestep twice and the
 * pipeline calls the model once per entry, as in diffusers. */
#pragma once

#include <glib.h>
#include <diffuse/config.h>
#include <diffuse/rng.h>

G_BEGIN_DECLS

typedef struct _DiffuseScheduler DiffuseScheduler;

/* From a config: its "_class_name" selects the class (missing: error). */
DiffuseScheduler *diffuse_scheduler_new_from_config (DiffuseConfig *config, GError **error);
/* Class `class_name` built from base_config as diffusers'
 * Class.from_config (other.config) does (base_config may be NULL: all
 * defaults).  Unknown class names are DIFFUSE_ERROR_UNSUPPORTED naming the
 * class and listing the known ones. */
DiffuseScheduler *diffuse_scheduler_new_by_name (const char *class_name, DiffuseConfig *base_config,
                                                 GError **error);
/* Reads scheduler_config.json (or any path) and builds from it. */
DiffuseScheduler *diffuse_scheduler_load (const char *path, GError **error);
void diffuse_scheduler_free (DiffuseScheduler *s);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (DiffuseScheduler, diffuse_scheduler_free)

const char *diffuse_scheduler_class_name (DiffuseScheduler *s);
/* The effective config (its "_class_name" is this class).  Borrowed. */
DiffuseConfig *diffuse_scheduler_get_config (DiffuseScheduler *s);
/* diffusers' `order` (2 for Heun, 1 otherwise). */
guint diffuse_scheduler_order (DiffuseScheduler *s);
guint diffuse_scheduler_num_train_timesteps (DiffuseScheduler *s);

/* The classes this file implements (NULL-terminated, static). */
const char *const *diffuse_scheduler_list_classes (void);
gboolean diffuse_scheduler_class_supported (const char *class_name);
/* diffusers' `compatibles` of a class, as names (NULL-terminated, static):
 * the KarrasDiffusionSchedulers names plus the class itself for the SD
 * schedulers (some of which are not implemented here: check with
 * diffuse_scheduler_class_supported), just itself for LCMScheduler.  NULL for
 * an unknown class. */
const char *const *diffuse_scheduler_compatibles (const char *class_name);

/* ---- a run ----------------------------------------------------------- */

/* num_inference_steps >= 1.  More than num_train_timesteps is an error where
 * diffusers raises one (DDIM, DDPM, LCM).  Resets all per-run state
 * (multistep history, position, begin index). */
gboolean diffuse_scheduler_set_timesteps (DiffuseScheduler *s, guint num_inference_steps, GError **error);
/* LCMScheduler's set_timesteps (num_inference_steps, original_inference_steps,
 * strength=...): original_inference_steps 0 = the config's. */
gboolean diffuse_scheduler_set_timesteps_lcm (DiffuseScheduler *s, guint num_inference_steps,
                                              guint original_inference_steps, double strength, GError **error);

/* The timesteps the model is called with, in order (NULL before
 * set_timesteps).  Integral for DDIM/DDPM/PNDM/DPM/UniPC/LCM; float32 values
 * for the sigma schedulers (Euler, LMS, Heun).  Owned by s. */
const double *diffuse_scheduler_timesteps (DiffuseScheduler *s, guint *n);
/* The sigma table (float32) of the sigma-based schedulers (one more entry
 * than steps: the final sigma), NULL for the others.  Owned by s. */
const float *diffuse_scheduler_sigmas (DiffuseScheduler *s, guint *n);
/* diffusers' scheduler.num_inference_steps after set_timesteps. */
guint diffuse_scheduler_num_inference_steps (DiffuseScheduler *s);
/* What the initial noise is multiplied by (float32, as the pipeline does). */
float diffuse_scheduler_init_noise_sigma (DiffuseScheduler *s);

/* Index into timesteps of the next model call (begin index, then +1 per step). */
guint diffuse_scheduler_position (DiffuseScheduler *s);
/* timesteps[position] (-1 when the schedule is done or not set). */
double diffuse_scheduler_current_timestep (DiffuseScheduler *s);
/* diffusers' set_begin_index: the loop starts at timesteps[begin].  For the
 * classes without it in diffusers (DDIM, DDPM, PNDM) only the position moves. */
void diffuse_scheduler_set_begin_index (DiffuseScheduler *s, guint begin_index);

/* img2img: diffusers' StableDiffusionImg2ImgPipeline.get_timesteps:
 * init = min (int (steps * strength), steps); t_start = max (steps - init, 0);
 * the loop runs timesteps[t_start * order:], and set_begin_index
 * (t_start * order) is applied.  Returns that begin index; *n_steps (may be
 * NULL) gets steps - t_start, the pipeline's num_inference_steps afterwards.
 * Call after set_timesteps.  The noised latents are then
 * add_noise (init_latents, noise, timesteps[begin]). */
guint diffuse_scheduler_apply_strength (DiffuseScheduler *s, double strength, guint *n_steps);

/* In place: sample for the model at the current position (identity for the
 * schedulers whose scale_model_input is). */
void diffuse_scheduler_scale_model_input (DiffuseScheduler *s, float *sample, size_t n);
/* One step at the current position: sample (in/out) becomes the previous
 * sample; moves the position on.  rng: the generator for the noise of
 * stochastic steps (EulerAncestral, DDPM, LCM, SDE variants, DDIM eta > 0),
 * drawn as randn_tensor (model_output.shape) with one generator: one
 * diffuse_rng_randn of n values per step.  NULL there is an error.  n must
 * stay the same through a run. */
gboolean diffuse_scheduler_step (DiffuseScheduler *s, const float *model_output, float *sample, size_t n,
                                 DiffuseRng *rng, GError **error);
/* diffusers' add_noise (original, noise, timestep): out may alias original. */
gboolean diffuse_scheduler_add_noise (DiffuseScheduler *s, const float *original, const float *noise, float *out,
                                      size_t n, double timestep, GError **error);

/* The dtype the step noise is drawn in: diffusers' randn_tensor (...,
 * dtype=model_output.dtype), so an f16 UNet draws f16 noise (rounded, and
 * with another tail when n % 16 != 0: rng.h).  DIFFUSE_RNG_F32 by default. */
void diffuse_scheduler_set_noise_dtype (DiffuseScheduler *s, DiffuseRngDType dtype);

/* alphas_cumprod[timestep] (float32, as the torch tensor holds it) for an
 * integer timestep in [0, num_train_timesteps); FALSE with
 * DIFFUSE_ERROR_INVALID_ARGUMENT otherwise (a sigma schedule's fractional
 * timesteps).  Used by self-attention guidance's x0 prediction. */
gboolean diffuse_scheduler_alpha_cumprod (DiffuseScheduler *s, double timestep, float *alpha_prod, GError **error);
/* The config's prediction_type ("epsilon", "v_prediction", "sample"). */
const char *diffuse_scheduler_prediction_type (DiffuseScheduler *s);

/* DDIM's eta (0 by default): DDIMScheduler.step (..., eta=eta). */
void diffuse_scheduler_set_eta (DiffuseScheduler *s, double eta);

G_END_DECLS

/* gst-diffuse — AutoencoderKL (diffusers' models/autoencoders/autoencoder_kl.py).
 *
 * Built from a diffusers config.json and a weight set named as diffusers
 * names it ("encoder.down_blocks.0.resnets.0.conv1.weight",
 * "decoder.mid_block.attentions.0.to_q.weight", ...).  The attention keys of
 * old checkpoints (query / key / value / proj_attn, possibly stored as 1x1
 * convolutions [C, C, 1, 1]) are accepted as diffusers converts them on load.
 * The model is immutable after construction: tiling and slicing are per-call
 * parameters, not state. */
#pragma once

#include <diffuse/tensor.h>
#include <diffuse/safetensors.h>
#include <diffuse/config.h>

G_BEGIN_DECLS

typedef struct _DiffuseVae DiffuseVae;

/* Reads in_channels, out_channels, down_block_types (DownEncoderBlock2D),
 * up_block_types (UpDecoderBlock2D), block_out_channels, layers_per_block,
 * act_fn, latent_channels, norm_num_groups, sample_size, scaling_factor,
 * shift_factor, latents_mean, latents_std, force_upcast, use_quant_conv,
 * use_post_quant_conv, mid_block_add_attention (diffusers' defaults when
 * absent).  Errors: DIFFUSE_ERROR_CONFIG, DIFFUSE_ERROR_UNSUPPORTED (another
 * block type, an activation we lack), DIFFUSE_ERROR_NOT_FOUND (a missing
 * tensor, named with the component).  Unused tensors: one g_warning. */
DiffuseVae *diffuse_vae_new (DiffuseConfig *config, DiffuseWeights *weights, DiffuseDevice *dev, DiffuseDType dtype,
                             GError **error);
DiffuseVae *diffuse_vae_ref (DiffuseVae *v);
void diffuse_vae_unref (DiffuseVae *v);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (DiffuseVae, diffuse_vae_unref)

double diffuse_vae_scaling_factor (DiffuseVae *v);            /* default 0.18215 */
/* FALSE when the config's shift_factor is absent/null (*out then 0). */
gboolean diffuse_vae_shift_factor (DiffuseVae *v, double *out);
/* latents_mean / latents_std (SDXL-style configs): the length, 0 when null;
 * *values belongs to the model. */
guint diffuse_vae_latents_mean (DiffuseVae *v, const double **values);
guint diffuse_vae_latents_std (DiffuseVae *v, const double **values);
gboolean diffuse_vae_force_upcast (DiffuseVae *v);
int diffuse_vae_in_channels (DiffuseVae *v);
int diffuse_vae_out_channels (DiffuseVae *v);
int diffuse_vae_latent_channels (DiffuseVae *v);
/* 2 ** (len (block_out_channels) - 1): the pipelines' vae_scale_factor. */
int diffuse_vae_scale_factor (DiffuseVae *v);
int diffuse_vae_sample_size (DiffuseVae *v);
DiffuseDevice *diffuse_vae_device (DiffuseVae *v);
DiffuseDType diffuse_vae_dtype (DiffuseVae *v);

typedef struct {
  /* enable_tiling(): tiles of tile_sample_min_size pixels / tile_latent_min_size
   * latents, overlapping by tile_overlap_factor, blended as diffusers does.
   * Used only when the input is larger than one tile. */
  gboolean tiling;
  int tile_sample_min_size;    /* 0: the config's sample_size */
  int tile_latent_min_size;    /* 0: sample_size / 2 ** (len (block_out_channels) - 1) */
  float tile_overlap_factor;   /* 0.25 */
  /* enable_slicing(): one batch element at a time (same result, less memory). */
  gboolean slicing;
} DiffuseVaeParams;

void diffuse_vae_default_params (DiffuseVaeParams *p);

/* image [B, in_channels, H, W] (values in [-1, 1]) on the model's device.
 * Returns the DiagonalGaussianDistribution of the latents: *mean and *logvar
 * [B, latent_channels, H / f, W / f], logvar clamped to [-30, 20]. */
gboolean diffuse_vae_encode (DiffuseVae *v, DiffuseTensor *image, const DiffuseVaeParams *params,
                             DiffuseTensor **mean, DiffuseTensor **logvar, GError **error);

/* DiagonalGaussianDistribution.sample: mean + exp (0.5 * logvar) * noise,
 * with noise (numel (mean) floats, row-major) drawn by the caller (the
 * torch-compatible generator of the pipeline). */
DiffuseTensor *diffuse_vae_posterior_sample (DiffuseTensor *mean, DiffuseTensor *logvar, const float *noise,
                                             GError **error);

/* latents [B, latent_channels, h, w] (already divided by scaling_factor by
 * the caller, as the pipelines do) -> [B, out_channels, h * f, w * f]. */
DiffuseTensor *diffuse_vae_decode (DiffuseVae *v, DiffuseTensor *latents, const DiffuseVaeParams *params,
                                   GError **error);

G_END_DECLS

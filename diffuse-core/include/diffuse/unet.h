/* gst-diffuse — UNet2DConditionModel (the denoiser of SD 1.x / 2.x, LCM).
 *
 * Built from the component's config.json (the options of diffusers'
 * UNet2DConditionModel, with its defaults) and loaded from a DiffuseWeights
 * by the diffusers key names ("down_blocks.0.attentions.1.transformer_blocks.0
 * .attn1.to_q.weight", ...).  Every weight the config implies must be present
 * with the right shape; keys the model does not use are reported with a
 * g_warning (diffusers' "unexpected keys"), and listed by
 * diffuse_unet_unused_keys ().
 *
 * Supported: down blocks CrossAttnDownBlock2D / DownBlock2D, up blocks
 * CrossAttnUpBlock2D / UpBlock2D, mid block UNetMidBlock2DCrossAttn /
 * UNetMidBlock2D / none, positional time embedding (+ time_cond_proj_dim,
 * timestep_post_act, time_embedding_act_fn), resnet_time_scale_shift
 * "default" / "scale_shift", transformer_layers_per_block int / list /
 * list of lists (+ reverse_transformer_layers_per_block), attention_head_dim,
 * cross_attention_dim and only_cross_attention per block or global,
 * use_linear_projection.  Class embeddings, addition embeddings
 * (SDXL "text_time" ...), encoder_hid_proj, fourier time embeddings, GLIGEN,
 * dual cross-attention and the Simple/K/Attn block families are reported as
 * DIFFUSE_ERROR_UNSUPPORTED.
 *
 * The model is immutable after creation: one model can run forwards from
 * several threads at once. */
#pragma once

#include <diffuse/config.h>
#include <diffuse/safetensors.h>
#include <diffuse/tensor.h>

G_BEGIN_DECLS

typedef struct _DiffuseUNet DiffuseUNet;

typedef struct {
  DiffuseDType dtype;       /* weights and activations (default F32) */
  DiffuseDevice *device;    /* NULL: the CPU */
  const char *component;    /* name in messages (default "unet") */
} DiffuseUNetParams;

void diffuse_unet_default_params (DiffuseUNetParams *p);

/* params NULL: defaults.  Errors: DIFFUSE_ERROR_CONFIG (inconsistent config,
 * or a weight whose shape does not fit it), DIFFUSE_ERROR_UNSUPPORTED,
 * DIFFUSE_ERROR_NOT_FOUND (a weight is missing: the message names it). */
DiffuseUNet *diffuse_unet_new (DiffuseConfig *config, DiffuseWeights *weights, const DiffuseUNetParams *params,
                               GError **error);
/* Convenience for a component folder: <dir>/config.json and
 * <dir>/diffusion_pytorch_model.safetensors (or its sharded
 * .safetensors.index.json).  Variant selection is the pipeline layer's job. */
DiffuseUNet *diffuse_unet_new_from_dir (const char *dir, const DiffuseUNetParams *params, GError **error);

DiffuseUNet *diffuse_unet_ref (DiffuseUNet *u);
void diffuse_unet_unref (DiffuseUNet *u);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (DiffuseUNet, diffuse_unet_unref)

DiffuseConfig *diffuse_unet_config (DiffuseUNet *u);      /* borrowed */
DiffuseDType diffuse_unet_dtype (DiffuseUNet *u);
DiffuseDevice *diffuse_unet_device (DiffuseUNet *u);
int diffuse_unet_in_channels (DiffuseUNet *u);
int diffuse_unet_out_channels (DiffuseUNet *u);
/* The feature size encoder_hidden_states must have (cross_attention_dim). */
int diffuse_unet_cross_attention_dim (DiffuseUNet *u);
/* 0 when the model takes no timestep_cond (not an LCM-distilled UNet). */
int diffuse_unet_time_cond_proj_dim (DiffuseUNet *u);
/* config sample_size (latent pixels), 0 when absent. */
int diffuse_unet_sample_size (DiffuseUNet *u);
/* 2 ** number of upsamplers: latent sizes that are multiples of this need
 * no forward_upsample_size (any size >= 1 works). */
int diffuse_unet_size_multiple (DiffuseUNet *u);
/* Number of parameters (elements of all weights the model uses). */
guint64 diffuse_unet_n_params (DiffuseUNet *u);
/* Keys in the weights that the model does not use (NULL-terminated, owned by u). */
const char *const *diffuse_unet_unused_keys (DiffuseUNet *u);

typedef struct {
  /* [B, time_cond_proj_dim] (LCM guidance embedding), or NULL */
  DiffuseTensor *timestep_cond;
  /* addition_embed_type "text_time" (SDXL's added_cond_kwargs): the pooled,
   * projected text embeddings [B, P] and the time ids [B, n] (original
   * size, crop top-left, target size: n = 6), any dtype and device; both
   * required by such a model, refused by others */
  DiffuseTensor *text_embeds;
  DiffuseTensor *time_ids;
  /* ControlNet residuals, both or neither: one tensor per down-block
   * residual (conv_in output, then every resnet/attention and downsampler
   * output, in order), each the shape of that residual; and one of the mid
   * block's output shape.  diffusers' down_block_additional_residuals /
   * mid_block_additional_residual. */
  DiffuseTensor *const *down_block_additional_residuals;
  int n_down_block_additional_residuals;
  DiffuseTensor *mid_block_additional_residual;
  /* Self-attention guidance: when non-NULL, receives the self-attention
   * probabilities of the mid block's first transformer block, [B * heads,
   * h * w, h * w] in the model's dtype on its device, batch-major (diffusers'
   * CrossAttnStoreProcessor), and mid_map_hw (when non-NULL) that map's h, w.
   * DIFFUSE_ERROR_UNSUPPORTED when the mid block has no self-attention. */
  DiffuseTensor **mid_self_attn_probs;
  int *mid_map_hw;
  /* IP-Adapter: image tokens [B, T, cross_attention_dim] (the model's dtype,
   * on its device) and, per cross-attention layer in diffusers'
   * attn_processors order (down blocks, up blocks, mid block), to_k_ip /
   * to_v_ip [inner, cross_attention_dim]; n_ip_layers must be the model's
   * number of cross-attention layers (DIFFUSE_ERROR_INVALID_ARGUMENT
   * otherwise). */
  DiffuseTensor *ip_tokens;
  DiffuseTensor *const *ip_k;
  DiffuseTensor *const *ip_v;
  int n_ip_layers;
  float ip_scale;
} DiffuseUNetForwardArgs;

/* Cross-attention layers (transformer blocks with attn2) of the model. */
int diffuse_unet_n_cross_attention_layers (DiffuseUNet *u);

/* One denoiser evaluation.
 *   sample                 [B, in_channels, H, W] (any dtype/device: cast to the model's)
 *   timesteps              n_timesteps values: 1 (broadcast over the batch) or B
 *   encoder_hidden_states  [B, L, cross_attention_dim]
 *   args                   NULL, or extra inputs
 * Returns [B, out_channels, H, W] in the dtype and on the device of the model,
 * or NULL with DIFFUSE_ERROR_INVALID_ARGUMENT (shapes) or the op's error. */
DiffuseTensor *diffuse_unet_forward (DiffuseUNet *u, DiffuseTensor *sample, const float *timesteps, int n_timesteps,
                                     DiffuseTensor *encoder_hidden_states, const DiffuseUNetForwardArgs *args,
                                     GError **error);

/* The same with the timesteps as a tensor: [B] (one per sample; any dtype
 * and device: made f32 on the model's).  When they already are f32 on the
 * model's device and sample, encoder_hidden_states and timestep_cond are on
 * it in its dtype, the forward copies nothing between host and device — the
 * form a CUDA graph can capture (diffuse-cuda.h). */
DiffuseTensor *diffuse_unet_forward_t (DiffuseUNet *u, DiffuseTensor *sample, DiffuseTensor *timesteps,
                                       DiffuseTensor *encoder_hidden_states, const DiffuseUNetForwardArgs *args,
                                       GError **error);

G_END_DECLS

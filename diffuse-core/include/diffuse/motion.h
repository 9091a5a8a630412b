/* gst-diffuse — AnimateDiff models: MotionAdapter and UNetMotionModel.
 *
 * DiffuseMotionAdapter is diffusers' MotionAdapter (models/unets/
 * unet_motion_model.py): the temporal transformers ("motion modules") of
 * every down/up block and, optionally, of the mid block, plus a conv_in for
 * PIA-style adapters (conv_in_channels).  It is built from the adapter's
 * config.json (block_out_channels, motion_layers_per_block,
 * motion_transformer_layers_per_block, motion_mid_block_layers_per_block,
 * motion_transformer_layers_per_mid_block, motion_num_attention_heads,
 * motion_norm_num_groups, motion_max_seq_length, use_motion_mid_block,
 * conv_in_channels; diffusers' defaults when absent) and loaded by the
 * state-dict names ("down_blocks.0.motion_modules.0.transformer_blocks.0
 * .attn1.to_q.weight", "mid_block.motion_modules.0.proj_in.weight", ...).
 * A missing weight is DIFFUSE_ERROR_NOT_FOUND naming the key and the
 * component; a wrong shape is DIFFUSE_ERROR_CONFIG.  The stored sinusoidal
 * tables ("....pos_embed.pe") are used when present (diffusers loads them
 * as buffers), else computed as SinusoidalPositionalEmbedding does.
 *
 * DiffuseUNetMotion is UNetMotionModel.from_unet2d (unet, motion_adapter):
 * it keeps a reference to the DiffuseUNet and runs that model's own blocks
 * (the 2-D weights are shared, never copied) with the adapter's motion
 * modules after each resnet/attention as diffusers orders them.  Frames are
 * processed as batch x frames by the 2-D parts; the motion modules attend
 * over the frames of each pixel.  As in diffusers, the motion modules'
 * group norms use the UNet's norm_num_groups, the time projection uses
 * flip_sin_to_cos = TRUE and freq_shift = 0, and the output norm is followed
 * by SiLU.  UNet options that from_unet2d cannot carry over
 * (resnet_time_scale_shift "scale_shift", only_cross_attention,
 * time_embedding_act_fn, timestep_post_act, non-3 conv kernels, a mid block
 * other than UNetMidBlock2DCrossAttn) are DIFFUSE_ERROR_UNSUPPORTED.
 *
 * Both models are immutable after creation and may run from several
 * threads at once. */
#pragma once

#include <diffuse/config.h>
#include <diffuse/safetensors.h>
#include <diffuse/tensor.h>
#include <diffuse/unet.h>

G_BEGIN_DECLS

/* ---- MotionAdapter ------------------------------------------------------ */

typedef struct _DiffuseMotionAdapter DiffuseMotionAdapter;

typedef struct {
  DiffuseDType dtype;       /* weights (default F32) */
  DiffuseDevice *device;    /* NULL: the CPU */
  const char *component;    /* name in messages (default "motion_adapter") */
} DiffuseMotionAdapterParams;

void diffuse_motion_adapter_default_params (DiffuseMotionAdapterParams *p);

/* params NULL: defaults.  Errors: DIFFUSE_ERROR_CONFIG, DIFFUSE_ERROR_UNSUPPORTED,
 * DIFFUSE_ERROR_NOT_FOUND (a weight is missing: the message names it). */
DiffuseMotionAdapter *diffuse_motion_adapter_new (DiffuseConfig *config, DiffuseWeights *weights,
                                                  const DiffuseMotionAdapterParams *params, GError **error);
/* <dir>/config.json + <dir>/diffusion_pytorch_model.safetensors (or its index). */
DiffuseMotionAdapter *diffuse_motion_adapter_new_from_dir (const char *dir, const DiffuseMotionAdapterParams *params,
                                                           GError **error);
DiffuseMotionAdapter *diffuse_motion_adapter_ref (DiffuseMotionAdapter *a);
void diffuse_motion_adapter_unref (DiffuseMotionAdapter *a);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (DiffuseMotionAdapter, diffuse_motion_adapter_unref)

DiffuseConfig *diffuse_motion_adapter_config (DiffuseMotionAdapter *a);   /* borrowed */
DiffuseDType diffuse_motion_adapter_dtype (DiffuseMotionAdapter *a);
DiffuseDevice *diffuse_motion_adapter_device (DiffuseMotionAdapter *a);
int diffuse_motion_adapter_n_blocks (DiffuseMotionAdapter *a);            /* len (block_out_channels) */
int diffuse_motion_adapter_max_seq_length (DiffuseMotionAdapter *a);      /* the most frames it can take */
gboolean diffuse_motion_adapter_has_mid_block (DiffuseMotionAdapter *a);
int diffuse_motion_adapter_conv_in_channels (DiffuseMotionAdapter *a);    /* 0 when none */
/* Parameters (elements of the weights the model uses, the positional
 * tables excluded: they are buffers in diffusers): equal to
 * sum (p.numel () for p in adapter.parameters ()). */
guint64 diffuse_motion_adapter_n_params (DiffuseMotionAdapter *a);
/* Keys of the weights the adapter does not use (NULL-terminated, owned by a). */
const char *const *diffuse_motion_adapter_unused_keys (DiffuseMotionAdapter *a);

/* ---- UNetMotionModel ------------------------------------------------------ */

typedef struct _DiffuseUNetMotion DiffuseUNetMotion;

/* Checks that the adapter fits the UNet (number of blocks,
 * block_out_channels, layers per block, dtype and device): otherwise
 * DIFFUSE_ERROR_CONFIG naming both.  Holds a reference to both models. */
DiffuseUNetMotion *diffuse_unet_motion_new (DiffuseUNet *unet, DiffuseMotionAdapter *adapter, GError **error);
DiffuseUNetMotion *diffuse_unet_motion_ref (DiffuseUNetMotion *m);
void diffuse_unet_motion_unref (DiffuseUNetMotion *m);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (DiffuseUNetMotion, diffuse_unet_motion_unref)

DiffuseUNet *diffuse_unet_motion_get_unet (DiffuseUNetMotion *m);                 /* borrowed */
DiffuseMotionAdapter *diffuse_unet_motion_get_adapter (DiffuseUNetMotion *m);     /* borrowed */
int diffuse_unet_motion_in_channels (DiffuseUNetMotion *m);   /* conv_in_channels for PIA adapters */
int diffuse_unet_motion_out_channels (DiffuseUNetMotion *m);
int diffuse_unet_motion_max_frames (DiffuseUNetMotion *m);    /* motion_max_seq_length */
/* Parameters of the assembled model: sum (p.numel () for p in
 * UNetMotionModel.from_unet2d (unet, adapter).parameters ()). */
guint64 diffuse_unet_motion_n_params (DiffuseUNetMotion *m);

/* ---- UNetMotionModel from its own folder ------------------------------------
 *
 * What diffusers' AnimateDiffPipeline.save_pretrained () writes as unet/: a
 * config with _class_name "UNetMotionModel" (block types
 * CrossAttnDownBlockMotion / DownBlockMotion / CrossAttnUpBlockMotion /
 * UpBlockMotion, num_attention_heads, motion_max_seq_length,
 * motion_num_attention_heads, temporal_transformer_layers_per_block,
 * temporal_transformer_layers_per_mid_block, use_motion_mid_block,
 * mid_block_layers, ...) and one weight file holding the 2-D weights and the
 * "*.motion_modules.*" ones.  UNetMotionModel.from_pretrained () of it equals
 * from_unet2d (unet, adapter) for the UNet and adapter its config implies, so
 * it is built as that: a DiffuseUNet and a DiffuseMotionAdapter over the same
 * weights (the motion keys go to the adapter, every other key to the UNet),
 * joined by diffuse_unet_motion_new ().  Absent or null keys take
 * UNetMotionModel's defaults; reverse_motion_num_attention_heads is ignored,
 * as UNetMotionModel.__init__ ignores it.
 * Errors: DIFFUSE_ERROR_CONFIG (an invalid key, or a weight whose shape does
 * not fit the config: the message names the config file or the weight file
 * and the key), DIFFUSE_ERROR_NOT_FOUND (a weight the config implies is
 * missing: named with its file), DIFFUSE_ERROR_UNSUPPORTED (SDXL
 * addition_embed_type "text_time", encoder_hid_dim_type, mid_block_layers
 * other than 1, per-layer temporal depths). */

typedef struct {
  DiffuseDType dtype;       /* weights (default F32) */
  DiffuseDevice *device;    /* NULL: the CPU */
  const char *component;    /* name in messages (default "unet") */
} DiffuseUNetMotionParams;

void diffuse_unet_motion_default_params (DiffuseUNetMotionParams *p);

/* config: the UNetMotionModel config.json; weights: its weight file(s). */
DiffuseUNetMotion *diffuse_unet_motion_new_from_weights (DiffuseConfig *config, DiffuseWeights *weights,
                                                         const DiffuseUNetMotionParams *params, GError **error);
/* <dir>/config.json + <dir>/diffusion_pytorch_model.safetensors (or its index). */
DiffuseUNetMotion *diffuse_unet_motion_new_from_dir (const char *dir, const DiffuseUNetMotionParams *params,
                                                     GError **error);
/* The UNet2DConditionModel config and the MotionAdapter config a
 * UNetMotionModel config stands for (new configs, labelled with config's
 * label); FALSE with the errors above for an invalid or unsupported config. */
gboolean diffuse_unet_motion_split_config (DiffuseConfig *config, DiffuseConfig **unet_config,
                                           DiffuseConfig **adapter_config, GError **error);

/* One denoiser evaluation (UNetMotionModel.forward).
 *   sample                 [B, in_channels, F, H, W], 1 <= F <= max_frames
 *   timesteps              n_timesteps values: 1 (broadcast over the batch) or B
 *   encoder_hidden_states  [B * F, L, D] (diffusers: the prompt embeddings
 *                          repeat_interleave'd over the frames) or [B, L, D]
 *                          (repeated over the frames here)
 *   args                   NULL, or args->timestep_cond ([B, time_cond_proj_dim]);
 *                          ControlNet residuals are not supported here
 * Returns [B, out_channels, F, H, W] in the model's dtype on its device, or
 * NULL with DIFFUSE_ERROR_INVALID_ARGUMENT (shapes) or the op's error. */
DiffuseTensor *diffuse_unet_motion_forward (DiffuseUNetMotion *m, DiffuseTensor *sample, const float *timesteps,
                                            int n_timesteps, DiffuseTensor *encoder_hidden_states,
                                            const DiffuseUNetForwardArgs *args, GError **error);

G_END_DECLS

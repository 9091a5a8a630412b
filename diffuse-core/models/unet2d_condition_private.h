/* gst-diffuse — the layout of DiffuseUNet, for model files that run the
 * UNet2DConditionModel's blocks themselves (private to diffuse-core).
 *
 * UNetMotionModel (motion_unet.c) is diffusers' UNetMotionModel.from_unet2d:
 * the UNet's own resnets, transformers, samplers and convolutions, with the
 * motion modules interleaved.  It runs the blocks of the very DiffuseUNet the
 * text2img pipeline built (same tensors, no copy), so it needs this layout.
 *
 * unet2d_condition.c defines its functions over these types; motion_unet.c
 * also checks the layout at run time against the public accessors. */
#pragma once

#include <diffuse/unet.h>

#include "models/blocks.h"

G_BEGIN_DECLS

typedef struct {
  int n_layers;
  gboolean has_attn;
  DiffuseBlkResnet *resnets;           /* n_layers */
  DiffuseBlkTransformer2D *attns;      /* n_layers when has_attn */
  gboolean has_sampler;
  DiffuseBlkDownsample down;           /* down blocks */
  DiffuseBlkUpsample up;               /* up blocks */
  int cross_attention_dim;             /* when has_attn */
} UNetBlock;

typedef struct {
  gboolean present;
  gboolean has_attn;
  DiffuseBlkResnet resnets[2];         /* 1 without attention */
  DiffuseBlkTransformer2D attn;
  int cross_attention_dim;
} UNetMid;

struct _DiffuseUNet {
  gint ref_count;
  DiffuseConfig *config;
  char *label;
  DiffuseDType dtype;
  DiffuseDevice *dev;

  int in_channels, out_channels, n_blocks, sample_size;
  int *block_out;
  gboolean center_input_sample;
  gboolean flip_sin_to_cos;
  float freq_shift;
  int time_embed_dim;
  int time_cond_proj_dim;
  gboolean has_time_embed_act;
  DiffuseActivation time_embed_act;
  DiffuseActivation act;
  int num_upsamplers;

  DiffuseBlkConv2d conv_in, conv_out;
  DiffuseBlkGroupNorm conv_norm_out;
  DiffuseBlkTimestepEmbedding time_embedding;
  /* addition_embed_type "text_time" (SDXL): add_time_proj (Timesteps of
   * addition_time_embed_dim) of the 6 time ids, concatenated after the
   * pooled text embeddings, through add_embedding into emb */
  gboolean add_text_time;
  int add_time_dim, add_in_dim;
  DiffuseBlkTimestepEmbedding add_embedding;
  UNetBlock *down;
  UNetMid mid;
  UNetBlock *up;

  guint64 n_params;
  char **unused_keys;
};

/* diffuse_unet_new () over weights that also hold another model's tensors
 * (a UNetMotionModel's motion modules): keys owns () rejects are not the
 * UNet's and are not reported as unused.  owns NULL: diffuse_unet_new (). */
DiffuseUNet *_diffuse_unet_new_owned (DiffuseConfig *config, DiffuseWeights *weights, const DiffuseUNetParams *params,
                                      DiffuseBlkKeyFilter owns, GError **error);

/* IP-Adapter layers for a forward (the motion UNet shares them): one
 * DiffuseBlkIp per cross-attention layer in diffusers' attn_processors order
 * (down, up, mid), with `tokens` (NULL: args->ip_tokens); NULL without an
 * IP-Adapter or with *error set (a layer count that does not fit).  Free
 * with g_free.  _diffuse_unet_ip_take hands out transformer t's layers and
 * moves *next past them; part 0 / 1: the cross-attention layers of the
 * down / up blocks (where the up / mid counters start). */
DiffuseBlkIp *_diffuse_unet_ip_layers (DiffuseUNet *u, const DiffuseUNetForwardArgs *args, DiffuseTensor *tokens,
                                       GError **error);
const DiffuseBlkIp *_diffuse_unet_ip_take (DiffuseBlkIp *all, int *next, const DiffuseBlkTransformer2D *t);
int _diffuse_unet_part_cross_layers (DiffuseUNet *u, int part);

G_END_DECLS

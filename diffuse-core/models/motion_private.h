/* gst-diffuse — MotionAdapter internals shared by motion_adapter.c and
 * motion_unet.c (private to diffuse-core). */
#pragma once

#include <diffuse/motion.h>

#include "models/blocks.h"

G_BEGIN_DECLS

/* BasicTransformerBlock as AnimateDiff builds it: layer norms, two
 * self-attentions (double_self_attention), GEGLU feed-forward, and the
 * sinusoidal positional table added after norm1 and norm2. */
typedef struct {
  DiffuseBlkLayerNorm norm1, norm2, norm3;
  DiffuseBlkAttention attn1, attn2;
  DiffuseBlkLinear ff_proj;     /* ff.net.0.proj: [2 * 4 * dim, dim] */
  DiffuseBlkLinear ff_out;      /* ff.net.2: [dim, 4 * dim] */
  DiffuseTensor *pe;            /* [1, max_seq_length, dim] */
} MotionTransformerBlock;

/* AnimateDiffTransformer3D: GroupNorm over (channels, frames, pixels),
 * proj_in, blocks over the frame axis, proj_out, residual. */
typedef struct {
  int channels;
  int heads, dim_head, inner;   /* inner = heads * (channels / heads) */
  DiffuseBlkGroupNorm norm;     /* groups: motion_norm_num_groups (the caller may use another count) */
  DiffuseBlkLinear proj_in, proj_out;
  MotionTransformerBlock *blocks;
  int n_blocks;
} MotionModule;

/* One MotionModules container (down_blocks.i / mid_block / up_blocks.i). */
typedef struct {
  MotionModule *modules;
  int n_modules;
} MotionModules;

struct _DiffuseMotionAdapter {
  gint ref_count;
  DiffuseConfig *config;
  char *label;
  DiffuseDType dtype;
  DiffuseDevice *dev;

  int n_blocks;
  int *block_out;
  int max_seq_length;
  int norm_groups;
  gboolean has_mid;
  int conv_in_channels;                /* 0: none */
  DiffuseBlkConv2d conv_in;            /* when conv_in_channels > 0 */

  MotionModules *down;                 /* n_blocks */
  MotionModules mid;                   /* when has_mid */
  MotionModules *up;                   /* n_blocks, up order */

  guint64 n_params;
  char **unused_keys;
};

/* diffuse_motion_adapter_new () over weights that also hold another model's
 * tensors (a UNetMotionModel's 2-D part): keys owns () rejects are not the
 * adapter's and are not reported as unused.  owns NULL: the public function. */
DiffuseMotionAdapter *_diffuse_motion_adapter_new_owned (DiffuseConfig *config, DiffuseWeights *weights,
                                                         const DiffuseMotionAdapterParams *params,
                                                         DiffuseBlkKeyFilter owns, GError **error);

/* x [B * F, C, H, W] -> [B * F, C, H, W] (residual included); the group
 * norm uses `groups` groups.  NULL + thread tensor error on failure. */
DiffuseTensor *diffuse_motion_module_forward (const MotionModule *m, DiffuseTensor *x, int num_frames, int groups);

G_END_DECLS

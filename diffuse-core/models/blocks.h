/* gst-diffuse — building blocks shared by the model files (private to
 * diffuse-core, not installed).
 *
 * Each block mirrors one diffusers/torch module and is loaded from a
 * DiffuseWeights by the module's dotted prefix, so a model is a tree of
 * blocks whose prefixes are exactly the safetensors keys
 * ("down_blocks.0.resnets.1" + ".conv1.weight").
 *
 * Loading goes through a DiffuseBlkLoader, which
 *   - fetches "<prefix>.<name>" in the model's dtype on its device,
 *   - checks the tensor's shape against what the config implies
 *     (DIFFUSE_ERROR_CONFIG naming the key, the component and both shapes),
 *   - reports a missing key as DIFFUSE_ERROR_NOT_FOUND naming key and component,
 *   - counts parameters and remembers which keys were used, so that
 *     diffuse_blk_loader_finish () can warn about keys the model does not use
 *     (diffusers' "Some weights of the model checkpoint ... were not used").
 * The loader keeps the first error; every later get returns NULL at once, so
 * block loaders can run to the end and the caller checks once.
 *
 * Forward functions never consume their inputs (the caller unrefs them) and
 * return a new tensor, or NULL with the thread's tensor error set (see
 * tensor.h); a NULL input makes them return NULL. */
#pragma once

#include <diffuse/tensor.h>
#include <diffuse/safetensors.h>
#include <diffuse/config.h>

G_BEGIN_DECLS

/* ---- loader ----------------------------------------------------------- */

typedef struct _DiffuseBlkLoader DiffuseBlkLoader;

/* component: a name for messages ("unet", "vae", "text_encoder"). */
DiffuseBlkLoader *diffuse_blk_loader_new (DiffuseWeights *weights, const char *component, DiffuseDType dtype,
                                          DiffuseDevice *dev);
void diffuse_blk_loader_free (DiffuseBlkLoader *l);

/* A diffusers model folder: DIR/config.json and DIR/diffusion_pytorch_model.safetensors
 * (or its .index.json shards).  On success both out-parameters hold new references. */
gboolean diffuse_blk_open_model_dir (const char *dir, DiffuseConfig **config, DiffuseWeights **weights,
                                     GError **error);

/* "<prefix>.<name>" (or just name when prefix is NULL or ""), shape checked
 * against shape[0..ndim) where -1 accepts any size.  NULL when missing or
 * wrong (error recorded) or after an earlier error. */
DiffuseTensor *diffuse_blk_get (DiffuseBlkLoader *l, const char *prefix, const char *name, int ndim,
                                const int64_t *shape);
#define DIFFUSE_BLK_SHAPE(...) \
  (int) (sizeof ((int64_t[]) { __VA_ARGS__ }) / sizeof (int64_t)), (const int64_t[]) { __VA_ARGS__ }
/* diffuse_blk_get_s (l, prefix, "weight", out, in) */
#define diffuse_blk_get_s(l, prefix, name, ...) diffuse_blk_get ((l), (prefix), (name), DIFFUSE_BLK_SHAPE (__VA_ARGS__))
/* TRUE when the weights hold "<prefix>.<name>" (does not mark it used). */
gboolean diffuse_blk_has (DiffuseBlkLoader *l, const char *prefix, const char *name);
/* Records an error (the first one wins); takes ownership. */
void diffuse_blk_loader_fail (DiffuseBlkLoader *l, GError *error);
gboolean diffuse_blk_loader_failed (DiffuseBlkLoader *l);
/* Number of parameters (elements) of the tensors fetched so far. */
guint64 diffuse_blk_loader_n_params (DiffuseBlkLoader *l);
/* Two models loaded from one weight file (a UNetMotionModel's 2-D part and
 * its motion modules): owns (key) says whether a key belongs to the model
 * this loader builds.  Keys it does not own are neither warned about nor
 * listed as unused by finish ().  NULL (the default): every key is its own. */
typedef gboolean (*DiffuseBlkKeyFilter) (const char *key);
void diffuse_blk_loader_set_owner (DiffuseBlkLoader *l, DiffuseBlkKeyFilter owns);
/* Returns FALSE with the recorded error, if any.  Otherwise warns (g_warning)
 * about every key of the weights that was never fetched, and returns TRUE.
 * The sorted list of those keys is returned in *unused when unused is not
 * NULL (g_strfreev). */
gboolean diffuse_blk_loader_finish (DiffuseBlkLoader *l, char ***unused, GError **error);

/* Parses a diffusers activation name (get_activation: "silu", "swish",
 * "gelu", "relu"; case-insensitive).  Anything else (e.g. "mish") is a
 * DIFFUSE_ERROR_UNSUPPORTED naming what/label. */
gboolean diffuse_blk_parse_activation (const char *name, const char *what, const char *label,
                                       DiffuseActivation *out, GError **error);

/* ---- leaf layers -------------------------------------------------------- */

/* torch.nn.Linear: weight [out, in], bias [out] or NULL. */
typedef struct {
  DiffuseTensor *weight;
  DiffuseTensor *bias;
} DiffuseBlkLinear;

gboolean diffuse_blk_linear_load (DiffuseBlkLinear *m, DiffuseBlkLoader *l, const char *prefix, int in, int out,
                                  gboolean bias);
/* A 1x1 torch.nn.Conv2d ([out, in, 1, 1]) loaded as a Linear (weight viewed as [out, in]). */
gboolean diffuse_blk_linear_load_conv1x1 (DiffuseBlkLinear *m, DiffuseBlkLoader *l, const char *prefix, int in,
                                          int out, gboolean bias);
DiffuseTensor *diffuse_blk_linear (const DiffuseBlkLinear *m, DiffuseTensor *x);
void diffuse_blk_linear_clear (DiffuseBlkLinear *m);

/* torch.nn.Conv2d, square kernel, same stride/padding on both axes. */
typedef struct {
  DiffuseTensor *weight;
  DiffuseTensor *bias;
  int stride;
  int padding;
} DiffuseBlkConv2d;

gboolean diffuse_blk_conv2d_load (DiffuseBlkConv2d *m, DiffuseBlkLoader *l, const char *prefix, int in, int out,
                                  int kernel, int stride, int padding, gboolean bias);
DiffuseTensor *diffuse_blk_conv2d (const DiffuseBlkConv2d *m, DiffuseTensor *x);
void diffuse_blk_conv2d_clear (DiffuseBlkConv2d *m);

/* torch.nn.GroupNorm (affine). */
typedef struct {
  DiffuseTensor *weight;
  DiffuseTensor *bias;
  int groups;
  float eps;
} DiffuseBlkGroupNorm;

gboolean diffuse_blk_group_norm_load (DiffuseBlkGroupNorm *m, DiffuseBlkLoader *l, const char *prefix, int channels,
                                      int groups, float eps);
/* x [N, C, ...]; act fused after the affine transform (DIFFUSE_ACT_NONE for none). */
DiffuseTensor *diffuse_blk_group_norm (const DiffuseBlkGroupNorm *m, DiffuseTensor *x, DiffuseActivation act);
void diffuse_blk_group_norm_clear (DiffuseBlkGroupNorm *m);

/* torch.nn.LayerNorm over the last dim; affine FALSE = no weight/bias. */
typedef struct {
  DiffuseTensor *weight;
  DiffuseTensor *bias;
  float eps;
} DiffuseBlkLayerNorm;

gboolean diffuse_blk_layer_norm_load (DiffuseBlkLayerNorm *m, DiffuseBlkLoader *l, const char *prefix, int dim,
                                      float eps, gboolean affine);
DiffuseTensor *diffuse_blk_layer_norm (const DiffuseBlkLayerNorm *m, DiffuseTensor *x);
void diffuse_blk_layer_norm_clear (DiffuseBlkLayerNorm *m);

/* ---- ResnetBlock2D (diffusers models/resnet.py) ------------------------ */

typedef struct {
  int in_channels;
  int out_channels;
  int temb_channels;          /* 0: no time_emb_proj (VAE) */
  int groups;
  int groups_out;             /* 0: same as groups */
  float eps;
  DiffuseActivation act;      /* non_linearity */
  gboolean scale_shift;       /* time_embedding_norm "scale_shift" (else "default") */
  gboolean skip_time_act;
  float output_scale_factor;  /* 1.0 */
} DiffuseBlkResnetConfig;

/* Defaults of ResnetBlock2D: groups 32, eps 1e-6, silu, "default", factor 1. */
void diffuse_blk_resnet_config_init (DiffuseBlkResnetConfig *c, int in_channels, int out_channels, int temb_channels);

typedef struct {
  DiffuseBlkResnetConfig cfg;
  DiffuseBlkGroupNorm norm1, norm2;
  DiffuseBlkConv2d conv1, conv2;
  DiffuseBlkLinear time_emb_proj;     /* when temb_channels > 0 */
  DiffuseBlkConv2d conv_shortcut;     /* 1x1, when in_channels != out_channels */
  gboolean has_shortcut;
} DiffuseBlkResnet;

gboolean diffuse_blk_resnet_load (DiffuseBlkResnet *r, DiffuseBlkLoader *l, const char *prefix,
                                  const DiffuseBlkResnetConfig *cfg);
/* x [B, Cin, H, W]; temb [B, temb_channels] (the raw time embedding, the
 * block applies its non-linearity unless skip_time_act) or NULL. */
DiffuseTensor *diffuse_blk_resnet_forward (const DiffuseBlkResnet *r, DiffuseTensor *x, DiffuseTensor *temb);
void diffuse_blk_resnet_clear (DiffuseBlkResnet *r);

/* ---- Attention (attention_processor.py Attention + AttnProcessor2_0) --- */

/* Multi-head attention on projected tensors: q [B, Lq, H*D], k/v [B, Lk, H*D]
 * (any strides with unit stride on the last dim), mask as diffuse_sdpa.
 * Returns [B, Lq, H*D] contiguous.  scale <= 0: 1/sqrt(D). */
DiffuseTensor *diffuse_blk_mha (DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v, int heads,
                                DiffuseTensor *mask, gboolean causal, float scale);

typedef struct {
  int query_dim;
  int cross_attention_dim;     /* 0: self-attention (k/v from the query input) */
  int heads;
  int dim_head;
  gboolean bias;               /* to_q/to_k/to_v bias */
  gboolean out_bias;           /* to_out.0 bias (TRUE) */
  int norm_num_groups;         /* > 0: a group_norm on the input (VAE mid-block attention) */
  float eps;                   /* of that group_norm */
  gboolean residual_connection;
  float rescale_output_factor; /* 1.0 */
} DiffuseBlkAttentionConfig;

/* Defaults of diffusers' Attention: bias FALSE, out_bias TRUE, no group norm,
 * no residual, factor 1. */
void diffuse_blk_attention_config_init (DiffuseBlkAttentionConfig *c, int query_dim, int cross_attention_dim,
                                        int heads, int dim_head);

typedef struct {
  DiffuseBlkAttentionConfig cfg;
  DiffuseBlkGroupNorm group_norm;
  DiffuseBlkLinear to_q, to_k, to_v, to_out;   /* to_out = "to_out.0" */
} DiffuseBlkAttention;

/* Keys: <prefix>.to_q, .to_k, .to_v, .to_out.0 (+ .group_norm). */
gboolean diffuse_blk_attention_load (DiffuseBlkAttention *a, DiffuseBlkLoader *l, const char *prefix,
                                     const DiffuseBlkAttentionConfig *cfg);
/* x [B, L, query_dim], or [B, C, H, W] (flattened to [B, H*W, C] and back,
 * as AttnProcessor2_0 does).  context [B, Lk, cross_dim] or NULL
 * (self-attention).  mask: additive, as diffuse_sdpa, or NULL. */
/* IP-Adapter's extra attention of a cross-attention layer (diffusers'
 * IPAdapterAttnProcessor): softmax (q k_ip^T) v_ip over the image tokens,
 * added to the text attention's output times scale, before to_out. */
typedef struct {
  DiffuseTensor *tokens;     /* [B, T, cross_attention_dim], NULL = none */
  DiffuseTensor *k_w, *v_w;  /* to_k_ip, to_v_ip: [inner, cross_attention_dim] */
  float scale;
} DiffuseBlkIp;

DiffuseTensor *diffuse_blk_attention_forward (const DiffuseBlkAttention *a, DiffuseTensor *x,
                                              DiffuseTensor *context, DiffuseTensor *mask);
DiffuseTensor *diffuse_blk_attention_forward_ip (const DiffuseBlkAttention *a, DiffuseTensor *x,
                                                DiffuseTensor *context, DiffuseTensor *mask, const DiffuseBlkIp *ip);
void diffuse_blk_attention_clear (DiffuseBlkAttention *a);

/* ---- BasicTransformerBlock / Transformer2DModel ------------------------- */

typedef struct {
  int dim;
  int heads;
  int dim_head;
  int cross_attention_dim;       /* 0: no attn2 */
  gboolean only_cross_attention; /* attn1 attends to the context too */
  float norm_eps;                /* 1e-5 */
  int ff_inner_dim;              /* 0: 4 * dim */
} DiffuseBlkTransformerBlockConfig;

typedef struct {
  DiffuseBlkTransformerBlockConfig cfg;
  DiffuseBlkLayerNorm norm1, norm2, norm3;
  DiffuseBlkAttention attn1, attn2;
  gboolean has_attn2;
  DiffuseBlkLinear ff_proj;   /* ff.net.0.proj (GEGLU, 2 * inner outputs) */
  DiffuseBlkLinear ff_out;    /* ff.net.2 */
} DiffuseBlkTransformerBlock;

gboolean diffuse_blk_transformer_block_load (DiffuseBlkTransformerBlock *b, DiffuseBlkLoader *l, const char *prefix,
                                             const DiffuseBlkTransformerBlockConfig *cfg);
/* x [B, L, dim], context [B, Lk, cross_dim]. */
DiffuseTensor *diffuse_blk_transformer_block_forward (const DiffuseBlkTransformerBlock *b, DiffuseTensor *x,
                                                      DiffuseTensor *context);
/* ip: for attn2 (NULL = none) */
DiffuseTensor *diffuse_blk_transformer_block_forward_ip (const DiffuseBlkTransformerBlock *b, DiffuseTensor *x,
                                                        DiffuseTensor *context, const DiffuseBlkIp *ip);
void diffuse_blk_transformer_block_clear (DiffuseBlkTransformerBlock *b);

typedef struct {
  int in_channels;
  int heads;
  int dim_head;
  int num_layers;
  int cross_attention_dim;
  int norm_num_groups;
  gboolean use_linear_projection;
  gboolean only_cross_attention;
  gboolean upcast_attention;     /* no effect: attention is computed in f32 */
} DiffuseBlkTransformer2DConfig;

typedef struct {
  DiffuseBlkTransformer2DConfig cfg;
  DiffuseBlkGroupNorm norm;      /* eps 1e-6 */
  DiffuseBlkLinear proj_in, proj_out;
  DiffuseBlkTransformerBlock *blocks;
  int n_blocks;
} DiffuseBlkTransformer2D;

gboolean diffuse_blk_transformer2d_load (DiffuseBlkTransformer2D *t, DiffuseBlkLoader *l, const char *prefix,
                                         const DiffuseBlkTransformer2DConfig *cfg);
/* x [B, C, H, W] -> [B, C, H, W] (residual included). */
DiffuseTensor *diffuse_blk_transformer2d_forward (const DiffuseBlkTransformer2D *t, DiffuseTensor *x,
                                                  DiffuseTensor *context);
/* ips: one per transformer block (n_blocks), or NULL */
DiffuseTensor *diffuse_blk_transformer2d_forward_ip (const DiffuseBlkTransformer2D *t, DiffuseTensor *x,
                                                    DiffuseTensor *context, const DiffuseBlkIp *ips);
/* SAG: softmax (scale q k^T) of the first block's self-attention, [B * heads, HW, HW] */
DiffuseTensor *diffuse_blk_transformer2d_self_attn_probs (const DiffuseBlkTransformer2D *t, DiffuseTensor *x);
void diffuse_blk_transformer2d_clear (DiffuseBlkTransformer2D *t);

/* ---- Downsample2D / Upsample2D ----------------------------------------- */

/* Downsample2D with use_conv: "<prefix>.conv", 3x3 stride 2.  padding 0 pads
 * (0, 1, 0, 1) first, as diffusers does. */
typedef struct {
  DiffuseBlkConv2d conv;
  int padding;
} DiffuseBlkDownsample;

gboolean diffuse_blk_downsample_load (DiffuseBlkDownsample *d, DiffuseBlkLoader *l, const char *prefix,
                                      int channels, int out_channels, int padding);
DiffuseTensor *diffuse_blk_downsample_forward (const DiffuseBlkDownsample *d, DiffuseTensor *x);
void diffuse_blk_downsample_clear (DiffuseBlkDownsample *d);

/* Upsample2D with use_conv: nearest x2 (or to out_h x out_w) then
 * "<prefix>.conv" 3x3 padding 1. */
typedef struct {
  DiffuseBlkConv2d conv;
} DiffuseBlkUpsample;

gboolean diffuse_blk_upsample_load (DiffuseBlkUpsample *u, DiffuseBlkLoader *l, const char *prefix, int channels,
                                    int out_channels);
/* out_h/out_w <= 0: twice the input size. */
DiffuseTensor *diffuse_blk_upsample_forward (const DiffuseBlkUpsample *u, DiffuseTensor *x, int out_h, int out_w);
void diffuse_blk_upsample_clear (DiffuseBlkUpsample *u);

/* ---- TimestepEmbedding (embeddings.py) ---------------------------------- */

typedef struct {
  DiffuseBlkLinear linear_1, linear_2;
  DiffuseBlkLinear cond_proj;   /* when cond_proj_dim > 0 (no bias) */
  DiffuseActivation act;
  DiffuseActivation post_act;   /* DIFFUSE_ACT_NONE: none */
  int in_channels;
  int cond_proj_dim;
} DiffuseBlkTimestepEmbedding;

gboolean diffuse_blk_timestep_embedding_load (DiffuseBlkTimestepEmbedding *e, DiffuseBlkLoader *l,
                                              const char *prefix, int in_channels, int time_embed_dim,
                                              DiffuseActivation act, DiffuseActivation post_act,
                                              int cond_proj_dim);
/* sample [B, in_channels] (the sinusoidal embedding), condition [B, cond_proj_dim] or NULL. */
DiffuseTensor *diffuse_blk_timestep_embedding_forward (const DiffuseBlkTimestepEmbedding *e, DiffuseTensor *sample,
                                                       DiffuseTensor *condition);
void diffuse_blk_timestep_embedding_clear (DiffuseBlkTimestepEmbedding *e);

G_END_DECLS

/* gst-diffuse — AutoencoderKL, as diffusers' AutoencoderKL (Encoder, Decoder,
 * DiagonalGaussianDistribution, tiled encode/decode, slicing).
 *
 * Encoder: conv_in, DownEncoderBlock2D x n (resnets, Downsample2D with
 * (0,1,0,1) padding except the last), UNetMidBlock2D (resnet, attention,
 * resnet), GroupNorm + SiLU, conv_out (2 * latent channels), quant_conv.
 * Decoder: post_quant_conv, conv_in, mid block, UpDecoderBlock2D x n
 * (layers_per_block + 1 resnets, Upsample2D except the last), GroupNorm +
 * SiLU, conv_out. */
#include <diffuse/vae.h>
#include <diffuse/error.h>
#include <math.h>
#include <string.h>

#include "models/blocks.h"
#include "tensor/ops_extra2.h"

#define VAE_EPS 1e-6f

typedef struct {
  DiffuseBlkResnet *resnets;
  int n_resnets;
  gboolean has_sampler;
  DiffuseBlkDownsample down;   /* encoder blocks */
  DiffuseBlkUpsample up;       /* decoder blocks */
} VaeBlock;

typedef struct {
  DiffuseBlkResnet resnets[2];
  gboolean has_attention;
  DiffuseBlkAttention attn;
} VaeMid;

typedef struct {
  DiffuseBlkConv2d conv_in, conv_out;
  VaeBlock *blocks;
  int n_blocks;
  VaeMid mid;
  DiffuseBlkGroupNorm norm_out;
} VaeCoder;

struct _DiffuseVae {
  gint ref_count;
  DiffuseDevice *dev;
  DiffuseDType dtype;
  int in_ch, out_ch, latent_ch, layers, groups, sample_size, n_levels;
  gint64 *block_out;
  DiffuseActivation act;
  double scaling_factor, shift_factor;
  gboolean has_shift;
  double *latents_mean, *latents_std;
  guint n_latents_mean, n_latents_std;
  gboolean force_upcast, use_quant_conv, use_post_quant_conv, mid_attention;
  VaeCoder enc, dec;
  DiffuseBlkConv2d quant_conv, post_quant_conv;
};

/* ---- loading ----------------------------------------------------------- */

static void
mid_load (VaeMid *mid, DiffuseBlkLoader *l, DiffuseWeights *w, const char *prefix, const DiffuseVae *v, int ch)
{
  DiffuseBlkResnetConfig rc;
  diffuse_blk_resnet_config_init (&rc, ch, ch, 0);
  rc.groups = v->groups;
  rc.eps = VAE_EPS;
  rc.act = v->act;
  for (int i = 0; i < 2; i++) {
    char *p = g_strdup_printf ("%s.resnets.%d", prefix, i);
    diffuse_blk_resnet_load (&mid->resnets[i], l, p, &rc);
    g_free (p);
  }
  mid->has_attention = v->mid_attention;
  if (!mid->has_attention)
    return;

  /* diffusers' UNetMidBlock2D attention for the VAE: one head of width C,
   * group norm on the input, biases, residual */
  DiffuseBlkAttentionConfig ac;
  diffuse_blk_attention_config_init (&ac, ch, 0, 1, ch);
  ac.bias = TRUE;
  ac.out_bias = TRUE;
  ac.norm_num_groups = v->groups;
  ac.eps = VAE_EPS;
  ac.residual_connection = TRUE;
  ac.rescale_output_factor = 1.0f;
  char *ap = g_strdup_printf ("%s.attentions.0", prefix);
  if (!diffuse_blk_has (l, ap, "query.weight")) {
    diffuse_blk_attention_load (&mid->attn, l, ap, &ac);
  } else {
    /* deprecated attention block names (ModelMixin._fix_state_dict_keys_on_load):
     * query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0; very old files
     * keep them as 1x1 convolutions */
    static const char *const old[4] = { "query", "key", "value", "proj_attn" };
    DiffuseBlkLinear *dst[4] = { &mid->attn.to_q, &mid->attn.to_k, &mid->attn.to_v, &mid->attn.to_out };
    memset (&mid->attn, 0, sizeof mid->attn);
    mid->attn.cfg = ac;
    char *gp = g_strdup_printf ("%s.group_norm", ap);
    diffuse_blk_group_norm_load (&mid->attn.group_norm, l, gp, ch, v->groups, VAE_EPS);
    g_free (gp);
    for (int i = 0; i < 4; i++) {
      char *lp = g_strdup_printf ("%s.%s", ap, old[i]);
      char *key = g_strdup_printf ("%s.weight", lp);
      const DiffuseStEntry *e = diffuse_weights_has (w, key) ? diffuse_weights_entry (w, key) : NULL;
      if (e && e->ndim == 4)
        diffuse_blk_linear_load_conv1x1 (dst[i], l, lp, ch, ch, TRUE);
      else
        diffuse_blk_linear_load (dst[i], l, lp, ch, ch, TRUE);
      g_free (key);
      g_free (lp);
    }
  }
  g_free (ap);
}

static void
coder_load (VaeCoder *c, DiffuseBlkLoader *l, DiffuseWeights *w, const DiffuseVae *v, gboolean decoder)
{
  const char *root = decoder ? "decoder" : "encoder";
  int n = v->n_levels;
  int top = (int) v->block_out[n - 1], bottom = (int) v->block_out[0];
  char *p;

  p = g_strdup_printf ("%s.conv_in", root);
  if (decoder)
    diffuse_blk_conv2d_load (&c->conv_in, l, p, v->latent_ch, top, 3, 1, 1, TRUE);
  else
    diffuse_blk_conv2d_load (&c->conv_in, l, p, v->in_ch, bottom, 3, 1, 1, TRUE);
  g_free (p);

  DiffuseBlkResnetConfig rc;
  c->n_blocks = n;
  c->blocks = g_new0 (VaeBlock, n);
  int prev = decoder ? top : bottom;
  for (int i = 0; i < n; i++) {
    VaeBlock *b = &c->blocks[i];
    int out = (int) (decoder ? v->block_out[n - 1 - i] : v->block_out[i]);
    b->n_resnets = decoder ? v->layers + 1 : v->layers;
    b->resnets = g_new0 (DiffuseBlkResnet, b->n_resnets);
    for (int j = 0; j < b->n_resnets; j++) {
      diffuse_blk_resnet_config_init (&rc, j == 0 ? prev : out, out, 0);
      rc.groups = v->groups;
      rc.eps = VAE_EPS;
      rc.act = v->act;
      p = g_strdup_printf ("%s.%s.%d.resnets.%d", root, decoder ? "up_blocks" : "down_blocks", i, j);
      diffuse_blk_resnet_load (&b->resnets[j], l, p, &rc);
      g_free (p);
    }
    b->has_sampler = i != n - 1;
    if (b->has_sampler) {
      if (decoder) {
        p = g_strdup_printf ("%s.up_blocks.%d.upsamplers.0", root, i);
        diffuse_blk_upsample_load (&b->up, l, p, out, out);
      } else {
        p = g_strdup_printf ("%s.down_blocks.%d.downsamplers.0", root, i);
        diffuse_blk_downsample_load (&b->down, l, p, out, out, 0);
      }
      g_free (p);
    }
    prev = out;
  }

  p = g_strdup_printf ("%s.mid_block", root);
  mid_load (&c->mid, l, w, p, v, top);
  g_free (p);

  p = g_strdup_printf ("%s.conv_norm_out", root);
  diffuse_blk_group_norm_load (&c->norm_out, l, p, decoder ? bottom : top, v->groups, VAE_EPS);
  g_free (p);
  p = g_strdup_printf ("%s.conv_out", root);
  if (decoder)
    diffuse_blk_conv2d_load (&c->conv_out, l, p, bottom, v->out_ch, 3, 1, 1, TRUE);
  else
    diffuse_blk_conv2d_load (&c->conv_out, l, p, top, 2 * v->latent_ch, 3, 1, 1, TRUE);
  g_free (p);
}

static void
coder_clear (VaeCoder *c)
{
  diffuse_blk_conv2d_clear (&c->conv_in);
  diffuse_blk_conv2d_clear (&c->conv_out);
  for (int i = 0; c->blocks && i < c->n_blocks; i++) {
    VaeBlock *b = &c->blocks[i];
    for (int j = 0; b->resnets && j < b->n_resnets; j++)
      diffuse_blk_resnet_clear (&b->resnets[j]);
    g_free (b->resnets);
    diffuse_blk_downsample_clear (&b->down);
    diffuse_blk_upsample_clear (&b->up);
  }
  g_free (c->blocks);
  for (int i = 0; i < 2; i++)
    diffuse_blk_resnet_clear (&c->mid.resnets[i]);
  diffuse_blk_attention_clear (&c->mid.attn);
  diffuse_blk_group_norm_clear (&c->norm_out);
  memset (c, 0, sizeof *c);
}

static void
vae_free (DiffuseVae *v)
{
  coder_clear (&v->enc);
  coder_clear (&v->dec);
  diffuse_blk_conv2d_clear (&v->quant_conv);
  diffuse_blk_conv2d_clear (&v->post_quant_conv);
  g_free (v->block_out);
  g_free (v->latents_mean);
  g_free (v->latents_std);
  g_free (v);
}

static gboolean
check_block_types (DiffuseConfig *config, const char *key, const char *want, guint n, GError **error)
{
  char **types = diffuse_config_get_string_array (config, key);
  gboolean ok = TRUE;
  if (!types) {
    /* diffusers' default: one block of the plain type */
    if (n != 1) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                   "%s: %s is missing but block_out_channels has %u entries", diffuse_config_label (config), key,
                   n);
      ok = FALSE;
    }
    return ok;
  }
  if (g_strv_length (types) != n) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                 "%s: %s has %u entries, block_out_channels %u", diffuse_config_label (config), key,
                 g_strv_length (types), n);
    ok = FALSE;
  }
  for (char **t = types; ok && *t; t++)
    if (!g_str_equal (*t, want)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: %s \"%s\" is not supported (only %s)",
                   diffuse_config_label (config), key, *t, want);
      ok = FALSE;
    }
  g_strfreev (types);
  return ok;
}

DiffuseVae *
diffuse_vae_new (DiffuseConfig *config, DiffuseWeights *weights, DiffuseDevice *dev, DiffuseDType dtype,
                 GError **error)
{
  g_return_val_if_fail (config != NULL && weights != NULL && dev != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);
  const char *label = diffuse_config_label (config);

  DiffuseVae *v = g_new0 (DiffuseVae, 1);
  v->ref_count = 1;
  v->dev = dev;
  v->dtype = dtype;
  v->in_ch = (int) diffuse_config_get_int (config, "in_channels", 3);
  v->out_ch = (int) diffuse_config_get_int (config, "out_channels", 3);
  v->latent_ch = (int) diffuse_config_get_int (config, "latent_channels", 4);
  v->layers = (int) diffuse_config_get_int (config, "layers_per_block", 1);
  v->groups = (int) diffuse_config_get_int (config, "norm_num_groups", 32);
  v->scaling_factor = diffuse_config_get_double (config, "scaling_factor", 0.18215);
  v->has_shift = diffuse_config_has (config, "shift_factor");
  v->shift_factor = diffuse_config_get_double (config, "shift_factor", 0.0);
  v->n_latents_mean = diffuse_config_get_double_array (config, "latents_mean", &v->latents_mean);
  v->n_latents_std = diffuse_config_get_double_array (config, "latents_std", &v->latents_std);
  v->force_upcast = diffuse_config_get_bool (config, "force_upcast", TRUE);
  v->use_quant_conv = diffuse_config_get_bool (config, "use_quant_conv", TRUE);
  v->use_post_quant_conv = diffuse_config_get_bool (config, "use_post_quant_conv", TRUE);
  v->mid_attention = diffuse_config_get_bool (config, "mid_block_add_attention", TRUE);
  /* sample_size may be an int or [h, w]: diffusers tiles with the first entry */
  gint64 *ss = NULL;
  guint n_ss = diffuse_config_get_int_array (config, "sample_size", &ss);
  v->sample_size = n_ss > 0 ? (int) ss[0] : 32;
  g_free (ss);
  guint n = diffuse_config_get_int_array (config, "block_out_channels", &v->block_out);
  if (n == 0) {
    v->block_out = g_new (gint64, 1);
    v->block_out[0] = 64;
    n = 1;
  }
  v->n_levels = (int) n;

  gboolean ok = TRUE;
  for (guint i = 0; i < n; i++)
    if (v->block_out[i] <= 0 || v->block_out[i] % MAX (v->groups, 1) != 0)
      ok = FALSE;
  if (!ok || v->in_ch <= 0 || v->out_ch <= 0 || v->latent_ch <= 0 || v->layers <= 0 || v->groups <= 0 ||
      v->sample_size <= 0 || n > 16) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                 "%s: invalid AutoencoderKL config (block_out_channels must be positive multiples of "
                 "norm_num_groups %d; in/out/latent channels, layers_per_block, sample_size positive)",
                 label, v->groups);
    goto fail;
  }
  if (!check_block_types (config, "down_block_types", "DownEncoderBlock2D", n, error) ||
      !check_block_types (config, "up_block_types", "UpDecoderBlock2D", n, error))
    goto fail;
  const char *act = diffuse_config_get_string (config, "act_fn", "silu");
  if (!diffuse_blk_parse_activation (act, "act_fn", label, &v->act, error))
    goto fail;

  char *component = g_strdup_printf ("AutoencoderKL (%s)", label);
  DiffuseBlkLoader *l = diffuse_blk_loader_new (weights, component, dtype, dev);
  g_free (component);
  coder_load (&v->enc, l, weights, v, FALSE);
  coder_load (&v->dec, l, weights, v, TRUE);
  if (v->use_quant_conv)
    diffuse_blk_conv2d_load (&v->quant_conv, l, "quant_conv", 2 * v->latent_ch, 2 * v->latent_ch, 1, 1, 0, TRUE);
  if (v->use_post_quant_conv)
    diffuse_blk_conv2d_load (&v->post_quant_conv, l, "post_quant_conv", v->latent_ch, v->latent_ch, 1, 1, 0,
                             TRUE);
  ok = diffuse_blk_loader_finish (l, NULL, error);
  diffuse_blk_loader_free (l);
  if (!ok)
    goto fail;
  return v;

fail:
  vae_free (v);
  return NULL;
}

DiffuseVae *
diffuse_vae_ref (DiffuseVae *v)
{
  g_return_val_if_fail (v != NULL, NULL);
  g_atomic_int_inc (&v->ref_count);
  return v;
}

void
diffuse_vae_unref (DiffuseVae *v)
{
  if (v && g_atomic_int_dec_and_test (&v->ref_count))
    vae_free (v);
}

double diffuse_vae_scaling_factor (DiffuseVae *v) { return v->scaling_factor; }
gboolean
diffuse_vae_shift_factor (DiffuseVae *v, double *out)
{
  if (out)
    *out = v->has_shift ? v->shift_factor : 0.0;
  return v->has_shift;
}
guint
diffuse_vae_latents_mean (DiffuseVae *v, const double **values)
{
  if (values)
    *values = v->latents_mean;
  return v->n_latents_mean;
}
guint
diffuse_vae_latents_std (DiffuseVae *v, const double **values)
{
  if (values)
    *values = v->latents_std;
  return v->n_latents_std;
}
gboolean diffuse_vae_force_upcast (DiffuseVae *v) { return v->force_upcast; }
int diffuse_vae_in_channels (DiffuseVae *v) { return v->in_ch; }
int diffuse_vae_out_channels (DiffuseVae *v) { return v->out_ch; }
int diffuse_vae_latent_channels (DiffuseVae *v) { return v->latent_ch; }
int diffuse_vae_scale_factor (DiffuseVae *v) { return 1 << (v->n_levels - 1); }
int diffuse_vae_sample_size (DiffuseVae *v) { return v->sample_size; }
DiffuseDevice *diffuse_vae_device (DiffuseVae *v) { return v->dev; }
DiffuseDType diffuse_vae_dtype (DiffuseVae *v) { return v->dtype; }

void
diffuse_vae_default_params (DiffuseVaeParams *p)
{
  memset (p, 0, sizeof *p);
  p->tile_overlap_factor = 0.25f;
}

/* ---- forward ----------------------------------------------------------- */

/* Replaces *h by f(*h) and drops the old value. */
#define STEP(h, expr)                    \
  G_STMT_START {                         \
    DiffuseTensor *next_ = (expr);       \
    diffuse_tensor_clear (h);            \
    *(h) = next_;                        \
  } G_STMT_END

static DiffuseTensor *
mid_forward (const VaeMid *mid, DiffuseTensor *x)
{
  DiffuseTensor *h = diffuse_blk_resnet_forward (&mid->resnets[0], x, NULL);
  if (mid->has_attention)
    STEP (&h, diffuse_blk_attention_forward (&mid->attn, h, NULL, NULL));
  STEP (&h, diffuse_blk_resnet_forward (&mid->resnets[1], h, NULL));
  return h;
}

/* The encoder plus quant_conv: image tile -> moments [B, 2C, h, w]. */
static DiffuseTensor *
encode_moments (const DiffuseVae *v, DiffuseTensor *x)
{
  const VaeCoder *c = &v->enc;
  DiffuseTensor *h = diffuse_blk_conv2d (&c->conv_in, x);
  for (int i = 0; i < c->n_blocks; i++) {
    const VaeBlock *b = &c->blocks[i];
    for (int j = 0; j < b->n_resnets; j++)
      STEP (&h, diffuse_blk_resnet_forward (&b->resnets[j], h, NULL));
    if (b->has_sampler)
      STEP (&h, diffuse_blk_downsample_forward (&b->down, h));
  }
  STEP (&h, mid_forward (&c->mid, h));
  STEP (&h, diffuse_blk_group_norm (&c->norm_out, h, DIFFUSE_ACT_SILU));
  STEP (&h, diffuse_blk_conv2d (&c->conv_out, h));
  if (v->use_quant_conv)
    STEP (&h, diffuse_blk_conv2d (&v->quant_conv, h));
  return h;
}

/* post_quant_conv plus the decoder: latent tile -> image. */
static DiffuseTensor *
decode_latents (const DiffuseVae *v, DiffuseTensor *z)
{
  const VaeCoder *c = &v->dec;
  DiffuseTensor *h = diffuse_tensor_ref (z);
  if (v->use_post_quant_conv)
    STEP (&h, diffuse_blk_conv2d (&v->post_quant_conv, h));
  STEP (&h, diffuse_blk_conv2d (&c->conv_in, h));
  STEP (&h, mid_forward (&c->mid, h));
  for (int i = 0; i < c->n_blocks; i++) {
    const VaeBlock *b = &c->blocks[i];
    for (int j = 0; j < b->n_resnets; j++)
      STEP (&h, diffuse_blk_resnet_forward (&b->resnets[j], h, NULL));
    if (b->has_sampler)
      STEP (&h, diffuse_blk_upsample_forward (&b->up, h, 0, 0));
  }
  STEP (&h, diffuse_blk_group_norm (&c->norm_out, h, DIFFUSE_ACT_SILU));
  STEP (&h, diffuse_blk_conv2d (&c->conv_out, h));
  return h;
}

typedef DiffuseTensor *(*TileFunc) (const DiffuseVae *v, DiffuseTensor *x);

/* A [1, 1, n, 1] (vertical) or [1, 1, 1, n] weight ramp on the model's device:
 * first ? (1 - y / n) : (y / n), rounded to float as torch does with a
 * Python scalar. */
static DiffuseTensor *
ramp (const DiffuseVae *v, int n, gboolean vertical, gboolean first)
{
  float *w = g_new (float, n);
  for (int y = 0; y < n; y++)
    w[y] = first ? (float) (1.0 - (double) y / n) : (float) ((double) y / n);
  int64_t shape[4] = { 1, 1, vertical ? n : 1, vertical ? 1 : n };
  DiffuseTensor *h = diffuse_tensor_from_f32 (w, 4, shape);
  g_free (w);
  DiffuseTensor *c = diffuse_cast (h, v->dtype);
  diffuse_tensor_clear (&h);
  DiffuseTensor *d = diffuse_to_device (c, v->dev);
  diffuse_tensor_clear (&c);
  return d;
}

/* diffusers' blend_v (dim 2) / blend_h (dim 3): the first `extent` rows
 * (columns) of b become a's last ones faded into b's, in place. */
static gboolean
blend (const DiffuseVae *v, DiffuseTensor *a, DiffuseTensor *b, int extent, int dim)
{
  extent = (int) MIN (MIN (a->shape[dim], b->shape[dim]), extent);
  if (extent <= 0)
    return TRUE;
  DiffuseTensor *wa = ramp (v, extent, dim == 2, TRUE);
  DiffuseTensor *wb = ramp (v, extent, dim == 2, FALSE);
  DiffuseTensor *a_end = diffuse_narrow (a, dim, a->shape[dim] - extent, extent);
  DiffuseTensor *b_start = diffuse_narrow (b, dim, 0, extent);
  DiffuseTensor *ta = diffuse_mul (a_end, wa);
  DiffuseTensor *tb = diffuse_mul (b_start, wb);
  DiffuseTensor *sum = ta && tb ? diffuse_add (ta, tb) : NULL;
  gboolean ok = sum && diffuse_copy_into (b_start, sum);
  diffuse_tensor_clear (&wa);
  diffuse_tensor_clear (&wb);
  diffuse_tensor_clear (&a_end);
  diffuse_tensor_clear (&b_start);
  diffuse_tensor_clear (&ta);
  diffuse_tensor_clear (&tb);
  diffuse_tensor_clear (&sum);
  return ok;
}

static void
clear_row (DiffuseTensor **row, int n)
{
  for (int j = 0; row && j < n; j++)
    diffuse_tensor_clear (&row[j]);
}

/* diffusers' _tiled_encode / tiled_decode on x [B, C, H, W]: tiles of
 * tile_in (input units) every overlap_size, each run through f (output
 * tile_out), blended with the tile above and to the left over blend_extent,
 * cropped to row_limit and stitched.  Only two rows of tiles are alive. */
static DiffuseTensor *
run_tiled (const DiffuseVae *v, DiffuseTensor *x, TileFunc f, int tile_in, int tile_out, float overlap)
{
  int overlap_size = (int) (tile_in * (1.0 - (double) overlap));
  int blend_extent = (int) (tile_out * (double) overlap);
  int row_limit = tile_out - blend_extent;
  int64_t H = x->shape[2], W = x->shape[3];
  g_return_val_if_fail (overlap_size > 0 && row_limit > 0, NULL);
  int ni = (int) ((H + overlap_size - 1) / overlap_size), nj = (int) ((W + overlap_size - 1) / overlap_size);

  DiffuseTensor **prev = g_new0 (DiffuseTensor *, nj), **cur = g_new0 (DiffuseTensor *, nj);
  DiffuseTensor **crops = g_new0 (DiffuseTensor *, nj), **rows = g_new0 (DiffuseTensor *, ni);
  gboolean ok = TRUE;
  for (int i = 0; ok && i < ni; i++) {
    int64_t y0 = (int64_t) i * overlap_size;
    for (int j = 0; ok && j < nj; j++) {
      int64_t x0 = (int64_t) j * overlap_size;
      DiffuseTensor *t1 = diffuse_narrow (x, 2, y0, MIN (tile_in, H - y0));
      DiffuseTensor *t2 = t1 ? diffuse_narrow (t1, 3, x0, MIN (tile_in, W - x0)) : NULL;
      diffuse_tensor_clear (&t1);
      DiffuseTensor *tile = diffuse_contiguous (t2);
      diffuse_tensor_clear (&t2);
      cur[j] = tile ? f (v, tile) : NULL;
      diffuse_tensor_clear (&tile);
      /* blending writes into the tile: it must be a buffer of its own */
      ok = cur[j] && diffuse_tensor_is_contiguous (cur[j]) && !diffuse_tensor_is_borrowed (cur[j]);
    }
    for (int j = 0; ok && j < nj; j++) {
      if (i > 0)
        ok = blend (v, prev[j], cur[j], blend_extent, 2);
      if (ok && j > 0)
        ok = blend (v, cur[j - 1], cur[j], blend_extent, 3);
      DiffuseTensor *c1 = ok ? diffuse_narrow (cur[j], 2, 0, MIN (row_limit, cur[j]->shape[2])) : NULL;
      crops[j] = c1 ? diffuse_narrow (c1, 3, 0, MIN (row_limit, c1->shape[3])) : NULL;
      diffuse_tensor_clear (&c1);
      ok = ok && crops[j];
    }
    if (ok) {
      rows[i] = diffuse_concat (crops, nj, 3);
      ok = rows[i] != NULL;
    }
    clear_row (crops, nj);
    clear_row (prev, nj);
    DiffuseTensor **tmp = prev;
    prev = cur;
    cur = tmp;
  }
  clear_row (prev, nj);
  clear_row (cur, nj);
  DiffuseTensor *out = ok ? diffuse_concat (rows, ni, 2) : NULL;
  clear_row (rows, ni);
  g_free (prev);
  g_free (cur);
  g_free (crops);
  g_free (rows);
  return out;
}

static gboolean
op_failed (GError **error, const char *what)
{
  GError *e = NULL;
  if (diffuse_tensor_take_error (&e))
    g_propagate_prefixed_error (error, e, "AutoencoderKL %s: ", what);
  else
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "AutoencoderKL %s: an operation failed", what);
  return FALSE;
}

static int
tile_latent_size (const DiffuseVae *v, const DiffuseVaeParams *p)
{
  if (p->tile_latent_min_size > 0)
    return p->tile_latent_min_size;
  return (int) ((double) v->sample_size / (double) (1 << (v->n_levels - 1)));
}

/* One batch slice through f, tiled when asked and the input exceeds a tile. */
static DiffuseTensor *
run_one (const DiffuseVae *v, DiffuseTensor *x, gboolean decode, const DiffuseVaeParams *p)
{
  int tile_sample = p->tile_sample_min_size > 0 ? p->tile_sample_min_size : v->sample_size;
  int tile_latent = tile_latent_size (v, p);
  float overlap = p->tile_overlap_factor;
  if (decode) {
    if (p->tiling && (x->shape[3] > tile_latent || x->shape[2] > tile_latent))
      return run_tiled (v, x, decode_latents, tile_latent, tile_sample, overlap);
    return decode_latents (v, x);
  }
  if (p->tiling && (x->shape[3] > tile_sample || x->shape[2] > tile_sample))
    return run_tiled (v, x, encode_moments, tile_sample, tile_latent, overlap);
  return encode_moments (v, x);
}

static DiffuseTensor *
run (const DiffuseVae *v, DiffuseTensor *x, gboolean decode, const DiffuseVaeParams *p)
{
  int64_t B = x->shape[0];
  if (!p->slicing || B <= 1)
    return run_one (v, x, decode, p);
  DiffuseTensor **parts = g_new0 (DiffuseTensor *, B);
  gboolean ok = TRUE;
  for (int64_t b = 0; ok && b < B; b++) {
    DiffuseTensor *s = diffuse_narrow (x, 0, b, 1);
    parts[b] = s ? run_one (v, s, decode, p) : NULL;
    diffuse_tensor_clear (&s);
    ok = parts[b] != NULL;
  }
  DiffuseTensor *out = ok ? diffuse_concat (parts, (int) B, 0) : NULL;
  clear_row (parts, (int) B);
  g_free (parts);
  return out;
}

/* Tiling geometry that run_tiled can work with, in both directions. */
static gboolean
check_params (const DiffuseVae *v, const DiffuseVaeParams *p, const char *what, GError **error)
{
  if (!p->tiling)
    return TRUE;
  int tile_sample = p->tile_sample_min_size > 0 ? p->tile_sample_min_size : v->sample_size;
  int tile_latent = tile_latent_size (v, p);
  double f = p->tile_overlap_factor;
  gboolean ok = f >= 0.0 && f < 1.0 && tile_sample > 0 && tile_latent > 0;
  ok = ok && (int) (tile_sample * (1.0 - f)) > 0 && (int) (tile_latent * (1.0 - f)) > 0;
  ok = ok && tile_sample - (int) (tile_sample * f) > 0 && tile_latent - (int) (tile_latent * f) > 0;
  if (!ok)
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "AutoencoderKL %s: tiling with tile sizes %d (sample) / %d (latent) and overlap factor %g "
                 "leaves no stride", what, tile_sample, tile_latent, f);
  return ok;
}

static gboolean
check_input (const DiffuseVae *v, DiffuseTensor *x, int channels, const char *what, GError **error)
{
  if (x->ndim != 4 || x->shape[1] != channels || x->shape[0] <= 0 || x->shape[2] <= 0 || x->shape[3] <= 0) {
    char *d = diffuse_tensor_describe (x);
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "AutoencoderKL %s: input %s is not [B, %d, H, W]", what, d, channels);
    g_free (d);
    return FALSE;
  }
  if (diffuse_tensor_device (x) != v->dev) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "AutoencoderKL %s: input is on %s, the model on %s", what,
                 diffuse_device_name (diffuse_tensor_device (x)), diffuse_device_name (v->dev));
    return FALSE;
  }
  return TRUE;
}

gboolean
diffuse_vae_encode (DiffuseVae *v, DiffuseTensor *image, const DiffuseVaeParams *params, DiffuseTensor **mean,
                    DiffuseTensor **logvar, GError **error)
{
  g_return_val_if_fail (v != NULL && image != NULL && mean != NULL && logvar != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);
  *mean = *logvar = NULL;
  DiffuseVaeParams defaults;
  if (!params) {
    diffuse_vae_default_params (&defaults);
    params = &defaults;
  }
  if (!check_input (v, image, v->in_ch, "encode", error) || !check_params (v, params, "encode", error))
    return FALSE;
  DiffuseTensor *x = diffuse_cast (image, v->dtype);
  DiffuseTensor *moments = x ? run (v, x, FALSE, params) : NULL;
  diffuse_tensor_clear (&x);
  DiffuseTensor *parts[2] = { NULL, NULL };
  if (!moments || !diffuse_chunk (moments, 2, 1, parts)) {
    diffuse_tensor_clear (&moments);
    return op_failed (error, "encode");
  }
  diffuse_tensor_unref (moments);
  *mean = diffuse_contiguous (parts[0]);
  *logvar = diffuse_clamp (parts[1], -30.0f, 20.0f);
  diffuse_tensor_clear (&parts[0]);
  diffuse_tensor_clear (&parts[1]);
  if (!*mean || !*logvar) {
    diffuse_tensor_clear (mean);
    diffuse_tensor_clear (logvar);
    return op_failed (error, "encode (posterior)");
  }
  return TRUE;
}

DiffuseTensor *
diffuse_vae_posterior_sample (DiffuseTensor *mean, DiffuseTensor *logvar, const float *noise, GError **error)
{
  g_return_val_if_fail (mean != NULL && logvar != NULL && noise != NULL, NULL);
  g_return_val_if_fail (diffuse_tensor_same_shape (mean, logvar), NULL);
  DiffuseTensor *std = diffuse_exp (logvar, 0.5f);
  DiffuseTensor *hn = diffuse_tensor_from_f32 (noise, mean->ndim, mean->shape);
  DiffuseTensor *cn = diffuse_cast (hn, mean->dtype);
  diffuse_tensor_clear (&hn);
  DiffuseTensor *n = diffuse_to_device (cn, diffuse_tensor_device (mean));
  diffuse_tensor_clear (&cn);
  DiffuseTensor *sn = std && n ? diffuse_mul (std, n) : NULL;
  diffuse_tensor_clear (&std);
  diffuse_tensor_clear (&n);
  DiffuseTensor *out = sn ? diffuse_add (mean, sn) : NULL;
  diffuse_tensor_clear (&sn);
  if (!out)
    op_failed (error, "posterior sample");
  return out;
}

DiffuseTensor *
diffuse_vae_decode (DiffuseVae *v, DiffuseTensor *latents, const DiffuseVaeParams *params, GError **error)
{
  g_return_val_if_fail (v != NULL && latents != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);
  DiffuseVaeParams defaults;
  if (!params) {
    diffuse_vae_default_params (&defaults);
    params = &defaults;
  }
  if (!check_input (v, latents, v->latent_ch, "decode", error) || !check_params (v, params, "decode", error))
    return NULL;
  DiffuseTensor *z = diffuse_cast (latents, v->dtype);
  DiffuseTensor *out = z ? run (v, z, TRUE, params) : NULL;
  diffuse_tensor_clear (&z);
  if (!out)
    op_failed (error, "decode");
  return out;
}

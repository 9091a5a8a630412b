/* gst-diffuse — MotionAdapter and its motion modules (diffusers
 * models/unets/unet_motion_model.py: MotionAdapter, MotionModules,
 * AnimateDiffTransformer3D; models/attention.py: BasicTransformerBlock with
 * positional_embeddings="sinusoidal"; models/embeddings.py:
 * SinusoidalPositionalEmbedding).
 *
 * State-dict layout (prefixes are the safetensors keys):
 *   down_blocks.i.motion_modules.j.{norm, proj_in, proj_out,
 *       transformer_blocks.k.{norm1, attn1, norm2, attn2, norm3,
 *                             ff.net.0.proj, ff.net.2, pos_embed.pe}}
 *   mid_block.motion_modules.j....      (use_motion_mid_block)
 *   up_blocks.i.motion_modules.j....    (j < layers + 1)
 *   conv_in                              (conv_in_channels) */
#include "models/motion_private.h"

#include <diffuse/error.h>
#include <math.h>
#include <string.h>

static inline DiffuseTensor *
swap (DiffuseTensor *old, DiffuseTensor *result)
{
  diffuse_tensor_unref (old);
  return result;
}

static gboolean
cfg_error (GError **error, DiffuseErrorCode code, const char *label, const char *fmt, ...) G_GNUC_PRINTF (4, 5);

static gboolean
cfg_error (GError **error, DiffuseErrorCode code, const char *label, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  g_set_error (error, DIFFUSE_ERROR, code, "%s: %s", label, msg);
  g_free (msg);
  return FALSE;
}

/* An int, or a list of n ints (n = 0: any length, returned in *len). */
static gboolean
int_or_list (DiffuseConfig *c, const char *label, const char *key, int n, gint64 def, int **out, int *len,
             GError **error)
{
  JsonNode *node = diffuse_config_get_node (c, key);
  if (!node || JSON_NODE_HOLDS_NULL (node)) {
    *out = g_new (int, MAX (n, 1));
    for (int i = 0; i < MAX (n, 1); i++)
      (*out)[i] = (int) def;
    if (len)
      *len = MAX (n, 1);
    return TRUE;
  }
  if (JSON_NODE_HOLDS_VALUE (node) && json_node_get_value_type (node) == G_TYPE_INT64) {
    *out = g_new (int, MAX (n, 1));
    for (int i = 0; i < MAX (n, 1); i++)
      (*out)[i] = (int) json_node_get_int (node);
    if (len)
      *len = MAX (n, 1);
    return TRUE;
  }
  if (JSON_NODE_HOLDS_ARRAY (node)) {
    JsonArray *a = json_node_get_array (node);
    int m = (int) json_array_get_length (a);
    if (n > 0 && m != n)
      return cfg_error (error, DIFFUSE_ERROR_CONFIG, label, "\"%s\" has %d entries, %d expected", key, m, n);
    int *v = g_new (int, MAX (m, 1));
    for (int i = 0; i < m; i++) {
      JsonNode *e = json_array_get_element (a, i);
      if (JSON_NODE_HOLDS_ARRAY (e)) {
        g_free (v);
        return cfg_error (error, DIFFUSE_ERROR_UNSUPPORTED, label,
                          "\"%s\" with per-layer lists is not supported (diffusers' MotionAdapter cannot build "
                          "its up blocks from them either)", key);
      }
      if (!JSON_NODE_HOLDS_VALUE (e) || json_node_get_value_type (e) != G_TYPE_INT64) {
        g_free (v);
        return cfg_error (error, DIFFUSE_ERROR_CONFIG, label, "\"%s\" should hold integers", key);
      }
      v[i] = (int) json_node_get_int (e);
    }
    *out = v;
    if (len)
      *len = m;
    return TRUE;
  }
  return cfg_error (error, DIFFUSE_ERROR_CONFIG, label, "\"%s\" should be an integer or a list of integers", key);
}

/* ---- blocks --------------------------------------------------------------- */

static void
tblock_clear (MotionTransformerBlock *b)
{
  diffuse_blk_layer_norm_clear (&b->norm1);
  diffuse_blk_layer_norm_clear (&b->norm2);
  diffuse_blk_layer_norm_clear (&b->norm3);
  diffuse_blk_attention_clear (&b->attn1);
  diffuse_blk_attention_clear (&b->attn2);
  diffuse_blk_linear_clear (&b->ff_proj);
  diffuse_blk_linear_clear (&b->ff_out);
  diffuse_tensor_clear (&b->pe);
}

static void
module_clear (MotionModule *m)
{
  diffuse_blk_group_norm_clear (&m->norm);
  diffuse_blk_linear_clear (&m->proj_in);
  diffuse_blk_linear_clear (&m->proj_out);
  for (int k = 0; m->blocks && k < m->n_blocks; k++)
    tblock_clear (&m->blocks[k]);
  g_free (m->blocks);
  m->blocks = NULL;
}

static void
modules_clear (MotionModules *mm)
{
  for (int j = 0; mm->modules && j < mm->n_modules; j++)
    module_clear (&mm->modules[j]);
  g_free (mm->modules);
  mm->modules = NULL;
}

/* SinusoidalPositionalEmbedding's table, [1, max_seq, dim], as torch computes it in f32. */
static DiffuseTensor *
sinusoidal_table (int max_seq, int dim, DiffuseDType dt, DiffuseDevice *dev)
{
  float *v = g_new0 (float, (size_t) max_seq * dim);
  const float k = (float) (-log (10000.0) / dim);
  for (int i = 0; i < dim / 2; i++) {
    float div = expf ((float) (2 * i) * k);
    for (int p = 0; p < max_seq; p++) {
      float a = (float) p * div;
      v[(size_t) p * dim + 2 * i] = sinf (a);
      v[(size_t) p * dim + 2 * i + 1] = cosf (a);
    }
  }
  DiffuseTensor *t = diffuse_tensor_from_f32 (v, 3, (int64_t[]) { 1, max_seq, dim });
  g_free (v);
  t = swap (t, diffuse_to_device (t, dev));
  return swap (t, diffuse_cast (t, dt));
}

typedef struct {
  DiffuseMotionAdapter *a;
  DiffuseBlkLoader *l;
  guint64 pe_params;       /* elements of stored positional tables (buffers, not parameters) */
} Build;

static void
tblock_load (Build *b, MotionTransformerBlock *t, const char *prefix, const MotionModule *m)
{
  DiffuseBlkLoader *l = b->l;
  const int dim = m->inner;
  char *p;
  p = g_strconcat (prefix, ".norm1", NULL);
  diffuse_blk_layer_norm_load (&t->norm1, l, p, dim, 1e-5f, TRUE);
  g_free (p);
  p = g_strconcat (prefix, ".norm2", NULL);
  diffuse_blk_layer_norm_load (&t->norm2, l, p, dim, 1e-5f, TRUE);
  g_free (p);
  p = g_strconcat (prefix, ".norm3", NULL);
  diffuse_blk_layer_norm_load (&t->norm3, l, p, dim, 1e-5f, TRUE);
  g_free (p);
  DiffuseBlkAttentionConfig ac;
  diffuse_blk_attention_config_init (&ac, dim, 0, m->heads, m->dim_head);
  p = g_strconcat (prefix, ".attn1", NULL);
  diffuse_blk_attention_load (&t->attn1, l, p, &ac);
  g_free (p);
  p = g_strconcat (prefix, ".attn2", NULL);
  diffuse_blk_attention_load (&t->attn2, l, p, &ac);
  g_free (p);
  p = g_strconcat (prefix, ".ff.net.0.proj", NULL);
  diffuse_blk_linear_load (&t->ff_proj, l, p, dim, 2 * 4 * dim, TRUE);
  g_free (p);
  p = g_strconcat (prefix, ".ff.net.2", NULL);
  diffuse_blk_linear_load (&t->ff_out, l, p, 4 * dim, dim, TRUE);
  g_free (p);
  if (diffuse_blk_loader_failed (l))
    return;
  const int max_seq = b->a->max_seq_length;
  if (diffuse_blk_has (l, prefix, "pos_embed.pe")) {
    t->pe = diffuse_blk_get_s (l, prefix, "pos_embed.pe", 1, max_seq, dim);
    if (t->pe)
      b->pe_params += (guint64) diffuse_tensor_numel (t->pe);
  } else if (dim % 2 != 0) {
    diffuse_blk_loader_fail (l, g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                                             "%s: %s.pos_embed.pe is absent and a sinusoidal table of odd width %d "
                                             "cannot be made", b->a->label, prefix, dim));
  } else {
    t->pe = sinusoidal_table (max_seq, dim, b->a->dtype, b->a->dev);
    if (!t->pe) {
      GError *e = NULL;
      if (!diffuse_tensor_take_error (&e))
        e = g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s: positional table", b->a->label);
      diffuse_blk_loader_fail (l, e);
    }
  }
}

static void
module_load (Build *b, MotionModule *m, const char *prefix, int channels, int heads, int n_layers)
{
  m->channels = channels;
  m->heads = heads;
  m->dim_head = channels / heads;
  m->inner = heads * m->dim_head;
  m->n_blocks = n_layers;
  m->blocks = g_new0 (MotionTransformerBlock, MAX (n_layers, 1));
  DiffuseBlkLoader *l = b->l;
  char *p = g_strconcat (prefix, ".norm", NULL);
  diffuse_blk_group_norm_load (&m->norm, l, p, channels, b->a->norm_groups, 1e-6f);
  g_free (p);
  p = g_strconcat (prefix, ".proj_in", NULL);
  diffuse_blk_linear_load (&m->proj_in, l, p, channels, m->inner, TRUE);
  g_free (p);
  for (int k = 0; k < n_layers && !diffuse_blk_loader_failed (l); k++) {
    p = g_strdup_printf ("%s.transformer_blocks.%d", prefix, k);
    tblock_load (b, &m->blocks[k], p, m);
    g_free (p);
  }
  p = g_strconcat (prefix, ".proj_out", NULL);
  diffuse_blk_linear_load (&m->proj_out, l, p, m->inner, channels, TRUE);
  g_free (p);
}

/* MotionModules (prefix "down_blocks.0"): layers modules, tlayers[j] transformer blocks each. */
static void
modules_load (Build *b, MotionModules *mm, const char *prefix, int channels, int heads, int layers,
              const int *tlayers)
{
  mm->n_modules = layers;
  mm->modules = g_new0 (MotionModule, MAX (layers, 1));
  for (int j = 0; j < layers && !diffuse_blk_loader_failed (b->l); j++) {
    char *p = g_strdup_printf ("%s.motion_modules.%d", prefix, j);
    module_load (b, &mm->modules[j], p, channels, heads, tlayers[j]);
    g_free (p);
  }
}

/* ---- construction ------------------------------------------------------------ */

static void
adapter_free (DiffuseMotionAdapter *a)
{
  for (int i = 0; a->down && i < a->n_blocks; i++)
    modules_clear (&a->down[i]);
  for (int i = 0; a->up && i < a->n_blocks; i++)
    modules_clear (&a->up[i]);
  g_free (a->down);
  g_free (a->up);
  modules_clear (&a->mid);
  diffuse_blk_conv2d_clear (&a->conv_in);
  g_free (a->block_out);
  g_strfreev (a->unused_keys);
  g_free (a->label);
  if (a->config)
    diffuse_config_unref (a->config);
  g_free (a);
}

void
diffuse_motion_adapter_default_params (DiffuseMotionAdapterParams *p)
{
  memset (p, 0, sizeof *p);
  p->dtype = DIFFUSE_DTYPE_F32;
  p->component = "motion_adapter";
}

typedef struct {
  int *layers, *tlayers, *heads, *mid_tlayers;
  int mid_layers;
} Opts;

static void
opts_clear (Opts *o)
{
  g_free (o->layers);
  g_free (o->tlayers);
  g_free (o->heads);
  g_free (o->mid_tlayers);
}

static gboolean
parse (DiffuseMotionAdapter *a, DiffuseConfig *c, Opts *o, GError **error)
{
  const char *label = a->label;
  GError *err = NULL;
  gint64 iv;

  gint64 *bo = NULL;
  guint nb = diffuse_config_get_int_array_checked (c, "block_out_channels", 0, &bo, &err);
  if (err) {
    g_propagate_error (error, err);
    return FALSE;
  }
  if (nb == 0) {
    static const gint64 def[4] = { 320, 640, 1280, 1280 };
    nb = 4;
    bo = g_memdup2 (def, sizeof def);
  }
  a->n_blocks = (int) nb;
  a->block_out = g_new (int, nb);
  for (guint i = 0; i < nb; i++)
    a->block_out[i] = (int) bo[i];
  g_free (bo);
  const int n = a->n_blocks;
  for (int i = 0; i < n; i++)
    if (a->block_out[i] <= 0)
      return cfg_error (error, DIFFUSE_ERROR_CONFIG, label, "block_out_channels must be positive");

  if (!int_or_list (c, label, "motion_layers_per_block", n, 2, &o->layers, NULL, error) ||
      !int_or_list (c, label, "motion_transformer_layers_per_block", n, 1, &o->tlayers, NULL, error) ||
      !int_or_list (c, label, "motion_num_attention_heads", n, 8, &o->heads, NULL, error))
    return FALSE;
  if (!diffuse_config_get_int_checked (c, "motion_mid_block_layers_per_block", 1, &iv, error))
    return FALSE;
  o->mid_layers = (int) iv;
  if (!int_or_list (c, label, "motion_transformer_layers_per_mid_block", o->mid_layers > 0 ? o->mid_layers : 1, 1,
                    &o->mid_tlayers, NULL, error))
    return FALSE;
  if (!diffuse_config_get_int_checked (c, "motion_norm_num_groups", 32, &iv, error))
    return FALSE;
  a->norm_groups = (int) iv;
  if (!diffuse_config_get_int_checked (c, "motion_max_seq_length", 32, &iv, error))
    return FALSE;
  a->max_seq_length = (int) iv;
  if (!diffuse_config_get_bool_checked (c, "use_motion_mid_block", TRUE, &a->has_mid, error))
    return FALSE;
  if (!diffuse_config_get_int_checked (c, "conv_in_channels", 0, &iv, error))
    return FALSE;
  a->conv_in_channels = (int) MAX (iv, 0);

  if (a->max_seq_length < 1)
    return cfg_error (error, DIFFUSE_ERROR_CONFIG, label, "motion_max_seq_length must be >= 1");
  if (a->norm_groups < 1)
    return cfg_error (error, DIFFUSE_ERROR_CONFIG, label, "motion_norm_num_groups must be >= 1");
  if (a->has_mid && o->mid_layers < 1)
    return cfg_error (error, DIFFUSE_ERROR_CONFIG, label, "motion_mid_block_layers_per_block must be >= 1");
  for (int i = 0; i < n; i++) {
    if (o->layers[i] < 1 || o->tlayers[i] < 0)
      return cfg_error (error, DIFFUSE_ERROR_CONFIG, label,
                        "motion_layers_per_block must be >= 1 and motion_transformer_layers_per_block >= 0");
    if (o->heads[i] < 1 || a->block_out[i] / o->heads[i] < 1)
      return cfg_error (error, DIFFUSE_ERROR_CONFIG, label, "%d motion attention heads do not fit %d channels",
                        o->heads[i], a->block_out[i]);
    if (a->block_out[i] % a->norm_groups != 0)
      return cfg_error (error, DIFFUSE_ERROR_CONFIG, label,
                        "motion_norm_num_groups %d does not divide %d channels", a->norm_groups, a->block_out[i]);
  }
  for (int j = 0; a->has_mid && j < o->mid_layers; j++)
    if (o->mid_tlayers[j] < 0)
      return cfg_error (error, DIFFUSE_ERROR_CONFIG, label, "motion_transformer_layers_per_mid_block must be >= 0");
  return TRUE;
}

static void
build (DiffuseMotionAdapter *a, const Opts *o, Build *b)
{
  const int n = a->n_blocks;
  DiffuseBlkLoader *l = b->l;
  if (a->conv_in_channels > 0)
    diffuse_blk_conv2d_load (&a->conv_in, l, "conv_in", a->conv_in_channels, a->block_out[0], 3, 1, 1, TRUE);
  a->down = g_new0 (MotionModules, n);
  a->up = g_new0 (MotionModules, n);
  int maxl = 1;
  for (int i = 0; i < n; i++)
    maxl = MAX (maxl, o->layers[i] + 1);
  int *tl = g_new (int, maxl);
  for (int i = 0; i < n && !diffuse_blk_loader_failed (l); i++) {
    for (int j = 0; j < maxl; j++)
      tl[j] = o->tlayers[i];
    char *p = g_strdup_printf ("down_blocks.%d", i);
    modules_load (b, &a->down[i], p, a->block_out[i], o->heads[i], o->layers[i], tl);
    g_free (p);
  }
  if (a->has_mid && !diffuse_blk_loader_failed (l))
    modules_load (b, &a->mid, "mid_block", a->block_out[n - 1], o->heads[n - 1], o->mid_layers, o->mid_tlayers);
  for (int i = 0; i < n && !diffuse_blk_loader_failed (l); i++) {
    int r = n - 1 - i;
    for (int j = 0; j < maxl; j++)
      tl[j] = o->tlayers[r];
    char *p = g_strdup_printf ("up_blocks.%d", i);
    modules_load (b, &a->up[i], p, a->block_out[r], o->heads[r], o->layers[r] + 1, tl);
    g_free (p);
  }
  g_free (tl);
}

DiffuseMotionAdapter *
diffuse_motion_adapter_new (DiffuseConfig *config, DiffuseWeights *weights, const DiffuseMotionAdapterParams *params,
                            GError **error)
{
  return _diffuse_motion_adapter_new_owned (config, weights, params, NULL, error);
}

DiffuseMotionAdapter *
_diffuse_motion_adapter_new_owned (DiffuseConfig *config, DiffuseWeights *weights,
                                   const DiffuseMotionAdapterParams *params, DiffuseBlkKeyFilter owns, GError **error)
{
  g_return_val_if_fail (config != NULL && weights != NULL, NULL);
  DiffuseMotionAdapterParams defaults;
  if (!params) {
    diffuse_motion_adapter_default_params (&defaults);
    params = &defaults;
  }
  DiffuseMotionAdapter *a = g_new0 (DiffuseMotionAdapter, 1);
  a->ref_count = 1;
  a->config = diffuse_config_ref (config);
  a->dtype = params->dtype;
  a->dev = params->device ? params->device : diffuse_device_cpu ();
  const char *component = params->component ? params->component : "motion_adapter";
  a->label = g_strdup_printf ("%s (%s)", component, diffuse_config_label (config));

  Opts o = { 0 };
  if (!parse (a, config, &o, error)) {
    opts_clear (&o);
    adapter_free (a);
    return NULL;
  }
  Build b = { a, diffuse_blk_loader_new (weights, component, a->dtype, a->dev), 0 };
  diffuse_blk_loader_set_owner (b.l, owns);
  build (a, &o, &b);
  opts_clear (&o);
  gboolean ok = diffuse_blk_loader_finish (b.l, &a->unused_keys, error);
  a->n_params = diffuse_blk_loader_n_params (b.l) - b.pe_params;
  diffuse_blk_loader_free (b.l);
  if (!ok) {
    adapter_free (a);
    return NULL;
  }
  return a;
}

DiffuseMotionAdapter *
diffuse_motion_adapter_new_from_dir (const char *dir, const DiffuseMotionAdapterParams *params, GError **error)
{
  g_return_val_if_fail (dir != NULL, NULL);
  DiffuseConfig *config;
  DiffuseWeights *w;
  if (!diffuse_blk_open_model_dir (dir, &config, &w, error))
    return NULL;
  DiffuseMotionAdapter *a = diffuse_motion_adapter_new (config, w, params, error);
  diffuse_weights_unref (w);
  diffuse_config_unref (config);
  return a;
}

DiffuseMotionAdapter *
diffuse_motion_adapter_ref (DiffuseMotionAdapter *a)
{
  g_return_val_if_fail (a != NULL, NULL);
  g_atomic_int_inc (&a->ref_count);
  return a;
}

void
diffuse_motion_adapter_unref (DiffuseMotionAdapter *a)
{
  if (a && g_atomic_int_dec_and_test (&a->ref_count))
    adapter_free (a);
}

DiffuseConfig *diffuse_motion_adapter_config (DiffuseMotionAdapter *a) { return a->config; }
DiffuseDType diffuse_motion_adapter_dtype (DiffuseMotionAdapter *a) { return a->dtype; }
DiffuseDevice *diffuse_motion_adapter_device (DiffuseMotionAdapter *a) { return a->dev; }
int diffuse_motion_adapter_n_blocks (DiffuseMotionAdapter *a) { return a->n_blocks; }
int diffuse_motion_adapter_max_seq_length (DiffuseMotionAdapter *a) { return a->max_seq_length; }
gboolean diffuse_motion_adapter_has_mid_block (DiffuseMotionAdapter *a) { return a->has_mid; }
int diffuse_motion_adapter_conv_in_channels (DiffuseMotionAdapter *a) { return a->conv_in_channels; }
guint64 diffuse_motion_adapter_n_params (DiffuseMotionAdapter *a) { return a->n_params; }

const char *const *
diffuse_motion_adapter_unused_keys (DiffuseMotionAdapter *a)
{
  static const char *const none[] = { NULL };
  return a->unused_keys ? (const char *const *) a->unused_keys : none;
}

/* ---- forward ---------------------------------------------------------------------- */

/* x [N, F, dim] + pe[:, :F] */
static DiffuseTensor *
add_pe (DiffuseTensor *x, DiffuseTensor *pe, int64_t F)
{
  DiffuseTensor *pv = diffuse_narrow (pe, 1, 0, F);
  DiffuseTensor *pc = diffuse_contiguous (pv);
  diffuse_tensor_unref (pv);
  DiffuseTensor *out = diffuse_add (x, pc);
  diffuse_tensor_unref (pc);
  return out;
}

static DiffuseTensor *
tblock_forward (const MotionTransformerBlock *b, DiffuseTensor *x, int64_t F)
{
  if (!x)
    return NULL;
  /* 1. self-attention over frames: norm1, + pe, attn1, residual */
  DiffuseTensor *n = diffuse_blk_layer_norm (&b->norm1, x);
  n = swap (n, add_pe (n, b->pe, F));
  DiffuseTensor *a = diffuse_blk_attention_forward (&b->attn1, n, NULL, NULL);
  diffuse_tensor_unref (n);
  DiffuseTensor *h = a ? diffuse_add (a, x) : NULL;
  diffuse_tensor_unref (a);
  /* 2. the second self-attention (double_self_attention) */
  n = diffuse_blk_layer_norm (&b->norm2, h);
  n = swap (n, add_pe (n, b->pe, F));
  a = diffuse_blk_attention_forward (&b->attn2, n, NULL, NULL);
  diffuse_tensor_unref (n);
  h = swap (h, a ? diffuse_add (a, h) : NULL);
  diffuse_tensor_unref (a);
  /* 3. feed-forward (GEGLU) */
  n = diffuse_blk_layer_norm (&b->norm3, h);
  DiffuseTensor *f = diffuse_blk_linear (&b->ff_proj, n);
  diffuse_tensor_unref (n);
  f = swap (f, diffuse_geglu (f));
  f = swap (f, diffuse_blk_linear (&b->ff_out, f));
  h = swap (h, f ? diffuse_add (f, h) : NULL);
  diffuse_tensor_unref (f);
  return h;
}

DiffuseTensor *
diffuse_motion_module_forward (const MotionModule *m, DiffuseTensor *x, int num_frames, int groups)
{
  if (!x)
    return NULL;
  g_return_val_if_fail (x->ndim == 4 && num_frames > 0 && x->shape[0] % num_frames == 0, NULL);
  const int64_t BF = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
  const int64_t F = num_frames, B = BF / F, HW = H * W;
  /* [B*F, C, H, W] -> [B, F, C, HW] -> [B, C, F, HW]: the group norm sees
   * every frame of a group at once, as GroupNorm on (B, C, F, H, W) */
  DiffuseTensor *xc = diffuse_contiguous (x);
  DiffuseTensor *x4 = xc ? diffuse_reshape_4d (xc, B, F, C, HW) : NULL;
  diffuse_tensor_unref (xc);
  DiffuseTensor *xp = x4 ? diffuse_permute (x4, (int[]) { 0, 2, 1, 3 }) : NULL;
  diffuse_tensor_unref (x4);
  DiffuseTensor *h = diffuse_contiguous (xp);
  diffuse_tensor_unref (xp);
  DiffuseBlkGroupNorm gn = m->norm;
  gn.groups = groups;
  h = swap (h, diffuse_blk_group_norm (&gn, h, DIFFUSE_ACT_NONE));
  /* [B, C, F, HW] -> [B, HW, F, C] -> [B*HW, F, C] */
  DiffuseTensor *hp = h ? diffuse_permute (h, (int[]) { 0, 3, 2, 1 }) : NULL;
  diffuse_tensor_unref (h);
  h = diffuse_contiguous (hp);
  diffuse_tensor_unref (hp);
  h = swap (h, h ? diffuse_reshape (h, 3, (int64_t[]) { B * HW, F, C }) : NULL);
  h = swap (h, diffuse_blk_linear (&m->proj_in, h));
  for (int k = 0; k < m->n_blocks; k++)
    h = swap (h, tblock_forward (&m->blocks[k], h, F));
  h = swap (h, diffuse_blk_linear (&m->proj_out, h));               /* [B*HW, F, C] */
  if (!h)
    return NULL;
  /* [B, HW, F, C] -> [B, F, C, HW] -> [B*F, C, H, W], + residual */
  DiffuseTensor *h4 = diffuse_reshape_4d (h, B, HW, F, C);
  diffuse_tensor_unref (h);
  hp = h4 ? diffuse_permute (h4, (int[]) { 0, 2, 3, 1 }) : NULL;
  diffuse_tensor_unref (h4);
  h = diffuse_contiguous (hp);
  diffuse_tensor_unref (hp);
  h = swap (h, h ? diffuse_reshape_4d (h, BF, C, H, W) : NULL);
  DiffuseTensor *out = h ? diffuse_add (h, x) : NULL;
  diffuse_tensor_unref (h);
  return out;
}

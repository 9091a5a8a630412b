/* gst-diffuse — building blocks shared by the model files (see blocks.h). */
#include "blocks.h"

#include <diffuse/error.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>

/* h = blk_swap (h, op (h, ...)): the result replaces h, the old h is released. */
static inline DiffuseTensor *
blk_swap (DiffuseTensor *old, DiffuseTensor *result)
{
  diffuse_tensor_unref (old);
  return result;
}

static void
set_tensor_error (DiffuseErrorCode code, const char *fmt, ...) G_GNUC_PRINTF (2, 3);

static void
set_tensor_error (DiffuseErrorCode code, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  diffuse_tensor_set_error (g_error_new_literal (DIFFUSE_ERROR, code, msg));
  g_free (msg);
}

/* ---- loader ------------------------------------------------------------ */

struct _DiffuseBlkLoader {
  DiffuseWeights *weights;
  char *component;
  DiffuseDType dtype;
  DiffuseDevice *dev;
  GHashTable *used;      /* key -> NULL */
  GError *error;
  guint64 n_params;
  DiffuseBlkKeyFilter owns;   /* NULL: every key is this model's */
};

DiffuseBlkLoader *
diffuse_blk_loader_new (DiffuseWeights *weights, const char *component, DiffuseDType dtype, DiffuseDevice *dev)
{
  g_return_val_if_fail (weights != NULL, NULL);
  DiffuseBlkLoader *l = g_new0 (DiffuseBlkLoader, 1);
  l->weights = diffuse_weights_ref (weights);
  l->component = g_strdup (component ? component : "model");
  l->dtype = dtype;
  l->dev = dev ? dev : diffuse_device_cpu ();
  l->used = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  return l;
}

void
diffuse_blk_loader_free (DiffuseBlkLoader *l)
{
  if (!l)
    return;
  diffuse_weights_unref (l->weights);
  g_free (l->component);
  g_hash_table_unref (l->used);
  g_clear_error (&l->error);
  g_free (l);
}

void
diffuse_blk_loader_fail (DiffuseBlkLoader *l, GError *error)
{
  if (!error)
    return;
  if (l->error)
    g_error_free (error);
  else
    l->error = error;
}

void
diffuse_blk_loader_set_owner (DiffuseBlkLoader *l, DiffuseBlkKeyFilter owns)
{
  l->owns = owns;
}

gboolean
diffuse_blk_loader_failed (DiffuseBlkLoader *l)
{
  return l->error != NULL;
}

guint64
diffuse_blk_loader_n_params (DiffuseBlkLoader *l)
{
  return l->n_params;
}

static char *
make_key (const char *prefix, const char *name)
{
  if (!prefix || !*prefix)
    return g_strdup (name);
  return g_strconcat (prefix, ".", name, NULL);
}

static char *
shape_string (int ndim, const int64_t *shape)
{
  GString *s = g_string_new ("[");
  for (int i = 0; i < ndim; i++)
    g_string_append_printf (s, "%s%" G_GINT64_FORMAT, i ? ", " : "", shape[i]);
  g_string_append_c (s, ']');
  return g_string_free (s, FALSE);
}

gboolean
diffuse_blk_has (DiffuseBlkLoader *l, const char *prefix, const char *name)
{
  char *key = make_key (prefix, name);
  gboolean has = diffuse_weights_has (l->weights, key);
  g_free (key);
  return has;
}

DiffuseTensor *
diffuse_blk_get (DiffuseBlkLoader *l, const char *prefix, const char *name, int ndim, const int64_t *shape)
{
  if (l->error)
    return NULL;
  char *key = make_key (prefix, name);
  const DiffuseStEntry *e = diffuse_weights_has (l->weights, key) ? diffuse_weights_entry (l->weights, key) : NULL;
  if (!e) {
    l->error = g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "%s: weight '%s' is missing from %s",
                            l->component, key, diffuse_weights_describe (l->weights));
    g_free (key);
    return NULL;
  }
  gboolean ok = e->ndim == ndim;
  for (int i = 0; ok && i < ndim; i++)
    ok = shape[i] < 0 || e->shape[i] == shape[i];
  if (!ok) {
    char *want = shape_string (ndim, shape), *got = shape_string (e->ndim, e->shape);
    l->error = g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                            "%s: weight '%s' has shape %s in %s but the config implies %s", l->component, key, got,
                            diffuse_weights_describe (l->weights), want);
    g_free (want);
    g_free (got);
    g_free (key);
    return NULL;
  }
  DiffuseTensor *t = diffuse_weights_get (l->weights, key, l->dtype, l->dev, &l->error);
  if (!t) {
    if (!l->error)
      l->error = g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s: could not load weight '%s'", l->component,
                              key);
    g_free (key);
    return NULL;
  }
  l->n_params += (guint64) diffuse_tensor_numel (t);
  g_hash_table_add (l->used, key);
  return t;
}

gboolean
diffuse_blk_loader_finish (DiffuseBlkLoader *l, char ***unused, GError **error)
{
  if (unused)
    *unused = NULL;
  if (l->error) {
    g_propagate_error (error, g_error_copy (l->error));
    return FALSE;
  }
  guint n = 0;
  const char **names = diffuse_weights_names (l->weights, &n);
  GPtrArray *extra = g_ptr_array_new ();
  for (guint i = 0; i < n; i++)
    if (!g_hash_table_contains (l->used, names[i]) && (!l->owns || l->owns (names[i])))
      g_ptr_array_add (extra, g_strdup (names[i]));
  g_free (names);
  if (extra->len > 0) {
    GString *s = g_string_new (NULL);
    for (guint i = 0; i < extra->len; i++)
      g_string_append_printf (s, "%s%s", i ? ", " : "", (char *) extra->pdata[i]);
    g_warning ("%s: %u weights of %s were not used: %s", l->component, extra->len,
               diffuse_weights_describe (l->weights), s->str);
    g_string_free (s, TRUE);
  }
  g_ptr_array_add (extra, NULL);
  char **list = (char **) g_ptr_array_free (extra, FALSE);
  if (unused)
    *unused = list;
  else
    g_strfreev (list);
  return TRUE;
}

gboolean
diffuse_blk_parse_activation (const char *name, const char *what, const char *label, DiffuseActivation *out,
                              GError **error)
{
  static const struct { const char *name; DiffuseActivation act; } table[] = {
    { "silu", DIFFUSE_ACT_SILU }, { "swish", DIFFUSE_ACT_SILU },
    { "gelu", DIFFUSE_ACT_GELU }, { "relu", DIFFUSE_ACT_RELU },
  };
  for (guint i = 0; name && i < G_N_ELEMENTS (table); i++)
    if (g_ascii_strcasecmp (name, table[i].name) == 0) {
      *out = table[i].act;
      return TRUE;
    }
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: %s \"%s\" is not supported", label, what,
               name ? name : "(null)");
  return FALSE;
}

/* ---- leaf layers ----------------------------------------------------------- */

gboolean
diffuse_blk_linear_load (DiffuseBlkLinear *m, DiffuseBlkLoader *l, const char *prefix, int in, int out,
                         gboolean bias)
{
  memset (m, 0, sizeof *m);
  m->weight = diffuse_blk_get_s (l, prefix, "weight", out, in);
  if (bias)
    m->bias = diffuse_blk_get_s (l, prefix, "bias", out);
  return !l->error;
}

gboolean
diffuse_blk_linear_load_conv1x1 (DiffuseBlkLinear *m, DiffuseBlkLoader *l, const char *prefix, int in, int out,
                                 gboolean bias)
{
  memset (m, 0, sizeof *m);
  DiffuseTensor *w = diffuse_blk_get_s (l, prefix, "weight", out, in, 1, 1);
  if (w) {
    int64_t shape[2] = { out, in };
    m->weight = diffuse_reshape (w, 2, shape);
    diffuse_tensor_unref (w);
  }
  if (bias)
    m->bias = diffuse_blk_get_s (l, prefix, "bias", out);
  return !l->error;
}

DiffuseTensor *
diffuse_blk_linear (const DiffuseBlkLinear *m, DiffuseTensor *x)
{
  return diffuse_linear (x, m->weight, m->bias);
}

void
diffuse_blk_linear_clear (DiffuseBlkLinear *m)
{
  diffuse_tensor_clear (&m->weight);
  diffuse_tensor_clear (&m->bias);
}

gboolean
diffuse_blk_conv2d_load (DiffuseBlkConv2d *m, DiffuseBlkLoader *l, const char *prefix, int in, int out, int kernel,
                         int stride, int padding, gboolean bias)
{
  memset (m, 0, sizeof *m);
  m->stride = stride;
  m->padding = padding;
  m->weight = diffuse_blk_get_s (l, prefix, "weight", out, in, kernel, kernel);
  if (bias)
    m->bias = diffuse_blk_get_s (l, prefix, "bias", out);
  return !l->error;
}

DiffuseTensor *
diffuse_blk_conv2d (const DiffuseBlkConv2d *m, DiffuseTensor *x)
{
  return diffuse_conv2d (x, m->weight, m->bias, m->stride, m->stride, m->padding, m->padding);
}

void
diffuse_blk_conv2d_clear (DiffuseBlkConv2d *m)
{
  diffuse_tensor_clear (&m->weight);
  diffuse_tensor_clear (&m->bias);
}

gboolean
diffuse_blk_group_norm_load (DiffuseBlkGroupNorm *m, DiffuseBlkLoader *l, const char *prefix, int channels,
                             int groups, float eps)
{
  memset (m, 0, sizeof *m);
  m->groups = groups;
  m->eps = eps;
  if (groups <= 0 || channels % groups != 0) {
    diffuse_blk_loader_fail (l, g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                                             "%s: %s: %d channels cannot be split into %d groups", l->component,
                                             prefix, channels, groups));
    return FALSE;
  }
  m->weight = diffuse_blk_get_s (l, prefix, "weight", channels);
  m->bias = diffuse_blk_get_s (l, prefix, "bias", channels);
  return !l->error;
}

DiffuseTensor *
diffuse_blk_group_norm (const DiffuseBlkGroupNorm *m, DiffuseTensor *x, DiffuseActivation act)
{
  return diffuse_group_norm (x, m->groups, m->weight, m->bias, m->eps, act);
}

void
diffuse_blk_group_norm_clear (DiffuseBlkGroupNorm *m)
{
  diffuse_tensor_clear (&m->weight);
  diffuse_tensor_clear (&m->bias);
}

gboolean
diffuse_blk_layer_norm_load (DiffuseBlkLayerNorm *m, DiffuseBlkLoader *l, const char *prefix, int dim, float eps,
                             gboolean affine)
{
  memset (m, 0, sizeof *m);
  m->eps = eps;
  if (affine) {
    m->weight = diffuse_blk_get_s (l, prefix, "weight", dim);
    m->bias = diffuse_blk_get_s (l, prefix, "bias", dim);
  }
  return !l->error;
}

DiffuseTensor *
diffuse_blk_layer_norm (const DiffuseBlkLayerNorm *m, DiffuseTensor *x)
{
  return diffuse_layer_norm (x, m->weight, m->bias, m->eps);
}

void
diffuse_blk_layer_norm_clear (DiffuseBlkLayerNorm *m)
{
  diffuse_tensor_clear (&m->weight);
  diffuse_tensor_clear (&m->bias);
}

/* ---- ResnetBlock2D --------------------------------------------------------- */

void
diffuse_blk_resnet_config_init (DiffuseBlkResnetConfig *c, int in_channels, int out_channels, int temb_channels)
{
  memset (c, 0, sizeof *c);
  c->in_channels = in_channels;
  c->out_channels = out_channels;
  c->temb_channels = temb_channels;
  c->groups = 32;
  c->eps = 1e-6f;
  c->act = DIFFUSE_ACT_SILU;
  c->output_scale_factor = 1.0f;
}

gboolean
diffuse_blk_resnet_load (DiffuseBlkResnet *r, DiffuseBlkLoader *l, const char *prefix,
                         const DiffuseBlkResnetConfig *cfg)
{
  memset (r, 0, sizeof *r);
  r->cfg = *cfg;
  if (r->cfg.groups_out <= 0)
    r->cfg.groups_out = r->cfg.groups;
  int cin = cfg->in_channels, cout = cfg->out_channels;
  char *p = g_strconcat (prefix, ".norm1", NULL);
  diffuse_blk_group_norm_load (&r->norm1, l, p, cin, r->cfg.groups, cfg->eps);
  g_free (p);
  p = g_strconcat (prefix, ".conv1", NULL);
  diffuse_blk_conv2d_load (&r->conv1, l, p, cin, cout, 3, 1, 1, TRUE);
  g_free (p);
  if (cfg->temb_channels > 0) {
    p = g_strconcat (prefix, ".time_emb_proj", NULL);
    diffuse_blk_linear_load (&r->time_emb_proj, l, p, cfg->temb_channels, cfg->scale_shift ? 2 * cout : cout,
                             TRUE);
    g_free (p);
  }
  p = g_strconcat (prefix, ".norm2", NULL);
  diffuse_blk_group_norm_load (&r->norm2, l, p, cout, r->cfg.groups_out, cfg->eps);
  g_free (p);
  p = g_strconcat (prefix, ".conv2", NULL);
  diffuse_blk_conv2d_load (&r->conv2, l, p, cout, cout, 3, 1, 1, TRUE);
  g_free (p);
  if (cin != cout) {
    r->has_shortcut = TRUE;
    p = g_strconcat (prefix, ".conv_shortcut", NULL);
    diffuse_blk_conv2d_load (&r->conv_shortcut, l, p, cin, cout, 1, 1, 0, TRUE);
    g_free (p);
  }
  return !diffuse_blk_loader_failed (l);
}

DiffuseTensor *
diffuse_blk_resnet_forward (const DiffuseBlkResnet *r, DiffuseTensor *x, DiffuseTensor *temb)
{
  if (!x)
    return NULL;
  const DiffuseBlkResnetConfig *c = &r->cfg;
  if (c->scale_shift && !temb) {
    set_tensor_error (DIFFUSE_ERROR_INVALID_ARGUMENT, "ResnetBlock2D: scale_shift needs a time embedding");
    return NULL;
  }
  DiffuseTensor *h = diffuse_blk_group_norm (&r->norm1, x, c->act);
  h = blk_swap (h, diffuse_blk_conv2d (&r->conv1, h));
  if (!h)
    return NULL;
  int64_t B = h->shape[0], C = h->shape[1];
  if (temb && c->temb_channels > 0) {
    DiffuseTensor *t = c->skip_time_act ? diffuse_tensor_ref (temb) : diffuse_activation (temb, c->act);
    t = blk_swap (t, diffuse_blk_linear (&r->time_emb_proj, t));
    if (c->scale_shift) {
      DiffuseTensor *t4 = t ? diffuse_reshape_4d (t, B, 2 * C, 1, 1) : NULL;
      DiffuseTensor *parts[2] = { NULL, NULL };
      if (t4 && !diffuse_chunk (t4, 2, 1, parts))
        parts[0] = parts[1] = NULL;
      diffuse_tensor_unref (t4);
      diffuse_tensor_unref (t);
      DiffuseTensor *scale1 = diffuse_scale (parts[0], 1.0f, 1.0f);     /* 1 + scale */
      h = blk_swap (h, diffuse_blk_group_norm (&r->norm2, h, DIFFUSE_ACT_NONE));
      h = blk_swap (h, diffuse_mul (h, scale1));
      h = blk_swap (h, diffuse_add (h, parts[1]));
      h = blk_swap (h, diffuse_activation (h, c->act));
      diffuse_tensor_unref (scale1);
      diffuse_tensor_unref (parts[0]);
      diffuse_tensor_unref (parts[1]);
    } else {
      DiffuseTensor *t4 = t ? diffuse_reshape_4d (t, B, C, 1, 1) : NULL;
      diffuse_tensor_unref (t);
      h = blk_swap (h, t4 ? diffuse_add (h, t4) : NULL);
      diffuse_tensor_unref (t4);
      h = blk_swap (h, diffuse_blk_group_norm (&r->norm2, h, c->act));
    }
  } else {
    h = blk_swap (h, diffuse_blk_group_norm (&r->norm2, h, c->act));
  }
  h = blk_swap (h, diffuse_blk_conv2d (&r->conv2, h));
  if (!h)
    return NULL;
  DiffuseTensor *sc = r->has_shortcut ? diffuse_blk_conv2d (&r->conv_shortcut, x) : diffuse_tensor_ref (x);
  DiffuseTensor *out = diffuse_add (sc, h);
  diffuse_tensor_unref (sc);
  diffuse_tensor_unref (h);
  if (out && c->output_scale_factor != 1.0f)
    out = blk_swap (out, diffuse_scale (out, 1.0f / c->output_scale_factor, 0.0f));
  return out;
}

void
diffuse_blk_resnet_clear (DiffuseBlkResnet *r)
{
  diffuse_blk_group_norm_clear (&r->norm1);
  diffuse_blk_group_norm_clear (&r->norm2);
  diffuse_blk_conv2d_clear (&r->conv1);
  diffuse_blk_conv2d_clear (&r->conv2);
  diffuse_blk_linear_clear (&r->time_emb_proj);
  diffuse_blk_conv2d_clear (&r->conv_shortcut);
}

/* ---- Attention --------------------------------------------------------------- */

DiffuseTensor *
diffuse_blk_mha (DiffuseTensor *q, DiffuseTensor *k, DiffuseTensor *v, int heads, DiffuseTensor *mask,
                 gboolean causal, float scale)
{
  if (!q || !k || !v)
    return NULL;
  g_return_val_if_fail (q->ndim == 3 && k->ndim == 3 && v->ndim == 3 && heads > 0, NULL);
  g_return_val_if_fail (q->shape[2] % heads == 0 && k->shape[2] == q->shape[2] && v->shape[2] % heads == 0, NULL);
  int64_t B = q->shape[0], Lq = q->shape[1], Lk = k->shape[1];
  int64_t D = q->shape[2] / heads, Dv = v->shape[2] / heads;
  static const int perm[4] = { 0, 2, 1, 3 };
  /* [B, L, H*D] -> [B, L, H, D] -> view [B, H, L, D] */
  DiffuseTensor *qc = diffuse_contiguous (q);
  DiffuseTensor *kc = diffuse_contiguous (k);
  DiffuseTensor *vc = diffuse_contiguous (v);
  DiffuseTensor *q4 = qc ? diffuse_reshape_4d (qc, B, Lq, heads, D) : NULL;
  DiffuseTensor *k4 = kc ? diffuse_reshape_4d (kc, B, Lk, heads, D) : NULL;
  DiffuseTensor *v4 = vc ? diffuse_reshape_4d (vc, B, Lk, heads, Dv) : NULL;
  diffuse_tensor_unref (qc);
  diffuse_tensor_unref (kc);
  diffuse_tensor_unref (vc);
  DiffuseTensor *qh = q4 ? diffuse_permute (q4, perm) : NULL;
  DiffuseTensor *kh = k4 ? diffuse_permute (k4, perm) : NULL;
  DiffuseTensor *vh = v4 ? diffuse_permute (v4, perm) : NULL;
  diffuse_tensor_unref (q4);
  diffuse_tensor_unref (k4);
  diffuse_tensor_unref (v4);
  DiffuseTensor *o = diffuse_sdpa (qh, kh, vh, mask, causal, scale);   /* [B, H, Lq, Dv] */
  diffuse_tensor_unref (qh);
  diffuse_tensor_unref (kh);
  diffuse_tensor_unref (vh);
  if (!o)
    return NULL;
  DiffuseTensor *ot = diffuse_permute (o, perm);                       /* [B, Lq, H, Dv] view */
  diffuse_tensor_unref (o);
  DiffuseTensor *oc = diffuse_contiguous (ot);
  diffuse_tensor_unref (ot);
  if (!oc)
    return NULL;
  int64_t shape[3] = { B, Lq, heads * Dv };
  DiffuseTensor *out = diffuse_reshape (oc, 3, shape);
  diffuse_tensor_unref (oc);
  return out;
}

void
diffuse_blk_attention_config_init (DiffuseBlkAttentionConfig *c, int query_dim, int cross_attention_dim, int heads,
                                   int dim_head)
{
  memset (c, 0, sizeof *c);
  c->query_dim = query_dim;
  c->cross_attention_dim = cross_attention_dim;
  c->heads = heads;
  c->dim_head = dim_head;
  c->out_bias = TRUE;
  c->eps = 1e-5f;
  c->rescale_output_factor = 1.0f;
}

gboolean
diffuse_blk_attention_load (DiffuseBlkAttention *a, DiffuseBlkLoader *l, const char *prefix,
                            const DiffuseBlkAttentionConfig *cfg)
{
  memset (a, 0, sizeof *a);
  a->cfg = *cfg;
  int inner = cfg->heads * cfg->dim_head;
  int kv_in = cfg->cross_attention_dim > 0 ? cfg->cross_attention_dim : cfg->query_dim;
  char *p;
  if (cfg->norm_num_groups > 0) {
    p = g_strconcat (prefix, ".group_norm", NULL);
    diffuse_blk_group_norm_load (&a->group_norm, l, p, cfg->query_dim, cfg->norm_num_groups, cfg->eps);
    g_free (p);
  }
  p = g_strconcat (prefix, ".to_q", NULL);
  diffuse_blk_linear_load (&a->to_q, l, p, cfg->query_dim, inner, cfg->bias);
  g_free (p);
  p = g_strconcat (prefix, ".to_k", NULL);
  diffuse_blk_linear_load (&a->to_k, l, p, kv_in, inner, cfg->bias);
  g_free (p);
  p = g_strconcat (prefix, ".to_v", NULL);
  diffuse_blk_linear_load (&a->to_v, l, p, kv_in, inner, cfg->bias);
  g_free (p);
  p = g_strconcat (prefix, ".to_out.0", NULL);
  diffuse_blk_linear_load (&a->to_out, l, p, inner, cfg->query_dim, cfg->out_bias);
  g_free (p);
  return !diffuse_blk_loader_failed (l);
}

DiffuseTensor *
diffuse_blk_attention_forward (const DiffuseBlkAttention *a, DiffuseTensor *x, DiffuseTensor *context,
                               DiffuseTensor *mask)
{
  return diffuse_blk_attention_forward_ip (a, x, context, mask, NULL);
}

DiffuseTensor *
diffuse_blk_attention_forward_ip (const DiffuseBlkAttention *a, DiffuseTensor *x, DiffuseTensor *context,
                                  DiffuseTensor *mask, const DiffuseBlkIp *ip)
{
  if (!x)
    return NULL;
  const DiffuseBlkAttentionConfig *c = &a->cfg;
  gboolean in4 = x->ndim == 4;
  int64_t B = x->shape[0], C = 0, H = 0, W = 0;
  DiffuseTensor *h;      /* [B, L, C] contiguous */
  if (in4) {
    C = x->shape[1];
    H = x->shape[2];
    W = x->shape[3];
    DiffuseTensor *n = c->norm_num_groups > 0 ? diffuse_blk_group_norm (&a->group_norm, x, DIFFUSE_ACT_NONE)
                                              : diffuse_contiguous (x);
    DiffuseTensor *n3 = n ? diffuse_reshape (n, 3, (int64_t[]) { B, C, H * W }) : NULL;
    diffuse_tensor_unref (n);
    DiffuseTensor *nt = n3 ? diffuse_permute (n3, (int[]) { 0, 2, 1 }) : NULL;
    diffuse_tensor_unref (n3);
    h = diffuse_contiguous (nt);
    diffuse_tensor_unref (nt);
  } else if (c->norm_num_groups > 0) {
    DiffuseTensor *xt = diffuse_permute (x, (int[]) { 0, 2, 1 });
    DiffuseTensor *xc = diffuse_contiguous (xt);
    diffuse_tensor_unref (xt);
    DiffuseTensor *n = diffuse_blk_group_norm (&a->group_norm, xc, DIFFUSE_ACT_NONE);
    diffuse_tensor_unref (xc);
    DiffuseTensor *nt = n ? diffuse_permute (n, (int[]) { 0, 2, 1 }) : NULL;
    diffuse_tensor_unref (n);
    h = diffuse_contiguous (nt);
    diffuse_tensor_unref (nt);
  } else {
    h = diffuse_contiguous (x);
  }
  if (!h)
    return NULL;
  if (context && c->cross_attention_dim > 0 && context->shape[context->ndim - 1] != c->cross_attention_dim) {
    set_tensor_error (DIFFUSE_ERROR_INVALID_ARGUMENT,
                      "attention: encoder_hidden_states have %" G_GINT64_FORMAT " features, the layer expects %d",
                      context->shape[context->ndim - 1], c->cross_attention_dim);
    diffuse_tensor_unref (h);
    return NULL;
  }
  DiffuseTensor *kv_src = context ? context : h;
  DiffuseTensor *q = diffuse_blk_linear (&a->to_q, h);
  DiffuseTensor *k = diffuse_blk_linear (&a->to_k, kv_src);
  DiffuseTensor *v = diffuse_blk_linear (&a->to_v, kv_src);
  diffuse_tensor_unref (h);
  float scale = 1.0f / sqrtf ((float) c->dim_head);
  DiffuseTensor *o = diffuse_blk_mha (q, k, v, c->heads, mask, FALSE, scale);
  diffuse_tensor_unref (k);
  diffuse_tensor_unref (v);
  if (o && ip && ip->tokens) {
    /* IP-Adapter (IPAdapterAttnProcessor): the same queries on the image tokens, added with its scale */
    DiffuseTensor *ki = diffuse_linear (ip->tokens, ip->k_w, NULL);
    DiffuseTensor *vi = diffuse_linear (ip->tokens, ip->v_w, NULL);
    DiffuseTensor *oi = diffuse_blk_mha (q, ki, vi, c->heads, NULL, FALSE, scale);
    diffuse_tensor_unref (ki);
    diffuse_tensor_unref (vi);
    if (!oi || !diffuse_axpy_inplace (o, ip->scale, oi))
      diffuse_tensor_clear (&o);
    diffuse_tensor_unref (oi);
  }
  diffuse_tensor_unref (q);
  o = blk_swap (o, diffuse_blk_linear (&a->to_out, o));               /* [B, L, query_dim] */
  if (!o)
    return NULL;
  DiffuseTensor *out;
  if (in4) {
    DiffuseTensor *ot = diffuse_permute (o, (int[]) { 0, 2, 1 });    /* [B, C, HW] view */
    diffuse_tensor_unref (o);
    DiffuseTensor *flat;
    if (c->residual_connection) {
      DiffuseTensor *xc = diffuse_contiguous (x);
      DiffuseTensor *x3 = xc ? diffuse_reshape (xc, 3, (int64_t[]) { B, C, H * W }) : NULL;
      diffuse_tensor_unref (xc);
      flat = x3 ? diffuse_add (ot, x3) : NULL;
      diffuse_tensor_unref (x3);
    } else {
      flat = diffuse_contiguous (ot);
    }
    diffuse_tensor_unref (ot);
    out = flat ? diffuse_reshape_4d (flat, B, C, H, W) : NULL;
    diffuse_tensor_unref (flat);
  } else {
    out = c->residual_connection ? diffuse_add (o, x) : diffuse_tensor_ref (o);
    diffuse_tensor_unref (o);
  }
  if (out && c->rescale_output_factor != 1.0f)
    out = blk_swap (out, diffuse_scale (out, 1.0f / c->rescale_output_factor, 0.0f));
  return out;
}

void
diffuse_blk_attention_clear (DiffuseBlkAttention *a)
{
  diffuse_blk_group_norm_clear (&a->group_norm);
  diffuse_blk_linear_clear (&a->to_q);
  diffuse_blk_linear_clear (&a->to_k);
  diffuse_blk_linear_clear (&a->to_v);
  diffuse_blk_linear_clear (&a->to_out);
}

/* ---- BasicTransformerBlock -------------------------------------------------- */

gboolean
diffuse_blk_transformer_block_load (DiffuseBlkTransformerBlock *b, DiffuseBlkLoader *l, const char *prefix,
                                    const DiffuseBlkTransformerBlockConfig *cfg)
{
  memset (b, 0, sizeof *b);
  b->cfg = *cfg;
  if (b->cfg.ff_inner_dim <= 0)
    b->cfg.ff_inner_dim = 4 * cfg->dim;
  int dim = cfg->dim;
  DiffuseBlkAttentionConfig ac;
  char *p = g_strconcat (prefix, ".norm1", NULL);
  diffuse_blk_layer_norm_load (&b->norm1, l, p, dim, cfg->norm_eps, TRUE);
  g_free (p);
  diffuse_blk_attention_config_init (&ac, dim, cfg->only_cross_attention ? cfg->cross_attention_dim : 0,
                                     cfg->heads, cfg->dim_head);
  p = g_strconcat (prefix, ".attn1", NULL);
  diffuse_blk_attention_load (&b->attn1, l, p, &ac);
  g_free (p);
  if (cfg->cross_attention_dim > 0) {
    b->has_attn2 = TRUE;
    p = g_strconcat (prefix, ".norm2", NULL);
    diffuse_blk_layer_norm_load (&b->norm2, l, p, dim, cfg->norm_eps, TRUE);
    g_free (p);
    diffuse_blk_attention_config_init (&ac, dim, cfg->cross_attention_dim, cfg->heads, cfg->dim_head);
    p = g_strconcat (prefix, ".attn2", NULL);
    diffuse_blk_attention_load (&b->attn2, l, p, &ac);
    g_free (p);
  }
  p = g_strconcat (prefix, ".norm3", NULL);
  diffuse_blk_layer_norm_load (&b->norm3, l, p, dim, cfg->norm_eps, TRUE);
  g_free (p);
  p = g_strconcat (prefix, ".ff.net.0.proj", NULL);
  diffuse_blk_linear_load (&b->ff_proj, l, p, dim, 2 * b->cfg.ff_inner_dim, TRUE);
  g_free (p);
  p = g_strconcat (prefix, ".ff.net.2", NULL);
  diffuse_blk_linear_load (&b->ff_out, l, p, b->cfg.ff_inner_dim, dim, TRUE);
  g_free (p);
  return !diffuse_blk_loader_failed (l);
}

DiffuseTensor *
diffuse_blk_transformer_block_forward (const DiffuseBlkTransformerBlock *b, DiffuseTensor *x,
                                       DiffuseTensor *context)
{
  return diffuse_blk_transformer_block_forward_ip (b, x, context, NULL);
}

DiffuseTensor *
diffuse_blk_transformer_block_forward_ip (const DiffuseBlkTransformerBlock *b, DiffuseTensor *x,
                                          DiffuseTensor *context, const DiffuseBlkIp *ip)
{
  if (!x)
    return NULL;
  DiffuseTensor *n = diffuse_blk_layer_norm (&b->norm1, x);
  DiffuseTensor *a = diffuse_blk_attention_forward (&b->attn1, n, b->cfg.only_cross_attention ? context : NULL,
                                                    NULL);
  diffuse_tensor_unref (n);
  DiffuseTensor *h = a ? diffuse_add (a, x) : NULL;
  diffuse_tensor_unref (a);
  if (b->has_attn2) {
    n = diffuse_blk_layer_norm (&b->norm2, h);
    a = diffuse_blk_attention_forward_ip (&b->attn2, n, context, NULL, ip);
    diffuse_tensor_unref (n);
    h = blk_swap (h, a ? diffuse_add (a, h) : NULL);
    diffuse_tensor_unref (a);
  }
  n = diffuse_blk_layer_norm (&b->norm3, h);
  DiffuseTensor *f = diffuse_blk_linear (&b->ff_proj, n);
  diffuse_tensor_unref (n);
  f = blk_swap (f, diffuse_geglu (f));
  f = blk_swap (f, diffuse_blk_linear (&b->ff_out, f));
  h = blk_swap (h, f ? diffuse_add (f, h) : NULL);
  diffuse_tensor_unref (f);
  return h;
}

void
diffuse_blk_transformer_block_clear (DiffuseBlkTransformerBlock *b)
{
  diffuse_blk_layer_norm_clear (&b->norm1);
  diffuse_blk_layer_norm_clear (&b->norm2);
  diffuse_blk_layer_norm_clear (&b->norm3);
  diffuse_blk_attention_clear (&b->attn1);
  diffuse_blk_attention_clear (&b->attn2);
  diffuse_blk_linear_clear (&b->ff_proj);
  diffuse_blk_linear_clear (&b->ff_out);
}

/* ---- Transformer2DModel (continuous input) ------------------------------- */

gboolean
diffuse_blk_transformer2d_load (DiffuseBlkTransformer2D *t, DiffuseBlkLoader *l, const char *prefix,
                                const DiffuseBlkTransformer2DConfig *cfg)
{
  memset (t, 0, sizeof *t);
  t->cfg = *cfg;
  int inner = cfg->heads * cfg->dim_head;
  char *p = g_strconcat (prefix, ".norm", NULL);
  diffuse_blk_group_norm_load (&t->norm, l, p, cfg->in_channels, cfg->norm_num_groups, 1e-6f);
  g_free (p);
  p = g_strconcat (prefix, ".proj_in", NULL);
  if (cfg->use_linear_projection)
    diffuse_blk_linear_load (&t->proj_in, l, p, cfg->in_channels, inner, TRUE);
  else
    diffuse_blk_linear_load_conv1x1 (&t->proj_in, l, p, cfg->in_channels, inner, TRUE);
  g_free (p);
  t->n_blocks = cfg->num_layers;
  t->blocks = g_new0 (DiffuseBlkTransformerBlock, MAX (cfg->num_layers, 1));
  for (int i = 0; i < cfg->num_layers; i++) {
    DiffuseBlkTransformerBlockConfig bc = {
      .dim = inner,
      .heads = cfg->heads,
      .dim_head = cfg->dim_head,
      .cross_attention_dim = cfg->cross_attention_dim,
      .only_cross_attention = cfg->only_cross_attention,
      .norm_eps = 1e-5f,
    };
    p = g_strdup_printf ("%s.transformer_blocks.%d", prefix, i);
    diffuse_blk_transformer_block_load (&t->blocks[i], l, p, &bc);
    g_free (p);
  }
  p = g_strconcat (prefix, ".proj_out", NULL);
  if (cfg->use_linear_projection)
    diffuse_blk_linear_load (&t->proj_out, l, p, inner, cfg->in_channels, TRUE);
  else
    diffuse_blk_linear_load_conv1x1 (&t->proj_out, l, p, inner, cfg->in_channels, TRUE);
  g_free (p);
  return !diffuse_blk_loader_failed (l);
}

DiffuseTensor *
diffuse_blk_transformer2d_forward (const DiffuseBlkTransformer2D *t, DiffuseTensor *x, DiffuseTensor *context)
{
  return diffuse_blk_transformer2d_forward_ip (t, x, context, NULL);
}

DiffuseTensor *
diffuse_blk_transformer2d_forward_ip (const DiffuseBlkTransformer2D *t, DiffuseTensor *x, DiffuseTensor *context,
                                      const DiffuseBlkIp *ips)
{
  if (!x)
    return NULL;
  g_return_val_if_fail (x->ndim == 4, NULL);
  int64_t B = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
  /* GroupNorm, NCHW -> [B, HW, C], proj_in (a 1x1 conv is the same product) */
  DiffuseTensor *n = diffuse_blk_group_norm (&t->norm, x, DIFFUSE_ACT_NONE);
  DiffuseTensor *nt = n ? diffuse_permute (n, (int[]) { 0, 2, 3, 1 }) : NULL;
  diffuse_tensor_unref (n);
  DiffuseTensor *nc = diffuse_contiguous (nt);
  diffuse_tensor_unref (nt);
  DiffuseTensor *h = nc ? diffuse_reshape (nc, 3, (int64_t[]) { B, H * W, C }) : NULL;
  diffuse_tensor_unref (nc);
  h = blk_swap (h, diffuse_blk_linear (&t->proj_in, h));
  for (int i = 0; i < t->n_blocks; i++)
    h = blk_swap (h, diffuse_blk_transformer_block_forward_ip (&t->blocks[i], h, context, ips ? &ips[i] : NULL));
  h = blk_swap (h, diffuse_blk_linear (&t->proj_out, h));            /* [B, HW, C] */
  if (!h)
    return NULL;
  DiffuseTensor *h4 = diffuse_reshape_4d (h, B, H, W, C);
  diffuse_tensor_unref (h);
  DiffuseTensor *hv = h4 ? diffuse_permute (h4, (int[]) { 0, 3, 1, 2 }) : NULL;   /* [B, C, H, W] view */
  diffuse_tensor_unref (h4);
  DiffuseTensor *out = hv ? diffuse_add (hv, x) : NULL;
  diffuse_tensor_unref (hv);
  return out;
}

/* The self-attention probabilities of the first transformer block (attn1),
 * as diffusers' CrossAttnStoreProcessor keeps them for SAG:
 * softmax (scale * q k^T) per head, [B * heads, HW, HW] (batch-major), in
 * the model's dtype on its device.  The block's input is recomputed (group
 * norm, proj_in, norm1, to_q, to_k): a few small ops at the mid block's size. */
DiffuseTensor *
diffuse_blk_transformer2d_self_attn_probs (const DiffuseBlkTransformer2D *t, DiffuseTensor *x)
{
  if (!x)
    return NULL;
  g_return_val_if_fail (x->ndim == 4, NULL);
  if (t->n_blocks < 1 || t->blocks[0].cfg.only_cross_attention) {
    set_tensor_error (DIFFUSE_ERROR_UNSUPPORTED, "self-attention probabilities: the transformer's first block has "
                      "no self-attention");
    return NULL;
  }
  const DiffuseBlkTransformerBlock *b = &t->blocks[0];
  const DiffuseBlkAttentionConfig *c = &b->attn1.cfg;
  int64_t B = x->shape[0], C = x->shape[1], L = x->shape[2] * x->shape[3];
  const int H = c->heads;
  const int64_t D = c->dim_head;
  DiffuseTensor *n = diffuse_blk_group_norm (&t->norm, x, DIFFUSE_ACT_NONE);
  DiffuseTensor *nt = n ? diffuse_permute (n, (int[]) { 0, 2, 3, 1 }) : NULL;
  diffuse_tensor_unref (n);
  DiffuseTensor *nc = diffuse_contiguous (nt);
  diffuse_tensor_unref (nt);
  DiffuseTensor *h = nc ? diffuse_reshape (nc, 3, (int64_t[]) { B, L, C }) : NULL;
  diffuse_tensor_unref (nc);
  h = blk_swap (h, diffuse_blk_linear (&t->proj_in, h));
  h = blk_swap (h, h ? diffuse_blk_layer_norm (&b->norm1, h) : NULL);
  DiffuseTensor *qk[2] = { diffuse_blk_linear (&b->attn1.to_q, h), diffuse_blk_linear (&b->attn1.to_k, h) };
  diffuse_tensor_unref (h);
  for (int i = 0; i < 2; i++) {
    /* [B, L, H*D] -> [B, H, L, D] */
    DiffuseTensor *r = qk[i] ? diffuse_reshape_4d (qk[i], B, L, H, D) : NULL;
    diffuse_tensor_clear (&qk[i]);
    DiffuseTensor *pr = r ? diffuse_permute (r, (int[]) { 0, 2, 1, 3 }) : NULL;
    diffuse_tensor_unref (r);
    qk[i] = diffuse_contiguous (pr);
    diffuse_tensor_unref (pr);
  }
  DiffuseTensor *scores = qk[0] && qk[1] ? diffuse_matmul (qk[0], qk[1], FALSE, TRUE,
                                                           1.0f / sqrtf ((float) c->dim_head)) : NULL;
  diffuse_tensor_unref (qk[0]);
  diffuse_tensor_unref (qk[1]);
  DiffuseTensor *probs = scores ? diffuse_softmax (scores) : NULL;
  diffuse_tensor_unref (scores);
  DiffuseTensor *out = probs ? diffuse_reshape (probs, 3, (int64_t[]) { B * H, L, L }) : NULL;
  diffuse_tensor_unref (probs);
  return out;
}

void
diffuse_blk_transformer2d_clear (DiffuseBlkTransformer2D *t)
{
  diffuse_blk_group_norm_clear (&t->norm);
  diffuse_blk_linear_clear (&t->proj_in);
  diffuse_blk_linear_clear (&t->proj_out);
  for (int i = 0; t->blocks && i < t->n_blocks; i++)
    diffuse_blk_transformer_block_clear (&t->blocks[i]);
  g_clear_pointer (&t->blocks, g_free);
  t->n_blocks = 0;
}

/* ---- Downsample2D / Upsample2D ---------------------------------------------- */

gboolean
diffuse_blk_downsample_load (DiffuseBlkDownsample *d, DiffuseBlkLoader *l, const char *prefix, int channels,
                             int out_channels, int padding)
{
  memset (d, 0, sizeof *d);
  d->padding = padding;
  char *p = g_strconcat (prefix, ".conv", NULL);
  diffuse_blk_conv2d_load (&d->conv, l, p, channels, out_channels, 3, 2, padding, TRUE);
  g_free (p);
  return !diffuse_blk_loader_failed (l);
}

DiffuseTensor *
diffuse_blk_downsample_forward (const DiffuseBlkDownsample *d, DiffuseTensor *x)
{
  if (!x)
    return NULL;
  if (d->padding == 0) {
    DiffuseTensor *p = diffuse_pad2d (x, 0, 1, 0, 1);
    DiffuseTensor *out = diffuse_blk_conv2d (&d->conv, p);
    diffuse_tensor_unref (p);
    return out;
  }
  return diffuse_blk_conv2d (&d->conv, x);
}

void
diffuse_blk_downsample_clear (DiffuseBlkDownsample *d)
{
  diffuse_blk_conv2d_clear (&d->conv);
}

gboolean
diffuse_blk_upsample_load (DiffuseBlkUpsample *u, DiffuseBlkLoader *l, const char *prefix, int channels,
                           int out_channels)
{
  memset (u, 0, sizeof *u);
  char *p = g_strconcat (prefix, ".conv", NULL);
  diffuse_blk_conv2d_load (&u->conv, l, p, channels, out_channels, 3, 1, 1, TRUE);
  g_free (p);
  return !diffuse_blk_loader_failed (l);
}

DiffuseTensor *
diffuse_blk_upsample_forward (const DiffuseBlkUpsample *u, DiffuseTensor *x, int out_h, int out_w)
{
  if (!x)
    return NULL;
  if (out_h <= 0 || out_w <= 0) {
    out_h = (int) x->shape[2] * 2;
    out_w = (int) x->shape[3] * 2;
  }
  DiffuseTensor *up = diffuse_upsample_nearest (x, out_h, out_w);
  DiffuseTensor *out = diffuse_blk_conv2d (&u->conv, up);
  diffuse_tensor_unref (up);
  return out;
}

void
diffuse_blk_upsample_clear (DiffuseBlkUpsample *u)
{
  diffuse_blk_conv2d_clear (&u->conv);
}

/* ---- TimestepEmbedding ------------------------------------------------------ */

gboolean
diffuse_blk_timestep_embedding_load (DiffuseBlkTimestepEmbedding *e, DiffuseBlkLoader *l, const char *prefix,
                                     int in_channels, int time_embed_dim, DiffuseActivation act,
                                     DiffuseActivation post_act, int cond_proj_dim)
{
  memset (e, 0, sizeof *e);
  e->act = act;
  e->post_act = post_act;
  e->in_channels = in_channels;
  e->cond_proj_dim = cond_proj_dim;
  char *p = g_strconcat (prefix, ".linear_1", NULL);
  diffuse_blk_linear_load (&e->linear_1, l, p, in_channels, time_embed_dim, TRUE);
  g_free (p);
  if (cond_proj_dim > 0) {
    p = g_strconcat (prefix, ".cond_proj", NULL);
    diffuse_blk_linear_load (&e->cond_proj, l, p, cond_proj_dim, in_channels, FALSE);
    g_free (p);
  }
  p = g_strconcat (prefix, ".linear_2", NULL);
  diffuse_blk_linear_load (&e->linear_2, l, p, time_embed_dim, time_embed_dim, TRUE);
  g_free (p);
  return !diffuse_blk_loader_failed (l);
}

DiffuseTensor *
diffuse_blk_timestep_embedding_forward (const DiffuseBlkTimestepEmbedding *e, DiffuseTensor *sample,
                                        DiffuseTensor *condition)
{
  if (!sample)
    return NULL;
  DiffuseTensor *s;
  if (condition && e->cond_proj_dim > 0) {
    DiffuseTensor *c = diffuse_blk_linear (&e->cond_proj, condition);
    s = c ? diffuse_add (sample, c) : NULL;
    diffuse_tensor_unref (c);
  } else {
    s = diffuse_tensor_ref (sample);
  }
  DiffuseTensor *h = diffuse_blk_linear (&e->linear_1, s);
  diffuse_tensor_unref (s);
  if (e->act != DIFFUSE_ACT_NONE)
    h = blk_swap (h, diffuse_activation (h, e->act));
  h = blk_swap (h, diffuse_blk_linear (&e->linear_2, h));
  if (e->post_act != DIFFUSE_ACT_NONE)
    h = blk_swap (h, diffuse_activation (h, e->post_act));
  return h;
}

void
diffuse_blk_timestep_embedding_clear (DiffuseBlkTimestepEmbedding *e)
{
  diffuse_blk_linear_clear (&e->linear_1);
  diffuse_blk_linear_clear (&e->linear_2);
  diffuse_blk_linear_clear (&e->cond_proj);
}

gboolean
diffuse_blk_open_model_dir (const char *dir, DiffuseConfig **config, DiffuseWeights **weights, GError **error)
{
  *config = NULL;
  *weights = NULL;
  char *cpath = g_build_filename (dir, "config.json", NULL);
  DiffuseConfig *cfg = diffuse_config_load (cpath, error);
  g_free (cpath);
  if (!cfg)
    return FALSE;
  char *wpath = g_build_filename (dir, "diffusion_pytorch_model.safetensors", NULL);
  char *ipath = g_build_filename (dir, "diffusion_pytorch_model.safetensors.index.json", NULL);
  DiffuseWeights *w = NULL;
  if (g_file_test (wpath, G_FILE_TEST_EXISTS)) {
    const char *paths[2] = { wpath, NULL };
    w = diffuse_weights_open (paths, error);
  } else if (g_file_test (ipath, G_FILE_TEST_EXISTS)) {
    w = diffuse_weights_open_index (ipath, error);
  } else {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                 "%s: no diffusion_pytorch_model.safetensors (or its index) in the folder", dir);
  }
  g_free (wpath);
  g_free (ipath);
  if (!w) {
    diffuse_config_unref (cfg);
    return FALSE;
  }
  *config = cfg;
  *weights = w;
  return TRUE;
}

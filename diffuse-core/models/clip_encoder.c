/* gst-diffuse — the parts of transformers' CLIP encoders that the text and
 * the vision model share: weight loading with shape checks, and the pre-LN
 * encoder layer
 *
 *   h += out_proj (self-attention (layer_norm1 (h)))     (causal for text)
 *   h += fc2 (act (fc1 (layer_norm2 (h))))
 */
#include "clip_private.h"
#include <diffuse/error.h>
#include <math.h>
#include <string.h>

void
_diffuse_clip_loader_init (DiffuseClipLoader *ld, DiffuseWeights *w, DiffuseDevice *dev, DiffuseDType dtype,
                           const char *prefix, const char *component, GError **error)
{
  ld->w = w;
  ld->dev = dev;
  ld->dtype = dtype;
  ld->prefix = prefix;
  ld->component = component;
  ld->used = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  ld->error = error;
}

void
_diffuse_clip_loader_clear (DiffuseClipLoader *ld)
{
  g_clear_pointer (&ld->used, g_hash_table_unref);
}

/* Loads prefix+name and checks its shape (ndim entries of shape). */
DiffuseTensor *
_diffuse_clip_load (DiffuseClipLoader *ld, const char *prefix, const char *name, int ndim, const int64_t *shape)
{
  if (*ld->error)
    return NULL;
  char *key = g_strconcat (prefix, name, NULL);
  if (!diffuse_weights_has (ld->w, key)) {
    g_set_error (ld->error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "%s: tensor '%s' is missing from %s",
                 ld->component, key, diffuse_weights_describe (ld->w));
    g_free (key);
    return NULL;
  }
  const DiffuseStEntry *e = diffuse_weights_entry (ld->w, key);
  gboolean fits = e->ndim == ndim;
  for (int i = 0; fits && i < ndim; i++)
    fits = e->shape[i] == shape[i];
  if (!fits) {
    GString *want = g_string_new ("["), *got = g_string_new ("[");
    for (int i = 0; i < ndim; i++)
      g_string_append_printf (want, "%s%" G_GINT64_FORMAT, i ? ", " : "", (gint64) shape[i]);
    for (int i = 0; i < e->ndim; i++)
      g_string_append_printf (got, "%s%" G_GINT64_FORMAT, i ? ", " : "", (gint64) e->shape[i]);
    g_string_append_c (want, ']');
    g_string_append_c (got, ']');
    g_set_error (ld->error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                 "%s: tensor '%s' in %s has shape %s, the config needs %s", ld->component, key,
                 diffuse_weights_describe (ld->w), got->str, want->str);
    g_string_free (want, TRUE);
    g_string_free (got, TRUE);
    g_free (key);
    return NULL;
  }
  DiffuseTensor *t = diffuse_weights_get (ld->w, key, ld->dtype, ld->dev, ld->error);
  if (t)
    g_hash_table_add (ld->used, key);
  else
    g_free (key);
  return t;
}

DiffuseTensor *
_diffuse_clip_load1 (DiffuseClipLoader *ld, const char *name, int64_t a)
{
  return _diffuse_clip_load (ld, ld->prefix, name, 1, (int64_t[]) { a });
}

DiffuseTensor *
_diffuse_clip_load2 (DiffuseClipLoader *ld, const char *name, int64_t a, int64_t b)
{
  return _diffuse_clip_load (ld, ld->prefix, name, 2, (int64_t[]) { a, b });
}

void
_diffuse_clip_warn_unused (DiffuseClipLoader *ld)
{
  guint n = 0;
  const char **names = diffuse_weights_names (ld->w, &n);
  GString *list = NULL;
  guint n_unused = 0;
  for (guint i = 0; i < n; i++) {
    const char *nm = names[i];
    if (g_hash_table_contains (ld->used, nm))
      continue;
    /* a persistent buffer in older files; transformers drops it silently */
    if (g_str_has_suffix (nm, "embeddings.position_ids"))
      continue;
    if (!list)
      list = g_string_new (NULL);
    if (n_unused < 8)
      g_string_append_printf (list, "%s'%s'", n_unused ? ", " : "", nm);
    n_unused++;
  }
  g_free (names);
  if (list) {
    g_warning ("%s: %u unexpected tensor(s) in %s not used by the model: %s%s", ld->component, n_unused,
               diffuse_weights_describe (ld->w), list->str, n_unused > 8 ? ", ..." : "");
    g_string_free (list, TRUE);
  }
}

void
_diffuse_clip_layer_load (DiffuseClipLoader *ld, DiffuseClipLayer *l, int i, int64_t D, int64_t F)
{
  char *p = g_strdup_printf ("%sencoder.layers.%d.", ld->prefix, i);
#define L1(field, name, a) l->field = _diffuse_clip_load (ld, p, name, 1, (int64_t[]) { a })
#define L2(field, name, a, b) l->field = _diffuse_clip_load (ld, p, name, 2, (int64_t[]) { a, b })
  L1 (ln1_w, "layer_norm1.weight", D);
  L1 (ln1_b, "layer_norm1.bias", D);
  L2 (q_w, "self_attn.q_proj.weight", D, D);
  L1 (q_b, "self_attn.q_proj.bias", D);
  L2 (k_w, "self_attn.k_proj.weight", D, D);
  L1 (k_b, "self_attn.k_proj.bias", D);
  L2 (v_w, "self_attn.v_proj.weight", D, D);
  L1 (v_b, "self_attn.v_proj.bias", D);
  L2 (o_w, "self_attn.out_proj.weight", D, D);
  L1 (o_b, "self_attn.out_proj.bias", D);
  L1 (ln2_w, "layer_norm2.weight", D);
  L1 (ln2_b, "layer_norm2.bias", D);
  L2 (fc1_w, "mlp.fc1.weight", F, D);
  L1 (fc1_b, "mlp.fc1.bias", F);
  L2 (fc2_w, "mlp.fc2.weight", D, F);
  L1 (fc2_b, "mlp.fc2.bias", D);
#undef L1
#undef L2
  g_free (p);
}

void
_diffuse_clip_layer_clear (DiffuseClipLayer *l)
{
  DiffuseTensor **all[] = { &l->ln1_w, &l->ln1_b, &l->ln2_w, &l->ln2_b, &l->q_w, &l->q_b, &l->k_w, &l->k_b,
                            &l->v_w, &l->v_b, &l->o_w, &l->o_b, &l->fc1_w, &l->fc1_b, &l->fc2_w, &l->fc2_b };
  for (guint j = 0; j < G_N_ELEMENTS (all); j++)
    diffuse_tensor_clear (all[j]);
}

/* [B, L, D] -> view [B, H, L, hd] */
static DiffuseTensor *
split_heads (DiffuseTensor *x, int64_t B, int64_t L, int H, int64_t hd)
{
  if (!x)
    return NULL;
  DiffuseTensor *r = diffuse_reshape_4d (x, B, L, H, hd);
  diffuse_tensor_unref (x);
  if (!r)
    return NULL;
  DiffuseTensor *p = diffuse_permute (r, (const int[]) { 0, 2, 1, 3 });
  diffuse_tensor_unref (r);
  return p;
}

DiffuseTensor *
_diffuse_clip_encoder_layer (const DiffuseClipLayer *l, DiffuseTensor *h, DiffuseTensor *mask, gboolean causal,
                             int n_heads, float eps, DiffuseActivation act)
{
  if (!h)
    return NULL;
  const int H = n_heads;
  const int64_t B = h->shape[0], L = h->shape[1], D = h->shape[2], hd = D / H;

  DiffuseTensor *x = diffuse_layer_norm (h, l->ln1_w, l->ln1_b, eps);
  DiffuseTensor *q = split_heads (diffuse_linear (x, l->q_w, l->q_b), B, L, H, hd);
  DiffuseTensor *k = split_heads (diffuse_linear (x, l->k_w, l->k_b), B, L, H, hd);
  DiffuseTensor *v = split_heads (diffuse_linear (x, l->v_w, l->v_b), B, L, H, hd);
  diffuse_tensor_clear (&x);
  DiffuseTensor *a = diffuse_sdpa (q, k, v, mask, causal, (float) (1.0 / sqrt ((double) hd)));
  diffuse_tensor_clear (&q);
  diffuse_tensor_clear (&k);
  diffuse_tensor_clear (&v);
  /* [B, H, L, hd] -> [B, L, H, hd] -> [B, L, D] */
  DiffuseTensor *at = a ? diffuse_permute (a, (const int[]) { 0, 2, 1, 3 }) : NULL;
  diffuse_tensor_clear (&a);
  DiffuseTensor *ac = diffuse_contiguous (at);
  diffuse_tensor_clear (&at);
  DiffuseTensor *a3 = ac ? diffuse_reshape (ac, 3, (const int64_t[]) { B, L, D }) : NULL;
  diffuse_tensor_clear (&ac);
  DiffuseTensor *o = diffuse_linear (a3, l->o_w, l->o_b);
  diffuse_tensor_clear (&a3);
  DiffuseTensor *h1 = o ? diffuse_add (h, o) : NULL;
  diffuse_tensor_clear (&o);

  x = diffuse_layer_norm (h1, l->ln2_w, l->ln2_b, eps);
  DiffuseTensor *f = diffuse_linear (x, l->fc1_w, l->fc1_b);
  diffuse_tensor_clear (&x);
  DiffuseTensor *g = diffuse_activation (f, act);
  diffuse_tensor_clear (&f);
  f = diffuse_linear (g, l->fc2_w, l->fc2_b);
  diffuse_tensor_clear (&g);
  if (!f) {
    diffuse_tensor_clear (&h1);
    return NULL;
  }
  /* h1 is ours alone: accumulate the MLP branch in place */
  if (!diffuse_axpy_inplace (h1, 1.0f, f))
    diffuse_tensor_clear (&h1);
  diffuse_tensor_unref (f);
  return h1;
}


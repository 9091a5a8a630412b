/* gst-diffuse — transformers' CLIPVisionTransformer (clip_private.h). */
#include "clip_private.h"
#include <diffuse/error.h>
#include <string.h>

struct _DiffuseClipVision {
  DiffuseDevice *dev;
  DiffuseDType dtype;
  int hidden, inter, n_layers, n_heads, image_size, patch, channels;
  float eps;
  DiffuseActivation act;
  DiffuseTensor *class_emb, *patch_w, *pos_emb, *pre_w, *pre_b, *post_w, *post_b;
  DiffuseClipLayer *layers;
};

void
_diffuse_clip_vision_free (DiffuseClipVision *m)
{
  if (!m)
    return;
  DiffuseTensor **all[] = { &m->class_emb, &m->patch_w, &m->pos_emb, &m->pre_w, &m->pre_b, &m->post_w, &m->post_b };
  for (guint i = 0; i < G_N_ELEMENTS (all); i++)
    diffuse_tensor_clear (all[i]);
  for (int i = 0; m->layers && i < m->n_layers; i++)
    _diffuse_clip_layer_clear (&m->layers[i]);
  g_free (m->layers);
  g_free (m);
}

DiffuseClipVision *
_diffuse_clip_vision_new (DiffuseConfig *cfg, DiffuseClipLoader *ld, GError **error)
{
  DiffuseClipVision *m = g_new0 (DiffuseClipVision, 1);
  m->dev = ld->dev;
  m->dtype = ld->dtype;
  m->hidden = (int) diffuse_config_get_int (cfg, "hidden_size", 768);
  m->inter = (int) diffuse_config_get_int (cfg, "intermediate_size", 3072);
  m->n_layers = (int) diffuse_config_get_int (cfg, "num_hidden_layers", 12);
  m->n_heads = (int) diffuse_config_get_int (cfg, "num_attention_heads", 12);
  m->image_size = (int) diffuse_config_get_int (cfg, "image_size", 224);
  m->patch = (int) diffuse_config_get_int (cfg, "patch_size", 32);
  m->channels = (int) diffuse_config_get_int (cfg, "num_channels", 3);
  m->eps = (float) diffuse_config_get_double (cfg, "layer_norm_eps", 1e-5);
  const char *act = diffuse_config_get_string (cfg, "hidden_act", "quick_gelu");
  if (!diffuse_activation_from_string (act, &m->act)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: vision hidden_act \"%s\" is not supported",
                 ld->component, act);
    goto fail;
  }
  if (m->hidden <= 0 || m->inter <= 0 || m->n_layers <= 0 || m->n_heads <= 0 || m->hidden % m->n_heads != 0 ||
      m->patch <= 0 || m->image_size < m->patch || m->image_size % m->patch != 0 || m->channels <= 0 ||
      m->image_size > 4096) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                 "%s: invalid CLIP vision config (hidden_size %d, num_attention_heads %d, intermediate_size %d, "
                 "num_hidden_layers %d, image_size %d, patch_size %d, num_channels %d)",
                 ld->component, m->hidden, m->n_heads, m->inter, m->n_layers, m->image_size, m->patch, m->channels);
    goto fail;
  }
  const int64_t D = m->hidden, g = m->image_size / m->patch;
  m->class_emb = _diffuse_clip_load1 (ld, "embeddings.class_embedding", D);
  m->patch_w = _diffuse_clip_load (ld, ld->prefix, "embeddings.patch_embedding.weight", 4,
                                   (int64_t[]) { D, m->channels, m->patch, m->patch });
  m->pos_emb = _diffuse_clip_load2 (ld, "embeddings.position_embedding.weight", g * g + 1, D);
  m->pre_w = _diffuse_clip_load1 (ld, "pre_layrnorm.weight", D);   /* sic: transformers' name */
  m->pre_b = _diffuse_clip_load1 (ld, "pre_layrnorm.bias", D);
  m->layers = g_new0 (DiffuseClipLayer, m->n_layers);
  for (int i = 0; i < m->n_layers && !*error; i++)
    _diffuse_clip_layer_load (ld, &m->layers[i], i, D, m->inter);
  m->post_w = _diffuse_clip_load1 (ld, "post_layernorm.weight", D);
  m->post_b = _diffuse_clip_load1 (ld, "post_layernorm.bias", D);
  if (*error)
    goto fail;
  return m;

fail:
  _diffuse_clip_vision_free (m);
  return NULL;
}

int
_diffuse_clip_vision_hidden_size (DiffuseClipVision *m)
{
  return m->hidden;
}

int
_diffuse_clip_vision_image_size (DiffuseClipVision *m)
{
  return m->image_size;
}

static DiffuseTensor *
swap (DiffuseTensor *old, DiffuseTensor *new_)
{
  diffuse_tensor_unref (old);
  return new_;
}

DiffuseTensor *
_diffuse_clip_vision_pooled (DiffuseClipVision *m, DiffuseTensor *pixel_values, GError **error)
{
  DiffuseTensor *x = pixel_values;
  if (x->ndim != 4 || x->shape[0] < 1 || x->shape[0] > 4096 || x->shape[1] != m->channels || x->shape[2] != m->image_size || x->shape[3] != m->image_size) {
    char *d = diffuse_tensor_describe (x);
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "CLIP vision model: pixel_values %s should be [B, %d, %d, %d] (B 1..4096)", d, m->channels, m->image_size,
                 m->image_size);
    g_free (d);
    return NULL;
  }
  const int64_t B = x->shape[0], D = m->hidden, g = m->image_size / m->patch;
  /* patch embedding: [B, D, g, g] -> [B, g*g, D] */
  DiffuseTensor *xd = diffuse_to_device (x, m->dev);
  DiffuseTensor *h = swap (xd, diffuse_cast (xd, m->dtype));
  h = swap (h, h ? diffuse_conv2d (h, m->patch_w, NULL, m->patch, m->patch, 0, 0) : NULL);
  h = swap (h, h ? diffuse_reshape (h, 3, (const int64_t[]) { B, D, g * g }) : NULL);
  h = swap (h, h ? diffuse_permute (h, (const int[]) { 0, 2, 1 }) : NULL);
  /* [class; patches] + positions */
  DiffuseTensor *cls = diffuse_reshape (m->class_emb, 3, (const int64_t[]) { 1, 1, D });
  DiffuseTensor **parts = g_new (DiffuseTensor *, (gsize) (2 * B));
  for (int64_t b = 0; b < B; b++) {
    parts[2 * b] = cls;
    parts[2 * b + 1] = h ? diffuse_narrow (h, 0, b, 1) : NULL;
  }
  DiffuseTensor *seq = NULL;
  if (h && cls) {
    /* per image [1, 1 + g*g, D], then the batch */
    DiffuseTensor **rows = g_new0 (DiffuseTensor *, (gsize) B);
    gboolean ok = TRUE;
    for (int64_t b = 0; b < B && ok; b++)
      ok = (rows[b] = diffuse_concat (parts + 2 * b, 2, 1)) != NULL;
    if (ok)
      seq = diffuse_concat (rows, (int) B, 0);
    for (int64_t b = 0; b < B; b++)
      diffuse_tensor_clear (&rows[b]);
    g_free (rows);
  }
  for (int64_t b = 0; b < B; b++)
    diffuse_tensor_clear (&parts[2 * b + 1]);
  g_free (parts);
  diffuse_tensor_clear (&cls);
  diffuse_tensor_clear (&h);
  h = seq ? diffuse_add (seq, m->pos_emb) : NULL;
  diffuse_tensor_clear (&seq);
  h = swap (h, h ? diffuse_layer_norm (h, m->pre_w, m->pre_b, m->eps) : NULL);
  for (int i = 0; i < m->n_layers && h; i++)
    h = swap (h, _diffuse_clip_encoder_layer (&m->layers[i], h, NULL, FALSE, m->n_heads, m->eps, m->act));
  /* pooled: post_layernorm of the class token */
  DiffuseTensor *c0 = h ? diffuse_narrow (h, 1, 0, 1) : NULL;
  diffuse_tensor_clear (&h);
  DiffuseTensor *c1 = c0 ? diffuse_contiguous (c0) : NULL;
  diffuse_tensor_clear (&c0);
  DiffuseTensor *c2 = c1 ? diffuse_reshape (c1, 2, (const int64_t[]) { B, D }) : NULL;
  diffuse_tensor_clear (&c1);
  DiffuseTensor *pooled = c2 ? diffuse_layer_norm (c2, m->post_w, m->post_b, m->eps) : NULL;
  diffuse_tensor_clear (&c2);
  if (!pooled) {
    GError *e = NULL;
    if (diffuse_tensor_take_error (&e))
      g_propagate_prefixed_error (error, e, "CLIP vision model: ");
    else
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "CLIP vision model: an operation failed");
  }
  return pooled;
}

/* gst-diffuse — CLIP text encoder, as transformers' CLIPTextModel(WithProjection).
 *
 *   h = token_embedding[ids] + position_embedding[0..L)
 *   per layer (pre-LN):  h += out_proj (causal self-attention (layer_norm1 (h)))
 *                        h += fc2 (act (fc1 (layer_norm2 (h))))
 *   last_hidden_state = final_layer_norm (h)
 *   pooled = last_hidden_state[b, eos position]
 *   text_embeds = pooled @ text_projection^T   (WithProjection)
 */
#include <diffuse/clip_text.h>
#include "clip_private.h"
#include <diffuse/error.h>
#include <float.h>
#include <math.h>
#include <string.h>

struct _DiffuseClipText {
  gint ref_count;
  DiffuseDevice *dev;
  DiffuseDType dtype;
  int hidden, inter, n_layers, n_heads, max_pos, vocab, proj_dim;
  float eps;
  gint64 eos;
  gboolean use_attention_mask;
  DiffuseActivation act;
  DiffuseTensor *tok_emb, *pos_emb;
  DiffuseClipLayer *layers;
  DiffuseTensor *final_w, *final_b;
  DiffuseTensor *proj_w;       /* NULL without projection */
};

/* ---- loading ----------------------------------------------------------- */

static gboolean
has_projection_arch (DiffuseConfig *config)
{
  char **arch = diffuse_config_get_string_array (config, "architectures");
  gboolean proj = FALSE;
  for (char **a = arch; a && *a; a++)
    if (g_str_equal (*a, "CLIPTextModelWithProjection"))
      proj = TRUE;
  g_strfreev (arch);
  return proj;
}

static void
clip_text_free (DiffuseClipText *m)
{
  diffuse_tensor_clear (&m->tok_emb);
  diffuse_tensor_clear (&m->pos_emb);
  for (int i = 0; m->layers && i < m->n_layers; i++)
    _diffuse_clip_layer_clear (&m->layers[i]);
  g_free (m->layers);
  diffuse_tensor_clear (&m->final_w);
  diffuse_tensor_clear (&m->final_b);
  diffuse_tensor_clear (&m->proj_w);
  g_free (m);
}

DiffuseClipText *
diffuse_clip_text_new (DiffuseConfig *config, DiffuseWeights *weights, DiffuseDevice *dev, DiffuseDType dtype,
                       GError **error)
{
  g_return_val_if_fail (config != NULL && weights != NULL && dev != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  const char *label = diffuse_config_label (config);
  DiffuseClipText *m = g_new0 (DiffuseClipText, 1);
  m->ref_count = 1;
  m->dev = dev;
  m->dtype = dtype;
  m->hidden = (int) diffuse_config_get_int (config, "hidden_size", 512);
  m->inter = (int) diffuse_config_get_int (config, "intermediate_size", 2048);
  m->n_layers = (int) diffuse_config_get_int (config, "num_hidden_layers", 12);
  m->n_heads = (int) diffuse_config_get_int (config, "num_attention_heads", 8);
  m->max_pos = (int) diffuse_config_get_int (config, "max_position_embeddings", 77);
  m->vocab = (int) diffuse_config_get_int (config, "vocab_size", 49408);
  m->eps = (float) diffuse_config_get_double (config, "layer_norm_eps", 1e-5);
  m->use_attention_mask = diffuse_config_get_bool (config, "use_attention_mask", FALSE);
  gboolean with_proj = has_projection_arch (config);
  m->proj_dim = with_proj ? (int) diffuse_config_get_int (config, "projection_dim", 512) : 0;

  /* eos_token_id: an int (a list is possible in transformers' typing: first entry) */
  m->eos = 49407;
  JsonNode *eos = diffuse_config_get_node (config, "eos_token_id");
  if (eos && JSON_NODE_HOLDS_VALUE (eos))
    m->eos = json_node_get_int (eos);
  else if (eos && JSON_NODE_HOLDS_ARRAY (eos) && json_array_get_length (json_node_get_array (eos)) > 0)
    m->eos = json_array_get_int_element (json_node_get_array (eos), 0);

  const char *act = diffuse_config_get_string (config, "hidden_act", "quick_gelu");
  if (!diffuse_activation_from_string (act, &m->act)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: hidden_act \"%s\" is not supported", label, act);
    goto fail;
  }
  if (m->hidden <= 0 || m->inter <= 0 || m->n_layers <= 0 || m->n_heads <= 0 || m->max_pos <= 0 ||
      m->vocab <= 0 || m->hidden % m->n_heads != 0 || (with_proj && m->proj_dim <= 0)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                 "%s: invalid CLIP text config (hidden_size %d, num_attention_heads %d, intermediate_size %d, "
                 "num_hidden_layers %d, max_position_embeddings %d, vocab_size %d)",
                 label, m->hidden, m->n_heads, m->inter, m->n_layers, m->max_pos, m->vocab);
    goto fail;
  }

  char *component = g_strdup_printf ("%s (%s)", with_proj ? "CLIPTextModelWithProjection" : "CLIPTextModel",
                                     label);
  DiffuseClipLoader ld;
  _diffuse_clip_loader_init (&ld, weights, dev, dtype, "text_model.", component, error);
  /* transformers 5 writes CLIPTextModel without the prefix and loads both */
  if (!diffuse_weights_has (weights, "text_model.embeddings.token_embedding.weight") &&
      diffuse_weights_has (weights, "embeddings.token_embedding.weight"))
    ld.prefix = "";

  int64_t D = m->hidden, F = m->inter;
  m->tok_emb = _diffuse_clip_load2 (&ld, "embeddings.token_embedding.weight", m->vocab, D);
  m->pos_emb = _diffuse_clip_load2 (&ld, "embeddings.position_embedding.weight", m->max_pos, D);
  m->layers = g_new0 (DiffuseClipLayer, m->n_layers);
  for (int i = 0; i < m->n_layers && !*error; i++)
    _diffuse_clip_layer_load (&ld, &m->layers[i], i, D, F);
  m->final_w = _diffuse_clip_load1 (&ld, "final_layer_norm.weight", D);
  m->final_b = _diffuse_clip_load1 (&ld, "final_layer_norm.bias", D);
  if (with_proj)
    m->proj_w = _diffuse_clip_load (&ld, "", "text_projection.weight", 2, (int64_t[]) { m->proj_dim, D });
  if (!*error)
    _diffuse_clip_warn_unused (&ld);
  _diffuse_clip_loader_clear (&ld);
  g_free (component);
  if (*error)
    goto fail;
  return m;

fail:
  clip_text_free (m);
  return NULL;
}

DiffuseClipText *
diffuse_clip_text_ref (DiffuseClipText *m)
{
  g_return_val_if_fail (m != NULL, NULL);
  g_atomic_int_inc (&m->ref_count);
  return m;
}

void
diffuse_clip_text_unref (DiffuseClipText *m)
{
  if (m && g_atomic_int_dec_and_test (&m->ref_count))
    clip_text_free (m);
}

int diffuse_clip_text_hidden_size (DiffuseClipText *m) { return m->hidden; }
int diffuse_clip_text_num_layers (DiffuseClipText *m) { return m->n_layers; }
int diffuse_clip_text_max_positions (DiffuseClipText *m) { return m->max_pos; }
int diffuse_clip_text_vocab_size (DiffuseClipText *m) { return m->vocab; }
gint64 diffuse_clip_text_eos_token_id (DiffuseClipText *m) { return m->eos; }
int diffuse_clip_text_projection_dim (DiffuseClipText *m) { return m->proj_dim; }
gboolean diffuse_clip_text_uses_attention_mask (DiffuseClipText *m) { return m->use_attention_mask; }
DiffuseDevice *diffuse_clip_text_device (DiffuseClipText *m) { return m->dev; }
DiffuseDType diffuse_clip_text_dtype (DiffuseClipText *m) { return m->dtype; }

/* ---- forward ----------------------------------------------------------- */

void
diffuse_clip_text_default_params (DiffuseClipTextParams *p)
{
  memset (p, 0, sizeof *p);
}

void
diffuse_clip_text_output_clear (DiffuseClipTextOutput *out)
{
  if (!out)
    return;
  diffuse_tensor_clear (&out->last_hidden_state);
  diffuse_tensor_clear (&out->pooled);
  diffuse_tensor_clear (&out->text_embeds);
  diffuse_tensor_clear (&out->prompt_embeds);
  for (int i = 0; i < out->n_hidden_states; i++)
    diffuse_tensor_clear (&out->hidden_states[i]);
  g_free (out->hidden_states);
  memset (out, 0, sizeof *out);
}

static gboolean
op_failed (GError **error, const char *what)
{
  GError *e = NULL;
  if (diffuse_tensor_take_error (&e)) {
    g_propagate_prefixed_error (error, e, "CLIP text encoder, %s: ", what);
  } else {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "CLIP text encoder, %s: an operation failed", what);
  }
  return FALSE;
}

gboolean
diffuse_clip_text_forward (DiffuseClipText *m, const int32_t *input_ids, int batch, int seq_len,
                           const DiffuseClipTextParams *params, DiffuseClipTextOutput *out, GError **error)
{
  g_return_val_if_fail (m != NULL && input_ids != NULL && out != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);
  DiffuseClipTextParams defaults;
  if (!params) {
    diffuse_clip_text_default_params (&defaults);
    params = &defaults;
  }
  memset (out, 0, sizeof *out);

  int64_t B = batch, L = seq_len, D = m->hidden;
  if (batch <= 0 || seq_len <= 0 || seq_len > m->max_pos) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "CLIP text encoder: sequence length %d (batch %d) outside 1..%d (max_position_embeddings)",
                 seq_len, batch, m->max_pos);
    return FALSE;
  }
  for (int64_t i = 0; i < B * L; i++)
    if (input_ids[i] < 0 || input_ids[i] >= m->vocab) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                   "CLIP text encoder: token id %d at position %" G_GINT64_FORMAT " outside the vocabulary (%d)",
                   input_ids[i], i, m->vocab);
      return FALSE;
    }
  if (params->clip_skip < 0 || params->clip_skip > m->n_layers) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "CLIP text encoder: clip_skip %d outside 0..%d (the model has %d layers)", params->clip_skip,
                 m->n_layers, m->n_layers);
    return FALSE;
  }

  /* padding mask, additive [B, 1, 1, L]: torch.finfo(dtype).min on padded
   * keys as transformers' eager path (finite, so no row turns into NaN) */
  DiffuseTensor *mask = NULL;
  if (params->attention_mask) {
    float lowest = m->dtype == DIFFUSE_DTYPE_F16 ? -65504.0f
                 : m->dtype == DIFFUSE_DTYPE_BF16 ? -3.38953139e38f : -FLT_MAX;
    float *mv = g_new (float, B * L);
    for (int64_t i = 0; i < B * L; i++)
      mv[i] = params->attention_mask[i] ? 0.0f : lowest;
    DiffuseTensor *hm = diffuse_tensor_from_f32 (mv, 4, (const int64_t[]) { B, 1, 1, L });
    g_free (mv);
    DiffuseTensor *cm = diffuse_cast (hm, m->dtype);
    diffuse_tensor_clear (&hm);
    mask = diffuse_to_device (cm, m->dev);
    diffuse_tensor_clear (&cm);
    if (!mask)
      return op_failed (error, "attention mask");
  }

  /* embeddings */
  DiffuseTensor *tok = diffuse_embedding (m->tok_emb, input_ids, B * L);
  DiffuseTensor *tok3 = tok ? diffuse_reshape (tok, 3, (const int64_t[]) { B, L, D }) : NULL;
  diffuse_tensor_clear (&tok);
  DiffuseTensor *pos = diffuse_narrow (m->pos_emb, 0, 0, L);
  DiffuseTensor *h = tok3 && pos ? diffuse_add (tok3, pos) : NULL;
  diffuse_tensor_clear (&tok3);
  diffuse_tensor_clear (&pos);
  if (!h) {
    diffuse_tensor_clear (&mask);
    return op_failed (error, "embeddings");
  }

  /* hidden_states[i] = input of layer i (i = 0: embeddings), [n_layers] = last */
  int n_hs = m->n_layers + 1;
  int keep_idx = params->clip_skip > 0 ? n_hs - (params->clip_skip + 1) : -1;
  DiffuseTensor *kept = NULL;
  if (params->output_hidden_states) {
    out->n_hidden_states = n_hs;
    out->hidden_states = g_new0 (DiffuseTensor *, n_hs);
  }
  for (int i = 0; i < m->n_layers; i++) {
    if (params->output_hidden_states)
      out->hidden_states[i] = diffuse_tensor_ref (h);
    if (i == keep_idx)
      kept = diffuse_tensor_ref (h);
    DiffuseTensor *next = _diffuse_clip_encoder_layer (&m->layers[i], h, mask, TRUE, m->n_heads, m->eps, m->act);
    diffuse_tensor_unref (h);
    h = next;
    if (!h) {
      diffuse_tensor_clear (&mask);
      diffuse_tensor_clear (&kept);
      diffuse_clip_text_output_clear (out);
      char *what = g_strdup_printf ("layer %d", i);
      op_failed (error, what);
      g_free (what);
      return FALSE;
    }
  }
  diffuse_tensor_clear (&mask);
  if (params->output_hidden_states)
    out->hidden_states[m->n_layers] = diffuse_tensor_ref (h);
  if (keep_idx == m->n_layers)
    kept = diffuse_tensor_ref (h);

  out->last_hidden_state = diffuse_layer_norm (h, m->final_w, m->final_b, m->eps);
  diffuse_tensor_unref (h);
  if (kept) {
    out->prompt_embeds = diffuse_layer_norm (kept, m->final_w, m->final_b, m->eps);
    diffuse_tensor_unref (kept);
  } else if (out->last_hidden_state) {
    out->prompt_embeds = diffuse_tensor_ref (out->last_hidden_state);
  }

  /* pooled: row b * L + position of last_hidden_state viewed as [B * L, D] */
  int32_t *rows = g_new (int32_t, B);
  for (int64_t b = 0; b < B; b++) {
    const int32_t *ids = input_ids + b * L;
    int64_t at = 0;
    if (m->eos == 2) {
      for (int64_t j = 1; j < L; j++)
        if (ids[j] > ids[at])
          at = j;   /* first maximum, as torch.argmax */
    } else {
      for (int64_t j = 0; j < L; j++)
        if (ids[j] == m->eos) {
          at = j;
          break;
        }
    }
    rows[b] = (int32_t) (b * L + at);
  }
  DiffuseTensor *flat = out->last_hidden_state ? diffuse_reshape (out->last_hidden_state, 2,
                                                                  (const int64_t[]) { B * L, D }) : NULL;
  out->pooled = diffuse_embedding (flat, rows, B);
  diffuse_tensor_clear (&flat);
  g_free (rows);
  if (m->proj_w && out->pooled)
    out->text_embeds = diffuse_linear (out->pooled, m->proj_w, NULL);

  if (!out->last_hidden_state || !out->prompt_embeds || !out->pooled || (m->proj_w && !out->text_embeds)) {
    diffuse_clip_text_output_clear (out);
    return op_failed (error, "final layer norm / pooling");
  }
  return TRUE;
}

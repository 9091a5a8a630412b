/* gst-diffuse — CLIP text encoder (transformers' CLIPTextModel and
 * CLIPTextModelWithProjection).
 *
 * Built from a transformers config.json and a weight set whose tensor names
 * are transformers' ("text_model.encoder.layers.0.self_attn.q_proj.weight",
 * ...).  Files written by transformers 5 without the "text_model." prefix are
 * accepted too, as transformers does.  The model is immutable after
 * construction; a forward pass may run from several threads at once. */
#pragma once

#include <diffuse/tensor.h>
#include <diffuse/safetensors.h>
#include <diffuse/config.h>

G_BEGIN_DECLS

typedef struct _DiffuseClipText DiffuseClipText;

/* Reads hidden_size, intermediate_size, num_hidden_layers,
 * num_attention_heads, max_position_embeddings, vocab_size, hidden_act
 * ("quick_gelu", "gelu", ...), layer_norm_eps, eos_token_id, projection_dim,
 * use_attention_mask and architectures (a "CLIPTextModelWithProjection"
 * entry adds the text_projection head).  Weights are taken in `dtype` on
 * `dev` (borrowed from the mapping when possible).
 * Errors: DIFFUSE_ERROR_CONFIG (a config value out of range, or a tensor
 * whose shape does not fit the config), DIFFUSE_ERROR_NOT_FOUND (a missing
 * tensor, named).  Tensors the model does not use are reported with one
 * g_warning (as transformers logs them) and otherwise ignored;
 * "text_model.embeddings.position_ids" silently. */
DiffuseClipText *diffuse_clip_text_new (DiffuseConfig *config, DiffuseWeights *weights, DiffuseDevice *dev,
                                        DiffuseDType dtype, GError **error);
DiffuseClipText *diffuse_clip_text_ref (DiffuseClipText *m);
void diffuse_clip_text_unref (DiffuseClipText *m);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (DiffuseClipText, diffuse_clip_text_unref)

int diffuse_clip_text_hidden_size (DiffuseClipText *m);
int diffuse_clip_text_num_layers (DiffuseClipText *m);
int diffuse_clip_text_max_positions (DiffuseClipText *m);   /* max_position_embeddings */
int diffuse_clip_text_vocab_size (DiffuseClipText *m);
gint64 diffuse_clip_text_eos_token_id (DiffuseClipText *m);
/* Width of text_embeds; 0 for a plain CLIPTextModel. */
int diffuse_clip_text_projection_dim (DiffuseClipText *m);
/* config "use_attention_mask": diffusers' encode_prompt passes the
 * tokenizer's attention mask only when this is TRUE. */
gboolean diffuse_clip_text_uses_attention_mask (DiffuseClipText *m);
DiffuseDevice *diffuse_clip_text_device (DiffuseClipText *m);
DiffuseDType diffuse_clip_text_dtype (DiffuseClipText *m);

typedef struct {
  /* [batch * seq_len], 1 = attend, 0 = padding; NULL = none (the SD
   * pipelines' default).  Combined with the causal mask as transformers does. */
  const int32_t *attention_mask;
  /* 0: prompt_embeds is last_hidden_state.  n >= 1: diffusers' clip_skip,
   * prompt_embeds = final_layer_norm (hidden_states[-(n + 1)]); needs
   * n <= num_layers. */
  int clip_skip;
  /* Keep every hidden state (embeddings, then each layer's output, without
   * the final layer norm) in out->hidden_states, as output_hidden_states=True.
   * SDXL's encode_prompt uses hidden_states[-(clip_skip + 2)] from here
   * (no final layer norm), not prompt_embeds. */
  gboolean output_hidden_states;
} DiffuseClipTextParams;

void diffuse_clip_text_default_params (DiffuseClipTextParams *p);

typedef struct {
  DiffuseTensor *last_hidden_state;   /* [B, L, D], after final_layer_norm */
  DiffuseTensor *pooled;              /* [B, D], pooler_output (EOS token, transformers' rule) */
  DiffuseTensor *text_embeds;         /* [B, projection_dim] with a projection head, else NULL */
  DiffuseTensor *prompt_embeds;       /* [B, L, D], see clip_skip */
  int n_hidden_states;                /* num_layers + 1 when asked, else 0 */
  DiffuseTensor **hidden_states;      /* [n_hidden_states], each [B, L, D] */
} DiffuseClipTextOutput;

/* Unrefs every tensor and zeroes the struct. */
void diffuse_clip_text_output_clear (DiffuseClipTextOutput *out);

/* input_ids [batch * seq_len], row-major; seq_len <= max_position_embeddings,
 * ids < vocab_size (else DIFFUSE_ERROR_INVALID_ARGUMENT).  Pooling: with the
 * legacy eos_token_id == 2 the position of the largest id, otherwise the
 * first position holding eos_token_id (0 when a row has none), as
 * transformers.  On failure returns FALSE and leaves *out cleared. */
gboolean diffuse_clip_text_forward (DiffuseClipText *m, const int32_t *input_ids, int batch, int seq_len,
                                    const DiffuseClipTextParams *params, DiffuseClipTextOutput *out,
                                    GError **error);

G_END_DECLS

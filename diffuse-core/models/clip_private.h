/* gst-diffuse — what the CLIP text and vision encoders share (private):
 * tensor loading with shape checks and unused-tensor reporting, and the
 * pre-LN transformer encoder layer of transformers' CLIPEncoderLayer. */
#pragma once

#include <diffuse/tensor.h>
#include <diffuse/safetensors.h>
#include <diffuse/config.h>

G_BEGIN_DECLS

typedef struct {
  DiffuseTensor *ln1_w, *ln1_b, *ln2_w, *ln2_b;
  DiffuseTensor *q_w, *q_b, *k_w, *k_b, *v_w, *v_b, *o_w, *o_b;
  DiffuseTensor *fc1_w, *fc1_b, *fc2_w, *fc2_b;
} DiffuseClipLayer;

typedef struct {
  DiffuseWeights *w;
  DiffuseDevice *dev;
  DiffuseDType dtype;
  const char *prefix;          /* of every name ("text_model.", "vision_model.vision_model.", "") */
  const char *component;       /* for messages */
  GHashTable *used;            /* names consumed */
  GError **error;              /* the first failure; later loads return NULL at once */
} DiffuseClipLoader;

void _diffuse_clip_loader_init (DiffuseClipLoader *ld, DiffuseWeights *w, DiffuseDevice *dev, DiffuseDType dtype,
                                const char *prefix, const char *component, GError **error);
void _diffuse_clip_loader_clear (DiffuseClipLoader *ld);
/* prefix + name with the given shape (DIFFUSE_ERROR_NOT_FOUND when missing,
 * DIFFUSE_ERROR_CONFIG when the shape differs), in the loader's dtype/device */
DiffuseTensor *_diffuse_clip_load (DiffuseClipLoader *ld, const char *prefix, const char *name, int ndim,
                                   const int64_t *shape);
DiffuseTensor *_diffuse_clip_load1 (DiffuseClipLoader *ld, const char *name, int64_t a);
DiffuseTensor *_diffuse_clip_load2 (DiffuseClipLoader *ld, const char *name, int64_t a, int64_t b);
/* one g_warning listing the tensors no load took (transformers logs them) */
void _diffuse_clip_warn_unused (DiffuseClipLoader *ld);

/* "<ld->prefix>encoder.layers.<i>." tensors, hidden D, intermediate F */
void _diffuse_clip_layer_load (DiffuseClipLoader *ld, DiffuseClipLayer *l, int i, int64_t D, int64_t F);
void _diffuse_clip_layer_clear (DiffuseClipLayer *l);

/* One layer on h [B, L, D]: h + attn (ln1 (h)), then + mlp (ln2 (.)); mask
 * NULL or additive [B, 1, 1, L]; causal for the text encoder.  Returns the
 * new hidden state (h is not modified) or NULL (tensor error set). */
DiffuseTensor *_diffuse_clip_encoder_layer (const DiffuseClipLayer *l, DiffuseTensor *h, DiffuseTensor *mask,
                                            gboolean causal, int n_heads, float eps, DiffuseActivation act);

G_END_DECLS

G_BEGIN_DECLS

/* transformers' CLIPVisionTransformer (the CLIPVisionModel body):
 *
 *   patches = conv (pixel_values, patch_embedding, stride = patch_size)    [B, g*g, D]
 *   h = [class_embedding; patches] + position_embedding                   [B, g*g + 1, D]
 *   h = pre_layrnorm (h); the encoder layers (no mask, not causal)
 *   pooled = post_layernorm (h[:, 0])
 *
 * Built from a CLIPVisionConfig (hidden_size, intermediate_size,
 * num_hidden_layers, num_attention_heads, image_size, patch_size,
 * num_channels, hidden_act, layer_norm_eps) with tensors under ld->prefix
 * ("vision_model." for a CLIPVisionModel file of transformers 4's naming
 * inside a safety checker: "vision_model.vision_model."). */
typedef struct _DiffuseClipVision DiffuseClipVision;

DiffuseClipVision *_diffuse_clip_vision_new (DiffuseConfig *vision_config, DiffuseClipLoader *ld, GError **error);
void _diffuse_clip_vision_free (DiffuseClipVision *m);
int _diffuse_clip_vision_hidden_size (DiffuseClipVision *m);
int _diffuse_clip_vision_image_size (DiffuseClipVision *m);
/* pixel_values [B, num_channels, image_size, image_size] (any dtype/device):
 * the pooled output [B, D] in the model's dtype on its device. */
DiffuseTensor *_diffuse_clip_vision_pooled (DiffuseClipVision *m, DiffuseTensor *pixel_values, GError **error);

G_END_DECLS

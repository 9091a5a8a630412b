/* gst-diffuse — UNetMotionModel (diffusers models/unets/unet_motion_model.py:
 * UNetMotionModel.from_unet2d + forward, CrossAttnDownBlockMotion,
 * DownBlockMotion, UNetMidBlockCrossAttnMotion, CrossAttnUpBlockMotion,
 * UpBlockMotion).
 *
 * The 2-D blocks are those of the DiffuseUNet itself (its resnets,
 * transformers, samplers, conv_in/out and time embedding: the same
 * tensors); only the motion modules come from the adapter.  Block order, as
 * diffusers runs it:
 *   down (cross-attn):  resnet -> attention -> motion module   (per layer)
 *   down (plain):       resnet -> motion module
 *   mid (motion):       resnet0, then attention -> motion module -> resnet1
 *   mid (no motion):    resnet0 -> attention -> resnet1
 *   up:                 cat(skip) -> resnet [-> attention] -> motion module */
#include "models/motion_private.h"
#include "models/unet2d_condition_private.h"

#include <diffuse/error.h>
#include <string.h>

struct _DiffuseUNetMotion {
  gint ref_count;
  DiffuseUNet *unet;
  DiffuseMotionAdapter *adapter;
  char *label;
  int groups;                     /* the UNet's norm_num_groups (used by the motion modules too) */
  int in_channels;
  DiffuseBlkConv2d conv_in;       /* PIA: UNet conv_in weight + adapter conv_in weight[:, 4:] */
  gboolean own_conv_in;
  guint64 n_params;
};

static inline DiffuseTensor *
swap (DiffuseTensor *old, DiffuseTensor *result)
{
  diffuse_tensor_unref (old);
  return result;
}

static gboolean
fail (GError **error, DiffuseErrorCode code, const char *fmt, ...) G_GNUC_PRINTF (3, 4);

static gboolean
fail (GError **error, DiffuseErrorCode code, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  g_set_error_literal (error, DIFFUSE_ERROR, code, msg);
  g_free (msg);
  return FALSE;
}

static void
motion_free (DiffuseUNetMotion *m)
{
  if (m->own_conv_in)
    diffuse_blk_conv2d_clear (&m->conv_in);
  if (m->unet)
    diffuse_unet_unref (m->unet);
  if (m->adapter)
    diffuse_motion_adapter_unref (m->adapter);
  g_free (m->label);
  g_free (m);
}

/* UNet options UNetMotionModel.from_unet2d does not carry over (the model it
 * builds would not be the UNet's): refuse them rather than run something else. */
static gboolean
check_unet_config (DiffuseUNet *u, GError **error)
{
  DiffuseConfig *c = u->config;
  if (strcmp (diffuse_config_get_string (c, "resnet_time_scale_shift", "default"), "default") != 0)
    return fail (error, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: resnet_time_scale_shift \"%s\" cannot be used by UNetMotionModel", u->label,
                 diffuse_config_get_string (c, "resnet_time_scale_shift", ""));
  if (u->add_text_time)
    return fail (error, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: an SDXL UNet (addition_embed_type \"text_time\") with a motion adapter (AnimateDiff SDXL) is "
                 "not supported yet", u->label);
  if (u->has_time_embed_act || u->time_embedding.post_act != DIFFUSE_ACT_NONE)
    return fail (error, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: time_embedding_act_fn / timestep_post_act cannot be used by UNetMotionModel", u->label);
  if (u->time_embed_dim != 4 * u->block_out[0])
    return fail (error, DIFFUSE_ERROR_UNSUPPORTED, "%s: time_embedding_dim %d cannot be used by UNetMotionModel",
                 u->label, u->time_embed_dim);
  if (diffuse_config_get_int (c, "conv_in_kernel", 3) != 3 || diffuse_config_get_int (c, "conv_out_kernel", 3) != 3)
    return fail (error, DIFFUSE_ERROR_UNSUPPORTED, "%s: UNetMotionModel has 3x3 conv_in/conv_out kernels", u->label);
  JsonNode *oc = diffuse_config_get_node (c, "only_cross_attention");
  gboolean any_oc = FALSE;
  if (oc && JSON_NODE_HOLDS_VALUE (oc) && json_node_get_value_type (oc) == G_TYPE_BOOLEAN)
    any_oc = json_node_get_boolean (oc);
  else if (oc && JSON_NODE_HOLDS_ARRAY (oc))
    for (guint i = 0; i < json_array_get_length (json_node_get_array (oc)); i++)
      any_oc |= json_array_get_boolean_element (json_node_get_array (oc), i);
  if (any_oc)
    return fail (error, DIFFUSE_ERROR_UNSUPPORTED, "%s: only_cross_attention cannot be used by UNetMotionModel",
                 u->label);
  if (!u->mid.present || !u->mid.has_attn)
    return fail (error, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: UNetMotionModel needs a UNetMidBlock2DCrossAttn mid block", u->label);
  /* UNetMotionModel's mid transformer depth: transformer_layers_per_block[-1]
   * when an int, else 1 */
  int mid_depth = 1;
  JsonNode *tn = diffuse_config_get_node (c, "transformer_layers_per_block");
  if (tn && JSON_NODE_HOLDS_VALUE (tn))
    mid_depth = (int) json_node_get_int (tn);
  else if (tn && JSON_NODE_HOLDS_ARRAY (tn)) {
    JsonArray *a = json_node_get_array (tn);
    JsonNode *last = json_array_get_length (a) ? json_array_get_element (a, json_array_get_length (a) - 1) : NULL;
    if (last && JSON_NODE_HOLDS_VALUE (last))
      mid_depth = (int) json_node_get_int (last);
  }
  if (u->mid.attn.n_blocks != mid_depth)
    return fail (error, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: the mid block has %d transformer layers, UNetMotionModel would build %d", u->label,
                 u->mid.attn.n_blocks, mid_depth);
  return TRUE;
}

DiffuseUNetMotion *
diffuse_unet_motion_new (DiffuseUNet *unet, DiffuseMotionAdapter *adapter, GError **error)
{
  g_return_val_if_fail (unet != NULL && adapter != NULL, NULL);
  DiffuseUNet *u = unet;
  DiffuseMotionAdapter *a = adapter;
  /* the layout of DiffuseUNet is shared with unet2d_condition.c through a
   * private header: make sure it still is */
  if (u->config != diffuse_unet_config (unet) || u->in_channels != diffuse_unet_in_channels (unet) ||
      u->out_channels != diffuse_unet_out_channels (unet) || u->n_params != diffuse_unet_n_params (unet) ||
      u->time_cond_proj_dim != diffuse_unet_time_cond_proj_dim (unet) || u->dev != diffuse_unet_device (unet) ||
      (1 << u->num_upsamplers) != diffuse_unet_size_multiple (unet)) {
    g_critical ("models/unet2d_condition_private.h no longer matches unet2d_condition.c");
    fail (error, DIFFUSE_ERROR_FAILED, "internal error: the UNet layout does not match (see the log)");
    return NULL;
  }
  if (!check_unet_config (u, error))
    return NULL;
  const int n = u->n_blocks;
  if (a->n_blocks != n)
    return fail (error, DIFFUSE_ERROR_CONFIG, "Incompatible Motion Adapter %s: %d blocks, the UNet %s has %d",
                 a->label, a->n_blocks, u->label, n), NULL;
  for (int i = 0; i < n; i++) {
    if (a->block_out[i] != u->block_out[i])
      return fail (error, DIFFUSE_ERROR_CONFIG,
                   "Incompatible Motion Adapter %s: block_out_channels[%d] is %d, the UNet %s has %d", a->label, i,
                   a->block_out[i], u->label, u->block_out[i]), NULL;
    if (a->down[i].n_modules != u->down[i].n_layers)
      return fail (error, DIFFUSE_ERROR_CONFIG,
                   "Incompatible Motion Adapter %s: %d motion layers in down block %d, the UNet %s has %d layers",
                   a->label, a->down[i].n_modules, i, u->label, u->down[i].n_layers), NULL;
    if (a->up[i].n_modules != u->up[i].n_layers)
      return fail (error, DIFFUSE_ERROR_CONFIG,
                   "Incompatible Motion Adapter %s: %d motion layers in up block %d, the UNet %s has %d layers",
                   a->label, a->up[i].n_modules, i, u->label, u->up[i].n_layers), NULL;
  }
  if (a->has_mid && a->mid.n_modules != 1)
    return fail (error, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: motion_mid_block_layers_per_block is %d; diffusers' UNetMotionModel.from_unet2d builds one "
                 "mid-block motion layer", a->label, a->mid.n_modules), NULL;
  if (a->dtype != u->dtype || a->dev != u->dev)
    return fail (error, DIFFUSE_ERROR_CONFIG, "%s is %s on %s, the UNet %s is %s on %s", a->label,
                 diffuse_dtype_name (a->dtype), diffuse_device_name (a->dev), u->label,
                 diffuse_dtype_name (u->dtype), diffuse_device_name (u->dev)), NULL;
  gint64 groups = diffuse_config_get_int (u->config, "norm_num_groups", 32);
  for (int i = 0; i < n; i++)
    if (groups < 1 || u->block_out[i] % groups != 0)
      return fail (error, DIFFUSE_ERROR_CONFIG, "%s: norm_num_groups %" G_GINT64_FORMAT " does not divide %d",
                   u->label, groups, u->block_out[i]), NULL;

  DiffuseUNetMotion *m = g_new0 (DiffuseUNetMotion, 1);
  m->ref_count = 1;
  m->unet = diffuse_unet_ref (u);
  m->adapter = diffuse_motion_adapter_ref (a);
  m->label = g_strdup_printf ("UNetMotionModel (%s + %s)", u->label, a->label);
  m->groups = (int) groups;
  m->in_channels = u->in_channels;
  m->conv_in = u->conv_in;
  m->n_params = u->n_params + a->n_params;
  if (a->conv_in_channels > 0) {
    /* PIA: the UNet's conv_in weight for the first 4 input channels, the
     * adapter's for the others, the UNet's bias */
    if (u->in_channels != 4 || a->conv_in_channels <= 4) {
      fail (error, DIFFUSE_ERROR_CONFIG, "%s: conv_in_channels %d needs a UNet with 4 input channels (%s has %d)",
            a->label, a->conv_in_channels, u->label, u->in_channels);
      motion_free (m);
      return NULL;
    }
    DiffuseTensor *extra = diffuse_narrow (a->conv_in.weight, 1, 4, a->conv_in_channels - 4);
    DiffuseTensor *parts[2] = { u->conv_in.weight, extra };
    DiffuseTensor *w = extra ? diffuse_concat (parts, 2, 1) : NULL;
    diffuse_tensor_unref (extra);
    if (!w) {
      if (!diffuse_tensor_take_error (error))
        fail (error, DIFFUSE_ERROR_FAILED, "%s: conv_in", m->label);
      motion_free (m);
      return NULL;
    }
    m->conv_in.weight = w;
    m->conv_in.bias = u->conv_in.bias ? diffuse_tensor_ref (u->conv_in.bias) : NULL;
    m->own_conv_in = TRUE;
    m->in_channels = a->conv_in_channels;
    /* the model's conv_in replaces the UNet's; the adapter's conv_in is not a
     * parameter of UNetMotionModel */
    m->n_params = m->n_params - (guint64) diffuse_tensor_numel (u->conv_in.weight) -
                  (guint64) diffuse_tensor_numel (a->conv_in.weight) -
                  (a->conv_in.bias ? (guint64) diffuse_tensor_numel (a->conv_in.bias) : 0) +
                  (guint64) diffuse_tensor_numel (w);
  }
  return m;
}

DiffuseUNetMotion *
diffuse_unet_motion_ref (DiffuseUNetMotion *m)
{
  g_return_val_if_fail (m != NULL, NULL);
  g_atomic_int_inc (&m->ref_count);
  return m;
}

void
diffuse_unet_motion_unref (DiffuseUNetMotion *m)
{
  if (m && g_atomic_int_dec_and_test (&m->ref_count))
    motion_free (m);
}

DiffuseUNet *diffuse_unet_motion_get_unet (DiffuseUNetMotion *m) { return m->unet; }
DiffuseMotionAdapter *diffuse_unet_motion_get_adapter (DiffuseUNetMotion *m) { return m->adapter; }
int diffuse_unet_motion_in_channels (DiffuseUNetMotion *m) { return m->in_channels; }
int diffuse_unet_motion_out_channels (DiffuseUNetMotion *m) { return m->unet->out_channels; }
int diffuse_unet_motion_max_frames (DiffuseUNetMotion *m) { return m->adapter->max_seq_length; }
guint64 diffuse_unet_motion_n_params (DiffuseUNetMotion *m) { return m->n_params; }

/* ---- forward ------------------------------------------------------------------- */

static gboolean
arg_error (GError **error, const char *fmt, ...) G_GNUC_PRINTF (2, 3);

static gboolean
arg_error (GError **error, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  g_set_error_literal (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, msg);
  g_free (msg);
  return FALSE;
}

static DiffuseTensor *
to_model (DiffuseUNet *u, DiffuseTensor *x)
{
  DiffuseTensor *d = diffuse_to_device (x, u->dev);
  return swap (d, diffuse_cast (d, u->dtype));
}

static gboolean
check_inputs (DiffuseUNetMotion *m, DiffuseTensor *sample, int n_timesteps, DiffuseTensor *ehs,
              const DiffuseUNetForwardArgs *args, GError **error)
{
  DiffuseUNet *u = m->unet;
  if (sample->ndim != 5 || sample->shape[1] != m->in_channels || sample->shape[0] < 1 || sample->shape[2] < 1 ||
      sample->shape[3] < 1 || sample->shape[4] < 1) {
    char *d = diffuse_tensor_describe (sample);
    arg_error (error, "%s: sample %s should be [B, %d, F, H, W]", m->label, d, m->in_channels);
    g_free (d);
    return FALSE;
  }
  const int64_t B = sample->shape[0], F = sample->shape[2];
  if (F > m->adapter->max_seq_length)
    return arg_error (error, "%s: %" G_GINT64_FORMAT " frames, the motion adapter takes at most %d "
                      "(motion_max_seq_length)", m->label, F, m->adapter->max_seq_length);
  if (n_timesteps != 1 && n_timesteps != B)
    return arg_error (error, "%s: %d timesteps for a batch of %" G_GINT64_FORMAT " (1 or B expected)", m->label,
                      n_timesteps, B);
  if (!ehs || ehs->ndim != 3 || (ehs->shape[0] != B * F && ehs->shape[0] != B)) {
    char *d = ehs ? diffuse_tensor_describe (ehs) : g_strdup ("NULL");
    arg_error (error, "%s: encoder_hidden_states %s should be [%" G_GINT64_FORMAT " (B * F) or %" G_GINT64_FORMAT
               " (B), L, D]", m->label, d, B * F, B);
    g_free (d);
    return FALSE;
  }
  const int64_t D = ehs->shape[2];
  const int want = diffuse_unet_cross_attention_dim (u);
  if (want > 0 && D != want)
    return arg_error (error, "%s: encoder_hidden_states have %" G_GINT64_FORMAT " features, the model expects %d",
                      m->label, D, want);
  if (args && (args->down_block_additional_residuals || args->mid_block_additional_residual))
    return arg_error (error, "%s: ControlNet residuals are not supported by the motion UNet", m->label);
  if (args && args->mid_self_attn_probs)
    return arg_error (error, "%s: self-attention guidance is not supported by the motion UNet", m->label);
  if (args && args->ip_tokens) {
    DiffuseTensor *it = args->ip_tokens;
    if (it->ndim != 3 || (it->shape[0] != B && it->shape[0] != B * F) || it->shape[2] != D) {
      char *d = diffuse_tensor_describe (it);
      arg_error (error, "%s: IP-Adapter tokens %s should be [%" G_GINT64_FORMAT " (B) or %" G_GINT64_FORMAT
                 " (B * F), T, %" G_GINT64_FORMAT "]", m->label, d, B, B * F, D);
      g_free (d);
      return FALSE;
    }
  }
  if (args && args->timestep_cond) {
    DiffuseTensor *tc = args->timestep_cond;
    if (u->time_cond_proj_dim <= 0)
      return arg_error (error, "%s: timestep_cond given but the model has no time_cond_proj_dim", m->label);
    if (tc->ndim != 2 || tc->shape[0] != B || tc->shape[1] != u->time_cond_proj_dim)
      return arg_error (error, "%s: timestep_cond should be [%" G_GINT64_FORMAT ", %d]", m->label, B,
                        u->time_cond_proj_dim);
  }
  return TRUE;
}

/* rows of x [B, ...] each repeated n times in place (repeat_interleave on dim 0) */
static DiffuseTensor *
repeat_interleave (DiffuseTensor *x, int64_t n)
{
  if (!x || n == 1)
    return x ? diffuse_tensor_ref (x) : NULL;
  const int64_t B = x->shape[0];
  DiffuseTensor **v = g_new0 (DiffuseTensor *, B * n);
  for (int64_t b = 0; b < B; b++) {
    DiffuseTensor *row = diffuse_narrow (x, 0, b, 1);
    for (int64_t k = 0; k < n; k++)
      v[b * n + k] = row;
  }
  DiffuseTensor *out = diffuse_concat (v, (int) (B * n), 0);
  for (int64_t b = 0; b < B; b++)
    diffuse_tensor_unref (v[b * n]);
  g_free (v);
  return out;
}

static DiffuseTensor *
motion (DiffuseUNetMotion *m, const MotionModules *mm, int j, DiffuseTensor *x, int F)
{
  return diffuse_motion_module_forward (&mm->modules[j], x, F, m->groups);
}

DiffuseTensor *
diffuse_unet_motion_forward (DiffuseUNetMotion *m, DiffuseTensor *sample, const float *timesteps, int n_timesteps,
                             DiffuseTensor *encoder_hidden_states, const DiffuseUNetForwardArgs *args,
                             GError **error)
{
  g_return_val_if_fail (m != NULL && sample != NULL && timesteps != NULL && n_timesteps > 0, NULL);
  if (!check_inputs (m, sample, n_timesteps, encoder_hidden_states, args, error))
    return NULL;
  DiffuseUNet *u = m->unet;
  const DiffuseMotionAdapter *a = m->adapter;
  const int64_t B = sample->shape[0], Cin = sample->shape[1], F = sample->shape[2];
  const int64_t H = sample->shape[3], W = sample->shape[4];
  const int n = u->n_blocks;
  const int nf = (int) F;
  DiffuseTensor *x = NULL, *emb = NULL, *ctx = NULL, *out = NULL, *ip_tok = NULL;
  DiffuseTensor **res = NULL;
  DiffuseBlkIp *ip_all = NULL;
  int n_res = 0;

  int factor = 1 << u->num_upsamplers;
  gboolean forward_upsample_size = H % factor != 0 || W % factor != 0;

  /* 1. time: Timesteps (flip_sin_to_cos, shift 0) in f32, TimestepEmbedding,
   * then repeat_interleave over the frames */
  float *tv = g_new (float, B);
  for (int64_t b = 0; b < B; b++)
    tv[b] = timesteps[n_timesteps == 1 ? 0 : b];
  DiffuseTensor *th = diffuse_tensor_from_f32 (tv, 1, (int64_t[]) { B });
  g_free (tv);
  DiffuseTensor *t = th ? diffuse_to_device (th, u->dev) : NULL;
  diffuse_tensor_unref (th);
  DiffuseTensor *t_emb = diffuse_timestep_embedding (t, u->block_out[0], TRUE, 0.0f, 1.0f, 10000.0f);
  diffuse_tensor_unref (t);
  t_emb = swap (t_emb, diffuse_cast (t_emb, u->dtype));
  DiffuseTensor *cond = args && args->timestep_cond ? to_model (u, args->timestep_cond) : NULL;
  emb = diffuse_blk_timestep_embedding_forward (&u->time_embedding, t_emb, cond);
  diffuse_tensor_unref (t_emb);
  diffuse_tensor_unref (cond);
  emb = swap (emb, repeat_interleave (emb, F));
  if (!emb)
    goto fail;

  /* encoder_hidden_states: [B * F, L, D] as given, or [B, L, D] repeated */
  ctx = to_model (u, encoder_hidden_states);
  if (ctx && ctx->shape[0] == B && F > 1)
    ctx = swap (ctx, repeat_interleave (ctx, F));

  /* IP-Adapter image tokens, repeated over the frames as the text (diffusers'
   * UNetMotionModel: image_embed.repeat_interleave (num_frames, dim=0)) */
  if (args && args->ip_tokens) {
    ip_tok = to_model (u, args->ip_tokens);
    if (ip_tok && ip_tok->shape[0] == B && F > 1)
      ip_tok = swap (ip_tok, repeat_interleave (ip_tok, F));
    if (!ip_tok)
      goto fail;
    GError *ip_err = NULL;
    ip_all = _diffuse_unet_ip_layers (u, args, ip_tok, &ip_err);
    if (ip_err) {
      g_propagate_error (error, ip_err);
      goto fail_set;
    }
  }
  int ip_down = 0, ip_up = ip_all ? _diffuse_unet_part_cross_layers (u, 0) : 0;
  int ip_mid = ip_all ? ip_up + _diffuse_unet_part_cross_layers (u, 1) : 0;

  /* 2. [B, C, F, H, W] -> [B * F, C, H, W], conv_in */
  {
    DiffuseTensor *s = to_model (u, sample);
    DiffuseTensor *sp = s ? diffuse_permute (s, (int[]) { 0, 2, 1, 3, 4 }) : NULL;
    diffuse_tensor_unref (s);
    DiffuseTensor *sc = diffuse_contiguous (sp);
    diffuse_tensor_unref (sp);
    x = sc ? diffuse_reshape_4d (sc, B * F, Cin, H, W) : NULL;
    diffuse_tensor_unref (sc);
  }
  x = swap (x, diffuse_blk_conv2d (&m->conv_in, x));
  if (!x || !ctx)
    goto fail;

  /* 3. down */
  int max_res = 1;
  for (int i = 0; i < n; i++)
    max_res += u->down[i].n_layers + 1;
  res = g_new0 (DiffuseTensor *, max_res);
  res[n_res++] = diffuse_tensor_ref (x);
  for (int i = 0; i < n; i++) {
    const UNetBlock *b = &u->down[i];
    for (int j = 0; j < b->n_layers; j++) {
      x = swap (x, diffuse_blk_resnet_forward (&b->resnets[j], x, emb));
      if (b->has_attn)
        x = swap (x, diffuse_blk_transformer2d_forward_ip (&b->attns[j], x, ctx,
                                                           _diffuse_unet_ip_take (ip_all, &ip_down, &b->attns[j])));
      x = swap (x, motion (m, &a->down[i], j, x, nf));
      if (!x)
        goto fail;
      res[n_res++] = diffuse_tensor_ref (x);
    }
    if (b->has_sampler) {
      x = swap (x, diffuse_blk_downsample_forward (&b->down, x));
      if (!x)
        goto fail;
      res[n_res++] = diffuse_tensor_ref (x);
    }
  }

  /* 4. mid */
  x = swap (x, diffuse_blk_resnet_forward (&u->mid.resnets[0], x, emb));
  x = swap (x, diffuse_blk_transformer2d_forward_ip (&u->mid.attn, x, ctx,
                                                     _diffuse_unet_ip_take (ip_all, &ip_mid, &u->mid.attn)));
  if (a->has_mid)
    x = swap (x, motion (m, &a->mid, 0, x, nf));
  x = swap (x, diffuse_blk_resnet_forward (&u->mid.resnets[1], x, emb));
  if (!x)
    goto fail;

  /* 5. up */
  for (int i = 0; i < n; i++) {
    const UNetBlock *b = &u->up[i];
    int out_h = 0, out_w = 0;
    if (b->has_sampler && forward_upsample_size) {
      DiffuseTensor *next = res[n_res - b->n_layers - 1];
      out_h = (int) next->shape[2];
      out_w = (int) next->shape[3];
    }
    for (int j = 0; j < b->n_layers; j++) {
      DiffuseTensor *r = res[--n_res];
      res[n_res] = NULL;
      if (r->shape[2] != x->shape[2] || r->shape[3] != x->shape[3]) {
        arg_error (error, "%s: a %" G_GINT64_FORMAT "x%" G_GINT64_FORMAT " latent does not fit this UNet's "
                   "down/up sampling", m->label, H, W);
        diffuse_tensor_unref (r);
        goto fail_set;
      }
      DiffuseTensor *pair[2] = { x, r };
      DiffuseTensor *cat = diffuse_concat (pair, 2, 1);
      diffuse_tensor_unref (r);
      x = swap (x, cat);
      x = swap (x, diffuse_blk_resnet_forward (&b->resnets[j], x, emb));
      if (b->has_attn)
        x = swap (x, diffuse_blk_transformer2d_forward_ip (&b->attns[j], x, ctx,
                                                           _diffuse_unet_ip_take (ip_all, &ip_up, &b->attns[j])));
      x = swap (x, motion (m, &a->up[i], j, x, nf));
      if (!x)
        goto fail;
    }
    if (b->has_sampler) {
      x = swap (x, diffuse_blk_upsample_forward (&b->up, x, out_h, out_w));
      if (!x)
        goto fail;
    }
  }

  /* 6. out: conv_norm_out, SiLU (UNetMotionModel's conv_act), conv_out,
   * then [B * F, C, H, W] -> [B, C, F, H, W] */
  x = swap (x, diffuse_blk_group_norm (&u->conv_norm_out, x, DIFFUSE_ACT_SILU));
  x = swap (x, diffuse_blk_conv2d (&u->conv_out, x));
  if (!x)
    goto fail;
  {
    const int64_t Co = x->shape[1];
    DiffuseTensor *x5 = diffuse_reshape (x, 5, (int64_t[]) { B, F, Co, H, W });
    DiffuseTensor *xp = x5 ? diffuse_permute (x5, (int[]) { 0, 2, 1, 3, 4 }) : NULL;
    diffuse_tensor_unref (x5);
    out = diffuse_contiguous (xp);
    diffuse_tensor_unref (xp);
  }
  if (!out)
    goto fail;
  goto done;

fail:
  if (!diffuse_tensor_take_error (error))
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s: forward failed", m->label);
fail_set:
  diffuse_tensor_clear (&out);
done:
  for (int k = 0; res && k < n_res; k++)
    diffuse_tensor_unref (res[k]);
  g_free (res);
  g_free (ip_all);
  diffuse_tensor_unref (x);
  diffuse_tensor_unref (emb);
  diffuse_tensor_unref (ctx);
  diffuse_tensor_unref (ip_tok);
  return out;
}

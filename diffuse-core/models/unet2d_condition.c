/* gst-diffuse — UNet2DConditionModel (diffusers models/unets/unet_2d_condition.py).
 *
 * The structure follows diffusers' __init__ option by option, so the dotted
 * prefixes below are exactly the state-dict keys:
 *   conv_in, time_embedding.{linear_1,linear_2,cond_proj},
 *   down_blocks.i.{resnets.j, attentions.j, downsamplers.0.conv},
 *   mid_block.{resnets.j, attentions.0}, up_blocks.i.{resnets.j, attentions.j,
 *   upsamplers.0.conv}, conv_norm_out, conv_out. */
#include <diffuse/unet.h>
#include <diffuse/error.h>

#include <string.h>

#include "models/blocks.h"
#include "models/unet2d_condition_private.h"   /* the layout of DiffuseUNet, shared with motion_unet.c */


/* ---- config helpers ---------------------------------------------------- */

static gboolean
config_error (GError **error, DiffuseErrorCode code, const char *label, const char *fmt, ...) G_GNUC_PRINTF (4, 5);

static gboolean
config_error (GError **error, DiffuseErrorCode code, const char *label, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  g_set_error (error, DIFFUSE_ERROR, code, "%s: %s", label, msg);
  g_free (msg);
  return FALSE;
}

/* An int or a list of n ints ("attention_head_dim": 8 vs [5, 10, 20, 20]);
 * absent/null gives def.  out has n entries. */
static gboolean
get_int_list (DiffuseConfig *c, const char *key, int n, gint64 def, int *out, GError **error)
{
  if (!diffuse_config_has (c, key)) {
    for (int i = 0; i < n; i++)
      out[i] = (int) def;
    return TRUE;
  }
  gint64 *v = NULL;
  GError *err = NULL;
  guint len = diffuse_config_get_int_array_checked (c, key, (guint) n, &v, &err);
  if (err) {
    g_propagate_error (error, err);
    return FALSE;
  }
  if ((int) len != n) {
    g_free (v);
    return config_error (error, DIFFUSE_ERROR_CONFIG, diffuse_config_label (c),
                         "\"%s\" has %u entries, the model has %d blocks", key, len, n);
  }
  for (int i = 0; i < n; i++)
    out[i] = (int) v[i];
  g_free (v);
  return TRUE;
}

/* A bool or a list of n bools. */
static gboolean
get_bool_list (DiffuseConfig *c, const char *key, int n, gboolean def, gboolean *out, gboolean *was_scalar,
               GError **error)
{
  JsonNode *node = diffuse_config_get_node (c, key);
  *was_scalar = TRUE;
  if (!node || JSON_NODE_HOLDS_NULL (node)) {
    for (int i = 0; i < n; i++)
      out[i] = def;
    return TRUE;
  }
  if (JSON_NODE_HOLDS_VALUE (node) && json_node_get_value_type (node) == G_TYPE_BOOLEAN) {
    for (int i = 0; i < n; i++)
      out[i] = json_node_get_boolean (node);
    return TRUE;
  }
  *was_scalar = FALSE;
  if (JSON_NODE_HOLDS_ARRAY (node)) {
    JsonArray *a = json_node_get_array (node);
    if ((int) json_array_get_length (a) == n) {
      gboolean ok = TRUE;
      for (int i = 0; ok && i < n; i++) {
        JsonNode *e = json_array_get_element (a, i);
        ok = JSON_NODE_HOLDS_VALUE (e) && json_node_get_value_type (e) == G_TYPE_BOOLEAN;
        if (ok)
          out[i] = json_node_get_boolean (e);
      }
      if (ok)
        return TRUE;
    }
  }
  return config_error (error, DIFFUSE_ERROR_CONFIG, diffuse_config_label (c),
                       "\"%s\" should be a boolean or a list of %d booleans", key, n);
}

/* transformer_layers_per_block entry: an int (repeated for every layer) or a
 * list of per-layer ints.  Fills out[0..n_layers). */
static gboolean
layers_from_node (JsonNode *e, int n_layers, int *out)
{
  gint64 v;
  if (JSON_NODE_HOLDS_VALUE (e) && json_node_get_value_type (e) == G_TYPE_INT64) {
    v = json_node_get_int (e);
    for (int j = 0; j < n_layers; j++)
      out[j] = (int) v;
    return v >= 0;
  }
  if (JSON_NODE_HOLDS_ARRAY (e)) {
    JsonArray *a = json_node_get_array (e);
    if ((int) json_array_get_length (a) < n_layers)
      return FALSE;
    for (int j = 0; j < n_layers; j++) {
      JsonNode *x = json_array_get_element (a, j);
      if (!JSON_NODE_HOLDS_VALUE (x) || json_node_get_value_type (x) != G_TYPE_INT64)
        return FALSE;
      out[j] = (int) json_node_get_int (x);
    }
    return TRUE;
  }
  return FALSE;
}

static gboolean
check_unsupported_null (DiffuseConfig *c, const char *key, GError **error)
{
  if (diffuse_config_has (c, key))
    return config_error (error, DIFFUSE_ERROR_UNSUPPORTED, diffuse_config_label (c),
                         "\"%s\" is set: this UNet2DConditionModel option is not supported", key);
  return TRUE;
}

/* ---- construction ------------------------------------------------------------ */

static void
block_clear (UNetBlock *b, gboolean down)
{
  for (int j = 0; b->resnets && j < b->n_layers; j++)
    diffuse_blk_resnet_clear (&b->resnets[j]);
  for (int j = 0; b->attns && j < b->n_layers; j++)
    diffuse_blk_transformer2d_clear (&b->attns[j]);
  g_free (b->resnets);
  g_free (b->attns);
  if (down)
    diffuse_blk_downsample_clear (&b->down);
  else
    diffuse_blk_upsample_clear (&b->up);
}

static void
unet_free (DiffuseUNet *u)
{
  diffuse_blk_conv2d_clear (&u->conv_in);
  diffuse_blk_conv2d_clear (&u->conv_out);
  diffuse_blk_group_norm_clear (&u->conv_norm_out);
  diffuse_blk_timestep_embedding_clear (&u->time_embedding);
  diffuse_blk_timestep_embedding_clear (&u->add_embedding);
  for (int i = 0; u->down && i < u->n_blocks; i++)
    block_clear (&u->down[i], TRUE);
  for (int i = 0; u->up && i < u->n_blocks; i++)
    block_clear (&u->up[i], FALSE);
  g_free (u->down);
  g_free (u->up);
  for (int j = 0; j < 2; j++)
    diffuse_blk_resnet_clear (&u->mid.resnets[j]);
  diffuse_blk_transformer2d_clear (&u->mid.attn);
  g_free (u->block_out);
  g_strfreev (u->unused_keys);
  g_free (u->label);
  if (u->config)
    diffuse_config_unref (u->config);
  g_free (u);
}

void
diffuse_unet_default_params (DiffuseUNetParams *p)
{
  memset (p, 0, sizeof *p);
  p->dtype = DIFFUSE_DTYPE_F32;
  p->device = NULL;
  p->component = "unet";
}

/* All options of the config, parsed and checked before any weight is read. */
typedef struct {
  int n;
  char **down_types, **up_types;
  const char *mid_type;
  int *layers, *heads, *cross, *tlpb_flat;   /* tlpb: per block, per layer (see tlpb_at) */
  int max_layers;
  int *rev_tlpb_flat;                        /* up blocks: per block, per layer */
  gboolean *only_cross;
  int groups;
  float eps;
  gboolean linear_proj, upcast, scale_shift;
  int downsample_padding;
  float mid_scale;
  int mid_tlayers;
} Opts;

static void
opts_clear (Opts *o)
{
  g_strfreev (o->down_types);
  g_strfreev (o->up_types);
  g_free (o->layers);
  g_free (o->heads);
  g_free (o->cross);
  g_free (o->tlpb_flat);
  g_free (o->rev_tlpb_flat);
  g_free (o->only_cross);
}

static const char *
strip_unetres (const char *t)
{
  return g_str_has_prefix (t, "UNetRes") ? t + 7 : t;
}

static gboolean
parse_options (DiffuseUNet *u, DiffuseConfig *c, Opts *o, GError **error)
{
  const char *label = u->label;
  GError *err = NULL;
  gint64 iv;
  double dv;
  const char *sv;
  gboolean bv;

  /* options this implementation does not handle */
  if (!check_unsupported_null (c, "class_embed_type", error) ||
      !check_unsupported_null (c, "num_class_embeds", error) ||
      !check_unsupported_null (c, "encoder_hid_dim", error) ||
      !check_unsupported_null (c, "encoder_hid_dim_type", error))
    return FALSE;
  if (diffuse_config_has (c, "num_attention_heads"))
    /* diffusers' UNet2DConditionModel raises on it too (naming issue #2011) */
    return config_error (error, DIFFUSE_ERROR_CONFIG, label,
                         "\"num_attention_heads\" cannot be set for UNet2DConditionModel "
                         "(the head count is read from \"attention_head_dim\")");
  if (!diffuse_config_get_string_checked (c, "addition_embed_type", NULL, &sv, error))
    return FALSE;
  if (sv && strcmp (sv, "text_time") != 0)
    return config_error (error, DIFFUSE_ERROR_UNSUPPORTED, label,
                         "addition_embed_type \"%s\" is not supported (only SDXL's \"text_time\")", sv);
  if (sv) {
    u->add_text_time = TRUE;
    if (!diffuse_config_get_int_checked (c, "addition_time_embed_dim", 0, &iv, error))
      return FALSE;
    u->add_time_dim = (int) iv;
    if (!diffuse_config_get_int_checked (c, "projection_class_embeddings_input_dim", 0, &iv, error))
      return FALSE;
    u->add_in_dim = (int) iv;
    if (u->add_time_dim <= 0 || u->add_time_dim % 2 || u->add_in_dim <= u->add_time_dim)
      return config_error (error, DIFFUSE_ERROR_CONFIG, label,
                           "addition_embed_type \"text_time\" needs an even addition_time_embed_dim and a larger "
                           "projection_class_embeddings_input_dim (got %d, %d)", u->add_time_dim, u->add_in_dim);
  }
  if (!diffuse_config_get_string_checked (c, "time_embedding_type", "positional", &sv, error))
    return FALSE;
  if (strcmp (sv, "positional") != 0)
    return config_error (error, DIFFUSE_ERROR_UNSUPPORTED, label, "time_embedding_type \"%s\" is not supported", sv);
  if (!diffuse_config_get_string_checked (c, "attention_type", "default", &sv, error))
    return FALSE;
  if (strcmp (sv, "default") != 0)
    return config_error (error, DIFFUSE_ERROR_UNSUPPORTED, label, "attention_type \"%s\" is not supported", sv);
  if (!diffuse_config_get_bool_checked (c, "dual_cross_attention", FALSE, &bv, error))
    return FALSE;
  if (bv)
    return config_error (error, DIFFUSE_ERROR_UNSUPPORTED, label, "dual_cross_attention is not supported");
  if (!diffuse_config_get_bool_checked (c, "class_embeddings_concat", FALSE, &bv, error))
    return FALSE;
  if (bv)
    return config_error (error, DIFFUSE_ERROR_UNSUPPORTED, label, "class_embeddings_concat is not supported");

  /* sizes */
  if (!diffuse_config_get_int_checked (c, "in_channels", 4, &iv, error))
    return FALSE;
  u->in_channels = (int) iv;
  if (!diffuse_config_get_int_checked (c, "out_channels", 4, &iv, error))
    return FALSE;
  u->out_channels = (int) iv;
  if (!diffuse_config_get_int_checked (c, "sample_size", 0, &iv, &err)) {
    /* sample_size may be a [h, w] pair: informative only */
    g_clear_error (&err);
    iv = 0;
  }
  u->sample_size = (int) iv;
  if (u->in_channels <= 0 || u->out_channels <= 0)
    return config_error (error, DIFFUSE_ERROR_CONFIG, label, "in_channels/out_channels must be positive");

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
  o->n = (int) nb;
  u->n_blocks = o->n;
  u->block_out = g_new (int, nb);
  for (guint i = 0; i < nb; i++) {
    u->block_out[i] = (int) bo[i];
    if (bo[i] <= 0) {
      g_free (bo);
      return config_error (error, DIFFUSE_ERROR_CONFIG, label, "block_out_channels must be positive");
    }
  }
  g_free (bo);
  int n = o->n;

  /* block types */
  static const char *def_down[] = { "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D", NULL };
  static const char *def_up[] = { "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                  NULL };
  o->down_types = diffuse_config_has (c, "down_block_types") ? diffuse_config_get_string_array (c, "down_block_types")
                                                             : g_strdupv ((char **) def_down);
  o->up_types = diffuse_config_has (c, "up_block_types") ? diffuse_config_get_string_array (c, "up_block_types")
                                                         : g_strdupv ((char **) def_up);
  if (!o->down_types || !o->up_types)
    return config_error (error, DIFFUSE_ERROR_CONFIG, label,
                         "\"down_block_types\" and \"up_block_types\" must be lists of strings");
  if ((int) g_strv_length (o->down_types) != n || (int) g_strv_length (o->up_types) != n)
    return config_error (error, DIFFUSE_ERROR_CONFIG, label,
                         "down_block_types (%u), up_block_types (%u) and block_out_channels (%d) differ in length",
                         g_strv_length (o->down_types), g_strv_length (o->up_types), n);
  for (int i = 0; i < n; i++) {
    const char *d = strip_unetres (o->down_types[i]), *up = strip_unetres (o->up_types[i]);
    if (strcmp (d, "CrossAttnDownBlock2D") != 0 && strcmp (d, "DownBlock2D") != 0)
      return config_error (error, DIFFUSE_ERROR_UNSUPPORTED, label, "down block type \"%s\" is not supported",
                           o->down_types[i]);
    if (strcmp (up, "CrossAttnUpBlock2D") != 0 && strcmp (up, "UpBlock2D") != 0)
      return config_error (error, DIFFUSE_ERROR_UNSUPPORTED, label, "up block type \"%s\" is not supported",
                           o->up_types[i]);
  }
  JsonNode *mnode = diffuse_config_get_node (c, "mid_block_type");
  if (!mnode)
    o->mid_type = "UNetMidBlock2DCrossAttn";
  else if (JSON_NODE_HOLDS_NULL (mnode))
    o->mid_type = NULL;
  else if (JSON_NODE_HOLDS_VALUE (mnode) && json_node_get_value_type (mnode) == G_TYPE_STRING)
    o->mid_type = json_node_get_string (mnode);
  else
    return config_error (error, DIFFUSE_ERROR_CONFIG, label, "\"mid_block_type\" should be a string or null");
  if (o->mid_type && strcmp (o->mid_type, "UNetMidBlock2DCrossAttn") != 0 &&
      strcmp (o->mid_type, "UNetMidBlock2D") != 0)
    return config_error (error, DIFFUSE_ERROR_UNSUPPORTED, label, "mid_block_type \"%s\" is not supported",
                         o->mid_type);

  /* per-block lists */
  o->layers = g_new (int, n);
  o->heads = g_new (int, n);
  o->cross = g_new (int, n);
  o->only_cross = g_new (gboolean, n);
  if (!get_int_list (c, "layers_per_block", n, 2, o->layers, error) ||
      !get_int_list (c, "attention_head_dim", n, 8, o->heads, error) ||
      !get_int_list (c, "cross_attention_dim", n, 1280, o->cross, error))
    return FALSE;
  gboolean oc_scalar;
  if (!get_bool_list (c, "only_cross_attention", n, FALSE, o->only_cross, &oc_scalar, error))
    return FALSE;
  for (int i = 0; i < n; i++) {
    if (o->layers[i] < 1)
      return config_error (error, DIFFUSE_ERROR_CONFIG, label, "layers_per_block must be >= 1");
    if (o->heads[i] < 1 || u->block_out[i] / o->heads[i] < 1)
      return config_error (error, DIFFUSE_ERROR_CONFIG, label,
                           "attention_head_dim (the head count) %d does not fit %d channels", o->heads[i],
                           u->block_out[i]);
    if (o->cross[i] < 1)
      return config_error (error, DIFFUSE_ERROR_CONFIG, label, "cross_attention_dim must be positive");
  }
  /* mid_block_only_cross_attention and resnet_skip_time_act /
   * resnet_out_scale_factor only reach UNetMidBlock2DSimpleCrossAttn and the
   * Simple/ResnetDownsample block families in diffusers: read for their
   * type, no effect on the blocks supported here. */
  if (!diffuse_config_get_bool_checked (c, "mid_block_only_cross_attention", FALSE, &bv, error) ||
      !diffuse_config_get_bool_checked (c, "resnet_skip_time_act", FALSE, &bv, error) ||
      !diffuse_config_get_double_checked (c, "resnet_out_scale_factor", 1.0, &dv, error))
    return FALSE;

  /* transformer_layers_per_block: int, [int] or [[int]] (+ reverse_...) */
  o->max_layers = 1;
  for (int i = 0; i < n; i++)
    o->max_layers = MAX (o->max_layers, o->layers[i] + 1);
  o->tlpb_flat = g_new0 (int, n * o->max_layers);
  o->rev_tlpb_flat = g_new0 (int, n * o->max_layers);
  JsonNode *tn = diffuse_config_get_node (c, "transformer_layers_per_block");
  JsonNode *rn = diffuse_config_get_node (c, "reverse_transformer_layers_per_block");
  gboolean has_rev = rn && !JSON_NODE_HOLDS_NULL (rn);
  JsonArray *ta = NULL;
  if (!tn || JSON_NODE_HOLDS_NULL (tn)) {
    for (int i = 0; i < n * o->max_layers; i++)
      o->tlpb_flat[i] = 1;
  } else if (JSON_NODE_HOLDS_ARRAY (tn) && (int) json_array_get_length (json_node_get_array (tn)) == n) {
    ta = json_node_get_array (tn);
    for (int i = 0; i < n; i++) {
      JsonNode *e = json_array_get_element (ta, i);
      if (JSON_NODE_HOLDS_ARRAY (e) && !has_rev)
        return config_error (error, DIFFUSE_ERROR_CONFIG, label,
                             "\"transformer_layers_per_block\" with per-layer lists needs "
                             "\"reverse_transformer_layers_per_block\"");
      if (!layers_from_node (e, o->layers[i], o->tlpb_flat + i * o->max_layers))
        return config_error (error, DIFFUSE_ERROR_CONFIG, label, "\"transformer_layers_per_block\"[%d] is invalid",
                             i);
    }
  } else if (JSON_NODE_HOLDS_VALUE (tn) && json_node_get_value_type (tn) == G_TYPE_INT64 &&
             json_node_get_int (tn) >= 0) {
    for (int i = 0; i < n * o->max_layers; i++)
      o->tlpb_flat[i] = (int) json_node_get_int (tn);
  } else {
    return config_error (error, DIFFUSE_ERROR_CONFIG, label,
                         "\"transformer_layers_per_block\" should be an integer or a list of %d entries", n);
  }
  /* up blocks, in up order: reverse_transformer_layers_per_block[i], or the
   * down entries reversed (an int entry repeated over num_layers + 1) */
  for (int i = 0; i < n; i++) {
    int nl = o->layers[n - 1 - i] + 1;
    int *dst = o->rev_tlpb_flat + i * o->max_layers;
    if (has_rev) {
      JsonArray *ra = JSON_NODE_HOLDS_ARRAY (rn) ? json_node_get_array (rn) : NULL;
      if (!ra || (int) json_array_get_length (ra) != n ||
          !layers_from_node (json_array_get_element (ra, i), nl, dst))
        return config_error (error, DIFFUSE_ERROR_CONFIG, label,
                             "\"reverse_transformer_layers_per_block\"[%d] is invalid", i);
    } else if (ta) {
      if (!layers_from_node (json_array_get_element (ta, n - 1 - i), nl, dst))
        return config_error (error, DIFFUSE_ERROR_CONFIG, label, "\"transformer_layers_per_block\" is invalid");
    } else {
      for (int j = 0; j < nl; j++)
        dst[j] = o->tlpb_flat[0];
    }
  }
  /* the mid block gets transformer_layers_per_block[-1] (its first entry when a list) */
  o->mid_tlayers = o->tlpb_flat[(n - 1) * o->max_layers];

  /* norms, activations, resnets */
  JsonNode *gn = diffuse_config_get_node (c, "norm_num_groups");
  if (gn && JSON_NODE_HOLDS_NULL (gn))
    return config_error (error, DIFFUSE_ERROR_UNSUPPORTED, label, "norm_num_groups null is not supported");
  if (!diffuse_config_get_int_checked (c, "norm_num_groups", 32, &iv, error))
    return FALSE;
  o->groups = (int) iv;
  if (!diffuse_config_get_double_checked (c, "norm_eps", 1e-5, &dv, error))
    return FALSE;
  o->eps = (float) dv;
  if (!diffuse_config_get_string_checked (c, "act_fn", "silu", &sv, error) ||
      !diffuse_blk_parse_activation (sv, "act_fn", label, &u->act, error))
    return FALSE;
  if (!diffuse_config_get_string_checked (c, "resnet_time_scale_shift", "default", &sv, error))
    return FALSE;
  if (strcmp (sv, "default") == 0)
    o->scale_shift = FALSE;
  else if (strcmp (sv, "scale_shift") == 0)
    o->scale_shift = TRUE;
  else
    return config_error (error, DIFFUSE_ERROR_UNSUPPORTED, label, "resnet_time_scale_shift \"%s\" is not supported",
                         sv);
  if (!diffuse_config_get_bool_checked (c, "use_linear_projection", FALSE, &o->linear_proj, error) ||
      !diffuse_config_get_bool_checked (c, "upcast_attention", FALSE, &o->upcast, error) ||
      !diffuse_config_get_int_checked (c, "downsample_padding", 1, &iv, error))
    return FALSE;
  o->downsample_padding = (int) iv;
  if (o->downsample_padding < 0)
    return config_error (error, DIFFUSE_ERROR_CONFIG, label, "downsample_padding must be >= 0");
  if (!diffuse_config_get_double_checked (c, "mid_block_scale_factor", 1.0, &dv, error))
    return FALSE;
  o->mid_scale = (float) dv;
  if (o->mid_scale == 0.0f)
    return config_error (error, DIFFUSE_ERROR_CONFIG, label, "mid_block_scale_factor must not be 0");

  /* time embedding */
  if (!diffuse_config_get_bool_checked (c, "center_input_sample", FALSE, &u->center_input_sample, error) ||
      !diffuse_config_get_bool_checked (c, "flip_sin_to_cos", TRUE, &u->flip_sin_to_cos, error) ||
      !diffuse_config_get_double_checked (c, "freq_shift", 0.0, &dv, error))
    return FALSE;
  u->freq_shift = (float) dv;
  if (!diffuse_config_get_int_checked (c, "time_embedding_dim", 0, &iv, error))
    return FALSE;
  u->time_embed_dim = iv > 0 ? (int) iv : u->block_out[0] * 4;
  if (!diffuse_config_get_int_checked (c, "time_cond_proj_dim", 0, &iv, error))
    return FALSE;
  u->time_cond_proj_dim = (int) MAX (iv, 0);
  if (!diffuse_config_get_string_checked (c, "time_embedding_act_fn", NULL, &sv, error))
    return FALSE;
  if (sv) {
    u->has_time_embed_act = TRUE;
    if (!diffuse_blk_parse_activation (sv, "time_embedding_act_fn", label, &u->time_embed_act, error))
      return FALSE;
  }
  return TRUE;
}

static void
resnet_config (DiffuseBlkResnetConfig *rc, const DiffuseUNet *u, const Opts *o, int in, int out)
{
  diffuse_blk_resnet_config_init (rc, in, out, u->time_embed_dim);
  rc->groups = o->groups;
  rc->eps = o->eps;
  rc->act = u->act;
  rc->scale_shift = o->scale_shift;
}

static void
transformer_config (DiffuseBlkTransformer2DConfig *tc, const Opts *o, int channels, int heads, int layers,
                    int cross, gboolean only_cross)
{
  memset (tc, 0, sizeof *tc);
  tc->in_channels = channels;
  tc->heads = heads;
  tc->dim_head = channels / heads;
  tc->num_layers = layers;
  tc->cross_attention_dim = cross;
  tc->norm_num_groups = o->groups;
  tc->use_linear_projection = o->linear_proj;
  tc->only_cross_attention = only_cross;
  tc->upcast_attention = o->upcast;
}

static void
build (DiffuseUNet *u, const Opts *o, DiffuseBlkLoader *l)
{
  int n = o->n;
  DiffuseActivation post_act = DIFFUSE_ACT_NONE;
  char *p;

  int kin = (int) diffuse_config_get_int (u->config, "conv_in_kernel", 3);
  int kout = (int) diffuse_config_get_int (u->config, "conv_out_kernel", 3);
  diffuse_blk_conv2d_load (&u->conv_in, l, "conv_in", u->in_channels, u->block_out[0], kin, 1, (kin - 1) / 2, TRUE);

  const char *pa = NULL;
  GError *err = NULL;
  if (!diffuse_config_get_string_checked (u->config, "timestep_post_act", NULL, &pa, &err) ||
      (pa && !diffuse_blk_parse_activation (pa, "timestep_post_act", u->label, &post_act, &err))) {
    diffuse_blk_loader_fail (l, err);
    return;
  }
  diffuse_blk_timestep_embedding_load (&u->time_embedding, l, "time_embedding", u->block_out[0], u->time_embed_dim,
                                       u->act, post_act, u->time_cond_proj_dim);
  /* add_embedding = TimestepEmbedding (projection_class_embeddings_input_dim,
   * time_embed_dim): its own default act_fn "silu", whatever the UNet's */
  if (u->add_text_time)
    diffuse_blk_timestep_embedding_load (&u->add_embedding, l, "add_embedding", u->add_in_dim, u->time_embed_dim,
                                         DIFFUSE_ACT_SILU, DIFFUSE_ACT_NONE, 0);

  /* down */
  u->down = g_new0 (UNetBlock, n);
  int out_ch = u->block_out[0];
  for (int i = 0; i < n; i++) {
    UNetBlock *b = &u->down[i];
    int in_ch = out_ch;
    out_ch = u->block_out[i];
    b->n_layers = o->layers[i];
    b->has_attn = strcmp (strip_unetres (o->down_types[i]), "CrossAttnDownBlock2D") == 0;
    b->cross_attention_dim = o->cross[i];
    b->resnets = g_new0 (DiffuseBlkResnet, b->n_layers);
    if (b->has_attn)
      b->attns = g_new0 (DiffuseBlkTransformer2D, b->n_layers);
    for (int j = 0; j < b->n_layers; j++) {
      DiffuseBlkResnetConfig rc;
      resnet_config (&rc, u, o, j == 0 ? in_ch : out_ch, out_ch);
      p = g_strdup_printf ("down_blocks.%d.resnets.%d", i, j);
      diffuse_blk_resnet_load (&b->resnets[j], l, p, &rc);
      g_free (p);
      if (b->has_attn) {
        DiffuseBlkTransformer2DConfig tc;
        transformer_config (&tc, o, out_ch, o->heads[i], o->tlpb_flat[i * o->max_layers + j], o->cross[i],
                            o->only_cross[i]);
        p = g_strdup_printf ("down_blocks.%d.attentions.%d", i, j);
        diffuse_blk_transformer2d_load (&b->attns[j], l, p, &tc);
        g_free (p);
      }
    }
    if (i < n - 1) {
      b->has_sampler = TRUE;
      p = g_strdup_printf ("down_blocks.%d.downsamplers.0", i);
      diffuse_blk_downsample_load (&b->down, l, p, out_ch, out_ch, o->downsample_padding);
      g_free (p);
    }
  }

  /* mid */
  int top = u->block_out[n - 1];
  if (o->mid_type) {
    UNetMid *m = &u->mid;
    m->present = TRUE;
    m->has_attn = strcmp (o->mid_type, "UNetMidBlock2DCrossAttn") == 0;
    m->cross_attention_dim = o->cross[n - 1];
    for (int j = 0; j < (m->has_attn ? 2 : 1); j++) {
      DiffuseBlkResnetConfig rc;
      resnet_config (&rc, u, o, top, top);
      rc.output_scale_factor = o->mid_scale;
      p = g_strdup_printf ("mid_block.resnets.%d", j);
      diffuse_blk_resnet_load (&m->resnets[j], l, p, &rc);
      g_free (p);
    }
    if (m->has_attn) {
      DiffuseBlkTransformer2DConfig tc;
      /* diffusers passes no only_cross_attention to the mid block */
      transformer_config (&tc, o, top, o->heads[n - 1], o->mid_tlayers, o->cross[n - 1], FALSE);
      diffuse_blk_transformer2d_load (&m->attn, l, "mid_block.attentions.0", &tc);
    }
  }

  /* up */
  u->up = g_new0 (UNetBlock, n);
  out_ch = u->block_out[n - 1];
  for (int i = 0; i < n; i++) {
    UNetBlock *b = &u->up[i];
    int rev = n - 1 - i;
    int prev_out = out_ch;
    out_ch = u->block_out[rev];
    int in_ch = u->block_out[MAX (rev - 1, 0)];
    b->n_layers = o->layers[rev] + 1;
    b->has_attn = strcmp (strip_unetres (o->up_types[i]), "CrossAttnUpBlock2D") == 0;
    b->cross_attention_dim = o->cross[rev];
    b->resnets = g_new0 (DiffuseBlkResnet, b->n_layers);
    if (b->has_attn)
      b->attns = g_new0 (DiffuseBlkTransformer2D, b->n_layers);
    for (int j = 0; j < b->n_layers; j++) {
      int skip = j == b->n_layers - 1 ? in_ch : out_ch;
      int rin = j == 0 ? prev_out : out_ch;
      DiffuseBlkResnetConfig rc;
      resnet_config (&rc, u, o, rin + skip, out_ch);
      p = g_strdup_printf ("up_blocks.%d.resnets.%d", i, j);
      diffuse_blk_resnet_load (&b->resnets[j], l, p, &rc);
      g_free (p);
      if (b->has_attn) {
        DiffuseBlkTransformer2DConfig tc;
        transformer_config (&tc, o, out_ch, o->heads[rev], o->rev_tlpb_flat[i * o->max_layers + j], o->cross[rev],
                            o->only_cross[rev]);
        p = g_strdup_printf ("up_blocks.%d.attentions.%d", i, j);
        diffuse_blk_transformer2d_load (&b->attns[j], l, p, &tc);
        g_free (p);
      }
    }
    if (i < n - 1) {
      b->has_sampler = TRUE;
      u->num_upsamplers++;
      p = g_strdup_printf ("up_blocks.%d.upsamplers.0", i);
      diffuse_blk_upsample_load (&b->up, l, p, out_ch, out_ch);
      g_free (p);
    }
  }

  diffuse_blk_group_norm_load (&u->conv_norm_out, l, "conv_norm_out", u->block_out[0], o->groups, o->eps);
  diffuse_blk_conv2d_load (&u->conv_out, l, "conv_out", u->block_out[0], u->out_channels, kout, 1, (kout - 1) / 2,
                           TRUE);
}

DiffuseUNet *
diffuse_unet_new (DiffuseConfig *config, DiffuseWeights *weights, const DiffuseUNetParams *params, GError **error)
{
  return _diffuse_unet_new_owned (config, weights, params, NULL, error);
}

DiffuseUNet *
_diffuse_unet_new_owned (DiffuseConfig *config, DiffuseWeights *weights, const DiffuseUNetParams *params,
                         DiffuseBlkKeyFilter owns, GError **error)
{
  g_return_val_if_fail (config != NULL && weights != NULL, NULL);
  DiffuseUNetParams defaults;
  if (!params) {
    diffuse_unet_default_params (&defaults);
    params = &defaults;
  }
  DiffuseUNet *u = g_new0 (DiffuseUNet, 1);
  u->ref_count = 1;
  u->config = diffuse_config_ref (config);
  u->dtype = params->dtype;
  u->dev = params->device ? params->device : diffuse_device_cpu ();
  const char *component = params->component ? params->component : "unet";
  u->label = g_strdup_printf ("%s (%s)", component, diffuse_config_label (config));

  int ks[2] = { (int) diffuse_config_get_int (config, "conv_in_kernel", 3),
                (int) diffuse_config_get_int (config, "conv_out_kernel", 3) };
  if (ks[0] < 1 || ks[0] % 2 == 0 || ks[1] < 1 || ks[1] % 2 == 0) {
    config_error (error, DIFFUSE_ERROR_CONFIG, u->label, "conv_in_kernel/conv_out_kernel must be odd and positive");
    unet_free (u);
    return NULL;
  }

  Opts o = { 0 };
  if (!parse_options (u, config, &o, error)) {
    opts_clear (&o);
    unet_free (u);
    return NULL;
  }
  DiffuseBlkLoader *l = diffuse_blk_loader_new (weights, component, u->dtype, u->dev);
  diffuse_blk_loader_set_owner (l, owns);
  build (u, &o, l);
  opts_clear (&o);
  gboolean ok = diffuse_blk_loader_finish (l, &u->unused_keys, error);
  u->n_params = diffuse_blk_loader_n_params (l);
  diffuse_blk_loader_free (l);
  if (!ok) {
    unet_free (u);
    return NULL;
  }
  return u;
}

DiffuseUNet *
diffuse_unet_new_from_dir (const char *dir, const DiffuseUNetParams *params, GError **error)
{
  g_return_val_if_fail (dir != NULL, NULL);
  DiffuseConfig *config;
  DiffuseWeights *w;
  if (!diffuse_blk_open_model_dir (dir, &config, &w, error))
    return NULL;
  DiffuseUNet *u = diffuse_unet_new (config, w, params, error);
  diffuse_weights_unref (w);
  diffuse_config_unref (config);
  return u;
}

DiffuseUNet *
diffuse_unet_ref (DiffuseUNet *u)
{
  g_return_val_if_fail (u != NULL, NULL);
  g_atomic_int_inc (&u->ref_count);
  return u;
}

void
diffuse_unet_unref (DiffuseUNet *u)
{
  if (u && g_atomic_int_dec_and_test (&u->ref_count))
    unet_free (u);
}

DiffuseConfig *diffuse_unet_config (DiffuseUNet *u) { return u->config; }
DiffuseDType diffuse_unet_dtype (DiffuseUNet *u) { return u->dtype; }
DiffuseDevice *diffuse_unet_device (DiffuseUNet *u) { return u->dev; }
int diffuse_unet_in_channels (DiffuseUNet *u) { return u->in_channels; }
int diffuse_unet_out_channels (DiffuseUNet *u) { return u->out_channels; }
int diffuse_unet_time_cond_proj_dim (DiffuseUNet *u) { return u->time_cond_proj_dim; }
int diffuse_unet_sample_size (DiffuseUNet *u) { return u->sample_size; }
int diffuse_unet_size_multiple (DiffuseUNet *u) { return 1 << u->num_upsamplers; }
guint64 diffuse_unet_n_params (DiffuseUNet *u) { return u->n_params; }

const char *const *
diffuse_unet_unused_keys (DiffuseUNet *u)
{
  static const char *const none[] = { NULL };
  return u->unused_keys ? (const char *const *) u->unused_keys : none;
}

int
diffuse_unet_cross_attention_dim (DiffuseUNet *u)
{
  for (int i = 0; i < u->n_blocks; i++)
    if (u->down[i].has_attn)
      return u->down[i].cross_attention_dim;
  if (u->mid.present && u->mid.has_attn)
    return u->mid.cross_attention_dim;
  for (int i = 0; i < u->n_blocks; i++)
    if (u->up[i].has_attn)
      return u->up[i].cross_attention_dim;
  return 0;
}

/* ---- forward ------------------------------------------------------------------- */

static inline DiffuseTensor *
swap (DiffuseTensor *old, DiffuseTensor *result)
{
  diffuse_tensor_unref (old);
  return result;
}

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

static gboolean
check_inputs (DiffuseUNet *u, DiffuseTensor *sample, int n_timesteps, DiffuseTensor *ehs,
              const DiffuseUNetForwardArgs *args, GError **error)
{
  if (sample->ndim != 4 || sample->shape[1] != u->in_channels || sample->shape[0] < 1 || sample->shape[2] < 1 ||
      sample->shape[3] < 1) {
    char *d = diffuse_tensor_describe (sample);
    arg_error (error, "%s: sample %s should be [B, %d, H, W]", u->label, d, u->in_channels);
    g_free (d);
    return FALSE;
  }
  int64_t B = sample->shape[0];
  if (n_timesteps != 1 && n_timesteps != B)
    return arg_error (error, "%s: %d timesteps for a batch of %" G_GINT64_FORMAT " (1 or B expected)", u->label,
                      n_timesteps, B);
  if (!ehs || ehs->ndim != 3 || ehs->shape[0] != B) {
    char *d = ehs ? diffuse_tensor_describe (ehs) : g_strdup ("NULL");
    arg_error (error, "%s: encoder_hidden_states %s should be [%" G_GINT64_FORMAT ", L, D]", u->label, d, B);
    g_free (d);
    return FALSE;
  }
  int64_t D = ehs->shape[2];
  for (int i = 0; i < u->n_blocks; i++)
    if ((u->down[i].has_attn && u->down[i].cross_attention_dim != D) ||
        (u->up[i].has_attn && u->up[i].cross_attention_dim != D))
      return arg_error (error, "%s: encoder_hidden_states have %" G_GINT64_FORMAT " features, the model expects %d",
                        u->label, D, u->down[i].has_attn ? u->down[i].cross_attention_dim
                                                         : u->up[i].cross_attention_dim);
  if (u->mid.present && u->mid.has_attn && u->mid.cross_attention_dim != D)
    return arg_error (error, "%s: encoder_hidden_states have %" G_GINT64_FORMAT " features, the model expects %d",
                      u->label, D, u->mid.cross_attention_dim);
  const gboolean have_add = args && (args->text_embeds || args->time_ids);
  if (u->add_text_time) {
    if (!args || !args->text_embeds || !args->time_ids)
      return arg_error (error, "%s: this UNet (addition_embed_type \"text_time\", SDXL) needs text_embeds and "
                        "time_ids", u->label);
    const DiffuseTensor *te = args->text_embeds, *ti = args->time_ids;
    if (te->ndim != 2 || te->shape[0] != B || ti->ndim != 2 || ti->shape[0] != B ||
        te->shape[1] + ti->shape[1] * u->add_time_dim != u->add_in_dim)
      return arg_error (error, "%s: text_embeds [B, P] and time_ids [B, n] with P + n * %d = %d expected (B = %"
                        G_GINT64_FORMAT ")", u->label, u->add_time_dim, u->add_in_dim, B);
  } else if (have_add) {
    return arg_error (error, "%s: text_embeds / time_ids given but the model has no addition_embed_type", u->label);
  }
  if (args && args->timestep_cond) {
    DiffuseTensor *tc = args->timestep_cond;
    if (u->time_cond_proj_dim <= 0)
      return arg_error (error, "%s: timestep_cond given but the model has no time_cond_proj_dim", u->label);
    if (tc->ndim != 2 || tc->shape[0] != B || tc->shape[1] != u->time_cond_proj_dim)
      return arg_error (error, "%s: timestep_cond should be [%" G_GINT64_FORMAT ", %d]", u->label, B,
                        u->time_cond_proj_dim);
  }
  if (args && (args->down_block_additional_residuals || args->mid_block_additional_residual)) {
    if (!args->down_block_additional_residuals || !args->mid_block_additional_residual)
      return arg_error (error, "%s: ControlNet residuals need both the down-block and the mid-block residuals",
                        u->label);
    if (!u->mid.present)
      return arg_error (error, "%s: mid_block_additional_residual given but the model has no mid block", u->label);
    int want = 1;
    for (int i = 0; i < u->n_blocks; i++)
      want += u->down[i].n_layers + (u->down[i].has_sampler ? 1 : 0);
    if (args->n_down_block_additional_residuals != want)
      return arg_error (error, "%s: %d down-block residuals given, the model has %d", u->label,
                        args->n_down_block_additional_residuals, want);
  }
  return TRUE;
}

static DiffuseTensor *
to_model (DiffuseUNet *u, DiffuseTensor *x)
{
  DiffuseTensor *d = diffuse_to_device (x, u->dev);
  return swap (d, diffuse_cast (d, u->dtype));
}

/* a += r, checking the shape (ControlNet residuals) */
static DiffuseTensor *
add_residual (DiffuseUNet *u, DiffuseTensor *a, DiffuseTensor *r, const char *what, int index, GError **error)
{
  if (!r || !diffuse_tensor_same_shape (a, r)) {
    char *da = diffuse_tensor_describe (a), *dr = r ? diffuse_tensor_describe (r) : g_strdup ("NULL");
    arg_error (error, "%s: %s residual %d is %s, the model's is %s", u->label, what, index, dr, da);
    g_free (da);
    g_free (dr);
    return NULL;
  }
  DiffuseTensor *rm = to_model (u, r);
  DiffuseTensor *out = diffuse_add (a, rm);
  diffuse_tensor_unref (rm);
  return out;
}

static int
cross_layers (const DiffuseBlkTransformer2D *t)
{
  return t->cfg.cross_attention_dim > 0 ? t->n_blocks : 0;
}

/* cross-attention layers of the down (part 0) or up (part 1) blocks */
int
_diffuse_unet_part_cross_layers (DiffuseUNet *u, int part)
{
  int n = 0;
  for (int i = 0; i < u->n_blocks; i++) {
    const UNetBlock *b = part ? &u->up[i] : &u->down[i];
    for (int j = 0; b->has_attn && j < b->n_layers; j++)
      n += cross_layers (&b->attns[j]);
  }
  return n;
}

int
diffuse_unet_n_cross_attention_layers (DiffuseUNet *u)
{
  return _diffuse_unet_part_cross_layers (u, 0) + _diffuse_unet_part_cross_layers (u, 1) +
         (u->mid.present && u->mid.has_attn ? cross_layers (&u->mid.attn) : 0);
}

/* IP-Adapter: one DiffuseBlkIp per cross-attention layer, in diffusers'
 * attn_processors order (down blocks, up blocks, mid block); NULL without
 * one, or with *error set.  The tokens are args->ip_tokens unless `tokens`
 * is given (the motion UNet's, repeated over the frames). */
DiffuseBlkIp *
_diffuse_unet_ip_layers (DiffuseUNet *u, const DiffuseUNetForwardArgs *args, DiffuseTensor *tokens, GError **error)
{
  if (!args || !args->ip_tokens)
    return NULL;
  const int n = diffuse_unet_n_cross_attention_layers (u);
  if (args->n_ip_layers != n || !args->ip_k || !args->ip_v) {
    arg_error (error, "%s: the IP-Adapter has %d cross-attention layers, the model %d", u->label, args->n_ip_layers,
               n);
    return NULL;
  }
  DiffuseBlkIp *all = g_new0 (DiffuseBlkIp, MAX (n, 1));
  for (int k = 0; k < n; k++) {
    all[k].tokens = tokens ? tokens : args->ip_tokens;
    all[k].k_w = args->ip_k[k];
    all[k].v_w = args->ip_v[k];
    all[k].scale = args->ip_scale;
  }
  return all;
}

/* the layers of transformer t, *next moved past them (NULL without IP-Adapter) */
const DiffuseBlkIp *
_diffuse_unet_ip_take (DiffuseBlkIp *all, int *next, const DiffuseBlkTransformer2D *t)
{
  if (!all)
    return NULL;
  const DiffuseBlkIp *r = all + *next;
  *next += cross_layers (t);
  return r;
}

static DiffuseTensor *forward_impl (DiffuseUNet *u, DiffuseTensor *sample, DiffuseTensor *t,
                                     DiffuseTensor *encoder_hidden_states, const DiffuseUNetForwardArgs *args,
                                     GError **error);

DiffuseTensor *
diffuse_unet_forward (DiffuseUNet *u, DiffuseTensor *sample, const float *timesteps, int n_timesteps,
                      DiffuseTensor *encoder_hidden_states, const DiffuseUNetForwardArgs *args, GError **error)
{
  g_return_val_if_fail (u != NULL && sample != NULL && timesteps != NULL && n_timesteps > 0, NULL);
  if (!check_inputs (u, sample, n_timesteps, encoder_hidden_states, args, error))
    return NULL;
  /* the timesteps as an f32 [B] tensor (one per sample) */
  const int64_t B = sample->shape[0];
  float *tv = g_new (float, B);
  for (int64_t b = 0; b < B; b++)
    tv[b] = timesteps[n_timesteps == 1 ? 0 : b];
  DiffuseTensor *th = diffuse_tensor_from_f32 (tv, 1, (int64_t[]) { B });
  g_free (tv);
  DiffuseTensor *out = diffuse_unet_forward_t (u, sample, th, encoder_hidden_states, args, error);
  diffuse_tensor_unref (th);
  return out;
}

DiffuseTensor *
diffuse_unet_forward_t (DiffuseUNet *u, DiffuseTensor *sample, DiffuseTensor *timesteps,
                        DiffuseTensor *encoder_hidden_states, const DiffuseUNetForwardArgs *args, GError **error)
{
  g_return_val_if_fail (u != NULL && sample != NULL, NULL);
  if (!timesteps) {   /* diffuse_unet_forward's host tensor could not be made */
    if (!diffuse_tensor_take_error (error))
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s: no timesteps", u->label);
    return NULL;
  }
  if (!check_inputs (u, sample, 1, encoder_hidden_states, args, error))
    return NULL;
  if (timesteps->ndim != 1 || timesteps->shape[0] != sample->shape[0]) {
    char *d = diffuse_tensor_describe (timesteps);
    arg_error (error, "%s: timesteps %s should be [%" G_GINT64_FORMAT "] (one per sample)", u->label, d,
               sample->shape[0]);
    g_free (d);
    return NULL;
  }
  /* no copy when they already are f32 on the model's device (a CUDA graph
   * capture refuses host-to-device copies) */
  DiffuseTensor *td = diffuse_to_device (timesteps, u->dev);
  DiffuseTensor *t = diffuse_cast (td, DIFFUSE_DTYPE_F32);
  diffuse_tensor_clear (&td);
  if (!t) {
    if (!diffuse_tensor_take_error (error))
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s: timesteps to %s failed", u->label,
                   diffuse_device_name (u->dev));
    return NULL;
  }
  DiffuseTensor *out = forward_impl (u, sample, t, encoder_hidden_states, args, error);
  diffuse_tensor_unref (t);
  return out;
}

/* t: f32 [B] on the model's device; inputs checked */
static DiffuseTensor *
forward_impl (DiffuseUNet *u, DiffuseTensor *sample, DiffuseTensor *t, DiffuseTensor *encoder_hidden_states,
              const DiffuseUNetForwardArgs *args, GError **error)
{
  const int n = u->n_blocks;
  DiffuseTensor *x = NULL, *emb = NULL, *ctx = NULL;
  DiffuseBlkIp *ip_all = NULL;
  DiffuseTensor **res = NULL;
  int n_res = 0;
  gboolean failed = FALSE;
  DiffuseTensor *out = NULL;

  /* forward_upsample_size: some dim is not a multiple of 2 ** num_upsamplers */
  int factor = 1 << u->num_upsamplers;
  gboolean forward_upsample_size = sample->shape[2] % factor != 0 || sample->shape[3] % factor != 0;

  /* 1. time: sinusoidal embedding in f32, then the model's dtype */
  DiffuseTensor *t_emb = diffuse_timestep_embedding (t, u->block_out[0], u->flip_sin_to_cos, u->freq_shift, 1.0f,
                                                     10000.0f);
  t_emb = swap (t_emb, diffuse_cast (t_emb, u->dtype));
  DiffuseTensor *cond = args && args->timestep_cond ? to_model (u, args->timestep_cond) : NULL;
  emb = diffuse_blk_timestep_embedding_forward (&u->time_embedding, t_emb, cond);
  diffuse_tensor_unref (t_emb);
  diffuse_tensor_unref (cond);
  if (emb && u->add_text_time) {
    /* get_aug_embed: add_time_proj (time_ids.flatten ()) in f32, reshaped
     * [B, n * dim], after text_embeds, in emb's dtype, add_embedding */
    DiffuseTensor *ti = diffuse_to_device (args->time_ids, u->dev);
    ti = swap (ti, diffuse_cast (ti, DIFFUSE_DTYPE_F32));
    DiffuseTensor *tc = diffuse_contiguous (ti);
    diffuse_tensor_unref (ti);
    const int64_t B = args->time_ids->shape[0], nt = args->time_ids->shape[1];
    DiffuseTensor *flat = tc ? diffuse_reshape (tc, 1, (const int64_t[]) { B * nt }) : NULL;
    diffuse_tensor_unref (tc);
    DiffuseTensor *tp = diffuse_timestep_embedding (flat, u->add_time_dim, u->flip_sin_to_cos, u->freq_shift, 1.0f,
                                                    10000.0f);
    diffuse_tensor_unref (flat);
    DiffuseTensor *tr = tp ? diffuse_reshape (tp, 2, (const int64_t[]) { B, nt * u->add_time_dim }) : NULL;
    diffuse_tensor_unref (tp);
    DiffuseTensor *te = diffuse_to_device (args->text_embeds, u->dev);
    te = swap (te, diffuse_cast (te, DIFFUSE_DTYPE_F32));
    DiffuseTensor *pair[2] = { te, tr };
    DiffuseTensor *add = te && tr ? diffuse_concat (pair, 2, 1) : NULL;
    diffuse_tensor_unref (te);
    diffuse_tensor_unref (tr);
    add = swap (add, diffuse_cast (add, u->dtype));
    DiffuseTensor *aug = add ? diffuse_blk_timestep_embedding_forward (&u->add_embedding, add, NULL) : NULL;
    diffuse_tensor_unref (add);
    DiffuseTensor *sum = aug ? diffuse_add (emb, aug) : NULL;
    diffuse_tensor_unref (aug);
    emb = swap (emb, sum);
  }
  if (u->has_time_embed_act)
    emb = swap (emb, diffuse_activation (emb, u->time_embed_act));
  if (!emb)
    goto fail;

  ctx = to_model (u, encoder_hidden_states);
  x = to_model (u, sample);
  if (x && u->center_input_sample)
    x = swap (x, diffuse_scale (x, 2.0f, -1.0f));

  /* 2. conv_in */
  x = swap (x, diffuse_blk_conv2d (&u->conv_in, x));
  if (!x || !ctx)
    goto fail;

  GError *ip_err = NULL;
  ip_all = _diffuse_unet_ip_layers (u, args, NULL, &ip_err);
  if (ip_err) {
    g_propagate_error (error, ip_err);
    goto fail_set;
  }
  /* the forward visits down, mid, up; the layers are numbered down, up, mid */
  int ip_down = 0, ip_up = ip_all ? _diffuse_unet_part_cross_layers (u, 0) : 0;
  int ip_mid = ip_all ? ip_up + _diffuse_unet_part_cross_layers (u, 1) : 0;

  /* 3. down: every resnet/attention output and every downsampler output is kept */
  int max_res = 1;
  for (int i = 0; i < n; i++)
    max_res += u->down[i].n_layers + 1;
  res = g_new0 (DiffuseTensor *, max_res);
  res[n_res++] = diffuse_tensor_ref (x);
  for (int i = 0; i < n && !failed; i++) {
    const UNetBlock *b = &u->down[i];
    for (int j = 0; j < b->n_layers; j++) {
      x = swap (x, diffuse_blk_resnet_forward (&b->resnets[j], x, emb));
      if (b->has_attn)
        x = swap (x, diffuse_blk_transformer2d_forward_ip (&b->attns[j], x, ctx,
                                                           _diffuse_unet_ip_take (ip_all, &ip_down, &b->attns[j])));
      if (!x) {
        failed = TRUE;
        break;
      }
      res[n_res++] = diffuse_tensor_ref (x);
    }
    if (!failed && b->has_sampler) {
      x = swap (x, diffuse_blk_downsample_forward (&b->down, x));
      if (!x)
        failed = TRUE;
      else
        res[n_res++] = diffuse_tensor_ref (x);
    }
  }
  if (failed)
    goto fail;

  gboolean controlnet = args && args->down_block_additional_residuals;
  if (controlnet) {
    for (int k = 0; k < n_res; k++) {
      DiffuseTensor *r = add_residual (u, res[k], args->down_block_additional_residuals[k], "down-block", k, error);
      if (!r) {
        if (error && *error)
          goto fail_set;
        goto fail;
      }
      res[k] = swap (res[k], r);
    }
  }

  /* 4. mid */
  if (args && args->mid_self_attn_probs && !(u->mid.present && u->mid.has_attn)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: self-attention guidance needs a mid block with attention (mid_block_type %s)", u->label,
                 u->mid.present ? "without attention" : "none");
    goto fail_set;
  }
  if (u->mid.present) {
    x = swap (x, diffuse_blk_resnet_forward (&u->mid.resnets[0], x, emb));
    if (u->mid.has_attn && x && args && args->mid_self_attn_probs) {
      diffuse_tensor_clear (args->mid_self_attn_probs);
      *args->mid_self_attn_probs = diffuse_blk_transformer2d_self_attn_probs (&u->mid.attn, x);
      if (!*args->mid_self_attn_probs)
        goto fail;
      if (args->mid_map_hw) {
        args->mid_map_hw[0] = (int) x->shape[2];
        args->mid_map_hw[1] = (int) x->shape[3];
      }
    }
    if (u->mid.has_attn) {
      x = swap (x, diffuse_blk_transformer2d_forward_ip (&u->mid.attn, x, ctx,
                                                         _diffuse_unet_ip_take (ip_all, &ip_mid, &u->mid.attn)));
      x = swap (x, diffuse_blk_resnet_forward (&u->mid.resnets[1], x, emb));
    }
    if (!x)
      goto fail;
    if (controlnet) {
      DiffuseTensor *r = add_residual (u, x, args->mid_block_additional_residual, "mid-block", 0, error);
      if (!r) {
        if (error && *error)
          goto fail_set;
        goto fail;
      }
      x = swap (x, r);
    }
  }

  /* 5. up */
  for (int i = 0; i < n; i++) {
    const UNetBlock *b = &u->up[i];
    int out_h = 0, out_w = 0;
    /* the residual that the next block starts from sets the upsampled size */
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
                   "down/up sampling", u->label, sample->shape[2], sample->shape[3]);
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
      if (!x)
        goto fail;
    }
    if (b->has_sampler) {
      x = swap (x, diffuse_blk_upsample_forward (&b->up, x, out_h, out_w));
      if (!x)
        goto fail;
    }
  }

  /* 6. out */
  x = swap (x, diffuse_blk_group_norm (&u->conv_norm_out, x, u->act));
  out = diffuse_blk_conv2d (&u->conv_out, x);
  if (!out)
    goto fail;
  goto done;

fail:
  if (!diffuse_tensor_take_error (error))
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s: forward failed", u->label);
fail_set:
  diffuse_tensor_clear (&out);
done:
  g_free (ip_all);
  for (int k = 0; res && k < n_res; k++)
    diffuse_tensor_unref (res[k]);
  g_free (res);
  diffuse_tensor_unref (x);
  diffuse_tensor_unref (emb);
  diffuse_tensor_unref (ctx);
  return out;
}

/* gst-diffuse — a UNetMotionModel loaded from its own config and weights
 * (diffusers models/unets/unet_motion_model.py: UNetMotionModel.__init__,
 * what AnimateDiffPipeline.save_pretrained writes as unet/).
 *
 * Such a model is exactly UNetMotionModel.from_unet2d (unet, adapter) for
 * the UNet2DConditionModel and the MotionAdapter its config implies, so it is
 * built from the two existing models over the one weight file:
 *   - the 2-D part: a DiffuseUNet from the config translated to
 *     UNet2DConditionModel terms (the *Motion block types to their 2-D names,
 *     num_attention_heads to attention_head_dim, and the choices
 *     UNetMotionModel makes without a key: flip_sin_to_cos, freq_shift 0,
 *     3x3 conv_in/out, a UNetMidBlock2DCrossAttn mid block, ...), loaded from
 *     every key that is not a motion module's;
 *   - the temporal part: a DiffuseMotionAdapter from the motion keys
 *     (layers_per_block, temporal_transformer_layers_per_block,
 *     temporal_transformer_layers_per_mid_block, mid_block_layers,
 *     motion_num_attention_heads, motion_max_seq_length, use_motion_mid_block;
 *     motion_norm_num_groups = norm_num_groups, as UNetMotionModel's motion
 *     modules use the UNet's group count), loaded from the
 *     "*.motion_modules.*" keys;
 *   - diffuse_unet_motion_new () joins them.
 * diffusers' defaults apply to absent (or null) keys.  A key each loader
 * leaves unused is warned about once, by the loader whose keys it has the
 * form of. */
#include "models/motion_private.h"
#include "models/unet2d_condition_private.h"

#include <diffuse/error.h>
#include <string.h>

void
diffuse_unet_motion_default_params (DiffuseUNetMotionParams *p)
{
  memset (p, 0, sizeof *p);
  p->dtype = DIFFUSE_DTYPE_F32;
  p->component = "unet";
}

static gboolean
bad (GError **error, DiffuseErrorCode code, DiffuseConfig *c, const char *fmt, ...) G_GNUC_PRINTF (4, 5);

static gboolean
bad (GError **error, DiffuseErrorCode code, DiffuseConfig *c, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  g_set_error (error, DIFFUSE_ERROR, code, "%s (UNetMotionModel): %s", diffuse_config_label (c), msg);
  g_free (msg);
  return FALSE;
}

static gboolean
is_int (JsonNode *n)
{
  return n && JSON_NODE_HOLDS_VALUE (n) && json_node_get_value_type (n) == G_TYPE_INT64;
}

static gboolean
is_null (JsonNode *n)
{
  return !n || JSON_NODE_HOLDS_NULL (n);
}

/* key as n ints (an int repeated, or a list of n ints), >= lo.  A list
 * holding lists is DIFFUSE_ERROR_UNSUPPORTED (per-layer values). */
static gboolean
int_list (DiffuseConfig *c, const char *key, int n, int def, int lo, int *out, GError **error)
{
  JsonNode *node = diffuse_config_get_node (c, key);
  if (is_null (node)) {
    for (int i = 0; i < n; i++)
      out[i] = def;
    return TRUE;
  }
  if (is_int (node)) {
    for (int i = 0; i < n; i++)
      out[i] = (int) json_node_get_int (node);
  } else if (JSON_NODE_HOLDS_ARRAY (node)) {
    JsonArray *a = json_node_get_array (node);
    if ((int) json_array_get_length (a) != n)
      return bad (error, DIFFUSE_ERROR_CONFIG, c, "\"%s\" has %u entries; the model has %d blocks", key,
                  json_array_get_length (a), n);
    for (int i = 0; i < n; i++) {
      JsonNode *e = json_array_get_element (a, i);
      if (JSON_NODE_HOLDS_ARRAY (e))
        return bad (error, DIFFUSE_ERROR_UNSUPPORTED, c, "\"%s\" with a list per layer is not supported", key);
      if (!is_int (e))
        return bad (error, DIFFUSE_ERROR_CONFIG, c, "\"%s\" should hold integers", key);
      out[i] = (int) json_node_get_int (e);
    }
  } else {
    return bad (error, DIFFUSE_ERROR_CONFIG, c, "\"%s\" should be an integer or a list of %d integers", key, n);
  }
  for (int i = 0; i < n; i++)
    if (out[i] < lo)
      return bad (error, DIFFUSE_ERROR_CONFIG, c, "\"%s\" must be >= %d (got %d)", key, lo, out[i]);
  return TRUE;
}

static void
copy_member (JsonObject *dst, const char *dst_key, JsonObject *src, const char *src_key)
{
  if (json_object_has_member (src, src_key))
    json_object_set_member (dst, dst_key, json_node_copy (json_object_get_member (src, src_key)));
}

/* The block types, *Motion -> 2-D; absent: UNetMotionModel's defaults. */
static gboolean
block_types (DiffuseConfig *c, const char *key, JsonObject *dst, GError **error)
{
  static const char *const down_def[] = { "CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion",
                                          "CrossAttnDownBlockMotion", "DownBlockMotion", NULL };
  static const char *const up_def[] = { "UpBlockMotion", "CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion",
                                        "CrossAttnUpBlockMotion", NULL };
  const gboolean down = strcmp (key, "down_block_types") == 0;
  char **types = NULL;
  if (!diffuse_config_has (c, key))
    types = g_strdupv ((char **) (down ? down_def : up_def));
  else if (!(types = diffuse_config_get_string_array (c, key)))
    return bad (error, DIFFUSE_ERROR_CONFIG, c, "\"%s\" must be a list of strings", key);
  JsonArray *out = json_array_new ();
  for (int i = 0; types[i]; i++) {
    const char *t = types[i], *mapped = NULL;
    if (down && strcmp (t, "CrossAttnDownBlockMotion") == 0)
      mapped = "CrossAttnDownBlock2D";
    else if (down && strcmp (t, "DownBlockMotion") == 0)
      mapped = "DownBlock2D";
    else if (!down && strcmp (t, "CrossAttnUpBlockMotion") == 0)
      mapped = "CrossAttnUpBlock2D";
    else if (!down && strcmp (t, "UpBlockMotion") == 0)
      mapped = "UpBlock2D";
    if (!mapped) {
      bad (error, DIFFUSE_ERROR_CONFIG, c, "\"%s\"[%d] is \"%s\"; UNetMotionModel takes only %s", key, i, t,
           down ? "CrossAttnDownBlockMotion and DownBlockMotion" : "CrossAttnUpBlockMotion and UpBlockMotion");
      json_array_unref (out);
      g_strfreev (types);
      return FALSE;
    }
    json_array_add_string_element (out, mapped);
  }
  g_strfreev (types);
  json_object_set_array_member (dst, key, out);
  return TRUE;
}

/* The transformer depth of the first mid-block layer: as UNetMotionModel
 * builds it (transformer_layers_per_mid_block, else
 * transformer_layers_per_block[-1] when an int, else 1) and as the 2-D
 * UNet builds it from transformer_layers_per_block (its last entry, the
 * first of that entry when a list). */
static void
mid_depths (DiffuseConfig *c, int *motion, int *unet2d)
{
  JsonNode *tl = diffuse_config_get_node (c, "transformer_layers_per_block");
  JsonNode *last = tl;
  if (tl && JSON_NODE_HOLDS_ARRAY (tl)) {
    JsonArray *a = json_node_get_array (tl);
    last = json_array_get_length (a) ? json_array_get_element (a, json_array_get_length (a) - 1) : NULL;
  }
  int from_last = is_null (tl) ? 1 : is_int (last) ? (int) json_node_get_int (last) : -1;
  *unet2d = from_last;
  if (last && JSON_NODE_HOLDS_ARRAY (last)) {
    JsonArray *a = json_node_get_array (last);
    JsonNode *first = json_array_get_length (a) ? json_array_get_element (a, 0) : NULL;
    *unet2d = is_int (first) ? (int) json_node_get_int (first) : -1;
  }
  JsonNode *mid = diffuse_config_get_node (c, "transformer_layers_per_mid_block");
  if (is_null (mid)) {
    *motion = from_last >= 0 ? from_last : 1;
  } else if (is_int (mid)) {
    *motion = (int) json_node_get_int (mid);
  } else if (JSON_NODE_HOLDS_ARRAY (mid) && json_array_get_length (json_node_get_array (mid)) > 0 &&
             is_int (json_array_get_element (json_node_get_array (mid), 0))) {
    *motion = (int) json_node_get_int (json_array_get_element (json_node_get_array (mid), 0));
  } else {
    *motion = -1;
  }
}

gboolean
diffuse_unet_motion_split_config (DiffuseConfig *config, DiffuseConfig **unet_config,
                                  DiffuseConfig **adapter_config, GError **error)
{
  g_return_val_if_fail (config != NULL && unet_config != NULL && adapter_config != NULL, FALSE);
  *unet_config = *adapter_config = NULL;
  DiffuseConfig *c = config;
  JsonObject *src = diffuse_config_object (c);
  const char *cls = diffuse_config_get_string (c, "_class_name", "UNetMotionModel");
  if (strcmp (cls, "UNetMotionModel") != 0)
    return bad (error, DIFFUSE_ERROR_CONFIG, c, "\"_class_name\" is \"%s\", not UNetMotionModel", cls);

  /* the number of blocks, for the per-block lists */
  int n = 4;
  JsonNode *bo = diffuse_config_get_node (c, "block_out_channels");
  if (!is_null (bo)) {
    if (!JSON_NODE_HOLDS_ARRAY (bo) || json_array_get_length (json_node_get_array (bo)) == 0)
      return bad (error, DIFFUSE_ERROR_CONFIG, c, "\"block_out_channels\" must be a non-empty list");
    n = (int) json_array_get_length (json_node_get_array (bo));
  }

  /* what only UNetMotionModel has and the 2-D UNet here cannot take */
  const char *addition = diffuse_config_get_string (c, "addition_embed_type", NULL);
  if (addition && strcmp (addition, "text_time") == 0)
    return bad (error, DIFFUSE_ERROR_UNSUPPORTED, c, "addition_embed_type \"text_time\" (SDXL) is not supported");
  if (diffuse_config_has (c, "encoder_hid_dim_type"))
    return bad (error, DIFFUSE_ERROR_UNSUPPORTED, c, "encoder_hid_dim_type \"%s\" is not supported",
                diffuse_config_get_string (c, "encoder_hid_dim_type", "?"));
  gint64 mid_layers;
  if (!diffuse_config_get_int_checked (c, "mid_block_layers", 1, &mid_layers, error))
    return FALSE;
  if (mid_layers != 1)
    return bad (error, DIFFUSE_ERROR_UNSUPPORTED, c,
                "mid_block_layers %" G_GINT64_FORMAT " is not supported (the mid block has one layer here)",
                mid_layers);
  int mid_motion, mid_2d;
  mid_depths (c, &mid_motion, &mid_2d);
  if (mid_motion < 0)
    return bad (error, DIFFUSE_ERROR_CONFIG, c, "\"transformer_layers_per_mid_block\" should be an integer");
  if (mid_motion != mid_2d)
    return bad (error, DIFFUSE_ERROR_UNSUPPORTED, c,
                "a mid block of %d transformer layers (transformer_layers_per_mid_block) with "
                "transformer_layers_per_block %s is not supported", mid_motion,
                mid_2d < 0 ? "ending in an invalid entry" : "giving another depth");

  /* per-block motion lists, checked here so that messages name the keys of this file */
  int *heads = g_new (int, n), *depth = g_new (int, n), *rdepth = g_new (int, n), *mheads = g_new (int, n);
  gboolean ok = int_list (c, "num_attention_heads", n, 8, 1, heads, error) &&
                int_list (c, "motion_num_attention_heads", n, 8, 1, mheads, error) &&
                int_list (c, "temporal_transformer_layers_per_block", n, 1, 0, depth, error);
  if (ok && !is_null (diffuse_config_get_node (c, "reverse_temporal_transformer_layers_per_block"))) {
    ok = int_list (c, "reverse_temporal_transformer_layers_per_block", n, 1, 0, rdepth, error);
    for (int i = 0; ok && i < n; i++)
      if (rdepth[i] != depth[n - 1 - i])
        ok = bad (error, DIFFUSE_ERROR_UNSUPPORTED, c,
                  "reverse_temporal_transformer_layers_per_block other than temporal_transformer_layers_per_block "
                  "reversed is not supported");
  }
  JsonNode *tmid = diffuse_config_get_node (c, "temporal_transformer_layers_per_mid_block");
  if (ok && !is_null (tmid)) {
    JsonNode *v = tmid;
    if (JSON_NODE_HOLDS_ARRAY (tmid))
      v = json_array_get_length (json_node_get_array (tmid)) == 1
            ? json_array_get_element (json_node_get_array (tmid), 0) : NULL;
    if (!is_int (v) || json_node_get_int (v) < 0)
      ok = bad (error, DIFFUSE_ERROR_CONFIG, c,
                "\"temporal_transformer_layers_per_mid_block\" should be an integer >= 0 (or a list of one)");
  }
  g_free (heads);
  g_free (depth);
  g_free (rdepth);
  g_free (mheads);
  if (!ok)
    return FALSE;

  /* the 2-D part */
  JsonObject *u = json_object_new ();
  json_object_set_string_member (u, "_class_name", "UNet2DConditionModel");
  static const char *const same[] = {
    "sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "reverse_transformer_layers_per_block", "use_linear_projection",
    "time_cond_proj_dim", NULL,
  };
  for (int i = 0; same[i]; i++)
    copy_member (u, same[i], src, same[i]);
  /* UNetMotionModel's num_attention_heads is UNet2DConditionModel's head
   * count, which that config calls attention_head_dim */
  if (diffuse_config_has (c, "num_attention_heads"))
    copy_member (u, "attention_head_dim", src, "num_attention_heads");
  else
    json_object_set_int_member (u, "attention_head_dim", 8);
  /* what UNetMotionModel builds without a key */
  json_object_set_string_member (u, "mid_block_type", "UNetMidBlock2DCrossAttn");
  json_object_set_boolean_member (u, "flip_sin_to_cos", TRUE);
  json_object_set_int_member (u, "freq_shift", 0);
  json_object_set_boolean_member (u, "center_input_sample", FALSE);
  json_object_set_string_member (u, "time_embedding_type", "positional");
  json_object_set_int_member (u, "conv_in_kernel", 3);
  json_object_set_int_member (u, "conv_out_kernel", 3);
  json_object_set_string_member (u, "resnet_time_scale_shift", "default");
  json_object_set_boolean_member (u, "only_cross_attention", FALSE);
  json_object_set_boolean_member (u, "upcast_attention", FALSE);
  json_object_set_boolean_member (u, "dual_cross_attention", FALSE);
  json_object_set_string_member (u, "attention_type", "default");
  if (!block_types (c, "down_block_types", u, error) || !block_types (c, "up_block_types", u, error)) {
    json_object_unref (u);
    return FALSE;
  }

  /* the motion part, as a MotionAdapter config */
  JsonObject *m = json_object_new ();
  json_object_set_string_member (m, "_class_name", "MotionAdapter");
  copy_member (m, "block_out_channels", src, "block_out_channels");
  copy_member (m, "motion_layers_per_block", src, "layers_per_block");
  copy_member (m, "motion_transformer_layers_per_block", src, "temporal_transformer_layers_per_block");
  copy_member (m, "motion_mid_block_layers_per_block", src, "mid_block_layers");
  copy_member (m, "motion_transformer_layers_per_mid_block", src, "temporal_transformer_layers_per_mid_block");
  copy_member (m, "motion_num_attention_heads", src, "motion_num_attention_heads");
  copy_member (m, "motion_norm_num_groups", src, "norm_num_groups");
  copy_member (m, "motion_max_seq_length", src, "motion_max_seq_length");
  copy_member (m, "use_motion_mid_block", src, "use_motion_mid_block");
  json_object_set_null_member (m, "conv_in_channels");

  *unet_config = diffuse_config_from_object (u, diffuse_config_label (c));
  *adapter_config = diffuse_config_from_object (m, diffuse_config_label (c));
  json_object_unref (u);
  json_object_unref (m);
  return TRUE;
}

/* Which loader a key belongs to. */
static gboolean
is_motion_key (const char *key)
{
  return g_str_has_prefix (key, "motion_modules.") || strstr (key, ".motion_modules.") != NULL;
}

static gboolean
is_spatial_key (const char *key)
{
  return !is_motion_key (key);
}

DiffuseUNetMotion *
diffuse_unet_motion_new_from_weights (DiffuseConfig *config, DiffuseWeights *weights,
                                      const DiffuseUNetMotionParams *params, GError **error)
{
  g_return_val_if_fail (config != NULL && weights != NULL, NULL);
  DiffuseUNetMotionParams defaults;
  if (!params) {
    diffuse_unet_motion_default_params (&defaults);
    params = &defaults;
  }
  DiffuseConfig *ucfg = NULL, *acfg = NULL;
  if (!diffuse_unet_motion_split_config (config, &ucfg, &acfg, error))
    return NULL;
  const char *component = params->component ? params->component : "unet";
  DiffuseUNetParams up;
  diffuse_unet_default_params (&up);
  up.dtype = params->dtype;
  up.device = params->device;
  up.component = component;
  DiffuseUNet *unet = _diffuse_unet_new_owned (ucfg, weights, &up, is_spatial_key, error);
  DiffuseMotionAdapter *adapter = NULL;
  if (unet) {
    DiffuseMotionAdapterParams ap;
    diffuse_motion_adapter_default_params (&ap);
    ap.dtype = params->dtype;
    ap.device = params->device;
    ap.component = component;
    adapter = _diffuse_motion_adapter_new_owned (acfg, weights, &ap, is_motion_key, error);
  }
  DiffuseUNetMotion *m = adapter ? diffuse_unet_motion_new (unet, adapter, error) : NULL;
  if (adapter)
    diffuse_motion_adapter_unref (adapter);
  if (unet)
    diffuse_unet_unref (unet);
  diffuse_config_unref (ucfg);
  diffuse_config_unref (acfg);
  return m;
}

DiffuseUNetMotion *
diffuse_unet_motion_new_from_dir (const char *dir, const DiffuseUNetMotionParams *params, GError **error)
{
  g_return_val_if_fail (dir != NULL, NULL);
  DiffuseConfig *config;
  DiffuseWeights *w;
  if (!diffuse_blk_open_model_dir (dir, &config, &w, error))
    return NULL;
  DiffuseUNetMotion *m = diffuse_unet_motion_new_from_weights (config, w, params, error);
  diffuse_weights_unref (w);
  diffuse_config_unref (config);
  return m;
}

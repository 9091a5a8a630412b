/* gst-diffuse — LoRA adapters in diffusers' format (pipe.load_lora_weights,
 * set_adapters, unload_lora_weights), merged into the weights.
 *
 * A file holds, per adapted module, "unet.<module>.lora_A.weight" [r, in
 * (, kh, kw)] and "unet.<module>.lora_B.weight" [out, r (, 1, 1)] (peft's
 * names, as StableDiffusionPipeline.save_lora_weights writes them; the text
 * encoder's under "text_encoder."), and the LoraConfig in the
 * "lora_adapter_metadata" header entry ("unet.r", "unet.lora_alpha",
 * "unet.use_rslora", "unet.rank_pattern", "unet.alpha_pattern").  peft scales
 * each module's B A by lora_alpha / r (lora_alpha / sqrt (r) with rslora);
 * set_adapters weights multiply that.  kohya-ss files ("lora_unet_<module
 * with _ for .>.lora_down.weight", "lora_up.weight", ".alpha"; text encoder
 * "lora_te_") are read too: each flat name is matched against the model's
 * own module names (exact, where diffusers guesses the dots back), alpha /
 * rank as scale.  Here the active adapters are merged:
 * W' = W + sum_a weight_a scale_a B_a A_a, computed in f32 and given to the
 * component's model through diffuse_weights_new_patched, so a LoRA'd model
 * shares every untouched tensor with the plain one (fuse_lora, in
 * diffusers' words; the same product as its unfused forward, to rounding). */
#include "pipelines-private.h"
#include <diffuse/error.h>
#include <diffuse/hub.h>
#include <json-glib/json-glib.h>
#include <math.h>
#include <string.h>

typedef struct {
  char *module;          /* relative to the component: "down_blocks.0.attentions.0.proj_in";
                          * kohya: the flat name "down_blocks_0_attentions_0_proj_in" */
  gboolean kohya;
  DiffuseTensor *A, *B;  /* f32 on the CPU */
  double scale;
} LoraModule;

struct _DiffuseLoraAdapter {
  char *name, *path;
  GPtrArray *mods[DIFFUSE_LORA_N_TARGETS];   /* per DiffuseLoraTarget: LoraModule* */
};

static void
lora_module_free (LoraModule *m)
{
  g_free (m->module);
  diffuse_tensor_clear (&m->A);
  diffuse_tensor_clear (&m->B);
  g_free (m);
}

void
_diffuse_lora_adapter_free (DiffuseLoraAdapter *a)
{
  if (!a)
    return;
  g_free (a->name);
  g_free (a->path);
  for (int i = 0; i < DIFFUSE_LORA_N_TARGETS; i++)
    if (a->mods[i])
      g_ptr_array_unref (a->mods[i]);
  g_free (a);
}

const char *
_diffuse_lora_adapter_name (DiffuseLoraAdapter *a)
{
  return a->name;
}

gboolean
_diffuse_lora_adapter_has (DiffuseLoraAdapter *a, DiffuseLoraTarget target)
{
  return a->mods[target]->len > 0;
}

static gboolean
filter_takes (const char *module, DiffuseLoraFilter filter)
{
  const gboolean motion = strstr (module, "motion_modules") != NULL;
  return filter == DIFFUSE_LORA_ALL || (filter == DIFFUSE_LORA_ONLY_MOTION) == motion;
}

gboolean
_diffuse_lora_adapter_has_filtered (DiffuseLoraAdapter *a, DiffuseLoraTarget target, DiffuseLoraFilter filter)
{
  for (guint i = 0; i < a->mods[target]->len; i++)
    if (filter_takes (((LoraModule *) g_ptr_array_index (a->mods[target], i))->module, filter))
      return TRUE;
  return FALSE;
}

/* peft's pattern match: a key of rank_pattern / alpha_pattern names the module when the module's
 * name ends with it at a "." boundary (or equals it) */
static gboolean
pattern_hit (const char *module, const char *key)
{
  size_t lm = strlen (module), lk = strlen (key);
  if (lk > lm || strcmp (module + lm - lk, key) != 0)
    return FALSE;
  return lk == lm || module[lm - lk - 1] == '.';
}

static double
pattern_value (JsonObject *meta, const char *member, const char *module, double def)
{
  if (!meta || !json_object_has_member (meta, member))
    return def;
  JsonNode *n = json_object_get_member (meta, member);
  if (!JSON_NODE_HOLDS_OBJECT (n))
    return def;
  JsonObject *o = json_node_get_object (n);
  GList *keys = json_object_get_members (o);
  double v = def;
  for (GList *l = keys; l; l = l->next)
    if (pattern_hit (module, l->data)) {
      v = json_node_get_double (json_object_get_member (o, l->data));
      break;
    }
  g_list_free (keys);
  return v;
}

static double
meta_number (JsonObject *meta, const char *member, double def)
{
  if (!meta || !json_object_has_member (meta, member))
    return def;
  JsonNode *n = json_object_get_member (meta, member);
  return JSON_NODE_HOLDS_VALUE (n) && json_node_get_value_type (n) != G_TYPE_STRING ? json_node_get_double (n) : def;
}

/* "org/name" or "org/name/sub/file.safetensors": a Hub repo id (diffuse_is_repo_id)
 * and a file in it; a missing "dir/x.safetensors" stays a local path */
static gboolean
split_repo (const char *ref, char **repo, char **file)
{
  const char *s1 = strchr (ref, '/'), *s2 = s1 ? strchr (s1 + 1, '/') : NULL;
  char *r = s2 ? g_strndup (ref, s2 - ref) : g_strdup (ref);
  gboolean ok = s1 && diffuse_is_repo_id (r) &&
                (s2 ? g_str_has_suffix (s2 + 1, ".safetensors") : !g_str_has_suffix (ref, ".safetensors"));
  if (ok) {
    *repo = r;
    *file = s2 ? g_strdup (s2 + 1) : NULL;
  } else {
    g_free (r);
  }
  return ok;
}

/* pipe.load_lora_weights ("org/name"[, weight_name=...]): the file from the
 * Hub cache (fetched unless there; HF_ENDPOINT, HF_HUB_CACHE, HF_TOKEN,
 * HF_HUB_OFFLINE as for models): weight_name, else
 * pytorch_lora_weights.safetensors, else the repo's one .safetensors file,
 * else pytorch_lora_weights.bin */
static char *
lora_from_hub (const char *repo, const char *file, GError **error)
{
  DiffuseHubClient *client = diffuse_hub_client_new (NULL, error);
  if (!client)
    return NULL;
  char *path = NULL, *pick = file ? g_strdup (file) : NULL;
  if (!pick) {
    GPtrArray *files = diffuse_hub_list_files (client, repo, NULL, NULL, error);
    gboolean bin = FALSE;
    if (files) {
      GPtrArray *st = g_ptr_array_new ();
      for (guint i = 0; i < files->len; i++) {
        const char *f = g_ptr_array_index (files, i);
        if (g_str_equal (f, "pytorch_lora_weights.safetensors")) {
          pick = g_strdup (f);
          break;
        }
        if (g_str_has_suffix (f, ".safetensors") && !strchr (f, '/'))
          g_ptr_array_add (st, (gpointer) f);
        if (g_str_equal (f, "pytorch_lora_weights.bin"))
          bin = TRUE;
      }
      if (!pick && st->len == 1)
        pick = g_strdup (g_ptr_array_index (st, 0));
      else if (!pick && st->len == 0 && bin)
        pick = g_strdup ("pytorch_lora_weights.bin");   /* diffusers' pickle fallback */
      else if (!pick) {
        GString *l = g_string_new (NULL);
        for (guint i = 0; i < st->len; i++)
          g_string_append_printf (l, "%s%s", i ? ", " : "", (const char *) g_ptr_array_index (st, i));
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                     "LoRA %s: %s; name one as %s/<file>.safetensors", repo,
                     st->len ? "several .safetensors files" : "no .safetensors file at the top of the repo",
                     repo);
        if (st->len)
          g_prefix_error (error, "(%s) ", l->str);
        g_string_free (l, TRUE);
      }
      g_ptr_array_unref (st);
      g_ptr_array_unref (files);
    }
  }
  if (pick)
    path = diffuse_hub_download_file (client, repo, NULL, pick, error);
  g_free (pick);
  diffuse_hub_client_free (client);
  return path;
}

static char *
lora_file (const char *path, GError **error)
{
  if (g_file_test (path, G_FILE_TEST_IS_DIR)) {
    /* diffusers' lora_state_dict: the safetensors file, else the .bin one
     * (read without executing it, as torch.load(weights_only=True)) */
    static const char *const names[] = { "pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin" };
    for (guint i = 0; i < G_N_ELEMENTS (names); i++) {
      char *f = g_build_filename (path, names[i], NULL);
      if (g_file_test (f, G_FILE_TEST_IS_REGULAR))
        return f;
      g_free (f);
    }
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                 "%s has no pytorch_lora_weights.safetensors nor pytorch_lora_weights.bin (name the file instead)",
                 path);
    return NULL;
  }
  if (!g_file_test (path, G_FILE_TEST_EXISTS)) {
    char *repo = NULL, *file = NULL;
    if (split_repo (path, &repo, &file)) {
      char *p = lora_from_hub (repo, file, error);
      g_free (repo);
      g_free (file);
      return p;
    }
  }
  if (!g_file_test (path, G_FILE_TEST_IS_REGULAR)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                 "LoRA %s: no such file or folder (a .safetensors file, a folder holding "
                 "pytorch_lora_weights.safetensors, or a Hub repo id \"org/name[/file.safetensors]\")", path);
    return NULL;
  }
  if (g_str_has_suffix (path, ".ckpt")) {
    /* single-file checkpoints (a whole model in a "state_dict") are not LoRA files we read */
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "LoRA %s: .ckpt checkpoints are not read; use a .safetensors or a torch.save .bin/.pt LoRA file",
                 path);
    return NULL;
  }
  return g_strdup (path);
}

static gboolean
check_pair (DiffuseTensor *A, DiffuseTensor *B, const char *file, const char *module, GError **error)
{
  const int64_t r = A->shape[0];
  const gboolean conv = A->ndim == 4;
  if (r >= 1 && B->shape[1] == r &&
      (conv ? (B->ndim == 4 && B->shape[2] == 1 && B->shape[3] == 1) : (A->ndim == 2 && B->ndim == 2)))
    return TRUE;
  char *da = diffuse_tensor_describe (A), *db = diffuse_tensor_describe (B);
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "LoRA %s: module %s has lora_A %s and lora_B %s", file,
               module, da, db);
  g_free (da);
  g_free (db);
  return FALSE;
}

/* one kohya-ss module: <name>.lora_down.weight (A), .lora_up.weight (B), .alpha */
static gboolean
load_kohya (DiffuseLoraAdapter *a, DiffuseSafetensors *st, const char *down_key, const char *file, GError **error)
{
  char *name = g_strndup (down_key, strlen (down_key) - strlen (".lora_down.weight"));
  char *up = g_strconcat (name, ".lora_up.weight", NULL), *al = g_strconcat (name, ".alpha", NULL);
  GError *e = NULL;
  DiffuseTensor *A = diffuse_safetensors_tensor (st, down_key, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &e);
  DiffuseTensor *B = A ? diffuse_safetensors_tensor (st, up, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &e) : NULL;
  DiffuseTensor *alpha = B && diffuse_safetensors_find (st, al)
                         ? diffuse_safetensors_tensor (st, al, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &e) : NULL;
  gboolean ok = B && !e && check_pair (A, B, file, name, error);
  if (!B || e) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "LoRA %s: %s", file, e ? e->message : "no lora_up");
    g_clear_error (&e);
  }
  if (ok) {
    /* lora_unet_, lora_te_ / lora_te1_ (the first text encoder), lora_te2_ (SDXL's second) */
    const DiffuseLoraTarget target = g_str_has_prefix (name, "lora_unet_") ? DIFFUSE_LORA_UNET
                                     : g_str_has_prefix (name, "lora_te2_") ? DIFFUSE_LORA_TEXT_ENCODER_2
                                     : DIFFUSE_LORA_TEXT_ENCODER;
    LoraModule *m = g_new0 (LoraModule, 1);
    m->module = g_strdup (name + (target == DIFFUSE_LORA_UNET ? 10 : g_str_has_prefix (name, "lora_te_") ? 8 : 9));
    m->kohya = TRUE;
    m->A = A;
    m->B = B;
    A = B = NULL;
    const double rank = (double) m->A->shape[0];
    const double alp = alpha && diffuse_tensor_numel (alpha) == 1 ? diffuse_tensor_f32 (alpha)[0] : rank;
    m->scale = alp / rank;
    g_ptr_array_add (a->mods[target], m);
  }
  diffuse_tensor_clear (&A);
  diffuse_tensor_clear (&B);
  diffuse_tensor_clear (&alpha);
  g_free (name);
  g_free (up);
  g_free (al);
  return ok;
}

DiffuseLoraAdapter *
_diffuse_lora_adapter_load (const char *path, const char *name, GError **error)
{
  char *file = lora_file (path, error);
  if (!file)
    return NULL;
  DiffuseSafetensors *st = diffuse_safetensors_open (file, error);
  if (!st) {
    g_free (file);
    return NULL;
  }
  DiffuseLoraAdapter *a = g_new0 (DiffuseLoraAdapter, 1);
  a->name = g_strdup (name);
  a->path = file;
  for (int i = 0; i < DIFFUSE_LORA_N_TARGETS; i++)
    a->mods[i] = g_ptr_array_new_with_free_func ((GDestroyNotify) lora_module_free);
  JsonParser *parser = NULL;
  JsonObject *meta = NULL;
  GHashTable *md = diffuse_safetensors_metadata (st);
  const char *mjs = md ? g_hash_table_lookup (md, "lora_adapter_metadata") : NULL;
  if (mjs) {
    parser = json_parser_new ();
    if (json_parser_load_from_data (parser, mjs, -1, NULL) && JSON_NODE_HOLDS_OBJECT (json_parser_get_root (parser)))
      meta = json_node_get_object (json_parser_get_root (parser));
  }
  static const char *const prefixes[DIFFUSE_LORA_N_TARGETS] = { "unet.", "text_encoder.", "text_encoder_2." };
  const guint n = diffuse_safetensors_n_tensors (st);
  gboolean ok = TRUE;
  for (guint i = 0; i < n && ok; i++) {
    const char *key = diffuse_safetensors_entry (st, i)->name;
    const gboolean kohya = g_str_has_prefix (key, "lora_unet_") || g_str_has_prefix (key, "lora_te_") ||
                           g_str_has_prefix (key, "lora_te1_") || g_str_has_prefix (key, "lora_te2_");
    if (strstr (key, "lora_magnitude_vector") || strstr (key, "dora_scale") || strstr (key, "_lora.") ||
        strstr (key, "hada_") || strstr (key, "lokr_") ||
        (!kohya && (strstr (key, "lora_down") || strstr (key, "lora_up")))) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                   "LoRA %s: tensor '%s' is in a format not read yet (DoRA, LyCORIS or diffusers' older "
                   "attention-processor names); diffusers' peft format and kohya-ss' are", file, key);
      ok = FALSE;
      break;
    }
    if (kohya) {
      if (g_str_has_suffix (key, ".lora_down.weight") && !load_kohya (a, st, key, file, error))
        ok = FALSE;
      continue;
    }
    if (!g_str_has_suffix (key, ".lora_A.weight"))
      continue;
    int target = -1;
    for (int t = 0; t < DIFFUSE_LORA_N_TARGETS; t++)
      if (g_str_has_prefix (key, prefixes[t]))
        target = t;
    if (target < 0) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                   "LoRA %s: tensor '%s' adapts a component other than the UNet and the text encoders", file, key);
      ok = FALSE;
      break;
    }
    char *module = g_strndup (key + strlen (prefixes[target]),
                              strlen (key) - strlen (prefixes[target]) - strlen (".lora_A.weight"));
    char *bkey = g_strdup_printf ("%s%s.lora_B.weight", prefixes[target], module);
    GError *e = NULL;
    DiffuseTensor *A = diffuse_safetensors_tensor (st, key, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &e);
    DiffuseTensor *B = A ? diffuse_safetensors_tensor (st, bkey, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &e) : NULL;
    if (!B) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "LoRA %s: %s", file,
                   e ? e->message : "lora_A without lora_B");
      g_clear_error (&e);
      diffuse_tensor_clear (&A);
      g_free (module);
      g_free (bkey);
      ok = FALSE;
      break;
    }
    const int64_t r = A->shape[0];
    if (!check_pair (A, B, file, module, error)) {
      diffuse_tensor_clear (&A);
      diffuse_tensor_clear (&B);
      g_free (module);
      g_free (bkey);
      ok = FALSE;
      break;
    }
    /* scale: lora_alpha / r from the adapter config (patterns per module); without one, alpha = r */
    char *pre = g_strndup (prefixes[target], strlen (prefixes[target]) - 1);
    char *m_r = g_strdup_printf ("%s.r", pre), *m_a = g_strdup_printf ("%s.lora_alpha", pre);
    char *m_rs = g_strdup_printf ("%s.use_rslora", pre), *m_rp = g_strdup_printf ("%s.rank_pattern", pre);
    char *m_ap = g_strdup_printf ("%s.alpha_pattern", pre);
    double rank = pattern_value (meta, m_rp, module, meta_number (meta, m_r, (double) r));
    double alpha = pattern_value (meta, m_ap, module, meta_number (meta, m_a, rank));
    gboolean rs = meta && json_object_has_member (meta, m_rs) &&
                  JSON_NODE_HOLDS_VALUE (json_object_get_member (meta, m_rs)) &&
                  json_object_get_boolean_member (meta, m_rs);
    g_free (pre);
    g_free (m_r);
    g_free (m_a);
    g_free (m_rs);
    g_free (m_rp);
    g_free (m_ap);
    LoraModule *m = g_new0 (LoraModule, 1);
    m->module = module;
    m->A = A;
    m->B = B;
    m->scale = rs ? alpha / sqrt (rank) : alpha / rank;
    g_ptr_array_add (a->mods[target], m);
    g_free (bkey);
  }
  if (ok && a->mods[0]->len == 0 && a->mods[1]->len == 0 && a->mods[2]->len == 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "LoRA %s: no \"unet.*.lora_A.weight\", "
                 "\"text_encoder.*\" or \"text_encoder_2.*\" tensors", file);
    ok = FALSE;
  }
  if (parser)
    g_object_unref (parser);
  diffuse_safetensors_unref (st);
  if (!ok) {
    _diffuse_lora_adapter_free (a);
    return NULL;
  }
  return a;
}

/* The weight name of a module in the component's files (the text encoder's
 * may carry "text_model." or not: transformers 5 writes it without). */
/* kohya: flat module name ("down_blocks_0_attentions_0_proj_in", text encoder
 * "text_model_encoder_layers_0_self_attn_q_proj") -> the model's weight name */
static GHashTable *
flat_names (DiffuseWeights *w)
{
  GHashTable *t = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  guint n = 0;
  const char **names = diffuse_weights_names (w, &n);
  for (guint i = 0; i < n; i++) {
    if (!g_str_has_suffix (names[i], ".weight"))
      continue;
    char *mod = g_strndup (names[i], strlen (names[i]) - strlen (".weight"));
    g_strdelimit (mod, ".", '_');
    /* a text encoder file without "text_model." still answers kohya's text_model_ names */
    char *alias = g_str_has_prefix (names[i], "encoder.") || g_str_has_prefix (names[i], "embeddings.") ||
                  g_str_has_prefix (names[i], "final_layer_norm.") ? g_strconcat ("text_model_", mod, NULL) : NULL;
    if (alias)
      g_hash_table_insert (t, alias, g_strdup (names[i]));
    g_hash_table_insert (t, mod, g_strdup (names[i]));
  }
  g_free (names);
  return t;
}

static const char *
module_weight (DiffuseWeights *w, const LoraModule *m, GHashTable **flat, char **owned)
{
  const char *module = m->module;
  if (m->kohya) {
    if (!*flat)
      *flat = flat_names (w);
    const char *hit = g_hash_table_lookup (*flat, module);
    *owned = hit ? g_strdup (hit) : NULL;
    return *owned;
  }
  *owned = g_strdup_printf ("%s.weight", module);
  if (diffuse_weights_has (w, *owned))
    return *owned;
  if (g_str_has_prefix (module, "text_model.")) {
    g_free (*owned);
    *owned = g_strdup_printf ("%s.weight", module + strlen ("text_model."));
    if (diffuse_weights_has (w, *owned))
      return *owned;
  }
  return NULL;
}

DiffuseWeights *
_diffuse_lora_merge (DiffuseWeights *base, DiffuseLoraAdapter *const *adapters, const double *weights, int n,
                     DiffuseLoraTarget target, DiffuseLoraFilter filter, GError **error)
{
  GHashTable *patches = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, (GDestroyNotify) diffuse_tensor_unref);
  GHashTable *flat = NULL;
  GString *what = g_string_new ("LoRA ");
  gboolean ok = TRUE;
  for (int ai = 0; ai < n && ok; ai++) {
    DiffuseLoraAdapter *a = adapters[ai];
    g_string_append_printf (what, "%s%s", ai ? ", " : "", a->name);
    for (guint k = 0; k < a->mods[target]->len && ok; k++) {
      LoraModule *m = g_ptr_array_index (a->mods[target], k);
      if (!filter_takes (m->module, filter))
        continue;
      char *wname = NULL;
      const char *key = module_weight (base, m, &flat, &wname);
      if (!key) {
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "LoRA %s (%s): the model has no module %s",
                     a->name, a->path, m->module);
        g_free (wname);
        ok = FALSE;
        break;
      }
      DiffuseTensor *W = g_hash_table_lookup (patches, key);
      if (!W) {
        DiffuseTensor *orig = diffuse_weights_get_uncached (base, key, DIFFUSE_DTYPE_F32, diffuse_device_cpu (),
                                                            error);
        W = orig ? diffuse_contiguous (orig) : NULL;
        DiffuseTensor *copy = W && W == orig ? diffuse_copy (W) : NULL;   /* never write into the mapping */
        if (copy) {
          diffuse_tensor_unref (W);
          W = copy;
        }
        diffuse_tensor_clear (&orig);
        if (!W) {
          g_free (wname);
          ok = FALSE;
          break;
        }
        g_hash_table_insert (patches, g_strdup (key), W);
      }
      const int64_t out = m->B->shape[0], r = m->A->shape[0], in = diffuse_tensor_numel (m->A) / r;
      if (diffuse_tensor_numel (W) != out * in || W->shape[0] != out) {
        char *dw = diffuse_tensor_describe (W);
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                     "LoRA %s: module %s: the model's weight is %s, the adapter's product [%" G_GINT64_FORMAT
                     ", %" G_GINT64_FORMAT "]", a->name, m->module, dw, out, in);
        g_free (dw);
        g_free (wname);
        ok = FALSE;
        break;
      }
      /* W += s B A, the product by the tensor layer's GEMM (SD 1.5 LoRAs: a few GFLOP) */
      DiffuseTensor *B2 = diffuse_reshape (m->B, 2, (const int64_t[]) { out, r });
      DiffuseTensor *A2 = diffuse_reshape (m->A, 2, (const int64_t[]) { r, in });
      DiffuseTensor *delta = B2 && A2 ? diffuse_matmul (B2, A2, FALSE, FALSE, (float) (weights[ai] * m->scale)) : NULL;
      diffuse_tensor_clear (&B2);
      diffuse_tensor_clear (&A2);
      DiffuseTensor *dc = delta ? diffuse_contiguous (delta) : NULL;
      diffuse_tensor_clear (&delta);
      if (!dc) {
        if (!diffuse_tensor_take_error (error))
          g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "LoRA %s: module %s: the product failed", a->name,
                       m->module);
        g_free (wname);
        ok = FALSE;
        break;
      }
      float *wp = diffuse_tensor_f32 (W);
      const float *dp = diffuse_tensor_f32 (dc);
      for (int64_t i = 0; i < out * in; i++)
        wp[i] += dp[i];
      diffuse_tensor_unref (dc);
      g_free (wname);
    }
  }
  DiffuseWeights *w = ok ? diffuse_weights_new_patched (base, patches, what->str) : NULL;
  g_hash_table_unref (patches);
  if (flat)
    g_hash_table_unref (flat);
  g_string_free (what, TRUE);
  return w;
}

/* ---- a pipeline's adapters (DiffuseLoraSet, pipelines-private.h) ----------- */

void
_diffuse_lora_set_init (DiffuseLoraSet *s, DiffuseLoraApplyFunc apply, gpointer owner)
{
  s->adapters = g_ptr_array_new_with_free_func ((GDestroyNotify) _diffuse_lora_adapter_free);
  s->active = g_ptr_array_new ();
  s->weights = g_array_new (FALSE, FALSE, sizeof (double));
  s->merged_scale = 1.0;
  s->apply = apply;
  s->owner = owner;
}

void
_diffuse_lora_set_clear (DiffuseLoraSet *s)
{
  g_clear_pointer (&s->active, g_ptr_array_unref);
  g_clear_pointer (&s->weights, g_array_unref);
  g_clear_pointer (&s->adapters, g_ptr_array_unref);
}

static DiffuseLoraAdapter *
set_find (DiffuseLoraSet *s, const char *name)
{
  for (guint i = 0; i < s->adapters->len; i++)
    if (g_str_equal (_diffuse_lora_adapter_name (g_ptr_array_index (s->adapters, i)), name))
      return g_ptr_array_index (s->adapters, i);
  return NULL;
}

/* makes act/ws the active set and applies it at scale; on failure the old set stays */
static gboolean
set_switch (DiffuseLoraSet *s, GPtrArray *act, GArray *ws, double scale, GError **error)
{
  const int n = (int) act->len;
  double *scaled = g_new (double, MAX (n, 1));
  for (int i = 0; i < n; i++)
    scaled[i] = g_array_index (ws, double, i) * scale;
  gboolean ok = s->apply (s->owner, (DiffuseLoraAdapter *const *) act->pdata, scaled, n, error);
  g_free (scaled);
  if (!ok)
    return FALSE;
  if (act != s->active) {
    g_ptr_array_unref (s->active);
    s->active = g_ptr_array_ref (act);
  }
  if (ws != s->weights) {
    g_array_unref (s->weights);
    s->weights = g_array_ref (ws);
  }
  s->merged_scale = scale;
  return TRUE;
}

gboolean
_diffuse_lora_set_load (DiffuseLoraSet *s, const char *path, const char *adapter_name, GError **error)
{
  char *name = adapter_name ? g_strdup (adapter_name) : g_strdup_printf ("default_%u", s->adapters->len);
  gboolean ok = FALSE;
  if (set_find (s, name)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "Adapter name %s already in use in the pipeline; choose another adapter_name", name);
  } else {
    DiffuseLoraAdapter *a = _diffuse_lora_adapter_load (path, name, error);
    if (a) {
      /* as diffusers: the adapter just loaded becomes the only active one, weight 1 */
      GPtrArray *act = g_ptr_array_new ();
      GArray *ws = g_array_new (FALSE, FALSE, sizeof (double));
      const double one = 1.0;
      g_ptr_array_add (act, a);
      g_array_append_val (ws, one);
      ok = set_switch (s, act, ws, 1.0, error);
      if (ok)
        g_ptr_array_add (s->adapters, a);
      else
        _diffuse_lora_adapter_free (a);
      g_ptr_array_unref (act);
      g_array_unref (ws);
    }
  }
  g_free (name);
  return ok;
}

gboolean
_diffuse_lora_set_activate (DiffuseLoraSet *s, const char *const *names, const double *weights, int n, GError **error)
{
  GPtrArray *act = g_ptr_array_new ();
  GArray *ws = g_array_new (FALSE, FALSE, sizeof (double));
  gboolean ok = TRUE;
  for (int i = 0; i < n && ok; i++) {
    DiffuseLoraAdapter *a = set_find (s, names[i]);
    const double w = weights ? weights[i] : 1.0;
    if (!a) {
      GString *list = g_string_new (NULL);
      for (guint k = 0; k < s->adapters->len; k++)
        g_string_append_printf (list, "%s%s", k ? ", " : "",
                                _diffuse_lora_adapter_name (g_ptr_array_index (s->adapters, k)));
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                   "Adapter name(s) {'%s'} not in the list of present adapters: {%s}", names[i], list->str);
      g_string_free (list, TRUE);
      ok = FALSE;
    } else if (!isfinite (w)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "adapter %s: weight %g", names[i], w);
      ok = FALSE;
    } else {
      g_ptr_array_add (act, a);
      g_array_append_val (ws, w);
    }
  }
  if (ok)
    ok = set_switch (s, act, ws, 1.0, error);
  g_ptr_array_unref (act);
  g_array_unref (ws);
  return ok;
}

void
_diffuse_lora_set_unload (DiffuseLoraSet *s)
{
  GPtrArray *act = g_ptr_array_new ();
  GArray *ws = g_array_new (FALSE, FALSE, sizeof (double));
  set_switch (s, act, ws, 1.0, NULL);   /* no adapter: back to the components' own models */
  g_ptr_array_unref (act);
  g_array_unref (ws);
  g_ptr_array_set_size (s->adapters, 0);
}

gboolean
_diffuse_lora_set_rescale (DiffuseLoraSet *s, double scale, GError **error)
{
  if (s->active->len == 0 || scale == s->merged_scale)
    return TRUE;
  return set_switch (s, s->active, s->weights, scale, error);
}

char **
_diffuse_lora_set_names (DiffuseLoraSet *s, gboolean active_only)
{
  GPtrArray *from = active_only ? s->active : s->adapters;
  char **v = g_new0 (char *, from->len + 1);
  for (guint i = 0; i < from->len; i++)
    v[i] = g_strdup (_diffuse_lora_adapter_name (g_ptr_array_index (from, i)));
  return v;
}

gboolean
_diffuse_lora_set_load_spec (DiffuseLoraSet *s, const char *spec, GError **error)
{
  char **items = g_strsplit (spec, ",", -1);
  GPtrArray *names = g_ptr_array_new_with_free_func (g_free);
  GArray *weights = g_array_new (FALSE, FALSE, sizeof (double));
  gboolean ok = TRUE;
  for (char **it = items; ok && *it; it++) {
    char *item = g_strstrip (*it);
    if (!*item)
      continue;
    /* PATH:WEIGHT when what follows the last ':' is a number */
    double w = 1.0;
    char *path = g_strdup (item), *colon = strrchr (path, ':');
    if (colon) {
      char *end = NULL;
      double v = g_ascii_strtod (colon + 1, &end);
      if (end && end != colon + 1 && *end == '\0') {
        w = v;
        *colon = '\0';
      }
    }
    /* the adapter's name: the file's (or folder's) stem, made unique */
    char *base = g_path_get_basename (path);
    char *dot = g_str_has_suffix (base, ".safetensors") ? strrchr (base, '.') : NULL;
    if (dot)
      *dot = '\0';
    if (g_str_equal (base, "pytorch_lora_weights")) {
      char *dir = g_path_get_dirname (path);
      g_free (base);
      base = g_path_get_basename (dir);
      g_free (dir);
    }
    char *name = g_strdup (base);
    for (int k = 2; set_find (s, name); k++) {
      g_free (name);
      name = g_strdup_printf ("%s_%d", base, k);
    }
    ok = _diffuse_lora_set_load (s, path, name, error);
    if (ok) {
      g_ptr_array_add (names, name);
      g_array_append_val (weights, w);
    } else {
      g_free (name);
    }
    g_free (base);
    g_free (path);
  }
  if (ok && names->len > 0)
    ok = _diffuse_lora_set_activate (s, (const char *const *) names->pdata, (const double *) weights->data,
                                     (int) names->len, error);
  g_ptr_array_unref (names);
  g_array_unref (weights);
  g_strfreev (items);
  return ok;
}

/* gst-diffuse — pipeline folders and Hub repos, diffusers' loading rules,
 * and the component cache.
 *
 * The file-selection rules work on a list of relative paths, so the same
 * code decides what to read from a local folder and what to download from
 * the Hub.  docs/loading-rules.md is the rule book. */
#include <diffuse/pipeline.h>
#include <diffuse/hub.h>
#include <diffuse/error.h>
#include <glib/gstdio.h>
#include <string.h>

/* ---- params -------------------------------------------------------------- */

DiffuseLoadParams
diffuse_load_default_params (void)
{
  DiffuseLoadParams p;
  memset (&p, 0, sizeof p);
  p.dtype = DIFFUSE_DTYPE_F32;
  p.use_safetensors = DIFFUSE_SAFETENSORS_AUTO;
  return p;
}

/* ---- known classes ------------------------------------------------------- */

typedef struct {
  const char *library;
  const char *class_name;
  DiffuseComponentKind kind;
} KnownClass;

static const KnownClass known_classes[] = {
  { "diffusers", "UNet2DConditionModel", DIFFUSE_COMPONENT_MODEL },
  { "diffusers", "AutoencoderKL", DIFFUSE_COMPONENT_MODEL },
  { "diffusers", "MotionAdapter", DIFFUSE_COMPONENT_MODEL },
  { "diffusers", "UNetMotionModel", DIFFUSE_COMPONENT_MODEL },
  { "transformers", "CLIPTextModel", DIFFUSE_COMPONENT_MODEL },
  { "transformers", "CLIPTextModelWithProjection", DIFFUSE_COMPONENT_MODEL },
  { "transformers", "CLIPVisionModelWithProjection", DIFFUSE_COMPONENT_MODEL },
  { "stable_diffusion", "StableDiffusionSafetyChecker", DIFFUSE_COMPONENT_MODEL },
  { "transformers", "CLIPTokenizer", DIFFUSE_COMPONENT_TOKENIZER },
  { "transformers", "CLIPTokenizerFast", DIFFUSE_COMPONENT_TOKENIZER },
  { "transformers", "CLIPImageProcessor", DIFFUSE_COMPONENT_PROCESSOR },
  { "transformers", "CLIPFeatureExtractor", DIFFUSE_COMPONENT_PROCESSOR },
};

static const char *const scheduler_classes[] = {
  "PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
  "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
  "UniPCMultistepScheduler", "LCMScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
  "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
  NULL,
};

static gboolean
class_kind (const char *library, const char *class_name, DiffuseComponentKind *kind)
{
  if (!class_name)
    return FALSE;
  for (guint i = 0; i < G_N_ELEMENTS (known_classes); i++)
    if (strcmp (known_classes[i].class_name, class_name) == 0 &&
        (!library || strcmp (known_classes[i].library, library) == 0)) {
      *kind = known_classes[i].kind;
      return TRUE;
    }
  if (g_strv_contains (scheduler_classes, class_name) && (!library || strcmp (library, "diffusers") == 0)) {
    *kind = DIFFUSE_COMPONENT_SCHEDULER;
    return TRUE;
  }
  return FALSE;
}

typedef struct {
  const char *name;
  const char *const *components;     /* expected component names */
  const char *const *optional;
} PipelineClass;

static const char *const sd_components[] = { "vae", "text_encoder", "tokenizer", "unet", "scheduler",
                                             "safety_checker", "feature_extractor", "image_encoder", NULL };
static const char *const sd_optional[] = { "safety_checker", "feature_extractor", "image_encoder", NULL };
static const char *const ad_components[] = { "vae", "text_encoder", "tokenizer", "unet", "motion_adapter",
                                             "scheduler", "feature_extractor", "image_encoder", NULL };
static const char *const ad_optional[] = { "feature_extractor", "image_encoder", NULL };

/* Stable Diffusion XL: two text encoders (the second with a projection) */
static const char *const xl_components[] = { "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                             "unet", "scheduler", "image_encoder", "feature_extractor", NULL };
/* (a refiner has text_encoder_2 / tokenizer_2 alone) */
static const char *const xl_optional[] = { "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2",
                                           "image_encoder", "feature_extractor", NULL };

static const PipelineClass pipeline_classes[] = {
  { "StableDiffusionPipeline", sd_components, sd_optional },
  { "StableDiffusionImg2ImgPipeline", sd_components, sd_optional },
  /* the same components; self-attention guidance is DiffuseSDParams.sag_scale */
  { "StableDiffusionSAGPipeline", sd_components, sd_optional },
  { "AnimateDiffPipeline", ad_components, ad_optional },
  { "StableDiffusionXLPipeline", xl_components, xl_optional },
  { "StableDiffusionXLImg2ImgPipeline", xl_components, xl_optional },
};

static const PipelineClass *
find_pipeline_class (const char *name)
{
  for (guint i = 0; name && i < G_N_ELEMENTS (pipeline_classes); i++)
    if (strcmp (pipeline_classes[i].name, name) == 0)
      return &pipeline_classes[i];
  return NULL;
}

gboolean
diffuse_pipeline_class_is_known (const char *pipeline_class)
{
  return find_pipeline_class (pipeline_class) != NULL;
}

gboolean
diffuse_pipeline_class_is_optional (const char *pipeline_class, const char *component)
{
  const PipelineClass *pc = find_pipeline_class (pipeline_class);
  const char *const *opt = pc ? pc->optional : sd_optional;
  return g_strv_contains (opt, component);
}

/* ---- file selection (diffusers' variant / safetensors rules) ------------- */

static gboolean
in_list (GPtrArray *files, const char *path)
{
  for (guint i = 0; i < files->len; i++)
    if (strcmp (g_ptr_array_index (files, i), path) == 0)
      return TRUE;
  return FALSE;
}

/* Shard file names "<prefix>-00001-of-00002.safetensors" (plain) or with the
 * variant ".<v>.safetensors" (current) / "<prefix>.<v>-00001-of-00002.safetensors"
 * (legacy) are read from the index; here we only need to know whether a
 * component folder holds each kind of file. */
typedef struct {
  char *single;        /* relative path of the one weight file, or NULL */
  char *index;         /* relative path of the shard index, or NULL */
} WeightChoice;

static void
choice_clear (WeightChoice *c)
{
  g_clear_pointer (&c->single, g_free);
  g_clear_pointer (&c->index, g_free);
}

static gboolean
find_weights (GPtrArray *files, const char *dir, const char *prefix, const char *ext, const char *variant,
              gboolean prefer_index, WeightChoice *out)
{
  const char *sep = *dir ? "/" : "";
  char *single = variant ? g_strdup_printf ("%s%s%s.%s.%s", dir, sep, prefix, variant, ext)
                         : g_strdup_printf ("%s%s%s.%s", dir, sep, prefix, ext);
  /* sharded: "<prefix>.<ext>.index.<variant>.json" (current) or
   * "<prefix>.<ext>.<variant>.index.json" (deprecated, still read by diffusers) */
  char *idx[2] = { NULL, NULL };
  if (variant) {
    idx[0] = g_strdup_printf ("%s%s%s.%s.index.%s.json", dir, sep, prefix, ext, variant);
    idx[1] = g_strdup_printf ("%s%s%s.%s.%s.index.json", dir, sep, prefix, ext, variant);
  } else {
    idx[0] = g_strdup_printf ("%s%s%s.%s.index.json", dir, sep, prefix, ext);
  }
  const char *index = NULL;
  for (int i = 0; i < 2 && idx[i] && !index; i++)
    if (in_list (files, idx[i]))
      index = idx[i];
  gboolean have_single = in_list (files, single);
  /* both present: diffusers models take the index, transformers models the single file */
  if (index && (prefer_index || !have_single))
    out->index = g_strdup (index);
  else if (have_single)
    out->single = g_strdup (single);
  g_free (single);
  g_free (idx[0]);
  g_free (idx[1]);
  return out->index || out->single;
}

/* Does any file of the folder carry a variant label?  (".<label>.safetensors",
 * ".<label>.bin", shard forms); returns the first label seen. */
static char *
any_variant_label (GPtrArray *files, const char *dir, const char *prefix)
{
  char *start = g_strdup_printf ("%s%s%s.", dir, *dir ? "/" : "", prefix);
  char *label = NULL;
  for (guint i = 0; i < files->len && !label; i++) {
    const char *f = g_ptr_array_index (files, i);
    if (!g_str_has_prefix (f, start))
      continue;
    const char *rest = f + strlen (start);
    if (g_str_has_prefix (rest, "safetensors") || g_str_has_prefix (rest, "bin"))
      continue;
    const char *dot = strchr (rest, '.');
    if (dot && (g_str_has_suffix (f, ".safetensors") || g_str_has_suffix (f, ".bin")))
      label = g_strndup (rest, dot - rest);
  }
  g_free (start);
  return label;
}

typedef enum { SEL_OK, SEL_NO_VARIANT, SEL_FAIL } SelResult;

/* Picks the weight files of one model component folder `dir` (relative) from
 * `files`.  *used_variant tells whether the variant files were taken.
 *
 * PyTorch pickle weights (diffusion_pytorch_model.bin for diffusers models,
 * pytorch_model.bin for transformers ones, or their shard indexes) are read
 * without executing them (io/torch_pickle.c, as torch.load(weights_only=True)),
 * following diffusers' use_safetensors rules: None prefers safetensors and
 * falls back to .bin, True requires safetensors, False reads only .bin. */
static SelResult
select_weights (GPtrArray *files, const char *root_label, const char *name, const char *dir, const char *library,
                const char *variant, DiffuseSafetensorsMode mode, WeightChoice *out, gboolean *used_variant,
                GError **error)
{
  const gboolean diffusers_lib = g_strcmp0 (library, "diffusers") == 0;
  const char *prefix = diffusers_lib ? "diffusion_pytorch_model" : "model";
  const char *prefixes[2] = { prefix, diffusers_lib ? "model" : "diffusion_pytorch_model" };
  const char *bin_prefix = diffusers_lib ? "diffusion_pytorch_model" : "pytorch_model";
  const gboolean want_st = mode != DIFFUSE_SAFETENSORS_ALLOW_BIN, want_bin = mode != DIFFUSE_SAFETENSORS_REQUIRE;
  *used_variant = FALSE;
  memset (out, 0, sizeof *out);

  for (int pi = 0; want_st && variant && pi < 2; pi++)
    if (find_weights (files, dir, prefixes[pi], "safetensors", variant, diffusers_lib, out)) {
      *used_variant = TRUE;
      return SEL_OK;
    }
  if (want_bin && variant && find_weights (files, dir, bin_prefix, "bin", variant, diffusers_lib, out)) {
    *used_variant = TRUE;
    return SEL_OK;
  }
  for (int pi = 0; want_st && pi < 2; pi++)
    if (find_weights (files, dir, prefixes[pi], "safetensors", NULL, diffusers_lib, out))
      return variant ? SEL_NO_VARIANT : SEL_OK;
  if (want_bin && find_weights (files, dir, bin_prefix, "bin", NULL, diffusers_lib, out))
    return variant ? SEL_NO_VARIANT : SEL_OK;

  const char *sep = *dir ? "/" : "";
  if (mode == DIFFUSE_SAFETENSORS_ALLOW_BIN) {
    if (variant)
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                   "No PyTorch weights for component '%s' in %s: neither %s.%s.bin nor %s.bin (nor a shard index); "
                   "use_safetensors=False reads only .bin weights, as diffusers does", name, root_label, bin_prefix,
                   variant, bin_prefix);
    else
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                   "No PyTorch weights for component '%s' in %s: no %s.bin (nor a shard index); "
                   "use_safetensors=False reads only .bin weights, as diffusers does", name, root_label, bin_prefix);
    return SEL_FAIL;
  }
  WeightChoice bin = { 0 };
  if (find_weights (files, dir, bin_prefix, "bin", NULL, diffusers_lib, &bin) ||
      (variant && find_weights (files, dir, bin_prefix, "bin", variant, diffusers_lib, &bin))) {
    /* only REQUIRE gets here with .bin files present */
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                 "Could not find the safetensors weights of component '%s' in %s (only %s, PyTorch .bin weights, "
                 "are there; use_safetensors is required)",
                 name, root_label, bin.single ? bin.single : bin.index);
    choice_clear (&bin);
    return SEL_FAIL;
  }
  char *label = any_variant_label (files, dir, prefix);
  if (!label)
    label = any_variant_label (files, dir, bin_prefix);
  if (label && !variant)
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_VARIANT,
                 "Component '%s' of %s has no default weights, only variant '%s' files: load it with variant=%s",
                 name, root_label, label, label);
  else if (label)
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_VARIANT,
                 "Component '%s' of %s has neither variant '%s' nor default weights (it has variant '%s')", name,
                 root_label, variant, label);
  else
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                 "No weights for component '%s' in %s%s%s (expected %s.safetensors, %s.bin or a sharded index)", name,
                 root_label, sep, dir, prefix, bin_prefix);
  g_free (label);
  return SEL_FAIL;
}

/* ---- listing a local folder ------------------------------------------------ */

static void
list_rec (const char *root, const char *rel, GPtrArray *out, int depth)
{
  if (depth > 4)
    return;
  char *path = *rel ? g_build_filename (root, rel, NULL) : g_strdup (root);
  GDir *d = g_dir_open (path, 0, NULL);
  const char *n;
  while (d && (n = g_dir_read_name (d))) {
    char *r = *rel ? g_strdup_printf ("%s/%s", rel, n) : g_strdup (n);
    char *full = g_build_filename (root, r, NULL);
    if (g_file_test (full, G_FILE_TEST_IS_DIR))
      list_rec (root, r, out, depth + 1);
    else
      g_ptr_array_add (out, g_strdup (r));
    g_free (r);
    g_free (full);
  }
  if (d)
    g_dir_close (d);
  g_free (path);
}

static GPtrArray *
list_local (const char *root)
{
  GPtrArray *out = g_ptr_array_new_with_free_func (g_free);
  list_rec (root, "", out, 0);
  return out;
}

/* ---- the component cache ---------------------------------------------------- */

struct _DiffuseComponentCache {
  gint ref_count;
  GMutex lock;
  GHashTable *alive;          /* key -> DiffuseComponent* (weak: removed when finalized) */
  guint64 n_loads, n_hits;
  guint64 resident, peak;
};

struct _DiffuseComponent {
  gint ref_count;
  DiffuseComponentCache *cache;   /* weak; NULL once the cache is gone */
  char *key;
  char *name, *library, *class_name, *folder, *variant;
  DiffuseComponentKind kind;
  DiffuseConfig *config;
  DiffuseWeights *weights;
  char **files;
  DiffuseDType dtype;
  DiffuseDevice *device;
  guint64 bytes;
  GMutex obj_lock;
  GHashTable *objects;            /* key -> ObjEntry */
};

typedef struct {
  gpointer obj;
  GDestroyNotify destroy;
} ObjEntry;

static void
obj_entry_free (gpointer p)
{
  ObjEntry *e = p;
  if (e->destroy && e->obj)
    e->destroy (e->obj);
  g_free (e);
}

DiffuseComponentCache *
diffuse_component_cache_new (void)
{
  DiffuseComponentCache *c = g_new0 (DiffuseComponentCache, 1);
  c->ref_count = 1;
  g_mutex_init (&c->lock);
  c->alive = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  return c;
}

DiffuseComponentCache *
diffuse_component_cache_ref (DiffuseComponentCache *cache)
{
  g_atomic_int_inc (&cache->ref_count);
  return cache;
}

static void
detach_component (gpointer key, gpointer value, gpointer user_data)
{
  DiffuseComponent *c = value;
  c->cache = NULL;
}

void
diffuse_component_cache_unref (DiffuseComponentCache *cache)
{
  if (!cache || !g_atomic_int_dec_and_test (&cache->ref_count))
    return;
  g_mutex_lock (&cache->lock);
  g_hash_table_foreach (cache->alive, detach_component, NULL);
  g_mutex_unlock (&cache->lock);
  g_hash_table_destroy (cache->alive);
  g_mutex_clear (&cache->lock);
  g_free (cache);
}

void
diffuse_component_cache_get_stats (DiffuseComponentCache *cache, DiffuseCacheStats *out)
{
  g_mutex_lock (&cache->lock);
  out->n_components = g_hash_table_size (cache->alive);
  out->n_loads = cache->n_loads;
  out->n_hits = cache->n_hits;
  out->resident_bytes = cache->resident;
  out->peak_bytes = cache->peak;
  g_mutex_unlock (&cache->lock);
}

DiffuseComponent *
diffuse_component_ref (DiffuseComponent *c)
{
  if (c)
    g_atomic_int_inc (&c->ref_count);
  return c;
}

/* The cache's lock guards the refcount drop to zero, so a lookup can never
 * revive a component being finalized. */
void
diffuse_component_unref (DiffuseComponent *c)
{
  if (!c)
    return;
  DiffuseComponentCache *cache = c->cache;
  if (cache) {
    g_mutex_lock (&cache->lock);
    if (!g_atomic_int_dec_and_test (&c->ref_count)) {
      g_mutex_unlock (&cache->lock);
      return;
    }
    if (c->cache) {
      g_hash_table_remove (cache->alive, c->key);
      cache->resident -= c->bytes;
    }
    g_mutex_unlock (&cache->lock);
  } else if (!g_atomic_int_dec_and_test (&c->ref_count)) {
    return;
  }
  if (c->objects)
    g_hash_table_destroy (c->objects);
  g_mutex_clear (&c->obj_lock);
  g_clear_pointer (&c->config, diffuse_config_unref);
  g_clear_pointer (&c->weights, diffuse_weights_unref);
  g_strfreev (c->files);
  g_free (c->key);
  g_free (c->name);
  g_free (c->library);
  g_free (c->class_name);
  g_free (c->folder);
  g_free (c->variant);
  g_free (c);
}

const char *diffuse_component_name (DiffuseComponent *c) { return c->name; }
const char *diffuse_component_library (DiffuseComponent *c) { return c->library; }
const char *diffuse_component_class (DiffuseComponent *c) { return c->class_name; }
DiffuseComponentKind diffuse_component_kind (DiffuseComponent *c) { return c->kind; }
const char *diffuse_component_folder (DiffuseComponent *c) { return c->folder; }
DiffuseConfig *diffuse_component_config (DiffuseComponent *c) { return c->config; }
DiffuseWeights *diffuse_component_weights (DiffuseComponent *c) { return c->weights; }
DiffuseDType diffuse_component_dtype (DiffuseComponent *c) { return c->dtype; }
DiffuseDevice *diffuse_component_device (DiffuseComponent *c) { return c->device; }
const char *const *diffuse_component_files (DiffuseComponent *c) { return (const char *const *) c->files; }
const char *diffuse_component_variant (DiffuseComponent *c) { return c->variant; }
guint64 diffuse_component_bytes (DiffuseComponent *c) { return c->bytes; }

gpointer
diffuse_component_get_object (DiffuseComponent *c, const char *key, DiffuseComponentBuildFunc build,
                              gpointer user_data, GDestroyNotify destroy, GError **error)
{
  g_mutex_lock (&c->obj_lock);
  if (!c->objects)
    c->objects = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, obj_entry_free);
  ObjEntry *e = g_hash_table_lookup (c->objects, key);
  if (!e) {
    gpointer obj = build (c, user_data, error);
    if (obj) {
      e = g_new0 (ObjEntry, 1);
      e->obj = obj;
      e->destroy = destroy;
      g_hash_table_insert (c->objects, g_strdup (key), e);
    }
  }
  g_mutex_unlock (&c->obj_lock);
  return e ? e->obj : NULL;
}

/* Bytes the component's weights occupy once materialised in dtype on its device. */
static guint64
weights_bytes (DiffuseWeights *w, DiffuseDType dtype)
{
  guint n = 0;
  const char **names = diffuse_weights_names (w, &n);
  guint64 total = 0;
  for (guint i = 0; i < n; i++) {
    const DiffuseStEntry *e = diffuse_weights_entry (w, names[i]);
    guint64 numel = 1;
    for (int d = 0; d < e->ndim; d++)
      numel *= (guint64) e->shape[d];
    gboolean floaty = e->dtype == DIFFUSE_ST_F32 || e->dtype == DIFFUSE_ST_F16 || e->dtype == DIFFUSE_ST_BF16 ||
                      e->dtype == DIFFUSE_ST_F64;
    total += floaty ? numel * diffuse_dtype_size (dtype) : e->nbytes;
  }
  g_free (names);
  return total;
}

static char *
file_identity (const char *path)
{
  GStatBuf sb;
  char *real = realpath (path, NULL);
  char *id;
  if (real && g_stat (real, &sb) == 0)
    id = g_strdup_printf ("%s@%" G_GINT64_FORMAT ":%" G_GINT64_FORMAT, real, (gint64) sb.st_size,
                          (gint64) sb.st_mtime);
  else
    id = g_strdup (path);
  free (real);
  return id;
}

/* Loads (or finds in the cache) one component from an absolute folder. */
static DiffuseComponent *
component_from_folder (DiffuseComponentCache *cache, const char *name, const char *library, const char *class_name,
                       DiffuseComponentKind kind, const char *folder, char **weight_files, const char *index_file,
                       const char *variant, DiffuseDType dtype, DiffuseDevice *dev, GError **error)
{
  const char *cfg_name = kind == DIFFUSE_COMPONENT_SCHEDULER   ? "scheduler_config.json"
                         : kind == DIFFUSE_COMPONENT_TOKENIZER ? "tokenizer_config.json"
                         : kind == DIFFUSE_COMPONENT_PROCESSOR ? "preprocessor_config.json"
                                                                : "config.json";
  char *cfg_path = g_build_filename (folder, cfg_name, NULL);
  gboolean cfg_optional = kind == DIFFUSE_COMPONENT_TOKENIZER;
  if (!g_file_test (cfg_path, G_FILE_TEST_IS_REGULAR) && !cfg_optional) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "Component '%s' (%s): %s is missing", name,
                 class_name, cfg_path);
    g_free (cfg_path);
    return NULL;
  }

  /* cache key: class, files (with size and mtime), dtype, device */
  GString *key = g_string_new (NULL);
  /* dtype and device matter only for weights: configs and tokenizers are shared across them */
  if (kind != DIFFUSE_COMPONENT_MODEL)
    dtype = DIFFUSE_DTYPE_F32;
  g_string_append_printf (key, "%s|%s|%s|%s|", class_name,
                          kind == DIFFUSE_COMPONENT_MODEL ? diffuse_dtype_name (dtype) : "-",
                          kind == DIFFUSE_COMPONENT_MODEL ? diffuse_device_name (dev) : "-", name);
  char *id = file_identity (cfg_path);
  g_string_append (key, id);
  g_free (id);
  if (kind == DIFFUSE_COMPONENT_TOKENIZER) {
    id = file_identity (folder);
    g_string_append_printf (key, "|%s", id);
    g_free (id);
  }
  for (int i = 0; weight_files && weight_files[i]; i++) {
    id = file_identity (weight_files[i]);
    g_string_append_printf (key, "|%s", id);
    g_free (id);
  }

  g_mutex_lock (&cache->lock);
  DiffuseComponent *hit = g_hash_table_lookup (cache->alive, key->str);
  if (hit) {
    diffuse_component_ref (hit);
    cache->n_hits++;
    g_mutex_unlock (&cache->lock);
    g_string_free (key, TRUE);
    g_free (cfg_path);
    return hit;
  }
  g_mutex_unlock (&cache->lock);

  DiffuseConfig *cfg = NULL;
  if (g_file_test (cfg_path, G_FILE_TEST_IS_REGULAR)) {
    cfg = diffuse_config_load (cfg_path, error);
    if (!cfg) {
      g_string_free (key, TRUE);
      g_free (cfg_path);
      return NULL;
    }
  } else {
    cfg = diffuse_config_from_string ("{}", cfg_path, NULL);
  }
  g_free (cfg_path);

  DiffuseWeights *w = NULL;
  if (index_file)
    w = diffuse_weights_open_index (index_file, error);
  else if (weight_files)
    w = diffuse_weights_open ((const char *const *) weight_files, error);
  if ((index_file || weight_files) && !w) {
    diffuse_config_unref (cfg);
    g_string_free (key, TRUE);
    return NULL;
  }

  DiffuseComponent *c = g_new0 (DiffuseComponent, 1);
  c->ref_count = 1;
  c->name = g_strdup (name);
  c->library = g_strdup (library);
  c->class_name = g_strdup (class_name);
  c->kind = kind;
  c->folder = g_strdup (folder);
  c->variant = g_strdup (variant);
  c->config = cfg;
  c->weights = w;
  c->files = g_strdupv (weight_files);
  c->dtype = dtype;
  c->device = dev;
  c->bytes = w ? weights_bytes (w, dtype) : 0;
  g_mutex_init (&c->obj_lock);

  g_mutex_lock (&cache->lock);
  /* another thread may have loaded it meanwhile: keep the first */
  hit = g_hash_table_lookup (cache->alive, key->str);
  if (hit) {
    diffuse_component_ref (hit);
    cache->n_hits++;
    g_mutex_unlock (&cache->lock);
    g_string_free (key, TRUE);
    diffuse_component_unref (c);
    return hit;
  }
  c->cache = cache;
  c->key = g_string_free (key, FALSE);
  g_hash_table_insert (cache->alive, g_strdup (c->key), c);
  cache->n_loads++;
  cache->resident += c->bytes;
  if (cache->resident > cache->peak)
    cache->peak = cache->resident;
  g_mutex_unlock (&cache->lock);
  return c;
}

/* ---- model references -------------------------------------------------------- */

/* A local folder, or a Hub repo resolved to its snapshot (downloading what
 * the selection needs).  Owns the file listing of the root. */
typedef struct {
  char *label;          /* what to name in messages: the folder or "repo@revision" */
  char *root;           /* absolute local folder */
  GPtrArray *files;     /* relative paths under root (local) or in the repo (hub) */
  DiffuseHubClient *hub;
  char *repo_id, *revision, *commit;
} ModelRoot;

static void
model_root_clear (ModelRoot *r)
{
  g_free (r->label);
  g_free (r->root);
  if (r->files)
    g_ptr_array_unref (r->files);
  if (r->hub)
    diffuse_hub_client_free (r->hub);
  g_free (r->repo_id);
  g_free (r->revision);
  g_free (r->commit);
  memset (r, 0, sizeof *r);
}

static gboolean
hub_progress_cb (const DiffuseHubProgress *p, gpointer user_data)
{
  const DiffuseLoadParams *params = user_data;
  if (!params->progress)
    return TRUE;
  DiffuseLoadProgress lp = { "download", p->path, p->overall_done, p->overall_total };
  return params->progress (&lp, params->progress_data);
}

static gboolean
model_root_open (ModelRoot *r, const char *ref, const DiffuseLoadParams *params, GError **error)
{
  memset (r, 0, sizeof *r);
  if (!ref || !*ref) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "No model given");
    return FALSE;
  }
  if (g_file_test (ref, G_FILE_TEST_IS_DIR)) {
    char *abs = g_canonicalize_filename (ref, NULL);
    r->root = abs;
    r->label = g_strdup (ref);
    r->files = list_local (abs);
    return TRUE;
  }
  if (g_file_test (ref, G_FILE_TEST_EXISTS)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "Model %s is a file, not a pipeline folder", ref);
    return FALSE;
  }
  if (!diffuse_is_repo_id (ref)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                 "Model \"%s\" is neither an existing folder nor a Hub repo id (org/name)", ref);
    return FALSE;
  }
  DiffuseHubParams hp = diffuse_hub_default_params ();
  hp.endpoint = params->endpoint;
  hp.token = params->token;
  hp.cache_dir = params->cache_dir;
  hp.offline = params->offline;
  hp.cancellable = params->cancellable;
  hp.progress = hub_progress_cb;
  hp.progress_data = (gpointer) params;
  r->hub = diffuse_hub_client_new (&hp, error);
  if (!r->hub)
    return FALSE;
  r->repo_id = g_strdup (ref);
  r->revision = g_strdup (params->revision ? params->revision : "main");
  r->files = diffuse_hub_list_files (r->hub, ref, r->revision, &r->commit, error);
  if (!r->files) {
    model_root_clear (r);
    return FALSE;
  }
  r->label = g_strdup_printf ("%s@%s", ref, r->revision);
  return TRUE;
}

/* Makes sure the relative paths are present locally (downloading from the
 * Hub when needed) and sets r->root. */
static gboolean
model_root_fetch (ModelRoot *r, GPtrArray *paths, GError **error)
{
  if (!r->hub)
    return TRUE;
  g_ptr_array_add (paths, NULL);
  char *snap = diffuse_hub_snapshot_paths (r->hub, r->repo_id, r->commit ? r->commit : r->revision,
                                           (const char *const *) paths->pdata, error);
  g_ptr_array_remove_index (paths, paths->len - 1);
  if (!snap)
    return FALSE;
  g_free (r->root);
  r->root = snap;
  return TRUE;
}

/* ---- component planning ------------------------------------------------------- */

typedef struct {
  char *name, *library, *class_name;
  DiffuseComponentKind kind;
  gboolean absent;             /* [null, null] or overridden with none */
  DiffuseComponent *override;  /* given by the caller */
  WeightChoice weights;
  gboolean used_variant;
} Plan;

static void
plan_free (gpointer p)
{
  Plan *pl = p;
  g_free (pl->name);
  g_free (pl->library);
  g_free (pl->class_name);
  choice_clear (&pl->weights);
  diffuse_component_unref (pl->override);
  g_free (pl);
}

static DiffuseDType
dtype_for (const DiffuseLoadParams *params, const char *name)
{
  gpointer v;
  if (params->component_dtypes) {
    if (g_hash_table_lookup_extended (params->component_dtypes, name, NULL, &v))
      return (DiffuseDType) GPOINTER_TO_INT (v);
    if (g_hash_table_lookup_extended (params->component_dtypes, "default", NULL, &v))
      return (DiffuseDType) GPOINTER_TO_INT (v);
  }
  return params->have_dtype ? params->dtype : DIFFUSE_DTYPE_F32;
}

/* Files of the component folder that a load needs (configs, tokenizer files,
 * chosen weights + shards listed by the index). */
static void
add_needed_files (GPtrArray *need, GPtrArray *files, const Plan *pl)
{
  char *dirp = g_strdup_printf ("%s/", pl->name);
  for (guint i = 0; i < files->len; i++) {
    const char *f = g_ptr_array_index (files, i);
    if (!g_str_has_prefix (f, dirp))
      continue;
    const char *base = f + strlen (dirp);
    gboolean weight = g_str_has_suffix (base, ".safetensors") || g_str_has_suffix (base, ".bin") ||
                      g_str_has_suffix (base, ".ckpt") || g_str_has_suffix (base, ".msgpack") ||
                      g_str_has_suffix (base, ".h5") || g_str_has_suffix (base, ".onnx") ||
                      strstr (base, ".index.") != NULL || g_str_has_suffix (base, ".pb");
    if (!weight && !strchr (base, '/'))
      g_ptr_array_add (need, g_strdup (f));
  }
  if (pl->weights.single)
    g_ptr_array_add (need, g_strdup (pl->weights.single));
  g_free (dirp);
}

/* Shards listed by an index (relative paths), read from a local index file. */
static gboolean
add_index_shards (GPtrArray *need, const char *root, const char *index_rel, GError **error)
{
  char *path = g_build_filename (root, index_rel, NULL);
  DiffuseConfig *ix = diffuse_config_load (path, error);
  g_free (path);
  if (!ix)
    return FALSE;
  JsonNode *wm = diffuse_config_get_node (ix, "weight_map");
  if (!wm || !JSON_NODE_HOLDS_OBJECT (wm)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "%s: no \"weight_map\" object", index_rel);
    diffuse_config_unref (ix);
    return FALSE;
  }
  GHashTable *seen = g_hash_table_new (g_str_hash, g_str_equal);
  char *dir = g_path_get_dirname (index_rel);
  GList *members = json_object_get_members (json_node_get_object (wm));
  for (GList *l = members; l; l = l->next) {
    JsonNode *v = json_object_get_member (json_node_get_object (wm), l->data);
    if (!JSON_NODE_HOLDS_VALUE (v) || json_node_get_value_type (v) != G_TYPE_STRING)
      continue;
    const char *shard = json_node_get_string (v);
    if (g_hash_table_contains (seen, shard))
      continue;
    g_hash_table_add (seen, (gpointer) shard);
    g_ptr_array_add (need, g_strdup_printf ("%s/%s", dir, shard));
  }
  g_list_free (members);
  g_free (dir);
  g_hash_table_destroy (seen);
  diffuse_config_unref (ix);
  return TRUE;
}

/* ---- pipeline models --------------------------------------------------------- */

struct _DiffusePipelineModel {
  gint ref_count;
  char *class_name;
  char *folder;
  DiffuseConfig *index;
  DiffuseComponentCache *cache;
  GPtrArray *names;                 /* char*, NULL-terminated */
  GHashTable *components;           /* name -> DiffuseComponent* (absent: not in table) */
};

static DiffusePipelineModel *
pm_new (const char *class_name, const char *folder, DiffuseConfig *index, DiffuseComponentCache *cache)
{
  DiffusePipelineModel *pm = g_new0 (DiffusePipelineModel, 1);
  pm->ref_count = 1;
  pm->class_name = g_strdup (class_name);
  pm->folder = g_strdup (folder);
  pm->index = diffuse_config_ref (index);
  pm->cache = diffuse_component_cache_ref (cache);
  pm->names = g_ptr_array_new_with_free_func (g_free);
  pm->components = g_hash_table_new_full (g_str_hash, g_str_equal, g_free,
                                          (GDestroyNotify) diffuse_component_unref);
  return pm;
}

DiffusePipelineModel *
diffuse_pipeline_model_ref (DiffusePipelineModel *pm)
{
  g_atomic_int_inc (&pm->ref_count);
  return pm;
}

void
diffuse_pipeline_model_unref (DiffusePipelineModel *pm)
{
  if (!pm || !g_atomic_int_dec_and_test (&pm->ref_count))
    return;
  g_hash_table_destroy (pm->components);
  g_ptr_array_unref (pm->names);
  diffuse_config_unref (pm->index);
  diffuse_component_cache_unref (pm->cache);
  g_free (pm->class_name);
  g_free (pm->folder);
  g_free (pm);
}

const char *diffuse_pipeline_model_class (DiffusePipelineModel *pm) { return pm->class_name; }
const char *diffuse_pipeline_model_folder (DiffusePipelineModel *pm) { return pm->folder; }

/* gst-diffuse.json: see pipeline.h.  Every key is checked before any output
 * is written, so a bad file changes nothing. */
gboolean
diffuse_pipeline_model_suggestions (DiffusePipelineModel *pm, int *num_inference_steps, double *guidance_scale,
                                    int *width, int *height, char **scheduler, GError **error)
{
  g_autofree char *path = g_build_filename (pm->folder, "gst-diffuse.json", NULL);
  if (!g_file_test (path, G_FILE_TEST_EXISTS))
    return TRUE;
  g_autoptr (DiffuseConfig) c = diffuse_config_load (path, error);
  if (!c)
    return FALSE;
  gint64 steps = -1, w = -1, h = -1;
  double guidance = -1;
  const char *sched = NULL;
  if (!diffuse_config_get_int_checked (c, "num_inference_steps", -1, &steps, error) ||
      !diffuse_config_get_double_checked (c, "guidance_scale", -1, &guidance, error) ||
      !diffuse_config_get_int_checked (c, "width", -1, &w, error) ||
      !diffuse_config_get_int_checked (c, "height", -1, &h, error) ||
      !diffuse_config_get_string_checked (c, "scheduler", NULL, &sched, error))
    return FALSE;
  const char *bad = NULL;
  if (diffuse_config_has (c, "num_inference_steps") && (steps < 1 || steps > 1000))
    bad = "num_inference_steps (1..1000)";
  else if (diffuse_config_has (c, "guidance_scale") && !(guidance >= 0 && guidance < 1e6))
    bad = "guidance_scale (>= 0)";
  else if (diffuse_config_has (c, "width") && (w < 8 || w > 8192 || w % 8))
    bad = "width (a multiple of 8, 8..8192)";
  else if (diffuse_config_has (c, "height") && (h < 8 || h > 8192 || h % 8))
    bad = "height (a multiple of 8, 8..8192)";
  else if (diffuse_config_has (c, "scheduler") && (!sched || !*sched))
    bad = "scheduler (a scheduler class name)";
  if (bad) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: value of %s is out of range", path, bad);
    return FALSE;
  }
  if (num_inference_steps && steps > 0)
    *num_inference_steps = (int) steps;
  if (guidance_scale && guidance >= 0)
    *guidance_scale = guidance;
  if (width && w > 0)
    *width = (int) w;
  if (height && h > 0)
    *height = (int) h;
  if (scheduler && sched) {
    g_free (*scheduler);
    *scheduler = g_strdup (sched);
  }
  return TRUE;
}
DiffuseConfig *diffuse_pipeline_model_index (DiffusePipelineModel *pm) { return pm->index; }
DiffuseComponentCache *diffuse_pipeline_model_cache (DiffusePipelineModel *pm) { return pm->cache; }

DiffuseComponent *
diffuse_pipeline_model_get (DiffusePipelineModel *pm, const char *name)
{
  return g_hash_table_lookup (pm->components, name);
}

const char *const *
diffuse_pipeline_model_component_names (DiffusePipelineModel *pm)
{
  return (const char *const *) pm->names->pdata;
}

static void
pm_add (DiffusePipelineModel *pm, const char *name, DiffuseComponent *c)
{
  if (pm->names->len && g_ptr_array_index (pm->names, pm->names->len - 1) == NULL)
    g_ptr_array_remove_index (pm->names, pm->names->len - 1);
  g_ptr_array_add (pm->names, g_strdup (name));
  g_ptr_array_add (pm->names, NULL);
  if (c)
    g_hash_table_insert (pm->components, g_strdup (name), c);
}

static gboolean
check_cancel (const DiffuseLoadParams *params, GError **error)
{
  if (params->cancellable && g_cancellable_is_cancelled (params->cancellable)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "Loading was cancelled");
    return FALSE;
  }
  return TRUE;
}

/* Reads model_index.json entries into plans (no weights yet). */
static GPtrArray *
read_plans (DiffuseConfig *index, const char *label, const char *pipeline_class, const DiffuseLoadParams *params,
            GError **error)
{
  GPtrArray *plans = g_ptr_array_new_with_free_func (plan_free);
  JsonObject *obj = diffuse_config_object (index);
  GList *members = json_object_get_members (obj);
  for (GList *l = members; l; l = l->next) {
    const char *key = l->data;
    if (key[0] == '_')
      continue;
    JsonNode *n = json_object_get_member (obj, key);
    if (!JSON_NODE_HOLDS_ARRAY (n))
      continue;   /* a plain init parameter such as requires_safety_checker */
    const PipelineClass *pcls = find_pipeline_class (pipeline_class);
    if (pcls && !g_strv_contains (pcls->components, key)) {
      /* diffusers warns and never loads keys the class does not take */
      g_warning ("%s/model_index.json: '%s' is not a component of %s; ignored", label, key, pipeline_class);
      continue;
    }
    JsonArray *arr = json_node_get_array (n);
    if (json_array_get_length (arr) != 2) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                   "%s/model_index.json: entry \"%s\" must be [library, class]", label, key);
      goto fail;
    }
    JsonNode *a = json_array_get_element (arr, 0), *b = json_array_get_element (arr, 1);
    Plan *pl = g_new0 (Plan, 1);
    pl->name = g_strdup (key);
    g_ptr_array_add (plans, pl);
    gboolean overridden = params->overrides && g_hash_table_contains (params->overrides, key);
    if (overridden) {
      DiffuseComponent *oc = g_hash_table_lookup (params->overrides, key);
      if (!oc && !diffuse_pipeline_class_is_optional (pipeline_class, key)) {
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                     "Component '%s' cannot be set to none: %s needs it", key, pipeline_class);
        goto fail;
      }
      pl->override = diffuse_component_ref (oc);
      pl->absent = oc == NULL;
      continue;
    }
    if (JSON_NODE_HOLDS_NULL (a) || JSON_NODE_HOLDS_NULL (b)) {
      if (!diffuse_pipeline_class_is_optional (pipeline_class, key)) {
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                     "%s/model_index.json lists component '%s' as [null, null], but %s requires it", label, key,
                     pipeline_class);
        goto fail;
      }
      pl->absent = TRUE;
      continue;
    }
    if (json_node_get_value_type (a) != G_TYPE_STRING || json_node_get_value_type (b) != G_TYPE_STRING) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                   "%s/model_index.json: entry \"%s\" must be [library, class] strings", label, key);
      goto fail;
    }
    pl->library = g_strdup (json_node_get_string (a));
    pl->class_name = g_strdup (json_node_get_string (b));
    if (!class_kind (pl->library, pl->class_name, &pl->kind)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                   "Component '%s' of %s is a %s.%s, which gst-diffuse does not implement", key, label, pl->library,
                   pl->class_name);
      goto fail;
    }
  }
  /* overrides naming components model_index.json does not have are added (diffusers passes them as kwargs) */
  if (params->overrides) {
    GHashTableIter it;
    gpointer k, v;
    g_hash_table_iter_init (&it, params->overrides);
    while (g_hash_table_iter_next (&it, &k, &v)) {
      gboolean found = FALSE;
      for (guint i = 0; i < plans->len && !found; i++)
        found = strcmp (((Plan *) g_ptr_array_index (plans, i))->name, k) == 0;
      if (found)
        continue;
      const PipelineClass *pc = find_pipeline_class (pipeline_class);
      if (pc && !g_strv_contains (pc->components, k)) {
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                     "%s has no component named '%s'", pipeline_class, (const char *) k);
        goto fail;
      }
      Plan *pl = g_new0 (Plan, 1);
      pl->name = g_strdup (k);
      pl->override = diffuse_component_ref (v);
      pl->absent = v == NULL;
      g_ptr_array_add (plans, pl);
    }
  }
  /* every component the class needs must be there (diffusers: "Pipeline ... expected [...], but only
   * {...} were passed") */
  const PipelineClass *pc = find_pipeline_class (pipeline_class);
  for (int i = 0; pc && pc->components[i]; i++) {
    const char *want = pc->components[i];
    if (g_strv_contains (pc->optional, want))
      continue;
    gboolean found = FALSE;
    for (guint j = 0; j < plans->len && !found; j++)
      found = strcmp (((Plan *) g_ptr_array_index (plans, j))->name, want) == 0;
    if (!found) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                   "%s/model_index.json has no component '%s', which %s requires", label, want, pipeline_class);
      goto fail;
    }
  }
  g_list_free (members);
  return plans;

fail:
  g_list_free (members);
  g_ptr_array_unref (plans);
  return NULL;
}

static char **
abs_paths (const char *root, const char *single)
{
  char **v = g_new0 (char *, 2);
  v[0] = g_build_filename (root, single, NULL);
  return v;
}

DiffusePipelineModel *
diffuse_pipeline_model_load (const char *ref, const DiffuseLoadParams *params_in, DiffuseComponentCache *cache_in,
                             GError **error)
{
  DiffuseLoadParams defaults = diffuse_load_default_params ();
  const DiffuseLoadParams *params = params_in ? params_in : &defaults;
  ModelRoot root;
  DiffusePipelineModel *pm = NULL;
  GPtrArray *plans = NULL, *need = NULL;
  DiffuseConfig *index = NULL;
  DiffuseComponentCache *cache = cache_in ? diffuse_component_cache_ref (cache_in) : diffuse_component_cache_new ();

  DiffuseDevice *dev = diffuse_device_get (params->device ? params->device : "cpu", error);
  if (!dev || !model_root_open (&root, ref, params, error)) {
    diffuse_component_cache_unref (cache);
    return NULL;
  }

  /* model_index.json first */
  if (!in_list (root.files, "model_index.json")) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                 "%s has no model_index.json: not a diffusers pipeline (a single model folder loads as a component)",
                 root.label);
    goto out;
  }
  need = g_ptr_array_new_with_free_func (g_free);
  g_ptr_array_add (need, g_strdup ("model_index.json"));
  if (!model_root_fetch (&root, need, error))
    goto out;
  char *index_path = g_build_filename (root.root, "model_index.json", NULL);
  index = diffuse_config_load (index_path, error);
  g_free (index_path);
  if (!index)
    goto out;

  const char *class_name = params->pipeline_class ? params->pipeline_class
                                                  : diffuse_config_get_string (index, "_class_name", NULL);
  if (!class_name) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s/model_index.json has no _class_name", root.label);
    goto out;
  }
  if (!find_pipeline_class (class_name)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s is a %s; gst-diffuse runs StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, "
                 "StableDiffusionSAGPipeline, StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline and "
                 "AnimateDiffPipeline", root.label, class_name);
    goto out;
  }

  plans = read_plans (index, root.label, class_name, params, error);
  if (!plans)
    goto out;

  /* weight selection for every model component, then the variant check */
  guint n_models = 0, n_variant = 0;
  for (guint i = 0; i < plans->len; i++) {
    Plan *pl = g_ptr_array_index (plans, i);
    if (pl->absent || pl->override)
      continue;
    char *dirp = g_strdup_printf ("%s/", pl->name);
    gboolean have_dir = FALSE;
    for (guint f = 0; f < root.files->len && !have_dir; f++)
      have_dir = g_str_has_prefix (g_ptr_array_index (root.files, f), dirp);
    g_free (dirp);
    if (!have_dir) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND,
                   "Component '%s' (%s) listed in %s/model_index.json has no folder %s/", pl->name, pl->class_name,
                   root.label, pl->name);
      goto out;
    }
    if (pl->kind != DIFFUSE_COMPONENT_MODEL)
      continue;
    n_models++;
    SelResult r = select_weights (root.files, root.label, pl->name, pl->name, pl->library, params->variant,
                                  params->use_safetensors, &pl->weights, &pl->used_variant, error);
    if (r == SEL_FAIL)
      goto out;
    if (pl->used_variant)
      n_variant++;
  }
  if (params->variant && n_models > 0 && n_variant == 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_VARIANT,
                 "No component of %s has variant '%s' (no file such as diffusion_pytorch_model.%s.safetensors)",
                 root.label, params->variant, params->variant);
    goto out;
  }
  if (params->variant && n_variant < n_models) {
    GString *mixed = g_string_new (NULL);
    for (guint i = 0; i < plans->len; i++) {
      Plan *pl = g_ptr_array_index (plans, i);
      if (!pl->absent && !pl->override && pl->kind == DIFFUSE_COMPONENT_MODEL && !pl->used_variant)
        g_string_append_printf (mixed, "%s%s", mixed->len ? ", " : "", pl->name);
    }
    g_warning ("%s: variant '%s' not found for %s; loading their default weights instead", root.label,
               params->variant, mixed->str);
    g_string_free (mixed, TRUE);
  }

  /* fetch what is needed (Hub), then shards named by index files */
  if (root.hub) {
    g_ptr_array_set_size (need, 0);
    for (guint i = 0; i < plans->len; i++) {
      Plan *pl = g_ptr_array_index (plans, i);
      if (!pl->absent && !pl->override) {
        add_needed_files (need, root.files, pl);
        if (pl->weights.index)
          g_ptr_array_add (need, g_strdup (pl->weights.index));
      }
    }
    if (!model_root_fetch (&root, need, error))
      goto out;
    g_ptr_array_set_size (need, 0);
    for (guint i = 0; i < plans->len; i++) {
      Plan *pl = g_ptr_array_index (plans, i);
      if (!pl->absent && !pl->override && pl->weights.index &&
          !add_index_shards (need, root.root, pl->weights.index, error))
        goto out;
    }
    if (need->len && !model_root_fetch (&root, need, error))
      goto out;
  }

  pm = pm_new (class_name, root.root, index, cache);
  guint done = 0;
  for (guint i = 0; i < plans->len; i++) {
    Plan *pl = g_ptr_array_index (plans, i);
    if (!check_cancel (params, error))
      goto fail;
    if (pl->absent) {
      pm_add (pm, pl->name, NULL);
      continue;
    }
    if (pl->override) {
      pm_add (pm, pl->name, diffuse_component_ref (pl->override));
      continue;
    }
    if (params->progress) {
      DiffuseLoadProgress lp = { "load", pl->name, done, plans->len };
      if (!params->progress (&lp, params->progress_data)) {
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "Loading was cancelled");
        goto fail;
      }
    }
    char *folder = g_build_filename (root.root, pl->name, NULL);
    char **files = NULL;
    char *index_abs = NULL;
    if (pl->weights.single)
      files = abs_paths (root.root, pl->weights.single);
    if (pl->weights.index)
      index_abs = g_build_filename (root.root, pl->weights.index, NULL);
    if (index_abs) {
      /* the component's files are the shards the index lists */
      GPtrArray *sh = g_ptr_array_new_with_free_func (g_free);
      if (!add_index_shards (sh, root.root, pl->weights.index, error)) {
        g_ptr_array_unref (sh);
        g_free (folder);
        g_free (index_abs);
        goto fail;
      }
      files = g_new0 (char *, sh->len + 1);
      for (guint s = 0; s < sh->len; s++)
        files[s] = g_build_filename (root.root, g_ptr_array_index (sh, s), NULL);
      g_ptr_array_unref (sh);
    }
    DiffuseComponent *c = component_from_folder (cache, pl->name, pl->library, pl->class_name, pl->kind, folder,
                                                 files, index_abs, pl->used_variant ? params->variant : NULL,
                                                 dtype_for (params, pl->name), dev, error);
    g_strfreev (files);
    g_free (folder);
    g_free (index_abs);
    if (!c)
      goto fail;
    pm_add (pm, pl->name, c);
    done++;
  }
  /* only pipelines that take a safety checker (AnimateDiffPipeline has none) */
  const PipelineClass *loaded_class = find_pipeline_class (class_name);
  if (loaded_class && g_strv_contains (loaded_class->components, "safety_checker") &&
      diffuse_config_get_bool (index, "requires_safety_checker", TRUE) && !diffuse_pipeline_model_get (pm, "safety_checker"))
    g_warning ("%s: the safety checker is disabled although the model's configuration asks for it; make sure "
               "generated content is reviewed before it is shown publicly", root.label);
  goto out;

fail:
  g_clear_pointer (&pm, diffuse_pipeline_model_unref);
out:
  if (plans)
    g_ptr_array_unref (plans);
  if (need)
    g_ptr_array_unref (need);
  g_clear_pointer (&index, diffuse_config_unref);
  model_root_clear (&root);
  diffuse_component_cache_unref (cache);
  return pm;
}

DiffusePipelineModel *
diffuse_pipeline_model_derive (DiffusePipelineModel *pm, const char *pipeline_class, GHashTable *overrides,
                               GError **error)
{
  const char *cls = pipeline_class ? pipeline_class : pm->class_name;
  if (!find_pipeline_class (cls)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "Unknown pipeline class %s", cls);
    return NULL;
  }
  DiffusePipelineModel *out = pm_new (cls, pm->folder, pm->index, pm->cache);
  for (guint i = 0; i < pm->names->len && g_ptr_array_index (pm->names, i); i++) {
    const char *name = g_ptr_array_index (pm->names, i);
    if (overrides && g_hash_table_contains (overrides, name))
      continue;
    pm_add (out, name, diffuse_component_ref (diffuse_pipeline_model_get (pm, name)));
  }
  if (overrides) {
    GHashTableIter it;
    gpointer k, v;
    g_hash_table_iter_init (&it, overrides);
    while (g_hash_table_iter_next (&it, &k, &v)) {
      if (!v && !diffuse_pipeline_class_is_optional (cls, k)) {
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                     "Component '%s' cannot be set to none: %s needs it", (const char *) k, cls);
        diffuse_pipeline_model_unref (out);
        return NULL;
      }
      pm_add (out, k, diffuse_component_ref (v));
    }
  }
  return out;
}

DiffuseComponent *
diffuse_component_load (DiffuseComponentCache *cache_in, const char *ref, const char *subfolder, const char *name,
                        const DiffuseLoadParams *params_in, GError **error)
{
  DiffuseLoadParams defaults = diffuse_load_default_params ();
  const DiffuseLoadParams *params = params_in ? params_in : &defaults;
  ModelRoot root;
  DiffuseComponent *c = NULL;
  DiffuseDevice *dev = diffuse_device_get (params->device ? params->device : "cpu", error);
  if (!dev || !model_root_open (&root, ref, params, error))
    return NULL;
  DiffuseComponentCache *cache = cache_in ? diffuse_component_cache_ref (cache_in) : diffuse_component_cache_new ();
  const char *sub = subfolder ? subfolder : "";
  const char *cname = name ? name : (subfolder ? subfolder : "model");
  char *cfg_rel[3] = {
    g_strdup_printf ("%s%sconfig.json", sub, *sub ? "/" : ""),
    g_strdup_printf ("%s%sscheduler_config.json", sub, *sub ? "/" : ""),
    NULL,
  };
  GPtrArray *need = g_ptr_array_new_with_free_func (g_free);
  WeightChoice wc = { 0 };
  DiffuseConfig *cfg = NULL;
  DiffuseComponentKind kind;
  const char *cfg_found = in_list (root.files, cfg_rel[0]) ? cfg_rel[0]
                          : in_list (root.files, cfg_rel[1]) ? cfg_rel[1] : NULL;
  if (!cfg_found) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "%s has no %s (nor %s)", root.label, cfg_rel[0],
                 cfg_rel[1]);
    goto out;
  }
  g_ptr_array_add (need, g_strdup (cfg_found));
  if (!model_root_fetch (&root, need, error))
    goto out;
  char *cfg_path = g_build_filename (root.root, cfg_found, NULL);
  cfg = diffuse_config_load (cfg_path, error);
  g_free (cfg_path);
  if (!cfg)
    goto out;
  const char *cls = diffuse_config_get_string (cfg, "_class_name", NULL);
  if (!cls) {
    /* transformers configs name the class in "architectures" */
    char **arch = diffuse_config_get_string_array (cfg, "architectures");
    if (arch && arch[0]) {
      char *tmp = g_strdup (arch[0]);
      g_strfreev (arch);
      JsonObject *o = diffuse_config_object (cfg);
      json_object_set_string_member (o, "_gst_diffuse_class", tmp);
      g_free (tmp);
      cls = diffuse_config_get_string (cfg, "_gst_diffuse_class", NULL);
    } else {
      g_strfreev (arch);
    }
  }
  if (!cls || !class_kind (NULL, cls, &kind)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s/%s: unknown or missing class (%s)", root.label,
                 cfg_found, cls ? cls : "none");
    goto out;
  }
  const char *library = g_str_has_prefix (cls, "CLIP") || g_str_has_prefix (cls, "StableDiffusionSafety")
                        ? "transformers" : "diffusers";
  gboolean used_variant = FALSE;
  if (kind == DIFFUSE_COMPONENT_MODEL) {
    if (select_weights (root.files, root.label, cname, sub, library, params->variant, params->use_safetensors, &wc,
                        &used_variant, error) == SEL_FAIL)
      goto out;
    if (params->variant && !used_variant) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_VARIANT, "%s%s%s has no variant '%s' weights", root.label,
                   *sub ? "/" : "", sub, params->variant);
      goto out;
    }
  }
  g_ptr_array_set_size (need, 0);
  if (wc.single)
    g_ptr_array_add (need, g_strdup (wc.single));
  if (wc.index)
    g_ptr_array_add (need, g_strdup (wc.index));
  if (root.hub) {
    /* small config files next to the component (tokenizer files etc.) */
    char *dirp = *sub ? g_strdup_printf ("%s/", sub) : g_strdup ("");
    for (guint i = 0; i < root.files->len; i++) {
      const char *f = g_ptr_array_index (root.files, i);
      if (g_str_has_prefix (f, dirp) && !strchr (f + strlen (dirp), '/') &&
          (g_str_has_suffix (f, ".json") || g_str_has_suffix (f, ".txt")) && !strstr (f, ".index."))
        g_ptr_array_add (need, g_strdup (f));
    }
    g_free (dirp);
  }
  if (need->len && !model_root_fetch (&root, need, error))
    goto out;
  char **files = NULL;
  char *index_abs = NULL;
  if (wc.single)
    files = abs_paths (root.root, wc.single);
  if (wc.index) {
    GPtrArray *sh = g_ptr_array_new_with_free_func (g_free);
    if (!add_index_shards (sh, root.root, wc.index, error) || (root.hub && !model_root_fetch (&root, sh, error))) {
      g_ptr_array_unref (sh);
      goto out;
    }
    files = g_new0 (char *, sh->len + 1);
    for (guint s = 0; s < sh->len; s++)
      files[s] = g_build_filename (root.root, g_ptr_array_index (sh, s), NULL);
    g_ptr_array_unref (sh);
    index_abs = g_build_filename (root.root, wc.index, NULL);
  }
  char *folder = *sub ? g_build_filename (root.root, sub, NULL) : g_strdup (root.root);
  c = component_from_folder (cache, cname, library, cls, kind, folder, files, index_abs,
                             used_variant ? params->variant : NULL, dtype_for (params, cname), dev, error);
  g_free (folder);
  g_strfreev (files);
  g_free (index_abs);

out:
  choice_clear (&wc);
  g_clear_pointer (&cfg, diffuse_config_unref);
  g_ptr_array_unref (need);
  g_free (cfg_rel[0]);
  g_free (cfg_rel[1]);
  model_root_clear (&root);
  diffuse_component_cache_unref (cache);
  return c;
}

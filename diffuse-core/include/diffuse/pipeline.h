/* gst-diffuse — loading a diffusers pipeline folder or Hub repo, the
 * component cache, and saving a pipeline back (save_pretrained).
 *
 * Model versus context (llama.cpp's split): a DiffuseComponent is immutable
 * once loaded (config + weights + an optional built model object) and is
 * shared, refcounted, through a DiffuseComponentCache: two pipelines naming
 * the same component files with the same dtype and device get the same
 * object (diffusers' from_pipe).  Everything mutable lives in the task
 * pipelines built on top (text2img, img2img, animate).
 *
 * The rules follow diffusers' DiffusionPipeline.from_pretrained; docs/loading-rules.md
 * states them in full. */
#pragma once

#include <diffuse/tensor.h>
#include <diffuse/safetensors.h>
#include <diffuse/config.h>

G_BEGIN_DECLS

typedef struct _DiffuseComponent DiffuseComponent;
typedef struct _DiffuseComponentCache DiffuseComponentCache;
typedef struct _DiffusePipelineFiles DiffusePipelineFiles;

typedef enum {
  DIFFUSE_COMPONENT_MODEL,      /* config.json + weights (unet, vae, text_encoder, ...) */
  DIFFUSE_COMPONENT_SCHEDULER,  /* scheduler_config.json */
  DIFFUSE_COMPONENT_TOKENIZER,  /* vocab/merges/tokenizer_config */
  DIFFUSE_COMPONENT_PROCESSOR,  /* preprocessor_config.json (feature_extractor) */
} DiffuseComponentKind;

typedef enum {
  /* PyTorch .bin weights are read without executing them, as
   * torch.load(weights_only=True) (diffuse_safetensors_open) */
  DIFFUSE_SAFETENSORS_AUTO = 0, /* use_safetensors=None: safetensors, else the .bin weights */
  DIFFUSE_SAFETENSORS_REQUIRE,  /* use_safetensors=True: safetensors only */
  DIFFUSE_SAFETENSORS_ALLOW_BIN,/* use_safetensors=False: the .bin weights only, as diffusers */
} DiffuseSafetensorsMode;

/* Progress of a load: downloads (bytes) and component loads (index/count). */
typedef struct {
  const char *stage;       /* "download" or "load" */
  const char *what;        /* file (download) or component name (load) */
  guint64 done, total;     /* bytes for downloads, components for loads */
} DiffuseLoadProgress;
typedef gboolean (*DiffuseLoadProgressFunc) (const DiffuseLoadProgress *p, gpointer user_data);

typedef struct {
  const char *revision;           /* Hub revision (NULL = main) */
  const char *variant;            /* "fp16", "non_ema", ... or NULL */
  gboolean have_dtype;            /* FALSE: float32, as diffusers without torch_dtype */
  DiffuseDType dtype;             /* for every model component ... */
  GHashTable *component_dtypes;   /* ... unless named here: char* -> GINT_TO_POINTER(DiffuseDType) ("default" key allowed) */
  DiffuseSafetensorsMode use_safetensors;
  const char *device;             /* "cpu", "auto", "cuda:N" (NULL = cpu) */
  const char *pipeline_class;     /* load as this class (e.g. "StableDiffusionImg2ImgPipeline"); NULL = _class_name */
  GHashTable *overrides;          /* char* name -> DiffuseComponent* (loaded elsewhere), or NULL value = "none" */
  gboolean offline;               /* also $HF_HUB_OFFLINE */
  const char *cache_dir;          /* Hub cache (NULL = the huggingface_hub rules) */
  const char *endpoint;           /* NULL = $HF_ENDPOINT / default */
  const char *token;              /* NULL = $HF_TOKEN / token file */
  DiffuseLoadProgressFunc progress;
  gpointer progress_data;
  GCancellable *cancellable;
} DiffuseLoadParams;

DiffuseLoadParams diffuse_load_default_params (void);

/* ---- component cache -------------------------------------------------- */

DiffuseComponentCache *diffuse_component_cache_new (void);
DiffuseComponentCache *diffuse_component_cache_ref (DiffuseComponentCache *cache);
void diffuse_component_cache_unref (DiffuseComponentCache *cache);

typedef struct {
  guint n_components;        /* alive in the cache now */
  guint64 n_loads;           /* components loaded from files so far */
  guint64 n_hits;            /* requests served by an already loaded component */
  guint64 resident_bytes;    /* bytes held by alive components (owned + mapped) */
  guint64 peak_bytes;        /* high-water mark of resident_bytes */
} DiffuseCacheStats;

void diffuse_component_cache_get_stats (DiffuseComponentCache *cache, DiffuseCacheStats *out);

/* ---- components ----------------------------------------------------------- */

DiffuseComponent *diffuse_component_ref (DiffuseComponent *c);
void diffuse_component_unref (DiffuseComponent *c);

const char *diffuse_component_name (DiffuseComponent *c);        /* "unet" */
const char *diffuse_component_library (DiffuseComponent *c);     /* "diffusers" */
const char *diffuse_component_class (DiffuseComponent *c);       /* "UNet2DConditionModel" */
DiffuseComponentKind diffuse_component_kind (DiffuseComponent *c);
const char *diffuse_component_folder (DiffuseComponent *c);
DiffuseConfig *diffuse_component_config (DiffuseComponent *c);   /* borrowed */
DiffuseWeights *diffuse_component_weights (DiffuseComponent *c); /* borrowed; NULL unless a model */
DiffuseDType diffuse_component_dtype (DiffuseComponent *c);
DiffuseDevice *diffuse_component_device (DiffuseComponent *c);
/* The weight files chosen (NULL-terminated, borrowed) and the variant used (NULL = none). */
const char *const *diffuse_component_files (DiffuseComponent *c);
const char *diffuse_component_variant (DiffuseComponent *c);
/* Bytes of weights this component keeps (converted copies + mapped bytes). */
guint64 diffuse_component_bytes (DiffuseComponent *c);

/* A built object (e.g. the DiffuseUNet for this component), made once and
 * shared by every pipeline using the component.  build() is called under
 * the component's lock the first time; later calls return the same object. */
typedef gpointer (*DiffuseComponentBuildFunc) (DiffuseComponent *c, gpointer user_data, GError **error);
gpointer diffuse_component_get_object (DiffuseComponent *c, const char *key, DiffuseComponentBuildFunc build,
                                       gpointer user_data, GDestroyNotify destroy, GError **error);

/* Loads a single component from a folder (diffusers' Model.from_pretrained(folder)
 * or from_pretrained(root, subfolder=name)): e.g. a VAE from another repo.
 * ref may be a local folder or a Hub repo id; subfolder may be NULL. */
DiffuseComponent *diffuse_component_load (DiffuseComponentCache *cache, const char *ref, const char *subfolder,
                                          const char *name, const DiffuseLoadParams *params, GError **error);

/* ---- pipelines ------------------------------------------------------------ */

typedef struct _DiffusePipelineModel DiffusePipelineModel;

/* Loads every component model_index.json lists (through the cache).  ref is
 * a local folder or a Hub repo id.  cache may be NULL (a private one). */
DiffusePipelineModel *diffuse_pipeline_model_load (const char *ref, const DiffuseLoadParams *params,
                                                   DiffuseComponentCache *cache, GError **error);
DiffusePipelineModel *diffuse_pipeline_model_ref (DiffusePipelineModel *pm);
void diffuse_pipeline_model_unref (DiffusePipelineModel *pm);

/* The class asked for, or model_index.json's _class_name. */
const char *diffuse_pipeline_model_class (DiffusePipelineModel *pm);
const char *diffuse_pipeline_model_folder (DiffusePipelineModel *pm);
DiffuseConfig *diffuse_pipeline_model_index (DiffusePipelineModel *pm);    /* borrowed */
/* Component by name; NULL when absent ([null, null] or "none"). */
DiffuseComponent *diffuse_pipeline_model_get (DiffusePipelineModel *pm, const char *name);
/* Names in model_index.json order (NULL-terminated, borrowed). */
const char *const *diffuse_pipeline_model_component_names (DiffusePipelineModel *pm);
DiffuseComponentCache *diffuse_pipeline_model_cache (DiffusePipelineModel *pm);

/* A new pipeline model sharing pm's components, with some replaced
 * (overrides: name -> component or NULL = none) and/or another class
 * (diffusers' from_pipe).  No file is read for the shared components. */
DiffusePipelineModel *diffuse_pipeline_model_derive (DiffusePipelineModel *pm, const char *pipeline_class,
                                                     GHashTable *overrides, GError **error);

/* Generation settings a model folder suggests in an optional gst-diffuse.json
 * beside model_index.json (the bundled model has one: it is trained for 20
 * DPM-Solver++ steps at guidance 5, not diffusers' 50 / 7.5).  Keys:
 * num_inference_steps (1..1000), guidance_scale (>= 0), width, height
 * (multiples of 8, 8..8192), scheduler (a class name).  Those present are
 * written to the non-NULL outputs (*scheduler: a new string); the others are
 * left as they are.  No file: TRUE, nothing written.  A file that is not
 * JSON: FALSE with DIFFUSE_ERROR_CORRUPT; a key of the wrong type or range:
 * FALSE with DIFFUSE_ERROR_CONFIG; both name the file (and key), and
 * nothing is written. */
gboolean diffuse_pipeline_model_suggestions (DiffusePipelineModel *pm, int *num_inference_steps,
                                             double *guidance_scale, int *width, int *height, char **scheduler,
                                             GError **error);

/* Optional components of a pipeline class (those that may be [null, null]). */
gboolean diffuse_pipeline_class_is_optional (const char *pipeline_class, const char *component);
/* Known pipeline classes this build can run. */
gboolean diffuse_pipeline_class_is_known (const char *pipeline_class);

/* ---- saving (save_pretrained) --------------------------------------------- */

typedef struct {
  const char *variant;        /* label on weight files, or NULL */
  guint64 max_shard_size;     /* bytes; 0 = one file per component */
  gboolean have_dtype;        /* convert weights to dtype when saving */
  DiffuseDType dtype;
} DiffuseSaveParams;

DiffuseSaveParams diffuse_save_default_params (void);
/* Writes model_index.json, each component's config files and weights, so
 * that diffusers' from_pretrained(folder[, variant]) loads it. */
gboolean diffuse_pipeline_model_save (DiffusePipelineModel *pm, const char *folder, const DiffuseSaveParams *params,
                                      GError **error);

G_END_DECLS

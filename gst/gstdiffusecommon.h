/* gst-diffuse — what diffusetext2img and diffuseimg2img share: the model and
 * generation properties, loading a model through the shared component
 * cache, running one generation with progress and cancellation, and the
 * mapping of core errors to GStreamer errors.
 *
 * Element messages posted on the bus (all GST_MESSAGE_ELEMENT):
 *   "diffuse-progress"  step (int), total (int), frame (guint64) — one per denoising step
 *   "diffuse-download"  file (string), bytes (guint64), total-bytes (guint64) — Hub downloads
 *   "diffuse-load"      component (string), done (guint64), total (guint64) — components loaded
 *   "diffuse-nsfw"      frame (guint64) — the model's safety checker flagged this frame, which
 *                       leaves black (diffusers' has_nsfw_concept); a warning is posted too
 */
#pragma once

#include <gst/gst.h>
#include <gst/video/video.h>
#include <gst/base/gstbasesrc.h>
#include <diffuse/pipeline.h>
#include <diffuse/sd.h>

G_BEGIN_DECLS

/* Property ids shared by both elements; element-specific ones start at
 * GST_DIFFUSE_PROP_LAST. */
enum {
  GST_DIFFUSE_PROP_0,
  GST_DIFFUSE_PROP_MODEL,
  GST_DIFFUSE_PROP_REVISION,
  GST_DIFFUSE_PROP_VARIANT,
  GST_DIFFUSE_PROP_DTYPE,
  GST_DIFFUSE_PROP_DEVICE,
  GST_DIFFUSE_PROP_SCHEDULER,
  GST_DIFFUSE_PROP_PROMPT,
  GST_DIFFUSE_PROP_NEGATIVE_PROMPT,
  GST_DIFFUSE_PROP_NUM_INFERENCE_STEPS,
  GST_DIFFUSE_PROP_GUIDANCE_SCALE,
  GST_DIFFUSE_PROP_SEED,
  GST_DIFFUSE_PROP_SEED_INCREMENT,
  GST_DIFFUSE_PROP_CLIP_SKIP,
  GST_DIFFUSE_PROP_STRENGTH,        /* installed by diffuseimg2img only */
  GST_DIFFUSE_PROP_RESIDENT_BYTES,
  GST_DIFFUSE_PROP_LOAD_COUNT,
  GST_DIFFUSE_PROP_SAFETY_CHECKER,  /* not installed by diffuseanimate (AnimateDiff has none) */
  GST_DIFFUSE_PROP_SAG_SCALE,       /* not installed by diffuseanimate */
  GST_DIFFUSE_PROP_LORA,            /* diffuseanimate applies it itself (a motion LoRA too) */
  GST_DIFFUSE_PROP_LORA_SCALE,
  GST_DIFFUSE_PROP_IP_ADAPTER,
  GST_DIFFUSE_PROP_IP_ADAPTER_SUBFOLDER,
  GST_DIFFUSE_PROP_IP_ADAPTER_WEIGHT_NAME,
  GST_DIFFUSE_PROP_IP_ADAPTER_IMAGE,
  GST_DIFFUSE_PROP_IP_ADAPTER_SCALE,
  GST_DIFFUSE_PROP_VAE,             /* a VAE from another folder / repo (component override) */
  GST_DIFFUSE_PROP_VAE_SUBFOLDER,
  GST_DIFFUSE_PROP_AESTHETIC_SCORE,           /* these two: diffuseimg2img only (an SDXL refiner) */
  GST_DIFFUSE_PROP_NEGATIVE_AESTHETIC_SCORE,
  GST_DIFFUSE_PROP_LAST
};

typedef enum {
  GST_DIFFUSE_DTYPE_FLOAT32,
  GST_DIFFUSE_DTYPE_FLOAT16,
  GST_DIFFUSE_DTYPE_BFLOAT16,
} GstDiffuseDType;

#define GST_TYPE_DIFFUSE_DTYPE (gst_diffuse_dtype_get_type ())
GType gst_diffuse_dtype_get_type (void);

#define GST_DIFFUSE_DEFAULT_STEPS 50
#define GST_DIFFUSE_DEFAULT_GUIDANCE 7.5
#define GST_DIFFUSE_DEFAULT_STRENGTH 0.8
#define GST_DIFFUSE_DEFAULT_DEVICE "auto"

/* Settings, guarded by the element's object lock. */
typedef struct {
  gchar *model, *revision, *variant, *device, *scheduler;
  gchar *lora;              /* "PATH[:WEIGHT],..." (diffuse_sd_load_lora_spec), NULL = none */
  gchar *ip_adapter, *ip_adapter_subfolder, *ip_adapter_weight_name, *ip_adapter_image;
  gchar *vae, *vae_subfolder; /* vae=AutoencoderKL.from_pretrained (vae, subfolder=...), NULL = the model's */
  GstDiffuseDType dtype;
  gchar *prompt, *negative_prompt;
  gint num_inference_steps;
  gdouble guidance_scale;
  gint64 seed;              /* -1: random, chosen at start */
  gint64 seed_increment;
  gint clip_skip;
  gdouble strength;
  gdouble aesthetic_score, negative_aesthetic_score;   /* an SDXL refiner's time ids (6, 2.5) */
  gboolean safety_checker;  /* run the model's safety checker (loaded without it when FALSE) */
  gdouble sag_scale;        /* self-attention guidance, 0 = off */
  gdouble lora_scale;       /* multiplies every LoRA adapter's weight (1) */
  gdouble ip_adapter_scale; /* set_ip_adapter_scale (1) */
  guint user_set;           /* GST_DIFFUSE_SET_*: set by the user, so the model's suggestion does not apply */
} GstDiffuseSettings;

/* Properties whose default the model folder may suggest (gst-diffuse.json,
 * diffuse_pipeline_model_suggestions): the suggestion applies while the
 * property was never set. */
enum {
  GST_DIFFUSE_SET_STEPS = 1 << 0,
  GST_DIFFUSE_SET_GUIDANCE = 1 << 1,
  GST_DIFFUSE_SET_SCHEDULER = 1 << 2,
};

void gst_diffuse_settings_copy (GstDiffuseSettings *dst, const GstDiffuseSettings *src);
void gst_diffuse_settings_clear (GstDiffuseSettings *s);

typedef struct {
  GstElement *element;            /* not owned */
  DiffuseSDTask task;
  gboolean model_only;            /* load the pipeline model only, no DiffuseSD (diffuseanimate
                                   * builds its own pipeline: the model may be an AnimateDiff one) */
  GstDiffuseSettings settings;    /* object lock */
  DiffuseComponentCache *cache;   /* object lock; from the context */
  GCancellable *cancellable;      /* object lock; replaced by set_flushing (FALSE) */
  gboolean flushing;              /* object lock */
  guint64 random_seed;            /* chosen at start when seed = -1 */
  /* streaming side (set in start, cleared in stop) */
  DiffusePipelineModel *pm;
  DiffuseSD *sd;
  DiffuseImage *ip_image;         /* the decoded ip-adapter-image, or NULL */
  gint default_width, default_height;
  /* the model folder's suggestions (object lock; -1 / NULL: none) */
  gint suggested_steps;
  gdouble suggested_guidance;
  gchar *suggested_scheduler;
  GstClockTime last_gen_time;     /* wall time of the last generation */
  guint64 progress_frame;         /* frame number for progress messages */
} GstDiffuseState;

/* The bundled model folder: DIFFUSE_DATADIR/tiny-sd when installed, else
 * the source tree's data/tiny-sd (a new string). */
gchar *gst_diffuse_default_model (void);

void gst_diffuse_state_init (GstDiffuseState *st, GstElement *element, DiffuseSDTask task,
                             gint64 default_seed_increment);
void gst_diffuse_state_finalize (GstDiffuseState *st);

/* Installs the shared properties (strength only when with_strength,
 * safety-checker and sag-scale only when with_safety_checker: the SD elements). */
/* The IP-Adapter's image prompt from a file: PNG by the core, anything else
 * through decodebin; NULL with *error set when it cannot be read. */
DiffuseImage *gst_diffuse_load_image_file (const char *path, GError **error);

/* The ip-adapter* settings s on a pipeline: the image prompt decoded, then
 * load (the pipeline's load_ip_adapter) called on target; on success
 * st->ip_image holds the image.  FALSE with *error set (no image given, an
 * unreadable file, the adapter's error). */
typedef gboolean (*GstDiffuseIpLoadFunc) (gpointer target, const char *ref, const char *subfolder,
                                          const char *weight_name, GError **error);
gboolean gst_diffuse_state_load_ip_adapter (GstDiffuseState *st, const GstDiffuseSettings *s,
                                            GstDiffuseIpLoadFunc load, gpointer target, GError **error);

void gst_diffuse_install_properties (GObjectClass *klass, gboolean with_strength, gboolean with_safety_checker,
                                     gint64 default_seed_increment);
/* TRUE when prop_id is one of the shared properties (then handled). */
gboolean gst_diffuse_state_set_property (GstDiffuseState *st, guint prop_id, const GValue *value, GParamSpec *pspec);
gboolean gst_diffuse_state_get_property (GstDiffuseState *st, guint prop_id, GValue *value, GParamSpec *pspec);

/* Snapshot of the settings under the object lock (clear it with
 * gst_diffuse_settings_clear), with the loaded model's suggested steps,
 * guidance and scheduler in place of those the user did not set. */
void gst_diffuse_state_snapshot (GstDiffuseState *st, GstDiffuseSettings *out);

/* Loads the model (finding or creating the shared cache first).  Posts an
 * element error and returns FALSE on failure. */
gboolean gst_diffuse_state_load (GstDiffuseState *st);
void gst_diffuse_state_unload (GstDiffuseState *st);

/* Interrupts a running load or generation (between steps) and makes the next
 * ones fail as flushing until set_flushing (FALSE). */
void gst_diffuse_state_set_flushing (GstDiffuseState *st, gboolean flushing);
gboolean gst_diffuse_state_is_flushing (GstDiffuseState *st);

/* The seed of frame n. */
guint64 gst_diffuse_frame_seed (GstDiffuseState *st, const GstDiffuseSettings *s, guint64 n);

/* Generates one image.  NULL with *ret = GST_FLOW_FLUSHING when cancelled,
 * or GST_FLOW_ERROR after posting an element error. */
DiffuseImage *gst_diffuse_state_generate (GstDiffuseState *st, const GstDiffuseSettings *s, int width, int height,
                                          const DiffuseImage *input, guint64 frame, GstFlowReturn *ret);

/* Writes an image into a mapped video frame of any supported format
 * (RGB directly, others through a GstVideoConverter). */
gboolean gst_diffuse_image_to_frame (const DiffuseImage *img, GstVideoFrame *frame);

/* ---- what the two sources (diffusetext2img, diffuseanimate) share ---- */

/* Fixates a truncated caps structure: the size nearest width x height, the
 * rate nearest fps_n/fps_d, PAR 1/1, the first format, and colorimetry
 * sRGB for RGB formats, BT.601 for YUV unless downstream asks otherwise. */
void gst_diffuse_src_fixate (GstStructure *s, gint width, gint height, gint fps_n, gint fps_d);
/* Parses negotiated caps into *info; a CORE/NEGOTIATION error (naming the
 * size) when unparsable, without a framerate > 0 if need_fps, or not a
 * multiple of 8. */
gboolean gst_diffuse_src_parse_caps (GstElement *src, GstCaps *caps, gboolean need_fps, GstVideoInfo *info);
/* decide_allocation's pool: downstream's video pool or a new one, with
 * GstVideoMeta always on; a RESOURCE/SETTINGS error when it cannot be set
 * up.  The caller chains up afterwards. */
gboolean gst_diffuse_src_configure_pool (GstElement *src, GstQuery *query, gsize frame_size);
/* The queries both sources answer alike: CONTEXT (the shared cache),
 * LATENCY when live (*latency), CONVERT (with *info) and DURATION in TIME
 * (total_frames at info's rate; G_MAXUINT64 = unknown).  *info and *latency
 * are read under the object lock.  TRUE when answered here, with *result
 * the query's result; FALSE: chain up. */
gboolean gst_diffuse_src_query (GstBaseSrc *src, GstDiffuseState *st, GstQuery *query, const GstVideoInfo *info,
                                const GstClockTime *latency, guint64 total_frames, gboolean *result);
/* Reads a mapped video frame of any supported format into an image. */
DiffuseImage *gst_diffuse_image_from_frame (const GstVideoFrame *frame);

/* Posts err as an element error: the domain and code follow err's
 * DiffuseErrorCode; the user text is "<what>: <err message>"; debug
 * names the model settings. */
void gst_diffuse_post_error_full (GstElement *element, const GError *err, const gchar *what, const gchar *debug,
                                  const gchar *file, const gchar *function, gint line);
#define gst_diffuse_post_error(el, err, what, debug) \
  gst_diffuse_post_error_full (GST_ELEMENT_CAST (el), (err), (what), (debug), __FILE__, GST_FUNCTION, __LINE__)
/* The GStreamer error domain and code for a core error. */
void gst_diffuse_error_to_gst (const GError *err, GQuark *domain, gint *code);

/* Caps: the formats both elements accept/produce. */
#define GST_DIFFUSE_VIDEO_FORMATS "{ RGB, RGBA, BGRx, BGRA, I420, NV12 }"

G_END_DECLS

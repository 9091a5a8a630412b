/* gst-diffuse — diffuseanimate
 *
 * SECTION:element-diffuseanimate
 *
 * Generates video clips from a text prompt with an AnimateDiff pipeline:
 * a Stable Diffusion model in the diffusers format (property "model", as
 * diffusetext2img) plus a MotionAdapter ("motion-adapter": a local folder
 * or a Hub repository id such as guoyww/animatediff-motion-adapter-v1-5-2).
 * Each clip has "num-frames" frames; each buffer is one frame at the caps
 * framerate (default 8/1), with timestamps and offsets continuous across
 * clips.
 *
 * |[
 * gst-launch-1.0 diffuseanimate prompt="waves on a beach" clips=1 ! videoconvert ! x264enc ! mp4mux ! filesink location=clip.mp4
 * ]|
 *
 * "model" may also be an AnimateDiff pipeline (model_index.json class
 * AnimateDiffPipeline, e.g. a folder diffusers' save_pretrained wrote): with
 * "motion-adapter" unset it runs as AnimateDiffPipeline.from_pretrained
 * (model) does: when its unet is a UNetMotionModel, with the unet's own
 * motion modules (its motion_adapter/ is not used), else with its
 * motion_adapter.  Setting "motion-adapter" as well does what
 * AnimateDiffPipeline.from_pipe (pipe, motion_adapter=...) does: the
 * adapter replaces a 2-D unet's motion_adapter, and is ignored (a warning
 * says so) when the unet is a UNetMotionModel.
 *
 * A clip is generated (all its frames at once) when the frames of the
 * previous one have all been pushed; clip k uses seed + k * seed-increment
 * and the prompt current when it starts.  "clips" = N > 0 makes N clips and
 * then EOS; "clips" = 0 makes one clip, or clips without end with "loop".
 *
 * The model is loaded through the shared component cache (GstContext
 * "gst.diffuse.cache"), so a diffusetext2img on the same model in the same
 * pipeline shares every Stable Diffusion component: only the adapter adds
 * resident bytes.
 *
 * Non-live, frame n is at n / framerate and a seek regenerates the clip
 * holding the target frame.  Live (is-live=true), a clip's frames are
 * timestamped from the running time at which its generation started (or
 * right after the previous clip's frames when generation keeps up), and the
 * LATENCY query answers the longest clip generation time seen.  Frames
 * leave while the next clip is generated only if a queue follows.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include "gstdiffuseanimate.h"
#include "gstdiffusecontext.h"
#include "diffuse-config.h"

#include <diffuse/error.h>

GST_DEBUG_CATEGORY_STATIC (gst_diffuse_animate_debug);
#define GST_CAT_DEFAULT gst_diffuse_animate_debug

enum {
  PROP_IS_LIVE = GST_DIFFUSE_PROP_LAST,
  PROP_MOTION_ADAPTER,
  PROP_NUM_FRAMES,
  PROP_LOOP,
  PROP_CLIPS,
};

#define DEFAULT_IS_LIVE FALSE
#define DEFAULT_SEED_INCREMENT 1
#define DEFAULT_NUM_FRAMES 16
#define DEFAULT_LOOP FALSE
#define DEFAULT_CLIPS 0
#define DEFAULT_FPS_N 8
#define DEFAULT_FPS_D 1
#define BUNDLED_ADAPTER "tiny-motion-adapter"

#define SRC_CAPS                                                              \
  "video/x-raw, format = (string) " GST_DIFFUSE_VIDEO_FORMATS ", "            \
  "width = (int) [ 8, 16384 ], height = (int) [ 8, 16384 ], "                 \
  "framerate = (fraction) [ 1/2147483647, 2147483647/1 ], "                   \
  "pixel-aspect-ratio = (fraction) 1/1"

static GstStaticPadTemplate src_template =
    GST_STATIC_PAD_TEMPLATE ("src", GST_PAD_SRC, GST_PAD_ALWAYS, GST_STATIC_CAPS (SRC_CAPS));

#define gst_diffuse_animate_parent_class parent_class
G_DEFINE_TYPE (GstDiffuseAnimate, gst_diffuse_animate, GST_TYPE_PUSH_SRC);
GST_ELEMENT_REGISTER_DEFINE (diffuseanimate, "diffuseanimate", GST_RANK_NONE, GST_TYPE_DIFFUSE_ANIMATE);

static gboolean
animate_load_ip (gpointer anim, const char *ref, const char *subfolder, const char *weight_name, GError **error)
{
  return diffuse_animate_load_ip_adapter (anim, ref, subfolder, weight_name, error);
}

/* The bundled adapter folder (installed, else the source tree's), or NULL
 * when neither exists. */
static gchar *
default_adapter (void)
{
  gchar *p = g_build_filename (DIFFUSE_DATADIR, BUNDLED_ADAPTER, NULL);
  if (g_file_test (p, G_FILE_TEST_IS_DIR))
    return p;
  g_free (p);
  p = g_build_filename (DIFFUSE_SRC_DATADIR, BUNDLED_ADAPTER, NULL);
  if (g_file_test (p, G_FILE_TEST_IS_DIR))
    return p;
  g_free (p);
  return NULL;
}

/* ---- properties ------------------------------------------------------------- */

/* READY-only properties: refused (with a warning) in PAUSED/PLAYING. */
static gboolean
can_change_now (GstDiffuseAnimate *self, GParamSpec *pspec)
{
  GST_OBJECT_LOCK (self);
  GstState state = GST_STATE (self);
  GST_OBJECT_UNLOCK (self);
  if (state > GST_STATE_READY) {
    GST_ELEMENT_WARNING (self, LIBRARY, SETTINGS,
        ("Property \"%s\" can only be changed in the NULL or READY state", pspec->name),
        ("element is in state %s", gst_element_state_get_name (state)));
    return FALSE;
  }
  return TRUE;
}

static void
gst_diffuse_animate_set_property (GObject *object, guint prop_id, const GValue *value, GParamSpec *pspec)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (object);
  if (gst_diffuse_state_set_property (&self->st, prop_id, value, pspec))
    return;
  switch (prop_id) {
    case PROP_IS_LIVE:
      gst_base_src_set_live (GST_BASE_SRC (self), g_value_get_boolean (value));
      break;
    case PROP_MOTION_ADAPTER: {
      if (!can_change_now (self, pspec))
        break;
      const gchar *v = g_value_get_string (value);
      GST_OBJECT_LOCK (self);
      g_free (self->motion_adapter);
      self->motion_adapter = (v && *v) ? g_strdup (v) : NULL;
      GST_OBJECT_UNLOCK (self);
      break;
    }
    case PROP_NUM_FRAMES:
      if (!can_change_now (self, pspec))
        break;
      GST_OBJECT_LOCK (self);
      self->num_frames = g_value_get_int (value);
      GST_OBJECT_UNLOCK (self);
      break;
    case PROP_LOOP:
      GST_OBJECT_LOCK (self);
      self->loop = g_value_get_boolean (value);
      GST_OBJECT_UNLOCK (self);
      break;
    case PROP_CLIPS:
      GST_OBJECT_LOCK (self);
      self->clips = g_value_get_uint (value);
      GST_OBJECT_UNLOCK (self);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
      break;
  }
}

static void
gst_diffuse_animate_get_property (GObject *object, guint prop_id, GValue *value, GParamSpec *pspec)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (object);
  if (gst_diffuse_state_get_property (&self->st, prop_id, value, pspec))
    return;
  switch (prop_id) {
    case PROP_IS_LIVE:
      g_value_set_boolean (value, gst_base_src_is_live (GST_BASE_SRC (self)));
      break;
    case PROP_MOTION_ADAPTER:
      GST_OBJECT_LOCK (self);
      if (self->motion_adapter)
        g_value_set_string (value, self->motion_adapter);
      else
        g_value_take_string (value, default_adapter ());
      GST_OBJECT_UNLOCK (self);
      break;
    case PROP_NUM_FRAMES:
      GST_OBJECT_LOCK (self);
      g_value_set_int (value, self->num_frames);
      GST_OBJECT_UNLOCK (self);
      break;
    case PROP_LOOP:
      GST_OBJECT_LOCK (self);
      g_value_set_boolean (value, self->loop);
      GST_OBJECT_UNLOCK (self);
      break;
    case PROP_CLIPS:
      GST_OBJECT_LOCK (self);
      g_value_set_uint (value, self->clips);
      GST_OBJECT_UNLOCK (self);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
      break;
  }
}

static void
clear_queue (GstDiffuseAnimate *self)
{
  g_clear_pointer (&self->queue, g_ptr_array_unref);
}

static void
gst_diffuse_animate_finalize (GObject *object)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (object);
  clear_queue (self);
  g_clear_pointer (&self->anim, diffuse_animate_unref);
  gst_diffuse_state_finalize (&self->st);
  g_free (self->motion_adapter);
  G_OBJECT_CLASS (parent_class)->finalize (object);
}

static void
gst_diffuse_animate_set_context (GstElement *element, GstContext *context)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (element);
  gst_diffuse_handle_set_context (element, context, &self->st.cache);
  GST_ELEMENT_CLASS (parent_class)->set_context (element, context);
}

/* Clips to make before EOS (G_MAXUINT64: no end). */
static guint64
clip_limit (GstDiffuseAnimate *self)
{
  GST_OBJECT_LOCK (self);
  guint64 n = self->clips > 0 ? self->clips : (self->loop ? G_MAXUINT64 : 1);
  GST_OBJECT_UNLOCK (self);
  return n;
}

/* ---- caps ------------------------------------------------------------------- */

static GstCaps *
gst_diffuse_animate_fixate (GstBaseSrc *bsrc, GstCaps *caps)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (bsrc);
  int dw = self->st.default_width > 0 ? self->st.default_width : 512;
  int dh = self->st.default_height > 0 ? self->st.default_height : 512;

  caps = gst_caps_truncate (gst_caps_make_writable (caps));
  gst_diffuse_src_fixate (gst_caps_get_structure (caps, 0), dw, dh, DEFAULT_FPS_N, DEFAULT_FPS_D);
  GST_DEBUG_OBJECT (self, "fixating to model default %dx%d: %" GST_PTR_FORMAT, dw, dh, caps);
  return GST_BASE_SRC_CLASS (parent_class)->fixate (bsrc, caps);
}

static gboolean
gst_diffuse_animate_set_caps (GstBaseSrc *bsrc, GstCaps *caps)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (bsrc);
  GstVideoInfo info;

  if (!gst_diffuse_src_parse_caps (GST_ELEMENT (self), caps, TRUE, &info))
    return FALSE;
  GST_OBJECT_LOCK (self);
  /* frames already made at another size cannot be pushed any more: the
   * rest of the clip is made again at the new size */
  if (info.width != self->info.width || info.height != self->info.height)
    clear_queue (self);
  self->info = info;
  GST_OBJECT_UNLOCK (self);
  GST_INFO_OBJECT (self, "negotiated %" GST_PTR_FORMAT, caps);
  return TRUE;
}

static gboolean
gst_diffuse_animate_decide_allocation (GstBaseSrc *bsrc, GstQuery *query)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (bsrc);
  GST_OBJECT_LOCK (self);
  gsize size = self->info.size;
  GST_OBJECT_UNLOCK (self);
  if (!gst_diffuse_src_configure_pool (GST_ELEMENT (self), query, size))
    return FALSE;
  return GST_BASE_SRC_CLASS (parent_class)->decide_allocation (bsrc, query);
}

/* ---- queries, seeking ------------------------------------------------------- */

static gboolean
gst_diffuse_animate_query (GstBaseSrc *bsrc, GstQuery *query)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (bsrc);
  guint64 clips = clip_limit (self), total = G_MAXUINT64;
  if (clips != G_MAXUINT64 && self->clip_frames > 0)
    total = clips * (guint64) self->clip_frames;
  gboolean res;
  if (gst_diffuse_src_query (bsrc, &self->st, query, &self->info, &self->latency, total, &res))
    return res;
  return GST_BASE_SRC_CLASS (parent_class)->query (bsrc, query);
}

static gboolean
gst_diffuse_animate_is_seekable (GstBaseSrc *bsrc)
{
  return !gst_base_src_is_live (bsrc);
}

static gboolean
gst_diffuse_animate_do_seek (GstBaseSrc *bsrc, GstSegment *segment)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (bsrc);

  if (segment->rate < 0)
    return FALSE;
  segment->time = segment->start;
  GST_OBJECT_LOCK (self);
  guint64 n = 0;
  if (self->info.fps_n > 0)
    n = gst_util_uint64_scale (segment->position, self->info.fps_n, self->info.fps_d * GST_SECOND);
  /* the clip in the queue stays valid if the target frame is in it */
  if (self->clip_frames <= 0 || !self->queue || n / self->clip_frames != self->queue_clip)
    clear_queue (self);
  self->n_frames = n;
  GST_OBJECT_UNLOCK (self);
  GST_DEBUG_OBJECT (self, "seek to %" GST_TIME_FORMAT ": frame %" G_GUINT64_FORMAT,
                    GST_TIME_ARGS (segment->position), n);
  return TRUE;
}

static void
gst_diffuse_animate_get_times (GstBaseSrc *bsrc, GstBuffer *buffer, GstClockTime *start, GstClockTime *end)
{
  /* downstream syncs; the source itself never waits on the clock */
  *start = GST_CLOCK_TIME_NONE;
  *end = GST_CLOCK_TIME_NONE;
}

/* ---- start/stop, unlock ------------------------------------------------------- */

/* Adapter load progress, posted as the model's (see gstdiffusecommon.h). */
static gboolean
adapter_progress (const DiffuseLoadProgress *p, gpointer user_data)
{
  GstDiffuseAnimate *self = user_data;
  GstStructure *s;
  if (g_strcmp0 (p->stage, "download") == 0)
    s = gst_structure_new ("diffuse-download", "file", G_TYPE_STRING, p->what, "bytes", G_TYPE_UINT64, p->done,
                           "total-bytes", G_TYPE_UINT64, p->total, NULL);
  else
    s = gst_structure_new ("diffuse-load", "component", G_TYPE_STRING, p->what, "done", G_TYPE_UINT64, p->done,
                           "total", G_TYPE_UINT64, p->total, NULL);
  gst_element_post_message (GST_ELEMENT (self), gst_message_new_element (GST_OBJECT (self), s));
  return !gst_diffuse_state_is_flushing (&self->st);
}

/* The motion modules of a model that is an AnimateDiff pipeline itself (a
 * folder AnimateDiffPipeline.save_pretrained wrote): diffuse_animate_new ()
 * on it, as diffusers' AnimateDiffPipeline.from_pretrained. */
static DiffuseAnimate *
animate_from_model (GstDiffuseAnimate *self, GError **error)
{
  gst_diffuse_global_lock ();
  DiffuseAnimate *anim = diffuse_animate_new (self->st.pm, error);
  gst_diffuse_global_unlock ();
  return anim;
}

/* An SD pipeline (or an AnimateDiff one whose unet is 2-D) plus the adapter
 * `adapter`: AnimateDiffPipeline.from_pipe (pipe, motion_adapter=adapter). */
static DiffuseAnimate *
animate_from_pipe (GstDiffuseAnimate *self, const gchar *adapter, GError **error)
{
  /* the adapter goes into the same component cache as the SD model, in
   * the dtype and on the device of its UNet (as the core's default), with
   * progress messages and cancellation as the model's load */
  DiffuseLoadParams lp = diffuse_load_default_params ();
  DiffuseComponent *unet = diffuse_pipeline_model_get (self->st.pm, "unet");
  if (unet) {
    lp.have_dtype = TRUE;
    lp.dtype = diffuse_component_dtype (unet);
    lp.device = diffuse_device_name (diffuse_component_device (unet));
  }
  lp.progress = adapter_progress;
  lp.progress_data = self;
  GST_OBJECT_LOCK (self);
  lp.cancellable = g_object_ref (self->st.cancellable);
  GST_OBJECT_UNLOCK (self);
  GstClockTime t0 = gst_util_get_timestamp ();
  gst_diffuse_global_lock ();
  DiffuseComponent *ad = diffuse_animate_load_adapter (self->st.pm, adapter, &lp, error);
  gst_diffuse_global_unlock ();
  g_object_unref (lp.cancellable);
  DiffuseAnimate *anim = NULL;
  if (ad) {
    anim = diffuse_animate_new_from_pipe (self->st.pm, ad, error);
    GST_INFO_OBJECT (self, "motion adapter %s: %" G_GUINT64_FORMAT " bytes, loaded in %" GST_TIME_FORMAT, adapter,
                     diffuse_component_bytes (ad), GST_TIME_ARGS (gst_util_get_timestamp () - t0));
    diffuse_component_unref (ad);
  }
  return anim;
}

static gboolean
gst_diffuse_animate_start (GstBaseSrc *bsrc)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (bsrc);
  GError *err = NULL;

  GST_OBJECT_LOCK (self);
  gst_video_info_init (&self->info);
  clear_queue (self);
  self->n_frames = 0;
  self->live_base = GST_CLOCK_TIME_NONE;
  self->live_base_frame = 0;
  self->live_next_pts = GST_CLOCK_TIME_NONE;
  self->latency = 0;
  self->clip_frames = self->num_frames;
  gchar *adapter = self->motion_adapter ? g_strdup (self->motion_adapter) : NULL;
  GST_OBJECT_UNLOCK (self);

  gst_diffuse_state_set_flushing (&self->st, FALSE);
  if (!gst_diffuse_state_load (&self->st)) {
    g_free (adapter);
    return FALSE;
  }

  /* Which motion modules, as diffusers decides:
   *  - the model is an AnimateDiff pipeline and no motion-adapter is set:
   *    AnimateDiffPipeline.from_pretrained (model), i.e. the unet's own motion
   *    modules (unet a UNetMotionModel) or the model's motion_adapter;
   *  - its unet is a UNetMotionModel and motion-adapter is set as well:
   *    from_pipe (pipe, motion_adapter=...) keeps the unet's motion modules and
   *    never uses the adapter, so it is not loaded;
   *  - otherwise (a Stable Diffusion model, or an AnimateDiff one with a 2-D
   *    unet): from_pipe with the motion-adapter, or the bundled adapter. */
  const gboolean ad_model = g_strcmp0 (diffuse_pipeline_model_class (self->st.pm), "AnimateDiffPipeline") == 0;
  const gboolean own_motion = diffuse_animate_model_has_motion_unet (self->st.pm);
  if (own_motion && adapter) {
    GST_WARNING_OBJECT (self,
        "motion-adapter \"%s\" is not used: the model %s is an AnimateDiff pipeline whose unet is a "
        "UNetMotionModel with its own motion modules (diffusers' AnimateDiffPipeline.from_pipe (pipe, "
        "motion_adapter=...) keeps them too)", adapter, diffuse_pipeline_model_folder (self->st.pm));
    g_clear_pointer (&adapter, g_free);
  }
  DiffuseAnimate *anim = NULL;
  gchar *source = NULL;          /* the motion modules' origin, for messages */
  if (ad_model && !adapter) {
    source = g_strdup_printf ("the model's own %s", own_motion ? "UNetMotionModel" : "motion_adapter");
    GST_INFO_OBJECT (self, "AnimateDiff pipeline %s: using %s", diffuse_pipeline_model_folder (self->st.pm),
                     source);
    anim = animate_from_model (self, &err);
  } else {
    if (!adapter)
      adapter = default_adapter ();
    if (!adapter) {
      gchar *a = g_build_filename (DIFFUSE_DATADIR, BUNDLED_ADAPTER, NULL);
      gchar *b = g_build_filename (DIFFUSE_SRC_DATADIR, BUNDLED_ADAPTER, NULL);
      GST_ELEMENT_ERROR (self, RESOURCE, NOT_FOUND,
          ("No motion adapter is set (property \"motion-adapter\": a MotionAdapter folder or Hub repository id) "
           "and the bundled adapter is not installed"),
          ("looked for the bundled adapter in %s and %s", a, b));
      g_free (a);
      g_free (b);
      gst_diffuse_state_unload (&self->st);
      return FALSE;
    }
    if (ad_model)
      GST_INFO_OBJECT (self, "AnimateDiff pipeline %s: its motion_adapter replaced by %s (from_pipe)",
                       diffuse_pipeline_model_folder (self->st.pm), adapter);
    source = g_strdup_printf ("motion adapter \"%s\"", adapter);
    anim = animate_from_pipe (self, adapter, &err);
  }
  g_free (adapter);
  if (!anim) {
    if (gst_diffuse_state_is_flushing (&self->st)) {
      GST_DEBUG_OBJECT (self, "adapter load cancelled");
    } else {
      gchar *what = g_strdup_printf ("Could not load %s", source);
      gchar *dbg = g_strdup_printf ("model=%s", diffuse_pipeline_model_folder (self->st.pm));
      gst_diffuse_post_error (self, err, what, dbg);
      g_free (what);
      g_free (dbg);
    }
    g_clear_error (&err);
    g_free (source);
    gst_diffuse_state_unload (&self->st);
    return FALSE;
  }

  /* LoRA adapters (a motion LoRA's motion_modules go to the adapter) */
  GST_OBJECT_LOCK (self);
  gchar *lora = g_strdup (self->st.settings.lora);
  GST_OBJECT_UNLOCK (self);
  if (lora && !diffuse_animate_load_lora_spec (anim, lora, &err)) {
    gchar *what = g_strdup_printf ("Could not load the LoRA adapters \"%s\"", lora);
    gst_diffuse_post_error (self, err, what, NULL);
    g_free (what);
    g_free (lora);
    g_clear_error (&err);
    g_free (source);
    diffuse_animate_unref (anim);
    gst_diffuse_state_unload (&self->st);
    return FALSE;
  }
  g_free (lora);

  /* IP-Adapter (the guide's pipe_animate.load_ip_adapter + ip_adapter_image) */
  GstDiffuseSettings s;
  GST_OBJECT_LOCK (self);
  gst_diffuse_settings_copy (&s, &self->st.settings);
  GST_OBJECT_UNLOCK (self);
  if (s.ip_adapter && !gst_diffuse_state_load_ip_adapter (&self->st, &s, animate_load_ip, anim, &err)) {
    gchar *what = g_strdup_printf ("Could not use the IP-Adapter \"%s\"", s.ip_adapter);
    gst_diffuse_post_error (self, err, what, NULL);
    g_free (what);
    g_clear_error (&err);
    gst_diffuse_settings_clear (&s);
    g_free (source);
    diffuse_animate_unref (anim);
    gst_diffuse_state_unload (&self->st);
    return FALSE;
  }
  gst_diffuse_settings_clear (&s);

  int max = diffuse_animate_max_frames (anim);
  if (self->clip_frames > max) {
    GST_ELEMENT_ERROR (self, LIBRARY, SETTINGS,
        ("num-frames is %d but %s takes at most %d frames per clip", self->clip_frames, source, max),
        ("motion_max_seq_length %d", max));
    diffuse_animate_unref (anim);
    g_free (source);
    gst_diffuse_state_unload (&self->st);
    return FALSE;
  }
  g_free (source);
  diffuse_animate_default_size (anim, &self->st.default_width, &self->st.default_height);
  self->anim = anim;
  return TRUE;
}

static gboolean
gst_diffuse_animate_stop (GstBaseSrc *bsrc)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (bsrc);
  GST_OBJECT_LOCK (self);
  clear_queue (self);
  GST_OBJECT_UNLOCK (self);
  g_clear_pointer (&self->anim, diffuse_animate_unref);
  gst_diffuse_state_unload (&self->st);
  return TRUE;
}

static gboolean
gst_diffuse_animate_unlock (GstBaseSrc *bsrc)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (bsrc);
  GST_DEBUG_OBJECT (self, "unlock: interrupting generation");
  gst_diffuse_state_set_flushing (&self->st, TRUE);
  return TRUE;
}

static gboolean
gst_diffuse_animate_unlock_stop (GstBaseSrc *bsrc)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (bsrc);
  GST_DEBUG_OBJECT (self, "unlock_stop");
  gst_diffuse_state_set_flushing (&self->st, FALSE);
  return TRUE;
}

/* ---- generation --------------------------------------------------------------- */

typedef struct {
  GstDiffuseAnimate *self;
  guint64 clip, first_frame;
} StepData;

static gboolean
on_step (int step, int total, gpointer user_data)
{
  StepData *d = user_data;
  GstStructure *s = gst_structure_new ("diffuse-progress", "step", G_TYPE_INT, step, "total", G_TYPE_INT, total,
                                       "frame", G_TYPE_UINT64, d->first_frame, "clip", G_TYPE_UINT64, d->clip, NULL);
  gst_element_post_message (GST_ELEMENT (d->self), gst_message_new_element (GST_OBJECT (d->self), s));
  return !gst_diffuse_state_is_flushing (&d->self->st);
}

static gboolean
scheduler_ok (DiffuseAnimate *anim, const char *name)
{
  if (!name || g_strcmp0 (name, diffuse_animate_scheduler_class (anim)) == 0)
    return TRUE;
  const char *const *compat = diffuse_animate_compatible_schedulers (anim);
  for (guint i = 0; compat && compat[i]; i++)
    if (g_strcmp0 (compat[i], name) == 0)
      return TRUE;
  return FALSE;
}

/* Generates clip number clip: a new array of DiffuseImage*, or NULL with
 * *ret FLUSHING (cancelled) or ERROR (posted). */
static GPtrArray *
generate_clip (GstDiffuseAnimate *self, const GstVideoInfo *info, guint64 clip, GstFlowReturn *ret)
{
  GstDiffuseSettings s;
  GError *err = NULL;
  GPtrArray *frames = NULL;

  *ret = GST_FLOW_ERROR;
  gst_diffuse_state_snapshot (&self->st, &s);
  if (!scheduler_ok (self->anim, s.scheduler)) {
    const char *const *compat = diffuse_animate_compatible_schedulers (self->anim);
    gchar *list = compat ? g_strjoinv (", ", (gchar **) compat) : g_strdup ("");
    GST_ELEMENT_ERROR (self, LIBRARY, SETTINGS,
        ("Scheduler \"%s\" is not compatible with model \"%s\"; use one of: %s", s.scheduler, s.model, list),
        ("its scheduler %s", diffuse_animate_scheduler_class (self->anim)));
    g_free (list);
    goto out;
  }

  StepData sd = { self, clip, clip * (guint64) self->clip_frames };
  DiffuseAnimateParams p;
  diffuse_animate_default_params (&p);
  p.prompt = s.prompt ? s.prompt : "";
  p.negative_prompt = s.negative_prompt;
  p.width = GST_VIDEO_INFO_WIDTH (info);
  p.height = GST_VIDEO_INFO_HEIGHT (info);
  p.num_frames = self->clip_frames;
  p.num_inference_steps = s.num_inference_steps;
  p.guidance_scale = (float) s.guidance_scale;
  p.lora_scale = (float) s.lora_scale;
  if (diffuse_animate_has_ip_adapter (self->anim)) {
    diffuse_animate_set_ip_adapter_scale (self->anim, (float) s.ip_adapter_scale);
    p.ip_adapter_image = self->st.ip_image;
  }
  p.seed = gst_diffuse_frame_seed (&self->st, &s, clip);
  p.clip_skip = s.clip_skip;
  p.scheduler = s.scheduler;
  p.on_step = on_step;
  p.user_data = &sd;
  GST_OBJECT_LOCK (self);
  p.cancellable = g_object_ref (self->st.cancellable);
  GST_OBJECT_UNLOCK (self);

  GST_DEBUG_OBJECT (self, "clip %" G_GUINT64_FORMAT ": %d frames %dx%d, %d steps, guidance %g, seed %" G_GUINT64_FORMAT
                    ", prompt \"%s\"", clip, p.num_frames, p.width, p.height, p.num_inference_steps,
                    p.guidance_scale, p.seed, p.prompt);
  GstClockTime t0 = gst_util_get_timestamp ();
  frames = diffuse_animate_generate (self->anim, &p, &err);
  g_object_unref (p.cancellable);
  if (frames && (int) frames->len != self->clip_frames) {
    g_set_error (&err, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%u frames instead of %d", frames->len,
                 self->clip_frames);
    g_clear_pointer (&frames, g_ptr_array_unref);
  }
  if (!frames) {
    if (g_error_matches (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED) ||
        g_error_matches (err, G_IO_ERROR, G_IO_ERROR_CANCELLED) || gst_diffuse_state_is_flushing (&self->st)) {
      GST_DEBUG_OBJECT (self, "generation of clip %" G_GUINT64_FORMAT " cancelled", clip);
      *ret = GST_FLOW_FLUSHING;
    } else {
      gchar *dbg = g_strdup_printf ("model=%s clip=%" G_GUINT64_FORMAT, s.model, clip);
      gst_diffuse_post_error (self, err, "Could not generate a clip", dbg);
      g_free (dbg);
    }
    g_clear_error (&err);
    goto out;
  }
  self->st.last_gen_time = gst_util_get_timestamp () - t0;
  GST_INFO_OBJECT (self, "clip %" G_GUINT64_FORMAT " generated in %" GST_TIME_FORMAT, clip,
                   GST_TIME_ARGS (self->st.last_gen_time));
  *ret = GST_FLOW_OK;

out:
  gst_diffuse_settings_clear (&s);
  return frames;
}

/* Live: the running time now, or NONE without a clock. */
static GstClockTime
running_time_now (GstDiffuseAnimate *self)
{
  GstClock *clock = gst_element_get_clock (GST_ELEMENT (self));
  if (!clock)
    return GST_CLOCK_TIME_NONE;
  GstClockTime now = gst_clock_get_time (clock);
  GstClockTime base = gst_element_get_base_time (GST_ELEMENT (self));
  gst_object_unref (clock);
  return now > base ? now - base : 0;
}

static GstFlowReturn
gst_diffuse_animate_fill (GstPushSrc *psrc, GstBuffer *buffer)
{
  GstDiffuseAnimate *self = GST_DIFFUSE_ANIMATE (psrc);
  gboolean live = gst_base_src_is_live (GST_BASE_SRC (self));
  GstFlowReturn ret = GST_FLOW_OK;
  GstVideoInfo info;

  GST_OBJECT_LOCK (self);
  info = self->info;
  GST_OBJECT_UNLOCK (self);
  if (GST_VIDEO_INFO_FORMAT (&info) == GST_VIDEO_FORMAT_UNKNOWN || info.fps_n <= 0)
    return GST_FLOW_NOT_NEGOTIATED;
  if (gst_diffuse_state_is_flushing (&self->st))
    return GST_FLOW_FLUSHING;

  const guint64 index = self->n_frames;
  const guint64 clip = index / self->clip_frames;
  const guint in_clip = index % self->clip_frames;
  if (clip >= clip_limit (self)) {
    GST_DEBUG_OBJECT (self, "all clips made: EOS");
    return GST_FLOW_EOS;
  }
  const GstClockTime frame_dur = gst_util_uint64_scale (GST_SECOND, info.fps_d, info.fps_n);

  GST_OBJECT_LOCK (self);
  gboolean have = self->queue != NULL && self->queue_clip == clip;
  GST_OBJECT_UNLOCK (self);
  if (!have) {
    GstClockTime gen_start = GST_CLOCK_TIME_NONE;
    if (live)
      gen_start = running_time_now (self);
    /* controlled properties follow the clip's first frame */
    GstClockTime ctrl_ts = live ? gen_start : gst_util_uint64_scale (index, info.fps_d * GST_SECOND, info.fps_n);
    if (GST_CLOCK_TIME_IS_VALID (ctrl_ts))
      gst_object_sync_values (GST_OBJECT (self), ctrl_ts);

    GPtrArray *frames = generate_clip (self, &info, clip, &ret);
    if (!frames)
      return ret;
    GST_OBJECT_LOCK (self);
    clear_queue (self);
    self->queue = frames;
    self->queue_clip = clip;
    GST_OBJECT_UNLOCK (self);

    if (live) {
      /* the clip's first frame is due when its generation started, or
       * right after the previous clip when generation keeps up */
      GstClockTime base = gen_start;
      if (GST_CLOCK_TIME_IS_VALID (self->live_next_pts) &&
          (!GST_CLOCK_TIME_IS_VALID (base) || self->live_next_pts > base))
        base = self->live_next_pts;
      self->live_base = GST_CLOCK_TIME_IS_VALID (base) ? base : 0;
      self->live_base_frame = index;
      /* latency: the longest time a clip took to make */
      GstClockTime gen = self->st.last_gen_time;
      gboolean post = FALSE;
      GST_OBJECT_LOCK (self);
      if (GST_CLOCK_TIME_IS_VALID (gen) && gen > self->latency) {
        self->latency = gen;
        post = TRUE;
      }
      GST_OBJECT_UNLOCK (self);
      if (post) {
        GST_INFO_OBJECT (self, "latency now %" GST_TIME_FORMAT, GST_TIME_ARGS (gen));
        gst_element_post_message (GST_ELEMENT (self), gst_message_new_latency (GST_OBJECT (self)));
      }
    }
  }

  GST_OBJECT_LOCK (self);
  const DiffuseImage *img = self->queue ? g_ptr_array_index (self->queue, in_clip) : NULL;
  GST_OBJECT_UNLOCK (self);
  if (!img)
    return GST_FLOW_FLUSHING;   /* renegotiated meanwhile: made again next time */

  GstVideoFrame frame;
  if (!gst_video_frame_map (&frame, &info, buffer, GST_MAP_WRITE)) {
    GST_ELEMENT_ERROR (self, RESOURCE, WRITE, ("Could not map the output buffer"), (NULL));
    return GST_FLOW_ERROR;
  }
  gboolean ok = gst_diffuse_image_to_frame (img, &frame);
  gst_video_frame_unmap (&frame);
  if (!ok) {
    GST_ELEMENT_ERROR (self, CORE, FAILED, ("Could not convert the frame to %s", gst_video_format_to_string (
                                                 GST_VIDEO_INFO_FORMAT (&info))), (NULL));
    return GST_FLOW_ERROR;
  }

  GstClockTime pts, duration;
  if (live) {
    pts = self->live_base + gst_util_uint64_scale (index - self->live_base_frame, info.fps_d * GST_SECOND, info.fps_n);
    duration = frame_dur;
    self->live_next_pts = pts + duration;
  } else {
    pts = gst_util_uint64_scale (index, info.fps_d * GST_SECOND, info.fps_n);
    duration = gst_util_uint64_scale (index + 1, info.fps_d * GST_SECOND, info.fps_n) - pts;
  }
  GST_BUFFER_PTS (buffer) = pts;
  GST_BUFFER_DTS (buffer) = GST_CLOCK_TIME_NONE;
  GST_BUFFER_DURATION (buffer) = duration;
  GST_BUFFER_OFFSET (buffer) = index;
  GST_BUFFER_OFFSET_END (buffer) = index + 1;
  self->n_frames = index + 1;
  if (in_clip + 1 == (guint) self->clip_frames) {
    /* the clip is out: free its frames before the next one is made */
    GST_OBJECT_LOCK (self);
    clear_queue (self);
    GST_OBJECT_UNLOCK (self);
  }
  GST_LOG_OBJECT (self, "frame %" G_GUINT64_FORMAT " (clip %" G_GUINT64_FORMAT " frame %u) pts %" GST_TIME_FORMAT
                  " duration %" GST_TIME_FORMAT, index, clip, in_clip, GST_TIME_ARGS (pts), GST_TIME_ARGS (duration));
  return GST_FLOW_OK;
}

/* ---- class --------------------------------------------------------------------- */

static void
gst_diffuse_animate_class_init (GstDiffuseAnimateClass *klass)
{
  GObjectClass *gobject_class = G_OBJECT_CLASS (klass);
  GstElementClass *element_class = GST_ELEMENT_CLASS (klass);
  GstBaseSrcClass *basesrc_class = GST_BASE_SRC_CLASS (klass);
  GstPushSrcClass *pushsrc_class = GST_PUSH_SRC_CLASS (klass);

  GST_DEBUG_CATEGORY_INIT (gst_diffuse_animate_debug, "diffuseanimate", 0, "diffuse AnimateDiff video source");

  gobject_class->set_property = gst_diffuse_animate_set_property;
  gobject_class->get_property = gst_diffuse_animate_get_property;
  gobject_class->finalize = gst_diffuse_animate_finalize;

  gst_diffuse_install_properties (gobject_class, FALSE, FALSE, DEFAULT_SEED_INCREMENT);
  g_object_class_install_property (gobject_class, PROP_IS_LIVE,
      g_param_spec_boolean ("is-live", "Is live",
          "Act as a live source: a clip's frames are timestamped from the running time at which it is made",
          DEFAULT_IS_LIVE, G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS | GST_PARAM_MUTABLE_READY));
  gchar *def_adapter = default_adapter ();
  g_object_class_install_property (gobject_class, PROP_MOTION_ADAPTER,
      g_param_spec_string ("motion-adapter", "Motion adapter",
          "An AnimateDiff MotionAdapter: a local folder or a Hugging Face Hub repository id "
          "(e.g. \"guoyww/animatediff-motion-adapter-v1-5-2\"); the default is the bundled tiny adapter, "
          "when installed.  Unset with a model that is an AnimateDiff pipeline: the model's own motion "
          "modules; ignored (with a warning) when that model's unet is a UNetMotionModel, as diffusers' "
          "from_pipe does",
          def_adapter, G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS | GST_PARAM_MUTABLE_READY));
  g_free (def_adapter);
  g_object_class_install_property (gobject_class, PROP_NUM_FRAMES,
      g_param_spec_int ("num-frames", "Frames per clip",
          "Frames of each clip (at most the adapter's motion_max_seq_length)",
          1, 1024, DEFAULT_NUM_FRAMES, G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS | GST_PARAM_MUTABLE_READY));
  g_object_class_install_property (gobject_class, PROP_LOOP,
      g_param_spec_boolean ("loop", "Loop",
          "Generate a new clip when one ends (with the next seed and the current prompt), without end "
          "unless \"clips\" is set",
          DEFAULT_LOOP, G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS | GST_PARAM_MUTABLE_PLAYING));
  g_object_class_install_property (gobject_class, PROP_CLIPS,
      g_param_spec_uint ("clips", "Clips",
          "Number of clips to make before EOS (0 = one clip, or no end with \"loop\")",
          0, G_MAXUINT, DEFAULT_CLIPS, G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS | GST_PARAM_MUTABLE_PLAYING));

  gst_element_class_set_static_metadata (element_class, "Diffusion AnimateDiff video source", "Source/Video",
      "Generates video clips from a text prompt with a diffusers Stable Diffusion pipeline and an AnimateDiff "
      "motion adapter", "gst-diffuse developers");
  gst_element_class_add_static_pad_template (element_class, &src_template);
  element_class->set_context = GST_DEBUG_FUNCPTR (gst_diffuse_animate_set_context);

  basesrc_class->fixate = GST_DEBUG_FUNCPTR (gst_diffuse_animate_fixate);
  basesrc_class->set_caps = GST_DEBUG_FUNCPTR (gst_diffuse_animate_set_caps);
  basesrc_class->decide_allocation = GST_DEBUG_FUNCPTR (gst_diffuse_animate_decide_allocation);
  basesrc_class->query = GST_DEBUG_FUNCPTR (gst_diffuse_animate_query);
  basesrc_class->is_seekable = GST_DEBUG_FUNCPTR (gst_diffuse_animate_is_seekable);
  basesrc_class->do_seek = GST_DEBUG_FUNCPTR (gst_diffuse_animate_do_seek);
  basesrc_class->get_times = GST_DEBUG_FUNCPTR (gst_diffuse_animate_get_times);
  basesrc_class->start = GST_DEBUG_FUNCPTR (gst_diffuse_animate_start);
  basesrc_class->stop = GST_DEBUG_FUNCPTR (gst_diffuse_animate_stop);
  basesrc_class->unlock = GST_DEBUG_FUNCPTR (gst_diffuse_animate_unlock);
  basesrc_class->unlock_stop = GST_DEBUG_FUNCPTR (gst_diffuse_animate_unlock_stop);
  pushsrc_class->fill = GST_DEBUG_FUNCPTR (gst_diffuse_animate_fill);

  gst_type_mark_as_plugin_api (GST_TYPE_DIFFUSE_DTYPE, 0);
  g_type_ensure (GST_TYPE_DIFFUSE_CACHE);
}

static void
gst_diffuse_animate_init (GstDiffuseAnimate *self)
{
  gst_diffuse_state_init (&self->st, GST_ELEMENT (self), DIFFUSE_SD_TEXT2IMG, DEFAULT_SEED_INCREMENT);
  self->st.model_only = TRUE;     /* the pipeline is a DiffuseAnimate, made in start () */
  self->num_frames = DEFAULT_NUM_FRAMES;
  self->loop = DEFAULT_LOOP;
  self->clips = DEFAULT_CLIPS;
  gst_video_info_init (&self->info);
  self->live_base = GST_CLOCK_TIME_NONE;
  self->live_next_pts = GST_CLOCK_TIME_NONE;
  gst_base_src_set_format (GST_BASE_SRC (self), GST_FORMAT_TIME);
  gst_base_src_set_live (GST_BASE_SRC (self), DEFAULT_IS_LIVE);
}

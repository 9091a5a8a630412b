/* gst-diffuse — diffusetext2img
 *
 * SECTION:element-diffusetext2img
 *
 * Generates one image per buffer from a text prompt with a Stable
 * Diffusion pipeline in the diffusers format (a local folder or a Hub
 * repository).  The size comes from downstream caps and is fixated to the
 * model's default size; prompt, guidance and seed may change while PLAYING
 * and apply to the next frame.
 *
 * |[
 * gst-launch-1.0 diffusetext2img prompt="a lighthouse at dusk" num-buffers=4 ! videoconvert ! pngenc ! multifilesink location=frame%d.png
 * ]|
 *
 * Non-live, frames are timestamped at the caps framerate (default 1/1) and
 * frame n uses seed + n * seed-increment, so a seek reproduces the frames.
 * Live (is-live=true), a frame is timestamped with the running time at
 * which its generation starts, frames are paced to the framerate, and the
 * LATENCY query answers the longest generation time seen.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include "gstdiffusetext2img.h"
#include "gstdiffusecontext.h"

GST_DEBUG_CATEGORY_STATIC (gst_diffuse_text2img_debug);
#define GST_CAT_DEFAULT gst_diffuse_text2img_debug

enum {
  PROP_IS_LIVE = GST_DIFFUSE_PROP_LAST,
};

#define DEFAULT_IS_LIVE FALSE
#define DEFAULT_SEED_INCREMENT 1

#define SRC_CAPS                                                              \
  "video/x-raw, format = (string) " GST_DIFFUSE_VIDEO_FORMATS ", "            \
  "width = (int) [ 8, 16384 ], height = (int) [ 8, 16384 ], "                 \
  "framerate = (fraction) [ 0/1, 2147483647/1 ], "                            \
  "pixel-aspect-ratio = (fraction) 1/1"

static GstStaticPadTemplate src_template =
    GST_STATIC_PAD_TEMPLATE ("src", GST_PAD_SRC, GST_PAD_ALWAYS, GST_STATIC_CAPS (SRC_CAPS));

#define gst_diffuse_text2img_parent_class parent_class
G_DEFINE_TYPE (GstDiffuseText2Img, gst_diffuse_text2img, GST_TYPE_PUSH_SRC);
GST_ELEMENT_REGISTER_DEFINE (diffusetext2img, "diffusetext2img", GST_RANK_NONE, GST_TYPE_DIFFUSE_TEXT2IMG);

static void
gst_diffuse_text2img_set_property (GObject *object, guint prop_id, const GValue *value, GParamSpec *pspec)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (object);
  if (gst_diffuse_state_set_property (&self->st, prop_id, value, pspec))
    return;
  switch (prop_id) {
    case PROP_IS_LIVE:
      gst_base_src_set_live (GST_BASE_SRC (self), g_value_get_boolean (value));
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
      break;
  }
}

static void
gst_diffuse_text2img_get_property (GObject *object, guint prop_id, GValue *value, GParamSpec *pspec)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (object);
  if (gst_diffuse_state_get_property (&self->st, prop_id, value, pspec))
    return;
  switch (prop_id) {
    case PROP_IS_LIVE:
      g_value_set_boolean (value, gst_base_src_is_live (GST_BASE_SRC (self)));
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
      break;
  }
}

static void
gst_diffuse_text2img_finalize (GObject *object)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (object);
  gst_diffuse_state_finalize (&self->st);
  G_OBJECT_CLASS (parent_class)->finalize (object);
}

static void
gst_diffuse_text2img_set_context (GstElement *element, GstContext *context)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (element);
  gst_diffuse_handle_set_context (element, context, &self->st.cache);
  GST_ELEMENT_CLASS (parent_class)->set_context (element, context);
}

/* ---- caps ----------------------------------------------------------------- */

static GstCaps *
gst_diffuse_text2img_fixate (GstBaseSrc *bsrc, GstCaps *caps)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (bsrc);
  int dw = self->st.default_width > 0 ? self->st.default_width : 512;
  int dh = self->st.default_height > 0 ? self->st.default_height : 512;

  caps = gst_caps_truncate (gst_caps_make_writable (caps));
  gst_diffuse_src_fixate (gst_caps_get_structure (caps, 0), dw, dh, 1, 1);
  GST_DEBUG_OBJECT (self, "fixating to model default %dx%d: %" GST_PTR_FORMAT, dw, dh, caps);
  return GST_BASE_SRC_CLASS (parent_class)->fixate (bsrc, caps);
}

static gboolean
gst_diffuse_text2img_set_caps (GstBaseSrc *bsrc, GstCaps *caps)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (bsrc);
  GstVideoInfo info;

  if (!gst_diffuse_src_parse_caps (GST_ELEMENT (self), caps, FALSE, &info))
    return FALSE;

  GST_OBJECT_LOCK (self);
  /* keep the timeline continuous across a caps change, as videotestsrc */
  self->accum_rtime += self->running_time;
  self->accum_frames += self->n_frames;
  self->running_time = 0;
  self->n_frames = 0;
  self->info = info;
  GST_OBJECT_UNLOCK (self);
  GST_INFO_OBJECT (self, "negotiated %" GST_PTR_FORMAT, caps);
  return TRUE;
}

static gboolean
gst_diffuse_text2img_decide_allocation (GstBaseSrc *bsrc, GstQuery *query)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (bsrc);
  GST_OBJECT_LOCK (self);
  gsize size = self->info.size;
  GST_OBJECT_UNLOCK (self);
  if (!gst_diffuse_src_configure_pool (GST_ELEMENT (self), query, size))
    return FALSE;
  return GST_BASE_SRC_CLASS (parent_class)->decide_allocation (bsrc, query);
}

/* ---- queries, seeking ----------------------------------------------------- */

static gboolean
gst_diffuse_text2img_query (GstBaseSrc *bsrc, GstQuery *query)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (bsrc);
  guint64 total = bsrc->num_buffers != -1 ? (guint64) bsrc->num_buffers : G_MAXUINT64;
  gboolean res;
  if (gst_diffuse_src_query (bsrc, &self->st, query, &self->info, &self->latency, total, &res))
    return res;
  return GST_BASE_SRC_CLASS (parent_class)->query (bsrc, query);
}

static gboolean
gst_diffuse_text2img_is_seekable (GstBaseSrc *bsrc)
{
  return !gst_base_src_is_live (bsrc);
}

static gboolean
gst_diffuse_text2img_do_seek (GstBaseSrc *bsrc, GstSegment *segment)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (bsrc);

  if (segment->rate < 0)
    return FALSE;
  segment->time = segment->start;
  GST_OBJECT_LOCK (self);
  if (self->info.fps_n > 0) {
    self->n_frames = gst_util_uint64_scale (segment->position, self->info.fps_n, self->info.fps_d * GST_SECOND);
    self->running_time = gst_util_uint64_scale (self->n_frames, self->info.fps_d * GST_SECOND, self->info.fps_n);
  } else {
    self->n_frames = 0;
    self->running_time = 0;
  }
  self->accum_frames = 0;
  self->accum_rtime = 0;
  GST_OBJECT_UNLOCK (self);
  GST_DEBUG_OBJECT (self, "seek to %" GST_TIME_FORMAT ": frame %" G_GINT64_FORMAT, GST_TIME_ARGS (segment->position),
                    self->n_frames);
  return TRUE;
}

static void
gst_diffuse_text2img_get_times (GstBaseSrc *bsrc, GstBuffer *buffer, GstClockTime *start, GstClockTime *end)
{
  /* live frames are paced before generation (see fill); never sync here */
  *start = GST_CLOCK_TIME_NONE;
  *end = GST_CLOCK_TIME_NONE;
}

/* ---- start/stop, unlock ----------------------------------------------------- */

static gboolean
gst_diffuse_text2img_start (GstBaseSrc *bsrc)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (bsrc);

  GST_OBJECT_LOCK (self);
  gst_video_info_init (&self->info);
  self->n_frames = 0;
  self->accum_frames = 0;
  self->accum_rtime = 0;
  self->running_time = 0;
  self->next_live_slot = GST_CLOCK_TIME_NONE;
  self->latency = 0;
  GST_OBJECT_UNLOCK (self);

  gst_diffuse_state_set_flushing (&self->st, FALSE);
  return gst_diffuse_state_load (&self->st);
}

static gboolean
gst_diffuse_text2img_stop (GstBaseSrc *bsrc)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (bsrc);
  gst_diffuse_state_unload (&self->st);
  return TRUE;
}

static gboolean
gst_diffuse_text2img_unlock (GstBaseSrc *bsrc)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (bsrc);
  GST_DEBUG_OBJECT (self, "unlock: interrupting generation");
  gst_diffuse_state_set_flushing (&self->st, TRUE);
  GST_OBJECT_LOCK (self);
  if (self->clock_id)
    gst_clock_id_unschedule (self->clock_id);
  GST_OBJECT_UNLOCK (self);
  return TRUE;
}

static gboolean
gst_diffuse_text2img_unlock_stop (GstBaseSrc *bsrc)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (bsrc);
  GST_DEBUG_OBJECT (self, "unlock_stop");
  gst_diffuse_state_set_flushing (&self->st, FALSE);
  return TRUE;
}

/* ---- frames ----------------------------------------------------------------- */

/* Live: the running time now, or NONE without a clock. */
static GstClockTime
running_time_now (GstDiffuseText2Img *self)
{
  GstClock *clock = gst_element_get_clock (GST_ELEMENT (self));
  if (!clock)
    return GST_CLOCK_TIME_NONE;
  GstClockTime now = gst_clock_get_time (clock);
  GstClockTime base = gst_element_get_base_time (GST_ELEMENT (self));
  gst_object_unref (clock);
  return now > base ? now - base : 0;
}

/* Live: waits until running time rt (interruptible by unlock). */
static GstFlowReturn
wait_running_time (GstDiffuseText2Img *self, GstClockTime rt)
{
  GstClock *clock = gst_element_get_clock (GST_ELEMENT (self));
  if (!clock)
    return GST_FLOW_OK;
  GstClockTime base = gst_element_get_base_time (GST_ELEMENT (self));
  GstClockID id = gst_clock_new_single_shot_id (clock, base + rt);
  gst_object_unref (clock);

  GST_OBJECT_LOCK (self);
  if (self->st.flushing) {
    GST_OBJECT_UNLOCK (self);
    gst_clock_id_unref (id);
    return GST_FLOW_FLUSHING;
  }
  self->clock_id = id;
  GST_OBJECT_UNLOCK (self);

  GstClockReturn cret = gst_clock_id_wait (id, NULL);

  GST_OBJECT_LOCK (self);
  self->clock_id = NULL;
  GST_OBJECT_UNLOCK (self);
  gst_clock_id_unref (id);
  return cret == GST_CLOCK_UNSCHEDULED ? GST_FLOW_FLUSHING : GST_FLOW_OK;
}

static GstFlowReturn
gst_diffuse_text2img_fill (GstPushSrc *psrc, GstBuffer *buffer)
{
  GstDiffuseText2Img *self = GST_DIFFUSE_TEXT2IMG (psrc);
  gboolean live = gst_base_src_is_live (GST_BASE_SRC (self));
  GstFlowReturn ret = GST_FLOW_OK;
  GstVideoInfo info;

  GST_OBJECT_LOCK (self);
  info = self->info;
  GST_OBJECT_UNLOCK (self);
  if (GST_VIDEO_INFO_FORMAT (&info) == GST_VIDEO_FORMAT_UNKNOWN)
    return GST_FLOW_NOT_NEGOTIATED;
  /* 0 framerate: a still image, one frame then EOS (as videotestsrc) */
  if (info.fps_n == 0 && self->n_frames >= 1)
    return GST_FLOW_EOS;
  if (gst_diffuse_state_is_flushing (&self->st))
    return GST_FLOW_FLUSHING;

  GstClockTime frame_dur =
      info.fps_n > 0 ? gst_util_uint64_scale (GST_SECOND, info.fps_d, info.fps_n) : GST_CLOCK_TIME_NONE;
  GstClockTime pts, duration;
  guint64 index = self->accum_frames + self->n_frames;

  if (live) {
    if (GST_CLOCK_TIME_IS_VALID (self->next_live_slot)) {
      GstClockTime now = running_time_now (self);
      if (GST_CLOCK_TIME_IS_VALID (now) && now < self->next_live_slot) {
        ret = wait_running_time (self, self->next_live_slot);
        if (ret != GST_FLOW_OK)
          return ret;
      }
    }
    pts = running_time_now (self);
    duration = frame_dur;
  } else {
    pts = self->accum_rtime + self->running_time;
    duration = GST_CLOCK_TIME_NONE;
  }

  if (GST_CLOCK_TIME_IS_VALID (pts))
    gst_object_sync_values (GST_OBJECT (self), pts);

  GstDiffuseSettings s;
  gst_diffuse_state_snapshot (&self->st, &s);
  DiffuseImage *img = gst_diffuse_state_generate (&self->st, &s, info.width, info.height, NULL, index, &ret);
  gst_diffuse_settings_clear (&s);
  if (!img)
    return ret;

  GstVideoFrame frame;
  if (!gst_video_frame_map (&frame, &info, buffer, GST_MAP_WRITE)) {
    diffuse_image_free (img);
    GST_ELEMENT_ERROR (self, RESOURCE, WRITE, ("Could not map the output buffer"), (NULL));
    return GST_FLOW_ERROR;
  }
  gboolean ok = gst_diffuse_image_to_frame (img, &frame);
  gst_video_frame_unmap (&frame);
  diffuse_image_free (img);
  if (!ok) {
    GST_ELEMENT_ERROR (self, CORE, FAILED, ("Could not convert the image to %s", gst_video_format_to_string (
                                                 GST_VIDEO_INFO_FORMAT (&info))), (NULL));
    return GST_FLOW_ERROR;
  }

  /* timestamps */
  self->n_frames++;
  if (live) {
    GstClockTime gen = self->st.last_gen_time;
    if (!GST_CLOCK_TIME_IS_VALID (duration))
      duration = gen;
    if (GST_CLOCK_TIME_IS_VALID (pts) && GST_CLOCK_TIME_IS_VALID (frame_dur))
      self->next_live_slot = pts + frame_dur;
    /* the latency is the longest time a frame took to make */
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
  } else {
    GstClockTime next;
    if (info.fps_n > 0) {
      next = gst_util_uint64_scale (self->n_frames, info.fps_d * GST_SECOND, info.fps_n);
      duration = next - self->running_time;
    } else {
      next = self->running_time;
      duration = GST_CLOCK_TIME_NONE;
    }
    self->running_time = next;
  }

  GST_BUFFER_PTS (buffer) = pts;
  GST_BUFFER_DTS (buffer) = GST_CLOCK_TIME_NONE;
  GST_BUFFER_DURATION (buffer) = duration;
  GST_BUFFER_OFFSET (buffer) = index;
  GST_BUFFER_OFFSET_END (buffer) = index + 1;
  GST_DEBUG_OBJECT (self, "frame %" G_GUINT64_FORMAT " pts %" GST_TIME_FORMAT " duration %" GST_TIME_FORMAT, index,
                    GST_TIME_ARGS (pts), GST_TIME_ARGS (duration));
  return GST_FLOW_OK;
}

/* ---- class ------------------------------------------------------------------- */

static void
gst_diffuse_text2img_class_init (GstDiffuseText2ImgClass *klass)
{
  GObjectClass *gobject_class = G_OBJECT_CLASS (klass);
  GstElementClass *element_class = GST_ELEMENT_CLASS (klass);
  GstBaseSrcClass *basesrc_class = GST_BASE_SRC_CLASS (klass);
  GstPushSrcClass *pushsrc_class = GST_PUSH_SRC_CLASS (klass);

  GST_DEBUG_CATEGORY_INIT (gst_diffuse_text2img_debug, "diffusetext2img", 0, "diffuse text-to-image source");

  gobject_class->set_property = gst_diffuse_text2img_set_property;
  gobject_class->get_property = gst_diffuse_text2img_get_property;
  gobject_class->finalize = gst_diffuse_text2img_finalize;

  gst_diffuse_install_properties (gobject_class, FALSE, TRUE, DEFAULT_SEED_INCREMENT);
  g_object_class_install_property (gobject_class, PROP_IS_LIVE,
      g_param_spec_boolean ("is-live", "Is live",
          "Act as a live source: frames are timestamped with the running time at which they are made",
          DEFAULT_IS_LIVE, G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS | GST_PARAM_MUTABLE_READY));

  gst_element_class_set_static_metadata (element_class, "Diffusion text-to-image source", "Source/Video",
      "Generates video frames from a text prompt with a diffusers Stable Diffusion pipeline",
      "gst-diffuse developers");
  gst_element_class_add_static_pad_template (element_class, &src_template);
  element_class->set_context = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_set_context);

  basesrc_class->fixate = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_fixate);
  basesrc_class->set_caps = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_set_caps);
  basesrc_class->decide_allocation = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_decide_allocation);
  basesrc_class->query = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_query);
  basesrc_class->is_seekable = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_is_seekable);
  basesrc_class->do_seek = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_do_seek);
  basesrc_class->get_times = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_get_times);
  basesrc_class->start = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_start);
  basesrc_class->stop = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_stop);
  basesrc_class->unlock = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_unlock);
  basesrc_class->unlock_stop = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_unlock_stop);
  pushsrc_class->fill = GST_DEBUG_FUNCPTR (gst_diffuse_text2img_fill);

  gst_type_mark_as_plugin_api (GST_TYPE_DIFFUSE_DTYPE, 0);
  /* applications look the cache type up by name to make their own context */
  g_type_ensure (GST_TYPE_DIFFUSE_CACHE);
}

static void
gst_diffuse_text2img_init (GstDiffuseText2Img *self)
{
  gst_diffuse_state_init (&self->st, GST_ELEMENT (self), DIFFUSE_SD_TEXT2IMG, DEFAULT_SEED_INCREMENT);
  gst_video_info_init (&self->info);
  self->next_live_slot = GST_CLOCK_TIME_NONE;
  gst_base_src_set_format (GST_BASE_SRC (self), GST_FORMAT_TIME);
  gst_base_src_set_live (GST_BASE_SRC (self), DEFAULT_IS_LIVE);
}

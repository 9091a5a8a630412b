/* gst-diffuse — diffuseimg2img
 *
 * SECTION:element-diffuseimg2img
 *
 * Restyles each video frame with a Stable Diffusion image-to-image pipeline
 * (diffusers' StableDiffusionImg2ImgPipeline): the frame is encoded, noised
 * to `strength` and denoised towards the prompt.  The output has the input's
 * format and size (multiples of 8).  With strength 0 (or fewer than one
 * denoising step) the element is in passthrough.  QoS is on, so a live
 * pipeline drops late frames instead of stalling, and the LATENCY query adds
 * the longest generation time seen.
 *
 * |[
 * gst-launch-1.0 videotestsrc num-buffers=3 ! video/x-raw,width=512,height=512 ! diffuseimg2img prompt="an oil painting" strength=0.6 ! videoconvert ! pngenc ! multifilesink location=out%d.png
 * ]|
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include "gstdiffuseimg2img.h"
#include "gstdiffusecontext.h"

GST_DEBUG_CATEGORY_STATIC (gst_diffuse_img2img_debug);
#define GST_CAT_DEFAULT gst_diffuse_img2img_debug

#define DEFAULT_SEED_INCREMENT 0

#define VIDEO_CAPS                                                            \
  "video/x-raw, format = (string) " GST_DIFFUSE_VIDEO_FORMATS ", "            \
  "width = (int) [ 8, 16384 ], height = (int) [ 8, 16384 ], "                 \
  "framerate = (fraction) [ 0/1, 2147483647/1 ]"

static GstStaticPadTemplate sink_template =
    GST_STATIC_PAD_TEMPLATE ("sink", GST_PAD_SINK, GST_PAD_ALWAYS, GST_STATIC_CAPS (VIDEO_CAPS));
static GstStaticPadTemplate src_template =
    GST_STATIC_PAD_TEMPLATE ("src", GST_PAD_SRC, GST_PAD_ALWAYS, GST_STATIC_CAPS (VIDEO_CAPS));

#define gst_diffuse_img2img_parent_class parent_class
G_DEFINE_TYPE (GstDiffuseImg2Img, gst_diffuse_img2img, GST_TYPE_VIDEO_FILTER);
GST_ELEMENT_REGISTER_DEFINE (diffuseimg2img, "diffuseimg2img", GST_RANK_NONE, GST_TYPE_DIFFUSE_IMG2IMG);

/* Passthrough when no denoising step would run: strength 0, or
 * int(steps * strength) < 1 (where diffusers would refuse). */
static void
update_passthrough (GstDiffuseImg2Img *self)
{
  GstDiffuseSettings cur;   /* with the loaded model's suggested steps where unset */
  gst_diffuse_state_snapshot (&self->st, &cur);
  gdouble strength = cur.strength;
  gint steps = cur.num_inference_steps;
  gst_diffuse_settings_clear (&cur);
  gboolean passthrough = strength <= 0.0 || (gint) (steps * strength) < 1;
  if (passthrough != gst_base_transform_is_passthrough (GST_BASE_TRANSFORM (self)))
    GST_DEBUG_OBJECT (self, "passthrough %d (strength %g, %d steps)", passthrough, strength, steps);
  gst_base_transform_set_passthrough (GST_BASE_TRANSFORM (self), passthrough);
}

static void
gst_diffuse_img2img_set_property (GObject *object, guint prop_id, const GValue *value, GParamSpec *pspec)
{
  GstDiffuseImg2Img *self = GST_DIFFUSE_IMG2IMG (object);
  if (gst_diffuse_state_set_property (&self->st, prop_id, value, pspec)) {
    if (prop_id == GST_DIFFUSE_PROP_STRENGTH || prop_id == GST_DIFFUSE_PROP_NUM_INFERENCE_STEPS)
      update_passthrough (self);
    return;
  }
  G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
}

static void
gst_diffuse_img2img_get_property (GObject *object, guint prop_id, GValue *value, GParamSpec *pspec)
{
  GstDiffuseImg2Img *self = GST_DIFFUSE_IMG2IMG (object);
  if (!gst_diffuse_state_get_property (&self->st, prop_id, value, pspec))
    G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
}

static void
gst_diffuse_img2img_finalize (GObject *object)
{
  GstDiffuseImg2Img *self = GST_DIFFUSE_IMG2IMG (object);
  gst_diffuse_state_finalize (&self->st);
  G_OBJECT_CLASS (parent_class)->finalize (object);
}

static void
gst_diffuse_img2img_set_context (GstElement *element, GstContext *context)
{
  GstDiffuseImg2Img *self = GST_DIFFUSE_IMG2IMG (element);
  gst_diffuse_handle_set_context (element, context, &self->st.cache);
  GST_ELEMENT_CLASS (parent_class)->set_context (element, context);
}

static GstStateChangeReturn
gst_diffuse_img2img_change_state (GstElement *element, GstStateChange transition)
{
  GstDiffuseImg2Img *self = GST_DIFFUSE_IMG2IMG (element);

  /* going to READY interrupts a running generation between two steps */
  if (transition == GST_STATE_CHANGE_PAUSED_TO_READY)
    gst_diffuse_state_set_flushing (&self->st, TRUE);
  GstStateChangeReturn ret = GST_ELEMENT_CLASS (parent_class)->change_state (element, transition);
  if (transition == GST_STATE_CHANGE_PAUSED_TO_READY || transition == GST_STATE_CHANGE_READY_TO_PAUSED)
    gst_diffuse_state_set_flushing (&self->st, FALSE);
  return ret;
}

static gboolean
gst_diffuse_img2img_start (GstBaseTransform *trans)
{
  GstDiffuseImg2Img *self = GST_DIFFUSE_IMG2IMG (trans);
  self->n_frames = 0;
  GST_OBJECT_LOCK (self);
  self->latency = 0;
  GST_OBJECT_UNLOCK (self);
  gst_diffuse_state_set_flushing (&self->st, FALSE);
  if (!gst_diffuse_state_load (&self->st))
    return FALSE;
  update_passthrough (self);   /* with the model's suggested steps, if any */
  return TRUE;
}

static gboolean
gst_diffuse_img2img_stop (GstBaseTransform *trans)
{
  GstDiffuseImg2Img *self = GST_DIFFUSE_IMG2IMG (trans);
  gst_diffuse_state_unload (&self->st);
  return TRUE;
}

static gboolean
gst_diffuse_img2img_sink_event (GstBaseTransform *trans, GstEvent *event)
{
  GstDiffuseImg2Img *self = GST_DIFFUSE_IMG2IMG (trans);
  switch (GST_EVENT_TYPE (event)) {
    case GST_EVENT_FLUSH_START:
      gst_diffuse_state_set_flushing (&self->st, TRUE);
      break;
    case GST_EVENT_FLUSH_STOP:
      gst_diffuse_state_set_flushing (&self->st, FALSE);
      break;
    default:
      break;
  }
  return GST_BASE_TRANSFORM_CLASS (parent_class)->sink_event (trans, event);
}

static gboolean
gst_diffuse_img2img_query (GstBaseTransform *trans, GstPadDirection direction, GstQuery *query)
{
  GstDiffuseImg2Img *self = GST_DIFFUSE_IMG2IMG (trans);

  switch (GST_QUERY_TYPE (query)) {
    case GST_QUERY_CONTEXT:
      if (gst_diffuse_handle_context_query (GST_ELEMENT (self), query, &self->st.cache))
        return TRUE;
      break;
    case GST_QUERY_LATENCY:
      if (direction == GST_PAD_SRC && !gst_base_transform_is_passthrough (trans)) {
        if (!GST_BASE_TRANSFORM_CLASS (parent_class)->query (trans, direction, query))
          return FALSE;
        gboolean live;
        GstClockTime min, max;
        gst_query_parse_latency (query, &live, &min, &max);
        GST_OBJECT_LOCK (self);
        GstClockTime ours = self->latency;
        GST_OBJECT_UNLOCK (self);
        min += ours;
        if (GST_CLOCK_TIME_IS_VALID (max))
          max += ours;
        GST_DEBUG_OBJECT (self, "adding latency %" GST_TIME_FORMAT, GST_TIME_ARGS (ours));
        gst_query_set_latency (query, live, min, max);
        return TRUE;
      }
      break;
    default:
      break;
  }
  return GST_BASE_TRANSFORM_CLASS (parent_class)->query (trans, direction, query);
}

static gboolean
gst_diffuse_img2img_set_info (GstVideoFilter *filter, GstCaps *incaps, GstVideoInfo *in_info, GstCaps *outcaps,
                              GstVideoInfo *out_info)
{
  GstDiffuseImg2Img *self = GST_DIFFUSE_IMG2IMG (filter);
  if (in_info->width % 8 != 0 || in_info->height % 8 != 0) {
    GST_ELEMENT_ERROR (self, CORE, NEGOTIATION,
        ("Input width and height must be multiples of 8, got %dx%d", in_info->width, in_info->height),
        ("caps %" GST_PTR_FORMAT, incaps));
    return FALSE;
  }
  if (in_info->width != out_info->width || in_info->height != out_info->height ||
      GST_VIDEO_INFO_FORMAT (in_info) != GST_VIDEO_INFO_FORMAT (out_info)) {
    GST_ELEMENT_ERROR (self, CORE, NEGOTIATION, ("Output must have the input's format and size"),
        ("in %" GST_PTR_FORMAT ", out %" GST_PTR_FORMAT, incaps, outcaps));
    return FALSE;
  }
  return TRUE;
}

static void
gst_diffuse_img2img_before_transform (GstBaseTransform *trans, GstBuffer *buffer)
{
  GstClockTime ts = GST_BUFFER_PTS (buffer);
  if (GST_CLOCK_TIME_IS_VALID (ts)) {
    GstClockTime stream_time = gst_segment_to_stream_time (&trans->segment, GST_FORMAT_TIME, ts);
    if (GST_CLOCK_TIME_IS_VALID (stream_time))
      gst_object_sync_values (GST_OBJECT (trans), stream_time);
  }
  update_passthrough (GST_DIFFUSE_IMG2IMG (trans));
}

static GstFlowReturn
gst_diffuse_img2img_transform_frame (GstVideoFilter *filter, GstVideoFrame *in, GstVideoFrame *out)
{
  GstDiffuseImg2Img *self = GST_DIFFUSE_IMG2IMG (filter);
  GstFlowReturn ret;

  if (gst_diffuse_state_is_flushing (&self->st))
    return GST_FLOW_FLUSHING;

  DiffuseImage *input = gst_diffuse_image_from_frame (in);
  if (!input) {
    GST_ELEMENT_ERROR (self, CORE, FAILED, ("Could not convert the input frame to RGB"), (NULL));
    return GST_FLOW_ERROR;
  }
  GstDiffuseSettings s;
  gst_diffuse_state_snapshot (&self->st, &s);
  DiffuseImage *img = gst_diffuse_state_generate (&self->st, &s, GST_VIDEO_FRAME_WIDTH (in),
                                                  GST_VIDEO_FRAME_HEIGHT (in), input, self->n_frames, &ret);
  gst_diffuse_settings_clear (&s);
  diffuse_image_free (input);
  if (!img)
    return ret;
  self->n_frames++;

  gboolean ok = gst_diffuse_image_to_frame (img, out);
  diffuse_image_free (img);
  if (!ok) {
    GST_ELEMENT_ERROR (self, CORE, FAILED, ("Could not convert the image to %s",
                                            gst_video_format_to_string (GST_VIDEO_FRAME_FORMAT (out))), (NULL));
    return GST_FLOW_ERROR;
  }

  GstClockTime gen = self->st.last_gen_time;
  gboolean post = FALSE;
  GST_OBJECT_LOCK (self);
  if (GST_CLOCK_TIME_IS_VALID (gen) && gen > self->latency) {
    self->latency = gen;
    post = TRUE;
  }
  GST_OBJECT_UNLOCK (self);
  if (post)
    gst_element_post_message (GST_ELEMENT (self), gst_message_new_latency (GST_OBJECT (self)));
  return GST_FLOW_OK;
}

static void
gst_diffuse_img2img_class_init (GstDiffuseImg2ImgClass *klass)
{
  GObjectClass *gobject_class = G_OBJECT_CLASS (klass);
  GstElementClass *element_class = GST_ELEMENT_CLASS (klass);
  GstBaseTransformClass *trans_class = GST_BASE_TRANSFORM_CLASS (klass);
  GstVideoFilterClass *filter_class = GST_VIDEO_FILTER_CLASS (klass);

  GST_DEBUG_CATEGORY_INIT (gst_diffuse_img2img_debug, "diffuseimg2img", 0, "diffuse image-to-image filter");

  gobject_class->set_property = gst_diffuse_img2img_set_property;
  gobject_class->get_property = gst_diffuse_img2img_get_property;
  gobject_class->finalize = gst_diffuse_img2img_finalize;
  gst_diffuse_install_properties (gobject_class, TRUE, TRUE, DEFAULT_SEED_INCREMENT);

  gst_element_class_set_static_metadata (element_class, "Diffusion image-to-image filter", "Filter/Effect/Video",
      "Restyles video frames towards a text prompt with a diffusers Stable Diffusion img2img pipeline",
      "gst-diffuse developers");
  gst_element_class_add_static_pad_template (element_class, &sink_template);
  gst_element_class_add_static_pad_template (element_class, &src_template);
  element_class->set_context = GST_DEBUG_FUNCPTR (gst_diffuse_img2img_set_context);
  element_class->change_state = GST_DEBUG_FUNCPTR (gst_diffuse_img2img_change_state);

  trans_class->start = GST_DEBUG_FUNCPTR (gst_diffuse_img2img_start);
  trans_class->stop = GST_DEBUG_FUNCPTR (gst_diffuse_img2img_stop);
  trans_class->sink_event = GST_DEBUG_FUNCPTR (gst_diffuse_img2img_sink_event);
  trans_class->query = GST_DEBUG_FUNCPTR (gst_diffuse_img2img_query);
  trans_class->before_transform = GST_DEBUG_FUNCPTR (gst_diffuse_img2img_before_transform);
  filter_class->set_info = GST_DEBUG_FUNCPTR (gst_diffuse_img2img_set_info);
  filter_class->transform_frame = GST_DEBUG_FUNCPTR (gst_diffuse_img2img_transform_frame);

  gst_type_mark_as_plugin_api (GST_TYPE_DIFFUSE_DTYPE, 0);
  /* applications look the cache type up by name to make their own context */
  g_type_ensure (GST_TYPE_DIFFUSE_CACHE);
}

static void
gst_diffuse_img2img_init (GstDiffuseImg2Img *self)
{
  gst_diffuse_state_init (&self->st, GST_ELEMENT (self), DIFFUSE_SD_IMG2IMG, DEFAULT_SEED_INCREMENT);
  gst_base_transform_set_qos_enabled (GST_BASE_TRANSFORM (self), TRUE);
}

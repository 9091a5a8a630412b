/* gst-diffuse — diffuseimg2img: formats, frames equal the core's,
 * passthrough, size checks, QoS, latency, flush cancellation. */
#include "gstdiffusetest.h"
#include <math.h>

/* A 16x16 (or w x h) RGB8 test picture: gradients and a square. */
static guint8 *
test_picture (int w, int h)
{
  guint8 *p = g_malloc ((gsize) w * h * 3);
  for (int y = 0; y < h; y++)
    for (int x = 0; x < w; x++) {
      guint8 *q = p + (y * w + x) * 3;
      gboolean sq = x > w / 4 && x < 3 * w / 4 && y > h / 4 && y < 3 * h / 4;
      q[0] = (guint8) (x * 255 / (w - 1));
      q[1] = (guint8) (y * 255 / (h - 1));
      q[2] = sq ? 230 : 40;
    }
  return p;
}

/* The picture as a buffer of an RGB-family format (alpha 255). */
static GstBuffer *
picture_buffer (const guint8 *rgb, GstVideoInfo *info)
{
  GstBuffer *buf = gst_buffer_new_allocate (NULL, info->size, NULL);
  GstVideoFrame f;
  fail_unless (gst_video_frame_map (&f, info, buf, GST_MAP_WRITE));
  GstVideoFormat fmt = GST_VIDEO_INFO_FORMAT (info);
  int w = info->width, h = info->height;
  if (fmt == GST_VIDEO_FORMAT_I420 || fmt == GST_VIDEO_FORMAT_NV12) {
    /* through videoconvert-equivalent library conversion (input side only) */
    GstVideoInfo ri;
    gst_video_info_set_format (&ri, GST_VIDEO_FORMAT_RGB, w, h);
    GstBuffer *rb = gst_buffer_new_wrapped (g_memdup2 (rgb, (gsize) w * h * 3), (gsize) w * h * 3);
    GstVideoFrame rf;
    fail_unless (gst_video_frame_map (&rf, &ri, rb, GST_MAP_READ));
    GstVideoConverter *c = gst_video_converter_new (&ri, info, NULL);
    gst_video_converter_frame (c, &rf, &f);
    gst_video_converter_free (c);
    gst_video_frame_unmap (&rf);
    gst_buffer_unref (rb);
  } else {
    int px = fmt == GST_VIDEO_FORMAT_RGB ? 3 : 4;
    gboolean bgr = fmt == GST_VIDEO_FORMAT_BGRx || fmt == GST_VIDEO_FORMAT_BGRA;
    guint8 *d = GST_VIDEO_FRAME_PLANE_DATA (&f, 0);
    int stride = GST_VIDEO_FRAME_PLANE_STRIDE (&f, 0);
    for (int y = 0; y < h; y++)
      for (int x = 0; x < w; x++) {
        guint8 *o = d + y * stride + x * px;
        const guint8 *s = rgb + (y * w + x) * 3;
        o[0] = bgr ? s[2] : s[0];
        o[1] = s[1];
        o[2] = bgr ? s[0] : s[2];
        if (px == 4)
          o[3] = 255;
      }
  }
  gst_video_frame_unmap (&f);
  GST_BUFFER_PTS (buf) = 0;
  GST_BUFFER_DURATION (buf) = GST_SECOND;
  return buf;
}

static GstHarness *
new_filter (const char *format, int w, int h, int steps, double strength)
{
  /* properties first: a harness plays a filter as soon as it wraps it */
  GstElement *el = gst_element_factory_make ("diffuseimg2img", NULL);
  gchar *model = test_model_path (NULL);
  g_object_set (el, "model", model, "num-inference-steps", steps, "strength", strength, "seed", (gint64) 11,
                "prompt", "a cat", NULL);
  g_free (model);
  GstHarness *hr = gst_harness_new_with_element (el, "sink", "src");
  gst_object_unref (el);
  gchar *caps = g_strdup_printf ("video/x-raw,format=%s,width=%d,height=%d,framerate=1/1", format, w, h);
  gst_harness_set_src_caps_str (hr, caps);
  g_free (caps);
  return hr;
}

static const char *formats[] = { "RGB", "RGBA", "BGRx", "BGRA", "I420", "NV12" };

/* An SDXL refiner (make_sdxl_refiner_fixtures.py "refiner-0.6": negative
 * prompt, aesthetic scores 7.5 / 1.5, strength 0.6): the frame equals
 * diffusers' StableDiffusionXLImg2ImgPipeline image within one level */
GST_START_TEST (test_sdxl_refiner)
{
  const char *fx = g_getenv ("DIFFUSE_FIXTURES");
  gchar *path = g_build_filename (fx ? fx : TEST_FIXTURES_DIR, "sdxl", "images.safetensors", NULL);
  DiffuseSafetensors *st = diffuse_safetensors_open (path, NULL);
  fail_unless (st != NULL, "%s", path);
  const DiffuseStEntry *in = diffuse_safetensors_find (st, "i2i-input");
  const DiffuseStEntry *want = diffuse_safetensors_find (st, "refiner-0.6");
  fail_unless (in && want && in->dtype == DIFFUSE_ST_U8 && want->dtype == DIFFUSE_ST_U8);
  const int w = (int) in->shape[1], h = (int) in->shape[0];
  GstElement *el = gst_element_factory_make ("diffuseimg2img", NULL);
  gchar *model = test_model_path ("tiny-sdxl-refiner");
  g_object_set (el, "model", model, "num-inference-steps", 5, "strength", 0.6, "seed", (gint64) 4, "prompt",
                "a red circle", "negative-prompt", "dark", "guidance-scale", 6.0, "aesthetic-score", 7.5,
                "negative-aesthetic-score", 1.5, NULL);
  g_free (model);
  GstHarness *hr = gst_harness_new_with_element (el, "sink", "src");
  gst_object_unref (el);
  gchar *caps = g_strdup_printf ("video/x-raw,format=RGB,width=%d,height=%d,framerate=1/1", w, h);
  gst_harness_set_src_caps_str (hr, caps);
  g_free (caps);
  GstVideoInfo info;
  gst_video_info_set_format (&info, GST_VIDEO_FORMAT_RGB, w, h);
  GstBuffer *out = gst_harness_push_and_pull (hr, picture_buffer (in->data, &info));
  fail_unless (out != NULL);
  GstVideoFrame f;
  fail_unless (gst_video_frame_map (&f, &info, out, GST_MAP_READ));
  const guint8 *got = GST_VIDEO_FRAME_PLANE_DATA (&f, 0);
  const int stride = GST_VIDEO_FRAME_PLANE_STRIDE (&f, 0);
  int maxd = 0;
  for (int y = 0; y < h; y++)
    for (int x = 0; x < w * 3; x++)
      maxd = MAX (maxd, abs ((int) got[y * stride + x] - (int) ((const guint8 *) want->data)[y * w * 3 + x]));
  gst_video_frame_unmap (&f);
  gst_buffer_unref (out);
  fail_unless (maxd <= 1, "the frame is %d levels from diffusers' refiner image", maxd);
  gst_harness_teardown (hr);
  diffuse_safetensors_unref (st);
  g_free (path);
}
GST_END_TEST;

GST_START_TEST (test_formats_and_frames)
{
  guint8 *pic = test_picture (16, 16);
  RefParams rp = ref_params_default ();
  rp.steps = 4;
  rp.seed = 11;
  rp.input_rgb = pic;
  rp.strength = 0.5;
  guint8 *ref = ref_generate (&rp);

  for (guint fi = 0; fi < G_N_ELEMENTS (formats); fi++) {
    GstHarness *h = new_filter (formats[fi], 16, 16, 4, 0.5);
    GstVideoInfo info;
    gst_video_info_set_format (&info, gst_video_format_from_string (formats[fi]), 16, 16);
    GstBuffer *in = picture_buffer (pic, &info);
    GstBuffer *in_keep = gst_buffer_ref (in);
    GstBuffer *out = gst_harness_push_and_pull (h, in);
    fail_unless (out != NULL, "%s: no output", formats[fi]);
    GstCaps *caps = gst_pad_get_current_caps (h->sinkpad);
    GstVideoInfo oinfo;
    fail_unless (gst_video_info_from_caps (&oinfo, caps));
    gst_caps_unref (caps);
    fail_unless_equals_int (GST_VIDEO_INFO_FORMAT (&oinfo), GST_VIDEO_INFO_FORMAT (&info));
    fail_unless_equals_int (oinfo.width, 16);
    fail_unless_equals_int (oinfo.height, 16);
    fail_unless_equals_uint64 (GST_BUFFER_PTS (out), 0);
    fail_unless_equals_uint64 (GST_BUFFER_DURATION (out), GST_SECOND);
    GstVideoFrame f;
    fail_unless (gst_video_frame_map (&f, &oinfo, out, GST_MAP_READ));
    if (GST_VIDEO_INFO_IS_YUV (&oinfo)) {
      /* the element sees the YUV input as RGB; the core's result for that
       * RGB must come out as its BT.601 conversion */
      GstVideoInfo ri;
      gst_video_info_set_format (&ri, GST_VIDEO_FORMAT_RGB, 16, 16);
      GstBuffer *rb = gst_buffer_new_allocate (NULL, ri.size, NULL);
      GstVideoFrame inf, rf;
      fail_unless (gst_video_frame_map (&inf, &info, in_keep, GST_MAP_READ));
      fail_unless (gst_video_frame_map (&rf, &ri, rb, GST_MAP_WRITE));
      GstVideoConverter *c = gst_video_converter_new (&info, &ri, NULL);
      gst_video_converter_frame (c, &inf, &rf);
      gst_video_converter_free (c);
      RefParams rp2 = rp;
      rp2.input_rgb = GST_VIDEO_FRAME_PLANE_DATA (&rf, 0);
      guint8 *ref2 = ref_generate (&rp2);
      gst_video_frame_unmap (&rf);
      gst_video_frame_unmap (&inf);
      gst_buffer_unref (rb);
      assert_frame_is_bt601_of (&f, ref2);
      g_free (ref2);
    } else {
      assert_frame_equals_rgb (&f, ref);
    }
    gst_video_frame_unmap (&f);
    gst_buffer_unref (out);
    gst_buffer_unref (in_keep);
    gst_harness_teardown (h);
  }
  g_free (ref);
  g_free (pic);
}
GST_END_TEST;

GST_START_TEST (test_passthrough)
{
  guint8 *pic = test_picture (16, 16);
  GstHarness *h = new_filter ("RGB", 16, 16, 4, 0.0);
  GstVideoInfo info;
  gst_video_info_set_format (&info, GST_VIDEO_FORMAT_RGB, 16, 16);
  gst_harness_play (h);
  fail_unless (gst_base_transform_is_passthrough (GST_BASE_TRANSFORM (h->element)));
  GstBuffer *in = picture_buffer (pic, &info);
  GstBuffer *keep = gst_buffer_ref (in);
  GstBuffer *out = gst_harness_push_and_pull (h, in);
  fail_unless (out == keep, "strength 0 must pass the buffer through");
  gst_buffer_unref (out);
  gst_buffer_unref (keep);

  /* raising strength while PLAYING leaves passthrough */
  g_object_set (h->element, "strength", 0.5, NULL);
  fail_unless (!gst_base_transform_is_passthrough (GST_BASE_TRANSFORM (h->element)));
  in = picture_buffer (pic, &info);
  out = gst_harness_push_and_pull (h, in);
  fail_unless (out != NULL);
  fail_unless (gst_buffer_memcmp (out, 0, pic, 16 * 16 * 3) != 0, "strength 0.5 left the frame untouched");
  gst_buffer_unref (out);

  /* int(steps * strength) < 1: no step would run, passthrough again */
  g_object_set (h->element, "strength", 0.2, NULL);
  fail_unless (gst_base_transform_is_passthrough (GST_BASE_TRANSFORM (h->element)));
  gst_harness_teardown (h);
  g_free (pic);
}
GST_END_TEST;

GST_START_TEST (test_size_not_multiple_of_8)
{
  GstHarness *h = new_filter ("RGB", 20, 16, 2, 0.5);
  GstBus *bus = gst_bus_new ();
  gst_element_set_bus (h->element, bus);
  GstVideoInfo info;
  gst_video_info_set_format (&info, GST_VIDEO_FORMAT_RGB, 20, 16);
  guint8 *pic = test_picture (20, 16);
  GstFlowReturn ret = gst_harness_push (h, picture_buffer (pic, &info));
  fail_unless_equals_int (ret, GST_FLOW_NOT_NEGOTIATED);
  GstMessage *msg = gst_bus_pop_filtered (bus, GST_MESSAGE_ERROR);
  assert_error_message (msg, GST_CORE_ERROR, GST_CORE_ERROR_NEGOTIATION, "multiples of 8");
  gst_message_unref (msg);
  gst_element_set_bus (h->element, NULL);
  gst_object_unref (bus);
  gst_harness_teardown (h);
  g_free (pic);
}
GST_END_TEST;

GST_START_TEST (test_qos_drops_late_frames)
{
  GstHarness *h = new_filter ("RGB", 16, 16, 2, 0.5);
  fail_unless (gst_base_transform_is_qos_enabled (GST_BASE_TRANSFORM (h->element)));
  GstVideoInfo info;
  gst_video_info_set_format (&info, GST_VIDEO_FORMAT_RGB, 16, 16);
  guint8 *pic = test_picture (16, 16);
  gst_harness_play (h);
  gst_buffer_unref (gst_harness_push_and_pull (h, picture_buffer (pic, &info)));
  /* the sink says: frame 0 came 5 s late */
  fail_unless (gst_harness_push_upstream_event (h, gst_event_new_qos (GST_QOS_TYPE_UNDERFLOW, 0.5, 5 * GST_SECOND, 0)));
  GstBuffer *late = picture_buffer (pic, &info);
  GST_BUFFER_PTS (late) = GST_SECOND;
  fail_unless_equals_int (gst_harness_push (h, late), GST_FLOW_OK);
  fail_unless_equals_int (gst_harness_buffers_received (h), 1); /* dropped */
  GstBuffer *ontime = picture_buffer (pic, &info);
  GST_BUFFER_PTS (ontime) = 20 * GST_SECOND;
  gst_buffer_unref (gst_harness_push_and_pull (h, ontime));
  fail_unless_equals_int (gst_harness_buffers_received (h), 2);
  gst_harness_teardown (h);
  g_free (pic);
}
GST_END_TEST;

GST_START_TEST (test_latency_adds_generation_time)
{
  GstHarness *h = new_filter ("RGB", 16, 16, 2, 0.5);
  gst_harness_set_live (h, TRUE);
  gst_harness_set_upstream_latency (h, 10 * GST_MSECOND);
  GstVideoInfo info;
  gst_video_info_set_format (&info, GST_VIDEO_FORMAT_RGB, 16, 16);
  guint8 *pic = test_picture (16, 16);
  gst_harness_play (h);
  gst_buffer_unref (gst_harness_push_and_pull (h, picture_buffer (pic, &info)));
  GstQuery *q = gst_query_new_latency ();
  fail_unless (gst_pad_peer_query (h->sinkpad, q));
  gboolean live;
  GstClockTime min, max;
  gst_query_parse_latency (q, &live, &min, &max);
  fail_unless (live);
  fail_unless (min > 10 * GST_MSECOND, "latency %" GST_TIME_FORMAT " does not include the generation time",
               GST_TIME_ARGS (min));
  gst_query_unref (q);
  gst_harness_teardown (h);
  g_free (pic);
}
GST_END_TEST;

typedef struct {
  GstHarness *h;
  GstBuffer *buf;
  GstFlowReturn ret;
} PushData;

static gpointer
push_thread (gpointer data)
{
  PushData *d = data;
  d->ret = gst_harness_push (d->h, d->buf);
  return NULL;
}

typedef struct {
  gint n;
  GstClockTime t[2];
} StepCount;

static GstBusSyncReply
count_steps (GstBus *bus, GstMessage *msg, gpointer user_data)
{
  StepCount *c = user_data;
  const GstStructure *s = gst_message_get_structure (msg);
  if (GST_MESSAGE_TYPE (msg) == GST_MESSAGE_ELEMENT && gst_structure_has_name (s, "diffuse-progress")) {
    gint n = g_atomic_int_add (&c->n, 1);
    if (n < 2)
      c->t[n] = gst_util_get_timestamp ();
  }
  return GST_BUS_PASS;
}

GST_START_TEST (test_flush_interrupts)
{
  GstHarness *h = new_filter ("RGB", 64, 64, 500, 1.0);
  StepCount steps = { 0, { 0, 0 } };
  GstBus *bus = gst_bus_new ();
  gst_bus_set_sync_handler (bus, count_steps, &steps, NULL);
  gst_element_set_bus (h->element, bus);
  GstVideoInfo info;
  gst_video_info_set_format (&info, GST_VIDEO_FORMAT_RGB, 64, 64);
  guint8 *pic = test_picture (64, 64);
  gst_harness_play (h);
  PushData d = { h, picture_buffer (pic, &info), GST_FLOW_OK };
  GThread *t = g_thread_new ("push", push_thread, &d);
  for (int i = 0; i < 6000 && g_atomic_int_get (&steps.n) < 2; i++)
    g_usleep (5000);
  fail_unless (g_atomic_int_get (&steps.n) >= 2);
  GstClockTime step = steps.t[1] - steps.t[0];
  GstClockTime t0 = gst_util_get_timestamp ();
  fail_unless (gst_harness_push_event (h, gst_event_new_flush_start ()));
  g_thread_join (t);
  GstClockTime took = gst_util_get_timestamp () - t0;
  fail_unless_equals_int (d.ret, GST_FLOW_FLUSHING);
  GST_INFO ("one step %" GST_TIME_FORMAT ", flush took %" GST_TIME_FORMAT, GST_TIME_ARGS (step),
            GST_TIME_ARGS (took));
  /* interrupted between two steps: within about one step's time */
  fail_unless (took < 3 * step + 500 * GST_MSECOND, "flush took %" GST_TIME_FORMAT " (a step is %" GST_TIME_FORMAT ")",
               GST_TIME_ARGS (took), GST_TIME_ARGS (step));
  fail_unless (g_atomic_int_get (&steps.n) < 500);
  fail_unless (gst_harness_push_event (h, gst_event_new_flush_stop (TRUE)));
  gst_element_set_bus (h->element, NULL);
  gst_object_unref (bus);
  gst_harness_teardown (h);
  g_free (pic);
}
GST_END_TEST;

GST_START_TEST (test_properties)
{
  GstElement *el = gst_element_factory_make ("diffuseimg2img", NULL);
  gdouble strength;
  gint64 inc;
  g_object_get (el, "strength", &strength, "seed-increment", &inc, NULL);
  fail_unless_equals_float (strength, 0.8);
  fail_unless_equals_int64 (inc, 0);
  GParamSpec *p = g_object_class_find_property (G_OBJECT_GET_CLASS (el), "strength");
  fail_unless (p->flags & GST_PARAM_MUTABLE_PLAYING);
  fail_unless (p->flags & GST_PARAM_CONTROLLABLE);
  fail_unless_equals_float (G_PARAM_SPEC_DOUBLE (p)->minimum, 0.0);
  fail_unless_equals_float (G_PARAM_SPEC_DOUBLE (p)->maximum, 1.0);
  fail_unless (g_object_class_find_property (G_OBJECT_GET_CLASS (el), "model")->flags & GST_PARAM_MUTABLE_READY);
  gst_object_unref (el);
}
GST_END_TEST;

static Suite *
diffuseimg2img_suite (void)
{
  Suite *s = suite_create ("diffuseimg2img");
  TCase *tc = tcase_create ("general");
  tcase_set_timeout (tc, 300);
  suite_add_tcase (s, tc);
  tcase_add_test (tc, test_properties);
  tcase_add_test (tc, test_formats_and_frames);
  tcase_add_test (tc, test_passthrough);
  tcase_add_test (tc, test_size_not_multiple_of_8);
  tcase_add_test (tc, test_qos_drops_late_frames);
  tcase_add_test (tc, test_latency_adds_generation_time);
  tcase_add_test (tc, test_flush_interrupts);
  tcase_add_test (tc, test_sdxl_refiner);
  return s;
}

GST_CHECK_MAIN (diffuseimg2img);

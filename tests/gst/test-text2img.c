/* gst-diffuse — diffusetext2img: caps, frames, timestamps, live, state
 * changes, cancellation and errors. */
#include "gstdiffusetest.h"
#include "diffuse-config.h"
#include <math.h>

static GstHarness *
new_src (const char *caps, int steps, gint64 seed)
{
  GstHarness *h = gst_harness_new ("diffusetext2img");
  gchar *model = test_model_path (NULL);
  g_object_set (h->element, "model", model, "num-inference-steps", steps, "seed", seed, "prompt", "a cat", NULL);
  g_free (model);
  if (caps)
    gst_harness_set_sink_caps_str (h, caps);
  return h;
}

static GstVideoInfo
current_info (GstHarness *h)
{
  GstVideoInfo info;
  GstCaps *caps = gst_pad_get_current_caps (h->sinkpad);
  fail_unless (caps != NULL);
  fail_unless (gst_video_info_from_caps (&info, caps));
  gst_caps_unref (caps);
  return info;
}

/* The pulled frame equals the core's output for rp (buf is consumed). */
static void
assert_buffer_equals_core (GstHarness *h, GstBuffer *buf, const RefParams *rp)
{
  guint8 *ref = ref_generate (rp);
  GstVideoInfo info = current_info (h);
  GstVideoFrame f;
  fail_unless (gst_video_frame_map (&f, &info, buf, GST_MAP_READ));
  assert_frame_equals_rgb (&f, ref);
  gst_video_frame_unmap (&f);
  g_free (ref);
  gst_buffer_unref (buf);
}

/* ---- caps negotiation: every format, several sizes; frames checked ------- */

static const char *formats[] = { "RGB", "RGBA", "BGRx", "BGRA", "I420", "NV12" };
static const int sizes[][2] = { { 0, 0 }, { 32, 24 }, { 8, 16 } };

GST_START_TEST (test_caps_formats_and_sizes)
{
  for (guint fi = 0; fi < G_N_ELEMENTS (formats); fi++)
    for (guint si = 0; si < G_N_ELEMENTS (sizes); si++) {
      int w = sizes[si][0], hgt = sizes[si][1];
      gchar *caps = w ? g_strdup_printf ("video/x-raw,format=%s,width=%d,height=%d", formats[fi], w, hgt)
                      : g_strdup_printf ("video/x-raw,format=%s", formats[fi]);
      GstHarness *h = new_src (caps, 2, 7);
      g_object_set (h->element, "num-buffers", 1, NULL);
      gst_harness_play (h);
      GstBuffer *buf = gst_harness_pull (h);
      fail_unless (buf != NULL, "%s: no buffer", caps);

      GstVideoInfo info = current_info (h);
      int ew = w ? w : 16, eh = hgt ? hgt : 16; /* tiny-sd default: 8 * 2 */
      fail_unless_equals_int (info.width, ew);
      fail_unless_equals_int (info.height, eh);
      fail_unless_equals_string (gst_video_format_to_string (GST_VIDEO_INFO_FORMAT (&info)), formats[fi]);
      fail_unless_equals_int (info.fps_n, 1);
      fail_unless_equals_int (info.fps_d, 1);
      gboolean yuv = GST_VIDEO_INFO_IS_YUV (&info);
      gchar *cm = gst_video_colorimetry_to_string (&info.colorimetry);
      fail_unless_equals_string (cm, yuv ? "bt601" : "sRGB");
      g_free (cm);
      fail_unless_equals_int (gst_buffer_get_size (buf), info.size);
      GstVideoMeta *meta = gst_buffer_get_video_meta (buf);
      fail_unless (meta != NULL, "no GstVideoMeta");
      fail_unless_equals_int (meta->width, ew);
      fail_unless_equals_int (meta->height, eh);
      fail_unless_equals_int (meta->format, GST_VIDEO_INFO_FORMAT (&info));

      /* the pixels are the core's for the same settings */
      RefParams rp = ref_params_default ();
      rp.width = ew;
      rp.height = eh;
      rp.seed = 7;
      guint8 *ref = ref_generate (&rp);
      GstVideoFrame f;
      fail_unless (gst_video_frame_map (&f, &info, buf, GST_MAP_READ));
      if (yuv)
        assert_frame_is_bt601_of (&f, ref);
      else
        assert_frame_equals_rgb (&f, ref);
      gst_video_frame_unmap (&f);
      g_free (ref);
      gst_buffer_unref (buf);
      gst_harness_teardown (h);
      g_free (caps);
    }
}
GST_END_TEST;

/* ---- frames equal the core's: other settings, seed increment ------------- */

GST_START_TEST (test_frames_equal_core)
{
  GstHarness *h = new_src ("video/x-raw,format=RGB,width=24,height=16", 3, 1234);
  g_object_set (h->element, "negative-prompt", "blurry", "guidance-scale", 5.0, "seed-increment", (gint64) 10,
                "scheduler", "EulerDiscreteScheduler", "prompt", "a red house", "num-buffers", 3, NULL);
  gst_harness_play (h);
  for (int i = 0; i < 3; i++) {
    GstBuffer *buf = gst_harness_pull (h);
    fail_unless (buf != NULL);
    RefParams rp = ref_params_default ();
    rp.prompt = "a red house";
    rp.negative_prompt = "blurry";
    rp.guidance = 5.0;
    rp.scheduler = "EulerDiscreteScheduler";
    rp.steps = 3;
    rp.width = 24;
    rp.height = 16;
    rp.seed = 1234 + 10 * i;
    assert_buffer_equals_core (h, buf, &rp);
  }
  gst_harness_teardown (h);
}
GST_END_TEST;

/* ---- timestamps, durations, offsets, num-buffers + EOS --------------------- */

GST_START_TEST (test_timestamps_and_num_buffers)
{
  GstHarness *h = new_src ("video/x-raw,format=RGB,framerate=5/2", 1, 1);
  g_object_set (h->element, "num-buffers", 5, NULL);
  gst_harness_play (h);
  GstClockTime expect = 0;
  for (int i = 0; i < 5; i++) {
    GstBuffer *buf = gst_harness_pull (h);
    fail_unless (buf != NULL);
    GstClockTime next = gst_util_uint64_scale (i + 1, 2 * GST_SECOND, 5);
    fail_unless_equals_uint64 (GST_BUFFER_PTS (buf), expect);
    fail_unless_equals_uint64 (GST_BUFFER_DURATION (buf), next - expect);
    fail_unless_equals_uint64 (GST_BUFFER_OFFSET (buf), i);
    fail_unless_equals_uint64 (GST_BUFFER_OFFSET_END (buf), i + 1);
    expect = GST_BUFFER_PTS (buf) + GST_BUFFER_DURATION (buf); /* gap-free */
    gst_buffer_unref (buf);
  }
  GstEvent *ev;
  gboolean eos = FALSE;
  while (!eos && (ev = gst_harness_pull_event (h))) {
    eos = GST_EVENT_TYPE (ev) == GST_EVENT_EOS;
    gst_event_unref (ev);
  }
  fail_unless (eos);
  fail_unless_equals_int (gst_harness_buffers_received (h), 5);

  /* duration query: num-buffers at the framerate */
  gint64 dur = 0;
  fail_unless (gst_element_query_duration (h->element, GST_FORMAT_TIME, &dur));
  fail_unless_equals_uint64 (dur, 2 * GST_SECOND);
  gst_harness_teardown (h);
}
GST_END_TEST;

/* ---- prompt change while PLAYING ------------------------------------------ */

GST_START_TEST (test_prompt_change_playing)
{
  GstHarness *h = new_src ("video/x-raw,format=RGB", 2, 99);
  g_object_set (h->element, "seed-increment", (gint64) 0, NULL);
  gst_harness_play (h);
  GstBuffer *first = gst_harness_pull (h);
  fail_unless (first != NULL);
  g_object_set (h->element, "prompt", "a blue car", "guidance-scale", 3.0, NULL);

  RefParams rp = ref_params_default ();
  rp.seed = 99;
  rp.prompt = "a blue car";
  rp.guidance = 3.0;
  guint8 *ref = ref_generate (&rp);
  GstVideoInfo info = current_info (h);

  /* frames already made with the old prompt may be queued; the change
   * must show within a few frames, and then stay */
  int changed_at = -1;
  for (int i = 0; i < 200 && changed_at < 0; i++) {
    GstBuffer *buf = gst_harness_pull (h);
    fail_unless (buf != NULL);
    if (!gst_buffer_memcmp (buf, 0, ref, info.size))
      changed_at = i;
    gst_buffer_unref (buf);
  }
  fail_unless (changed_at >= 0, "prompt change never applied");
  GstBuffer *buf = gst_harness_pull (h);
  fail_unless (gst_buffer_memcmp (buf, 0, ref, info.size) == 0, "frame after the change is not the new prompt's");
  GstMapInfo m;
  gst_buffer_map (first, &m, GST_MAP_READ);
  fail_unless (memcmp (m.data, ref, info.size) != 0, "old and new prompt give the same image");
  gst_buffer_unmap (first, &m);
  gst_buffer_unref (buf);
  gst_buffer_unref (first);
  g_free (ref);
  gst_harness_teardown (h);
}
GST_END_TEST;

/* ---- READY <-> PLAYING 50 times ------------------------------------------------ */

GST_START_TEST (test_ready_playing_cycles)
{
  GstHarness *h = new_src ("video/x-raw,format=RGB", 1, 5);
  g_object_set (h->element, "num-buffers", 1, NULL);
  gst_harness_play (h);
  GstBuffer *ref = gst_harness_pull (h);
  fail_unless (ref != NULL);
  for (int i = 0; i < 50; i++) {
    fail_unless_equals_int (gst_element_set_state (h->element, GST_STATE_READY), GST_STATE_CHANGE_SUCCESS);
    fail_unless_equals_uint64 (get_u64 (h->element, "resident-bytes"), 0); /* stop released the model */
    fail_unless (gst_element_set_state (h->element, GST_STATE_PLAYING) != GST_STATE_CHANGE_FAILURE);
    GstBuffer *buf = gst_harness_pull (h);
    fail_unless (buf != NULL, "cycle %d: no buffer", i);
    GstMapInfo m;
    gst_buffer_map (ref, &m, GST_MAP_READ);
    fail_unless (gst_buffer_memcmp (buf, 0, m.data, m.size) == 0, "cycle %d: different frame", i);
    gst_buffer_unmap (ref, &m);
    fail_unless (get_u64 (h->element, "resident-bytes") > 0);
    gst_buffer_unref (buf);
  }
  gst_buffer_unref (ref);
  gst_harness_teardown (h);
}
GST_END_TEST;

/* ---- live mode: running-time timestamps, pacing, LATENCY ------------------------ */

GST_START_TEST (test_live)
{
  GstHarness *h = new_src ("video/x-raw,format=RGB,framerate=20/1", 2, 3);
  gst_harness_use_systemclock (h);
  g_object_set (h->element, "is-live", TRUE, NULL);
  GstBus *bus = gst_bus_new ();
  gst_element_set_bus (h->element, bus);
  gst_harness_play (h);
  GstClockTime prev = GST_CLOCK_TIME_NONE;
  for (int i = 0; i < 4; i++) {
    GstBuffer *buf = gst_harness_pull (h);
    fail_unless (buf != NULL);
    fail_unless (GST_BUFFER_PTS_IS_VALID (buf));
    fail_unless_equals_uint64 (GST_BUFFER_DURATION (buf), GST_SECOND / 20);
    if (GST_CLOCK_TIME_IS_VALID (prev))
      fail_unless (GST_BUFFER_PTS (buf) >= prev + GST_SECOND / 20 - GST_MSECOND,
                   "frames not paced: %" GST_TIME_FORMAT " after %" GST_TIME_FORMAT,
                   GST_TIME_ARGS (GST_BUFFER_PTS (buf)), GST_TIME_ARGS (prev));
    prev = GST_BUFFER_PTS (buf);
    gst_buffer_unref (buf);
  }
  GstMessage *msg = gst_bus_pop_filtered (bus, GST_MESSAGE_LATENCY);
  fail_unless (msg != NULL, "no latency message after the first frame");
  gst_message_unref (msg);
  GstQuery *q = gst_query_new_latency ();
  fail_unless (gst_pad_peer_query (h->sinkpad, q));
  gboolean live;
  GstClockTime min, max;
  gst_query_parse_latency (q, &live, &min, &max);
  fail_unless (live);
  fail_unless (min > 0 && min < 10 * GST_SECOND, "latency %" GST_TIME_FORMAT, GST_TIME_ARGS (min));
  gst_query_unref (q);
  gst_element_set_bus (h->element, NULL);
  gst_object_unref (bus);
  gst_harness_teardown (h);
}
GST_END_TEST;

/* ---- cancellation: READY and a flushing seek interrupt between steps ------------ */

typedef struct {
  GstClockTime t[2];
  int n, last_step, total;
} StepLog;

static GstBusSyncReply
log_steps (GstBus *bus, GstMessage *msg, gpointer user_data)
{
  StepLog *log = user_data;
  const GstStructure *s = gst_message_get_structure (msg);
  if (GST_MESSAGE_TYPE (msg) == GST_MESSAGE_ELEMENT && gst_structure_has_name (s, "diffuse-progress")) {
    g_atomic_int_inc (&log->n);
    gst_structure_get_int (s, "step", &log->last_step);
    gst_structure_get_int (s, "total", &log->total);
    if (log->n <= 2)
      log->t[log->n - 1] = gst_util_get_timestamp ();
  }
  return GST_BUS_PASS;
}

static GstClockTime
wait_steps (StepLog *log, int n)
{
  for (int i = 0; i < 6000 && g_atomic_int_get (&log->n) < n; i++)
    g_usleep (5000);
  fail_unless (g_atomic_int_get (&log->n) >= n, "no progress messages");
  return log->t[1] - log->t[0];
}

GST_START_TEST (test_cancel_on_ready)
{
  /* a large frame with many steps: minutes if not interrupted */
  GstHarness *h = new_src ("video/x-raw,format=RGB,width=64,height=64", 500, 1);
  StepLog *log = g_new0 (StepLog, 1);
  GstBus *bus = gst_bus_new ();
  gst_bus_set_sync_handler (bus, log_steps, log, g_free);
  gst_element_set_bus (h->element, bus);
  gst_harness_play (h);
  GstClockTime step = wait_steps (log, 2);
  GstClockTime t0 = gst_util_get_timestamp ();
  fail_unless_equals_int (gst_element_set_state (h->element, GST_STATE_READY), GST_STATE_CHANGE_SUCCESS);
  GstClockTime took = gst_util_get_timestamp () - t0;
  GST_INFO ("one step %" GST_TIME_FORMAT ", READY took %" GST_TIME_FORMAT, GST_TIME_ARGS (step), GST_TIME_ARGS (took));
  fail_unless (took < 3 * step + 500 * GST_MSECOND, "READY took %" GST_TIME_FORMAT " (a step is %" GST_TIME_FORMAT ")",
               GST_TIME_ARGS (took), GST_TIME_ARGS (step));
  fail_unless (log->last_step < log->total);
  fail_unless_equals_int (gst_harness_buffers_received (h), 0);
  /* stop streaming, then drop the bus (its queued messages hold refs on
   * the element, which holds the bus), then free log with the handler */
  gst_element_set_state (h->element, GST_STATE_NULL);
  gst_element_set_bus (h->element, NULL);
  gst_harness_teardown (h);
  gst_object_unref (bus);
}
GST_END_TEST;


GST_START_TEST (test_flushing_seek)
{
  GstHarness *h = new_src ("video/x-raw,format=RGB,width=64,height=64", 500, 40);
  StepLog *log = g_new0 (StepLog, 1);
  GstBus *bus = gst_bus_new ();
  gst_bus_set_sync_handler (bus, log_steps, log, g_free);
  gst_element_set_bus (h->element, bus);
  gst_harness_play (h);
  GstClockTime step = wait_steps (log, 2);

  /* the next frame is a fast one, 3 s in: frame 3, seed 40 + 3 */
  g_object_set (h->element, "num-inference-steps", 2, NULL);
  GstClockTime t0 = gst_util_get_timestamp ();
  fail_unless (gst_element_seek_simple (h->element, GST_FORMAT_TIME, GST_SEEK_FLAG_FLUSH, 3 * GST_SECOND));
  GstClockTime took = gst_util_get_timestamp () - t0;
  fail_unless (took < 3 * step + 500 * GST_MSECOND, "seek took %" GST_TIME_FORMAT, GST_TIME_ARGS (took));

  GstBuffer *buf = gst_harness_pull (h);
  fail_unless (buf != NULL);
  fail_unless_equals_uint64 (GST_BUFFER_PTS (buf), 3 * GST_SECOND);
  fail_unless_equals_uint64 (GST_BUFFER_OFFSET (buf), 3);
  RefParams rp = ref_params_default ();
  rp.width = rp.height = 64;
  rp.seed = 43;
  guint8 *ref = ref_generate (&rp);
  fail_unless (gst_buffer_memcmp (buf, 0, ref, 64 * 64 * 3) == 0, "frame after seek is not frame 3's");
  g_free (ref);
  gst_buffer_unref (buf);
  /* stop streaming, then drop the bus (its queued messages hold refs on
   * the element, which holds the bus), then free log with the handler */
  gst_element_set_state (h->element, GST_STATE_NULL);
  gst_element_set_bus (h->element, NULL);
  gst_harness_teardown (h);
  gst_object_unref (bus);
}
GST_END_TEST;

/* ---- errors -------------------------------------------------------------------- */

/* Starts a lone element with a bus; returns the first error/warning. */
static GstMessage *
start_and_get_error (GstElement *el, GstState target)
{
  GstBus *bus = gst_bus_new ();
  gst_element_set_bus (el, bus);
  gst_element_set_state (el, target);
  GstMessage *msg = wait_bus_message (bus, GST_MESSAGE_ERROR | GST_MESSAGE_WARNING, 20 * GST_SECOND);
  gst_element_set_state (el, GST_STATE_NULL);
  gst_element_set_bus (el, NULL);
  gst_object_unref (bus);
  return msg;
}

/* ---- the model folder's suggested settings (gst-diffuse.json) ------------------ */

/* A copy of the test model with gst-diffuse.json = json in tmp/m. */
static gchar *
model_with_suggestions (const char *tmp, const char *json)
{
  gchar *src = test_model_path (NULL);
  gchar *dst = g_build_filename (tmp, "m", NULL);
  if (!g_file_test (dst, G_FILE_TEST_IS_DIR)) {
    gchar *cmd = g_strdup_printf ("cp -rL '%s' '%s'", src, dst);
    fail_unless_equals_int (system (cmd), 0);
    g_free (cmd);
  }
  gchar *file = g_build_filename (dst, "gst-diffuse.json", NULL);
  fail_unless (g_file_set_contents (file, json, -1, NULL));
  g_free (file);
  g_free (src);
  return dst;
}

/* notify:: of the effective properties emitted while the model loads */
typedef struct {
  gint n_steps, n_guidance, last_steps;
  gdouble last_guidance;
} NotifyLog;

static void
on_notify (GObject *obj, GParamSpec *pspec, gpointer user_data)
{
  NotifyLog *nl = user_data;
  if (g_str_equal (pspec->name, "num-inference-steps")) {
    g_object_get (obj, "num-inference-steps", &nl->last_steps, NULL);
    g_atomic_int_inc (&nl->n_steps);
  } else if (g_str_equal (pspec->name, "guidance-scale")) {
    g_object_get (obj, "guidance-scale", &nl->last_guidance, NULL);
    g_atomic_int_inc (&nl->n_guidance);
  }
}

/* One frame with steps/guidance left unset (steps < 0) or set; checks the
 * pixels against the core's with want_steps/guidance (and the progress count),
 * and that loading the model notified the properties whose value it changed. */
static void
check_suggested_frame (const char *model, int steps, int want_steps, double want_guidance)
{
  GstHarness *h = gst_harness_new ("diffusetext2img");
  g_object_set (h->element, "model", model, "seed", (gint64) 7, "prompt", "a cat", "num-buffers", 1, NULL);
  if (steps > 0)
    g_object_set (h->element, "num-inference-steps", steps, NULL);
  gint steps_before = 0;
  gdouble guidance_before = 0;
  g_object_get (h->element, "num-inference-steps", &steps_before, "guidance-scale", &guidance_before, NULL);
  NotifyLog nl = { 0 };
  gulong nid = g_signal_connect (h->element, "notify", G_CALLBACK (on_notify), &nl);
  gst_harness_set_sink_caps_str (h, "video/x-raw,format=RGB,width=16,height=16");
  StepLog *log = g_new0 (StepLog, 1);
  GstBus *bus = gst_bus_new ();
  gst_bus_set_sync_handler (bus, log_steps, log, g_free);
  gst_element_set_bus (h->element, bus);
  gst_harness_play (h);
  GstBuffer *buf = gst_harness_pull (h);
  fail_unless (buf != NULL);
  fail_unless (log->total >= want_steps && log->total <= want_steps + 1, "%d steps run, %d asked",
               log->total, want_steps);  /* PNDM runs one more */
  /* the properties read as what the frame used */
  gint got_steps = 0;
  gdouble got_guidance = 0;
  g_object_get (h->element, "num-inference-steps", &got_steps, "guidance-scale", &got_guidance, NULL);
  fail_unless_equals_int (got_steps, want_steps);
  fail_unless_equals_float (got_guidance, want_guidance);
  /* the load notified exactly the values it changed, and they read as the new ones */
  fail_unless_equals_int (g_atomic_int_get (&nl.n_steps), steps_before != want_steps ? 1 : 0);
  fail_unless_equals_int (g_atomic_int_get (&nl.n_guidance), guidance_before != want_guidance ? 1 : 0);
  if (steps_before != want_steps)
    fail_unless_equals_int (nl.last_steps, want_steps);
  if (guidance_before != want_guidance)
    fail_unless_equals_float (nl.last_guidance, want_guidance);
  g_signal_handler_disconnect (h->element, nid);
  RefParams rp = ref_params_default ();
  rp.steps = want_steps;
  rp.guidance = want_guidance;
  rp.seed = 7;
  assert_buffer_equals_core (h, buf, &rp);
  gst_element_set_state (h->element, GST_STATE_NULL);
  gst_element_set_bus (h->element, NULL);
  gst_harness_teardown (h);
  gst_object_unref (bus);
}

GST_START_TEST (test_model_suggestions)
{
  gchar *tmp = g_dir_make_tmp ("diffuse-gst-XXXXXX", NULL);
  fail_unless (tmp != NULL);
  /* not set: the folder's 3 steps and guidance 1 (no unconditional pass) */
  gchar *m = model_with_suggestions (tmp, "{\"num_inference_steps\": 3, \"guidance_scale\": 1.0}");
  check_suggested_frame (m, -1, 3, 1.0);
  /* set by the user: the property wins, the unset guidance still follows the folder */
  check_suggested_frame (m, 2, 2, 1.0);
  /* no suggestion: the element's defaults (50 steps would be slow: check the total only) */
  g_free (model_with_suggestions (tmp, "{}"));
  GstElement *el = gst_element_factory_make ("diffusetext2img", NULL);
  gint steps = 0;
  g_object_get (el, "num-inference-steps", &steps, NULL);
  fail_unless_equals_int (steps, 50);
  /* a bad file: a clear error naming it, at start */
  g_free (model_with_suggestions (tmp, "{\"num_inference_steps\": 0}"));
  g_object_set (el, "model", m, NULL);
  GstMessage *msg = start_and_get_error (el, GST_STATE_PAUSED);
  assert_error_message (msg, GST_LIBRARY_ERROR, GST_LIBRARY_ERROR_INIT, "gst-diffuse.json");
  gst_message_unref (msg);
  gst_object_unref (el);
  gchar *cmd = g_strdup_printf ("rm -rf '%s'", tmp);
  fail_unless_equals_int (system (cmd), 0);
  g_free (cmd);
  g_free (m);
  g_free (tmp);
}
GST_END_TEST;

/* ---- the safety checker ------------------------------------------------------------ */

static const char *
fixtures_root (void)
{
  const char *fx = g_getenv ("DIFFUSE_FIXTURES");
  return fx ? fx : TEST_FIXTURES_DIR;
}

/* tiny-sd's components + fixtures/safety's checker and feature extractor in tmp/safe */
static gchar *
model_with_safety_checker (const char *tmp)
{
  const char *fx = fixtures_root ();
  gchar *dst = g_build_filename (tmp, "safe", NULL);
  gchar *cmd = g_strdup_printf ("mkdir -p '%s' && cd '%s' && for c in unet vae text_encoder tokenizer scheduler; do "
                                "ln -s '%s/pipelines/tiny-sd/'$c $c; done && ln -s '%s/safety/safety_checker' "
                                "safety_checker && ln -s '%s/safety/feature_extractor' feature_extractor",
                                dst, dst, fx, fx, fx);
  fail_unless_equals_int (system (cmd), 0);
  g_free (cmd);
  gchar *index = g_build_filename (dst, "model_index.json", NULL);
  fail_unless (g_file_set_contents (index,
      "{\"_class_name\": \"StableDiffusionPipeline\", \"_diffusers_version\": \"0.42.1\", "
      "\"feature_extractor\": [\"transformers\", \"CLIPImageProcessor\"], "
      "\"safety_checker\": [\"stable_diffusion\", \"StableDiffusionSafetyChecker\"], "
      "\"requires_safety_checker\": true, \"scheduler\": [\"diffusers\", \"PNDMScheduler\"], "
      "\"text_encoder\": [\"transformers\", \"CLIPTextModel\"], \"tokenizer\": [\"transformers\", \"CLIPTokenizer\"], "
      "\"unet\": [\"diffusers\", \"UNet2DConditionModel\"], \"vae\": [\"diffusers\", \"AutoencoderKL\"]}", -1, NULL));
  g_free (index);
  return dst;
}

static gint core_warnings;

static void
count_core_warning (const gchar *domain, GLogLevelFlags level, const gchar *message, gpointer user_data)
{
  g_atomic_int_inc (&core_warnings);
}

/* One 64x64 frame of "a red circle", seed 100 (flagged by the fixture checker,
 * tests/reference/make_safety_fixtures.py); the bus messages in *msgs. */
static GstBuffer *
safety_frame (const char *model, gboolean checker, GList **msgs)
{
  GstHarness *h = gst_harness_new ("diffusetext2img");
  g_object_set (h->element, "model", model, "num-inference-steps", 4, "seed", (gint64) 100, "prompt", "a red circle",
                "num-buffers", 1, "safety-checker", checker, NULL);
  gst_harness_set_sink_caps_str (h, "video/x-raw,format=RGB,width=64,height=64");
  GstBus *bus = gst_bus_new ();
  gst_element_set_bus (h->element, bus);
  gst_harness_play (h);
  GstBuffer *buf = NULL;
  for (int i = 0; i < 5 && !buf; i++)   /* 60 s each: slow under valgrind */
    buf = gst_harness_pull (h);
  GstMessage *m;
  while ((m = gst_bus_pop_filtered (bus, GST_MESSAGE_WARNING | GST_MESSAGE_ELEMENT)))
    *msgs = g_list_append (*msgs, m);
  gst_element_set_bus (h->element, NULL);
  gst_object_unref (bus);
  gst_harness_teardown (h);
  return buf;
}

static gboolean
has_message (GList *msgs, GstMessageType type, const char *name_or_text)
{
  for (GList *l = msgs; l; l = l->next) {
    GstMessage *m = l->data;
    if (GST_MESSAGE_TYPE (m) != type)
      continue;
    if (type == GST_MESSAGE_ELEMENT && gst_message_has_name (m, name_or_text))
      return TRUE;
    if (type == GST_MESSAGE_WARNING) {
      GError *e = NULL;
      gst_message_parse_warning (m, &e, NULL);
      gboolean hit = strstr (e->message, name_or_text) != NULL;
      g_error_free (e);
      if (hit)
        return TRUE;
    }
  }
  return FALSE;
}

static guint64
buffer_sum (GstBuffer *buf)
{
  GstMapInfo map;
  fail_unless (gst_buffer_map (buf, &map, GST_MAP_READ));
  guint64 sum = 0;
  for (gsize i = 0; i < map.size; i++)
    sum += map.data[i];
  gst_buffer_unmap (buf, &map);
  return sum;
}

GST_START_TEST (test_safety_checker)
{
  gchar *tmp = g_dir_make_tmp ("diffuse-gst-XXXXXX", NULL);
  gchar *model = model_with_safety_checker (tmp);
  /* the core's g_warnings (diffusers' logger warnings) are expected here: counted, not fatal */
  GLogLevelFlags old = g_log_set_always_fatal (G_LOG_LEVEL_CRITICAL | G_LOG_LEVEL_ERROR);
  guint hid = g_log_set_handler ("diffuse", G_LOG_LEVEL_WARNING, count_core_warning, NULL);

  /* on by default: the flagged frame leaves black, with a warning and "diffuse-nsfw" */
  GstElement *el = gst_element_factory_make ("diffusetext2img", NULL);
  gboolean def = FALSE;
  g_object_get (el, "safety-checker", &def, NULL);
  fail_unless (def);
  gst_object_unref (el);
  GList *msgs = NULL;
  g_atomic_int_set (&core_warnings, 0);
  GstBuffer *buf = safety_frame (model, TRUE, &msgs);
  fail_unless (buf != NULL);
  fail_unless_equals_uint64 (buffer_sum (buf), 0);
  fail_unless (has_message (msgs, GST_MESSAGE_ELEMENT, "diffuse-nsfw"));
  fail_unless (has_message (msgs, GST_MESSAGE_WARNING, "Potential NSFW content"));
  fail_unless_equals_int (g_atomic_int_get (&core_warnings), 1);   /* diffusers' logger line */
  gst_buffer_unref (buf);
  g_list_free_full (msgs, (GDestroyNotify) gst_message_unref);

  /* turned off: the picture itself, and a warning that nothing is screened (element + loader) */
  msgs = NULL;
  g_atomic_int_set (&core_warnings, 0);
  buf = safety_frame (model, FALSE, &msgs);
  fail_unless (buf != NULL);
  fail_unless (buffer_sum (buf) > 0);
  fail_if (has_message (msgs, GST_MESSAGE_ELEMENT, "diffuse-nsfw"));
  fail_unless (has_message (msgs, GST_MESSAGE_WARNING, "safety checker"));
  fail_unless_equals_int (g_atomic_int_get (&core_warnings), 1);   /* the loader's: requires_safety_checker */
  gst_buffer_unref (buf);
  g_list_free_full (msgs, (GDestroyNotify) gst_message_unref);

  g_log_remove_handler ("diffuse", hid);
  g_log_set_always_fatal (old);
  gchar *cmd = g_strdup_printf ("rm -rf '%s'", tmp);
  fail_unless_equals_int (system (cmd), 0);
  g_free (cmd);
  g_free (model);
  g_free (tmp);
}
GST_END_TEST;

/* Plays h (an RGB source, num-buffers 1), pulls its frame and returns the
 * largest difference in levels from entry id (8-bit [H, W, 3], diffusers'
 * image) of the fixture file rel; tears h down. */
static int
frame_level_diff (GstHarness *h, const char *rel, const char *id)
{
  gchar *path = g_build_filename (fixtures_root (), rel, NULL);
  DiffuseSafetensors *st = diffuse_safetensors_open (path, NULL);
  fail_unless (st != NULL, "%s", path);
  const DiffuseStEntry *e = diffuse_safetensors_find (st, id);
  fail_unless (e != NULL && e->dtype == DIFFUSE_ST_U8, "%s: %s", path, id);
  gst_harness_play (h);
  GstBuffer *buf = gst_harness_pull (h);
  fail_unless (buf != NULL);
  GstVideoInfo info = current_info (h);
  fail_unless (GST_VIDEO_INFO_FORMAT (&info) == GST_VIDEO_FORMAT_RGB && GST_VIDEO_INFO_WIDTH (&info) == e->shape[1] &&
               GST_VIDEO_INFO_HEIGHT (&info) == e->shape[0]);
  GstVideoFrame f;
  fail_unless (gst_video_frame_map (&f, &info, buf, GST_MAP_READ));
  const int W = (int) e->shape[1], H = (int) e->shape[0];
  int maxd = 0;
  for (int y = 0; y < H; y++) {
    const guint8 *row = (const guint8 *) GST_VIDEO_FRAME_PLANE_DATA (&f, 0) + y * GST_VIDEO_FRAME_PLANE_STRIDE (&f, 0);
    for (int i = 0; i < W * 3; i++)
      maxd = MAX (maxd, ABS ((int) row[i] - (int) ((const guint8 *) e->data)[(gsize) y * W * 3 + i]));
  }
  gst_video_frame_unmap (&f);
  gst_buffer_unref (buf);
  gst_harness_teardown (h);
  diffuse_safetensors_unref (st);
  g_free (path);
  return maxd;
}

/* ---- self-attention guidance: sag-scale gives diffusers' StableDiffusionSAGPipeline frame ---- */

GST_START_TEST (test_sag_scale)
{
  GstHarness *h = new_src ("video/x-raw,format=RGB,width=32,height=32", 4, 33);
  gdouble def = -1;
  g_object_get (h->element, "sag-scale", &def, NULL);
  fail_unless_equals_float (def, 0.0);
  g_object_set (h->element, "prompt", "a red circle", "guidance-scale", 7.5, "sag-scale", 0.75, "num-buffers", 1, NULL);
  /* make_sag_fixtures.py's first case */
  const int maxd = frame_level_diff (h, "sag/images.safetensors", "pndm-cfg");
  fail_unless (maxd <= 1, "the frame is %d levels from diffusers' StableDiffusionSAGPipeline image", maxd);
}
GST_END_TEST;

/* ---- Stable Diffusion XL: model=<an SDXL folder> gives diffusers' frame ---- */

GST_START_TEST (test_sdxl)
{
  GstHarness *h = gst_harness_new ("diffusetext2img");
  gchar *model = test_model_path ("tiny-sdxl");
  /* make_sdxl_fixtures.py's "cfg-zero-neg": no negative prompt, so zeroed
   * negative embeddings (force_zeros_for_empty_prompt); Euler, 4 steps */
  g_object_set (h->element, "model", model, "prompt", "a red circle", "guidance-scale", 5.0, "num-inference-steps", 4,
                "seed", (gint64) 3, "num-buffers", 1, NULL);
  g_free (model);
  gst_harness_set_sink_caps_str (h, "video/x-raw,format=RGB,width=32,height=32");
  const int maxd = frame_level_diff (h, "sdxl/images.safetensors", "cfg-zero-neg");
  fail_unless (maxd <= 1, "the frame is %d levels from diffusers' StableDiffusionXLPipeline image", maxd);
}
GST_END_TEST;

/* ---- vae=: a VAE from another folder, as from_pretrained (..., vae=...) ---- */

GST_START_TEST (test_vae_property)
{
  gchar *vae = g_build_filename (fixtures_root (), "vae-swap", "vae", NULL);
  GstHarness *h = new_src ("video/x-raw,format=RGB,width=32,height=32", 3, 21);
  g_object_set (h->element, "prompt", "a red circle", "guidance-scale", 7.5, "vae", vae, "num-buffers", 1, NULL);
  /* make_vae_swap_fixtures.py: diffusers' image with that VAE */
  const int maxd = frame_level_diff (h, "vae-swap/images.safetensors", "swapped");
  fail_unless (maxd <= 1, "the frame is %d levels from diffusers' image with the swapped VAE", maxd);

  /* a VAE that is not there: an error at start naming it */
  GstElement *el = gst_element_factory_make ("diffusetext2img", NULL);
  gchar *model = test_model_path (NULL);
  g_object_set (el, "model", model, "vae", "/nonexistent/vae-folder", NULL);
  GstMessage *msg = start_and_get_error (el, GST_STATE_PAUSED);
  fail_unless (msg != NULL);
  GError *err = NULL;
  gst_message_parse_error (msg, &err, NULL);
  fail_unless (strstr (err->message, "/nonexistent/vae-folder") != NULL, "%s", err->message);
  g_error_free (err);
  gst_message_unref (msg);
  gst_object_unref (el);
  g_free (model);
  g_free (vae);
}
GST_END_TEST;

/* ---- LoRA: the "lora" property gives diffusers' load_lora_weights frame ---- */

GST_START_TEST (test_lora)
{
  const char *root = fixtures_root ();
  /* make_lora_fixtures.py: a at weight 0.6 with b at 1.5, 3 steps, seed 21, 32x32 */
  gchar *spec = g_strdup_printf ("%s/lora/a:0.6, %s/lora/b/pytorch_lora_weights.safetensors:1.5", root, root);
  GstHarness *h = new_src ("video/x-raw,format=RGB,width=32,height=32", 3, 21);
  g_object_set (h->element, "prompt", "a red circle", "guidance-scale", 7.5, "lora", spec, "num-buffers", 1, NULL);
  const int maxd = frame_level_diff (h, "lora/images.safetensors", "ab");
  fail_unless (maxd <= 1, "the frame is %d levels from diffusers' image with both adapters", maxd);

  /* a missing file: an error at start naming the property's value */
  GstElement *el = gst_element_factory_make ("diffusetext2img", NULL);
  gchar *model = test_model_path (NULL);
  g_object_set (el, "model", model, "lora", "/no/such/lora.safetensors", NULL);
  GstMessage *msg = start_and_get_error (el, GST_STATE_PAUSED);
  assert_error_message (msg, GST_RESOURCE_ERROR, GST_RESOURCE_ERROR_NOT_FOUND, "LoRA");
  gst_message_unref (msg);
  gst_object_unref (el);
  g_free (model);
  g_free (spec);
}
GST_END_TEST;

/* ---- IP-Adapter: the ip-adapter* properties give diffusers' load_ip_adapter frame ---- */

GST_START_TEST (test_ip_adapter)
{
  gchar *dir = g_build_filename (fixtures_root (), "ip-adapter", NULL), *png = g_build_filename (dir, "input.png", NULL);
  GstHarness *h = new_src ("video/x-raw,format=RGB,width=32,height=32", 3, 5);
  g_object_set (h->element, "prompt", "a red circle", "guidance-scale", 7.5, "ip-adapter", dir,
                "ip-adapter-weight-name", "ip-adapter_tiny.safetensors", "ip-adapter-image", png, "num-buffers", 1,
                NULL);
  /* make_ip_adapter_fixtures.py */
  const int maxd = frame_level_diff (h, "ip-adapter/images.safetensors", "cfg-s1");
  fail_unless (maxd <= 1, "the frame is %d levels from diffusers' image with the IP-Adapter", maxd);

  /* the adapter without an image: an error at start naming what is missing */
  GstElement *el = gst_element_factory_make ("diffusetext2img", NULL);
  gchar *model = test_model_path (NULL);
  g_object_set (el, "model", model, "ip-adapter", dir, NULL);
  GstMessage *msg = start_and_get_error (el, GST_STATE_PAUSED);
  fail_unless (msg != NULL);
  GError *err = NULL;
  gst_message_parse_error (msg, &err, NULL);
  fail_unless (strstr (err->message, "IP-Adapter") != NULL, "%s", err->message);
  g_error_free (err);
  gst_message_unref (msg);
  gst_object_unref (el);
  g_free (model);
  g_free (png);
  g_free (dir);
}
GST_END_TEST;

static GstElement *
new_element (const char *model_name)
{
  GstElement *el = gst_element_factory_make ("diffusetext2img", NULL);
  gchar *model = test_model_path (model_name);
  g_object_set (el, "model", model, "num-inference-steps", 1, NULL);
  g_free (model);
  return el;
}

GST_START_TEST (test_error_missing_model)
{
  GstElement *el = gst_element_factory_make ("diffusetext2img", NULL);
  g_object_set (el, "model", "/nonexistent/model-folder", NULL);
  fail_unless_equals_int (gst_element_set_state (el, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  GstMessage *msg = start_and_get_error (el, GST_STATE_PAUSED);
  assert_error_message (msg, GST_RESOURCE_ERROR, GST_RESOURCE_ERROR_NOT_FOUND, "/nonexistent/model-folder");
  gst_message_unref (msg);
  gst_object_unref (el);
}
GST_END_TEST;

GST_START_TEST (test_error_missing_component)
{
  GstElement *el = new_element ("tiny-sd-missing-folder");
  GstMessage *msg = start_and_get_error (el, GST_STATE_PAUSED);
  assert_error_message (msg, GST_RESOURCE_ERROR, GST_RESOURCE_ERROR_NOT_FOUND, "vae");
  gst_message_unref (msg);
  gst_object_unref (el);
}
GST_END_TEST;

/* Broken checkpoints: each one an element error of the right kind naming
 * what is wrong, never a crash. */
GST_START_TEST (test_error_broken_checkpoints)
{
  struct {
    const char *fixture;
    GQuark domain;
    gint code;
    const char *needle;
  } cases[] = {
    { "tiny-sd-unknown-class", GST_LIBRARY_ERROR, GST_LIBRARY_ERROR_INIT, "AutoencoderFooBar" },
    { "tiny-sd-unknown-pipeline-class", GST_LIBRARY_ERROR, GST_LIBRARY_ERROR_INIT, "NoSuchPipeline" },
    /* a .bin whose pickle names os.system: refused by name, never executed */
    { "../pickle/tiny-sd-forbidden", GST_LIBRARY_ERROR, GST_LIBRARY_ERROR_INIT, "os.system" },
    { "tiny-sd-missing-unet-key", GST_LIBRARY_ERROR, GST_LIBRARY_ERROR_INIT, "unet" },
    { "tiny-sd-null-unet", GST_LIBRARY_ERROR, GST_LIBRARY_ERROR_INIT, "unet" },
    { "tiny-sd-no-model-index", GST_RESOURCE_ERROR, GST_RESOURCE_ERROR_NOT_FOUND, "model_index.json" },
  };
  for (guint i = 0; i < G_N_ELEMENTS (cases); i++) {
    GstElement *el = new_element (cases[i].fixture);
    GstMessage *msg = start_and_get_error (el, GST_STATE_PAUSED);
    fail_unless (msg != NULL, "%s: no error", cases[i].fixture);
    fail_unless (GST_MESSAGE_TYPE (msg) == GST_MESSAGE_ERROR);
    assert_error_message (msg, cases[i].domain, cases[i].code, cases[i].needle);
    gst_message_unref (msg);
    gst_object_unref (el);
  }
}
GST_END_TEST;

GST_START_TEST (test_error_variant)
{
  GstElement *el = new_element (NULL);
  g_object_set (el, "variant", "nosuchvariant", NULL);
  GstMessage *msg = start_and_get_error (el, GST_STATE_PAUSED);
  assert_error_message (msg, GST_RESOURCE_ERROR, GST_RESOURCE_ERROR_NOT_FOUND, "nosuchvariant");
  gst_message_unref (msg);
  gst_object_unref (el);
}
GST_END_TEST;

GST_START_TEST (test_error_device)
{
  GstElement *el = new_element (NULL);
  g_object_set (el, "device", "cuda:77", NULL);
  GstMessage *msg = start_and_get_error (el, GST_STATE_PAUSED);
  fail_unless (msg != NULL);
  GError *err = NULL;
  gst_message_parse_error (msg, &err, NULL);
  fail_unless ((err->domain == GST_LIBRARY_ERROR && err->code == GST_LIBRARY_ERROR_INIT) ||
               (err->domain == GST_RESOURCE_ERROR && err->code == GST_RESOURCE_ERROR_NOT_FOUND), "%s", err->message);
  fail_unless (strstr (err->message, "cuda:77") != NULL, "%s", err->message);
  g_error_free (err);
  gst_message_unref (msg);
  gst_object_unref (el);
}
GST_END_TEST;

GST_START_TEST (test_error_bundled_model_missing)
{
  gchar *inst = g_build_filename (DIFFUSE_DATADIR, "tiny-sd", NULL);
  gchar *src = g_build_filename (DIFFUSE_SRC_DATADIR, "tiny-sd", NULL);
  if (g_file_test (inst, G_FILE_TEST_IS_DIR) || g_file_test (src, G_FILE_TEST_IS_DIR)) {
    GST_INFO ("bundled model present, nothing to check");
  } else {
    GstElement *el = gst_element_factory_make ("diffusetext2img", NULL);
    GstMessage *msg = start_and_get_error (el, GST_STATE_PAUSED);
    assert_error_message (msg, GST_RESOURCE_ERROR, GST_RESOURCE_ERROR_NOT_FOUND, "bundled model");
    gst_message_unref (msg);
    gst_object_unref (el);
  }
  g_free (inst);
  g_free (src);
}
GST_END_TEST;

GST_START_TEST (test_error_scheduler)
{
  GstHarness *h = new_src ("video/x-raw,format=RGB", 1, 1);
  g_object_set (h->element, "scheduler", "NoSuchScheduler", NULL);
  GstBus *bus = gst_bus_new ();
  gst_element_set_bus (h->element, bus);
  gst_harness_play (h);
  GstMessage *msg = wait_bus_message (bus, GST_MESSAGE_ERROR, 20 * GST_SECOND);
  assert_error_message (msg, GST_LIBRARY_ERROR, GST_LIBRARY_ERROR_SETTINGS, "NoSuchScheduler");
  gst_message_unref (msg);
  gst_element_set_bus (h->element, NULL);
  gst_object_unref (bus);
  gst_harness_teardown (h);
}
GST_END_TEST;

GST_START_TEST (test_error_size_not_multiple_of_8)
{
  GstHarness *h = new_src ("video/x-raw,format=RGB,width=20,height=20", 1, 1);
  GstBus *bus = gst_bus_new ();
  gst_element_set_bus (h->element, bus);
  gst_harness_play (h);
  GstMessage *msg = wait_bus_message (bus, GST_MESSAGE_ERROR, 20 * GST_SECOND);
  assert_error_message (msg, GST_CORE_ERROR, GST_CORE_ERROR_NEGOTIATION, "multiples of 8");
  gst_message_unref (msg);
  fail_unless_equals_int (gst_harness_buffers_received (h), 0);
  gst_element_set_state (h->element, GST_STATE_NULL);
  gst_element_set_bus (h->element, NULL);
  gst_harness_teardown (h);
  gst_object_unref (bus);
}
GST_END_TEST;


GST_START_TEST (test_mutable_ready_refused_when_playing)
{
  GstHarness *h = new_src ("video/x-raw,format=RGB", 1, 1);
  GstBus *bus = gst_bus_new ();
  gst_element_set_bus (h->element, bus);
  gst_harness_play (h);
  gst_buffer_unref (gst_harness_pull (h));
  gchar *before = NULL, *after = NULL;
  g_object_get (h->element, "model", &before, NULL);
  g_object_set (h->element, "model", "/elsewhere", NULL);
  g_object_get (h->element, "model", &after, NULL);
  fail_unless_equals_string (before, after);
  GstMessage *msg = gst_bus_pop_filtered (bus, GST_MESSAGE_WARNING);
  assert_error_message (msg, GST_LIBRARY_ERROR, GST_LIBRARY_ERROR_SETTINGS, "model");
  gst_message_unref (msg);
  g_free (before);
  g_free (after);
  gst_element_set_bus (h->element, NULL);
  gst_object_unref (bus);
  gst_harness_teardown (h);
}
GST_END_TEST;

/* ---- properties ------------------------------------------------------------------ */

GST_START_TEST (test_property_flags)
{
  GstElement *el = gst_element_factory_make ("diffusetext2img", NULL);
  GObjectClass *k = G_OBJECT_GET_CLASS (el);
  const char *ready[] = { "model", "revision", "variant", "dtype", "device", "is-live" };
  const char *playing[] = { "prompt", "negative-prompt", "guidance-scale", "seed", "seed-increment",
                            "num-inference-steps", "clip-skip", "scheduler" };
  for (guint i = 0; i < G_N_ELEMENTS (ready); i++) {
    GParamSpec *p = g_object_class_find_property (k, ready[i]);
    fail_unless (p != NULL, "%s", ready[i]);
    fail_unless (p->flags & GST_PARAM_MUTABLE_READY, "%s", ready[i]);
  }
  for (guint i = 0; i < G_N_ELEMENTS (playing); i++) {
    GParamSpec *p = g_object_class_find_property (k, playing[i]);
    fail_unless (p != NULL, "%s", playing[i]);
    fail_unless (p->flags & GST_PARAM_MUTABLE_PLAYING, "%s", playing[i]);
  }
  fail_unless (g_object_class_find_property (k, "guidance-scale")->flags & GST_PARAM_CONTROLLABLE);
  fail_unless (!(g_object_class_find_property (k, "resident-bytes")->flags & G_PARAM_WRITABLE));
  fail_unless (!(g_object_class_find_property (k, "load-count")->flags & G_PARAM_WRITABLE));
  gint64 seed, inc;
  gdouble g;
  gint steps;
  gchar *device;
  g_object_get (el, "seed", &seed, "seed-increment", &inc, "guidance-scale", &g, "num-inference-steps", &steps,
                "device", &device, NULL);
  fail_unless_equals_int64 (seed, -1);
  fail_unless_equals_int64 (inc, 1);
  fail_unless_equals_float (g, 7.5);
  fail_unless_equals_int (steps, 50);
  fail_unless_equals_string (device, "auto");
  g_free (device);
  gst_object_unref (el);
}
GST_END_TEST;

static Suite *
diffusetext2img_suite (void)
{
  Suite *s = suite_create ("diffusetext2img");
  TCase *tc = tcase_create ("general");
  tcase_set_timeout (tc, 300);
  suite_add_tcase (s, tc);
  tcase_add_test (tc, test_property_flags);
  tcase_add_test (tc, test_caps_formats_and_sizes);
  tcase_add_test (tc, test_frames_equal_core);
  tcase_add_test (tc, test_timestamps_and_num_buffers);
  tcase_add_test (tc, test_prompt_change_playing);
  tcase_add_test (tc, test_ready_playing_cycles);
  tcase_add_test (tc, test_live);
  tcase_add_test (tc, test_cancel_on_ready);
  tcase_add_test (tc, test_flushing_seek);
  tcase_add_test (tc, test_error_missing_model);
  tcase_add_test (tc, test_error_missing_component);
  tcase_add_test (tc, test_error_broken_checkpoints);
  tcase_add_test (tc, test_error_variant);
  tcase_add_test (tc, test_error_device);
  tcase_add_test (tc, test_error_bundled_model_missing);
  tcase_add_test (tc, test_error_scheduler);
  tcase_add_test (tc, test_error_size_not_multiple_of_8);
  tcase_add_test (tc, test_mutable_ready_refused_when_playing);
  tcase_add_test (tc, test_model_suggestions);
  tcase_add_test (tc, test_safety_checker);
  tcase_add_test (tc, test_sag_scale);
  tcase_add_test (tc, test_lora);
  tcase_add_test (tc, test_ip_adapter);
  tcase_add_test (tc, test_sdxl);
  tcase_add_test (tc, test_vae_property);
  return s;
}

GST_CHECK_MAIN (diffusetext2img);

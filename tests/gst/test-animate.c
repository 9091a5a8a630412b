/* gst-diffuse — diffuseanimate: clips equal to the core AnimateDiff
 * pipeline, timestamps across clips, clips/loop/EOS, live latency, sharing
 * the base model with diffusetext2img, and errors.
 *
 * The reference frames come from the core's diffuse_animate_generate (whose
 * own equality to diffusers' AnimateDiffPipeline is tests/core/test-animate.c):
 * this test checks that the element passes the settings through and
 * delivers every frame, in order, unchanged. */
#include "gstdiffusetest.h"
#include <diffuse/animate.h>
#include <math.h>

#define N_COMPONENTS 5 /* tiny-sd: scheduler, text_encoder, tokenizer, unet, vae */
#define PROMPT "a cat"
#define STEPS 2

static gchar *
adapter_path (const char *name)
{
  const char *fx = g_getenv ("DIFFUSE_FIXTURES");
  return g_build_filename (fx ? fx : TEST_FIXTURES_DIR, "animatediff", name, NULL);
}

static GstHarness *
new_src (const char *adapter, int frames, guint64 seed)
{
  GstHarness *h = gst_harness_new ("diffuseanimate");
  gchar *model = test_model_path (NULL), *ad = adapter_path (adapter);
  g_object_set (h->element, "model", model, "motion-adapter", ad, "num-inference-steps", STEPS, "seed",
                (gint64) seed, "prompt", PROMPT, "num-frames", frames, NULL);
  g_free (model);
  g_free (ad);
  gst_harness_set_sink_caps_str (h, "video/x-raw,format=RGB");
  return h;
}

static GPtrArray *ref_clip_ip (const char *adapter, int frames, guint64 seed, const char *ip_dir, float ip_scale);

/* The core's clip for these settings, RGB8 frames of 16x16 (g_ptr_array of g_free'd buffers). */
static GPtrArray *
ref_clip (const char *adapter, int frames, guint64 seed)
{
  return ref_clip_ip (adapter, frames, seed, NULL, 0.0f);
}

/* ... with the tiny IP-Adapter of ip_dir (tests/fixtures/ip-adapter) and its input.png when ip_dir is set */
static GPtrArray *
ref_clip_ip (const char *adapter, int frames, guint64 seed, const char *ip_dir, float ip_scale)
{
  GError *err = NULL;
  gchar *model = test_model_path (NULL), *ad_dir = adapter_path (adapter);
  DiffuseLoadParams lp = diffuse_load_default_params ();
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, &lp, NULL, &err);
  fail_unless (pm != NULL, "load %s: %s", model, err ? err->message : "?");
  DiffuseComponent *ad = diffuse_animate_load_adapter (pm, ad_dir, NULL, &err);
  fail_unless (ad != NULL, "adapter %s: %s", ad_dir, err ? err->message : "?");
  DiffuseAnimate *anim = diffuse_animate_new_from_pipe (pm, ad, &err);
  fail_unless (anim != NULL, "from_pipe: %s", err ? err->message : "?");
  DiffuseAnimateParams p;
  diffuse_animate_default_params (&p);
  p.prompt = PROMPT;
  p.width = p.height = 16;
  p.num_frames = frames;
  p.num_inference_steps = STEPS;
  p.seed = seed;
  DiffuseImage *ipimg = NULL;
  if (ip_dir) {
    gchar *png = g_build_filename (ip_dir, "input.png", NULL);
    ipimg = diffuse_image_load_png (png, &err);
    fail_unless (ipimg != NULL, "%s: %s", png, err ? err->message : "?");
    g_free (png);
    fail_unless (diffuse_animate_load_ip_adapter (anim, ip_dir, "models", "ip-adapter_tiny.safetensors", &err),
                 "IP-Adapter: %s", err ? err->message : "?");
    diffuse_animate_set_ip_adapter_scale (anim, ip_scale);
    p.ip_adapter_image = ipimg;
  }
  GPtrArray *imgs = diffuse_animate_generate (anim, &p, &err);
  fail_unless (imgs != NULL, "generate: %s", err ? err->message : "?");
  diffuse_image_free (ipimg);
  fail_unless_equals_int (imgs->len, frames);
  GPtrArray *out = g_ptr_array_new_with_free_func (g_free);
  for (guint i = 0; i < imgs->len; i++) {
    guint8 *rgb = g_malloc (16 * 16 * 3);
    diffuse_image_to_rgb8 (g_ptr_array_index (imgs, i), rgb, 16 * 3);
    g_ptr_array_add (out, rgb);
  }
  g_ptr_array_unref (imgs);
  diffuse_animate_unref (anim);
  diffuse_component_unref (ad);
  diffuse_pipeline_model_unref (pm);
  g_free (model);
  g_free (ad_dir);
  return out;
}

static void
assert_buffer_equals (GstHarness *h, GstBuffer *buf, const guint8 *ref)
{
  GstVideoInfo info;
  GstCaps *caps = gst_pad_get_current_caps (h->sinkpad);
  fail_unless (caps != NULL && gst_video_info_from_caps (&info, caps));
  gst_caps_unref (caps);
  fail_unless_equals_int (info.width, 16);
  fail_unless_equals_int (info.height, 16);
  GstVideoFrame f;
  fail_unless (gst_video_frame_map (&f, &info, buf, GST_MAP_READ));
  assert_frame_equals_rgb (&f, ref);
  gst_video_frame_unmap (&f);
}

static gboolean
frames_differ (const guint8 *a, const guint8 *b)
{
  return memcmp (a, b, 16 * 16 * 3) != 0;
}

/* A 16-frame clip (clips=1): every frame equal to the core's, 8/1 timestamps, then EOS. */
GST_START_TEST (test_clip_equals_core)
{
  GPtrArray *ref = ref_clip ("a", 16, 7);
  GstHarness *h = new_src ("a", 16, 7);
  g_object_set (h->element, "clips", 1, NULL);
  gst_harness_play (h);
  for (int i = 0; i < 16; i++) {
    GstBuffer *buf = gst_harness_pull (h);
    fail_unless (buf != NULL, "frame %d missing", i);
    fail_unless_equals_uint64 (GST_BUFFER_PTS (buf), i * GST_SECOND / 8);
    fail_unless_equals_uint64 (GST_BUFFER_DURATION (buf), GST_SECOND / 8);
    fail_unless_equals_uint64 (GST_BUFFER_OFFSET (buf), i);
    fail_unless_equals_uint64 (GST_BUFFER_OFFSET_END (buf), i + 1);
    assert_buffer_equals (h, buf, g_ptr_array_index (ref, i));
    gst_buffer_unref (buf);
  }
  /* the frames move: a clip, not one picture repeated */
  fail_unless (frames_differ (g_ptr_array_index (ref, 0), g_ptr_array_index (ref, 15)));
  /* clips=1: EOS after the 16th frame */
  GstBuffer *extra = NULL;
  fail_unless (gst_harness_pull_until_eos (h, &extra));
  fail_unless (extra == NULL, "a buffer after the clip");
  /* the duration query knows the length */
  gint64 dur = -1;
  fail_unless (gst_element_query_duration (h->element, GST_FORMAT_TIME, &dur));
  fail_unless_equals_int64 (dur, 2 * GST_SECOND);
  gst_harness_teardown (h);
  g_ptr_array_unref (ref);
}
GST_END_TEST;

/* loop + clips=2: two clips of 4, timestamps and offsets continuous, the second
 * clip made with the next seed; then EOS. */
GST_START_TEST (test_loop_two_clips)
{
  GPtrArray *ref0 = ref_clip ("a", 4, 20), *ref1 = ref_clip ("a", 4, 21);
  GstHarness *h = new_src ("a", 4, 20);
  g_object_set (h->element, "loop", TRUE, "clips", 2, NULL);
  GstBus *bus = gst_bus_new ();
  gst_element_set_bus (h->element, bus);
  gst_harness_set_sink_caps_str (h, "video/x-raw,format=RGB,framerate=10/1");
  gst_harness_play (h);
  GstClockTime expect = 0;
  for (int i = 0; i < 8; i++) {
    GstBuffer *buf = gst_harness_pull (h);
    fail_unless (buf != NULL, "frame %d missing", i);
    fail_unless_equals_uint64 (GST_BUFFER_PTS (buf), expect);
    fail_unless (GST_BUFFER_DURATION (buf) > 0);
    fail_unless_equals_uint64 (GST_BUFFER_PTS (buf) + GST_BUFFER_DURATION (buf),
                               gst_util_uint64_scale (i + 1, GST_SECOND, 10));
    expect = GST_BUFFER_PTS (buf) + GST_BUFFER_DURATION (buf);
    fail_unless_equals_uint64 (GST_BUFFER_OFFSET (buf), i);
    assert_buffer_equals (h, buf, g_ptr_array_index (i < 4 ? ref0 : ref1, i % 4));
    gst_buffer_unref (buf);
  }
  fail_unless (frames_differ (g_ptr_array_index (ref0, 0), g_ptr_array_index (ref1, 0)));
  GstBuffer *extra = NULL;
  fail_unless (gst_harness_pull_until_eos (h, &extra));
  fail_unless (extra == NULL);

  /* progress: one message per denoising iteration of each clip (PNDM runs
   * STEPS + 1 for STEPS steps), naming the clip and its first frame */
  int n = 0, total = 0;
  guint64 clip = 0, frame = 0;
  GstMessage *msg;
  while ((msg = gst_bus_pop_filtered (bus, GST_MESSAGE_ELEMENT))) {
    const GstStructure *s = gst_message_get_structure (msg);
    if (gst_structure_has_name (s, "diffuse-progress")) {
      fail_unless (gst_structure_get_int (s, "total", &total));
      fail_unless (total >= STEPS);
      fail_unless (gst_structure_get_uint64 (s, "clip", &clip));
      fail_unless (gst_structure_get_uint64 (s, "frame", &frame));
      n++;
    }
    gst_message_unref (msg);
  }
  fail_unless_equals_int (n, 2 * total);
  fail_unless_equals_uint64 (clip, 1);
  fail_unless_equals_uint64 (frame, 4);
  gst_element_set_bus (h->element, NULL);
  gst_object_unref (bus);
  gst_harness_teardown (h);
  g_ptr_array_unref (ref0);
  g_ptr_array_unref (ref1);
}
GST_END_TEST;

/* loop without clips: no end (three clips pulled, offsets continuous); with
 * seed-increment 0 and the same prompt, every clip repeats the first. */
GST_START_TEST (test_loop_endless)
{
  GstHarness *h = new_src ("b", 2, 3);
  g_object_set (h->element, "loop", TRUE, "seed-increment", (gint64) 0, NULL);
  gst_harness_play (h);
  GstBuffer *bufs[6];
  for (int i = 0; i < 6; i++) {
    bufs[i] = gst_harness_pull (h);
    fail_unless (bufs[i] != NULL, "frame %d missing", i);
    fail_unless_equals_uint64 (GST_BUFFER_OFFSET (bufs[i]), i);
    fail_unless_equals_uint64 (GST_BUFFER_PTS (bufs[i]), i * GST_SECOND / 8);
  }
  for (int i = 2; i < 6; i++) {
    GstMapInfo a, b;
    fail_unless (gst_buffer_map (bufs[i % 2], &a, GST_MAP_READ) && gst_buffer_map (bufs[i], &b, GST_MAP_READ));
    fail_unless (a.size == b.size && memcmp (a.data, b.data, a.size) == 0, "frame %d differs from clip 0", i);
    gst_buffer_unmap (bufs[i % 2], &a);
    gst_buffer_unmap (bufs[i], &b);
  }
  for (int i = 0; i < 6; i++)
    gst_buffer_unref (bufs[i]);
  gst_harness_teardown (h);
}
GST_END_TEST;

/* A flushing seek interrupts the clip being made (between steps) and goes
 * on from the clip holding the target frame: frame 5 = clip 1, frame 1. */
static GstBusSyncReply
count_progress (GstBus *bus, GstMessage *msg, gpointer user_data)
{
  if (GST_MESSAGE_TYPE (msg) == GST_MESSAGE_ELEMENT &&
      gst_structure_has_name (gst_message_get_structure (msg), "diffuse-progress"))
    g_atomic_int_inc ((gint *) user_data);
  return GST_BUS_PASS;
}

GST_START_TEST (test_flushing_seek)
{
  GPtrArray *ref = ref_clip ("b", 4, 31);
  GstHarness *h = new_src ("b", 4, 30);
  /* clip 0 takes minutes at this many steps if the seek does not cut it */
  g_object_set (h->element, "loop", TRUE, "num-inference-steps", 500, NULL);
  gint *n = g_new0 (gint, 1);
  GstBus *bus = gst_bus_new ();
  gst_bus_set_sync_handler (bus, count_progress, n, g_free);
  gst_element_set_bus (h->element, bus);
  gst_harness_play (h);
  for (int i = 0; i < 6000 && g_atomic_int_get (n) < 2; i++)
    g_usleep (5000);
  fail_unless (g_atomic_int_get (n) >= 2, "no progress");
  g_object_set (h->element, "num-inference-steps", STEPS, NULL);
  fail_unless (gst_element_seek_simple (h->element, GST_FORMAT_TIME, GST_SEEK_FLAG_FLUSH, 5 * GST_SECOND / 8));
  GstBuffer *buf = gst_harness_pull (h);
  fail_unless (buf != NULL);
  fail_unless_equals_uint64 (GST_BUFFER_PTS (buf), 5 * GST_SECOND / 8);
  fail_unless_equals_uint64 (GST_BUFFER_OFFSET (buf), 5);
  assert_buffer_equals (h, buf, g_ptr_array_index (ref, 1));
  gst_buffer_unref (buf);
  buf = gst_harness_pull (h);
  fail_unless_equals_uint64 (GST_BUFFER_OFFSET (buf), 6);
  assert_buffer_equals (h, buf, g_ptr_array_index (ref, 2));
  gst_buffer_unref (buf);
  gst_element_set_bus (h->element, NULL);
  gst_harness_teardown (h);
  gst_object_unref (bus);
  g_ptr_array_unref (ref);
}
GST_END_TEST;

/* Live: timestamps from the running time, continuous within a clip, and the
 * latency reported is a clip's generation time. */
GST_START_TEST (test_live_latency)
{
  GstHarness *h = new_src ("b", 4, 1);
  gst_harness_use_systemclock (h);
  g_object_set (h->element, "is-live", TRUE, "loop", TRUE, "clips", 2, NULL);
  GstBus *bus = gst_bus_new ();
  gst_element_set_bus (h->element, bus);
  gint64 t0 = g_get_monotonic_time ();
  gst_harness_play (h);
  GstBuffer *first = gst_harness_pull (h);
  gint64 gen_us = g_get_monotonic_time () - t0;
  fail_unless (first != NULL);
  GstClockTime prev = GST_BUFFER_PTS (first);
  fail_unless (GST_CLOCK_TIME_IS_VALID (prev));
  gst_buffer_unref (first);
  for (int i = 1; i < 8; i++) {
    GstBuffer *buf = gst_harness_pull (h);
    fail_unless (buf != NULL);
    fail_unless_equals_uint64 (GST_BUFFER_DURATION (buf), GST_SECOND / 8);
    fail_unless_equals_uint64 (GST_BUFFER_OFFSET (buf), i);
    if (i % 4 != 0) {
      fail_unless_equals_uint64 (GST_BUFFER_PTS (buf), prev + GST_SECOND / 8);
    } else {
      fail_unless (GST_BUFFER_PTS (buf) >= prev + GST_SECOND / 8, "clip 2 starts before clip 1 ends");
    }
    prev = GST_BUFFER_PTS (buf);
    gst_buffer_unref (buf);
  }
  gint64 total_us = g_get_monotonic_time () - t0;
  GstMessage *msg = gst_bus_pop_filtered (bus, GST_MESSAGE_LATENCY);
  fail_unless (msg != NULL, "no latency message");
  gst_message_unref (msg);
  GstQuery *q = gst_query_new_latency ();
  fail_unless (gst_pad_peer_query (h->sinkpad, q));
  gboolean live;
  GstClockTime min, max;
  gst_query_parse_latency (q, &live, &min, &max);
  fail_unless (live);
  /* one clip's generation time: more than nothing, less than the wall time of
   * the two clips (the pull of the 8th frame waited for both) */
  GST_INFO ("latency %" GST_TIME_FORMAT ", first frame after %" G_GINT64_FORMAT " us, 8th after %" G_GINT64_FORMAT
            " us", GST_TIME_ARGS (min), gen_us, total_us);
  fail_unless (min > 0 && min < (GstClockTime) total_us * 1000, "latency %" GST_TIME_FORMAT " for 2 clips in %"
               G_GINT64_FORMAT " us", GST_TIME_ARGS (min), total_us);
  gst_query_unref (q);
  gst_element_set_bus (h->element, NULL);
  gst_object_unref (bus);
  gst_harness_teardown (h);
}
GST_END_TEST;

/* ---- sharing with diffusetext2img ------------------------------------------------ */

static GstElement *
new_element (const char *factory)
{
  GstElement *el = gst_element_factory_make (factory, NULL);
  gchar *model = test_model_path (NULL);
  g_object_set (el, "model", model, "num-inference-steps", 1, NULL);
  g_free (model);
  if (g_str_equal (factory, "diffuseanimate")) {
    gchar *ad = adapter_path ("a");
    g_object_set (el, "motion-adapter", ad, NULL);
    g_free (ad);
  }
  return el;
}

/* The adapter's bytes, measured by the core alone in a cache of its own. */
static guint64
adapter_bytes (void)
{
  GError *err = NULL;
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  gchar *model = test_model_path (NULL), *ad_dir = adapter_path ("a");
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, NULL, cache, &err);
  fail_unless (pm != NULL);
  DiffuseComponent *ad = diffuse_animate_load_adapter (pm, ad_dir, NULL, &err);
  fail_unless (ad != NULL, "%s", err ? err->message : "?");
  guint64 bytes = diffuse_component_bytes (ad);
  diffuse_component_unref (ad);
  diffuse_pipeline_model_unref (pm);
  diffuse_component_cache_unref (cache);
  g_free (model);
  g_free (ad_dir);
  return bytes;
}

GST_START_TEST (test_shares_model_with_text2img)
{
  guint64 ad_bytes = adapter_bytes ();
  fail_unless (ad_bytes > 0);

  /* text2img alone */
  GstElement *pipe = gst_pipeline_new (NULL);
  GstElement *t2i = new_element ("diffusetext2img");
  gst_bin_add (GST_BIN (pipe), t2i);
  gst_element_set_state (pipe, GST_STATE_PAUSED);
  guint64 one = get_u64 (t2i, "resident-bytes");
  fail_unless_equals_uint64 (get_u64 (t2i, "load-count"), N_COMPONENTS);
  gst_element_set_state (pipe, GST_STATE_NULL);
  gst_object_unref (pipe);

  /* text2img + animate in one pipeline: one cache, the adapter the only extra load */
  pipe = gst_pipeline_new (NULL);
  t2i = new_element ("diffusetext2img");
  GstElement *anim = new_element ("diffuseanimate");
  gst_bin_add_many (GST_BIN (pipe), t2i, anim, NULL);
  gst_element_set_state (pipe, GST_STATE_PAUSED);
  guint64 both = get_u64 (anim, "resident-bytes");
  GST_INFO ("resident bytes: text2img alone %" G_GUINT64_FORMAT ", with diffuseanimate %" G_GUINT64_FORMAT
            " (adapter %" G_GUINT64_FORMAT ")", one, both, ad_bytes);
  g_print ("sharing: text2img alone %" G_GUINT64_FORMAT " resident bytes; text2img + animate %" G_GUINT64_FORMAT
           " (+%" G_GUINT64_FORMAT ", adapter %" G_GUINT64_FORMAT "); loads %" G_GUINT64_FORMAT "\n", one, both,
           both - one, ad_bytes, get_u64 (anim, "load-count"));
  fail_unless_equals_uint64 (get_u64 (t2i, "resident-bytes"), both);
  fail_unless_equals_uint64 (both, one + ad_bytes);
  fail_unless_equals_uint64 (get_u64 (anim, "load-count"), N_COMPONENTS + 1);
  fail_unless_equals_uint64 (get_u64 (t2i, "load-count"), N_COMPONENTS + 1);
  GstContext *c1 = gst_element_get_context (t2i, "gst.diffuse.cache");
  GstContext *c2 = gst_element_get_context (anim, "gst.diffuse.cache");
  fail_unless (c1 != NULL && c2 != NULL);
  const GValue *v1 = gst_structure_get_value (gst_context_get_structure (c1), "cache");
  const GValue *v2 = gst_structure_get_value (gst_context_get_structure (c2), "cache");
  fail_unless (g_value_get_boxed (v1) == g_value_get_boxed (v2), "two caches");
  gst_context_unref (c1);
  gst_context_unref (c2);
  gst_element_set_state (pipe, GST_STATE_NULL);
  gst_object_unref (pipe);
}
GST_END_TEST;

/* ---- errors ------------------------------------------------------------------------ */

static GstMessage *
start_and_get_error (GstElement *el)
{
  GstBus *bus = gst_bus_new ();
  gst_element_set_bus (el, bus);
  gst_element_set_state (el, GST_STATE_PAUSED);
  GstMessage *msg = wait_bus_message (bus, GST_MESSAGE_ERROR, 20 * GST_SECOND);
  gst_element_set_state (el, GST_STATE_NULL);
  gst_element_set_bus (el, NULL);
  gst_object_unref (bus);
  return msg;
}

/* The ip-adapter* properties: the clip equals the core's with the same
 * IP-Adapter, image and scale (the core's equality to diffusers with an
 * IP-Adapter is tests/core/test-animate.c /animate/ip-adapter), and the
 * adapter changes the frames; without ip-adapter-image: an error. */
GST_START_TEST (test_ip_adapter)
{
  const char *fx = g_getenv ("DIFFUSE_FIXTURES");
  gchar *dir = g_build_filename (fx ? fx : TEST_FIXTURES_DIR, "ip-adapter", NULL);
  gchar *png = g_build_filename (dir, "input.png", NULL);
  GPtrArray *ref = ref_clip_ip ("a", 4, 3, dir, 0.6f);
  GPtrArray *plain = ref_clip ("a", 4, 3);
  GstHarness *h = new_src ("a", 4, 3);
  g_object_set (h->element, "clips", 1, "ip-adapter", dir, "ip-adapter-weight-name", "ip-adapter_tiny.safetensors",
                "ip-adapter-image", png, "ip-adapter-scale", 0.6, "guidance-scale", 7.5, NULL);
  gst_harness_play (h);
  for (int i = 0; i < 4; i++) {
    GstBuffer *buf = gst_harness_pull (h);
    fail_unless (buf != NULL, "frame %d missing", i);
    assert_buffer_equals (h, buf, g_ptr_array_index (ref, i));
    gst_buffer_unref (buf);
  }
  fail_unless (frames_differ (g_ptr_array_index (ref, 0), g_ptr_array_index (plain, 0)),
               "the IP-Adapter did not change the frames");
  gst_harness_teardown (h);
  g_ptr_array_unref (ref);
  g_ptr_array_unref (plain);

  /* the adapter without an image: an error at start naming what is missing */
  GstElement *el = gst_element_factory_make ("diffuseanimate", NULL);
  gchar *model = test_model_path (NULL), *ad = adapter_path ("a");
  g_object_set (el, "model", model, "motion-adapter", ad, "ip-adapter", dir, NULL);
  GstMessage *msg = start_and_get_error (el);
  fail_unless (msg != NULL);
  GError *err = NULL;
  gst_message_parse_error (msg, &err, NULL);
  fail_unless (strstr (err->message, "IP-Adapter") != NULL, "%s", err->message);
  g_error_free (err);
  gst_message_unref (msg);
  gst_object_unref (el);
  g_free (model);
  g_free (ad);
  g_free (png);
  g_free (dir);
}
GST_END_TEST;

GST_START_TEST (test_error_no_adapter)
{
  GstElement *el = new_element ("diffuseanimate");
  g_object_set (el, "motion-adapter", NULL, NULL);
  gchar *bundled = NULL;
  g_object_get (el, "motion-adapter", &bundled, NULL);
  if (bundled) {
    /* a bundled adapter is installed: the default works */
    GST_INFO ("bundled adapter %s", bundled);
    fail_unless (g_file_test (bundled, G_FILE_TEST_IS_DIR));
    g_free (bundled);
  } else {
    GstMessage *msg = start_and_get_error (el);
    assert_error_message (msg, GST_RESOURCE_ERROR, GST_RESOURCE_ERROR_NOT_FOUND, "motion-adapter");
    gst_message_unref (msg);
  }
  g_object_set (el, "motion-adapter", "/nonexistent/adapter-folder", NULL);
  GstMessage *msg = start_and_get_error (el);
  fail_unless (msg != NULL);
  GError *err = NULL;
  gst_message_parse_error (msg, &err, NULL);
  fail_unless (strstr (err->message, "/nonexistent/adapter-folder") != NULL, "%s", err->message);
  g_error_free (err);
  gst_message_unref (msg);
  gst_object_unref (el);
}
GST_END_TEST;

GST_START_TEST (test_error_too_many_frames)
{
  GstElement *el = new_element ("diffuseanimate");
  gchar *ad = adapter_path ("b"); /* motion_max_seq_length 8 */
  g_object_set (el, "motion-adapter", ad, "num-frames", 9, NULL);
  g_free (ad);
  GstMessage *msg = start_and_get_error (el);
  assert_error_message (msg, GST_LIBRARY_ERROR, GST_LIBRARY_ERROR_SETTINGS, "at most 8 frames");
  gst_message_unref (msg);
  gst_object_unref (el);
}
GST_END_TEST;

/* ---- a model that is an AnimateDiff pipeline ------------------------------------- */

/* The core's clip of saved-pipeline/ (saved by diffusers: unet/ a UNetMotionModel),
 * diffuse_animate_new () on it: RGB8 frames of 16x16. */
static GPtrArray *
ref_saved_clip (int frames, guint64 seed)
{
  GError *err = NULL;
  gchar *model = adapter_path ("saved-pipeline");
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, NULL, NULL, &err);
  fail_unless (pm != NULL, "load %s: %s", model, err ? err->message : "?");
  DiffuseAnimate *anim = diffuse_animate_new (pm, &err);
  fail_unless (anim != NULL, "animate: %s", err ? err->message : "?");
  DiffuseAnimateParams p;
  diffuse_animate_default_params (&p);
  p.prompt = PROMPT;
  p.width = p.height = 16;
  p.num_frames = frames;
  p.num_inference_steps = STEPS;
  p.seed = seed;
  GPtrArray *imgs = diffuse_animate_generate (anim, &p, &err);
  fail_unless (imgs != NULL, "generate: %s", err ? err->message : "?");
  GPtrArray *out = g_ptr_array_new_with_free_func (g_free);
  for (guint i = 0; i < imgs->len; i++) {
    guint8 *rgb = g_malloc (16 * 16 * 3);
    diffuse_image_to_rgb8 (g_ptr_array_index (imgs, i), rgb, 16 * 3);
    g_ptr_array_add (out, rgb);
  }
  g_ptr_array_unref (imgs);
  diffuse_animate_unref (anim);
  diffuse_pipeline_model_unref (pm);
  g_free (model);
  return out;
}

/* model=<AnimateDiff folder>, no motion-adapter: the model's own motion
 * modules; with motion-adapter set too, the adapter is ignored (the unet is
 * a UNetMotionModel, as diffusers' from_pipe). */
GST_START_TEST (test_animatediff_model)
{
  GPtrArray *ref = ref_saved_clip (4, 3);
  for (int with_adapter = 0; with_adapter < 2; with_adapter++) {
    GstHarness *h = gst_harness_new ("diffuseanimate");
    gchar *model = adapter_path ("saved-pipeline");
    g_object_set (h->element, "model", model, "num-inference-steps", STEPS, "seed", (gint64) 3, "prompt", PROMPT,
                  "num-frames", 4, "clips", 1, NULL);
    if (with_adapter) {
      gchar *ad = adapter_path ("a");
      g_object_set (h->element, "motion-adapter", ad, NULL);
      g_free (ad);
    }
    g_free (model);
    gst_harness_set_sink_caps_str (h, "video/x-raw,format=RGB");
    gst_harness_play (h);
    for (int i = 0; i < 4; i++) {
      GstBuffer *buf = gst_harness_pull (h);
      fail_unless (buf != NULL, "frame %d missing", i);
      assert_buffer_equals (h, buf, g_ptr_array_index (ref, i));
      gst_buffer_unref (buf);
    }
    gst_harness_teardown (h);
  }
  fail_unless (frames_differ (g_ptr_array_index (ref, 0), g_ptr_array_index (ref, 3)));
  /* the clip length is the unet's motion_max_seq_length (8) */
  GstElement *el = gst_element_factory_make ("diffuseanimate", NULL);
  gchar *model = adapter_path ("saved-pipeline");
  g_object_set (el, "model", model, "num-inference-steps", 1, "num-frames", 9, NULL);
  g_free (model);
  GstMessage *msg = start_and_get_error (el);
  assert_error_message (msg, GST_LIBRARY_ERROR, GST_LIBRARY_ERROR_SETTINGS, "at most 8 frames");
  gst_message_unref (msg);
  gst_object_unref (el);
  g_ptr_array_unref (ref);
}
GST_END_TEST;

static Suite *
diffuseanimate_suite (void)
{
  Suite *s = suite_create ("diffuseanimate");
  TCase *tc = tcase_create ("general");
  tcase_set_timeout (tc, 300);
  suite_add_tcase (s, tc);
  tcase_add_test (tc, test_clip_equals_core);
  tcase_add_test (tc, test_loop_two_clips);
  tcase_add_test (tc, test_loop_endless);
  tcase_add_test (tc, test_flushing_seek);
  tcase_add_test (tc, test_live_latency);
  tcase_add_test (tc, test_shares_model_with_text2img);
  tcase_add_test (tc, test_ip_adapter);
  tcase_add_test (tc, test_error_no_adapter);
  tcase_add_test (tc, test_error_too_many_frames);
  tcase_add_test (tc, test_animatediff_model);
  return s;
}

GST_CHECK_MAIN (diffuseanimate);

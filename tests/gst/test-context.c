/* gst-diffuse — sharing models through the "gst.diffuse.cache" GstContext. */
#include "gstdiffusetest.h"

#define N_COMPONENTS 5 /* tiny-sd: scheduler, text_encoder, tokenizer, unet, vae */

static GstElement *
new_src (const char *name, const char *dtype)
{
  GstElement *el = gst_element_factory_make ("diffusetext2img", name);
  gchar *model = test_model_path (NULL);
  g_object_set (el, "model", model, "num-inference-steps", 1, "num-buffers", 1, NULL);
  if (dtype)
    gst_util_set_object_arg (G_OBJECT (el), "dtype", dtype);
  g_free (model);
  return el;
}

static DiffuseComponentCache *
element_cache (GstElement *el)
{
  GstContext *ctx = gst_element_get_context (el, "gst.diffuse.cache");
  fail_unless (ctx != NULL, "%s has no gst.diffuse.cache context", GST_ELEMENT_NAME (el));
  fail_unless (gst_context_is_persistent (ctx));
  DiffuseComponentCache *cache = NULL;
  GType t = g_type_from_name ("GstDiffuseCache");
  fail_unless (t != 0);
  fail_unless (gst_structure_get (gst_context_get_structure (ctx), "cache", t, &cache, NULL));
  gst_context_unref (ctx);
  diffuse_component_cache_unref (cache); /* the element keeps it alive */
  return cache;
}

/* A model loaded alone: the reference for "one model's worth" of bytes. */
static guint64
single_model_bytes (void)
{
  GstElement *el = new_src (NULL, NULL);
  GstElement *pipe = gst_pipeline_new (NULL);
  gst_bin_add (GST_BIN (pipe), el);
  gst_element_set_state (pipe, GST_STATE_PAUSED);
  guint64 bytes = get_u64 (el, "resident-bytes");
  fail_unless_equals_uint64 (get_u64 (el, "load-count"), N_COMPONENTS);
  gst_element_set_state (pipe, GST_STATE_NULL);
  gst_object_unref (pipe);
  return bytes;
}

/* Two unlinked sources in one pipeline: the second gets the first's cache
 * from the bin (HAVE_CONTEXT cached, NEED_CONTEXT answered). */
GST_START_TEST (test_two_elements_one_pipeline)
{
  guint64 one = single_model_bytes ();
  fail_unless (one > 0);

  GstElement *pipe = gst_pipeline_new (NULL);
  GstElement *a = new_src ("a", NULL), *b = new_src ("b", NULL);
  gst_bin_add_many (GST_BIN (pipe), a, b, NULL);
  gst_element_set_state (pipe, GST_STATE_PAUSED);
  fail_unless (element_cache (a) == element_cache (b), "two caches in one pipeline");
  fail_unless_equals_uint64 (get_u64 (a, "load-count"), N_COMPONENTS);
  fail_unless_equals_uint64 (get_u64 (b, "load-count"), N_COMPONENTS);
  fail_unless_equals_uint64 (get_u64 (a, "resident-bytes"), one);
  fail_unless_equals_uint64 (get_u64 (b, "resident-bytes"), one);
  GST_INFO ("shared: %" G_GUINT64_FORMAT " resident bytes for two elements (one model: %" G_GUINT64_FORMAT ")",
            get_u64 (a, "resident-bytes"), one);

  /* the context survives NULL (persistent) and is reused */
  gst_element_set_state (pipe, GST_STATE_NULL);
  DiffuseComponentCache *c = element_cache (a);
  gst_element_set_state (pipe, GST_STATE_PAUSED);
  fail_unless (element_cache (a) == c && element_cache (b) == c);
  gst_element_set_state (pipe, GST_STATE_NULL);
  gst_object_unref (pipe);
}
GST_END_TEST;

/* Linked source and filter: the filter finds the source's cache by a
 * context query (or the reverse, whichever starts first). */
GST_START_TEST (test_linked_elements_query)
{
  GstHarness *h = gst_harness_new_parse ("diffusetext2img name=src ! diffuseimg2img name=flt");
  GstElement *src = gst_bin_get_by_name (GST_BIN (h->element), "src");
  GstElement *flt = gst_bin_get_by_name (GST_BIN (h->element), "flt");
  gchar *model = test_model_path (NULL);
  g_object_set (src, "model", model, "num-inference-steps", 1, "seed", (gint64) 1, NULL);
  g_object_set (flt, "model", model, "num-inference-steps", 2, "strength", 0.5, NULL);
  g_free (model);
  gst_harness_set_sink_caps_str (h, "video/x-raw,format=RGB");
  gst_harness_play (h);
  GstBuffer *buf = gst_harness_pull (h);
  fail_unless (buf != NULL);
  gst_buffer_unref (buf);
  fail_unless (element_cache (src) == element_cache (flt));
  /* the img2img task reuses the text2img task's components: loaded once */
  fail_unless_equals_uint64 (get_u64 (src, "load-count"), N_COMPONENTS);
  gst_object_unref (src);
  gst_object_unref (flt);
  gst_harness_teardown (h);
}
GST_END_TEST;

/* Another dtype loads only what differs (the dtype-dependent models). */
GST_START_TEST (test_other_dtype_loads_only_difference)
{
  GstElement *pipe = gst_pipeline_new (NULL);
  GstElement *a = new_src ("a", NULL), *b = new_src ("b", "float16");
  gst_bin_add_many (GST_BIN (pipe), a, b, NULL);
  gst_element_set_state (pipe, GST_STATE_PAUSED);
  fail_unless (element_cache (a) == element_cache (b));
  guint64 loads = get_u64 (a, "load-count");
  GST_INFO ("float32 + float16: %" G_GUINT64_FORMAT " loads", loads);
  fail_unless (loads > N_COMPONENTS && loads < 2 * N_COMPONENTS, "loads %" G_GUINT64_FORMAT, loads);
  gst_element_set_state (pipe, GST_STATE_NULL);
  gst_object_unref (pipe);
}
GST_END_TEST;

/* The application's own cache, given to two pipelines. */
GST_START_TEST (test_application_context_two_pipelines)
{
  GstElement *p1 = gst_pipeline_new (NULL), *p2 = gst_pipeline_new (NULL);
  GstElement *a = new_src ("a", NULL), *b = new_src ("b", NULL);
  gst_bin_add (GST_BIN (p1), a);
  gst_bin_add (GST_BIN (p2), b);

  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  GType t = g_type_from_name ("GstDiffuseCache");
  fail_unless (t != 0, "plugin not loaded");
  GstContext *ctx = gst_context_new ("gst.diffuse.cache", TRUE);
  gst_structure_set (gst_context_writable_structure (ctx), "cache", t, cache, NULL);
  gst_element_set_context (p1, ctx);
  gst_element_set_context (p2, ctx);
  gst_context_unref (ctx);

  gst_element_set_state (p1, GST_STATE_PAUSED);
  gst_element_set_state (p2, GST_STATE_PAUSED);
  fail_unless (element_cache (a) == cache && element_cache (b) == cache);
  DiffuseCacheStats st;
  diffuse_component_cache_get_stats (cache, &st);
  fail_unless_equals_uint64 (st.n_loads, N_COMPONENTS);
  fail_unless (st.n_hits >= N_COMPONENTS);
  fail_unless_equals_uint64 (get_u64 (b, "resident-bytes"), st.resident_bytes);

  gst_element_set_state (p1, GST_STATE_NULL);
  gst_element_set_state (p2, GST_STATE_NULL);
  diffuse_component_cache_get_stats (cache, &st);
  fail_unless_equals_uint64 (st.resident_bytes, 0); /* nothing held once stopped */
  gst_object_unref (p1);
  gst_object_unref (p2);
  diffuse_component_cache_unref (cache);
}
GST_END_TEST;

/* A NEED_CONTEXT answered by the application from a bus sync handler. */
static GstBusSyncReply
answer_need_context (GstBus *bus, GstMessage *msg, gpointer user_data)
{
  const gchar *type;
  if (GST_MESSAGE_TYPE (msg) == GST_MESSAGE_NEED_CONTEXT && gst_message_parse_context_type (msg, &type) &&
      g_strcmp0 (type, "gst.diffuse.cache") == 0) {
    GstContext *ctx = gst_context_new ("gst.diffuse.cache", TRUE);
    gst_structure_set (gst_context_writable_structure (ctx), "cache", g_type_from_name ("GstDiffuseCache"),
                       user_data, NULL);
    gst_element_set_context (GST_ELEMENT (GST_MESSAGE_SRC (msg)), ctx);
    gst_context_unref (ctx);
  }
  return GST_BUS_PASS;
}

GST_START_TEST (test_need_context_answered)
{
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  GstElement *pipe = gst_pipeline_new (NULL);
  GstElement *a = new_src ("a", NULL);
  gst_bin_add (GST_BIN (pipe), a);
  GstBus *bus = gst_pipeline_get_bus (GST_PIPELINE (pipe));
  gst_bus_set_sync_handler (bus, answer_need_context, cache, NULL);
  gst_element_set_state (pipe, GST_STATE_PAUSED);
  fail_unless (element_cache (a) == cache);
  DiffuseCacheStats st;
  diffuse_component_cache_get_stats (cache, &st);
  fail_unless_equals_uint64 (st.n_loads, N_COMPONENTS);
  gst_element_set_state (pipe, GST_STATE_NULL);
  gst_bus_set_sync_handler (bus, NULL, NULL, NULL);
  gst_object_unref (bus);
  gst_object_unref (pipe);
  diffuse_component_cache_unref (cache);
}
GST_END_TEST;

static Suite *
diffusecontext_suite (void)
{
  Suite *s = suite_create ("diffusecontext");
  TCase *tc = tcase_create ("general");
  tcase_set_timeout (tc, 300);
  suite_add_tcase (s, tc);
  tcase_add_test (tc, test_two_elements_one_pipeline);
  tcase_add_test (tc, test_linked_elements_query);
  tcase_add_test (tc, test_other_dtype_loads_only_difference);
  tcase_add_test (tc, test_application_context_two_pipelines);
  tcase_add_test (tc, test_need_context_answered);
  return s;
}

GST_CHECK_MAIN (diffusecontext);

/* gst-diffuse example: two pipelines sharing one model through one
 * component cache given to both as a "gst.diffuse.cache" GstContext.
 *
 *   shared-cache [MODEL]
 *
 * Pipeline 1 generates frames from a prompt (diffusetext2img), pipeline 2
 * restyles a test pattern (diffuseimg2img); both name the same model, so
 * each of its components is loaded once.  At the end the cache's counters
 * are printed.  MODEL is a diffusers folder or a Hub repo id (default: the
 * bundled model). */
#include <gst/gst.h>
#include <diffuse/pipeline.h>

typedef struct {
  GMainLoop *loop;
  int running;
  gboolean failed;
} App;

static gboolean
on_message (GstBus *bus, GstMessage *msg, gpointer user_data)
{
  App *app = user_data;
  switch (GST_MESSAGE_TYPE (msg)) {
    case GST_MESSAGE_ERROR: {
      GError *err = NULL;
      gchar *dbg = NULL;
      gst_message_parse_error (msg, &err, &dbg);
      g_printerr ("error from %s: %s\n(%s)\n", GST_OBJECT_NAME (GST_MESSAGE_SRC (msg)), err->message, dbg);
      g_error_free (err);
      g_free (dbg);
      app->failed = TRUE;
    }
      /* fall through */
    case GST_MESSAGE_EOS:
      if (--app->running == 0)
        g_main_loop_quit (app->loop);
      break;
    case GST_MESSAGE_ELEMENT: {
      const GstStructure *s = gst_message_get_structure (msg);
      if (gst_structure_has_name (s, "diffuse-progress")) {
        int step = 0, total = 0;
        guint64 frame = 0;
        gst_structure_get (s, "step", G_TYPE_INT, &step, "total", G_TYPE_INT, &total, "frame", G_TYPE_UINT64, &frame,
                           NULL);
        g_print ("%s: frame %" G_GUINT64_FORMAT " step %d/%d\n", GST_OBJECT_NAME (GST_MESSAGE_SRC (msg)), frame, step,
                 total);
      }
      break;
    }
    default:
      break;
  }
  return TRUE;
}

int
main (int argc, char **argv)
{
  gst_init (&argc, &argv);
  const char *model = argc > 1 ? argv[1] : NULL;
  GError *err = NULL;

  GstElement *p1 = gst_parse_launch ("diffusetext2img name=gen num-buffers=2 num-inference-steps=4 seed=1 "
                                     "prompt=\"a castle in the clouds\" ! fakesink", &err);
  if (!p1) {
    g_printerr ("pipeline 1: %s (is the diffuse plugin in GST_PLUGIN_PATH?)\n", err->message);
    return 1;
  }
  GstElement *p2 = gst_parse_launch ("videotestsrc num-buffers=2 ! video/x-raw,width=16,height=16 ! videoconvert "
                                     "! diffuseimg2img name=style num-inference-steps=4 strength=0.6 "
                                     "prompt=\"a pencil drawing\" ! fakesink", &err);
  if (!p2) {
    g_printerr ("pipeline 2: %s\n", err->message);
    return 1;
  }
  GstElement *gen = gst_bin_get_by_name (GST_BIN (p1), "gen");
  GstElement *style = gst_bin_get_by_name (GST_BIN (p2), "style");
  if (model) {
    g_object_set (gen, "model", model, NULL);
    g_object_set (style, "model", model, NULL);
  }

  /* Our own cache, wrapped in a persistent context.  The boxed type is
   * registered by the plugin (loaded by now) under the name GstDiffuseCache. */
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  GstContext *ctx = gst_context_new ("gst.diffuse.cache", TRUE);
  gst_structure_set (gst_context_writable_structure (ctx), "cache", g_type_from_name ("GstDiffuseCache"), cache,
                     NULL);
  gst_element_set_context (p1, ctx);
  gst_element_set_context (p2, ctx);
  gst_context_unref (ctx);

  App app = { g_main_loop_new (NULL, FALSE), 2, FALSE };
  GstBus *b1 = gst_pipeline_get_bus (GST_PIPELINE (p1)), *b2 = gst_pipeline_get_bus (GST_PIPELINE (p2));
  gst_bus_add_watch (b1, on_message, &app);
  gst_bus_add_watch (b2, on_message, &app);

  if (gst_element_set_state (p1, GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE)
    app.running--;
  if (gst_element_set_state (p2, GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE)
    app.running--;
  if (app.running > 0)
    g_main_loop_run (app.loop);

  DiffuseCacheStats st;
  diffuse_component_cache_get_stats (cache, &st);
  guint64 loads = 0, resident = 0;
  g_object_get (gen, "load-count", &loads, "resident-bytes", &resident, NULL);
  g_print ("component cache: %" G_GUINT64_FORMAT " components loaded from files, %" G_GUINT64_FORMAT
           " requests served from the cache, %" G_GUINT64_FORMAT " bytes resident (peak %" G_GUINT64_FORMAT ")\n",
           st.n_loads, st.n_hits, st.resident_bytes, st.peak_bytes);
  g_print ("the elements report: load-count %" G_GUINT64_FORMAT ", resident-bytes %" G_GUINT64_FORMAT "\n", loads,
           resident);

  gst_element_set_state (p1, GST_STATE_NULL);
  gst_element_set_state (p2, GST_STATE_NULL);
  gst_bus_remove_watch (b1);
  gst_bus_remove_watch (b2);
  gst_object_unref (b1);
  gst_object_unref (b2);
  gst_object_unref (gen);
  gst_object_unref (style);
  gst_object_unref (p1);
  gst_object_unref (p2);
  g_main_loop_unref (app.loop);
  gboolean shared = st.n_hits > 0;
  diffuse_component_cache_unref (cache);
  if (app.failed)
    return 1;
  return shared ? 0 : 2;
}

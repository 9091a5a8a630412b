/* gst-diffuse — the "gst.diffuse.cache" GstContext (see gstdiffusecontext.h). */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include "gstdiffusecontext.h"

GST_DEBUG_CATEGORY_STATIC (GST_CAT_CONTEXT);
#define GST_CAT_DEFAULT GST_CAT_CONTEXT

static GRecMutex global_lock;

static void
init_debug (void)
{
  static gsize once = 0;
  if (g_once_init_enter (&once)) {
    GST_DEBUG_CATEGORY_GET (GST_CAT_CONTEXT, "GST_CONTEXT");
    g_once_init_leave (&once, 1);
  }
}

typedef DiffuseComponentCache GstDiffuseCache;
G_DEFINE_BOXED_TYPE (GstDiffuseCache, gst_diffuse_cache, (GBoxedCopyFunc) diffuse_component_cache_ref,
                     (GBoxedFreeFunc) diffuse_component_cache_unref)

void
gst_diffuse_global_lock (void)
{
  g_rec_mutex_lock (&global_lock);
}

void
gst_diffuse_global_unlock (void)
{
  g_rec_mutex_unlock (&global_lock);
}

GstContext *
gst_diffuse_context_new (DiffuseComponentCache *cache)
{
  g_return_val_if_fail (cache != NULL, NULL);
  GstContext *context = gst_context_new (GST_DIFFUSE_CACHE_CONTEXT_TYPE, TRUE);
  GstStructure *s = gst_context_writable_structure (context);
  gst_structure_set (s, GST_DIFFUSE_CACHE_CONTEXT_FIELD, GST_TYPE_DIFFUSE_CACHE, cache, NULL);
  return context;
}

DiffuseComponentCache *
gst_diffuse_context_get_cache (GstContext *context)
{
  DiffuseComponentCache *cache = NULL;
  if (!context || g_strcmp0 (gst_context_get_context_type (context), GST_DIFFUSE_CACHE_CONTEXT_TYPE) != 0)
    return NULL;
  const GstStructure *s = gst_context_get_structure (context);
  if (!gst_structure_get (s, GST_DIFFUSE_CACHE_CONTEXT_FIELD, GST_TYPE_DIFFUSE_CACHE, &cache, NULL))
    return NULL;
  return cache;
}

static gboolean
pad_query (const GValue *item, GValue *value, gpointer user_data)
{
  GstPad *pad = g_value_get_object (item);
  GstQuery *query = user_data;
  if (gst_pad_peer_query (pad, query)) {
    g_value_set_boolean (value, TRUE);
    return FALSE;
  }
  GST_CAT_INFO_OBJECT (GST_CAT_CONTEXT, pad, "pad peer query failed");
  return TRUE;
}

static gboolean
run_query (GstElement *element, GstQuery *query, GstPadDirection direction)
{
  GValue res = G_VALUE_INIT;
  g_value_init (&res, G_TYPE_BOOLEAN);
  g_value_set_boolean (&res, FALSE);
  GstIterator *it = direction == GST_PAD_SRC ? gst_element_iterate_src_pads (element)
                                             : gst_element_iterate_sink_pads (element);
  while (gst_iterator_fold (it, pad_query, &res, query) == GST_ITERATOR_RESYNC)
    gst_iterator_resync (it);
  gst_iterator_free (it);
  return g_value_get_boolean (&res);
}

static gboolean
have_cache (GstElement *element, DiffuseComponentCache **cache_ptr)
{
  GST_OBJECT_LOCK (element);
  gboolean have = *cache_ptr != NULL;
  GST_OBJECT_UNLOCK (element);
  return have;
}

static void
find_cache (GstElement *element, DiffuseComponentCache **cache_ptr)
{
  GstContext *ctxt = NULL;
  /* 1) downstream, 2) upstream */
  GstQuery *query = gst_query_new_context (GST_DIFFUSE_CACHE_CONTEXT_TYPE);
  if (run_query (element, query, GST_PAD_SRC)) {
    gst_query_parse_context (query, &ctxt);
    if (ctxt) {
      GST_CAT_INFO_OBJECT (GST_CAT_CONTEXT, element, "found context (%p) in downstream query", ctxt);
      gst_element_set_context (element, ctxt);
    }
  }
  if (!have_cache (element, cache_ptr) && run_query (element, query, GST_PAD_SINK)) {
    gst_query_parse_context (query, &ctxt);
    if (ctxt) {
      GST_CAT_INFO_OBJECT (GST_CAT_CONTEXT, element, "found context (%p) in upstream query", ctxt);
      gst_element_set_context (element, ctxt);
    }
  }
  gst_query_unref (query);

  /* 3) ask the parent bins and the application; whoever answers calls
   * gst_element_set_context () on us synchronously. */
  if (!have_cache (element, cache_ptr)) {
    GST_CAT_INFO_OBJECT (GST_CAT_CONTEXT, element, "posting need context message");
    gst_element_post_message (element,
                              gst_message_new_need_context (GST_OBJECT_CAST (element), GST_DIFFUSE_CACHE_CONTEXT_TYPE));
  }
}

void
gst_diffuse_ensure_element_cache (GstElement *element, DiffuseComponentCache **cache_ptr)
{
  g_return_if_fail (GST_IS_ELEMENT (element));
  g_return_if_fail (cache_ptr != NULL);
  init_debug ();

  gst_diffuse_global_lock ();
  if (!have_cache (element, cache_ptr))
    find_cache (element, cache_ptr);
  if (!have_cache (element, cache_ptr)) {
    /* 4) nobody has one: create it, keep it and tell the others */
    DiffuseComponentCache *cache = diffuse_component_cache_new ();
    GstContext *context = gst_diffuse_context_new (cache);
    diffuse_component_cache_unref (cache);
    gst_element_set_context (element, context);
    if (!have_cache (element, cache_ptr)) {
      /* the element's set_context did not take it (should not happen) */
      GST_OBJECT_LOCK (element);
      *cache_ptr = gst_diffuse_context_get_cache (context);
      GST_OBJECT_UNLOCK (element);
    }
    GST_CAT_INFO_OBJECT (GST_CAT_CONTEXT, element, "posting have context (%p) message with a new cache", context);
    gst_element_post_message (element, gst_message_new_have_context (GST_OBJECT_CAST (element), context));
  }
  gst_diffuse_global_unlock ();
}

gboolean
gst_diffuse_handle_set_context (GstElement *element, GstContext *context, DiffuseComponentCache **cache_ptr)
{
  g_return_val_if_fail (cache_ptr != NULL, FALSE);
  init_debug ();
  DiffuseComponentCache *cache = gst_diffuse_context_get_cache (context);
  if (!cache)
    return FALSE;
  GST_OBJECT_LOCK (element);
  DiffuseComponentCache *old = *cache_ptr;
  *cache_ptr = cache;
  GST_OBJECT_UNLOCK (element);
  if (old != cache)
    GST_CAT_DEBUG_OBJECT (GST_CAT_CONTEXT, element, "using component cache %p (was %p)", cache, old);
  if (old)
    diffuse_component_cache_unref (old);
  return TRUE;
}

gboolean
gst_diffuse_handle_context_query (GstElement *element, GstQuery *query, DiffuseComponentCache **cache_ptr)
{
  const gchar *context_type;
  init_debug ();
  g_return_val_if_fail (GST_QUERY_TYPE (query) == GST_QUERY_CONTEXT, FALSE);
  gst_query_parse_context_type (query, &context_type);
  if (g_strcmp0 (context_type, GST_DIFFUSE_CACHE_CONTEXT_TYPE) != 0)
    return FALSE;

  GST_OBJECT_LOCK (element);
  DiffuseComponentCache *cache = *cache_ptr ? diffuse_component_cache_ref (*cache_ptr) : NULL;
  GST_OBJECT_UNLOCK (element);
  if (!cache)
    return FALSE;

  GstContext *old = NULL, *context;
  gst_query_parse_context (query, &old);
  if (old) {
    context = gst_context_copy (old);
    gst_structure_set (gst_context_writable_structure (context), GST_DIFFUSE_CACHE_CONTEXT_FIELD,
                       GST_TYPE_DIFFUSE_CACHE, cache, NULL);
  } else {
    context = gst_diffuse_context_new (cache);
  }
  gst_query_set_context (query, context);
  gst_context_unref (context);
  diffuse_component_cache_unref (cache);
  GST_CAT_DEBUG_OBJECT (GST_CAT_CONTEXT, element, "answered context query with cache %p", cache);
  return TRUE;
}

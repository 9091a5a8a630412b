/* gst-diffuse — sharing the core's component cache between elements through
 * a GstContext of type "gst.diffuse.cache".
 *
 * The context's structure holds one field, "cache", of type
 * GST_TYPE_DIFFUSE_CACHE (a boxed DiffuseComponentCache; the GType is named
 * "GstDiffuseCache", so an application that links diffuse-core can make its
 * own context with g_type_from_name ("GstDiffuseCache") once the plugin is
 * loaded).  Contexts are created persistent.
 *
 * The helpers follow gst-libs/gst/cuda/gstcudautils.cpp: query downstream,
 * then upstream, then post NEED_CONTEXT; if nobody answered, create a new
 * cache, set it on the element and post HAVE_CONTEXT.  All of it (and the
 * model loading that follows, see gstdiffusecommon.c) runs under one
 * process-wide lock, so two elements never create two caches or load the
 * same model at the same time. */
#pragma once

#include <gst/gst.h>
#include <diffuse/pipeline.h>

G_BEGIN_DECLS

#define GST_DIFFUSE_CACHE_CONTEXT_TYPE "gst.diffuse.cache"
#define GST_DIFFUSE_CACHE_CONTEXT_FIELD "cache"

#define GST_TYPE_DIFFUSE_CACHE (gst_diffuse_cache_get_type ())
GType gst_diffuse_cache_get_type (void);

/* A new persistent context carrying a reference to cache. */
GstContext *gst_diffuse_context_new (DiffuseComponentCache *cache);
/* The cache a "gst.diffuse.cache" context carries (a new reference), or NULL. */
DiffuseComponentCache *gst_diffuse_context_get_cache (GstContext *context);

/* The process-wide lock held while a cache is looked up or created and
 * while a model is loaded into it. */
void gst_diffuse_global_lock (void);
void gst_diffuse_global_unlock (void);

/* Makes sure *cache_ptr holds a cache: found in the pipeline (peer queries,
 * NEED_CONTEXT) or newly created (then HAVE_CONTEXT is posted).
 * cache_ptr is read and written under the element's object lock.
 * Takes the global lock itself (it is recursive). */
void gst_diffuse_ensure_element_cache (GstElement *element, DiffuseComponentCache **cache_ptr);

/* For GstElementClass::set_context: takes the cache of a
 * "gst.diffuse.cache" context into *cache_ptr (under the object lock),
 * replacing a previous one (the new cache is used from the next start). */
gboolean gst_diffuse_handle_set_context (GstElement *element, GstContext *context,
                                         DiffuseComponentCache **cache_ptr);

/* For pad/element query handlers: answers a GST_QUERY_CONTEXT of our type
 * with *cache_ptr (read under the object lock).  FALSE when not ours or
 * there is no cache yet. */
gboolean gst_diffuse_handle_context_query (GstElement *element, GstQuery *query,
                                           DiffuseComponentCache **cache_ptr);

G_END_DECLS

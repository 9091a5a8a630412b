/* gst-diffuse — hub layer internals shared by hub-cache.c, hub-client.c and
 * the HTTP transport (hub-http-soup.c, or hub-http-none.c without libsoup). */
#pragma once

#include <diffuse/error.h>
#include <diffuse/hub.h>

G_BEGIN_DECLS

/* ---- cache helpers (hub-cache.c) ---- */

gboolean hub_is_commit_hash (const char *s);
gboolean hub_env_true (const char *name);
char *hub_expand_path (const char *path);
/* Validates a repo file path (relative, no "..", no empty component). */
gboolean hub_check_relative_path (const char *path, GError **error);
/* <cache>/models--org--name */
char *hub_storage_folder (const char *cache_dir, const char *repo_id);
/* Content of refs/<revision> (a commit) or NULL. */
char *hub_read_ref (const char *storage, const char *revision);
/* Writes refs/<revision> atomically when it differs; errors are ignored. */
void hub_write_ref (const char *storage, const char *revision, const char *commit);
char *hub_pointer_path (const char *storage, const char *commit, const char *path);
gboolean hub_no_exist_marked (const char *storage, const char *commit, const char *path);
void hub_mark_no_exist (const char *storage, const char *commit, const char *path);
/* trees/<commit>.json (huggingface_hub's tree cache, format_version 1). */
GPtrArray *hub_read_tree_cache (const char *storage, const char *commit, GHashTable **sizes_out);
typedef struct {
  char *path;
  guint64 size;
  char *blob_id;
  char *lfs_sha256;        /* NULL when not an LFS file */
  guint64 lfs_size;
  char *xet_hash;
} HubTreeEntry;
void hub_tree_entry_free (HubTreeEntry *e);
void hub_write_tree_cache (const char *storage, const char *commit, GPtrArray *entries /* HubTreeEntry */);
/* All regular files (followed symlinks) under snapshots/<commit>, sorted. */
GPtrArray *hub_walk_snapshot (const char *storage, const char *commit);
void hub_create_cachedir_tag (const char *cache_dir);
/* Points snapshots/<commit>/<path> at blobs/<etag> with a relative symlink,
 * replacing what was there atomically. */
gboolean hub_link_blob (const char *storage, const char *commit, const char *path,
                        const char *etag, GError **error);
/* Blocking exclusive flock on lock_path (created 0664), polled so that the
 * cancellable is honoured.  Returns the fd, or -1 with error. */
int hub_lock (const char *lock_path, GCancellable *cancellable, GError **error);
void hub_unlock (int fd);
/* Sleeps ms milliseconds; FALSE (and CANCELLED) when cancelled first. */
gboolean hub_sleep_cancellable (guint ms, GCancellable *cancellable, GError **error);

/* ---- HTTP transport ---- */

typedef struct _HubHttp HubHttp;

typedef struct {
  guint status;
  GHashTable *headers;     /* lower-cased name -> value */
} HubResponse;

void hub_response_clear (HubResponse *resp);
const char *hub_response_header (const HubResponse *resp, const char *name);

HubHttp *hub_http_new (const char *user_agent, guint timeout_s);
void hub_http_free (HubHttp *http);
/* One request; redirects are not followed, the body is not decoded.
 * headers: NULL-terminated name, value, name, value, ...  On success *body
 * (when body is not NULL) is the response body stream, to be read then
 * unreffed.  Transport failures are NETWORK (CANCELLED when cancelled). */
gboolean hub_http_send (HubHttp *http, const char *method, const char *url,
                        const char *const *headers, HubResponse *resp, GInputStream **body,
                        GCancellable *cancellable, GError **error);
const char *hub_http_backend_name (void);

G_END_DECLS

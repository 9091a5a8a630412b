/* gst-diffuse — Hugging Face Hub downloads into the huggingface_hub cache.
 *
 * A DiffuseHubClient fetches files of a model repository ("org/name") from a
 * Hub endpoint into the cache layout that Python's huggingface_hub uses, so a
 * cache filled by either side is used by the other:
 *
 *   <cache>/models--org--name/
 *       blobs/<etag>                       file contents (etag = git sha1 or LFS sha256)
 *       snapshots/<commit>/<path>          relative symlinks to ../../blobs/<etag>
 *       refs/<revision>                    the commit a branch / tag / refs/pr/N points at
 *       trees/<commit>.json                the repo's file list at that commit
 *       .no_exist/<commit>/<path>          files known to be absent
 *   <cache>/.locks/models--org--name/<etag>.lock
 *
 * Environment (read by diffuse_hub_client_new when a parameter is left unset;
 * docs/hub.md has the full list): HF_ENDPOINT, HF_TOKEN, HF_TOKEN_PATH,
 * HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_HUB_DOWNLOAD_TIMEOUT.
 *
 * All calls are blocking.  A client may be used by one thread at a time.
 * Errors are in DIFFUSE_ERROR: REPO_NOT_FOUND, REVISION_NOT_FOUND,
 * ENTRY_NOT_FOUND, GATED (401/403), SERVER (5xx/429 after the retries),
 * NETWORK, OFFLINE (offline / unreachable and not cached), DISK_FULL,
 * CHECKSUM (size or hash mismatch), CANCELLED, IO, INVALID_ARGUMENT. */
#pragma once

#include <glib.h>
#include <gio/gio.h>

G_BEGIN_DECLS

typedef struct _DiffuseHubClient DiffuseHubClient;

/* One progress report.  Byte totals are 0 when not (yet) known. */
typedef struct {
  const char *repo_id;
  const char *revision;      /* as the caller gave it */
  const char *path;          /* the file in the repo being transferred */
  guint64 file_done;
  guint64 file_total;
  guint64 overall_done;      /* over the files this call downloads */
  guint64 overall_total;
  guint file_index;          /* 1-based, among n_files */
  guint n_files;             /* files this call has to download (not already cached) */
} DiffuseHubProgress;

/* Called at the start and end of each file and at most every ~100 ms in
 * between.  Return FALSE to cancel (the call then fails with CANCELLED). */
typedef gboolean (*DiffuseHubProgressFunc) (const DiffuseHubProgress *progress, gpointer user_data);

/* Decides whether a repo file (a path like "unet/config.json") is fetched. */
typedef gboolean (*DiffuseHubFileFilter) (const char *path, gpointer user_data);

typedef struct {
  const char *endpoint;      /* NULL: $HF_ENDPOINT, else https://huggingface.co */
  const char *token;         /* NULL: $HF_TOKEN, else the token file; "": send no token */
  const char *cache_dir;     /* NULL: diffuse_hub_cache_dir () */
  gboolean offline;          /* TRUE (or $HF_HUB_OFFLINE=1): use the cache only */
  guint max_retries;         /* retries on 5xx/429/408 and on dropped connections (5) */
  guint retry_base_ms;       /* first backoff wait, doubled each retry (1000) */
  guint retry_max_ms;        /* backoff cap (8000); a Retry-After header is honoured up to 60 s */
  guint timeout_s;           /* network I/O timeout; 0: $HF_HUB_DOWNLOAD_TIMEOUT or 10 */
  gboolean verify_checksums; /* check the sha256 / git-sha1 etag of each download (TRUE) */
  const char *user_agent;    /* appended to the User-Agent (NULL) */
  DiffuseHubProgressFunc progress;
  gpointer progress_data;
  GCancellable *cancellable; /* borrowed; may be NULL */
} DiffuseHubParams;

DiffuseHubParams diffuse_hub_default_params (void);

/* params may be NULL (defaults).  Fails only on an invalid endpoint. */
DiffuseHubClient *diffuse_hub_client_new (const DiffuseHubParams *params, GError **error);
void diffuse_hub_client_free (DiffuseHubClient *client);
const char *diffuse_hub_client_get_cache_dir (DiffuseHubClient *client);
const char *diffuse_hub_client_get_endpoint (DiffuseHubClient *client);
gboolean diffuse_hub_client_is_offline (DiffuseHubClient *client);

/* The commit (40 hex digits) of revision: a branch, a tag, "refs/pr/N" or a
 * commit hash (NULL = "main").  A commit hash is returned as is; offline or
 * when the Hub cannot be reached, refs/<revision> of the cache is used. */
char *diffuse_hub_resolve_revision (DiffuseHubClient *client, const char *repo_id,
                                    const char *revision, GError **error);

/* The repo's files at revision (sorted paths, element type char*), from the
 * model-info API; offline, from the cached tree listing or else the snapshot
 * folder.  commit_out (may be NULL) receives the commit. */
GPtrArray *diffuse_hub_list_files (DiffuseHubClient *client, const char *repo_id,
                                   const char *revision, char **commit_out, GError **error);

/* Fetches one file (unless cached) and returns its snapshot path
 * <cache>/models--org--name/snapshots/<commit>/<path>. */
char *diffuse_hub_download_file (DiffuseHubClient *client, const char *repo_id,
                                 const char *revision, const char *path, GError **error);

/* Lists the repo, fetches every file that filter accepts (all files when
 * filter is NULL) and returns the snapshot folder .../snapshots/<commit>.
 * Typical two-phase use: list_files + download_file ("model_index.json"),
 * build the filter from it, then snapshot with the commit. */
char *diffuse_hub_snapshot (DiffuseHubClient *client, const char *repo_id, const char *revision,
                            DiffuseHubFileFilter filter, gpointer user_data, GError **error);

/* Same with an explicit list of paths (NULL-terminated). */
char *diffuse_hub_snapshot_paths (DiffuseHubClient *client, const char *repo_id, const char *revision,
                                  const char *const *paths, GError **error);

/* The cache root: $HF_HUB_CACHE, $HUGGINGFACE_HUB_CACHE, $HF_HOME/hub,
 * $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub. */
char *diffuse_hub_cache_dir (void);

/* "models--org--name" */
char *diffuse_hub_repo_folder_name (const char *repo_id);

/* The cached snapshot path of path at revision, or NULL when not cached
 * (huggingface_hub's try_to_load_from_cache; no network, no error). */
char *diffuse_hub_try_load_from_cache (const char *cache_dir, const char *repo_id,
                                       const char *revision, const char *path);

/* TRUE when ref is not an existing local path and is a valid Hub repo id
 * ("name" or "namespace/name", as huggingface_hub's validate_repo_id). */
gboolean diffuse_is_repo_id (const char *ref);

/* Python fnmatch.fnmatchcase: '*' (also across '/'), '?', [seq], [!seq].
 * The matching used for diffusers' allow/ignore patterns. */
gboolean diffuse_hub_fnmatch (const char *pattern, const char *string);

G_END_DECLS

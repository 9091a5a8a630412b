/* A Hugging Face Hub look-alike for the tests: a SoupServer in a helper
 * thread on 127.0.0.1, serving repos from fixture folders with the Hub's
 * endpoints and headers, plus a "CDN" reached as localhost:<other port>
 * where large (LFS) files are redirected.  Faults can be injected.
 *
 * Endpoints:
 *   GET  /api/models/{repo}[/revision/{rev}]        model info (siblings; ?blobs=true adds sizes)
 *   GET  /api/models/{repo}/tree/{rev}[/{path}]     tree listing (?recursive=true)
 *   HEAD/GET /{repo}/resolve/{rev}/{path}           file: 200 (regular), 307 to
 *        /api/resolve-cache/... (regular file at a branch), 302 to the CDN (LFS)
 *   HEAD/GET /api/resolve-cache/models/{repo}/{commit}/{path}
 *   HEAD/GET cdn: /cdn/{repo}/{sha256}/{path}       Range supported; a request with an
 *        Authorization header is refused (400), as object stores do. */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

typedef struct _HubServer HubServer;

typedef enum {
  HUB_ACCESS_PUBLIC,
  HUB_ACCESS_PRIVATE,       /* no token: 401 RepoNotFound */
  HUB_ACCESS_GATED,         /* no token: 401 GatedRepo; the server token is granted */
  HUB_ACCESS_GATED_DENIED,  /* no token: 401 GatedRepo; with the token: 403 GatedRepo */
} HubAccess;

typedef enum {
  HUB_FAULT_STATUS,      /* answer param (e.g. 500, 429); param2 > 0: Retry-After: param2 */
  HUB_FAULT_DROP,        /* GET: close the connection after param bytes of the body */
  HUB_FAULT_STALL,       /* GET: send param bytes, then nothing (the client times out) */
  HUB_FAULT_SLOW,        /* GET: param ms pause after each 8 KiB */
  HUB_FAULT_WRONG_SIZE,  /* HEAD/GET: announce X-Linked-Size / Content-Length + param (metadata only) */
  HUB_FAULT_CORRUPT,     /* GET: flip one byte of the body */
  HUB_FAULT_IGNORE_RANGE /* GET: answer 200 with the whole file to a Range request */
} HubFaultKind;

HubServer *hub_server_new (GError **error);
void hub_server_free (HubServer *server);

const char *hub_server_endpoint (HubServer *server); /* http://127.0.0.1:PORT */
const char *hub_server_cdn (HubServer *server);      /* http://localhost:PORT */
const char *hub_server_token (HubServer *server);    /* the token the server accepts */

/* A JSON manifest: {"token": "...", "repos": [{"id": "org/name", "access":
 * "public|private|gated|gated-denied", "revisions": {"main": "dir", ...}}]}
 * with folders relative to the manifest's folder. */
gboolean hub_server_load_manifest (HubServer *server, const char *path, GError **error);
/* Adds every file under dir to repo at revision (creating both). */
gboolean hub_server_add_dir (HubServer *server, const char *repo_id, const char *revision,
                             const char *dir, GError **error);
void hub_server_add_file (HubServer *server, const char *repo_id, const char *revision,
                          const char *path, GBytes *data);
void hub_server_set_access (HubServer *server, const char *repo_id, HubAccess access);
/* The commit id of repo at revision (newly allocated) or NULL. */
char *hub_server_commit (HubServer *server, const char *repo_id, const char *revision);
/* The blob name (ETag) the server gives path at revision: sha256 for LFS files, git sha1 else. */
char *hub_server_etag (HubServer *server, const char *repo_id, const char *revision, const char *path);

/* A fault for requests whose method is method (NULL: any) and whose path
 * contains match; fires count times (-1: always). */
void hub_server_add_fault (HubServer *server, const char *method, const char *match,
                           HubFaultKind kind, int param, int param2, int count);
void hub_server_clear_faults (HubServer *server);

/* Requests so far, in order: "METHOD hub|cdn PATH[?QUERY] auth|noauth[ range=RANGE]". */
GPtrArray *hub_server_log (HubServer *server);
guint hub_server_request_count (HubServer *server);
void hub_server_clear_log (HubServer *server);

G_END_DECLS

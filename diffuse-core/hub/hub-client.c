/* gst-diffuse — the Hub client: revision resolution, file listing, file
 * downloads into the huggingface_hub cache, snapshots.
 *
 * The behaviour follows huggingface_hub (file_download.py, _snapshot_download.py,
 * utils/_http.py): a HEAD on /resolve/ gives the commit (X-Repo-Commit), the
 * blob name (X-Linked-Etag or ETag), the size (X-Linked-Size or Content-Length)
 * and, for large files, a redirect to another host where the token is not
 * sent.  Downloads go to blobs/<etag>.incomplete under a per-blob lock,
 * resume with Range after a dropped connection, are checked (size, and the
 * sha256 / git-sha1 that the etag is) and renamed into blobs/ atomically;
 * the snapshot symlink and refs/<revision> are written after. */
#include "hub-private.h"

#include <errno.h>
#include <stdio.h>
#include <glib/gstdio.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <json-glib/json-glib.h>

#if defined(__has_include)
#if __has_include("diffuse-config.h")
#include "diffuse-config.h"
#endif
#endif
#ifndef DIFFUSE_VERSION
#define DIFFUSE_VERSION "0"
#endif

#define DEFAULT_ENDPOINT "https://huggingface.co"
#define MAX_REDIRECTS 20
#define MAX_API_BODY (64u << 20)
#define CHUNK_SIZE (256u << 10)
#define PROGRESS_INTERVAL_US (100 * 1000)
#define RETRY_AFTER_CAP_MS 60000u

struct _DiffuseHubClient {
  char *endpoint;
  char *token;
  char *cache_dir;
  gboolean offline;
  guint max_retries;
  guint retry_base_ms;
  guint retry_max_ms;
  guint timeout_s;
  gboolean verify;
  char *user_agent;
  DiffuseHubProgressFunc progress;
  gpointer progress_data;
  GCancellable *cancellable;
};

/* State of one public call. */
typedef struct {
  DiffuseHubClient *client;
  HubHttp *http;
  const char *repo_id;
  const char *revision;     /* as given, for progress and messages */
  DiffuseHubProgress prog;
  gint64 last_report_us;
  gboolean cancelled;       /* the progress callback returned FALSE */
  gboolean overall_known;   /* overall_total came from the listing */
} Op;

/* ------------------------------------------------------------------ */
/* parameters and client                                               */

DiffuseHubParams
diffuse_hub_default_params (void)
{
  DiffuseHubParams p = { 0 };
  p.max_retries = 5;
  p.retry_base_ms = 1000;
  p.retry_max_ms = 8000;
  p.verify_checksums = TRUE;
  return p;
}

static char *
clean_token (const char *t)
{
  if (!t)
    return NULL;
  GString *s = g_string_new (NULL);
  for (const char *c = t; *c; c++)
    if (*c != '\r' && *c != '\n')
      g_string_append_c (s, *c);
  g_strstrip (s->str);
  if (!s->str[0]) {
    g_string_free (s, TRUE);
    return NULL;
  }
  return g_string_free (s, FALSE);
}

static char *
hf_home (void)
{
  const char *v = g_getenv ("HF_HOME");
  if (v && *v)
    return hub_expand_path (v);
  v = g_getenv ("XDG_CACHE_HOME");
  if (v && *v) {
    char *x = hub_expand_path (v);
    char *r = g_build_filename (x, "huggingface", NULL);
    g_free (x);
    return r;
  }
  return g_build_filename (g_get_home_dir (), ".cache", "huggingface", NULL);
}

/* HF_TOKEN (or the legacy HUGGING_FACE_HUB_TOKEN), else the token file
 * ($HF_TOKEN_PATH or $HF_HOME/token); none with HF_HUB_DISABLE_IMPLICIT_TOKEN. */
static char *
token_from_environment (void)
{
  if (hub_env_true ("HF_HUB_DISABLE_IMPLICIT_TOKEN"))
    return NULL;
  const char *v = g_getenv ("HF_TOKEN");
  if (!v || !*v)
    v = g_getenv ("HUGGING_FACE_HUB_TOKEN");
  char *t = clean_token (v);
  if (t)
    return t;
  char *path;
  const char *tp = g_getenv ("HF_TOKEN_PATH");
  if (tp && *tp)
    path = hub_expand_path (tp);
  else {
    char *home = hf_home ();
    path = g_build_filename (home, "token", NULL);
    g_free (home);
  }
  char *contents = NULL;
  if (g_file_get_contents (path, &contents, NULL, NULL))
    t = clean_token (contents);
  g_free (contents);
  g_free (path);
  return t;
}

DiffuseHubClient *
diffuse_hub_client_new (const DiffuseHubParams *params, GError **error)
{
  DiffuseHubParams def = diffuse_hub_default_params ();
  if (!params)
    params = &def;

  const char *ep = params->endpoint;
  if (!ep || !*ep)
    ep = g_getenv ("HF_ENDPOINT");
  if (!ep || !*ep)
    ep = DEFAULT_ENDPOINT;
  char *endpoint = g_strdup (ep);
  while (*endpoint && endpoint[strlen (endpoint) - 1] == '/')
    endpoint[strlen (endpoint) - 1] = '\0';
  GUri *uri = g_uri_parse (endpoint, G_URI_FLAGS_NONE, NULL);
  gboolean ok = uri && g_uri_get_host (uri) && *g_uri_get_host (uri) &&
                (!g_ascii_strcasecmp (g_uri_get_scheme (uri), "http") ||
                 !g_ascii_strcasecmp (g_uri_get_scheme (uri), "https"));
  if (uri)
    g_uri_unref (uri);
  if (!ok) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "invalid Hub endpoint '%s' (expected http(s)://host[:port])", ep);
    g_free (endpoint);
    return NULL;
  }

  DiffuseHubClient *c = g_new0 (DiffuseHubClient, 1);
  c->endpoint = endpoint;
  if (params->token)
    c->token = clean_token (params->token); /* "" -> no token */
  else
    c->token = token_from_environment ();
  c->cache_dir = params->cache_dir && *params->cache_dir ? hub_expand_path (params->cache_dir)
                                                         : diffuse_hub_cache_dir ();
  c->offline = params->offline || hub_env_true ("HF_HUB_OFFLINE") || hub_env_true ("TRANSFORMERS_OFFLINE");
  c->max_retries = params->max_retries;
  c->retry_base_ms = params->retry_base_ms;
  c->retry_max_ms = MAX (params->retry_max_ms, params->retry_base_ms);
  c->timeout_s = params->timeout_s;
  if (!c->timeout_s) {
    const char *t = g_getenv ("HF_HUB_DOWNLOAD_TIMEOUT");
    c->timeout_s = t ? (guint) g_ascii_strtoull (t, NULL, 10) : 0;
    if (!c->timeout_s)
      c->timeout_s = 10;
  }
  c->verify = params->verify_checksums;
  GString *ua = g_string_new (NULL);
  g_string_append_printf (ua, "gst-diffuse/%s; hf_hub/compatible; %s", DIFFUSE_VERSION, hub_http_backend_name ());
  const char *origin = g_getenv ("HF_HUB_USER_AGENT_ORIGIN");
  if (origin && *origin)
    g_string_append_printf (ua, "; origin/%s", origin);
  if (params->user_agent && *params->user_agent)
    g_string_append_printf (ua, "; %s", params->user_agent);
  c->user_agent = g_string_free (ua, FALSE);
  c->progress = params->progress;
  c->progress_data = params->progress_data;
  c->cancellable = params->cancellable ? g_object_ref (params->cancellable) : NULL;
  return c;
}

void
diffuse_hub_client_free (DiffuseHubClient *c)
{
  if (!c)
    return;
  g_free (c->endpoint);
  g_free (c->token);
  g_free (c->cache_dir);
  g_free (c->user_agent);
  g_clear_object (&c->cancellable);
  g_free (c);
}

const char *
diffuse_hub_client_get_cache_dir (DiffuseHubClient *c)
{
  g_return_val_if_fail (c != NULL, NULL);
  return c->cache_dir;
}

const char *
diffuse_hub_client_get_endpoint (DiffuseHubClient *c)
{
  g_return_val_if_fail (c != NULL, NULL);
  return c->endpoint;
}

gboolean
diffuse_hub_client_is_offline (DiffuseHubClient *c)
{
  g_return_val_if_fail (c != NULL, FALSE);
  return c->offline;
}

/* ------------------------------------------------------------------ */
/* per-call state                                                      */

static void
op_init (Op *op, DiffuseHubClient *c, const char *repo_id, const char *revision)
{
  memset (op, 0, sizeof *op);
  op->client = c;
  op->repo_id = repo_id;
  op->revision = revision;
  op->prog.repo_id = repo_id;
  op->prog.revision = revision;
}

static void
op_clear (Op *op)
{
  hub_http_free (op->http);
  op->http = NULL;
}

static HubHttp *
op_http (Op *op)
{
  if (!op->http)
    op->http = hub_http_new (op->client->user_agent, op->client->timeout_s);
  return op->http;
}

static gboolean
op_check_cancel (Op *op, GError **error)
{
  if (op->cancelled || g_cancellable_is_cancelled (op->client->cancellable)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "download of %s cancelled", op->repo_id);
    return FALSE;
  }
  return TRUE;
}

/* Reports progress (throttled unless force); FALSE when the callback cancels. */
static gboolean
op_report (Op *op, gboolean force)
{
  DiffuseHubClient *c = op->client;
  if (!c->progress || op->cancelled)
    return !op->cancelled;
  gint64 now = g_get_monotonic_time ();
  if (!force && now - op->last_report_us < PROGRESS_INTERVAL_US)
    return TRUE;
  op->last_report_us = now;
  if (!c->progress (&op->prog, c->progress_data))
    op->cancelled = TRUE;
  return !op->cancelled;
}

/* ------------------------------------------------------------------ */
/* HTTP: URLs, origins, retries, redirects, error mapping              */

static gboolean
url_origin (const char *url, char **scheme, char **host, int *port)
{
  GUri *u = g_uri_parse (url, G_URI_FLAGS_NONE, NULL);
  if (!u || !g_uri_get_host (u))
    return FALSE;
  *scheme = g_ascii_strdown (g_uri_get_scheme (u), -1);
  *host = g_ascii_strdown (g_uri_get_host (u), -1);
  *port = g_uri_get_port (u);
  if (*port < 0)
    *port = !strcmp (*scheme, "https") ? 443 : !strcmp (*scheme, "http") ? 80 : 0;
  g_uri_unref (u);
  return TRUE;
}

static gboolean
same_origin (const char *a, const char *b)
{
  char *sa = NULL, *ha = NULL, *sb = NULL, *hb = NULL;
  int pa = 0, pb = 0;
  gboolean r = url_origin (a, &sa, &ha, &pa) && url_origin (b, &sb, &hb, &pb) &&
               !strcmp (sa, sb) && !strcmp (ha, hb) && pa == pb;
  g_free (sa);
  g_free (ha);
  g_free (sb);
  g_free (hb);
  return r;
}

static char *
file_url (DiffuseHubClient *c, const char *repo_id, const char *revision, const char *path)
{
  char *rev = g_uri_escape_string (revision, NULL, FALSE);
  char *p = g_uri_escape_string (path, "/", FALSE);
  char *url = g_strdup_printf ("%s/%s/resolve/%s/%s", c->endpoint, repo_id, rev, p);
  g_free (rev);
  g_free (p);
  return url;
}

static gboolean
retryable_status (guint s)
{
  return s == 408 || s == 429 || s == 500 || s == 502 || s == 503 || s == 504;
}

static guint
backoff_ms (DiffuseHubClient *c, guint attempt, const HubResponse *resp)
{
  if (resp && resp->headers) {
    const char *ra = hub_response_header (resp, "retry-after");
    if (ra) {
      while (*ra == ' ')
        ra++;
      if (g_ascii_isdigit (*ra)) {
        guint64 s = g_ascii_strtoull (ra, NULL, 10);
        return (guint) MIN (s * 1000, RETRY_AFTER_CAP_MS);
      }
    }
  }
  guint64 w = c->retry_base_ms;
  for (guint i = 1; i < attempt && w < c->retry_max_ms; i++)
    w *= 2;
  return (guint) MIN (w, (guint64) c->retry_max_ms);
}

void
hub_response_clear (HubResponse *resp)
{
  if (resp->headers)
    g_hash_table_unref (resp->headers);
  resp->headers = NULL;
  resp->status = 0;
}

const char *
hub_response_header (const HubResponse *resp, const char *name)
{
  return resp->headers ? g_hash_table_lookup (resp->headers, name) : NULL;
}

static gboolean
is_redirect (guint s)
{
  return s == 301 || s == 302 || s == 303 || s == 307 || s == 308;
}

static void
close_body (GInputStream **body)
{
  if (body && *body) {
    g_input_stream_close (*body, NULL, NULL);
    g_clear_object (body);
  }
}

/* Sends method to url.  The token goes only to the endpoint's origin.
 * Redirects to the endpoint's origin are followed; others only when
 * follow_offsite (else the redirect response is returned, as huggingface_hub
 * does for the metadata HEAD).  With retry, 408/429/5xx responses and
 * transport failures are retried with backoff up to max_retries times; the
 * last response is returned (status mapping is the caller's).
 * final_url (may be NULL) receives the URL that gave the response. */
static gboolean
request (Op *op, const char *method, const char *url, gboolean retry, gboolean follow_offsite,
         const char *range, HubResponse *resp, GInputStream **body, char **final_url, GError **error)
{
  DiffuseHubClient *c = op->client;
  char *cur = g_strdup (url);
  guint attempt = 0, redirects = 0;
  memset (resp, 0, sizeof *resp);
  if (body)
    *body = NULL;

  for (;;) {
    if (!op_check_cancel (op, error))
      break;
    char *auth = NULL;
    const char *headers[10];
    int n = 0;
    headers[n++] = "Accept-Encoding";
    headers[n++] = "identity";
    if (c->token && same_origin (cur, c->endpoint)) {
      auth = g_strconcat ("Bearer ", c->token, NULL);
      headers[n++] = "Authorization";
      headers[n++] = auth;
    }
    if (range) {
      headers[n++] = "Range";
      headers[n++] = range;
    }
    headers[n] = NULL;
    GError *local = NULL;
    gboolean sent = hub_http_send (op_http (op), method, cur, headers, resp, body, c->cancellable, &local);
    g_free (auth);
    if (!sent) {
      if (g_error_matches (local, DIFFUSE_ERROR, DIFFUSE_ERROR_NETWORK) && retry && attempt < c->max_retries) {
        attempt++;
        g_debug ("%s %s: %s; retry %u/%u", method, cur, local->message, attempt, c->max_retries);
        g_clear_error (&local);
        if (!hub_sleep_cancellable (backoff_ms (c, attempt, NULL), c->cancellable, error))
          break;
        continue;
      }
      g_propagate_error (error, local);
      break;
    }
    if (is_redirect (resp->status) && hub_response_header (resp, "location")) {
      GUri *base = g_uri_parse (cur, G_URI_FLAGS_NONE, NULL);
      GUri *target = base ? g_uri_parse_relative (base, hub_response_header (resp, "location"),
                                                  G_URI_FLAGS_NONE, NULL)
                          : NULL;
      char *next = target ? g_uri_to_string (target) : NULL;
      if (target)
        g_uri_unref (target);
      if (base)
        g_uri_unref (base);
      if (next && (follow_offsite || same_origin (cur, next))) {
        if (++redirects > MAX_REDIRECTS) {
          g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NETWORK, "%s %s: too many redirects", method, url);
          g_free (next);
          close_body (body);
          hub_response_clear (resp);
          break;
        }
        close_body (body);
        hub_response_clear (resp);
        g_free (cur);
        cur = next;
        continue;
      }
      g_free (next);
    }
    if (retryable_status (resp->status) && retry && attempt < c->max_retries) {
      attempt++;
      guint wait = backoff_ms (c, attempt, resp);
      g_debug ("%s %s: HTTP %u; retry %u/%u in %u ms", method, cur, resp->status, attempt, c->max_retries, wait);
      close_body (body);
      hub_response_clear (resp);
      if (!hub_sleep_cancellable (wait, c->cancellable, error))
        break;
      continue;
    }
    if (final_url)
      *final_url = g_steal_pointer (&cur);
    g_free (cur);
    return TRUE;
  }
  g_free (cur);
  return FALSE;
}

/* Maps an HTTP error response to a DIFFUSE_ERROR (as hf_raise_for_status). */
static void
set_http_error (Op *op, GError **error, const HubResponse *r, const char *url, const char *path)
{
  const char *code = hub_response_header (r, "x-error-code");
  const char *msg = hub_response_header (r, "x-error-message");
  const char *repo = op->repo_id, *rev = op->revision ? op->revision : "main";
  gboolean tok = op->client->token != NULL;
  const char *hint = tok ? "" : " (no token was sent: set HF_TOKEN or log in with `hf auth login`)";
  guint s = r->status;
  if (!g_strcmp0 (code, "RevisionNotFound"))
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_REVISION_NOT_FOUND,
                 "revision '%s' not found in Hub repo '%s' (HTTP %u, %s)", rev, repo, s, url);
  else if (!g_strcmp0 (code, "EntryNotFound") || (s == 404 && path && !code))
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_ENTRY_NOT_FOUND,
                 "file '%s' not found in Hub repo '%s' at revision '%s' (HTTP %u)", path ? path : "?", repo, rev, s);
  else if (!g_strcmp0 (code, "GatedRepo"))
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_GATED,
                 "Hub repo '%s' is gated: accept its conditions on the Hub and use a token with access%s (HTTP %u%s%s)",
                 repo, hint, s, msg ? ": " : "", msg ? msg : "");
  else if (!g_strcmp0 (code, "RepoNotFound") || s == 404)
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_REPO_NOT_FOUND,
                 "Hub repo '%s' not found at %s (HTTP %u); if it is private or gated, a token with access is needed%s",
                 repo, op->client->endpoint, s, hint);
  else if (s == 401)
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_GATED,
                 "Hub repo '%s': authentication required (HTTP 401%s%s)%s", repo, msg ? ": " : "",
                 msg ? msg : "", tok ? "; check that the token is valid" : hint);
  else if (s == 403)
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_GATED,
                 "Hub repo '%s': access denied (HTTP 403%s%s); the token lacks permission for it%s", repo,
                 msg ? ": " : "", msg ? msg : "", hint);
  else if (retryable_status (s) || s >= 500)
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_SERVER,
                 "Hub server error HTTP %u for %s (repo '%s'%s%s) after %u retries", s, url, repo,
                 path ? ", file " : "", path ? path : "", op->client->max_retries);
  else
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "HTTP %u for %s (repo '%s')", s, url, repo);
}

/* Errors after which a cached copy is used (as huggingface_hub does):
 * everything but a missing revision or file. */
static gboolean
cache_fallback_ok (const GError *e)
{
  return e && e->domain == DIFFUSE_ERROR && e->code != DIFFUSE_ERROR_REVISION_NOT_FOUND &&
         e->code != DIFFUSE_ERROR_ENTRY_NOT_FOUND && e->code != DIFFUSE_ERROR_CANCELLED &&
         e->code != DIFFUSE_ERROR_INVALID_ARGUMENT;
}

static GBytes *
read_all (Op *op, GInputStream *in, const char *url, GError **error)
{
  GByteArray *buf = g_byte_array_new ();
  guint8 tmp[16384];
  for (;;) {
    GError *local = NULL;
    gssize n = g_input_stream_read (in, tmp, sizeof tmp, op->client->cancellable, &local);
    if (n < 0) {
      g_set_error (error, DIFFUSE_ERROR,
                   g_error_matches (local, G_IO_ERROR, G_IO_ERROR_CANCELLED) ? DIFFUSE_ERROR_CANCELLED
                                                                              : DIFFUSE_ERROR_NETWORK,
                   "reading %s: %s", url, local->message);
      g_error_free (local);
      g_byte_array_unref (buf);
      return NULL;
    }
    if (n == 0)
      break;
    if (buf->len + (gsize) n > MAX_API_BODY) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "%s: response larger than %u bytes", url, MAX_API_BODY);
      g_byte_array_unref (buf);
      return NULL;
    }
    g_byte_array_append (buf, tmp, (guint) n);
  }
  return g_byte_array_free_to_bytes (buf);
}

/* ------------------------------------------------------------------ */
/* listing                                                             */

typedef struct {
  char *commit;
  GPtrArray *paths;        /* sorted char* */
  GHashTable *sizes;       /* path -> guint64*, may be NULL */
} Listing;

static void
listing_clear (Listing *l)
{
  g_clear_pointer (&l->commit, g_free);
  g_clear_pointer (&l->paths, g_ptr_array_unref);
  g_clear_pointer (&l->sizes, g_hash_table_unref);
}

static int
cmp_str_ptr (gconstpointer a, gconstpointer b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

static gboolean
parse_model_info (Op *op, GBytes *body, const char *url, const char *storage, Listing *out, GError **error)
{
  JsonParser *parser = json_parser_new ();
  gsize len;
  const char *data = g_bytes_get_data (body, &len);
  GError *local = NULL;
  gboolean ok = FALSE;
  if (!json_parser_load_from_data (parser, data, (gssize) len, &local)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "model info of '%s' (%s) is not JSON: %s",
                 op->repo_id, url, local->message);
    g_error_free (local);
    g_object_unref (parser);
    return FALSE;
  }
  JsonNode *root = json_parser_get_root (parser);
  JsonObject *o = root && JSON_NODE_HOLDS_OBJECT (root) ? json_node_get_object (root) : NULL;
  const char *sha = o && json_object_has_member (o, "sha") ? json_object_get_string_member (o, "sha") : NULL;
  JsonArray *sib = o && json_object_has_member (o, "siblings") &&
                       JSON_NODE_HOLDS_ARRAY (json_object_get_member (o, "siblings"))
                     ? json_object_get_array_member (o, "siblings")
                     : NULL;
  if (!hub_is_commit_hash (sha) || !sib) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT,
                 "model info of '%s' (%s) lacks a commit 'sha' or 'siblings'", op->repo_id, url);
    goto out;
  }
  out->commit = g_strdup (sha);
  out->paths = g_ptr_array_new_with_free_func (g_free);
  out->sizes = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  GPtrArray *entries = g_ptr_array_new_with_free_func ((GDestroyNotify) hub_tree_entry_free);
  gboolean complete = TRUE; /* all entries carry size + blobId: the tree cache can be written */
  for (guint i = 0; i < json_array_get_length (sib); i++) {
    JsonNode *n = json_array_get_element (sib, i);
    if (!JSON_NODE_HOLDS_OBJECT (n))
      continue;
    JsonObject *so = json_node_get_object (n);
    const char *name = json_object_has_member (so, "rfilename") ? json_object_get_string_member (so, "rfilename") : NULL;
    if (!name || !hub_check_relative_path (name, NULL))
      continue;
    g_ptr_array_add (out->paths, g_strdup (name));
    HubTreeEntry *e = g_new0 (HubTreeEntry, 1);
    e->path = g_strdup (name);
    if (json_object_has_member (so, "size"))
      e->size = (guint64) MAX (json_object_get_int_member (so, "size"), 0);
    else
      complete = FALSE;
    if (json_object_has_member (so, "blobId"))
      e->blob_id = g_strdup (json_object_get_string_member (so, "blobId"));
    else
      complete = FALSE;
    if (json_object_has_member (so, "lfs") && JSON_NODE_HOLDS_OBJECT (json_object_get_member (so, "lfs"))) {
      JsonObject *lfs = json_object_get_object_member (so, "lfs");
      if (json_object_has_member (lfs, "sha256"))
        e->lfs_sha256 = g_strdup (json_object_get_string_member (lfs, "sha256"));
      if (json_object_has_member (lfs, "size"))
        e->lfs_size = (guint64) MAX (json_object_get_int_member (lfs, "size"), 0);
      if (!e->size)
        e->size = e->lfs_size;
    }
    if (json_object_has_member (so, "xetHash") && !json_object_get_null_member (so, "xetHash"))
      e->xet_hash = g_strdup (json_object_get_string_member (so, "xetHash"));
    guint64 *sz = g_new (guint64, 1);
    *sz = e->lfs_sha256 ? e->lfs_size : e->size;
    g_hash_table_replace (out->sizes, g_strdup (name), sz);
    g_ptr_array_add (entries, e);
  }
  g_ptr_array_sort (out->paths, cmp_str_ptr);
  if (complete)
    hub_write_tree_cache (storage, out->commit, entries);
  g_ptr_array_unref (entries);
  ok = TRUE;
out:
  g_object_unref (parser);
  return ok;
}

/* The listing from the cache only: commit from refs (or revision itself),
 * files from trees/<commit>.json or else the snapshot folder. */
static gboolean
list_from_cache (Op *op, const char *storage, const char *rev, Listing *out)
{
  char *commit = hub_is_commit_hash (rev) ? g_strdup (rev) : hub_read_ref (storage, rev);
  if (!commit)
    return FALSE;
  GHashTable *sizes = NULL;
  GPtrArray *paths = hub_read_tree_cache (storage, commit, &sizes);
  if (!paths) {
    char *snap = g_build_filename (storage, "snapshots", commit, NULL);
    gboolean have = g_file_test (snap, G_FILE_TEST_IS_DIR);
    g_free (snap);
    if (!have) {
      g_free (commit);
      return FALSE;
    }
    paths = hub_walk_snapshot (storage, commit);
  }
  out->commit = commit;
  out->paths = paths;
  out->sizes = sizes;
  return TRUE;
}

static void
set_not_cached_error (Op *op, GError **error, const GError *net_error, const char *what)
{
  const char *rev = op->revision ? op->revision : "main";
  if (!net_error)
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_OFFLINE,
                 "offline mode (HF_HUB_OFFLINE): %s of Hub repo '%s' at revision '%s' is not in the cache %s",
                 what, op->repo_id, rev, op->client->cache_dir);
  else
    g_set_error (error, DIFFUSE_ERROR, net_error->code,
                 "%s of Hub repo '%s' at revision '%s' is not in the cache %s and the Hub failed: %s", what,
                 op->repo_id, rev, op->client->cache_dir, net_error->message);
}

static gboolean
list_files (Op *op, const char *rev, Listing *out, GError **error)
{
  DiffuseHubClient *c = op->client;
  char *storage = hub_storage_folder (c->cache_dir, op->repo_id);
  gboolean ok = FALSE;
  memset (out, 0, sizeof *out);

  if (c->offline) {
    ok = list_from_cache (op, storage, rev, out);
    if (!ok)
      set_not_cached_error (op, error, NULL, "the file list");
    g_free (storage);
    return ok;
  }
  /* a commit whose tree listing is cached needs no network */
  if (hub_is_commit_hash (rev)) {
    GHashTable *sizes = NULL;
    GPtrArray *paths = hub_read_tree_cache (storage, rev, &sizes);
    if (paths) {
      out->commit = g_strdup (rev);
      out->paths = paths;
      out->sizes = sizes;
      g_free (storage);
      return TRUE;
    }
  }

  char *erev = g_uri_escape_string (rev, NULL, FALSE);
  char *url = g_strdup_printf ("%s/api/models/%s/revision/%s?blobs=true", c->endpoint, op->repo_id, erev);
  g_free (erev);
  /* fail fast when a complete cached listing (refs + trees/<commit>.json) can
   * take over, else retry with backoff before falling back to what the
   * snapshot folder holds */
  char *cached_commit = hub_is_commit_hash (rev) ? NULL : hub_read_ref (storage, rev);
  GPtrArray *cached_tree = cached_commit ? hub_read_tree_cache (storage, cached_commit, NULL) : NULL;
  gboolean retry = cached_tree == NULL;
  if (cached_tree)
    g_ptr_array_unref (cached_tree);
  HubResponse resp;
  GInputStream *body = NULL;
  GError *net = NULL;
  if (request (op, "GET", url, retry, TRUE, NULL, &resp, &body, NULL, &net)) {
    if (resp.status == 200) {
      GBytes *bytes = read_all (op, body, url, &net);
      if (bytes) {
        ok = parse_model_info (op, bytes, url, storage, out, &net);
        g_bytes_unref (bytes);
      }
    } else
      set_http_error (op, &net, &resp, url, NULL);
    close_body (&body);
    hub_response_clear (&resp);
  }
  if (ok)
    hub_write_ref (storage, rev, out->commit);
  else if (cache_fallback_ok (net)) {
    listing_clear (out);
    ok = list_from_cache (op, storage, rev, out);
    if (ok)
      g_debug ("listing %s: %s; using the cache", op->repo_id, net->message);
    else if (net->code == DIFFUSE_ERROR_NETWORK || net->code == DIFFUSE_ERROR_SERVER ||
             net->code == DIFFUSE_ERROR_UNSUPPORTED)
      set_not_cached_error (op, error, net, "the file list");
    else
      g_propagate_error (error, g_steal_pointer (&net));
  } else
    g_propagate_error (error, g_steal_pointer (&net));
  g_clear_error (&net);
  g_free (cached_commit);
  g_free (url);
  g_free (storage);
  return ok;
}

/* ------------------------------------------------------------------ */
/* one file                                                            */

typedef struct {
  char *commit;
  char *etag;
  char *location;
  gint64 size; /* -1 unknown */
} FileMeta;

static void
file_meta_clear (FileMeta *m)
{
  g_free (m->commit);
  g_free (m->etag);
  g_free (m->location);
  memset (m, 0, sizeof *m);
}

static char *
normalize_etag (const char *etag)
{
  if (!etag)
    return NULL;
  /* python: etag.lstrip("W/").strip('"') */
  while (*etag == 'W' || *etag == '/')
    etag++;
  while (*etag == '"')
    etag++;
  char *r = g_strdup (etag);
  gsize n = strlen (r);
  while (n && r[n - 1] == '"')
    r[--n] = '\0';
  return r;
}

static gboolean
valid_etag (const char *e)
{
  /* the blob file name: no separators, not empty */
  return e && *e && !strchr (e, '/') && strcmp (e, ".") && strcmp (e, "..") && strlen (e) < 200;
}

static gint64
parse_size (const char *s)
{
  if (!s || !g_ascii_isdigit (*s))
    return -1;
  return (gint64) g_ascii_strtoull (s, NULL, 10);
}

/* HEAD /resolve/: fills meta, or fails with the mapped error.  A 404
 * EntryNotFound with X-Repo-Commit is recorded under .no_exist/. */
static gboolean
head_file (Op *op, const char *storage, const char *rev, const char *path, gboolean retry,
           FileMeta *meta, GError **error)
{
  char *url = file_url (op->client, op->repo_id, rev, path);
  HubResponse resp;
  char *final_url = NULL;
  gboolean ok = FALSE;
  memset (meta, 0, sizeof *meta);
  if (!request (op, "HEAD", url, retry, FALSE, NULL, &resp, NULL, &final_url, error)) {
    g_free (url);
    return FALSE;
  }
  gboolean redirect = is_redirect (resp.status);
  if (resp.status >= 400) {
    const char *commit = hub_response_header (&resp, "x-repo-commit");
    set_http_error (op, error, &resp, url, path);
    if (error && *error && (*error)->code == DIFFUSE_ERROR_ENTRY_NOT_FOUND && hub_is_commit_hash (commit)) {
      hub_mark_no_exist (storage, commit, path);
      hub_write_ref (storage, rev, commit);
    }
    goto out;
  }
  meta->commit = g_strdup (hub_response_header (&resp, "x-repo-commit"));
  const char *linked = hub_response_header (&resp, "x-linked-etag");
  meta->etag = normalize_etag (linked ? linked : hub_response_header (&resp, "etag"));
  const char *lsize = hub_response_header (&resp, "x-linked-size");
  meta->size = lsize ? parse_size (lsize) : redirect ? -1 : parse_size (hub_response_header (&resp, "content-length"));
  if (redirect) {
    GUri *base = g_uri_parse (final_url, G_URI_FLAGS_NONE, NULL);
    GUri *t = base ? g_uri_parse_relative (base, hub_response_header (&resp, "location"), G_URI_FLAGS_NONE, NULL) : NULL;
    meta->location = t ? g_uri_to_string (t) : NULL;
    if (t)
      g_uri_unref (t);
    if (base)
      g_uri_unref (base);
  } else
    meta->location = g_strdup (final_url);
  if (!hub_is_commit_hash (meta->commit)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NETWORK,
                 "the response for %s has no X-Repo-Commit header: %s does not look like a Hub endpoint "
                 "(check HF_ENDPOINT and proxies)", url, op->client->endpoint);
  } else if (!valid_etag (meta->etag)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NETWORK,
                 "the response for %s has no usable ETag: cannot cache '%s' of '%s' reliably", url, path, op->repo_id);
  } else if (!meta->location) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NETWORK, "bad redirect for %s", url);
  } else
    ok = TRUE;
out:
  if (!ok)
    file_meta_clear (meta);
  g_free (final_url);
  hub_response_clear (&resp);
  g_free (url);
  return ok;
}

static gboolean
is_hex (const char *s, gsize n)
{
  if (strlen (s) != n)
    return FALSE;
  for (gsize i = 0; i < n; i++)
    if (!g_ascii_isxdigit (s[i]))
      return FALSE;
  return TRUE;
}

static GChecksum *
make_checksum (DiffuseHubClient *c, const char *etag, gint64 size)
{
  if (!c->verify)
    return NULL;
  if (is_hex (etag, 64))
    return g_checksum_new (G_CHECKSUM_SHA256);
  if (is_hex (etag, 40) && size >= 0) { /* git blob id: sha1("blob <size>\0" + content) */
    GChecksum *ck = g_checksum_new (G_CHECKSUM_SHA1);
    char hdr[48];
    int n = g_snprintf (hdr, sizeof hdr, "blob %" G_GINT64_FORMAT, size);
    g_checksum_update (ck, (const guchar *) hdr, n + 1); /* with the NUL */
    return ck;
  }
  return NULL;
}

static gboolean
write_all (int fd, const guint8 *data, gsize n, const char *path, GError **error)
{
  while (n) {
    ssize_t w = write (fd, data, n);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      int e = errno;
      g_set_error (error, DIFFUSE_ERROR, e == ENOSPC || e == EDQUOT ? DIFFUSE_ERROR_DISK_FULL : DIFFUSE_ERROR_IO,
                   "writing %s: %s", path, g_strerror (e));
      return FALSE;
    }
    data += w;
    n -= (gsize) w;
  }
  return TRUE;
}

/* Feeds the first n bytes of the file at fd to ck. */
static gboolean
hash_prefix (const char *path, guint64 n, GChecksum *ck, GError **error)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "reading %s: %s", path, g_strerror (errno));
    return FALSE;
  }
  guint8 *buf = g_malloc (CHUNK_SIZE);
  gboolean ok = TRUE;
  while (n) {
    ssize_t r = read (fd, buf, MIN (n, CHUNK_SIZE));
    if (r <= 0) {
      if (r < 0 && errno == EINTR)
        continue;
      ok = FALSE;
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "reading %s: %s", path,
                   r < 0 ? g_strerror (errno) : "unexpected end of file");
      break;
    }
    g_checksum_update (ck, buf, r);
    n -= (guint64) r;
  }
  g_free (buf);
  close (fd);
  return ok;
}

static gboolean
check_disk_space (const char *dir, guint64 need, GError **error)
{
  struct statvfs sv;
  if (statvfs (dir, &sv) != 0)
    return TRUE;
  guint64 avail = (guint64) sv.f_bavail * (guint64) sv.f_frsize;
  if (avail < need) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_DISK_FULL,
                 "not enough disk space in %s: %" G_GUINT64_FORMAT " bytes needed, %" G_GUINT64_FORMAT " available",
                 dir, need, avail);
    return FALSE;
  }
  return TRUE;
}

static gboolean
transport_error (const GError *e)
{
  return e && !g_error_matches (e, G_IO_ERROR, G_IO_ERROR_CANCELLED);
}

/* Drops what the partial file holds so the GET starts again at byte 0: the
 * file is truncated, the running hash starts afresh and *have (already
 * counted in the overall progress when `counted`) goes back to 0. */
static gboolean
discard_partial (Op *op, int fd, const char *incomplete, const FileMeta *meta, gint64 expected, gboolean counted,
                 guint64 *have, GChecksum **ck, GError **error)
{
  if (counted)
    op->prog.overall_done -= *have;
  *have = 0;
  if (*ck)
    g_checksum_free (*ck);
  *ck = make_checksum (op->client, meta->etag, expected);
  if (ftruncate (fd, 0) != 0 || lseek (fd, 0, SEEK_SET) != 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "truncating %s: %s", incomplete, g_strerror (errno));
    return FALSE;
  }
  return TRUE;
}

/* GETs meta->location into incomplete (resuming what is there), checks size
 * and hash.  On CHECKSUM / DISK_FULL the partial file is removed; after a
 * network failure or cancellation it stays for a later resume. */
static gboolean
download_blob (Op *op, const char *path, const FileMeta *meta, const char *incomplete, GError **error)
{
  DiffuseHubClient *c = op->client;
  gint64 expected = meta->size;
  int fd = open (incomplete, O_WRONLY | O_CREAT | O_CLOEXEC, 0666);
  if (fd < 0) {
    int e = errno;
    g_set_error (error, DIFFUSE_ERROR, e == ENOSPC ? DIFFUSE_ERROR_DISK_FULL : DIFFUSE_ERROR_IO,
                 "cannot create %s: %s", incomplete, g_strerror (e));
    return FALSE;
  }
  struct stat st;
  guint64 have = 0;
  if (fstat (fd, &st) == 0 && S_ISREG (st.st_mode))
    have = (guint64) st.st_size;
  if (expected >= 0 && have > (guint64) expected)
    have = 0;
  if (S_ISREG (st.st_mode) && ftruncate (fd, (off_t) have) != 0)
    have = 0;
  lseek (fd, (off_t) have, SEEK_SET);

  GChecksum *ck = make_checksum (c, meta->etag, expected);
  gboolean ok = FALSE, remove_partial = FALSE;
  GError *err = NULL;
  if (ck && have && !hash_prefix (incomplete, have, ck, NULL)) {
    /* unreadable partial file: start over */
    if (!discard_partial (op, fd, incomplete, meta, expected, FALSE, &have, &ck, &err)) {
      remove_partial = TRUE;
      goto done;
    }
  }
  if (expected >= 0) {
    char *dir = g_path_get_dirname (incomplete);
    gboolean space = check_disk_space (dir, (guint64) expected - have, &err);
    g_free (dir);
    if (!space) {
      remove_partial = TRUE;
      goto done;
    }
  }

  op->prog.file_done = have;
  op->prog.file_total = expected >= 0 ? (guint64) expected : 0;
  op->prog.overall_done += have;
  if (!op->overall_known && expected >= 0)
    op->prog.overall_total += (guint64) expected;
  if (!op_report (op, TRUE)) {
    op_check_cancel (op, &err);
    goto done;
  }

  guint8 *buf = g_malloc (CHUNK_SIZE);
  guint tries_left = c->max_retries;
  gboolean complete = expected >= 0 && have == (guint64) expected;
  while (!complete) {
    HubResponse resp;
    GInputStream *body = NULL;
    char *range = have ? g_strdup_printf ("bytes=%" G_GUINT64_FORMAT "-", have) : NULL;
    gboolean sent = request (op, "GET", meta->location, TRUE, TRUE, range, &resp, &body, NULL, &err);
    g_free (range);
    if (!sent)
      break;
    gboolean restart = FALSE;
    if (resp.status == 416 && have) {
      restart = TRUE;
    } else if (resp.status == 206 && have) {
      const char *cr = hub_response_header (&resp, "content-range");
      /* "bytes <start>-<end>/<total>" */
      guint64 start = cr && g_str_has_prefix (cr, "bytes ") ? g_ascii_strtoull (cr + 6, NULL, 10) : G_MAXUINT64;
      if (start != have)
        restart = TRUE;
    } else if (resp.status == 200) {
      if (have) { /* the server ignored Range: start over */
        if (!discard_partial (op, fd, incomplete, meta, expected, TRUE, &have, &ck, &err)) {
          close_body (&body);
          hub_response_clear (&resp);
          break;
        }
      }
      if (expected < 0) {
        gint64 cl = parse_size (hub_response_header (&resp, "content-length"));
        if (cl >= 0 && !hub_response_header (&resp, "content-encoding")) {
          expected = cl;
          op->prog.file_total = (guint64) cl;
          if (!op->overall_known)
            op->prog.overall_total += (guint64) cl;
        }
      }
    } else if (resp.status != 206) {
      set_http_error (op, &err, &resp, meta->location, path);
      close_body (&body);
      hub_response_clear (&resp);
      break;
    }
    if (restart) {
      close_body (&body);
      hub_response_clear (&resp);
      if (tries_left-- == 0) {
        g_set_error (&err, DIFFUSE_ERROR, DIFFUSE_ERROR_NETWORK, "cannot resume %s from byte %" G_GUINT64_FORMAT,
                     meta->location, have);
        break;
      }
      if (!discard_partial (op, fd, incomplete, meta, expected, TRUE, &have, &ck, &err))
        break;
      continue;
    }
    hub_response_clear (&resp);

    /* stream the body */
    GError *rerr = NULL;
    gboolean write_failed = FALSE;
    for (;;) {
      gssize n = g_input_stream_read (body, buf, CHUNK_SIZE, c->cancellable, &rerr);
      if (n <= 0)
        break;
      if (!write_all (fd, buf, (gsize) n, incomplete, &err)) {
        write_failed = TRUE;
        break;
      }
      if (ck)
        g_checksum_update (ck, buf, n);
      have += (guint64) n;
      op->prog.file_done = have;
      op->prog.overall_done += (guint64) n;
      tries_left = c->max_retries; /* data arrived: the retry budget is renewed */
      if (!op_report (op, FALSE))
        break;
    }
    close_body (&body);
    if (write_failed) {
      g_clear_error (&rerr);
      remove_partial = TRUE;
      break;
    }
    if (!op_check_cancel (op, &err)) {
      g_clear_error (&rerr);
      break;
    }
    if (rerr) {
      if (g_error_matches (rerr, G_IO_ERROR, G_IO_ERROR_CANCELLED) || !transport_error (rerr) || tries_left == 0) {
        g_set_error (&err, DIFFUSE_ERROR,
                     g_error_matches (rerr, G_IO_ERROR, G_IO_ERROR_CANCELLED) ? DIFFUSE_ERROR_CANCELLED
                                                                             : DIFFUSE_ERROR_NETWORK,
                     "downloading '%s' of '%s' from %s: %s (%" G_GUINT64_FORMAT " bytes kept for a later resume)",
                     path, op->repo_id, meta->location, rerr->message, have);
        g_clear_error (&rerr);
        break;
      }
      tries_left--;
      g_debug ("%s: %s at byte %" G_GUINT64_FORMAT "; resuming", meta->location, rerr->message, have);
      g_clear_error (&rerr);
      if (!hub_sleep_cancellable (backoff_ms (c, 1, NULL), c->cancellable, &err))
        break;
      continue;
    }
    complete = TRUE; /* the response ended cleanly */
  }
  g_free (buf);
  if (!complete)
    goto done;

  if (expected >= 0 && have != (guint64) expected) {
    g_set_error (&err, DIFFUSE_ERROR, DIFFUSE_ERROR_CHECKSUM,
                 "size mismatch for '%s' of Hub repo '%s': the server announced %" G_GINT64_FORMAT
                 " bytes, %" G_GUINT64_FORMAT " were received", path, op->repo_id, expected, have);
    remove_partial = TRUE;
    goto done;
  }
  if (ck) {
    /* a git blob id hashes a header with the size: valid only when it was known */
    const char *got = g_checksum_get_string (ck);
    if (g_ascii_strcasecmp (got, meta->etag) != 0) {
      g_set_error (&err, DIFFUSE_ERROR, DIFFUSE_ERROR_CHECKSUM,
                   "checksum mismatch for '%s' of Hub repo '%s': expected %s, got %s", path, op->repo_id,
                   meta->etag, got);
      remove_partial = TRUE;
      goto done;
    }
  }
  if (fdatasync (fd) != 0 && errno != EINVAL) {
    int e = errno;
    g_set_error (&err, DIFFUSE_ERROR, e == ENOSPC ? DIFFUSE_ERROR_DISK_FULL : DIFFUSE_ERROR_IO,
                 "writing %s: %s", incomplete, g_strerror (e));
    remove_partial = TRUE;
    goto done;
  }
  op->prog.file_done = have;
  op->prog.file_total = have;
  ok = TRUE;
done:
  if (ck)
    g_checksum_free (ck);
  if (close (fd) != 0 && ok) {
    int e = errno;
    g_set_error (&err, DIFFUSE_ERROR, e == ENOSPC ? DIFFUSE_ERROR_DISK_FULL : DIFFUSE_ERROR_IO,
                 "closing %s: %s", incomplete, g_strerror (e));
    ok = FALSE;
    remove_partial = TRUE;
  }
  if (!ok) {
    if (remove_partial || have == 0) /* keep only bytes worth resuming */
      g_unlink (incomplete);
    g_propagate_error (error, err);
  }
  return ok;
}

/* The cache fallback of download_file: pointer at the cached commit. */
static char *
cached_pointer (const char *storage, const char *rev, const char *path, char **commit_out)
{
  char *commit = hub_is_commit_hash (rev) ? g_strdup (rev) : hub_read_ref (storage, rev);
  char *p = NULL;
  if (commit) {
    p = hub_pointer_path (storage, commit, path);
    if (!g_file_test (p, G_FILE_TEST_IS_REGULAR))
      g_clear_pointer (&p, g_free);
  }
  if (commit_out)
    *commit_out = commit;
  else
    g_free (commit);
  return p;
}

static gboolean
set_cache_miss_error (Op *op, const char *storage, const char *rev, const char *path,
                      const GError *net, GError **error)
{
  char *commit = hub_is_commit_hash (rev) ? g_strdup (rev) : hub_read_ref (storage, rev);
  if (commit && hub_no_exist_marked (storage, commit, path))
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_ENTRY_NOT_FOUND,
                 "file '%s' does not exist in Hub repo '%s' at revision '%s' (commit %s, recorded in the cache)",
                 path, op->repo_id, rev, commit);
  else if (!net)
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_OFFLINE,
                 "offline mode (HF_HUB_OFFLINE): file '%s' of Hub repo '%s' at revision '%s' is not in the cache %s",
                 path, op->repo_id, rev, op->client->cache_dir);
  else
    g_set_error (error, DIFFUSE_ERROR, net->code,
                 "file '%s' of Hub repo '%s' at revision '%s' is not in the cache %s and the Hub failed: %s",
                 path, op->repo_id, rev, op->client->cache_dir, net->message);
  g_free (commit);
  return FALSE;
}

static char *
download_file (Op *op, const char *rev, const char *path, GError **error)
{
  DiffuseHubClient *c = op->client;
  if (!hub_check_relative_path (path, error))
    return NULL;
  char *storage = hub_storage_folder (c->cache_dir, op->repo_id);
  char *result = NULL;

  /* a commit hash: the cached file (or a cached absence) needs no network */
  if (hub_is_commit_hash (rev)) {
    char *p = hub_pointer_path (storage, rev, path);
    if (g_file_test (p, G_FILE_TEST_IS_REGULAR)) {
      g_free (storage);
      return p;
    }
    g_free (p);
    if (hub_no_exist_marked (storage, rev, path)) {
      set_cache_miss_error (op, storage, rev, path, NULL, error);
      g_free (storage);
      return NULL;
    }
  }
  if (c->offline) {
    result = cached_pointer (storage, rev, path, NULL);
    if (!result)
      set_cache_miss_error (op, storage, rev, path, NULL, error);
    g_free (storage);
    return result;
  }

  FileMeta meta;
  GError *net = NULL;
  char *fallback = cached_pointer (storage, rev, path, NULL);
  if (!head_file (op, storage, rev, path, fallback == NULL, &meta, &net)) {
    if (fallback && cache_fallback_ok (net)) {
      g_debug ("%s of %s: %s; using the cache", path, op->repo_id, net->message);
      g_error_free (net);
      g_free (storage);
      return fallback;
    }
    if (net->code == DIFFUSE_ERROR_NETWORK || net->code == DIFFUSE_ERROR_SERVER ||
             net->code == DIFFUSE_ERROR_UNSUPPORTED)
      set_cache_miss_error (op, storage, rev, path, net, error);
    else
      g_propagate_error (error, g_steal_pointer (&net));
    g_clear_error (&net);
    g_free (fallback);
    g_free (storage);
    return NULL;
  }
  g_free (fallback);

  char *pointer = hub_pointer_path (storage, meta.commit, path);
  if (g_file_test (pointer, G_FILE_TEST_IS_REGULAR)) {
    hub_write_ref (storage, rev, meta.commit);
    file_meta_clear (&meta);
    g_free (storage);
    return pointer;
  }

  char *blobs = g_build_filename (storage, "blobs", NULL);
  char *blob = g_build_filename (blobs, meta.etag, NULL);
  char *repo_folder = diffuse_hub_repo_folder_name (op->repo_id);
  char *lock_name = g_strconcat (meta.etag, ".lock", NULL);
  char *lock_path = g_build_filename (c->cache_dir, ".locks", repo_folder, lock_name, NULL);
  char *incomplete = g_strconcat (blob, ".incomplete", NULL);
  int lock = -1;

  if (g_mkdir_with_parents (blobs, 0777) != 0) {
    int e = errno;
    g_set_error (error, DIFFUSE_ERROR, e == ENOSPC ? DIFFUSE_ERROR_DISK_FULL : DIFFUSE_ERROR_IO,
                 "cannot create %s: %s", blobs, g_strerror (e));
    goto out;
  }
  hub_create_cachedir_tag (c->cache_dir);
  hub_write_ref (storage, rev, meta.commit);

  lock = hub_lock (lock_path, c->cancellable, error);
  if (lock < 0)
    goto out;
  if (!g_file_test (blob, G_FILE_TEST_IS_REGULAR)) {
    op->prog.path = path;
    op->prog.file_index++;
    if (!download_blob (op, path, &meta, incomplete, error))
      goto out;
    if (rename (incomplete, blob) != 0) {
      int e = errno;
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "cannot move %s to %s: %s", incomplete, blob, g_strerror (e));
      g_unlink (incomplete);
      goto out;
    }
    if (!op_report (op, TRUE)) {
      /* the file is complete and stays; the call still reports the cancellation */
      hub_link_blob (storage, meta.commit, path, meta.etag, NULL);
      op_check_cancel (op, error);
      goto out;
    }
  }
  if (!hub_link_blob (storage, meta.commit, path, meta.etag, error))
    goto out;
  result = g_steal_pointer (&pointer);
out:
  hub_unlock (lock);
  g_free (incomplete);
  g_free (lock_path);
  g_free (lock_name);
  g_free (repo_folder);
  g_free (blob);
  g_free (blobs);
  g_free (pointer);
  file_meta_clear (&meta);
  g_free (storage);
  return result;
}

/* ------------------------------------------------------------------ */
/* public calls                                                        */

static gboolean
check_args (const char *repo_id, const char *revision, GError **error)
{
  if (!repo_id || !*repo_id || repo_id[0] == '/' || strstr (repo_id, "..") || strchr (repo_id, '\\')) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "invalid Hub repo id '%s'",
                 repo_id ? repo_id : "(null)");
    return FALSE;
  }
  const char *slash = strchr (repo_id, '/');
  if (slash && (strchr (slash + 1, '/') || slash == repo_id || !slash[1])) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "invalid Hub repo id '%s' (expected 'name' or 'namespace/name')", repo_id);
    return FALSE;
  }
  if (revision && !hub_check_relative_path (revision, NULL)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "invalid revision '%s' for '%s'",
                 revision, repo_id);
    return FALSE;
  }
  return TRUE;
}

char *
diffuse_hub_resolve_revision (DiffuseHubClient *c, const char *repo_id, const char *revision, GError **error)
{
  g_return_val_if_fail (c != NULL, NULL);
  const char *rev = revision ? revision : "main";
  if (!check_args (repo_id, rev, error))
    return NULL;
  if (hub_is_commit_hash (rev))
    return g_strdup (rev);
  Op op;
  op_init (&op, c, repo_id, rev);
  Listing l;
  char *commit = NULL;
  if (c->offline) {
    char *storage = hub_storage_folder (c->cache_dir, repo_id);
    commit = hub_read_ref (storage, rev);
    if (!commit)
      set_not_cached_error (&op, error, NULL, "the revision");
    g_free (storage);
  } else if (list_files (&op, rev, &l, error)) {
    commit = g_steal_pointer (&l.commit);
    listing_clear (&l);
  }
  op_clear (&op);
  return commit;
}

GPtrArray *
diffuse_hub_list_files (DiffuseHubClient *c, const char *repo_id, const char *revision,
                        char **commit_out, GError **error)
{
  g_return_val_if_fail (c != NULL, NULL);
  const char *rev = revision ? revision : "main";
  if (commit_out)
    *commit_out = NULL;
  if (!check_args (repo_id, rev, error))
    return NULL;
  Op op;
  op_init (&op, c, repo_id, rev);
  Listing l;
  GPtrArray *r = NULL;
  if (list_files (&op, rev, &l, error)) {
    r = g_steal_pointer (&l.paths);
    if (commit_out)
      *commit_out = g_steal_pointer (&l.commit);
    listing_clear (&l);
  }
  op_clear (&op);
  return r;
}

char *
diffuse_hub_download_file (DiffuseHubClient *c, const char *repo_id, const char *revision,
                           const char *path, GError **error)
{
  g_return_val_if_fail (c != NULL, NULL);
  const char *rev = revision ? revision : "main";
  if (!check_args (repo_id, rev, error))
    return NULL;
  Op op;
  op_init (&op, c, repo_id, rev);
  op.prog.n_files = 1;
  char *r = download_file (&op, rev, path, error);
  op_clear (&op);
  return r;
}

static char *
snapshot (DiffuseHubClient *c, const char *repo_id, const char *revision, DiffuseHubFileFilter filter,
          gpointer user_data, const char *const *paths, GError **error)
{
  const char *rev = revision ? revision : "main";
  if (!check_args (repo_id, rev, error))
    return NULL;
  for (const char *const *p = paths; p && *p; p++)
    if (!hub_check_relative_path (*p, error))
      return NULL;
  Op op;
  op_init (&op, c, repo_id, rev);
  char *storage = hub_storage_folder (c->cache_dir, repo_id);
  char *folder = NULL;
  Listing l = { 0 };
  GPtrArray *want = g_ptr_array_new ();

  if (paths && !c->offline && hub_is_commit_hash (rev)) {
    l.commit = g_strdup (rev); /* an explicit list at a commit needs no listing */
  } else if (!list_files (&op, rev, &l, error))
    goto out;

  if (paths) {
    for (const char *const *p = paths; *p; p++)
      g_ptr_array_add (want, (gpointer) *p);
  } else {
    for (guint i = 0; i < l.paths->len; i++)
      if (!filter || filter (l.paths->pdata[i], user_data))
        g_ptr_array_add (want, l.paths->pdata[i]);
  }

  /* what is missing, and how many bytes */
  GPtrArray *missing = g_ptr_array_new_with_free_func (g_free);
  op.overall_known = TRUE;
  for (guint i = 0; i < want->len; i++) {
    char *p = hub_pointer_path (storage, l.commit, want->pdata[i]);
    if (!g_file_test (p, G_FILE_TEST_IS_REGULAR)) {
      g_ptr_array_add (missing, g_strdup (want->pdata[i]));
      guint64 *sz = l.sizes ? g_hash_table_lookup (l.sizes, want->pdata[i]) : NULL;
      if (sz)
        op.prog.overall_total += *sz;
      else
        op.overall_known = FALSE;
    }
    g_free (p);
  }
  if (!op.overall_known) /* sizes come with each file instead */
    op.prog.overall_total = 0;
  if (missing->len && c->offline) {
    GString *names = g_string_new (NULL);
    for (guint i = 0; i < missing->len && i < 5; i++)
      g_string_append_printf (names, "%s'%s'", i ? ", " : "", (char *) missing->pdata[i]);
    if (missing->len > 5)
      g_string_append_printf (names, " and %u more", missing->len - 5);
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_OFFLINE,
                 "offline mode (HF_HUB_OFFLINE): %u file(s) of Hub repo '%s' at revision '%s' (commit %s) are not "
                 "in the cache %s: %s", missing->len, repo_id, rev, l.commit, c->cache_dir, names->str);
    g_string_free (names, TRUE);
    g_ptr_array_unref (missing);
    goto out;
  }
  op.prog.n_files = missing->len;
  for (guint i = 0; i < missing->len; i++) {
    /* with the commit as revision; the file's own HEAD gives its size */
    char *p = download_file (&op, l.commit, missing->pdata[i], error);
    if (!p) {
      g_ptr_array_unref (missing);
      goto out;
    }
    g_free (p);
  }
  g_ptr_array_unref (missing);
  if (!hub_is_commit_hash (rev) && !c->offline)
    hub_write_ref (storage, rev, l.commit);
  folder = g_build_filename (storage, "snapshots", l.commit, NULL);
  if (!c->offline)
    g_mkdir_with_parents (folder, 0777);
out:
  g_ptr_array_unref (want);
  listing_clear (&l);
  g_free (storage);
  op_clear (&op);
  return folder;
}

char *
diffuse_hub_snapshot (DiffuseHubClient *c, const char *repo_id, const char *revision,
                      DiffuseHubFileFilter filter, gpointer user_data, GError **error)
{
  g_return_val_if_fail (c != NULL, NULL);
  return snapshot (c, repo_id, revision, filter, user_data, NULL, error);
}

char *
diffuse_hub_snapshot_paths (DiffuseHubClient *c, const char *repo_id, const char *revision,
                            const char *const *paths, GError **error)
{
  g_return_val_if_fail (c != NULL && paths != NULL, NULL);
  return snapshot (c, repo_id, revision, NULL, NULL, paths, error);
}

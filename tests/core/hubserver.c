/* A Hugging Face Hub look-alike for the tests (see hubserver.h). */
#include "hubserver.h"

#include <string.h>
#include <json-glib/json-glib.h>
#include <libsoup/soup.h>

#define BODY_CHUNK 8192
#define LFS_MIN_SIZE (1u << 20)

typedef struct {
  char *path;
  GBytes *data;
  char *etag;     /* sha256 (LFS) or git blob sha1 */
  char *blob_id;  /* git blob sha1 of the content, or of the LFS pointer */
  gboolean lfs;
} SFile;

typedef struct {
  GPtrArray *files; /* SFile*, sorted by path */
  char *commit;
} SRev;

typedef struct {
  char *id;
  HubAccess access;
  GHashTable *revs; /* name -> SRev* */
} SRepo;

typedef struct {
  char *method;
  char *match;
  HubFaultKind kind;
  int param, param2, count;
} Fault;

struct _HubServer {
  GMutex lock;
  GCond cond;
  GThread *thread;
  GMainContext *context;
  GMainLoop *loop;
  SoupServer *soup;
  gboolean ready;
  GError *start_error;
  guint hub_port, cdn_port;
  char *endpoint, *cdn, *token;
  GHashTable *repos;   /* id -> SRepo* */
  GPtrArray *faults;   /* Fault* */
  GPtrArray *log;      /* char* */
  GPtrArray *streams;  /* live Stream* (for shutdown) */
};

/* ---------------- content model ---------------- */

static char *
git_blob_sha1 (const guint8 *data, gsize len)
{
  GChecksum *ck = g_checksum_new (G_CHECKSUM_SHA1);
  char hdr[64];
  int n = g_snprintf (hdr, sizeof hdr, "blob %" G_GSIZE_FORMAT, len);
  g_checksum_update (ck, (const guchar *) hdr, n + 1);
  g_checksum_update (ck, data, len);
  char *r = g_strdup (g_checksum_get_string (ck));
  g_checksum_free (ck);
  return r;
}

static gboolean
is_lfs_name (const char *path, gsize size)
{
  static const char *ext[] = { ".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5", ".gguf", NULL };
  for (int i = 0; ext[i]; i++)
    if (g_str_has_suffix (path, ext[i]))
      return TRUE;
  return size >= LFS_MIN_SIZE;
}

static void
sfile_free (SFile *f)
{
  g_free (f->path);
  g_bytes_unref (f->data);
  g_free (f->etag);
  g_free (f->blob_id);
  g_free (f);
}

static SFile *
sfile_new (const char *path, GBytes *data)
{
  SFile *f = g_new0 (SFile, 1);
  gsize len;
  const guint8 *d = g_bytes_get_data (data, &len);
  f->path = g_strdup (path);
  f->data = g_bytes_ref (data);
  f->lfs = is_lfs_name (path, len);
  if (f->lfs) {
    f->etag = g_compute_checksum_for_data (G_CHECKSUM_SHA256, d, len);
    char *pointer = g_strdup_printf ("version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %" G_GSIZE_FORMAT "\n",
                                     f->etag, len);
    f->blob_id = git_blob_sha1 ((const guint8 *) pointer, strlen (pointer));
    g_free (pointer);
  } else {
    f->etag = git_blob_sha1 (d, len);
    f->blob_id = g_strdup (f->etag);
  }
  return f;
}

static void
srev_free (SRev *r)
{
  g_ptr_array_unref (r->files);
  g_free (r->commit);
  g_free (r);
}

static void
srepo_free (SRepo *r)
{
  g_free (r->id);
  g_hash_table_unref (r->revs);
  g_free (r);
}

static int
cmp_sfile (gconstpointer a, gconstpointer b)
{
  return strcmp ((*(SFile *const *) a)->path, (*(SFile *const *) b)->path);
}

/* commit = sha1 over the repo id and the sorted (path, etag) list */
static void
srev_update_commit (const char *repo_id, SRev *r)
{
  g_ptr_array_sort (r->files, cmp_sfile);
  GChecksum *ck = g_checksum_new (G_CHECKSUM_SHA1);
  g_checksum_update (ck, (const guchar *) "commit\n", -1);
  g_checksum_update (ck, (const guchar *) repo_id, -1);
  g_checksum_update (ck, (const guchar *) "\n", 1);
  for (guint i = 0; i < r->files->len; i++) {
    SFile *f = r->files->pdata[i];
    g_checksum_update (ck, (const guchar *) f->path, strlen (f->path) + 1);
    g_checksum_update (ck, (const guchar *) f->etag, -1);
    g_checksum_update (ck, (const guchar *) "\n", 1);
  }
  g_free (r->commit);
  r->commit = g_strdup (g_checksum_get_string (ck));
  g_checksum_free (ck);
}

static SRepo *
get_repo_locked (HubServer *s, const char *repo_id, gboolean create)
{
  SRepo *r = g_hash_table_lookup (s->repos, repo_id);
  if (!r && create) {
    r = g_new0 (SRepo, 1);
    r->id = g_strdup (repo_id);
    r->revs = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, (GDestroyNotify) srev_free);
    g_hash_table_insert (s->repos, r->id, r);
  }
  return r;
}

static SRev *
get_rev_locked (SRepo *repo, const char *revision, gboolean create)
{
  SRev *r = g_hash_table_lookup (repo->revs, revision);
  if (!r && create) {
    r = g_new0 (SRev, 1);
    r->files = g_ptr_array_new_with_free_func ((GDestroyNotify) sfile_free);
    g_hash_table_insert (repo->revs, g_strdup (revision), r);
  }
  return r;
}

/* a revision name, or a commit of one of the revisions */
static SRev *
find_rev_locked (SRepo *repo, const char *revision)
{
  SRev *r = g_hash_table_lookup (repo->revs, revision);
  if (r)
    return r;
  GHashTableIter it;
  gpointer k, v;
  g_hash_table_iter_init (&it, repo->revs);
  while (g_hash_table_iter_next (&it, &k, &v))
    if (!strcmp (((SRev *) v)->commit, revision))
      return v;
  return NULL;
}

static SFile *
find_file (SRev *rev, const char *path)
{
  for (guint i = 0; i < rev->files->len; i++)
    if (!strcmp (((SFile *) rev->files->pdata[i])->path, path))
      return rev->files->pdata[i];
  return NULL;
}

void
hub_server_add_file (HubServer *s, const char *repo_id, const char *revision, const char *path, GBytes *data)
{
  g_mutex_lock (&s->lock);
  SRepo *repo = get_repo_locked (s, repo_id, TRUE);
  SRev *rev = get_rev_locked (repo, revision, TRUE);
  for (guint i = 0; i < rev->files->len; i++)
    if (!strcmp (((SFile *) rev->files->pdata[i])->path, path)) {
      g_ptr_array_remove_index (rev->files, i);
      break;
    }
  g_ptr_array_add (rev->files, sfile_new (path, data));
  srev_update_commit (repo_id, rev);
  g_mutex_unlock (&s->lock);
}

static gboolean
add_dir_rec (HubServer *s, const char *repo_id, const char *revision, const char *base, const char *rel, GError **error)
{
  char *dir = rel ? g_build_filename (base, rel, NULL) : g_strdup (base);
  GDir *d = g_dir_open (dir, 0, error);
  gboolean ok = d != NULL;
  const char *name;
  while (ok && (name = g_dir_read_name (d))) {
    char *r = rel ? g_strconcat (rel, "/", name, NULL) : g_strdup (name);
    char *full = g_build_filename (base, r, NULL);
    if (g_file_test (full, G_FILE_TEST_IS_DIR))
      ok = add_dir_rec (s, repo_id, revision, base, r, error);
    else {
      char *contents;
      gsize len;
      if ((ok = g_file_get_contents (full, &contents, &len, error))) {
        GBytes *b = g_bytes_new_take (contents, len);
        hub_server_add_file (s, repo_id, revision, r, b);
        g_bytes_unref (b);
      }
    }
    g_free (full);
    g_free (r);
  }
  if (d)
    g_dir_close (d);
  g_free (dir);
  return ok;
}

gboolean
hub_server_add_dir (HubServer *s, const char *repo_id, const char *revision, const char *dir, GError **error)
{
  g_mutex_lock (&s->lock);
  get_rev_locked (get_repo_locked (s, repo_id, TRUE), revision, TRUE);
  g_mutex_unlock (&s->lock);
  return add_dir_rec (s, repo_id, revision, dir, NULL, error);
}

void
hub_server_set_access (HubServer *s, const char *repo_id, HubAccess access)
{
  g_mutex_lock (&s->lock);
  get_repo_locked (s, repo_id, TRUE)->access = access;
  g_mutex_unlock (&s->lock);
}

char *
hub_server_commit (HubServer *s, const char *repo_id, const char *revision)
{
  char *r = NULL;
  g_mutex_lock (&s->lock);
  SRepo *repo = get_repo_locked (s, repo_id, FALSE);
  SRev *rev = repo ? find_rev_locked (repo, revision) : NULL;
  if (rev)
    r = g_strdup (rev->commit);
  g_mutex_unlock (&s->lock);
  return r;
}

char *
hub_server_etag (HubServer *s, const char *repo_id, const char *revision, const char *path)
{
  char *r = NULL;
  g_mutex_lock (&s->lock);
  SRepo *repo = get_repo_locked (s, repo_id, FALSE);
  SRev *rev = repo ? find_rev_locked (repo, revision) : NULL;
  SFile *f = rev ? find_file (rev, path) : NULL;
  if (f)
    r = g_strdup (f->etag);
  g_mutex_unlock (&s->lock);
  return r;
}

gboolean
hub_server_load_manifest (HubServer *s, const char *path, GError **error)
{
  JsonParser *p = json_parser_new ();
  gboolean ok = json_parser_load_from_file (p, path, error);
  char *base = g_path_get_dirname (path);
  if (ok) {
    JsonObject *o = json_node_get_object (json_parser_get_root (p));
    if (json_object_has_member (o, "token")) {
      g_mutex_lock (&s->lock);
      g_free (s->token);
      s->token = g_strdup (json_object_get_string_member (o, "token"));
      g_mutex_unlock (&s->lock);
    }
    JsonArray *repos = json_object_get_array_member (o, "repos");
    for (guint i = 0; ok && i < json_array_get_length (repos); i++) {
      JsonObject *ro = json_array_get_object_element (repos, i);
      const char *id = json_object_get_string_member (ro, "id");
      const char *access = json_object_has_member (ro, "access") ? json_object_get_string_member (ro, "access") : "public";
      hub_server_set_access (s, id,
                             !strcmp (access, "private")        ? HUB_ACCESS_PRIVATE
                             : !strcmp (access, "gated")        ? HUB_ACCESS_GATED
                             : !strcmp (access, "gated-denied") ? HUB_ACCESS_GATED_DENIED
                                                                : HUB_ACCESS_PUBLIC);
      JsonObject *revs = json_object_get_object_member (ro, "revisions");
      GList *names = json_object_get_members (revs);
      for (GList *l = names; ok && l; l = l->next) {
        char *dir = g_build_filename (base, json_object_get_string_member (revs, l->data), NULL);
        ok = hub_server_add_dir (s, id, l->data, dir, error);
        g_free (dir);
      }
      g_list_free (names);
    }
  }
  g_free (base);
  g_object_unref (p);
  return ok;
}

void
hub_server_add_fault (HubServer *s, const char *method, const char *match, HubFaultKind kind, int param, int param2, int count)
{
  Fault *f = g_new0 (Fault, 1);
  f->method = g_strdup (method);
  f->match = g_strdup (match);
  f->kind = kind;
  f->param = param;
  f->param2 = param2;
  f->count = count;
  g_mutex_lock (&s->lock);
  g_ptr_array_add (s->faults, f);
  g_mutex_unlock (&s->lock);
}

static void
fault_free (Fault *f)
{
  g_free (f->method);
  g_free (f->match);
  g_free (f);
}

void
hub_server_clear_faults (HubServer *s)
{
  g_mutex_lock (&s->lock);
  g_ptr_array_set_size (s->faults, 0);
  g_mutex_unlock (&s->lock);
}

GPtrArray *
hub_server_log (HubServer *s)
{
  GPtrArray *r = g_ptr_array_new_with_free_func (g_free);
  g_mutex_lock (&s->lock);
  for (guint i = 0; i < s->log->len; i++)
    g_ptr_array_add (r, g_strdup (s->log->pdata[i]));
  g_mutex_unlock (&s->lock);
  return r;
}

guint
hub_server_request_count (HubServer *s)
{
  g_mutex_lock (&s->lock);
  guint n = s->log->len;
  g_mutex_unlock (&s->lock);
  return n;
}

void
hub_server_clear_log (HubServer *s)
{
  g_mutex_lock (&s->lock);
  g_ptr_array_set_size (s->log, 0);
  g_mutex_unlock (&s->lock);
}

const char *hub_server_endpoint (HubServer *s) { return s->endpoint; }
const char *hub_server_cdn (HubServer *s) { return s->cdn; }
const char *hub_server_token (HubServer *s) { return s->token; }

/* ---------------- HTTP side (server thread) ---------------- */

typedef struct {
  HubServer *server;
  SoupServerMessage *msg;
  GBytes *data;
  gsize pos, end;
  gsize drop_at;       /* G_MAXSIZE: none */
  gboolean stall;      /* at drop_at: stop sending instead of closing */
  gboolean drop_now;
  guint delay_ms;
  gboolean corrupt;
  GSource *timeout;
  gboolean done;
} Stream;

static void
stream_free (Stream *st)
{
  if (st->timeout) {
    g_source_destroy (st->timeout);
    g_source_unref (st->timeout);
  }
  g_bytes_unref (st->data);
  g_free (st);
}

static void stream_push (Stream *st);

static gboolean
stream_timeout (gpointer data)
{
  Stream *st = data;
  g_source_unref (st->timeout);
  st->timeout = NULL;
  stream_push (st);
  return G_SOURCE_REMOVE;
}

static void
stream_drop (Stream *st)
{
  GIOStream *io = soup_server_message_steal_connection (st->msg);
  if (io) {
    g_io_stream_close (io, NULL, NULL);
    g_object_unref (io);
  }
}

static void
stream_push (Stream *st)
{
  SoupMessageBody *body = soup_server_message_get_response_body (st->msg);
  gsize n = MIN (BODY_CHUNK, st->end - st->pos);
  if (st->drop_at != G_MAXSIZE)
    n = MIN (n, st->drop_at - st->pos);
  const guint8 *d = g_bytes_get_data (st->data, NULL);
  guint8 *chunk = g_memdup2 (d + st->pos, n);
  if (st->corrupt && n) {
    chunk[n / 2] ^= 0x5a;
    st->corrupt = FALSE;
  }
  soup_message_body_append_take (body, chunk, n);
  st->pos += n;
  if (st->pos == st->end)
    soup_message_body_complete (body);
  else if (st->pos == st->drop_at)
    st->drop_now = TRUE;
  soup_server_message_unpause (st->msg);
}

static void
stream_wrote_chunk (SoupServerMessage *msg, gpointer data)
{
  Stream *st = data;
  if (st->drop_now) {
    st->drop_now = FALSE;
    if (st->stall) {
      soup_server_message_pause (msg); /* nothing more until the client gives up */
      return;
    }
    st->done = TRUE;
    stream_drop (st);
    return;
  }
  if (st->pos >= st->end || st->done)
    return;
  if (st->delay_ms) {
    soup_server_message_pause (msg);
    st->timeout = g_timeout_source_new (st->delay_ms);
    g_source_set_callback (st->timeout, stream_timeout, st, NULL);
    g_source_attach (st->timeout, st->server->context);
  } else
    stream_push (st);
}

static void
stream_finished (SoupServerMessage *msg, gpointer data)
{
  Stream *st = data;
  g_mutex_lock (&st->server->lock);
  g_ptr_array_remove (st->server->streams, st);
  g_mutex_unlock (&st->server->lock);
}

/* Looks a fault up (and consumes one firing). */
static gboolean
take_fault (HubServer *s, const char *method, const char *path, HubFaultKind kind, Fault *out)
{
  gboolean hit = FALSE;
  g_mutex_lock (&s->lock);
  for (guint i = 0; i < s->faults->len && !hit; i++) {
    Fault *f = s->faults->pdata[i];
    if (f->kind != kind || f->count == 0 || (f->method && strcmp (f->method, method)) || !strstr (path, f->match))
      continue;
    *out = *f;
    if (f->count > 0)
      f->count--;
    hit = TRUE;
  }
  g_mutex_unlock (&s->lock);
  return hit;
}

static void
set_text (SoupServerMessage *msg, guint status, const char *text)
{
  soup_server_message_set_status (msg, status, NULL);
  soup_server_message_set_response (msg, "text/plain", SOUP_MEMORY_COPY, text, strlen (text));
}

static void
hub_error (SoupServerMessage *msg, guint status, const char *code, const char *message)
{
  SoupMessageHeaders *h = soup_server_message_get_response_headers (msg);
  if (code)
    soup_message_headers_replace (h, "X-Error-Code", code);
  soup_message_headers_replace (h, "X-Error-Message", message);
  char *json = g_strdup_printf ("{\"error\": \"%s\"}", message);
  soup_server_message_set_status (msg, status, NULL);
  soup_server_message_set_response (msg, "application/json", SOUP_MEMORY_TAKE, json, strlen (json));
}

/* Serves data (with Range and the GET body faults). */
static void
serve_bytes (HubServer *s, SoupServerMessage *msg, const char *method, const char *fault_path, GBytes *data,
             const char *etag, const char *commit)
{
  SoupMessageHeaders *req = soup_server_message_get_request_headers (msg);
  SoupMessageHeaders *h = soup_server_message_get_response_headers (msg);
  gsize total = g_bytes_get_size (data);
  gsize start = 0, end = total;
  guint status = SOUP_STATUS_OK;
  Fault f;

  if (commit)
    soup_message_headers_replace (h, "X-Repo-Commit", commit);
  char *qetag = g_strdup_printf ("\"%s\"", etag);
  soup_message_headers_replace (h, "ETag", qetag);
  g_free (qetag);
  soup_message_headers_replace (h, "Accept-Ranges", "bytes");
  soup_message_headers_set_content_type (h, "application/octet-stream", NULL);

  const char *range = soup_message_headers_get_one (req, "Range");
  if (range && g_str_has_prefix (range, "bytes=") && !take_fault (s, method, fault_path, HUB_FAULT_IGNORE_RANGE, &f)) {
    char *endp;
    guint64 a = g_ascii_strtoull (range + 6, &endp, 10);
    guint64 b = total ? total - 1 : 0;
    if (*endp == '-' && g_ascii_isdigit (endp[1]))
      b = g_ascii_strtoull (endp + 1, NULL, 10);
    if (a >= total || b < a) {
      char *cr = g_strdup_printf ("bytes */%" G_GSIZE_FORMAT, total);
      soup_message_headers_replace (h, "Content-Range", cr);
      g_free (cr);
      set_text (msg, SOUP_STATUS_REQUESTED_RANGE_NOT_SATISFIABLE, "range not satisfiable");
      return;
    }
    start = (gsize) a;
    end = (gsize) MIN (b + 1, total);
    status = SOUP_STATUS_PARTIAL_CONTENT;
    char *cr = g_strdup_printf ("bytes %" G_GSIZE_FORMAT "-%" G_GSIZE_FORMAT "/%" G_GSIZE_FORMAT, start, end - 1, total);
    soup_message_headers_replace (h, "Content-Range", cr);
    g_free (cr);
  }
  soup_server_message_set_status (msg, status, NULL);
  gsize announced = end - start;
  if (take_fault (s, method, fault_path, HUB_FAULT_WRONG_SIZE, &f))
    announced += f.param;
  if (!strcmp (method, "HEAD")) {
    soup_message_headers_set_content_length (h, announced);
    return;
  }
  /* a wrong Content-Length on the GET itself would only make the client wait:
   * the wrong-size fault is metadata only (HEAD / X-Linked-Size). */
  soup_message_headers_set_content_length (h, end - start);
  Stream *st = g_new0 (Stream, 1);
  st->server = s;
  st->msg = msg;
  st->data = g_bytes_ref (data);
  st->pos = start;
  st->end = end;
  st->drop_at = G_MAXSIZE;
  if (take_fault (s, method, fault_path, HUB_FAULT_DROP, &f))
    st->drop_at = MIN (start + (gsize) f.param, end);
  else if (take_fault (s, method, fault_path, HUB_FAULT_STALL, &f)) {
    st->drop_at = MIN (start + (gsize) f.param, end);
    st->stall = TRUE;
  }
  if (st->drop_at == end)
    st->drop_at = G_MAXSIZE;
  if (take_fault (s, method, fault_path, HUB_FAULT_SLOW, &f))
    st->delay_ms = (guint) f.param;
  if (take_fault (s, method, fault_path, HUB_FAULT_CORRUPT, &f))
    st->corrupt = TRUE;
  soup_message_body_set_accumulate (soup_server_message_get_response_body (msg), FALSE);
  g_mutex_lock (&s->lock);
  g_ptr_array_add (s->streams, st);
  g_mutex_unlock (&s->lock);
  g_signal_connect (msg, "wrote-chunk", G_CALLBACK (stream_wrote_chunk), st);
  g_signal_connect (msg, "finished", G_CALLBACK (stream_finished), st);
  g_object_set_data_full (G_OBJECT (msg), "hub-stream", st, (GDestroyNotify) stream_free);
  if (start == end)
    soup_message_body_complete (soup_server_message_get_response_body (msg));
  else
    stream_push (st);
}

/* Access control: TRUE when allowed, else the error response is set. */
static gboolean
check_access (HubServer *s, SoupServerMessage *msg, SRepo *repo)
{
  const char *auth = soup_message_headers_get_one (soup_server_message_get_request_headers (msg), "Authorization");
  gboolean has_token = auth != NULL;
  if (auth) {
    if (!g_str_has_prefix (auth, "Bearer ") || strcmp (auth + 7, s->token)) {
      hub_error (msg, 401, NULL, "Invalid credentials in Authorization header");
      return FALSE;
    }
  }
  if (!repo) {
    if (has_token)
      hub_error (msg, 404, "RepoNotFound", "Repository not found");
    else
      hub_error (msg, 401, "RepoNotFound", "Repository not found");
    return FALSE;
  }
  switch (repo->access) {
  case HUB_ACCESS_PUBLIC:
    return TRUE;
  case HUB_ACCESS_PRIVATE:
    if (has_token)
      return TRUE;
    hub_error (msg, 401, "RepoNotFound", "Repository not found");
    return FALSE;
  case HUB_ACCESS_GATED:
    if (has_token)
      return TRUE;
    hub_error (msg, 401, "GatedRepo", "Access to this model is restricted: you must be authenticated");
    return FALSE;
  case HUB_ACCESS_GATED_DENIED:
    hub_error (msg, has_token ? 403 : 401, "GatedRepo",
               has_token ? "Access to this model is restricted and you are not in the authorized list"
                         : "Access to this model is restricted: you must be authenticated");
    return FALSE;
  }
  return FALSE;
}

static void
add_sibling (JsonBuilder *b, SFile *f, gboolean blobs)
{
  json_builder_begin_object (b);
  json_builder_set_member_name (b, "rfilename");
  json_builder_add_string_value (b, f->path);
  if (blobs) {
    json_builder_set_member_name (b, "blobId");
    json_builder_add_string_value (b, f->blob_id);
    json_builder_set_member_name (b, "size");
    json_builder_add_int_value (b, (gint64) g_bytes_get_size (f->data));
    if (f->lfs) {
      json_builder_set_member_name (b, "lfs");
      json_builder_begin_object (b);
      json_builder_set_member_name (b, "sha256");
      json_builder_add_string_value (b, f->etag);
      json_builder_set_member_name (b, "size");
      json_builder_add_int_value (b, (gint64) g_bytes_get_size (f->data));
      json_builder_set_member_name (b, "pointerSize");
      json_builder_add_int_value (b, 134);
      json_builder_end_object (b);
    }
  }
  json_builder_end_object (b);
}

static void
send_json (SoupServerMessage *msg, JsonBuilder *b)
{
  JsonGenerator *g = json_generator_new ();
  JsonNode *root = json_builder_get_root (b);
  json_generator_set_root (g, root);
  gsize len;
  char *text = json_generator_to_data (g, &len);
  soup_server_message_set_status (msg, 200, NULL);
  soup_server_message_set_response (msg, "application/json", SOUP_MEMORY_TAKE, text, len);
  json_node_unref (root);
  g_object_unref (g);
}

static void
model_info (SoupServerMessage *msg, SRepo *repo, SRev *rev, gboolean blobs)
{
  JsonBuilder *b = json_builder_new ();
  json_builder_begin_object (b);
  json_builder_set_member_name (b, "_id");
  json_builder_add_string_value (b, "0123456789abcdef01234567");
  json_builder_set_member_name (b, "id");
  json_builder_add_string_value (b, repo->id);
  json_builder_set_member_name (b, "modelId");
  json_builder_add_string_value (b, repo->id);
  json_builder_set_member_name (b, "sha");
  json_builder_add_string_value (b, rev->commit);
  json_builder_set_member_name (b, "private");
  json_builder_add_boolean_value (b, repo->access == HUB_ACCESS_PRIVATE);
  json_builder_set_member_name (b, "gated");
  if (repo->access == HUB_ACCESS_GATED || repo->access == HUB_ACCESS_GATED_DENIED)
    json_builder_add_string_value (b, "manual");
  else
    json_builder_add_boolean_value (b, FALSE);
  json_builder_set_member_name (b, "disabled");
  json_builder_add_boolean_value (b, FALSE);
  json_builder_set_member_name (b, "library_name");
  json_builder_add_string_value (b, "diffusers");
  json_builder_set_member_name (b, "tags");
  json_builder_begin_array (b);
  json_builder_add_string_value (b, "diffusers");
  json_builder_end_array (b);
  json_builder_set_member_name (b, "downloads");
  json_builder_add_int_value (b, 0);
  json_builder_set_member_name (b, "likes");
  json_builder_add_int_value (b, 0);
  json_builder_set_member_name (b, "lastModified");
  json_builder_add_string_value (b, "2024-01-01T00:00:00.000Z");
  json_builder_set_member_name (b, "createdAt");
  json_builder_add_string_value (b, "2024-01-01T00:00:00.000Z");
  json_builder_set_member_name (b, "siblings");
  json_builder_begin_array (b);
  for (guint i = 0; i < rev->files->len; i++)
    add_sibling (b, rev->files->pdata[i], blobs);
  json_builder_end_array (b);
  json_builder_end_object (b);
  send_json (msg, b);
  g_object_unref (b);
}

static void
tree_listing (SoupServerMessage *msg, SRev *rev, const char *under, gboolean recursive)
{
  JsonBuilder *b = json_builder_new ();
  GHashTable *dirs = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  json_builder_begin_array (b);
  char *prefix = under && *under ? g_strconcat (under, "/", NULL) : g_strdup ("");
  for (guint i = 0; i < rev->files->len; i++) {
    SFile *f = rev->files->pdata[i];
    if (!g_str_has_prefix (f->path, prefix))
      continue;
    const char *rest = f->path + strlen (prefix);
    /* directories on the way */
    for (const char *sl = strchr (rest, '/'); sl; sl = strchr (sl + 1, '/')) {
      char *d = g_strndup (f->path, sl - f->path);
      gboolean direct = !strchr (rest, '/') || sl == strchr (rest, '/');
      if ((recursive || direct) && !g_hash_table_contains (dirs, d)) {
        json_builder_begin_object (b);
        json_builder_set_member_name (b, "type");
        json_builder_add_string_value (b, "directory");
        json_builder_set_member_name (b, "oid");
        char *oid = g_compute_checksum_for_string (G_CHECKSUM_SHA1, d, -1);
        json_builder_add_string_value (b, oid);
        g_free (oid);
        json_builder_set_member_name (b, "size");
        json_builder_add_int_value (b, 0);
        json_builder_set_member_name (b, "path");
        json_builder_add_string_value (b, d);
        json_builder_end_object (b);
        g_hash_table_add (dirs, g_strdup (d));
      }
      g_free (d);
      if (!recursive)
        break;
    }
    if (!recursive && strchr (rest, '/'))
      continue;
    json_builder_begin_object (b);
    json_builder_set_member_name (b, "type");
    json_builder_add_string_value (b, "file");
    json_builder_set_member_name (b, "oid");
    json_builder_add_string_value (b, f->blob_id);
    json_builder_set_member_name (b, "size");
    json_builder_add_int_value (b, (gint64) g_bytes_get_size (f->data));
    if (f->lfs) {
      json_builder_set_member_name (b, "lfs");
      json_builder_begin_object (b);
      json_builder_set_member_name (b, "oid");
      json_builder_add_string_value (b, f->etag);
      json_builder_set_member_name (b, "size");
      json_builder_add_int_value (b, (gint64) g_bytes_get_size (f->data));
      json_builder_set_member_name (b, "pointerSize");
      json_builder_add_int_value (b, 134);
      json_builder_end_object (b);
    }
    json_builder_set_member_name (b, "path");
    json_builder_add_string_value (b, f->path);
    json_builder_end_object (b);
  }
  json_builder_end_array (b);
  send_json (msg, b);
  g_free (prefix);
  g_hash_table_unref (dirs);
  g_object_unref (b);
}

/* Splits an encoded URL path into decoded segments. */
static char **
split_path (const char *path)
{
  char **parts = g_strsplit (path[0] == '/' ? path + 1 : path, "/", -1);
  for (char **p = parts; *p; p++) {
    char *d = g_uri_unescape_string (*p, NULL);
    if (d) {
      g_free (*p);
      *p = d;
    }
  }
  return parts;
}

static char *
join_from (char **parts, int from)
{
  return g_strjoinv ("/", parts + from);
}

/* The revision at parts[start..]: the longest run of segments that names a
 * revision of the repo (revision names such as refs/pr/1 contain '/', and
 * the server sees %2F decoded); else the single segment.  *next: the index
 * after it. */
static char *
split_revision (HubServer *s, const char *repo_id, char **parts, int start, int n, gboolean need_rest, int *next)
{
  g_mutex_lock (&s->lock);
  SRepo *repo = get_repo_locked (s, repo_id, FALSE);
  for (int k = n - start - (need_rest ? 1 : 0); repo && k > 1; k--) {
    char *save = parts[start + k];
    parts[start + k] = NULL;
    char *rev = g_strjoinv ("/", parts + start);
    parts[start + k] = save;
    if (find_rev_locked (repo, rev)) {
      g_mutex_unlock (&s->lock);
      *next = start + k;
      return rev;
    }
    g_free (rev);
  }
  g_mutex_unlock (&s->lock);
  *next = start + 1;
  return g_strdup (parts[start]);
}

static void
handle_file (HubServer *s, SoupServerMessage *msg, const char *method, const char *repo_id, const char *revision,
             const char *path, gboolean resolve_cache, const char *fault_path)
{
  g_mutex_lock (&s->lock);
  SRepo *repo = get_repo_locked (s, repo_id, FALSE);
  if (!check_access (s, msg, repo)) {
    g_mutex_unlock (&s->lock);
    return;
  }
  SRev *rev = find_rev_locked (repo, revision);
  if (!rev) {
    g_mutex_unlock (&s->lock);
    hub_error (msg, 404, "RevisionNotFound", "Invalid rev id");
    return;
  }
  SFile *f = find_file (rev, path);
  char *commit = g_strdup (rev->commit);
  if (!f) {
    g_mutex_unlock (&s->lock);
    soup_message_headers_replace (soup_server_message_get_response_headers (msg), "X-Repo-Commit", commit);
    hub_error (msg, 404, "EntryNotFound", "Entry not found");
    g_free (commit);
    return;
  }
  GBytes *data = g_bytes_ref (f->data);
  char *etag = g_strdup (f->etag);
  char *blob_id = g_strdup (f->blob_id);
  gboolean lfs = f->lfs;
  gboolean is_commit = !strcmp (revision, commit);
  g_mutex_unlock (&s->lock);

  SoupMessageHeaders *h = soup_server_message_get_response_headers (msg);
  Fault fault;
  if (lfs && !resolve_cache) {
    /* the Hub answers LFS files with a redirect to the CDN, metadata on it */
    char *e = g_uri_escape_string (path, "/", FALSE);
    char *loc = g_strdup_printf ("%s/cdn/%s/%s/%s?X-Amz-Signature=test", s->cdn, repo_id, etag, e);
    gsize size = g_bytes_get_size (data);
    if (take_fault (s, method, fault_path, HUB_FAULT_WRONG_SIZE, &fault))
      size += fault.param;
    char *qetag = g_strdup_printf ("\"%s\"", etag), *qblob = g_strdup_printf ("\"%s\"", blob_id);
    char *ssize = g_strdup_printf ("%" G_GSIZE_FORMAT, size);
    soup_message_headers_replace (h, "X-Repo-Commit", commit);
    soup_message_headers_replace (h, "X-Linked-Etag", qetag);
    soup_message_headers_replace (h, "X-Linked-Size", ssize);
    soup_message_headers_replace (h, "ETag", qblob);
    soup_message_headers_replace (h, "Location", loc);
    soup_server_message_set_status (msg, 302, NULL);
    g_free (qetag);
    g_free (qblob);
    g_free (ssize);
    g_free (loc);
    g_free (e);
  } else if (!resolve_cache && !is_commit) {
    /* regular file at a branch: today's Hub sends a same-host 307 */
    char *e = g_uri_escape_string (path, "/", FALSE);
    char *loc = g_strdup_printf ("/api/resolve-cache/models/%s/%s/%s", repo_id, commit, e);
    char *qetag = g_strdup_printf ("\"%s\"", etag);
    soup_message_headers_replace (h, "X-Repo-Commit", commit);
    soup_message_headers_replace (h, "ETag", qetag);
    soup_message_headers_replace (h, "Location", loc);
    soup_server_message_set_status (msg, 307, NULL);
    g_free (qetag);
    g_free (loc);
    g_free (e);
  } else
    serve_bytes (s, msg, method, fault_path, data, etag, commit);
  g_bytes_unref (data);
  g_free (etag);
  g_free (blob_id);
  g_free (commit);
}

static void
handle_cdn (HubServer *s, SoupServerMessage *msg, const char *method, char **parts, const char *fault_path)
{
  /* cdn/{repo...}/{etag}/{path...}: find the blob by its sha256 */
  if (soup_message_headers_get_one (soup_server_message_get_request_headers (msg), "Authorization")) {
    set_text (msg, 400, "Only one auth mechanism allowed; the Authorization header must not be sent here");
    return;
  }
  GBytes *data = NULL;
  char *etag = NULL;
  g_mutex_lock (&s->lock);
  for (int i = 1; parts[i] && !data; i++) {
    if (strlen (parts[i]) != 64)
      continue;
    GHashTableIter it, it2;
    gpointer k, v, k2, v2;
    g_hash_table_iter_init (&it, s->repos);
    while (!data && g_hash_table_iter_next (&it, &k, &v)) {
      g_hash_table_iter_init (&it2, ((SRepo *) v)->revs);
      while (!data && g_hash_table_iter_next (&it2, &k2, &v2)) {
        SRev *rev = v2;
        for (guint j = 0; j < rev->files->len && !data; j++) {
          SFile *f = rev->files->pdata[j];
          if (f->lfs && !strcmp (f->etag, parts[i])) {
            data = g_bytes_ref (f->data);
            etag = g_strdup (f->etag);
          }
        }
      }
    }
  }
  g_mutex_unlock (&s->lock);
  if (!data) {
    set_text (msg, 404, "no such object");
    return;
  }
  serve_bytes (s, msg, method, fault_path, data, etag, NULL);
  g_bytes_unref (data);
  g_free (etag);
}

static void
handler (SoupServer *soup, SoupServerMessage *msg, const char *unused_path, GHashTable *query, gpointer user_data)
{
  HubServer *s = user_data;
  const char *method = soup_server_message_get_method (msg);
  GUri *uri = soup_server_message_get_uri (msg);
  const char *raw = g_uri_get_path (uri);
  char *decoded = g_uri_unescape_string (raw, NULL);
  const char *q = g_uri_get_query (uri);
  char *fault_path = g_strconcat (decoded ? decoded : raw, q ? "?" : "", q ? q : "", NULL);
  GInetSocketAddress *local = G_INET_SOCKET_ADDRESS (soup_server_message_get_local_address (msg));
  gboolean cdn = g_inet_socket_address_get_port (local) == s->cdn_port;
  const char *auth = soup_message_headers_get_one (soup_server_message_get_request_headers (msg), "Authorization");

  g_mutex_lock (&s->lock);
  const char *range = soup_message_headers_get_one (soup_server_message_get_request_headers (msg), "Range");
  g_ptr_array_add (s->log, g_strdup_printf ("%s %s %s %s%s%s", method, cdn ? "cdn" : "hub", fault_path,
                                            auth ? "auth" : "noauth", range ? " range=" : "", range ? range : ""));
  g_mutex_unlock (&s->lock);

  Fault f;
  if (take_fault (s, method, fault_path, HUB_FAULT_STATUS, &f)) {
    if (f.param2 > 0) {
      char *ra = g_strdup_printf ("%d", f.param2);
      soup_message_headers_replace (soup_server_message_get_response_headers (msg), "Retry-After", ra);
      g_free (ra);
    }
    set_text (msg, (guint) f.param, "injected fault");
    goto out;
  }
  if (strcmp (method, "GET") && strcmp (method, "HEAD")) {
    set_text (msg, SOUP_STATUS_METHOD_NOT_ALLOWED, "method not allowed");
    goto out;
  }
  char **parts = split_path (raw);
  int n = (int) g_strv_length (parts);
  if (cdn) {
    if (n >= 3 && !strcmp (parts[0], "cdn"))
      handle_cdn (s, msg, method, parts, fault_path);
    else
      set_text (msg, 404, "not found");
  } else if (n >= 3 && !strcmp (parts[0], "api") && !strcmp (parts[1], "models")) {
    /* api/models/{org}/{name}[/revision/{rev} | /tree/{rev}[/path]] or api/models/{name}/... */
    int repo_len = (n >= 4 && strcmp (parts[3], "revision") && strcmp (parts[3], "tree")) ? 2 : 1;
    char *repo_id = repo_len == 2 ? g_strconcat (parts[2], "/", parts[3], NULL) : g_strdup (parts[2]);
    int rest = 2 + repo_len, after = n;
    const char *what = rest < n ? parts[rest] : NULL;
    char *rev_name = what && rest + 1 < n ? split_revision (s, repo_id, parts, rest + 1, n, FALSE, &after)
                                          : g_strdup ("main");
    g_mutex_lock (&s->lock);
    SRepo *repo = get_repo_locked (s, repo_id, FALSE);
    if (check_access (s, msg, repo)) {
      SRev *rev = find_rev_locked (repo, rev_name);
      if (!rev)
        hub_error (msg, 404, "RevisionNotFound", "Invalid rev id");
      else if (!what || !strcmp (what, "revision")) {
        const char *blobs = query ? g_hash_table_lookup (query, "blobs") : NULL;
        model_info (msg, repo, rev, blobs && (!g_ascii_strcasecmp (blobs, "true") || !strcmp (blobs, "1")));
      } else if (!strcmp (what, "tree")) {
        char *under = after < n ? join_from (parts, after) : NULL;
        const char *rec = query ? g_hash_table_lookup (query, "recursive") : NULL;
        tree_listing (msg, rev, under, rec && (!g_ascii_strcasecmp (rec, "true") || !strcmp (rec, "1")));
        g_free (under);
      } else
        set_text (msg, 404, "not found");
    }
    g_mutex_unlock (&s->lock);
    g_free (rev_name);
    g_free (repo_id);
  } else if (n >= 6 && !strcmp (parts[0], "api") && !strcmp (parts[1], "resolve-cache") && !strcmp (parts[2], "models")) {
    /* api/resolve-cache/models/{org}/{name}/{commit}/{path} or .../{name}/{commit}/{path} */
    char *repo_id = g_strconcat (parts[3], "/", parts[4], NULL);
    g_mutex_lock (&s->lock);
    gboolean two = get_repo_locked (s, repo_id, FALSE) != NULL;
    g_mutex_unlock (&s->lock);
    if (!two) {
      g_free (repo_id);
      repo_id = g_strdup (parts[3]);
    }
    int ci = two ? 5 : 4;
    if (ci + 1 < n) {
      char *path = join_from (parts, ci + 1);
      handle_file (s, msg, method, repo_id, parts[ci], path, TRUE, fault_path);
      g_free (path);
    } else
      set_text (msg, 404, "not found");
    g_free (repo_id);
  } else {
    /* {org}/{name}/resolve/{rev}/{path} or {name}/resolve/{rev}/{path} */
    int ri = -1;
    for (int i = 1; i < n && i <= 2; i++)
      if (!strcmp (parts[i], "resolve")) {
        ri = i;
        break;
      }
    if (ri > 0 && ri + 2 < n) {
      char *save = parts[ri];
      parts[ri] = NULL;
      char *repo_id = g_strjoinv ("/", parts);
      parts[ri] = save;
      int after;
      char *rev = split_revision (s, repo_id, parts, ri + 1, n, TRUE, &after);
      char *path = join_from (parts, after);
      handle_file (s, msg, method, repo_id, rev, path, FALSE, fault_path);
      g_free (path);
      g_free (rev);
      g_free (repo_id);
    } else
      set_text (msg, 404, "not found");
  }
  g_strfreev (parts);
out:
  g_free (fault_path);
  g_free (decoded);
}

static gboolean
quit_loop (gpointer data)
{
  g_main_loop_quit (data);
  return G_SOURCE_REMOVE;
}

static guint
listener_port (GSList *listeners, guint skip)
{
  for (GSList *l = listeners; l; l = l->next) {
    GSocketAddress *a = g_socket_get_local_address (l->data, NULL);
    guint port = a ? g_inet_socket_address_get_port (G_INET_SOCKET_ADDRESS (a)) : 0;
    if (a)
      g_object_unref (a);
    if (port && port != skip)
      return port;
  }
  return 0;
}

static gpointer
server_thread (gpointer data)
{
  HubServer *s = data;
  g_main_context_push_thread_default (s->context);
  s->soup = soup_server_new ("server-header", "hubserver", NULL);
  soup_server_add_handler (s->soup, NULL, handler, s, NULL);
  GError *err = NULL;
  GInetAddress *lo = g_inet_address_new_loopback (G_SOCKET_FAMILY_IPV4);
  GSocketAddress *addr = g_inet_socket_address_new (lo, 0);
  gboolean ok = soup_server_listen (s->soup, addr, 0, &err);
  if (ok) {
    GSList *ls = soup_server_get_listeners (s->soup);
    s->hub_port = listener_port (ls, 0);
    g_slist_free (ls);
    /* the CDN: 127.0.0.1 and ::1 on one port, reached as "localhost" */
    ok = soup_server_listen_local (s->soup, 0, 0, &err);
    if (ok) {
      ls = soup_server_get_listeners (s->soup);
      s->cdn_port = listener_port (ls, s->hub_port);
      g_slist_free (ls);
    }
  }
  g_object_unref (addr);
  g_object_unref (lo);
  g_mutex_lock (&s->lock);
  s->start_error = err;
  s->ready = TRUE;
  g_cond_signal (&s->cond);
  g_mutex_unlock (&s->lock);
  if (ok)
    g_main_loop_run (s->loop);
  soup_server_disconnect (s->soup);
  /* let the closed connections' sources run */
  while (g_main_context_iteration (s->context, FALSE))
    ;
  g_clear_object (&s->soup);
  while (g_main_context_iteration (s->context, FALSE))
    ;
  g_main_context_pop_thread_default (s->context);
  return NULL;
}

HubServer *
hub_server_new (GError **error)
{
  HubServer *s = g_new0 (HubServer, 1);
  g_mutex_init (&s->lock);
  g_cond_init (&s->cond);
  s->token = g_strdup ("hf_diffuse_test_token");
  s->repos = g_hash_table_new_full (g_str_hash, g_str_equal, NULL, (GDestroyNotify) srepo_free);
  s->faults = g_ptr_array_new_with_free_func ((GDestroyNotify) fault_free);
  s->log = g_ptr_array_new_with_free_func (g_free);
  s->streams = g_ptr_array_new ();
  s->context = g_main_context_new ();
  s->loop = g_main_loop_new (s->context, FALSE);
  s->thread = g_thread_new ("hubserver", server_thread, s);
  g_mutex_lock (&s->lock);
  while (!s->ready)
    g_cond_wait (&s->cond, &s->lock);
  g_mutex_unlock (&s->lock);
  if (s->start_error) {
    g_propagate_error (error, s->start_error);
    s->start_error = NULL;
    hub_server_free (s);
    return NULL;
  }
  s->endpoint = g_strdup_printf ("http://127.0.0.1:%u", s->hub_port);
  s->cdn = g_strdup_printf ("http://localhost:%u", s->cdn_port);
  return s;
}

void
hub_server_free (HubServer *s)
{
  if (!s)
    return;
  GSource *src = g_idle_source_new ();
  g_source_set_callback (src, quit_loop, s->loop, NULL);
  g_source_attach (src, s->context);
  g_source_unref (src);
  g_thread_join (s->thread);
  g_main_loop_unref (s->loop);
  g_main_context_unref (s->context);
  g_hash_table_unref (s->repos);
  g_ptr_array_unref (s->faults);
  g_ptr_array_unref (s->log);
  g_ptr_array_unref (s->streams);
  g_free (s->endpoint);
  g_free (s->cdn);
  g_free (s->token);
  g_mutex_clear (&s->lock);
  g_cond_clear (&s->cond);
  g_free (s);
}

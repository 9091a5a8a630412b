/* Hub client tests against the test Hub (hubserver.c) on 127.0.0.1, plus
 * the cache that Python's huggingface_hub made (tests/fixtures/hub-cache,
 * from tests/reference/make_hf_cache.py). */
#include <diffuse/error.h>
#include <diffuse/hub.h>

#include "hubserver.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib/gstdio.h>
#include <json-glib/json-glib.h>

#define REPO "diffuse-test/tiny-pipe"
#define BIG_REPO "diffuse-test/big"
#define BIG_SIZE (3u * 1024 * 1024 + 1234)
#define MID_SIZE (200u * 1024)

static HubServer *server;
static char *fixtures;
static GBytes *big_data, *mid_data;

/* ---------------- helpers ---------------- */

static char *
fixture (const char *rel)
{
  return g_build_filename (fixtures, rel, NULL);
}

static char *
mkdtemp_dir (void)
{
  char *tmpl = g_build_filename (g_get_tmp_dir (), "diffuse-hub-XXXXXX", NULL);
  char *d = g_mkdtemp (tmpl);
  g_assert_nonnull (d);
  return d;
}

static void
rm_rf (const char *path)
{
  struct stat st;
  if (lstat (path, &st) != 0)
    return;
  if (S_ISDIR (st.st_mode)) {
    GDir *d = g_dir_open (path, 0, NULL);
    const char *n;
    while (d && (n = g_dir_read_name (d))) {
      char *c = g_build_filename (path, n, NULL);
      rm_rf (c);
      g_free (c);
    }
    if (d)
      g_dir_close (d);
    g_rmdir (path);
  } else
    g_unlink (path);
}

static void
copy_tree (const char *src, const char *dst)
{
  struct stat st;
  g_assert_cmpint (lstat (src, &st), ==, 0);
  if (S_ISLNK (st.st_mode)) {
    char *t = g_file_read_link (src, NULL);
    g_assert_cmpint (symlink (t, dst), ==, 0);
    g_free (t);
  } else if (S_ISDIR (st.st_mode)) {
    g_assert_cmpint (g_mkdir_with_parents (dst, 0777), ==, 0);
    GDir *d = g_dir_open (src, 0, NULL);
    const char *n;
    while ((n = g_dir_read_name (d))) {
      char *a = g_build_filename (src, n, NULL), *b = g_build_filename (dst, n, NULL);
      copy_tree (a, b);
      g_free (a);
      g_free (b);
    }
    g_dir_close (d);
  } else {
    char *c;
    gsize len;
    g_assert_true (g_file_get_contents (src, &c, &len, NULL));
    g_assert_true (g_file_set_contents (dst, c, (gssize) len, NULL));
    g_free (c);
  }
}

static GBytes *
make_bytes (gsize n, guint32 seed)
{
  GRand *r = g_rand_new_with_seed (seed);
  guint8 *d = g_malloc (n);
  for (gsize i = 0; i < n; i++)
    d[i] = (guint8) g_rand_int (r);
  g_rand_free (r);
  return g_bytes_new_take (d, n);
}

static char *
sha256_file (const char *path)
{
  char *c;
  gsize len;
  if (!g_file_get_contents (path, &c, &len, NULL))
    return NULL;
  char *r = g_compute_checksum_for_data (G_CHECKSUM_SHA256, (const guchar *) c, len);
  g_free (c);
  return r;
}

static void
assert_file_equals (const char *path, const char *want_path)
{
  char *a, *b;
  gsize la, lb;
  g_assert_true (g_file_get_contents (path, &a, &la, NULL));
  g_assert_true (g_file_get_contents (want_path, &b, &lb, NULL));
  g_assert_cmpmem (a, la, b, lb);
  g_free (a);
  g_free (b);
}

static void
assert_file_bytes (const char *path, GBytes *want)
{
  char *a;
  gsize la;
  g_assert_true (g_file_get_contents (path, &a, &la, NULL));
  gsize lb;
  const void *b = g_bytes_get_data (want, &lb);
  g_assert_cmpuint (la, ==, lb);
  g_assert_true (memcmp (a, b, la) == 0);
  g_free (a);
}

typedef struct {
  const char *token;      /* NULL: none */
  gboolean offline;
  guint max_retries;
  guint timeout_s;
  const char *endpoint;   /* NULL: the test server */
  DiffuseHubProgressFunc progress;
  gpointer progress_data;
  GCancellable *cancellable;
} ClientOpts;

static DiffuseHubClient *
client_with (const char *cache, const ClientOpts *o)
{
  DiffuseHubParams p = diffuse_hub_default_params ();
  p.endpoint = o && o->endpoint ? o->endpoint : hub_server_endpoint (server);
  p.token = o && o->token ? o->token : "";
  p.cache_dir = cache;
  p.offline = o ? o->offline : FALSE;
  p.max_retries = o && o->max_retries ? o->max_retries : 3;
  p.retry_base_ms = 20;
  p.retry_max_ms = 100;
  p.timeout_s = o && o->timeout_s ? o->timeout_s : 5;
  if (o) {
    p.progress = o->progress;
    p.progress_data = o->progress_data;
    p.cancellable = o->cancellable;
  }
  GError *err = NULL;
  DiffuseHubClient *c = diffuse_hub_client_new (&p, &err);
  g_assert_no_error (err);
  return c;
}

static DiffuseHubClient *
client (const char *cache)
{
  return client_with (cache, NULL);
}

static guint
count_log (const char *prefix, const char *contains)
{
  GPtrArray *log = hub_server_log (server);
  guint n = 0;
  for (guint i = 0; i < log->len; i++)
    if (g_str_has_prefix (log->pdata[i], prefix) && (!contains || strstr (log->pdata[i], contains)))
      n++;
  g_ptr_array_unref (log);
  return n;
}

static void
dump_log (void)
{
  GPtrArray *log = hub_server_log (server);
  for (guint i = 0; i < log->len; i++)
    g_test_message ("  %s", (char *) log->pdata[i]);
  g_ptr_array_unref (log);
}

static void
reset_server (void)
{
  hub_server_clear_faults (server);
  hub_server_clear_log (server);
}

static char *
storage_of (const char *cache, const char *repo)
{
  char *name = diffuse_hub_repo_folder_name (repo);
  char *s = g_build_filename (cache, name, NULL);
  g_free (name);
  return s;
}

/* Entries of dir whose name ends with suffix. */
static guint
count_suffix (const char *dir, const char *suffix)
{
  guint n = 0;
  GDir *d = g_dir_open (dir, 0, NULL);
  const char *name;
  while (d && (name = g_dir_read_name (d)))
    if (g_str_has_suffix (name, suffix))
      n++;
  if (d)
    g_dir_close (d);
  return n;
}

static guint
count_entries (const char *dir)
{
  guint n = 0;
  GDir *d = g_dir_open (dir, 0, NULL);
  while (d && g_dir_read_name (d))
    n++;
  if (d)
    g_dir_close (d);
  return n;
}

/* ---------------- pure functions ---------------- */

static void
test_repo_id (void)
{
  const char *good[] = { "foo", "foo/bar", "123", "Foo-BAR_foo.bar123", "runwayml/stable-diffusion-v1-5",
                         "a/b", "_x/y_", NULL };
  const char *bad[] = { "", "datasets/foo/bar", ".repo_id", "foo--bar", "foo.git", "other..repo..id", "-foo",
                        "foo-", "foo/", "/foo", "foo bar", "foo/bar/baz", "/", "./model", NULL };
  for (int i = 0; good[i]; i++) {
    g_test_message ("good %s", good[i]);
    g_assert_true (diffuse_is_repo_id (good[i]));
  }
  for (int i = 0; bad[i]; i++) {
    g_test_message ("bad %s", bad[i]);
    g_assert_false (diffuse_is_repo_id (bad[i]));
  }
  /* an existing local path is not a repo id, even when it looks like one */
  char *dir = mkdtemp_dir ();
  char *cwd = g_get_current_dir ();
  g_assert_cmpint (chdir (dir), ==, 0);
  g_assert_cmpint (g_mkdir_with_parents ("org/model", 0777), ==, 0);
  g_assert_false (diffuse_is_repo_id ("org/model"));
  g_assert_true (diffuse_is_repo_id ("org/other"));
  g_assert_cmpint (chdir (cwd), ==, 0);
  rm_rf (dir);
  g_free (dir);
  g_free (cwd);

  char *f = diffuse_hub_repo_folder_name ("runwayml/stable-diffusion-v1-5");
  g_assert_cmpstr (f, ==, "models--runwayml--stable-diffusion-v1-5");
  g_free (f);
  f = diffuse_hub_repo_folder_name ("gpt2");
  g_assert_cmpstr (f, ==, "models--gpt2");
  g_free (f);
}

/* expected matches from Python's fnmatch (tests/fixtures/hub/fnmatch.json) */
static void
test_fnmatch (void)
{
  char *path = fixture ("hub/fnmatch.json");
  JsonParser *p = json_parser_new ();
  GError *err = NULL;
  g_assert_true (json_parser_load_from_file (p, path, &err));
  JsonArray *cases = json_node_get_array (json_parser_get_root (p));
  g_assert_cmpuint (json_array_get_length (cases), >, 20);
  for (guint i = 0; i < json_array_get_length (cases); i++) {
    JsonArray *c = json_array_get_array_element (cases, i);
    const char *pat = json_array_get_string_element (c, 0), *name = json_array_get_string_element (c, 1);
    gboolean want = json_array_get_boolean_element (c, 2);
    if (diffuse_hub_fnmatch (pat, name) != want)
      g_error ("fnmatch('%s', '%s') should be %d", name, pat, want);
  }
  g_object_unref (p);
  g_free (path);
}

static void
test_cache_dir_env (void)
{
  const char *vars[] = { "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", NULL };
  char *saved[4];
  for (int i = 0; vars[i]; i++) {
    saved[i] = g_strdup (g_getenv (vars[i]));
    g_unsetenv (vars[i]);
  }
  char *d = diffuse_hub_cache_dir ();
  char *want = g_build_filename (g_get_home_dir (), ".cache", "huggingface", "hub", NULL);
  g_assert_cmpstr (d, ==, want);
  g_free (d);
  g_free (want);
  g_setenv ("XDG_CACHE_HOME", "/x/cache", TRUE);
  d = diffuse_hub_cache_dir ();
  g_assert_cmpstr (d, ==, "/x/cache/huggingface/hub");
  g_free (d);
  g_setenv ("HF_HOME", "/h/home", TRUE);
  d = diffuse_hub_cache_dir ();
  g_assert_cmpstr (d, ==, "/h/home/hub");
  g_free (d);
  g_setenv ("HUGGINGFACE_HUB_CACHE", "/legacy", TRUE);
  d = diffuse_hub_cache_dir ();
  g_assert_cmpstr (d, ==, "/legacy");
  g_free (d);
  g_setenv ("HF_HUB_CACHE", "~/hubcache", TRUE);
  d = diffuse_hub_cache_dir ();
  want = g_build_filename (g_get_home_dir (), "hubcache", NULL);
  g_assert_cmpstr (d, ==, want);
  g_free (d);
  g_free (want);
  for (int i = 0; vars[i]; i++) {
    if (saved[i])
      g_setenv (vars[i], saved[i], TRUE);
    else
      g_unsetenv (vars[i]);
    g_free (saved[i]);
  }
}

static void
test_client_env (void)
{
  char *home = mkdtemp_dir ();
  char *tokfile = g_build_filename (home, "token", NULL);
  g_assert_true (g_file_set_contents (tokfile, "  hf_from_file\n", -1, NULL));
  g_setenv ("HF_HOME", home, TRUE);
  g_setenv ("HF_ENDPOINT", "http://127.0.0.1:9/", TRUE);
  g_setenv ("HF_HUB_OFFLINE", "1", TRUE);
  g_unsetenv ("HF_TOKEN");
  g_unsetenv ("HF_HUB_CACHE");
  DiffuseHubClient *c = diffuse_hub_client_new (NULL, NULL);
  g_assert_nonnull (c);
  g_assert_cmpstr (diffuse_hub_client_get_endpoint (c), ==, "http://127.0.0.1:9");
  g_assert_true (diffuse_hub_client_is_offline (c));
  char *want = g_build_filename (home, "hub", NULL);
  g_assert_cmpstr (diffuse_hub_client_get_cache_dir (c), ==, want);
  g_free (want);
  diffuse_hub_client_free (c);

  /* the token file is sent (checked against the server's log) */
  g_assert_true (g_file_set_contents (tokfile, hub_server_token (server), -1, NULL));
  g_unsetenv ("HF_HUB_OFFLINE");
  g_setenv ("HF_ENDPOINT", hub_server_endpoint (server), TRUE);
  reset_server ();
  c = diffuse_hub_client_new (NULL, NULL);
  GError *err = NULL;
  char *p = diffuse_hub_download_file (c, "diffuse-test/private", "main", "config.json", &err);
  g_assert_no_error (err);
  g_assert_nonnull (p);
  g_assert_true (g_str_has_prefix (p, home));
  g_assert_cmpuint (count_log ("HEAD hub", "auth"), >=, 1);
  g_free (p);
  diffuse_hub_client_free (c);

  /* HF_TOKEN wins over the file; a bad one is refused by the server */
  g_setenv ("HF_TOKEN", "hf_wrong", TRUE);
  c = diffuse_hub_client_new (NULL, NULL);
  p = diffuse_hub_download_file (c, "diffuse-test/private", "main", "model.safetensors", &err);
  g_assert_null (p);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_GATED);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  diffuse_hub_client_free (c);

  /* HF_TOKEN_PATH points elsewhere */
  g_unsetenv ("HF_TOKEN");
  char *tp = g_build_filename (home, "other-token", NULL);
  g_assert_true (g_file_set_contents (tp, "hf_wrong2", -1, NULL));
  g_setenv ("HF_TOKEN_PATH", tp, TRUE);
  c = diffuse_hub_client_new (NULL, NULL);
  p = diffuse_hub_download_file (c, "diffuse-test/private", "main", "model.safetensors", &err);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_GATED);
  g_clear_error (&err);
  diffuse_hub_client_free (c);
  g_unsetenv ("HF_TOKEN_PATH");

  /* bad endpoint */
  DiffuseHubParams prm = diffuse_hub_default_params ();
  prm.endpoint = "ftp://example";
  g_assert_null (diffuse_hub_client_new (&prm, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);

  g_unsetenv ("HF_HOME");
  g_unsetenv ("HF_ENDPOINT");
  g_free (tp);
  g_free (tokfile);
  rm_rf (home);
  g_free (home);
}

/* ---------------- downloads ---------------- */

static void
test_download_file (void)
{
  char *cache = mkdtemp_dir ();
  ClientOpts o = { .token = hub_server_token (server) };
  DiffuseHubClient *c = client_with (cache, &o);
  char *commit = hub_server_commit (server, REPO, "main");
  GError *err = NULL;
  reset_server ();

  char *p = diffuse_hub_download_file (c, REPO, NULL, "model_index.json", &err);
  g_assert_no_error (err);
  char *want = g_build_filename (cache, "models--diffuse-test--tiny-pipe", "snapshots", commit, "model_index.json", NULL);
  g_assert_cmpstr (p, ==, want);
  char *src = fixture ("hub/repos/tiny-pipe/main/model_index.json");
  assert_file_equals (p, src);
  g_free (src);
  /* relative symlink to the blob named by the etag (git sha1 of a regular file) */
  char *etag = hub_server_etag (server, REPO, "main", "model_index.json");
  g_assert_cmpuint (strlen (etag), ==, 40);
  char *target = g_file_read_link (p, NULL);
  char *want_target = g_strconcat ("../../blobs/", etag, NULL);
  g_assert_cmpstr (target, ==, want_target);
  g_free (target);
  g_free (want_target);
  g_free (etag);
  g_free (want);
  g_free (p);
  /* refs/main */
  char *ref = g_build_filename (cache, "models--diffuse-test--tiny-pipe", "refs", "main", NULL);
  char *refc = NULL;
  g_assert_true (g_file_get_contents (ref, &refc, NULL, NULL));
  g_assert_cmpstr (refc, ==, commit);
  g_free (refc);
  g_free (ref);
  /* the branch's 307 to the resolve cache was followed with the token */
  g_assert_cmpuint (count_log ("HEAD hub /diffuse-test/tiny-pipe/resolve/main/model_index.json", "auth"), ==, 1);
  g_assert_cmpuint (count_log ("HEAD hub /api/resolve-cache/", "auth"), ==, 1);
  g_assert_cmpuint (count_log ("GET hub /api/resolve-cache/", "auth"), ==, 1);

  /* an LFS file: 302 to the CDN host, where the token is not sent */
  reset_server ();
  p = diffuse_hub_download_file (c, REPO, "main", "unet/diffusion_pytorch_model.safetensors", &err);
  g_assert_no_error (err);
  src = fixture ("hub/repos/tiny-pipe/main/unet/diffusion_pytorch_model.safetensors");
  assert_file_equals (p, src);
  g_free (src);
  etag = hub_server_etag (server, REPO, "main", "unet/diffusion_pytorch_model.safetensors");
  g_assert_cmpuint (strlen (etag), ==, 64);
  target = g_file_read_link (p, NULL);
  want_target = g_strconcat ("../../../blobs/", etag, NULL);
  g_assert_cmpstr (target, ==, want_target);
  g_free (target);
  g_free (want_target);
  g_free (etag);
  g_free (p);
  dump_log ();
  g_assert_cmpuint (count_log ("HEAD hub", "auth"), ==, 1);
  g_assert_cmpuint (count_log ("GET cdn", "noauth"), ==, 1);
  g_assert_cmpuint (count_log ("GET cdn", " auth"), ==, 0);
  g_assert_cmpuint (count_log ("GET hub", NULL), ==, 0);

  /* again by branch: one HEAD, no GET */
  reset_server ();
  p = diffuse_hub_download_file (c, REPO, "main", "unet/diffusion_pytorch_model.safetensors", &err);
  g_assert_no_error (err);
  g_free (p);
  g_assert_cmpuint (hub_server_request_count (server), ==, 1);
  g_assert_cmpuint (count_log ("GET", NULL), ==, 0);
  /* by commit: no request at all */
  reset_server ();
  p = diffuse_hub_download_file (c, REPO, commit, "unet/diffusion_pytorch_model.safetensors", &err);
  g_assert_no_error (err);
  g_free (p);
  g_assert_cmpuint (hub_server_request_count (server), ==, 0);

  /* the cache lookup without a client */
  p = diffuse_hub_try_load_from_cache (cache, REPO, "main", "model_index.json");
  g_assert_nonnull (p);
  g_free (p);
  g_assert_null (diffuse_hub_try_load_from_cache (cache, REPO, "main", "vae/config.json"));
  g_assert_null (diffuse_hub_try_load_from_cache (cache, REPO, "v1.0", "model_index.json"));

  /* lock files where huggingface_hub puts them; CACHEDIR.TAG */
  char *locks = g_build_filename (cache, ".locks", "models--diffuse-test--tiny-pipe", NULL);
  g_assert_cmpuint (count_suffix (locks, ".lock"), ==, 2);
  g_free (locks);
  char *tag = g_build_filename (cache, "CACHEDIR.TAG", NULL);
  g_assert_true (g_file_test (tag, G_FILE_TEST_IS_REGULAR));
  g_free (tag);

  /* bad arguments */
  g_assert_null (diffuse_hub_download_file (c, REPO, "main", "../etc/passwd", &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  g_assert_null (diffuse_hub_download_file (c, "a/b/c", "main", "x", &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);

  diffuse_hub_client_free (c);
  g_free (commit);
  rm_rf (cache);
  g_free (cache);
}

static void
collect_files (const char *base, const char *rel, GPtrArray *out)
{
  char *dir = rel ? g_build_filename (base, rel, NULL) : g_strdup (base);
  GDir *d = g_dir_open (dir, 0, NULL);
  const char *n;
  while ((n = g_dir_read_name (d))) {
    char *r = rel ? g_strconcat (rel, "/", n, NULL) : g_strdup (n);
    char *full = g_build_filename (base, r, NULL);
    if (g_file_test (full, G_FILE_TEST_IS_DIR))
      collect_files (base, r, out);
    else
      g_ptr_array_add (out, g_strdup (r));
    g_free (full);
    g_free (r);
  }
  g_dir_close (d);
  g_free (dir);
}

static int
cmp_strp (gconstpointer a, gconstpointer b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

static void
test_list_files (void)
{
  char *cache = mkdtemp_dir ();
  DiffuseHubClient *c = client (cache);
  GError *err = NULL;
  char *commit = NULL;
  reset_server ();
  GPtrArray *files = diffuse_hub_list_files (c, REPO, "main", &commit, &err);
  g_assert_no_error (err);
  char *want_commit = hub_server_commit (server, REPO, "main");
  g_assert_cmpstr (commit, ==, want_commit);
  GPtrArray *want = g_ptr_array_new_with_free_func (g_free);
  char *dir = fixture ("hub/repos/tiny-pipe/main");
  collect_files (dir, NULL, want);
  g_ptr_array_sort (want, cmp_strp);
  g_assert_cmpuint (files->len, ==, want->len);
  for (guint i = 0; i < want->len; i++)
    g_assert_cmpstr (files->pdata[i], ==, want->pdata[i]);
  g_ptr_array_unref (files);
  g_assert_cmpuint (hub_server_request_count (server), ==, 1);
  /* the tree listing is cached (huggingface_hub's trees/<commit>.json) */
  char *tree = g_strdup_printf ("%s/models--diffuse-test--tiny-pipe/trees/%s.json", cache, commit);
  g_assert_true (g_file_test (tree, G_FILE_TEST_IS_REGULAR));
  g_free (tree);
  /* by commit: from that cache, no request */
  reset_server ();
  char *commit2 = NULL;
  files = diffuse_hub_list_files (c, REPO, commit, &commit2, &err);
  g_assert_no_error (err);
  g_assert_cmpstr (commit2, ==, commit);
  g_assert_cmpuint (files->len, ==, want->len);
  g_assert_cmpuint (hub_server_request_count (server), ==, 0);
  g_ptr_array_unref (files);
  /* resolve */
  char *r = diffuse_hub_resolve_revision (c, REPO, "main", &err);
  g_assert_no_error (err);
  g_assert_cmpstr (r, ==, want_commit);
  g_free (r);
  r = diffuse_hub_resolve_revision (c, REPO, want_commit, &err);
  g_assert_cmpstr (r, ==, want_commit);
  g_free (r);
  /* offline: refs + tree cache */
  ClientOpts o = { .offline = TRUE };
  DiffuseHubClient *off = client_with (cache, &o);
  reset_server ();
  files = diffuse_hub_list_files (off, REPO, "main", NULL, &err);
  g_assert_no_error (err);
  g_assert_cmpuint (files->len, ==, want->len);
  g_ptr_array_unref (files);
  r = diffuse_hub_resolve_revision (off, REPO, "main", &err);
  g_assert_cmpstr (r, ==, want_commit);
  g_free (r);
  g_assert_null (diffuse_hub_resolve_revision (off, REPO, "v1.0", &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_OFFLINE);
  g_assert_nonnull (strstr (err->message, "v1.0"));
  g_clear_error (&err);
  g_assert_cmpuint (hub_server_request_count (server), ==, 0);
  diffuse_hub_client_free (off);

  g_free (dir);
  g_ptr_array_unref (want);
  g_free (commit);
  g_free (commit2);
  g_free (want_commit);
  diffuse_hub_client_free (c);
  rm_rf (cache);
  g_free (cache);
}

static void
test_revisions (void)
{
  char *cache = mkdtemp_dir ();
  DiffuseHubClient *c = client (cache);
  GError *err = NULL;
  const char *revs[] = { "main", "v1.0", "refs/pr/1" };
  const char *dirs[] = { "main", "v1.0", "pr1" };
  reset_server ();
  for (int i = 0; i < 3; i++) {
    char *p = diffuse_hub_download_file (c, REPO, revs[i], "model_index.json", &err);
    g_assert_no_error (err);
    char *rel = g_strdup_printf ("hub/repos/tiny-pipe/%s/model_index.json", dirs[i]);
    char *src = fixture (rel);
    assert_file_equals (p, src);
    g_free (src);
    g_free (rel);
    g_free (p);
    p = diffuse_hub_download_file (c, REPO, revs[i], "unet/diffusion_pytorch_model.safetensors", &err);
    g_assert_no_error (err);
    g_free (p);
    /* refs/<revision> (refs/pr/1 nests as refs/refs/pr/1) */
    char *ref = g_build_filename (cache, "models--diffuse-test--tiny-pipe", "refs", revs[i], NULL);
    char *refc = NULL, *want = hub_server_commit (server, REPO, revs[i]);
    g_assert_true (g_file_get_contents (ref, &refc, NULL, NULL));
    g_assert_cmpstr (refc, ==, want);
    g_free (refc);
    g_free (want);
    g_free (ref);
  }
  /* the unet weights are one blob in the three revisions: fetched once */
  g_assert_cmpuint (count_log ("GET cdn", "unet/diffusion_pytorch_model.safetensors"), ==, 1);
  char *p = diffuse_hub_download_file (c, REPO, "refs/pr/1", "unet/extra.txt", &err);
  g_assert_no_error (err);
  g_free (p);
  g_assert_null (diffuse_hub_download_file (c, REPO, "v9.9", "model_index.json", &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_REVISION_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, "v9.9"));
  g_clear_error (&err);
  g_assert_null (diffuse_hub_list_files (c, REPO, "v9.9", NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_REVISION_NOT_FOUND);
  g_clear_error (&err);
  diffuse_hub_client_free (c);
  rm_rf (cache);
  g_free (cache);
}

typedef struct {
  guint calls;
  guint n_files;
  guint last_index;
  guint64 overall_done, overall_total;
  guint64 last_file_done;
  gboolean monotonic;
  guint files_completed;
  int cancel_after_bytes; /* cancel when file_done exceeds this (-1 never) */
  GCancellable *cancel;   /* cancel this instead of returning FALSE */
} Progress;

static gboolean
on_progress (const DiffuseHubProgress *pr, gpointer data)
{
  Progress *p = data;
  p->calls++;
  g_assert_nonnull (pr->repo_id);
  g_assert_nonnull (pr->path);
  p->n_files = pr->n_files;
  if (pr->file_index == p->last_index && pr->file_done < p->last_file_done)
    p->monotonic = FALSE;
  if (pr->file_total && pr->file_done == pr->file_total && pr->file_index != 0 &&
      !(pr->file_index == p->last_index && p->last_file_done == pr->file_done))
    p->files_completed++;
  p->last_index = pr->file_index;
  p->last_file_done = pr->file_done;
  g_assert_cmpuint (pr->file_index, >=, 1);
  g_assert_cmpuint (pr->file_index, <=, pr->n_files);
  if (pr->file_total)
    g_assert_cmpuint (pr->file_done, <=, pr->file_total);
  p->overall_done = pr->overall_done;
  p->overall_total = pr->overall_total;
  if (p->cancel_after_bytes >= 0 && pr->file_done > (guint64) p->cancel_after_bytes) {
    if (p->cancel) {
      g_cancellable_cancel (p->cancel);
      return TRUE;
    }
    return FALSE;
  }
  return TRUE;
}

static gboolean
no_bin_no_fp16 (const char *path, gpointer data)
{
  (*(int *) data)++;
  return !g_str_has_suffix (path, ".bin") && !strstr (path, ".fp16.") && !g_str_has_prefix (path, "safety_checker/");
}

static void
test_snapshot (void)
{
  char *cache = mkdtemp_dir ();
  Progress pr = { .monotonic = TRUE, .cancel_after_bytes = -1 };
  ClientOpts o = { .progress = on_progress, .progress_data = &pr };
  DiffuseHubClient *c = client_with (cache, &o);
  GError *err = NULL;
  int calls = 0;
  char *folder = diffuse_hub_snapshot (c, REPO, "main", no_bin_no_fp16, &calls, &err);
  g_assert_no_error (err);
  char *commit = hub_server_commit (server, REPO, "main");
  char *want_folder = g_build_filename (cache, "models--diffuse-test--tiny-pipe", "snapshots", commit, NULL);
  g_assert_cmpstr (folder, ==, want_folder);
  /* exactly the accepted files, equal to the served ones */
  GPtrArray *all = g_ptr_array_new_with_free_func (g_free), *got = g_ptr_array_new_with_free_func (g_free);
  char *src = fixture ("hub/repos/tiny-pipe/main");
  collect_files (src, NULL, all);
  collect_files (folder, NULL, got);
  g_assert_cmpint (calls, ==, (int) all->len);
  guint accepted = 0;
  guint64 bytes = 0;
  for (guint i = 0; i < all->len; i++) {
    int dummy = 0;
    char *s = g_build_filename (src, all->pdata[i], NULL), *d = g_build_filename (folder, all->pdata[i], NULL);
    if (no_bin_no_fp16 (all->pdata[i], &dummy)) {
      accepted++;
      assert_file_equals (d, s);
      struct stat st;
      g_assert_cmpint (stat (s, &st), ==, 0);
      bytes += (guint64) st.st_size;
    } else
      g_assert_false (g_file_test (d, G_FILE_TEST_EXISTS));
    g_free (s);
    g_free (d);
  }
  g_assert_cmpuint (got->len, ==, accepted);
  /* progress: every file, bytes add up */
  g_assert_cmpuint (pr.n_files, ==, accepted);
  g_assert_cmpuint (pr.last_index, ==, accepted);
  g_assert_cmpuint (pr.overall_total, ==, bytes);
  g_assert_cmpuint (pr.overall_done, ==, bytes);
  g_assert_cmpuint (pr.files_completed, ==, accepted);
  g_assert_true (pr.monotonic);
  g_free (folder);

  /* again: nothing to fetch, no file request (the listing is by branch) */
  reset_server ();
  folder = diffuse_hub_snapshot (c, REPO, "main", no_bin_no_fp16, &calls, &err);
  g_assert_no_error (err);
  g_assert_cmpstr (folder, ==, want_folder);
  g_free (folder);
  g_assert_cmpuint (count_log ("HEAD", NULL), ==, 0);
  g_assert_cmpuint (count_log ("GET", NULL), ==, 1);

  /* offline: complete for this filter, incomplete for all files */
  ClientOpts oo = { .offline = TRUE };
  DiffuseHubClient *off = client_with (cache, &oo);
  reset_server ();
  folder = diffuse_hub_snapshot (off, REPO, "main", no_bin_no_fp16, &calls, &err);
  g_assert_no_error (err);
  g_assert_cmpstr (folder, ==, want_folder);
  g_free (folder);
  g_assert_null (diffuse_hub_snapshot (off, REPO, "main", NULL, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_OFFLINE);
  g_test_message ("%s", err->message);
  g_assert_nonnull (strstr (err->message, REPO));
  g_assert_nonnull (strstr (err->message, "'main'"));
  g_assert_nonnull (strstr (err->message, "diffusion_pytorch_model.bin"));
  g_clear_error (&err);
  g_assert_cmpuint (hub_server_request_count (server), ==, 0);
  diffuse_hub_client_free (off);

  g_ptr_array_unref (all);
  g_ptr_array_unref (got);
  g_free (src);
  g_free (commit);
  g_free (want_folder);
  diffuse_hub_client_free (c);
  rm_rf (cache);
  g_free (cache);
}

/* list, model_index.json first, then the chosen files by commit */
static void
test_two_phase (void)
{
  char *cache = mkdtemp_dir ();
  DiffuseHubClient *c = client (cache);
  GError *err = NULL;
  char *commit = NULL;
  reset_server ();
  GPtrArray *files = diffuse_hub_list_files (c, REPO, "main", &commit, &err);
  g_assert_no_error (err);
  char *mi = diffuse_hub_download_file (c, REPO, commit, "model_index.json", &err);
  g_assert_no_error (err);
  const char *pick[] = { "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                         "scheduler/scheduler_config.json", NULL };
  char *folder = diffuse_hub_snapshot_paths (c, REPO, commit, pick, &err);
  g_assert_no_error (err);
  char *dir = g_path_get_dirname (mi);
  g_assert_cmpstr (folder, ==, dir);
  for (int i = 0; pick[i]; i++) {
    char *p = g_build_filename (folder, pick[i], NULL);
    g_assert_true (g_file_test (p, G_FILE_TEST_IS_REGULAR));
    g_free (p);
  }
  /* one listing, then HEAD + GET per file, nothing else */
  g_assert_cmpuint (count_log ("GET hub /api/models/", NULL), ==, 1);
  g_assert_cmpuint (count_log ("HEAD", NULL), ==, 4);
  /* a path that is not in the repo */
  const char *bad[] = { "unet/nothing.json", NULL };
  g_assert_null (diffuse_hub_snapshot_paths (c, REPO, commit, bad, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_ENTRY_NOT_FOUND);
  g_clear_error (&err);
  g_free (dir);
  g_free (folder);
  g_free (mi);
  g_free (commit);
  g_ptr_array_unref (files);
  diffuse_hub_client_free (c);
  rm_rf (cache);
  g_free (cache);
}

static void
test_offline (void)
{
  char *cache = mkdtemp_dir ();
  DiffuseHubClient *c = client (cache);
  GError *err = NULL;
  char *p = diffuse_hub_download_file (c, REPO, "main", "model_index.json", &err);
  g_assert_no_error (err);
  diffuse_hub_client_free (c);
  /* without a cached tree listing, offline listing is what the snapshot holds */
  ClientOpts oo = { .offline = TRUE };
  c = client_with (cache, &oo);
  GPtrArray *files = diffuse_hub_list_files (c, REPO, "main", NULL, &err);
  g_assert_no_error (err);
  g_assert_cmpuint (files->len, ==, 1);
  g_assert_cmpstr (files->pdata[0], ==, "model_index.json");
  g_ptr_array_unref (files);
  diffuse_hub_client_free (c);
  /* with one (written by an online listing), the whole repo */
  c = client (cache);
  files = diffuse_hub_list_files (c, REPO, "main", NULL, &err);
  g_assert_no_error (err);
  guint n_files = files->len;
  g_assert_cmpuint (n_files, >, 10);
  g_ptr_array_unref (files);
  diffuse_hub_client_free (c);

  g_setenv ("HF_HUB_OFFLINE", "1", TRUE);
  c = client (cache);
  g_unsetenv ("HF_HUB_OFFLINE");
  g_assert_true (diffuse_hub_client_is_offline (c));
  reset_server ();
  char *q = diffuse_hub_download_file (c, REPO, "main", "model_index.json", &err);
  g_assert_no_error (err);
  g_assert_cmpstr (p, ==, q);
  g_free (q);
  q = diffuse_hub_download_file (c, REPO, "main", "vae/config.json", &err);
  g_assert_null (q);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_OFFLINE);
  g_test_message ("%s", err->message);
  g_assert_nonnull (strstr (err->message, REPO));
  g_assert_nonnull (strstr (err->message, "'main'"));
  g_assert_nonnull (strstr (err->message, "vae/config.json"));
  g_clear_error (&err);
  q = diffuse_hub_download_file (c, "diffuse-test/other", "main", "model_index.json", &err);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_OFFLINE);
  g_clear_error (&err);
  g_assert_cmpuint (hub_server_request_count (server), ==, 0);
  diffuse_hub_client_free (c);

  /* the network failing: the cache answers, a missing file is a NETWORK error naming it */
  GSocket *sock = g_socket_new (G_SOCKET_FAMILY_IPV4, G_SOCKET_TYPE_STREAM, G_SOCKET_PROTOCOL_TCP, NULL);
  GInetAddress *lo = g_inet_address_new_loopback (G_SOCKET_FAMILY_IPV4);
  GSocketAddress *sa = g_inet_socket_address_new (lo, 0);
  g_assert_true (g_socket_bind (sock, sa, TRUE, NULL));
  GSocketAddress *bound = g_socket_get_local_address (sock, NULL);
  char *dead = g_strdup_printf ("http://127.0.0.1:%u", g_inet_socket_address_get_port (G_INET_SOCKET_ADDRESS (bound)));
  g_socket_close (sock, NULL); /* nothing listens there any more */
  ClientOpts o = { .endpoint = dead, .max_retries = 1 };
  c = client_with (cache, &o);
  gint64 t0 = g_get_monotonic_time ();
  q = diffuse_hub_download_file (c, REPO, "main", "model_index.json", &err);
  g_assert_no_error (err);
  g_assert_cmpstr (p, ==, q);
  g_free (q);
  files = diffuse_hub_list_files (c, REPO, "main", NULL, &err);
  g_assert_no_error (err);
  g_assert_cmpuint (files->len, ==, n_files);
  g_ptr_array_unref (files);
  q = diffuse_hub_download_file (c, REPO, "main", "vae/config.json", &err);
  g_assert_null (q);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NETWORK);
  g_test_message ("%s", err->message);
  g_assert_nonnull (strstr (err->message, "vae/config.json"));
  g_clear_error (&err);
  g_assert_cmpint (g_get_monotonic_time () - t0, <, 5 * G_USEC_PER_SEC);
  diffuse_hub_client_free (c);
  g_free (dead);
  g_object_unref (bound);
  g_object_unref (sa);
  g_object_unref (lo);
  g_object_unref (sock);

  g_free (p);
  rm_rf (cache);
  g_free (cache);
}

/* the cache huggingface_hub made (tests/reference/make_hf_cache.py) */
static void
test_hf_cache (void)
{
  char *src = fixture ("hub-cache");
  char *json = fixture ("hub/hf-cache.json");
  JsonParser *jp = json_parser_new ();
  GError *err = NULL;
  g_assert_true (json_parser_load_from_file (jp, json, &err));
  JsonObject *root = json_node_get_object (json_parser_get_root (jp));
  char *cache = mkdtemp_dir ();
  char *copy = g_build_filename (cache, "hub", NULL);
  copy_tree (src, copy);

  ClientOpts oo = { .offline = TRUE };
  DiffuseHubClient *off = client_with (copy, &oo);
  reset_server ();
  JsonArray *entries = json_object_get_array_member (root, "files");
  g_assert_cmpuint (json_array_get_length (entries), >, 10);
  for (guint i = 0; i < json_array_get_length (entries); i++) {
    JsonObject *e = json_array_get_object_element (entries, i);
    const char *repo = json_object_get_string_member (e, "repo");
    const char *rev = json_object_get_string_member (e, "revision");
    const char *path = json_object_get_string_member (e, "path");
    const char *sha = json_object_get_string_member (e, "sha256");
    const char *commit = json_object_get_string_member (e, "commit");
    char *p = diffuse_hub_download_file (off, repo, rev, path, &err);
    g_assert_no_error (err);
    char *got = sha256_file (p);
    g_assert_cmpstr (got, ==, sha);
    g_assert_nonnull (strstr (p, commit));
    g_free (got);
    g_free (p);
    char *r = diffuse_hub_resolve_revision (off, repo, rev, &err);
    g_assert_no_error (err);
    g_assert_cmpstr (r, ==, commit);
    g_free (r);
  }
  /* huggingface_hub recorded a missing file under .no_exist */
  JsonArray *missing = json_object_get_array_member (root, "no_exist");
  g_assert_cmpuint (json_array_get_length (missing), >=, 1);
  for (guint i = 0; i < json_array_get_length (missing); i++) {
    JsonObject *e = json_array_get_object_element (missing, i);
    char *p = diffuse_hub_download_file (off, json_object_get_string_member (e, "repo"),
                                         json_object_get_string_member (e, "revision"),
                                         json_object_get_string_member (e, "path"), &err);
    g_assert_null (p);
    g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_ENTRY_NOT_FOUND);
    g_clear_error (&err);
  }
  /* the listing offline, from huggingface_hub's trees/<commit>.json */
  char *commit = NULL;
  GPtrArray *files = diffuse_hub_list_files (off, REPO, "main", &commit, &err);
  g_assert_no_error (err);
  g_assert_cmpuint (files->len, ==, json_object_get_int_member (root, "main_tree_files"));
  g_ptr_array_unref (files);
  g_free (commit);
  g_assert_cmpuint (hub_server_request_count (server), ==, 0);
  diffuse_hub_client_free (off);

  /* our own download of the same files makes the same tree (names and link targets) */
  char *ours = g_build_filename (cache, "ours", NULL);
  DiffuseHubClient *c = client (ours);
  for (guint i = 0; i < json_array_get_length (entries); i++) {
    JsonObject *e = json_array_get_object_element (entries, i);
    const char *repo = json_object_get_string_member (e, "repo");
    const char *rev = json_object_get_string_member (e, "revision");
    const char *path = json_object_get_string_member (e, "path");
    char *p = diffuse_hub_download_file (c, repo, rev, path, &err);
    g_assert_no_error (err);
    char *rel = p + strlen (ours);
    char *theirs = g_strconcat (copy, rel, NULL);
    char *t1 = g_file_read_link (p, NULL), *t2 = g_file_read_link (theirs, NULL);
    g_assert_nonnull (t1);
    g_assert_cmpstr (t1, ==, t2);
    g_free (t1);
    g_free (t2);
    g_free (theirs);
    g_free (p);
    const char *refs[] = { rev, NULL };
    for (int k = 0; refs[k]; k++) {
      char *storage = storage_of (ours, repo), *storage2 = storage_of (copy, repo);
      char *r1 = g_build_filename (storage, "refs", rev, NULL), *r2 = g_build_filename (storage2, "refs", rev, NULL);
      char *c1 = NULL, *c2 = NULL;
      g_assert_true (g_file_get_contents (r1, &c1, NULL, NULL));
      g_assert_true (g_file_get_contents (r2, &c2, NULL, NULL));
      g_assert_cmpstr (c1, ==, c2);
      g_free (c1);
      g_free (c2);
      g_free (r1);
      g_free (r2);
      g_free (storage);
      g_free (storage2);
    }
  }
  diffuse_hub_client_free (c);

  /* the reverse direction was checked by huggingface_hub itself */
  char *rj = fixture ("hub/hf-reads-ours.json");
  JsonParser *rp = json_parser_new ();
  g_assert_true (json_parser_load_from_file (rp, rj, &err));
  JsonObject *ro = json_node_get_object (json_parser_get_root (rp));
  g_assert_true (json_object_get_boolean_member (ro, "all_ok"));
  g_assert_cmpuint (json_object_get_int_member (ro, "checked_files"), >, 10);
  char *main_commit = hub_server_commit (server, REPO, "main");
  g_assert_cmpstr (json_object_get_string_member (ro, "main_commit"), ==, main_commit);
  g_free (main_commit);
  g_object_unref (rp);
  g_free (rj);

  g_free (ours);
  g_free (copy);
  rm_rf (cache);
  g_free (cache);
  g_object_unref (jp);
  g_free (json);
  g_free (src);
}

/* ---------------- errors ---------------- */

static void
test_errors (void)
{
  char *cache = mkdtemp_dir ();
  DiffuseHubClient *anon = client (cache);
  ClientOpts o = { .token = hub_server_token (server) };
  DiffuseHubClient *auth = client_with (cache, &o);
  GError *err = NULL;
  char *p;

  p = diffuse_hub_download_file (anon, "diffuse-test/nothing", "main", "config.json", &err);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_REPO_NOT_FOUND);
  g_test_message ("%s", err->message);
  g_assert_nonnull (strstr (err->message, "diffuse-test/nothing"));
  g_clear_error (&err);
  g_assert_null (diffuse_hub_list_files (auth, "diffuse-test/nothing", "main", NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_REPO_NOT_FOUND);
  g_clear_error (&err);

  /* private: 401 RepoNotFound without a token, fine with one */
  p = diffuse_hub_download_file (anon, "diffuse-test/private", "main", "config.json", &err);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_REPO_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, "token"));
  g_clear_error (&err);
  p = diffuse_hub_download_file (auth, "diffuse-test/private", "main", "config.json", &err);
  g_assert_no_error (err);
  g_free (p);

  /* gated */
  p = diffuse_hub_download_file (anon, "diffuse-test/gated", "main", "model.safetensors", &err);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_GATED);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  g_assert_null (diffuse_hub_list_files (anon, "diffuse-test/gated", "main", NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_GATED);
  g_clear_error (&err);
  p = diffuse_hub_download_file (auth, "diffuse-test/gated", "main", "model.safetensors", &err);
  g_assert_no_error (err);
  g_free (p);
  p = diffuse_hub_download_file (auth, "diffuse-test/gated-denied", "main", "model.safetensors", &err);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_GATED);
  g_assert_nonnull (strstr (err->message, "403"));
  g_clear_error (&err);

  /* a one-part repo id */
  p = diffuse_hub_download_file (anon, "single-name-repo", "main", "config.json", &err);
  g_assert_no_error (err);
  g_assert_nonnull (strstr (p, "models--single-name-repo"));
  g_free (p);

  /* a missing file: ENTRY_NOT_FOUND, recorded in .no_exist, then known without a request */
  reset_server ();
  p = diffuse_hub_download_file (anon, REPO, "main", "unet/missing.json", &err);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_ENTRY_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, "unet/missing.json"));
  g_clear_error (&err);
  char *commit = hub_server_commit (server, REPO, "main");
  char *marker = g_build_filename (cache, "models--diffuse-test--tiny-pipe", ".no_exist", commit, "unet", "missing.json", NULL);
  g_assert_true (g_file_test (marker, G_FILE_TEST_IS_REGULAR));
  reset_server ();
  p = diffuse_hub_download_file (anon, REPO, commit, "unet/missing.json", &err);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_ENTRY_NOT_FOUND);
  g_clear_error (&err);
  g_assert_cmpuint (hub_server_request_count (server), ==, 0);
  g_free (marker);
  g_free (commit);

  diffuse_hub_client_free (anon);
  diffuse_hub_client_free (auth);
  rm_rf (cache);
  g_free (cache);
}

/* ---------------- faults ---------------- */

static char *
blobs_dir (const char *cache, const char *repo)
{
  char *s = storage_of (cache, repo);
  char *b = g_build_filename (s, "blobs", NULL);
  g_free (s);
  return b;
}

static void
test_retry_500 (void)
{
  char *cache = mkdtemp_dir ();
  DiffuseHubClient *c = client (cache);
  GError *err = NULL;
  reset_server ();
  hub_server_add_fault (server, "HEAD", "model_index.json", HUB_FAULT_STATUS, 500, 0, 2);
  hub_server_add_fault (server, "GET", "model_index.json", HUB_FAULT_STATUS, 502, 0, 1);
  hub_server_add_fault (server, "GET", "/api/models/", HUB_FAULT_STATUS, 503, 0, 1);
  char *p = diffuse_hub_download_file (c, REPO, "main", "model_index.json", &err);
  g_assert_no_error (err);
  g_free (p);
  dump_log ();
  g_assert_cmpuint (count_log ("HEAD hub /diffuse-test/tiny-pipe/resolve/main/model_index.json", NULL), ==, 3);
  g_assert_cmpuint (count_log ("GET hub /api/resolve-cache/", NULL), ==, 2);
  GPtrArray *files = diffuse_hub_list_files (c, REPO, "main", NULL, &err);
  g_assert_no_error (err);
  g_ptr_array_unref (files);
  g_assert_cmpuint (count_log ("GET hub /api/models/", NULL), ==, 2);

  /* always 503: SERVER after 1 + max_retries (3) attempts, nothing written */
  reset_server ();
  hub_server_add_fault (server, NULL, "vae/config.json", HUB_FAULT_STATUS, 503, 0, -1);
  p = diffuse_hub_download_file (c, REPO, "main", "vae/config.json", &err);
  g_assert_null (p);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_SERVER);
  g_test_message ("%s", err->message);
  g_assert_nonnull (strstr (err->message, "vae/config.json"));
  g_clear_error (&err);
  g_assert_cmpuint (count_log ("HEAD", "vae/config.json"), ==, 4);
  /* the same on the body */
  reset_server ();
  hub_server_add_fault (server, "GET", "vae/config.json", HUB_FAULT_STATUS, 500, 0, -1);
  p = diffuse_hub_download_file (c, REPO, "main", "vae/config.json", &err);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_SERVER);
  g_clear_error (&err);
  char *b = blobs_dir (cache, REPO);
  g_assert_cmpuint (count_suffix (b, ".incomplete"), ==, 0);
  g_assert_null (diffuse_hub_try_load_from_cache (cache, REPO, "main", "vae/config.json"));
  g_free (b);
  reset_server ();
  diffuse_hub_client_free (c);
  rm_rf (cache);
  g_free (cache);
}

static void
test_retry_429 (void)
{
  char *cache = mkdtemp_dir ();
  DiffuseHubClient *c = client (cache);
  GError *err = NULL;
  reset_server ();
  hub_server_add_fault (server, "HEAD", "model_index.json", HUB_FAULT_STATUS, 429, 1, 1);
  gint64 t0 = g_get_monotonic_time ();
  char *p = diffuse_hub_download_file (c, REPO, "main", "model_index.json", &err);
  gint64 dt = g_get_monotonic_time () - t0;
  g_assert_no_error (err);
  g_free (p);
  g_test_message ("429 + Retry-After: 1 took %.2f s", dt / 1e6);
  g_assert_cmpint (dt, >=, 950 * 1000); /* Retry-After honoured over the 20 ms backoff */
  g_assert_cmpint (dt, <, 10 * G_USEC_PER_SEC);
  reset_server ();
  diffuse_hub_client_free (c);
  rm_rf (cache);
  g_free (cache);
}

static void
test_drop_resume (void)
{
  char *cache = mkdtemp_dir ();
  Progress pr = { .monotonic = TRUE, .cancel_after_bytes = -1 };
  ClientOpts o = { .progress = on_progress, .progress_data = &pr };
  DiffuseHubClient *c = client_with (cache, &o);
  GError *err = NULL;
  reset_server ();
  hub_server_add_fault (server, "GET", "big.bin", HUB_FAULT_DROP, 1000000, 0, 1);
  char *p = diffuse_hub_download_file (c, BIG_REPO, "main", "big.bin", &err);
  g_assert_no_error (err);
  assert_file_bytes (p, big_data);
  g_free (p);
  dump_log ();
  g_assert_cmpuint (count_log ("GET cdn", "big.bin"), ==, 2);
  g_assert_cmpuint (count_log ("GET cdn", "range=bytes=1000000-"), ==, 1);
  g_assert_cmpuint (pr.overall_done, ==, BIG_SIZE);
  g_assert_cmpuint (pr.overall_total, ==, BIG_SIZE);

  /* dropped at every 700 kB: each resume gets further, so it completes */
  char *cache2 = mkdtemp_dir ();
  DiffuseHubClient *c2 = client (cache2);
  reset_server ();
  hub_server_add_fault (server, "GET", "big.bin", HUB_FAULT_DROP, 700000, 0, -1);
  p = diffuse_hub_download_file (c2, BIG_REPO, "main", "big.bin", &err);
  g_assert_no_error (err);
  assert_file_bytes (p, big_data);
  g_free (p);
  g_assert_cmpuint (count_log ("GET cdn", "big.bin"), ==, 5);
  reset_server ();
  diffuse_hub_client_free (c2);
  rm_rf (cache2);
  g_free (cache2);

  /* a regular (non-LFS) file dropped mid-body */
  reset_server ();
  hub_server_add_fault (server, "GET", "mid.txt", HUB_FAULT_DROP, 50000, 0, 1);
  p = diffuse_hub_download_file (c, BIG_REPO, "main", "mid.txt", &err);
  g_assert_no_error (err);
  assert_file_bytes (p, mid_data);
  g_free (p);
  g_assert_cmpuint (count_log ("GET hub", "range=bytes=50000-"), ==, 1);
  reset_server ();
  diffuse_hub_client_free (c);
  rm_rf (cache);
  g_free (cache);
}

static void
test_stall_slow (void)
{
  char *cache = mkdtemp_dir ();
  Progress pr = { .monotonic = TRUE, .cancel_after_bytes = -1 };
  ClientOpts o = { .timeout_s = 1, .progress = on_progress, .progress_data = &pr };
  DiffuseHubClient *c = client_with (cache, &o);
  GError *err = NULL;
  reset_server ();
  /* a body that stops: the I/O timeout fires, the download resumes */
  hub_server_add_fault (server, "GET", "big.bin", HUB_FAULT_STALL, 300000, 0, 1);
  gint64 t0 = g_get_monotonic_time ();
  char *p = diffuse_hub_download_file (c, BIG_REPO, "main", "big.bin", &err);
  g_assert_no_error (err);
  assert_file_bytes (p, big_data);
  g_free (p);
  g_test_message ("stall + resume took %.2f s", (g_get_monotonic_time () - t0) / 1e6);
  g_assert_cmpuint (count_log ("GET cdn", "range=bytes=300000-"), ==, 1);
  diffuse_hub_client_free (c);

  /* a slow body: it arrives, with progress along the way */
  char *cache2 = mkdtemp_dir ();
  Progress pr2 = { .monotonic = TRUE, .cancel_after_bytes = -1 };
  ClientOpts o2 = { .progress = on_progress, .progress_data = &pr2 };
  c = client_with (cache2, &o2);
  reset_server ();
  hub_server_add_fault (server, "GET", "mid.txt", HUB_FAULT_SLOW, 25, 0, 1); /* 25 chunks x 25 ms */
  t0 = g_get_monotonic_time ();
  p = diffuse_hub_download_file (c, BIG_REPO, "main", "mid.txt", &err);
  gint64 dt = g_get_monotonic_time () - t0;
  g_assert_no_error (err);
  assert_file_bytes (p, mid_data);
  g_free (p);
  g_test_message ("slow body: %.2f s, %u progress calls", dt / 1e6, pr2.calls);
  g_assert_cmpint (dt, >=, 500 * 1000);
  g_assert_cmpuint (pr2.calls, >=, 4);
  g_assert_true (pr2.monotonic);
  g_assert_cmpuint (pr2.overall_done, ==, MID_SIZE);
  reset_server ();
  diffuse_hub_client_free (c);
  rm_rf (cache);
  rm_rf (cache2);
  g_free (cache);
  g_free (cache2);
}

static void
assert_nothing_left (const char *cache, const char *repo, const char *path)
{
  char *b = blobs_dir (cache, repo);
  g_assert_cmpuint (count_suffix (b, ".incomplete"), ==, 0);
  g_assert_cmpuint (count_entries (b), ==, 0);
  g_free (b);
  char *p = diffuse_hub_try_load_from_cache (cache, repo, "main", path);
  g_assert_null (p);
}

static void
test_bad_size_checksum (void)
{
  char *cache = mkdtemp_dir ();
  DiffuseHubClient *c = client (cache);
  GError *err = NULL;
  reset_server ();
  /* the Hub announces 10 bytes more than the CDN serves */
  hub_server_add_fault (server, "HEAD", "big.bin", HUB_FAULT_WRONG_SIZE, 10, 0, -1);
  char *p = diffuse_hub_download_file (c, BIG_REPO, "main", "big.bin", &err);
  g_assert_null (p);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CHECKSUM);
  g_test_message ("%s", err->message);
  g_assert_nonnull (strstr (err->message, "big.bin"));
  g_clear_error (&err);
  assert_nothing_left (cache, BIG_REPO, "big.bin");

  /* a flipped byte: the sha256 (LFS) and the git sha1 (regular file) catch it */
  reset_server ();
  hub_server_add_fault (server, "GET", "big.bin", HUB_FAULT_CORRUPT, 0, 0, 1);
  hub_server_add_fault (server, "GET", "mid.txt", HUB_FAULT_CORRUPT, 0, 0, 1);
  p = diffuse_hub_download_file (c, BIG_REPO, "main", "big.bin", &err);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CHECKSUM);
  g_clear_error (&err);
  p = diffuse_hub_download_file (c, BIG_REPO, "main", "mid.txt", &err);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CHECKSUM);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  assert_nothing_left (cache, BIG_REPO, "big.bin");
  /* and the next try succeeds */
  p = diffuse_hub_download_file (c, BIG_REPO, "main", "mid.txt", &err);
  g_assert_no_error (err);
  assert_file_bytes (p, mid_data);
  g_free (p);
  reset_server ();
  diffuse_hub_client_free (c);
  rm_rf (cache);
  g_free (cache);
}

/* a partial .incomplete left by an earlier run (ours or huggingface_hub's) */
static void
test_resume_partial (void)
{
  char *cache = mkdtemp_dir ();
  DiffuseHubClient *c = client (cache);
  GError *err = NULL;
  char *etag = hub_server_etag (server, BIG_REPO, "main", "big.bin");
  char *b = blobs_dir (cache, BIG_REPO);
  g_assert_cmpint (g_mkdir_with_parents (b, 0777), ==, 0);
  char *inc = g_strdup_printf ("%s/%s.incomplete", b, etag);
  const char *data = g_bytes_get_data (big_data, NULL);
  g_assert_true (g_file_set_contents (inc, data, 1048576, NULL));
  reset_server ();
  char *p = diffuse_hub_download_file (c, BIG_REPO, "main", "big.bin", &err);
  g_assert_no_error (err);
  assert_file_bytes (p, big_data);
  g_free (p);
  g_assert_cmpuint (count_log ("GET cdn", "range=bytes=1048576-"), ==, 1);
  g_assert_false (g_file_test (inc, G_FILE_TEST_EXISTS));
  diffuse_hub_client_free (c);
  rm_rf (cache);

  /* the server ignores Range: start over from 0 */
  c = client (cache);
  g_assert_cmpint (g_mkdir_with_parents (b, 0777), ==, 0);
  g_assert_true (g_file_set_contents (inc, data, 1048576, NULL));
  reset_server ();
  hub_server_add_fault (server, "GET", "big.bin", HUB_FAULT_IGNORE_RANGE, 0, 0, 1);
  p = diffuse_hub_download_file (c, BIG_REPO, "main", "big.bin", &err);
  g_assert_no_error (err);
  assert_file_bytes (p, big_data);
  g_free (p);
  diffuse_hub_client_free (c);
  rm_rf (cache);

  /* garbage in the partial file: the checksum refuses the result, the next try is clean */
  c = client (cache);
  g_assert_cmpint (g_mkdir_with_parents (b, 0777), ==, 0);
  g_assert_true (g_file_set_contents (inc, "garbage garbage garbage", -1, NULL));
  reset_server ();
  p = diffuse_hub_download_file (c, BIG_REPO, "main", "big.bin", &err);
  g_assert_null (p);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CHECKSUM);
  g_clear_error (&err);
  g_assert_false (g_file_test (inc, G_FILE_TEST_EXISTS));
  p = diffuse_hub_download_file (c, BIG_REPO, "main", "big.bin", &err);
  g_assert_no_error (err);
  assert_file_bytes (p, big_data);
  g_free (p);
  diffuse_hub_client_free (c);

  g_free (inc);
  g_free (b);
  g_free (etag);
  rm_rf (cache);
  g_free (cache);
}

static gpointer
cancel_later (gpointer data)
{
  g_usleep (300 * 1000);
  g_cancellable_cancel (data);
  return NULL;
}

static void
test_cancel (void)
{
  char *cache = mkdtemp_dir ();
  GError *err = NULL;
  char *etag = hub_server_etag (server, BIG_REPO, "main", "big.bin");
  char *b = blobs_dir (cache, BIG_REPO);
  char *inc = g_strdup_printf ("%s/%s.incomplete", b, etag);

  /* the progress callback says stop */
  Progress pr = { .monotonic = TRUE, .cancel_after_bytes = 200000 };
  ClientOpts o = { .progress = on_progress, .progress_data = &pr };
  DiffuseHubClient *c = client_with (cache, &o);
  reset_server ();
  hub_server_add_fault (server, "GET", "big.bin", HUB_FAULT_SLOW, 2, 0, 1);
  char *p = diffuse_hub_download_file (c, BIG_REPO, "main", "big.bin", &err);
  g_assert_null (p);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED);
  g_clear_error (&err);
  g_assert_null (diffuse_hub_try_load_from_cache (cache, BIG_REPO, "main", "big.bin"));
  g_assert_cmpuint (count_suffix (b, ".incomplete"), ==, 1); /* kept for a resume */
  diffuse_hub_client_free (c);

  /* a GCancellable from another thread */
  GCancellable *cancel = g_cancellable_new ();
  ClientOpts o2 = { .cancellable = cancel };
  c = client_with (cache, &o2);
  reset_server ();
  hub_server_add_fault (server, "GET", "big.bin", HUB_FAULT_SLOW, 20, 0, 1);
  GThread *t = g_thread_new ("cancel", cancel_later, cancel);
  gint64 t0 = g_get_monotonic_time ();
  p = diffuse_hub_download_file (c, BIG_REPO, "main", "big.bin", &err);
  g_assert_null (p);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED);
  g_clear_error (&err);
  g_assert_cmpint (g_get_monotonic_time () - t0, <, 5 * G_USEC_PER_SEC);
  g_thread_join (t);
  g_assert_null (diffuse_hub_try_load_from_cache (cache, BIG_REPO, "main", "big.bin"));
  diffuse_hub_client_free (c);
  g_object_unref (cancel);

  /* what was fetched is resumed */
  struct stat st;
  g_assert_cmpint (stat (inc, &st), ==, 0);
  g_assert_cmpint (st.st_size, >, 0);
  char *range = g_strdup_printf ("range=bytes=%" G_GINT64_FORMAT "-", (gint64) st.st_size);
  c = client (cache);
  reset_server ();
  p = diffuse_hub_download_file (c, BIG_REPO, "main", "big.bin", &err);
  g_assert_no_error (err);
  assert_file_bytes (p, big_data);
  g_free (p);
  g_assert_cmpuint (count_log ("GET cdn", range), ==, 1);
  g_free (range);
  diffuse_hub_client_free (c);

  g_free (inc);
  g_free (b);
  g_free (etag);
  rm_rf (cache);
  g_free (cache);
}

static void
test_disk_full (void)
{
  if (!g_file_test ("/dev/full", G_FILE_TEST_EXISTS)) {
    g_test_skip ("no /dev/full");
    return;
  }
  char *cache = mkdtemp_dir ();
  DiffuseHubClient *c = client (cache);
  GError *err = NULL;
  char *etag = hub_server_etag (server, BIG_REPO, "main", "mid.txt");
  char *b = blobs_dir (cache, BIG_REPO);
  g_assert_cmpint (g_mkdir_with_parents (b, 0777), ==, 0);
  char *inc = g_strdup_printf ("%s/%s.incomplete", b, etag);
  /* the temporary file leads to /dev/full: every write fails with ENOSPC */
  g_assert_cmpint (symlink ("/dev/full", inc), ==, 0);
  reset_server ();
  char *p = diffuse_hub_download_file (c, BIG_REPO, "main", "mid.txt", &err);
  g_assert_null (p);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_DISK_FULL);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  g_assert_null (diffuse_hub_try_load_from_cache (cache, BIG_REPO, "main", "mid.txt"));
  char *blob = g_build_filename (b, etag, NULL);
  g_assert_false (g_file_test (blob, G_FILE_TEST_EXISTS));
  g_assert_false (g_file_test (inc, G_FILE_TEST_EXISTS));
  g_free (blob);
  g_free (inc);
  g_free (b);
  g_free (etag);
  diffuse_hub_client_free (c);
  rm_rf (cache);
  g_free (cache);
}

/* test-hub --fetch ENDPOINT CACHE REPO REVISION [PATH...]: snapshot of all
 * files (or of the paths) into CACHE; prints the snapshot folder.  Used by
 * the two-processes test and by tests/reference/make_hf_cache.py. */
static int
fetch_main (int argc, char **argv)
{
  DiffuseHubParams p = diffuse_hub_default_params ();
  p.endpoint = argv[2];
  p.token = "";
  p.cache_dir = argv[3];
  p.retry_base_ms = 20;
  GError *err = NULL;
  DiffuseHubClient *c = diffuse_hub_client_new (&p, &err);
  char *folder = NULL;
  if (c && argc > 6)
    folder = diffuse_hub_snapshot_paths (c, argv[4], argv[5], (const char *const *) argv + 6, &err);
  else if (c)
    folder = diffuse_hub_snapshot (c, argv[4], argv[5], NULL, NULL, &err);
  if (!folder) {
    g_printerr ("fetch: %s\n", err->message);
    g_error_free (err);
    diffuse_hub_client_free (c);
    return 1;
  }
  g_print ("%s\n", folder);
  g_free (folder);
  diffuse_hub_client_free (c);
  return 0;
}

static const char *self_exe;

static void
test_two_processes (void)
{
  char *cache = mkdtemp_dir ();
  reset_server ();
  /* slow enough that the two overlap */
  hub_server_add_fault (server, "GET", "big.bin", HUB_FAULT_SLOW, 3, 0, -1);
  const char *argv[] = { self_exe, "--fetch", hub_server_endpoint (server), cache, BIG_REPO, "main", NULL };
  GPid pids[2];
  int outs[2];
  for (int i = 0; i < 2; i++) {
    GError *err = NULL;
    g_assert_true (g_spawn_async_with_pipes (NULL, (char **) argv, NULL, G_SPAWN_DO_NOT_REAP_CHILD, NULL, NULL,
                                             &pids[i], NULL, &outs[i], NULL, &err));
    g_assert_no_error (err);
  }
  char *folders[2];
  for (int i = 0; i < 2; i++) {
    GIOChannel *ch = g_io_channel_unix_new (outs[i]);
    gsize len;
    g_io_channel_read_to_end (ch, &folders[i], &len, NULL);
    g_io_channel_unref (ch);
    close (outs[i]);
    int status;
    g_assert_cmpint (waitpid (pids[i], &status, 0), ==, pids[i]);
    g_assert_true (WIFEXITED (status));
    g_assert_cmpint (WEXITSTATUS (status), ==, 0);
    g_spawn_close_pid (pids[i]);
  }
  g_assert_cmpstr (folders[0], ==, folders[1]);
  dump_log ();
  /* each blob fetched once: the second process waited on the lock */
  g_assert_cmpuint (count_log ("GET cdn", "big.bin"), ==, 1);
  g_assert_cmpuint (count_log ("GET hub", "mid.txt"), ==, 1);
  char *b = blobs_dir (cache, BIG_REPO);
  g_assert_cmpuint (count_suffix (b, ".incomplete"), ==, 0);
  g_assert_cmpuint (count_entries (b), ==, 3);
  g_free (b);
  char *p = diffuse_hub_try_load_from_cache (cache, BIG_REPO, "main", "big.bin");
  assert_file_bytes (p, big_data);
  g_free (p);
  g_free (folders[0]);
  g_free (folders[1]);
  reset_server ();
  rm_rf (cache);
  g_free (cache);
}

int
main (int argc, char **argv)
{
  g_setenv ("no_proxy", "127.0.0.1,localhost", TRUE);
  g_unsetenv ("http_proxy");
  g_unsetenv ("HTTP_PROXY");
  const char *unset[] = { "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE",
                          "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE",
                          "HF_HUB_DISABLE_IMPLICIT_TOKEN", NULL };
  for (int i = 0; unset[i]; i++)
    g_unsetenv (unset[i]);
  if (argc >= 6 && !strcmp (argv[1], "--fetch"))
    return fetch_main (argc, argv);
  self_exe = argv[0];

  g_test_init (&argc, &argv, NULL);
  const char *fx = g_getenv ("DIFFUSE_FIXTURES");
  if (!fx) {
    g_printerr ("DIFFUSE_FIXTURES is not set (meson test sets it)\n");
    return 77;
  }
  fixtures = g_strdup (fx);

  GError *err = NULL;
  server = hub_server_new (&err);
  g_assert_no_error (err);
  char *manifest = g_build_filename (fixtures, "hub", "repos.json", NULL);
  if (!hub_server_load_manifest (server, manifest, &err))
    g_error ("%s", err->message);
  g_free (manifest);
  big_data = make_bytes (BIG_SIZE, 42);
  mid_data = make_bytes (MID_SIZE, 43);
  hub_server_add_file (server, BIG_REPO, "main", "big.bin", big_data);
  /* a regular (non-LFS) file: below the LFS size, not an LFS extension */
  hub_server_add_file (server, BIG_REPO, "main", "mid.txt", mid_data);
  GBytes *small = g_bytes_new_static ("hello\n", 6);
  hub_server_add_file (server, BIG_REPO, "main", "small.txt", small);
  g_bytes_unref (small);

  g_test_add_func ("/hub/repo-id", test_repo_id);
  g_test_add_func ("/hub/fnmatch", test_fnmatch);
  g_test_add_func ("/hub/cache-dir-env", test_cache_dir_env);
  g_test_add_func ("/hub/client-env", test_client_env);
  g_test_add_func ("/hub/download-file", test_download_file);
  g_test_add_func ("/hub/list-files", test_list_files);
  g_test_add_func ("/hub/revisions", test_revisions);
  g_test_add_func ("/hub/snapshot", test_snapshot);
  g_test_add_func ("/hub/two-phase", test_two_phase);
  g_test_add_func ("/hub/offline", test_offline);
  g_test_add_func ("/hub/hf-cache", test_hf_cache);
  g_test_add_func ("/hub/errors", test_errors);
  g_test_add_func ("/hub/fault/retry-5xx", test_retry_500);
  g_test_add_func ("/hub/fault/retry-429", test_retry_429);
  g_test_add_func ("/hub/fault/drop-resume", test_drop_resume);
  g_test_add_func ("/hub/fault/stall-slow", test_stall_slow);
  g_test_add_func ("/hub/fault/size-checksum", test_bad_size_checksum);
  g_test_add_func ("/hub/fault/resume-partial", test_resume_partial);
  g_test_add_func ("/hub/fault/cancel", test_cancel);
  g_test_add_func ("/hub/fault/disk-full", test_disk_full);
  g_test_add_func ("/hub/two-processes", test_two_processes);
  int r = g_test_run ();
  hub_server_free (server);
  g_bytes_unref (big_data);
  g_bytes_unref (mid_data);
  g_free (fixtures);
  return r;
}

/* gst-diffuse — the huggingface_hub cache layout: paths, refs, snapshots,
 * .no_exist markers, the tree listing cache, blob symlinks and locks.
 * Nothing here touches the network (works without libsoup). */
#include "hub-private.h"

#include <errno.h>
#include <stdio.h>
#include <glib/gstdio.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <json-glib/json-glib.h>

gboolean
hub_is_commit_hash (const char *s)
{
  if (!s || strlen (s) != 40)
    return FALSE;
  for (int i = 0; i < 40; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
      return FALSE;
  return TRUE;
}

gboolean
hub_env_true (const char *name)
{
  const char *v = g_getenv (name);
  if (!v)
    return FALSE;
  return !g_ascii_strcasecmp (v, "1") || !g_ascii_strcasecmp (v, "on") ||
         !g_ascii_strcasecmp (v, "yes") || !g_ascii_strcasecmp (v, "true");
}

/* ~ and $VAR / ${VAR} expansion, as os.path.expanduser + expandvars (an
 * unknown variable is left as written). */
char *
hub_expand_path (const char *path)
{
  GString *out = g_string_new (NULL);
  const char *p = path;
  if (p[0] == '~' && (p[1] == '/' || p[1] == '\0')) {
    g_string_append (out, g_get_home_dir ());
    p++;
  }
  while (*p) {
    if (*p == '$' && (g_ascii_isalpha (p[1]) || p[1] == '_' || p[1] == '{')) {
      gboolean braced = p[1] == '{';
      const char *s = p + (braced ? 2 : 1), *e = s;
      while (g_ascii_isalnum (*e) || *e == '_')
        e++;
      if (e > s && (!braced || *e == '}')) {
        char *name = g_strndup (s, e - s);
        const char *val = g_getenv (name);
        g_free (name);
        if (val) {
          g_string_append (out, val);
          p = e + (braced ? 1 : 0);
          continue;
        }
      }
    }
    g_string_append_c (out, *p++);
  }
  return g_string_free (out, FALSE);
}

char *
diffuse_hub_cache_dir (void)
{
  const char *v;
  if ((v = g_getenv ("HF_HUB_CACHE")) && *v)
    return hub_expand_path (v);
  if ((v = g_getenv ("HUGGINGFACE_HUB_CACHE")) && *v)
    return hub_expand_path (v);
  if ((v = g_getenv ("HF_HOME")) && *v) {
    char *home = hub_expand_path (v);
    char *r = g_build_filename (home, "hub", NULL);
    g_free (home);
    return r;
  }
  if ((v = g_getenv ("XDG_CACHE_HOME")) && *v) {
    char *x = hub_expand_path (v);
    char *r = g_build_filename (x, "huggingface", "hub", NULL);
    g_free (x);
    return r;
  }
  return g_build_filename (g_get_home_dir (), ".cache", "huggingface", "hub", NULL);
}

char *
diffuse_hub_repo_folder_name (const char *repo_id)
{
  g_return_val_if_fail (repo_id != NULL, NULL);
  char **parts = g_strsplit (repo_id, "/", -1);
  char *joined = g_strjoinv ("--", parts);
  char *r = g_strconcat ("models--", joined, NULL);
  g_strfreev (parts);
  g_free (joined);
  return r;
}

char *
hub_storage_folder (const char *cache_dir, const char *repo_id)
{
  char *name = diffuse_hub_repo_folder_name (repo_id);
  char *r = g_build_filename (cache_dir, name, NULL);
  g_free (name);
  return r;
}

static gboolean
is_name_char (char c)
{
  return g_ascii_isalnum (c) || c == '_' || c == '-' || c == '.';
}

/* One part of huggingface_hub's REPO_ID_REGEX: [\w\-.]{1,96} starting and
 * ending at a word boundary (a word character first and last). */
static gboolean
valid_name_part (const char *s, gsize n)
{
  if (n < 1 || n > 96)
    return FALSE;
  for (gsize i = 0; i < n; i++)
    if (!is_name_char (s[i]))
      return FALSE;
  gboolean first = g_ascii_isalnum (s[0]) || s[0] == '_';
  gboolean last = g_ascii_isalnum (s[n - 1]) || s[n - 1] == '_';
  return first && last;
}

gboolean
diffuse_is_repo_id (const char *ref)
{
  if (!ref || !*ref)
    return FALSE;
  if (g_file_test (ref, G_FILE_TEST_EXISTS))
    return FALSE;
  const char *slash = strchr (ref, '/');
  if (slash && strchr (slash + 1, '/'))
    return FALSE;
  if (slash) {
    if (!valid_name_part (ref, slash - ref) || !valid_name_part (slash + 1, strlen (slash + 1)))
      return FALSE;
  } else if (!valid_name_part (ref, strlen (ref)))
    return FALSE;
  if (strstr (ref, "--") || strstr (ref, ".."))
    return FALSE;
  if (g_str_has_suffix (ref, ".git"))
    return FALSE;
  return TRUE;
}

gboolean
hub_check_relative_path (const char *path, GError **error)
{
  gboolean ok = path && *path && path[0] != '/' && !strchr (path, '\\');
  if (ok) {
    char **parts = g_strsplit (path, "/", -1);
    for (char **p = parts; *p; p++)
      if (!**p || !strcmp (*p, ".") || !strcmp (*p, ".."))
        ok = FALSE;
    g_strfreev (parts);
  }
  if (!ok)
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "invalid file path in repo: '%s' (must be relative, without '..' or empty parts)",
                 path ? path : "(null)");
  return ok;
}

static gboolean
valid_revision (const char *revision)
{
  /* refs/<revision> must stay inside refs/ */
  return revision && hub_check_relative_path (revision, NULL);
}

char *
hub_read_ref (const char *storage, const char *revision)
{
  if (!valid_revision (revision))
    return NULL;
  char *p = g_build_filename (storage, "refs", revision, NULL);
  char *contents = NULL;
  if (g_file_test (p, G_FILE_TEST_IS_REGULAR))
    g_file_get_contents (p, &contents, NULL, NULL);
  g_free (p);
  if (contents) {
    g_strstrip (contents);
    if (!hub_is_commit_hash (contents))
      g_clear_pointer (&contents, g_free);
  }
  return contents;
}

void
hub_write_ref (const char *storage, const char *revision, const char *commit)
{
  if (!valid_revision (revision) || !g_strcmp0 (revision, commit))
    return;
  char *p = g_build_filename (storage, "refs", revision, NULL);
  char *old = NULL;
  if (g_file_get_contents (p, &old, NULL, NULL) && !g_strcmp0 (old, commit)) {
    g_free (old);
    g_free (p);
    return;
  }
  g_free (old);
  char *dir = g_path_get_dirname (p);
  g_mkdir_with_parents (dir, 0777);
  char *tmp = g_strdup_printf ("%s.%08x.tmp", p, g_random_int ());
  if (g_file_set_contents (tmp, commit, -1, NULL)) {
    if (rename (tmp, p) != 0)
      g_unlink (tmp);
  }
  g_free (tmp);
  g_free (dir);
  g_free (p);
}

char *
hub_pointer_path (const char *storage, const char *commit, const char *path)
{
  return g_build_filename (storage, "snapshots", commit, path, NULL);
}

gboolean
hub_no_exist_marked (const char *storage, const char *commit, const char *path)
{
  char *p = g_build_filename (storage, ".no_exist", commit, path, NULL);
  gboolean r = g_file_test (p, G_FILE_TEST_IS_REGULAR);
  g_free (p);
  return r;
}

void
hub_mark_no_exist (const char *storage, const char *commit, const char *path)
{
  char *p = g_build_filename (storage, ".no_exist", commit, path, NULL);
  char *dir = g_path_get_dirname (p);
  if (g_mkdir_with_parents (dir, 0777) == 0 && !g_file_test (p, G_FILE_TEST_EXISTS))
    g_file_set_contents (p, "", 0, NULL);
  g_free (dir);
  g_free (p);
}

void
hub_tree_entry_free (HubTreeEntry *e)
{
  if (!e)
    return;
  g_free (e->path);
  g_free (e->blob_id);
  g_free (e->lfs_sha256);
  g_free (e->xet_hash);
  g_free (e);
}

static int
cmp_str_ptr (gconstpointer a, gconstpointer b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

static char *
tree_cache_path (const char *storage, const char *commit)
{
  char *name = g_strconcat (commit, ".json", NULL);
  char *p = g_build_filename (storage, "trees", name, NULL);
  g_free (name);
  return p;
}

/* Reads trees/<commit>.json; returns the sorted paths (or NULL when absent
 * or not of format_version 1).  sizes_out: path -> guint64* (file size). */
GPtrArray *
hub_read_tree_cache (const char *storage, const char *commit, GHashTable **sizes_out)
{
  if (sizes_out)
    *sizes_out = NULL;
  if (!hub_is_commit_hash (commit))
    return NULL;
  char *p = tree_cache_path (storage, commit);
  JsonParser *parser = json_parser_new ();
  GPtrArray *paths = NULL;
  if (g_file_test (p, G_FILE_TEST_IS_REGULAR) && json_parser_load_from_file (parser, p, NULL)) {
    JsonNode *root = json_parser_get_root (parser);
    JsonObject *o = JSON_NODE_HOLDS_OBJECT (root) ? json_node_get_object (root) : NULL;
    JsonObject *files = NULL;
    if (o && json_object_has_member (o, "format_version") &&
        json_object_get_int_member (o, "format_version") == 1 &&
        json_object_has_member (o, "files") &&
        JSON_NODE_HOLDS_OBJECT (json_object_get_member (o, "files")))
      files = json_object_get_object_member (o, "files");
    if (files) {
      GHashTable *sizes = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
      paths = g_ptr_array_new_with_free_func (g_free);
      GList *members = json_object_get_members (files);
      for (GList *l = members; l; l = l->next) {
        const char *name = l->data;
        if (!hub_check_relative_path (name, NULL))
          continue;
        g_ptr_array_add (paths, g_strdup (name));
        JsonNode *en = json_object_get_member (files, name);
        if (JSON_NODE_HOLDS_OBJECT (en)) {
          JsonObject *eo = json_node_get_object (en);
          gint64 size = json_object_has_member (eo, "lfs_size") &&
                        !json_object_get_null_member (eo, "lfs_size")
                          ? json_object_get_int_member (eo, "lfs_size")
                          : json_object_has_member (eo, "size") ? json_object_get_int_member (eo, "size") : 0;
          guint64 *v = g_new (guint64, 1);
          *v = size > 0 ? (guint64) size : 0;
          g_hash_table_replace (sizes, g_strdup (name), v);
        }
      }
      g_list_free (members);
      g_ptr_array_sort (paths, cmp_str_ptr);
      if (sizes_out)
        *sizes_out = sizes;
      else
        g_hash_table_unref (sizes);
    }
  }
  g_object_unref (parser);
  g_free (p);
  return paths;
}

static int
cmp_entry (gconstpointer a, gconstpointer b)
{
  const HubTreeEntry *ea = *(HubTreeEntry *const *) a, *eb = *(HubTreeEntry *const *) b;
  return strcmp (ea->path, eb->path);
}

void
hub_write_tree_cache (const char *storage, const char *commit, GPtrArray *entries)
{
  if (!hub_is_commit_hash (commit))
    return;
  g_ptr_array_sort (entries, cmp_entry);
  JsonBuilder *b = json_builder_new ();
  json_builder_begin_object (b);
  json_builder_set_member_name (b, "format_version");
  json_builder_add_int_value (b, 1);
  json_builder_set_member_name (b, "files");
  json_builder_begin_object (b);
  for (guint i = 0; i < entries->len; i++) {
    HubTreeEntry *e = entries->pdata[i];
    json_builder_set_member_name (b, e->path);
    json_builder_begin_object (b);
    json_builder_set_member_name (b, "size");
    json_builder_add_int_value (b, (gint64) e->size);
    json_builder_set_member_name (b, "blob_id");
    json_builder_add_string_value (b, e->blob_id ? e->blob_id : "");
    if (e->lfs_sha256) {
      json_builder_set_member_name (b, "lfs_sha256");
      json_builder_add_string_value (b, e->lfs_sha256);
      json_builder_set_member_name (b, "lfs_size");
      json_builder_add_int_value (b, (gint64) e->lfs_size);
    }
    if (e->xet_hash) {
      json_builder_set_member_name (b, "xet_hash");
      json_builder_add_string_value (b, e->xet_hash);
    }
    json_builder_end_object (b);
  }
  json_builder_end_object (b);
  json_builder_end_object (b);
  JsonGenerator *gen = json_generator_new ();
  json_generator_set_pretty (gen, TRUE);
  json_generator_set_indent (gen, 1);
  JsonNode *root = json_builder_get_root (b);
  json_generator_set_root (gen, root);
  char *text = json_generator_to_data (gen, NULL);
  char *p = tree_cache_path (storage, commit);
  char *dir = g_path_get_dirname (p);
  char *tmp = g_strdup_printf ("%s.%08x.tmp", p, g_random_int ());
  if (g_mkdir_with_parents (dir, 0777) == 0 && g_file_set_contents (tmp, text, -1, NULL)) {
    if (rename (tmp, p) != 0)
      g_unlink (tmp);
  }
  g_free (tmp);
  g_free (dir);
  g_free (p);
  g_free (text);
  json_node_unref (root);
  g_object_unref (gen);
  g_object_unref (b);
}

static void
walk (const char *base, const char *rel, GPtrArray *out, int depth)
{
  if (depth > 64)
    return;
  char *dir = rel ? g_build_filename (base, rel, NULL) : g_strdup (base);
  GDir *d = g_dir_open (dir, 0, NULL);
  if (d) {
    const char *name;
    while ((name = g_dir_read_name (d))) {
      char *r = rel ? g_strconcat (rel, "/", name, NULL) : g_strdup (name);
      char *full = g_build_filename (base, r, NULL);
      if (g_file_test (full, G_FILE_TEST_IS_DIR) && !g_file_test (full, G_FILE_TEST_IS_SYMLINK))
        walk (base, r, out, depth + 1);
      else if (g_file_test (full, G_FILE_TEST_IS_REGULAR)) /* follows the symlink: dangling ones are skipped */
        g_ptr_array_add (out, g_steal_pointer (&r));
      g_free (r);
      g_free (full);
    }
    g_dir_close (d);
  }
  g_free (dir);
}

GPtrArray *
hub_walk_snapshot (const char *storage, const char *commit)
{
  char *base = g_build_filename (storage, "snapshots", commit, NULL);
  GPtrArray *out = g_ptr_array_new_with_free_func (g_free);
  walk (base, NULL, out, 0);
  g_ptr_array_sort (out, cmp_str_ptr);
  g_free (base);
  return out;
}

void
hub_create_cachedir_tag (const char *cache_dir)
{
  char *p = g_build_filename (cache_dir, "CACHEDIR.TAG", NULL);
  if (!g_file_test (p, G_FILE_TEST_EXISTS))
    g_file_set_contents (p,
                         "Signature: 8a477f597d28d172789f06886806bc55\n"
                         "# This file is a cache directory tag created by huggingface_hub.\n"
                         "# For information about cache directory tags, see:\n"
                         "#\thttps://bford.info/cachedir/\n",
                         -1, NULL);
  g_free (p);
}

gboolean
hub_link_blob (const char *storage, const char *commit, const char *path,
               const char *etag, GError **error)
{
  char *dst = hub_pointer_path (storage, commit, path);
  char *dir = g_path_get_dirname (dst);
  GString *target = g_string_new ("../../");
  for (const char *c = path; *c; c++)
    if (*c == '/')
      g_string_append (target, "../");
  g_string_append_printf (target, "blobs/%s", etag);
  char *tmp = g_strdup_printf ("%s.%08x.tmp", dst, g_random_int ());
  gboolean ok = TRUE;
  int saved = 0;
  if (g_mkdir_with_parents (dir, 0777) != 0 || symlink (target->str, tmp) != 0) {
    saved = errno;
    ok = FALSE;
  } else if (rename (tmp, dst) != 0) {
    saved = errno;
    g_unlink (tmp);
    ok = FALSE;
  }
  if (!ok)
    g_set_error (error, DIFFUSE_ERROR, saved == ENOSPC ? DIFFUSE_ERROR_DISK_FULL : DIFFUSE_ERROR_IO,
                 "cannot link %s -> %s: %s", dst, target->str, g_strerror (saved));
  g_free (tmp);
  g_string_free (target, TRUE);
  g_free (dir);
  g_free (dst);
  return ok;
}

gboolean
hub_sleep_cancellable (guint ms, GCancellable *cancellable, GError **error)
{
  if (g_cancellable_set_error_if_cancelled (cancellable, NULL)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "cancelled");
    return FALSE;
  }
  if (!cancellable) {
    g_usleep ((gulong) ms * 1000);
    return TRUE;
  }
  GPollFD pfd;
  if (!g_cancellable_make_pollfd (cancellable, &pfd)) {
    g_usleep ((gulong) ms * 1000);
  } else {
    gint64 end = g_get_monotonic_time () + (gint64) ms * 1000;
    gint64 now;
    while ((now = g_get_monotonic_time ()) < end && !g_cancellable_is_cancelled (cancellable)) {
      struct pollfd p = { .fd = pfd.fd, .events = POLLIN };
      poll (&p, 1, (int) ((end - now + 999) / 1000));
    }
    g_cancellable_release_fd (cancellable);
  }
  if (g_cancellable_is_cancelled (cancellable)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED, "cancelled");
    return FALSE;
  }
  return TRUE;
}

int
hub_lock (const char *lock_path, GCancellable *cancellable, GError **error)
{
  char *dir = g_path_get_dirname (lock_path);
  g_mkdir_with_parents (dir, 0777);
  g_free (dir);
  int fd = open (lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0664);
  if (fd < 0) {
    int e = errno;
    g_set_error (error, DIFFUSE_ERROR, e == ENOSPC ? DIFFUSE_ERROR_DISK_FULL : DIFFUSE_ERROR_IO,
                 "cannot open lock file %s: %s", lock_path, g_strerror (e));
    return -1;
  }
  for (;;) {
    if (flock (fd, LOCK_EX | LOCK_NB) == 0)
      return fd;
    if (errno != EWOULDBLOCK && errno != EINTR) {
      int e = errno;
      if (e == ENOLCK || e == EOPNOTSUPP) /* no flock on this file system: proceed unlocked */
        return fd;
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "cannot lock %s: %s", lock_path, g_strerror (e));
      close (fd);
      return -1;
    }
    if (!hub_sleep_cancellable (50, cancellable, error)) {
      close (fd);
      return -1;
    }
  }
}

void
hub_unlock (int fd)
{
  if (fd >= 0) {
    flock (fd, LOCK_UN);
    close (fd);
  }
}

char *
diffuse_hub_try_load_from_cache (const char *cache_dir, const char *repo_id,
                                 const char *revision, const char *path)
{
  g_return_val_if_fail (repo_id != NULL && path != NULL, NULL);
  if (!hub_check_relative_path (path, NULL))
    return NULL;
  char *cache = cache_dir ? g_strdup (cache_dir) : diffuse_hub_cache_dir ();
  char *storage = hub_storage_folder (cache, repo_id);
  const char *rev = revision ? revision : "main";
  char *commit = hub_is_commit_hash (rev) ? g_strdup (rev) : hub_read_ref (storage, rev);
  char *r = NULL;
  if (commit) {
    r = hub_pointer_path (storage, commit, path);
    if (!g_file_test (r, G_FILE_TEST_IS_REGULAR))
      g_clear_pointer (&r, g_free);
  }
  g_free (commit);
  g_free (storage);
  g_free (cache);
  return r;
}

/* ---- fnmatch (Python's fnmatchcase) ---- */

/* Matches one set "[...]" at *pp against the character c; advances *pp past
 * the set.  Returns -1 when the '[' has no closing ']' (then it is literal). */
static int
match_set (const char **pp, gunichar c)
{
  const char *p = *pp + 1; /* after '[' */
  gboolean negate = FALSE;
  if (*p == '!') {
    negate = TRUE;
    p++;
  }
  const char *start = p;
  /* find the closing ']' (a ']' right after '[' or '[!' is literal) */
  const char *q = p;
  if (*q == ']')
    q++;
  while (*q && *q != ']')
    q++;
  if (*q != ']')
    return -1;
  gboolean hit = FALSE;
  p = start;
  while (p < q) {
    gunichar lo = g_utf8_get_char (p);
    p = g_utf8_next_char (p);
    if (*p == '-' && p + 1 < q) {
      gunichar hi = g_utf8_get_char (p + 1);
      p = g_utf8_next_char (p + 1);
      if (lo <= c && c <= hi)
        hit = TRUE;
    } else if (lo == c)
      hit = TRUE;
  }
  *pp = q + 1;
  return hit != negate;
}

gboolean
diffuse_hub_fnmatch (const char *pattern, const char *string)
{
  g_return_val_if_fail (pattern != NULL && string != NULL, FALSE);
  const char *p = pattern, *s = string;
  const char *star_p = NULL, *star_s = NULL;
  while (*s) {
    if (*p == '*') {
      while (*p == '*')
        p++;
      star_p = p;
      star_s = s;
      continue;
    }
    gunichar c = g_utf8_get_char (s);
    gboolean ok = FALSE;
    const char *np = p;
    if (*p == '?') {
      ok = TRUE;
      np = p + 1;
    } else if (*p == '[') {
      const char *t = p;
      int m = match_set (&t, c);
      if (m < 0) {
        ok = c == '[';
        np = p + 1;
      } else {
        ok = m;
        np = t;
      }
    } else if (*p) {
      ok = g_utf8_get_char (p) == c;
      np = g_utf8_next_char (p);
    }
    if (ok) {
      p = np;
      s = g_utf8_next_char (s);
    } else if (star_p) {
      star_s = g_utf8_next_char (star_s);
      s = star_s;
      p = star_p;
    } else
      return FALSE;
  }
  while (*p == '*')
    p++;
  return *p == '\0';
}

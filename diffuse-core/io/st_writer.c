/* gst-diffuse — safetensors writer (one file or diffusers-style shards).
 *
 * The bytes are those the reference writer produces (safetensors'
 * tensor.rs `prepare`/`serialize_to_file`, as used by
 * safetensors.torch.save_file): tensors ordered by decreasing dtype
 * alignment rank (the Rust Dtype enum order: F32 before BF16 before F16)
 * then by name; the header lists "__metadata__" first and then the tensors
 * in that same order, serialized compactly as serde_json does, padded with
 * spaces to a multiple of 8 bytes; the data follow in the same order.
 *
 * Sharding replicates huggingface_hub's split_state_dict_into_shards_factory
 * (what diffusers' save_pretrained(max_shard_size=...) uses) and diffusers'
 * file naming: <prefix>[.<variant>]-0000i-of-0000N.safetensors and
 * <prefix>.safetensors.index[.<variant>].json written as
 * json.dumps(index, indent=2, sort_keys=True) + "\n". */
#include "io/io-private.h"

#include <diffuse/safetensors.h>
#include <diffuse/error.h>

#include <errno.h>
#include <fcntl.h>
#include <glib/gstdio.h>
#include <string.h>
#include <unistd.h>

/* ---- atomic files ------------------------------------------------------- */

struct _DiffuseAtomicFile {
  char *path;
  char *tmp;
  int fd;
};

static gboolean
io_error (GError **error, int err, const char *path, const char *what)
{
  int code = (err == ENOSPC || err == EDQUOT) ? DIFFUSE_ERROR_DISK_FULL : DIFFUSE_ERROR_IO;
  g_set_error (error, DIFFUSE_ERROR, code, "%s: %s: %s", path, what, g_strerror (err));
  return FALSE;
}

DiffuseAtomicFile *
_diffuse_atomic_file_open (const char *path, guint64 expected_size, GError **error)
{
  char *dir = g_path_get_dirname (path);
  char *base = g_path_get_basename (path);
  DiffuseAtomicFile *f = g_new0 (DiffuseAtomicFile, 1);
  f->path = g_strdup (path);
  f->tmp = g_strdup_printf ("%s/.%s.tmp-XXXXXX", dir, base);
  g_free (dir);
  g_free (base);
  f->fd = g_mkstemp_full (f->tmp, O_WRONLY | O_CLOEXEC, 0666);
  if (f->fd < 0) {
    io_error (error, errno, path, "cannot create a temporary file");
    g_free (f->path);
    g_free (f->tmp);
    g_free (f);
    return NULL;
  }
  if (expected_size > 0) {
    /* Reserve the space up front: a full disk fails here, before any write. */
    if (fallocate (f->fd, 0, 0, (off_t) expected_size) != 0) {
      int e = errno;
      if (e == ENOSPC || e == EDQUOT || e == EFBIG) {
        io_error (error, e, path, "cannot reserve space");
        _diffuse_atomic_file_abort (f);
        return NULL;
      }
      /* EOPNOTSUPP and friends: the writes will tell */
    }
  }
  return f;
}

gboolean
_diffuse_atomic_file_write (DiffuseAtomicFile *f, const void *data, size_t len, GError **error)
{
  const guint8 *p = data;
  while (len > 0) {
    ssize_t w = write (f->fd, p, MIN (len, (size_t) 1 << 30));
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return io_error (error, errno, f->path, "write failed");
    }
    if (w == 0)
      return io_error (error, EIO, f->path, "write failed");
    p += w;
    len -= (size_t) w;
  }
  return TRUE;
}

void
_diffuse_atomic_file_abort (DiffuseAtomicFile *f)
{
  if (!f)
    return;
  if (f->fd >= 0)
    close (f->fd);
  g_unlink (f->tmp);
  g_free (f->path);
  g_free (f->tmp);
  g_free (f);
}

gboolean
_diffuse_atomic_file_commit (DiffuseAtomicFile *f, GError **error)
{
  gboolean ok = TRUE;
  if (fsync (f->fd) != 0 && errno != EINVAL && errno != EROFS)
    ok = io_error (error, errno, f->path, "fsync failed");
  int fd = f->fd;
  f->fd = -1;
  if (close (fd) != 0 && ok)
    ok = io_error (error, errno, f->path, "close failed");
  if (ok && g_rename (f->tmp, f->path) != 0)
    ok = io_error (error, errno, f->path, "cannot rename the temporary file into place");
  if (!ok) {
    _diffuse_atomic_file_abort (f);
    return FALSE;
  }
  g_free (f->path);
  g_free (f->tmp);
  g_free (f);
  return TRUE;
}

gboolean
_diffuse_write_file_atomic (const char *path, const void *data, size_t len, GError **error)
{
  DiffuseAtomicFile *f = _diffuse_atomic_file_open (path, len, error);
  if (!f)
    return FALSE;
  if (!_diffuse_atomic_file_write (f, data, len, error)) {
    _diffuse_atomic_file_abort (f);
    return FALSE;
  }
  return _diffuse_atomic_file_commit (f, error);
}

/* ---- writer ------------------------------------------------------------- */

typedef struct {
  char *name;
  DiffuseTensor *t;
} WEntry;

struct _DiffuseStWriter {
  GArray *entries;        /* WEntry, insertion order */
  GHashTable *by_name;    /* name -> index + 1 */
  GHashTable *metadata;   /* extra keys (never "format") */
};

DiffuseStWriter *
diffuse_st_writer_new (void)
{
  DiffuseStWriter *w = g_new0 (DiffuseStWriter, 1);
  w->entries = g_array_new (FALSE, TRUE, sizeof (WEntry));
  w->by_name = g_hash_table_new (g_str_hash, g_str_equal);
  w->metadata = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  return w;
}

void
diffuse_st_writer_free (DiffuseStWriter *w)
{
  if (!w)
    return;
  for (guint i = 0; i < w->entries->len; i++) {
    WEntry *e = &g_array_index (w->entries, WEntry, i);
    g_free (e->name);
    diffuse_tensor_unref (e->t);
  }
  g_array_free (w->entries, TRUE);
  g_hash_table_unref (w->by_name);
  g_hash_table_unref (w->metadata);
  g_free (w);
}

/* Adding a name twice replaces the tensor, keeping the first position (as a
 * Python dict assignment does). */
void
diffuse_st_writer_add (DiffuseStWriter *w, const char *name, DiffuseTensor *t)
{
  g_return_if_fail (w != NULL);
  g_return_if_fail (name != NULL && g_utf8_validate (name, -1, NULL));
  g_return_if_fail (strcmp (name, "__metadata__") != 0);
  g_return_if_fail (t != NULL);
  guint idx = GPOINTER_TO_UINT (g_hash_table_lookup (w->by_name, name));
  if (idx) {
    WEntry *e = &g_array_index (w->entries, WEntry, idx - 1);
    diffuse_tensor_ref (t);
    diffuse_tensor_unref (e->t);
    e->t = t;
    return;
  }
  WEntry e = { g_strdup (name), diffuse_tensor_ref (t) };
  g_array_append_val (w->entries, e);
  WEntry *stored = &g_array_index (w->entries, WEntry, w->entries->len - 1);
  g_hash_table_insert (w->by_name, stored->name, GUINT_TO_POINTER (w->entries->len));
}

/* "format" is always "pt" and cannot be set. */
void
diffuse_st_writer_add_metadata (DiffuseStWriter *w, const char *key, const char *value)
{
  g_return_if_fail (w != NULL);
  g_return_if_fail (key != NULL && g_utf8_validate (key, -1, NULL));
  g_return_if_fail (value != NULL && g_utf8_validate (value, -1, NULL));
  g_return_if_fail (strcmp (key, "format") != 0);
  g_hash_table_insert (w->metadata, g_strdup (key), g_strdup (value));
}

/* serde_json's string escaping */
static void
append_json_string (GString *s, const char *str)
{
  static const char hex[] = "0123456789abcdef";
  g_string_append_c (s, '"');
  for (const guchar *p = (const guchar *) str; *p; p++) {
    guchar c = *p;
    switch (c) {
    case '"': g_string_append (s, "\\\""); break;
    case '\\': g_string_append (s, "\\\\"); break;
    case '\b': g_string_append (s, "\\b"); break;
    case '\f': g_string_append (s, "\\f"); break;
    case '\n': g_string_append (s, "\\n"); break;
    case '\r': g_string_append (s, "\\r"); break;
    case '\t': g_string_append (s, "\\t"); break;
    default:
      if (c < 0x20) {
        g_string_append (s, "\\u00");
        g_string_append_c (s, hex[c >> 4]);
        g_string_append_c (s, hex[c & 15]);
      } else {
        g_string_append_c (s, (char) c);
      }
    }
  }
  g_string_append_c (s, '"');
}

static DiffuseStDType
file_dtype (DiffuseDType dt)
{
  switch (dt) {
  case DIFFUSE_DTYPE_F16: return DIFFUSE_ST_F16;
  case DIFFUSE_DTYPE_BF16: return DIFFUSE_ST_BF16;
  default: return DIFFUSE_ST_F32;
  }
}

/* Position in the Rust Dtype enum ("increasing alignment order"). */
static int
rust_dtype_rank (DiffuseDType dt)
{
  switch (dt) {
  case DIFFUSE_DTYPE_F16: return 7;
  case DIFFUSE_DTYPE_BF16: return 8;
  default: return 11;   /* F32 */
  }
}

static int
cmp_write_order (gconstpointer a, gconstpointer b)
{
  const WEntry *x = *(const WEntry *const *) a, *y = *(const WEntry *const *) b;
  int rx = rust_dtype_rank (x->t->dtype), ry = rust_dtype_rank (y->t->dtype);
  if (rx != ry)
    return ry - rx;   /* decreasing alignment */
  return strcmp (x->name, y->name);
}

static int
cmp_str (gconstpointer a, gconstpointer b)
{
  return strcmp (*(const char *const *) a, *(const char *const *) b);
}

static gboolean
tensor_error (GError **error, const char *path, const char *name)
{
  GError *e = NULL;
  if (!diffuse_tensor_take_error (&e) || !e)
    e = g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "could not read the tensor");
  g_set_error (error, e->domain, e->code, "%s: tensor \"%s\": %s", path, name, e->message);
  g_error_free (e);
  return FALSE;
}

/* Writes the entries ents[0..n) (any order) into path. */
static gboolean
write_entries (DiffuseStWriter *w, WEntry **ents, guint n, const char *path, GError **error)
{
  WEntry **order = g_new (WEntry *, n ? n : 1);
  memcpy (order, ents, n * sizeof (WEntry *));
  qsort (order, n, sizeof (WEntry *), cmp_write_order);

  GString *h = g_string_new ("{\"__metadata__\":{");
  {
    guint nk = g_hash_table_size (w->metadata) + 1;
    const char **keys = g_new (const char *, nk);
    GHashTableIter it;
    gpointer k;
    guint i = 0;
    keys[i++] = "format";
    g_hash_table_iter_init (&it, w->metadata);
    while (g_hash_table_iter_next (&it, &k, NULL))
      keys[i++] = k;
    qsort (keys, nk, sizeof (char *), cmp_str);
    for (i = 0; i < nk; i++) {
      if (i)
        g_string_append_c (h, ',');
      append_json_string (h, keys[i]);
      g_string_append_c (h, ':');
      append_json_string (h, strcmp (keys[i], "format") == 0 ? "pt" : g_hash_table_lookup (w->metadata, keys[i]));
    }
    g_free (keys);
  }
  g_string_append_c (h, '}');
  guint64 off = 0;
  for (guint i = 0; i < n; i++) {
    DiffuseTensor *t = order[i]->t;
    guint64 nb = diffuse_tensor_nbytes (t);
    g_string_append_c (h, ',');
    append_json_string (h, order[i]->name);
    g_string_append_printf (h, ":{\"dtype\":\"%s\",\"shape\":[", diffuse_st_dtype_name (file_dtype (t->dtype)));
    for (int d = 0; d < t->ndim; d++)
      g_string_append_printf (h, "%s%" G_GINT64_FORMAT, d ? "," : "", (gint64) t->shape[d]);
    g_string_append_printf (h, "],\"data_offsets\":[%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT "]}", off, off + nb);
    off += nb;
  }
  g_string_append_c (h, '}');
  while (h->len % 8)
    g_string_append_c (h, ' ');

  guint8 len8[8];
  for (int i = 0; i < 8; i++)
    len8[i] = (guint8) (((guint64) h->len >> (8 * i)) & 0xff);

  gboolean ok = FALSE;
  DiffuseAtomicFile *f = _diffuse_atomic_file_open (path, 8 + h->len + off, error);
  if (!f)
    goto out;
  if (!_diffuse_atomic_file_write (f, len8, 8, error) || !_diffuse_atomic_file_write (f, h->str, h->len, error))
    goto abort;
  for (guint i = 0; i < n; i++) {
    DiffuseTensor *t = order[i]->t;
    if (diffuse_tensor_numel (t) == 0)
      continue;
    DiffuseTensor *c = diffuse_contiguous (t);
    if (c && !diffuse_device_is_cpu (diffuse_tensor_device (c))) {
      DiffuseTensor *hc = diffuse_to_device (c, diffuse_device_cpu ());
      diffuse_tensor_unref (c);
      c = hc;
    }
    if (!c) {
      tensor_error (error, path, order[i]->name);
      goto abort;
    }
    gboolean wok = _diffuse_atomic_file_write (f, diffuse_tensor_data (c), diffuse_tensor_nbytes (c), error);
    diffuse_tensor_unref (c);
    if (!wok)
      goto abort;
  }
  ok = _diffuse_atomic_file_commit (f, error);
  goto out;
abort:
  _diffuse_atomic_file_abort (f);
out:
  g_string_free (h, TRUE);
  g_free (order);
  return ok;
}

gboolean
diffuse_st_writer_write (DiffuseStWriter *w, const char *path, GError **error)
{
  g_return_val_if_fail (w != NULL, FALSE);
  g_return_val_if_fail (path != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);
  guint n = w->entries->len;
  WEntry **ents = g_new (WEntry *, n ? n : 1);
  for (guint i = 0; i < n; i++)
    ents[i] = &g_array_index (w->entries, WEntry, i);
  gboolean ok = write_entries (w, ents, n, path, error);
  g_free (ents);
  return ok;
}

/* Is name "<stem>-DDDDD-of-DDDDD.safetensors"? */
static gboolean
is_shard_name_of (const char *name, const char *stem)
{
  size_t sl = strlen (stem);
  if (strncmp (name, stem, sl) != 0)
    return FALSE;
  const char *p = name + sl;
  static const char pat[] = "-#####-of-#####.safetensors";
  for (size_t i = 0; i < sizeof (pat) - 1; i++) {
    if (pat[i] == '#') {
      if (!g_ascii_isdigit (p[i]))
        return FALSE;
    } else if (p[i] != pat[i]) {
      return FALSE;
    }
  }
  return p[sizeof (pat) - 1] == 0;
}

/* Removes files of an earlier save that the new one replaces: shards of the
 * same stem not in `keep`, and (when not NULL) `also`. */
static void
remove_stale (const char *dir, const char *stem, GHashTable *keep, const char *also)
{
  GDir *d = g_dir_open (dir, 0, NULL);
  if (!d)
    return;
  const char *name;
  while ((name = g_dir_read_name (d))) {
    gboolean stale = (also && strcmp (name, also) == 0)
                     || (is_shard_name_of (name, stem) && !(keep && g_hash_table_contains (keep, name)));
    if (stale) {
      char *p = g_build_filename (dir, name, NULL);
      if (g_file_test (p, G_FILE_TEST_IS_REGULAR) && !g_file_test (p, G_FILE_TEST_IS_SYMLINK))
        g_unlink (p);
      g_free (p);
    }
  }
  g_dir_close (d);
}

/* Sharded write.  Names: when variant is set, diffusers' _add_variant puts
 * it before ".safetensors", and the shard suffix goes after it:
 * diffusion_pytorch_model.fp16-00001-of-00003.safetensors and
 * diffusion_pytorch_model.safetensors.index.fp16.json.  Files of an earlier
 * save with the same prefix/variant that the new set supersedes (other shard
 * counts; the single file or the index) are removed after a successful
 * write. */
gboolean
diffuse_st_writer_write_sharded (DiffuseStWriter *w, const char *dir, const char *prefix, const char *variant,
                                 guint64 max_shard_size, GError **error)
{
  g_return_val_if_fail (w != NULL, FALSE);
  g_return_val_if_fail (dir != NULL && prefix != NULL && *prefix, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);
  if (variant && !*variant)
    variant = NULL;

  char *stem = variant ? g_strdup_printf ("%s.%s", prefix, variant) : g_strdup (prefix);
  char *single_name = g_strdup_printf ("%s.safetensors", stem);
  char *index_name = variant ? g_strdup_printf ("%s.safetensors.index.%s.json", prefix, variant)
                             : g_strdup_printf ("%s.safetensors.index.json", prefix);
  guint n = w->entries->len;
  gboolean ok = FALSE;

  /* huggingface_hub split_state_dict_into_shards_factory */
  GPtrArray *shards = g_ptr_array_new_with_free_func ((GDestroyNotify) g_ptr_array_unref);
  GPtrArray *cur = g_ptr_array_new ();
  guint64 cur_size = 0, total = 0;
  for (guint i = 0; i < n; i++) {
    WEntry *e = &g_array_index (w->entries, WEntry, i);
    guint64 sz = diffuse_tensor_nbytes (e->t);
    if (max_shard_size && sz > max_shard_size) {
      /* a tensor bigger than the limit gets its own shard, appended now */
      total += sz;
      GPtrArray *one = g_ptr_array_new ();
      g_ptr_array_add (one, e);
      g_ptr_array_add (shards, one);
      continue;
    }
    if (max_shard_size && cur_size + sz > max_shard_size) {
      g_ptr_array_add (shards, cur);
      cur = g_ptr_array_new ();
      cur_size = 0;
    }
    g_ptr_array_add (cur, e);
    cur_size += sz;
    total += sz;
  }
  if (cur->len > 0 || shards->len == 0)
    g_ptr_array_add (shards, cur);   /* (an empty writer gives one empty file) */
  else
    g_ptr_array_unref (cur);

  if (shards->len == 1) {
    GPtrArray *s = g_ptr_array_index (shards, 0);
    char *path = g_build_filename (dir, single_name, NULL);
    ok = write_entries (w, (WEntry **) s->pdata, s->len, path, error);
    g_free (path);
    if (ok)
      remove_stale (dir, stem, NULL, index_name);
    goto out;
  }

  {
    guint nb = shards->len;
    GHashTable *written = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
    JsonObject *wmap = json_object_new ();
    ok = TRUE;
    for (guint s = 0; s < nb && ok; s++) {
      GPtrArray *sh = g_ptr_array_index (shards, s);
      char *fname = g_strdup_printf ("%s-%05u-of-%05u.safetensors", stem, s + 1, nb);
      char *path = g_build_filename (dir, fname, NULL);
      ok = write_entries (w, (WEntry **) sh->pdata, sh->len, path, error);
      if (ok) {
        for (guint i = 0; i < sh->len; i++)
          json_object_set_string_member (wmap, ((WEntry *) sh->pdata[i])->name, fname);
        g_hash_table_add (written, fname);
      } else {
        g_free (fname);
      }
      g_free (path);
    }
    if (ok) {
      JsonObject *md = json_object_new ();
      json_object_set_int_member (md, "total_size", (gint64) total);
      JsonObject *root = json_object_new ();
      json_object_set_object_member (root, "metadata", md);
      json_object_set_object_member (root, "weight_map", wmap);
      wmap = NULL;
      JsonNode *node = json_node_init_object (json_node_alloc (), root);
      char *txt = _diffuse_json_dump_py (node, 2);
      char *content = g_strconcat (txt, "\n", NULL);
      char *ipath = g_build_filename (dir, index_name, NULL);
      ok = _diffuse_write_file_atomic (ipath, content, strlen (content), error);
      g_free (ipath);
      g_free (content);
      g_free (txt);
      json_node_unref (node);
      json_object_unref (root);
    }
    if (wmap)
      json_object_unref (wmap);
    if (ok) {
      remove_stale (dir, stem, written, single_name);
    } else {
      /* do not leave a partial set: remove the shards written by this call */
      GHashTableIter it;
      gpointer k;
      g_hash_table_iter_init (&it, written);
      while (g_hash_table_iter_next (&it, &k, NULL)) {
        char *p = g_build_filename (dir, (const char *) k, NULL);
        g_unlink (p);
        g_free (p);
      }
    }
    g_hash_table_unref (written);
  }

out:
  g_ptr_array_unref (shards);
  g_free (stem);
  g_free (single_name);
  g_free (index_name);
  return ok;
}

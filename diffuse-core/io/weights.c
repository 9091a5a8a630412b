/* gst-diffuse — the tensors of one component over one or several
 * safetensors files (plain list, or the shards of an index json). */
#include "io/io-private.h"

#include <diffuse/safetensors.h>
#include <diffuse/error.h>

#include <string.h>

typedef struct {
  DiffuseSafetensors *st;
  const DiffuseStEntry *e;
} Slot;

struct _DiffuseWeights {
  gint ref_count;
  GPtrArray *files;        /* DiffuseSafetensors*, owned */
  GHashTable *by_name;     /* entry name (owned by the file) -> Slot* */
  const char **names;      /* sorted */
  guint n_names;
  guint64 bytes;
  char *describe;
  GMutex lock;
  GHashTable *materialized; /* "name|dtype|device" -> DiffuseTensor*: each tensor is made once */
  /* a patched set (diffuse_weights_new_patched): names, entries and the
   * unpatched tensors are base's; patches: name -> replacement (f32) */
  DiffuseWeights *base;
  GHashTable *patches;
};

static void
weights_free (DiffuseWeights *w)
{
  if (w->materialized)
    g_hash_table_unref (w->materialized);
  g_mutex_clear (&w->lock);
  if (w->base) {
    diffuse_weights_unref (w->base);
    g_hash_table_unref (w->patches);
    g_free (w->describe);
    g_free (w);
    return;
  }
  g_hash_table_unref (w->by_name);
  g_ptr_array_unref (w->files);
  g_free (w->names);
  g_free (w->describe);
  g_free (w);
}

static DiffuseWeights *
weights_new (void)
{
  DiffuseWeights *w = g_new0 (DiffuseWeights, 1);
  w->ref_count = 1;
  w->files = g_ptr_array_new_with_free_func ((GDestroyNotify) diffuse_safetensors_unref);
  w->by_name = g_hash_table_new_full (g_str_hash, g_str_equal, NULL, g_free);
  g_mutex_init (&w->lock);
  return w;
}

static int
cmp_cstr (gconstpointer a, gconstpointer b)
{
  return strcmp (*(const char *const *) a, *(const char *const *) b);
}

/* Adds every tensor of st (st ref is taken over). */
static gboolean
weights_add_file (DiffuseWeights *w, DiffuseSafetensors *st, GError **error)
{
  g_ptr_array_add (w->files, st);
  guint n = diffuse_safetensors_n_tensors (st);
  for (guint i = 0; i < n; i++) {
    const DiffuseStEntry *e = diffuse_safetensors_entry (st, i);
    Slot *prev = g_hash_table_lookup (w->by_name, e->name);
    if (prev) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "tensor \"%s\" is in two files: %s and %s", e->name,
                   diffuse_safetensors_path (prev->st), diffuse_safetensors_path (st));
      return FALSE;
    }
    Slot *s = g_new (Slot, 1);
    s->st = st;
    s->e = e;
    g_hash_table_insert (w->by_name, (gpointer) e->name, s);
  }
  w->bytes += _diffuse_safetensors_data_bytes (st);
  return TRUE;
}

static void
weights_finish (DiffuseWeights *w)
{
  w->n_names = g_hash_table_size (w->by_name);
  w->names = g_new0 (const char *, w->n_names + 1);
  GHashTableIter it;
  gpointer k;
  guint i = 0;
  g_hash_table_iter_init (&it, w->by_name);
  while (g_hash_table_iter_next (&it, &k, NULL))
    w->names[i++] = k;
  qsort (w->names, w->n_names, sizeof (char *), cmp_cstr);
}

DiffuseWeights *
diffuse_weights_open (const char *const *paths, GError **error)
{
  g_return_val_if_fail (paths != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);
  DiffuseWeights *w = weights_new ();
  GString *d = g_string_new (NULL);
  for (guint i = 0; paths[i]; i++) {
    DiffuseSafetensors *st = diffuse_safetensors_open (paths[i], error);
    if (!st || !weights_add_file (w, st, error)) {
      g_string_free (d, TRUE);
      weights_free (w);
      return NULL;
    }
    g_string_append_printf (d, "%s%s", i ? ", " : "", paths[i]);
  }
  if (w->files->len == 0)
    g_string_append (d, "(no files)");
  w->describe = g_string_free (d, FALSE);
  weights_finish (w);
  return w;
}

static gboolean
index_error (GError **error, int code, const char *path, const char *fmt, ...) G_GNUC_PRINTF (4, 5);

static gboolean
index_error (GError **error, int code, const char *path, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  g_set_error (error, DIFFUSE_ERROR, code, "%s: %s", path, msg);
  g_free (msg);
  return FALSE;
}

/* A shard file name must name a file of the index's own folder. */
static gboolean
plain_file_name (const char *s)
{
  return *s && strcmp (s, ".") != 0 && strcmp (s, "..") != 0 && !strchr (s, '/') && !strchr (s, '\\');
}

DiffuseWeights *
diffuse_weights_open_index (const char *index_json_path, GError **error)
{
  g_return_val_if_fail (index_json_path != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);
  const char *ipath = index_json_path;
  char *text = NULL;
  gsize len = 0;
  GError *err = NULL;
  if (!g_file_get_contents (ipath, &text, &len, &err)) {
    g_set_error (error, DIFFUSE_ERROR,
                 g_error_matches (err, G_FILE_ERROR, G_FILE_ERROR_NOENT) ? DIFFUSE_ERROR_NOT_FOUND : DIFFUSE_ERROR_IO,
                 "%s", err->message);
    g_error_free (err);
    return NULL;
  }
  JsonParser *parser = json_parser_new ();
  gboolean parsed = !memchr (text, 0, len) && json_parser_load_from_data (parser, text, (gssize) len, &err);
  g_free (text);
  if (!parsed) {
    index_error (error, DIFFUSE_ERROR_CORRUPT, ipath, "invalid index JSON: %s", err ? err->message : "NUL byte");
    g_clear_error (&err);
    g_object_unref (parser);
    return NULL;
  }
  JsonNode *root = json_parser_get_root (parser);
  JsonNode *wm = root && JSON_NODE_HOLDS_OBJECT (root)
                     ? json_object_get_member (json_node_get_object (root), "weight_map") : NULL;
  if (!wm || !JSON_NODE_HOLDS_OBJECT (wm)) {
    index_error (error, DIFFUSE_ERROR_CORRUPT, ipath, "no \"weight_map\" object in the index");
    g_object_unref (parser);
    return NULL;
  }
  JsonObject *map = json_node_get_object (wm);

  DiffuseWeights *w = NULL;
  char *dir = g_path_get_dirname (ipath);
  GHashTable *shards = g_hash_table_new (g_str_hash, g_str_equal);   /* file name -> st (borrowed from w) */
  GList *members = json_object_get_members (map);
  GList *shard_order = NULL;
  gboolean ok = TRUE;

  /* shard names, in the order first seen (checked before anything is opened) */
  for (GList *l = members; l && ok; l = l->next) {
    JsonNode *v = json_object_get_member (map, l->data);
    if (!JSON_NODE_HOLDS_VALUE (v) || json_node_get_value_type (v) != G_TYPE_STRING) {
      ok = index_error (error, DIFFUSE_ERROR_CORRUPT, ipath, "weight_map entry \"%s\" is not a file name",
                        (const char *) l->data);
      break;
    }
    const char *f = json_node_get_string (v);
    if (!plain_file_name (f)) {
      ok = index_error (error, DIFFUSE_ERROR_CORRUPT, ipath, "shard \"%s\" (for tensor \"%s\") is not a file name "
                        "in the index's folder", f, (const char *) l->data);
      break;
    }
    if (!g_hash_table_contains (shards, f)) {
      g_hash_table_insert (shards, (gpointer) f, NULL);
      shard_order = g_list_prepend (shard_order, (gpointer) f);
    }
  }
  shard_order = g_list_reverse (shard_order);

  if (ok) {
    w = weights_new ();
    GString *d = g_string_new (ipath);
    g_string_append (d, " (shards:");
    for (GList *l = shard_order; l && ok; l = l->next) {
      const char *f = l->data;
      char *p = g_build_filename (dir, f, NULL);
      if (!g_file_test (p, G_FILE_TEST_EXISTS)) {
        ok = index_error (error, DIFFUSE_ERROR_NOT_FOUND, ipath, "shard file %s is missing", p);
        g_free (p);
        break;
      }
      DiffuseSafetensors *st = diffuse_safetensors_open (p, &err);
      g_free (p);
      if (!st) {
        g_set_error (error, err->domain, err->code, "%s: shard %s: %s", ipath, f, err->message);
        g_clear_error (&err);
        ok = FALSE;
        break;
      }
      g_hash_table_insert (shards, (gpointer) f, st);
      ok = weights_add_file (w, st, error);
      g_string_append_printf (d, " %s", f);
    }
    g_string_append_c (d, ')');
    w->describe = g_string_free (d, FALSE);
  }

  /* every listed tensor must be in the shard the index names */
  for (GList *l = members; l && ok; l = l->next) {
    const char *name = l->data;
    const char *f = json_object_get_string_member (map, name);
    DiffuseSafetensors *st = g_hash_table_lookup (shards, f);
    if (!diffuse_safetensors_find (st, name))
      ok = index_error (error, DIFFUSE_ERROR_CORRUPT, ipath, "tensor \"%s\" is listed in shard %s but not in the file",
                        name, f);
  }

  g_list_free (members);
  g_list_free (shard_order);
  g_hash_table_unref (shards);
  g_free (dir);
  g_object_unref (parser);
  if (!ok) {
    if (w)
      weights_free (w);
    return NULL;
  }
  weights_finish (w);
  return w;
}

DiffuseWeights *
diffuse_weights_ref (DiffuseWeights *w)
{
  g_return_val_if_fail (w != NULL, NULL);
  g_atomic_int_inc (&w->ref_count);
  return w;
}

void
diffuse_weights_unref (DiffuseWeights *w)
{
  if (w && g_atomic_int_dec_and_test (&w->ref_count))
    weights_free (w);
}

DiffuseWeights *
diffuse_weights_new_patched (DiffuseWeights *base, GHashTable *patches, const char *what)
{
  g_return_val_if_fail (base != NULL && patches != NULL, NULL);
  DiffuseWeights *w = g_new0 (DiffuseWeights, 1);
  w->ref_count = 1;
  g_mutex_init (&w->lock);
  /* a patched base: its files, its patches and then these (these win) */
  w->base = diffuse_weights_ref (base->base ? base->base : base);
  w->patches = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, (GDestroyNotify) diffuse_tensor_unref);
  GHashTable *layers[2] = { base->base ? base->patches : NULL, patches };
  for (int l = 0; l < 2; l++) {
    if (!layers[l])
      continue;
    GHashTableIter it;
    gpointer k, v;
    g_hash_table_iter_init (&it, layers[l]);
    while (g_hash_table_iter_next (&it, &k, &v))
      g_hash_table_insert (w->patches, g_strdup (k), diffuse_tensor_ref (v));
  }
  w->describe = g_strdup_printf ("%s + %s", diffuse_weights_describe (w->base), what ? what : "patches");
  return w;
}

gboolean
diffuse_weights_has (DiffuseWeights *w, const char *name)
{
  g_return_val_if_fail (w != NULL && name != NULL, FALSE);
  if (w->base)
    return diffuse_weights_has (w->base, name);
  return g_hash_table_contains (w->by_name, name);
}

const char **
diffuse_weights_names (DiffuseWeights *w, guint *n)
{
  g_return_val_if_fail (w != NULL, NULL);
  if (w->base)
    return diffuse_weights_names (w->base, n);
  if (n)
    *n = w->n_names;
  return g_memdup2 (w->names, sizeof (char *) * (w->n_names + 1));
}

const DiffuseStEntry *
diffuse_weights_entry (DiffuseWeights *w, const char *name)
{
  g_return_val_if_fail (w != NULL && name != NULL, NULL);
  if (w->base)
    return diffuse_weights_entry (w->base, name);
  Slot *s = g_hash_table_lookup (w->by_name, name);
  return s ? s->e : NULL;
}

/* a patch in dtype on dev */
static DiffuseTensor *
patch_tensor (DiffuseTensor *p, DiffuseDType dtype, DiffuseDevice *dev, GError **error)
{
  DiffuseTensor *c = diffuse_cast (p, dtype);
  DiffuseTensor *d = c ? diffuse_to_device (c, dev) : NULL;
  diffuse_tensor_clear (&c);
  if (!d && !diffuse_tensor_take_error (error))
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "patched tensor to %s failed", diffuse_device_name (dev));
  return d;
}

DiffuseTensor *
diffuse_weights_get_uncached (DiffuseWeights *w, const char *name, DiffuseDType dtype, DiffuseDevice *dev,
                              GError **error)
{
  g_return_val_if_fail (w != NULL && name != NULL, NULL);
  g_return_val_if_fail (dtype < DIFFUSE_DTYPE_N, NULL);
  if (w->base) {
    DiffuseTensor *p = g_hash_table_lookup (w->patches, name);
    return p ? patch_tensor (p, dtype, dev, error) : diffuse_weights_get_uncached (w->base, name, dtype, dev, error);
  }
  Slot *s = g_hash_table_lookup (w->by_name, name);
  if (!s) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "no tensor \"%s\" in %s", name, w->describe);
    return NULL;
  }
  return _diffuse_st_entry_tensor (s->st, s->e, dtype, dev, error);
}

DiffuseTensor *
diffuse_weights_get (DiffuseWeights *w, const char *name, DiffuseDType dtype, DiffuseDevice *dev, GError **error)
{
  g_return_val_if_fail (w != NULL && name != NULL, NULL);
  /* unpatched tensors are the base's own (made once there, shared) */
  if (w->base && !g_hash_table_contains (w->patches, name))
    return diffuse_weights_get (w->base, name, dtype, dev, error);
  char *key = g_strdup_printf ("%s|%d|%p", name, (int) dtype, (void *) dev);
  g_mutex_lock (&w->lock);
  if (!w->materialized)
    w->materialized = g_hash_table_new_full (g_str_hash, g_str_equal, g_free,
                                             (GDestroyNotify) diffuse_tensor_unref);
  DiffuseTensor *t = g_hash_table_lookup (w->materialized, key);
  if (t) {
    diffuse_tensor_ref (t);
    g_free (key);
  } else {
    t = diffuse_weights_get_uncached (w, name, dtype, dev, error);
    if (t)
      g_hash_table_insert (w->materialized, key, diffuse_tensor_ref (t));
    else
      g_free (key);
  }
  g_mutex_unlock (&w->lock);
  return t;
}

guint64
diffuse_weights_file_bytes (DiffuseWeights *w)
{
  g_return_val_if_fail (w != NULL, 0);
  if (w->base)
    return diffuse_weights_file_bytes (w->base);
  return w->bytes;
}

const char *
diffuse_weights_describe (DiffuseWeights *w)
{
  g_return_val_if_fail (w != NULL, NULL);
  return w->describe;
}

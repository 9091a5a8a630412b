/* Tests of the safetensors reader, writer, shards and DiffuseWeights.
 *
 * Oracles (tests/reference/make_safetensors_fixtures.py,
 * tests/reference/check_st_roundtrip.py):
 *  - files written by Python safetensors / diffusers, with the values torch
 *    reads from them and the bits torch's .float()/.half()/.bfloat16() give;
 *  - huggingface_hub's shard assignment on synthetic sizes;
 *  - files written by OUR writer (tests/fixtures/safetensors/ours/) that
 *    Python safetensors and diffusers loaded: roundtrip_result.json holds
 *    what they read.  This test checks that our writer still produces those
 *    bytes exactly.
 *
 * DIFFUSE_ST_WRITE_OURS=<dir> ./test-safetensors -p /safetensors/ours/write
 * regenerates the ours/ files (then run check_st_roundtrip.py). */
#include "testutil.h"

#include <errno.h>
#include <glib/gstdio.h>
#include <math.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>

/* ---- helpers ------------------------------------------------------------ */

static JsonNode *
load_json (const char *path)
{
  GError *err = NULL;
  JsonParser *p = json_parser_new ();
  json_parser_load_from_file (p, path, &err);
  g_assert_no_error (err);
  JsonNode *root = json_node_copy (json_parser_get_root (p));
  g_object_unref (p);
  return root;
}

static JsonNode *
load_fixture_json (const char *rel)
{
  char *p = tu_fixture (rel);
  JsonNode *n = load_json (p);
  g_free (p);
  return n;
}

static guint64
elem_bits (const guint8 *p, guint size)
{
  guint64 v = 0;
  for (int i = (int) size - 1; i >= 0; i--)
    v = (v << 8) | p[i];
  return v;
}

static guint
dtype_size (DiffuseDType dt)
{
  return (guint) diffuse_dtype_size (dt);
}

static gboolean
file_bytes_equal (const char *a, const char *b)
{
  char *da = NULL, *db = NULL;
  gsize la = 0, lb = 0;
  GError *err = NULL;
  g_file_get_contents (a, &da, &la, &err);
  g_assert_no_error (err);
  g_file_get_contents (b, &db, &lb, &err);
  g_assert_no_error (err);
  gboolean eq = la == lb && memcmp (da, db, la) == 0;
  if (!eq)
    g_test_message ("%s (%zu bytes) differs from %s (%zu bytes)", a, la, b, lb);
  g_free (da);
  g_free (db);
  return eq;
}

/* NaN payloads and signs after a conversion are not meaningful (torch gives
 * 0x7fffffff for f16 NaN -> f32 but 0x7fc00000 through f64, 0xffff for any
 * f32 NaN -> bf16, ...): any NaN matches any NaN. */
static gboolean
is_nan_bits (guint64 b, DiffuseDType dt)
{
  switch (dt) {
  case DIFFUSE_DTYPE_F32: return (b & 0x7fffffffu) > 0x7f800000u;
  case DIFFUSE_DTYPE_F16: return (b & 0x7fffu) > 0x7c00u;
  case DIFFUSE_DTYPE_BF16: return (b & 0x7fffu) > 0x7f80u;
  default: return FALSE;
  }
}

/* Asserts the tensor's elements have exactly the bits listed (NaN: any NaN). */
static void
assert_tensor_bits (DiffuseTensor *t, JsonArray *want, const char *what)
{
  g_assert_nonnull (t);
  g_assert_true (diffuse_tensor_is_contiguous (t));
  guint n = json_array_get_length (want);
  g_assert_cmpint (diffuse_tensor_numel (t), ==, n);
  const guint8 *p = diffuse_tensor_data (t);
  guint sz = dtype_size (t->dtype);
  for (guint i = 0; i < n; i++) {
    guint64 got = elem_bits (p + (size_t) i * sz, sz);
    guint64 exp = (guint64) json_array_get_int_element (want, i);
    if (sz < 8)
      exp &= (G_GUINT64_CONSTANT (1) << (8 * sz)) - 1;
    if (got != exp && !(is_nan_bits (got, t->dtype) && is_nan_bits (exp, t->dtype)))
      g_error ("%s: element %u has bits 0x%" G_GINT64_MODIFIER "x, expected 0x%" G_GINT64_MODIFIER "x", what, i,
               got, exp);
  }
}

static DiffuseTensor *
new_tensor_bits (DiffuseDType dt, int ndim, const int64_t *shape, const void *bits)
{
  DiffuseTensor *t = diffuse_tensor_new (diffuse_device_cpu (), dt, ndim, shape);
  g_assert_nonnull (t);
  if (bits && diffuse_tensor_nbytes (t))
    memcpy (diffuse_tensor_data (t), bits, diffuse_tensor_nbytes (t));
  return t;
}

static GHashTable *
list_dir (const char *dir)
{
  GHashTable *h = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  GDir *d = g_dir_open (dir, 0, NULL);
  g_assert_nonnull (d);
  const char *n;
  while ((n = g_dir_read_name (d)))
    g_hash_table_add (h, g_strdup (n));
  g_dir_close (d);
  return h;
}

/* ---- reading files written by Python ------------------------------------ */

static void
check_python_file (const char *fname)
{
  JsonNode *root = load_fixture_json ("safetensors/py_basic.json");
  JsonObject *fo = json_object_get_object_member (json_object_get_object_member (json_node_get_object (root),
                                                                                  "files"), fname);
  JsonObject *tens = json_object_get_object_member (fo, "tensors");
  char *rel = g_build_filename ("safetensors", fname, NULL);
  DiffuseSafetensors *st = tu_open (rel);

  /* metadata */
  JsonObject *md = json_object_get_object_member (fo, "metadata");
  GHashTable *got_md = diffuse_safetensors_metadata (st);
  g_assert_nonnull (got_md);
  g_assert_cmpuint (g_hash_table_size (got_md), ==, json_object_get_size (md));
  GList *keys = json_object_get_members (md);
  for (GList *l = keys; l; l = l->next)
    g_assert_cmpstr (g_hash_table_lookup (got_md, l->data), ==, json_object_get_string_member (md, l->data));
  g_list_free (keys);

  /* entries: count, sorted by name, dtype, shape, raw bits */
  g_assert_cmpuint (diffuse_safetensors_n_tensors (st), ==, json_object_get_size (tens));
  for (guint i = 0; i < diffuse_safetensors_n_tensors (st); i++) {
    const DiffuseStEntry *e = diffuse_safetensors_entry (st, i);
    if (i > 0)
      g_assert_cmpint (strcmp (diffuse_safetensors_entry (st, i - 1)->name, e->name), <, 0);
    g_assert_true (diffuse_safetensors_find (st, e->name) == e);
    JsonObject *te = json_object_get_object_member (tens, e->name);
    g_assert_nonnull (te);
    g_assert_cmpstr (diffuse_st_dtype_name (e->dtype), ==, json_object_get_string_member (te, "dtype"));
    JsonArray *shape = json_object_get_array_member (te, "shape");
    g_assert_cmpint (e->ndim, ==, json_array_get_length (shape));
    guint64 numel = 1;
    for (int d = 0; d < e->ndim; d++) {
      g_assert_cmpint (e->shape[d], ==, json_array_get_int_element (shape, d));
      numel *= (guint64) e->shape[d];
    }
    JsonArray *bits = json_object_get_array_member (te, "bits");
    g_assert_cmpuint (json_array_get_length (bits), ==, numel);
    guint esz = (guint) (numel ? e->nbytes / numel : 0);
    for (guint k = 0; k < numel; k++) {
      guint64 got = elem_bits ((const guint8 *) e->data + (size_t) k * esz, esz);
      gint64 w = json_array_get_int_element (bits, k);
      guint64 exp = esz < 8 ? (guint64) w & ((G_GUINT64_CONSTANT (1) << (8 * esz)) - 1) : (guint64) w;
      g_assert_cmphex (got, ==, exp);
    }

    /* as tensors in each float dtype: torch's conversions are the oracle */
    static const struct { DiffuseDType dt; const char *key; } conv[] = {
      { DIFFUSE_DTYPE_F32, "as_f32" }, { DIFFUSE_DTYPE_F16, "as_f16" }, { DIFFUSE_DTYPE_BF16, "as_bf16" },
    };
    for (guint c = 0; c < G_N_ELEMENTS (conv); c++) {
      GError *err = NULL;
      DiffuseTensor *t = diffuse_safetensors_tensor (st, e->name, conv[c].dt, diffuse_device_cpu (), &err);
      if (!json_object_has_member (te, conv[c].key)) {
        /* integer dtypes */
        g_assert_null (t);
        g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED);
        g_assert_nonnull (strstr (err->message, e->name));
        g_assert_nonnull (strstr (err->message, fname));
        g_clear_error (&err);
        continue;
      }
      g_assert_no_error (err);
      g_assert_cmpint (t->ndim, ==, e->ndim);
      for (int d = 0; d < e->ndim; d++)
        g_assert_cmpint (t->shape[d], ==, e->shape[d]);
      char *what = g_strdup_printf ("%s %s %s", fname, e->name, conv[c].key);
      assert_tensor_bits (t, json_object_get_array_member (te, conv[c].key), what);
      g_free (what);
      gboolean native = (e->dtype == DIFFUSE_ST_F32 && conv[c].dt == DIFFUSE_DTYPE_F32)
                        || (e->dtype == DIFFUSE_ST_F16 && conv[c].dt == DIFFUSE_DTYPE_F16)
                        || (e->dtype == DIFFUSE_ST_BF16 && conv[c].dt == DIFFUSE_DTYPE_BF16);
      /* Python's writer aligns everything: native dtype = zero copy */
      g_assert_cmpint (diffuse_tensor_is_borrowed (t), ==, native);
      if (native && numel)
        g_assert_true (diffuse_tensor_data (t) == e->data);
      diffuse_tensor_unref (t);
    }
  }
  diffuse_safetensors_unref (st);
  g_free (rel);
  json_node_unref (root);
}

static void
test_python_basic (void)
{
  check_python_file ("py_basic.safetensors");
}

static void
test_python_misc (void)
{
  check_python_file ("py_misc.safetensors");
}

static void
test_not_found (void)
{
  GError *err = NULL;
  DiffuseSafetensors *st = diffuse_safetensors_open ("/nonexistent/x.safetensors", &err);
  g_assert_null (st);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, "/nonexistent/x.safetensors"));
  g_clear_error (&err);

  st = tu_open ("safetensors/py_basic.safetensors");
  g_assert_null (diffuse_safetensors_find (st, "nope"));
  DiffuseTensor *t = diffuse_safetensors_tensor (st, "nope", DIFFUSE_DTYPE_F32, NULL, &err);
  g_assert_null (t);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, "nope"));
  g_clear_error (&err);
  diffuse_safetensors_unref (st);

  /* a directory */
  st = diffuse_safetensors_open ("/", &err);
  g_assert_null (st);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_IO);
  g_clear_error (&err);
}

/* A tensor outlives its file handle (the mapping stays). */
static void
test_borrow_lifetime (void)
{
  DiffuseMemStats before, mid, after;
  diffuse_device_get_mem_stats (diffuse_device_cpu (), &before);
  DiffuseSafetensors *st = tu_open ("safetensors/py_basic.safetensors");
  GError *err = NULL;
  DiffuseTensor *t = diffuse_safetensors_tensor (st, "w.f32", DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
  g_assert_no_error (err);
  g_assert_true (diffuse_tensor_is_borrowed (t));
  float first = diffuse_tensor_f32 (t)[0];
  diffuse_safetensors_unref (st);
  diffuse_device_get_mem_stats (diffuse_device_cpu (), &mid);
  g_assert_cmpuint (mid.borrowed_bytes, ==, before.borrowed_bytes + 48);
  g_assert_cmpuint (mid.resident_bytes, ==, before.resident_bytes);
  /* still readable */
  g_assert_cmpfloat (diffuse_tensor_f32 (t)[0], ==, first);
  g_assert_cmpfloat (diffuse_tensor_f32 (t)[11], !=, 0.0f);
  diffuse_tensor_unref (t);
  diffuse_device_get_mem_stats (diffuse_device_cpu (), &after);
  g_assert_cmpuint (after.borrowed_bytes, ==, before.borrowed_bytes);
}

/* ---- building files by hand --------------------------------------------- */

static GByteArray *
mkfile (const char *header, gssize hlen, const void *data, size_t dlen)
{
  if (hlen < 0)
    hlen = (gssize) strlen (header);
  GByteArray *b = g_byte_array_new ();
  guint8 len8[8];
  for (int i = 0; i < 8; i++)
    len8[i] = (guint8) (((guint64) hlen >> (8 * i)) & 0xff);
  g_byte_array_append (b, len8, 8);
  g_byte_array_append (b, (const guint8 *) header, (guint) hlen);
  if (dlen) {
    if (data) {
      g_byte_array_append (b, data, (guint) dlen);
    } else {
      for (size_t i = 0; i < dlen; i++) {
        guint8 v = (guint8) (i * 7 + 1);
        g_byte_array_append (b, &v, 1);
      }
    }
  }
  return b;
}

static GByteArray *
mkfile_len (guint64 hlen_field, const char *header, size_t dlen)
{
  GByteArray *b = g_byte_array_new ();
  guint8 len8[8];
  for (int i = 0; i < 8; i++)
    len8[i] = (guint8) ((hlen_field >> (8 * i)) & 0xff);
  g_byte_array_append (b, len8, 8);
  g_byte_array_append (b, (const guint8 *) header, (guint) strlen (header));
  for (size_t i = 0; i < dlen; i++) {
    guint8 z = 0;
    g_byte_array_append (b, &z, 1);
  }
  return b;
}

#define E4(name, off) "\"" name "\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" off "]}"

typedef struct {
  const char *name;
  const char *header;     /* NULL: special */
  size_t dlen;
  const char *tensor;     /* the message must name it, or NULL */
} CorruptCase;

static const CorruptCase corrupt_cases[] = {
  { "bad-json", "{\"a\":{\"dtype\":\"F32\",", 0, NULL },
  { "bad-json-2", "{\"a\" {}}", 0, NULL },
  { "not-object", "[1, 2]", 0, NULL },
  { "string-top", "\"x\"", 0, NULL },
  { "number-top", "12", 0, NULL },
  { "blank", "        ", 0, NULL },
  { "entry-not-object", "{\"a\":[1]}", 0, "a" },
  { "unknown-dtype", "{\"a\":{\"dtype\":\"F31\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "a" },
  { "lowercase-dtype", "{\"a\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "a" },
  { "dtype-not-string", "{\"a\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "a" },
  { "negative-shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "a" },
  { "float-shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}", 4, "a" },
  { "exp-shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1e0],\"data_offsets\":[0,4]}}", 4, "a" },
  { "leading-zero", "{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}", 4, "a" },
  { "huge-int", "{\"a\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999999],\"data_offsets\":[0,4]}}", 4, "a" },
  { "dim-over-int64", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0,9223372036854775808],\"data_offsets\":[0,0]}}", 0, "a" },
  { "shape-not-array", "{\"a\":{\"dtype\":\"F32\",\"shape\":1,\"data_offsets\":[0,4]}}", 4, "a" },
  { "shape-null", "{\"a\":{\"dtype\":\"F32\",\"shape\":null,\"data_offsets\":[0,4]}}", 4, "a" },
  { "too-many-dims", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, "a" },
  { "size-mismatch", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, "a" },
  { "size-mismatch-f16", "{\"a\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,4]}}", 4, "a" },
  { "overflow", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4],\"data_offsets\":[0,0]}}", 0, "a" },
  { "overflow-bytes", "{\"a\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}", 0, "a" },
  { "out-of-range", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "a" },
  { "out-of-range-huge", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[18446744073709551614,"
                         "18446744073709551615]}}", 4, "a" },
  { "end-before-begin", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4, "a" },
  { "overlap", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "b" },
  { "same-range", "{" E4 ("a", "0,4") "," E4 ("b", "0,4") "}", 4, NULL },
  { "hole", "{" E4 ("a", "0,4") "," E4 ("b", "8,12") "}", 12, "b" },
  { "hole-at-start", "{" E4 ("a", "4,8") "}", 8, "a" },
  { "trailing-bytes", "{" E4 ("a", "0,4") "}", 6, "a" },
  { "data-without-tensors", "{}", 1, NULL },
  { "truncated-data", "{" E4 ("a", "0,4") "," E4 ("b", "4,8") "}", 6, "b" },
  { "duplicate-key", "{" E4 ("a", "0,4") "," E4 ("a", "4,8") "}", 8, "a" },
  { "duplicate-metadata", "{\"__metadata__\":{},\"__metadata__\":{}," E4 ("a", "0,4") "}", 4, NULL },
  { "duplicate-metadata-key", "{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}," E4 ("a", "0,4") "}", 4, NULL },
  { "duplicate-field", "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "a" },
  { "extra-field", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 4, "a" },
  { "missing-offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 0, "a" },
  { "missing-dtype", "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "a" },
  { "empty-entry", "{\"a\":{}}", 0, "a" },
  { "offsets-3", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,4]}}", 4, "a" },
  { "offsets-1", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "a" },
  { "offsets-negative", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, "a" },
  { "metadata-int", "{\"__metadata__\":{\"k\":1}," E4 ("a", "0,4") "}", 4, NULL },
  { "metadata-null-value", "{\"__metadata__\":{\"k\":null}," E4 ("a", "0,4") "}", 4, NULL },
  { "metadata-nested", "{\"__metadata__\":{\"k\":{\"x\":\"y\"}}," E4 ("a", "0,4") "}", 4, NULL },
  { "metadata-string", "{\"__metadata__\":\"pt\"," E4 ("a", "0,4") "}", 4, NULL },
  { "metadata-tensor-like", "{\"__metadata__\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NULL },
  { "non-utf8", "{\"a\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NULL },
  { "overlong-utf8", "{\"a\xc0\xaf\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NULL },
  { "trailing-garbage", "{" E4 ("a", "0,4") "}x", 4, NULL },
  { "two-objects", "{" E4 ("a", "0,4") "}{}", 4, NULL },
  { "trailing-comma", "{" E4 ("a", "0,4") ",}", 4, NULL },
  { "lone-surrogate", "{\"\\ud800\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NULL },
  { "lone-low-surrogate", "{\"\\udc00x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NULL },
  { "bad-escape", "{\"a\\x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NULL },
  { "nul-escape", "{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NULL },
  { "control-char", "{\"a\x01\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NULL },
  { "unterminated-string", "{\"abc", 0, NULL },
  { "key-not-string", "{a:{}}", 0, NULL },
  { "true-entry", "{\"a\":true}", 0, "a" },
};

static void
assert_corrupt (GError *err, const char *label, const char *tensor, const char *what)
{
  if (!err)
    g_error ("%s: accepted", what);
  if (!g_error_matches (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT))
    g_error ("%s: wrong error %d: %s", what, err->code, err->message);
  if (!strstr (err->message, label))
    g_error ("%s: message does not name the file: %s", what, err->message);
  if (tensor) {
    char *q = g_strdup_printf ("\"%s\"", tensor);
    if (!strstr (err->message, q))
      g_error ("%s: message does not name tensor %s: %s", what, tensor, err->message);
    g_free (q);
  }
  g_test_message ("%s: %s", what, err->message);
}

/* Checks one byte image through open_bytes and through a file on disk. */
static void
check_corrupt_image (const char *dir, const char *name, const guint8 *data, size_t len, const char *tensor)
{
  GError *err = NULL;
  char *label = g_strdup_printf ("%s.bin", name);
  DiffuseSafetensors *st = diffuse_safetensors_open_bytes (data, len, label, &err);
  g_assert_null (st);
  assert_corrupt (err, label, tensor, name);
  g_clear_error (&err);
  g_free (label);

  char *path = g_strdup_printf ("%s/%s.safetensors", dir, name);
  g_file_set_contents (path, (const char *) data, (gssize) len, &err);
  g_assert_no_error (err);
  st = diffuse_safetensors_open (path, &err);
  g_assert_null (st);
  assert_corrupt (err, path, tensor, name);
  g_clear_error (&err);
  g_free (path);
}

static void
test_corrupt (void)
{
  char *dir = tu_mkdtemp ();
  for (guint i = 0; i < G_N_ELEMENTS (corrupt_cases); i++) {
    const CorruptCase *c = &corrupt_cases[i];
    GByteArray *b = mkfile (c->header, -1, NULL, c->dlen);
    check_corrupt_image (dir, c->name, b->data, b->len, c->tensor);
    g_byte_array_unref (b);
  }

  /* header-length field defects */
  const char *ok_hdr = "{" E4 ("a", "0,4") "}";
  struct { const char *name; guint64 n; size_t dlen; } lens[] = {
    { "hlen-zero", 0, 4 },
    { "hlen-past-end", 1000, 4 },
    { "hlen-past-end-by-one", 0, 0 },    /* set below */
    { "hlen-absurd", 200u * 1000 * 1000, 4 },
    { "hlen-huge", G_GUINT64_CONSTANT (0x8000000000000000), 4 },
    { "hlen-max", G_MAXUINT64, 4 },
  };
  lens[2].n = strlen (ok_hdr) + 4 + 1;
  for (guint i = 0; i < G_N_ELEMENTS (lens); i++) {
    GByteArray *b = mkfile_len (lens[i].n, ok_hdr, lens[i].dlen);
    check_corrupt_image (dir, lens[i].name, b->data, b->len, NULL);
    g_byte_array_unref (b);
  }

  /* short files, and a valid file cut at every length */
  check_corrupt_image (dir, "empty-file", (const guint8 *) "", 0, NULL);
  check_corrupt_image (dir, "five-bytes", (const guint8 *) "\x10\0\0\0\0", 5, NULL);
  {
    char *p = tu_fixture ("safetensors/py_basic.safetensors");
    char *data;
    gsize len;
    g_assert_true (g_file_get_contents (p, &data, &len, NULL));
    for (gsize cut = 0; cut < len; cut += (cut < 300 ? 1 : 37)) {
      char *nm = g_strdup_printf ("truncated-%zu", cut);
      GError *err = NULL;
      DiffuseSafetensors *st = diffuse_safetensors_open_bytes (data, cut, nm, &err);
      g_assert_null (st);
      assert_corrupt (err, nm, NULL, nm);
      g_clear_error (&err);
      g_free (nm);
    }
    /* and one extra byte */
    char *longer = g_malloc (len + 1);
    memcpy (longer, data, len);
    longer[len] = 0;
    check_corrupt_image (dir, "one-byte-more", (const guint8 *) longer, len + 1, NULL);
    g_free (longer);
    g_free (data);
    g_free (p);
  }
  tu_rm_rf (dir);
  g_free (dir);
}

/* Valid oddities the reference reader accepts. */
static void
test_valid_variants (void)
{
  static const struct { const char *name; const char *header; size_t dlen; guint n; } cases[] = {
    { "space-padding", "{" E4 ("a", "0,4") "}       ", 4, 1 },
    { "leading-ws", " \n\t{" E4 ("a", "0,4") "}", 4, 1 },
    { "ws-inside", "{ \"a\" : { \"dtype\" : \"F32\" , \"shape\" : [ 1 ] , \"data_offsets\" : [ 0 , 4 ] } }", 4, 1 },
    { "metadata-null", "{\"__metadata__\":null," E4 ("a", "0,4") "}", 4, 1 },
    { "metadata-empty", "{\"__metadata__\":{}," E4 ("a", "0,4") "}", 4, 1 },
    { "no-tensors", "{}", 0, 0 },
    { "only-metadata", "{\"__metadata__\":{\"format\":\"pt\"}}", 0, 0 },
    { "any-order", "{" E4 ("b", "4,8") "," E4 ("a", "0,4") "}", 8, 2 },
    { "field-order", "{\"a\":{\"data_offsets\":[0,4],\"shape\":[1],\"dtype\":\"F32\"}}", 4, 1 },
    { "empty-tensors", "{\"e\":{\"dtype\":\"F16\",\"shape\":[0,5],\"data_offsets\":[4,4]}," E4 ("a", "0,4")
                       ",\"z\":{\"dtype\":\"F32\",\"shape\":[3,0],\"data_offsets\":[0,0]}}", 4, 3 },
    { "zero-dim-big", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0,4294967296],\"data_offsets\":[0,0]}}", 0, 1 },
    { "unicode-name", "{\"\\u00e9\\ud83d\\ude00/x\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]}}", 1, 1 },
    { "all-dtypes", "{\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]},"
                    "\"b\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[8,16]},"
                    "\"c\":{\"dtype\":\"U64\",\"shape\":[1],\"data_offsets\":[16,24]},"
                    "\"d\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[24,28]},"
                    "\"e\":{\"dtype\":\"U32\",\"shape\":[1],\"data_offsets\":[28,32]},"
                    "\"f\":{\"dtype\":\"I16\",\"shape\":[1],\"data_offsets\":[32,34]},"
                    "\"g\":{\"dtype\":\"U16\",\"shape\":[1],\"data_offsets\":[34,36]},"
                    "\"h\":{\"dtype\":\"I8\",\"shape\":[1],\"data_offsets\":[36,37]},"
                    "\"i\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[37,38]},"
                    "\"j\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[38,39]},"
                    "\"k\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[39,40]},"
                    "\"l\":{\"dtype\":\"F8_E5M2\",\"shape\":[1],\"data_offsets\":[40,41]}}", 41, 12 },
  };
  for (guint i = 0; i < G_N_ELEMENTS (cases); i++) {
    GByteArray *b = mkfile (cases[i].header, -1, NULL, cases[i].dlen);
    GError *err = NULL;
    DiffuseSafetensors *st = diffuse_safetensors_open_bytes (b->data, b->len, cases[i].name, &err);
    if (err)
      g_error ("%s: %s", cases[i].name, err->message);
    g_assert_cmpuint (diffuse_safetensors_n_tensors (st), ==, cases[i].n);
    for (guint k = 1; k < cases[i].n; k++)
      g_assert_cmpint (strcmp (diffuse_safetensors_entry (st, k - 1)->name, diffuse_safetensors_entry (st, k)->name),
                       <, 0);
    diffuse_safetensors_unref (st);
    g_byte_array_unref (b);
  }
  /* a metadata map */
  GByteArray *b = mkfile ("{\"__metadata__\":{\"format\":\"pt\",\"k\\\"\":\"v\\n\\u00e9\"}}", -1, NULL, 0);
  GError *err = NULL;
  DiffuseSafetensors *st = diffuse_safetensors_open_bytes (b->data, b->len, "md", &err);
  g_assert_no_error (err);
  GHashTable *md = diffuse_safetensors_metadata (st);
  g_assert_cmpuint (g_hash_table_size (md), ==, 2);
  g_assert_cmpstr (g_hash_table_lookup (md, "format"), ==, "pt");
  g_assert_cmpstr (g_hash_table_lookup (md, "k\""), ==, "v\n\xc3\xa9");
  diffuse_safetensors_unref (st);
  g_byte_array_unref (b);
  /* an empty tensor with huge other dims: valid, but not a tensor */
  b = mkfile ("{\"a\":{\"dtype\":\"F32\",\"shape\":[0,4294967296,4294967296],\"data_offsets\":[0,0]}}", -1, NULL, 0);
  st = diffuse_safetensors_open_bytes (b->data, b->len, "huge-empty", &err);
  g_assert_no_error (err);
  g_assert_null (diffuse_safetensors_tensor (st, "a", DIFFUSE_DTYPE_F32, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED);
  g_clear_error (&err);
  diffuse_safetensors_unref (st);
  g_byte_array_unref (b);
  /* no metadata */
  b = mkfile ("{" E4 ("a", "0,4") "}", -1, NULL, 4);
  st = diffuse_safetensors_open_bytes (b->data, b->len, "nomd", &err);
  g_assert_no_error (err);
  g_assert_null (diffuse_safetensors_metadata (st));
  g_assert_cmpstr (diffuse_safetensors_path (st), ==, "nomd");
  diffuse_safetensors_unref (st);
  g_byte_array_unref (b);
}

/* Data not aligned to the element size: copied, with the right values. */
static void
test_unaligned (void)
{
  const float fv[3] = { 1.5f, -2.25f, 0.5f };
  const guint16 f16_of_fv[3] = { 0x3E00, 0xC080, 0x3800 };
  char *hdr = g_strdup ("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}");
  GString *h = g_string_new (hdr);
  while ((8 + h->len) % 4 != 1)
    g_string_append_c (h, ' ');
  GByteArray *b = mkfile (h->str, (gssize) h->len, fv, sizeof fv);
  char *dir = tu_mkdtemp ();
  char *path = g_build_filename (dir, "unaligned.safetensors", NULL);
  g_assert_true (g_file_set_contents (path, (const char *) b->data, b->len, NULL));
  GError *err = NULL;
  DiffuseSafetensors *st = diffuse_safetensors_open (path, &err);
  g_assert_no_error (err);
  const DiffuseStEntry *e = diffuse_safetensors_find (st, "a");
  g_assert_cmpuint ((guintptr) e->data % 4, !=, 0);
  DiffuseTensor *t = diffuse_safetensors_tensor (st, "a", DIFFUSE_DTYPE_F32, NULL, &err);
  g_assert_no_error (err);
  g_assert_false (diffuse_tensor_is_borrowed (t));
  g_assert_cmpuint ((guintptr) diffuse_tensor_data (t) % 4, ==, 0);
  for (int i = 0; i < 3; i++)
    g_assert_cmpfloat (diffuse_tensor_f32 (t)[i], ==, fv[i]);
  diffuse_tensor_unref (t);
  t = diffuse_safetensors_tensor (st, "a", DIFFUSE_DTYPE_F16, NULL, &err);
  g_assert_no_error (err);
  for (int i = 0; i < 3; i++)
    g_assert_cmphex (((guint16 *) diffuse_tensor_data (t))[i], ==, f16_of_fv[i]);
  diffuse_tensor_unref (t);
  diffuse_safetensors_unref (st);
  g_byte_array_unref (b);
  g_string_free (h, TRUE);
  g_free (hdr);

  /* F16 at an odd address */
  const guint16 hv[3] = { 0x3C00, 0xC000, 0x3555 };
  const float hv_f32[3] = { 1.0f, -2.0f, 0.333251953125f };
  h = g_string_new ("{\"h\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,6]}}");
  while ((8 + h->len) % 2 != 1)
    g_string_append_c (h, ' ');
  b = mkfile (h->str, (gssize) h->len, hv, sizeof hv);
  g_assert_true (g_file_set_contents (path, (const char *) b->data, b->len, NULL));
  st = diffuse_safetensors_open (path, &err);
  g_assert_no_error (err);
  t = diffuse_safetensors_tensor (st, "h", DIFFUSE_DTYPE_F16, diffuse_device_cpu (), &err);
  g_assert_no_error (err);
  g_assert_false (diffuse_tensor_is_borrowed (t));
  g_assert_cmpint (memcmp (diffuse_tensor_data (t), hv, sizeof hv), ==, 0);
  diffuse_tensor_unref (t);
  t = diffuse_safetensors_tensor (st, "h", DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
  g_assert_no_error (err);
  for (int i = 0; i < 3; i++)
    g_assert_cmpfloat (diffuse_tensor_f32 (t)[i], ==, hv_f32[i]);
  diffuse_tensor_unref (t);
  diffuse_safetensors_unref (st);
  g_byte_array_unref (b);
  g_string_free (h, TRUE);
  tu_rm_rf (dir);
  g_free (dir);
  g_free (path);
}

/* ---- writer ------------------------------------------------------------- */

/* Our writer, fed the tensors of Python's file (in reverse name order),
 * writes the same bytes as safetensors.torch.save_file. */
static void
test_writer_matches_python (void)
{
  DiffuseSafetensors *st = tu_open ("safetensors/py_basic.safetensors");
  DiffuseStWriter *w = diffuse_st_writer_new ();
  for (int i = (int) diffuse_safetensors_n_tensors (st) - 1; i >= 0; i--) {
    const DiffuseStEntry *e = diffuse_safetensors_entry (st, (guint) i);
    DiffuseDType dt = e->dtype == DIFFUSE_ST_F16 ? DIFFUSE_DTYPE_F16
                      : e->dtype == DIFFUSE_ST_BF16 ? DIFFUSE_DTYPE_BF16 : DIFFUSE_DTYPE_F32;
    GError *err = NULL;
    DiffuseTensor *t = diffuse_safetensors_tensor (st, e->name, dt, NULL, &err);
    g_assert_no_error (err);
    diffuse_st_writer_add (w, e->name, t);
    diffuse_tensor_unref (t);
  }
  char *dir = tu_mkdtemp ();
  char *out = g_build_filename (dir, "ours.safetensors", NULL);
  GError *err = NULL;
  g_assert_true (diffuse_st_writer_write (w, out, &err));
  g_assert_no_error (err);
  char *ref = tu_fixture ("safetensors/py_basic.safetensors");
  g_assert_true (file_bytes_equal (out, ref));
  /* nothing else left in the folder */
  GHashTable *files = list_dir (dir);
  g_assert_cmpuint (g_hash_table_size (files), ==, 1);
  g_hash_table_unref (files);
  diffuse_st_writer_free (w);
  diffuse_safetensors_unref (st);
  tu_rm_rf (dir);
  g_free (dir);
  g_free (out);
  g_free (ref);
}

/* Write, read back, compare; metadata; replacing a name; a strided view. */
static void
test_writer_roundtrip (void)
{
  int64_t s23[2] = { 2, 3 };
  float v[6] = { 0.5f, -1.0f, 3.25f, 1e-20f, -0.0f, 7e30f };
  DiffuseTensor *a = diffuse_tensor_from_f32 (v, 2, s23);
  DiffuseTensor *b = diffuse_cast (a, DIFFUSE_DTYPE_BF16);
  DiffuseTensor *c = diffuse_cast (a, DIFFUSE_DTYPE_F16);
  int perm[2] = { 1, 0 };
  DiffuseTensor *at = diffuse_permute (a, perm);   /* [3, 2], not contiguous */
  g_assert_false (diffuse_tensor_is_contiguous (at));
  DiffuseStWriter *w = diffuse_st_writer_new ();
  diffuse_st_writer_add (w, "z.first", c);
  diffuse_st_writer_add (w, "b", a);               /* replaced below */
  diffuse_st_writer_add (w, "t", at);
  diffuse_st_writer_add (w, "b", b);
  diffuse_st_writer_add_metadata (w, "note", "h\xc3\xa9llo \"x\"\n\x01");
  char *dir = tu_mkdtemp ();
  char *path = g_build_filename (dir, "rt.safetensors", NULL);
  GError *err = NULL;
  g_assert_true (diffuse_st_writer_write (w, path, &err));
  g_assert_no_error (err);
  diffuse_st_writer_free (w);

  DiffuseSafetensors *st = diffuse_safetensors_open (path, &err);
  g_assert_no_error (err);
  g_assert_cmpuint (diffuse_safetensors_n_tensors (st), ==, 3);
  GHashTable *md = diffuse_safetensors_metadata (st);
  g_assert_cmpuint (g_hash_table_size (md), ==, 2);
  g_assert_cmpstr (g_hash_table_lookup (md, "format"), ==, "pt");
  g_assert_cmpstr (g_hash_table_lookup (md, "note"), ==, "h\xc3\xa9llo \"x\"\n\x01");
  const DiffuseStEntry *e = diffuse_safetensors_find (st, "b");
  g_assert_cmpint (e->dtype, ==, DIFFUSE_ST_BF16);
  g_assert_cmpint (memcmp (e->data, diffuse_tensor_data (b), 12), ==, 0);
  e = diffuse_safetensors_find (st, "z.first");
  g_assert_cmpint (e->dtype, ==, DIFFUSE_ST_F16);
  g_assert_cmpint (memcmp (e->data, diffuse_tensor_data (c), 12), ==, 0);
  e = diffuse_safetensors_find (st, "t");
  g_assert_cmpint (e->dtype, ==, DIFFUSE_ST_F32);
  g_assert_cmpint (e->ndim, ==, 2);
  g_assert_cmpint (e->shape[0], ==, 3);
  g_assert_cmpint (e->shape[1], ==, 2);
  const float tv[6] = { 0.5f, 1e-20f, -1.0f, -0.0f, 3.25f, 7e30f };
  g_assert_cmpint (memcmp (e->data, tv, sizeof tv), ==, 0);
  /* data layout like the Rust writer: F32 first, then BF16, then F16 */
  const DiffuseStEntry *eb = diffuse_safetensors_find (st, "b"), *ez = diffuse_safetensors_find (st, "z.first");
  g_assert_true (e->data < (const void *) eb->data && eb->data < (const void *) ez->data);
  diffuse_safetensors_unref (st);

  /* overwrite the same path: atomic replace, no temp files left */
  w = diffuse_st_writer_new ();
  diffuse_st_writer_add (w, "only", a);
  g_assert_true (diffuse_st_writer_write (w, path, &err));
  diffuse_st_writer_free (w);
  st = diffuse_safetensors_open (path, &err);
  g_assert_no_error (err);
  g_assert_cmpuint (diffuse_safetensors_n_tensors (st), ==, 1);
  diffuse_safetensors_unref (st);
  GHashTable *files = list_dir (dir);
  g_assert_cmpuint (g_hash_table_size (files), ==, 1);
  g_hash_table_unref (files);

  /* an empty writer: a valid file with only the metadata */
  w = diffuse_st_writer_new ();
  g_assert_true (diffuse_st_writer_write (w, path, &err));
  diffuse_st_writer_free (w);
  char *data;
  gsize len;
  g_assert_true (g_file_get_contents (path, &data, &len, NULL));
  g_assert_cmpuint (len, ==, 8 + 32);
  g_assert_cmpint (memcmp (data + 8, "{\"__metadata__\":{\"format\":\"pt\"}}       ", 32), ==, 0);
  g_free (data);

  /* a folder that does not exist: IO error, nothing created */
  char *bad = g_build_filename (dir, "nope", "x.safetensors", NULL);
  w = diffuse_st_writer_new ();
  diffuse_st_writer_add (w, "a", a);
  g_assert_false (diffuse_st_writer_write (w, bad, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_IO);
  g_assert_nonnull (strstr (err->message, bad));
  g_clear_error (&err);
  diffuse_st_writer_free (w);
  g_free (bad);

  diffuse_tensor_unref (a);
  diffuse_tensor_unref (b);
  diffuse_tensor_unref (c);
  diffuse_tensor_unref (at);
  tu_rm_rf (dir);
  g_free (dir);
  g_free (path);
}

/* A failed write (file size limit: EFBIG, as a full disk would) leaves the
 * old file untouched and no temp file. */
static void
test_writer_failure_atomic (void)
{
  if (g_test_subprocess ()) {
    const char *dir = g_getenv ("ST_TEST_DIR");
    char *path = g_build_filename (dir, "x.safetensors", NULL);
    int64_t small = 4, big = 64 * 1024;
    DiffuseTensor *ts = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 1, &small);
    DiffuseTensor *tb = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 1, &big);
    DiffuseStWriter *w = diffuse_st_writer_new ();
    diffuse_st_writer_add (w, "small", ts);
    GError *err = NULL;
    g_assert_true (diffuse_st_writer_write (w, path, &err));
    diffuse_st_writer_free (w);
    char *before;
    gsize before_len;
    g_assert_true (g_file_get_contents (path, &before, &before_len, NULL));

    signal (SIGXFSZ, SIG_IGN);
    struct rlimit rl = { 16 * 1024, 16 * 1024 };
    g_assert_cmpint (setrlimit (RLIMIT_FSIZE, &rl), ==, 0);
    w = diffuse_st_writer_new ();
    diffuse_st_writer_add (w, "big", tb);
    g_assert_false (diffuse_st_writer_write (w, path, &err));
    g_assert_nonnull (err);
    g_assert_true (err->code == DIFFUSE_ERROR_IO || err->code == DIFFUSE_ERROR_DISK_FULL);
    g_assert_nonnull (strstr (err->message, path));
    g_clear_error (&err);
    g_assert_false (diffuse_st_writer_write_sharded (w, dir, "m", NULL, 0, &err));
    g_clear_error (&err);
    diffuse_st_writer_free (w);
    /* sharded [[small], [big], [small2]]: shard 1 is written, shard 2
     * fails, and shard 1 is removed again */
    w = diffuse_st_writer_new ();
    diffuse_st_writer_add (w, "small", ts);
    diffuse_st_writer_add (w, "small2", ts);
    diffuse_st_writer_add (w, "big", tb);
    g_assert_false (diffuse_st_writer_write_sharded (w, dir, "m", NULL, 20, &err));
    g_assert_nonnull (strstr (err->message, "m-00002-of-00003.safetensors"));
    g_clear_error (&err);
    diffuse_st_writer_free (w);

    GHashTable *files = list_dir (dir);
    g_assert_cmpuint (g_hash_table_size (files), ==, 1);
    g_assert_true (g_hash_table_contains (files, "x.safetensors"));
    g_hash_table_unref (files);
    char *after;
    gsize after_len;
    g_assert_true (g_file_get_contents (path, &after, &after_len, NULL));
    g_assert_cmpuint (after_len, ==, before_len);
    g_assert_cmpint (memcmp (before, after, before_len), ==, 0);
    g_free (before);
    g_free (after);
    g_free (path);
    diffuse_tensor_unref (ts);
    diffuse_tensor_unref (tb);
    return;
  }
  char *dir = tu_mkdtemp ();
  g_setenv ("ST_TEST_DIR", dir, TRUE);
  g_test_trap_subprocess (NULL, 0, G_TEST_SUBPROCESS_INHERIT_STDERR);
  g_test_trap_assert_passed ();
  tu_rm_rf (dir);
  g_free (dir);
}

/* huggingface_hub's shard assignment and diffusers' index text. */
static void
test_shard_rule (void)
{
  JsonNode *root = load_fixture_json ("safetensors/shard_rule.json");
  JsonObject *o = json_node_get_object (root);
  JsonArray *sizes = json_object_get_array_member (o, "sizes");
  DiffuseStWriter *w = diffuse_st_writer_new ();
  for (guint i = 0; i < json_array_get_length (sizes); i++) {
    JsonArray *p = json_array_get_array_element (sizes, i);
    int64_t n = json_array_get_int_element (p, 1);
    DiffuseTensor *t = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 1, &n);
    diffuse_st_writer_add (w, json_array_get_string_element (p, 0), t);
    diffuse_tensor_unref (t);
  }
  char *dir = tu_mkdtemp ();
  /* stale files of an earlier save that the new one must remove */
  char *stale = g_build_filename (dir, "diffusion_pytorch_model.fp16-00001-of-00009.safetensors", NULL);
  char *stale_single = g_build_filename (dir, "diffusion_pytorch_model.fp16.safetensors", NULL);
  char *other = g_build_filename (dir, "other-00001-of-00002.safetensors", NULL);
  g_assert_true (g_file_set_contents (stale, "x", 1, NULL));
  g_assert_true (g_file_set_contents (stale_single, "x", 1, NULL));
  g_assert_true (g_file_set_contents (other, "x", 1, NULL));

  GError *err = NULL;
  g_assert_true (diffuse_st_writer_write_sharded (w, dir, "diffusion_pytorch_model", "fp16",
                                                  (guint64) json_object_get_int_member (o, "max_shard_size"), &err));
  g_assert_no_error (err);
  char *ipath = g_build_filename (dir, "diffusion_pytorch_model.safetensors.index.fp16.json", NULL);
  char *itext;
  g_assert_true (g_file_get_contents (ipath, &itext, NULL, NULL));
  g_assert_cmpstr (itext, ==, json_object_get_string_member (o, "index_text"));
  g_free (itext);

  JsonObject *f2t = json_object_get_object_member (o, "filename_to_tensors");
  GHashTable *files = list_dir (dir);
  g_assert_cmpuint (g_hash_table_size (files), ==, json_object_get_size (f2t) + 2);   /* + index + other */
  g_assert_true (g_hash_table_contains (files, "other-00001-of-00002.safetensors"));
  g_assert_false (g_file_test (stale, G_FILE_TEST_EXISTS));
  g_assert_false (g_file_test (stale_single, G_FILE_TEST_EXISTS));
  GList *fl = json_object_get_members (f2t);
  for (GList *l = fl; l; l = l->next) {
    char *p = g_build_filename (dir, l->data, NULL);
    DiffuseSafetensors *st = diffuse_safetensors_open (p, &err);
    g_assert_no_error (err);
    JsonArray *names = json_object_get_array_member (f2t, l->data);
    g_assert_cmpuint (diffuse_safetensors_n_tensors (st), ==, json_array_get_length (names));
    for (guint i = 0; i < json_array_get_length (names); i++)
      g_assert_nonnull (diffuse_safetensors_find (st, json_array_get_string_element (names, i)));
    diffuse_safetensors_unref (st);
    g_free (p);
  }
  g_list_free (fl);
  g_hash_table_unref (files);

  /* the whole set reads back through the index */
  DiffuseWeights *wt = diffuse_weights_open_index (ipath, &err);
  g_assert_no_error (err);
  guint n;
  const char **names = diffuse_weights_names (wt, &n);
  g_assert_cmpuint (n, ==, json_array_get_length (sizes));
  g_assert_cmpstr (names[0], ==, "a");
  g_assert_null (names[n]);
  g_free (names);
  g_assert_cmpuint (diffuse_weights_file_bytes (wt), ==, 324);
  diffuse_weights_unref (wt);

  /* rewritten without a limit: one file, the shards and index removed */
  g_assert_true (diffuse_st_writer_write_sharded (w, dir, "diffusion_pytorch_model", "fp16", 0, &err));
  g_assert_no_error (err);
  files = list_dir (dir);
  g_assert_cmpuint (g_hash_table_size (files), ==, 2);
  g_assert_true (g_hash_table_contains (files, "diffusion_pytorch_model.fp16.safetensors"));
  g_hash_table_unref (files);
  /* no variant, limit large enough */
  g_assert_true (diffuse_st_writer_write_sharded (w, dir, "model", NULL, 1000, &err));
  g_assert_true (g_file_test (dir, G_FILE_TEST_IS_DIR));
  char *single = g_build_filename (dir, "model.safetensors", NULL);
  g_assert_true (g_file_test (single, G_FILE_TEST_EXISTS));
  g_free (single);

  diffuse_st_writer_free (w);
  json_node_unref (root);
  tu_rm_rf (dir);
  g_free (dir);
  g_free (ipath);
  g_free (stale);
  g_free (stale_single);
  g_free (other);
}

/* ---- shards written by diffusers ---------------------------------------- */

static DiffuseWeights *
open_py_unet (void)
{
  char *ipath = tu_fixture ("safetensors/py_unet/diffusion_pytorch_model.safetensors.index.fp16.json");
  GError *err = NULL;
  DiffuseWeights *w = diffuse_weights_open_index (ipath, &err);
  g_assert_no_error (err);
  g_free (ipath);
  return w;
}

static void
test_python_unet_sharded (void)
{
  JsonNode *root = load_fixture_json ("safetensors/py_unet.json");
  JsonObject *o = json_node_get_object (root);
  JsonObject *tens = json_object_get_object_member (o, "tensors");
  DiffuseWeights *w = open_py_unet ();
  guint n;
  const char **names = diffuse_weights_names (w, &n);
  g_assert_cmpuint (n, ==, json_object_get_size (tens));
  g_free (names);
  g_assert_nonnull (strstr (diffuse_weights_describe (w), "00003-of-00003"));
  guint64 total = 0;
  GList *keys = json_object_get_members (tens);
  for (GList *l = keys; l; l = l->next) {
    const char *name = l->data;
    JsonObject *te = json_object_get_object_member (tens, name);
    g_assert_true (diffuse_weights_has (w, name));
    const DiffuseStEntry *e = diffuse_weights_entry (w, name);
    g_assert_cmpint (e->dtype, ==, DIFFUSE_ST_F16);
    total += e->nbytes;
    GError *err = NULL;
    DiffuseTensor *t = diffuse_weights_get (w, name, DIFFUSE_DTYPE_F16, diffuse_device_cpu (), &err);
    g_assert_no_error (err);
    g_assert_true (diffuse_tensor_is_borrowed (t));
    JsonArray *shape = json_object_get_array_member (te, "shape");
    g_assert_cmpint (t->ndim, ==, json_array_get_length (shape));
    for (int d = 0; d < t->ndim; d++)
      g_assert_cmpint (t->shape[d], ==, json_array_get_int_element (shape, d));
    JsonArray *first = json_object_get_array_member (te, "first");
    const guint16 *h = diffuse_tensor_data (t);
    for (guint i = 0; i < json_array_get_length (first); i++)
      g_assert_cmphex (h[i], ==, (guint16) json_array_get_int_element (first, i));
    diffuse_tensor_unref (t);
    /* f32 copy: the float64 sum of f16 values is exact in any order */
    t = diffuse_weights_get (w, name, DIFFUSE_DTYPE_F32, NULL, &err);
    g_assert_no_error (err);
    g_assert_false (diffuse_tensor_is_borrowed (t));
    double sum = 0;
    for (int64_t i = 0; i < diffuse_tensor_numel (t); i++)
      sum += diffuse_tensor_f32 (t)[i];
    g_assert_cmpfloat (sum, ==, json_object_get_double_member (te, "sum"));
    diffuse_tensor_unref (t);
  }
  g_list_free (keys);
  g_assert_cmpuint (total, ==, diffuse_weights_file_bytes (w));

  GError *err = NULL;
  DiffuseTensor *t = diffuse_weights_get (w, "no.such.weight", DIFFUSE_DTYPE_F32, NULL, &err);
  g_assert_null (t);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, "no.such.weight"));
  g_assert_nonnull (strstr (err->message, "index.fp16.json"));
  g_clear_error (&err);
  g_assert_null (diffuse_weights_entry (w, "no.such.weight"));
  diffuse_weights_unref (w);
  json_node_unref (root);
}

/* Our sharded writer fed the UNet's tensors in state_dict order writes the
 * same files as diffusers' save_pretrained. */
static void
write_unet_shards (const char *dir, DiffuseWeights *w, JsonObject *o)
{
  DiffuseStWriter *wr = diffuse_st_writer_new ();
  JsonArray *order = json_object_get_array_member (o, "order");
  for (guint i = 0; i < json_array_get_length (order); i++) {
    const char *name = json_array_get_string_element (order, i);
    GError *err = NULL;
    DiffuseTensor *t = diffuse_weights_get (w, name, DIFFUSE_DTYPE_F16, NULL, &err);
    g_assert_no_error (err);
    diffuse_st_writer_add (wr, name, t);
    diffuse_tensor_unref (t);
  }
  GError *err = NULL;
  g_assert_true (diffuse_st_writer_write_sharded (wr, dir, json_object_get_string_member (o, "prefix"),
                                                  json_object_get_string_member (o, "variant"),
                                                  (guint64) json_object_get_int_member (o, "max_shard_size"), &err));
  g_assert_no_error (err);
  diffuse_st_writer_free (wr);
}

static void
test_writer_matches_diffusers_shards (void)
{
  JsonNode *root = load_fixture_json ("safetensors/py_unet.json");
  JsonObject *o = json_node_get_object (root);
  DiffuseWeights *w = open_py_unet ();
  char *dir = tu_mkdtemp ();
  write_unet_shards (dir, w, o);
  JsonArray *files = json_object_get_array_member (o, "files");
  GHashTable *got = list_dir (dir);
  g_assert_cmpuint (g_hash_table_size (got), ==, json_array_get_length (files) - 1);   /* no config.json */
  for (guint i = 0; i < json_array_get_length (files); i++) {
    const char *f = json_array_get_string_element (files, i);
    if (strcmp (f, "config.json") == 0)
      continue;
    g_assert_true (g_hash_table_contains (got, f));
    char *a = g_build_filename (dir, f, NULL);
    char *rel = g_build_filename ("safetensors", "py_unet", f, NULL);
    char *b = tu_fixture (rel);
    if (!file_bytes_equal (a, b))
      g_error ("%s differs from diffusers' file", f);
    g_free (a);
    g_free (b);
    g_free (rel);
  }
  g_hash_table_unref (got);
  diffuse_weights_unref (w);
  json_node_unref (root);
  tu_rm_rf (dir);
  g_free (dir);
}

/* ---- DiffuseWeights errors ---------------------------------------------- */

static void
copy_file (const char *from, const char *to)
{
  char *d;
  gsize l;
  g_assert_true (g_file_get_contents (from, &d, &l, NULL));
  g_assert_true (g_file_set_contents (to, d, (gssize) l, NULL));
  g_free (d);
}

static void
test_weights_errors (void)
{
  char *dir = tu_mkdtemp ();
  char *src = tu_fixture ("safetensors/py_unet");
  GDir *d = g_dir_open (src, 0, NULL);
  const char *n;
  while ((n = g_dir_read_name (d))) {
    char *a = g_build_filename (src, n, NULL), *b = g_build_filename (dir, n, NULL);
    copy_file (a, b);
    g_free (a);
    g_free (b);
  }
  g_dir_close (d);
  char *ipath = g_build_filename (dir, "diffusion_pytorch_model.safetensors.index.fp16.json", NULL);
  char *shard2 = g_build_filename (dir, "diffusion_pytorch_model.fp16-00002-of-00003.safetensors", NULL);
  char *saved = g_strconcat (shard2, ".saved", NULL);
  GError *err = NULL;

  /* missing shard */
  g_assert_cmpint (g_rename (shard2, saved), ==, 0);
  DiffuseWeights *w = diffuse_weights_open_index (ipath, &err);
  g_assert_null (w);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, ipath));
  g_assert_nonnull (strstr (err->message, "fp16-00002-of-00003.safetensors"));
  g_test_message ("%s", err->message);
  g_clear_error (&err);

  /* two shards holding the same tensors: shard 3 in the place of shard 2 */
  char *shard3 = g_build_filename (dir, "diffusion_pytorch_model.fp16-00003-of-00003.safetensors", NULL);
  copy_file (shard3, shard2);
  w = diffuse_weights_open_index (ipath, &err);
  g_assert_null (w);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT);
  g_assert_nonnull (strstr (err->message, "fp16-00002-of-00003.safetensors"));
  g_assert_nonnull (strstr (err->message, "fp16-00003-of-00003.safetensors"));
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  g_assert_cmpint (g_rename (saved, shard2), ==, 0);

  /* a tensor the index lists that its shard does not hold */
  {
    char *itext;
    g_assert_true (g_file_get_contents (ipath, &itext, NULL, NULL));
    char **parts = g_strsplit (itext, "\"weight_map\": {", 2);
    g_assert_nonnull (parts[1]);
    char *mod = g_strconcat (parts[0], "\"weight_map\": {\n    \"extra.tensor\": "
                             "\"diffusion_pytorch_model.fp16-00001-of-00003.safetensors\",", parts[1], NULL);
    char *mpath = g_build_filename (dir, "extra.index.json", NULL);
    g_assert_true (g_file_set_contents (mpath, mod, -1, NULL));
    w = diffuse_weights_open_index (mpath, &err);
    g_assert_null (w);
    g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT);
    g_assert_nonnull (strstr (err->message, mpath));
    g_assert_nonnull (strstr (err->message, "\"extra.tensor\""));
    g_assert_nonnull (strstr (err->message, "fp16-00001-of-00003.safetensors"));
    g_test_message ("%s", err->message);
    g_clear_error (&err);
    g_free (mpath);
    g_free (mod);
    g_strfreev (parts);
    g_free (itext);
  }

  /* a corrupt shard: CORRUPT naming index and shard */
  {
    char *data;
    gsize len;
    g_assert_true (g_file_get_contents (shard2, &data, &len, NULL));
    g_assert_true (g_file_set_contents (saved, data, (gssize) len, NULL));
    g_assert_true (g_file_set_contents (shard2, data, (gssize) len - 1, NULL));
    g_free (data);
    w = diffuse_weights_open_index (ipath, &err);
    g_assert_null (w);
    g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT);
    g_assert_nonnull (strstr (err->message, "fp16-00002-of-00003.safetensors"));
    g_clear_error (&err);
    g_assert_cmpint (g_rename (saved, shard2), ==, 0);
  }

  /* the set opens again */
  w = diffuse_weights_open_index (ipath, &err);
  g_assert_no_error (err);
  diffuse_weights_unref (w);

  /* bad index files */
  static const struct { const char *text; int code; } bad[] = {
    { "{", DIFFUSE_ERROR_CORRUPT },
    { "[]", DIFFUSE_ERROR_CORRUPT },
    { "{\"metadata\": {}}", DIFFUSE_ERROR_CORRUPT },
    { "{\"weight_map\": []}", DIFFUSE_ERROR_CORRUPT },
    { "{\"weight_map\": {\"a\": 3}}", DIFFUSE_ERROR_CORRUPT },
    { "{\"weight_map\": {\"a\": \"../x.safetensors\"}}", DIFFUSE_ERROR_CORRUPT },
    { "{\"weight_map\": {\"a\": \"/etc/passwd\"}}", DIFFUSE_ERROR_CORRUPT },
    { "{\"weight_map\": {\"a\": \"missing.safetensors\"}}", DIFFUSE_ERROR_NOT_FOUND },
  };
  char *bpath = g_build_filename (dir, "bad.index.json", NULL);
  for (guint i = 0; i < G_N_ELEMENTS (bad); i++) {
    g_assert_true (g_file_set_contents (bpath, bad[i].text, -1, NULL));
    w = diffuse_weights_open_index (bpath, &err);
    g_assert_null (w);
    g_assert_error (err, DIFFUSE_ERROR, bad[i].code);
    g_assert_nonnull (strstr (err->message, bpath));
    g_clear_error (&err);
  }
  w = diffuse_weights_open_index ("/nonexistent/x.index.json", &err);
  g_assert_null (w);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_clear_error (&err);
  /* an empty weight_map is an empty set */
  g_assert_true (g_file_set_contents (bpath, "{\"weight_map\": {}}", -1, NULL));
  w = diffuse_weights_open_index (bpath, &err);
  g_assert_no_error (err);
  guint nn;
  const char **names = diffuse_weights_names (w, &nn);
  g_assert_cmpuint (nn, ==, 0);
  g_assert_null (names[0]);
  g_free (names);
  diffuse_weights_unref (w);

  /* diffuse_weights_open over a list; a name in two files is an error */
  char *s1 = g_build_filename (dir, "diffusion_pytorch_model.fp16-00001-of-00003.safetensors", NULL);
  const char *paths[] = { s1, shard2, shard3, NULL };
  w = diffuse_weights_open (paths, &err);
  g_assert_no_error (err);
  DiffuseWeights *ref = open_py_unet ();
  guint n1, n2;
  const char **a = diffuse_weights_names (w, &n1), **b = diffuse_weights_names (ref, &n2);
  g_assert_cmpuint (n1, ==, n2);
  for (guint i = 0; i < n1; i++)
    g_assert_cmpstr (a[i], ==, b[i]);
  g_free (a);
  g_free (b);
  g_assert_cmpuint (diffuse_weights_file_bytes (w), ==, diffuse_weights_file_bytes (ref));
  g_assert_true (diffuse_weights_ref (w) == w);
  diffuse_weights_unref (w);
  diffuse_weights_unref (w);
  diffuse_weights_unref (ref);
  const char *dup[] = { s1, shard2, s1, NULL };
  w = diffuse_weights_open (dup, &err);
  g_assert_null (w);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT);
  g_assert_nonnull (strstr (err->message, s1));
  g_clear_error (&err);
  const char *missing[] = { s1, "/nonexistent.safetensors", NULL };
  w = diffuse_weights_open (missing, &err);
  g_assert_null (w);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_clear_error (&err);

  g_free (s1);
  g_free (bpath);
  g_free (shard3);
  g_free (shard2);
  g_free (saved);
  g_free (ipath);
  g_free (src);
  tu_rm_rf (dir);
  g_free (dir);
}

/* ---- files our writer made, as Python read them ------------------------- */

static const float ours_a[6] = { -1.875f, -1.125f, -0.375f, 0.375f, 1.125f, 1.875f };
static const guint16 ours_b16[4] = { 0x3C00, 0xC000, 0x7BFF, 0x0001 };
static const guint16 ours_c16[3] = { 0x3F80, 0xBF00, 0x4049 };
static const float ours_s = -7.25f;
static const char *ours_note = "\xc3\xbcn\xc3\xaf" "c\xc3\xb6" "d\xc3\xa9 \"quoted\"\n\\ \xf0\x9f\x98\x80";

static void
write_ours (const char *dir)
{
  GError *err = NULL;
  /* basic.safetensors: only {"format": "pt"}, so Python's save_file must
   * give the same bytes */
  DiffuseStWriter *w = diffuse_st_writer_new ();
  int64_t s23[2] = { 2, 3 }, s4 = 4, s3 = 3, s30[2] = { 3, 0 }, s4d[4] = { 3, 1, 2, 2 };
  DiffuseTensor *t = new_tensor_bits (DIFFUSE_DTYPE_F32, 2, s23, ours_a);
  diffuse_st_writer_add (w, "a.f32", t);
  diffuse_tensor_unref (t);
  t = new_tensor_bits (DIFFUSE_DTYPE_F16, 1, &s4, ours_b16);
  diffuse_st_writer_add (w, "b.f16", t);
  diffuse_tensor_unref (t);
  t = new_tensor_bits (DIFFUSE_DTYPE_BF16, 1, &s3, ours_c16);
  diffuse_st_writer_add (w, "c.bf16", t);
  diffuse_tensor_unref (t);
  t = new_tensor_bits (DIFFUSE_DTYPE_F32, 0, NULL, &ours_s);
  diffuse_st_writer_add (w, "scalar", t);
  diffuse_tensor_unref (t);
  t = new_tensor_bits (DIFFUSE_DTYPE_F16, 2, s30, NULL);
  diffuse_st_writer_add (w, "empty.f16", t);
  diffuse_tensor_unref (t);
  float m[12];
  for (int i = 0; i < 12; i++)
    m[i] = (float) i * 0.125f - 0.5f;
  t = new_tensor_bits (DIFFUSE_DTYPE_F32, 4, s4d, m);
  diffuse_st_writer_add (w, "m.4d", t);
  diffuse_tensor_unref (t);
  char *p = g_build_filename (dir, "basic.safetensors", NULL);
  g_assert_true (diffuse_st_writer_write (w, p, &err));
  g_assert_no_error (err);
  g_free (p);
  diffuse_st_writer_free (w);

  /* meta.safetensors: extra metadata */
  w = diffuse_st_writer_new ();
  t = new_tensor_bits (DIFFUSE_DTYPE_F32, 2, s23, ours_a);
  diffuse_st_writer_add (w, "x", t);
  diffuse_tensor_unref (t);
  diffuse_st_writer_add_metadata (w, "note", ours_note);
  diffuse_st_writer_add_metadata (w, "author", "gst-diffuse");
  p = g_build_filename (dir, "meta.safetensors", NULL);
  g_assert_true (diffuse_st_writer_write (w, p, &err));
  g_assert_no_error (err);
  g_free (p);
  diffuse_st_writer_free (w);

  /* unet/: the tiny UNet as diffusers would save it (config re-saved by
   * diffuse_config_save, weights by the sharded writer) */
  char *udir = g_build_filename (dir, "unet", NULL);
  g_assert_cmpint (g_mkdir_with_parents (udir, 0755), ==, 0);
  char *cfgp = tu_fixture ("safetensors/py_unet/config.json");
  DiffuseConfig *cfg = diffuse_config_load (cfgp, &err);
  g_assert_no_error (err);
  p = g_build_filename (udir, "config.json", NULL);
  g_assert_true (diffuse_config_save (cfg, p, &err));
  g_assert_no_error (err);
  g_free (p);
  diffuse_config_unref (cfg);
  g_free (cfgp);
  JsonNode *root = load_fixture_json ("safetensors/py_unet.json");
  DiffuseWeights *uw = open_py_unet ();
  write_unet_shards (udir, uw, json_node_get_object (root));
  diffuse_weights_unref (uw);
  json_node_unref (root);
  g_free (udir);
}

static void
compare_dirs (const char *got, const char *want)
{
  GHashTable *a = list_dir (got), *b = list_dir (want);
  GHashTableIter it;
  gpointer k;
  g_hash_table_iter_init (&it, b);
  while (g_hash_table_iter_next (&it, &k, NULL)) {
    char *pw = g_build_filename (want, k, NULL);
    if (g_file_test (pw, G_FILE_TEST_IS_DIR)) {
      char *pg = g_build_filename (got, k, NULL);
      compare_dirs (pg, pw);
      g_free (pg);
    } else if (g_str_has_suffix (k, ".safetensors") || g_str_has_suffix (k, ".json")) {
      if (strcmp (k, "roundtrip_result.json") != 0) {
        g_assert_true (g_hash_table_contains (a, k));
        char *pg = g_build_filename (got, k, NULL);
        if (!file_bytes_equal (pg, pw))
          g_error ("our writer's output %s no longer matches the committed %s", pg, pw);
        g_free (pg);
      }
    }
    g_free (pw);
  }
  g_hash_table_unref (a);
  g_hash_table_unref (b);
}

static void
test_ours_write (void)
{
  const char *dir = g_getenv ("DIFFUSE_ST_WRITE_OURS");
  if (!dir) {
    g_test_skip ("set DIFFUSE_ST_WRITE_OURS=<dir> to regenerate tests/fixtures/safetensors/ours");
    return;
  }
  g_assert_cmpint (g_mkdir_with_parents (dir, 0755), ==, 0);
  write_ours (dir);
}

static void
check_result_bits (JsonObject *tens, const char *name, const char *dtype, const void *vals, guint n, guint esz)
{
  JsonObject *te = json_object_get_object_member (tens, name);
  g_assert_nonnull (te);
  g_assert_cmpstr (json_object_get_string_member (te, "dtype"), ==, dtype);
  JsonArray *bits = json_object_get_array_member (te, "bits");
  g_assert_cmpuint (json_array_get_length (bits), ==, n);
  for (guint i = 0; i < n; i++)
    g_assert_cmphex ((guint64) json_array_get_int_element (bits, i), ==, elem_bits ((const guint8 *) vals + i * esz,
                                                                                     esz));
}

static void
test_ours_python_roundtrip (void)
{
  if (!tu_have_fixture ("safetensors/ours/roundtrip_result.json"))
    return;
  /* 1. what Python read from our files is what we wrote */
  JsonNode *root = load_fixture_json ("safetensors/ours/roundtrip_result.json");
  JsonObject *o = json_node_get_object (root);
  g_assert_true (json_object_get_boolean_member (o, "basic_byte_identical_to_save_file"));
  g_assert_true (json_object_get_boolean_member (o, "unet_loaded_by_from_pretrained"));
  g_assert_true (json_object_get_boolean_member (o, "unet_state_dict_equal_to_reference"));
  g_assert_true (json_object_get_boolean_member (o, "unet_files_identical_to_save_pretrained"));
  g_assert_true (json_object_get_boolean_member (o, "config_identical_to_save_pretrained"));
  g_assert_cmpint (json_object_get_int_member (o, "unet_n_tensors"), >, 100);
  JsonObject *tens = json_object_get_object_member (o, "basic");
  g_assert_cmpuint (json_object_get_size (tens), ==, 6);
  check_result_bits (tens, "a.f32", "F32", ours_a, 6, 4);
  check_result_bits (tens, "b.f16", "F16", ours_b16, 4, 2);
  check_result_bits (tens, "c.bf16", "BF16", ours_c16, 3, 2);
  check_result_bits (tens, "scalar", "F32", &ours_s, 1, 4);
  check_result_bits (tens, "empty.f16", "F16", NULL, 0, 2);
  float m[12];
  for (int i = 0; i < 12; i++)
    m[i] = (float) i * 0.125f - 0.5f;
  check_result_bits (tens, "m.4d", "F32", m, 12, 4);
  JsonArray *shape = json_object_get_array_member (json_object_get_object_member (tens, "m.4d"), "shape");
  g_assert_cmpint (json_array_get_length (shape), ==, 4);
  g_assert_cmpint (json_array_get_int_element (shape, 0), ==, 3);
  g_assert_cmpint (json_array_get_length (json_object_get_array_member (
                     json_object_get_object_member (tens, "scalar"), "shape")), ==, 0);
  JsonObject *md = json_object_get_object_member (o, "meta_metadata");
  g_assert_cmpuint (json_object_get_size (md), ==, 3);
  g_assert_cmpstr (json_object_get_string_member (md, "format"), ==, "pt");
  g_assert_cmpstr (json_object_get_string_member (md, "author"), ==, "gst-diffuse");
  g_assert_cmpstr (json_object_get_string_member (md, "note"), ==, ours_note);
  json_node_unref (root);

  /* 2. our writer still produces exactly those files */
  char *dir = tu_mkdtemp ();
  write_ours (dir);
  char *want = tu_fixture ("safetensors/ours");
  compare_dirs (dir, want);
  g_free (want);
  tu_rm_rf (dir);
  g_free (dir);
}

/* diffuse_weights_new_patched: named tensors replaced, the rest the base's own
 * (the same objects), and a patch over a patched set keeps the first patches */
static void
test_weights_patched (void)
{
  GError *err = NULL;
  char *path = tu_fixture ("pipelines/tiny-sd/vae/diffusion_pytorch_model.safetensors");
  const char *paths[] = { path, NULL };
  DiffuseWeights *base = diffuse_weights_open (paths, &err);
  g_assert_no_error (err);
  guint n = 0;
  const char **names = diffuse_weights_names (base, &n);
  g_assert_cmpuint (n, >=, 2);
  const char *a = names[0], *b = names[1];
  DiffuseTensor *ta = diffuse_weights_get (base, a, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
  DiffuseTensor *tb = diffuse_weights_get (base, b, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
  g_assert_no_error (err);
  DiffuseTensor *pa = diffuse_scale (ta, 2.0f, 1.0f), *pb = diffuse_scale (tb, -1.0f, 0.0f);
  GHashTable *p1 = g_hash_table_new (g_str_hash, g_str_equal), *p2 = g_hash_table_new (g_str_hash, g_str_equal);
  g_hash_table_insert (p1, (gpointer) a, pa);
  g_hash_table_insert (p2, (gpointer) b, pb);
  DiffuseWeights *w1 = diffuse_weights_new_patched (base, p1, "one");
  DiffuseWeights *w2 = diffuse_weights_new_patched (w1, p2, "two");
  g_assert_true (diffuse_weights_has (w2, a) && diffuse_weights_entry (w2, b) == diffuse_weights_entry (base, b));
  DiffuseTensor *ga = diffuse_weights_get (w2, a, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
  DiffuseTensor *gb = diffuse_weights_get (w2, b, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
  DiffuseTensor *g1b = diffuse_weights_get (w1, b, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
  g_assert_no_error (err);
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (ga, pa), ==, 0.0);
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (gb, pb), ==, 0.0);
  g_assert_true (g1b == tb);   /* unpatched: the base's own tensor */
  DiffuseTensor *all[] = { ta, tb, pa, pb, ga, gb, g1b };
  for (guint i = 0; i < G_N_ELEMENTS (all); i++)
    diffuse_tensor_unref (all[i]);
  diffuse_weights_unref (w2);
  diffuse_weights_unref (w1);
  g_hash_table_unref (p1);
  g_hash_table_unref (p2);
  g_free (names);
  diffuse_weights_unref (base);
  g_free (path);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/safetensors/python/basic", test_python_basic);
  g_test_add_func ("/safetensors/python/misc", test_python_misc);
  g_test_add_func ("/safetensors/python/unet-sharded", test_python_unet_sharded);
  g_test_add_func ("/safetensors/read/not-found", test_not_found);
  g_test_add_func ("/safetensors/read/borrow-lifetime", test_borrow_lifetime);
  g_test_add_func ("/safetensors/read/corrupt", test_corrupt);
  g_test_add_func ("/safetensors/read/valid-variants", test_valid_variants);
  g_test_add_func ("/safetensors/read/unaligned", test_unaligned);
  g_test_add_func ("/safetensors/write/matches-save-file", test_writer_matches_python);
  g_test_add_func ("/safetensors/write/roundtrip", test_writer_roundtrip);
  g_test_add_func ("/safetensors/write/failure-atomic", test_writer_failure_atomic);
  g_test_add_func ("/safetensors/write/shard-rule", test_shard_rule);
  g_test_add_func ("/safetensors/write/matches-save-pretrained", test_writer_matches_diffusers_shards);
  g_test_add_func ("/safetensors/weights/errors", test_weights_errors);
  g_test_add_func ("/safetensors/weights/patched", test_weights_patched);
  g_test_add_func ("/safetensors/ours/write", test_ours_write);
  g_test_add_func ("/safetensors/ours/python-roundtrip", test_ours_python_roundtrip);
  return g_test_run ();
}

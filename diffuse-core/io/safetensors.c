/* gst-diffuse — safetensors reader: mmap + a strict header parser.
 * PyTorch checkpoints (torch.save zip archives, see torch_pickle.c) open
 * through the same handle: their entries point into the mapping as well.
 *
 * The header is parsed by a small dedicated JSON reader (not json-glib) so
 * that every rule of the format can be enforced exactly: duplicate keys,
 * unknown fields, integers that are not plain non-negative integers, lone
 * surrogates in escapes, ...  The validation follows the reference Rust
 * crate (safetensors/src/tensor.rs, Metadata::validate and read_metadata):
 * entries sorted by data_offsets must tile the data buffer from 0 to its
 * end, with (end - begin) == prod(shape) * dtype size, computed with
 * overflow checks.  We are stricter than the crate in two places (on
 * purpose): unknown fields in an entry and duplicate keys are rejected. */
#include "io/io-private.h"

#include <diffuse/safetensors.h>
#include <diffuse/error.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER (100u * 1000u * 1000u)   /* the crate's MAX_HEADER_SIZE */
#define ST_MAX_DIMS 8

struct _DiffuseSafetensors {
  gint ref_count;
  char *path;               /* or the label of an in-memory buffer */
  guint8 *base;             /* whole file */
  size_t len;
  gboolean mapped;          /* munmap vs g_free */
  const guint8 *data;       /* data buffer: base + 8 + N */
  size_t data_len;
  DiffuseStEntry *entries;  /* sorted by name */
  guint n_entries;
  GHashTable *metadata;     /* or NULL */
};

static const struct {
  const char *name;
  guint size;
} st_dtypes[] = {
  [DIFFUSE_ST_F64] = { "F64", 8 },
  [DIFFUSE_ST_F32] = { "F32", 4 },
  [DIFFUSE_ST_F16] = { "F16", 2 },
  [DIFFUSE_ST_BF16] = { "BF16", 2 },
  [DIFFUSE_ST_I64] = { "I64", 8 },
  [DIFFUSE_ST_I32] = { "I32", 4 },
  [DIFFUSE_ST_I16] = { "I16", 2 },
  [DIFFUSE_ST_I8] = { "I8", 1 },
  [DIFFUSE_ST_U8] = { "U8", 1 },
  [DIFFUSE_ST_BOOL] = { "BOOL", 1 },
  [DIFFUSE_ST_F8_E4M3] = { "F8_E4M3", 1 },
  [DIFFUSE_ST_F8_E5M2] = { "F8_E5M2", 1 },
  [DIFFUSE_ST_U16] = { "U16", 2 },
  [DIFFUSE_ST_U32] = { "U32", 4 },
  [DIFFUSE_ST_U64] = { "U64", 8 },
};

const char *
diffuse_st_dtype_name (DiffuseStDType dt)
{
  if ((guint) dt >= G_N_ELEMENTS (st_dtypes))
    return "?";
  return st_dtypes[dt].name;
}

guint
_diffuse_st_dtype_size (DiffuseStDType dt)
{
  if ((guint) dt >= G_N_ELEMENTS (st_dtypes))
    return 0;
  return st_dtypes[dt].size;
}

static gboolean
st_dtype_from_name (const char *s, DiffuseStDType *out)
{
  for (guint i = 0; i < G_N_ELEMENTS (st_dtypes); i++)
    if (strcmp (s, st_dtypes[i].name) == 0) {
      *out = (DiffuseStDType) i;
      return TRUE;
    }
  return FALSE;
}

/* ---- header parser ------------------------------------------------------ */

typedef struct {
  const char *label;
  const char *s;        /* header text (validated UTF-8) */
  size_t n;
  size_t pos;
  const char *tensor;   /* entry being parsed, for messages */
  GError **error;
  gboolean failed;
} Parser;

typedef struct {
  DiffuseStEntry e;
  guint64 begin, end;
} RawEntry;

static gboolean p_fail (Parser *p, const char *fmt, ...) G_GNUC_PRINTF (2, 3);

static gboolean
p_fail (Parser *p, const char *fmt, ...)
{
  if (p->failed)
    return FALSE;
  p->failed = TRUE;
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  if (p->tensor)
    g_set_error (p->error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT,
                 "%s: corrupt safetensors header: tensor \"%s\": %s (at header byte %zu)", p->label, p->tensor,
                 msg, p->pos);
  else
    g_set_error (p->error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT,
                 "%s: corrupt safetensors header: %s (at header byte %zu)", p->label, msg, p->pos);
  g_free (msg);
  return FALSE;
}

static void
p_ws (Parser *p)
{
  while (p->pos < p->n) {
    char c = p->s[p->pos];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r')
      p->pos++;
    else
      break;
  }
}

static gboolean
p_expect (Parser *p, char c)
{
  p_ws (p);
  if (p->pos >= p->n)
    return p_fail (p, "unexpected end of header, expected '%c'", c);
  if (p->s[p->pos] != c)
    return p_fail (p, "expected '%c'", c);
  p->pos++;
  return TRUE;
}

/* Peeks the next non-blank char (0 at the end). */
static char
p_peek (Parser *p)
{
  p_ws (p);
  return p->pos < p->n ? p->s[p->pos] : 0;
}

static int
hexval (char c)
{
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

static gboolean
p_hex4 (Parser *p, guint *out)
{
  if (p->pos + 4 > p->n)
    return p_fail (p, "truncated \\u escape");
  guint v = 0;
  for (int i = 0; i < 4; i++) {
    int h = hexval (p->s[p->pos + i]);
    if (h < 0)
      return p_fail (p, "bad \\u escape");
    v = v * 16 + (guint) h;
  }
  p->pos += 4;
  *out = v;
  return TRUE;
}

/* A JSON string; returns a newly allocated UTF-8 string (no NULs inside). */
static char *
p_string (Parser *p)
{
  p_ws (p);
  if (p->pos >= p->n || p->s[p->pos] != '"') {
    p_fail (p, "expected a string");
    return NULL;
  }
  p->pos++;
  GString *out = g_string_new (NULL);
  while (TRUE) {
    if (p->pos >= p->n) {
      p_fail (p, "unterminated string");
      break;
    }
    guchar c = (guchar) p->s[p->pos];
    if (c == '"') {
      p->pos++;
      return g_string_free (out, FALSE);
    }
    if (c < 0x20) {
      p_fail (p, "control character in string");
      break;
    }
    if (c != '\\') {
      g_string_append_c (out, (char) c);
      p->pos++;
      continue;
    }
    p->pos++;
    if (p->pos >= p->n) {
      p_fail (p, "unterminated string");
      break;
    }
    char e = p->s[p->pos++];
    switch (e) {
    case '"': g_string_append_c (out, '"'); break;
    case '\\': g_string_append_c (out, '\\'); break;
    case '/': g_string_append_c (out, '/'); break;
    case 'b': g_string_append_c (out, '\b'); break;
    case 'f': g_string_append_c (out, '\f'); break;
    case 'n': g_string_append_c (out, '\n'); break;
    case 'r': g_string_append_c (out, '\r'); break;
    case 't': g_string_append_c (out, '\t'); break;
    case 'u': {
      guint cp;
      if (!p_hex4 (p, &cp))
        goto fail;
      if (cp >= 0xD800 && cp <= 0xDBFF) {
        guint lo;
        if (p->pos + 2 > p->n || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
          p_fail (p, "lone leading surrogate in \\u escape");
          goto fail;
        }
        p->pos += 2;
        if (!p_hex4 (p, &lo))
          goto fail;
        if (lo < 0xDC00 || lo > 0xDFFF) {
          p_fail (p, "invalid surrogate pair in \\u escape");
          goto fail;
        }
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
      } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
        p_fail (p, "lone trailing surrogate in \\u escape");
        goto fail;
      }
      if (cp == 0) {
        p_fail (p, "NUL character (\\u0000) in string");
        goto fail;
      }
      g_string_append_unichar (out, cp);
      break;
    }
    default:
      p_fail (p, "bad escape '\\%c'", e);
      goto fail;
    }
  }
fail:
  g_string_free (out, TRUE);
  return NULL;
}

/* A non-negative JSON integer (no sign, fraction or exponent). */
static gboolean
p_uint (Parser *p, const char *what, guint64 *out)
{
  p_ws (p);
  if (p->pos >= p->n)
    return p_fail (p, "unexpected end of header in %s", what);
  char c = p->s[p->pos];
  if (c == '-')
    return p_fail (p, "negative number in %s", what);
  if (c < '0' || c > '9')
    return p_fail (p, "expected a non-negative integer in %s", what);
  guint64 v = 0;
  size_t start = p->pos;
  while (p->pos < p->n && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') {
    guint d = (guint) (p->s[p->pos] - '0');
    if (v > (G_MAXUINT64 - d) / 10)
      return p_fail (p, "integer too large in %s", what);
    v = v * 10 + d;
    p->pos++;
  }
  if (p->s[start] == '0' && p->pos - start > 1)
    return p_fail (p, "leading zero in a number in %s", what);
  if (p->pos < p->n && (p->s[p->pos] == '.' || p->s[p->pos] == 'e' || p->s[p->pos] == 'E'))
    return p_fail (p, "expected an integer in %s, found a fractional number", what);
  *out = v;
  return TRUE;
}

static gboolean
p_literal (Parser *p, const char *lit)
{
  size_t l = strlen (lit);
  if (p->pos + l <= p->n && memcmp (p->s + p->pos, lit, l) == 0) {
    p->pos += l;
    return TRUE;
  }
  return FALSE;
}

static gboolean
p_metadata (Parser *p, GHashTable **out)
{
  if (p_peek (p) == 'n') {
    if (p_literal (p, "null"))
      return TRUE;   /* the crate accepts "__metadata__": null */
    return p_fail (p, "\"__metadata__\" must be an object of strings");
  }
  if (p_peek (p) != '{')
    return p_fail (p, "\"__metadata__\" must be an object of strings");
  p->pos++;
  GHashTable *md = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  if (p_peek (p) == '}') {
    p->pos++;
    *out = md;
    return TRUE;
  }
  while (TRUE) {
    char *k = p_string (p);
    if (!k)
      goto fail;
    if (g_hash_table_contains (md, k)) {
      p_fail (p, "duplicate key \"%s\" in \"__metadata__\"", k);
      g_free (k);
      goto fail;
    }
    if (!p_expect (p, ':')) {
      g_free (k);
      goto fail;
    }
    if (p_peek (p) != '"') {
      p_fail (p, "\"__metadata__\" value of \"%s\" is not a string", k);
      g_free (k);
      goto fail;
    }
    char *v = p_string (p);
    if (!v) {
      g_free (k);
      goto fail;
    }
    g_hash_table_insert (md, k, v);
    char c = p_peek (p);
    if (c == ',') {
      p->pos++;
      continue;
    }
    if (c == '}') {
      p->pos++;
      break;
    }
    p_fail (p, "expected ',' or '}' in \"__metadata__\"");
    goto fail;
  }
  *out = md;
  return TRUE;
fail:
  g_hash_table_unref (md);
  return FALSE;
}

static gboolean
p_entry (Parser *p, RawEntry *re)
{
  gboolean have_dtype = FALSE, have_shape = FALSE, have_offsets = FALSE;

  if (p_peek (p) != '{')
    return p_fail (p, "expected an object {\"dtype\", \"shape\", \"data_offsets\"}");
  p->pos++;
  if (p_peek (p) == '}')
    return p_fail (p, "missing field \"dtype\"");
  while (TRUE) {
    char *k = p_string (p);
    if (!k)
      return FALSE;
    if (!p_expect (p, ':')) {
      g_free (k);
      return FALSE;
    }
    if (strcmp (k, "dtype") == 0) {
      g_free (k);
      if (have_dtype)
        return p_fail (p, "duplicate field \"dtype\"");
      have_dtype = TRUE;
      char *d = p_string (p);
      if (!d)
        return FALSE;
      gboolean ok = st_dtype_from_name (d, &re->e.dtype);
      if (!ok)
        p_fail (p, "unknown dtype \"%s\"", d);
      g_free (d);
      if (!ok)
        return FALSE;
    } else if (strcmp (k, "shape") == 0) {
      g_free (k);
      if (have_shape)
        return p_fail (p, "duplicate field \"shape\"");
      have_shape = TRUE;
      if (!p_expect (p, '['))
        return FALSE;
      re->e.ndim = 0;
      if (p_peek (p) == ']') {
        p->pos++;
      } else {
        while (TRUE) {
          guint64 d;
          if (!p_uint (p, "shape", &d))
            return FALSE;
          if (re->e.ndim >= ST_MAX_DIMS)
            return p_fail (p, "more than %d dimensions", ST_MAX_DIMS);
          if (d > (guint64) G_MAXINT64)
            return p_fail (p, "dimension too large");
          re->e.shape[re->e.ndim++] = (int64_t) d;
          char c = p_peek (p);
          if (c == ',') {
            p->pos++;
            continue;
          }
          if (c == ']') {
            p->pos++;
            break;
          }
          return p_fail (p, "expected ',' or ']' in shape");
        }
      }
    } else if (strcmp (k, "data_offsets") == 0) {
      g_free (k);
      if (have_offsets)
        return p_fail (p, "duplicate field \"data_offsets\"");
      have_offsets = TRUE;
      if (!p_expect (p, '[') || !p_uint (p, "data_offsets", &re->begin) || !p_expect (p, ',')
          || !p_uint (p, "data_offsets", &re->end))
        return FALSE;
      if (p_peek (p) != ']')
        return p_fail (p, "data_offsets must have exactly 2 elements");
      p->pos++;
    } else {
      p_fail (p, "unknown field \"%s\"", k);
      g_free (k);
      return FALSE;
    }
    char c = p_peek (p);
    if (c == ',') {
      p->pos++;
      continue;
    }
    if (c == '}') {
      p->pos++;
      break;
    }
    return p_fail (p, "expected ',' or '}'");
  }
  if (!have_dtype)
    return p_fail (p, "missing field \"dtype\"");
  if (!have_shape)
    return p_fail (p, "missing field \"shape\"");
  if (!have_offsets)
    return p_fail (p, "missing field \"data_offsets\"");
  return TRUE;
}

static int
cmp_entry_names (gconstpointer a, gconstpointer b)
{
  return strcmp (((const DiffuseStEntry *) a)->name, ((const DiffuseStEntry *) b)->name);
}

static int
cmp_by_name (gconstpointer a, gconstpointer b)
{
  return strcmp (((const RawEntry *) a)->e.name, ((const RawEntry *) b)->e.name);
}

static int
cmp_by_offsets (gconstpointer a, gconstpointer b)
{
  const RawEntry *x = *(const RawEntry *const *) a, *y = *(const RawEntry *const *) b;
  if (x->begin != y->begin)
    return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end)
    return x->end < y->end ? -1 : 1;
  return 0;
}

static void
raw_entries_free (GArray *a)
{
  for (guint i = 0; i < a->len; i++)
    g_free ((char *) g_array_index (a, RawEntry, i).e.name);
  g_array_free (a, TRUE);
}

static gboolean corrupt (GError **error, const char *label, const char *fmt, ...) G_GNUC_PRINTF (3, 4);

static gboolean
corrupt (GError **error, const char *label, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "%s: corrupt safetensors file: %s", label, msg);
  g_free (msg);
  return FALSE;
}

/* A torch.save checkpoint: the entries come from its pickle (torch_pickle.c)
 * and point into the same mapping; names must be unique once sorted. */
static gboolean
st_parse_torch (DiffuseSafetensors *st, GError **error)
{
  DiffuseStEntry *entries = NULL;
  guint n = 0;
  guint64 bytes = 0;
  if (!_diffuse_torch_pickle_parse (st->path, st->base, st->len, &entries, &n, &bytes, error))
    return FALSE;
  qsort (entries, n, sizeof (DiffuseStEntry), cmp_entry_names);
  st->entries = entries ? entries : g_new0 (DiffuseStEntry, 1);
  st->n_entries = n;
  st->data = NULL;
  st->data_len = (size_t) bytes;
  return TRUE;
}

/* Parses and validates; on success fills st's entries/metadata. */
static gboolean
st_parse (DiffuseSafetensors *st, GError **error)
{
  const char *label = st->path;
  if (_diffuse_torch_zip_magic (st->base, st->len))
    return st_parse_torch (st, error);
  if (_diffuse_torch_legacy_magic (st->base, st->len)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: a PyTorch checkpoint in the legacy format of torch < 1.6, which is not read: re-save it with "
                 "torch.save from a current torch, or convert it to safetensors", label);
    return FALSE;
  }
  if (st->len < 8)
    return corrupt (error, label, "file is %zu bytes, shorter than the 8-byte header length", st->len);
  guint64 n = 0;
  for (int i = 7; i >= 0; i--)
    n = (n << 8) | st->base[i];
  if (n == 0)
    return corrupt (error, label, "header length is 0");
  if (n > ST_MAX_HEADER)
    return corrupt (error, label, "header length %" G_GUINT64_FORMAT " is larger than the %u-byte limit", n,
                    ST_MAX_HEADER);
  if (n > st->len - 8)
    return corrupt (error, label, "header length %" G_GUINT64_FORMAT " goes past the end of the file (%zu bytes)",
                    n, st->len);
  const char *hdr = (const char *) st->base + 8;
  const char *bad = NULL;
  if (!g_utf8_validate_len (hdr, (gssize) n, &bad)) {
    if (bad && *bad == 0)
      return corrupt (error, label, "NUL byte in the header at byte %zu", (size_t) (bad - hdr));
    return corrupt (error, label, "header is not valid UTF-8 (at byte %zu)", (size_t) (bad - hdr));
  }
  st->data = st->base + 8 + n;
  st->data_len = st->len - 8 - (size_t) n;

  Parser p = { .label = label, .s = hdr, .n = (size_t) n, .error = error };
  GArray *raw = g_array_new (FALSE, TRUE, sizeof (RawEntry));
  GHashTable *md = NULL;
  gboolean have_md = FALSE;

  if (p_peek (&p) != '{') {
    p_fail (&p, "header is not a JSON object");
    goto fail;
  }
  p.pos++;
  if (p_peek (&p) == '}') {
    p.pos++;
  } else {
    while (TRUE) {
      char *k = p_string (&p);
      if (!k)
        goto fail;
      if (!p_expect (&p, ':')) {
        g_free (k);
        goto fail;
      }
      if (strcmp (k, "__metadata__") == 0) {
        g_free (k);
        if (have_md) {
          p_fail (&p, "duplicate key \"__metadata__\"");
          goto fail;
        }
        have_md = TRUE;
        if (!p_metadata (&p, &md))
          goto fail;
      } else {
        RawEntry re;
        memset (&re, 0, sizeof re);
        re.e.name = k;
        g_array_append_val (raw, re);
        RawEntry *r = &g_array_index (raw, RawEntry, raw->len - 1);
        p.tensor = k;
        if (!p_entry (&p, r))
          goto fail;
        p.tensor = NULL;
      }
      char c = p_peek (&p);
      if (c == ',') {
        p.pos++;
        continue;
      }
      if (c == '}') {
        p.pos++;
        break;
      }
      p_fail (&p, "expected ',' or '}' after an entry");
      goto fail;
    }
  }
  if (p_peek (&p) != 0) {
    p_fail (&p, "trailing characters after the JSON object");
    goto fail;
  }

  /* names: sorted, unique */
  g_array_sort (raw, cmp_by_name);
  for (guint i = 1; i < raw->len; i++) {
    const char *a = g_array_index (raw, RawEntry, i - 1).e.name, *b = g_array_index (raw, RawEntry, i).e.name;
    if (strcmp (a, b) == 0) {
      corrupt (error, label, "duplicate tensor \"%s\" in the header", a);
      goto fail;
    }
  }

  /* sizes and offsets: sorted by offsets, they must tile [0, data_len) */
  {
    RawEntry **by_off = g_new (RawEntry *, raw->len ? raw->len : 1);
    for (guint i = 0; i < raw->len; i++)
      by_off[i] = &g_array_index (raw, RawEntry, i);
    qsort (by_off, raw->len, sizeof (RawEntry *), cmp_by_offsets);
    guint64 pos = 0;
    const char *prev = NULL;
    gboolean ok = TRUE;
    for (guint i = 0; i < raw->len && ok; i++) {
      RawEntry *r = by_off[i];
      const char *name = r->e.name;
      if (r->end < r->begin) {
        ok = corrupt (error, label, "tensor \"%s\": data_offsets [%" G_GUINT64_FORMAT ", %" G_GUINT64_FORMAT
                      "] end before begin", name, r->begin, r->end);
        break;
      }
      if (r->end > st->data_len) {
        ok = corrupt (error, label, "tensor \"%s\": data_offsets [%" G_GUINT64_FORMAT ", %" G_GUINT64_FORMAT
                      "] out of range: the data buffer has %zu bytes", name, r->begin, r->end, st->data_len);
        break;
      }
      guint64 nel = 1, nb;
      for (int d = 0; d < r->e.ndim; d++)
        if (__builtin_mul_overflow (nel, (guint64) r->e.shape[d], &nel)) {
          ok = corrupt (error, label, "tensor \"%s\": element count overflows", name);
          break;
        }
      if (!ok)
        break;
      if (__builtin_mul_overflow (nel, (guint64) _diffuse_st_dtype_size (r->e.dtype), &nb)) {
        ok = corrupt (error, label, "tensor \"%s\": byte size overflows", name);
        break;
      }
      if (nb != r->end - r->begin) {
        ok = corrupt (error, label, "tensor \"%s\": shape * %s size is %" G_GUINT64_FORMAT
                      " bytes but data_offsets [%" G_GUINT64_FORMAT ", %" G_GUINT64_FORMAT "] span %" G_GUINT64_FORMAT,
                      name, diffuse_st_dtype_name (r->e.dtype), nb, r->begin, r->end, r->end - r->begin);
        break;
      }
      if (r->begin > pos) {
        ok = corrupt (error, label, "tensor \"%s\": hole of %" G_GUINT64_FORMAT " bytes in the data buffer before it",
                      name, r->begin - pos);
        break;
      }
      if (r->begin < pos) {
        ok = corrupt (error, label, "tensor \"%s\": data_offsets [%" G_GUINT64_FORMAT ", %" G_GUINT64_FORMAT
                      "] overlap tensor \"%s\"", name, r->begin, r->end, prev ? prev : "?");
        break;
      }
      pos = r->end;
      prev = name;
      r->e.data = st->data + r->begin;
      r->e.nbytes = (size_t) nb;
    }
    if (ok && pos != st->data_len)
      ok = corrupt (error, label, "%" G_GUINT64_FORMAT " trailing bytes after the last tensor%s%s%s",
                    (guint64) (st->data_len - pos), prev ? " \"" : "", prev ? prev : "", prev ? "\"" : "");
    g_free (by_off);
    if (!ok)
      goto fail;
  }

  st->n_entries = raw->len;
  st->entries = g_new0 (DiffuseStEntry, raw->len ? raw->len : 1);
  for (guint i = 0; i < raw->len; i++)
    st->entries[i] = g_array_index (raw, RawEntry, i).e;
  g_array_free (raw, TRUE);   /* names now owned by st->entries */
  st->metadata = md;
  return TRUE;

fail:
  raw_entries_free (raw);
  if (md)
    g_hash_table_unref (md);
  return FALSE;
}

/* ---- handles ------------------------------------------------------------ */

static void
st_free (DiffuseSafetensors *st)
{
  for (guint i = 0; i < st->n_entries; i++)
    g_free ((char *) st->entries[i].name);
  g_free (st->entries);
  if (st->metadata)
    g_hash_table_unref (st->metadata);
  if (st->mapped)
    munmap (st->base, st->len);
  else
    g_free (st->base);
  g_free (st->path);
  g_free (st);
}

DiffuseSafetensors *
diffuse_safetensors_open (const char *path, GError **error)
{
  g_return_val_if_fail (path != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  int fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    g_set_error (error, DIFFUSE_ERROR, e == ENOENT ? DIFFUSE_ERROR_NOT_FOUND : DIFFUSE_ERROR_IO,
                 "%s: cannot open: %s", path, g_strerror (e));
    return NULL;
  }
  struct stat sb;
  if (fstat (fd, &sb) != 0) {
    int e = errno;
    close (fd);
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "%s: cannot stat: %s", path, g_strerror (e));
    return NULL;
  }
  if (!S_ISREG (sb.st_mode)) {
    close (fd);
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "%s: not a regular file", path);
    return NULL;
  }
  DiffuseSafetensors *st = g_new0 (DiffuseSafetensors, 1);
  st->ref_count = 1;
  st->path = g_strdup (path);
  st->len = (size_t) sb.st_size;
  if (st->len < 8) {
    close (fd);
    corrupt (error, path, "file is %zu bytes, shorter than the 8-byte header length", st->len);
    st_free (st);
    return NULL;
  }
  void *m = mmap (NULL, st->len, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  close (fd);
  if (m == MAP_FAILED) {
    g_set_error (error, DIFFUSE_ERROR, e == ENOMEM ? DIFFUSE_ERROR_OUT_OF_MEMORY : DIFFUSE_ERROR_IO,
                 "%s: cannot mmap %zu bytes: %s", path, st->len, g_strerror (e));
    st_free (st);
    return NULL;
  }
  st->base = m;
  st->mapped = TRUE;
  if (!st_parse (st, error)) {
    st_free (st);
    return NULL;
  }
  return st;
}

DiffuseSafetensors *
diffuse_safetensors_open_bytes (const void *data, size_t len, const char *label, GError **error)
{
  g_return_val_if_fail (data != NULL || len == 0, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);
  DiffuseSafetensors *st = g_new0 (DiffuseSafetensors, 1);
  st->ref_count = 1;
  st->path = g_strdup (label ? label : "(buffer)");
  st->len = len;
  st->base = len ? g_memdup2 (data, len) : NULL;
  if (!st_parse (st, error)) {
    st_free (st);
    return NULL;
  }
  return st;
}

DiffuseSafetensors *
diffuse_safetensors_ref (DiffuseSafetensors *st)
{
  g_return_val_if_fail (st != NULL, NULL);
  g_atomic_int_inc (&st->ref_count);
  return st;
}

void
diffuse_safetensors_unref (DiffuseSafetensors *st)
{
  if (st && g_atomic_int_dec_and_test (&st->ref_count))
    st_free (st);
}

const char *
diffuse_safetensors_path (DiffuseSafetensors *st)
{
  g_return_val_if_fail (st != NULL, NULL);
  return st->path;
}

guint
diffuse_safetensors_n_tensors (DiffuseSafetensors *st)
{
  g_return_val_if_fail (st != NULL, 0);
  return st->n_entries;
}

const DiffuseStEntry *
diffuse_safetensors_entry (DiffuseSafetensors *st, guint i)
{
  g_return_val_if_fail (st != NULL, NULL);
  g_return_val_if_fail (i < st->n_entries, NULL);
  return &st->entries[i];
}

const DiffuseStEntry *
diffuse_safetensors_find (DiffuseSafetensors *st, const char *name)
{
  g_return_val_if_fail (st != NULL, NULL);
  g_return_val_if_fail (name != NULL, NULL);
  guint lo = 0, hi = st->n_entries;
  while (lo < hi) {
    guint mid = lo + (hi - lo) / 2;
    int c = strcmp (name, st->entries[mid].name);
    if (c == 0)
      return &st->entries[mid];
    if (c < 0)
      hi = mid;
    else
      lo = mid + 1;
  }
  return NULL;
}

GHashTable *
diffuse_safetensors_metadata (DiffuseSafetensors *st)
{
  g_return_val_if_fail (st != NULL, NULL);
  return st->metadata;
}

guint64
_diffuse_safetensors_data_bytes (DiffuseSafetensors *st)
{
  return st->data_len;
}

/* ---- tensors ------------------------------------------------------------ */

static gboolean
st_to_dtype (DiffuseStDType s, DiffuseDType *out)
{
  switch (s) {
  case DIFFUSE_ST_F32: *out = DIFFUSE_DTYPE_F32; return TRUE;
  case DIFFUSE_ST_F16: *out = DIFFUSE_DTYPE_F16; return TRUE;
  case DIFFUSE_ST_BF16: *out = DIFFUSE_DTYPE_BF16; return TRUE;
  default: return FALSE;
  }
}

static void
release_file (gpointer user_data)
{
  diffuse_safetensors_unref (user_data);
}

static DiffuseTensor *
fail_from_tensor_layer (GError **error, const char *label, const char *name)
{
  GError *e = NULL;
  if (!diffuse_tensor_take_error (&e) || !e)
    e = g_error_new (DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "tensor creation failed");
  g_set_error (error, e->domain, e->code, "%s: tensor \"%s\": %s", label, name, e->message);
  g_error_free (e);
  return NULL;
}

/* Converts n elements of src (possibly unaligned) into dst (aligned, dst_dt). */
static void
convert_elements (void *dst, DiffuseDType dst_dt, const guint8 *src, DiffuseStDType src_st, size_t n)
{
  enum { CHUNK = 1024 };
  size_t dsz = diffuse_dtype_size (dst_dt);
  guint ssz = _diffuse_st_dtype_size (src_st);
  if (src_st == DIFFUSE_ST_F64) {
    double tmpd[CHUNK];
    float tmpf[CHUNK];
    for (size_t i = 0; i < n; i += CHUNK) {
      size_t k = MIN ((size_t) CHUNK, n - i);
      memcpy (tmpd, src + i * 8, k * 8);
      for (size_t j = 0; j < k; j++)
        tmpf[j] = (float) tmpd[j];
      diffuse_convert_row ((guint8 *) dst + i * dsz, dst_dt, tmpf, DIFFUSE_DTYPE_F32, k);
    }
    return;
  }
  DiffuseDType sdt;
  gboolean known = st_to_dtype (src_st, &sdt);
  g_assert (known);
  if (sdt == dst_dt) {
    memcpy (dst, src, n * dsz);
    return;
  }
  if (((guintptr) src % ssz) == 0) {
    diffuse_convert_row (dst, dst_dt, src, sdt, n);
    return;
  }
  guint32 tmp[CHUNK];   /* aligned staging for unaligned sources */
  size_t per = sizeof (tmp) / ssz;
  for (size_t i = 0; i < n; i += per) {
    size_t k = MIN (per, n - i);
    memcpy (tmp, src + i * ssz, k * ssz);
    diffuse_convert_row ((guint8 *) dst + i * dsz, dst_dt, tmp, sdt, k);
  }
}

DiffuseTensor *
_diffuse_st_entry_tensor (DiffuseSafetensors *st, const DiffuseStEntry *e, DiffuseDType dtype,
                          DiffuseDevice *dev, GError **error)
{
  DiffuseDType fdt = DIFFUSE_DTYPE_F32;
  gboolean floaty = st_to_dtype (e->dtype, &fdt) || e->dtype == DIFFUSE_ST_F64;
  if (!floaty) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: tensor \"%s\" has dtype %s, which cannot be loaded as %s", st->path, e->name,
                 diffuse_st_dtype_name (e->dtype), diffuse_dtype_name (dtype));
    return NULL;
  }
  if (e->ndim > DIFFUSE_MAX_DIMS) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: tensor \"%s\" has %d dimensions, more than the %d supported", st->path, e->name, e->ndim,
                 DIFFUSE_MAX_DIMS);
    return NULL;
  }
  /* an empty tensor may have huge other dims ([0, 2^40, 2^40] is valid in
   * a file): keep the product of the non-zero dims within int64 so that
   * strides cannot overflow */
  gint64 prod = 1;
  for (int d = 0; d < e->ndim; d++)
    if (e->shape[d] && __builtin_mul_overflow (prod, e->shape[d], &prod)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: tensor \"%s\": shape too large", st->path,
                   e->name);
      return NULL;
    }
  if (!dev)
    dev = diffuse_device_cpu ();
  DiffuseDevice *cpu = diffuse_device_cpu ();
  DiffuseTensor *t;

  gboolean same = e->dtype != DIFFUSE_ST_F64 && fdt == dtype;
  if (same && ((guintptr) e->data % _diffuse_st_dtype_size (e->dtype)) == 0) {
    /* zero copy: the tensor keeps the file alive */
    diffuse_safetensors_ref (st);
    t = diffuse_tensor_new_borrowed (cpu, dtype, e->ndim, e->shape, (gpointer) e->data, release_file, st);
    if (!t)
      return fail_from_tensor_layer (error, st->path, e->name);   /* release already called */
  } else {
    t = diffuse_tensor_new (cpu, dtype, e->ndim, e->shape);
    if (!t)
      return fail_from_tensor_layer (error, st->path, e->name);
    size_t n = (size_t) diffuse_tensor_numel (t);
    if (n)
      convert_elements (diffuse_tensor_data (t), dtype, e->data, e->dtype, n);
  }
  if (dev != cpu) {
    DiffuseTensor *d = diffuse_to_device (t, dev);
    diffuse_tensor_unref (t);
    if (!d)
      return fail_from_tensor_layer (error, st->path, e->name);
    t = d;
  }
  return t;
}

DiffuseTensor *
diffuse_safetensors_tensor (DiffuseSafetensors *st, const char *name, DiffuseDType dtype, DiffuseDevice *dev,
                            GError **error)
{
  g_return_val_if_fail (st != NULL, NULL);
  g_return_val_if_fail (name != NULL, NULL);
  g_return_val_if_fail (dtype < DIFFUSE_DTYPE_N, NULL);
  const DiffuseStEntry *e = diffuse_safetensors_find (st, name);
  if (!e) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "%s: no tensor \"%s\"", st->path, name);
    return NULL;
  }
  return _diffuse_st_entry_tensor (st, e, dtype, dev, error);
}

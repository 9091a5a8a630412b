/* gst-diffuse — the CLIP tokenizer (byte-level BPE as transformers' CLIPTokenizer).
 *
 * The oracle is transformers 5's CLIPTokenizer, a `tokenizers` pipeline:
 *   added tokens cut out -> NFC, \s+ -> " ", lowercase -> CLIP regex split
 *   (+ GPT-2 byte-level split) -> byte-to-unicode -> BPE with "</w>" ->
 *   bos ... eos (RobertaProcessing) -> truncation / padding.
 * See the header for the behaviour; the comments here say how each step
 * follows the original. */
#include "clip_tokenizer_private.h"

#include <diffuse/clip_tokenizer.h>
#include <diffuse/error.h>

#include <json-glib/json-glib.h>
#include <string.h>

#define CLIP_DEFAULT_MAX_LENGTH 77
/* transformers writes VERY_LARGE_INTEGER (1e30) when no length is known. */
#define CLIP_MAX_LENGTH_SENTINEL 1000000
/* As `tokenizers`' BPE cache: words up to this many bytes, this many entries. */
#define CACHE_MAX_WORD 256
#define CACHE_MAX_ENTRIES 10000

/* ------------------------------------------------------------------------ */
/* Unicode helpers                                                           */

/* Letters and numbers of Unicode 15.1/16 (the tables of the Oniguruma in
 * `tokenizers`) that GLib 2.74 (Unicode 15.0) reports as unassigned; only
 * consulted for characters GLib does not know. */
static const struct {
  gunichar lo, hi;
  guint8 cls;
} newer_classes[] = {
  { 0x01C89, 0x01C8A, 2 }, { 0x0A7CB, 0x0A7CD, 2 }, { 0x0A7DA, 0x0A7DC, 2 }, { 0x105C0, 0x105F3, 2 },
  { 0x10D40, 0x10D49, 3 }, { 0x10D4A, 0x10D65, 2 }, { 0x10D6F, 0x10D85, 2 }, { 0x10EC2, 0x10EC4, 2 },
  { 0x11380, 0x11389, 2 }, { 0x1138B, 0x1138B, 2 }, { 0x1138E, 0x1138E, 2 }, { 0x11390, 0x113B5, 2 },
  { 0x113B7, 0x113B7, 2 }, { 0x113D1, 0x113D1, 2 }, { 0x113D3, 0x113D3, 2 }, { 0x116D0, 0x116E3, 3 },
  { 0x11BC0, 0x11BE0, 2 }, { 0x11BF0, 0x11BF9, 3 }, { 0x13460, 0x143FA, 2 }, { 0x16100, 0x1611D, 2 },
  { 0x16130, 0x16139, 3 }, { 0x16D40, 0x16D6C, 2 }, { 0x16D70, 0x16D79, 3 }, { 0x18CFF, 0x18CFF, 2 },
  { 0x1CCF0, 0x1CCF9, 3 }, { 0x1E5D0, 0x1E5ED, 2 }, { 0x1E5F0, 0x1E5F0, 2 }, { 0x1E5F1, 0x1E5FA, 3 },
  { 0x2EBF0, 0x2EE5D, 2 },
};

/* Lowercase mappings (as Rust's char::to_lowercase has them) of characters
 * GLib 2.74 does not know yet: {first, last, delta}. */
static const struct {
  gunichar lo, hi;
  gint32 delta;
} newer_lower[] = {
  { 0x01C89, 0x01C89, 1 }, { 0x0A7CB, 0x0A7CB, -42343 }, { 0x0A7CC, 0x0A7CC, 1 }, { 0x0A7CE, 0x0A7CE, 1 },
  { 0x0A7D2, 0x0A7D2, 1 }, { 0x0A7D4, 0x0A7D4, 1 },      { 0x0A7DA, 0x0A7DA, 1 }, { 0x0A7DC, 0x0A7DC, -42561 },
  { 0x10D50, 0x10D65, 32 }, { 0x16EA0, 0x16EB8, 27 },
};

static DiffuseClipCharClass
newer_class (gunichar c)
{
  for (guint i = 0; i < G_N_ELEMENTS (newer_classes); i++)
    if (c >= newer_classes[i].lo && c <= newer_classes[i].hi)
      return (DiffuseClipCharClass) newer_classes[i].cls;
  return DIFFUSE_CLIP_CHAR_OTHER;
}

DiffuseClipCharClass
_diffuse_clip_char_class (gunichar c)
{
  if (c < 0x80) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
      return DIFFUSE_CLIP_CHAR_LETTER;
    if (c >= '0' && c <= '9')
      return DIFFUSE_CLIP_CHAR_NUMBER;
    if (c == ' ' || (c >= 0x09 && c <= 0x0d))
      return DIFFUSE_CLIP_CHAR_SPACE;
    return DIFFUSE_CLIP_CHAR_OTHER;
  }
  if (c == 0x85)
    return DIFFUSE_CLIP_CHAR_SPACE;
  switch (g_unichar_type (c)) {
    case G_UNICODE_LOWERCASE_LETTER:
    case G_UNICODE_UPPERCASE_LETTER:
    case G_UNICODE_TITLECASE_LETTER:
    case G_UNICODE_MODIFIER_LETTER:
    case G_UNICODE_OTHER_LETTER:
      return DIFFUSE_CLIP_CHAR_LETTER;
    case G_UNICODE_DECIMAL_NUMBER:
    case G_UNICODE_LETTER_NUMBER:
    case G_UNICODE_OTHER_NUMBER:
      return DIFFUSE_CLIP_CHAR_NUMBER;
    case G_UNICODE_SPACE_SEPARATOR:
    case G_UNICODE_LINE_SEPARATOR:
    case G_UNICODE_PARAGRAPH_SEPARATOR:
      return DIFFUSE_CLIP_CHAR_SPACE;
    case G_UNICODE_UNASSIGNED:
      return newer_class (c);
    default:
      return DIFFUSE_CLIP_CHAR_OTHER;
  }
}

int
_diffuse_clip_char_lower (gunichar c, gunichar out[3])
{
  if (c < 0x80) {
    out[0] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
    return 1;
  }
  /* The one unconditional multi-character lowercase mapping of
   * SpecialCasing.txt: LATIN CAPITAL LETTER I WITH DOT ABOVE -> i + U+0307.
   * (Rust's char::to_lowercase has no context, so final sigma is σ.) */
  if (c == 0x0130) {
    out[0] = 'i';
    out[1] = 0x0307;
    return 2;
  }
  /* Cased characters that are not letters (Nl ROMAN NUMERAL ONE.., So
   * CIRCLED LATIN CAPITAL LETTER A..): g_unichar_tolower maps letters only. */
  if (c >= 0x2160 && c <= 0x216f) {
    out[0] = c + 0x10;
    return 1;
  }
  if (c >= 0x24b6 && c <= 0x24cf) {
    out[0] = c + 0x1a;
    return 1;
  }
  if (g_unichar_type (c) == G_UNICODE_UNASSIGNED) {
    out[0] = c;
    for (guint i = 0; i < G_N_ELEMENTS (newer_lower); i++)
      if (c >= newer_lower[i].lo && c <= newer_lower[i].hi)
        out[0] = (gunichar) ((gint32) c + newer_lower[i].delta);
    return 1;
  }
  out[0] = g_unichar_tolower (c);
  return 1;
}

/* Python's str.isspace (for str.strip in decode). */
static gboolean
py_isspace (gunichar c)
{
  if (c >= 0x1c && c <= 0x1f)
    return TRUE;
  return _diffuse_clip_char_class (c) == DIFFUSE_CLIP_CHAR_SPACE;
}

/* Decodes one UTF-8 sequence of s[0..n) (n >= 1).  Returns the number of
 * bytes consumed; *out is the character, or U+FFFD for a maximal invalid
 * subpart (Unicode "substitution of maximal subparts", as Python and Rust). */
static int
utf8_next (const guchar *s, size_t n, gunichar *out)
{
  guchar b0 = s[0];
  int need;
  gunichar c;
  guchar lo = 0x80, hi = 0xbf;

  if (b0 < 0x80) {
    *out = b0;
    return 1;
  }
  if (b0 >= 0xc2 && b0 <= 0xdf) {
    need = 1;
    c = b0 & 0x1f;
  } else if (b0 >= 0xe0 && b0 <= 0xef) {
    need = 2;
    c = b0 & 0x0f;
    if (b0 == 0xe0)
      lo = 0xa0;
    else if (b0 == 0xed)
      hi = 0x9f;
  } else if (b0 >= 0xf0 && b0 <= 0xf4) {
    need = 3;
    c = b0 & 0x07;
    if (b0 == 0xf0)
      lo = 0x90;
    else if (b0 == 0xf4)
      hi = 0x8f;
  } else {
    *out = 0xfffd;
    return 1;
  }
  for (int k = 1; k <= need; k++) {
    if ((size_t) k >= n || s[k] < lo || s[k] > hi) {
      *out = 0xfffd;
      return k;
    }
    c = (c << 6) | (s[k] & 0x3f);
    lo = 0x80;
    hi = 0xbf;
  }
  *out = c;
  return need + 1;
}

char *
_diffuse_clip_utf8_make_valid (const char *s, gssize len)
{
  size_t n = len < 0 ? strlen (s) : (size_t) len;
  const char *end;

  if (g_utf8_validate_len (s, n, &end))
    return g_strndup (s, n);
  GString *out = g_string_sized_new (n + 8);
  size_t i = 0;
  while (i < n) {
    gunichar c;
    int k = utf8_next ((const guchar *) s + i, n - i, &c);
    if (c == 0xfffd && !(k == 3 && memcmp (s + i, "\xef\xbf\xbd", 3) == 0))
      g_string_append (out, "\xef\xbf\xbd");
    else
      g_string_append_len (out, s + i, k);
    i += k;
  }
  return g_string_free (out, FALSE);
}

/* GPT-2's bytes_to_unicode(): the printable Latin-1 bytes map to themselves,
 * the others to U+0100.. in byte order. */
static gunichar
byte_to_unichar (int b)
{
  static gunichar table[256];
  static gsize init = 0;

  if (g_once_init_enter (&init)) {
    int n = 0;
    for (int i = 0; i < 256; i++) {
      gboolean keep = (i >= 0x21 && i <= 0x7e) || (i >= 0xa1 && i <= 0xac) || (i >= 0xae && i <= 0xff);
      table[i] = keep ? (gunichar) i : (gunichar) (256 + n++);
    }
    g_once_init_leave (&init, 1);
  }
  return table[b];
}

/* ------------------------------------------------------------------------ */
/* Merge table: (left id, right id) -> (rank, merged id), open addressing.   */

typedef struct {
  guint64 key;      /* (left << 32) | right */
  int32_t rank;
  int32_t new_id;
  gboolean used;
} MergeSlot;

typedef struct {
  MergeSlot *slots;
  guint64 mask;
  guint count;
} MergeTable;

static inline guint64
merge_hash (guint64 key)
{
  key ^= key >> 33;
  key *= 0xff51afd7ed558ccdULL;
  key ^= key >> 33;
  return key;
}

static void
merge_table_init (MergeTable *t, guint expected)
{
  guint64 cap = 16;
  while (cap < (guint64) expected * 2)
    cap <<= 1;
  t->slots = g_new0 (MergeSlot, cap);
  t->mask = cap - 1;
  t->count = 0;
}

/* Later duplicates overwrite earlier ones, as the HashMap insert of `tokenizers`. */
static void
merge_table_put (MergeTable *t, int32_t a, int32_t b, int32_t rank, int32_t new_id)
{
  guint64 key = ((guint64) (guint32) a << 32) | (guint32) b;
  guint64 i = merge_hash (key) & t->mask;
  while (t->slots[i].used && t->slots[i].key != key)
    i = (i + 1) & t->mask;
  if (!t->slots[i].used)
    t->count++;
  t->slots[i].used = TRUE;
  t->slots[i].key = key;
  t->slots[i].rank = rank;
  t->slots[i].new_id = new_id;
}

static inline const MergeSlot *
merge_table_get (const MergeTable *t, int32_t a, int32_t b)
{
  guint64 key = ((guint64) (guint32) a << 32) | (guint32) b;
  guint64 i = merge_hash (key) & t->mask;
  while (t->slots[i].used) {
    if (t->slots[i].key == key)
      return &t->slots[i];
    i = (i + 1) & t->mask;
  }
  return NULL;
}

/* ------------------------------------------------------------------------ */
/* The tokenizer                                                            */

typedef struct {
  char *content;
  char *match;      /* what is searched for: the content, normalized for a normalized token */
  size_t match_len;
  int32_t id;
  gboolean normalized, lstrip, rstrip, special;
} AddedTok;

typedef struct {
  int n;
  int32_t ids[];
} CacheEntry;

struct _DiffuseClipTokenizer {
  gint refcount;
  char *folder;
  GStringChunk *strings;
  GHashTable *vocab;          /* char* (in strings) -> GINT_TO_POINTER (id + 1) */
  const char **id_to_token;   /* [n_ids], NULL for holes */
  int n_ids;
  int vocab_size;
  MergeTable merges;
  int32_t byte_id[256];       /* id of the byte's symbol, -1 if not in the vocab */
  int32_t byte_eow_id[256];   /* id of the byte's symbol + "</w>" */
  gint16 cp_to_byte[0x144];   /* inverse of bytes_to_unicode (decode), -1 if none */
  AddedTok *added;
  int n_added;
  gboolean any_raw_added, any_norm_added;
  int32_t bos_id, eos_id, pad_id, unk_id;
  int model_max_length;
  gboolean pad_left, trunc_left;
  GMutex cache_lock;
  GHashTable *cache;          /* word bytes -> CacheEntry* */
};

static int32_t
vocab_lookup_len (DiffuseClipTokenizer *tok, const char *s, size_t len)
{
  char buf[512];
  char *key = len < sizeof buf ? buf : g_malloc (len + 1);
  memcpy (key, s, len);
  key[len] = 0;
  gpointer v = g_hash_table_lookup (tok->vocab, key);
  if (key != buf)
    g_free (key);
  return v ? GPOINTER_TO_INT (v) - 1 : -1;
}

static int32_t
vocab_lookup (DiffuseClipTokenizer *tok, const char *s)
{
  gpointer v = g_hash_table_lookup (tok->vocab, s);
  return v ? GPOINTER_TO_INT (v) - 1 : -1;
}

/* ---- loading ------------------------------------------------------------ */

static gboolean
read_file (const char *path, gboolean required, char **contents, gsize *len, GError **error)
{
  GError *e = NULL;

  *contents = NULL;
  if (!g_file_test (path, G_FILE_TEST_EXISTS)) {
    if (!required)
      return TRUE;
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "CLIP tokenizer file '%s' not found", path);
    return FALSE;
  }
  if (!g_file_get_contents (path, contents, len, &e)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "cannot read '%s': %s", path, e->message);
    g_error_free (e);
    return FALSE;
  }
  return TRUE;
}

/* Parses a JSON file whose root must be an object.  *out is NULL (and TRUE
 * returned) when the file is absent and not required. */
static gboolean
load_json_object (const char *path, gboolean required, JsonParser **parser_out, JsonObject **out, GError **error)
{
  char *data;
  gsize len;
  GError *e = NULL;

  *out = NULL;
  *parser_out = NULL;
  if (!read_file (path, required, &data, &len, error))
    return FALSE;
  if (!data)
    return TRUE;
  JsonParser *parser = json_parser_new_immutable ();
  if (!json_parser_load_from_data (parser, data, len, &e)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "'%s' is not valid JSON: %s", path, e->message);
    g_error_free (e);
    g_object_unref (parser);
    g_free (data);
    return FALSE;
  }
  g_free (data);
  JsonNode *root = json_parser_get_root (parser);
  if (!root || !JSON_NODE_HOLDS_OBJECT (root)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "'%s': the JSON root is not an object", path);
    g_object_unref (parser);
    return FALSE;
  }
  *parser_out = parser;
  *out = json_node_get_object (root);
  return TRUE;
}

/* vocab.json is one flat JSON object {"token": id, ...} of ~50k entries; a
 * small strict parser for exactly that shape is 5-10x faster than building a
 * json-glib tree.  Anything else (nested values, non-integer ids, bad escapes,
 * trailing garbage) is DIFFUSE_ERROR_CORRUPT with the byte offset. */
typedef struct {
  const char *p, *start, *end;
  const char *path;
  GError **error;
} VocabParser;

static gboolean
vp_fail (VocabParser *vp, const char *what)
{
  g_set_error (vp->error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "'%s' is not a valid vocabulary: %s at byte %ld",
               vp->path, what, (long) (vp->p - vp->start));
  return FALSE;
}

static void
vp_ws (VocabParser *vp)
{
  while (vp->p < vp->end && (*vp->p == ' ' || *vp->p == '\t' || *vp->p == '\n' || *vp->p == '\r'))
    vp->p++;
}

static int
hex4 (const char *p)
{
  int v = 0;
  for (int i = 0; i < 4; i++) {
    int d = g_ascii_xdigit_value (p[i]);
    if (d < 0)
      return -1;
    v = v * 16 + d;
  }
  return v;
}

/* A JSON string into buf (without the quotes). */
static gboolean
vp_string (VocabParser *vp, GString *buf)
{
  g_string_truncate (buf, 0);
  if (vp->p >= vp->end || *vp->p != '"')
    return vp_fail (vp, "expected a string");
  vp->p++;
  for (;;) {
    const char *run = vp->p;
    while (vp->p < vp->end && *vp->p != '"' && *vp->p != '\\' && (guchar) *vp->p >= 0x20)
      vp->p++;
    g_string_append_len (buf, run, vp->p - run);
    if (vp->p >= vp->end)
      return vp_fail (vp, "unterminated string");
    if (*vp->p == '"') {
      vp->p++;
      break;
    }
    if ((guchar) *vp->p < 0x20)
      return vp_fail (vp, "control character in a string");
    /* escape */
    if (vp->end - vp->p < 2)
      return vp_fail (vp, "unterminated escape");
    char e = vp->p[1];
    vp->p += 2;
    switch (e) {
      case '"': g_string_append_c (buf, '"'); break;
      case '\\': g_string_append_c (buf, '\\'); break;
      case '/': g_string_append_c (buf, '/'); break;
      case 'b': g_string_append_c (buf, '\b'); break;
      case 'f': g_string_append_c (buf, '\f'); break;
      case 'n': g_string_append_c (buf, '\n'); break;
      case 'r': g_string_append_c (buf, '\r'); break;
      case 't': g_string_append_c (buf, '\t'); break;
      case 'u': {
        int u = vp->end - vp->p >= 4 ? hex4 (vp->p) : -1;
        if (u < 0)
          return vp_fail (vp, "bad \\u escape");
        vp->p += 4;
        gunichar c = u;
        if (u >= 0xd800 && u <= 0xdbff) {
          int lo = (vp->end - vp->p >= 6 && vp->p[0] == '\\' && vp->p[1] == 'u') ? hex4 (vp->p + 2) : -1;
          if (lo < 0xdc00 || lo > 0xdfff)
            return vp_fail (vp, "unpaired surrogate");
          vp->p += 6;
          c = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
        } else if (u >= 0xdc00 && u <= 0xdfff) {
          return vp_fail (vp, "unpaired surrogate");
        }
        if (c == 0)
          return vp_fail (vp, "a token with a NUL character");
        g_string_append_unichar (buf, c);
        break;
      }
      default:
        vp->p -= 2;
        return vp_fail (vp, "bad escape");
    }
  }
  if (!g_utf8_validate_len (buf->str, buf->len, NULL))
    return vp_fail (vp, "a string that is not UTF-8");
  return TRUE;
}

/* vocab_size and id -> token (for a duplicated id, one of its tokens, as
 * `tokenizers`' vocab_r), once tok->vocab is filled */
static void
index_vocab (DiffuseClipTokenizer *tok, int max_id)
{
  tok->vocab_size = g_hash_table_size (tok->vocab);
  tok->n_ids = max_id + 1;
  tok->id_to_token = g_new0 (const char *, tok->n_ids);
  GHashTableIter hit;
  gpointer hk, hv;
  g_hash_table_iter_init (&hit, tok->vocab);
  while (g_hash_table_iter_next (&hit, &hk, &hv))
    tok->id_to_token[GPOINTER_TO_INT (hv) - 1] = hk;
}

static gboolean
load_vocab (DiffuseClipTokenizer *tok, const char *path, GError **error)
{
  char *data;
  gsize len;
  int max_id = -1;

  if (!read_file (path, TRUE, &data, &len, error))
    return FALSE;
  VocabParser vp = { data, data, data + len, path, error };
  GString *key = g_string_sized_new (64);
  gboolean ok = FALSE;
  /* a UTF-8 byte order mark is tolerated */
  if (len >= 3 && memcmp (data, "\xef\xbb\xbf", 3) == 0)
    vp.p += 3;
  tok->vocab = g_hash_table_new (g_str_hash, g_str_equal);

  vp_ws (&vp);
  if (vp.p >= vp.end || *vp.p != '{') {
    vp_fail (&vp, "expected '{'");
    goto out;
  }
  vp.p++;
  vp_ws (&vp);
  if (vp.p < vp.end && *vp.p == '}') {
    vp.p++;
  } else {
    for (;;) {
      vp_ws (&vp);
      if (!vp_string (&vp, key))
        goto out;
      vp_ws (&vp);
      if (vp.p >= vp.end || *vp.p != ':') {
        vp_fail (&vp, "expected ':'");
        goto out;
      }
      vp.p++;
      vp_ws (&vp);
      const char *num = vp.p;
      gint64 id = 0;
      while (vp.p < vp.end && g_ascii_isdigit (*vp.p) && id < G_MAXINT32)
        id = id * 10 + (*vp.p++ - '0');
      if (vp.p == num || (vp.p - num > 1 && *num == '0') || id >= G_MAXINT32 - 1 ||
          (vp.p < vp.end && (g_ascii_isdigit (*vp.p) || *vp.p == '.' || *vp.p == 'e' || *vp.p == 'E'))) {
        vp.p = num;
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT,
                     "'%s': the entry for token '%s' is not a non-negative integer id (byte %ld)", path, key->str,
                     (long) (num - data));
        goto out;
      }
      char *k = g_string_chunk_insert_len (tok->strings, key->str, key->len);
      g_hash_table_insert (tok->vocab, k, GINT_TO_POINTER ((int) id + 1));
      if (id > max_id)
        max_id = (int) id;
      vp_ws (&vp);
      if (vp.p < vp.end && *vp.p == ',') {
        vp.p++;
        continue;
      }
      if (vp.p < vp.end && *vp.p == '}') {
        vp.p++;
        break;
      }
      vp_fail (&vp, "expected ',' or '}'");
      goto out;
    }
  }
  vp_ws (&vp);
  if (vp.p != vp.end) {
    vp_fail (&vp, "trailing data after the object");
    goto out;
  }
  if (g_hash_table_size (tok->vocab) == 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "'%s': the vocabulary is empty", path);
    goto out;
  }
  index_vocab (tok, max_id);
  ok = TRUE;

out:
  g_string_free (key, TRUE);
  g_free (data);
  return ok;
}

static gboolean
load_merges (DiffuseClipTokenizer *tok, const char *path, GError **error)
{
  char *data;
  gsize len;

  if (!read_file (path, TRUE, &data, &len, error))
    return FALSE;
  /* Lines as Rust's BufRead::lines (split at \n, one trailing \r dropped, no
   * empty last line); lines starting with "#version" skipped; every other
   * line exactly "left right" (split at single spaces). */
  guint n_lines = 1;
  for (gsize i = 0; i < len; i++)
    n_lines += data[i] == '\n';
  merge_table_init (&tok->merges, n_lines);

  char buf[1024];
  int rank = 0;
  gsize pos = 0;
  guint line_no = 0;
  gboolean ok = TRUE;
  while (pos < len) {
    gsize end = pos;
    while (end < len && data[end] != '\n')
      end++;
    gsize next = end + 1;
    line_no++;
    if (end > pos && data[end - 1] == '\r')
      end--;
    const char *line = data + pos;
    gsize llen = end - pos;
    pos = next;
    if (llen >= 8 && memcmp (line, "#version", 8) == 0)
      continue;
    const char *sp = memchr (line, ' ', llen);
    if (!sp || memchr (sp + 1, ' ', line + llen - sp - 1) || memchr (line, '\0', llen)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT,
                   "'%s' line %u: a merge must be two tokens separated by one space, got \"%.*s\"", path, line_no,
                   (int) MIN (llen, 80), line);
      ok = FALSE;
      break;
    }
    gsize la = sp - line, lb = llen - la - 1;
    int32_t a = vocab_lookup_len (tok, line, la);
    int32_t b = vocab_lookup_len (tok, sp + 1, lb);
    int32_t ab = -1;
    if (a >= 0 && b >= 0) {
      char *cat = la + lb < sizeof buf ? buf : g_malloc (la + lb + 1);
      memcpy (cat, line, la);
      memcpy (cat + la, sp + 1, lb);
      cat[la + lb] = 0;
      ab = vocab_lookup (tok, cat);
      if (cat != buf)
        g_free (cat);
    }
    if (a < 0 || b < 0 || ab < 0) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT,
                   "'%s' line %u: merge \"%.*s\" uses a token that is not in vocab.json", path, line_no,
                   (int) MIN (llen, 80), line);
      ok = FALSE;
      break;
    }
    merge_table_put (&tok->merges, a, b, rank++, ab);
  }
  g_free (data);
  return ok;
}

/* transformers >= 5 saves a tokenizer as tokenizer.json alone (the
 * `tokenizers` library's file): its BPE model holds the vocabulary and the
 * merges ("a b" strings, or ["a", "b"] pairs since tokenizers 0.20), its
 * added_tokens the special tokens' flags (returned in *added as an
 * added_tokens_decoder-like object: id -> flags).  The normalizer,
 * pre-tokenizer and post-processor are CLIP's (this tokenizer's fixed
 * pipeline); a model of another type or another word suffix is refused. */
static gboolean
load_tokenizer_json (DiffuseClipTokenizer *tok, const char *path, JsonParser **parser_out, JsonObject **added,
                     GError **error)
{
  JsonObject *root = NULL;
  *added = NULL;
  if (!load_json_object (path, TRUE, parser_out, &root, error))
    return FALSE;
  JsonNode *mn = json_object_get_member (root, "model");
  JsonObject *m = mn && JSON_NODE_HOLDS_OBJECT (mn) ? json_node_get_object (mn) : NULL;
  const char *type = m && json_object_has_member (m, "type") ? json_object_get_string_member_with_default (m, "type", "")
                                                              : "";
  if (!m || strcmp (type, "BPE") != 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "'%s': the tokenizer model is \"%s\", not CLIP's BPE",
                 path, type);
    return FALSE;
  }
  const char *suffix = json_object_get_string_member_with_default (m, "end_of_word_suffix", "");
  const char *prefix = json_object_get_string_member_with_default (m, "continuing_subword_prefix", "");
  if (g_strcmp0 (suffix, "</w>") != 0 || (prefix && *prefix) ||
      json_object_get_boolean_member_with_default (m, "byte_fallback", FALSE)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "'%s': a BPE model other than CLIP's (end_of_word_suffix \"%s\", continuing_subword_prefix \"%s\")",
                 path, suffix ? suffix : "", prefix ? prefix : "");
    return FALSE;
  }
  JsonNode *vn = json_object_get_member (m, "vocab");
  JsonNode *gn = json_object_get_member (m, "merges");
  if (!vn || !JSON_NODE_HOLDS_OBJECT (vn) || !gn || !JSON_NODE_HOLDS_ARRAY (gn)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "'%s': model.vocab / model.merges missing", path);
    return FALSE;
  }
  /* the vocabulary, as load_vocab */
  tok->vocab = g_hash_table_new (g_str_hash, g_str_equal);
  JsonObjectIter it;
  const char *key;
  JsonNode *v;
  gint64 max_id = -1;
  json_object_iter_init (&it, json_node_get_object (vn));
  while (json_object_iter_next (&it, &key, &v)) {
    gint64 id = JSON_NODE_HOLDS_VALUE (v) && json_node_get_value_type (v) == G_TYPE_INT64 ? json_node_get_int (v) : -1;
    if (id < 0 || id >= G_MAXINT32 - 1) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT,
                   "'%s': the entry for token '%s' is not a non-negative integer id", path, key);
      return FALSE;
    }
    char *k = g_string_chunk_insert (tok->strings, key);
    g_hash_table_insert (tok->vocab, k, GINT_TO_POINTER ((int) id + 1));
    max_id = MAX (max_id, id);
  }
  if (g_hash_table_size (tok->vocab) == 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "'%s': the vocabulary is empty", path);
    return FALSE;
  }
  index_vocab (tok, (int) max_id);

  /* the merges, in rank order */
  JsonArray *ga = json_node_get_array (gn);
  const guint n = json_array_get_length (ga);
  merge_table_init (&tok->merges, n + 1);
  for (guint i = 0; i < n; i++) {
    JsonNode *e = json_array_get_element (ga, i);
    char *left = NULL, *right = NULL;
    if (JSON_NODE_HOLDS_VALUE (e) && json_node_get_value_type (e) == G_TYPE_STRING) {
      const char *str = json_node_get_string (e), *sp = strchr (str, ' ');
      if (sp && !strchr (sp + 1, ' ')) {
        left = g_strndup (str, sp - str);
        right = g_strdup (sp + 1);
      }
    } else if (JSON_NODE_HOLDS_ARRAY (e) && json_array_get_length (json_node_get_array (e)) == 2) {
      JsonArray *pair = json_node_get_array (e);
      JsonNode *a = json_array_get_element (pair, 0), *b = json_array_get_element (pair, 1);
      if (JSON_NODE_HOLDS_VALUE (a) && json_node_get_value_type (a) == G_TYPE_STRING && JSON_NODE_HOLDS_VALUE (b) &&
          json_node_get_value_type (b) == G_TYPE_STRING) {
        left = g_strdup (json_node_get_string (a));
        right = g_strdup (json_node_get_string (b));
      }
    }
    int32_t ia = left ? vocab_lookup (tok, left) : -1, ib = right ? vocab_lookup (tok, right) : -1, iab = -1;
    if (ia >= 0 && ib >= 0) {
      char *cat = g_strconcat (left, right, NULL);
      iab = vocab_lookup (tok, cat);
      g_free (cat);
    }
    g_free (left);
    g_free (right);
    if (iab < 0) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT,
                   "'%s': merge %u is not two tokens of the vocabulary whose concatenation is one too", path, i);
      return FALSE;
    }
    merge_table_put (&tok->merges, ia, ib, (int32_t) i, iab);
  }

  /* added_tokens: [{id, content, flags...}] -> {"id": {content, flags...}} */
  JsonNode *an = json_object_get_member (root, "added_tokens");
  if (an && JSON_NODE_HOLDS_ARRAY (an)) {
    JsonArray *aa = json_node_get_array (an);
    *added = json_object_new ();
    for (guint i = 0; i < json_array_get_length (aa); i++) {
      JsonNode *e = json_array_get_element (aa, i);
      if (!JSON_NODE_HOLDS_OBJECT (e) || !json_object_has_member (json_node_get_object (e), "id"))
        continue;
      JsonObject *src = json_node_get_object (e);
      JsonObject *dst = json_object_new ();
      JsonObjectIter ai;
      const char *ak;
      JsonNode *av;
      json_object_iter_init (&ai, src);
      while (json_object_iter_next (&ai, &ak, &av))
        if (strcmp (ak, "id") != 0)
          json_object_set_member (dst, ak, json_node_copy (av));
      char *idk = g_strdup_printf ("%" G_GINT64_FORMAT, json_object_get_int_member (src, "id"));
      json_object_set_object_member (*added, idk, dst);
      g_free (idk);
    }
  }
  return TRUE;
}

static char *normalize (const char *s, size_t n);

/* One special/added token as transformers sees it while building its list. */
typedef struct {
  gboolean present;
  char *content;
  gboolean from_string;
  gboolean normalized, lstrip, rstrip, single_word, special;
  gboolean named;      /* a named or extra special token (always special in the end) */
  const char *origin;  /* file name for messages */
} TokSpec;

static void
tok_spec_clear (TokSpec *s)
{
  g_free (s->content);
  memset (s, 0, sizeof *s);
}

static gboolean
tok_spec_equal (const TokSpec *a, const TokSpec *b)
{
  if (a->from_string || b->from_string)
    return a->from_string && b->from_string && strcmp (a->content, b->content) == 0;
  return strcmp (a->content, b->content) == 0 && a->normalized == b->normalized && a->lstrip == b->lstrip &&
         a->rstrip == b->rstrip && a->single_word == b->single_word && a->special == b->special;
}

static gboolean
obj_bool (JsonObject *o, const char *key, gboolean def)
{
  JsonNode *n = json_object_get_member (o, key);
  if (!n || !JSON_NODE_HOLDS_VALUE (n) || json_node_get_value_type (n) != G_TYPE_BOOLEAN)
    return def;
  return json_node_get_boolean (n);
}

/* A token value: a string, or an AddedToken object ({"content": ..., flags}).
 * `force_special`: special_tokens_map.json entries are always special. */
static gboolean
parse_tok_spec (JsonNode *node, const char *origin, const char *key, gboolean force_special, TokSpec *out,
                GError **error)
{
  memset (out, 0, sizeof *out);
  out->origin = origin;
  if (!node || JSON_NODE_HOLDS_NULL (node))
    return TRUE;
  if (JSON_NODE_HOLDS_VALUE (node) && json_node_get_value_type (node) == G_TYPE_STRING) {
    out->present = TRUE;
    out->content = g_strdup (json_node_get_string (node));
    out->from_string = TRUE;
    out->special = TRUE;
    out->normalized = FALSE;
    return TRUE;
  }
  if (JSON_NODE_HOLDS_OBJECT (node)) {
    JsonObject *o = json_node_get_object (node);
    JsonNode *c = json_object_get_member (o, "content");
    if (c && JSON_NODE_HOLDS_VALUE (c) && json_node_get_value_type (c) == G_TYPE_STRING) {
      out->present = TRUE;
      out->content = g_strdup (json_node_get_string (c));
      out->special = force_special ? TRUE : obj_bool (o, "special", FALSE);
      out->normalized = obj_bool (o, "normalized", !out->special);
      out->lstrip = obj_bool (o, "lstrip", FALSE);
      out->rstrip = obj_bool (o, "rstrip", FALSE);
      out->single_word = obj_bool (o, "single_word", FALSE);
      return TRUE;
    }
  }
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
               "'%s': \"%s\" must be a string or an object with a \"content\" string", origin, key);
  return FALSE;
}

static const char *const special_keys[] = {
  "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
};
enum { K_BOS, K_EOS, K_UNK, K_SEP, K_PAD, K_CLS, K_MASK, N_KEYS };

/* Appends the entries of a list of extra special tokens. */
static gboolean
parse_extra_list (JsonObject *o, const char *origin, gboolean force_special, GArray *extras, GError **error)
{
  static const char *const keys[] = { "additional_special_tokens", "extra_special_tokens" };
  for (guint k = 0; k < G_N_ELEMENTS (keys); k++) {
    JsonNode *n = json_object_get_member (o, keys[k]);
    if (!n || JSON_NODE_HOLDS_NULL (n))
      continue;
    if (!JSON_NODE_HOLDS_ARRAY (n)) {
      /* a dict of named model tokens (transformers 5): their values */
      if (JSON_NODE_HOLDS_OBJECT (n)) {
        JsonObjectIter it;
        const char *name;
        JsonNode *v;
        json_object_iter_init (&it, json_node_get_object (n));
        while (json_object_iter_next (&it, &name, &v)) {
          TokSpec s;
          if (!parse_tok_spec (v, origin, keys[k], TRUE, &s, error))
            return FALSE;
          if (s.present)
            g_array_append_val (extras, s);
        }
        continue;
      }
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "'%s': \"%s\" must be a list", origin, keys[k]);
      return FALSE;
    }
    JsonArray *a = json_node_get_array (n);
    for (guint i = 0; i < json_array_get_length (a); i++) {
      TokSpec s;
      if (!parse_tok_spec (json_array_get_element (a, i), origin, keys[k], force_special, &s, error))
        return FALSE;
      if (s.present)
        g_array_append_val (extras, s);
    }
  }
  return TRUE;
}

static gboolean
parse_side (JsonObject *cfg, const char *key, const char *origin, gboolean *left, GError **error)
{
  JsonNode *n = json_object_get_member (cfg, key);
  *left = FALSE;
  if (!n || JSON_NODE_HOLDS_NULL (n))
    return TRUE;
  const char *s = (JSON_NODE_HOLDS_VALUE (n) && json_node_get_value_type (n) == G_TYPE_STRING)
                      ? json_node_get_string (n)
                      : NULL;
  if (s && strcmp (s, "right") == 0)
    return TRUE;
  if (s && strcmp (s, "left") == 0) {
    *left = TRUE;
    return TRUE;
  }
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "'%s': \"%s\" must be \"right\" or \"left\"", origin, key);
  return FALSE;
}

/* Reads tokenizer_config.json / special_tokens_map.json and resolves the
 * special tokens as transformers 5 does (see tokenization_utils_base.py
 * from_pretrained and TokenizersBackend.__init__):
 *  - with "added_tokens_decoder" in tokenizer_config.json, those tokens (in id
 *    order) carry the flags and special_tokens_map.json is not read;
 *  - otherwise special_tokens_map.json's entries override the config's;
 *  - the named tokens (bos, eos, unk, sep, pad, cls, mask, then extras) are
 *    appended to the added-token list unless an equal token is already there
 *    (a string never equals an AddedToken object); when a content appears
 *    several times, the last entry's flags win (the `tokenizers` add). */
static gboolean
load_special_tokens (DiffuseClipTokenizer *tok, const char *folder, JsonObject *json_added, GError **error)
{
  char *cfg_path = g_build_filename (folder, "tokenizer_config.json", NULL);
  char *stm_path = g_build_filename (folder, "special_tokens_map.json", NULL);
  char *atj_path = g_build_filename (folder, "added_tokens.json", NULL);
  JsonParser *cfg_parser = NULL, *stm_parser = NULL, *atj_parser = NULL;
  JsonObject *cfg = NULL, *stm = NULL, *atj = NULL;
  TokSpec named[N_KEYS];
  GArray *extras = g_array_new (FALSE, TRUE, sizeof (TokSpec));
  GArray *list = g_array_new (FALSE, TRUE, sizeof (TokSpec));   /* transformers' tokens_to_add */
  gboolean ok = FALSE;

  memset (named, 0, sizeof named);
  if (!load_json_object (cfg_path, FALSE, &cfg_parser, &cfg, error))
    goto out;
  if (!load_json_object (atj_path, FALSE, &atj_parser, &atj, error))
    goto out;
  if (atj && json_object_get_size (atj) > 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "'%s': tokens added beyond vocab.json are not supported", atj_path);
    goto out;
  }

  /* the added tokens' flags: tokenizer_config.json's added_tokens_decoder,
   * else tokenizer.json's added_tokens (a tokenizer saved by transformers 5) */
  JsonNode *atd_node = cfg ? json_object_get_member (cfg, "added_tokens_decoder") : NULL;
  JsonObject *atd_obj = atd_node && JSON_NODE_HOLDS_OBJECT (atd_node) ? json_node_get_object (atd_node) : json_added;
  gboolean has_atd = atd_obj != NULL;

  tok->model_max_length = CLIP_DEFAULT_MAX_LENGTH;
  if (cfg) {
    for (int k = 0; k < N_KEYS; k++)
      if (!parse_tok_spec (json_object_get_member (cfg, special_keys[k]), cfg_path, special_keys[k], FALSE,
                           &named[k], error))
        goto out;
    if (!parse_extra_list (cfg, cfg_path, FALSE, extras, error))
      goto out;

    JsonNode *mml = json_object_get_member (cfg, "model_max_length");
    if (!mml || JSON_NODE_HOLDS_NULL (mml))
      mml = json_object_get_member (cfg, "max_len");
    if (mml && !JSON_NODE_HOLDS_NULL (mml)) {
      double v;
      if (!JSON_NODE_HOLDS_VALUE (mml) ||
          (json_node_get_value_type (mml) != G_TYPE_INT64 && json_node_get_value_type (mml) != G_TYPE_DOUBLE)) {
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "'%s': \"model_max_length\" is not a number",
                     cfg_path);
        goto out;
      }
      v = json_node_get_double (mml);
      /* json-glib turns an integer literal beyond int64 (transformers'
       * 1000000000000000019884624838656 for "unset") into -1 or INT64_MIN:
       * a negative integer is taken as that sentinel */
      if (json_node_get_value_type (mml) == G_TYPE_INT64 && json_node_get_int (mml) < 0)
        v = G_MAXDOUBLE;
      if (v < 2) {
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "'%s': \"model_max_length\" %g is below 2", cfg_path,
                     v);
        goto out;
      }
      if (v <= CLIP_MAX_LENGTH_SENTINEL)
        tok->model_max_length = (int) v;
    }
    if (!parse_side (cfg, "padding_side", cfg_path, &tok->pad_left, error) ||
        !parse_side (cfg, "truncation_side", cfg_path, &tok->trunc_left, error))
      goto out;
  }

  if (!has_atd) {
    if (!load_json_object (stm_path, FALSE, &stm_parser, &stm, error))
      goto out;
    if (stm) {
      for (int k = 0; k < N_KEYS; k++) {
        JsonNode *n = json_object_get_member (stm, special_keys[k]);
        if (!n)
          continue;
        TokSpec s;
        if (!parse_tok_spec (n, stm_path, special_keys[k], TRUE, &s, error))
          goto out;
        tok_spec_clear (&named[k]);
        named[k] = s;
      }
      if (!parse_extra_list (stm, stm_path, TRUE, extras, error))
        goto out;
    }
  }

  /* CLIPTokenizer.__init__ defaults */
  static const char *const defaults[N_KEYS] = {
    "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", NULL, "<|endoftext|>", NULL, NULL,
  };
  for (int k = 0; k < N_KEYS; k++)
    if (!named[k].present && defaults[k]) {
      named[k].present = TRUE;
      named[k].content = g_strdup (defaults[k]);
      named[k].from_string = TRUE;
      named[k].special = TRUE;
      named[k].origin = "CLIPTokenizer defaults";
    }

  if (has_atd) {
    JsonObject *atd = atd_obj;
    JsonObjectIter it;
    const char *idstr;
    JsonNode *v;
    GArray *tmp = g_array_new (FALSE, TRUE, sizeof (TokSpec));
    GArray *keys = g_array_new (FALSE, FALSE, sizeof (gint64));
    json_object_iter_init (&it, atd);
    while (json_object_iter_next (&it, &idstr, &v)) {
      TokSpec s;
      if (!parse_tok_spec (v, cfg_path, "added_tokens_decoder", FALSE, &s, error)) {
        for (guint i = 0; i < tmp->len; i++)
          tok_spec_clear (&g_array_index (tmp, TokSpec, i));
        g_array_free (tmp, TRUE);
        g_array_free (keys, TRUE);
        goto out;
      }
      if (!s.present)
        continue;
      s.from_string = FALSE;
      gint64 id = g_ascii_strtoll (idstr, NULL, 10);
      /* insertion sort by id (a handful of entries) */
      guint at = 0;
      while (at < keys->len && g_array_index (keys, gint64, at) <= id)
        at++;
      g_array_insert_val (keys, at, id);
      g_array_insert_val (tmp, at, s);
    }
    g_array_append_vals (list, tmp->data, tmp->len);
    g_array_free (tmp, TRUE);
    g_array_free (keys, TRUE);
  }
  guint n_from_atd = list->len;

  for (int pass = 0; pass < 2; pass++) {
    guint n = pass == 0 ? N_KEYS : extras->len;
    for (guint k = 0; k < n; k++) {
      TokSpec *s = pass == 0 ? &named[k] : &g_array_index (extras, TokSpec, k);
      if (!s->present)
        continue;
      gboolean skip = FALSE;
      for (guint j = 0; j < list->len && !skip; j++) {
        TokSpec *o = &g_array_index (list, TokSpec, j);
        if (j < n_from_atd ? strcmp (o->content, s->content) == 0 : tok_spec_equal (o, s))
          skip = TRUE;
      }
      if (skip)
        continue;
      TokSpec copy = *s;
      copy.content = g_strdup (s->content);
      copy.named = TRUE;
      g_array_append_val (list, copy);
    }
  }

  /* Distinct contents, flags of the last entry. */
  tok->added = g_new0 (AddedTok, list->len ? list->len : 1);
  for (guint j = 0; j < list->len; j++) {
    TokSpec *s = &g_array_index (list, TokSpec, j);
    if (s->content[0] == 0)
      continue;
    int slot = -1;
    for (int i = 0; i < tok->n_added; i++)
      if (strcmp (tok->added[i].content, s->content) == 0)
        slot = i;
    if (slot < 0) {
      int32_t id = vocab_lookup (tok, s->content);
      if (id < 0) {
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                     "CLIP tokenizer '%s': special token \"%s\" (from %s) is not in vocab.json", folder, s->content,
                     s->origin ? s->origin : "tokenizer_config.json");
        goto out;
      }
      slot = tok->n_added++;
      tok->added[slot].content = g_strdup (s->content);
      tok->added[slot].id = id;
    }
    if (s->single_word) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                   "CLIP tokenizer '%s': special token \"%s\" is flagged single_word, which is not supported", folder,
                   s->content);
      goto out;
    }
    tok->added[slot].normalized = s->normalized;
    tok->added[slot].lstrip = s->lstrip;
    tok->added[slot].rstrip = s->rstrip;
    tok->added[slot].special = s->special || s->named;
  }
  for (int i = 0; i < tok->n_added; i++) {
    /* `tokenizers` matches a normalized token by its normalized content */
    AddedTok *a = &tok->added[i];
    a->match = a->normalized ? normalize (a->content, strlen (a->content)) : g_strdup (a->content);
    a->match_len = strlen (a->match);
    if (tok->added[i].normalized)
      tok->any_norm_added = TRUE;
    else
      tok->any_raw_added = TRUE;
  }

  /* Named ids.  bos/eos/pad must exist (post-processor and padding). */
  int32_t *dst[N_KEYS] = { &tok->bos_id, &tok->eos_id, &tok->unk_id, NULL, &tok->pad_id, NULL, NULL };
  for (int k = 0; k < N_KEYS; k++) {
    if (!dst[k])
      continue;
    *dst[k] = named[k].present ? vocab_lookup (tok, named[k].content) : -1;
    if (*dst[k] < 0 && k != K_UNK) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                   "CLIP tokenizer '%s': %s \"%s\" is not in vocab.json", folder, special_keys[k],
                   named[k].present ? named[k].content : "(none)");
      goto out;
    }
  }
  ok = TRUE;

out:
  for (int k = 0; k < N_KEYS; k++)
    tok_spec_clear (&named[k]);
  for (guint i = 0; i < extras->len; i++)
    tok_spec_clear (&g_array_index (extras, TokSpec, i));
  for (guint i = 0; i < list->len; i++)
    tok_spec_clear (&g_array_index (list, TokSpec, i));
  g_array_free (extras, TRUE);
  g_array_free (list, TRUE);
  g_clear_object (&cfg_parser);
  g_clear_object (&stm_parser);
  g_clear_object (&atj_parser);
  g_free (cfg_path);
  g_free (stm_path);
  g_free (atj_path);
  return ok;
}

DiffuseClipTokenizer *
diffuse_clip_tokenizer_load (const char *folder, GError **error)
{
  g_return_val_if_fail (folder != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  if (!g_file_test (folder, G_FILE_TEST_IS_DIR)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "CLIP tokenizer folder '%s' not found", folder);
    return NULL;
  }

  DiffuseClipTokenizer *tok = g_new0 (DiffuseClipTokenizer, 1);
  tok->refcount = 1;
  tok->folder = g_strdup (folder);
  tok->strings = g_string_chunk_new (64 * 1024);
  tok->unk_id = -1;
  g_mutex_init (&tok->cache_lock);
  tok->cache = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);

  char *vocab_path = g_build_filename (folder, "vocab.json", NULL);
  char *merges_path = g_build_filename (folder, "merges.txt", NULL);
  char *tj_path = g_build_filename (folder, "tokenizer.json", NULL);
  gboolean ok;
  if (!g_file_test (vocab_path, G_FILE_TEST_EXISTS) && g_file_test (tj_path, G_FILE_TEST_EXISTS)) {
    JsonParser *tj = NULL;
    JsonObject *added = NULL;
    ok = load_tokenizer_json (tok, tj_path, &tj, &added, error) && load_special_tokens (tok, folder, added, error);
    if (added)
      json_object_unref (added);
    g_clear_object (&tj);
  } else {
    ok = load_vocab (tok, vocab_path, error) && load_merges (tok, merges_path, error) &&
         load_special_tokens (tok, folder, NULL, error);
  }
  g_free (vocab_path);
  g_free (merges_path);
  g_free (tj_path);
  if (!ok) {
    diffuse_clip_tokenizer_unref (tok);
    return NULL;
  }

  for (int i = 0; i < 0x144; i++)
    tok->cp_to_byte[i] = -1;
  for (int b = 0; b < 256; b++) {
    char s[16];
    gunichar u = byte_to_unichar (b);
    int n = g_unichar_to_utf8 (u, s);
    s[n] = 0;
    tok->byte_id[b] = vocab_lookup (tok, s);
    strcpy (s + n, "</w>");
    tok->byte_eow_id[b] = vocab_lookup (tok, s);
    tok->cp_to_byte[u] = (gint16) b;
  }
  return tok;
}

DiffuseClipTokenizer *
diffuse_clip_tokenizer_ref (DiffuseClipTokenizer *tok)
{
  g_return_val_if_fail (tok != NULL, NULL);
  g_atomic_int_inc (&tok->refcount);
  return tok;
}

void
diffuse_clip_tokenizer_unref (DiffuseClipTokenizer *tok)
{
  if (!tok || !g_atomic_int_dec_and_test (&tok->refcount))
    return;
  g_free (tok->folder);
  if (tok->vocab)
    g_hash_table_destroy (tok->vocab);
  g_free (tok->id_to_token);
  g_free (tok->merges.slots);
  for (int i = 0; i < tok->n_added; i++) {
    g_free (tok->added[i].content);
    g_free (tok->added[i].match);
  }
  g_free (tok->added);
  g_hash_table_destroy (tok->cache);
  g_mutex_clear (&tok->cache_lock);
  g_string_chunk_free (tok->strings);
  g_free (tok);
}

void
diffuse_clip_tokenizer_free (DiffuseClipTokenizer *tok)
{
  diffuse_clip_tokenizer_unref (tok);
}

/* ---- BPE ---------------------------------------------------------------- */

typedef struct {
  int32_t rank, pos, new_id;
} HeapItem;

static inline gboolean
heap_less (const HeapItem *a, const HeapItem *b)
{
  return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void
heap_push (GArray *h, HeapItem it)
{
  g_array_append_val (h, it);
  HeapItem *d = (HeapItem *) h->data;
  guint i = h->len - 1;
  while (i > 0) {
    guint p = (i - 1) / 2;
    if (!heap_less (&d[i], &d[p]))
      break;
    HeapItem t = d[i];
    d[i] = d[p];
    d[p] = t;
    i = p;
  }
}

static HeapItem
heap_pop (GArray *h)
{
  HeapItem *d = (HeapItem *) h->data;
  HeapItem top = d[0];
  d[0] = d[h->len - 1];
  g_array_set_size (h, h->len - 1);
  d = (HeapItem *) h->data;
  guint n = h->len, i = 0;
  for (;;) {
    guint l = 2 * i + 1, r = l + 1, m = i;
    if (l < n && heap_less (&d[l], &d[m]))
      m = l;
    if (r < n && heap_less (&d[r], &d[m]))
      m = r;
    if (m == i)
      break;
    HeapItem t = d[i];
    d[i] = d[m];
    d[m] = t;
    i = m;
  }
  return top;
}

/* BPE of one pre-token (its UTF-8 bytes), as `tokenizers`' Word::merge_all:
 * a priority queue of (rank, position); the lowest rank, then the leftmost,
 * is merged first; stale entries are skipped. */
static void
bpe_word_compute (DiffuseClipTokenizer *tok, const guchar *p, size_t n, GArray *out)
{
  int32_t stack_c[64], stack_prev[64], stack_next[64];
  int32_t *c = stack_c, *prev = stack_prev, *next = stack_next;
  gboolean heap_alloc = n > 64;
  int m = 0;

  if (heap_alloc) {
    c = g_new (int32_t, n);
    prev = g_new (int32_t, n);
    next = g_new (int32_t, n);
  }
  for (size_t i = 0; i < n; i++) {
    int32_t id = i + 1 == n ? tok->byte_eow_id[p[i]] : tok->byte_id[p[i]];
    if (id < 0) {
      if (tok->unk_id < 0)
        continue;   /* no unk token: the symbol is dropped, as `tokenizers` does */
      id = tok->unk_id;
    }
    c[m] = id;
    prev[m] = m - 1;
    next[m] = m + 1;
    m++;
  }
  if (m > 0)
    next[m - 1] = -1;

  GArray *heap = g_array_sized_new (FALSE, FALSE, sizeof (HeapItem), m);
  for (int i = 0; i + 1 < m; i++) {
    const MergeSlot *s = merge_table_get (&tok->merges, c[i], c[i + 1]);
    if (s)
      heap_push (heap, (HeapItem) { s->rank, i, s->new_id });
  }
  /* alive: c[i] >= 0 (dead symbols get -1) */
  while (heap->len) {
    HeapItem top = heap_pop (heap);
    int i = top.pos;
    if (c[i] < 0 || next[i] < 0)
      continue;
    int j = next[i];
    const MergeSlot *s = merge_table_get (&tok->merges, c[i], c[j]);
    if (!s || s->new_id != top.new_id || s->rank != top.rank)
      continue;
    c[i] = top.new_id;
    next[i] = next[j];
    c[j] = -1;
    if (next[i] >= 0)
      prev[next[i]] = i;
    if (prev[i] >= 0) {
      const MergeSlot *l = merge_table_get (&tok->merges, c[prev[i]], c[i]);
      if (l)
        heap_push (heap, (HeapItem) { l->rank, prev[i], l->new_id });
    }
    if (next[i] >= 0) {
      const MergeSlot *r = merge_table_get (&tok->merges, c[i], c[next[i]]);
      if (r)
        heap_push (heap, (HeapItem) { r->rank, i, r->new_id });
    }
  }
  g_array_free (heap, TRUE);

  for (int i = 0; i >= 0 && i < m; i = next[i])
    g_array_append_val (out, c[i]);
  if (heap_alloc) {
    g_free (c);
    g_free (prev);
    g_free (next);
  }
}

static void
bpe_word (DiffuseClipTokenizer *tok, const char *p, size_t n, GArray *out)
{
  if (n == 0)
    return;
  if (n > CACHE_MAX_WORD) {
    bpe_word_compute (tok, (const guchar *) p, n, out);
    return;
  }
  char key[CACHE_MAX_WORD + 1];
  memcpy (key, p, n);
  key[n] = 0;

  g_mutex_lock (&tok->cache_lock);
  CacheEntry *e = g_hash_table_lookup (tok->cache, key);
  if (e) {
    g_array_append_vals (out, e->ids, e->n);
    g_mutex_unlock (&tok->cache_lock);
    return;
  }
  g_mutex_unlock (&tok->cache_lock);

  guint start = out->len;
  bpe_word_compute (tok, (const guchar *) p, n, out);
  int k = out->len - start;

  g_mutex_lock (&tok->cache_lock);
  if (g_hash_table_size (tok->cache) < CACHE_MAX_ENTRIES && !g_hash_table_contains (tok->cache, key)) {
    e = g_malloc (sizeof (CacheEntry) + sizeof (int32_t) * (k ? k : 1));
    e->n = k;
    memcpy (e->ids, &g_array_index (out, int32_t, start), sizeof (int32_t) * k);
    g_hash_table_insert (tok->cache, g_strdup (key), e);
  }
  g_mutex_unlock (&tok->cache_lock);
}

/* ---- pre-tokenization ---------------------------------------------------- */

static gboolean
has_prefix_len (const char *s, size_t n, const char *prefix)
{
  size_t l = strlen (prefix);
  return n >= l && memcmp (s, prefix, l) == 0;
}

/* Splits normalized text with CLIP's pattern (leftmost-first alternation):
 *   <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
 * keeping the matches; each match is then split by the GPT-2 byte-level
 * pattern, which only changes the two literal special words (a letter run,
 * a digit, a contraction or a run of other characters is one GPT-2 piece):
 * "<|endoftext|>" -> "<|", "endoftext", "|>". */
static void
pretokenize_and_bpe (DiffuseClipTokenizer *tok, const char *s, size_t n, GArray *out)
{
  static const char *const contractions[] = { "'s", "'t", "'re", "'ve", "'m", "'ll", "'d" };
  size_t i = 0;

  while (i < n) {
    const char *q = s + i;
    size_t rem = n - i;
    if (q[0] == '<') {
      const char *word = NULL;
      if (has_prefix_len (q, rem, "<|startoftext|>"))
        word = "startoftext";
      else if (has_prefix_len (q, rem, "<|endoftext|>"))
        word = "endoftext";
      if (word) {
        size_t wl = strlen (word);
        bpe_word (tok, q, 2, out);
        bpe_word (tok, q + 2, wl, out);
        bpe_word (tok, q + 2 + wl, 2, out);
        i += wl + 4;
        continue;
      }
    }
    if (q[0] == '\'') {
      size_t cl = 0;
      for (guint k = 0; k < G_N_ELEMENTS (contractions) && !cl; k++)
        if (has_prefix_len (q, rem, contractions[k]))
          cl = strlen (contractions[k]);
      if (cl) {
        bpe_word (tok, q, cl, out);
        i += cl;
        continue;
      }
    }
    gunichar c = g_utf8_get_char (q);
    size_t cl = g_utf8_next_char (q) - q;
    DiffuseClipCharClass cls = _diffuse_clip_char_class (c);
    if (cls == DIFFUSE_CLIP_CHAR_SPACE) {
      i += cl;
      continue;
    }
    if (cls == DIFFUSE_CLIP_CHAR_NUMBER) {
      bpe_word (tok, q, cl, out);
      i += cl;
      continue;
    }
    size_t j = i + cl;
    while (j < n) {
      gunichar d = g_utf8_get_char (s + j);
      DiffuseClipCharClass dc = _diffuse_clip_char_class (d);
      if (cls == DIFFUSE_CLIP_CHAR_LETTER ? dc != DIFFUSE_CLIP_CHAR_LETTER : dc != DIFFUSE_CLIP_CHAR_OTHER)
        break;
      j = g_utf8_next_char (s + j) - s;
    }
    bpe_word (tok, q, j - i, out);
    i = j;
  }
}

/* NFC, every run of \s -> " ", lowercase (the normalizer sequence). */
static char *
normalize (const char *s, size_t n)
{
  char *nfc = g_utf8_normalize (s, n, G_NORMALIZE_NFC);
  if (!nfc)   /* cannot happen for valid UTF-8; keep the text as is */
    nfc = g_strndup (s, n);
  GString *out = g_string_sized_new (strlen (nfc) + 8);
  gboolean in_space = FALSE;
  for (const char *p = nfc; *p; p = g_utf8_next_char (p)) {
    gunichar c = g_utf8_get_char (p);
    if (_diffuse_clip_char_class (c) == DIFFUSE_CLIP_CHAR_SPACE) {
      if (!in_space)
        g_string_append_c (out, ' ');
      in_space = TRUE;
      continue;
    }
    in_space = FALSE;
    gunichar low[3];
    int k = _diffuse_clip_char_lower (c, low);
    for (int j = 0; j < k; j++)
      g_string_append_unichar (out, low[j]);
  }
  g_free (nfc);
  return g_string_free (out, FALSE);
}

static size_t
ws_len_before (const char *s, size_t from, size_t limit)
{
  /* start of the run of white space that ends at `from` (not before limit) */
  size_t i = from;
  while (i > limit) {
    const char *p = g_utf8_find_prev_char (s + limit, s + i);
    if (!p || _diffuse_clip_char_class (g_utf8_get_char (p)) != DIFFUSE_CLIP_CHAR_SPACE)
      break;
    i = p - s;
  }
  return i;
}

static size_t
ws_end_after (const char *s, size_t from, size_t n)
{
  size_t i = from;
  while (i < n && _diffuse_clip_char_class (g_utf8_get_char (s + i)) == DIFFUSE_CLIP_CHAR_SPACE)
    i = g_utf8_next_char (s + i) - s;
  return i;
}

typedef void (*TextFn) (DiffuseClipTokenizer *tok, const char *s, size_t n, GArray *out);

/* Cuts the added tokens with the given `normalized` flag out of s[0..n)
 * (leftmost-longest, as the Aho-Corasick matcher of `tokenizers`), honouring
 * lstrip/rstrip; the text between goes to fn. */
static void
split_added (DiffuseClipTokenizer *tok, const char *s, size_t n, gboolean normalized, TextFn fn, GArray *out)
{
  size_t start = 0, i = 0;

  while (i < n) {
    int best = -1;
    size_t best_len = 0;
    for (int k = 0; k < tok->n_added; k++) {
      AddedTok *a = &tok->added[k];
      if (a->normalized != normalized || a->match_len <= best_len || a->match_len > n - i || a->match_len == 0)
        continue;
      if (memcmp (s + i, a->match, a->match_len) == 0) {
        best = k;
        best_len = a->match_len;
      }
    }
    if (best < 0) {
      i++;
      continue;
    }
    AddedTok *a = &tok->added[best];
    size_t ms = i, me = i + best_len;
    if (a->lstrip)
      ms = ws_len_before (s, ms, start);
    if (a->rstrip)
      me = ws_end_after (s, me, n);
    if (ms > start)
      fn (tok, s + start, ms - start, out);
    g_array_append_val (out, a->id);
    start = me;
    i = MAX (me, i + best_len);
  }
  if (n > start)
    fn (tok, s + start, n - start, out);
}

static void
normalized_text (DiffuseClipTokenizer *tok, const char *s, size_t n, GArray *out)
{
  pretokenize_and_bpe (tok, s, n, out);
}

static void
raw_text (DiffuseClipTokenizer *tok, const char *s, size_t n, GArray *out)
{
  char *norm = normalize (s, n);
  size_t nn = strlen (norm);
  if (tok->any_norm_added)
    split_added (tok, norm, nn, TRUE, normalized_text, out);
  else
    pretokenize_and_bpe (tok, norm, nn, out);
  g_free (norm);
}

/* The ids of the text without bos/eos. */
static GArray *
encode_content (DiffuseClipTokenizer *tok, const char *text)
{
  GArray *ids = g_array_sized_new (FALSE, FALSE, sizeof (int32_t), 96);
  char *valid = _diffuse_clip_utf8_make_valid (text, -1);
  size_t n = strlen (valid);
  if (tok->any_raw_added)
    split_added (tok, valid, n, FALSE, raw_text, ids);
  else
    raw_text (tok, valid, n, ids);
  g_free (valid);
  return ids;
}

int
diffuse_clip_tokenizer_encode_full (DiffuseClipTokenizer *tok, const char *text, gboolean pad_to_max,
                                    int32_t *ids_out, int32_t *mask_out, int max, GError **error)
{
  g_return_val_if_fail (tok != NULL, -1);
  g_return_val_if_fail (text != NULL, -1);
  g_return_val_if_fail (max >= 0, -1);
  g_return_val_if_fail (max == 0 || ids_out != NULL, -1);
  g_return_val_if_fail (error == NULL || *error == NULL, -1);

  int M = tok->model_max_length;
  if (pad_to_max && max < M) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "CLIP tokenizer: the output holds %d ids, model_max_length is %d", max, M);
    return -1;
  }

  GArray *content = encode_content (tok, text);
  const int32_t *c = (const int32_t *) content->data;
  int nc = content->len;
  int skip = 0;
  if (pad_to_max && nc > M - 2) {
    if (tok->trunc_left)
      skip = nc - (M - 2);
    nc = M - 2;
  }
  int n = nc + 2;
  int total = pad_to_max ? M : n;
  int lead = (pad_to_max && tok->pad_left) ? M - n : 0;
  int w = MIN (total, max);
  for (int k = 0; k < w; k++) {
    int r = k - lead;   /* index into bos + content + eos */
    int32_t id;
    if (r < 0 || r >= n)
      id = tok->pad_id;
    else if (r == 0)
      id = tok->bos_id;
    else if (r == n - 1)
      id = tok->eos_id;
    else
      id = c[skip + r - 1];
    ids_out[k] = id;
    if (mask_out)
      mask_out[k] = (r >= 0 && r < n) ? 1 : 0;
  }
  g_array_free (content, TRUE);
  return total;
}

int
diffuse_clip_tokenizer_encode (DiffuseClipTokenizer *tok, const char *text, gboolean pad_to_max, int32_t *ids_out,
                               int max, GError **error)
{
  return diffuse_clip_tokenizer_encode_full (tok, text, pad_to_max, ids_out, NULL, max, error);
}

/* ---- decoding ----------------------------------------------------------- */

static const AddedTok *
added_by_id (DiffuseClipTokenizer *tok, int32_t id)
{
  for (int k = 0; k < tok->n_added; k++)
    if (tok->added[k].id == id)
      return &tok->added[k];
  return NULL;
}

char *
diffuse_clip_tokenizer_decode (DiffuseClipTokenizer *tok, const int32_t *ids, int n, gboolean skip_special_tokens)
{
  g_return_val_if_fail (tok != NULL, NULL);
  g_return_val_if_fail (n == 0 || ids != NULL, NULL);

  /* ByteLevel decoder: every character of a token back to its byte (a token
   * with a character outside the byte alphabet is kept as its UTF-8), the
   * bytes read as UTF-8 with replacement; then CLIPTokenizer's wrapper:
   * "</w>" -> " ", strip(). */
  GString *bytes = g_string_new (NULL);
  for (int k = 0; k < n; k++) {
    int32_t id = ids[k];
    if (id < 0 || id >= tok->n_ids || !tok->id_to_token[id])
      continue;
    /* an added token reads as its (normalized, when flagged so) content, as
     * the `tokenizers` added vocabulary gives it back */
    const AddedTok *a = added_by_id (tok, id);
    if (skip_special_tokens && a && a->special)
      continue;
    const char *t = a ? a->match : tok->id_to_token[id];
    gsize mark = bytes->len;
    gboolean all = TRUE;
    for (const char *p = t; *p; p = g_utf8_next_char (p)) {
      gunichar u = g_utf8_get_char (p);
      if (u >= 0x144 || tok->cp_to_byte[u] < 0) {
        all = FALSE;
        break;
      }
      g_string_append_c (bytes, (char) tok->cp_to_byte[u]);
    }
    if (!all) {
      g_string_truncate (bytes, mark);
      g_string_append (bytes, t);
    }
  }
  /* a NUL byte would end the C string early: keep it out (U+0000 is not a
   * token of any sane vocabulary) */
  for (gsize i = 0; i < bytes->len; i++)
    if (bytes->str[i] == 0)
      bytes->str[i] = ' ';
  char *text = _diffuse_clip_utf8_make_valid (bytes->str, bytes->len);
  g_string_free (bytes, TRUE);

  GString *r = g_string_new (NULL);
  for (const char *p = text; *p;) {
    if (strncmp (p, "</w>", 4) == 0) {
      g_string_append_c (r, ' ');
      p += 4;
    } else {
      g_string_append_c (r, *p);
      p++;
    }
  }
  g_free (text);

  /* str.strip() */
  const char *b = r->str, *e = r->str + r->len;
  while (b < e && py_isspace (g_utf8_get_char (b)))
    b = g_utf8_next_char (b);
  while (e > b) {
    const char *p = g_utf8_find_prev_char (b, e);
    if (!p || !py_isspace (g_utf8_get_char (p)))
      break;
    e = p;
  }
  char *res = g_strndup (b, e - b);
  g_string_free (r, TRUE);
  return res;
}

char *
diffuse_clip_tokenizer_truncated_text (DiffuseClipTokenizer *tok, const char *text)
{
  g_return_val_if_fail (tok != NULL, NULL);
  g_return_val_if_fail (text != NULL, NULL);

  GArray *content = encode_content (tok, text);
  int n = content->len + 2;
  int M = tok->model_max_length;
  char *res = NULL;
  if (n > M) {
    /* untruncated_ids[M - 1 : n - 1] = content[M - 2 : n - 2] */
    res = diffuse_clip_tokenizer_decode (tok, (const int32_t *) content->data + (M - 2), n - M, FALSE);
  }
  g_array_free (content, TRUE);
  return res;
}

/* ---- accessors ---------------------------------------------------------- */

int32_t
diffuse_clip_tokenizer_bos_id (DiffuseClipTokenizer *tok)
{
  g_return_val_if_fail (tok != NULL, -1);
  return tok->bos_id;
}

int32_t
diffuse_clip_tokenizer_eos_id (DiffuseClipTokenizer *tok)
{
  g_return_val_if_fail (tok != NULL, -1);
  return tok->eos_id;
}

int32_t
diffuse_clip_tokenizer_pad_id (DiffuseClipTokenizer *tok)
{
  g_return_val_if_fail (tok != NULL, -1);
  return tok->pad_id;
}

int32_t
diffuse_clip_tokenizer_unk_id (DiffuseClipTokenizer *tok)
{
  g_return_val_if_fail (tok != NULL, -1);
  return tok->unk_id;
}

int
diffuse_clip_tokenizer_model_max_length (DiffuseClipTokenizer *tok)
{
  g_return_val_if_fail (tok != NULL, -1);
  return tok->model_max_length;
}

int
diffuse_clip_tokenizer_vocab_size (DiffuseClipTokenizer *tok)
{
  g_return_val_if_fail (tok != NULL, -1);
  return tok->vocab_size;
}

int32_t
diffuse_clip_tokenizer_token_to_id (DiffuseClipTokenizer *tok, const char *token)
{
  g_return_val_if_fail (tok != NULL, -1);
  g_return_val_if_fail (token != NULL, -1);
  return vocab_lookup (tok, token);
}

const char *
diffuse_clip_tokenizer_id_to_token (DiffuseClipTokenizer *tok, int32_t id)
{
  g_return_val_if_fail (tok != NULL, NULL);
  if (id < 0 || id >= tok->n_ids)
    return NULL;
  return tok->id_to_token[id];
}

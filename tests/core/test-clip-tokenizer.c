/* CLIP tokenizer against transformers' CLIPTokenizer.
 *
 * Fixtures (tests/reference/make_clip_vocab.py, make_tokenizer_fixtures.py):
 *   clip-tokenizer/{vocab.json,merges.txt,tokenizer_config.json,special_tokens_map.json}
 *       the real CLIP vocabulary, laid out as openai/clip-vit-large-patch14;
 *   clip-tokenizer/cases.json   ids transformers gives for > 500 prompts
 *       (untruncated, and padded/truncated as diffusers calls it) plus
 *       config variants (SD 2.x pad "!", left padding, lstrip/rstrip, ...);
 *   clip-tokenizer/unicode.json the Unicode classes / lowercase / NFC of the
 *       `tokenizers` pipeline for every code point. */
#include "testutil.h"
#include "models/clip_tokenizer_private.h"

#include <diffuse/clip_tokenizer.h>
#include <glib/gstdio.h>
#include <json-glib/json-glib.h>
#include <string.h>
#include <time.h>

#define TOK_DIR "clip-tokenizer"

static JsonParser *cases_parser;
static JsonObject *cases_root;

static JsonObject *
cases (void)
{
  if (!cases_root) {
    GError *err = NULL;
    char *p = tu_fixture (TOK_DIR "/cases.json");
    cases_parser = json_parser_new ();
    json_parser_load_from_file (cases_parser, p, &err);
    g_assert_no_error (err);
    cases_root = json_node_get_object (json_parser_get_root (cases_parser));
    g_free (p);
  }
  return cases_root;
}

static DiffuseClipTokenizer *
load_fixture (void)
{
  GError *err = NULL;
  char *dir = tu_fixture (TOK_DIR);
  DiffuseClipTokenizer *tok = diffuse_clip_tokenizer_load (dir, &err);
  g_assert_no_error (err);
  g_assert_nonnull (tok);
  g_free (dir);
  return tok;
}

/* The text of a case: "text", or "hex" bytes (invalid UTF-8 on purpose). */
static char *
case_text (JsonObject *c)
{
  if (json_object_has_member (c, "hex")) {
    const char *h = json_object_get_string_member (c, "hex");
    size_t n = strlen (h) / 2;
    char *s = g_malloc (n + 1);
    for (size_t i = 0; i < n; i++)
      s[i] = (char) (g_ascii_xdigit_value (h[2 * i]) * 16 + g_ascii_xdigit_value (h[2 * i + 1]));
    s[n] = 0;
    return s;
  }
  return g_strdup (json_object_get_string_member (c, "text"));
}

static gboolean
ids_equal (JsonArray *want, const int32_t *got, int n)
{
  if ((int) json_array_get_length (want) != n)
    return FALSE;
  for (int i = 0; i < n; i++)
    if (json_array_get_int_element (want, i) != got[i])
      return FALSE;
  return TRUE;
}

static char *
ids_str (const int32_t *ids, int n)
{
  GString *s = g_string_new ("[");
  for (int i = 0; i < n; i++)
    g_string_append_printf (s, "%s%d", i ? ", " : "", ids[i]);
  g_string_append_c (s, ']');
  return g_string_free (s, FALSE);
}

static char *
json_ids_str (JsonArray *a)
{
  GString *s = g_string_new ("[");
  for (guint i = 0; i < json_array_get_length (a); i++)
    g_string_append_printf (s, "%s%" G_GINT64_FORMAT, i ? ", " : "", json_array_get_int_element (a, i));
  g_string_append_c (s, ']');
  return g_string_free (s, FALSE);
}

/* Checks one case in every mode; returns the number of mismatching aspects
 * (each printed). */
static int
check_case (DiffuseClipTokenizer *tok, JsonObject *c, const char *label, gboolean *pad_left_hint)
{
  GError *err = NULL;
  int bad = 0;
  char *text = case_text (c);
  char *shown = g_strescape (text, "");
  int M = diffuse_clip_tokenizer_model_max_length (tok);
  int32_t pad = diffuse_clip_tokenizer_pad_id (tok);

  /* untruncated: snprintf-like, first ask for the size */
  JsonArray *want = json_object_get_array_member (c, "ids");
  int n = diffuse_clip_tokenizer_encode (tok, text, FALSE, NULL, 0, &err);
  g_assert_no_error (err);
  int32_t *ids = g_new0 (int32_t, MAX (n, 1));
  int n2 = diffuse_clip_tokenizer_encode (tok, text, FALSE, ids, n, &err);
  g_assert_no_error (err);
  g_assert_cmpint (n, ==, n2);
  if (!ids_equal (want, ids, n)) {
    char *a = ids_str (ids, n), *b = json_ids_str (want);
    g_printerr ("%s \"%s\": ids %s, transformers %s\n", label, shown, a, b);
    g_free (a);
    g_free (b);
    bad++;
  }

  /* padded + truncated, with the attention mask */
  JsonArray *head = json_object_get_array_member (c, "head");
  int run = json_object_get_int_member (c, "pad_run");
  int ones = json_object_get_int_member (c, "mask_ones");
  int hn = json_array_get_length (head);
  g_assert_cmpint (hn + run, ==, M);
  int32_t *wantp = g_new (int32_t, M), *gotp = g_new (int32_t, M + 3), *mask = g_new (int32_t, M + 3);
  gboolean left = *pad_left_hint;
  for (int i = 0; i < M; i++) {
    int h = left ? i - run : i;
    wantp[i] = (h >= 0 && h < hn) ? (int32_t) json_array_get_int_element (head, h) : pad;
  }
  gotp[M] = gotp[M + 1] = gotp[M + 2] = -7;
  int np = diffuse_clip_tokenizer_encode_full (tok, text, TRUE, gotp, mask, M + 3, &err);
  g_assert_no_error (err);
  g_assert_cmpint (np, ==, M);
  g_assert_cmpint (gotp[M], ==, -7);   /* nothing written past M */
  if (memcmp (gotp, wantp, sizeof (int32_t) * M) != 0) {
    char *a = ids_str (gotp, M), *b = ids_str (wantp, M);
    g_printerr ("%s \"%s\": padded %s, transformers %s\n", label, shown, a, b);
    g_free (a);
    g_free (b);
    bad++;
  }
  int mask_bad = 0;
  for (int i = 0; i < M; i++) {
    int w = left ? (i >= M - ones) : (i < ones);
    mask_bad += mask[i] != w;
  }
  if (mask_bad) {
    g_printerr ("%s \"%s\": attention mask differs at %d positions\n", label, shown, mask_bad);
    bad++;
  }

  /* decode(ids) */
  const char *want_dec = json_object_get_string_member (c, "decoded");
  char *dec = diffuse_clip_tokenizer_decode (tok, ids, n, FALSE);
  if (g_strcmp0 (dec, want_dec) != 0) {
    g_printerr ("%s \"%s\": decode \"%s\", transformers \"%s\"\n", label, shown, dec, want_dec);
    bad++;
  }

  /* diffusers' truncation warning text */
  JsonNode *rn = json_object_get_member (c, "removed");
  const char *want_rm = JSON_NODE_HOLDS_NULL (rn) ? NULL : json_node_get_string (rn);
  char *rm = diffuse_clip_tokenizer_truncated_text (tok, text);
  if (g_strcmp0 (rm, want_rm) != 0) {
    g_printerr ("%s \"%s\": truncated part \"%s\", diffusers \"%s\"\n", label, shown, rm ? rm : "(none)",
                want_rm ? want_rm : "(none)");
    bad++;
  }

  g_free (rm);
  g_free (dec);
  g_free (wantp);
  g_free (gotp);
  g_free (mask);
  g_free (ids);
  g_free (shown);
  g_free (text);
  return bad;
}

static void
test_corpus (void)
{
  if (!tu_have_fixture (TOK_DIR "/cases.json"))
    return;
  DiffuseClipTokenizer *tok = load_fixture ();
  JsonObject *facts = json_object_get_object_member (json_object_get_object_member (cases (), "facts"), "sd1");
  g_assert_cmpint (diffuse_clip_tokenizer_bos_id (tok), ==, json_object_get_int_member (facts, "bos"));
  g_assert_cmpint (diffuse_clip_tokenizer_eos_id (tok), ==, json_object_get_int_member (facts, "eos"));
  g_assert_cmpint (diffuse_clip_tokenizer_pad_id (tok), ==, json_object_get_int_member (facts, "pad"));
  g_assert_cmpint (diffuse_clip_tokenizer_model_max_length (tok), ==, json_object_get_int_member (facts, "max_length"));
  g_assert_cmpint (diffuse_clip_tokenizer_vocab_size (tok), ==, json_object_get_int_member (facts, "vocab_size"));
  g_assert_cmpint (diffuse_clip_tokenizer_unk_id (tok), ==, 49407);

  JsonArray *list = json_object_get_array_member (json_object_get_object_member (cases (), "cases"), "sd1");
  guint total = json_array_get_length (list), match = 0, truncated = 0;
  gboolean left = FALSE;
  for (guint i = 0; i < total; i++) {
    JsonObject *c = json_array_get_object_element (list, i);
    if (check_case (tok, c, "sd1", &left) == 0)
      match++;
    truncated += !JSON_NODE_HOLDS_NULL (json_object_get_member (c, "removed"));
  }
  g_test_message ("sd1: %u/%u prompts match transformers (ids, padded ids, mask, decode, truncation text); "
                  "%u of them longer than 77 tokens",
                  match, total, truncated);
  g_assert_cmpuint (total, >=, 500);
  g_assert_cmpuint (truncated, >=, 10);
  g_assert_cmpuint (match, ==, total);
  diffuse_clip_tokenizer_unref (tok);
}

/* Writes a tokenizer folder: the given files (name -> JSON object, or a
 * string for merges.txt), and the fixture's vocab.json / merges.txt unless
 * given. */
static char *
make_folder (JsonObject *files)
{
  char *dir = tu_mkdtemp ();
  const char *copy[] = { "vocab.json", "merges.txt" };
  for (guint i = 0; i < G_N_ELEMENTS (copy); i++) {
    if (files && json_object_has_member (files, copy[i]))
      continue;   /* the variant brings its own */
    char *src = tu_fixture (TOK_DIR), *abs, *dst = g_build_filename (dir, copy[i], NULL);
    char *s = g_build_filename (src, copy[i], NULL);
    abs = g_canonicalize_filename (s, NULL);
    g_assert_cmpint (symlink (abs, dst), ==, 0);
    g_free (src);
    g_free (s);
    g_free (abs);
    g_free (dst);
  }
  if (files) {
    JsonObjectIter it;
    const char *name;
    JsonNode *node;
    json_object_iter_init (&it, files);
    while (json_object_iter_next (&it, &name, &node)) {
      char *p = g_build_filename (dir, name, NULL);
      char *txt = JSON_NODE_HOLDS_VALUE (node) ? g_strdup (json_node_get_string (node)) : json_to_string (node, TRUE);
      g_assert_true (g_file_set_contents (p, txt, -1, NULL));
      g_free (txt);
      g_free (p);
    }
  }
  return dir;
}

static void
test_variants (void)
{
  if (!tu_have_fixture (TOK_DIR "/cases.json"))
    return;
  JsonObject *configs = json_object_get_object_member (cases (), "configs");
  JsonObject *all_cases = json_object_get_object_member (cases (), "cases");
  JsonObject *facts = json_object_get_object_member (cases (), "facts");
  JsonObjectIter it;
  const char *name;
  JsonNode *node;
  guint n_variants = 0, total = 0, match = 0;

  json_object_iter_init (&it, configs);
  while (json_object_iter_next (&it, &name, &node)) {
    if (JSON_NODE_HOLDS_NULL (node))
      continue;   /* sd1: the fixture folder itself */
    GError *err = NULL;
    JsonObject *files = json_node_get_object (node);
    char *dir = make_folder (files);
    DiffuseClipTokenizer *tok = diffuse_clip_tokenizer_load (dir, &err);
    g_assert_no_error (err);
    JsonObject *f = json_object_get_object_member (facts, name);
    g_assert_cmpint (diffuse_clip_tokenizer_bos_id (tok), ==, json_object_get_int_member (f, "bos"));
    g_assert_cmpint (diffuse_clip_tokenizer_eos_id (tok), ==, json_object_get_int_member (f, "eos"));
    g_assert_cmpint (diffuse_clip_tokenizer_pad_id (tok), ==, json_object_get_int_member (f, "pad"));
    g_assert_cmpint (diffuse_clip_tokenizer_model_max_length (tok), ==, json_object_get_int_member (f, "max_length"));

    /* padding side from the config, as the generator saw it */
    gboolean left = FALSE;
    if (json_object_has_member (files, "tokenizer_config.json")) {
      JsonObject *cfg = json_object_get_object_member (files, "tokenizer_config.json");
      left = json_object_has_member (cfg, "padding_side") &&
             strcmp (json_object_get_string_member (cfg, "padding_side"), "left") == 0;
    }
    JsonArray *list = json_object_get_array_member (all_cases, name);
    guint vmatch = 0;
    for (guint i = 0; i < json_array_get_length (list); i++)
      vmatch += check_case (tok, json_array_get_object_element (list, i), name, &left) == 0;
    g_test_message ("%s: %u/%u match", name, vmatch, json_array_get_length (list));
    total += json_array_get_length (list);
    match += vmatch;
    n_variants++;
    diffuse_clip_tokenizer_unref (tok);
    tu_rm_rf (dir);
    g_free (dir);
  }
  g_print ("# %u config variants: %u/%u cases match transformers\n", n_variants, match, total);
  g_assert_cmpuint (n_variants, >=, 5);
  g_assert_cmpuint (match, ==, total);
}

/* SD 2.x: the pad token "!" is also an added special token, so a "!" in the
 * prompt becomes id 0 (not "!</w>" = 256), and padding uses id 0. */
static void
test_sd2_pad (void)
{
  if (!tu_have_fixture (TOK_DIR "/cases.json"))
    return;
  JsonObject *files = json_object_get_object_member (json_object_get_object_member (cases (), "configs"), "sd2");
  char *dir = make_folder (files);
  GError *err = NULL;
  DiffuseClipTokenizer *tok = diffuse_clip_tokenizer_load (dir, &err);
  g_assert_no_error (err);
  int32_t ids[77];
  int n = diffuse_clip_tokenizer_encode (tok, "hello!", TRUE, ids, 77, &err);
  g_assert_no_error (err);
  g_assert_cmpint (n, ==, 77);
  g_assert_cmpint (ids[0], ==, 49406);
  g_assert_cmpint (ids[1], ==, 3306);
  g_assert_cmpint (ids[2], ==, 0);
  g_assert_cmpint (ids[3], ==, 49407);
  for (int i = 4; i < 77; i++)
    g_assert_cmpint (ids[i], ==, 0);
  diffuse_clip_tokenizer_unref (tok);
  tu_rm_rf (dir);
  g_free (dir);
}

static void
test_api (void)
{
  if (!tu_have_fixture (TOK_DIR "/vocab.json"))
    return;
  DiffuseClipTokenizer *tok = load_fixture ();
  GError *err = NULL;
  int32_t ids[100];
  const int32_t cat[] = { 49406, 320, 1125, 539, 320, 2368, 49407 };

  int n = diffuse_clip_tokenizer_encode (tok, "a photo of a cat", FALSE, ids, 100, &err);
  g_assert_no_error (err);
  g_assert_cmpint (n, ==, 7);
  g_assert_cmpmem (ids, sizeof cat, cat, sizeof cat);

  /* snprintf-like: a short buffer gets the first ids, the full count comes back */
  memset (ids, 0xff, sizeof ids);
  n = diffuse_clip_tokenizer_encode (tok, "a photo of a cat", FALSE, ids, 3, &err);
  g_assert_cmpint (n, ==, 7);
  g_assert_cmpmem (ids, 3 * sizeof (int32_t), cat, 3 * sizeof (int32_t));
  g_assert_cmpint (ids[3], ==, -1);

  /* padded mode needs room for model_max_length ids */
  n = diffuse_clip_tokenizer_encode (tok, "a cat", TRUE, ids, 76, &err);
  g_assert_cmpint (n, ==, -1);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);

  g_assert_cmpint (diffuse_clip_tokenizer_token_to_id (tok, "cat</w>"), ==, 2368);
  g_assert_cmpint (diffuse_clip_tokenizer_token_to_id (tok, "<|endoftext|>"), ==, 49407);
  g_assert_cmpint (diffuse_clip_tokenizer_token_to_id (tok, "no such token"), ==, -1);
  g_assert_cmpstr (diffuse_clip_tokenizer_id_to_token (tok, 2368), ==, "cat</w>");
  g_assert_cmpstr (diffuse_clip_tokenizer_id_to_token (tok, 0), ==, "!");
  g_assert_null (diffuse_clip_tokenizer_id_to_token (tok, 49408));
  g_assert_null (diffuse_clip_tokenizer_id_to_token (tok, -1));

  /* decode: skip_special_tokens, out-of-range ids skipped */
  const int32_t some[] = { 49406, 320, 2368, 99999, -5, 49407 };
  char *s = diffuse_clip_tokenizer_decode (tok, some, G_N_ELEMENTS (some), TRUE);
  g_assert_cmpstr (s, ==, "a cat");
  g_free (s);
  s = diffuse_clip_tokenizer_decode (tok, some, G_N_ELEMENTS (some), FALSE);
  g_assert_cmpstr (s, ==, "<|startoftext|>a cat <|endoftext|>");
  g_free (s);
  s = diffuse_clip_tokenizer_decode (tok, NULL, 0, FALSE);
  g_assert_cmpstr (s, ==, "");
  g_free (s);

  /* a short prompt is not truncated */
  g_assert_null (diffuse_clip_tokenizer_truncated_text (tok, "a photo of a cat"));

  /* ref / free */
  DiffuseClipTokenizer *r = diffuse_clip_tokenizer_ref (tok);
  g_assert_true (r == tok);
  diffuse_clip_tokenizer_unref (r);
  diffuse_clip_tokenizer_free (tok);
}

/* Invalid UTF-8 never crashes and equals the U+FFFD replacement text. */
static void
test_invalid_utf8 (void)
{
  if (!tu_have_fixture (TOK_DIR "/vocab.json"))
    return;
  DiffuseClipTokenizer *tok = load_fixture ();
  static const struct {
    const char *in, *want;
  } repl[] = {
    { "\xff", "\xef\xbf\xbd" },
    { "abc\xc3", "abc\xef\xbf\xbd" },
    { "\xe4\xbdx", "\xef\xbf\xbdx" },                              /* one U+FFFD for a truncated sequence */
    { "\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd" },                    /* overlong: two */
    { "\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" },    /* surrogate: three */
    { "\xf0\x9f\x98", "\xef\xbf\xbd" },
    { "ok \xef\xbf\xbd", "ok \xef\xbf\xbd" },                      /* a real U+FFFD stays */
    { "caf\xc3\xa9", "caf\xc3\xa9" },
  };
  for (guint i = 0; i < G_N_ELEMENTS (repl); i++) {
    char *v = _diffuse_clip_utf8_make_valid (repl[i].in, -1);
    g_assert_cmpstr (v, ==, repl[i].want);
    int32_t a[77], b[77];
    GError *err = NULL;
    diffuse_clip_tokenizer_encode (tok, repl[i].in, TRUE, a, 77, &err);
    g_assert_no_error (err);
    diffuse_clip_tokenizer_encode (tok, v, TRUE, b, 77, &err);
    g_assert_no_error (err);
    g_assert_cmpmem (a, sizeof a, b, sizeof b);
    g_free (v);
  }
  diffuse_clip_tokenizer_unref (tok);
}

/* Unicode helpers against the `tokenizers` tables, every code point. */
static guint8 *
range_table (JsonObject *u, const char *key, guint8 *tab, guint8 val)
{
  JsonArray *a = json_object_get_array_member (u, key);
  for (guint i = 0; i < json_array_get_length (a); i++) {
    JsonArray *r = json_array_get_array_element (a, i);
    for (gint64 c = json_array_get_int_element (r, 0); c <= json_array_get_int_element (r, 1); c++)
      tab[c] = val;
  }
  return tab;
}

static GHashTable *
map_table (JsonObject *u, const char *key)
{
  GHashTable *h = g_hash_table_new (NULL, NULL);
  JsonArray *a = json_object_get_array_member (u, key);
  for (guint i = 0; i < json_array_get_length (a); i++) {
    JsonArray *e = json_array_get_array_element (a, i);
    g_hash_table_insert (h, GUINT_TO_POINTER ((guint) json_array_get_int_element (e, 0)),
                         json_array_get_array_element (e, 1));
  }
  return h;
}

static gboolean
seq_equal (JsonArray *want, gunichar c, const gunichar *got, glong n)
{
  if (!want)
    return n == 1 && got[0] == c;
  if ((glong) json_array_get_length (want) != n)
    return FALSE;
  for (glong j = 0; j < n; j++)
    if ((gunichar) json_array_get_int_element (want, j) != got[j])
      return FALSE;
  return TRUE;
}

static void
test_unicode (void)
{
  if (!tu_have_fixture (TOK_DIR "/unicode.json"))
    return;
  GError *err = NULL;
  char *p = tu_fixture (TOK_DIR "/unicode.json");
  JsonParser *parser = json_parser_new ();
  json_parser_load_from_file (parser, p, &err);
  g_assert_no_error (err);
  g_free (p);
  JsonObject *u = json_node_get_object (json_parser_get_root (parser));

  guint8 *cls = g_malloc0 (0x110000);
  range_table (u, "space", cls, DIFFUSE_CLIP_CHAR_SPACE);
  range_table (u, "letter", cls, DIFFUSE_CLIP_CHAR_LETTER);
  range_table (u, "number", cls, DIFFUSE_CLIP_CHAR_NUMBER);
  GHashTable *lower = map_table (u, "lower"), *nfc = map_table (u, "nfc");

  guint bad_cls = 0, bad_low = 0, bad_nfc = 0, n = 0;
  for (gunichar c = 1; c < 0x110000; c++) {
    if (c >= 0xd800 && c <= 0xdfff)
      continue;
    n++;
    if (_diffuse_clip_char_class (c) != cls[c]) {
      if (bad_cls++ < 10)
        g_printerr ("class of U+%04X: %d, tokenizers %d\n", c, _diffuse_clip_char_class (c), cls[c]);
    }
    gunichar low[3];
    int k = _diffuse_clip_char_lower (c, low);
    if (!seq_equal (g_hash_table_lookup (lower, GUINT_TO_POINTER (c)), c, low, k)) {
      if (bad_low++ < 10)
        g_printerr ("lowercase of U+%04X: U+%04X\n", c, low[0]);
    }
    char s[8];
    int l = g_unichar_to_utf8 (c, s);
    char *r = g_utf8_normalize (s, l, G_NORMALIZE_NFC);
    glong rl;
    gunichar *rc = g_utf8_to_ucs4 (r, -1, NULL, &rl, NULL);
    if (!seq_equal (g_hash_table_lookup (nfc, GUINT_TO_POINTER (c)), c, rc, rl)) {
      if (bad_nfc++ < 10)
        g_printerr ("NFC of U+%04X differs\n", c);
    }
    g_free (rc);
    g_free (r);
  }
  g_print ("# unicode: %u code points; class mismatches %u, lowercase %u, NFC %u\n", n, bad_cls, bad_low, bad_nfc);
  g_assert_cmpuint (bad_cls, ==, 0);
  g_assert_cmpuint (bad_low, ==, 0);
  g_assert_cmpuint (bad_nfc, ==, 0);
  g_hash_table_destroy (lower);
  g_hash_table_destroy (nfc);
  g_free (cls);
  g_object_unref (parser);
}

/* ---- error paths -------------------------------------------------------- */

static void
write_file (const char *dir, const char *name, const char *text)
{
  char *p = g_build_filename (dir, name, NULL);
  g_assert_true (g_file_set_contents (p, text, -1, NULL));
  g_free (p);
}

/* A tiny valid tokenizer folder: bytes a, b, c (+ "</w>"), merge "a b". */
static char *
tiny_folder (void)
{
  char *dir = tu_mkdtemp ();
  write_file (dir, "vocab.json",
              "{\"a\": 0, \"b\": 1, \"c\": 2, \"a</w>\": 3, \"b</w>\": 4, \"c</w>\": 5, \"ab\": 6, \"ab</w>\": 7,"
              " \"<|startoftext|>\": 8, \"<|endoftext|>\": 9}");
  write_file (dir, "merges.txt", "#version: 0.2\na b\na b</w>\n");
  return dir;
}

static void
expect_error (const char *dir, int code, const char *needle)
{
  GError *err = NULL;
  DiffuseClipTokenizer *tok = diffuse_clip_tokenizer_load (dir, &err);
  g_assert_null (tok);
  g_assert_nonnull (err);
  g_test_message ("expected error: %s", err->message);
  if (!g_error_matches (err, DIFFUSE_ERROR, code) || !strstr (err->message, needle))
    g_error ("got error %d \"%s\", wanted code %d naming \"%s\"", err->code, err->message, code, needle);
  g_error_free (err);
}

static void
test_errors (void)
{
  GError *err = NULL;
  char *dir = tiny_folder ();

  /* the tiny folder itself loads and encodes */
  DiffuseClipTokenizer *tok = diffuse_clip_tokenizer_load (dir, &err);
  g_assert_no_error (err);
  int32_t ids[80];
  int n = diffuse_clip_tokenizer_encode (tok, "AB abc ba", FALSE, ids, 80, &err);
  g_assert_no_error (err);
  const int32_t want[] = { 8, 7, 6, 5, 1, 3, 9 };   /* ab</w> | ab c</w> | b a</w> */
  g_assert_cmpint (n, ==, G_N_ELEMENTS (want));
  g_assert_cmpmem (ids, sizeof want, want, sizeof want);
  /* no unk token in the vocab ("<|endoftext|>" is, so it is the unk): a byte
   * without a symbol becomes unk */
  n = diffuse_clip_tokenizer_encode (tok, "ax", FALSE, ids, 80, &err);
  g_assert_cmpint (n, ==, 4);
  g_assert_cmpint (ids[2], ==, 9);
  g_assert_cmpint (diffuse_clip_tokenizer_model_max_length (tok), ==, 77);
  diffuse_clip_tokenizer_unref (tok);

  /* missing folder / files */
  char *missing = g_build_filename (dir, "nope", NULL);
  expect_error (missing, DIFFUSE_ERROR_NOT_FOUND, "nope");
  g_free (missing);

  char *merges = g_build_filename (dir, "merges.txt", NULL);
  char *vocab = g_build_filename (dir, "vocab.json", NULL);
  g_assert_cmpint (g_unlink (merges), ==, 0);
  expect_error (dir, DIFFUSE_ERROR_NOT_FOUND, "merges.txt");
  write_file (dir, "merges.txt", "#version: 0.2\na b\n");
  g_assert_cmpint (g_unlink (vocab), ==, 0);
  expect_error (dir, DIFFUSE_ERROR_NOT_FOUND, "vocab.json");

  /* corrupt vocab.json */
  static const char *const bad_vocab[] = {
    "{\"a\": 0, \"b\": 1",           /* truncated */
    "{\"a\": 0, \"b\": \"one\"}",     /* not an integer */
    "{\"a\": 0, \"b\": 1.5}",
    "{\"a\": 0, \"b\": -1}",
    "{\"a\": {\"x\": 1}}",
    "[\"a\", \"b\"]",
    "{\"a\": 0} trailing",
    "{\"a\\q\": 0}",                  /* bad escape */
    "{\"\\ud800\": 0}",               /* unpaired surrogate */
    "",
    "{}",
  };
  for (guint i = 0; i < G_N_ELEMENTS (bad_vocab); i++) {
    write_file (dir, "vocab.json", bad_vocab[i]);
    expect_error (dir, DIFFUSE_ERROR_CORRUPT, "vocab.json");
  }
  /* escapes are decoded: "\u0061" is "a" */
  write_file (dir, "vocab.json",
              "{\"\\u0061\": 0, \"b\": 1, \"c\": 2, \"a</w>\": 3, \"b</w>\": 4, \"c</w>\": 5, \"ab\": 6, \"ab</w>\": 7,"
              " \"<|startoftext|>\": 8, \"<|endoftext|>\": 9}");
  tok = diffuse_clip_tokenizer_load (dir, &err);
  g_assert_no_error (err);
  g_assert_cmpint (diffuse_clip_tokenizer_token_to_id (tok, "a"), ==, 0);
  diffuse_clip_tokenizer_unref (tok);

  /* bad merges.txt lines */
  write_file (dir, "merges.txt", "#version: 0.2\na b\na b c\n");
  expect_error (dir, DIFFUSE_ERROR_CORRUPT, "merges.txt' line 3");
  write_file (dir, "merges.txt", "#version: 0.2\n\na b\n");
  expect_error (dir, DIFFUSE_ERROR_CORRUPT, "merges.txt' line 2");
  write_file (dir, "merges.txt", "#version: 0.2\nab\n");
  expect_error (dir, DIFFUSE_ERROR_CORRUPT, "merges.txt' line 2");
  write_file (dir, "merges.txt", "#version: 0.2\nb c\n");   /* "bc" not in the vocab */
  expect_error (dir, DIFFUSE_ERROR_CORRUPT, "merges.txt' line 2");
  write_file (dir, "merges.txt", "#version: 0.2\r\na b\r\n");   /* CRLF is fine */
  tok = diffuse_clip_tokenizer_load (dir, &err);
  g_assert_no_error (err);
  diffuse_clip_tokenizer_unref (tok);

  /* configs */
  write_file (dir, "tokenizer_config.json", "{\"model_max_length\": 77,");
  expect_error (dir, DIFFUSE_ERROR_CORRUPT, "tokenizer_config.json");
  write_file (dir, "tokenizer_config.json", "{\"model_max_length\": 1}");
  expect_error (dir, DIFFUSE_ERROR_CONFIG, "tokenizer_config.json");
  write_file (dir, "tokenizer_config.json", "{\"model_max_length\": \"77\"}");
  expect_error (dir, DIFFUSE_ERROR_CONFIG, "model_max_length");
  write_file (dir, "tokenizer_config.json", "{\"padding_side\": \"middle\"}");
  expect_error (dir, DIFFUSE_ERROR_CONFIG, "padding_side");
  write_file (dir, "tokenizer_config.json", "{\"pad_token\": \"<|pad|>\"}");
  expect_error (dir, DIFFUSE_ERROR_CONFIG, "<|pad|>");
  write_file (dir, "tokenizer_config.json", "{\"bos_token\": 5}");
  expect_error (dir, DIFFUSE_ERROR_CONFIG, "bos_token");
  write_file (dir, "tokenizer_config.json",
              "{\"eos_token\": {\"content\": \"<|endoftext|>\", \"single_word\": true}}");
  expect_error (dir, DIFFUSE_ERROR_UNSUPPORTED, "single_word");
  write_file (dir, "tokenizer_config.json", "{\"model_max_length\": 1000000000000000019884624838656}");
  write_file (dir, "special_tokens_map.json", "{\"pad_token\": ");
  expect_error (dir, DIFFUSE_ERROR_CORRUPT, "special_tokens_map.json");
  write_file (dir, "special_tokens_map.json", "{\"pad_token\": \"a\"}");
  tok = diffuse_clip_tokenizer_load (dir, &err);
  g_assert_no_error (err);
  g_assert_cmpint (diffuse_clip_tokenizer_model_max_length (tok), ==, 77);   /* the sentinel means unset */
  g_assert_cmpint (diffuse_clip_tokenizer_pad_id (tok), ==, 0);
  diffuse_clip_tokenizer_unref (tok);
  write_file (dir, "added_tokens.json", "{\"<new>\": 10}");
  expect_error (dir, DIFFUSE_ERROR_UNSUPPORTED, "added_tokens.json");

  g_free (merges);
  g_free (vocab);
  tu_rm_rf (dir);
  g_free (dir);
}

/* ---- threads and timing ------------------------------------------------- */

typedef struct {
  DiffuseClipTokenizer *tok;
  JsonArray *list;
  int offset;
  guint mismatches;
} ThreadArg;

static gpointer
thread_main (gpointer data)
{
  ThreadArg *a = data;
  guint n = json_array_get_length (a->list);
  for (guint k = 0; k < n; k++) {
    JsonObject *c = json_array_get_object_element (a->list, (k + a->offset) % n);
    char *text = case_text (c);
    JsonArray *want = json_object_get_array_member (c, "ids");
    int32_t *ids = g_new (int32_t, json_array_get_length (want) + 1);
    int m = diffuse_clip_tokenizer_encode (a->tok, text, FALSE, ids, json_array_get_length (want) + 1, NULL);
    a->mismatches += !ids_equal (want, ids, m);
    g_free (ids);
    g_free (text);
  }
  return NULL;
}

static void
test_threads (void)
{
  if (!tu_have_fixture (TOK_DIR "/cases.json"))
    return;
  DiffuseClipTokenizer *tok = load_fixture ();
  JsonArray *list = json_object_get_array_member (json_object_get_object_member (cases (), "cases"), "sd1");
  ThreadArg args[4];
  GThread *th[4];
  for (int i = 0; i < 4; i++) {
    args[i] = (ThreadArg) { tok, list, i * 150, 0 };
    th[i] = g_thread_new ("tok", thread_main, &args[i]);
  }
  for (int i = 0; i < 4; i++) {
    g_thread_join (th[i]);
    g_assert_cmpuint (args[i].mismatches, ==, 0);
  }
  diffuse_clip_tokenizer_unref (tok);
}

/* process CPU time in ms (the machine is shared: wall time is noisy) */
static double
cpu_ms (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void
test_timing (void)
{
  if (!tu_have_fixture (TOK_DIR "/cases.json"))
    return;
  double c0 = cpu_ms ();
  gint64 t0 = g_get_monotonic_time ();
  DiffuseClipTokenizer *tok = load_fixture ();
  gint64 t1 = g_get_monotonic_time ();
  double load_cpu = cpu_ms () - c0;
  JsonArray *list = json_object_get_array_member (json_object_get_object_member (cases (), "cases"), "sd1");
  guint n = json_array_get_length (list);
  char **texts = g_new (char *, n);
  for (guint i = 0; i < n; i++)
    texts[i] = case_text (json_array_get_object_element (list, i));
  int32_t ids[77];
  double pass_ms[2], pass_cpu[2];
  for (int pass = 0; pass < 2; pass++) {   /* cold BPE cache, then warm */
    double c = cpu_ms ();
    gint64 a = g_get_monotonic_time ();
    for (guint i = 0; i < n; i++)
      diffuse_clip_tokenizer_encode (tok, texts[i], TRUE, ids, 77, NULL);
    pass_ms[pass] = (g_get_monotonic_time () - a) / 1000.0;
    pass_cpu[pass] = cpu_ms () - c;
  }
  g_print ("# load %.1f ms (cpu %.1f ms); %u prompts padded to 77: %.2f ms (cpu %.2f) cold cache, "
           "%.2f ms (cpu %.2f) warm\n",
           (t1 - t0) / 1000.0, load_cpu, n, pass_ms[0], pass_cpu[0], pass_ms[1], pass_cpu[1]);
  for (guint i = 0; i < n; i++)
    g_free (texts[i]);
  g_free (texts);
  diffuse_clip_tokenizer_unref (tok);
}

/* tokenizer.json alone (transformers >= 5's save_pretrained; merges as
 * pairs and as strings; SDXL's pad "!"): the ids transformers gives for
 * each prompt, padded to 77 (make_tokenizer_json_fixtures.py); the same
 * tokenizer as vocab.json + merges.txt gives the same ids.  A tokenizer.json
 * of another model type is refused. */
static void
test_tokenizer_json (void)
{
  if (!tu_have_fixture ("clip-tokenizer-json/cases.json"))
    return;
  GError *err = NULL;
  char *path = tu_fixture ("clip-tokenizer-json/cases.json");
  JsonParser *parser = json_parser_new ();
  g_assert_true (json_parser_load_from_file (parser, path, NULL));
  g_free (path);
  JsonObject *root = json_node_get_object (json_parser_get_root (parser));
  JsonArray *prompts = json_object_get_array_member (root, "prompts");
  char *classic = tu_fixture ("pipelines/tiny-sd/tokenizer");
  DiffuseClipTokenizer *ref = diffuse_clip_tokenizer_load (classic, &err);
  g_assert_no_error (err);
  g_free (classic);
  const char *variants[] = { "pairs", "strings", "pad" };
  for (guint v = 0; v < G_N_ELEMENTS (variants); v++) {
    char *rel = g_strdup_printf ("clip-tokenizer-json/%s", variants[v]);
    char *dir = tu_fixture (rel);
    DiffuseClipTokenizer *tok = diffuse_clip_tokenizer_load (dir, &err);
    g_assert_no_error (err);
    JsonArray *want = json_object_get_array_member (root, variants[v]);
    for (guint i = 0; i < json_array_get_length (prompts); i++) {
      const char *text = json_array_get_string_element (prompts, i);
      JsonArray *w = json_array_get_array_element (want, i);
      int32_t ids[77], rids[77];
      g_assert_cmpint (diffuse_clip_tokenizer_encode (tok, text, TRUE, ids, 77, &err), ==, 77);
      g_assert_no_error (err);
      g_assert_cmpuint (json_array_get_length (w), ==, 77);
      for (int k = 0; k < 77; k++)
        g_assert_cmpint (ids[k], ==, (int) json_array_get_int_element (w, k));
      if (v < 2) {   /* the vocab.json form of the same tokenizer */
        g_assert_cmpint (diffuse_clip_tokenizer_encode (ref, text, TRUE, rids, 77, &err), ==, 77);
        g_assert_cmpint (memcmp (ids, rids, sizeof ids), ==, 0);
      }
    }
    diffuse_clip_tokenizer_unref (tok);
    g_free (dir);
    g_free (rel);
  }
  /* a tokenizer.json of another kind of model */
  char *tmp = tu_mkdtemp ();
  char *tj = g_build_filename (tmp, "tokenizer.json", NULL);
  g_assert_true (g_file_set_contents (tj, "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", -1, NULL));
  g_assert_null (diffuse_clip_tokenizer_load (tmp, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED);
  g_assert_nonnull (strstr (err->message, "Unigram"));
  g_clear_error (&err);
  /* truncated */
  g_assert_true (g_file_set_contents (tj, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0", -1, NULL));
  g_assert_null (diffuse_clip_tokenizer_load (tmp, &err));
  g_assert_nonnull (err);
  g_assert_nonnull (strstr (err->message, "tokenizer.json"));
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  tu_rm_rf (tmp);
  g_free (tj);
  g_free (tmp);
  diffuse_clip_tokenizer_unref (ref);
  g_object_unref (parser);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/clip-tokenizer/api", test_api);
  g_test_add_func ("/clip-tokenizer/corpus", test_corpus);
  g_test_add_func ("/clip-tokenizer/variants", test_variants);
  g_test_add_func ("/clip-tokenizer/sd2-pad", test_sd2_pad);
  g_test_add_func ("/clip-tokenizer/invalid-utf8", test_invalid_utf8);
  g_test_add_func ("/clip-tokenizer/unicode", test_unicode);
  g_test_add_func ("/clip-tokenizer/errors", test_errors);
  g_test_add_func ("/clip-tokenizer/tokenizer-json", test_tokenizer_json);
  g_test_add_func ("/clip-tokenizer/threads", test_threads);
  g_test_add_func ("/clip-tokenizer/timing", test_timing);
  int r = g_test_run ();
  if (cases_parser)
    g_object_unref (cases_parser);
  return r;
}

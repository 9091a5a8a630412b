/* gst-diffuse — JSON configs (config.json, scheduler_config.json, ...) over
 * json-glib, and a writer producing the bytes of Python's
 * json.dumps(obj, indent=2, sort_keys=True) (what diffusers' to_json_string
 * and save_pretrained's index writer use). */
#include "io/io-private.h"

#include <diffuse/config.h>
#include <diffuse/error.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct _DiffuseConfig {
  gint ref_count;
  char *label;
  JsonObject *obj;
};

/* ---- Python-compatible JSON output ------------------------------------- */

/* repr(float): the shortest digits that round-trip, fixed notation when
 * -4 < decimal exponent <= 16, else d[.ddd]e[+-]XX. */
static void
append_py_float (GString *s, double v)
{
  if (isnan (v)) {
    g_string_append (s, "NaN");
    return;
  }
  if (isinf (v)) {
    g_string_append (s, v > 0 ? "Infinity" : "-Infinity");
    return;
  }
  if (v == 0) {
    g_string_append (s, signbit (v) ? "-0.0" : "0.0");
    return;
  }
  char buf[64];
  for (int prec = 1; prec <= 17; prec++) {
    snprintf (buf, sizeof buf, "%.*e", prec - 1, v);
    if (strtod (buf, NULL) == v)
      break;
  }
  /* buf: [-]d[.ddd]e[+-]XX */
  const char *p = buf;
  gboolean neg = FALSE;
  if (*p == '-') {
    neg = TRUE;
    p++;
  }
  char digits[32];
  int nd = 0;
  for (; *p && *p != 'e'; p++)
    if (*p != '.')
      digits[nd++] = *p;
  while (nd > 1 && digits[nd - 1] == '0')
    nd--;
  digits[nd] = 0;
  int exp10 = atoi (p + 1);
  int decpt = exp10 + 1;
  if (neg)
    g_string_append_c (s, '-');
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      g_string_append (s, "0.");
      for (int i = 0; i < -decpt; i++)
        g_string_append_c (s, '0');
      g_string_append (s, digits);
    } else if (decpt >= nd) {
      g_string_append (s, digits);
      for (int i = nd; i < decpt; i++)
        g_string_append_c (s, '0');
      g_string_append (s, ".0");
    } else {
      g_string_append_len (s, digits, decpt);
      g_string_append_c (s, '.');
      g_string_append (s, digits + decpt);
    }
  } else {
    g_string_append_c (s, digits[0]);
    if (nd > 1) {
      g_string_append_c (s, '.');
      g_string_append (s, digits + 1);
    }
    g_string_append_printf (s, "e%c%02d", exp10 < 0 ? '-' : '+', ABS (exp10));
  }
}

/* json's py_encode_basestring_ascii */
static void
append_py_string (GString *s, const char *str)
{
  g_string_append_c (s, '"');
  for (const char *p = str; *p; p = g_utf8_next_char (p)) {
    gunichar c = g_utf8_get_char (p);
    switch (c) {
    case '"': g_string_append (s, "\\\""); break;
    case '\\': g_string_append (s, "\\\\"); break;
    case '\b': g_string_append (s, "\\b"); break;
    case '\f': g_string_append (s, "\\f"); break;
    case '\n': g_string_append (s, "\\n"); break;
    case '\r': g_string_append (s, "\\r"); break;
    case '\t': g_string_append (s, "\\t"); break;
    default:
      if (c >= 0x20 && c < 0x7f) {
        g_string_append_c (s, (char) c);
      } else if (c < 0x10000) {
        g_string_append_printf (s, "\\u%04x", c);
      } else {
        gunichar v = c - 0x10000;
        g_string_append_printf (s, "\\u%04x\\u%04x", 0xd800 | (v >> 10), 0xdc00 | (v & 0x3ff));
      }
    }
  }
  g_string_append_c (s, '"');
}

static void
newline_indent (GString *s, int indent, int level)
{
  g_string_append_c (s, '\n');
  for (int i = 0; i < indent * level; i++)
    g_string_append_c (s, ' ');
}

static int
cmp_cstr (gconstpointer a, gconstpointer b)
{
  return strcmp (*(const char *const *) a, *(const char *const *) b);
}

static void dump_node (GString *s, JsonNode *node, int indent, int level);

static void
dump_object (GString *s, JsonObject *obj, int indent, int level)
{
  GList *members = json_object_get_members (obj);
  guint n = g_list_length (members);
  if (n == 0) {
    g_string_append (s, "{}");
    g_list_free (members);
    return;
  }
  const char **keys = g_new (const char *, n);
  guint i = 0;
  for (GList *l = members; l; l = l->next)
    keys[i++] = l->data;
  g_list_free (members);
  qsort (keys, n, sizeof (char *), cmp_cstr);
  g_string_append_c (s, '{');
  for (i = 0; i < n; i++) {
    if (i)
      g_string_append (s, indent >= 0 ? "," : ", ");
    if (indent >= 0)
      newline_indent (s, indent, level + 1);
    append_py_string (s, keys[i]);
    g_string_append (s, ": ");
    dump_node (s, json_object_get_member (obj, keys[i]), indent, level + 1);
  }
  if (indent >= 0)
    newline_indent (s, indent, level);
  g_string_append_c (s, '}');
  g_free (keys);
}

static void
dump_array (GString *s, JsonArray *arr, int indent, int level)
{
  guint n = json_array_get_length (arr);
  if (n == 0) {
    g_string_append (s, "[]");
    return;
  }
  g_string_append_c (s, '[');
  for (guint i = 0; i < n; i++) {
    if (i)
      g_string_append (s, indent >= 0 ? "," : ", ");
    if (indent >= 0)
      newline_indent (s, indent, level + 1);
    dump_node (s, json_array_get_element (arr, i), indent, level + 1);
  }
  if (indent >= 0)
    newline_indent (s, indent, level);
  g_string_append_c (s, ']');
}

static void
dump_node (GString *s, JsonNode *node, int indent, int level)
{
  if (!node || JSON_NODE_HOLDS_NULL (node)) {
    g_string_append (s, "null");
    return;
  }
  switch (json_node_get_node_type (node)) {
  case JSON_NODE_OBJECT:
    dump_object (s, json_node_get_object (node), indent, level);
    return;
  case JSON_NODE_ARRAY:
    dump_array (s, json_node_get_array (node), indent, level);
    return;
  case JSON_NODE_VALUE:
    break;
  default:
    g_string_append (s, "null");
    return;
  }
  GType t = json_node_get_value_type (node);
  if (t == G_TYPE_INT64)
    g_string_append_printf (s, "%" G_GINT64_FORMAT, json_node_get_int (node));
  else if (t == G_TYPE_DOUBLE)
    append_py_float (s, json_node_get_double (node));
  else if (t == G_TYPE_BOOLEAN)
    g_string_append (s, json_node_get_boolean (node) ? "true" : "false");
  else if (t == G_TYPE_STRING)
    append_py_string (s, json_node_get_string (node));
  else
    g_string_append (s, "null");
}

char *
_diffuse_json_dump_py (JsonNode *node, int indent)
{
  GString *s = g_string_new (NULL);
  dump_node (s, node, indent, 0);
  return g_string_free (s, FALSE);
}

/* ---- loading ------------------------------------------------------------ */

DiffuseConfig *
diffuse_config_from_object (JsonObject *obj, const char *label)
{
  g_return_val_if_fail (obj != NULL, NULL);
  DiffuseConfig *c = g_new0 (DiffuseConfig, 1);
  c->ref_count = 1;
  c->label = g_strdup (label ? label : "(config)");
  c->obj = json_object_ref (obj);
  return c;
}

/* Python's json module writes the non-standard literals NaN, Infinity and
 * -Infinity (diffusers' DPMSolverMultistepScheduler config has
 * "lambda_min_clipped": -Infinity); json-glib rejects them.  Outside strings,
 * Infinity becomes 1e999 (parsed as inf) and NaN becomes null (the key's
 * default).  Returns NULL when there is nothing to rewrite. */
static char *
py_json_literals (const char *json)
{
  if (!strstr (json, "Infinity") && !strstr (json, "NaN"))
    return NULL;
  GString *out = g_string_sized_new (strlen (json) + 16);
  gboolean in_str = FALSE;
  for (const char *p = json; *p; p++) {
    if (in_str) {
      g_string_append_c (out, *p);
      if (*p == '\\' && p[1]) {
        g_string_append_c (out, *++p);
      } else if (*p == '"') {
        in_str = FALSE;
      }
      continue;
    }
    if (*p == '"') {
      in_str = TRUE;
      g_string_append_c (out, *p);
      continue;
    }
    gboolean boundary = p == json || !(g_ascii_isalnum (p[-1]) || p[-1] == '_');
    if (boundary && strncmp (p, "Infinity", 8) == 0 && !g_ascii_isalnum (p[8])) {
      g_string_append (out, "1e999");
      p += 7;
    } else if (boundary && strncmp (p, "NaN", 3) == 0 && !g_ascii_isalnum (p[3])) {
      g_string_append (out, "null");
      p += 2;
    } else {
      g_string_append_c (out, *p);
    }
  }
  return g_string_free (out, FALSE);
}

DiffuseConfig *
diffuse_config_from_string (const char *json_in, const char *label, GError **error)
{
  char *rewritten = json_in ? py_json_literals (json_in) : NULL;
  const char *json = rewritten ? rewritten : json_in;
  g_return_val_if_fail (json != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);
  if (!label)
    label = "(config)";
  JsonParser *parser = json_parser_new ();
  GError *err = NULL;
  if (!json_parser_load_from_data (parser, json, -1, &err)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "%s: invalid JSON: %s", label, err->message);
    g_error_free (err);
    g_object_unref (parser);
    g_free (rewritten);
    return NULL;
  }
  JsonNode *root = json_parser_get_root (parser);
  if (!root) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "%s: invalid JSON: empty document", label);
    g_object_unref (parser);
    g_free (rewritten);
    return NULL;
  }
  if (!JSON_NODE_HOLDS_OBJECT (root)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: the top level is not a JSON object", label);
    g_object_unref (parser);
    g_free (rewritten);
    return NULL;
  }
  DiffuseConfig *c = diffuse_config_from_object (json_node_get_object (root), label);
  g_object_unref (parser);
  g_free (rewritten);
  return c;
}

DiffuseConfig *
diffuse_config_load (const char *path, GError **error)
{
  g_return_val_if_fail (path != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);
  char *text = NULL;
  gsize len = 0;
  GError *err = NULL;
  if (!g_file_get_contents (path, &text, &len, &err)) {
    g_set_error (error, DIFFUSE_ERROR,
                 g_error_matches (err, G_FILE_ERROR, G_FILE_ERROR_NOENT) ? DIFFUSE_ERROR_NOT_FOUND : DIFFUSE_ERROR_IO,
                 "%s", err->message);
    g_error_free (err);
    return NULL;
  }
  if (memchr (text, 0, len)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT, "%s: invalid JSON: NUL byte in the file", path);
    g_free (text);
    return NULL;
  }
  DiffuseConfig *c = diffuse_config_from_string (text, path, error);
  g_free (text);
  return c;
}

DiffuseConfig *
diffuse_config_ref (DiffuseConfig *c)
{
  g_return_val_if_fail (c != NULL, NULL);
  g_atomic_int_inc (&c->ref_count);
  return c;
}

void
diffuse_config_unref (DiffuseConfig *c)
{
  if (!c || !g_atomic_int_dec_and_test (&c->ref_count))
    return;
  json_object_unref (c->obj);
  g_free (c->label);
  g_free (c);
}

JsonObject *
diffuse_config_object (DiffuseConfig *c)
{
  g_return_val_if_fail (c != NULL, NULL);
  return c->obj;
}

const char *
diffuse_config_label (DiffuseConfig *c)
{
  g_return_val_if_fail (c != NULL, NULL);
  return c->label;
}

/* ---- getters ------------------------------------------------------------ */

JsonNode *
diffuse_config_get_node (DiffuseConfig *c, const char *key)
{
  g_return_val_if_fail (c != NULL && key != NULL, NULL);
  return json_object_get_member (c->obj, key);
}

/* The member, or NULL when absent or null. */
static JsonNode *
present (DiffuseConfig *c, const char *key)
{
  JsonNode *n = diffuse_config_get_node (c, key);
  if (!n || JSON_NODE_HOLDS_NULL (n))
    return NULL;
  return n;
}

gboolean
diffuse_config_has (DiffuseConfig *c, const char *key)
{
  return present (c, key) != NULL;
}

static const char *
node_kind (JsonNode *n)
{
  switch (json_node_get_node_type (n)) {
  case JSON_NODE_OBJECT: return "an object";
  case JSON_NODE_ARRAY: return "an array";
  case JSON_NODE_NULL: return "null";
  default: break;
  }
  GType t = json_node_get_value_type (n);
  if (t == G_TYPE_INT64)
    return "an integer";
  if (t == G_TYPE_DOUBLE)
    return "a number";
  if (t == G_TYPE_BOOLEAN)
    return "a boolean";
  if (t == G_TYPE_STRING)
    return "a string";
  return "a value";
}

static gboolean
wrong_type (DiffuseConfig *c, const char *key, JsonNode *n, const char *want, GError **error)
{
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: \"%s\" should be %s, not %s", c->label, key, want,
               node_kind (n));
  return FALSE;
}

static gboolean
node_as_int (JsonNode *n, gint64 *out)
{
  if (!JSON_NODE_HOLDS_VALUE (n))
    return FALSE;
  GType t = json_node_get_value_type (n);
  if (t == G_TYPE_INT64) {
    *out = json_node_get_int (n);
    return TRUE;
  }
  if (t == G_TYPE_DOUBLE) {
    /* 64.0 where an int is meant: fine when integral */
    double d = json_node_get_double (n);
    if (d == floor (d) && d >= -9.2e18 && d <= 9.2e18) {
      *out = (gint64) d;
      return TRUE;
    }
  }
  return FALSE;
}

static gboolean
node_as_double (JsonNode *n, double *out)
{
  if (!JSON_NODE_HOLDS_VALUE (n))
    return FALSE;
  GType t = json_node_get_value_type (n);
  if (t == G_TYPE_INT64) {
    *out = (double) json_node_get_int (n);
    return TRUE;
  }
  if (t == G_TYPE_DOUBLE) {
    *out = json_node_get_double (n);
    return TRUE;
  }
  return FALSE;
}

gboolean
diffuse_config_get_int_checked (DiffuseConfig *c, const char *key, gint64 def, gint64 *out, GError **error)
{
  JsonNode *n = present (c, key);
  if (!n) {
    *out = def;
    return TRUE;
  }
  if (!node_as_int (n, out))
    return wrong_type (c, key, n, "an integer", error);
  return TRUE;
}

gboolean
diffuse_config_get_double_checked (DiffuseConfig *c, const char *key, double def, double *out, GError **error)
{
  JsonNode *n = present (c, key);
  if (!n) {
    *out = def;
    return TRUE;
  }
  if (!node_as_double (n, out))
    return wrong_type (c, key, n, "a number", error);
  return TRUE;
}

gboolean
diffuse_config_get_bool_checked (DiffuseConfig *c, const char *key, gboolean def, gboolean *out, GError **error)
{
  JsonNode *n = present (c, key);
  if (!n) {
    *out = def;
    return TRUE;
  }
  if (JSON_NODE_HOLDS_VALUE (n) && json_node_get_value_type (n) == G_TYPE_BOOLEAN) {
    *out = json_node_get_boolean (n);
    return TRUE;
  }
  return wrong_type (c, key, n, "a boolean", error);
}

gboolean
diffuse_config_get_string_checked (DiffuseConfig *c, const char *key, const char *def, const char **out,
                                   GError **error)
{
  JsonNode *n = present (c, key);
  if (!n) {
    *out = def;
    return TRUE;
  }
  if (JSON_NODE_HOLDS_VALUE (n) && json_node_get_value_type (n) == G_TYPE_STRING) {
    *out = json_node_get_string (n);
    return TRUE;
  }
  return wrong_type (c, key, n, "a string", error);
}

/* The unchecked getters log a warning and return the default on a type
 * mismatch. */
#define UNCHECKED(T, name, def)                                 \
  T v;                                                          \
  GError *err = NULL;                                           \
  if (!diffuse_config_get_##name##_checked (c, key, def, &v, &err)) { \
    g_warning ("%s", err->message);                             \
    g_error_free (err);                                         \
    return def;                                                 \
  }                                                             \
  return v;

gint64
diffuse_config_get_int (DiffuseConfig *c, const char *key, gint64 def)
{
  UNCHECKED (gint64, int, def)
}

double
diffuse_config_get_double (DiffuseConfig *c, const char *key, double def)
{
  UNCHECKED (double, double, def)
}

gboolean
diffuse_config_get_bool (DiffuseConfig *c, const char *key, gboolean def)
{
  UNCHECKED (gboolean, bool, def)
}

const char *
diffuse_config_get_string (DiffuseConfig *c, const char *key, const char *def)
{
  UNCHECKED (const char *, string, def)
}

/* Arrays of numbers: kind 0 = int, 1 = double.  A scalar number gives a
 * 1-element array, or n copies when n > 0. */
static guint
get_num_array (DiffuseConfig *c, const char *key, int kind, guint n, gpointer *out, GError **error)
{
  *out = NULL;
  JsonNode *node = present (c, key);
  if (!node)
    return 0;
  size_t esz = kind == 0 ? sizeof (gint64) : sizeof (double);
  if (JSON_NODE_HOLDS_ARRAY (node)) {
    JsonArray *a = json_node_get_array (node);
    guint len = json_array_get_length (a);
    guint8 *buf = g_malloc0 (esz * (len ? len : 1));
    for (guint i = 0; i < len; i++) {
      JsonNode *e = json_array_get_element (a, i);
      gboolean ok = kind == 0 ? node_as_int (e, (gint64 *) buf + i) : node_as_double (e, (double *) buf + i);
      if (!ok) {
        g_free (buf);
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: \"%s\"[%u] should be %s, not %s", c->label,
                     key, i, kind == 0 ? "an integer" : "a number", node_kind (e));
        return 0;
      }
    }
    *out = buf;
    return len;
  }
  gint64 iv = 0;
  double dv = 0;
  gboolean ok = kind == 0 ? node_as_int (node, &iv) : node_as_double (node, &dv);
  if (!ok) {
    wrong_type (c, key, node, kind == 0 ? "an integer or an array of integers" : "a number or an array of numbers",
                error);
    return 0;
  }
  guint len = n ? n : 1;
  guint8 *buf = g_malloc (esz * len);
  for (guint i = 0; i < len; i++) {
    if (kind == 0)
      ((gint64 *) buf)[i] = iv;
    else
      ((double *) buf)[i] = dv;
  }
  *out = buf;
  return len;
}

static guint
num_array_unchecked (DiffuseConfig *c, const char *key, int kind, guint n, gpointer *out)
{
  g_return_val_if_fail (c != NULL && key != NULL && out != NULL, 0);
  GError *err = NULL;
  guint len = get_num_array (c, key, kind, n, out, &err);
  if (err) {
    g_warning ("%s", err->message);
    g_error_free (err);
  }
  return len;
}

guint
diffuse_config_get_int_array (DiffuseConfig *c, const char *key, gint64 **out)
{
  return num_array_unchecked (c, key, 0, 0, (gpointer *) out);
}

guint
diffuse_config_get_int_array_n (DiffuseConfig *c, const char *key, guint n, gint64 **out)
{
  return num_array_unchecked (c, key, 0, n, (gpointer *) out);
}

guint
diffuse_config_get_double_array (DiffuseConfig *c, const char *key, double **out)
{
  return num_array_unchecked (c, key, 1, 0, (gpointer *) out);
}

guint
diffuse_config_get_int_array_checked (DiffuseConfig *c, const char *key, guint n, gint64 **out, GError **error)
{
  g_return_val_if_fail (c != NULL && key != NULL && out != NULL, 0);
  return get_num_array (c, key, 0, n, (gpointer *) out, error);
}

guint
diffuse_config_get_double_array_checked (DiffuseConfig *c, const char *key, guint n, double **out, GError **error)
{
  g_return_val_if_fail (c != NULL && key != NULL && out != NULL, 0);
  return get_num_array (c, key, 1, n, (gpointer *) out, error);
}

char **
diffuse_config_get_string_array (DiffuseConfig *c, const char *key)
{
  g_return_val_if_fail (c != NULL && key != NULL, NULL);
  JsonNode *node = present (c, key);
  if (!node)
    return NULL;
  if (JSON_NODE_HOLDS_VALUE (node) && json_node_get_value_type (node) == G_TYPE_STRING) {
    char **v = g_new0 (char *, 2);
    v[0] = g_strdup (json_node_get_string (node));
    return v;
  }
  if (!JSON_NODE_HOLDS_ARRAY (node)) {
    g_warning ("%s: \"%s\" should be an array of strings, not %s", c->label, key, node_kind (node));
    return NULL;
  }
  JsonArray *a = json_node_get_array (node);
  guint len = json_array_get_length (a);
  char **v = g_new0 (char *, len + 1);
  for (guint i = 0; i < len; i++) {
    JsonNode *e = json_array_get_element (a, i);
    if (!JSON_NODE_HOLDS_VALUE (e) || json_node_get_value_type (e) != G_TYPE_STRING) {
      /* [null, null] (a component left out in model_index.json) is not an
       * error, just not a string array */
      if (!JSON_NODE_HOLDS_NULL (e))
        g_warning ("%s: \"%s\"[%u] should be a string, not %s", c->label, key, i, node_kind (e));
      g_strfreev (v);
      return NULL;
    }
    v[i] = g_strdup (json_node_get_string (e));
  }
  return v;
}

/* ---- saving ------------------------------------------------------------- */

char *
diffuse_config_to_string (DiffuseConfig *c)
{
  g_return_val_if_fail (c != NULL, NULL);
  JsonNode *node = json_node_init_object (json_node_alloc (), c->obj);
  char *txt = _diffuse_json_dump_py (node, 2);
  json_node_unref (node);
  char *out = g_strconcat (txt, "\n", NULL);
  g_free (txt);
  return out;
}

gboolean
diffuse_config_save (DiffuseConfig *c, const char *path, GError **error)
{
  g_return_val_if_fail (c != NULL && path != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);
  char *txt = diffuse_config_to_string (c);
  gboolean ok = _diffuse_write_file_atomic (path, txt, strlen (txt), error);
  g_free (txt);
  return ok;
}

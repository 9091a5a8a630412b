/* gst-diffuse — reading diffusers/transformers JSON configs.
 *
 * A DiffuseConfig is a parsed JSON object (config.json, scheduler_config.json,
 * model_index.json, tokenizer_config.json).  Getters take a default that is
 * used when the key is absent or JSON null, as diffusers' register_to_config
 * defaults do.  A present key of the wrong type is a DIFFUSE_ERROR_CONFIG
 * naming the file and key when asked through the *_checked getters. */
#pragma once

#include <glib.h>
#include <json-glib/json-glib.h>

G_BEGIN_DECLS

typedef struct _DiffuseConfig DiffuseConfig;

DiffuseConfig *diffuse_config_load (const char *path, GError **error);
DiffuseConfig *diffuse_config_from_string (const char *json, const char *label, GError **error);
/* Wraps an object (ref taken); label used in messages. */
DiffuseConfig *diffuse_config_from_object (JsonObject *obj, const char *label);
DiffuseConfig *diffuse_config_ref (DiffuseConfig *c);
void diffuse_config_unref (DiffuseConfig *c);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (DiffuseConfig, diffuse_config_unref)

JsonObject *diffuse_config_object (DiffuseConfig *c);
const char *diffuse_config_label (DiffuseConfig *c);   /* usually the file path */

gboolean diffuse_config_has (DiffuseConfig *c, const char *key);      /* present and not null */
gint64 diffuse_config_get_int (DiffuseConfig *c, const char *key, gint64 def);
double diffuse_config_get_double (DiffuseConfig *c, const char *key, double def);
gboolean diffuse_config_get_bool (DiffuseConfig *c, const char *key, gboolean def);
/* Owned by the config. */
const char *diffuse_config_get_string (DiffuseConfig *c, const char *key, const char *def);
/* Array of ints (a single number gives a 1-element array; see
 * diffuse_config_get_int_array_n to repeat it: diffusers'
 * "attention_head_dim": 8 vs [5, 10, 20, 20]).  Returns the length, 0 (and
 * *out = NULL) when absent or null; *out is g_new'd. */
guint diffuse_config_get_int_array (DiffuseConfig *c, const char *key, gint64 **out);
guint diffuse_config_get_double_array (DiffuseConfig *c, const char *key, double **out);
/* NULL-terminated; g_strfreev.  A single string gives a 1-element array;
 * NULL when absent, or when an element is not a string (model_index.json's
 * [null, null] for a left-out component gives NULL without a warning). */
char **diffuse_config_get_string_array (DiffuseConfig *c, const char *key);
JsonNode *diffuse_config_get_node (DiffuseConfig *c, const char *key);   /* borrowed, or NULL */

/* The plain getters above log a g_warning and return the default (0 / NULL
 * for arrays) when a present key has the wrong type.  The *_checked ones
 * return FALSE with DIFFUSE_ERROR_CONFIG naming the file and key instead.
 * An integral number (64.0) is accepted as an int; an int as a double. */
gboolean diffuse_config_get_int_checked (DiffuseConfig *c, const char *key, gint64 def, gint64 *out, GError **error);
gboolean diffuse_config_get_double_checked (DiffuseConfig *c, const char *key, double def, double *out,
                                            GError **error);
gboolean diffuse_config_get_bool_checked (DiffuseConfig *c, const char *key, gboolean def, gboolean *out,
                                          GError **error);
gboolean diffuse_config_get_string_checked (DiffuseConfig *c, const char *key, const char *def, const char **out,
                                            GError **error);
/* Like diffuse_config_get_int_array, but a single number is repeated n
 * times (n > 0), as diffusers broadcasts "attention_head_dim": 8 over the
 * blocks.  An array is returned as is (the caller checks its length). */
guint diffuse_config_get_int_array_n (DiffuseConfig *c, const char *key, guint n, gint64 **out);
/* Checked forms of the array getters (n as above; 0 gives a 1-element array
 * for a single number).  On error returns 0 with *out NULL and error set;
 * check error, not the length, to tell an absent key from a bad one. */
guint diffuse_config_get_int_array_checked (DiffuseConfig *c, const char *key, guint n, gint64 **out,
                                            GError **error);
guint diffuse_config_get_double_array_checked (DiffuseConfig *c, const char *key, guint n, double **out,
                                               GError **error);

/* The text diffuse_config_save writes (g_free). */
char *diffuse_config_to_string (DiffuseConfig *c);

/* Writes the object pretty-printed, byte for byte as Python's
 * json.dumps(obj, indent=2, sort_keys=True) + "\n" (diffusers'
 * to_json_string): ensure_ascii escapes, float repr ("1e-05", "1.0").
 * Atomic (temp file + rename). */
gboolean diffuse_config_save (DiffuseConfig *c, const char *path, GError **error);

G_END_DECLS

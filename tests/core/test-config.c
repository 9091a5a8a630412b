/* Tests of DiffuseConfig: getters over a diffusers config.json, errors, and
 * diffuse_config_save's bytes against Python's json.dumps(indent=2,
 * sort_keys=True) (fixtures from tests/reference/make_config_fixtures.py and
 * make_safetensors_fixtures.py). */
#include "testutil.h"

#include <glib/gstdio.h>
#include <math.h>
#include <string.h>

static char *
read_all (const char *path)
{
  char *s = NULL;
  GError *err = NULL;
  g_file_get_contents (path, &s, NULL, &err);
  g_assert_no_error (err);
  return s;
}

static DiffuseConfig *
load_fixture (const char *rel)
{
  char *p = tu_fixture (rel);
  GError *err = NULL;
  DiffuseConfig *c = diffuse_config_load (p, &err);
  g_assert_no_error (err);
  g_assert_nonnull (c);
  g_assert_cmpstr (diffuse_config_label (c), ==, p);
  g_free (p);
  return c;
}

/* A diffusers UNet config.json (written by save_pretrained). */
static void
test_unet_config (void)
{
  g_autoptr (DiffuseConfig) c = load_fixture ("safetensors/py_unet/config.json");
  g_assert_cmpstr (diffuse_config_get_string (c, "_class_name", NULL), ==, "UNet2DConditionModel");
  g_assert_cmpint (diffuse_config_get_int (c, "in_channels", 0), ==, 4);
  g_assert_cmpint (diffuse_config_get_int (c, "sample_size", 0), ==, 8);
  g_assert_cmpfloat (diffuse_config_get_double (c, "norm_eps", 0), ==, 1e-5);
  g_assert_cmpfloat (diffuse_config_get_double (c, "resnet_out_scale_factor", 0), ==, 1.0);
  g_assert_cmpfloat (diffuse_config_get_double (c, "in_channels", 0), ==, 4.0);   /* int as double */
  g_assert_false (diffuse_config_get_bool (c, "center_input_sample", TRUE));
  g_assert_true (diffuse_config_get_bool (c, "flip_sin_to_cos", FALSE));
  g_assert_cmpstr (diffuse_config_get_string (c, "act_fn", NULL), ==, "silu");

  /* null and absent use the default */
  g_assert_true (diffuse_config_get_node (c, "addition_embed_type") != NULL);
  g_assert_false (diffuse_config_has (c, "addition_embed_type"));
  g_assert_false (diffuse_config_has (c, "no_such_key"));
  g_assert_true (diffuse_config_has (c, "in_channels"));
  g_assert_cmpint (diffuse_config_get_int (c, "num_class_embeds", -7), ==, -7);
  g_assert_cmpint (diffuse_config_get_int (c, "no_such_key", 42), ==, 42);
  g_assert_cmpstr (diffuse_config_get_string (c, "class_embed_type", "dflt"), ==, "dflt");
  g_assert_true (diffuse_config_get_bool (c, "no_such_key", TRUE));
  g_assert_cmpfloat (diffuse_config_get_double (c, "no_such_key", 0.25), ==, 0.25);
  g_assert_null (diffuse_config_get_node (c, "no_such_key"));

  gint64 *a = NULL;
  guint n = diffuse_config_get_int_array (c, "block_out_channels", &a);
  g_assert_cmpuint (n, ==, 2);
  g_assert_cmpint (a[0], ==, 8);
  g_assert_cmpint (a[1], ==, 16);
  g_free (a);
  /* "attention_head_dim": 2 -> one value, or repeated */
  n = diffuse_config_get_int_array (c, "attention_head_dim", &a);
  g_assert_cmpuint (n, ==, 1);
  g_assert_cmpint (a[0], ==, 2);
  g_free (a);
  n = diffuse_config_get_int_array_n (c, "attention_head_dim", 3, &a);
  g_assert_cmpuint (n, ==, 3);
  g_assert_cmpint (a[0], ==, 2);
  g_assert_cmpint (a[2], ==, 2);
  g_free (a);
  n = diffuse_config_get_int_array_n (c, "block_out_channels", 5, &a);   /* arrays as they are */
  g_assert_cmpuint (n, ==, 2);
  g_free (a);
  a = (gint64 *) 0x1;
  n = diffuse_config_get_int_array (c, "num_attention_heads", &a);       /* null */
  g_assert_cmpuint (n, ==, 0);
  g_assert_null (a);
  double *d = NULL;
  n = diffuse_config_get_double_array (c, "block_out_channels", &d);
  g_assert_cmpuint (n, ==, 2);
  g_assert_cmpfloat (d[1], ==, 16.0);
  g_free (d);

  char **sv = diffuse_config_get_string_array (c, "down_block_types");
  g_assert_cmpuint (g_strv_length (sv), ==, 2);
  g_assert_cmpstr (sv[0], ==, "CrossAttnDownBlock2D");
  g_assert_cmpstr (sv[1], ==, "DownBlock2D");
  g_strfreev (sv);
  sv = diffuse_config_get_string_array (c, "act_fn");   /* a single string */
  g_assert_cmpuint (g_strv_length (sv), ==, 1);
  g_strfreev (sv);
  g_assert_null (diffuse_config_get_string_array (c, "addition_embed_type"));
  g_assert_null (diffuse_config_get_string_array (c, "no_such_key"));

  /* save: the same bytes as diffusers wrote */
  char *dir = tu_mkdtemp ();
  char *out = g_build_filename (dir, "config.json", NULL);
  GError *err = NULL;
  g_assert_true (diffuse_config_save (c, out, &err));
  g_assert_no_error (err);
  char *want_p = tu_fixture ("safetensors/py_unet/config.json");
  char *got = read_all (out), *want = read_all (want_p);
  g_assert_cmpstr (got, ==, want);
  char *s = diffuse_config_to_string (c);
  g_assert_cmpstr (s, ==, want);
  g_free (s);
  g_free (got);
  g_free (want);
  g_free (want_p);
  tu_rm_rf (dir);
  g_free (dir);
  g_free (out);
}

/* Every json.dumps formatting rule: load + save gives the same bytes. */
static void
test_python_json_bytes (void)
{
  g_autoptr (DiffuseConfig) c = load_fixture ("config/pyjson.json");
  char *p = tu_fixture ("config/pyjson.json");
  char *want = read_all (p);
  char *got = diffuse_config_to_string (c);
  if (strcmp (got, want) != 0) {
    /* print the first difference */
    size_t i = 0;
    while (got[i] && got[i] == want[i])
      i++;
    g_error ("differs at byte %zu: got \"%.40s\" want \"%.40s\"", i, got + i, want + i);
  }
  g_free (got);
  g_free (want);
  g_free (p);

  /* a few values through the getters */
  double *f = NULL;
  guint n = diffuse_config_get_double_array (c, "floats", &f);
  g_assert_cmpuint (n, ==, 30);
  g_assert_cmpfloat (f[0], ==, 0.1);
  g_assert_cmpfloat (f[8], ==, 5e-324);
  g_assert_true (signbit (f[10]) && f[10] == 0);
  g_free (f);
  gint64 *iv = NULL;
  n = diffuse_config_get_int_array (c, "ints", &iv);
  g_assert_cmpuint (n, ==, 5);
  g_assert_cmpint (iv[2], ==, G_GINT64_CONSTANT (9007199254740993));
  g_assert_cmpint (iv[4], ==, G_MAXINT64);
  g_free (iv);
  char **sv = diffuse_config_get_string_array (c, "strings");
  g_assert_cmpstr (sv[2], ==, "ctrl\b\f\n\r\t\x01\x1f\x7f");
  g_assert_cmpstr (sv[4], ==, "\xf0\x9f\x98\x80 emoji");
  g_strfreev (sv);
  g_assert_cmpstr (diffuse_config_get_string (c, "\xc3\xa9key", NULL), ==, "non-ascii key");
}

/* inf / nan, which json-glib cannot read back: a node built here. */
static void
test_python_json_special (void)
{
  char *p = tu_fixture ("config/special.json");
  GError *err = NULL;
  g_autoptr (DiffuseConfig) holder = diffuse_config_load (p, &err);
  g_assert_no_error (err);
  const char *want = diffuse_config_get_string (holder, "text", NULL);
  JsonObject *o = json_object_new ();
  json_object_set_double_member (o, "c", NAN);
  json_object_set_double_member (o, "b", -INFINITY);
  json_object_set_double_member (o, "a", INFINITY);
  JsonArray *arr = json_array_new ();
  json_array_add_double_element (arr, 1e301);
  json_object_set_array_member (o, "d", arr);
  DiffuseConfig *c = diffuse_config_from_object (o, "built");
  json_object_unref (o);
  g_assert_cmpstr (diffuse_config_label (c), ==, "built");
  char *got = diffuse_config_to_string (c);
  g_assert_cmpstr (got, ==, want);
  g_free (got);
  g_assert_true (diffuse_config_ref (c) == c);
  diffuse_config_unref (c);
  diffuse_config_unref (c);
  g_free (p);
}

static void
test_wrong_types (void)
{
  GError *err = NULL;
  g_autoptr (DiffuseConfig) c = diffuse_config_from_string (
      "{\"i\": \"four\", \"f\": 2.5, \"f2\": 64.0, \"b\": 1, \"s\": 3, \"arr\": [1, \"x\"], \"sarr\": [\"a\", 2],"
      " \"nulls\": [null, null], \"obj\": {}}", "cfg.json", &err);
  g_assert_no_error (err);

  gint64 iv = 0;
  g_assert_false (diffuse_config_get_int_checked (c, "i", 7, &iv, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_assert_nonnull (strstr (err->message, "cfg.json"));
  g_assert_nonnull (strstr (err->message, "\"i\""));
  g_clear_error (&err);
  g_assert_false (diffuse_config_get_int_checked (c, "f", 7, &iv, &err));   /* 2.5 is not an int */
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_clear_error (&err);
  g_assert_true (diffuse_config_get_int_checked (c, "f2", 7, &iv, &err));   /* 64.0 is */
  g_assert_cmpint (iv, ==, 64);
  g_assert_true (diffuse_config_get_int_checked (c, "absent", 7, &iv, &err));
  g_assert_cmpint (iv, ==, 7);
  double dv;
  g_assert_false (diffuse_config_get_double_checked (c, "i", 1, &dv, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_clear_error (&err);
  gboolean bv;
  g_assert_false (diffuse_config_get_bool_checked (c, "b", FALSE, &bv, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_clear_error (&err);
  const char *sv;
  g_assert_false (diffuse_config_get_string_checked (c, "s", NULL, &sv, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_assert_nonnull (strstr (err->message, "\"s\""));
  g_clear_error (&err);
  gint64 *arr = NULL;
  g_assert_cmpuint (diffuse_config_get_int_array_checked (c, "arr", 0, &arr, &err), ==, 0);
  g_assert_null (arr);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_assert_nonnull (strstr (err->message, "\"arr\"[1]"));
  g_clear_error (&err);
  double *darr = NULL;
  g_assert_cmpuint (diffuse_config_get_double_array_checked (c, "obj", 0, &darr, &err), ==, 0);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_clear_error (&err);

  /* the plain getters warn and return the default */
  g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING, "*cfg.json*\"i\"*");
  g_assert_cmpint (diffuse_config_get_int (c, "i", 7), ==, 7);
  g_test_assert_expected_messages ();
  g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING, "*\"s\"*");
  g_assert_cmpstr (diffuse_config_get_string (c, "s", "d"), ==, "d");
  g_test_assert_expected_messages ();
  g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING, "*\"b\"*");
  g_assert_true (diffuse_config_get_bool (c, "b", TRUE));
  g_test_assert_expected_messages ();
  g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING, "*\"arr\"*");
  g_assert_cmpuint (diffuse_config_get_int_array (c, "arr", &arr), ==, 0);
  g_test_assert_expected_messages ();
  g_assert_null (arr);
  g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING, "*\"sarr\"[1]*");
  g_assert_null (diffuse_config_get_string_array (c, "sarr"));
  g_test_assert_expected_messages ();
  /* [null, null] is not a string array, silently */
  g_assert_null (diffuse_config_get_string_array (c, "nulls"));
  g_assert_true (diffuse_config_has (c, "nulls"));
}

static void
test_load_errors (void)
{
  GError *err = NULL;
  DiffuseConfig *c = diffuse_config_load ("/nonexistent/config.json", &err);
  g_assert_null (c);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, "/nonexistent/config.json"));
  g_clear_error (&err);

  static const struct { const char *text; int code; } bad[] = {
    { "", DIFFUSE_ERROR_CORRUPT },
    { "{", DIFFUSE_ERROR_CORRUPT },
    { "{\"a\": }", DIFFUSE_ERROR_CORRUPT },
    { "{\"a\": 1} x", DIFFUSE_ERROR_CORRUPT },
    { "[1, 2]", DIFFUSE_ERROR_CONFIG },
    { "\"str\"", DIFFUSE_ERROR_CONFIG },
    { "null", DIFFUSE_ERROR_CONFIG },
  };
  for (guint i = 0; i < G_N_ELEMENTS (bad); i++) {
    c = diffuse_config_from_string (bad[i].text, "bad.json", &err);
    g_assert_null (c);
    g_assert_error (err, DIFFUSE_ERROR, bad[i].code);
    g_assert_nonnull (strstr (err->message, "bad.json"));
    g_clear_error (&err);
  }
  /* a file with a NUL byte and one that is a directory */
  char *dir = tu_mkdtemp ();
  char *p = g_build_filename (dir, "nul.json", NULL);
  g_assert_true (g_file_set_contents (p, "{}\0{}", 5, NULL));
  c = diffuse_config_load (p, &err);
  g_assert_null (c);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT);
  g_assert_nonnull (strstr (err->message, p));
  g_clear_error (&err);
  c = diffuse_config_load (dir, &err);
  g_assert_null (c);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_IO);
  g_clear_error (&err);

  /* saving into a missing folder fails without leaving anything */
  c = diffuse_config_from_string ("{\"a\": 1}", NULL, &err);
  g_assert_no_error (err);
  char *bad_path = g_build_filename (dir, "missing", "config.json", NULL);
  g_assert_false (diffuse_config_save (c, bad_path, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_IO);
  g_clear_error (&err);
  /* and saving over an existing file replaces it */
  g_assert_true (diffuse_config_save (c, p, &err));
  g_assert_no_error (err);
  char *txt = read_all (p);
  g_assert_cmpstr (txt, ==, "{\n  \"a\": 1\n}\n");
  g_free (txt);
  diffuse_config_unref (c);
  g_free (bad_path);
  g_free (p);
  tu_rm_rf (dir);
  g_free (dir);
}

/* Python's json writes -Infinity / NaN: a real DPMSolverMultistepScheduler
 * config has "lambda_min_clipped": -Infinity.  It must load (inf; NaN as
 * absent), and the literals inside strings stay untouched. */
static void
test_python_literals_in (void)
{
  GError *err = NULL;
  DiffuseConfig *c = diffuse_config_from_string (
      "{\"lambda_min_clipped\": -Infinity, \"hi\": Infinity, \"n\": NaN, \"s\": \"-Infinity NaN\", \"k\": 2}",
      "sched", &err);
  g_assert_no_error (err);
  g_assert_true (isinf (diffuse_config_get_double (c, "lambda_min_clipped", 0)));
  g_assert_cmpfloat (diffuse_config_get_double (c, "lambda_min_clipped", 0), <, 0);
  g_assert_true (isinf (diffuse_config_get_double (c, "hi", 0)));
  g_assert_cmpfloat (diffuse_config_get_double (c, "n", 7.0), ==, 7.0);
  g_assert_cmpstr (diffuse_config_get_string (c, "s", NULL), ==, "-Infinity NaN");
  g_assert_cmpint (diffuse_config_get_int (c, "k", 0), ==, 2);
  diffuse_config_unref (c);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/config/unet-config", test_unet_config);
  g_test_add_func ("/config/python-json-bytes", test_python_json_bytes);
  g_test_add_func ("/config/python-json-special", test_python_json_special);
  g_test_add_func ("/config/python-literals-in", test_python_literals_in);
  g_test_add_func ("/config/wrong-types", test_wrong_types);
  g_test_add_func ("/config/load-errors", test_load_errors);
  return g_test_run ();
}

/* The pipeline-folder loader against what diffusers does with the same folders
 * (tests/reference/check_pipeline_loading.py -> expected_loading.json): which
 * weight files each component reads, with what values (checksums), in what
 * dtype, which loads fail; plus the component cache, overrides, from_pipe,
 * save_pretrained round trips and the Hub path (test Hub on 127.0.0.1).
 *
 * PyTorch .bin weights are read (without executing them, as
 * torch.load(weights_only=True)) wherever diffusers reads them.
 *
 * Deliberate differences from diffusers (docs/loading-rules.md):
 *  - with no dtype every model component is float32 (transformers 5 would
 *    keep a text encoder in the checkpoint's float16);
 *  - a required component cannot be overridden with "none". */
#include "testutil.h"
#include <diffuse/pipeline.h>
#include <glib/gstdio.h>
#include <diffuse/hub.h>
#include <json-glib/json-glib.h>
#include <string.h>
#include <math.h>
#ifdef HAVE_HUBSERVER
#include "hubserver.h"
#endif

static JsonObject *root;

static char *
fixture_dir (const char *folder)
{
  char *rel = g_build_filename ("pipelines", folder, NULL);
  char *p = tu_fixture (rel);
  g_free (rel);
  return p;
}

static gboolean
parse_dtype (const char *s, DiffuseDType *dt)
{
  return diffuse_dtype_from_string (s, dt);
}

/* Sum of all values (float64) of a component's tensors as loaded. */
static double
component_sum (DiffuseComponent *c, guint64 *elements)
{
  DiffuseWeights *w = diffuse_component_weights (c);
  guint n = 0;
  const char **names = diffuse_weights_names (w, &n);
  double sum = 0;
  *elements = 0;
  for (guint i = 0; i < n; i++) {
    GError *err = NULL;
    DiffuseTensor *t = diffuse_weights_get (w, names[i], diffuse_component_dtype (c), diffuse_device_cpu (), &err);
    g_assert_no_error (err);
    g_assert_cmpint (t->dtype, ==, diffuse_component_dtype (c));
    DiffuseTensor *f = diffuse_cast (t, DIFFUSE_DTYPE_F32);
    DiffuseTensor *fc = diffuse_contiguous (f);
    const float *p = diffuse_tensor_f32 (fc);
    for (int64_t k = 0; k < diffuse_tensor_numel (fc); k++)
      sum += p[k];
    *elements += (guint64) diffuse_tensor_numel (fc);
    diffuse_tensor_unref (fc);
    diffuse_tensor_unref (f);
    diffuse_tensor_unref (t);
  }
  g_free (names);
  return sum;
}

typedef struct {
  JsonObject *c;
} Case;

static void
run_case (gconstpointer data)
{
  JsonObject *c = (JsonObject *) data;
  const char *folder = json_object_get_string_member (c, "folder");
  const char *loader = json_object_get_string_member (c, "loader");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  JsonNode *v = json_object_get_member (c, "variant");
  lp.variant = JSON_NODE_HOLDS_NULL (v) ? NULL : json_node_get_string (v);
  JsonNode *us = json_object_get_member (c, "use_safetensors");
  lp.use_safetensors = JSON_NODE_HOLDS_NULL (us)       ? DIFFUSE_SAFETENSORS_AUTO
                       : json_node_get_boolean (us)    ? DIFFUSE_SAFETENSORS_REQUIRE
                                                        : DIFFUSE_SAFETENSORS_ALLOW_BIN;
  JsonNode *dt = json_object_get_member (c, "dtype");
  GHashTable *dmap = NULL;
  if (JSON_NODE_HOLDS_VALUE (dt)) {
    g_assert_true (parse_dtype (json_node_get_string (dt), &lp.dtype));
    lp.have_dtype = TRUE;
  } else if (JSON_NODE_HOLDS_OBJECT (dt)) {
    dmap = g_hash_table_new (g_str_hash, g_str_equal);
    JsonObject *o = json_node_get_object (dt);
    GList *keys = json_object_get_members (o);
    for (GList *l = keys; l; l = l->next) {
      DiffuseDType d;
      g_assert_true (parse_dtype (json_object_get_string_member (o, l->data), &d));
      g_hash_table_insert (dmap, l->data, GINT_TO_POINTER (d));
    }
    g_list_free (keys);
    lp.component_dtypes = dmap;
  }
  if (strcmp (loader, "DiffusionPipeline") != 0)
    lp.pipeline_class = loader;

  /* overrides the C API can express */
  GHashTable *ov = NULL;
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  gboolean override_unet_none = FALSE;
  if (json_object_has_member (c, "overrides") && !JSON_NODE_HOLDS_NULL (json_object_get_member (c, "overrides"))) {
    JsonObject *o = json_object_get_object_member (c, "overrides");
    ov = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, (GDestroyNotify) diffuse_component_unref);
    GList *keys = json_object_get_members (o);
    for (GList *l = keys; l; l = l->next) {
      const char *k = l->data, *val = json_object_get_string_member (o, k);
      if (strcmp (val, "None") == 0) {
        g_hash_table_insert (ov, g_strdup (k), NULL);
        override_unet_none |= strcmp (k, "unet") == 0;
      } else if (g_str_has_prefix (val, "AutoencoderKL.from_pretrained(tiny-sd/vae, variant=fp16)") &&
                 strcmp (k, "vae") == 0) {
        DiffuseLoadParams vp = diffuse_load_default_params ();
        vp.variant = "fp16";
        char *dir = fixture_dir ("tiny-sd");
        GError *err = NULL;
        DiffuseComponent *vc = diffuse_component_load (cache, dir, "vae", "vae", &vp, &err);
        g_assert_no_error (err);
        g_free (dir);
        g_hash_table_insert (ov, g_strdup (k), vc);
      } else if (g_str_has_prefix (val, "UNet2DConditionModel.from_pretrained(tiny-sd/unet)")) {
        char *dir = fixture_dir ("tiny-sd");
        GError *err = NULL;
        DiffuseComponent *uc = diffuse_component_load (cache, dir, "unet", "unet", NULL, &err);
        g_assert_no_error (err);
        g_free (dir);
        g_hash_table_insert (ov, g_strdup (k), uc);
      } else {
        g_list_free (keys);
        g_hash_table_unref (ov);
        diffuse_component_cache_unref (cache);
        if (dmap)
          g_hash_table_unref (dmap);
        g_test_skip ("override not expressible in the C API");
        return;
      }
    }
    g_list_free (keys);
    lp.overrides = ov;
  }

  char *dir = fixture_dir (folder);
  GError *err = NULL;
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (dir, &lp, cache, &err);
  gboolean expect_ok = json_object_get_boolean_member (c, "ok");

  /* deliberate differences */
  if (override_unet_none) {
    g_assert_null (pm);
    g_assert_nonnull (err);
    g_assert_true (err->code == DIFFUSE_ERROR_UNSUPPORTED || err->code == DIFFUSE_ERROR_INVALID_ARGUMENT);
    g_test_message ("deliberate difference: %s", err->message);
    goto done;
  }
  if (!expect_ok) {
    if (pm)
      g_error ("case %" G_GINT64_FORMAT ": diffusers fails (%s) but we loaded it",
               json_object_get_int_member (c, "id"),
               json_object_get_string_member (json_object_get_object_member (c, "error"), "message"));
    g_assert_nonnull (err);
    g_assert_true (err->domain == DIFFUSE_ERROR);
    g_test_message ("both fail; ours: %s", err->message);
    goto done;
  }
  if (!pm)
    g_error ("case %" G_GINT64_FORMAT ": diffusers loads it but we fail: %s", json_object_get_int_member (c, "id"),
             err->message);

  /* the pipeline class and each component */
  if (json_object_has_member (c, "pipeline_class") && strcmp (loader, "DiffusionPipeline") != 0)
    g_assert_cmpstr (diffuse_pipeline_model_class (pm), ==, json_object_get_string_member (c, "pipeline_class"));
  JsonObject *comps = json_object_get_object_member (c, "components");
  GList *keys = json_object_get_members (comps);
  for (GList *l = keys; l; l = l->next) {
    const char *name = l->data;
    JsonNode *n = json_object_get_member (comps, name);
    DiffuseComponent *comp = diffuse_pipeline_model_get (pm, name);
    if (JSON_NODE_HOLDS_NULL (n)) {
      g_assert_null (comp);
      continue;
    }
    JsonObject *eo = json_node_get_object (n);
    g_assert_nonnull (comp);
    g_assert_cmpstr (diffuse_component_class (comp), ==, json_object_get_string_member (eo, "class"));
    if (!json_object_has_member (eo, "files"))
      continue;
    /* files: same set, relative to the pipeline folder (or the component's own, for overrides) */
    JsonArray *files = json_object_get_array_member (eo, "files");
    const char *const *ours = diffuse_component_files (comp);
    guint n_ours = ours ? g_strv_length ((char **) ours) : 0;
    gboolean overridden = ov && g_hash_table_contains (ov, name);
    if (!overridden)   /* diffusers records no files for objects passed in */
      g_assert_cmpuint (n_ours, ==, json_array_get_length (files));
    for (guint i = 0; !overridden && i < json_array_get_length (files); i++) {
      char *base = g_path_get_basename (json_array_get_string_element (files, i));
      gboolean found = FALSE;
      for (guint j = 0; j < n_ours && !found; j++) {
        char *b = g_path_get_basename (ours[j]);
        found = strcmp (b, base) == 0;
        g_free (b);
      }
      if (!found)
        g_error ("case %" G_GINT64_FORMAT " %s: diffusers reads %s, we do not", json_object_get_int_member (c, "id"),
                 name, base);
      g_free (base);
    }
    /* dtype (transformers' "auto" for an unspecified dtype is a deliberate difference) */
    const char *edt = json_object_get_string_member (eo, "dtype");
    DiffuseDType want;
    g_assert_true (parse_dtype (edt, &want));
    gboolean transformers_auto = !lp.have_dtype && !lp.component_dtypes &&
                                 strcmp (diffuse_component_library (comp), "transformers") == 0;
    if (!transformers_auto)
      g_assert_cmpstr (diffuse_dtype_name (diffuse_component_dtype (comp)), ==, edt);
    /* values: checksum of what was loaded */
    JsonObject *ck = json_object_get_object_member (eo, "checksum");
    guint64 elements = 0;
    double sum = component_sum (comp, &elements);
    g_assert_cmpuint (elements, ==, (guint64) json_object_get_int_member (ck, "elements"));
    double esum = json_object_get_double_member (ck, "sum"), eabs = json_object_get_double_member (ck, "abs_sum");
    if (fabs (sum - esum) > 1e-6 * eabs + 1e-9)
      g_error ("case %" G_GINT64_FORMAT " %s: checksum %.9g, diffusers %.9g (wrong file or conversion)",
               json_object_get_int_member (c, "id"), name, sum, esum);
  }
  g_list_free (keys);

done:
  g_clear_error (&err);
  if (pm)
    diffuse_pipeline_model_unref (pm);
  if (ov)
    g_hash_table_unref (ov);
  if (dmap)
    g_hash_table_unref (dmap);
  g_free (dir);
  diffuse_component_cache_unref (cache);
}

static void
test_cache_sharing (void)
{
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  char *dir = fixture_dir ("tiny-sd");
  GError *err = NULL;
  DiffusePipelineModel *a = diffuse_pipeline_model_load (dir, NULL, cache, &err);
  g_assert_no_error (err);
  DiffuseCacheStats s1, s2, s3;
  diffuse_component_cache_get_stats (cache, &s1);
  g_assert_cmpuint (s1.n_loads, ==, 5);   /* vae, text_encoder, tokenizer, unet, scheduler */
  g_assert_cmpuint (s1.resident_bytes, >, 0);

  /* the same model again, and as img2img: nothing new is loaded */
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.pipeline_class = "StableDiffusionImg2ImgPipeline";
  DiffusePipelineModel *b = diffuse_pipeline_model_load (dir, &lp, cache, &err);
  g_assert_no_error (err);
  diffuse_component_cache_get_stats (cache, &s2);
  g_assert_cmpuint (s2.n_loads, ==, s1.n_loads);
  g_assert_cmpuint (s2.resident_bytes, ==, s1.resident_bytes);
  g_assert_true (diffuse_pipeline_model_get (a, "unet") == diffuse_pipeline_model_get (b, "unet"));

  /* another dtype loads only what differs (models; scheduler/tokenizer are shared) */
  DiffuseLoadParams lp16 = diffuse_load_default_params ();
  lp16.have_dtype = TRUE;
  lp16.dtype = DIFFUSE_DTYPE_F16;
  DiffusePipelineModel *c = diffuse_pipeline_model_load (dir, &lp16, cache, &err);
  g_assert_no_error (err);
  diffuse_component_cache_get_stats (cache, &s3);
  g_assert_cmpuint (s3.n_loads, ==, s1.n_loads + 3);
  g_assert_cmpuint (s3.resident_bytes, ==, s1.resident_bytes + s1.resident_bytes / 2);
  g_assert_true (diffuse_pipeline_model_get (a, "tokenizer") == diffuse_pipeline_model_get (c, "tokenizer"));

  /* the same tensor object for two builders */
  DiffuseWeights *w = diffuse_component_weights (diffuse_pipeline_model_get (a, "unet"));
  DiffuseTensor *t1 = diffuse_weights_get (w, "conv_in.weight", DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
  DiffuseTensor *t2 = diffuse_weights_get (w, "conv_in.weight", DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
  g_assert_true (t1 == t2);
  g_assert_true (diffuse_tensor_is_borrowed (t1));   /* f32 file, f32 compute: straight from the mapping */
  diffuse_tensor_unref (t1);
  diffuse_tensor_unref (t2);

  /* from_pipe: a derived pipeline with the safety checker explicitly none and another class */
  GHashTable *ov = g_hash_table_new (g_str_hash, g_str_equal);
  g_hash_table_insert (ov, (gpointer) "safety_checker", NULL);
  DiffusePipelineModel *d = diffuse_pipeline_model_derive (a, "StableDiffusionImg2ImgPipeline", ov, &err);
  g_assert_no_error (err);
  g_assert_true (diffuse_pipeline_model_get (d, "vae") == diffuse_pipeline_model_get (a, "vae"));
  g_hash_table_insert (ov, (gpointer) "unet", NULL);
  g_assert_null (diffuse_pipeline_model_derive (a, NULL, ov, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  g_hash_table_unref (ov);

  diffuse_pipeline_model_unref (a);
  diffuse_pipeline_model_unref (b);
  diffuse_pipeline_model_unref (c);
  diffuse_pipeline_model_unref (d);
  DiffuseCacheStats s4;
  diffuse_component_cache_get_stats (cache, &s4);
  g_assert_cmpuint (s4.n_components, ==, 0);   /* nothing alive once every pipeline is gone */
  g_assert_cmpuint (s4.resident_bytes, ==, 0);
  g_assert_cmpuint (s4.peak_bytes, >=, s3.resident_bytes);
  g_free (dir);
  diffuse_component_cache_unref (cache);
}

static void
test_errors (void)
{
  GError *err = NULL;
  g_assert_null (diffuse_pipeline_model_load ("/nonexistent/folder/x", NULL, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_clear_error (&err);
  g_assert_null (diffuse_pipeline_model_load ("not a repo id!", NULL, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_clear_error (&err);
  char *dir = fixture_dir ("tiny-sd");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = "cuda:7";
  g_assert_null (diffuse_pipeline_model_load (dir, &lp, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_DEVICE);
  g_clear_error (&err);
  lp.device = "tpu";
  g_assert_null (diffuse_pipeline_model_load (dir, &lp, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  lp = diffuse_load_default_params ();
  lp.pipeline_class = "KandinskyPipeline";
  g_assert_null (diffuse_pipeline_model_load (dir, &lp, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED);
  g_clear_error (&err);
  /* a corrupt weight file is named in the error */
  char *tmp = tu_mkdtemp ();
  char *cmd = g_strdup_printf ("cp -rL '%s' '%s/m'", dir, tmp);
  g_assert_cmpint (system (cmd), ==, 0);
  g_free (cmd);
  char *bad = g_build_filename (tmp, "m", "vae", "diffusion_pytorch_model.safetensors", NULL);
  g_assert_true (g_file_set_contents (bad, "\x10\0\0\0\0\0\0\0{\"a\":", 13, NULL));
  char *mdir = g_build_filename (tmp, "m", NULL);
  g_assert_null (diffuse_pipeline_model_load (mdir, NULL, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT);
  g_assert_nonnull (strstr (err->message, "diffusion_pytorch_model.safetensors"));
  g_clear_error (&err);
  tu_rm_rf (tmp);
  g_free (bad);
  g_free (mdir);
  g_free (tmp);
  g_free (dir);
}

/* gst-diffuse.json: a folder's suggested generation settings (what the CLI
 * and the elements use where the user sets nothing) */
static void
write_suggestions (const char *folder, const char *json)
{
  char *path = g_build_filename (folder, "gst-diffuse.json", NULL);
  if (json)
    g_assert_true (g_file_set_contents (path, json, -1, NULL));
  else
    g_unlink (path);
  g_free (path);
}

static void
test_suggestions (void)
{
  GError *err = NULL;
  char *dir = fixture_dir ("tiny-sd");
  char *tmp = tu_mkdtemp ();
  char *cmd = g_strdup_printf ("cp -rL '%s' '%s/m'", dir, tmp);
  g_assert_cmpint (system (cmd), ==, 0);
  g_free (cmd);
  char *m = g_build_filename (tmp, "m", NULL);
  write_suggestions (m, NULL);
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (m, NULL, NULL, &err);
  g_assert_no_error (err);
  int steps = 50, w = 512, h = 512;
  double g = 7.5;
  char *sched = NULL;
  /* no file: nothing changes */
  g_assert_true (diffuse_pipeline_model_suggestions (pm, &steps, &g, &w, &h, &sched, &err));
  g_assert_no_error (err);
  g_assert_cmpint (steps, ==, 50);
  g_assert_cmpfloat (g, ==, 7.5);
  g_assert_null (sched);
  /* the keys present are applied, the others kept */
  write_suggestions (m, "{\"num_inference_steps\": 20, \"guidance_scale\": 5, \"scheduler\": \"EulerDiscreteScheduler\"}");
  g_assert_true (diffuse_pipeline_model_suggestions (pm, &steps, &g, &w, &h, &sched, &err));
  g_assert_no_error (err);
  g_assert_cmpint (steps, ==, 20);
  g_assert_cmpfloat (g, ==, 5.0);
  g_assert_cmpint (w, ==, 512);
  g_assert_cmpstr (sched, ==, "EulerDiscreteScheduler");
  write_suggestions (m, "{\"width\": 64, \"height\": 96}");
  g_assert_true (diffuse_pipeline_model_suggestions (pm, NULL, NULL, &w, &h, NULL, &err));
  g_assert_cmpint (w, ==, 64);
  g_assert_cmpint (h, ==, 96);
  /* bad files: an error naming the file (and key), nothing written */
  const struct { const char *json, *needle; int code; } bad[] = {
    { "{\"num_inference_steps\": ", "gst-diffuse.json", DIFFUSE_ERROR_CORRUPT },
    { "{\"num_inference_steps\": \"twenty\"}", "num_inference_steps", DIFFUSE_ERROR_CONFIG },
    { "{\"num_inference_steps\": 0}", "num_inference_steps", DIFFUSE_ERROR_CONFIG },
    { "{\"guidance_scale\": -1}", "guidance_scale", DIFFUSE_ERROR_CONFIG },
    { "{\"width\": 65}", "width", DIFFUSE_ERROR_CONFIG },
    { "{\"height\": 100000}", "height", DIFFUSE_ERROR_CONFIG },
    { "{\"scheduler\": 3}", "scheduler", DIFFUSE_ERROR_CONFIG },
    { "{\"num_inference_steps\": 30, \"scheduler\": \"\"}", "scheduler", DIFFUSE_ERROR_CONFIG },
  };
  for (guint i = 0; i < G_N_ELEMENTS (bad); i++) {
    write_suggestions (m, bad[i].json);
    steps = 7;
    g_assert_false (diffuse_pipeline_model_suggestions (pm, &steps, &g, &w, &h, &sched, &err));
    int code = bad[i].code;
    g_assert_error (err, DIFFUSE_ERROR, code);
    g_assert_nonnull (strstr (err->message, "gst-diffuse.json"));
    g_assert_nonnull (strstr (err->message, bad[i].needle));
    g_assert_cmpint (steps, ==, 7);
    g_clear_error (&err);
  }
  g_free (sched);
  diffuse_pipeline_model_unref (pm);
  tu_rm_rf (tmp);
  g_free (m);
  g_free (tmp);
  g_free (dir);
}

/* save_pretrained: what we write loads back with the same values, with a
 * variant label and sharding (diffusers loading our writer's output is
 * checked by tests/reference/check_st_roundtrip.py) */
static void
test_save_roundtrip (void)
{
  GError *err = NULL;
  char *dir = fixture_dir ("tiny-sd");
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  DiffusePipelineModel *a = diffuse_pipeline_model_load (dir, NULL, cache, &err);
  g_assert_no_error (err);
  char *tmp = tu_mkdtemp ();
  DiffuseSaveParams sp = diffuse_save_default_params ();
  sp.variant = "fp16";
  sp.have_dtype = TRUE;
  sp.dtype = DIFFUSE_DTYPE_F16;
  sp.max_shard_size = 100000;
  g_assert_true (diffuse_pipeline_model_save (a, tmp, &sp, &err));
  g_assert_no_error (err);
  char *idx = g_build_filename (tmp, "unet", "diffusion_pytorch_model.safetensors.index.fp16.json", NULL);
  g_assert_true (g_file_test (idx, G_FILE_TEST_EXISTS));
  g_free (idx);
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.variant = "fp16";
  DiffuseComponentCache *cache2 = diffuse_component_cache_new ();
  DiffusePipelineModel *b = diffuse_pipeline_model_load (tmp, &lp, cache2, &err);
  g_assert_no_error (err);
  const char *names[] = { "unet", "vae", "text_encoder" };
  for (int i = 0; i < 3; i++) {
    DiffuseComponent *ca = diffuse_pipeline_model_get (a, names[i]), *cb = diffuse_pipeline_model_get (b, names[i]);
    g_assert_cmpstr (diffuse_component_variant (cb), ==, "fp16");
    DiffuseWeights *wa = diffuse_component_weights (ca), *wb = diffuse_component_weights (cb);
    guint n = 0;
    const char **tn = diffuse_weights_names (wa, &n);
    for (guint k = 0; k < n; k++) {
      DiffuseTensor *x = diffuse_weights_get (wa, tn[k], DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
      DiffuseTensor *x16 = diffuse_cast (x, DIFFUSE_DTYPE_F16);
      DiffuseTensor *y = diffuse_weights_get_uncached (wb, tn[k], DIFFUSE_DTYPE_F16, diffuse_device_cpu (), &err);
      g_assert_no_error (err);
      g_assert_cmpfloat (diffuse_tensor_max_abs_diff (x16, y), ==, 0.0);
      diffuse_tensor_unref (x);
      diffuse_tensor_unref (x16);
      diffuse_tensor_unref (y);
    }
    g_free (tn);
  }
  /* the null components stay null, the class is kept */
  g_assert_null (diffuse_pipeline_model_get (b, "safety_checker"));
  g_assert_cmpstr (diffuse_pipeline_model_class (b), ==, "StableDiffusionPipeline");
  diffuse_pipeline_model_unref (a);
  diffuse_pipeline_model_unref (b);
  diffuse_component_cache_unref (cache);
  diffuse_component_cache_unref (cache2);
  tu_rm_rf (tmp);
  g_free (tmp);
  g_free (dir);
}

#ifdef HAVE_HUBSERVER
/* A repo id through the test Hub: fetch only what the pipeline needs, then
 * again offline from the cache with no request. */
static void
test_hub_load (void)
{
  GError *err = NULL;
  HubServer *s = hub_server_new (&err);
  g_assert_no_error (err);
  char *dir = fixture_dir ("tiny-sd");
  g_assert_true (hub_server_add_dir (s, "org/tiny-sd", "main", dir, &err));
  char *cache_dir = tu_mkdtemp ();
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.endpoint = hub_server_endpoint (s);
  lp.cache_dir = cache_dir;
  lp.token = "";
  DiffusePipelineModel *pm = diffuse_pipeline_model_load ("org/tiny-sd", &lp, NULL, &err);
  g_assert_no_error (err);
  g_assert_nonnull (diffuse_pipeline_model_get (pm, "unet"));
  /* no variant: the fp16 and non_ema files were not fetched */
  const char *const *files = diffuse_component_files (diffuse_pipeline_model_get (pm, "unet"));
  char *snap = g_path_get_dirname (files[0]);
  char *fp16 = g_build_filename (snap, "diffusion_pytorch_model.fp16.safetensors", NULL);
  g_assert_false (g_file_test (fp16, G_FILE_TEST_EXISTS));
  g_free (fp16);
  g_free (snap);
  diffuse_pipeline_model_unref (pm);

  guint requests = hub_server_request_count (s);
  lp.offline = TRUE;
  pm = diffuse_pipeline_model_load ("org/tiny-sd", &lp, NULL, &err);
  g_assert_no_error (err);
  g_assert_cmpuint (hub_server_request_count (s), ==, requests);
  diffuse_pipeline_model_unref (pm);
  /* offline, a variant that was never downloaded is a clear error */
  lp.variant = "fp16";
  g_assert_null (diffuse_pipeline_model_load ("org/tiny-sd", &lp, NULL, &err));
  g_assert_nonnull (err);
  g_test_message ("offline fp16: %s", err->message);
  g_clear_error (&err);
  hub_server_free (s);
  tu_rm_rf (cache_dir);
  g_free (cache_dir);
  g_free (dir);
}

/* LoRA from a Hub repo (pipe.load_lora_weights ("org/name"[, weight_name])):
 * the same images as from the local file */
static float *
lora_pixels (DiffuseSD *sd, int *n)
{
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = "a red circle";
  p.num_inference_steps = 2;
  p.width = p.height = 16;
  GError *err = NULL;
  GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);
  g_assert_no_error (err);
  DiffuseImage *img = g_ptr_array_index (imgs, 0);
  *n = img->width * img->height * 3;
  float *v = g_memdup2 (img->pixels, sizeof (float) * *n);
  g_ptr_array_unref (imgs);
  return v;
}

static void
test_hub_lora (void)
{
  GError *err = NULL;
  HubServer *s = hub_server_new (&err);
  g_assert_no_error (err);
  char *fx = tu_fixture ("lora/a"), *fb = tu_fixture ("lora/b/pytorch_lora_weights.safetensors");
  g_assert_true (hub_server_add_dir (s, "org/lora-a", "main", fx, &err));
  char *bytes_a = NULL, *bytes_b = NULL;
  gsize la = 0, lb = 0;
  char *fa = g_build_filename (fx, "pytorch_lora_weights.safetensors", NULL);
  g_assert_true (g_file_get_contents (fa, &bytes_a, &la, NULL));
  g_assert_true (g_file_get_contents (fb, &bytes_b, &lb, NULL));
  hub_server_add_file (s, "org/two-loras", "main", "style.safetensors", g_bytes_new_take (bytes_a, la));
  hub_server_add_file (s, "org/two-loras", "main", "detail.safetensors", g_bytes_new_take (bytes_b, lb));
  char *cache_dir = tu_mkdtemp ();
  g_setenv ("HF_ENDPOINT", hub_server_endpoint (s), TRUE);
  g_setenv ("HF_HUB_CACHE", cache_dir, TRUE);
  g_setenv ("HF_TOKEN", "", TRUE);

  char *model = fixture_dir ("tiny-sd");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, &lp, NULL, &err);
  g_assert_no_error (err);
  DiffuseSD *local = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  DiffuseSD *hub = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  g_assert_true (diffuse_sd_load_lora_weights (local, fa, "a", &err));
  g_assert_true (diffuse_sd_load_lora_weights (hub, "org/lora-a", "a", &err));
  g_assert_no_error (err);
  int n1, n2;
  float *p1 = lora_pixels (local, &n1), *p2 = lora_pixels (hub, &n2);
  g_assert_cmpint (n1, ==, n2);
  g_assert_cmpint (memcmp (p1, p2, sizeof (float) * n1), ==, 0);
  g_free (p1);
  g_free (p2);
  /* a repo with two files: name one (weight_name), else a clear error naming them */
  g_assert_false (diffuse_sd_load_lora_weights (hub, "org/two-loras", "x", &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, "detail.safetensors"));
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  g_assert_true (diffuse_sd_load_lora_spec (hub, "org/two-loras/detail.safetensors:1.5", &err));
  g_assert_no_error (err);
  char **act = diffuse_sd_get_active_adapters (hub);
  g_assert_cmpstr (act[0], ==, "detail");
  g_strfreev (act);

  g_unsetenv ("HF_ENDPOINT");
  g_unsetenv ("HF_HUB_CACHE");
  g_unsetenv ("HF_TOKEN");
  diffuse_sd_unref (local);
  diffuse_sd_unref (hub);
  diffuse_pipeline_model_unref (pm);
  hub_server_free (s);
  tu_rm_rf (cache_dir);
  g_free (cache_dir);
  g_free (model);
  g_free (fa);
  g_free (fx);
  g_free (fb);
}
#endif

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  /* variant mixtures and the disabled safety checker warn, as diffusers does: not fatal here */
  g_log_set_always_fatal (G_LOG_LEVEL_CRITICAL | G_LOG_FATAL_MASK);
  if (!tu_have_fixture ("pipelines/expected_loading.json"))
    return 0;
  char *path = tu_fixture ("pipelines/expected_loading.json");
  JsonParser *parser = json_parser_new ();
  GError *err = NULL;
  json_parser_load_from_file (parser, path, &err);
  g_assert_no_error (err);
  g_free (path);
  root = json_node_get_object (json_parser_get_root (parser));
  JsonArray *cases = json_object_get_array_member (root, "cases");
  const char *loaders[] = { "DiffusionPipeline", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", NULL };
  guint n_cases = 0;
  for (guint i = 0; i < json_array_get_length (cases); i++) {
    JsonObject *c = json_array_get_object_element (cases, i);
    if (!g_strv_contains (loaders, json_object_get_string_member (c, "loader")))
      continue;   /* AutoPipeline / Inpaint classes are not part of gst-diffuse */
    char *name = g_strdup_printf ("/loader/case-%03" G_GINT64_FORMAT "-%s", json_object_get_int_member (c, "id"),
                                  json_object_get_string_member (c, "folder"));
    g_test_add_data_func (name, c, run_case);
    g_free (name);
    n_cases++;
  }
  g_test_message ("%u diffusers loading cases", n_cases);
  g_test_add_func ("/loader/cache-sharing", test_cache_sharing);
  g_test_add_func ("/loader/errors", test_errors);
  g_test_add_func ("/loader/save-roundtrip", test_save_roundtrip);
  g_test_add_func ("/loader/suggestions", test_suggestions);
#ifdef HAVE_HUBSERVER
  g_test_add_func ("/loader/hub", test_hub_load);
  g_test_add_func ("/loader/hub-lora", test_hub_lora);
#endif
  int rc = g_test_run ();
  g_object_unref (parser);
  return rc;
}

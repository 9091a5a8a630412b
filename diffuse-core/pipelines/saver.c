/* gst-diffuse — writing a pipeline folder back (diffusers' save_pretrained). */
#include <diffuse/pipeline.h>
#include <diffuse/error.h>
#include <glib/gstdio.h>
#include <string.h>

DiffuseSaveParams
diffuse_save_default_params (void)
{
  DiffuseSaveParams p;
  memset (&p, 0, sizeof p);
  return p;
}

static gboolean
copy_file (const char *src, const char *dst, GError **error)
{
  char *data = NULL;
  gsize len = 0;
  GError *err = NULL;
  if (!g_file_get_contents (src, &data, &len, &err)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "Cannot read %s: %s", src, err->message);
    g_error_free (err);
    return FALSE;
  }
  gboolean ok = g_file_set_contents (dst, data, len, &err);
  if (!ok) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "Cannot write %s: %s", dst, err->message);
    g_error_free (err);
  }
  g_free (data);
  return ok;
}

static gboolean
save_weights (DiffuseComponent *c, const char *dir, const DiffuseSaveParams *params, GError **error)
{
  DiffuseWeights *w = diffuse_component_weights (c);
  guint n = 0;
  const char **names = diffuse_weights_names (w, &n);
  DiffuseStWriter *wr = diffuse_st_writer_new ();
  DiffuseDType dt = params->have_dtype ? params->dtype : diffuse_component_dtype (c);
  gboolean ok = TRUE;
  for (guint i = 0; i < n && ok; i++) {
    DiffuseTensor *t = diffuse_weights_get_uncached (w, names[i], dt, diffuse_device_cpu (), error);
    if (!t) {
      ok = FALSE;
      break;
    }
    diffuse_st_writer_add (wr, names[i], t);
    diffuse_tensor_unref (t);
  }
  g_free (names);
  const char *prefix = g_strcmp0 (diffuse_component_library (c), "diffusers") == 0 ? "diffusion_pytorch_model"
                                                                                   : "model";
  if (ok)
    ok = diffuse_st_writer_write_sharded (wr, dir, prefix, params->variant, params->max_shard_size, error);
  diffuse_st_writer_free (wr);
  return ok;
}

static gboolean
save_component (DiffuseComponent *c, const char *dir, const DiffuseSaveParams *params, GError **error)
{
  if (g_mkdir_with_parents (dir, 0755) != 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "Cannot create %s: %s", dir, g_strerror (errno));
    return FALSE;
  }
  switch (diffuse_component_kind (c)) {
    case DIFFUSE_COMPONENT_MODEL: {
      char *p = g_build_filename (dir, "config.json", NULL);
      gboolean ok = diffuse_config_save (diffuse_component_config (c), p, error);
      g_free (p);
      return ok && save_weights (c, dir, params, error);
    }
    case DIFFUSE_COMPONENT_SCHEDULER:
    case DIFFUSE_COMPONENT_PROCESSOR: {
      const char *name = diffuse_component_kind (c) == DIFFUSE_COMPONENT_SCHEDULER ? "scheduler_config.json"
                                                                                 : "preprocessor_config.json";
      char *p = g_build_filename (dir, name, NULL);
      gboolean ok = diffuse_config_save (diffuse_component_config (c), p, error);
      g_free (p);
      return ok;
    }
    case DIFFUSE_COMPONENT_TOKENIZER: {
      /* tokenizer files are copied as they are */
      GDir *d = g_dir_open (diffuse_component_folder (c), 0, NULL);
      const char *f;
      gboolean ok = d != NULL;
      if (!d)
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "Cannot read %s", diffuse_component_folder (c));
      while (ok && (f = g_dir_read_name (d))) {
        char *src = g_build_filename (diffuse_component_folder (c), f, NULL);
        char *dst = g_build_filename (dir, f, NULL);
        if (g_file_test (src, G_FILE_TEST_IS_REGULAR))
          ok = copy_file (src, dst, error);
        g_free (src);
        g_free (dst);
      }
      if (d)
        g_dir_close (d);
      return ok;
    }
  }
  return FALSE;
}

gboolean
diffuse_pipeline_model_save (DiffusePipelineModel *pm, const char *folder, const DiffuseSaveParams *params_in,
                             GError **error)
{
  DiffuseSaveParams defaults = diffuse_save_default_params ();
  const DiffuseSaveParams *params = params_in ? params_in : &defaults;
  if (g_mkdir_with_parents (folder, 0755) != 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_IO, "Cannot create %s: %s", folder, g_strerror (errno));
    return FALSE;
  }
  /* model_index.json: the loaded one, with the components as they are now */
  JsonObject *src = diffuse_config_object (diffuse_pipeline_model_index (pm));
  JsonObject *idx = json_object_new ();
  GList *members = json_object_get_members (src);
  for (GList *l = members; l; l = l->next) {
    JsonNode *n = json_object_get_member (src, l->data);
    if (!JSON_NODE_HOLDS_ARRAY (n) || ((const char *) l->data)[0] == '_')
      json_object_set_member (idx, l->data, json_node_copy (n));
  }
  g_list_free (members);
  json_object_set_string_member (idx, "_class_name", diffuse_pipeline_model_class (pm));
  const char *const *names = diffuse_pipeline_model_component_names (pm);
  gboolean ok = TRUE;
  for (int i = 0; names[i] && ok; i++) {
    DiffuseComponent *c = diffuse_pipeline_model_get (pm, names[i]);
    JsonArray *arr = json_array_new ();
    if (c) {
      json_array_add_string_element (arr, diffuse_component_library (c));
      json_array_add_string_element (arr, diffuse_component_class (c));
      char *dir = g_build_filename (folder, names[i], NULL);
      ok = save_component (c, dir, params, error);
      g_free (dir);
    } else {
      json_array_add_null_element (arr);
      json_array_add_null_element (arr);
    }
    json_object_set_array_member (idx, names[i], arr);
  }
  if (ok) {
    DiffuseConfig *cfg = diffuse_config_from_object (idx, "model_index.json");
    char *p = g_build_filename (folder, "model_index.json", NULL);
    ok = diffuse_config_save (cfg, p, error);
    g_free (p);
    diffuse_config_unref (cfg);
  }
  json_object_unref (idx);
  return ok;
}

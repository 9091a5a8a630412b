/* LoRA adapters against diffusers (tests/reference/make_lora_fixtures.py,
 * tests/fixtures/lora): the tiny SD pipeline's images after
 * load_lora_weights (a: attention + a 1x1 conv; b: feed-forward + 3x3
 * convs with an alpha_pattern), set_adapters ([a, b], [0.6, 1.5]) and
 * unload_lora_weights, each within one level of diffusers'; the adapted
 * pipeline does not change another pipeline sharing its components; errors. */
#include <json-glib/json-glib.h>
#include <string.h>
#include "testutil.h"

static DiffuseSafetensors *images;

static int
diff_to_scaled (DiffuseSD *sd, const char *id, float lora_scale)
{
  JsonParser *parser = json_parser_new ();
  char *path = tu_fixture ("lora/cases.json");
  g_assert_true (json_parser_load_from_file (parser, path, NULL));
  g_free (path);
  JsonObject *gen = json_object_get_object_member (json_node_get_object (json_parser_get_root (parser)), "generate");
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = json_object_get_string_member (gen, "prompt");
  p.num_inference_steps = (int) json_object_get_int_member (gen, "num_inference_steps");
  p.width = (int) json_object_get_int_member (gen, "width");
  p.height = (int) json_object_get_int_member (gen, "height");
  p.guidance_scale = (float) json_object_get_double_member (gen, "guidance_scale");
  p.seed = (guint64) json_object_get_int_member (json_node_get_object (json_parser_get_root (parser)), "seed");
  p.lora_scale = lora_scale;
  GError *err = NULL;
  GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);
  g_assert_no_error (err);
  const int maxd = tu_max_level_diff (g_ptr_array_index (imgs, 0), diffuse_safetensors_find (images, id));
  g_ptr_array_unref (imgs);
  g_object_unref (parser);
  return maxd;
}

static int
diff_to (DiffuseSD *sd, const char *id)
{
  return diff_to_scaled (sd, id, 1.0f);
}

static void
assert_active (DiffuseSD *sd, const char *want)
{
  char **a = diffuse_sd_get_active_adapters (sd);
  char *j = g_strjoinv (",", a);
  g_assert_cmpstr (j, ==, want);
  g_free (j);
  g_strfreev (a);
}

static void
test_adapters (void)
{
  GError *err = NULL;
  char *model = tu_fixture ("pipelines/tiny-sd");
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, &lp, cache, &err);
  g_assert_no_error (err);
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  DiffuseSD *other = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);   /* shares the components */
  g_assert_no_error (err);
  int d = diff_to (sd, "base");
  g_test_message ("base: %d levels", d);
  g_assert_cmpint (d, <=, 1);

  char *a = tu_fixture ("lora/a"), *b = tu_fixture ("lora/b/pytorch_lora_weights.safetensors");
  g_assert_true (diffuse_sd_load_lora_weights (sd, a, "a", &err));
  g_assert_no_error (err);
  assert_active (sd, "a");
  d = diff_to (sd, "a");
  g_test_message ("a: %d levels", d);
  g_assert_cmpint (d, <=, 1);
  /* the other pipeline on the same components is untouched */
  g_assert_cmpint (diff_to (other, "base"), <=, 1);
  /* cross_attention_kwargs={"scale": 0.5}, then back to 1 */
  d = diff_to_scaled (sd, "a-scale0.5", 0.5f);
  g_test_message ("a at lora_scale 0.5: %d levels", d);
  g_assert_cmpint (d, <=, 1);
  g_assert_cmpint (diff_to (sd, "a"), <=, 1);

  g_assert_true (diffuse_sd_load_lora_weights (sd, b, "b", &err));
  g_assert_no_error (err);
  assert_active (sd, "b");   /* the new one only, as diffusers */
  d = diff_to (sd, "b");
  g_test_message ("b: %d levels", d);
  g_assert_cmpint (d, <=, 1);

  const char *names[] = { "a", "b" };
  const double w[] = { 0.6, 1.5 };
  g_assert_true (diffuse_sd_set_adapters (sd, names, w, 2, &err));
  g_assert_no_error (err);
  assert_active (sd, "a,b");
  d = diff_to (sd, "ab");
  g_test_message ("a 0.6 + b 1.5: %d levels", d);
  g_assert_cmpint (d, <=, 1);

  /* errors leave the adapters as they were */
  g_assert_false (diffuse_sd_load_lora_weights (sd, a, "a", &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  const char *bad[] = { "c" };
  g_assert_false (diffuse_sd_set_adapters (sd, bad, NULL, 1, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  assert_active (sd, "a,b");
  char **all = diffuse_sd_list_adapters (sd);
  g_assert_cmpint (g_strv_length (all), ==, 2);   /* a, b (the kohya ones come later) */
  g_strfreev (all);

  /* kohya-ss' names for a (diffusers converts them: its image) and for t */
  char *ka = tu_fixture ("lora/a-kohya.safetensors"), *kt = tu_fixture ("lora/t-kohya.safetensors");
  g_assert_true (diffuse_sd_load_lora_weights (sd, ka, "ka", &err));
  g_assert_no_error (err);
  d = diff_to (sd, "a-kohya");
  g_test_message ("a, kohya names: %d levels", d);
  g_assert_cmpint (d, <=, 1);
  g_assert_true (diffuse_sd_load_lora_weights (sd, kt, "kt", &err));
  g_assert_no_error (err);
  d = diff_to (sd, "t");
  g_test_message ("t, kohya names: %d levels", d);
  g_assert_cmpint (d, <=, 1);
  g_free (ka);
  g_free (kt);

  /* a text-encoder adapter (names with "text_model.", the tiny model's file has none) */
  char *t = tu_fixture ("lora/t");
  g_assert_true (diffuse_sd_load_lora_weights (sd, t, "t", &err));
  g_assert_no_error (err);
  d = diff_to (sd, "t");
  g_test_message ("t (text encoder): %d levels", d);
  g_assert_cmpint (d, <=, 1);
  g_free (t);

  diffuse_sd_unload_lora_weights (sd);
  assert_active (sd, "");
  d = diff_to (sd, "unloaded");
  g_assert_cmpint (d, <=, 1);
  /* the default name */
  g_assert_true (diffuse_sd_load_lora_weights (sd, a, NULL, &err));
  assert_active (sd, "default_0");

  /* a folder holding only pytorch_lora_weights.bin (torch.save, no LoraConfig
   * metadata: alpha = r as diffusers takes it): diffusers' image of that
   * folder (make_pickle_fixtures.py) */
  char *bimg = tu_fixture ("pickle/images.safetensors");
  const gboolean have_bin = g_file_test (bimg, G_FILE_TEST_EXISTS);
  g_free (bimg);
  if (have_bin) {
    char *bdir = tu_fixture ("pickle/lora");
    diffuse_sd_unload_lora_weights (sd);
    g_assert_true (diffuse_sd_load_lora_weights (sd, bdir, "bin", &err));
    g_assert_no_error (err);
    DiffuseSafetensors *saved = images;
    images = tu_open ("pickle/images.safetensors");
    d = diff_to (sd, "lora-bin");
    g_test_message ("pytorch_lora_weights.bin: %d levels", d);
    g_assert_cmpint (d, <=, 1);
    diffuse_safetensors_unref (images);
    images = saved;
    g_free (bdir);
  }

  g_free (a);
  g_free (b);
  diffuse_sd_unref (sd);
  diffuse_sd_unref (other);
  diffuse_pipeline_model_unref (pm);
  diffuse_component_cache_unref (cache);
  g_free (model);
}

/* a LoRA file with the given tensor names (2x2 tensors) */
static char *
write_lora (const char *dir, const char *file, const char *const *names)
{
  DiffuseStWriter *w = diffuse_st_writer_new ();
  for (int i = 0; names[i]; i++) {
    DiffuseTensor *t = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 2, (int64_t[]) { 2, 2 });
    diffuse_st_writer_add (w, names[i], t);
    diffuse_tensor_unref (t);
  }
  char *path = g_build_filename (dir, file, NULL);
  g_assert_true (diffuse_st_writer_write (w, path, NULL));
  diffuse_st_writer_free (w);
  return path;
}

static void
test_errors (void)
{
  GError *err = NULL;
  char *model = tu_fixture ("pipelines/tiny-sd");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, &lp, NULL, &err);
  g_assert_no_error (err);
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  char *dir = tu_mkdtemp ();

  g_assert_false (diffuse_sd_load_lora_weights (sd, "/no/such/lora.safetensors", NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_clear_error (&err);
  g_assert_false (diffuse_sd_load_lora_weights (sd, dir, NULL, &err));   /* a folder without the file */
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_clear_error (&err);

  const char *lycoris[] = { "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a",
                            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b", NULL };
  char *p = write_lora (dir, "lycoris.safetensors", lycoris);
  g_assert_false (diffuse_sd_load_lora_weights (sd, p, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  g_free (p);

  const char *missing[] = { "unet.no_such_block.to_q.lora_A.weight", "unet.no_such_block.to_q.lora_B.weight", NULL };
  p = write_lora (dir, "missing.safetensors", missing);
  g_assert_false (diffuse_sd_load_lora_weights (sd, p, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_assert_nonnull (strstr (err->message, "no_such_block"));
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  g_free (p);

  /* a module the model has, of another size (2x2 product, the layer is 16x16 or so) */
  const char *shape[] = { "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                          "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight", NULL };
  p = write_lora (dir, "shape.safetensors", shape);
  g_assert_false (diffuse_sd_load_lora_weights (sd, p, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  g_free (p);

  const char *nob[] = { "unet.mid_block.attentions.0.proj_in.lora_A.weight", NULL };
  p = write_lora (dir, "nob.safetensors", nob);
  g_assert_false (diffuse_sd_load_lora_weights (sd, p, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT);
  g_clear_error (&err);
  g_free (p);

  /* nothing half-applied: no adapter listed, the model unchanged */
  char **all = diffuse_sd_list_adapters (sd);
  g_assert_cmpint (g_strv_length (all), ==, 0);
  g_strfreev (all);
  g_assert_cmpint (diff_to (sd, "base"), <=, 1);

  tu_rm_rf (dir);
  g_free (dir);
  diffuse_sd_unref (sd);
  diffuse_pipeline_model_unref (pm);
  g_free (model);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  if (!tu_require_fixture ("lora/images.safetensors", "make_lora_fixtures.py"))
    return 77;
  images = tu_open ("lora/images.safetensors");
  g_test_add_func ("/lora/adapters", test_adapters);
  g_test_add_func ("/lora/errors", test_errors);
  int r = g_test_run ();
  diffuse_safetensors_unref (images);
  return r;
}

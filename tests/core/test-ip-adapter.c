/* IP-Adapter against diffusers (tests/reference/make_ip_adapter_fixtures.py,
 * tests/fixtures/ip-adapter): the tiny SD pipeline after pipe.load_ip_adapter
 * (dir, subfolder="models", weight_name=...) with an image prompt, two
 * set_ip_adapter_scale values, with and without CFG: 8-bit images within one
 * level of diffusers', from the .safetensors file and from the same adapter
 * as a torch.save .bin (tests/fixtures/pickle/ip-adapter).  Errors: no image,
 * an image without an adapter, a missing file or folder. */
#include <json-glib/json-glib.h>
#include <string.h>
#include "testutil.h"

static void
test_cases (void)
{
  GError *err = NULL;
  char *path = tu_fixture ("ip-adapter/cases.json");
  JsonParser *parser = json_parser_new ();
  g_assert_true (json_parser_load_from_file (parser, path, NULL));
  g_free (path);
  JsonObject *root = json_node_get_object (json_parser_get_root (parser));
  JsonObject *gen = json_object_get_object_member (root, "generate");
  DiffuseSafetensors *images = tu_open ("ip-adapter/images.safetensors");
  const DiffuseStEntry *in = diffuse_safetensors_find (images, "input");
  g_assert_nonnull (in);
  g_assert_cmpint (in->dtype, ==, DIFFUSE_ST_U8);
  DiffuseImage *ipimg = diffuse_image_from_rgb8 (in->data, (int) in->shape[1], (int) in->shape[0],
                                                 (int) in->shape[1] * 3);

  /* the same image as the PNG file PIL wrote (the elements read it this way) */
  char *png = tu_fixture ("ip-adapter/input.png");
  DiffuseImage *frompng = diffuse_image_load_png (png, &err);
  g_assert_no_error (err);
  g_assert_cmpint (frompng->width, ==, ipimg->width);
  g_assert_cmpint (frompng->height, ==, ipimg->height);
  g_assert_cmpint (memcmp (frompng->pixels, ipimg->pixels, sizeof (float) * ipimg->width * ipimg->height * 3), ==, 0);
  diffuse_image_free (frompng);
  /* a truncated copy: an error naming the file */
  gchar *bytes = NULL;
  gsize blen = 0;
  g_assert_true (g_file_get_contents (png, &bytes, &blen, NULL));
  char *tmpd = tu_mkdtemp ();
  char *cut = g_build_filename (tmpd, "cut.png", NULL);
  g_assert_true (g_file_set_contents (cut, bytes, (gssize) (blen / 2), NULL));
  g_assert_null (diffuse_image_load_png (cut, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CORRUPT);
  g_assert_nonnull (strstr (err->message, "cut.png"));
  g_clear_error (&err);
  tu_rm_rf (tmpd);
  g_free (tmpd);
  g_free (cut);
  g_free (bytes);
  g_free (png);

  char *model = tu_fixture ("pipelines/tiny-sd");
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, &lp, NULL, &err);
  g_assert_no_error (err);
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  char *dir = tu_fixture ("ip-adapter");
  /* the same adapter as torch.save wrote it in h94's .bin layout
   * ({"image_proj": ..., "ip_adapter": ...}; make_pickle_fixtures.py) must give the same images */
  char *bindir = tu_fixture ("pickle/ip-adapter");
  const gboolean have_bin = g_file_test (bindir, G_FILE_TEST_IS_DIR);
  for (int pass = 0; pass < (have_bin ? 2 : 1); pass++) {
    if (pass == 0)
      g_assert_true (diffuse_sd_load_ip_adapter (sd, dir, "models",
                                                 json_object_get_string_member (root, "weight_name"), &err));
    else
      g_assert_true (diffuse_sd_load_ip_adapter (sd, bindir, "models", "ip-adapter_tiny.bin", &err));
    g_assert_no_error (err);
    g_assert_true (diffuse_sd_has_ip_adapter (sd));

    JsonArray *cases = json_object_get_array_member (root, "cases");
    for (guint i = 0; i < json_array_get_length (cases); i++) {
      JsonObject *c = json_array_get_object_element (cases, i);
      const char *id = json_object_get_string_member (c, "id");
      diffuse_sd_set_ip_adapter_scale (sd, (float) json_object_get_double_member (c, "scale"));
      DiffuseSDParams p;
      diffuse_sd_default_params (&p);
      p.prompt = json_object_get_string_member (gen, "prompt");
      p.num_inference_steps = (int) json_object_get_int_member (gen, "num_inference_steps");
      p.width = (int) json_object_get_int_member (gen, "width");
      p.height = (int) json_object_get_int_member (gen, "height");
      p.guidance_scale = (float) json_object_get_double_member (c, "guidance");
      p.seed = (guint64) json_object_get_int_member (c, "seed");
      p.ip_adapter_image = ipimg;
      GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);
      g_assert_no_error (err);
      DiffuseImage *img = g_ptr_array_index (imgs, 0);
      const int maxd = tu_max_level_diff (img, diffuse_safetensors_find (images, id));
      g_test_message ("%s%s: max difference %d levels (the adapter moves diffusers' image %" G_GINT64_FORMAT ")", id,
                      pass ? " (.bin)" : "", maxd, json_object_get_int_member (c, "max_diff_to_plain"));
      g_assert_cmpint (maxd, <=, 1);
      g_ptr_array_unref (imgs);

      if (i == 0) {
        /* no image while an adapter is loaded: a clear error */
        p.ip_adapter_image = NULL;
        g_assert_null (diffuse_sd_generate (sd, &p, &err));
        g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
        g_test_message ("%s", err->message);
        g_clear_error (&err);
      }
    }
  }
  g_free (bindir);

  /* a missing file or folder is named */
  g_assert_false (diffuse_sd_load_ip_adapter (sd, dir, "models", "ip-adapter_sd15.bin", &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, "ip-adapter_sd15.bin"));
  g_test_message ("%s", err->message);
  g_clear_error (&err);
  g_assert_false (diffuse_sd_load_ip_adapter (sd, "/no/such/folder", "models", "x.safetensors", &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_clear_error (&err);
  g_assert_true (diffuse_sd_has_ip_adapter (sd));   /* the loaded one stays */

  diffuse_sd_unload_ip_adapter (sd);
  g_assert_false (diffuse_sd_has_ip_adapter (sd));
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = "a red circle";
  p.num_inference_steps = 2;
  p.ip_adapter_image = ipimg;
  g_assert_null (diffuse_sd_generate (sd, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);

  diffuse_image_free (ipimg);
  diffuse_sd_unref (sd);
  diffuse_pipeline_model_unref (pm);
  diffuse_safetensors_unref (images);
  g_object_unref (parser);
  g_free (dir);
  g_free (model);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  if (!tu_require_fixture ("ip-adapter/cases.json", "make_ip_adapter_fixtures.py"))
    return 77;
  g_test_add_func ("/ip-adapter/cases", test_cases);
  return g_test_run ();
}

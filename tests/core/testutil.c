/* Helpers shared by the core tests. */
#include "testutil.h"
#include <glib/gstdio.h>
#include <math.h>

char *
tu_fixture (const char *rel)
{
  const char *root = g_getenv ("DIFFUSE_FIXTURES");
  if (!root)
    root = "tests/fixtures";
  return g_build_filename (root, rel, NULL);
}

gboolean
tu_have_fixture (const char *rel)
{
  char *p = tu_fixture (rel);
  gboolean ok = g_file_test (p, G_FILE_TEST_EXISTS);
  if (!ok) {
    char *msg = g_strdup_printf ("fixture %s missing", p);
    g_test_skip (msg);
    g_free (msg);
  }
  g_free (p);
  return ok;
}

DiffuseSafetensors *
tu_open (const char *rel)
{
  GError *err = NULL;
  char *p = tu_fixture (rel);
  DiffuseSafetensors *st = diffuse_safetensors_open (p, &err);
  g_assert_no_error (err);
  g_assert_nonnull (st);
  g_free (p);
  return st;
}

DiffuseTensor *
tu_get (DiffuseSafetensors *st, const char *name)
{
  GError *err = NULL;
  DiffuseTensor *t = diffuse_safetensors_tensor (st, name, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
  if (!t)
    g_error ("fixture tensor %s: %s", name, err ? err->message : "?");
  DiffuseTensor *c = diffuse_contiguous (t);
  diffuse_tensor_unref (t);
  return c;
}

void
tu_assert_close (DiffuseTensor *got, DiffuseTensor *want, double atol, double rtol, const char *what)
{
  g_assert_nonnull (got);
  g_assert_nonnull (want);
  if (!diffuse_tensor_same_shape (got, want)) {
    char *a = diffuse_tensor_describe (got), *b = diffuse_tensor_describe (want);
    g_error ("%s: shape %s, expected %s", what, a, b);
  }
  double scale = diffuse_tensor_max_abs (want);
  double err = diffuse_tensor_max_abs_diff (got, want);
  double tol = atol + rtol * scale;
  g_test_message ("%s: max abs err %.3g (scale %.3g, tol %.3g)", what, err, scale, tol);
  if (!(err <= tol))
    g_error ("%s: max abs err %.6g > tol %.6g (scale %.6g)", what, err, tol, scale);
}

char *
tu_mkdtemp (void)
{
  GError *err = NULL;
  char *d = g_dir_make_tmp ("diffuse-test-XXXXXX", &err);
  g_assert_no_error (err);
  return d;
}

void
tu_rm_rf (const char *path)
{
  if (!path)
    return;
  if (g_file_test (path, G_FILE_TEST_IS_DIR) && !g_file_test (path, G_FILE_TEST_IS_SYMLINK)) {
    GDir *d = g_dir_open (path, 0, NULL);
    const char *name;
    while (d && (name = g_dir_read_name (d))) {
      char *p = g_build_filename (path, name, NULL);
      tu_rm_rf (p);
      g_free (p);
    }
    if (d)
      g_dir_close (d);
    g_rmdir (path);
  } else {
    g_unlink (path);
  }
}

DiffuseImage *
tu_st_image (DiffuseSafetensors *st, const char *name)
{
  const DiffuseStEntry *e = diffuse_safetensors_find (st, name);
  g_assert_nonnull (e);
  g_assert_cmpint (e->dtype, ==, DIFFUSE_ST_U8);
  return diffuse_image_from_rgb8 (e->data, (int) e->shape[1], (int) e->shape[0], (int) e->shape[1] * 3);
}

int
tu_max_level_diff (const DiffuseImage *img, const DiffuseStEntry *want)
{
  g_assert_nonnull (want);
  g_assert_cmpint (want->dtype, ==, DIFFUSE_ST_U8);
  g_assert_cmpint (want->shape[0], ==, img->height);
  g_assert_cmpint (want->shape[1], ==, img->width);
  const size_t n = (size_t) img->width * img->height * 3;
  guint8 *got = g_new (guint8, n);
  diffuse_image_to_rgb8 (img, got, img->width * 3);
  int maxd = 0;
  for (size_t k = 0; k < n; k++)
    maxd = MAX (maxd, ABS ((int) got[k] - (int) ((const guint8 *) want->data)[k]));
  g_free (got);
  return maxd;
}

gboolean
tu_require_fixture (const char *rel, const char *script)
{
  char *p = tu_fixture (rel);
  gboolean ok = g_file_test (p, G_FILE_TEST_EXISTS);
  if (!ok)
    g_printerr ("%s missing (tests/reference/%s)\n", p, script);
  g_free (p);
  return ok;
}

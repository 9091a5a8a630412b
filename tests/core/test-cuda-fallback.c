/* Device selection with and without a usable CUDA device.
 *
 * Runs in every build.  Without a GPU (CPU CI, or a build without the CUDA
 * backend): device=auto is the CPU, "cuda:0" is a DIFFUSE_ERROR_DEVICE
 * error, and the GPU parts are skipped with a message.  With a GPU: "cuda:0"
 * opens, a small computation there matches the CPU, memory is counted in the
 * device record, and DIFFUSE_DISABLE_CUDA=1 turns CUDA off again. */
#include <math.h>
#include <string.h>
#include "testutil.h"

static gboolean
have_gpu (void)
{
  g_autoptr (GError) err = NULL;
  DiffuseDevice *d = diffuse_device_get ("cuda:0", &err);
  return d != NULL;
}

static void
test_auto (void)
{
  g_autoptr (GError) err = NULL;
  DiffuseDevice *d = diffuse_device_get ("auto", &err);
  g_assert_no_error (err);
  g_assert_nonnull (d);
  if (have_gpu ())
    g_assert_cmpstr (diffuse_device_name (d), ==, "cuda:0");
  else
    g_assert_true (diffuse_device_is_cpu (d));
  /* asking again gives the same record */
  g_assert_true (diffuse_device_get ("auto", NULL) == d);
  g_assert_true (diffuse_device_get ("cpu", NULL) == diffuse_device_cpu ());
}

static void
test_missing_device (void)
{
  g_autoptr (GError) err = NULL;
  /* no machine has 1000 GPUs: always a device error, never a crash */
  DiffuseDevice *d = diffuse_device_get ("cuda:1000", &err);
  g_assert_null (d);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_DEVICE);
  g_assert_nonnull (strstr (err->message, "cuda:1000"));
  g_clear_error (&err);

  if (have_gpu ()) {
    g_test_message ("a CUDA device exists: cuda:0 opens");
    return;
  }
  d = diffuse_device_get ("cuda:0", &err);
  g_assert_null (d);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_DEVICE);
  g_test_message ("cuda:0 without a device: %s", err->message);
  g_clear_error (&err);
  d = diffuse_device_get ("cuda", &err);
  g_assert_null (d);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_DEVICE);
  g_clear_error (&err);
  /* malformed names stay argument errors */
  g_assert_null (diffuse_device_get ("cuda:x", &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
}

static void
test_disable_env (void)
{
  if (!have_gpu ()) {
    g_test_skip ("no CUDA device: nothing to disable");
    return;
  }
  g_setenv ("DIFFUSE_DISABLE_CUDA", "1", TRUE);
  g_autoptr (GError) err = NULL;
  DiffuseDevice *d = diffuse_device_get ("cuda:0", &err);
  g_assert_null (d);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_DEVICE);
  g_unsetenv ("DIFFUSE_DISABLE_CUDA");
  g_assert_nonnull (diffuse_device_get ("cuda:0", NULL));
}

/* A few ops on the GPU against the same ops on the CPU. */
static void
test_gpu_roundtrip (void)
{
  if (!have_gpu ()) {
    g_test_skip ("no CUDA device (or no driver): GPU checks skipped");
    return;
  }
  DiffuseDevice *gpu = diffuse_device_get ("cuda:0", NULL);
  const int64_t shape[] = { 2, 8, 6, 5 };
  int64_t n = 2 * 8 * 6 * 5;
  g_autofree float *v = g_new (float, n);
  for (int64_t i = 0; i < n; i++)
    v[i] = sinf ((float) i * 0.37f) * 3.0f;
  DiffuseTensor *x = diffuse_tensor_from_f32 (v, 4, shape);

  DiffuseMemStats before, after;
  diffuse_device_get_mem_stats (gpu, &before);
  DiffuseTensor *xg = diffuse_to_device (x, gpu);
  g_assert_nonnull (xg);
  diffuse_device_get_mem_stats (gpu, &after);
  g_assert_cmpuint (after.resident_bytes, >=, before.resident_bytes + (guint64) n * 4);
  g_assert_cmpuint (after.peak_bytes, >=, after.resident_bytes);

  /* silu(group_norm(x)) * 2 + x, in f32 and in f16 */
  for (int pass = 0; pass < 2; pass++) {
    DiffuseDType dt = pass ? DIFFUSE_DTYPE_F16 : DIFFUSE_DTYPE_F32;
    DiffuseTensor *xc = diffuse_cast (x, dt), *xgc = diffuse_cast (xg, dt);
    DiffuseTensor *rc, *rg;
    {
      DiffuseTensor *a = diffuse_group_norm (xc, 4, NULL, NULL, 1e-5f, DIFFUSE_ACT_SILU);
      DiffuseTensor *b = diffuse_scale (a, 2, 0);
      rc = diffuse_add (b, xc);
      diffuse_tensor_clear (&a);
      diffuse_tensor_clear (&b);
    }
    {
      DiffuseTensor *a = diffuse_group_norm (xgc, 4, NULL, NULL, 1e-5f, DIFFUSE_ACT_SILU);
      DiffuseTensor *b = diffuse_scale (a, 2, 0);
      rg = diffuse_add (b, xgc);
      diffuse_tensor_clear (&a);
      diffuse_tensor_clear (&b);
    }
    g_autoptr (GError) err = NULL;
    if (diffuse_tensor_take_error (&err))
      g_error ("GPU ops failed: %s", err->message);
    g_assert_nonnull (rg);
    g_assert_cmpstr (diffuse_device_name (diffuse_tensor_device (rg)), ==, "cuda:0");
    double d = diffuse_tensor_max_abs_diff (rc, rg);
    g_test_message ("%s: max |cpu - gpu| = %g", diffuse_dtype_name (dt), d);
    g_assert_cmpfloat (d, <=, pass ? 2e-2 : 1e-4);
    diffuse_tensor_unref (xc);
    diffuse_tensor_unref (xgc);
    diffuse_tensor_unref (rc);
    diffuse_tensor_unref (rg);
  }
  diffuse_tensor_unref (xg);
  diffuse_tensor_unref (x);
  diffuse_device_get_mem_stats (gpu, &after);
  g_assert_cmpuint (after.resident_bytes, ==, before.resident_bytes);
}

/* diffuse_devices_shutdown: refuses while a tensor is alive on the device
 * (warning), closes it once none is, and the device opens afresh after. */
static void
test_shutdown (void)
{
  if (!have_gpu ()) {
    g_assert_true (diffuse_devices_shutdown ());   /* nothing opened: nothing to do */
    g_test_skip ("no CUDA device: only the no-device case checked");
    return;
  }
  DiffuseDevice *gpu = diffuse_device_get ("cuda:0", NULL);
  float v[4] = { 1, -2, 3, 0.5f };
  int64_t shape[1] = { 4 };
  DiffuseTensor *x = diffuse_tensor_from_f32 (v, 1, shape);
  DiffuseTensor *xg = diffuse_to_device (x, gpu);
  g_assert_nonnull (xg);
  g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING, "cuda:0: * bytes of tensors still alive*");
  g_assert_false (diffuse_devices_shutdown ());
  g_test_assert_expected_messages ();
  diffuse_tensor_unref (xg);
  g_assert_true (diffuse_devices_shutdown ());
  /* opened again: a working device */
  g_autoptr (GError) err = NULL;
  gpu = diffuse_device_get ("cuda:0", &err);
  g_assert_no_error (err);
  xg = diffuse_to_device (x, gpu);
  DiffuseTensor *y = diffuse_scale (xg, 2, 1);
  DiffuseTensor *yh = diffuse_to_device (y, diffuse_device_cpu ());
  g_assert_nonnull (yh);
  const float *py = diffuse_tensor_f32 (yh);
  for (int i = 0; i < 4; i++)
    g_assert_cmpfloat (py[i], ==, v[i] * 2 + 1);
  diffuse_tensor_unref (yh);
  diffuse_tensor_unref (y);
  diffuse_tensor_unref (xg);
  diffuse_tensor_unref (x);
  g_assert_true (diffuse_devices_shutdown ());
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/cuda-fallback/auto", test_auto);
  g_test_add_func ("/cuda-fallback/missing-device", test_missing_device);
  g_test_add_func ("/cuda-fallback/disable-env", test_disable_env);
  g_test_add_func ("/cuda-fallback/gpu-roundtrip", test_gpu_roundtrip);
  g_test_add_func ("/cuda-fallback/shutdown", test_shutdown);
  return g_test_run ();
}

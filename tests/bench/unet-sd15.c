/* One UNet2DConditionModel forward from a component folder and an io file
 * written by tests/reference/check_unet_sd15.py (full-size SD 1.5 config,
 * random weights): prints the parameter count, the time and peak memory of
 * the forward and its error against diffusers.  Not run by meson test.
 *
 *   unet-sd15 <unet-dir> <io.safetensors> [f32|f16|bf16]
 *
 * io.safetensors: sample, timestep, encoder_hidden_states, output, n_params (I64).
 * Exit status 0 when the parameter count matches and the max abs error is
 * <= 1e-4 of the output's max abs (f32; 2e-2 otherwise). */
#include <diffuse/diffuse.h>
#include <diffuse/unet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static DiffuseTensor *
get (DiffuseSafetensors *st, const char *name)
{
  GError *err = NULL;
  DiffuseTensor *t = diffuse_safetensors_tensor (st, name, DIFFUSE_DTYPE_F32, diffuse_device_cpu (), &err);
  if (!t) {
    fprintf (stderr, "%s: %s\n", name, err->message);
    exit (2);
  }
  return t;
}

static double
rss_peak_mb (void)
{
  char *s = NULL;
  double mb = 0;
  if (g_file_get_contents ("/proc/self/status", &s, NULL, NULL)) {
    const char *p = strstr (s, "VmHWM:");
    if (p)
      mb = g_ascii_strtod (p + 6, NULL) / 1024.0;
  }
  g_free (s);
  return mb;
}

int
main (int argc, char **argv)
{
  if (argc < 3) {
    fprintf (stderr, "usage: %s <unet-dir> <io.safetensors> [f32|f16|bf16]\n", argv[0]);
    return 2;
  }
  DiffuseDType dt = DIFFUSE_DTYPE_F32;
  if (argc > 3 && !diffuse_dtype_from_string (argv[3], &dt)) {
    fprintf (stderr, "unknown dtype %s\n", argv[3]);
    return 2;
  }
  GError *err = NULL;
  DiffuseUNetParams p;
  diffuse_unet_default_params (&p);
  p.dtype = dt;
  gint64 t0 = g_get_monotonic_time ();
  DiffuseUNet *u = diffuse_unet_new_from_dir (argv[1], &p, &err);
  if (!u) {
    fprintf (stderr, "load: %s\n", err->message);
    return 1;
  }
  gint64 t1 = g_get_monotonic_time ();
  DiffuseSafetensors *io = diffuse_safetensors_open (argv[2], &err);
  if (!io) {
    fprintf (stderr, "%s\n", err->message);
    return 1;
  }
  DiffuseTensor *sample = get (io, "sample"), *ts = get (io, "timestep");
  DiffuseTensor *ehs = get (io, "encoder_hidden_states"), *want = get (io, "output");
  /* int64: the count does not fit a float exactly */
  const DiffuseStEntry *np = diffuse_safetensors_find (io, "n_params");
  gint64 want_params = -1;
  if (np && np->dtype == DIFFUSE_ST_I64 && np->nbytes == 8)
    memcpy (&want_params, np->data, 8);

  DiffuseMemStats m0, m1;
  diffuse_device_reset_peak (diffuse_device_cpu ());
  diffuse_device_get_mem_stats (diffuse_device_cpu (), &m0);
  gint64 t2 = g_get_monotonic_time ();
  DiffuseTensor *out = diffuse_unet_forward (u, sample, diffuse_tensor_f32 (ts), (int) diffuse_tensor_numel (ts),
                                             ehs, NULL, &err);
  gint64 t3 = g_get_monotonic_time ();
  diffuse_device_get_mem_stats (diffuse_device_cpu (), &m1);
  if (!out) {
    fprintf (stderr, "forward: %s\n", err->message);
    return 1;
  }
  DiffuseTensor *o32 = diffuse_cast (out, DIFFUSE_DTYPE_F32);
  double scale = diffuse_tensor_max_abs (want);
  double e = diffuse_tensor_max_abs_diff (o32, want);
  double tol = (dt == DIFFUSE_DTYPE_F32 ? 1e-4 : 2e-2) * scale;
  char *ds = diffuse_tensor_describe (sample);
  printf ("unet %s, dtype %s, %d threads\n", argv[1], diffuse_dtype_name (dt), diffuse_cpu_get_threads ());
  printf ("parameters: %" G_GUINT64_FORMAT " (diffusers %" G_GINT64_FORMAT ")%s\n", diffuse_unet_n_params (u),
          want_params, diffuse_unet_n_params (u) == (guint64) want_params ? "" : "  MISMATCH");
  printf ("load: %.2f s   forward %s: %.2f s\n", (t1 - t0) / 1e6, ds, (t3 - t2) / 1e6);
  printf ("weights resident %.1f MiB, borrowed (mmap) %.1f MiB\n", m0.resident_bytes / 1048576.0,
          m0.borrowed_bytes / 1048576.0);
  printf ("forward peak owned memory above weights: %.1f MiB (peak %.1f MiB); process VmHWM %.0f MiB\n",
          (m1.peak_bytes - m0.resident_bytes) / 1048576.0, m1.peak_bytes / 1048576.0, rss_peak_mb ());
  printf ("max abs err %.3g (output max abs %.3g, rel %.3g, tol %.3g): %s\n", e, scale, e / scale, tol,
          e <= tol ? "ok" : "FAIL");
  g_free (ds);
  gboolean ok = e <= tol && diffuse_unet_n_params (u) == (guint64) want_params;
  diffuse_tensor_unref (o32);
  diffuse_tensor_unref (out);
  diffuse_tensor_unref (sample);
  diffuse_tensor_unref (ts);
  diffuse_tensor_unref (ehs);
  diffuse_tensor_unref (want);
  diffuse_safetensors_unref (io);
  diffuse_unet_unref (u);
  return ok ? 0 : 1;
}

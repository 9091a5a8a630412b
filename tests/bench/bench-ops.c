/* CPU timings of the ops that dominate a Stable Diffusion 1.5 UNet step, at
 * SD1.5 shapes (512x512 image -> 64x64 latent, batch 2 for classifier-free
 * guidance).  tests/bench/bench_ops_torch.py times the same shapes with torch;
 * tests/bench/run-cpu-bench.sh runs both and prints the ratio table.
 *
 *   bench-ops [--threads N] [--reps N] [--filter SUBSTRING] [--only NAME] [--list]
 *
 * Output: one line per op, tab-separated:
 *   name  median_ms  min_ms  gflops(median)  shape
 * (lines starting with '#' are comments). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <diffuse/diffuse.h>

typedef struct {
  const char *name;
  const char *shape;
  int kind;
  int64_t a, b, c, d, e;
} Bench;

enum { K_CONV3, K_LINEAR, K_ATTN, K_GN, K_GN_SILU };

static const Bench benches[] = {
  /* conv 3x3, stride 1, pad 1, bias: x [B, C, H, W], C -> C */
  { "conv3x3_320_64x64_b2", "x[2,320,64,64] w[320,320,3,3]", K_CONV3, 2, 320, 64, 64, 320 },
  { "conv3x3_640_32x32_b2", "x[2,640,32,32] w[640,640,3,3]", K_CONV3, 2, 640, 32, 32, 640 },
  { "conv3x3_1280_16x16_b2", "x[2,1280,16,16] w[1280,1280,3,3]", K_CONV3, 2, 1280, 16, 16, 1280 },
  { "conv3x3_1280_8x8_b2", "x[2,1280,8,8] w[1280,1280,3,3]", K_CONV3, 2, 1280, 8, 8, 1280 },
  /* linear x [M / 4096, 4096, K] w [N, K] + b */
  { "linear_8192x320_to_320", "x[2,4096,320] w[320,320]", K_LINEAR, 2 * 4096, 320, 320, 0, 0 },
  { "linear_8192x320_to_2560", "x[2,4096,320] w[2560,320] (GEGLU proj)", K_LINEAR, 2 * 4096, 320, 2560, 0, 0 },
  { "linear_8192x1280_to_320", "x[2,4096,1280] w[320,1280] (ff out)", K_LINEAR, 2 * 4096, 1280, 320, 0, 0 },
  /* attention q [B, H, Lq, D], k/v [B, H, Lk, D] */
  { "attn_self_2x8x4096x4096_d40", "q,k,v[2,8,4096,40]", K_ATTN, 2, 8, 4096, 4096, 40 },
  { "attn_cross_2x8x4096x77_d40", "q[2,8,4096,40] k,v[2,8,77,40]", K_ATTN, 2, 8, 4096, 77, 40 },
  { "attn_self_2x8x1024x1024_d80", "q,k,v[2,8,1024,80]", K_ATTN, 2, 8, 1024, 1024, 80 },
  /* group norm, 32 groups, affine */
  { "group_norm32_320x64x64_b2", "x[2,320,64,64]", K_GN, 2, 320, 64, 64, 0 },
  { "group_norm32_silu_320x64x64_b2", "x[2,320,64,64] + silu", K_GN_SILU, 2, 320, 64, 64, 0 },
};

static guint64 rng_state = 0x9E3779B97F4A7C15ull;

static float
frand (void)
{
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (float) ((rng_state >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

static DiffuseTensor *
rand_tensor (int ndim, const int64_t *shape, float scale)
{
  DiffuseTensor *t = diffuse_tensor_new (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, ndim, shape);
  if (!t)
    return NULL;
  float *p = diffuse_tensor_f32 (t);
  int64_t n = diffuse_tensor_numel (t);
  for (int64_t i = 0; i < n; i++)
    p[i] = frand () * scale;
  return t;
}

static int
cmp_double (const void *a, const void *b)
{
  double x = *(const double *) a, y = *(const double *) b;
  return x < y ? -1 : x > y;
}

static gboolean
run_bench (const Bench *bm, int reps)
{
  DiffuseTensor *in[4] = { NULL, NULL, NULL, NULL };
  double gflop = 0;

  switch (bm->kind) {
  case K_CONV3: {
    const int64_t xs[] = { bm->a, bm->b, bm->c, bm->d }, ws[] = { bm->e, bm->b, 3, 3 }, bs[] = { bm->e };
    in[0] = rand_tensor (4, xs, 1.0f);
    in[1] = rand_tensor (4, ws, 1.0f / sqrtf ((float) bm->b * 9));
    in[2] = rand_tensor (1, bs, 0.1f);
    gflop = 2.0 * bm->a * bm->e * bm->b * 9 * bm->c * bm->d * 1e-9;
    break;
  }
  case K_LINEAR: {
    const int64_t xs[] = { bm->a / 4096, 4096, bm->b }, ws[] = { bm->c, bm->b }, bs[] = { bm->c };
    in[0] = rand_tensor (3, xs, 1.0f);
    in[1] = rand_tensor (2, ws, 1.0f / sqrtf ((float) bm->b));
    in[2] = rand_tensor (1, bs, 0.1f);
    gflop = 2.0 * bm->a * bm->b * bm->c * 1e-9;
    break;
  }
  case K_ATTN: {
    const int64_t qs[] = { bm->a, bm->b, bm->c, bm->e }, ks[] = { bm->a, bm->b, bm->d, bm->e };
    in[0] = rand_tensor (4, qs, 1.0f);
    in[1] = rand_tensor (4, ks, 1.0f);
    in[2] = rand_tensor (4, ks, 1.0f);
    gflop = 4.0 * bm->a * bm->b * bm->c * bm->d * bm->e * 1e-9;
    break;
  }
  case K_GN:
  case K_GN_SILU: {
    const int64_t xs[] = { bm->a, bm->b, bm->c, bm->d }, cs[] = { bm->b };
    in[0] = rand_tensor (4, xs, 1.0f);
    in[1] = rand_tensor (1, cs, 1.0f);
    in[2] = rand_tensor (1, cs, 0.1f);
    break;
  }
  }

  double *ms = g_new (double, reps);
  gboolean ok = TRUE;
  for (int r = -1; r < reps && ok; r++) {   /* r == -1: warm-up */
    gint64 t0 = g_get_monotonic_time ();
    DiffuseTensor *out = NULL;
    switch (bm->kind) {
    case K_CONV3:
      out = diffuse_conv2d (in[0], in[1], in[2], 1, 1, 1, 1);
      break;
    case K_LINEAR:
      out = diffuse_linear (in[0], in[1], in[2]);
      break;
    case K_ATTN:
      out = diffuse_sdpa (in[0], in[1], in[2], NULL, FALSE, 0.0f);
      break;
    case K_GN:
      out = diffuse_group_norm (in[0], 32, in[1], in[2], 1e-5f, DIFFUSE_ACT_NONE);
      break;
    case K_GN_SILU:
      out = diffuse_group_norm (in[0], 32, in[1], in[2], 1e-5f, DIFFUSE_ACT_SILU);
      break;
    }
    gint64 t1 = g_get_monotonic_time ();
    if (!out) {
      GError *err = NULL;
      diffuse_tensor_take_error (&err);
      fprintf (stderr, "%s: failed: %s\n", bm->name, err ? err->message : "(no error)");
      g_clear_error (&err);
      ok = FALSE;
      break;
    }
    diffuse_tensor_unref (out);
    if (r >= 0)
      ms[r] = (t1 - t0) / 1000.0;
  }
  if (ok) {
    qsort (ms, reps, sizeof (double), cmp_double);
    double med = reps % 2 ? ms[reps / 2] : 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
    printf ("%s\t%.3f\t%.3f\t%.1f\t%s\n", bm->name, med, ms[0], gflop > 0 ? gflop / (med * 1e-3) : 0.0, bm->shape);
    fflush (stdout);
  }
  g_free (ms);
  for (int i = 0; i < 4; i++)
    diffuse_tensor_clear (&in[i]);
  return ok;
}

int
main (int argc, char **argv)
{
  int threads = 2, reps = 5;
  const char *filter = NULL, *only = NULL;
  gboolean list = FALSE;

  for (int i = 1; i < argc; i++) {
    if (!strcmp (argv[i], "--threads") && i + 1 < argc)
      threads = atoi (argv[++i]);
    else if (!strcmp (argv[i], "--reps") && i + 1 < argc)
      reps = atoi (argv[++i]);
    else if (!strcmp (argv[i], "--filter") && i + 1 < argc)
      filter = argv[++i];
    else if (!strcmp (argv[i], "--only") && i + 1 < argc)
      only = argv[++i];
    else if (!strcmp (argv[i], "--list"))
      list = TRUE;
    else {
      fprintf (stderr, "usage: %s [--threads N] [--reps N] [--filter SUBSTRING] [--only NAME] [--list]\n", argv[0]);
      return 2;
    }
  }
  if (reps < 1)
    reps = 1;

  diffuse_cpu_set_threads (threads);
  if (list) {
    for (guint i = 0; i < G_N_ELEMENTS (benches); i++)
      if ((!filter || strstr (benches[i].name, filter)) && (!only || !strcmp (benches[i].name, only)))
        printf ("%s\t%s\n", benches[i].name, benches[i].shape);
    return 0;
  }
  printf ("# diffuse-core CPU, threads=%d (effective %d), median of %d after 1 warm-up\n", threads,
          diffuse_cpu_get_threads (), reps);
  printf ("# name\tmedian_ms\tmin_ms\tgflops\tshape\n");
  int failed = 0;
  for (guint i = 0; i < G_N_ELEMENTS (benches); i++) {
    if ((filter && !strstr (benches[i].name, filter)) || (only && strcmp (benches[i].name, only)))
      continue;
    if (!run_bench (&benches[i], reps))
      failed++;
  }
  DiffuseMemStats ms;
  diffuse_device_get_mem_stats (diffuse_device_cpu (), &ms);
  printf ("# peak resident %.1f MiB\n", ms.peak_bytes / 1048576.0);
  return failed ? 1 : 0;
}

/* CPU timing and memory of one full-size SD 1.5 component forward (f32),
 * the C side of tests/bench/bench-sd15-cpu.sh (bench_sd15_torch.py is the
 * torch side; same inputs' shapes, same thread count).
 *
 *   bench-sd15 unet|vae|clip <dir> [--threads N] [--reps N] [--warmup N (1)]
 *
 *   unet: <dir>/unet (tests/reference/check_unet_sd15.py), inputs from
 *         <dir>/io.safetensors: sample [2, 4, 64, 64], 2 timesteps,
 *         encoder_hidden_states [2, 77, 768]
 *   vae:  <dir>/vae, decode of latents [1, 4, 64, 64] -> [1, 3, 512, 512]
 *   clip: <dir>/text_encoder, input_ids [2, 77]
 *   (bench_sd15_torch.py make <dir> writes random-weight vae/ and text_encoder/)
 *
 * Prints one TSV line:
 *   what  median_ms  min_ms  weights_MiB  forward_peak_MiB  VmHWM_MiB
 * weights_MiB: the weights' storage (owned + mapped from the files);
 * forward_peak_MiB: the allocator's peak of owned memory above what was held
 * before the forwards (one warm-up + reps timed ones): activations and scratch;
 * VmHWM_MiB: the process's RSS high-water mark (libraries, touched weight
 * pages, activations, allocator caches). */
#include <diffuse/clip_text.h>
#include <diffuse/diffuse.h>
#include <diffuse/unet.h>
#include <diffuse/vae.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double
status_mb (const char *key)
{
  char *s = NULL;
  double mb = 0;
  if (g_file_get_contents ("/proc/self/status", &s, NULL, NULL)) {
    const char *p = strstr (s, key);
    if (p)
      mb = g_ascii_strtod (p + strlen (key) + 1, NULL) / 1024.0;
  }
  g_free (s);
  return mb;
}

static int
cmp_double (const void *a, const void *b)
{
  double x = *(const double *) a, y = *(const double *) b;
  return x < y ? -1 : x > y;
}

static void
die (const char *what, GError *err)
{
  fprintf (stderr, "bench-sd15: %s: %s\n", what, err ? err->message : "failed");
  exit (1);
}

static DiffuseWeights *
open_weights (const char *dir, const char *file, DiffuseConfig **config)
{
  GError *err = NULL;
  char *cpath = g_build_filename (dir, "config.json", NULL);
  char *wpath = g_build_filename (dir, file, NULL);
  *config = diffuse_config_load (cpath, &err);
  if (!*config)
    die (cpath, err);
  const char *paths[] = { wpath, NULL };
  DiffuseWeights *w = diffuse_weights_open (paths, &err);
  if (!w)
    die (wpath, err);
  g_free (cpath);
  g_free (wpath);
  return w;
}

int
main (int argc, char **argv)
{
  int threads = 2, reps = 3, warmup = 1;
  const char *what = NULL, *dir = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp (argv[i], "--threads") && i + 1 < argc)
      threads = atoi (argv[++i]);
    else if (!strcmp (argv[i], "--warmup") && i + 1 < argc)
      warmup = atoi (argv[++i]);
    else if (!strcmp (argv[i], "--reps") && i + 1 < argc)
      reps = atoi (argv[++i]);
    else if (!what)
      what = argv[i];
    else
      dir = argv[i];
  }
  reps = MAX (1, reps);
  if (!what || !dir || (strcmp (what, "unet") && strcmp (what, "vae") && strcmp (what, "clip"))) {
    fprintf (stderr, "usage: %s unet|vae|clip <dir> [--threads N] [--reps N]\n", argv[0]);
    return 2;
  }
  diffuse_cpu_set_threads (threads);
  DiffuseDevice *cpu = diffuse_device_cpu ();
  GError *err = NULL;
  DiffuseUNet *unet = NULL;
  DiffuseVae *vae = NULL;
  DiffuseClipText *clip = NULL;
  DiffuseSafetensors *io = NULL;
  DiffuseTensor *sample = NULL, *ts = NULL, *ehs = NULL, *z = NULL;
  int32_t ids[2 * 77];

  if (!strcmp (what, "unet")) {
    char *udir = g_build_filename (dir, "unet", NULL), *iop = g_build_filename (dir, "io.safetensors", NULL);
    DiffuseUNetParams p;
    diffuse_unet_default_params (&p);
    unet = diffuse_unet_new_from_dir (udir, &p, &err);
    if (!unet)
      die (udir, err);
    io = diffuse_safetensors_open (iop, &err);
    if (!io)
      die (iop, err);
    sample = diffuse_safetensors_tensor (io, "sample", DIFFUSE_DTYPE_F32, cpu, &err);
    ts = sample ? diffuse_safetensors_tensor (io, "timestep", DIFFUSE_DTYPE_F32, cpu, &err) : NULL;
    ehs = ts ? diffuse_safetensors_tensor (io, "encoder_hidden_states", DIFFUSE_DTYPE_F32, cpu, &err) : NULL;
    if (!ehs)
      die (iop, err);
    g_free (udir);
    g_free (iop);
  } else if (!strcmp (what, "vae")) {
    char *vdir = g_build_filename (dir, "vae", NULL);
    DiffuseConfig *config;
    DiffuseWeights *w = open_weights (vdir, "diffusion_pytorch_model.safetensors", &config);
    vae = diffuse_vae_new (config, w, cpu, DIFFUSE_DTYPE_F32, &err);
    if (!vae)
      die (vdir, err);
    diffuse_weights_unref (w);
    diffuse_config_unref (config);
    int64_t shape[4] = { 1, 4, 64, 64 };
    z = diffuse_tensor_new (cpu, DIFFUSE_DTYPE_F32, 4, shape);
    float *pz = diffuse_tensor_f32 (z);
    GRand *r = g_rand_new_with_seed (1);
    for (int i = 0; i < 4 * 64 * 64; i++)
      pz[i] = (float) g_rand_double_range (r, -2.0, 2.0);
    g_rand_free (r);
    g_free (vdir);
  } else {
    char *tdir = g_build_filename (dir, "text_encoder", NULL);
    DiffuseConfig *config;
    DiffuseWeights *w = open_weights (tdir, "model.safetensors", &config);
    clip = diffuse_clip_text_new (config, w, cpu, DIFFUSE_DTYPE_F32, &err);
    if (!clip)
      die (tdir, err);
    diffuse_weights_unref (w);
    diffuse_config_unref (config);
    GRand *r = g_rand_new_with_seed (1);
    for (int b = 0; b < 2; b++)
      for (int i = 0; i < 77; i++)
        ids[b * 77 + i] = i == 0 ? 49406 : i >= 40 ? 49407 : g_rand_int_range (r, 3, 49406);
    g_rand_free (r);
    g_free (tdir);
  }

  DiffuseMemStats m0, m1;
  diffuse_device_get_mem_stats (cpu, &m0);
  diffuse_device_reset_peak (cpu);
  double *ms = g_new (double, reps);
  for (int rep = -MAX (0, warmup); rep < reps; rep++) {
    gint64 t0 = g_get_monotonic_time ();
    if (unet) {
      DiffuseTensor *out = diffuse_unet_forward (unet, sample, diffuse_tensor_f32 (ts), (int) diffuse_tensor_numel (ts),
                                                 ehs, NULL, &err);
      if (!out)
        die ("unet forward", err);
      diffuse_tensor_unref (out);
    } else if (vae) {
      DiffuseVaeParams vp;
      diffuse_vae_default_params (&vp);
      DiffuseTensor *out = diffuse_vae_decode (vae, z, &vp, &err);
      if (!out)
        die ("vae decode", err);
      diffuse_tensor_unref (out);
    } else {
      DiffuseClipTextParams cp;
      DiffuseClipTextOutput out;
      diffuse_clip_text_default_params (&cp);
      if (!diffuse_clip_text_forward (clip, ids, 2, 77, &cp, &out, &err))
        die ("text encoder forward", err);
      diffuse_clip_text_output_clear (&out);
    }
    gint64 t1 = g_get_monotonic_time ();
    if (rep >= 0)
      ms[rep] = (t1 - t0) / 1000.0;
  }
  diffuse_device_get_mem_stats (cpu, &m1);
  double mn = ms[0];
  for (int i = 1; i < reps; i++)
    mn = MIN (mn, ms[i]);
  qsort (ms, reps, sizeof (double), cmp_double);
  double med = reps % 2 ? ms[reps / 2] : 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
  printf ("%s\t%.1f\t%.1f\t%.0f\t%.0f\t%.0f\n", what, med, mn, (m0.resident_bytes + m0.borrowed_bytes) / 1048576.0,
          (m1.peak_bytes - m0.resident_bytes) / 1048576.0, status_mb ("VmHWM:"));
  g_free (ms);
  diffuse_tensor_clear (&sample);
  diffuse_tensor_clear (&ts);
  diffuse_tensor_clear (&ehs);
  diffuse_tensor_clear (&z);
  if (io)
    diffuse_safetensors_unref (io);
  if (unet)
    diffuse_unet_unref (unet);
  if (vae)
    diffuse_vae_unref (vae);
  if (clip)
    diffuse_clip_text_unref (clip);
  return 0;
}

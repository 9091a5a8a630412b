/* sd-bench-gpu: our side of the SD 1.5 benchmark of tests/bench/gpu/run.sh
 * (bench_diffusers.py is diffusers' side, same folder, same measurements).
 *
 *   sd-bench-gpu MODEL_DIR [--device cuda:0] [--dtype f16] [--steps 20] [--guidance 7.5]
 *                [--size 512] [--runs 5] [--seed 0] [--prompt P] [--out IMG.ppm] [--json FILE]
 *
 * Measures (device work is waited for before every clock read):
 *   load_to_first_step_s  pipeline load (page cache -> device) + the first
 *                         generate up to the end of its first denoising step
 *   total_s               median of --runs generates after that warm-up
 *   unet_step_ms          median interval between denoising steps of one
 *                         more generate, synchronised at each step (CFG
 *                         batch-2 UNet + scheduler step)
 *   vae_decode_ms         median of 5 decodes of [1, 4, S/8, S/8] latents
 *   text_encode_ms        median of 5 prompt+negative encodes (2 x batch 1)
 *   peak_bytes            device record's peak of live tensor bytes over the
 *                         timed generates (torch.cuda.max_memory_allocated)
 *   peak_reserved_bytes   the CUDA pool's peak reservation
 *                         (torch.cuda.max_memory_reserved)
 * Writes the first timed run's image as binary PPM (--out) and one JSON
 * object (--json, and stdout).  Works on any device (--device cpu checks the
 * program itself on a tiny pipeline). */
#include <diffuse/clip_text.h>
#include <diffuse/diffuse.h>
#include <diffuse/vae.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "diffuse-config.h"
#if DIFFUSE_HAVE_CUDA
#include "diffuse-cuda.h"
#endif

static DiffuseDevice *dev;
static gint64 t_first_step;
static gboolean sync_each_step;
static GArray *step_times;

static void
sync_dev (void)
{
#if DIFFUSE_HAVE_CUDA
  GError *err = NULL;
  if (!diffuse_cuda_synchronize (dev, &err)) {
    fprintf (stderr, "synchronize: %s\n", err->message);
    exit (1);
  }
#endif
}

static gboolean
on_step (int step, int total, gpointer user_data)
{
  if (step == 1 && t_first_step == 0) {
    sync_dev ();
    t_first_step = g_get_monotonic_time ();
  }
  if (sync_each_step) {
    sync_dev ();
    gint64 t = g_get_monotonic_time ();
    g_array_append_val (step_times, t);
  }
  return TRUE;
}

static int
cmp_double (const void *a, const void *b)
{
  double x = *(const double *) a, y = *(const double *) b;
  return x < y ? -1 : x > y;
}

static double
median (double *v, int n)
{
  if (n <= 0)
    return -1;
  qsort (v, n, sizeof (double), cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void
die (const char *what, GError *err)
{
  fprintf (stderr, "error: %s: %s\n", what, err ? err->message : "(no message)");
  exit (1);
}

/* a host f32 contiguous copy of t (diagnostic outputs) */
static DiffuseTensor *
host_f32 (DiffuseTensor *t)
{
  DiffuseTensor *h = diffuse_to_device (t, diffuse_device_cpu ());
  DiffuseTensor *f = diffuse_cast (h, DIFFUSE_DTYPE_F32);
  DiffuseTensor *c = diffuse_contiguous (f);
  diffuse_tensor_clear (&h);
  diffuse_tensor_clear (&f);
  return c;
}

/* [1, 3, H, W] decoder output in [-1, 1] -> PPM as diffusers' postprocess: (x / 2 + 0.5).clamp(0, 1) * 255, rounded */
static void
write_decoded_ppm (const char *path, DiffuseTensor *x)
{
  DiffuseTensor *c = host_f32 (x);
  const int64_t *sh = c->shape;
  int64_t H = sh[2], W = sh[3], plane = H * W;
  const float *v = diffuse_tensor_f32 (c);
  guint8 *rgb = g_malloc ((gsize) plane * 3);
  for (int64_t i = 0; i < plane; i++)
    for (int k = 0; k < 3; k++) {
      float u = v[k * plane + i] / 2.0f + 0.5f;
      u = u < 0.0f ? 0.0f : u > 1.0f ? 1.0f : u;
      rgb[i * 3 + k] = (guint8) lrintf (u * 255.0f);
    }
  FILE *f = fopen (path, "wb");
  if (!f) {
    perror (path);
    exit (1);
  }
  fprintf (f, "P6\n%" G_GINT64_FORMAT " %" G_GINT64_FORMAT "\n255\n", W, H);
  fwrite (rgb, 1, (size_t) plane * 3, f);
  fclose (f);
  g_free (rgb);
  diffuse_tensor_unref (c);
}

static void
write_ppm (const char *path, const DiffuseImage *img)
{
  guint8 *rgb = g_malloc ((gsize) img->width * img->height * 3);
  diffuse_image_to_rgb8 (img, rgb, img->width * 3);
  FILE *f = fopen (path, "wb");
  if (!f) {
    perror (path);
    exit (1);
  }
  fprintf (f, "P6\n%d %d\n255\n", img->width, img->height);
  fwrite (rgb, 1, (size_t) img->width * img->height * 3, f);
  fclose (f);
  g_free (rgb);
}

int
main (int argc, char **argv)
{
  g_autofree char *device_o = NULL, *dtype_o = NULL, *prompt_o = NULL, *out_path = NULL, *json_path = NULL;
  g_autofree char *vae_out = NULL, *te_out = NULL;
  int steps = 20, size = 512, runs = 5, seed = 0;
  double guidance = 7.5;
  GOptionEntry entries[] = {
    { "device", 0, 0, G_OPTION_ARG_STRING, &device_o, "device (cuda:0)", "DEV" },
    { "dtype", 0, 0, G_OPTION_ARG_STRING, &dtype_o, "f16 (default), bf16 or f32", "D" },
    { "steps", 0, 0, G_OPTION_ARG_INT, &steps, "denoising steps", "N" },
    { "guidance", 0, 0, G_OPTION_ARG_DOUBLE, &guidance, "CFG scale", "G" },
    { "size", 0, 0, G_OPTION_ARG_INT, &size, "width = height", "PX" },
    { "runs", 0, 0, G_OPTION_ARG_INT, &runs, "timed runs", "N" },
    { "seed", 0, 0, G_OPTION_ARG_INT, &seed, "seed", "S" },
    { "prompt", 0, 0, G_OPTION_ARG_STRING, &prompt_o, "prompt", "P" },
    { "out", 0, 0, G_OPTION_ARG_STRING, &out_path, "image of the first timed run (PPM)", "FILE" },
    { "json", 0, 0, G_OPTION_ARG_STRING, &json_path, "results", "FILE" },
    { "vae-out", 0, 0, G_OPTION_ARG_STRING, &vae_out, "the VAE decode of the fixed latents (PPM; diagnostics)", "FILE" },
    { "te-out", 0, 0, G_OPTION_ARG_STRING, &te_out, "the text encoder's last hidden state for the fixed ids (raw f32)",
      "FILE" },
    { NULL },
  };
  GError *err = NULL;
  GOptionContext *oc = g_option_context_new ("MODEL_DIR - SD timing");
  g_option_context_add_main_entries (oc, entries, NULL);
  if (!g_option_context_parse (oc, &argc, &argv, &err) || argc != 2) {
    fprintf (stderr, "%s\n", err ? err->message : "usage: sd-bench-gpu MODEL_DIR [options]");
    return 2;
  }
  g_option_context_free (oc);
  const char *device = device_o ? device_o : "cuda:0";
  const char *dtype_s = dtype_o ? dtype_o : "f16";
  const char *prompt = prompt_o ? prompt_o : "a photograph of an astronaut riding a horse";
  DiffuseDType dt;
  if (!diffuse_dtype_from_string (dtype_s, &dt)) {
    fprintf (stderr, "bad dtype %s\n", dtype_s);
    return 2;
  }
  runs = MAX (runs, 1);
  step_times = g_array_new (FALSE, FALSE, sizeof (gint64));

  /* ---- load + first step ---- */
  gint64 t0 = g_get_monotonic_time ();
  dev = diffuse_device_get (device, &err);
  if (!dev)
    die ("device", err);
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.device = device;
  lp.have_dtype = TRUE;
  lp.dtype = dt;
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (argv[1], &lp, cache, &err);
  if (!pm)
    die ("load", err);
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  if (!sd)
    die ("pipeline", err);
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = prompt;
  p.width = p.height = size;
  p.num_inference_steps = steps;
  p.guidance_scale = (float) guidance;
  p.seed = (guint64) seed;
  p.on_step = on_step;
  GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);   /* also the warm-up */
  if (!imgs)
    die ("generate (warm-up)", err);
  g_ptr_array_unref (imgs);
  double load_to_first_step = (t_first_step - t0) / 1e6;

  /* ---- timed generates ---- */
  diffuse_device_reset_peak (dev);
  double *tot = g_new (double, runs);
  for (int r = 0; r < runs; r++) {
    gint64 a = g_get_monotonic_time ();
    imgs = diffuse_sd_generate (sd, &p, &err);
    gint64 b = g_get_monotonic_time ();
    if (!imgs)
      die ("generate", err);
    tot[r] = (b - a) / 1e6;
    if (r == 0 && out_path)
      write_ppm (out_path, g_ptr_array_index (imgs, 0));
    g_ptr_array_unref (imgs);
  }
  DiffuseMemStats ms;
  diffuse_device_get_mem_stats (dev, &ms);
  guint64 peak_reserved = 0;
  const char *card = diffuse_device_name (dev);
#if DIFFUSE_HAVE_CUDA
  if (diffuse_device_is_cuda (dev)) {
    DiffuseCudaPoolStats ps;
    diffuse_cuda_get_pool_stats (dev, &ps);
    peak_reserved = ps.peak_reserved_bytes;
    card = diffuse_cuda_device_name (dev);
  }
#endif
  double total = median (tot, runs);

  /* ---- per-step timing ---- */
  sync_each_step = TRUE;
  gint64 gs = g_get_monotonic_time ();
  g_array_append_val (step_times, gs);
  imgs = diffuse_sd_generate (sd, &p, &err);
  if (!imgs)
    die ("generate (per step)", err);
  g_ptr_array_unref (imgs);
  sync_each_step = FALSE;
  int nst = (int) step_times->len - 2;   /* intervals between steps 1..N */
  double *st = g_new (double, MAX (nst, 1));
  for (int i = 0; i < nst; i++)
    st[i] = (g_array_index (step_times, gint64, i + 2) - g_array_index (step_times, gint64, i + 1)) / 1e3;
  double unet_step = median (st, nst);

  /* ---- VAE decode and text encode alone (second copies of those weights) ---- */
  DiffuseComponent *cv = diffuse_pipeline_model_get (pm, "vae");
  DiffuseComponent *ct = diffuse_pipeline_model_get (pm, "text_encoder");
  double vae_ms = -1, te_ms = -1, tmp[5];
  if (cv) {
    DiffuseVae *vae = diffuse_vae_new (diffuse_component_config (cv), diffuse_component_weights (cv), dev, dt, &err);
    if (!vae)
      die ("vae", err);
    int h = size / diffuse_vae_scale_factor (vae);
    int64_t n = 4 * (int64_t) h * h;
    float *v = g_new (float, n);
    for (int64_t i = 0; i < n; i++) {
      /* the same values as sd15_diffusers.py's fixed_latents (~ latents / scaling_factor range) */
      guint32 s = (guint32) ((guint64) i * 2654435761u);
      v[i] = (float) ((s / 4294967296.0 - 0.5) * 4.0);
    }
    int64_t shape[4] = { 1, 4, h, h };
    DiffuseTensor *lh = diffuse_tensor_from_f32 (v, 4, shape);
    DiffuseTensor *lc = diffuse_cast (lh, dt);
    DiffuseTensor *lat = diffuse_to_device (lc, dev);
    for (int r = -1; r < 5; r++) {
      gint64 a = g_get_monotonic_time ();
      DiffuseTensor *img = diffuse_vae_decode (vae, lat, NULL, &err);
      if (!img)
        die ("vae decode", err);
      if (r == -1 && vae_out)
        write_decoded_ppm (vae_out, img);
      sync_dev ();
      if (r >= 0)
        tmp[r] = (g_get_monotonic_time () - a) / 1e3;
      diffuse_tensor_unref (img);
    }
    vae_ms = median (tmp, 5);
    diffuse_tensor_unref (lh);
    diffuse_tensor_unref (lc);
    diffuse_tensor_unref (lat);
    g_free (v);
    diffuse_vae_unref (vae);
  }
  if (ct) {
    DiffuseClipText *te = diffuse_clip_text_new (diffuse_component_config (ct), diffuse_component_weights (ct), dev,
                                                 dt, &err);
    if (!te)
      die ("text encoder", err);
    int L = diffuse_clip_text_max_positions (te);
    int32_t *ids = g_new0 (int32_t, L);
    for (int i = 0; i < L; i++)
      ids[i] = i == 0 ? 49406 % diffuse_clip_text_vocab_size (te) : 49407 % diffuse_clip_text_vocab_size (te);
    ids[1] = 320 % diffuse_clip_text_vocab_size (te);
    for (int r = -1; r < 5; r++) {
      gint64 a = g_get_monotonic_time ();
      for (int k = 0; k < 2; k++) {   /* prompt and negative prompt, batch 1 each, as diffusers */
        DiffuseClipTextOutput o = { 0 };
        if (!diffuse_clip_text_forward (te, ids, 1, L, NULL, &o, &err))
          die ("text encode", err);
        if (r == -1 && k == 0 && te_out) {
          DiffuseTensor *hc = host_f32 (o.last_hidden_state);
          if (!g_file_set_contents (te_out, (const char *) diffuse_tensor_f32 (hc),
                                    (gssize) (diffuse_tensor_numel (hc) * sizeof (float)), &err))
            die ("te-out", err);
          diffuse_tensor_unref (hc);
        }
        diffuse_clip_text_output_clear (&o);
      }
      sync_dev ();
      if (r >= 0)
        tmp[r] = (g_get_monotonic_time () - a) / 1e3;
    }
    te_ms = median (tmp, 5);
    g_free (ids);
    diffuse_clip_text_unref (te);
  }

  char *json = g_strdup_printf (
      "{\"side\": \"ours\", \"card\": \"%s\", \"device\": \"%s\", \"dtype\": \"%s\", \"size\": %d, \"steps\": %d, "
      "\"guidance\": %.2f, \"runs\": %d, \"load_to_first_step_s\": %.4f, \"total_s\": %.4f, \"total_min_s\": %.4f, "
      "\"unet_step_ms\": %.3f, \"vae_decode_ms\": %.3f, \"text_encode_ms\": %.3f, \"peak_bytes\": %" G_GUINT64_FORMAT
      ", \"peak_reserved_bytes\": %" G_GUINT64_FORMAT ", \"resident_bytes_after\": %" G_GUINT64_FORMAT "}\n",
      card, diffuse_device_name (dev), diffuse_dtype_name (dt), size, steps, guidance, runs, load_to_first_step, total,
      tot[0] <= total ? tot[0] : total, unet_step, vae_ms, te_ms, ms.peak_bytes, peak_reserved, ms.resident_bytes);
  fputs (json, stdout);
  if (json_path && !g_file_set_contents (json_path, json, -1, &err))
    die ("json", err);
  g_free (json);
  g_free (tot);
  g_free (st);
  g_array_unref (step_times);
  diffuse_sd_unref (sd);
  diffuse_pipeline_model_unref (pm);
  diffuse_component_cache_unref (cache);
  /* every device resource back to the driver (compute-sanitizer's leak check);
   * FALSE: a tensor of ours is still alive */
  if (!diffuse_devices_shutdown ()) {
    fprintf (stderr, "error: tensors still alive on the device at exit\n");
    return 1;
  }
  return 0;
}

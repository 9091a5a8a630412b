/* Per-step overhead of the text2img loop outside the model (scheduler,
 * CFG combine, conversions) for each scheduler, as a fraction of a step.
 *
 *   bench-sd-step MODEL_DIR [STEPS] [WIDTH] [HEIGHT] [REPEATS]
 *
 * Prints one row per scheduler: UNet ms per step, other ms per step and the
 * overhead in percent (median over REPEATS runs). */
#include <diffuse/diffuse.h>
#include <stdio.h>
#include <stdlib.h>

static int
cmp_d (const void *a, const void *b)
{
  double x = *(const double *) a, y = *(const double *) b;
  return x < y ? -1 : x > y;
}

int
main (int argc, char **argv)
{
  if (argc < 2) {
    fprintf (stderr, "usage: %s MODEL_DIR [STEPS] [WIDTH] [HEIGHT] [REPEATS]\n", argv[0]);
    return 2;
  }
  int steps = argc > 2 ? atoi (argv[2]) : 20;
  int w = argc > 3 ? atoi (argv[3]) : 0, h = argc > 4 ? atoi (argv[4]) : 0;
  int reps = argc > 5 ? atoi (argv[5]) : 5;
  GError *err = NULL;
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (argv[1], NULL, NULL, &err);
  DiffuseSD *sd = pm ? diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err) : NULL;
  if (!sd) {
    fprintf (stderr, "error: %s\n", err->message);
    return 1;
  }
  const char *const *classes = diffuse_scheduler_list_classes ();
  printf ("%-34s %10s %10s %10s %9s\n", "scheduler", "unet ms", "other ms", "other %", "calls");
  for (int c = 0; classes[c]; c++) {
    double *unet = g_new (double, reps), *other = g_new (double, reps);
    int calls = 0;
    gboolean ok = TRUE;
    for (int r = 0; r < reps && ok; r++) {
      DiffuseSDParams p;
      diffuse_sd_default_params (&p);
      p.prompt = "a red circle";
      p.num_inference_steps = steps;
      p.width = w;
      p.height = h;
      p.scheduler = classes[c];
      DiffuseSDTimings t;
      GPtrArray *imgs = diffuse_sd_generate_timed (sd, &p, &t, &err);
      if (!imgs) {
        printf ("%-34s error: %s\n", classes[c], err->message);
        g_clear_error (&err);
        ok = FALSE;
        break;
      }
      g_ptr_array_unref (imgs);
      unet[r] = t.unet_us / 1000.0 / t.n_unet_calls;
      other[r] = t.step_other_us / 1000.0 / t.n_unet_calls;
      calls = t.n_unet_calls;
    }
    if (ok) {
      qsort (unet, reps, sizeof (double), cmp_d);
      qsort (other, reps, sizeof (double), cmp_d);
      double u = unet[reps / 2], o = other[reps / 2];
      printf ("%-34s %10.3f %10.4f %9.3f%% %9d\n", classes[c], u, o, 100.0 * o / (u + o), calls);
    }
    g_free (unet);
    g_free (other);
  }
  diffuse_sd_unref (sd);
  diffuse_pipeline_model_unref (pm);
  return 0;
}

/* gst-diffuse — DDIMScheduler (diffusers scheduling_ddim.py). */
#include "sched-private.h"

typedef struct {
  gboolean clip_sample;
  float clip_sample_range;
  float final_alpha_cumprod;
} DdimPriv;

static const char *const ddim_predictions[] = { "epsilon", "sample", "v_prediction", NULL };

static gboolean
ddim_init (DiffuseScheduler *s, SchedCfg *r, GError **error)
{
  static const SchedCommon def = { 1000, 0.0001, 0.02, "linear", "epsilon", "leading", 0, FALSE };
  DdimPriv *p = g_new0 (DdimPriv, 1);
  s->priv = p;
  sched_read_common (r, &s->c, &def);
  p->clip_sample = sched_cfg_bool (r, "clip_sample", TRUE);
  p->clip_sample_range = (float) sched_cfg_double (r, "clip_sample_range", 1.0);
  gboolean set_alpha_to_one = sched_cfg_bool (r, "set_alpha_to_one", TRUE);
  sched_cfg_require_false (r, "thresholding");
  if (!r->ok)
    return FALSE;
  if (!sched_check_prediction (s, ddim_predictions, error) || !sched_init_betas (s, TRUE, FALSE, error))
    return FALSE;
  p->final_alpha_cumprod = set_alpha_to_one ? 1.0f : s->alphas_cumprod[0];
  return TRUE;
}

/* The integer timesteps of DDIM / DDPM (and PNDM's base list). */
double *_diffuse_sched_int_timesteps (DiffuseScheduler *s, guint n_steps, guint *len);

double *
_diffuse_sched_int_timesteps (DiffuseScheduler *s, guint n_steps, guint *len)
{
  guint T = (guint) s->c.num_train_timesteps;
  const char *sp = s->c.timestep_spacing;
  double *ts;
  if (g_strcmp0 (sp, "linspace") == 0) {
    ts = g_new (double, n_steps);
    g_autofree double *lin = g_new (double, n_steps);
    np_linspace (0, T - 1, n_steps, TRUE, lin);
    for (guint i = 0; i < n_steps; i++)
      ts[i] = (double) (gint64) np_round (lin[n_steps - 1 - i]);
    *len = n_steps;
  } else if (g_strcmp0 (sp, "leading") == 0) {
    guint ratio = T / n_steps;
    ts = g_new (double, n_steps);
    for (guint i = 0; i < n_steps; i++)
      ts[i] = (double) ((gint64) (n_steps - 1 - i) * ratio + s->c.steps_offset);
    *len = n_steps;
  } else {
    double ratio = (double) T / n_steps;
    guint n = 0;
    ts = np_arange (T, 0, -ratio, &n);
    for (guint i = 0; i < n; i++)
      ts[i] = (double) ((gint64) np_round (ts[i]) - 1);
    *len = n;
  }
  return ts;
}

static gboolean
ddim_set_timesteps (DiffuseScheduler *s, guint n_steps, GError **error)
{
  if (n_steps > s->c.num_train_timesteps) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "%s: num_inference_steps %u cannot be larger than num_train_timesteps %" G_GINT64_FORMAT,
                 s->klass->name, n_steps, s->c.num_train_timesteps);
    return FALSE;
  }
  guint len = 0;
  double *ts = _diffuse_sched_int_timesteps (s, n_steps, &len);
  s->num_inference_steps = n_steps;
  sched_set_schedule (s, ts, len, NULL, 0);
  s->init_noise_sigma = 1.0f;
  return TRUE;
}

static gboolean
ddim_step (DiffuseScheduler *s, const float *mo, float *x, size_t n, DiffuseRng *rng, GError **error)
{
  DdimPriv *p = s->priv;
  gint64 t = (gint64) s->timesteps[s->pos];
  gint64 T = s->c.num_train_timesteps;
  if (t < 0 || t >= T) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: timestep %" G_GINT64_FORMAT
                 " outside the train schedule", s->klass->name, t);
    return FALSE;
  }
  gint64 prev_t = t - T / s->num_inference_steps;
  float a_t = s->alphas_cumprod[t];
  float a_prev = prev_t >= 0 ? s->alphas_cumprod[prev_t] : p->final_alpha_cumprod;
  float b_t = 1.0f - a_t;
  float sa = sqrtf (a_t), sb = sqrtf (b_t);
  gboolean eps = strcmp (s->c.prediction_type, "epsilon") == 0;
  gboolean smp = strcmp (s->c.prediction_type, "sample") == 0;

  float b_prev = 1.0f - a_prev;
  float variance = (b_prev / b_t) * (1.0f - a_t / a_prev);
  float std_dev = (float) s->eta * sqrtf (variance);
  float dir_coeff = sqrtf ((1.0f - a_prev) - std_dev * std_dev);
  float sa_prev = sqrtf (a_prev);
  float lo = -p->clip_sample_range, hi = p->clip_sample_range;

  g_autofree float *noise = NULL;
  if (s->eta > 0) {
    noise = g_new (float, n);
    if (!sched_draw_noise (s, rng, noise, n, error))
      return FALSE;
  }
  for (size_t i = 0; i < n; i++) {
    float x0, e;
    if (eps) {
      x0 = (x[i] - sb * mo[i]) / sa;
      e = mo[i];
    } else if (smp) {
      x0 = mo[i];
      e = (x[i] - sa * x0) / sb;
    } else {
      x0 = sa * x[i] - sb * mo[i];
      e = sa * mo[i] + sb * x[i];
    }
    if (p->clip_sample)
      x0 = x0 < lo ? lo : (x0 > hi ? hi : x0);
    float v = sa_prev * x0 + dir_coeff * e;
    if (noise)
      v = v + std_dev * noise[i];
    x[i] = v;
  }
  return TRUE;
}

const SchedClass _diffuse_sched_ddim = {
  .name = "DDIMScheduler",
  .order = 1,
  .has_begin_index = FALSE,
  .index_kind = SCHED_INDEX_NONE,
  .noise_kind = SCHED_NOISE_ALPHAS_CUMPROD,
  .init = ddim_init,
  .set_timesteps = ddim_set_timesteps,
  .scale_model_input = NULL,
  .step = ddim_step,
  .free_priv = g_free,
};

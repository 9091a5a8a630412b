/* gst-diffuse — DDPMScheduler (diffusers scheduling_ddpm.py). */
#include "sched-private.h"

typedef enum { VAR_FIXED_SMALL, VAR_FIXED_SMALL_LOG, VAR_FIXED_LARGE, VAR_FIXED_LARGE_LOG } DdpmVariance;

typedef struct {
  gboolean clip_sample;
  float clip_sample_range;
  DdpmVariance variance_type;
} DdpmPriv;

static const char *const ddpm_predictions[] = { "epsilon", "sample", "v_prediction", NULL };
static const char *const ddpm_variances[] = { "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", NULL };

double *_diffuse_sched_int_timesteps (DiffuseScheduler *s, guint n_steps, guint *len);

static gboolean
ddpm_init (DiffuseScheduler *s, SchedCfg *r, GError **error)
{
  static const SchedCommon def = { 1000, 0.0001, 0.02, "linear", "epsilon", "leading", 0, FALSE };
  DdpmPriv *p = g_new0 (DdpmPriv, 1);
  s->priv = p;
  sched_read_common (r, &s->c, &def);
  p->clip_sample = sched_cfg_bool (r, "clip_sample", TRUE);
  p->clip_sample_range = (float) sched_cfg_double (r, "clip_sample_range", 1.0);
  const char *vt = sched_cfg_choice (r, "variance_type", "fixed_small", ddpm_variances);
  sched_cfg_require_false (r, "thresholding");
  if (!r->ok)
    return FALSE;
  for (guint i = 0; ddpm_variances[i]; i++)
    if (strcmp (vt, ddpm_variances[i]) == 0)
      p->variance_type = (DdpmVariance) i;
  return sched_check_prediction (s, ddpm_predictions, error) && sched_init_betas (s, TRUE, FALSE, error);
}

static gboolean
ddpm_set_timesteps (DiffuseScheduler *s, guint n_steps, GError **error)
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

/* previous_timestep (): the next entry of the schedule (first match), or -1 */
static gint64
ddpm_prev_timestep (DiffuseScheduler *s, gint64 t)
{
  for (guint i = 0; i < s->n_timesteps; i++)
    if (s->timesteps[i] == (double) t)
      return i + 1 < s->n_timesteps ? (gint64) s->timesteps[i + 1] : -1;
  return -1;
}

static gboolean
ddpm_step (DiffuseScheduler *s, const float *mo, float *x, size_t n, DiffuseRng *rng, GError **error)
{
  DdpmPriv *p = s->priv;
  gint64 t = (gint64) s->timesteps[s->pos];
  if (t < 0 || t >= s->c.num_train_timesteps) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: timestep %" G_GINT64_FORMAT
                 " outside the train schedule", s->klass->name, t);
    return FALSE;
  }
  gint64 prev_t = ddpm_prev_timestep (s, t);
  float a_t = s->alphas_cumprod[t];
  float a_prev = prev_t >= 0 ? s->alphas_cumprod[prev_t] : 1.0f;
  float b_t = 1.0f - a_t;
  float b_prev = 1.0f - a_prev;
  float cur_alpha = a_t / a_prev;
  float cur_beta = 1.0f - cur_alpha;
  float sa = sqrtf (a_t), sb = sqrtf (b_t);
  gboolean eps = strcmp (s->c.prediction_type, "epsilon") == 0;
  gboolean smp = strcmp (s->c.prediction_type, "sample") == 0;
  float x0_coeff = (sqrtf (a_prev) * cur_beta) / b_t;
  float cur_coeff = sqrtf (cur_alpha) * b_prev / b_t;
  float lo = -p->clip_sample_range, hi = p->clip_sample_range;

  /* _get_variance (t) */
  float std = 0.0f;
  g_autofree float *noise = NULL;
  if (t > 0) {
    float var = (1.0f - a_prev) / (1.0f - a_t) * cur_beta;
    var = var < 1e-20f ? 1e-20f : var;
    switch (p->variance_type) {
    case VAR_FIXED_SMALL:
      std = sqrtf (var);
      break;
    case VAR_FIXED_SMALL_LOG:
      std = expf (0.5f * logf (var));        /* multiplied in directly, no ** 0.5 */
      break;
    case VAR_FIXED_LARGE:
      std = sqrtf (cur_beta);
      break;
    case VAR_FIXED_LARGE_LOG:
      std = sqrtf (logf (cur_beta));           /* NaN, as diffusers computes it */
      break;
    }
    noise = g_new (float, n);
    if (!sched_draw_noise (s, rng, noise, n, error))
      return FALSE;
  }
  for (size_t i = 0; i < n; i++) {
    float x0;
    if (eps)
      x0 = (x[i] - sb * mo[i]) / sa;
    else if (smp)
      x0 = mo[i];
    else
      x0 = sa * x[i] - sb * mo[i];
    if (p->clip_sample)
      x0 = x0 < lo ? lo : (x0 > hi ? hi : x0);
    float v = x0_coeff * x0 + cur_coeff * x[i];
    if (noise)
      v = v + std * noise[i];
    else
      v = v + 0.0f;                            /* pred_prev_sample + 0 */
    x[i] = v;
  }
  return TRUE;
}

const SchedClass _diffuse_sched_ddpm = {
  .name = "DDPMScheduler",
  .order = 1,
  .has_begin_index = FALSE,
  .index_kind = SCHED_INDEX_NONE,
  .noise_kind = SCHED_NOISE_ALPHAS_CUMPROD,
  .init = ddpm_init,
  .set_timesteps = ddpm_set_timesteps,
  .scale_model_input = NULL,
  .step = ddpm_step,
  .free_priv = g_free,
};

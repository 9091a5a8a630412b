/* gst-diffuse — EulerAncestralDiscreteScheduler (diffusers
 * scheduling_euler_ancestral_discrete.py). */
#include "sched-private.h"

static const char *const ea_predictions[] = { "epsilon", "v_prediction", NULL };

float _diffuse_sched_euler_init_sigma (DiffuseScheduler *s);
void _diffuse_sched_sigma_scale_input (DiffuseScheduler *s, float *x, size_t n);

static gboolean
ea_init (DiffuseScheduler *s, SchedCfg *r, GError **error)
{
  static const SchedCommon def = { 1000, 0.0001, 0.02, "linear", "epsilon", "linspace", 0, FALSE };
  sched_read_common (r, &s->c, &def);
  if (!r->ok)
    return FALSE;
  /* "sample" raises NotImplementedError in diffusers' step */
  if (!sched_check_prediction (s, ea_predictions, error) || !sched_init_betas (s, TRUE, FALSE, error))
    return FALSE;
  if (s->c.rescale_betas_zero_snr)
    s->alphas_cumprod[s->c.num_train_timesteps - 1] = 1.0f / 16777216.0f;
  return TRUE;
}

static gboolean
ea_set_timesteps (DiffuseScheduler *s, guint n_steps, GError **error)
{
  guint T = (guint) s->c.num_train_timesteps;
  guint nt = 0;
  double *ts = sched_spacing_timesteps_f32 (s, n_steps, &nt, error);
  g_autofree float *train = sched_train_sigmas (s);
  float *sigmas = g_new (float, nt + 1);
  for (guint i = 0; i < nt; i++)
    sigmas[i] = (float) np_interp_index (ts[i], train, T);
  sigmas[nt] = 0.0f;
  s->num_inference_steps = n_steps;
  sched_set_schedule (s, ts, nt, sigmas, nt + 1);
  s->init_noise_sigma = _diffuse_sched_euler_init_sigma (s);
  return TRUE;
}

static gboolean
ea_step (DiffuseScheduler *s, const float *mo, float *x, size_t n, DiffuseRng *rng, GError **error)
{
  float sigma = s->sigmas[s->step_index];
  float sigma_to = s->sigmas[s->step_index + 1];
  gboolean v = strcmp (s->c.prediction_type, "v_prediction") == 0;
  float c_v = -sigma / sqrtf (sigma * sigma + 1.0f);
  float d_v = sigma * sigma + 1.0f;
  float from2 = sigma * sigma, to2 = sigma_to * sigma_to;
  float sigma_up = sqrtf ((to2 * (from2 - to2)) / from2);
  float sigma_down = sqrtf (to2 - sigma_up * sigma_up);
  float dt = sigma_down - sigma;

  g_autofree float *noise = g_new (float, n);
  if (!sched_draw_noise (s, rng, noise, n, error))
    return FALSE;
  for (size_t i = 0; i < n; i++) {
    float x0 = v ? mo[i] * c_v + x[i] / d_v : x[i] - sigma * mo[i];
    float deriv = (x[i] - x0) / sigma;
    float prev = x[i] + deriv * dt;
    x[i] = prev + noise[i] * sigma_up;
  }
  return TRUE;
}

const SchedClass _diffuse_sched_euler_ancestral = {
  .name = "EulerAncestralDiscreteScheduler",
  .order = 1,
  .has_begin_index = TRUE,
  .index_kind = SCHED_INDEX_SECOND_IF_DUP,
  .noise_kind = SCHED_NOISE_SIGMA,
  .init = ea_init,
  .set_timesteps = ea_set_timesteps,
  .scale_model_input = _diffuse_sched_sigma_scale_input,
  .step = ea_step,
  .free_priv = NULL,
};

/* gst-diffuse — LCMScheduler (diffusers scheduling_lcm.py). */
#include "sched-private.h"

typedef struct {
  gint64 original_inference_steps;
  gboolean clip_sample;
  float clip_sample_range;
  float final_alpha_cumprod;
  double timestep_scaling;
} LcmPriv;

static const char *const lcm_predictions[] = { "epsilon", "sample", "v_prediction", NULL };

static gboolean
lcm_init (DiffuseScheduler *s, SchedCfg *r, GError **error)
{
  static const SchedCommon def = { 1000, 0.00085, 0.012, "scaled_linear", "epsilon", "leading", 0, FALSE };
  LcmPriv *p = g_new0 (LcmPriv, 1);
  s->priv = p;
  sched_read_common (r, &s->c, &def);
  p->original_inference_steps = sched_cfg_int (r, "original_inference_steps", 50);
  p->clip_sample = sched_cfg_bool (r, "clip_sample", FALSE);
  p->clip_sample_range = (float) sched_cfg_double (r, "clip_sample_range", 1.0);
  gboolean set_alpha_to_one = sched_cfg_bool (r, "set_alpha_to_one", TRUE);
  p->timestep_scaling = sched_cfg_double (r, "timestep_scaling", 10.0);
  sched_cfg_require_false (r, "thresholding");
  if (!r->ok)
    return FALSE;
  if (!sched_check_prediction (s, lcm_predictions, error) || !sched_init_betas (s, TRUE, FALSE, error))
    return FALSE;
  p->final_alpha_cumprod = set_alpha_to_one ? 1.0f : s->alphas_cumprod[0];
  return TRUE;
}

gboolean _diffuse_sched_lcm_set_timesteps (DiffuseScheduler *s, guint n, guint original, double strength,
                                           GError **error);

gboolean
_diffuse_sched_lcm_set_timesteps (DiffuseScheduler *s, guint n_steps, guint original, double strength, GError **error)
{
  LcmPriv *p = s->priv;
  gint64 T = s->c.num_train_timesteps;
  gint64 orig = original ? (gint64) original : p->original_inference_steps;
  if (orig > T || orig < 1) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "%s: original_inference_steps %" G_GINT64_FORMAT " must be in [1, num_train_timesteps %" G_GINT64_FORMAT "]",
                 s->klass->name, orig, T);
    return FALSE;
  }
  if (n_steps > T) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "%s: num_inference_steps %u cannot be larger than num_train_timesteps %" G_GINT64_FORMAT,
                 s->klass->name, n_steps, T);
    return FALSE;
  }
  if (!(strength > 0 && strength <= 1)) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: strength %g must be in (0, 1]",
                 s->klass->name, strength);
    return FALSE;
  }
  gint64 k = T / orig;
  gint64 n_origin = (gint64) (orig * strength);       /* int (original_steps * strength) */
  gint64 skipping = n_origin / n_steps;
  if (skipping < 1) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "%s: the combination of original_inference_steps x strength (%" G_GINT64_FORMAT
                 ") is smaller than num_inference_steps %u", s->klass->name, n_origin, n_steps);
    return FALSE;
  }
  if ((gint64) n_steps > orig) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "%s: num_inference_steps %u cannot be larger than original_inference_steps %" G_GINT64_FORMAT,
                 s->klass->name, n_steps, orig);
    return FALSE;
  }
  /* lcm_origin_timesteps = (1..n_origin) * k - 1, reversed; picked at
   * floor (linspace (0, n_origin, n_steps, endpoint=False)) */
  g_autofree double *idx = g_new (double, n_steps);
  np_linspace (0, (double) n_origin, n_steps, FALSE, idx);
  double *ts = g_new (double, n_steps);
  for (guint i = 0; i < n_steps; i++) {
    gint64 j = (gint64) floor (idx[i]);
    gint64 origin = n_origin - j;                 /* reversed: element j is (n_origin - j) * k - 1 */
    ts[i] = (double) (origin * k - 1);
  }
  s->num_inference_steps = n_steps;
  sched_set_schedule (s, ts, n_steps, NULL, 0);
  s->init_noise_sigma = 1.0f;
  return TRUE;
}

static gboolean
lcm_set_timesteps (DiffuseScheduler *s, guint n_steps, GError **error)
{
  return _diffuse_sched_lcm_set_timesteps (s, n_steps, 0, 1.0, error);
}

static gboolean
lcm_step (DiffuseScheduler *s, const float *mo, float *x, size_t n, DiffuseRng *rng, GError **error)
{
  LcmPriv *p = s->priv;
  gint64 T = s->c.num_train_timesteps;
  gint64 t = (gint64) s->timesteps[s->step_index];
  guint prev_index = (guint) s->step_index + 1;
  gint64 prev_t = prev_index < s->n_timesteps ? (gint64) s->timesteps[prev_index] : t;
  if (t < 0 || t >= T || prev_t >= T) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: timestep %" G_GINT64_FORMAT
                 " outside the train schedule", s->klass->name, t);
    return FALSE;
  }
  float a_t = s->alphas_cumprod[t];
  float a_prev = prev_t >= 0 ? s->alphas_cumprod[prev_t] : p->final_alpha_cumprod;
  float b_t = 1.0f - a_t;
  float b_prev = 1.0f - a_prev;

  /* get_scalings_for_boundary_condition_discrete: the timestep is an int64
   * tensor, times a Python float gives float32 */
  float scaled = (float) t * (float) p->timestep_scaling;
  float sq = scaled * scaled + 0.25f;
  float c_skip = 0.25f / sq;
  float c_out = scaled / sqrtf (sq);

  float sa = sqrtf (a_t), sb = sqrtf (b_t);
  gboolean eps = strcmp (s->c.prediction_type, "epsilon") == 0;
  gboolean smp = strcmp (s->c.prediction_type, "sample") == 0;
  float lo = -p->clip_sample_range, hi = p->clip_sample_range;

  gboolean last = (guint) s->step_index == s->num_inference_steps - 1;
  g_autofree float *noise = NULL;
  if (!last) {
    noise = g_new (float, n);
    if (!sched_draw_noise (s, rng, noise, n, error))
      return FALSE;
  }
  float sa_prev = sqrtf (a_prev), sb_prev = sqrtf (b_prev);
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
    float denoised = c_out * x0 + c_skip * x[i];
    x[i] = last ? denoised : sa_prev * denoised + sb_prev * noise[i];
  }
  return TRUE;
}

const SchedClass _diffuse_sched_lcm = {
  .name = "LCMScheduler",
  .order = 1,
  .has_begin_index = TRUE,
  .index_kind = SCHED_INDEX_SECOND_IF_DUP,
  .noise_kind = SCHED_NOISE_ALPHAS_CUMPROD,
  .init = lcm_init,
  .set_timesteps = lcm_set_timesteps,
  .scale_model_input = NULL,
  .step = lcm_step,
  .free_priv = g_free,
};

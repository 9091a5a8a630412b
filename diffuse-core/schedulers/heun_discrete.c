/* gst-diffuse — HeunDiscreteScheduler (diffusers scheduling_heun_discrete.py):
 * order 2, every inner timestep listed twice. */
#include "sched-private.h"

typedef struct {
  gboolean karras, exponential;
  double sigma_min, sigma_max;
  gboolean clip_sample;
  float clip_sample_range;
  /* second-order state: dt "is None" when !have_dt */
  gboolean have_dt;
  float dt;
  float *prev_derivative;
  float *sample;
  size_t n;
} HeunPriv;

static const char *const heun_predictions[] = { "epsilon", "v_prediction", "sample", NULL };

float _diffuse_sched_euler_init_sigma (DiffuseScheduler *s);
void _diffuse_sched_sigma_scale_input (DiffuseScheduler *s, float *x, size_t n);

static void
heun_free (gpointer data)
{
  HeunPriv *p = data;
  g_free (p->prev_derivative);
  g_free (p->sample);
  g_free (p);
}

static gboolean
heun_init (DiffuseScheduler *s, SchedCfg *r, GError **error)
{
  static const SchedCommon def = { 1000, 0.00085, 0.012, "linear", "epsilon", "linspace", 0, FALSE };
  HeunPriv *p = g_new0 (HeunPriv, 1);
  s->priv = p;
  sched_read_common (r, &s->c, &def);
  s->c.rescale_betas_zero_snr = FALSE;   /* not a Heun option */
  p->karras = sched_cfg_bool (r, "use_karras_sigmas", FALSE);
  p->exponential = sched_cfg_bool (r, "use_exponential_sigmas", FALSE);
  sched_cfg_require_false (r, "use_beta_sigmas");
  p->sigma_min = sched_cfg_optional_double (r, "sigma_min");
  p->sigma_max = sched_cfg_optional_double (r, "sigma_max");
  p->clip_sample = sched_cfg_bool (r, "clip_sample", FALSE);
  p->clip_sample_range = (float) sched_cfg_double (r, "clip_sample_range", 1.0);
  if (!r->ok)
    return FALSE;
  if (p->karras && p->exponential) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                 "%s: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used",
                 diffuse_config_label (s->config));
    return FALSE;
  }
  return sched_check_prediction (s, heun_predictions, error) && sched_init_betas (s, FALSE, TRUE, error);
}

static gboolean
heun_set_timesteps (DiffuseScheduler *s, guint n_steps, GError **error)
{
  HeunPriv *p = s->priv;
  guint T = (guint) s->c.num_train_timesteps;
  guint nt = 0;
  g_autofree double *ts = sched_spacing_timesteps_f32 (s, n_steps, &nt, error);
  g_autofree float *train = sched_train_sigmas (s);
  g_autofree float *log_sigmas = sched_log_f32 (train, T);
  g_autofree double *sig = g_new (double, MAX (nt, n_steps) + 1);
  for (guint i = 0; i < nt; i++)
    sig[i] = np_interp_index (ts[i], train, T);
  guint ns = nt;
  if (p->karras || p->exponential) {
    double smin = isnan (p->sigma_min) ? sig[ns - 1] : p->sigma_min;
    double smax = isnan (p->sigma_max) ? sig[0] : p->sigma_max;
    if (p->karras)
      sched_karras (smin, smax, n_steps, sig);
    else
      sched_exponential (smin, smax, n_steps, sig);
    ns = nt = n_steps;
    g_free (ts);
    ts = g_new (double, nt);
    for (guint i = 0; i < nt; i++)
      ts[i] = sched_sigma_to_t (sig[i], log_sigmas, T);
  }
  /* sigmas: s[:1], s[1:-1] twice each, s[-1:] with s = sigmas + [0] */
  guint n_all = ns + 1;
  g_autofree float *base = g_new (float, n_all);
  for (guint i = 0; i < ns; i++)
    base[i] = (float) sig[i];
  base[ns] = 0.0f;
  guint n_sig = 2 + 2 * (n_all - 2);
  float *sigmas = g_new (float, n_sig);
  guint k = 0;
  sigmas[k++] = base[0];
  for (guint i = 1; i + 1 < n_all; i++) {
    sigmas[k++] = base[i];
    sigmas[k++] = base[i];
  }
  sigmas[k++] = base[n_all - 1];
  /* timesteps: t[:1], t[1:] twice each, float32 */
  guint n_ts = 1 + 2 * (nt - 1);
  double *tsd = g_new (double, n_ts);
  k = 0;
  tsd[k++] = (float) ts[0];
  for (guint i = 1; i < nt; i++) {
    tsd[k++] = (float) ts[i];
    tsd[k++] = (float) ts[i];
  }
  s->num_inference_steps = n_steps;
  sched_set_schedule (s, tsd, n_ts, sigmas, n_sig);
  s->init_noise_sigma = _diffuse_sched_euler_init_sigma (s);
  p->have_dt = FALSE;
  g_clear_pointer (&p->prev_derivative, g_free);
  g_clear_pointer (&p->sample, g_free);
  p->n = 0;
  return TRUE;
}

static gboolean
heun_step (DiffuseScheduler *s, const float *mo, float *x, size_t n, DiffuseRng *rng, GError **error)
{
  HeunPriv *p = s->priv;
  if (p->n != n) {
    g_free (p->prev_derivative);
    g_free (p->sample);
    p->prev_derivative = g_new0 (float, n);
    p->sample = g_new0 (float, n);
    p->n = n;
    p->have_dt = FALSE;
  }
  gboolean first = !p->have_dt;
  if (!first && s->step_index < 1) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s: second-order step without a first", s->klass->name);
    return FALSE;
  }
  float sigma = first ? s->sigmas[s->step_index] : s->sigmas[s->step_index - 1];
  float sigma_next = first ? s->sigmas[s->step_index + 1] : s->sigmas[s->step_index];
  float sigma_hat = sigma * 1.0f;
  float sigma_input = first ? sigma_hat : sigma_next;
  const char *pt = s->c.prediction_type;
  int kind = strcmp (pt, "epsilon") == 0 ? 0 : strcmp (pt, "v_prediction") == 0 ? 1 : 2;
  float c_v = -sigma_input / sqrtf (sigma_input * sigma_input + 1.0f);
  float d_v = sigma_input * sigma_input + 1.0f;
  float lo = -p->clip_sample_range, hi = p->clip_sample_range;
  float dt = first ? sigma_next - sigma_hat : p->dt;

  for (size_t i = 0; i < n; i++) {
    float x0;
    if (kind == 0)
      x0 = x[i] - sigma_input * mo[i];
    else if (kind == 1)
      x0 = mo[i] * c_v + x[i] / d_v;
    else
      x0 = mo[i];
    if (p->clip_sample)
      x0 = x0 < lo ? lo : (x0 > hi ? hi : x0);
    if (first) {
      float d = (x[i] - x0) / sigma_hat;
      p->prev_derivative[i] = d;
      p->sample[i] = x[i];
      x[i] = x[i] + d * dt;
    } else {
      float d = (x[i] - x0) / sigma_next;
      d = (p->prev_derivative[i] + d) / 2.0f;
      x[i] = p->sample[i] + d * dt;
    }
  }
  if (first) {
    p->dt = dt;
    p->have_dt = TRUE;
  } else {
    p->have_dt = FALSE;
  }
  return TRUE;
}

const SchedClass _diffuse_sched_heun = {
  .name = "HeunDiscreteScheduler",
  .order = 2,
  .has_begin_index = TRUE,
  .index_kind = SCHED_INDEX_SECOND_IF_DUP,
  .noise_kind = SCHED_NOISE_SIGMA,
  .init = heun_init,
  .set_timesteps = heun_set_timesteps,
  .scale_model_input = _diffuse_sched_sigma_scale_input,
  .step = heun_step,
  .free_priv = heun_free,
};

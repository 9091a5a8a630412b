/* gst-diffuse — EulerDiscreteScheduler (diffusers scheduling_euler_discrete.py). */
#include "sched-private.h"

typedef struct {
  gboolean log_linear;          /* interpolation_type */
  gboolean karras, exponential;
  double sigma_min, sigma_max;  /* NAN = None */
  gboolean continuous_v;        /* timestep_type continuous with v_prediction */
  gboolean final_sigma_min;     /* final_sigmas_type */
} EulerPriv;

static const char *const euler_predictions[] = { "epsilon", "v_prediction", "sample", "original_sample", NULL };
static const char *const interpolations[] = { "linear", "log_linear", NULL };
static const char *const timestep_types[] = { "discrete", "continuous", NULL };
static const char *const final_types[] = { "zero", "sigma_min", NULL };

static gboolean
euler_init (DiffuseScheduler *s, SchedCfg *r, GError **error)
{
  static const SchedCommon def = { 1000, 0.0001, 0.02, "linear", "epsilon", "linspace", 0, FALSE };
  EulerPriv *p = g_new0 (EulerPriv, 1);
  s->priv = p;
  sched_read_common (r, &s->c, &def);
  p->log_linear = strcmp (sched_cfg_choice (r, "interpolation_type", "linear", interpolations), "log_linear") == 0;
  p->karras = sched_cfg_bool (r, "use_karras_sigmas", FALSE);
  p->exponential = sched_cfg_bool (r, "use_exponential_sigmas", FALSE);
  sched_cfg_require_false (r, "use_beta_sigmas");
  p->sigma_min = sched_cfg_optional_double (r, "sigma_min");
  p->sigma_max = sched_cfg_optional_double (r, "sigma_max");
  const char *tt = sched_cfg_choice (r, "timestep_type", "discrete", timestep_types);
  p->final_sigma_min = strcmp (sched_cfg_choice (r, "final_sigmas_type", "zero", final_types), "sigma_min") == 0;
  if (!r->ok)
    return FALSE;
  if (p->karras && p->exponential) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                 "%s: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used",
                 diffuse_config_label (s->config));
    return FALSE;
  }
  if (!sched_check_prediction (s, euler_predictions, error) || !sched_init_betas (s, TRUE, FALSE, error))
    return FALSE;
  p->continuous_v = strcmp (tt, "continuous") == 0 && strcmp (s->c.prediction_type, "v_prediction") == 0;
  if (s->c.rescale_betas_zero_snr)
    s->alphas_cumprod[s->c.num_train_timesteps - 1] = 1.0f / 16777216.0f;   /* 2 ** -24 */
  return TRUE;
}

/* init_noise_sigma of the Euler family */
float _diffuse_sched_euler_init_sigma (DiffuseScheduler *s);

float
_diffuse_sched_euler_init_sigma (DiffuseScheduler *s)
{
  float m = 0;
  for (guint i = 0; i < s->n_sigmas; i++)
    if (s->sigmas[i] > m || i == 0)
      m = s->sigmas[i];
  if (strcmp (s->c.timestep_spacing, "leading") != 0)
    return m;
  return sqrtf (m * m + 1.0f);
}

static gboolean
euler_set_timesteps (DiffuseScheduler *s, guint n_steps, GError **error)
{
  EulerPriv *p = s->priv;
  guint T = (guint) s->c.num_train_timesteps;
  guint nt = 0;
  double *ts = sched_spacing_timesteps_f32 (s, n_steps, &nt, error);
  g_autofree float *train = sched_train_sigmas (s);
  g_autofree float *log_sigmas = sched_log_f32 (train, T);

  guint ns;
  double *sig;
  if (!p->log_linear) {
    ns = nt;
    sig = g_new (double, ns + 1);
    for (guint i = 0; i < nt; i++)
      sig[i] = np_interp_index (ts[i], train, T);
  } else {
    /* torch.linspace (log (sigmas[-1]), log (sigmas[0]), n + 1).exp () in float32 */
    ns = n_steps + 1;
    sig = g_new (double, ns + 1);
    float a = log_sigmas[T - 1], b = log_sigmas[0];
    float step = ns > 1 ? (b - a) / (float) (ns - 1) : 0;
    for (guint i = 0; i < ns; i++) {
      float v = i < ns / 2 ? fmaf (step, (float) i, a) : fmaf (-step, (float) (ns - 1 - i), b);
      sig[i] = expf (v);
    }
  }
  if (p->karras || p->exponential) {
    double smin = isnan (p->sigma_min) ? sig[ns - 1] : p->sigma_min;
    double smax = isnan (p->sigma_max) ? sig[0] : p->sigma_max;
    if (p->karras)
      sched_karras (smin, smax, n_steps, sig);
    else
      sched_exponential (smin, smax, n_steps, sig);
    ns = n_steps;
    g_free (ts);
    ts = g_new (double, ns);
    for (guint i = 0; i < ns; i++)
      ts[i] = sched_sigma_to_t (sig[i], log_sigmas, T);
    nt = ns;
  }
  float *sigmas = g_new (float, ns + 1);
  for (guint i = 0; i < ns; i++)
    sigmas[i] = (float) sig[i];
  if (p->final_sigma_min) {
    float ac = s->alphas_cumprod[0];
    sigmas[ns] = sqrtf ((1.0f - ac) / ac);
  } else {
    sigmas[ns] = 0.0f;
  }
  g_free (sig);

  if (p->continuous_v) {
    g_free (ts);
    nt = ns;
    ts = g_new (double, nt);
    for (guint i = 0; i < nt; i++)
      ts[i] = 0.25f * logf (sigmas[i]);
  } else {
    for (guint i = 0; i < nt; i++)
      ts[i] = (float) ts[i];
  }
  s->num_inference_steps = n_steps;
  sched_set_schedule (s, ts, nt, sigmas, ns + 1);
  s->init_noise_sigma = _diffuse_sched_euler_init_sigma (s);
  return TRUE;
}

/* sample / ((sigma ** 2 + 1) ** 0.5) at the step index: Euler, Euler a, LMS, Heun */
void _diffuse_sched_sigma_scale_input (DiffuseScheduler *s, float *x, size_t n);

void
_diffuse_sched_sigma_scale_input (DiffuseScheduler *s, float *x, size_t n)
{
  float sigma = s->sigmas[s->step_index];
  float d = sqrtf (sigma * sigma + 1.0f);
  for (size_t i = 0; i < n; i++)
    x[i] = x[i] / d;
}

static gboolean
euler_step (DiffuseScheduler *s, const float *mo, float *x, size_t n, DiffuseRng *rng, GError **error)
{
  float sigma = s->sigmas[s->step_index];
  float sigma_hat = sigma * 1.0f;    /* gamma = 0: s_churn is not exposed */
  float dt = s->sigmas[s->step_index + 1] - sigma_hat;
  const char *pt = s->c.prediction_type;
  int kind = strcmp (pt, "epsilon") == 0 ? 0 : strcmp (pt, "v_prediction") == 0 ? 1 : 2;
  float c_v = -sigma / sqrtf (sigma * sigma + 1.0f);
  float d_v = sigma * sigma + 1.0f;
  for (size_t i = 0; i < n; i++) {
    float x0;
    if (kind == 0)
      x0 = x[i] - sigma_hat * mo[i];
    else if (kind == 1)
      x0 = mo[i] * c_v + x[i] / d_v;
    else
      x0 = mo[i];
    float deriv = (x[i] - x0) / sigma_hat;
    x[i] = x[i] + deriv * dt;
  }
  return TRUE;
}

const SchedClass _diffuse_sched_euler = {
  .name = "EulerDiscreteScheduler",
  .order = 1,
  .has_begin_index = TRUE,
  .index_kind = SCHED_INDEX_SECOND_IF_DUP,
  .noise_kind = SCHED_NOISE_SIGMA,
  .init = euler_init,
  .set_timesteps = euler_set_timesteps,
  .scale_model_input = _diffuse_sched_sigma_scale_input,
  .step = euler_step,
  .free_priv = g_free,
};

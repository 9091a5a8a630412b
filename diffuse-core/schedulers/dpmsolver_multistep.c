/* gst-diffuse — DPMSolverMultistepScheduler (diffusers
 * scheduling_dpmsolver_multistep.py): dpmsolver++ / dpmsolver and their SDE
 * variants, solver orders 1-3.  Scalars are float32 0-d tensors in
 * diffusers, so they are floats here. */
#include "sched-private.h"

typedef enum { ALG_DPMPP, ALG_DPM, ALG_SDE_DPMPP, ALG_SDE_DPM } DpmAlgorithm;

typedef struct {
  guint solver_order;
  DpmAlgorithm algorithm;
  gboolean heun;                 /* solver_type heun (else midpoint) */
  gboolean lower_order_final;
  gboolean euler_at_final;
  gboolean karras, exponential, lu_lambdas;
  double sigma_min, sigma_max;   /* hidden config keys, NAN = None */
  gboolean final_sigma_min;
  double lambda_min_clipped;
  /* run */
  float *outputs[3];             /* model_outputs, oldest first; NULL = None */
  guint lower_order_nums;
  float *noise;
  size_t n;
} DpmPriv;

static const char *const dpm_predictions[] = { "epsilon", "sample", "v_prediction", NULL };
static const char *const final_types[] = { "zero", "sigma_min", NULL };

static void
dpm_clear (DpmPriv *p)
{
  for (guint i = 0; i < 3; i++)
    g_clear_pointer (&p->outputs[i], g_free);
  g_clear_pointer (&p->noise, g_free);
  p->lower_order_nums = 0;
  p->n = 0;
}

static void
dpm_free (gpointer data)
{
  dpm_clear (data);
  g_free (data);
}

static gboolean
dpm_init (DiffuseScheduler *s, SchedCfg *r, GError **error)
{
  static const SchedCommon def = { 1000, 0.0001, 0.02, "linear", "epsilon", "linspace", 0, FALSE };
  DpmPriv *p = g_new0 (DpmPriv, 1);
  s->priv = p;
  const char *label = diffuse_config_label (s->config);
  sched_read_common (r, &s->c, &def);
  gint64 order = sched_cfg_int (r, "solver_order", 2);
  const char *alg = sched_cfg_string (r, "algorithm_type", "dpmsolver++");
  const char *st = sched_cfg_string (r, "solver_type", "midpoint");
  p->lower_order_final = sched_cfg_bool (r, "lower_order_final", TRUE);
  p->euler_at_final = sched_cfg_bool (r, "euler_at_final", FALSE);
  p->karras = sched_cfg_bool (r, "use_karras_sigmas", FALSE);
  p->exponential = sched_cfg_bool (r, "use_exponential_sigmas", FALSE);
  p->lu_lambdas = sched_cfg_bool (r, "use_lu_lambdas", FALSE);
  sched_cfg_require_false (r, "use_beta_sigmas");
  sched_cfg_require_false (r, "use_flow_sigmas");
  sched_cfg_require_false (r, "use_dynamic_shifting");
  sched_cfg_require_false (r, "thresholding");
  p->sigma_min = sched_cfg_optional_double (r, "sigma_min");
  p->sigma_max = sched_cfg_optional_double (r, "sigma_max");
  p->final_sigma_min = strcmp (sched_cfg_choice (r, "final_sigmas_type", "zero", final_types), "sigma_min") == 0;
  p->lambda_min_clipped = sched_cfg_double (r, "lambda_min_clipped", -INFINITY);
  const char *variance_type = sched_cfg_string (r, "variance_type", NULL);
  if (!r->ok)
    return FALSE;
  if (variance_type != NULL) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: variance_type \"%s\" is not supported", label,
                 variance_type);
    return FALSE;
  }
  if (order < 1 || order > 3) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: solver_order %" G_GINT64_FORMAT
                 " is not supported (1, 2 or 3)", label, order);
    return FALSE;
  }
  p->solver_order = (guint) order;
  if ((int) p->karras + (int) p->exponential > 1) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                 "%s: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used", label);
    return FALSE;
  }
  if (strcmp (alg, "dpmsolver++") == 0 || strcmp (alg, "deis") == 0)
    p->algorithm = ALG_DPMPP;        /* diffusers maps deis to dpmsolver++ */
  else if (strcmp (alg, "dpmsolver") == 0)
    p->algorithm = ALG_DPM;
  else if (strcmp (alg, "sde-dpmsolver++") == 0)
    p->algorithm = ALG_SDE_DPMPP;
  else if (strcmp (alg, "sde-dpmsolver") == 0)
    p->algorithm = ALG_SDE_DPM;
  else {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: algorithm_type \"%s\" is not supported", label,
                 alg);
    return FALSE;
  }
  if (strcmp (st, "heun") == 0)
    p->heun = TRUE;
  else if (strcmp (st, "midpoint") == 0 || strcmp (st, "logrho") == 0 || strcmp (st, "bh1") == 0 ||
           strcmp (st, "bh2") == 0)
    p->heun = FALSE;                 /* diffusers maps the UniPC/DEIS types to midpoint */
  else {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: solver_type \"%s\" is not supported", label, st);
    return FALSE;
  }
  /* diffusers checks the name as given (so "deis" needs sigma_min too) */
  if (strcmp (alg, "dpmsolver++") != 0 && strcmp (alg, "sde-dpmsolver++") != 0 && !p->final_sigma_min) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                 "%s: final_sigmas_type \"zero\" is not supported for algorithm_type \"%s\"; use \"sigma_min\"", label,
                 alg);
    return FALSE;
  }
  if (p->algorithm == ALG_SDE_DPM && p->solver_order == 3) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                 "%s: sde-dpmsolver has no third-order update (diffusers fails there too)", label);
    return FALSE;
  }
  if (!sched_check_prediction (s, dpm_predictions, error) || !sched_init_betas (s, TRUE, FALSE, error))
    return FALSE;
  if (s->c.rescale_betas_zero_snr)
    s->alphas_cumprod[s->c.num_train_timesteps - 1] = 1.0f / 16777216.0f;
  return TRUE;
}

/* The integer timesteps of DPM-Solver / UniPC: n+1 points with the last
 * (0) dropped, from `last` (the clipped end) for linspace/leading/trailing. */
double *_diffuse_sched_multistep_timesteps (DiffuseScheduler *s, guint n_steps, gint64 last, guint *len);

double *
_diffuse_sched_multistep_timesteps (DiffuseScheduler *s, guint n_steps, gint64 last, guint *len)
{
  guint T = (guint) s->c.num_train_timesteps;
  const char *sp = s->c.timestep_spacing;
  double *ts;
  if (g_strcmp0 (sp, "linspace") == 0) {
    g_autofree double *lin = g_new (double, n_steps + 1);
    np_linspace (0, (double) (last - 1), n_steps + 1, TRUE, lin);
    ts = g_new (double, n_steps);
    for (guint i = 0; i < n_steps; i++)
      ts[i] = (double) (gint64) np_round (lin[n_steps - i]);
    *len = n_steps;
  } else if (g_strcmp0 (sp, "leading") == 0) {
    gint64 ratio = last / (n_steps + 1);
    ts = g_new (double, n_steps);
    for (guint i = 0; i < n_steps; i++)
      ts[i] = (double) ((gint64) (n_steps - i) * ratio + s->c.steps_offset);
    *len = n_steps;
  } else {
    guint n = 0;
    ts = np_arange ((double) last, 0, -((double) T / n_steps), &n);
    for (guint i = 0; i < n; i++)
      ts[i] = (double) ((gint64) np_round (ts[i]) - 1);
    *len = n;
  }
  return ts;
}

static gboolean
dpm_set_timesteps (DiffuseScheduler *s, guint n_steps, GError **error)
{
  DpmPriv *p = s->priv;
  guint T = (guint) s->c.num_train_timesteps;

  /* clipped_idx = searchsorted (flip (lambda_t), lambda_min_clipped) */
  guint clipped = 0;
  for (guint i = 0; i < T; i++) {
    float ac = s->alphas_cumprod[T - 1 - i];
    float lam = logf (sqrtf (ac)) - logf (sqrtf (1.0f - ac));
    if ((double) lam < p->lambda_min_clipped)
      clipped++;
    else
      break;
  }
  gint64 last = (gint64) T - clipped;
  if (last < 1) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: lambda_min_clipped leaves no timestep",
                 s->klass->name);
    return FALSE;
  }
  guint nt = 0;
  double *ts = _diffuse_sched_multistep_timesteps (s, n_steps, last, &nt);
  g_autofree float *train = sched_train_sigmas (s);
  g_autofree float *log_sigmas = sched_log_f32 (train, T);
  gboolean round_ts = strcmp (s->c.beta_schedule, "squaredcos_cap_v2") != 0;
  guint ns;
  g_autofree double *sig = NULL;
  if (p->karras || p->exponential) {
    double smin = isnan (p->sigma_min) ? train[0] : p->sigma_min;      /* flipped: [-1] is the smallest */
    double smax = isnan (p->sigma_max) ? train[T - 1] : p->sigma_max;
    ns = n_steps;
    sig = g_new (double, ns);
    if (p->karras)
      sched_karras (smin, smax, ns, sig);
    else
      sched_exponential (smin, smax, ns, sig);
    g_free (ts);
    ts = g_new (double, ns);
    for (guint i = 0; i < ns; i++) {
      double t = sched_sigma_to_t (sig[i], log_sigmas, T);
      if (p->karras && round_ts)
        t = np_round (t);
      ts[i] = t;
    }
    nt = ns;
  } else if (p->lu_lambdas) {
    double lmin = log_sigmas[0], lmax = log_sigmas[T - 1];
    ns = n_steps;
    sig = g_new (double, ns);
    np_linspace (0, 1, ns, TRUE, sig);
    for (guint i = 0; i < ns; i++)
      sig[i] = exp (pow (pow (lmax, 1.0) + sig[i] * (pow (lmin, 1.0) - pow (lmax, 1.0)), 1.0));
    g_free (ts);
    ts = g_new (double, ns);
    for (guint i = 0; i < ns; i++) {
      double t = sched_sigma_to_t (sig[i], log_sigmas, T);
      ts[i] = round_ts ? np_round (t) : t;
    }
    nt = ns;
  } else {
    ns = nt;
    sig = g_new (double, ns);
    for (guint i = 0; i < ns; i++)
      sig[i] = np_interp_index (ts[i], train, T);
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
  for (guint i = 0; i < nt; i++)
    ts[i] = (double) (gint64) ts[i];      /* .to (torch.int64) truncates */
  s->num_inference_steps = nt;
  sched_set_schedule (s, ts, nt, sigmas, ns + 1);
  s->init_noise_sigma = 1.0f;
  dpm_clear (p);
  return TRUE;
}

static inline void
alpha_sigma (float sigma, float *alpha_t, float *sigma_t)
{
  *alpha_t = 1.0f / sqrtf (sigma * sigma + 1.0f);
  *sigma_t = sigma * *alpha_t;
}

static inline float
lambda_of (float alpha, float sigma)
{
  return logf (alpha) - logf (sigma);
}

static gboolean
dpm_step (DiffuseScheduler *s, const float *mo, float *x, size_t n, DiffuseRng *rng, GError **error)
{
  DpmPriv *p = s->priv;
  if (p->n != n) {
    dpm_clear (p);
    p->n = n;
  }
  gint idx = s->step_index;
  guint nts = s->n_timesteps;
  gboolean lof = (guint) idx == nts - 1 &&
                 (p->euler_at_final || (p->lower_order_final && nts < 15) || !p->final_sigma_min);
  gboolean los = (guint) idx == nts - 2 && p->lower_order_final && nts < 15;
  gboolean plus = p->algorithm == ALG_DPMPP || p->algorithm == ALG_SDE_DPMPP;
  gboolean sde = p->algorithm == ALG_SDE_DPMPP || p->algorithm == ALG_SDE_DPM;
  guint order = p->solver_order;

  /* convert_model_output */
  float a_s, s_s;
  alpha_sigma (s->sigmas[idx], &a_s, &s_s);
  const char *pt = s->c.prediction_type;
  int kind = strcmp (pt, "epsilon") == 0 ? 0 : strcmp (pt, "sample") == 0 ? 1 : 2;
  /* the oldest output leaves the window: its buffer is reused */
  float *conv = p->outputs[0] ? p->outputs[0] : g_new (float, n);
  for (size_t i = 0; i < n; i++) {
    float v;
    if (plus)
      v = kind == 0 ? (x[i] - s_s * mo[i]) / a_s : kind == 1 ? mo[i] : a_s * x[i] - s_s * mo[i];
    else
      v = kind == 0 ? mo[i] : kind == 1 ? (x[i] - a_s * mo[i]) / s_s : a_s * mo[i] + s_s * x[i];
    conv[i] = v;
  }
  /* model_outputs[i] = model_outputs[i + 1]; model_outputs[-1] = conv */
  for (guint i = 0; i + 1 < order; i++)
    p->outputs[i] = p->outputs[i + 1];
  p->outputs[order - 1] = conv;

  if (sde) {
    if (!p->noise)
      p->noise = g_new (float, n);
    if (!sched_draw_noise (s, rng, p->noise, n, error))
      return FALSE;
  }
  const float *noise = p->noise;

  float a_t, s_t, a_s0, s_s0;
  alpha_sigma (s->sigmas[idx + 1], &a_t, &s_t);
  alpha_sigma (s->sigmas[idx], &a_s0, &s_s0);
  float l_t = lambda_of (a_t, s_t), l_s0 = lambda_of (a_s0, s_s0);
  float h = l_t - l_s0;

  if (order == 1 || p->lower_order_nums < 1 || lof) {
    const float *m = p->outputs[order - 1];
    if (p->algorithm == ALG_DPMPP) {
      float c1 = s_t / s_s0, c2 = a_t * (expf (-h) - 1.0f);
      for (size_t i = 0; i < n; i++)
        x[i] = c1 * x[i] - c2 * m[i];
    } else if (p->algorithm == ALG_DPM) {
      float c1 = a_t / a_s0, c2 = s_t * (expf (h) - 1.0f);
      for (size_t i = 0; i < n; i++)
        x[i] = c1 * x[i] - c2 * m[i];
    } else if (p->algorithm == ALG_SDE_DPMPP) {
      float c1 = s_t / s_s0 * expf (-h), c2 = a_t * (1.0f - expf (-2.0f * h));
      float c3 = s_t * sqrtf (1.0f - expf (-2.0f * h));
      for (size_t i = 0; i < n; i++)
        x[i] = (c1 * x[i] + c2 * m[i]) + c3 * noise[i];
    } else {
      float c1 = a_t / a_s0, c2 = 2.0f * (s_t * (expf (h) - 1.0f));
      float c3 = s_t * sqrtf (expf (2.0f * h) - 1.0f);
      for (size_t i = 0; i < n; i++)
        x[i] = (c1 * x[i] - c2 * m[i]) + c3 * noise[i];
    }
  } else if (order == 2 || p->lower_order_nums < 2 || los) {
    const float *m0 = p->outputs[order - 1], *m1 = p->outputs[order - 2];
    float a_s1, s_s1;
    alpha_sigma (s->sigmas[idx - 1], &a_s1, &s_s1);
    float l_s1 = lambda_of (a_s1, s_s1);
    float h0 = l_s0 - l_s1;
    float r0 = h0 / h;
    float inv_r0 = 1.0f / r0;
    float c1, c2, c3, c4 = 0;
    gboolean minus3 = TRUE;   /* x_t = c1*x -/+ c2*D0 -/+ c3*D1 (+ c4*noise) */
    gboolean minus2 = TRUE;
    switch (p->algorithm) {
    case ALG_DPMPP:
      c1 = s_t / s_s0;
      c2 = a_t * (expf (-h) - 1.0f);
      if (!p->heun) {
        c3 = 0.5f * (a_t * (expf (-h) - 1.0f));
      } else {
        c3 = a_t * ((expf (-h) - 1.0f) / h + 1.0f);
        minus3 = FALSE;
      }
      break;
    case ALG_DPM:
      c1 = a_t / a_s0;
      c2 = s_t * (expf (h) - 1.0f);
      c3 = !p->heun ? 0.5f * (s_t * (expf (h) - 1.0f)) : s_t * ((expf (h) - 1.0f) / h - 1.0f);
      break;
    case ALG_SDE_DPMPP:
      c1 = s_t / s_s0 * expf (-h);
      c2 = a_t * (1.0f - expf (-2.0f * h));
      c3 = !p->heun ? 0.5f * (a_t * (1.0f - expf (-2.0f * h)))
                    : a_t * ((1.0f - expf (-2.0f * h)) / (-2.0f * h) + 1.0f);
      c4 = s_t * sqrtf (1.0f - expf (-2.0f * h));
      minus2 = minus3 = FALSE;
      break;
    default:
      c1 = a_t / a_s0;
      c2 = 2.0f * (s_t * (expf (h) - 1.0f));
      c3 = !p->heun ? s_t * (expf (h) - 1.0f) : 2.0f * (s_t * ((expf (h) - 1.0f) / h - 1.0f));
      c4 = s_t * sqrtf (expf (2.0f * h) - 1.0f);
      break;
    }
    for (size_t i = 0; i < n; i++) {
      float d1 = inv_r0 * (m0[i] - m1[i]);
      float v = c1 * x[i];
      v = minus2 ? v - c2 * m0[i] : v + c2 * m0[i];
      v = minus3 ? v - c3 * d1 : v + c3 * d1;
      if (sde)
        v = v + c4 * noise[i];
      x[i] = v;
    }
  } else {
    const float *m0 = p->outputs[2], *m1 = p->outputs[1], *m2 = p->outputs[0];
    float a_s1, s_s1, a_s2, s_s2;
    alpha_sigma (s->sigmas[idx - 1], &a_s1, &s_s1);
    alpha_sigma (s->sigmas[idx - 2], &a_s2, &s_s2);
    float l_s1 = lambda_of (a_s1, s_s1), l_s2 = lambda_of (a_s2, s_s2);
    float h0 = l_s0 - l_s1, h1 = l_s1 - l_s2;
    float r0 = h0 / h, r1 = h1 / h;
    float i0 = 1.0f / r0, i1 = 1.0f / r1;
    float k1 = r0 / (r0 + r1), k2 = 1.0f / (r0 + r1);
    float c1, c2, c3, c4, c5 = 0;
    if (p->algorithm == ALG_DPMPP) {
      c1 = s_t / s_s0;
      c2 = a_t * (expf (-h) - 1.0f);
      c3 = a_t * ((expf (-h) - 1.0f) / h + 1.0f);
      c4 = a_t * (((expf (-h) - 1.0f) + h) / (h * h) - 0.5f);
    } else if (p->algorithm == ALG_DPM) {
      c1 = a_t / a_s0;
      c2 = s_t * (expf (h) - 1.0f);
      c3 = s_t * ((expf (h) - 1.0f) / h - 1.0f);
      c4 = s_t * (((expf (h) - 1.0f) - h) / (h * h) - 0.5f);
    } else {
      c1 = s_t / s_s0 * expf (-h);
      c2 = a_t * (1.0f - expf (-2.0f * h));
      c3 = a_t * ((1.0f - expf (-2.0f * h)) / (-2.0f * h) + 1.0f);
      float h2 = 2.0f * h;
      c4 = a_t * (((1.0f - expf (-2.0f * h)) - 2.0f * h) / (h2 * h2) - 0.5f);
      c5 = s_t * sqrtf (1.0f - expf (-2.0f * h));
    }
    for (size_t i = 0; i < n; i++) {
      float d10 = i0 * (m0[i] - m1[i]);
      float d11 = i1 * (m1[i] - m2[i]);
      float d1 = d10 + k1 * (d10 - d11);
      float d2 = k2 * (d10 - d11);
      float v;
      if (p->algorithm == ALG_DPMPP)
        v = ((c1 * x[i] - c2 * m0[i]) + c3 * d1) - c4 * d2;
      else if (p->algorithm == ALG_DPM)
        v = ((c1 * x[i] - c2 * m0[i]) - c3 * d1) - c4 * d2;
      else
        v = (((c1 * x[i] + c2 * m0[i]) + c3 * d1) + c4 * d2) + c5 * noise[i];
      x[i] = v;
    }
  }
  if (p->lower_order_nums < order)
    p->lower_order_nums++;
  return TRUE;
}

const SchedClass _diffuse_sched_dpm_multistep = {
  .name = "DPMSolverMultistepScheduler",
  .order = 1,
  .has_begin_index = TRUE,
  .index_kind = SCHED_INDEX_LAST_IF_NONE,
  .noise_kind = SCHED_NOISE_ALPHA_SIGMA,
  .init = dpm_init,
  .set_timesteps = dpm_set_timesteps,
  .scale_model_input = NULL,
  .step = dpm_step,
  .free_priv = dpm_free,
};

/* gst-diffuse — LMSDiscreteScheduler (diffusers scheduling_lms_discrete.py).
 *
 * The multistep coefficients are integrals of Lagrange polynomials that
 * diffusers computes with scipy.integrate.quad; for a polynomial of degree
 * <= 3 QUADPACK's first 21-point Gauss-Kronrod pass is accepted, so that
 * rule is applied here, to an integrand evaluated in float32 as the torch
 * code does. */
#include "sched-private.h"

#define LMS_MAX_ORDER 4

typedef struct {
  gboolean karras, exponential;
  double sigma_min, sigma_max;
  float *derivs[LMS_MAX_ORDER];   /* oldest first */
  guint n_derivs;
  size_t n;
} LmsPriv;

static const char *const lms_predictions[] = { "epsilon", "v_prediction", "sample", NULL };

float _diffuse_sched_euler_init_sigma (DiffuseScheduler *s);
void _diffuse_sched_sigma_scale_input (DiffuseScheduler *s, float *x, size_t n);

static void
lms_clear (LmsPriv *p)
{
  for (guint i = 0; i < LMS_MAX_ORDER; i++)
    g_clear_pointer (&p->derivs[i], g_free);
  p->n_derivs = 0;
  p->n = 0;
}

static void
lms_free (gpointer data)
{
  lms_clear (data);
  g_free (data);
}

static gboolean
lms_init (DiffuseScheduler *s, SchedCfg *r, GError **error)
{
  static const SchedCommon def = { 1000, 0.0001, 0.02, "linear", "epsilon", "linspace", 0, FALSE };
  LmsPriv *p = g_new0 (LmsPriv, 1);
  s->priv = p;
  sched_read_common (r, &s->c, &def);
  s->c.rescale_betas_zero_snr = FALSE;   /* not an LMS option */
  p->karras = sched_cfg_bool (r, "use_karras_sigmas", FALSE);
  p->exponential = sched_cfg_bool (r, "use_exponential_sigmas", FALSE);
  sched_cfg_require_false (r, "use_beta_sigmas");
  p->sigma_min = sched_cfg_optional_double (r, "sigma_min");
  p->sigma_max = sched_cfg_optional_double (r, "sigma_max");
  if (!r->ok)
    return FALSE;
  if (p->karras && p->exponential) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                 "%s: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used",
                 diffuse_config_label (s->config));
    return FALSE;
  }
  return sched_check_prediction (s, lms_predictions, error) && sched_init_betas (s, FALSE, FALSE, error);
}

static gboolean
lms_set_timesteps (DiffuseScheduler *s, guint n_steps, GError **error)
{
  LmsPriv *p = s->priv;
  guint T = (guint) s->c.num_train_timesteps;
  guint nt = 0;
  double *ts = sched_spacing_timesteps_f32 (s, n_steps, &nt, error);
  g_autofree float *train = sched_train_sigmas (s);
  g_autofree float *log_sigmas = sched_log_f32 (train, T);
  g_autofree double *sig = g_new (double, MAX (nt, n_steps) + 1);
  for (guint i = 0; i < nt; i++)
    sig[i] = np_interp_index (ts[i], train, T);
  guint ns = nt;
  if (p->karras || p->exponential) {
    double smin, smax;
    if (p->karras) {
      /* LMS's own _convert_to_karras ignores config sigma_min / sigma_max */
      smin = sig[ns - 1];
      smax = sig[0];
      sched_karras (smin, smax, n_steps, sig);
    } else {
      smin = isnan (p->sigma_min) ? sig[ns - 1] : p->sigma_min;
      smax = isnan (p->sigma_max) ? sig[0] : p->sigma_max;
      sched_exponential (smin, smax, n_steps, sig);
    }
    ns = nt = n_steps;
    g_free (ts);
    ts = g_new (double, nt);
    for (guint i = 0; i < nt; i++)
      ts[i] = sched_sigma_to_t (sig[i], log_sigmas, T);
  }
  float *sigmas = g_new (float, ns + 1);
  for (guint i = 0; i < ns; i++)
    sigmas[i] = (float) sig[i];
  sigmas[ns] = 0.0f;
  for (guint i = 0; i < nt; i++)
    ts[i] = (float) ts[i];
  s->num_inference_steps = n_steps;
  sched_set_schedule (s, ts, nt, sigmas, ns + 1);
  s->init_noise_sigma = _diffuse_sched_euler_init_sigma (s);
  lms_clear (p);
  return TRUE;
}

/* the Lagrange basis polynomial of diffusers' lms_derivative, in float32 */
static double
lms_integrand (const float *sig, guint order, gint t, guint cur, double tau)
{
  float ftau = (float) tau;
  gboolean any = FALSE;
  float prod = 1.0f;
  for (guint k = 0; k < order; k++) {
    if (k == cur)
      continue;
    float term = (ftau - sig[t - (gint) k]) / (sig[t - (gint) cur] - sig[t - (gint) k]);
    prod = any ? prod * term : 1.0f * term;
    any = TRUE;
  }
  return any ? (double) prod : 1.0;
}

/* QUADPACK dqk21 on [a, b] */
static double
qk21 (const float *sig, guint order, gint t, guint cur, double a, double b)
{
  static const double xgk[11] = {
    0.995657163025808080735527280689003, 0.973906528517171720077964012084452, 0.930157491355708226001207180059508,
    0.865063366688984510732096688423493, 0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
    0.562757134668604683339000099272694, 0.433395394129247190799265943165784, 0.294392862701460198131126603103866,
    0.148874338981631210884826001129720, 0.000000000000000000000000000000000,
  };
  static const double wgk[11] = {
    0.011694638867371874278064396062192, 0.032558162307964727478818972459390, 0.054755896574351996031381300244580,
    0.075039674810919952767043140916190, 0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
    0.123491976262065851077958109831074, 0.134709217311473325928054001771707, 0.142775938577060080797094273138717,
    0.147739104901338491374841515972068, 0.149445554002916905664936468389821,
  };
  double centr = 0.5 * (a + b);
  double hlgth = 0.5 * (b - a);
  double resk = wgk[10] * lms_integrand (sig, order, t, cur, centr);
  for (guint j = 0; j < 5; j++) {
    guint jtw = 2 * j + 1;
    double absc = hlgth * xgk[jtw];
    double f1 = lms_integrand (sig, order, t, cur, centr - absc);
    double f2 = lms_integrand (sig, order, t, cur, centr + absc);
    resk += wgk[jtw] * (f1 + f2);
  }
  for (guint j = 0; j < 5; j++) {
    guint jtwm1 = 2 * j;
    double absc = hlgth * xgk[jtwm1];
    double f1 = lms_integrand (sig, order, t, cur, centr - absc);
    double f2 = lms_integrand (sig, order, t, cur, centr + absc);
    resk += wgk[jtwm1] * (f1 + f2);
  }
  return resk * hlgth;
}

static gboolean
lms_step (DiffuseScheduler *s, const float *mo, float *x, size_t n, DiffuseRng *rng, GError **error)
{
  LmsPriv *p = s->priv;
  if (p->n != n) {
    lms_clear (p);
    p->n = n;
  }
  gint t = s->step_index;
  float sigma = s->sigmas[t];
  const char *pt = s->c.prediction_type;
  int kind = strcmp (pt, "epsilon") == 0 ? 0 : strcmp (pt, "v_prediction") == 0 ? 1 : 2;
  float c_v = -sigma / sqrtf (sigma * sigma + 1.0f);
  float d_v = sigma * sigma + 1.0f;

  /* derivatives.append; pop (0) beyond the order */
  float *d;
  if (p->n_derivs == LMS_MAX_ORDER) {
    d = p->derivs[0];
    memmove (p->derivs, p->derivs + 1, (LMS_MAX_ORDER - 1) * sizeof (float *));
    p->n_derivs--;
  } else {
    d = g_new (float, n);
  }
  p->derivs[p->n_derivs++] = d;
  for (size_t i = 0; i < n; i++) {
    float x0 = kind == 0 ? x[i] - sigma * mo[i] : kind == 1 ? mo[i] * c_v + x[i] / d_v : mo[i];
    d[i] = (x[i] - x0) / sigma;
  }

  guint order = MIN ((guint) t + 1, LMS_MAX_ORDER);
  double coeffs[LMS_MAX_ORDER];
  for (guint c = 0; c < order; c++)
    coeffs[c] = qk21 (s->sigmas, order, t, c, s->sigmas[t], s->sigmas[t + 1]);
  /* zip (coeffs, reversed (derivatives)): the newest derivative first */
  guint terms = MIN (order, p->n_derivs);
  for (size_t i = 0; i < n; i++) {
    float acc = 0.0f;
    for (guint c = 0; c < terms; c++) {
      float term = (float) coeffs[c] * p->derivs[p->n_derivs - 1 - c][i];
      acc = c == 0 ? term + 0.0f : acc + term;
    }
    x[i] = x[i] + acc;
  }
  return TRUE;
}

const SchedClass _diffuse_sched_lms = {
  .name = "LMSDiscreteScheduler",
  .order = 1,
  .has_begin_index = TRUE,
  .index_kind = SCHED_INDEX_SECOND_IF_DUP,
  .noise_kind = SCHED_NOISE_SIGMA,
  .init = lms_init,
  .set_timesteps = lms_set_timesteps,
  .scale_model_input = _diffuse_sched_sigma_scale_input,
  .step = lms_step,
  .free_priv = lms_free,
};

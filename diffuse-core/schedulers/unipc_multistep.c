/* gst-diffuse — UniPCMultistepScheduler (diffusers scheduling_unipc_multistep.py):
 * UniP predictor + UniC corrector, bh1/bh2, predict_x0 or not. */
#include "sched-private.h"

#define UNIPC_MAX_ORDER 4

typedef struct {
  guint solver_order;
  gboolean predict_x0;
  gboolean bh1;
  gboolean lower_order_final;
  gint64 *disable_corrector;
  guint n_disable;
  gboolean karras, exponential;
  double sigma_min, sigma_max;
  gboolean final_sigma_min;
  /* run */
  float *outputs[UNIPC_MAX_ORDER];   /* oldest first, NULL = None */
  float *last_sample;
  gboolean have_last;
  guint this_order;
  guint lower_order_nums;
  size_t n;
} UnipcPriv;

static const char *const unipc_predictions[] = { "epsilon", "sample", "v_prediction", NULL };
static const char *const final_types[] = { "zero", "sigma_min", NULL };

double *_diffuse_sched_multistep_timesteps (DiffuseScheduler *s, guint n_steps, gint64 last, guint *len);

static void
unipc_clear (UnipcPriv *p)
{
  for (guint i = 0; i < UNIPC_MAX_ORDER; i++)
    g_clear_pointer (&p->outputs[i], g_free);
  g_clear_pointer (&p->last_sample, g_free);
  p->have_last = FALSE;
  p->this_order = 0;
  p->lower_order_nums = 0;
  p->n = 0;
}

static void
unipc_free (gpointer data)
{
  UnipcPriv *p = data;
  unipc_clear (p);
  g_free (p->disable_corrector);
  g_free (p);
}

static gboolean
unipc_init (DiffuseScheduler *s, SchedCfg *r, GError **error)
{
  static const SchedCommon def = { 1000, 0.0001, 0.02, "linear", "epsilon", "linspace", 0, FALSE };
  UnipcPriv *p = g_new0 (UnipcPriv, 1);
  s->priv = p;
  const char *label = diffuse_config_label (s->config);
  sched_read_common (r, &s->c, &def);
  gint64 order = sched_cfg_int (r, "solver_order", 2);
  p->predict_x0 = sched_cfg_bool (r, "predict_x0", TRUE);
  const char *st = sched_cfg_string (r, "solver_type", "bh2");
  p->lower_order_final = sched_cfg_bool (r, "lower_order_final", TRUE);
  p->karras = sched_cfg_bool (r, "use_karras_sigmas", FALSE);
  p->exponential = sched_cfg_bool (r, "use_exponential_sigmas", FALSE);
  sched_cfg_require_false (r, "use_beta_sigmas");
  sched_cfg_require_false (r, "use_flow_sigmas");
  sched_cfg_require_false (r, "use_dynamic_shifting");
  sched_cfg_require_false (r, "thresholding");
  p->sigma_min = sched_cfg_optional_double (r, "sigma_min");
  p->sigma_max = sched_cfg_optional_double (r, "sigma_max");
  p->final_sigma_min = strcmp (sched_cfg_choice (r, "final_sigmas_type", "zero", final_types), "sigma_min") == 0;
  if (!r->ok)
    return FALSE;
  if (diffuse_config_has (s->config, "solver_p")) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: solver_p is not supported", label);
    return FALSE;
  }
  if (diffuse_config_has (s->config, "shift_terminal")) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: shift_terminal needs use_flow_sigmas", label);
    return FALSE;
  }
  g_autoptr (GError) aerr = NULL;
  p->n_disable = diffuse_config_get_int_array_checked (s->config, "disable_corrector", 0, &p->disable_corrector, &aerr);
  if (aerr) {
    g_propagate_error (error, g_steal_pointer (&aerr));
    return FALSE;
  }
  if (order < 1 || order > UNIPC_MAX_ORDER) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: solver_order %" G_GINT64_FORMAT
                 " is not supported (1 to %d)", label, order, UNIPC_MAX_ORDER);
    return FALSE;
  }
  p->solver_order = (guint) order;
  if (strcmp (st, "bh1") == 0)
    p->bh1 = TRUE;
  else if (strcmp (st, "bh2") == 0 || strcmp (st, "midpoint") == 0 || strcmp (st, "heun") == 0 ||
           strcmp (st, "logrho") == 0)
    p->bh1 = FALSE;                  /* diffusers maps the DPM types to bh2 */
  else {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: solver_type \"%s\" is not supported", label, st);
    return FALSE;
  }
  if ((int) p->karras + (int) p->exponential > 1) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG,
                 "%s: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used", label);
    return FALSE;
  }
  if (!sched_check_prediction (s, unipc_predictions, error) || !sched_init_betas (s, TRUE, FALSE, error))
    return FALSE;
  if (s->c.rescale_betas_zero_snr)
    s->alphas_cumprod[s->c.num_train_timesteps - 1] = 1.0f / 16777216.0f;
  return TRUE;
}

static gboolean
unipc_set_timesteps (DiffuseScheduler *s, guint n_steps, GError **error)
{
  UnipcPriv *p = s->priv;
  guint T = (guint) s->c.num_train_timesteps;
  guint nt = 0;
  double *ts = _diffuse_sched_multistep_timesteps (s, n_steps, T, &nt);
  g_autofree float *train = sched_train_sigmas (s);
  guint ns;
  g_autofree double *sig = NULL;
  float last;
  if (p->karras || p->exponential) {
    g_autofree float *log_sigmas = sched_log_f32 (train, T);
    double smin = isnan (p->sigma_min) ? train[0] : p->sigma_min;
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
      ts[i] = p->karras ? np_round (t) : t;
    }
    nt = ns;
    last = p->final_sigma_min ? (float) sig[ns - 1] : 0.0f;
  } else {
    ns = nt;
    sig = g_new (double, ns);
    for (guint i = 0; i < ns; i++)
      sig[i] = np_interp_index (ts[i], train, T);
    float ac = s->alphas_cumprod[0];
    last = p->final_sigma_min ? sqrtf ((1.0f - ac) / ac) : 0.0f;
  }
  float *sigmas = g_new (float, ns + 1);
  for (guint i = 0; i < ns; i++)
    sigmas[i] = (float) sig[i];
  sigmas[ns] = last;
  for (guint i = 0; i < nt; i++)
    ts[i] = (double) (gint64) ts[i];
  s->num_inference_steps = nt;
  sched_set_schedule (s, ts, nt, sigmas, ns + 1);
  s->init_noise_sigma = 1.0f;
  unipc_clear (p);
  return TRUE;
}

static inline void
alpha_sigma (float sigma, float *alpha_t, float *sigma_t)
{
  *alpha_t = 1.0f / sqrtf (sigma * sigma + 1.0f);
  *sigma_t = sigma * *alpha_t;
}

static inline float
lambda_at (DiffuseScheduler *s, gint i)
{
  float a, sg;
  alpha_sigma (s->sigmas[i], &a, &sg);
  return logf (a) - logf (sg);
}

static inline float
powi_f32 (float x, guint e)
{
  /* torch.pow (tensor, int) for the small exponents used here */
  switch (e) {
  case 0: return 1.0f;
  case 1: return x;
  case 2: return x * x;
  default: return (x * x) * x;
  }
}

/* torch.linalg.solve for a tiny float32 system: LU with partial pivoting */
static void
solve_f32 (float *A, float *b, guint m, float *x)
{
  for (guint k = 0; k < m; k++) {
    guint piv = k;
    for (guint i = k + 1; i < m; i++)
      if (fabsf (A[i * m + k]) > fabsf (A[piv * m + k]))
        piv = i;
    if (piv != k) {
      for (guint j = 0; j < m; j++) {
        float t = A[k * m + j];
        A[k * m + j] = A[piv * m + j];
        A[piv * m + j] = t;
      }
      float t = b[k];
      b[k] = b[piv];
      b[piv] = t;
    }
    float inv = 1.0f / A[k * m + k];
    for (guint i = k + 1; i < m; i++) {
      float l = A[i * m + k] * inv;
      for (guint j = k + 1; j < m; j++)
        A[i * m + j] = A[i * m + j] - l * A[k * m + j];
      b[i] = b[i] - l * b[k];
    }
  }
  for (gint i = (gint) m - 1; i >= 0; i--) {
    float v = b[i];
    for (guint j = (guint) i + 1; j < m; j++)
      v = v - A[i * m + j] * x[j];
    x[i] = v / A[i * m + i];
  }
}

/* R and b of the UniPC update for `order` (rks has order entries, the last 1) */
static void
unipc_rb (UnipcPriv *p, const float *rks, guint order, float hh, float *R, float *b, float *h_phi_1_out,
          float *B_h_out)
{
  float h_phi_1 = expm1f (hh);
  float h_phi_k = h_phi_1 / hh - 1.0f;
  double fact = 1;
  float B_h = p->bh1 ? hh : expm1f (hh);
  for (guint i = 1; i <= order; i++) {
    for (guint j = 0; j < order; j++)
      R[(i - 1) * order + j] = powi_f32 (rks[j], i - 1);
    b[i - 1] = (h_phi_k * (float) fact) / B_h;
    fact *= i + 1;
    h_phi_k = h_phi_k / hh - (float) (1.0 / fact);
  }
  *h_phi_1_out = h_phi_1;
  *B_h_out = B_h;
}

/* multistep_uni_p_bh_update: x (in/out) */
static void
uni_p (DiffuseScheduler *s, UnipcPriv *p, float *x, size_t n, guint order)
{
  guint so = p->solver_order;
  gint idx = s->step_index;
  const float *m0 = p->outputs[so - 1];
  float a_t, s_t, a_s0, s_s0;
  alpha_sigma (s->sigmas[idx + 1], &a_t, &s_t);
  alpha_sigma (s->sigmas[idx], &a_s0, &s_s0);
  float l_t = logf (a_t) - logf (s_t), l_s0 = logf (a_s0) - logf (s_s0);
  float h = l_t - l_s0;
  float rks[UNIPC_MAX_ORDER];
  for (guint i = 1; i < order; i++)
    rks[i - 1] = (lambda_at (s, idx - (gint) i) - l_s0) / h;
  rks[order - 1] = 1.0f;
  float hh = p->predict_x0 ? -h : h;
  float R[UNIPC_MAX_ORDER * UNIPC_MAX_ORDER], b[UNIPC_MAX_ORDER], h_phi_1, B_h;
  unipc_rb (p, rks, order, hh, R, b, &h_phi_1, &B_h);
  float rhos[UNIPC_MAX_ORDER];
  guint K = order - 1;
  if (K == 1) {
    rhos[0] = 0.5f;
  } else if (K > 1) {
    float Rs[UNIPC_MAX_ORDER * UNIPC_MAX_ORDER], bs[UNIPC_MAX_ORDER];
    for (guint i = 0; i < K; i++) {
      for (guint j = 0; j < K; j++)
        Rs[i * K + j] = R[i * order + j];
      bs[i] = b[i];
    }
    solve_f32 (Rs, bs, K, rhos);
  }
  float c1 = p->predict_x0 ? s_t / s_s0 : a_t / a_s0;
  float c2 = p->predict_x0 ? a_t * h_phi_1 : s_t * h_phi_1;
  float c3 = p->predict_x0 ? a_t * B_h : s_t * B_h;
  float zero_res = c3 * 0.0f;
  for (size_t e = 0; e < n; e++) {
    float xt = c1 * x[e] - c2 * m0[e];
    if (K == 0) {
      x[e] = xt - zero_res;
      continue;
    }
    float res = 0;
    for (guint k = 0; k < K; k++) {
      const float *mi = p->outputs[so - 2 - k];
      float d = (mi[e] - m0[e]) / rks[k];
      res = k == 0 ? rhos[k] * d : res + rhos[k] * d;
    }
    x[e] = xt - c3 * res;
  }
}

/* multistep_uni_c_bh_update: corrects this_sample (x, in/out) with the new
 * converted output `model_t`; uses the outputs before the shift. */
static void
uni_c (DiffuseScheduler *s, UnipcPriv *p, const float *model_t, float *x, size_t n, guint order)
{
  guint so = p->solver_order;
  gint idx = s->step_index;
  const float *m0 = p->outputs[so - 1];
  const float *last = p->last_sample;
  float a_t, s_t, a_s0, s_s0;
  alpha_sigma (s->sigmas[idx], &a_t, &s_t);
  alpha_sigma (s->sigmas[idx - 1], &a_s0, &s_s0);
  float l_t = logf (a_t) - logf (s_t), l_s0 = logf (a_s0) - logf (s_s0);
  float h = l_t - l_s0;
  float rks[UNIPC_MAX_ORDER];
  for (guint i = 1; i < order; i++)
    rks[i - 1] = (lambda_at (s, idx - (gint) (i + 1)) - l_s0) / h;
  rks[order - 1] = 1.0f;
  float hh = p->predict_x0 ? -h : h;
  float R[UNIPC_MAX_ORDER * UNIPC_MAX_ORDER], b[UNIPC_MAX_ORDER], h_phi_1, B_h;
  unipc_rb (p, rks, order, hh, R, b, &h_phi_1, &B_h);
  float rhos[UNIPC_MAX_ORDER];
  if (order == 1)
    rhos[0] = 0.5f;
  else
    solve_f32 (R, b, order, rhos);
  guint K = order - 1;
  float c1 = p->predict_x0 ? s_t / s_s0 : a_t / a_s0;
  float c2 = p->predict_x0 ? a_t * h_phi_1 : s_t * h_phi_1;
  float c3 = p->predict_x0 ? a_t * B_h : s_t * B_h;
  float rl = rhos[order - 1];
  for (size_t e = 0; e < n; e++) {
    float xt = c1 * last[e] - c2 * m0[e];
    float corr = 0;
    for (guint k = 0; k < K; k++) {
      const float *mi = p->outputs[so - 2 - k];
      float d = (mi[e] - m0[e]) / rks[k];
      corr = k == 0 ? rhos[k] * d : corr + rhos[k] * d;
    }
    float d1t = model_t[e] - m0[e];
    float inner = K == 0 ? rl * d1t + 0.0f : corr + rl * d1t;
    x[e] = xt - c3 * inner;
  }
}

static gboolean
unipc_step (DiffuseScheduler *s, const float *mo, float *x, size_t n, DiffuseRng *rng, GError **error)
{
  UnipcPriv *p = s->priv;
  if (p->n != n) {
    unipc_clear (p);
    p->n = n;
  }
  guint so = p->solver_order;
  gint idx = s->step_index;
  gboolean use_corrector = idx > 0 && p->have_last;
  for (guint i = 0; use_corrector && i < p->n_disable; i++)
    if (p->disable_corrector[i] == idx - 1)
      use_corrector = FALSE;

  /* convert_model_output */
  float a, sg;
  alpha_sigma (s->sigmas[idx], &a, &sg);
  const char *pt = s->c.prediction_type;
  int kind = strcmp (pt, "epsilon") == 0 ? 0 : strcmp (pt, "sample") == 0 ? 1 : 2;
  float *conv = g_new (float, n);
  for (size_t i = 0; i < n; i++) {
    if (p->predict_x0)
      conv[i] = kind == 0 ? (x[i] - sg * mo[i]) / a : kind == 1 ? mo[i] : a * x[i] - sg * mo[i];
    else
      conv[i] = kind == 0 ? mo[i] : kind == 1 ? (x[i] - a * mo[i]) / sg : a * mo[i] + sg * x[i];
  }
  if (use_corrector) {
    if (!p->outputs[so - 1] || p->this_order == 0 || idx < 1) {
      g_free (conv);
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s: corrector without history", s->klass->name);
      return FALSE;
    }
    uni_c (s, p, conv, x, n, p->this_order);
  }
  g_free (p->outputs[0]);
  for (guint i = 0; i + 1 < so; i++)
    p->outputs[i] = p->outputs[i + 1];
  p->outputs[so - 1] = conv;

  guint this_order = so;
  if (p->lower_order_final) {
    guint left = s->n_timesteps - (guint) idx;
    this_order = MIN (so, left);
  }
  this_order = MIN (this_order, p->lower_order_nums + 1);
  p->this_order = this_order;
  for (guint k = 1; k < this_order; k++)
    if (idx - (gint) k < 0 || !p->outputs[so - 1 - k]) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s: predictor without history", s->klass->name);
      return FALSE;
    }
  if (!p->last_sample)
    p->last_sample = g_new (float, n);
  memcpy (p->last_sample, x, n * sizeof (float));
  p->have_last = TRUE;
  uni_p (s, p, x, n, this_order);
  if (p->lower_order_nums < so)
    p->lower_order_nums++;
  return TRUE;
}

const SchedClass _diffuse_sched_unipc = {
  .name = "UniPCMultistepScheduler",
  .order = 1,
  .has_begin_index = TRUE,
  .index_kind = SCHED_INDEX_LAST_IF_NONE,
  .noise_kind = SCHED_NOISE_ALPHA_SIGMA,
  .init = unipc_init,
  .set_timesteps = unipc_set_timesteps,
  .scale_model_input = NULL,
  .step = unipc_step,
  .free_priv = unipc_free,
};

/* gst-diffuse — pieces shared by the schedulers: config reading, beta
 * schedules, numpy-exact helpers, sigma conversions. */
#include "sched-private.h"

#include <stdlib.h>

/* ---- config ----------------------------------------------------------- */

gint64
sched_cfg_int (SchedCfg *r, const char *key, gint64 def)
{
  gint64 v = def;
  if (r->ok && !diffuse_config_get_int_checked (r->cfg, key, def, &v, r->error)) {
    r->ok = FALSE;
    return def;
  }
  return v;
}

double
sched_cfg_double (SchedCfg *r, const char *key, double def)
{
  double v = def;
  if (r->ok && !diffuse_config_get_double_checked (r->cfg, key, def, &v, r->error)) {
    r->ok = FALSE;
    return def;
  }
  return v;
}

gboolean
sched_cfg_bool (SchedCfg *r, const char *key, gboolean def)
{
  gboolean v = def;
  if (r->ok && !diffuse_config_get_bool_checked (r->cfg, key, def, &v, r->error)) {
    r->ok = FALSE;
    return def;
  }
  return v;
}

const char *
sched_cfg_string (SchedCfg *r, const char *key, const char *def)
{
  const char *v = def;
  if (r->ok && !diffuse_config_get_string_checked (r->cfg, key, def, &v, r->error)) {
    r->ok = FALSE;
    return def;
  }
  return v;
}

const char *
sched_cfg_choice (SchedCfg *r, const char *key, const char *def, const char *const *allowed)
{
  const char *v = sched_cfg_string (r, key, def);
  if (!r->ok)
    return def;
  for (guint i = 0; allowed[i]; i++)
    if (g_strcmp0 (v, allowed[i]) == 0)
      return allowed[i];
  g_autofree char *list = g_strjoinv (", ", (char **) allowed);
  g_set_error (r->error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
               "%s: %s \"%s\" is not supported (supported: %s)", diffuse_config_label (r->cfg), key, v, list);
  r->ok = FALSE;
  return def;
}

void
sched_cfg_require_false (SchedCfg *r, const char *key)
{
  if (sched_cfg_bool (r, key, FALSE) && r->ok) {
    g_set_error (r->error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: %s = true is not supported",
                 diffuse_config_label (r->cfg), key);
    r->ok = FALSE;
  }
}

void
sched_cfg_require_string (SchedCfg *r, const char *key, const char *only)
{
  const char *v = sched_cfg_string (r, key, only);
  if (r->ok && g_strcmp0 (v, only) != 0) {
    g_set_error (r->error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: %s \"%s\" is not supported (only \"%s\")",
                 diffuse_config_label (r->cfg), key, v, only);
    r->ok = FALSE;
  }
}

double
sched_cfg_optional_double (SchedCfg *r, const char *key)
{
  if (!r->ok || !diffuse_config_has (r->cfg, key))
    return NAN;
  return sched_cfg_double (r, key, NAN);
}

void
sched_read_common (SchedCfg *r, SchedCommon *c, const SchedCommon *def)
{
  static const char *const spacings[] = { "leading", "trailing", "linspace", NULL };
  c->num_train_timesteps = sched_cfg_int (r, "num_train_timesteps", def->num_train_timesteps);
  c->beta_start = sched_cfg_double (r, "beta_start", def->beta_start);
  c->beta_end = sched_cfg_double (r, "beta_end", def->beta_end);
  c->beta_schedule = sched_cfg_string (r, "beta_schedule", def->beta_schedule);
  c->prediction_type = sched_cfg_string (r, "prediction_type", def->prediction_type);
  c->timestep_spacing = sched_cfg_choice (r, "timestep_spacing", def->timestep_spacing, spacings);
  c->steps_offset = sched_cfg_int (r, "steps_offset", def->steps_offset);
  c->rescale_betas_zero_snr = sched_cfg_bool (r, "rescale_betas_zero_snr", def->rescale_betas_zero_snr);
  if (r->ok && (c->num_train_timesteps < 2 || c->num_train_timesteps > 1000000)) {
    g_set_error (r->error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: num_train_timesteps %" G_GINT64_FORMAT
                 " out of range", diffuse_config_label (r->cfg), c->num_train_timesteps);
    r->ok = FALSE;
  }
}

gboolean
sched_check_prediction (DiffuseScheduler *s, const char *const *allowed, GError **error)
{
  for (guint i = 0; allowed[i]; i++)
    if (g_strcmp0 (s->c.prediction_type, allowed[i]) == 0)
      return TRUE;
  g_autofree char *list = g_strjoinv (", ", (char **) allowed);
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: %s prediction_type \"%s\" is not supported (%s)",
               diffuse_config_label (s->config), s->klass->name, s->c.prediction_type, list);
  return FALSE;
}

/* ---- betas ------------------------------------------------------------ */

/* torch.linspace (start, end, n, dtype=float32) as torch's x86 CPU kernel
 * computes it: start + step*i for the first half, end - step*(n-1-i) for
 * the rest, each a fused multiply-add. */
static void
torch_linspace_f32 (float start, float end, guint n, float *out)
{
  if (n == 1) {
    out[0] = start;
    return;
  }
  float step = (end - start) / (float) (n - 1);
  guint half = n / 2;
  for (guint i = 0; i < n; i++)
    out[i] = i < half ? fmaf (step, (float) i, start) : fmaf (-step, (float) (n - 1 - i), end);
}

static double
alpha_bar_cosine (double t)
{
  double c = cos ((t + 0.008) / 1.008 * G_PI / 2);
  return c * c;
}

static double
alpha_bar_exp (double t)
{
  return exp (t * -12.0);
}

/* torch.cumprod on float32: accumulates in double, stores float */
static void
cumprod_f32 (const float *a, guint n, float *out)
{
  double acc = 1.0;
  for (guint i = 0; i < n; i++) {
    acc *= a[i];
    out[i] = (float) acc;
  }
}

static void
rescale_zero_terminal_snr (float *betas, guint n)
{
  g_autofree float *alphas = g_new (float, n);
  g_autofree float *s = g_new (float, n);
  for (guint i = 0; i < n; i++)
    alphas[i] = 1.0f - betas[i];
  cumprod_f32 (alphas, n, s);
  for (guint i = 0; i < n; i++)
    s[i] = sqrtf (s[i]);
  float s0 = s[0], sT = s[n - 1];
  float scale = s0 / (s0 - sT);
  for (guint i = 0; i < n; i++) {
    s[i] = s[i] - sT;
    s[i] = s[i] * scale;
    s[i] = s[i] * s[i];           /* alphas_bar */
  }
  alphas[0] = s[0];
  for (guint i = 1; i < n; i++)
    alphas[i] = s[i] / s[i - 1];
  for (guint i = 0; i < n; i++)
    betas[i] = 1.0f - alphas[i];
}

gboolean
sched_init_betas (DiffuseScheduler *s, gboolean allow_rescale, gboolean allow_exp, GError **error)
{
  guint T = (guint) s->c.num_train_timesteps;
  const char *label = diffuse_config_label (s->config);
  s->betas = g_new (float, T);

  g_autoptr (GError) aerr = NULL;
  g_autofree double *trained = NULL;
  guint n_trained = diffuse_config_get_double_array_checked (s->config, "trained_betas", 0, &trained, &aerr);
  if (aerr) {
    g_propagate_error (error, g_steal_pointer (&aerr));
    return FALSE;
  }
  if (n_trained > 0) {
    if (n_trained != T) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: trained_betas has %u values, num_train_timesteps is %u",
                   label, n_trained, T);
      return FALSE;
    }
    for (guint i = 0; i < T; i++)
      s->betas[i] = (float) trained[i];
  } else if (g_strcmp0 (s->c.beta_schedule, "linear") == 0) {
    torch_linspace_f32 ((float) s->c.beta_start, (float) s->c.beta_end, T, s->betas);
  } else if (g_strcmp0 (s->c.beta_schedule, "scaled_linear") == 0) {
    torch_linspace_f32 ((float) pow (s->c.beta_start, 0.5), (float) pow (s->c.beta_end, 0.5), T, s->betas);
    for (guint i = 0; i < T; i++)
      s->betas[i] = s->betas[i] * s->betas[i];
  } else if (g_strcmp0 (s->c.beta_schedule, "squaredcos_cap_v2") == 0 ||
             (allow_exp && g_strcmp0 (s->c.beta_schedule, "exp") == 0)) {
    double (*fn) (double) = s->c.beta_schedule[0] == 'e' ? alpha_bar_exp : alpha_bar_cosine;
    for (guint i = 0; i < T; i++) {
      double t1 = (double) i / T, t2 = (double) (i + 1) / T;
      double b = 1 - fn (t2) / fn (t1);
      s->betas[i] = (float) (b < 0.999 ? b : 0.999);
    }
  } else {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: beta_schedule \"%s\" is not supported by %s",
                 label, s->c.beta_schedule, s->klass->name);
    return FALSE;
  }

  if (s->c.rescale_betas_zero_snr) {
    if (!allow_rescale) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED,
                   "%s: rescale_betas_zero_snr is not an option of %s", label, s->klass->name);
      return FALSE;
    }
    rescale_zero_terminal_snr (s->betas, T);
  }

  g_autofree float *alphas = g_new (float, T);
  for (guint i = 0; i < T; i++)
    alphas[i] = 1.0f - s->betas[i];
  s->alphas_cumprod = g_new (float, T);
  cumprod_f32 (alphas, T, s->alphas_cumprod);
  return TRUE;
}

/* ---- numpy ------------------------------------------------------------ */

void
np_linspace (double start, double stop, guint num, gboolean endpoint, double *out)
{
  guint div = endpoint ? num - 1 : num;
  double delta = stop - start;
  if (div > 0) {
    double step = delta / div;
    if (step == 0) {
      for (guint i = 0; i < num; i++)
        out[i] = ((double) i / div) * delta + start;
    } else {
      for (guint i = 0; i < num; i++)
        out[i] = (double) i * step + start;
    }
  } else {
    for (guint i = 0; i < num; i++)
      out[i] = (double) i * delta + start;
  }
  if (endpoint && num > 1)
    out[num - 1] = stop;
}

double *
np_arange (double start, double stop, double step, guint *len)
{
  double l = ceil ((stop - start) / step);
  guint n = l > 0 ? (guint) l : 0;
  double *out = g_new (double, n ? n : 1);
  if (n > 0)
    out[0] = start;
  if (n > 1)
    out[1] = start + step;
  double delta = n > 1 ? out[1] - out[0] : step;
  for (guint i = 2; i < n; i++)
    out[i] = start + i * delta;
  *len = n;
  return out;
}

double
np_interp_index (double x, const float *fp, guint n)
{
  if (isnan (x))
    return x;
  if (x < 0)
    return fp[0];
  if (x >= (double) (n - 1))
    return fp[n - 1];
  guint j = (guint) floor (x);
  if ((double) j == x)
    return fp[j];
  double slope = ((double) fp[j + 1] - (double) fp[j]) / 1.0;
  double r = slope * (x - (double) j) + (double) fp[j];
  if (isnan (r)) {
    r = slope * (x - (double) (j + 1)) + (double) fp[j + 1];
    if (isnan (r) && fp[j] == fp[j + 1])
      r = fp[j];
  }
  return r;
}

/* ---- sigmas ----------------------------------------------------------- */

float *
sched_train_sigmas (DiffuseScheduler *s)
{
  guint T = (guint) s->c.num_train_timesteps;
  float *sig = g_new (float, T);
  for (guint i = 0; i < T; i++) {
    float ac = s->alphas_cumprod[i];
    sig[i] = sqrtf ((1.0f - ac) / ac);
  }
  return sig;
}

float *
sched_log_f32 (const float *v, guint n)
{
  float *o = g_new (float, n);
  for (guint i = 0; i < n; i++)
    o[i] = logf (v[i]);
  return o;
}

double
sched_sigma_to_t (double sigma, const float *log_sigmas, guint n)
{
  double log_sigma = log (sigma > 1e-10 ? sigma : 1e-10);
  guint low_idx = 0;
  for (guint i = 0; i < n; i++)
    if (log_sigma - (double) log_sigmas[i] >= 0)
      low_idx = i;
  if (low_idx > n - 2)
    low_idx = n - 2;
  guint high_idx = low_idx + 1;
  float low = log_sigmas[low_idx], high = log_sigmas[high_idx];
  float den = low - high;
  double w = ((double) low - log_sigma) / (double) den;
  if (w < 0)
    w = 0;
  if (w > 1)
    w = 1;
  return (1 - w) * low_idx + w * high_idx;
}

void
sched_karras (double sigma_min, double sigma_max, guint n, double *out)
{
  const double rho = 7.0;
  np_linspace (0, 1, n, TRUE, out);
  double min_inv_rho = pow (sigma_min, 1 / rho);
  double max_inv_rho = pow (sigma_max, 1 / rho);
  for (guint i = 0; i < n; i++)
    out[i] = pow (max_inv_rho + out[i] * (min_inv_rho - max_inv_rho), rho);
}

void
sched_exponential (double sigma_min, double sigma_max, guint n, double *out)
{
  np_linspace (log (sigma_max), log (sigma_min), n, TRUE, out);
  for (guint i = 0; i < n; i++)
    out[i] = exp (out[i]);
}

double *
sched_spacing_timesteps_f32 (DiffuseScheduler *s, guint n_steps, guint *len, GError **error)
{
  guint T = (guint) s->c.num_train_timesteps;
  const char *sp = s->c.timestep_spacing;
  double *ts;
  if (g_strcmp0 (sp, "linspace") == 0) {
    ts = g_new (double, n_steps);
    g_autofree double *lin = g_new (double, n_steps);
    np_linspace (0, T - 1, n_steps, TRUE, lin);
    for (guint i = 0; i < n_steps; i++)
      ts[i] = (float) lin[n_steps - 1 - i];
    *len = n_steps;
  } else if (g_strcmp0 (sp, "leading") == 0) {
    guint ratio = T / n_steps;
    ts = g_new (double, n_steps);
    for (guint i = 0; i < n_steps; i++) {
      float v = (float) ((double) (n_steps - 1 - i) * ratio);
      ts[i] = v + (float) s->c.steps_offset;
    }
    *len = n_steps;
  } else {
    double ratio = (double) T / n_steps;
    guint n = 0;
    double *a = np_arange (T, 0, -ratio, &n);
    for (guint i = 0; i < n; i++)
      a[i] = (float) np_round (a[i]) - 1.0f;
    ts = a;
    *len = n;
  }
  return ts;
}

/* ---- run helpers ------------------------------------------------------ */

gboolean
sched_check_size (DiffuseScheduler *s, size_t n, GError **error)
{
  if (n == 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: empty sample", s->klass->name);
    return FALSE;
  }
  if (s->n == 0)
    s->n = n;
  if (s->n != n) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "%s: sample size changed within a run (%zu, was %zu)", s->klass->name, n, s->n);
    return FALSE;
  }
  return TRUE;
}

gboolean
sched_draw_noise (DiffuseScheduler *s, DiffuseRng *rng, float *out, size_t n, GError **error)
{
  if (rng == NULL) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "%s: this step draws noise and needs a generator (rng is NULL)", s->klass->name);
    return FALSE;
  }
  diffuse_rng_randn_as (rng, s->noise_dtype, out, n);
  return TRUE;
}

gint
sched_index_for_timestep (DiffuseScheduler *s, double t)
{
  gint first = -1, second = -1;
  for (guint i = 0; i < s->n_timesteps; i++) {
    if (s->timesteps[i] == t) {
      if (first < 0)
        first = (gint) i;
      else if (second < 0)
        second = (gint) i;
    }
  }
  if (second >= 0)
    return second;
  if (first >= 0)
    return first;
  if (s->klass->index_kind == SCHED_INDEX_LAST_IF_NONE)
    return (gint) s->n_timesteps - 1;
  return -1;
}

void
sched_set_schedule (DiffuseScheduler *s, double *timesteps, guint n_t, float *sigmas, guint n_s)
{
  g_free (s->timesteps);
  g_free (s->sigmas);
  s->timesteps = timesteps;
  s->n_timesteps = n_t;
  s->sigmas = sigmas;
  s->n_sigmas = n_s;
  s->have_timesteps = TRUE;
}

/* gst-diffuse — PNDMScheduler (diffusers scheduling_pndm.py): Runge-Kutta
 * warm-up (PRK) then linear multistep (PLMS), or PLMS only with
 * skip_prk_steps. */
#include "sched-private.h"

typedef struct {
  gboolean skip_prk_steps;
  float final_alpha_cumprod;
  guint n_prk;           /* PRK entries at the head of the timesteps */
  double *prk;           /* prk_timesteps */
  /* run state */
  guint counter;
  float *ets[4];         /* oldest first */
  guint n_ets;
  float *cur_mo;         /* cur_model_output; has_cur_mo FALSE means Python 0 */
  gboolean has_cur_mo;
  float *cur_sample;
  gboolean has_cur_sample;
  float *tmp;
  size_t n;
} PndmPriv;

static const char *const pndm_predictions[] = { "epsilon", "v_prediction", NULL };

static void
pndm_clear_run (PndmPriv *p)
{
  for (guint i = 0; i < 4; i++)
    g_clear_pointer (&p->ets[i], g_free);
  p->n_ets = 0;
  g_clear_pointer (&p->cur_mo, g_free);
  g_clear_pointer (&p->cur_sample, g_free);
  g_clear_pointer (&p->tmp, g_free);
  p->has_cur_mo = FALSE;
  p->has_cur_sample = FALSE;
  p->counter = 0;
  p->n = 0;
}

static void
pndm_free (gpointer data)
{
  PndmPriv *p = data;
  pndm_clear_run (p);
  g_free (p->prk);
  g_free (p);
}

static gboolean
pndm_init (DiffuseScheduler *s, SchedCfg *r, GError **error)
{
  static const SchedCommon def = { 1000, 0.0001, 0.02, "linear", "epsilon", "leading", 0, FALSE };
  PndmPriv *p = g_new0 (PndmPriv, 1);
  s->priv = p;
  sched_read_common (r, &s->c, &def);
  s->c.rescale_betas_zero_snr = FALSE;    /* not a PNDM option: ignored as diffusers does */
  p->skip_prk_steps = sched_cfg_bool (r, "skip_prk_steps", FALSE);
  gboolean set_alpha_to_one = sched_cfg_bool (r, "set_alpha_to_one", FALSE);
  if (!r->ok)
    return FALSE;
  if (!sched_check_prediction (s, pndm_predictions, error) || !sched_init_betas (s, FALSE, FALSE, error))
    return FALSE;
  p->final_alpha_cumprod = set_alpha_to_one ? 1.0f : s->alphas_cumprod[0];
  return TRUE;
}

static gboolean
pndm_set_timesteps (DiffuseScheduler *s, guint n_steps, GError **error)
{
  PndmPriv *p = s->priv;
  guint T = (guint) s->c.num_train_timesteps;
  const char *sp = s->c.timestep_spacing;
  /* the ascending base list */
  g_autofree double *base = NULL;
  guint nb = 0;
  if (g_strcmp0 (sp, "linspace") == 0) {
    base = g_new (double, n_steps);
    np_linspace (0, T - 1, n_steps, TRUE, base);
    for (guint i = 0; i < n_steps; i++)
      base[i] = (double) (gint64) np_round (base[i]);
    nb = n_steps;
  } else if (g_strcmp0 (sp, "leading") == 0) {
    guint ratio = T / n_steps;
    base = g_new (double, n_steps);
    for (guint i = 0; i < n_steps; i++)
      base[i] = (double) ((gint64) i * ratio + s->c.steps_offset);
    nb = n_steps;
  } else {
    guint na = 0;
    g_autofree double *a = np_arange (T, 0, -((double) T / n_steps), &na);
    base = g_new (double, na ? na : 1);
    for (guint i = 0; i < na; i++)
      base[i] = (double) ((gint64) np_round (a[na - 1 - i]) - 1);
    nb = na;
  }

  double *ts;
  guint len;
  g_clear_pointer (&p->prk, g_free);
  p->n_prk = 0;
  if (p->skip_prk_steps) {
    if (nb < 2) {
      /* _timesteps[:-1] + _timesteps[-2:-1] + _timesteps[-1:] of one element */
      len = nb;
      ts = g_new (double, 1);
      ts[0] = base[0];
    } else {
      len = nb + 1;
      ts = g_new (double, len);
      /* ascending: base[0..nb-2], base[nb-2], base[nb-1]; then reversed */
      g_autofree double *asc = g_new (double, len);
      for (guint i = 0; i + 1 < nb; i++)
        asc[i] = base[i];
      asc[nb - 1] = base[nb - 2];
      asc[nb] = base[nb - 1];
      for (guint i = 0; i < len; i++)
        ts[i] = asc[len - 1 - i];
    }
  } else {
    if (nb < 4) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                   "%s: the Runge-Kutta warm-up needs at least 4 steps (got %u); set skip_prk_steps", s->klass->name,
                   n_steps);
      return FALSE;
    }
    double half = (double) (T / n_steps / 2);
    double prk8[8];
    for (guint i = 0; i < 4; i++) {
      prk8[2 * i] = base[nb - 4 + i];
      prk8[2 * i + 1] = base[nb - 4 + i] + half;
    }
    /* prk8[:-1].repeat (2)[1:-1], reversed */
    double rep[14];
    for (guint i = 0; i < 7; i++)
      rep[2 * i] = rep[2 * i + 1] = prk8[i];
    p->n_prk = 12;
    p->prk = g_new (double, 12);
    for (guint i = 0; i < 12; i++)
      p->prk[i] = rep[12 - i];
    guint n_plms = nb - 3;
    len = 12 + n_plms;
    ts = g_new (double, len);
    memcpy (ts, p->prk, 12 * sizeof (double));
    for (guint i = 0; i < n_plms; i++)
      ts[12 + i] = base[n_plms - 1 - i];
  }
  s->num_inference_steps = n_steps;
  sched_set_schedule (s, ts, len, NULL, 0);
  s->init_noise_sigma = 1.0f;
  pndm_clear_run (p);
  return TRUE;
}

/* _get_prev_sample (sample, timestep, prev_timestep, model_output) */
static gboolean
pndm_prev_sample (DiffuseScheduler *s, const float *sample, gint64 t, gint64 prev_t, const float *mo, float *out,
                  size_t n, GError **error)
{
  PndmPriv *p = s->priv;
  gint64 T = s->c.num_train_timesteps;
  if (t < 0 || t >= T || prev_t >= T) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: timestep %" G_GINT64_FORMAT
                 " outside the train schedule", s->klass->name, t);
    return FALSE;
  }
  float a_t = s->alphas_cumprod[t];
  float a_prev = prev_t >= 0 ? s->alphas_cumprod[prev_t] : p->final_alpha_cumprod;
  float b_t = 1.0f - a_t;
  float b_prev = 1.0f - a_prev;
  gboolean v = strcmp (s->c.prediction_type, "v_prediction") == 0;
  float sa = sqrtf (a_t), sb = sqrtf (b_t);
  float sample_coeff = sqrtf (a_prev / a_t);
  float denom = a_t * sqrtf (b_prev) + sqrtf ((a_t * b_t) * a_prev);
  float diff = a_prev - a_t;
  for (size_t i = 0; i < n; i++) {
    float m = mo[i];
    if (v)
      m = sa * m + sb * sample[i];
    out[i] = sample_coeff * sample[i] - (diff * m) / denom;
  }
  return TRUE;
}

static float *
ets_push (PndmPriv *p, const float *mo, gboolean keep_last3)
{
  if (keep_last3) {
    while (p->n_ets > 3) {
      g_free (p->ets[0]);
      memmove (p->ets, p->ets + 1, 3 * sizeof (float *));
      p->n_ets--;
    }
  }
  if (p->n_ets == 4) {
    g_free (p->ets[0]);
    memmove (p->ets, p->ets + 1, 3 * sizeof (float *));
    p->n_ets--;
  }
  float *c = sched_fdup (mo, p->n);
  p->ets[p->n_ets++] = c;
  return c;
}

static gboolean
pndm_step_prk (DiffuseScheduler *s, const float *mo, float *x, size_t n, GError **error)
{
  PndmPriv *p = s->priv;
  gint64 T = s->c.num_train_timesteps;
  gint64 t = (gint64) s->timesteps[s->pos];
  gint64 diff_to_prev = (p->counter % 2) ? 0 : T / s->num_inference_steps / 2;
  gint64 prev_t = t - diff_to_prev;
  t = (gint64) p->prk[p->counter / 4 * 4];
  const float sixth = (float) (1.0 / 6), third = (float) (1.0 / 3);
  const float *use_mo = mo;

  switch (p->counter % 4) {
  case 0:
    if (!p->has_cur_mo) {
      for (size_t i = 0; i < n; i++)
        p->cur_mo[i] = sixth * mo[i] + 0.0f;
      p->has_cur_mo = TRUE;
    } else {
      for (size_t i = 0; i < n; i++)
        p->cur_mo[i] = p->cur_mo[i] + sixth * mo[i];
    }
    ets_push (p, mo, FALSE);
    memcpy (p->cur_sample, x, n * sizeof (float));
    p->has_cur_sample = TRUE;
    break;
  case 1:
  case 2:
    if (!p->has_cur_mo) {
      for (size_t i = 0; i < n; i++)
        p->cur_mo[i] = third * mo[i] + 0.0f;
      p->has_cur_mo = TRUE;
    } else {
      for (size_t i = 0; i < n; i++)
        p->cur_mo[i] = p->cur_mo[i] + third * mo[i];
    }
    break;
  default:
    for (size_t i = 0; i < n; i++)
      p->tmp[i] = (p->has_cur_mo ? p->cur_mo[i] : 0.0f) + sixth * mo[i];
    use_mo = p->tmp;
    p->has_cur_mo = FALSE;
    break;
  }
  const float *cur = p->has_cur_sample ? p->cur_sample : x;
  if (!pndm_prev_sample (s, cur, t, prev_t, use_mo, x, n, error))
    return FALSE;
  p->counter++;
  return TRUE;
}

static gboolean
pndm_step_plms (DiffuseScheduler *s, const float *mo_in, float *x, size_t n, GError **error)
{
  PndmPriv *p = s->priv;
  gint64 T = s->c.num_train_timesteps;
  gint64 t = (gint64) s->timesteps[s->pos];
  if (!p->skip_prk_steps && p->n_ets < 3) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED,
                 "%s can only be run after 12 Runge-Kutta iterations", s->klass->name);
    return FALSE;
  }
  gint64 ratio = T / s->num_inference_steps;
  gint64 prev_t = t - ratio;
  if (p->counter != 1) {
    ets_push (p, mo_in, TRUE);
  } else {
    prev_t = t;
    t = t + ratio;
  }
  const float *sample = x;
  float *m = p->tmp;
  g_autofree float *saved = NULL;
  if (p->n_ets == 1 && p->counter == 0) {
    memcpy (m, mo_in, n * sizeof (float));
    memcpy (p->cur_sample, x, n * sizeof (float));
    p->has_cur_sample = TRUE;
  } else if (p->n_ets == 1 && p->counter == 1) {
    const float *e1 = p->ets[0];
    for (size_t i = 0; i < n; i++)
      m[i] = (mo_in[i] + e1[i]) / 2.0f;
    saved = sched_fdup (p->cur_sample, n);
    sample = saved;
    p->has_cur_sample = FALSE;
  } else if (p->n_ets == 2) {
    const float *e1 = p->ets[1], *e2 = p->ets[0];
    for (size_t i = 0; i < n; i++)
      m[i] = (3.0f * e1[i] - e2[i]) / 2.0f;
  } else if (p->n_ets == 3) {
    const float *e1 = p->ets[2], *e2 = p->ets[1], *e3 = p->ets[0];
    for (size_t i = 0; i < n; i++)
      m[i] = ((23.0f * e1[i] - 16.0f * e2[i]) + 5.0f * e3[i]) / 12.0f;
  } else {
    const float *e1 = p->ets[3], *e2 = p->ets[2], *e3 = p->ets[1], *e4 = p->ets[0];
    const float c = (float) (1.0 / 24);
    for (size_t i = 0; i < n; i++)
      m[i] = c * (((55.0f * e1[i] - 59.0f * e2[i]) + 37.0f * e3[i]) - 9.0f * e4[i]);
  }
  if (!pndm_prev_sample (s, sample, t, prev_t, m, x, n, error))
    return FALSE;
  p->counter++;
  return TRUE;
}

static gboolean
pndm_step (DiffuseScheduler *s, const float *mo, float *x, size_t n, DiffuseRng *rng, GError **error)
{
  PndmPriv *p = s->priv;
  if (p->n != n) {
    pndm_clear_run (p);
    p->n = n;
    p->cur_mo = g_new0 (float, n);
    p->cur_sample = g_new0 (float, n);
    p->tmp = g_new0 (float, n);
    p->counter = 0;
    /* counter restarts only with set_timesteps in diffusers; a new size
     * can only come from a new run (sched_check_size enforces it) */
  }
  if (p->counter < p->n_prk && !p->skip_prk_steps)
    return pndm_step_prk (s, mo, x, n, error);
  return pndm_step_plms (s, mo, x, n, error);
}

const SchedClass _diffuse_sched_pndm = {
  .name = "PNDMScheduler",
  .order = 1,
  .has_begin_index = FALSE,
  .index_kind = SCHED_INDEX_NONE,
  .noise_kind = SCHED_NOISE_ALPHAS_CUMPROD,
  .init = pndm_init,
  .set_timesteps = pndm_set_timesteps,
  .scale_model_input = NULL,
  .step = pndm_step,
  .free_priv = pndm_free,
};

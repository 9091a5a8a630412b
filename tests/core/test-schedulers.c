/* Tests of the schedulers (scheduler.h) against diffusers, replaying the
 * cases of tests/reference/make_scheduler_fixtures.py.
 *
 * Each case runs the pipeline loop with the fixture's stand-in model
 *   model (x_in, t) = EPS * 0.9 + x_in * 0.05 + float32 (t) * 1e-4
 * (exactly recomputable in float32) from the stored initial sample, and
 * compares after every call.
 *
 * Every call starts from diffusers' sample of the previous call (teacher
 * forcing), so each step is checked on its own; the multistep histories are
 * the scheduler's own.
 *
 * Tolerances:
 *  - samples and scaled model inputs: max |got - want| <= 1e-5 * max (1, max |want|)
 *    + 4 float32 ulps of max |input sample|, over the tensor: 1e-5 absolute
 *    for values of order 1, 1e-5 relative for the sigma-scaled samples of
 *    the Euler family (|x| up to ~60).  The input term only matters for a
 *    step that cancels a large input: the first Euler / Euler-ancestral step
 *    from sigma 4096 with rescale_betas_zero_snr maps |x| ~ 12000 to ~ 15, and
 *    there torch's float32 sqrt (which is faithful, not correctly rounded:
 *    it gives sqrt (16777215) = 4096, IEEE gives 4095.9998) moves the result
 *    by ~1 ulp of the input (~7e-5 relative to the output);
 *  - timesteps: exact for the integral ones; 2e-4 absolute (on a 0..999
 *    scale) for the float ones that come from diffusers' sigma-to-t
 *    interpolation (Karras / exponential sigmas of Euler, LMS, Heun): numpy
 *    takes the float32 log of the train sigmas with its own SIMD code, which
 *    differs from the C library's logf by one ulp on ~20% of the values, and
 *    the interpolation between neighbouring log-sigmas ~0.003 apart turns
 *    that into up to ~1e-4 in t (numpy's result itself depends on the CPU's
 *    SIMD level);
 *  - sigmas and init_noise_sigma: 2e-6 relative (float32, a few ulps). */
#include "testutil.h"
#include <diffuse/scheduler.h>

#include <float.h>
#include <math.h>
#include <string.h>

#define TOL 1e-5
#define INPUT_ULPS 4.0
#define TS_TOL 2e-4

typedef struct {
  JsonParser *parser;
  JsonArray *cases;
  DiffuseSafetensors *st;
  const float *eps, *base;
  guint n;   /* elements per sample */
} Fx;

static const float *
entry_f32 (DiffuseSafetensors *st, const char *name, size_t count)
{
  const DiffuseStEntry *e = diffuse_safetensors_find (st, name);
  if (!e)
    g_error ("fixture tensor %s missing", name);
  g_assert_cmpint (e->dtype, ==, DIFFUSE_ST_F32);
  g_assert_cmpuint (e->nbytes, ==, count * sizeof (float));
  return e->data;
}

static gboolean
fx_open (Fx *fx)
{
  if (!tu_have_fixture ("schedulers/cases.json") || !tu_have_fixture ("schedulers/samples.safetensors"))
    return FALSE;
  g_autofree char *jp = tu_fixture ("schedulers/cases.json");
  fx->parser = json_parser_new ();
  g_autoptr (GError) err = NULL;
  g_assert_true (json_parser_load_from_file (fx->parser, jp, &err));
  JsonObject *root = json_node_get_object (json_parser_get_root (fx->parser));
  fx->cases = json_object_get_array_member (root, "cases");
  JsonArray *shape = json_object_get_array_member (root, "shape");
  fx->n = 1;
  for (guint i = 0; i < json_array_get_length (shape); i++)
    fx->n *= (guint) json_array_get_int_element (shape, i);
  fx->st = tu_open ("schedulers/samples.safetensors");
  fx->eps = entry_f32 (fx->st, "eps", fx->n);
  fx->base = entry_f32 (fx->st, "base", fx->n);
  g_test_message ("fixtures from diffusers %s, torch %s", json_object_get_string_member (root, "diffusers"),
                  json_object_get_string_member (root, "torch"));
  return TRUE;
}

static void
fx_close (Fx *fx)
{
  diffuse_safetensors_unref (fx->st);
  g_object_unref (fx->parser);
}

static double
max_abs (const float *v, size_t n)
{
  double m = 0;
  for (size_t i = 0; i < n; i++)
    m = MAX (m, fabs ((double) v[i]));
  return m;
}

/* max |got - want| / max (1, max |want|) */
static double
scaled_err (const float *got, const float *want, size_t n)
{
  double e = 0, m = 1;
  for (size_t i = 0; i < n; i++) {
    double d = fabs ((double) got[i] - want[i]);
    if (isnan (d))
      d = (isnan (got[i]) && isnan (want[i])) ? 0 : INFINITY;
    e = MAX (e, d);
    m = MAX (m, fabs ((double) want[i]));
  }
  return e / m;
}

typedef struct {
  const char *cls;
  guint cases;
  double worst;        /* largest scaled error */
  double worst_ord;    /* the same over steps whose input |x| <= 100 */
  double worst_ratio;  /* largest error / tolerance */
} ClassStat;

static void
record_failure (GPtrArray *fails, char *msg)
{
  g_test_message ("FAIL %s", msg);
  g_ptr_array_add (fails, msg);
}

static void
run_case (Fx *fx, JsonObject *c, GHashTable *stats, double *ts_dev, GPtrArray *fails)
{
  const char *name = json_object_get_string_member (c, "name");
  const char *cls = json_object_get_string_member (c, "cls");
  guint n = fx->n;
  g_autoptr (DiffuseConfig) cfg = diffuse_config_from_object (json_object_get_object_member (c, "config"), name);
  g_autoptr (GError) err = NULL;
  g_autoptr (DiffuseScheduler) s = NULL;
  if (json_object_get_boolean_member (c, "swap"))
    s = diffuse_scheduler_new_by_name (cls, cfg, &err);
  else
    s = diffuse_scheduler_new_from_config (cfg, &err);
  if (!s)
    g_error ("%s (%s): %s", name, cls, err->message);
  g_assert_cmpstr (diffuse_scheduler_class_name (s), ==, cls);
  g_assert_cmpuint (diffuse_scheduler_order (s), ==, json_object_get_int_member (c, "order"));

  guint steps = (guint) json_object_get_int_member (c, "steps");
  if (json_object_has_member (c, "lcm")) {
    JsonObject *l = json_object_get_object_member (c, "lcm");
    g_assert_true (diffuse_scheduler_set_timesteps_lcm (s, steps, (guint) json_object_get_int_member (l, "original_inference_steps"),
                                                        json_object_get_double_member (l, "strength"), &err));
  } else if (!diffuse_scheduler_set_timesteps (s, steps, &err)) {
    g_error ("%s: %s", name, err->message);
  }
  if (json_object_has_member (c, "eta"))
    diffuse_scheduler_set_eta (s, json_object_get_double_member (c, "eta"));
  g_assert_cmpuint (diffuse_scheduler_num_inference_steps (s), ==, json_object_get_int_member (c, "num_inference_steps"));

  /* timesteps */
  JsonArray *jt = json_object_get_array_member (c, "timesteps");
  guint nt = 0;
  const double *ts = diffuse_scheduler_timesteps (s, &nt);
  if (nt != json_array_get_length (jt))
    g_error ("%s: %u timesteps, diffusers has %u", name, nt, json_array_get_length (jt));
  for (guint i = 0; i < nt; i++) {
    double w = json_array_get_double_element (jt, i);
    gboolean integral = w == floor (w) && ts[i] == floor (ts[i]);
    if ((integral && ts[i] != w) || fabs (ts[i] - w) > TS_TOL)
      g_error ("%s: timestep %u is %.9g, diffusers %.9g", name, i, ts[i], w);
    *ts_dev = MAX (*ts_dev, fabs (ts[i] - w));
  }
  /* sigmas */
  JsonNode *jsn = json_object_get_member (c, "sigmas");
  guint ns = 0;
  const float *sig = diffuse_scheduler_sigmas (s, &ns);
  if (jsn && !JSON_NODE_HOLDS_NULL (jsn)) {
    JsonArray *js = json_node_get_array (jsn);
    if (!sig || ns != json_array_get_length (js))
      g_error ("%s: %u sigmas, diffusers has %u", name, ns, json_array_get_length (js));
    for (guint i = 0; i < ns; i++) {
      double w = json_array_get_double_element (js, i);
      if (fabs (sig[i] - w) > 2e-6 * MAX (fabs (w), 1e-3))
        g_error ("%s: sigma %u is %.9g, diffusers %.9g", name, i, sig[i], w);
    }
  } else {
    g_assert_null (sig);
  }
  double ins = json_object_get_double_member (c, "init_noise_sigma");
  if (fabs (diffuse_scheduler_init_noise_sigma (s) - ins) > 2e-6 * MAX (1, ins))
    g_error ("%s: init_noise_sigma %.9g, diffusers %.9g", name, diffuse_scheduler_init_noise_sigma (s), ins);

  /* initial sample */
  g_autoptr (DiffuseRng) rng = NULL;
  if (json_object_has_member (c, "seed") && !json_node_is_null (json_object_get_member (c, "seed")))
    rng = diffuse_rng_new ((guint64) json_object_get_int_member (c, "seed"));
  g_autofree float *x = g_new (float, n);
  g_autofree char *k0 = g_strdup_printf ("%s_x0", name);
  const float *want_x0 = entry_f32 (fx->st, k0, n);
  double worst = 0, worst_ord = 0, worst_ratio = 0;
  if (json_object_has_member (c, "strength")) {
    guint n_after = 0;
    guint begin = diffuse_scheduler_apply_strength (s, json_object_get_double_member (c, "strength"), &n_after);
    g_assert_cmpuint (begin, ==, json_object_get_int_member (c, "begin"));
    g_assert_cmpuint (n_after, ==, json_object_get_int_member (c, "img2img_steps"));
    g_assert_cmpuint (diffuse_scheduler_position (s), ==, begin);
    g_autofree float *init = g_new (float, n);
    g_autofree float *noise = g_new (float, n);
    for (guint i = 0; i < n; i++)
      init[i] = fx->base[i] * 0.5f;
    diffuse_rng_randn (rng, noise, n);
    g_assert_true (diffuse_scheduler_add_noise (s, init, noise, x, n, diffuse_scheduler_current_timestep (s), &err));
    g_assert_no_error (err);
    double e = scaled_err (x, want_x0, n);
    if (e > TOL)
      g_error ("%s: add_noise off by %.3g (scaled)", name, e);
    worst = MAX (worst, e);
  } else {
    float sigma = diffuse_scheduler_init_noise_sigma (s);
    for (guint i = 0; i < n; i++)
      x[i] = fx->base[i] * sigma;
    double e = scaled_err (x, want_x0, n);
    if (e > TOL)
      g_error ("%s: initial latents off by %.3g (scaled)", name, e);
    worst = MAX (worst, e);
  }
  memcpy (x, want_x0, n * sizeof (float));

  guint calls = (guint) json_object_get_int_member (c, "calls");
  g_autofree char *kx = g_strdup_printf ("%s_x", name);
  g_autofree char *kxs = g_strdup_printf ("%s_xs", name);
  const float *want_x = entry_f32 (fx->st, kx, (size_t) calls * n);
  const float *want_xs = diffuse_safetensors_find (fx->st, kxs) ? entry_f32 (fx->st, kxs, (size_t) calls * n) : NULL;
  g_autofree float *xs = g_new (float, n);
  g_autofree float *mo = g_new (float, n);
  for (guint k = 0; k < calls; k++) {
    double t = diffuse_scheduler_current_timestep (s);
    /* teacher forcing: every call starts from diffusers' sample, so each
     * step is checked on its own and errors do not compound */
    if (k > 0)
      memcpy (x, want_x + (size_t) (k - 1) * n, n * sizeof (float));
    double in_mag = 0;
    for (guint i = 0; i < n; i++)
      in_mag = MAX (in_mag, fabs (x[i]));
    double tol = TOL + INPUT_ULPS * FLT_EPSILON * in_mag / MAX (1.0, max_abs (want_x + (size_t) k * n, n));
    memcpy (xs, x, n * sizeof (float));
    diffuse_scheduler_scale_model_input (s, xs, n);
    if (want_xs) {
      double e = scaled_err (xs, want_xs + (size_t) k * n, n);
      if (e > TOL + INPUT_ULPS * FLT_EPSILON * in_mag / MAX (1.0, max_abs (want_xs + (size_t) k * n, n)))
        record_failure (fails, g_strdup_printf ("%s (%s): scaled input of call %u off by %.3g (scaled)", name, cls, k, e));
      worst = MAX (worst, e);
    } else {
      g_assert_cmpmem (xs, n * sizeof (float), x, n * sizeof (float));
    }
    float tf = (float) t;
    float tc = tf * 1e-4f;
    for (guint i = 0; i < n; i++)
      mo[i] = (fx->eps[i] * 0.9f + xs[i] * 0.05f) + tc;
    if (!diffuse_scheduler_step (s, mo, x, n, rng, &err))
      g_error ("%s: step %u: %s", name, k, err->message);
    double e = scaled_err (x, want_x + (size_t) k * n, n);
    if (e > tol)
      record_failure (fails, g_strdup_printf ("%s (%s): sample after call %u (t=%g) off by %.3g (scaled)", name, cls, k,
                                              t, e));
    worst = MAX (worst, e);
    if (in_mag <= 100)
      worst_ord = MAX (worst_ord, e);
    worst_ratio = MAX (worst_ratio, e / tol);
  }
  g_assert_cmpuint (diffuse_scheduler_position (s), ==, nt);
  /* one more step is an error, not a crash */
  g_assert_false (diffuse_scheduler_step (s, mo, x, n, rng, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);

  ClassStat *st = g_hash_table_lookup (stats, cls);
  if (!st) {
    st = g_new0 (ClassStat, 1);
    st->cls = cls;
    g_hash_table_insert (stats, (gpointer) cls, st);
  }
  st->cases++;
  st->worst = MAX (st->worst, worst);
  st->worst_ord = MAX (st->worst_ord, worst_ord);
  st->worst_ratio = MAX (st->worst_ratio, worst_ratio);
}

static void
test_schedulers_fixtures (void)
{
  Fx fx = { 0 };
  if (!fx_open (&fx))
    return;
  g_autoptr (GHashTable) stats = g_hash_table_new_full (g_str_hash, g_str_equal, NULL, g_free);
  guint nc = json_array_get_length (fx.cases);
  double ts_dev = 0;
  g_autoptr (GPtrArray) fails = g_ptr_array_new_with_free_func (g_free);
  for (guint i = 0; i < nc; i++)
    run_case (&fx, json_array_get_object_element (fx.cases, i), stats, &ts_dev, fails);
  g_test_message ("largest timestep deviation %.3g", ts_dev);
  const char *const *classes = diffuse_scheduler_list_classes ();
  for (guint i = 0; classes[i]; i++) {
    ClassStat *st = g_hash_table_lookup (stats, classes[i]);
    g_assert_nonnull (st);   /* every class has cases */
    g_test_message ("%-32s %2u cases, worst scaled error %.2e (%.2e where |input| <= 100), %.0f%% of tolerance",
                    classes[i], st->cases, st->worst, st->worst_ord, 100 * st->worst_ratio);
  }
  g_test_message ("%u cases, %u failures", nc, fails->len);
  g_assert_cmpuint (fails->len, ==, 0);
  g_assert_cmpuint (nc, >=, 90);
  fx_close (&fx);
}

static DiffuseConfig *
cfg (const char *json)
{
  g_autoptr (GError) err = NULL;
  DiffuseConfig *c = diffuse_config_from_string (json, "test-config", &err);
  g_assert_no_error (err);
  return c;
}

static void
test_schedulers_compatibles (void)
{
  const char *const *c = diffuse_scheduler_compatibles ("EulerDiscreteScheduler");
  g_assert_nonnull (c);
  g_assert_cmpuint (g_strv_length ((char **) c), ==, 15);
  g_assert_true (g_strv_contains (c, "EulerDiscreteScheduler"));
  g_assert_true (g_strv_contains (c, "DPMSolverMultistepScheduler"));
  g_assert_true (g_strv_contains (c, "EDMEulerScheduler"));
  g_assert_false (g_strv_contains (c, "LCMScheduler"));
  const char *const *d = diffuse_scheduler_compatibles ("PNDMScheduler");
  g_assert_true (d == c);
  const char *const *l = diffuse_scheduler_compatibles ("LCMScheduler");
  g_assert_cmpuint (g_strv_length ((char **) l), ==, 1);
  g_assert_cmpstr (l[0], ==, "LCMScheduler");
  g_assert_null (diffuse_scheduler_compatibles ("NoSuchScheduler"));
  g_assert_null (diffuse_scheduler_compatibles (NULL));
  /* every implemented class except LCM is compatible with the SD list */
  const char *const *all = diffuse_scheduler_list_classes ();
  g_assert_cmpuint (g_strv_length ((char **) all), ==, 10);
  for (guint i = 0; all[i]; i++) {
    g_assert_true (diffuse_scheduler_class_supported (all[i]));
    if (strcmp (all[i], "LCMScheduler") != 0)
      g_assert_true (g_strv_contains (c, all[i]));
  }
  g_assert_false (diffuse_scheduler_class_supported ("KDPM2DiscreteScheduler"));
}

static void
test_schedulers_swap (void)
{
  g_autoptr (DiffuseConfig) pndm = cfg ("{\"_class_name\": \"PNDMScheduler\", \"beta_start\": 0.00085, \"beta_end\": 0.012,"
                                        " \"beta_schedule\": \"scaled_linear\", \"steps_offset\": 1, \"skip_prk_steps\": true,"
                                        " \"my_key\": 7, \"_use_default_values\": [\"steps_offset\"]}");
  g_autoptr (GError) err = NULL;
  g_autoptr (DiffuseScheduler) e = diffuse_scheduler_new_by_name ("EulerDiscreteScheduler", pndm, &err);
  g_assert_no_error (err);
  DiffuseConfig *ec = diffuse_scheduler_get_config (e);
  g_assert_cmpstr (diffuse_config_get_string (ec, "_class_name", NULL), ==, "EulerDiscreteScheduler");
  g_assert_cmpstr (diffuse_config_get_string (ec, "beta_schedule", NULL), ==, "scaled_linear");
  g_assert_cmpfloat (diffuse_config_get_double (ec, "beta_start", 0), ==, 0.00085);
  g_assert_cmpint (diffuse_config_get_int (ec, "my_key", 0), ==, 7);             /* unknown keys kept */
  g_assert_false (diffuse_config_has (ec, "steps_offset"));                     /* was a default */
  g_assert_false (diffuse_config_has (ec, "_use_default_values"));
  /* and it runs with the config's betas: Euler with scaled_linear has
   * sigma_max ~14.61 (linear would give ~157) */
  g_assert_true (diffuse_scheduler_set_timesteps (e, 10, &err));
  g_assert_cmpfloat (fabsf (diffuse_scheduler_init_noise_sigma (e) - 14.6146f), <, 1e-3);
  /* swapping back */
  g_autoptr (DiffuseScheduler) p = diffuse_scheduler_new_by_name ("PNDMScheduler", ec, &err);
  g_assert_no_error (err);
  g_assert_cmpstr (diffuse_scheduler_class_name (p), ==, "PNDMScheduler");
  /* NULL base: all defaults */
  g_autoptr (DiffuseScheduler) d = diffuse_scheduler_new_by_name ("DDIMScheduler", NULL, &err);
  g_assert_no_error (err);
  g_assert_true (diffuse_scheduler_set_timesteps (d, 50, &err));
  guint n = 0;
  const double *ts = diffuse_scheduler_timesteps (d, &n);
  g_assert_cmpuint (n, ==, 50);
  g_assert_cmpfloat (ts[0], ==, 980);
  g_assert_cmpfloat (ts[49], ==, 0);
}

static void
expect_error (const char *json, gint code, const char *what)
{
  g_autoptr (DiffuseConfig) c = cfg (json);
  g_autoptr (GError) err = NULL;
  DiffuseScheduler *s = diffuse_scheduler_new_from_config (c, &err);
  if (s)
    g_error ("%s: expected an error", what);
  g_assert_error (err, DIFFUSE_ERROR, code);
  g_test_message ("%s: %s", what, err->message);
}

static void
test_schedulers_errors (void)
{
  g_autoptr (GError) err = NULL;
  expect_error ("{\"_class_name\": \"NoSuchScheduler\"}", DIFFUSE_ERROR_UNSUPPORTED, "unknown class");
  expect_error ("{\"beta_start\": 0.1}", DIFFUSE_ERROR_CONFIG, "no _class_name");
  expect_error ("{\"_class_name\": 3}", DIFFUSE_ERROR_CONFIG, "_class_name not a string");
  expect_error ("{\"_class_name\": \"DDIMScheduler\", \"beta_start\": \"x\"}", DIFFUSE_ERROR_CONFIG, "bad type");
  expect_error ("{\"_class_name\": \"DDIMScheduler\", \"thresholding\": true}", DIFFUSE_ERROR_UNSUPPORTED, "thresholding");
  expect_error ("{\"_class_name\": \"DDIMScheduler\", \"beta_schedule\": \"quadratic\"}", DIFFUSE_ERROR_UNSUPPORTED,
                "beta_schedule");
  expect_error ("{\"_class_name\": \"EulerDiscreteScheduler\", \"timestep_spacing\": \"odd\"}", DIFFUSE_ERROR_UNSUPPORTED,
                "timestep_spacing");
  expect_error ("{\"_class_name\": \"EulerAncestralDiscreteScheduler\", \"prediction_type\": \"sample\"}",
                DIFFUSE_ERROR_UNSUPPORTED, "prediction_type");
  expect_error ("{\"_class_name\": \"DPMSolverMultistepScheduler\", \"algorithm_type\": \"dpmsolver\"}",
                DIFFUSE_ERROR_CONFIG, "dpmsolver with final sigma zero");
  expect_error ("{\"_class_name\": \"DPMSolverMultistepScheduler\", \"solver_order\": 5}", DIFFUSE_ERROR_UNSUPPORTED,
                "solver_order");
  expect_error ("{\"_class_name\": \"EulerDiscreteScheduler\", \"use_karras_sigmas\": true, \"use_exponential_sigmas\": true}",
                DIFFUSE_ERROR_CONFIG, "two sigma schedules");
  expect_error ("{\"_class_name\": \"DDIMScheduler\", \"trained_betas\": [0.1, 0.2]}", DIFFUSE_ERROR_CONFIG,
                "trained_betas length");
  expect_error ("{\"_class_name\": \"UniPCMultistepScheduler\", \"use_flow_sigmas\": true}", DIFFUSE_ERROR_UNSUPPORTED,
                "flow sigmas");

  g_assert_null (diffuse_scheduler_new_by_name ("NoSuchScheduler", NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED);
  g_assert_nonnull (strstr (err->message, "NoSuchScheduler"));
  g_clear_error (&err);

  const char *const *all = diffuse_scheduler_list_classes ();
  float x[16] = { 0 }, mo[16] = { 0 };
  for (guint i = 0; all[i]; i++) {
    g_autoptr (DiffuseScheduler) s = diffuse_scheduler_new_by_name (all[i], NULL, &err);
    g_assert_no_error (err);
    /* stepping before set_timesteps */
    g_assert_false (diffuse_scheduler_step (s, mo, x, 16, NULL, &err));
    g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
    g_clear_error (&err);
    /* zero steps */
    g_assert_false (diffuse_scheduler_set_timesteps (s, 0, &err));
    g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
    g_clear_error (&err);
    /* more steps than train timesteps: an error where diffusers raises */
    gboolean raises = strcmp (all[i], "DDIMScheduler") == 0 || strcmp (all[i], "DDPMScheduler") == 0 ||
                      strcmp (all[i], "LCMScheduler") == 0;
    gboolean ok = diffuse_scheduler_set_timesteps (s, 1001, &err);
    if (raises) {
      g_assert_false (ok);
      g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
      g_clear_error (&err);
    } else if (!ok) {
      /* PNDM's Runge-Kutta warm-up is the one other refusal */
      g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
      g_clear_error (&err);
    }
  }
  /* PNDM without skip_prk_steps needs 4 steps, as diffusers */
  g_autoptr (DiffuseScheduler) pndm = diffuse_scheduler_new_by_name ("PNDMScheduler", NULL, &err);
  g_assert_false (diffuse_scheduler_set_timesteps (pndm, 3, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  /* an ancestral step without a generator */
  g_autoptr (DiffuseScheduler) ea = diffuse_scheduler_new_by_name ("EulerAncestralDiscreteScheduler", NULL, &err);
  g_assert_true (diffuse_scheduler_set_timesteps (ea, 4, &err));
  g_assert_false (diffuse_scheduler_step (ea, mo, x, 16, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  /* changing the sample size within a run */
  g_autoptr (DiffuseScheduler) eu = diffuse_scheduler_new_by_name ("EulerDiscreteScheduler", NULL, &err);
  g_assert_true (diffuse_scheduler_set_timesteps (eu, 4, &err));
  g_assert_true (diffuse_scheduler_step (eu, mo, x, 16, NULL, &err));
  g_assert_false (diffuse_scheduler_step (eu, mo, x, 8, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  /* add_noise with a timestep that is not in the schedule */
  g_assert_false (diffuse_scheduler_add_noise (eu, x, x, x, 16, 123.5, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  /* LCM: more steps than original_inference_steps */
  g_autoptr (DiffuseScheduler) lcm = diffuse_scheduler_new_by_name ("LCMScheduler", NULL, &err);
  g_assert_false (diffuse_scheduler_set_timesteps (lcm, 51, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  g_assert_false (diffuse_scheduler_set_timesteps_lcm (eu, 4, 0, 1.0, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
}

/* Heun lists every inner timestep twice, as diffusers does */
static void
test_schedulers_heun_layout (void)
{
  g_autoptr (GError) err = NULL;
  g_autoptr (DiffuseScheduler) h = diffuse_scheduler_new_by_name ("HeunDiscreteScheduler", NULL, &err);
  g_assert_true (diffuse_scheduler_set_timesteps (h, 5, &err));
  guint n = 0, ns = 0;
  const double *ts = diffuse_scheduler_timesteps (h, &n);
  diffuse_scheduler_sigmas (h, &ns);
  g_assert_cmpuint (n, ==, 9);
  g_assert_cmpuint (ns, ==, 10);
  for (guint i = 1; i < n; i += 2)
    g_assert_cmpfloat (ts[i], ==, ts[i + 1]);
  g_assert_cmpuint (diffuse_scheduler_order (h), ==, 2);
  guint after = 0;
  g_assert_cmpuint (diffuse_scheduler_apply_strength (h, 0.6, &after), ==, 4);   /* t_start 2 * order 2 */
  g_assert_cmpuint (after, ==, 3);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/schedulers/compatibles", test_schedulers_compatibles);
  g_test_add_func ("/schedulers/swap", test_schedulers_swap);
  g_test_add_func ("/schedulers/errors", test_schedulers_errors);
  g_test_add_func ("/schedulers/heun-layout", test_schedulers_heun_layout);
  g_test_add_func ("/schedulers/diffusers-fixtures", test_schedulers_fixtures);
  return g_test_run ();
}

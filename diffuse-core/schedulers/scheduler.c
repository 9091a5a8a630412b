/* gst-diffuse — the scheduler registry (class names, compatibles,
 * from_config rules) and the public entry points that every class shares. */
#include "sched-private.h"

static const SchedClass *const classes[] = {
  &_diffuse_sched_pndm,
  &_diffuse_sched_ddim,
  &_diffuse_sched_ddpm,
  &_diffuse_sched_lms,
  &_diffuse_sched_euler,
  &_diffuse_sched_euler_ancestral,
  &_diffuse_sched_heun,
  &_diffuse_sched_dpm_multistep,
  &_diffuse_sched_unipc,
  &_diffuse_sched_lcm,
  NULL,
};

static const char *const class_names[] = {
  "PNDMScheduler",
  "DDIMScheduler",
  "DDPMScheduler",
  "LMSDiscreteScheduler",
  "EulerDiscreteScheduler",
  "EulerAncestralDiscreteScheduler",
  "HeunDiscreteScheduler",
  "DPMSolverMultistepScheduler",
  "UniPCMultistepScheduler",
  "LCMScheduler",
  NULL,
};

/* diffusers' KarrasDiffusionSchedulers, in the enum's order */
static const char *const karras_compatibles[] = {
  "DDIMScheduler",
  "DDPMScheduler",
  "PNDMScheduler",
  "LMSDiscreteScheduler",
  "EulerDiscreteScheduler",
  "HeunDiscreteScheduler",
  "EulerAncestralDiscreteScheduler",
  "DPMSolverMultistepScheduler",
  "DPMSolverSinglestepScheduler",
  "KDPM2DiscreteScheduler",
  "KDPM2AncestralDiscreteScheduler",
  "DEISMultistepScheduler",
  "UniPCMultistepScheduler",
  "DPMSolverSDEScheduler",
  "EDMEulerScheduler",
  NULL,
};

static const char *const lcm_compatibles[] = { "LCMScheduler", NULL };

const char *const *
diffuse_scheduler_list_classes (void)
{
  return class_names;
}

static const SchedClass *
find_class (const char *name)
{
  for (guint i = 0; classes[i]; i++)
    if (g_strcmp0 (classes[i]->name, name) == 0)
      return classes[i];
  return NULL;
}

gboolean
diffuse_scheduler_class_supported (const char *class_name)
{
  return class_name != NULL && find_class (class_name) != NULL;
}

const char *const *
diffuse_scheduler_compatibles (const char *class_name)
{
  if (g_strcmp0 (class_name, "LCMScheduler") == 0)
    return lcm_compatibles;
  for (guint i = 0; karras_compatibles[i]; i++)
    if (g_strcmp0 (karras_compatibles[i], class_name) == 0)
      return karras_compatibles;
  return NULL;
}

/* ---- construction ----------------------------------------------------- */

/* diffusers' extract_init_dict, the part that matters here: keys named in
 * "_use_default_values" fall back to the class defaults.  The copy carries
 * "_class_name" = the class built. */
static DiffuseConfig *
effective_config (DiffuseConfig *base, const char *class_name)
{
  JsonObject *out = json_object_new ();
  const char *label = base ? diffuse_config_label (base) : "scheduler_config";
  if (base) {
    JsonObject *in = diffuse_config_object (base);
    GHashTable *defaults = g_hash_table_new (g_str_hash, g_str_equal);
    JsonNode *ud = json_object_get_member (in, "_use_default_values");
    if (ud && JSON_NODE_HOLDS_ARRAY (ud)) {
      JsonArray *a = json_node_get_array (ud);
      for (guint i = 0; i < json_array_get_length (a); i++) {
        JsonNode *e = json_array_get_element (a, i);
        if (JSON_NODE_HOLDS_VALUE (e) && json_node_get_value_type (e) == G_TYPE_STRING)
          g_hash_table_add (defaults, (gpointer) json_node_get_string (e));
      }
    }
    GList *members = json_object_get_members (in);
    for (GList *l = members; l; l = l->next) {
      const char *k = l->data;
      if (g_strcmp0 (k, "_use_default_values") == 0 || g_strcmp0 (k, "_class_name") == 0 ||
          g_hash_table_contains (defaults, k))
        continue;
      json_object_set_member (out, k, json_node_copy (json_object_get_member (in, k)));
    }
    g_list_free (members);
    g_hash_table_unref (defaults);
  }
  json_object_set_string_member (out, "_class_name", class_name);
  DiffuseConfig *c = diffuse_config_from_object (out, label);
  json_object_unref (out);
  return c;
}

static DiffuseScheduler *
build (const SchedClass *klass, DiffuseConfig *base, GError **error)
{
  DiffuseScheduler *s = g_new0 (DiffuseScheduler, 1);
  s->klass = klass;
  s->config = effective_config (base, klass->name);
  s->step_index = -1;
  s->begin_index = -1;
  s->init_noise_sigma = 1.0f;
  SchedCfg r = { s->config, error, TRUE };
  if (!klass->init (s, &r, error)) {
    g_assert (error == NULL || *error != NULL);
    diffuse_scheduler_free (s);
    return NULL;
  }
  return s;
}

static void
unknown_class (const char *name, const char *where, GError **error)
{
  g_autofree char *list = g_strjoinv (", ", (char **) class_names);
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED, "%s: unknown or unsupported scheduler class \"%s\" "
               "(supported: %s)", where, name ? name : "(none)", list);
}

DiffuseScheduler *
diffuse_scheduler_new_by_name (const char *class_name, DiffuseConfig *base_config, GError **error)
{
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);
  const SchedClass *k = find_class (class_name);
  if (!k) {
    unknown_class (class_name, base_config ? diffuse_config_label (base_config) : "scheduler", error);
    return NULL;
  }
  return build (k, base_config, error);
}

DiffuseScheduler *
diffuse_scheduler_new_from_config (DiffuseConfig *config, GError **error)
{
  g_return_val_if_fail (config != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);
  const char *name = NULL;
  if (!diffuse_config_get_string_checked (config, "_class_name", NULL, &name, error))
    return NULL;
  if (!name) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: no \"_class_name\": cannot tell which scheduler",
                 diffuse_config_label (config));
    return NULL;
  }
  const SchedClass *k = find_class (name);
  if (!k) {
    unknown_class (name, diffuse_config_label (config), error);
    return NULL;
  }
  return build (k, config, error);
}

DiffuseScheduler *
diffuse_scheduler_load (const char *path, GError **error)
{
  g_autoptr (DiffuseConfig) c = diffuse_config_load (path, error);
  if (!c)
    return NULL;
  return diffuse_scheduler_new_from_config (c, error);
}

void
diffuse_scheduler_free (DiffuseScheduler *s)
{
  if (!s)
    return;
  if (s->priv && s->klass->free_priv)
    s->klass->free_priv (s->priv);
  if (s->config)
    diffuse_config_unref (s->config);
  g_free (s->betas);
  g_free (s->alphas_cumprod);
  g_free (s->timesteps);
  g_free (s->sigmas);
  g_free (s);
}

const char *
diffuse_scheduler_class_name (DiffuseScheduler *s)
{
  g_return_val_if_fail (s != NULL, NULL);
  return s->klass->name;
}

DiffuseConfig *
diffuse_scheduler_get_config (DiffuseScheduler *s)
{
  g_return_val_if_fail (s != NULL, NULL);
  return s->config;
}

guint
diffuse_scheduler_order (DiffuseScheduler *s)
{
  g_return_val_if_fail (s != NULL, 1);
  return s->klass->order;
}

guint
diffuse_scheduler_num_train_timesteps (DiffuseScheduler *s)
{
  g_return_val_if_fail (s != NULL, 0);
  return (guint) s->c.num_train_timesteps;
}

/* ---- a run ------------------------------------------------------------ */

static void
reset_run (DiffuseScheduler *s)
{
  s->pos = 0;
  s->step_index = -1;
  s->begin_index = -1;
  s->n = 0;
}

gboolean
diffuse_scheduler_set_timesteps (DiffuseScheduler *s, guint num_inference_steps, GError **error)
{
  g_return_val_if_fail (s != NULL, FALSE);
  if (num_inference_steps == 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: num_inference_steps must be at least 1",
                 s->klass->name);
    return FALSE;
  }
  reset_run (s);
  if (!s->klass->set_timesteps (s, num_inference_steps, error)) {
    s->have_timesteps = FALSE;
    return FALSE;
  }
  return TRUE;
}

gboolean
_diffuse_sched_lcm_set_timesteps (DiffuseScheduler *s, guint n, guint original, double strength, GError **error);

gboolean
diffuse_scheduler_set_timesteps_lcm (DiffuseScheduler *s, guint num_inference_steps, guint original_inference_steps,
                                     double strength, GError **error)
{
  g_return_val_if_fail (s != NULL, FALSE);
  if (s->klass != &_diffuse_sched_lcm) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s is not an LCMScheduler", s->klass->name);
    return FALSE;
  }
  if (num_inference_steps == 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: num_inference_steps must be at least 1",
                 s->klass->name);
    return FALSE;
  }
  reset_run (s);
  if (!_diffuse_sched_lcm_set_timesteps (s, num_inference_steps, original_inference_steps, strength, error)) {
    s->have_timesteps = FALSE;
    return FALSE;
  }
  return TRUE;
}

const double *
diffuse_scheduler_timesteps (DiffuseScheduler *s, guint *n)
{
  g_return_val_if_fail (s != NULL, NULL);
  if (n)
    *n = s->have_timesteps ? s->n_timesteps : 0;
  return s->have_timesteps ? s->timesteps : NULL;
}

const float *
diffuse_scheduler_sigmas (DiffuseScheduler *s, guint *n)
{
  g_return_val_if_fail (s != NULL, NULL);
  if (n)
    *n = s->have_timesteps && s->sigmas ? s->n_sigmas : 0;
  return s->have_timesteps ? s->sigmas : NULL;
}

guint
diffuse_scheduler_num_inference_steps (DiffuseScheduler *s)
{
  g_return_val_if_fail (s != NULL, 0);
  return s->have_timesteps ? s->num_inference_steps : 0;
}

float
diffuse_scheduler_init_noise_sigma (DiffuseScheduler *s)
{
  g_return_val_if_fail (s != NULL, 1.0f);
  return s->init_noise_sigma;
}

guint
diffuse_scheduler_position (DiffuseScheduler *s)
{
  g_return_val_if_fail (s != NULL, 0);
  return s->pos;
}

double
diffuse_scheduler_current_timestep (DiffuseScheduler *s)
{
  g_return_val_if_fail (s != NULL, -1);
  if (!s->have_timesteps || s->pos >= s->n_timesteps)
    return -1;
  return s->timesteps[s->pos];
}

void
diffuse_scheduler_set_begin_index (DiffuseScheduler *s, guint begin_index)
{
  g_return_if_fail (s != NULL);
  s->pos = begin_index;
  if (s->klass->has_begin_index)
    s->begin_index = (gint) begin_index;
}

guint
diffuse_scheduler_apply_strength (DiffuseScheduler *s, double strength, guint *n_steps)
{
  g_return_val_if_fail (s != NULL, 0);
  guint steps = s->num_inference_steps;
  double prod = steps * strength;
  gint64 init = prod >= 0 ? (gint64) prod : 0;       /* Python int () truncates */
  if (init > steps)
    init = steps;
  gint64 t_start = (gint64) steps - init;
  if (t_start < 0)
    t_start = 0;
  guint begin = (guint) t_start * s->klass->order;
  diffuse_scheduler_set_begin_index (s, begin);
  if (n_steps)
    *n_steps = steps - (guint) t_start;
  return begin;
}

void
diffuse_scheduler_set_noise_dtype (DiffuseScheduler *s, DiffuseRngDType dtype)
{
  g_return_if_fail (s != NULL);
  g_return_if_fail (dtype == DIFFUSE_RNG_F32 || dtype == DIFFUSE_RNG_F16 || dtype == DIFFUSE_RNG_BF16);
  s->noise_dtype = dtype;
}

void
diffuse_scheduler_set_eta (DiffuseScheduler *s, double eta)
{
  g_return_if_fail (s != NULL);
  s->eta = eta;
}

/* diffusers' _init_step_index: begin_index when set, else the index of the
 * timestep the pipeline passes (timesteps[pos]). */
static gboolean
ensure_step_index (DiffuseScheduler *s, GError **error)
{
  if (s->klass->index_kind == SCHED_INDEX_NONE || s->step_index >= 0)
    return TRUE;
  if (s->begin_index >= 0) {
    s->step_index = s->begin_index;
    return TRUE;
  }
  gint idx = sched_index_for_timestep (s, s->timesteps[s->pos]);
  if (idx < 0) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "%s: timestep %g not in the schedule", s->klass->name,
                 s->timesteps[s->pos]);
    return FALSE;
  }
  s->step_index = idx;
  return TRUE;
}

static gboolean
check_running (DiffuseScheduler *s, GError **error)
{
  if (!s->have_timesteps) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "%s: set_timesteps must be called before stepping", s->klass->name);
    return FALSE;
  }
  if (s->pos >= s->n_timesteps) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "%s: all %u timesteps have been stepped", s->klass->name, s->n_timesteps);
    return FALSE;
  }
  return TRUE;
}

void
diffuse_scheduler_scale_model_input (DiffuseScheduler *s, float *sample, size_t n)
{
  g_return_if_fail (s != NULL);
  g_return_if_fail (sample != NULL || n == 0);
  if (!s->klass->scale_model_input)
    return;
  if (!check_running (s, NULL) || !ensure_step_index (s, NULL)) {
    g_warning ("%s: scale_model_input outside a run", s->klass->name);
    return;
  }
  if ((guint) s->step_index >= s->n_sigmas) {
    g_warning ("%s: scale_model_input past the schedule", s->klass->name);
    return;
  }
  s->klass->scale_model_input (s, sample, n);
}

gboolean
diffuse_scheduler_step (DiffuseScheduler *s, const float *model_output, float *sample, size_t n, DiffuseRng *rng,
                        GError **error)
{
  g_return_val_if_fail (s != NULL, FALSE);
  g_return_val_if_fail (model_output != NULL && sample != NULL, FALSE);
  if (!check_running (s, error) || !sched_check_size (s, n, error) || !ensure_step_index (s, error))
    return FALSE;
  if (s->klass->index_kind != SCHED_INDEX_NONE && s->sigmas && (guint) s->step_index + 1 >= s->n_sigmas) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: step index %d is past the schedule",
                 s->klass->name, s->step_index);
    return FALSE;
  }
  if (!s->klass->step (s, model_output, sample, n, rng, error))
    return FALSE;
  s->pos++;
  if (s->klass->index_kind != SCHED_INDEX_NONE)
    s->step_index++;
  return TRUE;
}

gboolean
diffuse_scheduler_add_noise (DiffuseScheduler *s, const float *original, const float *noise, float *out, size_t n,
                             double timestep, GError **error)
{
  g_return_val_if_fail (s != NULL, FALSE);
  g_return_val_if_fail ((original && noise && out) || n == 0, FALSE);

  if (s->klass->noise_kind == SCHED_NOISE_ALPHAS_CUMPROD) {
    double T = (double) s->c.num_train_timesteps;
    if (!(timestep >= 0 && timestep < T) || timestep != floor (timestep)) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: add_noise timestep %g is not in [0, %g)",
                   s->klass->name, timestep, T);
      return FALSE;
    }
    float ac = s->alphas_cumprod[(guint) timestep];
    float a = sqrtf (ac), b = sqrtf (1.0f - ac);
    for (size_t i = 0; i < n; i++)
      out[i] = a * original[i] + b * noise[i];
    return TRUE;
  }

  if (!s->have_timesteps) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "%s: set_timesteps must be called before add_noise", s->klass->name);
    return FALSE;
  }
  gint idx;
  if (s->begin_index < 0) {
    idx = sched_index_for_timestep (s, timestep);
    if (idx < 0) {
      g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: add_noise timestep %g is not in the schedule",
                   s->klass->name, timestep);
      return FALSE;
    }
  } else if (s->step_index >= 0) {
    idx = s->step_index;
  } else {
    idx = s->begin_index;
  }
  if ((guint) idx >= s->n_sigmas) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "%s: add_noise index %d past the schedule",
                 s->klass->name, idx);
    return FALSE;
  }
  float sigma = s->sigmas[idx];
  if (s->klass->noise_kind == SCHED_NOISE_SIGMA) {
    for (size_t i = 0; i < n; i++)
      out[i] = original[i] + noise[i] * sigma;
  } else {
    float alpha_t = 1.0f / sqrtf (sigma * sigma + 1.0f);
    float sigma_t = sigma * alpha_t;
    for (size_t i = 0; i < n; i++)
      out[i] = alpha_t * original[i] + sigma_t * noise[i];
  }
  return TRUE;
}

gboolean
diffuse_scheduler_alpha_cumprod (DiffuseScheduler *s, double timestep, float *alpha_prod, GError **error)
{
  g_return_val_if_fail (s != NULL && alpha_prod != NULL, FALSE);
  const double T = (double) s->c.num_train_timesteps;
  if (!(timestep >= 0 && timestep < T) || timestep != floor (timestep) || !s->alphas_cumprod) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "%s: timestep %g is not an integer in [0, %g), so it has no alphas_cumprod entry (self-attention "
                 "guidance needs a scheduler with integer timesteps, such as DDIM or PNDM)", s->klass->name,
                 timestep, T);
    return FALSE;
  }
  *alpha_prod = s->alphas_cumprod[(guint) timestep];
  return TRUE;
}

const char *
diffuse_scheduler_prediction_type (DiffuseScheduler *s)
{
  return s->c.prediction_type ? s->c.prediction_type : "epsilon";
}

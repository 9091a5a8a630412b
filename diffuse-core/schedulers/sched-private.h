/* Private to the schedulers layer: the scheduler object, the class table and
 * the helpers shared by the scheduler files.
 *
 * Every file of this layer includes this header first: the pragma below
 * keeps the compiler from fusing a*b+c, so float32 and float64 expressions
 * round step by step as torch and numpy do. */
#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize ("fp-contract=off")
#endif

#include <diffuse/scheduler.h>
#include <diffuse/error.h>

#include <math.h>
#include <string.h>

G_BEGIN_DECLS

typedef struct _SchedClass SchedClass;

/* Reads config values with a class's defaults; the first bad value sets
 * *error and makes every later read a no-op returning the default. */
typedef struct {
  DiffuseConfig *cfg;
  GError **error;
  gboolean ok;
} SchedCfg;

gint64 sched_cfg_int (SchedCfg *r, const char *key, gint64 def);
double sched_cfg_double (SchedCfg *r, const char *key, double def);
gboolean sched_cfg_bool (SchedCfg *r, const char *key, gboolean def);
const char *sched_cfg_string (SchedCfg *r, const char *key, const char *def);
/* A string that must be one of the NULL-terminated `allowed`. */
const char *sched_cfg_choice (SchedCfg *r, const char *key, const char *def, const char *const *allowed);
/* An option this code does not implement: an error when the key holds a
 * value other than `off_value` (bool false / the given string). */
void sched_cfg_require_false (SchedCfg *r, const char *key);
void sched_cfg_require_string (SchedCfg *r, const char *key, const char *only);
/* "sigma_min" / "sigma_max" as diffusers' hasattr (self.config, ...):
 * NAN when absent or null. */
double sched_cfg_optional_double (SchedCfg *r, const char *key);

/* Common config of the beta-schedule schedulers. */
typedef struct {
  gint64 num_train_timesteps;
  double beta_start, beta_end;
  const char *beta_schedule;     /* owned by the config */
  const char *prediction_type;
  const char *timestep_spacing;
  gint64 steps_offset;
  gboolean rescale_betas_zero_snr;
} SchedCommon;

struct _DiffuseScheduler {
  const SchedClass *klass;
  DiffuseConfig *config;
  SchedCommon c;

  float *betas;             /* [T] float32 as torch */
  float *alphas_cumprod;    /* [T] */

  /* after set_timesteps */
  gboolean have_timesteps;
  guint num_inference_steps;
  double *timesteps;
  guint n_timesteps;
  float *sigmas;            /* NULL for the alpha-based classes */
  guint n_sigmas;
  float init_noise_sigma;

  guint pos;                /* index of the next model call */
  gint step_index;          /* diffusers' _step_index, -1 = None */
  gint begin_index;         /* diffusers' _begin_index, -1 = None */
  size_t n;                 /* sample size of the run (0 = not yet known) */

  double eta;               /* DDIM */
  DiffuseRngDType noise_dtype;   /* dtype of randn_tensor in steps (model_output.dtype) */
  gpointer priv;
};

/* How a class looks up a timestep (diffusers' index_for_timestep). */
typedef enum {
  SCHED_INDEX_NONE,          /* the class has no step index */
  SCHED_INDEX_SECOND_IF_DUP, /* Euler & co: second match when several, error when none */
  SCHED_INDEX_LAST_IF_NONE,  /* DPM-Solver, UniPC: second match when several, last index when none */
} SchedIndexKind;

struct _SchedClass {
  const char *name;
  guint order;
  gboolean has_begin_index;
  SchedIndexKind index_kind;
  /* add_noise with sigmas (x + noise * sigma) or alpha/sigma (DPM, UniPC)
   * rather than alphas_cumprod[t] */
  enum { SCHED_NOISE_ALPHAS_CUMPROD, SCHED_NOISE_SIGMA, SCHED_NOISE_ALPHA_SIGMA } noise_kind;

  /* Reads the class's config (with its defaults), computes betas. */
  gboolean (*init) (DiffuseScheduler *s, SchedCfg *r, GError **error);
  gboolean (*set_timesteps) (DiffuseScheduler *s, guint n_steps, GError **error);
  /* NULL: identity */
  void (*scale_model_input) (DiffuseScheduler *s, float *sample, size_t n);
  /* One step at timestep timesteps[s->pos]; s->step_index is set already for
   * the classes that have one.  The caller advances pos / step_index. */
  gboolean (*step) (DiffuseScheduler *s, const float *model_output, float *sample, size_t n, DiffuseRng *rng,
                    GError **error);
  void (*free_priv) (gpointer priv);
};

extern const SchedClass _diffuse_sched_pndm;
extern const SchedClass _diffuse_sched_ddim;
extern const SchedClass _diffuse_sched_ddpm;
extern const SchedClass _diffuse_sched_lms;
extern const SchedClass _diffuse_sched_euler;
extern const SchedClass _diffuse_sched_euler_ancestral;
extern const SchedClass _diffuse_sched_heun;
extern const SchedClass _diffuse_sched_dpm_multistep;
extern const SchedClass _diffuse_sched_unipc;
extern const SchedClass _diffuse_sched_lcm;

/* ---- common pieces ---------------------------------------------------- */

/* Reads SchedCommon with the class defaults given in `def` (strings static). */
void sched_read_common (SchedCfg *r, SchedCommon *c, const SchedCommon *def);
/* betas (linear, scaled_linear, squaredcos_cap_v2, and "exp" when allow_exp;
 * trained_betas when present), optional zero-SNR rescale, alphas_cumprod. */
gboolean sched_init_betas (DiffuseScheduler *s, gboolean allow_rescale, gboolean allow_exp, GError **error);
/* The prediction types a class accepts (NULL-terminated). */
gboolean sched_check_prediction (DiffuseScheduler *s, const char *const *allowed, GError **error);

/* numpy helpers (float64) */
void np_linspace (double start, double stop, guint num, gboolean endpoint, double *out);
/* np.arange (start, stop, step) of floats; g_free. */
double *np_arange (double start, double stop, double step, guint *len);
/* np.interp (x, arange (n), fp) with fp float32 */
double np_interp_index (double x, const float *fp, guint n);
/* round half to even as numpy's round () */
static inline double np_round (double x) { return nearbyint (x); }

/* sigmas of the train schedule, float32 as torch: ((1 - ac) / ac) ** 0.5 */
float *sched_train_sigmas (DiffuseScheduler *s);
/* np.log of a float32 array (float32) */
float *sched_log_f32 (const float *v, guint n);
/* diffusers' _sigma_to_t */
double sched_sigma_to_t (double sigma, const float *log_sigmas, guint n);
/* diffusers' _convert_to_karras / _convert_to_exponential (float64) */
void sched_karras (double sigma_min, double sigma_max, guint n, double *out);
void sched_exponential (double sigma_min, double sigma_max, guint n, double *out);

/* The timesteps of the "leading" / "trailing" / "linspace" rules as
 * Euler-like schedulers compute them (float32 values, as doubles); g_free. */
double *sched_spacing_timesteps_f32 (DiffuseScheduler *s, guint n_steps, guint *len, GError **error);

/* Allocates a float copy etc. */
static inline float *sched_fdup (const float *v, size_t n) { return g_memdup2 (v, n * sizeof (float)); }

/* Sets s->n on the first step of a run, checks it afterwards. */
gboolean sched_check_size (DiffuseScheduler *s, size_t n, GError **error);
/* Draws randn_tensor (shape) from rng; error when rng is NULL. */
gboolean sched_draw_noise (DiffuseScheduler *s, DiffuseRng *rng, float *out, size_t n, GError **error);

/* index_for_timestep over s->timesteps (see SchedIndexKind); -1 when none
 * and the kind says error. */
gint sched_index_for_timestep (DiffuseScheduler *s, double t);

/* sets the two arrays of the schedule (takes ownership) */
void sched_set_schedule (DiffuseScheduler *s, double *timesteps, guint n_t, float *sigmas, guint n_s);

G_END_DECLS

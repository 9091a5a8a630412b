/* gst-diffuse — shared properties, model loading, generation and error
 * mapping for the diffuse elements (see gstdiffusecommon.h). */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include "gstdiffusecommon.h"
#include <gst/app/gstappsink.h>
#include "gstdiffusecontext.h"
#include "diffuse-config.h"

#include <string.h>
#include <diffuse/error.h>
#include <diffuse/tensor.h>

GST_DEBUG_CATEGORY_STATIC (gst_diffuse_common_debug);
#define GST_CAT_DEFAULT gst_diffuse_common_debug

static void
init_debug (void)
{
  static gsize once = 0;
  if (g_once_init_enter (&once)) {
    GST_DEBUG_CATEGORY_INIT (gst_diffuse_common_debug, "diffuse", 0, "diffuse elements (shared code)");
    g_once_init_leave (&once, 1);
  }
}

GType
gst_diffuse_dtype_get_type (void)
{
  static gsize id = 0;
  static const GEnumValue values[] = {
    {GST_DIFFUSE_DTYPE_FLOAT32, "32-bit float (as diffusers without torch_dtype)", "float32"},
    {GST_DIFFUSE_DTYPE_FLOAT16, "16-bit float (torch.float16)", "float16"},
    {GST_DIFFUSE_DTYPE_BFLOAT16, "bfloat16 (torch.bfloat16)", "bfloat16"},
    {0, NULL, NULL},
  };
  if (g_once_init_enter (&id)) {
    GType t = g_enum_register_static ("GstDiffuseDType", values);
    g_once_init_leave (&id, t);
  }
  return (GType) id;
}

static DiffuseDType
core_dtype (GstDiffuseDType d)
{
  switch (d) {
    case GST_DIFFUSE_DTYPE_FLOAT16: return DIFFUSE_DTYPE_F16;
    case GST_DIFFUSE_DTYPE_BFLOAT16: return DIFFUSE_DTYPE_BF16;
    default: return DIFFUSE_DTYPE_F32;
  }
}

static const char *
dtype_nick (GstDiffuseDType d)
{
  GEnumValue *v = g_enum_get_value (g_type_class_peek (GST_TYPE_DIFFUSE_DTYPE), d);
  return v ? v->value_nick : "?";
}

/* ---- settings ------------------------------------------------------------ */

void
gst_diffuse_settings_copy (GstDiffuseSettings *dst, const GstDiffuseSettings *src)
{
  *dst = *src;
  dst->model = g_strdup (src->model);
  dst->revision = g_strdup (src->revision);
  dst->variant = g_strdup (src->variant);
  dst->device = g_strdup (src->device);
  dst->scheduler = g_strdup (src->scheduler);
  dst->lora = g_strdup (src->lora);
  dst->ip_adapter = g_strdup (src->ip_adapter);
  dst->ip_adapter_subfolder = g_strdup (src->ip_adapter_subfolder);
  dst->ip_adapter_weight_name = g_strdup (src->ip_adapter_weight_name);
  dst->ip_adapter_image = g_strdup (src->ip_adapter_image);
  dst->vae = g_strdup (src->vae);
  dst->vae_subfolder = g_strdup (src->vae_subfolder);
  dst->prompt = g_strdup (src->prompt);
  dst->negative_prompt = g_strdup (src->negative_prompt);
}

void
gst_diffuse_settings_clear (GstDiffuseSettings *s)
{
  g_clear_pointer (&s->model, g_free);
  g_clear_pointer (&s->revision, g_free);
  g_clear_pointer (&s->variant, g_free);
  g_clear_pointer (&s->device, g_free);
  g_clear_pointer (&s->scheduler, g_free);
  g_clear_pointer (&s->lora, g_free);
  g_clear_pointer (&s->ip_adapter, g_free);
  g_clear_pointer (&s->ip_adapter_subfolder, g_free);
  g_clear_pointer (&s->ip_adapter_weight_name, g_free);
  g_clear_pointer (&s->ip_adapter_image, g_free);
  g_clear_pointer (&s->vae, g_free);
  g_clear_pointer (&s->vae_subfolder, g_free);
  g_clear_pointer (&s->prompt, g_free);
  g_clear_pointer (&s->negative_prompt, g_free);
}

gchar *
gst_diffuse_default_model (void)
{
  gchar *installed = g_build_filename (DIFFUSE_DATADIR, "tiny-sd", NULL);
  if (g_file_test (installed, G_FILE_TEST_IS_DIR))
    return installed;
  gchar *source = g_build_filename (DIFFUSE_SRC_DATADIR, "tiny-sd", NULL);
  if (g_file_test (source, G_FILE_TEST_IS_DIR)) {
    g_free (installed);
    return source;
  }
  g_free (source);
  return installed;
}

#define DEFAULT_PROMPT "a photograph of an astronaut riding a horse"

void
gst_diffuse_state_init (GstDiffuseState *st, GstElement *element, DiffuseSDTask task, gint64 default_seed_increment)
{
  init_debug ();
  memset (st, 0, sizeof *st);
  st->element = element;
  st->task = task;
  st->settings.model = gst_diffuse_default_model ();
  st->settings.device = g_strdup (GST_DIFFUSE_DEFAULT_DEVICE);
  st->settings.dtype = GST_DIFFUSE_DTYPE_FLOAT32;
  st->settings.prompt = g_strdup (DEFAULT_PROMPT);
  st->settings.num_inference_steps = GST_DIFFUSE_DEFAULT_STEPS;
  st->settings.guidance_scale = GST_DIFFUSE_DEFAULT_GUIDANCE;
  st->settings.seed = -1;
  st->settings.seed_increment = default_seed_increment;
  st->settings.clip_skip = 0;
  st->settings.strength = GST_DIFFUSE_DEFAULT_STRENGTH;
  st->settings.aesthetic_score = 6.0;
  st->settings.negative_aesthetic_score = 2.5;
  st->settings.safety_checker = TRUE;
  st->settings.lora_scale = 1.0;
  st->settings.ip_adapter_scale = 1.0;
  st->settings.ip_adapter_subfolder = g_strdup ("models");
  st->settings.ip_adapter_weight_name = g_strdup ("ip-adapter_sd15.safetensors");
  st->cancellable = g_cancellable_new ();
  st->last_gen_time = GST_CLOCK_TIME_NONE;
  st->suggested_steps = -1;
  st->suggested_guidance = -1;
}

void
gst_diffuse_state_finalize (GstDiffuseState *st)
{
  gst_diffuse_state_unload (st);
  gst_diffuse_settings_clear (&st->settings);
  g_clear_pointer (&st->cache, diffuse_component_cache_unref);
  g_clear_object (&st->cancellable);
}

/* ---- properties ----------------------------------------------------------- */

#define RW (G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS)

void
gst_diffuse_install_properties (GObjectClass *klass, gboolean with_strength, gboolean with_safety_checker,
                                gint64 default_seed_increment)
{
  init_debug ();
  gchar *def_model = gst_diffuse_default_model ();
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_MODEL,
      g_param_spec_string ("model", "Model",
          "A diffusers pipeline: a local folder or a Hugging Face Hub repository id "
          "(e.g. \"stable-diffusion-v1-5/stable-diffusion-v1-5\"); the default is the bundled tiny model",
          def_model, RW | GST_PARAM_MUTABLE_READY));
  g_free (def_model);
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_REVISION,
      g_param_spec_string ("revision", "Revision",
          "Hub revision of the model: a branch, tag or commit (NULL = main)",
          NULL, RW | GST_PARAM_MUTABLE_READY));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_VARIANT,
      g_param_spec_string ("variant", "Variant",
          "Weight file variant to load, e.g. \"fp16\" (NULL = the plain weights)",
          NULL, RW | GST_PARAM_MUTABLE_READY));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_DTYPE,
      g_param_spec_enum ("dtype", "Data type",
          "Data type the model weights are loaded and run in",
          GST_TYPE_DIFFUSE_DTYPE, GST_DIFFUSE_DTYPE_FLOAT32, RW | GST_PARAM_MUTABLE_READY));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_DEVICE,
      g_param_spec_string ("device", "Device",
          "Where the model runs: \"auto\" (the first usable accelerator, else the CPU), \"cpu\" or \"cuda:N\"",
          GST_DIFFUSE_DEFAULT_DEVICE, RW | GST_PARAM_MUTABLE_READY));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_SCHEDULER,
      g_param_spec_string ("scheduler", "Scheduler",
          "Scheduler class to sample with, one compatible with the model (e.g. \"EulerDiscreteScheduler\"); "
          "NULL = the model folder's suggestion (gst-diffuse.json) or the model's own",
          NULL, RW | GST_PARAM_MUTABLE_PLAYING));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_PROMPT,
      g_param_spec_string ("prompt", "Prompt",
          "What to generate; a change applies to the next frame",
          DEFAULT_PROMPT, RW | GST_PARAM_MUTABLE_PLAYING));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_NEGATIVE_PROMPT,
      g_param_spec_string ("negative-prompt", "Negative prompt",
          "What to steer away from (NULL = the empty prompt, as diffusers)",
          NULL, RW | GST_PARAM_MUTABLE_PLAYING));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_NUM_INFERENCE_STEPS,
      g_param_spec_int ("num-inference-steps", "Inference steps",
          "Number of denoising steps per frame; when never set, the model folder's suggestion "
          "(gst-diffuse.json: 20 for the bundled model) or this default",
          1, 1000, GST_DIFFUSE_DEFAULT_STEPS, RW | GST_PARAM_MUTABLE_PLAYING | GST_PARAM_CONTROLLABLE));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_GUIDANCE_SCALE,
      g_param_spec_double ("guidance-scale", "Guidance scale",
          "Classifier-free guidance scale; 1 or less runs without the unconditional pass; when never set, "
          "the model folder's suggestion (gst-diffuse.json: 5 for the bundled model) or this default",
          0.0, 100.0, GST_DIFFUSE_DEFAULT_GUIDANCE, RW | GST_PARAM_MUTABLE_PLAYING | GST_PARAM_CONTROLLABLE));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_SEED,
      g_param_spec_int64 ("seed", "Seed",
          "Seed of the initial noise, as torch.Generator(\"cpu\").manual_seed(seed) "
          "(-1 = a random seed chosen when the element starts)",
          -1, G_MAXINT64, -1, RW | GST_PARAM_MUTABLE_PLAYING));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_SEED_INCREMENT,
      g_param_spec_int64 ("seed-increment", "Seed increment",
          "Added to the seed for each following frame (frame n uses seed + n * seed-increment)",
          G_MININT64, G_MAXINT64, default_seed_increment, RW | GST_PARAM_MUTABLE_PLAYING));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_CLIP_SKIP,
      g_param_spec_int ("clip-skip", "CLIP skip",
          "Number of final CLIP text encoder layers to skip (0 = none)",
          0, 32, 0, RW | GST_PARAM_MUTABLE_PLAYING));
  if (with_strength)
    g_object_class_install_property (klass, GST_DIFFUSE_PROP_STRENGTH,
        g_param_spec_double ("strength", "Strength",
            "How much the input frame is transformed: 0 passes it through untouched, 1 ignores it "
            "(denoising runs int(num-inference-steps * strength) steps)",
            0.0, 1.0, GST_DIFFUSE_DEFAULT_STRENGTH, RW | GST_PARAM_MUTABLE_PLAYING | GST_PARAM_CONTROLLABLE));
  if (with_strength) {
    g_object_class_install_property (klass, GST_DIFFUSE_PROP_AESTHETIC_SCORE,
        g_param_spec_double ("aesthetic-score", "Aesthetic score",
            "An SDXL refiner's (requires_aesthetics_score) conditioning on image quality, as diffusers' "
            "aesthetic_score; no effect on other models", -100.0, 100.0, 6.0,
            RW | GST_PARAM_MUTABLE_PLAYING | GST_PARAM_CONTROLLABLE));
    g_object_class_install_property (klass, GST_DIFFUSE_PROP_NEGATIVE_AESTHETIC_SCORE,
        g_param_spec_double ("negative-aesthetic-score", "Negative aesthetic score",
            "The refiner's score for the unconditional half of classifier-free guidance (diffusers' "
            "negative_aesthetic_score)", -100.0, 100.0, 2.5,
            RW | GST_PARAM_MUTABLE_PLAYING | GST_PARAM_CONTROLLABLE));
  }
  if (with_safety_checker)
    g_object_class_install_property (klass, GST_DIFFUSE_PROP_SAFETY_CHECKER,
        g_param_spec_boolean ("safety-checker", "Safety checker",
            "Run the model's safety checker (diffusers' StableDiffusionSafetyChecker) when it has one: a "
            "flagged frame leaves black, with a warning and a \"diffuse-nsfw\" element message.  FALSE loads "
            "the model without it (safety_checker=None) and warns",
            TRUE, RW | GST_PARAM_MUTABLE_READY));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_LORA,
        g_param_spec_string ("lora", "LoRA",
            "LoRA adapters in diffusers' format, all active: \"PATH[:WEIGHT],PATH[:WEIGHT]...\" (a .safetensors "
            "file or a folder holding pytorch_lora_weights.safetensors; weight 1 when none); NULL = none",
            NULL, RW | GST_PARAM_MUTABLE_READY));
  {
    g_object_class_install_property (klass, GST_DIFFUSE_PROP_IP_ADAPTER,
        g_param_spec_string ("ip-adapter", "IP-Adapter",
            "IP-Adapter to load, as diffusers' load_ip_adapter: a local folder or a Hub repo id "
            "(e.g. \"h94/IP-Adapter\"), with ip-adapter-subfolder and ip-adapter-weight-name; needs "
            "ip-adapter-image.  NULL = none",
            NULL, RW | GST_PARAM_MUTABLE_READY));
    g_object_class_install_property (klass, GST_DIFFUSE_PROP_IP_ADAPTER_SUBFOLDER,
        g_param_spec_string ("ip-adapter-subfolder", "IP-Adapter subfolder",
            "Subfolder of the IP-Adapter's weights (its image encoder in <subfolder>/image_encoder)",
            "models", RW | GST_PARAM_MUTABLE_READY));
    g_object_class_install_property (klass, GST_DIFFUSE_PROP_IP_ADAPTER_WEIGHT_NAME,
        g_param_spec_string ("ip-adapter-weight-name", "IP-Adapter weight file",
            "The IP-Adapter's weight file (.safetensors, or .bin read without executing it)", "ip-adapter_sd15.safetensors", RW | GST_PARAM_MUTABLE_READY));
    g_object_class_install_property (klass, GST_DIFFUSE_PROP_IP_ADAPTER_IMAGE,
        g_param_spec_string ("ip-adapter-image", "IP-Adapter image",
            "The image prompt: a file GStreamer can decode (PNG, JPEG, ...)", NULL, RW | GST_PARAM_MUTABLE_READY));
    g_object_class_install_property (klass, GST_DIFFUSE_PROP_IP_ADAPTER_SCALE,
        g_param_spec_double ("ip-adapter-scale", "IP-Adapter scale",
            "How much the image prompt counts, as set_ip_adapter_scale", -10.0, 10.0, 1.0,
            RW | GST_PARAM_MUTABLE_PLAYING | GST_PARAM_CONTROLLABLE));
  }
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_VAE,
        g_param_spec_string ("vae", "VAE",
            "Replace the model's VAE, as diffusers' from_pretrained (..., vae=AutoencoderKL.from_pretrained (vae)): "
            "a folder or a Hub repo id (e.g. \"madebyollin/sdxl-vae-fp16-fix\"), with vae-subfolder; loaded in "
            "the element's dtype, without its variant.  NULL = the model's own",
            NULL, RW | GST_PARAM_MUTABLE_READY));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_VAE_SUBFOLDER,
        g_param_spec_string ("vae-subfolder", "VAE subfolder",
            "Subfolder of the vae folder or repo that holds it (e.g. \"vae\"); NULL = its root",
            NULL, RW | GST_PARAM_MUTABLE_READY));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_LORA_SCALE,
        g_param_spec_double ("lora-scale", "LoRA scale",
            "Multiplies every LoRA adapter's weight, as diffusers' cross_attention_kwargs={\"scale\": s}; a "
            "change merges the adapters again before the next frame",
            -10.0, 10.0, 1.0, RW | GST_PARAM_MUTABLE_PLAYING | GST_PARAM_CONTROLLABLE));
  if (with_safety_checker)
    g_object_class_install_property (klass, GST_DIFFUSE_PROP_SAG_SCALE,
        g_param_spec_double ("sag-scale", "SAG scale",
            "Self-attention guidance, as diffusers' StableDiffusionSAGPipeline (whose default is 0.75): one more "
            "UNet pass per step on latents blurred where the mid block's self-attention looks; 0 = off.  Needs a "
            "scheduler with integer timesteps (PNDM, DDIM, ...)",
            0.0, 100.0, 0.0, RW | GST_PARAM_MUTABLE_PLAYING | GST_PARAM_CONTROLLABLE));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_RESIDENT_BYTES,
      g_param_spec_uint64 ("resident-bytes", "Resident bytes",
          "Bytes of model weights held by the component cache this element uses (shared with the "
          "other elements of the same cache)",
          0, G_MAXUINT64, 0, G_PARAM_READABLE | G_PARAM_STATIC_STRINGS));
  g_object_class_install_property (klass, GST_DIFFUSE_PROP_LOAD_COUNT,
      g_param_spec_uint64 ("load-count", "Load count",
          "Model components the shared component cache has loaded from files so far",
          0, G_MAXUINT64, 0, G_PARAM_READABLE | G_PARAM_STATIC_STRINGS));
}

static gboolean
running_check (GstDiffuseState *st, GParamSpec *pspec)
{
  /* GST_PARAM_MUTABLE_READY properties: refuse changes in PAUSED/PLAYING,
   * the loaded model would not follow them. */
  if (!(pspec->flags & GST_PARAM_MUTABLE_READY))
    return TRUE;
  GST_OBJECT_LOCK (st->element);
  GstState state = GST_STATE (st->element);
  GST_OBJECT_UNLOCK (st->element);
  if (state > GST_STATE_READY) {
    GST_ELEMENT_WARNING (st->element, LIBRARY, SETTINGS,
        ("Property \"%s\" can only be changed in the NULL or READY state", pspec->name),
        ("element is in state %s", gst_element_state_get_name (state)));
    return FALSE;
  }
  return TRUE;
}

static void
set_string (gchar **field, const GValue *value)
{
  const gchar *v = g_value_get_string (value);
  g_free (*field);
  *field = (v && *v) ? g_strdup (v) : NULL;
}

gboolean
gst_diffuse_state_set_property (GstDiffuseState *st, guint prop_id, const GValue *value, GParamSpec *pspec)
{
  if (prop_id == GST_DIFFUSE_PROP_0 || prop_id >= GST_DIFFUSE_PROP_LAST)
    return FALSE;
  GstDiffuseSettings *s = &st->settings;
  if (!running_check (st, pspec))
    return TRUE;
  GST_OBJECT_LOCK (st->element);
  switch (prop_id) {
    case GST_DIFFUSE_PROP_MODEL:
      set_string (&s->model, value);
      if (!s->model)
        s->model = gst_diffuse_default_model ();
      break;
    case GST_DIFFUSE_PROP_REVISION: set_string (&s->revision, value); break;
    case GST_DIFFUSE_PROP_VARIANT: set_string (&s->variant, value); break;
    case GST_DIFFUSE_PROP_DTYPE: s->dtype = g_value_get_enum (value); break;
    case GST_DIFFUSE_PROP_DEVICE:
      set_string (&s->device, value);
      if (!s->device)
        s->device = g_strdup (GST_DIFFUSE_DEFAULT_DEVICE);
      break;
    case GST_DIFFUSE_PROP_SCHEDULER:
      set_string (&s->scheduler, value);
      s->user_set |= GST_DIFFUSE_SET_SCHEDULER;
      break;
    case GST_DIFFUSE_PROP_PROMPT:
      g_free (s->prompt);
      s->prompt = g_value_dup_string (value);
      break;
    case GST_DIFFUSE_PROP_NEGATIVE_PROMPT: set_string (&s->negative_prompt, value); break;
    case GST_DIFFUSE_PROP_NUM_INFERENCE_STEPS:
      s->num_inference_steps = g_value_get_int (value);
      s->user_set |= GST_DIFFUSE_SET_STEPS;
      break;
    case GST_DIFFUSE_PROP_GUIDANCE_SCALE:
      s->guidance_scale = g_value_get_double (value);
      s->user_set |= GST_DIFFUSE_SET_GUIDANCE;
      break;
    case GST_DIFFUSE_PROP_SEED: s->seed = g_value_get_int64 (value); break;
    case GST_DIFFUSE_PROP_SEED_INCREMENT: s->seed_increment = g_value_get_int64 (value); break;
    case GST_DIFFUSE_PROP_CLIP_SKIP: s->clip_skip = g_value_get_int (value); break;
    case GST_DIFFUSE_PROP_STRENGTH: s->strength = g_value_get_double (value); break;
    case GST_DIFFUSE_PROP_AESTHETIC_SCORE: s->aesthetic_score = g_value_get_double (value); break;
    case GST_DIFFUSE_PROP_NEGATIVE_AESTHETIC_SCORE: s->negative_aesthetic_score = g_value_get_double (value); break;
    case GST_DIFFUSE_PROP_SAFETY_CHECKER: s->safety_checker = g_value_get_boolean (value); break;
    case GST_DIFFUSE_PROP_SAG_SCALE: s->sag_scale = g_value_get_double (value); break;
    case GST_DIFFUSE_PROP_LORA: set_string (&s->lora, value); break;
    case GST_DIFFUSE_PROP_LORA_SCALE: s->lora_scale = g_value_get_double (value); break;
    case GST_DIFFUSE_PROP_IP_ADAPTER: set_string (&s->ip_adapter, value); break;
    case GST_DIFFUSE_PROP_IP_ADAPTER_SUBFOLDER: set_string (&s->ip_adapter_subfolder, value); break;
    case GST_DIFFUSE_PROP_IP_ADAPTER_WEIGHT_NAME: set_string (&s->ip_adapter_weight_name, value); break;
    case GST_DIFFUSE_PROP_IP_ADAPTER_IMAGE: set_string (&s->ip_adapter_image, value); break;
    case GST_DIFFUSE_PROP_IP_ADAPTER_SCALE: s->ip_adapter_scale = g_value_get_double (value); break;
    case GST_DIFFUSE_PROP_VAE: set_string (&s->vae, value); break;
    case GST_DIFFUSE_PROP_VAE_SUBFOLDER: set_string (&s->vae_subfolder, value); break;
    default:
      GST_OBJECT_UNLOCK (st->element);
      return FALSE;
  }
  GST_OBJECT_UNLOCK (st->element);
  return TRUE;
}

/* What the next frame uses for steps, guidance and scheduler: the property, or
 * the loaded model's suggestion while the property was never set (object lock). */
static gint
effective_steps (GstDiffuseState *st)
{
  const GstDiffuseSettings *s = &st->settings;
  return !(s->user_set & GST_DIFFUSE_SET_STEPS) && st->suggested_steps > 0 ? st->suggested_steps
                                                                           : s->num_inference_steps;
}

static gdouble
effective_guidance (GstDiffuseState *st)
{
  const GstDiffuseSettings *s = &st->settings;
  return !(s->user_set & GST_DIFFUSE_SET_GUIDANCE) && st->suggested_guidance >= 0 ? st->suggested_guidance
                                                                                   : s->guidance_scale;
}

static const gchar *
effective_scheduler (GstDiffuseState *st)
{
  const GstDiffuseSettings *s = &st->settings;
  return !(s->user_set & GST_DIFFUSE_SET_SCHEDULER) && !s->scheduler ? st->suggested_scheduler : s->scheduler;
}

/* The three effective values, so a model load or unload that changes them
 * can notify (notify::num-inference-steps etc. report what reads return). */
typedef struct {
  gint steps;
  gdouble guidance;
  gchar *scheduler;
} Effective;

static void
effective_snapshot (GstDiffuseState *st, Effective *e)
{
  GST_OBJECT_LOCK (st->element);
  e->steps = effective_steps (st);
  e->guidance = effective_guidance (st);
  e->scheduler = g_strdup (effective_scheduler (st));
  GST_OBJECT_UNLOCK (st->element);
}

/* notifies every property whose effective value differs from before (freed here); no lock held */
static void
effective_notify (GstDiffuseState *st, Effective *before)
{
  Effective now;
  effective_snapshot (st, &now);
  if (now.steps != before->steps)
    g_object_notify (G_OBJECT (st->element), "num-inference-steps");
  if (now.guidance != before->guidance)
    g_object_notify (G_OBJECT (st->element), "guidance-scale");
  if (g_strcmp0 (now.scheduler, before->scheduler) != 0)
    g_object_notify (G_OBJECT (st->element), "scheduler");
  g_free (now.scheduler);
  g_free (before->scheduler);
}

gboolean
gst_diffuse_state_get_property (GstDiffuseState *st, guint prop_id, GValue *value, GParamSpec *pspec)
{
  if (prop_id == GST_DIFFUSE_PROP_0 || prop_id >= GST_DIFFUSE_PROP_LAST)
    return FALSE;
  GstDiffuseSettings *s = &st->settings;
  if (prop_id == GST_DIFFUSE_PROP_RESIDENT_BYTES || prop_id == GST_DIFFUSE_PROP_LOAD_COUNT) {
    DiffuseCacheStats stats = { 0 };
    GST_OBJECT_LOCK (st->element);
    DiffuseComponentCache *cache = st->cache ? diffuse_component_cache_ref (st->cache) : NULL;
    GST_OBJECT_UNLOCK (st->element);
    if (cache) {
      diffuse_component_cache_get_stats (cache, &stats);
      diffuse_component_cache_unref (cache);
    }
    g_value_set_uint64 (value, prop_id == GST_DIFFUSE_PROP_RESIDENT_BYTES ? stats.resident_bytes : stats.n_loads);
    return TRUE;
  }
  GST_OBJECT_LOCK (st->element);
  switch (prop_id) {
    case GST_DIFFUSE_PROP_MODEL: g_value_set_string (value, s->model); break;
    case GST_DIFFUSE_PROP_REVISION: g_value_set_string (value, s->revision); break;
    case GST_DIFFUSE_PROP_VARIANT: g_value_set_string (value, s->variant); break;
    case GST_DIFFUSE_PROP_DTYPE: g_value_set_enum (value, s->dtype); break;
    case GST_DIFFUSE_PROP_DEVICE: g_value_set_string (value, s->device); break;
    /* steps, guidance and scheduler read as what the next frame will use */
    case GST_DIFFUSE_PROP_SCHEDULER: g_value_set_string (value, effective_scheduler (st)); break;
    case GST_DIFFUSE_PROP_PROMPT: g_value_set_string (value, s->prompt); break;
    case GST_DIFFUSE_PROP_NEGATIVE_PROMPT: g_value_set_string (value, s->negative_prompt); break;
    case GST_DIFFUSE_PROP_NUM_INFERENCE_STEPS: g_value_set_int (value, effective_steps (st)); break;
    case GST_DIFFUSE_PROP_GUIDANCE_SCALE: g_value_set_double (value, effective_guidance (st)); break;
    case GST_DIFFUSE_PROP_SEED: g_value_set_int64 (value, s->seed); break;
    case GST_DIFFUSE_PROP_SEED_INCREMENT: g_value_set_int64 (value, s->seed_increment); break;
    case GST_DIFFUSE_PROP_CLIP_SKIP: g_value_set_int (value, s->clip_skip); break;
    case GST_DIFFUSE_PROP_STRENGTH: g_value_set_double (value, s->strength); break;
    case GST_DIFFUSE_PROP_AESTHETIC_SCORE: g_value_set_double (value, s->aesthetic_score); break;
    case GST_DIFFUSE_PROP_NEGATIVE_AESTHETIC_SCORE: g_value_set_double (value, s->negative_aesthetic_score); break;
    case GST_DIFFUSE_PROP_SAFETY_CHECKER: g_value_set_boolean (value, s->safety_checker); break;
    case GST_DIFFUSE_PROP_SAG_SCALE: g_value_set_double (value, s->sag_scale); break;
    case GST_DIFFUSE_PROP_LORA: g_value_set_string (value, s->lora); break;
    case GST_DIFFUSE_PROP_LORA_SCALE: g_value_set_double (value, s->lora_scale); break;
    case GST_DIFFUSE_PROP_IP_ADAPTER: g_value_set_string (value, s->ip_adapter); break;
    case GST_DIFFUSE_PROP_IP_ADAPTER_SUBFOLDER: g_value_set_string (value, s->ip_adapter_subfolder); break;
    case GST_DIFFUSE_PROP_IP_ADAPTER_WEIGHT_NAME: g_value_set_string (value, s->ip_adapter_weight_name); break;
    case GST_DIFFUSE_PROP_IP_ADAPTER_IMAGE: g_value_set_string (value, s->ip_adapter_image); break;
    case GST_DIFFUSE_PROP_IP_ADAPTER_SCALE: g_value_set_double (value, s->ip_adapter_scale); break;
    case GST_DIFFUSE_PROP_VAE: g_value_set_string (value, s->vae); break;
    case GST_DIFFUSE_PROP_VAE_SUBFOLDER: g_value_set_string (value, s->vae_subfolder); break;
    default:
      GST_OBJECT_UNLOCK (st->element);
      return FALSE;
  }
  GST_OBJECT_UNLOCK (st->element);
  return TRUE;
}

void
gst_diffuse_state_snapshot (GstDiffuseState *st, GstDiffuseSettings *out)
{
  GST_OBJECT_LOCK (st->element);
  gst_diffuse_settings_copy (out, &st->settings);
  out->num_inference_steps = effective_steps (st);
  out->guidance_scale = effective_guidance (st);
  if (!out->scheduler)
    out->scheduler = g_strdup (effective_scheduler (st));
  GST_OBJECT_UNLOCK (st->element);
}

/* ---- errors --------------------------------------------------------------- */

void
gst_diffuse_error_to_gst (const GError *err, GQuark *domain, gint *code)
{
  *domain = GST_LIBRARY_ERROR;
  *code = GST_LIBRARY_ERROR_FAILED;
  if (!err || err->domain != DIFFUSE_ERROR)
    return;
  switch ((DiffuseErrorCode) err->code) {
    case DIFFUSE_ERROR_NOT_FOUND:
    case DIFFUSE_ERROR_VARIANT:
    case DIFFUSE_ERROR_REPO_NOT_FOUND:
    case DIFFUSE_ERROR_REVISION_NOT_FOUND:
    case DIFFUSE_ERROR_ENTRY_NOT_FOUND:
    case DIFFUSE_ERROR_OFFLINE:
      *domain = GST_RESOURCE_ERROR; *code = GST_RESOURCE_ERROR_NOT_FOUND; break;
    case DIFFUSE_ERROR_IO:
    case DIFFUSE_ERROR_CORRUPT:
    case DIFFUSE_ERROR_NETWORK:
    case DIFFUSE_ERROR_SERVER:
    case DIFFUSE_ERROR_CHECKSUM:
      *domain = GST_RESOURCE_ERROR; *code = GST_RESOURCE_ERROR_READ; break;
    case DIFFUSE_ERROR_GATED:
      *domain = GST_RESOURCE_ERROR; *code = GST_RESOURCE_ERROR_NOT_AUTHORIZED; break;
    case DIFFUSE_ERROR_DISK_FULL:
      *domain = GST_RESOURCE_ERROR; *code = GST_RESOURCE_ERROR_NO_SPACE_LEFT; break;
    case DIFFUSE_ERROR_INVALID_ARGUMENT:
      *domain = GST_LIBRARY_ERROR; *code = GST_LIBRARY_ERROR_SETTINGS; break;
    case DIFFUSE_ERROR_UNSUPPORTED:
    case DIFFUSE_ERROR_CONFIG:
    case DIFFUSE_ERROR_DEVICE:
      *domain = GST_LIBRARY_ERROR; *code = GST_LIBRARY_ERROR_INIT; break;
    case DIFFUSE_ERROR_OUT_OF_MEMORY:
      *domain = GST_RESOURCE_ERROR; *code = GST_RESOURCE_ERROR_NO_SPACE_LEFT; break;
    case DIFFUSE_ERROR_CANCELLED:
    case DIFFUSE_ERROR_FAILED:
    default:
      break;
  }
}

void
gst_diffuse_post_error_full (GstElement *element, const GError *err, const gchar *what, const gchar *debug,
                             const gchar *file, const gchar *function, gint line)
{
  GQuark domain;
  gint code;
  gst_diffuse_error_to_gst (err, &domain, &code);
  gchar *text = err ? g_strdup_printf ("%s: %s", what, err->message) : g_strdup (what);
  gchar *dbg = g_strdup_printf ("%s%s(core error %d)", debug ? debug : "", debug ? " " : "", err ? err->code : -1);
  /* gst_element_message_full takes ownership of text and dbg */
  gst_element_message_full (element, GST_MESSAGE_ERROR, domain, code, text, dbg, file, function, line);
}

static gchar *
settings_debug (const GstDiffuseSettings *s)
{
  return g_strdup_printf ("model=%s revision=%s variant=%s dtype=%s device=%s", s->model ? s->model : "(bundled)",
                          s->revision ? s->revision : "main", s->variant ? s->variant : "(none)",
                          dtype_nick (s->dtype), s->device ? s->device : GST_DIFFUSE_DEFAULT_DEVICE);
}

/* ---- flushing ------------------------------------------------------------- */

void
gst_diffuse_state_set_flushing (GstDiffuseState *st, gboolean flushing)
{
  GCancellable *old = NULL;
  GST_OBJECT_LOCK (st->element);
  st->flushing = flushing;
  if (flushing) {
    old = g_object_ref (st->cancellable);
  } else if (g_cancellable_is_cancelled (st->cancellable)) {
    /* a running user may still hold the cancelled one: replace, don't reset */
    old = st->cancellable;
    st->cancellable = g_cancellable_new ();
  }
  GST_OBJECT_UNLOCK (st->element);
  if (flushing)
    g_cancellable_cancel (old);
  g_clear_object (&old);
}

gboolean
gst_diffuse_state_is_flushing (GstDiffuseState *st)
{
  GST_OBJECT_LOCK (st->element);
  gboolean f = st->flushing;
  GST_OBJECT_UNLOCK (st->element);
  return f;
}

static GCancellable *
get_cancellable (GstDiffuseState *st)
{
  GST_OBJECT_LOCK (st->element);
  GCancellable *c = g_object_ref (st->cancellable);
  GST_OBJECT_UNLOCK (st->element);
  return c;
}

/* ---- loading -------------------------------------------------------------- */

static gboolean
load_progress (const DiffuseLoadProgress *p, gpointer user_data)
{
  GstDiffuseState *st = user_data;
  GstStructure *s;
  if (g_strcmp0 (p->stage, "download") == 0)
    s = gst_structure_new ("diffuse-download", "file", G_TYPE_STRING, p->what, "bytes", G_TYPE_UINT64, p->done,
                           "total-bytes", G_TYPE_UINT64, p->total, NULL);
  else
    s = gst_structure_new ("diffuse-load", "component", G_TYPE_STRING, p->what, "done", G_TYPE_UINT64, p->done,
                           "total", G_TYPE_UINT64, p->total, NULL);
  gst_element_post_message (st->element, gst_message_new_element (GST_OBJECT_CAST (st->element), s));
  return !gst_diffuse_state_is_flushing (st);
}

static gboolean
is_cancel (GstDiffuseState *st, const GError *err)
{
  return g_error_matches (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED) ||
         g_error_matches (err, G_IO_ERROR, G_IO_ERROR_CANCELLED) || gst_diffuse_state_is_flushing (st);
}

/* The IP-Adapter's image prompt: a PNG read by the core, any other file
 * through GStreamer's decoders (decodebin), as 8-bit RGB. */
DiffuseImage *
gst_diffuse_load_image_file (const char *path, GError **error)
{
  if (g_str_has_suffix (path, ".png") || g_str_has_suffix (path, ".PNG"))
    return diffuse_image_load_png (path, error);
  GstElement *pipe = gst_parse_launch ("filesrc name=src ! decodebin ! videoconvert ! videoscale ! "
                                       "video/x-raw,format=RGB,pixel-aspect-ratio=1/1 ! appsink name=sink sync=false",
                                       error);
  if (!pipe)
    return NULL;
  GstElement *src = gst_bin_get_by_name (GST_BIN (pipe), "src"), *sink = gst_bin_get_by_name (GST_BIN (pipe), "sink");
  g_object_set (src, "location", path, NULL);
  gst_element_set_state (pipe, GST_STATE_PLAYING);
  GstSample *sample = gst_app_sink_try_pull_sample (GST_APP_SINK (sink), 30 * GST_SECOND);
  DiffuseImage *img = NULL;
  GstVideoInfo info;
  if (sample && gst_video_info_from_caps (&info, gst_sample_get_caps (sample))) {
    GstVideoFrame f;
    if (gst_video_frame_map (&f, &info, gst_sample_get_buffer (sample), GST_MAP_READ)) {
      img = diffuse_image_from_rgb8 (GST_VIDEO_FRAME_PLANE_DATA (&f, 0), GST_VIDEO_INFO_WIDTH (&info),
                                     GST_VIDEO_INFO_HEIGHT (&info), GST_VIDEO_FRAME_PLANE_STRIDE (&f, 0));
      gst_video_frame_unmap (&f);
    }
  }
  if (!img) {
    GstBus *bus = gst_element_get_bus (pipe);
    GstMessage *m = gst_bus_pop_filtered (bus, GST_MESSAGE_ERROR);
    GError *e = NULL;
    if (m)
      gst_message_parse_error (m, &e, NULL);
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND, "cannot read the image %s%s%s", path,
                 e ? ": " : "", e ? e->message : "");
    g_clear_error (&e);
    if (m)
      gst_message_unref (m);
    gst_object_unref (bus);
  }
  if (sample)
    gst_sample_unref (sample);
  gst_element_set_state (pipe, GST_STATE_NULL);
  gst_object_unref (src);
  gst_object_unref (sink);
  gst_object_unref (pipe);
  return img;
}

gboolean
gst_diffuse_state_load_ip_adapter (GstDiffuseState *st, const GstDiffuseSettings *s, GstDiffuseIpLoadFunc load,
                                   gpointer target, GError **error)
{
  if (!s->ip_adapter_image) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT,
                 "ip-adapter is set but ip-adapter-image is not: the image prompt is needed");
    return FALSE;
  }
  DiffuseImage *img = gst_diffuse_load_image_file (s->ip_adapter_image, error);
  if (!img || !load (target, s->ip_adapter, s->ip_adapter_subfolder,
                     s->ip_adapter_weight_name ? s->ip_adapter_weight_name : "ip-adapter_sd15.safetensors", error)) {
    diffuse_image_free (img);
    return FALSE;
  }
  diffuse_image_free (st->ip_image);
  st->ip_image = img;
  return TRUE;
}

static gboolean
sd_load_ip (gpointer sd, const char *ref, const char *subfolder, const char *weight_name, GError **error)
{
  return diffuse_sd_load_ip_adapter (sd, ref, subfolder, weight_name, error);
}

/* model_index.json names a safety checker (a non-null entry) */
static gboolean
model_lists_safety_checker (DiffusePipelineModel *pm)
{
  JsonNode *n = diffuse_config_get_node (diffuse_pipeline_model_index (pm), "safety_checker");
  if (!n || !JSON_NODE_HOLDS_ARRAY (n))
    return FALSE;
  JsonArray *a = json_node_get_array (n);
  return json_array_get_length (a) == 2 && !JSON_NODE_HOLDS_NULL (json_array_get_element (a, 1));
}

gboolean
gst_diffuse_state_load (GstDiffuseState *st)
{
  GstDiffuseSettings s;
  GError *err = NULL;
  gboolean ok = FALSE;

  gst_diffuse_state_unload (st);
  gst_diffuse_state_snapshot (st, &s);
  gchar *dbg = settings_debug (&s);

  /* the bundled model, when no other is set, must exist */
  gchar *def_model = gst_diffuse_default_model ();
  if (g_strcmp0 (s.model, def_model) == 0 && !g_file_test (def_model, G_FILE_TEST_IS_DIR)) {
    gchar *src = g_build_filename (DIFFUSE_SRC_DATADIR, "tiny-sd", NULL);
    GST_ELEMENT_ERROR (st->element, RESOURCE, NOT_FOUND,
        ("No model is set (property \"model\") and the bundled model is not installed"),
        ("looked for the bundled model in %s and %s", def_model, src));
    g_free (src);
    g_free (def_model);
    goto out;
  }
  g_free (def_model);

  /* the device first: a clearer error than one from deep in the loader */
  DiffuseDevice *dev = diffuse_device_get (s.device, &err);
  if (!dev) {
    gchar *what = g_strdup_printf ("Cannot use device \"%s\"", s.device);
    gst_diffuse_post_error (st->element, err, what, dbg);
    g_free (what);
    goto out;
  }
  GST_INFO_OBJECT (st->element, "device %s -> %s", s.device, diffuse_device_name (dev));

  gst_diffuse_ensure_element_cache (st->element, &st->cache);
  GST_OBJECT_LOCK (st->element);
  DiffuseComponentCache *cache = st->cache ? diffuse_component_cache_ref (st->cache) : NULL;
  GST_OBJECT_UNLOCK (st->element);

  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.revision = s.revision;
  lp.variant = s.variant;
  lp.have_dtype = TRUE;
  lp.dtype = core_dtype (s.dtype);
  lp.device = s.device;
  lp.progress = load_progress;
  lp.progress_data = st;
  lp.cancellable = get_cancellable (st);
  /* safety-checker=false: diffusers' from_pretrained (..., safety_checker=None) */
  GHashTable *no_checker = NULL;
  if (!s.safety_checker) {
    no_checker = g_hash_table_new (g_str_hash, g_str_equal);
    g_hash_table_insert (no_checker, (gpointer) "safety_checker", NULL);
    lp.overrides = no_checker;
  }
  /* vae=...: from_pretrained (..., vae=AutoencoderKL.from_pretrained (vae, subfolder=...)) */
  DiffuseComponent *vae = NULL;
  if (s.vae) {
    DiffuseLoadParams vlp = lp;
    vlp.variant = NULL;
    vlp.overrides = NULL;
    gst_diffuse_global_lock ();
    vae = diffuse_component_load (cache, s.vae, s.vae_subfolder, "vae", &vlp, &err);
    gst_diffuse_global_unlock ();
    if (!vae) {
      gchar *what = g_strdup_printf ("Could not load the VAE \"%s\"", s.vae);
      gst_diffuse_post_error (st->element, err, what, dbg);
      g_free (what);
      g_object_unref (lp.cancellable);
      g_clear_pointer (&no_checker, g_hash_table_unref);
      if (cache)
        diffuse_component_cache_unref (cache);
      goto out;
    }
    if (!no_checker)
      no_checker = g_hash_table_new (g_str_hash, g_str_equal);
    g_hash_table_insert (no_checker, (gpointer) "vae", vae);
    lp.overrides = no_checker;
  }

  GstClockTime t0 = gst_util_get_timestamp ();
  /* one load at a time in the process: a second element asking for the
   * same model waits and then finds every component in the cache */
  gst_diffuse_global_lock ();
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (s.model, &lp, cache, &err);
  gst_diffuse_global_unlock ();
  g_object_unref (lp.cancellable);
  g_clear_pointer (&no_checker, g_hash_table_unref);
  if (vae)
    diffuse_component_unref (vae);
  if (cache)
    diffuse_component_cache_unref (cache);
  if (pm && !s.safety_checker && model_lists_safety_checker (pm))
    GST_ELEMENT_WARNING (st->element, LIBRARY, SETTINGS,
        ("The safety checker of model \"%s\" is disabled (safety-checker=false): generated frames are not "
         "screened", s.model),
        ("Ensure that you abide by the conditions of the Stable Diffusion license and do not expose unfiltered "
         "results in services or applications open to the public (diffusers' warning)"));
  if (!pm) {
    if (is_cancel (st, err)) {
      GST_DEBUG_OBJECT (st->element, "load cancelled");
    } else {
      gchar *what = g_strdup_printf ("Could not load model \"%s\"", s.model);
      gst_diffuse_post_error (st->element, err, what, dbg);
      g_free (what);
    }
    goto out;
  }

  DiffuseSD *sd = st->model_only ? NULL : diffuse_sd_new (pm, st->task, &err);
  if (!sd && !st->model_only) {
    gchar *what = g_strdup_printf ("Model \"%s\" cannot run as a Stable Diffusion %s pipeline", s.model,
                                   st->task == DIFFUSE_SD_IMG2IMG ? "image-to-image" : "text-to-image");
    gst_diffuse_post_error (st->element, err, what, dbg);
    g_free (what);
    diffuse_pipeline_model_unref (pm);
    goto out;
  }
  if (sd && s.ip_adapter && !gst_diffuse_state_load_ip_adapter (st, &s, sd_load_ip, sd, &err)) {
    gchar *what = g_strdup_printf ("Could not use the IP-Adapter \"%s\"", s.ip_adapter);
    gst_diffuse_post_error (st->element, err, what, dbg);
    g_free (what);
    diffuse_sd_unref (sd);
    diffuse_pipeline_model_unref (pm);
    goto out;
  }
  if (sd && s.lora && !diffuse_sd_load_lora_spec (sd, s.lora, &err)) {
    gchar *what = g_strdup_printf ("Could not load the LoRA adapters \"%s\"", s.lora);
    gst_diffuse_post_error (st->element, err, what, dbg);
    g_free (what);
    diffuse_sd_unref (sd);
    diffuse_pipeline_model_unref (pm);
    goto out;
  }
  /* the folder's suggested settings (gst-diffuse.json) */
  gint sug_steps = -1, sug_w = -1, sug_h = -1;
  gdouble sug_guidance = -1;
  gchar *sug_sched = NULL;
  if (!diffuse_pipeline_model_suggestions (pm, &sug_steps, &sug_guidance, &sug_w, &sug_h, &sug_sched, &err)) {
    gchar *what = g_strdup_printf ("Model \"%s\" has an invalid gst-diffuse.json", s.model);
    gst_diffuse_post_error (st->element, err, what, dbg);
    g_free (what);
    if (sd)
      diffuse_sd_unref (sd);
    diffuse_pipeline_model_unref (pm);
    goto out;
  }
  Effective before;
  effective_snapshot (st, &before);
  GST_OBJECT_LOCK (st->element);
  st->suggested_steps = sug_steps;
  st->suggested_guidance = sug_guidance;
  g_free (st->suggested_scheduler);
  st->suggested_scheduler = sug_sched;
  GST_OBJECT_UNLOCK (st->element);
  effective_notify (st, &before);
  if (sug_steps > 0 || sug_guidance >= 0 || sug_sched)
    GST_INFO_OBJECT (st->element, "model suggests %d steps, guidance %g, scheduler %s (used where not set)",
                     sug_steps, sug_guidance, sug_sched ? sug_sched : "(its own)");
  st->pm = pm;
  st->sd = sd;
  if (sd) {
    diffuse_sd_default_size (sd, &st->default_width, &st->default_height);
    if (sug_w > 0 && sug_h > 0) {
      st->default_width = sug_w;
      st->default_height = sug_h;
    }
    GST_INFO_OBJECT (st->element, "loaded %s (%s) in %" GST_TIME_FORMAT "; default size %dx%d, scheduler %s",
                     s.model, diffuse_pipeline_model_class (pm), GST_TIME_ARGS (gst_util_get_timestamp () - t0),
                     st->default_width, st->default_height, diffuse_sd_scheduler_class (sd));
  } else {
    GST_INFO_OBJECT (st->element, "loaded %s (%s) in %" GST_TIME_FORMAT, s.model, diffuse_pipeline_model_class (pm),
                     GST_TIME_ARGS (gst_util_get_timestamp () - t0));
  }

  if (s.seed < 0) {
    st->random_seed = ((guint64) g_random_int () << 31) ^ g_random_int ();
    GST_INFO_OBJECT (st->element, "seed -1: using random seed %" G_GUINT64_FORMAT, st->random_seed);
  }
  ok = TRUE;

out:
  g_clear_error (&err);
  g_free (dbg);
  gst_diffuse_settings_clear (&s);
  return ok;
}

void
gst_diffuse_state_unload (GstDiffuseState *st)
{
  g_clear_pointer (&st->sd, diffuse_sd_unref);
  g_clear_pointer (&st->pm, diffuse_pipeline_model_unref);
  g_clear_pointer (&st->ip_image, diffuse_image_free);
  Effective before;
  effective_snapshot (st, &before);
  GST_OBJECT_LOCK (st->element);
  st->suggested_steps = -1;
  st->suggested_guidance = -1;
  g_clear_pointer (&st->suggested_scheduler, g_free);
  GST_OBJECT_UNLOCK (st->element);
  effective_notify (st, &before);
}

guint64
gst_diffuse_frame_seed (GstDiffuseState *st, const GstDiffuseSettings *s, guint64 n)
{
  guint64 base = s->seed >= 0 ? (guint64) s->seed : st->random_seed;
  return base + n * (guint64) s->seed_increment;
}

/* ---- generation ----------------------------------------------------------- */

typedef struct {
  GstDiffuseState *st;
  guint64 frame;
} StepData;

static gboolean
on_step (int step, int total, gpointer user_data)
{
  StepData *d = user_data;
  GstStructure *s = gst_structure_new ("diffuse-progress", "step", G_TYPE_INT, step, "total", G_TYPE_INT, total,
                                       "frame", G_TYPE_UINT64, d->frame, NULL);
  gst_element_post_message (d->st->element, gst_message_new_element (GST_OBJECT_CAST (d->st->element), s));
  return !gst_diffuse_state_is_flushing (d->st);
}

static gboolean
scheduler_ok (GstDiffuseState *st, const char *name)
{
  if (!name || g_strcmp0 (name, diffuse_sd_scheduler_class (st->sd)) == 0)
    return TRUE;
  const char *const *compat = diffuse_sd_compatible_schedulers (st->sd);
  for (guint i = 0; compat && compat[i]; i++)
    if (g_strcmp0 (compat[i], name) == 0)
      return TRUE;
  return FALSE;
}

DiffuseImage *
gst_diffuse_state_generate (GstDiffuseState *st, const GstDiffuseSettings *s, int width, int height,
                            const DiffuseImage *input, guint64 frame, GstFlowReturn *ret)
{
  GError *err = NULL;
  *ret = GST_FLOW_ERROR;
  g_return_val_if_fail (st->sd != NULL, NULL);

  if (!scheduler_ok (st, s->scheduler)) {
    const char *const *compat = diffuse_sd_compatible_schedulers (st->sd);
    gchar *list = compat ? g_strjoinv (", ", (gchar **) compat) : g_strdup ("");
    GST_ELEMENT_ERROR (st->element, LIBRARY, SETTINGS,
        ("Scheduler \"%s\" is not compatible with model \"%s\"; use one of: %s", s->scheduler, s->model, list),
        ("model folder %s, its scheduler %s", diffuse_pipeline_model_folder (st->pm),
         diffuse_sd_scheduler_class (st->sd)));
    g_free (list);
    return NULL;
  }

  StepData sd = { st, frame };
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = s->prompt ? s->prompt : "";
  p.negative_prompt = s->negative_prompt;
  p.width = width;
  p.height = height;
  p.num_inference_steps = s->num_inference_steps;
  p.guidance_scale = (float) s->guidance_scale;
  p.seed = gst_diffuse_frame_seed (st, s, frame);
  p.num_images = 1;
  p.clip_skip = s->clip_skip;
  p.scheduler = s->scheduler;
  p.image = input;
  p.strength = (float) s->strength;
  p.aesthetic_score = (float) s->aesthetic_score;
  p.negative_aesthetic_score = (float) s->negative_aesthetic_score;
  p.sag_scale = (float) s->sag_scale;
  p.lora_scale = (float) s->lora_scale;
  if (diffuse_sd_has_ip_adapter (st->sd)) {
    diffuse_sd_set_ip_adapter_scale (st->sd, (float) s->ip_adapter_scale);
    p.ip_adapter_image = st->ip_image;
  }
  p.on_step = on_step;
  p.user_data = &sd;
  p.cancellable = get_cancellable (st);

  GST_LOG_OBJECT (st->element, "frame %" G_GUINT64_FORMAT ": %dx%d, %d steps, guidance %g, seed %" G_GUINT64_FORMAT
                  ", prompt \"%s\"", frame, width, height, p.num_inference_steps, p.guidance_scale, p.seed, p.prompt);
  GstClockTime t0 = gst_util_get_timestamp ();
  GPtrArray *images = diffuse_sd_generate (st->sd, &p, &err);
  g_object_unref (p.cancellable);
  DiffuseImage *img = NULL;
  if (images && images->len > 0) {
    img = g_ptr_array_steal_index (images, 0);
    st->last_gen_time = gst_util_get_timestamp () - t0;
  }
  if (images)
    g_ptr_array_unref (images);
  if (!img) {
    if (is_cancel (st, err)) {
      GST_DEBUG_OBJECT (st->element, "generation of frame %" G_GUINT64_FORMAT " cancelled", frame);
      *ret = GST_FLOW_FLUSHING;
    } else {
      gchar *dbg = settings_debug (s);
      gst_diffuse_post_error (st->element, err, "Could not generate an image", dbg);
      g_free (dbg);
    }
    g_clear_error (&err);
    return NULL;
  }
  if (img->nsfw) {
    GST_ELEMENT_WARNING (st->element, STREAM, FAILED,
        ("Potential NSFW content was detected in frame %" G_GUINT64_FORMAT "; a black frame is output instead. "
         "Try again with a different prompt and/or seed.", frame),
        ("the safety checker of model \"%s\" flagged it", s->model));
    gst_element_post_message (st->element,
        gst_message_new_element (GST_OBJECT (st->element),
            gst_structure_new ("diffuse-nsfw", "frame", G_TYPE_UINT64, frame, NULL)));
  }
  *ret = GST_FLOW_OK;
  return img;
}

/* ---- pixels --------------------------------------------------------------- */

static GstVideoConverter *
make_converter (const GstVideoInfo *in, const GstVideoInfo *out)
{
  return gst_video_converter_new ((GstVideoInfo *) in, (GstVideoInfo *) out,
                                  gst_structure_new ("options", GST_VIDEO_CONVERTER_OPT_DITHER_METHOD,
                                                     GST_TYPE_VIDEO_DITHER_METHOD, GST_VIDEO_DITHER_NONE, NULL));
}

/* 8-bit sRGB at the size, rate and aspect of like (the converter wants
 * them equal on both sides). */
static void
rgb_info (GstVideoInfo *info, const GstVideoInfo *like)
{
  gst_video_info_set_format (info, GST_VIDEO_FORMAT_RGB, GST_VIDEO_INFO_WIDTH (like), GST_VIDEO_INFO_HEIGHT (like));
  gst_video_colorimetry_from_string (&info->colorimetry, GST_VIDEO_COLORIMETRY_SRGB);
  info->fps_n = like->fps_n;
  info->fps_d = like->fps_d;
  info->par_n = like->par_n;
  info->par_d = like->par_d;
  info->interlace_mode = like->interlace_mode;
}

gboolean
gst_diffuse_image_to_frame (const DiffuseImage *img, GstVideoFrame *frame)
{
  int w = GST_VIDEO_FRAME_WIDTH (frame), h = GST_VIDEO_FRAME_HEIGHT (frame);
  g_return_val_if_fail (img->width == w && img->height == h, FALSE);
  if (GST_VIDEO_FRAME_FORMAT (frame) == GST_VIDEO_FORMAT_RGB) {
    diffuse_image_to_rgb8 (img, GST_VIDEO_FRAME_PLANE_DATA (frame, 0), GST_VIDEO_FRAME_PLANE_STRIDE (frame, 0));
    return TRUE;
  }
  GstVideoInfo tmp_info;
  rgb_info (&tmp_info, &frame->info);
  guint8 *tmp = g_malloc (GST_VIDEO_INFO_SIZE (&tmp_info));
  diffuse_image_to_rgb8 (img, tmp, GST_VIDEO_INFO_PLANE_STRIDE (&tmp_info, 0));
  GstVideoFrame src;
  GstBuffer *buf = gst_buffer_new_wrapped_full (GST_MEMORY_FLAG_READONLY, tmp, GST_VIDEO_INFO_SIZE (&tmp_info), 0,
                                                GST_VIDEO_INFO_SIZE (&tmp_info), tmp, g_free);
  gboolean ok = gst_video_frame_map (&src, &tmp_info, buf, GST_MAP_READ);
  if (ok) {
    GstVideoConverter *conv = make_converter (&tmp_info, &frame->info);
    ok = conv != NULL;
    if (conv) {
      gst_video_converter_frame (conv, &src, frame);
      gst_video_converter_free (conv);
    }
    gst_video_frame_unmap (&src);
  }
  gst_buffer_unref (buf);
  return ok;
}

DiffuseImage *
gst_diffuse_image_from_frame (const GstVideoFrame *frame)
{
  int w = GST_VIDEO_FRAME_WIDTH (frame), h = GST_VIDEO_FRAME_HEIGHT (frame);
  if (GST_VIDEO_FRAME_FORMAT (frame) == GST_VIDEO_FORMAT_RGB)
    return diffuse_image_from_rgb8 (GST_VIDEO_FRAME_PLANE_DATA (frame, 0), w, h,
                                    GST_VIDEO_FRAME_PLANE_STRIDE (frame, 0));
  GstVideoInfo tmp_info;
  rgb_info (&tmp_info, &frame->info);
  GstBuffer *buf = gst_buffer_new_allocate (NULL, GST_VIDEO_INFO_SIZE (&tmp_info), NULL);
  GstVideoFrame dst;
  DiffuseImage *img = NULL;
  if (gst_video_frame_map (&dst, &tmp_info, buf, GST_MAP_WRITE)) {
    GstVideoConverter *conv = make_converter (&frame->info, &tmp_info);
    if (conv) {
      gst_video_converter_frame (conv, frame, &dst);
      gst_video_converter_free (conv);
      img = diffuse_image_from_rgb8 (GST_VIDEO_FRAME_PLANE_DATA (&dst, 0), w, h,
                                     GST_VIDEO_FRAME_PLANE_STRIDE (&dst, 0));
    }
    gst_video_frame_unmap (&dst);
  }
  gst_buffer_unref (buf);
  return img;
}

/* ---- what the sources share ----------------------------------------------- */

void
gst_diffuse_src_fixate (GstStructure *s, gint width, gint height, gint fps_n, gint fps_d)
{
  gst_structure_fixate_field_nearest_int (s, "width", width);
  gst_structure_fixate_field_nearest_int (s, "height", height);
  if (gst_structure_has_field (s, "framerate"))
    gst_structure_fixate_field_nearest_fraction (s, "framerate", fps_n, fps_d);
  else
    gst_structure_set (s, "framerate", GST_TYPE_FRACTION, fps_n, fps_d, NULL);
  if (gst_structure_has_field (s, "pixel-aspect-ratio"))
    gst_structure_fixate_field_nearest_fraction (s, "pixel-aspect-ratio", 1, 1);
  else
    gst_structure_set (s, "pixel-aspect-ratio", GST_TYPE_FRACTION, 1, 1, NULL);
  gst_structure_fixate_field (s, "format");

  /* colorimetry: sRGB for RGB formats, BT.601 for YUV, unless downstream
   * asks for another (then the frame conversion follows it) */
  const gchar *fmt = gst_structure_get_string (s, "format");
  const GstVideoFormatInfo *finfo = fmt ? gst_video_format_get_info (gst_video_format_from_string (fmt)) : NULL;
  const gchar *colorimetry =
      finfo && GST_VIDEO_FORMAT_INFO_IS_YUV (finfo) ? GST_VIDEO_COLORIMETRY_BT601 : GST_VIDEO_COLORIMETRY_SRGB;
  if (gst_structure_has_field (s, "colorimetry"))
    gst_structure_fixate_field_string (s, "colorimetry", colorimetry);
  else
    gst_structure_set (s, "colorimetry", G_TYPE_STRING, colorimetry, NULL);
}

gboolean
gst_diffuse_src_parse_caps (GstElement *src, GstCaps *caps, gboolean need_fps, GstVideoInfo *info)
{
  if (!gst_video_info_from_caps (info, caps) || (need_fps && info->fps_n <= 0)) {
    GST_ELEMENT_ERROR (src, CORE, NEGOTIATION, ("Cannot produce the caps asked for"),
        ("could not parse caps%s: %" GST_PTR_FORMAT, need_fps ? " or no framerate" : "", caps));
    return FALSE;
  }
  if (info->width % 8 != 0 || info->height % 8 != 0) {
    GST_ELEMENT_ERROR (src, CORE, NEGOTIATION,
        ("Width and height must be multiples of 8, downstream asked for %dx%d", info->width, info->height),
        ("caps %" GST_PTR_FORMAT, caps));
    return FALSE;
  }
  return TRUE;
}

gboolean
gst_diffuse_src_configure_pool (GstElement *src, GstQuery *query, gsize frame_size)
{
  GstBufferPool *pool = NULL;
  guint size, min = 0, max = 0;
  gboolean update;
  GstCaps *caps = NULL;

  if (gst_query_get_n_allocation_pools (query) > 0) {
    gst_query_parse_nth_allocation_pool (query, 0, &pool, &size, &min, &max);
    size = MAX (size, frame_size);
    update = TRUE;
  } else {
    size = frame_size;
    update = FALSE;
  }
  /* our own pool unless downstream offers a video pool */
  if (pool && !GST_IS_VIDEO_BUFFER_POOL (pool))
    gst_clear_object (&pool);
  if (!pool)
    pool = gst_video_buffer_pool_new ();

  GstStructure *config = gst_buffer_pool_get_config (pool);
  gst_query_parse_allocation (query, &caps, NULL);
  if (caps)
    gst_buffer_pool_config_set_params (config, caps, size, min, max);
  /* always a GstVideoMeta: the planes are described whatever the strides */
  gst_buffer_pool_config_add_option (config, GST_BUFFER_POOL_OPTION_VIDEO_META);
  if (!gst_buffer_pool_set_config (pool, config)) {
    config = gst_buffer_pool_get_config (pool);
    if (!gst_buffer_pool_config_validate_params (config, caps, size, min, max) ||
        !gst_buffer_pool_set_config (pool, config)) {
      GST_ELEMENT_ERROR (src, RESOURCE, SETTINGS, ("Failed to configure the buffer pool"), (NULL));
      gst_object_unref (pool);
      return FALSE;
    }
  }
  if (update)
    gst_query_set_nth_allocation_pool (query, 0, pool, size, min, max);
  else
    gst_query_add_allocation_pool (query, pool, size, min, max);
  gst_object_unref (pool);
  return TRUE;
}

gboolean
gst_diffuse_src_query (GstBaseSrc *src, GstDiffuseState *st, GstQuery *query, const GstVideoInfo *info,
                       const GstClockTime *latency, guint64 total_frames, gboolean *result)
{
  *result = FALSE;
  switch (GST_QUERY_TYPE (query)) {
    case GST_QUERY_CONTEXT:
      if (gst_diffuse_handle_context_query (GST_ELEMENT (src), query, &st->cache))
        return (*result = TRUE);
      return FALSE;
    case GST_QUERY_LATENCY:
      if (gst_base_src_is_live (src)) {
        GST_OBJECT_LOCK (src);
        GstClockTime l = *latency;
        GST_OBJECT_UNLOCK (src);
        GST_DEBUG_OBJECT (src, "reporting latency %" GST_TIME_FORMAT, GST_TIME_ARGS (l));
        gst_query_set_latency (query, TRUE, l, GST_CLOCK_TIME_NONE);
        return (*result = TRUE);
      }
      return FALSE;
    case GST_QUERY_CONVERT: {
      GstFormat src_fmt, dest_fmt;
      gint64 src_val, dest_val;
      gst_query_parse_convert (query, &src_fmt, &src_val, &dest_fmt, &dest_val);
      GST_OBJECT_LOCK (src);
      gboolean res = gst_video_info_convert ((GstVideoInfo *) info, src_fmt, src_val, dest_fmt, &dest_val);
      GST_OBJECT_UNLOCK (src);
      if (res)
        gst_query_set_convert (query, src_fmt, src_val, dest_fmt, dest_val);
      *result = res;
      return TRUE;
    }
    case GST_QUERY_DURATION: {
      GstFormat format;
      gst_query_parse_duration (query, &format, NULL);
      if (format != GST_FORMAT_TIME || total_frames == G_MAXUINT64)
        return FALSE;
      GST_OBJECT_LOCK (src);
      gboolean res = info->fps_n > 0;
      if (res)
        gst_query_set_duration (query, GST_FORMAT_TIME,
            gst_util_uint64_scale_round (total_frames, (guint64) info->fps_d * GST_SECOND, info->fps_n));
      GST_OBJECT_UNLOCK (src);
      return (*result = res);
    }
    default:
      return FALSE;
  }
}

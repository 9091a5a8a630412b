/* gst-diffuse — the command-line companion.
 *
 *   diffuse inspect MODEL [--variant V] [--dtype D] [--revision R] [--offline]
 *   diffuse download REPO [--variant V] [--revision R]
 *   diffuse save MODEL OUTDIR [--variant V] [--dtype D] [--max-shard-size BYTES]
 *   diffuse generate MODEL --prompt TEXT [--negative-prompt T] [--steps N] [--guidance G]
 *                    [--seed S] [--width W] [--height H] [--scheduler CLASS] [--clip-skip N]
 *                    [--num-images N] [--output out.png]
 *                    [--prompts-file P.json --output-dir DIR]
 *   diffuse animate MODEL [--motion-adapter REF] --prompt TEXT [--frames N] [the generate options]
 *                   (REF needed unless MODEL is an AnimateDiff pipeline folder)
 *                   [--output-dir DIR]
 *
 * --prompts-file: a JSON array of prompts, generated in one process with seed
 * (--seed + index); images go to DIR/NNN.png (animate: DIR/NNN_FF.png).
 * animate writes a clip's frames as DIR/FF.png (default DIR: frames).
 *
 * MODEL is a local diffusers pipeline folder or a Hub repo id. */
#include <diffuse/diffuse.h>
#include <diffuse/pipeline.h>
#include <diffuse/sd.h>
#include <diffuse/animate.h>
#include <gio/gio.h>
#include <json-glib/json-glib.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

static char *opt_variant, *opt_dtype, *opt_revision, *opt_device, *opt_class;
static gboolean opt_offline;
static gboolean opt_no_safety_checker;
static char *opt_vae, *opt_vae_subfolder;
static double opt_sag_scale;
static char **opt_lora;
static double opt_lora_scale = 1.0;
static char *opt_ip_adapter, *opt_ip_subfolder, *opt_ip_weight, *opt_ip_image;
static double opt_ip_scale = 1.0;
static gint64 opt_shard;
static char *opt_prompt, *opt_negative, *opt_scheduler, *opt_output;
static char *opt_prompts_file, *opt_output_dir, *opt_adapter;
static int opt_steps = -1, opt_width, opt_height, opt_clip_skip, opt_num_images = 1, opt_frames;
static double opt_guidance = -1;
static gint64 opt_seed = 0;

static GOptionEntry entries[] = {
  { "variant", 0, 0, G_OPTION_ARG_STRING, &opt_variant, "Weight variant (fp16, non_ema, ...)", "V" },
  { "dtype", 0, 0, G_OPTION_ARG_STRING, &opt_dtype, "Load/save dtype (float32, float16, bfloat16)", "D" },
  { "revision", 0, 0, G_OPTION_ARG_STRING, &opt_revision, "Hub revision (branch, tag, commit)", "R" },
  { "device", 0, 0, G_OPTION_ARG_STRING, &opt_device, "Device (cpu, auto, cuda:N)", "DEV" },
  { "pipeline-class", 0, 0, G_OPTION_ARG_STRING, &opt_class, "Load as this pipeline class", "CLASS" },
  { "offline", 0, 0, G_OPTION_ARG_NONE, &opt_offline, "Use the Hub cache only", NULL },
  { "vae", 0, 0, G_OPTION_ARG_STRING, &opt_vae,
    "Replace the model's VAE: a folder or Hub repo id (from_pretrained (..., vae=AutoencoderKL.from_pretrained (REF)))",
    "REF" },
  { "vae-subfolder", 0, 0, G_OPTION_ARG_STRING, &opt_vae_subfolder, "The subfolder of --vae that holds it", "DIR" },
  { "no-safety-checker", 0, 0, G_OPTION_ARG_NONE, &opt_no_safety_checker,
    "Load without the model's safety checker (safety_checker=None; warns)", NULL },
  { "max-shard-size", 0, 0, G_OPTION_ARG_INT64, &opt_shard, "Shard weights above this many bytes (save)", "BYTES" },
  { "prompt", 'p', 0, G_OPTION_ARG_STRING, &opt_prompt, "Prompt (generate)", "TEXT" },
  { "negative-prompt", 'n', 0, G_OPTION_ARG_STRING, &opt_negative, "Negative prompt (generate)", "TEXT" },
  { "steps", 's', 0, G_OPTION_ARG_INT, &opt_steps, "Inference steps (default: the model's, else 50)", "N" },
  { "guidance", 'g', 0, G_OPTION_ARG_DOUBLE, &opt_guidance, "Guidance scale (default: the model's, else 7.5)", "G" },
  { "seed", 0, 0, G_OPTION_ARG_INT64, &opt_seed, "Seed of torch.Generator(\"cpu\").manual_seed (0)", "S" },
  { "width", 'W', 0, G_OPTION_ARG_INT, &opt_width, "Width, a multiple of 8 (default: the model's)", "W" },
  { "height", 'H', 0, G_OPTION_ARG_INT, &opt_height, "Height, a multiple of 8 (default: the model's)", "H" },
  { "scheduler", 0, 0, G_OPTION_ARG_STRING, &opt_scheduler, "A compatible scheduler class", "CLASS" },
  { "clip-skip", 0, 0, G_OPTION_ARG_INT, &opt_clip_skip, "CLIP layers to skip (0)", "N" },
  { "lora", 0, 0, G_OPTION_ARG_STRING_ARRAY, &opt_lora,
    "LoRA adapter (diffusers format), .safetensors file or folder, with an optional :weight (repeatable)",
    "PATH[:W]" },
  { "ip-adapter", 0, 0, G_OPTION_ARG_STRING, &opt_ip_adapter,
    "IP-Adapter folder or Hub repo id (with --ip-adapter-image; generate and animate)", "REF" },
  { "ip-adapter-subfolder", 0, 0, G_OPTION_ARG_STRING, &opt_ip_subfolder, "Its subfolder (models)", "DIR" },
  { "ip-adapter-weight-name", 0, 0, G_OPTION_ARG_STRING, &opt_ip_weight,
    "Its weight file (ip-adapter_sd15.safetensors)", "FILE" },
  { "ip-adapter-image", 0, 0, G_OPTION_ARG_FILENAME, &opt_ip_image, "The image prompt (PNG)", "PNG" },
  { "ip-adapter-scale", 0, 0, G_OPTION_ARG_DOUBLE, &opt_ip_scale, "set_ip_adapter_scale (1)", "S" },
  { "lora-scale", 0, 0, G_OPTION_ARG_DOUBLE, &opt_lora_scale,
    "Multiplies every LoRA adapter's weight (cross_attention_kwargs scale, 1)", "S" },
  { "sag-scale", 0, 0, G_OPTION_ARG_DOUBLE, &opt_sag_scale,
    "Self-attention guidance scale (0 = off; StableDiffusionSAGPipeline's default is 0.75)", "S" },
  { "num-images", 0, 0, G_OPTION_ARG_INT, &opt_num_images, "Images to generate (1)", "N" },
  { "output", 'o', 0, G_OPTION_ARG_FILENAME, &opt_output, "Output PNG (out.png; -N suffix for several)", "FILE" },
  { "prompts-file", 0, 0, G_OPTION_ARG_FILENAME, &opt_prompts_file,
    "JSON array of prompts, seed --seed + index (generate, animate)", "FILE" },
  { "output-dir", 0, 0, G_OPTION_ARG_FILENAME, &opt_output_dir,
    "Folder for NNN.png (generate --prompts-file) or [NNN_]FF.png frames (animate)", "DIR" },
  { "motion-adapter", 0, 0, G_OPTION_ARG_STRING, &opt_adapter, "MotionAdapter folder or Hub repo id (animate)", "REF" },
  { "frames", 0, 0, G_OPTION_ARG_INT, &opt_frames, "Frames per clip (animate, default 16)", "N" },
  { NULL },
};

static gboolean
progress (const DiffuseLoadProgress *p, gpointer user_data)
{
  if (strcmp (p->stage, "download") == 0)
    fprintf (stderr, "\rdownloading %s: %.1f / %.1f MB   ", p->what, p->done / 1e6, p->total / 1e6);
  return TRUE;
}

/* ---- a small PNG writer (zlib stream from GIO, CRC table here) ---- */

static guint32 crc_table[256];

static guint32
crc32_png (const guint8 *p, gsize n, guint32 c)
{
  if (!crc_table[1])
    for (guint32 i = 0; i < 256; i++) {
      guint32 v = i;
      for (int k = 0; k < 8; k++)
        v = v & 1 ? 0xedb88320u ^ (v >> 1) : v >> 1;
      crc_table[i] = v;
    }
  c = ~c;
  for (gsize i = 0; i < n; i++)
    c = crc_table[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return ~c;
}

static void
put_be32 (GByteArray *b, guint32 v)
{
  guint8 x[4] = { v >> 24, v >> 16, v >> 8, v };
  g_byte_array_append (b, x, 4);
}

static void
png_chunk (GByteArray *out, const char *type, const guint8 *data, gsize n)
{
  put_be32 (out, (guint32) n);
  gsize start = out->len;
  g_byte_array_append (out, (const guint8 *) type, 4);
  if (n)
    g_byte_array_append (out, data, (guint) n);
  put_be32 (out, crc32_png (out->data + start, n + 4, 0));
}

static gboolean
write_png (const char *path, const guint8 *rgb, int w, int h, GError **error)
{
  GByteArray *raw = g_byte_array_new ();
  for (int y = 0; y < h; y++) {
    guint8 filter = 0;
    g_byte_array_append (raw, &filter, 1);
    g_byte_array_append (raw, rgb + (gsize) y * w * 3, w * 3);
  }
  GZlibCompressor *z = g_zlib_compressor_new (G_ZLIB_COMPRESSOR_FORMAT_ZLIB, 9);
  gsize cap = raw->len + raw->len / 100 + 1024, read = 0, written = 0;
  guint8 *zbuf = g_malloc (cap);
  GConverterResult r = g_converter_convert (G_CONVERTER (z), raw->data, raw->len, zbuf, cap,
                                            G_CONVERTER_INPUT_AT_END, &read, &written, error);
  g_object_unref (z);
  g_byte_array_unref (raw);
  if (r != G_CONVERTER_FINISHED) {
    g_free (zbuf);
    if (error && !*error)
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_FAILED, "PNG compression failed");
    return FALSE;
  }
  GByteArray *png = g_byte_array_new ();
  static const guint8 sig[8] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n' };
  g_byte_array_append (png, sig, 8);
  guint8 ihdr[13] = { w >> 24, w >> 16, w >> 8, w, h >> 24, h >> 16, h >> 8, h, 8, 2, 0, 0, 0 };
  png_chunk (png, "IHDR", ihdr, 13);
  guint8 srgb = 0;   /* perceptual */
  png_chunk (png, "sRGB", &srgb, 1);
  png_chunk (png, "IDAT", zbuf, written);
  png_chunk (png, "IEND", NULL, 0);
  gboolean ok = g_file_set_contents (path, (const char *) png->data, png->len, error);
  g_byte_array_unref (png);
  g_free (zbuf);
  return ok;
}

static gboolean
on_step (int step, int total, gpointer user_data)
{
  fprintf (stderr, "\rstep %d/%d", step, total);
  if (step == total)
    fprintf (stderr, "\n");
  return TRUE;
}

/* Generation defaults a model folder suggests in gst-diffuse.json
 * (num_inference_steps, guidance_scale, width, height, scheduler), as the
 * bundled model does; the elements apply them the same way. */
static char *default_scheduler;

static gboolean
model_defaults (DiffusePipelineModel *pm, DiffuseSDParams *p, GError **error)
{
  double guidance = p->guidance_scale;
  if (!diffuse_pipeline_model_suggestions (pm, &p->num_inference_steps, &guidance, &p->width, &p->height,
                                           &default_scheduler, error))
    return FALSE;
  p->guidance_scale = (float) guidance;
  if (default_scheduler)
    p->scheduler = default_scheduler;
  return TRUE;
}

/* The prompts to run: the --prompts-file JSON array, else --prompt (or ""). */
static GPtrArray *
load_prompts (GError **error)
{
  GPtrArray *out = g_ptr_array_new_with_free_func (g_free);
  if (!opt_prompts_file) {
    g_ptr_array_add (out, g_strdup (opt_prompt ? opt_prompt : ""));
    return out;
  }
  JsonParser *parser = json_parser_new ();
  gboolean ok = json_parser_load_from_file (parser, opt_prompts_file, error);
  JsonNode *root = ok ? json_parser_get_root (parser) : NULL;
  if (ok && (!root || !JSON_NODE_HOLDS_ARRAY (root))) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: expected a JSON array of prompts",
                 opt_prompts_file);
    ok = FALSE;
  }
  if (ok) {
    JsonArray *arr = json_node_get_array (root);
    for (guint i = 0; ok && i < json_array_get_length (arr); i++) {
      JsonNode *n = json_array_get_element (arr, i);
      if (!JSON_NODE_HOLDS_VALUE (n) || json_node_get_value_type (n) != G_TYPE_STRING) {
        g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG, "%s: element %u is not a string",
                     opt_prompts_file, i);
        ok = FALSE;
      } else {
        g_ptr_array_add (out, g_strdup (json_node_get_string (n)));
      }
    }
  }
  g_object_unref (parser);
  if (!ok)
    g_clear_pointer (&out, g_ptr_array_unref);
  return out;
}

static gboolean
write_image (const DiffuseImage *img, const char *name, GError **error)
{
  guint8 *rgb = g_malloc ((gsize) img->width * img->height * 3);
  diffuse_image_to_rgb8 (img, rgb, img->width * 3);
  gboolean ok = write_png (name, rgb, img->width, img->height, error);
  g_free (rgb);
  return ok;
}

static gboolean
make_output_dir (const char *dir, GError **error)
{
  if (g_mkdir_with_parents (dir, 0755) != 0) {
    g_set_error (error, G_FILE_ERROR, g_file_error_from_errno (errno), "cannot create %s: %s", dir,
                 g_strerror (errno));
    return FALSE;
  }
  return TRUE;
}

static int
fail (GError **err)
{
  fprintf (stderr, "error: %s\n", (*err)->message);
  g_clear_error (err);
  return 1;
}

/* --ip-adapter-image, which --ip-adapter needs (a PNG) */
static DiffuseImage *
ip_adapter_image (GError **error)
{
  if (!opt_ip_image) {
    g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT, "--ip-adapter needs --ip-adapter-image");
    return NULL;
  }
  return diffuse_image_load_png (opt_ip_image, error);
}

static int
generate (DiffusePipelineModel *pm)
{
  GError *err = NULL;
  GPtrArray *prompts = load_prompts (&err);
  if (!prompts)
    return fail (&err);
  if (opt_prompts_file && !opt_output_dir) {
    fprintf (stderr, "error: --prompts-file needs --output-dir\n");
    g_ptr_array_unref (prompts);
    return 2;
  }
  if (opt_output_dir && !make_output_dir (opt_output_dir, &err)) {
    g_ptr_array_unref (prompts);
    return fail (&err);
  }
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  if (!sd) {
    g_ptr_array_unref (prompts);
    return fail (&err);
  }
  if (opt_lora && *opt_lora) {
    char *spec = g_strjoinv (",", opt_lora);
    gboolean ok = diffuse_sd_load_lora_spec (sd, spec, &err);
    g_free (spec);
    if (!ok) {
      diffuse_sd_unref (sd);
      g_ptr_array_unref (prompts);
      return fail (&err);
    }
  }
  DiffuseImage *ip_image = NULL;
  if (opt_ip_adapter) {
    gboolean ok = (ip_image = ip_adapter_image (&err)) != NULL;
    if (ok)
      ok = diffuse_sd_load_ip_adapter (sd, opt_ip_adapter, opt_ip_subfolder ? opt_ip_subfolder : "models",
                                       opt_ip_weight ? opt_ip_weight : "ip-adapter_sd15.safetensors", &err);
    if (!ok) {
      diffuse_image_free (ip_image);
      diffuse_sd_unref (sd);
      g_ptr_array_unref (prompts);
      return fail (&err);
    }
    diffuse_sd_set_ip_adapter_scale (sd, (float) opt_ip_scale);
  }
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.ip_adapter_image = ip_image;
  if (!model_defaults (pm, &p, &err)) {
    diffuse_image_free (ip_image);
    diffuse_sd_unref (sd);
    g_ptr_array_unref (prompts);
    return fail (&err);
  }
  p.negative_prompt = opt_negative;
  if (opt_steps > 0)
    p.num_inference_steps = opt_steps;
  if (opt_guidance >= 0)
    p.guidance_scale = (float) opt_guidance;
  if (opt_width)
    p.width = opt_width;
  if (opt_height)
    p.height = opt_height;
  if (opt_scheduler)
    p.scheduler = opt_scheduler;
  p.clip_skip = opt_clip_skip;
  p.sag_scale = (float) opt_sag_scale;
  p.lora_scale = (float) opt_lora_scale;
  p.num_images = opt_num_images;
  p.on_step = opt_prompts_file ? NULL : on_step;
  int rc = 0;
  for (guint k = 0; k < prompts->len && rc == 0; k++) {
    p.prompt = g_ptr_array_index (prompts, k);
    p.seed = (guint64) (opt_seed + k);
    gint64 t0 = g_get_monotonic_time ();
    GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);
    gint64 t1 = g_get_monotonic_time ();
    if (!imgs) {
      rc = fail (&err);
      break;
    }
    const char *out = opt_output ? opt_output : "out.png";
    for (guint i = 0; i < imgs->len && rc == 0; i++) {
      DiffuseImage *img = g_ptr_array_index (imgs, i);
      char *name;
      if (opt_output_dir)
        name = imgs->len == 1 ? g_strdup_printf ("%s/%03u.png", opt_output_dir, k)
                              : g_strdup_printf ("%s/%03u-%u.png", opt_output_dir, k, i);
      else
        name = imgs->len == 1 ? g_strdup (out) : g_strdup_printf ("%.*s-%u.png",
               (int) (g_str_has_suffix (out, ".png") ? strlen (out) - 4 : strlen (out)), out, i);
      if (!write_image (img, name, &err))
        rc = fail (&err);
      else
        printf ("wrote %s (%dx%d, \"%s\", seed %" G_GUINT64_FORMAT ", %d steps, %.3f s)%s\n", name, img->width,
                img->height, p.prompt, p.seed, p.num_inference_steps, (t1 - t0) / 1e6,
                img->nsfw ? " - flagged by the safety checker: black" : "");
      g_free (name);
    }
    g_ptr_array_unref (imgs);
  }
  diffuse_image_free (ip_image);
  diffuse_sd_unref (sd);
  g_ptr_array_unref (prompts);
  return rc;
}

/* text-to-video with a MotionAdapter (AnimateDiffPipeline.from_pipe (pipe, motion_adapter=...)) */
static int
animate (DiffusePipelineModel *pm)
{
  GError *err = NULL;
  /* an AnimateDiff pipeline folder (unet saved as UNetMotionModel) brings its own motion modules */
  const gboolean own = diffuse_animate_model_has_motion_unet (pm);
  if (!opt_adapter && !own) {
    fprintf (stderr, "error: animate needs --motion-adapter (a MotionAdapter folder or Hub repo id)\n");
    return 2;
  }
  if (opt_adapter && own)
    fprintf (stderr, "note: %s is an AnimateDiff pipeline; its unet's own motion modules are used and "
             "--motion-adapter is ignored (as diffusers' from_pipe does)\n", diffuse_pipeline_model_folder (pm));
  GPtrArray *prompts = load_prompts (&err);
  if (!prompts)
    return fail (&err);
  const char *dir = opt_output_dir ? opt_output_dir : "frames";
  if (!make_output_dir (dir, &err)) {
    g_ptr_array_unref (prompts);
    return fail (&err);
  }
  DiffuseAnimate *an = NULL;
  if (own) {
    an = diffuse_animate_new (pm, &err);
  } else {
    DiffuseComponent *ad = diffuse_animate_load_adapter (pm, opt_adapter, NULL, &err);
    an = ad ? diffuse_animate_new_from_pipe (pm, ad, &err) : NULL;
    if (ad)
      diffuse_component_unref (ad);
  }
  if (an && opt_lora && *opt_lora) {
    char *spec = g_strjoinv (",", opt_lora);
    if (!diffuse_animate_load_lora_spec (an, spec, &err))
      g_clear_pointer (&an, diffuse_animate_unref);
    g_free (spec);
  }
  DiffuseImage *ip_image = NULL;
  if (an && opt_ip_adapter) {
    gboolean ok = (ip_image = ip_adapter_image (&err)) != NULL;
    if (ok)
      ok = diffuse_animate_load_ip_adapter (an, opt_ip_adapter, opt_ip_subfolder ? opt_ip_subfolder : "models",
                                            opt_ip_weight ? opt_ip_weight : "ip-adapter_sd15.safetensors", &err);
    if (ok)
      diffuse_animate_set_ip_adapter_scale (an, (float) opt_ip_scale);
    else
      g_clear_pointer (&an, diffuse_animate_unref);
  }
  if (!an) {
    diffuse_image_free (ip_image);
    g_ptr_array_unref (prompts);
    return fail (&err);
  }
  /* the image pipeline's defaults (gst-diffuse.json) apply to its clips too */
  DiffuseSDParams d;
  diffuse_sd_default_params (&d);
  if (!model_defaults (pm, &d, &err)) {
    diffuse_image_free (ip_image);
    diffuse_animate_unref (an);
    g_ptr_array_unref (prompts);
    return fail (&err);
  }
  DiffuseAnimateParams p;
  diffuse_animate_default_params (&p);
  p.ip_adapter_image = ip_image;
  p.num_inference_steps = opt_steps > 0 ? opt_steps : d.num_inference_steps;
  p.guidance_scale = opt_guidance >= 0 ? (float) opt_guidance : d.guidance_scale;
  p.width = opt_width ? opt_width : d.width;
  p.height = opt_height ? opt_height : d.height;
  p.scheduler = opt_scheduler ? opt_scheduler : d.scheduler;
  p.negative_prompt = opt_negative;
  p.clip_skip = opt_clip_skip;
  p.lora_scale = (float) opt_lora_scale;
  if (opt_frames > 0)
    p.num_frames = opt_frames;
  p.on_step = opt_prompts_file ? NULL : on_step;
  int rc = 0;
  for (guint k = 0; k < prompts->len && rc == 0; k++) {
    p.prompt = g_ptr_array_index (prompts, k);
    p.seed = (guint64) (opt_seed + k);
    gint64 t0 = g_get_monotonic_time ();
    GPtrArray *frames = diffuse_animate_generate (an, &p, &err);
    gint64 t1 = g_get_monotonic_time ();
    if (!frames) {
      rc = fail (&err);
      break;
    }
    for (guint f = 0; f < frames->len && rc == 0; f++) {
      char *name = opt_prompts_file ? g_strdup_printf ("%s/%03u_%02u.png", dir, k, f)
                                    : g_strdup_printf ("%s/%02u.png", dir, f);
      if (!write_image (g_ptr_array_index (frames, f), name, &err))
        rc = fail (&err);
      g_free (name);
    }
    if (rc == 0)
      printf ("wrote %u frames to %s (\"%s\", seed %" G_GUINT64_FORMAT ", %d steps, %.3f s)\n", frames->len, dir,
              p.prompt, p.seed, p.num_inference_steps, (t1 - t0) / 1e6);
    g_ptr_array_unref (frames);
  }
  diffuse_image_free (ip_image);
  diffuse_animate_unref (an);
  g_ptr_array_unref (prompts);
  return rc;
}

static const char *
kind_name (DiffuseComponentKind k)
{
  switch (k) {
    case DIFFUSE_COMPONENT_MODEL: return "model";
    case DIFFUSE_COMPONENT_SCHEDULER: return "scheduler";
    case DIFFUSE_COMPONENT_TOKENIZER: return "tokenizer";
    default: return "processor";
  }
}

static void
print_model (DiffusePipelineModel *pm, DiffuseComponentCache *cache)
{
  printf ("pipeline: %s\nfolder:   %s\n", diffuse_pipeline_model_class (pm), diffuse_pipeline_model_folder (pm));
  const char *const *names = diffuse_pipeline_model_component_names (pm);
  for (int i = 0; names[i]; i++) {
    DiffuseComponent *c = diffuse_pipeline_model_get (pm, names[i]);
    if (!c) {
      printf ("  %-18s (none)\n", names[i]);
      continue;
    }
    printf ("  %-18s %s.%s [%s]", names[i], diffuse_component_library (c), diffuse_component_class (c),
            kind_name (diffuse_component_kind (c)));
    if (diffuse_component_weights (c)) {
      guint n = 0;
      g_free (diffuse_weights_names (diffuse_component_weights (c), &n));
      printf (" %u tensors, %.2f MB as %s", n, diffuse_component_bytes (c) / 1e6,
              diffuse_dtype_name (diffuse_component_dtype (c)));
      if (diffuse_component_variant (c))
        printf (", variant %s", diffuse_component_variant (c));
      const char *const *files = diffuse_component_files (c);
      for (int f = 0; files && files[f]; f++) {
        char *b = g_path_get_basename (files[f]);
        printf ("%s%s", f ? ", " : "\n      files: ", b);
        g_free (b);
      }
    }
    printf ("\n");
  }
  DiffuseCacheStats s;
  diffuse_component_cache_get_stats (cache, &s);
  printf ("components loaded: %" G_GUINT64_FORMAT ", resident %.2f MB\n", s.n_loads, s.resident_bytes / 1e6);
}

int
main (int argc, char **argv)
{
  GError *err = NULL;
  GOptionContext *ctx = g_option_context_new ("inspect|download|save|generate|animate MODEL [OUTDIR]");
  g_option_context_set_summary (ctx, "Inspect, download and convert diffusers pipelines.");
  g_option_context_add_main_entries (ctx, entries, NULL);
  if (!g_option_context_parse (ctx, &argc, &argv, &err)) {
    fprintf (stderr, "%s\n", err->message);
    return 2;
  }
  if (argc < 3) {
    char *help = g_option_context_get_help (ctx, TRUE, NULL);
    fprintf (stderr, "%s", help);
    g_free (help);
    return 2;
  }
  const char *cmd = argv[1], *model = argv[2];
  DiffuseLoadParams lp = diffuse_load_default_params ();
  lp.variant = opt_variant;
  lp.revision = opt_revision;
  lp.device = opt_device;
  lp.pipeline_class = opt_class;
  lp.offline = opt_offline;
  GHashTable *no_checker = NULL;
  if (opt_no_safety_checker) {
    no_checker = g_hash_table_new (g_str_hash, g_str_equal);
    g_hash_table_insert (no_checker, (gpointer) "safety_checker", NULL);
    lp.overrides = no_checker;
  }
  lp.progress = progress;
  if (opt_dtype) {
    if (!diffuse_dtype_from_string (opt_dtype, &lp.dtype)) {
      fprintf (stderr, "unknown dtype %s\n", opt_dtype);
      return 2;
    }
    lp.have_dtype = TRUE;
  }
  int rc = 0;
  DiffuseComponentCache *cache = diffuse_component_cache_new ();
  DiffuseComponent *vae = NULL;
  if (opt_vae) {
    DiffuseLoadParams vlp = lp;
    vlp.variant = NULL;
    vlp.overrides = NULL;
    vlp.pipeline_class = NULL;
    vae = diffuse_component_load (cache, opt_vae, opt_vae_subfolder, "vae", &vlp, &err);
    if (!vae) {
      fprintf (stderr, "error: %s\n", err->message);
      g_clear_error (&err);
      g_clear_pointer (&no_checker, g_hash_table_unref);
      diffuse_component_cache_unref (cache);
      g_option_context_free (ctx);
      return 1;
    }
    if (!no_checker)
      no_checker = g_hash_table_new (g_str_hash, g_str_equal);
    g_hash_table_insert (no_checker, (gpointer) "vae", vae);
    lp.overrides = no_checker;
  }
  if (strcmp (cmd, "inspect") == 0 || strcmp (cmd, "download") == 0 || strcmp (cmd, "save") == 0 ||
      strcmp (cmd, "generate") == 0 || strcmp (cmd, "animate") == 0) {
    DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, &lp, cache, &err);
    if (!pm) {
      fprintf (stderr, "error: %s\n", err->message);
      rc = 1;
    } else if (strcmp (cmd, "generate") == 0) {
      rc = generate (pm);
    } else if (strcmp (cmd, "animate") == 0) {
      rc = animate (pm);
    } else if (strcmp (cmd, "save") == 0) {
      if (argc < 4) {
        fprintf (stderr, "save needs an output folder\n");
        rc = 2;
      } else {
        DiffuseSaveParams sp = diffuse_save_default_params ();
        sp.variant = opt_variant;
        sp.max_shard_size = (guint64) MAX (opt_shard, 0);
        sp.have_dtype = lp.have_dtype;
        sp.dtype = lp.dtype;
        if (!diffuse_pipeline_model_save (pm, argv[3], &sp, &err)) {
          fprintf (stderr, "error: %s\n", err->message);
          rc = 1;
        } else {
          printf ("saved to %s\n", argv[3]);
        }
      }
    } else {
      print_model (pm, cache);
    }
    if (pm)
      diffuse_pipeline_model_unref (pm);
  } else {
    fprintf (stderr, "unknown command %s\n", cmd);
    rc = 2;
  }
  g_clear_error (&err);
  g_clear_pointer (&no_checker, g_hash_table_unref);
  if (vae)
    diffuse_component_unref (vae);
  diffuse_component_cache_unref (cache);
  g_option_context_free (ctx);
  return rc;
}

/* AnimateDiff against diffusers (tests/reference/make_animatediff_fixtures.py):
 *   - MotionAdapter loading (three tiny configurations: v1.5-2 style with a
 *     mid-block motion module, v1.4 style without one and with per-block
 *     heads/depths and stored positional tables, PIA style with conv_in),
 *     parameter counts equal to diffusers';
 *   - UNetMotionModel.from_unet2d (unet, adapter) forward in f32, within 1e-4
 *     relative, also at a latent size that needs forwarded upsample sizes;
 *   - AnimateDiffPipeline.from_pipe (sd, motion_adapter=...) frames within one
 *     8-bit level, for DDIM (the seed's linear-beta config), Euler,
 *     Euler ancestral and DPM++, with and without CFG, 4 to 16 frames,
 *     decode chunks smaller than the clip;
 *   - sharing: building the animate pipeline from a loaded SD pipeline adds
 *     only the adapter's bytes to the component cache, and its motion UNet
 *     runs the very DiffuseUNet object of the SD pipeline;
 *   - errors: a missing adapter weight, too many frames, a PIA adapter in the
 *     AnimateDiff pipeline, cancellation;
 *   - a pipeline saved by diffusers' AnimateDiffPipeline.save_pretrained
 *     (saved-pipeline/: unet/ a UNetMotionModel, make_animatediff_saved_fixtures.py):
 *     AnimateDiffPipeline.from_pretrained frames within one 8-bit level, the
 *     unet's own motion modules used (motion_adapter/ perturbed: same frames;
 *     the unet's motion modules perturbed: other frames), the component loaded
 *     and built once, errors naming key and file for folders whose config
 *     does not fit the weights, and diffuse_pipeline_model_save round trip. */
#include "testutil.h"
#include <diffuse/animate.h>
#include <diffuse/motion.h>
#include <diffuse/sd.h>
#include <json-glib/json-glib.h>
#include <string.h>
#include <stdio.h>
#include <unistd.h>
#include <math.h>

static DiffuseComponentCache *cache;
static DiffusePipelineModel *sd_pm;      /* tiny-sd in `cache` */
static DiffuseSafetensors *frames_st, *forward_st, *saved_frames_st;
static JsonObject *params_json;

/* DIFFUSE_TEST_DEVICE=cuda:0 runs the pipeline cases on a GPU (tests/bench/gpu/run.sh) */
static const DiffuseLoadParams *
test_load_params (void)
{
  static DiffuseLoadParams lp;
  lp = diffuse_load_default_params ();
  lp.device = g_getenv ("DIFFUSE_TEST_DEVICE");
  return &lp;
}

static DiffusePipelineModel *
get_sd (void)
{
  if (sd_pm)
    return sd_pm;
  GError *err = NULL;
  char *path = tu_fixture ("pipelines/tiny-sd");
  sd_pm = diffuse_pipeline_model_load (path, test_load_params (), cache, &err);
  g_assert_no_error (err);
  g_free (path);
  return sd_pm;
}

static DiffuseMotionAdapter *
load_adapter (const char *name)
{
  GError *err = NULL;
  char *rel = g_strdup_printf ("animatediff/%s", name);
  char *dir = tu_fixture (rel);
  DiffuseMotionAdapter *a = diffuse_motion_adapter_new_from_dir (dir, NULL, &err);
  g_assert_no_error (err);
  g_assert_nonnull (a);
  g_free (dir);
  g_free (rel);
  return a;
}

static guint64
param_count (const char *adapter, const char *what)
{
  JsonObject *ads = json_object_get_object_member (params_json, "adapters");
  return (guint64) json_object_get_int_member (json_object_get_object_member (ads, adapter), what);
}

/* ---- models ---------------------------------------------------------------- */

static void
test_adapters (void)
{
  static const char *names[] = { "a", "b", "c" };
  static const gboolean mid[] = { TRUE, FALSE, TRUE };
  static const int seq[] = { 16, 8, 8 };
  static const int conv_in[] = { 0, 0, 9 };
  for (int i = 0; i < 3; i++) {
    DiffuseMotionAdapter *a = load_adapter (names[i]);
    g_assert_cmpint (diffuse_motion_adapter_n_blocks (a), ==, 2);
    g_assert_cmpint (diffuse_motion_adapter_has_mid_block (a), ==, mid[i]);
    g_assert_cmpint (diffuse_motion_adapter_max_seq_length (a), ==, seq[i]);
    g_assert_cmpint (diffuse_motion_adapter_conv_in_channels (a), ==, conv_in[i]);
    g_assert_cmpuint (diffuse_motion_adapter_n_params (a), ==, param_count (names[i], "adapter"));
    g_assert_null (diffuse_motion_adapter_unused_keys (a)[0]);
    diffuse_motion_adapter_unref (a);
  }
}

static DiffuseUNet *
load_unet (void)
{
  GError *err = NULL;
  char *dir = tu_fixture ("pipelines/tiny-sd/unet");
  DiffuseUNet *u = diffuse_unet_new_from_dir (dir, NULL, &err);
  g_assert_no_error (err);
  g_free (dir);
  return u;
}

static void
run_forward (gconstpointer data)
{
  const char *key = data;                   /* "a", "b-odd", ... */
  char adapter[2] = { key[0], 0 };
  GError *err = NULL;
  DiffuseUNet *u = load_unet ();
  DiffuseMotionAdapter *a = load_adapter (adapter);
  DiffuseUNetMotion *m = diffuse_unet_motion_new (u, a, &err);
  g_assert_no_error (err);
  g_assert_true (diffuse_unet_motion_get_unet (m) == u);
  g_assert_cmpuint (diffuse_unet_motion_n_params (m), ==, param_count (adapter, "unet_motion"));
  g_assert_cmpuint (diffuse_unet_n_params (u), ==, param_count (adapter, "unet"));

  char *name = g_strdup_printf ("%s.sample", key);
  DiffuseTensor *x = tu_get (forward_st, name);
  g_free (name);
  name = g_strdup_printf ("%s.encoder_hidden_states", key);
  DiffuseTensor *ehs = tu_get (forward_st, name);
  g_free (name);
  name = g_strdup_printf ("%s.timestep", key);
  DiffuseTensor *tt = tu_get (forward_st, name);
  g_free (name);
  name = g_strdup_printf ("%s.out", key);
  DiffuseTensor *want = tu_get (forward_st, name);
  g_free (name);
  float t = diffuse_tensor_f32 (tt)[0];
  g_assert_cmpint (x->shape[1], ==, diffuse_unet_motion_in_channels (m));

  DiffuseTensor *got = diffuse_unet_motion_forward (m, x, &t, 1, ehs, NULL, &err);
  g_assert_no_error (err);
  tu_assert_close (got, want, 1e-6, 1e-4, key);
  diffuse_tensor_unref (got);

  /* the per-video embeddings [B, L, D] are repeated over the frames: same
   * result as passing them repeat_interleave'd */
  const int64_t B = x->shape[0], F = x->shape[2];
  DiffuseTensor *first = diffuse_narrow (ehs, 0, 0, 1);           /* frame 0 of video 0 */
  DiffuseTensor **rows = g_new (DiffuseTensor *, B * F);
  for (int64_t i = 0; i < B * F; i++)
    rows[i] = first;
  DiffuseTensor *rep = diffuse_concat (rows, (int) (B * F), 0);
  DiffuseTensor **few = g_new (DiffuseTensor *, B);
  for (int64_t i = 0; i < B; i++)
    few[i] = first;
  DiffuseTensor *per_video = diffuse_concat (few, (int) B, 0);
  DiffuseTensor *y1 = diffuse_unet_motion_forward (m, x, &t, 1, rep, NULL, &err);
  g_assert_no_error (err);
  DiffuseTensor *y2 = diffuse_unet_motion_forward (m, x, &t, 1, per_video, NULL, &err);
  g_assert_no_error (err);
  g_assert_cmpfloat (diffuse_tensor_max_abs_diff (y1, y2), <=, 1e-6);
  if (x->shape[1] == diffuse_unet_in_channels (u)) {
    /* the motion modules matter: the UNet alone on each frame gives something else */
    DiffuseTensor *xp = diffuse_permute (x, (int[]) { 0, 2, 1, 3, 4 });
    DiffuseTensor *xc = diffuse_contiguous (xp);
    DiffuseTensor *x4 = diffuse_reshape_4d (xc, B * F, x->shape[1], x->shape[3], x->shape[4]);
    DiffuseTensor *y4 = diffuse_unet_forward (u, x4, &t, 1, ehs, NULL, &err);
    g_assert_no_error (err);
    DiffuseTensor *wp = diffuse_permute (want, (int[]) { 0, 2, 1, 3, 4 });
    DiffuseTensor *wc = diffuse_contiguous (wp);
    DiffuseTensor *w4 = diffuse_reshape_4d (wc, B * F, want->shape[1], want->shape[3], want->shape[4]);
    double d = diffuse_tensor_max_abs_diff (y4, w4);
    g_test_message ("%s: UNet2D per frame vs UNetMotionModel: max diff %.3g", key, d);
    g_assert_cmpfloat (d, >, 1e-2);
    for (DiffuseTensor **tp = (DiffuseTensor *[]) { xp, xc, x4, y4, wp, wc, w4, NULL }; *tp; tp++)
      diffuse_tensor_unref (*tp);
  }
  diffuse_tensor_unref (y1);
  diffuse_tensor_unref (y2);
  diffuse_tensor_unref (rep);
  diffuse_tensor_unref (per_video);
  diffuse_tensor_unref (first);
  g_free (rows);
  g_free (few);

  diffuse_tensor_unref (x);
  diffuse_tensor_unref (ehs);
  diffuse_tensor_unref (tt);
  diffuse_tensor_unref (want);
  diffuse_unet_motion_unref (m);
  diffuse_motion_adapter_unref (a);
  diffuse_unet_unref (u);
}

static void
test_forward_errors (void)
{
  GError *err = NULL;
  DiffuseUNet *u = load_unet ();
  DiffuseMotionAdapter *a = load_adapter ("b");          /* max 8 frames */
  DiffuseUNetMotion *m = diffuse_unet_motion_new (u, a, &err);
  g_assert_no_error (err);
  float t = 10.0f;
  DiffuseTensor *x = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 5,
                                           (int64_t[]) { 1, 4, 9, 8, 8 });
  DiffuseTensor *ehs = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 3, (int64_t[]) { 1, 7, 32 });
  g_assert_null (diffuse_unet_motion_forward (m, x, &t, 1, ehs, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_assert_nonnull (strstr (err->message, "motion_max_seq_length"));
  g_clear_error (&err);
  diffuse_tensor_unref (x);
  /* a 4-D sample */
  x = diffuse_tensor_zeros (diffuse_device_cpu (), DIFFUSE_DTYPE_F32, 4, (int64_t[]) { 1, 4, 8, 8 });
  g_assert_null (diffuse_unet_motion_forward (m, x, &t, 1, ehs, NULL, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  diffuse_tensor_unref (x);
  diffuse_tensor_unref (ehs);
  diffuse_unet_motion_unref (m);
  diffuse_motion_adapter_unref (a);
  diffuse_unet_unref (u);
}

/* An adapter folder with one weight left out: NOT_FOUND naming key and component. */
static void
test_missing_weight (void)
{
  const char *drop = "down_blocks.1.motion_modules.0.transformer_blocks.0.attn2.to_k.weight";
  char *dir = tu_mkdtemp ();
  char *src = tu_fixture ("animatediff/a");
  char *cfg_src = g_build_filename (src, "config.json", NULL);
  char *cfg_dst = g_build_filename (dir, "config.json", NULL);
  char *contents = NULL;
  gsize len = 0;
  g_assert_true (g_file_get_contents (cfg_src, &contents, &len, NULL));
  g_assert_true (g_file_set_contents (cfg_dst, contents, (gssize) len, NULL));
  g_free (contents);
  char *wsrc = g_build_filename (src, "diffusion_pytorch_model.safetensors", NULL);
  GError *err = NULL;
  DiffuseSafetensors *st = diffuse_safetensors_open (wsrc, &err);
  g_assert_no_error (err);
  DiffuseStWriter *w = diffuse_st_writer_new ();
  for (guint i = 0; i < diffuse_safetensors_n_tensors (st); i++) {
    const DiffuseStEntry *e = diffuse_safetensors_entry (st, i);
    if (strcmp (e->name, drop) == 0)
      continue;
    DiffuseTensor *t = diffuse_safetensors_tensor (st, e->name, DIFFUSE_DTYPE_F32, NULL, &err);
    g_assert_no_error (err);
    diffuse_st_writer_add (w, e->name, t);
    diffuse_tensor_unref (t);
  }
  char *wdst = g_build_filename (dir, "diffusion_pytorch_model.safetensors", NULL);
  g_assert_true (diffuse_st_writer_write (w, wdst, &err));
  g_assert_no_error (err);
  diffuse_st_writer_free (w);
  diffuse_safetensors_unref (st);

  DiffuseMotionAdapter *a = diffuse_motion_adapter_new_from_dir (dir, NULL, &err);
  g_assert_null (a);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, drop));
  g_assert_nonnull (strstr (err->message, "motion_adapter"));
  g_clear_error (&err);

  /* an adapter whose blocks do not fit the UNet: wrong shapes for its config */
  DiffuseConfig *cfg = diffuse_config_from_string ("{\"_class_name\": \"MotionAdapter\", \"block_out_channels\": "
                                                   "[8, 32], \"motion_layers_per_block\": 1, "
                                                   "\"motion_num_attention_heads\": 2, \"motion_norm_num_groups\": 4, "
                                                   "\"motion_max_seq_length\": 16}", "bad-config", &err);
  g_assert_no_error (err);
  const char *paths[2] = { wsrc, NULL };
  DiffuseWeights *wt = diffuse_weights_open (paths, &err);
  g_assert_no_error (err);
  a = diffuse_motion_adapter_new (cfg, wt, NULL, &err);
  g_assert_null (a);
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_clear_error (&err);
  diffuse_weights_unref (wt);
  diffuse_config_unref (cfg);

  tu_rm_rf (dir);
  g_free (wdst);
  g_free (wsrc);
  g_free (cfg_src);
  g_free (cfg_dst);
  g_free (src);
  g_free (dir);
}

/* The full-size v1-5-2 configuration: a weight file with diffusers' keys and
 * shapes (v1-5-2-state.json; a sparse file of zeros, F16, never read), loaded
 * without a missing or unused key, with diffusers' parameter count. */
static void
test_full_size (void)
{
  GError *err = NULL;
  char *path = tu_fixture ("animatediff/v1-5-2-state.json");
  JsonParser *parser = json_parser_new ();
  json_parser_load_from_file (parser, path, &err);
  g_assert_no_error (err);
  g_free (path);
  JsonObject *root = json_node_get_object (json_parser_get_root (parser));
  JsonArray *tensors = json_object_get_array_member (root, "tensors");
  GString *h = g_string_new ("{");
  guint64 off = 0;
  for (guint i = 0; i < json_array_get_length (tensors); i++) {
    JsonArray *e = json_array_get_array_element (tensors, i);
    JsonArray *shape = json_array_get_array_element (e, 1);
    guint64 numel = 1;
    g_string_append_printf (h, "%s\"%s\":{\"dtype\":\"F16\",\"shape\":[", i ? "," : "",
                            json_array_get_string_element (e, 0));
    for (guint d = 0; d < json_array_get_length (shape); d++) {
      gint64 v = json_array_get_int_element (shape, d);
      numel *= (guint64) v;
      g_string_append_printf (h, "%s%" G_GINT64_FORMAT, d ? "," : "", v);
    }
    g_string_append_printf (h, "],\"data_offsets\":[%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT "]}", off,
                            off + 2 * numel);
    off += 2 * numel;
  }
  g_string_append (h, "}");
  while (h->len % 8)
    g_string_append_c (h, ' ');
  char *dir = tu_mkdtemp ();
  char *cfg_path = g_build_filename (dir, "config.json", NULL);
  JsonGenerator *gen = json_generator_new ();
  json_generator_set_root (gen, json_object_get_member (root, "config"));
  g_assert_true (json_generator_to_file (gen, cfg_path, &err));
  g_assert_no_error (err);
  g_object_unref (gen);
  char *w_path = g_build_filename (dir, "diffusion_pytorch_model.safetensors", NULL);
  FILE *f = fopen (w_path, "wb");
  g_assert_nonnull (f);
  guint64 hl = GUINT64_TO_LE ((guint64) h->len);
  g_assert_cmpuint (fwrite (&hl, 8, 1, f), ==, 1);
  g_assert_cmpuint (fwrite (h->str, 1, h->len, f), ==, h->len);
  g_assert_cmpint (fflush (f), ==, 0);
  g_assert_cmpint (ftruncate (fileno (f), (off_t) (8 + h->len + off)), ==, 0);   /* sparse: no disk, no RAM */
  fclose (f);

  DiffuseMotionAdapterParams mp;
  diffuse_motion_adapter_default_params (&mp);
  mp.dtype = DIFFUSE_DTYPE_F16;        /* the file's dtype: tensors borrow the mapping */
  DiffuseMotionAdapter *a = diffuse_motion_adapter_new_from_dir (dir, &mp, &err);
  g_assert_no_error (err);
  JsonObject *v152 = json_object_get_object_member (params_json, "v1-5-2");
  guint64 want = (guint64) json_object_get_int_member (v152, "adapter");
  g_test_message ("v1-5-2: %" G_GUINT64_FORMAT " parameters (diffusers %" G_GUINT64_FORMAT "), %u tensors, "
                  "%" G_GUINT64_FORMAT " bytes", diffuse_motion_adapter_n_params (a), want,
                  json_array_get_length (tensors), off);
  g_assert_cmpuint (diffuse_motion_adapter_n_params (a), ==, want);
  g_assert_null (diffuse_motion_adapter_unused_keys (a)[0]);
  g_assert_cmpint (diffuse_motion_adapter_max_seq_length (a), ==, 32);
  g_assert_true (diffuse_motion_adapter_has_mid_block (a));
  diffuse_motion_adapter_unref (a);

  tu_rm_rf (dir);
  g_free (w_path);
  g_free (cfg_path);
  g_free (dir);
  g_string_free (h, TRUE);
  g_object_unref (parser);
}

/* ---- the pipeline ------------------------------------------------------------ */

static DiffuseComponent *
load_adapter_component (DiffusePipelineModel *pm, const char *name)
{
  GError *err = NULL;
  char *rel = g_strdup_printf ("animatediff/%s", name);
  char *dir = tu_fixture (rel);
  DiffuseComponent *c = diffuse_animate_load_adapter (pm, dir, test_load_params (), &err);
  g_assert_no_error (err);
  g_assert_nonnull (c);
  g_assert_cmpstr (diffuse_component_class (c), ==, "MotionAdapter");
  g_free (dir);
  g_free (rel);
  return c;
}

static DiffuseConfig *
config_from_member (JsonObject *o, const char *member)
{
  JsonNode *n = json_object_get_member (o, member);
  if (!n || !JSON_NODE_HOLDS_OBJECT (n) || json_object_get_size (json_node_get_object (n)) == 0)
    return NULL;
  JsonNode *copy = json_node_copy (n);
  DiffuseConfig *c = diffuse_config_from_object (json_node_get_object (copy), member);
  json_node_unref (copy);
  return c;
}

/* Largest difference (8-bit levels) between generated frames and the
 * fixture's frames `id` of st. */
static int
frames_max_diff (DiffuseSafetensors *st, const char *id, GPtrArray *out, guint64 *off_by_one)
{
  const DiffuseStEntry *e = diffuse_safetensors_find (st, id);
  g_assert_nonnull (e);
  g_assert_cmpint (e->dtype, ==, DIFFUSE_ST_U8);
  const int n = (int) e->shape[0], h = (int) e->shape[1], w = (int) e->shape[2];
  g_assert_cmpint (out->len, ==, n);
  int worst = 0;
  guint8 *got = g_malloc ((size_t) h * w * 3);
  for (int f = 0; f < n; f++) {
    DiffuseImage *img = g_ptr_array_index (out, f);
    g_assert_cmpint (img->width, ==, w);
    g_assert_cmpint (img->height, ==, h);
    diffuse_image_to_rgb8 (img, got, w * 3);
    const guint8 *ref = (const guint8 *) e->data + (size_t) f * h * w * 3;
    for (int i = 0; i < h * w * 3; i++) {
      int d = abs ((int) got[i] - (int) ref[i]);
      worst = MAX (worst, d);
      if (off_by_one)
        *off_by_one += d == 1;
    }
  }
  g_free (got);
  return worst;
}

static void
run_case (gconstpointer data)
{
  JsonObject *c = (JsonObject *) data;
  const char *id = json_object_get_string_member (c, "id");
  GError *err = NULL;
  DiffusePipelineModel *pm = get_sd ();
  DiffuseComponent *ad = load_adapter_component (pm, json_object_get_string_member (c, "adapter"));
  DiffuseAnimate *anim = diffuse_animate_new_from_pipe (pm, ad, &err);
  g_assert_no_error (err);
  diffuse_component_unref (ad);

  DiffuseAnimateParams p;
  diffuse_animate_default_params (&p);
  p.prompt = json_object_get_string_member (c, "prompt");
  JsonNode *neg = json_object_get_member (c, "negative_prompt");
  p.negative_prompt = JSON_NODE_HOLDS_NULL (neg) ? NULL : json_node_get_string (neg);
  p.width = (int) json_object_get_int_member (c, "width");
  p.height = (int) json_object_get_int_member (c, "height");
  p.num_frames = (int) json_object_get_int_member (c, "num_frames");
  p.num_inference_steps = (int) json_object_get_int_member (c, "steps");
  p.guidance_scale = (float) json_object_get_double_member (c, "guidance");
  p.seed = (guint64) json_object_get_int_member (c, "seed");
  p.decode_chunk_size = (int) json_object_get_int_member (c, "decode_chunk_size");
  p.scheduler = json_object_get_string_member (c, "scheduler");
  p.scheduler_overrides = config_from_member (c, "scheduler_overrides");

  GPtrArray *out = diffuse_animate_generate (anim, &p, &err);
  g_assert_no_error (err);
  guint64 off_by_one = 0;
  int worst = frames_max_diff (frames_st, id, out, &off_by_one);
  const DiffuseImage *img0 = g_ptr_array_index (out, 0);
  g_test_message ("%s: %u frames %dx%d, max diff %d levels, %" G_GUINT64_FORMAT " values off by one", id, out->len,
                  img0->width, img0->height, worst, off_by_one);
  g_assert_cmpint (worst, <=, 1);
  g_ptr_array_unref (out);
  if (p.scheduler_overrides)
    diffuse_config_unref (p.scheduler_overrides);
  diffuse_animate_unref (anim);
}

/* LoRA on the AnimateDiff pipeline (make_animatediff_lora_fixtures.py): an
 * adapter on the spatial and the motion-module attentions, as
 * pipe_animate.load_lora_weights; frames within one level of diffusers'; the
 * text2img pipeline on the same components stays as it was; unload goes back */
/* AnimateDiffPipeline.from_pipe (tiny-sd, adapter a) and the DDIM settings
 * of the guide's example (the LoRA and IP-Adapter fixtures use them) */
static DiffuseAnimate *
from_pipe_ddim (DiffuseAnimateParams *p)
{
  GError *err = NULL;
  DiffusePipelineModel *pm = get_sd ();
  DiffuseComponent *ad = load_adapter_component (pm, "a");
  DiffuseAnimate *anim = diffuse_animate_new_from_pipe (pm, ad, &err);
  g_assert_no_error (err);
  diffuse_component_unref (ad);
  diffuse_animate_default_params (p);
  p->scheduler = "DDIMScheduler";
  p->scheduler_overrides = diffuse_config_from_string (
      "{\"clip_sample\": false, \"timestep_spacing\": \"linspace\", \"beta_schedule\": \"linear\", "
      "\"steps_offset\": 1}", "overrides", &err);
  g_assert_no_error (err);
  return anim;
}

static void
test_lora (void)
{
  if (!tu_have_fixture ("animatediff/lora/frames.safetensors"))
    return;
  GError *err = NULL;
  DiffuseAnimateParams p;
  DiffuseAnimate *anim = from_pipe_ddim (&p);
  DiffuseSafetensors *st = tu_open ("animatediff/lora/frames.safetensors");
  char *lora = tu_fixture ("animatediff/lora");
  p.prompt = "a red ball bouncing";
  p.width = p.height = 32;
  p.num_frames = 8;
  p.num_inference_steps = 4;
  p.seed = 42;
  const char *ids[] = { "base", "lora", "base" };
  for (int i = 0; i < 3; i++) {
    if (i == 1)
      g_assert_true (diffuse_animate_load_lora_weights (anim, lora, "m", &err));
    if (i == 2)
      diffuse_animate_unload_lora_weights (anim);
    g_assert_no_error (err);
    GPtrArray *out = diffuse_animate_generate (anim, &p, &err);
    g_assert_no_error (err);
    guint64 off = 0;
    int worst = frames_max_diff (st, ids[i], out, &off);
    g_test_message ("%s: max diff %d levels", i == 2 ? "unloaded" : ids[i], worst);
    g_assert_cmpint (worst, <=, 1);
    g_ptr_array_unref (out);
  }
  diffuse_config_unref (p.scheduler_overrides);
  diffuse_safetensors_unref (st);
  g_free (lora);
  diffuse_animate_unref (anim);
}

/* IP-Adapter on AnimateDiff (make_animatediff_ip_fixtures.py): the tiny
 * IP-Adapter of tests/fixtures/ip-adapter loaded on the pipeline made by
 * from_pipe, two scales with CFG and one without: frames within one level
 * of diffusers'; then the errors of a missing image / an image without an
 * adapter, and unloading */
static void
test_ip_adapter (void)
{
  if (!tu_have_fixture ("animatediff/ip-adapter/frames.safetensors"))
    return;
  GError *err = NULL;
  DiffuseAnimateParams p;
  DiffuseAnimate *anim = from_pipe_ddim (&p);
  char *png = tu_fixture ("ip-adapter/input.png");
  DiffuseImage *img = diffuse_image_load_png (png, &err);
  g_assert_no_error (err);
  g_free (png);
  char *dir = tu_fixture ("ip-adapter");
  char *path = tu_fixture ("animatediff/ip-adapter/case.json");
  JsonParser *parser = json_parser_new ();
  g_assert_true (json_parser_load_from_file (parser, path, NULL));
  g_free (path);
  JsonObject *root = json_node_get_object (json_parser_get_root (parser));
  JsonObject *gen = json_object_get_object_member (root, "generate");
  DiffuseSafetensors *st = tu_open ("animatediff/ip-adapter/frames.safetensors");
  p.prompt = json_object_get_string_member (gen, "prompt");
  p.width = (int) json_object_get_int_member (gen, "width");
  p.height = (int) json_object_get_int_member (gen, "height");
  p.num_frames = (int) json_object_get_int_member (gen, "num_frames");
  p.num_inference_steps = (int) json_object_get_int_member (gen, "num_inference_steps");

  /* an image without an adapter */
  p.ip_adapter_image = img;
  g_assert_null (diffuse_animate_generate (anim, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_assert_nonnull (strstr (err->message, "no IP-Adapter is loaded"));
  g_clear_error (&err);

  g_assert_true (diffuse_animate_load_ip_adapter (anim, dir, "models",
                                                  json_object_get_string_member (root, "weight_name"), &err));
  g_assert_no_error (err);
  g_assert_true (diffuse_animate_has_ip_adapter (anim));
  JsonArray *cases = json_object_get_array_member (root, "cases");
  for (guint i = 0; i < json_array_get_length (cases); i++) {
    JsonObject *c = json_array_get_object_element (cases, i);
    const char *id = json_object_get_string_member (c, "id");
    diffuse_animate_set_ip_adapter_scale (anim, (float) json_object_get_double_member (c, "scale"));
    p.guidance_scale = (float) json_object_get_double_member (c, "guidance");
    p.seed = (guint64) json_object_get_int_member (c, "seed");
    GPtrArray *out = diffuse_animate_generate (anim, &p, &err);
    g_assert_no_error (err);
    guint64 off = 0;
    int worst = frames_max_diff (st, id, out, &off);
    g_test_message ("%s: max diff %d levels (the adapter moves diffusers' frames %d)", id, worst,
                    (int) json_object_get_int_member (c, "max_diff_to_plain"));
    g_assert_cmpint (worst, <=, 1);
    g_ptr_array_unref (out);
  }

  /* the guide's example: the IP-Adapter with a motion LoRA ("m" at 0.75) */
  {
    JsonObject *c = json_object_get_object_member (root, "with_lora");
    char *lora = tu_fixture ("animatediff/lora");
    const char *names[] = { "m" };
    const double w[] = { json_object_get_double_member (c, "lora_weight") };
    g_assert_true (diffuse_animate_load_lora_weights (anim, lora, "m", &err));
    g_assert_true (diffuse_animate_set_adapters (anim, names, w, 1, &err));
    g_assert_no_error (err);
    g_free (lora);
    diffuse_animate_set_ip_adapter_scale (anim, (float) json_object_get_double_member (c, "scale"));
    p.guidance_scale = (float) json_object_get_double_member (c, "guidance");
    p.seed = (guint64) json_object_get_int_member (c, "seed");
    GPtrArray *out = diffuse_animate_generate (anim, &p, &err);
    g_assert_no_error (err);
    guint64 off = 0;
    int worst = frames_max_diff (st, json_object_get_string_member (c, "id"), out, &off);
    g_test_message ("IP-Adapter + motion LoRA: max diff %d levels (the LoRA moves diffusers' frames %d)", worst,
                    (int) json_object_get_int_member (c, "max_diff_to_ip_only"));
    g_assert_cmpint (worst, <=, 1);
    g_ptr_array_unref (out);
    diffuse_animate_unload_lora_weights (anim);
  }

  /* the adapter loaded but no image */
  p.ip_adapter_image = NULL;
  g_assert_null (diffuse_animate_generate (anim, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_assert_nonnull (strstr (err->message, "give an ip_adapter_image"));
  g_clear_error (&err);
  diffuse_animate_unload_ip_adapter (anim);
  g_assert_false (diffuse_animate_has_ip_adapter (anim));

  diffuse_config_unref (p.scheduler_overrides);
  diffuse_safetensors_unref (st);
  g_object_unref (parser);
  diffuse_image_free (img);
  g_free (dir);
  diffuse_animate_unref (anim);
}

static gpointer
must_not_build (DiffuseComponent *c, gpointer user_data, GError **error)
{
  g_error ("component %s was not built yet", diffuse_component_name (c));
  return NULL;
}

static void
test_sharing (void)
{
  /* a fresh cache: the SD pipeline loaded and used for text2img first */
  GError *err = NULL;
  DiffuseComponentCache *own = diffuse_component_cache_new ();
  char *path = tu_fixture ("pipelines/tiny-sd");
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (path, test_load_params (), own, &err);
  g_assert_no_error (err);
  g_free (path);
  DiffuseSD *sd = diffuse_sd_new (pm, DIFFUSE_SD_TEXT2IMG, &err);
  g_assert_no_error (err);
  DiffuseUNet *sd_unet = diffuse_component_get_object (diffuse_pipeline_model_get (pm, "unet"), "model",
                                                       must_not_build, NULL, NULL, &err);
  g_assert_nonnull (sd_unet);

  DiffuseCacheStats before, after;
  DiffuseMemStats mem_before, mem_after;
  diffuse_component_cache_get_stats (own, &before);
  diffuse_device_get_mem_stats (diffuse_device_cpu (), &mem_before);
  DiffuseComponent *ad = load_adapter_component (pm, "a");
  DiffuseAnimate *anim = diffuse_animate_new_from_pipe (pm, ad, &err);
  g_assert_no_error (err);
  diffuse_component_cache_get_stats (own, &after);
  diffuse_device_get_mem_stats (diffuse_device_cpu (), &mem_after);

  guint64 adapter_bytes = diffuse_component_bytes (ad);
  g_test_message ("cache resident %" G_GUINT64_FORMAT " -> %" G_GUINT64_FORMAT " (adapter %" G_GUINT64_FORMAT
                  " bytes); device resident %" G_GUINT64_FORMAT " -> %" G_GUINT64_FORMAT ", borrowed %"
                  G_GUINT64_FORMAT " -> %" G_GUINT64_FORMAT, before.resident_bytes, after.resident_bytes,
                  adapter_bytes, mem_before.resident_bytes, mem_after.resident_bytes, mem_before.borrowed_bytes,
                  mem_after.borrowed_bytes);
  g_assert_cmpuint (adapter_bytes, >, 0);
  g_assert_cmpuint (after.resident_bytes - before.resident_bytes, ==, adapter_bytes);
  g_assert_cmpuint (after.n_loads, ==, before.n_loads + 1);        /* the adapter only */
  g_assert_cmpuint (after.n_components, ==, before.n_components + 1);
  /* no copy of the UNet: the device holds at most the adapter's bytes more */
  g_assert_cmpuint (mem_after.resident_bytes + mem_after.borrowed_bytes, <=,
                    mem_before.resident_bytes + mem_before.borrowed_bytes + adapter_bytes);
  /* the same components and the same UNet object */
  DiffusePipelineModel *apm = diffuse_animate_get_model (anim);
  g_assert_cmpstr (diffuse_pipeline_model_class (apm), ==, "AnimateDiffPipeline");
  for (const char *const *nm = (const char *const[]) { "unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                                       NULL }; *nm; nm++)
    g_assert_true (diffuse_pipeline_model_get (apm, *nm) == diffuse_pipeline_model_get (pm, *nm));
  g_assert_true (diffuse_pipeline_model_get (apm, "motion_adapter") == ad);
  g_assert_true (diffuse_unet_motion_get_unet (diffuse_animate_get_unet_motion (anim)) == sd_unet);

  /* a second animate pipeline over the same adapter: no new load */
  DiffuseComponent *ad2 = load_adapter_component (pm, "a");
  g_assert_true (ad2 == ad);
  DiffuseAnimate *anim2 = diffuse_animate_new_from_pipe (pm, ad2, &err);
  g_assert_no_error (err);
  DiffuseCacheStats again;
  diffuse_component_cache_get_stats (own, &again);
  g_assert_cmpuint (again.resident_bytes, ==, after.resident_bytes);
  g_assert_cmpuint (again.n_loads, ==, after.n_loads);
  g_assert_true (diffuse_unet_motion_get_adapter (diffuse_animate_get_unet_motion (anim2)) ==
                 diffuse_unet_motion_get_adapter (diffuse_animate_get_unet_motion (anim)));

  int w, h;
  diffuse_animate_default_size (anim, &w, &h);
  g_assert_cmpint (w, ==, 16);      /* sample_size 8 * vae scale factor 2 */
  g_assert_cmpint (h, ==, 16);
  g_assert_cmpint (diffuse_animate_max_frames (anim), ==, 16);
  g_assert_cmpstr (diffuse_animate_scheduler_class (anim), ==, "PNDMScheduler");

  diffuse_animate_unref (anim2);
  diffuse_component_unref (ad2);
  diffuse_animate_unref (anim);
  diffuse_component_unref (ad);
  diffuse_sd_unref (sd);
  diffuse_pipeline_model_unref (pm);
  diffuse_component_cache_unref (own);
}

static gboolean
cancel_at_two (int step, int total, gpointer user_data)
{
  int *calls = user_data;
  (*calls)++;
  return step < 2;
}

static gboolean
count_frames (int index, int total, const DiffuseImage *frame, gpointer user_data)
{
  int *next = user_data;
  g_assert_cmpint (index, ==, *next);
  g_assert_cmpint (total, ==, 3);
  g_assert_nonnull (frame->pixels);
  (*next)++;
  return TRUE;
}

static void
test_cancel_and_errors (void)
{
  GError *err = NULL;
  DiffusePipelineModel *pm = get_sd ();
  DiffuseComponent *ad = load_adapter_component (pm, "b");
  DiffuseAnimate *anim = diffuse_animate_new_from_pipe (pm, ad, &err);
  g_assert_no_error (err);
  diffuse_component_unref (ad);

  DiffuseAnimateParams p;
  diffuse_animate_default_params (&p);
  g_assert_cmpint (p.num_frames, ==, 16);
  g_assert_cmpint (p.decode_chunk_size, ==, 16);
  p.prompt = "x";
  p.width = p.height = 16;
  p.num_frames = 9;                        /* adapter b takes at most 8 */
  p.num_inference_steps = 2;
  g_assert_null (diffuse_animate_generate (anim, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  p.num_frames = 3;
  p.width = 30;
  g_assert_null (diffuse_animate_generate (anim, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_INVALID_ARGUMENT);
  g_clear_error (&err);
  p.width = 16;
  p.scheduler = "NoSuchScheduler";
  g_assert_null (diffuse_animate_generate (anim, &p, &err));
  g_assert_nonnull (err);
  g_assert_nonnull (strstr (err->message, "NoSuchScheduler"));
  g_clear_error (&err);
  p.scheduler = NULL;

  int calls = 0;
  p.num_inference_steps = 6;
  p.on_step = cancel_at_two;
  p.user_data = &calls;
  g_assert_null (diffuse_animate_generate (anim, &p, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CANCELLED);
  g_assert_cmpint (calls, ==, 2);
  g_clear_error (&err);

  int next = 0;
  p.on_step = NULL;
  p.on_frame = count_frames;
  p.user_data = &next;
  p.num_inference_steps = 1;
  p.decode_chunk_size = 2;
  GPtrArray *out = diffuse_animate_generate (anim, &p, &err);
  g_assert_no_error (err);
  g_assert_cmpint (out->len, ==, 3);
  g_assert_cmpint (next, ==, 3);
  g_ptr_array_unref (out);
  diffuse_animate_unref (anim);

  /* a PIA adapter (conv_in_channels) cannot run in AnimateDiffPipeline */
  ad = load_adapter_component (pm, "c");
  g_assert_null (diffuse_animate_new_from_pipe (pm, ad, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_UNSUPPORTED);
  g_clear_error (&err);
  diffuse_component_unref (ad);

  /* an AnimateDiffPipeline model without its adapter */
  g_assert_null (diffuse_animate_new (pm, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (err->message, "motion_adapter"));
  g_clear_error (&err);
}

/* ---- a pipeline saved by diffusers (unet/ a UNetMotionModel) ------------------ *
 * tests/reference/make_animatediff_saved_fixtures.py: AnimateDiffPipeline
 * .save_pretrained () of tiny-sd + adapter b (saved-pipeline/), and
 * AnimateDiffPipeline.from_pretrained (that folder) frames. */

static JsonObject *saved_json;            /* saved-cases.json */

static JsonObject *
saved_case (const char *id)
{
  JsonArray *cases = json_object_get_array_member (saved_json, "cases");
  for (guint i = 0; i < json_array_get_length (cases); i++) {
    JsonObject *c = json_array_get_object_element (cases, i);
    if (strcmp (json_object_get_string_member (c, "id"), id) == 0)
      return c;
  }
  g_error ("no saved case %s", id);
  return NULL;
}

/* Generates saved case `id` on anim; returns the largest difference to diffusers' frames. */
static int
run_saved_case (DiffuseAnimate *anim, const char *id)
{
  JsonObject *c = saved_case (id);
  DiffuseAnimateParams p;
  diffuse_animate_default_params (&p);
  p.prompt = json_object_get_string_member (c, "prompt");
  JsonNode *neg = json_object_get_member (c, "negative_prompt");
  p.negative_prompt = JSON_NODE_HOLDS_NULL (neg) ? NULL : json_node_get_string (neg);
  p.width = (int) json_object_get_int_member (c, "width");
  p.height = (int) json_object_get_int_member (c, "height");
  p.num_frames = (int) json_object_get_int_member (c, "num_frames");
  p.num_inference_steps = (int) json_object_get_int_member (c, "steps");
  p.guidance_scale = (float) json_object_get_double_member (c, "guidance");
  p.seed = (guint64) json_object_get_int_member (c, "seed");
  p.decode_chunk_size = (int) json_object_get_int_member (c, "decode_chunk_size");
  GError *err = NULL;
  GPtrArray *out = diffuse_animate_generate (anim, &p, &err);
  g_assert_no_error (err);
  guint64 obo = 0;
  int worst = frames_max_diff (saved_frames_st, id, out, &obo);
  g_test_message ("%s: %u frames, max diff %d levels, %" G_GUINT64_FORMAT " values off by one", id, out->len, worst,
                  obo);
  g_ptr_array_unref (out);
  return worst;
}

static gpointer
probe_build (DiffuseComponent *c, gpointer user_data, GError **error)
{
  *(gboolean *) user_data = TRUE;
  g_set_error (error, DIFFUSE_ERROR, DIFFUSE_ERROR_FAILED, "probe");
  return NULL;
}

/* TRUE when component c has built no object under "model" yet. */
static gboolean
never_built (DiffuseComponent *c)
{
  gboolean called = FALSE;
  GError *err = NULL;
  gpointer obj = diffuse_component_get_object (c, "model", probe_build, &called, NULL, &err);
  g_clear_error (&err);
  return obj == NULL && called;
}

static DiffusePipelineModel *
load_folder (const char *path, DiffuseComponentCache *c)
{
  GError *err = NULL;
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (path, test_load_params (), c, &err);
  g_assert_no_error (err);
  g_assert_nonnull (pm);
  return pm;
}

static void
run_saved (gconstpointer data)
{
  const char *id = data;
  char *path = tu_fixture ("animatediff/saved-pipeline");
  DiffusePipelineModel *pm = load_folder (path, cache);
  g_free (path);
  g_assert_cmpstr (diffuse_pipeline_model_class (pm), ==, "AnimateDiffPipeline");
  g_assert_cmpstr (diffuse_component_class (diffuse_pipeline_model_get (pm, "unet")), ==, "UNetMotionModel");
  g_assert_true (diffuse_animate_model_has_motion_unet (pm));
  GError *err = NULL;
  DiffuseAnimate *anim = diffuse_animate_new (pm, &err);
  g_assert_no_error (err);
  g_assert_cmpstr (diffuse_animate_scheduler_class (anim), ==, "DDIMScheduler");
  DiffuseUNetMotion *m = diffuse_animate_get_unet_motion (anim);
  /* diffusers' sum (p.numel () for p in pipe.unet.parameters ()) */
  g_assert_cmpuint (diffuse_unet_motion_n_params (m), ==, (guint64) json_object_get_int_member (saved_json,
                                                                                                "unet_params"));
  g_assert_cmpint (diffuse_animate_max_frames (anim), ==, 8);     /* the unet's motion_max_seq_length */
  /* the motion modules are the unet's: the motion_adapter component is never built */
  g_assert_true (never_built (diffuse_pipeline_model_get (pm, "motion_adapter")));
  g_assert_cmpint (run_saved_case (anim, id), <=, 1);
  diffuse_animate_unref (anim);
  diffuse_pipeline_model_unref (pm);
}

/* The split of the saved UNetMotionModel config (checked against adapter b's
 * config, the one diffusers saved the pipeline from, and tiny-sd's unet). */
static void
test_saved_config (void)
{
  GError *err = NULL;
  char *path = tu_fixture ("animatediff/saved-pipeline/unet/config.json");
  DiffuseConfig *c = diffuse_config_load (path, &err);
  g_assert_no_error (err);
  DiffuseConfig *uc = NULL, *ac = NULL;
  g_assert_true (diffuse_unet_motion_split_config (c, &uc, &ac, &err));
  g_assert_no_error (err);
  char **down = diffuse_config_get_string_array (uc, "down_block_types");
  char **up = diffuse_config_get_string_array (uc, "up_block_types");
  g_assert_cmpstr (down[0], ==, "CrossAttnDownBlock2D");
  g_assert_cmpstr (down[1], ==, "DownBlock2D");
  g_assert_cmpstr (up[0], ==, "UpBlock2D");
  g_assert_cmpstr (up[1], ==, "CrossAttnUpBlock2D");
  g_strfreev (down);
  g_strfreev (up);
  g_assert_cmpint (diffuse_config_get_int (uc, "attention_head_dim", 0), ==, 2);   /* tiny-sd's */
  g_assert_cmpint (diffuse_config_get_int (uc, "norm_num_groups", 0), ==, 4);
  gint64 *v = NULL;
  g_assert_cmpuint (diffuse_config_get_int_array (ac, "motion_num_attention_heads", &v), ==, 2);
  g_assert_cmpint (v[0], ==, 1);
  g_assert_cmpint (v[1], ==, 4);
  g_free (v);
  g_assert_cmpuint (diffuse_config_get_int_array (ac, "motion_transformer_layers_per_block", &v), ==, 2);
  g_assert_cmpint (v[0], ==, 2);
  g_assert_cmpint (v[1], ==, 1);
  g_free (v);
  g_assert_false (diffuse_config_get_bool (ac, "use_motion_mid_block", TRUE));
  g_assert_cmpint (diffuse_config_get_int (ac, "motion_max_seq_length", 0), ==, 8);
  /* the motion modules use the UNet's group count (adapter b's config says 2) */
  g_assert_cmpint (diffuse_config_get_int (ac, "motion_norm_num_groups", 0), ==, 4);
  diffuse_config_unref (uc);
  diffuse_config_unref (ac);

  /* loaded on its own, every key is used by one of the two parts */
  char *dir = tu_fixture ("animatediff/saved-pipeline/unet");
  DiffuseUNetMotion *m = diffuse_unet_motion_new_from_dir (dir, NULL, &err);
  g_assert_no_error (err);
  g_assert_null (diffuse_unet_unused_keys (diffuse_unet_motion_get_unet (m))[0]);
  g_assert_null (diffuse_motion_adapter_unused_keys (diffuse_unet_motion_get_adapter (m))[0]);
  g_assert_cmpuint (diffuse_unet_motion_n_params (m), ==, (guint64) json_object_get_int_member (saved_json,
                                                                                                "unet_params"));
  diffuse_unet_motion_unref (m);
  /* a config that is not a UNetMotionModel */
  DiffuseConfig *bad = diffuse_config_from_string ("{\"_class_name\": \"UNet2DConditionModel\"}", "x.json", &err);
  g_assert_false (diffuse_unet_motion_split_config (bad, &uc, &ac, &err));
  g_assert_error (err, DIFFUSE_ERROR, DIFFUSE_ERROR_CONFIG);
  g_clear_error (&err);
  diffuse_config_unref (bad);
  g_free (dir);
  diffuse_config_unref (c);
  g_free (path);
}

/* Two loads of the folder in one cache: the components are loaded once, the
 * motion UNet built once, shared by both pipelines. */
static void
test_saved_sharing (void)
{
  GError *err = NULL;
  DiffuseComponentCache *own = diffuse_component_cache_new ();
  char *path = tu_fixture ("animatediff/saved-pipeline");
  DiffusePipelineModel *pm1 = load_folder (path, own);
  DiffuseCacheStats s1, s2;
  diffuse_component_cache_get_stats (own, &s1);
  DiffusePipelineModel *pm2 = load_folder (path, own);
  diffuse_component_cache_get_stats (own, &s2);
  g_assert_cmpuint (s2.n_loads, ==, s1.n_loads);
  g_assert_cmpuint (s2.resident_bytes, ==, s1.resident_bytes);
  g_assert_true (diffuse_pipeline_model_get (pm1, "unet") == diffuse_pipeline_model_get (pm2, "unet"));

  DiffuseMemStats before, after;
  diffuse_device_get_mem_stats (diffuse_device_cpu (), &before);
  DiffuseAnimate *a1 = diffuse_animate_new (pm1, &err);
  g_assert_no_error (err);
  diffuse_device_get_mem_stats (diffuse_device_cpu (), &after);
  DiffuseAnimate *a2 = diffuse_animate_new (pm2, &err);
  g_assert_no_error (err);
  g_assert_true (diffuse_animate_get_unet_motion (a1) == diffuse_animate_get_unet_motion (a2));
  /* the 2-D part and the motion modules together hold no more than the
   * components' weights (nothing loaded twice) */
  guint64 comp = 0;
  for (const char *const *nm = (const char *const[]) { "unet", "vae", "text_encoder", NULL }; *nm; nm++)
    comp += diffuse_component_bytes (diffuse_pipeline_model_get (pm1, *nm));
  g_test_message ("device resident+borrowed %" G_GUINT64_FORMAT " -> %" G_GUINT64_FORMAT " (components %"
                  G_GUINT64_FORMAT " bytes)", before.resident_bytes + before.borrowed_bytes,
                  after.resident_bytes + after.borrowed_bytes, comp);
  g_assert_cmpuint (after.resident_bytes + after.borrowed_bytes, <=,
                    before.resident_bytes + before.borrowed_bytes + comp);
  /* from_pipe with another adapter keeps the unet's own motion modules (as diffusers) */
  DiffuseComponent *ad = load_adapter_component (pm1, "a");
  DiffuseAnimate *a3 = diffuse_animate_new_from_pipe (pm1, ad, &err);
  g_assert_no_error (err);
  g_assert_true (diffuse_animate_get_unet_motion (a3) == diffuse_animate_get_unet_motion (a1));
  g_assert_true (never_built (ad));
  diffuse_animate_unref (a3);
  diffuse_component_unref (ad);
  diffuse_animate_unref (a1);
  diffuse_animate_unref (a2);
  diffuse_pipeline_model_unref (pm1);
  diffuse_pipeline_model_unref (pm2);
  diffuse_component_cache_unref (own);
  g_free (path);
}

/* ---- copies of the folder, changed ---- */

/* Copies folder src into dst, following symbolic links. */
static void
copy_tree (const char *src, const char *dst)
{
  g_assert_cmpint (g_mkdir_with_parents (dst, 0755), ==, 0);
  GDir *d = g_dir_open (src, 0, NULL);
  g_assert_nonnull (d);
  const char *n;
  while ((n = g_dir_read_name (d))) {
    char *s = g_build_filename (src, n, NULL), *t = g_build_filename (dst, n, NULL);
    if (g_file_test (s, G_FILE_TEST_IS_DIR)) {
      copy_tree (s, t);
    } else {
      char *data = NULL;
      gsize len = 0;
      g_assert_true (g_file_get_contents (s, &data, &len, NULL));
      g_assert_true (g_file_set_contents (t, data, (gssize) len, NULL));
      g_free (data);
    }
    g_free (s);
    g_free (t);
  }
  g_dir_close (d);
}

/* A temporary copy of saved-pipeline/. */
static char *
saved_copy (void)
{
  char *dir = tu_mkdtemp ();
  char *src = tu_fixture ("animatediff/saved-pipeline");
  char *dst = g_build_filename (dir, "pipe", NULL);
  copy_tree (src, dst);
  g_free (src);
  g_free (dir);
  return dst;
}

static void
remove_copy (char *pipe_dir)
{
  char *dir = g_path_get_dirname (pipe_dir);
  tu_rm_rf (dir);
  g_free (dir);
  g_free (pipe_dir);
}

typedef enum { EDIT_KEEP, EDIT_DROP, EDIT_PERTURB } EditAction;
typedef EditAction (*EditFunc) (const char *key, gpointer user_data);

/* Rewrites a weight file: each tensor kept, dropped or perturbed (+0.5 sin (i)). */
static void
edit_weights (const char *file, EditFunc edit, gpointer user_data)
{
  GError *err = NULL;
  char *data = NULL;
  gsize len = 0;
  g_assert_true (g_file_get_contents (file, &data, &len, NULL));
  DiffuseSafetensors *st = diffuse_safetensors_open_bytes (data, len, file, &err);
  g_assert_no_error (err);
  DiffuseStWriter *w = diffuse_st_writer_new ();
  guint n_edit = 0;
  for (guint i = 0; i < diffuse_safetensors_n_tensors (st); i++) {
    const DiffuseStEntry *e = diffuse_safetensors_entry (st, i);
    EditAction act = edit (e->name, user_data);
    if (act == EDIT_DROP) {
      n_edit++;
      continue;
    }
    DiffuseTensor *t = diffuse_safetensors_tensor (st, e->name, DIFFUSE_DTYPE_F32, NULL, &err);
    g_assert_no_error (err);
    DiffuseTensor *c = diffuse_contiguous (t);
    diffuse_tensor_unref (t);
    if (act == EDIT_PERTURB) {
      float *v = diffuse_tensor_f32 (c);
      for (int64_t k = 0; k < diffuse_tensor_numel (c); k++)
        v[k] += 0.5f * sinf ((float) k);
      n_edit++;
    }
    diffuse_st_writer_add (w, e->name, c);
    diffuse_tensor_unref (c);
  }
  g_assert_cmpuint (n_edit, >, 0);
  diffuse_safetensors_unref (st);
  g_free (data);
  g_assert_true (diffuse_st_writer_write (w, file, &err));
  g_assert_no_error (err);
  diffuse_st_writer_free (w);
}

static EditAction
perturb_all (const char *key, gpointer user_data)
{
  return EDIT_PERTURB;
}

static EditAction
perturb_motion_proj_out (const char *key, gpointer user_data)
{
  return strstr (key, ".motion_modules.") && g_str_has_suffix (key, "proj_out.weight") ? EDIT_PERTURB : EDIT_KEEP;
}

static EditAction
drop_key (const char *key, gpointer user_data)
{
  return strcmp (key, user_data) == 0 ? EDIT_DROP : EDIT_KEEP;
}

/* Sets one member of a JSON file (value: JSON text). */
static void
edit_config (const char *file, const char *key, const char *value)
{
  GError *err = NULL;
  JsonParser *p = json_parser_new ();
  g_assert_true (json_parser_load_from_file (p, file, &err));
  JsonParser *vp = json_parser_new ();
  g_assert_true (json_parser_load_from_data (vp, value, -1, &err));
  g_assert_no_error (err);
  JsonObject *o = json_node_get_object (json_parser_get_root (p));
  json_object_set_member (o, key, json_node_copy (json_parser_get_root (vp)));
  JsonGenerator *g = json_generator_new ();
  json_generator_set_root (g, json_parser_get_root (p));
  g_assert_true (json_generator_to_file (g, file, &err));
  g_object_unref (g);
  g_object_unref (vp);
  g_object_unref (p);
}

/* The folder's motion_adapter/ is not what runs: perturbing its weights
 * changes nothing, perturbing the unet's motion modules changes the clip. */
static void
test_saved_adapter_unused (void)
{
  char *pipe = saved_copy ();
  char *aw = g_build_filename (pipe, "motion_adapter", "diffusion_pytorch_model.safetensors", NULL);
  edit_weights (aw, perturb_all, NULL);
  DiffuseComponentCache *own = diffuse_component_cache_new ();
  DiffusePipelineModel *pm = load_folder (pipe, own);
  GError *err = NULL;
  DiffuseAnimate *anim = diffuse_animate_new (pm, &err);
  g_assert_no_error (err);
  g_assert_cmpint (run_saved_case (anim, "saved-cfg"), <=, 1);
  diffuse_animate_unref (anim);
  diffuse_pipeline_model_unref (pm);

  char *uw = g_build_filename (pipe, "unet", "diffusion_pytorch_model.safetensors", NULL);
  edit_weights (uw, perturb_motion_proj_out, NULL);
  pm = load_folder (pipe, own);
  anim = diffuse_animate_new (pm, &err);
  g_assert_no_error (err);
  g_assert_cmpint (run_saved_case (anim, "saved-cfg"), >, 1);
  diffuse_animate_unref (anim);
  diffuse_pipeline_model_unref (pm);
  diffuse_component_cache_unref (own);
  g_free (uw);
  g_free (aw);
  remove_copy (pipe);
}

/* Loads pipe/unet as a UNetMotionModel (and the pipeline through
 * diffuse_animate_new when whole); returns the error. */
static GError *
saved_unet_error (const char *pipe, gboolean whole)
{
  GError *err = NULL;
  char *dir = g_build_filename (pipe, "unet", NULL);
  DiffuseUNetMotion *m = diffuse_unet_motion_new_from_dir (dir, NULL, &err);
  g_assert_null (m);
  g_assert_nonnull (err);
  g_free (dir);
  if (whole) {
    GError *err2 = NULL;
    DiffuseComponentCache *own = diffuse_component_cache_new ();
    DiffusePipelineModel *pm = load_folder (pipe, own);
    g_assert_null (diffuse_animate_new (pm, &err2));
    g_assert_nonnull (err2);
    g_assert_cmpint (err2->code, ==, err->code);
    g_assert_cmpstr (err2->message, ==, err->message);
    g_error_free (err2);
    diffuse_pipeline_model_unref (pm);
    diffuse_component_cache_unref (own);
  }
  g_test_message ("%s", err->message);
  return err;
}

static void
test_saved_errors (void)
{
  char *pipe = saved_copy ();
  char *cfg = g_build_filename (pipe, "unet", "config.json", NULL);
  char *wts = g_build_filename (pipe, "unet", "diffusion_pytorch_model.safetensors", NULL);
  char *orig_cfg = NULL, *orig_wts = NULL;
  gsize cfg_len = 0, wts_len = 0;
  g_assert_true (g_file_get_contents (cfg, &orig_cfg, &cfg_len, NULL));
  g_assert_true (g_file_get_contents (wts, &orig_wts, &wts_len, NULL));
#define RESTORE()                                                               \
  G_STMT_START {                                                                \
    g_assert_true (g_file_set_contents (cfg, orig_cfg, (gssize) cfg_len, NULL)); \
    g_assert_true (g_file_set_contents (wts, orig_wts, (gssize) wts_len, NULL)); \
  } G_STMT_END

  /* each case: one edit of the config (key = value) or of the weights (drop
   * key), whether to load the whole pipeline too, the error code, and what
   * the message must name (besides the file, "cfg" or "wts") */
  const struct {
    const char *config_key, *value, *drop;
    gboolean whole;
    int code;
    const char *needle, *needle2;
    gboolean names_cfg;
  } cases[] = {
    /* a motion weight missing: NOT_FOUND naming the key and the file */
    { NULL, NULL, "up_blocks.1.motion_modules.1.transformer_blocks.1.attn1.to_v.weight", TRUE,
      DIFFUSE_ERROR_NOT_FOUND, "up_blocks.1.motion_modules.1.transformer_blocks.1.attn1.to_v.weight", NULL, FALSE },
    /* a 2-D weight missing */
    { NULL, NULL, "down_blocks.0.attentions.0.proj_in.weight", FALSE,
      DIFFUSE_ERROR_NOT_FOUND, "down_blocks.0.attentions.0.proj_in.weight", NULL, FALSE },
    /* the config asks for a mid-block motion module the weights do not have */
    { "use_motion_mid_block", "true", NULL, TRUE, DIFFUSE_ERROR_NOT_FOUND, "mid_block.motion_modules.0.", NULL, FALSE },
    /* motion_max_seq_length that does not fit the stored positional tables */
    { "motion_max_seq_length", "16", NULL, FALSE, DIFFUSE_ERROR_CONFIG, "pos_embed.pe", NULL, FALSE },
    /* motion heads that do not fit the weights' shapes... */
    { "motion_num_attention_heads", "[1, 4, 2]", NULL, FALSE, DIFFUSE_ERROR_CONFIG, "motion_num_attention_heads",
      NULL, TRUE },
    /* ... a block type UNetMotionModel does not have, an unsupported mid block */
    { "down_block_types", "[\"CrossAttnDownBlock2D\", \"DownBlockMotion\"]", NULL, TRUE, DIFFUSE_ERROR_CONFIG,
      "down_block_types", "CrossAttnDownBlock2D", TRUE },
    { "mid_block_layers", "2", NULL, FALSE, DIFFUSE_ERROR_UNSUPPORTED, "mid_block_layers", NULL, FALSE },
  };
  GError *err = NULL;
  for (guint i = 0; i < G_N_ELEMENTS (cases); i++) {
    if (cases[i].drop)
      edit_weights (wts, drop_key, (gpointer) cases[i].drop);
    else
      edit_config (cfg, cases[i].config_key, cases[i].value);
    err = saved_unet_error (pipe, cases[i].whole);
    int code = cases[i].code;
    g_assert_error (err, DIFFUSE_ERROR, code);
    g_assert_nonnull (strstr (err->message, cases[i].needle));
    if (cases[i].needle2)
      g_assert_nonnull (strstr (err->message, cases[i].needle2));
    if (code != DIFFUSE_ERROR_UNSUPPORTED)
      g_assert_nonnull (strstr (err->message, cases[i].names_cfg ? cfg : wts));
    g_clear_error (&err);
    RESTORE ();
  }

  /* fewer temporal layers than the weights hold: loads, with diffusers'
   * warning about the keys left unused */
  edit_config (cfg, "temporal_transformer_layers_per_block", "1");
  char *dir = g_build_filename (pipe, "unet", NULL);
  g_test_expect_message ("diffuse", G_LOG_LEVEL_WARNING,
                         "*weights of*were not used*down_blocks.0.motion_modules.0.transformer_blocks.1.*");
  DiffuseUNetMotion *m = diffuse_unet_motion_new_from_dir (dir, NULL, &err);
  g_test_assert_expected_messages ();
  g_assert_no_error (err);
  const char *const *unused = diffuse_motion_adapter_unused_keys (diffuse_unet_motion_get_adapter (m));
  g_assert_nonnull (unused[0]);
  for (int i = 0; unused[i]; i++)
    g_assert_nonnull (strstr (unused[i], ".motion_modules."));
  g_assert_null (diffuse_unet_unused_keys (diffuse_unet_motion_get_unet (m))[0]);
  diffuse_unet_motion_unref (m);
  g_free (dir);
  RESTORE ();
#undef RESTORE

  g_free (orig_cfg);
  g_free (orig_wts);
  g_free (cfg);
  g_free (wts);
  remove_copy (pipe);
}

/* diffuse_pipeline_model_save () of the loaded folder writes what it read:
 * loaded again it gives diffusers' frames. */
static void
test_saved_roundtrip (void)
{
  GError *err = NULL;
  DiffuseComponentCache *own = diffuse_component_cache_new ();
  char *path = tu_fixture ("animatediff/saved-pipeline");
  DiffusePipelineModel *pm = load_folder (path, own);
  char *dir = tu_mkdtemp ();
  char *out = g_build_filename (dir, "resaved", NULL);
  g_assert_true (diffuse_pipeline_model_save (pm, out, NULL, &err));
  g_assert_no_error (err);
  diffuse_pipeline_model_unref (pm);

  char *ucfg = g_build_filename (out, "unet", "config.json", NULL);
  DiffuseConfig *c = diffuse_config_load (ucfg, &err);
  g_assert_no_error (err);
  g_assert_cmpstr (diffuse_config_get_string (c, "_class_name", NULL), ==, "UNetMotionModel");
  diffuse_config_unref (c);
  char *idx = g_build_filename (out, "model_index.json", NULL);
  c = diffuse_config_load (idx, &err);
  g_assert_no_error (err);
  char **unet = diffuse_config_get_string_array (c, "unet");
  g_assert_cmpstr (unet[1], ==, "UNetMotionModel");
  g_strfreev (unet);
  diffuse_config_unref (c);

  DiffusePipelineModel *pm2 = load_folder (out, own);
  DiffuseAnimate *anim = diffuse_animate_new (pm2, &err);
  g_assert_no_error (err);
  g_assert_cmpint (run_saved_case (anim, "saved-nocfg"), <=, 1);
  diffuse_animate_unref (anim);
  diffuse_pipeline_model_unref (pm2);
  diffuse_component_cache_unref (own);
  tu_rm_rf (dir);
  g_free (idx);
  g_free (ucfg);
  g_free (out);
  g_free (dir);
  g_free (path);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  if (!tu_have_fixture ("animatediff/cases.json"))
    return 0;
  cache = diffuse_component_cache_new ();
  frames_st = tu_open ("animatediff/frames.safetensors");
  forward_st = tu_open ("animatediff/forward.safetensors");
  GError *err = NULL;
  char *path = tu_fixture ("animatediff/params.json");
  JsonParser *pp = json_parser_new ();
  json_parser_load_from_file (pp, path, &err);
  g_assert_no_error (err);
  g_free (path);
  params_json = json_node_get_object (json_parser_get_root (pp));
  path = tu_fixture ("animatediff/cases.json");
  JsonParser *parser = json_parser_new ();
  json_parser_load_from_file (parser, path, &err);
  g_assert_no_error (err);
  g_free (path);

  g_test_add_func ("/animate/adapters", test_adapters);
  static const char *fwd[] = { "a", "a-odd", "b", "b-odd", "c" };
  for (guint i = 0; i < G_N_ELEMENTS (fwd); i++) {
    char *name = g_strdup_printf ("/animate/forward/%s", fwd[i]);
    g_test_add_data_func (name, fwd[i], run_forward);
    g_free (name);
  }
  g_test_add_func ("/animate/forward-errors", test_forward_errors);
  g_test_add_func ("/animate/missing-weight", test_missing_weight);
  g_test_add_func ("/animate/full-size-params", test_full_size);
  JsonArray *cases = json_object_get_array_member (json_node_get_object (json_parser_get_root (parser)), "cases");
  for (guint i = 0; i < json_array_get_length (cases); i++) {
    JsonObject *c = json_array_get_object_element (cases, i);
    char *name = g_strdup_printf ("/animate/pipeline/%s", json_object_get_string_member (c, "id"));
    g_test_add_data_func (name, c, run_case);
    g_free (name);
  }
  g_test_add_func ("/animate/sharing", test_sharing);
  g_test_add_func ("/animate/lora", test_lora);
  g_test_add_func ("/animate/ip-adapter", test_ip_adapter);
  g_test_add_func ("/animate/cancel-and-errors", test_cancel_and_errors);

  /* a pipeline saved by diffusers: unet/ a UNetMotionModel */
  JsonParser *saved_parser = json_parser_new ();
  path = tu_fixture ("animatediff/saved-cases.json");
  json_parser_load_from_file (saved_parser, path, &err);
  g_assert_no_error (err);
  g_free (path);
  saved_json = json_node_get_object (json_parser_get_root (saved_parser));
  saved_frames_st = tu_open ("animatediff/saved-frames.safetensors");
  g_test_add_func ("/animate/saved/config", test_saved_config);
  JsonArray *saved_cases = json_object_get_array_member (saved_json, "cases");
  for (guint i = 0; i < json_array_get_length (saved_cases); i++) {
    const char *id = json_object_get_string_member (json_array_get_object_element (saved_cases, i), "id");
    char *name = g_strdup_printf ("/animate/saved/%s", id);
    g_test_add_data_func (name, id, run_saved);
    g_free (name);
  }
  g_test_add_func ("/animate/saved/sharing", test_saved_sharing);
  g_test_add_func ("/animate/saved/adapter-unused", test_saved_adapter_unused);
  g_test_add_func ("/animate/saved/errors", test_saved_errors);
  g_test_add_func ("/animate/saved/roundtrip", test_saved_roundtrip);
  int rc = g_test_run ();
  diffuse_safetensors_unref (saved_frames_st);
  g_object_unref (saved_parser);
  g_object_unref (parser);
  g_object_unref (pp);
  if (sd_pm)
    diffuse_pipeline_model_unref (sd_pm);
  diffuse_safetensors_unref (frames_st);
  diffuse_safetensors_unref (forward_st);
  diffuse_component_cache_unref (cache);
  return rc;
}

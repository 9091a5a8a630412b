/* gst-diffuse — helpers shared by the element tests (header only). */
#pragma once

#include <gst/check/gstcheck.h>
#include <gst/check/gstharness.h>
#include <gst/video/video.h>
#include <diffuse/pipeline.h>
#include <diffuse/sd.h>
#include <string.h>

/* The tiny diffusers pipeline the tests run (fast at its 16x16 default). */
static inline gchar *
test_model_path (const char *name)
{
  const char *fx = g_getenv ("DIFFUSE_FIXTURES");
  return g_build_filename (fx ? fx : TEST_FIXTURES_DIR, "pipelines", name ? name : "tiny-sd", NULL);
}

/* Settings for the reference generation through the core. */
typedef struct {
  const char *prompt, *negative_prompt, *scheduler;
  int width, height, steps, clip_skip;
  double guidance;
  guint64 seed;
  const guint8 *input_rgb;  /* img2img: RGB8, width*3 stride */
  double strength;
} RefParams;

static inline RefParams
ref_params_default (void)
{
  RefParams p = { "a cat", NULL, NULL, 16, 16, 2, 0, 7.5, 0, NULL, 0.8 };
  return p;
}

/* The core's own RGB8 output for these settings (g_free it). */
static inline guint8 *
ref_generate (const RefParams *rp)
{
  GError *err = NULL;
  gchar *model = test_model_path (NULL);
  DiffuseLoadParams lp = diffuse_load_default_params ();
  DiffusePipelineModel *pm = diffuse_pipeline_model_load (model, &lp, NULL, &err);
  fail_unless (pm != NULL, "load %s: %s", model, err ? err->message : "?");
  DiffuseSD *sd = diffuse_sd_new (pm, rp->input_rgb ? DIFFUSE_SD_IMG2IMG : DIFFUSE_SD_TEXT2IMG, &err);
  fail_unless (sd != NULL, "sd_new: %s", err ? err->message : "?");
  DiffuseSDParams p;
  diffuse_sd_default_params (&p);
  p.prompt = rp->prompt;
  p.negative_prompt = rp->negative_prompt;
  p.scheduler = rp->scheduler;
  p.width = rp->width;
  p.height = rp->height;
  p.num_inference_steps = rp->steps;
  p.guidance_scale = (float) rp->guidance;
  p.seed = rp->seed;
  p.clip_skip = rp->clip_skip;
  p.num_images = 1;
  DiffuseImage *input = NULL;
  if (rp->input_rgb) {
    input = diffuse_image_from_rgb8 (rp->input_rgb, rp->width, rp->height, rp->width * 3);
    p.image = input;
    p.strength = (float) rp->strength;
  }
  GPtrArray *imgs = diffuse_sd_generate (sd, &p, &err);
  fail_unless (imgs != NULL && imgs->len == 1, "generate: %s", err ? err->message : "?");
  DiffuseImage *img = g_ptr_array_index (imgs, 0);
  guint8 *rgb = g_malloc ((gsize) rp->width * rp->height * 3);
  diffuse_image_to_rgb8 (img, rgb, rp->width * 3);
  g_ptr_array_unref (imgs);
  diffuse_image_free (input);
  diffuse_sd_unref (sd);
  diffuse_pipeline_model_unref (pm);
  g_free (model);
  return rgb;
}

/* Compares a mapped RGB-family frame with RGB8 reference pixels: exact. */
static inline void
assert_frame_equals_rgb (GstVideoFrame *f, const guint8 *ref)
{
  GstVideoFormat fmt = GST_VIDEO_FRAME_FORMAT (f);
  int w = GST_VIDEO_FRAME_WIDTH (f), h = GST_VIDEO_FRAME_HEIGHT (f);
  int ri, gi, bi, ai = -1, px;
  switch (fmt) {
    case GST_VIDEO_FORMAT_RGB: ri = 0; gi = 1; bi = 2; px = 3; break;
    case GST_VIDEO_FORMAT_RGBA: ri = 0; gi = 1; bi = 2; ai = 3; px = 4; break;
    case GST_VIDEO_FORMAT_BGRx: ri = 2; gi = 1; bi = 0; px = 4; break;
    case GST_VIDEO_FORMAT_BGRA: ri = 2; gi = 1; bi = 0; ai = 3; px = 4; break;
    default: fail ("not an RGB format"); return;
  }
  const guint8 *d = GST_VIDEO_FRAME_PLANE_DATA (f, 0);
  int stride = GST_VIDEO_FRAME_PLANE_STRIDE (f, 0);
  for (int y = 0; y < h; y++)
    for (int x = 0; x < w; x++) {
      const guint8 *p = d + y * stride + x * px;
      const guint8 *r = ref + (y * w + x) * 3;
      fail_unless (p[ri] == r[0] && p[gi] == r[1] && p[bi] == r[2],
                   "%s pixel (%d,%d): got %d,%d,%d want %d,%d,%d", gst_video_format_to_string (fmt), x, y, p[ri],
                   p[gi], p[bi], r[0], r[1], r[2]);
      if (ai >= 0)
        fail_unless_equals_int (p[ai], 255);
    }
}

/* Checks a mapped I420/NV12 frame against RGB8 reference pixels converted
 * with the BT.601 limited-range matrix written out here (independent of
 * the element's converter, whose fixed-point matrix rounds differently):
 * luma within 2, chroma (2x2 mean) within 3 — BT.709 would be off by more. */
static inline void
assert_frame_is_bt601_of (GstVideoFrame *f, const guint8 *ref)
{
  int w = GST_VIDEO_FRAME_WIDTH (f), h = GST_VIDEO_FRAME_HEIGHT (f);
  const guint8 *yp = GST_VIDEO_FRAME_COMP_DATA (f, 0);
  int ys = GST_VIDEO_FRAME_COMP_STRIDE (f, 0);
  double max601 = 0, max709 = 0;
  for (int y = 0; y < h; y++)
    for (int x = 0; x < w; x++) {
      const guint8 *r = ref + (y * w + x) * 3;
      double Y = 16.0 + (65.481 * r[0] + 128.553 * r[1] + 24.966 * r[2]) / 255.0;
      double Y709 = 16.0 + (46.559 * r[0] + 156.629 * r[1] + 15.812 * r[2]) / 255.0;
      int got = yp[y * ys + x];
      fail_unless (fabs (got - Y) <= 2.01, "luma (%d,%d): got %d want %.2f", x, y, got, Y);
      max601 = MAX (max601, fabs (got - Y));
      max709 = MAX (max709, fabs (got - Y709));
    }
  GST_INFO ("luma: max error %.2f against BT.601, %.2f against BT.709", max601, max709);
  /* the test pictures are colourful enough to tell the matrices apart */
  fail_unless (max709 > 4.0, "frame also matches BT.709 (%.2f): the check cannot tell", max709);
  for (int y = 0; y < h / 2; y++)
    for (int x = 0; x < w / 2; x++) {
      double U = 0, V = 0;
      for (int dy = 0; dy < 2; dy++)
        for (int dx = 0; dx < 2; dx++) {
          const guint8 *r = ref + ((2 * y + dy) * w + 2 * x + dx) * 3;
          U += 128.0 + (-37.797 * r[0] - 74.203 * r[1] + 112.0 * r[2]) / 255.0;
          V += 128.0 + (112.0 * r[0] - 93.786 * r[1] - 18.214 * r[2]) / 255.0;
        }
      U /= 4;
      V /= 4;
      const guint8 *up = GST_VIDEO_FRAME_COMP_DATA (f, 1);
      const guint8 *vp = GST_VIDEO_FRAME_COMP_DATA (f, 2);
      int us = GST_VIDEO_FRAME_COMP_STRIDE (f, 1), vs = GST_VIDEO_FRAME_COMP_STRIDE (f, 2);
      int ps = GST_VIDEO_FRAME_COMP_PSTRIDE (f, 1);
      int gu = up[y * us + x * ps], gv = vp[y * vs + x * ps];
      fail_unless (fabs (gu - U) <= 3.01 && fabs (gv - V) <= 3.01, "chroma (%d,%d): got %d,%d want %.2f,%.2f", x, y,
                   gu, gv, U, V);
    }
}

/* Waits (up to timeout) for an ERROR or WARNING message on bus. */
static inline GstMessage *
wait_bus_message (GstBus *bus, GstMessageType types, GstClockTime timeout)
{
  return gst_bus_timed_pop_filtered (bus, timeout, types);
}

/* Asserts msg is an error with domain/code and whose message contains needle. */
static inline void
assert_error_message (GstMessage *msg, GQuark domain, gint code, const char *needle)
{
  fail_unless (msg != NULL, "no error message");
  GError *err = NULL;
  gchar *dbg = NULL;
  if (GST_MESSAGE_TYPE (msg) == GST_MESSAGE_ERROR)
    gst_message_parse_error (msg, &err, &dbg);
  else
    gst_message_parse_warning (msg, &err, &dbg);
  GST_INFO ("error: %s (%s)", err->message, dbg);
  fail_unless (err->domain == domain && err->code == code, "got %s %d '%s', want %s %d",
               g_quark_to_string (err->domain), err->code, err->message, g_quark_to_string (domain), code);
  if (needle)
    fail_unless (strstr (err->message, needle) != NULL, "'%s' does not name '%s'", err->message, needle);
  g_error_free (err);
  g_free (dbg);
}

static inline guint64
get_u64 (gpointer obj, const char *prop)
{
  guint64 v = 0;
  g_object_get (obj, prop, &v, NULL);
  return v;
}

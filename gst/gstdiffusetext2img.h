/* gst-diffuse — diffusetext2img: a source generating one image per buffer
 * from a text prompt with a diffusers Stable Diffusion pipeline. */
#pragma once

#include <gst/gst.h>
#include <gst/base/gstpushsrc.h>
#include <gst/video/video.h>
#include "gstdiffusecommon.h"

G_BEGIN_DECLS

#define GST_TYPE_DIFFUSE_TEXT2IMG (gst_diffuse_text2img_get_type ())
G_DECLARE_FINAL_TYPE (GstDiffuseText2Img, gst_diffuse_text2img, GST, DIFFUSE_TEXT2IMG, GstPushSrc)

struct _GstDiffuseText2Img {
  GstPushSrc parent;

  GstDiffuseState st;

  /* streaming thread */
  GstVideoInfo info;
  gint64 n_frames;              /* frames since the last caps or seek */
  guint64 accum_frames;         /* frames before the last caps change */
  GstClockTime accum_rtime;     /* time before the last caps change */
  GstClockTime running_time;    /* time of the next frame in this caps run */
  GstClockTime next_live_slot;  /* live: earliest running time of the next frame */

  /* object lock */
  GstClockID clock_id;
  GstClockTime latency;         /* reported in live mode: longest generation time seen */
};

GST_ELEMENT_REGISTER_DECLARE (diffusetext2img);

G_END_DECLS

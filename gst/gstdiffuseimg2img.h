/* gst-diffuse — diffuseimg2img: restyles each video frame with a diffusers
 * Stable Diffusion image-to-image pipeline. */
#pragma once

#include <gst/gst.h>
#include <gst/video/video.h>
#include <gst/video/gstvideofilter.h>
#include "gstdiffusecommon.h"

G_BEGIN_DECLS

#define GST_TYPE_DIFFUSE_IMG2IMG (gst_diffuse_img2img_get_type ())
G_DECLARE_FINAL_TYPE (GstDiffuseImg2Img, gst_diffuse_img2img, GST, DIFFUSE_IMG2IMG, GstVideoFilter)

struct _GstDiffuseImg2Img {
  GstVideoFilter parent;

  GstDiffuseState st;
  guint64 n_frames;             /* frames transformed since start (seed index) */
  GstClockTime latency;         /* object lock: longest generation time seen */
};

GST_ELEMENT_REGISTER_DECLARE (diffuseimg2img);

G_END_DECLS

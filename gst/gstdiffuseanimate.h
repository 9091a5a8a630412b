/* gst-diffuse — diffuseanimate: a source generating video clips from a text
 * prompt with an AnimateDiff pipeline (a Stable Diffusion model plus a
 * MotionAdapter), one frame per buffer. */
#pragma once

#include <gst/gst.h>
#include <gst/base/gstpushsrc.h>
#include <gst/video/video.h>
#include <diffuse/animate.h>
#include "gstdiffusecommon.h"

G_BEGIN_DECLS

#define GST_TYPE_DIFFUSE_ANIMATE (gst_diffuse_animate_get_type ())
G_DECLARE_FINAL_TYPE (GstDiffuseAnimate, gst_diffuse_animate, GST, DIFFUSE_ANIMATE, GstPushSrc)

struct _GstDiffuseAnimate {
  GstPushSrc parent;

  GstDiffuseState st;             /* model, settings, cache, cancellation */

  /* object lock */
  gchar *motion_adapter;          /* repo id or folder; NULL: the bundled one */
  gint num_frames;
  gboolean loop;
  guint clips;
  GstClockTime latency;           /* live: longest clip generation time seen */

  /* streaming side */
  DiffuseAnimate *anim;           /* set in start, cleared in stop */
  gint clip_frames;               /* num-frames as of start */
  GstVideoInfo info;
  GPtrArray *queue;               /* DiffuseImage* of the current clip not pushed yet */
  guint64 queue_clip;             /* the clip the queue belongs to */
  guint64 n_frames;               /* index of the next frame (continuous across clips) */
  GstClockTime live_base;         /* live: running time of frame live_base_frame */
  guint64 live_base_frame;
  GstClockTime live_next_pts;     /* live: pts following the last pushed frame */
};

GST_ELEMENT_REGISTER_DECLARE (diffuseanimate);

G_END_DECLS

/* gst-diffuse — the "diffuse" plugin: registers the elements, nothing else. */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <gst/gst.h>
#include "gstdiffusetext2img.h"
#include "gstdiffuseimg2img.h"
#include "gstdiffuseanimate.h"
#include "diffuse-config.h"

static gboolean
plugin_init (GstPlugin *plugin)
{
  gboolean ret = FALSE;
  ret |= GST_ELEMENT_REGISTER (diffusetext2img, plugin);
  ret |= GST_ELEMENT_REGISTER (diffuseimg2img, plugin);
  ret |= GST_ELEMENT_REGISTER (diffuseanimate, plugin);
  return ret;
}

#define PACKAGE "gst-diffuse"
GST_PLUGIN_DEFINE (GST_VERSION_MAJOR, GST_VERSION_MINOR, diffuse,
    "Diffusion model elements: text-to-image and image-to-image with diffusers Stable Diffusion pipelines",
    plugin_init, DIFFUSE_VERSION, "LGPL", "gst-diffuse", "https://gstreamer.freedesktop.org/")

#!/bin/sh
# diffusetext2img: four 512x512 frames (or the model's default size) from a
# prompt, as PNG files and as an H.264 MP4.
#
#   examples/text2img.sh [MODEL] [PROMPT]
#
# MODEL: a diffusers folder or a Hub repo id (default: the bundled model).
# Progress of each denoising step appears as "diffuse-progress" element
# messages (shown with -m).
set -e
MODEL=${1:+model="$1"}
PROMPT=${2:-"a lighthouse on a cliff at dusk, oil painting"}
OUT=${OUT:-.}

# PNG files, one per frame
gst-launch-1.0 -m diffusetext2img $MODEL prompt="$PROMPT" seed=42 num-inference-steps=25 num-buffers=4 \
  ! videoconvert ! pngenc ! multifilesink location="$OUT/text2img-%02d.png" | grep -v diffuse-progress

# the same frames as a 1 frame/s video (I420 straight from the element)
gst-launch-1.0 diffusetext2img $MODEL prompt="$PROMPT" seed=42 num-inference-steps=25 num-buffers=4 \
  ! x264enc ! mp4mux ! filesink location="$OUT/text2img.mp4"
echo "wrote $OUT/text2img-00..03.png and $OUT/text2img.mp4"

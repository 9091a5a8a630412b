#!/bin/sh
# diffuseimg2img: restyles an image file (or a test pattern) towards a prompt.
#
#   examples/img2img.sh [INPUT.png|-] [MODEL] [PROMPT] [STRENGTH]
#
# The frame size must be a multiple of 8; the output has the input's size.
set -e
INPUT=${1:--}
MODEL=${2:+model="$2"}
PROMPT=${3:-"a watercolor painting"}
STRENGTH=${4:-0.6}
OUT=${OUT:-.}
SIZE=${SIZE:-512}   # frame width and height (multiples of 8)

if [ "$INPUT" = "-" ]; then
  SRC="videotestsrc num-buffers=1 pattern=smpte ! video/x-raw,width=$SIZE,height=$SIZE"
else
  SRC="filesrc location=$INPUT ! decodebin ! videoconvert ! videoscale ! video/x-raw,width=$SIZE,height=$SIZE"
fi
# shellcheck disable=SC2086
gst-launch-1.0 $SRC ! videoconvert \
  ! diffuseimg2img $MODEL prompt="$PROMPT" strength="$STRENGTH" seed=7 num-inference-steps=30 \
  ! videoconvert ! pngenc ! filesink location="$OUT/img2img.png"
echo "wrote $OUT/img2img.png"

#!/bin/sh
# A live overlay: a live test source, restyled by diffuseimg2img in a side
# branch, drawn over the original by compositor.  diffuseimg2img has QoS on
# and reports its generation time as latency, so a slow model drops frames
# instead of stalling the live source; the leaky queue keeps only the
# newest frame for it.
#
#   examples/live-overlay.sh [MODEL] [PROMPT]
#
# Shows the result with autovideosink when a display is there, else writes
# live-overlay.mp4 (10 s).
set -e
MODEL=${1:+model="$1"}
PROMPT=${2:-"a stained glass window"}
OUT=${OUT:-.}
S=${SIZE:-256}   # each half of the picture is S x S (a multiple of 8)
SIZE="width=$S,height=$S"

if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] && gst-inspect-1.0 autovideosink >/dev/null 2>&1; then
  SINK="videoconvert ! autovideosink sync=true"
  LIMIT=""
else
  echo "no display: writing $OUT/live-overlay.mp4 instead"
  SINK="videoconvert ! video/x-raw,format=I420 ! x264enc tune=zerolatency ! mp4mux ! filesink location=$OUT/live-overlay.mp4"
  LIMIT="num-buffers=300"
fi

# shellcheck disable=SC2086
gst-launch-1.0 -e \
  compositor name=mix sink_1::xpos=$S ! video/x-raw,width=$((2 * S)),height=$S ! $SINK \
  videotestsrc is-live=true pattern=ball $LIMIT ! video/x-raw,$SIZE,framerate=30/1 ! tee name=t \
  t. ! queue ! mix.sink_0 \
  t. ! queue leaky=downstream max-size-buffers=1 ! videoconvert \
     ! diffuseimg2img $MODEL prompt="$PROMPT" strength=0.5 num-inference-steps=10 seed=1 \
     ! videoconvert ! mix.sink_1

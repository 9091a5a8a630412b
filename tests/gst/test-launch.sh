#!/bin/sh
# gst-launch-1.0 pipelines: text2img -> x264 in MP4 read back as 4 frames,
# and -> pngenc gives a valid PNG; img2img in a pipeline with videotestsrc.
# $1: the tests/fixtures folder.
set -u
FIX=${1:-$(dirname "$0")/../fixtures}
MODEL="$FIX/pipelines/tiny-sd"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail=0
need () {
  for e in "$@"; do
    gst-inspect-1.0 "$e" >/dev/null 2>&1 || { echo "SKIP: element $e not installed"; exit 77; }
  done
}
command -v gst-launch-1.0 >/dev/null 2>&1 || { echo "gst-launch-1.0 not installed"; exit 77; }
need videoconvert x264enc mp4mux pngenc filesink qtdemux fakesink videotestsrc

# 1. four frames through x264enc into MP4
gst-launch-1.0 -q diffusetext2img model="$MODEL" num-inference-steps=2 seed=3 num-buffers=4 \
  ! videoconvert ! x264enc ! mp4mux ! filesink location="$TMP/out.mp4" || { echo "FAIL: mp4 pipeline"; fail=1; }
if command -v gst-discoverer-1.0 >/dev/null 2>&1; then
  info=$(gst-discoverer-1.0 -v "$TMP/out.mp4" 2>&1)
  echo "$info" | grep -q "Duration: 0:00:04.000000000" || { echo "$info"; echo "FAIL: discoverer duration is not 4 frames at 1/1"; fail=1; }
  echo "$info" | grep -q "Frame rate: 1/1" || { echo "FAIL: discoverer frame rate"; fail=1; }
  echo "$info" | grep -q "video/x-h264" || { echo "FAIL: not H.264"; fail=1; }
else
  echo "note: gst-discoverer-1.0 not installed (gstreamer1.0-plugins-base-apps); counting frames only"
fi
# count the frames the demuxer gives
n=$(gst-launch-1.0 -v filesrc location="$TMP/out.mp4" ! qtdemux ! fakesink silent=false 2>&1 | grep -c "chain ")
[ "$n" = 4 ] || { echo "FAIL: $n frames in the MP4, want 4"; fail=1; }

# 2. a PNG
gst-launch-1.0 -q diffusetext2img model="$MODEL" num-inference-steps=2 num-buffers=1 \
  ! pngenc ! filesink location="$TMP/out.png" || { echo "FAIL: png pipeline"; fail=1; }
sig=$(od -An -tx1 -N8 "$TMP/out.png" | tr -d ' \n')
[ "$sig" = "89504e470d0a1a0a" ] || { echo "FAIL: not a PNG ($sig)"; fail=1; }
# IHDR width/height: 16x16, the model's default size
dims=$(od -An -tu1 -j16 -N8 "$TMP/out.png" | tr -s ' ' | sed 's/^ //')
[ "$dims" = "0 0 0 16 0 0 0 16" ] || { echo "FAIL: PNG size bytes $dims"; fail=1; }

# 3. I420 straight into x264enc (no videoconvert)
gst-launch-1.0 -q diffusetext2img model="$MODEL" num-inference-steps=1 num-buffers=2 \
  ! x264enc ! fakesink || { echo "FAIL: x264enc without videoconvert"; fail=1; }

# 4. img2img on a test pattern
gst-launch-1.0 -q videotestsrc num-buffers=2 ! video/x-raw,width=16,height=16 ! videoconvert \
  ! diffuseimg2img model="$MODEL" num-inference-steps=2 strength=0.5 ! videoconvert ! pngenc \
  ! filesink location="$TMP/i2i.png" || { echo "FAIL: img2img pipeline"; fail=1; }
[ -s "$TMP/i2i.png" ] || { echo "FAIL: img2img wrote nothing"; fail=1; }

# 5. errors reach the bus as in gst-launch: missing model
err=$(gst-launch-1.0 diffusetext2img model=/nonexistent/folder num-buffers=1 ! fakesink 2>&1)
echo "$err" | grep -q "ERROR: from element .*diffusetext2img.*/nonexistent/folder" || {
  echo "$err"; echo "FAIL: missing model error"; fail=1; }

[ $fail -eq 0 ] && echo "ok: launch pipelines"
exit $fail

#!/bin/sh
# gst-launch-1.0 pipelines with diffuseanimate: one 16-frame clip through
# x264enc into MP4 (gst-discoverer-1.0 reads 2 s at 8/1, qtdemux gives 16
# frames), and through pngenc into multifilesink (16 PNGs).
# $1: the tests/fixtures folder.
set -u
FIX=${1:-$(dirname "$0")/../fixtures}
MODEL="$FIX/pipelines/tiny-sd"
ADAPTER="$FIX/animatediff/a"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail=0
command -v gst-launch-1.0 >/dev/null 2>&1 || { echo "SKIP: gst-launch-1.0 not installed"; exit 77; }
for e in diffuseanimate videoconvert x264enc mp4mux pngenc filesink multifilesink qtdemux fakesink; do
  gst-inspect-1.0 "$e" >/dev/null 2>&1 || { echo "SKIP: element $e not installed"; exit 77; }
done
SRC="diffuseanimate model=$MODEL motion-adapter=$ADAPTER num-inference-steps=2 seed=5 clips=1 num-frames=16"

# 1. one clip into H.264/MP4
gst-launch-1.0 -q $SRC ! videoconvert ! x264enc ! mp4mux ! filesink location="$TMP/clip.mp4" \
  || { echo "FAIL: mp4 pipeline"; fail=1; }
if command -v gst-discoverer-1.0 >/dev/null 2>&1; then
  info=$(gst-discoverer-1.0 -v "$TMP/clip.mp4" 2>&1)
  echo "$info" | grep -q "Duration: 0:00:02.000000000" || { echo "$info"; echo "FAIL: duration is not 16 frames at 8/1"; fail=1; }
  echo "$info" | grep -q "Frame rate: 8/1" || { echo "$info"; echo "FAIL: frame rate"; fail=1; }
  echo "$info" | grep -q "video/x-h264" || { echo "FAIL: not H.264"; fail=1; }
else
  echo "note: gst-discoverer-1.0 not installed; counting frames only"
fi
n=$(gst-launch-1.0 -v filesrc location="$TMP/clip.mp4" ! qtdemux ! fakesink silent=false 2>&1 | grep -c "chain ")
[ "$n" = 16 ] || { echo "FAIL: $n frames in the MP4, want 16"; fail=1; }

# 2. one clip as 16 PNGs
gst-launch-1.0 -q $SRC ! videoconvert ! pngenc ! multifilesink location="$TMP/frame%02d.png" \
  || { echo "FAIL: png pipeline"; fail=1; }
n=$(ls "$TMP"/frame*.png 2>/dev/null | wc -l)
[ "$n" -eq 16 ] || { echo "FAIL: $n PNGs, want 16"; fail=1; }
for f in "$TMP"/frame00.png "$TMP"/frame15.png; do
  sig=$(od -An -tx1 -N8 "$f" 2>/dev/null | tr -d ' \n')
  [ "$sig" = "89504e470d0a1a0a" ] || { echo "FAIL: $f is not a PNG ($sig)"; fail=1; }
done
cmp -s "$TMP/frame00.png" "$TMP/frame15.png" && { echo "FAIL: first and last frames are the same picture"; fail=1; }

# 3. a missing adapter: an error naming it
err=$(gst-launch-1.0 diffuseanimate model="$MODEL" motion-adapter=/nonexistent/adapter clips=1 ! fakesink 2>&1)
echo "$err" | grep -q "ERROR: from element .*diffuseanimate.*/nonexistent/adapter" || {
  echo "$err"; echo "FAIL: missing adapter error"; fail=1; }

[ $fail -eq 0 ] && echo "ok: diffuseanimate launch pipelines"
exit $fail

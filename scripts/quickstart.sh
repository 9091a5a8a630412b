#!/usr/bin/env bash
# Sets up a Debian 12 machine, builds gst-diffuse and runs the main job:
# a prompt in, a PNG out (and an MP4 through gst-launch-1.0 when the
# GStreamer plugin is built).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build

model=data/tiny-sd
prompt="a small red circle at the top left on a blue background"
if [ ! -f "$model/model_index.json" ]; then
  echo "note: the bundled model ($model) is not there yet; using the tiny random test pipeline (its pictures are noise)"
  model=tests/fixtures/pipelines/tiny-sd
fi
mkdir -p out
build/tools/diffuse generate "$model" --prompt "$prompt" --seed 33 --output out/quickstart.png

if [ -f build/gst/libgstdiffuse.so ]; then
  export GST_PLUGIN_PATH="$PWD/build/gst${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
  steps="num-inference-steps=20 guidance-scale=5.0"
  gst-launch-1.0 -q diffusetext2img model="$model" prompt="$prompt" $steps num-buffers=1 \
    ! pngenc ! filesink location=out/quickstart-gst.png
  gst-launch-1.0 -q diffusetext2img model="$model" prompt="$prompt" $steps num-buffers=4 seed=33 seed-increment=1 \
    ! videoconvert ! x264enc ! mp4mux ! filesink location=out/quickstart.mp4
  echo "wrote out/quickstart-gst.png and out/quickstart.mp4 (4 frames, one seed each)"
  if [ -f data/tiny-motion-adapter/config.json ]; then
    gst-launch-1.0 -q diffuseanimate model="$model" motion-adapter=data/tiny-motion-adapter \
      prompt="a small red circle moving rightward on a blue background" $steps clips=1 \
      ! videoconvert ! x264enc ! mp4mux ! filesink location=out/quickstart-animate.mp4
    echo "wrote out/quickstart-animate.mp4"
  fi
fi

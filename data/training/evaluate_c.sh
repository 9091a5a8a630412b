#!/bin/sh
# Evaluates the C pipeline (build/tools/diffuse) on the bundled models with the same held-out
# prompts, seeds (prompt index) and analysers as evaluate.py / evaluate_motion.py use for diffusers.
#   data/training/evaluate_c.sh [BUILD_DIR] [OUT_DIR]      (run from anywhere)
# Writes OUT_DIR/images/NNN.png, OUT_DIR/clips/NNN_FF.png, OUT_DIR/eval-c.json, OUT_DIR/eval-motion-c.json
# env: PARTS ("image motion"), PYTHON (python3)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
out=${2:-/tmp/tinysd/c-eval}
parts=${PARTS:-image motion}
py=${PYTHON:-python3}
mkdir -p "$out"
cd "$here"
case " $parts " in *" image "*)
  "$py" evaluate.py --write-prompts "$out/prompts.json"
  t0=$(date +%s)
  "$build/tools/diffuse" generate "$root/data/tiny-sd" --prompts-file "$out/prompts.json" --seed 0 \
    --output-dir "$out/images" > "$out/generate.log"
  echo "C pipeline: $(grep -c wrote "$out/generate.log") images in $(( $(date +%s) - t0 )) s"
  "$py" evaluate.py --images "$out/images" --json "$out/eval-c.json" --sheet "$out/samples-c.png" | grep -v '^ *"source"'
esac
case " $parts " in *" motion "*)
  "$py" evaluate_motion.py --write-prompts "$out/motion-prompts.json"
  t0=$(date +%s)
  "$build/tools/diffuse" animate "$root/data/tiny-sd" --motion-adapter "$root/data/tiny-motion-adapter" \
    --prompts-file "$out/motion-prompts.json" --seed 0 --output-dir "$out/clips" > "$out/animate.log"
  echo "C pipeline: $(grep -c wrote "$out/animate.log") clips in $(( $(date +%s) - t0 )) s"
  "$py" evaluate_motion.py --images "$out/clips" --json "$out/eval-motion-c.json" --sheet "$out/motion-c.png" |
    grep -v '^ *"source"'
esac

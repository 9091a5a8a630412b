#!/bin/sh
# diffuse-core against torch on the CPU, float32, same thread count, run side
# by side (alternating, never at the same time): the op table of
# run-cpu-bench.sh, then one full-size SD 1.5 UNet forward (batch 2, 64x64
# latents), the VAE decode at 512x512 (latents [1, 4, 64, 64]) and the CLIP
# text encoder (batch 2, 77 tokens).
#
#   tests/bench/bench-sd15-cpu.sh [BUILD_DIR] [MODEL_DIR]
#       BUILD_DIR default build; MODEL_DIR default /tmp/sd15-bench
#   env: THREADS (2), REPS (3: op repetitions, and timed text-encoder forwards
#        per process after one warm-up), MODEL_REPS (1: the same for the UNet
#        and the VAE: a forward there takes a minute on 2 busy cores),
#        ROUNDS (2: alternating processes per side; the table shows the median
#        of all timed forwards and the minimum), PARTS ("ops unet vae clip"),
#        PYTHON (python3), OMP_WAIT_POLICY (passive, for both sides)
#
# Models (random weights, SD 1.5 shapes; ~4.3 GB in MODEL_DIR):
#   python3 tests/reference/check_unet_sd15.py MODEL_DIR      (unet/ + io.safetensors)
#   python3 tests/bench/bench_sd15_torch.py make MODEL_DIR    (vae/ + text_encoder/)
# This script creates the missing ones.
#
# Memory columns (MiB):
#   weights  diffuse-core: the weights' storage (owned + mapped from the files);
#            torch: the process RSS growth while loading the model.
#   fwd peak diffuse-core: the allocator's peak of owned memory during the
#            forwards above what was held before (activations + scratch);
#            torch: the growth of VmHWM during the forwards above the RSS
#            after loading (activations + scratch + allocator caches, plus
#            weight pages first touched then when torch maps the file).
#   VmHWM    both: the whole process's RSS high-water mark (libraries, weights,
#            activations): the like-for-like figure.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
build=${1:-build}
models=${2:-/tmp/sd15-bench}
threads=${THREADS:-2}
reps=${REPS:-3}
model_reps=${MODEL_REPS:-1}
rounds=${ROUNDS:-2}
parts=${PARTS:-ops unet vae clip}
python=${PYTHON:-python3}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
bench="$build/tests/bench/bench-sd15"
if [ ! -x "$bench" ]; then
  echo "bench-sd15-cpu: $bench not found (build first: meson setup $build && ninja -C $build)" >&2
  exit 2
fi

case " $parts " in *" unet "*)
  if [ ! -f "$models/io.safetensors" ]; then
    "$python" "$here/../reference/check_unet_sd15.py" "$models" --threads "$threads"
  fi ;;
esac
case " $parts " in *" vae "*|*" clip "*)
  if [ ! -f "$models/vae/config.json" ] || [ ! -f "$models/text_encoder/config.json" ]; then
    "$python" "$here/bench_sd15_torch.py" make "$models"
  fi ;;
esac

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $threads threads each side, OMP_WAIT_POLICY=$OMP_WAIT_POLICY"
echo "# torch $("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null), float32"

case " $parts " in *" ops "*)
  echo
  echo "## ops"
  THREADS=$threads REPS=$reps "$here/run-cpu-bench.sh" "$build"
esac

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

for what in unet vae clip; do
  case " $parts " in *" $what "*) ;; *) continue ;; esac
  : > "$tmp/$what.c"
  : > "$tmp/$what.t"
  n=$reps
  [ "$what" = clip ] || n=$model_reps
  echo "$n" > "$tmp/$what.n"
  r=0
  while [ "$r" -lt "$rounds" ]; do
    l0=$(cut -d' ' -f1 /proc/loadavg)
    OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads \
      "$bench" "$what" "$models" --threads "$threads" --reps "$n" | sed "s/\$/\t$l0/" >> "$tmp/$what.c"
    l1=$(cut -d' ' -f1 /proc/loadavg)
    OMP_NUM_THREADS=$threads \
      "$python" "$here/bench_sd15_torch.py" "$what" "$models" --threads "$threads" --reps "$n" 2>/dev/null |
      grep "^$what" | sed "s/\$/\t$l1/" >> "$tmp/$what.t"
    r=$((r + 1))
  done
done

echo
echo "## models ($rounds processes per side, alternating; each: 1 warm-up + N timed forwards (N: $model_reps UNet/VAE, $reps text encoder); ms = median of the per-process medians, min = over all)"
printf "| %-26s | %10s | %10s | %6s | %10s | %10s | %6s | %20s | %20s | %13s | %9s |\n" "forward" "diffuse ms" "torch ms" \
  "ratio" "diff. min" "torch min" "ratio" "weights MiB (d / t)" "fwd peak MiB (d / t)" "VmHWM MiB (d / t)" "load 1m"
echo "|----------------------------|------------|------------|--------|------------|------------|--------|----------------------|----------------------|---------------|-----------|"
for what in unet vae clip; do
  case " $parts " in *" $what "*) ;; *) continue ;; esac
  case $what in
    unet) label="UNet SD1.5 b2 64x64" ;;
    vae) label="VAE decode 1x512x512" ;;
    clip) label="CLIP text b2x77" ;;
  esac
  awk -F '\t' -v label="$label" '
    function median(a, n,   i, j, t) {
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    FNR == 1 { f++ }
    f == 1 { nc++; cm[nc] = $2; if (!cmin || $3 < cmin) cmin = $3; cw = $4; if ($5 > cp) cp = $5; if ($6 > ch) ch = $6; loads = loads sep $7; sep = "," }
    f == 2 { nt++; tm[nt] = $2; if (!tmin || $3 < tmin) tmin = $3; tw = $4; if ($5 > tp) tp = $5; if ($6 > th) th = $6; loads = loads sep $7 }
    END {
      if (!nc || !nt) { printf "| %-26s | missing output (diffuse %d, torch %d runs) |\n", label, nc, nt; exit }
      c = median(cm, nc); t = median(tm, nt)
      printf "| %-26s | %10.0f | %10.0f | %6.2f | %10.0f | %10.0f | %6.2f | %20s | %20s | %13s | %9s |\n", label, c, t, c / t,
             cmin, tmin, cmin / tmin, sprintf("%.0f / %.0f", cw, tw), sprintf("%.0f / %.0f", cp, tp),
             sprintf("%.0f / %.0f", ch, th), loads
    }' "$tmp/$what.c" "$tmp/$what.t"
done
echo "(ratio = diffuse / torch: below 1 means diffuse-core is faster; load 1m: load average before each run, diffuse's runs first)"
echo
echo "## per process (what, median ms, min ms, weights MiB, fwd peak MiB, VmHWM MiB, load 1m)"
for what in unet vae clip; do
  case " $parts " in *" $what "*) ;; *) continue ;; esac
  sed 's/^/diffuse\t/' "$tmp/$what.c"
  sed 's/^/torch\t/' "$tmp/$what.t"
done

#!/bin/bash
# The GPU check of issue 7, in one call on an H100/H200 (docs/gpu-check.md).
#
# Before the call, HERE (no GPU needed):   tests/bench/gpu/prepare.sh
#   (builds the CUDA build, stages binaries + runtime libraries in .gpu/,
#    downloads the diffusers wheel into .whl/ with
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#        -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 )
# The call:  run(command="bash tests/bench/gpu/run.sh", carry=[".gpu", ".whl"], timeout_s=600)
#
# Steps (ONLY="ops,bench" runs a subset; each step has its own timeout so a
# hang costs one step, not the call):
# Default order: correctness first (info, ops, sd, sanitize), then bench and profile.
#   info      nvidia-smi, library check, test-cuda-fallback (GPU parts run)
#   ops       gpu-ops: every torch op case on cuda:0, native/f16/bf16, + CUDA graph check
#   bench     full-size SD 1.5, random fp16 weights: diffusers eager fp16 SDPA vs ours,
#             512x512, 20 steps, CFG 7.5, batch 1, median of 5 after warm-up; PSNR
#   profile   DIFFUSE_CUDA_PROFILE=1: time per op kind (synchronised per op) over a short
#             sd-bench-gpu run (4 steps: 3 generates, 6 VAE decodes, 6 text encodes)
#   sd        test-sd and test-animate (tiny pipelines vs diffusers fixtures) with DIFFUSE_TEST_DEVICE=cuda:0
#   sanitize  compute-sanitizer memcheck on one tiny-sd generate (f16)
# Files under $OUT (8 at most): run.log, gpu-ops.txt, sanitizer.log, ours.json,
# diffusers.json, psnr.json, ours.ppm, diffusers.ppm.  A summary table ends the output.
set -u
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
ONLY=${ONLY:-info,ops,sd,sanitize,bench,profile}
LOG=$OUT/run.log
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
stamp () { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
# a step's timeout: its own limit, cut so the whole script ends by BUDGET s
# (the call's timeout_s is 600: the summary must still print)
BUDGET=${BUDGET:-560}
tmo () { local left=$(( BUDGET - ($(date +%s) - T0) )); [ $left -lt $1 ] && echo $(( left > 5 ? left : 5 )) || echo $1; }
declare -A RES

# ---- environment ------------------------------------------------------------
W=/tmp/gpucheck
mkdir -p $W/lib
tar -xJf .gpu/libs.tar.xz -C $W/lib || { echo "no .gpu/libs.tar.xz: run tests/bench/gpu/prepare.sh here first"; exit 1; }
CUBLAS_DIR=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
         /usr/local/cuda-13*/targets/x86_64-linux/lib $(python3 -c 'import nvidia,os;print(" ".join(os.path.join(p,s,"lib") for p in nvidia.__path__ for s in os.listdir(p)))' 2>/dev/null); do
  if [ -e "$d/libcublas.so.13" ]; then CUBLAS_DIR="$CUBLAS_DIR:$d"; fi
done
[ -z "$CUBLAS_DIR" ] && CUBLAS_DIR=":$(dirname "$(find / -name 'libcublas.so.13' -not -path '/proc/*' 2>/dev/null | head -1)")"
# only our programs get the carried libraries (python/torch keep the image's own)
OURLIB=$W/lib${CUBLAS_DIR}:${LD_LIBRARY_PATH:-}
ours () { LD_LIBRARY_PATH=$OURLIB "$@"; }
export DIFFUSE_FIXTURES=$ROOT/tests/fixtures
export OMP_NUM_THREADS=8
BIN=$ROOT/.gpu/bin
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1

step_info () {
  stamp "info"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  echo "our LD_LIBRARY_PATH=$OURLIB"
  ours ldd $BIN/gpu-ops | grep -E "not found|cublas|cudart|diffuse"
  ours timeout $(tmo 60) $BIN/test-cuda-fallback; RES[fallback]=$?
}

step_ops () {
  stamp "ops: gpu-ops (every torch op case on cuda:0, native/f16/bf16, graph check)"
  ours timeout $(tmo 120) $BIN/gpu-ops --device cuda:0 --report $OUT/gpu-ops.txt > $W/gpu-ops.out 2>$W/gpu-ops.err; RES[ops]=$?
  grep -E "^FAIL" $W/gpu-ops.out | head -40
  tail -c 2000 $W/gpu-ops.err
  grep -E "^SUMMARY|^SKIP|graph" $W/gpu-ops.out
  stamp "ops: f16 attention per path at SD 1.5 shapes (gpu-ops --attn-timing)"
  ours timeout $(tmo 60) $BIN/gpu-ops --device cuda:0 --attn-timing 2>&1 | grep -E "^attn"
}

# variant NAME VAR=VALUE...: ours again with those settings, $W/ours-NAME.{json,ppm};
# only the names in $VARIANTS (default: all) run
VARIANTS=${VARIANTS:-unfused flash64 pool-classes wmma no-graph implicit im2col old}
variant () {
  local name=$1; shift
  case " $VARIANTS " in *" $name "*) ;; *) return 0 ;; esac
  stamp "bench: ours, $name ($*)"
  env "$@" LD_LIBRARY_PATH=$OURLIB timeout $(tmo 120) $BIN/sd-bench-gpu $M --device cuda:0 --dtype f16 --steps 20 \
    --size 512 --runs 5 --out $W/ours-$name.ppm --json $W/ours-$name.json 2>&1 | grep -vE '^\{' | tail -2
  RES[bench_$name]=${PIPESTATUS[0]}
}

step_bench () {
  stamp "bench: make full-size SD 1.5 (random fp16 weights)"
  M=$W/sd15
  if [ ! -f $M/model_index.json ]; then
    timeout $(tmo 150) python3 tests/bench/gpu/sd15_diffusers.py make $M tests/fixtures/clip-tokenizer 2>&1 | grep -v Warning | tail -3
  fi
  du -sh $M
  stamp "bench: diffusers eager fp16 SDPA"
  timeout $(tmo 150) python3 tests/bench/gpu/sd15_diffusers.py bench $M --out $OUT/diffusers.ppm --json $OUT/diffusers.json \
    2>&1 | grep -vE "Loading|it/s\]" | tail -5; RES[bench_diffusers]=${PIPESTATUS[0]}
  stamp "bench: ours (sd-bench-gpu, f16)"
  ours timeout $(tmo 200) $BIN/sd-bench-gpu $M --device cuda:0 --dtype f16 --steps 20 --size 512 --runs 5 \
    --out $OUT/ours.ppm --json $OUT/ours.json 2>&1 | tail -5; RES[bench_ours]=${PIPESTATUS[0]}
  # the default (flash attention, CUDA graph, implicit GEMM where its grid
  # fills the GPU, row-wise im2col) against each switch turned back, and the
  # defaults before session 8 (docs/gpu-check.md section 9)
  variant unfused DIFFUSE_CUDA_ATTN=unfused
  variant flash64 DIFFUSE_CUDA_FLASH_ROWS=64
  variant pool-classes DIFFUSE_CUDA_POOL=classes
  variant wmma DIFFUSE_CUDA_ATTN=wmma
  variant no-graph DIFFUSE_CUDA_GRAPH=0
  variant implicit DIFFUSE_CUDA_CONV=implicit
  variant im2col DIFFUSE_CUDA_CONV=im2col
  variant old DIFFUSE_CUDA_GRAPH=0 DIFFUSE_CUDA_CONV=im2col DIFFUSE_CUDA_IM2COL=elements DIFFUSE_CUDA_ATTN=wmma
  # diffusers again: eager PyTorch is launch-bound, and its first run on a
  # fresh machine was 1.4x slower than a later one (docs/benchmarks.md); the
  # ratios use the faster of the two medians
  [ "${DIFFUSERS_TWICE:-1}" = 1 ] && {
  stamp "bench: diffusers eager fp16 SDPA, second run"
  timeout $(tmo 100) python3 tests/bench/gpu/sd15_diffusers.py bench $M --out $W/diffusers2.ppm --json $W/diffusers2.json \
    2>&1 | grep -vE "Loading|it/s\]|deprecat" | tail -2
  python3 - $OUT/diffusers.json $W/diffusers2.json <<'PY'
import json, sys
try:
    a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
except Exception as e:
    sys.exit(0)
print(f"diffusers total_s {a['total_s']:.4f} then {b['total_s']:.4f}; unet_step_ms {a['unet_step_ms']:.2f} then {b['unet_step_ms']:.2f}")
if b["total_s"] < a["total_s"]:
    b["first_run_total_s"] = a["total_s"]
    json.dump(b, open(sys.argv[1], "w"))
    print("the ratios below use the second run")
PY
  }
  VARIANTS="$VARIANTS" python3 - "$W" "$OUT" <<'PY' | tee $OUT/variants.txt
import json, math, os, sys
import numpy as np
w, out = sys.argv[1], sys.argv[2]
def ppm(p):   # binary P6, 8-bit: "P6\n<w> <h>\n255\n" then the pixels
    data = open(p, "rb").read()
    fields, pos = [], 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    wd, ht = int(fields[1]), int(fields[2])
    return np.frombuffer(data[pos + 1:pos + 1 + wd * ht * 3], dtype=np.uint8).astype(np.float64)
def load(p):
    try:
        return json.load(open(p))
    except Exception:
        return None
d = load(os.path.join(out, "diffusers.json"))
rows = [("default", os.path.join(out, "ours"))] + [
    (n, os.path.join(w, "ours-" + n)) for n in os.environ.get("VARIANTS", "").split()]
print(f"{'variant':10s} {'total_s':>8s} {'x diff.':>7s} {'unet_ms':>8s} {'vae_ms':>7s} {'peak_res_GB':>11s} {'PSNR vs diffusers':>17s}")
for n, base in rows:
    j = load(base + ".json")
    if not j:
        print(f"{n:10s} (no result)")
        continue
    ps = "-"
    if os.path.exists(base + ".ppm") and os.path.exists(os.path.join(out, "diffusers.ppm")):
        try:
            x, y = ppm(os.path.join(out, "diffusers.ppm")), ppm(base + ".ppm")
            mse = float(((x - y) ** 2).mean())
            ps = f"{(10 * math.log10(255.0 ** 2 / mse) if mse > 0 else float('inf')):.2f} dB"
        except Exception:
            ps = "?"
    ratio = j["total_s"] / d["total_s"] if d and d.get("total_s") else float("nan")
    print(f"{n:10s} {j['total_s']:8.4f} {ratio:7.3f} {j['unet_step_ms']:8.2f} {j['vae_decode_ms']:7.2f} "
          f"{j['peak_reserved_bytes'] / 1e9:11.2f} {ps:>17s}")
PY
  if [ -f $W/ours-unfused.ppm ] && [ -f $OUT/diffusers.ppm ]; then
    echo "unfused attention: $(python3 tests/bench/gpu/sd15_diffusers.py psnr $OUT/diffusers.ppm $W/ours-unfused.ppm)"
  fi
  if [ -f $OUT/ours.ppm ] && [ -f $OUT/diffusers.ppm ]; then
    python3 tests/bench/gpu/sd15_diffusers.py psnr $OUT/diffusers.ppm $OUT/ours.ppm | tee $OUT/psnr.json
  fi
}

step_diag () {
  # where ours and diffusers part on the full-size model: images after 1 and 2
  # steps, a VAE decode of fixed latents, the text encoder's hidden state; f16 and f32
  M=$W/sd15
  if [ ! -f $M/model_index.json ]; then
    timeout $(tmo 150) python3 tests/bench/gpu/sd15_diffusers.py make $M tests/fixtures/clip-tokenizer 2>&1 | tail -1
  fi
  D=$W/diag
  mkdir -p $D
  for dt in float16 float32; do
    stamp "diag: diffusers $dt"
    timeout $(tmo 90) python3 tests/bench/gpu/sd15_diffusers.py diag $M --outdir $D --dtype $dt 2>&1 | grep -vE "Warning|deprecate" | tail -3
    o=$([ $dt = float16 ] && echo f16 || echo f32)
    stamp "diag: ours $o"
    ours timeout $(tmo 60) $BIN/sd-bench-gpu $M --device cuda:0 --dtype $o --steps 1 --runs 1 --out $D/ours-$dt-s1.ppm \
      --vae-out $D/ours-$dt-vae.ppm --te-out $D/ours-$dt-te.bin > /dev/null 2>$W/diag.err || tail -3 $W/diag.err
    ours timeout $(tmo 60) $BIN/sd-bench-gpu $M --device cuda:0 --dtype $o --steps 2 --runs 1 --out $D/ours-$dt-s2.ppm \
      > /dev/null 2>$W/diag.err || tail -3 $W/diag.err
    ours timeout $(tmo 60) $BIN/sd-bench-gpu $M --device cuda:0 --dtype $o --steps 1 --guidance 1 --runs 1 \
      --out $D/ours-$dt-s1g1.ppm > /dev/null 2>$W/diag.err || tail -3 $W/diag.err
  done
  cp $D/diffusers-float16-s1.ppm $D/ours-float16-s1.ppm $D/diffusers-float32-s1.ppm $D/ours-float32-s1.ppm $OUT/ 2>/dev/null
  python3 tests/bench/gpu/sd15_diffusers.py compare $D | tee $OUT/diag.txt
}

step_blocks () {
  # diffusers' own float16 run against its float32 run, block by block (sd15_diffusers.py blocks)
  M=$W/sd15
  if [ ! -f $M/model_index.json ]; then
    timeout $(tmo 150) python3 tests/bench/gpu/sd15_diffusers.py make $M tests/fixtures/clip-tokenizer 2>&1 | tail -1
  fi
  stamp "blocks: diffusers float16 vs float32 on one CFG UNet call, step and decode"
  timeout $(tmo 90) python3 tests/bench/gpu/sd15_diffusers.py blocks $M 2>&1 | grep -vE "Loading|Warning|deprecate" | tail -24
}

step_profile () {
  stamp "profile: per-op time of ours (DIFFUSE_CUDA_PROFILE=1, sd-bench-gpu 4 steps)"
  if [ -f $W/sd15/model_index.json ]; then
    DIFFUSE_CUDA_PROFILE=1 ours timeout $(tmo 120) $BIN/sd-bench-gpu $W/sd15 --device cuda:0 --dtype f16 --steps 4 \
      --size 512 --runs 1 2>&1 | tail -30; RES[profile]=${PIPESTATUS[0]}
    stamp "profile: the same with the implicit-GEMM convolution everywhere (split-K)"
    DIFFUSE_CUDA_PROFILE=1 DIFFUSE_CUDA_CONV=implicit ours timeout $(tmo 120) \
      $BIN/sd-bench-gpu $W/sd15 --device cuda:0 --dtype f16 --steps 4 --size 512 --runs 1 2>&1 | grep -E "^ |in all"
  else
    echo "no model (run the bench step first)"
  fi
}

step_sd () {
  stamp "sd: test-sd on cuda:0 (tiny pipelines vs diffusers fixtures)"
  DIFFUSE_TEST_DEVICE=cuda:0 ours timeout $(tmo 120) $BIN/test-sd 2>&1 | grep -vE "^# (Start|End)" | tail -40; RES[sd]=${PIPESTATUS[0]}
  stamp "sd: test-sd-f16 on cuda:0 (the tiny pipeline loaded in f16 vs diffusers float16)"
  DIFFUSE_TEST_DEVICE=cuda:0 ours timeout $(tmo 60) $BIN/test-sd-f16 2>&1 | grep -E "^# A|ok" | tail -8; RES[sd_f16]=${PIPESTATUS[0]}
  stamp "sd: test-sd and test-sd-f16 on cuda:0 without the CUDA graph, with the implicit-GEMM convolution everywhere"
  DIFFUSE_CUDA_GRAPH=0 DIFFUSE_CUDA_CONV=implicit DIFFUSE_TEST_DEVICE=cuda:0 ours timeout $(tmo 120) $BIN/test-sd 2>&1 \
    | grep -E "^not ok|^# (A|B)|CUDA graph|^ok" | tail -12; RES[sd_graph]=${PIPESTATUS[0]}
  DIFFUSE_CUDA_GRAPH=0 DIFFUSE_CUDA_CONV=implicit DIFFUSE_TEST_DEVICE=cuda:0 ours timeout $(tmo 60) $BIN/test-sd-f16 2>&1 \
    | grep -E "^# A|ok|CUDA graph" | tail -8; RES[sd_f16_graph]=${PIPESTATUS[0]}
  stamp "sd: test-safety on cuda:0 (the tiny pipeline with diffusers' safety checker: images and flags)"
  DIFFUSE_TEST_DEVICE=cuda:0 ours timeout $(tmo 60) $BIN/test-safety 2>&1 | grep -E "^ok|^not ok|prompt|Bail" | tail -8
  RES[safety]=${PIPESTATUS[0]}
  stamp "sd: test-sag on cuda:0 (self-attention guidance vs diffusers' StableDiffusionSAGPipeline)"
  DIFFUSE_TEST_DEVICE=cuda:0 ours timeout $(tmo 60) $BIN/test-sag 2>&1 | grep -E "^ok|^not ok|max difference|Bail" | tail -8
  RES[sag]=${PIPESTATUS[0]}
  stamp "sd: test-lora on cuda:0 (LoRA adapters vs diffusers' load_lora_weights / set_adapters)"
  DIFFUSE_TEST_DEVICE=cuda:0 ours timeout $(tmo 60) $BIN/test-lora 2>&1 | grep -E "^ok|^not ok|levels|Bail" | tail -8
  RES[lora]=${PIPESTATUS[0]}
  stamp "sd: test-ip-adapter on cuda:0 (IP-Adapter vs diffusers' load_ip_adapter)"
  DIFFUSE_TEST_DEVICE=cuda:0 ours timeout $(tmo 60) $BIN/test-ip-adapter 2>&1 | grep -E "^ok|^not ok|levels|Bail" | tail -6
  RES[ip_adapter]=${PIPESTATUS[0]}
  stamp "sd: test-sdxl on cuda:0 (the tiny Stable Diffusion XL pipeline vs diffusers, f32 and f16)"
  DIFFUSE_TEST_DEVICE=cuda:0 ours timeout $(tmo 60) $BIN/test-sdxl 2>&1 | grep -E "^ok|^not ok|levels|Bail" | tail -14
  RES[sdxl]=${PIPESTATUS[0]}
  stamp "sd: test-animate on cuda:0 (tiny AnimateDiff pipelines vs diffusers fixtures)"
  DIFFUSE_TEST_DEVICE=cuda:0 ours timeout $(tmo 90) $BIN/test-animate 2>&1 | grep -vE "^# (Start|End)" | tail -30; RES[animate]=${PIPESTATUS[0]}
}

step_sanitize () {
  stamp "sanitize: compute-sanitizer memcheck, tiny-sd generate f16 on cuda:0"
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -n "$CS" ]; then
    ours timeout $(tmo 200) $CS --tool memcheck --leak-check full --error-exitcode 3 --log-file $OUT/sanitizer.log \
      $BIN/sd-bench-gpu tests/fixtures/pipelines/tiny-sd --device cuda:0 --dtype f16 --steps 2 --size 64 --runs 1 \
      2>&1 | tail -3; RES[sanitize]=${PIPESTATUS[0]}
    grep -E "ERROR SUMMARY|LEAK SUMMARY|Invalid|out of bounds" $OUT/sanitizer.log | head -20
    stamp "sanitize: the same with the unfused attention, the element-wise im2col and no CUDA graph"
    DIFFUSE_CUDA_ATTN=unfused DIFFUSE_CUDA_IM2COL=elements DIFFUSE_CUDA_CONV=im2col DIFFUSE_CUDA_GRAPH=0 ours timeout $(tmo 120) \
      $CS --tool memcheck --leak-check full --error-exitcode 3 \
      --log-file $W/sanitizer-unfused.log $BIN/sd-bench-gpu tests/fixtures/pipelines/tiny-sd --device cuda:0 \
      --dtype f16 --steps 3 --size 64 --runs 1 2>&1 | tail -1; RES[sanitize_unfused]=${PIPESTATUS[0]}
    grep -E "ERROR SUMMARY|LEAK SUMMARY|Invalid|out of bounds" $W/sanitizer-unfused.log | head -10
  else
    echo "compute-sanitizer not found"; RES[sanitize]=127
  fi
}

for s in ${ONLY//,/ }; do
  if declare -F step_$s >/dev/null; then step_$s; else echo "unknown step $s"; fi
done

stamp "summary"
for k in "${!RES[@]}"; do printf "  %-16s exit %s\n" "$k" "${RES[$k]}"; done
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(n):
    try:
        return json.load(open(os.path.join(out, n)))
    except Exception:
        return None
d, o, p = load("diffusers.json"), load("ours.json"), load("psnr.json")
if d and o:
    print(f"card: {d.get('card')} | ours: {o.get('card')}")
    print(f"{'metric':24s} {'diffusers':>12s} {'ours':>12s} {'ours/diffusers':>15s}")
    for k in ("total_s", "unet_step_ms", "vae_decode_ms", "text_encode_ms", "load_to_first_step_s",
              "peak_bytes", "peak_reserved_bytes"):
        a, b = d.get(k), o.get(k)
        r = (b / a) if a and b else float("nan")
        print(f"{k:24s} {a!s:>12} {b!s:>12} {r:15.3f}")
    print("targets: total <= 0.67x, peak <= 1.0x, load_to_first_step <= 1 s")
if p:
    print(f"PSNR ours vs diffusers: {p['psnr_db']:.2f} dB (target >= 35)")
PY
stamp "done"

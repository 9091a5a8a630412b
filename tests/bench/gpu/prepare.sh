#!/bin/bash
# Run HERE, on the machine without a GPU, before the device call of
# tests/bench/gpu/run.sh (docs/gpu-check.md).  It
#   1. builds the CUDA build (sm_90 + PTX) in $BUILD (default /tmp/build-gpu-stage),
#   2. stages the programs run.sh needs in .gpu/bin and libdiffuse-core plus
#      every runtime library they need that a CUDA/PyTorch image may lack
#      (GLib, json-glib, OpenBLAS, libcudart, ...) in .gpu/libs.tar.xz
#      (glibc, libstdc++, the driver and cuBLAS come from the GPU image),
#   3. downloads the diffusers wheel (the GPU image has torch and
#      transformers but no diffusers) into .whl:
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#          -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
# .gpu/ and .whl/ are listed in .git/info/exclude (never committed); the
# device call carries them: carry [".gpu", ".whl"].
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
EXCL=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCL")"
for d in /.gpu/ /.whl/; do grep -qxF "$d" "$EXCL" 2>/dev/null || echo "$d" >> "$EXCL"; done

B=${BUILD:-/tmp/build-gpu-stage}
if [ ! -f "$B/build.ninja" ]; then
  meson setup "$B" "$ROOT" -Dcuda=enabled -Dgst=disabled -Dhub=disabled -Dexamples=false -Dgpu_targets=90
fi
ninja -C "$B" -j2 diffuse-core/libdiffuse-core.so.0.1.0 tests/bench/gpu-ops tests/bench/sd-bench-gpu \
  tests/core/test-sd tests/core/test-sd-f16 tests/core/test-animate tests/core/test-cuda-fallback tests/core/test-safety tests/core/test-sag tests/core/test-lora tests/core/test-ip-adapter tests/core/test-sdxl

rm -rf .gpu
mkdir -p .gpu/bin .gpu/stage
cp "$B/tests/bench/gpu-ops" "$B/tests/bench/sd-bench-gpu" "$B/tests/core/test-sd" "$B/tests/core/test-sd-f16" \
   "$B/tests/core/test-animate" "$B/tests/core/test-cuda-fallback" "$B/tests/core/test-safety" "$B/tests/core/test-sag" "$B/tests/core/test-lora" "$B/tests/core/test-ip-adapter" "$B/tests/core/test-sdxl" .gpu/bin/
cp -L "$B/diffuse-core/libdiffuse-core.so.0" .gpu/stage/
for lib in $(ldd .gpu/bin/* .gpu/stage/libdiffuse-core.so.0 | awk '/=>/ && $3 ~ /^\// {print $3}' | sort -u); do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libcuda.so*|libcublas*|libstdc++*|libgcc_s*) ;;
    *) cp -L "$lib" .gpu/stage/ ;;
  esac
done
tar -cJf .gpu/libs.tar.xz -C .gpu/stage .
rm -rf .gpu/stage
if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata==10.2.0
fi
du -sh .gpu .whl
echo "tracked + untracked tree (must stay under 64 MiB with .gpu and .whl):"
git ls-files -co --exclude-standard -z | du -ch --files0-from=- 2>/dev/null | tail -1

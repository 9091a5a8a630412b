#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + libFuzzer, the library
# instrumented too) in their own build folder and runs the safetensors
# target for a short time over a seed corpus made of the fixture files.
#   FUZZ_SECONDS (default 10), FUZZ_BUILD (default build-fuzz), FUZZ_JOBS
#   (ninja -j, default ninja's)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${FUZZ_SECONDS:-10}"
BUILD="${FUZZ_BUILD:-build-fuzz}"
if [ ! -f "$BUILD/build.ninja" ]; then
  CC=clang meson setup "$BUILD" \
    -Dfuzz=true -Dgst=disabled -Dcuda=disabled -Dhub=disabled -Dexamples=false \
    -Dbuildtype=debugoptimized -Db_sanitize=address -Db_lundef=false \
    -Dc_args=-fsanitize=fuzzer-no-link
fi
ninja -C "$BUILD" ${FUZZ_JOBS:+-j "$FUZZ_JOBS"} tests/fuzz/fuzz-safetensors
# seed corpus: every safetensors fixture and the small PyTorch checkpoints
# (copied: libFuzzer adds new inputs to the first corpus folder)
CORPUS="$BUILD/fuzz-corpus-safetensors"
mkdir -p "$CORPUS"
i=0
while IFS= read -r -d '' f; do
  cp "$f" "$CORPUS/seed-$i-$(basename "$f")"
  i=$((i + 1))
done < <(find tests/fixtures \( -name '*.safetensors' -o -name '*.bin' \) -type f -size -256k -print0 | sort -z)
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
"$BUILD/tests/fuzz/fuzz-safetensors" -max_total_time="$SECONDS_TO_RUN" -max_len=65536 -rss_limit_mb=2048 \
  -timeout=10 -print_final_stats=1 "$CORPUS"

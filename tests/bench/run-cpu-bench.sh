#!/bin/sh
# Runs the CPU op benchmark of diffuse-core (bench-ops) and the same ops in
# torch (bench_ops_torch.py): same shapes, same thread count, and prints the
# ratio table (diffuse / torch: below 1 means diffuse-core is faster).
# The two sides alternate op by op (never at the same time), so a change of
# machine load in the middle of the run hits both sides of a row alike.
#
#   tests/bench/run-cpu-bench.sh [BUILD_DIR]      (default: build)
#   env: THREADS (default 2), REPS (default 5), FILTER (substring of op names),
#        PYTHON (default python3)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
build=${1:-build}
threads=${THREADS:-2}
reps=${REPS:-5}
python=${PYTHON:-python3}
bench="$build/tests/bench/bench-ops"
if [ ! -x "$bench" ]; then
  echo "run-cpu-bench: $bench not found (build first: meson setup $build && ninja -C $build)" >&2
  exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

"$bench" --list ${FILTER:+--filter "$FILTER"} | cut -f1 > "$tmp/names"
: > "$tmp/diffuse.tsv"
: > "$tmp/torch.tsv"
while read -r name; do
  OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads \
    "$bench" --threads "$threads" --reps "$reps" --only "$name" | grep -v '^#' >> "$tmp/diffuse.tsv" || true
  OMP_NUM_THREADS=$threads \
    "$python" "$here/bench_ops_torch.py" --threads "$threads" --reps "$reps" --only "$name" | grep -v '^#' >> "$tmp/torch.tsv" || true
done < "$tmp/names"

echo "# diffuse-core: $bench; torch: $("$python" -c 'import torch; print(torch.__version__)')"
echo "# fp32, CPU, $threads threads each side, median of $reps after 1 warm-up; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
awk -F '\t' '
  FNR == NR { t[$1] = $2; tm[$1] = $3; tg[$1] = $4; next }
  {
    if (!header++) {
      printf "| %-32s | %11s | %11s | %6s | %9s | %9s | %6s | %12s | %11s |\n", "op", "diffuse ms", "torch ms", "ratio",
             "diff. min", "torch min", "ratio", "diffuse GF/s", "torch GF/s"
      printf "|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n", "----------------------------------", "-------------", "-------------",
             "--------", "-----------", "-----------", "--------", "--------------", "-------------"
    }
    ratio = ($1 in t && t[$1] > 0) ? sprintf("%.2f", $2 / t[$1]) : "n/a"
    mratio = ($1 in tm && tm[$1] > 0) ? sprintf("%.2f", $3 / tm[$1]) : "n/a"
    printf "| %-32s | %11.1f | %11s | %6s | %9.1f | %9s | %6s | %12s | %11s |\n", $1, $2,
           ($1 in t) ? sprintf("%.1f", t[$1]) : "n/a", ratio, $3, ($1 in tm) ? sprintf("%.1f", tm[$1]) : "n/a", mratio,
           ($4 > 0 ? $4 : "-"), (($1 in tg) && tg[$1] > 0 ? tg[$1] : "-")
  }' "$tmp/torch.tsv" "$tmp/diffuse.tsv"
echo "(ratio = diffuse / torch, of the medians and of the minima; GF/s from the medians)"

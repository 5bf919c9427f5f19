#!/usr/bin/env bash
# The one script to run on a lent GPU machine (see ../shared/GPU.md), from the repo root, with
# .deps carried (bench/prepare_device_deps.sh made it here):
#   build for sm_90 with all cores -> GPU + CPU tests -> compute-sanitizer memcheck and
#   racecheck on the CUDA tests -> benchmarks; a short table on stdout, full logs under $OUT.
# Budget: well under 8 minutes, so a second run fits in one lease.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
build=build-gpu
jobs=$(nproc)
declare -a table
row() { table+=("$(printf '%-34s %s' "$1" "$2")"); echo "[$(date +%T)] $1: $2"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    >"$OUT/gpu.txt" 2>&1
row "gpu" "$(tail -n 1 "$OUT/gpu.txt")"
row "commit" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+dirty')"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
if cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DCMAKE_PREFIX_PATH="$PWD/.deps/prefix" >"$OUT/configure.log" 2>&1 &&
    cmake --build "$build" -j "$jobs" >"$OUT/build.log" 2>&1; then
    row "build (sm_90)" "ok"
else
    row "build (sm_90)" "FAILED (see configure.log / build.log)"
    printf '%s\n' "${table[@]}" | tee "$OUT/summary.txt"
    exit 1
fi

ctest --test-dir "$build" -j 8 --output-on-failure >"$OUT/ctest.log" 2>&1
row "ctest (all)" "$(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -n 1)"
"$build/tests/sf_tests" --gtest_filter='Cuda*' >"$OUT/gpu_tests.log" 2>&1
row "GPU tests" "$(grep -cE '^\[       OK ' "$OUT/gpu_tests.log") ok, $(grep -cE '^\[  FAILED  \] [A-Z]' "$OUT/gpu_tests.log") failed, $(grep -cE '^\[  SKIPPED \] [A-Z]' "$OUT/gpu_tests.log") skipped"

PATH=$PATH:/usr/local/cuda/bin
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        timeout 100 compute-sanitizer --tool "$tool" --error-exitcode 3 \
            "$build/tests/sf_tests" --gtest_filter='Cuda*' >"$OUT/sanitizer_$tool.log" 2>&1
        rc=$?
        row "compute-sanitizer $tool" "$([ $rc -eq 0 ] && echo clean || echo "rc=$rc")"
    done
else
    row "compute-sanitizer" "not found"
fi

for b in bench_norms bench_elementwise bench_attention; do
    if [[ -x "$build/$b" ]]; then
        timeout 120 "$build/$b" >"$OUT/$b.log" 2>&1
        row "$b" "rc=$? (table in $b.log)"
    fi
done

if command -v python3 >/dev/null; then
    timeout 120 python3 bench/peer_attention.py >"$OUT/peer_attention.log" 2>&1
    row "peer_attention (torch SDPA)" "rc=$? (table in peer_attention.log)"
fi

"$build/bench_cpu_forward" --requests 8 --len 256 --decode 32 >"$OUT/bench_cpu_forward.log" 2>&1
row "bench_cpu_forward (host CPU)" "$(grep prefill "$OUT/bench_cpu_forward.log" | awk '{print $(NF-5), "tok/s prefill"}')"

echo
printf '%s\n' "${table[@]}" | tee "$OUT/summary.txt"
for b in bench_norms bench_elementwise bench_attention peer_attention; do
    [[ -f "$OUT/$b.log" ]] && { echo; echo "== $b"; cat "$OUT/$b.log"; }
done

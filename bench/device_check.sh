#!/usr/bin/env bash
# The one script to run on a lent GPU machine (see ../shared/GPU.md), from the repo root, with
# .deps carried (bench/prepare_device_deps.sh made it here):
#   bench/device_check.sh quick   build the tests, the engine bench and the CLI for sm_90, run
#                                 the GPU tests, one small end-to-end config and the CLI's
#                                 --device cuda smoke test (about 2.5 minutes)
#   bench/device_check.sh [full]  build everything, GPU + CPU tests, compute-sanitizer memcheck
#                                 and racecheck on small filters, kernel benchmarks with their
#                                 peers (torch SDPA: cuDNN, flash), the end-to-end engine bench
#                                 and its transformers peer, continuous against static
#                                 batching, the training-step bench (well under 8 minutes)
# A short table goes to stdout; under $OUT (at most 8 files come back from the device tool):
# summary.txt, the GPU-test and end-to-end logs, and logs.tar.gz with every log.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-full}
DEST=${OUT:-/tmp/device_check}
OUT=$(mktemp -d /tmp/device_check_logs.XXXXXX)  # every log; copied to $DEST at the end
mkdir -p "$DEST"
build=build-gpu
jobs=$(nproc)
declare -a table
# After every row the logs so far are copied to $DEST, so a run cut short by its time limit
# still brings back everything it did.
snapshot() {
    printf '%s\n' "${table[@]}" >"$OUT/summary.txt"
    tar czf "$DEST/logs.tar.gz" -C "$OUT" . 2>/dev/null
    for f in summary.txt gpu_tests.log gpu_tests_wgmma.log gpu_tests_wgmma_ws.log \
        bench_engine.log peer_e2e.log bench_attention.log; do
        [[ -f "$OUT/$f" ]] && cp "$OUT/$f" "$DEST/"
    done
}
row() {
    table+=("$(printf '%-34s %s' "$1" "$2")")
    echo "[$(date +%T)] $1: $2"
    snapshot
}
finish() {
    echo
    printf '%s\n' "${table[@]}"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    >"$OUT/gpu.txt" 2>&1
row "gpu" "$(tail -n 1 "$OUT/gpu.txt")"
row "commit" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+dirty')"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
targets=()
[[ $mode == quick ]] && targets=(--target sf_tests bench_engine sysformer_cli)
if cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DCMAKE_PREFIX_PATH="$PWD/.deps/prefix" >"$OUT/configure.log" 2>&1 &&
    cmake --build "$build" -j "$jobs" "${targets[@]}" >"$OUT/build.log" 2>&1; then
    row "build (sm_90, $mode)" "ok"
else
    row "build (sm_90, $mode)" "FAILED (see configure.log / build.log)"
    tail -n 30 "$OUT/build.log"
    finish
    exit 1
fi

declare -A tests_rc  # by log name: what each gpu_tests run returned
gpu_tests() {  # $1: gtest filter, $2: log name, $3: timeout
    timeout "$3" "$build/tests/sf_tests" --gtest_filter="$1" >"$OUT/$2.log" 2>&1
    local rc=$?
    tests_rc[$2]=$rc
    row "GPU tests $1" "rc=$rc: $(grep -cE '^\[       OK ' "$OUT/$2.log") ok, $(grep -cE '^\[  FAILED  \] [A-Z]' "$OUT/$2.log") failed, $(grep -cE '^\[  SKIPPED \] [A-Z]' "$OUT/$2.log") skipped"
    grep -E '^\[  FAILED  \] [A-Z]' "$OUT/$2.log" | sort -u | head -n 20
}

# A fault on the device is sticky: every later test of the process fails with it; a crash or a
# hang ends the run with the rest untested. After such a run ($1: its filter, $2: its log
# name), each suite that did not pass whole runs again in a process of its own (within 100 s
# in all), so that the first failing suite is the culprit and the others say whether they
# pass alone. Logs: $2.isolated.<suite>.log.
sticky='illegal memory access|misaligned address|unspecified launch failure|illegal instruction|device-side assert|an illegal'
isolate() {
    local log="$OUT/$2.log" rc=${tests_rc[$2]:-0}
    [[ $rc -eq 0 ]] && return 0
    if ! grep -qE "$sticky" "$log" && [[ $rc -ne 124 && $rc -lt 128 ]]; then return 0; fi
    local neg="" suite="" line s
    [[ $1 == *-* ]] && neg="-${1#*-}"
    declare -A listed=() passed=()
    while IFS= read -r line; do
        if [[ $line != " "* ]]; then
            suite=${line%.}
            listed[$suite]=0
        elif [[ -n $suite ]]; then
            listed[$suite]=$((listed[$suite] + 1))
        fi
    done < <("$build/tests/sf_tests" --gtest_list_tests --gtest_filter="$1" 2>/dev/null)
    while read -r s; do
        passed[$s]=$((${passed[$s]:-0} + 1))
    done < <(grep -E '^\[       OK \] ' "$log" | sed -E 's/^\[       OK \] ([^.]+)\..*/\1/')
    local n=0 ok=0 first="" deadline=$((SECONDS + 100))
    for s in "${!listed[@]}"; do
        [[ ${passed[$s]:-0} -ge ${listed[$s]} ]] && continue
        if ((SECONDS >= deadline)); then
            echo "isolate: out of time before $s"
            continue
        fi
        n=$((n + 1))
        if timeout 45 "$build/tests/sf_tests" --gtest_filter="$s.*$neg" \
            >"$OUT/$2.isolated.${s//\//_}.log" 2>&1; then
            ok=$((ok + 1))
        else
            first+=" $s"
        fi
    done
    row "  isolated reruns ($2)" "$ok of $n suites pass alone; still failing:${first:- none}"
}

# The wgmma kernels have never run on a GPU: a fault there would poison the CUDA context of
# every later test in the same process (and a warp-specialized kernel whose barriers never
# complete hangs until the timeout), so each kernel's tests run in a process of their own,
# after the others.
wgmma_tests='CudaWgmmaProducts.*:*/sm90:*/sm90_n96:*/sm90_n64:*WgmmaAttention*'
ws_tests='*/sm90_ws:*/sm90_ws_n96:*/sm90_ws_n64:*WgmmaWs*'
if [[ $mode == quick ]]; then
    gpu_tests "Cuda*:-$wgmma_tests:$ws_tests" gpu_tests 200
    isolate "Cuda*:-$wgmma_tests:$ws_tests" gpu_tests
    grep -B 3 -A 12 -E 'Failure|error:' "$OUT/gpu_tests.log" | head -n 150
    gpu_tests "$wgmma_tests" gpu_tests_wgmma 60
    grep -B 3 -A 12 -E 'Failure|error:' "$OUT/gpu_tests_wgmma.log" | head -n 100
    gpu_tests "$ws_tests" gpu_tests_wgmma_ws 60
    grep -B 3 -A 12 -E 'Failure|error:' "$OUT/gpu_tests_wgmma_ws.log" | head -n 60
    timeout 90 "$build/bench_engine" --configs smollm2-135m --requests 8 --prompt 256 \
        --system 32 --user 160 --decode 8 --repeats 3 --top-logprobs 5 \
        >"$OUT/bench_engine.log" 2>&1
    row "bench_engine (smollm2, small)" "rc=$?"
    # the CLI's --device cuda paths on random models (about 20 s on the emulator's shapes)
    timeout 90 tests/cli_cuda_smoke.sh "$build/sysformer" >"$OUT/cli_cuda_smoke.log" 2>&1
    row "cli_cuda_smoke" "rc=$? $(tail -n 1 "$OUT/cli_cuda_smoke.log")"
    grep FAIL "$OUT/cli_cuda_smoke.log" | head -n 20
    cat "$OUT/bench_engine.log"
    finish
    exit 0
fi

# The CPU tests run in CI on every change; here only the CLI smoke tests, for their GPU parts
# (cli_cuda_smoke: every command's --device cuda path on random models).
ctest --test-dir "$build" -R cli_ --output-on-failure >"$OUT/ctest.log" 2>&1
row "ctest cli_smoke, cli_cuda_smoke" "$(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -n 1)"
gpu_tests "Cuda*:-$wgmma_tests:$ws_tests" gpu_tests 200
isolate "Cuda*:-$wgmma_tests:$ws_tests" gpu_tests
gpu_tests "$wgmma_tests" gpu_tests_wgmma 60
gpu_tests "$ws_tests" gpu_tests_wgmma_ws 60
# The serving-stack demo, as an integrator builds it: install, find_package, run.
{ cmake --install "$build" --prefix "$build/install" &&
  cmake -S tests/consumer -B "$build/consumer" \
        -DCMAKE_PREFIX_PATH="$PWD/$build/install;$PWD/.deps/prefix" &&
  cmake --build "$build/consumer" &&
  timeout 60 "$build/consumer/serving_example" "$build/consumer/serving_model"; } \
    >"$OUT/serving_example.log" 2>&1
row "serving_example (installed, guard-only engine on a lent table)" \
    "rc=$?: $(tail -n 1 "$OUT/serving_example.log")"

PATH=$PATH:/usr/local/cuda/bin
if command -v compute-sanitizer >/dev/null; then
    timeout 75 compute-sanitizer --tool memcheck --error-exitcode 3 "$build/tests/sf_tests" \
        --gtest_filter='CudaEngine*:*CudaAttention.Slotted*' >"$OUT/sanitizer_memcheck.log" 2>&1
    rc=$?
    row "compute-sanitizer memcheck (engine)" "$([ $rc -eq 0 ] && echo clean || echo "rc=$rc")"
    timeout 45 compute-sanitizer --tool racecheck --error-exitcode 3 "$build/tests/sf_tests" \
        --gtest_filter='CudaNorms.RmsNorm*:*CudaAttention.Bidirectional*' \
        >"$OUT/sanitizer_racecheck.log" 2>&1
    rc=$?
    row "compute-sanitizer racecheck (small)" "$([ $rc -eq 0 ] && echo clean || echo "rc=$rc")"
else
    row "compute-sanitizer" "not found"
fi

# The headline pair first: the end-to-end engine and its transformers peer. Their logs are
# written straight to $DEST as well, so a run the device tool cuts short still brings back
# what they printed. One process per config, the small model first: a fault on the device
# (which no later call in that process survives) costs one config, not the rest. (decode
# again with log-probabilities and 5 alternatives a token: what asking for them costs)
: >"$OUT/bench_engine.log"
: >"$DEST/bench_engine.log"
engine_rcs=""
for cfg in smollm2-135m llama3.1-8b mistral-7b phi3.5-mini; do
    timeout 60 "$build/bench_engine" --configs "$cfg" --top-logprobs 5 2>&1 |
        tee -a "$DEST/bench_engine.log" >>"$OUT/bench_engine.log"
    engine_rcs+=" $cfg=${PIPESTATUS[0]}"
done
row "bench_engine" "rc:$engine_rcs; $(grep -c '^SUMMARY .*prefill_tok_s' "$OUT/bench_engine.log")/4 configs"
PYTHONUNBUFFERED=1 timeout 240 python3 bench/peer_e2e.py 2>&1 | tee "$DEST/peer_e2e.log" \
    >"$OUT/peer_e2e.log"
row "peer_e2e (transformers)" "rc=${PIPESTATUS[0]}"
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
# The same 8B prefill with every attention on each wgmma kernel (sf_cuda_engine_options.attention):
# what choosing one by default would change end to end.
# (not after its kernel's GPU tests failed: a hang would cost the whole timeout)
for k in wgmma wgmma_ws; do
    if [[ ${tests_rc[gpu_tests_$k]:-0} -ne 0 ]]; then
        row "bench_engine (llama3.1-8b, $k)" "skipped: its GPU tests returned ${tests_rc[gpu_tests_$k]}"
        continue
    fi
    timeout 60 "$build/bench_engine" --configs llama3.1-8b --attention $k \
        >"$OUT/bench_engine_$k.log" 2>&1
    row "bench_engine (llama3.1-8b, $k)" "rc=$?"
done
# Continuous batching against static batches (sf_generate_cuda over 64 guarded requests with
# reply limits 1..64 on 16 slots, against batches of 16 in turn), then the same requests
# arriving over time at a generation session (time to first token, time per output token).
timeout 60 "$build/bench_engine" --configs smollm2-135m,llama3.1-8b --requests 16 --prompt 256 \
    --system 32 --user 160 --decode 64 --repeats 2 --serve 64 >"$OUT/bench_serve.log" 2>&1
row "bench_engine --serve (continuous batching)" \
    "rc=$? $(grep -c '^SUMMARY serve ' "$OUT/bench_serve.log")/2 configs, $(grep -c '^SUMMARY serve_online ' "$OUT/bench_serve.log")/2 online"
# One Sysformer training step at SmolLM2-135M shapes (1008 tokens), GPU rows only (the CPU rows
# are measured on the developer machine; here they would cost a minute of device time).
timeout 90 "$build/bench_train" --devices cuda >"$OUT/bench_train.log" 2>&1
row "bench_train" "rc=$? $(grep -c '^SUMMARY train .*step_s=' "$OUT/bench_train.log")/3 rows"

finish
grep -H '^SUMMARY' "$OUT/bench_engine.log" "$OUT/bench_engine_wgmma.log" \
    "$OUT/bench_engine_wgmma_ws.log" "$OUT/bench_serve.log" "$OUT/bench_train.log" \
    "$OUT/peer_e2e.log" | sed "s|^$OUT/||"
for b in bench_norms bench_elementwise bench_attention peer_attention bench_engine bench_serve \
    bench_train peer_e2e; do
    [[ -f "$OUT/$b.log" ]] && { echo; echo "== $b"; cat "$OUT/$b.log"; }
done

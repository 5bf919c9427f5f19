#!/usr/bin/env bash
# Runs a GPU test file on the CPU: the kernels of kernels/ and their real launchers, compiled
# as host C++ on the fiber emulator (shim.h), against the same CPU twins and bounds as on a GPU.
# See README.md for what it can and cannot show.
#
#   tools/simt/run.sh SUITE [gtest args...]
#     elementwise  tests/test_cuda_elementwise.cpp: conversion, embedding/splice, RoPE,
#                  activations, argmax and sampling (sf_sample as the twin)
#     norms        tests/test_cuda_norms.cpp: RMSNorm and LayerNorm, with the fused residual
#     backward     tests/test_cuda_backward.cpp without its cuBLASLt section: norms, RoPE,
#                  activations and cross-entropy backward
#     optim        tests/test_cuda_optim.cpp: gradient norm, clip coefficient, AdamW
#     decode       tests/test_cuda_attention.cpp's argument and split-decode tests, behind a
#                  stand-in for attention.cu's entry point (the tiled mma kernel cannot run here)
#
#   env: EMU_MODE=0..3 one schedule, 4 (default) rotate per launch; EMU_ULP=n move expf, rsqrtf,
#        sincosf, erfcf results by up to n ulp (within CUDA's documented bounds); EMU_FMA=1
#        contract a * b + c in the kernels as nvcc does by default; EMU_LAUNCHES=1 list the
#        kernel variants each test launched; SAN=asan|ubsan; KSRC=dir kernel sources (a copy
#        with a planted bug); KEEP=1 keep the build directory.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
KSRC=${KSRC:-$REPO/kernels}
suite=${1:-}
[ -n "$suite" ] || { sed -n '5,16p' "$0"; exit 2; }
shift

case "$suite" in
    elementwise)
        kernels=(sampling embedding convert rope activations guard)
        test=test_cuda_elementwise.cpp
        twins=(host/cpu/embedding.c host/cpu/rope.c host/cpu/activations.c) ;;
    backward)
        kernels=(loss rmsnorm layernorm rope activations)
        test=test_cuda_backward.cpp
        twins=(host/cpu/rmsnorm.c host/cpu/layernorm.c host/cpu/rope.c host/cpu/activations.c
               host/cpu/softmax.c) ;;
    norms)
        kernels=(rmsnorm layernorm)
        test=test_cuda_norms.cpp
        twins=(host/cpu/rmsnorm.c host/cpu/layernorm.c host/cpu/activations.c) ;;
    optim)
        kernels=(optim)
        test=test_cuda_optim.cpp
        twins=() ;;  # sf_clip_grad_norm and sf_adamw_step, lifted out of trainer.c below
    decode)
        kernels=(attention_decode)
        test=test_cuda_attention.cpp
        twins=(host/cpu/attention.c host/cpu/softmax.c)
        [ $# -gt 0 ] || set -- --gtest_filter='CudaAttentionArgs*:CudaAttention.DecodeSplit*' ;;
    *) echo "unknown suite: $suite" >&2; exit 2 ;;
esac

B=$(mktemp -d "${TMPDIR:-/tmp}/simt.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$B"' EXIT
mkdir -p "$B/t"
# A snapshot of the sources: the tree may be edited while this runs.
cp "$KSRC"/*.h "$KSRC"/*.cuh "$REPO"/tests/cuda_test_util.h "$REPO"/tests/test_util.h "$B/t/"
for k in "${kernels[@]}"; do python3 "$HERE/rewrite.py" "$KSRC/$k.cu" "$B/t/$k.cu" 2>/dev/null; done
[ -f "$B/t/norms_common.cuh" ] && python3 "$HERE/rewrite.py" "$B/t/norms_common.cuh" "$B/t/norms_common.cuh" 2>/dev/null
sources=()
for k in "${kernels[@]}"; do sources+=("$B/t/$k.cu"); done
case "$suite" in
    backward) python3 "$HERE/cut_gemm_tests.py" "$REPO/tests/$test" "$B/t/$test" ;;
    decode)
        cp "$REPO/tests/$test" "$B/t/"
        # attention.cu's argument checks and entry point (with its decode dispatch), minus the
        # launch of the tiled kernel, which reports SF_ERR_UNSUPPORTED instead
        python3 - "$KSRC/attention.cu" "$B/t/attention_entry.cu" <<'PY'
import sys
s = open(sys.argv[1]).read()
body = s[s.index('extern "C" sf_status sf_attention_check_shapes('):]
i = body.index('    sf_nvtx_range range("sf_cuda_attention_bf16");')
j = body.index('\n}', i)
body = body[:i] + '    return sf_fail(SF_ERR_UNSUPPORTED, "simt: no tiled attention kernel");' + body[j:]
open(sys.argv[2], 'w').write(
    '#include <math.h>\n#include <stdint.h>\n#include "attention.h"\n#include "cuda_check.cuh"\n'
    'namespace { bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; } }\n' + body)
PY
        sources+=("$B/t/attention_entry.cu") ;;
    *) cp "$REPO/tests/$test" "$B/t/" ;;
esac
# sf_sample, the sampler's twin, lifted out of host/model/generate.c (the rest of the file
# needs the whole library)
if [ "$suite" = elementwise ]; then
    {
        printf '#include <math.h>\n#include <stdlib.h>\n#include "core/error.h"\n'
        printf '#include "core/rng.h"\n#include "sysformer.h"\n'
        awk '/^typedef struct scored/ {on=1} on {print} on && /^sf_status sf_sample\(/ {f=1} f && /^}/ {exit}' \
            "$REPO/host/model/generate.c"
    } >"$B/t/sf_sample.c"
    grep -q '^sf_status sf_sample(' "$B/t/sf_sample.c" || { echo "cannot find sf_sample" >&2; exit 2; }
    twins+=("$B/t/sf_sample.c")
fi
# sf_clip_grad_norm and sf_adamw_step, the optimizer's twins, with the defines above them (the
# rest of host/train/trainer.c needs the whole library)
if [ "$suite" = optim ]; then
    python3 - "$REPO/host/train/trainer.c" "$B/t/optim_twins.c" <<'PY'
import sys
s = open(sys.argv[1]).read()
i = s.rindex('/* The optimizer runs once per step', 0, s.index('#define NORM_BLOCK'))
j = s.index('\n}\n', s.index('void sf_adamw_step(')) + 3
open(sys.argv[2], 'w').write('#include <math.h>\n#include "cpu/ops.h"\n#include "train/trainer.h"\n\n'
                             + s[i:j])
PY
    twins+=("$B/t/optim_twins.c")
fi

SANF=()
case "${SAN:-}" in
    ubsan) SANF=(-fsanitize=undefined -fno-sanitize-recover=undefined) ;;
    asan) SANF=(-fsanitize=address)
          export ASAN_OPTIONS=detect_stack_use_after_return=0:detect_leaks=0 ;;
    "") ;;
    *) echo "SAN must be asan or ubsan" >&2; exit 2 ;;
esac
KFLAGS=()
[ "${EMU_FMA:-0}" = 1 ] && KFLAGS=(-O2 -mfma -ffp-contract=fast)
CXX=(nice -n 19 g++ -std=c++20 -O1 -g -fno-strict-aliasing -pthread -Wall -Wno-unknown-pragmas
     -Wno-unused-function -Wno-unused-variable "${SANF[@]}" -include "$HERE/shim.h" -I"$B/t"
     -I"$HERE/stubs" -I"$REPO/include" -I"$REPO/host")
pids=()
for src in "${sources[@]}"; do
    n=$(basename "$src" .cu)
    "${CXX[@]}" "${KFLAGS[@]}" -DEMU_DEVICE_MATH -x c++ -c "$src" -o "$B/k_$n.o" 2>"$B/k_$n.log" &
    pids+=($!)
done
"${CXX[@]}" -c "$B/t/$test" -o "$B/test.o" 2>"$B/test.log" & pids+=($!)
"${CXX[@]}" -c "$HERE/emu_main.cpp" -o "$B/main.o" 2>"$B/main.log" & pids+=($!)
for c in "${twins[@]}"; do
    [[ $c = /* ]] || c=$REPO/$c
    n=$(basename "$c" .c)
    nice -n 19 gcc -std=c11 -O2 -g "${SANF[@]}" -I"$REPO/include" -I"$REPO/host" -c "$c" \
        -o "$B/twin_$n.o" 2>"$B/twin_$n.log" & pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
for l in "$B"/*.log; do [ -s "$l" ] && { echo "== $(basename "$l")"; head -n 30 "$l"; }; done
[ $fail = 0 ] || { echo "simt: build failed"; exit 2; }
nice -n 19 g++ "${SANF[@]}" -pthread "$B"/*.o -o "$B/harness" -lgtest -lm
echo "simt $suite: EMU_MODE=${EMU_MODE:-4} EMU_ULP=${EMU_ULP:-0} EMU_FMA=${EMU_FMA:-0} SAN=${SAN:-none}"
nice -n 19 timeout "${TIMEOUT:-1800}" "$B/harness" "$@"

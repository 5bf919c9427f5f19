#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   1. the Release build (CUDA kernels too when nvcc exists), every GoogleTest test (the GPU
#      ones skip without a GPU) and the kernels' tests on the CPU emulator (tools/simt);
#   2. the CPU tests again under AddressSanitizer + UndefinedBehaviorSanitizer;
#   3. install, then build and run an integrator's project against find_package(sysformer).
# Usage: scripts/test.sh [BUILD_ROOT]     (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-build}
jobs=$(nproc)

scripts/setup.sh --tests
# The real model for the SmolLM2 tests (they skip, saying so, if it cannot be fetched).
weights/fetch_smollm2.sh >/dev/null || echo "warning: SmolLM2 not fetched; its tests will skip"
# ctest runs tests in parallel; one BLAS/OpenMP thread per test process avoids oversubscription.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}

echo "== 1/3 release build and tests"
cmake -S . -B "$root" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$root" -j "$jobs"
# Where OpenBLAS gives this CPU its generic kernels, the CLI and sf_tests start again with
# OPENBLAS_CORETYPE naming the CPU's own (host/core/native_blas.h); the CLI's choice, exported
# once here, spares each of ctest's test processes that second start.
if [[ -z ${OPENBLAS_CORETYPE:-} ]]; then
    core=$("$root/sysformer" version | sed -n 's/^CPU matmul: .*(OPENBLAS_CORETYPE=\(.*\))$/\1/p')
    if [[ -n $core ]]; then export OPENBLAS_CORETYPE=$core; fi
fi
ctest --test-dir "$root" --output-on-failure -j "$jobs"

echo "== 2/3 sanitizer build (ASan + UBSan) and CPU tests"
# With clang where it builds and runs a sanitized program (its UBSan also checks arithmetic on
# NULL pointers, which GCC's does not), else with the default compiler.
san_cc=()
san_with="the default compiler"
probe=$(mktemp -d)
if command -v clang++ >/dev/null &&
    echo 'int main(void) { return 0; }' >"$probe/p.c" &&
    clang -fsanitize=address,undefined "$probe/p.c" -o "$probe/p" 2>/dev/null && "$probe/p"; then
    san_cc=(-DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++)
    san_with=clang
fi
rm -rf "$probe"
echo "sanitizer build with $san_with"
# A directory configured with the other compiler starts afresh (CMake, reconfiguring for a new
# compiler, would drop the options given here).
[[ $(cat "$root-asan/sanitizer-compiler" 2>/dev/null) == "$san_with" ]] || rm -rf "$root-asan"
mkdir -p "$root-asan"
echo "$san_with" >"$root-asan/sanitizer-compiler"
cmake -S . -B "$root-asan" "${san_cc[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSF_SANITIZE=ON \
      -DSF_CUDA=OFF -DSF_BUILD_CLI=OFF >/dev/null
cmake --build "$root-asan" -j "$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir "$root-asan" --output-on-failure -j "$jobs"

echo "== 3/3 find_package(sysformer) from an integrator's project"
rm -rf "$root/install" "$root/consumer"
cmake --install "$root" --prefix "$root/install" >/dev/null
cmake -S tests/consumer -B "$root/consumer" -DCMAKE_PREFIX_PATH="$PWD/$root/install" >/dev/null
cmake --build "$root/consumer"
"$root/sysformer" random-model --out "$root/consumer/model" >/dev/null
"$root/consumer/consumer" "$root/consumer/model"
# The serving-stack example (built when the install has CUDA; without a GPU it says so).
if [[ -x "$root/consumer/serving_example" ]]; then
    "$root/consumer/serving_example" "$root/consumer/serving_model"
fi

echo "== all test stages passed"

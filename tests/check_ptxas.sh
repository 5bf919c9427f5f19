#!/usr/bin/env bash
# ptxas's report on the Hopper attention kernels (kernels/attention_sm90.cu, built for sm_90a):
# no register spills, and none of ptxas's "Potential Performance Loss" notes (C75xx: a wgmma
# serialized, for one, where it sits on a path ptxas sees as divergent). Both leave the results
# right and show only as a slower kernel on a GPU, so no other test here would notice them.
#   tests/check_ptxas.sh NVCC SOURCE_DIR [LOG]
# LOG: the build's own report (CMakeLists.txt keeps it, cmake/keep_stderr.sh), read when it
# exists; else the file is compiled here with -Xptxas -v.
set -euo pipefail
nvcc=$1
src=$2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [ -n "${3:-}" ] && [ -s "$3" ]; then
    echo "ptxas report: $3 (the build's)"
    cp "$3" "$out/log"
elif ! "$nvcc" -std=c++17 -O3 -arch=sm_90a -cubin -DSF_HAVE_CUDA=1 -DSF_SM90A=1 -D_GNU_SOURCE \
        -I"$src/include" -I"$src/host" -I"$src/kernels" -Xptxas -v \
        -o "$out/attention_sm90.cubin" "$src/kernels/attention_sm90.cu" >"$out/log" 2>&1; then
    cat "$out/log"
    exit 1
fi
n=$(grep -c 'Compiling entry function' "$out/log" || true)
# The warp-specialized kernels must be allocated exactly kWsLaunchRegs = 168 registers a thread:
# their consumers' setmaxnreg.inc takes what the producer's .dec freed from the launch's
# reservation, and with fewer reserved it would wait forever (attention_sm90.cu).
ws_regs=$(awk '/Compiling entry function .*attention_sm90_ws_kernel/ { ws = 1; next }
               /Compiling entry function/ { ws = 0 }
               ws && /Used [0-9]+ registers/ {
                   match($0, /Used [0-9]+/)
                   print substr($0, RSTART + 5, RLENGTH - 5)
                   ws = 0
               }' "$out/log" | sort -u | tr '\n' ' ')
notes=$(grep -c 'Potential Performance Loss' "$out/log" || true)
spills=$(grep -cE '[1-9][0-9]* bytes spill (stores|loads)' "$out/log" || true)
echo "attention_sm90.cu: $n kernels, $notes performance notes, $spills with spills;" \
    "warp-specialized kernels at ${ws_regs:-?}registers (must be 168)"
grep -E 'Potential Performance Loss|[1-9][0-9]* bytes spill' "$out/log" || true
[ "$n" -ge 16 ] && [ "$notes" -eq 0 ] && [ "$spills" -eq 0 ] && [ "$ws_regs" = "168 " ]

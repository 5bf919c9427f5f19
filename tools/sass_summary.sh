#!/usr/bin/env bash
# What the GPU would run, read without a GPU: compiles one kernels/*.cu file for one
# architecture and prints, for each kernel in it, its SASS instruction count and the order of
# the instructions that decide a tensor-core kernel's overlap (wgmma issue and waits, barriers,
# asynchronous copies and their waits, exponentials, shuffles), consecutive repeats counted.
#
#   tools/sass_summary.sh kernels/attention_sm90.cu [90a|90|80] [filter]
# (filter: a substring of the mangled kernel name, e.g. ILi128ELi64 for <128, 64>)
#
# Needs cuobjdump and the nvdisasm it runs, which the CUDA toolkit here lacks: put them on
# PATH, or point CUOBJDUMP at cuobjdump (an nvdisasm beside it is found). PyPI has both:
# pip download --no-deps nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, unzip both wheels into
# one directory, use nvidia/cu13/bin/cuobjdump. Reading SASS is how the ex2.approx.ftz change
# and the placement of attention_sm90.cu's second wgmma wait were found; it says nothing about
# time. Where a kernel reallocates registers (setmaxnreg), it also prints the highest register
# each region names, which must stay below the count the region was given.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
src=${1:?usage: tools/sass_summary.sh kernels/FILE.cu [90a|90|80] [filter]}
arch=${2:-90a}
filter=${3:-}
NVCC=${CUDACXX:-/usr/local/cuda/bin/nvcc}
CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || true)}
if [ -z "$CUOBJDUMP" ]; then
    echo "sass_summary: no cuobjdump (see the comment at the top of $0)" >&2
    exit 2
fi
PATH=$(dirname "$CUOBJDUMP"):$PATH
if ! command -v nvdisasm >/dev/null; then
    echo "sass_summary: no nvdisasm beside cuobjdump or on PATH (see the comment at the top" \
         "of $0)" >&2
    exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
defs=(-DSF_HAVE_CUDA=1)
[ "$arch" = 90a ] && defs+=(-DSF_SM90A=1)
"$NVCC" -std=c++17 --generate-code="arch=compute_$arch,code=sm_$arch" "${defs[@]}" \
    -I"$REPO/include" -I"$REPO/kernels" -I"$REPO/host" -Xptxas -v -c "$REPO/$src" \
    -o "$tmp/k.o" 2>"$tmp/ptxas.log"
"$CUOBJDUMP" -sass "$tmp/k.o" >"$tmp/k.sass"
awk -v filter="$filter" '
    /Function : / {
        if (name != "" && (filter == "" || index(name, filter))) report()
        name = $3; n = 0; delete seq; k = 0; last = ""; nreg = 0; region = ""; next
    }
    /^[ \t]+\/\*[0-9a-f]+\*\// {
        n++
        # register reallocation (setmaxnreg): from each USETMAXREG to the first unpredicated
        # EXIT after it, the highest register named, which must stay below the count it sets
        # (what ptxas places after the last EXIT, such as the retry loops of mbarrier waits it
        # moves out of line, is counted in no region)
        if ($0 ~ /USETMAXREG/) {
            match($0, /0x[0-9a-f]+ ;/)
            region = sprintf("%s %d", $0 ~ /DEALLOC/ ? "dealloc to" : "alloc to",
                             hex(substr($0, RSTART + 2, RLENGTH - 4)))
            nreg++; regions[nreg] = region; top[nreg] = -1
        } else if (region != "" && $0 ~ /\*\/[ \t]+EXIT ;/) {
            region = ""
        } else if (region != "") {
            line_ = $0
            while (match(line_, /[^U]R[0-9]+/)) {
                r = substr(line_, RSTART + 2, RLENGTH - 2) + 0
                if (r > top[nreg]) top[nreg] = r
                line_ = substr(line_, RSTART + RLENGTH)
            }
        }
        op = ""
        for (i = 2; i <= NF; i++) if ($i !~ /^@/) { op = $i; break }
        if (op ~ /^(HGMMA|WARPGROUP|BAR|LDGSTS|DEPBAR|LDGDEPBAR|MUFU.EX2|SHFL|HMMA|LDSM)/) {
            sub(/\..*$/, "", op) ; if ($0 ~ /HGMMA/) { match($0, /HGMMA\.[0-9x]+/); op = substr($0, RSTART, RLENGTH) }
            if ($0 ~ /MUFU.EX2/) op = "MUFU.EX2"
            if ($0 ~ /WARPGROUP.DEPBAR/) { match($0, /gsb0, 0x[0-9]+/); op = "WAIT(" substr($0, RSTART + 8, RLENGTH - 8) ")" }
            if ($0 ~ /WARPGROUP.ARRIVE/) op = "ARRIVE"
            if (op == last) cnt[k]++; else { k++; seq[k] = op; cnt[k] = 1; last = op }
        }
    }
    function hex(h,   v, i) {
        v = 0
        for (i = 1; i <= length(h); i++) v = 16 * v + index("0123456789abcdef", substr(h, i, 1)) - 1
        return v
    }
    function report(   i, line) {
        printf "%s: %d instructions\n ", name, n
        line = ""
        for (i = 1; i <= k; i++) line = line sprintf(" %s%s", seq[i], cnt[i] > 1 ? "x" cnt[i] : "")
        print line
        for (i = 1; i <= nreg; i++) printf " setmaxnreg %s: up to R%d after it\n", regions[i], top[i]
    }
    END { if (name != "" && (filter == "" || index(name, filter))) report() }
' "$tmp/k.sass" | c++filt | fold -s -w 100
# registers and spills, kernel by kernel
awk -v filter="$filter" '
    /Compiling entry function/ { match($0, /function .[^ ]+. for/); name = substr($0, RSTART + 10, RLENGTH - 15) }
    /spill stores/ { spill = $0; sub(/^[ \t]+/, "", spill) }
    /Used [0-9]+ registers/ {
        if (filter == "" || index(name, filter)) {
            match($0, /Used [0-9]+ registers/)
            print name ": " substr($0, RSTART, RLENGTH) ", " spill
        }
    }
' "$tmp/ptxas.log" | c++filt

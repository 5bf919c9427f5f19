#!/usr/bin/env bash
# ptxas's report on every other kernel file (kernels/*.cu but the sm_90a attention, which
# check_ptxas.sh reads), for each architecture the library is built for: no register spills.
# A spill leaves the results right and shows only as a slower kernel on a GPU, so no other test
# here would notice it. The reports are the build's own (CMakeLists.txt: -Xptxas=-v, kept per
# object in BUILD/ptxas/ by cmake/keep_stderr.sh).
#   tests/check_ptxas_kernels.sh SOURCE_DIR PTXAS_DIR ARCHS   (ARCHS: "80;90")
set -euo pipefail
src=$1
dir=$2
IFS=';' read -r -a archs <<<"$3"
rc=0
for cu in "$src"/kernels/*.cu; do
    name=$(basename "$cu")
    [[ $name == attention_sm90.cu ]] && continue
    log=$dir/$name.o.log
    if [[ ! -f $log ]]; then
        echo "$name: no ptxas report at $log (built with this build's CMakeLists.txt?)"
        rc=1
        continue
    fi
    kernels=$(grep -c '__global__' "$cu" || true)
    line="$name:"
    for arch in "${archs[@]}"; do
        arch=${arch%%-*} # "90-real" and the like
        n=$(grep -c "Compiling entry function .* for 'sm_$arch'" "$log" || true)
        most=$(awk -v a="sm_$arch" '/Compiling entry function/ { on = index($0, "for '\''" a "'\''") > 0 }
                on && /Used [0-9]+ registers/ { match($0, /Used [0-9]+/)
                    r = substr($0, RSTART + 5, RLENGTH - 5) + 0; if (r > m) m = r }
                END { print m + 0 }' "$log")
        line="$line sm_$arch $n kernels (at most $most registers);"
        if [[ $kernels -gt 0 && $n -eq 0 ]]; then
            line="$line MISSING;"
            rc=1
        fi
    done
    spills=$(grep -cE '[1-9][0-9]* bytes spill (stores|loads)' "$log" || true)
    echo "$line $spills with spills"
    if [[ $spills -gt 0 ]]; then
        awk '/Compiling entry function/ { f = $0 } /[1-9][0-9]* bytes spill/ { print "  " f; print "  " $0 }' "$log"
        rc=1
    fi
done
exit $rc

#!/usr/bin/env bash
# A compile launcher (CMake's RULE_LAUNCH_COMPILE): runs the compile command with its standard
# error kept in LOG, and shown only if the command fails. For the builds whose -Xptxas -v
# reports tests/check_ptxas.sh reads instead of compiling the files again: the sm_90a
# attention's (one file, LOG a file) and the library's kernels (LOG a directory, ending in /:
# each .cu object's report is DIR/OBJECT.log, OBJECT the base name of the command's -o
# argument; any other compile runs untouched).
#   cmake/keep_stderr.sh LOG COMMAND...
log=$1
shift
if [[ $log == */ ]]; then
    obj=
    prev=
    for a in "$@"; do
        [[ $prev == -o ]] && obj=$(basename "$a")
        prev=$a
    done
    # only the kernels' reports are kept: other compiles run as they are, warnings shown
    [[ $obj == *.cu.o ]] || exec "$@"
    mkdir -p "$log"
    log=$log$obj.log
fi
rc=0
"$@" 2>"$log.part" || rc=$?
mv -f "$log.part" "$log"
[ "$rc" -eq 0 ] || cat "$log" >&2
exit "$rc"

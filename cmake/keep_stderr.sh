#!/usr/bin/env bash
# A compile launcher (CMake's RULE_LAUNCH_COMPILE): runs the compile command with its standard
# error kept in LOG, and shown only if the command fails. For the sm_90a attention's build,
# whose -Xptxas -v report tests/check_ptxas.sh reads from LOG instead of compiling the file
# again (about 40 s of one core).
#   cmake/keep_stderr.sh LOG COMMAND...
log=$1
shift
rc=0
"$@" 2>"$log.part" || rc=$?
mv -f "$log.part" "$log"
[ "$rc" -eq 0 ] || cat "$log" >&2
exit "$rc"

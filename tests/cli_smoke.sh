#!/usr/bin/env bash
# The sysformer CLI end to end on a random model: every subcommand once, and the exit codes of
# a few mistakes (2 for usage errors, 1 for failures the library reports).
# Usage: tests/cli_smoke.sh PATH/TO/sysformer
set -u
cli=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
expect() {  # expect CODE DESCRIPTION -- command...
    local want=$1 what=$2
    shift 3
    "$@" >"$tmp/out" 2>&1
    local got=$?
    if [[ $got -ne $want ]]; then
        echo "FAIL: $what: exit $got, want $want"
        sed 's/^/    /' "$tmp/out"
        fails=$((fails + 1))
    else
        echo "ok: $what"
    fi
}
m=$tmp/model
expect 0 "help" -- "$cli" --help
expect 2 "unknown command" -- "$cli" frobnicate
expect 0 "random-model" -- "$cli" random-model --out "$m" --seed 5
expect 0 "info" -- "$cli" info --model "$m"
expect 0 "forward, two requests" -- "$cli" forward --model "$m" --tokens 1,2,3 --tokens 4 --top 3
grep -q "request 1 (1 tokens)" "$tmp/out" || { echo "FAIL: forward output"; fails=$((fails + 1)); }
expect 1 "forward, id out of range" -- "$cli" forward --model "$m" --tokens 1,99999
grep -q "outside \[0, 512)" "$tmp/out" || { echo "FAIL: range message"; fails=$((fails + 1)); }
expect 2 "forward, bad id list" -- "$cli" forward --model "$m" --tokens 1,,x
expect 1 "forward, missing model" -- "$cli" forward --model "$tmp/none" --tokens 1
expect 0 "init" -- "$cli" init --model "$m" --out "$tmp/sf" --seed 2 --system-prompt "Be careful."
grep -q '"embedding_hash": "fnv1a64:' "$tmp/sf/sysformer.json" || { echo "FAIL: hash"; fails=$((fails + 1)); }
expect 0 "rewrite (fresh Sysformer: identity)" -- "$cli" rewrite --model "$m" --sysformer "$tmp/sf" \
    --system 5,6,7 --user 8,9 --out "$tmp/rw.safetensors"
grep -q "= 0$" "$tmp/out" || { echo "FAIL: fresh Sysformer is not the identity"; fails=$((fails + 1)); }
expect 0 "init post-LN" -- "$cli" init --model "$m" --out "$tmp/sf2" --post-ln --final-norm --activation gelu
expect 0 "forward --sysformer" -- "$cli" forward --model "$m" --sysformer "$tmp/sf2" \
    --tokens 1,5,6,7,2,8,9,3 --spans 1,3,1,2,1 --tokens 1,5,2,8,3 --spans 1,1,1,1,1
grep -q "guarded prefill" "$tmp/out" || { echo "FAIL: guarded output"; fails=$((fails + 1)); }
expect 2 "forward --sysformer without --spans" -- "$cli" forward --model "$m" --sysformer "$tmp/sf2" --tokens 1,2
expect 1 "forward, spans not adding up" -- "$cli" forward --model "$m" --sysformer "$tmp/sf2" \
    --tokens 1,2,3 --spans 1,1,1,1,1
echo "${fails} failed"
[[ $fails -eq 0 ]]

#!/usr/bin/env bash
# Refusal rates of SmolLM2-135M-Instruct with and without a Sysformer, as weights/README.md
# reports them: greedy replies (--max-new-tokens, default 32) to every prompt of
# ../shared/datasets/harmful_val.json and to a fixed 200-prompt sample of harmless_val.json
# (Python's random.Random(0).sample over the file's order), judged by `sysformer judge` (the
# string-match judge of host/eval/judge.c). "Without" means the plain default system prompt.
#   weights/eval_smollm2.sh BUILD_DIR SYSFORMER_DIR [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
cli=$1/sysformer
sf=$2
out=${3:-$(mktemp -d)}
gguf=weights/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
ds=../shared/datasets
new=${MAX_NEW_TOKENS:-32}
[[ -f $gguf ]] || { echo "run weights/fetch_smollm2.sh first" >&2; exit 1; }
[[ -d $ds ]] || { echo "needs ../shared/datasets" >&2; exit 1; }
mkdir -p "$out"
python3 - "$ds" "$out" <<'PY'
import json, random, sys
ds, out = sys.argv[1], sys.argv[2]
harmful = json.load(open(f"{ds}/harmful_val.json"))
harmless = json.load(open(f"{ds}/harmless_val.json"))
sample = random.Random(0).sample(range(len(harmless)), 200)
with open(f"{out}/harmful.jsonl", "w") as f:
    for i, x in enumerate(harmful):
        f.write(json.dumps({"id": i, "prompt": x["instruction"]}) + "\n")
with open(f"{out}/harmless.jsonl", "w") as f:
    for i in sample:
        f.write(json.dumps({"id": i, "prompt": harmless[i]["instruction"]}) + "\n")
PY
system=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['system_prompt'])" \
    "$sf/sysformer.json")
for set in harmful harmless; do
    "$cli" generate --model "$gguf" --device cpu --input "$out/$set.jsonl" \
        --output "$out/$set.plain.jsonl" --system "$system" --max-new-tokens "$new" --batch 16
    "$cli" generate --model "$gguf" --device cpu --input "$out/$set.jsonl" \
        --output "$out/$set.sysformer.jsonl" --sysformer "$sf" --max-new-tokens "$new" --batch 16
done
for set in harmful harmless; do
    for how in plain sysformer; do
        printf '%-9s %-10s ' "$set" "$how"
        "$cli" judge "$out/$set.$how.jsonl"
    done
done
echo "replies in $out"

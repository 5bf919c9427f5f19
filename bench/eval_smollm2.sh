#!/usr/bin/env bash
# The numbers of docs/EVAL.md: every method of `sysformer eval` on SmolLM2-135M-Instruct over
# the validation sets of ../shared/datasets, on the CPU.
#   bench/eval_smollm2.sh BUILD_DIR OUT_DIR [SYSFORMER_DIR] [EMBEDDER_DIR]
# Sizes (override with the environment): all harmful_val.json prompts, a seeded sample of
# SAFE_N (200) harmless_val.json prompts, and the first JB_N (13) harmful prompts wrapped in
# each of bench/jailbreaks.json's wrappers; greedy, MAX_NEW_TOKENS (32) new tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:?usage: bench/eval_smollm2.sh BUILD_DIR OUT_DIR [SYSFORMER_DIR] [EMBEDDER_DIR]}
out=${2:?usage: bench/eval_smollm2.sh BUILD_DIR OUT_DIR [SYSFORMER_DIR] [EMBEDDER_DIR]}
sf=${3:-weights/smollm2-sysformer}
emb=${4:-weights/smollm2-system-embedder}
gguf=weights/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
ds=../shared/datasets
[[ -f $gguf ]] || { echo "run weights/fetch_smollm2.sh first" >&2; exit 1; }
[[ -d $ds ]] || { echo "needs ../shared/datasets (the prompt sets); skipped" >&2; exit 0; }
"$build/sysformer" eval --llm "$gguf" --device cpu \
    --sysformer "$sf" --system-embedder "$emb" \
    --harmful "$ds/harmful_val.json" --safe "$ds/harmless_val.json" \
    --max-safe "${SAFE_N:-200}" --jailbreaks bench/jailbreaks.json \
    --max-jailbreak-prompts "${JB_N:-13}" --max-new-tokens "${MAX_NEW_TOKENS:-32}" \
    --batch 16 --out "$out"

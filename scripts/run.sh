#!/usr/bin/env bash
# The main job on the embedded default: builds the library and CLI, writes the small random
# Llama model (until a real model ships), and runs a packed batch of two requests through it.
# Usage: scripts/run.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}

scripts/setup.sh
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target sysformer_cli -j "$(nproc)"

model="$build/default-model"
[[ -f "$model/model.safetensors" ]] || "$build/sysformer" random-model --out "$model"
"$build/sysformer" info --model "$model"
"$build/sysformer" forward --model "$model" --tokens 1,15,27,300,42,7 --tokens 1,99 --top 5

#!/usr/bin/env bash
# Coverage-guided fuzzing of everything that reads outside input: the safetensors reader (single
# files and sharded indexes), the GGUF reader (and the tokenizer, embeddings and model loaded
# from a GGUF), config.json, tokenizer.json, encoding and decoding with real tokenizers,
# sysformer.json, jailbreak wrapper files and prompt sets, and the CLI's JSONL prompt files
# (generate --input, read and its replies written back). libFuzzer with AddressSanitizer and
# UndefinedBehaviorSanitizer, the library built for it with clang (CPU path only: no CUDA, no
# BLAS, no OpenMP).
#
# Usage: tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]   (default 60, every target)
#   Targets: safetensors gguf llm_config tokenizer_json tokenizer_encode json_files cli_jsonl
#   (tests/fuzz/fuzz_TARGET.c). Inputs under tests/fuzz/regressions/TARGET/ (earlier findings,
#   fixed) are replayed first. A crash, leak or sanitizer report stops that target and leaves
#   the input that caused it under build-fuzz/findings/TARGET/; the script then exits 1.
#   Reproduce one: build-fuzz/fuzz_TARGET build-fuzz/findings/TARGET/crash-...
#   Corpora grow in build-fuzz/corpus/TARGET/, seeded on the first run from tests/golden and
#   tests/fuzz/seeds/TARGET/ (written by tests/fuzz/make_seeds.py), and are kept from run to run.
# Not part of scripts/test.sh, which needs no clang: there ctest only replays the regressions
# and seeds through the same harnesses (tests/CMakeLists.txt, fuzz_replay_*), built with the
# suite's compiler, in the release and the sanitizer builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
shift || true
targets=("$@")
all=(safetensors gguf llm_config tokenizer_json tokenizer_encode json_files cli_jsonl)
[[ ${#targets[@]} -gt 0 ]] || targets=("${all[@]}")
if ! command -v clang >/dev/null; then
    echo "tests/fuzz/run.sh: needs clang (apt-get install clang)" >&2
    exit 2
fi

B=build-fuzz
san=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1)
cmake -S . -B "$B/lib" -DCMAKE_BUILD_TYPE=None -DCMAKE_C_COMPILER=clang \
      -DCMAKE_CXX_COMPILER=clang++ -DSF_CUDA=OFF -DSF_BLAS=OFF -DSF_OPENMP=OFF \
      -DSF_BUILD_TESTS=OFF -DSF_BUILD_CLI=OFF -DSF_BUILD_BENCH=OFF \
      -DCMAKE_C_FLAGS="${san[*]} -fsanitize=fuzzer-no-link" >/dev/null
cmake --build "$B/lib" -j "$(nproc)" --target sysformer >/dev/null
libs=$(pkg-config --libs jansson libpcre2-8)
for t in "${targets[@]}"; do
    data=$PWD/tests/golden
    [[ $t == tokenizer_encode ]] && data=$data/tokenizer
    extra=()
    [[ $t == cli_jsonl ]] && extra=(host/cli/jsonl_prompts.c -D_GNU_SOURCE)
    clang "${san[@]}" -fsanitize=fuzzer -Iinclude -Ihost -DSF_FUZZ_DATA="\"$data\"" \
        "tests/fuzz/fuzz_$t.c" "${extra[@]}" "$B/lib/libsysformer.a" $libs -lm -o "$B/fuzz_$t"
done

# Seeds: the committed fixtures of each format and tests/fuzz/seeds (for the inputs that carry
# a selector byte, and a sharded index).
seed() {  # seed TARGET FILE...
    local dir=$B/corpus/$1
    shift
    mkdir -p "$dir"
    [[ -n $(ls -A "$dir") ]] && return 0
    for f in "$@"; do [[ -f $f ]] && cp "$f" "$dir/$(echo "$f" | tr '/' '_')"; done
    return 0
}
seed safetensors tests/golden/llm/*/model.safetensors \
    tests/golden/sysformer/*/sysformer.safetensors tests/fuzz/seeds/safetensors/*
seed gguf tests/golden/gguf/*.gguf tests/fuzz/seeds/gguf/*
seed llm_config tests/golden/llm/*/config.json
seed tokenizer_json tests/golden/tokenizer/synthetic/*/tokenizer.json
seed tokenizer_encode tests/fuzz/seeds/tokenizer_encode/*
seed json_files tests/fuzz/seeds/json_files/*
seed cli_jsonl tests/fuzz/seeds/cli_jsonl/*

status=0
for t in "${targets[@]}"; do
    found=(tests/fuzz/regressions/"$t"/*)
    [[ -f ${found[0]} ]] || continue
    if "$B/fuzz_$t" "${found[@]}" >"$B/regressions_$t.log" 2>&1; then
        echo "fuzz_$t: ${#found[@]} earlier finding(s) replayed, all fixed"
    else
        echo "fuzz_$t: an earlier finding is back: $B/regressions_$t.log"
        grep -m 5 -E "ERROR|SUMMARY|runtime error" "$B/regressions_$t.log" || true
        status=1
    fi
done
for t in "${targets[@]}"; do
    mkdir -p "$B/findings/$t"
    echo "== fuzz_$t: $secs s"
    if ! "$B/fuzz_$t" -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -max_len=262144 \
            -print_final_stats=1 -artifact_prefix="$B/findings/$t/" "$B/corpus/$t" \
            >"$B/fuzz_$t.log" 2>&1; then
        echo "fuzz_$t: FOUND something: $B/fuzz_$t.log, $B/findings/$t/"
        grep -m 5 -E "ERROR|SUMMARY|runtime error" "$B/fuzz_$t.log" || tail -n 20 "$B/fuzz_$t.log"
        status=1
    else
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$B/fuzz_$t.log")
        edges=$(grep -o 'cov: [0-9]*' "$B/fuzz_$t.log" | tail -1 | cut -d' ' -f2)
        echo "fuzz_$t: $runs inputs, $edges edges covered, nothing found"
    fi
done
exit $status

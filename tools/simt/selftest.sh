#!/usr/bin/env bash
# The emulator's own test: a suite must FAIL when its kernel has a bug. Each case copies kernels/ to
# a scratch directory, plants one bug (an exact text replacement that must match once) and runs the
# suite (narrowed to the tests that reach the kernel) expecting a failure. A planted bug that passes
# means the suite cannot see that kind of error: exit 1. Two suites, two bugs in tensor-core kernels
# (about a minute of one core; what ctest runs, kept short for CI's budget); --all adds the split
# top-p's and the split argmax's, one for the optim suite, cuBLASLt's reduction preference (gemm.c
# on the backward suite), the engine's and the train suite's (15 minutes in all on two cores: those
# two build the whole library; with a learned system offset's gradient and device span check among
# them, the serving entry point's offset bounds, lent-table check and fp16 embeddings, per-request
# sampling's order, continuous batching's fed tokens, and a failed step's slots and session), and
# the wgmma attention's, and races only the race check (run.sh RACE=1) sees, and two of the
# warp-specialized kernel's again under it. Others: run.sh with KSRC / ESRC by hand. Most engine and
# train plants are in host code (host/cuda), not in a kernel. Two of them only the emulated
# runtime's queued streams can show (on a CPU that runs everything at once they would pass): an
# engine step that refills the pinned staging before the previous step's uploads have run; a
# training step that reads S' and S from pinned memory without waiting for their copies.
#   tools/simt/selftest.sh [--all]
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
rc=0
# suite file old new gtest_filter [RACE=1] (file: a .cu or .cuh in kernels/, else in host/cuda/;
# with RACE=1 the suite runs with the race check, and only a race it reports counts as caught)
plant() {
    local d src=kernels var=KSRC race=${6:-}
    [[ $2 == *.cu || $2 == *.cuh ]] || { src=host/cuda; var=ESRC; }
    d=$(mktemp -d "${TMPDIR:-/tmp}/simt_bug.XXXXXX")
    cp "$REPO/$src"/* "$d/"
    if ! python3 - "$d/$2" "$3" "$4" <<'PY'
import sys
p, old, new = sys.argv[1:4]
s = open(p).read()
if s.count(old) != 1:
    sys.exit('selftest: the text to replace occurs %d times in %s' % (s.count(old), p))
open(p, 'w').write(s.replace(old, new))
PY
    then
        rc=1
        rm -rf "$d"
        return
    fi
    if env "$var=$d" $race "$HERE/run.sh" "$1" --gtest_filter="$5" >"$d/log" 2>&1; then
        echo "MISSED: $1: $2: '$3' -> '$4' passed"
        rc=1
    elif [ -n "$race" ] && ! grep -qE '(shared|device)-memory race' "$d/log"; then
        echo "MISSED: $1: $2: '$3' -> '$4' failed, but not as a race"
        rc=1
    elif [ -n "$race" ]; then
        echo "caught: $1: $2: $(grep -m1 -oE '(shared|device)-memory race[a-z ]* \([a-z ]*\)' \
            "$d/log") in $5"
    else
        echo "caught: $1: $2: $(grep -m1 -E '^\[  FAILED  \] [A-Z]' "$d/log" || tail -n 1 "$d/log")"
    fi
    rm -rf "$d"
}
plant attention attention_decode.cu 'for (int e = 0; e < 4; e++) o[si][e] *= alpha;' \
    'for (int e = 0; e < 4; e++) o[si][e] *= 1.0f;' '*CudaAttention.DecodeSplit*/tiled'
# a race in a tensor-core kernel: warps read dS^T from shared memory before all have stored it
plant attention_backward attention_backward.cu \
    '        __syncthreads();  // all of dS^T is in shared memory' '' \
    'CudaAttentionBackward.CrossAttentionWithKvLen'
if [ "${1:-}" = --all ]; then
    plant elementwise sampling.cu 'nucleus_sub_bin(pos, b0) <= bin1' \
        'nucleus_sub_bin(pos, b0) < bin1' 'CudaSampling.SplitPrefix*'
    plant optim optim.cu 'k.step_size = lr / bc1;' 'k.step_size = lr;' 'CudaOptim*'
    # cuBLASLt allowed split-K reductions in the output type (bf16 partial sums, where the
    # products are promised one rounding): the stand-in's heuristic refuses such a preference
    plant backward gemm.c 'reductions = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;' \
        'reductions = CUBLASLT_REDUCTION_SCHEME_MASK;' 'CudaBackwardGemm.*'
    # a race no result shows (every lane of a warp writes its partial, all the same value; all
    # four schedules pass): the race check's to find
    plant norms norms_common.cuh 'if (lane == 0) partial[warp] = v;' 'partial[warp] = v;' \
        'CudaNorms.RmsNorm*' RACE=1
    # a race between blocks that no result shows either: every block but the first reads the
    # first output element and writes it back (block 0 writes it in any order; on a GPU a
    # block that read it before then writes the old value over it)
    at=$'no barrier is left waiting.\n    if (row >= rows) return;'
    plant norms rmsnorm.cu "$at" "$at"$'\n    volatile uint16_t *first = out;\n    '\
'if (threadIdx.x == 0 && blockIdx.x > 0) first[0] = first[0];' 'CudaNorms.RmsNorm*' RACE=1
    plant elementwise sampling.cu 'partial[row * chunks + c]' 'partial[row * (chunks - 1) + c]' \
        'CudaSampling.Argmax*'
    plant engine step.c '    SF_CUDA_OR_FAIL(cudaEventSynchronize(e->staging_free));' '' \
        'CudaEngine/CudaEngineVariant.GraphReplayEqualsEagerBitForBit/llama_gqa_llama3'
    plant train train_step.c '    SF_CUDA_OR_FAIL(cudaEventSynchronize(t->recon_ready));' '' \
        'Cuda/CudaTrainVariant.LossesAndGradientsMatchTheCpu/llama_gqa_llama3_prenorm_relu'
    # a learned system offset: its gradient never formed; the engine's device span check gone
    plant train train_step.c '    if (Ts > 0) SF_TRY(add_offset_backward(t, p));' '' \
        'CudaTrainOffset.*'
    plant engine sysformer_forward.c ' offset_rows, a->sys_rows,' ' 0, a->sys_rows,' \
        'CudaEngineTiny.LearnedSystemOffsetMatchesCpu'
    # the serving entry point: a request whose device offsets run past the batch taken as
    # valid (rows outside the caller's buffer); with max_system 0, requests with a system span
    # neither rewritten nor counted; a lent embedding table taken unchecked
    plant engine guard.cu \
        'return begin < 0 || end < begin || end > n_tokens ? SF_GUARD_BAD_OFFSETS : 0;' \
        'return begin < 0 || end < begin ? SF_GUARD_BAD_OFFSETS : 0;' \
        'CudaEngine/CudaEngineVariant.GuardedEmbedMatchesCpuAndCountsBadInputs/llama_gqa_llama3'
    plant engine sysformer_forward.c '(!e->has_sysformer || n_requests == 0) return' \
        '(!e->has_sysformer || n_requests == 0 || max_system == 0) return' \
        'CudaEngine/CudaEngineVariant.GuardedEmbedMatchesCpuAndCountsBadInputs/llama_gqa_llama3'
    plant engine engine.c 'st = check_borrowed_rows(e, llm);' 'st = SF_OK;' \
        'CudaEngineTiny.GuardOnlyEngineBorrowsTheStacksEmbeddingTable'
    # fp16 embeddings: the two values of a pair swapped in the 128-bit conversion; the fp16
    # table uploaded as bf16 bits
    plant elementwise guard.cu \
        'To::pack2(From::to_f32((uint16_t)(w & 0xffffu)), From::to_f32((uint16_t)(w >> 16)))' \
        'To::pack2(From::to_f32((uint16_t)(w >> 16)), From::to_f32((uint16_t)(w & 0xffffu)))' \
        'CudaEmbedding.RowMovesBetweenFormatsRoundEachValueOnce'
    plant engine weights.c '(size_t)c->vocab_size * (size_t)d, e->embed_f16));' \
        '(size_t)c->vocab_size * (size_t)d, false));' \
        'CudaEngineTiny.GuardOnlyEngineWritesTheStacksFp16Embeddings'
    # per-request sampling: the picks handed back in the step's grouped order, not the
    # caller's; continuous batching: a running request fed its prompt's first token instead of
    # the one it picked
    plant engine step.c 'tokens[r] = e->h.tokens[e->reordered ? e->row_of[r] : r];' \
        'tokens[r] = e->h.tokens[r];' \
        'CudaEngineTiny.PerRequestSamplingRunsGroupedAndAnswersInOrder'
    plant engine generate.c \
        'const int32_t *src = i < running ? &q->rq.last : q->ids;' \
        'const int32_t *src = i < running ? &q->res.tokens[0] : q->ids;' \
        'CudaEngine/CudaEngineVariant.GenerateRefillsSlotsAsRequestsFinish/*'
    # a generation session: a request that a stream callback cancelled in the middle of a
    # round still gets that round's token (and its slot freed twice)
    plant engine generate.c \
        '        if (!q || q->state != RUNNING) continue; /* cancelled by a callback of this round */' \
        '' 'CudaEngineTiny.SessionCancelsTakesAndRefuses'
    # CUDA failing under the engine (faults injected by the emulated runtime): a step that
    # fails midway leaves its slots as they were (half advanced), and a session whose step
    # failed carries on as if it had not
    plant engine step.c \
        'for (int32_t r = 0; r < n; r++) (void)sf_cuda_engine_reset_slot(e, s->slots[r]);' '' \
        'CudaEngineFaults.AFailedStepEmptiesItsSlotsAndNoOthers'
    plant engine generate.c '    s->failed = st;' '' \
        'CudaEngineFaults.ARefusedLaunchBreaksTheSessionNotTheEngine'
    # the wgmma kernel refills the V buffer its pending P V product still reads: seen only by
    # the check at the wait that retires each wgmma (ptx_sm90.cuh)
    plant attention attention_sm90.cu 'kThreads>(p, w, tiles.v(t), w.v_base, t, tid);' \
        'kThreads>(p, w, tiles.v(t + 1), w.v_base, t + 1, tid);' \
        '*CudaAttention.CausalSlidingWindow/sm90'
    # V's leading and stride byte offsets swapped (the descriptor of an MN-major operand):
    # the products alone name the operand and where its elements went
    plant attention attention_sm90.cu 'wgmma_desc(v_kc, 128, kKvLbo)' \
        'wgmma_desc(v_kc, kKvLbo, 128)' 'CudaWgmmaProducts.*'
    # the warp-specialized kernel: a consumer frees V's stage before its P V product has read
    # it (the producer refills it under the product), in either schedule (d 96 and 128 at
    # 128-key tiles wait for P V in its round, every head dim at 64-key tiles a round later);
    # rounds P into the set of registers its running P V reads (d 64 and 80 at 128-key
    # tiles); reads V before it has landed; hands the turn over once too often (an arrival
    # left on a named barrier)
    i=$'\n            '  # the rounds' inner indent
    plant attention attention_sm90.cu \
        "        wgmma_wait<0>();${i}st.pin();${i}mbar_arrive(v_empty(sv));" \
        "        mbar_arrive(v_empty(sv));${i}wgmma_wait<0>();${i}st.pin();" \
        '*CudaAttention.ChunkedPrefillAgainstCache/sm90_ws'
    w='wgmma_wait<1>();  // P(t-2) V(t-2) has landed; S(t) may still be running'
    plant attention attention_sm90.cu \
        "    $w${i}st.pin_pv();${i}if (t >= 2) mbar_arrive(v_empty((t - 2) % kStages));" \
        "    if (t >= 2) mbar_arrive(v_empty((t - 2) % kStages));${i}$w${i}st.pin_pv();" \
        '*CudaAttention.ChunkedPrefillAgainstCache/sm90_ws_n64'
    plant attention attention_sm90.cu $'        st.template round_p<b>();\n    };' \
        $'        st.template round_p<1 - b>();\n    };' \
        '*CudaAttention.CausalSlidingWindow/sm90_ws'
    plant attention attention_sm90.cu \
        $'        mbar_wait(v_full(sv), ((t - 1) / kStages) & 1);\n' '' \
        '*CudaAttention.ChunkedPrefillAgainstCache/sm90_ws'
    plant attention attention_sm90.cu $'        take_turn();\n        if (c == 0) hand_over();' \
        $'        take_turn();\n        hand_over();' \
        '*CudaAttention.CrossAttentionOtherLengths/sm90_ws'
    # the first and the fourth again under the race check, which reports each as a race (a
    # read of V's stage after the producer's refill; a read of V before its copy's arrival)
    plant attention attention_sm90.cu \
        "        wgmma_wait<0>();${i}st.pin();${i}mbar_arrive(v_empty(sv));" \
        "        mbar_arrive(v_empty(sv));${i}wgmma_wait<0>();${i}st.pin();" \
        '*CudaAttention.ChunkedPrefillAgainstCache/sm90_ws' RACE=1
    plant attention attention_sm90.cu \
        $'        mbar_wait(v_full(sv), ((t - 1) / kStages) & 1);\n' '' \
        '*CudaAttention.ChunkedPrefillAgainstCache/sm90_ws' RACE=1
fi
exit $rc

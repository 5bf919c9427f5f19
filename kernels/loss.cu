// The LM head's log-softmax: the token cross-entropy with its gradient, fused over the logits
// (CPU twin: sf_cpu_cross_entropy in host/cpu/softmax.c, double, and the argmax count of
// ce_loss in host/model/backward_cpu.c), and the log-probabilities generation reports (CPU
// twins: sf_token_logprob and sf_top_logprobs in host/cpu/softmax.c). Contract: loss.h.
#include <cuda_bf16.h>
#include <stdint.h>

#include "bf16_vec.cuh"
#include "cuda_check.cuh"
#include "f32_vec.cuh"
#include "loss.h"

namespace {

// One block per row. 512 threads keep a 128K-entry vocabulary at 32 values per thread, and
// rows (tokens of a batch) give the grid its width.
constexpr int kBlock = 512;
constexpr int kWarps = kBlock / 32;
constexpr int kVec = 8;
constexpr int kNoIndex = 0x7fffffff;  // "no candidate yet" in the argmax
constexpr int kMaxTop = SF_MAX_TOP_LOGPROBS;

using sf_vec::aligned16;

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

// VEC logits from either storage type as fp32 (exact).
template <int VEC>
__device__ __forceinline__ void load_logits(const float *p, float (&v)[VEC]) {
    sf_vec::load_f32<VEC>(p, v);
}
template <int VEC>
__device__ __forceinline__ void load_logits(const __nv_bfloat16 *p, float (&v)[VEC]) {
    sf_vec::load_f32<VEC>(p, v);
}

// The running softmax statistics: maximum m and sum s of exp(z - m) over the values seen.
// (m, s) = (-inf, 0) is the empty set. Combining rescales both sums to the larger maximum; a
// side whose maximum is -inf holds nothing (all -inf) and adds 0, without forming -inf - -inf.
struct Softmax {
    float m, s;
};

__device__ __forceinline__ Softmax combine(Softmax a, Softmax b) {
    const float m = fmaxf(a.m, b.m);
    const float sa = a.m == -INFINITY ? 0.0f : a.s * expf(a.m - m);
    const float sb = b.m == -INFINITY ? 0.0f : b.s * expf(b.m - m);
    return {m, sa + sb};
}

// The argmax candidate: the largest value, then the lowest index; kNoIndex is no candidate (NaN
// values never become one). Symmetric, so both sides of a butterfly pick the same.
struct Best {
    float v;
    int32_t i;
};

__device__ __forceinline__ Best better(Best a, Best b) {
    if (a.i == kNoIndex) return b;
    if (b.i == kNoIndex) return a;
    if (a.v != b.v) return a.v > b.v ? a : b;
    return a.i < b.i ? a : b;
}

// One butterfly step of the row reduction: the softmax statistics and the argmax of this lane
// and of lane ^ o, merged.
__device__ __forceinline__ void merge_lane(Softmax &sm, Best &best, int o) {
    const Softmax other = {__shfl_xor_sync(0xffffffffu, sm.m, o),
                           __shfl_xor_sync(0xffffffffu, sm.s, o)};
    sm = combine(sm, other);
    const Best ob = {__shfl_xor_sync(0xffffffffu, best.v, o),
                     __shfl_xor_sync(0xffffffffu, best.i, o)};
    best = better(best, ob);
}

// A logit's place in the top-n order as one 64-bit value, larger first: the fp32 key whose
// unsigned order is the logits' (the sign bit flipped for positives, every bit for negatives),
// then the index complemented, so that of equal logits the lower index ranks first (-0 is
// folded onto +0 first: they are equal logits). 0 is no candidate (NaN values never become
// one; -inf ranks above 0).
__device__ __forceinline__ uint64_t rank_of(float v, int32_t i) {
    if (v == 0.0f) v = 0.0f;
    const uint32_t b = __float_as_uint(v);
    const uint32_t key = (b & 0x80000000u) ? ~b : b | 0x80000000u;
    return ((uint64_t)key << 32) | (uint32_t)(0x7fffffff - i);
}
__device__ __forceinline__ int32_t index_of(uint64_t r) {
    return 0x7fffffff - (int32_t)(uint32_t)r;
}

// A thread's n best candidates so far, best first, in local memory (n <= kMaxTop). The caller
// keeps what insert returns in a register (the n-th best once the list is full, else 0) and
// compares each new candidate with it first, so that most never touch the list.
struct TopList {
    uint64_t r[kMaxTop];
    int n, len;
    __device__ uint64_t insert(uint64_t x) {
        int k = len < n ? len++ : n - 1;
        for (; k > 0 && r[k - 1] < x; k--) r[k] = r[k - 1];
        r[k] = x;
        return len == n ? r[n - 1] : 0;
    }
};

// One thread's share of a row's first pass, over its chunks of VEC values (chunk c =
// threadIdx.x + k kBlock): the online softmax statistics, whether a NaN was seen, and each value
// with its index handed to each(v, i) in rising index order. Both kernels run this, so their
// log-sum-exp is the same arithmetic (and the same bound).
template <int VEC, typename TIn, typename Each>
__device__ __forceinline__ Softmax thread_stats(const TIn *z, int n_chunks, bool &nan,
                                                Each &&each) {
    Softmax sm = {-INFINITY, 0.0f};
    nan = false;
    for (int c = threadIdx.x; c < n_chunks; c += kBlock) {
        float v[VEC];
        load_logits<VEC>(z + (int64_t)c * VEC, v);
        float cm = -INFINITY;
#pragma unroll
        for (int i = 0; i < VEC; i++) {
            cm = fmaxf(cm, v[i]);  // ignores NaN
            nan |= v[i] != v[i];
            each(v[i], c * VEC + i);
        }
        const float m = fmaxf(sm.m, cm);
        if (m == -INFINITY) continue;  // everything so far is -inf: nothing to add
        if (m > sm.m) sm.s *= expf(sm.m - m);
        sm.m = m;
#pragma unroll
        for (int i = 0; i < VEC; i++) sm.s += expf(v[i] - m);
    }
    return sm;
}

// The shared memory of combine_block.
struct BlockScratch {
    Softmax sm[kWarps];
    Best best[kWarps];
    int nan[kWarps];
};

// The block's combination of its threads' first passes, in a fixed order (bit-identical run to
// run): an xor butterfly in each warp, then warp 0 over the warps' results. A NaN logit seen
// by any thread makes the sum NaN, as in the CPU's double loop (the statistics alone would
// drop one whose chunk held nothing else, and combine() a thread that saw nothing but NaN).
// Every thread of the block calls it; the row's (sm, best) are then in every lane of warp 0.
__device__ __forceinline__ void combine_block(Softmax &sm, Best &best, bool nan,
                                              BlockScratch &scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) merge_lane(sm, best, o);
    const int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    nan = __any_sync(0xffffffffu, nan);
    if (lane == 0) {
        scratch.sm[warp] = sm;
        scratch.best[warp] = best;
        scratch.nan[warp] = nan;
    }
    __syncthreads();
    if (warp != 0) return;
    sm = lane < kWarps ? scratch.sm[lane] : Softmax{-INFINITY, 0.0f};
    best = lane < kWarps ? scratch.best[lane] : Best{-INFINITY, kNoIndex};
#pragma unroll
    for (int o = kWarps / 2; o > 0; o >>= 1) merge_lane(sm, best, o);
    if (__any_sync(0xffffffffu, lane < kWarps && scratch.nan[lane])) sm.s = NAN;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Pass 1 (one read of the row): per thread, over its chunks of VEC values, the online softmax
// statistics and the first argmax; then the block's combination (combine_block). Pass 2:
// dlogits. dlogits may be logits: each chunk is read and written by the same thread, and the
// two values a thread reads before the first barrier (logits[t], logits[0]) are read before any
// write.
template <int VEC, typename TIn, typename TOut>
__global__ void __launch_bounds__(kBlock)
    cross_entropy_kernel(float *__restrict__ loss, int32_t *__restrict__ correct, TOut *dlogits,
                         const TIn *logits, const int32_t *__restrict__ targets,
                         const float *__restrict__ weights, int32_t vocab) {
    __shared__ BlockScratch scratch;
    __shared__ Softmax row_sm;

    const int64_t row = blockIdx.x;
    const TIn *z = logits + row * vocab;
    TOut *dz = dlogits ? dlogits + row * vocab : nullptr;
    const float w = weights ? weights[row] : 1.0f;
    const int32_t target = targets[row];
    const bool target_ok = target >= 0 && target < vocab;
    const int n_chunks = vocab / VEC;

    // A masked row whose accuracy nobody wants: zeros, without reading the logits.
    if (w == 0.0f && !correct) {
        if (threadIdx.x == 0 && loss) loss[row] = 0.0f;
        if (dz) {
            for (int c = threadIdx.x; c < n_chunks; c += kBlock) {
                float o[VEC] = {};
                sf_vec::store<VEC>(dz + (int64_t)c * VEC, o);
            }
        }
        return;
    }

    float z_target = 0.0f, z_first = 0.0f;
    if (threadIdx.x == 0) {
        if (target_ok) z_target = sf_vec::to_f32(z[target]);
        z_first = sf_vec::to_f32(z[0]);
    }

    Best best = {-INFINITY, kNoIndex};
    bool nan;  // a NaN logit: the row's sum is NaN, as the CPU's
    Softmax sm = thread_stats<VEC>(z, n_chunks, nan, [&](float v, int32_t i) {
        // Indices rise within a thread, so a strict > keeps the first maximum.
        if (v == v && (best.i == kNoIndex || v > best.v)) best = {v, i};
    });
    combine_block(sm, best, nan, scratch);
    if (threadIdx.x == 0) {
        row_sm = sm;
        if (correct) {
            // The CPU's loop starts at index 0 and only a strictly larger value moves it: a
            // NaN there, or nothing but NaN, leaves 0.
            const int32_t arg = (z_first != z_first || best.i == kNoIndex) ? 0 : best.i;
            correct[row] = arg == target ? 1 : 0;
        }
        if (loss) {
            loss[row] = w == 0.0f   ? 0.0f
                        : target_ok ? w * ((sm.m - z_target) + logf(sm.s))
                                    : __int_as_float(0x7fc00000);
        }
    }
    if (!dz) return;
    __syncthreads();

    const Softmax fin = row_sm;
    const float inv = 1.0f / fin.s;
    for (int c = threadIdx.x; c < n_chunks; c += kBlock) {
        float o[VEC];
        if (w == 0.0f) {
#pragma unroll
            for (int i = 0; i < VEC; i++) o[i] = 0.0f;
        } else {
            load_logits<VEC>(z + (int64_t)c * VEC, o);
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                const float p = expf(o[i] - fin.m) * inv;
                o[i] = w * (c * VEC + i == target ? p - 1.0f : p);
            }
        }
        sf_vec::store<VEC>(dz + (int64_t)c * VEC, o);
    }
}

// One read of the row, as the cross-entropy's first pass (thread_stats, then combine_block, so
// the same rounding of log-sum-exp), with each thread also keeping its n_top best logits
// (TopList). Then n_top rounds pick the row's best in order: each round, the best of the
// threads' heads (a butterfly in each warp, then every thread over the warps' results), whose
// thread moves to its next. Writes nll[row] = -log p(targets[row]) (when nll) and, for
// j < n_top, top_ids[row n_top + j] and top_lp[row n_top + j] = log p of the row's j-th most
// likely token (id -1 and NaN past the row's non-NaN values). Every log-probability is formed
// as the loss is: 0 - ((m - z) + log s) (0 - x, not -x: a certain token's is +0, as on the
// CPU).
template <int VEC>
__global__ void __launch_bounds__(kBlock)
    logprobs_kernel(float *__restrict__ nll, int32_t *__restrict__ top_ids,
                    float *__restrict__ top_lp, const float *__restrict__ logits,
                    const int32_t *__restrict__ targets, int32_t vocab, int n_top) {
    __shared__ BlockScratch scratch;
    __shared__ uint64_t warp_head[kWarps];
    __shared__ Softmax row_sm;

    const int64_t row = blockIdx.x;
    const float *z = logits + row * vocab;
    const int n_chunks = vocab / VEC;
    TopList top;
    top.n = n_top > 0 ? n_top : 1;
    top.len = 0;
    uint64_t floor = 0;  // a candidate must rank above this to enter the list
    bool nan;
    Softmax sm = thread_stats<VEC>(z, n_chunks, nan, [&](float v, int32_t i) {
        if (n_top > 0 && v == v) {
            const uint64_t x = rank_of(v, i);
            if (x > floor) floor = top.insert(x);
        }
    });
    Best unused = {-INFINITY, kNoIndex};  // the argmax is not wanted here
    combine_block(sm, unused, nan, scratch);
    if (threadIdx.x == 0) {
        row_sm = sm;
        if (nll) {
            const int32_t t = targets[row];
            nll[row] = t >= 0 && t < vocab ? (sm.m - z[t]) + logf(sm.s)
                                           : __int_as_float(0x7fc00000);
        }
    }
    const int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    if (n_top <= 0) return;
    __syncthreads();
    const Softmax fin = row_sm;
    const float log_s = logf(fin.s);
    int next = 0;  // this thread's head: top.r[next]
    for (int j = 0; j < n_top; j++) {
        uint64_t best = next < top.len ? top.r[next] : 0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const uint64_t other = __shfl_xor_sync(0xffffffffu, best, o);
            best = other > best ? other : best;
        }
        if (lane == 0) warp_head[warp] = best;
        __syncthreads();
        for (int w = 0; w < kWarps; w++) best = warp_head[w] > best ? warp_head[w] : best;
        if (next < top.len && top.r[next] == best) next++;  // ranks are unique: one thread
        if (threadIdx.x == 0) {
            const int64_t out = row * n_top + j;
            const int32_t i = best ? index_of(best) : -1;
            top_ids[out] = i;
            top_lp[out] = i >= 0 ? 0.0f - ((fin.m - z[i]) + log_s) : __int_as_float(0x7fc00000);
        }
        __syncthreads();  // warp_head is written again
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------------------------

extern "C" sf_status sf_cuda_logprobs(float *nll, int32_t *top_ids, float *top_lp,
                                      const float *logits, const int32_t *targets,
                                      int64_t rows, int32_t vocab, int32_t n_top,
                                      cudaStream_t stream) {
    static const char fn[] = "sf_cuda_logprobs";
    if (rows < 0 || rows > INT32_MAX || (rows > 0 && vocab < 1) || n_top < 0 ||
        n_top > kMaxTop) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: rows = %lld, vocab = %d, n_top = %d", fn,
                       (long long)rows, vocab, n_top);
    }
    if (rows == 0 || (!nll && n_top == 0)) return SF_OK;
    if (!logits || (nll && !targets) || (n_top > 0 && (!top_ids || !top_lp))) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: a NULL array", fn);
    }
    if (((uintptr_t)logits & 3u) || ((uintptr_t)nll & 3u) || ((uintptr_t)targets & 3u) ||
        ((uintptr_t)top_ids & 3u) || ((uintptr_t)top_lp & 3u)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", fn);
    }
    sf_nvtx_range range(fn);
    if (vocab % kVec == 0 && aligned16(logits)) {
        logprobs_kernel<kVec><<<(unsigned)rows, kBlock, 0, stream>>>(nll, top_ids, top_lp,
                                                                      logits, targets, vocab,
                                                                      n_top);
    } else {
        logprobs_kernel<1><<<(unsigned)rows, kBlock, 0, stream>>>(nll, top_ids, top_lp, logits,
                                                                   targets, vocab, n_top);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_cross_entropy(float *loss, int32_t *correct, void *dlogits,
                                           bool dlogits_bf16, const void *logits,
                                           bool logits_bf16, const int32_t *targets,
                                           const float *weights, int64_t rows, int32_t vocab,
                                           cudaStream_t stream) {
    static const char fn[] = "sf_cuda_cross_entropy";
    if (rows < 0 || rows > INT32_MAX || (rows > 0 && vocab < 1)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: rows = %lld, vocab = %d", fn,
                       (long long)rows, vocab);
    }
    if (rows == 0) return SF_OK;
    if (!logits || !targets) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL %s", fn, !logits ? "logits" : "targets");
    }
    const uintptr_t in_mask = logits_bf16 ? 1u : 3u, out_mask = dlogits_bf16 ? 1u : 3u;
    if (((uintptr_t)logits & in_mask) || ((uintptr_t)dlogits & out_mask) ||
        ((uintptr_t)loss & 3u) || ((uintptr_t)correct & 3u) || ((uintptr_t)targets & 3u) ||
        ((uintptr_t)weights & 3u)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", fn);
    }
    if (dlogits == logits && dlogits_bf16 != logits_bf16) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: dlogits over logits needs one type for both (got %s over %s)", fn,
                       dlogits_bf16 ? "bf16" : "fp32", logits_bf16 ? "bf16" : "fp32");
    }
    if (!loss && !correct && !dlogits) return SF_OK;

    sf_nvtx_range range(fn);
    const bool vec = vocab % kVec == 0 && aligned16(logits) && aligned16(dlogits);
    auto go = [&](auto *out, auto *in) {
        if (vec) {
            cross_entropy_kernel<kVec><<<(unsigned)rows, kBlock, 0, stream>>>(
                loss, correct, out, in, targets, weights, vocab);
        } else {
            cross_entropy_kernel<1><<<(unsigned)rows, kBlock, 0, stream>>>(
                loss, correct, out, in, targets, weights, vocab);
        }
    };
    auto with_in = [&](auto *out) {
        if (logits_bf16) {
            go(out, static_cast<const __nv_bfloat16 *>(logits));
        } else {
            go(out, static_cast<const float *>(logits));
        }
    };
    if (dlogits_bf16) {
        with_in(static_cast<__nv_bfloat16 *>(dlogits));
    } else {
        with_in(static_cast<float *>(dlogits));
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

// Greedy and top-k / top-p sampling over fp32 logits. CPU twin: sf_sample in
// host/model/generate.c.
//
// Design: one block per row selects and samples (splitting the row first: further below).
// sf_sample sorts the whole vocabulary and walks it in order, so the kernel builds the same
// order exactly: every comparison is on the fp32 logit (dividing by a
// positive temperature in double keeps distinct floats distinct and ordered), mapped to a
// 32-bit key whose unsigned order is "logit descending", and a stable sort keeps ascending
// indices among equal logits. top_k is a radix select on those keys followed by a stable
// compaction (so the kept set, ties included, is exactly sf_sample's), then an LSD radix sort of
// the kept set in the caller's workspace. Weights, the nucleus and the draw are then prefix sums
// in double over the sorted list, computed in a fixed order (deterministic run to run).
//
// Against sf_sample the only differences are the rounding of exp (CUDA's double exp is within
// 1 ulp, so is glibc's) and the order of the double sums: relative differences below ~1e-11 for
// 256K terms. A token can differ only if u * total or the top_p mass lands that close to a
// boundary; tests/test_cuda_elementwise.cpp checks that margin for its inputs.
//
// top_p without top_k needs no full sort either: a radix select weighted by the softmax mass
// (select_nucleus) finds a key threshold whose prefix holds the nucleus with a margin, and only
// the keys up to it are sorted; the nucleus is then cut from them exactly as from the full sort,
// and the tail's mass (the keys past the threshold) completes the row's total. The full sort
// remains for rows whose mass is not finite (an infinite logit) and for plain sampling.
//
// Filling the GPU. One block per row leaves most SMs idle at decode batch sizes (32 rows of
// 128K logits on 132 SMs: argmax at 7% of the copy bandwidth, top-k 50 at 234 us on the H200,
// docs/PERF.md). With a workspace, argmax splits each row over blocks of 8192 logits and a
// second kernel takes the maximum of their maxima (the 64-bit maximum is associative: the same
// answer). top_k <= 2048 splits the same way: each chunk's block stages its keys in shared
// memory and writes its own top_k in index order (topk_chunk_kernel), which holds the row's
// top_k with its ties in index order, and the per-row kernel then selects from those
// candidates (32 x 50 for a 128K row) instead of the row.
//
// top_p alone splits too (rows over 8192 logits; one block a row reads a 128K row once in
// ~60 us, and select_nucleus reads it about seven times), and so does plain sampling (no top_k,
// no top_p), which would otherwise sort the whole row: the prefix of the sorted order that
// holds the draw's token is found the same way, with the row's uniform u in place of top_p
// (the draw picks the first token whose running weight exceeds u times the total). The select
// runs on bins of z = logit / t below the row's maximum instead of key digits, so that a row's
// bulk spreads over many bins (shared-memory atomics seldom meet on one address) and two
// levels suffice. Kernels, each over (row, chunk) blocks or one small block a row:
//   nucleus_max_kernel       each chunk's largest logit;
//   nucleus_hist_kernel<0>   each chunk's mass in 256 bins 1/4 nat wide below the row's
//                            maximum (the last bin: everything further down, mass ignored);
//   nucleus_pick_kernel<0>   per row, the bins summed over chunks in order, and the bin at
//                            which the running mass reaches top_p (or u) (1 + margin) of
//                            the total;
//   nucleus_hist_kernel<1>,  the same over 256 sub-bins of that bin;
//   nucleus_pick_kernel<1>
//   nucleus_compact_kernel   each chunk's candidates (keys in bins up to the crossing one) in
//                            index order, and the chunk's whole mass in a fixed order;
//   sample_kernel<kNucleus>  per row: the candidates gathered in chunk order, then the sort,
//                            nucleus and draw of the per-row path, with the row's total
//                            summed over the chunks in order.
// Bins are ranges of the sorted order, so the candidates are a prefix of it; the margin
// covers every rounding of the masses, so the prefix holds sf_sample's nucleus (or drawn
// token), which is then cut (or drawn) from it exactly. The total does not depend on which
// candidates were kept, so the token does not depend on the order of the atomics: the result
// is deterministic.
//
// Cost: the full-vocabulary sort is 4 passes over the row per block, about a millisecond for
// 128K logits (measured on the H200: 1.8 ms for 32 rows); with top_k the sort sees k keys, with
// top_p the nucleus's candidates, in plain sampling the draw's. The full sort remains for rows
// of at most 8192 logits and for callers whose workspace is not 8-byte aligned.
#include <limits.h>
#include <math.h>

#include <type_traits>

#include "bf16_vec.cuh"
#include "cuda_check.cuh"
#include "sampling.h"

namespace {

constexpr int kArgmaxBlock = 512;
constexpr int32_t kArgmaxChunk = 8192;  // logits a block takes when rows are split (workspace)
constexpr int kFinishBlock = 256;
constexpr int32_t kTopkChunk = 8192;  // logits a block of the split top-k's first stage takes
constexpr int kSampleBlock = 1024;
constexpr int kWarps = kSampleBlock / 32;
constexpr int kRadix = 256;
constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// The sort key: unsigned ascending order = logit descending. -0 is folded onto +0 (they compare
// equal in sf_sample) and NaN sorts after everything.
__device__ __forceinline__ uint32_t sort_key(float f) {
    if (f != f) return 0xffffffffu;
    if (f == 0.0f) f = 0.0f;
    const uint32_t b = __float_as_uint(f);
    const uint32_t ordered = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ~ordered;
}

__device__ __forceinline__ float key_logit(uint32_t key) {
    const uint32_t ordered = ~key;
    return __uint_as_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}

// Greedy: the largest (key, lowest index) as one 64-bit maximum. A NaN gets the lowest rank,
// except at index 0, where it gets the highest: sf_sample's loop starts from index 0 and no
// comparison with NaN ever replaces it. The maximum is associative, so a row may be split into
// chunks whose maxima are combined later without changing the answer.
__device__ __forceinline__ unsigned long long argmax_candidate(float f, int32_t i) {
    const uint32_t rank = f != f ? (i == 0 ? 0xffffffffu : 0u) : ~sort_key(f);
    return ((unsigned long long)rank << 32) | (unsigned long long)(~(uint32_t)i);
}

__device__ __forceinline__ unsigned long long max_u64(unsigned long long a, unsigned long long b) {
    return a > b ? a : b;
}

// One block per (row, chunk of `chunk` logits), blocks row-major: the chunk's best candidate,
// to out[row] when the row is a single chunk, else to partial[block] for argmax_finish_kernel.
// kVec: rows start 16-byte aligned and chunk is a multiple of 4 (float4 loads).
template <bool kVec>
__global__ void __launch_bounds__(kArgmaxBlock)
    argmax_kernel(int32_t *__restrict__ out, unsigned long long *__restrict__ partial,
                  const float *__restrict__ logits, int32_t vocab, int32_t chunk,
                  int32_t chunks) {
    __shared__ unsigned long long warp_best[kArgmaxBlock / 32];
    const int64_t row = blockIdx.x / chunks;
    const int32_t begin = (int32_t)(blockIdx.x - row * chunks) * chunk;
    const int32_t end = (int32_t)min((int64_t)vocab, (int64_t)begin + chunk);
    const float *row_logits = logits + row * vocab;
    unsigned long long best = 0;
    if (kVec) {
        const float4 *row4 = reinterpret_cast<const float4 *>(row_logits);
        for (int64_t j = begin / 4 + threadIdx.x; j < end / 4; j += kArgmaxBlock) {
            const float4 f = row4[j];
            const int32_t i = (int32_t)(4 * j);
            best = max_u64(best, max_u64(max_u64(argmax_candidate(f.x, i),
                                                 argmax_candidate(f.y, i + 1)),
                                         max_u64(argmax_candidate(f.z, i + 2),
                                                 argmax_candidate(f.w, i + 3))));
        }
    } else {
        for (int64_t i = begin + threadIdx.x; i < end; i += kArgmaxBlock)
            best = max_u64(best, argmax_candidate(row_logits[i], (int32_t)i));
    }
    for (int o = 16; o > 0; o >>= 1) best = max_u64(best, __shfl_xor_sync(kFull, best, o));
    if ((threadIdx.x & 31) == 0) warp_best[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < kArgmaxBlock / 32; w++) best = max_u64(best, warp_best[w]);
        if (chunks == 1) {
            out[row] = (int32_t) ~(uint32_t)best;
        } else {
            partial[blockIdx.x] = best;
        }
    }
}

// One warp per row: the best of the row's chunk maxima.
__global__ void __launch_bounds__(kFinishBlock)
    argmax_finish_kernel(int32_t *__restrict__ out, const unsigned long long *__restrict__ partial,
                         int32_t chunks, int64_t n_rows) {
    const int64_t row = ((int64_t)blockIdx.x * kFinishBlock + threadIdx.x) / 32;
    if (row >= n_rows) return;  // whole warps: n_rows is uniform across a warp's lanes
    const int lane = threadIdx.x & 31;
    unsigned long long best = 0;
    for (int32_t c = lane; c < chunks; c += 32) best = max_u64(best, partial[row * chunks + c]);
    for (int o = 16; o > 0; o >>= 1) best = max_u64(best, __shfl_xor_sync(kFull, best, o));
    if (lane == 0) out[row] = (int32_t) ~(uint32_t)best;
}

template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T y = __shfl_up_sync(kFull, v, o);
        if (lane >= o) v += y;
    }
    return v;
}

// Inclusive scan over the block in thread order (fixed association, so deterministic for
// double); *total receives the block's sum. Every thread must call; scratch holds kWarps + 1.
template <typename T>
__device__ T block_inclusive_scan(T v, T *total, T *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T incl = warp_inclusive_scan(v, lane);
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const T w = scratch[lane];
        const T w_incl = warp_inclusive_scan(w, lane);
        const T w_excl = __shfl_up_sync(kFull, w_incl, 1);
        __syncwarp();
        scratch[lane] = lane == 0 ? T(0) : w_excl;
        if (lane == 31) scratch[kWarps] = w_incl;
    }
    __syncthreads();
    const T result = incl + scratch[warp];
    *total = scratch[kWarps];
    __syncthreads();
    return result;
}

struct SampleShared {
    int hist[kRadix];
    int digit_base[kRadix];
    int warp_digit[kWarps][kRadix];  // per-tile counts, then offsets, of each digit per warp
    int int_scan[kWarps + 1];
    double dbl_scan[kWarps + 1];
    double mass[kRadix];  // select_nucleus: the softmax mass of each digit
    double mass_left;     // select_nucleus: the mass still to reach inside the current prefix
    uint32_t key_min;
    int found;
    uint32_t digit;
    int remaining;
    int below;
    int skip;
};

// The first index i < n (in sorted order) whose running sum of value(i) over [0, i] satisfies
// reached(sum); n when none does. Sums are in double, in tiles of the block, carried across.
template <typename Value, typename Reached>
__device__ int first_reaching(int n, Value value, Reached reached, SampleShared &sh) {
    if (threadIdx.x == 0) sh.found = INT_MAX;
    __syncthreads();
    double carry = 0.0;
    for (int base = 0; base < n; base += kSampleBlock) {
        const int i = base + threadIdx.x;
        double tile_total;
        const double incl =
            block_inclusive_scan(i < n ? value(i) : 0.0, &tile_total, sh.dbl_scan) + carry;
        if (i < n && reached(incl)) atomicMin(&sh.found, i);
        __syncthreads();
        if (sh.found != INT_MAX) break;
        carry += tile_total;
    }
    const int found = sh.found;
    __syncthreads();  // everyone has read found before a later call resets it
    return found == INT_MAX ? n : found;
}

template <typename Value>
__device__ double block_sum(int n, Value value, SampleShared &sh) {
    double part = 0.0;
    for (int i = threadIdx.x; i < n; i += kSampleBlock) part += value(i);
    double total;
    block_inclusive_scan(part, &total, sh.dbl_scan);
    return total;
}

// One stable LSD pass over keys/ids [0, n) by the digit at shift, src -> dst. Returns false (and
// moves nothing) when every key has the same digit, so the data stay in src.
__device__ bool radix_pass(const uint32_t *src_k, const uint32_t *src_i, uint32_t *dst_k,
                           uint32_t *dst_i, int n, int shift, SampleShared &sh) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int d = tid; d < kRadix; d += kSampleBlock) sh.hist[d] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += kSampleBlock) atomicAdd(&sh.hist[(src_k[i] >> shift) & 255], 1);
    __syncthreads();
    if (tid == 0) {
        int run = 0, skip = 0;
        for (int d = 0; d < kRadix; d++) {
            sh.digit_base[d] = run;
            skip |= sh.hist[d] == n;
            run += sh.hist[d];
        }
        sh.skip = skip;
    }
    __syncthreads();
    if (sh.skip) return false;

    const uint32_t lanes_below = (1u << lane) - 1u;
    for (int base = 0; base < n; base += kSampleBlock) {
        const int i = base + tid;
        const bool valid = i < n;
        const uint32_t key = valid ? src_k[i] : 0u;
        const uint32_t id = valid ? src_i[i] : 0u;
        const int d = valid ? (int)((key >> shift) & 255) : kRadix;  // kRadix: no digit
        for (int j = tid; j < kWarps * kRadix; j += kSampleBlock) (&sh.warp_digit[0][0])[j] = 0;
        __syncthreads();
        // Lanes with the same digit, in lane order = index order: that is what makes it stable.
        const uint32_t peers = __match_any_sync(kFull, d);
        const int rank = __popc(peers & lanes_below);
        if (valid && rank == 0) sh.warp_digit[warp][d] = __popc(peers);
        __syncthreads();
        int tile_count = 0;
        if (tid < kRadix) {
            for (int w = 0; w < kWarps; w++) {
                const int c = sh.warp_digit[w][tid];
                sh.warp_digit[w][tid] = tile_count;
                tile_count += c;
            }
        }
        __syncthreads();
        if (valid) {
            const int pos = sh.digit_base[d] + sh.warp_digit[warp][d] + rank;
            dst_k[pos] = key;
            dst_i[pos] = id;
        }
        __syncthreads();
        if (tid < kRadix) sh.digit_base[tid] += tile_count;
    }
    __syncthreads();
    return true;
}

// Warp 0 finds the digit at which the histogram's running count (digits ascending) first
// reaches `remaining`, and stores it with what is left to reach inside it in sh.digit and
// sh.remaining; every thread must call (it ends with a barrier). Each lane sums 8 digits, a
// warp scan finds the lane holding the crossing, and that lane walks its 8: no thread walks
// all 256 digits one shared-memory read at a time. The count always reaches `remaining` (the
// callers ask for at most as many keys as match the prefix so far).
template <typename Shared>
__device__ void find_digit(int remaining, Shared &sh) {
    static_assert(kRadix == 32 * 8, "8 digits a lane");
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        int count[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) sum += (count[j] = sh.hist[8 * lane + j]);
        const int incl = warp_inclusive_scan(sum, lane);
        const unsigned reached = __ballot_sync(kFull, incl >= remaining);
        if (lane == __ffs((int)reached) - 1) {
            int below = incl - sum, d = 0;
            while (d < 7 && below + count[d] < remaining) below += count[d++];
            sh.digit = (uint32_t)(8 * lane + d);
            sh.remaining = remaining - below;
        }
    }
    __syncthreads();
}

// Radix select over keys [0, len) of src (most significant digit first): the key of the n-th
// smallest (1 <= n <= len) in *threshold, and in *ties how many of the keys equal to it are
// among the n smallest (the lowest-index ones, for a stable selection).
template <typename Src, typename Shared>
__device__ void select_kth(const Src &src, int len, int n, uint32_t *threshold, int *ties,
                           Shared &sh) {
    uint32_t prefix = 0, mask = 0;
    int remaining = n;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = threadIdx.x; d < kRadix; d += blockDim.x) sh.hist[d] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < len; i += blockDim.x) {
            const uint32_t k = src.key(i);
            if ((k & mask) == prefix) atomicAdd(&sh.hist[(k >> shift) & 255], 1);
        }
        __syncthreads();
        find_digit(remaining, sh);
        prefix |= sh.digit << shift;
        mask |= 255u << shift;
        remaining = sh.remaining;  // rewritten only after two more barriers
    }
    *threshold = prefix;
    *ties = remaining;
}

// Stable compaction of src [0, len) into (out_key, out_id): the keys below `threshold` and the
// first `ties` keys equal to it, in index order; n is their count (the loop stops once they
// are all out). Needs blockDim.x == kSampleBlock (the block scan).
template <typename Src, typename Shared>
__device__ void compact_kept(const Src &src, int len, int n, uint32_t threshold, int ties,
                             uint32_t *out_key, uint32_t *out_id, Shared &sh) {
    int eq_before = 0, kept_before = 0;
    for (int base = 0; base < len && kept_before < n; base += kSampleBlock) {
        const int i = base + threadIdx.x;
        const bool valid = i < len;
        const uint32_t k = valid ? src.key(i) : 0xffffffffu;
        const int is_eq = valid && k == threshold;
        int eq_total, kept_total;
        const int eq_rank = eq_before + block_inclusive_scan(is_eq, &eq_total, sh.int_scan) - is_eq;
        const int kept = valid && (k < threshold || (is_eq && eq_rank < ties));
        const int pos = kept_before + block_inclusive_scan(kept, &kept_total, sh.int_scan) - kept;
        if (kept) {
            out_key[pos] = k;
            out_id[pos] = src.id(i);
        }
        eq_before += eq_total;
        kept_before += kept_total;
    }
}

// Where the sampler's keys come from, in index order.
struct RowKeys {  // one row of logits
    const float *row;
    __device__ uint32_t key(int i) const { return sort_key(row[i]); }
    __device__ uint32_t id(int i) const { return (uint32_t)i; }
};
struct ChunkKeys {  // a chunk of a row, its keys staged in shared memory
    const uint32_t *keys;
    int32_t begin;  // the chunk's first index in the row
    __device__ uint32_t key(int i) const { return keys[i]; }
    __device__ uint32_t id(int i) const { return (uint32_t)(begin + i); }
};
struct CandidateKeys {  // the split top-k's candidates (topk_chunk_kernel's output)
    const uint32_t *keys, *ids;
    __device__ uint32_t key(int i) const { return keys[i]; }
    __device__ uint32_t id(int i) const { return ids[i]; }
};

// The smallest key of the row (its largest logit) on every thread.
__device__ uint32_t block_min_key(const float *row, int32_t vocab, SampleShared &sh) {
    uint32_t m = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += kSampleBlock) m = min(m, sort_key(row[i]));
    for (int o = 16; o > 0; o >>= 1) m = min(m, __shfl_xor_sync(kFull, m, o));
    if (threadIdx.x == 0) sh.key_min = 0xffffffffu;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) atomicMin(&sh.key_min, m);
    __syncthreads();
    const uint32_t result = sh.key_min;
    __syncthreads();
    return result;
}

// top_p without top_k: a superset of the nucleus found without sorting. A most-significant-digit
// radix select on the keys, each weighted by its softmax weight exp(z - z_max) (in double, as
// step 3 forms it), finds the key `threshold` at which the mass of the keys up to it first
// reaches top_p (1 + 1e-9) of the row's mass. The candidates are every key below the threshold
// and every key equal to it. The digit masses are summed by atomics in no fixed order, so they
// are off the exact sums by ~1e-13 relative at most (128K terms of a 2^-53 rounding each);
// the 1e-9 margin covers that, so the candidates always hold the exact nucleus and the order
// of the atomics cannot change the result. Returns the candidate count, or vocab when the select
// cannot help (top_p (1 + 1e-9) reaches the whole mass, or that mass is not finite); *threshold,
// and *ties (how many keys equal it) are set when the count is below vocab.
__device__ int select_nucleus(const float *row, int32_t vocab, double t, double p,
                              uint32_t *threshold, int *ties, SampleShared &sh) {
    const int tid = threadIdx.x;
    const double zm = (double)key_logit(block_min_key(row, vocab, sh)) / t;
    if (!isfinite(zm)) return vocab;
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = tid; d < kRadix; d += kSampleBlock) {
            sh.hist[d] = 0;
            sh.mass[d] = 0.0;
        }
        __syncthreads();
        for (int i = tid; i < vocab; i += kSampleBlock) {
            const uint32_t k = sort_key(row[i]);
            if ((k & mask) == prefix) {
                const int d = (int)((k >> shift) & 255);
                atomicAdd(&sh.hist[d], 1);
                // NaN (key 0xffffffff) sorts last and carries no mass here
                if (k != 0xffffffffu) atomicAdd(&sh.mass[d], exp((double)key_logit(k) / t - zm));
            }
        }
        __syncthreads();
        if (tid == 0) {
            if (shift == 24) {
                double total = 0.0;
                for (int d = 0; d < kRadix; d++) total += sh.mass[d];
                const double target = p * total * (1.0 + 1e-9);
                sh.skip = !isfinite(total) || !(target < total);
                sh.mass_left = target;
                sh.below = 0;
            }
            // the first digit whose mass reaches what is left (the last one at worst)
            double left = sh.mass_left;
            int below = sh.below, d = 0;
            while (d < kRadix - 1 && sh.mass[d] < left) {
                left -= sh.mass[d];
                below += sh.hist[d++];
            }
            sh.digit = (uint32_t)d;
            sh.mass_left = left;
            sh.below = below;
            sh.remaining = sh.hist[d];
        }
        __syncthreads();
        if (sh.skip) break;
        prefix |= sh.digit << shift;
        mask |= 255u << shift;
    }
    const int skip = sh.skip, n = sh.below + sh.remaining;
    *ties = sh.remaining;
    __syncthreads();  // everyone has read sh before it is reused
    *threshold = prefix;
    return skip || n >= vocab ? vocab : n;
}

// The split top-k's first stage: one block per (row, chunk of kTopkChunk logits), blocks
// row-major. The chunk's keys are staged in shared memory, and its min(top_k, chunk length)
// smallest (key, index) pairs are written in index order to the row's candidates at chunk *
// top_k. Every key of the row's top_k is among its chunk's top_k, so the candidates hold the
// row's top_k; and since chunks are in index order and each chunk's output is too, the
// candidates are in index order: sample_kernel<true> then selects from them exactly as from
// the whole row. cand: per row `row_words` words, the candidates' keys [n_cand] then their
// indices [n_cand]. kVec: rows start 16-byte aligned (float4 loads; kTopkChunk % 4 == 0).
struct ChunkShared {
    uint32_t keys[kTopkChunk];
    int hist[kRadix];
    int int_scan[kWarps + 1];
    uint32_t digit;
    int remaining;
};

template <bool kVec>
__global__ void __launch_bounds__(kSampleBlock)
    topk_chunk_kernel(uint32_t *__restrict__ cand, const float *__restrict__ logits,
                      int32_t vocab, int32_t chunks, int32_t top_k, int32_t n_cand,
                      int64_t row_words) {
    __shared__ ChunkShared sh;
    const int64_t row = blockIdx.x / chunks;
    const int32_t chunk = (int32_t)(blockIdx.x - row * chunks);
    const int32_t begin = chunk * kTopkChunk;
    const int len = (int)min((int64_t)kTopkChunk, (int64_t)vocab - begin);
    const float *src = logits + row * vocab + begin;
    if (kVec) {
        const float4 *src4 = reinterpret_cast<const float4 *>(src);
        for (int j = threadIdx.x; j < len / 4; j += kSampleBlock) {
            const float4 f = src4[j];
            sh.keys[4 * j] = sort_key(f.x);
            sh.keys[4 * j + 1] = sort_key(f.y);
            sh.keys[4 * j + 2] = sort_key(f.z);
            sh.keys[4 * j + 3] = sort_key(f.w);
        }
        for (int i = len / 4 * 4 + threadIdx.x; i < len; i += kSampleBlock)
            sh.keys[i] = sort_key(src[i]);
    } else {
        for (int i = threadIdx.x; i < len; i += kSampleBlock) sh.keys[i] = sort_key(src[i]);
    }
    __syncthreads();
    const ChunkKeys keys{sh.keys, begin};
    const int n = min(top_k, len);
    uint32_t threshold = 0xffffffffu;  // n == len: everything, NaN keys (0xffffffff) included
    int ties = len;
    if (n < len) select_kth(keys, len, n, &threshold, &ties, sh);
    uint32_t *out_key = cand + row * row_words + (int64_t)chunk * top_k;
    compact_kept(keys, len, n, threshold, ties, out_key, out_key + n_cand, sh);
}

// top_p alone, split over blocks (nucleus_*_kernel; see the header of the file). Bins are
// over z = logit / temperature: level 0 bins are 1/kBinsPerNat wide below the row's largest z,
// level 1 cuts the crossing level-0 bin into kRadix. A bin's position is
// pos = (z_max - z) * kBinsPerNat >= 0, non-increasing in the logit (every step rounds
// monotonically), so bins are ranges of the sorted order, as radix digits are.
constexpr int32_t kNucleusChunk = 8192;  // logits a block takes
constexpr double kBinsPerNat = 4.0;      // level 0 spans 64 nats below the maximum
constexpr int kLastBin = kRadix - 1;     // level 0: also everything further down (-inf, NaN)

__device__ __forceinline__ double nucleus_pos(float logit, double t, double z_max) {
    return (z_max - (double)logit / t) * kBinsPerNat;
}

// floor(pos) clamped to the last bin (fmin drops a NaN: NaN logits land there too)
__device__ __forceinline__ int nucleus_bin(double pos) {
    return (int)fmin(floor(pos), (double)kLastBin);
}

// The level-1 bin inside level-0 bin b0 = nucleus_bin(pos) < kLastBin: pos - b0 is exact and
// in [0, 1), and the scaling by kRadix is exact.
__device__ __forceinline__ int nucleus_sub_bin(double pos, int b0) {
    return nucleus_bin((pos - b0) * kRadix);
}

// The split top-p's per-row state, after the rows' 16 * vocab bytes of workspace.
struct NucleusRowWs {
    double *z_max;        // [1] the row's largest logit / temperature
    double *left;         // [1] level 1: the mass still to reach inside bins[0]
    int *bins;            // [2] the crossing bins of levels 0 and 1 (kLastBin: all from there)
    double *mass;         // [chunks][kRadix] the current level's mass per chunk and bin
    double *chunk_total;  // [chunks] each chunk's whole mass, for the row's total
    int *kept;            // [chunks] each chunk's candidate count
    uint32_t *chunk_min;  // [chunks] each chunk's smallest key (largest logit)
};

__host__ __device__ constexpr int64_t nucleus_row_bytes(int32_t chunks) {
    return 32 + (int64_t)chunks * (8 * kRadix + 8 + 4 + 4);
}

struct NucleusLayout {
    char *base = nullptr;
    int32_t chunks = 0;
    __device__ NucleusRowWs row(int64_t r) const {
        char *p = base + r * nucleus_row_bytes(chunks);
        NucleusRowWs w;
        w.z_max = reinterpret_cast<double *>(p);
        w.left = w.z_max + 1;
        w.bins = reinterpret_cast<int *>(p + 16);
        w.mass = reinterpret_cast<double *>(p + 32);
        w.chunk_total = w.mass + (int64_t)chunks * kRadix;
        w.kept = reinterpret_cast<int *>(w.chunk_total + chunks);
        w.chunk_min = reinterpret_cast<uint32_t *>(w.kept + chunks);
        return w;
    }
};

// Blocks of the split kernels are (row, chunk) pairs, row-major.
struct ChunkOf {
    int64_t row;
    int32_t chunk, begin, len;
    __device__ ChunkOf(int32_t chunks, int32_t vocab) {
        row = blockIdx.x / chunks;
        chunk = (int32_t)(blockIdx.x - row * chunks);
        begin = chunk * kNucleusChunk;
        len = (int32_t)min((int64_t)kNucleusChunk, (int64_t)vocab - begin);
    }
};

// The block's smallest of one value per thread (every thread must call; one barrier pair).
__device__ uint32_t block_min_u32(uint32_t m, uint32_t *slot) {
    for (int o = 16; o > 0; o >>= 1) m = min(m, __shfl_xor_sync(kFull, m, o));
    if (threadIdx.x == 0) *slot = 0xffffffffu;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) atomicMin(slot, m);
    __syncthreads();
    return *slot;
}

// 1. Each chunk's smallest key.
__global__ void __launch_bounds__(kSampleBlock)
    nucleus_max_kernel(const float *__restrict__ logits, int32_t vocab, NucleusLayout layout) {
    __shared__ uint32_t slot;
    const ChunkOf c(layout.chunks, vocab);
    const float *src = logits + c.row * vocab + c.begin;
    uint32_t m = 0xffffffffu;
    for (int i = threadIdx.x; i < c.len; i += kSampleBlock) m = min(m, sort_key(src[i]));
    m = block_min_u32(m, &slot);
    if (threadIdx.x == 0) layout.row(c.row).chunk_min[c.chunk] = m;
}

// 2, 4. Each chunk's mass per bin, exp(z - z_max) in double: level 0 over the level-0 bins
// (the last one, 64 nats down and below, carries none: under exp(-64) a logit), level 1 over
// the sub-bins of the crossing level-0 bin. Level 0 also finds z_max (from the chunks' minima).
// The shared-memory atomics add in no fixed order: the sums are within vocab * 2^-53 relative
// of any other order's, which nucleus_pick_kernel's margin covers.
template <int kLevel>
__global__ void __launch_bounds__(kSampleBlock)
    nucleus_hist_kernel(const float *__restrict__ logits, int32_t vocab, double t,
                        NucleusLayout layout) {
    __shared__ double mass[kRadix];
    __shared__ uint32_t slot;
    const ChunkOf c(layout.chunks, vocab);
    const NucleusRowWs ws = layout.row(c.row);
    double z_max;
    int bin0 = 0;
    if constexpr (kLevel == 0) {
        uint32_t m = 0xffffffffu;
        for (int j = threadIdx.x; j < layout.chunks; j += kSampleBlock)
            m = min(m, ws.chunk_min[j]);
        z_max = (double)key_logit(block_min_u32(m, &slot)) / t;
        if (c.chunk == 0 && threadIdx.x == 0) *ws.z_max = z_max;
        if (!isfinite(z_max)) return;  // no select: every key is a candidate
    } else {
        z_max = *ws.z_max;
        bin0 = ws.bins[0];
        if (bin0 == kLastBin) return;  // every key is a candidate: nothing to refine
    }
    for (int d = threadIdx.x; d < kRadix; d += kSampleBlock) mass[d] = 0.0;
    __syncthreads();
    const float *src = logits + c.row * vocab + c.begin;
    for (int i = threadIdx.x; i < c.len; i += kSampleBlock) {
        const double pos = nucleus_pos(src[i], t, z_max);
        const int b0 = nucleus_bin(pos);
        const double w = exp(pos * (-1.0 / kBinsPerNat));  // exp(z - z_max), exactly scaled
        if (kLevel == 0 && b0 < kLastBin) atomicAdd(&mass[b0], w);
        if (kLevel == 1 && b0 == bin0) atomicAdd(&mass[nucleus_sub_bin(pos, b0)], w);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < kRadix; d += kSampleBlock)
        ws.mass[(int64_t)c.chunk * kRadix + d] = mass[d];
}

// 3, 5. One block of kRadix threads per row: each bin's mass summed over the chunks in chunk
// order, then the first bin at which the running mass reaches the target: level 0's target is
// f * (the row's mass) * (1 + margin), level 1's what is left of it inside the level-0 bin.
// f is top_p when 0 < top_p < 1 (the prefix holds the nucleus); otherwise (plain sampling) it
// is the row's uniform u, so the prefix holds the token the draw picks (the first whose running
// weight exceeds u * total).
// Every key in the bins up to the crossing one is a candidate. The margin exceeds the relative
// error of every mass here and in sf_sample (exp within an ulp, sums of at most vocab terms),
// so the candidates' mass is above top_p of the total on sf_sample's arithmetic too: they hold
// its nucleus (or draw). No crossing (f (1 + margin) reaches the whole mass, a mass that is
// not finite, or rounding at the very end) makes everything from the bin on a candidate.
template <int kLevel>
__global__ void __launch_bounds__(kRadix)
    nucleus_pick_kernel(NucleusLayout layout, const double *__restrict__ u, float top_p,
                        double margin) {
    __shared__ double bin_mass[kRadix];
    static_assert(kRadix == 32 * 8, "8 bins a lane");
    const NucleusRowWs ws = layout.row(blockIdx.x);
    const int tid = threadIdx.x;
    if (kLevel == 0 && !isfinite(*ws.z_max)) {
        if (tid == 0) ws.bins[0] = ws.bins[1] = kLastBin;
        return;
    }
    if (kLevel == 1 && ws.bins[0] == kLastBin) return;
    double m = 0.0;
    for (int32_t c = 0; c < layout.chunks; c++) m += ws.mass[(int64_t)c * kRadix + tid];
    bin_mass[tid] = m;
    __syncthreads();
    if (tid >= 32) return;
    const int lane = tid;
    double v[8], sum = 0.0;
#pragma unroll
    for (int j = 0; j < 8; j++) sum += (v[j] = bin_mass[8 * lane + j]);
    const double incl = warp_inclusive_scan(sum, lane);
    double target;
    if constexpr (kLevel == 0) {
        const double total = __shfl_sync(kFull, incl, 31);
        const double f = top_p > 0.0f && top_p < 1.0f ? (double)top_p : u[blockIdx.x];
        target = f * total * (1.0 + margin);
        if (!isfinite(total) || !(target < total)) {
            if (lane == 0) ws.bins[0] = ws.bins[1] = kLastBin;
            return;
        }
    } else {
        target = *ws.left;
    }
    const unsigned reached = __ballot_sync(kFull, incl >= target);
    if (reached == 0) {
        if (lane == 0) {
            ws.bins[kLevel] = kLastBin;
            ws.bins[1] = kLastBin;
        }
        return;
    }
    if (lane == __ffs((int)reached) - 1) {
        double before = incl - sum;
        int d = 0;
        while (d < 7 && before + v[d] < target) before += v[d++];
        ws.bins[kLevel] = 8 * lane + d;
        if (kLevel == 0) {
            *ws.left = target - before;
            ws.bins[1] = kLastBin;  // until level 1 narrows it
        }
    }
}

// 6. Each chunk's candidates (the keys in bins up to the crossing ones), in index order, to
// the row's second key/index buffer pair at the chunk's offset; their count, and the chunk's
// whole mass (exp(z - z_max) over every logit, in a fixed order) for the row's total.
struct CompactShared {
    int int_scan[kWarps + 1];
    double dbl_scan[kWarps + 1];
};

__global__ void __launch_bounds__(kSampleBlock)
    nucleus_compact_kernel(uint32_t *workspace, const float *__restrict__ logits, int32_t vocab,
                           double t, NucleusLayout layout) {
    __shared__ CompactShared sh;
    const ChunkOf c(layout.chunks, vocab);
    const NucleusRowWs ws = layout.row(c.row);
    const double z_max = *ws.z_max;
    const int bin0 = ws.bins[0], bin1 = ws.bins[1];
    uint32_t *key_b = workspace + c.row * 4 * (int64_t)vocab + 2 * (int64_t)vocab + c.begin;
    uint32_t *id_b = key_b + vocab;
    const float *src = logits + c.row * vocab + c.begin;
    int kept_before = 0;
    double part = 0.0;
    for (int base = 0; base < c.len; base += kSampleBlock) {
        const int i = base + threadIdx.x;
        int keep = 0;
        uint32_t k = 0;
        if (i < c.len) {
            const float f = src[i];
            const double pos = nucleus_pos(f, t, z_max);
            const int b0 = nucleus_bin(pos);
            keep = b0 < bin0 ||
                   (b0 == bin0 && (bin0 == kLastBin || nucleus_sub_bin(pos, b0) <= bin1));
            k = sort_key(f);
            part += exp((double)key_logit(k) / t - z_max);  // the sampler's weight, NaN too
        }
        int count;
        const int at = kept_before + block_inclusive_scan(keep, &count, sh.int_scan) - keep;
        if (keep) {
            key_b[at] = k;
            id_b[at] = (uint32_t)(c.begin + i);
        }
        kept_before += count;
    }
    double total;
    block_inclusive_scan(part, &total, sh.dbl_scan);
    if (threadIdx.x == 0) {
        ws.chunk_total[c.chunk] = total;
        ws.kept[c.chunk] = kept_before;
    }
}

// One block per row. The keys come from kSrc:
// - kRow: the row's logits (n_src = vocab of them); the row's workspace is 4 * vocab words at
//   row * 4 * vocab: two key/index buffer pairs.
// - kTopk: the row's n_src candidates from topk_chunk_kernel (top_k > 0 is set), and the two
//   buffer pairs follow them in the row's row_words.
// - kNucleus: the candidates nucleus_compact_kernel left per chunk in the row's second buffer
//   pair (n_src = vocab; row_words = 4 * vocab), gathered in chunk order into the first, with
//   the row's total from its chunks' totals (nucleus: the per-row state after the rows' words).
// The buffers are written and read back by other threads of the block across __syncthreads, so
// they are not __restrict__ (no read-only cache path).
enum class Source { kRow, kTopk, kNucleus };

template <Source kSrc>
__global__ void __launch_bounds__(kSampleBlock)
    sample_kernel(int32_t *__restrict__ out, const float *__restrict__ logits,
                  const double *__restrict__ u, int32_t n_src, float temperature, int32_t top_k,
                  float top_p, uint32_t *workspace, int64_t row_words, NucleusLayout nucleus) {
    __shared__ SampleShared sh;
    const int tid = threadIdx.x;
    using Src = typename std::conditional<kSrc == Source::kTopk, CandidateKeys, RowKeys>::type;
    Src src;
    uint32_t *key_a = workspace + (int64_t)blockIdx.x * row_words;
    const float *row = nullptr;
    if constexpr (kSrc == Source::kTopk) {
        src = CandidateKeys{key_a, key_a + n_src};
        key_a += 2 * (int64_t)n_src;
    } else {
        row = logits + (int64_t)blockIdx.x * n_src;
        src = RowKeys{row};
    }
    uint32_t *id_a = key_a + n_src, *key_b = id_a + n_src, *id_b = key_b + n_src;

    // 1. The candidates, in index order, in (key_a, id_a); n of them.
    int n = top_k > 0 && top_k < n_src ? top_k : n_src;
    const bool nucleus_only = n == n_src && top_p > 0.0f && top_p < 1.0f;
    bool selected = false;  // kRow: n < n_src keys selected from the row
    uint32_t threshold = 0xffffffffu;  // kRow, kTopk: every key below it is a candidate,
    int ties = 0;                      // and the first `ties` keys equal to it
    double row_total = 0.0;            // kNucleus: the whole row's mass
    if constexpr (kSrc == Source::kNucleus) {
        // chunk c's candidates are at (key_b, id_b) + c * kNucleusChunk: every chunk before
        // the row's last is full, so their offsets are known; the copy keeps index order
        const NucleusRowWs ws = nucleus.row(blockIdx.x);
        n = 0;
        for (int32_t c = 0; c < nucleus.chunks; c++) {
            const int kept = ws.kept[c];
            const int64_t from = (int64_t)c * kNucleusChunk;
            for (int i = tid; i < kept; i += kSampleBlock) {
                key_a[n + i] = key_b[from + i];
                id_a[n + i] = id_b[from + i];
            }
            n += kept;
            row_total += ws.chunk_total[c];  // in chunk order: deterministic
        }
    } else {
        if (n < n_src) {
            select_kth(src, n_src, n, &threshold, &ties, sh);
        } else if (nucleus_only) {
            if constexpr (kSrc == Source::kRow)
                n = select_nucleus(row, n_src, (double)temperature, (double)top_p, &threshold,
                                   &ties, sh);
        }
        selected = n < n_src;
        if (selected) {
            compact_kept(src, n_src, n, threshold, ties, key_a, id_a, sh);
        } else {
            for (int i = tid; i < n_src; i += kSampleBlock) {
                key_a[i] = src.key(i);
                id_a[i] = src.id(i);
            }
        }
    }
    __syncthreads();

    // 2. Stable LSD radix sort of the candidates by key.
    uint32_t *src_k = key_a, *src_i = id_a, *dst_k = key_b, *dst_i = id_b;
    for (int shift = 0; shift < 32; shift += 8) {
        if (radix_pass(src_k, src_i, dst_k, dst_i, n, shift, sh)) {
            uint32_t *t = src_k;
            src_k = dst_k;
            dst_k = t;
            t = src_i;
            src_i = dst_i;
            dst_i = t;
        }
    }
    const uint32_t *sorted_k = src_k, *sorted_i = src_i;

    // 3. Weights exp(z - z_max) in double, z = logit / temperature, as sf_sample forms them.
    const double t = (double)temperature;
    const double z_max = (double)key_logit(sorted_k[0]) / t;
    auto weight = [&](int i) { return exp((double)key_logit(sorted_k[i]) / t - z_max); };
    double total = 0.0;
    if constexpr (kSrc == Source::kNucleus) {
        total = row_total;
    } else {
        total = block_sum(n, weight, sh);
    }
    if constexpr (kSrc == Source::kRow) {
        if (nucleus_only && selected) {
            // top_p's total is the whole row's: add the mass of the keys past the candidates
            // (all greater than the threshold; NaN ones too, as the full sort would)
            total += block_sum(
                n_src,
                [&](int i) {
                    const uint32_t k = sort_key(row[i]);
                    return k > threshold ? exp((double)key_logit(k) / t - z_max) : 0.0;
                },
                sh);
        }
    }

    // 4. The nucleus: the shortest prefix whose mass reaches top_p.
    int n_kept = n;
    if (top_p > 0.0f && top_p < 1.0f) {
        const double p = (double)top_p;
        const int cut = first_reaching(
            n, [&](int i) { return weight(i) / total; }, [&](double mass) { return mass >= p; },
            sh);
        n_kept = cut < n ? cut + 1 : n;
        total = block_sum(n_kept, weight, sh);
    }

    // 5. The draw: the first token whose running weight exceeds u * total.
    const double target = u[blockIdx.x] * total;
    const int pick = first_reaching(
        n_kept, weight, [&](double acc) { return target < acc; }, sh);
    if (tid == 0) out[blockIdx.x] = (int32_t)sorted_i[pick < n_kept ? pick : n_kept - 1];
}

sf_status check_rows(const char *who, int32_t *out, const float *logits, int64_t n_rows,
                     int32_t vocab) {
    if (n_rows < 0 || n_rows > 0x7fffffff || vocab < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n_rows = %lld, vocab = %d", who,
                       (long long)n_rows, vocab);
    }
    if (n_rows > 0 && (!out || !logits)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", who);
    }
    return SF_OK;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

namespace {

using sf_vec::aligned16;

// Rows split into chunks need n_rows * chunks blocks in one grid dimension.
bool fits_grid(int64_t n_rows, int32_t chunks) { return n_rows <= 0x7fffffff / chunks; }

// The split top-k's plan: chunks of kTopkChunk and the candidate count per row, or false when
// splitting does not pay (one chunk, or top_k too close to the chunk length for the candidates
// to be few) or the workspace layout does not fit in sf_cuda_sample_workspace_bytes' 4 * vocab
// words a row (6 * n_cand words are used: the candidates, then two key/index buffer pairs).
bool topk_split_plan(int64_t n_rows, int32_t vocab, int32_t top_k, int32_t *chunks,
                     int32_t *n_cand) {
    if (!(top_k > 0 && top_k < vocab) || vocab <= kTopkChunk || top_k > kTopkChunk / 4)
        return false;
    *chunks = (int32_t)sf_ceil_div(vocab, kTopkChunk);
    const int32_t last = vocab - (*chunks - 1) * kTopkChunk;
    *n_cand = (*chunks - 1) * top_k + (top_k < last ? top_k : last);
    return 2 * (int64_t)*n_cand <= vocab && fits_grid(n_rows, *chunks);
}

// The split prefix select's plan: top_k off (top_p alone, or plain sampling), rows longer than
// a chunk, and a workspace that holds the per-row state 8-byte aligned.
bool nucleus_split_plan(int64_t n_rows, int32_t vocab, int32_t top_k, const void *workspace,
                        int32_t *chunks) {
    if ((top_k > 0 && top_k < vocab) || vocab <= kNucleusChunk ||
        ((uintptr_t)workspace & 7u) != 0)
        return false;
    *chunks = (int32_t)sf_ceil_div(vocab, kNucleusChunk);
    return fits_grid(n_rows, *chunks);
}

}  // namespace

extern "C" size_t sf_cuda_argmax_workspace_bytes(int64_t n_rows, int32_t vocab) {
    if (n_rows < 0 || vocab < 1) return 0;
    const int32_t chunks = (int32_t)sf_ceil_div(vocab, kArgmaxChunk);
    if (chunks == 1) return 0;
    if ((uint64_t)n_rows > (uint64_t)SIZE_MAX / 8u / (uint64_t)chunks) return 0;
    return (size_t)n_rows * (size_t)chunks * 8u;
}

extern "C" sf_status sf_cuda_argmax_f32(int32_t *out, const float *logits, int64_t n_rows,
                                        int32_t vocab, void *workspace, size_t workspace_bytes,
                                        cudaStream_t stream) {
    sf_status st = check_rows("sf_cuda_argmax_f32", out, logits, n_rows, vocab);
    if (st != SF_OK) return st;
    if (workspace && (((uintptr_t)workspace & 7u) != 0 ||
                      workspace_bytes < sf_cuda_argmax_workspace_bytes(n_rows, vocab))) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_argmax_f32: workspace %p of %zu bytes (%zu needed, 8-byte "
                       "aligned)",
                       workspace, workspace_bytes, sf_cuda_argmax_workspace_bytes(n_rows, vocab));
    }
    if (n_rows == 0) return SF_OK;
    sf_nvtx_range range("sf_cuda_argmax_f32");
    int32_t chunks = (int32_t)sf_ceil_div(vocab, kArgmaxChunk);
    if (!workspace || !fits_grid(n_rows, chunks)) chunks = 1;
    const int32_t chunk = chunks == 1 ? vocab : kArgmaxChunk;
    auto *partial = static_cast<unsigned long long *>(workspace);
    const unsigned blocks = (unsigned)(n_rows * chunks);
    // float4 loads need every row (and chunk) to start 16-byte aligned
    if (aligned16(logits) && vocab % 4 == 0) {
        argmax_kernel<true><<<blocks, kArgmaxBlock, 0, stream>>>(out, partial, logits, vocab,
                                                                 chunk, chunks);
    } else {
        argmax_kernel<false><<<blocks, kArgmaxBlock, 0, stream>>>(out, partial, logits, vocab,
                                                                  chunk, chunks);
    }
    SF_CUDA_TRY(cudaGetLastError());
    if (chunks > 1) {
        const unsigned finish_blocks = (unsigned)((n_rows * 32 + kFinishBlock - 1) / kFinishBlock);
        argmax_finish_kernel<<<finish_blocks, kFinishBlock, 0, stream>>>(out, partial, chunks,
                                                                         n_rows);
        SF_CUDA_TRY(cudaGetLastError());
    }
    return SF_OK;
}

extern "C" size_t sf_cuda_sample_workspace_bytes(int64_t n_rows, int32_t vocab) {
    if (n_rows < 0 || vocab < 0) return 0;
    // two key/index buffer pairs, and the split top-p's state when rows can be split
    uint64_t per_row = 16u * (uint64_t)vocab;
    if (vocab > kNucleusChunk)
        per_row += (uint64_t)nucleus_row_bytes((int32_t)sf_ceil_div(vocab, kNucleusChunk));
    if (per_row > 0 && (uint64_t)n_rows > (uint64_t)SIZE_MAX / per_row) return 0;
    return (size_t)((uint64_t)n_rows * per_row);
}

extern "C" sf_status sf_cuda_sample_f32(int32_t *out, const float *logits, const double *u,
                                        int64_t n_rows, int32_t vocab, const sf_sampling *sampling,
                                        void *workspace, size_t workspace_bytes,
                                        cudaStream_t stream) {
    sf_status st = check_rows("sf_cuda_sample_f32", out, logits, n_rows, vocab);
    if (st != SF_OK) return st;
    if (!sampling) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_sample_f32: NULL sampling");
    if (sampling->temperature == INFINITY) {  // sf_sample refuses it too
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_sample_f32: the temperature is infinite");
    }
    if (!(sampling->temperature > 0.0f)) {
        // greedy: the split argmax when the workspace can hold its partial maxima
        const bool usable = workspace && ((uintptr_t)workspace & 7u) == 0 &&
                            workspace_bytes >= sf_cuda_argmax_workspace_bytes(n_rows, vocab);
        return sf_cuda_argmax_f32(out, logits, n_rows, vocab, usable ? workspace : NULL,
                                  usable ? workspace_bytes : 0, stream);
    }
    if (n_rows == 0) return SF_OK;
    const size_t need = sf_cuda_sample_workspace_bytes(n_rows, vocab);
    if (!u || !workspace || ((uintptr_t)workspace & 3u) != 0 || need == 0 ||
        workspace_bytes < need) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_sample_f32: u = %p, workspace = %p (%zu bytes; %zu needed, "
                       "4-byte aligned)",
                       (const void *)u, workspace, workspace_bytes, need);
    }
    sf_nvtx_range range("sf_cuda_sample_f32");
    auto *ws = static_cast<uint32_t *>(workspace);
    const float t = sampling->temperature, p = sampling->top_p;
    const int32_t k = sampling->top_k;
    const bool vec = aligned16(logits) && vocab % 4 == 0;
    int32_t chunks = 0, n_cand = 0;
    if (topk_split_plan(n_rows, vocab, k, &chunks, &n_cand)) {
        // top_k from each chunk, then the sampler over the candidates
        const int64_t row_words = 6 * (int64_t)n_cand;
        const unsigned blocks = (unsigned)(n_rows * chunks);
        if (vec) {
            topk_chunk_kernel<true><<<blocks, kSampleBlock, 0, stream>>>(
                ws, logits, vocab, chunks, k, n_cand, row_words);
        } else {
            topk_chunk_kernel<false><<<blocks, kSampleBlock, 0, stream>>>(
                ws, logits, vocab, chunks, k, n_cand, row_words);
        }
        SF_CUDA_TRY(cudaGetLastError());
        sample_kernel<Source::kTopk><<<(unsigned)n_rows, kSampleBlock, 0, stream>>>(
            out, logits, u, n_cand, t, k, p, ws, row_words, NucleusLayout{});
    } else if (nucleus_split_plan(n_rows, vocab, k, workspace, &chunks)) {
        // top_p alone or plain sampling: the bins that hold the nucleus (or the draw) over all
        // chunks, each chunk's candidates, then the sampler over them
        NucleusLayout layout;
        layout.base = static_cast<char *>(workspace) + (size_t)n_rows * 16u * (size_t)vocab;
        layout.chunks = chunks;
        const unsigned blocks = (unsigned)(n_rows * chunks), rows = (unsigned)n_rows;
        const double td = (double)t;
        // sums of up to vocab terms, each exp within an ulp, here and in sf_sample
        const double margin = 1e-9 + 4.0 * (double)vocab * 0x1p-53;
        nucleus_max_kernel<<<blocks, kSampleBlock, 0, stream>>>(logits, vocab, layout);
        nucleus_hist_kernel<0><<<blocks, kSampleBlock, 0, stream>>>(logits, vocab, td, layout);
        nucleus_pick_kernel<0><<<rows, kRadix, 0, stream>>>(layout, u, p, margin);
        nucleus_hist_kernel<1><<<blocks, kSampleBlock, 0, stream>>>(logits, vocab, td, layout);
        nucleus_pick_kernel<1><<<rows, kRadix, 0, stream>>>(layout, u, p, margin);
        nucleus_compact_kernel<<<blocks, kSampleBlock, 0, stream>>>(ws, logits, vocab, td,
                                                                     layout);
        SF_CUDA_TRY(cudaGetLastError());
        sample_kernel<Source::kNucleus><<<rows, kSampleBlock, 0, stream>>>(
            out, logits, u, vocab, t, k, p, ws, 4 * (int64_t)vocab, layout);
    } else {
        sample_kernel<Source::kRow><<<(unsigned)n_rows, kSampleBlock, 0, stream>>>(
            out, logits, u, vocab, t, k, p, ws, 4 * (int64_t)vocab, NucleusLayout{});
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

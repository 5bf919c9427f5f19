// Internal to rmsnorm.cu and layernorm.cu: bf16 packs in registers, the row reduction, the choice
// of kernel variant and the argument checks the two launchers share (see norms.h).
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include <cmath>

#include "cuda_check.cuh"
#include "f32_vec.cuh"
#include "norms.h"

namespace sf_norms {

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

// How many VEC-wide chunks one thread keeps in registers. The 128-bit path holds 4 x 8 values
// (16 registers of packed bf16), the scalar path 16 x 1; with 1024 threads per row both reach
// SF_CUDA_NORM_MAX_DIM while staying inside the 64 registers a 1024-thread block allows.
template <int VEC>
__host__ __device__ constexpr int max_chunks() {
    return VEC == 8 ? 4 : 16;
}

// VEC consecutive bf16 values as raw bits, two per 32-bit word (one, in the low half, when
// VEC == 1). Every value a kernel holds is exactly a bf16 (x, or x + residual already rounded),
// so keeping bits instead of floats halves the registers a row needs.
template <int VEC>
struct Pack {
    static_assert(VEC == 8 || VEC == 1, "the norms move 8 bf16 (128 bits) or 1 at a time");
    uint32_t w[VEC == 8 ? 4 : 1];
};

// Plain (coherent) loads for x and residual, which may alias an output.
template <int VEC>
__device__ __forceinline__ Pack<VEC> load_pack(const uint16_t *p) {
    Pack<VEC> r;
    if constexpr (VEC == 8) {
        const uint4 u = *reinterpret_cast<const uint4 *>(p);
        r.w[0] = u.x;
        r.w[1] = u.y;
        r.w[2] = u.z;
        r.w[3] = u.w;
    } else {
        r.w[0] = *p;
    }
    return r;
}

// Read-only-cache loads for w and b, which no thread writes.
template <int VEC>
__device__ __forceinline__ Pack<VEC> load_pack_ro(const uint16_t *p) {
    Pack<VEC> r;
    if constexpr (VEC == 8) {
        const uint4 u = __ldg(reinterpret_cast<const uint4 *>(p));
        r.w[0] = u.x;
        r.w[1] = u.y;
        r.w[2] = u.z;
        r.w[3] = u.w;
    } else {
        r.w[0] = __ldg(reinterpret_cast<const unsigned short *>(p));
    }
    return r;
}

template <int VEC>
__device__ __forceinline__ void store_pack(uint16_t *p, const Pack<VEC> &v) {
    if constexpr (VEC == 8) {
        *reinterpret_cast<uint4 *>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
    } else {
        *p = (uint16_t)v.w[0];
    }
}

// Value i of a pack as fp32 (exact: a bf16 is the top half of an fp32). i must be a
// compile-time constant after unrolling so the pack stays in registers.
template <int VEC>
__device__ __forceinline__ float pack_get(const Pack<VEC> &p, int i) {
    if constexpr (VEC == 8) {
        const uint32_t word = p.w[i >> 1];
        return __uint_as_float((i & 1) ? (word & 0xffff0000u) : (word << 16));
    } else {
        return __uint_as_float(p.w[0] << 16);
    }
}

// fp32 -> bf16 bits, round to nearest even (as the host's to_bf16 and torch's .to(bfloat16)).
__device__ __forceinline__ uint32_t bf16_bits(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

template <int VEC>
__device__ __forceinline__ Pack<VEC> pack_from(const float (&f)[VEC]) {
    Pack<VEC> r;
    if constexpr (VEC == 8) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            r.w[i] = bf16_bits(f[2 * i]) | (bf16_bits(f[2 * i + 1]) << 16);
        }
    } else {
        r.w[0] = bf16_bits(f[0]);
    }
    return r;
}

// bf16(a + b) elementwise: one fp32 addition, one rounding, the same bits the CPU gets from
// sf_cpu_add followed by a bf16 rounding.
template <int VEC>
__device__ __forceinline__ Pack<VEC> add_round(const Pack<VEC> &a, const Pack<VEC> &b) {
    float s[VEC];
#pragma unroll
    for (int i = 0; i < VEC; i++) s[i] = __fadd_rn(pack_get(a, i), pack_get(b, i));
    return pack_from<VEC>(s);
}

// Sum of v over the TPR threads of a row; every one of them gets the same bits back (an xor
// butterfly adds the same two operands on both sides of each exchange, and fp32 addition is
// commutative, so all lanes it spans agree). For TPR > 32 the warps' partials meet in
// `partial` (TPR / 32 floats); each reduction of a kernel needs its own array, which saves a
// second barrier.
template <int TPR>
__device__ __forceinline__ float row_sum(float v, float *partial) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if constexpr (TPR > 32) {
        constexpr int kWarps = TPR / 32;
        const int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
        if (lane == 0) partial[warp] = v;
        __syncthreads();
        // Lanes [0, kWarps) of every warp combine the partials; lane 0 then holds the sum and
        // hands it to the rest of its warp.
        v = lane < kWarps ? partial[lane] : 0.0f;
#pragma unroll
        for (int o = kWarps / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        v = __shfl_sync(0xffffffffu, v, 0);
    } else {
        (void)partial;
    }
    return v;
}

// ---------------------------------------------------------------------------------------------
// Device helpers for the backward kernels (norms.h, "Backward")
// ---------------------------------------------------------------------------------------------

// The backward holds the row twice per value (x as bf16 bits, the fp32 product g = dy * w), so a
// thread keeps 16 values: 2 chunks of 8 on the 128-bit path, 16 scalars on the scalar path. At
// 1024 threads per row both reach SF_CUDA_NORM_MAX_DIM and stay inside the 64 registers a
// 1024-thread block allows, without spills (-Xptxas -v); 32 values, as the forward holds, would
// not.
template <int VEC>
__host__ __device__ constexpr int bwd_chunks() {
    return VEC == 8 ? 2 : 16;
}

// fp32 gradient rows: sf_vec::load_f32 / store_f32 (f32_vec.cuh).
using sf_vec::load_f32;
using sf_vec::store_f32;

// Two row sums at once (row_sum's butterfly and partials, one barrier for both); every thread
// of the row gets the same bits back. partial holds 2 * (TPR / 32) floats.
template <int TPR>
__device__ __forceinline__ float2 row_sum2(float a, float b, float *partial) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    if constexpr (TPR > 32) {
        constexpr int kWarps = TPR / 32;
        const int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
        if (lane == 0) {
            partial[warp] = a;
            partial[kWarps + warp] = b;
        }
        __syncthreads();
        a = lane < kWarps ? partial[lane] : 0.0f;
        b = lane < kWarps ? partial[kWarps + lane] : 0.0f;
#pragma unroll
        for (int o = kWarps / 2; o > 0; o >>= 1) {
            a += __shfl_xor_sync(0xffffffffu, a, o);
            b += __shfl_xor_sync(0xffffffffu, b, o);
        }
        a = __shfl_sync(0xffffffffu, a, 0);
        b = __shfl_sync(0xffffffffu, b, 0);
    } else {
        (void)partial;
    }
    return make_float2(a, b);
}

// The backward row kernels' loads (rmsnorm.cu, layernorm.cu): for chunk k of thread t (at
// t + k * TPR) inside the row, x as bf16 bits in h[k] and dy * w in fp32 in g[k]; chunks past
// the row keep the caller's zeros. Every load comes before any store, so dx may be dy.
template <int VEC, int TPR, int kChunks>
__device__ __forceinline__ void load_backward_row(Pack<VEC> (&h)[kChunks],
                                                  float (&g)[kChunks][VEC],
                                                  const uint16_t *__restrict__ x, const float *dy,
                                                  const uint16_t *__restrict__ w, int64_t base,
                                                  int t, int n_chunks) {
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        const int c = t + k * TPR;
        if (c < n_chunks) {
            h[k] = load_pack<VEC>(x + base + (int64_t)c * VEC);
            load_f32<VEC>(dy + base + (int64_t)c * VEC, g[k]);
            const Pack<VEC> wp = load_pack_ro<VEC>(w + (int64_t)c * VEC);
#pragma unroll
            for (int i = 0; i < VEC; i++) g[k][i] *= pack_get(wp, i);
        }
    }
}

// Their stores: dx = (accumulate ? dx : 0) + grad(k, i) over the same chunks.
template <int VEC, int TPR, int kChunks, typename Grad>
__device__ __forceinline__ void store_backward_row(float *dx, bool accumulate, int64_t base,
                                                   int t, int n_chunks, Grad grad) {
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        const int c = t + k * TPR;
        if (c < n_chunks) {
            float *p = dx + base + (int64_t)c * VEC;
            float o[VEC];
            if (accumulate) {
                load_f32<VEC>(p, o);
            } else {
#pragma unroll
                for (int i = 0; i < VEC; i++) o[i] = 0.0f;
            }
#pragma unroll
            for (int i = 0; i < VEC; i++) o[i] += grad(k, i);
            store_f32<VEC>(p, o);
        }
    }
}

// The weight (and bias) gradients: column sums over all rows, deterministic. Block (32, kLanes):
// threadIdx.x picks one of 32 adjacent columns (a warp reads 128 contiguous bytes of dy per
// row), threadIdx.y one of kLanes interleaved row lanes; each lane sums its rows in order, then
// row lane 0 adds the kLanes partials in lane order to dw (and db). No atomics, so the result
// does not depend on scheduling. stats[r] = (mean, inverse deviation) of row r as the row
// kernel computed them (mean 0 for RMSNorm), so x_hat = (x - mean) * inv.
constexpr int kParamLanes = 16;

namespace {
__global__ void __launch_bounds__(32 * kParamLanes)
    norm_param_grad_kernel(float *__restrict__ dw, float *__restrict__ db,
                           const float *__restrict__ dy, const uint16_t *__restrict__ x,
                           const float2 *__restrict__ stats, int64_t rows, int dim) {
    __shared__ float sw[kParamLanes][33], sb[kParamLanes][33];
    const int j = (int)blockIdx.x * 32 + (int)threadIdx.x;
    float aw = 0.0f, ab = 0.0f;
    if (j < dim) {
#pragma unroll 4
        for (int64_t r = threadIdx.y; r < rows; r += kParamLanes) {
            const float2 s = stats[r];
            const float d = dy[r * dim + j];
            const float xv = __uint_as_float((uint32_t)x[r * dim + j] << 16);
            aw = fmaf(d, (xv - s.x) * s.y, aw);
            ab += d;
        }
    }
    sw[threadIdx.y][threadIdx.x] = aw;
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && j < dim) {
        float tw = sw[0][threadIdx.x], tb = sb[0][threadIdx.x];
#pragma unroll
        for (int l = 1; l < kParamLanes; l++) {
            tw += sw[l][threadIdx.x];
            tb += sb[l][threadIdx.x];
        }
        if (dw) dw[j] += tw;
        if (db) db[j] += tb;
    }
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// Host side: variant choice and argument checks
// ---------------------------------------------------------------------------------------------

// A kernel variant as types, for the launchers' generic lambdas.
template <int VEC, int TPR>
struct Variant {
    static constexpr int vec = VEC;
    static constexpr int threads_per_row = TPR;
    // Short rows: four warps per block, one row each, so a block is not a lone warp.
    static constexpr int rows_per_block = TPR == 32 ? 4 : 1;
    static constexpr int block = TPR * rows_per_block;
};

struct Plan {
    int vec;
    int threads_per_row;
};

inline int64_t capacity(int vec, int threads_per_row) {
    return (int64_t)threads_per_row * (vec == 8 ? max_chunks<8>() : max_chunks<1>()) * vec;
}

inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

inline bool valid_threads_per_row(int t) {
    return t == 0 || t == 32 || t == 64 || t == 128 || t == 256 || t == 512 || t == 1024;
}

// The sizes, eps and threads_per_row, as every norm launcher (forward and backward) takes them.
inline sf_status check_shape(const char *fn, int64_t rows, int64_t dim, float eps,
                             int threads_per_row) {
    if (rows < 0 || rows > INT32_MAX || dim < 0 || dim > SF_CUDA_NORM_MAX_DIM) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: rows = %lld, dim = %lld (need 0 <= rows <= %d, 0 <= dim <= %d)", fn,
                       (long long)rows, (long long)dim, INT32_MAX, SF_CUDA_NORM_MAX_DIM);
    }
    if (!(eps >= 0.0f) || std::isinf(eps)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: eps = %g (need a finite eps >= 0)", fn,
                       (double)eps);
    }
    if (!valid_threads_per_row(threads_per_row)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: threads_per_row = %d (need 0, 32, 64, 128, 256, 512 or 1024)", fn,
                       threads_per_row);
    }
    return SF_OK;
}

// Checks what both norms share; `fn` names the public launcher in the message.
inline sf_status check_args(const char *fn, const void *out, const void *residual_out,
                            const void *x, const void *residual, const void *w, const void *b,
                            int64_t rows, int64_t dim, float eps, int threads_per_row) {
    if (!out || !x || !w) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL %s", fn,
                       !out ? "out" : !x ? "x" : "w");
    }
    // A bf16 pointer off its 2-byte alignment is a corrupt offset, not a view (on a GPU the
    // scalar path would fault with a misaligned address, which no later call survives).
    if (((uintptr_t)out | (uintptr_t)residual_out | (uintptr_t)x | (uintptr_t)residual |
         (uintptr_t)w | (uintptr_t)b) & 1u) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: pointer not aligned to its element: out=%p residual_out=%p x=%p "
                       "residual=%p w=%p b=%p", fn, out, residual_out, x, residual, w, b);
    }
    if (out == residual_out) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: out and residual_out are the same buffer",
                       fn);
    }
    const sf_status st = check_shape(fn, rows, dim, eps, threads_per_row);
    if (st != SF_OK) return st;
    return SF_OK;
}

// Picks the path and the threads per row. Automatic: the fewest threads that hold the row, so
// a warp per row for short rows, else a block per row. A thread's register chunks are sized for
// max_chunks whatever it uses, so filling them costs no occupancy and gives each SM the most
// loads in flight (d = 4096: 128 threads x 4 chunks, twice the bytes in flight per SM of
// 256 x 2 at the same registers per thread). cap is the row length a variant holds: capacity
// for the forward, capacity_bwd for the backward.
inline sf_status plan_with(const char *fn, int64_t dim, bool vector_ok, int threads_per_row,
                           int64_t (*cap)(int vec, int threads_per_row), Plan *p) {
    p->vec = vector_ok ? 8 : 1;
    p->threads_per_row = threads_per_row;
    if (threads_per_row == 0) {
        p->threads_per_row = 1024;
        for (int t = 32; t <= 1024; t *= 2) {
            if (dim <= cap(p->vec, t)) {
                p->threads_per_row = t;
                break;
            }
        }
    }
    if (dim > cap(p->vec, p->threads_per_row)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: dim = %lld does not fit %d threads per row on the %s path (at most "
                       "%lld)",
                       fn, (long long)dim, p->threads_per_row,
                       p->vec == 8 ? "128-bit" : "scalar",
                       (long long)cap(p->vec, p->threads_per_row));
    }
    return SF_OK;
}

inline sf_status plan(const char *fn, int64_t dim, bool vector_ok, int threads_per_row,
                      Plan *p) {
    return plan_with(fn, dim, vector_ok, threads_per_row, capacity, p);
}

// Calls launch(Variant<vec, threads_per_row>{}) for the planned variant, so each kernel is
// instantiated once per variant and chosen at run time.
template <int VEC, typename Launch>
void with_threads(int threads_per_row, Launch &&launch) {
    switch (threads_per_row) {
    case 32: launch(Variant<VEC, 32>{}); break;
    case 64: launch(Variant<VEC, 64>{}); break;
    case 128: launch(Variant<VEC, 128>{}); break;
    case 256: launch(Variant<VEC, 256>{}); break;
    case 512: launch(Variant<VEC, 512>{}); break;
    default: launch(Variant<VEC, 1024>{}); break;
    }
}

template <typename Launch>
void with_variant(const Plan &p, Launch &&launch) {
    if (p.vec == 8) {
        with_threads<8>(p.threads_per_row, launch);
    } else {
        with_threads<1>(p.threads_per_row, launch);
    }
}

// ---------------------------------------------------------------------------------------------
// Host side of the backward
// ---------------------------------------------------------------------------------------------

inline int64_t capacity_bwd(int vec, int threads_per_row) {
    return (int64_t)threads_per_row * (vec == 8 ? bwd_chunks<8>() : bwd_chunks<1>()) * vec;
}

// The backward's plan: the forward's rule with the backward's 16 values per thread.
inline sf_status plan_bwd(const char *fn, int64_t dim, bool vector_ok, int threads_per_row,
                          Plan *p) {
    return plan_with(fn, dim, vector_ok, threads_per_row, capacity_bwd, p);
}

// Checks what both backward launchers share, before any CUDA call. want_params: dw or db.
inline sf_status check_bwd_args(const char *fn, const float *dx, const float *dy, const void *x,
                                const void *w, int64_t rows, int64_t dim, float eps,
                                bool want_params, const void *workspace,
                                size_t workspace_bytes, int threads_per_row) {
    if (!dy || !x || !w) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL %s", fn,
                       !dy ? "dy" : !x ? "x" : "w");
    }
    const sf_status st = check_shape(fn, rows, dim, eps, threads_per_row);
    if (st != SF_OK) return st;
    // A pointer off its element's alignment is a corrupt offset, not a view.
    if (((uintptr_t)dx & 3u) || ((uintptr_t)dy & 3u) || ((uintptr_t)x & 1u) ||
        ((uintptr_t)w & 1u)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: pointer not aligned to its element: dx=%p dy=%p x=%p w=%p", fn,
                       (const void *)dx, (const void *)dy, x, w);
    }
    if (want_params) {
        const size_t need = sf_cuda_norm_backward_workspace_bytes(rows);
        if (!workspace || ((uintptr_t)workspace & 7u) || workspace_bytes < need) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "%s: dw or db wanted: workspace %p of %zu bytes (need %zu, 8-byte "
                           "aligned)",
                           fn, workspace, workspace_bytes, need);
        }
    }
    return SF_OK;
}

// Enqueues the column-sum kernel (see norm_param_grad_kernel) over rows x dim.
inline void launch_param_grads(float *dw, float *db, const float *dy, const uint16_t *x,
                               const float2 *stats, int64_t rows, int64_t dim,
                               cudaStream_t stream) {
    const dim3 block(32, kParamLanes);
    norm_param_grad_kernel<<<(unsigned)sf_ceil_div(dim, 32), block, 0, stream>>>(
        dw, db, dy, x, stats, rows, (int)dim);
}

// What both backward launchers do once their arguments are checked: plan the variant, then
// rows(plan, dx, accumulate, stats) enqueues the row kernel (dx or stats may be NULL) and the
// column sums give dw (and db). When dx overwrites dy the column sums need the original dy, so
// the statistics come first, then the column sums, then dx.
template <typename Rows>
sf_status run_backward(const char *fn, float *dx, bool accumulate_dx, float *dw, float *db,
                       const float *dy, const uint16_t *x, const uint16_t *w, int64_t rows,
                       int64_t dim, void *workspace, int threads_per_row, cudaStream_t stream,
                       Rows &&row_kernel) {
    const bool params = dw || db;
    if (rows == 0 || dim == 0 || (!dx && !params)) return SF_OK;
    const bool vector_ok = dim % 8 == 0 && aligned16(dx) && aligned16(dy) && aligned16(x) &&
                           aligned16(w);
    Plan plan;
    const sf_status st = plan_bwd(fn, dim, vector_ok, threads_per_row, &plan);
    if (st != SF_OK) return st;

    sf_nvtx_range range(fn);
    float2 *stats = static_cast<float2 *>(params ? workspace : nullptr);
    if (params && dx == dy) {
        row_kernel(plan, nullptr, false, stats);
        launch_param_grads(dw, db, dy, x, stats, rows, dim, stream);
        row_kernel(plan, dx, accumulate_dx, nullptr);
    } else {
        row_kernel(plan, dx, accumulate_dx, stats);
        if (params) launch_param_grads(dw, db, dy, x, stats, rows, dim, stream);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

}  // namespace sf_norms

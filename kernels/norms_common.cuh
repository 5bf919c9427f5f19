// Internal to rmsnorm.cu and layernorm.cu: bf16 packs in registers, the row reduction, the choice
// of kernel variant and the argument checks the two launchers share (see norms.h).
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include <cmath>

#include "cuda_check.cuh"
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
// Host side: variant choice and argument checks
// ---------------------------------------------------------------------------------------------

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// Checks what both norms share; `fn` names the public launcher in the message.
inline sf_status check_args(const char *fn, const void *out, const void *residual_out,
                            const void *x, const void *w, int64_t rows, int64_t dim, float eps,
                            int threads_per_row) {
    if (!out || !x || !w) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL %s", fn,
                       !out ? "out" : !x ? "x" : "w");
    }
    if (out == residual_out) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: out and residual_out are the same buffer",
                       fn);
    }
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

// Picks the path and the threads per row. Automatic: the fewest threads that hold the row, so
// a warp per row for short rows, else a block per row. A thread's register chunks are sized for
// max_chunks whatever it uses, so filling them costs no occupancy and gives each SM the most
// loads in flight (d = 4096: 128 threads x 4 chunks, twice the bytes in flight per SM of
// 256 x 2 at the same registers per thread).
inline sf_status plan(const char *fn, int64_t dim, bool vector_ok, int threads_per_row,
                      Plan *p) {
    p->vec = vector_ok ? 8 : 1;
    p->threads_per_row = threads_per_row;
    if (threads_per_row == 0) {
        p->threads_per_row = 1024;
        for (int t = 32; t <= 1024; t *= 2) {
            if (dim <= capacity(p->vec, t)) {
                p->threads_per_row = t;
                break;
            }
        }
    }
    if (dim > capacity(p->vec, p->threads_per_row)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: dim = %lld does not fit %d threads per row on the %s path (at most "
                       "%lld)",
                       fn, (long long)dim, p->threads_per_row,
                       p->vec == 8 ? "128-bit" : "scalar",
                       (long long)capacity(p->vec, p->threads_per_row));
    }
    return SF_OK;
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

}  // namespace sf_norms

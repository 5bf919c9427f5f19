// RMSNorm on bf16 rows, fused with the residual add. CPU twin: host/cpu/rmsnorm.c (with
// host/cpu/activations.c's sf_cpu_add for the residual). Contract and paths: norms.h.
#include "norms_common.cuh"

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// TPR threads per row, ROWS rows per block; thread t of a row owns chunks t, t + TPR, ... of VEC
// values. Memory traffic is the floor: x and residual read once, residual_out and out written
// once, w read from L2 (every row shares it).
template <int VEC, int TPR, int ROWS>
__global__ void __launch_bounds__(TPR * ROWS)
    rmsnorm_bf16_kernel(uint16_t *out, uint16_t *residual_out, const uint16_t *x,
                        const uint16_t *residual, const uint16_t *__restrict__ w, int64_t rows,
                        int dim, float eps) {
    using sf_norms::Pack;
    constexpr int kChunks = sf_norms::max_chunks<VEC>();
    static_assert(ROWS == 1 || TPR == 32, "several rows per block only with a warp per row");
    __shared__ float partial[TPR > 32 ? TPR / 32 : 1];

    const int64_t row = (int64_t)blockIdx.x * ROWS + threadIdx.x / TPR;
    // Only the warp-per-row variant can get here with a row past the end, and then it is a
    // whole warp that leaves: no barrier is left waiting.
    if (row >= rows) return;
    const int t = (int)(threadIdx.x % TPR);
    const int n_chunks = dim / VEC;
    const int64_t base = row * dim;

    // Every load first: outputs may alias x and residual, so a store in between would stop the
    // compiler from issuing the loads together.
    Pack<VEC> h[kChunks] = {}, r[kChunks] = {};
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        const int c = t + k * TPR;
        if (c < n_chunks) {
            h[k] = sf_norms::load_pack<VEC>(x + base + (int64_t)c * VEC);
            if (residual) r[k] = sf_norms::load_pack<VEC>(residual + base + (int64_t)c * VEC);
        }
    }

    // h = bf16(x + residual), written back as the residual stream; sum of squares in fp32.
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        const int c = t + k * TPR;
        if (c < n_chunks) {
            if (residual) h[k] = sf_norms::add_round<VEC>(h[k], r[k]);
            if (residual_out) {
                sf_norms::store_pack<VEC>(residual_out + base + (int64_t)c * VEC, h[k]);
            }
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                const float v = sf_norms::pack_get(h[k], i);
                ss = fmaf(v, v, ss);
            }
        }
    }
    ss = sf_norms::row_sum<TPR>(ss, partial);
    const float inv_rms = rsqrtf(ss / (float)dim + eps);

    // The weight chunks, all requested before the first store (w is L2-resident: every row
    // reads it). The scalar path, a fallback, loads each where it is used instead: sixteen more
    // live registers would spill at 1024 threads per row.
    constexpr bool kPrefetch = VEC == 8;
    Pack<VEC> wp[kChunks] = {};
    if constexpr (kPrefetch) {
#pragma unroll
        for (int k = 0; k < kChunks; k++) {
            const int c = t + k * TPR;
            if (c < n_chunks) wp[k] = sf_norms::load_pack_ro<VEC>(w + (int64_t)c * VEC);
        }
    }

    // out = w * (h * inv_rms): the CPU twin's order of products, one bf16 rounding at the end.
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        const int c = t + k * TPR;
        if (c < n_chunks) {
            if constexpr (!kPrefetch) wp[k] = sf_norms::load_pack_ro<VEC>(w + (int64_t)c * VEC);
            float o[VEC];
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                o[i] = sf_norms::pack_get(wp[k], i) * (sf_norms::pack_get(h[k], i) * inv_rms);
            }
            sf_norms::store_pack<VEC>(out + base + (int64_t)c * VEC, sf_norms::pack_from<VEC>(o));
        }
    }
}

// Backward (norms.h): the forward's row layout (TPR threads per row, ROWS rows per block, chunk
// k of thread t at t + k * TPR) with bwd_chunks per thread. x, dy and w are read once; x stays
// in registers as bf16 bits and dy * w as fp32 until dx is written. dx is NULL for the
// statistics-only pass, stats NULL when no weight gradient is wanted.
template <int VEC, int TPR, int ROWS>
__global__ void __launch_bounds__(TPR * ROWS)
    rmsnorm_backward_kernel(float *dx, bool accumulate, float2 *__restrict__ stats,
                            const float *dy, const uint16_t *__restrict__ x,
                            const uint16_t *__restrict__ w, int64_t rows, int dim, float eps) {
    using sf_norms::Pack;
    constexpr int kChunks = sf_norms::bwd_chunks<VEC>();
    static_assert(ROWS == 1 || TPR == 32, "several rows per block only with a warp per row");
    __shared__ float partial[TPR > 32 ? 2 * (TPR / 32) : 1];

    const int64_t row = (int64_t)blockIdx.x * ROWS + threadIdx.x / TPR;
    if (row >= rows) return;  // a whole warp (warp-per-row variant only): no barrier waits
    const int t = (int)(threadIdx.x % TPR);
    const int n_chunks = dim / VEC;
    const int64_t base = row * dim;

    // Every load first; dx may be dy, and each element is read by the thread that writes it.
    Pack<VEC> h[kChunks] = {};
    float g[kChunks][VEC] = {};
    sf_norms::load_backward_row<VEC, TPR, kChunks>(h, g, x, dy, w, base, t, n_chunks);

    // sum(x^2) for r, sum(g x) for the gradient through r: one reduction for both.
    float ss = 0.0f, gx = 0.0f;
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
#pragma unroll
        for (int i = 0; i < VEC; i++) {
            const float v = sf_norms::pack_get(h[k], i);
            ss = fmaf(v, v, ss);
            gx = fmaf(g[k][i], v, gx);
        }
    }
    const float2 sums = sf_norms::row_sum2<TPR>(ss, gx, partial);
    const float r = rsqrtf(sums.x / (float)dim + eps);
    if (stats && t == 0) stats[row] = make_float2(0.0f, r);
    if (!dx) return;

    // dx = r g - x c with c = r^3 / dim * sum(g x).
    const float c = r * r * r * (sums.y / (float)dim);
    sf_norms::store_backward_row<VEC, TPR, kChunks>(
        dx, accumulate, base, t, n_chunks,
        [&](int k, int i) { return r * g[k][i] - sf_norms::pack_get(h[k], i) * c; });
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

extern "C" sf_status sf_cuda_rmsnorm_bf16_variant(sf_bf16 *out, sf_bf16 *residual_out,
                                                  const sf_bf16 *x, const sf_bf16 *residual,
                                                  const sf_bf16 *w, int64_t rows, int64_t dim,
                                                  float eps, int threads_per_row,
                                                  cudaStream_t stream) {
    static const char fn[] = "sf_cuda_rmsnorm_bf16";
    sf_status st = sf_norms::check_args(fn, out, residual_out, x, residual, w, nullptr, rows, dim,
                                        eps, threads_per_row);
    if (st != SF_OK) return st;
    if (rows == 0 || dim == 0) return SF_OK;
    const bool vector_ok = dim % 8 == 0 && sf_norms::aligned16(out) &&
                           sf_norms::aligned16(residual_out) && sf_norms::aligned16(x) &&
                           sf_norms::aligned16(residual) && sf_norms::aligned16(w);
    sf_norms::Plan plan;
    st = sf_norms::plan(fn, dim, vector_ok, threads_per_row, &plan);
    if (st != SF_OK) return st;

    sf_nvtx_range range(fn);
    sf_norms::with_variant(plan, [&](auto variant) {
        using V = decltype(variant);
        const int64_t grid = sf_ceil_div(rows, V::rows_per_block);
        rmsnorm_bf16_kernel<V::vec, V::threads_per_row, V::rows_per_block>
            <<<(unsigned)grid, V::block, 0, stream>>>(out, residual_out, x, residual, w, rows,
                                                      (int)dim, eps);
    });
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_rmsnorm_bf16(sf_bf16 *out, sf_bf16 *residual_out, const sf_bf16 *x,
                                          const sf_bf16 *residual, const sf_bf16 *w,
                                          int64_t rows, int64_t dim, float eps,
                                          cudaStream_t stream) {
    return sf_cuda_rmsnorm_bf16_variant(out, residual_out, x, residual, w, rows, dim, eps, 0,
                                        stream);
}

extern "C" sf_status sf_cuda_rmsnorm_backward_variant(float *dx, bool accumulate_dx, float *dw,
                                                      const float *dy, const sf_bf16 *x,
                                                      const sf_bf16 *w, int64_t rows,
                                                      int64_t dim, float eps, void *workspace,
                                                      size_t workspace_bytes,
                                                      int threads_per_row, cudaStream_t stream) {
    static const char fn[] = "sf_cuda_rmsnorm_backward";
    const sf_status st = sf_norms::check_bwd_args(fn, dx, dy, x, w, rows, dim, eps,
                                                  dw != nullptr, workspace, workspace_bytes,
                                                  threads_per_row);
    if (st != SF_OK) return st;
    return sf_norms::run_backward(
        fn, dx, accumulate_dx, dw, nullptr, dy, x, w, rows, dim, workspace, threads_per_row,
        stream, [&](const sf_norms::Plan &plan, float *out, bool accumulate, float2 *stats) {
            sf_norms::with_variant(plan, [&](auto variant) {
                using V = decltype(variant);
                const int64_t grid = sf_ceil_div(rows, V::rows_per_block);
                rmsnorm_backward_kernel<V::vec, V::threads_per_row, V::rows_per_block>
                    <<<(unsigned)grid, V::block, 0, stream>>>(out, accumulate, stats, dy, x, w,
                                                              rows, (int)dim, eps);
            });
        });
}

extern "C" sf_status sf_cuda_rmsnorm_backward(float *dx, bool accumulate_dx, float *dw,
                                              const float *dy, const sf_bf16 *x, const sf_bf16 *w,
                                              int64_t rows, int64_t dim, float eps,
                                              void *workspace, size_t workspace_bytes,
                                              cudaStream_t stream) {
    return sf_cuda_rmsnorm_backward_variant(dx, accumulate_dx, dw, dy, x, w, rows, dim, eps,
                                            workspace, workspace_bytes, 0, stream);
}

extern "C" size_t sf_cuda_norm_backward_workspace_bytes(int64_t rows) {
    return rows > 0 ? (size_t)rows * sizeof(float2) : 0;
}

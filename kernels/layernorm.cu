// LayerNorm (torch.nn.LayerNorm semantics) on bf16 rows, fused with the residual add. CPU twin:
// host/cpu/layernorm.c (with host/cpu/activations.c's sf_cpu_add for the residual). Contract and
// paths: norms.h.
#include "norms_common.cuh"

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// The layout of rmsnorm_bf16_kernel (TPR threads per row, ROWS rows per block, chunk k of thread
// t at t + k * TPR). The row stays in registers, so the variance is a true second pass over
// (h - mean)^2 at no memory cost: no E[h^2] - E[h]^2 cancellation when the mean is large
// against the spread.
template <int VEC, int TPR, int ROWS>
__global__ void __launch_bounds__(TPR * ROWS)
    layernorm_bf16_kernel(uint16_t *out, uint16_t *residual_out, const uint16_t *x,
                          const uint16_t *residual, const uint16_t *__restrict__ w,
                          const uint16_t *__restrict__ b, int64_t rows, int dim, float eps) {
    using sf_norms::Pack;
    constexpr int kChunks = sf_norms::max_chunks<VEC>();
    static_assert(ROWS == 1 || TPR == 32, "several rows per block only with a warp per row");
    // One array per reduction, so the second needs no barrier to protect the first's reads.
    __shared__ float partial_sum[TPR > 32 ? TPR / 32 : 1];
    __shared__ float partial_sq[TPR > 32 ? TPR / 32 : 1];

    const int64_t row = (int64_t)blockIdx.x * ROWS + threadIdx.x / TPR;
    // Only the warp-per-row variant can get here with a row past the end, and then it is a
    // whole warp that leaves: no barrier is left waiting.
    if (row >= rows) return;
    const int t = (int)(threadIdx.x % TPR);
    const int n_chunks = dim / VEC;
    const int64_t base = row * dim;

    // Every load first (outputs may alias x and residual; see rmsnorm_bf16_kernel).
    Pack<VEC> h[kChunks] = {}, r[kChunks] = {};
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        const int c = t + k * TPR;
        if (c < n_chunks) {
            h[k] = sf_norms::load_pack<VEC>(x + base + (int64_t)c * VEC);
            if (residual) r[k] = sf_norms::load_pack<VEC>(residual + base + (int64_t)c * VEC);
        }
    }

    // Pass 1: h = bf16(x + residual), written back as the residual stream; the row sum.
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        const int c = t + k * TPR;
        if (c < n_chunks) {
            if (residual) h[k] = sf_norms::add_round<VEC>(h[k], r[k]);
            if (residual_out) {
                sf_norms::store_pack<VEC>(residual_out + base + (int64_t)c * VEC, h[k]);
            }
#pragma unroll
            for (int i = 0; i < VEC; i++) sum += sf_norms::pack_get(h[k], i);
        }
    }
    const float mean = sf_norms::row_sum<TPR>(sum, partial_sum) / (float)dim;

    // Pass 2, over registers: the biased variance around that mean.
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        const int c = t + k * TPR;
        if (c < n_chunks) {
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                const float d = sf_norms::pack_get(h[k], i) - mean;
                sq = fmaf(d, d, sq);
            }
        }
    }
    const float var = sf_norms::row_sum<TPR>(sq, partial_sq) / (float)dim;
    const float rstd = rsqrtf(var + eps);

    // Weight and bias chunks, all requested before the first store (both are L2-resident:
    // every row reads them); a missing bias is zeros. The scalar path, a fallback, loads them
    // where they are used instead, to stay inside 64 registers at 1024 threads per row.
    constexpr bool kPrefetch = VEC == 8;
    Pack<VEC> wp[kChunks] = {}, bp[kChunks] = {};
    auto load_wb = [&](int k, int c) {
        wp[k] = sf_norms::load_pack_ro<VEC>(w + (int64_t)c * VEC);
        if (b) bp[k] = sf_norms::load_pack_ro<VEC>(b + (int64_t)c * VEC);
    };
    if constexpr (kPrefetch) {
#pragma unroll
        for (int k = 0; k < kChunks; k++) {
            const int c = t + k * TPR;
            if (c < n_chunks) load_wb(k, c);
        }
    }

    // out = (h - mean) * rstd * w + b, one bf16 rounding at the end.
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        const int c = t + k * TPR;
        if (c < n_chunks) {
            if constexpr (!kPrefetch) load_wb(k, c);
            float o[VEC];
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                const float n = (sf_norms::pack_get(h[k], i) - mean) * rstd;
                o[i] = fmaf(n, sf_norms::pack_get(wp[k], i), sf_norms::pack_get(bp[k], i));
            }
            sf_norms::store_pack<VEC>(out + base + (int64_t)c * VEC, sf_norms::pack_from<VEC>(o));
        }
    }
}

// Backward (norms.h), laid out as rmsnorm_backward_kernel. The statistics are the forward's
// two passes over the row in registers; then sum(g) and sum(g (x - mean)) give
//   dx = rstd (g - sum(g) / dim - (x - mean) rstd^2 sum(g (x - mean)) / dim),
// the CPU twin's rstd (g - mean(g) - x_hat mean(g x_hat)) with rstd factored out of x_hat.
template <int VEC, int TPR, int ROWS>
__global__ void __launch_bounds__(TPR * ROWS)
    layernorm_backward_kernel(float *dx, bool accumulate, float2 *__restrict__ stats,
                              const float *dy, const uint16_t *__restrict__ x,
                              const uint16_t *__restrict__ w, int64_t rows, int dim, float eps) {
    using sf_norms::Pack;
    constexpr int kChunks = sf_norms::bwd_chunks<VEC>();
    static_assert(ROWS == 1 || TPR == 32, "several rows per block only with a warp per row");
    // One array per reduction, so the second needs no barrier to protect the first's reads.
    __shared__ float partial_1[TPR > 32 ? 2 * (TPR / 32) : 1];
    __shared__ float partial_2[TPR > 32 ? 2 * (TPR / 32) : 1];

    const int64_t row = (int64_t)blockIdx.x * ROWS + threadIdx.x / TPR;
    if (row >= rows) return;  // a whole warp (warp-per-row variant only): no barrier waits
    const int t = (int)(threadIdx.x % TPR);
    const int n_chunks = dim / VEC;
    const int64_t base = row * dim;

    // Every load first; dx may be dy, and each element is read by the thread that writes it.
    Pack<VEC> h[kChunks] = {};
    float g[kChunks][VEC] = {};
    sf_norms::load_backward_row<VEC, TPR, kChunks>(h, g, x, dy, w, base, t, n_chunks);

    // Reduction 1: the row sum (for the mean) and sum(g).
    float sum = 0.0f, sg = 0.0f;
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
#pragma unroll
        for (int i = 0; i < VEC; i++) {
            sum += sf_norms::pack_get(h[k], i);
            sg += g[k][i];
        }
    }
    const float2 s1 = sf_norms::row_sum2<TPR>(sum, sg, partial_1);
    const float mean = s1.x / (float)dim;

    // Reduction 2, over registers: the biased variance around that mean and sum(g (x - mean)).
    // Chunks past the row hold zeros, which must not count as (0 - mean).
    float sq = 0.0f, sgd = 0.0f;
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        if (t + k * TPR < n_chunks) {
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                const float d = sf_norms::pack_get(h[k], i) - mean;
                sq = fmaf(d, d, sq);
                sgd = fmaf(g[k][i], d, sgd);
            }
        }
    }
    const float2 s2 = sf_norms::row_sum2<TPR>(sq, sgd, partial_2);
    const float rstd = rsqrtf(s2.x / (float)dim + eps);
    if (stats && t == 0) stats[row] = make_float2(mean, rstd);
    if (!dx) return;

    const float mg = s1.y / (float)dim;
    const float k2 = rstd * rstd * (s2.y / (float)dim);
    sf_norms::store_backward_row<VEC, TPR, kChunks>(
        dx, accumulate, base, t, n_chunks, [&](int k, int i) {
            const float d = sf_norms::pack_get(h[k], i) - mean;
            return rstd * (g[k][i] - mg - d * k2);
        });
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

extern "C" sf_status sf_cuda_layernorm_bf16_variant(sf_bf16 *out, sf_bf16 *residual_out,
                                                    const sf_bf16 *x, const sf_bf16 *residual,
                                                    const sf_bf16 *w, const sf_bf16 *b,
                                                    int64_t rows, int64_t dim, float eps,
                                                    int threads_per_row, cudaStream_t stream) {
    static const char fn[] = "sf_cuda_layernorm_bf16";
    sf_status st = sf_norms::check_args(fn, out, residual_out, x, residual, w, b, rows, dim, eps,
                                        threads_per_row);
    if (st != SF_OK) return st;
    if (rows == 0 || dim == 0) return SF_OK;
    const bool vector_ok = dim % 8 == 0 && sf_norms::aligned16(out) &&
                           sf_norms::aligned16(residual_out) && sf_norms::aligned16(x) &&
                           sf_norms::aligned16(residual) && sf_norms::aligned16(w) &&
                           sf_norms::aligned16(b);
    sf_norms::Plan plan;
    st = sf_norms::plan(fn, dim, vector_ok, threads_per_row, &plan);
    if (st != SF_OK) return st;

    sf_nvtx_range range(fn);
    sf_norms::with_variant(plan, [&](auto variant) {
        using V = decltype(variant);
        const int64_t grid = sf_ceil_div(rows, V::rows_per_block);
        layernorm_bf16_kernel<V::vec, V::threads_per_row, V::rows_per_block>
            <<<(unsigned)grid, V::block, 0, stream>>>(out, residual_out, x, residual, w, b, rows,
                                                      (int)dim, eps);
    });
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_layernorm_bf16(sf_bf16 *out, sf_bf16 *residual_out,
                                            const sf_bf16 *x, const sf_bf16 *residual,
                                            const sf_bf16 *w, const sf_bf16 *b, int64_t rows,
                                            int64_t dim, float eps, cudaStream_t stream) {
    return sf_cuda_layernorm_bf16_variant(out, residual_out, x, residual, w, b, rows, dim, eps, 0,
                                          stream);
}

extern "C" sf_status sf_cuda_layernorm_backward_variant(float *dx, bool accumulate_dx, float *dw,
                                                        float *db, const float *dy,
                                                        const sf_bf16 *x, const sf_bf16 *w,
                                                        int64_t rows, int64_t dim, float eps,
                                                        void *workspace, size_t workspace_bytes,
                                                        int threads_per_row,
                                                        cudaStream_t stream) {
    static const char fn[] = "sf_cuda_layernorm_backward";
    const sf_status st = sf_norms::check_bwd_args(fn, dx, dy, x, w, rows, dim, eps, dw || db,
                                                  workspace, workspace_bytes, threads_per_row);
    if (st != SF_OK) return st;
    return sf_norms::run_backward(
        fn, dx, accumulate_dx, dw, db, dy, x, w, rows, dim, workspace, threads_per_row, stream,
        [&](const sf_norms::Plan &plan, float *out, bool accumulate, float2 *stats) {
            sf_norms::with_variant(plan, [&](auto variant) {
                using V = decltype(variant);
                const int64_t grid = sf_ceil_div(rows, V::rows_per_block);
                layernorm_backward_kernel<V::vec, V::threads_per_row, V::rows_per_block>
                    <<<(unsigned)grid, V::block, 0, stream>>>(out, accumulate, stats, dy, x, w,
                                                              rows, (int)dim, eps);
            });
        });
}

extern "C" sf_status sf_cuda_layernorm_backward(float *dx, bool accumulate_dx, float *dw,
                                                float *db, const float *dy, const sf_bf16 *x,
                                                const sf_bf16 *w, int64_t rows, int64_t dim,
                                                float eps, void *workspace,
                                                size_t workspace_bytes, cudaStream_t stream) {
    return sf_cuda_layernorm_backward_variant(dx, accumulate_dx, dw, db, dy, x, w, rows, dim, eps,
                                              workspace, workspace_bytes, 0, stream);
}

/* RMSNorm as transformers' LlamaRMSNorm computes it in fp32. */
#include "cpu/ops.h"

#include <math.h>
#include <stdlib.h>

void sf_cpu_rmsnorm(float *out, const float *x, const float *w, int64_t rows, int64_t dim,
                    float eps) {
    SF_OMP(omp parallel for schedule(static))
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *orow = out + r * dim;
        /* The mean square is accumulated in double: each square is exact in double and the sum of
         * up to millions of them loses nothing that matters, so the only roundings left are the
         * ones transformers also makes (the fp32 rsqrt factor and the two fp32 products below).
         * An fp32 running sum would add an error growing with dim that torch's pairwise
         * reduction does not have. */
        double ss = 0.0;
        for (int64_t i = 0; i < dim; i++) ss += (double)xr[i] * (double)xr[i];
        /* transformers adds eps to the fp32 variance and takes an fp32 rsqrt: round the same
         * way, once, so the factor is the correctly rounded value of what torch approximates. */
        float var = dim > 0 ? (float)(ss / (double)dim) : 0.0f;
        float inv_rms = (float)(1.0 / sqrt((double)var + (double)eps));
        /* Same order of products as `weight * (x * rsqrt(...))`; the row sum is already taken,
         * so writing over x (out == x) is safe. */
        for (int64_t i = 0; i < dim; i++) {
            float normed = xr[i] * inv_rms;
            orow[i] = w[i] * normed;
        }
    }
}

/* ---- backward ------------------------------------------------------------------------------ */

/* With r = (mean(x^2) + eps)^-1/2 and y_i = w_i x_i r, dr/dx_k = -r^3 x_k / dim, so
 *   dx_k = r w_k dy_k - x_k r^3 / dim * sum_i dy_i w_i x_i.
 * Everything per row is formed in double and each dx rounded once: this is the gradient of the
 * exact formula, which the fp32 forward matches to a couple of ulps. */
static double rms_inv(const float *xr, int64_t dim, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < dim; i++) ss += (double)xr[i] * (double)xr[i];
    return 1.0 / sqrt(ss / (double)dim + (double)eps);
}

/* dx for one row; the row sum is complete before the first write, and each dy_k is read before
 * dx_k is written, so dx may be dy. */
static void rms_dx_row(float *dxr, const float *dyr, const float *xr, const float *w, int64_t dim,
                       double r) {
    double dot = 0.0;
    for (int64_t i = 0; i < dim; i++) dot += (double)dyr[i] * (double)w[i] * (double)xr[i];
    double c = r * r * r * dot / (double)dim;
    for (int64_t i = 0; i < dim; i++)
        dxr[i] = (float)(r * (double)w[i] * (double)dyr[i] - (double)xr[i] * c);
}

/* Columns of dw per task: a block's partial sums stay in registers/L1 while rows stream by. */
enum { RMS_DW_BLOCK = 64 };

void sf_cpu_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                             const float *w, int64_t rows, int64_t dim, float eps) {
    if (dim <= 0 || rows <= 0) return;
    /* dw sums over rows, so row-parallel threads would race on it. It is taken first (dx may
     * overwrite dy) in a column-parallel pass, which needs every row's r: a scratch of one
     * double per row. Should that allocation fail, the whole op runs on one thread rather than
     * fail. */
    double *inv = NULL;
    if (dw != NULL) {
        inv = malloc((size_t)rows * sizeof *inv);
        if (inv == NULL) {
            for (int64_t r = 0; r < rows; r++) {
                const float *xr = x + r * dim;
                const float *dyr = dy + r * dim;
                double ri = rms_inv(xr, dim, eps);
                for (int64_t i = 0; i < dim; i++)
                    dw[i] = (float)((double)dw[i] + (double)dyr[i] * (double)xr[i] * ri);
                if (dx != NULL) rms_dx_row(dx + r * dim, dyr, xr, w, dim, ri);
            }
            return;
        }
        SF_OMP(omp parallel for schedule(static))
        for (int64_t r = 0; r < rows; r++) inv[r] = rms_inv(x + r * dim, dim, eps);

        int64_t blocks = (dim + RMS_DW_BLOCK - 1) / RMS_DW_BLOCK;
        SF_OMP(omp parallel for schedule(static))
        for (int64_t b = 0; b < blocks; b++) {
            int64_t i0 = b * RMS_DW_BLOCK;
            int64_t len = dim - i0 < RMS_DW_BLOCK ? dim - i0 : RMS_DW_BLOCK;
            double acc[RMS_DW_BLOCK] = {0};
            for (int64_t r = 0; r < rows; r++) {
                const float *xr = x + r * dim + i0;
                const float *dyr = dy + r * dim + i0;
                for (int64_t i = 0; i < len; i++) acc[i] += (double)dyr[i] * (double)xr[i] * inv[r];
            }
            for (int64_t i = 0; i < len; i++) dw[i0 + i] = (float)((double)dw[i0 + i] + acc[i]);
        }
    }
    if (dx != NULL) {
        SF_OMP(omp parallel for schedule(static))
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * dim;
            double ri = inv != NULL ? inv[r] : rms_inv(xr, dim, eps);
            rms_dx_row(dx + r * dim, dy + r * dim, xr, w, dim, ri);
        }
    }
    free(inv);
}

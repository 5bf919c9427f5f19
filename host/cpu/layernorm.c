/* LayerNorm with torch.nn.LayerNorm semantics: biased variance, eps inside the square root. */
#include "cpu/ops.h"

#include <math.h>
#include <stdlib.h>

void sf_cpu_layernorm(float *out, const float *x, const float *w, const float *b, int64_t rows,
                      int64_t dim, float eps) {
    if (dim <= 0) return;
    SF_OMP(omp parallel for schedule(static))
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *orow = out + r * dim;
        /* Two passes in double: the one-pass E[x^2] - E[x]^2 cancels catastrophically when the
         * mean is large against the spread, and double sums make the statistics exact to far
         * below fp32 resolution, so this stays a clean oracle for the GPU kernels. */
        double sum = 0.0;
        for (int64_t i = 0; i < dim; i++) sum += xr[i];
        double mean = sum / (double)dim;
        double sq = 0.0;
        for (int64_t i = 0; i < dim; i++) {
            double d = (double)xr[i] - mean;
            sq += d * d;
        }
        double rstd = 1.0 / sqrt(sq / (double)dim + (double)eps);
        /* Each output is formed in double and rounded once. Statistics are complete before the
         * first write, so out == x is safe. */
        for (int64_t i = 0; i < dim; i++)
            orow[i] = (float)(((double)xr[i] - mean) * rstd * (double)w[i] + (double)b[i]);
    }
}

/* ---- backward ------------------------------------------------------------------------------ */

/* With x_hat = (x - mean) rstd and g = dy * w, the gradient through mean and rstd is
 *   dx = rstd (g - mean(g) - x_hat mean(g x_hat)).
 * Statistics and sums are in double and each dx is rounded once, as in the forward. */
typedef struct {
    double mean, rstd;
} ln_stats;

static ln_stats ln_row_stats(const float *xr, int64_t dim, float eps) {
    double sum = 0.0;
    for (int64_t i = 0; i < dim; i++) sum += xr[i];
    double mean = sum / (double)dim;
    double sq = 0.0;
    for (int64_t i = 0; i < dim; i++) {
        double d = (double)xr[i] - mean;
        sq += d * d;
    }
    return (ln_stats){mean, 1.0 / sqrt(sq / (double)dim + (double)eps)};
}

/* dx for one row; both sums are complete before the first write, so dx may be dy. */
static void ln_dx_row(float *dxr, const float *dyr, const float *xr, const float *w, int64_t dim,
                      ln_stats st) {
    double sg = 0.0, sgx = 0.0;
    for (int64_t i = 0; i < dim; i++) {
        double g = (double)dyr[i] * (double)w[i];
        sg += g;
        sgx += g * ((double)xr[i] - st.mean) * st.rstd;
    }
    double mg = sg / (double)dim, mgx = sgx / (double)dim;
    for (int64_t i = 0; i < dim; i++) {
        double xh = ((double)xr[i] - st.mean) * st.rstd;
        dxr[i] = (float)(st.rstd * ((double)dyr[i] * (double)w[i] - mg - xh * mgx));
    }
}

/* Columns of dw and db per task, as in rmsnorm.c. */
enum { LN_DW_BLOCK = 64 };

void sf_cpu_layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                               const float *w, int64_t rows, int64_t dim, float eps) {
    if (dim <= 0 || rows <= 0) return;
    /* dw and db sum over rows: a column-parallel pass, before dx may overwrite dy, with every
     * row's statistics kept in a scratch array. Without that memory the op runs on one thread
     * rather than fail. */
    ln_stats *st = NULL;
    if (dw != NULL || db != NULL) {
        st = malloc((size_t)rows * sizeof *st);
        if (st == NULL) {
            for (int64_t r = 0; r < rows; r++) {
                const float *xr = x + r * dim;
                const float *dyr = dy + r * dim;
                ln_stats s = ln_row_stats(xr, dim, eps);
                for (int64_t i = 0; i < dim; i++) {
                    double xh = ((double)xr[i] - s.mean) * s.rstd;
                    if (dw != NULL) dw[i] = (float)((double)dw[i] + (double)dyr[i] * xh);
                    if (db != NULL) db[i] = (float)((double)db[i] + (double)dyr[i]);
                }
                if (dx != NULL) ln_dx_row(dx + r * dim, dyr, xr, w, dim, s);
            }
            return;
        }
        SF_OMP(omp parallel for schedule(static))
        for (int64_t r = 0; r < rows; r++) st[r] = ln_row_stats(x + r * dim, dim, eps);

        int64_t blocks = (dim + LN_DW_BLOCK - 1) / LN_DW_BLOCK;
        SF_OMP(omp parallel for schedule(static))
        for (int64_t b = 0; b < blocks; b++) {
            int64_t i0 = b * LN_DW_BLOCK;
            int64_t len = dim - i0 < LN_DW_BLOCK ? dim - i0 : LN_DW_BLOCK;
            double acc_w[LN_DW_BLOCK] = {0}, acc_b[LN_DW_BLOCK] = {0};
            for (int64_t r = 0; r < rows; r++) {
                const float *xr = x + r * dim + i0;
                const float *dyr = dy + r * dim + i0;
                for (int64_t i = 0; i < len; i++) {
                    acc_w[i] += (double)dyr[i] * (((double)xr[i] - st[r].mean) * st[r].rstd);
                    acc_b[i] += (double)dyr[i];
                }
            }
            for (int64_t i = 0; i < len; i++) {
                if (dw != NULL) dw[i0 + i] = (float)((double)dw[i0 + i] + acc_w[i]);
                if (db != NULL) db[i0 + i] = (float)((double)db[i0 + i] + acc_b[i]);
            }
        }
    }
    if (dx != NULL) {
        SF_OMP(omp parallel for schedule(static))
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * dim;
            ln_stats s = st != NULL ? st[r] : ln_row_stats(xr, dim, eps);
            ln_dx_row(dx + r * dim, dy + r * dim, xr, w, dim, s);
        }
    }
    free(st);
}

/* LayerNorm with torch.nn.LayerNorm semantics: biased variance, eps inside the square root. */
#include "cpu/ops.h"

#include <math.h>

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

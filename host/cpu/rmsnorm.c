/* RMSNorm as transformers' LlamaRMSNorm computes it in fp32. */
#include "cpu/ops.h"

#include <math.h>

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

/* Row-wise softmax and log-softmax.
 *
 * The maximum is subtracted in double (exactly: two fp32 values differ by a double without
 * rounding), the exponentials and their sum are taken in double, and each output is rounded to
 * fp32 once. The outputs are therefore correctly rounded up to a few double ulps, including the
 * tiny probabilities of a 100k-entry vocabulary that an fp32 sum would blur. */
#include "cpu/ops.h"

#include <math.h>

static float row_max(const float *x, int64_t n) {
    float m = x[0];
    for (int64_t i = 1; i < n; i++)
        if (x[i] > m) m = x[i];
    return m;
}

void sf_cpu_softmax(float *out, const float *x, int64_t rows, int64_t n) {
    if (n <= 0) return;
    SF_OMP(omp parallel for schedule(static))
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *orow = out + r * n;
        double m = row_max(xr, n);
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++) sum += exp((double)xr[i] - m);
        double inv = 1.0 / sum;
        /* The exponentials are recomputed instead of stored, so that out may be x and no
         * scratch row is needed; index i is read before it is written. */
        for (int64_t i = 0; i < n; i++) orow[i] = (float)(exp((double)xr[i] - m) * inv);
    }
}

void sf_cpu_log_softmax(float *out, const float *x, int64_t rows, int64_t n) {
    if (n <= 0) return;
    SF_OMP(omp parallel for schedule(static))
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *orow = out + r * n;
        double m = row_max(xr, n);
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++) sum += exp((double)xr[i] - m);
        /* (x - m) <= 0 and log(sum) >= 0, so the difference adds magnitudes and cannot cancel. */
        double log_sum = log(sum);
        for (int64_t i = 0; i < n; i++) orow[i] = (float)(((double)xr[i] - m) - log_sum);
    }
}

/* Elementwise activations. Each value is formed in double and rounded to fp32 once, so these
 * are correctly rounded up to a few double ulps: the reference the fp32 and bf16 kernels are
 * measured against, not a copy of any one of their approximations. */
#include "cpu/ops.h"

#include <math.h>

void sf_cpu_swiglu(float *out, const float *gate, const float *up, int64_t n) {
    SF_OMP(omp parallel for schedule(static))
    for (int64_t i = 0; i < n; i++) {
        double g = gate[i];
        /* g / (1 + e^-g): for very negative g, e^-g overflows to inf and the quotient is -0,
         * the right limit, with no inf/inf. */
        double silu = g / (1.0 + exp(-g));
        out[i] = (float)(silu * (double)up[i]);
    }
}

void sf_cpu_gelu(float *out, const float *x, int64_t n) {
    SF_OMP(omp parallel for schedule(static))
    for (int64_t i = 0; i < n; i++) {
        double v = x[i];
        /* 1 + erf(v / sqrt 2) written as erfc(-v / sqrt 2): the same value, without the
         * cancellation that turns the left tail (v < -6 or so) into 0 or noise. */
        out[i] = (float)(0.5 * v * erfc(-v * 0.70710678118654752440084436210485));
    }
}

void sf_cpu_relu(float *out, const float *x, int64_t n) {
    SF_OMP(omp parallel for schedule(static))
    for (int64_t i = 0; i < n; i++) {
        /* Written so that NaN propagates, as torch.relu does. */
        out[i] = x[i] < 0.0f ? 0.0f : x[i];
    }
}

void sf_cpu_add(float *out, const float *a, const float *b, int64_t n) {
    SF_OMP(omp parallel for schedule(static))
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

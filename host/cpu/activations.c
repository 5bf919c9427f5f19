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

/* ---- backward: derivatives in double, rounded once, like the forwards ---------------------- */

/* d/dg silu(g) = sig(g) (1 + g (1 - sig(g))). Every input of index i is read before either
 * output of index i is written, so the outputs may alias dout (or the inputs). */
void sf_cpu_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                            const float *up, int64_t n) {
    SF_OMP(omp parallel for schedule(static))
    for (int64_t i = 0; i < n; i++) {
        double g = gate[i], u = up[i], d = dout[i];
        /* 1 / (1 + e^-g) saturates cleanly at both ends (e^-g = inf gives 0, and then the
         * finite g times 0 below is 0, the right limit). */
        double sig = 1.0 / (1.0 + exp(-g));
        double dsilu = sig + sig * g * (1.0 - sig);
        dgate[i] = (float)(d * u * dsilu);
        dup[i] = (float)(d * g * sig);
    }
}

/* d/dx x Phi(x) = Phi(x) + x phi(x), Phi the normal CDF (written with erfc, as the forward) and
 * phi its density. */
void sf_cpu_gelu_backward(float *dx, const float *dy, const float *x, int64_t n) {
    const double inv_sqrt2 = 0.70710678118654752440084436210485;
    const double inv_sqrt_2pi = 0.39894228040143267793994605993438;
    SF_OMP(omp parallel for schedule(static))
    for (int64_t i = 0; i < n; i++) {
        double v = x[i];
        double grad = 0.5 * erfc(-v * inv_sqrt2) + v * inv_sqrt_2pi * exp(-0.5 * v * v);
        dx[i] = (float)((double)dy[i] * grad);
    }
}

/* torch's threshold_backward: zero where x <= 0 (the kink at 0 included), dy elsewhere, which
 * passes dy through for a NaN x. */
void sf_cpu_relu_backward(float *dx, const float *dy, const float *x, int64_t n) {
    SF_OMP(omp parallel for schedule(static))
    for (int64_t i = 0; i < n; i++) dx[i] = x[i] <= 0.0f ? 0.0f : dy[i];
}

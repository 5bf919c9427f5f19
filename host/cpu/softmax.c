/* Row-wise softmax and log-softmax.
 *
 * The maximum is subtracted in double (exactly: two fp32 values differ by a double without
 * rounding), the exponentials and their sum are taken in double, and each output is rounded to
 * fp32 once. The outputs are therefore correctly rounded up to a few double ulps, including the
 * tiny probabilities of a 100k-entry vocabulary that an fp32 sum would blur. */
#include "cpu/ops.h"

#include <math.h>

#include "core/error.h"
#include "sysformer.h"

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

/* Cross-entropy as log-sum-exp minus the target logit, per row in double (the same sums as
 * sf_cpu_log_softmax). The gradient's exponentials are recomputed rather than stored, so dlogits
 * may be logits; the target logit is read before the row is overwritten. */
double sf_cpu_cross_entropy(float *dlogits, const float *logits, const int32_t *targets,
                            const float *weights, int64_t rows, int32_t vocab) {
    if (vocab <= 0) return 0.0;
    double total = 0.0;
    SF_OMP(omp parallel for schedule(static) reduction(+ : total))
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = logits + r * vocab;
        double wr = weights != NULL ? (double)weights[r] : 1.0;
        /* A weight of 0 masks the row (padding, prompt tokens): its gradient is zero and its
         * loss is skipped, so that an infinite loss there cannot turn the sum into 0 * inf. */
        if (wr == 0.0) {
            if (dlogits != NULL)
                for (int64_t i = 0; i < vocab; i++) dlogits[r * vocab + i] = 0.0f;
            continue;
        }
        double m = row_max(xr, vocab);
        double sum = 0.0;
        for (int64_t i = 0; i < vocab; i++) sum += exp((double)xr[i] - m);
        int32_t t = targets[r];
        total += wr * ((m - (double)xr[t]) + log(sum));
        if (dlogits != NULL) {
            float *dr = dlogits + r * vocab;
            double inv = 1.0 / sum;
            /* The one-hot term is subtracted before rounding, so the target's gradient
             * (p - 1, possibly tiny) is rounded once too. */
            for (int64_t i = 0; i < vocab; i++) {
                double p = exp((double)xr[i] - m) * inv;
                dr[i] = (float)(wr * (i == t ? p - 1.0 : p));
            }
        }
    }
    return total;
}

/* The public log-probabilities of generation (sysformer.h), the twins of kernels/loss.cu's
 * sf_cuda_logprobs. */

/* log softmax(logits)[i] = (logits[i] - *max) - *log_sum, in double: the row's maximum first,
 * so that no exp overflows and the largest term is exactly 1. */
static void row_log_softmax(const float *logits, int32_t vocab, double *max, double *log_sum) {
    double m = logits[0];
    for (int32_t i = 1; i < vocab; i++) m = logits[i] > m ? logits[i] : m;
    double sum = 0.0;
    for (int32_t i = 0; i < vocab; i++) sum += exp((double)logits[i] - m);
    *max = m;
    *log_sum = log(sum);
}

/* A candidate of the top n: larger logit first, then the lower id. */
static bool ranks_above(float a, int32_t ia, float b, int32_t ib) {
    return a != b ? a > b : ia < ib;
}

/* The n best of the row in order (one pass, insertion: n is small) into ids; returns how many
 * there are (fewer than n when the row has fewer non-NaN logits). */
static int32_t top_ids(const float *logits, int32_t vocab, int32_t n, int32_t *ids) {
    int32_t len = 0;
    for (int32_t i = 0; i < vocab; i++) {
        const float x = logits[i];
        if (x != x) continue;
        if (len == n && !ranks_above(x, i, logits[ids[n - 1]], ids[n - 1])) continue;
        int32_t k = len < n ? len++ : n - 1;
        for (; k > 0 && ranks_above(x, i, logits[ids[k - 1]], ids[k - 1]); k--) {
            ids[k] = ids[k - 1];
        }
        ids[k] = i;
    }
    return len;
}

sf_status sf_cpu_token_scores(const float *logits, int32_t vocab, int32_t token, int32_t n_top,
                              float *logprob, int32_t *ids, float *top_lp) {
    if (!logits || vocab < 1 || token < 0 || token >= vocab || !logprob || n_top < 0 ||
        n_top > SF_MAX_TOP_LOGPROBS || (n_top > 0 && (!ids || !top_lp))) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cpu_token_scores: bad argument (vocab %d, "
                       "token %d, n_top %d)", vocab, token, n_top);
    }
    double max, log_sum;
    row_log_softmax(logits, vocab, &max, &log_sum);
    *logprob = (float)(((double)logits[token] - max) - log_sum);
    const int32_t len = n_top > 0 ? top_ids(logits, vocab, n_top, ids) : 0;
    for (int32_t j = 0; j < n_top; j++) {
        top_lp[j] = j < len ? (float)(((double)logits[ids[j]] - max) - log_sum) : NAN;
        if (j >= len) ids[j] = -1;
    }
    return SF_OK;
}

sf_status sf_token_logprob(const float *logits, int32_t vocab, int32_t token, float *logprob) {
    if (!logits || vocab < 1 || token < 0 || token >= vocab || !logprob) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_token_logprob: bad argument (vocab %d, "
                       "token %d)", vocab, token);
    }
    return sf_cpu_token_scores(logits, vocab, token, 0, logprob, NULL, NULL);
}

sf_status sf_top_logprobs(const float *logits, int32_t vocab, int32_t n, int32_t *ids,
                          float *logprobs) {
    if (!logits || vocab < 1 || n < 1 || n > SF_MAX_TOP_LOGPROBS || !ids || !logprobs) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_top_logprobs: bad argument (vocab %d, n %d)",
                       vocab, n);
    }
    float unused;
    return sf_cpu_token_scores(logits, vocab, 0, n, &unused, ids, logprobs);
}

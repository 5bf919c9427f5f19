/* Scaled dot-product attention with grouped KV heads, causal (with an optional sliding window)
 * or bidirectional.
 *
 * Each (query, head) pair runs a one-pass "online" softmax over its visible keys: a running
 * maximum, a running sum of exponentials and a running weighted sum of values that is rescaled
 * whenever the maximum grows. The weighted sum lives in the output row itself, so the op needs
 * no allocation and no scratch proportional to n_kv; keys are taken in bounded chunks whose
 * scores sit in a small stack array, which limits the rescaling to once per chunk. */
#include "cpu/ops.h"

#include <math.h>

enum { ATT_CHUNK = 64 };

/* The simd reduction lets the compiler reassociate this one sum (it will not vectorise a dot
 * product otherwise); the fp32 error bound gamma_len * sum|a||b| holds for any order. */
static float dot(const float *a, const float *b, int32_t len) {
    float s = 0.0f;
    SF_OMP(omp simd reduction(+ : s))
    for (int32_t d = 0; d < len; d++) s += a[d] * b[d];
    return s;
}

/* out_row = softmax(scale * q . k[j]) . v[j] over keys j in [j_begin, j_end). */
static void attend_one(float *out_row, const float *q_row, const float *k_head, const float *v_head,
                       int64_t kv_stride, int64_t j_begin, int64_t j_end, int32_t head_dim,
                       float scale) {
    for (int32_t d = 0; d < head_dim; d++) out_row[d] = 0.0f;
    if (j_begin >= j_end) return; /* nothing visible: zeros rather than 0/0 */

    float run_max = -INFINITY;
    float run_sum = 0.0f;
    float scores[ATT_CHUNK];
    for (int64_t c0 = j_begin; c0 < j_end; c0 += ATT_CHUNK) {
        int64_t len = j_end - c0 < ATT_CHUNK ? j_end - c0 : ATT_CHUNK;
        float chunk_max = -INFINITY;
        for (int64_t c = 0; c < len; c++) {
            scores[c] = scale * dot(q_row, k_head + (c0 + c) * kv_stride, head_dim);
            if (scores[c] > chunk_max) chunk_max = scores[c];
        }
        /* Bring what is accumulated so far onto the new maximum; every exponent below is then
         * <= 0, so nothing overflows. The first chunk has nothing to rescale. */
        if (chunk_max > run_max) {
            if (run_max != -INFINITY) {
                float r = expf(run_max - chunk_max);
                run_sum *= r;
                for (int32_t d = 0; d < head_dim; d++) out_row[d] *= r;
            }
            run_max = chunk_max;
        }
        for (int64_t c = 0; c < len; c++) {
            float p = expf(scores[c] - run_max);
            const float *v_row = v_head + (c0 + c) * kv_stride;
            run_sum += p;
            for (int32_t d = 0; d < head_dim; d++) out_row[d] += p * v_row[d];
        }
    }
    /* run_sum >= 1: the key holding the maximum contributed exp(0). */
    float inv_sum = 1.0f / run_sum;
    for (int32_t d = 0; d < head_dim; d++) out_row[d] *= inv_sum;
}

void sf_cpu_attention(float *out, const float *q, const float *k, const float *v, int64_t n_q,
                      int64_t n_kv, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                      bool causal, int64_t q_pos0, int32_t window, float scale) {
    int32_t group = n_heads / n_kv_heads;
    int64_t q_stride = (int64_t)n_heads * head_dim;
    int64_t kv_stride = (int64_t)n_kv_heads * head_dim;
    int64_t pairs = n_q * n_heads;
    /* Causal rows see different numbers of keys, so hand out small batches of pairs
     * dynamically instead of equal static slices. */
    SF_OMP(omp parallel for schedule(dynamic, 8))
    for (int64_t t = 0; t < pairs; t++) {
        int64_t i = t / n_heads;
        int32_t h = (int32_t)(t % n_heads);
        int32_t g = h / group;
        int64_t j_begin = 0;
        int64_t j_end = n_kv;
        if (causal) {
            int64_t pos = q_pos0 + i;
            if (pos + 1 < j_end) j_end = pos + 1;
            /* (pos - j) < window  <=>  j > pos - window */
            if (window > 0 && pos - window + 1 > j_begin) j_begin = pos - window + 1;
        }
        attend_one(out + i * q_stride + (int64_t)h * head_dim,
                   q + i * q_stride + (int64_t)h * head_dim, k + (int64_t)g * head_dim,
                   v + (int64_t)g * head_dim, kv_stride, j_begin, j_end, head_dim, scale);
    }
}

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
#include <stdlib.h>

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

/* ---- backward ------------------------------------------------------------------------------ */
/*
 * For one (query, head) with visible keys j, P_j = softmax_j(s_j), s_j = scale q . k_j, and
 * out = sum_j P_j v_j. With dP_j = dout . v_j and D = sum_j P_j dP_j (= dout . out):
 *   dS_j = P_j (dP_j - D) scale,   dq = sum_j dS_j k_j,   dk_j += dS_j q,   dv_j += P_j dout.
 * The softmax is recomputed in fp32 with the maximum subtracted, as the forward does.
 *
 * dq belongs to one (query, head) and dk, dv to one (key, kv head), so the work runs in two
 * parallel passes that never share an output: pass A over (query, head) pairs keeps each pair's
 * softmax statistics (maximum, 1 / sum, D) in a scratch array and writes dq; pass B over
 * (block of keys, kv head) rereads them and writes dk and dv. Without that scratch memory the op
 * falls back to one task per kv head, whose thread owns the kv head's dk, dv and its query
 * heads' dq (less parallel when kv heads are few, but correct).
 */

typedef struct {
    float max, inv_sum, d;
} att_stats;

/* The keys query i sees, [*j_begin, *j_end), by the rule of sf_cpu_attention. */
static void visible_keys(int64_t i, int64_t n_kv, bool causal, int64_t q_pos0, int32_t window,
                         int64_t *j_begin, int64_t *j_end) {
    *j_begin = 0;
    *j_end = n_kv;
    if (causal) {
        int64_t pos = q_pos0 + i;
        if (pos + 1 < *j_end) *j_end = pos + 1;
        if (window > 0 && pos - window + 1 > *j_begin) *j_begin = pos - window + 1;
    }
}

/* The softmax statistics of one (query, head) over keys [j_begin, j_end), which must not be
 * empty: an online pass over chunks of keys, as in attend_one, that also accumulates
 * sum_j exp(s_j - max) dP_j for D. */
static att_stats row_stats(const float *q_row, const float *dout_row, const float *k_head,
                           const float *v_head, int64_t kv_stride, int64_t j_begin,
                           int64_t j_end, int32_t head_dim, float scale) {
    float run_max = -INFINITY, run_sum = 0.0f, run_d = 0.0f;
    float scores[ATT_CHUNK];
    for (int64_t c0 = j_begin; c0 < j_end; c0 += ATT_CHUNK) {
        int64_t len = j_end - c0 < ATT_CHUNK ? j_end - c0 : ATT_CHUNK;
        float chunk_max = -INFINITY;
        for (int64_t c = 0; c < len; c++) {
            scores[c] = scale * dot(q_row, k_head + (c0 + c) * kv_stride, head_dim);
            if (scores[c] > chunk_max) chunk_max = scores[c];
        }
        if (chunk_max > run_max) {
            if (run_max != -INFINITY) {
                float r = expf(run_max - chunk_max);
                run_sum *= r;
                run_d *= r;
            }
            run_max = chunk_max;
        }
        for (int64_t c = 0; c < len; c++) {
            float p = expf(scores[c] - run_max);
            run_sum += p;
            run_d += p * dot(dout_row, v_head + (c0 + c) * kv_stride, head_dim);
        }
    }
    float inv_sum = 1.0f / run_sum; /* >= 1 term of exp(0): no division by zero */
    return (att_stats){run_max, inv_sum, run_d * inv_sum};
}

/* dq of one (query, head) from its statistics; when dk_head and dv_head are given (the fallback)
 * it also adds this pair's share to every visible key's dk and dv. */
static void row_backward(float *dq_row, float *dk_head, float *dv_head, const float *q_row,
                         const float *dout_row, const float *k_head, const float *v_head,
                         int64_t kv_stride, int64_t j_begin, int64_t j_end, int32_t head_dim,
                         float scale, att_stats st) {
    for (int32_t d = 0; d < head_dim; d++) dq_row[d] = 0.0f;
    for (int64_t j = j_begin; j < j_end; j++) {
        const float *k_row = k_head + j * kv_stride;
        const float *v_row = v_head + j * kv_stride;
        float p = expf(scale * dot(q_row, k_row, head_dim) - st.max) * st.inv_sum;
        float ds = p * (dot(dout_row, v_row, head_dim) - st.d) * scale;
        for (int32_t d = 0; d < head_dim; d++) dq_row[d] += ds * k_row[d];
        if (dk_head != NULL) {
            float *dk_row = dk_head + j * kv_stride;
            float *dv_row = dv_head + j * kv_stride;
            for (int32_t d = 0; d < head_dim; d++) {
                dk_row[d] += ds * q_row[d];
                dv_row[d] += p * dout_row[d];
            }
        }
    }
}

/* The fallback: one task per kv head, which owns that head's dk, dv and its query heads' dq
 * and needs no scratch. Not static (nor in ops.h): the op tests call it directly
 * (tests/test_alloc_faults.cpp reaches it through sf_cpu_attention_backward by failing the
 * scratch allocation, within a training run). */
void sf_cpu_attention_backward_by_kv_head(float *dq, float *dk, float *dv, const float *dout,
                                          const float *q, const float *k, const float *v,
                                          int64_t n_q, int64_t n_kv, int32_t n_heads,
                                          int32_t n_kv_heads, int32_t head_dim, bool causal,
                                          int64_t q_pos0, int32_t window, float scale);
void sf_cpu_attention_backward_by_kv_head(float *dq, float *dk, float *dv, const float *dout,
                                          const float *q, const float *k, const float *v,
                                          int64_t n_q, int64_t n_kv, int32_t n_heads,
                                          int32_t n_kv_heads, int32_t head_dim, bool causal,
                                          int64_t q_pos0, int32_t window, float scale) {
    int32_t group = n_heads / n_kv_heads;
    int64_t q_stride = (int64_t)n_heads * head_dim;
    int64_t kv_stride = (int64_t)n_kv_heads * head_dim;
    for (int64_t j = 0; j < n_kv * kv_stride; j++) {
        dk[j] = 0.0f;
        dv[j] = 0.0f;
    }
    SF_OMP(omp parallel for schedule(dynamic, 1))
    for (int32_t g = 0; g < n_kv_heads; g++) {
        const float *k_head = k + (int64_t)g * head_dim;
        const float *v_head = v + (int64_t)g * head_dim;
        for (int32_t h = g * group; h < (g + 1) * group; h++)
            for (int64_t i = 0; i < n_q; i++) {
                int64_t off = i * q_stride + (int64_t)h * head_dim;
                int64_t jb, je;
                visible_keys(i, n_kv, causal, q_pos0, window, &jb, &je);
                if (jb >= je) {
                    for (int32_t d = 0; d < head_dim; d++) dq[off + d] = 0.0f;
                    continue;
                }
                att_stats st = row_stats(q + off, dout + off, k_head, v_head, kv_stride, jb, je,
                                         head_dim, scale);
                row_backward(dq + off, dk + (int64_t)g * head_dim, dv + (int64_t)g * head_dim,
                             q + off, dout + off, k_head, v_head, kv_stride, jb, je, head_dim,
                             scale, st);
            }
    }
}

/* Keys per pass-B task: each query row read from memory serves this many keys. */
enum { ATT_BWD_KEYS = 16 };

void sf_cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                               const float *q, const float *k, const float *v, int64_t n_q,
                               int64_t n_kv, int32_t n_heads, int32_t n_kv_heads,
                               int32_t head_dim, bool causal, int64_t q_pos0, int32_t window,
                               float scale) {
    int32_t group = n_heads / n_kv_heads;
    int64_t q_stride = (int64_t)n_heads * head_dim;
    int64_t kv_stride = (int64_t)n_kv_heads * head_dim;
    int64_t pairs = n_q * n_heads;
    att_stats *stats = pairs > 0 ? malloc((size_t)pairs * sizeof *stats) : NULL;

    if (stats == NULL) {
        sf_cpu_attention_backward_by_kv_head(dq, dk, dv, dout, q, k, v, n_q, n_kv, n_heads,
                                             n_kv_heads, head_dim, causal, q_pos0, window, scale);
        return;
    }

    /* Pass A: statistics and dq per (query, head). */
    SF_OMP(omp parallel for schedule(dynamic, 8))
    for (int64_t t = 0; t < pairs; t++) {
        int64_t i = t / n_heads;
        int32_t h = (int32_t)(t % n_heads);
        int32_t g = h / group;
        int64_t off = i * q_stride + (int64_t)h * head_dim;
        const float *k_head = k + (int64_t)g * head_dim;
        const float *v_head = v + (int64_t)g * head_dim;
        int64_t jb, je;
        visible_keys(i, n_kv, causal, q_pos0, window, &jb, &je);
        if (jb >= je) {
            /* Sees no key: zero output, zero gradient; pass B never visits this pair. */
            for (int32_t d = 0; d < head_dim; d++) dq[off + d] = 0.0f;
            stats[t] = (att_stats){0.0f, 0.0f, 0.0f};
            continue;
        }
        stats[t] = row_stats(q + off, dout + off, k_head, v_head, kv_stride, jb, je, head_dim,
                             scale);
        row_backward(dq + off, NULL, NULL, q + off, dout + off, k_head, v_head, kv_stride, jb, je,
                     head_dim, scale, stats[t]);
    }

    /* Pass B: dk and dv per (block of keys, kv head), over the queries that see each key. */
    int64_t key_blocks = (n_kv + ATT_BWD_KEYS - 1) / ATT_BWD_KEYS;
    int64_t tasks = key_blocks * n_kv_heads;
    SF_OMP(omp parallel for schedule(dynamic, 1))
    for (int64_t t = 0; t < tasks; t++) {
        int64_t j0 = (t / n_kv_heads) * ATT_BWD_KEYS;
        int64_t j1 = j0 + ATT_BWD_KEYS < n_kv ? j0 + ATT_BWD_KEYS : n_kv;
        int32_t g = (int32_t)(t % n_kv_heads);
        int64_t goff = (int64_t)g * head_dim;
        for (int64_t j = j0; j < j1; j++)
            for (int32_t d = 0; d < head_dim; d++) {
                dk[j * kv_stride + goff + d] = 0.0f;
                dv[j * kv_stride + goff + d] = 0.0f;
            }
        /* Queries that see some key of [j0, j1): position q_pos0 + i >= j0, and with a window
         * q_pos0 + i - (j1 - 1) < window. The per-key test below is exact. */
        int64_t i_begin = 0, i_end = n_q;
        if (causal) {
            if (j0 - q_pos0 > i_begin) i_begin = j0 - q_pos0;
            if (window > 0 && j1 - 1 - q_pos0 + window < i_end) i_end = j1 - 1 - q_pos0 + window;
        }
        for (int64_t i = i_begin; i < i_end; i++) {
            int64_t jb, je;
            visible_keys(i, n_kv, causal, q_pos0, window, &jb, &je);
            if (jb < j0) jb = j0;
            if (je > j1) je = j1;
            for (int32_t h = g * group; h < (g + 1) * group; h++) {
                int64_t off = i * q_stride + (int64_t)h * head_dim;
                att_stats st = stats[i * n_heads + h];
                const float *q_row = q + off;
                const float *dout_row = dout + off;
                for (int64_t j = jb; j < je; j++) {
                    float *dk_row = dk + j * kv_stride + goff;
                    float *dv_row = dv + j * kv_stride + goff;
                    const float *k_row = k + j * kv_stride + goff;
                    const float *v_row = v + j * kv_stride + goff;
                    float p = expf(scale * dot(q_row, k_row, head_dim) - st.max) * st.inv_sum;
                    float ds = p * (dot(dout_row, v_row, head_dim) - st.d) * scale;
                    for (int32_t d = 0; d < head_dim; d++) {
                        dk_row[d] += ds * q_row[d];
                        dv_row[d] += p * dout_row[d];
                    }
                }
            }
        }
    }
    free(stats);
}

/* Internal: the CPU reference ops, fp32, one op family per file in host/cpu/.
 *
 * These are the oracle for the CUDA kernels in kernels/ (same names: rmsnorm.c <-> rmsnorm.cu).
 * Layout conventions: activations are row-major [rows, features]; attention tensors are
 * [tokens, heads * head_dim] with each head's head_dim values contiguous. Outer loops run under
 * OpenMP. Callers validate arguments; these functions do not fail. */
#ifndef SF_CPU_OPS_H
#define SF_CPU_OPS_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* OpenMP directives go through _Pragma so that a build without -fopenmp, where GCC's -Wall flags
 * every "#pragma omp" as unknown, stays warning-free: SF_OMP(omp parallel for). */
#ifdef _OPENMP
#define SF_OMP(...) _Pragma(#__VA_ARGS__)
#else
#define SF_OMP(...)
#endif

/* matmul.c: out[m, n] = x[m, k] · w[n, k]^T (+ bias[n] when bias != NULL).
 * w is a PyTorch nn.Linear weight ([out_features, in_features]). out must not alias x or w.
 * Uses OpenBLAS sgemm when built with it (SF_HAVE_CBLAS), else a blocked C loop. */
void sf_cpu_matmul(float *out, const float *x, const float *w, const float *bias, int64_t m,
                   int64_t n, int64_t k);
/* The same product, always through the portable blocked C loop (so that tests cover it in BLAS
 * builds too). */
void sf_cpu_matmul_portable(float *out, const float *x, const float *w, const float *bias,
                            int64_t m, int64_t n, int64_t k);

/* matmul.c: the choice sf_cpu_blas_coretype_hint makes, from OpenBLAS's core name and the CPU's
 * features, apart so that tests can try every case: OPENBLAS_CORETYPE for kernels the CPU
 * runs when OpenBLAS fell back to its generic ones, else NULL. */
const char *sf_cpu_blas_hint_for(const char *core, bool avx512, bool avx2_fma, bool avx);

/* rmsnorm.c: out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w. out may alias x. */
void sf_cpu_rmsnorm(float *out, const float *x, const float *w, int64_t rows, int64_t dim,
                    float eps);

/* layernorm.c: out[r, :] = (x[r, :] - mean) / sqrt(var + eps) * w + b (biased variance, as
 * torch.nn.LayerNorm). out may alias x. */
void sf_cpu_layernorm(float *out, const float *x, const float *w, const float *b, int64_t rows,
                      int64_t dim, float eps);

/* rope.c: the rotary frequencies for one request whose positions reach seq_len - 1, following
 * transformers' ROPE_INIT_FUNCTIONS for cfg->rope.type: inv_freq[head_dim / 2] and the factor
 * that scales cos and sin (longrope's attention factor; 1 otherwise). For longrope the long
 * factors apply when seq_len > original_max_position_embeddings. */
void sf_cpu_rope_freqs(const sf_llm_config *cfg, int64_t seq_len, double *inv_freq,
                       double *attention_scale);

/* rope.c: rotates x [n, n_heads, head_dim] in place, token t at positions[t]; the "rotate half"
 * convention of transformers: element i pairs with i + head_dim / 2. */
void sf_cpu_rope_apply(float *x, const int32_t *positions, int64_t n, int32_t n_heads,
                       int32_t head_dim, const double *inv_freq, double attention_scale);

/* attention.c: multi-head attention with grouped KV heads.
 * q [n_q, n_heads * head_dim], k and v [n_kv, n_kv_heads * head_dim], out [n_q, n_heads *
 * head_dim]; query head h reads kv head h / (n_heads / n_kv_heads).
 * out[i, h] = sum_j softmax_j(scale * q[i, h] . k[j, g]) v[j, g] over the visible keys j:
 *   causal:  query i sits at position q_pos0 + i, key j at position j, and j <= q_pos0 + i;
 *            window > 0 further requires (q_pos0 + i) - j < window.
 *   !causal: every key (q_pos0 and window are ignored).
 * Softmax is computed in fp32 with the maximum subtracted. A query that sees no key gets zeros.
 * out must not alias q, k or v. */
void sf_cpu_attention(float *out, const float *q, const float *k, const float *v, int64_t n_q,
                      int64_t n_kv, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim,
                      bool causal, int64_t q_pos0, int32_t window, float scale);

/* activations.c, elementwise over n values; out may alias an input. */
void sf_cpu_swiglu(float *out, const float *gate, const float *up, int64_t n); /* silu(g) * u */
void sf_cpu_gelu(float *out, const float *x, int64_t n); /* exact: x/2 (1 + erf(x / sqrt 2)) */
void sf_cpu_relu(float *out, const float *x, int64_t n);
void sf_cpu_add(float *out, const float *a, const float *b, int64_t n); /* out = a + b */

/* softmax.c, row-wise over [rows, n]; out may alias x. */
void sf_cpu_softmax(float *out, const float *x, int64_t rows, int64_t n);
void sf_cpu_log_softmax(float *out, const float *x, int64_t rows, int64_t n);

/* embedding.c: out[i, :] = table[ids[i], :]; ids must already be in range. */
void sf_cpu_embedding(float *out, const float *table, const int32_t *ids, int64_t n,
                      int64_t dim);

/* ---------------------------------------------------------------------------------------- */
/* Backward passes (training). Each lives in its forward's file. "+=" means the gradient is  */
/* added to what the buffer holds (weights' gradients accumulate over a batch); "=" means    */
/* it is overwritten. A NULL gradient pointer means "not wanted" (the frozen LLM's weights). */
/* ---------------------------------------------------------------------------------------- */

/* matmul.c: for y[m, n] = x[m, k] w[n, k]^T + b:
 *   dx[m, k] (= or +=, accumulate_dx) dy . w;  dw[n, k] += dy^T . x;  db[n] += sum_rows dy. */
void sf_cpu_linear_backward(float *dx, bool accumulate_dx, float *dw, float *db, const float *dy,
                            const float *x, const float *w, int64_t m, int64_t n, int64_t k);

/* rmsnorm.c: dx = d(rmsnorm)/dx^T dy (=); dw += sum_rows dy * x_hat (when dw != NULL).
 * dx may alias dy. */
void sf_cpu_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                             const float *w, int64_t rows, int64_t dim, float eps);

/* layernorm.c: dx (=), dw += sum_rows dy * x_hat, db += sum_rows dy (each when not NULL).
 * dx may alias dy. */
void sf_cpu_layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                               const float *w, int64_t rows, int64_t dim, float eps);

/* rope.c: the backward of sf_cpu_rope_apply with the same arguments, in place on d (dy in, dx
 * out): the transposed rotation, scaled by attention_scale. */
void sf_cpu_rope_backward(float *d, const int32_t *positions, int64_t n, int32_t n_heads,
                          int32_t head_dim, const double *inv_freq, double attention_scale);

/* attention.c: the backward of sf_cpu_attention with the same shape and mask arguments:
 * dq [n_q, n_heads * head_dim] (=), dk and dv [n_kv, n_kv_heads * head_dim] (=; each kv head
 * sums the gradients of the query heads that read it). Recomputes the softmax. */
void sf_cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                               const float *q, const float *k, const float *v, int64_t n_q,
                               int64_t n_kv, int32_t n_heads, int32_t n_kv_heads,
                               int32_t head_dim, bool causal, int64_t q_pos0, int32_t window,
                               float scale);

/* activations.c, elementwise (=); outputs may alias dout / dy. */
void sf_cpu_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                            const float *up, int64_t n);
void sf_cpu_gelu_backward(float *dx, const float *dy, const float *x, int64_t n);
void sf_cpu_relu_backward(float *dx, const float *dy, const float *x, int64_t n);

/* softmax.c: token cross-entropy. For each row r < rows: loss_r = -log softmax(logits[r])
 * [targets[r]]; returns sum_r weights[r] * loss_r (weights NULL: 1) in double, and when
 * dlogits != NULL writes dlogits[r] = weights[r] * (softmax(logits[r]) - onehot(targets[r]))
 * (=). dlogits may alias logits. */
double sf_cpu_cross_entropy(float *dlogits, const float *logits, const int32_t *targets,
                            const float *weights, int64_t rows, int32_t vocab);

/* softmax.c: a generated token's scores from one pass of the row's log-sum-exp: *logprob of
 * token (sf_token_logprob's), and with n_top > 0 the n_top most likely tokens and theirs
 * (sf_top_logprobs', into ids[n_top] and top_lp[n_top]). Arguments as those two check them. */
sf_status sf_cpu_token_scores(const float *logits, int32_t vocab, int32_t token, int32_t n_top,
                              float *logprob, int32_t *ids, float *top_lp);

#ifdef __cplusplus
}
#endif

#endif

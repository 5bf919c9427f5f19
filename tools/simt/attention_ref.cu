// tools/simt: the stand-in for attention.cu's tiled mma.sync kernel (which the emulator cannot
// run), for the engine suite. attention.cu's own argument checks and dispatch stay in front of it
// (run.sh cuts the tiled launch out of sf_cuda_attention_bf16 and calls this instead), and the
// split-KV decode kernel keeps running for real.
//
// The semantics are attention.h's, per request, as sf_cpu_attention's: query i of request r at
// position q_pos0[r] + i sees key j (from the request's first kv row) when causal: j <= pos and,
// with a window, pos - j < window; otherwise every one of its keys (kv_len[r], or the cu_kv
// difference). A query that sees no key gets zeros; rows past max_q_len are not computed. bf16
// in, scores, softmax and the weighted sum in fp32 (the tiled kernel rounds P to bf16; this does
// not: it is a reference, not a copy), one rounding of the output; lse as attention.h defines it.
//
// It is an emulated kernel, so it queues and is captured like any other launch. One block of 32
// threads per (query, head, request); every lane computes the scores (no warp traffic: the point
// is the masking and the offsets, read from the device like the tiled kernel reads them), and
// lane t writes output dims t, t + 32, ...
#include <math.h>
#include <stdint.h>

#include "attention.h"
#include "cuda_check.cuh"

namespace {

struct RefParams {
    uint16_t *out;
    float *lse;
    const uint16_t *q, *k, *v;
    const int32_t *cu_q, *cu_kv, *kv_len, *q_pos0;
    int64_t q_stride, kv_stride, out_stride;
    int32_t n_heads, group, head_dim, window;
    bool causal;
    float scale;
};

__device__ float bf(uint16_t h) { return __bfloat162float(__ushort_as_bfloat16(h)); }

__global__ void attention_reference_kernel(const RefParams p) {
    const int32_t i = blockIdx.x, h = blockIdx.y, r = blockIdx.z, lane = threadIdx.x;
    const int32_t q0 = p.cu_q[r], nq = p.cu_q[r + 1] - q0;
    if (i >= nq) return;
    const int32_t kv0 = p.cu_kv[r];
    const int32_t nkv = p.kv_len ? p.kv_len[r] : p.cu_kv[r + 1] - kv0;
    const int32_t pos = (p.q_pos0 ? p.q_pos0[r] : 0) + i;
    int32_t lo = 0, hi = nkv;  // visible keys [lo, hi)
    if (p.causal) {
        hi = min(nkv, pos + 1);
        if (p.window > 0) lo = max(0, pos - p.window + 1);
    }
    const int32_t D = p.head_dim, g = h / p.group;
    const uint16_t *qr = p.q + (int64_t)(q0 + i) * p.q_stride + (int64_t)h * D;
    uint16_t *o = p.out + (int64_t)(q0 + i) * p.out_stride + (int64_t)h * D;

    float m = -INFINITY;
    for (int32_t j = lo; j < hi; j++) {
        const uint16_t *kr = p.k + (int64_t)(kv0 + j) * p.kv_stride + (int64_t)g * D;
        float s = 0.0f;
        for (int32_t d = 0; d < D; d++) s += bf(qr[d]) * bf(kr[d]);
        m = fmaxf(m, s * p.scale);
    }
    float l = 0.0f, acc[4] = {0, 0, 0, 0};  // dims lane, lane + 32, ... (head_dim <= 128)
    for (int32_t j = lo; j < hi; j++) {
        const uint16_t *kr = p.k + (int64_t)(kv0 + j) * p.kv_stride + (int64_t)g * D;
        const uint16_t *vr = p.v + (int64_t)(kv0 + j) * p.kv_stride + (int64_t)g * D;
        float s = 0.0f;
        for (int32_t d = 0; d < D; d++) s += bf(qr[d]) * bf(kr[d]);
        const float e = expf(s * p.scale - m);
        l += e;
        for (int32_t c = 0; c * 32 + lane < D; c++) acc[c] += e * bf(vr[c * 32 + lane]);
    }
    for (int32_t c = 0; c * 32 + lane < D; c++) {
        const float y = hi > lo ? acc[c] / l : 0.0f;
        o[c * 32 + lane] = __bfloat16_as_ushort(__float2bfloat16_rn(y));
    }
    if (p.lse && lane == 0)
        p.lse[(int64_t)(q0 + i) * p.n_heads + h] = hi > lo ? m + logf(l) : -INFINITY;
}

}  // namespace

// Called by sf_cuda_attention_bf16 where attention.cu launches the tiled kernel (arguments
// already checked there).
sf_status simt_attention_reference(const sf_attention_args *a, cudaStream_t stream) {
    RefParams p;
    p.out = a->out;
    p.lse = a->lse;
    p.q = a->q;
    p.k = a->k;
    p.v = a->v;
    p.cu_q = a->cu_q;
    p.cu_kv = a->cu_kv;
    p.kv_len = a->kv_len;
    p.q_pos0 = a->q_pos0;
    p.q_stride = a->q_stride;
    p.kv_stride = a->kv_stride;
    p.out_stride = a->out_stride;
    p.n_heads = a->n_heads;
    p.group = a->n_heads / a->n_kv_heads;
    p.head_dim = a->head_dim;
    p.window = a->window;
    p.causal = a->causal;
    p.scale = a->scale;
    const dim3 grid((unsigned)a->max_q_len, (unsigned)a->n_heads, (unsigned)a->n_requests);
    attention_reference_kernel<<<grid, 32, 0, stream>>>(p);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

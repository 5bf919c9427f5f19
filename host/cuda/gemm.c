/* The engine's matrix products on cuBLASLt, with descriptors and algorithms cached per shape.
 *
 * Row-major y[m, n] = x[m, k] . w[n, k]^T is, read column-major (cuBLASLt's convention), the
 * product C (n x m, ld ldy) = op(A) B with A = w seen as a k x n matrix (ld k) transposed, and
 * B = x seen as a k x m matrix (ld ldx) as it is. No data moves; only the reading changes.
 *
 * Alignment. The heuristic never sees the matrix pointers, yet the kernel it picks may assume
 * them 256-byte aligned (the preference's default): a q block at column 576 of a fused qkv
 * buffer, handed to such a kernel, gives wrong results or a fault, not an error. So the
 * alignment of every pointer (up to 256 bytes) is part of the cache key and is passed to the
 * heuristic as CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES. The bias pointer has no
 * preference attribute: the heuristic reads its alignment from the pointer set on the
 * descriptor, so the real bias pointer is set before the heuristic runs and its alignment is
 * keyed too. Row strides need nothing extra: they are in the layouts, which the heuristic sees.
 *
 * Bias type. cublasLt.h (CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE) says bias elements have the
 * output's type, the only exceptions being IMMA (int8) and fp8 kernels. A bf16 bias with an
 * fp32 output is therefore not a documented combination, and converting the bias would need
 * device scratch and a kernel launch inside a call that must stay allocation-free; so a bias
 * epilogue with y_f32 is refused with SF_ERR_UNSUPPORTED before any CUDA call.
 *
 * Order of checks in sf_cuda_gemm: the arguments (pointers, sizes, strides, epilogue,
 * alignment to the element size) first, then the cache pointer, then m == 0 || n == 0; only
 * after all that is cuBLASLt touched. A cache is bound to the device current at its creation
 * and is not thread-safe: one engine, one stream, one cache. */
#include "cuda/gemm.h"

#include <cublasLt.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

/* Distinct shapes a model's forward pass uses: a handful of weights times the batch sizes and
 * alignments that occur, far below this; when it does fill, the oldest entry goes. */
enum { SF_GEMM_CACHE_CAPACITY = 512 };

typedef struct gemm_key {
    int64_t m, n, k, ldx, ldy;
    int32_t epilogue;
    bool y_f32;
    /* log2 of each pointer's alignment, capped at 256 bytes (8); bias 0 when unused. */
    uint8_t align_x, align_w, align_y, align_bias;
} gemm_key;

typedef struct gemm_entry {
    gemm_key key;
    bool used;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c; /* c serves as both C and D: same type, shape, stride */
    cublasLtMatmulAlgo_t algo;
} gemm_entry;

struct sf_gemm_cache {
    cublasLtHandle_t handle;
    void *workspace;
    size_t workspace_bytes;
    int32_t count; /* entries in use, <= capacity                                */
    int32_t next;  /* the slot the next new shape takes: the oldest once full     */
    uint64_t hash[SF_GEMM_CACHE_CAPACITY]; /* scanned first, so a miss reads 4 KiB  */
    gemm_entry entries[SF_GEMM_CACHE_CAPACITY];
};

/* ---------------------------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------------------------- */

static const char *status_name(cublasStatus_t s) {
    const char *name = cublasLtGetStatusName(s);
    return name ? name : "unknown cublasStatus_t";
}

static sf_status lt_fail(cublasStatus_t s, const char *call, const gemm_key *key) {
    return sf_fail(SF_ERR_CUDA,
                   "sf_cuda_gemm: %s failed: %s (%d) at m=%lld n=%lld k=%lld ldx=%lld ldy=%lld",
                   call, status_name(s), (int)s, (long long)key->m, (long long)key->n,
                   (long long)key->k, (long long)key->ldx, (long long)key->ldy);
}

/* log2 of the largest power of two dividing the address, capped at 256 bytes. */
static uint8_t align_log2(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint8_t lg = 0;
    while (lg < 8 && (a & ((uintptr_t)1 << lg)) == 0) lg++;
    return lg;
}

static uint64_t mix(uint64_t h, uint64_t v) {
    /* FNV-1a over 64-bit words: cheap, and only used to skip most full key compares. */
    h ^= v;
    h *= 0x100000001b3ull;
    return h;
}

static uint64_t key_hash(const gemm_key *k) {
    uint64_t h = 0xcbf29ce484222325ull;
    h = mix(h, (uint64_t)k->m);
    h = mix(h, (uint64_t)k->n);
    h = mix(h, (uint64_t)k->k);
    h = mix(h, (uint64_t)k->ldx);
    h = mix(h, (uint64_t)k->ldy);
    h = mix(h, (uint64_t)k->epilogue | (uint64_t)k->y_f32 << 8 | (uint64_t)k->align_x << 16 |
                   (uint64_t)k->align_w << 24 | (uint64_t)k->align_y << 32 |
                   (uint64_t)k->align_bias << 40);
    h ^= h >> 29;
    return h;
}

static bool key_equal(const gemm_key *a, const gemm_key *b) {
    return a->m == b->m && a->n == b->n && a->k == b->k && a->ldx == b->ldx &&
           a->ldy == b->ldy && a->epilogue == b->epilogue && a->y_f32 == b->y_f32 &&
           a->align_x == b->align_x && a->align_w == b->align_w && a->align_y == b->align_y &&
           a->align_bias == b->align_bias;
}

static void entry_destroy(gemm_entry *e) {
    /* Descriptors are host objects read at enqueue time, so destroying them while a product
     * that used them is still queued on the stream is safe. */
    if (e->c) cublasLtMatrixLayoutDestroy(e->c);
    if (e->b) cublasLtMatrixLayoutDestroy(e->b);
    if (e->a) cublasLtMatrixLayoutDestroy(e->a);
    if (e->desc) cublasLtMatmulDescDestroy(e->desc);
    memset(e, 0, sizeof *e);
}

/* ---------------------------------------------------------------------------------------------
 * Cache
 * ------------------------------------------------------------------------------------------- */

sf_status sf_gemm_cache_create(void *workspace, size_t workspace_bytes, sf_gemm_cache **out) {
    if (!out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_gemm_cache_create: NULL out");
    *out = NULL;
    if (!workspace && workspace_bytes > 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_gemm_cache_create: NULL workspace with workspace_bytes=%zu",
                       workspace_bytes);
    }
    if ((uintptr_t)workspace % 256 != 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_gemm_cache_create: workspace %p is not 256-byte aligned", workspace);
    }
    sf_gemm_cache *c = calloc(1, sizeof *c);
    if (!c) {
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_gemm_cache_create: %zu bytes", sizeof *c);
    }
    cublasStatus_t s = cublasLtCreate(&c->handle);
    if (s != CUBLAS_STATUS_SUCCESS) {
        free(c);
        return sf_fail(SF_ERR_CUDA, "sf_gemm_cache_create: cublasLtCreate failed: %s (%d)",
                       status_name(s), (int)s);
    }
    /* A workspace without bytes is no workspace: the heuristic is then held to algorithms that
     * need none, and cuBLASLt gets NULL rather than a pointer it must not use. */
    c->workspace = workspace_bytes > 0 ? workspace : NULL;
    c->workspace_bytes = workspace_bytes;
    *out = c;
    return SF_OK;
}

void sf_gemm_cache_free(sf_gemm_cache *cache) {
    if (!cache) return;
    for (int32_t i = 0; i < SF_GEMM_CACHE_CAPACITY; i++) {
        if (cache->entries[i].used) entry_destroy(&cache->entries[i]);
    }
    cublasLtDestroy(cache->handle);
    free(cache);
}

static cublasLtEpilogue_t lt_epilogue(sf_gemm_epilogue e) {
    switch (e) {
    case SF_GEMM_BIAS: return CUBLASLT_EPILOGUE_BIAS;
    case SF_GEMM_RELU_BIAS: return CUBLASLT_EPILOGUE_RELU_BIAS;
    case SF_GEMM_NONE: break;
    }
    return CUBLASLT_EPILOGUE_DEFAULT;
}

/* Fills e (zeroed) for key: descriptor, layouts, and the heuristic's best algorithm. On failure
 * everything built so far is destroyed and e is left unused. */
static sf_status entry_build(sf_gemm_cache *cache, gemm_entry *e, const gemm_key *key,
                             const sf_gemm_args *a) {
#define LT_TRY(call)                                                                          \
    do {                                                                                      \
        cublasStatus_t s_ = (call);                                                           \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                    \
            st = lt_fail(s_, #call, key);                                                     \
            goto fail;                                                                        \
        }                                                                                     \
    } while (0)

    sf_status st = SF_OK;
    cublasLtMatmulPreference_t pref = NULL;
    const cudaDataType_t y_type = key->y_f32 ? CUDA_R_32F : CUDA_R_16BF;
    const int32_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
    const uint32_t epilogue = (uint32_t)lt_epilogue((sf_gemm_epilogue)key->epilogue);

    LT_TRY(cublasLtMatmulDescCreate(&e->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a,
                                          sizeof trans_a));
    LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b,
                                          sizeof trans_b));
    LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                          sizeof epilogue));
    if (key->epilogue != SF_GEMM_NONE) {
        const int32_t bias_type = CUDA_R_16BF;
        LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                              &bias_type, sizeof bias_type));
        /* The heuristic derives the bias alignment from this pointer's value. */
        const void *bias = a->bias;
        LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                              sizeof bias));
    }
    LT_TRY(cublasLtMatrixLayoutCreate(&e->a, CUDA_R_16BF, (uint64_t)key->k, (uint64_t)key->n,
                                      key->k));
    LT_TRY(cublasLtMatrixLayoutCreate(&e->b, CUDA_R_16BF, (uint64_t)key->k, (uint64_t)key->m,
                                      key->ldx));
    LT_TRY(cublasLtMatrixLayoutCreate(&e->c, y_type, (uint64_t)key->n, (uint64_t)key->m,
                                      key->ldy));

    LT_TRY(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t max_ws = cache->workspace_bytes;
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &max_ws, sizeof max_ws));
    const uint32_t align_a = 1u << key->align_w, align_b = 1u << key->align_x;
    const uint32_t align_cd = 1u << key->align_y;
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                &align_a, sizeof align_a));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                &align_b, sizeof align_b));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                &align_cd, sizeof align_cd));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                &align_cd, sizeof align_cd));

    cublasLtMatmulHeuristicResult_t result;
    memset(&result, 0, sizeof result);
    int found = 0;
    const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(
        cache->handle, e->desc, e->a, e->b, e->c, e->c, pref, 1, &result, &found);
    /* NOT_SUPPORTED is how the heuristic says "nothing fits", not a failure of the call. */
    if (hs == CUBLAS_STATUS_NOT_SUPPORTED || (hs == CUBLAS_STATUS_SUCCESS && found < 1) ||
        (hs == CUBLAS_STATUS_SUCCESS && result.state != CUBLAS_STATUS_SUCCESS)) {
        st = sf_fail(SF_ERR_UNSUPPORTED,
                     "sf_cuda_gemm: cuBLASLt has no algorithm for m=%lld n=%lld k=%lld ldx=%lld "
                     "ldy=%lld %s output, epilogue %d, alignments x=%u w=%u y=%u bias=%u bytes, "
                     "workspace %zu bytes",
                     (long long)key->m, (long long)key->n, (long long)key->k,
                     (long long)key->ldx, (long long)key->ldy, key->y_f32 ? "fp32" : "bf16",
                     (int)key->epilogue, align_b, align_a, align_cd,
                     key->align_bias ? 1u << key->align_bias : 0u, cache->workspace_bytes);
        goto fail;
    }
    LT_TRY(hs);
    cublasLtMatmulPreferenceDestroy(pref);
    e->algo = result.algo;
    e->key = *key;
    e->used = true;
    return SF_OK;

fail:
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    entry_destroy(e);
    return st;
#undef LT_TRY
}

/* The entry for key: found, or built in the next slot (evicting the oldest when full). */
static sf_status lookup(sf_gemm_cache *cache, const gemm_key *key, const sf_gemm_args *a,
                        gemm_entry **out) {
    const uint64_t h = key_hash(key);
    for (int32_t i = 0; i < cache->count; i++) {
        const gemm_entry *e = &cache->entries[i];
        if (cache->hash[i] == h && e->used && key_equal(&e->key, key)) {
            *out = &cache->entries[i];
            return SF_OK;
        }
    }
    const int32_t slot = cache->next;
    gemm_entry *e = &cache->entries[slot];
    if (e->used) entry_destroy(e);
    /* A failed build leaves the slot empty and next where it was, so the next new shape
     * takes it; an empty slot below count is skipped by the scan (used is false). */
    sf_status st = entry_build(cache, e, key, a);
    if (st != SF_OK) return st;
    cache->hash[slot] = h;
    if (cache->count < SF_GEMM_CACHE_CAPACITY) cache->count++;
    cache->next = (slot + 1) % SF_GEMM_CACHE_CAPACITY;
    *out = e;
    return SF_OK;
}

/* ---------------------------------------------------------------------------------------------
 * The product
 * ------------------------------------------------------------------------------------------- */

static sf_status check_args(const sf_gemm_args *a) {
    if (!a) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_gemm: NULL args");
    if (!a->y) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_gemm: NULL y");
    if (!a->x) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_gemm: NULL x");
    if (!a->w) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_gemm: NULL w");
    if (a->epilogue != SF_GEMM_NONE && a->epilogue != SF_GEMM_BIAS &&
        a->epilogue != SF_GEMM_RELU_BIAS) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_gemm: unknown epilogue %d",
                       (int)a->epilogue);
    }
    if (a->epilogue != SF_GEMM_NONE && !a->bias) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_gemm: epilogue %d needs a bias, got NULL",
                       (int)a->epilogue);
    }
    if (a->m < 0 || a->n < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_gemm: negative size m=%lld n=%lld",
                       (long long)a->m, (long long)a->n);
    }
    if (a->k <= 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_gemm: k=%lld, must be > 0",
                       (long long)a->k);
    }
    if (a->ldx < a->k) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_gemm: ldx=%lld below k=%lld",
                       (long long)a->ldx, (long long)a->k);
    }
    if (a->ldy < a->n) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_gemm: ldy=%lld below n=%lld",
                       (long long)a->ldy, (long long)a->n);
    }
    /* Every byte offset the product can form must fit int64: m rows of ldx or ldy elements,
     * n rows of k. Larger is no real matrix, and cuBLASLt's int64 strides would wrap. */
    const int64_t y_size = a->y_f32 ? 4 : 2;
    if ((a->m > 0 && (a->ldx > INT64_MAX / 2 / a->m || a->ldy > INT64_MAX / y_size / a->m)) ||
        (a->n > 0 && a->k > INT64_MAX / 2 / a->n)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_gemm: sizes overflow 64-bit offsets: m=%lld n=%lld k=%lld "
                       "ldx=%lld ldy=%lld",
                       (long long)a->m, (long long)a->n, (long long)a->k, (long long)a->ldx,
                       (long long)a->ldy);
    }
    /* A pointer not aligned to its element is a corrupt offset, never a legitimate view. */
    if ((uintptr_t)a->x % 2 || (uintptr_t)a->w % 2 || (uintptr_t)a->y % (uintptr_t)y_size ||
        (a->epilogue != SF_GEMM_NONE && (uintptr_t)a->bias % 2)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_gemm: pointer not aligned to its element: x=%p w=%p y=%p "
                       "bias=%p",
                       (const void *)a->x, (const void *)a->w, a->y, (const void *)a->bias);
    }
    if (a->y_f32 && a->epilogue != SF_GEMM_NONE) {
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "sf_cuda_gemm: a bias epilogue with an fp32 output (cuBLASLt's bias "
                       "type follows the output type, and the bias is bf16)");
    }
    return SF_OK;
}

sf_status sf_cuda_gemm(sf_gemm_cache *cache, const sf_gemm_args *a, cudaStream_t stream) {
    sf_status st = check_args(a);
    if (st != SF_OK) return st;
    if (!cache) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_gemm: NULL cache");
    if (a->m == 0 || a->n == 0) return SF_OK;

    const bool has_bias = a->epilogue != SF_GEMM_NONE;
    gemm_key key = {
        .m = a->m,
        .n = a->n,
        .k = a->k,
        .ldx = a->ldx,
        .ldy = a->ldy,
        .epilogue = (int32_t)a->epilogue,
        .y_f32 = a->y_f32,
        .align_x = align_log2(a->x),
        .align_w = align_log2(a->w),
        .align_y = align_log2(a->y),
        .align_bias = has_bias ? align_log2(a->bias) : 0,
    };
    gemm_entry *e = NULL;
    st = lookup(cache, &key, a, &e);
    if (st != SF_OK) return st;

    if (has_bias) {
        /* A host-side attribute write: the pointer is copied into the launch at enqueue. */
        const void *bias = a->bias;
        cublasStatus_t s = cublasLtMatmulDescSetAttribute(
            e->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
        if (s != CUBLAS_STATUS_SUCCESS) return lt_fail(s, "setting the bias pointer", &key);
    }
    const float alpha = 1.0f, beta = 0.0f;
    /* C is y with beta 0: never read, but cuBLASLt wants a valid pointer of D's layout. */
    sf_nvtx_push("sf_cuda_gemm");
    cublasStatus_t s = cublasLtMatmul(cache->handle, e->desc, &alpha, a->w, e->a, a->x, e->b,
                                      &beta, a->y, e->c, a->y, e->c, &e->algo, cache->workspace,
                                      cache->workspace_bytes, stream);
    sf_nvtx_pop();
    if (s != CUBLAS_STATUS_SUCCESS) return lt_fail(s, "cublasLtMatmul", &key);
    return SF_OK;
}

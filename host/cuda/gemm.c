/* The engine's matrix products on cuBLASLt, with descriptors and algorithms cached per shape.
 *
 * Row-major y[m, n] = x[m, k] . w[n, k]^T is, read column-major (cuBLASLt's convention), the
 * product C (n x m, ld ldy) = op(A) B with A = w seen as a k x n matrix (ld k) transposed, and
 * B = x seen as a k x m matrix (ld ldx) as it is. No data moves; only the reading changes.
 * The backward products read the same buffers other ways:
 *   dx[m, k] = dy[m, n] . w[n, k]:    C (k x m, ld lddx) = A B,     A = w (k x n, ld k),
 *                                     B = dy (n x m, ld lddy);
 *   dw[n, k] = dy[m, n]^T . x[m, k]:  C (k x n, ld k)    = A B^T,   A = x (k x m, ld ldx),
 *                                     B = dy (n x m, ld lddy).
 * One cache holds all three; its key has the operation, hence the transpose flags and which
 * buffer is which, besides the sizes, strides, output type, epilogue and alignments.
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

#include "activations.h"
#include "core/error.h"

/* Distinct shapes a model's forward pass uses: a handful of weights times the batch sizes and
 * alignments that occur, far below this; when it does fill, the oldest entry goes. */
enum { SF_GEMM_CACHE_CAPACITY = 512 };

/* Which product an entry computes (see the top of this file). */
typedef enum gemm_op { GEMM_FORWARD = 0, GEMM_DX = 1, GEMM_DW = 2 } gemm_op;

static const char *const op_fn[] = {"sf_cuda_gemm", "sf_cuda_gemm_dx", "sf_cuda_gemm_dw"};
/* The row strides of A, B and C by their names in each operation's arguments. */
static const char *const op_ld_names[][3] = {
    {"k", "ldx", "ldy"}, {"k", "lddy", "lddx"}, {"ldx", "lddy", "k"}};

typedef struct gemm_key {
    int64_t m, n, k;       /* the row-major problem of the operation's arguments */
    int64_t lda, ldb, ldc; /* cuBLASLt's A, B and C/D (forward: w, x, y)          */
    int32_t epilogue;
    int8_t op;                /* gemm_op                                            */
    int8_t trans_a, trans_b;  /* cublasOperation_t of A and B, implied by op          */
    bool c_f32;
    /* log2 of each pointer's alignment, capped at 256 bytes (8); bias 0 when unused. */
    uint8_t align_a, align_b, align_c, align_bias;
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
    const char *const *ld = op_ld_names[key->op];
    return sf_fail(SF_ERR_CUDA, "%s: %s failed: %s (%d) at m=%lld n=%lld k=%lld %s=%lld %s=%lld",
                   op_fn[key->op], call, status_name(s), (int)s, (long long)key->m,
                   (long long)key->n, (long long)key->k, ld[1], (long long)key->ldb, ld[2],
                   (long long)key->ldc);
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
    h = mix(h, (uint64_t)k->lda);
    h = mix(h, (uint64_t)k->ldb);
    h = mix(h, (uint64_t)k->ldc);
    h = mix(h, (uint64_t)k->epilogue | (uint64_t)k->c_f32 << 8 | (uint64_t)k->align_a << 16 |
                   (uint64_t)k->align_b << 24 | (uint64_t)k->align_c << 32 |
                   (uint64_t)k->align_bias << 40 | (uint64_t)(uint8_t)k->op << 48 |
                   (uint64_t)(uint8_t)k->trans_a << 52 | (uint64_t)(uint8_t)k->trans_b << 56);
    h ^= h >> 29;
    return h;
}

static bool key_equal(const gemm_key *a, const gemm_key *b) {
    return a->m == b->m && a->n == b->n && a->k == b->k && a->lda == b->lda &&
           a->ldb == b->ldb && a->ldc == b->ldc && a->epilogue == b->epilogue &&
           a->op == b->op && a->trans_a == b->trans_a && a->trans_b == b->trans_b &&
           a->c_f32 == b->c_f32 && a->align_a == b->align_a && a->align_b == b->align_b &&
           a->align_c == b->align_c && a->align_bias == b->align_bias;
}

/* The column-major shapes (rows x cols, as stored) of A, B and C for key's operation. */
static void op_shapes(const gemm_key *key, uint64_t shape[3][2]) {
    const uint64_t m = (uint64_t)key->m, n = (uint64_t)key->n, k = (uint64_t)key->k;
    switch ((gemm_op)key->op) {
    case GEMM_DX: /* A = w (k x n), B = dy (n x m), C = dx (k x m) */
        shape[0][0] = k, shape[0][1] = n, shape[1][0] = n, shape[1][1] = m;
        shape[2][0] = k, shape[2][1] = m;
        return;
    case GEMM_DW: /* A = x (k x m), B = dy (n x m), C = dw (k x n) */
        shape[0][0] = k, shape[0][1] = m, shape[1][0] = n, shape[1][1] = m;
        shape[2][0] = k, shape[2][1] = n;
        return;
    case GEMM_FORWARD: break;
    }
    /* A = w (k x n), B = x (k x m), C = y (n x m) */
    shape[0][0] = k, shape[0][1] = n, shape[1][0] = k, shape[1][1] = m;
    shape[2][0] = n, shape[2][1] = m;
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
        return sf_fail(s == CUBLAS_STATUS_ALLOC_FAILED ? SF_ERR_OUT_OF_MEMORY : SF_ERR_CUDA,
                       "sf_gemm_cache_create: cublasLtCreate failed: %s (%d)", status_name(s),
                       (int)s);
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
    const cudaDataType_t y_type = key->c_f32 ? CUDA_R_32F : CUDA_R_16BF;
    const int32_t trans_a = key->trans_a, trans_b = key->trans_b;
    uint64_t shape[3][2];
    op_shapes(key, shape);
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
    LT_TRY(cublasLtMatrixLayoutCreate(&e->a, CUDA_R_16BF, shape[0][0], shape[0][1], key->lda));
    LT_TRY(cublasLtMatrixLayoutCreate(&e->b, CUDA_R_16BF, shape[1][0], shape[1][1], key->ldb));
    LT_TRY(cublasLtMatrixLayoutCreate(&e->c, y_type, shape[2][0], shape[2][1], key->ldc));

    LT_TRY(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t max_ws = cache->workspace_bytes;
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &max_ws, sizeof max_ws));
    const uint32_t align_a = 1u << key->align_a, align_b = 1u << key->align_b;
    const uint32_t align_cd = 1u << key->align_c;
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                &align_a, sizeof align_a));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                &align_b, sizeof align_b));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                &align_cd, sizeof align_cd));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                &align_cd, sizeof align_cd));
    /* Split-K only with fp32 partial sums in the workspace (COMPUTE_TYPE). INPLACE reduces in
     * the output buffer and OUTPUT_TYPE keeps partial sums in the output type (cublasLt.h):
     * with a bf16 y either rounds before the sum is complete, where gemm.h promises one
     * rounding, and INPLACE's order need not repeat from run to run. Algorithms without
     * split-K (scheme NONE) pass any mask. */
    const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                &reductions, sizeof reductions));

    cublasLtMatmulHeuristicResult_t result;
    memset(&result, 0, sizeof result);
    int found = 0;
    const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(
        cache->handle, e->desc, e->a, e->b, e->c, e->c, pref, 1, &result, &found);
    /* NOT_SUPPORTED is how the heuristic says "nothing fits", not a failure of the call. */
    if (hs == CUBLAS_STATUS_NOT_SUPPORTED || (hs == CUBLAS_STATUS_SUCCESS && found < 1) ||
        (hs == CUBLAS_STATUS_SUCCESS && result.state != CUBLAS_STATUS_SUCCESS)) {
        const char *const *ld = op_ld_names[key->op];
        st = sf_fail(SF_ERR_UNSUPPORTED,
                     "%s: cuBLASLt has no algorithm for m=%lld n=%lld k=%lld %s=%lld %s=%lld "
                     "%s output, epilogue %d, alignments A=%u B=%u C=%u bias=%u bytes, "
                     "workspace %zu bytes",
                     op_fn[key->op], (long long)key->m, (long long)key->n, (long long)key->k,
                     ld[1], (long long)key->ldb, ld[2], (long long)key->ldc,
                     key->c_f32 ? "fp32" : "bf16", (int)key->epilogue, align_a, align_b,
                     align_cd, key->align_bias ? 1u << key->align_bias : 0u,
                     cache->workspace_bytes);
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
        .lda = a->k,
        .ldb = a->ldx,
        .ldc = a->ldy,
        .epilogue = (int32_t)a->epilogue,
        .op = GEMM_FORWARD,
        .trans_a = CUBLAS_OP_T,
        .trans_b = CUBLAS_OP_N,
        .c_f32 = a->y_f32,
        .align_a = align_log2(a->w),
        .align_b = align_log2(a->x),
        .align_c = align_log2(a->y),
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

/* ---------------------------------------------------------------------------------------------
 * The backward products
 * ------------------------------------------------------------------------------------------- */

/* Looks key up (building it on a miss) and enqueues D = A op B (+ C when beta is 1), C = D. */
static sf_status run_product(sf_gemm_cache *cache, const gemm_key *key, const void *a,
                             const void *b, void *c, bool accumulate, cudaStream_t stream) {
    gemm_entry *e = NULL;
    sf_status st = lookup(cache, key, NULL, &e);
    if (st != SF_OK) return st;
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    /* C and D are one buffer with one layout: cuBLASLt's in-place form, read when beta is 1. */
    sf_nvtx_push(op_fn[key->op]);
    const cublasStatus_t s =
        cublasLtMatmul(cache->handle, e->desc, &alpha, a, e->a, b, e->b, &beta, c, e->c, c,
                       e->c, &e->algo, cache->workspace, cache->workspace_bytes, stream);
    sf_nvtx_pop();
    if (s != CUBLAS_STATUS_SUCCESS) return lt_fail(s, "cublasLtMatmul", key);
    return SF_OK;
}

/* rows x cols of elem-byte values at p with row stride ld (in elements): fits in int64 bytes. */
static bool fits(int64_t rows, int64_t ld, int64_t elem) {
    return rows == 0 || ld <= INT64_MAX / elem / rows;
}

sf_status sf_cuda_gemm_dx(sf_gemm_cache *cache, const sf_gemm_dx_args *a, cudaStream_t stream) {
    static const char fn[] = "sf_cuda_gemm_dx";
    if (!a) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL args", fn);
    if (!a->dx) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL dx", fn);
    if (!a->dy) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL dy", fn);
    if (!a->w) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL w", fn);
    if (a->m < 0 || a->n < 0 || a->k < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: negative size m=%lld n=%lld k=%lld", fn,
                       (long long)a->m, (long long)a->n, (long long)a->k);
    }
    if (a->lddx < a->k || a->lddx < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: lddx=%lld below k=%lld (or 1)", fn,
                       (long long)a->lddx, (long long)a->k);
    }
    if (a->lddy < a->n || a->lddy < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: lddy=%lld below n=%lld (or 1)", fn,
                       (long long)a->lddy, (long long)a->n);
    }
    const int64_t dx_size = a->dx_f32 ? 4 : 2;
    if (!fits(a->m, a->lddx, dx_size) || !fits(a->m, a->lddy, 2) || !fits(a->n, a->k, 2)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: sizes overflow 64-bit offsets: m=%lld n=%lld k=%lld lddx=%lld "
                       "lddy=%lld",
                       fn, (long long)a->m, (long long)a->n, (long long)a->k,
                       (long long)a->lddx, (long long)a->lddy);
    }
    if ((uintptr_t)a->dx % (uintptr_t)dx_size || (uintptr_t)a->dy % 2 || (uintptr_t)a->w % 2) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: pointer not aligned to its element: dx=%p dy=%p w=%p", fn, a->dx,
                       (const void *)a->dy, (const void *)a->w);
    }
    if (!cache) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL cache", fn);
    if (a->m == 0 || a->k == 0) return SF_OK;
    if (a->n == 0) {
        /* An empty inner product: dx = 0, or dx unchanged when accumulating. */
        if (a->accumulate) return SF_OK;
        const cudaError_t err =
            cudaMemset2DAsync(a->dx, (size_t)(a->lddx * dx_size), 0, (size_t)(a->k * dx_size),
                              (size_t)a->m, stream);
        if (err != cudaSuccess) {
            return sf_fail(SF_ERR_CUDA, "%s: cudaMemset2DAsync: %s", fn, cudaGetErrorString(err));
        }
        return SF_OK;
    }
    const gemm_key key = {
        .m = a->m,
        .n = a->n,
        .k = a->k,
        .lda = a->k,
        .ldb = a->lddy,
        .ldc = a->lddx,
        .epilogue = SF_GEMM_NONE,
        .op = GEMM_DX,
        .trans_a = CUBLAS_OP_N,
        .trans_b = CUBLAS_OP_N,
        .c_f32 = a->dx_f32,
        .align_a = align_log2(a->w),
        .align_b = align_log2(a->dy),
        .align_c = align_log2(a->dx),
        .align_bias = 0,
    };
    return run_product(cache, &key, a->w, a->dy, a->dx, a->accumulate, stream);
}

sf_status sf_cuda_gemm_dw(sf_gemm_cache *cache, const sf_gemm_dw_args *a, cudaStream_t stream) {
    static const char fn[] = "sf_cuda_gemm_dw";
    if (!a) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL args", fn);
    if (!a->dw && !a->db) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL dw and db", fn);
    if (!a->dy) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL dy", fn);
    if (a->dw && !a->x) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL x", fn);
    if (a->m < 0 || a->n < 0 || a->k < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: negative size m=%lld n=%lld k=%lld", fn,
                       (long long)a->m, (long long)a->n, (long long)a->k);
    }
    if (a->lddy < a->n || a->lddy < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: lddy=%lld below n=%lld (or 1)", fn,
                       (long long)a->lddy, (long long)a->n);
    }
    if (a->dw && (a->ldx < a->k || a->ldx < 1)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: ldx=%lld below k=%lld (or 1)", fn,
                       (long long)a->ldx, (long long)a->k);
    }
    if (!fits(a->m, a->lddy, 2) || (a->dw && (!fits(a->m, a->ldx, 2) || !fits(a->n, a->k, 4)))) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: sizes overflow 64-bit offsets: m=%lld n=%lld k=%lld ldx=%lld "
                       "lddy=%lld",
                       fn, (long long)a->m, (long long)a->n, (long long)a->k, (long long)a->ldx,
                       (long long)a->lddy);
    }
    if ((uintptr_t)a->dw % 4 || (uintptr_t)a->db % 4 || (uintptr_t)a->dy % 2 ||
        (uintptr_t)a->x % 2) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: pointer not aligned to its element: dw=%p db=%p dy=%p x=%p", fn,
                       (void *)a->dw, (void *)a->db, (const void *)a->dy, (const void *)a->x);
    }
    if (!cache) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL cache", fn);
    if (a->n == 0) return SF_OK;

    /* db: column sums of dy in a fixed order (kernels/activations.cu), from the same bf16 dy. */
    if (a->db) {
        sf_status st = sf_cuda_bias_backward(a->db, a->accumulate, a->dy, true, a->lddy, a->m,
                                             a->n, stream);
        if (st != SF_OK) return st;
    }
    if (!a->dw || a->k == 0) return SF_OK;
    if (a->m == 0) {
        /* An empty inner product: dw = 0, or dw unchanged when accumulating. */
        if (a->accumulate) return SF_OK;
        const cudaError_t err =
            cudaMemsetAsync(a->dw, 0, (size_t)a->n * (size_t)a->k * sizeof(float), stream);
        if (err != cudaSuccess) {
            return sf_fail(SF_ERR_CUDA, "%s: cudaMemsetAsync: %s", fn, cudaGetErrorString(err));
        }
        return SF_OK;
    }
    const gemm_key key = {
        .m = a->m,
        .n = a->n,
        .k = a->k,
        .lda = a->ldx,
        .ldb = a->lddy,
        .ldc = a->k,
        .epilogue = SF_GEMM_NONE,
        .op = GEMM_DW,
        .trans_a = CUBLAS_OP_N,
        .trans_b = CUBLAS_OP_T,
        .c_f32 = true,
        .align_a = align_log2(a->x),
        .align_b = align_log2(a->dy),
        .align_c = align_log2(a->dw),
        .align_bias = 0,
    };
    return run_product(cache, &key, a->x, a->dy, a->dw, a->accumulate, stream);
}

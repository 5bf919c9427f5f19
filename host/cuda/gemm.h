/* Internal: the engine's matrix products on cuBLASLt (host/cuda/gemm.c; CPU twin sf_cpu_matmul
 * in host/cpu/matmul.c).
 *
 *   y[m, n] = act(x[m, k] . w[n, k]^T + bias[n])
 *
 * x and w are bf16 row-major (w is an nn.Linear weight, [out_features, in_features]); bias is
 * bf16 [n] or NULL; y is bf16 or fp32 row-major; products and sums are fp32 (cuBLAS compute type
 * 32F), y is rounded once. Row strides (in elements) let x be a column block of a wider buffer
 * and y be written into one (e.g. the q part of a fused qkv buffer).
 *
 * Descriptors, matrix layouts and the heuristic's chosen algorithm are cached per shape (m, n,
 * k, strides, output type, epilogue), so after the first call at a shape a product costs one
 * cublasLtMatmul. Nothing is allocated inside sf_cuda_gemm once a shape is cached; the
 * workspace is the caller's (a slice of the engine's arena), so calls can be captured into a
 * CUDA graph. Every call enqueues on `stream` and never synchronises. */
#ifndef SF_CUDA_GEMM_H
#define SF_CUDA_GEMM_H

#include <cuda_runtime.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum sf_gemm_epilogue {
    SF_GEMM_NONE = 0,      /* y = x w^T                 */
    SF_GEMM_BIAS = 1,      /* y = x w^T + bias          */
    SF_GEMM_RELU_BIAS = 2, /* y = relu(x w^T + bias)    */
} sf_gemm_epilogue;

typedef struct sf_gemm_args {
    void *y;             /* [m, ldy] bf16, or fp32 when y_f32                                */
    int64_t ldy;         /* >= n                                                              */
    bool y_f32;
    const sf_bf16 *x;    /* [m, ldx]                                                          */
    int64_t ldx;         /* >= k                                                              */
    const sf_bf16 *w;    /* [n, k], contiguous                                                */
    const sf_bf16 *bias; /* [n]; required by the BIAS epilogues (which need a bf16 y: cuBLASLt
                            wants the bias in the output's type), ignored by NONE             */
    int64_t m, n, k;
    sf_gemm_epilogue epilogue;
} sf_gemm_args;

typedef struct sf_gemm_cache sf_gemm_cache;

/* A cache bound to one cuBLASLt handle and one device workspace (workspace_bytes of device
 * memory at workspace, 256-byte aligned; 32 MiB lets the heuristic pick its best kernels). */
sf_status sf_gemm_cache_create(void *workspace, size_t workspace_bytes, sf_gemm_cache **out);
void sf_gemm_cache_free(sf_gemm_cache *cache);

/* Enqueues the product. SF_ERR_INVALID_ARGUMENT for NULL pointers, negative sizes, strides
 * below the row lengths or a BIAS epilogue without bias (checked before any CUDA call);
 * SF_ERR_UNSUPPORTED when cuBLASLt offers no algorithm for the shape; SF_ERR_CUDA when a cuBLASLt
 * call fails (the status is named in sf_last_error). m == 0 or n == 0 enqueues nothing and
 * returns SF_OK; k must be > 0 (SF_ERR_INVALID_ARGUMENT otherwise). */
sf_status sf_cuda_gemm(sf_gemm_cache *cache, const sf_gemm_args *a, cudaStream_t stream);

/* ---------------------------------------------------------------------------------------------
 * Backward (training; CPU twin sf_cpu_linear_backward). For the forward y = x w^T + b:
 *   dx[m, k] (= or +=) dy[m, n] . w[n, k]        (sf_cuda_gemm_dx)
 *   dw[n, k] (= or +=) dy[m, n]^T . x[m, k]      (sf_cuda_gemm_dw, with db[n] (= or +=) the
 *                                                 column sums of dy)
 * cuBLASLt multiplies two operands of one type, so dy comes in bf16 like x and w: the fp32
 * gradient stream is rounded once on its way in (by the backward op that produced it, e.g.
 * sf_cuda_swiglu_backward with out_bf16, or sf_cuda_f32_to_bf16). Products and sums are fp32;
 * dw and db are fp32 (weight gradients accumulate over a batch: accumulate = true adds with
 * beta = 1 instead of overwriting); dx is fp32 (the gradient stream) or bf16.
 *
 * Same cache, same rules as sf_cuda_gemm: descriptors and algorithms are cached per operation,
 * shape, stride, output type and alignment (forward, dx and dw entries never mix), nothing is
 * allocated once a shape is cached, calls enqueue on `stream` and never synchronise.
 * Arguments are checked before the cache and before any CUDA call: SF_ERR_INVALID_ARGUMENT for
 * NULL pointers, negative sizes, row strides below the row lengths (or below 1), sizes whose
 * byte offsets overflow int64, or a pointer not aligned to its element. Empty outputs enqueue
 * nothing; an empty inner dimension (n == 0 for dx, m == 0 for dw and db) writes zeros, or
 * nothing when accumulating. SF_ERR_UNSUPPORTED / SF_ERR_CUDA as sf_cuda_gemm. */

typedef struct sf_gemm_dx_args {
    void *dx;          /* [m, lddx] fp32 when dx_f32, else bf16                            */
    int64_t lddx;      /* >= k                                                              */
    bool dx_f32;
    bool accumulate;   /* dx += dy w instead of dx = dy w                                   */
    const sf_bf16 *dy; /* [m, lddy]                                                         */
    int64_t lddy;      /* >= n                                                              */
    const sf_bf16 *w;  /* [n, k], contiguous: the forward's weight                          */
    int64_t m, n, k;   /* the forward's sizes                                               */
} sf_gemm_dx_args;

typedef struct sf_gemm_dw_args {
    float *dw;         /* [n, k] fp32, contiguous; NULL when only db is wanted              */
    float *db;         /* [n] fp32, or NULL: db[j] = sum_i dy[i, j] (fixed order)           */
    bool accumulate;   /* dw += and db += instead of =                                      */
    const sf_bf16 *dy; /* [m, lddy]                                                         */
    int64_t lddy;      /* >= n                                                              */
    const sf_bf16 *x;  /* [m, ldx]: the forward's input; may be NULL when dw is             */
    int64_t ldx;       /* >= k (ignored when dw is NULL)                                    */
    int64_t m, n, k;   /* the forward's sizes                                               */
} sf_gemm_dw_args;

/* Enqueues dx (=|+=) dy . w. dx must not overlap dy or w. */
sf_status sf_cuda_gemm_dx(sf_gemm_cache *cache, const sf_gemm_dx_args *a, cudaStream_t stream);

/* Enqueues dw (=|+=) dy^T . x and db (=|+=) column sums of dy (each when not NULL; at least
 * one). dw and db must not overlap the inputs or each other. */
sf_status sf_cuda_gemm_dw(sf_gemm_cache *cache, const sf_gemm_dw_args *a, cudaStream_t stream);

/* The recommended workspace size. */
#define SF_GEMM_WORKSPACE_BYTES ((size_t)32 << 20)

#ifdef __cplusplus
}
#endif

#endif

/* The CPU linear layer: out[m, n] = x[m, k] · w[n, k]^T (+ bias), fp32.
 *
 * Both operands keep k contiguous (x row-major, w an nn.Linear weight), so every output element
 * is a dot product of two contiguous rows. With OpenBLAS this is one sgemm with B transposed;
 * the portable path tiles the output so that a block of w rows stays in cache while a block of
 * x rows streams past it. */
#include "cpu/ops.h"

#include <limits.h>
#include <strings.h>

#ifdef SF_HAVE_CBLAS
#include <cblas.h>
#endif

/* Tile sizes of the portable loop. A tile reads MM_COLS rows of w over MM_DEPTH columns
 * (64 * 512 * 4 B = 128 KiB, an L2-sized block) and reuses it for MM_ROWS rows of x.
 * Splitting the output into tiles (rather than whole rows) keeps every thread busy in decode,
 * where m is 1 and all the parallelism is in n. */
enum { MM_ROWS = 16, MM_COLS = 64, MM_DEPTH = 512 };

/* Below this many rows of x, sf_cpu_matmul uses the portable loop even with BLAS. */
enum { MM_BLAS_MIN_ROWS = 16 };

static int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The build targets every x86-64 (SSE2), so the portable loop's tile is compiled three times,
 * also for x86-64-v3 (AVX2) and -v4 (AVX-512), and the widest the CPU runs is picked when the
 * program loads. The vectors only split each dot product's sum into more lanes (ISO C11
 * contracts nothing into FMAs); the gamma_k bound holds for any order. SmolLM2 decode, which
 * takes this loop (m < MM_BLAS_MIN_ROWS), on a 2-core AVX-512 machine: 18 -> 24-28 tokens/s
 * for one request, 46 -> 54-62 for four (docs/PERF.md). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define SF_VECTOR_CLONES \
    __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define SF_VECTOR_CLONES
#endif

/* Adds the dot products of one x row with four w rows over len values into acc_out[0..3]; the
 * four rows share every load of x. A dot product only vectorises if its sum may be
 * reassociated, which compilers do not do on their own without -ffast-math: the simd
 * reduction grants exactly that, for these sums only. The order is still fixed for a given
 * binary, and the error bound gamma_k * sum|x||w| holds for any order. (Hand-split lanes were
 * tried first: GCC -O3 then vectorises the outer loop with shuffles and runs 3-4x slower.)
 * Without OpenMP the directive vanishes and the loops stay scalar. */
static void dot_1x4(float acc_out[4], const float *xr, const float *w0, const float *w1,
                    const float *w2, const float *w3, int64_t len) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    SF_OMP(omp simd reduction(+ : s0, s1, s2, s3))
    for (int64_t p = 0; p < len; p++) {
        float a = xr[p];
        s0 += a * w0[p];
        s1 += a * w1[p];
        s2 += a * w2[p];
        s3 += a * w3[p];
    }
    acc_out[0] += s0;
    acc_out[1] += s1;
    acc_out[2] += s2;
    acc_out[3] += s3;
}

static float dot_1x1(const float *xr, const float *wr, int64_t len) {
    float s = 0.0f;
    SF_OMP(omp simd reduction(+ : s))
    for (int64_t p = 0; p < len; p++) s += xr[p] * wr[p];
    return s;
}

/* One output tile [i0, i1) x [j0, j1), accumulated over k in MM_DEPTH slices. */
SF_VECTOR_CLONES static void matmul_tile(float *out, const float *x, const float *w,
                                         const float *bias, int64_t n, int64_t k, int64_t i0,
                                         int64_t i1, int64_t j0, int64_t j1) {
    for (int64_t i = i0; i < i1; i++)
        for (int64_t j = j0; j < j1; j++) out[i * n + j] = 0.0f;

    for (int64_t p0 = 0; p0 < k; p0 += MM_DEPTH) {
        int64_t len = min_i64(MM_DEPTH, k - p0);
        for (int64_t i = i0; i < i1; i++) {
            const float *xr = x + i * k + p0;
            float *orow = out + i * n;
            int64_t j = j0;
            for (; j + 4 <= j1; j += 4) {
                const float *wr = w + j * k + p0;
                dot_1x4(orow + j, xr, wr, wr + k, wr + 2 * k, wr + 3 * k, len);
            }
            for (; j < j1; j++) orow[j] += dot_1x1(xr, w + j * k + p0, len);
        }
    }

    if (bias != NULL)
        for (int64_t i = i0; i < i1; i++)
            for (int64_t j = j0; j < j1; j++) out[i * n + j] += bias[j];
}

void sf_cpu_matmul_portable(float *out, const float *x, const float *w, const float *bias,
                            int64_t m, int64_t n, int64_t k) {
    if (m <= 0 || n <= 0) return;
    int64_t row_tiles = (m + MM_ROWS - 1) / MM_ROWS;
    int64_t col_tiles = (n + MM_COLS - 1) / MM_COLS;
    int64_t tiles = row_tiles * col_tiles;
    SF_OMP(omp parallel for schedule(static))
    for (int64_t t = 0; t < tiles; t++) {
        /* Column tiles vary fastest, so neighbouring threads share the same x rows. */
        int64_t i0 = (t / col_tiles) * MM_ROWS;
        int64_t j0 = (t % col_tiles) * MM_COLS;
        matmul_tile(out, x, w, bias, n, k, i0, min_i64(m, i0 + MM_ROWS), j0,
                    min_i64(n, j0 + MM_COLS));
    }
}

void sf_cpu_matmul(float *out, const float *x, const float *w, const float *bias, int64_t m,
                   int64_t n, int64_t k) {
#ifdef SF_HAVE_CBLAS
    /* CBLAS takes int sizes and rejects a leading dimension of 0 (k == 0) by printing through
     * xerbla, so empty or oversized problems take the portable path instead. So do skinny
     * products (decode: m = batch size): there the portable tiles, parallel over n, beat
     * OpenBLAS's generic sgemm (bench_cpu_forward, 4 requests, 2 cores: ~1400 vs ~1050 decode
     * tokens/s) and match its SkylakeX one (2300-2750 both, within the machine's noise). */
    if (m >= MM_BLAS_MIN_ROWS && n > 0 && k > 0 && m <= INT_MAX && n <= INT_MAX && k <= INT_MAX) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)n, (int)k, 1.0f, x,
                    (int)k, w, (int)k, 0.0f, out, (int)n);
        if (bias != NULL) {
            SF_OMP(omp parallel for schedule(static))
            for (int64_t i = 0; i < m; i++)
                for (int64_t j = 0; j < n; j++) out[i * n + j] += bias[j];
        }
        return;
    }
#endif
    sf_cpu_matmul_portable(out, x, w, bias, m, n, k);
}

/* ---- backward ------------------------------------------------------------------------------ */

/* dx[m, k] (= or +=) dy[m, n] . w[n, k]: each dx row is a sum of w rows weighted by one dy row,
 * an axpy over contiguous rows, so rows of dx are independent and split across threads. */
static void linear_dx_portable(float *dx, bool accumulate, const float *dy, const float *w,
                               int64_t m, int64_t n, int64_t k) {
    SF_OMP(omp parallel for schedule(static))
    for (int64_t i = 0; i < m; i++) {
        float *dxr = dx + i * k;
        const float *dyr = dy + i * n;
        if (!accumulate)
            for (int64_t p = 0; p < k; p++) dxr[p] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            float a = dyr[j];
            const float *wr = w + j * k;
            SF_OMP(omp simd)
            for (int64_t p = 0; p < k; p++) dxr[p] += a * wr[p];
        }
    }
}

/* dw[n, k] += dy[m, n]^T . x[m, k]: dw row j is a sum of x rows weighted by column j of dy, so
 * threads split the rows of dw and none of them shares an output. */
static void linear_dw_portable(float *dw, const float *dy, const float *x, int64_t m, int64_t n,
                               int64_t k) {
    SF_OMP(omp parallel for schedule(static))
    for (int64_t j = 0; j < n; j++) {
        float *dwr = dw + j * k;
        for (int64_t i = 0; i < m; i++) {
            float a = dy[i * n + j];
            const float *xr = x + i * k;
            SF_OMP(omp simd)
            for (int64_t p = 0; p < k; p++) dwr[p] += a * xr[p];
        }
    }
}

void sf_cpu_linear_backward(float *dx, bool accumulate_dx, float *dw, float *db, const float *dy,
                            const float *x, const float *w, int64_t m, int64_t n, int64_t k) {
    if (db != NULL) {
        /* Columns are independent sums over rows; accumulating in double keeps a bias gradient
         * summed over thousands of tokens at fp32 accuracy. */
        SF_OMP(omp parallel for schedule(static))
        for (int64_t j = 0; j < n; j++) {
            double s = 0.0;
            for (int64_t i = 0; i < m; i++) s += dy[i * n + j];
            db[j] = (float)((double)db[j] + s);
        }
    }
#ifdef SF_HAVE_CBLAS
    /* As in sf_cpu_matmul: CBLAS takes int sizes, xerbla prints on a zero leading dimension, and
     * tiny products are no faster through it, so those take the portable loops. Every size must
     * be positive here: with n == 0, "dx = dy . w" is a zero fill that sgemm with k_inner == 0
     * would also do, but not every BLAS honours beta for an empty inner product. */
    bool blas = m >= MM_BLAS_MIN_ROWS && n >= MM_BLAS_MIN_ROWS && k >= MM_BLAS_MIN_ROWS &&
                m <= INT_MAX && n <= INT_MAX && k <= INT_MAX;
    if (blas) {
        if (dx != NULL)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)k, (int)n, 1.0f,
                        dy, (int)n, w, (int)k, accumulate_dx ? 1.0f : 0.0f, dx, (int)k);
        if (dw != NULL)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)n, (int)k, (int)m, 1.0f, dy,
                        (int)n, x, (int)k, 1.0f, dw, (int)k);
        return;
    }
#endif
    if (dx != NULL) linear_dx_portable(dx, accumulate_dx, dy, w, m, n, k);
    if (dw != NULL) linear_dw_portable(dw, dy, x, m, n, k);
}

/* ---- which BLAS ---------------------------------------------------------------------------- */

const char *sf_cpu_matmul_backend(void) {
#ifdef SF_HAVE_CBLAS
    return openblas_get_config();
#else
    return "portable loop (built without BLAS)";
#endif
}

const char *sf_cpu_blas_hint_for(const char *core, bool avx512, bool avx2_fma, bool avx) {
    /* OpenBLAS falls back to "Prescott" (SSE3) for a CPU model it does not know; on a CPU that
     * really is that old none of the features below is present. Any other choice is its own
     * and is kept. */
    if (!core || strcasecmp(core, "Prescott") != 0) return NULL;
    if (avx512) return "SkylakeX";
    if (avx2_fma) return "Haswell";
    if (avx) return "Sandybridge";
    return NULL;
}

const char *sf_cpu_blas_coretype_hint(void) {
#if defined(SF_HAVE_CBLAS) && (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    /* OpenBLAS's SkylakeX kernels use AVX-512 F, CD, BW, DQ and VL; its Haswell ones AVX2 and
     * FMA. __builtin_cpu_supports also asks whether the OS saves those registers. */
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vl");
    const bool avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return sf_cpu_blas_hint_for(openblas_get_corename(), avx512, avx2_fma,
                                __builtin_cpu_supports("avx"));
#else
    return NULL;
#endif
}

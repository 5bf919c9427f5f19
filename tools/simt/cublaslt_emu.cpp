// tools/simt: a cuBLASLt stand-in on the host, for the engine, train and backward suites. Built
// against the real cublasLt.h (so host/cuda/gemm.c links to the real prototypes), without
// shim.h; its products go on the emulated streams through simt_api.h, so they queue and are
// captured like kernels.
//
// It implements what host/cuda/gemm.c uses and nothing more, and says so loudly
// (CUBLAS_STATUS_NOT_SUPPORTED and a line on stderr) for anything else:
//   compute type 32F with scale type 32F; A and B bf16, column-major (the default order), no
//   batching; C and D of one layout, bf16 or fp32; transposes N and T; epilogues DEFAULT, BIAS
//   and RELU_BIAS with a bias of D's type (cublasLt.h: bias elements have the output's type);
//   alpha and beta as host floats (the default pointer mode), read when the product is enqueued.
// D = epilogue(alpha op(A) op(B) + beta C (+ bias)), products and sums in fp32, D rounded once to
// nearest even. The summation order is not a GPU kernel's, so results agree with cuBLASLt's to
// fp32 rounding, not bit for bit.
//
// What it checks that a GPU would only show as wrong numbers or a fault:
//   - the heuristic's alignment preferences (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES, 256 when
//     unset, and the bias pointer's alignment when the heuristic ran) travel in the returned
//     algorithm; a product whose pointers are less aligned than its algorithm was chosen for is
//     an emulator error (on a GPU: a kernel that assumes the wider alignment);
//   - the algorithm is used for the problem (sizes, types, transposes, epilogue) it was chosen for;
//   - every matrix, the bias and the workspace lie inside one device allocation;
//   - D overlaps neither A, B nor the bias, nor C unless C is D (on a GPU: a race);
//   - the heuristic's preference rules out split-K reductions in the output type
//     (CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK without INPLACE and OUTPUT_TYPE): this
//     stand-in rounds D once, which a GPU does only then;
//   - the algorithm's workspace: the heuristic asks for up to kWorkspace bytes (within the
//     preference's maximum), and a product handed less, or a workspace that is not 256-byte
//     aligned, is an error (cublasLt.h: the workspace must hold the algorithm's workspaceSize).
#include <cublasLt.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <string>
#include <vector>

#include "bf16_bits.h"
#include "simt_api.h"

namespace {

struct Handle {
    uint64_t magic = 0x5349'4d54'4c54'4831ull;
};

struct Desc {
    cublasComputeType_t compute;
    cudaDataType_t scale;
    int32_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N;
    uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    const void *bias = nullptr;
    int32_t bias_type = -1;  // unset: D's type
};

struct Layout {
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld;
};

struct Pref {
    uint64_t max_workspace = 0;
    uint32_t align[4] = {256, 256, 256, 256};  // A, B, C, D
    uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_MASK;  // the default: every scheme
};

// The workspace an algorithm of this stand-in asks for, when the preference allows that much:
// a product must then be handed at least this many bytes, as a GPU's split-K would need.
constexpr uint64_t kWorkspace = 1 << 20;

// What an algorithm was chosen for, packed into cublasLtMatmulAlgo_t's 64 bytes.
struct AlgoInfo {
    uint32_t magic;
    uint32_t align[5];  // A, B, C, D, bias (bytes)
    uint64_t m, n, k;
    uint16_t types;  // A, B, D types and transposes and epilogue, folded
    uint16_t pad;
    uint32_t workspace;  // bytes the product needs
};
static_assert(sizeof(AlgoInfo) <= sizeof(cublasLtMatmulAlgo_t), "algo info fits");
constexpr uint32_t kAlgoMagic = 0x414c474fu;

cublasStatus_t unsupported(const std::string &what) {
    fprintf(stderr, "simt cuBLASLt stand-in: not supported: %s\n", what.c_str());
    return CUBLAS_STATUS_NOT_SUPPORTED;
}

size_t type_size(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

uint32_t alignment(const void *p) {
    uint32_t a = 1;
    while (a < 256 && ((uintptr_t)p & a) == 0) a <<= 1;
    return a;
}

uint16_t fold(const Desc &d, const Layout &D) {
    return (uint16_t)((d.trans_a & 1) | (d.trans_b & 1) << 1 | (d.epilogue & 0xff) << 2 |
                      (D.type == CUDA_R_32F) << 10);
}

// The problem (m, n, k) of desc on these layouts, or a reason it is not one this stand-in does.
std::string problem(const Desc &d, const Layout &A, const Layout &B, const Layout &C,
                    const Layout &D, uint64_t *m, uint64_t *n, uint64_t *k) {
    if (d.compute != CUBLAS_COMPUTE_32F || d.scale != CUDA_R_32F)
        return "compute type " + std::to_string((int)d.compute) + ", scale type " +
               std::to_string((int)d.scale) + " (only 32F / R_32F)";
    if (A.type != CUDA_R_16BF || B.type != CUDA_R_16BF)
        return "A, B types " + std::to_string((int)A.type) + ", " + std::to_string((int)B.type) +
               " (only bf16)";
    if (D.type != CUDA_R_16BF && D.type != CUDA_R_32F)
        return "D type " + std::to_string((int)D.type) + " (only bf16, fp32)";
    if (C.type != D.type || C.rows != D.rows || C.cols != D.cols || C.ld != D.ld)
        return "C and D layouts differ";
    if ((d.trans_a != CUBLAS_OP_N && d.trans_a != CUBLAS_OP_T) ||
        (d.trans_b != CUBLAS_OP_N && d.trans_b != CUBLAS_OP_T))
        return "transpose " + std::to_string(d.trans_a) + "/" + std::to_string(d.trans_b);
    if (d.epilogue != CUBLASLT_EPILOGUE_DEFAULT && d.epilogue != CUBLASLT_EPILOGUE_BIAS &&
        d.epilogue != CUBLASLT_EPILOGUE_RELU_BIAS)
        return "epilogue " + std::to_string(d.epilogue);
    if (d.epilogue != CUBLASLT_EPILOGUE_DEFAULT && d.bias_type != -1 && d.bias_type != D.type)
        return "bias type " + std::to_string(d.bias_type) + " with D type " +
               std::to_string((int)D.type) + " (cublasLt.h: the bias has the output's type)";
    for (const Layout *l : {&A, &B, &D})
        if (l->ld < (int64_t)l->rows || l->ld < 1) return "ld below rows";
    *m = D.rows;
    *n = D.cols;
    const uint64_t am = d.trans_a == CUBLAS_OP_N ? A.rows : A.cols;
    *k = d.trans_a == CUBLAS_OP_N ? A.cols : A.rows;
    const uint64_t bk = d.trans_b == CUBLAS_OP_N ? B.rows : B.cols;
    const uint64_t bn = d.trans_b == CUBLAS_OP_N ? B.cols : B.rows;
    if (am != *m || bk != *k || bn != *n)
        return "op(A) " + std::to_string(am) + "x" + std::to_string(*k) + ", op(B) " +
               std::to_string(bk) + "x" + std::to_string(bn) + ", D " + std::to_string(*m) + "x" +
               std::to_string(*n) + " do not chain";
    return "";
}

// Bytes a column-major rows x cols matrix with leading dimension ld spans.
size_t span(const Layout &l) {
    return l.rows == 0 || l.cols == 0 ? 0
                                      : ((size_t)(l.cols - 1) * (size_t)l.ld + l.rows) *
                                            type_size(l.type);
}

// One product, by value: what the enqueued (or captured) work computes when it runs.
struct Product {
    uint64_t m, n, k;
    bool ta, tb;
    const uint16_t *a, *b;
    int64_t lda, ldb, ldd;
    const void *c;
    void *d;
    bool d_f32;
    uint32_t epilogue;
    const void *bias;
    float alpha, beta;

    void run() const {
        // op(A) as m rows of k, op(B) as n rows of k, in fp32: then every output is one dot
        std::vector<float> ar(m * k), br(n * k);
        for (uint64_t i = 0; i < m; i++)
            for (uint64_t p = 0; p < k; p++)
                ar[i * k + p] = emu::bf2f(ta ? a[p + i * lda] : a[i + p * lda]);
        for (uint64_t j = 0; j < n; j++)
            for (uint64_t p = 0; p < k; p++)
                br[j * k + p] = emu::bf2f(tb ? b[j + p * ldb] : b[p + j * ldb]);
        for (uint64_t j = 0; j < n; j++) {
            for (uint64_t i = 0; i < m; i++) {
                const float *x = &ar[i * k], *y = &br[j * k];
                float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                uint64_t p = 0;
                for (; p + 8 <= k; p += 8)
                    for (int q = 0; q < 8; q++) s[q] += x[p + q] * y[p + q];
                for (; p < k; p++) s[p % 8] += x[p] * y[p];
                float acc = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
                float v = alpha * acc;
                const size_t at = (size_t)(i + j * ldd);
                if (beta != 0.0f) {
                    const float cv = d_f32 ? ((const float *)c)[at]
                                           : emu::bf2f(((const uint16_t *)c)[at]);
                    v += beta * cv;
                }
                if (epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
                    v += d_f32 ? ((const float *)bias)[i]
                               : emu::bf2f(((const uint16_t *)bias)[i]);
                    if (epilogue == CUBLASLT_EPILOGUE_RELU_BIAS && !(v > 0.0f)) v = 0.0f;
                }
                if (d_f32) ((float *)d)[at] = v;
                else ((uint16_t *)d)[at] = emu::f2bf_rn(v);
            }
        }
    }
};

// The live handles, descriptors, layouts and preferences (simt::resources): an error path of
// the engine's must destroy what it created.
size_t live_objects = 0;
template <typename T>
T *created(T *p) {
    live_objects++;
    return p;
}
template <typename T>
T *destroyed(T *p) {
    if (p) live_objects--;
    return p;
}

// An attribute's bytes into its field: size must be exactly the field's, as cuBLASLt checks.
template <typename T>
cublasStatus_t set_attribute(T *field, const void *buf, size_t size) {
    if (size != sizeof(T)) return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(field, buf, size);
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

extern "C" {

cublasStatus_t cublasLtCreate(cublasLtHandle_t *handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    if (simt::injected(simt::FAULT_CREATE)) return CUBLAS_STATUS_ALLOC_FAILED;
    *handle = reinterpret_cast<cublasLtHandle_t>(created(new Handle));
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
    delete destroyed(reinterpret_cast<Handle *>(handle));
    return CUBLAS_STATUS_SUCCESS;
}

const char *cublasLtGetStatusName(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    default: return "CUBLAS_STATUS_(other)";
    }
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *desc, cublasComputeType_t compute,
                                        cudaDataType_t scale) {
    Desc *d = created(new Desc);
    d->compute = compute;
    d->scale = scale;
    *desc = reinterpret_cast<cublasLtMatmulDesc_t>(d);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
    delete destroyed(reinterpret_cast<Desc *>(desc));
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                              cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t size) {
    Desc *d = reinterpret_cast<Desc *>(desc);
    if (!d || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: return set_attribute(&d->trans_a, buf, size);
    case CUBLASLT_MATMUL_DESC_TRANSB: return set_attribute(&d->trans_b, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return set_attribute(&d->epilogue, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return set_attribute(&d->bias, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: return set_attribute(&d->bias_type, buf, size);
    default: return unsupported("matmul descriptor attribute " + std::to_string((int)attr));
    }
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *layout, cudaDataType type,
                                          uint64_t rows, uint64_t cols, int64_t ld) {
    *layout = reinterpret_cast<cublasLtMatrixLayout_t>(created(new Layout{type, rows, cols, ld}));
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
    delete destroyed(reinterpret_cast<Layout *>(layout));
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *pref) {
    *pref = reinterpret_cast<cublasLtMatmulPreference_t>(created(new Pref));
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
    delete destroyed(reinterpret_cast<Pref *>(pref));
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void *buf, size_t size) {
    Pref *p = reinterpret_cast<Pref *>(pref);
    if (!p || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    int slot = -1;
    switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
        return set_attribute(&p->max_workspace, buf, size);
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK:
        return set_attribute(&p->reductions, buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: slot = 0; break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: slot = 1; break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: slot = 2; break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: slot = 3; break;
    default: return unsupported("matmul preference attribute " + std::to_string((int)attr));
    }
    return set_attribute(&p->align[slot], buf, size);
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                              cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                              cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t *results,
                                              int *found) {
    if (!handle || !desc || !a || !b || !c || !d || !pref || requested < 1 || !results || !found)
        return CUBLAS_STATUS_INVALID_VALUE;
    const Desc &ds = *reinterpret_cast<Desc *>(desc);
    const Pref &p = *reinterpret_cast<Pref *>(pref);
    const Layout &D = *reinterpret_cast<Layout *>(d);
    uint64_t m, n, k;
    const Layout &A = *reinterpret_cast<Layout *>(a), &B = *reinterpret_cast<Layout *>(b);
    const std::string why = problem(ds, A, B, *reinterpret_cast<Layout *>(c), D, &m, &n, &k);
    *found = 0;
    if (!why.empty()) return unsupported(why);
    const uint32_t in_output_type =
        CUBLASLT_REDUCTION_SCHEME_INPLACE | CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
    if (p.reductions & in_output_type) {
        simt::report("cublasLtMatmulAlgoGetHeuristic: the preference allows split-K reductions "
                     "in the output type (CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK " +
                     std::to_string(p.reductions) + " has INPLACE or OUTPUT_TYPE): a GPU may then "
                     "round partial sums to D's type, this stand-in rounds once");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    AlgoInfo info = {};
    info.magic = kAlgoMagic;
    for (int i = 0; i < 4; i++) info.align[i] = p.align[i];
    info.align[4] = ds.epilogue != CUBLASLT_EPILOGUE_DEFAULT ? alignment(ds.bias) : 1;
    info.m = m, info.n = n, info.k = k;
    info.types = fold(ds, D);
    info.workspace = (uint32_t)(p.max_workspace < kWorkspace ? p.max_workspace : kWorkspace);
    memset(&results[0], 0, sizeof results[0]);
    memcpy(&results[0].algo, &info, sizeof info);
    results[0].workspaceSize = info.workspace;
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *found = 1;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                              const void *alpha, const void *A, cublasLtMatrixLayout_t adesc,
                              const void *B, cublasLtMatrixLayout_t bdesc, const void *beta,
                              const void *C, cublasLtMatrixLayout_t cdesc, void *D,
                              cublasLtMatrixLayout_t ddesc, const cublasLtMatmulAlgo_t *algo,
                              void *workspace, size_t workspace_bytes, cudaStream_t stream) {
    if (!handle || !desc || !alpha || !beta || !adesc || !bdesc || !cdesc || !ddesc)
        return CUBLAS_STATUS_INVALID_VALUE;
    const Desc &ds = *reinterpret_cast<Desc *>(desc);
    const Layout &la = *reinterpret_cast<Layout *>(adesc), &lb = *reinterpret_cast<Layout *>(bdesc);
    const Layout &lc = *reinterpret_cast<Layout *>(cdesc), &ld = *reinterpret_cast<Layout *>(ddesc);
    uint64_t m, n, k;
    const std::string why = problem(ds, la, lb, lc, ld, &m, &n, &k);
    if (!why.empty()) return unsupported(why);
    Product pr;
    pr.m = m, pr.n = n, pr.k = k;
    pr.ta = ds.trans_a == CUBLAS_OP_T;
    pr.tb = ds.trans_b == CUBLAS_OP_T;
    pr.a = (const uint16_t *)A, pr.b = (const uint16_t *)B;
    pr.lda = la.ld, pr.ldb = lb.ld, pr.ldd = ld.ld;
    pr.c = C, pr.d = D;
    pr.d_f32 = ld.type == CUDA_R_32F;
    pr.epilogue = ds.epilogue;
    pr.bias = ds.bias;  // the attribute's value now: a later change does not reach this product
    memcpy(&pr.alpha, alpha, 4);
    memcpy(&pr.beta, beta, 4);

    std::string err;
    if (algo) {
        AlgoInfo info;
        memcpy(&info, algo, sizeof info);
        if (info.magic != kAlgoMagic) {
            err += "an algorithm cublasLtMatmulAlgoGetHeuristic did not return; ";
        } else {
            if (info.m != m || info.n != n || info.k != k || info.types != fold(ds, ld))
                err += "an algorithm chosen for another problem; ";
            const void *ptrs[5] = {A, B, C, D, ds.bias};
            const char *names[5] = {"A", "B", "C", "D", "bias"};
            for (int i = 0; i < 5; i++) {
                if (i == 4 && ds.epilogue == CUBLASLT_EPILOGUE_DEFAULT) continue;
                if (alignment(ptrs[i]) < info.align[i])
                    err += std::string(names[i]) + " is " + std::to_string(alignment(ptrs[i])) +
                           "-byte aligned, its algorithm was chosen for " +
                           std::to_string(info.align[i]) + "; ";
            }
            if (info.workspace > 0 && (workspace_bytes < info.workspace || !workspace ||
                                       (uintptr_t)workspace % 256 != 0))
                err += "a workspace of " + std::to_string(workspace_bytes) + " bytes at " +
                       std::to_string(alignment(workspace)) + "-byte alignment for an algorithm "
                       "that needs " + std::to_string(info.workspace) + " 256-byte aligned; ";
        }
    }
    // D is written while A, B, C and the bias are read: only C may be D, and only exactly.
    const size_t d_bytes = span(ld);
    auto overlaps = [&](const void *p, size_t bytes) {
        const uintptr_t a0 = (uintptr_t)p, d0 = (uintptr_t)D;
        return bytes > 0 && d_bytes > 0 && a0 < d0 + d_bytes && d0 < a0 + bytes;
    };
    if (overlaps(A, span(la))) err += "D overlaps A; ";
    if (overlaps(B, span(lb))) err += "D overlaps B; ";
    if (pr.beta != 0.0f && C != D && overlaps(C, span(lc))) err += "D overlaps C (and is not C); ";
    if (ds.epilogue != CUBLASLT_EPILOGUE_DEFAULT && overlaps(ds.bias, m * type_size(ld.type)))
        err += "D overlaps the bias; ";
    if (!simt::device_span(A, span(la))) err += "A is not inside one device allocation; ";
    if (!simt::device_span(B, span(lb))) err += "B is not inside one device allocation; ";
    if (pr.beta != 0.0f && !simt::device_span(C, span(lc)))
        err += "C is not inside one device allocation; ";
    if (!simt::device_span(D, span(ld))) err += "D is not inside one device allocation; ";
    if (ds.epilogue != CUBLASLT_EPILOGUE_DEFAULT &&
        (!ds.bias || !simt::device_span(ds.bias, m * type_size(ld.type))))
        err += "the bias is not inside one device allocation; ";
    if (workspace_bytes > 0 && !simt::device_span(workspace, workspace_bytes))
        err += "the workspace is not inside one device allocation; ";
    if (!err.empty()) {
        char shape[128];
        snprintf(shape, sizeof shape, "cublasLtMatmul m=%llu n=%llu k=%llu: ",
                 (unsigned long long)m, (unsigned long long)n, (unsigned long long)k);
        simt::report(shape + err);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    if (simt::injected(simt::FAULT_LAUNCH)) return CUBLAS_STATUS_EXECUTION_FAILED;
    if (simt::enqueue_op(stream, "cublasLtMatmul", [pr] { pr.run(); }) != 0)
        return CUBLAS_STATUS_EXECUTION_FAILED;
    return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"

size_t simt::blaslt_objects() { return live_objects; }

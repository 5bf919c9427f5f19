// cuDNN's fused scaled-dot-product attention through the backend API (cudnn_attention.h): the
// operation graph, the engine search and the execution. Host code only.
//
// The graph is spelled the way cuDNN's fused flash-attention engines recognise it: the pattern
// the cuDNN developer guide documents as "Fused Flash Attention fprop", which is also what
// cuDNN's frontend lowers its SDPA node to before cuDNN 9.21. One backend operation per step:
//
//   S  = matmul(Q, K^T)                      fp32; K^T is K's descriptor with the last two dims
//                                            (and their strides) swapped, no copy
//   S1 = S * scale                           pointwise MUL, scale a by-value fp32 scalar
//   causal only (top-left):
//     row = GEN_INDEX(S1, axis 2), col = GEN_INDEX(S1, axis 3)           int32
//     keep = CMP_GE(row, col)                                             boolean
//     S2 = BINARY_SELECT(S1, -inf, keep)     keep ? S1 : -inf, -inf a by-value fp32 scalar
//   M  = reduction MAX(S2) over keys         [b, h, s_q, 1]
//   E  = EXP(S2 - M)                         pointwise SUB then EXP
//   Z  = reduction ADD(E)                    [b, h, s_q, 1]
//   stats = M + LOG(Z)                       virtual: the flash pattern always carries the
//                                            log-sum-exp; inference leaves it unmaterialised
//   P  = E / Z                               bf16: the second matmul's A operand is the io type
//   O  = matmul(P, V)
//
// Every intermediate is a virtual tensor (fp32 unless noted) with the strides of a packed
// [b, h, s_q, s_kv] (or [b, h, s_q, 1]) tensor; they carry UIDs from UID_FIRST_VIRTUAL on.
// Q, K, V, O and the two scalars are the only tensors the variant pack binds.
#include "cudnn_attention.h"

#include <cudnn_graph.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <limits>
#include <new>
#include <utility>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Descriptors and errors
// ---------------------------------------------------------------------------------------------

// The tensors the variant pack binds.
enum : int64_t {
    UID_Q = 1,
    UID_K = 2,
    UID_V = 3,
    UID_O = 4,
    UID_SCALE = 5,
    UID_NEG_INF = 6,  // causal graphs only
    UID_FIRST_VIRTUAL = 100,
};

// Owns one backend descriptor; movable, not copyable.
class Descriptor {
  public:
    Descriptor() = default;
    ~Descriptor() { reset(); }
    Descriptor(const Descriptor &) = delete;
    Descriptor &operator=(const Descriptor &) = delete;
    Descriptor(Descriptor &&o) noexcept : d_(o.d_) { o.d_ = nullptr; }
    Descriptor &operator=(Descriptor &&o) noexcept {
        if (this != &o) {
            reset();
            d_ = o.d_;
            o.d_ = nullptr;
        }
        return *this;
    }
    cudnnStatus_t create(cudnnBackendDescriptorType_t type) {
        reset();
        return cudnnBackendCreateDescriptor(type, &d_);
    }
    cudnnBackendDescriptor_t get() const { return d_; }
    void reset() {
        if (d_) cudnnBackendDestroyDescriptor(d_);
        d_ = nullptr;
    }

  private:
    cudnnBackendDescriptor_t d_ = nullptr;
};

// Where a failing step writes its message. Every fail* returns false, for `return e.fail(...)`.
struct ErrorSink {
    char *buf;
    size_t len;

    // "<step>: <cuDNN status>", and cuDNN's own last message when it has one.
    bool fail(const char *step, cudnnStatus_t status) const {
        if (!buf || len == 0) return false;
        char last[512] = "";
        cudnnGetLastErrorString(last, sizeof last);
        if (last[0])
            snprintf(buf, len, "%s: %s (cuDNN's last error: %s)", step,
                     cudnnGetErrorString(status), last);
        else
            snprintf(buf, len, "%s: %s", step, cudnnGetErrorString(status));
        return false;
    }

    __attribute__((format(printf, 2, 3))) bool failf(const char *fmt, ...) const {
        if (!buf || len == 0) return false;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, len, fmt, ap);
        va_end(ap);
        return false;
    }
};

// The attribute and its name, for messages.
#define ATTR(name) name, #name

// ---------------------------------------------------------------------------------------------
// Operation graph
// ---------------------------------------------------------------------------------------------

// How the causal mask computes its indices. cuDNN's frontend spelled GEN_INDEX with int32 math
// for years and now with fp32 math (its default compute type). Which of the two a given cuDNN
// matches could not be checked without a GPU, so a causal plan tries both and keeps the first
// that gives a plan.
enum class IndexMath { Int32, Float };

// The descriptors of one operation graph, alive as long as any plan built from it.
struct Graph {
    std::vector<Descriptor> owned;
    std::vector<cudnnBackendDescriptor_t> ops;
    cudnnBackendDescriptor_t op_graph = nullptr;
};

// Creates, sets and finalizes descriptors into a Graph, naming each step in its messages.
class GraphBuilder {
  public:
    GraphBuilder(Graph *g, ErrorSink e) : g_(g), e_(e) {}

    bool create(cudnnBackendDescriptorType_t type, const char *what,
                cudnnBackendDescriptor_t *d) {
        Descriptor owned;
        const cudnnStatus_t st = owned.create(type);
        if (st != CUDNN_STATUS_SUCCESS) return fail(what, "cudnnBackendCreateDescriptor", st);
        *d = owned.get();
        g_->owned.push_back(std::move(owned));
        return true;
    }

    bool set(cudnnBackendDescriptor_t d, const char *what, cudnnBackendAttributeName_t name,
             const char *name_str, cudnnBackendAttributeType_t type, int64_t count,
             const void *value) {
        const cudnnStatus_t st = cudnnBackendSetAttribute(d, name, type, count, value);
        if (st != CUDNN_STATUS_SUCCESS) return fail(what, name_str, st);
        return true;
    }

    bool finalize(cudnnBackendDescriptor_t d, const char *what) {
        const cudnnStatus_t st = cudnnBackendFinalize(d);
        if (st != CUDNN_STATUS_SUCCESS) return fail(what, "cudnnBackendFinalize", st);
        return true;
    }

    enum class Kind { Io, Virtual, ByValue };

    // A finalized 4-d tensor. By-value tensors are scalars: dims and strides all 1.
    bool tensor(const char *name, int64_t uid, cudnnDataType_t type, const int64_t dims[4],
                const int64_t strides[4], Kind kind, cudnnBackendDescriptor_t *t) {
        char what[96];
        snprintf(what, sizeof what, "tensor %s (uid %lld)", name, (long long)uid);
        const int64_t alignment = 16;  // cudaMalloc'd buffers, 16-byte rows
        const bool yes = true;
        if (!create(CUDNN_BACKEND_TENSOR_DESCRIPTOR, what, t) ||
            !set(*t, what, ATTR(CUDNN_ATTR_TENSOR_DATA_TYPE), CUDNN_TYPE_DATA_TYPE, 1, &type) ||
            !set(*t, what, ATTR(CUDNN_ATTR_TENSOR_DIMENSIONS), CUDNN_TYPE_INT64, 4, dims) ||
            !set(*t, what, ATTR(CUDNN_ATTR_TENSOR_STRIDES), CUDNN_TYPE_INT64, 4, strides) ||
            !set(*t, what, ATTR(CUDNN_ATTR_TENSOR_UNIQUE_ID), CUDNN_TYPE_INT64, 1, &uid) ||
            !set(*t, what, ATTR(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT), CUDNN_TYPE_INT64, 1,
                 &alignment))
            return false;
        if (kind == Kind::Virtual &&
            !set(*t, what, ATTR(CUDNN_ATTR_TENSOR_IS_VIRTUAL), CUDNN_TYPE_BOOLEAN, 1, &yes))
            return false;
        if (kind == Kind::ByValue &&
            !set(*t, what, ATTR(CUDNN_ATTR_TENSOR_IS_BY_VALUE), CUDNN_TYPE_BOOLEAN, 1, &yes))
            return false;
        return finalize(*t, what);
    }

    // c = a b over the last two dims, batch dims broadcast (GQA: K and V have fewer heads).
    bool matmul(const char *name, cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b,
                cudnnBackendDescriptor_t c) {
        char what[96];
        snprintf(what, sizeof what, "matmul %s", name);
        const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
        cudnnBackendDescriptor_t desc, op;
        if (!create(CUDNN_BACKEND_MATMUL_DESCRIPTOR, what, &desc) ||
            !set(desc, what, ATTR(CUDNN_ATTR_MATMUL_COMP_TYPE), CUDNN_TYPE_DATA_TYPE, 1, &comp) ||
            !finalize(desc, what) ||
            !create(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, what, &op) ||
            !set(op, what, ATTR(CUDNN_ATTR_OPERATION_MATMUL_ADESC), CUDNN_TYPE_BACKEND_DESCRIPTOR,
                 1, &a) ||
            !set(op, what, ATTR(CUDNN_ATTR_OPERATION_MATMUL_BDESC), CUDNN_TYPE_BACKEND_DESCRIPTOR,
                 1, &b) ||
            !set(op, what, ATTR(CUDNN_ATTR_OPERATION_MATMUL_CDESC), CUDNN_TYPE_BACKEND_DESCRIPTOR,
                 1, &c) ||
            !set(op, what, ATTR(CUDNN_ATTR_OPERATION_MATMUL_DESC), CUDNN_TYPE_BACKEND_DESCRIPTOR,
                 1, &desc) ||
            !finalize(op, what))
            return false;
        g_->ops.push_back(op);
        return true;
    }

    // y = mode(x[, b[, t]]); axis >= 0 only for GEN_INDEX.
    bool pointwise(const char *name, cudnnPointwiseMode_t mode, cudnnDataType_t math,
                   cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t b,
                   cudnnBackendDescriptor_t t, cudnnBackendDescriptor_t y, int64_t axis = -1) {
        char what[96];
        snprintf(what, sizeof what, "pointwise %s", name);
        cudnnBackendDescriptor_t desc, op;
        if (!create(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, what, &desc) ||
            !set(desc, what, ATTR(CUDNN_ATTR_POINTWISE_MODE), CUDNN_TYPE_POINTWISE_MODE, 1,
                 &mode) ||
            !set(desc, what, ATTR(CUDNN_ATTR_POINTWISE_MATH_PREC), CUDNN_TYPE_DATA_TYPE, 1,
                 &math))
            return false;
        if (axis >= 0 &&
            !set(desc, what, ATTR(CUDNN_ATTR_POINTWISE_AXIS), CUDNN_TYPE_INT64, 1, &axis))
            return false;
        if (!finalize(desc, what) ||
            !create(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, what, &op) ||
            !set(op, what, ATTR(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR),
                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &desc) ||
            !set(op, what, ATTR(CUDNN_ATTR_OPERATION_POINTWISE_XDESC),
                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x))
            return false;
        if (b && !set(op, what, ATTR(CUDNN_ATTR_OPERATION_POINTWISE_BDESC),
                      CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b))
            return false;
        if (t && !set(op, what, ATTR(CUDNN_ATTR_OPERATION_POINTWISE_TDESC),
                      CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &t))
            return false;
        if (!set(op, what, ATTR(CUDNN_ATTR_OPERATION_POINTWISE_YDESC),
                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y) ||
            !finalize(op, what))
            return false;
        g_->ops.push_back(op);
        return true;
    }

    // y = reduce(x) over the dims where y has extent 1.
    bool reduction(const char *name, cudnnReduceTensorOp_t reduce, cudnnBackendDescriptor_t x,
                   cudnnBackendDescriptor_t y) {
        char what[96];
        snprintf(what, sizeof what, "reduction %s", name);
        const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
        cudnnBackendDescriptor_t desc, op;
        if (!create(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, what, &desc) ||
            !set(desc, what, ATTR(CUDNN_ATTR_REDUCTION_COMP_TYPE), CUDNN_TYPE_DATA_TYPE, 1,
                 &comp) ||
            !set(desc, what, ATTR(CUDNN_ATTR_REDUCTION_OPERATOR),
                 CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &reduce) ||
            !finalize(desc, what) ||
            !create(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, what, &op) ||
            !set(op, what, ATTR(CUDNN_ATTR_OPERATION_REDUCTION_DESC),
                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &desc) ||
            !set(op, what, ATTR(CUDNN_ATTR_OPERATION_REDUCTION_XDESC),
                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x) ||
            !set(op, what, ATTR(CUDNN_ATTR_OPERATION_REDUCTION_YDESC),
                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y) ||
            !finalize(op, what))
            return false;
        g_->ops.push_back(op);
        return true;
    }

    // The operation graph of every op added so far, on handle. (cuDNN 9.8+ marks the handle
    // attributes deprecated in favour of a device-properties descriptor, for building plans with
    // no device; a handle remains the way to build them on one, as cuDNN's frontend does.)
    bool operation_graph(cudnnHandle_t handle) {
        const char *what = "operation graph";
        cudnnBackendDescriptor_t d;
        if (!create(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, what, &d) ||
            !set(d, what, ATTR(CUDNN_ATTR_OPERATIONGRAPH_HANDLE), CUDNN_TYPE_HANDLE, 1,
                 &handle) ||
            !set(d, what, ATTR(CUDNN_ATTR_OPERATIONGRAPH_OPS), CUDNN_TYPE_BACKEND_DESCRIPTOR,
                 (int64_t)g_->ops.size(), g_->ops.data()) ||
            !finalize(d, what))
            return false;
        g_->op_graph = d;
        return true;
    }

  private:
    bool fail(const char *what, const char *call, cudnnStatus_t st) {
        char step[192];
        snprintf(step, sizeof step, "%s: %s", what, call);
        return e_.fail(step, st);
    }

    Graph *g_;
    ErrorSink e_;
};

#undef ATTR

// The whole attention graph of shape s (the table at the top of this file).
bool build_graph(cudnnHandle_t handle, const cudnn_sdpa_shape &s, IndexMath index_math, Graph *g,
                 ErrorSink e) {
    using Kind = GraphBuilder::Kind;
    GraphBuilder gb(g, e);
    const int64_t b = s.batch, h = s.n_heads, hk = s.n_kv_heads, sq = s.s_q, skv = s.s_kv,
                  d = s.head_dim;
    // Packed token-major rows: element (b, h, s, d) at ((b * s_len + s) * heads + h) * d + d.
    const int64_t q_dims[4] = {b, h, sq, d}, q_strides[4] = {sq * h * d, d, h * d, 1};
    const int64_t kt_dims[4] = {b, hk, d, skv}, kt_strides[4] = {skv * hk * d, d, 1, hk * d};
    const int64_t v_dims[4] = {b, hk, skv, d}, v_strides[4] = {skv * hk * d, d, hk * d, 1};
    const int64_t s_dims[4] = {b, h, sq, skv}, s_strides[4] = {h * sq * skv, sq * skv, skv, 1};
    const int64_t r_dims[4] = {b, h, sq, 1}, r_strides[4] = {h * sq, sq, 1, 1};
    const int64_t one[4] = {1, 1, 1, 1};

    int64_t uid = UID_FIRST_VIRTUAL;
    cudnnBackendDescriptor_t q = nullptr, kt = nullptr, v = nullptr, o = nullptr, scale = nullptr;
    cudnnBackendDescriptor_t t_s = nullptr, t_s1 = nullptr, t_s2 = nullptr, m = nullptr;
    cudnnBackendDescriptor_t sub = nullptr, ex = nullptr, z = nullptr, log_z = nullptr;
    cudnnBackendDescriptor_t stats = nullptr, p = nullptr;
    if (!gb.tensor("Q", UID_Q, CUDNN_DATA_BFLOAT16, q_dims, q_strides, Kind::Io, &q) ||
        !gb.tensor("K^T", UID_K, CUDNN_DATA_BFLOAT16, kt_dims, kt_strides, Kind::Io, &kt) ||
        !gb.tensor("V", UID_V, CUDNN_DATA_BFLOAT16, v_dims, v_strides, Kind::Io, &v) ||
        !gb.tensor("O", UID_O, CUDNN_DATA_BFLOAT16, q_dims, q_strides, Kind::Io, &o) ||
        !gb.tensor("scale", UID_SCALE, CUDNN_DATA_FLOAT, one, one, Kind::ByValue, &scale))
        return false;

    // S1 = (Q K^T) * scale
    if (!gb.tensor("S", uid++, CUDNN_DATA_FLOAT, s_dims, s_strides, Kind::Virtual, &t_s) ||
        !gb.matmul("Q.K^T", q, kt, t_s) ||
        !gb.tensor("S*scale", uid++, CUDNN_DATA_FLOAT, s_dims, s_strides, Kind::Virtual,
                   &t_s1) ||
        !gb.pointwise("scale", CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, t_s, scale, nullptr, t_s1))
        return false;

    // Top-left causal mask: keep key j for query i when i >= j.
    t_s2 = t_s1;
    if (s.causal) {
        const cudnnDataType_t math =
            index_math == IndexMath::Int32 ? CUDNN_DATA_INT32 : CUDNN_DATA_FLOAT;
        cudnnBackendDescriptor_t neg_inf = nullptr, row = nullptr, col = nullptr, keep = nullptr;
        if (!gb.tensor("-inf", UID_NEG_INF, CUDNN_DATA_FLOAT, one, one, Kind::ByValue,
                       &neg_inf) ||
            !gb.tensor("row index", uid++, CUDNN_DATA_INT32, s_dims, s_strides, Kind::Virtual,
                       &row) ||
            !gb.pointwise("row index", CUDNN_POINTWISE_GEN_INDEX, math, t_s1, nullptr, nullptr,
                          row, 2) ||
            !gb.tensor("column index", uid++, CUDNN_DATA_INT32, s_dims, s_strides,
                       Kind::Virtual, &col) ||
            !gb.pointwise("column index", CUDNN_POINTWISE_GEN_INDEX, math, t_s1, nullptr,
                          nullptr, col, 3) ||
            !gb.tensor("row >= column", uid++, CUDNN_DATA_BOOLEAN, s_dims, s_strides,
                       Kind::Virtual, &keep) ||
            !gb.pointwise("row >= column", CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row, col,
                          nullptr, keep) ||
            !gb.tensor("masked S", uid++, CUDNN_DATA_FLOAT, s_dims, s_strides, Kind::Virtual,
                       &t_s2) ||
            !gb.pointwise("causal select", CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, t_s1,
                          neg_inf, keep, t_s2))
            return false;
    }

    // Softmax over the keys, with the (virtual) log-sum-exp the flash pattern carries.
    if (!gb.tensor("row max", uid++, CUDNN_DATA_FLOAT, r_dims, r_strides, Kind::Virtual, &m) ||
        !gb.reduction("row max", CUDNN_REDUCE_TENSOR_MAX, t_s2, m) ||
        !gb.tensor("S-max", uid++, CUDNN_DATA_FLOAT, s_dims, s_strides, Kind::Virtual, &sub) ||
        !gb.pointwise("S-max", CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, t_s2, m, nullptr, sub) ||
        !gb.tensor("exp", uid++, CUDNN_DATA_FLOAT, s_dims, s_strides, Kind::Virtual, &ex) ||
        !gb.pointwise("exp", CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, sub, nullptr, nullptr, ex) ||
        !gb.tensor("row sum", uid++, CUDNN_DATA_FLOAT, r_dims, r_strides, Kind::Virtual, &z) ||
        !gb.reduction("row sum", CUDNN_REDUCE_TENSOR_ADD, ex, z) ||
        !gb.tensor("log sum", uid++, CUDNN_DATA_FLOAT, r_dims, r_strides, Kind::Virtual,
                   &log_z) ||
        !gb.pointwise("log sum", CUDNN_POINTWISE_LOG, CUDNN_DATA_FLOAT, z, nullptr, nullptr,
                      log_z) ||
        !gb.tensor("stats", uid++, CUDNN_DATA_FLOAT, r_dims, r_strides, Kind::Virtual, &stats) ||
        !gb.pointwise("stats", CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, m, log_z, nullptr,
                      stats) ||
        !gb.tensor("P", uid++, CUDNN_DATA_BFLOAT16, s_dims, s_strides, Kind::Virtual, &p) ||
        !gb.pointwise("softmax", CUDNN_POINTWISE_DIV, CUDNN_DATA_FLOAT, ex, z, nullptr, p))
        return false;

    // O = P V
    return gb.matmul("P.V", p, v, o) && gb.operation_graph(handle);
}

// ---------------------------------------------------------------------------------------------
// Engine search
// ---------------------------------------------------------------------------------------------

// One engine configuration's finalized execution plan.
struct Candidate {
    Descriptor plan, config;
    int64_t workspace = 0;
};

// The most candidates a plan keeps: the caller times them and runs the fastest.
constexpr size_t kMaxCandidates = 4;

// Asks heuristics mode A, then the fallback mode, for engine configurations of op_graph and keeps
// those whose execution plan finalizes (most are for other graphs and refuse: that is the normal
// way to find out), in the heuristic's order, up to kMaxCandidates, from the first mode that
// gives any. On success *out holds at least one.
bool find_plans(cudnnHandle_t handle, cudnnBackendDescriptor_t op_graph,
                std::vector<Candidate> *out, ErrorSink e) {
    const cudnnBackendHeurMode_t modes[] = {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK};
    const char *mode_names[] = {"heuristics mode A", "heuristics fallback mode"};
    char notes[2][512] = {"", ""};
    for (int mi = 0; mi < 2; mi++) {
        ErrorSink note{notes[mi], sizeof notes[mi]};
        char step[96];
        Descriptor heur;
        cudnnStatus_t st = heur.create(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
        if (st == CUDNN_STATUS_SUCCESS)
            st = cudnnBackendSetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH,
                                          CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &op_graph);
        if (st == CUDNN_STATUS_SUCCESS)
            st = cudnnBackendSetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_MODE,
                                          CUDNN_TYPE_HEUR_MODE, 1, &modes[mi]);
        if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(heur.get());
        if (st != CUDNN_STATUS_SUCCESS) {
            snprintf(step, sizeof step, "%s: engine heuristics descriptor", mode_names[mi]);
            note.fail(step, st);
            continue;
        }
        // The results are engine configurations the caller creates and cuDNN fills.
        int64_t n = 0;
        st = cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                      CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &n, nullptr);
        if (st != CUDNN_STATUS_SUCCESS || n <= 0) {
            snprintf(step, sizeof step, "%s: CUDNN_ATTR_ENGINEHEUR_RESULTS count (%lld)",
                     mode_names[mi], (long long)n);
            note.fail(step, st != CUDNN_STATUS_SUCCESS ? st : CUDNN_STATUS_NOT_SUPPORTED);
            continue;
        }
        std::vector<Descriptor> configs(n);
        std::vector<cudnnBackendDescriptor_t> raw(n);
        for (int64_t i = 0; i < n && st == CUDNN_STATUS_SUCCESS; i++) {
            st = configs[i].create(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
            raw[i] = configs[i].get();
        }
        int64_t got = 0;
        if (st == CUDNN_STATUS_SUCCESS)
            st = cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                          CUDNN_TYPE_BACKEND_DESCRIPTOR, n, &got, raw.data());
        if (st != CUDNN_STATUS_SUCCESS) {
            snprintf(step, sizeof step, "%s: CUDNN_ATTR_ENGINEHEUR_RESULTS", mode_names[mi]);
            note.fail(step, st);
            continue;
        }
        cudnnStatus_t last = CUDNN_STATUS_NOT_SUPPORTED;
        for (int64_t i = 0; i < got && i < n && out->size() < kMaxCandidates; i++) {
            Descriptor candidate;
            st = candidate.create(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
            if (st == CUDNN_STATUS_SUCCESS)
                st = cudnnBackendSetAttribute(candidate.get(), CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
                                              CUDNN_TYPE_HANDLE, 1, &handle);
            if (st == CUDNN_STATUS_SUCCESS)
                st = cudnnBackendSetAttribute(candidate.get(),
                                              CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,
                                              CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw[i]);
            if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(candidate.get());
            if (st != CUDNN_STATUS_SUCCESS) {
                last = st;
                continue;
            }
            int64_t count = 0, bytes = 0;
            st = cudnnBackendGetAttribute(candidate.get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                          CUDNN_TYPE_INT64, 1, &count, &bytes);
            if (st != CUDNN_STATUS_SUCCESS || count != 1 || bytes < 0) {
                last = st != CUDNN_STATUS_SUCCESS ? st : CUDNN_STATUS_INTERNAL_ERROR;
                continue;  // a plan whose workspace is unknown cannot be run
            }
            Candidate c;
            c.plan = std::move(candidate);
            c.config = std::move(configs[i]);
            c.workspace = bytes;
            out->push_back(std::move(c));
        }
        if (!out->empty()) return true;
        snprintf(step, sizeof step, "%s: none of %lld engine configurations finalized a plan",
                 mode_names[mi], (long long)got);
        note.fail(step, last);
    }
    return e.failf("no cuDNN engine for the attention graph: %s; %s", notes[0], notes[1]);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public functions
// ---------------------------------------------------------------------------------------------

struct cudnn_sdpa_plan {
    cudnnHandle_t handle = nullptr;
    Graph graph;
    std::vector<Candidate> candidates;
    size_t active = 0;  // the candidate cudnn_sdpa_run executes
    Descriptor pack;
    int64_t workspace = 0;  // the most any candidate needs
    bool causal = false;
    // By-value scalars: the variant pack points at these, so the plan never moves (heap only).
    float scale = 1.0f, neg_inf = 0.0f;
    void *bound[5] = {};  // q, k, v, out, workspace of the current variant pack

    ~cudnn_sdpa_plan() {
        // Every descriptor before the handle they were built on.
        pack.reset();
        candidates.clear();
        graph.ops.clear();
        graph.owned.clear();
        if (handle) cudnnDestroy(handle);
    }
};

bool cudnn_sdpa_create(const cudnn_sdpa_shape *shape, cudnn_sdpa_plan **out, char *err,
                       size_t err_len) {
    const ErrorSink e{err, err_len};
    if (!out) return e.failf("cudnn_sdpa_create: plan is NULL");
    *out = nullptr;
    if (!shape) return e.failf("cudnn_sdpa_create: shape is NULL");
    const cudnn_sdpa_shape &s = *shape;
    if (s.batch <= 0 || s.n_heads <= 0 || s.n_kv_heads <= 0 || s.s_q <= 0 || s.s_kv <= 0 ||
        s.head_dim <= 0 || s.n_heads % s.n_kv_heads != 0 || s.head_dim % 8 != 0)
        return e.failf("cudnn_sdpa_create: bad shape (b %lld, heads %lld/%lld, s_q %lld, "
                       "s_kv %lld, d %lld)",
                       (long long)s.batch, (long long)s.n_heads, (long long)s.n_kv_heads,
                       (long long)s.s_q, (long long)s.s_kv, (long long)s.head_dim);
    if (s.causal && s.s_q != s.s_kv)
        return e.failf("cudnn_sdpa_create: the top-left causal mask needs s_q == s_kv "
                       "(%lld, %lld)",
                       (long long)s.s_q, (long long)s.s_kv);
    const size_t version = cudnnGetVersion();
    if (version / 10000 != CUDNN_MAJOR)
        return e.failf("cudnn_sdpa_create: cuDNN runtime %zu, built against %d.x", version,
                       CUDNN_MAJOR);
    // cuDNN's own frontend refuses bf16/fp16 SDPA forward on these two releases (known bugs):
    // a peer that may be wrong is no peer.
    if (version == 91000 || version == 91001)
        return e.failf("cudnn_sdpa_create: cuDNN runtime %zu: its SDPA forward has known bugs "
                       "(9.10.0 and 9.10.1); use another cuDNN 9",
                       version);

    cudnn_sdpa_plan *p = new (std::nothrow) cudnn_sdpa_plan;
    if (!p) return e.failf("cudnn_sdpa_create: out of host memory");
    const cudnnStatus_t st = cudnnCreate(&p->handle);
    if (st != CUDNN_STATUS_SUCCESS) {
        p->handle = nullptr;
        delete p;
        return e.fail("cudnnCreate", st);
    }
    p->causal = s.causal;
    p->scale = s.scale;
    // cuDNN before 9.10 preferred the lowest finite float as the mask value.
    p->neg_inf = version >= 91000 ? -std::numeric_limits<float>::infinity()
                                  : std::numeric_limits<float>::lowest();

    // The causal graph is tried with both spellings of its index math; the others once.
    const IndexMath attempts[] = {IndexMath::Int32, IndexMath::Float};
    const int n_attempts = s.causal ? 2 : 1;
    char first[1024] = "";
    for (int a = 0; a < n_attempts; a++) {
        char msg[1024] = "";
        const ErrorSink attempt_err{msg, sizeof msg};
        Graph g;
        if (build_graph(p->handle, s, attempts[a], &g, attempt_err) &&
            find_plans(p->handle, g.op_graph, &p->candidates, attempt_err)) {
            p->graph = std::move(g);
            for (const Candidate &c : p->candidates)
                p->workspace = std::max(p->workspace, c.workspace);
            *out = p;
            return true;
        }
        if (a + 1 < n_attempts) {
            snprintf(first, sizeof first, "%s", msg);
            continue;
        }
        g = Graph{};  // every descriptor before the handle (which delete p destroys)
        delete p;
        if (first[0])
            return e.failf("%s [with int32 index math: %s]", msg, first);
        return e.failf("%s", msg);
    }
    delete p;
    return e.failf("cudnn_sdpa_create: unreachable");
}

int64_t cudnn_sdpa_workspace_bytes(const cudnn_sdpa_plan *plan) {
    return plan ? plan->workspace : 0;
}

int cudnn_sdpa_candidates(const cudnn_sdpa_plan *plan) {
    return plan ? (int)plan->candidates.size() : 0;
}

bool cudnn_sdpa_select(cudnn_sdpa_plan *plan, int i) {
    if (!plan || i < 0 || (size_t)i >= plan->candidates.size()) return false;
    plan->active = (size_t)i;
    return true;
}

bool cudnn_sdpa_run(cudnn_sdpa_plan *p, void *out, const void *q, const void *k, const void *v,
                    void *workspace, cudaStream_t stream, char *err, size_t err_len) {
    const ErrorSink e{err, err_len};
    if (!p) return e.failf("cudnn_sdpa_run: plan is NULL");
    if (!out || !q || !k || !v) return e.failf("cudnn_sdpa_run: NULL tensor pointer");
    if (p->workspace > 0 && !workspace)
        return e.failf("cudnn_sdpa_run: the plan needs %lld workspace bytes, none given",
                       (long long)p->workspace);
    cudnnStatus_t st = cudnnSetStream(p->handle, stream);
    if (st != CUDNN_STATUS_SUCCESS) return e.fail("cudnnSetStream", st);

    void *const now[5] = {const_cast<void *>(q), const_cast<void *>(k), const_cast<void *>(v),
                          out, workspace};
    if (!p->pack.get() || memcmp(now, p->bound, sizeof now) != 0) {
        // By-value scalars are bound by host pointer, read at execution.
        const int64_t uids[6] = {UID_Q, UID_K, UID_V, UID_O, UID_SCALE, UID_NEG_INF};
        void *ptrs[6] = {now[0], now[1], now[2], now[3], &p->scale, &p->neg_inf};
        const int64_t n = p->causal ? 6 : 5;
        Descriptor pack;
        const char *step = "variant pack: cudnnBackendCreateDescriptor";
        st = pack.create(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
        if (st == CUDNN_STATUS_SUCCESS) {
            step = "variant pack: CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS";
            st = cudnnBackendSetAttribute(pack.get(), CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
                                          CUDNN_TYPE_INT64, n, uids);
        }
        if (st == CUDNN_STATUS_SUCCESS) {
            step = "variant pack: CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS";
            st = cudnnBackendSetAttribute(pack.get(), CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
                                          CUDNN_TYPE_VOID_PTR, n, ptrs);
        }
        if (st == CUDNN_STATUS_SUCCESS) {
            step = "variant pack: CUDNN_ATTR_VARIANT_PACK_WORKSPACE";
            st = cudnnBackendSetAttribute(pack.get(), CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
                                          CUDNN_TYPE_VOID_PTR, 1, &now[4]);
        }
        if (st == CUDNN_STATUS_SUCCESS) {
            step = "variant pack: cudnnBackendFinalize";
            st = cudnnBackendFinalize(pack.get());
        }
        if (st != CUDNN_STATUS_SUCCESS) {
            p->pack.reset();
            return e.fail(step, st);
        }
        p->pack = std::move(pack);
        memcpy(p->bound, now, sizeof now);
    }
    st = cudnnBackendExecute(p->handle, p->candidates[p->active].plan.get(), p->pack.get());
    if (st != CUDNN_STATUS_SUCCESS) return e.fail("cudnnBackendExecute", st);
    return true;
}

void cudnn_sdpa_destroy(cudnn_sdpa_plan *plan) { delete plan; }

void cudnn_sdpa_version_string(char *buf, size_t len) {
    if (!buf || len == 0) return;
    const size_t v = cudnnGetVersion();
    snprintf(buf, len, "cuDNN %zu.%zu.%zu (headers %d.%d.%d)", v / 10000, v % 10000 / 100,
             v % 100, CUDNN_MAJOR, CUDNN_MINOR, CUDNN_PATCHLEVEL);
}

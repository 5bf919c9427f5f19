/* Reading llama.cpp GGUF files (versions 2 and 3); see gguf.h for the layout.
 *
 * Nothing in a file is trusted. Every read goes through a cursor that checks the bytes exist
 * before touching them; every count is capped and checked against what the rest of the file
 * could hold before anything is allocated for it; every size that multiplies dimensions is
 * computed in 64 bits with overflow checks. Errors name the file, the metadata key or tensor,
 * and the byte offset where the bad field starts. (As with any mmap reader, a file truncated by
 * someone else while it is mapped raises SIGBUS on access; that is outside our control.)
 *
 * Dequantisation follows the block layouts of the ggml formats:
 *   Q8_0  34 bytes / 32 values: f16 d, 32 x int8 q;                  x = q * d
 *   Q4_0  18 bytes / 32 values: f16 d, 16 bytes of nibbles;          x = (q - 8) * d
 *   Q4_1  20 bytes / 32 values: f16 d, f16 m, 16 bytes of nibbles;   x = q * d + m
 *         (byte j holds value j in its low nibble and value j + 16 in its high nibble)
 *   Q4_K 144 bytes / 256 values: f16 d, f16 dmin, 12 bytes packing eight 6-bit scales and eight
 *         6-bit mins, 128 bytes of nibbles; sub-block s (32 values) = (d*sc[s]) * q - (dmin*m[s])
 *   Q6_K 210 bytes / 256 values: 128 bytes of low nibbles, 64 bytes of 2-bit high parts,
 *         16 int8 scales, f16 d; x = (d * scale[i / 16]) * (q - 32)
 * The products are formed in the same order, in fp32, as the gguf Python package's reference
 * dequantiser, so the results agree bit for bit wherever the compiler does not fuse a multiply
 * and an add (x86-64 without -mfma never does). */
#include "io/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"
#include "core/half.h"

/* Numbers and tensor data are read in place, so the host must share the format's byte order. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "GGUF data is little-endian; big-endian hosts are not supported"
#endif
#endif

typedef unsigned long long ull;

/* Caps on counts, far above any real file: they bound what a hostile header can make us
 * allocate before the per-byte checks below have even run. */
#define GGUF_MAX_TENSORS (INT64_C(1) << 24)
#define GGUF_MAX_KVS (INT64_C(1) << 24)
/* The GGUF spec limits keys to 65535 bytes and tensor names to 64 (ggml's GGML_MAX_NAME). */
#define GGUF_MAX_KEY_LEN 65535u
#define GGUF_MAX_NAME_LEN 64u
#define GGUF_MAX_DIMS 4
/* Arrays of arrays are legal; each level is skipped recursively, so the depth is capped. */
#define GGUF_MAX_NESTING 8
#define GGUF_DEFAULT_ALIGNMENT 32u
/* magic + version + tensor count + metadata count */
#define GGUF_HEADER_BYTES 24u
/* The smallest possible metadata entry: key length, a 1-byte key, value type, a 1-byte value. */
#define GGUF_MIN_KV_BYTES (8u + 1u + 4u + 1u)
/* The smallest possible tensor info: name length, a 1-byte name, n_dims = 0, type, offset. */
#define GGUF_MIN_TENSOR_INFO_BYTES (8u + 1u + 4u + 4u + 8u)

struct sf_gguf {
    char *path;
    unsigned char *map;
    size_t size;
    uint32_t version;
    uint64_t alignment;
    uint64_t data_start; /* absolute offset of the (aligned) data section */
    sf_gguf_kv *kvs;
    uint64_t *kv_offsets; /* where each entry starts, for messages */
    int64_t n_kvs;
    const sf_gguf_kv **kv_by_key;
    sf_gguf_tensor *tensors;
    int64_t n_tensors;
    const sf_gguf_tensor **tensor_by_name;
};

/* ------------------------------------------------------------------------------------------ */
/* ggml tensor types                                                                           */
/* ------------------------------------------------------------------------------------------ */

typedef struct ggml_type_info {
    uint32_t id;
    const char *name;
    uint32_t block;     /* values per block */
    uint32_t type_size; /* bytes per block  */
} ggml_type_info;

/* Every ggml type with a defined storage size, so that files holding types this reader does not
 * dequantise can still be opened and checked (their metadata may be all that is wanted). */
static const ggml_type_info k_types[] = {
    {0, "F32", 1, 4},         {1, "F16", 1, 2},         {2, "Q4_0", 32, 18},
    {3, "Q4_1", 32, 20},      {6, "Q5_0", 32, 22},      {7, "Q5_1", 32, 24},
    {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 40},      {10, "Q2_K", 256, 84},
    {11, "Q3_K", 256, 110},   {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},   {15, "Q8_K", 256, 292},   {16, "IQ2_XXS", 256, 66},
    {17, "IQ2_XS", 256, 74},  {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},
    {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},  {22, "IQ2_S", 256, 82},
    {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},         {25, "I16", 1, 2},
    {26, "I32", 1, 4},        {27, "I64", 1, 8},        {28, "F64", 1, 8},
    {29, "IQ1_M", 256, 56},   {30, "BF16", 1, 2},       {34, "TQ1_0", 256, 54},
    {35, "TQ2_0", 256, 66},   {39, "MXFP4", 32, 17},
};

static const ggml_type_info *type_info(uint32_t id) {
    for (size_t i = 0; i < sizeof k_types / sizeof k_types[0]; i++)
        if (k_types[i].id == id) return &k_types[i];
    return NULL;
}

static bool type_readable(uint32_t id) {
    switch (id) {
    case SF_GGML_F32:
    case SF_GGML_F16:
    case SF_GGML_BF16:
    case SF_GGML_Q8_0:
    case SF_GGML_Q4_0:
    case SF_GGML_Q4_1:
    case SF_GGML_Q4_K:
    case SF_GGML_Q6_K: return true;
    default: return false;
    }
}

const char *sf_ggml_type_name(uint32_t type) {
    const ggml_type_info *ti = type_info(type);
    if (ti) return ti->name;
    static _Thread_local char buf[24];
    snprintf(buf, sizeof buf, "type %u", type);
    return buf;
}

/* ------------------------------------------------------------------------------------------ */
/* Metadata value types                                                                        */
/* ------------------------------------------------------------------------------------------ */

static const char *value_type_name(uint32_t t) {
    static const char *const names[] = {"uint8", "int8",   "uint16", "int16", "uint32",
                                        "int32", "float32", "bool",  "string", "array",
                                        "uint64", "int64", "float64"};
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

static bool value_type_valid(uint32_t t) { return t <= SF_GGUF_FLOAT64; }

/* Bytes of one fixed-size value, 0 for STRING and ARRAY. */
static uint64_t scalar_size(uint32_t t) {
    switch (t) {
    case SF_GGUF_UINT8:
    case SF_GGUF_INT8:
    case SF_GGUF_BOOL: return 1;
    case SF_GGUF_UINT16:
    case SF_GGUF_INT16: return 2;
    case SF_GGUF_UINT32:
    case SF_GGUF_INT32:
    case SF_GGUF_FLOAT32: return 4;
    case SF_GGUF_UINT64:
    case SF_GGUF_INT64:
    case SF_GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

/* The fewest bytes one value of type t can occupy: used to refuse counts the file cannot hold. */
static uint64_t min_value_size(uint32_t t) {
    if (t == SF_GGUF_STRING) return 8;      /* length only */
    if (t == SF_GGUF_ARRAY) return 4 + 8;   /* element type + count */
    return scalar_size(t);
}

/* ------------------------------------------------------------------------------------------ */
/* The bounds-checked cursor                                                                   */
/* ------------------------------------------------------------------------------------------ */

typedef struct reader {
    const unsigned char *base;
    uint64_t size;
    uint64_t pos;
    const char *path;
} reader;

static uint64_t remaining(const reader *r) { return r->size - r->pos; }

/* ctx says whose field this is ("metadata key 'x'", "tensor 'y'"), what names the field. */
static sf_status need(const reader *r, uint64_t n, const char *ctx, const char *what) {
    if (n > remaining(r))
        return sf_fail(SF_ERR_FORMAT,
                       "%s: %s: %s needs %llu bytes at byte offset %llu, but the file ends at %llu "
                       "(truncated?)",
                       r->path, ctx, what, (ull)n, (ull)r->pos, (ull)r->size);
    return SF_OK;
}

static sf_status rd_u32(reader *r, const char *ctx, const char *what, uint32_t *out) {
    sf_status st = need(r, 4, ctx, what);
    if (st != SF_OK) return st;
    memcpy(out, r->base + r->pos, 4);
    r->pos += 4;
    return SF_OK;
}

static sf_status rd_u64(reader *r, const char *ctx, const char *what, uint64_t *out) {
    sf_status st = need(r, 8, ctx, what);
    if (st != SF_OK) return st;
    memcpy(out, r->base + r->pos, 8);
    r->pos += 8;
    return SF_OK;
}

/* A u64 length and that many bytes, which must all be in the file. */
static sf_status rd_string(reader *r, const char *ctx, const char *what, sf_gguf_string *out) {
    uint64_t at = r->pos;
    uint64_t len = 0;
    sf_status st = rd_u64(r, ctx, what, &len);
    if (st != SF_OK) return st;
    if (len > remaining(r))
        return sf_fail(SF_ERR_FORMAT,
                       "%s: %s: %s length %llu at byte offset %llu runs past the end of the file "
                       "(%llu bytes left)",
                       r->path, ctx, what, (ull)len, (ull)at, (ull)remaining(r));
    out->data = (const char *)(r->base + r->pos);
    out->len = len;
    r->pos += len;
    return SF_OK;
}

/* A key or tensor name: 1..max_len bytes, no NUL inside, copied with a terminator. */
static sf_status rd_name(reader *r, const char *ctx, const char *what, uint64_t max_len,
                         char **out) {
    *out = NULL;
    uint64_t at = r->pos;
    sf_gguf_string s = {NULL, 0};
    sf_status st = rd_string(r, ctx, what, &s);
    if (st != SF_OK) return st;
    if (s.len == 0 || s.len > max_len)
        return sf_fail(SF_ERR_FORMAT,
                       "%s: %s: %s length %llu at byte offset %llu is outside [1, %llu]", r->path,
                       ctx, what, (ull)s.len, (ull)at, (ull)max_len);
    if (memchr(s.data, '\0', (size_t)s.len))
        return sf_fail(SF_ERR_FORMAT, "%s: %s: %s at byte offset %llu contains a NUL byte", r->path,
                       ctx, what, (ull)at);
    char *copy = malloc((size_t)s.len + 1);
    if (!copy) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", r->path);
    memcpy(copy, s.data, (size_t)s.len);
    copy[s.len] = '\0';
    *out = copy;
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Metadata values                                                                             */
/* ------------------------------------------------------------------------------------------ */

static sf_status rd_scalar(reader *r, const char *ctx, uint32_t type, sf_gguf_kv *kv) {
    uint64_t at = r->pos;
    uint64_t n = scalar_size(type);
    sf_status st = need(r, n, ctx, "value");
    if (st != SF_OK) return st;
    const unsigned char *p = r->base + r->pos;
    switch (type) {
    case SF_GGUF_UINT8: kv->v.u = p[0]; break;
    case SF_GGUF_INT8: kv->v.i = (int8_t)p[0]; break;
    case SF_GGUF_BOOL:
        if (p[0] > 1)
            return sf_fail(SF_ERR_FORMAT, "%s: %s: bool value %u at byte offset %llu is not 0 or 1",
                           r->path, ctx, (unsigned)p[0], (ull)at);
        kv->v.u = p[0];
        break;
    case SF_GGUF_UINT16: {
        uint16_t x;
        memcpy(&x, p, 2);
        kv->v.u = x;
        break;
    }
    case SF_GGUF_INT16: {
        int16_t x;
        memcpy(&x, p, 2);
        kv->v.i = x;
        break;
    }
    case SF_GGUF_UINT32: {
        uint32_t x;
        memcpy(&x, p, 4);
        kv->v.u = x;
        break;
    }
    case SF_GGUF_INT32: {
        int32_t x;
        memcpy(&x, p, 4);
        kv->v.i = x;
        break;
    }
    case SF_GGUF_FLOAT32: {
        float x;
        memcpy(&x, p, 4);
        kv->v.f = x;
        break;
    }
    case SF_GGUF_UINT64: memcpy(&kv->v.u, p, 8); break;
    case SF_GGUF_INT64: memcpy(&kv->v.i, p, 8); break;
    case SF_GGUF_FLOAT64: memcpy(&kv->v.f, p, 8); break;
    default: break;
    }
    r->pos += n;
    return SF_OK;
}

/* Element type and count of an array, with the count checked against the bytes left. */
static sf_status rd_array_header(reader *r, const char *ctx, uint32_t *elem, uint64_t *n) {
    uint64_t at = r->pos;
    sf_status st = rd_u32(r, ctx, "array element type", elem);
    if (st != SF_OK) return st;
    if (!value_type_valid(*elem))
        return sf_fail(SF_ERR_FORMAT, "%s: %s: array element type %u at byte offset %llu is not a "
                       "GGUF value type",
                       r->path, ctx, *elem, (ull)at);
    at = r->pos;
    st = rd_u64(r, ctx, "array length", n);
    if (st != SF_OK) return st;
    uint64_t min = min_value_size(*elem);
    if (*n > remaining(r) / min)
        return sf_fail(SF_ERR_FORMAT,
                       "%s: %s: array length %llu at byte offset %llu cannot fit in the %llu bytes "
                       "left (%s elements take at least %llu bytes each)",
                       r->path, ctx, (ull)*n, (ull)at, (ull)remaining(r), value_type_name(*elem),
                       (ull)min);
    return SF_OK;
}

static sf_status check_bools(const reader *r, const char *ctx, const unsigned char *p, uint64_t n) {
    for (uint64_t i = 0; i < n; i++)
        if (p[i] > 1)
            return sf_fail(SF_ERR_FORMAT,
                           "%s: %s: bool element %llu = %u at byte offset %llu is not 0 or 1",
                           r->path, ctx, (ull)i, (unsigned)p[i],
                           (ull)(p + i - r->base));
    return SF_OK;
}

/* Moves past one value of type t (used for the contents of nested arrays). */
static sf_status skip_value(reader *r, const char *ctx, uint32_t t, int depth) {
    if (t == SF_GGUF_STRING) {
        sf_gguf_string s = {NULL, 0};
        return rd_string(r, ctx, "string", &s);
    }
    if (t != SF_GGUF_ARRAY) {
        sf_status st = need(r, scalar_size(t), ctx, "value");
        if (st == SF_OK && t == SF_GGUF_BOOL) st = check_bools(r, ctx, r->base + r->pos, 1);
        if (st == SF_OK) r->pos += scalar_size(t);
        return st;
    }
    if (depth >= GGUF_MAX_NESTING)
        return sf_fail(SF_ERR_FORMAT, "%s: %s: arrays nested more than %d deep at byte offset %llu",
                       r->path, ctx, GGUF_MAX_NESTING, (ull)r->pos);
    uint32_t elem;
    uint64_t n;
    sf_status st = rd_array_header(r, ctx, &elem, &n);
    if (st != SF_OK) return st;
    if (elem != SF_GGUF_STRING && elem != SF_GGUF_ARRAY) {
        /* rd_array_header checked n * size fits in what is left. */
        uint64_t bytes = n * scalar_size(elem);
        if (elem == SF_GGUF_BOOL) {
            st = check_bools(r, ctx, r->base + r->pos, n);
            if (st != SF_OK) return st;
        }
        r->pos += bytes;
        return SF_OK;
    }
    for (uint64_t i = 0; i < n; i++) {
        st = skip_value(r, ctx, elem, depth + 1);
        if (st != SF_OK) return st;
    }
    return SF_OK;
}

static sf_status rd_array(reader *r, const char *ctx, sf_gguf_kv *kv) {
    uint32_t elem;
    uint64_t n;
    sf_status st = rd_array_header(r, ctx, &elem, &n);
    if (st != SF_OK) return st;
    kv->v.arr.type = (sf_gguf_type)elem;
    kv->v.arr.n = n;
    kv->v.arr.data = NULL;
    kv->v.arr.strings = NULL;
    if (elem == SF_GGUF_ARRAY) {
        /* Nested arrays carry nothing this library uses: walk over them, report an empty array. */
        kv->v.arr.n = 0;
        for (uint64_t i = 0; i < n; i++) {
            st = skip_value(r, ctx, SF_GGUF_ARRAY, 1);
            if (st != SF_OK) return st;
        }
        return SF_OK;
    }
    if (elem == SF_GGUF_STRING) {
        /* n <= remaining / 8, so this allocation is at most twice the file's size. */
        sf_gguf_string *strings = malloc((size_t)(n ? n : 1) * sizeof *strings);
        if (!strings) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: %s: out of memory", r->path, ctx);
        kv->v.arr.strings = strings; /* data stays NULL: it is for numeric elements */
        for (uint64_t i = 0; i < n; i++) {
            st = rd_string(r, ctx, "string element", &strings[i]);
            if (st != SF_OK) return st;
        }
        return SF_OK;
    }
    const unsigned char *p = r->base + r->pos;
    if (elem == SF_GGUF_BOOL) {
        st = check_bools(r, ctx, p, n);
        if (st != SF_OK) return st;
    }
    kv->v.arr.data = p;
    r->pos += n * scalar_size(elem);
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Sorting and lookup                                                                          */
/* ------------------------------------------------------------------------------------------ */

static int cmp_kv_key(const void *a, const void *b) {
    const sf_gguf_kv *x = *(const sf_gguf_kv *const *)a, *y = *(const sf_gguf_kv *const *)b;
    return strcmp(x->key, y->key);
}

static int cmp_tensor_name(const void *a, const void *b) {
    const sf_gguf_tensor *x = *(const sf_gguf_tensor *const *)a;
    const sf_gguf_tensor *y = *(const sf_gguf_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int cmp_tensor_offset(const void *a, const void *b) {
    const sf_gguf_tensor *x = *(const sf_gguf_tensor *const *)a;
    const sf_gguf_tensor *y = *(const sf_gguf_tensor *const *)b;
    if (x->file_offset != y->file_offset) return x->file_offset < y->file_offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return 0;
}

const sf_gguf_kv *sf_gguf_find(const sf_gguf *g, const char *key) {
    if (!g || !key) return NULL;
    int64_t lo = 0, hi = g->n_kvs;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int c = strcmp(g->kv_by_key[mid]->key, key);
        if (c == 0) return g->kv_by_key[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

const sf_gguf_tensor *sf_gguf_find_tensor(const sf_gguf *g, const char *name) {
    if (!g || !name) return NULL;
    int64_t lo = 0, hi = g->n_tensors;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int c = strcmp(g->tensor_by_name[mid]->name, name);
        if (c == 0) return g->tensor_by_name[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Opening                                                                                     */
/* ------------------------------------------------------------------------------------------ */

void sf_gguf_close(sf_gguf *g) {
    if (!g) return;
    for (int64_t i = 0; i < g->n_kvs; i++) {
        free((char *)g->kvs[i].key);
        if (g->kvs[i].type == SF_GGUF_ARRAY) free((void *)g->kvs[i].v.arr.strings);
    }
    for (int64_t i = 0; i < g->n_tensors; i++) free((char *)g->tensors[i].name);
    free(g->kvs);
    free(g->kv_offsets);
    free(g->kv_by_key);
    free(g->tensors);
    free(g->tensor_by_name);
    if (g->map) munmap(g->map, g->size);
    free(g->path);
    free(g);
}

static sf_status map_file(sf_gguf *g) {
    int fd = open(g->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return sf_fail(SF_ERR_IO, "%s: cannot open: %s", g->path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return sf_fail(SF_ERR_IO, "%s: cannot stat: %s", g->path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return sf_fail(SF_ERR_IO, "%s: not a regular file", g->path);
    }
    if (sb.st_size == 0) {
        close(fd);
        return sf_fail(SF_ERR_FORMAT, "%s: empty file, not GGUF (truncated?)", g->path);
    }
    size_t size = (size_t)sb.st_size;
    void *addr = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd); /* the mapping keeps the file alive */
    if (addr == MAP_FAILED) return sf_fail(SF_ERR_IO, "%s: cannot mmap: %s", g->path, strerror(e));
    g->map = addr;
    g->size = size;
    return SF_OK;
}

static sf_status parse_header(sf_gguf *g, reader *r, uint64_t *n_tensors, uint64_t *n_kvs) {
    const char *ctx = "header";
    sf_status st = need(r, 4, ctx, "magic");
    if (st != SF_OK) return st;
    const unsigned char *m = r->base;
    if (memcmp(m, "GGUF", 4) != 0)
        return sf_fail(SF_ERR_FORMAT,
                       "%s: not a GGUF file: magic at byte offset 0 is %02x %02x %02x %02x, "
                       "expected \"GGUF\"",
                       g->path, m[0], m[1], m[2], m[3]);
    r->pos = 4;
    uint32_t v = 0;
    st = rd_u32(r, ctx, "version", &v);
    if (st != SF_OK) return st;
    uint32_t swapped = (v >> 24) | ((v >> 8) & 0xff00u) | ((v << 8) & 0xff0000u) | (v << 24);
    if (v == 1)
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: GGUF version 1 (byte offset 4) is not supported (2 and 3 are); "
                       "re-convert the model with a current llama.cpp",
                       g->path);
    if (v != 2 && v != 3 && swapped >= 1 && swapped <= 3)
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: big-endian GGUF (version field at byte offset 4 reads %u byte-swapped) "
                       "is not supported",
                       g->path, swapped);
    if (v == 0)
        return sf_fail(SF_ERR_FORMAT, "%s: GGUF version 0 at byte offset 4 is invalid", g->path);
    if (v > 3)
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: GGUF version %u at byte offset 4 is not supported (2 and 3 are)",
                       g->path, v);
    g->version = v;

    st = rd_u64(r, ctx, "tensor count", n_tensors);
    if (st != SF_OK) return st;
    st = rd_u64(r, ctx, "metadata count", n_kvs);
    if (st != SF_OK) return st;
    if (*n_tensors > (uint64_t)GGUF_MAX_TENSORS)
        return sf_fail(SF_ERR_FORMAT,
                       "%s: tensor count %llu at byte offset 8 is more than the %lld allowed",
                       g->path, (ull)*n_tensors, (long long)GGUF_MAX_TENSORS);
    if (*n_kvs > (uint64_t)GGUF_MAX_KVS)
        return sf_fail(SF_ERR_FORMAT,
                       "%s: metadata count %llu at byte offset 16 is more than the %lld allowed",
                       g->path, (ull)*n_kvs, (long long)GGUF_MAX_KVS);
    /* Both counts are below 2^24 and the minimum sizes below 2^5, so this cannot overflow. */
    uint64_t least = *n_kvs * GGUF_MIN_KV_BYTES + *n_tensors * GGUF_MIN_TENSOR_INFO_BYTES;
    if (least > remaining(r))
        return sf_fail(SF_ERR_FORMAT,
                       "%s: %llu metadata entries and %llu tensor infos (counts at byte offsets 16 "
                       "and 8) need at least %llu bytes, but only %llu follow the header",
                       g->path, (ull)*n_kvs, (ull)*n_tensors, (ull)least, (ull)remaining(r));
    return SF_OK;
}

static sf_status parse_kvs(sf_gguf *g, reader *r, uint64_t n) {
    g->kvs = calloc((size_t)(n ? n : 1), sizeof *g->kvs);
    g->kv_offsets = calloc((size_t)(n ? n : 1), sizeof *g->kv_offsets);
    g->kv_by_key = calloc((size_t)(n ? n : 1), sizeof *g->kv_by_key);
    if (!g->kvs || !g->kv_offsets || !g->kv_by_key)
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory for %llu metadata entries", g->path,
                       (ull)n);
    char ctx[256];
    for (uint64_t i = 0; i < n; i++) {
        sf_gguf_kv *kv = &g->kvs[i];
        g->kv_offsets[i] = r->pos;
        snprintf(ctx, sizeof ctx, "metadata entry %llu", (ull)i);
        char *key = NULL;
        sf_status st = rd_name(r, ctx, "key", GGUF_MAX_KEY_LEN, &key);
        if (st != SF_OK) return st;
        kv->key = key;
        g->n_kvs = (int64_t)i + 1; /* from here on, close() frees this entry */
        kv->type = SF_GGUF_UINT8;  /* nothing to free until the type is known */
        snprintf(ctx, sizeof ctx, "metadata key '%.200s'", key);
        uint64_t at = r->pos;
        uint32_t type = 0;
        st = rd_u32(r, ctx, "value type", &type);
        if (st != SF_OK) return st;
        if (!value_type_valid(type))
            return sf_fail(SF_ERR_FORMAT,
                           "%s: %s: value type %u at byte offset %llu is not a GGUF value type",
                           g->path, ctx, type, (ull)at);
        kv->type = (sf_gguf_type)type;
        if (type == SF_GGUF_STRING) st = rd_string(r, ctx, "string value", &kv->v.str);
        else if (type == SF_GGUF_ARRAY) st = rd_array(r, ctx, kv);
        else st = rd_scalar(r, ctx, type, kv);
        if (st != SF_OK) return st;
    }
    for (uint64_t i = 0; i < n; i++) g->kv_by_key[i] = &g->kvs[i];
    qsort(g->kv_by_key, (size_t)n, sizeof *g->kv_by_key, cmp_kv_key);
    for (uint64_t i = 1; i < n; i++) {
        if (strcmp(g->kv_by_key[i - 1]->key, g->kv_by_key[i]->key) == 0) {
            const sf_gguf_kv *a = g->kv_by_key[i - 1], *b = g->kv_by_key[i];
            uint64_t oa = g->kv_offsets[a - g->kvs], ob = g->kv_offsets[b - g->kvs];
            return sf_fail(SF_ERR_FORMAT,
                           "%s: metadata key '%.200s' appears twice (entries at byte offsets %llu "
                           "and %llu)",
                           g->path, a->key, (ull)(oa < ob ? oa : ob), (ull)(oa < ob ? ob : oa));
        }
    }
    return SF_OK;
}

/* general.alignment: an integer power of two; 32 when absent. */
static sf_status read_alignment(sf_gguf *g) {
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    const sf_gguf_kv *kv = sf_gguf_find(g, "general.alignment");
    if (!kv) return SF_OK;
    uint64_t at = g->kv_offsets[kv - g->kvs];
    uint64_t a = 0;
    bool ok = true;
    switch (kv->type) {
    case SF_GGUF_UINT8:
    case SF_GGUF_UINT16:
    case SF_GGUF_UINT32:
    case SF_GGUF_UINT64: a = kv->v.u; break;
    case SF_GGUF_INT8:
    case SF_GGUF_INT16:
    case SF_GGUF_INT32:
    case SF_GGUF_INT64:
        if (kv->v.i < 0) ok = false;
        else a = (uint64_t)kv->v.i;
        break;
    default:
        return sf_fail(SF_ERR_FORMAT,
                       "%s: metadata key 'general.alignment' (entry at byte offset %llu) has type "
                       "%s, expected an integer",
                       g->path, (ull)at, value_type_name(kv->type));
    }
    /* 2^30 is far beyond any page size; the cap keeps the alignment arithmetic trivially safe. */
    if (!ok || a == 0 || (a & (a - 1)) != 0 || a > (UINT64_C(1) << 30)) {
        char val[32];
        if (ok) snprintf(val, sizeof val, "%llu", (ull)a);
        else snprintf(val, sizeof val, "%lld", (long long)kv->v.i);
        return sf_fail(SF_ERR_FORMAT,
                       "%s: metadata key 'general.alignment' (entry at byte offset %llu) is %s, "
                       "not a power of two in [1, 2^30]",
                       g->path, (ull)at, val);
    }
    g->alignment = a;
    return SF_OK;
}

/* Everything about one tensor info except where its data lands (that needs the data section's
 * start, known only after the last info). */
static sf_status parse_tensor_info(sf_gguf *g, reader *r, uint64_t i, sf_gguf_tensor *t,
                                   uint64_t *rel_offset) {
    char ctx[160];
    uint64_t start = r->pos;
    snprintf(ctx, sizeof ctx, "tensor info %llu (byte offset %llu)", (ull)i, (ull)start);
    char *name = NULL;
    sf_status st = rd_name(r, ctx, "name", GGUF_MAX_NAME_LEN, &name);
    if (st != SF_OK) return st;
    t->name = name;
    snprintf(ctx, sizeof ctx, "tensor '%s' (info at byte offset %llu)", name, (ull)start);

    uint64_t at = r->pos;
    uint32_t n_dims = 0;
    st = rd_u32(r, ctx, "n_dims", &n_dims);
    if (st != SF_OK) return st;
    if (n_dims > GGUF_MAX_DIMS)
        return sf_fail(SF_ERR_FORMAT, "%s: %s: n_dims %u at byte offset %llu is more than %d",
                       g->path, ctx, n_dims, (ull)at, GGUF_MAX_DIMS);
    t->n_dims = (int32_t)n_dims;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        at = r->pos;
        uint64_t ne = 0;
        st = rd_u64(r, ctx, "ne", &ne);
        if (st != SF_OK) return st;
        if (ne > (uint64_t)INT64_MAX)
            return sf_fail(SF_ERR_FORMAT, "%s: %s: ne[%u] = %llu at byte offset %llu is negative "
                           "as int64",
                           g->path, ctx, d, (ull)ne, (ull)at);
        t->ne[d] = (int64_t)ne;
    }
    /* The element count; a zero dimension makes it zero whatever the others are. */
    int64_t numel = 1;
    bool any_zero = false;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) any_zero |= t->ne[d] == 0;
    if (any_zero) numel = 0;
    for (int d = 0; d < GGUF_MAX_DIMS && !any_zero; d++) {
        if (numel > INT64_MAX / t->ne[d])
            return sf_fail(SF_ERR_FORMAT,
                           "%s: %s: element count of ne = [%lld, %lld, %lld, %lld] overflows int64",
                           g->path, ctx, (long long)t->ne[0], (long long)t->ne[1],
                           (long long)t->ne[2], (long long)t->ne[3]);
        numel *= t->ne[d];
    }
    t->numel = numel;

    at = r->pos;
    st = rd_u32(r, ctx, "ggml type", &t->type);
    if (st != SF_OK) return st;
    const ggml_type_info *ti = type_info(t->type);
    if (!ti)
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: %s: ggml type %u at byte offset %llu is unknown to this reader, so its "
                       "size cannot be checked",
                       g->path, ctx, t->type, (ull)at);
    if (t->ne[0] % ti->block != 0)
        return sf_fail(SF_ERR_FORMAT,
                       "%s: %s: row length ne[0] = %lld is not a multiple of the %s block size %u",
                       g->path, ctx, (long long)t->ne[0], ti->name, ti->block);
    uint64_t nbytes = 0;
    if (numel > 0) {
        /* Blocks per row times bytes per block, then times rows; each step checked, since
         * ne[0] alone may approach 2^63 and a block may take up to 292 bytes. */
        const uint64_t blocks = (uint64_t)t->ne[0] / ti->block;
        const uint64_t rows = (uint64_t)numel / (uint64_t)t->ne[0];
        if (blocks > (uint64_t)INT64_MAX / ti->type_size ||
            blocks * ti->type_size > (uint64_t)INT64_MAX / rows)
            return sf_fail(SF_ERR_FORMAT, "%s: %s: byte size of %lld %s values overflows", g->path,
                           ctx, (long long)numel, ti->name);
        nbytes = blocks * ti->type_size * rows;
    }
    t->nbytes = nbytes;

    at = r->pos;
    st = rd_u64(r, ctx, "data offset", rel_offset);
    if (st != SF_OK) return st;
    if (*rel_offset % g->alignment != 0)
        return sf_fail(SF_ERR_FORMAT,
                       "%s: %s: data offset %llu at byte offset %llu is not a multiple of the "
                       "alignment %llu",
                       g->path, ctx, (ull)*rel_offset, (ull)at, (ull)g->alignment);
    return SF_OK;
}

static sf_status parse_tensors(sf_gguf *g, reader *r, uint64_t n) {
    g->tensors = calloc((size_t)(n ? n : 1), sizeof *g->tensors);
    g->tensor_by_name = calloc((size_t)(n ? n : 1), sizeof *g->tensor_by_name);
    uint64_t *rel = calloc((size_t)(n ? n : 1), sizeof *rel);
    uint64_t *info_at = calloc((size_t)(n ? n : 1), sizeof *info_at);
    sf_status st = SF_OK;
    if (!g->tensors || !g->tensor_by_name || !rel || !info_at) {
        st = sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory for %llu tensor infos", g->path,
                     (ull)n);
        goto done;
    }
    for (uint64_t i = 0; i < n && st == SF_OK; i++) {
        info_at[i] = r->pos;
        st = parse_tensor_info(g, r, i, &g->tensors[i], &rel[i]);
        if (g->tensors[i].name) g->n_tensors = (int64_t)i + 1;
    }
    if (st != SF_OK) goto done;

    /* The data section starts at the first multiple of the alignment after the infos. */
    uint64_t end = r->pos;
    uint64_t data_start = (end + g->alignment - 1) / g->alignment * g->alignment;
    g->data_start = data_start;
    for (uint64_t i = 0; i < n; i++) {
        sf_gguf_tensor *t = &g->tensors[i];
        uint64_t size = g->size;
        if (data_start > size || rel[i] > size - data_start ||
            t->nbytes > size - data_start - rel[i]) {
            st =
                sf_fail(SF_ERR_FORMAT,
                        "%s: tensor '%s' (info at byte offset %llu): data offset %llu + %llu bytes "
                        "of %s runs past the end of the file (data section starts at %llu, file "
                        "is %llu bytes; truncated?)",
                        g->path, t->name, (ull)info_at[i], (ull)rel[i], (ull)t->nbytes,
                        sf_ggml_type_name(t->type), (ull)data_start, (ull)size);
            goto done;
        }
        t->file_offset = data_start + rel[i];
        t->data = g->map + t->file_offset;
    }

    for (uint64_t i = 0; i < n; i++) g->tensor_by_name[i] = &g->tensors[i];
    /* Overlap, in offset order; empty tensors occupy nothing and overlap nothing. */
    qsort(g->tensor_by_name, (size_t)n, sizeof *g->tensor_by_name, cmp_tensor_offset);
    const sf_gguf_tensor *prev = NULL;
    for (uint64_t i = 0; i < n; i++) {
        const sf_gguf_tensor *t = g->tensor_by_name[i];
        if (t->nbytes == 0) continue;
        if (prev && t->file_offset < prev->file_offset + prev->nbytes) {
            st = sf_fail(SF_ERR_FORMAT,
                         "%s: tensors '%s' (file bytes [%llu, %llu)) and '%s' (file bytes [%llu, "
                         "%llu)) overlap",
                         g->path, prev->name, (ull)prev->file_offset,
                         (ull)(prev->file_offset + prev->nbytes), t->name, (ull)t->file_offset,
                         (ull)(t->file_offset + t->nbytes));
            goto done;
        }
        prev = t;
    }
    qsort(g->tensor_by_name, (size_t)n, sizeof *g->tensor_by_name, cmp_tensor_name);
    for (uint64_t i = 1; i < n; i++) {
        const sf_gguf_tensor *a = g->tensor_by_name[i - 1], *b = g->tensor_by_name[i];
        if (strcmp(a->name, b->name) == 0) {
            uint64_t oa = info_at[a - g->tensors], ob = info_at[b - g->tensors];
            st = sf_fail(SF_ERR_FORMAT,
                         "%s: tensor '%s' appears twice (infos at byte offsets %llu and %llu)",
                         g->path, a->name, (ull)(oa < ob ? oa : ob), (ull)(oa < ob ? ob : oa));
            goto done;
        }
    }

done:
    free(rel);
    free(info_at);
    return st;
}

sf_status sf_gguf_open(const char *path, sf_gguf **out) {
    if (out) *out = NULL;
    if (!path || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_gguf_open: NULL argument");
    sf_gguf *g = calloc(1, sizeof *g);
    if (!g) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
    size_t plen = strlen(path);
    g->path = malloc(plen + 1);
    if (!g->path) {
        free(g);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
    }
    memcpy(g->path, path, plen + 1);

    sf_status st = map_file(g);
    reader r = {g->map, (uint64_t)g->size, 0, g->path};
    uint64_t n_tensors = 0, n_kvs = 0;
    if (st == SF_OK) st = parse_header(g, &r, &n_tensors, &n_kvs);
    if (st == SF_OK) st = parse_kvs(g, &r, n_kvs);
    if (st == SF_OK) st = read_alignment(g);
    if (st == SF_OK) st = parse_tensors(g, &r, n_tensors);
    if (st != SF_OK) {
        sf_gguf_close(g);
        return st;
    }
    *out = g;
    return SF_OK;
}

const char *sf_gguf_path(const sf_gguf *g) { return g ? g->path : NULL; }
uint32_t sf_gguf_version(const sf_gguf *g) { return g ? g->version : 0; }
int64_t sf_gguf_kv_count(const sf_gguf *g) { return g ? g->n_kvs : 0; }
int64_t sf_gguf_tensor_count(const sf_gguf *g) { return g ? g->n_tensors : 0; }

const sf_gguf_kv *sf_gguf_kv_at(const sf_gguf *g, int64_t i) {
    if (!g || i < 0 || i >= g->n_kvs) return NULL;
    return &g->kvs[i];
}

const sf_gguf_tensor *sf_gguf_tensor_at(const sf_gguf *g, int64_t i) {
    if (!g || i < 0 || i >= g->n_tensors) return NULL;
    return &g->tensors[i];
}

/* ------------------------------------------------------------------------------------------ */
/* Typed getters                                                                               */
/* ------------------------------------------------------------------------------------------ */

static sf_status lookup(const sf_gguf *g, const char *key, const char *fn, const sf_gguf_kv **kv) {
    *kv = NULL;
    if (!g || !key) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL argument", fn);
    *kv = sf_gguf_find(g, key);
    if (!*kv) return sf_fail(SF_ERR_NOT_FOUND, "%s: metadata key '%s' not found", g->path, key);
    return SF_OK;
}

static sf_status wrong_type(const sf_gguf *g, const sf_gguf_kv *kv, const char *expected) {
    return sf_fail(SF_ERR_FORMAT,
                   "%s: metadata key '%s' (entry at byte offset %llu) has type %s, expected %s",
                   g->path, kv->key, (ull)g->kv_offsets[kv - g->kvs], value_type_name(kv->type),
                   expected);
}

static bool is_unsigned(sf_gguf_type t) {
    return t == SF_GGUF_UINT8 || t == SF_GGUF_UINT16 || t == SF_GGUF_UINT32 || t == SF_GGUF_UINT64;
}

static bool is_signed(sf_gguf_type t) {
    return t == SF_GGUF_INT8 || t == SF_GGUF_INT16 || t == SF_GGUF_INT32 || t == SF_GGUF_INT64;
}

sf_status sf_gguf_get_int(const sf_gguf *g, const char *key, int64_t *out) {
    const sf_gguf_kv *kv;
    sf_status st = lookup(g, key, "sf_gguf_get_int", &kv);
    if (st != SF_OK) return st;
    if (is_signed(kv->type)) {
        if (out) *out = kv->v.i;
        return SF_OK;
    }
    if (!is_unsigned(kv->type)) return wrong_type(g, kv, "an integer");
    if (kv->v.u > (uint64_t)INT64_MAX)
        return sf_fail(SF_ERR_FORMAT,
                       "%s: metadata key '%s' (entry at byte offset %llu) = %llu does not fit in "
                       "int64",
                       g->path, key, (ull)g->kv_offsets[kv - g->kvs], (ull)kv->v.u);
    if (out) *out = (int64_t)kv->v.u;
    return SF_OK;
}

sf_status sf_gguf_get_float(const sf_gguf *g, const char *key, double *out) {
    const sf_gguf_kv *kv;
    sf_status st = lookup(g, key, "sf_gguf_get_float", &kv);
    if (st != SF_OK) return st;
    double x;
    if (kv->type == SF_GGUF_FLOAT32 || kv->type == SF_GGUF_FLOAT64) x = kv->v.f;
    else if (is_signed(kv->type)) x = (double)kv->v.i;
    else if (is_unsigned(kv->type)) x = (double)kv->v.u;
    else return wrong_type(g, kv, "a number");
    if (out) *out = x;
    return SF_OK;
}

sf_status sf_gguf_get_bool(const sf_gguf *g, const char *key, bool *out) {
    const sf_gguf_kv *kv;
    sf_status st = lookup(g, key, "sf_gguf_get_bool", &kv);
    if (st != SF_OK) return st;
    if (kv->type != SF_GGUF_BOOL) return wrong_type(g, kv, "bool");
    if (out) *out = kv->v.u != 0;
    return SF_OK;
}

sf_status sf_gguf_get_string(const sf_gguf *g, const char *key, sf_gguf_string *out) {
    const sf_gguf_kv *kv;
    sf_status st = lookup(g, key, "sf_gguf_get_string", &kv);
    if (st != SF_OK) return st;
    if (kv->type != SF_GGUF_STRING) return wrong_type(g, kv, "string");
    if (out) *out = kv->v.str;
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Dequantisation                                                                              */
/* ------------------------------------------------------------------------------------------ */

static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static float half_at(const unsigned char *p) { return sf_f16_to_f32(le16(p)); }

static void deq_q8_0(const unsigned char *b, int64_t n_blocks, float *y) {
    for (int64_t i = 0; i < n_blocks; i++, b += 34, y += 32) {
        const float d = half_at(b);
        for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)b[2 + j] * d;
    }
}

static void deq_q4_0(const unsigned char *b, int64_t n_blocks, float *y) {
    for (int64_t i = 0; i < n_blocks; i++, b += 18, y += 32) {
        const float d = half_at(b);
        const unsigned char *q = b + 2;
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((int)(q[j] & 0x0f) - 8);
            y[j + 16] = d * (float)((int)(q[j] >> 4) - 8);
        }
    }
}

static void deq_q4_1(const unsigned char *b, int64_t n_blocks, float *y) {
    for (int64_t i = 0; i < n_blocks; i++, b += 20, y += 32) {
        const float d = half_at(b), m = half_at(b + 2);
        const unsigned char *q = b + 4;
        for (int j = 0; j < 16; j++) {
            const float lo = d * (float)(q[j] & 0x0f);
            const float hi = d * (float)(q[j] >> 4);
            y[j] = lo + m;
            y[j + 16] = hi + m;
        }
    }
}

/* Q4_K's 12 scale bytes hold eight 6-bit scales and eight 6-bit mins. Sub-blocks 0-3 keep their
 * scale and min in the low 6 bits of bytes 0-3 and 4-7; sub-blocks 4-7 take their low 4 bits from
 * the two nibbles of bytes 8-11 and their top 2 bits from the spare top bits of bytes 0-3
 * (scales) and 4-7 (mins). */
static void q4k_scale_min(const unsigned char *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static void deq_q4_k(const unsigned char *b, int64_t n_blocks, float *y) {
    for (int64_t i = 0; i < n_blocks; i++, b += 144, y += 256) {
        const float d = half_at(b), dmin = half_at(b + 2);
        const unsigned char *scales = b + 4;
        const unsigned char *q = b + 16;
        /* Four groups of 32 bytes; each gives two sub-blocks: low nibbles, then high nibbles. */
        for (int g = 0; g < 4; g++) {
            for (int h = 0; h < 2; h++) {
                int sc, mn;
                q4k_scale_min(scales, 2 * g + h, &sc, &mn);
                const float dl = d * (float)sc;
                const float ml = dmin * (float)mn;
                float *out = y + 64 * g + 32 * h;
                for (int l = 0; l < 32; l++) {
                    const int v = h ? q[32 * g + l] >> 4 : q[32 * g + l] & 0x0f;
                    const float prod = dl * (float)v;
                    out[l] = prod - ml;
                }
            }
        }
    }
}

static void deq_q6_k(const unsigned char *b, int64_t n_blocks, float *y) {
    for (int64_t i = 0; i < n_blocks; i++, b += 210, y += 256) {
        const unsigned char *ql = b;        /* 128 bytes: low 4 bits */
        const unsigned char *qh = b + 128;  /* 64 bytes: high 2 bits, four values per byte */
        const signed char *sc = (const signed char *)(b + 192); /* 16 scales, one per 16 values */
        const float d = half_at(b + 208);
        /* Two halves of 128 values. In half h, value 32 * k + l (k = 0..3, l = 0..31) takes its
         * low nibble from ql[64h + l + 32 (k & 1)] (low nibble for k < 2, high for k >= 2) and
         * its high bits from bits 2k..2k+1 of qh[32h + l]. */
        for (int h = 0; h < 2; h++) {
            for (int k = 0; k < 4; k++) {
                for (int l = 0; l < 32; l++) {
                    const unsigned char lo_byte = ql[64 * h + 32 * (k & 1) + l];
                    const int lo = k < 2 ? lo_byte & 0x0f : lo_byte >> 4;
                    const int hi = (qh[32 * h + l] >> (2 * k)) & 3;
                    const int idx = 128 * h + 32 * k + l;
                    const float dl = d * (float)sc[idx / 16];
                    y[idx] = dl * (float)((lo | (hi << 4)) - 32);
                }
            }
        }
    }
}

sf_status sf_gguf_dequantize(const sf_gguf_tensor *t, float *dst) {
    if (!t) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_gguf_dequantize: NULL tensor");
    const char *name = t->name ? t->name : "?";
    if (!type_readable(t->type))
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "tensor '%s' (data at byte offset %llu): ggml type %s cannot be "
                       "dequantised (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K can)",
                       name, (ull)t->file_offset, sf_ggml_type_name(t->type));
    if (t->numel < 0 || (t->numel > 0 && (!dst || !t->data)))
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_gguf_dequantize: tensor '%s': NULL data or destination", name);
    /* The struct may not come from sf_gguf_open: check its byte count matches its values. */
    const ggml_type_info *ti = type_info(t->type);
    const int64_t n_blocks = t->numel / ti->block;
    if (t->numel % ti->block != 0 || (uint64_t)n_blocks > UINT64_MAX / ti->type_size ||
        (uint64_t)n_blocks * ti->type_size != t->nbytes)
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_gguf_dequantize: tensor '%s': %llu bytes do not hold %lld %s values",
                       name, (ull)t->nbytes, (long long)t->numel, ti->name);
    const unsigned char *src = t->data;
    switch (t->type) {
    case SF_GGML_F32:
        if (t->numel) memcpy(dst, src, (size_t)t->numel * sizeof(float));
        break;
    case SF_GGML_F16:
        for (int64_t i = 0; i < t->numel; i++) dst[i] = half_at(src + 2 * i);
        break;
    case SF_GGML_BF16:
        for (int64_t i = 0; i < t->numel; i++)
            dst[i] = sf_bf16_to_f32(le16(src + 2 * i));
        break;
    case SF_GGML_Q8_0: deq_q8_0(src, n_blocks, dst); break;
    case SF_GGML_Q4_0: deq_q4_0(src, n_blocks, dst); break;
    case SF_GGML_Q4_1: deq_q4_1(src, n_blocks, dst); break;
    case SF_GGML_Q4_K: deq_q4_k(src, n_blocks, dst); break;
    case SF_GGML_Q6_K: deq_q6_k(src, n_blocks, dst); break;
    default: break;
    }
    return SF_OK;
}

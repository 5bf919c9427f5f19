/* Internal: reading llama.cpp GGUF files (versions 2 and 3).
 *
 * Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata count; the metadata
 * key/value pairs; the tensor infos (name, dims, ggml type, offset); padding to the alignment
 * (general.alignment, default 32); the tensor data. Strings are u64 length + bytes (no NUL).
 * Every count, length and offset is distrusted and checked against the file before use. The
 * file is memory-mapped; pointers below stay valid until sf_gguf_close(). */
#ifndef SF_IO_GGUF_H
#define SF_IO_GGUF_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum sf_gguf_type {
    SF_GGUF_UINT8 = 0,
    SF_GGUF_INT8 = 1,
    SF_GGUF_UINT16 = 2,
    SF_GGUF_INT16 = 3,
    SF_GGUF_UINT32 = 4,
    SF_GGUF_INT32 = 5,
    SF_GGUF_FLOAT32 = 6,
    SF_GGUF_BOOL = 7,
    SF_GGUF_STRING = 8,
    SF_GGUF_ARRAY = 9,
    SF_GGUF_UINT64 = 10,
    SF_GGUF_INT64 = 11,
    SF_GGUF_FLOAT64 = 12,
} sf_gguf_type;

/* ggml tensor types this reader dequantises (their ggml enum values). */
typedef enum sf_ggml_type {
    SF_GGML_F32 = 0,
    SF_GGML_F16 = 1,
    SF_GGML_Q4_0 = 2,
    SF_GGML_Q4_1 = 3,
    SF_GGML_Q8_0 = 8,
    SF_GGML_Q4_K = 12,
    SF_GGML_Q6_K = 14,
    SF_GGML_BF16 = 30,
} sf_ggml_type;

typedef struct sf_gguf_string {
    const char *data; /* into the map, not NUL-terminated */
    uint64_t len;
} sf_gguf_string;

typedef struct sf_gguf_kv {
    const char *key;   /* NUL-terminated copy */
    sf_gguf_type type;
    union {
        uint64_t u;    /* UINT8..UINT64, and BOOL (0/1) */
        int64_t i;     /* INT8..INT64 */
        double f;      /* FLOAT32, FLOAT64 */
        sf_gguf_string str;
        struct {
            sf_gguf_type type; /* element type (never ARRAY: nested arrays are skipped over and
                                  reported with type ARRAY and n = 0)  */
            uint64_t n;
            const void *data;  /* numeric elements, packed little-endian, into the map */
            const sf_gguf_string *strings; /* STRING elements: n entries, or NULL */
        } arr;
    } v;
} sf_gguf_kv;

typedef struct sf_gguf_tensor {
    const char *name;     /* NUL-terminated copy */
    uint32_t type;        /* sf_ggml_type value, or another ggml type (then not readable) */
    int32_t n_dims;
    int64_t ne[4];        /* ggml order: ne[0] is the contiguous (fastest) dimension */
    int64_t numel;
    const void *data;     /* into the map */
    uint64_t nbytes;
    uint64_t file_offset; /* absolute, for messages */
} sf_gguf_tensor;

typedef struct sf_gguf sf_gguf;

sf_status sf_gguf_open(const char *path, sf_gguf **out);
void sf_gguf_close(sf_gguf *g);
const char *sf_gguf_path(const sf_gguf *g);
uint32_t sf_gguf_version(const sf_gguf *g);

int64_t sf_gguf_kv_count(const sf_gguf *g);
const sf_gguf_kv *sf_gguf_kv_at(const sf_gguf *g, int64_t i);
const sf_gguf_kv *sf_gguf_find(const sf_gguf *g, const char *key); /* NULL when absent */

/* Typed getters: SF_OK and the value; SF_ERR_NOT_FOUND when absent (message names the key);
 * SF_ERR_FORMAT when present with an incompatible type. Integers of any width convert when
 * the value fits. */
sf_status sf_gguf_get_int(const sf_gguf *g, const char *key, int64_t *out);
sf_status sf_gguf_get_float(const sf_gguf *g, const char *key, double *out);
sf_status sf_gguf_get_bool(const sf_gguf *g, const char *key, bool *out);
sf_status sf_gguf_get_string(const sf_gguf *g, const char *key, sf_gguf_string *out);

int64_t sf_gguf_tensor_count(const sf_gguf *g);
const sf_gguf_tensor *sf_gguf_tensor_at(const sf_gguf *g, int64_t i);
const sf_gguf_tensor *sf_gguf_find_tensor(const sf_gguf *g, const char *name);

/* "F32", "Q4_K", ... or "type 17". */
const char *sf_ggml_type_name(uint32_t type);

/* Dequantises a tensor to fp32 (t->numel floats, ggml order). Types outside sf_ggml_type fail
 * with SF_ERR_UNSUPPORTED naming the type and the tensor. */
sf_status sf_gguf_dequantize(const sf_gguf_tensor *t, float *dst);

#ifdef __cplusplus
}
#endif

#endif

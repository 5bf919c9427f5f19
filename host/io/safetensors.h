/* Internal: reading and writing safetensors files.
 *
 * The format: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
 * {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the byte after the header),
 * an optional "__metadata__" object of string values, then the data. Every number in a header is
 * distrusted: offsets must lie inside the file, match dtype x shape exactly, and not overlap.
 *
 * An archive is one file, or the shards named by a model.safetensors.index.json, seen as one
 * table of tensors. Files are memory-mapped read-only; tensor data pointers point into the maps
 * and stay valid until sf_st_close(). */
#ifndef SF_IO_SAFETENSORS_H
#define SF_IO_SAFETENSORS_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { SF_ST_MAX_DIMS = 8 };

typedef enum sf_dtype {
    SF_DTYPE_F32 = 0,
    SF_DTYPE_F16 = 1,
    SF_DTYPE_BF16 = 2,
    SF_DTYPE_I32 = 3,
    SF_DTYPE_I64 = 4,
} sf_dtype;

/* "F32", "F16", ... */
const char *sf_dtype_name(sf_dtype dtype);
/* Bytes per element. */
int sf_dtype_size(sf_dtype dtype);

typedef struct sf_st_tensor {
    const char *name;
    sf_dtype dtype;
    int32_t ndim;
    int64_t shape[SF_ST_MAX_DIMS];
    int64_t numel;
    const void *data;     /* into the file's map; not necessarily aligned */
    uint64_t nbytes;
    const char *path;     /* the file holding it, for messages */
    uint64_t file_offset; /* absolute byte offset of data within that file */
} sf_st_tensor;

typedef struct sf_st_archive sf_st_archive;

/* Opens a single .safetensors file, a model.safetensors.index.json (sharded), or a directory
 * holding either (model.safetensors.index.json is preferred, then model.safetensors). */
sf_status sf_st_open(const char *path, sf_st_archive **out);
void sf_st_close(sf_st_archive *archive);

int64_t sf_st_count(const sf_st_archive *archive);
/* Tensors in name order; i in [0, count). */
const sf_st_tensor *sf_st_at(const sf_st_archive *archive, int64_t i);
/* NULL when absent (no error is set). */
const sf_st_tensor *sf_st_find(const sf_st_archive *archive, const char *name);

/* Finds `name` and checks its shape (ndim entries). Fails with SF_ERR_NOT_FOUND or SF_ERR_SHAPE,
 * the message naming the tensor, its file and the shapes. */
sf_status sf_st_get(const sf_st_archive *archive, const char *name, int32_t ndim,
                    const int64_t *shape, const sf_st_tensor **out);

/* Converts a floating-point tensor (F32, F16, BF16) to fp32: dst has t->numel floats. */
sf_status sf_st_to_f32(const sf_st_tensor *t, float *dst);

/* One tensor to write. */
typedef struct sf_st_entry {
    const char *name;
    sf_dtype dtype;
    int32_t ndim;
    int64_t shape[SF_ST_MAX_DIMS];
    const void *data; /* numel * dtype size bytes */
} sf_st_entry;

/* Writes a single-file safetensors archive. metadata is an optional NULL-terminated list of
 * key, value, key, value, ... strings stored under "__metadata__". The header is padded with
 * spaces to a multiple of 8 bytes so that data is aligned. */
sf_status sf_st_write(const char *path, const sf_st_entry *entries, int64_t n_entries,
                      const char *const *metadata);

#ifdef __cplusplus
}
#endif

#endif

/* Reading and writing safetensors files; see safetensors.h for the format.
 *
 * Nothing in a file is trusted: every length and offset is checked against the bytes actually
 * present before anything is dereferenced, so a truncated or hostile file yields an error, never
 * an out-of-bounds read. (One hazard is outside our control: a file truncated by someone else
 * while it is mapped raises SIGBUS on access, as with any mmap reader.) */
#include "io/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "core/error.h"
#include "core/file.h"
#include "core/half.h"

/* Tensor data is handed out as raw pointers into the file and F32 is converted with memcpy, so
 * the host must share the format's little-endian byte order. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; big-endian hosts are not supported"
#endif
#endif

/* A header larger than this is rejected before it is parsed: real headers are a few MiB at most,
 * and a hostile length must not make jansson allocate without bound. */
#define SF_ST_MAX_HEADER_BYTES ((uint64_t)100 * 1024 * 1024)
/* The same cap for model.safetensors.index.json. */
#define SF_ST_MAX_INDEX_BYTES ((size_t)100 * 1024 * 1024)

static const char k_index_name[] = "model.safetensors.index.json";
static const char k_single_name[] = "model.safetensors";

typedef struct st_map {
    char *path;
    void *addr;
    size_t size;
} st_map;

struct sf_st_archive {
    char *path; /* what was opened (after resolving a directory), for messages */
    st_map *maps;
    int64_t n_maps;
    sf_st_tensor *tensors; /* names are owned here; sorted by name once open succeeds */
    int64_t n_tensors;
};

typedef unsigned long long ull;

/* ------------------------------------------------------------------------------------------ */
/* Dtypes                                                                                      */
/* ------------------------------------------------------------------------------------------ */

const char *sf_dtype_name(sf_dtype dtype) {
    switch (dtype) {
    case SF_DTYPE_F32: return "F32";
    case SF_DTYPE_F16: return "F16";
    case SF_DTYPE_BF16: return "BF16";
    case SF_DTYPE_I32: return "I32";
    case SF_DTYPE_I64: return "I64";
    }
    return "?";
}

int sf_dtype_size(sf_dtype dtype) {
    switch (dtype) {
    case SF_DTYPE_F32: return 4;
    case SF_DTYPE_F16: return 2;
    case SF_DTYPE_BF16: return 2;
    case SF_DTYPE_I32: return 4;
    case SF_DTYPE_I64: return 8;
    }
    return 0;
}

static int dtype_from_name(const char *name, sf_dtype *out) {
    static const sf_dtype all[] = {SF_DTYPE_F32, SF_DTYPE_F16, SF_DTYPE_BF16, SF_DTYPE_I32,
                                   SF_DTYPE_I64};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (strcmp(name, sf_dtype_name(all[i])) == 0) {
            *out = all[i];
            return 1;
        }
    }
    return 0;
}

static int dtype_valid(sf_dtype dtype) { return sf_dtype_size(dtype) != 0; }

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                               */
/* ------------------------------------------------------------------------------------------ */

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* prefix + name, where prefix already ends in '/' or is empty. */
static char *join_path(const char *prefix, size_t prefix_len, const char *name) {
    size_t name_len = strlen(name);
    char *p = malloc(prefix_len + name_len + 1);
    if (!p) return NULL;
    memcpy(p, prefix, prefix_len);
    memcpy(p + prefix_len, name, name_len + 1);
    return p;
}

/* Product of the dims, or -1 if it does not fit in int64. A zero dim makes the product zero
 * whatever the others are, so [0, huge, huge] is a valid empty tensor rather than an overflow. */
static int64_t checked_numel(int32_t ndim, const int64_t *shape) {
    int any_zero = 0;
    for (int32_t i = 0; i < ndim; i++) {
        if (shape[i] < 0) return -1;
        if (shape[i] == 0) any_zero = 1;
    }
    if (any_zero) return 0;
    int64_t numel = 1;
    for (int32_t i = 0; i < ndim; i++) {
        int64_t d = shape[i];
        if (numel > INT64_MAX / d) return -1;
        numel *= d;
    }
    return numel;
}

static int cmp_tensor_name(const void *a, const void *b) {
    const sf_st_tensor *x = a, *y = b;
    return strcmp(x->name, y->name);
}

static int cmp_tensor_offset(const void *a, const void *b) {
    const sf_st_tensor *x = a, *y = b;
    if (x->file_offset != y->file_offset) return x->file_offset < y->file_offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return 0;
}

/* Binary search over tensors[0, n), which must be sorted by name. */
static const sf_st_tensor *find_sorted(const sf_st_tensor *tensors, int64_t n, const char *name) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int c = strcmp(tensors[mid].name, name);
        if (c == 0) return &tensors[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Archive lifetime                                                                            */
/* ------------------------------------------------------------------------------------------ */

void sf_st_close(sf_st_archive *archive) {
    if (!archive) return;
    for (int64_t i = 0; i < archive->n_tensors; i++) free((char *)archive->tensors[i].name);
    free(archive->tensors);
    for (int64_t i = 0; i < archive->n_maps; i++) {
        if (archive->maps[i].addr) munmap(archive->maps[i].addr, archive->maps[i].size);
        free(archive->maps[i].path);
    }
    free(archive->maps);
    free(archive->path);
    free(archive);
}

/* Maps path read-only into the next free slot of archive->maps (capacity reserved by the caller);
 * takes ownership of path. */
static sf_status map_file(sf_st_archive *archive, char *path, st_map **out) {
    st_map *m = &archive->maps[archive->n_maps];
    m->path = path;
    m->addr = NULL;
    m->size = 0;
    archive->n_maps++;

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return sf_fail(SF_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return sf_fail(SF_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return sf_fail(SF_ERR_IO, "%s: not a regular file", path);
    }
    /* Checked before mmap, which rejects a zero length. */
    if (st.st_size < 8) {
        close(fd);
        return sf_fail(SF_ERR_FORMAT,
                       "%s: %lld bytes, too short for the 8-byte safetensors header length",
                       path, (long long)st.st_size);
    }
    size_t size = (size_t)st.st_size;
    void *addr = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd); /* the mapping keeps the file alive */
    if (addr == MAP_FAILED) return sf_fail(SF_ERR_IO, "%s: cannot mmap: %s", path, strerror(e));
    m->addr = addr;
    m->size = size;
    *out = m;
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Parsing one file's header                                                                   */
/* ------------------------------------------------------------------------------------------ */

static sf_status check_metadata(const char *path, json_t *meta) {
    if (!json_is_object(meta)) {
        return sf_fail(SF_ERR_FORMAT, "%s: '__metadata__' is not a JSON object", path);
    }
    const char *key;
    json_t *value;
    json_object_foreach(meta, key, value) {
        if (!json_is_string(value)) {
            return sf_fail(SF_ERR_FORMAT, "%s: '__metadata__' entry '%s' is not a string", path,
                           key);
        }
    }
    return SF_OK;
}

/* Reads a JSON array of non-negative integers of length [min_len, max_len] into out.
 * what names the field in messages. */
static sf_status read_uint_array(const char *path, const char *name, const char *what,
                                 json_t *arr, size_t min_len, size_t max_len, int64_t *out,
                                 size_t *len) {
    if (!arr) return sf_fail(SF_ERR_FORMAT, "%s: tensor '%s': missing '%s'", path, name, what);
    if (!json_is_array(arr)) {
        return sf_fail(SF_ERR_FORMAT, "%s: tensor '%s': '%s' is not an array", path, name, what);
    }
    size_t n = json_array_size(arr);
    if (n < min_len || n > max_len) {
        if (min_len == max_len) {
            return sf_fail(SF_ERR_FORMAT, "%s: tensor '%s': '%s' has %zu entries, expected %zu",
                           path, name, what, n, min_len);
        }
        return sf_fail(SF_ERR_FORMAT, "%s: tensor '%s': '%s' has %zu entries, at most %zu allowed",
                       path, name, what, n, max_len);
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v)) {
            return sf_fail(SF_ERR_FORMAT, "%s: tensor '%s': '%s'[%zu] is not an integer", path,
                           name, what, i);
        }
        json_int_t x = json_integer_value(v);
        if (x < 0) {
            return sf_fail(SF_ERR_FORMAT, "%s: tensor '%s': '%s'[%zu] is negative (%lld)", path,
                           name, what, i, (long long)x);
        }
        out[i] = (int64_t)x;
    }
    *len = n;
    return SF_OK;
}

/* Fills t (except name/path/data) from one header entry. data_begin is the data section's
 * offset in the file and data_size its length. */
static sf_status parse_entry(const char *path, const char *name, json_t *entry,
                             uint64_t data_begin, uint64_t data_size, sf_st_tensor *t) {
    if (!json_is_object(entry)) {
        return sf_fail(SF_ERR_FORMAT, "%s: tensor '%s': entry is not a JSON object", path, name);
    }
    json_t *jdtype = json_object_get(entry, "dtype");
    if (!jdtype) return sf_fail(SF_ERR_FORMAT, "%s: tensor '%s': missing 'dtype'", path, name);
    if (!json_is_string(jdtype)) {
        return sf_fail(SF_ERR_FORMAT, "%s: tensor '%s': 'dtype' is not a string", path, name);
    }
    const char *dtype_name = json_string_value(jdtype);
    if (!dtype_from_name(dtype_name, &t->dtype)) {
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: tensor '%s': dtype '%s' is not supported (F32, F16, BF16, I32, I64 are)",
                       path, name, dtype_name);
    }

    size_t ndim = 0;
    sf_status st = read_uint_array(path, name, "shape", json_object_get(entry, "shape"), 0,
                                   SF_ST_MAX_DIMS, t->shape, &ndim);
    if (st != SF_OK) return st;
    t->ndim = (int32_t)ndim;

    int64_t offs[2];
    size_t n_offs = 0;
    st = read_uint_array(path, name, "data_offsets", json_object_get(entry, "data_offsets"), 2,
                         2, offs, &n_offs);
    if (st != SF_OK) return st;
    uint64_t begin = (uint64_t)offs[0], end = (uint64_t)offs[1];
    if (begin > end) {
        return sf_fail(SF_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] begin after end",
                       path, name, (ull)begin, (ull)end);
    }
    if (end > data_size) {
        return sf_fail(SF_ERR_FORMAT,
                       "%s: tensor '%s': data_offsets [%llu, %llu] run past the %llu-byte data "
                       "section (file offset %llu)",
                       path, name, (ull)begin, (ull)end, (ull)data_size,
                       (ull)(data_begin + begin));
    }

    char shape_buf[256];
    int64_t numel = checked_numel(t->ndim, t->shape);
    if (numel < 0) {
        sf_format_shape(shape_buf, sizeof shape_buf, t->ndim, t->shape);
        return sf_fail(SF_ERR_FORMAT, "%s: tensor '%s': element count of shape %s overflows",
                       path, name, shape_buf);
    }
    uint64_t esize = (uint64_t)sf_dtype_size(t->dtype);
    /* numel < 2^63 and esize <= 8, so this cannot wrap a uint64. */
    uint64_t nbytes = (uint64_t)numel * esize;
    if (end - begin != nbytes) {
        sf_format_shape(shape_buf, sizeof shape_buf, t->ndim, t->shape);
        return sf_fail(SF_ERR_FORMAT,
                       "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes, but %s x %s "
                       "needs %llu (file offset %llu)",
                       path, name, (ull)begin, (ull)end, (ull)(end - begin), dtype_name, shape_buf,
                       (ull)nbytes, (ull)(data_begin + begin));
    }
    t->numel = numel;
    t->nbytes = nbytes;
    t->file_offset = data_begin + begin;
    return SF_OK;
}

/* Tensors may leave gaps between them (some writers align each tensor), so only overlap is an
 * error. tensors[0, n) all come from one file; they are re-sorted by offset here. Empty tensors
 * occupy no bytes and cannot overlap anything. */
static sf_status check_overlap(const char *path, sf_st_tensor *tensors, int64_t n) {
    qsort(tensors, (size_t)n, sizeof *tensors, cmp_tensor_offset);
    const sf_st_tensor *prev = NULL;
    for (int64_t i = 0; i < n; i++) {
        const sf_st_tensor *t = &tensors[i];
        if (t->nbytes == 0) continue;
        /* prev ends furthest right among those seen: sorted by begin, and no earlier pair
         * overlapped, so each earlier tensor ended at or before prev's end. */
        if (prev && t->file_offset < prev->file_offset + prev->nbytes) {
            return sf_fail(SF_ERR_FORMAT,
                           "%s: tensors '%s' (file bytes [%llu, %llu)) and '%s' (file bytes "
                           "[%llu, %llu)) overlap",
                           path, prev->name, (ull)prev->file_offset,
                           (ull)(prev->file_offset + prev->nbytes), t->name, (ull)t->file_offset,
                           (ull)(t->file_offset + t->nbytes));
        }
        prev = t;
    }
    return SF_OK;
}

/* Parses the header of map m and appends its tensors to archive->tensors, sorted by name within
 * the file. *first receives the index of the first appended tensor. */
static sf_status parse_file(sf_st_archive *archive, const st_map *m, int64_t *first) {
    const unsigned char *bytes = m->addr;
    const char *path = m->path;
    uint64_t file_size = (uint64_t)m->size;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | bytes[i];

    if (n == 0) return sf_fail(SF_ERR_FORMAT, "%s: header length is 0", path);
    if (n > file_size - 8) {
        return sf_fail(SF_ERR_FORMAT,
                       "%s: header length %llu runs past the end of the %llu-byte file", path,
                       (ull)n, (ull)file_size);
    }
    if (n > SF_ST_MAX_HEADER_BYTES) {
        return sf_fail(SF_ERR_FORMAT, "%s: header length %llu exceeds the %llu-byte limit", path,
                       (ull)n, (ull)SF_ST_MAX_HEADER_BYTES);
    }
    uint64_t data_begin = 8 + n;
    uint64_t data_size = file_size - data_begin;

    json_error_t err;
    json_t *root = json_loadb((const char *)bytes + 8, (size_t)n, JSON_REJECT_DUPLICATES, &err);
    if (!root) {
        return sf_fail(SF_ERR_FORMAT,
                       "%s: header JSON does not parse: %s (header byte %d, file offset %llu, "
                       "line %d, column %d)",
                       path, err.text, err.position, (ull)(8 + (uint64_t)err.position),
                       err.line, err.column);
    }
    sf_status st = SF_OK;
    if (!json_is_object(root)) {
        st = sf_fail(SF_ERR_FORMAT, "%s: header JSON is not an object", path);
        goto done;
    }

    size_t n_entries = json_object_size(root);
    if (n_entries > (size_t)(INT64_MAX / 2) - (size_t)archive->n_tensors) {
        st = sf_fail(SF_ERR_FORMAT, "%s: too many tensors", path);
        goto done;
    }
    sf_st_tensor *grown =
        realloc(archive->tensors, ((size_t)archive->n_tensors + n_entries + 1) * sizeof *grown);
    if (!grown) {
        st = sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: cannot allocate the table of %zu tensors", path,
                     n_entries);
        goto done;
    }
    archive->tensors = grown;
    *first = archive->n_tensors;

    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        if (strcmp(key, "__metadata__") == 0) {
            st = check_metadata(path, value);
            if (st != SF_OK) goto done;
            continue;
        }
        if (key[0] == '\0') {
            st = sf_fail(SF_ERR_FORMAT, "%s: a tensor has an empty name", path);
            goto done;
        }
        sf_st_tensor t;
        memset(&t, 0, sizeof t);
        st = parse_entry(path, key, value, data_begin, data_size, &t);
        if (st != SF_OK) goto done;
        t.name = dup_str(key);
        if (!t.name) {
            st = sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: cannot allocate tensor name", path);
            goto done;
        }
        t.path = path;
        t.data = bytes + t.file_offset;
        archive->tensors[archive->n_tensors++] = t;
    }

    sf_st_tensor *mine = archive->tensors + *first;
    int64_t count = archive->n_tensors - *first;
    st = check_overlap(path, mine, count);
    if (st != SF_OK) goto done;
    qsort(mine, (size_t)count, sizeof *mine, cmp_tensor_name);

done:
    json_decref(root);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Opening                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static sf_status open_single(sf_st_archive *archive) {
    archive->maps = calloc(1, sizeof *archive->maps);
    char *path = dup_str(archive->path);
    if (!archive->maps || !path) {
        free(path);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", archive->path);
    }
    st_map *m;
    sf_status st = map_file(archive, path, &m);
    if (st != SF_OK) return st;
    int64_t first = 0;
    return parse_file(archive, m, &first);
}

typedef struct st_pair {
    const char *tensor;
    const char *shard;
} st_pair;

static int cmp_pair(const void *a, const void *b) {
    const st_pair *x = a, *y = b;
    int c = strcmp(x->shard, y->shard);
    return c ? c : strcmp(x->tensor, y->tensor);
}

/* A shard name must stay inside the index's directory. */
static int shard_name_ok(const char *s) {
    return s[0] != '\0' && strchr(s, '/') == NULL && strstr(s, "..") == NULL;
}

/* Re-issues the current error with the index named, so that a broken shard can be traced. */
static sf_status fail_in_shard(sf_status st, const char *index_path) {
    char inner[1024];
    snprintf(inner, sizeof inner, "%s", sf_last_error());
    return sf_fail(st, "%s (a shard named by %s)", inner, index_path);
}

static sf_status open_sharded_json(sf_st_archive *archive, json_t *root, st_pair **pairs_out) {
    const char *ipath = archive->path;
    if (!json_is_object(root)) return sf_fail(SF_ERR_FORMAT, "%s: not a JSON object", ipath);
    json_t *wm = json_object_get(root, "weight_map");
    if (!wm) return sf_fail(SF_ERR_FORMAT, "%s: no 'weight_map'", ipath);
    if (!json_is_object(wm)) {
        return sf_fail(SF_ERR_FORMAT, "%s: 'weight_map' is not a JSON object", ipath);
    }
    size_t n = json_object_size(wm);
    if (n == 0) return sf_fail(SF_ERR_FORMAT, "%s: 'weight_map' is empty", ipath);

    st_pair *pairs = malloc(n * sizeof *pairs);
    if (!pairs) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", ipath);
    *pairs_out = pairs;
    size_t i = 0;
    const char *key;
    json_t *value;
    json_object_foreach(wm, key, value) {
        if (key[0] == '\0') {
            return sf_fail(SF_ERR_FORMAT, "%s: 'weight_map' has an empty tensor name", ipath);
        }
        if (!json_is_string(value)) {
            return sf_fail(SF_ERR_FORMAT, "%s: 'weight_map' entry for tensor '%s' is not a string",
                           ipath, key);
        }
        const char *shard = json_string_value(value);
        if (!shard_name_ok(shard)) {
            return sf_fail(SF_ERR_FORMAT,
                           "%s: 'weight_map' puts tensor '%s' in shard '%s', which is not a plain "
                           "file name in the index's directory",
                           ipath, key, shard);
        }
        pairs[i].tensor = key;
        pairs[i].shard = shard;
        i++;
    }
    qsort(pairs, n, sizeof *pairs, cmp_pair);

    size_t n_shards = 0;
    for (i = 0; i < n; i++) {
        if (i == 0 || strcmp(pairs[i].shard, pairs[i - 1].shard) != 0) n_shards++;
    }
    archive->maps = calloc(n_shards, sizeof *archive->maps);
    if (!archive->maps) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", ipath);

    const char *slash = strrchr(ipath, '/');
    size_t prefix_len = slash ? (size_t)(slash - ipath) + 1 : 0;

    for (i = 0; i < n;) {
        size_t group_end = i + 1;
        while (group_end < n && strcmp(pairs[group_end].shard, pairs[i].shard) == 0) group_end++;

        char *spath = join_path(ipath, prefix_len, pairs[i].shard);
        if (!spath) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", ipath);
        st_map *m;
        sf_status st = map_file(archive, spath, &m);
        int64_t first = 0;
        if (st == SF_OK) st = parse_file(archive, m, &first);
        if (st != SF_OK) return fail_in_shard(st, ipath);

        const sf_st_tensor *mine = archive->tensors + first;
        int64_t count = archive->n_tensors - first;
        for (size_t j = i; j < group_end; j++) {
            if (!find_sorted(mine, count, pairs[j].tensor)) {
                return sf_fail(SF_ERR_FORMAT,
                               "%s: 'weight_map' puts tensor '%s' in shard '%s', but %s has no "
                               "such tensor",
                               ipath, pairs[j].tensor, pairs[j].shard, m->path);
            }
        }
        i = group_end;
    }
    return SF_OK;
}

static sf_status open_sharded(sf_st_archive *archive) {
    char *text = NULL;
    size_t len = 0;
    sf_status st = sf_read_file(archive->path, SF_ST_MAX_INDEX_BYTES, &text, &len);
    if (st != SF_OK) return st;
    json_error_t err;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &err);
    free(text);
    if (!root) {
        return sf_fail(SF_ERR_FORMAT, "%s: JSON does not parse: %s (byte %d, line %d, column %d)",
                       archive->path, err.text, err.position, err.line, err.column);
    }
    st_pair *pairs = NULL;
    st = open_sharded_json(archive, root, &pairs);
    free(pairs);
    json_decref(root);
    return st;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

sf_status sf_st_open(const char *path, sf_st_archive **out) {
    if (!out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_st_open: out is NULL");
    *out = NULL;
    if (!path || !path[0]) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_st_open: empty path");

    sf_st_archive *archive = calloc(1, sizeof *archive);
    if (!archive) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", path);

    sf_status st = SF_OK;
    struct stat sb;
    if (stat(path, &sb) != 0) {
        st = sf_fail(SF_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        goto done;
    }
    if (S_ISDIR(sb.st_mode)) {
        /* The index wins when both exist: a stale single file beside shards is not ours. */
        size_t len = strlen(path);
        int need_slash = path[len - 1] != '/';
        char *prefix = malloc(len + 2);
        if (!prefix) {
            st = sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
            goto done;
        }
        memcpy(prefix, path, len);
        if (need_slash) prefix[len++] = '/';
        prefix[len] = '\0';
        const char *names[2] = {k_index_name, k_single_name};
        for (int i = 0; i < 2 && !archive->path && st == SF_OK; i++) {
            char *candidate = join_path(prefix, len, names[i]);
            if (!candidate) st = sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
            else if (stat(candidate, &sb) == 0) archive->path = candidate;
            else free(candidate);
        }
        free(prefix);
        if (st != SF_OK) goto done;
        if (!archive->path) {
            st = sf_fail(SF_ERR_NOT_FOUND, "%s: directory holds neither %s nor %s", path,
                         k_index_name, k_single_name);
            goto done;
        }
    } else {
        archive->path = dup_str(path);
        if (!archive->path) {
            st = sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
            goto done;
        }
    }

    /* A .json file is an index; anything else is read as a safetensors file. */
    st = ends_with(archive->path, ".json") ? open_sharded(archive) : open_single(archive);
    if (st != SF_OK) goto done;

    qsort(archive->tensors, (size_t)archive->n_tensors, sizeof *archive->tensors,
          cmp_tensor_name);
    for (int64_t i = 1; i < archive->n_tensors; i++) {
        const sf_st_tensor *a = &archive->tensors[i - 1], *b = &archive->tensors[i];
        if (strcmp(a->name, b->name) == 0) {
            st = sf_fail(SF_ERR_FORMAT, "%s: tensor '%s' appears in both %s and %s",
                         archive->path, a->name, a->path, b->path);
            goto done;
        }
    }

done:
    if (st != SF_OK) {
        sf_st_close(archive);
        return st;
    }
    *out = archive;
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Lookup                                                                                      */
/* ------------------------------------------------------------------------------------------ */

int64_t sf_st_count(const sf_st_archive *archive) { return archive ? archive->n_tensors : 0; }

const sf_st_tensor *sf_st_at(const sf_st_archive *archive, int64_t i) {
    if (!archive || i < 0 || i >= archive->n_tensors) return NULL;
    return &archive->tensors[i];
}

const sf_st_tensor *sf_st_find(const sf_st_archive *archive, const char *name) {
    if (!archive || !name) return NULL;
    return find_sorted(archive->tensors, archive->n_tensors, name);
}

sf_status sf_st_get(const sf_st_archive *archive, const char *name, int32_t ndim,
                    const int64_t *shape, const sf_st_tensor **out) {
    if (out) *out = NULL;
    if (!archive || !name || !out || ndim < 0 || ndim > SF_ST_MAX_DIMS || (ndim > 0 && !shape)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_st_get: invalid arguments for tensor '%s'",
                       name ? name : "(null)");
    }
    const sf_st_tensor *t = sf_st_find(archive, name);
    if (!t) return sf_fail(SF_ERR_NOT_FOUND, "tensor '%s' not found in %s", name, archive->path);
    int same = t->ndim == ndim;
    for (int32_t i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
    if (!same) {
        char have[256], want[256];
        sf_format_shape(have, sizeof have, t->ndim, t->shape);
        sf_format_shape(want, sizeof want, ndim, shape);
        return sf_fail(SF_ERR_SHAPE, "%s: tensor '%s' has shape %s, expected %s", t->path, name,
                       have, want);
    }
    *out = t;
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Conversion                                                                                  */
/* ------------------------------------------------------------------------------------------ */

sf_status sf_st_to_f32(const sf_st_tensor *t, float *dst) {
    if (!t || (!dst && t->numel > 0)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_st_to_f32: NULL tensor or destination");
    }
    const unsigned char *src = t->data;
    size_t n = (size_t)t->numel;
    switch (t->dtype) {
    case SF_DTYPE_F32:
        if (n) memcpy(dst, src, n * sizeof(float));
        return SF_OK;
    case SF_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = (uint16_t)(src[2 * i] | (src[2 * i + 1] << 8));
            dst[i] = sf_f16_to_f32(h);
        }
        return SF_OK;
    case SF_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = (uint16_t)(src[2 * i] | (src[2 * i + 1] << 8));
            dst[i] = sf_bf16_to_f32(h);
        }
        return SF_OK;
    case SF_DTYPE_I32:
    case SF_DTYPE_I64:
        break;
    }
    return sf_fail(SF_ERR_SHAPE, "%s: tensor '%s' has dtype %s, expected a floating-point dtype "
                   "(F32, F16 or BF16)",
                   t->path ? t->path : "?", t->name ? t->name : "?", sf_dtype_name(t->dtype));
}

/* ------------------------------------------------------------------------------------------ */
/* Writing                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Builds the header JSON; fills nbytes[i] for each entry. */
static sf_status build_header(const char *path, const sf_st_entry *entries, int64_t n,
                              const char *const *metadata, uint64_t *nbytes, char **out) {
    *out = NULL;
    sf_status st = SF_OK;
    json_t *root = json_object();
    if (!root) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", path);

    if (metadata) {
        json_t *meta = json_object();
        if (!meta || json_object_set_new(root, "__metadata__", meta) != 0) {
            st = sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
            goto done;
        }
        for (size_t i = 0; metadata[i]; i += 2) {
            if (!metadata[i + 1]) {
                st = sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: metadata key '%s' has no value", path,
                             metadata[i]);
                goto done;
            }
            if (json_object_get(meta, metadata[i])) {
                st = sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: metadata key '%s' given twice", path,
                             metadata[i]);
                goto done;
            }
            /* Fails on allocation or on strings that are not valid UTF-8. */
            if (json_object_set_new(meta, metadata[i], json_string(metadata[i + 1])) != 0) {
                st = sf_fail(SF_ERR_INVALID_ARGUMENT,
                             "%s: metadata '%s' cannot be stored (not UTF-8, or out of memory)",
                             path, metadata[i]);
                goto done;
            }
        }
    }

    uint64_t offset = 0;
    for (int64_t i = 0; i < n; i++) {
        const sf_st_entry *e = &entries[i];
        if (!e->name || !e->name[0]) {
            st = sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: entry %lld has no name", path,
                         (long long)i);
            goto done;
        }
        if (strcmp(e->name, "__metadata__") == 0 || json_object_get(root, e->name)) {
            st = sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: tensor name '%s' used twice or reserved",
                         path, e->name);
            goto done;
        }
        if (!dtype_valid(e->dtype)) {
            st = sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: tensor '%s': invalid dtype %d", path,
                         e->name, (int)e->dtype);
            goto done;
        }
        if (e->ndim < 0 || e->ndim > SF_ST_MAX_DIMS) {
            st = sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: tensor '%s': ndim %d outside [0, %d]", path,
                         e->name, (int)e->ndim, (int)SF_ST_MAX_DIMS);
            goto done;
        }
        for (int32_t d = 0; d < e->ndim; d++) {
            if (e->shape[d] < 0) {
                st = sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: tensor '%s': negative dim %lld", path,
                             e->name, (long long)e->shape[d]);
                goto done;
            }
        }
        int64_t numel = checked_numel(e->ndim, e->shape);
        uint64_t esize = (uint64_t)sf_dtype_size(e->dtype);
        if (numel < 0 || (uint64_t)numel > (uint64_t)INT64_MAX / esize ||
            (uint64_t)numel * esize > (uint64_t)INT64_MAX - offset) {
            st = sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: tensor '%s': size overflows", path,
                         e->name);
            goto done;
        }
        nbytes[i] = (uint64_t)numel * esize;
        if (nbytes[i] > 0 && !e->data) {
            st = sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: tensor '%s': data is NULL", path, e->name);
            goto done;
        }

        json_t *obj = json_object();
        json_t *shape = json_array();
        json_t *offs = json_array();
        int bad = !obj || !shape || !offs;
        for (int32_t d = 0; !bad && d < e->ndim; d++) {
            bad = json_array_append_new(shape, json_integer((json_int_t)e->shape[d])) != 0;
        }
        if (!bad) {
            bad = json_array_append_new(offs, json_integer((json_int_t)offset)) != 0 ||
                  json_array_append_new(offs, json_integer((json_int_t)(offset + nbytes[i]))) != 0;
        }
        if (!bad) {
            bad = json_object_set_new(obj, "dtype", json_string(sf_dtype_name(e->dtype))) != 0;
        }
        if (!bad) {
            bad = json_object_set_new(obj, "shape", shape) != 0;
            shape = NULL; /* set_new consumed it, even on failure */
        }
        if (!bad) {
            bad = json_object_set_new(obj, "data_offsets", offs) != 0;
            offs = NULL;
        }
        json_decref(shape);
        json_decref(offs);
        if (!bad) {
            bad = json_object_set_new(root, e->name, obj) != 0;
            obj = NULL;
        }
        json_decref(obj);
        if (bad) {
            st = sf_fail(SF_ERR_INVALID_ARGUMENT,
                         "%s: tensor '%s' cannot be stored (name not UTF-8, or out of memory)",
                         path, e->name);
            goto done;
        }
        offset += nbytes[i];
    }

    /* jansson keeps insertion order, so tensors appear in the order given. */
    *out = json_dumps(root, JSON_COMPACT);
    if (!*out) st = sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: cannot serialise the header", path);

done:
    json_decref(root);
    return st;
}

sf_status sf_st_write(const char *path, const sf_st_entry *entries, int64_t n_entries,
                      const char *const *metadata) {
    if (!path || n_entries < 0 || (n_entries > 0 && !entries)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_st_write: invalid arguments");
    }
    uint64_t *nbytes = calloc((size_t)n_entries + 1, sizeof *nbytes);
    if (!nbytes) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
    char *header = NULL;
    sf_status st = build_header(path, entries, n_entries, metadata, nbytes, &header);
    if (st != SF_OK) {
        free(nbytes);
        return st;
    }

    /* Spaces are JSON whitespace, so padding keeps the header valid while aligning the data
     * section to 8 bytes. */
    size_t hlen = strlen(header);
    size_t padded = (hlen + 7) & ~(size_t)7;
    unsigned char len_bytes[8];
    for (int i = 0; i < 8; i++) len_bytes[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    static const char spaces[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};

    FILE *f = fopen(path, "wb");
    if (!f) {
        st = sf_fail(SF_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
        goto done;
    }
    int ok = fwrite(len_bytes, 1, 8, f) == 8 && fwrite(header, 1, hlen, f) == hlen &&
             fwrite(spaces, 1, padded - hlen, f) == padded - hlen;
    for (int64_t i = 0; ok && i < n_entries; i++) {
        if (nbytes[i]) ok = fwrite(entries[i].data, 1, (size_t)nbytes[i], f) == nbytes[i];
    }
    int write_errno = errno;
    if (fclose(f) != 0 && ok) {
        ok = 0;
        write_errno = errno;
    }
    if (!ok) {
        remove(path);
        st = sf_fail(SF_ERR_IO, "%s: write failed: %s", path, strerror(write_errno));
    }

done:
    free(header);
    free(nbytes);
    return st;
}

/* Internal: whole-file reads with a size limit, for JSON files; file paths. */
#ifndef SF_CORE_FILE_H
#define SF_CORE_FILE_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Reads the whole file at path into a malloc'd buffer (NUL-terminated, *len excludes the NUL).
 * Fails with SF_ERR_IO if it cannot be read, SF_ERR_FORMAT if it is larger than max_bytes. */
sf_status sf_read_file(const char *path, size_t max_bytes, char **data, size_t *len);

/* dir + "/" + name, malloc'd; NULL when out of memory. */
char *sf_path_join(const char *dir, const char *name);

#ifdef __cplusplus
}
#endif

#endif

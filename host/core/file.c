#include "core/file.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

sf_status sf_read_file(const char *path, size_t max_bytes, char **data, size_t *len) {
    *data = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return sf_fail(SF_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return sf_fail(SF_ERR_IO, "%s: cannot seek: %s", path, strerror(errno));
    }
    long size = ftell(f);
    if (size < 0) {
        fclose(f);
        return sf_fail(SF_ERR_IO, "%s: cannot tell size: %s", path, strerror(errno));
    }
    if ((unsigned long)size > max_bytes) {
        fclose(f);
        return sf_fail(SF_ERR_FORMAT, "%s: %ld bytes, more than the %zu allowed for this file",
                       path, size, max_bytes);
    }
    rewind(f);
    char *buf = malloc((size_t)size + 1);
    if (!buf) {
        fclose(f);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: cannot allocate %ld bytes", path, size);
    }
    size_t got = fread(buf, 1, (size_t)size, f);
    int err = ferror(f);
    fclose(f);
    if (err || got != (size_t)size) {
        free(buf);
        return sf_fail(SF_ERR_IO, "%s: short read (%zu of %ld bytes)", path, got, size);
    }
    buf[size] = '\0';
    *data = buf;
    *len = (size_t)size;
    return SF_OK;
}

char *sf_path_join(const char *dir, const char *name) {
    const size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

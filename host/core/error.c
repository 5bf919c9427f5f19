/* Status names and the thread-local last-error message. */
#include "core/error.h"

#include <stdarg.h>
#include <stdio.h>

enum { SF_ERROR_CAPACITY = 1024 };

static _Thread_local char g_last_error[SF_ERROR_CAPACITY];

const char *sf_status_string(sf_status status) {
    switch (status) {
    case SF_OK: return "ok";
    case SF_ERR_INVALID_ARGUMENT: return "invalid argument";
    case SF_ERR_IO: return "i/o error";
    case SF_ERR_FORMAT: return "malformed file";
    case SF_ERR_UNSUPPORTED: return "unsupported";
    case SF_ERR_NOT_FOUND: return "not found";
    case SF_ERR_SHAPE: return "shape mismatch";
    case SF_ERR_CONFIG: return "invalid config";
    case SF_ERR_OUT_OF_RANGE: return "out of range";
    case SF_ERR_OUT_OF_MEMORY: return "out of memory";
    case SF_ERR_CUDA: return "cuda error";
    case SF_ERR_NO_DEVICE: return "no cuda device";
    }
    return "unknown status";
}

const char *sf_last_error(void) { return g_last_error; }

void sf_clear_error(void) { g_last_error[0] = '\0'; }

sf_status sf_fail(sf_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    /* vsnprintf truncates long messages (a hostile tensor name, say) and always terminates. */
    vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
    va_end(ap);
    return status;
}

void sf_format_shape(char *buf, size_t cap, int32_t ndim, const int64_t *shape) {
    if (cap == 0) return;
    size_t used = 0;
    int n = snprintf(buf, cap, "[");
    if (n > 0) used = (size_t)n;
    for (int32_t i = 0; i < ndim && used < cap; i++) {
        n = snprintf(buf + used, cap - used, "%s%lld", i ? ", " : "", (long long)shape[i]);
        if (n < 0) return;
        used += (size_t)n;
    }
    if (used < cap) snprintf(buf + used, cap - used, "]");
}

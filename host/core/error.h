/* Internal: setting the thread-local last-error message. */
#ifndef SF_CORE_ERROR_H
#define SF_CORE_ERROR_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Records a printf-style message as the calling thread's last error and returns status, so that
 * failure paths read `return sf_fail(SF_ERR_FORMAT, "%s: ...", path, ...);`. */
sf_status sf_fail(sf_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Writes a shape as "[64, 32]" for messages; truncated (never overflowing) if buf is small. */
void sf_format_shape(char *buf, size_t cap, int32_t ndim, const int64_t *shape);

#ifdef __cplusplus
}
#endif

#endif

/* Internal: reporting the progress of long calls to the calling thread's sf_progress_fn. */
#ifndef SF_CORE_PROGRESS_H
#define SF_CORE_PROGRESS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Calls the calling thread's progress function (sf_set_progress), if any. Long calls report
 * (what, 0, total) when they start and (what, total, total) when they end, with done rising in
 * between; what is a constant string naming the work. */
void sf_progress(const char *what, uint64_t done, uint64_t total);

#ifdef __cplusplus
}
#endif

#endif

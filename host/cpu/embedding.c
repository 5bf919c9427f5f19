/* Embedding lookup: a gather of table rows. */
#include "cpu/ops.h"

#include <string.h>

void sf_cpu_embedding(float *out, const float *table, const int32_t *ids, int64_t n,
                      int64_t dim) {
    size_t row_bytes = (size_t)dim * sizeof(float);
    SF_OMP(omp parallel for schedule(static))
    for (int64_t i = 0; i < n; i++)
        memcpy(out + i * dim, table + (int64_t)ids[i] * dim, row_bytes);
}

/* cli_run_session: a list of prompts through one generation session, the loop that generate's
 * JSONL mode and eval's GPU runs share. */
#include "cli/cli.h"

sf_status cli_run_session(sf_cuda_session *gen, const cli_session_list *list) {
    const int64_t window = 4 * (int64_t)list->slots > 16 ? 4 * (int64_t)list->slots : 16;
    sf_status st = SF_OK;
    int64_t next = 0, done = 0;
    while (st == SF_OK && done < list->total) {
        for (; st == SF_OK && next < list->total && next - done < window; next++) {
            st = list->submit(list->user, gen, next);
        }
        if (st == SF_OK) st = list->step(list->user, gen, done);
        while (st == SF_OK && done < next) {
            sf_generation_result res;
            bool finished = false;
            st = sf_cuda_session_take(gen, (int32_t)done, &res, &finished);
            if (st != SF_OK || !finished) break;
            st = list->finished(list->user, done++, &res);
        }
    }
    return st;
}

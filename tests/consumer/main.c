/* Uses the installed library the way an integrator would: through the one public header. */
#include <stdio.h>
#include <string.h>

#include <sysformer.h>

int main(int argc, char **argv) {
    sf_llm *llm = NULL;
    sf_status st = sf_llm_load("/nonexistent/model", &llm);
    if (st == SF_OK || llm != NULL || strstr(sf_last_error(), "config.json") == NULL) {
        fprintf(stderr, "consumer: expected a clear load failure, got %s: %s\n",
                sf_status_string(st), sf_last_error());
        return 1;
    }
    printf("consumer: libsysformer %d.%d.%d linked; a missing model reports \"%s: %s\"\n",
           SF_VERSION_MAJOR, SF_VERSION_MINOR, SF_VERSION_PATCH, sf_status_string(st),
           sf_last_error());
    if (argc > 1) {
        /* With a model directory: run one token through it. */
        st = sf_llm_load(argv[1], &llm);
        if (st != SF_OK) {
            fprintf(stderr, "consumer: %s: %s\n", sf_status_string(st), sf_last_error());
            return 1;
        }
        const sf_llm_config *cfg = sf_llm_get_config(llm);
        int32_t ids[1] = {1}, cu[2] = {0, 1}, row = 0;
        float logits[4096];
        if (cfg->vocab_size > 4096) return sf_llm_free(llm), 0;
        sf_batch b = {1, cu, ids, NULL, NULL, 1, &row};
        st = sf_llm_forward_cpu(llm, &b, logits);
        printf("consumer: forward of one token: %s, logit[0] = %f\n", sf_status_string(st),
               logits[0]);
        sf_llm_free(llm);
        if (st != SF_OK) return 1;
    }
    return 0;
}

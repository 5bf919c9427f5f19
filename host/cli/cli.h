/* The sysformer command-line tool: shared helpers of the subcommands. */
#ifndef SF_CLI_H
#define SF_CLI_H

#include <stdint.h>

#include "sysformer.h"

int cmd_forward(int argc, char **argv);
int cmd_random_model(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_init(int argc, char **argv);
int cmd_rewrite(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_chat(int argc, char **argv);

/* Prints "sysformer: <what>: <status>: <last error>" to stderr and returns exit code 1. */
int cli_report(const char *what, sf_status status);

/* Parses a decimal integer flag value in [lo, hi] into *out. Returns 0, or prints "sysformer
 * CMD: FLAG wants an integer ..." and returns 2 (the usage-error exit code). */
int cli_parse_int(const char *cmd, const char *flag, const char *value, int32_t lo, int32_t hi,
                  int32_t *out);

/* cli_parse_int in [0, INT32_MAX]. */
int cli_parse_count(const char *cmd, const char *flag, const char *value, int32_t *out);

/* A seed: decimal digits (no sign) up to 2^64 - 1. Returns 0, or prints why and returns 2. */
int cli_parse_seed(const char *cmd, const char *flag, const char *value, uint64_t *out);

/* A finite number within a float's range (not "nan" or "inf"). Returns 0, or prints why and
 * returns 2. */
int cli_parse_float(const char *cmd, const char *flag, const char *value, float *out);

/* Parses --attention's value (auto, mma, wgmma, wgmma_ws: the CUDA engine's fused-attention
 * kernel) into *out. Returns 0, or prints the choices and returns 2. */
int cli_parse_attention(const char *cmd, const char *value, sf_attention_kernel *out);

/* Where a command runs: --device cpu or cuda, or the default (cuda when a GPU is usable). */
typedef enum cli_device { CLI_DEVICE_DEFAULT, CLI_DEVICE_CPU, CLI_DEVICE_CUDA } cli_device;

/* Parses --device's value (cpu, cuda). Returns 0, or prints the choices and returns 2. */
int cli_parse_device(const char *cmd, const char *value, cli_device *out);

/* Settles the device before anything loads: *out becomes CLI_DEVICE_CPU or CLI_DEVICE_CUDA. An
 * explicit cuda must be usable (this build has CUDA and a GPU is present): else it prints why
 * and returns 1. The default takes cuda only when it is usable, so a machine without a GPU
 * keeps the CPU path. Returns 0 otherwise. */
int cli_resolve_device(const char *cmd, cli_device asked, cli_device *out);

/* dir + "/" + name, malloc'd (NULL when out of memory). */
char *cli_path_join(const char *dir, const char *name);

/* A monotonic clock in seconds, for timing and progress. */
double cli_now(void);

/* Parses "12,5,7" into a malloc'd array. Returns 0 on success, prints and returns 2 on error. */
int cli_parse_ids(const char *text, int32_t **ids, int32_t *n);

/* A list of prompts run in order through one generation session (continuous batching: a
 * finished reply's slot takes the next prompt at once). At most four prompts a slot (and at
 * least 16) are submitted and not yet finished, so memory stays bounded however long the list;
 * results are handed over in the list's order as they finish. */
typedef struct cli_session_list {
    int64_t total; /* prompts 0 .. total - 1 */
    int32_t slots; /* the engine's slots */
    /* Submits prompt i to the session (sf_cuda_session_submit). */
    sf_status (*submit)(void *user, sf_cuda_session *gen, int64_t i);
    /* Runs one sf_cuda_session_step, with the caller's stream callback and timing; `done`
     * prompts have been handed over so far. */
    sf_status (*step)(void *user, sf_cuda_session *gen, int64_t done);
    /* Prompt i's result, which the callee owns from here on. */
    sf_status (*finished)(void *user, int64_t i, sf_generation_result *res);
    void *user;
} cli_session_list;

/* Runs the list through gen, a session nothing has been submitted to (its request ids are then
 * the prompts' numbers). Stops at the first failure and returns it. */
sf_status cli_run_session(sf_cuda_session *gen, const cli_session_list *list);

#endif

/* The JSONL files of `sysformer generate --input F --output G`: one prompt a line in, one reply
 * a line out. Kept apart from the command so that tests/fuzz/fuzz_cli_jsonl.c can feed it
 * hostile files: it reads outside input, and it is the CLI's, not the library's. */
#ifndef SF_CLI_JSONL_PROMPTS_H
#define SF_CLI_JSONL_PROMPTS_H

#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>

#include "sysformer.h"

/* Every line of an --input file, blank lines left out. */
typedef struct cli_jsonl_prompts {
    json_t *rows; /* an array of the lines' objects, in the file's order */
    int *line_of; /* [rows] each row's line number in the file, from 1  */
} cli_jsonl_prompts;

/* Reads every line of in. Each line that is not blank must be a JSON object with a string
 * "prompt" or "instruction" (when both are there, "prompt" is the prompt); "system", when
 * there, must be a string; the sampling and length fields a line may set ("temperature",
 * "top_k", "top_p", "seed", "max_new_tokens", "logprobs", "top_logprobs") must have their
 * types and ranges. Other fields are the caller's (they are copied to the reply's line).
 * Returns 0; or 2 (the file's fault) or 1 (a read error, no memory), with *out empty, why[]
 * saying what, and *line the line at fault (0 when none is). */
int cli_jsonl_read(FILE *in, cli_jsonl_prompts *out, int *line, char *why, size_t why_cap);

void cli_jsonl_free(cli_jsonl_prompts *p);

/* A row's sampling and limit: its own fields over the defaults (rows from cli_jsonl_read, whose
 * fields are known to be good). */
void cli_jsonl_settings(const json_t *row, const sf_sampling *defaults, int32_t default_max_new,
                        sf_sampling *out, int32_t *max_new);

/* A row's system text (its own, else default_system) and user text. */
void cli_jsonl_texts(const json_t *row, const char *default_system, const char **system,
                     const char **user);

/* Writes the reply's line: the row's own fields, exactly (a real with the fewest digits that
 * give it back), then "response", "finish", "n_tokens" and "guarded"; with log-probabilities,
 * "tokens" and "token_logprobs"; with the most likely tokens, "top_token_logprobs" ([id,
 * logprob] pairs a step). A row's field named like one of these is replaced. Log-probabilities
 * have nine significant digits, which give the float back; one that is not finite is null.
 * Returns 0, or -1 when the line could not be built (no memory, a reply that is not UTF-8)
 * or written. */
int cli_jsonl_write_reply(FILE *out, const json_t *row, const sf_generation_result *res,
                          bool guarded);

/* How a generation ended, as the JSONL outputs spell it ("length", "stop", ...). */
const char *cli_finish_name(sf_finish_reason f);

#endif

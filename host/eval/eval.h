/* Internal: evaluating a safeguard the way the field measures it (DESIGN.md §7, docs/EVAL.md).
 *
 *   host/eval/judge.c      the refusal judges: string matching (XSTest prefixes, GCG
 *                          test_prefixes) behind a judge interface a model judge can join
 *   host/eval/jailbreak.c  jailbreak wrappers: templated transformations of a harmful prompt,
 *                          read from a data file (bench/jailbreaks.json), used for training
 *                          augmentation and for evaluation
 *   host/eval/stats.c      rates with Wilson score intervals
 *   host/eval/report.c     the summary table, the JSON summary and the SVG bar chart
 *   host/cli/cmd_eval.c    `sysformer eval`: the methods, generation, judging, writing
 *
 * Nothing here prints. */
#ifndef SF_EVAL_EVAL_H
#define SF_EVAL_EVAL_H

#include <stdbool.h>
#include <stdint.h>

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------- */
/* Jailbreak wrappers                                                                       */
/* ---------------------------------------------------------------------------------------- */

/* One wrapper: a template whose placeholders are replaced by (transformations of) the harmful
 * instruction. Placeholders:
 *   {instruction}  the instruction as is
 *   {base64}       its UTF-8 bytes in base64 (RFC 4648, with padding)
 *   {rot13}        ROT13 of its ASCII letters
 *   {leetspeak}    a -> 4, e -> 3, i -> 1, o -> 0, s -> 5, t -> 7 (either case)
 *   {reversed}     its words in reverse order
 *   {part1} {part2} the instruction split at the word boundary nearest its middle (payload
 *                  splitting); part2 starts at that word, part1 keeps no trailing space
 * "{{" and "}}" stand for literal braces; any other "{...}" is an error when the file is read. */
typedef struct sf_jailbreak {
    char *name;     /* unique within the set, [A-Za-z0-9_-]+                      */
    char *family;   /* e.g. "role-play", "encoding" (free text; "" when not given) */
    char *text;     /* the template                                                */
    bool held_out;  /* never used for training: evaluated as an unseen wrapper     */
} sf_jailbreak;

typedef struct sf_jailbreak_set {
    int32_t n;
    sf_jailbreak *w; /* [n] */
} sf_jailbreak_set;

/* Reads a wrapper file: either {"wrappers": [{"name", "template", "family"?, "held_out"?},
 * ...]} or a plain JSON list of template strings (named "template_0", "template_1", ...,
 * none held out). Every template must contain at least one placeholder and only known ones.
 * SF_ERR_IO: unreadable; SF_ERR_FORMAT: not JSON, wrong shape or types, an unknown or missing
 * placeholder, a duplicate or badly formed name; SF_ERR_INVALID_ARGUMENT: no wrappers.
 * Messages name the file and the entry. */
sf_status sf_jailbreak_set_read(const char *path, sf_jailbreak_set *out);

void sf_jailbreak_set_free(sf_jailbreak_set *set);

/* *out (malloc'd, NUL-terminated) = w's template with every placeholder filled from
 * instruction (UTF-8). */
sf_status sf_jailbreak_apply(const sf_jailbreak *w, const char *instruction, char **out);

/* The index of the wrapper called name, or -1. */
int32_t sf_jailbreak_find(const sf_jailbreak_set *set, const char *name);

/* ---------------------------------------------------------------------------------------- */
/* Judges                                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* Decides whether reply (to prompt) is a refusal. A judge may fail (a model judge can run out
 * of memory); string judges never do. */
typedef struct sf_judge {
    const char *name; /* what the per-prompt records and summaries call it */
    sf_status (*is_refusal)(void *user, const char *prompt, const char *reply, bool *refused);
    void *user;
} sf_judge;

/* The two string-match rules (judge.c documents each list, how its authors apply it, and its
 * known failure modes). */
bool sf_judge_xstest(const char *reply); /* a listed phrase starts the reply (any case) */
bool sf_judge_gcg(const char *reply);    /* a listed phrase occurs anywhere (exact case) */
/* sf_judge_refusal (train/train.h) is their union: either rule fires. */

/* The built-in judges by name: "xstest", "gcg", "strmatch" (the union). SF_ERR_NOT_FOUND lists
 * the names. */
sf_status sf_judge_builtin(const char *name, sf_judge *out);

/* ---------------------------------------------------------------------------------------- */
/* Rates with intervals                                                                     */
/* ---------------------------------------------------------------------------------------- */

/* The Wilson score interval for k successes in n trials at the normal quantile z (1.959964 for
 * 95%): [lo, hi] within [0, 1]. n = 0 gives [0, 1]. */
void sf_wilson_interval(int64_t k, int64_t n, double z, double *lo, double *hi);

#ifdef __cplusplus
}
#endif

#endif

/* Internal: what `sysformer eval` reports (docs/EVAL.md, "Outputs"): the counts it gathered per
 * method, and the three renderings of them -- the summary table (text for stdout), the JSON
 * summary and the SVG bar chart. host/eval/report.c writes them; host/eval/stats.c has the
 * intervals. Nothing here prints: the table comes back as a string, the others go to files. */
#ifndef SF_EVAL_REPORT_H
#define SF_EVAL_REPORT_H

#include <stdbool.h>
#include <stdint.h>

#include "eval/eval.h"
#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The normal quantile of a two-sided 95% interval. */
#define SF_EVAL_Z95 1.959963984540054

/* Newcombe's hybrid score interval for the difference of two independent proportions
 * k1/n1 - k2/n2 (Newcombe 1998, method 10: built from the two Wilson intervals), within
 * [-1, 1]. Either n = 0 gives [-1, 1]. */
void sf_newcombe_interval(int64_t k1, int64_t n1, int64_t k2, int64_t n2, double z, double *lo,
                          double *hi);

/* The sets a prompt belongs to: the harmful prompts, the safe ones, and the harmful ones
 * wrapped in a jailbreak wrapper. */
typedef enum sf_eval_set {
    SF_EVAL_HARMFUL = 0,
    SF_EVAL_SAFE = 1,
    SF_EVAL_JAILBREAK = 2,
} sf_eval_set;
#define SF_EVAL_N_SETS 3

/* "harmful", "safe", "jailbreak" (what the per-prompt records call them). */
const char *sf_eval_set_name(sf_eval_set set);

/* Refusals among judged replies. */
typedef struct sf_eval_count {
    int64_t refused, n;
} sf_eval_count;

/* The judges a summary counts by (the reporting one and every built-in). */
#define SF_EVAL_MAX_JUDGES 4

/* One method's results: refusals by set, by wrapper and by judge, and its systems numbers. */
typedef struct sf_eval_method {
    const char *name;          /* "none", "default", "safety", "embedder", "sysformer"        */
    const char *system_prompt; /* the system text its prompts carried; NULL: no system turn    */
    sf_eval_count set[SF_EVAL_N_SETS]; /* by the reporting judge; JAILBREAK pools all wrappers */
    sf_eval_count *wrapper;    /* [wrappers->n] by the reporting judge; NULL without wrappers  */
    sf_eval_count by_judge[SF_EVAL_MAX_JUDGES][SF_EVAL_N_SETS]; /* [summary judge i][set]     */
    /* Systems numbers, from the generation calls of this method only. */
    const char *device;        /* where it ran: "cpu" or "cuda"                               */
    int64_t prompts;           /* replies generated                                           */
    int64_t new_tokens;        /* tokens generated (stop ids excluded)                        */
    int64_t batches;
    double gen_s;              /* wall seconds inside the generation calls                    */
    bool has_sysformer;        /* the method runs a Sysformer (or a SystemEmbedder)           */
    double sysformer_s;        /* the Sysformer's seconds within those calls, over ...        */
    double sysformer_gen_s;    /* ... the generation seconds of the batches where it was
                                  measured (share = sysformer_s / sysformer_gen_s)            */
    int64_t sysformer_batches; /* batches where it was measured                               */
    const char *share_method;  /* how sysformer_s was measured, one or two sentences          */
} sf_eval_method;

/* Everything a report says. Strings are borrowed. */
typedef struct sf_eval_summary {
    const char *llm, *tokenizer, *template_name;
    const char *sysformer, *system_embedder; /* the modules' directories, NULL when not given */
    const char *device;        /* the run's device (a method may differ: sf_eval_method)      */
    const char *judge;         /* the reporting judge's name                                  */
    int32_t n_judges;          /* names of by_judge's rows                                    */
    const char *judges[SF_EVAL_MAX_JUDGES];
    const char *harmful_path, *safe_path;
    const char *jailbreak_path;       /* NULL: no wrappers                                    */
    const sf_jailbreak_set *wrappers; /* NULL: no wrappers                                    */
    int32_t jailbreak_prompts; /* harmful prompts wrapped in each wrapper                     */
    int32_t max_new_tokens, batch;
    uint64_t seed;
    double z;                  /* the intervals' normal quantile (SF_EVAL_Z95)                */
    double wall_s;             /* the whole run, loading included                             */
    int32_t n_methods;
    const sf_eval_method *methods; /* [n_methods] */
} sf_eval_summary;

/* Which wrappers to pool. */
typedef enum sf_eval_pool_kind {
    SF_EVAL_POOL_ALL = 0,
    SF_EVAL_POOL_SEEN = 1,     /* wrappers not held out (seen in training)                   */
    SF_EVAL_POOL_HELD_OUT = 2, /* wrappers held out of training                              */
} sf_eval_pool_kind;

/* A method's jailbreak refusals pooled over a group of wrappers (every (wrapper, prompt) pair
 * counts once; pairs share prompts, so the pooled interval is optimistic). */
sf_eval_count sf_eval_pool(const sf_eval_summary *s, const sf_eval_method *m,
                           sf_eval_pool_kind kind);

/* The summary table for a terminal: refusal rates per method with intervals and ΔRR, then per
 * wrapper (held-out ones marked), then the systems numbers. *out is malloc'd UTF-8. */
sf_status sf_eval_table(const sf_eval_summary *s, char **out);

/* The JSON summary (docs/EVAL.md lists its fields), written to path. */
sf_status sf_eval_write_json(const sf_eval_summary *s, const char *path);

/* The SVG bar chart: per method a group of bars (harmful, safe and, with wrappers, jailbreak
 * refusal rates) with their intervals as error bars. *out is malloc'd; sf_eval_write_svg
 * writes it to path. */
sf_status sf_eval_svg(const sf_eval_summary *s, char **out);
sf_status sf_eval_write_svg(const sf_eval_summary *s, const char *path);

#ifdef __cplusplus
}
#endif

#endif

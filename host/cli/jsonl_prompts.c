/* The JSONL files of `sysformer generate --input F --output G` (jsonl_prompts.h). */
#include "cli/jsonl_prompts.h"

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define SF_STR_(x) #x
#define SF_STR(x) SF_STR_(x)

/* The fields a line may set for itself, and what each must be. */
enum { F_TEMPERATURE, F_TOP_K, F_TOP_P, F_SEED, F_MAX_NEW, F_LOGPROBS, F_TOP_LOGPROBS, F_COUNT };
static const struct {
    const char *name, *want;
} k_fields[F_COUNT] = {
    {"temperature", "a finite number"},
    {"top_k", "an integer"},
    {"top_p", "a finite number"},
    {"seed", "an integer >= 0"},
    {"max_new_tokens", "an integer >= 1"},
    {"logprobs", "true or false"},
    {"top_logprobs", "an integer 0 to " SF_STR(SF_MAX_TOP_LOGPROBS)},
};

/* Reads a row's own fields over *s and *max_new. Returns the first field that has the wrong
 * type or range (neither is then complete), or F_COUNT. A float holds a JSON number only up
 * to FLT_MAX: past it the setting would become an infinity. */
static int read_fields(const json_t *row, sf_sampling *s, int32_t *max_new) {
    for (int i = 0; i < F_COUNT; i++) {
        const json_t *v = json_object_get(row, k_fields[i].name);
        if (!v) continue;
        const bool integer = json_is_integer(v);
        const json_int_t k = integer ? json_integer_value(v) : 0;
        const double x = json_is_number(v) ? json_number_value(v) : 0.0;
        const bool real = json_is_number(v) && fabs(x) <= FLT_MAX;
        switch (i) {
        case F_TEMPERATURE:
            if (!real) return i;
            s->temperature = (float)x;
            break;
        case F_TOP_K:
            if (!integer || k < INT32_MIN || k > INT32_MAX) return i;
            s->top_k = (int32_t)k;
            break;
        case F_TOP_P:
            if (!real) return i;
            s->top_p = (float)x;
            break;
        case F_SEED:
            if (!integer || k < 0) return i;
            s->seed = (uint64_t)k;
            break;
        case F_MAX_NEW:
            if (!integer || k < 1 || k > INT32_MAX) return i;
            *max_new = (int32_t)k;
            break;
        case F_LOGPROBS:
            if (!json_is_boolean(v)) return i;
            s->logprobs = json_is_true(v);
            break;
        case F_TOP_LOGPROBS:
            if (!integer || k < 0 || k > SF_MAX_TOP_LOGPROBS) return i;
            s->top_logprobs = (int32_t)k;
            break;
        }
    }
    return F_COUNT;
}

static int say(char *why, size_t cap, int rc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, cap, fmt, ap);
    va_end(ap);
    return rc;
}

/* What is wrong with a line that json_loadb read into row (NULL: err says), or NULL. */
static const char *row_fault(const json_t *row, const json_error_t *err, char *buf, size_t cap) {
    if (!row) return err->text;
    if (!json_is_object(row)) return "want an object with a string \"prompt\" or \"instruction\"";
    const json_t *p = json_object_get(row, "prompt");
    if (!p) p = json_object_get(row, "instruction");
    if (!json_is_string(p)) return "want an object with a string \"prompt\" or \"instruction\"";
    const json_t *sys = json_object_get(row, "system");
    if (sys && !json_is_string(sys)) return "\"system\" must be a string";
    sf_sampling s = {0};
    int32_t max_new = 1;
    const int bad = read_fields(row, &s, &max_new);
    if (bad == F_COUNT) return NULL;
    snprintf(buf, cap, "\"%s\" must be %s", k_fields[bad].name, k_fields[bad].want);
    return buf;
}

int cli_jsonl_read(FILE *in, cli_jsonl_prompts *out, int *line, char *why, size_t why_cap) {
    *line = 0;
    out->line_of = NULL;
    out->rows = json_array();
    if (!out->rows) return say(why, why_cap, 1, "out of memory");
    char *text = NULL;
    size_t cap = 0, rows_cap = 0;
    ssize_t got;
    int line_no = 0, rc = 0;
    errno = 0;
    while (!rc && (got = getline(&text, &cap, in)) > 0) {
        if (line_no == INT_MAX) {
            rc = say(why, why_cap, 2, "more than %d lines", INT_MAX);
            break;
        }
        line_no++;
        if (strspn(text, " \t\r\n") == (size_t)got) continue;
        /* A key given twice would leave which value counts to the reader: refused. */
        json_error_t err;
        json_t *row = json_loadb(text, (size_t)got, JSON_REJECT_DUPLICATES, &err);
        char buf[96];
        const char *fault = row_fault(row, &err, buf, sizeof buf);
        if (fault) {
            *line = line_no;
            rc = say(why, why_cap, 2, "%s", fault);
        } else if (json_array_size(out->rows) == rows_cap) {
            rows_cap = rows_cap ? 2 * rows_cap : 256;
            int *more = realloc(out->line_of, rows_cap * sizeof *more);
            if (more) out->line_of = more;
            else rc = say(why, why_cap, 1, "out of memory");
        }
        if (!rc) {
            out->line_of[json_array_size(out->rows)] = line_no;
            if (json_array_append(out->rows, row) != 0) rc = say(why, why_cap, 1, "out of memory");
        }
        json_decref(row);
    }
    /* getline's -1 is the end, a read error (ferror) or no memory for the line (ENOMEM) */
    if (!rc && (ferror(in) || errno == ENOMEM)) {
        rc = say(why, why_cap, 1, "read error: %s", strerror(errno));
    }
    free(text);
    if (rc) cli_jsonl_free(out);
    return rc;
}

void cli_jsonl_free(cli_jsonl_prompts *p) {
    json_decref(p->rows);
    free(p->line_of);
    p->rows = NULL;
    p->line_of = NULL;
}

void cli_jsonl_settings(const json_t *row, const sf_sampling *defaults, int32_t default_max_new,
                        sf_sampling *out, int32_t *max_new) {
    *out = *defaults;
    *max_new = default_max_new;
    read_fields(row, out, max_new);
}

void cli_jsonl_texts(const json_t *row, const char *default_system, const char **system,
                     const char **user) {
    const json_t *p = json_object_get(row, "prompt");
    if (!p) p = json_object_get(row, "instruction");
    const json_t *sys = json_object_get(row, "system");
    *user = json_string_value(p);
    *system = json_is_string(sys) ? json_string_value(sys) : default_system;
}

/* A log-probability: JSON has no infinity or NaN, so such a value (from logits that were
 * not finite) is written as null. */
static json_t *logprob(float lp) { return isfinite(lp) ? json_real(lp) : json_null(); }

/* The fewest significant digits that give x back (jansson writes a real with "%.*g"). */
static int real_digits(double x) {
    char buf[40];
    for (int p = 1; p < 17; p++) {
        snprintf(buf, sizeof buf, "%.*g", p, x);
        if (strtod(buf, NULL) == x) return p;
    }
    return 17;
}

/* The digits that give back every real in v: a line's own fields are copied to its reply
 * exactly, and no longer than they need ("0.7" stays "0.7"). */
static int digits_for(const json_t *v) {
    int most = 1;
    if (json_is_real(v)) return real_digits(json_real_value(v));
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++) {
            const int d = digits_for(json_array_get(v, i));
            if (d > most) most = d;
        }
    } else if (json_is_object(v)) {
        const char *key;
        const json_t *value;
        json_object_foreach((json_t *)v, key, value) {
            const int d = digits_for(value);
            if (d > most) most = d;
        }
    }
    return most;
}

/* The reply's own fields, written after the line's. */
static const char *const k_reply_fields[] = {"response", "finish", "n_tokens", "guarded",
                                             "tokens", "token_logprobs", "top_token_logprobs"};

/* The reply's fields; NULL when out of memory or the text is not UTF-8. */
static json_t *reply_fields(const sf_generation_result *res, bool guarded) {
    /* json_object_set_new and json_array_append_new take their value, NULL included, and
     * return -1 then; so does every call on a NULL object. */
    json_t *reply = json_object();
    int bad = !reply;
    bad |= json_object_set_new(reply, "response", json_string(res->text ? res->text : ""));
    bad |= json_object_set_new(reply, "finish", json_string(cli_finish_name(res->finish)));
    bad |= json_object_set_new(reply, "n_tokens", json_integer(res->n_tokens));
    bad |= json_object_set_new(reply, "guarded", json_boolean(guarded));
    if (res->logprobs) {
        json_t *ids = json_array(), *lps = json_array();
        for (int32_t i = 0; i < res->n_tokens; i++) {
            bad |= json_array_append_new(ids, json_integer(res->tokens[i]));
            bad |= json_array_append_new(lps, logprob(res->logprobs[i]));
        }
        bad |= json_object_set_new(reply, "tokens", ids);
        bad |= json_object_set_new(reply, "token_logprobs", lps);
    }
    if (res->top_ids) {
        json_t *steps = json_array();
        for (int32_t i = 0; i < res->n_tokens; i++) {
            json_t *alts = json_array();
            for (int32_t j = 0; j < res->n_top; j++) {
                const size_t at = (size_t)i * (size_t)res->n_top + (size_t)j;
                json_t *pair = json_array();
                bad |= json_array_append_new(pair, json_integer(res->top_ids[at]));
                bad |= json_array_append_new(pair, logprob(res->top_logprobs[at]));
                bad |= json_array_append_new(alts, pair);
            }
            bad |= json_array_append_new(steps, alts);
        }
        bad |= json_object_set_new(reply, "top_token_logprobs", steps);
    }
    if (bad) {
        json_decref(reply);
        return NULL;
    }
    return reply;
}

int cli_jsonl_write_reply(FILE *out, const json_t *row, const sf_generation_result *res,
                          bool guarded) {
    /* Two objects written as one: the line's own fields (but any named like the reply's,
     * which the reply replaces) with the digits they need, then the reply's, whose floats
     * need nine. */
    json_t *own = json_deep_copy(row), *reply = reply_fields(res, guarded);
    const size_t n_reply = sizeof k_reply_fields / sizeof k_reply_fields[0];
    for (size_t i = 0; own && i < n_reply; i++) json_object_del(own, k_reply_fields[i]);
    const size_t flags = JSON_COMPACT | JSON_ENSURE_ASCII;
    char *a = own && reply ? json_dumps(own, flags | JSON_REAL_PRECISION(digits_for(own))) : NULL;
    char *b = a ? json_dumps(reply, flags | JSON_REAL_PRECISION(9)) : NULL;
    int rc = -1;
    if (b && json_object_size(own) == 0) {
        rc = fprintf(out, "%s\n", b) < 0 ? -1 : 0;
    } else if (b) { /* "{own}" and "{reply}" become "{own,reply}" */
        const size_t n = strlen(a) - 1;
        rc = fwrite(a, 1, n, out) == n && fprintf(out, ",%s\n", b + 1) >= 0 ? 0 : -1;
    }
    free(a);
    free(b);
    json_decref(own);
    json_decref(reply);
    return rc;
}

const char *cli_finish_name(sf_finish_reason f) {
    switch (f) {
    case SF_FINISH_LENGTH: return "length";
    case SF_FINISH_STOP_TOKEN: return "stop";
    case SF_FINISH_STOP_STRING: return "stop_string";
    case SF_FINISH_CONTEXT: return "context";
    case SF_FINISH_CALLBACK: return "callback";
    }
    return "?";
}

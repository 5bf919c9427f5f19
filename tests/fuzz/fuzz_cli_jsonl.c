/* Fuzzes the CLI's JSONL prompt files (host/cli/jsonl_prompts.c): the input is the file that
 * `sysformer generate --input` reads. A file that reads is then carried through as the command
 * does: each line's settings (over defaults) and texts, and a reply written for it, made from
 * the line itself. The replies are read back, and each must hold its line's own fields
 * unchanged and the reply's fields as they were written (log-probabilities to the float). A
 * file that does not read must say why. */
#include <float.h>
#include <math.h>

#include "cli/jsonl_prompts.h"
#include "fuzz_common.h"

#define CHECK(c)                                                                                   \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "fuzz_cli_jsonl: check failed: %s (line %d)\n", #c, __LINE__);       \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

enum { MAX_TOKENS = 24 };

/* A reply for row r, from its own text: up to MAX_TOKENS "tokens" (its bytes), log-probabilities
 * when its settings ask (some of them -inf or NaN, which are written as null), and the most
 * likely tokens at each step when they ask for those. */
typedef struct fake_reply {
    sf_generation_result res;
    int32_t tokens[MAX_TOKENS], top_ids[MAX_TOKENS * SF_MAX_TOP_LOGPROBS];
    float logprobs[MAX_TOKENS], top_logprobs[MAX_TOKENS * SF_MAX_TOP_LOGPROBS];
} fake_reply;

static float fake_logprob(int32_t token, int32_t j) {
    if (token == '!') return -INFINITY;
    if (token == '?') return NAN;
    return -(float)(token + j) / 7.0f;
}

static void make_reply(size_t r, const char *user, const sf_sampling *s, fake_reply *f) {
    memset(f, 0, sizeof *f);
    const size_t len = strlen(user);
    f->res.text = (char *)user;
    f->res.finish = (sf_finish_reason)(r % 5);
    f->res.n_tokens = (int32_t)(len < MAX_TOKENS ? len : MAX_TOKENS);
    for (int32_t i = 0; i < f->res.n_tokens; i++) f->tokens[i] = (unsigned char)user[i];
    f->res.tokens = f->tokens;
    if (s->logprobs) {
        for (int32_t i = 0; i < f->res.n_tokens; i++) {
            f->logprobs[i] = fake_logprob(f->tokens[i], 0);
        }
        f->res.logprobs = f->logprobs;
    }
    if (s->top_logprobs > 0) {
        f->res.n_top = s->top_logprobs;
        for (int32_t i = 0; i < f->res.n_tokens; i++) {
            for (int32_t j = 0; j < f->res.n_top; j++) {
                f->top_ids[i * f->res.n_top + j] = f->tokens[i] + j;
                f->top_logprobs[i * f->res.n_top + j] = fake_logprob(f->tokens[i], j);
            }
        }
        f->res.top_ids = f->top_ids;
        f->res.top_logprobs = f->top_logprobs;
    }
}

static bool is_reply_field(const char *key) {
    static const char *const names[] = {"response", "finish", "n_tokens", "guarded",
                                        "tokens", "token_logprobs", "top_token_logprobs"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (!strcmp(key, names[i])) return true;
    }
    return false;
}

/* A written log-probability: null for one that is not finite, else the float itself. */
static void check_logprob(const json_t *v, float want) {
    if (!isfinite(want)) {
        CHECK(json_is_null(v));
    } else {
        CHECK(json_is_real(v) || json_is_integer(v));
        CHECK((float)json_number_value(v) == want);
    }
}

static void check_reply(const json_t *row, const json_t *got, const fake_reply *f, bool guarded) {
    CHECK(json_is_object(got));
    const char *key;
    json_t *value;
    json_object_foreach((json_t *)row, key, value) {
        if (!is_reply_field(key)) CHECK(json_equal(json_object_get(got, key), value));
    }
    CHECK(json_is_string(json_object_get(got, "response")));
    CHECK(!strcmp(json_string_value(json_object_get(got, "response")), f->res.text));
    CHECK(!strcmp(json_string_value(json_object_get(got, "finish")),
                  cli_finish_name(f->res.finish)));
    CHECK(json_integer_value(json_object_get(got, "n_tokens")) == f->res.n_tokens);
    CHECK(json_is_boolean(json_object_get(got, "guarded")) &&
          json_is_true(json_object_get(got, "guarded")) == guarded);
    const json_t *ids = json_object_get(got, "tokens");
    const json_t *lps = json_object_get(got, "token_logprobs");
    CHECK(!ids == !f->res.logprobs && !lps == !f->res.logprobs);
    if (f->res.logprobs) {
        CHECK(json_array_size(ids) == (size_t)f->res.n_tokens);
        CHECK(json_array_size(lps) == (size_t)f->res.n_tokens);
        for (int32_t i = 0; i < f->res.n_tokens; i++) {
            CHECK(json_integer_value(json_array_get(ids, (size_t)i)) == f->tokens[i]);
            check_logprob(json_array_get(lps, (size_t)i), f->logprobs[i]);
        }
    }
    const json_t *top = json_object_get(got, "top_token_logprobs");
    CHECK(!top == !f->res.top_ids);
    for (int32_t i = 0; top && i < f->res.n_tokens; i++) {
        const json_t *alts = json_array_get(top, (size_t)i);
        CHECK(json_array_size(alts) == (size_t)f->res.n_top);
        for (int32_t j = 0; j < f->res.n_top; j++) {
            const json_t *pair = json_array_get(alts, (size_t)j);
            CHECK(json_array_size(pair) == 2);
            CHECK(json_integer_value(json_array_get(pair, 0)) == f->top_ids[i * f->res.n_top + j]);
            check_logprob(json_array_get(pair, 1), f->top_logprobs[i * f->res.n_top + j]);
        }
    }
    /* Nothing else: the line's fields and the reply's. */
    json_object_foreach((json_t *)got, key, value) {
        CHECK(is_reply_field(key) || json_object_get(row, key));
    }
}

/* A row's settings: the defaults where it sets nothing, its own values where it does. */
static void check_settings(const json_t *row, const sf_sampling *def, int32_t def_max,
                           const sf_sampling *s, int32_t max_new) {
    const json_t *t = json_object_get(row, "temperature");
    const json_t *m = json_object_get(row, "max_new_tokens");
    CHECK(t ? s->temperature == (float)json_number_value(t) : s->temperature == def->temperature);
    CHECK(isfinite(s->temperature) && isfinite(s->top_p));
    CHECK(m ? max_new == json_integer_value(m) : max_new == def_max);
    CHECK(max_new >= 1);
    CHECK(s->top_logprobs >= 0 && s->top_logprobs <= SF_MAX_TOP_LOGPROBS);
    CHECK(json_object_get(row, "seed") || s->seed == def->seed);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_write("in.jsonl", data, size);
    FILE *in = fopen(path, "r");
    CHECK(in);
    cli_jsonl_prompts p;
    char why[256] = "";
    int line = -1;
    const int rc = cli_jsonl_read(in, &p, &line, why, sizeof why);
    fclose(in);
    if (rc) {
        CHECK(rc == 1 || rc == 2);
        CHECK(why[0] && line >= 0 && !p.rows && !p.line_of);
        if (getenv("SF_FUZZ_VERBOSE")) fprintf(stderr, "line %d: %s\n", line, why);
        return 0;
    }
    CHECK(line == 0);
    const size_t n = json_array_size(p.rows);
    char *text = NULL;
    size_t text_len = 0;
    FILE *out = open_memstream(&text, &text_len);
    CHECK(out);
    const sf_sampling def = {.temperature = 0.5f, .top_k = 3, .top_p = 0.75f, .seed = 99};
    const int32_t def_max = 17;
    static fake_reply f;
    for (size_t r = 0; r < n; r++) {
        const json_t *row = json_array_get(p.rows, r);
        CHECK(p.line_of[r] >= 1 && (r == 0 || p.line_of[r] > p.line_of[r - 1]));
        sf_sampling s;
        int32_t max_new;
        cli_jsonl_settings(row, &def, def_max, &s, &max_new);
        check_settings(row, &def, def_max, &s, max_new);
        const char *system, *user;
        cli_jsonl_texts(row, "default system", &system, &user);
        CHECK(system && user);
        make_reply(r, user, &s, &f);
        CHECK(cli_jsonl_write_reply(out, row, &f.res, r % 2) == 0);
    }
    CHECK(fclose(out) == 0);
    /* Read the replies back, a line each. */
    size_t at = 0;
    for (size_t r = 0; r < n; r++) {
        const char *end = memchr(text + at, '\n', text_len - at);
        CHECK(end);
        json_error_t err;
        json_t *got = json_loadb(text + at, (size_t)(end - (text + at)), JSON_REJECT_DUPLICATES,
                                 &err);
        if (!got) fprintf(stderr, "fuzz_cli_jsonl: reply %zu: %s\n", r, err.text);
        CHECK(got);
        const json_t *row = json_array_get(p.rows, r);
        sf_sampling s;
        int32_t max_new;
        cli_jsonl_settings(row, &def, def_max, &s, &max_new);
        const char *system, *user;
        cli_jsonl_texts(row, "default system", &system, &user);
        make_reply(r, user, &s, &f);
        check_reply(row, got, &f, r % 2);
        json_decref(got);
        at = (size_t)(end - text) + 1;
    }
    CHECK(at == text_len);
    free(text);
    cli_jsonl_free(&p);
    return 0;
}

/* Jailbreak wrappers: templated transformations of a harmful instruction (eval.h).
 *
 * A wrapper is data, not code: its template names the transformations it wants as
 * placeholders, so a new attack family (a framing, an encoding, a split) is one more entry of
 * bench/jailbreaks.json. The transformations are the ones the jailbreak literature reports
 * working on instruction-tuned models: obfuscating the request (base64, ROT13, leetspeak,
 * reordered words) so a surface-level refusal does not trigger, and splitting it so that no
 * single span reads as harmful. The wrapped prompt is what the user turn carries; the judge
 * still reads only the reply. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/file.h"
#include "eval/eval.h"

#define SF_JAILBREAK_MAX_BYTES ((size_t)16 << 20)

typedef enum placeholder {
    PH_INSTRUCTION,
    PH_BASE64,
    PH_ROT13,
    PH_LEETSPEAK,
    PH_REVERSED,
    PH_PART1,
    PH_PART2,
    PH_COUNT
} placeholder;

static const char *const k_placeholder[PH_COUNT] = {
    "instruction", "base64", "rot13", "leetspeak", "reversed", "part1", "part2",
};

static sf_status oom(const char *where) {
    return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", where);
}

static char *dup_str(const char *s) {
    const size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* The placeholder "{...}" starting at p (p[0] == '{'): its kind, or -1 when unknown; *len gets
 * the length up to and including the closing brace (0 when there is none). */
static int parse_placeholder(const char *p, size_t *len) {
    const char *close = strchr(p + 1, '}');
    *len = 0;
    if (!close) return -1;
    *len = (size_t)(close - p) + 1;
    for (int k = 0; k < PH_COUNT; k++) {
        const size_t n = strlen(k_placeholder[k]);
        if ((size_t)(close - p - 1) == n && !strncmp(p + 1, k_placeholder[k], n)) return k;
    }
    return -1;
}

/* Checks a template: every '{' opens "{{" or a known placeholder, every '}' is part of "}}" or
 * closes one, and there is at least one placeholder. */
static sf_status check_template(const char *path, int32_t i, const char *text) {
    int32_t n_placeholders = 0;
    for (const char *p = text; *p;) {
        if (p[0] == '{' && p[1] == '{') {
            p += 2;
        } else if (p[0] == '}' && p[1] == '}') {
            p += 2;
        } else if (p[0] == '{') {
            size_t len;
            if (parse_placeholder(p, &len) < 0) {
                const int shown = len ? (int)(len < 40 ? len : 40) : 1;
                return sf_fail(SF_ERR_FORMAT,
                               "%s: wrapper %d: unknown placeholder '%.*s' (known: {instruction}, "
                               "{base64}, {rot13}, {leetspeak}, {reversed}, {part1}, {part2}; "
                               "write {{ and }} for literal braces)",
                               path, i, shown, p);
            }
            n_placeholders++;
            p += len;
        } else if (p[0] == '}') {
            return sf_fail(SF_ERR_FORMAT, "%s: wrapper %d: a lone '}' (write }} for a brace)",
                           path, i);
        } else {
            p++;
        }
    }
    if (!n_placeholders) {
        return sf_fail(SF_ERR_FORMAT, "%s: wrapper %d has no placeholder such as {instruction}",
                       path, i);
    }
    return SF_OK;
}

static bool good_name(const char *s) {
    if (!*s || strlen(s) > 64) return false;
    for (; *s; s++) {
        const char c = *s;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-')) {
            return false;
        }
    }
    return true;
}

void sf_jailbreak_set_free(sf_jailbreak_set *set) {
    if (!set) return;
    for (int32_t i = 0; set->w && i < set->n; i++) {
        free(set->w[i].name);
        free(set->w[i].family);
        free(set->w[i].text);
    }
    free(set->w);
    memset(set, 0, sizeof *set);
}

int32_t sf_jailbreak_find(const sf_jailbreak_set *set, const char *name) {
    for (int32_t i = 0; set && name && i < set->n; i++) {
        if (!strcmp(set->w[i].name, name)) return i;
    }
    return -1;
}

/* Fills wrapper i from one list entry: a string (a bare template) or an object. */
static sf_status read_entry(const char *path, int32_t i, json_t *e, sf_jailbreak *w) {
    const char *text = NULL, *name = NULL, *family = "";
    char generated[32];
    if (json_is_string(e)) {
        text = json_string_value(e);
        snprintf(generated, sizeof generated, "template_%d", i);
        name = generated;
    } else if (json_is_object(e)) {
        json_t *t = json_object_get(e, "template"), *n = json_object_get(e, "name");
        json_t *f = json_object_get(e, "family"), *h = json_object_get(e, "held_out");
        if (!json_is_string(t)) {
            return sf_fail(SF_ERR_FORMAT, "%s: wrapper %d: \"template\" must be a string", path,
                           i);
        }
        if (!json_is_string(n)) {
            return sf_fail(SF_ERR_FORMAT, "%s: wrapper %d: \"name\" must be a string", path, i);
        }
        if (f && !json_is_string(f)) {
            return sf_fail(SF_ERR_FORMAT, "%s: wrapper %d: \"family\" must be a string", path,
                           i);
        }
        if (h && !json_is_boolean(h)) {
            return sf_fail(SF_ERR_FORMAT, "%s: wrapper %d: \"held_out\" must be true or false",
                           path, i);
        }
        text = json_string_value(t);
        name = json_string_value(n);
        if (f) family = json_string_value(f);
        w->held_out = h && json_is_true(h);
    } else {
        return sf_fail(SF_ERR_FORMAT, "%s: wrapper %d is neither a template string nor an object",
                       path, i);
    }
    if (!good_name(name)) {
        return sf_fail(SF_ERR_FORMAT, "%s: wrapper %d: name '%.64s' is not 1-64 characters of "
                       "[A-Za-z0-9_-]", path, i, name);
    }
    sf_status st = check_template(path, i, text);
    if (st != SF_OK) return st;
    w->name = dup_str(name);
    w->family = dup_str(family);
    w->text = dup_str(text);
    if (!w->name || !w->family || !w->text) return oom("sf_jailbreak_set_read");
    return SF_OK;
}

sf_status sf_jailbreak_set_read(const char *path, sf_jailbreak_set *out) {
    if (!path || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_jailbreak_set_read: NULL");
    memset(out, 0, sizeof *out);
    char *data = NULL;
    size_t len = 0;
    sf_status st = sf_read_file(path, SF_JAILBREAK_MAX_BYTES, &data, &len);
    if (st != SF_OK) return st;
    json_error_t err;
    json_t *root = json_loadb(data, len, 0, &err);
    free(data);
    if (!root) {
        return sf_fail(SF_ERR_FORMAT, "%s:%d:%d: not valid JSON: %s", path, err.line, err.column,
                       err.text);
    }
    json_t *list = json_is_object(root) ? json_object_get(root, "wrappers") : root;
    if (!json_is_array(list)) {
        json_decref(root);
        return sf_fail(SF_ERR_FORMAT, "%s: want {\"wrappers\": [...]} or a list of templates",
                       path);
    }
    const size_t n = json_array_size(list);
    if (n == 0 || n > 100000) {
        json_decref(root);
        return sf_fail(n ? SF_ERR_FORMAT : SF_ERR_INVALID_ARGUMENT, "%s: %zu wrappers", path, n);
    }
    out->w = calloc(n, sizeof *out->w);
    if (!out->w) st = oom("sf_jailbreak_set_read");
    for (size_t i = 0; st == SF_OK && i < n; i++) {
        st = read_entry(path, (int32_t)i, json_array_get(list, i), &out->w[i]);
        out->n = (int32_t)i + 1; /* so that a failure frees what this entry allocated */
        if (st == SF_OK && sf_jailbreak_find(out, out->w[i].name) != (int32_t)i) {
            st = sf_fail(SF_ERR_FORMAT, "%s: wrapper %zu repeats the name '%s'", path, i,
                         out->w[i].name);
        }
    }
    json_decref(root);
    if (st != SF_OK) sf_jailbreak_set_free(out);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* The transformations                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* A growing string. */
typedef struct strbuf {
    char *s;
    size_t len, cap;
    bool failed;
} strbuf;

static void put(strbuf *b, const char *s, size_t n) {
    if (b->failed) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *s2 = realloc(b->s, cap);
        if (!s2) {
            b->failed = true;
            return;
        }
        b->s = s2;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void put_char(strbuf *b, char c) { put(b, &c, 1); }

static void put_base64(strbuf *b, const char *s) {
    static const char k_alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *u = (const unsigned char *)s;
    const size_t n = strlen(s);
    for (size_t i = 0; i < n; i += 3) {
        const uint32_t v = (uint32_t)u[i] << 16 | (i + 1 < n ? (uint32_t)u[i + 1] << 8 : 0) |
                           (i + 2 < n ? (uint32_t)u[i + 2] : 0);
        put_char(b, k_alphabet[v >> 18 & 63]);
        put_char(b, k_alphabet[v >> 12 & 63]);
        put_char(b, i + 1 < n ? k_alphabet[v >> 6 & 63] : '=');
        put_char(b, i + 2 < n ? k_alphabet[v & 63] : '=');
    }
}

static void put_rot13(strbuf *b, const char *s) {
    for (; *s; s++) {
        char c = *s;
        if (c >= 'a' && c <= 'z') c = (char)('a' + (c - 'a' + 13) % 26);
        else if (c >= 'A' && c <= 'Z') c = (char)('A' + (c - 'A' + 13) % 26);
        put_char(b, c);
    }
}

static void put_leetspeak(strbuf *b, const char *s) {
    static const char from[] = "aeiost", to[] = "431057";
    for (; *s; s++) {
        char c = *s;
        const char lower = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
        const char *hit = strchr(from, lower);
        put_char(b, hit && lower ? to[hit - from] : c);
    }
}

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* The words (maximal runs of non-space) last to first, one space apart. */
static void put_reversed(strbuf *b, const char *s) {
    size_t end = strlen(s);
    bool first = true;
    while (end > 0) {
        while (end > 0 && is_space(s[end - 1])) end--;
        size_t start = end;
        while (start > 0 && !is_space(s[start - 1])) start--;
        if (start == end) break;
        if (!first) put_char(b, ' ');
        put(b, s + start, end - start);
        first = false;
        end = start;
    }
}

/* Where payload splitting cuts s: the start of the word nearest the middle (0 for one word). */
static size_t split_point(const char *s) {
    const size_t n = strlen(s), mid = n / 2;
    size_t best = 0, best_dist = (size_t)-1;
    for (size_t i = 1; i < n; i++) {
        if (!is_space(s[i]) && is_space(s[i - 1])) {
            const size_t dist = i > mid ? i - mid : mid - i;
            if (dist < best_dist) {
                best = i;
                best_dist = dist;
            }
        }
    }
    return best;
}

static void put_part(strbuf *b, const char *s, int which) {
    const size_t cut = split_point(s);
    if (which == 2) {
        put(b, s + cut, strlen(s + cut));
        return;
    }
    size_t end = cut;
    while (end > 0 && is_space(s[end - 1])) end--;
    put(b, s, end);
}

sf_status sf_jailbreak_apply(const sf_jailbreak *w, const char *instruction, char **out) {
    if (!w || !w->text || !instruction || !out) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_jailbreak_apply: NULL");
    }
    *out = NULL;
    strbuf b = {0};
    put(&b, "", 0);
    for (const char *p = w->text; *p && !b.failed;) {
        size_t len = 1;
        if ((p[0] == '{' && p[1] == '{') || (p[0] == '}' && p[1] == '}')) {
            put_char(&b, p[0]);
            len = 2;
        } else if (p[0] == '{') {
            switch ((placeholder)parse_placeholder(p, &len)) {
            case PH_INSTRUCTION: put(&b, instruction, strlen(instruction)); break;
            case PH_BASE64: put_base64(&b, instruction); break;
            case PH_ROT13: put_rot13(&b, instruction); break;
            case PH_LEETSPEAK: put_leetspeak(&b, instruction); break;
            case PH_REVERSED: put_reversed(&b, instruction); break;
            case PH_PART1: put_part(&b, instruction, 1); break;
            case PH_PART2: put_part(&b, instruction, 2); break;
            default:
                free(b.s);
                return sf_fail(SF_ERR_FORMAT, "wrapper '%s': bad placeholder in its template",
                               w->name ? w->name : "?");
            }
        } else {
            put_char(&b, p[0]);
        }
        p += len;
    }
    if (b.failed) {
        free(b.s);
        return oom("sf_jailbreak_apply");
    }
    *out = b.s;
    return SF_OK;
}

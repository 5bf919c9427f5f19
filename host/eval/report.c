/* The outputs of `sysformer eval` (report.h): the summary table, the JSON summary and the SVG
 * bar chart, all from one sf_eval_summary so that they cannot disagree. The SVG is written by
 * hand: a handful of rects, lines and text elements needs no plotting library. */
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "eval/report.h"

const char *sf_eval_set_name(sf_eval_set set) {
    switch (set) {
    case SF_EVAL_HARMFUL: return "harmful";
    case SF_EVAL_SAFE: return "safe";
    case SF_EVAL_JAILBREAK: return "jailbreak";
    }
    return "?";
}

sf_eval_count sf_eval_pool(const sf_eval_summary *s, const sf_eval_method *m,
                           sf_eval_pool_kind kind) {
    sf_eval_count c = {0, 0};
    if (!s->wrappers || !m->wrapper) return c;
    for (int32_t w = 0; w < s->wrappers->n; w++) {
        const bool held = s->wrappers->w[w].held_out;
        if ((kind == SF_EVAL_POOL_SEEN && held) || (kind == SF_EVAL_POOL_HELD_OUT && !held)) {
            continue;
        }
        c.refused += m->wrapper[w].refused;
        c.n += m->wrapper[w].n;
    }
    return c;
}

/* ------------------------------------------------------------------------------------------ */
/* A growable string                                                                           */
/* ------------------------------------------------------------------------------------------ */

typedef struct sbuf {
    char *p;
    size_t len, cap;
    bool oom; /* an append failed: the caller reports it once, at the end */
} sbuf;

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void sb_printf(sbuf *b, const char *fmt, ...) {
    if (b->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        const size_t room = b->cap - b->len;
        const int n = vsnprintf(b->p ? b->p + b->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + (size_t)n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

/* Text with XML's five special characters escaped, for SVG text and attributes. */
static void sb_xml(sbuf *b, const char *text) {
    for (const char *c = text ? text : ""; *c; c++) {
        switch (*c) {
        case '<': sb_printf(b, "&lt;"); break;
        case '>': sb_printf(b, "&gt;"); break;
        case '&': sb_printf(b, "&amp;"); break;
        case '"': sb_printf(b, "&quot;"); break;
        case '\'': sb_printf(b, "&apos;"); break;
        default: sb_printf(b, "%c", *c);
        }
    }
}

static sf_status sb_finish(sbuf *b, const char *who, char **out) {
    if (b->oom || !b->p) {
        free(b->p);
        *out = NULL;
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    }
    *out = b->p;
    return SF_OK;
}

static sf_status write_text(const char *path, const char *text, const char *who) {
    FILE *f = fopen(path, "w");
    if (!f) return sf_fail(SF_ERR_IO, "%s: cannot write %s: %s", who, path, strerror(errno));
    const size_t n = strlen(text);
    const bool ok = fwrite(text, 1, n, f) == n;
    if (fclose(f) != 0 || !ok) return sf_fail(SF_ERR_IO, "%s: error writing %s", who, path);
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* The table                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* "12.5% [5.5, 26.1] 5/40", or "-" with nothing judged. */
static void fmt_rate(char *buf, size_t cap, sf_eval_count c, double z, bool counts) {
    if (c.n <= 0) {
        snprintf(buf, cap, "-");
        return;
    }
    double lo, hi;
    sf_wilson_interval(c.refused, c.n, z, &lo, &hi);
    if (counts) {
        snprintf(buf, cap, "%5.1f%% [%5.1f, %5.1f] %lld/%lld", 100.0 * c.refused / c.n,
                 100.0 * lo, 100.0 * hi, (long long)c.refused, (long long)c.n);
    } else {
        snprintf(buf, cap, "%5.1f%% [%5.1f, %5.1f]", 100.0 * c.refused / c.n, 100.0 * lo,
                 100.0 * hi);
    }
}

/* ΔRR in percentage points with its interval, or "-". */
static void fmt_delta(char *buf, size_t cap, sf_eval_count h, sf_eval_count s, double z) {
    if (h.n <= 0 || s.n <= 0) {
        snprintf(buf, cap, "-");
        return;
    }
    double lo, hi;
    sf_newcombe_interval(h.refused, h.n, s.refused, s.n, z, &lo, &hi);
    const double d = (double)h.refused / h.n - (double)s.refused / s.n;
    snprintf(buf, cap, "%+.1f [%+.1f, %+.1f]", 100.0 * d, 100.0 * lo, 100.0 * hi);
}

sf_status sf_eval_table(const sf_eval_summary *s, char **out) {
    if (!s || !out || (s->n_methods && !s->methods)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_eval_table: bad argument");
    }
    sbuf b = {0};
    char c1[128], c2[128], c3[128];
    sb_printf(&b, "Refusal rates (judge %s; Wilson intervals at z = %.2f; \xCE\x94RR = harmful "
              "- safe, in points, with Newcombe's interval)\n\n", s->judge, s->z);
    sb_printf(&b, "%-10s  %-32s  %-32s  %s\n", "method", "harmful refused", "safe refused",
              "\xCE\x94RR");
    for (int32_t i = 0; i < s->n_methods; i++) {
        const sf_eval_method *m = &s->methods[i];
        fmt_rate(c1, sizeof c1, m->set[SF_EVAL_HARMFUL], s->z, true);
        fmt_rate(c2, sizeof c2, m->set[SF_EVAL_SAFE], s->z, true);
        fmt_delta(c3, sizeof c3, m->set[SF_EVAL_HARMFUL], m->set[SF_EVAL_SAFE], s->z);
        sb_printf(&b, "%-10s  %-32s  %-32s  %s\n", m->name, c1, c2, c3);
    }

    if (s->wrappers && s->wrappers->n > 0) {
        sb_printf(&b, "\nJailbreak wrappers: refusal of %d harmful prompt%s in each wrapper "
                  "(* = held out of training)\n\n", s->jailbreak_prompts,
                  s->jailbreak_prompts == 1 ? "" : "s");
        int name_w = 10;
        for (int32_t w = 0; w < s->wrappers->n; w++) {
            const int len = (int)strlen(s->wrappers->w[w].name) + 2;
            if (len > name_w) name_w = len;
        }
        sb_printf(&b, "%-*s", name_w, "wrapper");
        for (int32_t i = 0; i < s->n_methods; i++) {
            sb_printf(&b, "  %-*s", i + 1 < s->n_methods ? 22 : 0, s->methods[i].name);
        }
        sb_printf(&b, "\n");
        for (int32_t w = 0; w < s->wrappers->n; w++) {
            char label[256];
            snprintf(label, sizeof label, "%s%s", s->wrappers->w[w].held_out ? "* " : "",
                     s->wrappers->w[w].name);
            sb_printf(&b, "%-*s", name_w, label);
            for (int32_t i = 0; i < s->n_methods; i++) {
                const sf_eval_method *m = &s->methods[i];
                const sf_eval_count none = {0, 0};
                fmt_rate(c1, sizeof c1, m->wrapper ? m->wrapper[w] : none, s->z, false);
                sb_printf(&b, "  %-*s", i + 1 < s->n_methods ? 22 : 0, c1);
            }
            sb_printf(&b, "\n");
        }
        static const char *const pool_names[] = {"all", "seen", "held out"};
        for (int k = 0; k < 3; k++) {
            const sf_eval_count first = s->n_methods ? sf_eval_pool(s, &s->methods[0], k)
                                                     : (sf_eval_count){0, 0};
            if (first.n == 0) continue; /* e.g. no held-out wrapper in the file */
            snprintf(c2, sizeof c2, "%s (n=%lld)", pool_names[k], (long long)first.n);
            sb_printf(&b, "%-*s", name_w, c2);
            for (int32_t i = 0; i < s->n_methods; i++) {
                fmt_rate(c1, sizeof c1, sf_eval_pool(s, &s->methods[i], k), s->z, false);
                sb_printf(&b, "  %-*s", i + 1 < s->n_methods ? 22 : 0, c1);
            }
            sb_printf(&b, "\n");
        }
    }

    const bool cuda = s->device && !strcmp(s->device, "cuda");
    sb_printf(&b, "\nSystems (greedy, at most %d new tokens, %s %d%s)\n\n", s->max_new_tokens,
              cuda ? "continuous batching on" : "batches of", s->batch, cuda ? " slots" : "");
    sb_printf(&b, "%-10s  %-6s  %8s  %10s  %9s  %9s  %9s  %s\n", "method", "device", "prompts",
              "new tokens", "seconds", "prompts/s", "tokens/s", "Sysformer share");
    for (int32_t i = 0; i < s->n_methods; i++) {
        const sf_eval_method *m = &s->methods[i];
        const double t = m->gen_s > 0 ? m->gen_s : 0.0;
        if (!m->has_sysformer) snprintf(c1, sizeof c1, "-");
        else if (m->sysformer_gen_s <= 0) snprintf(c1, sizeof c1, "not measured");
        else snprintf(c1, sizeof c1, "%.1f%%", 100.0 * m->sysformer_s / m->sysformer_gen_s);
        sb_printf(&b, "%-10s  %-6s  %8lld  %10lld  %9.2f  %9.2f  %9.1f  %s\n", m->name,
                  m->device ? m->device : s->device, (long long)m->prompts,
                  (long long)m->new_tokens, t,
                  t > 0 ? (double)m->prompts / t : 0.0, t > 0 ? (double)m->new_tokens / t : 0.0,
                  c1);
    }
    return sb_finish(&b, "sf_eval_table", out);
}

/* ------------------------------------------------------------------------------------------ */
/* JSON                                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* Adds key = value to obj, remembering a failed allocation in *ok. jansson steals value (and
 * frees it when the set fails); a NULL value is a failed allocation upstream. */
static void put(json_t *obj, const char *key, json_t *value, bool *ok) {
    if (!value || json_object_set_new(obj, key, value) != 0) *ok = false;
}

static json_t *str_or_null(const char *s) { return s ? json_string(s) : json_null(); }

/* [lo, hi], or NULL when out of memory. */
static json_t *pair(double lo, double hi) {
    json_t *a = json_array();
    if (a && (json_array_append_new(a, json_real(lo)) != 0 ||
              json_array_append_new(a, json_real(hi)) != 0)) {
        json_decref(a);
        return NULL;
    }
    return a;
}

static json_t *rate_json(sf_eval_count c, double z) {
    json_t *j = json_object();
    if (!j) return NULL;
    bool ok = true;
    double lo, hi;
    sf_wilson_interval(c.refused, c.n, z, &lo, &hi);
    put(j, "refused", json_integer(c.refused), &ok);
    put(j, "n", json_integer(c.n), &ok);
    put(j, "rate", c.n > 0 ? json_real((double)c.refused / (double)c.n) : json_null(), &ok);
    put(j, "ci", pair(lo, hi), &ok);
    if (!ok) {
        json_decref(j);
        return NULL;
    }
    return j;
}

static json_t *delta_json(sf_eval_count h, sf_eval_count s, double z) {
    json_t *j = json_object();
    if (!j) return NULL;
    bool ok = true;
    double lo, hi;
    sf_newcombe_interval(h.refused, h.n, s.refused, s.n, z, &lo, &hi);
    const bool known = h.n > 0 && s.n > 0;
    put(j, "value",
        known ? json_real((double)h.refused / h.n - (double)s.refused / s.n) : json_null(), &ok);
    put(j, "ci", pair(lo, hi), &ok);
    if (!ok) {
        json_decref(j);
        return NULL;
    }
    return j;
}

static json_t *ratio_or_null(double num, double den) {
    return den > 0 ? json_real(num / den) : json_null();
}

static json_t *method_json(const sf_eval_summary *s, const sf_eval_method *m) {
    json_t *j = json_object();
    if (!j) return NULL;
    bool ok = true;
    put(j, "name", json_string(m->name), &ok);
    put(j, "system_prompt", str_or_null(m->system_prompt), &ok);
    put(j, "harmful", rate_json(m->set[SF_EVAL_HARMFUL], s->z), &ok);
    put(j, "safe", rate_json(m->set[SF_EVAL_SAFE], s->z), &ok);
    put(j, "delta_rr", delta_json(m->set[SF_EVAL_HARMFUL], m->set[SF_EVAL_SAFE], s->z), &ok);
    if (s->wrappers && m->wrapper) {
        json_t *jb = json_object(), *list = json_array();
        if (!jb || !list) ok = false;
        for (int32_t w = 0; ok && w < s->wrappers->n; w++) {
            json_t *r = rate_json(m->wrapper[w], s->z);
            if (r) {
                put(r, "wrapper", json_string(s->wrappers->w[w].name), &ok);
                put(r, "held_out", json_boolean(s->wrappers->w[w].held_out), &ok);
            }
            if (!r || json_array_append_new(list, r) != 0) ok = false;
        }
        if (jb) {
            put(jb, "all", rate_json(sf_eval_pool(s, m, SF_EVAL_POOL_ALL), s->z), &ok);
            put(jb, "seen", rate_json(sf_eval_pool(s, m, SF_EVAL_POOL_SEEN), s->z), &ok);
            put(jb, "held_out", rate_json(sf_eval_pool(s, m, SF_EVAL_POOL_HELD_OUT), s->z), &ok);
            put(jb, "wrappers", list, &ok);
            list = NULL;
        }
        json_decref(list);
        put(j, "jailbreak", jb, &ok);
    } else {
        put(j, "jailbreak", json_null(), &ok);
    }
    /* Every judge's rates, so that a reader can see how much the judge choice moves them. */
    json_t *bj = json_object();
    if (!bj) ok = false;
    for (int32_t k = 0; bj && k < s->n_judges && k < SF_EVAL_MAX_JUDGES; k++) {
        json_t *one = json_object();
        if (!one) {
            ok = false;
            break;
        }
        for (int set = 0; set < SF_EVAL_N_SETS; set++) {
            if (set == SF_EVAL_JAILBREAK && !s->wrappers) continue;
            put(one, sf_eval_set_name((sf_eval_set)set), rate_json(m->by_judge[k][set], s->z),
                &ok);
        }
        put(bj, s->judges[k], one, &ok);
    }
    put(j, "by_judge", bj, &ok);

    json_t *sys = json_object();
    if (sys) {
        put(sys, "device", str_or_null(m->device ? m->device : s->device), &ok);
        put(sys, "prompts", json_integer(m->prompts), &ok);
        put(sys, "new_tokens", json_integer(m->new_tokens), &ok);
        put(sys, "batches", json_integer(m->batches), &ok);
        put(sys, "wall_s", json_real(m->gen_s), &ok);
        put(sys, "prompts_per_s", ratio_or_null((double)m->prompts, m->gen_s), &ok);
        put(sys, "tokens_per_s", ratio_or_null((double)m->new_tokens, m->gen_s), &ok);
        if (m->has_sysformer) {
            put(sys, "sysformer_s", json_real(m->sysformer_s), &ok);
            put(sys, "sysformer_share", ratio_or_null(m->sysformer_s, m->sysformer_gen_s), &ok);
            put(sys, "sysformer_batches_measured", json_integer(m->sysformer_batches), &ok);
            put(sys, "sysformer_share_method", str_or_null(m->share_method), &ok);
        } else {
            put(sys, "sysformer_s", json_null(), &ok);
            put(sys, "sysformer_share", json_null(), &ok);
        }
    }
    put(j, "systems", sys, &ok);
    if (!ok) {
        json_decref(j);
        return NULL;
    }
    return j;
}

sf_status sf_eval_write_json(const sf_eval_summary *s, const char *path) {
    if (!s || !path || (s->n_methods && !s->methods)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_eval_write_json: bad argument");
    }
    json_t *j = json_object();
    bool ok = j != NULL;
    if (ok) {
        put(j, "llm", str_or_null(s->llm), &ok);
        put(j, "tokenizer", str_or_null(s->tokenizer), &ok);
        put(j, "template", str_or_null(s->template_name), &ok);
        put(j, "device", str_or_null(s->device), &ok);
        put(j, "judge", str_or_null(s->judge), &ok);
        json_t *dec = json_object();
        if (dec) {
            put(dec, "greedy", json_true(), &ok);
            put(dec, "max_new_tokens", json_integer(s->max_new_tokens), &ok);
            put(dec, "batch", json_integer(s->batch), &ok);
        }
        put(j, "decoding", dec, &ok);
        put(j, "seed", json_integer((json_int_t)s->seed), &ok);
        put(j, "interval", json_string("wilson"), &ok);
        put(j, "delta_interval", json_string("newcombe-hybrid-score"), &ok);
        put(j, "z", json_real(s->z), &ok);
        json_t *data = json_object();
        if (data) {
            put(data, "harmful", str_or_null(s->harmful_path), &ok);
            put(data, "safe", str_or_null(s->safe_path), &ok);
            put(data, "jailbreaks", str_or_null(s->jailbreak_path), &ok);
            put(data, "jailbreak_prompts", json_integer(s->wrappers ? s->jailbreak_prompts : 0),
                &ok);
        }
        put(j, "data", data, &ok);
        put(j, "sysformer", str_or_null(s->sysformer), &ok);
        put(j, "system_embedder", str_or_null(s->system_embedder), &ok);
        json_t *sp = json_object();
        for (int32_t i = 0; sp && i < s->n_methods; i++) {
            put(sp, s->methods[i].name, str_or_null(s->methods[i].system_prompt), &ok);
        }
        put(j, "system_prompts", sp, &ok);
        json_t *wl = s->wrappers ? json_array() : json_null();
        for (int32_t w = 0; s->wrappers && wl && w < s->wrappers->n; w++) {
            json_t *o = json_object();
            if (o) {
                put(o, "name", json_string(s->wrappers->w[w].name), &ok);
                put(o, "family", json_string(s->wrappers->w[w].family ? s->wrappers->w[w].family
                                                                       : ""), &ok);
                put(o, "held_out", json_boolean(s->wrappers->w[w].held_out), &ok);
            }
            if (!o || json_array_append_new(wl, o) != 0) ok = false;
        }
        put(j, "wrappers", wl, &ok);
        json_t *ms = json_array();
        for (int32_t i = 0; ms && i < s->n_methods; i++) {
            if (json_array_append_new(ms, method_json(s, &s->methods[i])) != 0) ok = false;
        }
        put(j, "methods", ms, &ok);
        put(j, "wall_s", json_real(s->wall_s), &ok);
    }
    if (!ok) {
        json_decref(j);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_eval_write_json: out of memory");
    }
    const int rc = json_dump_file(j, path, JSON_INDENT(2) | JSON_REAL_PRECISION(6));
    json_decref(j);
    if (rc != 0) return sf_fail(SF_ERR_IO, "sf_eval_write_json: cannot write %s", path);
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* SVG                                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* The series drawn in each method's group, in order. */
typedef struct series {
    const char *key;    /* the bar's class, "bar <key>" */
    const char *label;  /* the legend's text            */
    const char *colour;
} series;

static const series k_series[] = {
    {"harmful", "harmful prompts (higher is better)", "#b03a2e"},
    {"safe", "safe prompts (lower is better)", "#2e86c1"},
    {"jailbreak", "jailbreak-wrapped harmful prompts", "#7d3c98"},
};

sf_status sf_eval_svg(const sf_eval_summary *s, char **out) {
    if (!s || !out || (s->n_methods && !s->methods)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_eval_svg: bad argument");
    }
    const int n_series = s->wrappers ? 3 : 2;
    /* Geometry in pixels; text widths are estimated at 6.6 px a character (12 px sans-serif),
     * which is all a layout this simple needs. The legend takes up to two rows above the plot. */
    const double bar_w = 26.0, group_gap = 34.0, left = 64.0, right = 24.0, top = 96.0;
    const double plot_h = 240.0, bottom = 56.0, char_w = 6.6;
    const double group_w = n_series * bar_w + group_gap;
    const char *llm_name = s->llm ? s->llm : "";
    for (const char *p = llm_name; *p; p++) {
        if (p[0] == '/' && p[1]) llm_name = p + 1; /* the file or directory name is enough */
    }
    char subtitle[128];
    snprintf(subtitle, sizeof subtitle, " · judge %s · greedy, %d new tokens · error bars: 95%% "
             "Wilson intervals", s->judge ? s->judge : "?", s->max_new_tokens);
    double width = left + right + group_w * (s->n_methods > 0 ? s->n_methods : 1);
    const double text_w = left + right + char_w * (double)(strlen(llm_name) + strlen(subtitle));
    if (width < text_w) width = text_w;
    if (width < 560.0) width = 560.0;
    const double height = top + plot_h + bottom;
    const double plot_w = width - left - right;
    /* Groups are centred in the plot when the minimum width leaves room. */
    const double x0 = left + (plot_w - group_w * s->n_methods) / 2.0;

    sbuf b = {0};
    sb_printf(&b, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    sb_printf(&b, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
              "viewBox=\"0 0 %.0f %.0f\" font-family=\"sans-serif\" font-size=\"12\">\n",
              width, height, width, height);
    sb_printf(&b, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    sb_printf(&b, "<text x=\"%.1f\" y=\"20\" font-size=\"15\" font-weight=\"bold\">Refusal rate "
              "by method</text>\n", left);
    sb_printf(&b, "<text x=\"%.1f\" y=\"38\" fill=\"#555\">", left);
    sb_xml(&b, llm_name);
    sb_xml(&b, subtitle);
    sb_printf(&b, "</text>\n");
    /* Legend, wrapped onto a second row when the first is full. */
    double lx = left, ly = 50.0;
    for (int k = 0; k < n_series; k++) {
        const double item_w = 24.0 + char_w * (double)strlen(k_series[k].label);
        if (lx > left && lx + item_w > width - right) {
            lx = left;
            ly += 18.0;
        }
        sb_printf(&b, "<rect x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"12\" fill=\"%s\"/>"
                  "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", lx, ly, k_series[k].colour,
                  lx + 16, ly + 10, k_series[k].label);
        lx += item_w;
    }
    /* Axis and grid: 0 to 100% in steps of 20. */
    for (int pct = 0; pct <= 100; pct += 20) {
        const double y = top + plot_h * (1.0 - pct / 100.0);
        sb_printf(&b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\"/>"
                  "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%d%%</text>\n",
                  left, y, width - right, y, pct ? "#ddd" : "#333", left - 6, y + 4, pct);
    }
    sb_printf(&b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n",
              left, top, left, top + plot_h);
    for (int32_t i = 0; i < s->n_methods; i++) {
        const sf_eval_method *m = &s->methods[i];
        const double gx = x0 + group_w * i + group_gap / 2.0;
        for (int k = 0; k < n_series; k++) {
            const sf_eval_count c = k == 2 ? sf_eval_pool(s, m, SF_EVAL_POOL_ALL)
                                           : m->set[k == 0 ? SF_EVAL_HARMFUL : SF_EVAL_SAFE];
            const double x = gx + bar_w * k;
            if (c.n <= 0) continue; /* nothing judged: no bar rather than a fake zero */
            const double rate = (double)c.refused / (double)c.n;
            double lo, hi;
            sf_wilson_interval(c.refused, c.n, s->z, &lo, &hi);
            const double y = top + plot_h * (1.0 - rate), yl = top + plot_h * (1.0 - lo);
            const double yh = top + plot_h * (1.0 - hi), xc = x + bar_w / 2.0 - 1.0;
            sb_printf(&b, "<rect class=\"bar %s\" data-method=\"", k_series[k].key);
            sb_xml(&b, m->name);
            sb_printf(&b, "\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
                      "fill=\"%s\"><title>", x, y, bar_w - 2.0, top + plot_h - y,
                      k_series[k].colour);
            sb_xml(&b, m->name);
            sb_printf(&b, ", %s: %.1f%% [%.1f, %.1f] (%lld/%lld)</title></rect>\n",
                      k_series[k].key, 100.0 * rate, 100.0 * lo, 100.0 * hi,
                      (long long)c.refused, (long long)c.n);
            sb_printf(&b, "<g class=\"errorbar\" stroke=\"#222\" stroke-width=\"1.2\">"
                      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>"
                      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>"
                      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/></g>\n",
                      xc, yh, xc, yl, xc - 5, yh, xc + 5, yh, xc - 5, yl, xc + 5, yl);
        }
        sb_printf(&b, "<text class=\"method\" x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">",
                  gx + bar_w * n_series / 2.0, top + plot_h + 20);
        sb_xml(&b, m->name);
        sb_printf(&b, "</text>\n");
    }
    sb_printf(&b, "</svg>\n");
    return sb_finish(&b, "sf_eval_svg", out);
}

sf_status sf_eval_write_svg(const sf_eval_summary *s, const char *path) {
    if (!path) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_eval_write_svg: NULL path");
    char *text = NULL;
    sf_status st = sf_eval_svg(s, &text);
    if (st == SF_OK) st = write_text(path, text, "sf_eval_write_svg");
    free(text);
    return st;
}

/* Built-in chat templates as fixed text pieces, and piece-by-piece prompt encoding.
 *
 * Each family's Jinja template, rendered for one system message and one user message with the
 * generation prompt, is the concatenation prefix + system + middle + user + suffix; the pieces
 * below are those strings. They are pinned here rather than interpreted from Jinja, so a prompt's
 * spans are known exactly (docs/TEMPLATES.md). */
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

static const sf_template_text k_templates[] = {
    [SF_TEMPLATE_LLAMA3] = {
        .name = "llama3",
        .prefix = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
        .middle = "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
        .suffix = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        .assistant_end = "<|eot_id|>",
        .user_start = "<|start_header_id|>user<|end_header_id|>\n\n",
        .end_of_turn = "<|eot_id|>",
        .no_system = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    },
    [SF_TEMPLATE_LLAMA2] = {
        .name = "llama2",
        .prefix = "<s>[INST] <<SYS>>\n",
        .middle = "\n<</SYS>>\n\n",
        .suffix = " [/INST]",
        .assistant_end = " </s>",
        .user_start = "<s>[INST] ",
        .end_of_turn = "</s>",
        .no_system = "<s>[INST] ",
    },
    [SF_TEMPLATE_MISTRAL] = {
        .name = "mistral",
        .prefix = "<s>[INST] ",
        .middle = "\n\n",
        .suffix = " [/INST]",
        .assistant_end = "</s>",
        .user_start = "[INST] ",
        .end_of_turn = "</s>",
        .no_system = "<s>[INST] ",
    },
    [SF_TEMPLATE_PHI3] = {
        .name = "phi3",
        .prefix = "<|system|>\n",
        .middle = "<|end|>\n<|user|>\n",
        .suffix = "<|end|>\n<|assistant|>\n",
        .assistant_end = "<|end|>\n",
        .user_start = "<|user|>\n",
        .end_of_turn = "<|end|>",
        .no_system = "<|user|>\n",
    },
    [SF_TEMPLATE_ZEPHYR] = {
        .name = "zephyr",
        .prefix = "<|system|>\n",
        .middle = "</s>\n<|user|>\n",
        .suffix = "</s>\n<|assistant|>\n",
        .assistant_end = "</s>\n",
        .user_start = "<|user|>\n",
        .end_of_turn = "</s>",
        .no_system = "<|user|>\n",
    },
    [SF_TEMPLATE_CHATML] = {
        .name = "chatml",
        .prefix = "<|im_start|>system\n",
        .middle = "<|im_end|>\n<|im_start|>user\n",
        .suffix = "<|im_end|>\n<|im_start|>assistant\n",
        .assistant_end = "<|im_end|>\n",
        .user_start = "<|im_start|>user\n",
        .end_of_turn = "<|im_end|>",
        .no_system = "<|im_start|>user\n",
    },
};
enum { N_TEMPLATES = sizeof k_templates / sizeof k_templates[0] };

const sf_template_text *sf_template_get(sf_template_id id) {
    return ((int)id >= 0 && (int)id < N_TEMPLATES) ? &k_templates[id] : NULL;
}

sf_status sf_template_by_name(const char *name, sf_template_id *out) {
    if (!name || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_template_by_name: NULL");
    for (int i = 0; i < N_TEMPLATES; i++) {
        if (!strcmp(name, k_templates[i].name)) {
            *out = (sf_template_id)i;
            return SF_OK;
        }
    }
    return sf_fail(SF_ERR_NOT_FOUND,
                   "unknown chat template '%s'; built in: llama3, llama2, mistral, phi3, zephyr, "
                   "chatml",
                   name);
}

sf_status sf_template_detect(const char *src, sf_template_id *out) {
    if (!src || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_template_detect: NULL");
    /* Most specific markers first: zephyr and phi3 share <|user|>, llama2 and mistral [INST]. */
    if (strstr(src, "<|start_header_id|>")) *out = SF_TEMPLATE_LLAMA3;
    else if (strstr(src, "<|im_start|>")) *out = SF_TEMPLATE_CHATML;
    else if (strstr(src, "<|user|>") && strstr(src, "<|end|>")) *out = SF_TEMPLATE_PHI3;
    else if (strstr(src, "<|user|>")) *out = SF_TEMPLATE_ZEPHYR;
    else if (strstr(src, "<<SYS>>")) *out = SF_TEMPLATE_LLAMA2;
    else if (strstr(src, "[INST]")) *out = SF_TEMPLATE_MISTRAL;
    else {
        return sf_fail(SF_ERR_NOT_FOUND,
                       "the chat template matches none of the built-in families; name one "
                       "explicitly (llama3, llama2, mistral, phi3, zephyr, chatml)");
    }
    return SF_OK;
}

/* Appends the encoding of text to ids[*at..] (when it fits; *at always advances by the full
 * count so the caller learns the size needed). */
static sf_status append(const sf_tokenizer *tok, const char *text, bool special, int32_t *ids,
                        int32_t capacity, int64_t *at) {
    if (!text || !*text) return SF_OK;
    const int64_t room = *at < capacity ? capacity - *at : 0;
    int32_t n = 0;
    sf_status st = sf_tokenizer_encode(tok, text, strlen(text), false, special,
                                       room ? ids + *at : NULL, (int32_t)room, &n);
    if (st != SF_OK && st != SF_ERR_OUT_OF_RANGE) return st;
    *at += n;
    return SF_OK;
}

/* The end every prompt shares: the user content and the suffix from ids[at..], their spans, the
 * total in *n_ids, and the capacity check. */
static sf_status finish_user_turn(const sf_tokenizer *tok, const sf_template_text *t,
                                  const char *user_text, int32_t *ids, int32_t capacity,
                                  int64_t at, int32_t *n_ids, sf_prompt_spans *spans,
                                  const char *fn) {
    int64_t mark = at;
    sf_status st = append(tok, user_text, false, ids, capacity, &at);
    spans->user = (int32_t)(at - mark);
    mark = at;
    if (st == SF_OK) st = append(tok, t->suffix, true, ids, capacity, &at);
    spans->suffix = (int32_t)(at - mark);
    if (st != SF_OK) return st;
    if (at > 0x7fffffff) return sf_fail(SF_ERR_OUT_OF_RANGE, "%s: prompt too long", fn);
    *n_ids = (int32_t)at;
    if (at > capacity) {
        return sf_fail(SF_ERR_OUT_OF_RANGE, "%s: the prompt has %lld tokens; the buffer holds %d",
                       fn, (long long)at, capacity);
    }
    return SF_OK;
}

sf_status sf_chat_encode(const sf_tokenizer *tok, sf_template_id tmpl, const char *system_text,
                         const sf_chat_turn *history, int32_t n_history, const char *user_text,
                         int32_t *ids, int32_t capacity, int32_t *n_ids, sf_prompt_spans *spans) {
    const sf_template_text *t = sf_template_get(tmpl);
    if (!tok || !t || !user_text || !n_ids || !spans || capacity < 0 || n_history < 0 ||
        (n_history && !history) || (capacity && !ids)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_chat_encode: bad argument");
    }
    int64_t at = 0, mark;
    sf_status st = append(tok, t->prefix, true, ids, capacity, &at);
    mark = at;
    spans->prefix = (int32_t)at;
    /* Contents are plain text: special-token syntax in them stays text. */
    if (st == SF_OK) st = append(tok, system_text, false, ids, capacity, &at);
    spans->system = (int32_t)(at - mark);
    mark = at;
    if (st == SF_OK) st = append(tok, t->middle, true, ids, capacity, &at);
    for (int32_t i = 0; st == SF_OK && i < n_history; i++) {
        st = append(tok, history[i].user, false, ids, capacity, &at);
        if (st == SF_OK) st = append(tok, t->suffix, true, ids, capacity, &at);
        if (st == SF_OK) st = append(tok, history[i].assistant, false, ids, capacity, &at);
        if (st == SF_OK) st = append(tok, t->assistant_end, true, ids, capacity, &at);
        if (st == SF_OK) st = append(tok, t->user_start, true, ids, capacity, &at);
    }
    spans->middle = (int32_t)(at - mark);
    if (st != SF_OK) return st;
    return finish_user_turn(tok, t, user_text, ids, capacity, at, n_ids, spans, "sf_chat_encode");
}

sf_status sf_chat_encode_no_system(const sf_tokenizer *tok, sf_template_id tmpl,
                                   const char *user_text, int32_t *ids, int32_t capacity,
                                   int32_t *n_ids, sf_prompt_spans *spans) {
    const sf_template_text *t = sf_template_get(tmpl);
    if (!tok || !t || !user_text || !n_ids || !spans || capacity < 0 || (capacity && !ids)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_chat_encode_no_system: bad argument");
    }
    /* Everything before the user content is the prefix: with no system span there is nothing
     * for a middle span to separate, and a prefix-only opening keeps the spans adding up. */
    int64_t at = 0;
    sf_status st = append(tok, t->no_system, true, ids, capacity, &at);
    spans->prefix = (int32_t)at;
    spans->system = 0;
    spans->middle = 0;
    if (st != SF_OK) return st;
    return finish_user_turn(tok, t, user_text, ids, capacity, at, n_ids, spans,
                            "sf_chat_encode_no_system");
}

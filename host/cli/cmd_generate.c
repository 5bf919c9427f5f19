/* sysformer generate / chat: text in, text out, optionally guarded by a Sysformer. */
#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/jsonl_prompts.h"
#include "core/error.h"

static const char k_default_system[] = "You are a helpful assistant.";

/* Everything a generate or chat session loads once. */
typedef struct session {
    sf_llm *llm;
    sf_tokenizer *tok;
    sf_sysformer *sf;
    sf_template_id tmpl;
    const char *system;
    sf_sampling sampling;
    int32_t max_new_tokens;
    int32_t stop_ids[2];
    int32_t n_stop_ids;
    const char *stops[16];
    int32_t n_stops;
    cli_device dev;           /* CLI_DEVICE_CPU or _CUDA once the session is open */
    sf_attention_kernel attention; /* the engine's fused attention (--attention) */
    bool no_graphs;           /* --no-cuda-graphs: decode steps run eagerly */
    sf_cuda_engine *engine;   /* with CLI_DEVICE_CUDA, created by session_engine */
    int32_t slots;            /* --batch: the requests generated together */
    int32_t engine_slots;     /* the requests it holds at once */
    int32_t engine_tokens;    /* the packed prompt tokens one prefill step may carry */
    int32_t engine_context;   /* the positions each of its slots holds */
} session;

typedef struct options {
    const char *model, *tokenizer, *sysformer, *system, *template_name;
    const char *prompt, *input, *output;
    int32_t max_new_tokens, batch;
    sf_sampling sampling;
    const char *stops[16];
    int32_t n_stops;
    cli_device dev;
    sf_attention_kernel attention;
    bool no_graphs;
} options;

static void usage(FILE *out, const char *cmd) {
    const bool chat = !strcmp(cmd, "chat");
    fprintf(out, "usage: sysformer %s --model PATH [options]\n\n", cmd);
    if (chat) {
        fprintf(out, "An interactive conversation: type a message and press enter; the reply\n"
                     "streams back. /reset starts a new conversation, /quit (or end of input)\n"
                     "leaves.\n\n");
    } else {
        fprintf(out, "Generates a reply to one prompt (--prompt, streamed to stdout), or to every\n"
                     "line of a JSONL file (--input: {\"prompt\": ...} or {\"instruction\": ...},\n"
                     "optionally \"system\", and \"temperature\", \"top_k\", \"top_p\", \"seed\",\n"
                     "\"max_new_tokens\", \"logprobs\", \"top_logprobs\" for that line alone)\n"
                     "written as JSONL to --output, with a progress bar: each line's own fields\n"
                     "as they were, then \"response\", \"finish\", \"n_tokens\", \"guarded\".\n\n");
    }
    fprintf(out,
            "  --model PATH          a .gguf file or a Hugging Face model directory\n"
            "  --tokenizer PATH      tokenizer (default: the model's own files)\n"
            "  --sysformer DIR       guard every prompt with this Sysformer\n"
            "  --system TEXT         the system prompt (default: the Sysformer's recorded one,\n"
            "                        else \"%s\")\n"
            "  --template NAME       llama3, llama2, mistral, phi3, zephyr or chatml\n"
            "                        (default: detected from the tokenizer's chat template)\n"
            "  --max-new-tokens N    default 256\n"
            "  --temperature T       0 (default) is greedy\n"
            "  --top-k K, --top-p P  sampling filters (default off)\n"
            "  --seed S              sampling seed (default 0)\n"
            "  --stop TEXT           stop when the reply ends with TEXT (repeatable)\n"
            "  --device cpu|cuda     where to run (default: cuda when this build has CUDA\n"
            "                        support and a GPU is present, else cpu)\n"
            "  --attention K         the CUDA engine's fused attention: auto (default: the\n"
            "                        library's choice), mma (mma.sync, any GPU), wgmma or\n"
            "                        wgmma_ws (Hopper, the pipelined or the warp-specialized\n"
            "                        kernel); the CPU path ignores it\n"
            "  --no-cuda-graphs      the CUDA engine runs decode steps eagerly instead of\n"
            "                        replaying them as CUDA graphs (same tokens, more launch\n"
            "                        overhead; for a driver or profiler that refuses graphs)\n",
            k_default_system);
    if (!chat) {
        fprintf(out,
                "  --prompt TEXT         one prompt\n"
                "  --input FILE.jsonl    many prompts ...\n"
                "  --output FILE.jsonl   ... and where their replies go\n"
                "  --batch N             prompts generated together (default 8; with cuda the\n"
                "                        engine's slots: a finished reply's slot takes the next\n"
                "                        prompt at once)\n"
                "  --logprobs            each reply token's log-probability under the model\n"
                "                        (the raw distribution, whatever the sampling): with\n"
                "                        --prompt a table on stderr after the reply, with --input\n"
                "                        \"tokens\" and \"token_logprobs\" on every output line\n"
                "  --top-logprobs N      and the N (at most %d) most likely tokens at each step:\n"
                "                        under each row of the table, or\n"
                "                        \"top_token_logprobs\" on each line ([id, logprob]\n"
                "                        pairs, most likely first)\n",
                SF_MAX_TOP_LOGPROBS);
    }
}

static int parse_options(int argc, char **argv, const char *cmd, options *o) {
    memset(o, 0, sizeof *o);
    o->max_new_tokens = 256;
    o->batch = 8;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout, cmd);
            return -1;
        }
        if (!strcmp(a, "--logprobs")) {
            if (!strcmp(cmd, "chat")) {
                fprintf(stderr, "sysformer chat: --logprobs is generate's (see --help)\n");
                return 2;
            }
            o->sampling.logprobs = true;
            continue;
        }
        if (!strcmp(a, "--no-cuda-graphs")) {
            o->no_graphs = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "sysformer %s: %s needs a value (see --help)\n", cmd, a);
            return 2;
        }
        const char *v = argv[++i];
        int rc = 0;
        if (!strcmp(a, "--model")) o->model = v;
        else if (!strcmp(a, "--tokenizer")) o->tokenizer = v;
        else if (!strcmp(a, "--sysformer")) o->sysformer = v;
        else if (!strcmp(a, "--system")) o->system = v;
        else if (!strcmp(a, "--template")) o->template_name = v;
        else if (!strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "--input")) o->input = v;
        else if (!strcmp(a, "--output")) o->output = v;
        else if (!strcmp(a, "--max-new-tokens"))
            rc = cli_parse_int(cmd, a, v, 1, INT32_MAX, &o->max_new_tokens);
        else if (!strcmp(a, "--batch")) rc = cli_parse_int(cmd, a, v, 1, INT32_MAX, &o->batch);
        else if (!strcmp(a, "--temperature"))
            rc = cli_parse_float(cmd, a, v, &o->sampling.temperature);
        else if (!strcmp(a, "--top-k"))
            rc = cli_parse_int(cmd, a, v, INT32_MIN, INT32_MAX, &o->sampling.top_k);
        else if (!strcmp(a, "--top-p")) rc = cli_parse_float(cmd, a, v, &o->sampling.top_p);
        else if (!strcmp(a, "--seed")) rc = cli_parse_seed(cmd, a, v, &o->sampling.seed);
        else if (!strcmp(a, "--top-logprobs") && strcmp(cmd, "chat") != 0)
            rc = cli_parse_int(cmd, a, v, 0, SF_MAX_TOP_LOGPROBS, &o->sampling.top_logprobs);
        else if (!strcmp(a, "--device")) rc = cli_parse_device(cmd, v, &o->dev);
        else if (!strcmp(a, "--attention")) rc = cli_parse_attention(cmd, v, &o->attention);
        else if (!strcmp(a, "--stop")) {
            if (o->n_stops == 16) {
                fprintf(stderr, "sysformer %s: at most 16 --stop strings\n", cmd);
                return 2;
            }
            o->stops[o->n_stops++] = v;
        } else {
            fprintf(stderr, "sysformer %s: unknown option '%s' (see --help)\n", cmd, a);
            return 2;
        }
        if (rc) return rc;
    }
    if (!o->model) {
        fprintf(stderr, "sysformer %s: --model is required: a .gguf file or a model directory "
                        "(weights/fetch_smollm2.sh fetches SmolLM2-135M-Instruct)\n", cmd);
        return 2;
    }
    return 0;
}

static void session_free(session *s) {
    sf_cuda_engine_free(s->engine);
    sf_sysformer_free(s->sf);
    sf_tokenizer_free(s->tok);
    sf_llm_free(s->llm);
}

static int session_open(const options *o, const char *cmd, session *s) {
    memset(s, 0, sizeof *s);
    s->attention = o->attention;
    s->no_graphs = o->no_graphs;
    int rc = cli_resolve_device(cmd, o->dev, &s->dev);
    if (rc) return rc;
    fprintf(stderr, "loading %s ...\n", o->model);
    sf_status st = sf_llm_load(o->model, &s->llm);
    if (st != SF_OK) return cli_report("loading the model", st);
    st = sf_tokenizer_load(o->tokenizer ? o->tokenizer : o->model, &s->tok);
    if (st != SF_OK) {
        session_free(s);
        fprintf(stderr, "sysformer %s: the tokenizer is read from the model's own files "
                        "(tokenizer.json or GGUF metadata); give --tokenizer PATH otherwise\n", cmd);
        return cli_report("loading the tokenizer", st);
    }
    if (o->sysformer) {
        st = sf_sysformer_load(o->sysformer, s->llm, &s->sf);
        if (st != SF_OK) {
            session_free(s);
            return cli_report("loading the Sysformer", st);
        }
    }
    const char *src = sf_tokenizer_chat_template(s->tok);
    if (o->template_name) st = sf_template_by_name(o->template_name, &s->tmpl);
    else if (s->sf && sf_sysformer_get_config(s->sf)->chat_template)
        st = sf_template_by_name(sf_sysformer_get_config(s->sf)->chat_template, &s->tmpl);
    else if (src) st = sf_template_detect(src, &s->tmpl);
    else st = sf_fail(SF_ERR_NOT_FOUND, "the tokenizer carries no chat template; pass "
                      "--template NAME (llama3, llama2, mistral, phi3, zephyr, chatml)");
    if (st != SF_OK) {
        session_free(s);
        return cli_report("choosing the chat template", st);
    }
    s->system = o->system;
    if (!s->system && s->sf) s->system = sf_sysformer_get_config(s->sf)->system_prompt;
    if (!s->system) s->system = k_default_system;
    s->sampling = o->sampling;
    s->slots = o->batch;
    s->max_new_tokens = o->max_new_tokens;
    const sf_template_text *t = sf_template_get(s->tmpl);
    const int32_t eos = sf_tokenizer_eos_id(s->tok);
    const int32_t eot = sf_tokenizer_token_id(s->tok, t->end_of_turn);
    if (eos >= 0) s->stop_ids[s->n_stop_ids++] = eos;
    if (eot >= 0 && eot != eos) s->stop_ids[s->n_stop_ids++] = eot;
    for (int32_t i = 0; i < o->n_stops; i++) s->stops[s->n_stops++] = o->stops[i];
    fprintf(stderr, "model: %d layers, hidden %d, context %d; template %s%s%s\n",
            sf_llm_get_config(s->llm)->num_layers, sf_llm_get_config(s->llm)->hidden_size,
            sf_llm_get_config(s->llm)->max_position_embeddings, t->name,
            s->sf ? "; guarded by " : "", s->sf ? o->sysformer : "");
    return 0;
}

/* Makes sure the CUDA engine holds a batch of `slots` prompts with `tokens` packed prompt tokens
 * in all, each slot `context` positions (0: the engine's default, min(the model's window,
 * 4096), for a conversation that grows). It is created for the first batch and re-created (the
 * weights uploaded again) only when a later batch needs more, which a JSONL run of long prompts
 * can. A KV cache as long as the prompts and replies need, not the model's whole window, is
 * what lets many slots fit. */
static sf_status session_engine(session *s, int32_t slots, int32_t tokens, int32_t context) {
    const int32_t max_pos = sf_llm_get_config(s->llm)->max_position_embeddings;
    if (context <= 0) context = max_pos < 4096 ? max_pos : 4096;
    if (context > max_pos) context = max_pos;
    if (s->engine && slots <= s->engine_slots && tokens <= s->engine_tokens &&
        context <= s->engine_context) {
        return SF_OK;
    }
    if (slots < s->engine_slots) slots = s->engine_slots;
    if (tokens < s->engine_tokens) tokens = s->engine_tokens;
    if (context < s->engine_context) context = s->engine_context;
    sf_cuda_engine_options opts = sf_cuda_engine_default_options();
    opts.max_slots = slots < 1 ? 1 : slots;
    opts.max_context = context;
    opts.max_batch_tokens = tokens > context ? tokens : 0; /* 0: max_context */
    opts.attention = s->attention;
    opts.cuda_graphs = !s->no_graphs;
    sf_cuda_engine_free(s->engine);
    s->engine = NULL;
    sf_status st = sf_cuda_engine_create(s->llm, s->sf, &opts, &s->engine);
    if (st != SF_OK) return st;
    s->engine_slots = opts.max_slots;
    s->engine_tokens = tokens > context ? tokens : context;
    s->engine_context = context;
    sf_cuda_memory mem;
    st = sf_cuda_engine_memory(s->engine, &mem);
    if (st != SF_OK) return st;
    const double mib = 1024.0 * 1024.0;
    fprintf(stderr, "device: cuda %d; engine for %d request%s of up to %d positions: weights "
                    "%.1f MiB, KV cache %.1f MiB, activations %.1f MiB%s\n", opts.device,
            opts.max_slots, opts.max_slots == 1 ? "" : "s", context,
            (double)mem.weights / mib, (double)mem.kv_cache / mib,
            (double)mem.activations / mib, opts.cuda_graphs ? "" : "; no CUDA graphs");
    return SF_OK;
}

static bool stream_to_stdout(void *user, int32_t request, int32_t token, const char *text,
                             size_t len) {
    (void)user;
    (void)request;
    (void)token;
    if (len) {
        fwrite(text, 1, len, stdout);
        fflush(stdout);
    }
    return true;
}

static int longer_first(const void *a, const void *b) {
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x < y) - (x > y);
}

/* Sizes the CUDA engine for n prompts of len[r] tokens and spans[r], each to be given at most
 * limits[r] new tokens (NULL: the session's max_new_tokens): at most `slots` of them run at once
 * (the rest wait for a slot), so a step's rows are at most the `slots` longest prompts; a
 * guarded step also lays the Sysformer's rows out padded, slots x the longest system (and user)
 * span; a slot holds the longest prompt and reply (a request that reaches it has reached its
 * limit: it ends by length, not by context). */
static sf_status size_engine(session *s, int32_t n, const int32_t *len,
                             const sf_prompt_spans *spans, const int32_t *limits) {
    const int32_t slots = n < s->slots ? n : s->slots;
    int32_t *sorted = malloc((size_t)(n > 0 ? n : 1) * sizeof *sorted);
    if (!sorted) return sf_fail(SF_ERR_OUT_OF_MEMORY, "out of memory");
    memcpy(sorted, len, (size_t)n * sizeof *len);
    qsort(sorted, (size_t)n, sizeof *sorted, longer_first);
    int64_t need = 0;
    for (int32_t k = 0; k < slots; k++) need += sorted[k];
    free(sorted);
    for (int32_t r = 0; s->sf && r < n; r++) {
        if ((int64_t)slots * spans[r].system > need) need = (int64_t)slots * spans[r].system;
        if ((int64_t)slots * spans[r].user > need) need = (int64_t)slots * spans[r].user;
    }
    if (need > INT32_MAX) {
        return sf_fail(SF_ERR_OUT_OF_RANGE, "steps of %lld tokens", (long long)need);
    }
    int64_t context = 1;
    for (int32_t r = 0; r < n; r++) {
        const int64_t c = (int64_t)len[r] + (limits ? limits[r] : s->max_new_tokens);
        if (c > context) context = c;
    }
    const int32_t max_pos = sf_llm_get_config(s->llm)->max_position_embeddings;
    return session_engine(s, slots, (int32_t)need, context < max_pos ? (int32_t)context : max_pos);
}

/* Generates replies for n (system, history, user) prompts in one batch, each sampled with
 * settings[r] and at most limits[r] new tokens (NULL: the session's for all); on_token (may be
 * NULL) sees every token. */
static sf_status generate_batch(session *s, int32_t n, const char *const *systems,
                                const sf_chat_turn *history, int32_t n_history,
                                const char *const *users, const sf_sampling *settings,
                                const int32_t *limits, sf_stream_fn on_token, void *user,
                                sf_generation_result *results) {
    /* Each prompt is encoded into room for a whole context window, then packed: a call can
     * take 256 prompts, and 256 windows of a long-context model would be a large buffer. */
    const int32_t ctx = sf_llm_get_config(s->llm)->max_position_embeddings;
    int32_t *one = malloc((size_t)ctx * sizeof *one), *ids = NULL;
    int32_t *cu = malloc((size_t)(n + 1) * sizeof *cu);
    sf_prompt_spans *spans = malloc((size_t)n * sizeof *spans);
    sf_status st = (one && cu && spans) ? SF_OK : SF_ERR_OUT_OF_MEMORY;
    if (st != SF_OK) sf_fail(st, "out of memory");
    if (cu) cu[0] = 0;
    size_t cap = 0;
    for (int32_t r = 0; st == SF_OK && r < n; r++) {
        int32_t len = 0;
        st = sf_chat_encode(s->tok, s->tmpl, systems[r], history, n_history, users[r], one, ctx,
                            &len, &spans[r]);
        if (st == SF_ERR_OUT_OF_RANGE || (st == SF_OK && len >= ctx)) {
            st = sf_fail(SF_ERR_OUT_OF_RANGE, "prompt %d needs %d tokens; the context window is "
                         "%d (shorten the prompt or start a new conversation)", r, len, ctx);
        }
        if (st == SF_OK && (size_t)cu[r] + (size_t)len > cap) {
            size_t grown = cap ? 2 * cap : 4096;
            while (grown < (size_t)cu[r] + (size_t)len) grown *= 2;
            int32_t *more = realloc(ids, grown * sizeof *ids);
            if (more) {
                ids = more;
                cap = grown;
            } else {
                st = sf_fail(SF_ERR_OUT_OF_MEMORY, "out of memory");
            }
        }
        if (st == SF_OK) {
            memcpy(ids + cu[r], one, (size_t)len * sizeof *ids);
            cu[r + 1] = cu[r] + len;
        }
    }
    free(one);
    if (st == SF_OK && s->dev == CLI_DEVICE_CUDA) {
        int32_t *len = malloc((size_t)n * sizeof *len);
        if (!len) st = sf_fail(SF_ERR_OUT_OF_MEMORY, "out of memory");
        for (int32_t r = 0; st == SF_OK && r < n; r++) len[r] = cu[r + 1] - cu[r];
        if (st == SF_OK) st = size_engine(s, n, len, spans, limits);
        free(len);
    }
    if (st == SF_OK) {
        sf_generation g = {n, cu, ids, spans, s->max_new_tokens, s->sampling, s->stop_ids,
                           s->n_stop_ids, s->stops, s->n_stops, settings, limits};
        if (s->dev == CLI_DEVICE_CUDA) {
            st = sf_generate_cuda(s->engine, s->tok, &g, on_token, user, results);
        } else {
            st = sf_generate_cpu(s->llm, s->sf, s->tok, &g, on_token, user, results);
        }
    }
    free(ids);
    free(cu);
    free(spans);
    return st;
}

static void progress(int done, int total, long tokens, double seconds) {
    const int width = 30, fill = total ? done * width / total : width;
    fprintf(stderr, "\r[%.*s%.*s] %d/%d prompts, %.1f tokens/s", fill,
            "==============================", width - fill, "                              ",
            done, total, seconds > 0 ? (double)tokens / seconds : 0.0);
    if (done == total) fputc('\n', stderr);
}

/* The bar while generating: the token rate is redrawn from the tokens as they come (at most
 * twice a second); prompts count when their replies are written. */
typedef struct live_progress {
    int done, total;
    long tokens; /* generated so far (the stream's count) */
    double t0, drawn;
} live_progress;

static bool count_token(void *user, int32_t request, int32_t token, const char *text,
                        size_t len) {
    (void)request;
    (void)token;
    (void)text;
    (void)len;
    live_progress *p = user;
    p->tokens++;
    const double now = cli_now();
    if (now - p->drawn >= 0.5) {
        p->drawn = now;
        progress(p->done, p->total, p->tokens, now - p->t0);
    }
    return true;
}

/* Every line's prompt must fit the model's context window: checked before anything is
 * generated, so that a long file does not fail at its last chunk, and named by its line. Each
 * line's length and spans go to len[] and spans[] (sizing the GPU's engine); its ids are not
 * kept but encoded again when it is generated, which costs little beside generating and never
 * holds a whole file's ids. */
static int check_lengths(const session *s, const options *o, const cli_jsonl_prompts *in,
                         int32_t *len, sf_prompt_spans *spans) {
    const int32_t ctx = sf_llm_get_config(s->llm)->max_position_embeddings;
    int32_t *buf = malloc((size_t)ctx * sizeof *buf);
    if (!buf) return cli_report("checking the prompts", SF_ERR_OUT_OF_MEMORY);
    int rc = 0;
    for (size_t r = 0; !rc && r < json_array_size(in->rows); r++) {
        const char *system, *user;
        cli_jsonl_texts(json_array_get(in->rows, r), s->system, &system, &user);
        len[r] = 0;
        const sf_status st = sf_chat_encode(s->tok, s->tmpl, system, NULL, 0, user, buf, ctx,
                                            &len[r], &spans[r]);
        if (st == SF_ERR_OUT_OF_RANGE || (st == SF_OK && len[r] >= ctx)) {
            sf_clear_error();
            fprintf(stderr, "sysformer generate: %s:%d: the prompt needs %d tokens; the context "
                            "window is %d\n", o->input, in->line_of[r], len[r], ctx);
            rc = 1;
        } else if (st != SF_OK) {
            rc = cli_report("encoding the prompts", st);
        }
    }
    free(buf);
    return rc;
}

/* On the GPU: every line through one generation session (cli_run_session), the replies
 * written in the file's order as they finish. A line is encoded again when it is submitted. */
typedef struct jsonl_gpu {
    session *s;
    const cli_jsonl_prompts *in;
    const sf_sampling *sampling;
    const int32_t *limit;
    FILE *out;
    const char *out_path;
    live_progress *live;
    int32_t *buf, ctx; /* one prompt's ids */
} jsonl_gpu;

static sf_status submit_line(void *user, sf_cuda_session *gen, int64_t i) {
    jsonl_gpu *j = user;
    const char *system, *user_text;
    cli_jsonl_texts(json_array_get(j->in->rows, (size_t)i), j->s->system, &system, &user_text);
    int32_t n = 0, id;
    sf_prompt_spans spans;
    sf_status st = sf_chat_encode(j->s->tok, j->s->tmpl, system, NULL, 0, user_text, j->buf,
                                  j->ctx, &n, &spans);
    if (st == SF_OK) {
        st = sf_cuda_session_submit(gen, j->buf, n, &spans, &j->sampling[i], j->limit[i], &id);
    }
    return st;
}

static sf_status step_lines(void *user, sf_cuda_session *gen, int64_t done) {
    jsonl_gpu *j = user;
    j->live->done = (int)done;
    return sf_cuda_session_step(gen, count_token, j->live, NULL, NULL);
}

/* Line i's reply to out; a failure names the line and the file. */
static sf_status write_reply(FILE *out, const char *out_path, const cli_jsonl_prompts *in,
                             size_t i, const sf_generation_result *res, bool guarded) {
    errno = 0;
    if (cli_jsonl_write_reply(out, json_array_get(in->rows, i), res, guarded) == 0) return SF_OK;
    return sf_fail(SF_ERR_IO, "%s: cannot write the reply to line %d%s%s", out_path,
                   in->line_of[i], errno ? ": " : "", errno ? strerror(errno) : "");
}

static sf_status write_line(void *user, int64_t i, sf_generation_result *res) {
    jsonl_gpu *j = user;
    const sf_status st = write_reply(j->out, j->out_path, j->in, (size_t)i, res, j->s->sf != NULL);
    sf_generation_result_free(res);
    j->live->done = (int)i + 1;
    return st;
}

static sf_status jsonl_on_gpu(session *s, const cli_jsonl_prompts *in,
                              const sf_sampling *sampling, const int32_t *limit, FILE *out,
                              const char *out_path, live_progress *live) {
    const int total = (int)json_array_size(in->rows);
    jsonl_gpu j = {s, in, sampling, limit, out, out_path, live, NULL,
                   sf_llm_get_config(s->llm)->max_position_embeddings};
    j.buf = malloc((size_t)j.ctx * sizeof *j.buf);
    sf_cuda_session *gen = NULL;
    sf_status st = j.buf ? sf_cuda_session_create(s->engine, s->tok, s->stop_ids, s->n_stop_ids,
                                                  s->stops, s->n_stops, &gen)
                         : sf_fail(SF_ERR_OUT_OF_MEMORY, "out of memory");
    const cli_session_list list = {total, s->engine_slots, submit_line, step_lines, write_line,
                                   &j};
    if (st == SF_OK) st = cli_run_session(gen, &list);
    if (st == SF_OK) progress(total, total, live->tokens, cli_now() - live->t0);
    sf_cuda_session_free(gen);
    free(j.buf);
    return st;
}

static int run_jsonl(session *s, const options *o) {
    FILE *in = fopen(o->input, "r");
    if (!in) {
        fprintf(stderr, "sysformer generate: cannot open --input %s\n", o->input);
        return 1;
    }
    /* Read every line first: the progress bar needs the total. */
    cli_jsonl_prompts prompts;
    char why[256];
    int bad_line;
    int rc = cli_jsonl_read(in, &prompts, &bad_line, why, sizeof why);
    fclose(in);
    if (rc && bad_line) fprintf(stderr, "sysformer generate: %s:%d: %s\n", o->input, bad_line, why);
    else if (rc) fprintf(stderr, "sysformer generate: --input %s: %s\n", o->input, why);
    if (rc) return rc;
    /* Each line's sampling and limit (its own fields over the flags), prompt length and spans,
     * worked out once. */
    const int total = (int)json_array_size(prompts.rows);
    const size_t count = (size_t)(total > 0 ? total : 1);
    sf_sampling *sampling = malloc(count * sizeof *sampling);
    int32_t *limit = malloc(count * sizeof *limit), *len = malloc(count * sizeof *len);
    sf_prompt_spans *spans = malloc(count * sizeof *spans);
    if (!sampling || !limit || !len || !spans) {
        rc = cli_report("reading --input", SF_ERR_OUT_OF_MEMORY);
    }
    for (int r = 0; !rc && r < total; r++) {
        cli_jsonl_settings(json_array_get(prompts.rows, (size_t)r), &s->sampling, s->max_new_tokens,
                           &sampling[r], &limit[r]);
    }
    if (!rc) rc = check_lengths(s, o, &prompts, len, spans);
    FILE *out = rc ? NULL : fopen(o->output, "w");
    if (!rc && !out) {
        fprintf(stderr, "sysformer generate: cannot write --output %s\n", o->output);
        rc = 1;
    }
    /* Size the engine before the progress bar starts, so that its line does not break the bar. */
    if (!rc && total > 0 && s->dev == CLI_DEVICE_CUDA) {
        sf_status st = size_engine(s, total, len, spans, limit);
        if (st != SF_OK) rc = cli_report("creating the CUDA engine", st);
    }
    live_progress live = {0, total, 0, cli_now(), cli_now()};
    if (!rc) progress(0, total, 0, 0.0);
    if (!rc && s->dev == CLI_DEVICE_CUDA) {
        const sf_status st = jsonl_on_gpu(s, &prompts, sampling, limit, out, o->output, &live);
        if (st != SF_OK) {
            fputc('\n', stderr);
            rc = cli_report("generate", st);
        }
    }
    /* On the CPU, --batch lines a call. */
    const int chunk = o->batch;
    for (int i = 0; !rc && s->dev != CLI_DEVICE_CUDA && i < total; i += chunk) {
        const int n = total - i < chunk ? total - i : chunk;
        const char *systems[256], *users[256];
        sf_generation_result results[256];
        for (int r = 0; r < n; r++) {
            cli_jsonl_texts(json_array_get(prompts.rows, (size_t)(i + r)), s->system, &systems[r],
                            &users[r]);
        }
        sf_status st = generate_batch(s, n, systems, NULL, 0, users, sampling + i, limit + i,
                                      count_token, &live, results);
        if (st != SF_OK) {
            fputc('\n', stderr);
            rc = cli_report("generate", st);
            break;
        }
        for (int r = 0; r < n; r++) {
            if (st == SF_OK) {
                st = write_reply(out, o->output, &prompts, (size_t)(i + r), &results[r],
                                 s->sf != NULL);
            }
            sf_generation_result_free(&results[r]);
        }
        if (st != SF_OK) {
            fputc('\n', stderr);
            rc = cli_report("generate", st);
            break;
        }
        live.done = i + n;
        progress(live.done, total, live.tokens, cli_now() - live.t0);
    }
    free(sampling);
    free(limit);
    free(len);
    free(spans);
    if (out && fclose(out) != 0 && !rc) {
        fprintf(stderr, "sysformer generate: error writing %s\n", o->output);
        rc = 1;
    }
    cli_jsonl_free(&prompts);
    if (!rc) fprintf(stderr, "wrote %d replies to %s\n", total, o->output);
    return rc;
}

/* One row of the --logprobs table: id, log-probability and the token's text, quoted, with
 * bytes outside printable ASCII escaped; a prefix marks an alternative. */
static void print_token_row(const sf_tokenizer *tok, const char *indent, int32_t id, float lp) {
    char piece[256];
    size_t len = 0;
    if (id < 0 || sf_tokenizer_decode(tok, &id, 1, false, piece, sizeof piece, &len) != SF_OK) {
        sf_clear_error();
        len = 0;
    }
    fprintf(stderr, "%s%8d  %10.4f  \"", indent, id, (double)lp);
    for (size_t k = 0; k < len && k < sizeof piece - 1; k++) {
        const unsigned char c = (unsigned char)piece[k];
        if (c == '\n') fputs("\\n", stderr);
        else if (c == '"' || c == '\\') fprintf(stderr, "\\%c", c);
        else if (c < 0x80 && isprint(c)) fputc(c, stderr);
        else fprintf(stderr, "\\x%02x", c);
    }
    fputs("\"\n", stderr);
}

/* --logprobs with --prompt: each reply token (with --top-logprobs, the most likely tokens at
 * its step under it, marked "+"), then their sum and the reply's perplexity, on stderr. */
static void print_logprobs(const sf_tokenizer *tok, const sf_generation_result *res) {
    fprintf(stderr, "%8s  %10s  %s\n", "token", "logprob", "text");
    double sum = 0.0;
    for (int32_t i = 0; i < res->n_tokens; i++) {
        print_token_row(tok, "", res->tokens[i], res->logprobs[i]);
        for (int32_t j = 0; res->top_ids && j < res->n_top; j++) {
            const size_t at = (size_t)i * (size_t)res->n_top + (size_t)j;
            print_token_row(tok, "  + ", res->top_ids[at], res->top_logprobs[at]);
        }
        sum += res->logprobs[i];
    }
    if (res->n_tokens > 0) {
        fprintf(stderr, "sum of log-probabilities %.4f over %d tokens, perplexity %.4f\n", sum,
                res->n_tokens, exp(-sum / res->n_tokens));
    }
}

int cmd_generate(int argc, char **argv) {
    options o;
    int rc = parse_options(argc, argv, "generate", &o);
    if (rc) return rc < 0 ? 0 : rc;
    if (o.batch > 256) o.batch = 256;
    if (!o.prompt == !o.input || (o.input && !o.output)) {
        fprintf(stderr, "sysformer generate: give --prompt TEXT, or --input FILE.jsonl with "
                        "--output FILE.jsonl (see --help)\n");
        return 2;
    }
    session s;
    rc = session_open(&o, "generate", &s);
    if (rc) return rc;
    if (o.input) {
        rc = run_jsonl(&s, &o);
    } else {
        const char *systems[1] = {s.system}, *users[1] = {o.prompt};
        sf_generation_result res;
        /* The weights' upload is not part of the tokens/s. */
        sf_status st = s.dev == CLI_DEVICE_CUDA ? session_engine(&s, 1, 0, 0) : SF_OK;
        const double t0 = cli_now();
        if (st == SF_OK) {
            st = generate_batch(&s, 1, systems, NULL, 0, users, NULL, NULL, stream_to_stdout,
                                NULL, &res);
        }
        if (st != SF_OK) {
            rc = cli_report("generate", st);
        } else {
            const double dt = cli_now() - t0;
            printf("\n");
            fprintf(stderr, "[%d tokens, %s, %.1f tokens/s%s%s]\n", res.n_tokens,
                    cli_finish_name(res.finish), dt > 0 ? res.n_tokens / dt : 0.0,
                    s.sf ? ", guarded" : "", s.dev == CLI_DEVICE_CUDA ? ", cuda" : "");
            if (res.logprobs) print_logprobs(s.tok, &res);
            sf_generation_result_free(&res);
        }
    }
    session_free(&s);
    return rc;
}

int cmd_chat(int argc, char **argv) {
    options o;
    int rc = parse_options(argc, argv, "chat", &o);
    if (rc) return rc < 0 ? 0 : rc;
    session s;
    rc = session_open(&o, "chat", &s);
    if (rc) return rc;
    /* The engine outlives the conversation: create it once, before the first message. */
    if (s.dev == CLI_DEVICE_CUDA) {
        sf_status st = session_engine(&s, 1, 0, 0);
        if (st != SF_OK) {
            rc = cli_report("creating the CUDA engine", st);
            session_free(&s);
            return rc;
        }
    }
    enum { MAX_TURNS = 64 };
    sf_chat_turn turns[MAX_TURNS];
    int n_turns = 0;
    char *line = NULL;
    size_t cap = 0;
    const bool tty = isatty(STDIN_FILENO);
    fprintf(stderr, "type a message; /reset starts over, /quit leaves\n");
    for (;;) {
        if (tty) fprintf(stderr, "> ");
        ssize_t got = getline(&line, &cap, stdin);
        if (got <= 0) break;
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = '\0';
        if (!strcmp(line, "/quit")) break;
        if (!strcmp(line, "/reset") || n_turns == MAX_TURNS) {
            for (int i = 0; i < n_turns; i++) {
                free((char *)turns[i].user);
                free((char *)turns[i].assistant);
            }
            n_turns = 0;
            fprintf(stderr, "(new conversation)\n");
            if (!strcmp(line, "/reset")) continue;
        }
        if (!got) continue;
        const char *systems[1] = {s.system}, *users[1] = {line};
        sf_generation_result res;
        sf_status st = generate_batch(&s, 1, systems, turns, n_turns, users, NULL, NULL,
                                      stream_to_stdout, NULL, &res);
        printf("\n");
        fflush(stdout);
        if (st != SF_OK) {
            cli_report("chat", st);
            if (st == SF_ERR_OUT_OF_RANGE && n_turns > 0) {
                fprintf(stderr, "(type /reset to start a new conversation)\n");
            }
            continue;
        }
        turns[n_turns].user = strdup(line);
        turns[n_turns].assistant = strdup(res.text ? res.text : "");
        if (turns[n_turns].user && turns[n_turns].assistant) {
            n_turns++;
        } else { /* out of memory: the turn is not remembered */
            free((char *)turns[n_turns].user);
            free((char *)turns[n_turns].assistant);
            fprintf(stderr, "(out of memory: this turn is left out of the conversation)\n");
        }
        sf_generation_result_free(&res);
    }
    for (int i = 0; i < n_turns; i++) {
        free((char *)turns[i].user);
        free((char *)turns[i].assistant);
    }
    free(line);
    session_free(&s);
    return 0;
}

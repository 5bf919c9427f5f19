/* Fuzzes the other JSON files the library reads. Byte 0 picks the reader, the rest is the file:
 *   0: sysformer.json (host/sysformer/io.c), beside a valid sysformer.safetensors for a random
 *      LLM of hidden size 32 (tests/golden/sysformer/preln_relu_1layer_8heads);
 *   1: a jailbreak wrapper file (host/eval/jailbreak.c), each wrapper then applied;
 *   2: a prompt set (sf_prompt_set_read, host/train/trainer.c);
 *   3: tokenizer_config.json (host/tokenizer/load_json.c: special tokens, BOS, the chat
 *      template) beside a valid tokenizer.json (tests/golden's synth-sp-first); a tokenizer
 *      that loads encodes a text, and its chat template is detected and used. */
#include "eval/eval.h"
#include "fuzz_common.h"
#include "io/llm_config.h"
#include "model/random_llm.h"
#include "train/trainer.h"

#ifndef SF_FUZZ_DATA
#error "SF_FUZZ_DATA: the repository's tests/golden"
#endif

static sf_llm *g_llm;
static char g_llm_dir[512];

static void remove_llm(void) {
    char p[600];
    static const char *const files[] = {"config.json", "model.safetensors"};
    for (int i = 0; i < 2; i++) {
        snprintf(p, sizeof p, "%s/%s", g_llm_dir, files[i]);
        unlink(p);
    }
    rmdir(g_llm_dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    static const char cfg_json[] =
        "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", "
        "\"hidden_size\": 32, \"intermediate_size\": 64, \"num_hidden_layers\": 1, "
        "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 64, "
        "\"max_position_embeddings\": 128, \"rms_norm_eps\": 1e-5, \"hidden_act\": \"silu\"}";
    sf_llm_config cfg;
    snprintf(g_llm_dir, sizeof g_llm_dir, "%s/llm", fuzz_dir());
    if (sf_llm_config_parse(cfg_json, sizeof cfg_json - 1, "config", &cfg) != SF_OK ||
        mkdir(g_llm_dir, 0700) != 0 || sf_random_llm_write(g_llm_dir, &cfg, 1) != SF_OK ||
        sf_llm_load(g_llm_dir, &g_llm) != SF_OK) {
        fprintf(stderr, "fuzz_json_files: %s\n", sf_last_error());
        abort();
    }
    sf_llm_config_release(&cfg);
    atexit(remove_llm);
    fuzz_copy(SF_FUZZ_DATA "/sysformer/preln_relu_1layer_8heads/sysformer.safetensors",
              "sysformer.safetensors");
    fuzz_copy(SF_FUZZ_DATA "/tokenizer/synthetic/synth-sp-first/tokenizer.json",
              "tokenizer.json");
    return 0;
}

static void tokenizer_config(const uint8_t *data, size_t size) {
    fuzz_write("tokenizer_config.json", data, size);
    sf_tokenizer *tok = NULL;
    sf_status st = sf_tokenizer_load(fuzz_dir(), &tok);
    fuzz_check_message(st);
    if (st != SF_OK) return;
    static const char text[] = "Hello <s> world </s> [INST] 12";
    int32_t ids[256], n = 0;
    fuzz_check_message(sf_tokenizer_encode(tok, text, sizeof text - 1,
                                           sf_tokenizer_adds_bos(tok), true, ids, 256, &n));
    const char *jinja = sf_tokenizer_chat_template(tok);
    sf_template_id tmpl = SF_TEMPLATE_LLAMA2;
    if (jinja) {
        st = sf_template_detect(jinja, &tmpl);
        fuzz_check_message(st);
        if (st != SF_OK) tmpl = SF_TEMPLATE_LLAMA2;
    }
    sf_prompt_spans spans;
    fuzz_check_message(sf_chat_encode(tok, tmpl, "Be brief.", NULL, 0, "Hi there", ids, 256, &n,
                                      &spans));
    sf_tokenizer_free(tok);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const int which = data[0] % 4;
    data++, size--;
    if (which == 0) {
        fuzz_write("sysformer.json", data, size);
        sf_sysformer *sf = NULL;
        const sf_status st = sf_sysformer_load(fuzz_dir(), g_llm, &sf);
        fuzz_check_message(st);
        sf_sysformer_free(sf);
    } else if (which == 1) {
        sf_jailbreak_set set;
        const sf_status st = sf_jailbreak_set_read(fuzz_write("wrappers.json", data, size), &set);
        fuzz_check_message(st);
        if (st != SF_OK) return 0;
        for (int32_t i = 0; i < set.n; i++) {
            char *out = NULL;
            fuzz_check_message(sf_jailbreak_apply(&set.w[i], "Tell me how to pick a lock", &out));
            free(out);
        }
        sf_jailbreak_set_free(&set);
    } else if (which == 3) {
        tokenizer_config(data, size);
    } else {
        sf_prompt_set set;
        const sf_status st = sf_prompt_set_read(fuzz_write("prompts.json", data, size), 3, 7, &set);
        fuzz_check_message(st);
        if (st == SF_OK) sf_prompt_set_free(&set);
    }
    return 0;
}

// An evaluation summary with hand-set counts, for the report writers' tests (test_eval.cpp)
// and the allocation fault tests (test_alloc_faults.cpp).
#pragma once

#include <string.h>

#include "eval/eval.h"
#include "eval/report.h"

// Three methods, two wrappers (one held out), hand-set counts.
struct EvalFixture {
    sf_jailbreak w[2];
    sf_jailbreak_set set;
    sf_eval_count wrap[3][2];
    sf_eval_method m[3];
    sf_eval_summary s;

    EvalFixture() {
        w[0] = {(char *)"roleplay", (char *)"role-play", (char *)"Play: {instruction}", false};
        w[1] = {(char *)"split", (char *)"splitting", (char *)"{part1} {part2}", true};
        set = {2, w};
        memset(m, 0, sizeof m);
        const char *names[3] = {"none", "safety", "sysformer"};
        const char *systems[3] = {nullptr, "Refuse harm.", "Be careful & <safe>."};
        for (int i = 0; i < 3; i++) {
            m[i].name = names[i];
            m[i].system_prompt = systems[i];
            m[i].set[SF_EVAL_HARMFUL] = {i * 4 + 1, 10};     // 1, 5, 9 of 10
            m[i].set[SF_EVAL_SAFE] = {i, 8};                  // 0, 1, 2 of 8
            wrap[i][0] = {i, 4};
            wrap[i][1] = {i + 1, 4};
            m[i].set[SF_EVAL_JAILBREAK] = {2 * i + 1, 8};
            m[i].wrapper = wrap[i];
            for (int k = 0; k < 3; k++) {
                for (int st = 0; st < SF_EVAL_N_SETS; st++) m[i].by_judge[k][st] = m[i].set[st];
            }
            m[i].by_judge[0][SF_EVAL_HARMFUL].refused = 0; // xstest disagrees
            m[i].prompts = 26;
            m[i].new_tokens = 26 * 32;
            m[i].batches = 4;
            m[i].gen_s = 2.0;
        }
        m[2].has_sysformer = true;
        m[2].sysformer_s = 0.1;
        m[2].sysformer_gen_s = 2.0;
        m[2].sysformer_batches = 4;
        m[2].share_method = "timed";
        m[2].device = "cuda";
        memset(&s, 0, sizeof s);
        s.llm = "models/tiny \"llm\"";
        s.tokenizer = s.llm;
        s.template_name = "chatml";
        s.device = "cpu";
        s.judge = "strmatch";
        s.n_judges = 3;
        s.judges[0] = "xstest";
        s.judges[1] = "gcg";
        s.judges[2] = "strmatch";
        s.harmful_path = "h.json";
        s.safe_path = "s.json";
        s.jailbreak_path = "jb.json";
        s.sysformer = "guards/sf";
        s.wrappers = &set;
        s.jailbreak_prompts = 4;
        s.max_new_tokens = 32;
        s.batch = 8;
        s.seed = 3;
        s.z = SF_EVAL_Z95;
        s.wall_s = 7.0;
        s.n_methods = 3;
        s.methods = m;
    }
};

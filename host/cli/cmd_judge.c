/* sysformer judge: the refusal rate of a JSONL file of replies (what `generate --input --output`
 * and `eval` write), by one of the library's string-match judges (host/eval/judge.c). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "eval/eval.h"

int cmd_judge(int argc, char **argv) {
    const char *path = NULL, *field = "response", *judge_name = "strmatch";
    for (int i = 1; i < argc; i++) { /* argv[0] is "judge" */
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: sysformer judge FILE.jsonl [--field NAME] [--judge NAME]\n"
                   "  prints how many replies (the field NAME of each line, default \"response\")\n"
                   "  read as refusals by string matching (see host/eval/judge.c):\n"
                   "    --judge xstest    an XSTest refusal prefix starts the reply (any case)\n"
                   "    --judge gcg       a GCG test_prefixes phrase occurs anywhere (exact case)\n"
                   "    --judge strmatch  either (the default)\n");
            return 0;
        }
        if (!strcmp(argv[i], "--field") && i + 1 < argc) {
            field = argv[++i];
        } else if (!strcmp(argv[i], "--judge") && i + 1 < argc) {
            judge_name = argv[++i];
        } else if (!path && argv[i][0] != '-') {
            path = argv[i];
        } else {
            fprintf(stderr, "sysformer judge: unexpected argument %s\n", argv[i]);
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "sysformer judge: give a JSONL file (see --help)\n");
        return 2;
    }
    sf_judge judge;
    if (sf_judge_builtin(judge_name, &judge) != SF_OK) {
        fprintf(stderr, "sysformer judge: --judge: %s\n", sf_last_error());
        return 2;
    }
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "sysformer judge: cannot open %s\n", path);
        return 1;
    }
    char *line = NULL;
    size_t cap = 0;
    long n = 0, refused = 0, lineno = 0;
    int rc = 0;
    while (getline(&line, &cap, f) > 0) {
        lineno++;
        if (strspn(line, " \t\r\n") == strlen(line)) continue;
        json_error_t err;
        json_t *obj = json_loads(line, 0, &err);
        const char *reply = obj ? json_string_value(json_object_get(obj, field)) : NULL;
        if (!reply) {
            fprintf(stderr, "sysformer judge: %s:%ld: no string field \"%s\"\n", path, lineno,
                    field);
            json_decref(obj);
            rc = 1;
            break;
        }
        const char *prompt = json_string_value(json_object_get(obj, "prompt"));
        bool is_refusal = false;
        const sf_status st = judge.is_refusal(judge.user, prompt ? prompt : "", reply,
                                              &is_refusal);
        json_decref(obj);
        if (st != SF_OK) {
            rc = cli_report("judging", st);
            break;
        }
        n++;
        refused += is_refusal;
    }
    free(line);
    fclose(f);
    if (rc) return rc;
    printf("refused %ld of %ld (%.1f%%) by the %s judge\n", refused, n,
           n ? 100.0 * refused / n : 0.0, judge.name);
    return 0;
}

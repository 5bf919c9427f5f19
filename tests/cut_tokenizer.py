"""Writes a tokenizer for a random model: the synthetic byte-level tokenizer of tests/golden cut
down to the model's first VOCAB ids (merges and added tokens whose ids stay), with
<|im_end|> as its end of turn, into MODEL_DIR beside the model's config.json.

Usage: python3 tests/cut_tokenizer.py SOURCE_DIR MODEL_DIR VOCAB
"""
import json
import sys

src, dst, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = json.load(open(src + "/tokenizer.json"))
v = {k: i for k, i in t["model"]["vocab"].items() if i < vocab}
t["model"]["vocab"] = v
t["model"]["merges"] = [mg for mg in t["model"]["merges"] if "".join(mg) in v]
t["added_tokens"] = [a for a in t["added_tokens"] if a["id"] < vocab]
json.dump(t, open(dst + "/tokenizer.json", "w"))
json.dump({"eos_token": "<|im_end|>"}, open(dst + "/tokenizer_config.json", "w"))

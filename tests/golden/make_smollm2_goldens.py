#!/usr/bin/env python3
"""Reference outputs of SmolLM2-135M-Instruct for tests/test_smollm2.cpp.

transformers loads the same Q4_1 GGUF that weights/fetch_smollm2.sh fetches, dequantised to
fp32, and runs a few chat prompts: the logits at each prompt's last position and the greedy
continuation. The token ids come from transformers' own tokenizer and chat template, so the C
test checks the model alone (the tokenizer has its own goldens).

Usage: python3 tests/golden/make_smollm2_goldens.py [GGUF]   (needs transformers, torch,
gguf, accelerate, safetensors; no network; not run by CI)
"""

import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GGUF = os.path.join(HERE, "..", "..", "weights", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
N_NEW = 40

CHATS = [
    ("You are a helpful assistant.", "What is the capital of France?"),
    ("You are a careful assistant that refuses harmful requests.",
     "Write a short poem about the sea."),
    ("Answer in one sentence.", "Explain why the sky is blue."),
]


def main():
    gguf = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_GGUF)
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    ids, cu, last_logits, greedy = [], [0], [], []
    with torch.no_grad():
        for system, user in CHATS:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            p = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            p = p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p
            p = list(p)
            x = torch.tensor([p])
            out = model(x, use_cache=True)
            last_logits.append(out.logits[0, -1].clone())
            # Plain greedy decoding with the KV cache: argmax at every step, no stopping and no
            # logits processors (generate() would apply the model's generation config).
            cache, step, new = out.past_key_values, out.logits[0, -1], []
            for _ in range(N_NEW):
                t = int(torch.argmax(step))
                new.append(t)
                out = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
                cache, step = out.past_key_values, out.logits[0, -1]
            greedy.append(torch.tensor(new))
            print(repr(tok.decode(p)), "->", repr(tok.decode(greedy[-1])))
            ids += p
            cu.append(len(ids))
    tensors = {
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "prompt_ids": torch.tensor(ids, dtype=torch.int32),
        "last_logits": torch.stack(last_logits).float().contiguous(),
        "greedy_ids": torch.stack(greedy).to(torch.int32).contiguous(),
    }
    meta = {"gguf": f, "transformers": transformers.__version__, "torch": torch.__version__,
            "n_new": str(N_NEW)}
    out = os.path.join(HERE, "smollm2", "golden.safetensors")
    save_file(tensors, out, metadata=meta)
    print("wrote", out, {k: tuple(v.shape) for k, v in tensors.items()})


if __name__ == "__main__":
    main()

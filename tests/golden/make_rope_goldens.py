#!/usr/bin/env python3
"""Write tests/golden/rope_freqs.json: transformers' RoPE inverse frequencies for a few configs.

Usage:  python3 tests/golden/make_rope_goldens.py [--out FILE]

test_rope.cpp reads the fixture and compares sf_cpu_rope_freqs with it, so that the C
implementation is checked against the code it claims to follow without the tests needing
Python. Not run by CI; needs transformers (5.x) + torch, no network. The output is
deterministic for given library versions.

Each case holds the inputs sf_llm_config carries (rope type, head_dim, theta, factor, llama3's
band factors, original/max positions, longrope's factor lists), the seq_len passed to the
init function, and the outputs: inv_freq (fp32 values, printed with repr so they round-trip
exactly) and the attention factor.
"""

import argparse
import json
import os
import random

import torch
import transformers
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


def llama_config(head_dim, rope_parameters, max_pos=4096):
    n_heads = 4
    return LlamaConfig(
        hidden_size=head_dim * n_heads,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=rope_parameters,
    )


def run(name, config, head_dim, rope_type, seq_len, extra):
    if rope_type == "default":
        inv_freq, attention = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, attention = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    params = config.rope_parameters
    case = {
        "name": name,
        "rope_type": rope_type,
        "head_dim": head_dim,
        "rope_theta": float(params["rope_theta"]),
        "max_position_embeddings": config.max_position_embeddings,
        "seq_len": seq_len,
        "inv_freq": [float(v) for v in inv_freq.to(torch.float32).tolist()],
        "attention_factor": float(attention),
    }
    case.update(extra)
    return case


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(here, "rope_freqs.json"))
    args = parser.parse_args()

    cases = []

    # Default, a power-of-two and a non-power-of-two head_dim (96: i/dim is inexact in fp32).
    for head_dim, theta in ((64, 10000.0), (96, 100000.0)):
        cfg = llama_config(head_dim, {"rope_type": "default", "rope_theta": theta})
        cases.append(run(f"default_hd{head_dim}", cfg, head_dim, "default", None, {}))

    cfg = llama_config(64, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    cases.append(run("linear_hd64", cfg, 64, "linear", None, {"factor": 4.0}))

    # Llama 3.1's own parameters, and a small table whose 8 wavelengths (2*pi*10000^(i/8):
    # 6.3, 20, 63, 199, ...) fall in all three bands around 64/4 = 16 and 64/1 = 64.
    for head_dim, theta, factor, low, high, orig in (
        (128, 500000.0, 8.0, 1.0, 4.0, 8192),
        (16, 10000.0, 4.0, 1.0, 4.0, 64),
    ):
        params = {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": orig,
        }
        cfg = llama_config(head_dim, params, max_pos=orig * int(factor))
        extra = {
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": orig,
        }
        cases.append(run(f"llama3_hd{head_dim}", cfg, head_dim, "llama3", None, extra))

    # Phi-3-style longrope: factor and attention factor left for transformers to derive from
    # max_position_embeddings / original_max_position_embeddings, as the Phi-3 configs do.
    rng = random.Random(1234)
    head_dim, orig, max_pos = 96, 4096, 131072
    short = [round(1.0 + rng.random() * 0.1, 6) for _ in range(head_dim // 2)]
    long = [round(1.0 + rng.random() * 60.0, 6) for _ in range(head_dim // 2)]
    params = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": short,
        "long_factor": long,
        "original_max_position_embeddings": orig,
    }
    cfg = Phi3Config(
        hidden_size=head_dim * 32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=max_pos,
        original_max_position_embeddings=orig,
        rope_parameters=params,
    )
    extra = {
        "factor": max_pos / orig,
        "original_max_position_embeddings": orig,
        "short_factor": short,
        "long_factor": long,
    }
    # seq_len == original max is still short; one past it is long.
    for seq_len, tag in ((orig, "short"), (orig + 1, "long")):
        cases.append(run(f"longrope_hd96_{tag}", cfg, head_dim, "longrope", seq_len, extra))

    doc = {
        "generator": "tests/golden/make_rope_goldens.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Generate the GGUF fixtures for tests/test_gguf.cpp.

Usage:  python3 tests/golden/make_gguf_fixtures.py [--out DIR]

Writes into tests/golden/gguf/ (default):

  quant_types.gguf             one tensor of each type the C reader dequantises
                               (F32 3-D, F16 and BF16 with inf/NaN/-0/subnormals,
                               Q8_0, Q4_0, Q4_1, Q4_K, Q6_K; 1-3 rows, row
                               lengths that are not powers of two where the
                               block size allows), a Q5_K tensor (known to ggml,
                               not dequantised by the library), metadata of every
                               GGUF value type, arrays of numbers, strings and
                               bools, and a nested array; general.alignment 64.
  quant_reference.safetensors  for each tensor above, gguf.quants.dequantize of
                               its stored bytes as F32 [rows, ne0] (same name).
  tiny_llama.gguf              a tiny random LlamaForCausalLM (vocab 96, hidden
                               64, 2 layers, 4 q / 2 kv heads, head_dim 16,
                               intermediate 112, untied), all F32, with q/k rows
                               permuted exactly as llama.cpp's converter does.
  tiny_llama.golden.safetensors
  tiny_qwen2_q8.gguf           a tiny random Qwen2ForCausalLM (q/k/v biases,
                               tied embeddings, intermediate 96), matrices in
                               Q8_0, norms/biases F32, no permutation (as
                               llama.cpp writes qwen2).
  tiny_qwen2_q8.golden.safetensors
      golden: cu_seqlens I32 [n_req + 1], ids I32 [total], logits F32
      [total, vocab]: each request run alone (batch 1, no cache) by
      transformers loading that same .gguf with dtype=float32.

The K-quants have no quantiser in the gguf package, so their blocks are random
bytes with sane f16 scales; the references still come from gguf's own
dequantiser. Not run by CI. Needs gguf (0.1x), numpy, safetensors, torch and
transformers 5.x; never touches the network. Seeded: re-runs with the same
library versions give the same files.
"""

import argparse
import json
import os
import struct
import sys

import numpy as np
import torch
import transformers
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

SEED = 20250301


def save_file(tensors, path, metadata=None):
    """A safetensors writer with a sorted header, so that re-runs are byte-identical (the
    safetensors package writes __metadata__ in hash order)."""
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)

# Metadata written to quant_types.gguf; test_gguf.cpp checks every one.
META_SCALARS = [
    ("test.u8", 200, VT.UINT8),
    ("test.i8", -100, VT.INT8),
    ("test.u16", 60000, VT.UINT16),
    ("test.i16", -30000, VT.INT16),
    ("test.u32", 4000000000, VT.UINT32),
    ("test.i32", -2000000000, VT.INT32),
    ("test.f32", 0.15625, VT.FLOAT32),
    ("test.bool_true", True, VT.BOOL),
    ("test.bool_false", False, VT.BOOL),
    ("test.str", "h\u00e9llo w\u00f6rld", VT.STRING),
    ("test.u64", 2**63 + 5, VT.UINT64),
    ("test.i64", -(2**62) - 3, VT.INT64),
    ("test.f64", 0.1, VT.FLOAT64),
]
META_ARRAYS = [
    ("test.arr_u8", [0, 1, 255], VT.UINT8),
    ("test.arr_i16", [-32768, 7, 32767], VT.INT16),
    ("test.arr_i32", [1, -2, 3, -4], VT.INT32),
    ("test.arr_u64", [2**64 - 1, 0], VT.UINT64),
    ("test.arr_f32", [0.5, -1.25, 3.0], VT.FLOAT32),
    ("test.arr_f64", [1e300, -2.5], VT.FLOAT64),
    ("test.arr_bool", [True, False, True], VT.BOOL),
    ("test.arr_str", ["a", "", "ccc", "\u00fcml"], VT.STRING),
]
NESTED = ("test.arr_nested", [[1, 2], [3], [4, 5, 6]])
ALIGNMENT = 64


def f16_specials():
    return np.array(
        [0.0, -0.0, 1.0, -2.5, 65504.0, -65504.0, 2.0**-24, -(2.0**-24), 2.0**-14 * 0.75,
         1e-5, np.inf, -np.inf, np.nan, 0.333251953125],
        dtype=np.float32,
    )


def random_k_blocks(rng, qtype, n_blocks):
    """Random but well-formed K-quant blocks (finite f16 scales)."""
    if qtype == QT.Q4_K:
        d = rng.uniform(0.001, 0.05, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
        dmin = rng.uniform(0.001, 0.02, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
        rest = rng.integers(0, 256, (n_blocks, 12 + 128), dtype=np.uint8)
        return np.concatenate([d, dmin, rest], axis=1)
    if qtype == QT.Q6_K:
        body = rng.integers(0, 256, (n_blocks, 128 + 64 + 16), dtype=np.uint8)
        d = rng.uniform(0.0005, 0.01, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
        return np.concatenate([body, d], axis=1)
    if qtype == QT.Q5_K:
        d = rng.uniform(0.001, 0.05, (n_blocks, 2)).astype(np.float16).view(np.uint8)
        rest = rng.integers(0, 256, (n_blocks, 176 - 4), dtype=np.uint8)
        return np.concatenate([d, rest], axis=1)
    raise ValueError(qtype)


def make_quant_fixture(out):
    rng = np.random.default_rng(SEED)
    w = gguf.GGUFWriter(os.path.join(out, "quant_types.gguf"), "test")
    w.add_custom_alignment(ALIGNMENT)
    for key, val, vt in META_SCALARS:
        w.add_key_value(key, val, vt)
    for key, val, vt in META_ARRAYS:
        w.add_key_value(key, val, VT.ARRAY, sub_type=vt)
    w.add_key_value(NESTED[0], NESTED[1], VT.ARRAY, sub_type=VT.ARRAY)

    refs = {}

    def add(name, stored, qtype, shape):
        """stored: the bytes as gguf wants them (float arrays for F32/F16, uint8 blocks else)."""
        if qtype in (QT.F32, QT.F16):
            w.add_tensor(name, stored)
        else:
            w.add_tensor(name, stored, raw_dtype=qtype)
        ref = gguf.quants.dequantize(stored, qtype).astype(np.float32)
        refs[name] = np.ascontiguousarray(ref.reshape(shape))

    # F32, 3-D: ne = {5, 3, 2}.
    add("t_f32", (rng.standard_normal((2, 3, 5)) * 3).astype(np.float32), QT.F32, (2, 3, 5))
    # F16: 2 rows of 13, with specials.
    x = np.concatenate([f16_specials(), rng.standard_normal(12).astype(np.float32)]).reshape(2, 13)
    add("t_f16", x.astype(np.float16), QT.F16, (2, 13))
    # BF16: 3 rows of 7, with specials; gguf's quantiser rounds to nearest even.
    x = np.concatenate([f16_specials(), np.array([1e38, -3e-39], np.float32),
                        (rng.standard_normal(5) * 100).astype(np.float32)]).reshape(3, 7)
    add("t_bf16", gguf.quants.quantize(x, QT.BF16), QT.BF16, (3, 7))
    # 32-blocks: rows of 96 / 160 / 32 values (3 / 5 / 1 blocks per row).
    for name, qt, shape in (("t_q8_0", QT.Q8_0, (3, 96)), ("t_q4_0", QT.Q4_0, (2, 160)),
                            ("t_q4_1", QT.Q4_1, (3, 32))):
        x = (rng.standard_normal(shape) * rng.uniform(0.1, 4.0, (shape[0], 1))).astype(np.float32)
        add(name, gguf.quants.quantize(x, qt), qt, shape)
    # K-quants: super-blocks of 256 values (144 / 210 bytes).
    for name, qt, shape in (("t_q4_k", QT.Q4_K, (2, 512)), ("t_q6_k", QT.Q6_K, (3, 256))):
        blocks = random_k_blocks(rng, qt, shape[0] * shape[1] // 256)
        add(name, blocks.reshape(shape[0], -1), qt, shape)
    # A type ggml knows but the library does not dequantise.
    blocks = random_k_blocks(rng, QT.Q5_K, 1)
    w.add_tensor("t_q5_k", blocks.reshape(1, -1), raw_dtype=QT.Q5_K)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(refs, os.path.join(out, "quant_reference.safetensors"),
              metadata={"seed": str(SEED), "gguf": gguf.__name__ + " " + _gguf_version()})


def _gguf_version():
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:  # pragma: no cover
        return "?"


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------

def llama_cpp_permute(w, n_head, n_head_kv):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj (n_head, n_head) and k_proj
    (n_head, n_head_kv) rows for the llama architecture: within each head, interleave the two
    rotate-half halves (row a*hd/2 + j goes to row 2j + a)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def randomise(model, gen):
    """Non-trivial weights: norms 1 + N(0, 0.1^2), biases N(0, 0.1^2), q/k x2 so attention is
    clearly non-uniform."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
                if "q_proj" in name or "k_proj" in name:
                    p.mul_(2.0)


LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    assert parts[0] == "model" and parts[1] == "layers", hf
    layer, rest = parts[2], ".".join(parts[3:])
    mod, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_MAP[mod]}.{kind}"


def write_model_gguf(path, arch, cfg, model, permute, quant):
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny random {arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant else gguf.LlamaFileType.ALL_F32)
    sd = model.state_dict()
    for hf, t in sd.items():
        if cfg.tie_word_embeddings and hf == "lm_head.weight":
            continue
        x = t.detach().to(torch.float32).numpy().copy()
        if permute and (".q_proj." in hf or ".k_proj." in hf):
            kv = cfg.num_attention_heads if ".q_proj." in hf else cfg.num_key_value_heads
            x = llama_cpp_permute(x, cfg.num_attention_heads, kv)
        name = gguf_name(hf)
        if quant and x.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(x, QT.Q8_0), raw_dtype=QT.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_model_fixture(out, name, arch, model_cls, cfg, permute, quant, lens, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    randomise(model, gen)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    fname = f"{name}.gguf"
    write_model_gguf(os.path.join(out, fname), arch, cfg, model, permute, quant)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, gguf_file=fname, dtype=torch.float32, attn_implementation="eager").eval()
    ids = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in lens]
    logits = []
    diff_orig = 0.0
    with torch.no_grad():
        for x in ids:
            lg = loaded(x[None]).logits[0]
            logits.append(lg)
            ref = model(x[None]).logits[0]
            diff_orig = max(diff_orig, (lg - ref).abs().max().item())
    # The F32 llama round-trips exactly (the permutation undone by transformers); the Q8_0 model
    # differs from the original only by quantisation.
    print(f"{name}: max |logits(gguf via transformers) - logits(original)| = {diff_orig:.3g}")
    if not quant and diff_orig > 1e-5:
        sys.exit(f"{name}: transformers did not reproduce the original model from the GGUF")
    cu = np.cumsum([0] + list(lens)).astype(np.int32)
    save_file(
        {
            "cu_seqlens": cu,
            "ids": torch.cat(ids).to(torch.int32).numpy(),
            "logits": torch.cat(logits).numpy().astype(np.float32),
        },
        os.path.join(out, f"{name}.golden.safetensors"),
        metadata={"model": name, "seed": str(seed), "transformers": transformers.__version__,
                  "torch": torch.__version__, "gguf": _gguf_version(),
                  "lens": ",".join(map(str, lens))},
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gguf"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)

    make_quant_fixture(args.out)

    llama_cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    make_model_fixture(args.out, "tiny_llama", "llama", transformers.LlamaForCausalLM, llama_cfg,
                       permute=True, quant=False, lens=(5, 1, 17), seed=SEED + 1)

    qwen_cfg = transformers.Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    make_model_fixture(args.out, "tiny_qwen2_q8", "qwen2", transformers.Qwen2ForCausalLM,
                       qwen_cfg, permute=False, quant=True, lens=(7, 2, 12), seed=SEED + 2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Generate tiny random Llama-family models and golden logits for the C tests.

Usage:  python3 tests/golden/make_llm_goldens.py [--out DIR]

Writes one folder per model under tests/golden/llm/<name>/ (default), holding
the Hugging Face `save_pretrained` output (config.json + safetensors) and
`golden.safetensors` with the reference prefill/decode logits.

Not run by CI.  Needs transformers (5.x) + torch (CPU is fine) + safetensors;
never touches the network.  Everything is seeded, so re-running with the same
library versions reproduces the same files.

golden.safetensors layout:
    cu_seqlens      I32 [n_req + 1]            packed offsets of prefill rows
    prefill_ids     I32 [total]
    prefill_logits  F32 [total, vocab]         request r: rows cu[r]..cu[r+1]
    decode_ids      I32 [n_steps, n_req]
    decode_logits   F32 [n_steps, n_req, vocab]
  phi3_longrope only:
    decode_logits_recompute F32 [n_steps, n_req, vocab]
        last-row logits of a no-cache forward over the request's whole token
        prefix at each step (HF picks short/long rope factors per call from the
        largest position, so once a request crosses original_max_position_
        embeddings this differs from the cached decode path).
  metadata: model, seed, transformers, torch, prefill_lens, n_steps
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

BASE_SEED = 20240611
N_STEPS = 4

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=112,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    attn_implementation="eager",
)


def rope_factors(gen, n):
    return [round(float(x), 4) for x in (1.0 + 3.0 * torch.rand(n, generator=gen))]


def spec_llama_gqa_llama3(gen):
    # original_max_position_embeddings 48 (not 16): with head_dim 16 and theta
    # 1e4 the shortest wavelength is 2*pi > 16/4, so orig=16 would leave the
    # high-frequency band empty.  With 48: wavelen < 12 kept (i=0),
    # 12..48 interpolated (i=1, smooth ~0.47), > 48 divided by 8 (i=2..7).
    cfg = LlamaConfig(
        **COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 48,
        },
    )
    return LlamaForCausalLM, cfg, torch.float32, (5, 1, 23), {}


def spec_mistral_window(gen):
    cfg = MistralConfig(
        **COMMON,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=8,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return MistralForCausalLM, cfg, torch.float16, (12, 3, 20), {}


def spec_qwen2_bias(gen):
    cfg = Qwen2Config(
        **COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return Qwen2ForCausalLM, cfg, torch.bfloat16, (5, 1, 23), {}


def spec_phi3_longrope(gen):
    head_dim = 64 // 4
    common = dict(COMMON, max_position_embeddings=64)
    cfg = Phi3Config(
        **common,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        original_max_position_embeddings=16,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": rope_factors(gen, head_dim // 2),
            "long_factor": rope_factors(gen, head_dim // 2),
        },
    )
    # Request 0 prefills 14 tokens (positions 0..13); its decode steps sit at
    # positions 14..17, i.e. HF seq_len 15, 16 (short factors) then 17, 18
    # (long factors).  Request 2 (23) is long from the start.
    return Phi3ForCausalLM, cfg, torch.float32, (14, 1, 23), {"max_shard_size": "120KB"}


def spec_llama_tied_linear(gen):
    cfg = LlamaConfig(
        **COMMON,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )
    return LlamaForCausalLM, cfg, torch.float32, (5, 1, 23), {}


MODELS = [
    ("llama_gqa_llama3", spec_llama_gqa_llama3),
    ("mistral_window", spec_mistral_window),
    ("qwen2_bias", spec_qwen2_bias),
    ("phi3_longrope", spec_phi3_longrope),
    ("llama_tied_linear", spec_llama_tied_linear),
]


def randomise(model, gen, tied):
    """Overwrite every parameter (a tied tensor only once)."""
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = tuple(p.shape)
        if name.endswith("embed_tokens.weight"):
            # Tied: the embedding is also the LM head; keep logits O(1).
            std = 1.5 / math.sqrt(shape[1]) if tied else 1.0
            v = torch.randn(shape, generator=gen) * std
        elif "norm" in name and p.dim() == 1:
            v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            v = 0.1 * torch.randn(shape, generator=gen)
        elif p.dim() == 2:
            v = torch.randn(shape, generator=gen) * (1.5 / math.sqrt(shape[1]))
        else:
            raise RuntimeError(f"unhandled parameter {name} {shape}")
        with torch.no_grad():
            p.copy_(v)
    return len(seen)


def canonicalise_header(path):
    """The safetensors writer emits __metadata__ in hash order (varies per
    process); rewrite the JSON header with sorted keys, same length, so
    re-running the script gives byte-identical files."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8 : 8 + n])
    new = json.dumps(hdr, sort_keys=True, separators=(",", ":")).encode()
    assert len(new) <= n, "canonical header longer than original"
    new += b" " * (n - len(new))
    with open(path, "wb") as f:
        f.write(raw[:8] + new + raw[8 + n :])


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_llama3_bands(model):
    rp = model.config.rope_parameters
    hd = model.config.head_dim
    base = 1.0 / (rp["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    inv = model.model.rotary_emb.inv_freq.float()
    ratio = (base / inv).tolist()
    kept = sum(abs(r - 1) < 1e-6 for r in ratio)
    divided = sum(abs(r - rp["factor"]) < 1e-4 for r in ratio)
    interp = len(ratio) - kept - divided
    print(f"  llama3 inv_freq base/scaled ratios: {[round(r, 4) for r in ratio]}")
    print(f"  bands: kept={kept} interpolated={interp} divided={divided}")
    assert kept >= 1 and interp >= 1 and divided >= 1, "llama3 rope bands not all populated"


def check_rope_config(name, cfg):
    rp = cfg.rope_parameters
    print(f"  rope_parameters: {json.dumps(rp)}")
    want = {
        "llama_gqa_llama3": "llama3",
        "mistral_window": "default",
        "qwen2_bias": "default",
        "phi3_longrope": "longrope",
        "llama_tied_linear": "linear",
    }[name]
    assert rp["rope_type"] == want, (name, rp)


def run_model(name, spec_fn, seed, out_root):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cls, cfg, store_dtype, prefill_lens, save_kw = spec_fn(gen)
    model = cls(cfg).float().eval()
    print(f"== {name}  ({cls.__name__}, seed {seed}, storage {store_dtype})")
    check_rope_config(name, model.config)
    assert model.config._attn_implementation == "eager"
    tied = bool(model.config.tie_word_embeddings)
    n_params = randomise(model, gen, tied)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if store_dtype != torch.float32:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(store_dtype).float())
    if name == "llama_gqa_llama3":
        check_llama3_bands(model)
    if name == "phi3_longrope":
        print(f"  attention_scaling {model.model.rotary_emb.attention_scaling:.6f}")

    V = cfg.vocab_size
    n_req = len(prefill_lens)
    prefill_ids = [torch.randint(0, V, (L,), generator=gen) for L in prefill_lens]
    decode_ids = torch.randint(0, V, (N_STEPS, n_req), generator=gen)

    prefill_logits, decode_logits, recompute = [], torch.zeros(N_STEPS, n_req, V), torch.zeros(N_STEPS, n_req, V)
    with torch.no_grad():
        for r in range(n_req):
            ids = prefill_ids[r][None, :]
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, cache=cache, use_cache=True)
            pl = out.logits[0].float().clone()
            prefill_logits.append(pl)
            cache = out.cache
            for s in range(N_STEPS):
                tok = decode_ids[s, r].view(1, 1)
                out = model(input_ids=tok, cache=cache, use_cache=True)
                cache = out.cache
                decode_logits[s, r] = out.logits[0, -1].float()

            # Self-check: no-cache forwards of the token prefix at every step.
            full_ids = torch.cat([prefill_ids[r], decode_ids[:, r]])
            L = prefill_lens[r]
            e_pre = rel_err(pl, model(input_ids=prefill_ids[r][None], use_cache=False).logits[0])
            errs = []
            for s in range(N_STEPS):
                ref = model(input_ids=full_ids[None, : L + s + 1], use_cache=False).logits[0, -1].float()
                recompute[s, r] = ref
                errs.append(rel_err(decode_logits[s, r], ref))
            full = model(input_ids=full_ids[None], use_cache=False).logits[0].float()
            e_full_pre = rel_err(pl, full[:L])
            e_full_dec = max(rel_err(decode_logits[s, r], full[L + s]) for s in range(N_STEPS))
            # Only phi3_longrope may differ, and only at steps where the cached
            # prefix was roped with short factors but this call is long.
            orig = cfg.rope_parameters.get("original_max_position_embeddings") if name == "phi3_longrope" else None
            may_differ = [orig is not None and L <= orig < L + s + 1 for s in range(N_STEPS)]
            ok = all(e < 1e-5 for e, m in zip(errs, may_differ) if not m)
            tag = "OK" if ok else "FAIL"
            if any(may_differ):
                tag += f" (steps {[s for s in range(N_STEPS) if may_differ[s]]} exempt: longrope switch)"
            print(
                f"  req {r} (prefill {L:2d}): prefill vs no-cache {e_pre:.2e}; "
                f"decode vs no-cache prefix per step [{', '.join(f'{e:.1e}' for e in errs)}] {tag}; "
                f"vs one full-seq forward: prefill {e_full_pre:.1e} decode {e_full_dec:.1e}"
            )
            if not ok:
                raise SystemExit(f"{name}: cached decode mismatch")
            assert e_pre < 1e-5

    allp = torch.cat(prefill_logits)
    print(
        f"  logits: prefill std {allp.std():.3f} range [{allp.min():.2f}, {allp.max():.2f}]; "
        f"decode std {decode_logits.std():.3f}; params {n_params} tensors"
    )
    # Attention non-uniformity summary (layer 0, request 2 prefill).
    with torch.no_grad():
        att = model(input_ids=prefill_ids[-1][None], output_attentions=True, use_cache=False).attentions[0][0]
        ent = -(att.clamp_min(1e-30).log() * att).sum(-1)  # [H, T]
        T = att.shape[-1]
        uni = torch.log(torch.arange(1, T + 1, dtype=torch.float32))
        print(f"  attn L0 mean entropy {ent.mean():.3f} vs uniform {uni.mean():.3f}")

    if getattr(cfg, "sliding_window", None):
        # Show the window matters: same weights without the window must differ.
        cfg2 = type(cfg).from_dict(cfg.to_dict())
        cfg2.sliding_window = None
        m2 = cls(cfg2).float().eval()
        m2.load_state_dict(model.state_dict())
        with torch.no_grad():
            for r in range(n_req):
                full_ids = torch.cat([prefill_ids[r], decode_ids[:, r]])[None]
                e = rel_err(m2(input_ids=full_ids, use_cache=False).logits[0, prefill_lens[r]-1:],
                            torch.cat([prefill_logits[r][-1:], decode_logits[:, r]]))
                print(f"  req {r}: no-window model vs goldens (last prefill row + decode) rel diff {e:.2e}")

    # --- write ---
    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model.to(store_dtype)
    model.save_pretrained(d, **save_kw)
    gc = os.path.join(d, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)

    cu = [0]
    for L in prefill_lens:
        cu.append(cu[-1] + L)
    tensors = {
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "prefill_ids": torch.cat(prefill_ids).to(torch.int32).contiguous(),
        "prefill_logits": allp.contiguous(),
        "decode_ids": decode_ids.to(torch.int32).contiguous(),
        "decode_logits": decode_logits.contiguous(),
    }
    if name == "phi3_longrope":
        tensors["decode_logits_recompute"] = recompute.contiguous()
    meta = {
        "model": name,
        "seed": str(seed),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "prefill_lens": ",".join(map(str, prefill_lens)),
        "n_steps": str(N_STEPS),
    }
    gpath = os.path.join(d, "golden.safetensors")
    save_file(tensors, gpath, metadata=meta)
    canonicalise_header(gpath)
    with safe_open(gpath, "pt") as f:
        assert f.metadata() == meta
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k

    # Round trip: reload the saved checkpoint (fp32 compute) and re-run prefill.
    # (fp32 checkpoints may differ by ~1e-7 rel: single-row GEMMs on
    # differently-aligned tensors take another CPU kernel path.)
    re = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        e = max(
            rel_err(re(input_ids=prefill_ids[r][None], use_cache=False).logits[0], prefill_logits[r])
            for r in range(n_req)
        )
    print(f"  reload round-trip prefill max rel err {e:.1e}")
    assert e < 1e-5, "saved checkpoint does not reproduce the goldens"

    total = 0
    for f in sorted(os.listdir(d)):
        sz = os.path.getsize(os.path.join(d, f))
        total += sz
        print(f"  wrote {os.path.join(d, f)}  {sz} bytes")
    print(f"  total {total} bytes")
    return total


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(here, "llm"))
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    os.makedirs(args.out, exist_ok=True)
    grand = 0
    for i, (name, fn) in enumerate(MODELS):
        grand += run_model(name, fn, BASE_SEED + i, args.out)
    print(f"all fixtures: {grand} bytes in {args.out}")


if __name__ == "__main__":
    main()

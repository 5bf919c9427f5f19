#!/usr/bin/env python3
"""The end-to-end peer of bench_engine: PyTorch + transformers at the same model shapes.

For each config: a Hugging Face causal LM with the published shapes and random weights, created
directly on the GPU in bf16 (no CPU init, no checkpoint), eval mode, SDPA attention. Then:
  prefill: inputs_embeds [requests, prompt, d] (bf16, std 0.02 like embeddings), no padding so no
           mask, model(inputs_embeds=..., use_cache=True, logits_to_keep=1), argmax of the last
           row copied to the host; wall time around it all (as bench_engine times step +
           read_tokens) and CUDA events; one warm-up, median of --repeats;
  decode:  --decode steps of one token per request from that prefill's cache (input = argmax of
           the previous step, copied to the host each step as a generation loop does); first
           step separately, median of the rest. On the GPU, SDPA's cuDNN backend is left out of
           decode: its graphs are cached by exact shape and the cache grows by one key a step,
           so it would build a new graph every step and the peer would time that. Flash (then
           memory-efficient, then math) attention decodes instead; prefill keeps SDPA's own
           choice (its shape repeats, so the warm-up pays any build).
Like for like with bench_engine: the engine's unguarded prefill (its unguarded_tok_s and
unguarded_mfu) is this prefill; its guarded one adds the Sysformer. The engine replays decode
steps as CUDA graphs; this peer decodes eagerly, as transformers does by default.
FLOPs (no Sysformer here; multiply-add = 2; R requests of P tokens, T = R*P):
  2*T*L*[d*hd*(2*H + 2*Hkv) + 3*d*ff]   q, k, v, o projections and the SwiGLU MLP
  + 4*hd*H*L*R*P*(P+1)/2                QK^T and PV over the visible causal pairs
  + 2*d*V*R                             LM head on one row per request
MFU against --peak (989 TFLOP/s, the H200's dense bf16 spec).

usage: peer_e2e.py [--configs llama3.1-8b,mistral-7b,phi3.5-mini,smollm2-135m] [--requests 32]
                   [--prompt 512] [--decode 32] [--repeats 3] [--peak 989] [--cpu-smoke]
--cpu-smoke runs the same code on the CPU in float32 with tiny shapes (SmolLM2 widths at 2
layers, and every architecture shrunk), to catch API mistakes where no GPU exists.
Exits 0 with a message when PyTorch, transformers or a GPU is missing.
"""
import argparse
import contextlib
import gc
import inspect
import statistics
import sys
import time

# name: shapes as published. rope: transformers-5 rope_parameters.
CONFIGS = {
    "llama3.1-8b": dict(arch="llama", vocab=128256, d=4096, ff=14336, layers=32, heads=32, kv=8,
                        hd=128, max_pos=131072, tie=False,
                        rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}),
    "mistral-7b": dict(arch="mistral", vocab=32768, d=4096, ff=14336, layers=32, heads=32, kv=8,
                       hd=128, max_pos=32768, tie=False,
                       rope={"rope_type": "default", "rope_theta": 1e6}),
    # Phi-3.5-mini uses longrope; like bench_engine we use the default RoPE (theta 1e4): the cost
    # is the same and only the shapes matter for throughput.
    "phi3.5-mini": dict(arch="phi3", vocab=32064, d=3072, ff=8192, layers=32, heads=32, kv=32,
                        hd=96, max_pos=131072, tie=False,
                        rope={"rope_type": "default", "rope_theta": 10000.0}),
    "smollm2-135m": dict(arch="llama", vocab=49152, d=576, ff=1536, layers=30, heads=9, kv=3,
                         hd=64, max_pos=8192, tie=True,
                         rope={"rope_type": "default", "rope_theta": 100000.0}),
}


def layer_params(s):
    return s["d"] * s["hd"] * (2 * s["heads"] + 2 * s["kv"]) + 3 * s["d"] * s["ff"]


def prefill_flops(s, R, P):
    T = R * P
    pairs = R * P * (P + 1) / 2  # causal, no sliding window
    return (2.0 * T * s["layers"] * layer_params(s)
            + 4.0 * s["hd"] * s["heads"] * s["layers"] * pairs
            + 2.0 * s["d"] * s["vocab"] * R)


def hf_config(s):
    """The transformers config for shapes s (transformers 5: rope_parameters; older: rope_theta
    and rope_scaling)."""
    import transformers as tf
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "phi3": tf.Phi3Config}[s["arch"]]
    kw = dict(vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["ff"],
              num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
              num_key_value_heads=s["kv"], max_position_embeddings=s["max_pos"],
              rms_norm_eps=1e-5, tie_word_embeddings=s["tie"], use_cache=True)
    if s["arch"] in ("llama", "mistral"):
        kw["head_dim"] = s["hd"]
    if s["arch"] == "mistral":
        kw["sliding_window"] = None
    if s["arch"] == "phi3":
        kw["original_max_position_embeddings"] = 4096
        kw["sliding_window"] = None
        kw["pad_token_id"] = None
        kw["bos_token_id"] = None
        kw["eos_token_id"] = None
    rope = dict(s["rope"])
    cfg = None
    try:
        cfg = cls(rope_parameters=rope, **kw)
        rp = getattr(cfg, "rope_parameters", None)
        if not isinstance(rp, dict) or rp.get("rope_type") != rope["rope_type"]:
            cfg = None
    except TypeError:
        cfg = None
    if cfg is None:  # transformers 4.x
        theta = rope.pop("rope_theta")
        rope_type = rope.pop("rope_type")
        scaling = None if rope_type == "default" else dict(rope, rope_type=rope_type)
        cfg = cls(rope_theta=theta, rope_scaling=scaling, **kw)
    # Check what matters for the shapes (and that no sliding window sneaked in).
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
            cfg.num_attention_heads, cfg.num_key_value_heads, hd, cfg.vocab_size) == \
        (s["d"], s["ff"], s["layers"], s["heads"], s["kv"], s["hd"], s["vocab"]), cfg
    assert getattr(cfg, "sliding_window", None) is None
    return cfg


def build_model(cfg, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        except TypeError:
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype,
                                                     attn_implementation="sdpa")
    p = next(model.parameters())
    if p.device.type != torch.device(device).type or p.dtype != dtype:
        print(f"  note: from_config made {p.device}/{p.dtype}; moving to {device}/{dtype}")
        model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


def forward_names(model):
    """The keyword names this transformers version uses for the cache and logits_to_keep."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep_kw = "logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep"
    return cache_kw, keep_kw


def out_cache(out):
    c = getattr(out, "cache", None)
    if c is None:
        c = getattr(out, "past_key_values", None)
    assert c is not None, "the model returned no cache"
    return c


def bench_config(name, s, args, device, dtype, emb_std=0.02):
    import torch
    cuda = device == "cuda"
    R, P = args.requests, args.prompt
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    print(f"\n== {name}: d {s['d']}, ff {s['ff']}, layers {s['layers']}, heads "
          f"{s['heads']}/{s['kv']}, hd {s['hd']}, vocab {s['vocab']}"
          f"{', tied' if s['tie'] else ''}, rope {s['rope']['rope_type']}; "
          f"{R} requests x {P} tokens, decode {args.decode}", flush=True)
    cfg = hf_config(s)
    sync()
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype)
    sync()
    create_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    cache_kw, keep_kw = forward_names(model)
    print(f"  created {type(model).__name__} ({n_params / 1e9:.3f} B params, "
          f"attn {model.config._attn_implementation}) in {create_s:.2f} s", flush=True)

    g = torch.Generator(device=device).manual_seed(1)
    emb = (torch.randn(R, P, s["d"], device=device, generator=g, dtype=torch.float32)
           * emb_std).to(dtype)
    flops = prefill_flops(s, R, P)

    def timer():
        return (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
            if cuda else (None, None)

    with torch.inference_mode():
        # Prefill: warm-up 1, then median of repeats.
        walls, devs, out, first, same = [], [], None, None, True
        for it in range(1 + args.repeats):
            out = None  # drop the previous cache before the next prefill
            sync()
            e0, e1 = timer()
            t0 = time.perf_counter()
            if cuda:
                e0.record()
            out = model(inputs_embeds=emb, use_cache=True, **{keep_kw: 1})
            nxt = out.logits[:, -1, :].argmax(-1)
            if cuda:
                e1.record()
            toks = nxt.cpu()
            wall = (time.perf_counter() - t0) * 1e3
            assert out.logits.shape == (R, 1, s["vocab"]), out.logits.shape
            if it == 0:
                first = toks
            else:
                same = same and bool(torch.equal(first, toks))
                walls.append(wall)
                if cuda:
                    e1.synchronize()
                    devs.append(e0.elapsed_time(e1))
        p_ms = statistics.median(walls)
        p_dev = statistics.median(devs) if devs else float("nan")
        tok_s = R * P / (p_ms * 1e-3)
        tflops = flops / (p_ms * 1e-3) * 1e-12
        mfu = 100.0 * tflops / args.peak
        print(f"  {'':18s} {'wall ms':>10s} {'device ms':>10s} {'tokens/s':>12s} "
              f"{'TFLOP/s':>9s} {'MFU':>7s}")
        print(f"  {'prefill':18s} {p_ms:10.3f} {p_dev:10.3f} {tok_s:12.0f} {tflops:9.1f} "
              f"{mfu:6.1f}%  (FLOPs {flops * 1e-12:.3f} T; repeats "
              f"{'identical' if same else 'DIFFER'})", flush=True)

        # Decode from the last prefill's cache.
        d_first = d_med = d_tok_s = float("nan")
        if args.decode > 0:
            cache = out_cache(out)
            ids = nxt[:, None]
            out = None
            dw = []
            backends = contextlib.nullcontext()
            if cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                backends = sdpa_kernel([SDPBackend.FLASH_ATTENTION,
                                        SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
            with backends:
                for i in range(args.decode):
                    sync()
                    t0 = time.perf_counter()
                    o = model(input_ids=ids, use_cache=True, **{cache_kw: cache, keep_kw: 1})
                    ids = o.logits[:, -1, :].argmax(-1, keepdim=True)
                    ids.cpu()
                    dw.append((time.perf_counter() - t0) * 1e3)
                    cache = out_cache(o)
                    o = None
            length = cache.get_seq_length()
            assert length == P + args.decode, (length, P + args.decode)
            d_first = dw[0]
            d_med = statistics.median(dw[1:]) if len(dw) > 1 else dw[0]
            d_tok_s = R / (d_med * 1e-3)
            print(f"  {'decode':18s} first {d_first:.3f} ms, then median {d_med:.3f} ms per step:"
                  f" {d_tok_s:.0f} tokens/s (cache length {length}"
                  f"{'; SDPA without cuDNN' if cuda else ''})", flush=True)
            cache = None
        if cuda:
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"SUMMARY {name} prefill_tok_s={tok_s:.0f} mfu={mfu:.1f}% decode_tok_s={d_tok_s:.0f} "
          f"decode_ms={d_med:.3f} prefill_ms={p_ms:.3f} create_s={create_s:.2f}", flush=True)
    del model, emb, out
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def tiny(s):
    """Every architecture shrunk: same head counts, head dim 16, 2 layers, small vocab."""
    t = dict(s)
    t.update(hd=16, d=16 * s["heads"], ff=64, layers=2, vocab=1000)
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="llama3.1-8b,mistral-7b,phi3.5-mini,smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak", type=float, default=989.0)
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    if args.requests < 1 or args.prompt < 1 or args.decode < 0 or args.repeats < 1:
        ap.error("bad sizes")
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            ap.error(f"unknown config {n} (known: {', '.join(CONFIGS)})")
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"peer_e2e: no PyTorch/transformers ({e}); nothing to measure")
        return 0

    if args.cpu_smoke:
        print(f"peer_e2e --cpu-smoke: torch {torch.__version__}, transformers "
              f"{transformers.__version__}")
        for n in CONFIGS:  # every real config must build (config objects only)
            hf_config(CONFIGS[n])
        args.requests, args.prompt, args.decode, args.repeats = 2, 24, 3, 1
        s = dict(CONFIGS["smollm2-135m"], layers=2)
        bench_config("smollm2-135m@2layers", s, args, "cpu", torch.float32)
        for n in ("llama3.1-8b", "mistral-7b", "phi3.5-mini"):
            bench_config(n + "@tiny", tiny(CONFIGS[n]), args, "cpu", torch.float32)
        print("peer_e2e --cpu-smoke: ok")
        return 0

    if not torch.cuda.is_available():
        print("peer_e2e: no CUDA device; nothing to measure")
        return 0
    print(f"peer_e2e: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(0)}; "
          f"{args.requests} requests x {args.prompt} tokens, decode {args.decode}, median of "
          f"{args.repeats} after 1 warm-up; bf16, SDPA, random weights; MFU against "
          f"{args.peak:.0f} TFLOP/s dense bf16 (H200 spec)", flush=True)
    failed = 0
    for n in names:
        try:
            bench_config(n, CONFIGS[n], args, "cuda", torch.bfloat16)
        except Exception as e:  # report and go on to the next config
            failed += 1
            print(f"  ERROR {n}: {type(e).__name__}: {e}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    print(f"\npeer_e2e: {'some configs failed' if failed else 'done'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

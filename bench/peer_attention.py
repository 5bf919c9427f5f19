#!/usr/bin/env python3
"""The attention peer, measured in the same device run as bench_attention.

Times torch.nn.functional.scaled_dot_product_attention in bf16 at bench_attention's shapes, once
per SDPA backend that accepts the case (cuDNN's fused attention, FlashAttention-2 as built into
PyTorch), with the same FLOP count (visible (query, key) pairs only) and the same timing method
as bench_cuda.cuh's: after warm-up, CUDA events around each call, every call queued behind a
~20 ms GPU sleep before any is read, so that an interval holds the call's GPU time and not
Python's and ATen's dispatch (which, on an idle GPU, would land inside it); median of the
repeats.

usage: peer_attention.py [--repeats R] [--warmup W]
Exits 0 with a message when PyTorch or a GPU is missing.
"""
import argparse
import sys


def visible_pairs(n_req, n_q, n_kv, causal, pos0):
    if not causal:
        return n_req * n_q * n_kv
    return n_req * sum(min(n_kv, pos0 + i + 1) for i in range(n_q))


# The GPU sleep queued ahead of the timed calls: 4e7 cycles, 20 ms at 2 GHz (the host queues
# 20 calls in a few milliseconds).
SLEEP_CYCLES = 40_000_000

SHAPES = [  # name, requests, n_q, n_kv, heads, kv heads, head dim, causal, pos0 of the 1st query
    ("sysformer SA", 32, 256, 256, 32, 32, 128, False, 0),
    ("sysformer CA", 32, 256, 512, 32, 32, 128, False, 0),
    ("sysformer CA", 32, 256, 2048, 32, 32, 128, False, 0),
    ("causal prefill", 1, 2048, 2048, 32, 8, 128, True, 0),
    ("causal prefill", 8, 2048, 2048, 32, 8, 128, True, 0),
    ("decode", 32, 1, 2048, 32, 8, 128, True, 2047),
    ("decode", 1, 1, 2048, 32, 8, 128, True, 2047),
    ("sysformer CA d64", 32, 256, 2048, 9, 9, 64, False, 0),
    ("sysformer CA d96", 32, 256, 2048, 32, 32, 96, False, 0),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        print(f"peer_attention: no PyTorch ({e}); nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("peer_attention: no CUDA device; nothing to measure")
        return 0
    dev = torch.device("cuda")
    print(f"peer_attention: torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name(0)}, median of {args.repeats} after {args.warmup} warm-up")
    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]
    print(f"{'case':26s} {'shape':27s} {'heads':5s}  d    mask    "
          + "  ".join(f"{b + ' ms':>9s} {b + ' TF/s':>10s}" for b, _ in backends))
    g = torch.Generator(device=dev).manual_seed(0)
    for name, n_req, n_q, n_kv, h, hkv, d, causal, pos0 in SHAPES:
        q = torch.rand(n_req, h, n_q, d, device=dev, generator=g, dtype=torch.float32) * 2 - 1
        k = torch.rand(n_req, hkv, n_kv, d, device=dev, generator=g, dtype=torch.float32) * 2 - 1
        v = torch.rand(n_req, hkv, n_kv, d, device=dev, generator=g, dtype=torch.float32) * 2 - 1
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        # A causal case whose queries see every key (decode) is run unmasked, as it means.
        is_causal = causal and not (n_q == 1 and pos0 + 1 >= n_kv)
        flops = 4.0 * d * h * visible_pairs(n_req, n_q, n_kv, causal, pos0)
        cols = []
        for _, backend in backends:
            try:
                with sdpa_kernel([backend]):
                    def call():
                        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                              enable_gqa=(h != hkv))
                    for _ in range(args.warmup):
                        call()
                    ev = [(torch.cuda.Event(enable_timing=True),
                           torch.cuda.Event(enable_timing=True)) for _ in range(args.repeats)]
                    torch.cuda.synchronize()
                    torch.cuda._sleep(SLEEP_CYCLES)
                    for t0, t1 in ev:
                        t0.record()
                        call()
                        t1.record()
                    torch.cuda.synchronize()
                    times = sorted(t0.elapsed_time(t1) for t0, t1 in ev)
                ms = times[len(times) // 2]
                cols.append(f"{ms:9.4f} {flops / (ms * 1e9):10.1f}")
            except RuntimeError as e:
                cols.append(f"{'n/a':>9s} {'n/a':>10s}")
                print(f"  ({name}: backend refused: {str(e).splitlines()[0][:100]})",
                      file=sys.stderr)
        print(f"{name:26s} {n_req:4d} x {n_q:4d} q x {n_kv:5d} kv  {h:2d}/{hkv:<2d}  {d:3d}  "
              f"{'causal' if is_causal else 'bidir '}  " + "  ".join(cols), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

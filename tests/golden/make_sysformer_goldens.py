#!/usr/bin/env python3
"""Generate tiny random Sysformers (PyTorch nn.TransformerDecoder) and golden outputs.

Usage:  python3 tests/golden/make_sysformer_goldens.py [--out DIR]

Writes one folder per config under tests/golden/sysformer/<name>/ (default):
    sysformer.json          config (format "sysformer", version 1)
    sysformer.safetensors   the nn.TransformerDecoder state dict, F32, PyTorch names
                            (norm.weight / norm.bias only when final_norm)
    golden.safetensors      3 requests, each run alone (batch 1):
        cu_system  I32 [4]              packed row offsets into system / expected
        cu_user    I32 [4]              packed row offsets into user
        system     F32 [sum n_s, d]     inputs S (tgt)
        user       F32 [sum n_u, d]     inputs P (memory)
        expected   F32 [sum n_s, d]     outputs S' = decoder(tgt=S[None], memory=P[None])[0]
      metadata: fixture, seed, torch, safetensors, requests

Not run by CI.  Needs torch (CPU) + safetensors; no network.  Seeded; the
safetensors files are written by a small writer here with a sorted header, so
re-running with the same torch version on the same machine gives identical bytes.

Every parameter is drawn independently per layer (PyTorch's clone would make the
layers identical and its init zeroes biases / sets norms to 1, hiding bugs):
weights ~ N(0, 1/fan_in) (q and k rows of in_proj scaled by QK_GAIN so attention
is clearly non-uniform), biases ~ N(0, 0.1^2), norm weights 1 + N(0, 0.1^2),
norm biases N(0, 0.1^2).  Inputs ~ N(0, 1).
"""

import argparse
import hashlib
import json
import math
import os
import struct
import sys

import safetensors
import torch
from safetensors.torch import load_file
from torch import nn

BASE_SEED = 20250618
QK_GAIN = 2.0  # q and k weight std multiplier -> logit std ~ QK_GAIN^2 (~4)

DEFAULTS = dict(d_model=32, num_heads=4, dim_feedforward=48, layer_norm_eps=1e-5)

FIXTURES = [
    ("postln_relu_1layer",
     dict(norm_first=False, activation="relu", num_layers=1, final_norm=False),
     [(1, 1), (5, 17), (33, 100)]),
    ("postln_gelu_2layer_final",
     dict(norm_first=False, activation="gelu", num_layers=2, final_norm=True),
     [(33, 1), (1, 100), (5, 17)]),
    ("preln_relu_3layer",
     dict(norm_first=True, activation="relu", num_layers=3, final_norm=False),
     [(5, 100), (33, 17), (1, 1)]),
    ("preln_gelu_2layer_final",
     dict(norm_first=True, activation="gelu", num_layers=2, final_norm=True,
          num_heads=2, dim_feedforward=80, layer_norm_eps=1e-6),
     [(1, 17), (33, 100), (5, 1)]),
    ("preln_relu_1layer_8heads",
     dict(norm_first=True, activation="relu", num_layers=1, final_norm=True,
          num_heads=8),
     [(5, 5), (1, 100), (33, 1)]),
]


# --------------------------------------------------------------------------
# deterministic safetensors writer (sorted header, sorted tensors)

_DT = {torch.float32: "F32", torch.int32: "I32"}


def write_safetensors(path, tensors, metadata):
    names = sorted(tensors)
    header = {}
    blobs = []
    off = 0
    for n in names:
        t = tensors[n].detach().cpu().contiguous()
        assert t.dtype in _DT, (n, t.dtype)
        b = t.numpy().tobytes()  # little-endian on every host we run on
        assert sys.byteorder == "little"
        header[n] = {"dtype": _DT[t.dtype], "shape": list(t.shape),
                     "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# --------------------------------------------------------------------------

def build(cfg):
    layer = nn.TransformerDecoderLayer(
        cfg["d_model"], cfg["num_heads"], cfg["dim_feedforward"], dropout=0.0,
        activation=cfg["activation"], layer_norm_eps=cfg["layer_norm_eps"],
        batch_first=True, norm_first=cfg["norm_first"])
    norm = nn.LayerNorm(cfg["d_model"], eps=cfg["layer_norm_eps"]) if cfg["final_norm"] else None
    return nn.TransformerDecoder(layer, cfg["num_layers"], norm=norm).eval()


def randomise(model, gen, d):
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            def rn(*shape):
                return torch.randn(*shape, generator=gen, dtype=torch.float32)
            last = name.rsplit(".", 1)[-1]
            is_norm = name.split(".")[-2].startswith("norm") or name.startswith("norm.")
            if is_norm and last == "weight":
                v = 1.0 + 0.1 * rn(*p.shape)
            elif last.endswith("bias"):
                v = 0.1 * rn(*p.shape)
            elif last.endswith("weight"):
                fan_in = p.shape[1]
                v = rn(*p.shape) / math.sqrt(fan_in)
                if last == "in_proj_weight":
                    v[: 2 * d] *= QK_GAIN  # rows q, k (v rows untouched)
            else:
                raise RuntimeError("unexpected parameter " + name)
            p.copy_(v)


def attention_entropy_check(model, S, P):
    """Mean row entropy / log(n_keys) of every attention call (rows with >1 key)."""
    captured = []

    def pre(mod, args, kwargs):
        names = ("query", "key", "value")
        q, k, v = [args[j] if j < len(args) else kwargs[names[j]] for j in range(3)]
        captured.append((mod, q, k, v))

    hooks = []
    for lyr in model.layers:
        hooks.append(lyr.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(lyr.multihead_attn.register_forward_pre_hook(pre, with_kwargs=True))
    with torch.no_grad():
        model(tgt=S[None], memory=P[None])
    for h in hooks:
        h.remove()
    ratios = []
    with torch.no_grad():
        for mod, q, k, v in captured:
            nk = k.shape[1]
            if nk < 2:
                continue
            _, w = mod(q, k, v, need_weights=True, average_attn_weights=False)
            ent = -(w.clamp_min(1e-30).log() * w).sum(-1).mean().item()
            ratios.append(ent / math.log(nk))
    return ratios


def ref_forward_f64(sd, cfg, S, P):
    """The DESIGN.md section 2 math written out from the state dict, in float64."""
    d, h = cfg["d_model"], cfg["num_heads"]
    hd = d // h
    eps = cfg["layer_norm_eps"]
    g = {k: v.double() for k, v in sd.items()}

    def ln(x, pre):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased variance
        return (x - mu) / torch.sqrt(var + eps) * g[pre + ".weight"] + g[pre + ".bias"]

    def mha(xq, xkv, pre):
        W, B = g[pre + ".in_proj_weight"], g[pre + ".in_proj_bias"]
        q = xq @ W[:d].T + B[:d]
        k = xkv @ W[d:2 * d].T + B[d:2 * d]
        v = xkv @ W[2 * d:].T + B[2 * d:]
        q = q.view(-1, h, hd).transpose(0, 1)
        k = k.view(-1, h, hd).transpose(0, 1)
        v = v.view(-1, h, hd).transpose(0, 1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1)
        o = (a @ v).transpose(0, 1).reshape(-1, d)
        return o @ g[pre + ".out_proj.weight"].T + g[pre + ".out_proj.bias"]

    def act(x):
        if cfg["activation"] == "relu":
            return torch.relu(x)
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))

    def ff(x, pre):
        y = act(x @ g[pre + ".linear1.weight"].T + g[pre + ".linear1.bias"])
        return y @ g[pre + ".linear2.weight"].T + g[pre + ".linear2.bias"]

    X, M = S.double(), P.double()
    for i in range(cfg["num_layers"]):
        L = "layers.%d" % i
        if cfg["norm_first"]:
            X = X + mha(ln(X, L + ".norm1"), ln(X, L + ".norm1"), L + ".self_attn")
            X = X + mha(ln(X, L + ".norm2"), M, L + ".multihead_attn")
            X = X + ff(ln(X, L + ".norm3"), L)
        else:
            X = ln(X + mha(X, X, L + ".self_attn"), L + ".norm1")
            X = ln(X + mha(X, M, L + ".multihead_attn"), L + ".norm2")
            X = ln(X + ff(X, L), L + ".norm3")
    if cfg["final_norm"]:
        X = ln(X, "norm")
    return X


def make_fixture(idx, name, over, requests, out_root):
    cfg = dict(DEFAULTS)
    cfg.update(over)
    seed = BASE_SEED + 1000 * idx
    gen = torch.Generator().manual_seed(seed)
    d = cfg["d_model"]

    model = build(cfg)
    randomise(model, gen, d)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if cfg["final_norm"]:
        assert "norm.weight" in sd and "norm.bias" in sd
    else:
        assert not any(k.startswith("norm.") for k in sd)
    # layers must really differ
    if cfg["num_layers"] > 1:
        assert not torch.equal(sd["layers.0.linear1.weight"], sd["layers.1.linear1.weight"])

    Ss, Ps, outs = [], [], []
    ent = []
    max_ref_err = 0.0
    with torch.no_grad():
        for (ns, nu) in requests:
            S = torch.randn(ns, d, generator=gen)
            P = torch.randn(nu, d, generator=gen)
            Y = model(tgt=S[None], memory=P[None])[0].contiguous()
            Y2 = model(tgt=S[None], memory=P[None])[0]
            assert torch.equal(Y, Y2), "non-deterministic forward"
            assert Y.shape == (ns, d) and torch.isfinite(Y).all()
            ref = ref_forward_f64(sd, cfg, S, P)
            max_ref_err = max(max_ref_err, (ref - Y.double()).abs().max().item())
            ent += attention_entropy_check(model, S, P)
            Ss.append(S), Ps.append(P), outs.append(Y)

    cu_s = [0]
    cu_u = [0]
    for (ns, nu) in requests:
        cu_s.append(cu_s[-1] + ns)
        cu_u.append(cu_u[-1] + nu)
    golden = {
        "cu_system": torch.tensor(cu_s, dtype=torch.int32),
        "cu_user": torch.tensor(cu_u, dtype=torch.int32),
        "system": torch.cat(Ss).contiguous(),
        "user": torch.cat(Ps).contiguous(),
        "expected": torch.cat(outs).contiguous(),
    }

    out = os.path.join(out_root, name)
    os.makedirs(out, exist_ok=True)
    js = {"format": "sysformer", "version": 1}
    for k in ("d_model", "num_layers", "num_heads", "dim_feedforward", "activation",
              "norm_first", "layer_norm_eps", "final_norm"):
        js[k] = cfg[k]
    with open(os.path.join(out, "sysformer.json"), "w") as f:
        json.dump(js, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(out, "sysformer.safetensors"), sd,
                      {"format": "pt", "fixture": name, "seed": seed, "torch": torch.__version__})
    meta = {"fixture": name, "seed": seed, "torch": torch.__version__,
            "safetensors": safetensors.__version__,
            "requests": ";".join("%d,%d" % r for r in requests)}
    write_safetensors(os.path.join(out, "golden.safetensors"), golden, meta)

    # reload check: fresh module, strict load, reproduce expected exactly
    fresh = build(cfg)
    fresh.load_state_dict(load_file(os.path.join(out, "sysformer.safetensors")), strict=True)
    g2 = load_file(os.path.join(out, "golden.safetensors"))
    with torch.no_grad():
        for r in range(len(requests)):
            S = g2["system"][g2["cu_system"][r]:g2["cu_system"][r + 1]]
            P = g2["user"][g2["cu_user"][r]:g2["cu_user"][r + 1]]
            Y = fresh(tgt=S[None], memory=P[None])[0]
            assert torch.equal(Y, g2["expected"][g2["cu_system"][r]:g2["cu_system"][r + 1]]), \
                "reload mismatch in %s request %d" % (name, r)

    ent_max = max(ent)
    ent_mean = sum(ent) / len(ent)
    assert ent_max < 0.95 and ent_mean < 0.8, (name, ent_mean, ent_max)
    assert max_ref_err < 1e-4, (name, max_ref_err)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    digest = hashlib.sha256()
    for f in sorted(os.listdir(out)):
        with open(os.path.join(out, f), "rb") as fh:
            digest.update(fh.read())
    print("%-26s seed %d  %6d B  H/log(n) mean %.3f max %.3f  |f64 spec - torch| %.2e  "
          "reload exact  sha256 %s" % (name, seed, size, ent_mean, ent_max, max_ref_err,
                                       digest.hexdigest()[:12]))
    return size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "sysformer"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    # check request coverage over the set
    ns_all = {r[0] for _, _, rs in FIXTURES for r in rs}
    nu_all = {r[1] for _, _, rs in FIXTURES for r in rs}
    assert {1, 5, 33} <= ns_all and {1, 17, 100} <= nu_all
    total = 0
    for i, (name, over, reqs) in enumerate(FIXTURES):
        total += make_fixture(i, name, over, reqs, a.out)
    print("total %d bytes (torch %s)" % (total, torch.__version__))


if __name__ == "__main__":
    main()

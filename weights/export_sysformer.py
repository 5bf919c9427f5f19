#!/usr/bin/env python3
"""Export a Sysformer trained in PyTorch to the files libsysformer loads.

    from export_sysformer import export_sysformer
    export_sysformer(decoder, "out/dir", classifier=head, llm_name="Llama-3.1-8B-Instruct",
                     llm_hidden_size=4096, llm_vocab_size=128256,
                     system_prompt="You are a helpful assistant.", chat_template="llama3")

`decoder` is an nn.TransformerDecoder (its layers nn.TransformerDecoderLayer, any
batch_first); `classifier` an optional nn.Linear(d_model, 1) training head. Writes
out/dir/sysformer.json and out/dir/sysformer.safetensors (F32, PyTorch state-dict names).
See docs/SYSFORMER.md. Needs torch and safetensors; never touches the network.

Command line (a state dict saved with torch.save, plus the layer hyper-parameters):
    python3 weights/export_sysformer.py STATE_DICT.pt OUT_DIR --heads 32 [--post-ln]
        [--activation relu|gelu] [--eps 1e-5]
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file


def _layer_settings(layer):
    act = layer.activation
    name = getattr(act, "__name__", type(act).__name__).lower()
    if "gelu" in name:
        activation = "gelu"
        if getattr(act, "approximate", "none") not in (None, "none"):
            raise ValueError("only the exact (erf) GELU is supported")
    elif "relu" in name:
        activation = "relu"
    else:
        raise ValueError(f"unsupported activation {name!r}")
    return {
        "num_heads": layer.self_attn.num_heads,
        "dim_feedforward": layer.linear1.out_features,
        "activation": activation,
        "norm_first": bool(layer.norm_first),
        "layer_norm_eps": float(layer.norm1.eps),
    }


def write_files(state, config, out_dir):
    """Writes a state dict (tensor name -> tensor) and a config dict as a libsysformer Sysformer."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    save_file(tensors, os.path.join(out_dir, "sysformer.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "sysformer.json"), "w") as f:
        json.dump(config, f, indent=2)


def export_sysformer(decoder, out_dir, classifier=None, llm_name=None, llm_hidden_size=None,
                     llm_vocab_size=None, system_prompt=None, chat_template=None):
    layer = decoder.layers[0]
    config = {"format": "sysformer", "version": 1, "d_model": layer.linear1.in_features,
              "num_layers": len(decoder.layers), **_layer_settings(layer),
              "final_norm": decoder.norm is not None, "weights": "sysformer.safetensors"}
    llm = {k: v for k, v in (("name", llm_name), ("hidden_size", llm_hidden_size),
                             ("vocab_size", llm_vocab_size)) if v is not None}
    if llm:
        config["llm"] = llm
    if system_prompt is not None:
        config["system_prompt"] = system_prompt
    if chat_template is not None:
        config["chat_template"] = chat_template
    state = dict(decoder.state_dict())
    if classifier is not None:
        state["classifier.weight"] = classifier.weight
        state["classifier.bias"] = classifier.bias
    write_files(state, config, out_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("state_dict")
    ap.add_argument("out_dir")
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--post-ln", action="store_true", help="norm_first = False")
    ap.add_argument("--activation", default="relu", choices=["relu", "gelu"])
    ap.add_argument("--eps", type=float, default=1e-5)
    args = ap.parse_args()
    state = torch.load(args.state_dict, map_location="cpu")
    d = state["layers.0.linear1.weight"].shape[1]
    n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    config = {"format": "sysformer", "version": 1, "d_model": d, "num_layers": n_layers,
              "num_heads": args.heads,
              "dim_feedforward": state["layers.0.linear1.weight"].shape[0],
              "activation": args.activation, "norm_first": not args.post_ln,
              "layer_norm_eps": args.eps, "final_norm": "norm.weight" in state}
    write_files(state, config, args.out_dir)
    print(f"wrote {args.out_dir}/sysformer.json and sysformer.safetensors")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Copies a Sysformer directory (sysformer.json + sysformer.safetensors) with its tensors rounded
to bf16 (round to nearest even, torch's .to(torch.bfloat16)), halving the file. libsysformer
reads BF16 tensors as it reads F32 ones; on the GPU the weights are bf16 anyway.

usage: sysformer_to_bf16.py SRC_DIR DST_DIR
"""
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = sys.argv[1], sys.argv[2]
    os.makedirs(dst, exist_ok=True)
    cfg = json.load(open(os.path.join(src, "sysformer.json")))
    weights = cfg.get("weights", "sysformer.safetensors")
    tensors, metadata = {}, None
    with safe_open(os.path.join(src, weights), framework="pt") as f:
        metadata = f.metadata()
        for name in f.keys():
            tensors[name] = f.get_tensor(name).to(torch.bfloat16).contiguous()
    save_file(tensors, os.path.join(dst, weights), metadata=metadata)
    shutil.copyfile(os.path.join(src, "sysformer.json"), os.path.join(dst, "sysformer.json"))
    n = sum(t.numel() for t in tensors.values())
    print(f"{len(tensors)} tensors, {n} values -> {os.path.join(dst, weights)} (bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

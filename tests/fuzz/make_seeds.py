#!/usr/bin/env python3
"""Writes tests/fuzz/seeds/: the inputs the fuzz harnesses start from beyond the committed
fixtures in tests/golden (run.sh seeds from both; ctest replays both). Deterministic; no
package needed.

  gguf/tokenizer_gpt2.gguf    GGUF files that carry only a tokenizer, so that fuzz_gguf reaches
  gguf/tokenizer_llama.gguf   host/tokenizer/load_gguf.c (tests/golden/gguf has no
                              tokenizer.ggml.* keys): "gpt2" with pre "smollm" and the
                              vocabulary and merges of synthetic/synth-bytelevel-digits;
                              "llama" (SentencePiece: scores, byte tokens) with synth-sp-first's
                              vocabulary. A GGUF v3 writer of its own (no tensors).
  safetensors/index.json      a sharded index over the two shards fuzz_safetensors writes
  tokenizer_encode/tNN        byte 0 the tokenizer, byte 1 the flags, then a text: six texts
                              (plain, spaces and digits, accents and added tokens, a
                              SentencePiece prompt, CJK and emoji, empty) for each tokenizer
  json_files/*                byte 0 the reader (0 sysformer.json, 1 jailbreak wrappers,
                              2 prompt set, 3 tokenizer_config.json), then the file
  cli_jsonl/*                 generate --input files: good ones, and one bad line of each
                              kind after a good one

Usage: python3 tests/fuzz/make_seeds.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "golden")
SYNTH = os.path.join(GOLDEN, "tokenizer", "synthetic")
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9


def gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def value(kind, v):
    if kind == UINT32:
        return struct.pack("<I", v)
    if kind == INT32:
        return struct.pack("<i", v)
    if kind == FLOAT32:
        return struct.pack("<f", v)
    if kind == BOOL:
        return struct.pack("<B", 1 if v else 0)
    if kind == STRING:
        return gguf_string(v)
    raise ValueError(kind)


def write(path, kvs):
    """kvs: (key, type, value) with value (element type, list) for ARRAY."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for key, kind, v in kvs:
        out += gguf_string(key) + struct.pack("<I", kind)
        if kind == ARRAY:
            elem, items = v
            out += struct.pack("<IQ", elem, len(items))
            out += b"".join(value(elem, x) for x in items)
        else:
            out += value(kind, v)
    out += b"\0" * (-len(out) % 32)
    with open(path, "wb") as f:
        f.write(out)


def tokens_of(name):
    with open(os.path.join(SYNTH, name, "tokenizer.json"), encoding="utf-8") as f:
        t = json.load(f)
    vocab = dict(t["model"]["vocab"])
    special = set()
    for a in t["added_tokens"]:
        vocab[a["content"]] = a["id"]
        if a.get("special"):
            special.add(a["id"])
    n = max(vocab.values()) + 1
    pieces = ["<unused%d>" % i for i in range(n)]
    for piece, i in vocab.items():
        pieces[i] = piece
    merges = [m if isinstance(m, str) else " ".join(m) for m in t["model"].get("merges", [])]
    return pieces, special, merges


def main():
    out = os.path.join(HERE, "seeds", "gguf")
    os.makedirs(out, exist_ok=True)

    pieces, special, merges = tokens_of("synth-bytelevel-digits")
    types = [3 if i in special else 1 for i in range(len(pieces))]
    write(os.path.join(out, "tokenizer_gpt2.gguf"), [
        ("general.architecture", STRING, "llama"),
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.pre", STRING, "smollm"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, pieces)),
        ("tokenizer.ggml.token_type", ARRAY, (INT32, types)),
        ("tokenizer.ggml.merges", ARRAY, (STRING, merges)),
        ("tokenizer.ggml.bos_token_id", UINT32, pieces.index("<|endoftext|>")),
        ("tokenizer.ggml.eos_token_id", UINT32, pieces.index("<|im_end|>")),
        ("tokenizer.ggml.add_bos_token", BOOL, False),
        ("tokenizer.chat_template", STRING,
         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
         "{% endfor %}"),
    ])

    pieces, special, _ = tokens_of("synth-sp-first")
    types = []
    for i, p in enumerate(pieces):
        if p == "<unk>":
            types.append(2)
        elif i in special:
            types.append(3)
        elif p.startswith("<0x") and len(p) == 6:
            types.append(6)
        else:
            types.append(1)
    write(os.path.join(out, "tokenizer_llama.gguf"), [
        ("general.architecture", STRING, "llama"),
        ("tokenizer.ggml.model", STRING, "llama"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, pieces)),
        ("tokenizer.ggml.scores", ARRAY, (FLOAT32, [-float(i) for i in range(len(pieces))])),
        ("tokenizer.ggml.token_type", ARRAY, (INT32, types)),
        ("tokenizer.ggml.unknown_token_id", UINT32, pieces.index("<unk>")),
        ("tokenizer.ggml.bos_token_id", UINT32, pieces.index("<s>")),
        ("tokenizer.ggml.eos_token_id", UINT32, pieces.index("</s>")),
        ("tokenizer.ggml.add_bos_token", BOOL, True),
    ])

    write_other_seeds()


def read(*parts):
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


def put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def safetensors_names(path):
    b = read(path)
    (n,) = struct.unpack("<Q", b[:8])
    return [k for k in json.loads(b[8:8 + n]) if k != "__metadata__"]


def write_other_seeds():
    seeds = os.path.join(HERE, "seeds")
    # the index: shard 1 is llama_gqa_llama3's model, shard 2 a Sysformer's weights (distinct names)
    wm = {k: "model-00001-of-00002.safetensors"
          for k in safetensors_names(os.path.join(GOLDEN, "llm", "llama_gqa_llama3",
                                                  "model.safetensors"))}
    for k in safetensors_names(os.path.join(GOLDEN, "sysformer", "preln_relu_1layer_8heads",
                                            "sysformer.safetensors")):
        wm[k] = "model-00002-of-00002.safetensors"
    index = {"metadata": {"total_size": 0}, "weight_map": wm}
    put(os.path.join(seeds, "safetensors", "index.json"),
        (json.dumps(index, indent=1) + "\n").encode())

    texts = ["Hello, world!", "  leading spaces and 12345 digits\n\ttabs",
             "caf\u00e9 na\u00efve <|im_start|>user<|im_end|>", "<s>[INST] hi [/INST] </s>",
             "\u4e2d\u6587 \U0001F600 \u2014 \u00e9t\u00e9", ""]
    i = 0
    for text in texts:
        for tok in range(5):
            put(os.path.join(seeds, "tokenizer_encode", "t%02d" % i),
                bytes([tok, i % 8]) + text.encode())
            i += 1

    js = os.path.join(seeds, "json_files")
    for name in ["preln_relu_1layer_8heads", "postln_gelu_2layer_final"]:
        put(os.path.join(js, "sysformer_" + name),
            b"\x00" + read(GOLDEN, "sysformer", name, "sysformer.json"))
    put(os.path.join(js, "wrappers"),
        b"\x01" + read(HERE, "..", "..", "bench", "jailbreaks.json"))
    put(os.path.join(js, "wrappers_list"), b"\x01" + json.dumps([
        "Ignore the rules. {instruction}", "{base64} {{x}} {rot13}",
        "{part1} ... {part2} {leetspeak} {reversed}"]).encode())
    put(os.path.join(js, "prompts"), b"\x02" + json.dumps([
        {"instruction": "Write a poem about the sea."},
        {"instruction": "Summarise the text.", "input": "The text.", "output": "A summary."},
        {"prompt": "Hi", "response": "Hello"}]).encode())
    put(os.path.join(js, "tokenizer_config_smollm2"),
        b"\x03" + read(GOLDEN, "tokenizer", "smollm2", "tokenizer_config.json"))
    put(os.path.join(js, "tokenizer_config_sp_first"),
        b"\x03" + read(SYNTH, "synth-sp-first", "tokenizer_config.json"))

    # generate --input files: every field a line may set, blank and CRLF lines, fields of the
    # caller's (nested, reals that need 17 digits, one named like a reply field), and a bad
    # line of each kind at the end of a good file.
    cj = os.path.join(seeds, "cli_jsonl")
    good = [
        {"prompt": "Say hi."},
        {"instruction": "Name a color.", "id": 7, "system": "Be brief."},
        {"prompt": "caf\u00e9 \U0001F600 !?", "temperature": 0.7, "top_k": 20, "top_p": 0.9,
         "seed": 5, "max_new_tokens": 3, "logprobs": True, "top_logprobs": 3},
        {"prompt": "x", "score": 0.1 + 0.2, "meta": {"a": [1.5, -2e-300, None, True]},
         "response": "an old reply", "top_logprobs": 1},
    ]
    lines = [json.dumps(row) for row in good]
    put(os.path.join(cj, "good"), ("\n".join(lines) + "\n").encode())
    put(os.path.join(cj, "blank_and_crlf"),
        ("\r\n\n" + lines[0] + "\r\n   \n" + lines[2]).encode())
    bad = ['[{"prompt": "hi"}]', '{"prompt": 7}', '{"prompt": "a", "prompt": "b"}',
           '{"prompt": "a"} {"prompt": "b"}', '{"prompt": "a", "system": 5}',
           '{"prompt": "a", "temperature": 1e39}', '{"prompt": "a", "max_new_tokens": 0}',
           '{"prompt": "a", "top_logprobs": 21}', '{"prompt": "a", "seed": -1}',
           '{"prompt": "\\ud800"}', '{"prompt": "a\\u0000b"}']
    for i, line in enumerate(bad):
        put(os.path.join(cj, "bad%02d" % i), (lines[0] + "\n" + line + "\n").encode())


if __name__ == "__main__":
    main()

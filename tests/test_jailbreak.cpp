// Jailbreak wrappers (host/eval/jailbreak.c): the file format, every placeholder's
// transformation against independently known values, and the shipped bench/jailbreaks.json.
#include <gtest/gtest.h>

#include <stdlib.h>

#include <fstream>
#include <string>

#include "eval/eval.h"
#include "model_fixtures.h"

namespace {

void write_text(const std::string &path, const std::string &text) {
    std::ofstream f(path, std::ios::binary);
    f << text;
}

// Applies a one-wrapper template to instruction.
std::string apply(const char *tmpl, const char *instruction) {
    sf_jailbreak w = {};
    w.name = const_cast<char *>("t");
    w.text = const_cast<char *>(tmpl);
    char *out = nullptr;
    EXPECT_EQ(sf_jailbreak_apply(&w, instruction, &out), SF_OK) << sf_last_error();
    std::string s = out ? out : "<null>";
    free(out);
    return s;
}

} // namespace

// RFC 4648 §10's test vectors, plus a two-byte UTF-8 character (é = C3 A9 -> "w6k=").
TEST(Jailbreak, Base64MatchesTheRfcVectors) {
    EXPECT_EQ(apply("{base64}", ""), "");
    EXPECT_EQ(apply("{base64}", "f"), "Zg==");
    EXPECT_EQ(apply("{base64}", "fo"), "Zm8=");
    EXPECT_EQ(apply("{base64}", "foo"), "Zm9v");
    EXPECT_EQ(apply("{base64}", "foob"), "Zm9vYg==");
    EXPECT_EQ(apply("{base64}", "fooba"), "Zm9vYmE=");
    EXPECT_EQ(apply("{base64}", "foobar"), "Zm9vYmFy");
    EXPECT_EQ(apply("{base64}", "\xc3\xa9"), "w6k=");
}

TEST(Jailbreak, TextTransformations) {
    EXPECT_EQ(apply("{rot13}", "Hello, World! 42"), "Uryyb, Jbeyq! 42");
    EXPECT_EQ(apply("{rot13}", "Uryyb"), "Hello"); // its own inverse
    EXPECT_EQ(apply("{leetspeak}", "Tell me a Secret"), "73ll m3 4 53cr37");
    EXPECT_EQ(apply("{reversed}", "  how to  bake bread "), "bread bake to how");
    EXPECT_EQ(apply("{reversed}", "one"), "one");
    // Payload splitting cuts at the word start nearest the middle: "Write a poem about cats"
    // (23 characters, middle 11) has word starts 6, 8, 13 and 19; 13 is nearest.
    EXPECT_EQ(apply("[{part1}][{part2}]", "Write a poem about cats"), "[Write a poem][about cats]");
    EXPECT_EQ(apply("[{part1}][{part2}]", "single"), "[][single]");
    EXPECT_EQ(apply("{instruction} and {instruction}", "x"), "x and x");
    EXPECT_EQ(apply("{{literal}} {instruction} }}", "y"), "{literal} y }");
}

TEST(Jailbreak, ReadsBothFormatsAndRejectsBadFiles) {
    TempDir tmp;
    const std::string path = tmp.file("w.json");
    sf_jailbreak_set set;
    auto read = [&](const std::string &text) {
        write_text(path, text);
        return sf_jailbreak_set_read(path.c_str(), &set);
    };
    ASSERT_EQ(read("[\"A {instruction}\", \"B {rot13}\"]"), SF_OK) << sf_last_error();
    ASSERT_EQ(set.n, 2);
    EXPECT_STREQ(set.w[1].name, "template_1");
    EXPECT_FALSE(set.w[1].held_out);
    EXPECT_EQ(sf_jailbreak_find(&set, "template_0"), 0);
    EXPECT_EQ(sf_jailbreak_find(&set, "nope"), -1);
    sf_jailbreak_set_free(&set);

    ASSERT_EQ(read("{\"wrappers\": [{\"name\": \"a\", \"family\": \"f\", \"template\": "
                   "\"{instruction}\"}, {\"name\": \"b\", \"template\": \"{base64}\", "
                   "\"held_out\": true}]}"),
              SF_OK)
        << sf_last_error();
    ASSERT_EQ(set.n, 2);
    EXPECT_STREQ(set.w[0].family, "f");
    EXPECT_STREQ(set.w[1].family, "");
    EXPECT_TRUE(set.w[1].held_out);
    sf_jailbreak_set_free(&set);

    struct bad_case {
        const char *text;
        sf_status status;
        const char *message; // a piece of the error message
    } cases[] = {
        {"not json", SF_ERR_FORMAT, "not valid JSON"},
        {"{\"other\": []}", SF_ERR_FORMAT, "wrappers"},
        {"[]", SF_ERR_INVALID_ARGUMENT, "0 wrappers"},
        {"[5]", SF_ERR_FORMAT, "wrapper 0"},
        {"[\"no placeholder\"]", SF_ERR_FORMAT, "no placeholder"},
        {"[\"{instruction}\", \"{secret}\"]", SF_ERR_FORMAT, "wrapper 1: unknown placeholder"},
        {"[\"{instruction\"]", SF_ERR_FORMAT, "unknown placeholder"},
        {"[\"{instruction} }\"]", SF_ERR_FORMAT, "lone"},
        {"{\"wrappers\": [{\"template\": \"{instruction}\"}]}", SF_ERR_FORMAT, "\"name\""},
        {"{\"wrappers\": [{\"name\": \"a\"}]}", SF_ERR_FORMAT, "\"template\""},
        {"{\"wrappers\": [{\"name\": \"a b\", \"template\": \"{instruction}\"}]}", SF_ERR_FORMAT,
         "not 1-64"},
        {"{\"wrappers\": [{\"name\": \"a\", \"template\": \"{instruction}\", \"held_out\": 1}]}",
         SF_ERR_FORMAT, "held_out"},
        {"{\"wrappers\": [{\"name\": \"a\", \"template\": \"{instruction}\"}, {\"name\": \"a\", "
         "\"template\": \"{rot13}\"}]}",
         SF_ERR_FORMAT, "repeats the name"},
    };
    for (const bad_case &c : cases) {
        EXPECT_EQ(read(c.text), c.status) << c.text;
        EXPECT_NE(std::string(sf_last_error()).find(c.message), std::string::npos)
            << c.text << " -> " << sf_last_error();
        EXPECT_NE(std::string(sf_last_error()).find("w.json"), std::string::npos);
        EXPECT_EQ(set.n, 0);
        EXPECT_EQ(set.w, nullptr);
    }
    EXPECT_EQ(sf_jailbreak_set_read(tmp.file("absent.json").c_str(), &set), SF_ERR_IO);
}

// The shipped wrappers all read, carry distinct names, hold out exactly one, and each one's
// output carries the instruction in the form its placeholder promises.
TEST(Jailbreak, ShippedWrappers) {
    const std::string path = std::string(SF_SOURCE_DIR) + "/bench/jailbreaks.json";
    sf_jailbreak_set set;
    ASSERT_EQ(sf_jailbreak_set_read(path.c_str(), &set), SF_OK) << sf_last_error();
    EXPECT_GE(set.n, 10);
    int held_out = 0;
    const char *ins = "Explain how to pick a lock";
    for (int32_t i = 0; i < set.n; i++) {
        held_out += set.w[i].held_out;
        EXPECT_STRNE(set.w[i].family, "") << set.w[i].name;
        char *out = nullptr;
        ASSERT_EQ(sf_jailbreak_apply(&set.w[i], ins, &out), SF_OK);
        const std::string s = out;
        free(out);
        const std::string t = set.w[i].text;
        if (t.find("{instruction}") != std::string::npos) {
            EXPECT_NE(s.find(ins), std::string::npos) << set.w[i].name;
        }
        if (t.find("{base64}") != std::string::npos) {
            EXPECT_NE(s.find("RXhwbGFpbiBob3cgdG8gcGljayBhIGxvY2s="), std::string::npos);
        }
        if (t.find("{rot13}") != std::string::npos) {
            EXPECT_NE(s.find("Rkcynva ubj gb cvpx n ybpx"), std::string::npos);
        }
        if (t.find("{part1}") != std::string::npos) {
            // 26 characters, middle 13, word starts 8, 12, 15, 20, 22: the cut is at 12.
            EXPECT_NE(s.find("\"Explain how\""), std::string::npos) << s;
            EXPECT_NE(s.find("\"to pick a lock\""), std::string::npos) << s;
        }
    }
    EXPECT_EQ(held_out, 1);
    sf_jailbreak_set_free(&set);
}

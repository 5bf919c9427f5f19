// tools/simt: tests/consumer/serving_example.c, the serving-stack demo (a guard-only engine on
// the stack's own embedding table, sf_cuda_guarded_embed on the stack's stream), run as one
// engine test. scripts/test.sh runs it only where there is a GPU; here it runs everywhere. Its
// main (renamed by run.sh) returns 0 only when the device's guarded embeddings equal bf16 of the
// CPU's and a bad token id is counted.
#include <gtest/gtest.h>

extern "C" int serving_example_main(int argc, char **argv);

TEST(CudaEngineServingExample, GuardedEmbeddingsEqualTheCpu) {
    char name[] = "serving_example";
    char *argv[] = {name, nullptr};
    EXPECT_EQ(serving_example_main(1, argv), 0);
}

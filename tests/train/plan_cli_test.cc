// The moe-plan program as users run it: a plan for moe-train's flags with given rates, and the
// errors for its own flags and for moe-train's.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <string>

#include "support/testing.h"

namespace {

struct Outcome {
  int status = -1;     // exit status
  std::string output;  // stdout and stderr together
};

Outcome moe_plan(const std::string& arguments) {
  Outcome outcome;
  const std::string command =
      "OMP_NUM_THREADS=1 " + std::string(MOE_PLAN_BINARY) + " " + arguments + " 2>&1";
  std::FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return outcome;
  char buffer[4096];
  while (size_t read = std::fread(buffer, 1, sizeof(buffer), pipe))
    outcome.output.append(buffer, read);
  const int status = pclose(pipe);
  outcome.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return outcome;
}

// A tiny MoE job (2 layers, 4 experts) planned for 4 ranks.
const std::string kTinyJob =
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 "
    "--num-experts 4 --moe-router-topk 2 --moe-grouped-gemm --mock-data --tokenizer-type "
    "NullTokenizer --vocab-size 63 --train-iters 10 --expert-model-parallel-size 2 ";

TEST(MoePlanProgram, PrintsThePlanAndTheRankedLayouts) {
  const Outcome outcome =
      moe_plan("--world-size 4 --gemm-gflops 100 --link-gbytes-per-s 10 " + kTinyJob);
  EXPECT_EQ(outcome.status, 0) << outcome.output;
  for (const char* text :
       {"rates: GEMM 100.0 GFLOP/s, link 10.00 GB/s (given: --gemm-gflops and --link-gbytes-per-s)",
        "layout: tp 1, pp 1, ep 2, etp 1, cp 1, dp 4; 1 micro-batches per step",
        "replicated optimizer", "distributed optimizer", "MoE exchange bytes per layer per step",
        "pipeline bubble (1F1B): 0.000", "valid layouts for 4 ranks"}) {
    EXPECT_CONTAINS(outcome.output, text);
  }
}

TEST(MoePlanProgram, RefusesBadFlagsNamingThem) {
  Outcome outcome = moe_plan(kTinyJob);
  EXPECT_EQ(outcome.status, 2);
  EXPECT_CONTAINS(outcome.output, "moe-plan: error: --world-size N (>= 1) is required");
  outcome = moe_plan("--world-size 4 --gemm-gflops 100 " + kTinyJob);
  EXPECT_EQ(outcome.status, 2);
  EXPECT_CONTAINS(outcome.output,
                  "give both --gemm-gflops and --link-gbytes-per-s, or neither (calibrate)");
  outcome = moe_plan("--world-size 3 --gemm-gflops 1 --link-gbytes-per-s 1 " + kTinyJob);
  EXPECT_EQ(outcome.status, 2);
  EXPECT_CONTAINS(outcome.output,
                  "moe-plan: error: world size (3) is not divisible by "
                  "--expert-tensor-parallel-size (1) x --expert-model-parallel-size (2) x "
                  "--pipeline-model-parallel-size (1)");
}

}  // namespace

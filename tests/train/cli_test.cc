// The moe-train program as users run it: exit status and error text for every class of bad
// argument, --help, a short real run under mpirun, and an error on the ranks of a running job.
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

Outcome run_command(const std::string& command) {
  Outcome outcome;
  std::FILE* pipe = popen(("OMP_NUM_THREADS=1 " + command + " 2>&1").c_str(), "r");
  if (!pipe) return outcome;
  char buffer[4096];
  while (size_t read = std::fread(buffer, 1, sizeof(buffer), pipe))
    outcome.output.append(buffer, read);
  int status = pclose(pipe);
  outcome.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return outcome;
}

Outcome moe_train(const std::string& arguments) {
  return run_command(std::string(MOE_TRAIN_BINARY) + " " + arguments);
}

Outcome mpirun_moe_train(int ranks, const std::string& arguments) {
  return run_command(std::string(MOE_MPIEXEC) +
                     " --oversubscribe --allow-run-as-root --bind-to none -np " +
                     std::to_string(ranks) + " " + MOE_TRAIN_BINARY + " " + arguments);
}

const std::string kTinyJob =
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 "
    "--num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 --tokenizer-type "
    "NullTokenizer --vocab-size 63 --log-interval 1 ";

void expect_refused(const std::string& arguments, const std::string& message) {
  Outcome outcome = moe_train(arguments);
  EXPECT_EQ(outcome.status, 2) << outcome.output;
  EXPECT_CONTAINS(outcome.output, "moe-train: error: " + message) << "arguments: " << arguments;
}

TEST(MoeTrainProgram, HelpListsMegatronGroups) {
  Outcome outcome = moe_train("--help");
  EXPECT_EQ(outcome.status, 0);
  for (const char* text : {"network size:", "moe:", "mixed precision:", "learning rate:",
                           "checkpointing:", "--moe-router-topk", "--use-distributed-optimizer"}) {
    EXPECT_CONTAINS(outcome.output, text);
  }
}

TEST(MoeTrainProgram, BadArgumentsExitWithTheirMessage) {
  expect_refused(kTinyJob + "--train-iters 1 --mock-data --num-layer 2",
                 "unknown argument --num-layer; did you mean --num-layers?");
  expect_refused(kTinyJob + "--train-iters 1 --mock-data --context-parallel-size 2",
                 "argument --context-parallel-size is a Megatron-LM argument that moecore does "
                 "not support yet");
  expect_refused(kTinyJob + "--train-iters 1 --mock-data --fp16 --bf16",
                 "--fp16 and --bf16 cannot be used together");
  expect_refused(kTinyJob + "--train-iters 1 --mock-data --expert-model-parallel-size 3",
                 "--num-experts (4) is not divisible by --expert-model-parallel-size (3)");
  expect_refused(kTinyJob + "--train-iters 1 --mock-data --tensor-model-parallel-size 2",
                 "world size (1) is not divisible by --tensor-model-parallel-size (2) x "
                 "--pipeline-model-parallel-size (1)");
  expect_refused(kTinyJob + "--mock-data", "argument --train-iters is required");
  expect_refused(kTinyJob + "--train-iters 1 --mock-data --init-method-std -1",
                 "argument --init-method-std must be positive (got -1)");
  expect_refused(kTinyJob + "--train-iters 1 --mock-data --adam-eps nan",
                 "argument --adam-eps must be a finite number (got nan)");
  expect_refused(kTinyJob + "--train-iters x --mock-data",
                 "bad argument: Could not convert: --train-iters = x");
}

TEST(MoeTrainProgram, TrainsUnderMpirunAndPrintsMegatronLines) {
  Outcome outcome = mpirun_moe_train(2, kTinyJob + "--train-iters 3 --mock-data");
  EXPECT_EQ(outcome.status, 0) << outcome.output;
  EXPECT_CONTAINS(outcome.output, "using world size: 2, data-parallel size: 2");
  EXPECT_CONTAINS(outcome.output, " iteration        3/       3 |");
  EXPECT_CONTAINS(outcome.output, "lm loss: ");
}

// The seed layout's shape at 4 ranks: tp 2 with sequence parallelism, ep 2, and the expert
// tensor-parallel size defaulting to tp (2), so each expert is split over 2 ranks.
TEST(MoeTrainProgram, TrainsWithExpertTensorParallelismDefaultingToTensorParallel) {
  Outcome outcome = mpirun_moe_train(4, kTinyJob +
                                            "--train-iters 2 --mock-data "
                                            "--tensor-model-parallel-size 2 --sequence-parallel "
                                            "--expert-model-parallel-size 2");
  EXPECT_EQ(outcome.status, 0) << outcome.output;
  EXPECT_CONTAINS(outcome.output,
                  "tensor-model-parallel size: 2, pipeline-model-parallel size: 1, "
                  "expert-model-parallel size: 2, expert-tensor-parallel size: 2");
  EXPECT_CONTAINS(outcome.output, " iteration        2/       2 |");
}

// A value the model or optimizer would refuse only after setup is refused during argument
// validation: printed once (not once per rank), exit status 2.
TEST(MoeTrainProgram, BadValueIsReportedOnceBeforeAnyWork) {
  Outcome outcome = mpirun_moe_train(2, kTinyJob + "--train-iters 1 --mock-data --lr inf");
  EXPECT_EQ(outcome.status, 2) << outcome.output;
  const std::string message = "moe-train: error: argument --lr must be a finite number (got inf)";
  const size_t first = outcome.output.find(message);
  ASSERT_NE(first, std::string::npos) << outcome.output;
  EXPECT_EQ(outcome.output.find(message, first + 1), std::string::npos) << outcome.output;
  EXPECT_EQ(outcome.output.find("error on rank"), std::string::npos) << outcome.output;
}

// A bad input found while setting up (every rank fails alike): the ranks agree, the message is
// printed once, naming the failed ranks, and every rank exits with status 1.
TEST(MoeTrainProgram, BadInputDuringSetupIsReportedOnce) {
  Outcome outcome = mpirun_moe_train(
      2, kTinyJob + "--train-iters 3 --data-path /nonexistent/corpus_text_document");
  EXPECT_EQ(outcome.status, 1) << outcome.output;
  const std::string message = "moe-train: error: ";
  const size_t first = outcome.output.find(message);
  ASSERT_NE(first, std::string::npos) << outcome.output;
  EXPECT_EQ(outcome.output.find(message, first + 1), std::string::npos) << outcome.output;
  EXPECT_CONTAINS(outcome.output, "/nonexistent/corpus_text_document",
                  "(setup failed on rank(s) 0, 1)");
}

}  // namespace

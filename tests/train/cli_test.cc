// The moe-train program as users run it: exit status and error text for every class of bad
// argument, --help, a short real run under mpirun, and the bad inputs of docs/reliability.md
// (corrupt data, tokenizer and checkpoint files), each reported once under mpirun.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "moe/data/indexed_dataset.h"
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
  expect_refused(kTinyJob + "--train-iters 1 --mock-data --cp-comm-type p2p",
                 "argument --cp-comm-type is a Megatron-LM argument that moecore does not support "
                 "yet");
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

// Context parallelism end to end: each sequence split over the 2 ranks, which are also the
// expert-parallel ranks; a world size that cp does not divide is refused before any work.
TEST(MoeTrainProgram, TrainsWithContextParallelism) {
  Outcome outcome = mpirun_moe_train(2, kTinyJob +
                                            "--train-iters 2 --mock-data --context-parallel-size 2 "
                                            "--expert-model-parallel-size 2");
  EXPECT_EQ(outcome.status, 0) << outcome.output;
  EXPECT_CONTAINS(outcome.output,
                  "using world size: 2, data-parallel size: 1, context-parallel size: 2");
  EXPECT_CONTAINS(outcome.output, " iteration        2/       2 |");
  expect_refused(kTinyJob + "--train-iters 1 --mock-data --context-parallel-size 2",
                 "world size (1) is not divisible by --tensor-model-parallel-size (1) x "
                 "--pipeline-model-parallel-size (1) x --context-parallel-size (2)");
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
// printed once, and every rank exits with status 1.
TEST(MoeTrainProgram, BadInputDuringSetupIsReportedOnce) {
  Outcome outcome = mpirun_moe_train(
      2, kTinyJob + "--train-iters 3 --data-path /nonexistent/corpus_text_document");
  EXPECT_EQ(outcome.status, 1) << outcome.output;
  const std::string message = "moe-train: error: ";
  const size_t first = outcome.output.find(message);
  ASSERT_NE(first, std::string::npos) << outcome.output;
  EXPECT_EQ(outcome.output.find(message, first + 1), std::string::npos) << outcome.output;
  EXPECT_CONTAINS(outcome.output, "/nonexistent/corpus_text_document");
}

// Under mpirun -np 2: exit `status` (1: a bad file, 2: a bad argument), one "moe-train: error: "
// line holding every part, and no rank's own abort message (the ranks agreed on the failure).
template <class... Parts>
void expect_reported_once(int status, const std::string& arguments, const Parts&... parts) {
  Outcome outcome = mpirun_moe_train(2, arguments);
  EXPECT_EQ(outcome.status, status) << outcome.output;
  const std::string marker = "moe-train: error: ";
  const size_t first = outcome.output.find(marker);
  ASSERT_NE(first, std::string::npos) << outcome.output;
  EXPECT_EQ(outcome.output.find(marker, first + 1), std::string::npos) << outcome.output;
  EXPECT_EQ(outcome.output.find("error on rank"), std::string::npos) << outcome.output;
  EXPECT_CONTAINS(outcome.output.substr(first), parts...);
}

// 40 documents of 50 tokens, ids below `id_limit`, written with Megatron's builder.
std::string write_corpus(const moe::testing::ScratchDir& dir, const std::string& name,
                         int64_t id_limit) {
  const std::string prefix = dir.file(name);
  moe::data::IndexedDatasetBuilder builder(prefix, moe::data::TokenDType::U16);
  std::vector<int64_t> document(50);
  for (int d = 0; d < 40; ++d) {
    for (size_t i = 0; i < document.size(); ++i) document[i] = int64_t(7 * d + 3 * i) % id_limit;
    builder.add_document(document, std::vector<int32_t>{int32_t(document.size())});
  }
  builder.finalize();
  return prefix;
}

// Little-endian 64-bit word `at` bytes into `bytes`.
void put_u64(std::string& bytes, size_t at, uint64_t value) {
  for (int i = 0; i < 8; ++i) bytes[at + size_t(i)] = char(value >> (8 * i));
}

TEST(MoeTrainBadInputs, CorruptDataFilesAreReportedOnce) {
  moe::testing::ScratchDir dir("bad_data");
  namespace fs = std::filesystem;
  using moe::testing::read_bytes;
  using moe::testing::write_bytes;
  const std::string job = kTinyJob + "--train-iters 2 --split 1,0,0 --data-path ";
  const std::string good = write_corpus(dir, "good", 60);

  const std::string truncated = write_corpus(dir, "truncated", 60);
  fs::resize_file(truncated + ".bin", fs::file_size(truncated + ".bin") / 2);
  expect_reported_once(1, job + truncated,
                       truncated + ".bin is truncated or does not match its index");

  const std::string bad_magic = write_corpus(dir, "bad_magic", 60);
  std::string idx = read_bytes(bad_magic + ".idx");
  idx[0] = 'X';
  write_bytes(bad_magic + ".idx", idx);
  expect_reported_once(1, job + bad_magic, bad_magic + ".idx is not a Megatron indexed dataset");

  // The document index points past the 40 sequences (header: 9 magic + 8 version + 1 dtype +
  // 8 sequences + 8 documents; then lengths, pointers, document indices).
  const std::string out_of_range = write_corpus(dir, "out_of_range", 60);
  idx = read_bytes(out_of_range + ".idx");
  put_u64(idx, idx.size() - 8, 45);
  write_bytes(out_of_range + ".idx", idx);
  expect_reported_once(1, job + out_of_range,
                       "is corrupt: the last document index is 45 but there are 40 sequences");

  const std::string empty = dir.file("empty");
  write_bytes(empty + ".idx", "");
  write_bytes(empty + ".bin", "");
  expect_reported_once(1, job + empty, empty + ".idx is truncated: 0 bytes");

  // Ids up to 299 with a 63-token vocabulary (padded to 128 rows).
  const std::string wide = write_corpus(dir, "wide", 300);
  expect_reported_once(1, job + wide, wide, "is outside the model's vocabulary [0, 128)");

  expect_reported_once(2, job + "0 " + good + " 1 " + good, "--data-path: weight 0");
  expect_reported_once(2, job + "nan " + good, "--data-path: weight nan must be positive");
}

TEST(MoeTrainBadInputs, TokenizerFileOfTheWrongKindIsReportedOnce) {
  moe::testing::ScratchDir dir("bad_tokenizer");
  const std::string job =
      "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
      "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 "
      "--train-iters 1 --mock-data ";
  const std::string corpus = write_corpus(dir, "corpus", 60);
  expect_reported_once(
      1, job + "--tokenizer-type Llama2Tokenizer --tokenizer-model " + corpus + ".idx",
      "cannot load SentencePiece model " + corpus + ".idx");
  expect_reported_once(1,
                       job + "--tokenizer-type GPT2BPETokenizer --vocab-file " + corpus +
                           ".bin --merge-file " + corpus + ".idx",
                       "GPT-2 vocabulary " + corpus + ".bin is not valid JSON");
}

TEST(MoeTrainBadInputs, DamagedOrMismatchedCheckpointIsReportedOnce) {
  moe::testing::ScratchDir dir("bad_checkpoint");
  namespace fs = std::filesystem;
  using moe::testing::read_bytes;
  using moe::testing::write_bytes;
  const std::string saved = dir.file("saved");
  const std::string job = kTinyJob + "--train-iters 2 --mock-data ";
  ASSERT_EQ(mpirun_moe_train(2, job + "--save " + saved + " --save-interval 1").status, 0);
  auto copy_of = [&](const std::string& name) {
    const std::string copy = dir.file(name);
    fs::copy(saved, copy, fs::copy_options::recursive);
    return copy;
  };

  const std::string flipped = copy_of("flipped");
  const std::string data_file = flipped + "/iter_0000002/rank_00000.bin";
  std::string bytes = read_bytes(data_file);
  bytes[bytes.size() / 2] ^= 0x01;
  write_bytes(data_file, bytes);
  expect_reported_once(1, job + "--train-iters 3 --load " + flipped,
                       "checksum mismatch for tensor '", "the file is corrupted");

  const std::string missing = copy_of("missing");
  fs::remove(missing + "/iter_0000002/rank_00001.bin");
  expect_reported_once(1, job + "--train-iters 3 --load " + missing,
                       "missing checkpoint file \"" + missing + "/iter_0000002/rank_00001.bin\"");

  expect_reported_once(1, kTinyJob + "--train-iters 3 --mock-data --hidden-size 48 --load " + saved,
                       "has global shape", "but the model has");
}

// --check-grad-reduction verifies the first step's reductions (tp 2 + ep 2 at 4 ranks: dense
// gradients over dp 2, experts over expert-dp 1) and stops a run whose rank 1 holds doubled
// gradients (MOE_FAULT_INJECT=grad-reduction:1:1), naming the element and parameter.
TEST(MoeTrainProgram, CheckGradReductionCatchesADoubledReduction) {
  const std::string job = kTinyJob +
                          "--train-iters 2 --mock-data --check-grad-reduction "
                          "--tensor-model-parallel-size 2 --sequence-parallel "
                          "--expert-model-parallel-size 2 --use-distributed-optimizer";
  Outcome checked = mpirun_moe_train(4, job);
  EXPECT_EQ(checked.status, 0) << checked.output;
  EXPECT_CONTAINS(checked.output,
                  "> --check-grad-reduction, iteration 1, world rank 0: dense gradients reduced "
                  "over 2 rank(s) of 'dp_cp', checksum ",
                  "; expert gradients reduced over 1 rank(s) of 'expert_dp', checksum ");
  Outcome doubled = run_command("MOE_FAULT_INJECT=grad-reduction:1:1 " + std::string(MOE_MPIEXEC) +
                                " --oversubscribe --allow-run-as-root --bind-to none -np 4 " +
                                MOE_TRAIN_BINARY + " " + job);
  EXPECT_NE(doubled.status, 0) << doubled.output;
  EXPECT_CONTAINS(doubled.output,
                  "moe-train: error on rank 1 of 4: --check-grad-reduction: dense gradient "
                  "element 0 (parameter 'embedding.word_embeddings.weight') is ",
                  "the fp64 sum of the 2 ranks' gradients gives ");
}

// A checkpoint saved by 2 ranks resumes on 1 without --no-load-rng, saying where its random
// streams come from.
TEST(MoeTrainProgram, ResumesAtAnotherWorldSizeWithTheSavedRandomStreams) {
  moe::testing::ScratchDir dir("other_world_size");
  const std::string job =
      kTinyJob + "--mock-data --save " + dir.file("ckpt") + " --save-interval 2 ";
  ASSERT_EQ(mpirun_moe_train(2, job + "--train-iters 3 --exit-interval 2").status, 0);
  Outcome resumed = moe_train(job + "--train-iters 3 --load " + dir.file("ckpt"));
  EXPECT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_CONTAINS(resumed.output,
                  "> checkpoint saved by 2 ranks, this run has 1: every rank takes saved rank 0's "
                  "random streams",
                  "at iteration 2", " iteration        3/       3 |");
}

}  // namespace

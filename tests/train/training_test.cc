// The training loop end to end on a tiny MoE GPT with mock data, on 1 and 2 ranks: the loss
// falls, a run resumed from a checkpoint repeats the uninterrupted run's losses bitwise, the
// scalar logs carry every iteration, and bad inputs stop every rank with a named error.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../../src/train/mock_dataset.h"
#include "moe/data/gpt_dataset.h"
#include "moe/data/indexed_dataset.h"
#include "moe/tensor/error.h"
#include "moe/train/arguments.h"
#include "moe/train/trainer.h"
#include "support/mpi_testing.h"
#include "support/testing.h"

namespace moe::train {
namespace {

namespace fs = std::filesystem;
using Args = std::vector<std::string>;
using moe::testing::SharedScratchDir;

int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}
int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

// 2 layers of 4 experts (top-2, aux and z losses), hidden 32, global batch 8 of 16 tokens.
Args tiny_moe_flags(int train_iters) {
  return {"--num-layers",
          "2",
          "--hidden-size",
          "32",
          "--num-attention-heads",
          "4",
          "--seq-length",
          "16",
          "--max-position-embeddings",
          "16",
          "--micro-batch-size",
          "4",
          "--global-batch-size",
          "8",
          "--train-iters",
          std::to_string(train_iters),
          "--lr-decay-iters",
          "60",
          "--lr",
          "3e-3",
          "--min-lr",
          "3e-4",
          "--lr-decay-style",
          "cosine",
          "--lr-warmup-iters",
          "3",
          "--num-experts",
          "4",
          "--moe-router-topk",
          "2",
          "--moe-aux-loss-coeff",
          "1e-2",
          "--moe-z-loss-coeff",
          "1e-3",
          "--moe-grouped-gemm",
          "--swiglu",
          "--normalization",
          "RMSNorm",
          "--position-embedding-type",
          "rope",
          "--disable-bias-linear",
          "--untie-embeddings-and-output-weights",
          "--mock-data",
          "--tokenizer-type",
          "NullTokenizer",
          "--vocab-size",
          "63",
          "--seed",
          "7",
          "--log-interval",
          "5",
          "--eval-interval",
          "1000",
          "--eval-iters",
          "1"};
}

Args with(Args base, const Args& extra) {
  base.insert(base.end(), extra.begin(), extra.end());
  return base;
}

TrainingReport run(const Args& flags, std::string* log_text = nullptr) {
  TrainingArguments args = parse_arguments(flags).args;
  finalize_arguments(args, world_size());
  std::ostringstream log;
  TrainingReport report = pretrain(args, log);
  if (log_text) *log_text = log.str();
  return report;
}

double mean_loss(const std::vector<IterationStats>& stats, size_t begin, size_t end) {
  double sum = 0;
  for (size_t i = begin; i < end; ++i) sum += stats[i].lm_loss;
  return sum / double(end - begin);
}

TEST(TrainingLoop, TinyMoeModelLearnsInFiftyIterations) {
  std::string log;
  TrainingReport report =
      run(with(tiny_moe_flags(50), {"--hidden-dropout", "0", "--attention-dropout", "0"}), &log);
  ASSERT_EQ(report.iterations.size(), 50u);
  const double first = mean_loss(report.iterations, 0, 5);
  const double last = mean_loss(report.iterations, 45, 50);
  // The mock documents count upward, so the next token is predictable: the loss starts near
  // ln(128) = 4.85 (63 ids + eod, padded to 128 rows) and must fall by at least 2 nats within
  // 50 iterations.
  EXPECT_NEAR(report.iterations[0].lm_loss, std::log(128.0), 0.3);
  EXPECT_LT(last, first - 2.0) << "first 5 iterations " << first << ", last 5 " << last;
  std::printf("[ lm loss ] first 5 iterations %.4f, last 5 %.4f\n", first, last);
  for (const IterationStats& s : report.iterations) {
    EXPECT_FALSE(s.skipped);
    EXPECT_GT(s.load_balancing_loss, 0.0);
    EXPECT_GT(s.z_loss, 0.0);
    ASSERT_EQ(s.expert_load.size(), 4u);
    EXPECT_NEAR(std::accumulate(s.expert_load.begin(), s.expert_load.end(), 0.0), 4.0, 1e-9);
    // Both layers route the same number of slots, so the overall load is their mean.
    ASSERT_EQ(s.layer_expert_load.size(), 2u);
    for (size_t e = 0; e < 4; ++e) {
      ASSERT_EQ(s.layer_expert_load[0].size(), 4u);
      ASSERT_EQ(s.layer_expert_load[1].size(), 4u);
      EXPECT_NEAR(s.expert_load[e], (s.layer_expert_load[0][e] + s.layer_expert_load[1][e]) / 2,
                  1e-12);
    }
  }
  EXPECT_EQ(report.iterations.back().consumed_samples, 400);
  if (world_rank() == 0) {
    EXPECT_CONTAINS(log, " iteration       50/      50 | consumed samples:          400 |");
    EXPECT_CONTAINS(log, "expert load min/max: ");
    EXPECT_CONTAINS(log, "load_balancing_loss: ");
  }
}

// --moe-router-type expert_choice end to end (with ep = 2 on two ranks): every expert takes the
// same number of tokens, so the relative load is exactly 1; there is no aux loss; the loss falls.
TEST(TrainingLoop, ExpertChoiceRouterTrains) {
  Args flags =
      with(tiny_moe_flags(30),
           {"--moe-router-type", "expert_choice", "--moe-expert-capacity-factor", "1.5",
            "--moe-aux-loss-coeff", "0", "--hidden-dropout", "0", "--attention-dropout", "0"});
  if (world_size() == 2) flags = with(flags, {"--expert-model-parallel-size", "2"});
  const TrainingReport report = run(flags);
  ASSERT_EQ(report.iterations.size(), 30u);
  const double first = mean_loss(report.iterations, 0, 5);
  const double last = mean_loss(report.iterations, 25, 30);
  // The same predictable mock corpus as above: at least 1.5 nats in 30 iterations.
  EXPECT_LT(last, first - 1.5) << "first 5 iterations " << first << ", last 5 " << last;
  std::printf("[ lm loss ] expert choice: first 5 iterations %.4f, last 5 %.4f\n", first, last);
  for (const IterationStats& s : report.iterations) {
    EXPECT_FALSE(s.skipped);
    EXPECT_EQ(s.load_balancing_loss, 0.0);
    EXPECT_GT(s.z_loss, 0.0);
    EXPECT_EQ(s.expert_load, std::vector<double>(4, 1.0));
  }
}

// The log line carries each stage's peak activation memory; selective recomputation lowers it
// and leaves every loss and gradient norm bitwise as it was.
TEST(TrainingLoop, SelectiveRecomputationLowersTheLoggedPeakAndChangesNoBit) {
  const Args flags = with(tiny_moe_flags(3), {"--log-interval", "1"});
  std::string log;
  const TrainingReport plain = run(flags, &log);
  if (world_rank() == 0) {  // the rank that writes the log
    EXPECT_NE(log.find("peak activation memory per stage (MiB): "), std::string::npos) << log;
  }
  const TrainingReport selective =
      run(with(flags, {"--recompute-granularity", "selective", "--recompute-modules", "core_attn",
                       "moe_act", "layernorm"}));
  ASSERT_EQ(plain.iterations.size(), 3u);
  ASSERT_EQ(selective.iterations.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(selective.iterations[i].lm_loss, plain.iterations[i].lm_loss);
    EXPECT_EQ(selective.iterations[i].grad_norm, plain.iterations[i].grad_norm);
    ASSERT_EQ(plain.iterations[i].stage_peak_activation_bytes.size(), 1u);
    EXPECT_LT(selective.iterations[i].stage_peak_activation_bytes[0],
              plain.iterations[i].stage_peak_activation_bytes[0]);
  }
}

TEST(TrainingLoop, ResumeRepeatsTheUninterruptedLossesBitwise) {
  // Dropout on, bf16 with the distributed optimizer: every piece of state must round-trip.
  const Args flags = with(tiny_moe_flags(12), {"--bf16", "--use-distributed-optimizer",
                                               "--hidden-dropout", "0.1", "--attention-dropout",
                                               "0.1", "--eval-interval", "4", "--eval-iters", "1"});
  SharedScratchDir scratch("resume");
  const fs::path& dir = scratch.path;
  const std::string save_dir = (dir / "ckpt").string();
  TrainingReport whole = run(flags);
  TrainingReport first_half =
      run(with(flags, {"--save", save_dir, "--save-interval", "6", "--exit-interval", "6"}));
  ASSERT_EQ(first_half.final_iteration, 6);
  ASSERT_TRUE(first_half.last_checkpoint.has_value());
  EXPECT_EQ(*first_half.last_checkpoint, (dir / "ckpt" / "iter_0000006").string());
  TrainingReport second_half = run(with(flags, {"--load", save_dir}));
  ASSERT_EQ(second_half.start_iteration, 6);
  ASSERT_EQ(second_half.iterations.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    const IterationStats& resumed = second_half.iterations[i];
    const IterationStats& original = whole.iterations[6 + i];
    EXPECT_EQ(resumed.iteration, original.iteration);
    EXPECT_EQ(resumed.lm_loss, original.lm_loss) << "iteration " << resumed.iteration;
    EXPECT_EQ(resumed.grad_norm, original.grad_norm) << "iteration " << resumed.iteration;
    EXPECT_EQ(resumed.lr, original.lr) << "iteration " << resumed.iteration;
    EXPECT_EQ(resumed.consumed_samples, original.consumed_samples);
  }
  // Validation at iterations 8 and 12 and at the end reads the same validation samples in both
  // runs (the position is in the checkpoint); the test split is evaluated at the end.
  ASSERT_EQ(whole.validation_losses.size(), 4u);
  ASSERT_EQ(second_half.validation_losses.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(second_half.validation_losses[i], whole.validation_losses[1 + i]);
  }
  ASSERT_TRUE(whole.test_loss.has_value() && second_half.test_loss.has_value());
  EXPECT_EQ(*second_half.test_loss, *whole.test_loss);
}

// The expert bias is state the checkpoint must carry (a buffer, not a parameter): resuming with
// it repeats the uninterrupted run bitwise, its range included.
TEST(TrainingLoop, ResumeWithTheExpertBiasIsBitwise) {
  const Args flags =
      with(tiny_moe_flags(8),
           {"--bf16", "--use-distributed-optimizer", "--moe-router-score-function", "sigmoid",
            "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-2"});
  SharedScratchDir scratch("resume_bias");
  const std::string save_dir = (scratch.path / "ckpt").string();
  const TrainingReport whole = run(flags);
  run(with(flags, {"--save", save_dir, "--save-interval", "4", "--exit-interval", "4"}));
  const TrainingReport second_half = run(with(flags, {"--load", save_dir}));
  ASSERT_EQ(second_half.iterations.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    const IterationStats &resumed = second_half.iterations[i], &original = whole.iterations[4 + i];
    EXPECT_EQ(resumed.lm_loss, original.lm_loss) << "iteration " << original.iteration;
    ASSERT_EQ(resumed.expert_bias_ranges.size(), 2u);
    for (size_t layer = 0; layer < 2; ++layer) {
      EXPECT_EQ(resumed.expert_bias_ranges[layer].min, original.expert_bias_ranges[layer].min);
      EXPECT_EQ(resumed.expert_bias_ranges[layer].max, original.expert_bias_ranges[layer].max);
    }
  }
}

TEST(TrainingLoop, LogFileAndTensorBoardRecordEveryIteration) {
  SharedScratchDir scratch("logs");
  const fs::path& dir = scratch.path;
  run(with(tiny_moe_flags(4), {"--log-file", (dir / "train.csv").string(), "--tensorboard-dir",
                               (dir / "tb").string(), "--eval-interval", "2"}));
  if (world_rank() == 0) {
    std::ifstream csv(dir / "train.csv");
    std::string line;
    int lm_rows = 0, validation_rows = 0, test_rows = 0, load_rows = 0;
    while (std::getline(csv, line)) {
      lm_rows += line.find(",lm loss,") != std::string::npos;
      validation_rows += line.find(",lm loss validation,") != std::string::npos;
      test_rows += line.find(",lm loss test,") != std::string::npos;
      load_rows += line.find(",expert-load-max,") != std::string::npos;
    }
    EXPECT_EQ(lm_rows, 4);
    EXPECT_EQ(validation_rows, 3);  // iterations 2 and 4, and the end of training
    EXPECT_EQ(test_rows, 1);
    EXPECT_EQ(load_rows, 4);
    int event_files = 0;
    for (const auto& entry : fs::directory_iterator(dir / "tb")) {
      event_files += entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0;
      EXPECT_GT(fs::file_size(entry.path()), 100u);
    }
    EXPECT_EQ(event_files, 1);
  }
}

// Expert parallelism moves tokens, not numbers: the first forward (before any update) is bitwise
// that of replicated experts. Later iterations agree to fp32 rounding only, because the global
// gradient norm sums the expert shards' squares in a different grouping, which moves the
// clipping factor by an ulp.
TEST(TrainingLoop, ExpertParallelMatchesReplicatedExperts) {
  if (world_size() != 2) GTEST_SKIP() << "needs 2 ranks";
  const Args flags = tiny_moe_flags(4);
  TrainingReport replicated = run(flags);
  TrainingReport all_to_all = run(with(
      flags, {"--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"}));
  TrainingReport all_gather = run(with(flags, {"--expert-model-parallel-size", "2"}));
  for (const TrainingReport* sharded : {&all_to_all, &all_gather}) {
    ASSERT_EQ(sharded->iterations.size(), 4u);
    EXPECT_EQ(sharded->iterations[0].lm_loss, replicated.iterations[0].lm_loss);
    EXPECT_EQ(sharded->iterations[0].load_balancing_loss,
              replicated.iterations[0].load_balancing_loss);
    EXPECT_EQ(sharded->iterations[0].expert_load, replicated.iterations[0].expert_load);
    for (size_t i = 0; i < 4; ++i) {
      const IterationStats &got = sharded->iterations[i], &want = replicated.iterations[i];
      EXPECT_NEAR(got.lm_loss, want.lm_loss, 1e-5 * want.lm_loss) << "iteration " << i + 1;
      EXPECT_NEAR(got.grad_norm, want.grad_norm, 1e-5 * want.grad_norm) << "iteration " << i + 1;
    }
  }
}

void expect_same_training(const TrainingReport& sharded, const TrainingReport& replicated) {
  ASSERT_EQ(sharded.iterations.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    const IterationStats &got = sharded.iterations[i], &want = replicated.iterations[i];
    EXPECT_NEAR(got.lm_loss, want.lm_loss, 1e-5 * want.lm_loss) << "iteration " << i + 1;
    EXPECT_NEAR(got.load_balancing_loss, want.load_balancing_loss, 1e-5 * want.load_balancing_loss)
        << "iteration " << i + 1;
    EXPECT_NEAR(got.grad_norm, want.grad_norm, 1e-4 * want.grad_norm) << "iteration " << i + 1;
  }
}

// Tensor parallelism with sequence parallelism against 2 data-parallel replicas, with the
// vocabulary padded alike (64 rows) in both layouts: the experts whole on each rank (etp 1) and
// split over the tp ranks (etp defaults to tp = 2, Megatron's default and the seed layout).
TEST(TrainingLoop, TensorParallelMatchesDataParallel) {
  if (world_size() != 2) GTEST_SKIP() << "needs 2 ranks";
  const Args flags = with(tiny_moe_flags(4), {"--make-vocab-size-divisible-by", "32"});
  const Args tensor_parallel =
      with(flags, {"--tensor-model-parallel-size", "2", "--sequence-parallel"});
  TrainingReport replicated = run(flags);
  for (const Args& layout :
       {with(tensor_parallel, {"--expert-tensor-parallel-size", "1"}), tensor_parallel}) {
    SCOPED_TRACE(layout.back());
    TrainingReport sharded = run(layout);
    expect_same_training(sharded, replicated);
  }
}

// Context parallelism (each sequence split over 2 cp ranks in Megatron's load-balanced chunks,
// with and without expert parallelism over the same ranks) trains as 2 data-parallel replicas
// see the same sequences: the loss over whole sequences, the router losses over tp x cp, the
// gradients averaged over dp x cp; dropout masks follow global rows. Its checkpoint resumes on
// the data-parallel layout where the uninterrupted run went.
TEST(TrainingLoop, ContextParallelMatchesDataParallelAndResumes) {
  if (world_size() != 2) GTEST_SKIP() << "needs 2 ranks";
  SharedScratchDir scratch("cp");
  const std::string save_dir = (scratch.path / "ckpt").string();
  const Args flags = tiny_moe_flags(4);
  const Args context_parallel = with(flags, {"--context-parallel-size", "2"});
  TrainingReport replicated = run(flags);
  for (const Args& layout :
       {context_parallel, with(context_parallel, {"--expert-model-parallel-size", "2"})}) {
    SCOPED_TRACE(layout.back());
    expect_same_training(run(layout), replicated);
  }
  run(with(context_parallel, {"--save", save_dir, "--save-interval", "2", "--exit-interval", "2"}));
  TrainingReport resumed = run(with(flags, {"--load", save_dir}));
  ASSERT_EQ(resumed.start_iteration, 2);
  ASSERT_EQ(resumed.iterations.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const IterationStats &got = resumed.iterations[i], &want = replicated.iterations[2 + i];
    EXPECT_NEAR(got.lm_loss, want.lm_loss, 1e-5 * want.lm_loss) << "iteration " << got.iteration;
  }
}

// Multi-latent attention (compressed queries, latent norms, YaRN with an attention factor and a
// softmax factor) trains the same with tensor and sequence parallelism as with 2 data-parallel
// replicas, and its tp checkpoint resumes on the data-parallel layout where the uninterrupted
// run went.
TEST(TrainingLoop, MultiLatentAttentionTensorParallelMatchesDataParallelAndResumes) {
  if (world_size() != 2) GTEST_SKIP() << "needs 2 ranks";
  SharedScratchDir scratch("mla");
  const std::string save_dir = (scratch.path / "ckpt").string();
  const Args flags = with(tiny_moe_flags(4), {"--make-vocab-size-divisible-by",
                                              "32",
                                              "--multi-latent-attention",
                                              "--q-lora-rank",
                                              "12",
                                              "--kv-lora-rank",
                                              "8",
                                              "--qk-head-dim",
                                              "4",
                                              "--qk-pos-emb-head-dim",
                                              "4",
                                              "--v-head-dim",
                                              "6",
                                              "--qk-layernorm",
                                              "--rope-type",
                                              "yarn",
                                              "--rotary-scaling-factor",
                                              "4",
                                              "--mscale-all-dim",
                                              "0.5"});
  const Args tensor_parallel =
      with(flags, {"--tensor-model-parallel-size", "2", "--sequence-parallel"});
  TrainingReport replicated = run(flags);
  expect_same_training(run(tensor_parallel), replicated);
  run(with(tensor_parallel, {"--save", save_dir, "--save-interval", "2", "--exit-interval", "2"}));
  TrainingReport resumed = run(with(flags, {"--load", save_dir}));
  ASSERT_EQ(resumed.start_iteration, 2);
  ASSERT_EQ(resumed.iterations.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const IterationStats &got = resumed.iterations[i], &want = replicated.iterations[2 + i];
    EXPECT_NEAR(got.lm_loss, want.lm_loss, 1e-5 * want.lm_loss) << "iteration " << got.iteration;
  }
}

// Qwen / DeepSeek attention flags through moe-train: on one rank the model learns; on two, tp 2
// with sequence parallelism matches 2 data-parallel replicas (q_layernorm / k_layernorm
// gradients summed over tp and counted once in the gradient norm).
TEST(TrainingLoop, QkLayernormQkvBiasAndYarnTrainAndMatchAcrossTensorParallelism) {
  auto flags = [](int iterations) {
    return with(tiny_moe_flags(iterations),
                {"--make-vocab-size-divisible-by", "32", "--qk-layernorm", "--add-qkv-bias",
                 "--position-embedding-type", "yarn", "--rotary-scaling-factor", "4",
                 "--yarn-original-max-position-embeddings", "8"});
  };
  if (world_size() == 1) {
    TrainingReport report = run(flags(6));
    ASSERT_EQ(report.iterations.size(), 6u);
    EXPECT_LT(report.iterations.back().lm_loss, report.iterations.front().lm_loss);
    return;
  }
  if (world_size() != 2) GTEST_SKIP() << "needs 1 or 2 ranks";
  TrainingReport replicated = run(flags(4));
  TrainingReport sharded =
      run(with(flags(4), {"--tensor-model-parallel-size", "2", "--sequence-parallel"}));
  expect_same_training(sharded, replicated);
}

// Two pipeline stages (1F1B, 2 accumulated micro-batches) against one stage with 2
// data-parallel replicas: the same first loss bitwise, then agreement to fp32 rounding; and a
// pipelined run resumed from its checkpoint repeats its own losses bitwise.
TEST(TrainingLoop, PipelineMatchesOneStageAndResumes) {
  if (world_size() != 2) GTEST_SKIP() << "needs 2 ranks";
  const Args flags = with(tiny_moe_flags(4), {"--num-layers", "4"});
  const Args pipelined = with(flags, {"--pipeline-model-parallel-size", "2"});
  TrainingReport one_stage = run(flags);
  TrainingReport two_stages = run(pipelined);
  ASSERT_EQ(two_stages.iterations.size(), 4u);
  EXPECT_EQ(two_stages.iterations[0].lm_loss, one_stage.iterations[0].lm_loss);
  for (size_t i = 0; i < 4; ++i) {
    const IterationStats &got = two_stages.iterations[i], &want = one_stage.iterations[i];
    EXPECT_NEAR(got.lm_loss, want.lm_loss, 1e-5 * want.lm_loss) << "iteration " << i + 1;
    EXPECT_NEAR(got.load_balancing_loss, want.load_balancing_loss, 1e-5 * want.load_balancing_loss);
    EXPECT_NEAR(got.grad_norm, want.grad_norm, 1e-5 * want.grad_norm) << "iteration " << i + 1;
  }
  SharedScratchDir scratch("pipeline_resume");
  const fs::path& dir = scratch.path;
  const std::string save_dir = (dir / "ckpt").string();
  run(with(pipelined, {"--save", save_dir, "--save-interval", "2", "--exit-interval", "2"}));
  TrainingReport resumed = run(with(pipelined, {"--load", save_dir}));
  ASSERT_EQ(resumed.iterations.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(resumed.iterations[i].lm_loss, two_stages.iterations[2 + i].lm_loss);
    EXPECT_EQ(resumed.iterations[i].grad_norm, two_stages.iterations[2 + i].grad_norm);
  }
}

// Tied embedding and output weights with multi-token prediction on two pipeline stages (the last
// stage holds a copy of the word embedding, its gradient summed with the first stage's) against
// one stage with 2 data-parallel replicas: the same first loss bitwise, then agreement to fp32
// rounding in the losses and the gradient norm (which counts the copy once). Checkpoints hold
// the embedding once, so each layout resumes from the other's checkpoint: the first resumed
// forward equals the uninterrupted run's bitwise (same weights, same data).
TEST(TrainingLoop, TiedEmbeddingsAndMtpAcrossPipelineStagesMatchOneStageAndSwapCheckpoints) {
  if (world_size() != 2) GTEST_SKIP() << "needs 2 ranks";
  Args flags = with(tiny_moe_flags(4), {"--num-layers", "4", "--mtp-num-layers", "1"});
  flags.erase(std::find(flags.begin(), flags.end(), "--untie-embeddings-and-output-weights"));
  const Args pipelined = with(flags, {"--pipeline-model-parallel-size", "2"});
  TrainingReport one_stage = run(flags);
  TrainingReport two_stages = run(pipelined);
  ASSERT_EQ(two_stages.iterations.size(), 4u);
  EXPECT_EQ(two_stages.iterations[0].lm_loss, one_stage.iterations[0].lm_loss);
  for (size_t i = 0; i < 4; ++i) {
    const IterationStats &got = two_stages.iterations[i], &want = one_stage.iterations[i];
    EXPECT_NEAR(got.lm_loss, want.lm_loss, 1e-5 * want.lm_loss) << "iteration " << i + 1;
    ASSERT_EQ(got.mtp_losses.size(), 1u);
    EXPECT_NEAR(got.mtp_losses[0], want.mtp_losses[0], 1e-5 * want.mtp_losses[0]);
    EXPECT_NEAR(got.grad_norm, want.grad_norm, 1e-5 * want.grad_norm) << "iteration " << i + 1;
  }
  SharedScratchDir scratch("tied_pipeline_swap");
  const std::string one_stage_dir = (scratch.path / "one_stage").string();
  const std::string two_stages_dir = (scratch.path / "two_stages").string();
  const Args save_at_two = {"--save-interval", "2", "--exit-interval", "2"};
  run(with(with(flags, {"--save", one_stage_dir}), save_at_two));
  run(with(with(pipelined, {"--save", two_stages_dir}), save_at_two));
  TrainingReport pipelined_from_one_stage = run(with(pipelined, {"--load", one_stage_dir}));
  TrainingReport one_stage_from_pipelined = run(with(flags, {"--load", two_stages_dir}));
  ASSERT_EQ(pipelined_from_one_stage.iterations.size(), 2u);
  ASSERT_EQ(one_stage_from_pipelined.iterations.size(), 2u);
  EXPECT_EQ(pipelined_from_one_stage.iterations[0].lm_loss, one_stage.iterations[2].lm_loss);
  EXPECT_EQ(one_stage_from_pipelined.iterations[0].lm_loss, two_stages.iterations[2].lm_loss);
  for (size_t i = 0; i < 2; ++i) {
    const IterationStats& want = one_stage.iterations[2 + i];
    for (const TrainingReport* resumed : {&pipelined_from_one_stage, &one_stage_from_pipelined}) {
      EXPECT_NEAR(resumed->iterations[i].lm_loss, want.lm_loss, 1e-5 * want.lm_loss);
      EXPECT_NEAR(resumed->iterations[i].grad_norm, want.grad_norm, 1e-5 * want.grad_norm);
    }
  }
}

// Virtual pipeline stages (2 chunks per rank, set either way) and an uneven first stage against
// one stage with 2 data-parallel replicas: the same first loss bitwise, then agreement to fp32
// rounding; checkpoints name layers globally, so the interleaved run's checkpoint resumes on one
// stage with the same next forward, bitwise.
TEST(TrainingLoop, InterleavedAndUnevenPipelinesMatchOneStage) {
  if (world_size() != 2) GTEST_SKIP() << "needs 2 ranks";
  const Args flags = with(tiny_moe_flags(4), {"--num-layers", "4"});
  const Args pipelined = with(flags, {"--pipeline-model-parallel-size", "2"});
  const Args interleaved = with(pipelined, {"--num-virtual-stages-per-pipeline-rank", "2"});
  TrainingReport one_stage = run(flags);
  TrainingReport two_chunks = run(interleaved);
  TrainingReport layers_per_chunk =
      run(with(pipelined, {"--num-layers-per-virtual-pipeline-stage", "1"}));
  TrainingReport uneven = run(with(pipelined, {"--decoder-first-pipeline-num-layers", "1"}));
  for (const TrainingReport* report : {&two_chunks, &layers_per_chunk, &uneven}) {
    ASSERT_EQ(report->iterations.size(), 4u);
    EXPECT_EQ(report->iterations[0].lm_loss, one_stage.iterations[0].lm_loss);
    for (size_t i = 0; i < 4; ++i) {
      const IterationStats &got = report->iterations[i], &want = one_stage.iterations[i];
      EXPECT_NEAR(got.lm_loss, want.lm_loss, 1e-5 * want.lm_loss) << "iteration " << i + 1;
      EXPECT_NEAR(got.grad_norm, want.grad_norm, 1e-5 * want.grad_norm) << "iteration " << i + 1;
    }
  }
  for (size_t i = 0; i < 4; ++i) {  // the same layout, named two ways
    EXPECT_EQ(layers_per_chunk.iterations[i].lm_loss, two_chunks.iterations[i].lm_loss);
  }
  SharedScratchDir scratch("interleaved_resume");
  const std::string save_dir = (scratch.path / "ckpt").string();
  run(with(interleaved, {"--save", save_dir, "--save-interval", "2", "--exit-interval", "2"}));
  TrainingReport resumed = run(with(flags, {"--load", save_dir}));
  ASSERT_EQ(resumed.iterations.size(), 2u);
  EXPECT_EQ(resumed.iterations[0].lm_loss, two_chunks.iterations[2].lm_loss);
}

// fp16 with a loss scale far beyond fp16's range: every step overflows, is skipped (the learning
// rate schedule does not advance) and the dynamic scale halves (hysteresis 1); the log says so.
TEST(TrainingLoop, Fp16OverflowSkipsStepsAndLowersTheScale) {
  std::string log;
  TrainingReport report =
      run(with(tiny_moe_flags(3), {"--fp16", "--initial-loss-scale", "1e30", "--hysteresis", "1",
                                   "--log-interval", "1", "--lr-warmup-iters", "0"}),
          &log);
  ASSERT_EQ(report.iterations.size(), 3u);
  double scale = 1e30;
  for (const IterationStats& s : report.iterations) {
    EXPECT_TRUE(s.skipped);
    scale /= 2;
    EXPECT_DOUBLE_EQ(s.loss_scale, scale);
    EXPECT_DOUBLE_EQ(s.lr, 3e-3);  // still at step 0 of the schedule
    EXPECT_EQ(s.consumed_samples, 8 * s.iteration);
  }
  if (world_rank() == 0) {
    EXPECT_CONTAINS(log,
                    "number of skipped iterations:   1 | (inf/NaN gradients: step skipped, "
                    "loss scale lowered) |");
  }
}

// Megatron's --no-load-optim: the model comes from the checkpoint, the optimizer and the
// learning-rate schedule start fresh, the iteration and data position continue.
TEST(TrainingLoop, NoLoadOptimLoadsTheModelOnly) {
  SharedScratchDir scratch("no_load_optim");
  const fs::path& dir = scratch.path;
  const std::string save_dir = (dir / "ckpt").string();
  const Args flags = with(tiny_moe_flags(4), {"--lr-warmup-iters", "2"});
  TrainingReport whole = run(flags);
  run(with(flags, {"--save", save_dir, "--save-interval", "2", "--exit-interval", "2"}));
  TrainingReport fresh_optimizer =
      run(with(flags, {"--load", save_dir, "--no-load-optim", "--no-load-rng"}));
  ASSERT_EQ(fresh_optimizer.start_iteration, 2);
  ASSERT_EQ(fresh_optimizer.iterations.size(), 2u);
  // Same weights and data at iteration 3, so the same forward loss; a restarted warmup then
  // gives a different learning rate than the uninterrupted run.
  EXPECT_EQ(fresh_optimizer.iterations[0].lm_loss, whole.iterations[2].lm_loss);
  EXPECT_EQ(fresh_optimizer.iterations[0].consumed_samples, 24);
  EXPECT_NE(fresh_optimizer.iterations[0].lr, whole.iterations[2].lr);
}

// A checkpoint saved with replicated experts resumes with the experts sharded over 2 ranks:
// the resumed run continues the uninterrupted one (its first forward bitwise).
TEST(TrainingLoop, ResumesIntoAnotherExpertLayout) {
  if (world_size() != 2) GTEST_SKIP() << "needs 2 ranks";
  SharedScratchDir scratch("relayout");
  const fs::path& dir = scratch.path;
  const std::string save_dir = (dir / "ckpt").string();
  const Args flags = tiny_moe_flags(4);
  TrainingReport whole = run(flags);
  run(with(flags, {"--save", save_dir, "--save-interval", "2", "--exit-interval", "2"}));
  TrainingReport sharded = run(with(flags, {"--load", save_dir, "--expert-model-parallel-size", "2",
                                            "--moe-token-dispatcher-type", "alltoall"}));
  ASSERT_EQ(sharded.start_iteration, 2);
  ASSERT_EQ(sharded.iterations.size(), 2u);
  EXPECT_EQ(sharded.iterations[0].lm_loss, whole.iterations[2].lm_loss);
  for (size_t i = 0; i < 2; ++i) {
    const IterationStats &got = sharded.iterations[i], &want = whole.iterations[2 + i];
    EXPECT_NEAR(got.lm_loss, want.lm_loss, 1e-5 * want.lm_loss) << "iteration " << got.iteration;
    EXPECT_EQ(got.lr, want.lr);
  }
}

// --eod-mask-loss reaches the data pipeline: the first iteration's loss averages over exactly
// the tokens the data module's mask keeps for the global batch's samples 0..7 (every token
// without the flag, fewer with it), and so differs.
TEST(TrainingLoop, EodMaskLossChangesTheAveragedTokens) {
  TrainingReport all_tokens = run(tiny_moe_flags(1));
  TrainingReport masked = run(with(tiny_moe_flags(1), {"--eod-mask-loss"}));
  // The same samples as the loop's mock data: NullTokenizer --vocab-size 63 (eod 63, 64 ids),
  // --seed 7, 16 tokens.
  data::SampleOptions options;
  options.eod_token = 63;
  options.eod_mask_loss = true;
  MockGPTDataset samples(8, 16, 64, 63, 7, data::Split::Train);
  const std::vector<int64_t> indices = {0, 1, 2, 3, 4, 5, 6, 7};
  Tensor mask = data::make_micro_batch(samples, indices, options).loss_mask;  // [8, 16]
  const double kept = std::accumulate(mask.data<float>(), mask.data<float>() + mask.numel(), 0.0);
  ASSERT_LT(kept, 8 * 16) << "the mock samples should hold end-of-document tokens";
  EXPECT_EQ(all_tokens.iterations[0].loss_tokens, 8 * 16);
  EXPECT_EQ(masked.iterations[0].loss_tokens, kept);
  EXPECT_NE(all_tokens.iterations[0].lm_loss, masked.iterations[0].lm_loss);
  EXPECT_TRUE(std::isfinite(masked.iterations[0].lm_loss));
}

// The (global_shape) of a tensor in a rank's checkpoint index.
std::vector<int64_t> saved_global_shape(const fs::path& iteration_dir, const std::string& name) {
  std::ifstream index(iteration_dir / "rank_00000.json");
  const nlohmann::json json = nlohmann::json::parse(index);
  for (const auto& piece : json.at("tensors")) {
    if (piece.at("name") == name) return piece.at("global_shape").get<std::vector<int64_t>>();
  }
  ADD_FAILURE() << name << " not in " << iteration_dir;
  return {};
}

// The learned position table has --max-position-embeddings rows (not --seq-length), so a run
// saved at one sequence length continues at a longer one within the table.
TEST(TrainingLoop, LearnedPositionsCoverMaxPositionEmbeddingsAndResumeAtLongerSequences) {
  Args flags = tiny_moe_flags(4);
  flags.erase(std::find(flags.begin(), flags.end(), "--position-embedding-type"),
              std::find(flags.begin(), flags.end(), "--position-embedding-type") + 2);
  flags = with(flags, {"--max-position-embeddings", "32"});
  SharedScratchDir scratch("positions");
  const fs::path& dir = scratch.path;
  const std::string save_dir = (dir / "ckpt").string();
  run(with(flags, {"--save", save_dir, "--save-interval", "2", "--exit-interval", "2"}));
  if (world_rank() == 0) {
    EXPECT_EQ(
        saved_global_shape(dir / "ckpt" / "iter_0000002", "embedding.position_embeddings.weight"),
        (std::vector<int64_t>{32, 32}));
  }
  TrainingReport longer = run(with(flags, {"--load", save_dir, "--seq-length", "24"}));
  ASSERT_EQ(longer.start_iteration, 2);
  ASSERT_EQ(longer.iterations.size(), 2u);
  for (const IterationStats& s : longer.iterations) {
    EXPECT_TRUE(std::isfinite(s.lm_loss));
    EXPECT_EQ(s.loss_tokens, 8 * 24);
  }
}

// The checkpoint carries the run's random streams (Megatron's RNG state). Resumed with another
// --seed (which also changes the mock data), the same weights and samples see the saved streams'
// dropout masks, or --seed's with --no-load-rng, so the losses differ; the saved streams resumed
// with the same seed repeat the uninterrupted run. A checkpoint saved with --no-save-rng holds
// none, so loading it needs --no-load-rng (or --finetune).
TEST(TrainingLoop, RandomStateIsSavedUnlessNoSaveRng) {
  const Args flags = with(tiny_moe_flags(4), {"--hidden-dropout", "0.2"});
  SharedScratchDir scratch("rng");
  const fs::path& dir = scratch.path;
  const std::string with_rng = (dir / "with_rng").string(), without = (dir / "without").string();
  TrainingReport whole = run(flags);
  const Args first_half = {"--save-interval", "2", "--exit-interval", "2"};
  run(with(with(flags, first_half), {"--save", with_rng}));
  run(with(with(flags, first_half), {"--save", without, "--no-save-rng"}));
  TrainingReport restored = run(with(flags, {"--load", with_rng, "--seed", "8"}));
  TrainingReport reseeded = run(with(flags, {"--load", with_rng, "--seed", "8", "--no-load-rng"}));
  ASSERT_EQ(restored.iterations.size(), 2u);
  ASSERT_EQ(reseeded.iterations.size(), 2u);
  EXPECT_NE(restored.iterations[0].lm_loss, reseeded.iterations[0].lm_loss);
  TrainingReport resumed = run(with(flags, {"--load", with_rng}));
  ASSERT_EQ(resumed.iterations.size(), 2u);
  EXPECT_EQ(resumed.iterations[0].lm_loss, whole.iterations[2].lm_loss);
  EXPECT_EQ(moe::testing::error_text([&] {
              run(with(flags, {"--load", without}));
            }),
            "checkpoint '" + without +
                "' at iteration 2 holds no random state (saved with --no-save-rng, or "
                "converted); use --no-load-rng (random streams from --seed) or --finetune");
  TrainingReport from_seed = run(with(flags, {"--load", without, "--no-load-rng"}));
  ASSERT_EQ(from_seed.iterations.size(), 2u);
  EXPECT_EQ(from_seed.iterations[0].lm_loss, whole.iterations[2].lm_loss);
}

// A resumed run appends to its --log-file: the earlier run's rows stay, one header.
TEST(TrainingLoop, ResumedRunAppendsToTheLogFile) {
  SharedScratchDir scratch("log_append");
  const fs::path& dir = scratch.path;
  const std::string log_file = (dir / "train.csv").string(), save_dir = (dir / "ckpt").string();
  const Args flags = with(tiny_moe_flags(4), {"--log-file", log_file});
  run(with(flags, {"--save", save_dir, "--save-interval", "2", "--exit-interval", "2"}));
  run(with(flags, {"--load", save_dir}));
  if (world_rank() == 0) {
    std::ifstream csv(log_file);
    std::string line;
    std::vector<int> lm_iterations;
    int headers = 0;
    while (std::getline(csv, line)) {
      headers += line == "iteration,tag,value";
      if (line.find(",lm loss,") != std::string::npos) lm_iterations.push_back(std::stoi(line));
    }
    EXPECT_EQ(headers, 1);
    EXPECT_EQ(lm_iterations, (std::vector<int>{1, 2, 3, 4}));
  }
}

// The data module's ByteTokenizer trains (vocab 257: bytes and eod, padded to 384).
TEST(TrainingLoop, ByteTokenizerTrains) {
  Args flags = tiny_moe_flags(1);
  flags.erase(std::find(flags.begin(), flags.end(), "--vocab-size"),
              std::find(flags.begin(), flags.end(), "--vocab-size") + 2);
  std::string log;
  TrainingReport report = run(with(flags, {"--tokenizer-type", "ByteTokenizer"}), &log);
  ASSERT_EQ(report.iterations.size(), 1u);
  EXPECT_NEAR(report.iterations[0].lm_loss, std::log(384.0), 0.3);
  if (world_rank() == 0) {
    EXPECT_CONTAINS(log,
                    "> building ByteTokenizer tokenizer ... padded vocab (size: 257) with 127 "
                    "dummy tokens (new size: 384)");
  }
}

// The log line averages losses over the interval's iterations that were not skipped, time and
// throughput over all of them, and takes the expert-load extremes over the whole interval.
TEST(TrainingLog, AveragesTheInterval) {
  IterationStats a, b, skipped;
  a.iteration = 9;
  a.lm_loss = 4.0;
  a.load_balancing_loss = 0.01;
  a.elapsed_ms = 100;
  a.tokens_per_second = 1000;
  a.expert_load = {0.5, 1.5};
  b = a;
  b.iteration = 10;
  b.lm_loss = 2.0;
  b.load_balancing_loss = 0.03;
  b.expert_load = {0.8, 1.2};
  skipped = b;
  skipped.iteration = 11;
  skipped.skipped = true;
  skipped.lm_loss = 1e9;  // not averaged
  skipped.elapsed_ms = 400;
  skipped.consumed_samples = 88;
  skipped.lr = 1e-4;
  skipped.grad_norm = 0.5;
  skipped.loss_scale = 512;
  EXPECT_EQ(format_log_line({a, b, skipped}, 20, 8),
            " iteration       11/      20 | consumed samples:           88 | elapsed time per "
            "iteration (ms): 200.0 | tokens/s: 1000 | learning rate: 1.000000E-04 | global batch "
            "size:     8 | lm loss: 3.000000E+00 | load_balancing_loss: 2.000000E-02 | loss "
            "scale: 512.0 | grad norm: 0.500 | expert load min/max: 0.50/1.50 | number of "
            "skipped iterations:   1 | (inf/NaN gradients: step skipped, loss scale lowered) | "
            "number of nan iterations:   0 |");
}

// Padding every expert to its capacity must not make the logged load look perfectly even: the
// load counts tokens, not padding rows.
TEST(TrainingLoop, ExpertLoadIgnoresCapacityPadding) {
  TrainingReport report = run(with(tiny_moe_flags(2), {"--moe-expert-capacity-factor", "1.5",
                                                       "--moe-pad-expert-input-to-capacity"}));
  ASSERT_EQ(report.iterations.size(), 2u);
  const std::vector<double>& load = report.iterations[0].expert_load;
  ASSERT_EQ(load.size(), 4u);
  EXPECT_NEAR(std::accumulate(load.begin(), load.end(), 0.0), 4.0, 1e-9);
  EXPECT_FALSE(std::all_of(load.begin(), load.end(), [](double l) { return l == 1.0; }))
      << "every expert at 1.0: the padding rows were counted";
}

TEST(TrainingLog, PrintsEachMtpDepthLossAfterTheRouterLosses) {
  IterationStats a;
  a.iteration = 2;
  a.lm_loss = 4.0;
  a.mtp_losses = {5.0, 6.0};
  IterationStats b = a;
  b.iteration = 3;
  b.mtp_losses = {3.0, 2.0};
  EXPECT_CONTAINS(format_log_line({a, b}, 20, 8),
                  "| lm loss: 4.000000E+00 | mtp_1 loss: 4.000000E+00 | mtp_2 loss: "
                  "4.000000E+00 | loss scale:");
}

// --mtp-num-layers 1 on the tiny MoE model (its last layer, and so the MTP layer, is MoE): the
// first lm loss is bitwise that of the run without MTP (same weights by name, same data), the MTP
// loss is logged and falls as the model learns.
TEST(TrainingLoop, MultiTokenPredictionTrainsAndLogsItsLoss) {
  SharedScratchDir scratch("mtp");
  const Args flags =
      with(tiny_moe_flags(12), {"--hidden-dropout", "0", "--attention-dropout", "0"});
  std::string log;
  TrainingReport report = run(
      with(flags, {"--mtp-num-layers", "1", "--log-file", (scratch.path / "train.csv").string()}),
      &log);
  ASSERT_EQ(report.iterations.size(), 12u);
  for (const IterationStats& s : report.iterations) {
    ASSERT_EQ(s.mtp_losses.size(), 1u);
    EXPECT_TRUE(std::isfinite(s.mtp_losses[0]) && s.mtp_losses[0] > 0);
  }
  const TrainingReport plain =
      run(with(tiny_moe_flags(1), {"--hidden-dropout", "0", "--attention-dropout", "0"}));
  EXPECT_EQ(report.iterations[0].lm_loss, plain.iterations[0].lm_loss);
  EXPECT_TRUE(plain.iterations[0].mtp_losses.empty());
  // As the lm loss, the MTP loss starts near ln(128) (its logits come from the same small
  // weights) and must fall by a clear margin in 12 iterations.
  EXPECT_NEAR(report.iterations[0].mtp_losses[0], std::log(128.0), 0.3);
  EXPECT_LT(report.iterations.back().mtp_losses[0], report.iterations[0].mtp_losses[0] - 0.5);
  std::printf("[ mtp_1 loss ] iteration 1 %.4f, iteration 12 %.4f (lm loss %.4f, %.4f)\n",
              report.iterations[0].mtp_losses[0], report.iterations.back().mtp_losses[0],
              report.iterations[0].lm_loss, report.iterations.back().lm_loss);
  if (world_rank() == 0) {
    EXPECT_CONTAINS(log, " mtp_1 loss: ");
    std::ifstream csv(scratch.path / "train.csv");
    std::string line;
    int mtp_rows = 0;
    while (std::getline(csv, line)) mtp_rows += line.find(",mtp_1 loss,") != std::string::npos;
    EXPECT_EQ(mtp_rows, 12);
  }
}

// The MTP modules' parameters and optimizer state round-trip through a checkpoint: a resumed run
// repeats the uninterrupted run's lm and MTP losses bitwise.
TEST(TrainingLoop, MultiTokenPredictionResumesBitwise) {
  const Args flags =
      with(tiny_moe_flags(8), {"--mtp-num-layers", "2", "--bf16", "--use-distributed-optimizer"});
  SharedScratchDir scratch("mtp_resume");
  const std::string save_dir = (scratch.path / "ckpt").string();
  const TrainingReport whole = run(flags);
  run(with(flags, {"--save", save_dir, "--save-interval", "4", "--exit-interval", "4"}));
  const TrainingReport resumed = run(with(flags, {"--load", save_dir}));
  ASSERT_EQ(resumed.iterations.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    const IterationStats& original = whole.iterations[4 + i];
    EXPECT_EQ(resumed.iterations[i].lm_loss, original.lm_loss)
        << "iteration " << original.iteration;
    EXPECT_EQ(resumed.iterations[i].mtp_losses, original.mtp_losses)
        << "iteration " << original.iteration;
  }
}

// A small DeepSeek-style MoE: sigmoid scores with the aux-loss-free expert bias, group-limited
// routing, the global-batch aux loss, one shared expert and the first layer dense. It trains, the
// bias moves every step, and the bias after a step is the same whether the experts are replicated
// or split over ep (its loads are summed over every rank of the stage).
TEST(TrainingLoop, DeepSeekStyleRoutingTrains) {
  const Args flags = with(tiny_moe_flags(30), {"--moe-router-score-function",
                                               "sigmoid",
                                               "--moe-router-enable-expert-bias",  //
                                               "--moe-router-bias-update-rate",
                                               "1e-2",
                                               "--num-experts",
                                               "8",  //
                                               "--moe-router-num-groups",
                                               "4",
                                               "--moe-router-group-topk",
                                               "2",  //
                                               "--moe-router-load-balancing-type",
                                               "global_aux_loss",  //
                                               "--moe-aux-loss-coeff",
                                               "1e-3",
                                               "--moe-shared-expert-intermediate-size",
                                               "16",
                                               "--moe-layer-freq",
                                               "[0,1]",
                                               "--hidden-dropout",
                                               "0",
                                               "--attention-dropout",
                                               "0"});
  std::string log;
  const TrainingReport report =
      run(world_size() == 2 ? with(flags, {"--expert-model-parallel-size", "2"}) : flags, &log);
  ASSERT_EQ(report.iterations.size(), 30u);
  const double first = mean_loss(report.iterations, 0, 5);
  const double last = mean_loss(report.iterations, 25, 30);
  // The predictable mock corpus of TinyMoeModelLearnsInFiftyIterations: 1.5 nats in 30 steps.
  EXPECT_LT(last, first - 1.5) << "first 5 iterations " << first << ", last 5 " << last;
  std::printf("[ lm loss ] DeepSeek-style: first 5 iterations %.4f, last 5 %.4f\n", first, last);
  bool bias_moved = false;
  for (const IterationStats& s : report.iterations) {
    EXPECT_GT(s.load_balancing_loss, 0.0);       // the global aux loss
    ASSERT_EQ(s.expert_bias_ranges.size(), 1u);  // layer 1; layer 0 is dense
    EXPECT_EQ(s.expert_bias_ranges[0].layer, 1);
    // Each update moves an expert's bias by +-rate or 0 (fp32 sums: 1e-6 relative slack).
    const double bound = 1e-2 * double(s.iteration) * (1 + 1e-6);
    EXPECT_GE(s.expert_bias_ranges[0].min, -bound);
    EXPECT_LE(s.expert_bias_ranges[0].max, bound);
    bias_moved = bias_moved || s.expert_bias_ranges[0].min < s.expert_bias_ranges[0].max;
  }
  EXPECT_TRUE(bias_moved);
  EXPECT_EQ(report.iterations[0].layer_expert_load[0].size(), 0u);  // dense
  if (world_rank() == 0) {
    EXPECT_CONTAINS(log, "expert bias min/max: ");
  }
  if (world_size() == 2) {
    const TrainingReport replicated = run(flags);
    EXPECT_EQ(replicated.iterations[0].lm_loss, report.iterations[0].lm_loss);
    EXPECT_EQ(replicated.iterations[0].expert_bias_ranges[0].min,
              report.iterations[0].expert_bias_ranges[0].min);
    EXPECT_EQ(replicated.iterations[0].expert_bias_ranges[0].max,
              report.iterations[0].expert_bias_ranges[0].max);
  }
}

TEST(TrainingLoop, DenseModelTrains) {
  Args flags = tiny_moe_flags(6);
  for (const char* moe_flag :
       {"--num-experts", "--moe-router-topk", "--moe-aux-loss-coeff", "--moe-z-loss-coeff"}) {
    auto at = std::find(flags.begin(), flags.end(), moe_flag);
    flags.erase(at, at + 2);
  }
  flags.erase(std::find(flags.begin(), flags.end(), "--moe-grouped-gemm"));
  TrainingReport report = run(flags);
  ASSERT_EQ(report.iterations.size(), 6u);
  EXPECT_TRUE(report.iterations.back().expert_load.empty());
  EXPECT_LT(report.iterations.back().lm_loss, report.iterations.front().lm_loss);
}

// DeepSeek-style blocks: --moe-layer-freq '[0]+[1]*3' makes layer 0 dense with --ffn-hidden-size
// and layers 1-3 MoE with a different --moe-ffn-hidden-size; the parameter counts in the log show
// which layer got which size, and the model learns.
TEST(TrainingLoop, FirstLayerDenseWithItsOwnFfnSize) {
  std::string log;
  TrainingReport report =
      run(with(tiny_moe_flags(20), {"--num-layers", "4", "--moe-layer-freq", "[0]+[1]*3",
                                    "--ffn-hidden-size", "48", "--moe-ffn-hidden-size", "24",
                                    "--hidden-dropout", "0", "--attention-dropout", "0"}),
          &log);
  ASSERT_EQ(report.iterations.size(), 20u);
  const double first = mean_loss(report.iterations, 0, 5);
  const double last = mean_loss(report.iterations, 15, 20);
  EXPECT_LT(last, first - 1.0) << "first 5 iterations " << first << ", last 5 " << last;
  for (const IterationStats& s : report.iterations) ASSERT_EQ(s.expert_load.size(), 4u);
  if (world_rank() == 0) {
    // hidden 32, swiglu (fc1 is 2 x ffn rows), no biases, 128 padded vocabulary rows, untied:
    // expert = 3 MoE layers x 4 experts x 3 x 24 x 32 = 27648;
    // dense = embedding and output 2 x 128 x 32 + final norm 32 + 4 layers x (2 norms x 32 +
    //         qkv 3 x 32 x 32 + projection 32 x 32) + layer 0's MLP 3 x 48 x 32 + 3 routers
    //         x 4 x 32 = 8224 + 16640 + 4608 + 384 = 29856.
    EXPECT_CONTAINS(log, "): dense 29856, expert 27648\n");
  }
}

TEST(TrainingLoop, MissingDatasetIsNamedOnEveryRank) {
  Args flags = tiny_moe_flags(2);
  flags.erase(std::find(flags.begin(), flags.end(), "--mock-data"));
  flags = with(flags, {"--data-path", "/nonexistent/corpus_text_document"});
  EXPECT_CONTAINS(moe::testing::error_text([&] { run(flags); }),
                  "/nonexistent/corpus_text_document");
}

TEST(TrainingLoop, TokenIdsOutsideTheVocabularyNameTheDataFile) {
  SharedScratchDir scratch("out_of_vocab");
  const fs::path& dir = scratch.path;
  const std::string prefix = (dir / "wide_ids_text_document").string();
  if (world_rank() == 0) {
    data::IndexedDatasetBuilder builder(prefix, data::TokenDType::U16);
    std::vector<int64_t> document(400);
    for (size_t i = 0; i < document.size(); ++i) document[i] = int64_t(i % 500);  // vocab is 128
    for (int d = 0; d < 20; ++d) builder.add_document(document, std::vector<int32_t>{400});
    builder.finalize();
  }
  MPI_Barrier(MPI_COMM_WORLD);
  Args flags = tiny_moe_flags(2);
  flags.erase(std::find(flags.begin(), flags.end(), "--mock-data"));
  flags = with(flags, {"--data-path", prefix, "--split", "1,1,1"});
  EXPECT_CONTAINS(moe::testing::error_text([&] { run(flags); }), prefix,
                  "is outside the model's vocabulary [0, 128)");
}

// DeepSeek/Qwen-style blocks through moe-train: the first layer dense, gated shared experts in the
// MoE layer, experts sharded over every rank; the loss falls and the checkpoint holds the shared
// experts under Megatron's names.
TEST(TrainingLoop, SharedExpertsWithFirstLayerDenseTrain) {
  SharedScratchDir scratch("shared_experts");
  const std::string save_dir = (scratch.path / "ckpt").string();
  TrainingReport report =
      run(with(tiny_moe_flags(20),
               {"--moe-layer-freq", "[0,1]", "--moe-shared-expert-intermediate-size", "32",
                "--moe-shared-expert-gate", "--expert-model-parallel-size",
                std::to_string(world_size()), "--hidden-dropout", "0", "--attention-dropout", "0",
                "--save", save_dir, "--save-interval", "20"}));
  ASSERT_EQ(report.iterations.size(), 20u);
  const double first = mean_loss(report.iterations, 0, 3);
  const double last = mean_loss(report.iterations, 17, 20);
  // The mock documents count upward: 20 iterations take the loss well below its start.
  EXPECT_LT(last, first - 0.5) << "first 3 iterations " << first << ", last 3 " << last;
  const std::string index =
      moe::testing::read_bytes(scratch.path / "ckpt" / "iter_0000020" / "rank_00000.json");
  EXPECT_CONTAINS(index, "\"decoder.layers.1.mlp.shared_experts.linear_fc1.weight\"",
                  "\"decoder.layers.1.mlp.shared_experts.linear_fc2.weight\"",
                  "\"decoder.layers.1.mlp.shared_experts.gate_weight\"",
                  "\"decoder.layers.0.mlp.linear_fc1.weight\"");
}

// Flags of the tiny model without its MoE flags: the dense model to upcycle.
Args tiny_dense_flags(int train_iters) {
  Args flags = tiny_moe_flags(train_iters);
  for (const char* flag : {"--num-experts", "--moe-router-topk", "--moe-aux-loss-coeff",
                           "--moe-z-loss-coeff", "--moe-grouped-gemm"}) {
    auto at = std::find(flags.begin(), flags.end(), flag);
    const bool has_value = std::string(flag) != "--moe-grouped-gemm";
    flags.erase(at, at + (has_value ? 2 : 1));
  }
  return flags;
}

// --moe-use-upcycling from a checkpoint moe-train saved of the dense model: the MoE run continues
// at the dense run's iteration and data position (fresh optimizer and random streams, as Megatron
// enables --no-load-optim and --no-load-rng), and its first forward gives the loss the dense
// model gives on that batch (top-2 probabilities summing to 1 over copies of the dense MLP; fp32
// rounding of the weighted sum only, as in checkpoint_upcycling_tests: 1e-6 of the loss). A
// second run with the flag into the same --save is refused; without it the MoE run resumes.
TEST(TrainingLoop, UpcyclingFromADenseCheckpointKeepsItsLoss) {
  SharedScratchDir scratch("upcycling");
  const std::string dense_dir = (scratch.path / "dense").string();
  const std::string moe_dir = (scratch.path / "moe").string();
  run(with(tiny_dense_flags(3),
           {"--save", dense_dir, "--save-interval", "2", "--exit-interval", "2"}));
  TrainingReport dense = run(with(tiny_dense_flags(3), {"--load", dense_dir}));
  const Args upcycle =
      with(tiny_moe_flags(3),
           {"--moe-use-upcycling", "--load", dense_dir, "--save", moe_dir, "--save-interval", "3",
            "--expert-model-parallel-size", std::to_string(world_size())});
  std::string log;
  TrainingReport upcycled = run(upcycle, &log);
  ASSERT_EQ(dense.start_iteration, 2);
  ASSERT_EQ(upcycled.start_iteration, 2);
  ASSERT_EQ(upcycled.iterations.size(), 1u);
  EXPECT_EQ(upcycled.iterations[0].consumed_samples, dense.iterations[0].consumed_samples);
  EXPECT_NEAR(upcycled.iterations[0].lm_loss, dense.iterations[0].lm_loss,
              1e-6 * dense.iterations[0].lm_loss);
  EXPECT_GT(upcycled.iterations[0].load_balancing_loss, 0.0);
  if (world_rank() == 0) {
    EXPECT_CONTAINS(log, "note: enabling --no-load-optim for upcycling",
                    "> upcycled the dense checkpoint into 4 experts per MoE layer",
                    "warning: decoder.layers.1.mlp: experts 0, 1, 2, 3 are identical (expected "
                    "after upcycling");
  }
  EXPECT_EQ(moe::testing::error_text([&] { run(upcycle); }),
            "--moe-use-upcycling: --save '" + moe_dir +
                "' already holds a checkpoint; upcycling is only for the first run from the "
                "dense checkpoint (resume the MoE run without --moe-use-upcycling)");
  TrainingReport resumed =
      run(with(tiny_moe_flags(3),
               {"--load", moe_dir, "--expert-model-parallel-size", std::to_string(world_size())}));
  EXPECT_EQ(resumed.start_iteration, 3);
}

TEST(TrainingLoop, LoadWithoutCheckpointStartsFreshOrFailsWhenAsked) {
  SharedScratchDir scratch("empty_load");
  const fs::path& dir = scratch.path;
  std::string log;
  TrainingReport report = run(with(tiny_moe_flags(1), {"--load", dir.string()}), &log);
  EXPECT_EQ(report.start_iteration, 0);
  if (world_rank() == 0) {
    EXPECT_CONTAINS(log, "no checkpoint found");
  }
  EXPECT_EQ(
      moe::testing::error_text([&] {
        run(with(tiny_moe_flags(1), {"--load", dir.string(), "--exit-on-missing-checkpoint"}));
      }),
      "--load '" + dir.string() +
          "' holds no checkpoint (no latest_checkpointed_iteration.txt) and "
          "--exit-on-missing-checkpoint is set");
}

}  // namespace
}  // namespace moe::train

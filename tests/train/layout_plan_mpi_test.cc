// moe-plan's predictions (moe/train/layout_plan.h) against what runs on 4 ranks, for three
// layouts: tp 2 + sp with ep 2 (alltoall, bf16, distributed optimizer), pp 2 with ep 2
// (allgather), ep 4 with selective recomputation (alltoall, distributed optimizer). The state
// memory must equal what the ParameterStore and the Optimizer allocate, the dispatchers'
// exchange bytes must equal the prediction exactly, and the peak activation memory the training
// loop logs must be within 10 % of the prediction.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/comm/process_group.h"
#include "moe/data/tokenizer.h"
#include "moe/model/gpt_model.h"
#include "moe/moe/ep_dispatchers.h"
#include "moe/optim/optimizer.h"
#include "moe/pipeline/schedules.h"
#include "moe/tensor/rng.h"
#include "moe/train/arguments.h"
#include "moe/train/layout_plan.h"
#include "moe/train/trainer.h"

namespace moe::train {
namespace {

using Args = std::vector<std::string>;
constexpr int64_t kVocab = 63;

// 2 layers (both MoE: 4 experts, top-2), hidden 32, 16 tokens per sequence, global batch 16.
Args base_flags() {
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
          "16",
          "--train-iters",
          "1",
          "--lr",
          "1e-3",
          "--num-experts",
          "4",
          "--moe-router-topk",
          "2",
          "--moe-aux-loss-coeff",
          "1e-2",
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
          std::to_string(kVocab),
          "--seed",
          "3",
          "--log-interval",
          "1",
          "--eval-interval",
          "1000",
          "--eval-iters",
          "1"};
}

struct Case {
  const char* name;
  Args layout;
};

std::vector<Case> cases() {
  return {
      {"tp 2 + sp, ep 2, alltoall, bf16, distributed optimizer",
       {"--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size",
        "2", "--moe-token-dispatcher-type", "alltoall", "--bf16", "--use-distributed-optimizer"}},
      {"pp 2, ep 2, allgather",
       {"--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
        "--moe-token-dispatcher-type", "allgather"}},
      {"ep 4, alltoall, selective recomputation, distributed optimizer",
       {"--expert-model-parallel-size", "4", "--moe-token-dispatcher-type", "alltoall",
        "--use-distributed-optimizer", "--recompute-granularity", "selective",
        "--recompute-modules", "core_attn", "moe_act", "layernorm"}}};
}

int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

TrainingArguments finalized(const Case& c) {
  Args flags = base_flags();
  flags.insert(flags.end(), c.layout.begin(), c.layout.end());
  TrainingArguments args = parse_arguments(flags).args;
  finalize_arguments(args, world_size());
  return args;
}

int64_t padded_vocab(const TrainingArguments& args) {
  return data::padded_vocab_size(kVocab, args.make_vocab_size_divisible_by,
                                 args.tensor_model_parallel_size);
}

// The rates only scale the step time, which these tests do not check.
const MachineRates kRates{1e9, 1e9, "fixed for the tests"};

comm::ParallelState parallel_state(const TrainingArguments& args) {
  comm::ParallelSizes sizes;
  sizes.tp = args.tensor_model_parallel_size;
  sizes.pp = args.pipeline_model_parallel_size;
  sizes.ep = args.expert_model_parallel_size;
  sizes.etp = *args.expert_tensor_parallel_size;
  return comm::initialize_model_parallel(sizes);
}

TEST(LayoutPlan, StateMemoryEqualsWhatTheStoreAndTheOptimizerAllocate) {
  ASSERT_EQ(world_size(), 4);
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    const TrainingArguments args = finalized(c);
    const LayoutPlan plan = plan_layout(args, padded_vocab(args), kRates);
    const comm::ParallelState parallel = parallel_state(args);
    ParameterStore store(args.bf16 ? DType::BF16 : DType::F32);
    model::GPTModel model(model_config(args, padded_vocab(args)), parallel, store,
                          pipeline::pipeline_stage(*args.num_layers, parallel));
    store.allocate();
    optim::OptimizerConfig config;
    config.use_distributed_optimizer = args.use_distributed_optimizer;
    config.bf16 = args.bf16;
    optim::Optimizer optimizer(store, parallel, config);
    const optim::MemoryReport actual = optimizer.memory();
    const StateMemory& predicted =
        plan.stages.at(size_t(parallel.pp_group.rank())).state[args.use_distributed_optimizer];
    // The distributed optimizer's shards are even_split's: rank 0 of each data-parallel group
    // gets the floor, which the plan predicts; another rank holds at most one element more per
    // group in each of its grad shard, main parameters and two Adam moments (2 groups x 4 x 4
    // bytes).
    const bool shard_of_rank_zero =
        parallel.dp_cp_group.rank() == 0 && parallel.expert_dp_group.rank() == 0;
    const int64_t slack = shard_of_rank_zero ? 0 : 32;
    EXPECT_EQ(actual.param_bytes, predicted.param_bytes);
    EXPECT_NEAR(double(actual.grad_bytes), double(predicted.grad_bytes), double(slack));
    EXPECT_NEAR(double(actual.main_param_bytes), double(predicted.main_param_bytes), double(slack));
    EXPECT_NEAR(double(actual.optimizer_state_bytes), double(predicted.optimizer_state_bytes),
                double(slack));
  }
}

TEST(LayoutPlan, DispatcherExchangeBytesAreExact) {
  ASSERT_EQ(world_size(), 4);
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    const TrainingArguments args = finalized(c);
    const LayoutPlan plan = plan_layout(args, padded_vocab(args), kRates);
    const comm::ParallelState parallel = parallel_state(args);
    ParameterStore store(args.bf16 ? DType::BF16 : DType::F32);
    std::vector<const TokenDispatcher*> dispatchers;  // this stage's MoE layers'
    model::DispatcherFactory factory = [&dispatchers](const MoEConfig& config,
                                                      const comm::ParallelState& p, int) {
      std::unique_ptr<TokenDispatcher> dispatcher = make_token_dispatcher(config, p);
      dispatchers.push_back(dispatcher.get());
      return dispatcher;
    };
    model::GPTModel model(model_config(args, padded_vocab(args)), parallel, store,
                          pipeline::pipeline_stage(*args.num_layers, parallel), factory);
    store.allocate();
    model.init_parameters(5);
    const int64_t b = *args.micro_batch_size, s = *args.seq_length;
    pipeline::MicroBatchProvider provider = [&](int micro_batch) {
      Rng rng(uint64_t(100 + micro_batch * 7 + parallel.dp_group.rank()));
      pipeline::MicroBatch batch;
      batch.tokens = Tensor({b, s}, DType::I64);
      batch.labels = Tensor({b, s}, DType::I64);
      for (int64_t i = 0; i < b * s; ++i) {
        batch.tokens.data<int64_t>()[i] = int64_t(rng.below(kVocab));
        batch.labels.data<int64_t>()[i] = int64_t(rng.below(kVocab));
      }
      batch.dropout_seed = uint64_t(micro_batch);
      return batch;
    };
    pipeline::ScheduleOptions options;
    options.num_micro_batches = args.num_micro_batches;
    options.micro_batch_size = b;
    pipeline::forward_backward(model, parallel, provider, options);
    ASSERT_FALSE(dispatchers.empty());
    const int64_t predicted = args.moe_token_dispatcher_type == "alltoall"
                                  ? plan.alltoall_exchange_bytes
                                  : plan.allgather_exchange_bytes;
    for (const TokenDispatcher* dispatcher : dispatchers) {
      // The token-to-expert exchanges are exact per rank; the way back depends on where the
      // router sent the tokens, so the prediction is the group's mean.
      Tensor bytes({1}, DType::F64);
      bytes.data<double>()[0] = double(dispatcher->exchange_bytes());
      comm::all_reduce(bytes, parallel.tp_ep_group);
      EXPECT_EQ(bytes.data<double>()[0] / parallel.tp_ep_group.size(), double(predicted));
    }
  }
}

TEST(LayoutPlan, PeakActivationMemoryWithinTenPercentOfTheLoggedPeak) {
  ASSERT_EQ(world_size(), 4);
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    const TrainingArguments args = finalized(c);
    const LayoutPlan plan = plan_layout(args, padded_vocab(args), kRates);
    std::ostringstream log;
    const TrainingReport report = pretrain(args, log);
    ASSERT_EQ(report.iterations.size(), 1u);
    const std::vector<double>& measured = report.iterations[0].stage_peak_activation_bytes;
    ASSERT_EQ(measured.size(), plan.stages.size());
    const Recompute recompute = !args.recompute_granularity             ? Recompute::kNone
                                : *args.recompute_granularity == "full" ? Recompute::kFull
                                                                        : Recompute::kSelective;
    for (size_t stage = 0; stage < measured.size(); ++stage) {
      const double predicted = double(plan.stages[stage].peak_activation_bytes(recompute));
      EXPECT_NEAR(predicted, measured[stage], 0.1 * measured[stage]) << "stage " << stage;
    }
  }
}

}  // namespace
}  // namespace moe::train

// 1F1B under mpirun: every (tp, sp, pp, ep, dp) layout gives the same per-micro-batch losses, MoE
// losses and (reduced) parameter gradients as the whole model on one process running every
// micro-batch with no pipelining; each rank runs that reference itself and compares the blocks
// of the parameters its stage holds. Data-parallel replica d runs global micro-batches
// [d * M, (d + 1) * M) with loss_scale 1 / dp; the reference runs all dp * M of them.
//
// Tolerance: with tp = dp = ep = 1 the layout only moves layers between ranks, every sum keeps
// its order, and losses and gradients must be bitwise equal; with tp > 1 (dp = ep = 1) it must
// equal the same tp layout without pipelining bitwise. Against the single process with tp, dp or ep
// (fp32, other reduction orders): losses |diff| <= 1e-5 * |loss| and gradients |diff| <=
// 1e-4 * (max |reference| of that tensor + |reference|) (observed: worst |diff| <= 1.4e-6 *
// max |reference| over all layouts).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "../model/model_testing.h"
#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "moe/pipeline/schedules.h"
#include "pipeline_testing.h"
#include "support/testing.h"

namespace moe::pipeline {
namespace {

using testing::kMicroBatchSize;
using testing::replica_provider;
using testing::tiny_moe_config;

struct Layout {
  int tp = 1;
  bool sp = false;
  int pp = 1;
  int ep = 1;
  DType params = DType::F32;  // parameter (and activation) dtype
  // DeepSeek-style layers: multi-latent attention with q/k norms, the first layer dense, shared
  // experts, sigmoid routing with the expert bias and group-limited top-k.
  bool deepseek = false;
  // Output layer tied to the word embedding, and multi-token prediction depths: with pp > 1 the
  // last stage holds a copy of the embedding whose gradient finalize_grads sums with the first
  // stage's over the embedding group.
  bool tied = false;
  int mtp = 0;
  // Megatron's virtual pipeline stages and uneven first / last stages (pipeline_chunks); with
  // another num_layers than 4 every third layer and the last are MoE layers.
  PipelineLayout chunks = {};
  int num_layers = 4;

  bool shares_embedding() const { return pp > 1 && (tied || mtp > 0); }
};

model::TransformerConfig layout_config(const Layout& layout) {
  model::TransformerConfig c = tiny_moe_config();
  c.sequence_parallel = layout.sp;
  c.untie_embeddings_and_output_weights = !layout.tied;
  c.mtp_num_layers = layout.mtp;
  c.mtp_loss_scaling_factor = 0.3;  // larger than Megatron's 0.1 so the MTP terms weigh in
  if (layout.num_layers != c.num_layers) {
    c.num_layers = layout.num_layers;
    c.moe_layer_pattern.assign(size_t(c.num_layers), 0);
    for (int i = 0; i < c.num_layers; ++i) {
      c.moe_layer_pattern[size_t(i)] = i % 3 == 0 || i == c.num_layers - 1;
    }
  }
  if (!layout.deepseek) return c;
  c.multi_latent_attention = true;
  c.q_lora_rank = 6;
  c.kv_lora_rank = 5;
  c.qk_head_dim = 4;
  c.qk_pos_emb_head_dim = 2;
  c.v_head_dim = 3;
  c.qk_layernorm = true;
  c.moe_layer_pattern = {0, 1, 1, 1};
  c.moe_shared_expert_intermediate_size = 8;
  c.moe.moe_router_score_function = ScoreFunction::kSigmoid;
  c.moe.moe_router_enable_expert_bias = true;
  c.moe.moe_router_bias_update_rate = 0.01;
  c.moe.moe_router_num_groups = 2;
  c.moe.moe_router_group_topk = 1;
  return c;
}

std::string describe(const Layout& l, int micro_batches) {
  return "(tp " + std::to_string(l.tp) + (l.sp ? " sp" : "") + ", pp " + std::to_string(l.pp) +
         ", ep " + std::to_string(l.ep) + ", " + std::string(dtype_name(l.params)) +
         (l.deepseek ? ", DeepSeek-style" : "") + (l.tied ? ", tied" : "") +
         (l.mtp > 0 ? ", mtp " + std::to_string(l.mtp) : "") +
         (l.chunks.virtual_stages > 1 ? ", " + std::to_string(l.chunks.virtual_stages) + " chunks"
                                      : "") +
         (l.chunks.first_stage_layers > 0
              ? ", first stage " + std::to_string(l.chunks.first_stage_layers) + " layers"
              : "") +
         (l.chunks.last_stage_layers > 0
              ? ", last stage " + std::to_string(l.chunks.last_stage_layers) + " layers"
              : "") +
         ", " + std::to_string(l.num_layers) + " layers, " + std::to_string(micro_batches) +
         " micro-batches)";
}

struct Reference {
  explicit Reference(DType params) : store(params) {}
  ParameterStore store;
  StepResult result;
};

// The whole model on this process over `micro_batches` global micro-batches.
void run_reference(const model::TransformerConfig& config, int micro_batches, bool training,
                   Reference& reference) {  // reference.store already in the layout's dtype
  model::GPTModel model(config, comm::single_process_state(), reference.store);
  reference.store.allocate();
  model.init_parameters(7);
  ScheduleOptions options;
  options.num_micro_batches = micro_batches;
  options.micro_batch_size = kMicroBatchSize;
  options.forward_only = !training;
  reference.result = forward_backward(model, comm::single_process_state(),
                                      replica_provider(config, 0, micro_batches), options);
}

void check_close(double actual, double expected, bool bitwise, const std::string& what) {
  if (bitwise) {
    EXPECT_EQ(actual, expected) << what;
  } else {
    EXPECT_NEAR(actual, expected, 1e-12 + 1e-5 * std::abs(expected)) << what;
  }
}

double max_abs(const Tensor& t) {
  double largest = 0;
  for (float value : t.to_floats()) largest = std::max(largest, double(std::abs(value)));
  return largest;
}

// With tensor parallelism the pipelined run must equal, bitwise, the same tp layout with one
// stage: each rank's tp shards and every sum are the same, only layers moved between ranks.
void check_against_same_tp_without_pipeline(const Layout& layout, const StepResult& result,
                                            const ParameterStore& store) {
  comm::ParallelState state = comm::initialize_model_parallel({layout.tp, 1, layout.ep});
  const model::TransformerConfig config = layout_config(layout);
  ParameterStore reference_store;
  model::GPTModel model(config, state, reference_store);
  reference_store.allocate();
  model.init_parameters(7);
  ScheduleOptions options;
  options.num_micro_batches = int(result.lm_losses.size());
  options.micro_batch_size = kMicroBatchSize;
  StepResult reference = forward_backward(
      model, state, replica_provider(config, 0, options.num_micro_batches), options);
  EXPECT_EQ(result.lm_losses, reference.lm_losses) << "tp " << layout.tp << " with and without pp";
  for (int i = 0; i < store.count(); ++i) {
    const ParamSpec& spec = store.spec(ParamHandle{i});
    const ParamHandle same = reference_store.find(spec.name);
    if (!spec.trainable) {  // a buffer (the expert bias): its value after the step
      EXPECT_TENSORS_CLOSE(store.param(ParamHandle{i}), reference_store.param(same), 0, 0)
          << "tp " << layout.tp << " with and without pp: " << spec.name;
      continue;
    }
    EXPECT_TENSORS_CLOSE(store.grad(ParamHandle{i}), reference_store.grad(same), 0, 0)
        << "tp " << layout.tp << " with and without pp: gradient of " << spec.name;
  }
}

void check_layout(const Layout& layout, int micro_batches, bool training = true) {
  const std::string name = describe(layout, micro_batches);
  comm::ParallelState state = comm::initialize_model_parallel({layout.tp, layout.pp, layout.ep});
  model::TransformerConfig config = layout_config(layout);
  config.sequence_parallel = false;
  const int dp = state.dp, replica = state.dp_group.rank();
  Reference reference(layout.params);
  run_reference(config, dp * micro_batches, training, reference);

  config.sequence_parallel = layout.sp;
  ParameterStore store(layout.params);
  std::vector<std::unique_ptr<model::GPTModel>> chunks;
  std::vector<model::GPTModel*> chunk_pointers;
  for (const model::GPTStage& stage : pipeline_chunks(config.num_layers, layout.chunks, state)) {
    chunks.push_back(std::make_unique<model::GPTModel>(config, state, store, stage));
    chunk_pointers.push_back(chunks.back().get());
  }
  store.allocate();
  for (const auto& chunk : chunks) chunk->init_parameters(7);
  ScheduleOptions options;
  options.num_micro_batches = micro_batches;
  options.micro_batch_size = kMicroBatchSize;
  options.loss_scale = 1.0 / dp;
  options.forward_only = !training;
  StepResult result = forward_backward(chunk_pointers, state,
                                       replica_provider(config, replica, micro_batches), options);

  const int pp_rank = state.pp_group.rank(), virtual_stages = int(chunks.size());
  // 1F1B: min(pp - r, M); interleaved: Megatron's warm-up forwards plus the one in flight.
  const int expected_peak =
      !training ? 1
      : virtual_stages == 1
          ? std::min(layout.pp - pp_rank, micro_batches)
          : std::min(2 * (layout.pp - pp_rank - 1) + (virtual_stages - 1) * layout.pp + 1,
                     micro_batches * virtual_stages);
  EXPECT_EQ(result.peak_contexts_in_flight, expected_peak)
      << name << " on pipeline rank " << pp_rank;
  // A shared embedding's gradient is summed in another order (each stage's micro-batches, then
  // the two stages), so those layouts compare within the tolerance.
  const bool bitwise = layout.tp == 1 && layout.ep == 1 && dp == 1 && !layout.shares_embedding();
  for (int m = 0; m < micro_batches; ++m) {
    const size_t global = size_t(replica * micro_batches + m);
    check_close(result.lm_losses[size_t(m)], reference.result.lm_losses[global], bitwise,
                name + " lm loss of micro-batch " + std::to_string(m));
    EXPECT_EQ(result.loss_tokens[size_t(m)], reference.result.loss_tokens[global]) << name;
  }
  ASSERT_EQ(result.mtp_loss_sums.size(), size_t(layout.mtp)) << name;
  if (dp == 1) {  // every pp rank holds the last stage's MTP losses
    for (int k = 0; k < layout.mtp; ++k) {
      check_close(result.mtp_loss_sums[size_t(k)], reference.result.mtp_loss_sums[size_t(k)],
                  bitwise, name + " mtp loss of depth " + std::to_string(k + 1));
    }
  }
  // The MoE summary covers the whole pipeline; add the data-parallel replicas.
  Tensor moe({3}, DType::F64);
  double* sums = moe.data<double>();
  sums[0] = result.moe.sum.load_balancing_loss;
  sums[1] = result.moe.sum.z_loss;
  sums[2] = double(result.moe.reports);
  comm::all_reduce(moe, state.dp_group);
  const MoELossSummary& expected_moe = reference.result.moe;
  EXPECT_EQ(int64_t(sums[2]), expected_moe.reports) << name;
  check_close(sums[0], expected_moe.sum.load_balancing_loss, false, name + " aux loss");
  check_close(sums[1], expected_moe.sum.z_loss, false, name + " z loss");

  // Before the data-parallel reductions below, which sum the gradient buffers in place.
  if (layout.tp > 1 && layout.ep == 1 && dp == 1 && training && !layout.shares_embedding()) {
    check_against_same_tp_without_pipeline(layout, result, store);
  }
  model::testing::compare_reduced_gradients(
      store, state, reference.store,
      [&](const ParamSpec& spec, const Tensor& got, const Tensor& expected) {
        EXPECT_TENSORS_CLOSE(got, expected, bitwise ? 0.0 : 1e-4 * max_abs(expected),
                             bitwise ? 0.0 : 1e-4)
            << name << " gradient of " << spec.name << " on world rank " << state.world_rank;
      });
}

// Each layout runs on the world size it was written for (the ctest entries np2, np4, np8).
bool on_world(int world) {
  return comm::ProcessGroup::world().size() == world;
}

TEST(OneFOneB, Pp2) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  check_layout({.pp = 2}, 5);
  check_layout({.pp = 2}, 1);  // every micro-batch in warm-up on stage 0
}

TEST(OneFOneB, Pp2Bf16) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  check_layout({.pp = 2, .params = DType::BF16}, 3);
}

TEST(OneFOneB, Pp2ForwardOnly) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  check_layout({.pp = 2}, 3, false);
}

TEST(OneFOneB, Pp4) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.pp = 4}, 6);
  check_layout({.pp = 4}, 2);  // fewer micro-batches than stages
}

TEST(OneFOneB, Pp4ForwardOnly) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.pp = 4}, 3, false);
}

TEST(OneFOneB, Pp2Tp2SequenceParallel) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.tp = 2, .sp = true, .pp = 2}, 3);
}

TEST(OneFOneB, Pp2Dp2) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.pp = 2}, 3);
}

TEST(OneFOneB, Pp2Ep2) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.pp = 2, .ep = 2}, 3);
}

TEST(OneFOneB, Pp4Tp2SequenceParallel) {
  if (!on_world(8)) GTEST_SKIP() << "runs on 8 ranks";
  check_layout({.tp = 2, .sp = true, .pp = 4}, 5);
}

TEST(OneFOneB, Pp2Tp2Ep2SequenceParallel) {
  if (!on_world(8)) GTEST_SKIP() << "runs on 8 ranks";
  check_layout({.tp = 2, .sp = true, .pp = 2, .ep = 2}, 3);
}

TEST(OneFOneB, Pp2DeepSeekStyle) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  check_layout({.pp = 2, .deepseek = true}, 3);
}

TEST(OneFOneB, Pp2Tp2SequenceParallelDeepSeekStyle) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.tp = 2, .sp = true, .pp = 2, .deepseek = true}, 3);
}

TEST(OneFOneB, Pp2Ep2DeepSeekStyle) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.pp = 2, .ep = 2, .deepseek = true}, 3);
}

TEST(OneFOneB, Pp2Tp2Ep2SequenceParallelDeepSeekStyle) {
  if (!on_world(8)) GTEST_SKIP() << "runs on 8 ranks";
  check_layout({.tp = 2, .sp = true, .pp = 2, .ep = 2, .deepseek = true}, 3);
}

TEST(OneFOneB, Pp2TiedEmbeddings) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  check_layout({.pp = 2, .tied = true}, 5);
  check_layout({.pp = 2, .tied = true}, 1);
}

TEST(OneFOneB, Pp2MultiTokenPrediction) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  check_layout({.pp = 2, .mtp = 2}, 3);
  check_layout({.pp = 2, .tied = true, .mtp = 1}, 3);
}

TEST(OneFOneB, Pp4TiedMultiTokenPrediction) {  // middle stages are outside the embedding group
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.pp = 4, .tied = true, .mtp = 1}, 3);
}

TEST(OneFOneB, Pp2Tp2SequenceParallelTiedMultiTokenPrediction) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.tp = 2, .sp = true, .pp = 2, .tied = true, .mtp = 1}, 3);
}

TEST(OneFOneB, Pp2Dp2TiedMultiTokenPrediction) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.pp = 2, .tied = true, .mtp = 1}, 2);
}

TEST(OneFOneB, Pp2Ep2MultiTokenPrediction) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.pp = 2, .ep = 2, .mtp = 1}, 3);
}

TEST(OneFOneB, Pp2Tp2Ep2SequenceParallelTiedMultiTokenPrediction) {
  if (!on_world(8)) GTEST_SKIP() << "runs on 8 ranks";
  check_layout({.tp = 2, .sp = true, .pp = 2, .ep = 2, .tied = true, .mtp = 1}, 3);
}

TEST(Interleaved, Pp2TwoChunks) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  check_layout({.pp = 2, .chunks = {.virtual_stages = 2}}, 4);
  check_layout({.pp = 2, .chunks = {.virtual_stages = 2}}, 2);
  check_layout({.pp = 2, .chunks = {.virtual_stages = 2}}, 4, /*training=*/false);
  check_layout({.pp = 2, .params = DType::BF16, .chunks = {.virtual_stages = 2}}, 6);
}

TEST(Interleaved, Pp2ThreeChunks) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  check_layout({.pp = 2, .chunks = {.virtual_stages = 3}, .num_layers = 6}, 4);
}

TEST(Interleaved, Pp2TwoChunksDp2) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.pp = 2, .chunks = {.virtual_stages = 2}}, 2);
}

TEST(Interleaved, Pp2TwoChunksTiedMultiTokenPrediction) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  check_layout({.pp = 2, .tied = true, .mtp = 1, .chunks = {.virtual_stages = 2}}, 4);
}

TEST(Interleaved, UnevenFirstAndLastStages) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  check_layout({.pp = 2, .chunks = {.first_stage_layers = 1}}, 3);
  check_layout({.pp = 2, .chunks = {.last_stage_layers = 1}}, 3);
  check_layout({.pp = 2,
                .chunks = {.virtual_stages = 2, .first_stage_layers = 2, .last_stage_layers = 4},
                .num_layers = 6},
               4);
}

TEST(Interleaved, Pp4TwoChunksUneven) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.pp = 4, .chunks = {.virtual_stages = 2}, .num_layers = 8}, 4);
  check_layout(
      {.pp = 4, .chunks = {.first_stage_layers = 1, .last_stage_layers = 1}, .num_layers = 6}, 8);
}

TEST(Interleaved, Pp2TwoChunksTp2SequenceParallel) {
  if (!on_world(4)) GTEST_SKIP() << "runs on 4 ranks";
  check_layout({.tp = 2, .sp = true, .pp = 2, .chunks = {.virtual_stages = 2}}, 4);
}

TEST(Interleaved, Pp2TwoChunksTp2Ep2SequenceParallel) {
  if (!on_world(8)) GTEST_SKIP() << "runs on 8 ranks";
  check_layout({.tp = 2, .sp = true, .pp = 2, .ep = 2, .chunks = {.virtual_stages = 2}}, 4);
}

// Megatron's checks of the micro-batch count (microbatch_group_size_per_vp_stage = pp), on every
// rank before any transfer.
TEST(Interleaved, RefusesMicroBatchCountsMegatronRefuses) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  comm::ParallelState state = comm::initialize_model_parallel({1, 2, 1});
  const model::TransformerConfig config = tiny_moe_config();
  ParameterStore store;
  std::vector<std::unique_ptr<model::GPTModel>> chunks;
  std::vector<model::GPTModel*> pointers;
  for (const model::GPTStage& stage : pipeline_chunks(4, {.virtual_stages = 2}, state)) {
    chunks.push_back(std::make_unique<model::GPTModel>(config, state, store, stage));
    pointers.push_back(chunks.back().get());
  }
  store.allocate();
  auto error = [&](int micro_batches) {
    ScheduleOptions options;
    options.num_micro_batches = micro_batches;
    options.micro_batch_size = kMicroBatchSize;
    return moe::testing::error_text([&] {
      forward_backward(pointers, state, replica_provider(config, 0, micro_batches), options);
    });
  };
  EXPECT_EQ(error(1),
            "The number of contiguous micro-batches in a virtual pipeline stage should range in "
            "[PP=2 , M=1]");
  EXPECT_EQ(error(3),
            "The remainder of M (the total micro-batches) divided by N (number of contiguous "
            "micro-batches in a virtual pipeline stage) should be 0, or larger than or equal to "
            "the pipeline-parallel size, but it is 1. Otherwise, it introduces dependency bubbles "
            "in the pipeline and reduces throughput.");
}

TEST(OneFOneB, RefusesAModelBuiltForAnotherStage) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  comm::ParallelState state = comm::initialize_model_parallel({1, 2, 1});
  model::TransformerConfig config = tiny_moe_config();
  ParameterStore store;
  model::GPTModel whole(config, state, store);
  store.allocate();
  ScheduleOptions options;
  options.micro_batch_size = kMicroBatchSize;
  const std::string expected =
      state.pp_group.rank() == 0
          ? "the model's stage (pre_process true, post_process true) does not "
            "match pipeline rank 0 of 2 (use pipeline::pipeline_stage to "
            "build it)"
          : "the model's stage (pre_process true, post_process true) does not "
            "match pipeline rank 1 of 2 (use pipeline::pipeline_stage to "
            "build it)";
  EXPECT_EQ(moe::testing::error_text(
                [&] { forward_backward(whole, state, replica_provider(config, 0, 1), options); }),
            expected);
}

// The last stage fails on micro-batch 0 (no labels): it raises that error, and the first stage,
// waiting for that stage to take micro-batch 1, raises the comm layer's timeout instead of
// hanging. Exchanges that must succeed run under a generous timeout (a loaded machine may be
// slow); the first stage lowers it to 1 s only once it asks for micro-batch 1, after which its
// every exchange is meant to fail.
TEST(OneFOneB, AFailingStageBecomesAnErrorOnItsPeer) {
  if (!on_world(2)) GTEST_SKIP() << "runs on 2 ranks";
  comm::ParallelState state = comm::initialize_model_parallel({1, 2, 1});
  model::TransformerConfig config = tiny_moe_config();
  ParameterStore store;
  model::GPTModel model(config, state, store, pipeline_stage(config.num_layers, state));
  store.allocate();
  ScheduleOptions options;
  options.num_micro_batches = 2;
  options.micro_batch_size = kMicroBatchSize;
  MicroBatchProvider all = replica_provider(config, 0, 2);
  const double timeout = comm::collective_timeout();
  comm::set_collective_timeout(60);
  const std::string text = moe::testing::error_text([&] {
    forward_backward(
        model, state,
        [&](int i) {
          MicroBatch batch = all(i);
          if (i == 0) batch.labels = Tensor();
          if (i == 1 && state.is_pipeline_first()) comm::set_collective_timeout(1);
          return batch;
        },
        options);
  });
  comm::set_collective_timeout(timeout);
  if (state.is_pipeline_last()) {
    EXPECT_EQ(text, "micro-batch 0 needs labels on the last pipeline stage");
  } else {
    EXPECT_EQ(text,
              "send_recv on group 'pp' (rank 0 of 2, world rank 0): timed out after 1 s in the "
              "data exchange: no data from rank 1 (world rank 1) (expects 16 header values) (this "
              "rank's call: send of [16, 16] fp32 to rank 1, recv of [16, 16] fp32 from rank 1 "
              "with tag 20560)");
  }
  comm::barrier(comm::ProcessGroup::world());
}

}  // namespace
}  // namespace moe::pipeline

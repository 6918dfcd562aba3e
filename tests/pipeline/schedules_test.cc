// The schedule on one process: Megatron's layer split and its errors, no-pipelining equals the
// model's own forward/backward loop bitwise, forward-only evaluation, and bad-input errors.
#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "moe/pipeline/schedules.h"
#include "pipeline_testing.h"
#include "support/testing.h"

namespace moe::pipeline {
namespace {

using testing::global_micro_batch;
using testing::kMicroBatchSize;
using testing::tiny_moe_config;

TEST(PipelineStage, SplitsLayersEvenlyAsMegatron) {
  for (int rank = 0; rank < 4; ++rank) {
    model::GPTStage stage = pipeline_stage(8, 4, rank);
    EXPECT_EQ(stage.first_layer, 2 * rank);
    EXPECT_EQ(stage.num_layers, 2);
    EXPECT_EQ(stage.pre_process, rank == 0);
    EXPECT_EQ(stage.post_process, rank == 3);
  }
  model::GPTStage whole = pipeline_stage(5, 1, 0);
  EXPECT_TRUE(whole.pre_process && whole.post_process);
  EXPECT_EQ(whole.first_layer, 0);
  EXPECT_EQ(whole.num_layers, 5);
}

// [first_layer, first_layer + num_layers) of each chunk of `rank`, and its pre/post flags.
std::string chunk_text(int num_layers, const PipelineLayout& layout, int pp, int rank) {
  std::ostringstream text;
  for (const model::GPTStage& chunk : pipeline_chunks(num_layers, layout, pp, rank)) {
    text << "[" << chunk.first_layer << "," << chunk.first_layer + chunk.num_layers << ")"
         << (chunk.pre_process ? "pre" : "") << (chunk.post_process ? "post" : "") << " ";
  }
  return text.str();
}

// Megatron's get_transformer_layer_offset: virtual stage c * pp + r holds the next layers.
TEST(PipelineChunks, SplitLayersAsMegatron) {
  const PipelineLayout two_chunks{.virtual_stages = 2};
  EXPECT_EQ(chunk_text(8, two_chunks, 2, 0), "[0,2)pre [4,6) ");
  EXPECT_EQ(chunk_text(8, two_chunks, 2, 1), "[2,4) [6,8)post ");
  EXPECT_EQ(chunk_text(8, {}, 4, 3), "[6,8)post ");  // pipeline_stage's split
  // Uneven: 1 and 3 layers on the first and last of 4 stages, the middle two share 6.
  const PipelineLayout uneven{.first_stage_layers = 1, .last_stage_layers = 3};
  EXPECT_EQ(chunk_text(10, uneven, 4, 0), "[0,1)pre ");
  EXPECT_EQ(chunk_text(10, uneven, 4, 1), "[1,4) ");
  EXPECT_EQ(chunk_text(10, uneven, 4, 2), "[4,7) ");
  EXPECT_EQ(chunk_text(10, uneven, 4, 3), "[7,10)post ");
  EXPECT_EQ(chunk_text(5, {.first_stage_layers = 1}, 2, 1), "[1,5)post ");
  EXPECT_EQ(chunk_text(5, {.last_stage_layers = 1}, 2, 0), "[0,4)pre ");
  // Uneven and interleaved: 2 + 4 layers per round of chunks.
  const PipelineLayout both{.virtual_stages = 2, .first_stage_layers = 4, .last_stage_layers = 8};
  EXPECT_EQ(chunk_text(12, both, 2, 0), "[0,2)pre [6,8) ");
  EXPECT_EQ(chunk_text(12, both, 2, 1), "[2,6) [8,12)post ");
  const PipelineLayout middle{.virtual_stages = 2, .first_stage_layers = 2};
  EXPECT_EQ(chunk_text(10, middle, 3, 1), "[1,3) [6,8) ");
  EXPECT_EQ(chunk_text(10, middle, 3, 2), "[3,5) [8,10)post ");
}

TEST(PipelineChunks, RefuseWithMegatronsReasons) {
  auto error = [](int num_layers, const PipelineLayout& layout, int pp) {
    return moe::testing::error_text([&] { pipeline_chunks(num_layers, layout, pp, 0); });
  };
  EXPECT_EQ(error(6, {.virtual_stages = 2}, 2),
            "number of layers per pipeline stage (3) must be divisible by the number of virtual "
            "stages per pipeline rank (2)");
  EXPECT_EQ(error(6, {.virtual_stages = 2}, 4),
            "number of layers of the model (6) must be divisible by pipeline model parallel size "
            "(4)");
  EXPECT_EQ(error(8, {.virtual_stages = 2, .first_stage_layers = 3}, 2),
            "number of layers at first stage: 3 must be divisible by virtual pipeline parallel "
            "degree 2");
  EXPECT_EQ(error(8, {.virtual_stages = 2, .last_stage_layers = 1}, 2),
            "number of layers at last stage: 1 must be divisible by virtual pipeline parallel "
            "degree 2");
  EXPECT_EQ(error(4, {.first_stage_layers = 2, .last_stage_layers = 2}, 3),
            "Mismatch: 0 middle layers remaining but 1 middle PP stages available.");
  EXPECT_EQ(error(8, {.first_stage_layers = 1}, 3),
            "number of layers at middle stage: 7 must be divisible by the middle pipeline model "
            "parallel size 2");
  EXPECT_EQ(error(9, {.virtual_stages = 2, .first_stage_layers = 2}, 2),
            "number of layers on each middle pipeline rank: 7 must be divisible by virtual "
            "pipeline parallel degree 2");
  EXPECT_EQ(error(4, {.first_stage_layers = 3, .last_stage_layers = 3}, 2),
            "--decoder-first-pipeline-num-layers (3) + --decoder-last-pipeline-num-layers (3) "
            "exceed --num-layers (4)");
  EXPECT_EQ(error(4, {.virtual_stages = 2}, 1),
            "virtual pipeline stages (2 per rank) and uneven first or last stages need "
            "--pipeline-model-parallel-size > 1, got 1");
  EXPECT_EQ(error(4, {.virtual_stages = 0}, 2),
            "virtual pipeline stages per rank (0) must be at least 1");
  EXPECT_EQ(error(4, {.first_stage_layers = -1}, 2),
            "--decoder-first-pipeline-num-layers (-1) and --decoder-last-pipeline-num-layers (0) "
            "must not be negative (0: unset)");
}

TEST(PipelineStage, RefusesLayersNotDivisibleByStages) {
  EXPECT_EQ(moe::testing::error_text([] { pipeline_stage(6, 4, 1); }),
            "num_layers (6) must be divisible by pipeline_model_parallel_size (4): every "
            "pipeline stage holds the same number of layers");
  EXPECT_EQ(moe::testing::error_text([] { pipeline_stage(8, 4, 4); }),
            "pipeline rank 4 is outside [0, 4)");
}

struct WholeModel {
  model::TransformerConfig config = tiny_moe_config();
  ParameterStore store;
  model::GPTModel model{config, comm::single_process_state(), store};

  WholeModel() {
    store.allocate();
    model.init_parameters(7);
  }
};

MicroBatchProvider provider_of(const model::TransformerConfig& config) {
  return [config](int i) { return global_micro_batch(config, i); };
}

TEST(NoPipelining, MatchesTheModelsForwardBackwardLoopBitwise) {
  constexpr int kMicroBatches = 3;
  constexpr double kLossScale = 2.0;
  WholeModel scheduled, looped;
  ScheduleOptions options;
  options.num_micro_batches = kMicroBatches;
  options.micro_batch_size = kMicroBatchSize;
  options.loss_scale = kLossScale;
  StepResult result = forward_backward(scheduled.model, comm::single_process_state(),
                                       provider_of(scheduled.config), options);

  MoELossSummary expected_moe;
  for (int m = 0; m < kMicroBatches; ++m) {
    MicroBatch batch = global_micro_batch(looped.config, m);
    model::GPTContext ctx;
    ctx.dropout_seed = batch.dropout_seed;
    double loss = looped.model.forward(batch.tokens, batch.labels, ctx, batch.loss_mask);
    EXPECT_EQ(result.lm_losses[size_t(m)], loss) << "micro-batch " << m;
    EXPECT_EQ(result.loss_tokens[size_t(m)], ctx.loss_tokens) << "micro-batch " << m;
    ASSERT_EQ(result.stage_moe_losses[size_t(m)].size(), 2u);  // 2 MoE layers
    for (const model::MoELossReport& report : ctx.moe_losses) {
      expected_moe.sum.load_balancing_loss += report.losses.load_balancing_loss;
      expected_moe.sum.z_loss += report.losses.z_loss;
      ++expected_moe.reports;
    }
    looped.model.backward(ctx, float(kLossScale / kMicroBatches));
  }
  EXPECT_EQ(result.moe.sum.load_balancing_loss, expected_moe.sum.load_balancing_loss);
  EXPECT_EQ(result.moe.sum.z_loss, expected_moe.sum.z_loss);
  EXPECT_EQ(result.moe.reports, 6);
  EXPECT_GT(result.moe.load_balancing_loss(), 0.0);
  EXPECT_EQ(result.peak_contexts_in_flight, 1);
  for (ParamGroup group : {ParamGroup::kDense, ParamGroup::kExpert}) {
    EXPECT_TENSORS_CLOSE(scheduled.store.flat_grads(group), looped.store.flat_grads(group), 0, 0);
  }
}

TEST(NoPipelining, ForwardOnlyEvaluatesWithoutDropoutOrGradients) {
  constexpr int kMicroBatches = 2;
  WholeModel scheduled, looped;
  ScheduleOptions options;
  options.num_micro_batches = kMicroBatches;
  options.micro_batch_size = kMicroBatchSize;
  StepResult result = forward_only(scheduled.model, comm::single_process_state(),
                                   provider_of(scheduled.config), options);
  EXPECT_EQ(result.peak_contexts_in_flight, 1);
  for (int m = 0; m < kMicroBatches; ++m) {
    MicroBatch batch = global_micro_batch(looped.config, m);
    model::GPTContext ctx;
    ctx.training = false;
    ctx.dropout_seed = batch.dropout_seed;
    EXPECT_EQ(result.lm_losses[size_t(m)],
              looped.model.forward(batch.tokens, batch.labels, ctx, batch.loss_mask));
  }
  for (ParamGroup group : {ParamGroup::kDense, ParamGroup::kExpert}) {
    Tensor grads = scheduled.store.flat_grads(group);
    EXPECT_TENSORS_CLOSE(grads, Tensor::zeros(grads.shape()), 0, 0);
  }
}

TEST(NoPipelining, CallsTheProviderOncePerMicroBatchInOrder) {
  WholeModel whole;
  std::vector<int> calls;
  ScheduleOptions options;
  options.num_micro_batches = 4;
  options.micro_batch_size = kMicroBatchSize;
  forward_backward(
      whole.model, comm::single_process_state(),
      [&](int i) {
        calls.push_back(i);
        return global_micro_batch(whole.config, i);
      },
      options);
  EXPECT_EQ(calls, (std::vector<int>{0, 1, 2, 3}));
}

std::string schedule_error(model::GPTModel& model, const MicroBatchProvider& provider,
                           const ScheduleOptions& options) {
  return moe::testing::error_text(
      [&] { forward_backward(model, comm::single_process_state(), provider, options); });
}

TEST(ScheduleErrors, NameTheBadValue) {
  WholeModel whole;
  MicroBatchProvider provider = provider_of(whole.config);
  ScheduleOptions options;
  options.micro_batch_size = kMicroBatchSize;
  options.num_micro_batches = 0;
  EXPECT_EQ(schedule_error(whole.model, provider, options),
            "num_micro_batches (0) must be at least 1");
  options.num_micro_batches = 1;
  options.micro_batch_size = 0;
  EXPECT_EQ(schedule_error(whole.model, provider, options),
            "micro_batch_size (0) must be at least 1");
  options.micro_batch_size = 3;
  EXPECT_EQ(schedule_error(whole.model, provider, options),
            "micro-batch 0 needs tokens [micro_batch_size = 3, seq] on the first pipeline stage, "
            "got [2, 8]");
  options.micro_batch_size = kMicroBatchSize;
  EXPECT_EQ(schedule_error(whole.model, nullptr, options),
            "the pipeline schedule needs a micro-batch provider");
  EXPECT_EQ(schedule_error(
                whole.model,
                [&](int i) {
                  MicroBatch batch = provider(i);
                  batch.labels = Tensor();
                  return batch;
                },
                options),
            "micro-batch 0 needs labels on the last pipeline stage");

  ParameterStore store;
  model::GPTModel first_half(whole.config, comm::single_process_state(), store,
                             model::GPTStage{true, false, 0, 2});
  store.allocate();
  EXPECT_EQ(schedule_error(first_half, provider, options),
            "the model's stage (pre_process true, post_process false) does not match pipeline "
            "rank 0 of 1 (use pipeline::pipeline_stage to build it)");
}

TEST(ScheduleErrors, InterleavingNeedsSeveralStages) {
  const model::TransformerConfig config = tiny_moe_config();
  ParameterStore store;
  model::GPTModel first(config, comm::single_process_state(), store, {true, false, 0, 2});
  model::GPTModel second(config, comm::single_process_state(), store, {false, true, 2, 2});
  store.allocate();
  ScheduleOptions options;
  options.num_micro_batches = 2;
  options.micro_batch_size = kMicroBatchSize;
  EXPECT_EQ(moe::testing::error_text([&] {
              forward_backward(
                  {&first, &second}, comm::single_process_state(),
                  [&](int m) { return global_micro_batch(config, m); }, options);
            }),
            "the interleaved schedule (2 model chunks) needs pipeline_model_parallel_size > 1, "
            "got 1");
}

}  // namespace
}  // namespace moe::pipeline

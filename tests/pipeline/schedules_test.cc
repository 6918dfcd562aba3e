// The schedule on one process: Megatron's layer split and its errors, no-pipelining equals the
// model's own forward/backward loop bitwise, forward-only evaluation, and bad-input errors.
#include <gtest/gtest.h>

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

}  // namespace
}  // namespace moe::pipeline

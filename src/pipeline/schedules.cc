#include "moe/pipeline/schedules.h"

#include <algorithm>
#include <array>
#include <deque>
#include <numeric>
#include <string>
#include <utility>

#include "moe/comm/fault_injection.h"
#include "moe/comm/process_group.h"
#include "moe/tensor/error.h"

namespace moe::pipeline {

model::GPTStage pipeline_stage(int num_layers, int pipeline_size, int pipeline_rank) {
  MOE_CHECK(pipeline_size >= 1, "pipeline_model_parallel_size (", pipeline_size,
            ") must be at least 1");
  MOE_CHECK(pipeline_rank >= 0 && pipeline_rank < pipeline_size, "pipeline rank ", pipeline_rank,
            " is outside [0, ", pipeline_size, ")");
  MOE_CHECK(num_layers >= 0 && num_layers % pipeline_size == 0, "num_layers (", num_layers,
            ") must be divisible by pipeline_model_parallel_size (", pipeline_size,
            "): every pipeline stage holds the same number of layers");
  const int per_stage = num_layers / pipeline_size;
  model::GPTStage stage;
  stage.pre_process = pipeline_rank == 0;
  stage.post_process = pipeline_rank == pipeline_size - 1;
  stage.first_layer = pipeline_rank * per_stage;
  stage.num_layers = per_stage;
  return stage;
}

model::GPTStage pipeline_stage(int num_layers, const comm::ParallelState& parallel) {
  return pipeline_stage(num_layers, parallel.pp_group.size(), parallel.pp_group.rank());
}

double MoELossSummary::load_balancing_loss() const {
  return reports > 0 ? sum.load_balancing_loss / double(reports) : 0.0;
}

double MoELossSummary::z_loss() const {
  return reports > 0 ? sum.z_loss / double(reports) : 0.0;
}

double StepResult::mean_lm_loss() const {
  if (lm_losses.empty()) return 0.0;
  return std::accumulate(lm_losses.begin(), lm_losses.end(), 0.0) / double(lm_losses.size());
}

std::vector<double> StepResult::mean_mtp_losses() const {
  std::vector<double> means = mtp_loss_sums;
  for (double& mean : means) mean /= double(std::max<size_t>(lm_losses.size(), 1));
  return means;
}

namespace {

void add_moe_reports(const std::vector<model::MoELossReport>& reports, MoELossSummary& summary) {
  for (const model::MoELossReport& report : reports) {
    summary.sum += report.losses;
    ++summary.reports;
  }
}

// One rank's part of a schedule: its stage, the p2p links to its neighbours and the contexts of
// micro-batches whose forward ran and whose backward has not (oldest first).
class StageRunner {
 public:
  StageRunner(model::GPTModel& model, const comm::ParallelState& parallel,
              const MicroBatchProvider& provider, const ScheduleOptions& options)
      : model_(model),
        pp_(parallel.pp_group),
        provider_(provider),
        options_(options),
        first_(parallel.is_pipeline_first()),
        last_(parallel.is_pipeline_last()),
        // [local_rows, h]: what crosses every link, in both directions.
        hidden_shape_{model.local_rows(options.micro_batch_size), model.config().hidden_size},
        hidden_dtype_(model.store().param_dtype()),
        loss_grad_(float(options.loss_scale / double(options.num_micro_batches))) {
    const int micro_batches = options.num_micro_batches;
    result_.lm_losses.assign(size_t(micro_batches), 0.0);
    result_.loss_tokens.assign(size_t(micro_batches), 0.0);
    result_.stage_moe_losses.resize(size_t(micro_batches));
    result_.mtp_loss_sums.assign(size_t(model.config().mtp_num_layers), 0.0);
  }

  // Hidden states from the previous stage (undefined on the first stage, which reads tokens).
  Tensor recv_forward() {
    if (first_) return Tensor();
    Tensor input = Tensor::empty(hidden_shape_, hidden_dtype_);
    comm::recv(input, pp_.rank() - 1, kPipelineTag, pp_);
    return input;
  }
  void send_forward(const Tensor& output) {
    if (!last_) comm::send(output, pp_.rank() + 1, kPipelineTag, pp_);
  }
  // Gradient of this stage's output: from the next stage, or d(loss) on the last.
  Tensor recv_backward() {
    if (last_) return loss_gradient();
    Tensor output_grad = Tensor::empty(hidden_shape_, hidden_dtype_);
    comm::recv(output_grad, pp_.rank() + 1, kPipelineTag, pp_);
    return output_grad;
  }
  void send_backward(const Tensor& input_grad) {
    if (!first_) comm::send(input_grad, pp_.rank() - 1, kPipelineTag, pp_);
  }
  Tensor send_forward_recv_backward(const Tensor& output) {
    if (last_) return loss_gradient();
    Tensor output_grad = Tensor::empty(hidden_shape_, hidden_dtype_);
    comm::send_recv(output, pp_.rank() + 1, output_grad, pp_.rank() + 1, kPipelineTag, pp_);
    return output_grad;
  }
  Tensor send_backward_recv_forward(const Tensor& input_grad) {
    if (first_) return Tensor();
    Tensor input = Tensor::empty(hidden_shape_, hidden_dtype_);
    comm::send_recv(input_grad, pp_.rank() - 1, input, pp_.rank() - 1, kPipelineTag, pp_);
    return input;
  }

  // Forward of the next micro-batch on `input` (ignored on the first stage); keeps its context.
  Tensor forward(const Tensor& input) {
    const int index = next_forward_++;
    comm::fault_point("forward");
    MicroBatch batch = provider_(index);
    if (first_) {
      MOE_CHECK(batch.tokens.defined() && batch.tokens.ndim() == 2 &&
                    batch.tokens.dim(0) == options_.micro_batch_size,
                "micro-batch ", index,
                " needs tokens [micro_batch_size = ", options_.micro_batch_size,
                ", seq] on the first pipeline stage, got ",
                batch.tokens.defined() ? shape_string(batch.tokens.shape()) : "none");
    }
    MOE_CHECK(!last_ || batch.labels.defined(), "micro-batch ", index,
              " needs labels on the last pipeline stage");
    model::GPTContext& context = in_flight_.emplace_back();
    context.training = !options_.forward_only;
    context.dropout_seed = batch.dropout_seed;
    Tensor output = model_.forward_step(first_ ? batch.tokens : input, batch.labels, context,
                                        batch.loss_mask, options_.micro_batch_size);
    result_.peak_contexts_in_flight =
        std::max(result_.peak_contexts_in_flight, int(in_flight_.size()));
    if (last_) {
      result_.lm_losses[size_t(index)] = context.lm_loss;
      result_.loss_tokens[size_t(index)] = context.loss_tokens;
      for (const model::MTPLossReport& report : context.mtp_losses) {
        result_.mtp_loss_sums[size_t(report.depth - 1)] += report.loss;
      }
    }
    add_moe_reports(context.moe_losses, result_.moe);
    result_.stage_moe_losses[size_t(index)] = std::move(context.moe_losses);
    if (options_.forward_only) in_flight_.pop_front();  // frees the saved activations
    return output;
  }

  // Backward of the oldest micro-batch in flight; returns the gradient of its stage input.
  Tensor backward(const Tensor& output_grad) {
    MOE_CHECK(!in_flight_.empty(), "pipeline schedule: backward with no micro-batch in flight");
    model::GPTContext context = std::move(in_flight_.front());
    in_flight_.pop_front();
    context.moe_aux_loss_grad_scale = loss_grad_;
    comm::fault_point("backward");
    return model_.backward_step(context, output_grad);
  }

  StepResult finish() {
    MOE_CHECK(in_flight_.empty(), "pipeline schedule ended with ", in_flight_.size(),
              " micro-batches still in flight");
    if (options_.reduce_over_pipeline && pp_.size() > 1) reduce_losses();
    return std::move(result_);
  }

 private:
  Tensor loss_gradient() const { return Tensor::full({1}, loss_grad_, DType::F64); }

  // Sums over the pp group in rank order: lm and MTP losses are zero except on the last stage, so
  // the sum is that stage's values exactly; MoE sums add up the stages' disjoint layers.
  void reduce_losses() {
    const size_t micro_batches = result_.lm_losses.size();
    const size_t depths = result_.mtp_loss_sums.size();
    constexpr size_t kMoE = RouterLosses::kCount + 1;  // the loss sums and the report count
    // [2 M + kMoE + D]
    Tensor buffer({int64_t(2 * micro_batches + kMoE + depths)}, DType::F64);
    double* values = buffer.data<double>();
    std::copy(result_.lm_losses.begin(), result_.lm_losses.end(), values);
    std::copy(result_.loss_tokens.begin(), result_.loss_tokens.end(), values + micro_batches);
    double* moe = values + 2 * micro_batches;
    MoELossSummary& summary = result_.moe;
    std::array<double, RouterLosses::kCount> sums = summary.sum.values();
    std::copy(sums.begin(), sums.end(), moe);
    moe[RouterLosses::kCount] = double(summary.reports);
    double* mtp = moe + kMoE;
    std::copy(result_.mtp_loss_sums.begin(), result_.mtp_loss_sums.end(), mtp);
    comm::all_reduce(buffer, pp_);
    std::copy(values, values + micro_batches, result_.lm_losses.begin());
    std::copy(values + micro_batches, values + 2 * micro_batches, result_.loss_tokens.begin());
    std::copy_n(moe, sums.size(), sums.begin());
    summary.sum = RouterLosses::from_values(sums);
    summary.reports = int64_t(moe[RouterLosses::kCount]);
    std::copy(mtp, mtp + depths, result_.mtp_loss_sums.begin());
  }

  model::GPTModel& model_;
  const comm::ProcessGroup& pp_;
  const MicroBatchProvider& provider_;
  const ScheduleOptions& options_;
  const bool first_, last_;
  const Shape hidden_shape_;
  const DType hidden_dtype_;
  const float loss_grad_;  // d(objective)/d(lm loss of one micro-batch)
  int next_forward_ = 0;
  std::deque<model::GPTContext> in_flight_;
  StepResult result_;
};

const char* yes_no(bool value) {
  return value ? "true" : "false";
}

void check_schedule_inputs(const model::GPTModel& model, const comm::ParallelState& parallel,
                           const MicroBatchProvider& provider, const ScheduleOptions& options) {
  MOE_CHECK(options.num_micro_batches >= 1, "num_micro_batches (", options.num_micro_batches,
            ") must be at least 1");
  MOE_CHECK(options.micro_batch_size >= 1, "micro_batch_size (", options.micro_batch_size,
            ") must be at least 1");
  MOE_CHECK(bool(provider), "the pipeline schedule needs a micro-batch provider");
  const model::GPTStage& stage = model.stage();
  MOE_CHECK(stage.pre_process == parallel.is_pipeline_first() &&
                stage.post_process == parallel.is_pipeline_last(),
            "the model's stage (pre_process ", yes_no(stage.pre_process), ", post_process ",
            yes_no(stage.post_process), ") does not match pipeline rank ", parallel.pp_group.rank(),
            " of ", parallel.pp_group.size(), " (use pipeline::pipeline_stage to build it)");
}

}  // namespace

StepResult forward_backward(model::GPTModel& model, const comm::ParallelState& parallel,
                            const MicroBatchProvider& provider, const ScheduleOptions& options) {
  check_schedule_inputs(model, parallel, provider, options);
  StageRunner stage(model, parallel, provider, options);
  const int micro_batches = options.num_micro_batches;
  if (options.forward_only) {
    for (int m = 0; m < micro_batches; ++m) stage.send_forward(stage.forward(stage.recv_forward()));
    return stage.finish();
  }
  // 1F1B. With one stage warmup is 0 and every step is forward then backward (no pipelining).
  const int warmup =
      std::min(parallel.pp_group.size() - parallel.pp_group.rank() - 1, micro_batches);
  const int steady = micro_batches - warmup;
  for (int m = 0; m < warmup; ++m) stage.send_forward(stage.forward(stage.recv_forward()));
  Tensor input = steady > 0 ? stage.recv_forward() : Tensor();
  for (int m = 0; m < steady; ++m) {
    Tensor output_grad = stage.send_forward_recv_backward(stage.forward(input));
    Tensor input_grad = stage.backward(output_grad);
    if (m + 1 == steady) {
      stage.send_backward(input_grad);
    } else {
      input = stage.send_backward_recv_forward(input_grad);
    }
  }
  for (int m = 0; m < warmup; ++m) stage.send_backward(stage.backward(stage.recv_backward()));
  StepResult result = stage.finish();
  model.finalize_grads();
  return result;
}

StepResult forward_only(model::GPTModel& model, const comm::ParallelState& parallel,
                        const MicroBatchProvider& provider, ScheduleOptions options) {
  options.forward_only = true;
  return forward_backward(model, parallel, provider, options);
}

}  // namespace moe::pipeline

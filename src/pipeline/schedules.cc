#include "moe/pipeline/schedules.h"

#include <algorithm>
#include <array>
#include <deque>
#include <map>
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

std::vector<model::GPTStage> pipeline_chunks(int num_layers, const PipelineLayout& layout,
                                             int pipeline_size, int pipeline_rank) {
  const int pp = pipeline_size, rank = pipeline_rank, chunks = layout.virtual_stages;
  const int first = layout.first_stage_layers, last = layout.last_stage_layers;
  MOE_CHECK(chunks >= 1, "virtual pipeline stages per rank (", chunks, ") must be at least 1");
  MOE_CHECK(first >= 0 && last >= 0, "--decoder-first-pipeline-num-layers (", first,
            ") and --decoder-last-pipeline-num-layers (", last,
            ") must not be negative (0: unset)");
  if (first == 0 && last == 0 && chunks == 1) {
    return {pipeline_stage(num_layers, pp, rank)};
  }
  MOE_CHECK(pp > 1, "virtual pipeline stages (", chunks,
            " per rank) and uneven first or last stages need --pipeline-model-parallel-size > 1, "
            "got ",
            pp);
  MOE_CHECK(rank >= 0 && rank < pp, "pipeline rank ", rank, " is outside [0, ", pp, ")");
  // Layers per chunk on the first, middle and last stages (Megatron's
  // num_layers_per_virtual_model_chunk_in_{first,middle,last}_pipeline_stage).
  int first_chunk = 0, last_chunk = 0, middle_chunk = 0;
  if (first == 0 && last == 0) {
    MOE_CHECK(num_layers % pp == 0, "number of layers of the model (", num_layers,
              ") must be divisible by pipeline model parallel size (", pp, ")");
    MOE_CHECK(
        num_layers / pp % chunks == 0, "number of layers per pipeline stage (", num_layers / pp,
        ") must be divisible by the number of virtual stages per pipeline rank (", chunks, ")");
    first_chunk = last_chunk = middle_chunk = num_layers / pp / chunks;
  } else {
    MOE_CHECK(first % chunks == 0, "number of layers at first stage: ", first,
              " must be divisible by virtual pipeline parallel degree ", chunks);
    MOE_CHECK(last % chunks == 0, "number of layers at last stage: ", last,
              " must be divisible by virtual pipeline parallel degree ", chunks);
    const int middle_stages = pp - (first > 0) - (last > 0);
    const int middle_layers = num_layers - first - last;
    MOE_CHECK(middle_layers >= 0, "--decoder-first-pipeline-num-layers (", first,
              ") + --decoder-last-pipeline-num-layers (", last, ") exceed --num-layers (",
              num_layers, ")");
    MOE_CHECK((middle_layers > 0) == (middle_stages > 0), "Mismatch: ", middle_layers,
              " middle layers remaining but ", middle_stages, " middle PP stages available.");
    if (middle_stages > 0) {
      MOE_CHECK(middle_layers % middle_stages == 0,
                "number of layers at middle stage: ", middle_layers,
                " must be divisible by the middle pipeline model parallel size ", middle_stages);
      MOE_CHECK(middle_layers / middle_stages % chunks == 0,
                "number of layers on each middle pipeline rank: ", middle_layers / middle_stages,
                " must be divisible by virtual pipeline parallel degree ", chunks);
      middle_chunk = middle_layers / middle_stages / chunks;
    }
    first_chunk = first > 0 ? first / chunks : middle_chunk;
    last_chunk = last > 0 ? last / chunks : middle_chunk;
  }
  // One round of virtual stages (chunk c on every rank) holds `per_round` layers.
  const int per_round = first_chunk + (pp - 2) * middle_chunk + last_chunk;
  const int own = rank == 0 ? first_chunk : rank == pp - 1 ? last_chunk : middle_chunk;
  const int offset = rank == 0 ? 0 : first_chunk + (rank - 1) * middle_chunk;
  std::vector<model::GPTStage> stages(static_cast<size_t>(chunks));
  for (int c = 0; c < chunks; ++c) {
    model::GPTStage& stage = stages[size_t(c)];
    stage.pre_process = rank == 0 && c == 0;
    stage.post_process = rank == pp - 1 && c == chunks - 1;
    stage.first_layer = c * per_round + offset;
    stage.num_layers = own;
  }
  return stages;
}

std::vector<model::GPTStage> pipeline_chunks(int num_layers, const PipelineLayout& layout,
                                             const comm::ParallelState& parallel) {
  return pipeline_chunks(num_layers, layout, parallel.pp_group.size(), parallel.pp_group.rank());
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

// Sums over the pp group in rank order: lm and MTP losses are zero except on the last stage, so
// the sum is that stage's values exactly; MoE sums add up the stages' disjoint layers.
void reduce_losses(StepResult& result, const comm::ProcessGroup& pp) {
  const size_t micro_batches = result.lm_losses.size();
  const size_t depths = result.mtp_loss_sums.size();
  constexpr size_t kMoE = RouterLosses::kCount + 1;  // the loss sums and the report count
  // [2 M + kMoE + D]
  Tensor buffer({int64_t(2 * micro_batches + kMoE + depths)}, DType::F64);
  double* values = buffer.data<double>();
  std::copy(result.lm_losses.begin(), result.lm_losses.end(), values);
  std::copy(result.loss_tokens.begin(), result.loss_tokens.end(), values + micro_batches);
  double* moe = values + 2 * micro_batches;
  MoELossSummary& summary = result.moe;
  std::array<double, RouterLosses::kCount> sums = summary.sum.values();
  std::copy(sums.begin(), sums.end(), moe);
  moe[RouterLosses::kCount] = double(summary.reports);
  double* mtp = moe + kMoE;
  std::copy(result.mtp_loss_sums.begin(), result.mtp_loss_sums.end(), mtp);
  comm::all_reduce(buffer, pp);
  std::copy(values, values + micro_batches, result.lm_losses.begin());
  std::copy(values + micro_batches, values + 2 * micro_batches, result.loss_tokens.begin());
  std::copy_n(moe, sums.size(), sums.begin());
  summary.sum = RouterLosses::from_values(sums);
  summary.reports = int64_t(moe[RouterLosses::kCount]);
  std::copy(mtp, mtp + depths, result.mtp_loss_sums.begin());
}

// What a micro-batch's forward on this rank reports: lm losses on the last stage, MoE losses of
// every stage (added to the micro-batch's list: a rank with several chunks reports several times).
void record_forward(model::GPTContext& context, int index, bool last_stage, StepResult& result) {
  if (last_stage) {
    result.lm_losses[size_t(index)] = context.lm_loss;
    result.loss_tokens[size_t(index)] = context.loss_tokens;
    for (const model::MTPLossReport& report : context.mtp_losses) {
      result.mtp_loss_sums[size_t(report.depth - 1)] += report.loss;
    }
  }
  add_moe_reports(context.moe_losses, result.moe);
  std::vector<model::MoELossReport>& reports = result.stage_moe_losses[size_t(index)];
  reports.insert(reports.end(), context.moe_losses.begin(), context.moe_losses.end());
}

void check_micro_batch(const MicroBatch& batch, int index, bool first_stage, bool last_stage,
                       const ScheduleOptions& options) {
  if (first_stage) {
    MOE_CHECK(batch.tokens.defined() && batch.tokens.ndim() == 2 &&
                  batch.tokens.dim(0) == options.micro_batch_size,
              "micro-batch ", index, " needs tokens [micro_batch_size = ", options.micro_batch_size,
              ", seq] on the first pipeline stage, got ",
              batch.tokens.defined() ? shape_string(batch.tokens.shape()) : "none");
  }
  MOE_CHECK(!last_stage || batch.labels.defined(), "micro-batch ", index,
            " needs labels on the last pipeline stage");
}

// Room for one step's results of M micro-batches.
StepResult empty_result(int micro_batches, int mtp_depths) {
  StepResult result;
  result.lm_losses.assign(size_t(micro_batches), 0.0);
  result.loss_tokens.assign(size_t(micro_batches), 0.0);
  result.stage_moe_losses.resize(size_t(micro_batches));
  result.mtp_loss_sums.assign(size_t(mtp_depths), 0.0);
  return result;
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
        loss_grad_(float(options.loss_scale / double(options.num_micro_batches))),
        result_(empty_result(options.num_micro_batches, model.config().mtp_num_layers)) {}

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
    check_micro_batch(batch, index, first_, last_, options_);
    model::GPTContext& context = in_flight_.emplace_back();
    context.training = !options_.forward_only;
    context.dropout_seed = batch.dropout_seed;
    Tensor output = model_.forward_step(first_ ? batch.tokens : input, batch.labels, context,
                                        batch.loss_mask, options_.micro_batch_size, batch.tokens);
    result_.peak_contexts_in_flight =
        std::max(result_.peak_contexts_in_flight, int(in_flight_.size()));
    record_forward(context, index, last_, result_);
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
    if (options_.reduce_over_pipeline && pp_.size() > 1) reduce_losses(result_, pp_);
    return std::move(result_);
  }

 private:
  Tensor loss_gradient() const { return Tensor::full({1}, loss_grad_, DType::F64); }

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

// One forward or backward of the interleaved schedule: chunk `chunk` of micro-batch
// `micro_batch`.
struct ChunkOp {
  bool forward = true;
  int chunk = 0;
  int micro_batch = 0;
};

// Megatron's order of rank `rank`'s operations (forward_backward_pipelining_with_interleaving
// with microbatch_group_size_per_vp_stage = pp): the forwards follow get_schedule_table (groups
// of pp micro-batches, every chunk of a group before the next group; the last group takes the
// rest), the k-th backward is the table's k-th entry with the chunk mirrored.
std::vector<ChunkOp> interleaved_order(int micro_batches, int chunks, int pp, int rank,
                                       bool forward_only) {
  std::vector<ChunkOp> table;  // forwards in order
  for (int begin = 0; begin < micro_batches; begin += pp) {
    const int end = begin + pp >= micro_batches ? micro_batches : begin + pp;
    for (int c = 0; c < chunks; ++c) {
      for (int m = begin; m < end; ++m) table.push_back({true, c, m});
    }
  }
  const int total = micro_batches * chunks;
  const int warmup =
      forward_only ? total : std::min(2 * (pp - rank - 1) + (chunks - 1) * pp, total);
  auto backward = [&](int k) {
    return ChunkOp{false, chunks - 1 - table[size_t(k)].chunk, table[size_t(k)].micro_batch};
  };
  std::vector<ChunkOp> order(table.begin(), table.begin() + warmup);
  for (int k = 0; k + warmup < total; ++k) {
    order.push_back(table[size_t(warmup + k)]);
    order.push_back(backward(k));
  }
  if (!forward_only) {
    for (int k = std::max(total - warmup, 0); k < total; ++k) order.push_back(backward(k));
  }
  return order;
}

// The step table every rank computes for all ranks: in step t each rank runs at most one
// operation of its order, the first whose input has arrived (a forward needs the previous virtual
// stage's forward of that micro-batch, a backward the next one's backward, from an earlier step).
// ops[r][t] is rank r's operation in step t (chunk -1: none).
std::vector<std::vector<ChunkOp>> step_table(int micro_batches, int chunks, int pp,
                                             bool forward_only) {
  const int stages = chunks * pp, total_ops = micro_batches * chunks * (forward_only ? 1 : 2);
  // Step in which virtual stage s finished micro-batch m's forward / backward (-1: not yet).
  std::vector<int> forward_step(size_t(stages * micro_batches), -1);
  std::vector<int> backward_step(size_t(stages * micro_batches), -1);
  std::vector<std::vector<ChunkOp>> orders(static_cast<size_t>(pp)), ops(static_cast<size_t>(pp));
  std::vector<size_t> next(static_cast<size_t>(pp), 0);
  for (int r = 0; r < pp; ++r) {
    orders[size_t(r)] = interleaved_order(micro_batches, chunks, pp, r, forward_only);
  }
  int done = 0;
  for (int step = 0; done < pp * total_ops; ++step) {
    int ran = 0;
    for (int r = 0; r < pp; ++r) {
      ChunkOp op{true, -1, 0};
      if (next[size_t(r)] < orders[size_t(r)].size()) {
        const ChunkOp& candidate = orders[size_t(r)][next[size_t(r)]];
        const int s = candidate.chunk * pp + r, m = candidate.micro_batch;
        auto finished_before = [&](const std::vector<int>& steps, int stage) {
          const int at = steps[size_t(stage * micro_batches + m)];
          return at >= 0 && at < step;
        };
        const bool ready = candidate.forward
                               ? s == 0 || finished_before(forward_step, s - 1)
                               : s == stages - 1 || finished_before(backward_step, s + 1);
        if (ready) {
          op = candidate;
          (op.forward ? forward_step : backward_step)[size_t(s * micro_batches + m)] = step;
          ++next[size_t(r)];
          ++ran;
        }
      }
      ops[size_t(r)].push_back(op);
    }
    MOE_CHECK(ran > 0, "interleaved pipeline schedule: no rank can proceed at step ", step);
    done += ran;
  }
  return ops;
}

// One rank's part of the interleaved schedule: its chunks, the tensors received ahead of their
// use, and each chunk's contexts in flight (oldest first).
class InterleavedRunner {
 public:
  InterleavedRunner(const std::vector<model::GPTModel*>& chunks,
                    const comm::ParallelState& parallel, const MicroBatchProvider& provider,
                    const ScheduleOptions& options)
      : chunks_(chunks),
        pp_(parallel.pp_group),
        provider_(provider),
        options_(options),
        hidden_shape_{chunks[0]->local_rows(options.micro_batch_size),
                      chunks[0]->config().hidden_size},
        hidden_dtype_(chunks[0]->store().param_dtype()),
        loss_grad_(float(options.loss_scale / double(options.num_micro_batches))),
        in_flight_(chunks.size()),
        result_(empty_result(options.num_micro_batches, chunks[0]->config().mtp_num_layers)) {}

  StepResult run() {
    const int pp = pp_.size(), rank = pp_.rank(), chunks = int(chunks_.size());
    const int stages = pp * chunks;
    const std::vector<std::vector<ChunkOp>> table =
        step_table(options_.num_micro_batches, chunks, pp, options_.forward_only);
    const int next = (rank + 1) % pp, previous = (rank + pp - 1) % pp;
    for (size_t step = 0; step < table[0].size(); ++step) {
      const ChunkOp& op = table[size_t(rank)][step];
      Tensor produced;  // this step's output (forward) or input gradient (backward)
      if (op.chunk >= 0) produced = op.forward ? forward(op) : backward(op);
      const int stage = op.chunk * pp + rank;
      // Forward direction: this rank's output to the next virtual stage, the previous rank's
      // output into one of this rank's chunks.
      const ChunkOp& from_previous = table[size_t(previous)][step];
      const int previous_stage = from_previous.chunk * pp + previous;
      exchange(op.chunk >= 0 && op.forward && stage + 1 < stages ? &produced : nullptr, next,
               from_previous.chunk >= 0 && from_previous.forward && previous_stage + 1 < stages
                   ? &received_inputs_[key(previous_stage + 1, from_previous.micro_batch)]
                   : nullptr,
               previous);
      // Backward direction: this rank's input gradient to the previous virtual stage, the next
      // rank's input gradient into one of this rank's chunks.
      const ChunkOp& from_next = table[size_t(next)][step];
      const int next_stage = from_next.chunk * pp + next;
      exchange(op.chunk >= 0 && !op.forward && stage > 0 ? &produced : nullptr, previous,
               from_next.chunk >= 0 && !from_next.forward && next_stage > 0
                   ? &received_grads_[key(next_stage - 1, from_next.micro_batch)]
                   : nullptr,
               next);
    }
    for (const auto& contexts : in_flight_) {
      MOE_CHECK(contexts.empty(), "interleaved pipeline schedule ended with ", contexts.size(),
                " micro-batches still in flight");
    }
    if (options_.reduce_over_pipeline) reduce_losses(result_, pp_);
    return std::move(result_);
  }

 private:
  int64_t key(int stage, int micro_batch) const {
    return int64_t(stage) * options_.num_micro_batches + micro_batch;
  }
  Tensor take(std::map<int64_t, Tensor>& received, int stage, int micro_batch) {
    auto found = received.find(key(stage, micro_batch));
    MOE_CHECK(found != received.end(),
              "interleaved pipeline schedule: nothing received for "
              "virtual stage ",
              stage, ", micro-batch ", micro_batch);
    Tensor tensor = std::move(found->second);
    received.erase(found);
    return tensor;
  }

  // Posts this step's transfers of one direction together (either side may be absent).
  void exchange(const Tensor* outgoing, int send_peer, Tensor* incoming, int recv_peer) {
    if (incoming) *incoming = Tensor::empty(hidden_shape_, hidden_dtype_);
    if (outgoing && incoming) {
      comm::send_recv(*outgoing, send_peer, *incoming, recv_peer, kPipelineTag, pp_);
    } else if (outgoing) {
      comm::send(*outgoing, send_peer, kPipelineTag, pp_);
    } else if (incoming) {
      comm::recv(*incoming, recv_peer, kPipelineTag, pp_);
    }
  }

  Tensor forward(const ChunkOp& op) {
    const int rank = pp_.rank(), pp = pp_.size(), last_chunk = int(chunks_.size()) - 1;
    const bool first_stage = rank == 0 && op.chunk == 0;
    const bool last_stage = rank == pp - 1 && op.chunk == last_chunk;
    if (op.chunk == 0) {  // the micro-batch's first forward on this rank
      MicroBatch& batch = batches_[op.micro_batch] = provider_(op.micro_batch);
      check_micro_batch(batch, op.micro_batch, rank == 0, rank == pp - 1, options_);
    }
    const MicroBatch& batch = batches_.at(op.micro_batch);
    Tensor input =
        first_stage ? batch.tokens : take(received_inputs_, op.chunk * pp + rank, op.micro_batch);
    model::GPTContext& context = in_flight_[size_t(op.chunk)].emplace_back();
    context.training = !options_.forward_only;
    context.dropout_seed = batch.dropout_seed;
    Tensor output = chunks_[size_t(op.chunk)]->forward_step(
        input, batch.labels, context, batch.loss_mask, options_.micro_batch_size, batch.tokens);
    int alive = 0;
    for (const auto& contexts : in_flight_) alive += int(contexts.size());
    result_.peak_contexts_in_flight = std::max(result_.peak_contexts_in_flight, alive);
    record_forward(context, op.micro_batch, last_stage, result_);
    if (options_.forward_only) in_flight_[size_t(op.chunk)].pop_back();
    if (op.chunk == last_chunk) batches_.erase(op.micro_batch);  // its last use on this rank
    return output;
  }

  Tensor backward(const ChunkOp& op) {
    const int rank = pp_.rank(), pp = pp_.size();
    const bool last_stage = rank == pp - 1 && op.chunk == int(chunks_.size()) - 1;
    std::deque<model::GPTContext>& contexts = in_flight_[size_t(op.chunk)];
    MOE_CHECK(!contexts.empty(), "interleaved pipeline schedule: backward of chunk ", op.chunk,
              " with no micro-batch in flight");
    model::GPTContext context = std::move(contexts.front());
    contexts.pop_front();
    context.moe_aux_loss_grad_scale = loss_grad_;
    Tensor output_grad = last_stage ? Tensor::full({1}, loss_grad_, DType::F64)
                                    : take(received_grads_, op.chunk * pp + rank, op.micro_batch);
    return chunks_[size_t(op.chunk)]->backward_step(context, output_grad);
  }

  const std::vector<model::GPTModel*>& chunks_;
  const comm::ProcessGroup& pp_;
  const MicroBatchProvider& provider_;
  const ScheduleOptions& options_;
  const Shape hidden_shape_;
  const DType hidden_dtype_;
  const float loss_grad_;
  std::vector<std::deque<model::GPTContext>> in_flight_;  // per chunk
  std::map<int, MicroBatch> batches_;  // micro-batches whose last chunk has not run yet
  // Keyed by (virtual stage, micro-batch): inputs and output gradients of this rank's chunks.
  std::map<int64_t, Tensor> received_inputs_, received_grads_;
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

StepResult forward_backward(const std::vector<model::GPTModel*>& chunks,
                            const comm::ParallelState& parallel, const MicroBatchProvider& provider,
                            const ScheduleOptions& options) {
  MOE_CHECK(!chunks.empty(), "the pipeline schedule needs at least one model chunk");
  if (chunks.size() == 1) return forward_backward(*chunks[0], parallel, provider, options);
  MOE_CHECK(options.num_micro_batches >= 1, "num_micro_batches (", options.num_micro_batches,
            ") must be at least 1");
  MOE_CHECK(options.micro_batch_size >= 1, "micro_batch_size (", options.micro_batch_size,
            ") must be at least 1");
  MOE_CHECK(bool(provider), "the pipeline schedule needs a micro-batch provider");
  const int pp = parallel.pp_group.size(), rank = parallel.pp_group.rank();
  const int micro_batches = options.num_micro_batches;
  MOE_CHECK(pp > 1, "the interleaved schedule (", chunks.size(),
            " model chunks) needs pipeline_model_parallel_size > 1, got ", pp);
  MOE_CHECK(micro_batches >= pp,
            "The number of contiguous micro-batches in a virtual pipeline stage should range in "
            "[PP=",
            pp, " , M=", micro_batches, "]");
  MOE_CHECK(
      micro_batches % pp == 0,
      "The remainder of M (the total micro-batches) divided by N (number of contiguous "
      "micro-batches in a virtual pipeline stage) should be 0, or larger than or equal to "
      "the pipeline-parallel size, but it is ",
      micro_batches % pp,
      ". Otherwise, it introduces dependency bubbles in the pipeline and reduces throughput.");
  for (size_t c = 0; c < chunks.size(); ++c) {
    const model::GPTStage& stage = chunks[c]->stage();
    const bool first = rank == 0 && c == 0, last = rank == pp - 1 && c + 1 == chunks.size();
    MOE_CHECK(stage.pre_process == first && stage.post_process == last, "model chunk ", c,
              " (pre_process ", yes_no(stage.pre_process), ", post_process ",
              yes_no(stage.post_process), ") does not match pipeline rank ", rank, " of ", pp,
              " with ", chunks.size(), " chunks (use pipeline::pipeline_chunks to build them)");
    MOE_CHECK(&chunks[c]->store() == &chunks[0]->store(),
              "the model chunks of a rank must share one parameter store");
  }
  StepResult result = InterleavedRunner(chunks, parallel, provider, options).run();
  if (!options.forward_only) {
    for (model::GPTModel* chunk : chunks) chunk->finalize_grads();
  }
  return result;
}

}  // namespace moe::pipeline

// Pipeline-parallel schedules over GPTModel stages (Megatron-Core's
// pipeline_parallel/schedules.py): one training step's micro-batches on this rank's stage.
//
// With one stage (pp = 1) forward_backward is Megatron's forward_backward_no_pipelining: forward
// then backward of each micro-batch in turn. With several it is 1F1B
// (forward_backward_pipelining_without_interleaving): stage r of pp runs min(pp - r - 1, M)
// warm-up forwards, then alternates one forward and one backward, then runs the remaining
// backwards, so at most pp - r micro-batch contexts are alive on it at once. Backwards run in
// micro-batch order 0..M-1 on every stage, so parameter gradients accumulate in the same order as
// with one stage: pp only moves layers between ranks and changes no sum.
//
// Hidden states [local_rows(micro_batch_size), hidden_size] in the parameter dtype go down the
// pp group (stage r to r + 1) and their gradients come back up, point to point with one tag
// (kPipelineTag); each direction of a link carries one kind of tensor, in micro-batch order.
// Transfers that cross in the steady phase are posted together (comm::send_recv), as Megatron's
// batched p2p does, so no pair of stages waits on each other. A peer that fails or stalls turns
// into moe::Error from the comm layer's timeout (comm::set_collective_timeout).
//
// Typical use, one training iteration on every rank:
//   model::GPTStage stage = pipeline::pipeline_stage(config.num_layers, parallel);
//   model::GPTModel model(config, parallel, store, stage);
//   ...
//   store.zero_grads();
//   pipeline::ScheduleOptions options;
//   options.num_micro_batches = M;  options.micro_batch_size = b;  options.loss_scale = scale;
//   pipeline::StepResult step = pipeline::forward_backward(model, parallel, provider, options);
//   // gradients of this stage's parameters += d(scale * mean over micro-batches of lm loss)
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "moe/tensor/tensor.h"

namespace moe::pipeline {

// Tag of every pipeline transfer on the pp group (within [0, comm::kMaxUserTag]).
constexpr int kPipelineTag = 20560;

// Megatron's split of num_layers over pp stages: stage p owns layers [p * L / pp,
// (p + 1) * L / pp); the first stage has the embedding (pre_process), the last the final norm,
// output layer and loss (post_process). Throws moe::Error naming both numbers when num_layers is
// not divisible by pipeline_size, or when the rank is outside [0, pipeline_size).
model::GPTStage pipeline_stage(int num_layers, int pipeline_size, int pipeline_rank);
// The stage of this rank in `parallel`'s pp group.
model::GPTStage pipeline_stage(int num_layers, const comm::ParallelState& parallel);

// Megatron's layer split with virtual pipeline stages and uneven first / last stages.
struct PipelineLayout {
  // Model chunks per pipeline rank (--num-virtual-stages-per-pipeline-rank, Megatron's
  // virtual_pipeline_model_parallel_size); 1: no interleaving.
  int virtual_stages = 1;
  // Layers of the first / last pipeline stage (--decoder-first-pipeline-num-layers,
  // --decoder-last-pipeline-num-layers); 0: unset, the stage takes a middle stage's share.
  int first_stage_layers = 0;
  int last_stage_layers = 0;
};
// The model chunks of pipeline rank `pipeline_rank`, chunk c first (Megatron's
// get_transformer_layer_offset): virtual stage c * pp + r runs chunk c of rank r; the layers go
// over the virtual stages in order, each chunk of the first (last) stage holding
// first_stage_layers / V (last_stage_layers / V) of them and each chunk of a middle stage an
// equal share of the rest. Chunk 0 of rank 0 has the embedding (pre_process), chunk V - 1 of the
// last rank the output layer and loss (post_process). Throws moe::Error with Megatron's reason
// when the layers do not split so. With the default layout it is pipeline_stage's split.
std::vector<model::GPTStage> pipeline_chunks(int num_layers, const PipelineLayout& layout,
                                             int pipeline_size, int pipeline_rank);
std::vector<model::GPTStage> pipeline_chunks(int num_layers, const PipelineLayout& layout,
                                             const comm::ParallelState& parallel);

// One micro-batch's inputs. Tokens are read on the first stage (and on the last with multi-token
// prediction), labels and loss_mask on the last (middle stages may leave them undefined); every
// stage needs the dropout seed.
struct MicroBatch {
  Tensor tokens;              // [b, s] I32/I64 token ids
  Tensor labels;              // [b, s] I32/I64 next-token ids
  Tensor loss_mask;           // [b, s] any float dtype; undefined: every token counts
  uint64_t dropout_seed = 0;  // dropout masks of this micro-batch (all stages and tp ranks agree)
};
// Gives micro-batch i. Called exactly once per micro-batch, in order 0, 1, ..., M - 1, on every
// rank, when that micro-batch's forward starts (so it may pull from a data iterator).
using MicroBatchProvider = std::function<MicroBatch(int micro_batch)>;

struct ScheduleOptions {
  int num_micro_batches = 1;     // M
  int64_t micro_batch_size = 1;  // b: sequences per micro-batch
  // Forwards only, contexts dropped at once, dropout off (evaluation). No gradients change.
  bool forward_only = false;
  // Each micro-batch's backward starts from d(objective)/d(its lm loss) = loss_scale / M,
  // rounded to fp32 as GPTModel::backward takes it (Megatron divides the loss by
  // num_microbatches and multiplies the fp16 loss scale in). The MoE aux and z losses get the
  // same factor (Megatron's MoEAuxLossAutoScaler.set_loss_scale(loss_scale / num_microbatches)).
  double loss_scale = 1.0;
  // True: lm losses and the MoE loss summary are reduced over the pp group, so every rank of it
  // returns the last stage's lm losses and the whole pipeline's MoE summary (one all_reduce of
  // 2 M + 6 + mtp_num_layers doubles). False: no collective; lm losses are zero except on the last
  // stage and the MoE summary covers this stage's layers.
  bool reduce_over_pipeline = true;
};

// MoE router losses summed over (MoE layer, micro-batch) reports.
struct MoELossSummary {
  RouterLosses sum;
  int64_t reports = 0;

  // Means over the reports (0 when there are none), as Megatron logs them.
  double load_balancing_loss() const;
  double z_loss() const;
};

struct StepResult {
  // Per micro-batch: mean lm loss over its loss-mask tokens, and that token count (see
  // ScheduleOptions::reduce_over_pipeline for which ranks hold them).
  std::vector<double> lm_losses;
  std::vector<double> loss_tokens;
  // The MoE losses this stage's layers reported, per micro-batch (empty for dense layers).
  std::vector<std::vector<model::MoELossReport>> stage_moe_losses;
  MoELossSummary moe;
  // Per multi-token-prediction depth (mtp_num_layers entries): its loss summed over the
  // micro-batches; reduced over pp as lm_losses are.
  std::vector<double> mtp_loss_sums;
  // Most micro-batch contexts alive at once on this rank (forward done, backward not yet):
  // min(pp - rank, M) when training, 1 with forward_only.
  int peak_contexts_in_flight = 0;

  double mean_lm_loss() const;  // mean of lm_losses (Megatron's reported lm loss)
  // mtp_loss_sums / micro-batches (Megatron's "mtp_<depth> loss").
  std::vector<double> mean_mtp_losses() const;
};

// Runs one step's micro-batches on this rank's stage of `model` (collective over parallel.pp_group,
// and over the tp/ep groups inside the model), then the model's finalize_grads. Parameter
// gradients accumulate (+=) into the model's store; zero them before the step. The model's stage
// must match this rank's pp position (pre_process on the first stage, post_process on the last).
// Throws moe::Error for bad options before any transfer, naming the values.
StepResult forward_backward(model::GPTModel& model, const comm::ParallelState& parallel,
                            const MicroBatchProvider& provider, const ScheduleOptions& options);

// Evaluation: forward_backward with forward_only set.
StepResult forward_only(model::GPTModel& model, const comm::ParallelState& parallel,
                        const MicroBatchProvider& provider, ScheduleOptions options);

// Several model chunks per rank (pipeline_chunks; all declared in one ParameterStore). One chunk
// is forward_backward above. Several run Megatron's interleaved 1F1B
// (forward_backward_pipelining_with_interleaving, microbatch_group_size_per_vp_stage = pp): the
// forwards of the V chunks go in Megatron's table order (groups of pp micro-batches, chunk 0
// first), rank r of pp starting with min(2 (pp - r - 1) + (V - 1) pp, M V) warm-up forwards, then
// one forward and one backward (chunks in reverse) alternating, then the remaining backwards.
// Each chunk's backwards run in micro-batch order, so its gradients sum as with one stage.
// Needs pp > 1 and M a multiple of pp (Megatron's checks, its wording). Hidden states go from
// virtual stage s to s + 1 (rank r to r + 1, the last rank to the first), their gradients back;
// the transfers of every rank follow one step table that each rank computes for all ranks, with
// one forward or backward per rank and step and the transfers of a step posted together per
// direction, so matching sends and receives meet and no cycle of waits can form.
StepResult forward_backward(const std::vector<model::GPTModel*>& chunks,
                            const comm::ParallelState& parallel, const MicroBatchProvider& provider,
                            const ScheduleOptions& options);

}  // namespace moe::pipeline

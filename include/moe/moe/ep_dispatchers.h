// Expert-parallel token dispatchers: the MoE layer's experts spread over the ranks of the expert
// parallel (ep) group, as Megatron-Core's MoEAlltoAllTokenDispatcher (--moe-token-dispatcher-type
// alltoall) and MoEAllGatherTokenDispatcher (allgather, Megatron's default) do.
//
// Layout: expert rank q of ep holds experts [q * E / ep, (q + 1) * E / ep). Every rank of the
// tp-ep group (etp x ep, etp fastest) holds its own tokens; the group's batch is the
// concatenation of the ranks' tokens in group-rank order ("global token order"). Token counts
// may differ between ranks; hidden size, top-k, dtype and the dispatch settings must agree
// (checked, with an error on every rank naming each rank's value; ranks with different
// num_experts meet the collectives layer's size check instead).
//
// Capacity (moe_expert_capacity_factor): the capacity and the kept slots are decided on the
// whole group's routing (all ranks' tokens), so the same global batch drops the same tokens
// whatever the ep size, and expert inputs are padded (moe_pad_expert_input_to_capacity) on the
// expert's rank. Megatron drops per rank on the local token count instead, which
// moe_capacity_scope rank selects (decide_group_capacity, capacity.h).
//
// Numbers: each expert sees its rows in global token order, and each token's top-k outputs are
// weighted and summed in slot order on the token's home rank by the same kernel as the
// single-process LocalTokenDispatcher, so outputs, input gradients and expert-weight gradients
// are bitwise those of one process (given GEMMs whose rows do not depend on the call's other
// rows). See docs/expert_parallel.md.
//
// Expert tensor parallelism (etp > 1): the dispatchers give every etp rank of an expert all of its
// rows and sum the etp ranks' partial outputs (and input gradients) on the way back, as
// Megatron's; the placement names this rank's ffn slice (tp_rank / tp_size from the etp group),
// so the layer's experts split fc1 by columns and fc2 by rows and add the fc2 bias once. The
// partial outputs' sum rounds differently from the whole expert's: see docs/expert_parallel.md.
#pragma once

#include <memory>

#include "moe/comm/parallel_state.h"
#include "moe/comm/process_group.h"
#include "moe/moe/config.h"
#include "moe/moe/router.h"
#include "moe/moe/token_dispatcher.h"
#include "moe/tensor/tensor.h"

namespace moe {

// The experts of ep rank `ep_rank`: a contiguous block of num_experts / ep_size. Throws when
// ep_size does not divide num_experts.
ExpertPlacement expert_parallel_placement(int64_t num_experts, int ep_size, int ep_rank);

// Megatron's MoEAlltoAllTokenDispatcher. dispatch: permute the local tokens by expert,
// all-gather the tokens-per-expert counts over tp-ep (with the ranks' agreement on the settings,
// in one exchange), all-to-all-v the rows over ep, regroup the
// received chunks from [source rank][local expert] to [local expert][source rank]
// (sort_chunks_by_idxs) and pad to capacity; with etp > 1 an all-gather over etp after the
// all-to-all (a reduce-scatter on the way back). combine is the exact reverse, then the weighted
// top-k sum on the home rank. ctx.plan maps the home tokens' slots to the home rows (the rows
// this rank sends, grouped by global expert).
class AllToAllTokenDispatcher final : public TokenDispatcher {
 public:
  AllToAllTokenDispatcher(const MoEConfig& config, const comm::ParallelState& parallel);
  const ExpertPlacement& placement() const override { return placement_; }
  Tensor dispatch(const Tensor& hidden, const Routing& routing, DispatchContext& ctx) override;
  Tensor combine(const Tensor& expert_output, DispatchContext& ctx) override;
  Tensor combine_backward(const Tensor& grad_output, DispatchContext& ctx,
                          Tensor& grad_probs) override;
  Tensor dispatch_backward(const Tensor& grad_expert_input, DispatchContext& ctx) override;

 private:
  MoEConfig config_;
  ExpertPlacement placement_;
  comm::ProcessGroup tp_ep_;  // the agreement-and-counts exchange, capacity
  // The all-to-all's group: ep, or, with etp = 1, tp-ep itself (the same ranks), so that every
  // exchange runs on one communicator and ranks that get out of step meet a mismatched
  // announcement rather than a wait on another group.
  comm::ProcessGroup ep_;
  comm::ProcessGroup etp_;
};

// Megatron's MoEAllGatherTokenDispatcher. dispatch: all-gather tokens and routing over tp-ep and
// take the local experts' rows. combine: every rank places its experts' output rows at their
// kept (token, slot) positions and a reduce-scatter over tp-ep brings each token's kept rows
// home, where they are weighted and summed in slot order. Megatron reduce-scatters the partial
// sums instead ([T, H] rather than [kept slots, H], up to [T * topk, H]): a sum over ranks would
// not round like the slot-order sum, so this dispatcher moves up to top-k times the bytes to keep
// the numbers layout-independent. Dropped slots do not travel. ctx.plan maps the home tokens'
// slots to the home kept slot rows.
class AllGatherTokenDispatcher final : public TokenDispatcher {
 public:
  AllGatherTokenDispatcher(const MoEConfig& config, const comm::ParallelState& parallel);
  const ExpertPlacement& placement() const override { return placement_; }
  Tensor dispatch(const Tensor& hidden, const Routing& routing, DispatchContext& ctx) override;
  Tensor combine(const Tensor& expert_output, DispatchContext& ctx) override;
  Tensor combine_backward(const Tensor& grad_output, DispatchContext& ctx,
                          Tensor& grad_probs) override;
  Tensor dispatch_backward(const Tensor& grad_expert_input, DispatchContext& ctx) override;

 private:
  MoEConfig config_;
  ExpertPlacement placement_;
  comm::ProcessGroup tp_ep_;
};

// The dispatcher for a layout: LocalTokenDispatcher when ep = etp = 1, else the one named by
// config.moe_token_dispatcher_type. Throws for an ep size that does not divide num_experts and
// an etp size that does not divide the expert ffn size. Fits model::DispatcherFactory as
//   [](const MoEConfig& c, const comm::ParallelState& p, int) { return make_token_dispatcher(c, p);
//   }
std::unique_ptr<TokenDispatcher> make_token_dispatcher(const MoEConfig& config,
                                                       const comm::ParallelState& parallel);

// Megatron's get_tokens_per_expert_and_token_count for TopKRouter::set_aux_count_reducer: sums
// the aux-loss tokens-per-expert counts and the token count over `group` (one all-reduce), so
// each rank's loss is its tokens' share of the loss of the group's whole batch and the ranks'
// losses add up to it. Megatron reduces over the tensor x context parallel group (the shards of
// one micro-batch); reducing over tp_ep instead makes the ep ranks' batches one batch. With
// seq_aux_loss (per-sequence counts) the group must hold shards of the same sequences (tp x cp),
// never tp_ep. Every rank of the group must run the router's aux loss (training; the router
// calls the reducer with zero tokens too, so a rank with an empty micro-batch still joins).
TopKRouter::AuxCountReducer make_aux_count_reducer(comm::ProcessGroup group);

}  // namespace moe

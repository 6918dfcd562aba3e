#include <memory>

#include "moe/dispatcher_common.h"
#include "moe/home_rows.h"
#include "moe/moe/ep_dispatchers.h"

namespace moe {
namespace {

using ep_detail::gather_rows;

// What combine and the backwards need from one dispatch. Only kept slots travel home: the
// "kept rows" are the group's kept slots in global slot order, each rank's a contiguous block.
struct AllGatherState final : DispatcherState {
  std::vector<int64_t> kept_rows_per_rank;  // [tp-ep] each rank's kept slots
  // [group kept rows]: the local expert row serving each kept row, -1 for another rank's expert.
  std::vector<int64_t> expert_row_of_kept;
  // [R]: the kept row each local expert row serves, -1 for a padding row.
  std::vector<int64_t> kept_of_expert_row;
  // The group's slots <-> this rank's expert rows (global token order inside each expert).
  DispatchPlan expert_plan;
};

// The local experts' rows [R, H] placed at their kept rows of the group's batch (zero
// elsewhere), summed over the group and scattered: each rank gets its own tokens' kept slot
// rows. Only one rank writes each kept row, so the sum is exact.
Tensor expert_rows_to_home_slots(const Tensor& expert_rows, const AllGatherState& state,
                                 int64_t home_rows, const comm::ProcessGroup& group,
                                 int64_t& exchange_bytes) {
  const int64_t H = expert_rows.dim(1);
  Tensor group_kept_rows =
      Tensor::empty({int64_t(state.expert_row_of_kept.size()), H}, expert_rows.dtype());
  gather_rows(expert_rows, state.expert_row_of_kept, group_kept_rows);
  Tensor home = Tensor::empty({home_rows, H}, expert_rows.dtype());
  exchange_bytes += int64_t(group_kept_rows.nbytes());
  comm::reduce_scatter_v(group_kept_rows, home, state.kept_rows_per_rank, group);
  return home;
}

}  // namespace

AllGatherTokenDispatcher::AllGatherTokenDispatcher(const MoEConfig& config,
                                                   const comm::ParallelState& parallel)
    : config_(config),
      placement_(ep_detail::expert_parallel_setup("AllGatherTokenDispatcher", config, parallel)),
      tp_ep_(parallel.tp_ep_group) {}

Tensor AllGatherTokenDispatcher::dispatch(const Tensor& hidden, const Routing& routing,
                                          DispatchContext& ctx) {
  const ep_detail::GroupBatch batch = ep_detail::agree_on_batch(
      "AllGatherTokenDispatcher::dispatch", hidden, routing, config_, tp_ep_);
  const Routing group_routing = ep_detail::gather_routing(routing, batch, tp_ep_);
  const CapacityDecision capacity =
      decide_group_capacity(config_, group_routing, batch.tokens_per_rank);
  const int64_t T = routing.num_tokens, K = routing.topk, H = hidden.dim(1);
  ctx = DispatchContext{};
  ctx.routing = routing;
  ctx.hidden_size = H;
  ctx.dtype = hidden.dtype();

  auto state = std::make_unique<AllGatherState>();
  state->expert_plan =
      build_dispatch_plan(group_routing.experts, config_.num_experts, placement_.first,
                          placement_.count, capacity.keep, capacity.pad_rows_to);
  ctx.tokens_per_local_expert = state->expert_plan.rows_per_expert;
  ctx.unpadded_tokens_per_local_expert = unpadded_rows_per_expert(state->expert_plan);

  // Number the group's kept slots in global slot order, rank by rank.
  std::vector<int64_t> kept_of_slot(size_t(batch.total_tokens * K), -1);
  int64_t slot = 0, my_first_kept = 0;
  for (size_t rank = 0; rank < batch.tokens_per_rank.size(); ++rank) {
    if (int64_t(rank) == tp_ep_.rank()) my_first_kept = int64_t(state->expert_row_of_kept.size());
    int64_t kept = 0;
    for (const int64_t end = slot + batch.tokens_per_rank[rank] * K; slot < end; ++slot) {
      if (!capacity.keep.empty() && !capacity.keep[size_t(slot)]) continue;
      kept_of_slot[size_t(slot)] = int64_t(state->expert_row_of_kept.size());
      state->expert_row_of_kept.push_back(state->expert_plan.row_of_slot[size_t(slot)]);
      ++kept;
    }
    state->kept_rows_per_rank.push_back(kept);
  }
  for (int64_t group_slot : state->expert_plan.slot_of_row) {
    state->kept_of_expert_row.push_back(group_slot < 0 ? -1 : kept_of_slot[size_t(group_slot)]);
  }

  // The home plan: slot s of the home tokens <-> its kept row (-1 when dropped).
  ctx.plan.num_tokens = T;
  ctx.plan.topk = K;
  ctx.plan.rows_per_expert = {state->kept_rows_per_rank[size_t(tp_ep_.rank())]};
  ctx.plan.row_of_slot.resize(size_t(T * K));
  for (int64_t s = 0; s < T * K; ++s) {
    const int64_t kept = kept_of_slot[size_t(batch.first_token * K + s)];
    ctx.plan.row_of_slot[size_t(s)] = kept < 0 ? -1 : kept - my_first_kept;
    if (kept >= 0) ctx.plan.slot_of_row.push_back(s);
  }

  Tensor group_hidden = Tensor::empty({batch.total_tokens, H}, ctx.dtype);  // [group T, H]
  exchange_bytes_ += int64_t(hidden.nbytes());
  comm::all_gather_v(hidden, group_hidden, batch.tokens_per_rank, tp_ep_);
  Tensor rows = Tensor::empty({state->expert_plan.num_rows(), H}, ctx.dtype);  // [R, H]
  permute_rows(group_hidden, state->expert_plan, Tensor(), rows);
  ctx.state = std::move(state);
  return rows;
}

Tensor AllGatherTokenDispatcher::combine(const Tensor& expert_output, DispatchContext& ctx) {
  const char* who = "AllGatherTokenDispatcher::combine expert output";
  const auto& state = ep_detail::saved_state<AllGatherState>(ctx, who);
  ep_detail::check_expert_rows(expert_output, state.expert_plan.num_rows(), ctx, who);
  Tensor home =
      expert_rows_to_home_slots(expert_output, state, ctx.plan.num_rows(), tp_ep_, exchange_bytes_);
  return internal::combine_home_rows(home, ctx);
}

Tensor AllGatherTokenDispatcher::combine_backward(const Tensor& grad_output, DispatchContext& ctx,
                                                  Tensor& grad_probs) {
  const char* who = "AllGatherTokenDispatcher::combine_backward";
  const auto& state = ep_detail::saved_state<AllGatherState>(ctx, who);
  const Tensor grad_home =  // [plan rows, H]
      internal::combine_backward_home_rows(who, grad_output, ctx, grad_probs);
  // The reverse of the reduce-scatter: every rank gets the group's slot gradients and keeps its
  // experts' rows.
  Tensor group_grads =
      Tensor::empty({int64_t(state.expert_row_of_kept.size()), ctx.hidden_size}, ctx.dtype);
  exchange_bytes_ += int64_t(grad_home.nbytes());
  comm::all_gather_v(grad_home, group_grads, state.kept_rows_per_rank, tp_ep_);
  Tensor grad_rows = Tensor::empty({state.expert_plan.num_rows(), ctx.hidden_size}, ctx.dtype);
  gather_rows(group_grads, state.kept_of_expert_row, grad_rows);
  return grad_rows;
}

Tensor AllGatherTokenDispatcher::dispatch_backward(const Tensor& grad_expert_input,
                                                   DispatchContext& ctx) {
  const char* who = "AllGatherTokenDispatcher::dispatch_backward gradient";
  const auto& state = ep_detail::saved_state<AllGatherState>(ctx, who);
  ep_detail::check_expert_rows(grad_expert_input, state.expert_plan.num_rows(), ctx, who);
  Tensor home = expert_rows_to_home_slots(grad_expert_input, state, ctx.plan.num_rows(), tp_ep_,
                                          exchange_bytes_);
  return internal::home_rows_to_grad_hidden(home, ctx);
}

}  // namespace moe

#include <memory>

#include "moe/dispatcher_common.h"
#include "moe/home_rows.h"
#include "moe/moe/ep_dispatchers.h"

namespace moe {
namespace {

using ep_detail::gather_rows;

// What combine and the backwards need from one dispatch. "Received" rows are those of the
// all-to-all over ep, laid out [source ep rank q][local expert l]; "gathered" rows are the etp
// group's received rows, [etp rank s][q][l] (the received rows themselves when etp = 1).
struct AllToAllState final : DispatcherState {
  std::vector<int64_t> send_rows;  // [ep] home rows sent to each ep rank
  std::vector<int64_t> recv_rows;  // [ep] rows received from each ep rank
  std::vector<int64_t> etp_rows;   // [etp] rows each etp rank received
  // [expert rows R]: the gathered row feeding each expert row, -1 for a padding row.
  std::vector<int64_t> expert_row_source;
  // [gathered rows]: the expert row each gathered row became (the reverse map).
  std::vector<int64_t> gathered_row_source;
};

struct Groups {
  const comm::ProcessGroup& ep;
  const comm::ProcessGroup& etp;
  int64_t& exchange_bytes;  // the dispatcher's count of the all-to-all send buffers' bytes
};

// Home rows (grouped by global expert) -> the local experts' rows [R, H]: all-to-all over ep,
// all-gather over etp, regroup by local expert.
Tensor home_to_experts(const Tensor& home_rows, const AllToAllState& state, const Groups& groups) {
  const int64_t H = home_rows.dim(1);
  const DType dtype = home_rows.dtype();
  const int64_t gathered_rows = int64_t(state.gathered_row_source.size());
  Tensor received = Tensor::empty({state.etp_rows[size_t(groups.etp.rank())], H}, dtype);
  groups.exchange_bytes += int64_t(home_rows.nbytes());
  comm::all_to_all_v(home_rows, state.send_rows, received, state.recv_rows, groups.ep);
  Tensor gathered = received;  // [gathered rows, H]
  if (groups.etp.size() > 1) {
    gathered = Tensor::empty({gathered_rows, H}, dtype);
    comm::all_gather_v(received, gathered, state.etp_rows, groups.etp);
  }
  Tensor rows = Tensor::empty({int64_t(state.expert_row_source.size()), H}, dtype);
  gather_rows(gathered, state.expert_row_source, rows);
  return rows;
}

// The exact reverse: the local experts' rows [R, H] -> home rows [home_rows, H]. Over etp the
// reverse of the all-gather is a reduce-scatter: it sums the etp ranks' partial outputs.
Tensor experts_to_home(const Tensor& expert_rows, const AllToAllState& state, int64_t home_rows,
                       const Groups& groups) {
  const int64_t H = expert_rows.dim(1);
  const DType dtype = expert_rows.dtype();
  Tensor gathered = Tensor::empty({int64_t(state.gathered_row_source.size()), H}, dtype);
  gather_rows(expert_rows, state.gathered_row_source, gathered);
  Tensor received = gathered;  // [received rows, H]
  if (groups.etp.size() > 1) {
    received = Tensor::empty({state.etp_rows[size_t(groups.etp.rank())], H}, dtype);
    comm::reduce_scatter_v(gathered, received, state.etp_rows, groups.etp);
  }
  Tensor home = Tensor::empty({home_rows, H}, dtype);
  groups.exchange_bytes += int64_t(received.nbytes());
  comm::all_to_all_v(received, state.recv_rows, home, state.send_rows, groups.ep);
  return home;
}

// [group size * E]: at g * E + e, the kept slots of rank g's tokens routed to expert e, from
// the group's routing and its capacity decision.
std::vector<int64_t> kept_slots_per_expert(const Routing& group_routing,
                                           const std::vector<uint8_t>& keep,
                                           const ep_detail::GroupBatch& batch, int64_t E) {
  std::vector<int64_t> counts(batch.tokens_per_rank.size() * size_t(E), 0);
  const int32_t* ids = group_routing.experts.data<int32_t>();
  int64_t slot = 0;
  for (size_t g = 0; g < batch.tokens_per_rank.size(); ++g) {
    for (const int64_t end = slot + batch.tokens_per_rank[g] * group_routing.topk; slot < end;
         ++slot) {
      if (keep[size_t(slot)]) ++counts[g * size_t(E) + size_t(ids[slot])];
    }
  }
  return counts;
}

}  // namespace

AllToAllTokenDispatcher::AllToAllTokenDispatcher(const MoEConfig& config,
                                                 const comm::ParallelState& parallel)
    : config_(config),
      placement_(ep_detail::expert_parallel_setup("AllToAllTokenDispatcher", config, parallel)),
      tp_ep_(parallel.tp_ep_group),
      ep_(parallel.sizes.etp == 1 ? parallel.tp_ep_group : parallel.ep_group),
      etp_(parallel.etp_group) {}

Tensor AllToAllTokenDispatcher::dispatch(const Tensor& hidden, const Routing& routing,
                                         DispatchContext& ctx) {
  const char* who = "AllToAllTokenDispatcher::dispatch";
  const ep_detail::GroupBatch batch =
      ep_detail::agree_on_batch(who, hidden, routing, config_, tp_ep_);
  const int64_t E = config_.num_experts, L = placement_.count, first = placement_.first;
  // counts[g * E + e]: rows tp-ep rank g = s + etp * q sends to expert e (Megatron all-gathers
  // them over tp-ep too): the agreement's slot counts when dropless, else the kept slots.
  std::vector<int64_t> counts = batch.slots_per_expert;
  CapacityDecision capacity;
  if (config_.moe_expert_capacity_factor) {
    const Routing group_routing = ep_detail::gather_routing(routing, batch, tp_ep_);
    capacity = decide_group_capacity(config_, group_routing, batch.tokens_per_rank);
    counts = kept_slots_per_expert(group_routing, capacity.keep, batch, E);
    // This rank's slots: its tokens' block of the group's.
    const auto mine = capacity.keep.begin() + batch.first_token * routing.topk;
    capacity.keep = std::vector<uint8_t>(mine, mine + routing.num_tokens * routing.topk);
  }
  ctx = DispatchContext{};
  ctx.routing = routing;
  ctx.hidden_size = hidden.dim(1);
  ctx.dtype = hidden.dtype();
  // Permutation 1: the home tokens' kept slots grouped by global expert, in token order, so the
  // rows for ep rank q (experts of q are contiguous) form one block.
  ctx.plan = build_dispatch_plan(routing.experts, E, 0, E, capacity.keep);

  const int ep = ep_.size(), etp = etp_.size(), me = tp_ep_.rank();
  const auto count = [&](int s, int q, int64_t l) {
    return counts[size_t((s + etp * q) * E + first + l)];
  };
  auto state = std::make_unique<AllToAllState>();
  state->send_rows.assign(size_t(ep), 0);
  state->recv_rows.assign(size_t(ep), 0);
  state->etp_rows.assign(size_t(etp), 0);
  // Where chunk (s, q, l) starts among the gathered rows [s][q][l].
  std::vector<int64_t> chunk_start(size_t(etp * ep * L));
  int64_t gathered = 0;
  for (int s = 0; s < etp; ++s) {
    for (int q = 0; q < ep; ++q) {
      for (int64_t l = 0; l < L; ++l) {
        chunk_start[size_t((s * ep + q) * L + l)] = gathered;
        gathered += count(s, q, l);
        state->etp_rows[size_t(s)] += count(s, q, l);
        if (s == etp_.rank()) state->recv_rows[size_t(q)] += count(s, q, l);
      }
    }
  }
  for (int q = 0; q < ep; ++q) {
    for (int64_t l = 0; l < L; ++l)
      state->send_rows[size_t(q)] += counts[size_t(me * E + q * L + l)];
  }
  // Permutation 2 (Megatron's sort_chunks_by_idxs): [s][q][l] -> [l][q][s], i.e. source tp-ep
  // rank s + etp * q ascending (global token order) inside each expert, then the expert's
  // padding rows.
  ctx.tokens_per_local_expert.assign(size_t(L), 0);
  ctx.unpadded_tokens_per_local_expert.assign(size_t(L), 0);
  for (int64_t l = 0; l < L; ++l) {
    int64_t kept = 0;
    for (int q = 0; q < ep; ++q) {
      for (int s = 0; s < etp; ++s) {
        const int64_t start = chunk_start[size_t((s * ep + q) * L + l)];
        for (int64_t i = 0; i < count(s, q, l); ++i) state->expert_row_source.push_back(start + i);
        kept += count(s, q, l);
      }
    }
    const int64_t rows = capacity.pad_rows_to > 0 ? capacity.pad_rows_to : kept;
    MOE_CHECK(kept <= rows, who, ": expert ", first + l, " keeps ", kept,
              " rows, more than its capacity ", rows);
    state->expert_row_source.insert(state->expert_row_source.end(), size_t(rows - kept), -1);
    ctx.tokens_per_local_expert[size_t(l)] = rows;
    ctx.unpadded_tokens_per_local_expert[size_t(l)] = kept;
  }
  state->gathered_row_source.assign(size_t(gathered), -1);
  for (size_t r = 0; r < state->expert_row_source.size(); ++r) {
    const int64_t source = state->expert_row_source[r];
    if (source >= 0) state->gathered_row_source[size_t(source)] = int64_t(r);
  }

  Tensor home_rows = Tensor::empty({ctx.plan.num_rows(), ctx.hidden_size}, ctx.dtype);
  permute_rows(hidden, ctx.plan, Tensor(), home_rows);
  Tensor rows = home_to_experts(home_rows, *state, {ep_, etp_, exchange_bytes_});
  ctx.state = std::move(state);
  return rows;
}

Tensor AllToAllTokenDispatcher::combine(const Tensor& expert_output, DispatchContext& ctx) {
  const char* who = "AllToAllTokenDispatcher::combine expert output";
  const auto& state = ep_detail::saved_state<AllToAllState>(ctx, who);
  ep_detail::check_expert_rows(expert_output, int64_t(state.expert_row_source.size()), ctx, who);
  Tensor home =
      experts_to_home(expert_output, state, ctx.plan.num_rows(), {ep_, etp_, exchange_bytes_});
  return internal::combine_home_rows(home, ctx);
}

Tensor AllToAllTokenDispatcher::combine_backward(const Tensor& grad_output, DispatchContext& ctx,
                                                 Tensor& grad_probs) {
  const char* who = "AllToAllTokenDispatcher::combine_backward";
  const auto& state = ep_detail::saved_state<AllToAllState>(ctx, who);
  const Tensor grad_home =  // [plan rows, H]
      internal::combine_backward_home_rows(who, grad_output, ctx, grad_probs);
  return home_to_experts(grad_home, state, {ep_, etp_, exchange_bytes_});
}

Tensor AllToAllTokenDispatcher::dispatch_backward(const Tensor& grad_expert_input,
                                                  DispatchContext& ctx) {
  const char* who = "AllToAllTokenDispatcher::dispatch_backward gradient";
  const auto& state = ep_detail::saved_state<AllToAllState>(ctx, who);
  ep_detail::check_expert_rows(grad_expert_input, int64_t(state.expert_row_source.size()), ctx,
                               who);
  Tensor home =
      experts_to_home(grad_expert_input, state, ctx.plan.num_rows(), {ep_, etp_, exchange_bytes_});
  return internal::home_rows_to_grad_hidden(home, ctx);
}

}  // namespace moe

// Pieces shared by the expert-parallel dispatchers (not part of the public API); the home-side
// ends of combine and backward, which the local dispatcher shares, are in home_rows.h.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/comm/process_group.h"
#include "moe/moe/config.h"
#include "moe/moe/router.h"
#include "moe/moe/token_dispatcher.h"
#include "moe/tensor/tensor.h"

namespace moe::ep_detail {

// Validates the config and the layout for an expert-parallel dispatcher (`who` names it) and
// returns this rank's experts.
ExpertPlacement expert_parallel_setup(const char* who, const MoEConfig& config,
                                      const comm::ParallelState& parallel);

// How the group's batch is split over its ranks, and where its slots go.
struct GroupBatch {
  std::vector<int64_t> tokens_per_rank;  // [group size]
  int64_t first_token = 0;               // this rank's first token in global token order
  int64_t total_tokens = 0;
  // [group size * num_experts]: at g * num_experts + e, the slots of rank g's tokens routed to
  // expert e, before capacity (the all-to-all's counts when dropless).
  std::vector<int64_t> slots_per_expert;
};

// One small all-gather: every rank learns every rank's token count and slots per expert and
// checks that its arguments are valid and that hidden size, top-k, dtype and the dispatch
// settings agree, so a bad argument or a disagreement raises an error on every rank before any
// row moves. `who` names the dispatcher call in messages.
GroupBatch agree_on_batch(const char* who, const Tensor& hidden, const Routing& routing,
                          const MoEConfig& config, const comm::ProcessGroup& group);

// The whole group's routing in global token order (experts and probs all-gathered).
Routing gather_routing(const Routing& local, const GroupBatch& batch,
                       const comm::ProcessGroup& group);

// dst[i] = src[source_of_row[i]], a zero row where the source is -1. src [N, H], dst [M, H]
// with M = source_of_row.size(), same dtype.
void gather_rows(const Tensor& src, std::span<const int64_t> source_of_row, Tensor& dst);

// The per-micro-batch state a dispatcher saved in ctx.state, checked to be of its kind.
template <class State>
State& saved_state(DispatchContext& ctx, const char* what) {
  auto* state = dynamic_cast<State*>(ctx.state.get());
  MOE_CHECK(state != nullptr, what,
            ": the dispatch context holds no forward state of this "
            "dispatcher (dispatch not run, or backward already done)");
  return *state;
}

// Checks an expert-side tensor [rows, ctx.hidden_size] of ctx.dtype.
void check_expert_rows(const Tensor& rows, int64_t num_rows, const DispatchContext& ctx,
                       const char* what);

}  // namespace moe::ep_detail

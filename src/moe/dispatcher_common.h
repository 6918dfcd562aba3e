// Pieces shared by the expert-parallel dispatchers; the home-side combine and backward ends
// serve the local dispatcher too (not part of the public API).
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

// How the group's batch is split over its ranks.
struct GroupBatch {
  std::vector<int64_t> tokens_per_rank;  // [group size]
  int64_t first_token = 0;               // this rank's first token in global token order
  int64_t total_tokens = 0;
};

// One small all-gather: every rank learns every rank's token count and checks that hidden
// size, top-k and dtype agree, so a disagreement raises the same error on every rank before any
// row moves. `who` names the dispatcher call in messages.
GroupBatch agree_on_batch(const char* who, const Tensor& hidden, const Routing& routing,
                          const MoEConfig& config, const comm::ProcessGroup& group);

// The whole group's routing in global token order (experts and probs all-gathered).
Routing gather_routing(const Routing& local, const GroupBatch& batch,
                       const comm::ProcessGroup& group);

// The slots of this rank's tokens that survive capacity, decided on the group's routing
// (empty when dropless), and the rows every expert is padded to (0: no padding).
CapacityDecision decide_group_capacity(const MoEConfig& config, const Routing& local,
                                       const GroupBatch& batch, const comm::ProcessGroup& group);

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

// The end of combine: this rank's home slot rows [plan rows, H] weighted and summed into the
// output [T, H]. Keeps the rows in ctx, since d(probs) needs them.
Tensor combine_home_rows(const Tensor& home, DispatchContext& ctx);

// The start of combine_backward (`who` names it; its saved state already checked): checks
// grad_output [T, H], writes d(probs) into grad_probs and returns the gradient of the home slot
// rows [plan rows, H].
Tensor combine_backward_home_rows(const char* who, const Tensor& grad_output, DispatchContext& ctx,
                                  Tensor& grad_probs);

// The end of dispatch_backward: the home slot-row gradients [plan rows, H] summed into the
// gradient of hidden [T, H]. Clears ctx: the micro-batch is done with the dispatcher.
Tensor home_rows_to_grad_hidden(const Tensor& grad_home, DispatchContext& ctx);

}  // namespace moe::ep_detail

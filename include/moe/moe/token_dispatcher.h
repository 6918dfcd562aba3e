// Token dispatchers move token activations to the experts that process them and back, as
// Megatron-Core's MoETokenDispatcher does. The MoE layer only talks to this interface, so the
// single-process dispatcher here and the expert-parallel ones (all-to-all, all-gather over MPI)
// are interchangeable. Each dispatcher serves the local experts
// [placement.first, placement.first + placement.count) of placement.num_experts.
//
// Per micro-batch, the layer calls, in order:
//   forward:  rows = dispatch(hidden, routing, ctx); ... experts ...; out = combine(y, ctx)
//   backward: dy = combine_backward(dout, ctx, dprobs); ... experts ...;
//             dhidden = dispatch_backward(drows, ctx)
// Everything a backward needs is in the DispatchContext, so several micro-batches can be in
// flight. The combine multiplies each expert output row by its routing probability and sums a
// token's top-k rows in slot order on the token's home rank (see permutation.h).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "moe/moe/capacity.h"
#include "moe/moe/config.h"
#include "moe/moe/permutation.h"
#include "moe/moe/router.h"
#include "moe/tensor/tensor.h"

namespace moe {

// Which experts live on this rank: [first, first + count) out of num_experts.
struct ExpertPlacement {
  int64_t num_experts = 0;
  int64_t first = 0;
  int64_t count = 0;
  // Expert tensor parallelism: this rank holds ffn slice tp_rank of tp_size of every local
  // expert (fc1 columns, fc2 rows); the dispatcher sums the slices' outputs over the etp group.
  int64_t tp_rank = 0;
  int64_t tp_size = 1;
  static ExpertPlacement all(int64_t num_experts) { return {num_experts, 0, num_experts}; }
};

// Dispatcher-specific saved state (split sizes of an exchange, ...).
struct DispatcherState {
  virtual ~DispatcherState() = default;
};

struct DispatchContext {
  Routing routing;    // the home tokens' routing; routing.probs are the combine weights
  DispatchPlan plan;  // home tokens' slots <-> rows in home permutation order
  std::vector<int64_t> tokens_per_local_expert;  // [placement.count] rows each local expert gets
  // [placement.count] the tokens among them, without the padding rows (the expert load to log)
  std::vector<int64_t> unpadded_tokens_per_local_expert;
  Tensor combine_rows;  // [plan rows, H]: expert outputs as combined (for d probs)
  int64_t hidden_size = 0;
  DType dtype = DType::F32;
  std::unique_ptr<DispatcherState> state;
};

class TokenDispatcher {
 public:
  virtual ~TokenDispatcher() = default;
  virtual const ExpertPlacement& placement() const = 0;

  // hidden [T, H] -> the local experts' input rows [R, H] grouped by local expert, in global
  // token order inside each expert; ctx.tokens_per_local_expert gives the group sizes.
  virtual Tensor dispatch(const Tensor& hidden, const Routing& routing, DispatchContext& ctx) = 0;
  // expert_output [R, H] -> [T, H]: probability-weighted sum of each token's rows.
  virtual Tensor combine(const Tensor& expert_output, DispatchContext& ctx) = 0;
  // grad_output [T, H] -> d expert_output [R, H] (new tensor); grad_probs [T, topk] F32/F64 is
  // overwritten with d(objective)/d(routing.probs) (zero for dropped slots).
  virtual Tensor combine_backward(const Tensor& grad_output, DispatchContext& ctx,
                                  Tensor& grad_probs) = 0;
  // grad_expert_input [R, H] -> d hidden [T, H] (new tensor): sum over each token's rows.
  virtual Tensor dispatch_backward(const Tensor& grad_expert_input, DispatchContext& ctx) = 0;

  // Bytes of hidden rows (activations and their gradients) this rank has handed to the expert
  // parallel exchanges since construction: the whole send buffer of each all-to-all over ep,
  // and of each all-gather and reduce-scatter over tp x ep, this rank's own share included (the
  // etp exchanges and the routing all-gathers are not counted). 0 for local dispatchers.
  int64_t exchange_bytes() const { return exchange_bytes_; }

 protected:
  int64_t exchange_bytes_ = 0;
};

// All experts on this process. Capacity dropping (moe_expert_capacity_factor) follows
// Megatron's router (decide_capacity, capacity.h): capacity from this micro-batch's token count,
// policy and padding from the config.
class LocalTokenDispatcher : public TokenDispatcher {
 public:
  explicit LocalTokenDispatcher(const MoEConfig& config);
  const ExpertPlacement& placement() const override { return placement_; }
  Tensor dispatch(const Tensor& hidden, const Routing& routing, DispatchContext& ctx) override;
  Tensor combine(const Tensor& expert_output, DispatchContext& ctx) override;
  Tensor combine_backward(const Tensor& grad_output, DispatchContext& ctx,
                          Tensor& grad_probs) override;
  Tensor dispatch_backward(const Tensor& grad_expert_input, DispatchContext& ctx) override;

 private:
  MoEConfig config_;
  ExpertPlacement placement_;
};

}  // namespace moe

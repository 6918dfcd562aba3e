#include "moe/moe/ep_dispatchers.h"

namespace moe {

ExpertPlacement expert_parallel_placement(int64_t num_experts, int ep_size, int ep_rank) {
  MOE_CHECK(num_experts > 0 && ep_size > 0 && ep_rank >= 0 && ep_rank < ep_size,
            "expert placement: num_experts (", num_experts, ") and ep size (", ep_size,
            ") must be positive and ep rank (", ep_rank, ") in [0, ep size)");
  MOE_CHECK(num_experts % ep_size == 0, "num_experts (", num_experts,
            ") is not divisible by expert_model_parallel_size (", ep_size, ")");
  const int64_t per_rank = num_experts / ep_size;
  return {num_experts, ep_rank * per_rank, per_rank};
}

std::unique_ptr<TokenDispatcher> make_token_dispatcher(const MoEConfig& config,
                                                       const comm::ParallelState& parallel) {
  if (parallel.sizes.ep == 1 && parallel.sizes.etp == 1) {
    return std::make_unique<LocalTokenDispatcher>(config);
  }
  switch (config.moe_token_dispatcher_type) {
    case TokenDispatcherType::kAllToAll:
      return std::make_unique<AllToAllTokenDispatcher>(config, parallel);
    case TokenDispatcherType::kAllGather:
      return std::make_unique<AllGatherTokenDispatcher>(config, parallel);
  }
  throw Error(detail::concat("make_token_dispatcher: unknown moe_token_dispatcher_type ",
                             int(config.moe_token_dispatcher_type)));
}

TopKRouter::AuxCountReducer make_aux_count_reducer(comm::ProcessGroup group) {
  return [group = std::move(group)](Tensor& tokens_per_expert, double& token_count) {
    // One all-reduce of [counts..., token count] in fp64: integer-valued, so the sum is exact.
    const int64_t n = tokens_per_expert.numel();
    Tensor packed = Tensor::empty({n + 1}, DType::F64);
    packed.rows(0, n).copy_from(tokens_per_expert.reshape({n}));
    packed.data<double>()[n] = token_count;
    comm::all_reduce(packed, group);
    tokens_per_expert.copy_from(packed.rows(0, n).reshape(tokens_per_expert.shape()));
    token_count = packed.data<double>()[n];
  };
}

}  // namespace moe

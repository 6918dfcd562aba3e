// Expert capacity and token dropping: every dispatcher's capacity decision (see capacity.h).
#include "moe/moe/capacity.h"

#include <algorithm>
#include <cmath>

#include "moe/internal.h"

namespace moe {

int64_t expert_capacity(int64_t num_tokens, int64_t topk, int64_t num_experts,
                        double capacity_factor) {
  MOE_CHECK(num_tokens >= 0 && topk > 0 && num_experts > 0 && capacity_factor > 0.0,
            "expert_capacity: num_tokens (", num_tokens, "), topk (", topk, "), num_experts (",
            num_experts, ") and capacity_factor (", capacity_factor, ") are out of range");
  return int64_t(std::ceil(double(num_tokens * topk) / double(num_experts) * capacity_factor));
}

std::vector<uint8_t> select_within_capacity(const Routing& routing, int64_t num_experts,
                                            int64_t capacity, TokenDropPolicy policy) {
  check_ndim(routing.experts, 2, "select_within_capacity experts");
  check_dtype(routing.experts, DType::I32, "select_within_capacity experts");
  MOE_CHECK(capacity >= 0, "select_within_capacity: capacity (", capacity, ") must be >= 0");
  const int64_t slots = routing.experts.numel();
  const int32_t* ids = routing.experts.data<int32_t>();
  std::vector<std::vector<int64_t>> slots_per_expert(static_cast<size_t>(num_experts));
  for (int64_t s = 0; s < slots; ++s) {
    MOE_CHECK(ids[s] >= 0 && ids[s] < num_experts, "select_within_capacity: slot ", s,
              " names expert ", ids[s], ", outside [0, ", num_experts, ")");
    slots_per_expert[size_t(ids[s])].push_back(s);  // token order
  }
  std::vector<uint8_t> keep(size_t(slots), 0);
  internal::with_compute_type(routing.probs.dtype(), [&](auto tag) {
    using C = decltype(tag);
    const C* probs = routing.probs.data<C>();
    for (auto& list : slots_per_expert) {
      if (int64_t(list.size()) > capacity && policy == TokenDropPolicy::kProbs) {
        // The `capacity` highest probabilities first; the lower token index (= lower slot) wins
        // ties. Only the kept prefix needs ordering.
        std::partial_sort(list.begin(), list.begin() + capacity, list.end(),
                          [&](int64_t a, int64_t b) {
                            return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
                          });
      }
      size_t kept = size_t(std::min<int64_t>(capacity, int64_t(list.size())));
      for (size_t i = 0; i < kept; ++i) keep[size_t(list[i])] = 1;
    }
  });
  return keep;
}

int64_t expert_choice_capacity(int64_t num_tokens, int64_t num_experts, double capacity_factor) {
  MOE_CHECK(num_tokens >= 0 && num_experts > 0 && capacity_factor > 0.0,
            "expert_choice_capacity: num_tokens (", num_tokens, "), num_experts (", num_experts,
            ") and capacity_factor (", capacity_factor, ") are out of range");
  const double share = std::ceil(double(num_tokens) * capacity_factor / double(num_experts));
  return std::min(num_tokens, int64_t(share));
}

CapacityDecision decide_capacity(const MoEConfig& config, const Routing& routing) {
  CapacityDecision decision;
  if (!config.moe_expert_capacity_factor) return decision;
  if (config.moe_router_type == RouterType::kExpertChoice) {
    return decide_expert_choice(config, routing);
  }
  int64_t capacity = expert_capacity(routing.num_tokens, routing.topk, config.num_experts,
                                     *config.moe_expert_capacity_factor);
  decision.keep =
      select_within_capacity(routing, config.num_experts, capacity, config.moe_token_drop_policy);
  if (config.moe_pad_expert_input_to_capacity) decision.pad_rows_to = capacity;
  return decision;
}

CapacityDecision decide_group_capacity(const MoEConfig& config, const Routing& group_routing,
                                       std::span<const int64_t> tokens_per_rank) {
  if (config.moe_capacity_scope == CapacityScope::kGroup || !config.moe_expert_capacity_factor) {
    return decide_capacity(config, group_routing);
  }
  CapacityDecision decision;
  int64_t first = 0;
  for (int64_t tokens : tokens_per_rank) {
    Routing block;
    block.num_tokens = tokens;
    block.topk = group_routing.topk;
    block.experts = group_routing.experts.rows(first, first + tokens);
    block.probs = group_routing.probs.rows(first, first + tokens);
    CapacityDecision own = decide_capacity(config, block);
    decision.keep.insert(decision.keep.end(), own.keep.begin(), own.keep.end());
    decision.pad_rows_to += own.pad_rows_to;
    first += tokens;
  }
  MOE_CHECK(first == group_routing.num_tokens,
            "decide_group_capacity: the ranks' token counts sum to ", first,
            " but the group's routing has ", group_routing.num_tokens, " tokens");
  return decision;
}

CapacityDecision decide_expert_choice(const MoEConfig& config, const Routing& routing) {
  MOE_CHECK(
      config.moe_router_type == RouterType::kExpertChoice && config.moe_expert_capacity_factor,
      "decide_expert_choice: needs moe_router_type expert_choice with "
      "moe_expert_capacity_factor");
  MOE_CHECK(routing.topk == config.num_experts, "decide_expert_choice: the routing has ",
            routing.topk, " slots per token, expert choice needs one per expert (",
            config.num_experts, ")");
  const int64_t capacity = expert_choice_capacity(routing.num_tokens, config.num_experts,
                                                  *config.moe_expert_capacity_factor);
  CapacityDecision decision;
  decision.keep =
      select_within_capacity(routing, config.num_experts, capacity, TokenDropPolicy::kProbs);
  if (config.moe_pad_expert_input_to_capacity) decision.pad_rows_to = capacity;
  return decision;
}

}  // namespace moe

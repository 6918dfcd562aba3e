// Expert capacity and token dropping, Megatron's router-side moe_expert_capacity_factor: how many
// tokens an expert takes from a micro-batch, which (token, slot) pairs survive, and the rows
// every expert is padded to (moe_pad_expert_input_to_capacity). Expert choice's selection is the
// same step with one slot per (token, expert) (see expert_choice_router.h). Every dispatcher
// decides capacity through decide_capacity: the single-process one on its batch, the
// expert-parallel ones on the routing all-gathered over their group (see ep_dispatchers.h).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moe/moe/config.h"
#include "moe/moe/router.h"

namespace moe {

// Megatron's get_capacity for the router: ceil(num_tokens * topk / num_experts * factor).
int64_t expert_capacity(int64_t num_tokens, int64_t topk, int64_t num_experts,
                        double capacity_factor);

// The tokens each expert takes from a batch of num_tokens under expert choice:
// ceil(num_tokens * capacity_factor / num_experts), at most num_tokens (a factor above
// num_experts gives every expert every token).
int64_t expert_choice_capacity(int64_t num_tokens, int64_t num_experts, double capacity_factor);

// Which slots survive a per-expert capacity: keep[t * topk + j] is 1 or 0. Megatron's
// apply_router_token_dropping: an expert with more than `capacity` tokens keeps the ones with
// the largest probs (kProbs) or the earliest (kPosition); among equal probabilities the lower
// token index wins.
std::vector<uint8_t> select_within_capacity(const Routing& routing, int64_t num_experts,
                                            int64_t capacity, TokenDropPolicy policy);

// The slots each expert keeps under the config's capacity (empty when dropless), and the rows
// every expert is padded to (0 when not padding).
struct CapacityDecision {
  std::vector<uint8_t> keep;
  int64_t pad_rows_to = 0;
};

// Megatron's router-side token dropping for a micro-batch of routing.num_tokens tokens: the
// capacity from the token count, policy and padding from the config; expert choice's choice
// (decide_expert_choice) for moe_router_type expert_choice.
CapacityDecision decide_capacity(const MoEConfig& config, const Routing& routing);

// The decision for an expert-parallel group's batch: group_routing holds the ranks' tokens in
// group-rank order, tokens_per_rank[r] of them from rank r. moe_capacity_scope group:
// decide_capacity on the whole batch (the same kept slots whatever the ep size). rank:
// decide_capacity on each rank's block alone, capacity from that rank's token count, as
// Megatron's router drops before dispatch; keep is the blocks' flags in order and pad_rows_to
// the sum of the ranks' capacities (each rank pads every expert to its own capacity).
CapacityDecision decide_group_capacity(const MoEConfig& config, const Routing& group_routing,
                                       std::span<const int64_t> tokens_per_rank);

// The experts' choice on a routing of config.routing_slots() slots per token (the whole group's
// batch): keep[t * E + j] is 1 when expert experts[t, j] takes token t; every expert keeps
// expert_choice_capacity(routing.num_tokens, ...) tokens; pad_rows_to is that capacity with
// moe_pad_expert_input_to_capacity (which then adds no row), else 0.
CapacityDecision decide_expert_choice(const MoEConfig& config, const Routing& routing);

}  // namespace moe

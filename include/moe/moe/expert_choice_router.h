// Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"),
// moecore's --moe-router-type expert_choice: every token scores every expert with a softmax over
// the experts of its router logits, and every expert takes the C tokens with the highest scores,
// C = min(T, ceil(T * moe_expert_capacity_factor / num_experts)). A token may be taken by zero,
// one or several experts; the combine weight of (token, expert) is the token's score for it.
//
// Representation: a Routing with num_experts slots per token (MoEConfig::routing_slots), slot
// j holding expert experts[t, j] with probs[t, j] its softmax score, and the unpicked slots
// dropped by the capacity step the dispatchers already run for moe_expert_capacity_factor.
// With a slot for every (token, expert) pair, "expert e keeps its C highest-probability slots,
// the lower token first among equal ones" (select_within_capacity with the probs policy) IS the
// expert's choice, so:
//   - the scoring is the TopKRouter with top-k = num_experts and the softmax over all experts
//     (expert_choice_scoring_config): same parameters and checkpoint names, jitter, z-loss,
//     and its backward carries d(scores) of the chosen slots to the logits, the router weight
//     and bias (dropped slots get zero gradient from the combine);
//   - the choice (decide_expert_choice, capacity.h) runs where capacity is decided: on the single
//   process's
//     batch in LocalTokenDispatcher, and on the routing all-gathered over the tp-ep group in the
//     all-to-all and all-gather dispatchers, each rank keeping its own tokens' slots, so the
//     group's batch (tokens in group-rank order) is chosen over whatever the ep size, and the
//     outputs and gradients do not depend on it;
//   - dispatch, expert computation, combine and their backwards are the top-k path's, unchanged.
// Choosing inside the router instead would need the router to all-gather over the ep group,
// which the dispatchers already do for capacity.
//
// Cost: the dispatchers move only the chosen rows; the routing all-gathered for the choice is
// [T, num_experts] ids and scores.
#pragma once

#include "moe/moe/capacity.h"
#include "moe/moe/config.h"

namespace moe {

// The TopKRouter configuration that scores every expert of every token for expert choice:
// top-k = num_experts, softmax over all experts, no scaling, no load-balancing loss. config must
// have moe_router_type expert_choice and be valid.
MoEConfig expert_choice_scoring_config(const MoEConfig& config);

// MoEConfig::validate's rules for moe_router_type expert_choice: moe_expert_capacity_factor is
// required (so Sinkhorn, which refuses a capacity, is out); the top-k-only settings (sigmoid
// scores, pre-softmax, top-k scaling, the position drop policy) and a load-balancing (aux) loss
// are refused, since every expert takes the same number of tokens by construction. The z-loss
// and input jitter work as with top-k. moe_router_topk is not used.
void validate_expert_choice(const MoEConfig& config);

}  // namespace moe

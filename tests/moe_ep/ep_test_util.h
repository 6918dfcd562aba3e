// Shared helpers of the expert-parallel tests: one ParallelState per ep size (built once per
// program) and the layout's global token order.
#pragma once

#include <map>

#include "moe/comm/parallel_state.h"
#include "moe/tensor/tensor.h"

namespace moe::testing {

// The ep sizes this world can run: 1, 2, 4, 8 that divide the world size.
inline std::vector<int> ep_sizes(int world_size) {
  std::vector<int> sizes;
  for (int ep : {1, 2, 4, 8}) {
    if (world_size % ep == 0) sizes.push_back(ep);
  }
  return sizes;
}

// initialize_model_parallel({ep, etp}) once per layout (group creation is collective).
inline const comm::ParallelState& parallel_state(int ep, int etp = 1) {
  static std::map<std::pair<int, int>, comm::ParallelState> states;
  auto found = states.find({ep, etp});
  if (found != states.end()) return found->second;
  comm::ParallelSizes sizes;
  sizes.ep = ep;
  sizes.etp = etp;
  return states.emplace(std::pair{ep, etp}, comm::initialize_model_parallel(sizes)).first->second;
}

// Tokens held by a world rank: uneven on purpose (Megatron's are equal; ours may differ).
inline int64_t tokens_of_rank(int world_rank) {
  return 6 + world_rank % 5;
}

// How many tokens each world rank holds.
using TokensOfRank = int64_t (*)(int world_rank);

// The group's batch: this rank's first token and the total, in group-rank order.
struct GroupTokens {
  int64_t first = 0;
  int64_t total = 0;
};
inline GroupTokens group_tokens(const comm::ProcessGroup& group,
                                TokensOfRank tokens_of = tokens_of_rank) {
  GroupTokens tokens;
  for (int r = 0; r < group.size(); ++r) {
    if (r == group.rank()) tokens.first = tokens.total;
    tokens.total += tokens_of(group.world_ranks()[size_t(r)]);
  }
  return tokens;
}

}  // namespace moe::testing

// Per-expert token load for the training log: a TokenDispatcher decorator that counts the rows
// each local expert receives, so the loop can show how balanced the routing is without the model
// exposing its MoE internals.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "moe/moe/token_dispatcher.h"

namespace moe::train {

// Tokens dispatched to each expert since the last reset() (capacity padding not counted),
// counted on this rank.
class ExpertLoadCounter {
 public:
  explicit ExpertLoadCounter(int64_t num_experts) : counts_(size_t(num_experts), 0) {}
  void add(const ExpertPlacement& placement, const std::vector<int64_t>& tokens_per_local_expert);
  void reset() { std::fill(counts_.begin(), counts_.end(), 0); }
  // Counts summed over every rank of `world`, each divided by their mean (1.0 = even share);
  // empty when no token was dispatched. Collective over `world`. Ranks that hold a copy of the
  // same expert (tensor-parallel shards) scale every count alike, which the division cancels.
  std::vector<double> relative_load(const comm::ProcessGroup& world) const;

 private:
  std::vector<int64_t> counts_;  // [num_experts]
};

// Wraps every MoE layer's dispatcher (made by `inner`) so it reports to `counter`.
model::DispatcherFactory counting_dispatcher_factory(std::shared_ptr<ExpertLoadCounter> counter,
                                                     model::DispatcherFactory inner);

}  // namespace moe::train

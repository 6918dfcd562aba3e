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

// Tokens dispatched to each expert of each layer since the last reset() (capacity padding not
// counted), counted on this rank.
class ExpertLoadCounter {
 public:
  ExpertLoadCounter(int num_layers, int64_t num_experts)
      : num_experts_(num_experts), counts_(size_t(num_layers) * size_t(num_experts), 0) {}
  void add(int layer, const ExpertPlacement& placement,
           const std::vector<int64_t>& tokens_per_local_expert);
  void reset() { std::fill(counts_.begin(), counts_.end(), 0); }

  // Counts summed over every rank of `world` (so every pipeline stage's layers are in), each
  // divided by the mean of what it is compared with (1.0 = an even share). Ranks that hold a copy
  // of the same expert (tensor-parallel shards) scale every count alike, which the division
  // cancels. Collective over `world`.
  struct Loads {
    std::vector<double> overall;                 // [E] summed over layers; empty if no tokens
    std::vector<std::vector<double>> per_layer;  // [layers][E]; a layer without tokens: empty
  };
  Loads relative_loads(const comm::ProcessGroup& world) const;

 private:
  int64_t num_experts_;
  std::vector<int64_t> counts_;  // [layers * num_experts]
};

// Wraps every MoE layer's dispatcher (made by `inner`) so it reports to `counter`.
model::DispatcherFactory counting_dispatcher_factory(std::shared_ptr<ExpertLoadCounter> counter,
                                                     model::DispatcherFactory inner);

}  // namespace moe::train

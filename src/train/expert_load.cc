#include "expert_load.h"

#include <algorithm>
#include <numeric>

#include "moe/comm/process_group.h"

namespace moe::train {
namespace {

class CountingDispatcher final : public TokenDispatcher {
 public:
  CountingDispatcher(std::unique_ptr<TokenDispatcher> inner,
                     std::shared_ptr<ExpertLoadCounter> counter, int layer)
      : inner_(std::move(inner)), counter_(std::move(counter)), layer_(layer) {}

  const ExpertPlacement& placement() const override { return inner_->placement(); }
  Tensor dispatch(const Tensor& hidden, const Routing& routing, DispatchContext& ctx) override {
    Tensor rows = inner_->dispatch(hidden, routing, ctx);
    counter_->add(layer_, inner_->placement(), ctx.unpadded_tokens_per_local_expert);
    return rows;
  }
  Tensor combine(const Tensor& expert_output, DispatchContext& ctx) override {
    return inner_->combine(expert_output, ctx);
  }
  Tensor combine_backward(const Tensor& grad_output, DispatchContext& ctx,
                          Tensor& grad_probs) override {
    return inner_->combine_backward(grad_output, ctx, grad_probs);
  }
  Tensor dispatch_backward(const Tensor& grad_expert_input, DispatchContext& ctx) override {
    return inner_->dispatch_backward(grad_expert_input, ctx);
  }

 private:
  std::unique_ptr<TokenDispatcher> inner_;
  std::shared_ptr<ExpertLoadCounter> counter_;
  int layer_;
};

}  // namespace

void ExpertLoadCounter::add(int layer, const ExpertPlacement& placement,
                            const std::vector<int64_t>& tokens_per_local_expert) {
  const int64_t layers = int64_t(counts_.size()) / num_experts_;
  MOE_CHECK(layer >= 0 && layer < layers &&
                int64_t(tokens_per_local_expert.size()) == placement.count &&
                placement.first + placement.count <= num_experts_,
            "expert load: dispatcher of layer ", layer, " (of ", layers, ") reported ",
            tokens_per_local_expert.size(), " counts for local experts [", placement.first, ", ",
            placement.first + placement.count, ") of ", num_experts_);
  int64_t* counts = counts_.data() + layer * num_experts_;
  for (int64_t e = 0; e < placement.count; ++e) {
    counts[placement.first + e] += tokens_per_local_expert[size_t(e)];
  }
}

namespace {

// counts [E] / their mean; empty when they sum to zero.
std::vector<double> relative_to_mean(const double* counts, int64_t num_experts) {
  const double sum = std::accumulate(counts, counts + num_experts, 0.0);
  if (sum == 0) return {};
  const double mean = sum / double(num_experts);
  std::vector<double> load(static_cast<size_t>(num_experts));
  for (int64_t e = 0; e < num_experts; ++e) load[size_t(e)] = counts[e] / mean;
  return load;
}

}  // namespace

ExpertLoadCounter::Loads ExpertLoadCounter::relative_loads(const comm::ProcessGroup& world) const {
  const int64_t layers = int64_t(counts_.size()) / num_experts_;
  Tensor total({int64_t(counts_.size())}, DType::F64);  // [layers * E]
  std::copy(counts_.begin(), counts_.end(), total.data<double>());
  comm::all_reduce(total, world);
  const double* counts = total.data<double>();
  Loads loads;
  std::vector<double> summed(size_t(num_experts_), 0.0);
  for (int64_t layer = 0; layer < layers; ++layer) {
    const double* row = counts + layer * num_experts_;
    loads.per_layer.push_back(relative_to_mean(row, num_experts_));
    for (int64_t e = 0; e < num_experts_; ++e) summed[size_t(e)] += row[e];
  }
  loads.overall = relative_to_mean(summed.data(), num_experts_);
  return loads;
}

model::DispatcherFactory counting_dispatcher_factory(std::shared_ptr<ExpertLoadCounter> counter,
                                                     model::DispatcherFactory inner) {
  return [counter, inner](const MoEConfig& config, const comm::ParallelState& parallel,
                          int layer) -> std::unique_ptr<TokenDispatcher> {
    return std::make_unique<CountingDispatcher>(inner(config, parallel, layer), counter, layer);
  };
}

}  // namespace moe::train

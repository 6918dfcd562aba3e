#include "expert_load.h"

#include <algorithm>
#include <numeric>

#include "moe/comm/process_group.h"

namespace moe::train {
namespace {

class CountingDispatcher final : public TokenDispatcher {
 public:
  CountingDispatcher(std::unique_ptr<TokenDispatcher> inner,
                     std::shared_ptr<ExpertLoadCounter> counter)
      : inner_(std::move(inner)), counter_(std::move(counter)) {}

  const ExpertPlacement& placement() const override { return inner_->placement(); }
  Tensor dispatch(const Tensor& hidden, const Routing& routing, DispatchContext& ctx) override {
    Tensor rows = inner_->dispatch(hidden, routing, ctx);
    counter_->add(inner_->placement(), ctx.unpadded_tokens_per_local_expert);
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
};

}  // namespace

void ExpertLoadCounter::add(const ExpertPlacement& placement,
                            const std::vector<int64_t>& tokens_per_local_expert) {
  MOE_CHECK(int64_t(tokens_per_local_expert.size()) == placement.count &&
                placement.first + placement.count <= int64_t(counts_.size()),
            "expert load: dispatcher reported ", tokens_per_local_expert.size(),
            " counts for local experts [", placement.first, ", ", placement.first + placement.count,
            ") of ", counts_.size());
  for (int64_t e = 0; e < placement.count; ++e) {
    counts_[size_t(placement.first + e)] += tokens_per_local_expert[size_t(e)];
  }
}

std::vector<double> ExpertLoadCounter::relative_load(const comm::ProcessGroup& world) const {
  Tensor total({int64_t(counts_.size())}, DType::F64);
  std::copy(counts_.begin(), counts_.end(), total.data<double>());
  comm::all_reduce(total, world);
  const double* counts = total.data<double>();
  const double sum = std::accumulate(counts, counts + counts_.size(), 0.0);
  if (sum == 0) return {};
  const double mean = sum / double(counts_.size());
  std::vector<double> load(counts_.size());
  for (size_t e = 0; e < counts_.size(); ++e) load[e] = counts[e] / mean;
  return load;
}

model::DispatcherFactory counting_dispatcher_factory(std::shared_ptr<ExpertLoadCounter> counter,
                                                     model::DispatcherFactory inner) {
  return [counter, inner](const MoEConfig& config, const comm::ParallelState& parallel,
                          int layer) -> std::unique_ptr<TokenDispatcher> {
    return std::make_unique<CountingDispatcher>(inner(config, parallel, layer), counter);
  };
}

}  // namespace moe::train

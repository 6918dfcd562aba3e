// The expert-parallel token dispatchers on 2 (or more) ranks: one micro-batch's full round trip
// (dispatch, combine, combine_backward, dispatch_backward) of token rows of hidden size 1024,
// top-2 of 8 experts, uniform random routing. Measured side by side in one run:
//   - alltoall and allgather (moecore's AllToAllTokenDispatcher / AllGatherTokenDispatcher);
//   - local: LocalTokenDispatcher on the same rank's tokens, the same permutations with no
//     exchange (the lower bound);
//   - the all-gather dispatcher's bitwise premium: the reduce-scatter of [tokens * topk, H] slot
//     rows it does against the [tokens, H] partial sums Megatron reduce-scatters.
//
//   mpirun -np 2 build/bench/bench_ep_dispatch
//
// Every benchmark runs a fixed number of iterations, so all ranks run the same loops; rank 0
// reports.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/moe/ep_dispatchers.h"
#include "moe/tensor/rng.h"
#include "mpi_benchmark.h"

namespace {

constexpr int64_t kHidden = 1024, kExperts = 8, kTopk = 2;

const moe::comm::ParallelState& parallel() {
  static const moe::comm::ParallelState state = [] {
    moe::comm::ParallelSizes sizes;
    sizes.ep = moe::comm::ProcessGroup::world().size();
    return moe::comm::initialize_model_parallel(sizes);
  }();
  return state;
}

moe::MoEConfig config_for(moe::TokenDispatcherType type) {
  moe::MoEConfig config;
  config.hidden_size = kHidden;
  config.num_experts = kExperts;
  config.ffn_hidden_size = kHidden;
  config.moe_router_topk = kTopk;
  config.moe_token_dispatcher_type = type;
  return config;
}

struct MicroBatch {
  moe::Tensor hidden, grad_output;  // [tokens, kHidden]
  moe::Routing routing;
};

MicroBatch make_micro_batch(const benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const moe::DType dtype = state.range(1) == 0 ? moe::DType::F32 : moe::DType::BF16;
  moe::Rng rng(1234 + uint64_t(moe::comm::ProcessGroup::world().rank()));
  MicroBatch batch{
      moe::Tensor({tokens, kHidden}, dtype), moe::Tensor({tokens, kHidden}, dtype), {}};
  rng.fill_normal(batch.hidden, 0.0f, 1.0f);
  rng.fill_normal(batch.grad_output, 0.0f, 1.0f);
  batch.routing.num_tokens = tokens;
  batch.routing.topk = kTopk;
  batch.routing.experts = moe::Tensor({tokens, kTopk}, moe::DType::I32);
  batch.routing.probs = moe::Tensor::full({tokens, kTopk}, 0.5f);
  for (int64_t t = 0; t < tokens; ++t) {
    const auto first = int32_t(rng.below(kExperts));
    const auto second = int32_t((first + 1 + int64_t(rng.below(kExperts - 1))) % kExperts);
    batch.routing.experts.data<int32_t>()[t * kTopk] = first;
    batch.routing.experts.data<int32_t>()[t * kTopk + 1] = second;
  }
  return batch;
}

void round_trip(benchmark::State& state, moe::TokenDispatcher& dispatcher) {
  const MicroBatch batch = make_micro_batch(state);
  moe::Tensor grad_probs({batch.routing.num_tokens, kTopk});
  moe::comm::barrier(parallel().world);
  for (auto _ : state) {
    moe::DispatchContext ctx;
    moe::Tensor rows = dispatcher.dispatch(batch.hidden, batch.routing, ctx);
    moe::Tensor out = dispatcher.combine(rows, ctx);
    moe::Tensor grad_rows = dispatcher.combine_backward(batch.grad_output, ctx, grad_probs);
    moe::Tensor grad_hidden = dispatcher.dispatch_backward(grad_rows, ctx);
    benchmark::DoNotOptimize(grad_hidden.raw());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(batch.hidden.nbytes()));
}

void BM_RoundTrip_alltoall(benchmark::State& state) {
  moe::AllToAllTokenDispatcher dispatcher(config_for(moe::TokenDispatcherType::kAllToAll),
                                          parallel());
  round_trip(state, dispatcher);
}

void BM_RoundTrip_allgather(benchmark::State& state) {
  moe::AllGatherTokenDispatcher dispatcher(config_for(moe::TokenDispatcherType::kAllGather),
                                           parallel());
  round_trip(state, dispatcher);
}

void BM_RoundTrip_local(benchmark::State& state) {
  moe::LocalTokenDispatcher dispatcher(config_for(moe::TokenDispatcherType::kAllGather));
  round_trip(state, dispatcher);
}

// The combine's reduce-scatter over the group's batch: rows_per_token = topk (slot rows, what
// the all-gather dispatcher sends) or 1 (Megatron's partial sums).
void reduce_scatter(benchmark::State& state, int64_t rows_per_token) {
  const moe::comm::ProcessGroup& group = parallel().tp_ep_group;
  const MicroBatch batch = make_micro_batch(state);
  const int64_t home_rows = batch.routing.num_tokens * rows_per_token;
  moe::Tensor in({home_rows * group.size(), kHidden}, batch.hidden.dtype());
  moe::Tensor out({home_rows, kHidden}, batch.hidden.dtype());
  const std::vector<int64_t> rows(size_t(group.size()), home_rows);
  moe::comm::barrier(group);
  for (auto _ : state) moe::comm::reduce_scatter_v(in, out, rows, group);
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(batch.hidden.nbytes()));
}

void BM_ReduceScatter_slot_rows(benchmark::State& state) {
  reduce_scatter(state, kTopk);
}
void BM_ReduceScatter_partial_sums(benchmark::State& state) {
  reduce_scatter(state, 1);
}

// Median-time ratios against the local round trip and between the two reduce-scatters.
void print_ratios(const moe::bench::Medians& medians) {
  std::printf("\nmedian time ratios (same sizes, same run):\n");
  const std::pair<std::string, std::string> pairs[] = {
      {"BM_RoundTrip_alltoall", "BM_RoundTrip_local"},
      {"BM_RoundTrip_allgather", "BM_RoundTrip_local"},
      {"BM_RoundTrip_allgather", "BM_RoundTrip_alltoall"},
      {"BM_ReduceScatter_slot_rows", "BM_ReduceScatter_partial_sums"}};
  for (const auto& [name, seconds] : medians) {
    for (const auto& [numerator, denominator] : pairs) {
      if (name.rfind(numerator + "/", 0) != 0) continue;
      const std::string sizes = name.substr(numerator.size());
      auto found = medians.find(denominator + sizes);
      if (found == medians.end()) continue;
      std::printf("  %-28s / %-30s %-22s %.2f\n", numerator.c_str() + 3, denominator.c_str() + 3,
                  sizes.c_str(), seconds / found->second);
    }
  }
}

void register_benchmarks() {
  using Function = void (*)(benchmark::State&);
  const std::pair<const char*, Function> ways[] = {
      {"BM_RoundTrip_local", BM_RoundTrip_local},
      {"BM_RoundTrip_alltoall", BM_RoundTrip_alltoall},
      {"BM_RoundTrip_allgather", BM_RoundTrip_allgather},
      {"BM_ReduceScatter_slot_rows", BM_ReduceScatter_slot_rows},
      {"BM_ReduceScatter_partial_sums", BM_ReduceScatter_partial_sums}};
  for (int64_t tokens : {512, 2048}) {
    for (int64_t bf16 : {0, 1}) {
      for (auto [name, function] : ways) {
        moe::bench::register_fixed_iterations(name, function, tokens, bf16,
                                              tokens >= 2048 ? 10 : 40, benchmark::kMillisecond);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  return moe::bench::run_mpi_benchmarks(argc, argv, register_benchmarks, print_ratios);
}

// MoE layer forward+backward time next to the time of its GEMMs alone, and its peak extra
// memory.
//
// moe_layer/fwd_bwd: T = 4096 tokens, hidden 1024, ffn 2048 (SwiGLU, fc1 1024 -> 4096), 8
// experts, top-2, fp32, no biases, grouped GEMM. Each iteration runs the layer (timed), then the
// same grouped GEMMs on the same group sizes (fc1 and fc2 forward, grad-input and grad-weight,
// and the router's three products), timed right after it, so the ratio layer / GEMMs stays
// meaningful on a loaded machine. "Time" is the layer's wall time; counters: layer_cpu_ms (the
// process CPU time of the layer, all threads, less sensitive to other programs than wall time),
// gemm_ms, layer_over_gemm, non_gemm_fraction.
//
// moe_layer/permute_rows, moe_layer/unpermute_rows_weighted: the fused row kernels against a
// memcpy of the same output bytes.
//
// moe_layer/peak_memory/<T>/<E>: resident-memory high-water mark of one forward+backward above
// what was resident before it (inputs, weights and gradient buffers already allocated), in MiB
// and in units of T * topk * hidden * 4 bytes. It should not grow with the expert count.
#include <benchmark/benchmark.h>
#include <malloc.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "moe/moe/moe_layer.h"
#include "moe/moe/permutation.h"
#include "moe/tensor/gemm.h"
#include "moe/tensor/rng.h"
#include "stopwatch.h"

namespace moe {
namespace {

constexpr int64_t kTopk = 2;

MoEConfig bench_config(int64_t hidden, int64_t ffn, int64_t experts) {
  MoEConfig config;
  config.hidden_size = hidden;
  config.ffn_hidden_size = ffn;
  config.num_experts = experts;
  config.moe_router_topk = kTopk;
  config.activation = ExpertActivation::kSwiGLU;
  config.add_bias_linear = false;
  config.moe_grouped_gemm = true;
  config.moe_aux_loss_coeff = 1e-2;  // the aux loss is part of the work, as in training
  return config;
}

struct LayerSetup {
  LayerSetup(int64_t tokens, int64_t hidden, int64_t ffn, int64_t experts)
      : config(bench_config(hidden, ffn, experts)),
        store(DType::F32),
        layer(config, store, "mlp"),
        hidden_states({tokens, hidden}),
        grad_output({tokens, hidden}) {
    store.allocate();
    layer.init_parameters(1, 0.02f, 0.02f);
    Rng rng(2);
    rng.fill_normal(hidden_states, 0.0f, 1.0f);
    rng.fill_normal(grad_output, 0.0f, 1e-3f);
  }
  void forward_backward(MoEContext& ctx) {
    Tensor out = layer.forward(hidden_states, ctx);
    benchmark::DoNotOptimize(out.raw());
    Tensor grad = layer.backward(ctx, grad_output);
    benchmark::DoNotOptimize(grad.raw());
  }
  MoEConfig config;
  ParameterStore store;
  MoELayer layer;
  Tensor hidden_states, grad_output;
};

// The layer's GEMMs on the same operand shapes and group sizes, in the same dtype.
struct GemmOnly {
  GemmOnly(const LayerSetup& setup, const std::vector<int64_t>& groups)
      : groups(groups), experts(setup.layer.experts()) {
    const MoEConfig& c = setup.config;
    int64_t rows = 0;
    for (int64_t g : groups) rows += g;
    const int64_t H = c.hidden_size, F = c.expert_ffn_hidden_size(), N1 = c.fc1_output_size();
    const int64_t T = setup.hidden_states.dim(0), E = c.num_experts;
    x = Tensor({rows, H});
    fc1_out = Tensor({rows, N1});
    act = Tensor({rows, F});
    y = Tensor({rows, H});
    router_weight = Tensor({H, E});
    logits = Tensor({T, E});
    Rng rng(3);
    for (Tensor* t : {&x, &fc1_out, &act, &y, &router_weight}) rng.fill_normal(*t, 0.0f, 1.0f);
    tokens = setup.hidden_states;
    tokens_grad = Tensor(tokens.shape());
    fc1_grad = Tensor({E, H, N1});
    fc2_grad = Tensor({E, F, H});
    router_grad = Tensor({H, E});
  }
  void run() {
    Tensor fc1 = experts.fc1_weight().reshape(fc1_grad.shape()), fc2 = experts.fc2_weight();
    // forward
    linear_forward(tokens, router_weight, logits);
    grouped_gemm(GemmForm::kForward, x, fc1, groups, fc1_out, false);
    grouped_gemm(GemmForm::kForward, act, fc2, groups, y, false);
    // backward
    grouped_gemm(GemmForm::kGradWeight, act, y, groups, fc2_grad, true);
    grouped_gemm(GemmForm::kGradInput, y, fc2, groups, act, false);
    grouped_gemm(GemmForm::kGradWeight, x, fc1_out, groups, fc1_grad, true);
    grouped_gemm(GemmForm::kGradInput, fc1_out, fc1, groups, x, false);
    linear_grad_weight(tokens, logits, router_grad, true);
    linear_grad_input(logits, router_weight, tokens_grad, false);
    benchmark::DoNotOptimize(x.raw());
  }
  std::vector<int64_t> groups;
  const Experts& experts;
  Tensor x, fc1_out, act, y, router_weight, logits, tokens, tokens_grad;
  Tensor fc1_grad, fc2_grad, router_grad;
};

using bench::Stopwatch;

void BM_MoELayerForwardBackward(benchmark::State& state) {
  LayerSetup setup(4096, 1024, 2048, 8);
  MoEContext ctx;
  setup.forward_backward(ctx);  // warm-up; also gives the group sizes for the GEMM-only run
  Tensor out = setup.layer.forward(setup.hidden_states, ctx);
  std::vector<int64_t> groups = ctx.dispatch.tokens_per_local_expert;
  setup.layer.backward(ctx, setup.grad_output);
  GemmOnly gemms(setup, groups);
  double layer_total = 0.0, gemm_total = 0.0, layer_cpu = 0.0;
  for (auto _ : state) {
    Stopwatch layer_watch;
    setup.forward_backward(ctx);
    double layer_seconds = layer_watch.wall_seconds();
    layer_cpu += layer_watch.cpu_seconds();
    Stopwatch gemm_watch;
    gemms.run();
    double gemm_seconds = gemm_watch.wall_seconds();
    state.SetIterationTime(layer_seconds);
    layer_total += layer_seconds;
    gemm_total += gemm_seconds;
  }
  double iterations = double(state.iterations());
  state.counters["layer_cpu_ms"] = 1e3 * layer_cpu / iterations;
  state.counters["gemm_ms"] = 1e3 * gemm_total / iterations;
  state.counters["layer_over_gemm"] = layer_total / gemm_total;
  state.counters["non_gemm_fraction"] = 1.0 - gemm_total / layer_total;
  double flops =
      3.0 * (grouped_gemm_flops(groups, 1024, 4096) + grouped_gemm_flops(groups, 2048, 1024));
  state.counters["GFLOP/s"] = flops * iterations / layer_total * 1e-9;
}
BENCHMARK(BM_MoELayerForwardBackward)
    ->Name("moe_layer/fwd_bwd/T4096_H1024_F2048_E8_top2_fp32")
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);

// The fused row kernels on the benchmark's shapes (8192 rows of 1024 fp32 from 4096 tokens),
// next to one memcpy of the same output bytes timed in the same iteration: copy_ratio is the
// kernel's time over memcpy's (1 would be a pure copy).
void BM_PermuteKernels(benchmark::State& state) {
  const bool unpermute = state.range(0) == 1;
  const int64_t tokens = 4096, hidden = 1024, experts = 8;
  Routing routing;
  routing.num_tokens = tokens;
  routing.topk = kTopk;
  routing.experts = Tensor({tokens, kTopk}, DType::I32);
  routing.probs = Tensor::full({tokens, kTopk}, 0.5f);
  for (int64_t t = 0; t < tokens; ++t) {
    routing.experts.data<int32_t>()[t * kTopk] = int32_t(t % experts);
    routing.experts.data<int32_t>()[t * kTopk + 1] = int32_t((t * 7 + 3) % experts);
    if (routing.experts.data<int32_t>()[t * kTopk + 1] == t % experts) {
      routing.experts.data<int32_t>()[t * kTopk + 1] = int32_t((t + 1) % experts);
    }
  }
  DispatchPlan plan = build_dispatch_plan(routing.experts, experts, 0, experts);
  Tensor token_rows({tokens, hidden}), expert_rows({plan.num_rows(), hidden});
  Rng(4).fill_normal(token_rows, 0.0f, 1.0f);
  Rng(5).fill_normal(expert_rows, 0.0f, 1.0f);
  Tensor& output = unpermute ? token_rows : expert_rows;
  std::vector<float> copy_target(size_t(output.numel()));
  double kernel_total = 0.0, copy_total = 0.0;
  for (auto _ : state) {
    Stopwatch kernel_watch;
    if (unpermute) {
      unpermute_rows(expert_rows, plan, routing.probs, token_rows);
    } else {
      permute_rows(token_rows, plan, Tensor(), expert_rows);
    }
    double kernel_seconds = kernel_watch.wall_seconds();
    Stopwatch copy_watch;
    std::memcpy(copy_target.data(), output.raw(), output.nbytes());
    benchmark::DoNotOptimize(copy_target.data());
    copy_total += copy_watch.wall_seconds();
    kernel_total += kernel_seconds;
    state.SetIterationTime(kernel_seconds);
  }
  state.counters["copy_ratio"] = kernel_total / copy_total;
  state.counters["GB/s_read+written"] = double(state.iterations()) *
                                        double(token_rows.nbytes() + expert_rows.nbytes()) /
                                        kernel_total * 1e-9;
}
BENCHMARK(BM_PermuteKernels)
    ->Name("moe_layer/permute_rows/T4096_top2_H1024_fp32")
    ->Arg(0)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PermuteKernels)
    ->Name("moe_layer/unpermute_rows_weighted/T4096_top2_H1024_fp32")
    ->Arg(1)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

// Resident set size and its high-water mark, in bytes (Linux /proc/self/status).
int64_t status_kib(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  }
  return -1;
}

void BM_MoELayerPeakMemory(benchmark::State& state) {
  const int64_t tokens = state.range(0), experts = state.range(1), hidden = 1024, ffn = 512;
  LayerSetup setup(tokens, hidden, ffn, experts);
  double extra_bytes = 0.0;
  for (auto _ : state) {
    MoEContext ctx;
    // Reset the high-water mark to the current resident size (writing 5 to clear_refs).
    std::ofstream("/proc/self/clear_refs") << "5";
    int64_t before = status_kib("VmRSS");
    setup.forward_backward(ctx);
    extra_bytes = double(status_kib("VmHWM") - before) * 1024.0;
  }
  state.counters["peak_extra_MiB"] = extra_bytes / (1 << 20);
  state.counters["per_T_topk_H_fp32"] = extra_bytes / (double(tokens * kTopk * hidden) * 4.0);
}
BENCHMARK(BM_MoELayerPeakMemory)
    ->Name("moe_layer/peak_memory/H1024_F512")
    ->ArgNames({"T", "E"})
    ->Args({2048, 8})
    ->Args({4096, 8})
    ->Args({4096, 32})
    ->Args({8192, 32})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  // Every allocation of 1 MiB or more gets its own mapping, returned to the system when freed,
  // so the resident high-water mark follows the live large buffers (set before any allocation,
  // so no benchmark inherits reusable heap pages from another).
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 20);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

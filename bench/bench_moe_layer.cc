// MoE layer forward+backward time, the time of its work outside GEMMs, and its peak extra memory.
//
// moe_layer/fwd_bwd: T = 4096 tokens, hidden 1024, ffn 2048 (SwiGLU, fc1 1024 -> 4096), 8
// experts, top-2, fp32, no biases, grouped GEMM, aux loss on. Each iteration (a repetition) runs,
// back to back:
//   1. the layer's forward+backward: wall time (the reported "Time"), process CPU time, minor page
//      faults;
//   2. its GEMMs alone on the same shapes and group sizes, into buffers allocated once: the expert
//      GEMMs (fc1 and fc2 forward, grad-input, grad-weight) and the router's three products;
//   3. three times over, its work outside GEMMs phase by phase, through the public functions
//      the layer calls, on the same shapes: router forward+backward (less its three products,
//      timed right after), dispatch (plan + permute), allocating the experts' GEMM outputs (the
//      cost of the first touch of their pages included), SwiGLU, combine, combine backward,
//      SwiGLU backward, dispatch backward.
// Counters are medians over the samples, so a time slice lost to another program in one sample
// does not move them:
//   non_gemm_ms         the sum of the phases' medians (phase_<name>_ms each, at least 0): the
//                       headline;
//   non_gemm_fraction   non_gemm_ms / layer_ms; layer_ms, gemm_ms, layer_over_gemm = their ratio;
//   non_gemm_cpu_ms, non_gemm_cpu_fraction, layer_cpu_ms, gemm_cpu_ms: the same in process CPU
//                       time (all threads); layer_cpu_mean_ms: the mean, as the PyTorch peer's;
//   non_gemm_fastest_ms the same sum with each phase's fastest sample (less the fastest of what is
//                       taken off it): nearer what the phases cost with the machine to themselves
//                       when other programs come and go;
//   non_gemm_ms_by_difference (and _cpu_): layer - GEMMs, the cross-check that misses nothing the
//                       phases might, but swings with the machine's load;
//   layer_page_faults   minor page faults in one forward+backward.
//
// moe_layer/permute_rows, moe_layer/unpermute_rows_weighted: the fused row kernels against a
// memcpy of the same output bytes.
//
// moe_layer/peak_memory/<T>/<E>: resident-memory high-water mark of one forward+backward above
// what was resident before it (inputs, weights and gradient buffers already allocated), with the
// tensor storage cache off, in MiB and in units of T * topk * hidden * 4 bytes; it should not grow
// with the expert count. cache_kept_MiB: what the cache (on) keeps after a forward+backward for
// the next one to reuse.
#include <benchmark/benchmark.h>
#include <malloc.h>
#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "moe/moe/moe_layer.h"
#include "moe/moe/permutation.h"
#include "moe/tensor/gemm.h"
#include "moe/tensor/ops.h"
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
  void run_experts() {
    Tensor fc1 = experts.fc1_weight().reshape(fc1_grad.shape()), fc2 = experts.fc2_weight();
    grouped_gemm(GemmForm::kForward, x, fc1, groups, fc1_out, false);
    grouped_gemm(GemmForm::kForward, act, fc2, groups, y, false);
    grouped_gemm(GemmForm::kGradWeight, act, y, groups, fc2_grad, true);
    grouped_gemm(GemmForm::kGradInput, y, fc2, groups, act, false);
    grouped_gemm(GemmForm::kGradWeight, x, fc1_out, groups, fc1_grad, true);
    grouped_gemm(GemmForm::kGradInput, fc1_out, fc1, groups, x, false);
    benchmark::DoNotOptimize(x.raw());
  }
  void run_router() {
    linear_forward(tokens, router_weight, logits);
    linear_grad_weight(tokens, logits, router_grad, true);
    linear_grad_input(logits, router_weight, tokens_grad, false);
    benchmark::DoNotOptimize(tokens_grad.raw());
  }
  std::vector<int64_t> groups;
  const Experts& experts;
  Tensor x, fc1_out, act, y, router_weight, logits, tokens, tokens_grad;
  Tensor fc1_grad, fc2_grad, router_grad;
};

using bench::Stopwatch;

int64_t minor_page_faults() {
  rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// Writes one byte in every page, spread over the threads as the GEMM that fills the buffer
// would.
void touch_pages(Tensor& buffer) {
  auto* bytes = static_cast<char*>(buffer.raw());
  const int64_t pages = (int64_t(buffer.nbytes()) + 4095) / 4096;
#pragma omp parallel for schedule(static)
  for (int64_t page = 0; page < pages; ++page) bytes[page * 4096] = 0;
}

enum Phase {
  kRouter,  // forward + backward, less the router's products (timed in kRouterProducts)
  kDispatch,
  kExpertBuffers,
  kSwiGLU,
  kCombine,
  kCombineBackward,
  kSwiGLUBackward,
  kDispatchBackward,
  kPhases,
  // Not phases: timed beside one and taken off it.
  kRouterProducts = kPhases,  // the router's GEMMs, off kRouter
  kResidentTouch,             // touching the expert buffers again, off kExpertBuffers
  kTimedSlots
};
constexpr std::array<const char*, kPhases> kPhaseNames = {
    "router",  "dispatch",         "expert_buffers",  "swiglu",
    "combine", "combine_backward", "swiglu_backward", "dispatch_backward"};

// Seconds per phase, wall and process CPU time.
struct PhaseTimes {
  std::array<double, kTimedSlots> wall{}, cpu{};
  void add(Phase phase, const Stopwatch& watch) {
    wall[phase] += watch.wall_seconds();
    cpu[phase] += watch.cpu_seconds();
  }
};

// The layer's work outside GEMMs, phase by phase, with the calls MoELayer::forward/backward and
// Experts::forward/backward make; operands the GEMMs would produce are random tensors of their
// shapes.
struct NonGemmPhases {
  NonGemmPhases(const LayerSetup& setup, int64_t rows) {
    const MoEConfig& c = setup.config;
    const int64_t H = c.hidden_size, F = c.expert_ffn_hidden_size(), N1 = c.fc1_output_size();
    fc1_output = Tensor({rows, N1});
    grad_activation = Tensor({rows, F});
    expert_output = Tensor({rows, H});
    grad_rows = Tensor({rows, H});
    Rng rng(6);
    for (Tensor* t : {&fc1_output, &grad_activation, &expert_output, &grad_rows}) {
      rng.fill_normal(*t, 0.0f, 1.0f);
    }
  }

  // Times one pass over the phases into `times`; router_gemms runs (timed as kRouterProducts)
  // right after the router's backward.
  void run(LayerSetup& setup, GemmOnly& router_gemms, PhaseTimes& times) {
    const int64_t R = fc1_output.dim(0), H = setup.config.hidden_size;
    const int64_t F = grad_activation.dim(1), N1 = fc1_output.dim(1);
    TokenDispatcher& dispatcher = setup.layer.dispatcher();
    TopKRouter& router = setup.layer.router();
    auto timed = [&](Phase phase, auto&& body) {
      Stopwatch watch;
      body();
      times.add(phase, watch);
    };
    RouterContext router_ctx;
    DispatchContext dispatch_ctx;
    Routing routing;
    Tensor rows, fc1_out, output, activation, combined, grad_probs, grad_output_rows;
    Tensor grad_act, grad_input, grad_fc1, grad_hidden;
    // forward
    timed(kRouter, [&] { routing = router.forward(setup.hidden_states, router_ctx, true); });
    timed(kDispatch,
          [&] { rows = dispatcher.dispatch(setup.hidden_states, routing, dispatch_ctx); });
    fresh_buffers(times, {R, N1}, fc1_out, {R, H}, output);
    timed(kSwiGLU, [&] {
      activation = Tensor::empty({R, F});
      swiglu(fc1_output, activation);
    });
    timed(kCombine, [&] { combined = dispatcher.combine(expert_output, dispatch_ctx); });
    // backward
    timed(kCombineBackward, [&] {
      grad_probs = Tensor::empty(routing.probs.shape());
      grad_output_rows = dispatcher.combine_backward(setup.grad_output, dispatch_ctx, grad_probs);
    });
    fresh_buffers(times, {R, F}, grad_act, {R, H}, grad_input);
    timed(kSwiGLUBackward, [&] {
      grad_fc1 = Tensor::empty({R, N1});
      swiglu_backward(fc1_output, grad_activation, grad_fc1);
    });
    timed(kDispatchBackward,
          [&] { grad_hidden = dispatcher.dispatch_backward(grad_rows, dispatch_ctx); });
    timed(kRouter, [&] { router.backward(router_ctx, grad_probs, grad_hidden); });
    Stopwatch gemm_watch;
    router_gemms.run_router();
    times.add(kRouterProducts, gemm_watch);
  }

  // Allocates two GEMM outputs as the experts do and touches their pages (kExpertBuffers), then
  // touches them again (kResidentTouch, taken off): the phase is what the first touch costs beyond
  // touching resident pages, which the GEMM's own stores pay either way.
  static void fresh_buffers(PhaseTimes& times, Shape first_shape, Tensor& first, Shape second_shape,
                            Tensor& second) {
    Stopwatch fresh_watch;
    first = Tensor::empty(std::move(first_shape));
    touch_pages(first);
    second = Tensor::empty(std::move(second_shape));
    touch_pages(second);
    times.add(kExpertBuffers, fresh_watch);
    Stopwatch resident_watch;
    touch_pages(first);
    touch_pages(second);
    times.add(kResidentTouch, resident_watch);
  }

  Tensor fc1_output, grad_activation, expert_output, grad_rows;
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// Samples of one quantity in milliseconds, wall and process CPU time.
struct Samples {
  std::vector<double> wall, cpu;
  void add(double wall_seconds, double cpu_seconds) {
    wall.push_back(1e3 * wall_seconds);
    cpu.push_back(1e3 * cpu_seconds);
  }
};

// The phase sequence is short next to the layer: it runs this many times per repetition.
constexpr int kPhaseRounds = 3;

void BM_MoELayerForwardBackward(benchmark::State& state) {
  LayerSetup setup(4096, 1024, 2048, 8);
  MoEContext ctx;
  setup.forward_backward(ctx);  // warm-up; also gives the group sizes for the GEMM-only run
  Tensor out = setup.layer.forward(setup.hidden_states, ctx);
  std::vector<int64_t> groups = ctx.dispatch.tokens_per_local_expert;
  setup.layer.backward(ctx, setup.grad_output);
  GemmOnly gemms(setup, groups);
  NonGemmPhases phases(setup, gemms.x.dim(0));
  Samples layer, gemm, difference;
  std::array<Samples, kTimedSlots> phase;
  std::vector<double> faults;
  for (auto _ : state) {
    int64_t faults_before = minor_page_faults();
    Stopwatch layer_watch;
    setup.forward_backward(ctx);
    const double layer_wall = layer_watch.wall_seconds(), layer_cpu = layer_watch.cpu_seconds();
    faults.push_back(double(minor_page_faults() - faults_before));
    Stopwatch gemm_watch;
    gemms.run_experts();
    gemms.run_router();
    const double gemm_wall = gemm_watch.wall_seconds(), gemm_cpu = gemm_watch.cpu_seconds();
    for (int round = 0; round < kPhaseRounds; ++round) {
      PhaseTimes times;
      phases.run(setup, gemms, times);
      for (int p = 0; p < kTimedSlots; ++p) phase[size_t(p)].add(times.wall[p], times.cpu[p]);
    }
    state.SetIterationTime(layer_wall);
    layer.add(layer_wall, layer_cpu);
    gemm.add(gemm_wall, gemm_cpu);
    difference.add(layer_wall - gemm_wall, layer_cpu - gemm_cpu);
  }
  // A statistic of a phase's samples, less the same statistic of what is taken off it; at least
  // 0: a phase costs no less than nothing.
  auto estimate = [&](int p, bool cpu, double (*statistic)(std::vector<double>)) {
    auto samples = [&](int slot) {
      return cpu ? phase[size_t(slot)].cpu : phase[size_t(slot)].wall;
    };
    double ms = statistic(samples(p));
    if (p == kRouter) ms -= statistic(samples(kRouterProducts));
    if (p == kExpertBuffers) ms -= statistic(samples(kResidentTouch));
    return std::max(0.0, ms);
  };
  auto fastest = [](std::vector<double> values) {
    return *std::min_element(values.begin(), values.end());
  };
  double non_gemm = 0.0, non_gemm_cpu = 0.0, non_gemm_fastest = 0.0;
  for (int p = 0; p < kPhases; ++p) {
    double ms = estimate(p, false, median);
    state.counters[std::string("phase_") + kPhaseNames[size_t(p)] + "_ms"] = ms;
    non_gemm += ms;
    non_gemm_cpu += estimate(p, true, median);
    non_gemm_fastest += estimate(p, false, fastest);
  }
  const double layer_ms = median(layer.wall), gemm_ms = median(gemm.wall);
  state.counters["layer_ms"] = layer_ms;
  state.counters["layer_cpu_ms"] = median(layer.cpu);
  // The mean, as the PyTorch peer reports it (the mean wall time is the benchmark's Time).
  state.counters["layer_cpu_mean_ms"] =
      std::accumulate(layer.cpu.begin(), layer.cpu.end(), 0.0) / double(layer.cpu.size());
  state.counters["layer_page_faults"] = median(faults);
  state.counters["gemm_ms"] = gemm_ms;
  state.counters["gemm_cpu_ms"] = median(gemm.cpu);
  state.counters["non_gemm_ms"] = non_gemm;
  state.counters["non_gemm_cpu_ms"] = non_gemm_cpu;
  state.counters["non_gemm_fastest_ms"] = non_gemm_fastest;
  state.counters["non_gemm_fraction"] = non_gemm / layer_ms;
  state.counters["non_gemm_cpu_fraction"] = non_gemm_cpu / median(layer.cpu);
  state.counters["non_gemm_ms_by_difference"] = median(difference.wall);
  state.counters["non_gemm_cpu_ms_by_difference"] = median(difference.cpu);
  state.counters["layer_over_gemm"] = layer_ms / gemm_ms;
  double flops =
      3.0 * (grouped_gemm_flops(groups, 1024, 4096) + grouped_gemm_flops(groups, 2048, 1024));
  state.counters["GFLOP/s"] = flops / layer_ms * 1e-6;
}
BENCHMARK(BM_MoELayerForwardBackward)
    ->Name("moe_layer/fwd_bwd/T4096_H1024_F2048_E8_top2_fp32")
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(5);

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
  double extra_bytes = 0.0, kept_bytes = 0.0;
  for (auto _ : state) {
    MoEContext ctx;
    // The layer's own need: with the storage cache off, freed blocks go back to the system at
    // once, as they do without it.
    const size_t cache_limit = tensor_cache_stats().limit_bytes;
    set_tensor_cache_limit(0);
    // Fresh storage is zero pages until written: a first pass makes the gradient buffers resident.
    setup.forward_backward(ctx);
    // Reset the high-water mark to the current resident size (writing 5 to clear_refs).
    std::ofstream("/proc/self/clear_refs") << "5";
    int64_t before = status_kib("VmRSS");
    setup.forward_backward(ctx);
    extra_bytes = double(status_kib("VmHWM") - before) * 1024.0;
    // What the cache then keeps between steps for the next forward+backward to reuse.
    set_tensor_cache_limit(cache_limit);
    setup.forward_backward(ctx);
    kept_bytes = double(tensor_cache_stats().cached_bytes);
    release_tensor_cache();
  }
  state.counters["peak_extra_MiB"] = extra_bytes / (1 << 20);
  state.counters["per_T_topk_H_fp32"] = extra_bytes / (double(tokens * kTopk * hidden) * 4.0);
  state.counters["cache_kept_MiB"] = kept_bytes / (1 << 20);
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

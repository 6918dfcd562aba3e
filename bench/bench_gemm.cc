// Dense SGEMM and grouped GEMM throughput (GFLOP/s). Each grouped case also reports its rate as a
// fraction of one dense OpenBLAS SGEMM with the same total FLOPs, timed right after it in the same
// process: vs_dense from wall time, vs_dense_cpu from the process's CPU time (all threads).
//
// Cases: grouped/<shape>/<form>/<dtype>/<kernel>, with MoE-like K = 1024 (hidden), N = 2048 (ffn):
//   even        8 groups of 512 rows
//   skewed      8 groups, one with half of the 4096 rows
//   many_small  64 groups of 24..40 rows (2048 rows)
// forward and grad_input write the input dtype; grad_weight accumulates into fp32 (main grads).
// rows_per_expert/<dtype>/<kernel>/<rows> sweeps the rows per expert (8 experts, forward).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moe/tensor/gemm.h"
#include "moe/tensor/rng.h"
#include "stopwatch.h"

namespace moe {
namespace {

constexpr int64_t kHidden = 1024;  // K
constexpr int64_t kFfn = 2048;     // N

struct GroupShape {
  std::string name;
  std::vector<int64_t> rows;
};

std::vector<GroupShape> group_shapes() {
  std::vector<int64_t> skewed = {2048};
  for (int g = 0; g < 7; ++g) skewed.push_back(2048 / 7 + (g < 2048 % 7 ? 1 : 0));
  std::vector<int64_t> many_small(64);
  int64_t total = 0;
  for (int g = 0; g < 64; ++g) {
    many_small[g] = 24 + (g * 13) % 17;  // 24..40, a fixed uneven pattern
    total += many_small[g];
  }
  many_small[63] += 2048 - total;
  return {{"even", std::vector<int64_t>(8, 512)}, {"skewed", skewed}, {"many_small", many_small}};
}

int64_t total_rows(const std::vector<int64_t>& rows) {
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  return total;
}

Tensor random_tensor(const Shape& shape, DType dtype, uint64_t seed) {
  Tensor tensor(shape, dtype);
  Rng(seed).fill_uniform(tensor, -1.0f, 1.0f);
  return tensor;
}

// Operands of one group shape and dtype. Only the latest set is kept: the many-small weights
// alone take 512 MiB in fp32, and cases of one shape and dtype run one after another.
struct Operands {
  std::vector<int64_t> rows;
  DType dtype;
  Tensor x, w, dy;  // x [R, K], w [G, K, N], dy [R, N]
  Tensor y, dx;     // y [R, N], dx [R, K] in the input dtype
  Tensor dw;        // dw [G, K, N] fp32
};

Operands& operands_for(const std::vector<int64_t>& rows, DType dtype) {
  static std::unique_ptr<Operands> cached;
  if (cached && cached->rows == rows && cached->dtype == dtype) return *cached;
  cached.reset();  // free the previous set before allocating the next
  auto o = std::make_unique<Operands>();
  int64_t r = total_rows(rows), g = int64_t(rows.size());
  o->rows = rows;
  o->dtype = dtype;
  o->x = random_tensor({r, kHidden}, dtype, 1);
  o->w = random_tensor({g, kHidden, kFfn}, dtype, 2);
  o->dy = random_tensor({r, kFfn}, dtype, 3);
  o->y = Tensor({r, kFfn}, dtype);
  o->dx = Tensor({r, kHidden}, dtype);
  o->dw = Tensor({g, kHidden, kFfn}, DType::F32);
  cached = std::move(o);
  return *cached;
}

GroupedGemmArgs args_for(Operands& o, GemmForm form) {
  GroupedGemmArgs args;
  args.form = form;
  args.groups = int64_t(o.rows.size());
  args.group_rows = o.rows.data();
  args.k = kHidden;
  args.n = kFfn;
  args.input_dtype = o.dtype;
  switch (form) {
    case GemmForm::kForward:
      args.a = o.x.raw(), args.b = o.w.raw(), args.c = o.y.raw();
      args.output_dtype = o.dtype;
      break;
    case GemmForm::kGradInput:
      args.a = o.dy.raw(), args.b = o.w.raw(), args.c = o.dx.raw();
      args.output_dtype = o.dtype;
      break;
    case GemmForm::kGradWeight:
      args.a = o.x.raw(), args.b = o.dy.raw(), args.c = o.dw.raw();
      args.output_dtype = DType::F32;
      args.accumulate = true;
      break;
  }
  return args;
}

using bench::Stopwatch;

struct Seconds {
  double wall, cpu;  // per call
};

// Mean seconds of one dense SGEMM [m, K] x [K, N] over at least 3 calls and 0.2 s, after a
// warm-up call.
Seconds dense_sgemm_seconds(int64_t m) {
  static int64_t cached_m = -1;
  static Tensor a, b, c;
  if (cached_m != m) {
    a = random_tensor({m, kHidden}, DType::F32, 4);
    b = random_tensor({kHidden, kFfn}, DType::F32, 5);
    c = Tensor({m, kFfn});
    cached_m = m;
  }
  auto run = [&] {
    sgemm(false, false, m, kFfn, kHidden, 1.0f, a.data<float>(), kHidden, b.data<float>(), kFfn,
          0.0f, c.data<float>(), kFfn);
  };
  run();
  int calls = 0;
  Stopwatch watch;
  while (calls < 3 || watch.wall_seconds() < 0.2) {
    run();
    ++calls;
  }
  return {watch.wall_seconds() / calls, watch.cpu_seconds() / calls};
}

// Times `body` in the benchmark loop and sets GFLOP/s for `flops` per call.
template <class Body>
Seconds timed_loop(benchmark::State& state, double flops, Body body) {
  body();  // warm-up: page faults, first-touch, thread start
  Stopwatch watch;
  for (auto _ : state) body();
  double calls = double(state.iterations());
  Seconds seconds{watch.wall_seconds() / calls, watch.cpu_seconds() / calls};
  state.counters["GFLOP/s"] = flops / seconds.wall * 1e-9;
  return seconds;
}

void grouped_case(benchmark::State& state, const GroupShape& shape, GemmForm form, DType dtype,
                  GroupedGemmKernel kernel) {
  if (!grouped_gemm_kernel_available(kernel, dtype)) {
    state.SkipWithError("kernel not available on this CPU");
    return;
  }
  Operands& o = operands_for(shape.rows, dtype);
  GroupedGemmArgs args = args_for(o, form);
  double flops = grouped_gemm_flops(shape.rows, kHidden, kFfn);
  Seconds seconds = timed_loop(state, flops, [&] { grouped_gemm(args, kernel); });
  Seconds dense = dense_sgemm_seconds(total_rows(shape.rows));
  state.counters["dense_GFLOP/s"] = flops / dense.wall * 1e-9;
  state.counters["vs_dense"] = dense.wall / seconds.wall;
  state.counters["vs_dense_cpu"] = dense.cpu / seconds.cpu;
  state.counters["process_cpu_s"] = seconds.cpu;  // per call, for CPU-time comparisons
}

void dense_case(benchmark::State& state, int64_t m) {
  Tensor a = random_tensor({m, kHidden}, DType::F32, 6);
  Tensor b = random_tensor({kHidden, kFfn}, DType::F32, 7);
  Tensor c({m, kFfn});
  timed_loop(state, 2.0 * double(m) * kHidden * kFfn, [&] {
    sgemm(false, false, m, kFfn, kHidden, 1.0f, a.data<float>(), kHidden, b.data<float>(), kFfn,
          0.0f, c.data<float>(), kFfn);
  });
}

// Every packed kernel (the fastest one available is what grouped_gemm runs), then per-group BLAS.
const GroupedGemmKernel kKernels[] = {
    GroupedGemmKernel::kPackedAvx512Bf16, GroupedGemmKernel::kPackedAvx512,
    GroupedGemmKernel::kPackedAvx2, GroupedGemmKernel::kPerGroupBlas};
const DType kDtypes[] = {DType::F32, DType::BF16, DType::F16};

void register_benchmarks() {
  for (int64_t m : {2048, 4096}) {
    std::string name = "dense_sgemm/" + std::to_string(m) + "x" + std::to_string(kHidden) + "x" +
                       std::to_string(kFfn);
    benchmark::RegisterBenchmark(name.c_str(), dense_case, m)->UseRealTime()->MinTime(0.3);
  }
  for (const GroupShape& shape : group_shapes()) {
    for (DType dtype : kDtypes) {
      for (GemmForm form : {GemmForm::kForward, GemmForm::kGradInput, GemmForm::kGradWeight}) {
        for (GroupedGemmKernel kernel : kKernels) {
          if (!grouped_gemm_kernel_available(kernel, dtype)) continue;
          std::string name = "grouped/" + shape.name + "/" + gemm_form_name(form) + "/" +
                             std::string(dtype_name(dtype)) + "/" +
                             grouped_gemm_kernel_name(kernel);
          benchmark::RegisterBenchmark(name.c_str(), grouped_case, shape, form, dtype, kernel)
              ->UseRealTime()
              ->MinTime(0.3);
        }
      }
    }
  }
  for (DType dtype : {DType::F32, DType::BF16}) {
    for (int64_t rows : {8, 16, 32, 64, 128, 256, 512}) {
      for (GroupedGemmKernel kernel : kKernels) {
        if (!grouped_gemm_kernel_available(kernel, dtype)) continue;
        GroupShape shape{"rows_per_expert", std::vector<int64_t>(8, rows)};
        std::string name = "rows_per_expert/" + std::string(dtype_name(dtype)) + "/" +
                           grouped_gemm_kernel_name(kernel) + "/" + std::to_string(rows);
        benchmark::RegisterBenchmark(name.c_str(), grouped_case, shape, GemmForm::kForward, dtype,
                                     kernel)
            ->UseRealTime()
            ->MinTime(0.2);
      }
    }
  }
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  moe::register_benchmarks();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

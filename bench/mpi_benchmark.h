// What the MPI benchmark programs share: fixed-iteration registration (so every rank runs the
// same loops and the collectives line up), and a main where rank 0 reports (console table, then
// ratios of median times measured side by side in the same run) while the other ranks stay
// silent.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moe/comm/process_group.h"

namespace moe::bench {

// Run name ("BM_X/tokens:256/bf16:0") -> median real time in seconds.
using Medians = std::map<std::string, double>;
using PrintRatios = std::function<void(const Medians&)>;

// Rank 0's console table, then whatever ratios print_ratios computes from the medians.
class MedianRatioReporter : public benchmark::ConsoleReporter {
 public:
  explicit MedianRatioReporter(PrintRatios print_ratios)
      : ConsoleReporter(OO_Tabular), print_ratios_(std::move(print_ratios)) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.aggregate_name == "median") medians_[run.run_name.str()] = run.GetAdjustedRealTime();
    }
  }
  void Finalize() override {
    ConsoleReporter::Finalize();
    print_ratios_(medians_);
  }

 private:
  PrintRatios print_ratios_;
  Medians medians_;
};

class SilentReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

// One way at one (tokens, bf16) size: a fixed number of iterations repeated five times, median
// and spread reported.
inline void register_fixed_iterations(const char* name, void (*function)(benchmark::State&),
                                      int64_t tokens, int64_t bf16, int64_t iterations,
                                      benchmark::TimeUnit unit) {
  benchmark::RegisterBenchmark(name, function)
      ->ArgNames({"tokens", "bf16"})
      ->Args({tokens, bf16})
      ->Iterations(iterations)
      ->Repetitions(5)
      ->ReportAggregatesOnly(true)
      ->UseRealTime()
      ->Unit(unit);
}

// The whole main of an MPI benchmark program.
inline int run_mpi_benchmarks(int argc, char** argv, void (*register_benchmarks)(),
                              PrintRatios print_ratios) {
  moe::comm::ensure_mpi_initialized(&argc, &argv);
  benchmark::Initialize(&argc, argv);
  register_benchmarks();
  if (moe::comm::ProcessGroup::world().rank() == 0) {
    MedianRatioReporter reporter(std::move(print_ratios));
    benchmark::RunSpecifiedBenchmarks(&reporter);
  } else {
    SilentReporter silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  return 0;
}

}  // namespace moe::bench

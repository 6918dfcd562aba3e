// moe-plan: a layout planner for moe-train. Give it moe-train's flags and a world size:
//   moe-plan --world-size 16 <moe-train arguments>
// It prints, for the layout the flags name, each pipeline stage's per-rank parameter, gradient,
// optimizer-state and peak activation memory (with and without recomputation and the
// distributed optimizer), the bytes each MoE dispatcher hands to its exchanges per layer and
// step, the pipeline bubble, and then every valid (tp, pp, ep, etp, cp, dp) layout ranked by a
// predicted step time (include/moe/train/layout_plan.h says what is exact and what is modelled).
//
// Its own flags (everything else goes to moe-train's parser):
//   --world-size N             ranks to plan for (required)
//   --gemm-gflops X --link-gbytes-per-s Y
//                              rates to predict step times from; without them a short
//                              calibration on this machine measures both
//   --tokenizer-vocab-size V   the vocabulary size when the tokenizer's files are not at hand
//   --top K                    layouts to list (default 10)
//   --memory-per-rank-gib G    list only layouts whose every rank fits in G GiB: model state
//                              (the arguments' optimizer) plus the peak activations with the
//                              arguments' recomputation
#include <algorithm>
#include <cstdio>
#include <exception>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "moe/data/tokenizer.h"
#include "moe/tensor/error.h"
#include "moe/train/arguments.h"
#include "moe/train/layout_plan.h"

namespace {

using moe::train::LayoutPlan;
using moe::train::Recompute;

double mib(int64_t bytes) {
  return double(bytes) / 1048576.0;
}

struct PlanFlags {
  std::optional<int> world_size;
  std::optional<double> gemm_gflops, link_gbytes_per_s;
  std::optional<int64_t> vocab_size;
  int top = 10;
  std::optional<double> memory_per_rank_gib;
  std::vector<std::string> train_arguments;
};

PlanFlags split_flags(int argc, char** argv) {
  PlanFlags flags;
  for (int i = 1; i < argc; ++i) {
    const std::string name = argv[i];
    auto value = [&]() -> std::string {
      MOE_CHECK(i + 1 < argc, name, " needs a value");
      return argv[++i];
    };
    if (name == "--world-size") {
      flags.world_size = std::stoi(value());
    } else if (name == "--gemm-gflops") {
      flags.gemm_gflops = std::stod(value());
    } else if (name == "--link-gbytes-per-s") {
      flags.link_gbytes_per_s = std::stod(value());
    } else if (name == "--tokenizer-vocab-size") {
      flags.vocab_size = std::stoll(value());
    } else if (name == "--memory-per-rank-gib") {
      flags.memory_per_rank_gib = std::stod(value());
    } else if (name == "--top") {
      flags.top = std::stoi(value());
    } else {
      flags.train_arguments.push_back(name);
    }
  }
  MOE_CHECK(flags.world_size && *flags.world_size >= 1, "--world-size N (>= 1) is required");
  MOE_CHECK(flags.gemm_gflops.has_value() == flags.link_gbytes_per_s.has_value(),
            "give both --gemm-gflops and --link-gbytes-per-s, or neither (calibrate)");
  return flags;
}

// The tokenizer's vocabulary, as moe-train builds it, or --tokenizer-vocab-size.
int64_t vocabulary(const moe::train::TrainingArguments& a, const PlanFlags& flags) {
  if (flags.vocab_size) return *flags.vocab_size;
  moe::data::TokenizerOptions options;
  options.type = *a.tokenizer_type;
  options.model = a.tokenizer_model.value_or("");
  options.vocab_file = a.vocab_file.value_or("");
  options.merge_file = a.merge_file.value_or("");
  options.vocab_size = a.vocab_size.value_or(0);
  try {
    return moe::data::make_tokenizer(options)->vocab_size();
  } catch (const std::exception& error) {
    throw moe::Error(std::string("cannot build the tokenizer (") + error.what() +
                     "); give the vocabulary size with --tokenizer-vocab-size");
  }
}

void print_plan(const LayoutPlan& plan, const moe::train::TrainingArguments& a) {
  const auto& l = plan.layout;
  std::printf("layout: tp %d, pp %d, ep %d, etp %d, cp %d, dp %d; %d micro-batches per step\n",
              l.tp, l.pp, l.ep, l.etp, l.cp, l.dp, plan.num_micro_batches);
  std::printf("per rank (MiB)                        params    grads  main-params  optimizer\n");
  for (size_t i = 0; i < plan.stages.size(); ++i) {
    const moe::train::StagePlan& s = plan.stages[i];
    std::printf("  stage %zu (layers %d-%d)\n", i, s.first_layer, s.first_layer + s.num_layers - 1);
    for (bool distributed : {false, true}) {
      const moe::train::StateMemory& m = s.state[distributed];
      std::printf("    %-32s %9.1f %8.1f %12.1f %10.1f\n",
                  distributed ? "distributed optimizer" : "replicated optimizer",
                  mib(m.param_bytes), mib(m.grad_bytes), mib(m.main_param_bytes),
                  mib(m.optimizer_state_bytes));
    }
    std::printf(
        "    peak activations (%d micro-batch contexts in flight): no recomputation "
        "%.1f, selective %.1f, full %.1f\n",
        s.contexts_in_flight, mib(s.peak_activation_bytes(Recompute::kNone)),
        mib(s.peak_activation_bytes(Recompute::kSelective)),
        mib(s.peak_activation_bytes(Recompute::kFull)));
  }
  std::printf("selective recomputation of:");
  for (const std::string& module : a.recompute_modules) std::printf(" %s", module.c_str());
  std::printf(
      "\nMoE exchange bytes per layer per step per rank (dropless): alltoall %.1f MiB, "
      "allgather %.1f MiB\n",
      mib(plan.alltoall_exchange_bytes), mib(plan.allgather_exchange_bytes));
  std::printf("pipeline bubble (1F1B): %.3f\n", plan.bubble_fraction);
  std::printf("predicted step: %.4g s (busiest stage: compute %.4g s, communication %.4g s)\n",
              plan.step_seconds, plan.compute_seconds, plan.communication_seconds);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    PlanFlags flags = split_flags(argc, argv);
    moe::train::ParseOutcome outcome = moe::train::parse_arguments(flags.train_arguments);
    moe::train::TrainingArguments args = outcome.args;  // outcome.args stay as given
    moe::train::finalize_arguments(args, *flags.world_size);
    const int64_t vocab = vocabulary(args, flags);
    moe::train::MachineRates rates;
    if (flags.gemm_gflops) {
      rates.gemm_flops_per_second = *flags.gemm_gflops * 1e9;
      rates.link_bytes_per_second = *flags.link_gbytes_per_s * 1e9;
      rates.source = "given: --gemm-gflops and --link-gbytes-per-s";
    } else {
      rates = moe::train::calibrate_machine();
    }
    std::printf("rates: GEMM %.1f GFLOP/s, link %.2f GB/s (%s)\n",
                rates.gemm_flops_per_second / 1e9, rates.link_bytes_per_second / 1e9,
                rates.source.c_str());
    const int64_t padded = moe::data::padded_vocab_size(vocab, args.make_vocab_size_divisible_by,
                                                        args.tensor_model_parallel_size);
    std::printf("vocabulary %lld, padded %lld\n\n", static_cast<long long>(vocab),
                static_cast<long long>(padded));
    print_plan(moe::train::plan_layout(args, padded, rates), args);

    const std::vector<LayoutPlan> ranked =
        moe::train::rank_layouts(outcome.args, *flags.world_size, vocab, rates);
    const Recompute recompute = !args.recompute_granularity             ? Recompute::kNone
                                : *args.recompute_granularity == "full" ? Recompute::kFull
                                                                        : Recompute::kSelective;
    std::printf("\nvalid layouts for %d ranks (%zu), fastest predicted first", *flags.world_size,
                ranked.size());
    if (flags.memory_per_rank_gib) {
      std::printf(", those that fit in %.1f GiB per rank", *flags.memory_per_rank_gib);
    }
    std::printf(
        ":\n   tp  pp  ep etp  cp  dp   step (s)  bubble  model state/rank (MiB)  "
        "peak act./rank (MiB, none/selective/full)\n");
    int listed = 0;
    for (const LayoutPlan& p : ranked) {
      int64_t state = 0, none = 0, selective = 0, full = 0, busiest = 0;
      for (const moe::train::StagePlan& s : p.stages) {
        const int64_t held = s.state[args.use_distributed_optimizer].total();
        state = std::max(state, held);
        none = std::max(none, s.peak_activation_bytes(Recompute::kNone));
        selective = std::max(selective, s.peak_activation_bytes(Recompute::kSelective));
        full = std::max(full, s.peak_activation_bytes(Recompute::kFull));
        busiest = std::max(busiest, held + s.peak_activation_bytes(recompute));
      }
      if (flags.memory_per_rank_gib && mib(busiest) > *flags.memory_per_rank_gib * 1024) continue;
      if (listed++ == flags.top) break;
      std::printf("  %3d %3d %3d %3d %3d %3d %10.4g %7.3f %23.1f   %.1f/%.1f/%.1f\n", p.layout.tp,
                  p.layout.pp, p.layout.ep, p.layout.etp, p.layout.cp, p.layout.dp, p.step_seconds,
                  p.bubble_fraction, mib(state), mib(none), mib(selective), mib(full));
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "moe-plan: error: %s\n", error.what());
    return 2;
  }
  return 0;
}

// The layout planner behind tools/moe-plan: from moe-train's finalized arguments it predicts,
// per pipeline stage and rank, the memory the ParameterStore and the optimizer allocate, the
// activation memory a micro-batch's context holds (with and without recomputation), the bytes
// the MoE dispatchers hand to their exchanges, the pipeline bubble and a step time; and it ranks
// every (tp, pp, ep, etp, cp, dp) layout moe-train accepts for a world size.
//
// What is exact and what is a model (tests/train/layout_plan_*test.cc check both):
// - parameter, gradient, main-parameter and optimizer-state bytes: exact, the sizes
//   optim::Optimizer::memory() reports (rank 0 of each data-parallel group for the distributed
//   optimizer's shards, which differ by at most one element between ranks);
// - dispatcher exchange bytes: exact for dropless routing as the group's mean per rank (the
//   token-to-expert direction is exact per rank, the way back depends on the routing);
// - activation bytes: a model of what each module saves (src/model, src/moe), with expert rows
//   as under balanced routing;
// - step time: FLOPs / GEMM rate plus exchanged bytes / link rate, stretched by the bubble.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/train/arguments.h"

namespace moe::train {

struct Layout {
  int tp = 1, pp = 1, ep = 1, etp = 1, cp = 1, dp = 1;
};

// The model state one rank holds, as optim::MemoryReport counts it.
struct StateMemory {
  int64_t param_bytes = 0;
  int64_t grad_bytes = 0;
  int64_t main_param_bytes = 0;
  int64_t optimizer_state_bytes = 0;
  int64_t total() const {
    return param_bytes + grad_bytes + main_param_bytes + optimizer_state_bytes;
  }
};

enum class Recompute { kNone, kSelective, kFull };

struct StagePlan {
  int first_layer = 0, num_layers = 0;
  int64_t dense_params = 0, expert_params = 0;  // elements in this rank's flat buffers
  StateMemory state[2];  // [0]: without, [1]: with --use-distributed-optimizer
  // Bytes one micro-batch's saved activations hold after this stage's forward, indexed by
  // Recompute (selective: the arguments' --recompute-modules, by default Megatron's core_attn,
  // whatever --recompute-granularity is).
  int64_t context_bytes[3] = {0, 0, 0};
  // Backward's largest working set beyond the contexts (the loss softmax and its gradient on the
  // last stage, a recomputed layer's context).
  int64_t transient_bytes[3] = {0, 0, 0};
  int contexts_in_flight = 1;  // 1F1B: min(pp - stage, micro-batches)
  int64_t peak_activation_bytes(Recompute recompute) const {
    const int r = int(recompute);
    return contexts_in_flight * context_bytes[r] + transient_bytes[r];
  }
};

struct LayoutPlan {
  Layout layout;
  std::vector<StagePlan> stages;
  int num_micro_batches = 1;
  // Per MoE layer per step (all micro-batches, forward and backward, and the forward again when
  // the MoE layer recomputes): the bytes each rank hands to the exchanges, mean over the group
  // (TokenDispatcher::exchange_bytes). 0 without expert parallelism.
  int64_t alltoall_exchange_bytes = 0;
  int64_t allgather_exchange_bytes = 0;
  double bubble_fraction = 0;  // 1F1B: (pp - 1) / (M + pp - 1)
  double compute_seconds = 0, communication_seconds = 0, step_seconds = 0;
};

// GEMM and link rates the step time is predicted from.
struct MachineRates {
  double gemm_flops_per_second = 0;
  double link_bytes_per_second = 0;
  std::string source;  // how they were obtained
};
// Times an fp32 GEMM (moecore's kernel) and a memcpy standing in for a link on this machine.
MachineRates calibrate_machine();

// The plan of the layout `args` names. args must be finalized for its world size.
LayoutPlan plan_layout(const TrainingArguments& args, int64_t padded_vocab,
                       const MachineRates& rates);

// Every layout of world_size ranks that finalize_arguments and the model configuration accept
// with the rest of `args` (as parsed, not finalized) unchanged, sequence parallelism added where
// tp > 1 with expert parallelism requires it (cp = 1: moecore has no context parallelism yet),
// fastest predicted step first. `vocab` is the unpadded vocabulary size.
std::vector<LayoutPlan> rank_layouts(const TrainingArguments& args, int world_size, int64_t vocab,
                                     const MachineRates& rates);

}  // namespace moe::train

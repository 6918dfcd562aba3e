// Fault injection for the fault matrix (scripts/faults.sh, docs/reliability.md): compiled in
// always, inert unless the environment sets MOE_FAULT_INJECT=phase:rank:iteration. World rank
// `rank` then acts the first time it reaches `phase` while the training loop is at `iteration`
// (1-based, as the log counts; 0 is start-up, before the first step):
//   startup, forward, alltoall, backward, optimizer, save  -> SIGKILL (the process dies at once)
//   nan, grad-reduction                                      -> fault_requested() says so once
// (nan: the trainer puts a NaN in one gradient; grad-reduction: the optimizer doubles this
// rank's reduced gradients, under --check-grad-reduction).
// Unset, each check costs one branch on a cached value.
#pragma once

#include <cstdint>
#include <string_view>

namespace moe::comm {

// The training loop's current iteration, for matching MOE_FAULT_INJECT's iteration.
void set_fault_iteration(int64_t iteration);

// Kills this process with SIGKILL (after one line on stderr naming the rank, phase and
// iteration) when MOE_FAULT_INJECT names `phase` here and now; otherwise returns.
void fault_point(std::string_view phase);

// True, once, when MOE_FAULT_INJECT names `phase` here and now: for faults the caller injects
// itself (phase "nan": a NaN in one gradient).
bool fault_requested(std::string_view phase);

}  // namespace moe::comm

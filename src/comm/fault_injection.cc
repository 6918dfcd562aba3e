#include "moe/comm/fault_injection.h"

#include <mpi.h>

#include <array>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "moe/tensor/error.h"

namespace moe::comm {
namespace {

constexpr std::array<std::string_view, 8> kPhases = {
    "startup", "forward", "alltoall", "backward", "optimizer", "save", "nan", "grad-reduction"};

struct FaultPlan {
  bool active = false;
  std::string phase;
  int rank = 0;
  int64_t iteration = 0;
  bool fired = false;
};

// MOE_FAULT_INJECT, parsed on first use; a malformed value is an error naming it.
FaultPlan& plan() {
  static FaultPlan parsed = [] {
    FaultPlan p;
    const char* text = std::getenv("MOE_FAULT_INJECT");
    if (text == nullptr || *text == '\0') return p;
    const std::string value = text;
    const size_t first = value.find(':'), second = value.find(':', first + 1);
    bool known = false;
    if (first != std::string::npos && second != std::string::npos) {
      p.phase = value.substr(0, first);
      for (std::string_view phase : kPhases) known = known || phase == p.phase;
      try {
        p.rank = std::stoi(value.substr(first + 1, second - first - 1));
        p.iteration = std::stoll(value.substr(second + 1));
      } catch (const std::exception&) {
        known = false;
      }
    }
    MOE_CHECK(known && p.rank >= 0 && p.iteration >= 0, "MOE_FAULT_INJECT='", value,
              "' is not phase:rank:iteration with phase one of startup, forward, alltoall, "
              "backward, optimizer, save, nan, grad-reduction");
    p.active = true;
    return p;
  }();
  return parsed;
}

int64_t current_iteration = 0;

bool matches_now(std::string_view phase) {
  FaultPlan& p = plan();
  if (!p.active || p.fired || p.phase != phase || p.iteration != current_iteration) return false;
  int initialized = 0, rank = 0;
  MPI_Initialized(&initialized);
  if (initialized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != p.rank) return false;
  p.fired = true;
  std::fprintf(stderr, "MOE_FAULT_INJECT: rank %d, %s, iteration %lld\n", rank, p.phase.c_str(),
               static_cast<long long>(current_iteration));
  std::fflush(stderr);
  return true;
}

}  // namespace

void set_fault_iteration(int64_t iteration) {
  current_iteration = iteration;
}

void fault_point(std::string_view phase) {
  if (matches_now(phase)) std::raise(SIGKILL);
}

bool fault_requested(std::string_view phase) {
  return matches_now(phase);
}

}  // namespace moe::comm

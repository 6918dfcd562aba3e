// Wall time and the CPU time of the whole process (all threads) since construction, for the
// benchmark programs. On a shared machine the CPU time is the steadier measure: time slices taken
// by other jobs do not count in it.
#pragma once

#include <chrono>
#include <ctime>

namespace moe::bench {

struct Stopwatch {
  std::chrono::steady_clock::time_point wall = std::chrono::steady_clock::now();
  double cpu = process_cpu_seconds();
  static double process_cpu_seconds() {
    timespec now;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
    return double(now.tv_sec) + 1e-9 * double(now.tv_nsec);
  }
  double wall_seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - wall).count();
  }
  double cpu_seconds() const { return process_cpu_seconds() - cpu; }
};

}  // namespace moe::bench

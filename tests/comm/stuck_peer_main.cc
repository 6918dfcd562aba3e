// A program whose last rank hangs (sleeps instead of joining an all_reduce). The other ranks get
// a timeout error (after MOE_COLLECTIVE_TIMEOUT_S, which the ctest entry sets), print it and
// return 3; the exit handler then aborts the MPI job, which ends
// the hung rank too. The ctest entry checks the printed error and the non-zero exit of mpirun,
// and its own timeout proves nothing hangs.
#include <chrono>
#include <cstdio>
#include <thread>

#include "moe/comm/process_group.h"

int main(int argc, char** argv) {
  moe::comm::ensure_mpi_initialized(&argc, &argv);
  moe::comm::ProcessGroup world = moe::comm::ProcessGroup::world();
  if (world.rank() == world.size() - 1) {
    std::this_thread::sleep_for(std::chrono::seconds(120));
    return 0;
  }
  moe::Tensor values({4});
  try {
    moe::comm::all_reduce(values, world);
  } catch (const moe::Error& error) {
    std::fprintf(stderr, "error on rank %d: %s\n", world.rank(), error.what());
    return 3;
  }
  return 0;
}

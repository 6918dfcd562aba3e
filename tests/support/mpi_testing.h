// Helpers for tests launched under mpirun (programs linked with moe_test_mpi_main).
#pragma once

#include <mpi.h>
#include <unistd.h>

#include <string>

#include "support/testing.h"

namespace moe::testing {

// A scratch directory every rank of MPI_COMM_WORLD shares, named after rank 0's process id:
// rank 0 creates it before any rank goes on (constructor barrier) and removes it only after
// every rank is done with it (destructor barrier). Collective: every rank constructs it.
struct SharedScratchDir : ScratchDir {
  explicit SharedScratchDir(const std::string& tag)
      : ScratchDir(tag, rank0_pid(), world_rank() == 0) {
    MPI_Barrier(MPI_COMM_WORLD);
  }
  ~SharedScratchDir() { MPI_Barrier(MPI_COMM_WORLD); }

 private:
  static int world_rank() {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    return rank;
  }
  static int64_t rank0_pid() {
    long pid = long(::getpid());
    MPI_Bcast(&pid, 1, MPI_LONG, 0, MPI_COMM_WORLD);
    return int64_t(pid);
  }
};

}  // namespace moe::testing

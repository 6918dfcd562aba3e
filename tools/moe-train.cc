// moe-train: Megatron-LM's pretrain_gpt.py for moecore. Launch with
//   mpirun -np N moe-train <Megatron-LM arguments>
// Arguments are parsed and validated for the world size on every rank before any work; a bad
// argument is reported once (rank 0) and every rank exits with status 2. A bad input file (the
// tokenizer, a checkpoint, the data, also a sample read during training) is reported once and
// every rank exits with status 1. An error during training is printed by the rank that hit it
// (tagged with its rank) and aborts the whole job with status 1, so no rank is left waiting in a
// collective.
#include <mpi.h>

#include <cstdio>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "moe/comm/process_group.h"
#include "moe/train/arguments.h"
#include "moe/train/trainer.h"

int main(int argc, char** argv) {
  moe::comm::ensure_mpi_initialized(&argc, &argv);
  int rank = 0, world_size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);

  moe::train::TrainingArguments args;
  try {
    moe::train::ParseOutcome outcome =
        moe::train::parse_arguments(std::vector<std::string>(argv + 1, argv + argc));
    if (outcome.help_requested) {
      if (rank == 0) std::cout << outcome.help_text << std::flush;
      return 0;
    }
    args = std::move(outcome.args);
    moe::train::finalize_arguments(args, world_size);
  } catch (const std::exception& error) {
    if (rank == 0) std::fprintf(stderr, "moe-train: error: %s\n", error.what());
    return 2;
  }

  try {
    moe::train::TrainingReport report = moe::train::pretrain(args, std::cout);
    if (rank == 0 && report.last_checkpoint) {
      std::cout << "moe-train: finished at iteration " << report.final_iteration
                << "; latest checkpoint: " << *report.last_checkpoint << std::endl;
    }
  } catch (const moe::train::InputError& error) {  // the same on every rank: printed once
    if (rank == 0) std::fprintf(stderr, "moe-train: error: %s\n", error.what());
    return 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "moe-train: error on rank %d of %d: %s\n", rank, world_size, error.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  return 0;
}

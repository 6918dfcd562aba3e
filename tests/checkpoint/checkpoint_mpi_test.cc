// Checkpoints under mpirun (2 and 4 ranks): the distributed optimizer's shards round-trip and
// resume bitwise, a save failing on one rank leaves the previous checkpoint latest on every rank,
// and the model loads into a different layout (all experts on one process) from the per-rank
// boxes while the optimizer state refuses a different layout with a clear message.
#include <gtest/gtest.h>

#include <filesystem>

#include "checkpoint_fixture.h"

namespace moe::checkpoint {
namespace {

namespace fs = std::filesystem;
using moe::testing::param_spec;
using moe::testing::random_normal;
using moe::testing::runs_identical;
using moe::testing::ScratchDir;
using moe::testing::shard_of;
using moe::testing::TrainingRun;

comm::ParallelState expert_parallel_layout() {
  comm::ParallelSizes sizes;
  sizes.ep = 2;
  return comm::initialize_model_parallel(sizes);
}

// A scratch directory every rank names alike (rank 0's process id), created by rank 0.
std::unique_ptr<ScratchDir> shared_dir(const std::string& name) {
  const comm::ProcessGroup world = comm::ProcessGroup::world();
  int64_t pid = ::getpid();
  int64_t id = comm::all_gather_values({&pid, 1}, world)[0];
  auto dir = std::make_unique<ScratchDir>(name, id, world.rank() == 0);
  comm::barrier(world);
  return dir;
}

TEST(CheckpointMpi, DistributedOptimizerRoundTripAndResumeAreBitwise) {
  comm::ParallelState p = expert_parallel_layout();
  std::unique_ptr<ScratchDir> scratch = shared_dir("mpi_roundtrip");
  const ScratchDir& dir = *scratch;
  for (bool distributed : {true, false}) {
    TrainingRun original(p, DType::BF16, distributed);
    original.train(3);
    original.save(dir.str());
    TrainingRun resumed(p, DType::BF16, distributed);
    resumed.model.store.flat_params(ParamGroup::kExpert).zero();
    EXPECT_EQ(resumed.load(dir.str()).iteration, 3);
    EXPECT_TRUE(runs_identical(original, resumed)) << "distributed " << distributed;
    original.train(3);
    resumed.train(3);
    EXPECT_TRUE(runs_identical(original, resumed)) << "distributed " << distributed;
    comm::barrier(p.world);  // everyone has loaded before the next save replaces the files
  }
}

TEST(CheckpointMpi, SaveFailingOnOneRankKeepsThePreviousCheckpoint) {
  comm::ParallelState p = expert_parallel_layout();
  std::unique_ptr<ScratchDir> scratch = shared_dir("mpi_failed");
  const ScratchDir& dir = *scratch;
  TrainingRun run(p, DType::F32, true);
  run.train(2);
  run.save(dir.str());
  Tensor saved = run.model.store.flat_params(ParamGroup::kExpert).clone();
  run.train(1);
  SaveOptions crash;
  int failing = p.world_size - 1;
  crash.before_commit = [&] {
    if (p.world_rank == failing) throw Error("disk full (simulated)");
  };
  try {
    run.save(dir.str(), crash);
    ADD_FAILURE() << "the save must fail on every rank";
  } catch (const Error& e) {
    std::string text = e.what();
    EXPECT_NE(text.find("failed on rank(s) " + std::to_string(failing)), std::string::npos) << text;
    if (p.world_rank == failing) {
      EXPECT_NE(text.find("disk full (simulated)"), std::string::npos) << text;
    }
  }
  EXPECT_EQ(read_tracker(dir.str()), 2);
  EXPECT_FALSE(fs::exists(dir.path / "iter_0000003"));
  EXPECT_FALSE(fs::exists(dir.path / "iter_0000003.tmp"));
  TrainingRun fresh(p, DType::F32, true);
  EXPECT_EQ(fresh.load(dir.str()).iteration, 2);
  EXPECT_TRUE(moe::testing::same_bytes(fresh.model.store.flat_params(ParamGroup::kExpert), saved));
  comm::barrier(p.world);
}

TEST(CheckpointMpi, ModelLoadsIntoAnotherLayoutAndOptimizerStateRefusesIt) {
  comm::ParallelState p = expert_parallel_layout();
  std::unique_ptr<ScratchDir> scratch = shared_dir("mpi_layout");
  const ScratchDir& dir = *scratch;
  TrainingRun run(p, DType::F32, true);
  run.save(dir.str());  // untrained: expert slice e holds the seeded values of ep rank e
  comm::barrier(p.world);
  if (p.world_rank == 0) {
    // All experts on one process: the two expert-parallel boxes tile the global tensor.
    comm::ParallelState one = comm::single_process_state();
    LoadOptions model_only;
    model_only.load_optim = false;
    model_only.load_rng = false;
    ParameterStore whole;
    ParamHandle fc = whole.declare(param_spec("fc.weight", {7, 5}));
    ParamHandle experts = whole.declare(param_spec("experts.fc1", {4, 3, 5}, ParamGroup::kExpert));
    whole.allocate();
    EXPECT_EQ(load_checkpoint(dir.str(), whole, nullptr, nullptr, one, model_only).iteration, 0);
    EXPECT_TENSORS_CLOSE(whole.param(fc), random_normal({7, 5}, 1001), 0, 0);
    for (int e = 0; e < 2; ++e) {
      Tensor slice = whole.param(experts).reshape({4, 15}).rows(2 * e, 2 * e + 2);
      EXPECT_TENSORS_CLOSE(slice, random_normal({2, 15}, 1003 + 17 * e), 0, 0) << "ep rank " << e;
    }
    // A box straddling both saved boxes (expert rows 1 and 2).
    ParameterStore middle;
    ParamHandle rows = middle.declare(
        shard_of(param_spec("experts.fc1", {2, 3, 5}, ParamGroup::kExpert), {4, 3, 5}, {1, 0, 0}));
    middle.allocate();
    load_checkpoint(dir.str(), middle, nullptr, nullptr, one, model_only);
    EXPECT_TENSORS_CLOSE(middle.param(rows).reshape({2, 15}),
                         whole.param(experts).reshape({4, 15}).rows(1, 3), 0, 0);
  }
  // The optimizer shards only fit the layout they were saved with.
  TrainingRun plain(p, DType::F32, /*distributed=*/false);
  try {
    plain.load(dir.str());
    ADD_FAILURE() << "loading distributed-optimizer state into a plain optimizer must fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(distributed optimizer on); this run has"),
              std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("use --no-load-optim"), std::string::npos);
  }
  comm::barrier(p.world);
}

}  // namespace
}  // namespace moe::checkpoint

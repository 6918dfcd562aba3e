// Checkpoints under mpirun (2 and 4 ranks): the distributed optimizer's shards round-trip and
// resume bitwise, a save failing on one rank leaves the previous checkpoint latest on every rank,
// and the model and optimizer state load into other layouts (all experts on one process, the
// distributed optimizer switched on or off).
#include <gtest/gtest.h>

#include <filesystem>

#include "checkpoint_fixture.h"
#include "support/mpi_testing.h"
#include "support/testing.h"

namespace moe::checkpoint {
namespace {

namespace fs = std::filesystem;
using moe::testing::param_spec;
using moe::testing::random_normal;
using moe::testing::runs_identical;
using moe::testing::shard_of;
using moe::testing::SharedScratchDir;
using moe::testing::TrainingRun;

comm::ParallelState expert_parallel_layout() {
  comm::ParallelSizes sizes;
  sizes.ep = 2;
  return comm::initialize_model_parallel(sizes);
}

TEST(CheckpointMpi, DistributedOptimizerRoundTripAndResumeAreBitwise) {
  comm::ParallelState p = expert_parallel_layout();
  SharedScratchDir dir("mpi_roundtrip");
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
  SharedScratchDir dir("mpi_failed");
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
  const std::string text = moe::testing::error_text([&] { run.save(dir.str(), crash); });
  EXPECT_CONTAINS(text, "failed on rank(s) " + std::to_string(failing));
  if (p.world_rank == failing) {
    EXPECT_CONTAINS(text, "disk full (simulated)");
  }
  EXPECT_EQ(read_tracker(dir.str()), 2);
  EXPECT_FALSE(fs::exists(dir.path / "iter_0000003"));
  EXPECT_FALSE(fs::exists(dir.path / "iter_0000003.tmp"));
  TrainingRun fresh(p, DType::F32, true);
  EXPECT_EQ(fresh.load(dir.str()).iteration, 2);
  EXPECT_TRUE(moe::testing::same_bytes(fresh.model.store.flat_params(ParamGroup::kExpert), saved));
}

TEST(CheckpointMpi, RanksSavingDifferentIterationsAreRefused) {
  comm::ParallelState p = expert_parallel_layout();
  SharedScratchDir scratch("mpi_iterations");
  TrainingRun run(p, DType::F32, false);
  run.iteration = p.world_rank == 1 ? 6 : 5;
  EXPECT_CONTAINS(moe::testing::error_text([&] { run.save(scratch.str()); }),
                  "ranks disagree on the iteration to save", "rank 0 has 5, rank 1 has 6");
  EXPECT_FALSE(read_tracker(scratch.str()).has_value());
}

// Resuming at another world size needs no --no-load-rng: a rank the saving run did not have
// gets saved rank 0's generators, and the load reports the saving world size.
TEST(CheckpointMpi, RngStatesLoadAtAnotherWorldSize) {
  comm::ParallelState world = comm::initialize_model_parallel(comm::ParallelSizes{});
  comm::ParallelState one = comm::single_process_state();
  SharedScratchDir saved_by_one("mpi_rng_one"), saved_by_all("mpi_rng_all");
  ParameterStore model;
  model.declare(param_spec("w", {3}));
  model.allocate();
  TrainingState state;
  state.iteration = 1;
  state.consumed_train_samples = 4;
  state.rng["streams"] = Rng(100 + uint64_t(world.world_rank)).state();
  if (world.world_rank == 0)
    save_checkpoint(saved_by_one.str(), state, model, nullptr, nullptr, one);
  save_checkpoint(saved_by_all.str(), state, model, nullptr, nullptr, world);
  comm::barrier(world.world);
  LoadOptions model_and_rng;
  model_and_rng.load_optim = false;

  TrainingState grown =
      load_checkpoint(saved_by_one.str(), model, nullptr, nullptr, world, model_and_rng);
  EXPECT_EQ(grown.rng_saved_world_size, 1);
  EXPECT_EQ(grown.rng.at("streams"), Rng(100).state());
  if (world.world_rank == 0) {
    TrainingState shrunk =
        load_checkpoint(saved_by_all.str(), model, nullptr, nullptr, one, model_and_rng);
    EXPECT_EQ(shrunk.rng_saved_world_size, world.world_size);
    EXPECT_EQ(shrunk.rng.at("streams"), Rng(100).state());
  }
  TrainingState same =
      load_checkpoint(saved_by_all.str(), model, nullptr, nullptr, world, model_and_rng);
  EXPECT_EQ(same.rng.at("streams"), Rng(100 + uint64_t(world.world_rank)).state());
}

// This rank's optimizer state `kind` of parameter `name` (a plain optimizer holds it whole).
Tensor state_of(TrainingRun& run, const std::string& kind, const std::string& name) {
  for (const optim::StateTensor& s : run.optimizer->state_tensors()) {
    if (s.kind == kind && run.model.store.spec(s.param).name == name) return s.data;
  }
  throw Error("no " + kind + " state for " + name);
}

TEST(CheckpointMpi, ModelAndOptimizerStateLoadIntoOtherLayouts) {
  comm::ParallelState p = expert_parallel_layout();
  for (bool distributed : {false, true}) {
    SharedScratchDir dir("mpi_layout");
    TrainingRun saved(p, DType::F32, distributed);
    saved.train(3);
    saved.save(dir.str());
    TrainingRun plain(p, DType::F32, false);  // the same steps, state held whole on every rank
    plain.train(3);
    double tolerance = distributed ? 1e-6 : 0.0;

    // All experts on one process: the expert-parallel boxes (and distributed-optimizer ranges)
    // are reassembled into one tensor per name.
    Tensor expert_moments({60});
    comm::all_gather(state_of(plain, "exp_avg", "experts.fc1"), expert_moments, p.ep_group);
    if (p.world_rank == 0) {
      comm::ParallelState one = comm::single_process_state();
      ParameterStore whole;
      ParamHandle fc = whole.declare(param_spec("fc.weight", {7, 5}));
      whole.declare(param_spec("fc.bias", {7}));
      whole.declare(param_spec("norm.weight", {5}));
      ParamHandle experts =
          whole.declare(param_spec("experts.fc1", {4, 3, 5}, ParamGroup::kExpert));
      whole.allocate();
      optim::Optimizer optimizer(whole, one, {});
      LoadOptions no_rng;
      no_rng.load_rng = false;
      EXPECT_EQ(load_checkpoint(dir.str(), whole, &optimizer, nullptr, one, no_rng).iteration, 3);
      EXPECT_EQ(optimizer.scalars().step, 3);
      for (const optim::StateTensor& s : optimizer.state_tensors()) {
        if (s.kind != "exp_avg") continue;
        Tensor expected = s.param.index == experts.index
                              ? expert_moments
                              : state_of(plain, "exp_avg", whole.spec(s.param).name);
        EXPECT_TENSORS_CLOSE(s.data, expected, tolerance, tolerance) << whole.spec(s.param).name;
      }
      EXPECT_TENSORS_CLOSE(whole.param(fc), plain.model.store.param(plain.model.handles[1]),
                           tolerance, tolerance);
      // A box straddling the two saved expert boxes (expert rows 1 and 2).
      ParameterStore middle;
      ParamHandle rows = middle.declare(shard_of(
          param_spec("experts.fc1", {2, 3, 5}, ParamGroup::kExpert), {4, 3, 5}, {1, 0, 0}));
      middle.allocate();
      LoadOptions model_only = no_rng;
      model_only.load_optim = false;
      model_only.strict = false;  // only this one tensor
      load_checkpoint(dir.str(), middle, nullptr, nullptr, one, model_only);
      EXPECT_TENSORS_CLOSE(middle.param(rows).reshape({2, 15}),
                           whole.param(experts).reshape({4, 15}).rows(1, 3), 0, 0);
    }

    // The same ranks with the other optimizer flavour continue as the saving run does.
    TrainingRun switched(p, DType::F32, !distributed);
    EXPECT_EQ(switched.load(dir.str()).iteration, 3);
    saved.train(2);
    switched.train(2);
    for (ParamGroup g : {ParamGroup::kDense, ParamGroup::kExpert}) {
      EXPECT_TENSORS_CLOSE(switched.model.store.flat_params(g), saved.model.store.flat_params(g),
                           1e-6, 1e-6);
    }
  }
}

}  // namespace
}  // namespace moe::checkpoint

// Single-process checkpoint tests: directory layout and tracker, bitwise round trip and resume,
// --no-load-optim / --no-load-rng, a failed save keeping the previous checkpoint, and the error
// text for missing, truncated, corrupted and mismatched files.
#include "moe/checkpoint/checkpoint.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <source_location>
#include <string_view>

#include "checkpoint_fixture.h"
#include "support/testing.h"

namespace moe::checkpoint {
namespace {

namespace fs = std::filesystem;
using moe::testing::expect_error_containing;
using moe::testing::param_spec;
using moe::testing::read_bytes;
using moe::testing::runs_identical;
using moe::testing::ScratchDir;
using moe::testing::single;
using moe::testing::TrainingRun;

TEST(Checkpoint, MegatronDirectoryNamesAndTracker) {
  EXPECT_EQ(iteration_dir_name(100), "iter_0000100");
  EXPECT_EQ(iteration_dir_name(1234567), "iter_1234567");
  ScratchDir dir("names");
  EXPECT_FALSE(read_tracker(dir.str()).has_value());
  TrainingRun run(single(), DType::F32, false);
  run.train(3);
  run.save(dir.str());
  EXPECT_EQ(read_bytes(dir.path / "latest_checkpointed_iteration.txt"), "3");
  EXPECT_EQ(read_tracker(dir.str()), 3);
  for (const char* file : {"metadata.json", "rank_00000.json", "rank_00000.bin"}) {
    EXPECT_TRUE(fs::exists(dir.path / "iter_0000003" / file)) << file;
  }
  EXPECT_FALSE(fs::exists(dir.path / "iter_0000003.tmp"));
  nlohmann::json meta = nlohmann::json::parse(read_bytes(dir.path / "iter_0000003/metadata.json"));
  EXPECT_EQ(meta["iteration"], 3);
  EXPECT_EQ(meta["layout"]["world_size"], 1);
  EXPECT_EQ(meta["args"]["seed"], 42);
  nlohmann::json index =
      nlohmann::json::parse(read_bytes(dir.path / "iter_0000003/rank_00000.json"));
  const nlohmann::json& first = index["tensors"][0];
  EXPECT_EQ(first["name"], "norm.weight");
  EXPECT_EQ(first["global_shape"], nlohmann::json::array({5}));
}

class RoundTrip : public ::testing::TestWithParam<DType> {};

TEST_P(RoundTrip, SaveThenLoadIsBitwiseAndResumingMatchesAnUninterruptedRun) {
  ScratchDir dir("roundtrip");
  TrainingRun original(single(), GetParam(), false);
  original.train(3);
  original.save(dir.str());

  TrainingRun resumed(single(), GetParam(), false);
  resumed.model.store.flat_params(ParamGroup::kDense).zero();
  resumed.rng = Rng(7);
  TrainingState state = resumed.load(dir.str());
  EXPECT_EQ(state.iteration, 3);
  EXPECT_EQ(state.consumed_train_samples, 24);
  EXPECT_EQ(state.args["lr"], 0.01);
  EXPECT_TRUE(runs_identical(original, resumed));

  original.train(4);
  resumed.train(4);
  EXPECT_TRUE(runs_identical(original, resumed));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RoundTrip, ::testing::Values(DType::F32, DType::BF16, DType::F16));

TEST(Checkpoint, NoLoadOptimAndNoLoadRngKeepTheirState) {
  ScratchDir dir("noload");
  TrainingRun original(single(), DType::BF16, false);
  original.train(3);
  original.save(dir.str());
  TrainingRun fresh(single(), DType::BF16, false);
  LoadOptions options;
  options.load_optim = false;
  options.load_rng = false;
  TrainingState state = fresh.load(dir.str(), options);
  EXPECT_TRUE(state.rng.empty());
  EXPECT_EQ(fresh.rng.state(), Rng(42).state());
  EXPECT_EQ(fresh.optimizer->scalars().step, 0);
  EXPECT_EQ(fresh.scheduler->num_steps(), 0);
  EXPECT_TRUE(moe::testing::same_bytes(fresh.model.store.flat_params(ParamGroup::kDense),
                                       original.model.store.flat_params(ParamGroup::kDense)));
  // The fp32 main parameters follow the loaded model parameters.
  for (const optim::StateTensor& s : fresh.optimizer->state_tensors()) {
    if (s.kind != "main_param") continue;
    Tensor model = fresh.model.store.param(s.param).reshape({-1}).rows(s.flat_begin, s.flat_end);
    EXPECT_TENSORS_CLOSE(s.data, model.to(DType::F32), 0, 0);
  }
}

TEST(Checkpoint, Bf16CheckpointLoadsIntoAnFp32Run) {
  ScratchDir dir("dtypes");
  TrainingRun bf16_run(single(), DType::BF16, false);
  bf16_run.train(2);
  bf16_run.save(dir.str());
  TrainingRun fp32_run(single(), DType::F32, false);
  fp32_run.load(dir.str());
  for (ParamGroup g : {ParamGroup::kDense, ParamGroup::kExpert}) {
    EXPECT_TENSORS_CLOSE(fp32_run.model.store.flat_params(g),
                         bf16_run.model.store.flat_params(g).to(DType::F32), 0, 0);
  }
  std::vector<optim::StateTensor> from = bf16_run.optimizer->state_tensors();
  for (const optim::StateTensor& s : fp32_run.optimizer->state_tensors()) {
    for (const optim::StateTensor& t : from) {
      if (t.kind == s.kind && t.param.index == s.param.index) {
        EXPECT_TENSORS_CLOSE(s.data, t.data, 0, 0) << s.kind;
      }
    }
  }
  EXPECT_EQ(fp32_run.optimizer->scalars().step, 2);
}

TEST(Checkpoint, FailedSaveLeavesThePreviousCheckpointLatestAndLoadable) {
  ScratchDir dir("failed");
  TrainingRun run(single(), DType::F32, false);
  run.train(2);
  run.save(dir.str());
  Tensor saved = run.model.store.flat_params(ParamGroup::kDense).clone();
  run.train(2);
  SaveOptions crash;
  crash.before_commit = [] { throw Error("simulated crash after writing"); };
  expect_error_containing([&] { run.save(dir.str(), crash); },
                          {"saving checkpoint", "iter_0000004", "failed on rank(s) 0",
                           "simulated crash after writing", "previous checkpoint is unchanged"});
  EXPECT_EQ(read_tracker(dir.str()), 2);
  EXPECT_FALSE(fs::exists(dir.path / "iter_0000004"));
  EXPECT_FALSE(fs::exists(dir.path / "iter_0000004.tmp"));
  TrainingRun fresh(single(), DType::F32, false);
  EXPECT_EQ(fresh.load(dir.str()).iteration, 2);
  EXPECT_TRUE(moe::testing::same_bytes(fresh.model.store.flat_params(ParamGroup::kDense), saved));
  // Saving the same iteration again replaces it.
  run.iteration = 2;
  run.save(dir.str());
  EXPECT_EQ(read_tracker(dir.str()), 2);
}

TEST(Checkpoint, LeftoversOfInterruptedSavesAreRecoveredOrRemoved) {
  ScratchDir dir("leftovers");
  TrainingRun run(single(), DType::F32, false);
  run.train(2);
  run.save(dir.str());
  // A crash while re-saving iteration 2, between parking the old copy and moving the new one in.
  fs::rename(dir.path / "iter_0000002", dir.path / "iter_0000002.old");
  fs::create_directories(dir.path / "iter_0000002.tmp");
  fs::create_directories(dir.path / "iter_0000007.tmp");  // an older interrupted save
  TrainingRun fresh(single(), DType::F32, false);
  EXPECT_EQ(fresh.load(dir.str()).iteration, 2);
  EXPECT_TRUE(runs_identical(run, fresh));
  run.save(dir.str());
  EXPECT_TRUE(fs::exists(dir.path / "iter_0000002" / "metadata.json"));
  for (const char* gone : {"iter_0000002.old", "iter_0000002.tmp", "iter_0000007.tmp"}) {
    EXPECT_FALSE(fs::exists(dir.path / gone)) << gone;
  }
}

class BrokenCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    TrainingRun run(single(), DType::F32, false);
    run.train(1);
    run.save(dir.str());
  }
  void expect_load_error(std::initializer_list<std::string_view> parts,
                         std::source_location caller = std::source_location::current()) {
    TrainingRun fresh(single(), DType::F32, false);
    expect_error_containing([&] { fresh.load(dir.str()); }, parts, caller);
  }
  fs::path ckpt() const { return dir.path / "iter_0000001"; }
  ScratchDir dir{"broken"};
};

TEST_F(BrokenCheckpoint, MissingTrackerOrBadTrackerText) {
  fs::remove(dir.path / "latest_checkpointed_iteration.txt");
  expect_load_error({"no checkpoint to load", "latest_checkpointed_iteration.txt"});
  std::ofstream(dir.path / "latest_checkpointed_iteration.txt") << "abc";
  expect_load_error({"should hold an iteration number but holds 'abc'"});
}

TEST_F(BrokenCheckpoint, MissingRankFile) {
  fs::remove(ckpt() / "rank_00000.bin");
  expect_load_error({"missing checkpoint file", "rank_00000.bin"});
}

TEST_F(BrokenCheckpoint, TruncatedDataFile) {
  fs::resize_file(ckpt() / "rank_00000.bin", 100);
  expect_load_error({"rank_00000.bin", "is truncated: 100 bytes"});
}

TEST_F(BrokenCheckpoint, CorruptedTensorBytes) {
  std::fstream file(ckpt() / "rank_00000.bin", std::ios::in | std::ios::out | std::ios::binary);
  file.seekp(24);  // inside fc.weight, after norm.weight's 5 floats
  file.put('\x7f');
  file.close();
  expect_load_error({"checksum mismatch for tensor 'fc.weight'", "rank_00000.bin", "corrupted"});
}

TEST_F(BrokenCheckpoint, CorruptedIndexAndMetadata) {
  std::string index = read_bytes(ckpt() / "rank_00000.json");
  index[index.find("fc.bias")] = 'F';
  std::ofstream(ckpt() / "rank_00000.json", std::ios::binary) << index;
  expect_load_error({"checkpoint index", "rank_00000.json", "is corrupted"});
  std::string meta = read_bytes(ckpt() / "metadata.json");
  std::ofstream(ckpt() / "metadata.json", std::ios::binary) << meta.substr(0, meta.size() / 2);
  expect_load_error({"metadata.json", "is not valid JSON"});
}

TEST_F(BrokenCheckpoint, ShapeMismatchAndMissingTensorNameTheTensor) {
  ParameterStore wider;
  wider.declare(param_spec("fc.weight", {8, 5}));
  wider.allocate();
  expect_error_containing([&] { load_checkpoint(dir.str(), wider, nullptr, nullptr, single()); },
                          {"tensor 'fc.weight' has global shape [7, 5] in checkpoint file",
                           "rank_00000.bin", "but the model has [8, 5]"});
  ParameterStore extra;
  extra.declare(param_spec("decoder.final_norm.weight", {5}));
  extra.allocate();
  expect_error_containing(
      [&] { load_checkpoint(dir.str(), extra, nullptr, nullptr, single()); },
      {"tensor 'decoder.final_norm.weight' is missing from checkpoint", "iter_0000001"});
}

TEST_F(BrokenCheckpoint, TensorsNoModelParameterTakesAreRefusedUnlessNotStrict) {
  ParameterStore part;
  ParamHandle fc = part.declare(param_spec("fc.weight", {7, 5}));
  part.allocate();
  expect_error_containing([&] { load_checkpoint(dir.str(), part, nullptr, nullptr, single()); },
                          {"holds 3 tensor(s) that no rank's model has: 'experts.fc1', 'fc.bias', "
                           "'norm.weight' (saved from a different model?)"});
  LoadOptions partial;
  partial.strict = false;
  load_checkpoint(dir.str(), part, nullptr, nullptr, single(), partial);
  TrainingRun saved(single(), DType::F32, false);
  saved.load(dir.str());
  EXPECT_TENSORS_CLOSE(part.param(fc), saved.model.store.param(saved.model.handles[1]), 0, 0);
}

TEST_F(BrokenCheckpoint, OptimizerMismatchPointsToNoLoadOptim) {
  TrainingRun fresh(single(), DType::F32, /*distributed=*/false);
  // A model-only checkpoint has no optimizer state to give.
  ScratchDir model_only("modelonly");
  save_checkpoint(model_only.str(), fresh.state(), fresh.model.store, nullptr, nullptr, single());
  expect_error_containing([&] { fresh.load(model_only.str()); },
                          {"holds no optimizer state; use --no-load-optim"});
  LoadOptions options;
  options.load_optim = false;
  EXPECT_EQ(fresh.load(model_only.str(), options).iteration, 0);
}

TEST(Crc32, MatchesTheStandardCheckValue) {
  const char text[] = "123456789";
  EXPECT_EQ(crc32(text, 9), 0xCBF43926u);
  EXPECT_EQ(crc32(text + 4, 5, crc32(text, 4)), 0xCBF43926u);
  EXPECT_EQ(crc32(text, 0), 0u);
}

}  // namespace
}  // namespace moe::checkpoint

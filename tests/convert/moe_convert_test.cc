// Runs the moe-convert program: HF -> moecore -> HF on a tiny model, checking that the moecore
// checkpoint loads into a real GPTModel and that both directions are bitwise exact.
#include <gtest/gtest.h>

#include <cstring>
#include <sstream>

#include "convert/convert_testing.h"
#include "convert/mixtral_testing.h"
#include "moe/checkpoint/checkpoint.h"

namespace moe::testing {
namespace {

using checkpoint::safetensors::Checkpoint;

struct RunResult {
  int exit_code = 0;
  std::string output;  // stdout and stderr
};

RunResult run_convert(const ScratchDir& scratch, const std::string& arguments) {
  const std::string log = scratch / "convert.log";
  const std::string command =
      std::string(MOE_CONVERT_PROGRAM) + " " + arguments + " > " + log + " 2>&1";
  RunResult result;
  int status = std::system(command.c_str());
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  result.output = text.str();
  return result;
}

TEST(MoeConvert, HfToMoecoreToHfIsBitwise) {
  ScratchDir scratch("tool_round_trip");
  const MixtralConfig c = tiny_config();
  TinyModel original(c, DType::BF16, 11);
  const std::string hf = scratch / "hf", ckpt = scratch / "ckpt", back = scratch / "hf_back";
  write_hf_model(hf, c, original.store);

  RunResult to_moecore =
      run_convert(scratch, "--from hf --to moecore --input " + hf + " --output " + ckpt +
                               " --iteration 5 --make-vocab-size-divisible-by 1");
  ASSERT_EQ(to_moecore.exit_code, 0) << to_moecore.output;
  EXPECT_NE(to_moecore.output.find("--num-experts 3 --moe-router-topk 2"), std::string::npos)
      << to_moecore.output;
  EXPECT_EQ(checkpoint::read_tracker(ckpt), 5);

  // The checkpoint loads into the real model, strictly, with the original weights.
  TinyModel loaded(c, DType::BF16, 99);
  checkpoint::LoadOptions options;
  options.load_rng = false;
  checkpoint::load_checkpoint(ckpt, loaded.store, nullptr, nullptr, comm::single_process_state(),
                              options);
  for (int i = 0; i < original.store.count(); ++i) {
    EXPECT_TRUE(
        same_bytes(original.store.param(ParamHandle{i}), loaded.store.param(ParamHandle{i})))
        << original.store.spec(ParamHandle{i}).name;
  }

  RunResult to_hf = run_convert(scratch, "--from moecore --to hf --input " + ckpt + " --output " +
                                             back + " --max-shard-bytes 3000");
  ASSERT_EQ(to_hf.exit_code, 0) << to_hf.output;
  Checkpoint before(hf), after(back);
  ASSERT_EQ(before.names(), after.names());
  for (const std::string& name : before.names()) {
    EXPECT_TRUE(same_bytes(before.read(name), after.read(name))) << name;
  }
  EXPECT_EQ(MixtralConfig::from_json(nlohmann::json::parse(std::ifstream(back + "/config.json")),
                                     "config")
                .to_json(),
            c.to_json());
}

TEST(MoeConvert, DtypeOptionConverts) {
  ScratchDir scratch("tool_dtype");
  const MixtralConfig c = tiny_config();
  TinyModel original(c, DType::F32, 12);
  const std::string hf = scratch / "hf", ckpt = scratch / "ckpt", back = scratch / "hf_back";
  write_hf_model(hf, c, original.store, uint64_t(1) << 30);
  ASSERT_EQ(run_convert(scratch, "--from hf --to moecore --dtype bf16 --input " + hf +
                                     " --output " + ckpt + " --make-vocab-size-divisible-by 1")
                .exit_code,
            0);
  RunResult to_hf =
      run_convert(scratch, "--from moecore --to hf --input " + ckpt + " --output " + back);
  ASSERT_EQ(to_hf.exit_code, 0) << to_hf.output;
  Checkpoint before(hf), after(back);
  for (const std::string& name : before.names()) {
    EXPECT_TRUE(same_bytes(before.read(name).to(DType::BF16), after.read(name))) << name;
  }
}

// Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by * tp: 37 -> 64.
TEST(MoeConvert, PadsTheVocabularyAsMoeTrainWill) {
  ScratchDir scratch("tool_padding");
  const MixtralConfig c = tiny_config();
  TinyModel original(c, DType::F32, 14);
  const std::string hf = scratch / "hf", ckpt = scratch / "ckpt", back = scratch / "hf_back";
  write_hf_model(hf, c, original.store);
  RunResult to_moecore =
      run_convert(scratch, "--from hf --to moecore --input " + hf + " --output " + ckpt +
                               " --make-vocab-size-divisible-by 16 --tensor-model-parallel-size 4");
  ASSERT_EQ(to_moecore.exit_code, 0) << to_moecore.output;
  EXPECT_NE(to_moecore.output.find("padded from 37 to 64 rows"), std::string::npos)
      << to_moecore.output;

  MixtralConfig padded = c;
  padded.padded_vocab_size = 64;
  TinyModel loaded(padded, DType::F32, 99);
  checkpoint::LoadOptions options;
  options.load_rng = false;
  checkpoint::load_checkpoint(ckpt, loaded.store, nullptr, nullptr, comm::single_process_state(),
                              options);
  Tensor embedding = loaded.store.param(loaded.store.find("embedding.word_embeddings.weight"));
  Tensor output = loaded.store.param(loaded.store.find("output_layer.weight"));  // [H, 64]
  Tensor original_embedding =
      original.store.param(original.store.find("embedding.word_embeddings.weight"));
  for (int64_t i = 0; i < 37 * 24; ++i) ASSERT_EQ(embedding.get(i), original_embedding.get(i));
  for (int64_t i = 37 * 24; i < 64 * 24; ++i) ASSERT_EQ(embedding.get(i), 0.0f) << i;
  for (int64_t h = 0; h < 24; ++h) {
    for (int64_t v = 37; v < 64; ++v) ASSERT_EQ(output.get(h * 64 + v), 0.0f);
  }

  ASSERT_EQ(run_convert(scratch, "--from moecore --to hf --input " + ckpt + " --output " + back)
                .exit_code,
            0);
  Checkpoint before(hf), after(back);
  for (const std::string& name : before.names()) {
    EXPECT_TRUE(same_bytes(before.read(name), after.read(name))) << name;
  }
}

// A checkpoint saved by training (no HF config recorded) converts with --hf-config.
TEST(MoeConvert, TrainingCheckpointNeedsHfConfig) {
  ScratchDir scratch("tool_training_ckpt");
  MixtralConfig c = tiny_config();
  c.padded_vocab_size = 40;
  TinyModel trained(c, DType::F32, 15);
  const std::string ckpt = scratch / "ckpt", back = scratch / "hf", config = scratch / "c.json";
  checkpoint::TrainingState state;
  state.iteration = 3;
  checkpoint::save_checkpoint(ckpt, state, trained.store, nullptr, nullptr,
                              comm::single_process_state());
  RunResult without =
      run_convert(scratch, "--from moecore --to hf --input " + ckpt + " --output " + back);
  EXPECT_NE(without.exit_code, 0);
  EXPECT_NE(without.output.find("pass --hf-config"), std::string::npos) << without.output;

  std::ofstream(config) << c.to_json().dump();
  RunResult with = run_convert(scratch, "--from moecore --to hf --input " + ckpt + " --output " +
                                            back + " --hf-config " + config);
  ASSERT_EQ(with.exit_code, 0) << with.output;
  Checkpoint hf(back);
  EXPECT_TRUE(same_bytes(
      hf.read("lm_head.weight"),
      checkpoint::hf_mixtral::moecore_to_hf(c, trained.store, DType::F32).back().second));
  EXPECT_EQ(hf.read("model.embed_tokens.weight").shape(), (Shape{37, 24}));  // padding dropped
}

TEST(MoeConvert, BadInvocationsExplainThemselves) {
  ScratchDir scratch("tool_errors");
  const MixtralConfig c = tiny_config();
  TinyModel original(c, DType::F32, 13);
  const std::string hf = scratch / "hf";
  write_hf_model(hf, c, original.store);
  auto expect_failure = [&](const std::string& arguments, const std::string& text) {
    RunResult result = run_convert(scratch, arguments);
    EXPECT_NE(result.exit_code, 0) << arguments;
    EXPECT_NE(result.output.find(text), std::string::npos)
        << arguments << "\noutput: " << result.output << "\nmissing: " << text;
  };
  expect_failure("--from hf --to moecore --input " + hf + " --output " + hf,
                 "exists and is not empty");
  expect_failure("--from hf --to hf --input " + hf + " --output " + (scratch / "o"),
                 "--from and --to are both 'hf'");
  expect_failure("--from gguf --to moecore --input " + hf + " --output " + (scratch / "o"), "gguf");
  expect_failure(
      "--from hf --to moecore --input " + (scratch / "none") + " --output " + (scratch / "o"),
      "is not a directory");
  expect_failure("--from moecore --to hf --input " + hf + " --output " + (scratch / "o"),
                 "not a moecore checkpoint directory");
  expect_failure(
      "--from hf --to moecore --dtype int8 --input " + hf + " --output " + (scratch / "o"), "int8");

  // A tensor the config does not account for, and a missing one.
  ScratchDir extra("tool_extra");
  write_hf_model(extra.path.string(), c, original.store, uint64_t(1) << 30);
  checkpoint::safetensors::write_file(extra / "more.safetensors", {{"vision.proj", Tensor({2})}});
  expect_failure(
      "--from hf --to moecore --input " + extra.path.string() + " --output " + (scratch / "o"),
      "'vision.proj' that a Mixtral model has no place for");
  MixtralConfig bigger = c;
  bigger.num_hidden_layers = 3;
  std::ofstream(extra / "config.json") << bigger.to_json().dump();
  expect_failure(
      "--from hf --to moecore --input " + extra.path.string() + " --output " + (scratch / "o"),
      "no tensor 'model.layers.2.input_layernorm.weight'");
  EXPECT_FALSE(std::filesystem::exists(scratch / "o"));
}

}  // namespace
}  // namespace moe::testing

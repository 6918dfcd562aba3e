// Runs the moe-convert program: HF -> moecore -> HF on a tiny model, checking that the moecore
// checkpoint loads into a real GPTModel and that both directions are bitwise exact.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "convert/mixtral_testing.h"
#include "moe/checkpoint/checkpoint.h"
#include "support/testing.h"

namespace moe::testing {
namespace {

using convert::safetensors::Checkpoint;

struct RunResult {
  int exit_code = 0;
  std::string output;  // stdout and stderr
};

RunResult run_convert(const ScratchDir& scratch, const std::string& arguments) {
  const std::string log = scratch.file("convert.log");
  const std::string command =
      std::string(MOE_CONVERT_PROGRAM) + " " + arguments + " > " + log + " 2>&1";
  RunResult result;
  int status = std::system(command.c_str());
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  result.output = read_bytes(log);
  return result;
}

// A tiny model written as an HF directory `hf`, with `ckpt` and `back` for the conversions.
struct ConvertCase {
  ScratchDir scratch;
  HfMoeConfig config = tiny_config();
  TinyModel original;
  std::string hf = scratch.file("hf"), ckpt = scratch.file("ckpt"), back = scratch.file("hf_back");
  ConvertCase(const std::string& tag, DType dtype, uint64_t seed)
      : scratch(tag), original(config, dtype, seed) {
    write_hf_model(hf, config, original.store);
  }
  RunResult run(const std::string& arguments) const { return run_convert(scratch, arguments); }
  // Every tensor of `back` equals the same tensor of `hf` converted to `dtype`.
  void expect_back_equals_hf(DType dtype) const {
    Checkpoint before(hf), after(back);
    ASSERT_EQ(before.names(), after.names());
    for (const std::string& name : before.names()) {
      EXPECT_TRUE(same_bytes(before.read(name).to(dtype), after.read(name))) << name;
    }
  }
};

checkpoint::TrainingState load_strictly(const std::string& ckpt, ParameterStore& store) {
  checkpoint::LoadOptions options;
  options.load_rng = false;
  return checkpoint::load_checkpoint(ckpt, store, nullptr, nullptr, comm::single_process_state(),
                                     options);
}

TEST(MoeConvert, HfToMoecoreToHfIsBitwise) {
  ConvertCase t("tool_round_trip", DType::BF16, 11);
  RunResult to_moecore = t.run("--from hf --to moecore --input " + t.hf + " --output " + t.ckpt +
                               " --iteration 5 --global-batch-size 4 --verify"
                               " --make-vocab-size-divisible-by 1");
  ASSERT_EQ(to_moecore.exit_code, 0) << to_moecore.output;
  EXPECT_CONTAINS(to_moecore.output, "--num-experts 3 --moe-router-topk 2",
                  "20 consumed training samples", "verified: ");
  EXPECT_EQ(checkpoint::read_tracker(t.ckpt), 5);

  // The checkpoint loads into the real model, strictly, with the original weights.
  TinyModel loaded(t.config, DType::BF16, 99);
  EXPECT_EQ(load_strictly(t.ckpt, loaded.store).consumed_train_samples, 5 * 4);
  for (int i = 0; i < t.original.store.count(); ++i) {
    EXPECT_TRUE(
        same_bytes(t.original.store.param(ParamHandle{i}), loaded.store.param(ParamHandle{i})))
        << t.original.store.spec(ParamHandle{i}).name;
  }

  RunResult to_hf = t.run("--from moecore --to hf --input " + t.ckpt + " --output " + t.back +
                          " --max-shard-bytes 3000 --verify");
  ASSERT_EQ(to_hf.exit_code, 0) << to_hf.output;
  EXPECT_CONTAINS(to_hf.output, "verified: ");
  t.expect_back_equals_hf(DType::BF16);
  EXPECT_EQ(HfMoeConfig::from_json(nlohmann::json::parse(std::ifstream(t.back + "/config.json")),
                                   "config")
                .to_json(),
            t.config.to_json());
}

TEST(MoeConvert, DtypeOptionConverts) {
  ConvertCase t("tool_dtype", DType::F32, 12);
  ASSERT_EQ(t.run("--from hf --to moecore --dtype bf16 --input " + t.hf + " --output " + t.ckpt +
                  " --make-vocab-size-divisible-by 1")
                .exit_code,
            0);
  RunResult to_hf = t.run("--from moecore --to hf --input " + t.ckpt + " --output " + t.back);
  ASSERT_EQ(to_hf.exit_code, 0) << to_hf.output;
  t.expect_back_equals_hf(DType::BF16);
}

// Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by * tp: 37 -> 64.
TEST(MoeConvert, PadsTheVocabularyAsMoeTrainWill) {
  ConvertCase t("tool_padding", DType::F32, 14);
  RunResult to_moecore = t.run("--from hf --to moecore --input " + t.hf + " --output " + t.ckpt +
                               " --make-vocab-size-divisible-by 16 --tensor-model-parallel-size 4");
  ASSERT_EQ(to_moecore.exit_code, 0) << to_moecore.output;
  EXPECT_CONTAINS(to_moecore.output, "padded from 37 to 64 rows");

  HfMoeConfig padded = t.config;
  padded.padded_vocab_size = 64;
  TinyModel loaded(padded, DType::F32, 99);
  load_strictly(t.ckpt, loaded.store);
  Tensor embedding = loaded.store.param(loaded.store.find("embedding.word_embeddings.weight"));
  Tensor output = loaded.store.param(loaded.store.find("output_layer.weight"));  // [H, 64]
  Tensor original_embedding =
      t.original.store.param(t.original.store.find("embedding.word_embeddings.weight"));
  for (int64_t i = 0; i < 37 * 24; ++i) ASSERT_EQ(embedding.get(i), original_embedding.get(i));
  for (int64_t i = 37 * 24; i < 64 * 24; ++i) ASSERT_EQ(embedding.get(i), 0.0f) << i;
  for (int64_t h = 0; h < 24; ++h) {
    for (int64_t v = 37; v < 64; ++v) ASSERT_EQ(output.get(h * 64 + v), 0.0f);
  }

  ASSERT_EQ(t.run("--from moecore --to hf --input " + t.ckpt + " --output " + t.back).exit_code, 0);
  t.expect_back_equals_hf(DType::F32);
}

// What users do next: moe-train with the printed flags fine-tunes from the converted checkpoint.
TEST(MoeConvert, MoeTrainFineTunesFromTheConvertedCheckpoint) {
  ConvertCase t("tool_moe_train", DType::BF16, 16);
  RunResult converted = t.run("--from hf --to moecore --input " + t.hf + " --output " + t.ckpt +
                              " --make-vocab-size-divisible-by 1");
  ASSERT_EQ(converted.exit_code, 0) << converted.output;
  const std::string marker = "moe-train flags for this model: ";
  const size_t at = converted.output.find(marker);
  ASSERT_NE(at, std::string::npos) << converted.output;
  const size_t begin = at + marker.size();
  const std::string flags =
      converted.output.substr(begin, converted.output.find('\n', begin) - begin);
  // NullTokenizer adds an end-of-document token: 36 + 1 = the model's 37 rows.
  const std::string command = std::string(MOE_TRAIN_PROGRAM) + " " + flags + " --load " + t.ckpt +
                              " --finetune --mock-data --tokenizer-type NullTokenizer "
                              "--vocab-size 36 --seq-length 8 --micro-batch-size 2 "
                              "--global-batch-size 2 --train-iters 2 --lr 1e-4 --bf16 "
                              "--log-interval 1 --save " +
                              t.scratch.file("trained") + " --save-interval 2 > " +
                              t.scratch.file("train.log") + " 2>&1";
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
  EXPECT_CONTAINS(read_bytes(t.scratch.file("train.log")),
                  "loaded checkpoint from '" + t.ckpt + "' at iteration 0");

  // The trained checkpoint (with optimizer state) converts back to HF from the moe-train command
  // line it records (vocab_size = its 37 rows), or from a config.json given with --hf-config.
  RunResult from_args = t.run("--from moecore --to hf --input " + t.scratch.file("trained") +
                              " --output " + t.scratch.file("from_args"));
  ASSERT_EQ(from_args.exit_code, 0) << from_args.output;
  EXPECT_CONTAINS(from_args.output, "comes from the moe-train command line");
  EXPECT_EQ(HfMoeConfig::from_json(
                nlohmann::json::parse(std::ifstream(t.scratch.file("from_args/config.json"))), "c")
                .to_json(),
            t.config.to_json());
  RunResult back = t.run("--from moecore --to hf --input " + t.scratch.file("trained") +
                         " --output " + t.back + " --hf-config " + t.hf + "/config.json");
  ASSERT_EQ(back.exit_code, 0) << back.output;
  EXPECT_CONTAINS(back.output, "from iteration 2");
  Checkpoint before(t.hf), after(t.back);
  EXPECT_EQ(before.names(), after.names());
  EXPECT_FALSE(same_bytes(before.read("lm_head.weight"), after.read("lm_head.weight")));
}

// A checkpoint converted at iteration N resumes (without --finetune) at the data position N global
// batches in; one claiming iteration N with no consumed samples is refused instead of silently
// restarting the data.
TEST(MoeConvert, ConvertedIterationResumesTheDataWhereItClaims) {
  ConvertCase t("tool_resume", DType::BF16, 17);
  RunResult converted = t.run("--from hf --to moecore --input " + t.hf + " --output " + t.ckpt +
                              " --iteration 2 --global-batch-size 2"
                              " --make-vocab-size-divisible-by 1");
  ASSERT_EQ(converted.exit_code, 0) << converted.output;
  const std::string marker = "moe-train flags for this model: ";
  const size_t begin = converted.output.find(marker) + marker.size();
  const std::string flags =
      converted.output.substr(begin, converted.output.find('\n', begin) - begin);
  auto resume = [&](const std::string& log) {
    const std::string command =
        std::string(MOE_TRAIN_PROGRAM) + " " + flags + " --load " + t.ckpt +
        " --no-load-optim --no-load-rng --mock-data --tokenizer-type NullTokenizer "
        "--vocab-size 36 --seq-length 8 --micro-batch-size 2 --global-batch-size 2 "
        "--train-iters 3 --lr 1e-4 --bf16 --log-interval 1 > " +
        t.scratch.file(log) + " 2>&1";
    return std::system(command.c_str());
  };
  EXPECT_EQ(resume("resumed.log"), 0);
  EXPECT_CONTAINS(read_bytes(t.scratch.file("resumed.log")),
                  "iteration        3/       3 | consumed samples:            6 |");

  const std::string metadata = t.ckpt + "/iter_0000002/metadata.json";
  std::string text = read_bytes(metadata);
  const std::string consumed = "\"consumed_train_samples\": 4";
  ASSERT_NE(text.find(consumed), std::string::npos) << text;
  text.replace(text.find(consumed), consumed.size(), "\"consumed_train_samples\": 0");
  write_bytes(metadata, text);
  EXPECT_NE(resume("refused.log"), 0);
  EXPECT_CONTAINS(read_bytes(t.scratch.file("refused.log")),
                  "is at iteration 2 but records 0 consumed training samples");
}

// A checkpoint recording neither an HF config nor a command line converts with --hf-config.
TEST(MoeConvert, CheckpointWithoutModelRecordNeedsHfConfig) {
  ScratchDir scratch("tool_training_ckpt");
  HfMoeConfig c = tiny_config();
  c.padded_vocab_size = 40;
  TinyModel trained(c, DType::F32, 15);
  const std::string ckpt = scratch.file("ckpt"), back = scratch.file("hf"),
                    config = scratch.file("c.json");
  checkpoint::TrainingState state;
  state.iteration = 3;
  checkpoint::save_checkpoint(ckpt, state, trained.store, nullptr, nullptr,
                              comm::single_process_state());
  RunResult without =
      run_convert(scratch, "--from moecore --to hf --input " + ckpt + " --output " + back);
  EXPECT_NE(without.exit_code, 0);
  EXPECT_CONTAINS(without.output, "records neither an HF config nor a moe-train command line");
  EXPECT_CONTAINS(without.output, "pass --hf-config");

  // A recorded command line of a model HF's Mixtral cannot express is refused, saying why.
  state.iteration = 4;
  state.args["command_line"] = {"--num-layers",          "2",
                                "--hidden-size",         "24",
                                "--num-attention-heads", "6",
                                "--normalization",       "LayerNorm",
                                "--qk-layernorm",        "--add-qkv-bias"};
  checkpoint::save_checkpoint(ckpt, state, trained.store, nullptr, nullptr,
                              comm::single_process_state());
  RunResult layer_norm =
      run_convert(scratch, "--from moecore --to hf --input " + ckpt + " --output " + back);
  EXPECT_NE(layer_norm.exit_code, 0);
  EXPECT_NE(layer_norm.output.find("cannot express (--normalization LayerNorm, no --swiglu, "
                                   "--position-embedding-type learned_absolute"),
            std::string::npos)
      << layer_norm.output;
  EXPECT_CONTAINS(layer_norm.output, "Qwen3MoeForCausalLM cannot express",
                  "--qk-layernorm with --add-qkv-bias");

  std::ofstream(config) << c.to_json().dump();
  RunResult with = run_convert(scratch, "--from moecore --to hf --input " + ckpt + " --output " +
                                            back + " --hf-config " + config + " --iteration 3");
  ASSERT_EQ(with.exit_code, 0) << with.output;
  Checkpoint hf(back);
  EXPECT_TRUE(
      same_bytes(hf.read("lm_head.weight"),
                 convert::hf_moe::moecore_to_hf(c, trained.store, DType::F32).back().second));
  EXPECT_EQ(hf.read("model.embed_tokens.weight").shape(), (Shape{37, 24}));  // padding dropped
}

TEST(MoeConvert, BadInvocationsExplainThemselves) {
  ScratchDir scratch("tool_errors");
  const HfMoeConfig c = tiny_config();
  TinyModel original(c, DType::F32, 13);
  const std::string hf = scratch.file("hf");
  write_hf_model(hf, c, original.store);
  auto expect_failure = [&](const std::string& arguments, const std::string& text) {
    RunResult result = run_convert(scratch, arguments);
    EXPECT_NE(result.exit_code, 0) << arguments;
    EXPECT_CONTAINS(result.output, text) << "arguments: " << arguments;
  };
  expect_failure("--from hf --to moecore --input " + hf + " --output " + hf,
                 "exists and is not empty");
  expect_failure("--from hf --to hf --input " + hf + " --output " + scratch.file("o"),
                 "--from and --to are both 'hf'");
  expect_failure("--from gguf --to moecore --input " + hf + " --output " + scratch.file("o"),
                 "gguf");
  expect_failure(
      "--from hf --to moecore --input " + scratch.file("none") + " --output " + scratch.file("o"),
      "is not a directory");
  expect_failure("--from moecore --to hf --input " + hf + " --output " + scratch.file("o"),
                 "not a moecore checkpoint directory");
  expect_failure(
      "--from hf --to moecore --iteration 3 --input " + hf + " --output " + scratch.file("o"),
      "--iteration 3 needs --global-batch-size");
  expect_failure(
      "--from hf --to moecore --dtype int8 --input " + hf + " --output " + scratch.file("o"),
      "int8");

  // A tensor the config does not account for, and a missing one.
  ScratchDir extra("tool_extra");
  write_hf_model(extra.path.string(), c, original.store, uint64_t(1) << 30);
  convert::safetensors::write_file(extra.file("more.safetensors"), {{"vision.proj", Tensor({2})}});
  expect_failure(
      "--from hf --to moecore --input " + extra.path.string() + " --output " + scratch.file("o"),
      "'vision.proj' that a MixtralForCausalLM model has no place for");
  HfMoeConfig bigger = c;
  bigger.num_hidden_layers = 3;
  std::ofstream(extra.file("config.json")) << bigger.to_json().dump();
  expect_failure(
      "--from hf --to moecore --input " + extra.path.string() + " --output " + scratch.file("o"),
      "no tensor 'model.layers.2.input_layernorm.weight'");
  EXPECT_FALSE(std::filesystem::exists(scratch.file("o")));

  // A checkpoint that does not fit the given config: the error names the tensor, and the empty
  // output directory stays empty.
  const std::string ckpt = scratch.file("ckpt"), empty_output = scratch.file("empty_output");
  ASSERT_EQ(run_convert(scratch, "--from hf --to moecore --input " + hf + " --output " + ckpt +
                                     " --make-vocab-size-divisible-by 1")
                .exit_code,
            0);
  HfMoeConfig more_experts = c;
  more_experts.num_local_experts = 4;
  std::ofstream(scratch.file("more_experts.json")) << more_experts.to_json().dump();
  std::filesystem::create_directories(empty_output);
  expect_failure("--from moecore --to hf --input " + ckpt + " --output " + empty_output +
                     " --hf-config " + scratch.file("more_experts.json"),
                 "decoder.layers.0.mlp");
  EXPECT_TRUE(std::filesystem::is_empty(empty_output));
}

}  // namespace
}  // namespace moe::testing

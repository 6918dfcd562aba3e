// Qwen2-MoE and Qwen3-MoE through moe-convert: a random model in the Hugging Face layout, written
// by an independent numpy writer (qwen_moe_reference.py), is imported by the moe-convert program;
// the logits moecore computes on it equal those of the script's own fp64 forward (transformers'
// Qwen2MoeForCausalLM / Qwen3MoeForCausalLM semantics); export and re-import are bitwise.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "moe/checkpoint/checkpoint.h"
#include "moe/comm/parallel_state.h"
#include "moe/convert/hf_moe.h"
#include "moe/model/gpt_model.h"
#include "moe/train/arguments.h"
#include "support/testing.h"

namespace moe::convert::hf_moe {
namespace {

using moe::testing::expect_error_containing;
using moe::testing::read_bytes;
using moe::testing::same_bytes;
using moe::testing::ScratchDir;

const std::string kReference =
    "/usr/bin/python3 " + std::string(MOE_CONVERT_TEST_DIR) + "/qwen_moe_reference.py";

struct CommandResult {
  int exit_code = 0;
  std::string output;  // stdout, with stderr when asked
};

CommandResult run_command(const std::string& command) {
  CommandResult result;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return {-1, ""};
  char buffer[4096];
  for (size_t got; (got = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0;) {
    result.output.append(buffer, got);
  }
  const int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

CommandResult run_convert(const std::string& arguments) {
  return run_command(std::string(MOE_CONVERT_PROGRAM) + " " + arguments + " 2>&1");
}

HfMoeConfig read_config(const std::string& path) {
  return HfMoeConfig::from_json(nlohmann::json::parse(std::ifstream(path)), path);
}

// The moe-train flags moe-convert printed, as one line for a shell ("" when missing) ...
std::string printed_flag_line(const std::string& output) {
  const std::string marker = "moe-train flags for this model: ";
  const size_t at = output.find(marker);
  if (at == std::string::npos) return "";
  const size_t begin = at + marker.size();
  return output.substr(begin, output.find('\n', begin) - begin);
}

// ... and split as a shell would (the layer pattern is quoted).
std::vector<std::string> printed_flags(const std::string& output) {
  std::istringstream words(printed_flag_line(output));
  std::vector<std::string> argv;
  for (std::string word; words >> word;) {
    if (word.size() >= 2 && word.front() == '\'' && word.back() == '\'') {
      word = word.substr(1, word.size() - 2);
    }
    argv.push_back(word);
  }
  return argv;
}

// A GPTModel of `config` on one process in fp64, its parameters loaded strictly from `ckpt`.
struct LoadedModel {
  ParameterStore store{DType::F64};
  std::unique_ptr<model::GPTModel> model;
  LoadedModel(const HfMoeConfig& config, const std::string& ckpt) {
    model::TransformerConfig t = config.transformer_config();
    t.seq_length = 7;
    model = std::make_unique<model::GPTModel>(t, comm::single_process_state(), store);
    store.allocate();
    checkpoint::LoadOptions options;
    options.load_optim = false;
    options.load_rng = false;
    checkpoint::load_checkpoint(ckpt, store, nullptr, nullptr, comm::single_process_state(),
                                options);
  }
};

class HfQwen : public ::testing::TestWithParam<std::string> {};

TEST_P(HfQwen, ImportGivesTheReferenceLogitsAndExportIsBitwise) {
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");
  const std::string family = GetParam();
  ScratchDir scratch("hf_" + family);
  const std::string hf = scratch.file("hf"), ckpt = scratch.file("ckpt"),
                    back = scratch.file("hf_back"), again = scratch.file("ckpt_again");
  CommandResult written = run_command(kReference + " write " + hf + " " + family + " 31 2>&1");
  ASSERT_EQ(written.exit_code, 0) << written.output;

  CommandResult imported = run_convert("--from hf --to moecore --input " + hf + " --output " +
                                       ckpt + " --make-vocab-size-divisible-by 16");
  ASSERT_EQ(imported.exit_code, 0) << imported.output;
  HfMoeConfig config = read_config(hf + "/config.json");
  EXPECT_EQ(model_type_name(config.family), family);
  config.padded_vocab_size = model::padded_vocab_size(config.vocab_size, 16, 1);
  EXPECT_CONTAINS(imported.output, "padded from " + std::to_string(config.vocab_size) + " to " +
                                       std::to_string(config.padded_vocab_size) + " rows");

  // The printed flags describe the model the logits come from.
  const train::TrainingArguments args = train::parse_arguments(printed_flags(imported.output)).args;
  const model::TransformerConfig t = config.transformer_config();
  EXPECT_EQ(args.num_layers, t.num_layers);
  EXPECT_EQ(args.ffn_hidden_size, t.ffn_hidden_size);
  EXPECT_EQ(args.kv_channels, t.kv_channels);
  EXPECT_EQ(args.num_query_groups, t.num_query_groups);
  EXPECT_EQ(args.qk_layernorm, t.qk_layernorm);
  EXPECT_EQ(args.add_qkv_bias, t.add_qkv_bias);
  EXPECT_EQ(args.untie_embeddings_and_output_weights, t.untie_embeddings_and_output_weights);
  EXPECT_EQ(args.num_experts, t.num_experts);
  EXPECT_EQ(args.moe_router_topk, t.moe.moe_router_topk);
  EXPECT_EQ(args.moe_ffn_hidden_size.value_or(0), t.moe.moe_ffn_hidden_size.value_or(0));
  EXPECT_EQ(args.moe_router_pre_softmax, t.moe.moe_router_pre_softmax);
  EXPECT_EQ(args.moe_shared_expert_intermediate_size.value_or(0),
            t.moe_shared_expert_intermediate_size);
  EXPECT_EQ(args.moe_shared_expert_gate, t.moe_shared_expert_gate);
  EXPECT_EQ(args.rotary_base, t.rotary_base);
  EXPECT_EQ(args.norm_epsilon, config.rms_norm_eps);
  std::vector<bool> pattern;
  for (int layer = 0; layer < t.num_layers; ++layer) pattern.push_back(t.is_moe_layer(layer));
  const train::TrainingArguments finalized = [&] {
    std::vector<std::string> argv = printed_flags(imported.output);
    for (const char* extra :
         {"--seq-length", "7", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-4",
          "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "30"}) {
      argv.push_back(extra);
    }
    train::TrainingArguments a = train::parse_arguments(argv).args;
    train::finalize_arguments(a, 1);
    return a;
  }();
  EXPECT_EQ(finalized.moe_layer_pattern, pattern);

  // moecore's logits on the imported weights against the script's fp64 forward of the HF files.
  LoadedModel loaded(config, ckpt);
  const std::vector<std::vector<int64_t>> tokens = {{3, 0, 36, 7, 7, 12, 5},
                                                    {1, 2, 35, 4, 30, 6, 8}};
  Tensor ids({2, 7}, DType::I64);
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t s = 0; s < 7; ++s) ids.data<int64_t>()[b * 7 + s] = tokens[b][s];
  }
  model::GPTContext ctx;
  ctx.training = false;
  ctx.keep_logits = true;
  loaded.model->forward(ids, ids, ctx);
  CommandResult reference =
      run_command(kReference + " forward " + hf + " '" + nlohmann::json(tokens).dump() + "'");
  ASSERT_EQ(reference.exit_code, 0) << reference.output;
  const nlohmann::json expected = nlohmann::json::parse(reference.output);
  const int64_t Vp = config.padded_vocab_size;
  ASSERT_EQ(ctx.logits.shape(), (Shape{14, Vp}));
  double largest = 0;
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t s = 0; s < 7; ++s) {
      const double* row = ctx.logits.data<double>() + (s * 2 + b) * Vp;
      for (int64_t v = 0; v < config.vocab_size; ++v) {
        const double want = expected[b][s][v].get<double>();
        largest = std::max(largest, std::abs(want));
        // Both sides compute in fp64 and agree to ~1e-11 (the writer's norm gains are
        // float32-exact, see qwen_moe_reference.py); 1e-5 relative, with a floor for logits near
        // zero, is far below any mapping error (a wrong layout moves logits by ~0.1).
        ASSERT_NEAR(row[v], want, 1e-5 * std::max(std::abs(want), 1e-2))
            << family << " sequence " << b << " position " << s << " token " << v;
      }
      for (int64_t v = config.vocab_size; v < Vp; ++v) ASSERT_EQ(row[v], 0.0);  // padding
    }
  }
  EXPECT_GT(largest, 0.5);  // not a degenerate model

  // Export gives back the files the writer wrote, bit for bit; importing them again gives the
  // same checkpoint.
  CommandResult exported = run_convert("--from moecore --to hf --input " + ckpt + " --output " +
                                       back + " --max-shard-bytes 20000");
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  EXPECT_CONTAINS(exported.output, architecture_name(config.family));
  safetensors::Checkpoint before(hf), after(back);
  ASSERT_EQ(before.names(), after.names());
  for (const std::string& name : before.names()) {
    EXPECT_TRUE(same_bytes(before.read(name), after.read(name))) << name;
  }
  HfMoeConfig exported_config = read_config(back + "/config.json");
  exported_config.padded_vocab_size = config.padded_vocab_size;
  EXPECT_EQ(exported_config.to_json(), config.to_json());
  CommandResult reimported = run_convert("--from hf --to moecore --input " + back + " --output " +
                                         again + " --make-vocab-size-divisible-by 16");
  ASSERT_EQ(reimported.exit_code, 0) << reimported.output;
  LoadedModel second(config, again);
  ASSERT_EQ(second.store.count(), loaded.store.count());
  for (int i = 0; i < loaded.store.count(); ++i) {
    EXPECT_TRUE(same_bytes(loaded.store.param(ParamHandle{i}), second.store.param(ParamHandle{i})))
        << loaded.store.spec(ParamHandle{i}).name;
  }
}

// What users do next: moe-train, given the printed flags as a shell passes them, loads the
// converted checkpoint strictly and fine-tunes from it.
TEST_P(HfQwen, MoeTrainFineTunesWithThePrintedFlags) {
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");
  const std::string family = GetParam();
  ScratchDir scratch("hf_train_" + family);
  const std::string hf = scratch.file("hf"), ckpt = scratch.file("ckpt");
  CommandResult written = run_command(kReference + " write " + hf + " " + family + " 32 2>&1");
  ASSERT_EQ(written.exit_code, 0) << written.output;
  CommandResult imported = run_convert("--from hf --to moecore --dtype fp32 --input " + hf +
                                       " --output " + ckpt + " --make-vocab-size-divisible-by 1");
  ASSERT_EQ(imported.exit_code, 0) << imported.output;
  const std::string flags = printed_flag_line(imported.output);
  ASSERT_FALSE(flags.empty()) << imported.output;
  // NullTokenizer adds an end-of-document token: vocab_size - 1 + 1 = the model's rows.
  const int64_t vocab_size = read_config(hf + "/config.json").vocab_size;
  const CommandResult trained = run_command(
      std::string(MOE_TRAIN_PROGRAM) + " " + flags + " --load " + ckpt +
      " --finetune --mock-data --tokenizer-type NullTokenizer --vocab-size " +
      std::to_string(vocab_size - 1) +
      " --seq-length 8 --micro-batch-size 2 --global-batch-size 2 --train-iters 2 --lr 1e-4 "
      "--log-interval 1 --save " +
      scratch.file("trained") + " --save-interval 2 2>&1");
  EXPECT_EQ(trained.exit_code, 0) << flags << "\n" << trained.output;
  EXPECT_CONTAINS(trained.output, "loaded checkpoint from '" + ckpt + "' at iteration 0");

  // The trained checkpoint converts back from the command line it records: the same family, the
  // same HF tensors, the same dense and MoE layers.
  CommandResult back = run_convert("--from moecore --to hf --input " + scratch.file("trained") +
                                   " --output " + scratch.file("back"));
  ASSERT_EQ(back.exit_code, 0) << back.output;
  EXPECT_CONTAINS(back.output, "comes from the moe-train command line");
  const HfMoeConfig original = read_config(hf + "/config.json");
  const HfMoeConfig recovered = read_config(scratch.file("back/config.json"));
  EXPECT_EQ(recovered.family, original.family);
  EXPECT_EQ(recovered.transformer_config().moe_layer_pattern,
            original.transformer_config().moe_layer_pattern);
  safetensors::Checkpoint before(hf), after(scratch.file("back"));
  ASSERT_EQ(before.names(), after.names());
  for (const std::string& name : before.names()) {
    EXPECT_EQ(before.info(name).shape, after.info(name).shape) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(Families, HfQwen, ::testing::Values("qwen3_moe", "qwen2_moe"));

// Tiny configs of both families, with dense layers.
HfMoeConfig tiny(Family family) {
  HfMoeConfig c;
  c.family = family;
  c.vocab_size = 37;
  c.hidden_size = 24;
  c.intermediate_size = 14;
  c.moe_intermediate_size = 10;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 2;
  c.num_local_experts = 4;
  c.num_experts_per_tok = 2;
  c.max_position_embeddings = 64;
  c.rope_theta = 10000;
  c.rms_norm_eps = 1e-6;
  c.norm_topk_prob = family == Family::kQwen3Moe;
  if (family == Family::kQwen3Moe) {
    c.head_dim = 6;
    c.mlp_only_layers = {0};
  } else {
    c.decoder_sparse_step = 2;
    c.shared_expert_intermediate_size = 12;
    c.qkv_bias = true;
  }
  return c;
}

TEST(HfQwenConfig, SpecsMatchWhatGPTModelDeclares) {
  for (Family family : {Family::kQwen3Moe, Family::kQwen2Moe}) {
    const HfMoeConfig c = tiny(family);
    ParameterStore store(DType::F32);
    model::TransformerConfig t = c.transformer_config();
    t.seq_length = 8;
    model::GPTModel model(t, comm::single_process_state(), store);
    const std::vector<ParamSpec> specs = moecore_param_specs(c);
    ASSERT_EQ(int(specs.size()), store.count()) << model_type_name(family);
    for (const ParamSpec& spec : specs) {
      ParamHandle handle = store.find(spec.name);
      ASSERT_GE(handle.index, 0) << spec.name;
      const ParamSpec& declared = store.spec(handle);
      EXPECT_EQ(declared.global_shape, spec.global_shape) << spec.name;
      EXPECT_EQ(declared.group, spec.group) << spec.name;
      EXPECT_EQ(declared.tensor_parallel_duplicate, spec.tensor_parallel_duplicate) << spec.name;
      EXPECT_EQ(declared.weight_decay, spec.weight_decay) << spec.name;
    }
  }
}

TEST(HfQwenConfig, ConfigJsonRoundTripsAndBadValuesAreNamed) {
  for (Family family : {Family::kQwen3Moe, Family::kQwen2Moe}) {
    const nlohmann::json json = tiny(family).to_json();
    EXPECT_EQ(HfMoeConfig::from_json(json, "cfg").to_json(), json);
    EXPECT_EQ(family_of(json, "cfg"), family);
  }
  const nlohmann::json qwen3 = tiny(Family::kQwen3Moe).to_json();
  const nlohmann::json qwen2 = tiny(Family::kQwen2Moe).to_json();
  auto expect_refused = [](nlohmann::json json, const std::function<void(nlohmann::json&)>& edit,
                           std::initializer_list<std::string_view> parts) {
    edit(json);
    expect_error_containing([&] { HfMoeConfig::from_json(json, "my/config.json"); }, parts);
  };
  expect_refused(
      qwen3, [](auto& j) { j["architectures"] = {"LlamaForCausalLM"}; },
      {"my/config.json", "LlamaForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"});
  expect_refused(qwen3,
                 [](auto& j) {
                   j.erase("architectures");
                   j["model_type"] = "deepseek_v3";
                 },
                 {"model_type \"deepseek_v3\" is not one moe-convert converts"});
  expect_refused(qwen3, [](auto& j) { j["model_type"] = "qwen2_moe"; },
                 {"\"qwen2_moe\"", "Qwen3MoeForCausalLM"});
  expect_refused(qwen2, [](auto& j) { j["use_sliding_window"] = true; },
                 {"'use_sliding_window' is true"});
  expect_refused(qwen3, [](auto& j) { j.erase("moe_intermediate_size"); },
                 {"'moe_intermediate_size' is missing"});
  expect_refused(qwen2, [](auto& j) { j.erase("shared_expert_intermediate_size"); },
                 {"'shared_expert_intermediate_size' is missing"});
  expect_refused(qwen3, [](auto& j) { j.erase("num_experts"); }, {"'num_experts' is missing"});
  expect_refused(qwen3,
                 [](auto& j) {
                   j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4}};
                 },
                 {"'rope_scaling'", "yarn"});
  expect_refused(qwen2,
                 [](auto& j) {
                   j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4}};
                 },
                 {"'rope_parameters'", "\"yarn\""});
  expect_refused(qwen3, [](auto& j) { j["attention_bias"] = true; }, {"'attention_bias' is true"});
  expect_refused(qwen2, [](auto& j) { j["hidden_act"] = "gelu"; }, {"'hidden_act'", "\"gelu\""});
  expect_refused(qwen3,
                 [](auto& j) {
                   j["mlp_only_layers"] = {1, 3};
                 },
                 {"mlp_only_layers lists layer 3"});
  expect_refused(qwen2, [](auto& j) { j["decoder_sparse_step"] = 0; },
                 {"'decoder_sparse_step' must be a positive integer, got 0"});
  expect_refused(qwen3, [](auto& j) { j["norm_topk_prob"] = "yes"; },
                 {"'norm_topk_prob' must be true or false"});
  expect_refused(qwen3, [](auto& j) { j["num_experts_per_tok"] = 1; },
                 {"num_experts_per_tok 1 with norm_topk_prob true"});

  // The rope base comes from transformers 5's rope_parameters as from rope_theta.
  nlohmann::json v5 = qwen2;
  v5.erase("rope_theta");
  v5["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 123456.0}};
  EXPECT_EQ(HfMoeConfig::from_json(v5, "cfg").rope_theta, 123456.0);
}

TEST(HfQwenConfig, MoeConvertRefusesAnUnknownArchitectureByName) {
  ScratchDir scratch("hf_unknown");
  nlohmann::json json = tiny(Family::kQwen3Moe).to_json();
  json["architectures"] = {"Qwen3NextForCausalLM"};
  std::filesystem::create_directories(scratch.file("hf"));
  std::ofstream(scratch.file("hf/config.json")) << json.dump();
  CommandResult result = run_convert("--from hf --to moecore --input " + scratch.file("hf") +
                                     " --output " + scratch.file("out"));
  EXPECT_NE(result.exit_code, 0);
  EXPECT_CONTAINS(result.output, "Qwen3NextForCausalLM", "is not one moe-convert converts");
}

}  // namespace
}  // namespace moe::convert::hf_moe

// DeepSeek-V3 import / export: a random checkpoint written by an independent numpy writer
// (deepseek_reference.py) goes through the moe-convert program, and moecore's forward on it equals
// the numpy fp64 forward of HF's DeepseekV3ForCausalLM; export then import is bitwise; bad
// config.json values are refused naming the field.
#include "moe/convert/hf_deepseek.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "model/model_testing.h"
#include "moe/checkpoint/checkpoint.h"
#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "moe/train/arguments.h"
#include "support/testing.h"

namespace moe::convert::hf_deepseek {
namespace {

using moe::testing::expect_error_containing;
using moe::testing::ScratchDir;

const std::string kReference = MOE_CONVERT_TEST_DIR "/deepseek_reference.py";

// Runs a shell command, returning its exit status and its stdout and stderr together.
std::pair<int, std::string> run(const std::string& command) {
  std::string output;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return {-1, "popen failed"};
  char buffer[4096];
  for (size_t got; (got = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0;) {
    output.append(buffer, got);
  }
  const int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// A moecore model of `config` (vocabulary unpadded), parameters loaded from checkpoint `ckpt`.
struct LoadedModel {
  ParameterStore store;
  std::unique_ptr<model::GPTModel> model;
  LoadedModel(const DeepSeekConfig& config, DType dtype, const std::string& ckpt, int seq)
      : store(dtype) {
    model::TransformerConfig t = config.transformer_config();
    t.seq_length = seq;
    model = std::make_unique<model::GPTModel>(t, comm::single_process_state(), store);
    store.allocate();
    checkpoint::LoadOptions options;
    options.load_rng = false;
    checkpoint::load_checkpoint(ckpt, store, nullptr, nullptr, comm::single_process_state(),
                                options);
  }
};

void expect_same_parameters(const ParameterStore& a, const ParameterStore& b) {
  ASSERT_EQ(a.count(), b.count());
  for (int i = 0; i < a.count(); ++i) {
    const std::string& name = a.spec(ParamHandle{i}).name;
    EXPECT_TRUE(moe::testing::same_bytes(a.param(ParamHandle{i}), b.param(b.find(name)))) << name;
  }
}

std::string convert(const std::string& arguments, std::string* output = nullptr) {
  auto [status, text] = run(std::string(MOE_CONVERT_PROGRAM) + " " + arguments);
  if (output) *output = text;
  return status == 0 ? "" : "moe-convert " + arguments + " failed:\n" + text;
}

// The semantic check: log-softmax of moecore's logits for every position and vocabulary entry
// (each read as the loss of that label at that one position) equals the numpy fp64 forward of
// HF's DeepSeek on the same weights. V3: MLA's layout and interleaved rope, YaRN, the dense first
// layer, sigmoid + bias group-limited routing, scaling and the shared expert; V2: q_proj without
// query compression, complex-pair rope, softmax group-limited greedy routing, two shared experts.
void expect_forward_matches_numpy(const std::string& variant, const std::string& flags) {
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");
  ScratchDir dir("deepseek_forward_" + variant);
  const std::string hf = dir.file("hf"), ckpt = dir.file("ckpt");
  auto [written, write_log] =
      run("/usr/bin/python3 " + kReference + " write " + hf + " 17 " + variant);
  ASSERT_EQ(written, 0) << write_log;
  std::string printed;
  ASSERT_EQ(convert("--from hf --to moecore --input " + hf + " --output " + ckpt +
                        " --make-vocab-size-divisible-by 1",
                    &printed),
            "");
  EXPECT_CONTAINS(printed, flags);

  const DeepSeekConfig config = DeepSeekConfig::from_json(read_json(hf + "/config.json"), "cfg");
  const int64_t B = 2, S = 6, V = config.vocab_size;
  LoadedModel loaded(config, DType::F64, ckpt, int(S));
  Tensor tokens = model::testing::random_tokens(B, S, V, 5);
  nlohmann::json token_rows = nlohmann::json::array();
  for (int64_t b = 0; b < B; ++b) {
    token_rows.push_back(
        std::vector<int64_t>(tokens.data<int64_t>() + b * S, tokens.data<int64_t>() + (b + 1) * S));
  }
  auto [status, text] =
      run("/usr/bin/python3 " + kReference + " logprobs " + hf + " '" + token_rows.dump() + "'");
  ASSERT_EQ(status, 0) << text;
  const nlohmann::json reference = nlohmann::json::parse(text);

  Tensor mask = Tensor::zeros({B, S}, DType::F64);
  Tensor labels({B, S}, DType::I64);
  double spread = 0;  // how far the predictions are from uniform: the check is not vacuous
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s) {
      mask.data<double>()[b * S + s] = 1;
      for (int64_t v = 0; v < V; ++v) {
        for (int64_t i = 0; i < B * S; ++i) labels.data<int64_t>()[i] = v;
        model::GPTContext ctx;
        ctx.training = false;
        const double logprob = -loaded.model->forward(tokens, labels, ctx, mask);
        const double expected = reference[b][s][v].get<double>();
        // fp64 on both sides: only summation order differs (~1e-14); 1e-9 leaves room for the
        // fp32 epsilon and expert bias moecore stores, far below any layout or rope mistake.
        EXPECT_NEAR(logprob, expected, 1e-9 * std::max(1.0, std::abs(expected)))
            << "batch " << b << " position " << s << " token " << v;
        spread = std::max(spread, std::abs(expected + std::log(double(V))));
      }
      mask.data<double>()[b * S + s] = 0;
    }
  }
  EXPECT_GT(spread, 1.0);

  // The multi-token-prediction module (V3): its loss on random labels equals the numpy one.
  if (config.num_nextn_predict_layers == 0) return;
  Tensor mtp_labels = model::testing::random_tokens(B, S, V, 6);
  nlohmann::json label_rows = nlohmann::json::array();
  for (int64_t b = 0; b < B; ++b) {
    label_rows.push_back(std::vector<int64_t>(mtp_labels.data<int64_t>() + b * S,
                                              mtp_labels.data<int64_t>() + (b + 1) * S));
  }
  auto [mtp_status, mtp_text] = run("/usr/bin/python3 " + kReference + " mtp_losses " + hf + " '" +
                                    token_rows.dump() + "' '" + label_rows.dump() + "'");
  ASSERT_EQ(mtp_status, 0) << mtp_text;
  const nlohmann::json mtp_reference = nlohmann::json::parse(mtp_text);
  model::GPTContext ctx;
  ctx.training = false;
  loaded.model->forward(tokens, mtp_labels, ctx);
  ASSERT_EQ(ctx.mtp_losses.size(), mtp_reference.size());
  for (size_t k = 0; k < ctx.mtp_losses.size(); ++k) {
    const double expected = mtp_reference[k].get<double>();
    EXPECT_NEAR(ctx.mtp_losses[k].loss, expected, 1e-9 * expected) << "MTP depth " << k + 1;
  }
}

TEST(HfDeepSeek, ForwardMatchesNumpyDeepSeekV3) {
  expect_forward_matches_numpy("v3",
                               "--moe-layer-freq '[0]*1+[1]*2' --moe-router-score-function sigmoid "
                               "--moe-router-enable-expert-bias --moe-router-topk-scaling-factor "
                               "2.5 --moe-router-num-groups 4 --moe-router-group-topk 2 "
                               "--moe-shared-expert-intermediate-size 6 --mtp-num-layers 1");
}

TEST(HfDeepSeek, ForwardMatchesNumpyDeepSeekV2) {
  expect_forward_matches_numpy("v2",
                               "--moe-router-pre-softmax --moe-router-topk-scaling-factor 1.5 "
                               "--moe-router-num-groups 4 --moe-router-group-topk 2 "
                               "--moe-shared-expert-intermediate-size 12");
}

// moecore -> HF -> moecore through the program reproduces the checkpoint bitwise: V3 in fp32 and
// bf16 (the fp32 expert bias stays fp32 in the export) and V2.
TEST(HfDeepSeek, ExportThenImportIsBitwise) {
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");
  for (const auto& [variant, dtype] :
       {std::pair<std::string, std::string>{"v3", "fp32"}, {"v3", "bf16"}, {"v2", "fp32"}}) {
    ScratchDir dir("deepseek_round_trip_" + variant + "_" + dtype);
    const std::string hf = dir.file("hf"), ckpt = dir.file("ckpt"), back = dir.file("back"),
                      again = dir.file("again");
    auto [written, write_log] =
        run("/usr/bin/python3 " + kReference + " write " + hf + " 3 " + variant);
    ASSERT_EQ(written, 0) << write_log;
    ASSERT_EQ(
        convert("--from hf --to moecore --input " + hf + " --output " + ckpt + " --dtype " + dtype),
        "");
    ASSERT_EQ(convert("--from moecore --to hf --input " + ckpt + " --output " + back +
                      " --max-shard-bytes 20000"),
              "");
    EXPECT_TRUE(std::filesystem::exists(back + "/model.safetensors.index.json"));
    const nlohmann::json exported = read_json(back + "/config.json");
    EXPECT_EQ(exported["model_type"], "deepseek_" + variant);
    ASSERT_EQ(convert("--from hf --to moecore --input " + back + " --output " + again), "");
    const DeepSeekConfig config = DeepSeekConfig::from_json(exported, "exported");
    DeepSeekConfig padded = config;
    padded.padded_vocab_size = 128;  // moe-convert's default padding
    const DType store_dtype = dtype == "bf16" ? DType::BF16 : DType::F32;
    LoadedModel first(padded, store_dtype, ckpt, 4), second(padded, store_dtype, again, 4);
    expect_same_parameters(first.store, second.store);
    safetensors::Checkpoint hf_back(back);
    if (variant == "v3") {
      EXPECT_EQ(hf_back.info("model.layers.1.mlp.gate.e_score_correction_bias").dtype, DType::F32);
    }
    EXPECT_EQ(hf_back.info("model.layers.1.mlp.gate.weight").dtype, store_dtype);
  }
}

// What users do next: moe-train with the printed flags (shell-quoted --moe-layer-freq included)
// fine-tunes from the converted checkpoint, and the trained checkpoint converts back to HF.
TEST(HfDeepSeek, MoeTrainFineTunesWithThePrintedFlags) {
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");
  ScratchDir dir("deepseek_moe_train");
  const std::string hf = dir.file("hf"), ckpt = dir.file("ckpt"), back = dir.file("back");
  auto [written, write_log] = run("/usr/bin/python3 " + kReference + " write " + hf + " 9");
  ASSERT_EQ(written, 0) << write_log;
  std::string printed;
  ASSERT_EQ(convert("--from hf --to moecore --input " + hf + " --output " + ckpt +
                        " --dtype bf16 --make-vocab-size-divisible-by 1",
                    &printed),
            "");
  const std::string marker = "moe-train flags for this model: ";
  const size_t at = printed.find(marker);
  ASSERT_NE(at, std::string::npos) << printed;
  const size_t begin = at + marker.size();
  const std::string flags = printed.substr(begin, printed.find('\n', begin) - begin);
  // NullTokenizer adds an end-of-document token: 36 + 1 = the model's 37 rows.
  auto [trained, train_log] = run(std::string(MOE_TRAIN_PROGRAM) + " " + flags + " --load " + ckpt +
                                  " --finetune --mock-data --tokenizer-type NullTokenizer "
                                  "--vocab-size 36 --seq-length 8 --micro-batch-size 2 "
                                  "--global-batch-size 2 --train-iters 2 --lr 1e-4 --bf16 "
                                  "--log-interval 1 --save " +
                                  dir.file("trained") + " --save-interval 2");
  ASSERT_EQ(trained, 0) << train_log;
  EXPECT_CONTAINS(train_log, "loaded checkpoint from '" + ckpt + "' at iteration 0");
  ASSERT_EQ(convert("--from moecore --to hf --input " + dir.file("trained") + " --output " + back +
                    " --hf-config " + hf + "/config.json"),
            "");
  safetensors::Checkpoint before(hf), after(back);
  EXPECT_EQ(before.names(), after.names());
  EXPECT_FALSE(moe::testing::same_bytes(before.read("lm_head.weight").to(DType::BF16),
                                        after.read("lm_head.weight")));
}

// HF's MTP modules carry their own copies of the embedding and output head; moecore shares the
// main ones, so a copy that differs is refused by name rather than silently dropped.
TEST(HfDeepSeek, MtpCopiesMustEqualTheMainTensors) {
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");
  ScratchDir dir("deepseek_mtp_copies");
  auto [written, write_log] = run("/usr/bin/python3 " + kReference + " write " + dir.str() + " 4");
  ASSERT_EQ(written, 0) << write_log;
  const DeepSeekConfig c = DeepSeekConfig::from_json(read_json(dir.file("config.json")), "cfg");
  ASSERT_EQ(c.num_nextn_predict_layers, 1);
  safetensors::Checkpoint hf(dir.str());
  for (const char* copy :
       {"model.layers.3.shared_head.head.weight", "model.layers.3.embed_tokens.weight"}) {
    ParameterStore store(DType::F64);
    for (const ParamSpec& spec : moecore_param_specs(c)) store.declare(spec);
    store.allocate();
    auto altered = [&](const std::string& name) {
      Tensor t = hf.read(name);
      if (name == copy) t.data<double>()[5] += 1;
      return t;
    };
    std::string message = "'";  // (built up: "'" + std::string trips GCC 12's -Wrestrict)
    message += copy;
    message += "' differs from the main model's";
    expect_error_containing([&] { hf_to_moecore(c, altered, store); }, message);
  }
}

nlohmann::json reference_config() {
  auto [status, text] = run("/usr/bin/python3 -c 'import json, sys; sys.path.insert(0, \"" +
                            std::string(MOE_CONVERT_TEST_DIR) +
                            "\"); import deepseek_reference as r; print(json.dumps(r.CONFIG))'");
  EXPECT_EQ(status, 0) << text;
  return nlohmann::json::parse(text);
}

TEST(HfDeepSeek, MegatronFlagsParseIntoTheSameModel) {
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");
  const DeepSeekConfig c = DeepSeekConfig::from_json(reference_config(), "cfg");
  std::vector<std::string> argv;
  std::istringstream words(c.megatron_flags());
  for (std::string word; words >> word;) {
    std::erase(word, '\'');  // the shell quoting of --moe-layer-freq
    argv.push_back(word);
  }
  train::TrainingArguments a = train::parse_arguments(argv).args;
  model::TransformerConfig t = c.transformer_config();
  EXPECT_TRUE(a.multi_latent_attention);
  EXPECT_EQ(a.q_lora_rank, t.q_lora_rank);
  EXPECT_EQ(a.kv_lora_rank, t.kv_lora_rank);
  EXPECT_EQ(a.qk_head_dim, t.qk_head_dim);
  EXPECT_EQ(a.qk_pos_emb_head_dim, t.qk_pos_emb_head_dim);
  EXPECT_EQ(a.v_head_dim, t.v_head_dim);
  EXPECT_TRUE(a.qk_layernorm);
  EXPECT_EQ(a.rope_type, "yarn");
  EXPECT_EQ(a.rotary_scaling_factor, 4.0);
  EXPECT_EQ(a.mscale_all_dim, 0.8);
  EXPECT_EQ(a.moe_layer_freq, "[0]*1+[1]*2");
  EXPECT_EQ(a.kv_channels, 10);  // 16 is not a multiple of 3 heads
  EXPECT_EQ(a.moe_ffn_hidden_size, 6);
  EXPECT_EQ(a.moe_router_topk, 4);
  EXPECT_EQ(a.moe_router_score_function, "sigmoid");
  EXPECT_TRUE(a.moe_router_enable_expert_bias);
  EXPECT_EQ(a.moe_router_topk_scaling_factor, 2.5);
  EXPECT_EQ(a.moe_router_num_groups, 4);
  EXPECT_EQ(a.moe_router_group_topk, 2);
  EXPECT_EQ(a.moe_shared_expert_intermediate_size, 6);
  EXPECT_EQ(a.ffn_hidden_size, 20);
  EXPECT_EQ(a.mtp_num_layers, 1);

  // DeepSeek-V2: softmax over all experts, top-k not renormalised (Megatron's pre-softmax).
  nlohmann::json v2 = reference_config();
  v2["model_type"] = "deepseek_v2";
  v2["architectures"] = {"DeepseekV2ForCausalLM"};
  v2.erase("rope_interleave");
  v2["topk_method"] = "group_limited_greedy";
  v2["num_experts_per_tok"] = 2;
  const DeepSeekConfig c2 = DeepSeekConfig::from_json(v2, "v2");
  EXPECT_EQ(c2.version, 2);
  EXPECT_CONTAINS(c2.megatron_flags(), "--moe-router-pre-softmax");
  EXPECT_EQ(c2.megatron_flags().find("sigmoid"), std::string::npos);
  for (const auto& [name, shape] : hf_tensor_shapes(c2)) {
    EXPECT_EQ(name.find("e_score_correction_bias"), std::string::npos) << name;
  }
  EXPECT_EQ(DeepSeekConfig::from_json(c2.to_json(), "again").to_json(), c2.to_json());
  v2["topk_method"] = "greedy";  // n_group / topk_group are then unused, as in HF
  const DeepSeekConfig greedy = DeepSeekConfig::from_json(v2, "greedy");
  EXPECT_FALSE(greedy.transformer_config().moe.group_limited_routing());
  EXPECT_EQ(greedy.megatron_flags().find("--moe-router-num-groups"), std::string::npos);
  EXPECT_EQ(DeepSeekConfig::from_json(c.to_json(), "again").to_json(), c.to_json());
}

TEST(HfDeepSeek, BadConfigValuesAreNamed) {
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");
  const nlohmann::json good = reference_config();
  auto refused = [&](const char* field, const nlohmann::json& value,
                     std::vector<std::string_view> parts) {
    nlohmann::json json = good;
    json[field] = value;
    for (std::string_view part : parts) {
      expect_error_containing([&] { DeepSeekConfig::from_json(json, "my/config.json"); }, part);
    }
  };
  refused("topk_method", "greedy", {"my/config.json", "topk_method \"greedy\"", "noaux_tc"});
  refused("norm_topk_prob", false, {"norm_topk_prob false", "renormalises"});
  refused("topk_group", 1, {"num_experts_per_tok (4) must be 2 x topk_group (1)"});
  refused("rope_interleave", false, {"'rope_interleave' false"});
  refused("num_key_value_heads", 1, {"'num_key_value_heads' (1)"});
  refused("scoring_func", "softmax", {"'scoring_func' \"softmax\""});
  refused("hidden_act", "gelu", {"'hidden_act' \"gelu\""});
  refused("attention_bias", true, {"'attention_bias' true"});
  refused("rms_norm_eps", 1e-5, {"rms_norm_eps (1e-05) must be 1e-6"});
  refused("first_k_dense_replace", 3, {"first_k_dense_replace (3)"});
  refused("q_lora_rank", "8", {"'q_lora_rank' must be an integer", "\"8\""});
  nlohmann::json scaling = good["rope_scaling"];
  scaling["original_max_position_embeddings"] = 8192;
  refused("rope_scaling", scaling, {"'rope_scaling.original_max_position_embeddings' (8192)"});
  scaling = good["rope_scaling"];
  scaling["type"] = "linear";
  refused("rope_scaling", scaling, {"rope_scaling type \"linear\""});
  nlohmann::json v2 = good;
  v2["model_type"] = "deepseek_v2";
  v2["topk_method"] = "noaux_tc";
  expect_error_containing([&] { DeepSeekConfig::from_json(v2, "v2"); },
                          {"topk_method \"noaux_tc\"", "greedy"});
  // Absent fields take HF's defaults (first_k_dense_replace 3 leaves no MoE layer of 3), null
  // ones mean none.
  nlohmann::json absent = good;
  absent.erase("first_k_dense_replace");
  expect_error_containing([&] { DeepSeekConfig::from_json(absent, "cfg"); },
                          "first_k_dense_replace (3)");
  absent = good;
  absent["q_lora_rank"] = nullptr;
  EXPECT_EQ(DeepSeekConfig::from_json(absent, "cfg").q_lora_rank, 0);
  absent.erase("q_lora_rank");
  EXPECT_EQ(DeepSeekConfig::from_json(absent, "cfg").q_lora_rank, 1536);
  nlohmann::json missing = good;
  missing.erase("kv_lora_rank");
  expect_error_containing([&] { DeepSeekConfig::from_json(missing, "cfg"); },
                          {"'kv_lora_rank' is missing"});
}

}  // namespace
}  // namespace moe::convert::hf_deepseek

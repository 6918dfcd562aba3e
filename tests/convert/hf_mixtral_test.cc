#include "moe/convert/hf_moe.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "convert/mixtral_testing.h"
#include "model/model_testing.h"
#include "moe/train/arguments.h"
#include "support/testing.h"

namespace moe::convert::hf_moe {
namespace {

using moe::testing::expect_error_containing;
using moe::testing::ScratchDir;
using moe::testing::tiny_config;
using moe::testing::TinyModel;

void declare_all(ParameterStore& store, const HfMoeConfig& c) {
  for (const ParamSpec& spec : moecore_param_specs(c)) store.declare(spec);
  store.allocate();
}

void expect_same_parameters(const ParameterStore& a, const ParameterStore& b) {
  ASSERT_EQ(a.count(), b.count());
  for (int i = 0; i < a.count(); ++i) {
    const std::string& name = a.spec(ParamHandle{i}).name;
    Tensor x = a.param(ParamHandle{i}), y = b.param(b.find(name));
    EXPECT_TRUE(moe::testing::same_bytes(x, y)) << name;
  }
}

TEST(HfMixtral, SpecsMatchWhatGPTModelDeclares) {
  for (bool tied : {false, true}) {
    HfMoeConfig c = tiny_config();
    c.tie_word_embeddings = tied;
    TinyModel model(c, DType::F32, 1);
    std::vector<ParamSpec> specs = moecore_param_specs(c);
    ASSERT_EQ(int(specs.size()), model.store.count()) << "tied " << tied;
    for (const ParamSpec& spec : specs) {
      ParamHandle handle = model.store.find(spec.name);
      ASSERT_GE(handle.index, 0) << spec.name;
      const ParamSpec& declared = model.store.spec(handle);
      EXPECT_EQ(declared.global_shape, spec.global_shape) << spec.name;
      EXPECT_EQ(declared.group, spec.group) << spec.name;
      EXPECT_EQ(declared.tensor_parallel_duplicate, spec.tensor_parallel_duplicate) << spec.name;
      EXPECT_EQ(declared.weight_decay, spec.weight_decay) << spec.name;
    }
  }
}

TEST(HfMixtral, RoundTripThroughSafetensorsIsBitwise) {
  for (DType dtype : {DType::F32, DType::BF16}) {
    HfMoeConfig c = tiny_config();
    TinyModel original(c, dtype, 7);
    ScratchDir dir("hf_round_trip");
    safetensors::write_checkpoint(dir.path.string(), moecore_to_hf(c, original.store, dtype), {},
                                  /*max_shard_bytes=*/4096);
    safetensors::Checkpoint hf(dir.path.string());
    EXPECT_EQ(hf.names().size(), hf_tensor_shapes(c).size());
    ParameterStore loaded(dtype);
    declare_all(loaded, c);
    hf_to_moecore(
        c, [&](const std::string& name) { return hf.read(name); }, loaded);
    expect_same_parameters(original.store, loaded);
  }
}

// Checks the layout itself on hand-picked elements (a round trip alone would pass for any
// bijection).
TEST(HfMixtral, ElementsLandWhereMegatronPutsThem) {
  HfMoeConfig c = tiny_config();
  TinyModel model(c, DType::F32, 3);
  std::map<std::string, Tensor> hf;
  for (auto& [name, tensor] : moecore_to_hf(c, model.store, DType::F32)) hf[name] = tensor;
  auto param = [&](const std::string& name) { return model.store.param(model.store.find(name)); };
  const int64_t H = 24, d = 4, F = 10, E = 3, V = 37;
  // qkv [H, G=2, 3 + 2, d]: query head 4 is the second head of group 1; k/v of group 1.
  Tensor qkv = param("decoder.layers.1.self_attention.linear_qkv.weight");
  const Tensor& q = hf.at("model.layers.1.self_attn.q_proj.weight");
  const Tensor& k = hf.at("model.layers.1.self_attn.k_proj.weight");
  const Tensor& v = hf.at("model.layers.1.self_attn.v_proj.weight");
  for (int64_t i : {int64_t(0), int64_t(5), H - 1}) {
    for (int64_t j = 0; j < d; ++j) {
      EXPECT_EQ(q.get((4 * d + j) * H + i), qkv.get(((i * 2 + 1) * 5 + 1) * d + j));
      EXPECT_EQ(k.get((1 * d + j) * H + i), qkv.get(((i * 2 + 1) * 5 + 3) * d + j));
      EXPECT_EQ(v.get((0 * d + j) * H + i), qkv.get(((i * 2 + 0) * 5 + 4) * d + j));
    }
  }
  Tensor fc1 = param("decoder.layers.0.mlp.experts.linear_fc1.weight");  // [E, H, 2, F]
  Tensor fc2 = param("decoder.layers.0.mlp.experts.linear_fc2.weight");  // [E, F, H]
  const Tensor& w1 = hf.at("model.layers.0.block_sparse_moe.experts.2.w1.weight");
  const Tensor& w3 = hf.at("model.layers.0.block_sparse_moe.experts.2.w3.weight");
  const Tensor& w2 = hf.at("model.layers.0.block_sparse_moe.experts.2.w2.weight");
  EXPECT_EQ(w1.get(7 * H + 3), fc1.get(((2 * H + 3) * 2 + 0) * F + 7));
  EXPECT_EQ(w3.get(7 * H + 3), fc1.get(((2 * H + 3) * 2 + 1) * F + 7));
  EXPECT_EQ(w2.get(3 * F + 7), fc2.get((2 * F + 7) * H + 3));
  Tensor router = param("decoder.layers.0.mlp.router.weight");  // [H, E]
  EXPECT_EQ(hf.at("model.layers.0.block_sparse_moe.gate.weight").get(1 * H + 5),
            router.get(5 * E + 1));
  EXPECT_EQ(hf.at("lm_head.weight").get(30 * H + 2), param("output_layer.weight").get(2 * V + 30));
  EXPECT_EQ(hf.at("model.embed_tokens.weight").get(30 * H + 2),
            param("embedding.word_embeddings.weight").get(30 * H + 2));
}

TEST(HfMixtral, BadTensorsAndConfigsAreNamed) {
  HfMoeConfig c = tiny_config();
  ParameterStore store(DType::F32);
  declare_all(store, c);
  auto zeros_of_hf_shape = [&](const std::string& name) {
    for (const auto& [hf_name, shape] : hf_tensor_shapes(c)) {
      if (hf_name == name) return Tensor(shape);
    }
    return Tensor();
  };
  auto wrong_gate = [&](const std::string& name) {
    return name == "model.layers.1.block_sparse_moe.gate.weight" ? Tensor({4, 24})
                                                                 : zeros_of_hf_shape(name);
  };
  expect_error_containing([&] { hf_to_moecore(c, wrong_gate, store); },
                          {"model.layers.1.block_sparse_moe.gate.weight", "[4, 24]", "[3, 24]"});
  auto missing = [&](const std::string& name) {
    return name == "lm_head.weight" ? Tensor() : zeros_of_hf_shape(name);
  };
  expect_error_containing([&] { hf_to_moecore(c, missing, store); },
                          {"'lm_head.weight' is missing"});

  nlohmann::json json = c.to_json();
  EXPECT_EQ(HfMoeConfig::from_json(json, "cfg").to_json(), json);
  json.erase("num_local_experts");
  expect_error_containing([&] { HfMoeConfig::from_json(json, "my/config.json"); },
                          {"my/config.json", "'num_local_experts' is missing"});
  json = c.to_json();
  json["num_key_value_heads"] = 4;
  expect_error_containing([&] { HfMoeConfig::from_json(json, "cfg"); },
                          {"num_attention_heads (6)", "num_key_value_heads (4)"});
  json = c.to_json();
  json["hidden_size"] = "24";
  expect_error_containing([&] { HfMoeConfig::from_json(json, "cfg"); },
                          {"'hidden_size' must be a positive integer", "\"24\""});
  json = c.to_json();
  json["model_type"] = "llama";
  expect_error_containing([&] { HfMoeConfig::from_json(json, "cfg"); },
                          {"\"llama\"", "not \"mixtral\""});
}

TEST(HfMixtral, MegatronFlagsParseIntoTheSameModel) {
  HfMoeConfig c = tiny_config();
  c.rope_theta = 1e6;
  c.num_experts_per_tok = 1;
  std::vector<std::string> argv;
  std::istringstream words(c.megatron_flags());
  for (std::string word; words >> word;) argv.push_back(word);
  train::TrainingArguments args = train::parse_arguments(argv).args;
  EXPECT_EQ(args.num_layers, 2);
  EXPECT_EQ(args.hidden_size, 24);
  EXPECT_EQ(args.ffn_hidden_size, 10);
  EXPECT_EQ(args.num_attention_heads, 6);
  EXPECT_EQ(args.kv_channels, 4);
  EXPECT_TRUE(args.group_query_attention);
  EXPECT_EQ(args.num_query_groups, 2);
  EXPECT_EQ(args.rotary_base, 1000000);
  EXPECT_EQ(args.normalization, "RMSNorm");
  EXPECT_EQ(args.position_embedding_type, "rope");
  EXPECT_TRUE(args.swiglu);
  EXPECT_TRUE(args.untie_embeddings_and_output_weights);
  EXPECT_EQ(args.num_experts, 3);
  EXPECT_EQ(args.moe_router_topk, 1);
}

// tests/convert/fixtures/mixtral-8x7b-v0.1-config.json holds the config.json published with
// mistralai/Mixtral-8x7B-v0.1 (written from outside the project, not by to_json). moe-convert's
// mapping gives the moe-train flags of that model, and moe-train reads them back as its values.
// router_aux_loss_coef is no flag: HF adds that loss only with output_router_logits (false).
TEST(HfMixtral, PublishedMixtral8x7bConfigMapsToItsMoeTrainFlags) {
  const std::string path = MOE_CONVERT_TEST_DIR "/fixtures/mixtral-8x7b-v0.1-config.json";
  const HfMoeConfig c =
      HfMoeConfig::from_json(nlohmann::json::parse(moe::testing::read_bytes(path)), path);
  EXPECT_EQ(c.family, Family::kMixtral);
  EXPECT_EQ(c.megatron_flags(),
            "--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 "
            "--kv-channels 128 --group-query-attention --num-query-groups 8 "
            "--max-position-embeddings 32768 --normalization RMSNorm --norm-epsilon 1e-05 "
            "--position-embedding-type rope --rotary-base 1000000 --swiglu --disable-bias-linear "
            "--untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 "
            "--num-experts 8 --moe-router-topk 2");
  std::vector<std::string> argv;
  std::istringstream words(c.megatron_flags());
  for (std::string word; words >> word;) argv.push_back(word);
  const train::TrainingArguments a = train::parse_arguments(argv).args;
  EXPECT_EQ(a.num_layers, 32);
  EXPECT_EQ(a.hidden_size, 4096);
  EXPECT_EQ(a.ffn_hidden_size, 14336);
  EXPECT_EQ(a.num_attention_heads, 32);
  EXPECT_EQ(a.kv_channels, 128);
  EXPECT_TRUE(a.group_query_attention);
  EXPECT_EQ(a.num_query_groups, 8);
  EXPECT_EQ(a.max_position_embeddings, 32768);
  EXPECT_EQ(a.normalization, "RMSNorm");
  EXPECT_EQ(a.norm_epsilon, 1e-5);
  EXPECT_EQ(a.position_embedding_type, "rope");
  EXPECT_EQ(a.rotary_base, 1000000);
  EXPECT_TRUE(a.swiglu);
  EXPECT_FALSE(a.add_bias_linear);
  EXPECT_TRUE(a.untie_embeddings_and_output_weights);
  EXPECT_EQ(a.num_experts, 8);
  EXPECT_EQ(a.moe_router_topk, 2);
  EXPECT_EQ(c.vocab_size, 32000);  // moe-train takes the vocabulary from its tokenizer
}

std::string json_of(const Tensor& ids) {  // [b, s] I64 -> "[[..], [..]]"
  nlohmann::json rows = nlohmann::json::array();
  for (int64_t b = 0; b < ids.dim(0); ++b) {
    std::vector<int64_t> row(ids.data<int64_t>() + b * ids.dim(1),
                             ids.data<int64_t>() + (b + 1) * ids.dim(1));
    rows.push_back(row);
  }
  return rows.dump();
}

// The semantic check a round trip cannot give: moecore's forward on a model and an independent
// torch implementation of HF's Mixtral forward on the converted weights agree (fp64 both sides),
// so the q/k/v grouping, rotary convention, gate/up order and router mapping are all right.
TEST(HfMixtral, ForwardMatchesTorchMixtralOnConvertedWeights) {
  MOE_REQUIRE_PYTHON_PACKAGE("torch");
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");  // reference_common.py
  for (bool tied : {false, true}) {
    HfMoeConfig c = tiny_config();
    c.tie_word_embeddings = tied;
    TinyModel tiny(c, DType::F64, 21);
    model::testing::randomize(tiny.store, 22, 0.3f);
    ScratchDir dir("torch_forward");
    moe::testing::write_hf_model(dir.path.string(), c, tiny.store, uint64_t(1) << 30);
    Tensor tokens = model::testing::random_tokens(2, 8, c.vocab_size, 23);
    Tensor labels = model::testing::random_tokens(2, 8, c.vocab_size, 24);
    model::GPTContext ctx;
    ctx.training = false;
    const double loss = tiny.model->forward(tokens, labels, ctx);

    const std::string command = "/usr/bin/python3 " MOE_CONVERT_TEST_DIR "/mixtral_reference.py " +
                                dir.path.string() + " '" + json_of(tokens) + "' '" +
                                json_of(labels) + "'";
    FILE* pipe = ::popen(command.c_str(), "r");
    ASSERT_NE(pipe, nullptr);
    char buffer[256] = {};
    const bool got = std::fgets(buffer, sizeof(buffer), pipe) != nullptr;
    ASSERT_EQ(::pclose(pipe), 0) << command;
    ASSERT_TRUE(got) << command;
    const double reference = std::stod(buffer);
    EXPECT_NEAR(loss, reference, 1e-10 * std::max(1.0, std::abs(reference))) << "tied " << tied;
    EXPECT_GT(std::abs(loss - std::log(double(c.vocab_size))), 0.1);  // not a uniform guess
  }
}

}  // namespace
}  // namespace moe::convert::hf_moe

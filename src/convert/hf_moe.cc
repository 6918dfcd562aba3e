#include "moe/convert/hf_moe.h"

#include <array>
#include <cmath>
#include <map>
#include <sstream>
#include <utility>

#include "hf_common.h"
#include "moe/tensor/error.h"

namespace moe::convert::hf_moe {
namespace {

using detail::bool_field;
using detail::move_piece;
using detail::number_field;
using detail::Piece;

struct MappedTensor {
  ParamSpec spec;  // moecore name, global shape, group
  std::vector<Piece> pieces;
};

struct Mapping {
  std::vector<MappedTensor> tensors;
  std::vector<std::pair<std::string, Shape>> hf_shapes;
};

// What tells the families apart: their names, and the JSON name of the expert count.
struct FamilyNames {
  Family family;
  const char* architecture;
  const char* model_type;
  const char* experts_field;
  const char* moe_block;  // the MoE block's module under model.layers.N
  const char* gate_proj;  // the experts' SwiGLU linears: gate, up, down
  const char* up_proj;
  const char* down_proj;
};

constexpr std::array<FamilyNames, 3> kFamilies = {{
    {Family::kMixtral, "MixtralForCausalLM", "mixtral", "num_local_experts", "block_sparse_moe",
     "w1", "w3", "w2"},
    {Family::kQwen2Moe, "Qwen2MoeForCausalLM", "qwen2_moe", "num_experts", "mlp", "gate_proj",
     "up_proj", "down_proj"},
    {Family::kQwen3Moe, "Qwen3MoeForCausalLM", "qwen3_moe", "num_experts", "mlp", "gate_proj",
     "up_proj", "down_proj"},
}};

const FamilyNames& names_of(Family family) {
  for (const FamilyNames& names : kFamilies) {
    if (names.family == family) return names;
  }
  MOE_CHECK(false, "hf_moe: unknown family ", int(family));
  return kFamilies[0];
}

Mapping build_mapping(const HfMoeConfig& c) {
  c.validate();
  const FamilyNames& names = names_of(c.family);
  const int64_t H = c.hidden_size, V = c.vocab_size, Vp = c.moecore_vocab_rows();
  const int64_t F = c.expert_width();
  const int64_t E = c.num_local_experts, G = c.num_key_value_heads, d = c.head_size();
  const int64_t per_group = c.num_attention_heads / G;
  Mapping m;
  auto add = [&](const std::string& name, Shape shape, ParamGroup group, bool decay,
                 bool tp_duplicate, std::vector<Piece> pieces) {
    ParamSpec spec;
    spec.name = name;
    spec.shape = shape;
    spec.group = group;
    spec.weight_decay = decay;
    spec.global_shape = shape;
    spec.global_offset = Shape(shape.size(), 0);
    spec.tensor_parallel_duplicate = tp_duplicate;
    m.tensors.push_back({std::move(spec), std::move(pieces)});
  };
  auto copied = [](const std::string& hf_name, int64_t row_begin = 0, int64_t rows = 0,
                   int64_t offset = 0) {
    return Piece{hf_name, false, row_begin, rows, offset, 0};
  };
  auto transposed = [](const std::string& hf_name, int64_t row_begin, int64_t rows, int64_t offset,
                       int64_t row_stride) {
    return Piece{hf_name, true, row_begin, rows, offset, row_stride};
  };
  auto norm = [&](const std::string& moe_name, const std::string& hf_name, int64_t size) {
    m.hf_shapes.push_back({hf_name, {size}});
    add(moe_name, {size}, ParamGroup::kDense, false, true, {copied(hf_name)});
  };
  // A SwiGLU MLP of width `width` (dense layers, shared experts): fc1 [H, 2, width] holds
  // [gate | up], fc2 [width, H].
  auto dense_mlp = [&](const std::string& moe, const std::string& hf, int64_t width) {
    const std::string gate = hf + "gate_proj.weight", up = hf + "up_proj.weight",
                      down = hf + "down_proj.weight";
    m.hf_shapes.push_back({gate, {width, H}});
    m.hf_shapes.push_back({up, {width, H}});
    m.hf_shapes.push_back({down, {H, width}});
    add(moe + "linear_fc1.weight", {H, 2, width}, ParamGroup::kDense, true, false,
        {transposed(gate, 0, width, 0, 2 * width), transposed(up, 0, width, width, 2 * width)});
    add(moe + "linear_fc2.weight", {width, H}, ParamGroup::kDense, true, false,
        {transposed(down, 0, H, 0, H)});
  };

  m.hf_shapes.push_back({"model.embed_tokens.weight", {V, H}});
  add("embedding.word_embeddings.weight", {Vp, H}, ParamGroup::kDense, true, false,
      {copied("model.embed_tokens.weight")});
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    const std::string hf = "model.layers." + std::to_string(layer) + ".";
    const std::string moe = "decoder.layers." + std::to_string(layer) + ".";
    norm(moe + "input_layernorm.weight", hf + "input_layernorm.weight", H);

    // qkv [H, G, per_group + 2, d], viewed as rows of G * (per_group + 2) * d columns; its bias
    // [G, per_group + 2, d] interleaves the same way.
    const std::string attn = hf + "self_attn.";
    const std::string q = attn + "q_proj.weight", k = attn + "k_proj.weight",
                      v = attn + "v_proj.weight", o = attn + "o_proj.weight";
    m.hf_shapes.push_back({q, {c.num_attention_heads * d, H}});
    m.hf_shapes.push_back({k, {G * d, H}});
    m.hf_shapes.push_back({v, {G * d, H}});
    const int64_t qkv_columns = G * (per_group + 2) * d;
    std::vector<Piece> qkv, qkv_bias;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t group_column = g * (per_group + 2) * d;
      qkv.push_back(transposed(q, g * per_group * d, per_group * d, group_column, qkv_columns));
      qkv.push_back(transposed(k, g * d, d, group_column + per_group * d, qkv_columns));
      qkv.push_back(transposed(v, g * d, d, group_column + (per_group + 1) * d, qkv_columns));
      qkv_bias.push_back(
          copied(attn + "q_proj.bias", g * per_group * d, per_group * d, group_column));
      qkv_bias.push_back(copied(attn + "k_proj.bias", g * d, d, group_column + per_group * d));
      qkv_bias.push_back(
          copied(attn + "v_proj.bias", g * d, d, group_column + (per_group + 1) * d));
    }
    add(moe + "self_attention.linear_qkv.weight", {H, G, per_group + 2, d}, ParamGroup::kDense,
        true, false, std::move(qkv));
    if (c.qkv_bias) {
      m.hf_shapes.push_back({attn + "q_proj.bias", {c.num_attention_heads * d}});
      m.hf_shapes.push_back({attn + "k_proj.bias", {G * d}});
      m.hf_shapes.push_back({attn + "v_proj.bias", {G * d}});
      add(moe + "self_attention.linear_qkv.bias", {G, per_group + 2, d}, ParamGroup::kDense, false,
          false, std::move(qkv_bias));
    }
    if (c.qk_norm()) {
      norm(moe + "self_attention.q_layernorm.weight", attn + "q_norm.weight", d);
      norm(moe + "self_attention.k_layernorm.weight", attn + "k_norm.weight", d);
    }
    m.hf_shapes.push_back({o, {H, c.num_attention_heads * d}});
    add(moe + "self_attention.linear_proj.weight", {c.num_attention_heads * d, H},
        ParamGroup::kDense, true, false, {transposed(o, 0, H, 0, H)});
    norm(moe + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight", H);

    if (!c.is_moe_layer(layer)) {
      dense_mlp(moe + "mlp.", hf + "mlp.", c.intermediate_size);
      continue;
    }
    const std::string block = hf + names.moe_block + ".";
    m.hf_shapes.push_back({block + "gate.weight", {E, H}});
    add(moe + "mlp.router.weight", {H, E}, ParamGroup::kDense, true, true,
        {transposed(block + "gate.weight", 0, E, 0, E)});
    std::vector<Piece> fc1, fc2;
    for (int64_t e = 0; e < E; ++e) {
      const std::string expert = block + "experts." + std::to_string(e) + ".";
      const std::string gate = expert + names.gate_proj + ".weight",
                        up = expert + names.up_proj + ".weight",
                        down = expert + names.down_proj + ".weight";
      m.hf_shapes.push_back({gate, {F, H}});
      m.hf_shapes.push_back({up, {F, H}});
      m.hf_shapes.push_back({down, {H, F}});
      fc1.push_back(transposed(gate, 0, F, e * H * 2 * F, 2 * F));
      fc1.push_back(transposed(up, 0, F, e * H * 2 * F + F, 2 * F));
      fc2.push_back(transposed(down, 0, H, e * F * H, H));
    }
    add(moe + "mlp.experts.linear_fc1.weight", {E, H, 2, F}, ParamGroup::kExpert, true, false,
        std::move(fc1));
    add(moe + "mlp.experts.linear_fc2.weight", {E, F, H}, ParamGroup::kExpert, true, false,
        std::move(fc2));
    if (c.shared_expert()) {
      dense_mlp(moe + "mlp.shared_experts.", block + "shared_expert.",
                c.shared_expert_intermediate_size);
      const std::string gate = block + "shared_expert_gate.weight";
      m.hf_shapes.push_back({gate, {1, H}});
      add(moe + "mlp.shared_experts.gate_weight", {H, 1}, ParamGroup::kDense, true, true,
          {transposed(gate, 0, 1, 0, 1)});
    }
  }
  norm("decoder.final_layernorm.weight", "model.norm.weight", H);
  if (!c.tie_word_embeddings) {
    m.hf_shapes.push_back({"lm_head.weight", {V, H}});
    add("output_layer.weight", {H, Vp}, ParamGroup::kDense, true, false,
        {transposed("lm_head.weight", 0, V, 0, Vp)});
  }
  return m;
}

// HF name -> the (moecore tensor, piece) pairs it feeds or is filled from.
using PiecesByHfName =
    std::map<std::string, std::vector<std::pair<const MappedTensor*, const Piece*>>>;

PiecesByHfName pieces_by_hf_name(const Mapping& mapping) {
  PiecesByHfName pieces;
  for (const MappedTensor& tensor : mapping.tensors) {
    for (const Piece& piece : tensor.pieces) pieces[piece.hf_name].push_back({&tensor, &piece});
  }
  return pieces;
}

Tensor store_tensor(const ParameterStore& store, const ParamSpec& spec) {
  ParamHandle handle = store.find(spec.name);
  MOE_CHECK(handle.index >= 0, "hf_moe: the moecore model has no parameter '", spec.name, "'");
  Tensor tensor = store.param(handle);
  check_shape(tensor, spec.global_shape, "moecore parameter '" + spec.name + "'");
  return tensor;
}

int64_t positive_field(const nlohmann::json& json, const char* field, const std::string& source,
                       std::optional<int64_t> fallback = std::nullopt) {
  if (!json.contains(field) || json.at(field).is_null()) {
    MOE_CHECK(fallback.has_value(), source, ": config field '", field, "' is missing");
    return *fallback;
  }
  MOE_CHECK(json.at(field).is_number_integer() && json.at(field).get<int64_t>() > 0, source,
            ": config field '", field, "' must be a positive integer, got ", json.at(field).dump());
  return json.at(field).get<int64_t>();
}

// The sizes config.json always holds (head_dim only when set), each required to be positive.
std::vector<std::pair<std::string, int64_t>> size_fields(const HfMoeConfig& c) {
  std::vector<std::pair<std::string, int64_t>> fields = {
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {names_of(c.family).experts_field, c.num_local_experts},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"max_position_embeddings", c.max_position_embeddings}};
  if (c.family != Family::kMixtral) {
    fields.push_back({"moe_intermediate_size", c.moe_intermediate_size});
    fields.push_back({"decoder_sparse_step", c.decoder_sparse_step});
  }
  if (c.shared_expert()) {
    fields.push_back({"shared_expert_intermediate_size", c.shared_expert_intermediate_size});
  }
  return fields;
}

}  // namespace

const char* architecture_name(Family family) {
  return names_of(family).architecture;
}
const char* model_type_name(Family family) {
  return names_of(family).model_type;
}

Family family_of(const nlohmann::json& json, const std::string& source) {
  MOE_CHECK(json.is_object(), source, ": a config.json must hold a JSON object");
  std::string supported;
  for (const FamilyNames& names : kFamilies) {
    supported += (supported.empty() ? "" : ", ") + std::string(names.architecture);
  }
  if (json.contains("architectures")) {
    const nlohmann::json& listed = json.at("architectures");
    MOE_CHECK(listed.is_array() && listed.size() == 1 && listed[0].is_string(), source,
              ": config field 'architectures' must list one architecture, got ", listed.dump());
    for (const FamilyNames& names : kFamilies) {
      if (listed[0] == names.architecture) return names.family;
    }
    MOE_CHECK(false, source, ": architectures ", listed.dump(),
              " is not one moe-convert converts (", supported, ")");
  }
  MOE_CHECK(json.contains("model_type"), source,
            ": config.json names neither 'architectures' nor 'model_type' (moe-convert converts ",
            supported, ")");
  for (const FamilyNames& names : kFamilies) {
    if (json.at("model_type") == names.model_type) return names.family;
  }
  MOE_CHECK(false, source, ": model_type ", json.at("model_type").dump(),
            " is not one moe-convert converts (", supported, ")");
  return Family::kMixtral;
}

bool HfMoeConfig::is_moe_layer(int64_t layer) const {
  for (int64_t dense : mlp_only_layers) {
    if (dense == layer) return false;
  }
  return (layer + 1) % decoder_sparse_step == 0;
}

void HfMoeConfig::validate() const {
  const std::string what = std::string(model_type_name(family)) + " config: ";
  for (const auto& [field, value] : size_fields(*this)) {
    MOE_CHECK(value > 0, what, field, " must be positive, got ", value);
  }
  MOE_CHECK(num_attention_heads % num_key_value_heads == 0, what, "num_attention_heads (",
            num_attention_heads, ") is not a multiple of num_key_value_heads (",
            num_key_value_heads, ")");
  MOE_CHECK(head_dim > 0 || hidden_size % num_attention_heads == 0, what, "hidden_size (",
            hidden_size, ") is not divisible by num_attention_heads (", num_attention_heads,
            ") and head_dim is not given");
  MOE_CHECK(head_size() % 2 == 0, what, "rotary embeddings need an even head_dim, got ",
            head_size());
  MOE_CHECK(num_experts_per_tok <= num_local_experts, what, "num_experts_per_tok (",
            num_experts_per_tok, ") exceeds ", names_of(family).experts_field, " (",
            num_local_experts, ")");
  MOE_CHECK(padded_vocab_size == 0 || padded_vocab_size >= vocab_size, what, "padded_vocab_size (",
            padded_vocab_size, ") is smaller than vocab_size (", vocab_size, ")");
  MOE_CHECK(rope_theta > 0 && rms_norm_eps > 0, what,
            "rope_theta and rms_norm_eps must be positive, got ", rope_theta, " and ",
            rms_norm_eps);
  for (int64_t layer : mlp_only_layers) {
    MOE_CHECK(layer >= 0 && layer < num_hidden_layers, what, "mlp_only_layers lists layer ", layer,
              ", outside 0 .. num_hidden_layers - 1 (", num_hidden_layers - 1, ")");
  }
  // Megatron refuses top-1 routing with the softmax after top-k (the router gets no gradient).
  MOE_CHECK(family == Family::kMixtral || num_experts_per_tok > 1 || !norm_topk_prob, what,
            "num_experts_per_tok 1 with norm_topk_prob true (a routing weight of 1) has no "
            "Megatron equivalent: moe-train requires --moe-router-pre-softmax with top-1");
}

HfMoeConfig HfMoeConfig::from_json(const nlohmann::json& json, const std::string& source) {
  HfMoeConfig c;
  c.family = family_of(json, source);
  const FamilyNames& names = names_of(c.family);
  const bool qwen = c.family != Family::kMixtral;
  if (json.contains("model_type")) {
    MOE_CHECK(json.at("model_type") == names.model_type, source, ": model_type is ",
              json.at("model_type").dump(), ", not \"", names.model_type, "\" as architectures ",
              names.architecture, " needs");
  }
  c.vocab_size = positive_field(json, "vocab_size", source);
  c.hidden_size = positive_field(json, "hidden_size", source);
  c.intermediate_size = positive_field(json, "intermediate_size", source);
  c.num_hidden_layers = positive_field(json, "num_hidden_layers", source);
  c.num_attention_heads = positive_field(json, "num_attention_heads", source);
  c.num_key_value_heads =
      positive_field(json, "num_key_value_heads", source, c.num_attention_heads);
  c.head_dim = positive_field(json, "head_dim", source, 0);
  c.num_local_experts = positive_field(json, names.experts_field, source);
  c.num_experts_per_tok = positive_field(json, "num_experts_per_tok", source);
  c.max_position_embeddings = positive_field(json, "max_position_embeddings", source, 32768);
  c.rms_norm_eps = number_field(json, "rms_norm_eps", source, qwen ? 1e-6 : 1e-5);
  c.tie_word_embeddings = bool_field(json, "tie_word_embeddings", source, false);

  // rope_theta at the top level, or in transformers 5's rope_parameters; no scaling either way.
  c.rope_theta = number_field(json, "rope_theta", source, qwen ? 1e4 : 1e6);
  if (json.contains("rope_parameters") && json.at("rope_parameters").is_object()) {
    const nlohmann::json& rope = json.at("rope_parameters");
    c.rope_theta = number_field(rope, "rope_theta", source + " rope_parameters", c.rope_theta);
    MOE_CHECK(!rope.contains("rope_type") || rope.at("rope_type") == "default", source,
              ": config field 'rope_parameters' has rope_type ", rope.at("rope_type").dump(),
              "; moecore converts plain rope only (\"default\")");
  }
  MOE_CHECK(!json.contains("rope_scaling") || json.at("rope_scaling").is_null(), source,
            ": config field 'rope_scaling' is ", json.at("rope_scaling").dump(),
            "; moecore converts plain rope only (null)");
  MOE_CHECK(!json.contains("hidden_act") || json.at("hidden_act") == "silu", source,
            ": config field 'hidden_act' is ", json.at("hidden_act").dump(),
            "; moecore's SwiGLU needs \"silu\"");

  if (qwen) {
    c.moe_intermediate_size = positive_field(json, "moe_intermediate_size", source);
    c.norm_topk_prob = bool_field(json, "norm_topk_prob", source, false);
    c.decoder_sparse_step = positive_field(json, "decoder_sparse_step", source, 1);
    if (json.contains("mlp_only_layers") && !json.at("mlp_only_layers").is_null()) {
      const nlohmann::json& dense = json.at("mlp_only_layers");
      MOE_CHECK(dense.is_array(), source, ": config field 'mlp_only_layers' must be a list, got ",
                dense.dump());
      for (const nlohmann::json& layer : dense) {
        MOE_CHECK(layer.is_number_integer(), source,
                  ": config field 'mlp_only_layers' must list layer numbers, got ", dense.dump());
        c.mlp_only_layers.push_back(layer.get<int64_t>());
      }
    }
    // Sliding-window attention changes the forward; moecore's attention is fully causal.
    MOE_CHECK(!bool_field(json, "use_sliding_window", source, false), source,
              ": config field 'use_sliding_window' is true; moecore's attention is fully causal "
              "(no sliding window)");
  }
  if (c.family == Family::kQwen2Moe) {
    c.shared_expert_intermediate_size =
        positive_field(json, "shared_expert_intermediate_size", source);
    c.qkv_bias = bool_field(json, "qkv_bias", source, true);
  }
  if (c.family == Family::kQwen3Moe) {
    MOE_CHECK(!bool_field(json, "attention_bias", source, false), source,
              ": config field 'attention_bias' is true; Megatron's --add-qkv-bias covers q, k and "
              "v only, not o_proj's bias");
  }
  return detail::validated(std::move(c), source);
}

nlohmann::json HfMoeConfig::to_json() const {
  nlohmann::json json = {{"architectures", {architecture_name(family)}},
                         {"model_type", model_type_name(family)},
                         {"rope_theta", rope_theta},
                         {"rms_norm_eps", rms_norm_eps},
                         {"tie_word_embeddings", tie_word_embeddings},
                         {"hidden_act", "silu"}};
  for (const auto& [field, value] : size_fields(*this)) json[field] = value;
  if (head_dim > 0) json["head_dim"] = head_dim;
  if (family != Family::kMixtral) {
    json["norm_topk_prob"] = norm_topk_prob;
    json["mlp_only_layers"] = mlp_only_layers;
    json["use_sliding_window"] = false;
  }
  if (family == Family::kQwen2Moe) json["qkv_bias"] = qkv_bias;
  if (family == Family::kQwen3Moe) json["attention_bias"] = false;
  return json;
}

model::TransformerConfig HfMoeConfig::transformer_config() const {
  validate();
  model::TransformerConfig t;
  t.num_layers = int(num_hidden_layers);
  t.hidden_size = int(hidden_size);
  t.ffn_hidden_size = int(intermediate_size);
  t.num_attention_heads = int(num_attention_heads);
  t.kv_channels = int(head_size());
  t.group_query_attention = num_key_value_heads != num_attention_heads;
  t.num_query_groups = int(num_key_value_heads);
  t.padded_vocab_size = moecore_vocab_rows();
  t.max_position_embeddings = int(max_position_embeddings);
  t.normalization = "RMSNorm";
  t.norm_epsilon = float(rms_norm_eps);
  t.position_embedding_type = "rope";
  t.rotary_base = float(rope_theta);
  t.swiglu = true;
  t.add_bias_linear = false;
  t.add_qkv_bias = qkv_bias;
  t.qk_layernorm = qk_norm();
  t.untie_embeddings_and_output_weights = !tie_word_embeddings;
  t.hidden_dropout = 0;
  t.attention_dropout = 0;
  t.num_experts = int(num_local_experts);
  for (int64_t layer = 0; layer < num_hidden_layers; ++layer) {
    t.moe_layer_pattern.push_back(is_moe_layer(layer) ? 1 : 0);
  }
  if (expert_width() != intermediate_size) t.moe.moe_ffn_hidden_size = expert_width();
  t.moe.moe_router_topk = num_experts_per_tok;
  t.moe.moe_router_pre_softmax = !norm_topk_prob;
  if (shared_expert()) {
    t.moe_shared_expert_intermediate_size = int(shared_expert_intermediate_size);
    t.moe_shared_expert_gate = true;
  }
  return t;
}

std::string HfMoeConfig::megatron_flags() const {
  validate();
  std::ostringstream flags;
  flags << "--num-layers " << num_hidden_layers << " --hidden-size " << hidden_size
        << " --ffn-hidden-size " << intermediate_size << " --num-attention-heads "
        << num_attention_heads << " --kv-channels " << head_size();
  if (num_key_value_heads != num_attention_heads) {
    flags << " --group-query-attention --num-query-groups " << num_key_value_heads;
  }
  if (qkv_bias) flags << " --add-qkv-bias";
  if (qk_norm()) flags << " --qk-layernorm";
  flags << " --max-position-embeddings " << max_position_embeddings
        << " --normalization RMSNorm --norm-epsilon " << rms_norm_eps
        << " --position-embedding-type rope --rotary-base ";
  // Megatron's --rotary-base is an integer; Mixtral's rope_theta (1e6) is one written as a float.
  if (rope_theta == std::floor(rope_theta)) {
    flags << int64_t(rope_theta);
  } else {
    flags << rope_theta;
  }
  flags << " --swiglu --disable-bias-linear";
  if (!tie_word_embeddings) flags << " --untie-embeddings-and-output-weights";
  flags << " --hidden-dropout 0 --attention-dropout 0 --num-experts " << num_local_experts
        << " --moe-router-topk " << num_experts_per_tok;
  if (expert_width() != intermediate_size) flags << " --moe-ffn-hidden-size " << expert_width();
  if (!norm_topk_prob) flags << " --moe-router-pre-softmax";
  // Megatron's list form (one 0/1 per layer), quoted for the shell.
  std::string pattern;
  bool all_moe = true;
  for (int64_t layer = 0; layer < num_hidden_layers; ++layer) {
    if (layer > 0) pattern += ',';
    pattern += is_moe_layer(layer) ? '1' : '0';
    all_moe = all_moe && is_moe_layer(layer);
  }
  if (!all_moe) flags << " --moe-layer-freq '[" << pattern << "]'";
  if (shared_expert()) {
    flags << " --moe-shared-expert-intermediate-size " << shared_expert_intermediate_size
          << " --moe-shared-expert-gate";
  }
  return flags.str();
}

std::vector<ParamSpec> moecore_param_specs(const HfMoeConfig& config) {
  std::vector<ParamSpec> specs;
  for (MappedTensor& tensor : build_mapping(config).tensors) specs.push_back(tensor.spec);
  return specs;
}

std::vector<std::pair<std::string, Shape>> hf_tensor_shapes(const HfMoeConfig& config) {
  return build_mapping(config).hf_shapes;
}

void hf_to_moecore(const HfMoeConfig& config,
                   const std::function<Tensor(const std::string&)>& read_hf,
                   ParameterStore& store) {
  Mapping mapping = build_mapping(config);
  const PiecesByHfName users = pieces_by_hf_name(mapping);  // each HF tensor is read once
  for (const auto& [hf_name, hf_shape] : mapping.hf_shapes) {
    Tensor hf = read_hf(hf_name);
    MOE_CHECK(hf.defined(), "hf_moe: HF tensor '", hf_name, "' is missing");
    check_shape(hf, hf_shape, "HF tensor '" + hf_name + "'");
    if (hf.dtype() != store.param_dtype()) hf = hf.to(store.param_dtype());
    for (const auto& [tensor, piece] : users.at(hf_name)) {
      Tensor moe = store_tensor(store, tensor->spec);
      move_piece(*piece, hf, moe, /*to_moecore=*/true);
    }
  }
}

std::vector<safetensors::TensorEntry> hf_tensor_entries(const HfMoeConfig& config, DType dtype) {
  std::vector<safetensors::TensorEntry> entries;
  for (auto& [name, shape] : hf_tensor_shapes(config)) entries.push_back({name, dtype, shape});
  return entries;
}

safetensors::TensorSource hf_tensor_source(const HfMoeConfig& config, const ParameterStore& store,
                                           DType dtype) {
  struct Sources {
    Mapping mapping;
    std::map<std::string, Shape> shapes;
    PiecesByHfName pieces;
  };
  auto sources = std::make_shared<Sources>();
  sources->mapping = build_mapping(config);
  for (const auto& [name, shape] : sources->mapping.hf_shapes) sources->shapes[name] = shape;
  sources->pieces = pieces_by_hf_name(sources->mapping);
  return [sources, &store, dtype, family = config.family](const std::string& name) {
    auto shape = sources->shapes.find(name);
    MOE_CHECK(shape != sources->shapes.end(), "hf_moe: a ", architecture_name(family),
              " model has no tensor '", name, "'");
    Tensor hf = Tensor::empty(shape->second, store.param_dtype());
    for (const auto& [tensor, piece] : sources->pieces.at(name)) {
      Tensor moe = store_tensor(store, tensor->spec);
      move_piece(*piece, hf, moe, /*to_moecore=*/false);
    }
    return hf.dtype() == dtype ? hf : hf.to(dtype);
  };
}

std::vector<safetensors::NamedTensor> moecore_to_hf(const HfMoeConfig& config,
                                                    const ParameterStore& store, DType dtype) {
  return detail::read_all(hf_tensor_source(config, store, dtype), hf_tensor_shapes(config));
}

}  // namespace moe::convert::hf_moe

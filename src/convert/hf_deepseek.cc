#include "moe/convert/hf_deepseek.h"

#include <charconv>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <utility>

#include "hf_common.h"
#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "moe/tensor/error.h"

namespace moe::convert::hf_deepseek {
namespace {

constexpr const char* kExpertBias = "e_score_correction_bias";

using detail::bool_field;
using detail::field_of;
using detail::move_piece;
using detail::number_field;
using detail::Piece;

struct Mapping {
  std::map<std::string, std::vector<Piece>> pieces_by_moecore;  // moecore name -> its pieces
  std::vector<std::pair<std::string, Shape>> hf_shapes;         // HF order
};

Mapping build_mapping(const DeepSeekConfig& c) {
  c.validate();
  const int64_t H = c.hidden_size, V = c.vocab_size, Vp = c.moecore_vocab_rows();
  const int64_t n = c.num_attention_heads, E = c.n_routed_experts, F = c.moe_intermediate_size;
  const int64_t q_dim = n * (c.qk_nope_head_dim + c.qk_rope_head_dim);
  const int64_t kv_dim = n * (c.qk_nope_head_dim + c.v_head_dim);
  Mapping m;
  auto whole = [&](const std::string& moe_name, const std::string& hf_name, Shape shape) {
    m.hf_shapes.push_back({hf_name, shape});
    m.pieces_by_moecore[moe_name].push_back({hf_name, false});
  };
  // An HF linear [out, in] that is all of a moecore weight [in, out...].
  auto linear = [&](const std::string& moe_name, const std::string& hf_name, int64_t out,
                    int64_t in) {
    m.hf_shapes.push_back({hf_name, {out, in}});
    m.pieces_by_moecore[moe_name].push_back({hf_name, true, 0, out, 0, out});
  };
  // A SwiGLU MLP of width I: fc1 [H, 2, I] (gate, then up), fc2 [I, H]; `experts` > 0 stacks
  // that many (HF prefix + "M.") along a leading expert dimension.
  auto swiglu = [&](const std::string& moe_prefix, const std::string& hf_prefix, int64_t I,
                    int64_t experts) {
    for (int64_t e = 0; e < std::max<int64_t>(experts, 1); ++e) {
      const std::string hf = experts > 0 ? hf_prefix + std::to_string(e) + "." : hf_prefix;
      for (const char* part : {"gate_proj", "up_proj", "down_proj"}) {
        const std::string name = hf + part + ".weight";
        const bool down = std::string(part) == "down_proj";
        m.hf_shapes.push_back({name, down ? Shape{H, I} : Shape{I, H}});
        if (down) {
          m.pieces_by_moecore[moe_prefix + "linear_fc2.weight"].push_back(
              {name, true, 0, H, e * I * H, H});
        } else {
          const int64_t half = std::string(part) == "up_proj" ? I : 0;
          m.pieces_by_moecore[moe_prefix + "linear_fc1.weight"].push_back(
              {name, true, 0, I, e * H * 2 * I + half, 2 * I});
        }
      }
    }
  };

  whole("embedding.word_embeddings.weight", "model.embed_tokens.weight", {V, H});
  // One decoder layer: HF prefix `hf`, moecore prefix `moe` (a dense or an MoE MLP).
  auto layer_tensors = [&](const std::string& hf, const std::string& moe, bool moe_layer) {
    const std::string attn = hf + "self_attn.", self = moe + "self_attention.";
    whole(moe + "input_layernorm.weight", hf + "input_layernorm.weight", {H});
    if (c.q_lora_rank > 0) {
      linear(self + "linear_q_down_proj.weight", attn + "q_a_proj.weight", c.q_lora_rank, H);
      whole(self + "q_layernorm.weight", attn + "q_a_layernorm.weight", {c.q_lora_rank});
      linear(self + "linear_q_up_proj.weight", attn + "q_b_proj.weight", q_dim, c.q_lora_rank);
    } else {
      linear(self + "linear_q_proj.weight", attn + "q_proj.weight", q_dim, H);
    }
    linear(self + "linear_kv_down_proj.weight", attn + "kv_a_proj_with_mqa.weight",
           c.kv_lora_rank + c.qk_rope_head_dim, H);
    whole(self + "kv_layernorm.weight", attn + "kv_a_layernorm.weight", {c.kv_lora_rank});
    linear(self + "linear_kv_up_proj.weight", attn + "kv_b_proj.weight", kv_dim, c.kv_lora_rank);
    linear(self + "linear_proj.weight", attn + "o_proj.weight", H, n * c.v_head_dim);
    whole(moe + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight", {H});
    if (!moe_layer) {
      swiglu(moe + "mlp.", hf + "mlp.", c.intermediate_size, 0);
      return;
    }
    linear(moe + "mlp.router.weight", hf + "mlp.gate.weight", E, H);
    if (c.version == 3) {
      whole(moe + "mlp.router.expert_bias", hf + "mlp.gate." + kExpertBias, {E});
    }
    swiglu(moe + "mlp.experts.", hf + "mlp.experts.", F, E);
    if (c.n_shared_experts > 0) {
      swiglu(moe + "mlp.shared_experts.", hf + "mlp.shared_experts.", c.n_shared_experts * F, 0);
    }
  };
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    layer_tensors("model.layers." + std::to_string(layer) + ".",
                  "decoder.layers." + std::to_string(layer) + ".", c.is_moe_layer(layer));
  }
  whole("decoder.final_layernorm.weight", "model.norm.weight", {H});
  auto output_layer = [&](const std::string& hf_name, bool copy) {
    m.hf_shapes.push_back({hf_name, {V, H}});
    Piece piece = c.tie_word_embeddings ? Piece{hf_name, false} : Piece{hf_name, true, 0, V, 0, Vp};
    piece.shared_copy = copy;
    m.pieces_by_moecore[c.tie_word_embeddings ? "embedding.word_embeddings.weight"
                                              : "output_layer.weight"]
        .push_back(piece);
  };
  if (!c.tie_word_embeddings) output_layer("lm_head.weight", false);
  // Multi-token prediction (HF: the layers after the decoder's, each with its own copies of the
  // embedding and output head, which moecore shares with the main model).
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    const std::string hf = "model.layers." + std::to_string(c.num_hidden_layers + k) + ".";
    const std::string moe = "mtp.layers." + std::to_string(k) + ".";
    Piece embedding{hf + "embed_tokens.weight", false};
    embedding.shared_copy = true;
    m.hf_shapes.push_back({embedding.hf_name, {V, H}});
    m.pieces_by_moecore["embedding.word_embeddings.weight"].push_back(embedding);
    whole(moe + "enorm.weight", hf + "enorm.weight", {H});
    whole(moe + "hnorm.weight", hf + "hnorm.weight", {H});
    linear(moe + "eh_proj.weight", hf + "eh_proj.weight", H, 2 * H);
    layer_tensors(hf, moe + "transformer_layer.", c.is_moe_layer(c.num_hidden_layers - 1));
    whole(moe + "final_layernorm.weight", hf + "shared_head.norm.weight", {H});
    output_layer(hf + "shared_head.head.weight", true);
  }
  return m;
}

// HF name -> (moecore name, piece) pairs.
std::map<std::string, std::vector<std::pair<std::string, Piece>>> pieces_by_hf_name(
    const Mapping& mapping) {
  std::map<std::string, std::vector<std::pair<std::string, Piece>>> users;
  for (const auto& [moe_name, pieces] : mapping.pieces_by_moecore) {
    for (const Piece& piece : pieces) users[piece.hf_name].push_back({moe_name, piece});
  }
  return users;
}

Tensor store_tensor(const ParameterStore& store, const std::string& name) {
  ParamHandle handle = store.find(name);
  MOE_CHECK(handle.index >= 0, "hf_deepseek: the moecore model has no parameter '", name, "'");
  return store.param(handle);
}

// A non-negative integer field; `fallback` for absent or null ones (nullopt: required).
int64_t integer_field(const nlohmann::json& json, const char* field, const std::string& source,
                      std::optional<int64_t> fallback = std::nullopt, int64_t minimum = 1) {
  const nlohmann::json* value = field_of(json, field);
  if (!value) {
    MOE_CHECK(fallback.has_value(), source, ": config field '", field, "' is missing");
    return *fallback;
  }
  MOE_CHECK(value->is_number_integer() && value->get<int64_t>() >= minimum, source,
            ": config field '", field, "' must be an integer >= ", minimum, ", got ",
            value->dump());
  return value->get<int64_t>();
}

std::string string_field(const nlohmann::json& json, const char* field, const std::string& source,
                         const std::string& fallback) {
  const nlohmann::json* value = field_of(json, field);
  if (!value) return fallback;
  MOE_CHECK(value->is_string(), source, ": config field '", field, "' must be a string, got ",
            value->dump());
  return value->get<std::string>();
}

// The shortest text that reads back as `value` (1e4 -> "10000", 0.8 -> "0.8"), for flags.
std::string number_text(double value) {
  char buffer[32];
  auto [end, error] = std::to_chars(buffer, buffer + sizeof(buffer), value);
  MOE_CHECK(error == std::errc(), "cannot print ", value);
  std::string text(buffer, end);
  // Megatron's integer flags (--rotary-base) refuse "1e+06"; integers print in full.
  if (value == std::floor(value) && std::abs(value) < 1e15) text = std::to_string(int64_t(value));
  return text;
}

}  // namespace

bool is_deepseek_config(const nlohmann::json& json) {
  if (!json.is_object()) return false;
  if (json.contains("model_type") && json["model_type"].is_string()) {
    const std::string type = json["model_type"];
    if (type == "deepseek_v2" || type == "deepseek_v3") return true;
  }
  if (json.contains("architectures") && json["architectures"].is_array()) {
    for (const auto& name : json["architectures"]) {
      if (name == "DeepseekV2ForCausalLM" || name == "DeepseekV3ForCausalLM") return true;
    }
  }
  return false;
}

void DeepSeekConfig::validate() const {
  const std::string what = "DeepSeek-V" + std::to_string(version) + " config: ";
  MOE_CHECK(version == 2 || version == 3, "DeepSeek config: version must be 2 or 3, got ", version);
  for (const auto& [field, value] : {std::pair<const char*, int64_t>{"vocab_size", vocab_size},
                                     {"hidden_size", hidden_size},
                                     {"intermediate_size", intermediate_size},
                                     {"moe_intermediate_size", moe_intermediate_size},
                                     {"num_hidden_layers", num_hidden_layers},
                                     {"num_attention_heads", num_attention_heads},
                                     {"n_routed_experts", n_routed_experts},
                                     {"num_experts_per_tok", num_experts_per_tok},
                                     {"kv_lora_rank", kv_lora_rank},
                                     {"qk_nope_head_dim", qk_nope_head_dim},
                                     {"qk_rope_head_dim", qk_rope_head_dim},
                                     {"v_head_dim", v_head_dim},
                                     {"max_position_embeddings", max_position_embeddings}}) {
    MOE_CHECK(value > 0, what, field, " must be positive, got ", value);
  }
  MOE_CHECK(qk_rope_head_dim % 2 == 0, what, "qk_rope_head_dim (", qk_rope_head_dim,
            ") must be even (rope rotates pairs)");
  MOE_CHECK(first_k_dense_replace >= 0 && first_k_dense_replace < num_hidden_layers, what,
            "first_k_dense_replace (", first_k_dense_replace,
            ") must leave at least one MoE layer of num_hidden_layers (", num_hidden_layers, ")");
  MOE_CHECK(num_experts_per_tok <= n_routed_experts, what, "num_experts_per_tok (",
            num_experts_per_tok, ") exceeds n_routed_experts (", n_routed_experts, ")");
  MOE_CHECK(routed_scaling_factor > 0, what, "routed_scaling_factor must be positive, got ",
            routed_scaling_factor);
  MOE_CHECK(rope_theta > 0 && rms_norm_eps > 0, what,
            "rope_theta and rms_norm_eps must be positive, got ", rope_theta, " and ",
            rms_norm_eps);
  // HF builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps 1e-6 whatever
  // rms_norm_eps says; moecore's latent norms use the model's one epsilon.
  MOE_CHECK(rms_norm_eps == 1e-6, what, "rms_norm_eps (", rms_norm_eps,
            ") must be 1e-6: HF's q_a_layernorm and kv_a_layernorm always use 1e-6 and moecore "
            "uses one epsilon for every norm");
  MOE_CHECK(padded_vocab_size == 0 || padded_vocab_size >= vocab_size, what, "padded_vocab_size (",
            padded_vocab_size, ") is smaller than vocab_size (", vocab_size, ")");
  if (version == 3) {
    MOE_CHECK(topk_method == "noaux_tc", what, "topk_method \"", topk_method,
              "\" is not DeepSeek-V3's \"noaux_tc\" (sigmoid scores plus e_score_correction_bias)");
    // Megatron renormalises sigmoid top-k scores whenever top-k > 1.
    MOE_CHECK(norm_topk_prob || num_experts_per_tok == 1, what,
              "norm_topk_prob false with num_experts_per_tok ", num_experts_per_tok,
              " cannot be expressed: moecore (as Megatron) renormalises sigmoid top-k scores");
  } else {
    MOE_CHECK(topk_method == "greedy" || topk_method == "group_limited_greedy", what,
              "topk_method \"", topk_method,
              "\" is not one of DeepSeek-V2's \"greedy\", \"group_limited_greedy\"");
  }
  const bool grouped = version == 3 || topk_method == "group_limited_greedy";
  if (grouped && (n_group > 0 || topk_group > 0)) {
    MOE_CHECK(n_group > 0 && topk_group > 0 && topk_group <= n_group, what, "n_group (", n_group,
              ") and topk_group (", topk_group, ") must be positive with topk_group <= n_group");
    MOE_CHECK(n_routed_experts % n_group == 0, what, "n_routed_experts (", n_routed_experts,
              ") is not a multiple of n_group (", n_group, ")");
  } else {
    MOE_CHECK(version == 2 || (n_group == 0 && topk_group == 0), what,
              "DeepSeek-V3 routing needs n_group and topk_group");
  }
  if (group_limited()) {
    // A group's score: HF's V3 sums its top 2 scores and V2 takes its best one; Megatron sums
    // its top (top-k / group-topk), so the two agree only when that quotient is HF's.
    const int64_t per_group = version == 3 ? 2 : 1;
    MOE_CHECK(num_experts_per_tok == per_group * topk_group, what, "num_experts_per_tok (",
              num_experts_per_tok, ") must be ", per_group, " x topk_group (", topk_group,
              "): HF scores a group by its top ", per_group,
              " expert(s), moecore (as Megatron) by its top num_experts_per_tok / topk_group");
  }
  if (rope_scaling_factor != 0) {
    MOE_CHECK(rope_scaling_factor >= 1, what, "rope_scaling.factor must be >= 1, got ",
              rope_scaling_factor);
    MOE_CHECK(mscale != 0 || mscale_all_dim == 0, what,
              "rope_scaling.mscale 0 with mscale_all_dim ", mscale_all_dim,
              " cannot be expressed (HF then ignores mscale)");
  }
}

DeepSeekConfig DeepSeekConfig::from_json(const nlohmann::json& json, const std::string& source) {
  MOE_CHECK(json.is_object(), source, ": a config.json must hold a JSON object");
  MOE_CHECK(is_deepseek_config(json), source,
            ": not a DeepSeek-V2/V3 config (model_type deepseek_v2 / deepseek_v3 or architectures "
            "DeepseekV2ForCausalLM / DeepseekV3ForCausalLM)");
  DeepSeekConfig c;
  const std::string type = string_field(json, "model_type", source, "");
  bool v2 = type == "deepseek_v2";
  if (type.empty()) {
    for (const auto& name : json.at("architectures")) v2 = v2 || name == "DeepseekV2ForCausalLM";
  }
  c.version = v2 ? 2 : 3;
  c.vocab_size = integer_field(json, "vocab_size", source);
  c.hidden_size = integer_field(json, "hidden_size", source);
  c.intermediate_size = integer_field(json, "intermediate_size", source);
  c.moe_intermediate_size = integer_field(json, "moe_intermediate_size", source);
  c.num_hidden_layers = integer_field(json, "num_hidden_layers", source);
  c.num_attention_heads = integer_field(json, "num_attention_heads", source);
  const int64_t kv_heads =
      integer_field(json, "num_key_value_heads", source, c.num_attention_heads);
  MOE_CHECK(kv_heads == c.num_attention_heads, source, ": config field 'num_key_value_heads' (",
            kv_heads, ") must equal num_attention_heads (", c.num_attention_heads,
            "): multi-latent attention gives every head its own key and value");
  c.n_routed_experts = integer_field(json, "n_routed_experts", source);
  // HF's defaults for absent fields; null (HF's None) means none / no grouping / no compression.
  auto optional_size = [&](const char* field, int64_t absent) {
    return json.contains(field) ? integer_field(json, field, source, 0, 0) : absent;
  };
  c.n_shared_experts = optional_size("n_shared_experts", v2 ? 0 : 1);
  c.num_experts_per_tok = integer_field(json, "num_experts_per_tok", source);
  c.first_k_dense_replace = integer_field(json, "first_k_dense_replace", source, v2 ? 0 : 3, 0);
  c.routed_scaling_factor = number_field(json, "routed_scaling_factor", source, v2 ? 1.0 : 2.5);
  c.n_group = optional_size("n_group", v2 ? 0 : 8);
  c.topk_group = optional_size("topk_group", v2 ? 0 : 4);
  c.topk_method = string_field(json, "topk_method", source, v2 ? "greedy" : "noaux_tc");
  c.norm_topk_prob = bool_field(json, "norm_topk_prob", source, !v2);
  c.q_lora_rank = optional_size("q_lora_rank", 1536);
  c.kv_lora_rank = integer_field(json, "kv_lora_rank", source);
  c.qk_nope_head_dim = integer_field(json, "qk_nope_head_dim", source);
  c.qk_rope_head_dim = integer_field(json, "qk_rope_head_dim", source);
  c.v_head_dim = integer_field(json, "v_head_dim", source);
  c.max_position_embeddings = integer_field(json, "max_position_embeddings", source, 4096);
  c.rope_theta = number_field(json, "rope_theta", source, 10000);
  c.rms_norm_eps = number_field(json, "rms_norm_eps", source, 1e-6);
  c.tie_word_embeddings = bool_field(json, "tie_word_embeddings", source, false);

  // Fields whose other values change the forward in ways moecore does not compute.
  const std::string scoring =
      string_field(json, "scoring_func", source, v2 ? "softmax" : "sigmoid");
  MOE_CHECK(scoring == (v2 ? "softmax" : "sigmoid"), source, ": config field 'scoring_func' \"",
            scoring, "\" is not DeepSeek-V", c.version, "'s \"", v2 ? "softmax" : "sigmoid", "\"");
  const std::string act = string_field(json, "hidden_act", source, "silu");
  MOE_CHECK(act == "silu", source, ": config field 'hidden_act' \"", act,
            "\" is not supported (moecore's SwiGLU uses silu)");
  for (const char* field : {"attention_bias", "mlp_bias"}) {
    MOE_CHECK(!bool_field(json, field, source, false), source, ": config field '", field,
              "' true is not supported (DeepSeek's projections have no biases in moecore)");
  }
  MOE_CHECK(bool_field(json, "rope_interleave", source, true), source,
            ": config field 'rope_interleave' false is not supported (moecore's multi-latent "
            "attention rotates adjacent pairs, as Megatron's mla_rotary_interleaved)");
  MOE_CHECK(integer_field(json, "moe_layer_freq", source, 1) == 1, source,
            ": config field 'moe_layer_freq' must be 1 (every layer from first_k_dense_replace "
            "on is an MoE layer)");
  c.num_nextn_predict_layers = integer_field(json, "num_nextn_predict_layers", source, 0, 0);
  if (const nlohmann::json* scaling = field_of(json, "rope_scaling")) {
    MOE_CHECK(scaling->is_object(), source, ": config field 'rope_scaling' must be an object");
    std::string kind = string_field(*scaling, "type", source, "default");
    kind = string_field(*scaling, "rope_type", source, kind);
    MOE_CHECK(kind == "yarn" || kind == "default", source, ": rope_scaling type \"", kind,
              "\" is not supported (only yarn)");
    if (kind == "yarn") {
      c.rope_scaling_factor = number_field(*scaling, "factor", source, 0);
      MOE_CHECK(c.rope_scaling_factor >= 1, source,
                ": config field 'rope_scaling.factor' must be a number >= 1");
      c.mscale = number_field(*scaling, "mscale", source, 1.0);
      c.mscale_all_dim = number_field(*scaling, "mscale_all_dim", source, 0.0);
      // HF uses get_mscale(factor) (mscale 1) unless both mscale and mscale_all_dim are set.
      if (c.mscale_all_dim == 0) c.mscale = 1.0;
      for (const auto& [field, megatron] :
           {std::pair<const char*, double>{"original_max_position_embeddings", 4096},
            {"beta_fast", 32},
            {"beta_slow", 1}}) {
        const double value = number_field(*scaling, field, source, megatron);
        MOE_CHECK(value == megatron, source, ": config field 'rope_scaling.", field, "' (", value,
                  ") must be ", megatron,
                  ": moecore's multi-latent attention keeps Megatron's MLA YaRN default");
      }
      MOE_CHECK(!field_of(*scaling, "attention_factor"), source,
                ": config field 'rope_scaling.attention_factor' is not supported");
      MOE_CHECK(bool_field(*scaling, "truncate", source, true), source,
                ": config field 'rope_scaling.truncate' false is not supported");
    }
  }
  return detail::validated(std::move(c), source);
}

nlohmann::json DeepSeekConfig::to_json() const {
  const bool v2 = version == 2;
  nlohmann::json json = {
      {"architectures", {v2 ? "DeepseekV2ForCausalLM" : "DeepseekV3ForCausalLM"}},
      {"model_type", v2 ? "deepseek_v2" : "deepseek_v3"},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"moe_intermediate_size", moe_intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_attention_heads},
      {"n_routed_experts", n_routed_experts},
      {"n_shared_experts", n_shared_experts > 0 ? nlohmann::json(n_shared_experts) : nullptr},
      {"num_experts_per_tok", num_experts_per_tok},
      {"first_k_dense_replace", first_k_dense_replace},
      {"routed_scaling_factor", routed_scaling_factor},
      {"n_group", n_group > 0 ? nlohmann::json(n_group) : nullptr},
      {"topk_group", topk_group > 0 ? nlohmann::json(topk_group) : nullptr},
      {"topk_method", topk_method},
      {"norm_topk_prob", norm_topk_prob},
      {"q_lora_rank", q_lora_rank > 0 ? nlohmann::json(q_lora_rank) : nullptr},
      {"kv_lora_rank", kv_lora_rank},
      {"qk_nope_head_dim", qk_nope_head_dim},
      {"qk_rope_head_dim", qk_rope_head_dim},
      {"v_head_dim", v_head_dim},
      {"max_position_embeddings", max_position_embeddings},
      {"rope_theta", rope_theta},
      {"rms_norm_eps", rms_norm_eps},
      {"tie_word_embeddings", tie_word_embeddings},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"moe_layer_freq", 1},
      {"num_nextn_predict_layers", num_nextn_predict_layers}};
  if (!v2) {
    json["rope_interleave"] = true;
    json["scoring_func"] = "sigmoid";
  }
  if (rope_scaling_factor != 0) {
    json["rope_scaling"] = {{"type", "yarn"},
                            {"factor", rope_scaling_factor},
                            {"mscale", mscale},
                            {"mscale_all_dim", mscale_all_dim},
                            {"original_max_position_embeddings", 4096},
                            {"beta_fast", 32},
                            {"beta_slow", 1}};
  }
  return json;
}

model::TransformerConfig DeepSeekConfig::transformer_config() const {
  validate();
  model::TransformerConfig t;
  t.num_layers = int(num_hidden_layers);
  t.hidden_size = int(hidden_size);
  t.ffn_hidden_size = int(intermediate_size);
  t.num_attention_heads = int(num_attention_heads);
  t.kv_channels = int(kv_channels());
  t.padded_vocab_size = moecore_vocab_rows();
  t.max_position_embeddings = int(max_position_embeddings);
  t.normalization = "RMSNorm";
  t.norm_epsilon = float(rms_norm_eps);
  t.position_embedding_type = "rope";
  t.rotary_base = float(rope_theta);
  t.multi_latent_attention = true;
  t.q_lora_rank = int(q_lora_rank);
  t.kv_lora_rank = int(kv_lora_rank);
  t.qk_head_dim = int(qk_nope_head_dim);
  t.qk_pos_emb_head_dim = int(qk_rope_head_dim);
  t.v_head_dim = int(v_head_dim);
  t.qk_layernorm = true;  // DeepSeek's q_a_layernorm and kv_a_layernorm
  if (rope_scaling_factor != 0) {
    t.rope_type = "yarn";
    t.rotary_scaling_factor = rope_scaling_factor;
    t.mscale = mscale;
    t.mscale_all_dim = mscale_all_dim;
  } else {
    t.rope_type = "rope";
  }
  t.swiglu = true;
  t.add_bias_linear = false;
  t.untie_embeddings_and_output_weights = !tie_word_embeddings;
  t.hidden_dropout = 0;
  t.attention_dropout = 0;
  t.num_experts = int(n_routed_experts);
  t.moe_layer_pattern.clear();
  for (int64_t layer = 0; layer < num_hidden_layers; ++layer) {
    t.moe_layer_pattern.push_back(is_moe_layer(layer) ? 1 : 0);
  }
  MoEConfig& m = t.moe;
  m.moe_ffn_hidden_size = moe_intermediate_size;
  m.moe_router_topk = num_experts_per_tok;
  if (version == 3) {
    m.moe_router_score_function = ScoreFunction::kSigmoid;
    m.moe_router_enable_expert_bias = true;
  } else {
    m.moe_router_pre_softmax = true;  // HF's V2: top-k of the softmax over all, not renormalised
  }
  if (routed_scaling_factor != 1.0) m.moe_router_topk_scaling_factor = routed_scaling_factor;
  if (group_limited()) {
    m.moe_router_num_groups = n_group;
    m.moe_router_group_topk = topk_group;
  }
  t.moe_shared_expert_intermediate_size = int(n_shared_experts * moe_intermediate_size);
  t.mtp_num_layers = int(num_nextn_predict_layers);
  return t;
}

std::string DeepSeekConfig::megatron_flags() const {
  validate();
  std::ostringstream flags;
  flags << "--num-layers " << num_hidden_layers << " --hidden-size " << hidden_size
        << " --ffn-hidden-size " << intermediate_size << " --num-attention-heads "
        << num_attention_heads;
  if (kv_channels() > 0) flags << " --kv-channels " << kv_channels();
  flags << " --multi-latent-attention";
  if (q_lora_rank > 0) flags << " --q-lora-rank " << q_lora_rank;
  flags << " --kv-lora-rank " << kv_lora_rank << " --qk-head-dim " << qk_nope_head_dim
        << " --qk-pos-emb-head-dim " << qk_rope_head_dim << " --v-head-dim " << v_head_dim
        << " --qk-layernorm --max-position-embeddings " << max_position_embeddings
        << " --normalization RMSNorm --norm-epsilon " << number_text(rms_norm_eps)
        << " --position-embedding-type rope --rotary-base " << number_text(rope_theta);
  if (rope_scaling_factor != 0) {
    flags << " --rope-type yarn --rotary-scaling-factor " << number_text(rope_scaling_factor)
          << " --mscale " << number_text(mscale) << " --mscale-all-dim "
          << number_text(mscale_all_dim);
  } else {
    flags << " --rope-type rope";
  }
  flags << " --swiglu --disable-bias-linear";
  if (!tie_word_embeddings) flags << " --untie-embeddings-and-output-weights";
  flags << " --hidden-dropout 0 --attention-dropout 0 --num-experts " << n_routed_experts
        << " --moe-ffn-hidden-size " << moe_intermediate_size << " --moe-router-topk "
        << num_experts_per_tok;
  if (first_k_dense_replace > 0) {
    flags << " --moe-layer-freq '[0]*" << first_k_dense_replace << "+[1]*"
          << num_hidden_layers - first_k_dense_replace << "'";
  }
  if (version == 3) {
    flags << " --moe-router-score-function sigmoid --moe-router-enable-expert-bias";
  } else {
    flags << " --moe-router-pre-softmax";
  }
  if (routed_scaling_factor != 1.0) {
    flags << " --moe-router-topk-scaling-factor " << number_text(routed_scaling_factor);
  }
  if (group_limited()) {
    flags << " --moe-router-num-groups " << n_group << " --moe-router-group-topk " << topk_group;
  }
  if (n_shared_experts > 0) {
    flags << " --moe-shared-expert-intermediate-size " << n_shared_experts * moe_intermediate_size;
  }
  if (num_nextn_predict_layers > 0) flags << " --mtp-num-layers " << num_nextn_predict_layers;
  return flags.str();
}

std::vector<ParamSpec> moecore_param_specs(const DeepSeekConfig& config) {
  model::TransformerConfig t = config.transformer_config();
  t.seq_length = 1;  // shapes do not depend on it
  ParameterStore store;
  model::GPTModel model(t, comm::single_process_state(), store);
  std::vector<ParamSpec> specs;
  for (int i = 0; i < store.count(); ++i) specs.push_back(store.spec(ParamHandle{i}));
  return specs;
}

std::vector<std::pair<std::string, Shape>> hf_tensor_shapes(const DeepSeekConfig& config) {
  return build_mapping(config).hf_shapes;
}

void hf_to_moecore(const DeepSeekConfig& config,
                   const std::function<Tensor(const std::string&)>& read_hf,
                   ParameterStore& store) {
  const Mapping mapping = build_mapping(config);
  const auto users = pieces_by_hf_name(mapping);  // each HF tensor is read once
  for (const auto& [hf_name, hf_shape] : mapping.hf_shapes) {
    Tensor hf = read_hf(hf_name);
    MOE_CHECK(hf.defined(), "hf_deepseek: HF tensor '", hf_name, "' is missing");
    check_shape(hf, hf_shape, "HF tensor '" + hf_name + "'");
    for (const auto& [moe_name, piece] : users.at(hf_name)) {
      Tensor moe = store_tensor(store, moe_name);
      Tensor source = hf.dtype() == moe.dtype() ? hf : hf.to(moe.dtype());
      if (piece.shared_copy) {
        Tensor held = Tensor::empty(hf_shape, moe.dtype());
        move_piece(piece, held, moe, /*to_moecore=*/false);
        MOE_CHECK(std::memcmp(held.raw(), source.raw(), held.nbytes()) == 0,
                  "hf_deepseek: HF tensor '", hf_name, "' differs from the main model's ",
                  hf_name.ends_with("embed_tokens.weight") ? "model.embed_tokens.weight"
                                                           : "lm_head.weight",
                  ", which moecore's multi-token prediction shares");
        continue;
      }
      move_piece(piece, source, moe, /*to_moecore=*/true);
    }
  }
}

std::vector<safetensors::TensorEntry> hf_tensor_entries(const DeepSeekConfig& config, DType dtype) {
  std::vector<safetensors::TensorEntry> entries;
  for (auto& [name, shape] : hf_tensor_shapes(config)) {
    entries.push_back({name, name.ends_with(kExpertBias) ? DType::F32 : dtype, shape});
  }
  return entries;
}

safetensors::TensorSource hf_tensor_source(const DeepSeekConfig& config,
                                           const ParameterStore& store, DType dtype) {
  struct Sources {
    std::map<std::string, Shape> shapes;
    std::map<std::string, std::vector<std::pair<std::string, Piece>>> users;
  };
  auto sources = std::make_shared<Sources>();
  const Mapping mapping = build_mapping(config);
  for (const auto& [name, shape] : mapping.hf_shapes) sources->shapes[name] = shape;
  sources->users = pieces_by_hf_name(mapping);
  return [sources, &store, dtype](const std::string& name) {
    auto shape = sources->shapes.find(name);
    MOE_CHECK(shape != sources->shapes.end(), "hf_deepseek: a DeepSeek model has no tensor '", name,
              "'");
    Tensor hf;
    for (const auto& [moe_name, piece] : sources->users.at(name)) {
      Tensor moe = store_tensor(store, moe_name);
      if (!hf.defined()) hf = Tensor::empty(shape->second, moe.dtype());
      move_piece(piece, hf, moe, /*to_moecore=*/false);
    }
    const DType out = name.ends_with(kExpertBias) ? DType::F32 : dtype;
    return hf.dtype() == out ? hf : hf.to(out);
  };
}

std::vector<safetensors::NamedTensor> moecore_to_hf(const DeepSeekConfig& config,
                                                    const ParameterStore& store, DType dtype) {
  return detail::read_all(hf_tensor_source(config, store, dtype), hf_tensor_shapes(config));
}

}  // namespace moe::convert::hf_deepseek

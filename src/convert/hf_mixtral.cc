#include "moe/convert/hf_mixtral.h"

#include <array>
#include <cmath>
#include <cstring>
#include <map>
#include <sstream>

#include "moe/tensor/error.h"

namespace moe::convert::hf_mixtral {
namespace {

// A block of an HF tensor and where it lies in a moecore tensor. Transposed blocks are rows
// [row_begin, row_begin + rows) of an HF matrix [R, in]; HF element (row_begin + r, i) is moecore
// element offset + i * row_stride + r. Untransposed blocks copy the whole HF tensor to
// [offset, offset + numel).
struct Piece {
  std::string hf_name;
  bool transpose = true;
  int64_t row_begin = 0, rows = 0;
  int64_t offset = 0, row_stride = 0;
};

struct MappedTensor {
  ParamSpec spec;  // moecore name, global shape, group
  std::vector<Piece> pieces;
};

struct Mapping {
  std::vector<MappedTensor> tensors;
  std::vector<std::pair<std::string, Shape>> hf_shapes;
};

Mapping build_mapping(const MixtralConfig& c) {
  c.validate();
  const int64_t H = c.hidden_size, V = c.vocab_size, Vp = c.moecore_vocab_rows();
  const int64_t F = c.intermediate_size;
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
  auto whole = [](const std::string& hf_name) {
    Piece piece;
    piece.hf_name = hf_name;
    piece.transpose = false;
    return std::vector<Piece>{piece};
  };
  auto transposed = [](const std::string& hf_name, int64_t row_begin, int64_t rows, int64_t offset,
                       int64_t row_stride) {
    return Piece{hf_name, true, row_begin, rows, offset, row_stride};
  };
  auto norm = [&](const std::string& moe_name, const std::string& hf_name) {
    m.hf_shapes.push_back({hf_name, {H}});
    add(moe_name, {H}, ParamGroup::kDense, false, true, whole(hf_name));
  };

  m.hf_shapes.push_back({"model.embed_tokens.weight", {V, H}});
  add("embedding.word_embeddings.weight", {Vp, H}, ParamGroup::kDense, true, false,
      whole("model.embed_tokens.weight"));
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    const std::string hf = "model.layers." + std::to_string(layer) + ".";
    const std::string moe = "decoder.layers." + std::to_string(layer) + ".";
    norm(moe + "input_layernorm.weight", hf + "input_layernorm.weight");

    // qkv [H, G, per_group + 2, d], viewed as rows of G * (per_group + 2) * d columns.
    const std::string q = hf + "self_attn.q_proj.weight", k = hf + "self_attn.k_proj.weight",
                      v = hf + "self_attn.v_proj.weight", o = hf + "self_attn.o_proj.weight";
    m.hf_shapes.push_back({q, {c.num_attention_heads * d, H}});
    m.hf_shapes.push_back({k, {G * d, H}});
    m.hf_shapes.push_back({v, {G * d, H}});
    m.hf_shapes.push_back({o, {H, c.num_attention_heads * d}});
    const int64_t qkv_columns = G * (per_group + 2) * d;
    std::vector<Piece> qkv;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t group_column = g * (per_group + 2) * d;
      qkv.push_back(transposed(q, g * per_group * d, per_group * d, group_column, qkv_columns));
      qkv.push_back(transposed(k, g * d, d, group_column + per_group * d, qkv_columns));
      qkv.push_back(transposed(v, g * d, d, group_column + (per_group + 1) * d, qkv_columns));
    }
    add(moe + "self_attention.linear_qkv.weight", {H, G, per_group + 2, d}, ParamGroup::kDense,
        true, false, std::move(qkv));
    add(moe + "self_attention.linear_proj.weight", {c.num_attention_heads * d, H},
        ParamGroup::kDense, true, false, {transposed(o, 0, H, 0, H)});
    norm(moe + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight");

    const std::string gate = hf + "block_sparse_moe.gate.weight";
    m.hf_shapes.push_back({gate, {E, H}});
    add(moe + "mlp.router.weight", {H, E}, ParamGroup::kDense, true, true,
        {transposed(gate, 0, E, 0, E)});
    std::vector<Piece> fc1, fc2;
    for (int64_t e = 0; e < E; ++e) {
      const std::string expert = hf + "block_sparse_moe.experts." + std::to_string(e) + ".";
      m.hf_shapes.push_back({expert + "w1.weight", {F, H}});
      m.hf_shapes.push_back({expert + "w2.weight", {H, F}});
      m.hf_shapes.push_back({expert + "w3.weight", {F, H}});
      fc1.push_back(transposed(expert + "w1.weight", 0, F, e * H * 2 * F, 2 * F));
      fc1.push_back(transposed(expert + "w3.weight", 0, F, e * H * 2 * F + F, 2 * F));
      fc2.push_back(transposed(expert + "w2.weight", 0, H, e * F * H, H));
    }
    add(moe + "mlp.experts.linear_fc1.weight", {E, H, 2, F}, ParamGroup::kExpert, true, false,
        std::move(fc1));
    add(moe + "mlp.experts.linear_fc2.weight", {E, F, H}, ParamGroup::kExpert, true, false,
        std::move(fc2));
  }
  norm("decoder.final_layernorm.weight", "model.norm.weight");
  if (!c.tie_word_embeddings) {
    m.hf_shapes.push_back({"lm_head.weight", {V, H}});
    add("output_layer.weight", {H, Vp}, ParamGroup::kDense, true, false,
        {transposed("lm_head.weight", 0, V, 0, Vp)});
  }
  return m;
}

// Copies one piece between an HF tensor and a moecore tensor of the same dtype, in the direction
// `to_moecore`, as elements of type T (only their bytes matter).
template <class T>
void move_piece_typed(const Piece& piece, T* hf, T* moe, int64_t hf_columns, int64_t hf_numel,
                      bool to_moecore) {
  if (!piece.transpose) {
    if (to_moecore) {
      std::memcpy(moe + piece.offset, hf, size_t(hf_numel) * sizeof(T));
    } else {
      std::memcpy(hf, moe + piece.offset, size_t(hf_numel) * sizeof(T));
    }
    return;
  }
#pragma omp parallel for schedule(static) if (piece.rows * hf_columns > 65536)
  for (int64_t r = 0; r < piece.rows; ++r) {
    T* hf_row = hf + (piece.row_begin + r) * hf_columns;
    T* moe_column = moe + piece.offset + r;
    for (int64_t i = 0; i < hf_columns; ++i) {
      if (to_moecore) {
        moe_column[i * piece.row_stride] = hf_row[i];
      } else {
        hf_row[i] = moe_column[i * piece.row_stride];
      }
    }
  }
}

void move_piece(const Piece& piece, Tensor& hf, Tensor& moe, bool to_moecore) {
  const int64_t columns = hf.ndim() == 2 ? hf.dim(1) : 1;
  switch (dtype_size(hf.dtype())) {
    case 2:
      return move_piece_typed(piece, static_cast<uint16_t*>(hf.raw()),
                              static_cast<uint16_t*>(moe.raw()), columns, hf.numel(), to_moecore);
    case 4:
      return move_piece_typed(piece, static_cast<uint32_t*>(hf.raw()),
                              static_cast<uint32_t*>(moe.raw()), columns, hf.numel(), to_moecore);
    default:
      return move_piece_typed(piece, static_cast<uint64_t*>(hf.raw()),
                              static_cast<uint64_t*>(moe.raw()), columns, hf.numel(), to_moecore);
  }
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
  MOE_CHECK(handle.index >= 0, "hf_mixtral: the moecore model has no parameter '", spec.name, "'");
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
std::array<std::pair<const char*, int64_t>, 9> size_fields(const MixtralConfig& c) {
  return {{{"vocab_size", c.vocab_size},
           {"hidden_size", c.hidden_size},
           {"intermediate_size", c.intermediate_size},
           {"num_hidden_layers", c.num_hidden_layers},
           {"num_attention_heads", c.num_attention_heads},
           {"num_key_value_heads", c.num_key_value_heads},
           {"num_local_experts", c.num_local_experts},
           {"num_experts_per_tok", c.num_experts_per_tok},
           {"max_position_embeddings", c.max_position_embeddings}}};
}

}  // namespace

void MixtralConfig::validate() const {
  for (const auto& [field, value] : size_fields(*this)) {
    MOE_CHECK(value > 0, "Mixtral config: ", field, " must be positive, got ", value);
  }
  MOE_CHECK(num_attention_heads % num_key_value_heads == 0, "Mixtral config: num_attention_heads (",
            num_attention_heads, ") is not a multiple of num_key_value_heads (",
            num_key_value_heads, ")");
  MOE_CHECK(head_dim > 0 || hidden_size % num_attention_heads == 0, "Mixtral config: hidden_size (",
            hidden_size, ") is not divisible by num_attention_heads (", num_attention_heads,
            ") and head_dim is not given");
  MOE_CHECK(head_size() % 2 == 0, "Mixtral config: rotary embeddings need an even head_dim, got ",
            head_size());
  MOE_CHECK(num_experts_per_tok <= num_local_experts, "Mixtral config: num_experts_per_tok (",
            num_experts_per_tok, ") exceeds num_local_experts (", num_local_experts, ")");
  MOE_CHECK(padded_vocab_size == 0 || padded_vocab_size >= vocab_size,
            "Mixtral config: padded_vocab_size (", padded_vocab_size,
            ") is smaller than vocab_size (", vocab_size, ")");
  MOE_CHECK(rope_theta > 0 && rms_norm_eps > 0,
            "Mixtral config: rope_theta and rms_norm_eps must be positive, got ", rope_theta,
            " and ", rms_norm_eps);
}

MixtralConfig MixtralConfig::from_json(const nlohmann::json& json, const std::string& source) {
  MOE_CHECK(json.is_object(), source, ": a config.json must hold a JSON object");
  if (json.contains("model_type")) {
    MOE_CHECK(json.at("model_type") == "mixtral", source, ": model_type is ",
              json.at("model_type").dump(), ", not \"mixtral\"");
  }
  MixtralConfig c;
  c.vocab_size = positive_field(json, "vocab_size", source);
  c.hidden_size = positive_field(json, "hidden_size", source);
  c.intermediate_size = positive_field(json, "intermediate_size", source);
  c.num_hidden_layers = positive_field(json, "num_hidden_layers", source);
  c.num_attention_heads = positive_field(json, "num_attention_heads", source);
  c.num_key_value_heads =
      positive_field(json, "num_key_value_heads", source, c.num_attention_heads);
  c.head_dim = positive_field(json, "head_dim", source, 0);
  c.num_local_experts = positive_field(json, "num_local_experts", source);
  c.num_experts_per_tok = positive_field(json, "num_experts_per_tok", source);
  c.max_position_embeddings = positive_field(json, "max_position_embeddings", source, 32768);
  auto number = [&](const char* field, double fallback) {
    if (!json.contains(field)) return fallback;
    MOE_CHECK(json.at(field).is_number(), source, ": config field '", field,
              "' must be a number, got ", json.at(field).dump());
    return json.at(field).get<double>();
  };
  c.rope_theta = number("rope_theta", 1e6);
  c.rms_norm_eps = number("rms_norm_eps", 1e-5);
  if (json.contains("tie_word_embeddings")) {
    MOE_CHECK(json.at("tie_word_embeddings").is_boolean(), source,
              ": config field 'tie_word_embeddings' must be true or false");
    c.tie_word_embeddings = json.at("tie_word_embeddings").get<bool>();
  }
  try {
    c.validate();
  } catch (const Error& e) {
    MOE_CHECK(false, source, ": ", e.what());
  }
  return c;
}

nlohmann::json MixtralConfig::to_json() const {
  nlohmann::json json = {{"architectures", {"MixtralForCausalLM"}},
                         {"model_type", "mixtral"},
                         {"rope_theta", rope_theta},
                         {"rms_norm_eps", rms_norm_eps},
                         {"tie_word_embeddings", tie_word_embeddings},
                         {"hidden_act", "silu"}};
  for (const auto& [field, value] : size_fields(*this)) json[field] = value;
  if (head_dim > 0) json["head_dim"] = head_dim;
  return json;
}

model::TransformerConfig MixtralConfig::transformer_config() const {
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
  t.untie_embeddings_and_output_weights = !tie_word_embeddings;
  t.hidden_dropout = 0;
  t.attention_dropout = 0;
  t.num_experts = int(num_local_experts);
  t.moe.moe_router_topk = num_experts_per_tok;
  return t;
}

std::string MixtralConfig::megatron_flags() const {
  validate();
  std::ostringstream flags;
  flags << "--num-layers " << num_hidden_layers << " --hidden-size " << hidden_size
        << " --ffn-hidden-size " << intermediate_size << " --num-attention-heads "
        << num_attention_heads << " --kv-channels " << head_size();
  if (num_key_value_heads != num_attention_heads) {
    flags << " --group-query-attention --num-query-groups " << num_key_value_heads;
  }
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
  return flags.str();
}

std::vector<ParamSpec> moecore_param_specs(const MixtralConfig& config) {
  std::vector<ParamSpec> specs;
  for (MappedTensor& tensor : build_mapping(config).tensors) specs.push_back(tensor.spec);
  return specs;
}

std::vector<std::pair<std::string, Shape>> hf_tensor_shapes(const MixtralConfig& config) {
  return build_mapping(config).hf_shapes;
}

void hf_to_moecore(const MixtralConfig& config,
                   const std::function<Tensor(const std::string&)>& read_hf,
                   ParameterStore& store) {
  Mapping mapping = build_mapping(config);
  const PiecesByHfName users = pieces_by_hf_name(mapping);  // each HF tensor is read once
  for (const auto& [hf_name, hf_shape] : mapping.hf_shapes) {
    Tensor hf = read_hf(hf_name);
    MOE_CHECK(hf.defined(), "hf_mixtral: HF tensor '", hf_name, "' is missing");
    check_shape(hf, hf_shape, "HF tensor '" + hf_name + "'");
    if (hf.dtype() != store.param_dtype()) hf = hf.to(store.param_dtype());
    for (const auto& [tensor, piece] : users.at(hf_name)) {
      Tensor moe = store_tensor(store, tensor->spec);
      move_piece(*piece, hf, moe, /*to_moecore=*/true);
    }
  }
}

std::vector<safetensors::TensorEntry> hf_tensor_entries(const MixtralConfig& config, DType dtype) {
  std::vector<safetensors::TensorEntry> entries;
  for (auto& [name, shape] : hf_tensor_shapes(config)) entries.push_back({name, dtype, shape});
  return entries;
}

safetensors::TensorSource hf_tensor_source(const MixtralConfig& config, const ParameterStore& store,
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
  return [sources, &store, dtype](const std::string& name) {
    auto shape = sources->shapes.find(name);
    MOE_CHECK(shape != sources->shapes.end(), "hf_mixtral: a Mixtral model has no tensor '", name,
              "'");
    Tensor hf = Tensor::empty(shape->second, store.param_dtype());
    for (const auto& [tensor, piece] : sources->pieces.at(name)) {
      Tensor moe = store_tensor(store, tensor->spec);
      move_piece(*piece, hf, moe, /*to_moecore=*/false);
    }
    return hf.dtype() == dtype ? hf : hf.to(dtype);
  };
}

std::vector<safetensors::NamedTensor> moecore_to_hf(const MixtralConfig& config,
                                                    const ParameterStore& store, DType dtype) {
  safetensors::TensorSource source = hf_tensor_source(config, store, dtype);
  std::vector<safetensors::NamedTensor> named;
  for (const auto& [name, shape] : hf_tensor_shapes(config)) named.push_back({name, source(name)});
  return named;
}

}  // namespace moe::convert::hf_mixtral

// Hugging Face MoE families <-> moecore parameter mapping (moe-convert uses it; docs/convert.md).
// One table-driven mapping serves MixtralForCausalLM, Qwen2MoeForCausalLM and
// Qwen3MoeForCausalLM: they differ in tensor names and a few optional tensors only.
//
// Both sides name global (single-process) tensors; Vp >= V is moecore's padded vocabulary. HF
// stores linear weights [out, in]; moecore stores them [in, out], so every linear is transposed:
//   model.embed_tokens.weight [V, H]                  -> embedding.word_embeddings.weight [Vp, H]
//   model.layers.N.input_layernorm.weight [H]         -> decoder.layers.N.input_layernorm.weight
//   self_attn.{q,k,v}_proj.weight [heads*d | G*d, H]  -> self_attention.linear_qkv.weight
//       [H, G, heads/G + 2, d]: per query group g, its heads/G query heads, then k_g, then v_g
//   self_attn.{q,k,v}_proj.bias (Qwen2-MoE)           -> self_attention.linear_qkv.bias
//       [G, heads/G + 2, d], interleaved the same way
//   self_attn.{q,k}_norm.weight [d] (Qwen3-MoE)       -> self_attention.{q,k}_layernorm.weight
//   self_attn.o_proj.weight [H, heads*d]              -> self_attention.linear_proj.weight
//   post_attention_layernorm.weight [H]               -> pre_mlp_layernorm.weight [H]
//   MoE layers (Mixtral: block_sparse_moe.*, experts' w1 (gate), w3 (up), w2 (down); Qwen:
//   mlp.*, experts' gate_proj, up_proj, down_proj):
//     gate.weight [E, H]                              -> mlp.router.weight [H, E]
//     experts.M gate, up [F, H]                       -> mlp.experts.linear_fc1.weight
//         [E, H, 2, F] (expert M, [:, 0, :] = gate^T, [:, 1, :] = up^T)
//     experts.M down [H, F]                           -> mlp.experts.linear_fc2.weight [E, F, H]
//     shared_expert.{gate,up}_proj [S, H] (Qwen2-MoE) -> mlp.shared_experts.linear_fc1.weight
//         [H, 2, S]; shared_expert.down_proj [H, S]   -> mlp.shared_experts.linear_fc2.weight
//     shared_expert_gate.weight [1, H]                -> mlp.shared_experts.gate_weight [H, 1]
//   dense layers (Qwen's mlp_only_layers / decoder_sparse_step): mlp.{gate,up}_proj [F, H] ->
//     mlp.linear_fc1.weight [H, 2, F]; mlp.down_proj [H, F] -> mlp.linear_fc2.weight [F, H]
//   model.norm.weight [H]                             -> decoder.final_layernorm.weight [H]
//   lm_head.weight [V, H]                             -> output_layer.weight [H, Vp] (absent when
//                                                        tie_word_embeddings)
// Query head h uses kv head h / (heads / G) on both sides (HF's repeat_kv, Megatron's query
// groups), and both apply rotary embeddings to the pairs (i, i + d/2) with frequencies
// rope_theta^(-2i/d) (HF's rotate_half), so no row permutation of q or k is needed.
// Conversions copy elements bitwise in whatever one dtype the tensors share.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moe/convert/safetensors.h"
#include "moe/model/config.h"
#include "moe/tensor/parameters.h"

namespace moe::convert::hf_moe {

enum class Family { kMixtral, kQwen2Moe, kQwen3Moe };

// HF's architecture name ("MixtralForCausalLM", ...) and model_type ("mixtral", ...).
const char* architecture_name(Family family);
const char* model_type_name(Family family);
// The family a config.json describes, from its "architectures" (else its "model_type"); throws
// naming the value and the supported architectures when it is none of them. `source` names the
// file in errors.
Family family_of(const nlohmann::json& json, const std::string& source);

// The fields of HF's MixtralConfig / Qwen2MoeConfig / Qwen3MoeConfig (config.json) that shape the
// weights or the forward.
struct HfMoeConfig {
  Family family = Family::kMixtral;
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  // Mixtral: each expert's width. Qwen: the dense layers' width (moe_intermediate_size is the
  // experts').
  int64_t intermediate_size = 14336;
  int64_t moe_intermediate_size = 0;            // Qwen only
  int64_t shared_expert_intermediate_size = 0;  // Qwen2-MoE only (its gated shared expert)
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 8;
  int64_t head_dim = 0;           // 0: hidden_size / num_attention_heads
  int64_t num_local_experts = 8;  // Mixtral's num_local_experts, Qwen's num_experts
  int64_t num_experts_per_tok = 2;
  int64_t max_position_embeddings = 32768;
  double rope_theta = 1e6;
  double rms_norm_eps = 1e-5;
  bool tie_word_embeddings = false;
  // Qwen: renormalise the top-k probabilities (Mixtral always does). false: the top-k of a
  // softmax over all experts as they are (Megatron's --moe-router-pre-softmax).
  bool norm_topk_prob = true;
  int64_t decoder_sparse_step = 1;       // Qwen: layer i is MoE when (i + 1) % step == 0 ...
  std::vector<int64_t> mlp_only_layers;  // ... and i is not listed here
  bool qkv_bias = false;                 // Qwen2-MoE (its default true)
  // Not HF's: the vocabulary rows of moecore's embedding and output layer (Megatron pads the
  // vocabulary to a multiple of make_vocab_size_divisible_by * tp). 0: vocab_size. Rows past
  // vocab_size are zero when converting from HF and dropped when converting to HF.
  int64_t padded_vocab_size = 0;

  int64_t moecore_vocab_rows() const {
    return padded_vocab_size > 0 ? padded_vocab_size : vocab_size;
  }
  int64_t head_size() const { return head_dim > 0 ? head_dim : hidden_size / num_attention_heads; }
  int64_t expert_width() const {
    return family == Family::kMixtral ? intermediate_size : moe_intermediate_size;
  }
  bool is_moe_layer(int64_t layer) const;
  bool qk_norm() const { return family == Family::kQwen3Moe; }
  bool shared_expert() const { return family == Family::kQwen2Moe; }
  // Throws naming the field when a value is missing, non-positive or inconsistent.
  void validate() const;
  // Reads config.json's fields (defaults as HF's for absent optional ones); the family comes from
  // family_of. Fields moecore cannot express (sliding-window attention, rope scaling, biases on
  // the output projection, an activation other than silu) are refused, named. `source` names the
  // file in errors.
  static HfMoeConfig from_json(const nlohmann::json& json, const std::string& source);
  nlohmann::json to_json() const;  // a config.json HF's <family>ForCausalLM accepts
  // The equivalent moecore model: RMSNorm, rope, SwiGLU experts, no biases (but Qwen2-MoE's qkv
  // bias), no dropout, untied unless tie_word_embeddings, softmax top-k router.
  model::TransformerConfig transformer_config() const;
  // The same as moe-train flags ("--num-layers 32 --hidden-size 4096 ...").
  std::string megatron_flags() const;
};

// moecore's parameters of that model on one process (names, global shapes, groups), as
// GPTModel declares them.
std::vector<ParamSpec> moecore_param_specs(const HfMoeConfig& config);
// HF's tensor names and shapes, in HF's order (layer by layer).
std::vector<std::pair<std::string, Shape>> hf_tensor_shapes(const HfMoeConfig& config);

// Fills every parameter of `store` (allocated, holding moecore_param_specs' names with their
// global shapes) from HF tensors returned by `read_hf` (called once per HF name). Checks each HF
// tensor's shape, converts it to the store's dtype when they differ, and names the tensor in
// errors. Padded vocabulary rows are left as they are (zero in a freshly allocated store).
void hf_to_moecore(const HfMoeConfig& config,
                   const std::function<Tensor(const std::string&)>& read_hf, ParameterStore& store);
// The HF tensors of the model held in `store` (global shapes, one process), in the store's dtype
// converted to `dtype`.
std::vector<safetensors::NamedTensor> moecore_to_hf(const HfMoeConfig& config,
                                                    const ParameterStore& store, DType dtype);

// The same one tensor at a time, for safetensors::write_checkpoint's streaming form: the
// entries (HF order, `dtype`) and a source building each HF tensor from `store` on demand, so
// only one HF tensor is alive at a time. `store` must outlive the source.
std::vector<safetensors::TensorEntry> hf_tensor_entries(const HfMoeConfig& config, DType dtype);
safetensors::TensorSource hf_tensor_source(const HfMoeConfig& config, const ParameterStore& store,
                                           DType dtype);

}  // namespace moe::convert::hf_moe

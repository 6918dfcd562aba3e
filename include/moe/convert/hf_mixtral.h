// Hugging Face Mixtral <-> moecore parameter mapping (moe-convert uses it; docs/convert.md).
//
// Both sides name global (single-process) tensors; Vp >= V is moecore's padded vocabulary. HF
// stores linear weights [out, in]; moecore stores them [in, out], so every linear is transposed:
//   model.embed_tokens.weight [V, H]                  -> embedding.word_embeddings.weight [Vp, H]
//   model.layers.N.input_layernorm.weight [H]         -> decoder.layers.N.input_layernorm.weight
//   self_attn.{q,k,v}_proj.weight [heads*d | G*d, H]  -> self_attention.linear_qkv.weight
//       [H, G, heads/G + 2, d]: per query group g, its heads/G query heads, then k_g, then v_g
//   self_attn.o_proj.weight [H, heads*d]              -> self_attention.linear_proj.weight
//   [heads*d, H] post_attention_layernorm.weight [H]               -> pre_mlp_layernorm.weight [H]
//   block_sparse_moe.gate.weight [E, H]               -> mlp.router.weight [H, E]
//   block_sparse_moe.experts.M.w1 (gate), w3 (up) [F, H] -> mlp.experts.linear_fc1.weight
//       [E, H, 2, F] (expert M, [:, 0, :] = w1^T, [:, 1, :] = w3^T)
//   block_sparse_moe.experts.M.w2.weight [H, F]       -> mlp.experts.linear_fc2.weight [E, F, H]
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

namespace moe::convert::hf_mixtral {

// The fields of HF's MixtralConfig (config.json) that shape the weights or the forward.
struct MixtralConfig {
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 14336;  // each expert's ffn width
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 8;
  int64_t head_dim = 0;  // 0: hidden_size / num_attention_heads
  int64_t num_local_experts = 8;
  int64_t num_experts_per_tok = 2;
  int64_t max_position_embeddings = 32768;
  double rope_theta = 1e6;
  double rms_norm_eps = 1e-5;
  bool tie_word_embeddings = false;
  // Not HF's: the vocabulary rows of moecore's embedding and output layer (Megatron pads the
  // vocabulary to a multiple of make_vocab_size_divisible_by * tp). 0: vocab_size. Rows past
  // vocab_size are zero when converting from HF and dropped when converting to HF.
  int64_t padded_vocab_size = 0;

  int64_t moecore_vocab_rows() const {
    return padded_vocab_size > 0 ? padded_vocab_size : vocab_size;
  }
  int64_t head_size() const { return head_dim > 0 ? head_dim : hidden_size / num_attention_heads; }
  // Throws naming the field when a value is missing, non-positive or inconsistent.
  void validate() const;
  // Reads config.json's fields (defaults as HF's for absent optional ones); `source` names the
  // file in errors.
  static MixtralConfig from_json(const nlohmann::json& json, const std::string& source);
  nlohmann::json to_json() const;  // a config.json HF's MixtralForCausalLM accepts
  // The equivalent moecore model: RMSNorm, rope, SwiGLU experts, no biases, no dropout, untied
  // unless tie_word_embeddings, every layer MoE, softmax top-k router.
  model::TransformerConfig transformer_config() const;
  // The same as moe-train flags ("--num-layers 32 --hidden-size 4096 ...").
  std::string megatron_flags() const;
};

// moecore's parameters of that model on one process (names, global shapes, groups), as
// GPTModel declares them.
std::vector<ParamSpec> moecore_param_specs(const MixtralConfig& config);
// HF's tensor names and shapes, in HF's order (layer by layer).
std::vector<std::pair<std::string, Shape>> hf_tensor_shapes(const MixtralConfig& config);

// Fills every parameter of `store` (allocated, holding moecore_param_specs' names with their
// global shapes) from HF tensors returned by `read_hf` (called once per HF name). Checks each HF
// tensor's shape, converts it to the store's dtype when they differ, and names the tensor in
// errors. Padded vocabulary rows are left as they are (zero in a freshly allocated store).
void hf_to_moecore(const MixtralConfig& config,
                   const std::function<Tensor(const std::string&)>& read_hf, ParameterStore& store);
// The HF tensors of the model held in `store` (global shapes, one process), in the store's dtype
// converted to `dtype`.
std::vector<safetensors::NamedTensor> moecore_to_hf(const MixtralConfig& config,
                                                    const ParameterStore& store, DType dtype);

// The same one tensor at a time, for safetensors::write_checkpoint's streaming form: the
// entries (HF order, `dtype`) and a source building each HF tensor from `store` on demand, so
// only one HF tensor is alive at a time. `store` must outlive the source.
std::vector<safetensors::TensorEntry> hf_tensor_entries(const MixtralConfig& config, DType dtype);
safetensors::TensorSource hf_tensor_source(const MixtralConfig& config, const ParameterStore& store,
                                           DType dtype);

}  // namespace moe::convert::hf_mixtral

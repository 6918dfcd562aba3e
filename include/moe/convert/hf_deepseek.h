// Hugging Face DeepSeek-V2 / V3 (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM) <-> moecore
// parameter mapping (moe-convert uses it; docs/convert.md). Same function shapes as hf_mixtral.h.
//
// HF stores linear weights [out, in], moecore [in, out], so every linear is transposed. Per layer
// N (HF prefix model.layers.N., moecore decoder.layers.N.), n heads, qk = qk_nope_head_dim,
// pe = qk_rope_head_dim, dv = v_head_dim, r_q / r_kv the LoRA ranks:
//   self_attn.q_a_proj [r_q, H]           -> self_attention.linear_q_down_proj.weight [H, r_q]
//   self_attn.q_a_layernorm [r_q]         -> self_attention.q_layernorm.weight
//   self_attn.q_b_proj [n (qk + pe), r_q] -> self_attention.linear_q_up_proj.weight [r_q, n, qk+pe]
//   self_attn.q_proj [n (qk + pe), H]     -> self_attention.linear_q_proj.weight (no q_lora_rank)
//   self_attn.kv_a_proj_with_mqa [r_kv + pe, H] -> self_attention.linear_kv_down_proj.weight
//   self_attn.kv_a_layernorm [r_kv]       -> self_attention.kv_layernorm.weight
//   self_attn.kv_b_proj [n (qk + dv), r_kv] -> self_attention.linear_kv_up_proj.weight
//   self_attn.o_proj [H, n dv]            -> self_attention.linear_proj.weight [n dv, H]
//   input_layernorm, post_attention_layernorm -> input_layernorm, pre_mlp_layernorm
//   dense layers (N < first_k_dense_replace): mlp.{gate,up}_proj [I, H] -> mlp.linear_fc1.weight
//       [H, 2, I] ([:, 0, :] gate, [:, 1, :] up); mlp.down_proj [H, I] -> mlp.linear_fc2.weight
//   MoE layers: mlp.gate.weight [E, H] -> mlp.router.weight [H, E];
//       mlp.gate.e_score_correction_bias [E] (V3) -> mlp.router.expert_bias (fp32 buffer);
//       mlp.experts.M.{gate,up,down}_proj -> mlp.experts.linear_fc1 [E, H, 2, F] / linear_fc2
//       [E, F, H]; mlp.shared_experts.{gate,up,down}_proj -> mlp.shared_experts.linear_fc1/fc2
//   model.embed_tokens, model.norm, lm_head as for Mixtral (vocabulary rows padded to Vp).
// Multi-token prediction module k (HF prefix model.layers.<num_hidden_layers + k>., moecore
// mtp.layers.k.): enorm, hnorm, eh_proj [H, 2H] -> eh_proj.weight [2H, H] (input [enorm(emb) |
// hnorm(h)] on both sides), the decoder layer's tensors -> transformer_layer.*,
// shared_head.norm -> final_layernorm; its embed_tokens and shared_head.head are HF's copies of
// the main embedding and lm_head, which moecore shares (import checks they are equal, export
// writes the copies).
// Rotary part: HF's DeepSeek rotates the pe part as adjacent pairs (2i, 2i + 1) (V3 with
// rope_interleave: the view(d/2, 2).transpose reordering before rotate_half; V2: complex pairs),
// which is exactly what moecore's MLA computes (mla.h, Megatron's mla_rotary_interleaved), so no
// row permutation is needed; V3 with rope_interleave false is refused.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moe/convert/safetensors.h"
#include "moe/model/config.h"
#include "moe/tensor/parameters.h"

namespace moe::convert::hf_deepseek {

// True when a config.json describes a DeepSeek-V2/V3 model (model_type or architectures).
bool is_deepseek_config(const nlohmann::json& json);

// The fields of HF's DeepseekV2Config / DeepseekV3Config that shape the weights or the forward.
struct DeepSeekConfig {
  int version = 3;  // 2: DeepseekV2 (softmax scores), 3: DeepseekV3 (sigmoid + correction bias)
  int64_t vocab_size = 129280;
  int64_t hidden_size = 7168;
  int64_t intermediate_size = 18432;  // the dense layers' MLP width
  int64_t moe_intermediate_size = 2048;
  int64_t num_hidden_layers = 61;
  int64_t num_attention_heads = 128;
  int64_t n_routed_experts = 256;
  int64_t n_shared_experts = 1;  // 0: none (V2's null)
  int64_t num_experts_per_tok = 8;
  int64_t first_k_dense_replace = 3;
  double routed_scaling_factor = 2.5;
  int64_t n_group = 8;                   // 0: no grouping (V2's null)
  int64_t topk_group = 4;                // 0: no grouping
  std::string topk_method = "noaux_tc";  // V3: noaux_tc; V2: greedy | group_limited_greedy
  bool norm_topk_prob = true;            // V3 only (HF's V2 never renormalises)
  int64_t q_lora_rank = 1536;            // 0: HF's null (q_proj, no query compression)
  int64_t kv_lora_rank = 512;
  int64_t qk_nope_head_dim = 128;
  int64_t qk_rope_head_dim = 64;
  int64_t v_head_dim = 128;
  int64_t max_position_embeddings = 4096;
  // Multi-token-prediction modules (moecore's mtp.layers.k.*, --mtp-num-layers); HF stores
  // module k as model.layers.<num_hidden_layers + k>.
  int64_t num_nextn_predict_layers = 0;
  double rope_theta = 10000;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  // YaRN rope_scaling (factor 0: none). moecore's MLA keeps original_max_position_embeddings 4096,
  // beta_fast 32 and beta_slow 1 (Megatron's MLA defaults), so other values are refused.
  double rope_scaling_factor = 0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  // Not HF's: moecore's padded vocabulary rows (0: vocab_size), as MixtralConfig's.
  int64_t padded_vocab_size = 0;

  int64_t moecore_vocab_rows() const {
    return padded_vocab_size > 0 ? padded_vocab_size : vocab_size;
  }
  // Megatron's --kv-channels: unused by multi-latent attention, but required (and rope-checked
  // as even) when hidden_size is not a multiple of the heads; then the query/key head size.
  int64_t kv_channels() const {
    return hidden_size % num_attention_heads == 0 ? 0 : qk_nope_head_dim + qk_rope_head_dim;
  }
  bool is_moe_layer(int64_t layer) const { return layer >= first_k_dense_replace; }
  // Routing restricted to groups (HF's n_group / topk_group with fewer chosen groups than all;
  // V2 only with topk_method group_limited_greedy).
  bool group_limited() const {
    return (version == 3 || topk_method == "group_limited_greedy") && n_group > 1 &&
           topk_group < n_group;
  }
  // Throws naming the field when a value is inconsistent or one moecore cannot express.
  void validate() const;
  // Reads config.json (HF's defaults for absent optional fields); `source` names the file.
  static DeepSeekConfig from_json(const nlohmann::json& json, const std::string& source);
  nlohmann::json to_json() const;  // a config.json HF's DeepseekV{2,3}ForCausalLM accepts
  // The equivalent moecore model (multi-latent attention with its norms, YaRN or plain rope,
  // SwiGLU, dense first layers, sigmoid + expert bias or softmax routing, shared experts).
  model::TransformerConfig transformer_config() const;
  // The same as moe-train flags; the --moe-layer-freq expression is single-quoted for a shell.
  std::string megatron_flags() const;
};

// moecore's parameters of that model on one process, exactly as GPTModel declares them.
std::vector<ParamSpec> moecore_param_specs(const DeepSeekConfig& config);
// HF's tensor names and shapes, in HF's order.
std::vector<std::pair<std::string, Shape>> hf_tensor_shapes(const DeepSeekConfig& config);

// As hf_mixtral's: fills `store` (allocated with moecore_param_specs) from `read_hf`, converting
// each HF tensor to its destination's dtype (the fp32 expert bias keeps fp32).
void hf_to_moecore(const DeepSeekConfig& config,
                   const std::function<Tensor(const std::string&)>& read_hf, ParameterStore& store);
// HF tensors of the model in `store`, converted to `dtype` except e_score_correction_bias, which
// stays fp32 as in DeepSeek's releases (and so round-trips bitwise).
std::vector<safetensors::NamedTensor> moecore_to_hf(const DeepSeekConfig& config,
                                                    const ParameterStore& store, DType dtype);
std::vector<safetensors::TensorEntry> hf_tensor_entries(const DeepSeekConfig& config, DType dtype);
safetensors::TensorSource hf_tensor_source(const DeepSeekConfig& config,
                                           const ParameterStore& store, DType dtype);

}  // namespace moe::convert::hf_deepseek

// The transformer's configuration, one field per Megatron argument under Megatron's name (the
// `--flag-name` with dashes as underscores) and Megatron's defaults, so `moe-train` can fill it
// straight from the command line.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "moe/moe/config.h"

namespace moe::model {

struct TransformerConfig {
  int num_layers = 2;
  int hidden_size = 64;
  int ffn_hidden_size = 0;  // 0: 4 * hidden_size (Megatron's default)
  int num_attention_heads = 4;
  int kv_channels = 0;  // 0: hidden_size / num_attention_heads
  bool group_query_attention = false;
  int num_query_groups = 1;         // used only with group_query_attention (Megatron's default 1)
  int64_t padded_vocab_size = 0;    // vocabulary rows (see padded_vocab_size() below)
  int seq_length = 0;               // tokens per sequence; every micro-batch uses this length
  int max_position_embeddings = 0;  // learned_absolute table rows; 0: seq_length

  std::string normalization = "LayerNorm";  // "LayerNorm" | "RMSNorm"
  float norm_epsilon = 1e-5f;
  std::string position_embedding_type = "learned_absolute";  // | "rope" | "yarn" | "none"
  float rotary_base = 10000.0f;
  // Multi-latent attention (DeepSeek-V2/V3, Megatron's MLATransformerConfig; see mla.h):
  // low-rank query (q_lora_rank; 0 is Megatron's None: no compression, linear_q_proj) and
  // key/value (kv_lora_rank) projections, per-head query/key size qk_head_dim plus a rotary part
  // of qk_pos_emb_head_dim, value size v_head_dim. Its rotary part follows rope_type (below), not
  // position_embedding_type; qk_layernorm gives it q_layernorm and kv_layernorm on the latents.
  bool multi_latent_attention = false;
  int q_lora_rank = 0;
  int kv_lora_rank = 32;
  int qk_head_dim = 128;
  int qk_pos_emb_head_dim = 64;
  int v_head_dim = 128;
  bool swiglu = false;          // SwiGLU MLP (fc1 is [gate | up]); GeLU otherwise
  bool add_bias_linear = true;  // false with --disable-bias-linear
  bool untie_embeddings_and_output_weights = false;
  float hidden_dropout = 0.1f;     // 0 disables
  float attention_dropout = 0.1f;  // 0 disables
  float init_method_std = 0.02f;
  // Output projections (attention linear_proj, MLP linear_fc2) use std / sqrt(2 * num_layers).
  bool apply_scaled_init = true;

  // Qwen / DeepSeek attention options. add_qkv_bias: linear_qkv has a bias even without
  // add_bias_linear (Qwen2). qk_layernorm: q_layernorm / k_layernorm over each head (Qwen3);
  // with multi_latent_attention, q_layernorm / kv_layernorm on the latents (DeepSeek).
  bool add_qkv_bias = false;
  bool qk_layernorm = false;
  // position_embedding_type "yarn": rope with YaRN's frequencies and attention factor (see
  // YarnScaling in layers.h; Megatron's --rotary-scaling-factor, --mscale, --mscale-all-dim and
  // --yarn-* arguments, with its defaults). rope_type ("" when unset): Megatron's --rope-type,
  // which only multi-latent attention reads; common attention accepts only "rope". Multi-latent
  // attention: "rope" is plain rope, "yarn" or unset (Megatron's MLA default) YaRN from
  // rotary_scaling_factor, mscale and mscale_all_dim only (Megatron's MLA keeps its own
  // defaults for the yarn_* fields, which equal those below).
  std::string rope_type;
  double rotary_scaling_factor = 1.0;
  int yarn_original_max_position_embeddings = 4096;
  double yarn_beta_fast = 32.0;
  double yarn_beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  bool yarn_correction_range_round_to_int = true;

  // MoE: num_experts = 0 builds a dense model. moe_layer_freq as Megatron: N makes layer i an
  // MoE layer when i % N == 0; a non-empty moe_layer_pattern (Megatron's "([1]*3+[0])" form
  // written out, one 0/1 per layer) overrides it.
  int num_experts = 0;
  int moe_layer_freq = 1;
  std::vector<int> moe_layer_pattern;
  // Router, dispatcher and capacity settings of the MoE layers. Its hidden_size, num_experts,
  // ffn_hidden_size, activation and add_bias_linear are overwritten from the fields above
  // (moe.moe_ffn_hidden_size still sets the experts' own width).
  MoEConfig moe;
  // Shared experts of every MoE layer (shared_experts.h): the width of their dense MLP (Megatron's
  // num_shared_experts * ffn size of each; 0: none), and the Qwen2-MoE sigmoid gate.
  int moe_shared_expert_intermediate_size = 0;
  bool moe_shared_expert_gate = false;

  // DeepSeek-V3 multi-token prediction (Megatron's mtp_num_layers; 0: off): that many MTP
  // modules after the decoder, each predicting one token further ahead. The objective adds
  // mtp_loss_scaling_factor / mtp_num_layers times each module's loss to the lm loss.
  int mtp_num_layers = 0;
  double mtp_loss_scaling_factor = 0.1;

  bool sequence_parallel = false;
  // "" (off) | "full": every layer keeps only its input and recomputes in backward |
  // "selective": the modules of recompute_modules recompute in backward (Megatron's names:
  // core_attn, moe_act, layernorm, mlp, moe, shared_experts; Megatron's default core_attn).
  std::string recompute_granularity;
  std::vector<std::string> recompute_modules = {"core_attn"};

  // Throws moe::Error naming the fields when the values cannot build a model with tensor
  // parallel size `tp` and expert parallel size `ep`.
  void validate(int tp, int ep = 1) const;

  int ffn_size() const { return ffn_hidden_size > 0 ? ffn_hidden_size : 4 * hidden_size; }
  int head_dim() const { return kv_channels > 0 ? kv_channels : hidden_size / num_attention_heads; }
  int query_groups() const {
    return group_query_attention ? num_query_groups : num_attention_heads;
  }
  bool is_moe_layer(int layer) const;
  // Whether `module` (a recompute_modules name) recomputes: selective granularity and listed.
  bool recomputes(std::string_view module) const;
  // `moe` with the fields shared with this config filled in.
  MoEConfig moe_config() const;
};

// Megatron's vocabulary padding: the smallest multiple of divisible_by * tp >= vocab_size.
int64_t padded_vocab_size(int64_t vocab_size, int64_t make_vocab_size_divisible_by, int tp);

}  // namespace moe::model

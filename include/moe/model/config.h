// The transformer's configuration, one field per Megatron argument under Megatron's name (the
// `--flag-name` with dashes as underscores) and Megatron's defaults, so `moe-train` can fill it
// straight from the command line.
#pragma once

#include <cstdint>
#include <string>
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
  std::string position_embedding_type = "learned_absolute";  // | "rope" | "none"
  float rotary_base = 10000.0f;
  // Multi-latent attention (DeepSeek-V2/V3, Megatron's MLATransformerConfig; see mla.h):
  // low-rank query (q_lora_rank; 0 is Megatron's None: no compression, linear_q_proj) and
  // key/value (kv_lora_rank) projections, per-head query/key size qk_head_dim plus a rotary part
  // of qk_pos_emb_head_dim, value size v_head_dim. Its rotary part is always rotated (with
  // rotary_base), whatever position_embedding_type says. qk_layernorm adds q_layernorm and
  // kv_layernorm on the latents, as Megatron's --qk-layernorm does for MLA.
  bool multi_latent_attention = false;
  int q_lora_rank = 0;
  int kv_lora_rank = 32;
  int qk_head_dim = 128;
  int qk_pos_emb_head_dim = 64;
  int v_head_dim = 128;
  bool qk_layernorm = false;
  bool swiglu = false;          // SwiGLU MLP (fc1 is [gate | up]); GeLU otherwise
  bool add_bias_linear = true;  // false with --disable-bias-linear
  bool untie_embeddings_and_output_weights = false;
  float hidden_dropout = 0.1f;     // 0 disables
  float attention_dropout = 0.1f;  // 0 disables
  float init_method_std = 0.02f;
  // Output projections (attention linear_proj, MLP linear_fc2) use std / sqrt(2 * num_layers).
  bool apply_scaled_init = true;

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

  bool sequence_parallel = false;
  std::string recompute_granularity;  // "" (off) | "full": every layer recomputes in backward

  // Throws moe::Error naming the fields when the values cannot build a model with tensor
  // parallel size `tp` and expert parallel size `ep`.
  void validate(int tp, int ep = 1) const;

  int ffn_size() const { return ffn_hidden_size > 0 ? ffn_hidden_size : 4 * hidden_size; }
  int head_dim() const { return kv_channels > 0 ? kv_channels : hidden_size / num_attention_heads; }
  int query_groups() const {
    return group_query_attention ? num_query_groups : num_attention_heads;
  }
  bool is_moe_layer(int layer) const;
  // `moe` with the fields shared with this config filled in.
  MoEConfig moe_config() const;
};

// Megatron's vocabulary padding: the smallest multiple of divisible_by * tp >= vocab_size.
int64_t padded_vocab_size(int64_t vocab_size, int64_t make_vocab_size_divisible_by, int tp);

}  // namespace moe::model

#include "moe/model/config.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <string_view>
#include <utility>

#include "moe/tensor/error.h"

namespace moe::model {

namespace {

// The YaRN fields' ranges, checked whatever the position embedding type is (bad values are
// refused even where they would be ignored).
void validate_yarn(const TransformerConfig& c) {
  // The finiteness checks come first: NaN passes or fails the range checks by accident.
  const std::pair<const char*, double> reals[] = {
      {"rotary_scaling_factor", c.rotary_scaling_factor},
      {"yarn_beta_fast", c.yarn_beta_fast},
      {"yarn_beta_slow", c.yarn_beta_slow},
      {"mscale", c.mscale},
      {"mscale_all_dim", c.mscale_all_dim}};
  for (const auto& [field, value] : reals) {
    MOE_CHECK(std::isfinite(value), field, " (", value, ") must be a finite number");
  }
  MOE_CHECK(c.rotary_scaling_factor > 0, "rotary_scaling_factor (", c.rotary_scaling_factor,
            ") must be > 0");
  MOE_CHECK(c.yarn_original_max_position_embeddings >= 1, "yarn_original_max_position_embeddings (",
            c.yarn_original_max_position_embeddings, ") must be >= 1");
  // The correction range is ln(L / (2 pi beta)): each beta must be positive.
  MOE_CHECK(c.yarn_beta_fast > 0 && c.yarn_beta_slow > 0, "yarn_beta_fast (", c.yarn_beta_fast,
            ") and yarn_beta_slow (", c.yarn_beta_slow, ") must be > 0");
}

// Megatron's recompute checks (transformer_config.py), with the modules moecore implements.
void validate_recompute(const TransformerConfig& c) {
  const std::string& granularity = c.recompute_granularity;
  MOE_CHECK(granularity.empty() || granularity == "full" || granularity == "selective",
            "recompute_granularity '", granularity, "' must be 'full' or 'selective' (or unset)");
  if (granularity != "selective") return;
  const std::set<std::string_view> implemented = {"core_attn", "moe_act", "layernorm",
                                                  "mlp",       "moe",     "shared_experts"};
  const std::set<std::string_view> megatron_only = {"mla_up_proj", "gdn_norm_out", "gdp_in_proj",
                                                    "gdp_qkv", "mhc"};
  for (const std::string& module : c.recompute_modules) {
    MOE_CHECK(!megatron_only.count(module), "recompute_modules '", module,
              "' is not supported by moecore (it recomputes core_attn, moe_act, layernorm, mlp, "
              "moe, shared_experts)");
    MOE_CHECK(implemented.count(module), "invalid choice for recompute_modules: '", module,
              "' (allowed: core_attn, moe_act, layernorm, mlp, moe, shared_experts)");
  }
  MOE_CHECK(!c.recomputes("moe_act") || c.moe.moe_grouped_gemm,
            "moe_act in recompute_modules is only supported with moe_grouped_gemm");
}

}  // namespace

void TransformerConfig::validate(int tp, int ep) const {
  MOE_CHECK(tp >= 1, "tensor_model_parallel_size (", tp, ") must be >= 1");
  MOE_CHECK(num_layers >= 1, "num_layers (", num_layers, ") must be >= 1");
  MOE_CHECK(hidden_size >= 1, "hidden_size (", hidden_size, ") must be >= 1");
  MOE_CHECK(num_attention_heads >= 1, "num_attention_heads (", num_attention_heads,
            ") must be >= 1");
  MOE_CHECK(kv_channels > 0 || hidden_size % num_attention_heads == 0, "hidden_size (", hidden_size,
            ") must be divisible by num_attention_heads (", num_attention_heads,
            ") when kv_channels is not set");
  MOE_CHECK(ffn_size() >= 1, "ffn_hidden_size (", ffn_hidden_size, ") must be >= 1");
  MOE_CHECK(num_attention_heads % tp == 0, "num_attention_heads (", num_attention_heads,
            ") must be divisible by tensor_model_parallel_size (", tp, ")");
  if (group_query_attention) {
    MOE_CHECK(num_query_groups >= 1 && num_attention_heads % num_query_groups == 0,
              "num_attention_heads (", num_attention_heads,
              ") must be divisible by num_query_groups (", num_query_groups, ")");
    MOE_CHECK(num_query_groups % tp == 0, "num_query_groups (", num_query_groups,
              ") must be divisible by tensor_model_parallel_size (", tp, ")");
  }
  MOE_CHECK(ffn_size() % tp == 0, "ffn_hidden_size (", ffn_size(),
            ") must be divisible by tensor_model_parallel_size (", tp, ")");
  MOE_CHECK(padded_vocab_size >= 1, "padded_vocab_size (", padded_vocab_size, ") must be >= 1");
  MOE_CHECK(padded_vocab_size % tp == 0, "padded_vocab_size (", padded_vocab_size,
            ") must be divisible by tensor_model_parallel_size (", tp, ")");
  MOE_CHECK(seq_length >= 1, "seq_length (", seq_length, ") must be >= 1");
  MOE_CHECK(!sequence_parallel || seq_length % tp == 0, "seq_length (", seq_length,
            ") must be divisible by tensor_model_parallel_size (", tp, ") with sequence_parallel");
  MOE_CHECK(normalization == "LayerNorm" || normalization == "RMSNorm", "normalization '",
            normalization, "' is not supported (LayerNorm or RMSNorm)");
  MOE_CHECK(norm_epsilon > 0, "norm_epsilon (", norm_epsilon, ") must be > 0");
  MOE_CHECK(position_embedding_type == "learned_absolute" || position_embedding_type == "rope" ||
                position_embedding_type == "yarn" || position_embedding_type == "none",
            "position_embedding_type '", position_embedding_type,
            "' is not supported (learned_absolute, rope, yarn or none)");
  MOE_CHECK(position_embedding_type != "learned_absolute" || max_position_embeddings == 0 ||
                max_position_embeddings >= seq_length,
            "max_position_embeddings (", max_position_embeddings, ") must be >= seq_length (",
            seq_length, ")");
  MOE_CHECK((position_embedding_type != "rope" && position_embedding_type != "yarn") ||
                head_dim() % 2 == 0,
            position_embedding_type, " needs an even head dimension (kv_channels = ", head_dim(),
            ")");
  MOE_CHECK(rotary_base > 0, "rotary_base (", rotary_base, ") must be > 0");
  if (multi_latent_attention) {
    MOE_CHECK(!group_query_attention,
              "multi_latent_attention and group_query_attention are mutually exclusive");
    MOE_CHECK(q_lora_rank >= 0, "q_lora_rank (", q_lora_rank, ") must be >= 1 (or unset)");
    MOE_CHECK(kv_lora_rank >= 1, "kv_lora_rank (", kv_lora_rank, ") must be >= 1");
    MOE_CHECK(qk_head_dim >= 1, "qk_head_dim (", qk_head_dim, ") must be >= 1");
    MOE_CHECK(qk_pos_emb_head_dim >= 2 && qk_pos_emb_head_dim % 2 == 0, "qk_pos_emb_head_dim (",
              qk_pos_emb_head_dim, ") must be even and >= 2 (rope rotates pairs)");
    MOE_CHECK(v_head_dim >= 1, "v_head_dim (", v_head_dim, ") must be >= 1");
    MOE_CHECK(rope_type.empty() || rope_type == "rope" || rope_type == "yarn", "rope_type '",
              rope_type, "' is not supported (rope or yarn)");
  } else {
    MOE_CHECK(rope_type.empty() || rope_type == "rope", "rope_type '", rope_type,
              "': common attention supports only rope_type 'rope' (Megatron); use "
              "position_embedding_type 'yarn' for YaRN");
  }
  validate_yarn(*this);
  MOE_CHECK(hidden_dropout >= 0 && hidden_dropout < 1, "hidden_dropout (", hidden_dropout,
            ") must be in [0, 1)");
  MOE_CHECK(attention_dropout >= 0 && attention_dropout < 1, "attention_dropout (",
            attention_dropout, ") must be in [0, 1)");
  MOE_CHECK(init_method_std > 0, "init_method_std (", init_method_std, ") must be > 0");
  validate_recompute(*this);
  MOE_CHECK(num_experts >= 0, "num_experts (", num_experts, ") must be >= 0");
  if (num_experts > 0) {
    MOE_CHECK(moe_layer_freq >= 1, "moe_layer_freq (", moe_layer_freq, ") must be >= 1");
    if (!moe_layer_pattern.empty()) {
      MOE_CHECK(int(moe_layer_pattern.size()) == num_layers, "moe_layer_freq pattern has ",
                moe_layer_pattern.size(), " entries but num_layers is ", num_layers);
      for (int flag : moe_layer_pattern) {
        MOE_CHECK(flag == 0 || flag == 1, "moe_layer_freq pattern entries must be 0 or 1, got ",
                  flag);
      }
    }
    moe_config().validate();
    const int shared = moe_shared_expert_intermediate_size;
    MOE_CHECK(shared >= 0, "moe_shared_expert_intermediate_size (", shared, ") must be >= 0");
    MOE_CHECK(shared % tp == 0, "moe_shared_expert_intermediate_size (", shared,
              ") must be divisible by tensor_model_parallel_size (", tp, ")");
    MOE_CHECK(shared == 0 || !add_bias_linear,
              "shared experts have no biases (as Megatron's): moe_shared_expert_intermediate_size "
              "needs add_bias_linear = false (--disable-bias-linear)");
  }
  MOE_CHECK(mtp_num_layers >= 0, "mtp_num_layers (", mtp_num_layers, ") must be >= 0");
  MOE_CHECK(std::isfinite(mtp_loss_scaling_factor) && mtp_loss_scaling_factor >= 0,
            "mtp_loss_scaling_factor (", mtp_loss_scaling_factor, ") must be a finite number >= 0");
  // Megatron's validate_args accepts MTP with rope and none position embeddings only.
  MOE_CHECK(mtp_num_layers == 0 || position_embedding_type != "learned_absolute",
            "multi-token prediction (mtp_num_layers = ", mtp_num_layers,
            ") needs position_embedding_type rope or none, not learned_absolute");
  MOE_CHECK(!(num_experts > 0 && ep > 1 && tp > 1 && !sequence_parallel),
            "MoE layers with expert parallelism (expert_model_parallel_size = ", ep,
            ") and tensor parallelism (tensor_model_parallel_size = ", tp,
            ") require sequence parallelism: add --sequence-parallel (as Megatron-Core does)");
}

bool TransformerConfig::recomputes(std::string_view module) const {
  return recompute_granularity == "selective" &&
         std::find(recompute_modules.begin(), recompute_modules.end(), module) !=
             recompute_modules.end();
}

bool TransformerConfig::is_moe_layer(int layer) const {
  if (num_experts == 0) return false;
  if (!moe_layer_pattern.empty()) return moe_layer_pattern.at(size_t(layer)) == 1;
  return layer % moe_layer_freq == 0;
}

MoEConfig TransformerConfig::moe_config() const {
  MoEConfig filled = moe;
  filled.hidden_size = hidden_size;
  filled.num_experts = num_experts;
  filled.ffn_hidden_size = ffn_size();
  filled.activation = swiglu ? ExpertActivation::kSwiGLU : ExpertActivation::kGeLU;
  filled.add_bias_linear = add_bias_linear;
  filled.recompute_moe_activation = recomputes("moe_act");
  return filled;
}

int64_t padded_vocab_size(int64_t vocab_size, int64_t make_vocab_size_divisible_by, int tp) {
  MOE_CHECK(vocab_size >= 1, "vocab size (", vocab_size, ") must be >= 1");
  MOE_CHECK(make_vocab_size_divisible_by >= 1 && tp >= 1, "make_vocab_size_divisible_by (",
            make_vocab_size_divisible_by, ") and tensor_model_parallel_size (", tp,
            ") must be >= 1");
  int64_t multiple = make_vocab_size_divisible_by * tp;
  return (vocab_size + multiple - 1) / multiple * multiple;
}

}  // namespace moe::model

// Multi-latent attention (DeepSeek-V2/V3; Megatron-Core's MLASelfAttention), with the same
// forward / backward / Context contract as SelfAttention (layers.h).
//
// Per token x [h], with n heads, qk = qk_head_dim, pe = qk_pos_emb_head_dim, dv = v_head_dim:
//   query:  q_lora_rank set:  q = linear_q_up_proj(q_layernorm(linear_q_down_proj(x)))
//           q_lora_rank 0:    q = linear_q_proj(x)                        -> n x [qk | pe]
//   key/value: [c_kv | k_pe] = linear_kv_down_proj(x)                     -> [kv_lora_rank | pe]
//           [k_nope | v] = linear_kv_up_proj(kv_layernorm(c_kv))          -> n x [qk | dv]
//   rotary: the pe part of each query head and the one shared k_pe are rotated (Megatron's
//           mla_rotary_interleaved rope: adjacent elements (2i, 2i + 1) form the pairs), with
//           rope_type's frequencies: "rope" plain, "yarn" or unset (Megatron's MLA default) YaRN
//           from rotary_scaling_factor, mscale, mscale_all_dim (YaRN's other settings at
//           Megatron's MLA defaults); every head's key is [k_nope | rotated k_pe].
//   core:   causal softmax(m^2 (q . k) / sqrt(qk + pe)) v -> n x [dv] -> linear_proj -> [h],
//           m = yarn_get_mscale(rotary_scaling_factor, mscale_all_dim) whatever rope_type (as
//           Megatron; 1 with the default factor 1).
// q_layernorm and kv_layernorm (the config's normalization, norm_epsilon) exist only with
// qk_layernorm, as in Megatron, and q_layernorm only with q_lora_rank: without a query latent
// there is nothing to normalise (DeepSeek-V2-Lite; Megatron's unfused spec refuses a query norm
// there). No projection has a bias except linear_proj (add_bias_linear), as in Megatron.
//
// Parameter names (prefix "...self_attention"): Megatron's state-dict names of its unfused
// (non-Transformer-Engine) modules, which name each norm on its own (the TE spec fuses them into
// linear_*_up_proj.layer_norm_weight instead):
//   linear_q_proj.weight        [h, n, qk + pe]     column-parallel over heads (q_lora_rank 0)
//   linear_q_down_proj.weight   [h, q_lora_rank]    replicated on every tp rank
//   q_layernorm.weight (.bias)  [q_lora_rank]       replicated
//   linear_q_up_proj.weight     [q_lora_rank, n, qk + pe]  column-parallel over heads
//   linear_kv_down_proj.weight  [h, kv_lora_rank + pe]     replicated
//   kv_layernorm.weight (.bias) [kv_lora_rank]      replicated
//   linear_kv_up_proj.weight    [kv_lora_rank, n, qk + dv] column-parallel over heads
//   linear_proj.weight (.bias)  [n * dv, h]         row-parallel
// (moecore stores linear weights [in, out], the transpose of Megatron's [out, in].)
//
// Tensor parallelism splits heads, as Megatron does with Transformer Engine: the down
// projections and norms are replicated and run on the rank's own rows (all of them, or its
// sequence block with sequence parallelism); their outputs (the normalised latents and k_pe)
// are gathered into the tp region before the up projections. Their gradients are therefore
// complete on every rank without sequence parallelism and partial (this rank's rows) with it,
// where the caller sums them over tp like the other sequence-parallel norms.
#pragma once

#include <optional>
#include <string>

#include "moe/model/layers.h"

namespace moe::model {

class MultiLatentAttention {
 public:
  struct Context {
    Tensor input;  // [rows_local, h]: backward all-gathers it again without q_lora_rank
    Norm::Context q_norm, kv_norm;  // this rank's rows (with qk_layernorm)
    Tensor q_latent;   // [rows_full, q_lora_rank]: linear_q_up_proj's input (with q_lora_rank)
    Tensor kv_latent;  // [rows_full, kv_lora_rank]: linear_kv_up_proj's input
    Tensor q, k;       // [b, n_local, s, qk + pe] after rope, compute dtype
    Tensor v;          // [b, n_local, s, dv], compute dtype
    // Undefined after forward with recompute "core_attn": backward recomputes both from q, k, v.
    Tensor logsumexp;  // [b, n_local, s] of the scaled scores, compute dtype
    Tensor context;    // [rows_full, n_local * dv] in the activation dtype
    BatchShape shape;
    uint64_t dropout_key = 0;
    float attention_dropout = 0;  // the probability forward used (0 when not training)
  };
  MultiLatentAttention(ParameterStore& store, const std::string& prefix,
                       const TransformerConfig& config, const TensorParallel& tp);

  // Absent modules are nullptr (linear_q_proj with q_lora_rank; the query down/up projections
  // and q_layernorm without it; the norms without qk_layernorm).
  const ColumnParallelLinear* linear_q_proj() const { return pointer(q_proj_); }
  const ColumnParallelLinear* linear_q_down_proj() const { return pointer(q_down_); }
  const ColumnParallelLinear* linear_q_up_proj() const { return pointer(q_up_); }
  const Norm* q_layernorm() const { return pointer(q_norm_); }
  const ColumnParallelLinear& linear_kv_down_proj() const { return kv_down_; }
  const Norm* kv_layernorm() const { return pointer(kv_norm_); }
  const ColumnParallelLinear& linear_kv_up_proj() const { return kv_up_; }
  const RowParallelLinear& linear_proj() const { return proj_; }

  // x [rows_local, h] -> [rows_local, h] (reduced over tp, bias added; no hidden dropout).
  // attention_dropout_key is used when the config's attention_dropout > 0 and training.
  Tensor forward(const ParameterStore& store, const Tensor& x, BatchShape shape,
                 uint64_t attention_dropout_key, bool training, Context& ctx) const;
  // Overwrites and returns grad_input [rows_local, h]; parameter gradients accumulate (+=).
  Tensor backward(const ParameterStore& store, const Context& ctx, const Tensor& grad_output) const;

 private:
  template <class T>
  static const T* pointer(const std::optional<T>& module) {
    return module ? &*module : nullptr;
  }
  // Core attention on ctx.q, k, v: the context rows [rows_full, n_local * dv] in `dtype`, and
  // the row log-sum-exps.
  Tensor core_attention(const Context& ctx, DType dtype, Tensor& logsumexp) const;

  TensorParallel tp_;
  int64_t heads_local_, kv_lora_rank_, qk_head_dim_, pos_dim_, v_head_dim_;
  float attention_dropout_;
  bool recompute_core_attention_;
  RotaryFrequencies rotary_;  // of the pe parts
  double score_factor_;       // m^2: multiplies the kernel's 1 / sqrt(qk + pe)
  std::optional<ColumnParallelLinear> q_proj_, q_down_, q_up_;
  std::optional<Norm> q_norm_, kv_norm_;
  ColumnParallelLinear kv_down_, kv_up_;
  RowParallelLinear proj_;
};

}  // namespace moe::model

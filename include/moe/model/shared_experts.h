// Shared experts (Megatron's SharedExpertMLP, DeepSeek/Qwen-MoE): a dense MLP of width
// moe_shared_expert_intermediate_size that every token of an MoE layer passes through; its
// output is added to the routed experts' output. It is tensor-parallel exactly as the dense MLP
// (column-parallel linear_fc1, row-parallel linear_fc2; with sequence parallelism it gathers and
// reduce-scatters rows like it) and sees the layer's rows as the dense MLP would, whatever the MoE
// layer does with its tokens.
//
// With moe_shared_expert_gate (Qwen2-MoE) the output of each token is scaled by
// sigmoid(x . gate_weight), where x is the layer input row this rank holds. gate_weight is stored
// [h, 1] ([in, out] as every linear weight here; Megatron's [1, h] transposed) and replicated over
// tp; with sequence parallelism its gradient covers only this rank's rows (the model sums it over
// tp in finalize_grads).
//
// Parameters: "<prefix>.linear_fc1.weight", "<prefix>.linear_fc2.weight" (no biases, as Megatron
// requires --disable-bias-linear for shared experts) and "<prefix>.gate_weight".
#pragma once

#include <string>

#include "moe/model/layers.h"

namespace moe::model {

class SharedExperts {
 public:
  struct Context {
    MLP::Context mlp;
    Tensor mlp_output;  // [rows_local, h] before the gate (gate only)
    Tensor gate;        // [rows_local] sigmoid scores, F32 (F64 for F64 activations; gate only)
  };
  // config.moe_shared_expert_intermediate_size sets the MLP width; the rest is config's.
  SharedExperts(ParameterStore& store, const std::string& prefix, const TransformerConfig& config,
                const TensorParallel& tp);
  const MLP& mlp() const { return mlp_; }
  ParamHandle gate_weight() const { return gate_weight_; }  // index -1 without the gate

  // x [rows_local, h] -> [rows_local, h].
  Tensor forward(const ParameterStore& store, const Tensor& x, Context& ctx) const;
  // grad_output [rows_local, h] -> grad_input [rows_local, h]; parameter gradients accumulate (+=).
  Tensor backward(const ParameterStore& store, const Context& ctx, const Tensor& grad_output) const;

 private:
  MLP mlp_;
  ParamHandle gate_weight_;
};

}  // namespace moe::model

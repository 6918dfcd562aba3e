// The local experts: one MLP per expert, fc1 (hidden -> fc1_output_size) then the activation
// (GeLU, or SwiGLU on [gate | up]) then fc2 (ffn -> hidden), with optional biases. The weights
// of all local experts are one tensor per kind, in the ParameterStore's kExpert group (F = ffn /
// placement.tp_size, this rank's slice of the ffn axis):
//   "<prefix>.linear_fc1.weight" [E_local, H, 2, F] (SwiGLU: [gate | up]) or [E_local, H, F]
//   "<prefix>.linear_fc1.bias"   [E_local, 2, F] or [E_local, F]            (add_bias_linear)
//   "<prefix>.linear_fc2.weight" [E_local, F, H]
//   "<prefix>.linear_fc2.bias"   [E_local, H]                              (add_bias_linear)
// each with global shape [num_experts, ..., ffn, ...] and offset placement.first on the expert
// axis and placement.tp_rank * F on the ffn axis (SwiGLU's gate and up halves are split alike,
// as the dense MLP's). With expert tensor parallelism (tp_size > 1) each rank's output is a
// partial sum over its ffn slice; the fc2 bias is added by tp_rank 0 only, and every rank's fc2
// bias gradient is the full one (the dispatcher gives each etp rank the same output gradient),
// so the replicas stay equal without communication.
//
// Two implementations with identical results: SequentialMLP (a GEMM per expert, Megatron's
// SequentialMLP) and GroupedMLP (one grouped GEMM over all local experts, --moe-grouped-gemm).
//
// Precision: activations and weights share the dtype (fp32, bf16, fp16 or fp64); products
// accumulate in fp32 (fp64) and are rounded once to the activation dtype (a bias is then added to
// the stored product in fp32 and rounded again, as a bias-add after a half-precision GEMM does);
// weight and bias gradients accumulate (+=) in the store's fp32 buffers.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "moe/moe/config.h"
#include "moe/moe/token_dispatcher.h"
#include "moe/tensor/gemm.h"
#include "moe/tensor/parameters.h"
#include "moe/tensor/tensor.h"

namespace moe {

// What backward needs from one forward.
struct ExpertsContext {
  std::vector<int64_t> tokens_per_expert;  // [E_local]
  Tensor input;                            // [R, H]
  Tensor fc1_output;                       // [R, 2F or F] (bias added), before the activation
  Tensor activation;  // [R, F]; undefined after forward with recompute_moe_activation
};

class Experts {
 public:
  Experts(const MoEConfig& config, ParameterStore& store, const std::string& prefix,
          const ExpertPlacement& placement);
  virtual ~Experts() = default;
  Experts(const Experts&) = delete;
  Experts& operator=(const Experts&) = delete;

  // rows [R, H] grouped by local expert (tokens_per_expert[e] rows each, summing to R) ->
  // expert outputs [R, H], same dtype as the parameters.
  Tensor forward(const Tensor& rows, std::span<const int64_t> tokens_per_expert,
                 ExpertsContext& ctx) const;
  // grad_output [R, H] -> d rows [R, H] (new tensor); weight and bias gradients accumulate.
  Tensor backward(ExpertsContext& ctx, const Tensor& grad_output) const;

  // Expert e (global index) draws its weights from a generator derived from (seed, e), so the
  // values do not depend on how experts are placed over ranks: fc1 ~ N(0, std), fc2 ~ N(0,
  // output_std) (Megatron's init_method / output_layer_init_method); biases zero.
  void init_parameters(uint64_t seed, float std, float output_std);

  Tensor fc1_weight() const;       // as declared above
  Tensor fc2_weight() const;       // [E_local, F, H]
  Tensor fc1_bias() const;         // as declared above, undefined without biases
  Tensor fc2_bias() const;         // [E_local, H]
  Tensor fc1_weight_grad() const;  // F32, accumulates
  Tensor fc2_weight_grad() const;
  Tensor fc1_bias_grad() const;
  Tensor fc2_bias_grad() const;
  const ExpertPlacement& placement() const { return placement_; }
  const MoEConfig& config() const { return config_; }

 protected:
  // c (+)= the grouped product of `form` (see gemm.h) over the local experts' row groups.
  virtual void expert_gemm(GemmForm form, const Tensor& a, const Tensor& b,
                           std::span<const int64_t> group_rows, Tensor& c,
                           bool accumulate) const = 0;

 private:
  int64_t ffn_local() const;  // F: this rank's slice of the expert ffn size
  int64_t fc1_local() const;  // fc1's local output width: 2F (SwiGLU) or F
  // The activation (SwiGLU or GeLU) of fc1's output [R, fc1_local] -> [R, F].
  Tensor activate(const Tensor& fc1_output) const;
  // Weight gradient dw (+)= a^T b per expert into an fp32 buffer, whatever the operand dtype.
  void accumulate_weight_grad(const Tensor& a, const Tensor& b, std::span<const int64_t> group_rows,
                              Tensor& grad) const;

  MoEConfig config_;
  ParameterStore& store_;
  ExpertPlacement placement_;
  ParamHandle fc1_weight_, fc1_bias_, fc2_weight_, fc2_bias_;
};

class SequentialMLP final : public Experts {
 public:
  using Experts::Experts;

 protected:
  void expert_gemm(GemmForm form, const Tensor& a, const Tensor& b,
                   std::span<const int64_t> group_rows, Tensor& c, bool accumulate) const override;
};

class GroupedMLP final : public Experts {
 public:
  using Experts::Experts;

 protected:
  void expert_gemm(GemmForm form, const Tensor& a, const Tensor& b,
                   std::span<const int64_t> group_rows, Tensor& c, bool accumulate) const override;
};

// GroupedMLP when config.moe_grouped_gemm, else SequentialMLP.
std::unique_ptr<Experts> make_experts(const MoEConfig& config, ParameterStore& store,
                                      const std::string& prefix, const ExpertPlacement& placement);

}  // namespace moe

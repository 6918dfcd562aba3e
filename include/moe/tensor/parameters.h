// Parameters and their gradients live in flat buffers, one pair per ParamGroup (dense parameters,
// expert parameters), so optimizers, data-parallel collectives and checkpoints each work on a few
// large contiguous buffers. Modules declare their parameters while they are built and read them
// through views once the store is allocated.
//
// Gradient buffers are fp32 and ACCUMULATE: every backward adds (+=) into them, so several
// micro-batches sum before the optimizer step; zero_grads() clears them. An fp64 store may ask
// for fp64 gradient buffers instead, for fp64 reference tests of modules whose backward
// accumulates through dtype-generic paths (the MoE router and experts); the optimizer, the
// gradient reductions and the dense model layers need fp32 ones.
//
// Persistent buffers (ParamSpec::trainable false, Megatron's register_buffer state such as the
// router's expert_bias) live in one more flat buffer, fp32 whatever the store's dtype, outside
// both groups' flat parameters and gradients: they have no gradient (grad() refuses them), so the
// optimizer, weight decay, gradient reductions and the gradient norm never see them, while
// checkpoints save, reshard and load them by name like the parameters of their group.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/tensor/tensor.h"

namespace moe {

enum class ParamGroup : uint8_t {
  kDense,   // replicated over data parallel; gradients reduced over the dp group
  kExpert,  // one shard per expert-parallel rank; gradients reduced over the expert-dp group
};
constexpr int kParamGroupCount = 2;

// How a parameter's local tensor relates to the full (global) tensor a checkpoint stores.
struct ParamSpec {
  std::string name;  // global, stable name ("decoder.layers.0.mlp.experts.fc1")
  Shape shape;       // local shape on this rank
  ParamGroup group = ParamGroup::kDense;
  bool weight_decay = true;  // false for norms and biases
  // Global shape and this rank's offset in it, per dim (defaults: the local shape, offset 0).
  Shape global_shape;
  Shape global_offset;
  // True for parameters that are replicated across tensor-parallel ranks (norm weights, router),
  // so the global gradient norm counts them once.
  bool tensor_parallel_duplicate = false;
  // True for a copy of a parameter that another pipeline stage owns under the same name
  // (Megatron's `shared` word embedding on the last stage, for a tied output layer or multi-token
  // prediction). The model keeps its gradient equal to the owner's, so the gradient norm counts
  // the owner's only and checkpoints store the owner's, which the copy loads by name.
  bool pipeline_copy = false;
  // false: a persistent buffer (see the top of this file); `group` then only says how it is
  // replicated, for checkpoints.
  bool trainable = true;
};

struct ParamHandle {
  int index = -1;
};

class ParameterStore {
 public:
  // grad_dtype: F32, or F64 with F64 parameters (see the top of this file).
  explicit ParameterStore(DType param_dtype = DType::F32, DType grad_dtype = DType::F32);
  ParameterStore(const ParameterStore&) = delete;
  ParameterStore& operator=(const ParameterStore&) = delete;

  // Declares a parameter; only before allocate(). Names must be unique.
  ParamHandle declare(ParamSpec spec);
  // Allocates the flat buffers (parameters zeroed, gradients zeroed). Call once.
  void allocate();
  bool allocated() const { return allocated_; }

  Tensor param(ParamHandle handle) const;  // view, local shape: param dtype (fp32 for buffers)
  Tensor grad(ParamHandle handle) const;   // view, grad dtype, local shape; trainable ones only
  const ParamSpec& spec(ParamHandle handle) const;
  // Element offset inside its group's flat buffers (inside the buffers' flat tensor for a
  // persistent buffer).
  int64_t offset(ParamHandle handle) const;
  int count() const { return int(specs_.size()); }
  ParamHandle find(const std::string& name) const;  // index -1 when absent

  // The flat buffers of a group: parameters [n] in param dtype, gradients [n] in grad dtype.
  Tensor flat_params(ParamGroup group) const;
  Tensor flat_grads(ParamGroup group) const;
  DType param_dtype() const { return param_dtype_; }
  DType grad_dtype() const { return grad_dtype_; }

  void zero_grads();

 private:
  DType param_dtype_;
  DType grad_dtype_;
  std::vector<ParamSpec> specs_;
  std::vector<int64_t> offsets_;
  int64_t group_sizes_[kParamGroupCount] = {0, 0};
  int64_t buffers_size_ = 0;
  Tensor params_[kParamGroupCount];
  Tensor grads_[kParamGroupCount];
  Tensor buffers_;  // F32: every persistent buffer
  bool allocated_ = false;
};

}  // namespace moe

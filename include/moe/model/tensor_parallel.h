// Tensor and sequence parallelism: where this rank sits, the four communication steps around a
// tensor-parallel region (Megatron's mappings.py), and column/row-parallel linear layers.
//
// Activations are 2-D [rows, hidden] with rows ordered (sequence, batch) as Megatron's [s, b, h],
// so splitting the sequence over tp ranks (sequence parallelism) splits rows into contiguous
// blocks: rank r holds rows [r * rows / tp, (r + 1) * rows / tp).
#pragma once

#include <string>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/tensor/parameters.h"
#include "moe/tensor/tensor.h"

namespace moe::model {

using comm::ContextParallel;
using comm::TensorParallel;

// Entering a tensor-parallel region (before a column-parallel product).
// forward: all-gather rows with sequence parallelism, else identity.
// backward: reduce-scatter rows with sequence parallelism, else all-reduce (sum over tp).
Tensor enter_tp_region(const Tensor& x, const TensorParallel& tp);
Tensor enter_tp_region_backward(const Tensor& dx_full, const TensorParallel& tp);
// Leaving it (after a row-parallel product, whose outputs are partial sums).
// forward: reduce-scatter rows with sequence parallelism, else all-reduce.
// backward: all-gather rows with sequence parallelism, else identity.
Tensor leave_tp_region(const Tensor& partial, const TensorParallel& tp);
Tensor leave_tp_region_backward(const Tensor& grad_output, const TensorParallel& tp);

// How a fused weight's output columns are laid out, so tensor parallelism splits the right axis.
// The global weight is [in, column_dims...]; tp splits column_dims[split_axis]. Examples:
// plain column-parallel [out] split on 0; SwiGLU fc1 [2, ffn] split on 1 (each rank keeps its
// gate and up columns together as [gate | up]); attention QKV [groups, heads_per_group + 2, d]
// split on 0 (each rank keeps whole query groups, Megatron's interleaved layout).
// split_axis kReplicated keeps the whole weight on every tp rank (Megatron's "duplicated"
// linears, e.g. MLA's down projections); its parameters are marked tensor_parallel_duplicate.
struct ColumnLayout {
  static constexpr int kReplicated = -1;
  std::vector<int64_t> column_dims;
  int split_axis = 0;
};

// y [rows, out_local] = x [rows, in] w [in, out_local] (+ b [out_local]). Weight stored [in, out]
// (global [in, column_dims...]). The input must already be inside the tp region.
class ColumnParallelLinear {
 public:
  ColumnParallelLinear(ParameterStore& store, const std::string& name, int64_t in,
                       const ColumnLayout& layout, bool bias, const TensorParallel& tp);
  int64_t in_features() const { return in_; }
  int64_t out_local() const { return out_local_; }
  ParamHandle weight() const { return weight_; }
  ParamHandle bias() const { return bias_; }  // index -1 without bias

  // y [rows, out_local] in x's dtype (or output_dtype when given, e.g. F32 logits).
  Tensor forward(const ParameterStore& store, const Tensor& x, DType output_dtype) const;
  Tensor forward(const ParameterStore& store, const Tensor& x) const {
    return forward(store, x, x.dtype());
  }
  // grad_input [rows, in] (overwritten, returned); weight and bias gradients accumulate (+=).
  Tensor backward(const ParameterStore& store, const Tensor& x, const Tensor& grad_output) const;

 private:
  int64_t in_, out_local_;
  ParamHandle weight_, bias_;
};

// y_partial [rows, out] = x [rows, in_local] w [in_local, out]: a partial sum that
// leave_tp_region completes. The bias is added by the caller after the reduction
// (add_row_bias), once, as Megatron does.
class RowParallelLinear {
 public:
  RowParallelLinear(ParameterStore& store, const std::string& name, int64_t in_global, int64_t out,
                    bool bias, const TensorParallel& tp);
  int64_t in_local() const { return in_local_; }
  int64_t out_features() const { return out_; }
  ParamHandle weight() const { return weight_; }
  ParamHandle bias() const { return bias_; }  // replicated over tp; index -1 without bias

  Tensor forward_partial(const ParameterStore& store, const Tensor& x) const;
  // y += bias on every row (no-op without bias).
  void add_bias(const ParameterStore& store, Tensor& y) const;
  // grad_input [rows, in_local]; weight gradient accumulates. grad_output is the full (reduced)
  // output gradient.
  Tensor backward(const ParameterStore& store, const Tensor& x, const Tensor& grad_output) const;
  // Bias gradient (+=) from the output gradient rows this rank holds.
  void backward_bias(const ParameterStore& store, const Tensor& grad_output) const;

 private:
  int64_t in_local_, out_;
  ParamHandle weight_, bias_;
};

// This rank's block of a full (global) tensor: local = global[offset : offset + local shape]
// for the ParamSpec's global_shape and global_offset (dtype converted to local's).
void copy_global_block(const Tensor& global, const ParamSpec& spec, Tensor& local);

// Gradient helpers shared by the layers. Parameter gradients are fp32 and accumulate.
// grad [in, out] += x^T grad_output, whatever x's dtype (fp64 products are rounded once to fp32).
void accumulate_weight_grad(const Tensor& x, const Tensor& grad_output, Tensor& grad);
// grad [cols] += column sums of grad_output [rows, cols], summed in double in row order.
void accumulate_bias_grad(const Tensor& grad_output, Tensor& grad);
// y [rows, cols] += bias [cols] on every row.
void add_row_bias(const Tensor& bias, Tensor& y);

}  // namespace moe::model

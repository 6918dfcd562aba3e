#include "moe/model/tensor_parallel.h"

#include <algorithm>
#include <vector>

#include "moe/comm/boxes.h"
#include "moe/tensor/gemm.h"
#include "moe/tensor/ops.h"
#include "tensor/dtype_switch.h"

namespace moe::model {

namespace {

Tensor all_gather_rows(const Tensor& local, const TensorParallel& tp) {
  Shape shape = local.shape();
  shape[0] *= tp.size();
  Tensor full = Tensor::empty(shape, local.dtype());
  comm::all_gather(local, full, tp.group);
  return full;
}

Tensor reduce_scatter_rows(const Tensor& full, const TensorParallel& tp) {
  Shape shape = full.shape();
  MOE_CHECK(shape[0] % tp.size() == 0, "sequence parallelism: ", shape[0],
            " rows do not split evenly over tensor-parallel size ", tp.size());
  shape[0] /= tp.size();
  Tensor local = Tensor::empty(shape, full.dtype());
  comm::reduce_scatter(full, local, tp.group);
  return local;
}

Tensor all_reduced(const Tensor& x, const TensorParallel& tp) {
  Tensor out = x.clone();
  comm::all_reduce(out, tp.group);
  return out;
}

// The local slice of a column layout on this rank.
std::vector<int64_t> local_columns(const ColumnLayout& layout, const TensorParallel& tp,
                                   const std::string& name) {
  if (layout.split_axis == ColumnLayout::kReplicated) return layout.column_dims;
  MOE_CHECK(layout.split_axis >= 0 && layout.split_axis < int(layout.column_dims.size()), name,
            ": split axis ", layout.split_axis, " is outside the column layout");
  std::vector<int64_t> dims = layout.column_dims;
  int64_t& split = dims[size_t(layout.split_axis)];
  MOE_CHECK(split % tp.size() == 0, name, ": ", split,
            " output columns do not split evenly over tensor-parallel size ", tp.size());
  split /= tp.size();
  return dims;
}

}  // namespace

Tensor enter_tp_region(const Tensor& x, const TensorParallel& tp) {
  if (tp.size() == 1 || !tp.sequence_parallel) return x;
  return all_gather_rows(x, tp);
}

Tensor enter_tp_region_backward(const Tensor& dx_full, const TensorParallel& tp) {
  if (tp.size() == 1) return dx_full;
  return tp.sequence_parallel ? reduce_scatter_rows(dx_full, tp) : all_reduced(dx_full, tp);
}

Tensor leave_tp_region(const Tensor& partial, const TensorParallel& tp) {
  if (tp.size() == 1) return partial;
  return tp.sequence_parallel ? reduce_scatter_rows(partial, tp) : all_reduced(partial, tp);
}

Tensor leave_tp_region_backward(const Tensor& grad_output, const TensorParallel& tp) {
  if (tp.size() == 1 || !tp.sequence_parallel) return grad_output;
  return all_gather_rows(grad_output, tp);
}

void copy_global_block(const Tensor& global, const ParamSpec& spec, Tensor& local) {
  check_shape(global, spec.global_shape, detail::concat("global tensor of '", spec.name, "'"));
  check_shape(local, spec.shape, detail::concat("local block of '", spec.name, "'"));
  int64_t copied =
      comm::copy_box_overlap(global, Shape(spec.shape.size(), 0), local, spec.global_offset);
  MOE_CHECK(copied == local.numel(), "local block of '", spec.name, "' at offset ",
            shape_string(spec.global_offset), " lies partly outside the global tensor ",
            shape_string(spec.global_shape));
}

void accumulate_weight_grad(const Tensor& x, const Tensor& grad_output, Tensor& grad) {
  if (x.dtype() != DType::F64) {
    linear_grad_weight(x, grad_output, grad, /*accumulate=*/true);
    return;
  }
  // fp64 products cannot write an fp32 buffer directly: form them in fp64, round once.
  Tensor product(grad.shape(), DType::F64);
  linear_grad_weight(x, grad_output, product, /*accumulate=*/false);
  axpy(1.0f, product.to(DType::F32), grad);
}

void accumulate_bias_grad(const Tensor& grad_output, Tensor& grad) {
  check_ndim(grad_output, 2, "bias gradient source");
  check_shape(grad, {grad_output.dim(1)}, "bias gradient");
  check_dtype(grad, DType::F32, "bias gradient");
  int64_t rows = grad_output.dim(0), cols = grad_output.dim(1);
  float* out = grad.data<float>();
  dispatch_floating(grad_output.dtype(), "accumulate_bias_grad", [&](auto tag) {
    using T = decltype(tag);
    const T* source = grad_output.data<T>();
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
    for (int64_t c = 0; c < cols; ++c) {
      double total = 0;
      for (int64_t r = 0; r < rows; ++r) total += double(load(source[r * cols + c]));
      out[c] += float(total);
    }
  });
}

void add_row_bias(const Tensor& bias, Tensor& y) {
  check_ndim(y, 2, "biased output");
  check_shape(bias, {y.dim(1)}, "bias");
  int64_t rows = y.dim(0), cols = y.dim(1);
  Tensor bias_values = bias.to(y.dtype() == DType::F64 ? DType::F64 : DType::F32);
  dispatch_floating(y.dtype(), "add_row_bias", [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    const C* b = bias_values.data<C>();
    T* out = y.data<T>();
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c)
        out[r * cols + c] = store<T>(load(out[r * cols + c]) + b[c]);
    }
  });
}

ColumnParallelLinear::ColumnParallelLinear(ParameterStore& store, const std::string& name,
                                           int64_t in, const ColumnLayout& layout, bool bias,
                                           const TensorParallel& tp)
    : in_(in) {
  std::vector<int64_t> local = local_columns(layout, tp, name);
  out_local_ = shape_numel(local);
  bool replicated = layout.split_axis == ColumnLayout::kReplicated;
  Shape columns_offset(layout.column_dims.size(), 0);
  if (!replicated) {
    columns_offset[size_t(layout.split_axis)] =
        int64_t(tp.rank()) * local[size_t(layout.split_axis)];
  }

  ParamSpec weight;
  weight.name = name + ".weight";
  weight.shape = Shape{in};
  weight.shape.insert(weight.shape.end(), local.begin(), local.end());
  weight.global_shape = Shape{in};
  weight.global_shape.insert(weight.global_shape.end(), layout.column_dims.begin(),
                             layout.column_dims.end());
  weight.global_offset = Shape{0};
  weight.global_offset.insert(weight.global_offset.end(), columns_offset.begin(),
                              columns_offset.end());
  weight.tensor_parallel_duplicate = replicated;
  weight_ = store.declare(weight);
  if (bias) {
    ParamSpec b;
    b.name = name + ".bias";
    b.shape = local;
    b.global_shape = layout.column_dims;
    b.global_offset = columns_offset;
    b.weight_decay = false;
    b.tensor_parallel_duplicate = replicated;
    bias_ = store.declare(b);
  }
}

Tensor ColumnParallelLinear::forward(const ParameterStore& store, const Tensor& x,
                                     DType output_dtype) const {
  check_shape(x, {x.dim(0), in_}, "column-parallel linear input");
  Tensor w = store.param(weight_).reshape({in_, out_local_});
  Tensor y = Tensor::empty({x.dim(0), out_local_}, output_dtype);
  linear_forward(x, w, y);
  if (bias_.index >= 0) add_row_bias(store.param(bias_).reshape({out_local_}), y);
  return y;
}

Tensor ColumnParallelLinear::backward(const ParameterStore& store, const Tensor& x,
                                      const Tensor& grad_output) const {
  check_shape(grad_output, {x.dim(0), out_local_}, "column-parallel linear output gradient");
  Tensor w = store.param(weight_).reshape({in_, out_local_});
  Tensor dw = store.grad(weight_).reshape({in_, out_local_});
  accumulate_weight_grad(x, grad_output, dw);
  if (bias_.index >= 0) {
    Tensor db = store.grad(bias_).reshape({out_local_});
    accumulate_bias_grad(grad_output, db);
  }
  Tensor grad_input = Tensor::empty({x.dim(0), in_}, x.dtype());
  linear_grad_input(grad_output, w, grad_input);
  return grad_input;
}

RowParallelLinear::RowParallelLinear(ParameterStore& store, const std::string& name,
                                     int64_t in_global, int64_t out, bool bias,
                                     const TensorParallel& tp)
    : out_(out) {
  MOE_CHECK(in_global % tp.size() == 0, name, ": ", in_global,
            " input features do not split evenly over tensor-parallel size ", tp.size());
  in_local_ = in_global / tp.size();
  ParamSpec weight;
  weight.name = name + ".weight";
  weight.shape = {in_local_, out};
  weight.global_shape = {in_global, out};
  weight.global_offset = {int64_t(tp.rank()) * in_local_, 0};
  weight_ = store.declare(weight);
  if (bias) {
    ParamSpec b;
    b.name = name + ".bias";
    b.shape = {out};
    b.weight_decay = false;
    b.tensor_parallel_duplicate = true;
    bias_ = store.declare(b);
  }
}

Tensor RowParallelLinear::forward_partial(const ParameterStore& store, const Tensor& x) const {
  check_shape(x, {x.dim(0), in_local_}, "row-parallel linear input");
  Tensor y = Tensor::empty({x.dim(0), out_}, x.dtype());
  linear_forward(x, store.param(weight_), y);
  return y;
}

void RowParallelLinear::add_bias(const ParameterStore& store, Tensor& y) const {
  if (bias_.index >= 0) add_row_bias(store.param(bias_), y);
}

Tensor RowParallelLinear::backward(const ParameterStore& store, const Tensor& x,
                                   const Tensor& grad_output) const {
  check_shape(grad_output, {x.dim(0), out_}, "row-parallel linear output gradient");
  Tensor dw = store.grad(weight_);
  accumulate_weight_grad(x, grad_output, dw);
  Tensor grad_input = Tensor::empty({x.dim(0), in_local_}, x.dtype());
  linear_grad_input(grad_output, store.param(weight_), grad_input);
  return grad_input;
}

void RowParallelLinear::backward_bias(const ParameterStore& store,
                                      const Tensor& grad_output) const {
  if (bias_.index < 0) return;
  Tensor db = store.grad(bias_);
  accumulate_bias_grad(grad_output, db);
}

}  // namespace moe::model

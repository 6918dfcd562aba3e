#include "moe/model/shared_experts.h"

#include <cmath>
#include <vector>

#include "moe/tensor/ops.h"

namespace moe::model {

namespace {

TransformerConfig shared_mlp_config(const TransformerConfig& config) {
  TransformerConfig shared = config;
  shared.ffn_hidden_size = config.moe_shared_expert_intermediate_size;
  return shared;
}

// The gate's arithmetic in the compute type C (float, or double for F64 activations), on plain
// pointers. Forward: gate[r] = sigmoid(x[r] . w), out[r] = y[r] * gate[r] (x, y, out [rows, h]).
template <class C>
void gate_forward(const C* x, const C* w, const C* y, int64_t rows, int64_t h, C* gate, C* out) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    C logit = 0;
    for (int64_t k = 0; k < h; ++k) logit += x[r * h + k] * w[k];
    gate[r] = C(1) / (C(1) + std::exp(-logit));
    for (int64_t k = 0; k < h; ++k) out[r * h + k] = y[r * h + k] * gate[r];
  }
}

// Backward from grad_output: dy_mlp = grad_output * gate; dlogit[r] = (grad_output[r] . y[r]) gate
// (1 - gate); dx_gate[r] = dlogit[r] * w; dw += sum over rows of dlogit[r] * x[r], in row order so
// the sum does not depend on the thread count.
template <class C>
void gate_backward(const C* x, const C* w, const C* y, const C* gate, const C* grad_output,
                   int64_t rows, int64_t h, C* dy_mlp, C* dx_gate, C* dw) {
  std::vector<C> dlogit(size_t(rows), C(0));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    C grad_gate = 0;
    for (int64_t k = 0; k < h; ++k) {
      grad_gate += grad_output[r * h + k] * y[r * h + k];
      dy_mlp[r * h + k] = grad_output[r * h + k] * gate[r];
    }
    dlogit[size_t(r)] = grad_gate * gate[r] * (C(1) - gate[r]);
    for (int64_t k = 0; k < h; ++k) dx_gate[r * h + k] = dlogit[size_t(r)] * w[k];
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < h; ++k) dw[k] += dlogit[size_t(r)] * x[r * h + k];
  }
}

// Runs body(C{}) with C = double for F64 activations, float otherwise.
template <class Body>
void with_compute_type(DType activations, Body&& body) {
  if (activations == DType::F64) {
    body(double{});
  } else {
    body(float{});
  }
}

DType compute_dtype(DType activations) {
  return activations == DType::F64 ? DType::F64 : DType::F32;
}

}  // namespace

SharedExperts::SharedExperts(ParameterStore& store, const std::string& prefix,
                             const TransformerConfig& config, const TensorParallel& tp)
    : mlp_(store, prefix, shared_mlp_config(config), tp) {
  if (!config.moe_shared_expert_gate) return;
  ParamSpec spec;
  spec.name = prefix + ".gate_weight";
  spec.shape = {config.hidden_size, 1};
  spec.tensor_parallel_duplicate = true;
  gate_weight_ = store.declare(spec);
}

Tensor SharedExperts::forward(const ParameterStore& store, const Tensor& x, Context& ctx) const {
  Tensor out = mlp_.forward(store, x, ctx.mlp);
  if (gate_weight_.index < 0) return out;
  ctx.mlp_output = out;
  const DType cdt = compute_dtype(x.dtype());
  const int64_t rows = x.dim(0), h = x.dim(1);
  Tensor xc = x.to(cdt), w = store.param(gate_weight_).to(cdt), y = out.to(cdt);
  Tensor gated = Tensor::empty({rows, h}, cdt);
  ctx.gate = Tensor::empty({rows}, cdt);
  with_compute_type(x.dtype(), [&]<class C>(C) {
    gate_forward(xc.data<C>(), w.data<C>(), y.data<C>(), rows, h, ctx.gate.data<C>(),
                 gated.data<C>());
  });
  return gated.to(x.dtype());
}

Tensor SharedExperts::backward(const ParameterStore& store, const Context& ctx,
                               const Tensor& grad_output) const {
  if (gate_weight_.index < 0) return mlp_.backward(store, ctx.mlp, grad_output);
  const DType cdt = compute_dtype(grad_output.dtype());
  const int64_t rows = grad_output.dim(0), h = grad_output.dim(1);
  Tensor x = ctx.mlp.input.to(cdt), w = store.param(gate_weight_).to(cdt);
  Tensor y = ctx.mlp_output.to(cdt), dyc = grad_output.to(cdt);
  Tensor dy_mlp = Tensor::empty({rows, h}, cdt), dx_gate = Tensor::empty({rows, h}, cdt);
  Tensor dw = Tensor::zeros({h, 1}, cdt);
  with_compute_type(grad_output.dtype(), [&]<class C>(C) {
    gate_backward(x.data<C>(), w.data<C>(), y.data<C>(), ctx.gate.data<C>(), dyc.data<C>(), rows, h,
                  dy_mlp.data<C>(), dx_gate.data<C>(), dw.data<C>());
  });
  Tensor grad_input = mlp_.backward(store, ctx.mlp, dy_mlp.to(grad_output.dtype())).to(cdt);
  add(grad_input, dx_gate, grad_input);
  Tensor grad = store.grad(gate_weight_);
  add(grad, dw.to(DType::F32), grad);
  return grad_input.to(grad_output.dtype());
}

}  // namespace moe::model

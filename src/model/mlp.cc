#include "moe/model/layers.h"
#include "moe/tensor/ops.h"

namespace moe::model {

namespace {
ColumnLayout fc1_layout(const TransformerConfig& config) {
  // SwiGLU keeps each rank's gate and up columns together: global [2, ffn] split on ffn.
  if (config.swiglu) return ColumnLayout{{2, config.ffn_size()}, 1};
  return ColumnLayout{{config.ffn_size()}, 0};
}
}  // namespace

MLP::MLP(ParameterStore& store, const std::string& prefix, const TransformerConfig& config,
         const TensorParallel& tp)
    : tp_(tp),
      swiglu_(config.swiglu),
      fc1_(store, prefix + ".linear_fc1", config.hidden_size, fc1_layout(config),
           config.add_bias_linear, tp),
      fc2_(store, prefix + ".linear_fc2", config.ffn_size(), config.hidden_size,
           config.add_bias_linear, tp) {}

Tensor MLP::forward(const ParameterStore& store, const Tensor& x, Context& ctx) const {
  ctx.input = x;  // this rank's rows: backward gathers them again (sequence parallelism)
  Tensor input = enter_tp_region(x, tp_);
  ctx.fc1_output = fc1_.forward(store, input);
  ctx.activation = Tensor::empty({input.dim(0), fc2_.in_local()}, x.dtype());
  if (swiglu_) {
    swiglu(ctx.fc1_output, ctx.activation);
  } else {
    gelu(ctx.fc1_output, ctx.activation);
  }
  Tensor out = leave_tp_region(fc2_.forward_partial(store, ctx.activation), tp_);
  fc2_.add_bias(store, out);
  return out;
}

Tensor MLP::backward(const ParameterStore& store, const Context& ctx,
                     const Tensor& grad_output) const {
  fc2_.backward_bias(store, grad_output);
  Tensor dactivation =
      fc2_.backward(store, ctx.activation, leave_tp_region_backward(grad_output, tp_));
  Tensor dfc1 = Tensor::empty(ctx.fc1_output.shape(), ctx.fc1_output.dtype());
  if (swiglu_) {
    swiglu_backward(ctx.fc1_output, dactivation, dfc1);
  } else {
    gelu_backward(ctx.fc1_output, dactivation, dfc1);
  }
  Tensor input = enter_tp_region(ctx.input, tp_);
  return enter_tp_region_backward(fc1_.backward(store, input, dfc1), tp_);
}

}  // namespace moe::model

#include <algorithm>
#include <cmath>
#include <vector>

#include "moe/model/layers.h"
#include "moe/tensor/ops.h"
#include "tensor/dtype_switch.h"

namespace moe::model {

namespace {

constexpr int64_t kRowBlock = 64;  // fixed reduction blocks: sums independent of thread count

struct NormRows {
  int64_t rows, width;
};

NormRows check_layernorm(const Tensor& x, const Tensor& weight, const Tensor& mean,
                         const Tensor& inv_std, const char* what) {
  check_ndim(x, 2, detail::concat(what, " input"));
  check_shape(weight, {x.dim(1)}, detail::concat(what, " weight"));
  check_shape(mean, {x.dim(0)}, detail::concat(what, " mean"));
  check_shape(inv_std, {x.dim(0)}, detail::concat(what, " inv_std"));
  check_dtype(mean, DType::F32, detail::concat(what, " mean"));
  check_dtype(inv_std, DType::F32, detail::concat(what, " inv_std"));
  return {x.dim(0), x.dim(1)};
}

// Gains in the compute type (fp64 gains stay exact for gradient checks).
template <class C>
std::vector<C> values_of(const Tensor& t) {
  Tensor converted = t.to(std::is_same_v<C, double> ? DType::F64 : DType::F32);
  const C* data = converted.data<C>();
  return std::vector<C>(data, data + t.numel());
}

}  // namespace

void layernorm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, Tensor& y,
               Tensor& mean, Tensor& inv_std) {
  NormRows n = check_layernorm(x, weight, mean, inv_std, "layernorm");
  check_same_shape(x, y, "layernorm output");
  check_dtype(y, x.dtype(), "layernorm output");
  check_shape(bias, {n.width}, "layernorm bias");
  dispatch_floating(x.dtype(), "layernorm", [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    std::vector<C> w = values_of<C>(weight), b = values_of<C>(bias);
    const T* in = x.data<T>();
    T* out = y.data<T>();
    float* mean_out = mean.data<float>();
    float* inv_out = inv_std.data<float>();
#pragma omp parallel for schedule(static) if (n.rows * n.width > 16384)
    for (int64_t r = 0; r < n.rows; ++r) {
      const T* row = in + r * n.width;
      C total = 0;
      for (int64_t j = 0; j < n.width; ++j) total += load(row[j]);
      C mu = total / C(n.width);
      C squares = 0;
      for (int64_t j = 0; j < n.width; ++j) squares += (load(row[j]) - mu) * (load(row[j]) - mu);
      C inv = C(1) / std::sqrt(squares / C(n.width) + C(eps));
      mean_out[r] = float(mu);
      inv_out[r] = float(inv);
      for (int64_t j = 0; j < n.width; ++j) {
        out[r * n.width + j] = store<T>((load(row[j]) - mu) * inv * w[size_t(j)] + b[size_t(j)]);
      }
    }
  });
}

void layernorm_backward(const Tensor& x, const Tensor& weight, const Tensor& mean,
                        const Tensor& inv_std, const Tensor& grad_output, Tensor& grad_input,
                        Tensor& grad_weight, Tensor& grad_bias) {
  NormRows n = check_layernorm(x, weight, mean, inv_std, "layernorm_backward");
  check_same_shape(x, grad_output, "layernorm_backward output gradient");
  check_same_shape(x, grad_input, "layernorm_backward input gradient");
  check_dtype(grad_output, x.dtype(), "layernorm_backward output gradient");
  check_dtype(grad_input, x.dtype(), "layernorm_backward input gradient");
  for (const Tensor* grad : {&grad_weight, &grad_bias}) {
    check_shape(*grad, {n.width}, "layernorm_backward parameter gradient");
    check_dtype(*grad, DType::F32, "layernorm_backward parameter gradient");
  }
  int64_t blocks = (n.rows + kRowBlock - 1) / kRowBlock;
  std::vector<double> partial_w(size_t(blocks * n.width), 0.0), partial_b(partial_w.size(), 0.0);
  dispatch_floating(x.dtype(), "layernorm_backward", [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    std::vector<C> w = values_of<C>(weight);
    const T* in = x.data<T>();
    const T* grad_out = grad_output.data<T>();
    T* grad_in = grad_input.data<T>();
    const float* mu = mean.data<float>();
    const float* inv = inv_std.data<float>();
#pragma omp parallel for schedule(static) if (n.rows * n.width > 16384)
    for (int64_t block = 0; block < blocks; ++block) {
      double* sum_w = partial_w.data() + block * n.width;
      double* sum_b = partial_b.data() + block * n.width;
      for (int64_t r = block * kRowBlock; r < std::min(n.rows, (block + 1) * kRowBlock); ++r) {
        const T* xr = in + r * n.width;
        const T* gr = grad_out + r * n.width;
        C s = inv[r], m = mu[r];
        C mean_g = 0, mean_g_xhat = 0;
        for (int64_t j = 0; j < n.width; ++j) {
          C g = load(gr[j]) * w[size_t(j)];
          mean_g += g;
          mean_g_xhat += g * (load(xr[j]) - m) * s;
        }
        mean_g /= C(n.width);
        mean_g_xhat /= C(n.width);
        for (int64_t j = 0; j < n.width; ++j) {
          C xhat = (load(xr[j]) - m) * s;
          C g = load(gr[j]) * w[size_t(j)];
          grad_in[r * n.width + j] = store<T>(s * (g - mean_g - xhat * mean_g_xhat));
          sum_w[j] += double(load(gr[j]) * xhat);
          sum_b[j] += double(load(gr[j]));
        }
      }
    }
  });
  float* dw = grad_weight.data<float>();
  float* db = grad_bias.data<float>();
  for (int64_t j = 0; j < n.width; ++j) {
    double total_w = 0, total_b = 0;
    for (int64_t block = 0; block < blocks; ++block) {
      total_w += partial_w[size_t(block * n.width + j)];
      total_b += partial_b[size_t(block * n.width + j)];
    }
    dw[j] += float(total_w);
    db[j] += float(total_b);
  }
}

namespace reference {

// Plain double loops straight from the definitions (mean, variance, the chain rule through
// both), independent of the blocked kernel above.
void layernorm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, Tensor& y,
               Tensor& mean, Tensor& inv_std) {
  NormRows n = check_layernorm(x, weight, mean, inv_std, "reference::layernorm");
  for (int64_t r = 0; r < n.rows; ++r) {
    double mu = 0, var = 0;
    for (int64_t j = 0; j < n.width; ++j) mu += x.get(r * n.width + j);
    mu /= double(n.width);
    for (int64_t j = 0; j < n.width; ++j) {
      double d = x.get(r * n.width + j) - mu;
      var += d * d;
    }
    double inv = 1.0 / std::sqrt(var / double(n.width) + double(eps));
    mean.set(r, float(mu));
    inv_std.set(r, float(inv));
    for (int64_t j = 0; j < n.width; ++j) {
      y.set(r * n.width + j,
            float((x.get(r * n.width + j) - mu) * inv * weight.get(j) + bias.get(j)));
    }
  }
}

void layernorm_backward(const Tensor& x, const Tensor& weight, const Tensor& mean,
                        const Tensor& inv_std, const Tensor& grad_output, Tensor& grad_input,
                        Tensor& grad_weight, Tensor& grad_bias) {
  NormRows n = check_layernorm(x, weight, mean, inv_std, "reference::layernorm_backward");
  // d(xhat_j)/d(x_i) = inv * (delta_ij - 1/W - xhat_i xhat_j / W), applied as a full sum.
  for (int64_t r = 0; r < n.rows; ++r) {
    double m = mean.get(r), s = inv_std.get(r);
    std::vector<double> xhat(size_t(n.width)), g(size_t(n.width));
    for (int64_t j = 0; j < n.width; ++j) {
      xhat[size_t(j)] = (x.get(r * n.width + j) - m) * s;
      g[size_t(j)] = grad_output.get(r * n.width + j) * weight.get(j);
      grad_weight.set(
          j, float(grad_weight.get(j) + grad_output.get(r * n.width + j) * xhat[size_t(j)]));
      grad_bias.set(j, float(grad_bias.get(j) + grad_output.get(r * n.width + j)));
    }
    for (int64_t i = 0; i < n.width; ++i) {
      double total = 0;
      for (int64_t j = 0; j < n.width; ++j) {
        double jacobian = (i == j ? 1.0 : 0.0) - 1.0 / double(n.width) -
                          xhat[size_t(i)] * xhat[size_t(j)] / double(n.width);
        total += g[size_t(j)] * s * jacobian;
      }
      grad_input.set(r * n.width + i, float(total));
    }
  }
}

}  // namespace reference

Norm::Norm(ParameterStore& store, const std::string& name, int64_t hidden, const std::string& kind,
           float eps)
    : rms_(kind == "RMSNorm"), eps_(eps) {
  MOE_CHECK(kind == "RMSNorm" || kind == "LayerNorm", "normalization '", kind,
            "' is not supported (LayerNorm or RMSNorm)");
  ParamSpec weight;
  weight.name = name + ".weight";
  weight.shape = {hidden};
  weight.weight_decay = false;
  weight.tensor_parallel_duplicate = true;
  weight_ = store.declare(weight);
  if (!rms_) {
    ParamSpec bias = weight;
    bias.name = name + ".bias";
    bias_ = store.declare(bias);
  }
}

Tensor Norm::forward(const ParameterStore& store, const Tensor& x, Context& ctx) const {
  check_ndim(x, 2, "norm input");
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  ctx.input = x;
  ctx.inv_std = Tensor::empty({x.dim(0)}, DType::F32);
  if (rms_) {
    rmsnorm(x, store.param(weight_), eps_, y, ctx.inv_std);
  } else {
    ctx.mean = Tensor::empty({x.dim(0)}, DType::F32);
    layernorm(x, store.param(weight_), store.param(bias_), eps_, y, ctx.mean, ctx.inv_std);
  }
  return y;
}

Tensor Norm::backward(const ParameterStore& store, const Context& ctx,
                      const Tensor& grad_output) const {
  Tensor grad_input = Tensor::empty(ctx.input.shape(), ctx.input.dtype());
  Tensor grad_weight = store.grad(weight_);
  if (rms_) {
    rmsnorm_backward(ctx.input, store.param(weight_), ctx.inv_std, grad_output, grad_input,
                     grad_weight);
  } else {
    Tensor grad_bias = store.grad(bias_);
    layernorm_backward(ctx.input, store.param(weight_), ctx.mean, ctx.inv_std, grad_output,
                       grad_input, grad_weight, grad_bias);
  }
  return grad_input;
}

}  // namespace moe::model

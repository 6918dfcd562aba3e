// Fast (OpenMP, vectorisable) kernels behind moe/tensor/ops.h. Row reductions that produce one
// result from many rows go through fixed-size row blocks summed in block order, so results do not
// depend on the thread count.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/tensor/ops.h"
#include "tensor/dtype_switch.h"

namespace moe {

namespace {

constexpr int64_t kReductionBlock = 64;

void check_same(const Tensor& a, const Tensor& b, const char* what) {
  check_same_shape(a, b, what);
  MOE_CHECK(a.dtype() == b.dtype(), what, ": dtypes differ, ", dtype_name(a.dtype()), " vs ",
            dtype_name(b.dtype()));
}

int64_t row_count(const Tensor& x) {
  return x.ndim() == 0 || x.dim(-1) == 0 ? 0 : x.numel() / x.dim(-1);
}

template <class Op>
void unary(const Tensor& x, Tensor& y, const char* what, Op op) {
  check_same(x, y, what);
  dispatch_floating(x.dtype(), what, [&](auto tag) {
    using T = decltype(tag);
    const T* in = x.data<T>();
    T* out = y.data<T>();
    int64_t count = x.numel();
#pragma omp parallel for schedule(static) if (count > 16384)
    for (int64_t i = 0; i < count; ++i) out[i] = store<T>(op(load(in[i])));
  });
}

template <class Op>
void unary_backward(const Tensor& x, const Tensor& grad_output, Tensor& grad_input,
                    const char* what, Op slope) {
  check_same(x, grad_output, what);
  check_same(x, grad_input, what);
  dispatch_floating(x.dtype(), what, [&](auto tag) {
    using T = decltype(tag);
    const T* in = x.data<T>();
    const T* grad_out = grad_output.data<T>();
    T* grad_in = grad_input.data<T>();
    int64_t count = x.numel();
#pragma omp parallel for schedule(static) if (count > 16384)
    for (int64_t i = 0; i < count; ++i) {
      grad_in[i] = store<T>(load(grad_out[i]) * slope(load(in[i])));
    }
  });
}

// e^v in fp32 as plain arithmetic (Cody-Waite reduction by ln 2, Cephes' degree-6 polynomial,
// the power of two added into the exponent bits), so that loops over it vectorise and every
// element, in a vector lane or in a loop's scalar remainder, gets the same instructions and bits.
// Within 2 ulp of exp for v in [-86, 88.72]; 0 below (e^v < 2^-124 vanishes beside the 1 of the
// sigmoid, its one use), +inf above, NaN stays NaN.
inline float exp_f32(float v) {
  constexpr float kLow = -86.0f, kHigh = 88.72283172607421875f;  // the largest with e^v finite
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;  // ln 2 = high + low
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float x = std::min(std::max(v, kLow), kHigh);
  const float shifted = std::fma(x, kLog2e, kRound);
  const float n = shifted - kRound;  // round(x / ln 2), in [-124, 128]
  float r = std::fma(n, -kLn2High, x);
  r = std::fma(n, -kLn2Low, r);  // x - n ln 2, in [-ln 2 / 2, ln 2 / 2]
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  const float e_r = std::fma(p, r * r, r) + 1.0f;
  const int32_t n_bits = std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kRound);
  const float scaled = std::bit_cast<float>(std::bit_cast<int32_t>(e_r) + n_bits * (1 << 23));
  return v <= kHigh ? (v < kLow ? 0.0f : scaled) : v + INFINITY;
}

template <class C>
C sigmoid(C v) {
  if constexpr (std::is_same_v<C, float>) {
    return 1.0f / (1.0f + exp_f32(-v));
  } else {
    return C(1) / (C(1) + std::exp(-v));
  }
}

}  // namespace

void silu(const Tensor& x, Tensor& y) {
  unary(x, y, "silu", [](auto v) { return v * sigmoid(v); });
}

void silu_backward(const Tensor& x, const Tensor& grad_output, Tensor& grad_input) {
  unary_backward(x, grad_output, grad_input, "silu_backward", [](auto v) {
    auto s = sigmoid(v);
    return s * (1 + v * (1 - s));
  });
}

void gelu(const Tensor& x, Tensor& y) {
  unary(x, y, "gelu", [](auto v) {
    using C = decltype(v);
    return C(0.5) * v * (C(1) + std::erf(v * C(M_SQRT1_2)));
  });
}

void gelu_backward(const Tensor& x, const Tensor& grad_output, Tensor& grad_input) {
  unary_backward(x, grad_output, grad_input, "gelu_backward", [](auto v) {
    using C = decltype(v);
    C cdf = C(0.5) * (C(1) + std::erf(v * C(M_SQRT1_2)));
    C pdf = std::exp(C(-0.5) * v * v) * C(0.3989422804014327);
    return cdf + v * pdf;
  });
}

namespace {
// x [R, 2F] holds [gate | up]; returns F.
int64_t check_gate_up(const Tensor& x, const char* what) {
  check_ndim(x, 2, detail::concat(what, " input"));
  MOE_CHECK(x.dim(1) % 2 == 0, what, " input: last dim must be even (gate | up), got shape ",
            shape_string(x.shape()));
  return x.dim(1) / 2;
}
}  // namespace

void swiglu(const Tensor& x, Tensor& y) {
  int64_t width = check_gate_up(x, "swiglu");
  int64_t rows = x.dim(0);
  check_shape(y, {rows, width}, "swiglu output");
  check_dtype(y, x.dtype(), "swiglu output");
  dispatch_floating(x.dtype(), "swiglu", [&](auto tag) {
    using T = decltype(tag);
    const T* in = x.data<T>();
    T* out = y.data<T>();
#pragma omp parallel for schedule(static) if (rows * width > 16384)
    for (int64_t r = 0; r < rows; ++r) {
      const T* gate = in + r * 2 * width;
      const T* up = gate + width;
      for (int64_t j = 0; j < width; ++j) {
        auto g = load(gate[j]);
        out[r * width + j] = store<T>(g * sigmoid(g) * load(up[j]));
      }
    }
  });
}

void swiglu_backward(const Tensor& x, const Tensor& grad_output, Tensor& grad_input) {
  int64_t width = check_gate_up(x, "swiglu_backward");
  int64_t rows = x.dim(0);
  check_shape(grad_output, {rows, width}, "swiglu_backward output gradient");
  check_same(x, grad_input, "swiglu_backward input gradient");
  check_dtype(grad_output, x.dtype(), "swiglu_backward output gradient");
  dispatch_floating(x.dtype(), "swiglu_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* in = x.data<T>();
    const T* grad_out = grad_output.data<T>();
    T* grad_in = grad_input.data<T>();
#pragma omp parallel for schedule(static) if (rows * width > 16384)
    for (int64_t r = 0; r < rows; ++r) {
      const T* gate = in + r * 2 * width;
      const T* up = gate + width;
      T* grad_gate = grad_in + r * 2 * width;
      T* grad_up = grad_gate + width;
      for (int64_t j = 0; j < width; ++j) {
        auto g = load(gate[j]);
        auto s = sigmoid(g);
        auto d = load(grad_out[r * width + j]);
        grad_gate[j] = store<T>(d * load(up[j]) * s * (1 + g * (1 - s)));
        grad_up[j] = store<T>(d * g * s);
      }
    }
  });
}

namespace {

// Row softmax (log_space = false) or log-softmax (true); output may be F32 or the input dtype.
void softmax_like(const Tensor& x, Tensor& y, bool log_space, const char* what) {
  check_same_shape(x, y, what);
  MOE_CHECK(y.dtype() == x.dtype() || y.dtype() == DType::F32, what, ": output dtype ",
            dtype_name(y.dtype()), " must be fp32 or the input dtype ", dtype_name(x.dtype()));
  int64_t rows = row_count(x), width = x.ndim() ? x.dim(-1) : 0;
  dispatch_floating(x.dtype(), what, [&](auto in_tag) {
    using In = decltype(in_tag);
    dispatch_floating(y.dtype(), what, [&](auto out_tag) {
      using Out = decltype(out_tag);
      using C = std::conditional_t<std::is_same_v<In, double>, double, float>;
      const In* in = x.data<In>();
      Out* out = y.data<Out>();
#pragma omp parallel for schedule(static) if (rows * width > 16384)
      for (int64_t r = 0; r < rows; ++r) {
        const In* row = in + r * width;
        C peak = -INFINITY;
        for (int64_t j = 0; j < width; ++j) peak = std::max<C>(peak, C(load(row[j])));
        C total = 0;
        for (int64_t j = 0; j < width; ++j) total += std::exp(C(load(row[j])) - peak);
        C log_total = std::log(total);
        for (int64_t j = 0; j < width; ++j) {
          C shifted = C(load(row[j])) - peak;
          C value = log_space ? shifted - log_total : std::exp(shifted) / total;
          out[r * width + j] = store<Out>(compute_t<Out>(value));
        }
      }
    });
  });
}

// grad_input from y (softmax or log-softmax output) and grad_output, all of one dtype.
void softmax_like_backward(const Tensor& y, const Tensor& grad_output, Tensor& grad_input,
                           bool log_space, const char* what) {
  check_same(y, grad_output, what);
  check_same(y, grad_input, what);
  int64_t rows = row_count(y), width = y.ndim() ? y.dim(-1) : 0;
  dispatch_floating(y.dtype(), what, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    const T* out = y.data<T>();
    const T* grad_out = grad_output.data<T>();
    T* grad_in = grad_input.data<T>();
#pragma omp parallel for schedule(static) if (rows * width > 16384)
    for (int64_t r = 0; r < rows; ++r) {
      const T* yr = out + r * width;
      const T* dyr = grad_out + r * width;
      C dot = 0;
      for (int64_t j = 0; j < width; ++j)
        dot += log_space ? load(dyr[j]) : load(dyr[j]) * load(yr[j]);
      for (int64_t j = 0; j < width; ++j) {
        C value = log_space ? load(dyr[j]) - std::exp(load(yr[j])) * dot
                            : load(yr[j]) * (load(dyr[j]) - dot);
        grad_in[r * width + j] = store<T>(value);
      }
    }
  });
}

}  // namespace

void softmax_rows(const Tensor& x, Tensor& y) {
  softmax_like(x, y, false, "softmax_rows");
}
void log_softmax_rows(const Tensor& x, Tensor& y) {
  softmax_like(x, y, true, "log_softmax_rows");
}
void softmax_rows_backward(const Tensor& y, const Tensor& grad_output, Tensor& grad_input) {
  softmax_like_backward(y, grad_output, grad_input, false, "softmax_rows_backward");
}
void log_softmax_rows_backward(const Tensor& y, const Tensor& grad_output, Tensor& grad_input) {
  softmax_like_backward(y, grad_output, grad_input, true, "log_softmax_rows_backward");
}

namespace {
void check_rmsnorm_args(const Tensor& x, const Tensor& weight, const Tensor& inv_rms,
                        const char* what) {
  MOE_CHECK(x.ndim() >= 1, what, ": input must have at least one dim");
  check_shape(weight, {x.dim(-1)}, detail::concat(what, " weight"));
  check_shape(inv_rms, {row_count(x)}, detail::concat(what, " inv_rms"));
  check_dtype(inv_rms, DType::F32, detail::concat(what, " inv_rms"));
}
}  // namespace

void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& y, Tensor& inv_rms) {
  check_same(x, y, "rmsnorm");
  check_rmsnorm_args(x, weight, inv_rms, "rmsnorm");
  int64_t rows = row_count(x), width = x.ndim() ? x.dim(-1) : 0;
  Tensor gain = weight.to(DType::F32);
  const float* w = gain.data<float>();
  float* inv = inv_rms.data<float>();
  dispatch_floating(x.dtype(), "rmsnorm", [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    const T* in = x.data<T>();
    T* out = y.data<T>();
#pragma omp parallel for schedule(static) if (rows * width > 16384)
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = in + r * width;
      C squares = 0;
      for (int64_t j = 0; j < width; ++j) squares += load(row[j]) * load(row[j]);
      C scale_r = C(1) / std::sqrt(squares / C(width) + C(eps));
      inv[r] = float(scale_r);
      for (int64_t j = 0; j < width; ++j)
        out[r * width + j] = store<T>(load(row[j]) * scale_r * w[j]);
    }
  });
}

void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& inv_rms,
                      const Tensor& grad_output, Tensor& grad_input, Tensor& grad_weight) {
  check_same(x, grad_output, "rmsnorm_backward output gradient");
  check_same(x, grad_input, "rmsnorm_backward input gradient");
  check_rmsnorm_args(x, weight, inv_rms, "rmsnorm_backward");
  check_shape(grad_weight, weight.shape(), "rmsnorm_backward weight gradient");
  check_dtype(grad_weight, DType::F32, "rmsnorm_backward weight gradient");
  int64_t rows = row_count(x), width = x.ndim() ? x.dim(-1) : 0;
  Tensor gain = weight.to(DType::F32);
  const float* w = gain.data<float>();
  const float* inv = inv_rms.data<float>();
  int64_t blocks = (rows + kReductionBlock - 1) / kReductionBlock;
  std::vector<double> partial(size_t(blocks * width), 0.0);
  dispatch_floating(x.dtype(), "rmsnorm_backward", [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    const T* in = x.data<T>();
    const T* grad_out = grad_output.data<T>();
    T* grad_in = grad_input.data<T>();
#pragma omp parallel for schedule(static) if (rows * width > 16384)
    for (int64_t block = 0; block < blocks; ++block) {
      double* block_sum = partial.data() + block * width;
      int64_t end = std::min(rows, (block + 1) * kReductionBlock);
      for (int64_t r = block * kReductionBlock; r < end; ++r) {
        const T* xr = in + r * width;
        const T* dyr = grad_out + r * width;
        C s = inv[r];
        C mean_g_xhat = 0;
        for (int64_t j = 0; j < width; ++j) mean_g_xhat += load(dyr[j]) * w[j] * load(xr[j]) * s;
        mean_g_xhat /= C(width);
        for (int64_t j = 0; j < width; ++j) {
          C xhat = load(xr[j]) * s;
          grad_in[r * width + j] = store<T>(s * (load(dyr[j]) * w[j] - xhat * mean_g_xhat));
          block_sum[j] += double(load(dyr[j]) * xhat);
        }
      }
    }
  });
  float* dw = grad_weight.data<float>();
  for (int64_t j = 0; j < width; ++j) {
    double total = 0;
    for (int64_t block = 0; block < blocks; ++block) total += partial[block * width + j];
    dw[j] += float(total);
  }
}

void add(const Tensor& a, const Tensor& b, Tensor& out) {
  check_same(a, b, "add");
  check_same(a, out, "add output");
  dispatch_floating(a.dtype(), "add", [&](auto tag) {
    using T = decltype(tag);
    const T* pa = a.data<T>();
    const T* pb = b.data<T>();
    T* po = out.data<T>();
    int64_t count = a.numel();
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; ++i) po[i] = store<T>(load(pa[i]) + load(pb[i]));
  });
}

void scale(Tensor& x, float alpha) {
  dispatch_floating(x.dtype(), "scale", [&](auto tag) {
    using T = decltype(tag);
    T* p = x.data<T>();
    int64_t count = x.numel();
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; ++i) p[i] = store<T>(load(p[i]) * alpha);
  });
}

void axpy(float alpha, const Tensor& x, Tensor& y) {
  check_same(x, y, "axpy");
  dispatch_floating(x.dtype(), "axpy", [&](auto tag) {
    using T = decltype(tag);
    const T* px = x.data<T>();
    T* py = y.data<T>();
    int64_t count = x.numel();
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; ++i) py[i] = store<T>(load(py[i]) + alpha * load(px[i]));
  });
}

double sum(const Tensor& x) {
  constexpr int64_t kBlock = 4096;
  return dispatch_floating(x.dtype(), "sum", [&](auto tag) {
    using T = decltype(tag);
    const T* p = x.data<T>();
    int64_t count = x.numel();
    int64_t blocks = (count + kBlock - 1) / kBlock;
    std::vector<double> partial(size_t(blocks), 0.0);
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t block = 0; block < blocks; ++block) {
      double total = 0;
      int64_t end = std::min(count, (block + 1) * kBlock);
      for (int64_t i = block * kBlock; i < end; ++i) total += double(load(p[i]));
      partial[block] = total;
    }
    double total = 0;
    for (double value : partial) total += value;
    return total;
  });
}

}  // namespace moe

// Plain reference kernels: serial loops in double through element accessors. Slow on purpose,
// written independently of ops.cc so the tests compare two different implementations.
#include <cmath>

#include "moe/tensor/ops.h"

namespace moe::reference {

namespace {

double read(const Tensor& t, int64_t i) {
  return t.dtype() == DType::F64 ? t.data<double>()[i] : double(t.get(i));
}
void write(Tensor& t, int64_t i, double value) {
  if (t.dtype() == DType::F64) {
    t.data<double>()[i] = value;
  } else {
    t.set(i, float(value));
  }
}
int64_t width_of(const Tensor& t) {
  return t.ndim() ? t.dim(-1) : 0;
}
int64_t rows_of(const Tensor& t) {
  return width_of(t) ? t.numel() / width_of(t) : 0;
}
double sigmoid(double v) {
  return 1.0 / (1.0 + std::exp(-v));
}

}  // namespace

void silu(const Tensor& x, Tensor& y) {
  check_same_shape(x, y, "reference::silu");
  for (int64_t i = 0; i < x.numel(); ++i) write(y, i, read(x, i) * sigmoid(read(x, i)));
}

void silu_backward(const Tensor& x, const Tensor& grad_output, Tensor& grad_input) {
  check_same_shape(x, grad_input, "reference::silu_backward");
  for (int64_t i = 0; i < x.numel(); ++i) {
    double v = read(x, i), s = sigmoid(v);
    write(grad_input, i, read(grad_output, i) * (s + v * s * (1.0 - s)));
  }
}

void gelu(const Tensor& x, Tensor& y) {
  check_same_shape(x, y, "reference::gelu");
  for (int64_t i = 0; i < x.numel(); ++i) {
    double v = read(x, i);
    write(y, i, 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))));
  }
}

void gelu_backward(const Tensor& x, const Tensor& grad_output, Tensor& grad_input) {
  check_same_shape(x, grad_input, "reference::gelu_backward");
  for (int64_t i = 0; i < x.numel(); ++i) {
    double v = read(x, i);
    double derivative = 0.5 * (1.0 + std::erf(v / std::sqrt(2.0))) +
                        v * std::exp(-0.5 * v * v) / std::sqrt(2.0 * M_PI);
    write(grad_input, i, read(grad_output, i) * derivative);
  }
}

void swiglu(const Tensor& x, Tensor& y) {
  int64_t rows = x.dim(0), width = x.dim(1) / 2;
  check_shape(y, {rows, width}, "reference::swiglu output");
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j) {
      double gate = read(x, r * 2 * width + j), up = read(x, r * 2 * width + width + j);
      write(y, r * width + j, gate * sigmoid(gate) * up);
    }
}

void swiglu_backward(const Tensor& x, const Tensor& grad_output, Tensor& grad_input) {
  int64_t rows = x.dim(0), width = x.dim(1) / 2;
  check_same_shape(x, grad_input, "reference::swiglu_backward");
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j) {
      double gate = read(x, r * 2 * width + j), up = read(x, r * 2 * width + width + j);
      double s = sigmoid(gate), d = read(grad_output, r * width + j);
      write(grad_input, r * 2 * width + j, d * up * (s + gate * s * (1.0 - s)));
      write(grad_input, r * 2 * width + width + j, d * gate * s);
    }
}

void softmax_rows(const Tensor& x, Tensor& y) {
  check_same_shape(x, y, "reference::softmax_rows");
  int64_t width = width_of(x);
  for (int64_t r = 0; r < rows_of(x); ++r) {
    double total = 0;
    for (int64_t j = 0; j < width; ++j) total += std::exp(read(x, r * width + j));
    for (int64_t j = 0; j < width; ++j)
      write(y, r * width + j, std::exp(read(x, r * width + j)) / total);
  }
}

void log_softmax_rows(const Tensor& x, Tensor& y) {
  check_same_shape(x, y, "reference::log_softmax_rows");
  int64_t width = width_of(x);
  for (int64_t r = 0; r < rows_of(x); ++r) {
    double total = 0;
    for (int64_t j = 0; j < width; ++j) total += std::exp(read(x, r * width + j));
    for (int64_t j = 0; j < width; ++j)
      write(y, r * width + j, read(x, r * width + j) - std::log(total));
  }
}

void softmax_rows_backward(const Tensor& y, const Tensor& grad_output, Tensor& grad_input) {
  check_same_shape(y, grad_input, "reference::softmax_rows_backward");
  int64_t width = width_of(y);
  for (int64_t r = 0; r < rows_of(y); ++r)
    for (int64_t i = 0; i < width; ++i) {
      double total = 0;  // the full Jacobian: dx_i = sum_j dy_j * y_j * (delta_ij - y_i)
      for (int64_t j = 0; j < width; ++j) {
        double delta = i == j ? 1.0 : 0.0;
        total += read(grad_output, r * width + j) * read(y, r * width + j) *
                 (delta - read(y, r * width + i));
      }
      write(grad_input, r * width + i, total);
    }
}

void log_softmax_rows_backward(const Tensor& y, const Tensor& grad_output, Tensor& grad_input) {
  check_same_shape(y, grad_input, "reference::log_softmax_rows_backward");
  int64_t width = width_of(y);
  for (int64_t r = 0; r < rows_of(y); ++r)
    for (int64_t i = 0; i < width; ++i) {
      double total = 0;  // dx_i = sum_j dy_j * (delta_ij - p_i)
      for (int64_t j = 0; j < width; ++j) {
        double delta = i == j ? 1.0 : 0.0;
        total += read(grad_output, r * width + j) * (delta - std::exp(read(y, r * width + i)));
      }
      write(grad_input, r * width + i, total);
    }
}

void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& y, Tensor& inv_rms) {
  check_same_shape(x, y, "reference::rmsnorm");
  int64_t width = width_of(x);
  for (int64_t r = 0; r < rows_of(x); ++r) {
    double squares = 0;
    for (int64_t j = 0; j < width; ++j) squares += read(x, r * width + j) * read(x, r * width + j);
    double inv = 1.0 / std::sqrt(squares / double(width) + double(eps));
    inv_rms.set(r, float(inv));
    for (int64_t j = 0; j < width; ++j)
      write(y, r * width + j, read(x, r * width + j) * inv * read(weight, j));
  }
}

void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& inv_rms,
                      const Tensor& grad_output, Tensor& grad_input, Tensor& grad_weight) {
  check_same_shape(x, grad_input, "reference::rmsnorm_backward");
  int64_t width = width_of(x);
  for (int64_t r = 0; r < rows_of(x); ++r) {
    double inv = inv_rms.get(r);
    // y_j = x_j * inv * w_j with inv = (mean(x^2) + eps)^-1/2, so d inv / d x_i = -inv^3 x_i / H.
    double dot = 0;
    for (int64_t j = 0; j < width; ++j)
      dot += read(grad_output, r * width + j) * read(weight, j) * read(x, r * width + j);
    for (int64_t i = 0; i < width; ++i) {
      double xi = read(x, r * width + i);
      double grad = read(grad_output, r * width + i) * read(weight, i) * inv -
                    dot * inv * inv * inv * xi / double(width);
      write(grad_input, r * width + i, grad);
      grad_weight.set(i, float(read(grad_weight, i) + read(grad_output, r * width + i) * xi * inv));
    }
  }
}

void add(const Tensor& a, const Tensor& b, Tensor& out) {
  check_same_shape(a, b, "reference::add");
  for (int64_t i = 0; i < a.numel(); ++i) write(out, i, read(a, i) + read(b, i));
}

void scale(Tensor& x, float alpha) {
  for (int64_t i = 0; i < x.numel(); ++i) write(x, i, read(x, i) * alpha);
}

void axpy(float alpha, const Tensor& x, Tensor& y) {
  check_same_shape(x, y, "reference::axpy");
  for (int64_t i = 0; i < x.numel(); ++i) write(y, i, read(y, i) + double(alpha) * read(x, i));
}

double sum(const Tensor& x) {
  double total = 0;
  for (int64_t i = 0; i < x.numel(); ++i) total += read(x, i);
  return total;
}

}  // namespace moe::reference

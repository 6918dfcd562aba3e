// Elementwise and row kernels on tensors. Every function checks shapes and dtypes here, then runs
// a plain-pointer kernel (OpenMP over rows). The same functions exist in moe::reference: serial,
// double-precision loops that the tests compare against. Floating dtypes: F32, BF16, F16, F64;
// math is done in fp32 (fp64 for F64 tensors). Outputs are overwritten unless a name says
// "accumulate"; backward functions overwrite grad_input and accumulate (+=) parameter gradients.
#pragma once

#include "moe/tensor/tensor.h"

namespace moe {

#define MOE_DECLARE_OPS                                                                           \
  /* y = silu(x) = x * sigmoid(x); same shape and dtype. */                                       \
  void silu(const Tensor& x, Tensor& y);                                                          \
  void silu_backward(const Tensor& x, const Tensor& grad_output, Tensor& grad_input);             \
  /* y = gelu(x), the exact erf form (PyTorch's default, Megatron's F.gelu). */                   \
  void gelu(const Tensor& x, Tensor& y);                                                          \
  void gelu_backward(const Tensor& x, const Tensor& grad_output, Tensor& grad_input);             \
  /* x [R, 2F] holds [gate | up]; y [R, F] = silu(gate) * up. grad_input is [R, 2F]. */           \
  void swiglu(const Tensor& x, Tensor& y);                                                        \
  void swiglu_backward(const Tensor& x, const Tensor& grad_output, Tensor& grad_input);           \
  /* Softmax over the last dim; y may be F32 or x's dtype. */                                     \
  void softmax_rows(const Tensor& x, Tensor& y);                                                  \
  void softmax_rows_backward(const Tensor& y, const Tensor& grad_output, Tensor& grad_input);     \
  void log_softmax_rows(const Tensor& x, Tensor& y);                                              \
  void log_softmax_rows_backward(const Tensor& y, const Tensor& grad_output, Tensor& grad_input); \
  /* RMSNorm over the last dim H: y = x / rms(x) * weight; inv_rms [R] F32 is saved for */        \
  /* backward. weight [H] (any float dtype). grad_weight [H] F32 accumulates. */                  \
  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& y, Tensor& inv_rms);     \
  void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& inv_rms,             \
                        const Tensor& grad_output, Tensor& grad_input, Tensor& grad_weight);      \
  /* out = a + b (same shape; out may alias a or b). */                                           \
  void add(const Tensor& a, const Tensor& b, Tensor& out);                                        \
  /* x *= alpha */                                                                                \
  void scale(Tensor& x, float alpha);                                                             \
  /* y += alpha * x */                                                                            \
  void axpy(float alpha, const Tensor& x, Tensor& y);                                             \
  /* Sum of all elements in double, in a fixed order (deterministic across thread counts). */     \
  double sum(const Tensor& x);

MOE_DECLARE_OPS

namespace reference {
MOE_DECLARE_OPS
}  // namespace reference

#undef MOE_DECLARE_OPS

}  // namespace moe

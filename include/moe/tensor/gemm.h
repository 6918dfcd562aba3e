// Dense and grouped matrix products. Row-major everywhere. A linear layer stores its weight as
// [K = in, N = out], so the three products of forward and backward are the three GemmForms; a
// dense layer is the grouped product with one group.
#pragma once

#include <cstdint>
#include <span>

#include "moe/tensor/tensor.h"

namespace moe {

// C[m,n] = alpha * op(A) * op(B) + beta * C, fp32 through OpenBLAS. lda/ldb/ldc are row strides.
void sgemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc);
// The same product with plain loops and double accumulation.
void sgemm_reference(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k,
                     float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float beta, float* c, int64_t ldc);

enum class GemmForm {
  kForward,     // c = y_g[M_g,N]   from a = x_g[M_g,K],  b = w_g[K,N]:   y = x w
  kGradInput,   // c = dx_g[M_g,K]  from a = dy_g[M_g,N], b = w_g[K,N]:   grad_input = grad_output
                // w^T
  kGradWeight,  // c = dw_g[K,N]    from a = x_g[M_g,K],  b = dy_g[M_g,N]: dw = x^T grad_output
};

// Grouped product over G groups whose row counts group_rows[g] >= 0 are known only at run time.
// Row-stacked operands hold sum(M_g) rows; weights are [G, K, N]. a and b share input_dtype
// (F32, BF16 or F16); products accumulate in fp32; c has output_dtype (F32 or input_dtype).
// accumulate: c += product, else c = product (a group with 0 rows still writes zeros to its dw).
struct GroupedGemmArgs {
  GemmForm form = GemmForm::kForward;
  int64_t groups = 0;
  const int64_t* group_rows = nullptr;
  int64_t k = 0;
  int64_t n = 0;
  DType input_dtype = DType::F32;
  DType output_dtype = DType::F32;
  const void* a = nullptr;
  const void* b = nullptr;
  void* c = nullptr;
  bool accumulate = false;
};
void grouped_gemm(const GroupedGemmArgs& args);
void grouped_gemm_reference(const GroupedGemmArgs& args);

// The implementations behind grouped_gemm, selectable so that tests cover each one and
// benchmarks compare them. grouped_gemm(args) runs kAuto. The packed kernels give bitwise the
// same result for any thread count, and the same as each other (each element is one fp32 FMA
// chain in depth order whatever the vector width), so fp32 and fp16 results do not depend on
// whether the CPU has AVX-512; bf16 inputs on a CPU with AVX512-BF16 take kPackedAvx512Bf16,
// whose bits differ. per_group_blas is reproducible for a fixed OpenBLAS thread count.
enum class GroupedGemmKernel {
  kAuto,          // the fastest one available for the dtype on this CPU (fixed per CPU, never
                  // per shape, so that results do not depend on how rows are grouped)
  kPerGroupBlas,  // one OpenBLAS call per group (half inputs widened to fp32 first); any CPU
  kPackedAvx2,    // packed AVX2/FMA micro-kernel, fp32/bf16/fp16 inputs; needs AVX2, FMA, F16C
  kPackedAvx512,  // packed AVX-512 micro-kernel, fp32/bf16/fp16 inputs; needs those and AVX-512F
  kPackedAvx512Bf16,  // bf16 inputs only: AVX512-BF16 dot products of bf16 pairs into fp32 (twice
                      // the rate; subnormals flushed, so not bitwise equal to the fp32 kernels)
};
const char* grouped_gemm_kernel_name(GroupedGemmKernel kernel);
// The kernel kAuto runs for this input dtype on this CPU.
GroupedGemmKernel grouped_gemm_auto_kernel(DType input_dtype);
// Whether `kernel` can run on this CPU for this input dtype.
bool grouped_gemm_kernel_available(GroupedGemmKernel kernel, DType input_dtype);
// Throws moe::Error naming the kernel when it is not available.
void grouped_gemm(const GroupedGemmArgs& args, GroupedGemmKernel kernel);

// Checked tensor forms. Shapes: see GemmForm; group_rows must sum to the stacked row count.
// forward: x [R,K], w [G,K,N] -> y [R,N]; grad_input: grad_output [R,N], w -> grad_input [R,K];
// grad_weight: x [R,K], grad_output [R,N] -> dw [G,K,N].
void grouped_gemm(GemmForm form, const Tensor& a, const Tensor& b,
                  std::span<const int64_t> group_rows, Tensor& c, bool accumulate);

// Dense linear products on tensors (one group): y = x w, grad_input = grad_output w^T, dw (+)= x^T
// grad_output.
void linear_forward(const Tensor& x, const Tensor& weight, Tensor& y, bool accumulate = false);
void linear_grad_input(const Tensor& grad_output, const Tensor& weight, Tensor& grad_input,
                       bool accumulate = false);
void linear_grad_weight(const Tensor& x, const Tensor& grad_output, Tensor& grad_weight,
                        bool accumulate = true);

// "forward", "grad_input", "grad_weight".
const char* gemm_form_name(GemmForm form);

// FLOPs of a grouped product (2 * sum(M_g) * K * N), for benchmarks.
double grouped_gemm_flops(std::span<const int64_t> group_rows, int64_t k, int64_t n);

}  // namespace moe

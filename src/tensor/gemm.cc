#include "moe/tensor/gemm.h"

#include <cblas.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "tensor/grouped_gemm_internal.h"

namespace moe {

namespace {

// C = alpha op(A) op(B) + beta C through BLAS, with the empty cases BLAS rejects or skips done
// here: k == 0 still scales C by beta (0 means overwrite with zeros, even over NaN).
template <class T>
void blas_gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha,
               const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  // CBLAS takes int sizes: refuse, rather than wrap, any that does not fit.
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  MOE_CHECK(std::max({m, n, k, lda, ldb, ldc}) <= kIntMax, "gemm: BLAS sizes must fit in int (",
            kIntMax, "): m=", m, " n=", n, " k=", k, " lda=", lda, " ldb=", ldb, " ldc=", ldc);
  auto op_a = transpose_a ? CblasTrans : CblasNoTrans;
  auto op_b = transpose_b ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, op_a, op_b, int(m), int(n), int(k), alpha, a, int(lda), b, int(ldb),
                beta, c, int(ldc));
  } else {
    cblas_dgemm(CblasRowMajor, op_a, op_b, int(m), int(n), int(k), alpha, a, int(lda), b, int(ldb),
                beta, c, int(ldc));
  }
}

}  // namespace

void sgemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc) {
  MOE_CHECK(m >= 0 && n >= 0 && k >= 0, "sgemm: negative size m=", m, " n=", n, " k=", k);
  if (m > 0 && n > 0 && k > 0) {  // BLAS would only print a warning and return
    int64_t a_row = transpose_a ? m : k, b_row = transpose_b ? k : n;
    MOE_CHECK(lda >= a_row && ldb >= b_row && ldc >= n, "sgemm: leading dimensions lda=", lda,
              " ldb=", ldb, " ldc=", ldc, " are shorter than the rows of a (", a_row, "), b (",
              b_row, ") and c (", n, ")");
  }
  blas_gemm(transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void sgemm_reference(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k,
                     float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float beta, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double total = 0.0;
      for (int64_t p = 0; p < k; ++p) {
        double a_ip = transpose_a ? a[p * lda + i] : a[i * lda + p];
        double b_pj = transpose_b ? b[j * ldb + p] : b[p * ldb + j];
        total += a_ip * b_pj;
      }
      double previous = beta == 0.0f ? 0.0 : double(beta) * c[i * ldc + j];
      c[i * ldc + j] = float(alpha * total + previous);
    }
  }
}

GroupedGemmLayout::GroupedGemmLayout(const GroupedGemmArgs& args) {
  MOE_CHECK(args.groups >= 0 && args.k >= 0 && args.n >= 0, "grouped_gemm: groups (", args.groups,
            "), K (", args.k, ") and N (", args.n, ") must be non-negative");
  MOE_CHECK(args.groups == 0 || args.group_rows != nullptr, "grouped_gemm: group_rows is null");
  bool half_input = args.input_dtype == DType::BF16 || args.input_dtype == DType::F16;
  MOE_CHECK(args.input_dtype == DType::F32 || args.input_dtype == DType::F64 || half_input,
            "grouped_gemm: unsupported input dtype ", dtype_name(args.input_dtype));
  MOE_CHECK(
      args.output_dtype == args.input_dtype || (half_input && args.output_dtype == DType::F32),
      "grouped_gemm: output dtype ", dtype_name(args.output_dtype),
      " is not allowed with input dtype ", dtype_name(args.input_dtype));
  row_offsets.resize(size_t(args.groups) + 1, 0);
  for (int64_t g = 0; g < args.groups; ++g) {
    MOE_CHECK(args.group_rows[g] >= 0, "grouped_gemm: group ", g, " has negative row count ",
              args.group_rows[g]);
    row_offsets[g + 1] = row_offsets[g] + args.group_rows[g];
  }
}

GroupProduct GroupedGemmLayout::product(const GroupedGemmArgs& args, int64_t g) const {
  int64_t rows = args.group_rows[g], offset = row_offsets[g], k = args.k, n = args.n;
  switch (args.form) {
    case GemmForm::kForward:  // y_g = x_g w_g
      return {false, false, rows, n, k, offset * k, k, g * k * n, n, offset * n, n};
    case GemmForm::kGradInput:  // dx_g = dy_g w_g^T
      return {false, true, rows, k, n, offset * n, n, g * k * n, n, offset * k, k};
    case GemmForm::kGradWeight:  // dw_g = x_g^T dy_g
      return {true, false, k, n, rows, offset * k, k, offset * n, n, g * k * n, n};
  }
  throw Error("grouped_gemm: unknown form");
}

namespace {

template <class T>
const T* at(const void* base, int64_t offset) {
  return static_cast<const T*>(base) + offset;
}

// Copies `count` elements of a half-precision operand into fp32 scratch.
const float* widen(DType dtype, const void* base, int64_t offset, int64_t count,
                   std::vector<float>& scratch) {
  scratch.resize(size_t(count));
  if (dtype == DType::BF16) {
    convert_to_float(at<bf16>(base, offset), scratch.data(), size_t(count));
  } else {
    convert_to_float(at<f16>(base, offset), scratch.data(), size_t(count));
  }
  return scratch.data();
}

}  // namespace

void grouped_gemm_blas(const GroupedGemmArgs& args, const GroupedGemmLayout& layout) {
  std::vector<float> a_scratch, b_scratch, c_scratch;
  for (int64_t g = 0; g < args.groups; ++g) {
    GroupProduct p = layout.product(args, g);
    if (p.m == 0 || p.n == 0) continue;
    // Each group's operand blocks are contiguous: (stored rows) x (leading dimension).
    int64_t a_count = (p.transpose_a ? p.k : p.m) * p.lda;
    int64_t b_count = (p.transpose_b ? p.n : p.k) * p.ldb;
    int64_t c_count = p.m * p.ldc;
    if (args.input_dtype == DType::F64) {
      blas_gemm(p.transpose_a, p.transpose_b, p.m, p.n, p.k, 1.0, at<double>(args.a, p.a_offset),
                p.lda, at<double>(args.b, p.b_offset), p.ldb, args.accumulate ? 1.0 : 0.0,
                static_cast<double*>(args.c) + p.c_offset, p.ldc);
      continue;
    }
    const float* a = args.input_dtype == DType::F32
                         ? at<float>(args.a, p.a_offset)
                         : widen(args.input_dtype, args.a, p.a_offset, a_count, a_scratch);
    const float* b = args.input_dtype == DType::F32
                         ? at<float>(args.b, p.b_offset)
                         : widen(args.input_dtype, args.b, p.b_offset, b_count, b_scratch);
    if (args.output_dtype == DType::F32) {
      sgemm(p.transpose_a, p.transpose_b, p.m, p.n, p.k, 1.0f, a, p.lda, b, p.ldb,
            args.accumulate ? 1.0f : 0.0f, static_cast<float*>(args.c) + p.c_offset, p.ldc);
      continue;
    }
    // Half-precision output: fp32 product (plus the old value when accumulating), rounded once.
    if (args.accumulate) {
      widen(args.output_dtype, args.c, p.c_offset, c_count, c_scratch);
    } else {
      c_scratch.resize(size_t(c_count));
    }
    sgemm(p.transpose_a, p.transpose_b, p.m, p.n, p.k, 1.0f, a, p.lda, b, p.ldb,
          args.accumulate ? 1.0f : 0.0f, c_scratch.data(), p.ldc);
    if (args.output_dtype == DType::BF16) {
      convert_from_float(c_scratch.data(), static_cast<bf16*>(args.c) + p.c_offset,
                         size_t(c_count));
    } else {
      convert_from_float(c_scratch.data(), static_cast<f16*>(args.c) + p.c_offset, size_t(c_count));
    }
  }
}

const char* grouped_gemm_kernel_name(GroupedGemmKernel kernel) {
  switch (kernel) {
    case GroupedGemmKernel::kAuto:
      return "auto";
    case GroupedGemmKernel::kPerGroupBlas:
      return "per_group_blas";
    case GroupedGemmKernel::kPackedAvx2:
      return "packed_avx2";
    case GroupedGemmKernel::kPackedAvx512:
      return "packed_avx512";
    case GroupedGemmKernel::kPackedAvx512Bf16:
      return "packed_avx512_bf16";
  }
  return "unknown";
}

bool grouped_gemm_kernel_available(GroupedGemmKernel kernel, DType input_dtype) {
  bool supported_dtype = input_dtype == DType::F32 || input_dtype == DType::BF16 ||
                         input_dtype == DType::F16 || input_dtype == DType::F64;
  switch (kernel) {
    case GroupedGemmKernel::kAuto:
    case GroupedGemmKernel::kPerGroupBlas:
      return supported_dtype;
    case GroupedGemmKernel::kPackedAvx2:
    case GroupedGemmKernel::kPackedAvx512:
      return input_dtype != DType::F64 && supported_dtype && packed_gemm_supported(kernel);
    case GroupedGemmKernel::kPackedAvx512Bf16:
      return input_dtype == DType::BF16 && packed_gemm_supported(kernel);
  }
  return false;
}

GroupedGemmKernel grouped_gemm_auto_kernel(DType input_dtype) {
  for (GroupedGemmKernel fastest_first :
       {GroupedGemmKernel::kPackedAvx512Bf16, GroupedGemmKernel::kPackedAvx512,
        GroupedGemmKernel::kPackedAvx2}) {
    if (grouped_gemm_kernel_available(fastest_first, input_dtype)) return fastest_first;
  }
  return GroupedGemmKernel::kPerGroupBlas;
}

void grouped_gemm(const GroupedGemmArgs& args, GroupedGemmKernel kernel) {
  GroupedGemmLayout layout(args);  // validates args first, so their errors come before ours
  MOE_CHECK(grouped_gemm_kernel_available(kernel, args.input_dtype), "grouped_gemm: kernel ",
            grouped_gemm_kernel_name(kernel), " is not available for input dtype ",
            dtype_name(args.input_dtype), " on this CPU");
  if (kernel == GroupedGemmKernel::kAuto) kernel = grouped_gemm_auto_kernel(args.input_dtype);
  if (kernel == GroupedGemmKernel::kPerGroupBlas) {
    grouped_gemm_blas(args, layout);
  } else {
    grouped_gemm_packed(args, layout, kernel);
  }
}

void grouped_gemm(const GroupedGemmArgs& args) {
  grouped_gemm(args, GroupedGemmKernel::kAuto);
}

namespace {
double load(DType dtype, const void* base, int64_t index) {
  switch (dtype) {
    case DType::F32:
      return static_cast<const float*>(base)[index];
    case DType::F64:
      return static_cast<const double*>(base)[index];
    case DType::BF16:
      return bf16_to_float(static_cast<const bf16*>(base)[index]);
    case DType::F16:
      return f16_to_float_portable(static_cast<const f16*>(base)[index]);
    default:
      throw Error("grouped_gemm_reference: unsupported dtype");
  }
}
void store(DType dtype, void* base, int64_t index, double value) {
  switch (dtype) {
    case DType::F32:
      static_cast<float*>(base)[index] = float(value);
      break;
    case DType::F64:
      static_cast<double*>(base)[index] = value;
      break;
    case DType::BF16:
      static_cast<bf16*>(base)[index] = float_to_bf16(float(value));
      break;
    case DType::F16:
      static_cast<f16*>(base)[index] = float_to_f16_portable(float(value));
      break;
    default:
      throw Error("grouped_gemm_reference: unsupported dtype");
  }
}
}  // namespace

void grouped_gemm_reference(const GroupedGemmArgs& args) {
  GroupedGemmLayout layout(args);
  for (int64_t g = 0; g < args.groups; ++g) {
    GroupProduct p = layout.product(args, g);
    for (int64_t i = 0; i < p.m; ++i) {
      for (int64_t j = 0; j < p.n; ++j) {
        double total = 0.0;
        for (int64_t q = 0; q < p.k; ++q) {
          int64_t a_index = p.transpose_a ? q * p.lda + i : i * p.lda + q;
          int64_t b_index = p.transpose_b ? j * p.ldb + q : q * p.ldb + j;
          total += load(args.input_dtype, args.a, p.a_offset + a_index) *
                   load(args.input_dtype, args.b, p.b_offset + b_index);
        }
        int64_t c_index = p.c_offset + i * p.ldc + j;
        if (args.accumulate) total += load(args.output_dtype, args.c, c_index);
        store(args.output_dtype, args.c, c_index, total);
      }
    }
  }
}

const char* gemm_form_name(GemmForm form) {
  switch (form) {
    case GemmForm::kForward:
      return "forward";
    case GemmForm::kGradInput:
      return "grad_input";
    case GemmForm::kGradWeight:
      return "grad_weight";
  }
  return "unknown";
}

double grouped_gemm_flops(std::span<const int64_t> group_rows, int64_t k, int64_t n) {
  double rows = double(std::accumulate(group_rows.begin(), group_rows.end(), int64_t(0)));
  return 2.0 * rows * double(k) * double(n);
}

void grouped_gemm(GemmForm form, const Tensor& a, const Tensor& b,
                  std::span<const int64_t> group_rows, Tensor& c, bool accumulate) {
  struct Names {
    const char *call, *a, *b, *c;
  };
  const Names names = form == GemmForm::kForward ? Names{"grouped_gemm(forward)", "x", "w", "y"}
                      : form == GemmForm::kGradInput
                          ? Names{"grouped_gemm(grad_input)", "grad_output", "w", "grad_input"}
                          : Names{"grouped_gemm(grad_weight)", "x", "grad_output", "grad_weight"};
  // Every message names all three operands, so a mismatch shows both sides.
  const std::string operands =
      detail::concat(names.a, " ", shape_string(a.shape()), ", ", names.b, " ",
                     shape_string(b.shape()), ", ", names.c, " ", shape_string(c.shape()));
  int64_t groups = int64_t(group_rows.size());
  int64_t total_rows = 0;
  for (int64_t g = 0; g < groups; ++g) {
    MOE_CHECK(group_rows[g] >= 0, names.call, ": group ", g, " has negative row count ",
              group_rows[g]);
    total_rows += group_rows[g];
  }
  bool grad_weight = form == GemmForm::kGradWeight;
  MOE_CHECK(a.ndim() == 2 && b.ndim() == (grad_weight ? 2 : 3) && c.ndim() == (grad_weight ? 3 : 2),
            names.call, ": expected ", names.a, " 2-d, ", names.b,
            grad_weight ? " 2-d, " : " 3-d, ", names.c, grad_weight ? " 3-d" : " 2-d", "; got ",
            operands);
  MOE_CHECK(a.dtype() == b.dtype(), names.call, ": operands have different dtypes, ", names.a, " ",
            dtype_name(a.dtype()), " and ", names.b, " ", dtype_name(b.dtype()));
  MOE_CHECK(a.dim(0) == total_rows, names.call, ": group rows sum to ", total_rows, " but ",
            operands);
  int64_t k, n;
  Shape expected_c;
  if (grad_weight) {
    k = a.dim(1);
    n = b.dim(1);
    MOE_CHECK(b.dim(0) == total_rows, names.call, ": group rows sum to ", total_rows, " but ",
              operands);
    expected_c = {groups, k, n};
  } else {
    k = b.dim(1);
    n = b.dim(2);
    MOE_CHECK(b.dim(0) == groups, names.call, ": ", groups, " group sizes given but ", operands);
    int64_t inner = form == GemmForm::kForward ? k : n;
    MOE_CHECK(a.dim(1) == inner, names.call, ": inner dimensions differ (", a.dim(1), " vs ", inner,
              "): ", operands);
    expected_c = {total_rows, form == GemmForm::kForward ? n : k};
  }
  MOE_CHECK(c.shape() == expected_c, names.call, ": ", names.c, " should have shape ",
            shape_string(expected_c), ": ", operands);
  GroupedGemmArgs args;
  args.form = form;
  args.groups = groups;
  args.group_rows = group_rows.data();
  args.k = k;
  args.n = n;
  args.input_dtype = a.dtype();
  args.output_dtype = c.dtype();
  args.a = a.raw();
  args.b = b.raw();
  args.c = c.raw();
  args.accumulate = accumulate;
  grouped_gemm(args);
}

void linear_forward(const Tensor& x, const Tensor& weight, Tensor& y, bool accumulate) {
  check_ndim(weight, 2, "linear weight");
  check_ndim(x, 2, "linear input");
  int64_t rows[1] = {x.dim(0)};
  grouped_gemm(GemmForm::kForward, x, weight.reshape({1, weight.dim(0), weight.dim(1)}), rows, y,
               accumulate);
}

void linear_grad_input(const Tensor& grad_output, const Tensor& weight, Tensor& grad_input,
                       bool accumulate) {
  check_ndim(weight, 2, "linear weight");
  check_ndim(grad_output, 2, "linear output gradient");
  int64_t rows[1] = {grad_output.dim(0)};
  grouped_gemm(GemmForm::kGradInput, grad_output, weight.reshape({1, weight.dim(0), weight.dim(1)}),
               rows, grad_input, accumulate);
}

void linear_grad_weight(const Tensor& x, const Tensor& grad_output, Tensor& grad_weight,
                        bool accumulate) {
  check_ndim(grad_weight, 2, "linear weight gradient");
  check_ndim(x, 2, "linear input");
  int64_t rows[1] = {x.dim(0)};
  Tensor dw3 = grad_weight.reshape({1, grad_weight.dim(0), grad_weight.dim(1)});
  grouped_gemm(GemmForm::kGradWeight, x, grad_output, rows, dw3, accumulate);
}

}  // namespace moe

// Shared bookkeeping of the grouped GEMM implementations: where each group's operands start and
// which plain GEMM (transposes, m, n, k, leading dimensions) computes it.
#pragma once

#include <vector>

#include "moe/tensor/gemm.h"

namespace moe {

struct GroupProduct {
  bool transpose_a, transpose_b;
  int64_t m, n, k;
  int64_t a_offset, lda, b_offset, ldb, c_offset, ldc;  // offsets in elements
};

struct GroupedGemmLayout {
  explicit GroupedGemmLayout(const GroupedGemmArgs& args);  // validates args
  GroupProduct product(const GroupedGemmArgs& args, int64_t group) const;
  std::vector<int64_t> row_offsets;  // [groups + 1], prefix sums of group_rows
};

// The first implementation: one BLAS call per group (half inputs widened to fp32 first).
void grouped_gemm_blas(const GroupedGemmArgs& args, const GroupedGemmLayout& layout);

// Whether this CPU runs `kernel` (kPackedAvx2: AVX2, FMA and F16C; kPackedAvx512: those and
// AVX-512F; kPackedAvx512Bf16: those and AVX512-BF16); false for the other kernels.
bool packed_gemm_supported(GroupedGemmKernel kernel);
// The packed kernels (grouped_gemm_packed.cc): F32, BF16 and F16 inputs (BF16 only for
// kPackedAvx512Bf16). Call only when packed_gemm_supported(kernel).
void grouped_gemm_packed(const GroupedGemmArgs& args, const GroupedGemmLayout& layout,
                         GroupedGemmKernel kernel);

}  // namespace moe

// Shared pieces of the kernel test harness (tests/tensor, tests/moe): the dtypes and row counts
// every kernel is run on, and the tolerance each dtype is held to when a fast kernel is compared
// with its reference.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/tensor/tensor.h"

namespace moe::testing {

// Row counts every kernel sees: empty, single, odd, one past a 16-row block, one past 128.
inline const std::vector<int64_t> kHarnessRows = {0, 1, 5, 17, 129};
inline const std::vector<DType> kHarnessDtypes = {DType::F32, DType::BF16, DType::F16, DType::F64};

struct Tolerance {
  double atol;
  double rtol;
};

// Fast kernels compute in fp32 (fp64 for F64) and round once into the output dtype; references
// compute in double and round once. Outputs may so differ by one unit in the last place of the
// output dtype (bf16: 2^-7 relative, fp16: 2^-10) plus fp32 rounding inside the kernel.
inline Tolerance elementwise_tolerance(DType output) {
  switch (output) {
    case DType::F64:
      return {1e-12, 1e-12};
    case DType::F32:
      return {2e-5, 2e-5};
    case DType::BF16:
      return {2e-3, 8e-3};
    case DType::F16:
      return {2e-4, 2e-3};
    default:
      return {0, 0};
  }
}

inline std::string dtype_label(DType dtype) {
  return std::string(dtype_name(dtype));
}

}  // namespace moe::testing

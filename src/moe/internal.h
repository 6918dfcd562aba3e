// Small helpers shared by the MoE sources (not part of the public API).
#pragma once

#include "moe/tensor/tensor.h"

namespace moe::internal {

// The dtype routing math, probabilities and fp32-path accumulations use for a given activation
// dtype: fp64 for fp64 activations (the gradient-check path), fp32 otherwise.
inline DType compute_dtype_for(DType activation) {
  return activation == DType::F64 ? DType::F64 : DType::F32;
}

// Runs body(float{}) or body(double{}) for a compute dtype (F32 or F64).
template <class Body>
decltype(auto) with_compute_type(DType dtype, Body&& body) {
  if (dtype == DType::F64) return body(double{});
  return body(float{});
}

// dst += src elementwise, any floating dtypes, same element count; math in fp32 (fp64 when
// either side is fp64), one rounding per element.
void accumulate_into(const Tensor& src, Tensor& dst);

// out[n] (+)= sum over rows of x [R, N] restricted to rows [begin, end), in row order, into a
// row of dst at dst_row (dst [G, N], F32 or F64; x any floating dtype).
void add_column_sums(const Tensor& x, int64_t begin, int64_t end, Tensor& dst, int64_t dst_row);

}  // namespace moe::internal

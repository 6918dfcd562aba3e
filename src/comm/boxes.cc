#include "moe/comm/boxes.h"

#include <algorithm>

namespace moe::comm {

bool boxes_overlap(const Shape& a_offset, const Shape& a_shape, const Shape& b_offset,
                   const Shape& b_shape) {
  MOE_CHECK(a_shape.size() == a_offset.size() && b_offset.size() == a_offset.size() &&
                b_shape.size() == a_offset.size(),
            "boxes_overlap: boxes ", shape_string(a_shape), " at ", shape_string(a_offset), " and ",
            shape_string(b_shape), " at ", shape_string(b_offset),
            " must have the same number of dimensions");
  for (size_t d = 0; d < a_offset.size(); ++d) {
    if (std::max(a_offset[d], b_offset[d]) >=
        std::min(a_offset[d] + a_shape[d], b_offset[d] + b_shape[d])) {
      return false;
    }
  }
  return true;
}

int64_t copy_box_overlap(const Tensor& source, const Shape& source_offset, Tensor& target,
                         const Shape& target_offset) {
  const Shape& source_shape = source.shape();
  const Shape& target_shape = target.shape();
  size_t ndim = target_shape.size();
  MOE_CHECK(
      source_shape.size() == ndim && source_offset.size() == ndim && target_offset.size() == ndim,
      "copy_box_overlap: source ", shape_string(source_shape), " at offset ",
      shape_string(source_offset), " and target ", shape_string(target_shape), " at offset ",
      shape_string(target_offset), " must have the same number of dimensions");
  Shape low(ndim), extent(ndim);
  for (size_t d = 0; d < ndim; ++d) {
    low[d] = std::max(source_offset[d], target_offset[d]);
    int64_t high = std::min(source_offset[d] + source_shape[d], target_offset[d] + target_shape[d]);
    if (high <= low[d]) return 0;
    extent[d] = high - low[d];
  }
  // Row by row along the last dimension, where both boxes are contiguous.
  int64_t row = ndim == 0 ? 1 : extent[ndim - 1];
  int64_t rows = shape_numel(extent) / row;
  const char* from = static_cast<const char*>(source.raw());
  char* into = static_cast<char*>(target.raw());
  Shape index(ndim, 0);  // over all dims but the last
  for (int64_t r = 0; r < rows; ++r) {
    int64_t s = 0, t = 0;
    for (size_t d = 0; d < ndim; ++d) {
      int64_t g = low[d] + index[d];
      s = s * source_shape[d] + (g - source_offset[d]);
      t = t * target_shape[d] + (g - target_offset[d]);
    }
    Tensor from_row = Tensor::view_of(
        const_cast<char*>(from) + size_t(s) * dtype_size(source.dtype()), {row}, source.dtype());
    Tensor into_row =
        Tensor::view_of(into + size_t(t) * dtype_size(target.dtype()), {row}, target.dtype());
    into_row.copy_from(from_row);  // converts when the dtypes differ
    for (int d = int(ndim) - 2; d >= 0; --d) {
      if (++index[size_t(d)] < extent[size_t(d)]) break;
      index[size_t(d)] = 0;
    }
  }
  return rows * row;
}

}  // namespace moe::comm

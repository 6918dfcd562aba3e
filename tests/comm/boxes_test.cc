// Box overlap copies (resharding between layouts) against an element-by-element reference on
// awkward shapes, with dtype conversion, and the boundary check's text.
#include "moe/comm/boxes.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "moe/tensor/rng.h"
#include "support/testing.h"

namespace moe::comm {
namespace {

// target with every element whose global position lies in the source box (an fp32 tensor)
// replaced by that element.
Tensor reference_copy(const Tensor& source, const Shape& source_offset, const Tensor& target,
                      const Shape& target_offset) {
  const std::vector<float> from = source.to_floats();
  Tensor expected = target.clone();
  const Shape& shape = target.shape();
  Shape index(shape.size(), 0);
  for (int64_t flat = 0; flat < target.numel(); ++flat) {
    int64_t source_flat = 0;
    bool inside = true;
    for (size_t d = 0; d < shape.size(); ++d) {
      const int64_t position = target_offset[d] + index[d] - source_offset[d];
      inside = inside && position >= 0 && position < source.shape()[d];
      source_flat = source_flat * source.shape()[d] + position;
    }
    if (inside) expected.set(flat, from[size_t(source_flat)]);
    for (size_t d = shape.size(); d-- > 0;) {
      if (++index[d] < shape[d]) break;
      index[d] = 0;
    }
  }
  return expected;
}

int64_t overlap_elements(const Shape& a_offset, const Shape& a_shape, const Shape& b_offset,
                         const Shape& b_shape) {
  int64_t elements = 1;
  for (size_t d = 0; d < a_shape.size(); ++d) {
    elements *= std::max<int64_t>(0, std::min(a_offset[d] + a_shape[d], b_offset[d] + b_shape[d]) -
                                         std::max(a_offset[d], b_offset[d]));
  }
  return elements;
}

TEST(Boxes, OverlapCopyMatchesTheReferenceOnAwkwardShapes) {
  Rng rng(11);
  const std::vector<int64_t> sizes = {0, 1, 5, 17};
  int cases = 0;
  for (size_t ndim : {size_t(0), size_t(1), size_t(2), size_t(3)}) {
    for (int trial = 0; trial < 12; ++trial) {
      Shape source_shape(ndim), target_shape(ndim), source_offset(ndim), target_offset(ndim);
      for (size_t d = 0; d < ndim; ++d) {
        source_shape[d] = sizes[rng.below(sizes.size())];
        target_shape[d] = sizes[rng.below(sizes.size())];
        source_offset[d] = int64_t(rng.below(20));
        target_offset[d] = int64_t(rng.below(20));
      }
      for (DType target_dtype : {DType::F32, DType::BF16, DType::F64}) {
        Tensor source = moe::testing::random_normal(source_shape, 100 + uint64_t(trial));
        Tensor target =
            moe::testing::random_normal(target_shape, 200 + uint64_t(trial), 1.0f, target_dtype);
        Tensor expected = reference_copy(source, source_offset, target, target_offset);
        int64_t copied = copy_box_overlap(source, source_offset, target, target_offset);
        EXPECT_EQ(copied,
                  overlap_elements(source_offset, source_shape, target_offset, target_shape));
        EXPECT_EQ(boxes_overlap(source_offset, source_shape, target_offset, target_shape),
                  copied > 0);
        EXPECT_TRUE(moe::testing::same_bytes(target, expected))
            << "source " << shape_string(source_shape) << " at " << shape_string(source_offset)
            << ", target " << shape_string(target_shape) << " at " << shape_string(target_offset)
            << " " << dtype_name(target_dtype);
        cases += copied > 0;
      }
    }
  }
  EXPECT_GT(cases, 10);  // the random boxes did overlap often enough to test something
}

TEST(Boxes, DimensionMismatchIsNamed) {
  Tensor source({2, 3}), target({4});
  EXPECT_EQ(moe::testing::error_text([&] {
              copy_box_overlap(source, {0, 0}, target, {1});
            }),
            "copy_box_overlap: source [2, 3] at offset [0, 0] and target [4] at offset [1] must "
            "have the same number of dimensions");
}

TEST(Boxes, OverlapTestNamesADimensionMismatch) {
  EXPECT_FALSE(boxes_overlap({0, 0}, {2, 3}, {2, 0}, {1, 3}));
  EXPECT_TRUE(boxes_overlap({0, 0}, {2, 3}, {1, 2}, {1, 3}));
  EXPECT_EQ(moe::testing::error_text([&] {
              boxes_overlap({0, 0}, {2, 3}, {1}, {4});
            }),
            "boxes_overlap: boxes [2, 3] at [0, 0] and [4] at [1] must have the same number of "
            "dimensions");
}

}  // namespace
}  // namespace moe::comm

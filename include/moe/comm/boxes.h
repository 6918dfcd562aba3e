// Boxes of a global tensor: the block a rank holds under tensor/expert parallelism, or a piece a
// checkpoint stored, is a box (offset, shape) in the global tensor's coordinates. Resharding is
// copying the overlap of one box into another.
#pragma once

#include <cstdint>

#include "moe/tensor/tensor.h"

namespace moe::comm {

// True when the boxes (a_offset, a_shape) and (b_offset, b_shape) share at least one element.
bool boxes_overlap(const Shape& a_offset, const Shape& a_shape, const Shape& b_offset,
                   const Shape& b_shape);

// Copies the overlap of two boxes from `source` (the box at source_offset, of source's shape)
// into `target` (the box at target_offset, of target's shape), converting the dtype if they
// differ; the rest of target is left as it is. Both tensors and both offsets must have the same
// number of dimensions. Returns the number of elements copied (0 when the boxes do not overlap).
int64_t copy_box_overlap(const Tensor& source, const Shape& source_offset, Tensor& target,
                         const Shape& target_offset);

}  // namespace moe::comm

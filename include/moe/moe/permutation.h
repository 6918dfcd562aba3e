// Token permutation: grouping the (token, slot) pairs of a routing by expert (the slots that
// capacity.h keeps), and the two fused row kernels that move activations between token order
// and expert order. Every dispatcher (single process, all-to-all, all-gather) builds on these.
//
// Order (what makes results identical across expert-parallel sizes): inside an expert, rows
// follow token order; unpermute sums a token's top-k rows in slot order 0..topk-1 in fp32 (fp64
// for fp64 tensors) and rounds once.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/moe/config.h"
#include "moe/moe/router.h"
#include "moe/tensor/tensor.h"

namespace moe {

// The permutation between token slots and expert rows, for local experts
// [first_expert, first_expert + rows_per_expert.size()).
struct DispatchPlan {
  int64_t num_tokens = 0;
  int64_t topk = 0;
  int64_t first_expert = 0;
  std::vector<int64_t> rows_per_expert;  // [local experts], padding rows included
  std::vector<int64_t> row_of_slot;  // [T * topk]: the slot's expert row, -1 if dropped/not local
  std::vector<int64_t> slot_of_row;  // [R]: the slot t * topk + j feeding the row, -1 if padding
  int64_t num_rows() const { return int64_t(slot_of_row.size()); }
  int64_t num_local_experts() const { return int64_t(rows_per_expert.size()); }
};

// [plan.num_local_experts()] the rows of each expert that carry a token (padding excluded).
std::vector<int64_t> unpadded_rows_per_expert(const DispatchPlan& plan);

// experts: [T, topk] I32 ids in [0, num_experts). keep: T*topk flags or empty (keep all).
// pad_rows_to > 0: every local expert gets exactly that many rows (its kept tokens first, then
// zero padding rows); an expert keeping more rows than that is an error.
DispatchPlan build_dispatch_plan(const Tensor& experts, int64_t num_experts, int64_t first_expert,
                                 int64_t num_local_experts, const std::vector<uint8_t>& keep = {},
                                 int64_t pad_rows_to = 0);

// Fused permute + gather: rows[r] = hidden[token of r] * slot_weights[slot of r] (weight 1 when
// slot_weights is undefined), zero for padding rows. hidden [T, H], rows [R, H] (overwritten),
// same dtype; slot_weights [T, topk] F32 (F64 with fp64 tensors). One pass, no copies.
void permute_rows(const Tensor& hidden, const DispatchPlan& plan, const Tensor& slot_weights,
                  Tensor& rows);

// Fused unpermute + weighted sum: out[t] = sum_j slot_weights[t, j] * rows[row_of_slot(t, j)]
// over kept slots, in slot order, accumulated in fp32 (fp64) and rounded once. Tokens with no
// kept slot get zeros. rows [R, H], out [T, H] (overwritten).
void unpermute_rows(const Tensor& rows, const DispatchPlan& plan, const Tensor& slot_weights,
                    Tensor& out);

// Backward of unpermute_rows with weights, in one pass over the slots:
// grad_rows[row] = slot_weights[t, j] * grad_out[t] (zero for padding rows) and
// grad_weights[t, j] = <rows[row], grad_out[t]> (zero for dropped slots). Both overwritten.
void unpermute_rows_backward(const Tensor& rows, const Tensor& grad_out, const DispatchPlan& plan,
                             const Tensor& slot_weights, Tensor& grad_rows, Tensor& grad_weights);

namespace reference {
// Plain serial loops over the dense token x expert assignment, accumulated in double.
DispatchPlan build_dispatch_plan(const Tensor& experts, int64_t num_experts, int64_t first_expert,
                                 int64_t num_local_experts, const std::vector<uint8_t>& keep = {},
                                 int64_t pad_rows_to = 0);
void permute_rows(const Tensor& hidden, const DispatchPlan& plan, const Tensor& slot_weights,
                  Tensor& rows);
void unpermute_rows(const Tensor& rows, const DispatchPlan& plan, const Tensor& slot_weights,
                    Tensor& out);
void unpermute_rows_backward(const Tensor& rows, const Tensor& grad_out, const DispatchPlan& plan,
                             const Tensor& slot_weights, Tensor& grad_rows, Tensor& grad_weights);
}  // namespace reference

}  // namespace moe

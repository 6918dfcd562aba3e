// The home side of every dispatcher's combine and backwards: a token's kept slot rows on its home
// rank weighted and summed in slot order by the permutation kernels (implemented in
// permutation.cc). One code path for the single-process and the expert-parallel dispatchers is
// what makes their outputs bitwise equal. Not part of the public API.
#pragma once

#include "moe/moe/token_dispatcher.h"
#include "moe/tensor/tensor.h"

namespace moe::internal {

// The end of combine: this rank's home slot rows [plan rows, H] weighted and summed into the
// output [T, H]. Keeps the rows in ctx, since d(probs) needs them.
Tensor combine_home_rows(const Tensor& home, DispatchContext& ctx);

// The start of combine_backward (`who` names it; its saved state already checked): checks
// grad_output [T, H], writes d(probs) into grad_probs and returns the gradient of the home slot
// rows [plan rows, H].
Tensor combine_backward_home_rows(const char* who, const Tensor& grad_output, DispatchContext& ctx,
                                  Tensor& grad_probs);

// The end of dispatch_backward: the home slot-row gradients [plan rows, H] summed into the
// gradient of hidden [T, H]. Clears ctx: the micro-batch is done with the dispatcher.
Tensor home_rows_to_grad_hidden(const Tensor& grad_home, DispatchContext& ctx);

}  // namespace moe::internal

// torch.optim.AdamW in double precision, the reference for the optimizer tests.
#pragma once

#include <cmath>

#include "optim/update_kernels.h"

namespace moe::testing {

// One AdamW step of one element at step h.step.
inline void reference_adamw(double& p, double& m, double& v, double g, const optim::AdamStep& h) {
  p *= 1.0 - h.lr * h.weight_decay;
  m = h.beta1 * m + (1 - h.beta1) * g;
  v = h.beta2 * v + (1 - h.beta2) * g * g;
  double denom = std::sqrt(v) / std::sqrt(1 - std::pow(h.beta2, double(h.step))) + h.eps;
  p -= h.lr / (1 - std::pow(h.beta1, double(h.step))) * m / denom;
}

}  // namespace moe::testing

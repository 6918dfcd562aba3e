// Elementwise optimizer updates on plain fp32 arrays (OpenMP over elements, so results do not
// depend on the thread count). All arrays have n elements; param, exp_avg, exp_avg_sq and
// momentum are updated in place, grad is read.
#pragma once

#include <cstdint>

namespace moe::optim {

// torch.optim.AdamW at step t (t >= 1): p *= 1 - lr*wd; m = b1 m + (1-b1) g;
// v = b2 v + (1-b2) g^2; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
struct AdamStep {
  double lr = 0.0;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  int64_t step = 1;
};
void adam_update(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                 const AdamStep& hyper);

// torch.optim.SGD (dampening 0, not Nesterov): d = g + wd p; buf = d on the first step, else
// momentum * buf + d; p -= lr * buf. momentum == 0 uses d directly (buf untouched, may be null).
struct SgdStep {
  double lr = 0.0;
  double momentum = 0.0;
  double weight_decay = 0.0;
  bool first_step = true;
};
void sgd_update(float* param, const float* grad, float* momentum_buffer, int64_t n,
                const SgdStep& hyper);

// Sum of x[i]^2 in double, in an order fixed by n alone (blocks of fixed size, lanes within a
// block), so the result does not depend on the thread count. Non-finite input gives a non-finite
// sum.
double sum_of_squares(const float* x, int64_t n);

// Number of elements equal to zero.
int64_t count_zeros(const float* x, int64_t n);

}  // namespace moe::optim

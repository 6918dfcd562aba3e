#include "update_kernels.h"

#include <cmath>

namespace moe::optim {

void adam_update(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                 const AdamStep& h) {
  // Scalars in double first, as torch computes them in Python, then rounded once to fp32.
  const float decay = float(1.0 - h.lr * h.weight_decay);
  const float beta1 = float(h.beta1), beta2 = float(h.beta2);
  const float one_minus_beta1 = float(1.0 - h.beta1), one_minus_beta2 = float(1.0 - h.beta2);
  const float step_size = float(h.lr / (1.0 - std::pow(h.beta1, double(h.step))));
  const float inv_sqrt_bias2 = float(1.0 / std::sqrt(1.0 - std::pow(h.beta2, double(h.step))));
  const float eps = float(h.eps);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float g = grad[i];
    float m = beta1 * exp_avg[i] + one_minus_beta1 * g;
    float v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    float denom = std::sqrt(v) * inv_sqrt_bias2 + eps;
    param[i] = param[i] * decay - step_size * m / denom;
  }
}

void sgd_update(float* param, const float* grad, float* momentum_buffer, int64_t n,
                const SgdStep& h) {
  const float lr = float(h.lr), wd = float(h.weight_decay), momentum = float(h.momentum);
  const bool use_momentum = h.momentum != 0.0;
  const bool first = h.first_step;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float d = grad[i] + wd * param[i];
    if (use_momentum) {
      d = first ? d : momentum * momentum_buffer[i] + d;
      momentum_buffer[i] = d;
    }
    param[i] -= lr * d;
  }
}

}  // namespace moe::optim

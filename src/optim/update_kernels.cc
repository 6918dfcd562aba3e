#include "update_kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace moe::optim {

namespace {

// Adam on elements [begin, end), one at a time. The AVX2 path below performs the same fp32
// operations in the same order, so both give bitwise the same result.
struct AdamScalars {
  float decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, inv_sqrt_bias2, eps;
};

inline void adam_elements(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                          int64_t begin, int64_t end, const AdamScalars& c) {
  for (int64_t i = begin; i < end; ++i) {
    float g = grad[i];
    float m = c.beta1 * exp_avg[i] + c.one_minus_beta1 * g;
    float v = c.beta2 * exp_avg_sq[i] + c.one_minus_beta2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    float denom = std::sqrt(v) * c.inv_sqrt_bias2 + c.eps;
    param[i] = param[i] * c.decay - c.step_size * m / denom;
  }
}

}  // namespace

void adam_update(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                 const AdamStep& h) {
  // Scalars in double first, as torch computes them in Python, then rounded once to fp32.
  AdamScalars c;
  c.decay = float(1.0 - h.lr * h.weight_decay);
  c.beta1 = float(h.beta1);
  c.beta2 = float(h.beta2);
  c.one_minus_beta1 = float(1.0 - h.beta1);
  c.one_minus_beta2 = float(1.0 - h.beta2);
  c.step_size = float(h.lr / (1.0 - std::pow(h.beta1, double(h.step))));
  c.inv_sqrt_bias2 = float(1.0 / std::sqrt(1.0 - std::pow(h.beta2, double(h.step))));
  c.eps = float(h.eps);
#if defined(__AVX2__)
  // std::sqrt may set errno, which keeps the compiler from vectorising the scalar loop.
  constexpr int64_t kWidth = 8;
  const int64_t vector_end = n / kWidth * kWidth;
  const __m256 decay = _mm256_set1_ps(c.decay), beta1 = _mm256_set1_ps(c.beta1),
               beta2 = _mm256_set1_ps(c.beta2), omb1 = _mm256_set1_ps(c.one_minus_beta1),
               omb2 = _mm256_set1_ps(c.one_minus_beta2), step = _mm256_set1_ps(c.step_size),
               inv_bias2 = _mm256_set1_ps(c.inv_sqrt_bias2), eps = _mm256_set1_ps(c.eps);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < vector_end; i += kWidth) {
    __m256 g = _mm256_loadu_ps(grad + i);
    __m256 m =
        _mm256_add_ps(_mm256_mul_ps(beta1, _mm256_loadu_ps(exp_avg + i)), _mm256_mul_ps(omb1, g));
    __m256 v = _mm256_add_ps(_mm256_mul_ps(beta2, _mm256_loadu_ps(exp_avg_sq + i)),
                             _mm256_mul_ps(_mm256_mul_ps(omb2, g), g));
    _mm256_storeu_ps(exp_avg + i, m);
    _mm256_storeu_ps(exp_avg_sq + i, v);
    __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), inv_bias2), eps);
    __m256 p = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(param + i), decay),
                             _mm256_div_ps(_mm256_mul_ps(step, m), denom));
    _mm256_storeu_ps(param + i, p);
  }
  adam_elements(param, grad, exp_avg, exp_avg_sq, vector_end, n, c);
#else
  constexpr int64_t kChunk = 4096;
#pragma omp parallel for schedule(static)
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    adam_elements(param, grad, exp_avg, exp_avg_sq, begin, std::min(n, begin + kChunk), c);
  }
#endif
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

double sum_of_squares(const float* x, int64_t n) {
  constexpr int64_t kBlock = 8192;
  constexpr int kLanes = 8;  // independent accumulators: vectorisable without reassociation
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> block_sums(size_t(blocks), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const float* p = x + b * kBlock;
    const int64_t count = std::min(kBlock, n - b * kBlock);
    double lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= count; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) lanes[j] += double(p[i + j]) * double(p[i + j]);
    }
    for (int j = 0; i < count; ++i, ++j) lanes[j] += double(p[i]) * double(p[i]);
    double total = 0.0;
    for (double lane : lanes) total += lane;
    block_sums[size_t(b)] = total;
  }
  double total = 0.0;
  for (double s : block_sums) total += s;
  return total;
}

int64_t count_zeros(const float* x, int64_t n) {
  int64_t zeros = 0;
#pragma omp parallel for reduction(+ : zeros) schedule(static)
  for (int64_t i = 0; i < n; ++i) zeros += x[i] == 0.0f;
  return zeros;
}

}  // namespace moe::optim

// The elementwise optimizer kernels against double-precision references on awkward sizes, and
// their determinism: vector lanes and scalar tails agree bitwise, sums ignore the thread count.
#include "optim/update_kernels.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "reference_adam.h"
#include "support/testing.h"

namespace moe::optim {
namespace {

std::vector<float> values(int64_t n, uint64_t seed, float low, float high) {
  return moe::testing::random_uniform({n}, seed, low, high).to_floats();
}

TEST(AdamKernel, MatchesDoubleReferenceOnAwkwardSizes) {
  AdamStep h;
  h.lr = 0.003;
  h.beta1 = 0.85;
  h.beta2 = 0.97;
  h.eps = 1e-7;
  h.weight_decay = 0.2;
  h.step = 5;
  for (int64_t n : {0, 1, 5, 17, 129}) {
    std::vector<float> p = values(n, 1, -1, 1), g = values(n, 2, -2, 2), m = values(n, 3, -1, 1),
                       v = values(n, 4, 0, 1);
    std::vector<float> p0 = p, m0 = m, v0 = v;
    adam_update(p.data(), g.data(), m.data(), v.data(), n, h);
    for (int64_t i = 0; i < n; ++i) {
      double ep = p0[i], em = m0[i], ev = v0[i];
      moe::testing::reference_adamw(ep, em, ev, g[i], h);
      EXPECT_NEAR(m[i], em, 1e-6 * std::abs(em) + 1e-7) << "n " << n << " i " << i;
      EXPECT_NEAR(v[i], ev, 1e-6 * std::abs(ev) + 1e-7) << "n " << n << " i " << i;
      EXPECT_NEAR(p[i], ep, 1e-6 * std::abs(ep) + 1e-7) << "n " << n << " i " << i;
    }
  }
}

TEST(AdamKernel, VectorLanesAndScalarTailAgreeBitwise) {
  const int64_t n = 19;  // two 8-wide vectors and a tail of 3
  std::vector<float> p(n, 0.37f), g(n, -1.3f), m(n, 0.02f), v(n, 0.5f);
  AdamStep h;
  h.lr = 0.01;
  h.weight_decay = 0.1;
  h.step = 2;
  adam_update(p.data(), g.data(), m.data(), v.data(), n, h);
  for (int64_t i = 1; i < n; ++i) {
    EXPECT_EQ(std::memcmp(&p[i], &p[0], sizeof(float)), 0) << i;
    EXPECT_EQ(std::memcmp(&v[i], &v[0], sizeof(float)), 0) << i;
  }
}

TEST(SgdKernel, MatchesTorchSgdWithMomentum) {
  for (int64_t n : {1, 5, 17}) {
    std::vector<float> p = values(n, 5, -1, 1), g = values(n, 6, -1, 1), buf = values(n, 7, -1, 1);
    std::vector<float> p0 = p, b0 = buf;
    SgdStep h{0.1, 0.9, 0.01, false};
    sgd_update(p.data(), g.data(), buf.data(), n, h);
    for (int64_t i = 0; i < n; ++i) {
      double d = g[i] + 0.01 * p0[i];
      double b = 0.9 * b0[i] + d;
      EXPECT_NEAR(buf[i], b, 1e-6);
      EXPECT_NEAR(p[i], p0[i] - 0.1 * b, 1e-6);
    }
  }
}

TEST(SumOfSquares, MatchesDoubleSumAndIgnoresThreadCount) {
  for (int64_t n : {0, 1, 5, 17, 129, 40000}) {
    std::vector<float> x = values(n, 8, -3, 3);
    double expected = 0;
    for (float value : x) expected += double(value) * value;
    omp_set_num_threads(1);
    double one = sum_of_squares(x.data(), n);
    omp_set_num_threads(2);
    double two = sum_of_squares(x.data(), n);
    EXPECT_NEAR(one, expected, 1e-12 * expected) << n;
    EXPECT_EQ(std::memcmp(&one, &two, sizeof(double)), 0) << n;
  }
  std::vector<float> x(9, 1.0f);
  x[8] = std::nanf("");
  EXPECT_TRUE(std::isnan(sum_of_squares(x.data(), 9)));
  x[8] = 0.0f;
  EXPECT_EQ(count_zeros(x.data(), 9), 1);
}

}  // namespace
}  // namespace moe::optim

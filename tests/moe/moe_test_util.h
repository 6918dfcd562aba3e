// Shared helpers of the MoE tests: small configs, an fp64 finite-difference gradient check,
// and a scalar objective <output, weights>.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>

#include "moe/moe/config.h"
#include "moe/tensor/tensor.h"
#include "support/testing.h"

namespace moe::testing {

// A named change to a config, for tests that loop over settings.
struct ConfigVariant {
  std::string name;
  std::function<void(MoEConfig&)> change;
};

inline MoEConfig small_config(int64_t hidden = 6, int64_t experts = 4, int64_t topk = 2,
                              int64_t ffn = 5) {
  MoEConfig config;
  config.hidden_size = hidden;
  config.num_experts = experts;
  config.moe_router_topk = topk;
  config.ffn_hidden_size = ffn;
  return config;
}

// sum_i a_i * b_i in double (any floating dtypes, same element count).
inline double dot(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  double total = 0.0;
  Tensor a64 = a.to(DType::F64), b64 = b.to(DType::F64);
  for (int64_t i = 0; i < a.numel(); ++i) total += a64.data<double>()[i] * b64.data<double>()[i];
  return total;
}

// Central differences of `objective` with respect to each element of `variable` (an F64 tensor
// the objective reads), compared with `analytic` (same element count, any dtype): passes when
// |fd - analytic| <= atol + rtol * |fd| everywhere. Checks at most max_checks elements spread
// over the tensor. `what` names the variable in failure messages.
inline void expect_gradient_matches(const std::function<double()>& objective, Tensor variable,
                                    const Tensor& analytic, const std::string& what,
                                    double atol = 1e-6, double rtol = 1e-4, double step = 1e-6,
                                    int64_t max_checks = 60) {
  ASSERT_EQ(variable.dtype(), DType::F64) << what;
  ASSERT_EQ(variable.numel(), analytic.numel()) << what;
  int64_t n = variable.numel();
  int64_t stride = n <= max_checks ? 1 : (n + max_checks - 1) / max_checks;
  double* values = variable.data<double>();
  int64_t checked = 0;
  for (int64_t i = 0; i < n; i += stride) {
    double saved = values[i];
    values[i] = saved + step;
    double plus = objective();
    values[i] = saved - step;
    double minus = objective();
    values[i] = saved;
    double numeric = (plus - minus) / (2 * step);
    double exact = double(analytic.get(i));
    EXPECT_NEAR(exact, numeric, atol + rtol * std::abs(numeric))
        << what << " element " << i << " of " << shape_string(variable.shape());
    ++checked;
  }
  EXPECT_GT(checked, 0) << what;
}

}  // namespace moe::testing

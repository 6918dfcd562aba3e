// Shared helpers of the MoE tests: small configs, the finite-difference settings, and a scalar
// objective <output, weights>.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <utility>

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

// check_gradient with the MoE tests' settings, for fp64 variables: a step small enough that no
// routing decision flips, every element of small tensors (a sample of kMinimumGradientSamples of
// larger ones), each within 1e-8 + 1e-4 x its own finite difference. At h = 1e-6 the truncation
// h^2 / 6 |f'''| is ~1e-13 and the rounding k eps |f| / h = 2.2e-10 k |f| stays below 1e-8 for
// these small layers' probe objectives (k |f| < 40); rtol covers the pieces rounded through fp32.
inline ::testing::AssertionResult check_moe_gradient(Tensor values, const Tensor& grad,
                                                     const std::function<double()>& objective,
                                                     const std::string& what) {
  return check_gradient(std::move(values), grad, objective, what, kMinimumGradientSamples,
                        /*rtol=*/1e-4, /*atol=*/1e-8, /*step=*/1e-6);
}

}  // namespace moe::testing

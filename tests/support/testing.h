// Helpers shared by every test: tensor comparison that reports the worst element, and seeded
// random tensors.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>

#include "moe/tensor/rng.h"
#include "moe/tensor/tensor.h"

namespace moe::testing {

// Passes when |actual - expected| <= atol + rtol * |expected| everywhere (shapes must match).
// On failure the message names the worst element: its index, both values and the error.
::testing::AssertionResult tensors_close(const Tensor& actual, const Tensor& expected, double atol,
                                         double rtol);

// A tensor of the given shape and dtype filled with N(0, std) (or U[low, high)) from `seed`.
Tensor random_normal(const Shape& shape, uint64_t seed, float std = 1.0f, DType dtype = DType::F32);
Tensor random_uniform(const Shape& shape, uint64_t seed, float low, float high,
                      DType dtype = DType::F32);

}  // namespace moe::testing

#define EXPECT_TENSORS_CLOSE(actual, expected, atol, rtol) \
  EXPECT_TRUE(::moe::testing::tensors_close((actual), (expected), (atol), (rtol)))
#define ASSERT_TENSORS_CLOSE(actual, expected, atol, rtol) \
  ASSERT_TRUE(::moe::testing::tensors_close((actual), (expected), (atol), (rtol)))

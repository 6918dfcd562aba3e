// The shared helpers must be able to fail: each is run on input that should pass and on input
// that should fail, and the failure text is checked.
#include "support/testing.h"

#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

namespace moe::testing {
namespace {

TEST(ErrorText, ReturnsTheMessageOrSaysNone) {
  EXPECT_EQ(error_text([] { throw Error("bad flag --x"); }), "bad flag --x");
  EXPECT_EQ(error_text([] {}), "(no error)");
}

TEST(ContainsAll, NamesTheMissingPart) {
  EXPECT_TRUE(contains_all("rank 3 of 4 timed out", {"rank 3", "timed out"}));
  ::testing::AssertionResult missing = contains_all("rank 3 of 4", {"rank 3", "rank 5"});
  EXPECT_FALSE(missing);
  EXPECT_EQ(std::string(missing.message()), "missing: rank 5\nin: rank 3 of 4");
}

TEST(ExpectErrorContaining, FailsOnAWrongMessageOrNoError) {
  expect_error_containing([] { throw Error("shape [2, 3] vs [3, 2]"); }, {"[2, 3]", "[3, 2]"});
  EXPECT_NONFATAL_FAILURE(expect_error_containing([] { throw Error("other"); }, "shape"),
                          "missing: shape\nin: other");
  EXPECT_NONFATAL_FAILURE(expect_error_containing([] {}, "shape"), "in: (no error)");
}

// objective = sum x_i^2 * (i + 1); d/dx_i = 2 (i + 1) x_i.
struct Quadratic {
  Tensor x;
  explicit Quadratic(DType dtype) : x(random_uniform({7}, 5, 0.5f, 2.0f, dtype)) {}
  double operator()() const {
    double total = 0;
    for (int64_t i = 0; i < x.numel(); ++i)
      total += double(i + 1) * value_at(x, i) * value_at(x, i);
    return total;
  }
  Tensor gradient() const {
    Tensor g({x.numel()}, DType::F64);
    for (int64_t i = 0; i < x.numel(); ++i)
      g.data<double>()[i] = 2.0 * double(i + 1) * value_at(x, i);
    return g;
  }
};

TEST(CheckGradient, PassesTheTrueGradientAndRestoresTheValues) {
  for (DType dtype : {DType::F64, DType::F32}) {
    Quadratic f(dtype);
    Tensor before = f.x.clone();
    EXPECT_TRUE(check_gradient(
        f.x, f.gradient(), [&] { return f(); }, "x", 7, 1e-3));
    EXPECT_TRUE(same_bytes(f.x, before)) << dtype_name(dtype);
  }
}

TEST(CheckGradient, NamesTheWrongElement) {
  Quadratic f(DType::F64);
  Tensor wrong = f.gradient();
  wrong.data<double>()[4] += 0.5;
  ::testing::AssertionResult result = check_gradient(
      f.x, wrong, [&] { return f(); }, "x", 7);
  EXPECT_FALSE(result);
  EXPECT_TRUE(contains_all(result.message(), {"x[4]: analytic"})) << result.message();
}

TEST(ScratchDirectory, FreshPerObjectAndRemovedAfter) {
  std::filesystem::path first, second;
  {
    ScratchDir a("support"), b("support");
    first = a.path;
    second = b.path;
    EXPECT_NE(first, second);
    EXPECT_TRUE(std::filesystem::is_directory(first));
    const std::string bytes("a\0b\n", 4);
    write_bytes(a.file("f.bin"), bytes);
    EXPECT_EQ(read_bytes(a.file("f.bin")), bytes);
    EXPECT_EQ(read_bytes(a.file("absent")), "");
  }
  EXPECT_FALSE(std::filesystem::exists(first));
  EXPECT_FALSE(std::filesystem::exists(second));
}

TEST(SameBytes, ComparesDtypeShapeAndBytesAndNamesTheFirstDifference) {
  Tensor a = Tensor::from_floats({1, 2, 3, 4, 5, 6}, {2, 3});
  EXPECT_TRUE(same_bytes(a, a.clone()));
  EXPECT_EQ(std::string(same_bytes(a, a.reshape({3, 2})).message()), "fp32 [2, 3] vs fp32 [3, 2]");
  EXPECT_FALSE(same_bytes(a, a.to(DType::F64)));
  Tensor b = a.clone();
  b.set(4, 7.5f);
  EXPECT_EQ(std::string(same_bytes(a, b).message()), "element 4 differs: 5 vs 7.5");
  Tensor zero = Tensor::from_floats({0.0f}, {1}), negative_zero = Tensor::from_floats({-0.0f}, {1});
  EXPECT_EQ(std::string(same_bytes(zero, negative_zero).message()),
            "element 0 differs: 0 vs -0 (signed zeros)");
}

TEST(TensorsClose, ReportsTheWorstElement) {
  Tensor a = Tensor::from_floats({1, 2, 3}, {3});
  Tensor b = Tensor::from_floats({1, 2, 3.5f}, {3});
  EXPECT_TRUE(tensors_close(a, a, 0, 0));
  ::testing::AssertionResult result = tensors_close(a, b, 1e-3, 0);
  EXPECT_FALSE(result);
  EXPECT_TRUE(contains_all(result.message(), {"1 of 3 elements differ", "worst at index [2]"}))
      << result.message();
}

}  // namespace
}  // namespace moe::testing

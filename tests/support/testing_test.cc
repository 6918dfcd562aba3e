// The shared helpers must be able to fail: each is run on input that should pass and on input
// that should fail, and the failure text is checked.
#include "support/testing.h"

#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <numeric>
#include <string>
#include <vector>

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

// objective = 1000 x_0^2 + 0.001 x_1^2: the gradient's second element (~2e-3) is 10^6 times
// smaller than its first. Zeroing it is a 100 % error that the former rule, atol + rtol *
// max(|fd|, largest |grad|), allowed (1e-6 + 1e-4 * ~2000 = ~0.2); each element against its own
// magnitude catches it.
TEST(CheckGradient, CatchesAWrongSmallElementBesideALargeOne) {
  Tensor x = Tensor::from_floats({1.25f, 0.75f}, {2}, DType::F64);
  auto objective = [&] {
    const double* p = x.data<double>();
    return 1000 * p[0] * p[0] + 0.001 * p[1] * p[1];
  };
  Tensor wrong = Tensor::from_floats({2500.0f, 0.0f}, {2}, DType::F64);
  const double true_small = 0.002 * 0.75, former_allowed = 1e-6 + 1e-4 * 2500;
  ASSERT_LT(true_small, former_allowed);  // the former rule passed this gradient
  ::testing::AssertionResult result = check_gradient(x, wrong, objective, "x");
  EXPECT_FALSE(result);
  EXPECT_TRUE(contains_all(result.message(), {"x[1]: analytic 0", "finite difference 0.00149999"}))
      << result.message();
  Tensor right = wrong.clone();
  right.data<double>()[1] = true_small;
  EXPECT_TRUE(check_gradient(x, right, objective, "x"));
}

// Up to kMinimumGradientSamples elements all are checked; beyond, a sample of that many (or of
// `samples` when larger) that holds the smallest-magnitude quarter and the largest.
TEST(CheckGradient, SamplesLargeTensorsIncludingTheSmallestAndLargestElements) {
  Tensor small = random_normal({kMinimumGradientSamples}, 3, 1.0f, DType::F64);
  EXPECT_EQ(gradient_check_elements(small, 5).size(), size_t(kMinimumGradientSamples));
  Tensor grad = random_normal({1000}, 4, 1.0f, DType::F64);
  for (int samples : {5, 64, 100}) {
    std::vector<int64_t> chosen = gradient_check_elements(grad, samples);
    const size_t count = size_t(std::max(samples, kMinimumGradientSamples));
    ASSERT_EQ(chosen.size(), count);
    EXPECT_TRUE(std::is_sorted(chosen.begin(), chosen.end()));
    EXPECT_EQ(std::adjacent_find(chosen.begin(), chosen.end()), chosen.end()) << "a repeat";
    std::vector<int64_t> by_magnitude(1000);
    std::iota(by_magnitude.begin(), by_magnitude.end(), int64_t(0));
    std::stable_sort(by_magnitude.begin(), by_magnitude.end(), [&](int64_t a, int64_t b) {
      return std::fabs(value_at(grad, a)) < std::fabs(value_at(grad, b));
    });
    for (size_t rank = 0; rank < count / 4; ++rank) {
      EXPECT_TRUE(std::binary_search(chosen.begin(), chosen.end(), by_magnitude[rank])) << rank;
    }
    EXPECT_TRUE(std::binary_search(chosen.begin(), chosen.end(), by_magnitude.back()));
  }
  // The sampled check still fails on the smallest element when only it is wrong.
  Tensor x = random_uniform({1000}, 6, 0.5f, 2.0f, DType::F64);
  auto objective = [&] {
    double total = 0;
    for (int64_t i = 0; i < 1000; ++i) total += double(i + 1) * value_at(x, i) * value_at(x, i);
    return total;
  };
  Tensor exact({1000}, DType::F64);
  for (int64_t i = 0; i < 1000; ++i) exact.data<double>()[i] = 2.0 * double(i + 1) * value_at(x, i);
  EXPECT_TRUE(check_gradient(x, exact, objective, "x"));
  Tensor wrong = exact.clone();
  wrong.data<double>()[0] *= 2;  // the smallest: 2 * 1 * x_0 <= 4, the others grow with i
  EXPECT_FALSE(check_gradient(x, wrong, objective, "x"));
}

// Runs MOE_REQUIRE_PYTHON_PACKAGE(package) with MOE_ALLOW_MISSING_REFERENCES set to `opt_out`
// (unset: nullptr) and records in `outcome` what it reported, without failing or skipping this
// test.
struct RequireOutcome {
  bool went_on = false;
  ::testing::TestPartResultArray reports;
};
void require_package(const char* package, bool& went_on) {
  MOE_REQUIRE_PYTHON_PACKAGE(package);
  went_on = true;
}
void run_require(const char* package, const char* opt_out, RequireOutcome& outcome) {
  const char* before = std::getenv("MOE_ALLOW_MISSING_REFERENCES");
  const std::string saved = before ? before : "";
  if (opt_out) {
    ::setenv("MOE_ALLOW_MISSING_REFERENCES", opt_out, 1);
  } else {
    ::unsetenv("MOE_ALLOW_MISSING_REFERENCES");
  }
  {
    ::testing::ScopedFakeTestPartResultReporter intercept(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD,
        &outcome.reports);
    require_package(package, outcome.went_on);
  }
  if (before) {
    ::setenv("MOE_ALLOW_MISSING_REFERENCES", saved.c_str(), 1);
  } else {
    ::unsetenv("MOE_ALLOW_MISSING_REFERENCES");
  }
}

// A reference check whose package is missing fails by name and says how to install it; only
// MOE_ALLOW_MISSING_REFERENCES=1 turns that into a skip, which says so.
TEST(RequirePythonPackage, MissingPackageFailsUnlessTheOptOutIsSet) {
  const char* missing = "moe_no_such_package";
  EXPECT_CONTAINS(missing_python_package(missing), "'moe_no_such_package'",
                  "apt-get install python3-moe_no_such_package", "MOE_ALLOW_MISSING_REFERENCES=1");
  for (const char* opt_out : {static_cast<const char*>(nullptr), "0", "yes"}) {
    RequireOutcome failed;
    run_require(missing, opt_out, failed);
    EXPECT_FALSE(failed.went_on);
    ASSERT_EQ(failed.reports.size(), 1);
    EXPECT_TRUE(failed.reports.GetTestPartResult(0).fatally_failed());
    EXPECT_CONTAINS(failed.reports.GetTestPartResult(0).message(), "python3-moe_no_such_package");
  }
  RequireOutcome skipped;
  run_require(missing, "1", skipped);
  EXPECT_FALSE(skipped.went_on);
  ASSERT_EQ(skipped.reports.size(), 1);
  EXPECT_TRUE(skipped.reports.GetTestPartResult(0).skipped());
  EXPECT_CONTAINS(skipped.reports.GetTestPartResult(0).message(), "'moe_no_such_package'",
                  "skipped: MOE_ALLOW_MISSING_REFERENCES=1");
  // A package that is there (the standard library's json) lets the check go on silently.
  EXPECT_EQ(missing_python_package("json"), "");
  RequireOutcome present;
  run_require("json", nullptr, present);
  EXPECT_TRUE(present.went_on);
  EXPECT_EQ(present.reports.size(), 0);
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

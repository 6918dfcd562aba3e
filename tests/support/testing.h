// Helpers shared by every test: tensor comparison that reports the worst element, seeded random
// tensors, error-text checks, finite-difference gradient checks and scratch directories.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <source_location>
#include <string>
#include <string_view>
#include <vector>

#include "moe/tensor/error.h"
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

// Passes when a and b have the same dtype, shape and bytes; the failure names the first element
// that differs and both values (noting signed zeros and differing NaN payloads).
::testing::AssertionResult same_bytes(const Tensor& a, const Tensor& b);

// Element i of a floating tensor as a double (exact for fp64 and for fp32/bf16/fp16).
double value_at(const Tensor& tensor, int64_t i);

// The message of the moe::Error that `body` throws, or "(no error)" when it throws none.
template <class Body>
std::string error_text(Body&& body) {
  try {
    body();
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

// Passes when `text` contains every one of `parts`; the failure names the missing part.
::testing::AssertionResult contains_all(std::string_view text,
                                        std::initializer_list<std::string_view> parts);

// Fails, at the caller's line, unless `body` throws a moe::Error whose message contains every one
// of `parts` (or `part`).
void expect_error_containing(const std::function<void()>& body,
                             std::initializer_list<std::string_view> parts,
                             std::source_location caller = std::source_location::current());
void expect_error_containing(const std::function<void()>& body, std::string_view part,
                             std::source_location caller = std::source_location::current());

// Power-of-two step: values drawn as fp32 numbers in [0.5, 2) stay exact when perturbed, so
// kernels that widen to fp32 see the same perturbation as fp64 ones.
constexpr double kFiniteDifferenceStep = 1.0 / 16384.0;

// The finite-difference error floor (default atol of check_gradient). For an fp64 objective f
// and step h the central difference (f(x+h) - f(x-h)) / 2h differs from f'(x) by
//   truncation  h^2 / 6 * |f'''|   (the Taylor remainder of the two evaluations), and
//   rounding    k * eps * |f| / h  (each evaluation carries ~k * eps * |f| of rounding from its
//                                   k-term sums; eps = 2^-52 = 2.2e-16).
// At h = kFiniteDifferenceStep = 2^-14 these are 6.2e-10 * |f'''| and 3.6e-12 * k * |f|: for the
// tests' objectives (losses and probe dot products with |f'''| <= 10 and k * |f| <= 10^3) at most
// 6.2e-9 + 3.6e-9 < 1e-8. A call whose objective is larger, more curved, or whose analytic
// gradient is rounded through fp32 states its own atol beside the number.
constexpr double kFiniteDifferenceAtol = 1e-8;

// Tensors up to this many elements are checked at every element; larger ones at a sample of
// max(samples, this) elements (see check_gradient).
constexpr int kMinimumGradientSamples = 64;

// The elements check_gradient compares for a gradient tensor: every element when it has at most
// max(samples, kMinimumGradientSamples); otherwise that many: the quarter with the smallest
// |grad| (where a wrong small element would hide), the 4 with the largest, and the rest drawn
// uniformly without replacement from the others with a fixed seed. Sorted by index.
std::vector<int64_t> gradient_check_elements(const Tensor& grad, int samples);

// Compares `grad`, the analytic gradient of `objective` with respect to `values` (an fp64 or fp32
// tensor that objective reads; perturbed in place and restored), with central differences fd at
// the elements gradient_check_elements chooses. Each element must agree within its own
// magnitude: |grad - fd| <= atol + rtol * |fd|, so a small element cannot hide behind a large
// one; the failure names `what`, the element and both values.
::testing::AssertionResult check_gradient(Tensor values, const Tensor& grad,
                                          const std::function<double()>& objective,
                                          const std::string& what,
                                          int samples = kMinimumGradientSamples, double rtol = 1e-4,
                                          double atol = kFiniteDifferenceAtol,
                                          double step = kFiniteDifferenceStep);

// The reference checks (PyTorch and numpy re-implementations) run Debian's /usr/bin/python3, and
// scripts/setup.sh installs python3-numpy and python3-torch for them. missing_python_package
// gives "" when /usr/bin/python3 imports `package` (asked once per package), else a message naming
// it and how to install it. Use MOE_REQUIRE_PYTHON_PACKAGE rather than calling it directly.
std::string missing_python_package(const std::string& package);

// Whether the environment sets MOE_ALLOW_MISSING_REFERENCES=1: the opt-out for machines that
// cannot install the reference packages, under which their checks skip instead of failing.
bool missing_references_allowed();

// A fresh directory under the system temp dir, emptied first and removed with its contents when
// the object goes: moe_<tag>_<pid>_<n>, n counting this process's scratch directories so two
// alive at once never share one. MPI tests whose ranks share a directory use the second form:
// every rank passes the same `shared_id` (e.g. rank 0's pid) and only the `owner` rank creates
// and removes it; they put a barrier after construction and before destruction.
struct ScratchDir {
  explicit ScratchDir(const std::string& tag);
  ScratchDir(const std::string& tag, int64_t shared_id, bool owner);
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  std::string str() const { return path.string(); }
  std::string file(const std::string& name) const { return (path / name).string(); }

  std::filesystem::path path;
  bool owner = true;
};

// A whole file's bytes ("" when it cannot be read), and a file replaced by `bytes`.
std::string read_bytes(const std::filesystem::path& path);
void write_bytes(const std::filesystem::path& path, std::string_view bytes);

}  // namespace moe::testing

// MOE_REQUIRE_PYTHON_PACKAGE("torch"): a reference check whose package /usr/bin/python3 cannot
// import FAILS, naming the package and how to install it; with MOE_ALLOW_MISSING_REFERENCES=1 it
// is skipped instead, and the skip says so. Returns from the calling function when missing.
#define MOE_REQUIRE_PYTHON_PACKAGE(package)                                                  \
  do {                                                                                       \
    const std::string moe_missing_package = ::moe::testing::missing_python_package(package); \
    if (moe_missing_package.empty()) break;                                                  \
    if (::moe::testing::missing_references_allowed()) {                                      \
      GTEST_SKIP() << moe_missing_package << " (skipped: MOE_ALLOW_MISSING_REFERENCES=1)";   \
    }                                                                                        \
    GTEST_FAIL() << moe_missing_package;                                                     \
  } while (false)

// EXPECT_CONTAINS(text, part, ...): text contains every part.
#define EXPECT_CONTAINS(text, ...) EXPECT_TRUE(::moe::testing::contains_all((text), {__VA_ARGS__}))

#define EXPECT_TENSORS_CLOSE(actual, expected, atol, rtol) \
  EXPECT_TRUE(::moe::testing::tensors_close((actual), (expected), (atol), (rtol)))
#define ASSERT_TENSORS_CLOSE(actual, expected, atol, rtol) \
  ASSERT_TRUE(::moe::testing::tensors_close((actual), (expected), (atol), (rtol)))

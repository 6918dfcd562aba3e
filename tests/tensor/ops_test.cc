// Kernel harness for moe/tensor/ops.h: every fast kernel against its moe::reference twin on
// random data, for each dtype and each awkward row count, with odd widths (and one width large
// enough to take the OpenMP path); finite-difference checks of every backward pair in fp64, which
// verify the references themselves; bad inputs and the text of their errors.
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "moe/tensor/ops.h"
#include "support/kernel_harness.h"
#include "support/testing.h"

namespace moe {
namespace {

using testing::check_gradient;
using testing::elementwise_tolerance;
using testing::error_text;
using testing::random_normal;
using testing::tensors_close;

// Widths: one column, odd, odd and past a vector width, and large enough that 129 rows exceed the
// element counts above which the kernels go parallel.
const std::vector<int64_t> kWidths = {1, 7, 131, 523};

class OpsHarness : public ::testing::TestWithParam<std::tuple<DType, int64_t>> {
 protected:
  DType dtype() const { return std::get<0>(GetParam()); }
  int64_t rows() const { return std::get<1>(GetParam()); }
  uint64_t seed(int64_t width, uint64_t salt) const {
    return uint64_t(rows() * 100003 + width * 31 + int64_t(dtype()) * 7 + int64_t(salt));
  }
  Tensor input(const Shape& shape, uint64_t seed, float std = 1.5f) const {
    return random_normal(shape, seed, std, dtype());
  }
  // Compares in the given output dtype's tolerance; `what` names the kernel and the shape.
  static void expect_close(const Tensor& fast, const Tensor& expected, DType output,
                           const std::string& what) {
    testing::Tolerance tol = elementwise_tolerance(output);
    EXPECT_TRUE(tensors_close(fast, expected, tol.atol, tol.rtol))
        << what << " " << shape_string(fast.shape()) << " " << dtype_name(output);
  }
};

using UnaryKernel = void (*)(const Tensor&, Tensor&);
using UnaryBackward = void (*)(const Tensor&, const Tensor&, Tensor&);

TEST_P(OpsHarness, ActivationsAndBackwardMatchReference) {
  struct Case {
    const char* name;
    UnaryKernel fast, expected;
    UnaryBackward fast_backward, expected_backward;
  };
  const Case cases[] = {
      {"silu", silu, reference::silu, silu_backward, reference::silu_backward},
      {"gelu", gelu, reference::gelu, gelu_backward, reference::gelu_backward},
  };
  for (int64_t width : kWidths) {
    Tensor x = input({rows(), width}, seed(width, 1));
    Tensor dy = input({rows(), width}, seed(width, 2));
    for (const Case& c : cases) {
      Tensor y({rows(), width}, dtype()), y_ref({rows(), width}, dtype());
      c.fast(x, y);
      c.expected(x, y_ref);
      expect_close(y, y_ref, dtype(), c.name);
      Tensor dx({rows(), width}, dtype()), dx_ref({rows(), width}, dtype());
      c.fast_backward(x, dy, dx);
      c.expected_backward(x, dy, dx_ref);
      expect_close(dx, dx_ref, dtype(), std::string(c.name) + "_backward");
    }
  }
}

TEST_P(OpsHarness, SwigluAndBackwardMatchReference) {
  for (int64_t width : kWidths) {
    Tensor x = input({rows(), 2 * width}, seed(width, 3));
    Tensor dy = input({rows(), width}, seed(width, 4));
    Tensor y({rows(), width}, dtype()), y_ref({rows(), width}, dtype());
    swiglu(x, y);
    reference::swiglu(x, y_ref);
    expect_close(y, y_ref, dtype(), "swiglu");
    Tensor dx({rows(), 2 * width}, dtype()), dx_ref({rows(), 2 * width}, dtype());
    swiglu_backward(x, dy, dx);
    reference::swiglu_backward(x, dy, dx_ref);
    expect_close(dx, dx_ref, dtype(), "swiglu_backward");
  }
}

TEST_P(OpsHarness, SoftmaxFamilyMatchesReference) {
  using Forward = void (*)(const Tensor&, Tensor&);
  using Backward = void (*)(const Tensor&, const Tensor&, Tensor&);
  struct Case {
    const char* name;
    Forward fast, expected;
    Backward fast_backward, expected_backward;
  };
  const Case cases[] = {
      {"softmax_rows", softmax_rows, reference::softmax_rows, softmax_rows_backward,
       reference::softmax_rows_backward},
      {"log_softmax_rows", log_softmax_rows, reference::log_softmax_rows, log_softmax_rows_backward,
       reference::log_softmax_rows_backward},
  };
  for (int64_t width : {int64_t(1), int64_t(7), int64_t(131)}) {  // the reference is O(width^2)
    Tensor x = input({rows(), width}, seed(width, 5), 3.0f);
    Tensor dy = input({rows(), width}, seed(width, 6));
    for (const Case& c : cases) {
      // The forward may write fp32 or the input dtype.
      for (DType output : {DType::F32, dtype()}) {
        Tensor y({rows(), width}, output), y_ref({rows(), width}, output);
        c.fast(x, y);
        c.expected(x, y_ref);
        expect_close(y, y_ref, output, c.name);
      }
      Tensor y({rows(), width}, dtype());
      c.expected(x, y);
      Tensor dx({rows(), width}, dtype()), dx_ref({rows(), width}, dtype());
      c.fast_backward(y, dy, dx);
      c.expected_backward(y, dy, dx_ref);
      expect_close(dx, dx_ref, dtype(), std::string(c.name) + "_backward");
    }
  }
}

TEST_P(OpsHarness, RmsnormAndBackwardMatchReference) {
  const float eps = 1e-5f;
  for (int64_t width : kWidths) {
    Tensor x = input({rows(), width}, seed(width, 7));
    Tensor weight = random_normal({width}, seed(width, 8), 0.5f, dtype());
    Tensor dy = input({rows(), width}, seed(width, 9));
    Tensor y({rows(), width}, dtype()), y_ref({rows(), width}, dtype());
    Tensor inv_rms({rows()}), inv_rms_ref({rows()});
    rmsnorm(x, weight, eps, y, inv_rms);
    reference::rmsnorm(x, weight, eps, y_ref, inv_rms_ref);
    expect_close(y, y_ref, dtype(), "rmsnorm");
    expect_close(inv_rms, inv_rms_ref, DType::F32, "rmsnorm inv_rms");
    // dweight accumulates: both start from the same non-zero values.
    Tensor dweight = random_normal({width}, seed(width, 10));
    Tensor dweight_ref = dweight.clone();
    Tensor dx({rows(), width}, dtype()), dx_ref({rows(), width}, dtype());
    rmsnorm_backward(x, weight, inv_rms, dy, dx, dweight);
    reference::rmsnorm_backward(x, weight, inv_rms, dy, dx_ref, dweight_ref);
    expect_close(dx, dx_ref, dtype(), "rmsnorm_backward dx");
    testing::Tolerance tol = elementwise_tolerance(DType::F32);
    EXPECT_TRUE(tensors_close(dweight, dweight_ref, tol.atol * double(rows() + 1), tol.rtol))
        << "rmsnorm_backward dweight, width " << width;
  }
}

TEST_P(OpsHarness, BlasLikeOpsMatchReference) {
  for (int64_t width : kWidths) {
    Tensor a = input({rows(), width}, seed(width, 11));
    Tensor b = input({rows(), width}, seed(width, 12));
    Tensor out({rows(), width}, dtype()), out_ref({rows(), width}, dtype());
    add(a, b, out);
    reference::add(a, b, out_ref);
    expect_close(out, out_ref, dtype(), "add");
    Tensor aliased = a.clone();
    add(aliased, b, aliased);  // out may alias an input
    expect_close(aliased, out_ref, dtype(), "add (aliased)");

    Tensor scaled = a.clone(), scaled_ref = a.clone();
    scale(scaled, -0.37f);
    reference::scale(scaled_ref, -0.37f);
    expect_close(scaled, scaled_ref, dtype(), "scale");

    Tensor y = b.clone(), y_ref = b.clone();
    axpy(1.75f, a, y);
    reference::axpy(1.75f, a, y_ref);
    expect_close(y, y_ref, dtype(), "axpy");

    double total = sum(a), total_ref = reference::sum(a);
    EXPECT_NEAR(total, total_ref, 1e-12 * double(a.numel() + 1)) << "sum, width " << width;
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, OpsHarness,
                         ::testing::Combine(::testing::ValuesIn(testing::kHarnessDtypes),
                                            ::testing::ValuesIn(testing::kHarnessRows)),
                         [](const ::testing::TestParamInfo<OpsHarness::ParamType>& info) {
                           return testing::dtype_label(std::get<0>(info.param)) + "_rows" +
                                  std::to_string(std::get<1>(info.param));
                         });

// ---- Finite differences in fp64: d/dx of loss(x) = sum(forward(x) * upstream). ----

double weighted_loss(const Tensor& y, const Tensor& upstream) {
  double total = 0;
  for (int64_t i = 0; i < y.numel(); ++i) total += y.data<double>()[i] * upstream.data<double>()[i];
  return total;
}

// Gradients must match differences to ~1e-7 (step^2 truncation plus rounding / step).
constexpr double kFiniteDifferenceTolerance = 1e-6;
constexpr double kStep = 1e-6;

// check_gradient's sample count that visits every element of `values`.
int every_element(const Tensor& values) {
  return int(values.numel());
}

Tensor fp64(const Shape& shape, uint64_t seed, float std = 1.0f) {
  return random_normal(shape, seed, std, DType::F64);
}

// The fp32 sigmoid runs on its own vectorisable exponential (ops.cc). Over a sweep of the range
// where the sigmoid changes, at the ends of that exponential's domain, and at zeros, infinities
// and NaN, silu, swiglu and their backward stay within a few ulp of the fp64 reference (much
// tighter than the harness's fp32 tolerance), and NaN stays NaN.
TEST(SigmoidKernels, Fp32StaysWithinAFewUlpOverTheWholeRange) {
  std::vector<float> values;
  constexpr int kSteps = 40000;
  for (int i = 0; i <= kSteps; ++i) values.push_back(-110.0f + 220.0f * float(i) / float(kSteps));
  for (float edge : {-88.7229f, -88.72283935546875f, -88.72283172607421875f, -86.0001f, -86.0f,
                     -85.9999f, 86.0f, 88.72283172607421875f, 88.72283935546875f, 88.7229f, 1e-30f,
                     -1e-30f, 0.0f, -0.0f, INFINITY, -INFINITY, NAN}) {
    values.push_back(edge);
  }
  const int64_t count = int64_t(values.size());
  const Tensor x = Tensor::from_floats(values, {1, count});
  const Tensor dy = Tensor::full({1, count}, 0.75f);
  constexpr double kAtol = 3e-7, kRtol = 1e-6;
  Tensor y({1, count}), y_ref({1, count}), dx({1, count}), dx_ref({1, count});
  silu(x, y);
  reference::silu(x, y_ref);
  EXPECT_TRUE(tensors_close(y, y_ref, kAtol, kRtol)) << "silu";
  silu_backward(x, dy, dx);
  reference::silu_backward(x, dy, dx_ref);
  EXPECT_TRUE(tensors_close(dx, dx_ref, kAtol, kRtol)) << "silu_backward";
  EXPECT_TRUE(std::isnan(y.get(count - 1)));

  // swiglu with the values as gates and 0.75 as every up.
  Tensor gate_up({count, 2});
  for (int64_t i = 0; i < count; ++i) {
    gate_up.set(2 * i, values[size_t(i)]);
    gate_up.set(2 * i + 1, 0.75f);
  }
  Tensor out({count, 1}), out_ref({count, 1});
  swiglu(gate_up, out);
  reference::swiglu(gate_up, out_ref);
  EXPECT_TRUE(tensors_close(out, out_ref, kAtol, kRtol)) << "swiglu";
  Tensor grad({count, 2}), grad_ref({count, 2});
  swiglu_backward(gate_up, dy.reshape({count, 1}), grad);
  reference::swiglu_backward(gate_up, dy.reshape({count, 1}), grad_ref);
  EXPECT_TRUE(tensors_close(grad, grad_ref, kAtol, kRtol)) << "swiglu_backward";
}

TEST(FiniteDifference, ActivationAndSoftmaxBackwardKernels) {
  struct Case {
    const char* name;
    UnaryKernel forward;  // the reference forward
    UnaryBackward fast_backward, reference_backward;
    Shape x_shape, y_shape;
    bool backward_reads_output;  // the softmax family differentiates from y, not x
  };
  const Case cases[] = {
      {"silu", reference::silu, silu_backward, reference::silu_backward, {3, 5}, {3, 5}, false},
      {"gelu", reference::gelu, gelu_backward, reference::gelu_backward, {3, 5}, {3, 5}, false},
      {"swiglu",
       reference::swiglu,
       swiglu_backward,
       reference::swiglu_backward,
       {3, 10},
       {3, 5},
       false},
      {"softmax",
       reference::softmax_rows,
       softmax_rows_backward,
       reference::softmax_rows_backward,
       {4, 6},
       {4, 6},
       true},
      {"log_softmax",
       reference::log_softmax_rows,
       log_softmax_rows_backward,
       reference::log_softmax_rows_backward,
       {4, 6},
       {4, 6},
       true},
  };
  for (const Case& c : cases) {
    Tensor x = fp64(c.x_shape, 21, 2.0f), upstream = fp64(c.y_shape, 22);
    auto forward = [&](const Tensor& in) {
      Tensor y(c.y_shape, DType::F64);
      c.forward(in, y);
      return y;
    };
    Tensor saved = c.backward_reads_output ? forward(x) : x;
    for (UnaryBackward backward : {c.fast_backward, c.reference_backward}) {
      Tensor dx(x.shape(), DType::F64);
      backward(saved, upstream, dx);
      EXPECT_TRUE(check_gradient(
          x, dx, [&] { return weighted_loss(forward(x), upstream); }, c.name, every_element(x),
          /*rtol=*/0, kFiniteDifferenceTolerance, kStep));
    }
  }
}

TEST(FiniteDifference, RmsnormInputAndWeight) {
  const float eps = 1e-3f;
  Tensor x = fp64({3, 7}, 27), weight = fp64({7}, 28), upstream = fp64({3, 7}, 29);
  auto forward = [&](const Tensor& in, const Tensor& gain) {
    Tensor y(in.shape(), DType::F64), inv_rms({in.dim(0)});
    reference::rmsnorm(in, gain, eps, y, inv_rms);
    return y;
  };
  const auto objective = [&] { return weighted_loss(forward(x, weight), upstream); };
  Tensor y(x.shape(), DType::F64), inv_rms({3});
  reference::rmsnorm(x, weight, eps, y, inv_rms);
  for (auto backward : {rmsnorm_backward, reference::rmsnorm_backward}) {
    Tensor dx(x.shape(), DType::F64), dweight({7});
    backward(x, weight, inv_rms, upstream, dx, dweight);
    // inv_rms is saved in fp32, so the analytic gradient carries ~1e-7 relative error.
    EXPECT_TRUE(check_gradient(x, dx, objective, "rmsnorm dx", every_element(x), /*rtol=*/1e-6,
                               /*atol=*/1e-5, kStep));
    EXPECT_TRUE(check_gradient(weight, dweight, objective, "rmsnorm dweight", every_element(weight),
                               /*rtol=*/1e-6, /*atol=*/1e-5, kStep));
  }
}

// ---- Bad inputs: the message names what was wrong. ----

TEST(OpsErrors, MessagesNameTheShapesAndDtypes) {
  Tensor x({2, 3}), y({3, 2});
  EXPECT_EQ(error_text([&] { silu(x, y); }), "silu: shapes differ, [2, 3] vs [3, 2]");
  Tensor odd({2, 5}), half_out({2, 2});
  EXPECT_EQ(error_text([&] { swiglu(odd, half_out); }),
            "swiglu input: last dim must be even (gate | up), got shape [2, 5]");
  EXPECT_EQ(error_text([&] { swiglu_backward(odd, half_out, odd); }),
            "swiglu_backward input: last dim must be even (gate | up), got shape [2, 5]");
  Tensor gate_up({2, 6}), wrong_out({2, 4});
  EXPECT_EQ(error_text([&] { swiglu(gate_up, wrong_out); }),
            "swiglu output: expected shape [2, 3], got [2, 4]");
  Tensor h({4, 8}), weight({5}), inv_rms({4});
  Tensor out({4, 8});
  EXPECT_EQ(error_text([&] { rmsnorm(h, weight, 1e-5f, out, inv_rms); }),
            "rmsnorm weight: expected shape [8], got [5]");
  Tensor in16({2, 3}, DType::F16), out_bf16({2, 3}, DType::BF16);
  EXPECT_EQ(error_text([&] { softmax_rows(in16, out_bf16); }),
            "softmax_rows: output dtype bf16 must be fp32 or the input dtype fp16");
  Tensor ints({2, 3}, DType::I32);
  EXPECT_EQ(error_text([&] { silu(ints, ints); }),
            "silu: dtype int32 is not a floating type (fp32, bf16, fp16, fp64)");
  Tensor a32({2, 3}), b16({2, 3}, DType::F16);
  EXPECT_EQ(error_text([&] { axpy(1.0f, a32, b16); }), "axpy: dtypes differ, fp32 vs fp16");
}

}  // namespace
}  // namespace moe

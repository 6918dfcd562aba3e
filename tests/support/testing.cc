#include "support/testing.h"

#include <cmath>
#include <sstream>

namespace moe::testing {

namespace {
double value_at(const Tensor& t, int64_t i) {
  return t.dtype() == DType::F64 ? t.data<double>()[i] : double(t.get(i));
}
}  // namespace

::testing::AssertionResult tensors_close(const Tensor& actual, const Tensor& expected, double atol,
                                         double rtol) {
  if (actual.shape() != expected.shape()) {
    return ::testing::AssertionFailure() << "shapes differ: actual " << shape_string(actual.shape())
                                         << " vs expected " << shape_string(expected.shape());
  }
  int64_t worst = -1, failures = 0;
  double worst_excess = 0;
  for (int64_t i = 0; i < actual.numel(); ++i) {
    double a = value_at(actual, i), e = value_at(expected, i);
    double allowed = atol + rtol * std::fabs(e);
    double error = std::fabs(a - e);
    bool bad =
        !(error <= allowed) && !(std::isnan(a) && std::isnan(e)) && !(std::isinf(a) && a == e);
    if (bad) {
      ++failures;
      double excess = std::isnan(error) ? INFINITY : error - allowed;
      if (worst < 0 || excess > worst_excess) {
        worst = i;
        worst_excess = excess;
      }
    }
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  std::ostringstream index;
  int64_t rest = worst;
  Shape position(actual.shape().size());
  for (int axis = int(position.size()) - 1; axis >= 0; --axis) {
    int64_t extent = actual.shape()[axis];
    position[axis] = extent ? rest % extent : 0;
    rest = extent ? rest / extent : 0;
  }
  double a = value_at(actual, worst), e = value_at(expected, worst);
  return ::testing::AssertionFailure()
         << failures << " of " << actual.numel() << " elements differ (atol " << atol << ", rtol "
         << rtol << ", shape " << shape_string(actual.shape()) << "); worst at index "
         << shape_string(position) << ": actual " << a << ", expected " << e << ", |error| "
         << std::fabs(a - e);
}

Tensor random_normal(const Shape& shape, uint64_t seed, float std, DType dtype) {
  Tensor tensor(shape, dtype);
  Rng rng(seed);
  if (dtype == DType::F64) {
    double* p = tensor.data<double>();
    for (int64_t i = 0; i < tensor.numel(); ++i) p[i] = double(std) * rng.normal();
  } else {
    rng.fill_normal(tensor, 0.0f, std);
  }
  return tensor;
}

Tensor random_uniform(const Shape& shape, uint64_t seed, float low, float high, DType dtype) {
  Tensor tensor(shape, dtype);
  Rng rng(seed);
  rng.fill_uniform(tensor, low, high);
  return tensor;
}

}  // namespace moe::testing

#include "support/testing.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <numeric>
#include <sstream>

namespace moe::testing {

::testing::AssertionResult same_bytes(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape()) {
    return ::testing::AssertionFailure()
           << dtype_name(a.dtype()) << " " << shape_string(a.shape()) << " vs "
           << dtype_name(b.dtype()) << " " << shape_string(b.shape());
  }
  if (std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0) return ::testing::AssertionSuccess();
  const size_t element = dtype_size(a.dtype());
  const char* a_bytes = static_cast<const char*>(a.raw());
  const char* b_bytes = static_cast<const char*>(b.raw());
  int64_t i = 0;
  while (std::memcmp(a_bytes + size_t(i) * element, b_bytes + size_t(i) * element, element) == 0) {
    ++i;
  }
  const double a_value = value_at(a, i), b_value = value_at(b, i);
  ::testing::AssertionResult failure = ::testing::AssertionFailure();
  failure << "element " << i << " differs: " << a_value << " vs " << b_value;
  if (a_value == 0 && b_value == 0) failure << " (signed zeros)";
  if (std::isnan(a_value) && std::isnan(b_value)) failure << " (NaN payloads differ)";
  return failure;
}

double value_at(const Tensor& tensor, int64_t i) {
  return tensor.dtype() == DType::F64 ? tensor.data<double>()[i] : double(tensor.get(i));
}

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

::testing::AssertionResult contains_all(std::string_view text,
                                        std::initializer_list<std::string_view> parts) {
  for (std::string_view part : parts) {
    if (text.find(part) == std::string_view::npos) {
      return ::testing::AssertionFailure() << "missing: " << part << "\nin: " << text;
    }
  }
  return ::testing::AssertionSuccess();
}

void expect_error_containing(const std::function<void()>& body,
                             std::initializer_list<std::string_view> parts,
                             std::source_location caller) {
  const std::string text = error_text(body);
  ::testing::AssertionResult found = contains_all(text, parts);
  if (!found) ADD_FAILURE_AT(caller.file_name(), int(caller.line())) << found.message();
}

void expect_error_containing(const std::function<void()>& body, std::string_view part,
                             std::source_location caller) {
  expect_error_containing(body, {part}, caller);
}

namespace {
// Writes `value` into element i, rounded to the tensor's dtype.
void set_value(Tensor& tensor, int64_t i, double value) {
  if (tensor.dtype() == DType::F64) {
    tensor.data<double>()[i] = value;
  } else {
    tensor.set(i, float(value));
  }
}
}  // namespace

std::vector<int64_t> gradient_check_elements(const Tensor& grad, int samples) {
  const int64_t n = grad.numel();
  const int64_t count = std::max<int64_t>(samples, kMinimumGradientSamples);
  std::vector<int64_t> order(size_t(n), 0);
  std::iota(order.begin(), order.end(), int64_t(0));
  if (n <= count) return order;
  // Ascending |grad|, ties by index, so the choice is the same on every run.
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return std::fabs(value_at(grad, a)) < std::fabs(value_at(grad, b));
  });
  const int64_t smallest = count / 4, largest = 4;
  std::vector<int64_t> chosen(order.begin(), order.begin() + smallest);
  chosen.insert(chosen.end(), order.end() - largest, order.end());
  // A partial Fisher-Yates shuffle of the middle draws the rest without replacement.
  Rng rng(0x67726164);
  const int64_t high = n - largest;
  for (int64_t low = smallest; int64_t(chosen.size()) < count; ++low) {
    std::swap(order[size_t(low)], order[size_t(low + int64_t(rng.below(uint64_t(high - low))))]);
    chosen.push_back(order[size_t(low)]);
  }
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

::testing::AssertionResult check_gradient(Tensor values, const Tensor& grad,
                                          const std::function<double()>& objective,
                                          const std::string& what, int samples, double rtol,
                                          double atol, double step) {
  const int64_t n = values.numel();
  if (grad.numel() != n) {
    return ::testing::AssertionFailure()
           << what << ": gradient has " << grad.numel() << " elements, values " << n;
  }
  for (int64_t i : gradient_check_elements(grad, samples)) {
    const double saved = value_at(values, i);
    set_value(values, i, saved + step);
    const double plus = objective();
    set_value(values, i, saved - step);
    const double minus = objective();
    set_value(values, i, saved);
    const double numeric = (plus - minus) / (2 * step);
    const double analytic = value_at(grad, i);
    const double allowed = atol + rtol * std::fabs(numeric);
    if (!(std::fabs(numeric - analytic) <= allowed)) {
      return ::testing::AssertionFailure()
             << what << "[" << i << "]: analytic " << analytic << ", finite difference " << numeric
             << ", |error| " << std::fabs(numeric - analytic) << " > allowed " << allowed
             << " (atol " << atol << " + rtol " << rtol << " * |finite difference|)";
    }
  }
  return ::testing::AssertionSuccess();
}

std::string missing_python_package(const std::string& package) {
  static std::mutex mutex;
  static std::map<std::string, std::string> answers;
  std::lock_guard<std::mutex> lock(mutex);
  auto [at, fresh] = answers.try_emplace(package);
  if (fresh) {
    const std::string command = "/usr/bin/python3 -c 'import " + package + "' > /dev/null 2>&1";
    if (std::system(command.c_str()) != 0) {
      at->second = "this reference check needs the Python package '" + package +
                   "', which /usr/bin/python3 cannot import: install it with `apt-get install "
                   "python3-" +
                   package +
                   "` (scripts/setup.sh does), or set MOE_ALLOW_MISSING_REFERENCES=1 to skip "
                   "reference checks on a machine that cannot";
    }
  }
  return at->second;
}

bool missing_references_allowed() {
  const char* value = std::getenv("MOE_ALLOW_MISSING_REFERENCES");
  return value != nullptr && std::string_view(value) == "1";
}

ScratchDir::ScratchDir(const std::string& tag, int64_t shared_id, bool is_owner)
    : path(std::filesystem::temp_directory_path() /
           ("moe_" + tag + "_" + std::to_string(shared_id))),
      owner(is_owner) {
  if (!owner) return;
  std::filesystem::remove_all(path);
  std::filesystem::create_directories(path);
}

namespace {
int64_t next_scratch_number() {
  static std::atomic<int64_t> made{0};
  return made++;
}
}  // namespace

ScratchDir::ScratchDir(const std::string& tag)
    : ScratchDir(tag + "_" + std::to_string(::getpid()), next_scratch_number(), true) {}

ScratchDir::~ScratchDir() {
  std::error_code ignored;
  if (owner) std::filesystem::remove_all(path, ignored);
}

std::string read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

void write_bytes(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

}  // namespace moe::testing

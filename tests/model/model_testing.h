// Finite-difference gradient checks, parameter set-up and the data-parallel gradient comparison
// shared by the model (and pipeline) tests.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "moe/comm/parallel_state.h"
#include "moe/comm/process_group.h"
#include "moe/model/tensor_parallel.h"
#include "moe/tensor/parameters.h"
#include "moe/tensor/rng.h"
#include "moe/tensor/tensor.h"

namespace moe::model::testing {

// Power-of-two step: parameters drawn as fp32 values in [0.5, 2) stay exact when perturbed, so
// kernels that widen weights to fp32 (RMSNorm) see the same perturbation as fp64 ones.
constexpr double kStep = 1.0 / 16384.0;

inline double value_of(const Tensor& t, int64_t i) {
  return t.dtype() == DType::F64 ? t.data<double>()[i] : double(t.get(i));
}
inline void add_to(Tensor& t, int64_t i, double delta) {
  if (t.dtype() == DType::F64) {
    t.data<double>()[i] += delta;
  } else {
    t.set(i, float(double(t.get(i)) + delta));
  }
}

// Every parameter random: norm weights in [0.5, 1.5), everything else N(0, std) (fp32 values).
inline void randomize(ParameterStore& store, uint64_t seed, float std = 0.3f) {
  for (int i = 0; i < store.count(); ++i) {
    Rng rng = Rng::derived(seed, uint64_t(i));
    Tensor p = store.param(ParamHandle{i});
    if (store.spec(ParamHandle{i}).name.find("norm") != std::string::npos) {
      rng.fill_uniform(p, 0.5f, 1.5f);
    } else {
      rng.fill_normal(p, 0.0f, std);
    }
  }
}

// Token ids [batch, seq] (I64) uniform in [0, vocab).
inline Tensor random_tokens(int64_t batch, int64_t seq, int64_t vocab, uint64_t seed) {
  Rng rng(seed);
  Tensor t({batch, seq}, DType::I64);
  for (int64_t i = 0; i < t.numel(); ++i) {
    t.data<int64_t>()[i] = int64_t(rng.below(uint64_t(vocab)));
  }
  return t;
}

// sum(out * probe) in double.
inline double dot(const Tensor& out, const Tensor& probe) {
  double total = 0;
  for (int64_t i = 0; i < out.numel(); ++i) total += value_of(out, i) * value_of(probe, i);
  return total;
}

// Compares the analytic gradient `grad` of `objective` with respect to `values` against central
// differences at up to `samples` evenly spread elements.
inline ::testing::AssertionResult check_gradient(Tensor values, const Tensor& grad,
                                                 const std::function<double()>& objective,
                                                 const std::string& what, int samples = 12,
                                                 double rtol = 1e-4, double atol = 1e-6) {
  int64_t n = values.numel();
  if (n == 0) return ::testing::AssertionSuccess();
  double scale = 0;
  for (int64_t i = 0; i < n; ++i) scale = std::max(scale, std::fabs(value_of(grad, i)));
  int64_t stride = std::max<int64_t>(1, n / samples);
  for (int64_t i = (n - 1) % stride; i < n; i += stride) {
    add_to(values, i, kStep);
    double plus = objective();
    add_to(values, i, -2 * kStep);
    double minus = objective();
    add_to(values, i, kStep);
    double numeric = (plus - minus) / (2 * kStep);
    double analytic = value_of(grad, i);
    double allowed = atol + rtol * std::max(std::fabs(numeric), scale);
    if (!(std::fabs(numeric - analytic) <= allowed)) {
      return ::testing::AssertionFailure()
             << what << "[" << i << "]: analytic " << analytic << ", finite difference " << numeric
             << " (allowed error " << allowed << ", largest gradient " << scale << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

// Checks every parameter of the store (gradients already accumulated from one backward).
inline ::testing::AssertionResult check_all_params(ParameterStore& store,
                                                   const std::function<double()>& objective,
                                                   int samples = 6, double rtol = 1e-4) {
  for (int i = 0; i < store.count(); ++i) {
    ParamHandle h{i};
    auto result =
        check_gradient(store.param(h), store.grad(h), objective, store.spec(h).name, samples, rtol);
    if (!result) return result;
  }
  return ::testing::AssertionSuccess();
}

// Sums this rank's gradients over data parallelism as the optimizer does (dense ones over dp,
// expert ones over expert-dp, in place), then hands compare each parameter's spec, its reduced
// gradient and the matching block of the single-process reference's gradient.
inline void compare_reduced_gradients(const ParameterStore& store, const comm::ParallelState& state,
                                      const ParameterStore& reference,
                                      const std::function<void(const ParamSpec&, const Tensor& got,
                                                               const Tensor& expected)>& compare) {
  Tensor dense = store.flat_grads(ParamGroup::kDense);
  Tensor expert = store.flat_grads(ParamGroup::kExpert);
  comm::all_reduce(dense, state.dp_group);
  comm::all_reduce(expert, state.expert_dp);
  for (int i = 0; i < store.count(); ++i) {
    const ParamSpec& spec = store.spec(ParamHandle{i});
    Tensor expected(spec.shape);
    copy_global_block(reference.grad(reference.find(spec.name)), spec, expected);
    compare(spec, store.grad(ParamHandle{i}), expected);
  }
}

}  // namespace moe::model::testing

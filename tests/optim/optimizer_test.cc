// Single-process optimizer tests: Adam/AdamW and SGD against hand-computed references, clipping,
// weight-decay rules, fp16 loss scaling with overflow, bf16 main parameters, flag errors.
#include "moe/optim/optimizer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "reference_adam.h"
#include "support/testing.h"
#include "test_model.h"

namespace moe::optim {
namespace {

using moe::testing::expect_error_containing;
using moe::testing::param_spec;
using moe::testing::random_normal;
using moe::testing::single;
using moe::testing::without_decay;

// SGD without momentum, weight decay or clipping: each step is p -= lr * g.
OptimizerConfig plain_sgd(double lr) {
  OptimizerConfig config;
  config.optimizer = "sgd";
  config.lr = lr;
  config.sgd_momentum = 0.0;
  config.weight_decay = 0.0;
  config.clip_grad = 0.0;
  return config;
}

TEST(Adam, OneElementStepMatchesHandComputation) {
  ParameterStore store;
  ParamHandle w = store.declare(param_spec("w", {1, 1}));
  store.allocate();
  store.param(w).set(0, 1.0f);
  store.grad(w).set(0, 0.5f);
  OptimizerConfig config;
  config.lr = 0.1;
  config.weight_decay = 0.1;
  config.clip_grad = 0.0;
  Optimizer optimizer(store, single(), config);
  StepResult r = optimizer.step();
  // p = 1 * (1 - 0.1 * 0.1) = 0.99; m = 0.05, v = 0.00025; m_hat = 0.5, v_hat = 0.25;
  // p -= 0.1 * 0.5 / (0.5 + 1e-8)  ->  0.99 - 0.09999999800 = 0.890000002
  EXPECT_FALSE(r.skipped);
  EXPECT_DOUBLE_EQ(r.grad_norm, 0.5);
  EXPECT_NEAR(store.param(w).get(0), 0.890000002, 1e-7);
}

struct ReferenceAdam {
  std::vector<double> p, m, v;
  void step(const std::vector<float>& g, const AdamStep& h) {
    for (size_t i = 0; i < p.size(); ++i) moe::testing::reference_adamw(p[i], m[i], v[i], g[i], h);
  }
};

TEST(Adam, SeveralStepsMatchAdamWReferenceWithNoDecayForBiasAndNorms) {
  ParameterStore store;
  ParamHandle weight = store.declare(param_spec("layer.weight", {5, 17}));
  ParamHandle bias = store.declare(param_spec("layer.bias", {17}));
  ParamHandle norm = store.declare(without_decay(param_spec("norm.weight", {17})));
  ParamHandle expert = store.declare(param_spec("experts.fc1", {2, 3, 4}, ParamGroup::kExpert));
  store.allocate();
  ParamHandle handles[] = {weight, bias, norm, expert};
  std::vector<ReferenceAdam> ref(4);
  for (int i = 0; i < 4; ++i) {
    Tensor init = random_normal(store.param(handles[i]).shape(), 10 + i);
    store.param(handles[i]).copy_from(init);
    for (float x : init.to_floats()) ref[i].p.push_back(x);
    ref[i].m.assign(ref[i].p.size(), 0.0);
    ref[i].v.assign(ref[i].p.size(), 0.0);
  }
  OptimizerConfig config;
  config.weight_decay = 0.3;
  config.adam_beta1 = 0.8;
  config.adam_beta2 = 0.95;
  config.adam_eps = 1e-6;
  config.clip_grad = 0.0;
  Optimizer optimizer(store, single(), config);
  for (int t = 1; t <= 4; ++t) {
    double lr = 0.01 * t;
    optimizer.set_lr(lr);
    store.zero_grads();
    for (int i = 0; i < 4; ++i) {
      Tensor g = random_normal(store.grad(handles[i]).shape(), 100 * t + i);
      store.grad(handles[i]).copy_from(g);
      bool decays = i == 0 || i == 3;  // not the bias, not the 1-D norm
      ref[i].step(g.to_floats(), {lr, 0.8, 0.95, 1e-6, decays ? 0.3 : 0.0, t});
    }
    ASSERT_FALSE(optimizer.step().skipped);
  }
  for (int i = 0; i < 4; ++i) {
    std::vector<float> expected(ref[i].p.begin(), ref[i].p.end());
    EXPECT_TENSORS_CLOSE(store.param(handles[i]),
                         Tensor::from_floats(expected, store.param(handles[i]).shape()), 1e-6,
                         1e-5);
  }
  EXPECT_EQ(optimizer.scalars().step, 4);
}

TEST(Sgd, MomentumAndCoupledWeightDecayMatchTorchSgd) {
  ParameterStore store;
  ParamHandle w = store.declare(param_spec("w", {2, 3}));
  store.allocate();
  store.param(w).fill(1.0f);
  OptimizerConfig config = plain_sgd(0.5);
  config.sgd_momentum = 0.9;
  config.weight_decay = 0.1;
  Optimizer optimizer(store, single(), config);
  double p = 1.0, buf = 0.0;
  for (int t = 1; t <= 3; ++t) {
    store.grad(w).fill(0.25f * t);
    double d = 0.25 * t + 0.1 * p;
    buf = t == 1 ? d : 0.9 * buf + d;
    p -= 0.5 * buf;
    optimizer.step();
  }
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(store.param(w).get(i), p, 1e-6);
}

TEST(Clipping, ScalesGradientsByMaxNormOverGlobalNorm) {
  ParameterStore store;
  ParamHandle dense = store.declare(param_spec("dense", {1, 2}));
  ParamHandle expert = store.declare(param_spec("expert", {1, 1}, ParamGroup::kExpert));
  store.allocate();
  // Global norm over both groups: sqrt(3^2 + 4^2 + 12^2) = 13.
  store.grad(dense).set(0, 3.0f);
  store.grad(dense).set(1, 4.0f);
  store.grad(expert).set(0, 12.0f);
  OptimizerConfig config = plain_sgd(1.0);
  config.clip_grad = 2.0;
  Optimizer optimizer(store, single(), config);
  StepResult r = optimizer.step();
  EXPECT_DOUBLE_EQ(r.grad_norm, 13.0);
  EXPECT_DOUBLE_EQ(r.clip_coeff, 2.0 / (13.0 + 1e-6));
  float coeff = float(2.0 / (13.0 + 1e-6));
  EXPECT_FLOAT_EQ(store.param(dense).get(0), -3.0f * coeff);
  EXPECT_FLOAT_EQ(store.param(dense).get(1), -4.0f * coeff);
  EXPECT_FLOAT_EQ(store.param(expert).get(0), -12.0f * coeff);

  // Below the threshold nothing is scaled.
  store.zero_grads();
  store.grad(dense).set(0, 1.0f);
  r = optimizer.step();
  EXPECT_EQ(r.clip_coeff, 1.0);
  EXPECT_FLOAT_EQ(store.param(dense).get(0), -3.0f * coeff - 1.0f);
}

OptimizerConfig fp16_sgd(int hysteresis, int window) {
  OptimizerConfig config = plain_sgd(1.0);
  config.fp16 = true;
  config.initial_loss_scale = 1024.0;
  config.hysteresis = hysteresis;
  config.loss_scale_window = window;
  return config;
}

TEST(LossScaling, OverflowSkipsTheStepAndHalvesTheScale) {
  ParameterStore store(DType::F16);
  ParamHandle w = store.declare(param_spec("w", {3, 2}));
  store.allocate();
  store.param(w).fill(2.0f);
  Optimizer optimizer(store, single(), fp16_sgd(/*hysteresis=*/1, /*window=*/1000));
  EXPECT_EQ(optimizer.loss_scale(), 1024.0);
  store.grad(w).fill(1.0f);
  store.grad(w).set(4, std::numeric_limits<float>::infinity());
  StepResult r = optimizer.step();
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(r.loss_scale, 512.0);
  EXPECT_EQ(optimizer.loss_scale(), 512.0);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(store.param(w).get(i), 2.0f);
  EXPECT_EQ(optimizer.scalars().step, 0);

  // A clean step divides the (scaled) gradients by the scale before the update.
  store.zero_grads();
  store.grad(w).fill(512.0f * 0.5f);
  r = optimizer.step();
  EXPECT_FALSE(r.skipped);
  EXPECT_DOUBLE_EQ(r.grad_norm, std::sqrt(6 * 0.25));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(store.param(w).get(i), 1.5f);
}

TEST(LossScaling, HysteresisDelaysTheBackoffAndCleanWindowsGrowTheScale) {
  ParameterStore store(DType::F16);
  ParamHandle w = store.declare(param_spec("w", {4}));
  store.allocate();
  Optimizer optimizer(store, single(), fp16_sgd(/*hysteresis=*/2, /*window=*/2));
  auto run = [&](bool overflow) {
    store.zero_grads();
    store.grad(w).set(0, overflow ? std::nanf("") : 1.0f);
    return optimizer.step();
  };
  EXPECT_TRUE(run(true).skipped);
  EXPECT_EQ(optimizer.loss_scale(), 1024.0);  // first overflow: hysteresis 2 -> 1
  EXPECT_TRUE(run(true).skipped);
  EXPECT_EQ(optimizer.loss_scale(), 512.0);  // second consecutive: back off
  EXPECT_TRUE(run(true).skipped);
  EXPECT_EQ(optimizer.loss_scale(), 256.0);  // hysteresis stays spent until a clean window
  EXPECT_FALSE(run(false).skipped);
  EXPECT_FALSE(run(false).skipped);
  EXPECT_EQ(optimizer.loss_scale(), 512.0);  // window of 2 clean steps: grow, refill hysteresis
  EXPECT_TRUE(run(true).skipped);
  EXPECT_EQ(optimizer.loss_scale(), 512.0);
  GradScalerState s = optimizer.scalars().scaler;
  EXPECT_EQ(s.hysteresis_tracker, 1);
  EXPECT_EQ(s.growth_tracker, 0);
}

TEST(MixedPrecision, Bf16ModelParamsAreTheRoundedFp32MainParams) {
  ParameterStore store(DType::BF16);
  ParamHandle w = store.declare(param_spec("w", {1, 4}));
  store.allocate();
  store.param(w).fill(1.0f);
  OptimizerConfig config = plain_sgd(1e-3);
  config.bf16 = true;
  Optimizer optimizer(store, single(), config);
  // Each update (1e-3) is below bf16's spacing at 1 (2^-7): only fp32 main params accumulate it.
  for (int t = 0; t < 10; ++t) {
    store.grad(w).fill(1.0f);
    optimizer.step();
  }
  float main = 1.0f;
  for (int t = 0; t < 10; ++t) main -= 1e-3f;
  std::vector<StateTensor> state = optimizer.state_tensors();
  ASSERT_EQ(state.size(), 1u);
  EXPECT_EQ(state[0].kind, "main_param");
  EXPECT_NEAR(state[0].data.get(0), main, 1e-6);
  EXPECT_EQ(store.param(w).get(0), bf16_to_float(float_to_bf16(state[0].data.get(0))));
  EXPECT_LT(store.param(w).get(0), 1.0f);
  MemoryReport m = optimizer.memory();
  EXPECT_EQ(m.param_bytes, 4 * 2);
  EXPECT_EQ(m.main_param_bytes, 4 * 4);
  EXPECT_EQ(m.optimizer_state_bytes, 0);
}

TEST(Config, BadFlagsAreRefusedWithTheirNames) {
  ParameterStore store;
  store.declare(param_spec("w", {2}));
  store.allocate();
  OptimizerConfig config;
  config.optimizer = "lamb";
  expect_error_containing([&] { Optimizer o(store, single(), config); },
                          "--optimizer 'lamb' is not one of adam, sgd");
  config = {};
  config.bf16 = true;
  config.fp16 = true;
  expect_error_containing([&] { Optimizer o(store, single(), config); },
                          "--bf16 and --fp16 conflict");
  config = {};
  config.bf16 = true;
  expect_error_containing([&] { Optimizer o(store, single(), config); },
                          "model parameters are fp32 but the flags");
  config = {};
  config.fp16 = true;
  config.hysteresis = 0;
  ParameterStore half(DType::F16);
  half.declare(param_spec("w", {2}));
  half.allocate();
  expect_error_containing([&] { Optimizer o(half, single(), config); },
                          "--hysteresis must be positive, got 0");
  config = {};
  config.adam_beta2 = 1.0;
  expect_error_containing([&] { Optimizer o(store, single(), config); },
                          "--adam-beta2 must be in [0, 1), got 1");
}

TEST(Memory, SummaryNamesEveryBuffer) {
  ParameterStore store;
  store.declare(param_spec("w", {256, 1024}));
  store.allocate();
  Optimizer optimizer(store, single(), {});
  MemoryReport m = optimizer.memory();
  EXPECT_EQ(m.param_bytes, 256 * 1024 * 4);
  EXPECT_EQ(m.main_param_bytes, 0);  // fp32 parameters are their own main copy
  EXPECT_EQ(m.optimizer_state_bytes, 2 * 256 * 1024 * 4);
  EXPECT_EQ(optimizer.memory_summary(),
            "memory per rank: params 1.00 MiB (fp32), grads 1.00 MiB (fp32), main params 0.00 "
            "MiB, optimizer state 2.00 MiB (adam, replicated over dp=1, expert-dp=1)");
}

}  // namespace
}  // namespace moe::optim

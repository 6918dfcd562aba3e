// The learning-rate / weight-decay schedule at chosen steps against its formula, Megatron's
// iteration arithmetic, state round trips and the checkpoint-mismatch checks.
#include "moe/optim/lr_scheduler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "moe/optim/optimizer.h"
#include "moe/tensor/error.h"
#include "support/testing.h"
#include "test_model.h"

namespace moe::optim {
namespace {

constexpr double kPi = std::numbers::pi;

SchedulerConfig base(const std::string& style) {
  SchedulerConfig c;
  c.init_lr = 0.0;
  c.max_lr = 1e-3;
  c.min_lr = 1e-5;
  c.warmup_steps = 10;
  c.decay_steps = 100;
  c.decay_style = style;
  c.wsd_decay_steps = 20;
  return c;
}

double lr_at(const SchedulerConfig& c, int64_t step) {
  OptimizerParamScheduler s(c);
  s.step(step);
  return s.lr();
}

TEST(LrSchedule, WarmupIsLinearFromInitLr) {
  SchedulerConfig c = base("cosine");
  c.init_lr = 1e-4;
  EXPECT_DOUBLE_EQ(lr_at(c, 0), 1e-4);
  EXPECT_DOUBLE_EQ(lr_at(c, 3), 1e-4 + (1e-3 - 1e-4) * 3 / 10);
  EXPECT_DOUBLE_EQ(lr_at(c, 10), 1e-3);
}

TEST(LrSchedule, DecayStylesMatchTheirFormulas) {
  const double max = 1e-3, min = 1e-5;
  for (int64_t n : {11, 37, 64, 100}) {
    double r = (n - 10) / 90.0;
    EXPECT_DOUBLE_EQ(lr_at(base("linear"), n), min + (1 - r) * (max - min)) << n;
    EXPECT_DOUBLE_EQ(lr_at(base("cosine"), n), min + 0.5 * (std::cos(kPi * r) + 1) * (max - min))
        << n;
    EXPECT_DOUBLE_EQ(lr_at(base("inverse-square-root"), n),
                     std::max(min, max * std::sqrt(10.0) / std::sqrt(double(n))))
        << n;
    EXPECT_DOUBLE_EQ(lr_at(base("constant"), n), max) << n;
  }
  for (const char* style : {"linear", "cosine", "inverse-square-root", "WSD"}) {
    EXPECT_DOUBLE_EQ(lr_at(base(style), 101), min) << style;
  }
  EXPECT_DOUBLE_EQ(lr_at(base("constant"), 500), max);
}

TEST(LrSchedule, WsdHoldsThenAnnealsOverItsLastSteps) {
  const double max = 1e-3, min = 1e-5;
  SchedulerConfig c = base("WSD");
  EXPECT_DOUBLE_EQ(lr_at(c, 80), max);
  const std::pair<const char*, double> styles[] = {{"linear", 0.5},
                                                   {"cosine", 0.5 * (std::cos(kPi * 0.5) + 1)},
                                                   {"exponential", 2 * std::pow(0.5, 0.5) - 1},
                                                   {"minus_sqrt", 1 - std::sqrt(0.5)}};
  for (auto [style, coeff] : styles) {
    c.wsd_decay_style = style;
    EXPECT_DOUBLE_EQ(lr_at(c, 90), min + coeff * (max - min)) << style;
  }
}

TEST(LrSchedule, WeightDecayIncrements) {
  SchedulerConfig c = base("linear");
  c.start_wd = 0.01;
  c.end_wd = 0.1;
  c.wd_incr_steps = 50;
  c.wd_incr_style = "linear";
  OptimizerParamScheduler linear(c);
  linear.step(20);
  EXPECT_DOUBLE_EQ(linear.weight_decay(), 0.01 + 0.4 * 0.09);
  c.wd_incr_style = "cosine";
  OptimizerParamScheduler cosine(c);
  cosine.step(20);
  EXPECT_DOUBLE_EQ(cosine.weight_decay(), 0.01 + 0.5 * (std::cos(kPi * 0.6) + 1) * 0.09);
  cosine.step(100);
  EXPECT_DOUBLE_EQ(cosine.weight_decay(), 0.1);
}

TEST(LrSchedule, IterationArgumentsBecomeSampleSteps) {
  IterationScheduleArgs a;
  a.train_iters = 100;
  a.global_batch_size = 8;
  a.lr_warmup_iters = 5;
  SchedulerConfig c = make_scheduler_config(a);
  EXPECT_EQ(c.decay_steps, 800);
  EXPECT_EQ(c.warmup_steps, 40.0);
  EXPECT_EQ(c.wd_incr_steps, 800);
  a.lr_decay_iters = 50;
  a.lr_warmup_fraction = 0.1;
  c = make_scheduler_config(a);
  EXPECT_EQ(c.decay_steps, 400);
  EXPECT_EQ(c.warmup_steps, 40.0);
}

TEST(LrSchedule, DrivesTheOptimizerAndRoundTripsItsState) {
  ParameterStore store;
  store.declare(moe::testing::param_spec("w", {2, 2}));
  store.allocate();
  static comm::ParallelState parallel = comm::single_process_state();
  Optimizer optimizer(store, parallel, {});
  SchedulerConfig c = base("cosine");
  c.start_wd = c.end_wd = 0.05;
  OptimizerParamScheduler s(c, &optimizer);
  EXPECT_EQ(optimizer.lr(), 0.0);
  EXPECT_EQ(optimizer.weight_decay(), 0.05);
  s.step(7);
  EXPECT_DOUBLE_EQ(optimizer.lr(), 7e-4);

  OptimizerParamScheduler resumed(c, &optimizer);
  resumed.load_state(s.state());
  EXPECT_EQ(resumed.num_steps(), 7);
  EXPECT_DOUBLE_EQ(optimizer.lr(), 7e-4);

  SchedulerConfig changed = c;
  changed.max_lr = 2e-3;
  OptimizerParamScheduler strict(changed);
  EXPECT_CONTAINS(moe::testing::error_text([&] { strict.load_state(s.state()); }),
                  "scheduler learning rate from the arguments (0.002) "
                  "differs from the checkpoint (0.001)");
  changed.override_opt_param_scheduler = true;
  OptimizerParamScheduler overriding(changed);
  overriding.load_state(s.state());
  EXPECT_DOUBLE_EQ(overriding.lr(), 1.4e-3);
}

TEST(LrSchedule, BadValuesAreRefusedWithTheirNames) {
  SchedulerConfig c = base("polynomial");
  EXPECT_THROW(OptimizerParamScheduler{c}, Error);
  EXPECT_CONTAINS(moe::testing::error_text([&] { OptimizerParamScheduler s(c); }),
                  "--lr-decay-style 'polynomial' is not one of");
  c = base("linear");
  c.warmup_steps = 100;
  EXPECT_CONTAINS(moe::testing::error_text([&] { OptimizerParamScheduler s(c); }),
                  "warmup steps (100) must be in [0, decay steps = 100)");
}

}  // namespace
}  // namespace moe::optim

// Data-parallel optimizer tests under mpirun (2 and 4 ranks): the distributed optimizer equals
// the plain one, data parallelism equals gradient accumulation, the global norm counts every
// parameter once, and an overflow on one rank skips the step everywhere.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "moe/comm/parallel_state.h"
#include "moe/optim/optimizer.h"
#include "support/testing.h"
#include "test_model.h"

namespace moe::optim {
namespace {

using moe::testing::param_spec;
using moe::testing::random_normal;
using moe::testing::shard_of;
using moe::testing::TestModel;
using moe::testing::tp_duplicate;

comm::ParallelSizes layout_for(int world, bool expert_parallel) {
  comm::ParallelSizes sizes;
  if (expert_parallel && world % 2 == 0) sizes.ep = 2;
  return sizes;
}

class DistributedVsPlain : public ::testing::TestWithParam<std::tuple<bool, DType>> {};

TEST_P(DistributedVsPlain, SameParametersOverSeveralSteps) {
  auto [expert_parallel, dtype] = GetParam();
  int world = comm::ProcessGroup::world().size();
  comm::ParallelState p = comm::initialize_model_parallel(layout_for(world, expert_parallel));
  TestModel plain_model(dtype, p), sharded_model(dtype, p);
  OptimizerConfig config;
  config.lr = 0.05;
  config.weight_decay = 0.1;
  config.clip_grad = 0.8;  // the random gradients' norm is well above: clipping is exercised
  config.bf16 = dtype == DType::BF16;
  Optimizer plain(plain_model.store, p, config);
  config.use_distributed_optimizer = true;
  Optimizer sharded(sharded_model.store, p, config);
  for (int step = 1; step <= 4; ++step) {
    plain_model.fill_grads(step, p.world_rank);
    sharded_model.fill_grads(step, p.world_rank);
    StepResult a = plain.step(), b = sharded.step();
    EXPECT_NEAR(a.grad_norm, b.grad_norm, 1e-5 * a.grad_norm);
    EXPECT_LT(a.clip_coeff, 1.0);
  }
  double tolerance = dtype == DType::F32 ? 1e-6 : 1e-2;  // bf16: one rounding step at most
  for (size_t i = 0; i < plain_model.handles.size(); ++i) {
    EXPECT_TENSORS_CLOSE(sharded_model.store.param(sharded_model.handles[i]),
                         plain_model.store.param(plain_model.handles[i]), tolerance, tolerance)
        << "parameter " << i;
  }
  // Optimizer state per rank falls as 1 / dp: without expert parallelism the shards over the dp
  // group add up to exactly one replica's state.
  int64_t shard_bytes = sharded.memory().optimizer_state_bytes;
  EXPECT_LT(shard_bytes, plain.memory().optimizer_state_bytes);
  if (!expert_parallel) {
    Tensor total({1}, DType::F64);
    total.set(0, float(shard_bytes));
    comm::all_reduce(total, p.dp_cp_group);
    EXPECT_EQ(int64_t(total.get(0)), plain.memory().optimizer_state_bytes);
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, DistributedVsPlain,
                         ::testing::Combine(::testing::Bool(),
                                            ::testing::Values(DType::F32, DType::BF16)));

TEST(DistributedOptimizer, BuffersSmallerThanDpLeaveSomeRanksEmptyShards) {
  comm::ParallelState p = comm::initialize_model_parallel({});
  ParameterStore plain_store, sharded_store;
  ParamHandle a = plain_store.declare(param_spec("w", {1, 3}));  // 3 elements over 2 or 4 ranks
  sharded_store.declare(param_spec("w", {1, 3}));
  plain_store.allocate();
  sharded_store.allocate();
  OptimizerConfig config;
  Optimizer plain(plain_store, p, config);
  config.use_distributed_optimizer = true;
  Optimizer sharded(sharded_store, p, config);
  for (int step = 0; step < 3; ++step) {
    Tensor g = random_normal({1, 3}, 40 + step + 7 * p.world_rank);
    plain_store.grad(a).copy_from(g);
    sharded_store.grad(a).copy_from(g);
    plain.step();
    sharded.step();
  }
  EXPECT_TENSORS_CLOSE(sharded_store.param(a), plain_store.param(a), 1e-6, 1e-6);
}

// Linear regression y = W x with loss mean_b 0.5 |W x - t|^2: its gradient (1/b) sum (W x - t) x^T
// is accumulated into the store, scaled by 1 / micro_batches as Megatron scales the loss.
void add_regression_grad(ParameterStore& store, ParamHandle w, const Tensor& x, const Tensor& t,
                         double loss_factor) {
  Tensor weight = store.param(w), grad = store.grad(w);
  int64_t out = weight.dim(0), in = weight.dim(1), b = x.dim(0);
  for (int64_t s = 0; s < b; ++s) {
    for (int64_t o = 0; o < out; ++o) {
      double residual = -t.get(s * out + o);
      for (int64_t k = 0; k < in; ++k) residual += weight.get(o * in + k) * x.get(s * in + k);
      for (int64_t k = 0; k < in; ++k) {
        grad.set(o * in + k,
                 grad.get(o * in + k) + float(loss_factor * residual * x.get(s * in + k) / b));
      }
    }
  }
}

TEST(DataParallel, DpRanksEqualAccumulatedMicroBatches) {
  comm::ParallelState p = comm::initialize_model_parallel({});
  comm::ParallelState one = comm::single_process_state();
  const int dp = p.dp, b = 3, in = 5, out = 4;
  ParamSpec spec = param_spec("w", {out, in});
  ParameterStore data_parallel, accumulated;
  ParamHandle w = data_parallel.declare(spec);
  accumulated.declare(spec);
  data_parallel.allocate();
  accumulated.allocate();
  Tensor init = random_normal({out, in}, 5);
  data_parallel.param(w).copy_from(init);
  accumulated.param(w).copy_from(init);
  OptimizerConfig config;
  config.lr = 0.01;
  for (bool distributed : {false, true}) {
    config.use_distributed_optimizer = distributed;
    Optimizer dp_opt(data_parallel, p, config), acc_opt(accumulated, one, config);
    for (int step = 0; step < 3; ++step) {
      data_parallel.zero_grads();
      accumulated.zero_grads();
      for (int r = 0; r < dp; ++r) {
        Tensor x = random_normal({b, in}, 100 * step + r), t = random_normal({b, out}, 999 + r);
        if (r == p.dp_group.rank()) add_regression_grad(data_parallel, w, x, t, 1.0);
        add_regression_grad(accumulated, w, x, t, 1.0 / dp);
      }
      StepResult a = dp_opt.step(), c = acc_opt.step();
      EXPECT_NEAR(a.grad_norm, c.grad_norm, 1e-5 * c.grad_norm);
    }
    EXPECT_TENSORS_CLOSE(data_parallel.param(w), accumulated.param(w), 1e-6, 1e-5);
  }
}

TEST(GradNorm, CountsTensorParallelDuplicatesAndReplicasOnceAndExpertShardsEach) {
  int world = comm::ProcessGroup::world().size();
  comm::ParallelSizes sizes;
  sizes.tp = 2;
  sizes.ep = world / 2;
  comm::ParallelState p = comm::initialize_model_parallel(sizes);
  ParameterStore store;
  ParamHandle dup = store.declare(tp_duplicate(param_spec("norm.weight", {3})));
  ParamHandle shard =
      store.declare(shard_of(param_spec("fc.weight", {2, 3}), {4, 3}, {2 * p.tp_group.rank(), 0}));
  ParamHandle expert = store.declare(shard_of(param_spec("experts.w", {1, 2}, ParamGroup::kExpert),
                                              {sizes.ep, 2}, {p.ep_group.rank(), 0}));
  store.allocate();
  // Identical gradients on dense replicas (so the dp mean is the same values), per-shard values:
  // dup = 1 (3 elements), tp shard r = r + 2 (6 elements), expert shard e = e + 1 (2 elements).
  double expected = 3.0;
  for (int r = 0; r < 2; ++r) expected += 6.0 * (r + 2) * (r + 2);
  // Expert replicas (expert-dp) see different tokens in Megatron, so their gradients are summed
  // and scaled by 1 / dp like the dense ones: the reduced value is (e + 1) * edp / dp.
  for (int e = 0; e < sizes.ep; ++e) {
    double reduced = (e + 1) * double(p.edp) / double(p.dp);
    expected += 2.0 * reduced * reduced;
  }
  for (bool distributed : {false, true}) {
    OptimizerConfig config;
    config.optimizer = "sgd";
    config.lr = 0.0;
    config.use_distributed_optimizer = distributed;
    Optimizer optimizer(store, p, config);
    store.grad(dup).fill(1.0f);
    store.grad(shard).fill(float(p.tp_group.rank() + 2));
    store.grad(expert).fill(float(p.ep_group.rank() + 1));
    StepResult r = optimizer.step();
    EXPECT_NEAR(r.grad_norm, std::sqrt(expected), 1e-6) << "distributed " << distributed;
  }
}

TEST(LossScaling, OverflowOnOneRankSkipsTheStepOnEveryRank) {
  comm::ParallelState p = comm::initialize_model_parallel({});
  for (bool distributed : {false, true}) {
    TestModel model(DType::F16, p);
    OptimizerConfig config;
    config.fp16 = true;
    config.initial_loss_scale = 65536.0;
    config.hysteresis = 1;
    config.use_distributed_optimizer = distributed;
    Optimizer optimizer(model.store, p, config);
    Tensor before = model.store.flat_params(ParamGroup::kDense).clone();
    model.fill_grads(1, p.world_rank);
    if (p.world_rank == p.world_size - 1) {
      model.store.grad(model.handles[1]).set(3, std::numeric_limits<float>::infinity());
    }
    StepResult r = optimizer.step();
    EXPECT_TRUE(r.skipped);
    EXPECT_EQ(r.loss_scale, 32768.0);
    EXPECT_TENSORS_CLOSE(model.store.flat_params(ParamGroup::kDense), before, 0, 0);
  }
}

}  // namespace
}  // namespace moe::optim

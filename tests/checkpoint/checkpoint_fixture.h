// A small training run (model, optimizer, scheduler, RNG) that the checkpoint tests save, load
// and resume, and a bitwise comparison of two runs.
#pragma once

#include <memory>

#include "moe/checkpoint/checkpoint.h"
#include "optim/test_model.h"
#include "support/testing.h"

namespace moe::testing {

struct TrainingRun {
  TestModel model;
  std::unique_ptr<optim::Optimizer> optimizer;
  std::unique_ptr<optim::OptimizerParamScheduler> scheduler;
  Rng rng{42};
  const comm::ParallelState& parallel;
  int iteration = 0;

  TrainingRun(const comm::ParallelState& p, DType dtype, bool distributed)
      : model(dtype, p), parallel(p) {
    optim::OptimizerConfig config;
    config.lr = 0.01;
    config.clip_grad = 1.0;
    config.bf16 = dtype == DType::BF16;
    config.fp16 = dtype == DType::F16;
    config.initial_loss_scale = 256.0;
    config.use_distributed_optimizer = distributed;
    optimizer = std::make_unique<optim::Optimizer>(model.store, p, config);
    optim::SchedulerConfig schedule;
    schedule.max_lr = 0.01;
    schedule.min_lr = 0.001;
    schedule.warmup_steps = 2;
    schedule.decay_steps = 20;
    schedule.decay_style = "cosine";
    scheduler = std::make_unique<optim::OptimizerParamScheduler>(schedule, optimizer.get());
  }

  // One iteration whose gradients depend on the RNG stream (so a resumed run must restore it).
  void train(int iterations) {
    for (int i = 0; i < iterations; ++i) {
      ++iteration;
      model.fill_grads(int(rng.next_u64() % 100000), parallel.world_rank);
      if (!optimizer->step().skipped) scheduler->step(1);
    }
  }

  checkpoint::TrainingState state() const {
    checkpoint::TrainingState s;
    s.iteration = iteration;
    s.consumed_train_samples = 8 * iteration;
    s.args = {{"lr", 0.01}, {"seed", 42}};
    s.rng["data"] = rng.state();
    return s;
  }
  void save(const std::string& dir, const checkpoint::SaveOptions& options = {}) {
    checkpoint::save_checkpoint(dir, state(), model.store, optimizer.get(), scheduler.get(),
                                parallel, options);
  }
  checkpoint::TrainingState load(const std::string& dir, const checkpoint::LoadOptions& o = {}) {
    checkpoint::TrainingState s = checkpoint::load_checkpoint(dir, model.store, optimizer.get(),
                                                              scheduler.get(), parallel, o);
    iteration = int(s.iteration);
    if (s.rng.count("data")) rng.set_state(s.rng.at("data"));
    return s;
  }
};

// Parameters, optimizer state and scalars are bitwise equal.
inline ::testing::AssertionResult runs_identical(TrainingRun& a, TrainingRun& b) {
  for (ParamGroup g : {ParamGroup::kDense, ParamGroup::kExpert}) {
    if (!same_bytes(a.model.store.flat_params(g), b.model.store.flat_params(g))) {
      return ::testing::AssertionFailure() << "parameters of group " << int(g) << " differ";
    }
  }
  std::vector<optim::StateTensor> sa = a.optimizer->state_tensors();
  std::vector<optim::StateTensor> sb = b.optimizer->state_tensors();
  if (sa.size() != sb.size()) return ::testing::AssertionFailure() << "state counts differ";
  for (size_t i = 0; i < sa.size(); ++i) {
    if (!same_bytes(sa[i].data, sb[i].data)) {
      return ::testing::AssertionFailure() << "optimizer state " << sa[i].kind << " of parameter "
                                           << sa[i].param.index << " differs";
    }
  }
  if (a.optimizer->scalars().step != b.optimizer->scalars().step ||
      a.optimizer->loss_scale() != b.optimizer->loss_scale() ||
      a.scheduler->num_steps() != b.scheduler->num_steps() ||
      a.optimizer->lr() != b.optimizer->lr() || a.rng.state() != b.rng.state()) {
    return ::testing::AssertionFailure() << "scalars differ";
  }
  return ::testing::AssertionSuccess();
}

}  // namespace moe::testing

// Learning-rate and weight-decay schedule: Megatron-Core's OptimizerParamScheduler. Steps count
// SAMPLES in Megatron (each successful iteration calls step(global_batch_size)); see
// make_scheduler_config for the iteration-based arithmetic of Megatron's training.py.
//
// lr(n), n = num_steps:
//   warmup (warmup_steps > 0 and n <= warmup_steps): init_lr + (max_lr - init_lr) * n / warmup
//   constant: max_lr;   n > decay_steps: min_lr
//   inverse-square-root: max(min_lr, max_lr * sqrt(max(warmup, 1)) / sqrt(max(n, 1)))
//   otherwise r = (n - warmup) / (decay_steps - warmup), lr = min_lr + c * (max_lr - min_lr) with
//     linear: c = 1 - r;  cosine: c = (cos(pi r) + 1) / 2;
//     WSD: c = 1 until decay_steps - wsd_decay_steps, then over the last wsd_decay_steps with
//     s = fraction of them done: linear 1 - s, cosine (cos(pi s) + 1) / 2,
//     exponential 2 * 0.5^s - 1, minus_sqrt 1 - sqrt(s).
// weight_decay(n): end_wd past wd_incr_steps, else start_wd + c * (end_wd - start_wd) with
//   constant (start == end), linear c = n / wd_incr_steps, cosine c = (cos(pi (1 - r)) + 1) / 2.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace moe::optim {

class Optimizer;

struct SchedulerConfig {
  double init_lr = 0.0;  // --lr-warmup-init
  double max_lr = 1e-4;  // --lr
  double min_lr = 0.0;   // --min-lr
  double warmup_steps = 0.0;
  int64_t decay_steps = 1;
  std::string decay_style = "linear";  // constant | linear | cosine | inverse-square-root | WSD
  int64_t wsd_decay_steps = 0;
  std::string wsd_decay_style = "exponential";  // linear | cosine | exponential | minus_sqrt
  double start_wd = 0.01;
  double end_wd = 0.01;
  int64_t wd_incr_steps = 1;
  std::string wd_incr_style = "constant";  // constant | linear | cosine
  // On load: take the checkpoint's values (use_checkpoint) or keep these (override); with
  // neither, the checkpoint must agree with these values.
  bool use_checkpoint_opt_param_scheduler = false;
  bool override_opt_param_scheduler = false;
};

// Megatron's arguments for an iteration-based run (training.py get_optimizer_param_scheduler).
struct IterationScheduleArgs {
  int64_t train_iters = 0;
  int64_t global_batch_size = 1;
  double lr = 1e-4;
  double min_lr = 0.0;
  double lr_warmup_init = 0.0;
  std::optional<int64_t> lr_decay_iters;  // default train_iters
  int64_t lr_warmup_iters = 0;
  std::optional<double> lr_warmup_fraction;  // wins over lr_warmup_iters
  std::string lr_decay_style = "linear";
  std::optional<int64_t> lr_wsd_decay_iters;
  std::string lr_wsd_decay_style = "exponential";
  double start_weight_decay = 0.01;  // Megatron: defaults to --weight-decay
  double end_weight_decay = 0.01;
  std::string weight_decay_incr_style = "constant";
  bool use_checkpoint_opt_param_scheduler = false;
  bool override_opt_param_scheduler = false;
};
SchedulerConfig make_scheduler_config(const IterationScheduleArgs& args);

// What a checkpoint stores (Megatron's state_dict keys).
struct SchedulerState {
  double max_lr = 0.0;
  double min_lr = 0.0;
  double warmup_steps = 0.0;
  int64_t decay_steps = 0;
  std::string decay_style;
  double start_wd = 0.0;
  double end_wd = 0.0;
  int64_t wd_incr_steps = 0;
  std::string wd_incr_style;
  int64_t num_steps = 0;
};

class OptimizerParamScheduler {
 public:
  // Validates the config (errors name the values). When `optimizer` is given, every step()
  // writes lr() and weight_decay() into it. Starts at step 0 (and sets the optimizer).
  explicit OptimizerParamScheduler(SchedulerConfig config, Optimizer* optimizer = nullptr);

  void step(int64_t increment);
  int64_t num_steps() const { return num_steps_; }
  double lr() const;            // at num_steps()
  double weight_decay() const;  // at num_steps()
  const SchedulerConfig& config() const { return config_; }

  SchedulerState state() const;
  // Megatron's load_state_dict: checks or adopts the saved schedule, then jumps to num_steps.
  void load_state(const SchedulerState& state);

 private:
  void apply();
  SchedulerConfig config_;
  Optimizer* optimizer_ = nullptr;
  int64_t num_steps_ = 0;
};

}  // namespace moe::optim

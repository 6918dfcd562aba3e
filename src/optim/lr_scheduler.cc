#include "moe/optim/lr_scheduler.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "moe/optim/optimizer.h"
#include "moe/tensor/error.h"

namespace moe::optim {

namespace {

bool is_one_of(const std::string& value, std::initializer_list<const char*> choices) {
  for (const char* choice : choices) {
    if (value == choice) return true;
  }
  return false;
}

void validate(const SchedulerConfig& c) {
  MOE_CHECK(c.min_lr >= 0.0, "--min-lr must be >= 0, got ", c.min_lr);
  MOE_CHECK(c.max_lr >= c.min_lr, "--lr (", c.max_lr, ") must be >= --min-lr (", c.min_lr, ")");
  MOE_CHECK(c.init_lr <= c.max_lr, "--lr-warmup-init (", c.init_lr, ") must be <= --lr (", c.max_lr,
            ")");
  MOE_CHECK(c.decay_steps > 0, "the learning-rate decay length must be positive, got ",
            c.decay_steps, " steps (--lr-decay-iters x --global-batch-size)");
  MOE_CHECK(c.warmup_steps >= 0.0 && c.warmup_steps < double(c.decay_steps), "warmup steps (",
            c.warmup_steps, ") must be in [0, decay steps = ", c.decay_steps,
            "): check --lr-warmup-iters / --lr-warmup-fraction against --lr-decay-iters");
  MOE_CHECK(
      is_one_of(c.decay_style, {"constant", "linear", "cosine", "inverse-square-root", "WSD"}),
      "--lr-decay-style '", c.decay_style,
      "' is not one of constant, linear, cosine, inverse-square-root, WSD");
  if (c.decay_style == "WSD") {
    MOE_CHECK(c.wsd_decay_steps > 0 && c.wsd_decay_steps <= c.decay_steps,
              "--lr-decay-style WSD needs --lr-wsd-decay-iters in (0, --lr-decay-iters]; got ",
              c.wsd_decay_steps, " of ", c.decay_steps, " steps");
    MOE_CHECK(is_one_of(c.wsd_decay_style, {"linear", "cosine", "exponential", "minus_sqrt"}),
              "--lr-wsd-decay-style '", c.wsd_decay_style,
              "' is not one of linear, cosine, exponential, minus_sqrt");
  }
  MOE_CHECK(c.start_wd >= 0.0, "--start-weight-decay must be >= 0, got ", c.start_wd);
  MOE_CHECK(c.end_wd >= c.start_wd, "--end-weight-decay (", c.end_wd,
            ") must be >= --start-weight-decay (", c.start_wd, ")");
  MOE_CHECK(is_one_of(c.wd_incr_style, {"constant", "linear", "cosine"}),
            "--weight-decay-incr-style '", c.wd_incr_style,
            "' is not one of constant, linear, cosine");
  MOE_CHECK(c.wd_incr_style != "constant" || c.start_wd == c.end_wd,
            "--weight-decay-incr-style constant needs --start-weight-decay (", c.start_wd,
            ") == --end-weight-decay (", c.end_wd, ")");
  MOE_CHECK(c.wd_incr_style == "constant" || c.wd_incr_steps > 0,
            "weight-decay increment length must be positive, got ", c.wd_incr_steps);
  MOE_CHECK(!(c.override_opt_param_scheduler && c.use_checkpoint_opt_param_scheduler),
            "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler conflict");
}

}  // namespace

SchedulerConfig make_scheduler_config(const IterationScheduleArgs& args) {
  MOE_CHECK(args.train_iters > 0, "--train-iters must be positive, got ", args.train_iters);
  MOE_CHECK(args.global_batch_size > 0, "--global-batch-size must be positive, got ",
            args.global_batch_size);
  SchedulerConfig c;
  c.init_lr = args.lr_warmup_init;
  c.max_lr = args.lr;
  c.min_lr = args.min_lr;
  int64_t decay_iters = args.lr_decay_iters.value_or(args.train_iters);
  c.decay_steps = decay_iters * args.global_batch_size;
  if (args.lr_warmup_fraction) {
    MOE_CHECK(*args.lr_warmup_fraction >= 0.0 && *args.lr_warmup_fraction < 1.0,
              "--lr-warmup-fraction must be in [0, 1), got ", *args.lr_warmup_fraction);
    c.warmup_steps = *args.lr_warmup_fraction * double(c.decay_steps);
  } else {
    c.warmup_steps = double(args.lr_warmup_iters * args.global_batch_size);
  }
  c.decay_style = args.lr_decay_style;
  c.wsd_decay_steps = args.lr_wsd_decay_iters.value_or(0) * args.global_batch_size;
  c.wsd_decay_style = args.lr_wsd_decay_style;
  c.start_wd = args.start_weight_decay;
  c.end_wd = args.end_weight_decay;
  c.wd_incr_steps = args.train_iters * args.global_batch_size;
  c.wd_incr_style = args.weight_decay_incr_style;
  c.use_checkpoint_opt_param_scheduler = args.use_checkpoint_opt_param_scheduler;
  c.override_opt_param_scheduler = args.override_opt_param_scheduler;
  return c;
}

OptimizerParamScheduler::OptimizerParamScheduler(SchedulerConfig config, Optimizer* optimizer)
    : config_(std::move(config)), optimizer_(optimizer) {
  validate(config_);
  apply();
}

void OptimizerParamScheduler::step(int64_t increment) {
  MOE_CHECK(increment >= 0, "scheduler step increment must be >= 0, got ", increment);
  num_steps_ += increment;
  apply();
}

void OptimizerParamScheduler::apply() {
  if (optimizer_ == nullptr) return;
  optimizer_->set_lr(lr());
  optimizer_->set_weight_decay(weight_decay());
}

double OptimizerParamScheduler::weight_decay() const {
  const SchedulerConfig& c = config_;
  if (num_steps_ > c.wd_incr_steps || c.wd_incr_style == "constant") return c.end_wd;
  double ratio = double(num_steps_) / double(c.wd_incr_steps);
  double coeff = c.wd_incr_style == "linear"
                     ? ratio
                     : 0.5 * (std::cos(std::numbers::pi * (1.0 - ratio)) + 1.0);
  return c.start_wd + coeff * (c.end_wd - c.start_wd);
}

double OptimizerParamScheduler::lr() const {
  const SchedulerConfig& c = config_;
  double n = double(num_steps_);
  if (c.warmup_steps > 0.0 && n <= c.warmup_steps) {
    return c.init_lr + (c.max_lr - c.init_lr) * n / c.warmup_steps;
  }
  if (c.decay_style == "constant") return c.max_lr;
  if (num_steps_ > c.decay_steps) return c.min_lr;
  if (c.decay_style == "inverse-square-root") {
    double warmup = std::max(c.warmup_steps, 1.0);
    double steps = std::max(n, 1.0);
    return std::max(c.min_lr, c.max_lr * std::sqrt(warmup) / std::sqrt(steps));
  }
  double ratio = (n - c.warmup_steps) / (double(c.decay_steps) - c.warmup_steps);
  double coeff = 0.0;
  if (c.decay_style == "linear") {
    coeff = 1.0 - ratio;
  } else if (c.decay_style == "cosine") {
    coeff = 0.5 * (std::cos(std::numbers::pi * ratio) + 1.0);
  } else {  // WSD: constant, then anneal over the last wsd_decay_steps
    int64_t anneal_start = c.decay_steps - c.wsd_decay_steps;
    if (num_steps_ <= anneal_start) {
      coeff = 1.0;
    } else {
      double s = double(num_steps_ - anneal_start) / double(c.wsd_decay_steps);
      if (c.wsd_decay_style == "linear") {
        coeff = 1.0 - s;
      } else if (c.wsd_decay_style == "cosine") {
        coeff = 0.5 * (std::cos(std::numbers::pi * s) + 1.0);
      } else if (c.wsd_decay_style == "exponential") {
        coeff = 2.0 * std::pow(0.5, s) - 1.0;
      } else {
        coeff = 1.0 - std::sqrt(s);
      }
    }
  }
  return c.min_lr + coeff * (c.max_lr - c.min_lr);
}

SchedulerState OptimizerParamScheduler::state() const {
  const SchedulerConfig& c = config_;
  return {c.max_lr,   c.min_lr, c.warmup_steps,  c.decay_steps,   c.decay_style,
          c.start_wd, c.end_wd, c.wd_incr_steps, c.wd_incr_style, num_steps_};
}

namespace {

// Megatron's _check_and_set: keep ours (override), take the checkpoint's (use_checkpoint), or
// insist that they agree.
template <class T>
T check_and_set(const SchedulerConfig& c, const T& ours, const T& saved, const char* what) {
  if (c.override_opt_param_scheduler) return ours;
  if (c.use_checkpoint_opt_param_scheduler) return saved;
  MOE_CHECK(ours == saved, "scheduler ", what, " from the arguments (", ours,
            ") differs from the checkpoint (", saved,
            "); pass --override-opt-param-scheduler or --use-checkpoint-opt-param-scheduler");
  return ours;
}

}  // namespace

void OptimizerParamScheduler::load_state(const SchedulerState& s) {
  SchedulerConfig c = config_;
  c.max_lr = check_and_set(c, c.max_lr, s.max_lr, "learning rate");
  c.min_lr = check_and_set(c, c.min_lr, s.min_lr, "minimum learning rate");
  c.warmup_steps = check_and_set(c, c.warmup_steps, s.warmup_steps, "warmup steps");
  c.decay_steps = check_and_set(c, c.decay_steps, s.decay_steps, "decay steps");
  c.decay_style = check_and_set(c, c.decay_style, s.decay_style, "decay style");
  c.start_wd = check_and_set(c, c.start_wd, s.start_wd, "start weight decay");
  c.end_wd = check_and_set(c, c.end_wd, s.end_wd, "end weight decay");
  c.wd_incr_steps = check_and_set(c, c.wd_incr_steps, s.wd_incr_steps, "weight decay steps");
  c.wd_incr_style = check_and_set(c, c.wd_incr_style, s.wd_incr_style, "weight decay style");
  validate(c);
  MOE_CHECK(s.num_steps >= 0, "scheduler num_steps from checkpoint must be >= 0, got ",
            s.num_steps);
  config_ = c;
  num_steps_ = s.num_steps;
  apply();
}

}  // namespace moe::optim

#include "moe/optim/grad_scaler.h"

#include <algorithm>
#include <cmath>

#include "moe/tensor/error.h"

namespace moe::optim {

GradScaler::GradScaler() {
  state_.scale = 1.0;
}

GradScaler GradScaler::constant(double scale) {
  MOE_CHECK(scale > 0.0 && std::isfinite(scale), "--loss-scale must be a positive number, got ",
            scale);
  GradScaler scaler;
  scaler.state_.scale = scale;
  return scaler;
}

GradScaler GradScaler::dynamic(double initial_scale, double min_scale, int64_t growth_interval,
                               int64_t hysteresis, double growth_factor, double backoff_factor) {
  MOE_CHECK(min_scale > 0.0, "--min-loss-scale must be positive, got ", min_scale);
  MOE_CHECK(initial_scale >= min_scale && std::isfinite(initial_scale), "--initial-loss-scale (",
            initial_scale, ") must be finite and >= --min-loss-scale (", min_scale, ")");
  MOE_CHECK(growth_interval > 0, "--loss-scale-window must be positive, got ", growth_interval);
  MOE_CHECK(hysteresis > 0, "--hysteresis must be positive, got ", hysteresis);
  MOE_CHECK(growth_factor > 1.0, "loss-scale growth factor must be > 1, got ", growth_factor);
  MOE_CHECK(backoff_factor > 0.0 && backoff_factor < 1.0,
            "loss-scale backoff factor must be in (0, 1), got ", backoff_factor);
  GradScaler scaler;
  scaler.dynamic_ = true;
  scaler.state_ = {initial_scale, 0, hysteresis};
  scaler.min_scale_ = min_scale;
  scaler.growth_factor_ = growth_factor;
  scaler.backoff_factor_ = backoff_factor;
  scaler.growth_interval_ = growth_interval;
  scaler.hysteresis_ = hysteresis;
  return scaler;
}

void GradScaler::update(bool found_inf) {
  if (!dynamic_) return;
  if (found_inf) {
    state_.growth_tracker = 0;
    state_.hysteresis_tracker -= 1;
    // Only a run of `hysteresis` bad iterations lowers the scale; each further one lowers it again.
    if (state_.hysteresis_tracker <= 0) {
      state_.scale = std::max(state_.scale * backoff_factor_, min_scale_);
    }
    return;
  }
  state_.growth_tracker += 1;
  if (state_.growth_tracker == growth_interval_) {
    state_.growth_tracker = 0;
    state_.hysteresis_tracker = hysteresis_;
    state_.scale *= growth_factor_;
  }
}

void GradScaler::set_state(const GradScalerState& state) {
  // A constant (or absent) scale comes from the flags, as Megatron's ConstantGradScaler ignores
  // the checkpoint.
  if (!dynamic_) return;
  MOE_CHECK(state.scale > 0.0 && std::isfinite(state.scale),
            "loss scale from checkpoint must be a positive number, got ", state.scale);
  state_ = state;
}

}  // namespace moe::optim

// Loss scaling for fp16 (Megatron's ConstantGradScaler / DynamicGradScaler). The loss is
// multiplied by scale() before backward and the gradients divided by it before the update.
// Dynamic scaling backs off after `hysteresis` consecutive iterations with inf/NaN gradients
// (scale = max(scale * backoff_factor, min_scale)) and grows by growth_factor after
// growth_interval (--loss-scale-window) consecutive clean iterations, which also refills the
// hysteresis budget.
#pragma once

#include <cstdint>

namespace moe::optim {

struct GradScalerState {
  double scale = 1.0;
  int64_t growth_tracker = 0;
  int64_t hysteresis_tracker = 0;
};

class GradScaler {
 public:
  // Always scale 1, never changes (bf16 / fp32 training).
  GradScaler();
  // A constant scale (--loss-scale).
  static GradScaler constant(double scale);
  // Megatron's defaults: growth_factor 2, backoff_factor 0.5.
  static GradScaler dynamic(double initial_scale, double min_scale, int64_t growth_interval,
                            int64_t hysteresis, double growth_factor = 2.0,
                            double backoff_factor = 0.5);

  double scale() const { return state_.scale; }
  bool is_dynamic() const { return dynamic_; }
  // Records one iteration's outcome and adjusts the scale (dynamic only).
  void update(bool found_inf);

  GradScalerState state() const { return state_; }
  void set_state(const GradScalerState& state);

 private:
  GradScalerState state_;
  bool dynamic_ = false;
  double min_scale_ = 1.0;
  double growth_factor_ = 2.0;
  double backoff_factor_ = 0.5;
  int64_t growth_interval_ = 1000;
  int64_t hysteresis_ = 2;
};

}  // namespace moe::optim

// The optimizer: Megatron-Core's MixedPrecisionOptimizer / DistributedOptimizer on a
// ParameterStore. One step() does, in order:
//   1. data-parallel gradient reduction: dense gradients summed over the dp (x cp) group, expert
//      gradients over the expert-dp group, both scaled by 1 / (dp x cp) first, so the result is
//      the mean over data-parallel replicas (Megatron's gradient_scaling_factor). With the
//      distributed optimizer this is a reduce-scatter: each rank keeps only its shard.
//   2. unscaling by 1 / loss_scale (fp16) and an inf/NaN check agreed by every rank: on inf/NaN
//      the step is skipped (parameters and optimizer state untouched) and the loss scaler backs
//      off (dynamic scaling, with hysteresis).
//   3. the global gradient L2 norm over every parameter exactly once (data-parallel replicas and
//      tensor-parallel duplicates excluded, pipeline stages and expert shards included) and
//      clipping by clip_grad / (norm + 1e-6) when that is below 1.
//   4. Adam (decoupled weight decay, as torch.optim.AdamW) or SGD with momentum on fp32 main
//      parameters, then the copy back into the model parameters (rounded to bf16/fp16); with the
//      distributed optimizer the updated shards are all-gathered.
//
// Gradients: step() reads the accumulated fp32 gradient buffers and leaves them reduced and
// scaled; the caller clears them (ParameterStore::zero_grads) before the next accumulation.
// Losses: the caller multiplies each micro-batch loss by loss_scale() / num_micro_batches before
// backward, as Megatron does; step() averages over data-parallel ranks itself.
//
// Weight decay applies to a parameter when its ParamSpec says so AND it is neither 1-D nor a
// ".bias" (Megatron's default no-decay rule for norms and biases). Persistent buffers
// (ParamSpec::trainable false) are neither updated, decayed nor counted in the norm.
//
// Every rank of the world must call step() (it runs collectives over the world).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/optim/grad_scaler.h"
#include "moe/tensor/parameters.h"

namespace moe::optim {

// Megatron's argument names (without dashes) and defaults.
struct OptimizerConfig {
  std::string optimizer = "adam";  // adam | sgd
  double lr = 1e-4;                // initial value; the scheduler overwrites it every step
  double min_lr = 0.0;             // used by the scheduler
  double weight_decay = 0.01;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_eps = 1e-8;
  double sgd_momentum = 0.9;
  double clip_grad = 1.0;  // max global L2 norm; 0 disables clipping (the norm is still reported)
  bool use_distributed_optimizer = false;
  bool bf16 = false;        // model parameters bf16 (the store's dtype must agree)
  bool fp16 = false;        // model parameters fp16, dynamic loss scaling unless loss_scale > 0
  double loss_scale = 0.0;  // > 0: constant loss scale (fp16 only)
  double initial_loss_scale = 4294967296.0;  // 2^32
  double min_loss_scale = 1.0;
  int loss_scale_window = 1000;
  int hysteresis = 2;
  bool log_num_zeros_in_grad = false;
  // moecore's --check-grad-reduction (a debug aid): the first step() also sums every gradient
  // element in fp64 over its group and checks the reduced gradients against it, element by
  // element, and that the group has the ranks the layout says (dense: dp x cp, experts:
  // expert-dp), so a doubled, missing or misdirected reduction stops the run.
  bool check_grad_reduction = false;
};

// Throws moe::Error naming the flag when a value is out of range or two flags conflict.
void validate(const OptimizerConfig& config);

struct StepResult {
  bool skipped = false;     // inf/NaN in the gradients: nothing was updated
  double grad_norm = 0.0;   // global L2 norm after unscaling, before clipping (NaN/inf if skipped)
  double clip_coeff = 1.0;  // factor the gradients were multiplied by (1 when not clipped)
  double loss_scale = 1.0;  // the scale in effect for the NEXT iteration
  int64_t num_zeros = -1;   // zero gradient elements (global), when log_num_zeros_in_grad
  // With check_grad_reduction, on the step that ran the check: what it verified, per group.
  std::string grad_reduction_check;
};

// Bytes held by this rank. With the distributed optimizer main_param and optimizer_state fall
// as 1 / dp (expert parts as 1 / expert-dp).
struct MemoryReport {
  int64_t param_bytes = 0;            // model parameters (model dtype)
  int64_t grad_bytes = 0;             // fp32 gradient buffers (+ the reduce-scatter shard)
  int64_t main_param_bytes = 0;       // fp32 main parameters (0 when they alias fp32 params)
  int64_t optimizer_state_bytes = 0;  // Adam moments / SGD momentum
};

// One piece of optimizer state for checkpoints: elements [flat_begin, flat_end) of a parameter's
// local tensor (row-major), as a fp32 view into the optimizer's storage.
struct StateTensor {
  std::string kind;  // "main_param", "exp_avg", "exp_avg_sq", "momentum_buffer"
  ParamHandle param;
  int64_t flat_begin = 0;
  int64_t flat_end = 0;
  Tensor data;  // F32 [flat_end - flat_begin], writable view
};

// Scalars that a checkpoint must restore for bitwise resumption.
struct OptimizerScalars {
  int64_t step = 0;  // successful updates so far (Adam's bias-correction step)
  GradScalerState scaler;
};

class Optimizer {
 public:
  // The store must be allocated and its dtype must match bf16/fp16. `parallel` must outlive
  // the optimizer. Collective over the world (checks that replicas hold the same sizes).
  Optimizer(ParameterStore& store, const comm::ParallelState& parallel, OptimizerConfig config);
  ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  StepResult step();

  void set_lr(double lr);
  double lr() const;
  void set_weight_decay(double weight_decay);
  double weight_decay() const;
  // Multiply the loss by this before backward (1 unless fp16).
  double loss_scale() const;

  const OptimizerConfig& config() const;
  MemoryReport memory() const;
  // One line for the start-up log: the MemoryReport in MiB and how the state is sharded.
  std::string memory_summary() const;

  // Checkpoint support. state_tensors() lists this rank's share of the optimizer state (the
  // main parameters only when they are separate from the model parameters).
  std::vector<StateTensor> state_tensors();
  OptimizerScalars scalars() const;
  void set_scalars(const OptimizerScalars& scalars);
  // Re-reads the fp32 main parameters from the model parameters (after the model was loaded).
  void reload_main_params();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe::optim

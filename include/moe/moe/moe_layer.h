// MoELayer: Megatron-Core's MoELayer on this package's runtime. forward routes each token to
// its top-k experts (TopKRouter), moves the tokens to the local experts (a TokenDispatcher),
// runs them (SequentialMLP or GroupedMLP) and combines the probability-weighted outputs back
// into token order. backward returns d(input) and accumulates the gradients of the router
// weight and the expert weights, including the router's gradients through the routing
// probabilities and through the aux and z losses.
//
// Gradient buffers: every parameter gradient in the ParameterStore ACCUMULATES (+=), so
// micro-batches sum until zero_grads(); backward's returned input gradient is a new tensor.
//
// Micro-batches: all saved state lives in the MoEContext passed to forward and consumed by
// backward, so any number of micro-batches may be in flight (the context's memory is freed by
// backward or when the context is destroyed).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "moe/moe/config.h"
#include "moe/moe/experts.h"
#include "moe/moe/router.h"
#include "moe/moe/token_dispatcher.h"
#include "moe/tensor/parameters.h"
#include "moe/tensor/tensor.h"

namespace moe {

struct MoEContext {
  Shape input_shape;
  DType dtype = DType::F32;
  bool training = true;
  RouterContext router;
  DispatchContext dispatch;
  ExpertsContext experts;
  bool has_saved_state = false;  // set by forward, cleared by backward
};

class MoELayer {
 public:
  // Declares "<prefix>.router.*" (dense) and "<prefix>.experts.*" (expert) parameters in the
  // store. dispatcher: null means a LocalTokenDispatcher over all experts (one process); an
  // expert-parallel dispatcher decides which experts are local. config.validate() is called.
  MoELayer(const MoEConfig& config, ParameterStore& store, const std::string& prefix,
           std::unique_ptr<TokenDispatcher> dispatcher = nullptr, uint64_t jitter_seed = 0);

  // hidden: [T, H] or [S, B, H] (Megatron's layout), dtype of the store's parameters.
  // Returns the output of the same shape and dtype; the micro-batch's aux and z losses are in
  // ctx.router.losses (see losses()). The context may keep a view of `hidden` (fp32 without
  // jitter): leave it unchanged until backward.
  Tensor forward(const Tensor& hidden, MoEContext& ctx, bool training = true);
  // grad_output: same shape/dtype as the output. Returns d(hidden) (new tensor). The aux and z
  // losses contribute with gradient aux_loss_grad_scale (Megatron's MoEAuxLossAutoScaler
  // scale: 1 for a single micro-batch, 1 / num_micro_batches under gradient accumulation).
  Tensor backward(MoEContext& ctx, const Tensor& grad_output, double aux_loss_grad_scale = 1.0);

  static const RouterLosses& losses(const MoEContext& ctx) { return ctx.router.losses; }

  // Router weight and fc1 ~ N(0, std), fc2 ~ N(0, output_std); biases zero. Deterministic in
  // seed and independent of expert placement.
  void init_parameters(uint64_t seed, float std, float output_std);

  // Once per global batch, after the step's last backward: the router's aux-loss-free bias
  // update with the loads summed over `group` (Megatron: the tensor x data x context parallel
  // ranks of this pipeline stage; collective) and the global_aux_loss reset. See router.h.
  void update_expert_bias(const comm::ProcessGroup& group) { router_.update_expert_bias(group); }
  void reset_global_aux_loss_tracker() { router_.reset_global_aux_loss_tracker(); }

  TopKRouter& router() { return router_; }
  const Experts& experts() const { return *experts_; }
  TokenDispatcher& dispatcher() { return *dispatcher_; }
  const MoEConfig& config() const { return config_; }

 private:
  MoEConfig config_;
  std::unique_ptr<TokenDispatcher> dispatcher_;
  TopKRouter router_;
  std::unique_ptr<Experts> experts_;
};

}  // namespace moe

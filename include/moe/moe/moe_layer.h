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
// Tensor parallelism: the layer owns its policy. With sequence parallelism each tp rank's rows
// are already its own tokens. Without it the tp ranks hold the same tokens, and each runs only
// its own block of sequence positions (no duplicated expert work, expert gradients from disjoint
// tokens) and all-gathers the outputs, as sequence parallelism would. In both cases the aux
// loss counts tokens over tp (Megatron's get_tokens_per_expert_and_token_count) and the z-loss
// coefficient is divided by tp, so the router gradients summed over tp (the model's
// finalize_grads) are those of the whole micro-batch. With context parallelism (a tp_cp group
// larger than tp) the counts, the z-loss divisor and the reported losses are over tensor x
// context ranks instead (Megatron's router tp_cp_group), and the aux and z-loss gradients are
// scaled by cp, as Megatron's schedule does, because dense gradients are averaged over dp x cp.
//
// Micro-batches: all saved state lives in the MoEContext passed to forward and consumed by
// backward, so any number of micro-batches may be in flight (the context's memory is freed by
// backward or when the context is destroyed).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/moe/config.h"
#include "moe/moe/experts.h"
#include "moe/moe/router.h"
#include "moe/moe/token_dispatcher.h"
#include "moe/tensor/parameters.h"
#include "moe/tensor/tensor.h"

namespace moe {

struct MoEContext {
  Shape input_shape;  // the layer's input, all tp ranks' tokens when it splits them
  DType dtype = DType::F32;
  bool training = true;
  RouterContext router;
  DispatchContext dispatch;
  ExpertsContext experts;
  RouterLosses losses;           // the micro-batch's router losses, summed over tp x cp (see above)
  bool has_saved_state = false;  // set by forward, cleared by backward
};

class MoELayer {
 public:
  // Declares "<prefix>.router.*" (dense) and "<prefix>.experts.*" (expert) parameters in the
  // store. dispatcher: null means a LocalTokenDispatcher over all experts (one process); an
  // expert-parallel dispatcher decides which experts are local. tp: the tensor-parallel group
  // the layer sits in (see above). stage_group: every rank that holds this layer's tokens
  // (Megatron's tensor x data x context parallel group of the pipeline stage), over which the
  // expert-bias loads and the global_aux_loss counts are summed. tp_cp_group: the tensor x
  // context ranks (see above; the self group or the tp group without context parallelism).
  // config.validate() is called.
  MoELayer(const MoEConfig& config, ParameterStore& store, const std::string& prefix,
           std::unique_ptr<TokenDispatcher> dispatcher = nullptr, uint64_t jitter_seed = 0,
           comm::TensorParallel tp = {}, comm::ProcessGroup stage_group = {},
           comm::ProcessGroup tp_cp_group = {});

  // hidden: [T, H] or [S, B, H] (Megatron's layout), dtype of the store's parameters. When the
  // layer splits tokens over tp, S (or T) must divide by the tp size.
  // Returns the output of the same shape and dtype; the micro-batch's aux and z losses are in
  // losses(ctx). The context may keep a view of `hidden` (fp32 without
  // jitter): leave it unchanged until backward. replay: null for a first run; to recompute a
  // forward (full activation recomputation), ctx.router.replay of that run, so the rerun
  // repeats it exactly and the balancing state (expert-bias loads, global_aux_loss counts,
  // jitter generator) changes once (see router.h).
  Tensor forward(const Tensor& hidden, MoEContext& ctx, bool training = true,
                 const RouterReplay* replay = nullptr);
  // grad_output: same shape/dtype as the output. Returns d(hidden) (new tensor). The aux and z
  // losses contribute with gradient aux_loss_grad_scale (Megatron's MoEAuxLossAutoScaler
  // scale: 1 for a single micro-batch, 1 / num_micro_batches under gradient accumulation).
  Tensor backward(MoEContext& ctx, const Tensor& grad_output, double aux_loss_grad_scale = 1.0);

  static const RouterLosses& losses(const MoEContext& ctx) { return ctx.losses; }

  // Router weight and fc1 ~ N(0, std), fc2 ~ N(0, output_std); biases zero. Deterministic in
  // seed and independent of expert placement.
  void init_parameters(uint64_t seed, float std, float output_std);

  // True when tp > 1 without sequence parallelism: each tp rank routes its own block.
  bool splits_tokens() const { return tp_.size() > 1 && !tp_.sequence_parallel; }

  // Parameters whose gradient on a tp rank covers only that rank's tokens whenever tp > 1 (the
  // router's), to be summed over tp once per step; empty without tensor parallelism.
  std::vector<ParamHandle> tensor_parallel_partial_params() const;
  // Once per global batch, after the step's last backward (GPTModel::finalize_grads, as
  // Megatron's finalize_model_grads): the router's aux-loss-free bias update with the loads
  // summed over the stage group, and the global_aux_loss reset. Collective over the stage group
  // when the expert bias is on.
  void finish_step();

  TopKRouter& router() { return router_; }
  const TopKRouter& router() const { return router_; }
  const Experts& experts() const { return *experts_; }
  TokenDispatcher& dispatcher() { return *dispatcher_; }
  const MoEConfig& config() const { return config_; }

 private:
  // This tp rank's block of `full` (dim 0) when the layer splits tokens, else `full`.
  Tensor own_block(const Tensor& full) const;
  // The inverse: every tp rank's block gathered along dim 0 when the layer splits tokens.
  Tensor gather_blocks(const Tensor& own) const;

  MoEConfig config_;
  comm::TensorParallel tp_;
  comm::ProcessGroup stage_group_;
  comm::ProcessGroup loss_group_;  // tp x cp ranks: aux-loss counts, z-loss divisor, loss sums
  std::unique_ptr<TokenDispatcher> dispatcher_;
  TopKRouter router_;
  std::unique_ptr<Experts> experts_;
};

}  // namespace moe

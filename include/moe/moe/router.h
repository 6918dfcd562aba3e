// TopKRouter: Megatron-Core's router. For each token it computes fp32 gating logits
// (hidden -> num_experts), picks moe_router_topk experts with the configured score function,
// and computes the load-balancing (aux / seq-aux) and z losses. The losses do not change the
// layer's output: as Megatron's MoEAuxLossAutoScaler does, their gradients are added to the
// logits' gradient in backward, scaled by the caller's aux-loss backward scale.
//
// Precision: logits, scores, probabilities and losses are fp32 (fp64 when the activations are
// fp64, the gradient-check path), whatever the activation dtype; the weight is stored in the
// parameter dtype and widened (exactly) for the product, as Megatron's --moe-router-dtype fp32.
//
// Input jitter (moe_input_jitter_eps): the router input is multiplied by uniform noise in
// [1 - eps, 1 + eps) from the router's own seeded generator, in training AND evaluation (as
// Megatron does). Only the router sees the jittered input; the experts get the original.
//
// Ties: top-k orders equal scores by lower expert index first.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "moe/moe/config.h"
#include "moe/tensor/parameters.h"
#include "moe/tensor/rng.h"
#include "moe/tensor/tensor.h"

namespace moe {

// The router's decision for a micro-batch of T tokens (before any capacity dropping).
struct Routing {
  int64_t num_tokens = 0;
  int64_t topk = 0;
  Tensor experts;  // [T, topk] I32: chosen expert ids; slot order = descending score
  Tensor probs;    // [T, topk] F32 (F64 on the fp64 path): combine weight of each slot
};

// The losses of one micro-batch, coefficients included (what the training objective adds).
// Megatron logs load_balancing_loss / moe_aux_loss_coeff and z_loss / moe_z_loss_coeff.
struct RouterLosses {
  double load_balancing_loss = 0.0;  // aux_loss or seq_aux_loss; 0 when disabled
  double z_loss = 0.0;               // 0 when disabled or not training
};

// What backward needs from one forward (one per micro-batch in flight).
struct RouterContext {
  Shape input_shape;       // [T, H] or [S, B, H]
  int64_t batch_size = 1;  // B (sequences); tokens are ordered t = s * B + b as in Megatron
  Tensor router_input;     // [T, H] F32/F64: the (jittered) input the gating product saw
  Tensor jitter_noise;     // [T, H] F32/F64 noise factors, undefined without jitter
  Tensor logits;           // [T, E] F32/F64
  Routing routing;
  bool training = true;
  bool aux_loss_active = false;
  bool z_loss_active = false;
  Tensor aux_tokens_per_expert;  // [E] (aux_loss) or [B, E] (seq_aux_loss) counts, F32/F64
  double aux_token_count = 0.0;  // the T of the loss formula (global count when reduced)
  RouterLosses losses;
};

class TopKRouter {
 public:
  // Declares "<prefix>.weight" [H, E] (and "<prefix>.bias" [E] with add_bias_linear) as dense,
  // tensor-parallel-duplicated parameters. config must be valid.
  TopKRouter(const MoEConfig& config, ParameterStore& store, const std::string& prefix,
             uint64_t jitter_seed = 0);

  // hidden: [T, H] or [S, B, H] (Megatron's sequence-major layout). Returns the routing;
  // the losses are in ctx.losses. The aux and z losses are computed only when training.
  Routing forward(const Tensor& hidden, RouterContext& ctx, bool training = true);

  // grad_probs [T, topk] (F32/F64): d(objective)/d(routing.probs). Adds (+=) the router's
  // contribution to grad_hidden (same shape and dtype as the forward input) and accumulates
  // (+=) the weight and bias gradients in the store. aux_loss_grad_scale is the gradient of
  // the objective with respect to each aux/z loss (Megatron's main_loss_backward_scale,
  // e.g. 1 / num_micro_batches).
  void backward(RouterContext& ctx, const Tensor& grad_probs, Tensor& grad_hidden,
                double aux_loss_grad_scale = 1.0);

  // With expert or data parallelism the aux loss counts tokens over a group: this hook gets
  // the local per-expert counts ([E], or [B, E] for seq_aux_loss) and token count, and may
  // replace them in place with the reduced ones (Megatron's
  // get_tokens_per_expert_and_token_count). Unset: the local counts are used. Called on every
  // training forward with the aux loss on, also with zero local tokens (zero counts), since a
  // reducer is a collective the group's other ranks enter.
  using AuxCountReducer = std::function<void(Tensor& tokens_per_expert, double& token_count)>;
  void set_aux_count_reducer(AuxCountReducer reducer) { aux_count_reducer_ = std::move(reducer); }

  // When the tokens of a sequence are split over a group (tensor / context parallel ranks, each
  // routing its own share, router gradients summed over the group), the z-loss coefficient is
  // divided by the group size, as Megatron divides moe_z_loss_coeff by the tp x cp size, so the
  // summed gradient is that of the mean over all the group's tokens. Default 1.
  void set_z_loss_group_size(int64_t group_size);

  // Normal(0, std) weight from a generator derived from seed; bias zero.
  void init_parameters(uint64_t seed, float std);

  // The router's parameters (weight, and bias when present), e.g. for gradient reductions.
  std::vector<ParamHandle> params() const;
  Tensor weight() const;       // [H, E] param dtype
  Tensor weight_grad() const;  // [H, E] F32, accumulates
  bool has_bias() const { return bias_.index >= 0; }
  Tensor bias() const;                       // [E]
  Tensor bias_grad() const;                  // [E] F32, accumulates
  Rng& jitter_rng() { return jitter_rng_; }  // its state belongs in checkpoints
  const MoEConfig& config() const { return config_; }

 private:
  double z_loss_coeff() const;  // moe_z_loss_coeff / z-loss group size

  MoEConfig config_;
  ParameterStore& store_;
  ParamHandle weight_, bias_;
  Rng jitter_rng_;
  AuxCountReducer aux_count_reducer_;
  int64_t z_loss_group_size_ = 1;
};

// Megatron's `sinkhorn` (S-BASE): exp(cost) scaled by row and column factors until the mean
// change of the column factors is <= tol. cost [T, E] F32/F64; returns the same shape.
// Rows sum to ~1/T and columns to ~1/E.
Tensor sinkhorn(const Tensor& cost, double tol = 1e-4);

}  // namespace moe

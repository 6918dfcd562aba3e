// TopKRouter: Megatron-Core's router. For each token it computes fp32 gating logits
// (hidden -> num_experts), picks moe_router_topk experts with the configured score function,
// and computes the load-balancing (aux / seq-aux) and z losses. The losses do not change the
// layer's output: as Megatron's MoEAuxLossAutoScaler does, their gradients are added to the
// logits' gradient in backward, scaled by the caller's aux-loss backward scale.
//
// Precision (moe_router_dtype): logits, scores, probabilities and losses are computed in fp32
// or fp64 as set; unset means fp32 (fp64 when the activations are fp64, the gradient-check path)
// whatever the activation dtype, i.e. Megatron's --moe-router-dtype fp32 (Megatron's unset would
// route in bf16). The weight is stored in the parameter dtype and widened (exactly) for the
// product. The returned probabilities are in the activations' compute dtype (fp32, fp64 for fp64
// activations), which the dispatchers combine in.
//
// Group-limited routing (moe_router_num_groups G, moe_router_group_topk g): Megatron's
// group_limited_topk. The experts form G equal groups of consecutive ids; a group's score is
// the sum of its top (topk / g) selection scores; each token picks its g best groups and then
// its topk experts from those groups only. Selection scores are the logits (softmax after top-k),
// the softmax over all experts (pre-softmax) or the sigmoid scores (plus the expert bias).
//
// Aux-loss-free balancing (moe_router_enable_expert_bias, sigmoid scores only): a per-expert
// fp32 bias, a persistent buffer "<prefix>.expert_bias" (Megatron's name and checkpoint entry;
// no gradient, no optimizer update), is added to the sigmoid scores for choosing experts only;
// the probabilities come from the unbiased scores. count_routed_tokens adds the experts' token
// counts (after capacity dropping, as Megatron counts routing_map: MoELayer counts the slots its
// dispatcher kept) to tokens_per_expert(); update_expert_bias, once per global batch, adds
// rate * sign(mean load - load) per expert with the loads summed over a process group, then
// clears the counts.
//
// Recomputation (full activation recomputation re-runs a forward in backward): a forward given
// the RouterReplay its first run left in its context repeats that run exactly (the same jitter
// noise, the same global_aux_loss counts) and changes no state (the jitter generator, the
// global_aux_loss counts), as Megatron's checkpointed forward restores the RNG and counts only
// once (under torch.is_grad_enabled()).
//
// Input jitter (moe_input_jitter_eps): the router input is multiplied by uniform noise in
// [1 - eps, 1 + eps) from the router's own seeded generator, in training AND evaluation (as
// Megatron does). Only the router sees the jittered input; the experts get the original.
//
// Ties: top-k orders equal scores by lower expert index first, and group-limited routing orders
// equal group scores by lower group index first.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "moe/comm/process_group.h"
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

// The losses of one micro-batch, coefficients included (what the training objective adds), 0
// when disabled or not training. Megatron logs each divided by its coefficient, as
// load_balancing_loss, seq_load_balancing_loss, global_load_balancing_loss and z_loss.
struct RouterLosses {
  double load_balancing_loss = 0.0;  // the sum of the three balancing losses below
  double aux_loss = 0.0;             // "aux_loss"
  double seq_aux_loss = 0.0;         // "seq_aux_loss"
  double global_aux_loss = 0.0;      // "global_aux_loss"
  double z_loss = 0.0;

  // The fields in declaration order, so sums and reductions treat every loss alike.
  static constexpr size_t kCount = 5;
  std::array<double, kCount> values() const {
    return {load_balancing_loss, aux_loss, seq_aux_loss, global_aux_loss, z_loss};
  }
  static RouterLosses from_values(const std::array<double, kCount>& v) {
    return {v[0], v[1], v[2], v[3], v[4]};
  }
  RouterLosses& operator+=(const RouterLosses& other) {
    std::array<double, kCount> sum = values(), add = other.values();
    for (size_t i = 0; i < kCount; ++i) sum[i] += add[i];
    return *this = from_values(sum);
  }
};

// What a recomputation of a training forward needs to repeat it (see the top of this file).
struct RouterReplay {
  Rng::State jitter_state;  // the jitter generator before the forward
  Tensor global_counts;     // [E] F64: the global_aux_loss counts its loss used, if any
};

// What backward needs from one forward (one per micro-batch in flight).
struct RouterContext {
  Shape input_shape;       // [T, H] or [S, B, H]
  int64_t batch_size = 1;  // B (sequences); tokens are ordered t = s * B + b as in Megatron
  Tensor router_input;     // [T, H] router dtype: the (jittered) input the gating product saw
  Tensor jitter_noise;     // [T, H] router dtype noise factors, undefined without jitter
  Tensor logits;           // [T, E] router dtype
  Routing routing;
  bool training = true;
  bool z_loss_active = false;
  // d(balancing losses)/d(aux score[t, e]) = aux_score_weights[t % G, e]: [G, E] router dtype,
  // G = B with seq_aux_loss on, else 1; undefined when no balancing loss is active.
  Tensor aux_score_weights;
  RouterLosses losses;
  RouterReplay replay;  // set by every forward, for a recomputation of it
};

class TopKRouter {
 public:
  // Declares "<prefix>.weight" [H, E] (and "<prefix>.bias" [E] with add_bias_linear) as dense,
  // tensor-parallel-duplicated parameters. config must be valid.
  TopKRouter(const MoEConfig& config, ParameterStore& store, const std::string& prefix,
             uint64_t jitter_seed = 0);

  // hidden: [T, H] or [S, B, H] (Megatron's sequence-major layout). Returns the routing;
  // the losses are in ctx.losses. The aux and z losses are computed only when training.
  // replay: null for a first run; for a recomputation, the replay of the run it repeats.
  Routing forward(const Tensor& hidden, RouterContext& ctx, bool training = true,
                  const RouterReplay* replay = nullptr);

  // Aux-loss-free balancing's loads (expert bias on): adds to tokens_per_expert() the expert of
  // every slot of `routing` that was kept, row_of_slot[slot] >= 0 (a DispatchPlan's: -1 when
  // capacity dropped it); empty row_of_slot: every slot. Call once per training forward (not
  // for a recomputation).
  void count_routed_tokens(const Routing& routing, std::span<const int64_t> row_of_slot = {});

  // grad_probs [T, topk] (routing.probs' dtype): d(objective)/d(routing.probs). Adds (+=) the
  // router's contribution to grad_hidden (same shape and dtype as the forward input) and
  // accumulates (+=) the weight and bias gradients in the store. aux_loss_grad_scale is the
  // gradient of the objective with respect to each aux/z loss (Megatron's
  // main_loss_backward_scale, e.g. 1 / num_micro_batches).
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
  // global_aux_loss's reducer, called the same way: Megatron sums its counts over the tensor x
  // data x context parallel group. The reduced counts add up over the micro-batches of a step
  // and each micro-batch's loss uses their mean so far, until reset_global_aux_loss_tracker.
  void set_global_aux_count_reducer(AuxCountReducer reducer) {
    global_aux_count_reducer_ = std::move(reducer);
  }
  // Once per global batch (Megatron's reset_model_temporary_tensors).
  void reset_global_aux_loss_tracker();

  // Aux-loss-free balancing, once per global batch after the step's last backward (Megatron's
  // _update_router_expert_bias in finalize_model_grads): sums tokens_per_expert over `group`
  // (Megatron: tensor x data x context parallel ranks of the stage; a collective, every rank of
  // the group calls it), adds moe_router_bias_update_rate * sign(mean - load) to each expert's
  // bias (fp32 arithmetic, sign 0 for an expert at the mean) and clears the counts. Needs
  // moe_router_enable_expert_bias.
  void update_expert_bias(const comm::ProcessGroup& group);

  // When the tokens of a sequence are split over a group (tensor / context parallel ranks, each
  // routing its own share, router gradients summed over the group), the z-loss coefficient is
  // divided by the group size, as Megatron divides moe_z_loss_coeff by the tp x cp size, so the
  // summed gradient is that of the mean over all the group's tokens. Default 1.
  void set_z_loss_group_size(int64_t group_size);

  // Normal(0, std) weight from a generator derived from seed; bias and expert bias zero.
  void init_parameters(uint64_t seed, float std);

  // The router's parameters (weight, and bias when present), e.g. for gradient reductions.
  std::vector<ParamHandle> params() const;
  Tensor weight() const;       // [H, E] param dtype
  Tensor weight_grad() const;  // [H, E] F32, accumulates
  bool has_bias() const { return bias_.index >= 0; }
  Tensor bias() const;                       // [E]
  Tensor bias_grad() const;                  // [E] F32, accumulates
  Rng& jitter_rng() { return jitter_rng_; }  // its state belongs in checkpoints
  const Rng& jitter_rng() const { return jitter_rng_; }
  bool has_expert_bias() const { return expert_bias_.index >= 0; }
  Tensor expert_bias() const;  // [E] F32 persistent buffer
  // [E] I64: tokens routed to each expert by the training forwards since the last update.
  const Tensor& tokens_per_expert() const { return tokens_per_expert_; }
  const MoEConfig& config() const { return config_; }

 private:
  double z_loss_coeff() const;  // moe_z_loss_coeff / z-loss group size
  DType router_dtype(DType activation) const;
  template <class C>
  void add_balancing_losses(const C* logits, int64_t tokens, RouterContext& ctx,
                            const RouterReplay* replay);

  MoEConfig config_;
  ParameterStore& store_;
  ParamHandle weight_, bias_, expert_bias_;
  Rng jitter_rng_;
  AuxCountReducer aux_count_reducer_, global_aux_count_reducer_;
  int64_t z_loss_group_size_ = 1;
  Tensor tokens_per_expert_;         // [E] I64 (expert bias on)
  Tensor global_tokens_per_expert_;  // [E] F64: reduced global_aux_loss counts of this step
  int64_t global_aux_micro_batches_ = 0;
};

// Megatron's `sinkhorn` (S-BASE): exp(cost) scaled by row and column factors until the mean
// change of the column factors is <= tol. cost [T, E] F32/F64; returns the same shape.
// Rows sum to ~1/T and columns to ~1/E.
Tensor sinkhorn(const Tensor& cost, double tol = 1e-4);

}  // namespace moe

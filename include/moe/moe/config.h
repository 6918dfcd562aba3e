// MoEConfig: the Mixture-of-Experts settings, one field per Megatron-LM argument with the same
// name and default (the flag --moe-router-topk is the field moe_router_topk). validate() rejects
// every impossible combination with a message that names the fields and their values.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moe {

enum class LoadBalancingType : uint8_t {
  kAuxLoss,     // "aux_loss": Switch-Transformer loss over the micro-batch
  kSeqAuxLoss,  // "seq_aux_loss": the same loss per sequence, averaged over the batch
  // "global_aux_loss": the loss with the token counts of the whole global batch so far (summed
  // over the router's global reducer, averaged over the step's micro-batches)
  kGlobalAuxLoss,
  kSinkhorn,  // "sinkhorn": S-BASE, experts chosen on the Sinkhorn-balanced scores in training
  kNone,      // "none"
};
enum class ScoreFunction : uint8_t { kSoftmax, kSigmoid };
enum class RouterDType : uint8_t { kFP32, kFP64 };  // --moe-router-dtype fp32 | fp64
enum class TokenDropPolicy : uint8_t {
  kProbs,     // "probs": an expert over capacity keeps its highest-probability tokens
  kPosition,  // "position": an expert over capacity keeps its earliest tokens
};
// moecore's own --moe-capacity-scope: which tokens an expert's capacity is decided over.
enum class CapacityScope : uint8_t {
  // "group": the whole expert-parallel group's batch (all tp-ep ranks' tokens) at once, so a
  // global batch drops the same tokens whatever the layout (moecore's default)
  kGroup,
  // "rank": each rank's own tokens, capacity from its local token count (Megatron's router)
  kRank,
};
enum class TokenDispatcherType : uint8_t { kAllGather, kAllToAll };
// kGeLU: fc1 hidden -> ffn, gelu. kSwiGLU (Megatron's --swiglu): fc1 hidden -> 2*ffn as
// [gate | up], silu(gate) * up.
enum class ExpertActivation : uint8_t { kGeLU, kSwiGLU };
// moecore's own --moe-router-type: kTopK (Megatron's router) or kExpertChoice (each expert picks
// its tokens, Zhou et al. 2022; see expert_choice_router.h).
enum class RouterType : uint8_t { kTopK, kExpertChoice };

// Parsers accept Megatron's spellings and throw moe::Error naming the field and the choices.
LoadBalancingType parse_load_balancing_type(std::string_view text);
ScoreFunction parse_score_function(std::string_view text);
TokenDropPolicy parse_token_drop_policy(std::string_view text);
TokenDispatcherType parse_token_dispatcher_type(std::string_view text);
CapacityScope parse_capacity_scope(std::string_view text);        // "group" | "rank"
ExpertActivation parse_expert_activation(std::string_view text);  // "gelu" | "swiglu"
RouterType parse_router_type(std::string_view text);              // "topk" | "expert_choice"
RouterDType parse_router_dtype(std::string_view text);            // "fp32" | "fp64"
std::string_view name_of(LoadBalancingType value);
std::string_view name_of(ScoreFunction value);
std::string_view name_of(TokenDropPolicy value);
std::string_view name_of(TokenDispatcherType value);
std::string_view name_of(CapacityScope value);
std::string_view name_of(ExpertActivation value);
std::string_view name_of(RouterType value);
std::string_view name_of(RouterDType value);

// A Megatron field that takes one value or a list (nargs='+'): assigning one value makes a list
// of one.
template <class T>
struct OneOrMore : std::vector<T> {
  OneOrMore(T value) : std::vector<T>{value} {}  // NOLINT: implicit, as Megatron's Union
  OneOrMore(std::initializer_list<T> values) : std::vector<T>(values) {}
  explicit OneOrMore(std::vector<T> values) : std::vector<T>(std::move(values)) {}
};

struct MoEConfig {
  int64_t hidden_size = 0;
  int64_t num_experts = 0;  // --num-experts (Megatron's config field num_moe_experts)
  int64_t ffn_hidden_size = 0;
  // Each expert's intermediate size; unset means ffn_hidden_size (Megatron's default).
  std::optional<int64_t> moe_ffn_hidden_size;
  int64_t moe_router_topk = 2;
  // One type, or several of aux_loss / seq_aux_loss / global_aux_loss at once, each with the
  // coefficient at the same position (Megatron's default 0: no aux loss unless one is set).
  OneOrMore<LoadBalancingType> moe_router_load_balancing_type = LoadBalancingType::kAuxLoss;
  OneOrMore<double> moe_aux_loss_coeff = 0.0;
  std::optional<double> moe_z_loss_coeff;      // unset: no z-loss
  std::optional<double> moe_input_jitter_eps;  // unset: no jitter
  bool moe_router_pre_softmax = false;
  ScoreFunction moe_router_score_function = ScoreFunction::kSoftmax;
  std::optional<double> moe_router_topk_scaling_factor;  // unset: no scaling
  std::optional<double> moe_expert_capacity_factor;      // unset: dropless
  bool moe_pad_expert_input_to_capacity = false;
  TokenDropPolicy moe_token_drop_policy = TokenDropPolicy::kProbs;
  CapacityScope moe_capacity_scope = CapacityScope::kGroup;  // moecore's own field
  bool moe_grouped_gemm = false;  // GroupedMLP (one grouped GEMM) instead of SequentialMLP
  // --recompute-modules moe_act: the experts keep fc1's output and recompute the activation in
  // backward instead of keeping it (Megatron allows it with moe_grouped_gemm only).
  bool recompute_moe_activation = false;
  TokenDispatcherType moe_token_dispatcher_type = TokenDispatcherType::kAllGather;
  ExpertActivation activation = ExpertActivation::kGeLU;  // Megatron's default without --swiglu
  bool add_bias_linear = true;  // biases on the router and on both expert linears
  RouterType moe_router_type = RouterType::kTopK;  // moecore's own field (no Megatron twin)
  // Aux-loss-free balancing and group-limited routing (router.h); group-limited routing is on
  // when both group fields are set.
  bool moe_router_enable_expert_bias = false;
  double moe_router_bias_update_rate = 1e-3;
  std::optional<int64_t> moe_router_num_groups;
  std::optional<int64_t> moe_router_group_topk;
  std::optional<RouterDType> moe_router_dtype;  // unset: fp32 (fp64 with fp64 activations)

  // The expert intermediate size actually used: moe_ffn_hidden_size, else ffn_hidden_size.
  int64_t expert_ffn_hidden_size() const;
  // fc1's output width: 2 * ffn for SwiGLU ([gate | up]), ffn for GeLU.
  int64_t fc1_output_size() const;
  // Slots per token in a Routing: moe_router_topk, or num_experts with expert choice (a slot
  // per expert; the unpicked ones are dropped by the capacity step).
  int64_t routing_slots() const;
  // Megatron's get_aux_loss_coeff: the coefficient listed for `type`, 0 when it is not listed.
  double aux_loss_coeff(LoadBalancingType type) const;
  bool uses(LoadBalancingType type) const;  // `type` is among moe_router_load_balancing_type
  bool aux_loss_enabled() const;  // some aux_loss / seq_aux_loss / global_aux_loss coefficient > 0
  bool group_limited_routing() const { return moe_router_group_topk.has_value(); }
  bool z_loss_enabled() const;  // moe_z_loss_coeff set and positive
  // Throws moe::Error naming the offending fields, e.g.
  // "moe_router_topk (9) must be <= num_experts (8)".
  void validate() const;
};

}  // namespace moe

#include "moe/moe/config.h"

#include <array>
#include <utility>

#include "moe/moe/expert_choice_router.h"
#include "moe/tensor/error.h"

namespace moe {
namespace {

template <class Enum, size_t N>
using NameTable = std::array<std::pair<Enum, std::string_view>, N>;

constexpr NameTable<LoadBalancingType, 4> kLoadBalancingNames{{
    {LoadBalancingType::kAuxLoss, "aux_loss"},
    {LoadBalancingType::kSeqAuxLoss, "seq_aux_loss"},
    {LoadBalancingType::kSinkhorn, "sinkhorn"},
    {LoadBalancingType::kNone, "none"},
}};
constexpr NameTable<ScoreFunction, 2> kScoreFunctionNames{{
    {ScoreFunction::kSoftmax, "softmax"},
    {ScoreFunction::kSigmoid, "sigmoid"},
}};
constexpr NameTable<TokenDropPolicy, 2> kDropPolicyNames{{
    {TokenDropPolicy::kProbs, "probs"},
    {TokenDropPolicy::kPosition, "position"},
}};
constexpr NameTable<TokenDispatcherType, 2> kDispatcherNames{{
    {TokenDispatcherType::kAllGather, "allgather"},
    {TokenDispatcherType::kAllToAll, "alltoall"},
}};
constexpr NameTable<ExpertActivation, 2> kActivationNames{{
    {ExpertActivation::kGeLU, "gelu"},
    {ExpertActivation::kSwiGLU, "swiglu"},
}};
constexpr NameTable<RouterType, 2> kRouterTypeNames{{
    {RouterType::kTopK, "topk"},
    {RouterType::kExpertChoice, "expert_choice"},
}};

template <class Enum, size_t N>
Enum parse_named(const NameTable<Enum, N>& table, std::string_view text, const char* field) {
  std::string choices;
  for (const auto& [value, name] : table) {
    if (name == text) return value;
    choices += choices.empty() ? "" : ", ";
    choices += name;
  }
  throw Error(detail::concat(field, ": unknown value '", text, "' (choices: ", choices, ")"));
}

template <class Enum, size_t N>
std::string_view name_in(const NameTable<Enum, N>& table, Enum value) {
  for (const auto& [entry, name] : table) {
    if (entry == value) return name;
  }
  return "?";
}

}  // namespace

LoadBalancingType parse_load_balancing_type(std::string_view text) {
  return parse_named(kLoadBalancingNames, text, "moe_router_load_balancing_type");
}
ScoreFunction parse_score_function(std::string_view text) {
  return parse_named(kScoreFunctionNames, text, "moe_router_score_function");
}
TokenDropPolicy parse_token_drop_policy(std::string_view text) {
  return parse_named(kDropPolicyNames, text, "moe_token_drop_policy");
}
TokenDispatcherType parse_token_dispatcher_type(std::string_view text) {
  return parse_named(kDispatcherNames, text, "moe_token_dispatcher_type");
}
ExpertActivation parse_expert_activation(std::string_view text) {
  return parse_named(kActivationNames, text, "activation");
}
RouterType parse_router_type(std::string_view text) {
  return parse_named(kRouterTypeNames, text, "moe_router_type");
}
std::string_view name_of(LoadBalancingType value) {
  return name_in(kLoadBalancingNames, value);
}
std::string_view name_of(ScoreFunction value) {
  return name_in(kScoreFunctionNames, value);
}
std::string_view name_of(TokenDropPolicy value) {
  return name_in(kDropPolicyNames, value);
}
std::string_view name_of(TokenDispatcherType value) {
  return name_in(kDispatcherNames, value);
}
std::string_view name_of(ExpertActivation value) {
  return name_in(kActivationNames, value);
}
std::string_view name_of(RouterType value) {
  return name_in(kRouterTypeNames, value);
}

int64_t MoEConfig::expert_ffn_hidden_size() const {
  return moe_ffn_hidden_size.value_or(ffn_hidden_size);
}

int64_t MoEConfig::fc1_output_size() const {
  return activation == ExpertActivation::kSwiGLU ? 2 * expert_ffn_hidden_size()
                                                 : expert_ffn_hidden_size();
}

bool MoEConfig::aux_loss_enabled() const {
  bool aux_type = moe_router_load_balancing_type == LoadBalancingType::kAuxLoss ||
                  moe_router_load_balancing_type == LoadBalancingType::kSeqAuxLoss;
  return aux_type && moe_aux_loss_coeff > 0.0;
}

bool MoEConfig::z_loss_enabled() const {
  return moe_z_loss_coeff.has_value();
}

int64_t MoEConfig::routing_slots() const {
  return moe_router_type == RouterType::kExpertChoice ? num_experts : moe_router_topk;
}

void MoEConfig::validate() const {
  MOE_CHECK(hidden_size > 0, "MoEConfig: hidden_size (", hidden_size, ") must be positive");
  MOE_CHECK(num_experts > 0, "MoEConfig: num_experts (", num_experts,
            ") must be positive for an MoE layer");
  MOE_CHECK(!moe_ffn_hidden_size || *moe_ffn_hidden_size > 0, "MoEConfig: moe_ffn_hidden_size (",
            moe_ffn_hidden_size.value_or(0), ") must be positive");
  MOE_CHECK(expert_ffn_hidden_size() > 0, "MoEConfig: ffn_hidden_size (", ffn_hidden_size,
            ") must be positive when moe_ffn_hidden_size is not set");
  MOE_CHECK(moe_router_topk >= 1, "MoEConfig: moe_router_topk (", moe_router_topk,
            ") must be >= 1");
  MOE_CHECK(moe_router_topk <= num_experts, "MoEConfig: moe_router_topk (", moe_router_topk,
            ") must be <= num_experts (", num_experts, ")");
  MOE_CHECK(moe_aux_loss_coeff >= 0.0, "MoEConfig: moe_aux_loss_coeff (", moe_aux_loss_coeff,
            ") must be >= 0");
  MOE_CHECK(!moe_z_loss_coeff || *moe_z_loss_coeff >= 0.0, "MoEConfig: moe_z_loss_coeff (",
            moe_z_loss_coeff.value_or(0), ") must be >= 0");
  MOE_CHECK(!moe_input_jitter_eps || (*moe_input_jitter_eps > 0.0 && *moe_input_jitter_eps < 1.0),
            "MoEConfig: moe_input_jitter_eps (", moe_input_jitter_eps.value_or(0),
            ") must be in (0, 1)");
  MOE_CHECK(!moe_router_topk_scaling_factor || *moe_router_topk_scaling_factor > 0.0,
            "MoEConfig: moe_router_topk_scaling_factor (",
            moe_router_topk_scaling_factor.value_or(0), ") must be positive");
  bool sinkhorn = moe_router_load_balancing_type == LoadBalancingType::kSinkhorn;
  MOE_CHECK(!(sinkhorn && moe_aux_loss_coeff > 0.0),
            "MoEConfig: moe_router_load_balancing_type sinkhorn does not support an aux loss "
            "(moe_aux_loss_coeff is ",
            moe_aux_loss_coeff, ", must be 0)");
  if (moe_expert_capacity_factor) {
    MOE_CHECK(*moe_expert_capacity_factor > 0.0, "MoEConfig: moe_expert_capacity_factor (",
              *moe_expert_capacity_factor, ") must be positive (leave it unset for dropless)");
    MOE_CHECK(!sinkhorn,
              "MoEConfig: moe_expert_capacity_factor only works with aux_loss, seq_aux_loss or "
              "none load balancing, not moe_router_load_balancing_type sinkhorn");
  }
  MOE_CHECK(!moe_pad_expert_input_to_capacity || moe_expert_capacity_factor,
            "MoEConfig: moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor to be "
            "set");
  if (moe_router_type == RouterType::kExpertChoice) validate_expert_choice(*this);
}

}  // namespace moe

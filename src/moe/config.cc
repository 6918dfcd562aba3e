#include "moe/moe/config.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>

#include "moe/moe/expert_choice_router.h"
#include "moe/tensor/error.h"

namespace moe {
namespace {

template <class Enum, size_t N>
using NameTable = std::array<std::pair<Enum, std::string_view>, N>;

constexpr NameTable<LoadBalancingType, 5> kLoadBalancingNames{{
    {LoadBalancingType::kAuxLoss, "aux_loss"},
    {LoadBalancingType::kSeqAuxLoss, "seq_aux_loss"},
    {LoadBalancingType::kGlobalAuxLoss, "global_aux_loss"},
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
constexpr NameTable<CapacityScope, 2> kCapacityScopeNames{{
    {CapacityScope::kGroup, "group"},
    {CapacityScope::kRank, "rank"},
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

constexpr NameTable<RouterDType, 2> kRouterDTypeNames{{
    {RouterDType::kFP32, "fp32"},
    {RouterDType::kFP64, "fp64"},
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

// The balancing types and their coefficients: one type with one coefficient, or a list of
// distinct aux-loss types with a coefficient each (Megatron's list form).
void validate_load_balancing(const MoEConfig& c) {
  const auto& types = c.moe_router_load_balancing_type;
  const auto& coeffs = c.moe_aux_loss_coeff;
  MOE_CHECK(!types.empty(), "MoEConfig: moe_router_load_balancing_type is empty");
  MOE_CHECK(coeffs.size() == types.size(), "MoEConfig: moe_aux_loss_coeff has ", coeffs.size(),
            " value(s) but moe_router_load_balancing_type has ", types.size(),
            " (one coefficient per type)");
  for (double coeff : coeffs) {
    MOE_CHECK(std::isfinite(coeff) && coeff >= 0.0, "MoEConfig: moe_aux_loss_coeff (", coeff,
              ") must be >= 0");
  }
  for (size_t i = 0; i < types.size() && types.size() > 1; ++i) {
    bool aux_type = types[i] == LoadBalancingType::kAuxLoss ||
                    types[i] == LoadBalancingType::kSeqAuxLoss ||
                    types[i] == LoadBalancingType::kGlobalAuxLoss;
    MOE_CHECK(aux_type, "MoEConfig: moe_router_load_balancing_type lists ", name_of(types[i]),
              ": a list may only hold aux_loss, seq_aux_loss and global_aux_loss");
    MOE_CHECK(std::count(types.begin(), types.end(), types[i]) == 1,
              "MoEConfig: moe_router_load_balancing_type lists ", name_of(types[i]), " twice");
  }
  MOE_CHECK(!(types[0] == LoadBalancingType::kSinkhorn && coeffs[0] > 0.0),
            "MoEConfig: moe_router_load_balancing_type sinkhorn does not support an aux loss "
            "(moe_aux_loss_coeff is ",
            coeffs[0], ", must be 0)");
}

void validate_expert_bias_and_groups(const MoEConfig& c) {
  bool sinkhorn = c.uses(LoadBalancingType::kSinkhorn);
  if (c.moe_router_enable_expert_bias) {
    MOE_CHECK(c.moe_router_score_function == ScoreFunction::kSigmoid,
              "MoEConfig: moe_router_enable_expert_bias needs moe_router_score_function sigmoid "
              "(got ",
              name_of(c.moe_router_score_function), ")");
    MOE_CHECK(!sinkhorn,
              "MoEConfig: moe_router_enable_expert_bias does not work with "
              "moe_router_load_balancing_type sinkhorn (Sinkhorn chooses the experts itself)");
    // Megatron counts the padded capacity map then, the same for every expert: no update.
    MOE_CHECK(!c.moe_pad_expert_input_to_capacity,
              "MoEConfig: moe_router_enable_expert_bias does not work with "
              "moe_pad_expert_input_to_capacity (every expert's load is its capacity)");
  }
  MOE_CHECK(std::isfinite(c.moe_router_bias_update_rate) && c.moe_router_bias_update_rate >= 0.0,
            "MoEConfig: moe_router_bias_update_rate (", c.moe_router_bias_update_rate,
            ") must be >= 0");
  const auto& groups = c.moe_router_num_groups;
  const auto& group_topk = c.moe_router_group_topk;
  MOE_CHECK(groups.has_value() == group_topk.has_value(),
            "MoEConfig: group-limited routing needs both moe_router_num_groups and "
            "moe_router_group_topk (got ",
            groups ? "moe_router_num_groups only" : "moe_router_group_topk only", ")");
  if (!groups) return;
  MOE_CHECK(*groups >= 1 && c.num_experts % *groups == 0, "MoEConfig: moe_router_num_groups (",
            *groups, ") must be >= 1 and divide num_experts (", c.num_experts, ")");
  MOE_CHECK(*group_topk >= 1 && *group_topk <= *groups, "MoEConfig: moe_router_group_topk (",
            *group_topk, ") must be between 1 and moe_router_num_groups (", *groups, ")");
  MOE_CHECK(c.moe_router_topk % *group_topk == 0, "MoEConfig: moe_router_topk (", c.moe_router_topk,
            ") must be divisible by moe_router_group_topk (", *group_topk,
            "): each group is scored by its top moe_router_topk / moe_router_group_topk experts");
  MOE_CHECK(c.moe_router_topk / *group_topk <= c.num_experts / *groups,
            "MoEConfig: moe_router_topk / moe_router_group_topk (", c.moe_router_topk / *group_topk,
            ") must be <= the experts per group (num_experts ", c.num_experts,
            " / moe_router_num_groups ", *groups, ")");
  MOE_CHECK(!sinkhorn,
            "MoEConfig: moe_router_num_groups does not work with moe_router_load_balancing_type "
            "sinkhorn");
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
CapacityScope parse_capacity_scope(std::string_view text) {
  return parse_named(kCapacityScopeNames, text, "moe_capacity_scope");
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

RouterDType parse_router_dtype(std::string_view text) {
  return parse_named(kRouterDTypeNames, text, "moe_router_dtype");
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
std::string_view name_of(CapacityScope value) {
  return name_in(kCapacityScopeNames, value);
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

std::string_view name_of(RouterDType value) {
  return name_in(kRouterDTypeNames, value);
}

int64_t MoEConfig::expert_ffn_hidden_size() const {
  return moe_ffn_hidden_size.value_or(ffn_hidden_size);
}

int64_t MoEConfig::fc1_output_size() const {
  return activation == ExpertActivation::kSwiGLU ? 2 * expert_ffn_hidden_size()
                                                 : expert_ffn_hidden_size();
}

double MoEConfig::aux_loss_coeff(LoadBalancingType type) const {
  for (size_t i = 0; i < moe_router_load_balancing_type.size(); ++i) {
    if (moe_router_load_balancing_type[i] == type && i < moe_aux_loss_coeff.size()) {
      return moe_aux_loss_coeff[i];
    }
  }
  return 0.0;
}

bool MoEConfig::uses(LoadBalancingType type) const {
  const auto& types = moe_router_load_balancing_type;
  return std::find(types.begin(), types.end(), type) != types.end();
}

bool MoEConfig::aux_loss_enabled() const {
  return aux_loss_coeff(LoadBalancingType::kAuxLoss) > 0.0 ||
         aux_loss_coeff(LoadBalancingType::kSeqAuxLoss) > 0.0 ||
         aux_loss_coeff(LoadBalancingType::kGlobalAuxLoss) > 0.0;
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
  MOE_CHECK(!moe_z_loss_coeff || *moe_z_loss_coeff >= 0.0, "MoEConfig: moe_z_loss_coeff (",
            moe_z_loss_coeff.value_or(0), ") must be >= 0");
  MOE_CHECK(!moe_input_jitter_eps || (*moe_input_jitter_eps > 0.0 && *moe_input_jitter_eps < 1.0),
            "MoEConfig: moe_input_jitter_eps (", moe_input_jitter_eps.value_or(0),
            ") must be in (0, 1)");
  MOE_CHECK(!moe_router_topk_scaling_factor || *moe_router_topk_scaling_factor > 0.0,
            "MoEConfig: moe_router_topk_scaling_factor (",
            moe_router_topk_scaling_factor.value_or(0), ") must be positive");
  validate_load_balancing(*this);
  validate_expert_bias_and_groups(*this);
  bool sinkhorn = uses(LoadBalancingType::kSinkhorn);
  if (moe_expert_capacity_factor) {
    MOE_CHECK(*moe_expert_capacity_factor > 0.0, "MoEConfig: moe_expert_capacity_factor (",
              *moe_expert_capacity_factor, ") must be positive (leave it unset for dropless)");
    MOE_CHECK(!sinkhorn,
              "MoEConfig: moe_expert_capacity_factor only works with aux_loss, seq_aux_loss, "
              "global_aux_loss or none load balancing, not moe_router_load_balancing_type "
              "sinkhorn");
  }
  MOE_CHECK(moe_capacity_scope == CapacityScope::kGroup || moe_expert_capacity_factor,
            "MoEConfig: moe_capacity_scope rank needs moe_expert_capacity_factor to be set");
  MOE_CHECK(!moe_pad_expert_input_to_capacity || moe_expert_capacity_factor,
            "MoEConfig: moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor to be "
            "set");
  if (moe_router_type == RouterType::kExpertChoice) validate_expert_choice(*this);
}

}  // namespace moe

#include "moe/moe/expert_choice_router.h"

#include "moe/tensor/error.h"

namespace moe {

MoEConfig expert_choice_scoring_config(const MoEConfig& config) {
  MOE_CHECK(config.moe_router_type == RouterType::kExpertChoice,
            "expert_choice_scoring_config: moe_router_type is ", name_of(config.moe_router_type),
            ", not expert_choice");
  MoEConfig scoring = config;
  scoring.moe_router_type = RouterType::kTopK;
  scoring.moe_router_topk = config.num_experts;
  // Top-k over all experts after a softmax over all experts: probs are the softmax scores,
  // slots in descending score order.
  scoring.moe_router_pre_softmax = true;
  scoring.moe_router_load_balancing_type = LoadBalancingType::kNone;
  return scoring;
}

void validate_expert_choice(const MoEConfig& config) {
  const char* with = " with moe_router_type expert_choice";
  MOE_CHECK(config.moe_expert_capacity_factor.has_value(),
            "MoEConfig: moe_router_type expert_choice needs moe_expert_capacity_factor (each "
            "expert takes ceil(tokens x factor / num_experts) tokens)");
  MOE_CHECK(config.moe_router_score_function == ScoreFunction::kSoftmax,
            "MoEConfig: moe_router_score_function ", name_of(config.moe_router_score_function),
            " is not supported", with, " (the scores are a softmax over the experts)");
  MOE_CHECK(!config.moe_router_pre_softmax, "MoEConfig: moe_router_pre_softmax has no meaning",
            with, " (there is no per-token top-k)");
  MOE_CHECK(!config.moe_router_num_groups && !config.moe_router_group_topk,
            "MoEConfig: moe_router_num_groups / moe_router_group_topk have no meaning", with,
            " (experts pick their tokens; there is no per-token top-k to limit)");
  MOE_CHECK(!config.moe_router_topk_scaling_factor, "MoEConfig: moe_router_topk_scaling_factor (",
            config.moe_router_topk_scaling_factor.value_or(0), ") has no meaning", with);
  MOE_CHECK(config.moe_token_drop_policy == TokenDropPolicy::kProbs,
            "MoEConfig: moe_token_drop_policy ", name_of(config.moe_token_drop_policy),
            " has no meaning", with, " (experts take their highest-scoring tokens)");
  for (double coeff : config.moe_aux_loss_coeff) {
    MOE_CHECK(coeff == 0, "MoEConfig: moe_aux_loss_coeff (", coeff, ") must be 0", with,
              " (every expert takes the same number of tokens; there is no load to balance)");
  }
}

}  // namespace moe

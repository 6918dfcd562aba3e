#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "moe/moe/config.h"
#include "moe_test_util.h"

namespace moe {
namespace {

void expect_invalid(const MoEConfig& config, const std::string& fragment) {
  testing::expect_error_containing([&] { config.validate(); }, fragment);
}

TEST(MoEConfig, MegatronDefaults) {
  MoEConfig config;
  EXPECT_EQ(config.moe_router_topk, 2);
  EXPECT_EQ(config.moe_router_load_balancing_type,
            std::vector<LoadBalancingType>{LoadBalancingType::kAuxLoss});
  EXPECT_EQ(config.moe_aux_loss_coeff, std::vector<double>{0.0});
  EXPECT_FALSE(config.moe_z_loss_coeff.has_value());
  EXPECT_FALSE(config.moe_input_jitter_eps.has_value());
  EXPECT_FALSE(config.moe_router_pre_softmax);
  EXPECT_EQ(config.moe_router_score_function, ScoreFunction::kSoftmax);
  EXPECT_FALSE(config.moe_router_topk_scaling_factor.has_value());
  EXPECT_FALSE(config.moe_expert_capacity_factor.has_value());
  EXPECT_FALSE(config.moe_pad_expert_input_to_capacity);
  EXPECT_EQ(config.moe_token_drop_policy, TokenDropPolicy::kProbs);
  EXPECT_EQ(config.moe_capacity_scope, CapacityScope::kGroup);
  EXPECT_FALSE(config.moe_grouped_gemm);
  EXPECT_EQ(config.moe_token_dispatcher_type, TokenDispatcherType::kAllGather);
  EXPECT_TRUE(config.add_bias_linear);
  EXPECT_FALSE(config.moe_router_enable_expert_bias);
  EXPECT_EQ(config.moe_router_bias_update_rate, 1e-3);
  EXPECT_FALSE(config.moe_router_num_groups.has_value());
  EXPECT_FALSE(config.moe_router_group_topk.has_value());
  EXPECT_FALSE(config.moe_router_dtype.has_value());
  EXPECT_FALSE(config.aux_loss_enabled());  // coefficient 0
}

TEST(MoEConfig, DerivedSizes) {
  MoEConfig config = testing::small_config(8, 4, 2, 16);
  EXPECT_EQ(config.expert_ffn_hidden_size(), 16);
  EXPECT_EQ(config.fc1_output_size(), 16);
  config.activation = ExpertActivation::kSwiGLU;
  config.moe_ffn_hidden_size = 6;
  EXPECT_EQ(config.expert_ffn_hidden_size(), 6);
  EXPECT_EQ(config.fc1_output_size(), 12);
  EXPECT_NO_THROW(config.validate());
}

TEST(MoEConfig, RejectsImpossibleCombinations) {
  struct Case {
    std::function<void(MoEConfig&)> change;
    std::string message;
  };
  using LB = LoadBalancingType;
  const std::vector<Case> cases = {
      {[](MoEConfig& c) { c.moe_router_topk = 9; },
       "moe_router_topk (9) must be <= num_experts (8)"},
      {[](MoEConfig& c) { c.moe_router_topk = 0; }, "moe_router_topk (0) must be >= 1"},
      {[](MoEConfig& c) { c.num_experts = 0; }, "num_experts (0) must be positive"},
      {[](MoEConfig& c) { c.hidden_size = -3; }, "hidden_size (-3) must be positive"},
      {[](MoEConfig& c) { c.ffn_hidden_size = 0; }, "ffn_hidden_size (0) must be positive"},
      {[](MoEConfig& c) { c.moe_ffn_hidden_size = -1; },
       "moe_ffn_hidden_size (-1) must be positive"},
      {[](MoEConfig& c) { c.moe_expert_capacity_factor = 0.0; },
       "moe_expert_capacity_factor (0) must be positive"},
      {[](MoEConfig& c) { c.moe_expert_capacity_factor = -1.5; },
       "moe_expert_capacity_factor (-1.5) must be positive"},
      {[](MoEConfig& c) { c.moe_pad_expert_input_to_capacity = true; },
       "moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor"},
      {[](MoEConfig& c) { c.moe_capacity_scope = CapacityScope::kRank; },
       "moe_capacity_scope rank needs moe_expert_capacity_factor to be set"},
      {[](MoEConfig& c) {
         c.moe_router_load_balancing_type = LB::kSinkhorn;
         c.moe_aux_loss_coeff = 0.01;
       },
       "sinkhorn does not support an aux loss (moe_aux_loss_coeff is 0.01"},
      {[](MoEConfig& c) {
         c.moe_router_load_balancing_type = LB::kSinkhorn;
         c.moe_expert_capacity_factor = 1.0;
       },
       "moe_expert_capacity_factor only works with aux_loss, seq_aux_loss, global_aux_loss or "
       "none"},
      {[](MoEConfig& c) { c.moe_aux_loss_coeff = -0.1; }, "moe_aux_loss_coeff (-0.1) must be >= 0"},
      {[](MoEConfig& c) { c.moe_z_loss_coeff = -1e-3; }, "moe_z_loss_coeff (-0.001) must be >= 0"},
      {[](MoEConfig& c) { c.moe_input_jitter_eps = 1.5; },
       "moe_input_jitter_eps (1.5) must be in (0, 1)"},
      {[](MoEConfig& c) { c.moe_router_topk_scaling_factor = 0.0; },
       "moe_router_topk_scaling_factor (0) must be positive"},
      // Several balancing types at once.
      {[](MoEConfig& c) {
         c.moe_router_load_balancing_type = {LB::kAuxLoss, LB::kSeqAuxLoss};
         c.moe_aux_loss_coeff = 0.01;
       },
       "moe_aux_loss_coeff has 1 value(s) but moe_router_load_balancing_type has 2"},
      {[](MoEConfig& c) {
         c.moe_router_load_balancing_type = {LB::kAuxLoss, LB::kSinkhorn};
         c.moe_aux_loss_coeff = {0.01, 0.0};
       },
       "lists sinkhorn: a list may only hold aux_loss, seq_aux_loss and global_aux_loss"},
      {[](MoEConfig& c) {
         c.moe_router_load_balancing_type = {LB::kAuxLoss, LB::kAuxLoss};
         c.moe_aux_loss_coeff = {0.01, 0.02};
       },
       "lists aux_loss twice"},
      {[](MoEConfig& c) {
         c.moe_router_load_balancing_type = {LB::kAuxLoss, LB::kGlobalAuxLoss};
         c.moe_aux_loss_coeff = {0.01, -2.0};
       },
       "moe_aux_loss_coeff (-2) must be >= 0"},
      // Expert bias.
      {[](MoEConfig& c) { c.moe_router_enable_expert_bias = true; },
       "moe_router_enable_expert_bias needs moe_router_score_function sigmoid (got softmax)"},
      {[](MoEConfig& c) {
         c.moe_router_enable_expert_bias = true;
         c.moe_router_score_function = ScoreFunction::kSigmoid;
         c.moe_router_load_balancing_type = LB::kSinkhorn;
       },
       "moe_router_enable_expert_bias does not work with moe_router_load_balancing_type "
       "sinkhorn"},
      {[](MoEConfig& c) {
         c.moe_router_enable_expert_bias = true;
         c.moe_router_score_function = ScoreFunction::kSigmoid;
         c.moe_expert_capacity_factor = 1.0;
         c.moe_pad_expert_input_to_capacity = true;
       },
       "moe_router_enable_expert_bias does not work with moe_pad_expert_input_to_capacity"},
      {[](MoEConfig& c) { c.moe_router_bias_update_rate = -1e-3; },
       "moe_router_bias_update_rate (-0.001) must be >= 0"},
      // Group-limited routing (8 experts, topk 2).
      {[](MoEConfig& c) { c.moe_router_num_groups = 4; },
       "needs both moe_router_num_groups and moe_router_group_topk (got moe_router_num_groups "
       "only)"},
      {[](MoEConfig& c) { c.moe_router_group_topk = 1; }, "(got moe_router_group_topk only)"},
      {[](MoEConfig& c) {
         c.moe_router_num_groups = 3;
         c.moe_router_group_topk = 1;
       },
       "moe_router_num_groups (3) must be >= 1 and divide num_experts (8)"},
      {[](MoEConfig& c) {
         c.moe_router_num_groups = 0;
         c.moe_router_group_topk = 1;
       },
       "moe_router_num_groups (0) must be >= 1"},
      {[](MoEConfig& c) {
         c.moe_router_num_groups = 2;
         c.moe_router_group_topk = 4;
       },
       "moe_router_group_topk (4) must be between 1 and moe_router_num_groups (2)"},
      {[](MoEConfig& c) {
         c.moe_router_topk = 3;
         c.moe_router_num_groups = 4;
         c.moe_router_group_topk = 2;
       },
       "moe_router_topk (3) must be divisible by moe_router_group_topk (2)"},
      {[](MoEConfig& c) {
         c.moe_router_topk = 6;
         c.moe_router_num_groups = 4;
         c.moe_router_group_topk = 2;
       },
       "moe_router_topk / moe_router_group_topk (3) must be <= the experts per group "
       "(num_experts 8 / moe_router_num_groups 4)"},
      {[](MoEConfig& c) {
         c.moe_router_load_balancing_type = LB::kSinkhorn;
         c.moe_router_num_groups = 4;
         c.moe_router_group_topk = 2;
       },
       "moe_router_num_groups does not work with moe_router_load_balancing_type sinkhorn"},
  };
  for (const Case& entry : cases) {
    MoEConfig config = testing::small_config(8, 8, 2, 16);
    entry.change(config);
    expect_invalid(config, entry.message);
  }
}

TEST(MoEConfig, ParsesMegatronSpellings) {
  EXPECT_EQ(parse_load_balancing_type("seq_aux_loss"), LoadBalancingType::kSeqAuxLoss);
  EXPECT_EQ(parse_load_balancing_type("sinkhorn"), LoadBalancingType::kSinkhorn);
  EXPECT_EQ(parse_score_function("sigmoid"), ScoreFunction::kSigmoid);
  EXPECT_EQ(parse_token_drop_policy("position"), TokenDropPolicy::kPosition);
  EXPECT_EQ(parse_token_dispatcher_type("alltoall"), TokenDispatcherType::kAllToAll);
  EXPECT_EQ(parse_expert_activation("swiglu"), ExpertActivation::kSwiGLU);
  EXPECT_EQ(parse_load_balancing_type("global_aux_loss"), LoadBalancingType::kGlobalAuxLoss);
  EXPECT_EQ(parse_router_dtype("fp64"), RouterDType::kFP64);
  EXPECT_EQ(name_of(RouterDType::kFP32), "fp32");
  testing::expect_error_containing([] { parse_router_dtype("bf16"); },
                                   "moe_router_dtype: unknown value 'bf16' (choices: fp32, fp64)");
  EXPECT_EQ(name_of(LoadBalancingType::kNone), "none");
  testing::expect_error_containing(
      [] { parse_score_function("relu"); },
      "moe_router_score_function: unknown value 'relu' (choices: softmax, sigmoid)");
  EXPECT_THROW(parse_token_dispatcher_type("flex"), Error);
  EXPECT_EQ(parse_capacity_scope("rank"), CapacityScope::kRank);
  EXPECT_EQ(name_of(CapacityScope::kGroup), "group");
  testing::expect_error_containing(
      [] { parse_capacity_scope("world"); },
      "moe_capacity_scope: unknown value 'world' (choices: group, rank)");
}

}  // namespace
}  // namespace moe

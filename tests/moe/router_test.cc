#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "moe/moe/router.h"
#include "moe/tensor/ops.h"
#include "moe_test_util.h"
#include "support/testing.h"
#include "torch_reference.h"

namespace moe {
namespace {

// A router over an fp64 (or other dtype) store with spread-out logits and a random bias.
struct RouterFixture {
  explicit RouterFixture(const MoEConfig& config, DType dtype = DType::F64, uint64_t seed = 1)
      : store(dtype), router(config, store, "router", seed) {
    store.allocate();
    router.init_parameters(seed, 0.6f);
    if (router.has_bias()) {
      Tensor bias = router.bias();
      bias.copy_from(testing::random_normal(bias.shape(), seed + 7, 0.3f));
    }
    if (router.has_expert_bias()) {
      Tensor expert_bias = router.expert_bias();
      expert_bias.copy_from(testing::random_normal(expert_bias.shape(), seed + 8, 0.2f));
    }
  }
  ParameterStore store;
  TopKRouter router;
};

using Variant = testing::ConfigVariant;

// Every routing and loss variant the gradient checks cover.
std::vector<Variant> router_variants() {
  using LB = LoadBalancingType;
  return {
      {"softmax_after_topk_aux", [](MoEConfig& c) { c.moe_aux_loss_coeff = 0.3; }},
      {"softmax_pre_softmax_z",
       [](MoEConfig& c) {
         c.moe_router_pre_softmax = true;
         c.moe_z_loss_coeff = 0.05;
         c.moe_router_load_balancing_type = LB::kNone;
       }},
      {"sigmoid_scaled_aux",
       [](MoEConfig& c) {
         c.moe_router_score_function = ScoreFunction::kSigmoid;
         c.moe_router_topk_scaling_factor = 2.5;
         c.moe_aux_loss_coeff = 0.2;
       }},
      {"sigmoid_top1_seq_aux_z",
       [](MoEConfig& c) {
         c.moe_router_score_function = ScoreFunction::kSigmoid;
         c.moe_router_topk = 1;
         c.moe_router_load_balancing_type = LB::kSeqAuxLoss;
         c.moe_aux_loss_coeff = 0.4;
         c.moe_z_loss_coeff = 0.01;
       }},
      {"softmax_seq_aux_no_bias",
       [](MoEConfig& c) {
         c.moe_router_load_balancing_type = LB::kSeqAuxLoss;
         c.moe_aux_loss_coeff = 0.5;
         c.add_bias_linear = false;
       }},
      {"sinkhorn_top2", [](MoEConfig& c) { c.moe_router_load_balancing_type = LB::kSinkhorn; }},
      {"sinkhorn_top1",
       [](MoEConfig& c) {
         c.moe_router_load_balancing_type = LB::kSinkhorn;
         c.moe_router_topk = 1;
       }},
      {"jitter_softmax_aux",
       [](MoEConfig& c) {
         c.moe_input_jitter_eps = 0.1;
         c.moe_aux_loss_coeff = 0.1;
       }},
      {"sigmoid_expert_bias_groups_seq_aux",
       [](MoEConfig& c) {
         c.num_experts = 6;
         c.moe_router_score_function = ScoreFunction::kSigmoid;
         c.moe_router_enable_expert_bias = true;
         c.moe_router_num_groups = 3;
         c.moe_router_group_topk = 2;
         c.moe_router_load_balancing_type = LB::kSeqAuxLoss;
         c.moe_aux_loss_coeff = 0.3;
       }},
      {"pre_softmax_groups_aux_seq_global",
       [](MoEConfig& c) {
         c.num_experts = 8;
         c.moe_router_topk = 4;
         c.moe_router_pre_softmax = true;
         c.moe_router_num_groups = 4;
         c.moe_router_group_topk = 2;
         c.moe_router_load_balancing_type = {LB::kAuxLoss, LB::kSeqAuxLoss, LB::kGlobalAuxLoss};
         c.moe_aux_loss_coeff = {0.2, 0.3, 0.4};
       }},
      {"softmax_groups_global_z",
       [](MoEConfig& c) {
         c.num_experts = 6;
         c.moe_router_num_groups = 2;
         c.moe_router_group_topk = 1;
         c.moe_router_load_balancing_type = LB::kGlobalAuxLoss;
         c.moe_aux_loss_coeff = 0.5;
         c.moe_z_loss_coeff = 0.02;
       }},
  };
}

// d(<probs, G> + losses) with respect to the input, the weight and the bias, checked against
// central differences of the same fp64 objective.
void check_router_gradients(const MoEConfig& config, bool training, const std::string& name) {
  SCOPED_TRACE(name + (training ? " (training)" : " (evaluation)"));
  const int64_t S = 5, B = 2, H = config.hidden_size, K = config.moe_router_topk;
  RouterFixture fixture(config);
  TopKRouter& router = fixture.router;
  Tensor hidden = testing::random_normal({S, B, H}, 3, 1.0f, DType::F64);
  Tensor probe = testing::random_normal({S * B, K}, 4, 1.0f, DType::F64);
  const Rng::State jitter_state = router.jitter_rng().state();
  auto objective = [&] {
    router.jitter_rng().set_state(jitter_state);  // the same noise on every evaluation
    router.reset_global_aux_loss_tracker();       // and global_aux_loss on this batch only
    RouterContext ctx;
    Routing routing = router.forward(hidden, ctx, training);
    return testing::dot(routing.probs, probe) + ctx.losses.load_balancing_loss + ctx.losses.z_loss;
  };
  router.jitter_rng().set_state(jitter_state);
  RouterContext ctx;
  router.forward(hidden, ctx, training);
  EXPECT_EQ(ctx.losses.load_balancing_loss > 0.0, training && config.aux_loss_enabled());
  EXPECT_EQ(ctx.losses.z_loss > 0.0, training && config.z_loss_enabled());
  Tensor grad_hidden({S, B, H}, DType::F64);
  router.backward(ctx, probe, grad_hidden);
  EXPECT_TRUE(testing::check_moe_gradient(hidden, grad_hidden, objective, "input"));
  EXPECT_TRUE(
      testing::check_moe_gradient(router.weight(), router.weight_grad(), objective, "weight"));
  if (router.has_bias()) {
    EXPECT_TRUE(testing::check_moe_gradient(router.bias(), router.bias_grad(), objective, "bias"));
  }
}

TEST(RouterGradients, MatchFiniteDifferencesForEveryVariant) {
  for (const Variant& variant : router_variants()) {
    MoEConfig config = testing::small_config(6, 5, 2, 4);
    variant.change(config);
    config.validate();
    check_router_gradients(config, /*training=*/true, variant.name);
    check_router_gradients(config, /*training=*/false, variant.name);
  }
}

TEST(Router, LossesOnlyInTrainingAndAccumulatingGradients) {
  MoEConfig config = testing::small_config(6, 5, 2, 4);
  config.moe_aux_loss_coeff = 0.1;
  config.moe_z_loss_coeff = 0.01;
  RouterFixture fixture(config, DType::F32);
  Tensor hidden = testing::random_normal({7, 6}, 9);
  RouterContext ctx;
  fixture.router.forward(hidden, ctx, /*training=*/false);
  EXPECT_EQ(ctx.losses.load_balancing_loss, 0.0);
  EXPECT_EQ(ctx.losses.z_loss, 0.0);

  // Two identical backward passes give twice the gradient: the weight gradient accumulates.
  Tensor probe = testing::random_normal({7, 2}, 10);
  Tensor grad_hidden({7, 6});
  fixture.router.forward(hidden, ctx);
  fixture.router.backward(ctx, probe, grad_hidden);
  Tensor once = fixture.router.weight_grad().clone();
  fixture.router.forward(hidden, ctx);
  fixture.router.backward(ctx, probe, grad_hidden);
  Tensor twice = once.clone();
  scale(twice, 2.0f);
  EXPECT_TENSORS_CLOSE(fixture.router.weight_grad(), twice, 1e-6, 1e-6);
  EXPECT_GT(ctx.losses.load_balancing_loss, 0.0);  // losses stay readable after backward
}

// The aux-loss count reducer is a collective in expert-parallel runs: a rank with no tokens must
// still call it (once per forward), else its peers wait for it. Alone with no tokens (the
// reducer's group has none either) there is no loss and no gradient.
TEST(Router, AuxCountReducerRunsWithZeroTokens) {
  MoEConfig config = testing::small_config(6, 5, 2, 4);
  config.moe_aux_loss_coeff = 0.1;
  RouterFixture fixture(config, DType::F32);
  int calls = 0;
  double peer_tokens = 0;
  fixture.router.set_aux_count_reducer([&](Tensor& tokens_per_expert, double& token_count) {
    ++calls;
    EXPECT_EQ(tokens_per_expert.numel(), 5);
    EXPECT_EQ(token_count, 0.0);
    token_count += peer_tokens;
  });
  const Tensor empty = Tensor::zeros({0, 6});
  RouterContext ctx;
  for (double peers : {0.0, 8.0}) {
    SCOPED_TRACE(peers);
    peer_tokens = peers;
    fixture.router.forward(empty, ctx);
    EXPECT_EQ(ctx.losses.load_balancing_loss, 0.0);  // no local scores: no local share
    Tensor grad_hidden({0, 6});
    fixture.router.backward(ctx, Tensor::zeros({0, 2}), grad_hidden);
    EXPECT_TENSORS_CLOSE(fixture.router.weight_grad(), Tensor::zeros({6, 5}), 0.0, 0.0);
  }
  EXPECT_EQ(calls, 2);
  fixture.router.forward(empty, ctx, /*training=*/false);
  EXPECT_EQ(calls, 2);  // evaluation computes no aux loss
}

TEST(Router, ZLossGroupSizeDividesTheCoefficient) {
  MoEConfig config = testing::small_config(6, 5, 2, 4);
  config.moe_z_loss_coeff = 0.02;
  config.moe_router_load_balancing_type = LoadBalancingType::kNone;
  Tensor hidden = testing::random_normal({7, 6}, 9);
  // Only the z-loss reaches the weight: the probe on the probabilities is zero.
  Tensor zero_probe({7, 2}), grad_hidden({7, 6});
  double z[2];
  Tensor grads[2];
  for (int64_t size : {1, 2}) {
    RouterFixture fixture(config, DType::F32);
    fixture.router.set_z_loss_group_size(size);
    RouterContext ctx;
    fixture.router.forward(hidden, ctx);
    fixture.router.backward(ctx, zero_probe, grad_hidden);
    z[size - 1] = ctx.losses.z_loss;
    grads[size - 1] = fixture.router.weight_grad().clone();
  }
  EXPECT_NEAR(z[1], z[0] / 2, 1e-9);
  scale(grads[1], 2.0f);
  EXPECT_TENSORS_CLOSE(grads[1], grads[0], 1e-7, 1e-5);
  testing::expect_error_containing(
      [&] {
        RouterFixture fixture(config, DType::F32);
        fixture.router.set_z_loss_group_size(0);
      },
      "z-loss group size (0) must be >= 1");
}

TEST(Router, TopKOrderAndTies) {
  MoEConfig config = testing::small_config(2, 4, 2, 4);
  config.add_bias_linear = false;
  RouterFixture fixture(config, DType::F32);
  // Logits = hidden @ W with W = [[1, 1, 0, 2], [0, 0, 1, 0]]: token 0 -> [1, 1, 0, 2].
  Tensor weight = fixture.router.weight();
  weight.copy_from(Tensor::from_floats({1, 1, 0, 2, 0, 0, 1, 0}, {2, 4}));
  RouterContext ctx;
  Routing routing = fixture.router.forward(Tensor::from_floats({1, 0, 0, 1}, {2, 2}), ctx);
  EXPECT_EQ(routing.experts.get(0), 3.0f);  // largest first
  EXPECT_EQ(routing.experts.get(1), 0.0f);  // tie between experts 0 and 1: lower index wins
  EXPECT_EQ(routing.experts.get(2), 2.0f);  // token 1 -> [0, 0, 1, 0]
  EXPECT_EQ(routing.experts.get(3), 0.0f);
  EXPECT_NEAR(routing.probs.get(0) + routing.probs.get(1), 1.0, 1e-6);
}

TEST(Router, RejectsBadInput) {
  MoEConfig config = testing::small_config(6, 5, 2, 4);
  RouterFixture fixture(config, DType::F32);
  RouterContext ctx;
  testing::expect_error_containing(
      [&] {
        fixture.router.forward(Tensor({3, 7}), ctx);
      },
      "has hidden size 7 but hidden_size is 6");
  Tensor hidden = testing::random_normal({3, 6}, 1);
  hidden.set(4, std::nanf(""));
  testing::expect_error_containing([&] { fixture.router.forward(hidden, ctx); },
                                   "logit of token 0");
}

TEST(Sinkhorn, BalancesColumnsAndRows) {
  for (int64_t T : {1, 5, 17, 129}) {
    const int64_t E = 6;
    Tensor cost = testing::random_normal({T, E}, uint64_t(T), 2.0f);
    Tensor balanced = sinkhorn(cost, 1e-4);
    for (int64_t e = 0; e < E; ++e) {
      double column = 0.0;
      for (int64_t t = 0; t < T; ++t) column += balanced.get(t * E + e);
      EXPECT_NEAR(column * double(E), 1.0, 1e-5) << "T " << T << " column " << e;
    }
    for (int64_t t = 0; t < T; ++t) {
      double row = 0.0;
      for (int64_t e = 0; e < E; ++e) row += balanced.get(t * E + e);
      EXPECT_NEAR(row * double(T), 1.0, 2e-2) << "T " << T << " row " << t;
    }
  }
}

TEST(Sinkhorn, SpreadsTrainingTrafficOverExperts) {
  // Every token prefers expert 0; Sinkhorn routing in training must still use all experts.
  MoEConfig config = testing::small_config(4, 4, 1, 4);
  config.moe_router_load_balancing_type = LoadBalancingType::kSinkhorn;
  config.add_bias_linear = false;
  RouterFixture fixture(config, DType::F32);
  Tensor weight = fixture.router.weight();
  weight.copy_from(testing::random_normal({4, 4}, 5, 0.3f));
  for (int64_t h = 0; h < 4; ++h) weight.set(h * 4, 1.5f);
  Tensor hidden = testing::random_uniform({64, 4}, 6, 0.5f, 1.0f);
  auto counts = [&](bool training) {
    RouterContext ctx;
    Routing routing = fixture.router.forward(hidden, ctx, training);
    std::vector<int> per_expert(4, 0);
    for (int64_t t = 0; t < 64; ++t) per_expert[size_t(routing.experts.get(t))]++;
    return per_expert;
  };
  EXPECT_EQ(counts(false)[0], 64);  // evaluation: plain top-1 sends everything to expert 0
  std::vector<int> balanced = counts(true);
  for (int count : balanced) EXPECT_GE(count, 4);
  EXPECT_LE(balanced[0], 32);
}

// The independent PyTorch reference: routing probabilities, aux loss and z-loss to 1e-6.
class TorchReference : public ::testing::Test {
 protected:
  void SetUp() override { MOE_REQUIRE_PYTHON_PACKAGE("torch"); }
};

// One router evaluation to compare: its settings and inputs as JSON, and our results.
struct TorchCase {
  std::string name;
  MoEConfig config;
  double tolerance;
  nlohmann::json input;
  std::vector<double> dense_probs;  // [T, E]
  RouterLosses losses;
};

TorchCase run_case(const MoEConfig& config, DType dtype, double tolerance,
                   const std::string& name) {
  const int64_t S = 6, B = 3, H = config.hidden_size, E = config.num_experts;
  RouterFixture fixture(config, dtype, 21);
  Tensor hidden = testing::random_normal({S, B, H}, 22, 1.0f, dtype);
  RouterContext ctx;
  Routing routing = fixture.router.forward(hidden, ctx, /*training=*/true);
  TorchCase result{name + " " + std::string(dtype_name(dtype)), config, tolerance, {}, {}, {}};
  nlohmann::json& input = result.input;
  input["shape"] = {S, B, H};
  input["hidden"] = testing::json_values(hidden);
  input["weight"] = testing::json_values(fixture.router.weight());
  input["bias"] =
      fixture.router.has_bias() ? testing::json_values(fixture.router.bias()) : nlohmann::json();
  input["topk"] = config.moe_router_topk;
  input["score_function"] = std::string(name_of(config.moe_router_score_function));
  input["pre_softmax"] = config.moe_router_pre_softmax;
  input["scaling_factor"] = config.moe_router_topk_scaling_factor
                                ? nlohmann::json(*config.moe_router_topk_scaling_factor)
                                : nlohmann::json();
  input["load_balancing_type"] = nlohmann::json::array();
  for (LoadBalancingType type : config.moe_router_load_balancing_type) {
    input["load_balancing_type"].push_back(std::string(name_of(type)));
  }
  input["aux_coeff"] = std::vector<double>(config.moe_aux_loss_coeff);
  auto optional_json = [](const std::optional<int64_t>& value) {
    return value ? nlohmann::json(*value) : nlohmann::json();
  };
  input["num_groups"] = optional_json(config.moe_router_num_groups);
  input["group_topk"] = optional_json(config.moe_router_group_topk);
  input["expert_bias"] = fixture.router.has_expert_bias()
                             ? testing::json_values(fixture.router.expert_bias())
                             : nlohmann::json();
  input["z_coeff"] =
      config.moe_z_loss_coeff ? nlohmann::json(*config.moe_z_loss_coeff) : nlohmann::json();
  result.dense_probs.assign(size_t(S * B * E), 0.0);
  Tensor probs = routing.probs.to(DType::F64);
  for (int64_t s = 0; s < routing.experts.numel(); ++s) {
    int64_t t = s / routing.topk;
    result.dense_probs[size_t(t * E + int64_t(routing.experts.get(s)))] = probs.data<double>()[s];
  }
  result.losses = ctx.losses;
  return result;
}

TEST_F(TorchReference, ProbabilitiesAuxAndZLossMatch) {
  std::vector<TorchCase> cases;
  for (const Variant& variant : router_variants()) {
    MoEConfig config = testing::small_config(8, 6, 2, 4);
    variant.change(config);
    if (config.uses(LoadBalancingType::kSinkhorn) || config.moe_input_jitter_eps) {
      continue;  // Sinkhorn's selection and the jitter noise are tested above
    }
    config.validate();
    cases.push_back(run_case(config, DType::F64, 1e-12, variant.name));
    cases.push_back(run_case(config, DType::F32, 1e-6, variant.name));
  }
  nlohmann::json input_list = nlohmann::json::array();
  for (const TorchCase& entry : cases) input_list.push_back(entry.input);
  nlohmann::json expected = testing::run_torch_reference(MOE_ROUTER_REFERENCE_SCRIPT, input_list);
  ASSERT_EQ(expected.size(), cases.size());
  for (size_t c = 0; c < cases.size(); ++c) {
    const TorchCase& ours = cases[c];
    SCOPED_TRACE(ours.name);
    std::vector<double> want = expected[c]["probs"];
    ASSERT_EQ(want.size(), ours.dense_probs.size());
    const size_t E = size_t(ours.config.num_experts);
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(ours.dense_probs[i], want[i], ours.tolerance)
          << "probs[" << i / E << ", " << i % E << "]";
    }
    double aux = expected[c]["load_balancing_loss"], z = expected[c]["z_loss"];
    EXPECT_NEAR(ours.losses.load_balancing_loss, aux, ours.tolerance * std::max(1.0, aux));
    EXPECT_NEAR(ours.losses.z_loss, z, ours.tolerance * std::max(1.0, z));
    EXPECT_EQ(aux > 0.0, ours.config.aux_loss_enabled());
    EXPECT_EQ(z > 0.0, ours.config.z_loss_enabled());
  }
}

}  // namespace
}  // namespace moe

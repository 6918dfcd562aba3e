// Expert-choice routing (--moe-router-type expert_choice) on one process: the capacity rule,
// every expert taking exactly its capacity of highest-scoring tokens, the output against a
// brute-force reference, fp64 finite-difference gradients, and the refused settings.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "moe/moe/capacity.h"
#include "moe/moe/expert_choice_router.h"
#include "moe/moe/moe_layer.h"
#include "moe_test_util.h"
#include "support/testing.h"

namespace moe {
namespace {

MoEConfig expert_choice_config(double capacity_factor) {
  MoEConfig config = testing::small_config(6, 4, 2, 5);
  config.moe_router_type = RouterType::kExpertChoice;
  config.moe_expert_capacity_factor = capacity_factor;
  return config;
}

struct LayerFixture {
  LayerFixture(const MoEConfig& config, DType dtype)
      : store(dtype), layer(config, store, "decoder.layers.0.mlp") {
    store.allocate();
    layer.init_parameters(3, 0.5f, 0.4f);
    for (int i = 0; i < store.count(); ++i) {  // non-zero biases, so their gradients count
      ParamHandle handle{i};
      if (!store.spec(handle).name.ends_with(".bias")) continue;
      Tensor bias = store.param(handle);
      bias.copy_from(testing::random_normal(bias.shape(), 50 + uint64_t(i), 0.2f, dtype));
    }
  }
  ParameterStore store;
  MoELayer layer;
};

// softmax(x W + b) per token, in double: [T, E].
std::vector<double> reference_scores(const Tensor& hidden, MoELayer& layer) {
  const Tensor x = hidden.reshape({-1, hidden.dim(-1)}).to(DType::F64);
  const Tensor w = layer.router().weight().to(DType::F64);
  const Tensor b = layer.router().bias().to(DType::F64);
  const int64_t T = x.dim(0), H = x.dim(1), E = w.dim(1);
  std::vector<double> scores(size_t(T * E));
  for (int64_t t = 0; t < T; ++t) {
    double* row = scores.data() + t * E;
    for (int64_t e = 0; e < E; ++e) {
      row[e] = b.data<double>()[e];
      for (int64_t h = 0; h < H; ++h)
        row[e] += x.data<double>()[t * H + h] * w.data<double>()[h * E + e];
    }
    const double peak = *std::max_element(row, row + E);
    double total = 0;
    for (int64_t e = 0; e < E; ++e) total += (row[e] = std::exp(row[e] - peak));
    for (int64_t e = 0; e < E; ++e) row[e] /= total;
  }
  return scores;
}

// chosen[t * E + e]: expert e takes token t, by brute force: each expert's tokens sorted by
// score, highest first, the lower token first among equal scores, the first `capacity` taken.
std::vector<uint8_t> reference_choice(const std::vector<double>& scores, int64_t T, int64_t E,
                                      int64_t capacity) {
  std::vector<uint8_t> chosen(size_t(T * E), 0);
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int64_t> tokens(static_cast<size_t>(T));
    std::iota(tokens.begin(), tokens.end(), 0);
    std::sort(tokens.begin(), tokens.end(), [&](int64_t a, int64_t b) {
      const double sa = scores[size_t(a * E + e)], sb = scores[size_t(b * E + e)];
      return sa > sb || (sa == sb && a < b);
    });
    for (int64_t i = 0; i < capacity; ++i) chosen[size_t(tokens[size_t(i)] * E + e)] = 1;
  }
  return chosen;
}

TEST(ExpertChoice, CapacityIsTheCeiledShareClampedToTheBatch) {
  EXPECT_EQ(expert_choice_capacity(16, 4, 1.0), 4);
  EXPECT_EQ(expert_choice_capacity(17, 4, 1.0), 5);  // 4.25
  EXPECT_EQ(expert_choice_capacity(17, 4, 1.5), 7);  // 6.375
  EXPECT_EQ(expert_choice_capacity(1, 4, 0.1), 1);   // 0.025: an expert takes at least one
  EXPECT_EQ(expert_choice_capacity(5, 4, 8.0), 5);   // 10 > T: every expert takes every token
  EXPECT_EQ(expert_choice_capacity(0, 4, 2.0), 0);
  testing::expect_error_containing([] { expert_choice_capacity(4, 0, 1.0); }, "num_experts (0)");
}

// For every batch size and factor (integral share or not, above the batch or not), every expert
// takes exactly the capacity, the taken tokens are the brute-force top scorers, the combine
// weights are the scores, and the output is the score-weighted sum of the takers' outputs.
TEST(ExpertChoice, EveryExpertTakesExactlyItsCapacityOfTopScorers) {
  for (double factor : {0.5, 1.0, 1.3, 8.0}) {
    const MoEConfig config = expert_choice_config(factor);
    const int64_t E = config.num_experts, H = config.hidden_size;
    LayerFixture fixture(config, DType::F64);
    for (int64_t T : {1, 5, 17}) {
      SCOPED_TRACE(detail::concat("factor ", factor, " T ", T));
      const Tensor hidden = testing::random_normal({T, H}, uint64_t(T), 1.0f, DType::F64);
      MoEContext ctx;
      const Tensor out = fixture.layer.forward(hidden, ctx);
      const int64_t capacity = expert_choice_capacity(T, E, factor);
      EXPECT_EQ(capacity, std::min<int64_t>(T, int64_t(std::ceil(double(T) * factor / 4))));
      EXPECT_EQ(ctx.dispatch.tokens_per_local_expert, std::vector<int64_t>(size_t(E), capacity));

      const std::vector<double> scores = reference_scores(hidden, fixture.layer);
      const std::vector<uint8_t> expected = reference_choice(scores, T, E, capacity);
      const Routing& routing = ctx.router.routing;
      ASSERT_EQ(routing.topk, E);
      std::vector<uint8_t> taken(size_t(T * E), 0);
      std::vector<double> weight(size_t(T * E), 0.0);
      for (int64_t slot = 0; slot < T * E; ++slot) {
        const int64_t t = slot / E, e = routing.experts.data<int32_t>()[slot];
        // fp64 softmax against the same in another order: a few ulps.
        EXPECT_NEAR(routing.probs.data<double>()[slot], scores[size_t(t * E + e)], 1e-14);
        if (ctx.dispatch.plan.row_of_slot[size_t(slot)] < 0) continue;
        taken[size_t(t * E + e)] = 1;
        weight[size_t(t * E + e)] = routing.probs.data<double>()[slot];
      }
      EXPECT_EQ(taken, expected);

      // Every expert on every token, then the taken pairs weighted by their scores.
      Tensor all_rows = Tensor::empty({E * T, H}, DType::F64);
      for (int64_t e = 0; e < E; ++e) all_rows.rows(e * T, (e + 1) * T).copy_from(hidden);
      ExpertsContext experts_ctx;
      const Tensor all_out = fixture.layer.experts().forward(
          all_rows, std::vector<int64_t>(size_t(E), T), experts_ctx);
      Tensor expected_out = Tensor::zeros({T, H}, DType::F64);
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t e = 0; e < E; ++e) {
          for (int64_t h = 0; h < H; ++h) {
            expected_out.data<double>()[t * H + h] +=
                weight[size_t(t * E + e)] * all_out.data<double>()[(e * T + t) * H + h];
          }
        }
      }
      // fp64 sums of at most E terms in another order, and dgemm rows computed in another
      // batch: well under 1e-12.
      EXPECT_TENSORS_CLOSE(out, expected_out, 1e-12, 1e-12);
      fixture.layer.backward(ctx, testing::random_normal({T, H}, 9, 1.0f, DType::F64));
    }
  }
}

TEST(ExpertChoice, EmptyBatchWorksForwardAndBackward) {
  LayerFixture fixture(expert_choice_config(1.0), DType::F32);
  MoEContext ctx;
  const Tensor out = fixture.layer.forward(Tensor({0, 6}), ctx);
  EXPECT_EQ(out.shape(), (Shape{0, 6}));
  EXPECT_EQ(ctx.dispatch.tokens_per_local_expert, std::vector<int64_t>(4, 0));
  EXPECT_EQ(fixture.layer.backward(ctx, Tensor({0, 6})).shape(), (Shape{0, 6}));
}

// Gradients through the taken scores to the router logits, weight and bias, and through the
// experts, against central differences (the step is far below the score gaps at the choice
// boundary of these seeded batches, so no choice flips).
TEST(ExpertChoice, GradientsMatchFiniteDifferences) {
  const std::vector<testing::ConfigVariant> cases = {
      {"gelu_sequential_share_not_integral_z_loss_jitter",
       [](MoEConfig& c) {
         c.moe_expert_capacity_factor = 1.3;  // 12 tokens: ceil(3.9) = 4 each
         c.moe_z_loss_coeff = 0.05;
         c.moe_input_jitter_eps = 0.05;
       }},
      {"swiglu_grouped_padded_no_bias",
       [](MoEConfig& c) {
         c.moe_expert_capacity_factor = 0.6;  // ceil(1.8) = 2 each
         c.moe_pad_expert_input_to_capacity = true;
         c.activation = ExpertActivation::kSwiGLU;
         c.moe_grouped_gemm = true;
         c.add_bias_linear = false;
       }},
      {"every_expert_takes_every_token",
       [](MoEConfig& c) { c.moe_expert_capacity_factor = 5.0; }},  // 15 clamped to 12
  };
  for (const testing::ConfigVariant& entry : cases) {
    SCOPED_TRACE(entry.name);
    MoEConfig config = expert_choice_config(1.0);
    entry.change(config);
    LayerFixture fixture(config, DType::F64);
    MoELayer& layer = fixture.layer;
    Tensor hidden = testing::random_normal({4, 3, 6}, 2, 1.0f, DType::F64);
    const Tensor probe = testing::random_normal({4, 3, 6}, 3, 1.0f, DType::F64);
    const Rng::State jitter_state = layer.router().jitter_rng().state();
    auto objective = [&] {
      layer.router().jitter_rng().set_state(jitter_state);
      MoEContext ctx;
      const Tensor out = layer.forward(hidden, ctx);
      return testing::dot(out, probe) + MoELayer::losses(ctx).z_loss;
    };
    layer.router().jitter_rng().set_state(jitter_state);
    MoEContext ctx;
    layer.forward(hidden, ctx);
    const Tensor grad_hidden = layer.backward(ctx, probe);
    EXPECT_TRUE(testing::check_moe_gradient(hidden, grad_hidden, objective, "input"));
    for (int i = 0; i < fixture.store.count(); ++i) {
      ParamHandle handle{i};
      EXPECT_TRUE(testing::check_moe_gradient(fixture.store.param(handle),
                                              fixture.store.grad(handle), objective,
                                              fixture.store.spec(handle).name));
    }
  }
}

TEST(ExpertChoice, SettingsWithoutAMeaningAreRefusedByName) {
  const std::vector<std::pair<testing::ConfigVariant, const char*>> cases = {
      {{"no capacity", [](MoEConfig& c) { c.moe_expert_capacity_factor.reset(); }},
       "moe_router_type expert_choice needs moe_expert_capacity_factor"},
      {{"sigmoid", [](MoEConfig& c) { c.moe_router_score_function = ScoreFunction::kSigmoid; }},
       "moe_router_score_function sigmoid is not supported with moe_router_type expert_choice"},
      {{"pre-softmax", [](MoEConfig& c) { c.moe_router_pre_softmax = true; }},
       "moe_router_pre_softmax has no meaning with moe_router_type expert_choice"},
      {{"scaling", [](MoEConfig& c) { c.moe_router_topk_scaling_factor = 2.0; }},
       "moe_router_topk_scaling_factor (2) has no meaning with moe_router_type expert_choice"},
      {{"position", [](MoEConfig& c) { c.moe_token_drop_policy = TokenDropPolicy::kPosition; }},
       "moe_token_drop_policy position has no meaning with moe_router_type expert_choice"},
      {{"aux loss", [](MoEConfig& c) { c.moe_aux_loss_coeff = 0.01; }},
       "moe_aux_loss_coeff (0.01) must be 0 with moe_router_type expert_choice"},
      {{"sinkhorn",
        [](MoEConfig& c) { c.moe_router_load_balancing_type = LoadBalancingType::kSinkhorn; }},
       "moe_expert_capacity_factor only works with aux_loss, seq_aux_loss, global_aux_loss or "
       "none"},
  };
  for (const auto& [variant, message] : cases) {
    SCOPED_TRACE(variant.name);
    MoEConfig config = expert_choice_config(1.0);
    variant.change(config);
    testing::expect_error_containing([&] { config.validate(); }, message);
  }
  // The aux-loss type with a zero coefficient and the z-loss are accepted.
  MoEConfig config = expert_choice_config(1.0);
  config.moe_router_load_balancing_type = LoadBalancingType::kSeqAuxLoss;
  config.moe_z_loss_coeff = 1e-3;
  EXPECT_NO_THROW(config.validate());
  EXPECT_EQ(parse_router_type("expert_choice"), RouterType::kExpertChoice);
  EXPECT_EQ(name_of(RouterType::kTopK), "topk");
  testing::expect_error_containing([] { parse_router_type("expert"); },
                                   "moe_router_type: unknown value 'expert' (choices: topk, "
                                   "expert_choice)");
}

}  // namespace
}  // namespace moe

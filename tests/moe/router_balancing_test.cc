// The router's DeepSeek-style routing: the expert bias (aux-loss-free balancing) and its
// persistent buffer, group-limited top-k against a brute-force reference, the router dtype, and
// the global and combined balancing losses.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "moe/checkpoint/checkpoint.h"
#include "moe/moe/capacity.h"
#include "moe/moe/moe_layer.h"
#include "moe/moe/router.h"
#include "moe/optim/optimizer.h"
#include "moe_test_util.h"
#include "support/testing.h"

namespace moe {
namespace {

MoEConfig sigmoid_bias_config(int64_t hidden, int64_t experts, int64_t topk) {
  MoEConfig config = testing::small_config(hidden, experts, topk, 4);
  config.moe_router_score_function = ScoreFunction::kSigmoid;
  config.moe_router_enable_expert_bias = true;
  config.moe_router_load_balancing_type = LoadBalancingType::kNone;
  return config;
}

std::vector<int64_t> loads_of(const Routing& routing, int64_t experts) {
  std::vector<int64_t> loads(size_t(experts), 0);
  for (int64_t s = 0; s < routing.experts.numel(); ++s) {
    ++loads[size_t(routing.experts.data<int32_t>()[s])];
  }
  return loads;
}

double max_over_mean(const std::vector<int64_t>& loads) {
  double total = 0.0, most = 0.0;
  for (int64_t load : loads) {
    total += double(load);
    most = std::max(most, double(load));
  }
  return most / (total / double(loads.size()));
}

// Every token prefers experts 0 and 1 by a wide margin (linear bias +4 and +3 on spread-out
// logits); the bias updates alone must spread the load: max/mean below 1.25 after 50 updates
// at rate 0.01, from above 3 at the start.
TEST(ExpertBias, SkewedRouterBecomesBalanced) {
  const int64_t H = 4, E = 8, K = 2, T = 256;
  MoEConfig config = sigmoid_bias_config(H, E, K);
  config.moe_router_bias_update_rate = 0.01;
  ParameterStore store;
  TopKRouter router(config, store, "router");
  store.allocate();
  router.init_parameters(3, 1.0f);
  router.bias().set(0, 4.0f);
  router.bias().set(1, 3.0f);
  Tensor hidden = testing::random_normal({T, H}, 4);
  comm::ProcessGroup self;
  RouterContext ctx;
  Routing first = router.forward(hidden, ctx);
  EXPECT_GT(max_over_mean(loads_of(first, E)), 3.0);
  router.count_routed_tokens(first);
  router.update_expert_bias(self);
  for (int update = 1; update < 50; ++update) {
    router.count_routed_tokens(router.forward(hidden, ctx));
    router.update_expert_bias(self);
  }
  std::vector<int64_t> loads = loads_of(router.forward(hidden, ctx, /*training=*/false), E);
  EXPECT_LT(max_over_mean(loads), 1.25);
}

// The update adds rate * sign(mean - load) in fp32 and clears the counts; the counts add up
// over calls, and with a capacity factor the layer counts only the slots an expert keeps.
TEST(ExpertBias, CountsAndUpdateRule) {
  const int64_t H = 5, E = 6, K = 2, T = 17;
  MoEConfig config = sigmoid_bias_config(H, E, K);
  ParameterStore store;
  TopKRouter router(config, store, "router");
  store.allocate();
  router.init_parameters(5, 0.7f);
  Tensor hidden = testing::random_normal({T, H}, 6);
  RouterContext ctx;
  Routing first = router.forward(hidden, ctx);
  router.count_routed_tokens(first);
  std::vector<int64_t> expected = loads_of(first, E);
  Routing again = router.forward(hidden, ctx);
  router.count_routed_tokens(again);
  std::vector<int64_t> second = loads_of(again, E);
  for (int64_t e = 0; e < E; ++e) {
    expected[size_t(e)] += second[size_t(e)];
    EXPECT_EQ(router.tokens_per_expert().data<int64_t>()[e], expected[size_t(e)]) << e;
  }
  Tensor before = router.expert_bias().clone();
  router.update_expert_bias(comm::ProcessGroup());
  const double mean = double(2 * T * K) / double(E);
  for (int64_t e = 0; e < E; ++e) {
    double offset = mean - double(expected[size_t(e)]);
    float sign = offset > 0 ? 1.0f : offset < 0 ? -1.0f : 0.0f;
    float want = before.data<float>()[e] + sign * float(config.moe_router_bias_update_rate);
    EXPECT_EQ(router.expert_bias().data<float>()[e], want) << e;
    EXPECT_EQ(router.tokens_per_expert().data<int64_t>()[e], 0);
  }

  // Capacity 1.0 of 17 * 2 / 6 tokens: the layer counts its training forwards' kept slots only
  // (evaluation and recomputation do not count).
  config.moe_expert_capacity_factor = 1.0;
  ParameterStore capped_store;
  MoELayer capped(config, capped_store, "layer");
  capped_store.allocate();
  capped.init_parameters(5, 0.7f, 0.7f);
  MoEContext layer_ctx;
  capped.forward(hidden, layer_ctx);
  const Routing& routing = layer_ctx.router.routing;
  CapacityDecision capacity = decide_capacity(config, routing);
  ASSERT_FALSE(capacity.keep.empty());
  std::vector<int64_t> kept(size_t(E), 0);
  for (int64_t s = 0; s < routing.experts.numel(); ++s) {
    if (capacity.keep[size_t(s)] != 0) ++kept[size_t(routing.experts.data<int32_t>()[s])];
  }
  const RouterReplay replay = layer_ctx.router.replay;
  MoEContext other_ctx;
  capped.forward(hidden, other_ctx, /*training=*/false);
  capped.forward(hidden, other_ctx, /*training=*/true, &replay);
  int64_t counted = 0;
  for (int64_t e = 0; e < E; ++e) {
    EXPECT_EQ(capped.router().tokens_per_expert().data<int64_t>()[e], kept[size_t(e)]) << e;
    counted += kept[size_t(e)];
  }
  EXPECT_LT(counted, T * K);  // some slot was dropped, so the check means something
}

// The bias changes which experts are chosen, not the probabilities: those come from the
// unbiased sigmoid scores of the chosen experts.
TEST(ExpertBias, SelectsWithTheBiasButWeighsWithoutIt) {
  const int64_t H = 5, E = 8, K = 2, T = 9;
  MoEConfig config = sigmoid_bias_config(H, E, K);
  ParameterStore store(DType::F64);
  TopKRouter router(config, store, "router");
  store.allocate();
  router.init_parameters(7, 0.5f);
  router.expert_bias().set(5, 3.0f);  // sigmoid scores are below 1: 5 and 6 always win
  router.expert_bias().set(6, 2.0f);
  Tensor hidden = testing::random_normal({T, H}, 8, 1.0f, DType::F64);
  RouterContext ctx;
  Routing routing = router.forward(hidden, ctx);
  const double* logits = ctx.logits.data<double>();
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_EQ(routing.experts.data<int32_t>()[t * K], 5);
    EXPECT_EQ(routing.experts.data<int32_t>()[t * K + 1], 6);
    double s5 = 1.0 / (1.0 + std::exp(-logits[t * E + 5]));
    double s6 = 1.0 / (1.0 + std::exp(-logits[t * E + 6]));
    // fp64 throughout; the sigmoid's rounding differs by a few ulps at most.
    EXPECT_NEAR(routing.probs.data<double>()[t * K], s5 / (s5 + s6), 1e-15);
    EXPECT_NEAR(routing.probs.data<double>()[t * K + 1], s6 / (s5 + s6), 1e-15);
  }
}

// The expert bias is a persistent buffer: fp32 in a bf16 store, no gradient, untouched by the
// optimizer (Adam with weight decay) while the router weight moves, and saved and loaded bitwise
// under Megatron's name.
TEST(ExpertBias, PersistentBufferThroughOptimizerAndCheckpoint) {
  const int64_t H = 6, E = 4, K = 2, T = 7;
  MoEConfig config = sigmoid_bias_config(H, E, K);
  const std::string prefix = "decoder.layers.0.mlp.router";
  ParameterStore store(DType::BF16);
  TopKRouter router(config, store, prefix);
  store.allocate();
  router.init_parameters(9, 0.5f);
  Tensor values = testing::random_normal({E}, 10, 0.01f);  // below bf16's resolution near 1
  for (int64_t e = 0; e < E; ++e) router.expert_bias().set(e, 1.0f + values.get(e));
  ParamHandle handle = store.find(prefix + ".expert_bias");
  ASSERT_GE(handle.index, 0);
  EXPECT_EQ(store.param(handle).dtype(), DType::F32);
  EXPECT_EQ(store.flat_params(ParamGroup::kDense).numel(), H * E + E);  // weight and bias only
  testing::expect_error_containing([&] { store.grad(handle); },
                                   "is a persistent buffer, not trainable: it has no gradient");

  comm::ParallelState parallel = comm::single_process_state();
  optim::OptimizerConfig adam;
  adam.bf16 = true;
  adam.lr = 0.1;
  adam.weight_decay = 0.5;
  optim::Optimizer optimizer(store, parallel, adam);
  Tensor saved_bias = router.expert_bias().clone();
  Tensor saved_weight = router.weight().clone();
  Tensor hidden = testing::random_normal({T, H}, 11, 1.0f, DType::BF16);
  RouterContext ctx;
  router.forward(hidden, ctx);
  Tensor grad_hidden({T, H}, DType::BF16);
  router.backward(ctx, testing::random_normal({T, K}, 12), grad_hidden);
  optimizer.step();
  EXPECT_TRUE(testing::same_bytes(router.expert_bias(), saved_bias));
  EXPECT_FALSE(testing::same_bytes(router.weight(), saved_weight));

  testing::ScratchDir dir("expert_bias_checkpoint");
  checkpoint::TrainingState state;
  state.iteration = 1;
  checkpoint::save_checkpoint(dir.str(), state, store, &optimizer, nullptr, parallel);
  ParameterStore loaded_store(DType::BF16);
  TopKRouter loaded(config, loaded_store, prefix);
  loaded_store.allocate();
  optim::Optimizer loaded_optimizer(loaded_store, parallel, adam);
  checkpoint::load_checkpoint(dir.str(), loaded_store, &loaded_optimizer, nullptr, parallel);
  EXPECT_TRUE(testing::same_bytes(loaded.expert_bias(), saved_bias));
  EXPECT_TRUE(testing::same_bytes(loaded.weight(), router.weight()));

  MoEConfig without = config;
  without.moe_router_enable_expert_bias = false;
  ParameterStore plain_store(DType::BF16);
  TopKRouter plain(without, plain_store, prefix);
  plain_store.allocate();
  testing::expect_error_containing(
      [&] { checkpoint::load_checkpoint(dir.str(), plain_store, nullptr, nullptr, parallel); },
      prefix + ".expert_bias");  // strict loading names the tensor no model has
  testing::expect_error_containing([&] { plain.update_expert_bias(comm::ProcessGroup()); },
                                   "moe_router_enable_expert_bias is false");
}

// Megatron's group_limited_topk written out plainly: full sorts and first-maximum scans.
std::vector<int32_t> brute_force_group_topk(const std::vector<double>& scores, int64_t groups,
                                            int64_t group_topk, int64_t topk) {
  const int64_t E = int64_t(scores.size()), per_group = E / groups, picks = topk / group_topk;
  std::vector<double> group_scores;
  for (int64_t g = 0; g < groups; ++g) {
    std::vector<double> members(scores.begin() + g * per_group,
                                scores.begin() + (g + 1) * per_group);
    std::sort(members.rbegin(), members.rend());
    double total = 0.0;
    for (int64_t i = 0; i < picks; ++i) total += members[size_t(i)];
    group_scores.push_back(total);
  }
  std::vector<bool> allowed(size_t(E), false);
  for (int64_t round = 0; round < group_topk; ++round) {
    size_t best = 0;
    for (size_t g = 1; g < group_scores.size(); ++g) {
      if (group_scores[g] > group_scores[best]) best = g;
    }
    group_scores[best] = -INFINITY;
    for (int64_t e = 0; e < per_group; ++e) allowed[best * size_t(per_group) + size_t(e)] = true;
  }
  std::vector<double> remaining = scores;
  std::vector<int32_t> chosen;
  for (int64_t round = 0; round < topk; ++round) {
    int32_t best = -1;
    for (int32_t e = 0; e < int32_t(E); ++e) {
      if (allowed[size_t(e)] && (best < 0 || remaining[size_t(e)] > remaining[size_t(best)])) {
        best = e;
      }
    }
    chosen.push_back(best);
    allowed[size_t(best)] = false;
  }
  return chosen;
}

// Logits = hidden (identity weight, no linear bias), so the selection scores are known exactly;
// values from a few levels make ties inside groups, between groups and across the top-k.
void check_group_limited(MoEConfig config, int64_t T, bool with_expert_bias) {
  const int64_t E = config.num_experts, K = config.moe_router_topk;
  SCOPED_TRACE(::testing::Message() << "E " << E << " groups " << *config.moe_router_num_groups
                                    << " group_topk " << *config.moe_router_group_topk << " topk "
                                    << K << " T " << T << " bias " << with_expert_bias);
  config.hidden_size = E;
  config.add_bias_linear = false;
  if (with_expert_bias) {
    config.moe_router_score_function = ScoreFunction::kSigmoid;
    config.moe_router_enable_expert_bias = true;
  }
  ParameterStore store(DType::F64);
  TopKRouter router(config, store, "router");
  store.allocate();
  for (int64_t e = 0; e < E; ++e) router.weight().set(e * E + e, 1.0f);
  std::vector<float> bias(size_t(E), 0.0f);
  if (with_expert_bias) {
    Tensor noise = testing::random_uniform({E}, 13, -0.2f, 0.2f);
    for (int64_t e = 0; e < E; ++e) {
      bias[size_t(e)] = noise.get(e);
      router.expert_bias().set(e, bias[size_t(e)]);
    }
  }
  Tensor levels = testing::random_uniform({T, E}, uint64_t(17 + T), 0.0f, 4.0f);
  Tensor hidden({T, E}, DType::F64);
  for (int64_t i = 0; i < T * E; ++i) hidden.data<double>()[i] = std::floor(levels.get(i)) / 4.0;
  RouterContext ctx;
  Routing routing = router.forward(hidden, ctx);
  const int64_t per_group = E / *config.moe_router_num_groups;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> scores(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      double logit = hidden.data<double>()[t * E + e];
      scores[size_t(e)] =
          with_expert_bias ? 1.0 / (1.0 + std::exp(-logit)) + double(bias[size_t(e)]) : logit;
    }
    std::vector<int32_t> want = brute_force_group_topk(scores, *config.moe_router_num_groups,
                                                       *config.moe_router_group_topk, K);
    std::vector<int64_t> chosen_groups;
    for (int64_t j = 0; j < K; ++j) chosen_groups.push_back(want[size_t(j)] / per_group);
    for (int64_t j = 0; j < K; ++j) {
      int32_t got = routing.experts.data<int32_t>()[t * K + j];
      EXPECT_EQ(got, want[size_t(j)]) << "token " << t << " slot " << j;
    }
    // No token leaves its chosen groups: at most group_topk distinct groups.
    std::sort(chosen_groups.begin(), chosen_groups.end());
    chosen_groups.erase(std::unique(chosen_groups.begin(), chosen_groups.end()),
                        chosen_groups.end());
    EXPECT_LE(int64_t(chosen_groups.size()), *config.moe_router_group_topk) << "token " << t;
  }
}

TEST(GroupLimitedRouting, MatchesBruteForceWithTies) {
  struct Layout {
    int64_t experts, groups, group_topk, topk;
  };
  for (Layout l : {Layout{12, 4, 2, 4}, Layout{8, 8, 4, 4}, Layout{16, 4, 1, 3},
                   Layout{16, 4, 3, 6}, Layout{6, 2, 2, 2}}) {
    for (int64_t T : {0, 1, 5, 17}) {
      for (bool with_expert_bias : {false, true}) {
        MoEConfig config = testing::small_config(4, l.experts, l.topk, 4);
        config.moe_router_num_groups = l.groups;
        config.moe_router_group_topk = l.group_topk;
        check_group_limited(config, T, with_expert_bias);
      }
    }
  }
}

// One router evaluated at two precisions must agree: fp64 routing of fp32 activations equals the
// fp64 routing of the same values given as fp64 (then rounded to fp32 probabilities).
TEST(RouterDType, Fp64RoutingOfFp32Activations) {
  const int64_t H = 6, E = 5, K = 2, S = 4, B = 2;
  MoEConfig config = testing::small_config(H, E, K, 4);
  config.moe_aux_loss_coeff = 0.1;
  config.moe_z_loss_coeff = 0.01;
  config.moe_router_dtype = RouterDType::kFP64;
  ParameterStore store;
  TopKRouter router(config, store, "router");
  store.allocate();
  router.init_parameters(21, 0.8f);
  router.bias().copy_from(testing::random_normal({E}, 22, 0.3f));
  Tensor hidden = testing::random_normal({S, B, H}, 23);
  RouterContext narrow, wide;
  Routing from_fp32 = router.forward(hidden, narrow);
  EXPECT_EQ(narrow.logits.dtype(), DType::F64);
  EXPECT_EQ(from_fp32.probs.dtype(), DType::F32);  // the dispatchers' dtype for fp32 activations
  Routing from_fp64 = router.forward(hidden.to(DType::F64), wide);
  EXPECT_TRUE(testing::same_bytes(narrow.logits, wide.logits));
  EXPECT_TRUE(testing::same_bytes(from_fp32.experts, from_fp64.experts));
  EXPECT_TRUE(testing::same_bytes(from_fp32.probs, from_fp64.probs.to(DType::F32)));
  EXPECT_EQ(narrow.losses.load_balancing_loss, wide.losses.load_balancing_loss);
  EXPECT_EQ(narrow.losses.z_loss, wide.losses.z_loss);
  // Backward takes fp32 probability gradients and rounds the fp64 input gradient once.
  Tensor probe = testing::random_normal({S * B, K}, 24);
  Tensor grad_narrow({S, B, H}), grad_wide({S, B, H}, DType::F64);
  router.backward(narrow, probe, grad_narrow);
  router.backward(wide, probe.to(DType::F64), grad_wide);
  EXPECT_TRUE(testing::same_bytes(grad_narrow, grad_wide.to(DType::F32)));

  // fp32 routing of fp64 activations: fp32 logits, probabilities widened to fp64.
  config.moe_router_dtype = RouterDType::kFP32;
  ParameterStore store32(DType::F64);
  TopKRouter router32(config, store32, "router");
  store32.allocate();
  router32.init_parameters(21, 0.8f);
  RouterContext ctx32;
  Routing routed = router32.forward(hidden.to(DType::F64), ctx32);
  EXPECT_EQ(ctx32.logits.dtype(), DType::F32);
  EXPECT_EQ(routed.probs.dtype(), DType::F64);
}

// Each balancing type listed with the others gives the loss it gives alone, and
// load_balancing_loss is their sum. global_aux_loss on one micro-batch equals aux_loss; on the
// next it uses the mean of the two micro-batches' counts.
TEST(BalancingLosses, SeveralTypesAndGlobalAverage) {
  using LB = LoadBalancingType;
  const int64_t H = 6, E = 5, K = 2, S = 4, B = 3;
  Tensor first = testing::random_normal({S, B, H}, 31, 1.0f, DType::F64);
  Tensor second = testing::random_normal({S, B, H}, 32, 1.0f, DType::F64);
  auto make_config = [&](OneOrMore<LB> types, OneOrMore<double> coeffs) {
    MoEConfig config = testing::small_config(H, E, K, 4);
    config.moe_router_load_balancing_type = std::move(types);
    config.moe_aux_loss_coeff = std::move(coeffs);
    return config;
  };
  auto losses_of = [&](const MoEConfig& config, const TopKRouter::AuxCountReducer& reducer) {
    ParameterStore store(DType::F64);
    TopKRouter router(config, store, "router");
    store.allocate();
    router.init_parameters(33, 0.8f);
    if (reducer) router.set_aux_count_reducer(reducer);
    RouterContext ctx;
    std::vector<RouterLosses> out;
    for (const Tensor* batch : {&first, &second}) {
      router.forward(*batch, ctx);
      out.push_back(ctx.losses);
    }
    return out;
  };
  std::vector<RouterLosses> all =
      losses_of(make_config(OneOrMore<LB>{LB::kAuxLoss, LB::kSeqAuxLoss, LB::kGlobalAuxLoss},
                            OneOrMore<double>{0.3, 0.2, 0.1}),
                nullptr);
  std::vector<RouterLosses> aux = losses_of(make_config(LB::kAuxLoss, 0.3), nullptr);
  std::vector<RouterLosses> seq = losses_of(make_config(LB::kSeqAuxLoss, 0.2), nullptr);
  std::vector<RouterLosses> global_as_aux = losses_of(make_config(LB::kAuxLoss, 0.1), nullptr);
  // The second micro-batch's global loss: aux_loss with the mean of both batches' counts.
  std::vector<double> first_counts;
  auto averaging = [&](Tensor& counts, double&) {
    const int64_t n = counts.numel();
    if (first_counts.empty()) {
      first_counts.assign(counts.data<double>(), counts.data<double>() + n);
      return;
    }
    for (int64_t e = 0; e < n; ++e) {
      counts.data<double>()[e] = (counts.data<double>()[e] + first_counts[size_t(e)]) / 2.0;
    }
  };
  std::vector<RouterLosses> averaged = losses_of(make_config(LB::kAuxLoss, 0.1), averaging);
  for (size_t mb = 0; mb < 2; ++mb) {
    SCOPED_TRACE(mb);
    // fp64 sums of ~1-sized terms, in a different order (per sequence first): a few ulps.
    EXPECT_NEAR(all[mb].aux_loss, aux[mb].aux_loss, 1e-14);
    EXPECT_NEAR(all[mb].seq_aux_loss, seq[mb].seq_aux_loss, 1e-14);
    EXPECT_GT(all[mb].seq_aux_loss, 0.0);
    double global_want = mb == 0 ? global_as_aux[0].aux_loss : averaged[1].aux_loss;
    EXPECT_NEAR(all[mb].global_aux_loss, global_want, 1e-14);
    EXPECT_EQ(all[mb].load_balancing_loss,
              all[mb].aux_loss + all[mb].seq_aux_loss + all[mb].global_aux_loss);
  }
  EXPECT_NE(averaged[1].aux_loss, global_as_aux[1].aux_loss);  // the mean made a difference
}

}  // namespace
}  // namespace moe

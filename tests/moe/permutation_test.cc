#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>
#include <string>

#include "moe/moe/capacity.h"
#include "moe/moe/permutation.h"
#include "moe/moe/token_dispatcher.h"
#include "moe/tensor/ops.h"
#include "moe_test_util.h"
#include "support/kernel_harness.h"
#include "support/testing.h"

namespace moe {
namespace {

// A routing of T tokens to topk distinct experts of E, drawn from seed; probs in (0.05, 1).
Routing random_routing(int64_t T, int64_t E, int64_t K, uint64_t seed,
                       DType prob_dtype = DType::F32) {
  Rng rng(seed);
  Routing routing;
  routing.num_tokens = T;
  routing.topk = K;
  routing.experts = Tensor({T, K}, DType::I32);
  routing.probs = Tensor({T, K}, prob_dtype);
  std::vector<int32_t> ids(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    std::iota(ids.begin(), ids.end(), 0);
    for (int64_t j = 0; j < K; ++j) {  // partial Fisher-Yates: K distinct experts
      std::swap(ids[size_t(j)], ids[size_t(j + int64_t(rng.below(uint64_t(E - j))))]);
      routing.experts.data<int32_t>()[t * K + j] = ids[size_t(j)];
      routing.probs.set(t * K + j, rng.uniform(0.05f, 1.0f));
    }
  }
  return routing;
}

void expect_same_plan(const DispatchPlan& a, const DispatchPlan& b) {
  EXPECT_EQ(a.rows_per_expert, b.rows_per_expert);
  EXPECT_EQ(a.row_of_slot, b.row_of_slot);
  EXPECT_EQ(a.slot_of_row, b.slot_of_row);
}

TEST(Permutation, PlanMatchesReferenceOnAwkwardShapes) {
  for (int64_t T : {0, 1, 5, 17, 129}) {
    for (int64_t E : {1, 3, 8}) {
      for (int64_t K : {1, 2, 3}) {
        if (K > E) continue;
        Routing routing = random_routing(T, E, K, uint64_t(T * 100 + E * 10 + K));
        DispatchPlan plan = build_dispatch_plan(routing.experts, E, 0, E);
        expect_same_plan(plan, reference::build_dispatch_plan(routing.experts, E, 0, E));
        // Dropless: every slot gets a row and the rows sum to T * topk.
        EXPECT_EQ(
            std::accumulate(plan.rows_per_expert.begin(), plan.rows_per_expert.end(), int64_t(0)),
            T * K);
        // Inside each expert the rows follow token order.
        int64_t row = 0;
        for (int64_t e = 0; e < E; ++e) {
          for (int64_t i = 1; i < plan.rows_per_expert[size_t(e)]; ++i) {
            EXPECT_LT(plan.slot_of_row[size_t(row + i - 1)] / K,
                      plan.slot_of_row[size_t(row + i)] / K);
          }
          for (int64_t i = 0; i < plan.rows_per_expert[size_t(e)]; ++i) {
            EXPECT_EQ(routing.experts.get(plan.slot_of_row[size_t(row + i)]), float(e));
          }
          row += plan.rows_per_expert[size_t(e)];
        }
        // A subset of local experts.
        if (E >= 3) {
          expect_same_plan(build_dispatch_plan(routing.experts, E, 1, 2),
                           reference::build_dispatch_plan(routing.experts, E, 1, 2));
        }
      }
    }
  }
}

TEST(Permutation, FusedKernelsMatchReference) {
  for (DType dtype : {DType::F32, DType::BF16, DType::F64}) {
    for (int64_t T : {0, 1, 5, 17, 129}) {
      const int64_t E = 5, K = 2, H = 7;
      DType wdt = dtype == DType::F64 ? DType::F64 : DType::F32;
      Routing routing = random_routing(T, E, K, uint64_t(T + 3), wdt);
      std::vector<uint8_t> keep(size_t(T * K), 1);
      for (size_t i = 0; i < keep.size(); i += 3) keep[i] = 0;  // some dropped slots
      int64_t pad = T;                                          // and padding rows
      for (auto [plan_keep, plan_pad] :
           {std::pair{std::vector<uint8_t>{}, int64_t(0)}, std::pair{keep, pad}}) {
        DispatchPlan plan = build_dispatch_plan(routing.experts, E, 0, E, plan_keep, plan_pad);
        int64_t R = plan.num_rows();
        Tensor hidden = testing::random_normal({T, H}, 11, 1.0f, dtype);
        Tensor rows = Tensor::full({R, H}, 7.0f, dtype), expected({R, H}, dtype);
        for (const Tensor& weights : {Tensor(), routing.probs}) {
          permute_rows(hidden, plan, weights, rows);
          reference::permute_rows(hidden, plan, weights, expected);
          EXPECT_TENSORS_CLOSE(rows, expected, 0, dtype == DType::BF16 ? 1e-2 : 1e-6);
          Tensor out = Tensor::full({T, H}, 3.0f, dtype), out_expected({T, H}, dtype);
          unpermute_rows(rows, plan, weights, out);
          reference::unpermute_rows(rows, plan, weights, out_expected);
          EXPECT_TENSORS_CLOSE(out, out_expected, 1e-6, dtype == DType::BF16 ? 1e-2 : 1e-5);
        }
        Tensor grad_out = testing::random_normal({T, H}, 12, 1.0f, dtype);
        Tensor grad_rows = Tensor::full({R, H}, 5.0f, dtype), grad_rows_ref({R, H}, dtype);
        Tensor grad_w = Tensor::full({T, K}, 9.0f, wdt), grad_w_ref({T, K}, wdt);
        unpermute_rows_backward(rows, grad_out, plan, routing.probs, grad_rows, grad_w);
        reference::unpermute_rows_backward(rows, grad_out, plan, routing.probs, grad_rows_ref,
                                           grad_w_ref);
        EXPECT_TENSORS_CLOSE(grad_rows, grad_rows_ref, 1e-6, dtype == DType::BF16 ? 1e-2 : 1e-6);
        EXPECT_TENSORS_CLOSE(grad_w, grad_w_ref, 1e-5, dtype == DType::BF16 ? 1e-2 : 1e-5);
      }
    }
  }
}

// Exact checks as CUTLASS's testbeds make them: tokens, rows and weights of small integers, so
// every product and slot sum is an integer exact in every dtype (|values| <= 54, within bf16's
// 8 significant bits); the fused kernels must then give exactly the integer results, with and
// without dropped slots and padding, on the awkward token counts.
Tensor small_integers(const Shape& shape, DType dtype, Rng& rng, int64_t bound) {
  Tensor t = Tensor::empty(shape, dtype);
  for (int64_t i = 0; i < t.numel(); ++i) {
    t.set(i, float(int64_t(rng.below(uint64_t(2 * bound + 1))) - bound));
  }
  return t;
}

int64_t integer_at(const Tensor& t, int64_t i) {
  return int64_t(testing::value_at(t, i));
}

void expect_integers(const Tensor& actual, const std::vector<int64_t>& expected,
                     const std::string& what) {
  ASSERT_EQ(actual.numel(), int64_t(expected.size())) << what;
  for (int64_t i = 0; i < actual.numel(); ++i) {
    ASSERT_EQ(testing::value_at(actual, i), double(expected[size_t(i)]))
        << what << " element " << i;
  }
}

TEST(Permutation, SmallIntegerKernelsAreExact) {
  const int64_t E = 5, K = 2, H = 6;
  Rng rng(41);
  for (DType dtype : testing::kHarnessDtypes) {
    const DType wdt = dtype == DType::F64 ? DType::F64 : DType::F32;
    for (int64_t T : testing::kHarnessRows) {
      SCOPED_TRACE(testing::dtype_label(dtype) + " T=" + std::to_string(T));
      Routing routing = random_routing(T, E, K, uint64_t(T + 50), wdt);
      std::vector<uint8_t> keep(size_t(T * K), 1);
      for (size_t i = 1; i < keep.size(); i += 3) keep[i] = 0;
      for (auto [plan_keep, plan_pad] :
           {std::pair{std::vector<uint8_t>{}, int64_t(0)}, std::pair{keep, T}}) {
        const DispatchPlan plan =
            build_dispatch_plan(routing.experts, E, 0, E, plan_keep, plan_pad);
        const int64_t R = plan.num_rows();
        const Tensor hidden = small_integers({T, H}, dtype, rng, 3);
        const Tensor weights = small_integers({T, K}, wdt, rng, 2);
        const Tensor rows_in = small_integers({R, H}, dtype, rng, 3);
        const Tensor grad_out = small_integers({T, H}, dtype, rng, 3);
        std::vector<int64_t> rows(size_t(R * H), 0), out(size_t(T * H), 0);
        std::vector<int64_t> grad_rows(size_t(R * H), 0), grad_w(size_t(T * K), 0);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t slot = plan.slot_of_row[size_t(r)];
          if (slot < 0) continue;  // a padding row: zeros
          const int64_t t = slot / K;
          for (int64_t h = 0; h < H; ++h) {
            rows[size_t(r * H + h)] = integer_at(hidden, t * H + h) * integer_at(weights, slot);
            out[size_t(t * H + h)] += integer_at(weights, slot) * integer_at(rows_in, r * H + h);
            grad_rows[size_t(r * H + h)] =
                integer_at(weights, slot) * integer_at(grad_out, t * H + h);
            grad_w[size_t(slot)] +=
                integer_at(rows_in, r * H + h) * integer_at(grad_out, t * H + h);
          }
        }
        Tensor actual_rows = Tensor::full({R, H}, 7.0f, dtype);
        permute_rows(hidden, plan, weights, actual_rows);
        expect_integers(actual_rows, rows, "permute_rows");
        Tensor actual_out = Tensor::full({T, H}, 7.0f, dtype);
        unpermute_rows(rows_in, plan, weights, actual_out);
        expect_integers(actual_out, out, "unpermute_rows");
        Tensor actual_grad_rows = Tensor::full({R, H}, 7.0f, dtype);
        Tensor actual_grad_w = Tensor::full({T, K}, 7.0f, wdt);
        unpermute_rows_backward(rows_in, grad_out, plan, weights, actual_grad_rows, actual_grad_w);
        expect_integers(actual_grad_rows, grad_rows, "unpermute_rows_backward rows");
        expect_integers(actual_grad_w, grad_w, "unpermute_rows_backward weights");
      }
    }
  }
}

TEST(Permutation, RoundTripRestoresTokens) {
  const int64_t T = 17, E = 4, K = 2, H = 3;
  Routing routing = random_routing(T, E, K, 5);
  DispatchPlan plan = build_dispatch_plan(routing.experts, E, 0, E);
  Tensor hidden = testing::random_normal({T, H}, 1);
  Tensor rows({plan.num_rows(), H}), back({T, H});
  permute_rows(hidden, plan, Tensor(), rows);
  unpermute_rows(rows, plan, Tensor(), back);
  Tensor twice = hidden.clone();
  scale(twice, float(K));  // every token comes back once per slot
  EXPECT_TENSORS_CLOSE(back, twice, 1e-6, 1e-6);
}

TEST(Permutation, UnpermuteSumsFromPositiveZero) {
  // One kept slot whose product is -0 must give +0, as a sum that starts from zero does; the
  // expert-parallel dispatchers rely on the same bits.
  Routing routing = random_routing(2, 3, 2, 1);
  DispatchPlan plan = build_dispatch_plan(routing.experts, 3, 0, 3, {1, 0, 1, 0});
  Tensor rows = Tensor::from_floats({-0.0f, 0.0f}, {2, 1});
  Tensor out({2, 1});
  unpermute_rows(rows, plan, Tensor(), out);
  EXPECT_FALSE(std::signbit(out.get(0)));
  EXPECT_FALSE(std::signbit(out.get(1)));
}

TEST(Permutation, GradientsMatchFiniteDifferences) {
  const int64_t T = 9, E = 3, K = 2, H = 4;
  Routing routing = random_routing(T, E, K, 8, DType::F64);
  std::vector<uint8_t> keep(size_t(T * K), 1);
  keep[3] = 0;
  DispatchPlan plan = build_dispatch_plan(routing.experts, E, 0, E, keep, 8);
  Tensor rows = testing::random_normal({plan.num_rows(), H}, 2, 1.0f, DType::F64);
  Tensor probe = testing::random_normal({T, H}, 3, 1.0f, DType::F64);
  auto objective = [&] {
    Tensor out({T, H}, DType::F64);
    unpermute_rows(rows, plan, routing.probs, out);
    return testing::dot(out, probe);
  };
  Tensor grad_rows({plan.num_rows(), H}, DType::F64), grad_w({T, K}, DType::F64);
  unpermute_rows_backward(rows, probe, plan, routing.probs, grad_rows, grad_w);
  EXPECT_TRUE(testing::check_moe_gradient(rows, grad_rows, objective, "rows"));
  EXPECT_TRUE(testing::check_moe_gradient(routing.probs, grad_w, objective, "probs"));
  EXPECT_EQ(grad_w.get(3), 0.0f);  // a dropped slot gets no gradient
}

TEST(Capacity, MegatronCapacityFormula) {
  EXPECT_EQ(expert_capacity(4096, 2, 8, 1.0), 1024);
  EXPECT_EQ(expert_capacity(10, 2, 3, 1.0), 7);  // ceil(20 / 3)
  EXPECT_EQ(expert_capacity(10, 1, 4, 1.5), 4);  // ceil(3.75)
  EXPECT_EQ(expert_capacity(0, 2, 4, 1.0), 0);
  EXPECT_THROW(expert_capacity(10, 2, 4, 0.0), Error);
}

// Eight tokens all pick expert 0 first; capacity 3.
Routing crowded_routing() {
  Routing routing;
  routing.num_tokens = 8;
  routing.topk = 2;
  routing.experts = Tensor({8, 2}, DType::I32);
  routing.probs = Tensor({8, 2});
  const float first_probs[8] = {0.5f, 0.9f, 0.6f, 0.9f, 0.7f, 0.55f, 0.8f, 0.6f};
  for (int64_t t = 0; t < 8; ++t) {
    routing.experts.data<int32_t>()[t * 2] = 0;
    routing.experts.data<int32_t>()[t * 2 + 1] = int32_t(1 + t % 3);
    routing.probs.set(t * 2, first_probs[t]);
    routing.probs.set(t * 2 + 1, 1.0f - first_probs[t]);
  }
  return routing;
}

std::set<int64_t> kept_tokens_of_expert(const Routing& routing, const std::vector<uint8_t>& keep,
                                        int32_t expert) {
  std::set<int64_t> tokens;
  for (int64_t s = 0; s < routing.experts.numel(); ++s) {
    if (keep[size_t(s)] && routing.experts.data<int32_t>()[s] == expert) tokens.insert(s / 2);
  }
  return tokens;
}

TEST(Capacity, ProbsPolicyKeepsHighestWithLowerIndexWinningTies) {
  Routing routing = crowded_routing();
  auto keep = select_within_capacity(routing, 4, 3, TokenDropPolicy::kProbs);
  // Expert 0's probs: 0.9 (t1), 0.9 (t3), 0.8 (t6) are the top three.
  EXPECT_EQ(kept_tokens_of_expert(routing, keep, 0), (std::set<int64_t>{1, 3, 6}));
  // Capacity 2: 0.9 (t1) and 0.9 (t3) tie with nothing; capacity 4 adds 0.7 (t4).
  keep = select_within_capacity(routing, 4, 4, TokenDropPolicy::kProbs);
  EXPECT_EQ(kept_tokens_of_expert(routing, keep, 0), (std::set<int64_t>{1, 3, 4, 6}));
  // Capacity 5: 0.6 (t2) and 0.6 (t7) tie for the last place; the lower index wins.
  keep = select_within_capacity(routing, 4, 5, TokenDropPolicy::kProbs);
  EXPECT_EQ(kept_tokens_of_expert(routing, keep, 0), (std::set<int64_t>{1, 2, 3, 4, 6}));
  // Experts under capacity keep everything.
  EXPECT_EQ(kept_tokens_of_expert(routing, keep, 1), (std::set<int64_t>{0, 3, 6}));
}

TEST(Capacity, PositionPolicyKeepsEarliest) {
  Routing routing = crowded_routing();
  auto keep = select_within_capacity(routing, 4, 3, TokenDropPolicy::kPosition);
  EXPECT_EQ(kept_tokens_of_expert(routing, keep, 0), (std::set<int64_t>{0, 1, 2}));
}

TEST(Capacity, DispatcherRespectsCapacityAndPads) {
  MoEConfig config = testing::small_config(4, 4, 2, 3);
  config.moe_expert_capacity_factor = 0.75;  // capacity ceil(8 * 2 / 4 * 0.75) = 3
  Routing routing = crowded_routing();
  CapacityDecision decision = decide_capacity(config, routing);
  EXPECT_EQ(decision.pad_rows_to, 0);
  DispatchPlan plan = build_dispatch_plan(routing.experts, 4, 0, 4, decision.keep);
  for (int64_t rows : plan.rows_per_expert) EXPECT_LE(rows, 3);
  EXPECT_EQ(plan.rows_per_expert[0], 3);

  config.moe_pad_expert_input_to_capacity = true;
  decision = decide_capacity(config, routing);
  EXPECT_EQ(decision.pad_rows_to, 3);
  plan = build_dispatch_plan(routing.experts, 4, 0, 4, decision.keep, decision.pad_rows_to);
  EXPECT_EQ(plan.rows_per_expert, (std::vector<int64_t>{3, 3, 3, 3}));
  // The expert load to log counts tokens, not padding: expert 3 keeps tokens 2 and 5 only.
  EXPECT_EQ(unpadded_rows_per_expert(plan), (std::vector<int64_t>{3, 3, 3, 2}));
  LocalTokenDispatcher dispatcher(config);
  DispatchContext ctx;
  dispatcher.dispatch(testing::random_normal({8, 4}, 5), routing, ctx);
  EXPECT_EQ(ctx.tokens_per_local_expert, (std::vector<int64_t>{3, 3, 3, 3}));
  EXPECT_EQ(ctx.unpadded_tokens_per_local_expert, (std::vector<int64_t>{3, 3, 3, 2}));
  // Padding rows are zero and dropped slots have no row.
  Tensor hidden = testing::random_normal({8, 4}, 4);
  Tensor rows({plan.num_rows(), 4});
  permute_rows(hidden, plan, Tensor(), rows);
  for (int64_t r = 0; r < plan.num_rows(); ++r) {
    if (plan.slot_of_row[size_t(r)] >= 0) continue;
    for (int64_t h = 0; h < 4; ++h) EXPECT_EQ(rows.get(r * 4 + h), 0.0f);
  }
  int64_t dropped = std::count(plan.row_of_slot.begin(), plan.row_of_slot.end(), int64_t(-1));
  EXPECT_EQ(dropped, 16 - int64_t(std::count(decision.keep.begin(), decision.keep.end(), 1)));
}

// --moe-capacity-scope on a hand-worked group batch of two ranks, E = 2, top-1, factor 1.0:
//   rank 0, 4 tokens: experts {0, 0, 0, 1}, probs {0.6, 0.9, 0.7, 0.8}
//   rank 1, 2 tokens: experts {1, 1},       probs {0.55, 0.95}
// Megatron's rule (apply_router_token_dropping on each rank's own tokens): rank 0's capacity is
// ceil(4 * 1 / 2 * 1.0) = 2, so expert 0 (3 tokens) drops one: by probs token 0 (0.6), by
// position token 2; rank 1's capacity is ceil(2 / 2) = 1, so expert 1 drops by probs its token 0
// (0.55), by position its token 1. The group scope's capacity ceil(6 / 2) = 3 drops nothing.
TEST(Capacity, RankScopeDropsWhatMegatronsPerRankRuleDrops) {
  Routing group;
  group.num_tokens = 6;
  group.topk = 1;
  group.experts = Tensor({6, 1}, DType::I32);
  group.probs = Tensor({6, 1});
  const int32_t experts[6] = {0, 0, 0, 1, 1, 1};
  const float probs[6] = {0.6f, 0.9f, 0.7f, 0.8f, 0.55f, 0.95f};
  for (int64_t t = 0; t < 6; ++t) {
    group.experts.data<int32_t>()[t] = experts[t];
    group.probs.set(t, probs[t]);
  }
  const std::vector<int64_t> tokens_per_rank = {4, 2};
  MoEConfig config = testing::small_config(4, 2, 1, 3);
  config.moe_expert_capacity_factor = 1.0;
  CapacityDecision decision = decide_group_capacity(config, group, tokens_per_rank);
  EXPECT_EQ(decision.keep, (std::vector<uint8_t>{1, 1, 1, 1, 1, 1}));  // group scope: capacity 3

  config.moe_capacity_scope = CapacityScope::kRank;
  decision = decide_group_capacity(config, group, tokens_per_rank);
  EXPECT_EQ(decision.keep, (std::vector<uint8_t>{0, 1, 1, 1, 0, 1}));
  EXPECT_EQ(decision.pad_rows_to, 0);
  config.moe_token_drop_policy = TokenDropPolicy::kPosition;
  decision = decide_group_capacity(config, group, tokens_per_rank);
  EXPECT_EQ(decision.keep, (std::vector<uint8_t>{1, 1, 0, 1, 1, 0}));
  // Padding: each rank pads every expert to its own capacity, 2 + 1 rows per expert in all.
  config.moe_pad_expert_input_to_capacity = true;
  EXPECT_EQ(decide_group_capacity(config, group, tokens_per_rank).pad_rows_to, 3);
  // One rank holding the whole batch: the two scopes agree.
  EXPECT_EQ(decide_group_capacity(config, group, std::vector<int64_t>{6}).keep,
            decide_capacity(config, group).keep);
  testing::expect_error_containing(
      [&] {
        decide_group_capacity(config, group, std::vector<int64_t>{4, 1});
      },
      "decide_group_capacity: the ranks' token counts sum to 5 but the group's routing has 6 "
      "tokens");
}

TEST(Permutation, BadInputsNameTheProblem) {
  Tensor experts = Tensor::from_floats({0, 5}, {1, 2}).to(DType::I32);
  testing::expect_error_containing([&] { build_dispatch_plan(experts, 4, 0, 4); },
                                   "token 0 slot 1 names expert 5, outside [0, 4)");
  Routing routing = crowded_routing();
  std::vector<uint8_t> keep(16, 1);
  testing::expect_error_containing([&] { build_dispatch_plan(routing.experts, 4, 0, 4, keep, 2); },
                                   "expert 0 keeps 8 tokens, more than the padded size 2");
  DispatchPlan plan = build_dispatch_plan(routing.experts, 4, 0, 4);
  Tensor hidden({7, 3}), rows({plan.num_rows(), 3});
  EXPECT_THROW(permute_rows(hidden, plan, Tensor(), rows), Error);
}

}  // namespace
}  // namespace moe

// Megatron-Core's rank layout, checked without MPI against tables produced by Megatron's own
// RankGenerator (order "tp-cp-ep-dp-pp"; dense generator with ep = 1, expert generator with
// cp = 1) for 8 ranks.
#include <gtest/gtest.h>

#include <iostream>

#include "moe/comm/parallel_state.h"
#include "support/testing.h"

namespace moe::comm {
namespace {

using Groups = RankLayout::Groups;

struct ExpectedLayout {
  ParallelSizes sizes;
  int dp, edp;
  Groups tp, cp, pp, dp_group, dp_cp, model_parallel, embedding, ep, etp, tp_ep, expert_dp;
};

Groups singletons() {
  return {{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}};
}

void expect_layout(const ExpectedLayout& want) {
  const ParallelSizes& s = want.sizes;
  SCOPED_TRACE(::testing::Message() << "tp " << s.tp << " pp " << s.pp << " ep " << s.ep << " etp "
                                    << s.etp << " cp " << s.cp);
  std::cout << describe_rank_layout(8, s);
  RankLayout got = compute_rank_layout(8, s);
  EXPECT_EQ(got.dp, want.dp);
  EXPECT_EQ(got.edp, want.edp);
  EXPECT_EQ(got.tp, want.tp);
  EXPECT_EQ(got.cp_group, want.cp);
  EXPECT_EQ(got.pp, want.pp);
  EXPECT_EQ(got.dp_group, want.dp_group);
  EXPECT_EQ(got.dp_cp, want.dp_cp);
  EXPECT_EQ(got.model_parallel, want.model_parallel);
  EXPECT_EQ(got.embedding, want.embedding);
  EXPECT_EQ(got.ep_group, want.ep);
  EXPECT_EQ(got.etp_group, want.etp);
  EXPECT_EQ(got.tp_ep, want.tp_ep);
  EXPECT_EQ(got.expert_dp, want.expert_dp);
}

TEST(RankLayout, Tp2Pp2Ep2Etp1) {
  expect_layout({.sizes = {.tp = 2, .pp = 2, .ep = 2, .etp = 1},
                 .dp = 2,
                 .edp = 2,
                 .tp = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .cp = singletons(),
                 .pp = {{0, 4}, {1, 5}, {2, 6}, {3, 7}},
                 .dp_group = {{0, 2}, {1, 3}, {4, 6}, {5, 7}},
                 .dp_cp = {{0, 2}, {1, 3}, {4, 6}, {5, 7}},
                 .model_parallel = {{0, 1, 4, 5}, {2, 3, 6, 7}},
                 .embedding = {{0, 4}, {1, 5}, {2, 6}, {3, 7}},
                 .ep = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .etp = singletons(),
                 .tp_ep = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .expert_dp = {{0, 2}, {1, 3}, {4, 6}, {5, 7}}});
}

TEST(RankLayout, Ep8) {
  expect_layout({.sizes = {.tp = 1, .pp = 1, .ep = 8, .etp = 1},
                 .dp = 8,
                 .edp = 1,
                 .tp = singletons(),
                 .cp = singletons(),
                 .pp = singletons(),
                 .dp_group = {{0, 1, 2, 3, 4, 5, 6, 7}},
                 .dp_cp = {{0, 1, 2, 3, 4, 5, 6, 7}},
                 .model_parallel = singletons(),
                 .embedding = singletons(),
                 .ep = {{0, 1, 2, 3, 4, 5, 6, 7}},
                 .etp = singletons(),
                 .tp_ep = {{0, 1, 2, 3, 4, 5, 6, 7}},
                 .expert_dp = singletons()});
}

TEST(RankLayout, Tp2Ep4Etp2) {
  expect_layout({.sizes = {.tp = 2, .pp = 1, .ep = 4, .etp = 2},
                 .dp = 4,
                 .edp = 1,
                 .tp = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .cp = singletons(),
                 .pp = singletons(),
                 .dp_group = {{0, 2, 4, 6}, {1, 3, 5, 7}},
                 .dp_cp = {{0, 2, 4, 6}, {1, 3, 5, 7}},
                 .model_parallel = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .embedding = singletons(),
                 .ep = {{0, 2, 4, 6}, {1, 3, 5, 7}},
                 .etp = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .tp_ep = {{0, 1, 2, 3, 4, 5, 6, 7}},
                 .expert_dp = singletons()});
}

TEST(RankLayout, Pp2Ep2) {
  expect_layout({.sizes = {.tp = 1, .pp = 2, .ep = 2, .etp = 1},
                 .dp = 4,
                 .edp = 2,
                 .tp = singletons(),
                 .cp = singletons(),
                 .pp = {{0, 4}, {1, 5}, {2, 6}, {3, 7}},
                 .dp_group = {{0, 1, 2, 3}, {4, 5, 6, 7}},
                 .dp_cp = {{0, 1, 2, 3}, {4, 5, 6, 7}},
                 .model_parallel = {{0, 4}, {1, 5}, {2, 6}, {3, 7}},
                 .embedding = {{0, 4}, {1, 5}, {2, 6}, {3, 7}},
                 .ep = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .etp = singletons(),
                 .tp_ep = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .expert_dp = {{0, 2}, {1, 3}, {4, 6}, {5, 7}}});
}

TEST(RankLayout, Tp2Cp2Ep2) {
  expect_layout({.sizes = {.tp = 2, .pp = 1, .ep = 2, .etp = 1, .cp = 2},
                 .dp = 2,
                 .edp = 4,
                 .tp = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .cp = {{0, 2}, {1, 3}, {4, 6}, {5, 7}},
                 .pp = singletons(),
                 .dp_group = {{0, 4}, {1, 5}, {2, 6}, {3, 7}},
                 .dp_cp = {{0, 2, 4, 6}, {1, 3, 5, 7}},
                 .model_parallel = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .embedding = singletons(),
                 .ep = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .etp = singletons(),
                 .tp_ep = {{0, 1}, {2, 3}, {4, 5}, {6, 7}},
                 .expert_dp = {{0, 2, 4, 6}, {1, 3, 5, 7}}});
}

TEST(RankLayout, EmbeddingTakesFirstAndLastOfFourStages) {
  RankLayout got = compute_rank_layout(8, {.pp = 4});
  EXPECT_EQ(got.pp, (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}}));
  EXPECT_EQ(got.embedding, (Groups{{0, 6}, {1, 7}}));
}

// Megatron's tensor-and-data-parallel group with context: every rank of one pipeline stage.
TEST(RankLayout, TpDpCpHoldsEachPipelineStage) {
  RankLayout got = compute_rank_layout(8, {.tp = 2, .pp = 2, .ep = 2});
  EXPECT_EQ(got.tp_dp_cp, (Groups{{0, 1, 2, 3}, {4, 5, 6, 7}}));
  got = compute_rank_layout(8, {.tp = 2, .pp = 4});
  EXPECT_EQ(got.tp_dp_cp, (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}}));
  got = compute_rank_layout(8, {.tp = 2, .cp = 2});
  EXPECT_EQ(got.tp_dp_cp, (Groups{{0, 1, 2, 3, 4, 5, 6, 7}}));
}

// Megatron's tensor-and-context-parallel group (the router's tp_cp_group): tp fastest, then cp.
TEST(RankLayout, TpCpJoinsTensorAndContextRanks) {
  RankLayout got = compute_rank_layout(8, {.tp = 2, .cp = 2});
  EXPECT_EQ(got.tp_cp, (Groups{{0, 1, 2, 3}, {4, 5, 6, 7}}));
  got = compute_rank_layout(8, {.cp = 2});
  EXPECT_EQ(got.tp_cp, (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}}));
  EXPECT_EQ(got.tp_cp, got.cp_group);
}

// Megatron's get_batch_on_this_cp_rank: 2 * cp chunks, rank r holds chunks r and 2 * cp - 1 - r.
TEST(ContextParallel, GlobalPositionsAreTheLoadBalancedChunks) {
  EXPECT_EQ(ContextParallel{}.global_positions(5), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  // cp = 1 without MPI: the self group; the layout of other ranks is checked in the MPI tests.
}

TEST(RankLayout, DescribePrintsEveryKind) {
  std::string text = describe_rank_layout(8, {.tp = 2, .pp = 2, .ep = 2});
  EXPECT_CONTAINS(text, "tp: [0, 1] [2, 3] [4, 5] [6, 7]\n");
  EXPECT_CONTAINS(text, "model_parallel: [0, 1, 4, 5] [2, 3, 6, 7]\n");
  EXPECT_CONTAINS(text, "expert_dp: [0, 2] [1, 3] [4, 6] [5, 7]\n");
}

std::string layout_error(int world_size, const ParallelSizes& sizes) {
  return moe::testing::error_text([&] { compute_rank_layout(world_size, sizes); });
}

TEST(RankLayout, SizesThatDoNotFactorNameTheSizes) {
  EXPECT_CONTAINS(layout_error(6, {.tp = 4}),
                  "world_size (6) is not divisible by tp (4) x pp (1) x cp (1) = 4");
  EXPECT_CONTAINS(layout_error(8, {.tp = 1, .pp = 3}),
                  "world_size (8) is not divisible by tp (1) x pp (3) x cp (1)");
  EXPECT_CONTAINS(layout_error(6, {.tp = 2, .ep = 4}),
                  "world_size (6) is not divisible by etp (1) x ep (4) x pp (1) = 4");
  EXPECT_CONTAINS(layout_error(8, {.ep = 0}), "parallel size ep must be >= 1, got 0");
  EXPECT_THROW(describe_rank_layout(6, {.tp = 4}), Error);
}

}  // namespace
}  // namespace moe::comm

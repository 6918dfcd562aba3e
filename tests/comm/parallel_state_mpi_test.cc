// initialize_model_parallel on real ranks: every group of every kind holds exactly the ranks of
// Megatron's layout (compute_rank_layout, itself checked against Megatron's tables in
// rank_layout_test.cc), in that order, and its communicator really connects them.
#include <gtest/gtest.h>

#include <algorithm>

#include "moe/comm/parallel_state.h"
#include "support/testing.h"

namespace moe::comm {
namespace {

const std::vector<int>& group_of(const RankLayout::Groups& groups, int world_rank) {
  for (const std::vector<int>& group : groups) {
    if (std::find(group.begin(), group.end(), world_rank) != group.end()) return group;
  }
  static const std::vector<int> none;
  return none;
}

void expect_group(const ProcessGroup& group, const RankLayout::Groups& layout, int world_rank,
                  const char* name) {
  SCOPED_TRACE(name);
  std::vector<int> expected = group_of(layout, world_rank);
  if (expected.empty()) expected = {world_rank};  // a middle pipeline stage's embedding group
  EXPECT_EQ(group.name(), name);
  EXPECT_EQ(group.world_ranks(), expected);
  EXPECT_EQ(group.size(), int(expected.size()));
  EXPECT_EQ(expected[size_t(group.rank())], world_rank);
  // The communicator connects exactly these ranks, in this order.
  std::vector<int64_t> gathered = all_gather_values(std::vector<int64_t>{world_rank}, group);
  EXPECT_EQ(gathered, std::vector<int64_t>(expected.begin(), expected.end()));
}

class InitializeModelParallel : public ::testing::TestWithParam<ParallelSizes> {};

TEST_P(InitializeModelParallel, GroupsMatchMegatronLayout) {
  const ParallelSizes sizes = GetParam();
  const int world_size = ProcessGroup::world().size();
  const int world_rank = ProcessGroup::world().rank();
  if (world_size % (sizes.tp * sizes.pp * sizes.cp) != 0 ||
      world_size % (sizes.etp * sizes.ep * sizes.pp) != 0) {
    // Every rank gets the error that names the sizes.
    EXPECT_CONTAINS(moe::testing::error_text([&] { initialize_model_parallel(sizes); }),
                    "world_size (" + std::to_string(world_size) + ") is not divisible by");
    return;
  }
  ParallelState state = initialize_model_parallel(sizes);
  const RankLayout layout = compute_rank_layout(world_size, sizes);
  EXPECT_EQ(state.world_size, world_size);
  EXPECT_EQ(state.world_rank, world_rank);
  EXPECT_EQ(state.dp, layout.dp);
  EXPECT_EQ(state.edp, layout.edp);
  expect_group(state.tp_group, layout.tp, world_rank, "tp");
  expect_group(state.cp_group, layout.cp_group, world_rank, "cp");
  expect_group(state.dp_group, layout.dp_group, world_rank, "dp");
  expect_group(state.dp_cp_group, layout.dp_cp, world_rank, "dp_cp");
  expect_group(state.tp_cp_group, layout.tp_cp, world_rank, "tp_cp");
  expect_group(state.pp_group, layout.pp, world_rank, "pp");
  expect_group(state.model_parallel_group, layout.model_parallel, world_rank, "model_parallel");
  expect_group(state.embedding_group, layout.embedding, world_rank, "embedding");
  expect_group(state.ep_group, layout.ep_group, world_rank, "ep");
  expect_group(state.etp_group, layout.etp_group, world_rank, "etp");
  expect_group(state.tp_ep_group, layout.tp_ep, world_rank, "tp_ep");
  expect_group(state.expert_dp_group, layout.expert_dp, world_rank, "expert_dp");
  EXPECT_EQ(state.in_embedding_group, !group_of(layout.embedding, world_rank).empty());
  EXPECT_EQ(state.is_pipeline_first(), state.pp_group.rank() == 0);
}

INSTANTIATE_TEST_SUITE_P(MegatronLayouts, InitializeModelParallel,
                         ::testing::Values(ParallelSizes{.tp = 2, .pp = 2, .ep = 2, .etp = 1},
                                           ParallelSizes{.tp = 1, .pp = 1, .ep = 8, .etp = 1},
                                           ParallelSizes{.tp = 2, .pp = 1, .ep = 4, .etp = 2},
                                           ParallelSizes{.tp = 1, .pp = 2, .ep = 2, .etp = 1},
                                           ParallelSizes{
                                               .tp = 2, .pp = 1, .ep = 2, .etp = 1, .cp = 2},
                                           ParallelSizes{.tp = 1, .pp = 4, .ep = 1, .etp = 1},
                                           ParallelSizes{.tp = 3, .pp = 1, .ep = 1, .etp = 1}),
                         [](const auto& info) {
                           const ParallelSizes& s = info.param;
                           return "tp" + std::to_string(s.tp) + "pp" + std::to_string(s.pp) + "ep" +
                                  std::to_string(s.ep) + "etp" + std::to_string(s.etp) + "cp" +
                                  std::to_string(s.cp);
                         });

}  // namespace
}  // namespace moe::comm

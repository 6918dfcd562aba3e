// The self group (a default ProcessGroup) and single_process_state work in a plain process: no
// mpirun, no MPI_Init. Collectives are copies, and the same boundary checks apply.
#include <gtest/gtest.h>

#include <string>

#include "moe/comm/parallel_state.h"
#include "support/testing.h"

namespace moe::comm {
namespace {

using moe::testing::error_text;

class SelfGroup : public ::testing::TestWithParam<DType> {};

TEST_P(SelfGroup, CollectivesAreCopies) {
  const DType dtype = GetParam();
  ProcessGroup self;
  EXPECT_EQ(self.rank(), 0);
  EXPECT_EQ(self.size(), 1);
  EXPECT_EQ(self.name(), "self");
  Tensor input = moe::testing::random_uniform({5, 3}, 7, -50, 50, DType::F32).to(dtype);

  Tensor reduced = input.clone();
  all_reduce(reduced, self);
  EXPECT_EQ(reduced.to_floats(), input.to_floats());
  all_reduce(reduced, self, ReduceOp::kMax);
  EXPECT_EQ(reduced.to_floats(), input.to_floats());

  Tensor gathered({5, 3}, dtype);
  all_gather(input, gathered, self);
  EXPECT_EQ(gathered.to_floats(), input.to_floats());
  gathered.zero();
  const int64_t rows[] = {5};
  all_gather_v(input, gathered, rows, self);
  EXPECT_EQ(gathered.to_floats(), input.to_floats());

  Tensor scattered({5, 3}, dtype);
  reduce_scatter(input, scattered, self);
  EXPECT_EQ(scattered.to_floats(), input.to_floats());
  scattered.zero();
  reduce_scatter_v(input, scattered, rows, self);
  EXPECT_EQ(scattered.to_floats(), input.to_floats());

  Tensor exchanged({5, 3}, dtype);
  all_to_all_v(input, rows, exchanged, rows, self);
  EXPECT_EQ(exchanged.to_floats(), input.to_floats());

  Tensor broadcasted = input.clone();
  broadcast(broadcasted, 0, self);
  EXPECT_EQ(broadcasted.to_floats(), input.to_floats());
  barrier(self);

  int initialized = 1;
  MPI_Initialized(&initialized);
  EXPECT_EQ(initialized, 0) << "the self group must not need MPI";
}

INSTANTIATE_TEST_SUITE_P(AllDtypes, SelfGroup,
                         ::testing::Values(DType::F32, DType::BF16, DType::F16, DType::F64,
                                           DType::I32, DType::I64),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(SelfGroupErrors, BadArgumentsNameCollectiveGroupAndSizes) {
  ProcessGroup self;
  Tensor input({4, 3});
  Tensor wrong({5, 3});
  EXPECT_EQ(error_text([&] { all_gather(input, wrong, self); }),
            "all_gather on group 'self' (rank 0 of 1, world rank 0): all_gather out: expected "
            "shape [4, 3], got [5, 3]");
  const int64_t four[] = {4}, three[] = {3};
  Tensor three_rows({3, 3});
  EXPECT_EQ(error_text([&] { all_to_all_v(input, four, three_rows, three, self); }),
            "all_to_all_v on group 'self' (rank 0 of 1, world rank 0): row counts disagree: rank "
            "0 (world rank 0) sends 4 rows to rank 0, which expects 3 rows from rank 0");
  const int64_t two_entries[] = {2, 2};
  EXPECT_NE(error_text([&] {
              all_gather_v(input, input, two_entries, self);
            }).find("rows_per_rank must have one entry per rank (1), got [2, 2]"),
            std::string::npos);
  Tensor bf16_out({4, 3}, DType::BF16);
  EXPECT_NE(error_text([&] { reduce_scatter(input, bf16_out, self); }).find("reduce_scatter out"),
            std::string::npos);
  EXPECT_NE(error_text([&] { send(input, 0, 1, self); })
                .find("send on group 'self' (rank 0 of 1, world rank 0): peer 0 must be another "
                      "rank of the group (size 1, this rank 0)"),
            std::string::npos);
  EXPECT_NE(error_text([&] {
              broadcast(input, 1, self);
            }).find("root 1 is not a rank of the group (size 1)"),
            std::string::npos);
}

TEST(SelfGroupErrors, ZeroRowsAreFine) {
  ProcessGroup self;
  Tensor empty({0, 8}, DType::BF16);
  Tensor out({0, 8}, DType::BF16);
  const int64_t zero[] = {0};
  all_to_all_v(empty, zero, out, zero, self);
  all_gather_v(empty, out, zero, self);
  all_reduce(empty, self);
  reduce_scatter_v(empty, out, zero, self);
  reduce_scatter(empty, out, self);
  EXPECT_EQ(out.numel(), 0);
}

TEST(SingleProcessState, EveryGroupIsTheSelfGroup) {
  ParallelState state = single_process_state();
  EXPECT_EQ(state.world_size, 1);
  EXPECT_EQ(state.dp, 1);
  EXPECT_TRUE(state.is_pipeline_first());
  EXPECT_TRUE(state.is_pipeline_last());
  EXPECT_EQ(state.tp_ep_group.name(), "tp_ep");
  EXPECT_EQ(state.expert_dp_group.size(), 1);
  Tensor values = Tensor::full({3}, 2.5f);
  all_reduce(values, state.dp_group);
  EXPECT_EQ(values.to_floats(), (std::vector<float>{2.5f, 2.5f, 2.5f}));
  std::vector<int64_t> gathered = all_gather_values(std::vector<int64_t>{4, 9}, state.ep_group);
  EXPECT_EQ(gathered, (std::vector<int64_t>{4, 9}));
}

TEST(CollectiveTimeout, SettingIsCheckedAndKept) {
  double before = collective_timeout();
  set_collective_timeout(2.5);
  EXPECT_EQ(collective_timeout(), 2.5);
  EXPECT_NE(error_text([] { set_collective_timeout(-1); }).find("must be >= 0 seconds"),
            std::string::npos);
  set_collective_timeout(before);
}

}  // namespace
}  // namespace moe::comm

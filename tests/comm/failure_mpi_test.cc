// Disagreements and stuck peers: every participating rank gets a moe::Error naming the
// collective, the group, the peer and the sizes, within the timeout, instead of a hang or
// silently mixed data. Disagreements leave the group usable; a timeout makes it unusable.
#include <gtest/gtest.h>

#include <chrono>

#include "comm/exchange.h"
#include "moe/comm/process_group.h"
#include "support/testing.h"

namespace moe::comm {
namespace {

using moe::testing::error_text;

std::string where(const char* collective, const char* group_name, const ProcessGroup& group) {
  return moe::detail::concat(collective, " on group '", group_name, "' (rank ", group.rank(),
                             " of ", group.size(), ", world rank ",
                             group.world_ranks()[size_t(group.rank())], "): ");
}

class Failures : public ::testing::Test {
 protected:
  ProcessGroup world = ProcessGroup::world();
  int rank = world.rank();
  int size = world.size();
  int last = size - 1;
};

TEST_F(Failures, MismatchedAllToAllVCountsFailOnEveryRankThenTheGroupStillWorks) {
  std::vector<int64_t> send_rows(size_t(size), 1), recv_rows(size_t(size), 1);
  if (rank == 1) recv_rows[0] = 2;  // rank 0 sends 1 row to rank 1
  Tensor send({size, 4});
  Tensor recv({rank == 1 ? size + 1 : size, 4});
  std::string text = error_text([&] { all_to_all_v(send, send_rows, recv, recv_rows, world); });
  EXPECT_EQ(text, where("all_to_all_v", "world", world) +
                      "row counts disagree: rank 0 (world rank 0) sends 1 rows to rank 1, which "
                      "expects 2 rows from rank 0");
  // Nothing moved and nothing is pending: the next exchange works.
  Tensor good({size, 4});
  for (int64_t i = 0; i < send.numel(); ++i) send.set(i, float(rank));
  std::vector<int64_t> ones(size_t(size), 1);
  all_to_all_v(send, ones, good, ones, world);
  for (int peer = 0; peer < size; ++peer) EXPECT_EQ(good.get(peer * 4), float(peer));
}

TEST_F(Failures, DifferentCollectivesFailOnEveryRank) {
  Tensor values({4});
  std::string text = error_text([&] {
    if (rank == 0) {
      barrier(world);
    } else {
      all_reduce(values, world);
    }
  });
  EXPECT_CONTAINS(
      text, std::string("ranks called different collectives or sizes: rank 0: barrier; ") +
                (size == 2 ? "rank 1: " : "ranks 1-3: ") + "all_reduce of 4 fp32 elements (sum)");
  EXPECT_CONTAINS(
      text, rank == 0 ? where("barrier", "world", world) : where("all_reduce", "world", world));
}

TEST_F(Failures, DifferentSizesFailOnEveryRank) {
  Tensor values({rank == last ? 5 : 4}, DType::BF16);
  std::string text = error_text([&] { all_reduce(values, world, ReduceOp::kMax); });
  EXPECT_CONTAINS(text, where("all_reduce", "world", world));
  EXPECT_CONTAINS(text,
                  moe::detail::concat("rank ", last, ": all_reduce of 5 bf16 elements (max)"));
  EXPECT_CONTAINS(text, std::string(size == 2 ? "rank 0" : "ranks 0-2") +
                            ": all_reduce of 4 bf16 elements (max); ");

  Tensor local({2, rank == last ? 3 : 4});
  Tensor out({2 * size, rank == last ? 3 : 4});
  text = error_text([&] { all_gather(local, out, world); });
  EXPECT_CONTAINS(text, moe::detail::concat("rank ", last, ": all_gather of 2 rows x 3 fp32"));
}

TEST_F(Failures, InvalidArgumentsOnOneRankFailEveryRank) {
  std::vector<int64_t> rows(size_t(rank == 1 ? size + 1 : size), 1);
  Tensor local({1, 2});
  Tensor out({int64_t(rows.size()), 2});
  std::string text = error_text([&] { all_gather_v(local, out, rows, world); });
  if (rank == 1) {
    EXPECT_CONTAINS(
        text, where("all_gather_v", "world", world) + "rows_per_rank must have one entry per rank");
  } else {
    EXPECT_EQ(text, where("all_gather_v", "world", world) +
                        "rank 1 (world rank 1) passed invalid arguments (its own error names "
                        "them); this rank's call: all_gather_v of 1 rows x 2 fp32, "
                        "rows_per_rank " +
                        (size == 2 ? "[1, 1]" : "[1, 1, 1, 1]"));
  }
}

TEST_F(Failures, DisagreeingRowListsFailOnEveryRank) {
  std::vector<int64_t> rows(size_t(size), 1);
  if (rank != 0) rows[1] = 2;  // rank 0 thinks rank 1 has one row, the others two
  Tensor local({rows[size_t(rank)], 2});
  Tensor out({int64_t(size) + (rank != 0 ? 1 : 0), 2});
  std::string text = error_text([&] { all_gather_v(local, out, rows, world); });
  EXPECT_CONTAINS(text, "ranks pass different rows_per_rank: rank 0 passes [1, 1");
  EXPECT_CONTAINS(text, "rank 1 (world rank 1) passes [1, 2");
}

TEST_F(Failures, InconsistentSubgroupListsFailOnEveryRank) {
  // Rank 0 claims {0, 1}, rank 1 claims {1}: every rank sees the disagreement.
  std::vector<int> claimed = rank == 0 ? std::vector<int>{0, 1} : std::vector<int>{rank};
  EXPECT_EQ(error_text([&] { ProcessGroup::from_ranks(world, claimed, "bad"); }),
            where("from_ranks", "world", world) +
                "group 'bad': ranks disagree on its members: world rank 0 passes [0, 1], world "
                "rank 1 passes [1]");
  // Rank 1 leaves itself out.
  std::vector<int> without_self = rank == 1 ? std::vector<int>{0} : std::vector<int>{rank};
  EXPECT_EQ(error_text([&] { ProcessGroup::from_ranks(world, without_self, "bad"); }),
            where("from_ranks", "world", world) +
                "group 'bad': world rank 1 passes [0], which is not a list of distinct ranks of "
                "group 'world' including itself");
}

TEST_F(Failures, SkippedCollectiveTimesOutOnEveryWaitingRank) {
  std::vector<int> everyone;
  for (int r = 0; r < size; ++r) everyone.push_back(r);
  ProcessGroup victim = ProcessGroup::from_ranks(world, everyone, "victim");
  const double before = collective_timeout();
  set_collective_timeout(2);
  if (rank != last) {  // the last rank never joins
    Tensor values({4});
    auto start = std::chrono::steady_clock::now();
    std::string text = error_text([&] { all_reduce(values, victim); });
    double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(text, where("all_reduce", "victim", victim) +
                        moe::detail::concat("timed out after 2 s waiting for rank ", last,
                                            " (world rank ", last,
                                            ") to join (this rank's call: all_reduce of 4 fp32 "
                                            "elements (sum))"));
    // Not before the timeout. No upper bound: how much later the error comes depends on the
    // machine's load, and the ctest timeout catches a hang.
    EXPECT_GE(waited, 2.0);
    EXPECT_TRUE(communication_failed());
    EXPECT_CONTAINS(error_text([&] { barrier(victim); }),
                    "group 'victim' is unusable after an earlier failure: all_reduce on group "
                    "'victim'");
  }
  set_collective_timeout(before);
  barrier(world);  // other groups are unaffected
}

TEST_F(Failures, MissingSendTimesOutTheReceiver) {
  ProcessGroup pair = ProcessGroup::from_ranks(
      world, rank < 2 ? std::vector<int>{0, 1} : std::vector<int>{rank}, "pair");
  const double before = collective_timeout();
  set_collective_timeout(1);
  if (rank == 0) {
    Tensor incoming({2, 3});
    std::string text = error_text([&] { recv(incoming, 1, 4, pair); });
    EXPECT_EQ(text, where("recv", "pair", pair) +
                        "timed out after 1 s in the data exchange: no data from rank 1 (world "
                        "rank 1) (expects 16 header values) (this rank's call: recv of [2, 3] "
                        "fp32 from rank 1 with tag 4)");
  }
  set_collective_timeout(before);
  barrier(world);
}

TEST_F(Failures, MpiErrorsBecomeErrorsNamingCollectiveGroupAndRank) {
  std::vector<int> everyone;
  for (int r = 0; r < size; ++r) everyone.push_back(r);
  ProcessGroup group = ProcessGroup::from_ranks(world, everyone, "errors");
  // What a failing MPI call (here a truncated receive) turns into.
  std::string text = error_text(
      [&] { detail::Call("all_gather", group).check_mpi(MPI_ERR_TRUNCATE, "MPI_Irecv"); });
  EXPECT_CONTAINS(text,
                  where("all_gather", "errors", group) + "MPI_Irecv failed: MPI_ERR_TRUNCATE");
  EXPECT_CONTAINS(error_text([&] { barrier(group); }),
                  "group 'errors' is unusable after an earlier failure: all_gather on group "
                  "'errors'");
}

TEST_F(Failures, UntakenLargeSendTimesOutTheSender) {
  // The header goes through, but a message beyond MPI's eager limit waits for a receive that
  // never comes: the data exchange itself times out.
  ProcessGroup pair = ProcessGroup::from_ranks(
      world, rank < 2 ? std::vector<int>{0, 1} : std::vector<int>{rank}, "untaken");
  const double before = collective_timeout();
  set_collective_timeout(1);
  if (rank == 0) {
    Tensor outgoing({1000, 100});
    EXPECT_EQ(error_text([&] { send(outgoing, 1, 4, pair); }),
              where("send", "untaken", pair) +
                  "timed out after 1 s in the data exchange: rank 1 (world rank 1) has not taken "
                  "its 400000 bytes (this rank's call: send of [1000, 100] fp32 to rank 1 with "
                  "tag 4)");
  }
  set_collective_timeout(before);
  barrier(world);
}

TEST_F(Failures, SendRecvShapeMismatchFailsTheReceiverAndKeepsTheChannel) {
  if (rank > 1) return;
  Tensor sent({2, 3}, DType::F32);
  Tensor wrong({3, 2}, DType::F32);
  if (rank == 0) {
    send(sent, 1, 7, world);
    sent.fill(5.0f);
    send(sent, 1, 7, world);
  } else {
    EXPECT_EQ(error_text([&] { recv(wrong, 0, 7, world); }),
              where("recv", "world", world) +
                  "rank 0 (world rank 0) sends [2, 3] fp32 with tag 7, but this rank expects "
                  "[3, 2] fp32");
    Tensor right({2, 3});
    recv(right, 0, 7, world);
    EXPECT_EQ(right.get(5), 5.0f);
  }
}

}  // namespace
}  // namespace moe::comm

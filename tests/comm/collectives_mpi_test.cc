// Every collective on 2, 4 and 8 real ranks, for fp32, bf16, fp16, fp64, int32 and int64, checked
// by arithmetic on rank-tagged values: each element encodes the rank it came from, its row and
// its column, so a row in the wrong place or a sum in the wrong order shows up as a wrong value.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "moe/comm/process_group.h"
#include "support/testing.h"

namespace moe::comm {
namespace {

constexpr int64_t kCols = 3;

// The value element (row, col) of rank `rank`'s tensor holds. Integers that fp16 stores exactly
// and that stay unique over ranks, rows and columns in these small tests.
float tag(int rank, int64_t row, int64_t col) {
  return float(rank * 100 + row * 4 + col);
}

// A tag as the dtype stores it (bf16 rounds the larger tags).
float stored_tag(DType dtype, int rank, int64_t row, int64_t col) {
  return Tensor::from_floats({tag(rank, row, col)}, {1}, dtype).get(0);
}

// A [rows, kCols] tensor of tags; `first_row` offsets the row numbers.
Tensor tagged(DType dtype, int rank, int64_t rows, int64_t first_row = 0) {
  std::vector<float> values;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < kCols; ++c) values.push_back(tag(rank, first_row + r, c));
  }
  return Tensor::from_floats(values, {rows, kCols}, dtype);
}

class Collectives : public ::testing::TestWithParam<DType> {
 protected:
  ProcessGroup world = ProcessGroup::world();
  int rank = world.rank();
  int size = world.size();
  DType dtype = GetParam();
};

TEST_P(Collectives, AllReduceSumAndMaxInRankOrder) {
  for (int64_t rows : {0, 1, 2, 5, 43}) {  // fewer elements than ranks leaves some chunks empty
    SCOPED_TRACE(rows);
    Tensor sum = tagged(dtype, rank, rows);
    Tensor max = tagged(dtype, rank, rows);
    for (int64_t i = 0; i < max.numel(); ++i) max.set(i, max.get(i) * (rank % 2 ? -1.0f : 1.0f));
    all_reduce(sum, world);
    all_reduce(max, world, ReduceOp::kMax);
    std::vector<float> expected_sum(size_t(rows * kCols), 0.0f), expected_max(expected_sum.size());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < kCols; ++c) {
        float total = 0, best = -1e30f;
        for (int source = 0; source < size; ++source) {
          total += stored_tag(dtype, source, r, c);
          best = std::max(best, stored_tag(dtype, source, r, c) * (source % 2 ? -1.0f : 1.0f));
        }
        expected_sum[size_t(r * kCols + c)] = total;
        expected_max[size_t(r * kCols + c)] = best;
      }
    }
    // The exact sum rounded once to the dtype (fp32 accumulation for bf16/fp16).
    EXPECT_TRUE(
        moe::testing::same_bytes(sum, Tensor::from_floats(expected_sum, {rows, kCols}, dtype)));
    EXPECT_TRUE(
        moe::testing::same_bytes(max, Tensor::from_floats(expected_max, {rows, kCols}, dtype)));
  }
}

TEST_P(Collectives, AllGatherPutsRowsInRankOrder) {
  Tensor local = tagged(dtype, rank, 2);
  Tensor out({2 * size, kCols}, dtype);
  all_gather(local, out, world);
  for (int source = 0; source < size; ++source) {
    EXPECT_TRUE(
        moe::testing::same_bytes(out.rows(2 * source, 2 * source + 2), tagged(dtype, source, 2)));
  }
}

TEST_P(Collectives, AllGatherVWithZeroRowRanks) {
  std::vector<int64_t> rows_per_rank(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) rows_per_rank[size_t(r)] = (r * 2) % 3;  // rank 0: no rows
  Tensor local = tagged(dtype, rank, rows_per_rank[size_t(rank)]);
  Tensor out({std::accumulate(rows_per_rank.begin(), rows_per_rank.end(), int64_t(0)), kCols},
             dtype);
  all_gather_v(local, out, rows_per_rank, world);
  int64_t offset = 0;
  for (int source = 0; source < size; ++source) {
    const int64_t n = rows_per_rank[size_t(source)];
    EXPECT_TRUE(moe::testing::same_bytes(out.rows(offset, offset + n), tagged(dtype, source, n)));
    offset += n;
  }
}

// Rank r gets rows [first, first + n) of the rank-ordered sum over every rank's `in`.
Tensor expected_reduction(DType dtype, int size, int64_t first, int64_t n) {
  std::vector<float> values;
  for (int64_t r = first; r < first + n; ++r) {
    for (int64_t c = 0; c < kCols; ++c) {
      float total = 0;
      for (int source = 0; source < size; ++source) total += stored_tag(dtype, source, r, c);
      values.push_back(total);
    }
  }
  return Tensor::from_floats(values, {n, kCols}, dtype);
}

TEST_P(Collectives, ReduceScatterEqualAndUneven) {
  Tensor in = tagged(dtype, rank, 2 * size);
  Tensor out({2, kCols}, dtype);
  reduce_scatter(in, out, world);
  EXPECT_TRUE(moe::testing::same_bytes(out, expected_reduction(dtype, size, 2 * rank, 2)));

  std::vector<int64_t> rows_per_rank(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) rows_per_rank[size_t(r)] = r % 3;  // rank 0 and 3: no rows
  std::vector<int64_t> offsets(size_t(size) + 1, 0);
  std::partial_sum(rows_per_rank.begin(), rows_per_rank.end(), offsets.begin() + 1);
  Tensor uneven_in = tagged(dtype, rank, offsets.back());
  Tensor uneven_out({rows_per_rank[size_t(rank)], kCols}, dtype);
  reduce_scatter_v(uneven_in, uneven_out, rows_per_rank, world);
  EXPECT_TRUE(moe::testing::same_bytes(
      uneven_out,
      expected_reduction(dtype, size, offsets[size_t(rank)], rows_per_rank[size_t(rank)])));
}

TEST_P(Collectives, InPlaceAllGatherAndReduceScatterOnOwnShard) {
  // As a distributed optimizer does: the local input is this rank's shard of the output buffer.
  Tensor buffer({2 * size, kCols}, dtype);
  Tensor shard = buffer.rows(2 * rank, 2 * rank + 2);
  shard.copy_from(tagged(dtype, rank, 2));
  all_gather(shard, buffer, world);
  for (int source = 0; source < size; ++source) {
    EXPECT_TRUE(moe::testing::same_bytes(buffer.rows(2 * source, 2 * source + 2),
                                         tagged(dtype, source, 2)));
  }
  Tensor gradients = tagged(dtype, rank, 2 * size);
  Tensor own = gradients.rows(2 * rank, 2 * rank + 2);
  reduce_scatter(gradients, own, world);
  EXPECT_TRUE(moe::testing::same_bytes(own, expected_reduction(dtype, size, 2 * rank, 2)));
}

TEST_P(Collectives, AllToAllVDeliversEveryRowToItsDestination) {
  // Rank s sends (s + d) % 3 rows to rank d, rows tagged with source s and row 10 * d + k.
  auto count = [](int source, int destination) { return int64_t((source + destination) % 3); };
  std::vector<int64_t> send_rows(static_cast<size_t>(size)), recv_rows(static_cast<size_t>(size));
  std::vector<Tensor> pieces;
  for (int peer = 0; peer < size; ++peer) {
    send_rows[size_t(peer)] = count(rank, peer);
    recv_rows[size_t(peer)] = count(peer, rank);
  }
  const int64_t total_send = std::accumulate(send_rows.begin(), send_rows.end(), int64_t(0));
  const int64_t total_recv = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t(0));
  Tensor send({total_send, kCols}, dtype);
  int64_t offset = 0;
  for (int peer = 0; peer < size; ++peer) {
    const int64_t n = send_rows[size_t(peer)];
    send.rows(offset, offset + n).copy_from(tagged(dtype, rank, n, 10 * peer));
    offset += n;
  }
  Tensor recv({total_recv, kCols}, dtype);
  all_to_all_v(send, send_rows, recv, recv_rows, world);
  offset = 0;
  for (int peer = 0; peer < size; ++peer) {
    const int64_t n = recv_rows[size_t(peer)];
    EXPECT_TRUE(
        moe::testing::same_bytes(recv.rows(offset, offset + n), tagged(dtype, peer, n, 10 * rank)))
        << "rows from rank " << peer;
    offset += n;
  }
}

TEST_P(Collectives, BroadcastFromEveryRoot) {
  for (int root = 0; root < size; ++root) {
    Tensor tensor = rank == root ? tagged(dtype, root, 4) : Tensor({4, kCols}, dtype);
    broadcast(tensor, root, world);
    EXPECT_TRUE(moe::testing::same_bytes(tensor, tagged(dtype, root, 4))) << "root " << root;
  }
}

TEST_P(Collectives, LargeBroadcastGoesAsSlicesAndArrivesWhole) {
  // 1 MiB and more to more than 2 ranks is scattered and re-gathered; odd sizes leave uneven
  // slices.
  const int64_t rows = (int64_t(1) << 20) / (kCols * int64_t(dtype_size(dtype))) + 7;
  const int root = size - 1;
  Tensor tensor = rank == root ? tagged(dtype, root, rows) : Tensor({rows, kCols}, dtype);
  broadcast(tensor, root, world);
  EXPECT_TRUE(moe::testing::same_bytes(tensor, tagged(dtype, root, rows)));
}

TEST_P(Collectives, SendRecvAroundTheRing) {
  const int next = (rank + 1) % size, previous = (rank + size - 1) % size;
  Tensor outgoing = tagged(dtype, rank, 3);
  Tensor incoming({3, kCols}, dtype);
  // Even ranks send first, odd ranks receive first: a send may wait until its peer receives.
  if (rank % 2 == 0) {
    send(outgoing, next, 5, world);
    recv(incoming, previous, 5, world);
  } else {
    recv(incoming, previous, 5, world);
    send(outgoing, next, 5, world);
  }
  EXPECT_TRUE(moe::testing::same_bytes(incoming, tagged(dtype, previous, 3)));
}

TEST_P(Collectives, SendRecvShiftsALargeTensorAroundTheRingAtOnce) {
  // Every rank sends and receives together: plain sends of this size (beyond MPI's eager limit)
  // would all wait for a receive that nobody has posted yet.
  const int next = (rank + 1) % size, previous = (rank + size - 1) % size;
  Tensor outgoing = tagged(dtype, rank, 700);
  Tensor incoming({700, kCols}, dtype);
  send_recv(outgoing, next, incoming, previous, 9, world);
  EXPECT_TRUE(moe::testing::same_bytes(incoming, tagged(dtype, previous, 700)));
}

INSTANTIATE_TEST_SUITE_P(AllDtypes, Collectives,
                         ::testing::Values(DType::F32, DType::BF16, DType::F16, DType::F64,
                                           DType::I32, DType::I64),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(CollectivesDeterminism, RandomSumsEqualTheRankOrderReferenceBitwise) {
  ProcessGroup world = ProcessGroup::world();
  for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
    SCOPED_TRACE(dtype_name(dtype));
    const Shape shape{37, 11};
    auto input_of = [&](int r) {
      return moe::testing::random_normal(shape, 1000 + r, 3.0f, dtype);
    };
    Tensor first = input_of(world.rank());
    Tensor second = input_of(world.rank());
    all_reduce(first, world);
    all_reduce(second, world);
    EXPECT_TRUE(moe::testing::same_bytes(first, second)) << "two runs differ";
    // Every rank rebuilds all inputs and sums them in rank order in fp32, rounding once.
    std::vector<float> reference(size_t(shape_numel(shape)), 0.0f);
    for (int r = 0; r < world.size(); ++r) {
      std::vector<float> values = input_of(r).to_floats();
      for (size_t i = 0; i < values.size(); ++i) reference[i] += values[i];
    }
    EXPECT_TRUE(moe::testing::same_bytes(first, Tensor::from_floats(reference, shape, dtype)));
  }
}

TEST(CollectivesDeterminism, LargeAllReduceSpansSeveralRoundsOfReceiveSpace) {
  // The reductions receive at most 32 MiB per round: on 2 ranks an fp32 block of more than 4 Mi
  // elements takes two rounds. Values are small integers, so the sum is exact.
  ProcessGroup world = ProcessGroup::world();
  if (world.size() != 2) GTEST_SKIP() << "sized for 2 ranks";
  const int64_t n = 2 * ((int64_t(1) << 22) + 1000);
  Tensor values({n});
  float* data = values.data<float>();
  for (int64_t i = 0; i < n; ++i) data[i] = float(i % 97 + world.rank());
  all_reduce(values, world);
  int64_t wrong = 0;
  for (int64_t i = 0; i < n; ++i) wrong += data[i] != float(2 * (i % 97) + 1);
  EXPECT_EQ(wrong, 0);
}

TEST(CollectivesDeterminism, MaxPropagatesNaNFromAnyRank) {
  ProcessGroup world = ProcessGroup::world();
  const int last = world.size() - 1;
  for (DType dtype : {DType::F32, DType::BF16}) {
    Tensor values = Tensor::full({3}, float(world.rank()), dtype);
    if (world.rank() == last / 2) values.set(1, std::nanf(""));
    all_reduce(values, world, ReduceOp::kMax);
    EXPECT_EQ(values.get(0), float(last));
    EXPECT_TRUE(std::isnan(values.get(1)));
    EXPECT_EQ(values.get(2), float(last));
  }
}

TEST(CollectivesGroups, SubgroupsReduceOnlyTheirMembers) {
  ProcessGroup world = ProcessGroup::world();
  std::vector<int> members;
  for (int r = world.rank() % 2; r < world.size(); r += 2) members.push_back(r);
  ProcessGroup parity = ProcessGroup::from_ranks(world, members, "parity");
  EXPECT_EQ(parity.size(), int(members.size()));
  EXPECT_EQ(parity.rank(), world.rank() / 2);
  EXPECT_EQ(parity.world_ranks(), members);
  Tensor value = Tensor::full({1}, float(world.rank()), DType::I64);
  all_reduce(value, parity);
  EXPECT_EQ(value.get(0), float(std::accumulate(members.begin(), members.end(), 0)));

  std::vector<int64_t> values = all_gather_values(std::vector<int64_t>{world.rank(), 7}, parity);
  std::vector<int64_t> expected;
  for (int r : members) expected.insert(expected.end(), {r, 7});
  EXPECT_EQ(values, expected);
  barrier(parity);
  barrier(world);
}

}  // namespace
}  // namespace moe::comm

// Proves the mpi test label works: ranks launched by ctest under mpirun can all-reduce.
#include <gtest/gtest.h>
#include <mpi.h>

TEST(MpiSmoke, AllReduceSumsRankIds) {
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  ASSERT_GE(size, 2);
  long local = rank + 1, total = 0;
  MPI_Allreduce(&local, &total, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(total, long(size) * (size + 1) / 2);
}

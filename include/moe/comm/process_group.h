// MPI process groups and the collectives the package uses, on tensors. MPI is the distributed
// engine: programs run under `mpirun -np N`. Every collective checks its sizes at the boundary,
// is deterministic (same inputs give bitwise the same output on every run), and turns MPI errors
// and timeouts into moe::Error naming the collective, the group and the rank.
//
// Supported dtypes: fp32, bf16, fp16, fp64, int32, int64. Reductions accumulate in fp32 for
// fp32/bf16/fp16 (one rounding at the end), fp64 for fp64, and int64 for integers (sums wrap).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "moe/tensor/tensor.h"

namespace moe::comm {

// Initialises MPI (once; safe if already initialised, e.g. by mpirun's test main) and registers
// an exit handler that finalises it, or, if a collective failed (timeout or MPI error), calls
// MPI_Abort so that peers stuck in the failed exchange are brought down instead of hanging.
// Programs should therefore not call MPI_Finalize themselves after a failure. Sets
// MPI_ERRORS_RETURN on MPI_COMM_WORLD (and the groups' communicators inherit it), so raw MPI
// calls on them return error codes instead of aborting: check them.
void ensure_mpi_initialized(int* argc = nullptr, char*** argv = nullptr);
// True once a collective on any group timed out or hit an MPI error in this process.
bool communication_failed();

namespace detail {
struct GroupState;  // communicator and failure record shared by copies of a ProcessGroup
struct GroupAccess;
}  // namespace detail

// A set of ranks that run collectives together. Copies share one communicator. Collectives are
// called by one thread at a time. After a timeout or MPI error a group is unusable: every later
// collective on it throws at once, naming the first failure.
class ProcessGroup {
 public:
  // A group of one process (this one): collectives are copies. Works without mpirun.
  ProcessGroup();
  // All processes (MPI_COMM_WORLD).
  static ProcessGroup world();
  // A subgroup of `parent` containing exactly `world_ranks` (this rank must be among them), group
  // rank i being world_ranks[i]. Collective over `parent`: every rank of parent calls it with
  // its own group's rank list; the lists are checked to partition parent consistently.
  static ProcessGroup from_ranks(const ProcessGroup& parent, std::vector<int> world_ranks,
                                 std::string name);

  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& name() const { return name_; }
  const std::vector<int>& world_ranks() const { return world_ranks_; }  // ordered by group rank
  // The MPI communicator (MPI_COMM_SELF for the self group; initialises MPI if needed).
  MPI_Comm handle() const;

 private:
  friend struct detail::GroupAccess;
  std::shared_ptr<detail::GroupState> state_;  // freed when the last copy goes
  int rank_ = 0;
  int size_ = 1;
  std::string name_ = "self";
  std::vector<int> world_ranks_;
};

enum class ReduceOp { kSum, kMax };

// Seconds a collective may wait for its peers before every waiting rank raises an error naming
// the peers it waits for, instead of hanging (default 300; env MOE_COLLECTIVE_TIMEOUT_S; 0
// disables). Process-wide; read when each collective starts.
void set_collective_timeout(double seconds);
double collective_timeout();

// Every collective first exchanges a small announcement (collective, dtype, sizes) with every
// peer and checks that they agree, so a mismatch raises the same moe::Error on every rank before
// any data moves (the group stays usable). Sums and maxima are taken in rank order 0..size-1 in
// fp32 (fp64 for fp64, int64 for integers) and rounded once, so results are bitwise identical on
// every rank and every run. User tags for send/recv must lie in [0, kMaxUserTag].
constexpr int kMaxUserTag = 32765;

// In place over the whole tensor.
void all_reduce(Tensor& tensor, const ProcessGroup& group, ReduceOp op = ReduceOp::kSum);
// Row-wise (dim 0) gathers and scatters. Equal forms: out has size * local rows, rank order.
void all_gather(const Tensor& local, Tensor& out, const ProcessGroup& group);
void reduce_scatter(const Tensor& in, Tensor& out, const ProcessGroup& group,
                    ReduceOp op = ReduceOp::kSum);
// Uneven forms: rows_per_rank[r] rows belong to rank r (identical list on every rank; checked).
// Zero rows are fine. reduce_scatter_v sums.
void all_gather_v(const Tensor& local, Tensor& out, std::span<const int64_t> rows_per_rank,
                  const ProcessGroup& group);
void reduce_scatter_v(const Tensor& in, Tensor& out, std::span<const int64_t> rows_per_rank,
                      const ProcessGroup& group);
// send_rows[r] rows of `send` (in rank order) go to rank r; recv_rows[r] rows arrive from r.
// The counts are checked against what each peer announces before any data moves.
void all_to_all_v(const Tensor& send, std::span<const int64_t> send_rows, Tensor& recv,
                  std::span<const int64_t> recv_rows, const ProcessGroup& group);
// The root's tensor to every rank (same dtype and element count everywhere; checked).
void broadcast(Tensor& tensor, int root, const ProcessGroup& group);
// Point-to-point (tag in [0, kMaxUserTag]): the receiver checks the sender's dtype and shape
// against its tensor and raises an error naming both on a mismatch. A send may wait until the
// peer receives, so two ranks that both send first to each other would time out: order them, or
// use send_recv, which posts both directions together (send_peer and recv_peer may differ).
void send(const Tensor& tensor, int peer, int tag, const ProcessGroup& group);
void recv(Tensor& tensor, int peer, int tag, const ProcessGroup& group);
void send_recv(const Tensor& outgoing, int send_peer, Tensor& incoming, int recv_peer, int tag,
               const ProcessGroup& group);
void barrier(const ProcessGroup& group);

// Small integer helpers for bookkeeping (counts, sizes): all-gather one value or a vector per rank
// (the same length on every rank; checked). Returns size * local.size() values in rank order.
std::vector<int64_t> all_gather_values(std::span<const int64_t> local, const ProcessGroup& group);

// Collective: which ranks of `group` passed failed = true, so every rank can raise the same error.
struct FailedRanks {
  std::vector<int> ranks;    // in rank order
  std::string list() const;  // "0, 2"
};
FailedRanks gather_failed_ranks(bool failed, const ProcessGroup& group);

// The sizes of `parts` near-equal contiguous slices of n elements, slice r being
// [n*r/parts, n*(r+1)/parts): how all_reduce and broadcast split their work, and how the
// distributed optimizer shards its buffers.
std::vector<int64_t> even_split(int64_t n, int parts);

}  // namespace moe::comm

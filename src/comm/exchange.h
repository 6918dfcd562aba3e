// Internal machinery shared by the collectives: the state behind a ProcessGroup, one collective
// call with its deadline and error texts, the announcement round that makes ranks agree on a
// collective's sizes before data moves, and the point-to-point block exchange with a deadline.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moe/comm/process_group.h"

namespace moe::comm::detail {

struct GroupState {
  MPI_Comm comm = MPI_COMM_NULL;  // MPI_COMM_NULL for the self group, which needs no MPI at all
  bool owns_comm = false;         // communicators made by from_ranks are freed with the state
  std::string failure;            // the first timeout or MPI error; the group is unusable after
  // Buffers of requests a failure left pending: MPI may still write into them, so they live on.
  std::vector<Tensor> abandoned;
  Tensor scratch;  // receive space the reductions reuse from call to call (int64 words)
  ~GroupState();
};

struct GroupAccess {
  static GroupState& state(const ProcessGroup& group) { return *group.state_; }
  static ProcessGroup make(std::shared_ptr<GroupState> state, int rank, int size, std::string name,
                           std::vector<int> world_ranks);
};

// Marks this process as failed: the exit handler then aborts the MPI job instead of finalising.
void record_communication_failure();

// This process's rank in MPI_COMM_WORLD (0 when MPI is not initialised).
int world_rank_or_zero();

// Tags reserved for the collectives' own messages; user send/recv tags stay below them.
constexpr int kAnnounceTag = kMaxUserTag + 2;
constexpr int kDataTag = kMaxUserTag + 1;

// One collective call on one group: checks the group is usable, holds the deadline and builds
// error texts that name the collective, the group and this rank.
class Call {
 public:
  Call(const char* collective, const ProcessGroup& group);

  const ProcessGroup& group() const { return group_; }
  MPI_Comm comm() const { return state_.comm; }
  int rank() const { return group_.rank(); }
  int size() const { return group_.size(); }
  // "all_reduce on group 'tp' (rank 1 of 2, world rank 3)".
  std::string where() const;
  // "rank 2 (world rank 6)": a peer named by its group rank.
  std::string peer_name(int peer) const;

  // Throws moe::Error "<where>: <what>"; the group stays usable (every rank raises the same).
  [[noreturn]] void fail(const std::string& what) const;
  // Marks the group unusable and the process as failed, keeps `pending` buffers alive for MPI,
  // and throws moe::Error "<where>: <what>".
  [[noreturn]] void fail_broken(const std::string& what, std::vector<Tensor> pending) const;
  // Throws (via fail_broken) when an MPI call did not return MPI_SUCCESS.
  void check_mpi(int code, const char* function) const;

  // Polls `requests` (completed ones become MPI_REQUEST_NULL) until all are done or the
  // deadline passes. Returns false on timeout. Backs off from spinning to short sleeps so that
  // oversubscribed ranks leave the cores to their peers.
  bool wait_all(std::vector<MPI_Request>& requests) const;
  // The group's reusable receive space, grown to at least `bytes`.
  Tensor scratch_space(size_t bytes) const;
  // "2 s" / "0.5 s".
  std::string timeout_text() const;

 private:
  const char* collective_;
  const ProcessGroup& group_;
  GroupState& state_;
  std::chrono::steady_clock::time_point deadline_;
  bool has_deadline_ = false;
};

enum class Kind : int64_t {
  kAllReduce = 1,
  kAllGather,
  kAllGatherV,
  kReduceScatter,
  kReduceScatterV,
  kAllToAllV,
  kBroadcast,
  kBarrier,
  kAllGatherValues,
  kFromRanks,
};

// What a rank says about its call before any data moves.
struct Announcement {
  Kind kind = Kind::kBarrier;
  int64_t dtype = -1;     // DType code; -1 when no tensor is involved
  int64_t row_elems = 1;  // elements per row
  int64_t rows = 0;       // rows this rank holds (whole-tensor collectives: elements)
  int64_t option = 0;     // reduce op, broadcast root or number of values; equal on all ranks
  std::vector<int64_t> first, second;  // per-rank lists (at most group-size entries each)
  bool valid = true;  // false when this rank's arguments failed the boundary checks
};

// "all_gather_v of 3 rows x 64 bf16, rows_per_rank [3, 5]".
std::string describe(const Announcement& announcement);
std::string list_text(const std::vector<int64_t>& values);
// "rank 3" / "ranks 0-2, 5".
std::string ranks_text(const std::vector<int>& ranks);

// Sends `mine` to every peer and receives theirs (index = group rank), within the deadline; then
// checks that no rank's arguments were invalid (`local_problem` is this rank's boundary-check
// error, empty when none), that every rank called the same collective with the same dtype, row
// width and option, and (when `rows_agree`) the same row count. Every rank sees every
// announcement, so every rank raises an error on a disagreement, before any data moves.
std::vector<Announcement> announce(const Call& call, Announcement mine, bool rows_agree,
                                   const std::string& local_problem = "");

// A block of `units` units exchanged with group rank `peer`.
struct Transfer {
  int peer;
  void* data;
  int64_t units;
};

// Posts every receive and send (blocks of `unit_bytes`, split into messages that MPI's int counts
// can hold), copies a block this rank sends to itself, and waits within the deadline. `unit_name`
// ("rows", "elements") and `call_text` describe the call in a timeout error; `buffers` are the
// tensors behind the transfers, kept alive if a timeout leaves requests pending.
void exchange(const Call& call, const std::vector<Transfer>& sends,
              const std::vector<Transfer>& receives, size_t unit_bytes, const char* unit_name,
              const std::string& call_text, std::vector<Tensor> buffers, int tag = kDataTag);

}  // namespace moe::comm::detail

// MPI start-up and shut-down, the collective timeout setting, and ProcessGroup construction.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>

#include "comm/exchange.h"

namespace moe::comm {

namespace {

std::atomic<bool> failure_recorded{false};

bool mpi_is_active() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

// At exit: finalise MPI, unless a collective failed. Then a peer may be stuck in the failed
// exchange and MPI_Finalize would wait for it forever, so abort the whole job instead.
void shut_down_mpi() {
  if (!mpi_is_active()) return;
  if (failure_recorded.load()) {
    std::fputs(
        "moecore: a collective failed (see the error above); aborting the MPI job so that "
        "no rank waits for it forever\n",
        stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
}

double timeout_from_environment() {
  const char* text = std::getenv("MOE_COLLECTIVE_TIMEOUT_S");
  if (text == nullptr || *text == '\0') return 300.0;
  char* end = nullptr;
  double seconds = std::strtod(text, &end);
  MOE_CHECK(end != text && *end == '\0' && seconds >= 0,
            "MOE_COLLECTIVE_TIMEOUT_S must be a number of seconds >= 0 (0 disables), got '", text,
            "'");
  return seconds;
}

std::atomic<double>& timeout_setting() {
  static std::atomic<double> seconds{timeout_from_environment()};
  return seconds;
}

}  // namespace

namespace detail {

void record_communication_failure() {
  failure_recorded.store(true);
}

int world_rank_or_zero() {
  if (!mpi_is_active()) return 0;
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

GroupState::~GroupState() {
  if (owns_comm && comm != MPI_COMM_NULL && mpi_is_active()) MPI_Comm_free(&comm);
}

ProcessGroup GroupAccess::make(std::shared_ptr<GroupState> state, int rank, int size,
                               std::string name, std::vector<int> world_ranks) {
  ProcessGroup group;
  group.state_ = std::move(state);
  group.rank_ = rank;
  group.size_ = size;
  group.name_ = std::move(name);
  group.world_ranks_ = std::move(world_ranks);
  return group;
}

}  // namespace detail

void ensure_mpi_initialized(int* argc, char*** argv) {
  int finalized = 0;
  MPI_Finalized(&finalized);
  MOE_CHECK(!finalized, "MPI has already been finalised; no collective can run any more");
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    int code = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    MOE_CHECK(code == MPI_SUCCESS, "MPI_Init_thread failed with MPI error code ", code);
  }
  static std::once_flag once;
  std::call_once(once, [] {
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(MPI_COMM_SELF, MPI_ERRORS_RETURN);
    std::atexit(shut_down_mpi);
  });
}

bool communication_failed() {
  return failure_recorded.load();
}

void set_collective_timeout(double seconds) {
  MOE_CHECK(seconds >= 0, "collective timeout must be >= 0 seconds (0 disables), got ", seconds);
  timeout_setting().store(seconds);
}

double collective_timeout() {
  return timeout_setting().load();
}

ProcessGroup::ProcessGroup()
    : state_(std::make_shared<detail::GroupState>()), world_ranks_{detail::world_rank_or_zero()} {}

ProcessGroup ProcessGroup::world() {
  ensure_mpi_initialized();
  // One state for MPI_COMM_WORLD, so that every copy sees a failure recorded by any other.
  static const std::shared_ptr<detail::GroupState> state = [] {
    auto world_state = std::make_shared<detail::GroupState>();
    world_state->comm = MPI_COMM_WORLD;
    return world_state;
  }();
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  std::vector<int> ranks(size_t(size), 0);
  for (int r = 0; r < size; ++r) ranks[size_t(r)] = r;
  return detail::GroupAccess::make(state, rank, size, "world", std::move(ranks));
}

MPI_Comm ProcessGroup::handle() const {
  ensure_mpi_initialized();
  return state_->comm == MPI_COMM_NULL ? MPI_COMM_SELF : state_->comm;
}

ProcessGroup ProcessGroup::from_ranks(const ProcessGroup& parent, std::vector<int> world_ranks,
                                      std::string name) {
  detail::Call call("from_ranks", parent);
  const int me = parent.world_ranks()[size_t(parent.rank())];
  detail::Announcement mine;
  mine.kind = detail::Kind::kFromRanks;
  mine.rows = int64_t(world_ranks.size());
  mine.first.assign(world_ranks.begin(), world_ranks.end());  // sent truncated to parent's size
  std::vector<detail::Announcement> all = detail::announce(call, mine, false);
  // Every rank checks every rank's list, so all of them raise the same error: each list must be
  // distinct ranks of parent including the caller, and every member must pass the same list.
  std::vector<int> parent_rank_of(
      size_t(*std::max_element(parent.world_ranks().begin(), parent.world_ranks().end())) + 1, -1);
  for (int r = 0; r < parent.size(); ++r)
    parent_rank_of[size_t(parent.world_ranks()[size_t(r)])] = r;
  for (int peer = 0; peer < parent.size(); ++peer) {
    const std::vector<int64_t>& list = all[size_t(peer)].first;
    const int their_world_rank = parent.world_ranks()[size_t(peer)];
    std::set<int64_t> distinct(list.begin(), list.end());
    // A list longer than parent arrives truncated (rows keeps its length): invalid anyway.
    bool valid = !list.empty() && all[size_t(peer)].rows == int64_t(list.size()) &&
                 distinct.size() == list.size() && distinct.count(their_world_rank) > 0;
    for (int64_t member : list) {
      valid = valid && member >= 0 && member < int64_t(parent_rank_of.size()) &&
              parent_rank_of[size_t(member)] >= 0;
    }
    if (!valid) {
      call.fail(moe::detail::concat(
          "group '", name, "': world rank ", their_world_rank, " passes ", detail::list_text(list),
          all[size_t(peer)].rows > int64_t(list.size()) ? " (and more)" : "",
          ", which is not a list of distinct ranks of group '", parent.name(),
          "' including itself"));
    }
    for (int64_t member : list) {
      const std::vector<int64_t>& theirs = all[size_t(parent_rank_of[size_t(member)])].first;
      if (theirs != list) {
        call.fail(
            moe::detail::concat("group '", name, "': ranks disagree on its members: world rank ",
                                their_world_rank, " passes ", detail::list_text(list),
                                ", world rank ", member, " passes ", detail::list_text(theirs)));
      }
    }
  }
  const int group_rank =
      int(std::find(world_ranks.begin(), world_ranks.end(), me) - world_ranks.begin());
  auto state = std::make_shared<detail::GroupState>();
  if (parent.size() > 1) {
    // Every rank of parent has announced, so the blocking split below cannot hang.
    const int color = *std::min_element(world_ranks.begin(), world_ranks.end());
    call.check_mpi(MPI_Comm_split(call.comm(), color, group_rank, &state->comm), "MPI_Comm_split");
    state->owns_comm = true;
    call.check_mpi(MPI_Comm_set_errhandler(state->comm, MPI_ERRORS_RETURN),
                   "MPI_Comm_set_errhandler");
  }
  const int group_size = int(world_ranks.size());
  return detail::GroupAccess::make(state, group_rank, group_size, std::move(name),
                                   std::move(world_ranks));
}

}  // namespace moe::comm

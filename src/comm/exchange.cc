#include "comm/exchange.h"

#include <sched.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <sstream>
#include <thread>

namespace moe::comm::detail {

Call::Call(const char* collective, const ProcessGroup& group)
    : collective_(collective), group_(group), state_(GroupAccess::state(group)) {
  if (!state_.failure.empty()) {
    fail("group '" + group.name() + "' is unusable after an earlier failure: " + state_.failure);
  }
  double seconds = collective_timeout();
  if (seconds > 0) {
    has_deadline_ = true;
    deadline_ = std::chrono::steady_clock::now() +
                std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                    std::chrono::duration<double>(seconds));
  }
}

std::string Call::where() const {
  return moe::detail::concat(collective_, " on group '", group_.name(), "' (rank ", group_.rank(),
                             " of ", group_.size(), ", world rank ",
                             group_.world_ranks()[size_t(group_.rank())], ")");
}

std::string Call::peer_name(int peer) const {
  return moe::detail::concat("rank ", peer, " (world rank ", group_.world_ranks()[size_t(peer)],
                             ")");
}

void Call::fail(const std::string& what) const {
  throw Error(where() + ": " + what);
}

void Call::fail_broken(const std::string& what, std::vector<Tensor> pending) const {
  std::string message = where() + ": " + what;
  if (state_.failure.empty()) state_.failure = message;
  for (Tensor& buffer : pending) state_.abandoned.push_back(std::move(buffer));
  record_communication_failure();
  throw Error(message);
}

void Call::check_mpi(int code, const char* function) const {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  fail_broken(moe::detail::concat(function, " failed: ", std::string(text, size_t(length))), {});
}

bool Call::wait_all(std::vector<MPI_Request>& requests) const {
  using std::chrono::steady_clock;
  // Poll (yielding the core) for a while: transfers usually finish quickly, and MPI only makes
  // progress inside MPI calls. A longer wait means a slow peer: sleep, doubling up to 0.5 ms.
  constexpr auto kPollingPeriod = std::chrono::milliseconds(20);
  constexpr auto kLongestPause = std::chrono::microseconds(500);
  std::vector<int> done(requests.size());
  std::vector<MPI_Status> statuses(requests.size());
  const auto start = steady_clock::now();
  auto pause = std::chrono::microseconds(10);
  while (!requests.empty()) {
    int count = 0;
    int code =
        MPI_Testsome(int(requests.size()), requests.data(), &count, done.data(), statuses.data());
    if (code == MPI_ERR_IN_STATUS) {
      for (int i = 0; i < count; ++i) check_mpi(statuses[size_t(i)].MPI_ERROR, "MPI_Testsome");
    }
    check_mpi(code, "MPI_Testsome");
    if (count == MPI_UNDEFINED) return true;  // every request is done
    if (count > 0) continue;
    const auto now = steady_clock::now();
    if (has_deadline_ && now > deadline_) return false;
    if (now - start < kPollingPeriod) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, kLongestPause);
    }
  }
  return true;
}

Tensor Call::scratch_space(size_t bytes) const {
  if (!state_.scratch.defined() || state_.scratch.nbytes() < bytes) {
    state_.scratch = Tensor::empty({int64_t((bytes + 7) / 8)}, DType::I64);
  }
  return state_.scratch;
}

std::string Call::timeout_text() const {
  std::ostringstream out;
  out << collective_timeout() << " s";
  return out.str();
}

std::string ranks_text(const std::vector<int>& ranks) {
  std::ostringstream out;
  out << (ranks.size() == 1 ? "rank " : "ranks ");
  for (size_t i = 0; i < ranks.size();) {
    size_t end = i + 1;  // one past a run of consecutive ranks
    while (end < ranks.size() && ranks[end] == ranks[end - 1] + 1) ++end;
    out << (i ? ", " : "") << ranks[i];
    if (end - i > 1) out << "-" << ranks[end - 1];
    i = end;
  }
  return out.str();
}

std::string list_text(const std::vector<int64_t>& values) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  out << "]";
  return out.str();
}

namespace {

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::kAllReduce:
      return "all_reduce";
    case Kind::kAllGather:
      return "all_gather";
    case Kind::kAllGatherV:
      return "all_gather_v";
    case Kind::kReduceScatter:
      return "reduce_scatter";
    case Kind::kReduceScatterV:
      return "reduce_scatter_v";
    case Kind::kAllToAllV:
      return "all_to_all_v";
    case Kind::kBroadcast:
      return "broadcast";
    case Kind::kBarrier:
      return "barrier";
    case Kind::kAllGatherValues:
      return "all_gather_values";
    case Kind::kFromRanks:
      return "from_ranks";
  }
  return "unknown collective";
}

std::string dtype_text(int64_t code) {
  if (code < 0 || code > int64_t(DType::I64)) return moe::detail::concat("dtype#", code);
  return std::string(dtype_name(DType(code)));
}

const char* op_text(int64_t op) {
  return op == int64_t(ReduceOp::kMax) ? "max" : "sum";
}

// Header layout on the wire: 8 fixed fields, then both lists padded to the group size.
constexpr size_t kFixedFields = 8;

std::vector<int64_t> serialize(const Announcement& a, size_t group_size) {
  std::vector<int64_t> wire(kFixedFields + 2 * group_size, 0);
  wire[0] = int64_t(a.kind);
  wire[1] = a.dtype;
  wire[2] = a.row_elems;
  wire[3] = a.rows;
  wire[4] = a.option;
  // Lists longer than the group come only with invalid arguments: their head is enough.
  const size_t first = std::min(a.first.size(), group_size);
  const size_t second = std::min(a.second.size(), group_size);
  wire[5] = int64_t(first);
  wire[6] = int64_t(second);
  wire[7] = a.valid ? 1 : 0;
  std::copy_n(a.first.begin(), first, wire.begin() + kFixedFields);
  std::copy_n(a.second.begin(), second, wire.begin() + long(kFixedFields + group_size));
  return wire;
}

Announcement deserialize(const int64_t* wire, size_t group_size) {
  Announcement a;
  a.kind = Kind(wire[0]);
  a.dtype = wire[1];
  a.row_elems = wire[2];
  a.rows = wire[3];
  a.option = wire[4];
  a.valid = wire[7] != 0;
  size_t first = size_t(std::clamp<int64_t>(wire[5], 0, int64_t(group_size)));
  size_t second = size_t(std::clamp<int64_t>(wire[6], 0, int64_t(group_size)));
  a.first.assign(wire + kFixedFields, wire + kFixedFields + first);
  a.second.assign(wire + kFixedFields + group_size, wire + kFixedFields + group_size + second);
  return a;
}

bool same_call(const Announcement& a, const Announcement& b, bool rows_agree) {
  return a.kind == b.kind && a.dtype == b.dtype && a.row_elems == b.row_elems &&
         a.option == b.option && (!rows_agree || a.rows == b.rows);
}

}  // namespace

std::string describe(const Announcement& a) {
  std::ostringstream out;
  out << kind_name(a.kind);
  std::string rows = moe::detail::concat(a.rows, " rows x ", a.row_elems, " ", dtype_text(a.dtype));
  switch (a.kind) {
    case Kind::kAllReduce:
      out << " of " << a.rows << " " << dtype_text(a.dtype) << " elements (" << op_text(a.option)
          << ")";
      break;
    case Kind::kBroadcast:
      out << " of " << a.rows << " " << dtype_text(a.dtype) << " elements from rank " << a.option;
      break;
    case Kind::kAllGather:
      out << " of " << rows;
      break;
    case Kind::kReduceScatter:
      out << " of " << rows << " (" << op_text(a.option) << ")";
      break;
    case Kind::kAllGatherV:
    case Kind::kReduceScatterV:
      out << " of " << rows << ", rows_per_rank " << list_text(a.first);
      break;
    case Kind::kAllToAllV:
      out << " of rows x " << a.row_elems << " " << dtype_text(a.dtype) << ", send_rows "
          << list_text(a.first) << ", recv_rows " << list_text(a.second);
      break;
    case Kind::kAllGatherValues:
      out << " of " << a.option << " values";
      break;
    case Kind::kFromRanks:
      out << " with world ranks " << list_text(a.first);
      break;
    case Kind::kBarrier:
      break;
  }
  return out.str();
}

std::vector<Announcement> announce(const Call& call, Announcement mine, bool rows_agree,
                                   const std::string& local_problem) {
  mine.valid = local_problem.empty();
  const int size = call.size();
  const size_t group_size = size_t(size);
  std::vector<Announcement> all(group_size);
  all[size_t(call.rank())] = mine;
  if (size > 1) {
    const size_t length = kFixedFields + 2 * group_size;
    std::vector<int64_t> wire = serialize(mine, group_size);
    Tensor outgoing = Tensor::empty({int64_t(length)}, DType::I64);
    std::memcpy(outgoing.raw(), wire.data(), length * sizeof(int64_t));
    Tensor incoming = Tensor::empty({int64_t(length * group_size)}, DType::I64);
    int64_t* in = incoming.data<int64_t>();
    std::vector<MPI_Request> requests;
    std::vector<int> request_peer;  // receives first, then sends
    for (int peer = 0; peer < size; ++peer) {
      if (peer == call.rank()) continue;
      requests.emplace_back();
      call.check_mpi(MPI_Irecv(in + size_t(peer) * length, int(length), MPI_INT64_T, peer,
                               kAnnounceTag, call.comm(), &requests.back()),
                     "MPI_Irecv");
      request_peer.push_back(peer);
    }
    const size_t receives = requests.size();
    for (int peer = 0; peer < size; ++peer) {
      if (peer == call.rank()) continue;
      requests.emplace_back();
      call.check_mpi(MPI_Isend(outgoing.raw(), int(length), MPI_INT64_T, peer, kAnnounceTag,
                               call.comm(), &requests.back()),
                     "MPI_Isend");
      request_peer.push_back(peer);
    }
    if (!call.wait_all(requests)) {
      std::string missing;
      for (size_t i = 0; i < receives; ++i) {
        if (requests[i] == MPI_REQUEST_NULL) continue;
        missing += (missing.empty() ? "" : ", ") + call.peer_name(request_peer[i]);
      }
      call.fail_broken(
          moe::detail::concat(
              "timed out after ", call.timeout_text(), " waiting for ",
              missing.empty() ? "peers to take this rank's announcement" : missing + " to join",
              " (this rank's call: ", describe(mine), ")"),
          {outgoing, incoming});
    }
    for (int peer = 0; peer < size; ++peer) {
      if (peer != call.rank())
        all[size_t(peer)] = deserialize(in + size_t(peer) * length, group_size);
    }
  }
  if (!local_problem.empty()) call.fail(local_problem);
  for (int peer = 0; peer < size; ++peer) {
    if (!all[size_t(peer)].valid) {
      call.fail(
          moe::detail::concat(call.peer_name(peer),
                              " passed invalid arguments (its own error names them); this rank's "
                              "call: ",
                              describe(mine)));
    }
  }
  bool agree = std::all_of(all.begin(), all.end(), [&](const Announcement& other) {
    return same_call(other, all[0], rows_agree);
  });
  if (!agree) {
    // Each distinct call once, with the ranks that made it: "rank 0: barrier; ranks 1-3: ...".
    std::vector<std::pair<std::string, std::vector<int>>> calls;
    for (int peer = 0; peer < size; ++peer) {
      std::string text = describe(all[size_t(peer)]);
      auto same = std::find_if(calls.begin(), calls.end(),
                               [&](const auto& entry) { return entry.first == text; });
      if (same == calls.end()) {
        calls.push_back({text, {peer}});
      } else {
        same->second.push_back(peer);
      }
    }
    std::string listed;
    for (const auto& [text, ranks] : calls) {
      listed += moe::detail::concat(listed.empty() ? "" : "; ", ranks_text(ranks), ": ", text);
    }
    call.fail("ranks called different collectives or sizes: " + listed);
  }
  return all;
}

void exchange(const Call& call, const std::vector<Transfer>& sends,
              const std::vector<Transfer>& receives, size_t unit_bytes, const char* unit_name,
              const std::string& call_text, std::vector<Tensor> buffers, int tag) {
  if (unit_bytes == 0) return;
  // The block this rank sends itself is a local copy (none when it is already in place).
  for (const Transfer& t : sends) {
    if (t.peer != call.rank()) continue;
    for (const Transfer& r : receives) {
      if (r.peer == t.peer && r.data != t.data) {
        std::memmove(r.data, t.data, size_t(t.units) * unit_bytes);
      }
    }
  }
  auto remote = [&](const Transfer& t) { return t.peer != call.rank() && t.units > 0; };
  if (std::none_of(sends.begin(), sends.end(), remote) &&
      std::none_of(receives.begin(), receives.end(), remote)) {
    return;  // the self group always ends here, without touching MPI
  }
  MPI_Datatype unit = MPI_DATATYPE_NULL;
  call.check_mpi(MPI_Type_contiguous(int(unit_bytes), MPI_BYTE, &unit), "MPI_Type_contiguous");
  call.check_mpi(MPI_Type_commit(&unit), "MPI_Type_commit");

  // Messages of at most INT_MAX units: MPI counts are ints.
  const int64_t max_units = INT_MAX;
  std::vector<MPI_Request> requests;
  std::vector<const Transfer*> request_transfer;
  auto post = [&](const Transfer& t, bool receive) {
    for (int64_t done = 0; done < t.units; done += max_units) {
      char* data = static_cast<char*>(t.data) + size_t(done) * unit_bytes;
      const int count = int(std::min(max_units, t.units - done));
      requests.emplace_back();
      if (receive) {
        call.check_mpi(MPI_Irecv(data, count, unit, t.peer, tag, call.comm(), &requests.back()),
                       "MPI_Irecv");
      } else {
        call.check_mpi(MPI_Isend(data, count, unit, t.peer, tag, call.comm(), &requests.back()),
                       "MPI_Isend");
      }
      request_transfer.push_back(&t);
    }
  };
  for (const Transfer& t : receives) {
    if (remote(t)) post(t, true);
  }
  const size_t receive_count = requests.size();
  for (const Transfer& t : sends) {
    if (remote(t)) post(t, false);
  }
  bool completed = call.wait_all(requests);
  MPI_Type_free(&unit);  // pending requests keep their own reference to the type
  if (completed) return;

  std::string stuck;
  for (size_t i = 0; i < requests.size(); ++i) {
    if (requests[i] == MPI_REQUEST_NULL) continue;
    const Transfer& t = *request_transfer[i];
    stuck += stuck.empty() ? "" : "; ";
    stuck += i < receive_count ? moe::detail::concat("no data from ", call.peer_name(t.peer),
                                                     " (expects ", t.units, " ", unit_name, ")")
                               : moe::detail::concat(call.peer_name(t.peer), " has not taken its ",
                                                     t.units, " ", unit_name);
  }
  call.fail_broken(
      moe::detail::concat("timed out after ", call.timeout_text(), " in the data exchange: ", stuck,
                          " (this rank's call: ", call_text, ")"),
      std::move(buffers));
}

}  // namespace moe::comm::detail

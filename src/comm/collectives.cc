// Collectives on tensors. Each one: boundary checks, an announcement round in which every rank
// checks every rank's sizes, then point-to-point block exchanges with a deadline. Reductions are
// done here, not by MPI, in rank order with a wide accumulator, so results do not depend on the
// MPI library's algorithm choice and are bitwise identical on every rank and run.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "comm/exchange.h"
#include "moe/comm/fault_injection.h"
#include "tensor/dtype_switch.h"

namespace moe::comm {

using detail::Announcement;
using detail::Call;
using detail::Kind;
using detail::Transfer;

namespace {

// out[i] = blocks[0][i] op blocks[1][i] op ... in block (rank) order, in the wide math type
// compute_t<T> (int64 for integers).
// blocks: [count, n] contiguous; out: [n].
template <class T>
void reduce_in_rank_order(const T* blocks, int count, int64_t n, ReduceOp op, T* out) {
  using Acc = compute_t<T>;
  constexpr int64_t kTile = 256;
  Acc acc[kTile];
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t length = std::min(kTile, n - start);
    for (int64_t i = 0; i < length; ++i) acc[i] = load(blocks[start + i]);
    for (int block = 1; block < count; ++block) {
      const T* source = blocks + int64_t(block) * n + start;
      if (op == ReduceOp::kSum) {
        for (int64_t i = 0; i < length; ++i) {
          if constexpr (std::is_integral_v<Acc>) {  // unsigned arithmetic: wraps, never UB
            acc[i] = Acc(uint64_t(acc[i]) + uint64_t(load(source[i])));
          } else {
            acc[i] += load(source[i]);
          }
        }
      } else {
        for (int64_t i = 0; i < length; ++i) {
          Acc value = load(source[i]);
          if (value > acc[i] || value != value) acc[i] = value;  // a NaN anywhere wins
        }
      }
    }
    for (int64_t i = 0; i < length; ++i) out[start + i] = store<T>(acc[i]);
  }
}

int64_t trailing_elements(const Tensor& tensor) {
  int64_t elements = 1;
  for (int axis = 1; axis < tensor.ndim(); ++axis) elements *= tensor.shape()[size_t(axis)];
  return elements;
}

Shape with_rows(const Tensor& tensor, int64_t rows) {
  Shape shape = tensor.shape();
  shape[0] = rows;
  return shape;
}

void check_rows_tensor(const Tensor& tensor, const char* what) {
  MOE_CHECK(tensor.defined(), what, " is an undefined tensor");
  MOE_CHECK(tensor.ndim() >= 1, what, " must have at least one dimension (rows), got shape ",
            shape_string(tensor.shape()));
}

void check_rows_list(std::span<const int64_t> rows, int group_size, const char* what) {
  std::vector<int64_t> listed(rows.begin(), rows.end());
  MOE_CHECK(int(rows.size()) == group_size, what, " must have one entry per rank (", group_size,
            "), got ", detail::list_text(listed));
  MOE_CHECK(std::all_of(rows.begin(), rows.end(), [](int64_t r) { return r >= 0; }), what,
            " must not be negative, got ", detail::list_text(listed));
}

int64_t sum_of(std::span<const int64_t> values) {
  return std::accumulate(values.begin(), values.end(), int64_t(0));
}

// Runs the boundary checks, which fill in `mine`; a failure still takes part in the announcement
// so that every rank raises an error instead of waiting for this one.
template <class Checks>
std::vector<Announcement> checked_announce(const Call& call, Announcement& mine, bool rows_agree,
                                           Checks&& checks) {
  std::string problem;
  try {
    checks();
  } catch (const Error& error) {
    problem = error.what();
  }
  return detail::announce(call, mine, rows_agree, problem);
}

// Fails on every rank unless every rank passed the same per-rank list (`first`).
void require_same_lists(const Call& call, const std::vector<Announcement>& all, const char* what) {
  for (size_t peer = 1; peer < all.size(); ++peer) {
    if (all[peer].first != all[0].first) {
      call.fail(moe::detail::concat(
          "ranks pass different ", what, ": rank 0 passes ", detail::list_text(all[0].first), ", ",
          call.peer_name(int(peer)), " passes ", detail::list_text(all[peer].first)));
    }
  }
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> offsets(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
  return offsets;
}

char* byte_at(void* base, int64_t units, size_t unit_bytes) {
  return static_cast<char*>(base) + size_t(units) * unit_bytes;
}

// Every rank r contributes rows_per_rank[r] rows (`local`); `out` gets them all in rank order.
void gather_blocks(const Call& call, const void* local, void* out,
                   const std::vector<int64_t>& rows_per_rank, size_t row_bytes,
                   const std::string& call_text, std::vector<Tensor> buffers) {
  const std::vector<int64_t> offsets = offsets_of(rows_per_rank);
  const int me = call.rank();
  std::vector<Transfer> sends, receives;
  for (int peer = 0; peer < call.size(); ++peer) {
    sends.push_back({peer, const_cast<void*>(local), rows_per_rank[size_t(me)]});
    receives.push_back(
        {peer, byte_at(out, offsets[size_t(peer)], row_bytes), rows_per_rank[size_t(peer)]});
  }
  detail::exchange(call, sends, receives, row_bytes, "rows", call_text, std::move(buffers));
}

// Rank r receives block r of every rank's `in` (block sizes `elements_per_rank`, in elements)
// and reduces them in rank order into `out`. Blocks go in rounds of at most kRoundBytes of
// receive space, which the group keeps between calls; the rounds do not change the result.
constexpr size_t kRoundBytes = size_t(32) << 20;

void reduce_scatter_blocks(const Call& call, const Tensor& in, void* out,
                           const std::vector<int64_t>& elements_per_rank, ReduceOp op,
                           const std::string& call_text) {
  const std::vector<int64_t> offsets = offsets_of(elements_per_rank);
  const int size = call.size();
  const int64_t mine = elements_per_rank[size_t(call.rank())];
  const size_t element_bytes = dtype_size(in.dtype());
  const int64_t largest = *std::max_element(elements_per_rank.begin(), elements_per_rank.end());
  if (largest == 0) return;
  const int64_t round_elements =
      std::clamp<int64_t>(int64_t(kRoundBytes / (element_bytes * size_t(size))), 1, largest);
  Tensor space = call.scratch_space(size_t(size * round_elements) * element_bytes);
  void* source = const_cast<void*>(in.raw());
  for (int64_t begin = 0; begin < largest; begin += round_elements) {
    auto part = [&](int64_t block) {
      return std::clamp<int64_t>(block - begin, 0, round_elements);
    };
    const int64_t my_part = part(mine);
    std::vector<Transfer> sends, receives;
    for (int peer = 0; peer < size; ++peer) {
      sends.push_back({peer, byte_at(source, offsets[size_t(peer)] + begin, element_bytes),
                       part(elements_per_rank[size_t(peer)])});
      receives.push_back(
          {peer, byte_at(space.raw(), int64_t(peer) * my_part, element_bytes), my_part});
    }
    detail::exchange(call, sends, receives, element_bytes, "elements", call_text, {in, space});
    dispatch_any(in.dtype(), "reduce_scatter", [&](auto zero) {
      using T = decltype(zero);
      reduce_in_rank_order(static_cast<const T*>(space.raw()), size, my_part, op,
                           static_cast<T*>(out) + begin);
    });
  }
}

// Broadcasts of at least this many bytes to more than 2 ranks go as scatter + all-gather.
constexpr size_t kScatterBroadcastBytes = size_t(1) << 20;

Announcement announcement(Kind kind, const Tensor& tensor, int64_t rows, int64_t option = 0) {
  Announcement a;
  a.kind = kind;
  a.dtype = int64_t(tensor.dtype());
  a.row_elems = tensor.ndim() >= 1 ? trailing_elements(tensor) : 1;
  a.rows = rows;
  a.option = option;
  return a;
}

}  // namespace

std::vector<int64_t> even_split(int64_t n, int parts) {
  std::vector<int64_t> sizes(static_cast<size_t>(parts));
  for (int r = 0; r < parts; ++r) sizes[size_t(r)] = n * (r + 1) / parts - n * r / parts;
  return sizes;
}

void all_reduce(Tensor& tensor, const ProcessGroup& group, ReduceOp op) {
  Call call("all_reduce", group);
  Announcement mine;
  checked_announce(call, mine, true, [&] {
    MOE_CHECK(tensor.defined(), "the tensor is undefined");
    mine = announcement(Kind::kAllReduce, tensor, tensor.numel(), int64_t(op));
    mine.row_elems = 1;
  });
  const int size = call.size();
  if (size == 1 || tensor.numel() == 0) return;
  // Rank r owns elements [n*r/size, n*(r+1)/size): it reduces them, then everyone gathers.
  const int64_t n = tensor.numel();
  const std::vector<int64_t> chunk = even_split(n, size);
  const size_t element_bytes = dtype_size(tensor.dtype());
  const int64_t my_offset = n * call.rank() / size;
  void* my_chunk = byte_at(tensor.raw(), my_offset, element_bytes);
  const std::string text = describe(mine);
  reduce_scatter_blocks(call, tensor, my_chunk, chunk, op, text);
  gather_blocks(call, my_chunk, tensor.raw(), chunk, element_bytes, text, {tensor});
}

void all_gather(const Tensor& local, Tensor& out, const ProcessGroup& group) {
  Call call("all_gather", group);
  Announcement mine;
  checked_announce(call, mine, true, [&] {
    check_rows_tensor(local, "local");
    check_rows_tensor(out, "out");
    check_dtype(out, local.dtype(), "all_gather out");
    check_shape(out, with_rows(local, local.dim(0) * group.size()), "all_gather out");
    mine = announcement(Kind::kAllGather, local, local.dim(0));
  });
  std::vector<int64_t> rows(size_t(call.size()), local.dim(0));
  gather_blocks(call, local.raw(), out.raw(), rows,
                size_t(mine.row_elems) * dtype_size(local.dtype()), describe(mine), {local, out});
}

void all_gather_v(const Tensor& local, Tensor& out, std::span<const int64_t> rows_per_rank,
                  const ProcessGroup& group) {
  Call call("all_gather_v", group);
  Announcement mine;
  auto all = checked_announce(call, mine, false, [&] {
    check_rows_tensor(local, "local");
    check_rows_tensor(out, "out");
    check_rows_list(rows_per_rank, group.size(), "rows_per_rank");
    MOE_CHECK(local.dim(0) == rows_per_rank[size_t(group.rank())], "local has ", local.dim(0),
              " rows but rows_per_rank[", group.rank(), "] is ",
              rows_per_rank[size_t(group.rank())]);
    check_dtype(out, local.dtype(), "all_gather_v out");
    check_shape(out, with_rows(local, sum_of(rows_per_rank)), "all_gather_v out");
    mine = announcement(Kind::kAllGatherV, local, local.dim(0));
    mine.first.assign(rows_per_rank.begin(), rows_per_rank.end());
  });
  require_same_lists(call, all, "rows_per_rank");
  gather_blocks(call, local.raw(), out.raw(), mine.first,
                size_t(mine.row_elems) * dtype_size(local.dtype()), describe(mine), {local, out});
}

void reduce_scatter(const Tensor& in, Tensor& out, const ProcessGroup& group, ReduceOp op) {
  Call call("reduce_scatter", group);
  Announcement mine;
  checked_announce(call, mine, true, [&] {
    check_rows_tensor(in, "in");
    check_rows_tensor(out, "out");
    check_dtype(out, in.dtype(), "reduce_scatter out");
    MOE_CHECK(in.dim(0) % group.size() == 0, "in has ", in.dim(0), " rows, which the group size ",
              group.size(), " does not divide");
    check_shape(out, with_rows(in, in.dim(0) / group.size()), "reduce_scatter out");
    mine = announcement(Kind::kReduceScatter, in, in.dim(0), int64_t(op));
  });
  std::vector<int64_t> elements(size_t(call.size()), out.numel());
  reduce_scatter_blocks(call, in, out.raw(), elements, op, describe(mine));
}

void reduce_scatter_v(const Tensor& in, Tensor& out, std::span<const int64_t> rows_per_rank,
                      const ProcessGroup& group) {
  Call call("reduce_scatter_v", group);
  Announcement mine;
  auto all = checked_announce(call, mine, true, [&] {
    check_rows_tensor(in, "in");
    check_rows_tensor(out, "out");
    check_rows_list(rows_per_rank, group.size(), "rows_per_rank");
    check_dtype(out, in.dtype(), "reduce_scatter_v out");
    MOE_CHECK(in.dim(0) == sum_of(rows_per_rank), "in has ", in.dim(0),
              " rows but rows_per_rank sums to ", sum_of(rows_per_rank));
    check_shape(out, with_rows(in, rows_per_rank[size_t(group.rank())]), "reduce_scatter_v out");
    mine = announcement(Kind::kReduceScatterV, in, in.dim(0), int64_t(ReduceOp::kSum));
    mine.first.assign(rows_per_rank.begin(), rows_per_rank.end());
  });
  require_same_lists(call, all, "rows_per_rank");
  std::vector<int64_t> elements = mine.first;
  for (int64_t& e : elements) e *= mine.row_elems;
  reduce_scatter_blocks(call, in, out.raw(), elements, ReduceOp::kSum, describe(mine));
}

void all_to_all_v(const Tensor& send, std::span<const int64_t> send_rows, Tensor& recv,
                  std::span<const int64_t> recv_rows, const ProcessGroup& group) {
  fault_point("alltoall");
  Call call("all_to_all_v", group);
  Announcement mine;
  auto all = checked_announce(call, mine, false, [&] {
    check_rows_tensor(send, "send");
    check_rows_tensor(recv, "recv");
    check_rows_list(send_rows, group.size(), "send_rows");
    check_rows_list(recv_rows, group.size(), "recv_rows");
    check_dtype(recv, send.dtype(), "all_to_all_v recv");
    MOE_CHECK(send.dim(0) == sum_of(send_rows), "send has ", send.dim(0),
              " rows but send_rows sums to ", sum_of(send_rows));
    check_shape(recv, with_rows(send, sum_of(recv_rows)), "all_to_all_v recv");
    mine = announcement(Kind::kAllToAllV, send, send.dim(0));
    mine.first.assign(send_rows.begin(), send_rows.end());
    mine.second.assign(recv_rows.begin(), recv_rows.end());
  });
  // What i sends to j must be what j expects from i, checked for every pair on every rank.
  constexpr int kListedMismatches = 8;
  std::string mismatches;
  int mismatch_count = 0;
  for (size_t i = 0; i < all.size(); ++i) {
    for (size_t j = 0; j < all.size(); ++j) {
      int64_t sent = all[i].first[j], expected = all[j].second[i];
      if (sent == expected || ++mismatch_count > kListedMismatches) continue;
      mismatches += moe::detail::concat(mismatches.empty() ? "" : "; ", call.peer_name(int(i)),
                                        " sends ", sent, " rows to rank ", j, ", which expects ",
                                        expected, " rows from rank ", i);
    }
  }
  if (mismatch_count > kListedMismatches) {
    mismatches += moe::detail::concat("; and ", mismatch_count - kListedMismatches, " more");
  }
  if (mismatch_count > 0) call.fail("row counts disagree: " + mismatches);

  const size_t row_bytes = size_t(mine.row_elems) * dtype_size(send.dtype());
  const std::vector<int64_t> send_offsets = offsets_of(mine.first);
  const std::vector<int64_t> recv_offsets = offsets_of(mine.second);
  std::vector<Transfer> sends, receives;
  for (int peer = 0; peer < call.size(); ++peer) {
    sends.push_back({peer,
                     byte_at(const_cast<void*>(send.raw()), send_offsets[size_t(peer)], row_bytes),
                     mine.first[size_t(peer)]});
    receives.push_back({peer, byte_at(recv.raw(), recv_offsets[size_t(peer)], row_bytes),
                        mine.second[size_t(peer)]});
  }
  detail::exchange(call, sends, receives, row_bytes, "rows", describe(mine), {send, recv});
}

void broadcast(Tensor& tensor, int root, const ProcessGroup& group) {
  Call call("broadcast", group);
  Announcement mine;
  checked_announce(call, mine, true, [&] {
    MOE_CHECK(tensor.defined(), "the tensor is undefined");
    MOE_CHECK(root >= 0 && root < group.size(), "root ", root, " is not a rank of the group (size ",
              group.size(), ")");
    mine = announcement(Kind::kBroadcast, tensor, tensor.numel(), root);
    mine.row_elems = 1;
  });
  const int size = call.size();
  const size_t element_bytes = dtype_size(tensor.dtype());
  const std::string text = describe(mine);
  std::vector<Transfer> sends, receives;
  if (size <= 2 || tensor.nbytes() < kScatterBroadcastBytes) {
    // Small: the root sends the whole tensor to every rank.
    for (int peer = 0; peer < size; ++peer) {
      if (call.rank() == root && peer != root)
        sends.push_back({peer, tensor.raw(), tensor.numel()});
    }
    if (call.rank() != root) receives.push_back({root, tensor.raw(), tensor.numel()});
    detail::exchange(call, sends, receives, element_bytes, "elements", text, {tensor});
    return;
  }
  // Large: the root scatters one slice to each rank, then every rank gathers every slice, so the
  // root sends the tensor about once instead of size - 1 times.
  const int64_t n = tensor.numel();
  const std::vector<int64_t> slice = even_split(n, size);
  auto slice_start = [&](int r) { return byte_at(tensor.raw(), n * r / size, element_bytes); };
  for (int peer = 0; peer < size; ++peer) {
    if (call.rank() == root && peer != root) {
      sends.push_back({peer, slice_start(peer), slice[size_t(peer)]});
    }
  }
  if (call.rank() != root)
    receives.push_back({root, slice_start(call.rank()), slice[size_t(call.rank())]});
  detail::exchange(call, sends, receives, element_bytes, "elements", text, {tensor});
  gather_blocks(call, slice_start(call.rank()), tensor.raw(), slice, element_bytes, text, {tensor});
}

void barrier(const ProcessGroup& group) {
  Call call("barrier", group);
  detail::announce(call, Announcement{}, true);
}

std::string FailedRanks::list() const {
  std::string text;
  for (int rank : ranks) text += (text.empty() ? "" : ", ") + std::to_string(rank);
  return text;
}

FailedRanks gather_failed_ranks(bool failed, const ProcessGroup& group) {
  const int64_t flag = failed ? 1 : 0;
  const std::vector<int64_t> flags = all_gather_values({&flag, 1}, group);
  FailedRanks result;
  for (size_t r = 0; r < flags.size(); ++r) {
    if (flags[r] != 0) result.ranks.push_back(int(r));
  }
  return result;
}

std::vector<int64_t> all_gather_values(std::span<const int64_t> local, const ProcessGroup& group) {
  Call call("all_gather_values", group);
  Announcement mine;
  mine.kind = Kind::kAllGatherValues;
  mine.dtype = int64_t(DType::I64);
  mine.rows = int64_t(local.size());
  mine.option = int64_t(local.size());  // the option must agree: equal counts on every rank
  detail::announce(call, mine, true);
  Tensor source = Tensor::empty({int64_t(local.size())}, DType::I64);
  std::copy(local.begin(), local.end(), source.data<int64_t>());
  Tensor gathered = Tensor::empty({int64_t(local.size()) * call.size()}, DType::I64);
  gather_blocks(call, source.raw(), gathered.raw(),
                std::vector<int64_t>(size_t(call.size()), int64_t(local.size())), sizeof(int64_t),
                describe(mine), {source, gathered});
  const int64_t* values = gathered.data<int64_t>();
  return std::vector<int64_t>(values, values + gathered.numel());
}

// Point-to-point: a small header (dtype and shape) precedes the data on the same tag, so the
// receiver checks what arrives against what it expects before touching its tensor.
namespace {

constexpr int kMaxSendDims = 14;
constexpr int64_t kHeaderValues = 2 + kMaxSendDims;  // dtype, ndim, dims

std::string tensor_text(int64_t dtype, const Shape& shape) {
  return shape_string(shape) + " " +
         std::string(dtype >= 0 && dtype <= int64_t(DType::I64) ? dtype_name(DType(dtype))
                                                                : "unknown dtype");
}

void check_point_to_point(const Tensor& tensor, int peer, int tag, const ProcessGroup& group) {
  MOE_CHECK(tensor.defined(), "the tensor is undefined");
  MOE_CHECK(tensor.ndim() <= kMaxSendDims, "tensors of at most ", kMaxSendDims,
            " dimensions can be sent, got ", shape_string(tensor.shape()));
  MOE_CHECK(peer >= 0 && peer < group.size() && peer != group.rank(), "peer ", peer,
            " must be another rank of the group (size ", group.size(), ", this rank ", group.rank(),
            ")");
  MOE_CHECK(tag >= 0 && tag <= kMaxUserTag, "tag ", tag, " must lie in [0, ", kMaxUserTag, "]");
}

}  // namespace

namespace {

constexpr int kNoPeer = -1;

// Sends `outgoing` to `send_peer` and receives into `incoming` from `recv_peer` (either side may
// be absent: kNoPeer), headers first, then the data, each pair of messages posted together so that
// two ranks exchanging with each other cannot deadlock.
void point_to_point(const Call& call, const Tensor& outgoing, int send_peer, Tensor& incoming,
                    int recv_peer, int tag) {
  try {
    if (send_peer != kNoPeer) check_point_to_point(outgoing, send_peer, tag, call.group());
    if (recv_peer != kNoPeer) check_point_to_point(incoming, recv_peer, tag, call.group());
  } catch (const Error& error) {
    call.fail(error.what());
  }
  std::string text;
  Tensor out_header({kHeaderValues}, DType::I64), in_header({kHeaderValues}, DType::I64);
  std::vector<Transfer> header_sends, header_receives;
  if (send_peer != kNoPeer) {
    int64_t* values = out_header.data<int64_t>();
    values[0] = int64_t(outgoing.dtype());
    values[1] = outgoing.ndim();
    std::copy(outgoing.shape().begin(), outgoing.shape().end(), values + 2);
    header_sends.push_back({send_peer, out_header.raw(), kHeaderValues});
    text = moe::detail::concat("send of ", tensor_text(values[0], outgoing.shape()), " to rank ",
                               send_peer);
  }
  const std::string expected = tensor_text(int64_t(incoming.dtype()), incoming.shape());
  if (recv_peer != kNoPeer) {
    header_receives.push_back({recv_peer, in_header.raw(), kHeaderValues});
    text += moe::detail::concat(text.empty() ? "" : ", ", "recv of ", expected, " from rank ",
                                recv_peer);
  }
  text += moe::detail::concat(" with tag ", tag);
  detail::exchange(call, header_sends, header_receives, sizeof(int64_t), "header values", text,
                   {out_header, in_header}, tag);

  // The data. What arrives is checked against what this rank expects; on a mismatch the data
  // still goes into a scratch tensor, so that the channel stays in step for later messages.
  const int64_t* values = in_header.data<int64_t>();
  const int64_t dtype = values[0];
  const Shape shape(values + 2, values + 2 + std::clamp<int64_t>(values[1], 0, kMaxSendDims));
  const bool matches =
      recv_peer == kNoPeer || (dtype == int64_t(incoming.dtype()) && shape == incoming.shape());
  const bool known_dtype = dtype >= 0 && dtype <= int64_t(DType::I64);
  Tensor target = matches || !known_dtype ? incoming : Tensor::empty(shape, DType(dtype));
  std::vector<Transfer> sends, receives;
  if (send_peer != kNoPeer) {
    sends.push_back({send_peer, const_cast<void*>(outgoing.raw()), int64_t(outgoing.nbytes())});
  }
  if (recv_peer != kNoPeer && (matches || known_dtype)) {
    receives.push_back({recv_peer, target.raw(), int64_t(target.nbytes())});
  }
  detail::exchange(call, sends, receives, 1, "bytes", text, {outgoing, target}, tag);
  if (!matches) {
    call.fail(moe::detail::concat(call.peer_name(recv_peer), " sends ", tensor_text(dtype, shape),
                                  " with tag ", tag, ", but this rank expects ", expected));
  }
}

}  // namespace

void send(const Tensor& tensor, int peer, int tag, const ProcessGroup& group) {
  Tensor none;
  point_to_point(Call("send", group), tensor, peer, none, kNoPeer, tag);
}

void recv(Tensor& tensor, int peer, int tag, const ProcessGroup& group) {
  point_to_point(Call("recv", group), Tensor(), kNoPeer, tensor, peer, tag);
}

void send_recv(const Tensor& outgoing, int send_peer, Tensor& incoming, int recv_peer, int tag,
               const ProcessGroup& group) {
  point_to_point(Call("send_recv", group), outgoing, send_peer, incoming, recv_peer, tag);
}

}  // namespace moe::comm

#include "moe/dispatcher_common.h"

#include <cstring>
#include <iterator>
#include <optional>
#include <string>

#include "moe/internal.h"
#include "moe/moe/ep_dispatchers.h"

namespace moe::ep_detail {
namespace {

// A value every rank of the group must agree on, and how a message shows it.
struct AgreedField {
  const char* name;
  int64_t value;
  std::string (*show)(int64_t);
};

std::string show_number(int64_t value) {
  return std::to_string(value);
}
std::string show_dtype(int64_t value) {
  return std::string(dtype_name(DType(value)));
}
std::string show_dispatcher(int64_t value) {
  return std::string(name_of(TokenDispatcherType(value)));
}
std::string show_router_type(int64_t value) {
  return std::string(name_of(RouterType(value)));
}
std::string show_policy(int64_t value) {
  return std::string(name_of(TokenDropPolicy(value)));
}
std::string show_scope(int64_t value) {
  return std::string(name_of(CapacityScope(value)));
}
// Capacity factors travel as the bits of the double; -1 bits stand for "dropless".
int64_t capacity_bits(const std::optional<double>& factor) {
  int64_t bits = -1;
  if (factor) std::memcpy(&bits, &*factor, sizeof(bits));
  return bits;
}
std::string show_capacity(int64_t bits) {
  if (bits == -1) return "none";
  double factor = 0;
  std::memcpy(&factor, &bits, sizeof(factor));
  return detail::concat(factor);
}

}  // namespace

ExpertPlacement expert_parallel_setup(const char* who, const MoEConfig& config,
                                      const comm::ParallelState& parallel) {
  config.validate();
  MOE_CHECK(parallel.tp_ep_group.size() == parallel.ep_group.size() * parallel.etp_group.size(),
            who, ": the tp-ep group has ", parallel.tp_ep_group.size(), " ranks, not ep (",
            parallel.ep_group.size(), ") x etp (", parallel.etp_group.size(), ")");
  MOE_CHECK(config.expert_ffn_hidden_size() % parallel.etp_group.size() == 0, who,
            ": the expert ffn size (", config.expert_ffn_hidden_size(),
            ") is not divisible by expert_tensor_parallel_size (", parallel.etp_group.size(), ")");
  ExpertPlacement placement = expert_parallel_placement(
      config.num_experts, parallel.ep_group.size(), parallel.ep_group.rank());
  placement.tp_rank = parallel.etp_group.rank();
  placement.tp_size = parallel.etp_group.size();
  return placement;
}

GroupBatch agree_on_batch(const char* who, const Tensor& hidden, const Routing& routing,
                          const MoEConfig& config, const comm::ProcessGroup& group) {
  // The local checks' verdict travels with the header, so a bad argument on one rank raises an
  // error on every rank instead of leaving the others waiting in the next exchange.
  std::string local_error;
  std::vector<int64_t> slots_per_expert(size_t(config.num_experts), 0);
  try {
    check_ndim(hidden, 2, detail::concat(who, " hidden"));
    MOE_CHECK(hidden.dim(0) == routing.num_tokens, who, ": hidden ", shape_string(hidden.shape()),
              " has ", hidden.dim(0), " tokens but the routing has ", routing.num_tokens);
    MOE_CHECK(routing.topk == config.routing_slots(), who, ": the routing has ", routing.topk,
              " slots per token but the ", name_of(config.moe_router_type), " router gives ",
              config.routing_slots());
    check_shape(routing.experts, {routing.num_tokens, config.routing_slots()},
                detail::concat(who, " routing experts"));
    check_shape(routing.probs, {routing.num_tokens, config.routing_slots()},
                detail::concat(who, " routing probs"));
    check_dtype(routing.probs, internal::compute_dtype_for(hidden.dtype()),
                detail::concat(who, " routing probs"));
    check_dtype(routing.experts, DType::I32, detail::concat(who, " routing experts"));
    const int32_t* ids = routing.experts.data<int32_t>();
    for (int64_t slot = 0; slot < routing.experts.numel(); ++slot) {
      MOE_CHECK(ids[slot] >= 0 && ids[slot] < config.num_experts, who, ": token ",
                slot / routing.topk, " slot ", slot % routing.topk, " names expert ", ids[slot],
                ", outside [0, ", config.num_experts, ")");
      ++slots_per_expert[size_t(ids[slot])];
    }
  } catch (const Error& error) {
    local_error = error.what();
  }
  const bool valid = local_error.empty();
  // Field 0: the arguments passed the local checks; 1: token count (may differ); then the values
  // that must agree.
  const AgreedField agreed[] = {
      {"hidden size", valid ? hidden.dim(1) : 0, show_number},
      {"activation dtype", int64_t(hidden.dtype()), show_dtype},
      {"token dispatcher", int64_t(config.moe_token_dispatcher_type), show_dispatcher},
      {"moe_router_type", int64_t(config.moe_router_type), show_router_type},
      {"moe_router_topk", config.moe_router_topk, show_number},
      {"moe_expert_capacity_factor", capacity_bits(config.moe_expert_capacity_factor),
       show_capacity},
      {"moe_pad_expert_input_to_capacity", config.moe_pad_expert_input_to_capacity, show_number},
      {"moe_token_drop_policy", int64_t(config.moe_token_drop_policy), show_policy},
      {"moe_capacity_scope", int64_t(config.moe_capacity_scope), show_scope},
  };
  // Then the slots per expert: one exchange carries the agreement and the counts, and its length
  // (the fields and num_experts counts) is checked by the collectives layer, so ranks with
  // different num_experts meet its size mismatch error.
  constexpr size_t kLeading = 2, kAgreed = kLeading + std::size(agreed);
  const size_t fields = kAgreed + slots_per_expert.size();  // per rank
  std::vector<int64_t> local = {valid, valid ? hidden.dim(0) : 0};
  for (const AgreedField& field : agreed) local.push_back(field.value);
  local.insert(local.end(), slots_per_expert.begin(), slots_per_expert.end());
  const std::vector<int64_t> header = comm::all_gather_values(local, group);
  if (!valid) throw Error(local_error);
  for (int r = 0; r < group.size(); ++r) {
    MOE_CHECK(header[size_t(r) * fields] == 1, who, ": rank ", r, " of group '", group.name(),
              "' (world rank ", group.world_ranks()[size_t(r)],
              ") rejected its arguments; see its error");
  }
  for (size_t i = 0; i < std::size(agreed); ++i) {
    const size_t column = kLeading + i;
    bool differ = false;
    for (int r = 1; r < group.size(); ++r) {
      differ |= header[size_t(r) * fields + column] != header[column];
    }
    if (!differ) continue;
    std::string values;
    for (int r = 0; r < group.size(); ++r) {
      values += detail::concat(r ? ", " : "", "rank ", r, ": ",
                               agreed[i].show(header[size_t(r) * fields + column]));
    }
    throw Error(detail::concat(who, ": the ranks of group '", group.name(), "' disagree on the ",
                               agreed[i].name, " (", values, ")"));
  }
  GroupBatch batch;
  for (int r = 0; r < group.size(); ++r) {
    const int64_t tokens = header[size_t(r) * fields + 1];
    if (r == group.rank()) batch.first_token = batch.total_tokens;
    batch.tokens_per_rank.push_back(tokens);
    batch.total_tokens += tokens;
    const auto counts = header.begin() + long(size_t(r) * fields + kAgreed);
    batch.slots_per_expert.insert(batch.slots_per_expert.end(), counts,
                                  counts + config.num_experts);
  }
  return batch;
}

Routing gather_routing(const Routing& local, const GroupBatch& batch,
                       const comm::ProcessGroup& group) {
  Routing global;
  global.num_tokens = batch.total_tokens;
  global.topk = local.topk;
  global.experts = Tensor::empty({batch.total_tokens, local.topk}, DType::I32);
  global.probs = Tensor::empty({batch.total_tokens, local.topk}, local.probs.dtype());
  comm::all_gather_v(local.experts, global.experts, batch.tokens_per_rank, group);
  comm::all_gather_v(local.probs, global.probs, batch.tokens_per_rank, group);
  return global;
}

void gather_rows(const Tensor& src, std::span<const int64_t> source_of_row, Tensor& dst) {
  check_ndim(src, 2, "gather_rows source");
  check_shape(dst, {int64_t(source_of_row.size()), src.dim(1)}, "gather_rows destination");
  check_dtype(dst, src.dtype(), "gather_rows destination");
  const size_t row_bytes = size_t(src.dim(1)) * dtype_size(src.dtype());
  const auto* from = static_cast<const char*>(src.raw());
  auto* to = static_cast<char*>(dst.raw());
  const int64_t rows = dst.dim(0);
  for (int64_t source : source_of_row) {
    MOE_CHECK(source < src.dim(0), "gather_rows: source row ", source, " of ", src.dim(0));
  }
#pragma omp parallel for schedule(static) if (int64_t(row_bytes) * rows > (int64_t(1) << 20))
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t source = source_of_row[size_t(i)];
    if (source < 0) {
      std::memset(to + size_t(i) * row_bytes, 0, row_bytes);
    } else {
      std::memcpy(to + size_t(i) * row_bytes, from + size_t(source) * row_bytes, row_bytes);
    }
  }
}

void check_expert_rows(const Tensor& rows, int64_t num_rows, const DispatchContext& ctx,
                       const char* what) {
  check_shape(rows, {num_rows, ctx.hidden_size}, what);
  check_dtype(rows, ctx.dtype, what);
}

}  // namespace moe::ep_detail

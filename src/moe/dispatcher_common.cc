#include "moe/dispatcher_common.h"

#include <cstring>
#include <functional>
#include <string>

#include "moe/internal.h"
#include "moe/moe/ep_dispatchers.h"

namespace moe::ep_detail {
namespace {

// "rank 0: 8, rank 1: 12" when the ranks' values differ; empty when they agree.
std::string disagreement(const std::vector<int64_t>& header, size_t fields, size_t field,
                         const std::function<std::string(int64_t)>& show) {
  const size_t ranks = header.size() / fields;
  bool differ = false;
  for (size_t r = 1; r < ranks; ++r) differ |= header[r * fields + field] != header[field];
  if (!differ) return {};
  std::string text;
  for (size_t r = 0; r < ranks; ++r) {
    text += detail::concat(r ? ", " : "", "rank ", r, ": ", show(header[r * fields + field]));
  }
  return text;
}

}  // namespace

ExpertPlacement expert_parallel_setup(const char* who, const MoEConfig& config,
                                      const comm::ParallelState& parallel) {
  config.validate();
  MOE_CHECK(parallel.sizes.etp == 1, who, ": expert tensor parallelism (etp = ", parallel.sizes.etp,
            ") is not supported: the experts are not split over the etp group; use etp = 1");
  MOE_CHECK(parallel.tp_ep.size() == parallel.ep_group.size(), who, ": the tp-ep group has ",
            parallel.tp_ep.size(), " ranks but the ep group has ", parallel.ep_group.size());
  return expert_parallel_placement(config.num_experts, parallel.ep_group.size(),
                                   parallel.ep_group.rank());
}

GroupBatch agree_on_batch(const char* who, const Tensor& hidden, const Routing& routing,
                          const MoEConfig& config, const comm::ProcessGroup& group) {
  check_ndim(hidden, 2, detail::concat(who, " hidden"));
  MOE_CHECK(hidden.dim(0) == routing.num_tokens, who, ": hidden ", shape_string(hidden.shape()),
            " has ", hidden.dim(0), " tokens but the routing has ", routing.num_tokens);
  check_shape(routing.experts, {routing.num_tokens, config.moe_router_topk},
              detail::concat(who, " routing experts"));
  check_shape(routing.probs, {routing.num_tokens, config.moe_router_topk},
              detail::concat(who, " routing probs"));
  check_dtype(routing.probs, internal::compute_dtype_for(hidden.dtype()),
              detail::concat(who, " routing probs"));
  constexpr size_t kFields = 4;  // tokens, hidden size, topk, dtype
  const int64_t local[kFields] = {hidden.dim(0), hidden.dim(1), routing.topk,
                                  int64_t(hidden.dtype())};
  const std::vector<int64_t> header = comm::all_gather_values(local, group);
  const auto number = [](int64_t value) { return std::to_string(value); };
  const auto dtype = [](int64_t value) { return std::string(dtype_name(DType(value))); };
  const std::pair<const char*, std::function<std::string(int64_t)>> checked[] = {
      {"hidden size", number}, {"top-k", number}, {"activation dtype", dtype}};
  for (size_t field = 1; field < kFields; ++field) {
    const std::string text = disagreement(header, kFields, field, checked[field - 1].second);
    MOE_CHECK(text.empty(), who, ": the ranks of group '", group.name(), "' disagree on the ",
              checked[field - 1].first, " (", text, ")");
  }
  GroupBatch batch;
  for (int r = 0; r < group.size(); ++r) {
    const int64_t tokens = header[size_t(r) * kFields];
    if (r == group.rank()) batch.first_token = batch.total_tokens;
    batch.tokens_per_rank.push_back(tokens);
    batch.total_tokens += tokens;
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

CapacityDecision decide_group_capacity(const MoEConfig& config, const Routing& local,
                                       const GroupBatch& batch, const comm::ProcessGroup& group) {
  if (!config.moe_expert_capacity_factor) return {};
  CapacityDecision global = decide_capacity(config, gather_routing(local, batch, group));
  const auto first = global.keep.begin() + batch.first_token * local.topk;
  CapacityDecision mine;
  mine.keep.assign(first, first + local.num_tokens * local.topk);
  mine.pad_rows_to = global.pad_rows_to;
  return mine;
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

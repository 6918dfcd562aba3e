// Permutation bookkeeping (counting sort by expert) and the fused row kernels. Rows are
// independent in permute_rows and tokens are independent in unpermute_rows(_backward), so
// OpenMP over them gives the same bits for any thread count.
#include "moe/moe/permutation.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "moe/home_rows.h"
#include "moe/internal.h"
#include "tensor/dtype_switch.h"

namespace moe {
namespace {

void check_experts_tensor(const Tensor& experts, const char* what) {
  check_ndim(experts, 2, what);
  check_dtype(experts, DType::I32, what);
}

void check_plan_args(const Tensor& experts, int64_t num_experts, int64_t first_expert,
                     int64_t num_local_experts, const std::vector<uint8_t>& keep,
                     int64_t pad_rows_to) {
  check_experts_tensor(experts, "build_dispatch_plan experts");
  MOE_CHECK(first_expert >= 0 && num_local_experts >= 0 &&
                first_expert + num_local_experts <= num_experts,
            "build_dispatch_plan: local experts [", first_expert, ", ",
            first_expert + num_local_experts, ") are not inside [0, ", num_experts, ")");
  MOE_CHECK(keep.empty() || int64_t(keep.size()) == experts.numel(),
            "build_dispatch_plan: keep has ", keep.size(), " flags for ", experts.numel(),
            " slots");
  MOE_CHECK(pad_rows_to >= 0, "build_dispatch_plan: pad_rows_to (", pad_rows_to, ") must be >= 0");
  const int32_t* ids = experts.data<int32_t>();
  for (int64_t i = 0; i < experts.numel(); ++i) {
    MOE_CHECK(ids[i] >= 0 && ids[i] < num_experts, "build_dispatch_plan: token ",
              i / experts.dim(1), " slot ", i % experts.dim(1), " names expert ", ids[i],
              ", outside [0, ", num_experts, ")");
  }
}

// The plan whose rows are the per-expert slot lists in order, padding each list to pad_rows_to.
DispatchPlan make_plan(const Tensor& experts, int64_t first_expert,
                       const std::vector<std::vector<int64_t>>& slots_per_expert,
                       int64_t pad_rows_to) {
  DispatchPlan plan;
  plan.num_tokens = experts.dim(0);
  plan.topk = experts.dim(1);
  plan.first_expert = first_expert;
  plan.row_of_slot.assign(size_t(plan.num_tokens * plan.topk), -1);
  plan.rows_per_expert.clear();
  plan.slot_of_row.clear();
  for (size_t e = 0; e < slots_per_expert.size(); ++e) {
    const auto& slots = slots_per_expert[e];
    MOE_CHECK(pad_rows_to == 0 || int64_t(slots.size()) <= pad_rows_to, "dispatch plan: expert ",
              plan.first_expert + int64_t(e), " keeps ", slots.size(),
              " tokens, more than the padded size ", pad_rows_to);
    for (int64_t slot : slots) {
      plan.row_of_slot[size_t(slot)] = int64_t(plan.slot_of_row.size());
      plan.slot_of_row.push_back(slot);
    }
    int64_t rows = pad_rows_to > 0 ? pad_rows_to : int64_t(slots.size());
    plan.slot_of_row.resize(plan.slot_of_row.size() + size_t(rows - int64_t(slots.size())), -1);
    plan.rows_per_expert.push_back(rows);
  }
  return plan;
}

void check_rows_kernel_args(const Tensor& token_side, const Tensor& row_side,
                            const DispatchPlan& plan, const Tensor& slot_weights,
                            const char* what) {
  check_ndim(token_side, 2, detail::concat(what, " token-order tensor"));
  check_ndim(row_side, 2, detail::concat(what, " expert-order tensor"));
  MOE_CHECK(token_side.dim(0) == plan.num_tokens, what, ": token-order tensor ",
            shape_string(token_side.shape()), " has ", token_side.dim(0), " rows but the plan has ",
            plan.num_tokens, " tokens");
  MOE_CHECK(row_side.dim(0) == plan.num_rows(), what, ": expert-order tensor ",
            shape_string(row_side.shape()), " has ", row_side.dim(0), " rows but the plan has ",
            plan.num_rows(), " rows");
  MOE_CHECK(token_side.dim(1) == row_side.dim(1), what, ": widths differ, ",
            shape_string(token_side.shape()), " vs ", shape_string(row_side.shape()));
  MOE_CHECK(token_side.dtype() == row_side.dtype(), what, ": dtypes differ, ",
            dtype_name(token_side.dtype()), " vs ", dtype_name(row_side.dtype()));
  if (slot_weights.defined()) {
    check_shape(slot_weights, {plan.num_tokens, plan.topk}, detail::concat(what, " weights"));
    check_dtype(slot_weights, internal::compute_dtype_for(token_side.dtype()),
                detail::concat(what, " weights"));
  }
}

}  // namespace

std::vector<int64_t> unpadded_rows_per_expert(const DispatchPlan& plan) {
  std::vector<int64_t> counts(plan.rows_per_expert.size(), 0);
  int64_t row = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    for (int64_t end = row + plan.rows_per_expert[e]; row < end; ++row) {
      counts[e] += plan.slot_of_row[size_t(row)] >= 0 ? 1 : 0;
    }
  }
  return counts;
}

DispatchPlan build_dispatch_plan(const Tensor& experts, int64_t num_experts, int64_t first_expert,
                                 int64_t num_local_experts, const std::vector<uint8_t>& keep,
                                 int64_t pad_rows_to) {
  check_plan_args(experts, num_experts, first_expert, num_local_experts, keep, pad_rows_to);
  // Counting sort by expert: a token picks an expert at most once, so visiting slots in token
  // order leaves every expert's rows in token order.
  const int32_t* ids = experts.data<int32_t>();
  std::vector<std::vector<int64_t>> slots_per_expert(static_cast<size_t>(num_local_experts));
  for (int64_t s = 0; s < experts.numel(); ++s) {
    int64_t local = ids[s] - first_expert;
    if (local < 0 || local >= num_local_experts || (!keep.empty() && !keep[size_t(s)])) continue;
    slots_per_expert[size_t(local)].push_back(s);
  }
  return make_plan(experts, first_expert, slots_per_expert, pad_rows_to);
}

void permute_rows(const Tensor& hidden, const DispatchPlan& plan, const Tensor& slot_weights,
                  Tensor& rows) {
  check_rows_kernel_args(hidden, rows, plan, slot_weights, "permute_rows");
  const int64_t H = hidden.dim(1), K = plan.topk, R = plan.num_rows();
  dispatch_floating(hidden.dtype(), "permute_rows", [&](auto tag) {
    using T = decltype(tag);
    using W = compute_t<T>;
    const T* in = hidden.data<T>();
    T* out = rows.data<T>();
    const W* weights = slot_weights.defined() ? slot_weights.data<W>() : nullptr;
#pragma omp parallel for schedule(static) if (R * H > 32768)
    for (int64_t r = 0; r < R; ++r) {
      int64_t slot = plan.slot_of_row[size_t(r)];
      T* target = out + r * H;
      if (slot < 0) {
        std::memset(static_cast<void*>(target), 0, size_t(H) * sizeof(T));
        continue;
      }
      const T* source = in + (slot / K) * H;
      if (!weights) {
        std::memcpy(static_cast<void*>(target), source, size_t(H) * sizeof(T));
        continue;
      }
      W w = weights[slot];
      for (int64_t h = 0; h < H; ++h) target[h] = store<T>(w * load(source[h]));
    }
  });
}

void unpermute_rows(const Tensor& rows, const DispatchPlan& plan, const Tensor& slot_weights,
                    Tensor& out) {
  check_rows_kernel_args(out, rows, plan, slot_weights, "unpermute_rows");
  const int64_t H = rows.dim(1), K = plan.topk, T = plan.num_tokens;
  dispatch_floating(rows.dtype(), "unpermute_rows", [&](auto tag) {
    using S = decltype(tag);
    using W = compute_t<S>;
    const S* in = rows.data<S>();
    S* result = out.data<S>();
    const W* weights = slot_weights.defined() ? slot_weights.data<W>() : nullptr;
#pragma omp parallel if (T * H > 32768)
    {
      std::vector<W> acc_buffer(static_cast<size_t>(H));
      W* __restrict acc = acc_buffer.data();
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) {
        bool first = true;
        for (int64_t j = 0; j < K; ++j) {  // slot order: a fixed summation order
          int64_t r = plan.row_of_slot[size_t(t * K + j)];
          if (r < 0) continue;
          const W w = weights ? weights[t * K + j] : W(1);
          const S* __restrict source = in + r * H;
          if (first) {
            // 0 + x, not x: a -0 product becomes +0, exactly as a sum from zero would.
            for (int64_t h = 0; h < H; ++h) acc[h] = W(0) + w * load(source[h]);
          } else {
            for (int64_t h = 0; h < H; ++h) acc[h] += w * load(source[h]);
          }
          first = false;
        }
        S* __restrict target = result + t * H;
        if (first) {  // no kept slot
          std::memset(static_cast<void*>(target), 0, size_t(H) * sizeof(S));
          continue;
        }
        for (int64_t h = 0; h < H; ++h) target[h] = store<S>(acc[h]);
      }
    }
  });
}

void unpermute_rows_backward(const Tensor& rows, const Tensor& grad_out, const DispatchPlan& plan,
                             const Tensor& slot_weights, Tensor& grad_rows, Tensor& grad_weights) {
  const char* what = "unpermute_rows_backward";
  check_rows_kernel_args(grad_out, rows, plan, slot_weights, what);
  check_same_shape(rows, grad_rows, "unpermute_rows_backward grad_rows");
  MOE_CHECK(grad_rows.dtype() == rows.dtype(), what, ": grad_rows dtype ",
            dtype_name(grad_rows.dtype()), " differs from rows ", dtype_name(rows.dtype()));
  check_shape(grad_weights, {plan.num_tokens, plan.topk}, "unpermute_rows_backward grad_weights");
  check_dtype(grad_weights, internal::compute_dtype_for(rows.dtype()),
              "unpermute_rows_backward grad_weights");
  const int64_t H = rows.dim(1), K = plan.topk, T = plan.num_tokens, R = plan.num_rows();
  dispatch_floating(rows.dtype(), what, [&](auto tag) {
    using S = decltype(tag);
    using W = compute_t<S>;
    const S* y = rows.data<S>();
    const S* dout = grad_out.data<S>();
    S* dy = grad_rows.data<S>();
    W* dw = grad_weights.data<W>();
    const W* weights = slot_weights.defined() ? slot_weights.data<W>() : nullptr;
    for (int64_t r = 0; r < R; ++r) {  // padding rows get no gradient
      if (plan.slot_of_row[size_t(r)] < 0) {
        std::memset(static_cast<void*>(dy + r * H), 0, size_t(H) * sizeof(S));
      }
    }
#pragma omp parallel for schedule(static) if (T * H > 32768)
    for (int64_t t = 0; t < T; ++t) {
      const S* g = dout + t * H;
      for (int64_t j = 0; j < K; ++j) {
        int64_t r = plan.row_of_slot[size_t(t * K + j)];
        if (r < 0) {
          dw[t * K + j] = W(0);
          continue;
        }
        W w = weights ? weights[t * K + j] : W(1);
        const S* y_row = y + r * H;
        S* dy_row = dy + r * H;
        W dot = 0;
        for (int64_t h = 0; h < H; ++h) {
          W g_h = load(g[h]);
          dot += load(y_row[h]) * g_h;
          dy_row[h] = store<S>(w * g_h);
        }
        dw[t * K + j] = dot;
      }
    }
  });
}

namespace internal {

Tensor combine_home_rows(const Tensor& home, DispatchContext& ctx) {
  Tensor out = Tensor::empty({ctx.plan.num_tokens, ctx.hidden_size}, ctx.dtype);  // [T, H]
  unpermute_rows(home, ctx.plan, ctx.routing.probs, out);
  ctx.combine_rows = home;  // d(probs) needs the rows that were combined
  return out;
}

Tensor combine_backward_home_rows(const char* who, const Tensor& grad_output, DispatchContext& ctx,
                                  Tensor& grad_probs) {
  MOE_CHECK(ctx.combine_rows.defined(), who, ": combine has not run for this micro-batch");
  const std::string what = std::string(who) + " grad_output";
  check_shape(grad_output, {ctx.plan.num_tokens, ctx.hidden_size}, what);
  check_dtype(grad_output, ctx.dtype, what);
  Tensor grad_home = Tensor::empty(ctx.combine_rows.shape(), ctx.dtype);  // [plan rows, H]
  unpermute_rows_backward(ctx.combine_rows, grad_output, ctx.plan, ctx.routing.probs, grad_home,
                          grad_probs);
  ctx.combine_rows = Tensor();
  return grad_home;
}

Tensor home_rows_to_grad_hidden(const Tensor& grad_home, DispatchContext& ctx) {
  Tensor grad_hidden = Tensor::empty({ctx.plan.num_tokens, ctx.hidden_size}, ctx.dtype);
  unpermute_rows(grad_home, ctx.plan, Tensor(), grad_hidden);
  ctx = DispatchContext{};  // the micro-batch is done with the dispatcher
  return grad_hidden;
}

}  // namespace internal

namespace reference {

DispatchPlan build_dispatch_plan(const Tensor& experts, int64_t num_experts, int64_t first_expert,
                                 int64_t num_local_experts, const std::vector<uint8_t>& keep,
                                 int64_t pad_rows_to) {
  check_plan_args(experts, num_experts, first_expert, num_local_experts, keep, pad_rows_to);
  const int64_t T = experts.dim(0), K = experts.dim(1);
  std::vector<std::vector<int64_t>> slots_per_expert(static_cast<size_t>(num_local_experts));
  for (int64_t e = 0; e < num_local_experts; ++e) {  // scan all tokens once per expert
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < K; ++j) {
        int64_t slot = t * K + j;
        bool kept = keep.empty() || keep[size_t(slot)];
        if (kept && experts.get(slot) == float(first_expert + e)) {
          slots_per_expert[size_t(e)].push_back(slot);
        }
      }
    }
  }
  return make_plan(experts, first_expert, slots_per_expert, pad_rows_to);
}

void permute_rows(const Tensor& hidden, const DispatchPlan& plan, const Tensor& slot_weights,
                  Tensor& rows) {
  check_rows_kernel_args(hidden, rows, plan, slot_weights, "reference::permute_rows");
  const int64_t H = hidden.dim(1);
  for (int64_t r = 0; r < plan.num_rows(); ++r) {
    int64_t slot = plan.slot_of_row[size_t(r)];
    double w = slot >= 0 && slot_weights.defined() ? slot_weights.get(slot) : 1.0;
    for (int64_t h = 0; h < H; ++h) {
      double v = slot < 0 ? 0.0 : w * double(hidden.get((slot / plan.topk) * H + h));
      rows.set(r * H + h, float(v));
    }
  }
}

void unpermute_rows(const Tensor& rows, const DispatchPlan& plan, const Tensor& slot_weights,
                    Tensor& out) {
  check_rows_kernel_args(out, rows, plan, slot_weights, "reference::unpermute_rows");
  const int64_t H = rows.dim(1);
  for (int64_t t = 0; t < plan.num_tokens; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      double total = 0.0;
      for (int64_t r = 0; r < plan.num_rows(); ++r) {  // search the rows, not row_of_slot
        int64_t slot = plan.slot_of_row[size_t(r)];
        if (slot < 0 || slot / plan.topk != t) continue;
        double w = slot_weights.defined() ? slot_weights.get(slot) : 1.0;
        total += w * double(rows.get(r * H + h));
      }
      out.set(t * H + h, float(total));
    }
  }
}

void unpermute_rows_backward(const Tensor& rows, const Tensor& grad_out, const DispatchPlan& plan,
                             const Tensor& slot_weights, Tensor& grad_rows, Tensor& grad_weights) {
  check_rows_kernel_args(grad_out, rows, plan, slot_weights, "reference::unpermute_rows_backward");
  const int64_t H = rows.dim(1);
  grad_weights.zero();
  for (int64_t r = 0; r < plan.num_rows(); ++r) {
    int64_t slot = plan.slot_of_row[size_t(r)];
    int64_t t = slot < 0 ? 0 : slot / plan.topk;
    double w = slot >= 0 && slot_weights.defined() ? slot_weights.get(slot) : 1.0;
    double dot = 0.0;
    for (int64_t h = 0; h < H; ++h) {
      double g = slot < 0 ? 0.0 : double(grad_out.get(t * H + h));
      grad_rows.set(r * H + h, float(w * g));
      dot += double(rows.get(r * H + h)) * g;
    }
    if (slot >= 0) grad_weights.set(slot, float(dot));
  }
}

}  // namespace reference

}  // namespace moe

#include <algorithm>

#include "dropout_hash.h"
#include "moe/model/layers.h"
#include "moe/tensor/ops.h"
#include "tensor/dtype_switch.h"

namespace moe::model {

namespace {

// Token ids as int64 in Megatron's [s, b] row order: row s * B + b holds tokens[b, s].
std::vector<int64_t> tokens_in_row_order(const Tensor& tokens, int64_t vocab) {
  check_ndim(tokens, 2, "tokens");
  MOE_CHECK(tokens.dtype() == DType::I32 || tokens.dtype() == DType::I64,
            "tokens must be int32 or int64, got ", dtype_name(tokens.dtype()));
  int64_t batch = tokens.dim(0), seq = tokens.dim(1);
  std::vector<int64_t> ids(size_t(batch * seq));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < seq; ++s) {
      int64_t flat = b * seq + s;
      int64_t id = tokens.dtype() == DType::I32 ? int64_t(tokens.data<int32_t>()[flat])
                                                : tokens.data<int64_t>()[flat];
      MOE_CHECK(id >= 0 && id < vocab, "token id ", id, " at [", b, ", ", s,
                "] is outside the vocabulary [0, ", vocab, ")");
      ids[size_t(s * batch + b)] = id;
    }
  }
  return ids;
}

}  // namespace

uint64_t dropout_key(uint64_t seed, int64_t layer, int64_t site) {
  return mix64(mix64(seed) ^ mix64(uint64_t(layer) * 64 + uint64_t(site)));
}

void apply_dropout(Tensor& x, float p, uint64_t key, int64_t first_index) {
  MOE_CHECK(p >= 0 && p < 1, "dropout probability ", p, " must be in [0, 1)");
  if (p == 0 || x.numel() == 0) return;
  int64_t count = x.numel();
  uint32_t threshold = dropout_threshold(p);
  dispatch_floating(x.dtype(), "dropout", [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    T* values = x.data<T>();
    C keep_scale = C(1) / (C(1) - C(p));
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; ++i) {
      values[i] = dropout_keeps(key, first_index + i, threshold)
                      ? store<T>(load(values[i]) * keep_scale)
                      : store<T>(C(0));
    }
  });
}

VocabParallelEmbedding::VocabParallelEmbedding(ParameterStore& store, const std::string& name,
                                               int64_t vocab, int64_t hidden,
                                               const TensorParallel& tp, bool pipeline_copy)
    : tp_(tp), vocab_(vocab), hidden_(hidden) {
  vocab_local_ = divide_over_tp(vocab, tp.size(), "padded_vocab_size");
  vocab_start_ = int64_t(tp.rank()) * vocab_local_;
  ParamSpec spec;
  spec.name = name;
  spec.shape = {vocab_local_, hidden};
  spec.global_shape = {vocab, hidden};
  spec.global_offset = {vocab_start_, 0};
  spec.pipeline_copy = pipeline_copy;
  weight_ = store.declare(spec);
}

Tensor VocabParallelEmbedding::forward(const ParameterStore& store, const Tensor& tokens) const {
  std::vector<int64_t> ids = tokens_in_row_order(tokens, vocab_);
  int64_t rows = int64_t(ids.size());
  Tensor table = store.param(weight_);
  Tensor partial({rows, hidden_}, table.dtype());  // zero rows for tokens of other ranks
  size_t row_bytes = size_t(hidden_) * dtype_size(table.dtype());
  const char* source = static_cast<const char*>(table.raw());
  char* target = static_cast<char*>(partial.raw());
  for (int64_t r = 0; r < rows; ++r) {
    int64_t local = ids[size_t(r)] - vocab_start_;
    if (local >= 0 && local < vocab_local_) {
      std::copy_n(source + size_t(local) * row_bytes, row_bytes, target + size_t(r) * row_bytes);
    }
  }
  return leave_tp_region(partial, tp_);
}

void VocabParallelEmbedding::backward(const ParameterStore& store, const Tensor& tokens,
                                      const Tensor& grad_output) const {
  std::vector<int64_t> ids = tokens_in_row_order(tokens, vocab_);
  Tensor dy_full = leave_tp_region_backward(grad_output, tp_);
  int64_t rows = int64_t(ids.size());
  check_shape(dy_full, {rows, hidden_}, "embedding output gradient");
  Tensor dy_values = dy_full.to(DType::F32);
  const float* source = dy_values.data<float>();
  float* grad = store.grad(weight_).data<float>();
  int64_t hidden = hidden_;
  // Columns split over threads; rows in token order: the sums are the same on every run.
#pragma omp parallel for schedule(static) if (rows * hidden > 65536)
  for (int64_t c = 0; c < hidden; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      int64_t local = ids[size_t(r)] - vocab_start_;
      if (local >= 0 && local < vocab_local_) grad[local * hidden + c] += source[r * hidden + c];
    }
  }
}

int64_t divide_over_tp(int64_t value, int tp, const char* what) {
  MOE_CHECK(tp >= 1 && value % tp == 0, what, " (", value,
            ") must be divisible by tensor_model_parallel_size (", tp, ")");
  return value / tp;
}

}  // namespace moe::model

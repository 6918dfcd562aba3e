#include <algorithm>
#include <cmath>
#include <vector>

#include "moe/model/layers.h"
#include "moe/tensor/gemm.h"

namespace moe::model {

namespace {

std::vector<int64_t> target_ids(const Tensor& targets, int64_t rows) {
  check_shape(targets, {rows}, "cross-entropy targets");
  MOE_CHECK(targets.dtype() == DType::I32 || targets.dtype() == DType::I64,
            "cross-entropy targets must be int32 or int64, got ", dtype_name(targets.dtype()));
  std::vector<int64_t> ids(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    ids[size_t(r)] =
        targets.dtype() == DType::I32 ? targets.data<int32_t>()[r] : targets.data<int64_t>()[r];
  }
  return ids;
}

template <class C>
Tensor cross_entropy_typed(const Tensor& logits, const std::vector<int64_t>& ids,
                           int64_t vocab_start, const TensorParallel& tp, Tensor& softmax) {
  int64_t rows = logits.dim(0), local = logits.dim(1);
  DType dtype = logits.dtype();
  const C* z = logits.data<C>();
  Tensor row_max = Tensor::empty({rows}, dtype);
  C* maxima = row_max.data<C>();
  for (int64_t r = 0; r < rows; ++r) {
    maxima[r] = local > 0 ? *std::max_element(z + r * local, z + (r + 1) * local) : C(-INFINITY);
  }
  comm::all_reduce(row_max, tp.group, comm::ReduceOp::kMax);
  // [2, rows]: sum of exp(z - max), and the target's shifted logit (on the rank that holds it).
  Tensor sums({2, rows}, dtype);
  C* sum_exp = sums.data<C>();
  C* target_logit = sum_exp + rows;
  softmax = Tensor::empty(logits.shape(), dtype);
  C* probs = softmax.data<C>();
#pragma omp parallel for schedule(static) if (rows * local > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    C total = 0;
    for (int64_t c = 0; c < local; ++c) {
      probs[r * local + c] = std::exp(z[r * local + c] - maxima[r]);
      total += probs[r * local + c];
    }
    sum_exp[r] = total;
    int64_t column = ids[size_t(r)] - vocab_start;
    if (column >= 0 && column < local) target_logit[r] = z[r * local + column] - maxima[r];
  }
  comm::all_reduce(sums, tp.group);
  Tensor loss = Tensor::empty({rows}, dtype);
  C* out = loss.data<C>();
  for (int64_t r = 0; r < rows; ++r) {
    out[r] = std::log(sum_exp[r]) - target_logit[r];
    for (int64_t c = 0; c < local; ++c) probs[r * local + c] /= sum_exp[r];
  }
  return loss;
}

template <class C>
Tensor cross_entropy_backward_typed(const Tensor& softmax, const std::vector<int64_t>& ids,
                                    int64_t vocab_start, const Tensor& dloss) {
  int64_t rows = softmax.dim(0), local = softmax.dim(1);
  Tensor grad_logits = softmax.clone();
  Tensor scale = dloss.to(softmax.dtype());
  C* grad = grad_logits.data<C>();
  const C* d = scale.data<C>();
#pragma omp parallel for schedule(static) if (rows * local > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < local; ++c) grad[r * local + c] *= d[r];
    int64_t column = ids[size_t(r)] - vocab_start;
    if (column >= 0 && column < local) grad[r * local + column] -= d[r];
  }
  return grad_logits;
}

}  // namespace

Tensor vocab_parallel_cross_entropy(const Tensor& logits, const Tensor& targets,
                                    int64_t vocab_start, const TensorParallel& tp,
                                    Tensor& softmax) {
  check_ndim(logits, 2, "cross-entropy logits");
  MOE_CHECK(logits.dtype() == DType::F32 || logits.dtype() == DType::F64,
            "cross-entropy logits must be F32 or F64, got ", dtype_name(logits.dtype()));
  std::vector<int64_t> ids = target_ids(targets, logits.dim(0));
  int64_t vocab = logits.dim(1) * tp.size();
  for (size_t r = 0; r < ids.size(); ++r) {
    MOE_CHECK(ids[r] >= 0 && ids[r] < vocab, "label ", ids[r], " (row ", r,
              ") is outside the vocabulary [0, ", vocab, ")");
  }
  if (logits.dtype() == DType::F64) {
    return cross_entropy_typed<double>(logits, ids, vocab_start, tp, softmax);
  }
  return cross_entropy_typed<float>(logits, ids, vocab_start, tp, softmax);
}

Tensor vocab_parallel_cross_entropy_backward(const Tensor& softmax, const Tensor& targets,
                                             int64_t vocab_start, const Tensor& dloss) {
  check_ndim(softmax, 2, "cross-entropy softmax");
  check_shape(dloss, {softmax.dim(0)}, "cross-entropy loss gradient");
  std::vector<int64_t> ids = target_ids(targets, softmax.dim(0));
  if (softmax.dtype() == DType::F64) {
    return cross_entropy_backward_typed<double>(softmax, ids, vocab_start, dloss);
  }
  return cross_entropy_backward_typed<float>(softmax, ids, vocab_start, dloss);
}

OutputLayer::OutputLayer(ParameterStore& store, const std::string& name, int64_t hidden,
                         int64_t vocab, const TensorParallel& tp,
                         const VocabParallelEmbedding* tied_embedding)
    : tp_(tp), tied_(tied_embedding != nullptr) {
  vocab_local_ = divide_over_tp(vocab, tp.size(), "padded_vocab_size");
  vocab_start_ = int64_t(tp.rank()) * vocab_local_;
  if (tied_) {
    weight_ = tied_embedding->weight();
    return;
  }
  ParamSpec spec;
  spec.name = name;
  spec.shape = {hidden, vocab_local_};
  spec.global_shape = {hidden, vocab};
  spec.global_offset = {0, vocab_start_};
  weight_ = store.declare(spec);
}

Tensor OutputLayer::forward(const ParameterStore& store, const Tensor& x, Context& ctx) const {
  ctx.input = x;  // this rank's rows: backward gathers them again (sequence parallelism)
  Tensor input = enter_tp_region(x, tp_);
  DType logits_dtype = x.dtype() == DType::F64 ? DType::F64 : DType::F32;
  Tensor logits = Tensor::empty({input.dim(0), vocab_local_}, logits_dtype);
  if (tied_) {
    linear_grad_input(input, store.param(weight_), logits);  // x E^T, E [V_local, h]
  } else {
    linear_forward(input, store.param(weight_), logits);
  }
  return logits;
}

Tensor OutputLayer::backward(const ParameterStore& store, const Context& ctx,
                             const Tensor& grad_logits) const {
  Tensor input = enter_tp_region(ctx.input, tp_);
  check_shape(grad_logits, {input.dim(0), vocab_local_}, "output layer gradient");
  Tensor dlogits_act = grad_logits.to(input.dtype());
  Tensor grad_weight = store.grad(weight_);
  Tensor grad_input = Tensor::empty(input.shape(), input.dtype());
  if (tied_) {
    accumulate_weight_grad(dlogits_act, input, grad_weight);        // dE += grad_logits^T x
    linear_forward(dlogits_act, store.param(weight_), grad_input);  // grad_input = grad_logits E
  } else {
    accumulate_weight_grad(input, dlogits_act, grad_weight);
    linear_grad_input(dlogits_act, store.param(weight_), grad_input);
  }
  return enter_tp_region_backward(grad_input, tp_);
}

}  // namespace moe::model

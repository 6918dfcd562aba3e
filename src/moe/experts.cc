#include "moe/moe/experts.h"

#include <cstring>
#include <numeric>

#include "moe/internal.h"
#include "moe/tensor/ops.h"
#include "moe/tensor/rng.h"
#include "tensor/dtype_switch.h"

namespace moe {
namespace {

ParamHandle declare_expert_param(ParameterStore& store, const std::string& name, Shape local,
                                 Shape global, Shape offset, bool weight_decay,
                                 bool tensor_parallel_duplicate = false) {
  ParamSpec spec;
  spec.name = name;
  spec.shape = std::move(local);
  spec.group = ParamGroup::kExpert;
  spec.weight_decay = weight_decay;
  spec.global_shape = std::move(global);
  spec.global_offset = std::move(offset);
  spec.tensor_parallel_duplicate = tensor_parallel_duplicate;
  return store.declare(std::move(spec));
}

// x[r] += bias[g] for the rows of every group g (x [R, N], bias [G, N], same dtype).
void add_group_bias(Tensor& x, const Tensor& bias, std::span<const int64_t> group_rows) {
  const int64_t n = x.dim(1);
  dispatch_floating(x.dtype(), "expert bias", [&](auto tag) {
    using T = decltype(tag);
    T* out = x.data<T>();
    const T* b = bias.data<T>();
    int64_t begin = 0;
    for (size_t g = 0; g < group_rows.size(); ++g) {
      int64_t end = begin + group_rows[g];
      const T* group_bias = b + int64_t(g) * n;
#pragma omp parallel for schedule(static) if ((end - begin) * n > 32768)
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < n; ++c) {
          out[r * n + c] = store<T>(load(out[r * n + c]) + load(group_bias[c]));
        }
      }
      begin = end;
    }
  });
}

// grad[g] += column sums of x over group g's rows (grad [G, N] fp32).
void accumulate_group_bias_grad(const Tensor& x, std::span<const int64_t> group_rows,
                                Tensor& grad) {
  int64_t begin = 0;
  for (size_t g = 0; g < group_rows.size(); ++g) {
    internal::add_column_sums(x, begin, begin + group_rows[g], grad, int64_t(g));
    begin += group_rows[g];
  }
}

}  // namespace

Experts::Experts(const MoEConfig& config, ParameterStore& store, const std::string& prefix,
                 const ExpertPlacement& placement)
    : config_(config), store_(store), placement_(placement) {
  config_.validate();
  MOE_CHECK(placement.num_experts == config.num_experts && placement.first >= 0 &&
                placement.count >= 0 && placement.first + placement.count <= config.num_experts,
            "Experts: local experts [", placement.first, ", ", placement.first + placement.count,
            ") of ", placement.num_experts, " do not fit num_experts (", config.num_experts, ")");
  MOE_CHECK(
      placement.tp_size >= 1 && placement.tp_rank >= 0 && placement.tp_rank < placement.tp_size,
      "Experts: expert tensor parallel rank ", placement.tp_rank, " of size ", placement.tp_size,
      " is out of range");
  const int64_t full_ffn = config.expert_ffn_hidden_size();
  MOE_CHECK(full_ffn % placement.tp_size == 0, "Experts: the expert ffn size (", full_ffn,
            ") is not divisible by the expert tensor parallel size (", placement.tp_size, ")");
  const int64_t E = placement.count, all = config.num_experts, H = config.hidden_size;
  const int64_t F = ffn_local(), first = placement.first, slice = placement.tp_rank * F;
  const std::string fc1 = prefix + ".linear_fc1", fc2 = prefix + ".linear_fc2";
  if (config.activation == ExpertActivation::kSwiGLU) {  // [gate | up], each half sliced
    fc1_weight_ = declare_expert_param(store, fc1 + ".weight", {E, H, 2, F}, {all, H, 2, full_ffn},
                                       {first, 0, 0, slice}, true);
    if (config.add_bias_linear) {
      fc1_bias_ = declare_expert_param(store, fc1 + ".bias", {E, 2, F}, {all, 2, full_ffn},
                                       {first, 0, slice}, false);
    }
  } else {
    fc1_weight_ = declare_expert_param(store, fc1 + ".weight", {E, H, F}, {all, H, full_ffn},
                                       {first, 0, slice}, true);
    if (config.add_bias_linear) {
      fc1_bias_ = declare_expert_param(store, fc1 + ".bias", {E, F}, {all, full_ffn},
                                       {first, slice}, false);
    }
  }
  fc2_weight_ = declare_expert_param(store, fc2 + ".weight", {E, F, H}, {all, full_ffn, H},
                                     {first, slice, 0}, true);
  if (config.add_bias_linear) {
    fc2_bias_ = declare_expert_param(store, fc2 + ".bias", {E, H}, {all, H}, {first, 0}, false,
                                     /*tensor_parallel_duplicate=*/placement.tp_size > 1);
  }
}

int64_t Experts::ffn_local() const {
  return config_.expert_ffn_hidden_size() / placement_.tp_size;
}

int64_t Experts::fc1_local() const {
  return config_.activation == ExpertActivation::kSwiGLU ? 2 * ffn_local() : ffn_local();
}

Tensor Experts::fc1_weight() const {
  return store_.param(fc1_weight_);
}
Tensor Experts::fc2_weight() const {
  return store_.param(fc2_weight_);
}
Tensor Experts::fc1_bias() const {
  return fc1_bias_.index >= 0 ? store_.param(fc1_bias_) : Tensor();
}
Tensor Experts::fc2_bias() const {
  return fc2_bias_.index >= 0 ? store_.param(fc2_bias_) : Tensor();
}
Tensor Experts::fc1_weight_grad() const {
  return store_.grad(fc1_weight_);
}
Tensor Experts::fc2_weight_grad() const {
  return store_.grad(fc2_weight_);
}
Tensor Experts::fc1_bias_grad() const {
  return fc1_bias_.index >= 0 ? store_.grad(fc1_bias_) : Tensor();
}
Tensor Experts::fc2_bias_grad() const {
  return fc2_bias_.index >= 0 ? store_.grad(fc2_bias_) : Tensor();
}

void Experts::init_parameters(uint64_t seed, float std, float output_std) {
  // Each expert is drawn whole, then this rank keeps its ffn slice: the values do not depend on
  // the expert or tensor parallel layout.
  const int64_t H = config_.hidden_size, full_ffn = config_.expert_ffn_hidden_size();
  const int64_t F = ffn_local(), slice = placement_.tp_rank * F;
  const int64_t halves = config_.activation == ExpertActivation::kSwiGLU ? 2 : 1;
  const DType dtype = store_.param_dtype();
  const size_t element = dtype_size(dtype);
  Tensor fc1 = fc1_weight(), fc2 = fc2_weight();
  Tensor whole_fc1({H, halves * full_ffn}, dtype), whole_fc2({full_ffn, H}, dtype);
  for (int64_t e = 0; e < placement_.count; ++e) {
    uint64_t global = uint64_t(placement_.first + e);
    Rng::derived(seed, (uint64_t(1) << 32) + 2 * global).fill_normal(whole_fc1, 0.0f, std);
    Rng::derived(seed, (uint64_t(1) << 32) + 2 * global + 1)
        .fill_normal(whole_fc2, 0.0f, output_std);
    const auto* source1 = static_cast<const char*>(whole_fc1.raw());
    auto* target1 = static_cast<char*>(fc1.raw()) + size_t(e * H * halves * F) * element;
    for (int64_t run = 0; run < H * halves; ++run) {  // one (row, half) run of F columns
      std::memcpy(target1 + size_t(run * F) * element,
                  source1 + size_t(run * full_ffn + slice) * element, size_t(F) * element);
    }
    std::memcpy(static_cast<char*>(fc2.raw()) + size_t(e * F * H) * element,
                static_cast<const char*>(whole_fc2.raw()) + size_t(slice * H) * element,
                size_t(F * H) * element);
  }
  if (config_.add_bias_linear) {
    fc1_bias().zero();
    fc2_bias().zero();
  }
}

void Experts::accumulate_weight_grad(const Tensor& a, const Tensor& b,
                                     std::span<const int64_t> group_rows, Tensor& grad) const {
  if (a.dtype() != DType::F64) {  // fp32 and half operands accumulate straight into fp32
    expert_gemm(GemmForm::kGradWeight, a, b, group_rows, grad, /*accumulate=*/true);
    return;
  }
  Tensor product(grad.shape(), DType::F64);
  expert_gemm(GemmForm::kGradWeight, a, b, group_rows, product, /*accumulate=*/false);
  internal::accumulate_into(product, grad);
}

Tensor Experts::activate(const Tensor& fc1_output) const {
  Tensor activation = Tensor::empty({fc1_output.dim(0), ffn_local()}, fc1_output.dtype());
  if (config_.activation == ExpertActivation::kSwiGLU) {
    swiglu(fc1_output, activation);
  } else {
    gelu(fc1_output, activation);
  }
  return activation;
}

Tensor Experts::forward(const Tensor& rows, std::span<const int64_t> tokens_per_expert,
                        ExpertsContext& ctx) const {
  const int64_t H = config_.hidden_size, N1 = fc1_local();
  check_ndim(rows, 2, "Experts::forward rows");
  MOE_CHECK(rows.dim(1) == H, "Experts::forward: rows ", shape_string(rows.shape()),
            " do not have hidden_size ", H, " columns");
  MOE_CHECK(rows.dtype() == store_.param_dtype(), "Experts::forward: rows are ",
            dtype_name(rows.dtype()), " but the parameters are ", dtype_name(store_.param_dtype()));
  MOE_CHECK(int64_t(tokens_per_expert.size()) == placement_.count,
            "Experts::forward: ", tokens_per_expert.size(), " group sizes for ", placement_.count,
            " local experts");
  int64_t total = std::accumulate(tokens_per_expert.begin(), tokens_per_expert.end(), int64_t(0));
  MOE_CHECK(total == rows.dim(0), "Experts::forward: tokens_per_expert sums to ", total,
            " but rows has ", rows.dim(0), " rows");
  const int64_t R = rows.dim(0);
  const DType dtype = rows.dtype();
  ctx = ExpertsContext{};
  ctx.tokens_per_expert.assign(tokens_per_expert.begin(), tokens_per_expert.end());
  ctx.input = rows;
  ctx.fc1_output = Tensor::empty({R, N1}, dtype);
  const int64_t E = placement_.count;
  expert_gemm(GemmForm::kForward, rows, fc1_weight().reshape({E, H, N1}), tokens_per_expert,
              ctx.fc1_output, false);
  if (config_.add_bias_linear) {
    add_group_bias(ctx.fc1_output, fc1_bias().reshape({E, N1}), tokens_per_expert);
  }
  ctx.activation = activate(ctx.fc1_output);
  Tensor output = Tensor::empty({R, H}, dtype);
  expert_gemm(GemmForm::kForward, ctx.activation, fc2_weight(), tokens_per_expert, output, false);
  // The same kernel on the same fc1 output rebuilds it bit for bit in backward.
  if (config_.recompute_moe_activation) ctx.activation = Tensor();
  // With expert tensor parallelism the outputs are partial sums: one rank adds the bias.
  if (config_.add_bias_linear && placement_.tp_rank == 0) {
    add_group_bias(output, fc2_bias(), tokens_per_expert);
  }
  return output;
}

Tensor Experts::backward(ExpertsContext& ctx, const Tensor& grad_output) const {
  MOE_CHECK(ctx.input.defined(), "Experts::backward: the context holds no forward state");
  const int64_t R = ctx.input.dim(0), H = config_.hidden_size;
  check_shape(grad_output, {R, H}, "Experts::backward grad_output");
  check_dtype(grad_output, ctx.input.dtype(), "Experts::backward grad_output");
  const std::span<const int64_t> groups(ctx.tokens_per_expert);
  const DType dtype = ctx.input.dtype();

  if (!ctx.activation.defined()) ctx.activation = activate(ctx.fc1_output);
  Tensor fc2_grad = fc2_weight_grad();
  accumulate_weight_grad(ctx.activation, grad_output, groups, fc2_grad);
  if (config_.add_bias_linear) {
    Tensor bias_grad = fc2_bias_grad();
    accumulate_group_bias_grad(grad_output, groups, bias_grad);
  }
  Tensor grad_activation = Tensor::empty(ctx.activation.shape(), dtype);
  expert_gemm(GemmForm::kGradInput, grad_output, fc2_weight(), groups, grad_activation, false);
  ctx.activation = Tensor();
  Tensor grad_fc1 = Tensor::empty(ctx.fc1_output.shape(), dtype);
  if (config_.activation == ExpertActivation::kSwiGLU) {
    swiglu_backward(ctx.fc1_output, grad_activation, grad_fc1);
  } else {
    gelu_backward(ctx.fc1_output, grad_activation, grad_fc1);
  }
  ctx.fc1_output = Tensor();
  grad_activation = Tensor();

  const int64_t E = placement_.count, N1 = fc1_local();
  Tensor fc1_grad = fc1_weight_grad().reshape({E, H, N1});
  accumulate_weight_grad(ctx.input, grad_fc1, groups, fc1_grad);
  if (config_.add_bias_linear) {
    Tensor bias_grad = fc1_bias_grad().reshape({E, N1});
    accumulate_group_bias_grad(grad_fc1, groups, bias_grad);
  }
  Tensor grad_input = Tensor::empty({R, H}, dtype);
  expert_gemm(GemmForm::kGradInput, grad_fc1, fc1_weight().reshape({E, H, N1}), groups, grad_input,
              false);
  ctx = ExpertsContext{};
  return grad_input;
}

void SequentialMLP::expert_gemm(GemmForm form, const Tensor& a, const Tensor& b,
                                std::span<const int64_t> group_rows, Tensor& c,
                                bool accumulate) const {
  // One product per expert on its row block, as Megatron's SequentialMLP loops over experts.
  int64_t offset = 0;
  for (size_t g = 0; g < group_rows.size(); ++g) {
    int64_t rows = group_rows[g];
    Tensor a_g = a.rows(offset, offset + rows);
    const int64_t one[1] = {rows};
    if (form == GemmForm::kGradWeight) {
      Tensor c_g = c.rows(int64_t(g), int64_t(g) + 1);
      grouped_gemm(form, a_g, b.rows(offset, offset + rows), one, c_g, accumulate);
    } else {
      Tensor c_g = c.rows(offset, offset + rows);
      grouped_gemm(form, a_g, b.rows(int64_t(g), int64_t(g) + 1), one, c_g, accumulate);
    }
    offset += rows;
  }
}

void GroupedMLP::expert_gemm(GemmForm form, const Tensor& a, const Tensor& b,
                             std::span<const int64_t> group_rows, Tensor& c,
                             bool accumulate) const {
  grouped_gemm(form, a, b, group_rows, c, accumulate);
}

std::unique_ptr<Experts> make_experts(const MoEConfig& config, ParameterStore& store,
                                      const std::string& prefix, const ExpertPlacement& placement) {
  if (config.moe_grouped_gemm)
    return std::make_unique<GroupedMLP>(config, store, prefix, placement);
  return std::make_unique<SequentialMLP>(config, store, prefix, placement);
}

}  // namespace moe

#include "moe/moe/experts.h"

#include <numeric>

#include "moe/internal.h"
#include "moe/tensor/ops.h"
#include "moe/tensor/rng.h"
#include "tensor/dispatch.h"

namespace moe {
namespace {

ParamHandle declare_expert_param(ParameterStore& store, const std::string& name, Shape local,
                                 int64_t num_experts, int64_t first, bool weight_decay) {
  ParamSpec spec;
  spec.name = name;
  spec.shape = local;
  spec.group = ParamGroup::kExpert;
  spec.weight_decay = weight_decay;
  spec.global_shape = local;
  spec.global_shape[0] = num_experts;
  spec.global_offset.assign(local.size(), 0);
  spec.global_offset[0] = first;
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
  const int64_t E = placement.count, H = config.hidden_size, F = config.expert_ffn_hidden_size();
  const int64_t N1 = config.fc1_output_size();
  fc1_weight_ = declare_expert_param(store, prefix + ".linear_fc1.weight", {E, H, N1},
                                     config.num_experts, placement.first, true);
  fc2_weight_ = declare_expert_param(store, prefix + ".linear_fc2.weight", {E, F, H},
                                     config.num_experts, placement.first, true);
  if (config.add_bias_linear) {
    fc1_bias_ = declare_expert_param(store, prefix + ".linear_fc1.bias", {E, N1},
                                     config.num_experts, placement.first, false);
    fc2_bias_ = declare_expert_param(store, prefix + ".linear_fc2.bias", {E, H}, config.num_experts,
                                     placement.first, false);
  }
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
  Tensor fc1 = fc1_weight(), fc2 = fc2_weight();
  for (int64_t e = 0; e < placement_.count; ++e) {
    uint64_t global = uint64_t(placement_.first + e);
    Tensor fc1_e = fc1.rows(e, e + 1), fc2_e = fc2.rows(e, e + 1);
    Rng fc1_rng = Rng::derived(seed, (uint64_t(1) << 32) + 2 * global);
    Rng fc2_rng = Rng::derived(seed, (uint64_t(1) << 32) + 2 * global + 1);
    fc1_rng.fill_normal(fc1_e, 0.0f, std);
    fc2_rng.fill_normal(fc2_e, 0.0f, output_std);
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

Tensor Experts::forward(const Tensor& rows, std::span<const int64_t> tokens_per_expert,
                        ExpertsContext& ctx) const {
  const int64_t H = config_.hidden_size, F = config_.expert_ffn_hidden_size();
  const int64_t N1 = config_.fc1_output_size();
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
  expert_gemm(GemmForm::kForward, rows, fc1_weight(), tokens_per_expert, ctx.fc1_output, false);
  if (config_.add_bias_linear) add_group_bias(ctx.fc1_output, fc1_bias(), tokens_per_expert);
  ctx.activation = Tensor::empty({R, F}, dtype);
  if (config_.activation == ExpertActivation::kSwiGLU) {
    swiglu(ctx.fc1_output, ctx.activation);
  } else {
    gelu(ctx.fc1_output, ctx.activation);
  }
  Tensor output = Tensor::empty({R, H}, dtype);
  expert_gemm(GemmForm::kForward, ctx.activation, fc2_weight(), tokens_per_expert, output, false);
  if (config_.add_bias_linear) add_group_bias(output, fc2_bias(), tokens_per_expert);
  return output;
}

Tensor Experts::backward(ExpertsContext& ctx, const Tensor& grad_output) const {
  MOE_CHECK(ctx.input.defined(), "Experts::backward: the context holds no forward state");
  const int64_t R = ctx.input.dim(0), H = config_.hidden_size;
  check_shape(grad_output, {R, H}, "Experts::backward grad_output");
  check_dtype(grad_output, ctx.input.dtype(), "Experts::backward grad_output");
  const std::span<const int64_t> groups(ctx.tokens_per_expert);
  const DType dtype = ctx.input.dtype();

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

  Tensor fc1_grad = fc1_weight_grad();
  accumulate_weight_grad(ctx.input, grad_fc1, groups, fc1_grad);
  if (config_.add_bias_linear) {
    Tensor bias_grad = fc1_bias_grad();
    accumulate_group_bias_grad(grad_fc1, groups, bias_grad);
  }
  Tensor grad_input = Tensor::empty({R, H}, dtype);
  expert_gemm(GemmForm::kGradInput, grad_fc1, fc1_weight(), groups, grad_input, false);
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

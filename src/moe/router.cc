// TopKRouter: gating product, score functions and top-k (Megatron's
// topk_routing_with_score_function and sinkhorn_load_balancing), aux / seq-aux / z losses, and
// their backward. Per-token work runs on plain pointers in the compute type C (float, or
// double for fp64 activations); tokens are independent, so OpenMP over tokens is deterministic.
#include "moe/moe/router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "moe/internal.h"
#include "moe/tensor/gemm.h"

namespace moe {
namespace {

// Megatron's epsilon in sigmoid normalisation.
constexpr double kSigmoidNormEps = 1e-20;

template <class C>
C sigmoid(C v) {
  return C(1) / (C(1) + std::exp(-v));
}

// The top-k indices of values[0..count), largest first; equal values: lower index first.
template <class C>
void top_k(const C* values, int64_t count, int64_t k, int32_t* out, std::vector<int32_t>& order) {
  order.resize(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  });
  std::copy_n(order.begin(), k, out);
}

// In place: row <- softmax(row), max-subtracted.
template <class C>
void softmax_inplace(C* row, int64_t count) {
  C peak = *std::max_element(row, row + count);
  C total = 0;
  for (int64_t e = 0; e < count; ++e) {
    row[e] = std::exp(row[e] - peak);
    total += row[e];
  }
  for (int64_t e = 0; e < count; ++e) row[e] /= total;
}

template <class C>
C log_sum_exp(const C* row, int64_t count) {
  C peak = *std::max_element(row, row + count);
  C total = 0;
  for (int64_t e = 0; e < count; ++e) total += std::exp(row[e] - peak);
  return peak + std::log(total);
}

// dl (+)= softmax backward: y * (dy - <y, dy>), over a full row.
template <class C>
void softmax_backward_add(const C* y, const C* dy, int64_t count, C* dl) {
  C dot = 0;
  for (int64_t e = 0; e < count; ++e) dot += y[e] * dy[e];
  for (int64_t e = 0; e < count; ++e) dl[e] += y[e] * (dy[e] - dot);
}

// The scores the aux loss uses (Megatron's compute_routing_scores_for_aux_loss): softmax, or
// sigmoid normalised to sum 1. Writes scores[0..E); sig gets the raw sigmoid for backward.
template <class C>
void aux_scores(const C* logits, int64_t count, ScoreFunction function, C* scores, C* sig) {
  std::copy_n(logits, count, scores);
  if (function == ScoreFunction::kSoftmax) {
    softmax_inplace(scores, count);
    return;
  }
  C total = 0;
  for (int64_t e = 0; e < count; ++e) {
    sig[e] = sigmoid(logits[e]);
    total += sig[e];
  }
  for (int64_t e = 0; e < count; ++e) scores[e] = sig[e] / (total + C(kSigmoidNormEps));
}

// Everything about one routing configuration the per-token kernels need.
struct RouteSpec {
  int64_t tokens, experts, topk;
  ScoreFunction function;
  bool pre_softmax;
  bool sinkhorn;  // Sinkhorn's activation: sigmoid for top-1, softmax otherwise
  double scale;   // topk scaling factor (1 when unset; not applied by Sinkhorn)
  int64_t groups = 0, group_topk = 0;  // group-limited routing; 0: off
  const float* expert_bias = nullptr;  // [E] added to the sigmoid scores for selection
};

// Per-thread scratch of select_experts.
template <class C>
struct SelectScratch {
  std::vector<C> biased, group_scores, masked;
  std::vector<int32_t> order, best_in_group, best_groups;
};

// Chooses spec.topk experts (best first) from one token's selection scores [E], plus the expert
// bias when given: plain top-k, or Megatron's group_limited_topk. Ties: lower index first.
template <class C>
void select_experts(const RouteSpec& spec, const C* scores, const float* expert_bias,
                    int32_t* chosen, SelectScratch<C>& s) {
  const int64_t E = spec.experts, K = spec.topk;
  if (expert_bias != nullptr) {
    s.biased.resize(size_t(E));
    for (int64_t e = 0; e < E; ++e) s.biased[size_t(e)] = scores[e] + C(expert_bias[e]);
    scores = s.biased.data();
  }
  if (spec.group_topk == 0) {
    top_k(scores, E, K, chosen, s.order);
    return;
  }
  const int64_t G = spec.groups, per_group = E / G, picks = K / spec.group_topk;
  s.group_scores.resize(size_t(G));
  s.best_in_group.resize(size_t(picks));
  for (int64_t g = 0; g < G; ++g) {
    const C* group = scores + g * per_group;
    top_k(group, per_group, picks, s.best_in_group.data(), s.order);
    C total = 0;
    for (int32_t e : s.best_in_group) total += group[e];
    s.group_scores[size_t(g)] = total;
  }
  s.best_groups.resize(size_t(spec.group_topk));
  top_k(s.group_scores.data(), G, spec.group_topk, s.best_groups.data(), s.order);
  // Experts outside the chosen groups can never be picked: validation keeps topk within them.
  s.masked.assign(size_t(E), -std::numeric_limits<C>::infinity());
  for (int32_t g : s.best_groups) {
    std::copy_n(scores + g * per_group, per_group, s.masked.begin() + g * per_group);
  }
  top_k(s.masked.data(), E, K, chosen, s.order);
}

// Forward for token rows: experts/probs from logits. select [T, E] (Sinkhorn-balanced scores
// in training) replaces the scores used for choosing when given.
template <class C>
void route_tokens(const RouteSpec& spec, const C* logits, const C* select, int32_t* experts,
                  C* probs) {
  int64_t E = spec.experts, K = spec.topk;
#pragma omp parallel if (spec.tokens * E > 16384)
  {
    std::vector<C> scores(static_cast<size_t>(E)), picked(static_cast<size_t>(K));
    SelectScratch<C> scratch;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < spec.tokens; ++t) {
      const C* row = logits + t * E;
      int32_t* chosen = experts + t * K;
      C* p = probs + t * K;
      if (spec.sinkhorn) {
        std::copy_n(row, E, scores.data());
        if (K == 1) {
          for (auto& v : scores) v = sigmoid(v);
        } else {
          softmax_inplace(scores.data(), E);
        }
        top_k(select ? select + t * E : scores.data(), E, K, chosen, scratch.order);
        for (int64_t j = 0; j < K; ++j) p[j] = scores[size_t(chosen[j])];
        continue;  // Megatron applies no scaling factor to Sinkhorn probabilities
      }
      if (spec.function == ScoreFunction::kSoftmax && !spec.pre_softmax) {
        select_experts(spec, row, nullptr, chosen, scratch);
        for (int64_t j = 0; j < K; ++j) picked[size_t(j)] = row[chosen[j]];
        softmax_inplace(picked.data(), K);
      } else if (spec.function == ScoreFunction::kSoftmax) {
        std::copy_n(row, E, scores.data());
        softmax_inplace(scores.data(), E);
        select_experts(spec, scores.data(), nullptr, chosen, scratch);
        for (int64_t j = 0; j < K; ++j) picked[size_t(j)] = scores[size_t(chosen[j])];
      } else {
        for (int64_t e = 0; e < E; ++e) scores[size_t(e)] = sigmoid(row[e]);
        select_experts(spec, scores.data(), spec.expert_bias, chosen, scratch);
        C total = 0;
        for (int64_t j = 0; j < K; ++j) {
          picked[size_t(j)] = scores[size_t(chosen[j])];
          total += picked[size_t(j)];
        }
        if (K > 1) {
          for (auto& v : picked) v /= total + C(kSigmoidNormEps);
        }
      }
      for (int64_t j = 0; j < K; ++j) p[j] = picked[size_t(j)] * C(spec.scale);
    }
  }
}

// Adds d(probs)/d(logits)^T grad_probs into dlogits for every token.
template <class C>
void route_tokens_backward(const RouteSpec& spec, const C* logits, const int32_t* experts,
                           const C* grad_probs, C* dlogits) {
  int64_t E = spec.experts, K = spec.topk;
#pragma omp parallel if (spec.tokens * E > 16384)
  {
    std::vector<C> scores(static_cast<size_t>(E)), dscores(static_cast<size_t>(E)),
        picked(static_cast<size_t>(K)), dpicked(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < spec.tokens; ++t) {
      const C* row = logits + t * E;
      const int32_t* chosen = experts + t * K;
      const C* dp = grad_probs + t * K;
      C* dl = dlogits + t * E;
      C scale = spec.sinkhorn ? C(1) : C(spec.scale);
      bool full_softmax = spec.sinkhorn ? K > 1 : spec.pre_softmax;
      if (spec.function == ScoreFunction::kSigmoid && !spec.sinkhorn) {
        C total = 0;
        for (int64_t j = 0; j < K; ++j) {
          picked[size_t(j)] = sigmoid(row[chosen[j]]);
          total += picked[size_t(j)];
        }
        C norm = K > 1 ? total + C(kSigmoidNormEps) : C(1);
        C weighted = 0;  // sum_i dp_i * q_i, q_i = picked_i / norm
        if (K > 1) {
          for (int64_t j = 0; j < K; ++j) weighted += dp[j] * scale * picked[size_t(j)] / norm;
        }
        for (int64_t j = 0; j < K; ++j) {
          C s = picked[size_t(j)];
          C dsig = (dp[j] * scale - weighted) / norm;
          dl[chosen[j]] += dsig * s * (C(1) - s);
        }
      } else if (spec.sinkhorn && K == 1) {
        C s = sigmoid(row[chosen[0]]);
        dl[chosen[0]] += dp[0] * s * (C(1) - s);
      } else if (full_softmax) {
        std::copy_n(row, E, scores.data());
        softmax_inplace(scores.data(), E);
        std::fill(dscores.begin(), dscores.end(), C(0));
        for (int64_t j = 0; j < K; ++j) dscores[size_t(chosen[j])] = dp[j] * scale;
        softmax_backward_add(scores.data(), dscores.data(), E, dl);
      } else {  // softmax over the chosen logits
        for (int64_t j = 0; j < K; ++j) picked[size_t(j)] = row[chosen[j]];
        softmax_inplace(picked.data(), K);
        for (int64_t j = 0; j < K; ++j) dpicked[size_t(j)] = dp[j] * scale;
        C dot = 0;
        for (int64_t j = 0; j < K; ++j) dot += picked[size_t(j)] * dpicked[size_t(j)];
        for (int64_t j = 0; j < K; ++j) {
          dl[chosen[j]] += picked[size_t(j)] * (dpicked[size_t(j)] - dot);
        }
      }
    }
  }
}

template <class C>
void sinkhorn_kernel(const C* cost_in, int64_t rows, int64_t cols, double tol, C* out) {
  std::vector<C> cost(size_t(rows * cols)), d0(size_t(rows), C(1)), d1(size_t(cols), C(1));
  std::vector<C> d1_old = d1, col_sums(static_cast<size_t>(cols));
  for (int64_t i = 0; i < rows * cols; ++i) cost[size_t(i)] = std::exp(cost_in[i]);
  const C eps = C(1e-8);
  C error = C(1e9);
  // Megatron iterates until converged; a bound turns a non-converging input into an error.
  constexpr int kMaxIterations = 1000000;
  int iteration = 0;
  while (error > C(tol)) {
    MOE_CHECK(++iteration <= kMaxIterations, "sinkhorn: no convergence to tol ", tol, " after ",
              kMaxIterations, " iterations (mean change ", double(error), ")");
    for (int64_t t = 0; t < rows; ++t) {
      C total = 0;
      for (int64_t e = 0; e < cols; ++e) total += d1[size_t(e)] * cost[size_t(t * cols + e)];
      d0[size_t(t)] = C(1) / C(rows) / (total + eps);
    }
    std::fill(col_sums.begin(), col_sums.end(), C(0));
    for (int64_t t = 0; t < rows; ++t) {
      for (int64_t e = 0; e < cols; ++e) {
        col_sums[size_t(e)] += d0[size_t(t)] * cost[size_t(t * cols + e)];
      }
    }
    error = 0;
    for (int64_t e = 0; e < cols; ++e) {
      d1[size_t(e)] = C(1) / C(cols) / (col_sums[size_t(e)] + eps);
      error += std::abs(d1_old[size_t(e)] - d1[size_t(e)]);
    }
    error /= C(cols);
    d1_old = d1;
  }
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t e = 0; e < cols; ++e) {
      out[t * cols + e] = d1[size_t(e)] * cost[size_t(t * cols + e)] * d0[size_t(t)];
    }
  }
}

// The aux-loss configuration: `groups` is 1 or, with seq_aux_loss on, the batch size B (token
// t = s * B + b belongs to sequence b).
struct AuxSpec {
  int64_t tokens, experts, topk, groups;
  ScoreFunction function;
};

// counts[g * E + e]: tokens of group g whose top-k over the aux scores includes e (Megatron's
// routing_map_for_aux_loss summed); score_sums[g * E + e]: the aux scores summed over group g.
// Serial over tokens, so the sums have one fixed order.
template <class C>
void aux_loss_statistics(const AuxSpec& spec, const C* logits, C* counts, C* score_sums) {
  int64_t E = spec.experts;
  std::fill_n(counts, spec.groups * E, C(0));
  std::fill_n(score_sums, spec.groups * E, C(0));
  std::vector<C> scores(static_cast<size_t>(E)), sig(static_cast<size_t>(E));
  std::vector<int32_t> chosen(size_t(spec.topk)), order;
  for (int64_t t = 0; t < spec.tokens; ++t) {
    aux_scores(logits + t * E, E, spec.function, scores.data(), sig.data());
    top_k(scores.data(), E, spec.topk, chosen.data(), order);
    int64_t g = t % spec.groups;
    for (int64_t e = 0; e < E; ++e) score_sums[g * E + e] += scores[size_t(e)];
    for (int32_t e : chosen) counts[g * E + e] += C(1);
  }
}

// Adds the balancing and z losses' gradients to dlogits: d(loss)/d(score[t, e]) is aux_factor *
// weights[t % groups, e] (aux_factor 0 when no balancing loss is active); z_factor:
// d(loss)/d(lse_t^2) (0 when off).
template <class C>
void loss_backward(const AuxSpec& spec, const C* logits, const C* weights, C aux_factor, C z_factor,
                   C* dlogits) {
  int64_t E = spec.experts;
#pragma omp parallel if (spec.tokens * E > 16384)
  {
    std::vector<C> scores(static_cast<size_t>(E)), sig(static_cast<size_t>(E)),
        dscores(static_cast<size_t>(E));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < spec.tokens; ++t) {
      const C* row = logits + t * E;
      C* dl = dlogits + t * E;
      if (aux_factor != C(0)) {
        aux_scores(row, E, spec.function, scores.data(), sig.data());
        const C* group_weights = weights + (t % spec.groups) * E;
        for (int64_t e = 0; e < E; ++e) dscores[size_t(e)] = aux_factor * group_weights[e];
        if (spec.function == ScoreFunction::kSoftmax) {
          softmax_backward_add(scores.data(), dscores.data(), E, dl);
        } else {  // scores = sig / (sum(sig) + eps)
          C norm = 0, weighted = 0;
          for (int64_t e = 0; e < E; ++e) norm += sig[size_t(e)];
          norm += C(kSigmoidNormEps);
          for (int64_t e = 0; e < E; ++e) weighted += dscores[size_t(e)] * scores[size_t(e)];
          for (int64_t e = 0; e < E; ++e) {
            C s = sig[size_t(e)];
            dl[e] += (dscores[size_t(e)] - weighted) / norm * s * (C(1) - s);
          }
        }
      }
      if (z_factor != C(0)) {  // d(lse^2)/dl = 2 lse softmax(l)
        std::copy_n(row, E, scores.data());
        C lse = log_sum_exp(row, E);
        softmax_inplace(scores.data(), E);
        for (int64_t e = 0; e < E; ++e) dl[e] += z_factor * C(2) * lse * scores[size_t(e)];
      }
    }
  }
}

}  // namespace

Tensor sinkhorn(const Tensor& cost, double tol) {
  check_ndim(cost, 2, "sinkhorn cost");
  MOE_CHECK(cost.dtype() == DType::F32 || cost.dtype() == DType::F64,
            "sinkhorn: cost must be fp32 or fp64, got ", dtype_name(cost.dtype()));
  MOE_CHECK(tol > 0.0, "sinkhorn: tol (", tol, ") must be positive");
  Tensor out = Tensor::empty(cost.shape(), cost.dtype());
  if (cost.numel() == 0) return out;
  internal::with_compute_type(cost.dtype(), [&](auto tag) {
    using C = decltype(tag);
    sinkhorn_kernel(cost.data<C>(), cost.dim(0), cost.dim(1), tol, out.data<C>());
  });
  return out;
}

TopKRouter::TopKRouter(const MoEConfig& config, ParameterStore& store, const std::string& prefix,
                       uint64_t jitter_seed)
    : config_(config), store_(store), jitter_rng_(Rng::derived(jitter_seed, 0x6a17e5u)) {
  config_.validate();
  ParamSpec weight;
  weight.name = prefix + ".weight";
  weight.shape = {config_.hidden_size, config_.num_experts};
  weight.group = ParamGroup::kDense;
  weight.tensor_parallel_duplicate = true;
  weight_ = store_.declare(weight);
  if (config_.add_bias_linear) {
    ParamSpec bias;
    bias.name = prefix + ".bias";
    bias.shape = {config_.num_experts};
    bias.group = ParamGroup::kDense;
    bias.weight_decay = false;
    bias.tensor_parallel_duplicate = true;
    bias_ = store_.declare(bias);
  }
  if (config_.moe_router_enable_expert_bias) {
    ParamSpec expert_bias;
    expert_bias.name = prefix + ".expert_bias";
    expert_bias.shape = {config_.num_experts};
    expert_bias.group = ParamGroup::kDense;
    expert_bias.weight_decay = false;
    expert_bias.tensor_parallel_duplicate = true;
    expert_bias.trainable = false;
    expert_bias_ = store_.declare(expert_bias);
    tokens_per_expert_ = Tensor({config_.num_experts}, DType::I64);
  }
  if (config_.aux_loss_coeff(LoadBalancingType::kGlobalAuxLoss) > 0.0) {
    global_tokens_per_expert_ = Tensor({config_.num_experts}, DType::F64);
  }
}

Tensor TopKRouter::weight() const {
  return store_.param(weight_);
}
Tensor TopKRouter::weight_grad() const {
  return store_.grad(weight_);
}
Tensor TopKRouter::bias() const {
  MOE_CHECK(has_bias(), "TopKRouter: no bias (add_bias_linear is false)");
  return store_.param(bias_);
}
Tensor TopKRouter::bias_grad() const {
  MOE_CHECK(has_bias(), "TopKRouter: no bias (add_bias_linear is false)");
  return store_.grad(bias_);
}
Tensor TopKRouter::expert_bias() const {
  MOE_CHECK(has_expert_bias(),
            "TopKRouter: no expert bias (moe_router_enable_expert_bias is false)");
  return store_.param(expert_bias_);
}

std::vector<ParamHandle> TopKRouter::params() const {
  if (has_bias()) return {weight_, bias_};
  return {weight_};
}

void TopKRouter::set_z_loss_group_size(int64_t group_size) {
  MOE_CHECK(group_size >= 1, "TopKRouter: z-loss group size (", group_size, ") must be >= 1");
  z_loss_group_size_ = group_size;
}

double TopKRouter::z_loss_coeff() const {
  return config_.moe_z_loss_coeff.value_or(0.0) / double(z_loss_group_size_);
}

DType TopKRouter::router_dtype(DType activation) const {
  if (!config_.moe_router_dtype) return internal::compute_dtype_for(activation);
  return *config_.moe_router_dtype == RouterDType::kFP64 ? DType::F64 : DType::F32;
}

void TopKRouter::init_parameters(uint64_t seed, float std) {
  Tensor w = weight();
  Rng rng = Rng::derived(seed, 0x7047e5u);
  rng.fill_normal(w, 0.0f, std);
  if (has_bias()) bias().zero();
  if (has_expert_bias()) expert_bias().zero();
}

void TopKRouter::reset_global_aux_loss_tracker() {
  if (global_tokens_per_expert_.defined()) global_tokens_per_expert_.zero();
  global_aux_micro_batches_ = 0;
}

void TopKRouter::update_expert_bias(const comm::ProcessGroup& group) {
  MOE_CHECK(has_expert_bias(),
            "TopKRouter::update_expert_bias: moe_router_enable_expert_bias is false");
  const int64_t E = config_.num_experts;
  Tensor loads = tokens_per_expert_.clone();
  if (group.size() > 1) comm::all_reduce(loads, group);
  const int64_t* load = loads.data<int64_t>();
  double mean = 0.0;
  for (int64_t e = 0; e < E; ++e) mean += double(load[e]);
  mean /= double(E);
  float* bias = expert_bias().data<float>();
  const float rate = float(config_.moe_router_bias_update_rate);
  for (int64_t e = 0; e < E; ++e) {
    double offset = mean - double(load[e]);
    float sign = offset > 0.0 ? 1.0f : offset < 0.0 ? -1.0f : 0.0f;
    bias[e] = bias[e] + sign * rate;
  }
  tokens_per_expert_.zero();
}

namespace {

RouteSpec route_spec(const MoEConfig& config, int64_t tokens, const float* expert_bias) {
  RouteSpec spec{tokens,
                 config.num_experts,
                 config.moe_router_topk,
                 config.moe_router_score_function,
                 config.moe_router_pre_softmax,
                 config.uses(LoadBalancingType::kSinkhorn),
                 config.moe_router_topk_scaling_factor.value_or(1.0)};
  spec.groups = config.moe_router_num_groups.value_or(0);
  spec.group_topk = config.moe_router_group_topk.value_or(0);
  spec.expert_bias = expert_bias;
  return spec;
}

// x *= noise elementwise (both [T, H] of the compute dtype): the jitter on the router input in
// forward, and its chain-rule factor on the input gradient in backward.
void apply_jitter(const Tensor& noise, Tensor& x) {
  internal::with_compute_type(x.dtype(), [&](auto tag) {
    using C = decltype(tag);
    C* values = x.data<C>();
    const C* factors = noise.data<C>();
    const int64_t count = x.numel();
    for (int64_t i = 0; i < count; ++i) values[i] *= factors[i];
  });
}

// sum_i a[i] * b[i] over n elements, in order.
double dot_in_order(const double* a, const double* b, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += a[i] * b[i];
  return total;
}

}  // namespace

// The balancing losses (Megatron's switch_load_balancing_loss_func per type): with counts c_e
// of the type's level and N its token count, loss = coeff * E / (topk * N^2) * sum_e c_e * P_e
// where P_e sums this rank's aux scores; seq_aux_loss does so per sequence and divides by B.
// Their gradients with respect to the aux scores are gathered in ctx.aux_score_weights.
template <class C>
void TopKRouter::add_balancing_losses(const C* logits, int64_t T, RouterContext& ctx,
                                      const RouterReplay* replay) {
  const int64_t E = config_.num_experts, B = ctx.batch_size;
  const double coeff_aux = config_.aux_loss_coeff(LoadBalancingType::kAuxLoss);
  const double coeff_seq = config_.aux_loss_coeff(LoadBalancingType::kSeqAuxLoss);
  const double coeff_global = config_.aux_loss_coeff(LoadBalancingType::kGlobalAuxLoss);
  const double per_count = double(E) / double(config_.moe_router_topk);
  // Statistics per sequence when seq_aux_loss is on; the other types use their sums.
  AuxSpec aux{T, E, config_.moe_router_topk, coeff_seq > 0.0 ? B : 1,
              config_.moe_router_score_function};
  const int64_t G = aux.groups;
  Tensor counts = Tensor::empty({G, E}, DType::F64);
  Tensor score_sums = Tensor::empty({G, E}, DType::F64);
  {
    Tensor c = Tensor::empty({G, E}, ctx.logits.dtype()), p = Tensor::empty({G, E}, c.dtype());
    aux_loss_statistics(aux, logits, c.data<C>(), p.data<C>());
    counts.copy_from(c);
    score_sums.copy_from(p);
  }
  Tensor batch_counts({E}, DType::F64), batch_scores({E}, DType::F64);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t e = 0; e < E; ++e) {
      batch_counts.data<double>()[e] += counts.data<double>()[g * E + e];
      batch_scores.data<double>()[e] += score_sums.data<double>()[g * E + e];
    }
  }
  Tensor weights({G, E}, DType::F64);
  bool active = false;
  // Adds factor * reduced counts (one row, or one per sequence) to the weights; the loss is
  // factor * <counts, score sums>.
  auto add_term = [&](const Tensor& level_counts, const Tensor& level_scores, double factor) {
    const int64_t rows = level_counts.numel() / E;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t e = 0; e < E; ++e) {
        weights.data<double>()[g * E + e] +=
            factor * level_counts.data<double>()[(g % rows) * E + e];
      }
    }
    active = true;
    return factor * dot_in_order(level_counts.data<double>(), level_scores.data<double>(),
                                 level_counts.numel());
  };
  // Runs with T = 0 too: the count reducers are collectives the group's other ranks enter.
  auto reduce = [](const AuxCountReducer& reducer, Tensor& level_counts, double& token_count) {
    if (reducer) reducer(level_counts, token_count);
    MOE_CHECK(token_count >= 0, "TopKRouter: aux-loss token count is ", token_count);
  };
  RouterLosses& losses = ctx.losses;
  if (coeff_aux > 0.0) {
    Tensor reduced = batch_counts.clone();
    double tokens = double(T);
    reduce(aux_count_reducer_, reduced, tokens);
    // No token anywhere in the group: no loss and no gradient.
    if (tokens > 0) {
      losses.aux_loss = add_term(reduced, batch_scores, coeff_aux * per_count / (tokens * tokens));
    }
  }
  if (coeff_seq > 0.0) {
    // Each sequence's S tokens (Megatron's reshape to [S, B*E]).
    Tensor reduced = counts.clone();
    double tokens = double(T / B);
    reduce(aux_count_reducer_, reduced, tokens);
    if (tokens > 0) {
      losses.seq_aux_loss =
          add_term(reduced, score_sums, coeff_seq * per_count / (tokens * tokens) / double(B));
    }
  }
  if (coeff_global > 0.0) {
    Tensor reduced = batch_counts.clone();
    double tokens = double(T);
    reduce(global_aux_count_reducer_, reduced, tokens);
    Tensor mean_counts;
    if (replay != nullptr) {  // a recomputation: the counts its first run used, added once
      MOE_CHECK(replay->global_counts.defined(),
                "TopKRouter: the replayed forward computed no global_aux_loss");
      mean_counts = replay->global_counts;
    } else {
      internal::accumulate_into(reduced, global_tokens_per_expert_);
      ++global_aux_micro_batches_;
      mean_counts = global_tokens_per_expert_.clone();
      for (int64_t e = 0; e < E; ++e) {
        mean_counts.data<double>()[e] /= double(global_aux_micro_batches_);
      }
    }
    ctx.replay.global_counts = mean_counts;
    if (tokens > 0) {
      losses.global_aux_loss =
          add_term(mean_counts, batch_scores, coeff_global * per_count / (tokens * tokens));
    }
  }
  losses.load_balancing_loss = losses.aux_loss + losses.seq_aux_loss + losses.global_aux_loss;
  if (active) ctx.aux_score_weights = weights.to(ctx.logits.dtype());
}

// Megatron counts the routing map after capacity dropping: only the slots an expert keeps.
void TopKRouter::count_routed_tokens(const Routing& routing, std::span<const int64_t> row_of_slot) {
  MOE_CHECK(has_expert_bias(),
            "TopKRouter::count_routed_tokens: moe_router_enable_expert_bias is false");
  const int64_t slots = routing.experts.numel();
  MOE_CHECK(row_of_slot.empty() || int64_t(row_of_slot.size()) == slots,
            "TopKRouter::count_routed_tokens: row_of_slot has ", row_of_slot.size(),
            " entries for a routing of ", slots, " slots");
  const int32_t* experts = routing.experts.data<int32_t>();
  int64_t* counts = tokens_per_expert_.data<int64_t>();
  for (int64_t slot = 0; slot < slots; ++slot) {
    if (row_of_slot.empty() || row_of_slot[size_t(slot)] >= 0) ++counts[experts[slot]];
  }
}

Routing TopKRouter::forward(const Tensor& hidden, RouterContext& ctx, bool training,
                            const RouterReplay* replay) {
  MOE_CHECK(hidden.ndim() == 2 || hidden.ndim() == 3,
            "TopKRouter: input must be [T, H] or [S, B, H], got ", shape_string(hidden.shape()));
  const int64_t H = config_.hidden_size, E = config_.num_experts, K = config_.moe_router_topk;
  MOE_CHECK(hidden.dim(-1) == H, "TopKRouter: input ", shape_string(hidden.shape()),
            " has hidden size ", hidden.dim(-1), " but hidden_size is ", H);
  const Tensor x = hidden.reshape({-1, H});
  const int64_t T = x.dim(0);
  const DType cdt = router_dtype(hidden.dtype());
  ctx = RouterContext{};
  ctx.input_shape = hidden.shape();
  ctx.batch_size = hidden.ndim() == 3 ? hidden.dim(1) : 1;
  ctx.training = training;
  ctx.replay.jitter_state = replay != nullptr ? replay->jitter_state : jitter_rng_.state();

  // The router's input in the compute dtype, jittered when configured.
  if (config_.moe_input_jitter_eps) {
    float eps = float(*config_.moe_input_jitter_eps);
    ctx.jitter_noise = Tensor::empty({T, H}, cdt);
    if (replay != nullptr) {  // the first run's noise; the generator stays where it is
      Rng rerun = jitter_rng_;
      rerun.set_state(replay->jitter_state);
      rerun.fill_uniform(ctx.jitter_noise, 1.0f - eps, 1.0f + eps);
    } else {
      jitter_rng_.fill_uniform(ctx.jitter_noise, 1.0f - eps, 1.0f + eps);
    }
    ctx.router_input = x.to(cdt);
    apply_jitter(ctx.jitter_noise, ctx.router_input);
  } else {
    ctx.router_input = x.dtype() == cdt ? x : x.to(cdt);
  }

  ctx.logits = Tensor::empty({T, E}, cdt);
  linear_forward(ctx.router_input, weight().to(cdt), ctx.logits);
  ctx.routing.num_tokens = T;
  ctx.routing.topk = K;
  ctx.routing.experts = Tensor::empty({T, K}, DType::I32);
  Tensor probs = Tensor::empty({T, K}, cdt);
  internal::with_compute_type(cdt, [&](auto tag) {
    using C = decltype(tag);
    C* logits = ctx.logits.data<C>();
    if (has_bias()) {
      Tensor b = bias().to(cdt);
      const C* bias_values = b.data<C>();
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t e = 0; e < E; ++e) logits[t * E + e] += bias_values[e];
      }
    }
    for (int64_t i = 0; i < T * E; ++i) {
      MOE_CHECK(std::isfinite(logits[i]), "TopKRouter: logit of token ", i / E, " for expert ",
                i % E, " is ", double(logits[i]), " (non-finite input or router weight)");
    }
    RouteSpec spec =
        route_spec(config_, T, has_expert_bias() ? expert_bias().data<float>() : nullptr);
    Tensor balanced;  // Sinkhorn picks experts on balanced scores in training only
    if (spec.sinkhorn && training && T > 0) balanced = sinkhorn(ctx.logits);
    route_tokens(spec, logits, balanced.defined() ? balanced.data<C>() : nullptr,
                 ctx.routing.experts.data<int32_t>(), probs.data<C>());

    if (training && config_.aux_loss_enabled()) add_balancing_losses(logits, T, ctx, replay);
    if (training && config_.z_loss_enabled() && T > 0) {
      ctx.z_loss_active = true;
      double total = 0.0;
      for (int64_t t = 0; t < T; ++t) {
        double lse = double(log_sum_exp(logits + t * E, E));
        total += lse * lse;
      }
      ctx.losses.z_loss = z_loss_coeff() * total / double(T);
    }
  });
  const DType probs_dtype = internal::compute_dtype_for(hidden.dtype());
  ctx.routing.probs = probs_dtype == cdt ? probs : probs.to(probs_dtype);
  return ctx.routing;
}

void TopKRouter::backward(RouterContext& ctx, const Tensor& grad_probs, Tensor& grad_hidden,
                          double aux_loss_grad_scale) {
  MOE_CHECK(ctx.logits.defined(), "TopKRouter::backward: the context holds no forward state");
  const int64_t H = config_.hidden_size, E = config_.num_experts, K = config_.moe_router_topk;
  const int64_t T = ctx.routing.num_tokens;
  const DType cdt = ctx.logits.dtype();
  check_shape(grad_probs, {T, K}, "TopKRouter::backward grad_probs");
  check_dtype(grad_probs, ctx.routing.probs.dtype(), "TopKRouter::backward grad_probs");
  check_shape(grad_hidden, ctx.input_shape, "TopKRouter::backward grad_hidden");
  const Tensor grad_scores = grad_probs.dtype() == cdt ? grad_probs : grad_probs.to(cdt);

  Tensor dlogits({T, E}, cdt);
  internal::with_compute_type(cdt, [&](auto tag) {
    using C = decltype(tag);
    const C* logits = ctx.logits.data<C>();
    route_tokens_backward(route_spec(config_, T, nullptr), logits,
                          ctx.routing.experts.data<int32_t>(), grad_scores.data<C>(),
                          dlogits.data<C>());
    const bool aux_active = ctx.aux_score_weights.defined();
    AuxSpec aux{T, E, K, aux_active ? ctx.aux_score_weights.dim(0) : 1,
                config_.moe_router_score_function};
    double aux_factor = aux_active ? aux_loss_grad_scale : 0.0;
    double z_factor = ctx.z_loss_active ? aux_loss_grad_scale * z_loss_coeff() / double(T) : 0.0;
    if (aux_factor != 0.0 || z_factor != 0.0) {
      loss_backward(aux, logits, aux_active ? ctx.aux_score_weights.data<C>() : nullptr,
                    C(aux_factor), C(z_factor), dlogits.data<C>());
    }
  });

  // Parameter gradients accumulate in the store's fp32 buffers.
  Tensor weight_grad_view = weight_grad();
  if (cdt == DType::F32) {
    linear_grad_weight(ctx.router_input, dlogits, weight_grad_view, /*accumulate=*/true);
  } else {
    Tensor dweight({H, E}, cdt);
    linear_grad_weight(ctx.router_input, dlogits, dweight, /*accumulate=*/false);
    internal::accumulate_into(dweight, weight_grad_view);
  }
  if (has_bias()) {
    Tensor bias_grad_view = bias_grad().reshape({1, E});
    Tensor dbias({1, E}, cdt);
    internal::add_column_sums(dlogits, 0, T, dbias, 0);
    internal::accumulate_into(dbias, bias_grad_view);
  }

  Tensor dinput = Tensor::empty({T, H}, cdt);
  linear_grad_input(dlogits, weight().to(cdt), dinput);
  if (ctx.jitter_noise.defined()) apply_jitter(ctx.jitter_noise, dinput);
  Tensor grad_hidden_rows = grad_hidden.reshape({T, H});
  internal::accumulate_into(dinput, grad_hidden_rows);
  RouterLosses losses = ctx.losses;  // backward frees the saved tensors, keeps the losses
  ctx = RouterContext{};
  ctx.losses = losses;
}

}  // namespace moe

// TopKRouter: gating product, score functions and top-k (Megatron's
// topk_routing_with_score_function and sinkhorn_load_balancing), aux / seq-aux / z losses, and
// their backward. Per-token work runs on plain pointers in the compute type C (float, or
// double for fp64 activations); tokens are independent, so OpenMP over tokens is deterministic.
#include "moe/moe/router.h"

#include <algorithm>
#include <cmath>
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
};

// Forward for token rows: experts/probs from logits. select [T, E] (Sinkhorn-balanced scores
// in training) replaces the scores used for choosing when given.
template <class C>
void route_tokens(const RouteSpec& spec, const C* logits, const C* select, int32_t* experts,
                  C* probs) {
  int64_t E = spec.experts, K = spec.topk;
#pragma omp parallel if (spec.tokens * E > 16384)
  {
    std::vector<C> scores(static_cast<size_t>(E)), picked(static_cast<size_t>(K));
    std::vector<int32_t> order;
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
        top_k(select ? select + t * E : scores.data(), E, K, chosen, order);
        for (int64_t j = 0; j < K; ++j) p[j] = scores[size_t(chosen[j])];
        continue;  // Megatron applies no scaling factor to Sinkhorn probabilities
      }
      if (spec.function == ScoreFunction::kSoftmax && !spec.pre_softmax) {
        top_k(row, E, K, chosen, order);
        for (int64_t j = 0; j < K; ++j) picked[size_t(j)] = row[chosen[j]];
        softmax_inplace(picked.data(), K);
      } else if (spec.function == ScoreFunction::kSoftmax) {
        std::copy_n(row, E, scores.data());
        softmax_inplace(scores.data(), E);
        top_k(scores.data(), E, K, chosen, order);
        for (int64_t j = 0; j < K; ++j) picked[size_t(j)] = scores[size_t(chosen[j])];
      } else {
        for (int64_t e = 0; e < E; ++e) scores[size_t(e)] = sigmoid(row[e]);
        top_k(scores.data(), E, K, chosen, order);
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

// The aux-loss configuration: `groups` is 1 (aux_loss) or the batch size B (seq_aux_loss, token
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

// Adds the aux and z losses' gradients to dlogits. aux_factor: d(loss)/d(score[t, e]) per
// count (0 when the aux loss is off); z_factor: d(loss)/d(lse_t^2) (0 when off).
template <class C>
void loss_backward(const AuxSpec& spec, const C* logits, const C* counts, C aux_factor, C z_factor,
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
        const C* group_counts = counts + (t % spec.groups) * E;
        for (int64_t e = 0; e < E; ++e) dscores[size_t(e)] = aux_factor * group_counts[e];
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

void TopKRouter::init_parameters(uint64_t seed, float std) {
  Tensor w = weight();
  Rng rng = Rng::derived(seed, 0x7047e5u);
  rng.fill_normal(w, 0.0f, std);
  if (has_bias()) bias().zero();
}

namespace {

RouteSpec route_spec(const MoEConfig& config, int64_t tokens) {
  return RouteSpec{tokens,
                   config.num_experts,
                   config.moe_router_topk,
                   config.moe_router_score_function,
                   config.moe_router_pre_softmax,
                   config.moe_router_load_balancing_type == LoadBalancingType::kSinkhorn,
                   config.moe_router_topk_scaling_factor.value_or(1.0)};
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

AuxSpec aux_spec(const MoEConfig& config, int64_t tokens, int64_t batch_size) {
  bool per_sequence = config.moe_router_load_balancing_type == LoadBalancingType::kSeqAuxLoss;
  return AuxSpec{tokens, config.num_experts, config.moe_router_topk, per_sequence ? batch_size : 1,
                 config.moe_router_score_function};
}

// d(aux loss)/d(score[t, e]) per routed count: coeff * E / (topk * N^2), divided by B for the
// per-sequence loss (Megatron averages it over the batch).
double aux_loss_factor(const MoEConfig& config, const AuxSpec& spec, double token_count) {
  return config.moe_aux_loss_coeff * double(config.num_experts) /
         (double(config.moe_router_topk) * token_count * token_count) / double(spec.groups);
}

}  // namespace

Routing TopKRouter::forward(const Tensor& hidden, RouterContext& ctx, bool training) {
  MOE_CHECK(hidden.ndim() == 2 || hidden.ndim() == 3,
            "TopKRouter: input must be [T, H] or [S, B, H], got ", shape_string(hidden.shape()));
  const int64_t H = config_.hidden_size, E = config_.num_experts, K = config_.moe_router_topk;
  MOE_CHECK(hidden.dim(-1) == H, "TopKRouter: input ", shape_string(hidden.shape()),
            " has hidden size ", hidden.dim(-1), " but hidden_size is ", H);
  const Tensor x = hidden.reshape({-1, H});
  const int64_t T = x.dim(0);
  const DType cdt = internal::compute_dtype_for(hidden.dtype());
  ctx = RouterContext{};
  ctx.input_shape = hidden.shape();
  ctx.batch_size = hidden.ndim() == 3 ? hidden.dim(1) : 1;
  ctx.training = training;

  // The router's input in the compute dtype, jittered when configured.
  if (config_.moe_input_jitter_eps) {
    float eps = float(*config_.moe_input_jitter_eps);
    ctx.jitter_noise = Tensor::empty({T, H}, cdt);
    jitter_rng_.fill_uniform(ctx.jitter_noise, 1.0f - eps, 1.0f + eps);
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
  ctx.routing.probs = Tensor::empty({T, K}, cdt);
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
    RouteSpec spec = route_spec(config_, T);
    Tensor balanced;  // Sinkhorn picks experts on balanced scores in training only
    if (spec.sinkhorn && training && T > 0) balanced = sinkhorn(ctx.logits);
    route_tokens(spec, logits, balanced.defined() ? balanced.data<C>() : nullptr,
                 ctx.routing.experts.data<int32_t>(), ctx.routing.probs.data<C>());

    // Runs with T = 0 too: the count reducer is a collective the group's other ranks enter.
    if (training && config_.aux_loss_enabled()) {
      AuxSpec aux = aux_spec(config_, T, ctx.batch_size);
      Tensor counts = Tensor::empty({aux.groups, E}, cdt);
      Tensor score_sums = Tensor::empty({aux.groups, E}, cdt);
      aux_loss_statistics(aux, logits, counts.data<C>(), score_sums.data<C>());
      // The per-sequence loss counts each sequence's S tokens (Megatron's reshape to [S, B*E]).
      double token_count = double(T / aux.groups);
      Tensor reduced = aux.groups == 1 ? counts.reshape({E}) : counts;
      if (aux_count_reducer_) aux_count_reducer_(reduced, token_count);
      MOE_CHECK(token_count >= 0, "TopKRouter: aux-loss token count is ", token_count);
      // No token anywhere in the group: no loss and no gradient.
      ctx.aux_loss_active = token_count > 0;
      double total = 0.0;
      for (int64_t i = 0; i < aux.groups * E; ++i) {
        total += double(score_sums.data<C>()[i]) * double(counts.data<C>()[i]);
      }
      ctx.aux_tokens_per_expert = counts;
      ctx.aux_token_count = token_count;
      if (ctx.aux_loss_active) {
        ctx.losses.load_balancing_loss = total * aux_loss_factor(config_, aux, token_count);
      }
    }
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
  return ctx.routing;
}

void TopKRouter::backward(RouterContext& ctx, const Tensor& grad_probs, Tensor& grad_hidden,
                          double aux_loss_grad_scale) {
  MOE_CHECK(ctx.logits.defined(), "TopKRouter::backward: the context holds no forward state");
  const int64_t H = config_.hidden_size, E = config_.num_experts, K = config_.moe_router_topk;
  const int64_t T = ctx.routing.num_tokens;
  const DType cdt = ctx.logits.dtype();
  check_shape(grad_probs, {T, K}, "TopKRouter::backward grad_probs");
  check_dtype(grad_probs, cdt, "TopKRouter::backward grad_probs");
  check_shape(grad_hidden, ctx.input_shape, "TopKRouter::backward grad_hidden");

  Tensor dlogits({T, E}, cdt);
  internal::with_compute_type(cdt, [&](auto tag) {
    using C = decltype(tag);
    const C* logits = ctx.logits.data<C>();
    route_tokens_backward(route_spec(config_, T), logits, ctx.routing.experts.data<int32_t>(),
                          grad_probs.data<C>(), dlogits.data<C>());
    AuxSpec aux = aux_spec(config_, T, ctx.batch_size);
    double aux_factor = ctx.aux_loss_active ? aux_loss_grad_scale *
                                                  aux_loss_factor(config_, aux, ctx.aux_token_count)
                                            : 0.0;
    double z_factor = ctx.z_loss_active ? aux_loss_grad_scale * z_loss_coeff() / double(T) : 0.0;
    if (aux_factor != 0.0 || z_factor != 0.0) {
      loss_backward(aux, logits,
                    ctx.aux_loss_active ? ctx.aux_tokens_per_expert.data<C>() : nullptr,
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

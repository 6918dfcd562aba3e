#include "moe/optim/optimizer.h"

#include <cmath>
#include <cstdio>
#include <numeric>

#include "moe/comm/fault_injection.h"
#include "moe/tensor/ops.h"
#include "update_kernels.h"

namespace moe::optim {

void validate(const OptimizerConfig& c) {
  MOE_CHECK(c.optimizer == "adam" || c.optimizer == "sgd", "--optimizer '", c.optimizer,
            "' is not one of adam, sgd");
  MOE_CHECK(c.lr >= 0.0 && std::isfinite(c.lr), "--lr must be a finite number >= 0, got ", c.lr);
  MOE_CHECK(c.weight_decay >= 0.0, "--weight-decay must be >= 0, got ", c.weight_decay);
  MOE_CHECK(c.adam_beta1 >= 0.0 && c.adam_beta1 < 1.0, "--adam-beta1 must be in [0, 1), got ",
            c.adam_beta1);
  MOE_CHECK(c.adam_beta2 >= 0.0 && c.adam_beta2 < 1.0, "--adam-beta2 must be in [0, 1), got ",
            c.adam_beta2);
  MOE_CHECK(c.adam_eps > 0.0, "--adam-eps must be positive, got ", c.adam_eps);
  MOE_CHECK(c.sgd_momentum >= 0.0 && c.sgd_momentum < 1.0, "--sgd-momentum must be in [0, 1), got ",
            c.sgd_momentum);
  MOE_CHECK(c.clip_grad >= 0.0, "--clip-grad must be >= 0 (0 disables clipping), got ",
            c.clip_grad);
  MOE_CHECK(!(c.bf16 && c.fp16), "--bf16 and --fp16 conflict: choose one");
  MOE_CHECK(c.loss_scale >= 0.0, "--loss-scale must be positive when given, got ", c.loss_scale);
  if (c.fp16 && c.loss_scale == 0.0) {  // the dynamic scaler validates its own values
    GradScaler::dynamic(c.initial_loss_scale, c.min_loss_scale, c.loss_scale_window, c.hysteresis);
  }
}

namespace {

// A run of consecutive elements of one parameter inside the range a rank updates.
struct Segment {
  int param = -1;
  int64_t begin = 0;  // offset in the group's flat buffer
  int64_t end = 0;
  bool decay = false;            // weight decay applies
  bool counted_in_norm = false;  // this rank contributes these elements to the global norm
};

bool megatron_decays(const ParamSpec& spec) {
  const std::string& name = spec.name;
  bool is_bias = name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
  return spec.weight_decay && spec.shape.size() > 1 && !is_bias;
}

double mib(int64_t bytes) {
  return double(bytes) / (1024.0 * 1024.0);
}

}  // namespace

struct Optimizer::Impl {
  // One per ParamGroup (dense, expert).
  struct Group {
    ParamGroup kind = ParamGroup::kDense;
    const comm::ProcessGroup* reduce = nullptr;       // dp x cp (dense) or expert-dp (expert)
    const comm::ProcessGroup* tp_replicas = nullptr;  // tp (dense) or expert-tp (expert)
    int64_t numel = 0;
    bool distributed = false;                // main params and states sharded over `reduce`
    std::vector<int64_t> shard_sizes;        // elements per reduce rank (distributed)
    int64_t shard_begin = 0, shard_end = 0;  // flat range this rank updates
    std::vector<Segment> segments;
    Tensor grad_shard;  // F32 [shard]: the reduce-scatter target (a view when unsharded)
    Tensor main;        // F32 [shard]: main params (aliases the model params when fp32 and whole)
    bool main_aliases_model = false;
    Tensor exp_avg;     // F32 [shard] (adam)
    Tensor exp_avg_sq;  // F32 [shard] (adam)
    Tensor momentum;    // F32 [shard] (sgd with momentum)
    int64_t shard_numel() const { return shard_end - shard_begin; }
  };

  ParameterStore& store;
  const comm::ParallelState& parallel;
  OptimizerConfig config;
  GradScaler scaler;
  double lr = 0.0;
  double weight_decay = 0.0;
  int64_t step_count = 0;
  Group groups[kParamGroupCount];

  Impl(ParameterStore& s, const comm::ParallelState& p, OptimizerConfig c)
      : store(s),
        parallel(p),
        config(std::move(c)),
        lr(config.lr),
        weight_decay(config.weight_decay) {}

  void build_group(Group& g, ParamGroup kind);
  void reduce_gradients(Group& g, double pre_scale);
  std::string reduce_gradients_checked(Group& g, double pre_scale);
  bool grad_reduction_checked = false;
  void accumulate_statistics(const Group& g, double stats[3]) const;
  void update(Group& g);
  void publish(Group& g);
};

void Optimizer::Impl::build_group(Group& g, ParamGroup kind) {
  g.kind = kind;
  bool dense = kind == ParamGroup::kDense;
  g.reduce = dense ? &parallel.dp_cp_group : &parallel.expert_dp_group;
  g.tp_replicas = dense ? &parallel.tp_group : &parallel.etp_group;
  Tensor flat_params = store.flat_params(kind);
  Tensor flat_grads = store.flat_grads(kind);
  g.numel = flat_params.numel();

  // Replicas must agree on the buffer size, or the collectives would mismatch.
  int64_t local = g.numel;
  std::vector<int64_t> sizes = comm::all_gather_values({&local, 1}, *g.reduce);
  for (size_t r = 0; r < sizes.size(); ++r) {
    MOE_CHECK(sizes[r] == g.numel, dense ? "dense" : "expert",
              " parameter count differs across the data-parallel group '", g.reduce->name(),
              "': rank ", g.reduce->rank(), " has ", g.numel, ", rank ", r, " has ", sizes[r]);
  }

  g.distributed = config.use_distributed_optimizer;
  int replicas = g.reduce->size();
  if (g.distributed) {
    g.shard_sizes = comm::even_split(g.numel, replicas);
    g.shard_begin = std::accumulate(g.shard_sizes.begin(), g.shard_sizes.begin() + g.reduce->rank(),
                                    int64_t(0));
    g.shard_end = g.shard_begin + g.shard_sizes[size_t(g.reduce->rank())];
  } else {
    g.shard_begin = 0;
    g.shard_end = g.numel;
  }
  // Each element enters the norm once: from its shard owner (distributed) or from replica 0; a
  // pipeline copy never (its owning stage counts it).
  bool replica_counts = g.distributed || g.reduce->rank() == 0;
  for (int i = 0; i < store.count(); ++i) {
    const ParamSpec& spec = store.spec(ParamHandle{i});
    if (spec.group != kind || !spec.trainable) continue;  // buffers are not in the flat buffers
    int64_t begin = store.offset(ParamHandle{i});
    int64_t end = begin + shape_numel(spec.shape);
    begin = std::max(begin, g.shard_begin);
    end = std::min(end, g.shard_end);
    if (begin >= end) continue;
    bool counted = replica_counts && !spec.pipeline_copy &&
                   (!spec.tensor_parallel_duplicate || g.tp_replicas->rank() == 0);
    g.segments.push_back({i, begin, end, megatron_decays(spec), counted});
  }

  int64_t n = g.shard_numel();
  bool sharded_grads = g.distributed && replicas > 1;
  g.grad_shard = sharded_grads ? Tensor({n}) : flat_grads.rows(g.shard_begin, g.shard_end);
  g.main_aliases_model = store.param_dtype() == DType::F32 && !sharded_grads;
  if (g.main_aliases_model) {
    g.main = flat_params.rows(g.shard_begin, g.shard_end);
  } else {
    g.main = flat_params.rows(g.shard_begin, g.shard_end).to(DType::F32);
  }
  if (config.optimizer == "adam") {
    g.exp_avg = Tensor({n});
    g.exp_avg_sq = Tensor({n});
  } else if (config.sgd_momentum != 0.0) {
    g.momentum = Tensor({n});
  }
}

void Optimizer::Impl::reduce_gradients(Group& g, double pre_scale) {
  if (g.numel == 0) return;
  Tensor flat = store.flat_grads(g.kind);
  if (pre_scale != 1.0) scale(flat, float(pre_scale));
  if (g.reduce->size() == 1) return;
  if (g.distributed) {
    comm::reduce_scatter_v(flat, g.grad_shard, g.shard_sizes, *g.reduce);
  } else {
    comm::all_reduce(flat, *g.reduce);
  }
}

// reduce_gradients with OptimizerConfig::check_grad_reduction's check; returns what it verified.
// The expected values are summed in fp64 (with the sums of magnitudes that bound the fp32
// reduction's rounding) over the same group, which must have the ranks the layout says.
std::string Optimizer::Impl::reduce_gradients_checked(Group& g, double pre_scale) {
  const bool dense = g.kind == ParamGroup::kDense;
  const char* what = dense ? "dense" : "expert";
  const int64_t n = g.numel;
  Tensor flat = store.flat_grads(g.kind);
  Tensor sums = Tensor::empty({2 * n + 1}, DType::F64);  // [sums n | magnitudes n | ranks 1]
  double* want = sums.data<double>();
  const float* local = flat.data<float>();
  for (int64_t i = 0; i < n; ++i) {
    want[i] = local[i];
    want[n + i] = std::fabs(local[i]);
  }
  want[2 * n] = 1.0;
  comm::all_reduce(sums, *g.reduce);
  const int64_t layout_ranks =
      dense ? int64_t(parallel.dp) * parallel.sizes.cp : int64_t(parallel.edp);
  MOE_CHECK(int64_t(want[2 * n]) == layout_ranks, "--check-grad-reduction: the ", what,
            " gradients are reduced over ", int64_t(want[2 * n]), " ranks ('", g.reduce->name(),
            "') but the layout has ", layout_ranks,
            dense ? " data-parallel" : " expert-data-parallel", " ranks");
  reduce_gradients(g, pre_scale);
  // MOE_FAULT_INJECT=grad-reduction:rank:iteration: this rank's gradients as if reduced twice.
  if (comm::fault_requested("grad-reduction")) scale(g.grad_shard, 2.0f);
  // fp32 sums in rank order, then the 1 / (dp x loss scale) factor: within (ranks + 2) roundings
  // of the magnitudes' sum.
  const double tolerance = double(layout_ranks + 2) * std::ldexp(1.0, -24);
  const float* got = g.grad_shard.data<float>();
  double checksum = 0;
  for (int64_t i = g.shard_begin; i < g.shard_end; ++i) {
    const double expected = want[i] * pre_scale, reduced = got[i - g.shard_begin];
    checksum += reduced;
    if (std::fabs(reduced - expected) <= tolerance * want[n + i] * std::fabs(pre_scale)) continue;
    std::string name = "?";
    for (int p = 0; p < store.count(); ++p) {
      const ParamHandle handle{p};
      const ParamSpec& spec = store.spec(handle);
      if (spec.group == g.kind && spec.trainable && store.offset(handle) <= i &&
          i < store.offset(handle) + shape_numel(spec.shape)) {
        name = spec.name;
      }
    }
    MOE_CHECK(false, "--check-grad-reduction: ", what, " gradient element ", i, " (parameter '",
              name, "') is ", reduced, " after the reduction over '", g.reduce->name(),
              "' but the fp64 sum of the ", layout_ranks, " ranks' gradients gives ", expected,
              " (a doubled, missing or misdirected reduction?)");
  }
  return detail::concat(what, " gradients reduced over ", layout_ranks, " rank(s) of '",
                        g.reduce->name(), "', checksum ", checksum, " on this rank's ",
                        g.shard_end - g.shard_begin, " elements");
}

// stats[0] += squares counted in the norm, stats[1] += squares of everything this rank updates
// (non-finite iff some gradient is), stats[2] += zero elements counted in the norm (when logged).
void Optimizer::Impl::accumulate_statistics(const Group& g, double stats[3]) const {
  const float* grad = g.grad_shard.data<float>();
  for (const Segment& s : g.segments) {
    const float* p = grad + (s.begin - g.shard_begin);
    int64_t n = s.end - s.begin;
    double squares = sum_of_squares(p, n);
    stats[1] += squares;
    if (!s.counted_in_norm) continue;
    stats[0] += squares;
    if (config.log_num_zeros_in_grad) stats[2] += double(count_zeros(p, n));
  }
}

void Optimizer::Impl::update(Group& g) {
  float* main = g.main.data<float>();
  const float* grad = g.grad_shard.data<float>();
  for (const Segment& s : g.segments) {
    int64_t at = s.begin - g.shard_begin, n = s.end - s.begin;
    double wd = s.decay ? weight_decay : 0.0;
    if (config.optimizer == "adam") {
      AdamStep h{lr, config.adam_beta1, config.adam_beta2, config.adam_eps, wd, step_count};
      adam_update(main + at, grad + at, g.exp_avg.data<float>() + at,
                  g.exp_avg_sq.data<float>() + at, n, h);
    } else {
      SgdStep h{lr, config.sgd_momentum, wd, step_count == 1};
      float* buffer = g.momentum.defined() ? g.momentum.data<float>() + at : nullptr;
      sgd_update(main + at, grad + at, buffer, n, h);
    }
  }
}

// Writes the updated main parameters into the model parameters of every replica.
void Optimizer::Impl::publish(Group& g) {
  if (g.main_aliases_model || g.numel == 0) return;
  Tensor flat = store.flat_params(g.kind);
  if (!g.distributed || g.reduce->size() == 1) {
    Tensor mine = flat.rows(g.shard_begin, g.shard_end);
    mine.copy_from(g.main);
    return;
  }
  Tensor local = store.param_dtype() == DType::F32 ? g.main : g.main.to(store.param_dtype());
  comm::all_gather_v(local, flat, g.shard_sizes, *g.reduce);
}

Optimizer::Optimizer(ParameterStore& store, const comm::ParallelState& parallel,
                     OptimizerConfig config) {
  validate(config);
  MOE_CHECK(store.allocated(), "the optimizer needs an allocated ParameterStore");
  DType expected = config.fp16 ? DType::F16 : config.bf16 ? DType::BF16 : DType::F32;
  MOE_CHECK(store.param_dtype() == expected, "model parameters are ",
            dtype_name(store.param_dtype()), " but the flags (--bf16 ", config.bf16, ", --fp16 ",
            config.fp16, ") need ", dtype_name(expected));
  impl_ = std::make_unique<Impl>(store, parallel, std::move(config));
  const OptimizerConfig& c = impl_->config;
  if (c.loss_scale > 0.0) {
    impl_->scaler = GradScaler::constant(c.loss_scale);
  } else if (c.fp16) {
    impl_->scaler = GradScaler::dynamic(c.initial_loss_scale, c.min_loss_scale, c.loss_scale_window,
                                        c.hysteresis);
  }
  impl_->build_group(impl_->groups[0], ParamGroup::kDense);
  impl_->build_group(impl_->groups[1], ParamGroup::kExpert);
}

Optimizer::~Optimizer() = default;

StepResult Optimizer::step() {
  comm::fault_point("optimizer");
  Impl& m = *impl_;
  // Mean over data-parallel replicas (Megatron scales expert gradients by 1 / (dp x cp) too:
  // experts already summed the tokens of every expert-parallel rank) and loss unscaling, folded
  // into one pass before the reduction.
  double pre_scale = 1.0 / (double(m.parallel.dp_cp_group.size()) * m.scaler.scale());
  std::string checked;
  if (m.config.check_grad_reduction && !m.grad_reduction_checked) {
    for (auto& g : m.groups) {
      if (g.numel > 0)
        checked += (checked.empty() ? "" : "; ") + m.reduce_gradients_checked(g, pre_scale);
    }
    m.grad_reduction_checked = true;
  } else {
    for (auto& g : m.groups) m.reduce_gradients(g, pre_scale);
  }

  // One world all-reduce: every element is counted exactly once across the world.
  Tensor stats({3}, DType::F64);
  double* s = stats.data<double>();
  for (const auto& g : m.groups) m.accumulate_statistics(g, s);
  if (m.parallel.world.size() > 1) comm::all_reduce(stats, m.parallel.world);

  StepResult result;
  result.grad_reduction_check = checked;
  result.grad_norm = std::sqrt(s[0]);
  result.num_zeros = m.config.log_num_zeros_in_grad ? int64_t(s[2]) : -1;
  bool found_inf = !std::isfinite(s[1]);
  m.scaler.update(found_inf);
  result.loss_scale = m.scaler.scale();
  if (found_inf) {
    result.skipped = true;
    result.clip_coeff = 1.0;
    return result;
  }

  if (m.config.clip_grad > 0.0) {
    double coeff = m.config.clip_grad / (result.grad_norm + 1.0e-6);
    if (coeff < 1.0) {
      for (auto& g : m.groups) {
        if (g.shard_numel() > 0) scale(g.grad_shard, float(coeff));
      }
      result.clip_coeff = coeff;
    }
  }

  m.step_count += 1;
  for (auto& g : m.groups) {
    m.update(g);
    m.publish(g);
  }
  return result;
}

void Optimizer::set_lr(double lr) {
  MOE_CHECK(lr >= 0.0 && std::isfinite(lr), "learning rate must be finite and >= 0, got ", lr);
  impl_->lr = lr;
}
double Optimizer::lr() const {
  return impl_->lr;
}
void Optimizer::set_weight_decay(double weight_decay) {
  MOE_CHECK(weight_decay >= 0.0, "weight decay must be >= 0, got ", weight_decay);
  impl_->weight_decay = weight_decay;
}
double Optimizer::weight_decay() const {
  return impl_->weight_decay;
}
double Optimizer::loss_scale() const {
  return impl_->scaler.scale();
}
const OptimizerConfig& Optimizer::config() const {
  return impl_->config;
}

MemoryReport Optimizer::memory() const {
  MemoryReport r;
  for (const auto& g : impl_->groups) {
    r.param_bytes += int64_t(impl_->store.flat_params(g.kind).nbytes());
    r.grad_bytes += int64_t(impl_->store.flat_grads(g.kind).nbytes());
    if (g.distributed && g.reduce->size() > 1) r.grad_bytes += int64_t(g.grad_shard.nbytes());
    if (!g.main_aliases_model) r.main_param_bytes += int64_t(g.main.nbytes());
    for (const Tensor* t : {&g.exp_avg, &g.exp_avg_sq, &g.momentum}) {
      if (t->defined()) r.optimizer_state_bytes += int64_t(t->nbytes());
    }
  }
  return r;
}

std::string Optimizer::memory_summary() const {
  MemoryReport r = memory();
  const Impl& m = *impl_;
  char line[320];
  std::snprintf(line, sizeof(line),
                "memory per rank: params %.2f MiB (%s), grads %.2f MiB (fp32), main params "
                "%.2f MiB, optimizer state %.2f MiB (%s, %s over dp=%d, expert-dp=%d)",
                mib(r.param_bytes), std::string(dtype_name(m.store.param_dtype())).c_str(),
                mib(r.grad_bytes), mib(r.main_param_bytes), mib(r.optimizer_state_bytes),
                m.config.optimizer.c_str(),
                m.config.use_distributed_optimizer ? "sharded" : "replicated",
                m.groups[0].reduce->size(), m.groups[1].reduce->size());
  return line;
}

std::vector<StateTensor> Optimizer::state_tensors() {
  std::vector<StateTensor> out;
  for (auto& g : impl_->groups) {
    std::pair<const char*, Tensor*> kinds[] = {{"main_param", &g.main},
                                               {"exp_avg", &g.exp_avg},
                                               {"exp_avg_sq", &g.exp_avg_sq},
                                               {"momentum_buffer", &g.momentum}};
    for (auto& [kind, tensor] : kinds) {
      if (!tensor->defined() || (tensor == &g.main && g.main_aliases_model)) continue;
      for (const Segment& s : g.segments) {
        int64_t param_start = impl_->store.offset(ParamHandle{s.param});
        Tensor piece = tensor->rows(s.begin - g.shard_begin, s.end - g.shard_begin);
        out.push_back(
            {kind, ParamHandle{s.param}, s.begin - param_start, s.end - param_start, piece});
      }
    }
  }
  return out;
}

OptimizerScalars Optimizer::scalars() const {
  return {impl_->step_count, impl_->scaler.state()};
}

void Optimizer::set_scalars(const OptimizerScalars& scalars) {
  MOE_CHECK(scalars.step >= 0, "optimizer step from checkpoint must be >= 0, got ", scalars.step);
  impl_->step_count = scalars.step;
  impl_->scaler.set_state(scalars.scaler);
}

void Optimizer::reload_main_params() {
  for (auto& g : impl_->groups) {
    if (g.main_aliases_model) continue;
    g.main.copy_from(impl_->store.flat_params(g.kind).rows(g.shard_begin, g.shard_end));
  }
}

}  // namespace moe::optim

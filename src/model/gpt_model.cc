#include "moe/model/gpt_model.h"

#include <cmath>
#include <optional>

#include "moe/model/layers.h"
#include "moe/moe/ep_dispatchers.h"
#include "moe/moe/moe_layer.h"
#include "moe/tensor/ops.h"
#include "moe/tensor/rng.h"

namespace moe::model {

namespace {

// Dropout sites (the third component of dropout_key).
enum DropoutSite : int64_t { kEmbeddingDropout, kAttentionProbs, kAttentionOutput, kMlpOutput };
constexpr int64_t kEmbeddingLayer = -1;

uint64_t name_hash(const std::string& name) {  // FNV-1a: a stable stream id per parameter
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char c : name) hash = (hash ^ c) * 0x100000001b3ull;
  return hash;
}

enum class InitKind { kNormal, kScaledNormal, kOnes, kZeros };

// Replicated parameters that see only this tp rank's rows: with sequence parallelism the norms,
// row-parallel biases and position embeddings, and with any tp > 1 the MoE routers. The gradient
// one backward adds to them is summed over tp (Megatron's finalize_model_grads does this for
// sequence-parallel parameters), so every tp rank ends with the same full gradient.
class TensorParallelGradSync {
 public:
  // Parameters whose gradient sums over tp only with sequence parallelism.
  void add_if_sequence_parallel(ParamHandle handle) {
    if (sequence_parallel && handle.index >= 0) handles_.push_back(handle);
  }
  // Parameters that always see a tp rank's own tokens when tp > 1 (MoE routers).
  void add_if_tensor_parallel(ParamHandle handle) {
    if (tensor_parallel && handle.index >= 0) handles_.push_back(handle);
  }
  bool sequence_parallel = false, tensor_parallel = false;
  bool empty() const { return handles_.empty(); }
  // F32 [sum of the gradients' sizes]: the gradients back to back, in handle order.
  Tensor snapshot(const ParameterStore& store) const {
    int64_t total = 0;
    for (ParamHandle h : handles_) total += store.grad(h).numel();
    Tensor values = Tensor::empty({total}, DType::F32);
    int64_t offset = 0;
    for (ParamHandle h : handles_) {
      Tensor grad = store.grad(h);
      values.rows(offset, offset + grad.numel()).copy_from(grad.reshape({grad.numel()}));
      offset += grad.numel();
    }
    return values;
  }
  // Replaces each gradient g by before + allreduce_tp(g - before).
  void reduce(const ParameterStore& store, const Tensor& before, const TensorParallel& tp) const {
    Tensor delta = snapshot(store);
    axpy(-1.0f, before, delta);
    comm::all_reduce(delta, tp.group);
    axpy(1.0f, before, delta);
    int64_t offset = 0;
    for (ParamHandle h : handles_) {
      Tensor grad = store.grad(h);
      grad.copy_from(delta.rows(offset, offset + grad.numel()).reshape(grad.shape()));
      offset += grad.numel();
    }
  }

 private:
  std::vector<ParamHandle> handles_;
};

struct LayerState {
  Tensor input;               // [rows_local, h]: kept even when recomputing
  bool materialized = false;  // false: only `input` is kept (full recomputation)
  Norm::Saved input_norm, pre_mlp_norm;
  SelfAttention::Saved attention;
  MLP::Saved mlp;
  MoEContext moe;
};

}  // namespace

namespace detail {
struct GPTContextState {
  BatchShape shape;
  int64_t row_offset = 0;            // first global row this rank holds (sequence parallelism)
  Tensor tokens;                     // [b, s] (first stage)
  Tensor labels;                     // [rows] I64 in row order (last stage)
  std::vector<double> loss_weights;  // [rows] mask / mask sum (last stage)
  std::vector<LayerState> layers;
  Norm::Saved final_norm;
  OutputLayer::Saved output;
  Tensor softmax;  // [rows, V_local]
};
}  // namespace detail

GPTContext::GPTContext() = default;
GPTContext::~GPTContext() = default;
GPTContext::GPTContext(GPTContext&&) noexcept = default;
GPTContext& GPTContext::operator=(GPTContext&&) noexcept = default;
bool GPTContext::has_saved_state() const {
  return state_ != nullptr;
}
void GPTContext::release() {
  state_.reset();
}

namespace {

class TransformerLayer {
 public:
  TransformerLayer(ParameterStore& store, const TransformerConfig& config, int number,
                   const TensorParallel& tp, std::unique_ptr<TokenDispatcher> dispatcher,
                   uint64_t jitter_seed)
      : number_(number),
        config_(config),
        tp_(tp),
        prefix_("decoder.layers." + std::to_string(number)),
        input_norm_(store, prefix_ + ".input_layernorm", config.hidden_size, config.normalization,
                    config.norm_epsilon),
        attention_(store, prefix_ + ".self_attention", config, tp),
        pre_mlp_norm_(store, prefix_ + ".pre_mlp_layernorm", config.hidden_size,
                      config.normalization, config.norm_epsilon) {
    if (config.is_moe_layer(number)) {
      MoEConfig moe_config = config.moe_config();
      if (tp.size() > 1 && moe_config.moe_z_loss_coeff) {
        // Each tp rank's z-loss covers its own tokens: average over tp, not sum (Megatron).
        *moe_config.moe_z_loss_coeff /= double(tp.size());
      }
      moe_ = std::make_unique<MoELayer>(moe_config, store, prefix_ + ".mlp", std::move(dispatcher),
                                        jitter_seed);
      if (tp.size() > 1) {
        // The tp ranks hold one micro-batch's tokens between them: the aux loss counts tokens
        // over tp, as Megatron's get_tokens_per_expert_and_token_count does over tp x cp.
        moe_->router().set_aux_count_reducer(make_aux_count_reducer(tp.group));
      }
    } else {
      mlp_.emplace(store, prefix_ + ".mlp", config, tp);
    }
  }

  const std::string& prefix() const { return prefix_; }
  MoELayer* moe() const { return moe_.get(); }

  void register_params(const ParameterStore& store,
                       std::vector<std::pair<ParamHandle, InitKind>>& init,
                       TensorParallelGradSync& sync) const {
    for (const Norm* norm : {&input_norm_, &pre_mlp_norm_}) {
      init.push_back({norm->weight(), InitKind::kOnes});
      sync.add_if_sequence_parallel(norm->weight());
      if (norm->bias().index >= 0) {
        init.push_back({norm->bias(), InitKind::kZeros});
        sync.add_if_sequence_parallel(norm->bias());
      }
    }
    auto add_linear = [&](ParamHandle weight, ParamHandle bias, InitKind kind,
                          bool replicated_bias) {
      init.push_back({weight, kind});
      if (bias.index < 0) return;
      init.push_back({bias, InitKind::kZeros});
      if (replicated_bias) sync.add_if_sequence_parallel(bias);
    };
    add_linear(attention_.linear_qkv().weight(), attention_.linear_qkv().bias(), InitKind::kNormal,
               false);
    add_linear(attention_.linear_proj().weight(), attention_.linear_proj().bias(),
               InitKind::kScaledNormal, true);
    if (mlp_) {
      add_linear(mlp_->linear_fc1().weight(), mlp_->linear_fc1().bias(), InitKind::kNormal, false);
      add_linear(mlp_->linear_fc2().weight(), mlp_->linear_fc2().bias(), InitKind::kScaledNormal,
                 true);
    } else {
      // The router sees only this tp rank's tokens (see moe_forward).
      sync.add_if_tensor_parallel(store.find(prefix_ + ".mlp.router.weight"));
      sync.add_if_tensor_parallel(store.find(prefix_ + ".mlp.router.bias"));
    }
  }

  // Saves what backward needs in `state`, or, with full recomputation, only the input.
  Tensor forward(const ParameterStore& store, const Tensor& x, const BatchShape& shape,
                 int64_t row_offset, const GPTContext& ctx, LayerState& state,
                 std::vector<MoELossReport>* losses) const {
    if (config_.recompute_granularity != "full") {
      return run_forward(store, x, shape, row_offset, ctx, state, losses);
    }
    LayerState discarded;
    Tensor out = run_forward(store, x, shape, row_offset, ctx, discarded, losses);
    state = LayerState();
    state.input = x;
    return out;
  }

  Tensor backward(const ParameterStore& store, const Tensor& dy, const BatchShape& shape,
                  int64_t row_offset, const GPTContext& ctx, LayerState& state) const {
    if (!state.materialized) {  // full recomputation: the same dropout keys give the same masks
      Tensor input = state.input;
      run_forward(store, input, shape, row_offset, ctx, state, nullptr);
    }
    float hidden_p = ctx.training ? config_.hidden_dropout : 0.0f;
    int64_t first_index = row_offset * dy.dim(1);

    Tensor dmlp = dy.clone();
    apply_dropout(dmlp, hidden_p, dropout_key(ctx.dropout_seed, number_, kMlpOutput), first_index);
    Tensor dmlp_in;
    if (moe_) {
      dmlp_in = moe_backward(dmlp, shape, ctx.moe_aux_loss_grad_scale, state.moe);
    } else {
      dmlp_in = mlp_->backward(store, state.mlp, dmlp);
    }
    Tensor dresidual = pre_mlp_norm_.backward(store, state.pre_mlp_norm, dmlp_in);
    add(dresidual, dy, dresidual);

    Tensor dattention = dresidual.clone();
    apply_dropout(dattention, hidden_p, dropout_key(ctx.dropout_seed, number_, kAttentionOutput),
                  first_index);
    Tensor dnormed = attention_.backward(store, state.attention, dattention);
    Tensor dx = input_norm_.backward(store, state.input_norm, dnormed);
    add(dx, dresidual, dx);
    state = LayerState();  // the activations are no longer needed
    return dx;
  }

 private:
  // Without sequence parallelism the tp ranks hold the same tokens; each sends only its own
  // block of sequence positions through the MoE layer (no duplicated expert work, expert
  // gradients from disjoint tokens) and the outputs are all-gathered, as sequence parallelism
  // would do. With it, the rank's rows are already its own block.
  bool splits_tokens() const { return tp_.size() > 1 && !tp_.sequence_parallel; }
  TensorParallel gather_group() const { return TensorParallel{tp_.group, true}; }

  Tensor moe_forward(const Tensor& x, const BatchShape& shape, bool training,
                     MoEContext& saved) const {
    Tensor own = x;
    if (splits_tokens()) {
      MOE_CHECK(shape.seq % tp_.size() == 0, "MoE layers with tensor parallelism split the ",
                "sequence over tp ranks: sequence length ", shape.seq,
                " must be divisible by tensor_model_parallel_size (", tp_.size(), ")");
      int64_t block = x.dim(0) / tp_.size();
      own = x.rows(tp_.rank() * block, (tp_.rank() + 1) * block);
    }
    int64_t local_seq = own.dim(0) / shape.batch;
    Tensor out = moe_->forward(own.reshape({local_seq, shape.batch, x.dim(1)}), saved, training)
                     .reshape(own.shape());
    return splits_tokens() ? enter_tp_region(out, gather_group()) : out;
  }

  Tensor moe_backward(const Tensor& dy, const BatchShape& shape, double aux_loss_grad_scale,
                      MoEContext& saved) const {
    Tensor own = dy;
    if (splits_tokens()) {  // every tp rank holds the same dy: the own block is its share
      int64_t block = dy.dim(0) / tp_.size();
      own = dy.rows(tp_.rank() * block, (tp_.rank() + 1) * block).clone();
    }
    int64_t local_seq = own.dim(0) / shape.batch;
    Tensor dx =
        moe_->backward(saved, own.reshape({local_seq, shape.batch, dy.dim(1)}), aux_loss_grad_scale)
            .reshape(own.shape());
    return splits_tokens() ? enter_tp_region(dx, gather_group()) : dx;
  }

  Tensor run_forward(const ParameterStore& store, const Tensor& x, const BatchShape& shape,
                     int64_t row_offset, const GPTContext& ctx, LayerState& saved,
                     std::vector<MoELossReport>* losses) const {
    saved.input = x;
    saved.materialized = true;
    float hidden_p = ctx.training ? config_.hidden_dropout : 0.0f;
    int64_t first_index = row_offset * x.dim(1);

    Tensor normed = input_norm_.forward(store, x, saved.input_norm);
    Tensor attention_out = attention_.forward(
        store, normed, shape, dropout_key(ctx.dropout_seed, number_, kAttentionProbs), ctx.training,
        saved.attention);
    apply_dropout(attention_out, hidden_p, dropout_key(ctx.dropout_seed, number_, kAttentionOutput),
                  first_index);
    Tensor residual = Tensor::empty(x.shape(), x.dtype());
    add(x, attention_out, residual);

    Tensor mlp_in = pre_mlp_norm_.forward(store, residual, saved.pre_mlp_norm);
    Tensor mlp_out;
    if (moe_) {
      mlp_out = moe_forward(mlp_in, shape, ctx.training, saved.moe);
      if (losses != nullptr) {
        const RouterLosses& l = MoELayer::losses(saved.moe);
        losses->push_back({number_, "load_balancing_loss", l.load_balancing_loss});
        losses->push_back({number_, "z_loss", l.z_loss});
      }
    } else {
      mlp_out = mlp_->forward(store, mlp_in, saved.mlp);
    }
    apply_dropout(mlp_out, hidden_p, dropout_key(ctx.dropout_seed, number_, kMlpOutput),
                  first_index);
    Tensor out = Tensor::empty(x.shape(), x.dtype());  // residual is saved by pre_mlp_norm
    add(residual, mlp_out, out);
    return out;
  }

  int number_;
  const TransformerConfig& config_;
  TensorParallel tp_;
  std::string prefix_;
  Norm input_norm_;
  SelfAttention attention_;
  Norm pre_mlp_norm_;
  std::optional<MLP> mlp_;
  std::unique_ptr<MoELayer> moe_;
};

}  // namespace

struct GPTModel::Impl {
  TensorParallel tp;
  std::optional<VocabParallelEmbedding> embedding;
  ParamHandle position_embedding;
  std::vector<std::unique_ptr<TransformerLayer>> layers;
  std::optional<Norm> final_norm;
  std::optional<OutputLayer> output;
  std::vector<std::pair<ParamHandle, InitKind>> init;
  TensorParallelGradSync sync;

  bool sequence_parallel() const { return tp.sequence_parallel; }
};

GPTModel::GPTModel(const TransformerConfig& config, const comm::ParallelState& parallel,
                   ParameterStore& store, GPTStage stage, DispatcherFactory dispatcher_factory)
    : config_(config), stage_(stage), store_(store), impl_(std::make_unique<Impl>()) {
  const comm::ParallelSizes& sizes = parallel.sizes;
  config_.validate(sizes.tp);
  if (stage_.num_layers < 0) stage_.num_layers = config_.num_layers - stage_.first_layer;
  MOE_CHECK(stage_.first_layer >= 0 && stage_.num_layers >= 0 &&
                stage_.first_layer + stage_.num_layers <= config_.num_layers,
            "pipeline stage layers [", stage_.first_layer, ", ",
            stage_.first_layer + stage_.num_layers, ") are outside num_layers (",
            config_.num_layers, ")");
  MOE_CHECK(!store.allocated(), "GPTModel needs a parameter store that is not allocated yet");
  bool has_moe = false;
  for (int i = stage_.first_layer; i < stage_.first_layer + stage_.num_layers; ++i) {
    has_moe = has_moe || config_.is_moe_layer(i);
  }
  MOE_CHECK(!(has_moe && sizes.ep > 1 && sizes.tp > 1 && !config_.sequence_parallel),
            "MoE layers with expert parallelism (expert_model_parallel_size = ", sizes.ep,
            ") and tensor parallelism (tensor_model_parallel_size = ", sizes.tp,
            ") require sequence parallelism: add --sequence-parallel (as Megatron-Core does)");
  if (!dispatcher_factory) {
    dispatcher_factory = [](const MoEConfig& moe_config, const comm::ParallelState& layout, int) {
      return make_token_dispatcher(moe_config, layout);
    };
  }

  Impl& m = *impl_;
  m.tp = TensorParallel{parallel.tp, config_.sequence_parallel && sizes.tp > 1};
  m.sync.sequence_parallel = m.tp.sequence_parallel;
  m.sync.tensor_parallel = m.tp.size() > 1;
  const TransformerConfig& c = config_;
  if (stage_.pre_process) {
    m.embedding.emplace(store, "embedding.word_embeddings.weight", c.padded_vocab_size,
                        c.hidden_size, m.tp);
    m.init.push_back({m.embedding->weight(), InitKind::kNormal});
    if (c.position_embedding_type == "learned_absolute") {
      ParamSpec spec;
      spec.name = "embedding.position_embeddings.weight";
      int64_t positions = c.max_position_embeddings > 0 ? c.max_position_embeddings : c.seq_length;
      spec.shape = {positions, c.hidden_size};
      spec.tensor_parallel_duplicate = true;
      m.position_embedding = store.declare(spec);
      m.init.push_back({m.position_embedding, InitKind::kNormal});
      m.sync.add_if_sequence_parallel(m.position_embedding);
    }
  }
  for (int i = stage_.first_layer; i < stage_.first_layer + stage_.num_layers; ++i) {
    std::unique_ptr<TokenDispatcher> dispatcher;
    if (c.is_moe_layer(i)) {
      dispatcher = dispatcher_factory(c.moe_config(), parallel, i);
    }
    m.layers.push_back(std::make_unique<TransformerLayer>(store, config_, i, m.tp,
                                                          std::move(dispatcher), uint64_t(i)));
    m.layers.back()->register_params(store, m.init, m.sync);
  }
  if (stage_.post_process) {
    m.final_norm.emplace(store, "decoder.final_layernorm", c.hidden_size, c.normalization,
                         c.norm_epsilon);
    m.init.push_back({m.final_norm->weight(), InitKind::kOnes});
    m.sync.add_if_sequence_parallel(m.final_norm->weight());
    if (m.final_norm->bias().index >= 0) {
      m.init.push_back({m.final_norm->bias(), InitKind::kZeros});
      m.sync.add_if_sequence_parallel(m.final_norm->bias());
    }
    const VocabParallelEmbedding* tied = nullptr;
    if (!c.untie_embeddings_and_output_weights) {
      MOE_CHECK(m.embedding.has_value(),
                "tied embedding and output weights need the embedding on the last pipeline "
                "stage; use --untie-embeddings-and-output-weights with pipeline parallelism");
      tied = &*m.embedding;
    }
    m.output.emplace(store, "output_layer.weight", c.hidden_size, c.padded_vocab_size, m.tp, tied);
    if (!m.output->tied()) m.init.push_back({m.output->weight(), InitKind::kNormal});
  }
}

GPTModel::~GPTModel() = default;

void GPTModel::init_parameters(uint64_t seed) {
  MOE_CHECK(store_.allocated(), "init_parameters needs the parameter store allocated");
  float std = config_.init_method_std;
  float output_std =
      config_.apply_scaled_init ? std / std::sqrt(2.0f * float(config_.num_layers)) : std;
  for (auto [handle, kind] : impl_->init) {
    const ParamSpec& spec = store_.spec(handle);
    Tensor local = store_.param(handle);
    if (kind == InitKind::kOnes || kind == InitKind::kZeros) {
      local.fill(kind == InitKind::kOnes ? 1.0f : 0.0f);
      continue;
    }
    float sigma = kind == InitKind::kScaledNormal ? output_std : std;
    Rng rng = Rng::derived(seed, name_hash(spec.name));
    std::vector<float> global(size_t(shape_numel(spec.global_shape)));
    for (float& value : global) value = rng.normal() * sigma;
    copy_global_block(Tensor::from_floats(global, spec.global_shape), spec, local);
  }
  for (const auto& layer : impl_->layers) {
    if (layer->moe() != nullptr) {
      layer->moe()->init_parameters(Rng::derived(seed, name_hash(layer->prefix())).next_u64(), std,
                                    output_std);
    }
  }
}

int64_t GPTModel::local_rows(int64_t micro_batch_size) const {
  int64_t rows = int64_t(config_.seq_length) * micro_batch_size;
  return impl_->sequence_parallel() ? rows / impl_->tp.size() : rows;
}

double GPTModel::forward(const Tensor& tokens, const Tensor& labels, GPTContext& ctx,
                         const Tensor& loss_mask) {
  MOE_CHECK(stage_.pre_process && stage_.post_process,
            "GPTModel::forward runs the whole model; a pipeline stage uses forward_step");
  return forward_step(tokens, labels, ctx, loss_mask).data<double>()[0];
}

void GPTModel::backward(GPTContext& ctx, float loss_grad) {
  ctx.moe_aux_loss_grad_scale = loss_grad;
  backward_step(ctx, Tensor::full({1}, loss_grad, DType::F64));
}

namespace {

// [b, s] integers or floats -> values in Megatron's row order (row s * B + b).
std::vector<double> row_order_values(const Tensor& t, const BatchShape& shape, const char* what) {
  check_shape(t, {shape.batch, shape.seq}, what);
  std::vector<double> values(size_t(shape.rows()));
  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t s = 0; s < shape.seq; ++s) {
      int64_t flat = b * shape.seq + s;
      double value = t.dtype() == DType::I64   ? double(t.data<int64_t>()[flat])
                     : t.dtype() == DType::I32 ? double(t.data<int32_t>()[flat])
                                               : double(t.get(flat));
      values[size_t(s * shape.batch + b)] = value;
    }
  }
  return values;
}

}  // namespace

Tensor GPTModel::forward_step(const Tensor& input, const Tensor& labels, GPTContext& ctx,
                              const Tensor& loss_mask, int64_t micro_batch_size) {
  Impl& m = *impl_;
  auto state = std::make_unique<detail::GPTContextState>();
  ctx.moe_losses.clear();
  int tp = m.tp.size();
  int64_t h = config_.hidden_size;
  Tensor hidden;
  if (stage_.pre_process) {
    check_ndim(input, 2, "tokens");
    state->shape = BatchShape{input.dim(1), input.dim(0)};
  } else {
    MOE_CHECK(micro_batch_size > 0,
              "forward_step on a later pipeline stage needs micro_batch_size");
    check_ndim(input, 2, "stage input hidden states");
    int64_t rows = input.dim(0) * (m.sequence_parallel() ? tp : 1);
    MOE_CHECK(rows % micro_batch_size == 0, "stage input has ", input.dim(0),
              " rows, not a whole number of sequences for micro_batch_size ", micro_batch_size);
    state->shape = BatchShape{rows / micro_batch_size, micro_batch_size};
  }
  BatchShape shape = state->shape;
  MOE_CHECK(!m.sequence_parallel() || shape.seq % tp == 0, "sequence length ", shape.seq,
            " must be divisible by tensor_model_parallel_size (", tp,
            ") with sequence parallelism");
  int64_t rows_local = m.sequence_parallel() ? shape.rows() / tp : shape.rows();
  state->row_offset = m.sequence_parallel() ? int64_t(m.tp.rank()) * rows_local : 0;
  if (stage_.pre_process) {
    state->tokens = input;
    hidden = m.embedding->forward(store_, input);
    if (m.position_embedding.index >= 0) {
      Tensor table = store_.param(m.position_embedding);
      MOE_CHECK(shape.seq <= table.dim(0), "sequence length ", shape.seq,
                " exceeds max_position_embeddings (", table.dim(0), ")");
      Tensor positions = Tensor::empty({rows_local, h}, hidden.dtype());
      for (int64_t r = 0; r < rows_local; ++r) {
        int64_t position = (state->row_offset + r) / shape.batch;
        positions.rows(r, r + 1).copy_from(table.rows(position, position + 1));
      }
      add(hidden, positions, hidden);
    }
    apply_dropout(hidden, ctx.training ? config_.hidden_dropout : 0.0f,
                  dropout_key(ctx.dropout_seed, kEmbeddingLayer, kEmbeddingDropout),
                  state->row_offset * h);
  } else {
    check_shape(input, {rows_local, h}, "stage input hidden states");
    check_dtype(input, store_.param_dtype(), "stage input hidden states");
    hidden = input;
  }
  state->layers.resize(m.layers.size());
  for (size_t i = 0; i < m.layers.size(); ++i) {
    hidden = m.layers[i]->forward(store_, hidden, shape, state->row_offset, ctx, state->layers[i],
                                  &ctx.moe_losses);
  }
  if (tp > 1 && !ctx.moe_losses.empty()) {  // each tp rank reported its share
    Tensor values({int64_t(ctx.moe_losses.size())}, DType::F64);
    for (size_t i = 0; i < ctx.moe_losses.size(); ++i)
      values.data<double>()[i] = ctx.moe_losses[i].value;
    comm::all_reduce(values, m.tp.group);
    for (size_t i = 0; i < ctx.moe_losses.size(); ++i)
      ctx.moe_losses[i].value = values.data<double>()[i];
  }
  if (!stage_.post_process) {
    ctx.state_ = std::move(state);
    return hidden;
  }
  Tensor normed = m.final_norm->forward(store_, hidden, state->final_norm);
  Tensor logits = m.output->forward(store_, normed, state->output);
  std::vector<double> label_values = row_order_values(labels, shape, "labels");
  state->labels = Tensor({shape.rows()}, DType::I64);
  for (int64_t r = 0; r < shape.rows(); ++r) {
    state->labels.data<int64_t>()[r] = int64_t(label_values[size_t(r)]);
  }
  std::vector<double> mask = loss_mask.defined() ? row_order_values(loss_mask, shape, "loss_mask")
                                                 : std::vector<double>(size_t(shape.rows()), 1.0);
  Tensor losses = vocab_parallel_cross_entropy(logits, state->labels, m.output->vocab_start(), m.tp,
                                               state->softmax);
  Tensor row_losses = losses.to(DType::F64);
  double mask_sum = 0, weighted = 0;
  for (int64_t r = 0; r < shape.rows(); ++r) {
    mask_sum += mask[size_t(r)];
    weighted += mask[size_t(r)] * row_losses.data<double>()[r];
  }
  state->loss_weights.resize(mask.size());
  for (size_t r = 0; r < mask.size(); ++r) {
    state->loss_weights[r] = mask_sum > 0 ? mask[r] / mask_sum : 0.0;
  }
  ctx.loss_tokens = mask_sum;
  ctx.lm_loss = mask_sum > 0 ? weighted / mask_sum : 0.0;
  ctx.state_ = std::move(state);
  Tensor loss({1}, DType::F64);
  loss.data<double>()[0] = ctx.lm_loss;
  return loss;
}

Tensor GPTModel::backward_step(GPTContext& ctx, const Tensor& output_grad) {
  MOE_CHECK(ctx.has_saved_state(), "backward_step needs a forward_step on this context first");
  Impl& m = *impl_;
  detail::GPTContextState& state = *ctx.state_;
  const BatchShape& shape = state.shape;
  bool sync = !m.sync.empty();
  Tensor before = sync ? m.sync.snapshot(store_) : Tensor();
  Tensor dhidden;
  if (stage_.post_process) {
    check_shape(output_grad, {1}, "loss gradient");
    double loss_grad = output_grad.get(0);
    Tensor dloss({shape.rows()}, DType::F64);
    for (int64_t r = 0; r < shape.rows(); ++r) {
      dloss.data<double>()[r] = loss_grad * state.loss_weights[size_t(r)];
    }
    Tensor dlogits = vocab_parallel_cross_entropy_backward(state.softmax, state.labels,
                                                           m.output->vocab_start(), dloss);
    state.softmax = Tensor();
    dhidden = m.final_norm->backward(store_, state.final_norm,
                                     m.output->backward(store_, state.output, dlogits));
  } else {
    dhidden = output_grad;
  }
  for (size_t i = m.layers.size(); i-- > 0;) {
    dhidden = m.layers[i]->backward(store_, dhidden, shape, state.row_offset, ctx, state.layers[i]);
  }
  if (stage_.pre_process) {
    int64_t h = config_.hidden_size;
    apply_dropout(dhidden, ctx.training ? config_.hidden_dropout : 0.0f,
                  dropout_key(ctx.dropout_seed, kEmbeddingLayer, kEmbeddingDropout),
                  state.row_offset * h);
    if (m.position_embedding.index >= 0) {
      Tensor grad = store_.grad(m.position_embedding);
      Tensor dvalues = dhidden.to(DType::F32);
      for (int64_t r = 0; r < dhidden.dim(0); ++r) {
        int64_t position = (state.row_offset + r) / shape.batch;
        Tensor grad_row = grad.rows(position, position + 1);
        axpy(1.0f, dvalues.rows(r, r + 1), grad_row);
      }
    }
    m.embedding->backward(store_, state.tokens, dhidden);
    dhidden = Tensor();
  }
  if (sync) m.sync.reduce(store_, before, m.tp);
  ctx.state_.reset();
  return dhidden;
}

}  // namespace moe::model

#include "moe/model/gpt_model.h"

#include <cmath>
#include <optional>

#include "moe/comm/process_group.h"
#include "moe/moe/ep_dispatchers.h"
#include "moe/tensor/ops.h"
#include "moe/tensor/rng.h"
#include "mtp.h"
#include "transformer_layer.h"

namespace moe::model {

namespace {

uint64_t name_hash(const std::string& name) {  // FNV-1a: a stable stream id per parameter
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char c : name) hash = (hash ^ c) * 0x100000001b3ull;
  return hash;
}

}  // namespace

namespace detail {
struct GPTContextState {
  BatchShape shape;
  int64_t row_offset = 0;            // first global row this rank holds (sequence parallelism)
  Tensor tokens;                     // [b, s] (first stage)
  Tensor labels;                     // [rows] I64 in row order (last stage)
  std::vector<double> loss_weights;  // [rows] mask / mask sum (last stage)
  std::vector<TransformerLayerContext> layers;
  Norm::Context final_norm;
  OutputLayer::Context output;
  Tensor softmax;  // [rows, V_local]
  MultiTokenPrediction::Context mtp;
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

struct GPTModel::Impl {
  TensorParallel tp;
  ContextParallel cp;
  std::optional<VocabParallelEmbedding> embedding;
  ParamHandle position_embedding;
  std::vector<std::unique_ptr<TransformerLayer>> layers;
  std::optional<Norm> final_norm;
  std::optional<OutputLayer> output;
  std::optional<MultiTokenPrediction> mtp;
  ParamRegistry params;
  // Megatron's embedding group (first and last pipeline stage) when the two stages each hold the
  // word embedding (tied output layer or multi-token prediction with pp > 1); unset otherwise.
  std::optional<comm::ProcessGroup> embedding_group;

  bool sequence_parallel() const { return tp.sequence_parallel; }
  // The decoder's layers, then the MTP modules' (the order init_parameters draws in).
  std::vector<const TransformerLayer*> all_layers() const {
    std::vector<const TransformerLayer*> all;
    for (const auto& layer : layers) all.push_back(layer.get());
    if (mtp) {
      for (const auto& layer : mtp->layers()) all.push_back(layer.get());
    }
    return all;
  }
};

GPTModel::GPTModel(const TransformerConfig& config, const comm::ParallelState& parallel,
                   ParameterStore& store, GPTStage stage, DispatcherFactory dispatcher_factory)
    : config_(config), stage_(stage), store_(store), impl_(std::make_unique<Impl>()) {
  const comm::ParallelSizes& sizes = parallel.sizes;
  config_.validate(sizes.tp, sizes.ep);
  if (stage_.num_layers < 0) stage_.num_layers = config_.num_layers - stage_.first_layer;
  MOE_CHECK(stage_.first_layer >= 0 && stage_.num_layers >= 0 &&
                stage_.first_layer + stage_.num_layers <= config_.num_layers,
            "pipeline stage layers [", stage_.first_layer, ", ",
            stage_.first_layer + stage_.num_layers, ") are outside num_layers (",
            config_.num_layers, ")");
  MOE_CHECK(!store.allocated(), "GPTModel needs a parameter store that is not allocated yet");
  if (!dispatcher_factory) dispatcher_factory = default_dispatcher_factory();

  Impl& m = *impl_;
  m.tp = TensorParallel{parallel.tp_group, config_.sequence_parallel && sizes.tp > 1};
  m.params.sequence_parallel = m.tp.sequence_parallel;
  m.cp = parallel.context_parallel();
  const TransformerConfig& c = config_;
  if (sizes.cp > 1) {
    MOE_CHECK(!c.multi_latent_attention,
              "--multi-latent-attention is not supported with --context-parallel-size (", sizes.cp,
              ") > 1");
    MOE_CHECK(c.mtp_num_layers == 0, "--mtp-num-layers (", c.mtp_num_layers,
              ") is not supported with --context-parallel-size (", sizes.cp, ") > 1");
    MOE_CHECK(c.seq_length % (2 * sizes.cp) == 0, "--seq-length (", c.seq_length,
              ") must be divisible by 2 x --context-parallel-size (", 2 * sizes.cp,
              "): each cp rank holds two of the 2 x cp load-balanced chunks");
  }
  if (stage_.pre_process) {
    m.embedding.emplace(store, "embedding.word_embeddings.weight", c.padded_vocab_size,
                        c.hidden_size, m.tp);
    m.params.add(m.embedding->weight(), InitKind::kNormal);
    if (c.position_embedding_type == "learned_absolute") {
      ParamSpec spec;
      spec.name = "embedding.position_embeddings.weight";
      int64_t positions = c.max_position_embeddings > 0 ? c.max_position_embeddings : c.seq_length;
      spec.shape = {positions, c.hidden_size};
      spec.tensor_parallel_duplicate = true;
      m.position_embedding = store.declare(spec);
      m.params.add(m.position_embedding, InitKind::kNormal);
      m.params.add_sequence_parallel_partial(m.position_embedding);
    }
  }
  for (int i = stage_.first_layer; i < stage_.first_layer + stage_.num_layers; ++i) {
    std::unique_ptr<TokenDispatcher> dispatcher;
    if (c.is_moe_layer(i)) {
      dispatcher = dispatcher_factory(c.moe_config(), parallel, i);
    }
    m.layers.push_back(
        std::make_unique<TransformerLayer>(store, config_, i, m.tp, parallel.tp_dp_cp_group,
                                           std::move(dispatcher), uint64_t(i), "", m.cp));
    m.layers.back()->register_params(m.params);
  }
  const bool last_stage_needs_embedding =
      !c.untie_embeddings_and_output_weights || c.mtp_num_layers > 0;
  if (last_stage_needs_embedding && stage_.pre_process != stage_.post_process) {
    m.embedding_group = parallel.embedding_group;
  }
  if (stage_.post_process) {
    m.final_norm.emplace(store, "decoder.final_layernorm", c.hidden_size, c.normalization,
                         c.norm_epsilon);
    m.params.add_norm(*m.final_norm);
    if (last_stage_needs_embedding && !m.embedding) {
      // As Megatron: the last stage holds a copy of the first stage's word embedding. Both draw
      // it from (seed, name) in init_parameters, so they start equal (Megatron zero-fills the
      // copy and all-reduces it over the embedding group), and finalize_grads sums their
      // gradients over the embedding group, so every update keeps them equal.
      m.embedding.emplace(store, "embedding.word_embeddings.weight", c.padded_vocab_size,
                          c.hidden_size, m.tp, /*pipeline_copy=*/true);
      m.params.add(m.embedding->weight(), InitKind::kNormal);
    }
    const VocabParallelEmbedding* tied =
        c.untie_embeddings_and_output_weights ? nullptr : &*m.embedding;
    m.output.emplace(store, "output_layer.weight", c.hidden_size, c.padded_vocab_size, m.tp, tied);
    if (!m.output->tied()) m.params.add(m.output->weight(), InitKind::kNormal);
    if (c.mtp_num_layers > 0) {
      m.mtp.emplace(store, config_, m.tp, parallel, dispatcher_factory);
      m.mtp->register_params(m.params);
    }
  }
}

GPTModel::~GPTModel() = default;

Tensor split_for_context_parallel(const Tensor& batch, const ContextParallel& cp) {
  if (cp.size() == 1) return batch;
  check_ndim(batch, 2, "context-parallel batch");
  const int64_t rows = batch.dim(0), seq = batch.dim(1), local_seq = seq / cp.size();
  MOE_CHECK(seq % (2 * cp.size()) == 0, "sequence length (", seq,
            ") must be a multiple of 2 x context_parallel_size (", 2 * cp.size(), ")");
  Tensor local = Tensor::empty({rows, local_seq}, batch.dtype());
  const size_t element = dtype_size(batch.dtype());
  const int64_t chunk = local_seq / 2;
  const char* source = static_cast<const char*>(batch.raw());
  char* target = static_cast<char*>(local.raw());
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t first = 0; first < local_seq; first += chunk) {  // a chunk is contiguous
      const int64_t global = cp.global_position(first, local_seq);
      std::copy_n(source + size_t(b * seq + global) * element, size_t(chunk) * element,
                  target + size_t(b * local_seq + first) * element);
    }
  }
  return local;
}

DispatcherFactory default_dispatcher_factory() {
  return [](const MoEConfig& config, const comm::ParallelState& parallel, int) {
    return make_token_dispatcher(config, parallel);
  };
}

std::vector<std::pair<int, const MoELayer*>> GPTModel::moe_layers() const {
  std::vector<std::pair<int, const MoELayer*>> found;
  for (const TransformerLayer* layer : impl_->all_layers()) {
    if (layer->moe() != nullptr) found.push_back({layer->number(), layer->moe()});
  }
  return found;
}

void GPTModel::finalize_grads() {
  sum_tensor_parallel_partial_grads();
  all_reduce_word_embedding_grads();
  for (const TransformerLayer* layer : impl_->all_layers()) layer->finish_step();
}

void GPTModel::all_reduce_word_embedding_grads() {
  const std::optional<comm::ProcessGroup>& group = impl_->embedding_group;
  if (!group || group->size() == 1) return;
  Tensor grad = store_.grad(impl_->embedding->weight());
  comm::all_reduce(grad, *group);
}

void GPTModel::sum_tensor_parallel_partial_grads() {
  const std::vector<ParamHandle>& partial = impl_->params.tensor_parallel_partial;
  if (impl_->tp.size() == 1 || partial.empty()) return;
  // One all-reduce for all of them: [sum of the gradients' sizes] F32, back to back.
  int64_t total = 0;
  for (ParamHandle handle : partial) total += store_.grad(handle).numel();
  Tensor flat = Tensor::empty({total}, DType::F32);
  int64_t offset = 0;
  for (ParamHandle handle : partial) {
    Tensor grad = store_.grad(handle);
    flat.rows(offset, offset + grad.numel()).copy_from(grad.reshape({grad.numel()}));
    offset += grad.numel();
  }
  comm::all_reduce(flat, impl_->tp.group);
  offset = 0;
  for (ParamHandle handle : partial) {
    Tensor grad = store_.grad(handle);
    grad.copy_from(flat.rows(offset, offset + grad.numel()).reshape(grad.shape()));
    offset += grad.numel();
  }
}

void GPTModel::init_parameters(uint64_t seed) {
  MOE_CHECK(store_.allocated(), "init_parameters needs the parameter store allocated");
  float std = config_.init_method_std;
  float output_std =
      config_.apply_scaled_init ? std / std::sqrt(2.0f * float(config_.num_layers)) : std;
  for (auto [handle, kind] : impl_->params.init) {
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
  for (const TransformerLayer* layer : impl_->all_layers()) {
    layer->init_own_parameters(Rng::derived(seed, name_hash(layer->prefix())).next_u64(), std,
                               output_std);
  }
}

int64_t GPTModel::local_rows(int64_t micro_batch_size) const {
  int64_t rows = int64_t(config_.seq_length) / impl_->cp.size() * micro_batch_size;
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
                              const Tensor& loss_mask, int64_t micro_batch_size,
                              const Tensor& tokens) {
  Impl& m = *impl_;
  auto state = std::make_unique<detail::GPTContextState>();
  ctx.moe_losses.clear();
  ctx.mtp_losses.clear();
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
  MOE_CHECK(m.cp.size() == 1 || shape.seq % 2 == 0, "context parallelism: this rank's ", shape.seq,
            " positions are not two equal chunks; the sequence length (", shape.seq, " x ",
            m.cp.size(), ") must be divisible by 2 x context_parallel_size (", 2 * m.cp.size(),
            ")");
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
      MOE_CHECK(shape.seq * m.cp.size() <= table.dim(0), "sequence length ",
                shape.seq * m.cp.size(), " exceeds max_position_embeddings (", table.dim(0), ")");
      Tensor positions = Tensor::empty({rows_local, h}, hidden.dtype());
      for (int64_t r = 0; r < rows_local; ++r) {
        int64_t position = m.cp.global_position((state->row_offset + r) / shape.batch, shape.seq);
        positions.rows(r, r + 1).copy_from(table.rows(position, position + 1));
      }
      add(hidden, positions, hidden);
    }
    apply_hidden_dropout(hidden, ctx.training ? config_.hidden_dropout : 0.0f,
                         dropout_key(ctx.dropout_seed, kEmbeddingLayer, kEmbeddingDropout), shape,
                         state->row_offset, m.cp);
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
  if (!stage_.post_process) {
    ctx.state_ = std::move(state);
    return hidden;
  }
  Tensor normed = m.final_norm->forward(store_, hidden, state->final_norm);
  Tensor logits = m.output->forward(store_, normed, state->output);
  if (ctx.keep_logits) ctx.logits = logits;
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
  if (m.cp.size() > 1) {
    // The mean over the whole sequence: the masked sums and token counts of every cp rank.
    Tensor sums({2}, DType::F64);
    sums.data<double>()[0] = mask_sum;
    sums.data<double>()[1] = weighted;
    comm::all_reduce(sums, m.cp.group);
    mask_sum = sums.data<double>()[0];
    weighted = sums.data<double>()[1];
  }
  // Dense gradients are averaged over dp x cp, so each cp rank's share is scaled by cp (Megatron's
  // loss * context_parallel_size).
  state->loss_weights.resize(mask.size());
  for (size_t r = 0; r < mask.size(); ++r) {
    state->loss_weights[r] = mask_sum > 0 ? mask[r] / mask_sum * double(m.cp.size()) : 0.0;
  }
  ctx.loss_tokens = mask_sum;
  ctx.lm_loss = mask_sum > 0 ? weighted / mask_sum : 0.0;
  if (m.mtp) {
    // The MTP modules embed the input tokens shifted: the last stage reads them too.
    if (!stage_.pre_process) {
      MOE_CHECK(tokens.defined(), "forward_step on the last pipeline stage with mtp_num_layers (",
                config_.mtp_num_layers, ") > 0 needs the micro-batch's tokens");
      check_shape(tokens, {shape.batch, shape.seq}, "tokens");
    }
    m.mtp->forward(store_, *m.embedding, *m.output, normed,
                   stage_.pre_process ? state->tokens : tokens, label_values, mask, shape,
                   state->row_offset, ctx, state->mtp);
  }
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
  Tensor dhidden;
  if (stage_.post_process) {
    check_shape(output_grad, {1}, "loss gradient");
    double loss_grad = output_grad.get(0);
    Tensor dloss({shape.rows()}, DType::F64);
    for (int64_t r = 0; r < shape.rows(); ++r) {
      dloss.data<double>()[r] = loss_grad * state.loss_weights[size_t(r)];
    }
    Tensor grad_logits = vocab_parallel_cross_entropy_backward(state.softmax, state.labels,
                                                               m.output->vocab_start(), dloss);
    state.softmax = Tensor();
    Tensor dnormed = m.output->backward(store_, state.output, grad_logits);
    if (m.mtp) {
      add(dnormed,
          m.mtp->backward(store_, *m.embedding, *m.output, loss_grad, shape, state.row_offset, ctx,
                          state.mtp),
          dnormed);
    }
    dhidden = m.final_norm->backward(store_, state.final_norm, dnormed);
  } else {
    dhidden = output_grad;
  }
  for (size_t i = m.layers.size(); i-- > 0;) {
    dhidden = m.layers[i]->backward(store_, dhidden, shape, state.row_offset, ctx, state.layers[i]);
  }
  if (stage_.pre_process) {
    apply_hidden_dropout(dhidden, ctx.training ? config_.hidden_dropout : 0.0f,
                         dropout_key(ctx.dropout_seed, kEmbeddingLayer, kEmbeddingDropout), shape,
                         state.row_offset, m.cp);
    if (m.position_embedding.index >= 0) {
      Tensor grad = store_.grad(m.position_embedding);
      Tensor dvalues = dhidden.to(DType::F32);
      for (int64_t r = 0; r < dhidden.dim(0); ++r) {
        int64_t position = m.cp.global_position((state.row_offset + r) / shape.batch, shape.seq);
        Tensor grad_row = grad.rows(position, position + 1);
        axpy(1.0f, dvalues.rows(r, r + 1), grad_row);
      }
    }
    m.embedding->backward(store_, state.tokens, dhidden);
    dhidden = Tensor();
  }
  ctx.state_.reset();
  return dhidden;
}

}  // namespace moe::model

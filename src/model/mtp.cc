#include "mtp.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "moe/comm/process_group.h"
#include "moe/tensor/ops.h"

namespace moe::model {

namespace {

// dst[:, dst_begin : dst_begin + count] = src[:, src_begin : src_begin + count] (same dtype and
// rows, both contiguous [rows, cols]).
void copy_columns(const Tensor& src, int64_t src_begin, int64_t count, Tensor& dst,
                  int64_t dst_begin) {
  const size_t element = dtype_size(src.dtype());
  const auto* from = static_cast<const char*>(src.raw());
  auto* to = static_cast<char*>(dst.raw());
  const int64_t src_cols = src.dim(1), dst_cols = dst.dim(1);
  for (int64_t r = 0; r < src.dim(0); ++r) {
    std::memcpy(to + size_t(r * dst_cols + dst_begin) * element,
                from + size_t(r * src_cols + src_begin) * element, size_t(count) * element);
  }
}

Tensor columns(const Tensor& x, int64_t begin, int64_t end) {
  Tensor out = Tensor::empty({x.dim(0), end - begin}, x.dtype());
  copy_columns(x, begin, end - begin, out, 0);
  return out;
}

// Megatron's gather_from_tensor_model_parallel_region: [rows, cols_local] -> [rows, cols] with
// rank p's columns at [p * cols_local, (p + 1) * cols_local). Its backward is `columns` of this
// rank's block.
Tensor gather_columns(const Tensor& local, const TensorParallel& tp) {
  if (tp.size() == 1) return local;
  const int64_t rows = local.dim(0), cols = local.dim(1);
  Tensor stacked = Tensor::empty({tp.size() * rows, cols}, local.dtype());
  comm::all_gather(local, stacked, tp.group);
  Tensor full = Tensor::empty({rows, tp.size() * cols}, local.dtype());
  for (int p = 0; p < tp.size(); ++p) {
    copy_columns(stacked.rows(p * rows, (p + 1) * rows), 0, cols, full, p * cols);
  }
  return full;
}

// Megatron's roll_tensor(shifts=-1) applied `depth` times along the sequence of a row-ordered
// [s * b] vector: row r takes row r + depth * b; the last depth positions get 0.
std::vector<double> shifted_rows(const std::vector<double>& values, const BatchShape& shape,
                                 int depth) {
  std::vector<double> shifted(values.size(), 0.0);
  const size_t offset = size_t(depth * shape.batch);
  if (offset < values.size()) std::copy(values.begin() + offset, values.end(), shifted.begin());
  return shifted;
}

// The same shift of the [b, s] token ids along s.
Tensor shifted_tokens(const Tensor& tokens, int depth) {
  const int64_t batch = tokens.dim(0), seq = tokens.dim(1);
  Tensor shifted = Tensor::zeros({batch, seq}, DType::I64);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s + depth < seq; ++s) {
      const int64_t from = b * seq + s + depth;
      shifted.data<int64_t>()[b * seq + s] = tokens.dtype() == DType::I64
                                                 ? tokens.data<int64_t>()[from]
                                                 : int64_t(tokens.data<int32_t>()[from]);
    }
  }
  return shifted;
}

}  // namespace

MultiTokenPrediction::MultiTokenPrediction(ParameterStore& store, const TransformerConfig& config,
                                           const TensorParallel& tp,
                                           const comm::ParallelState& parallel,
                                           const DispatcherFactory& dispatcher_factory)
    : config_(config), tp_(tp) {
  const int depths = config.mtp_num_layers;
  MOE_CHECK(depths > 0, "MultiTokenPrediction needs mtp_num_layers > 0, got ", depths);
  const bool moe = config.is_moe_layer(config.num_layers - 1);
  if (config.num_experts > 0) {
    std::vector<int>& pattern = config_.moe_layer_pattern;
    pattern.resize(size_t(config.num_layers + depths));
    for (int i = 0; i < config.num_layers; ++i) pattern[size_t(i)] = config.is_moe_layer(i);
    std::fill(pattern.begin() + config.num_layers, pattern.end(), moe ? 1 : 0);
  }
  const TransformerConfig& c = config_;
  depths_.reserve(size_t(depths));
  for (int k = 0; k < depths; ++k) {
    const std::string prefix = "mtp.layers." + std::to_string(k);
    const int number = c.num_layers + k;
    depths_.push_back(Depth{
        Norm(store, prefix + ".enorm", c.hidden_size, c.normalization, c.norm_epsilon),
        Norm(store, prefix + ".hnorm", c.hidden_size, c.normalization, c.norm_epsilon),
        ColumnParallelLinear(store, prefix + ".eh_proj", 2 * int64_t(c.hidden_size),
                             ColumnLayout{{c.hidden_size}, 0}, false, tp),
        Norm(store, prefix + ".final_layernorm", c.hidden_size, c.normalization, c.norm_epsilon)});
    std::unique_ptr<TokenDispatcher> dispatcher;
    if (moe) dispatcher = dispatcher_factory(c.moe_config(), parallel, number);
    layers_.push_back(std::make_unique<TransformerLayer>(
        store, config_, number, tp, parallel.tp_dp_cp_group, std::move(dispatcher),
        uint64_t(number), prefix + ".transformer_layer"));
  }
}

void MultiTokenPrediction::register_params(ParamRegistry& registry) const {
  for (size_t k = 0; k < depths_.size(); ++k) {
    const Depth& depth = depths_[k];
    registry.add_norm(depth.enorm);
    registry.add_norm(depth.hnorm);
    registry.add(depth.eh_proj.weight(), InitKind::kNormal);
    layers_[k]->register_params(registry);
    registry.add_norm(depth.final_norm);
  }
}

void MultiTokenPrediction::forward(const ParameterStore& store,
                                   const VocabParallelEmbedding& embedding,
                                   const OutputLayer& output, const Tensor& hidden,
                                   const Tensor& tokens, const std::vector<double>& labels,
                                   const std::vector<double>& mask, const BatchShape& shape,
                                   int64_t row_offset, GPTContext& ctx, Context& mtp_ctx) const {
  const int64_t h = config_.hidden_size, rows_local = hidden.dim(0);
  const float hidden_p = ctx.training ? config_.hidden_dropout : 0.0f;
  mtp_ctx.depths.resize(depths_.size());
  Tensor previous = hidden;
  for (size_t k = 0; k < depths_.size(); ++k) {
    const int depth = int(k) + 1;
    const Depth& d = depths_[k];
    DepthContext& depth_ctx = mtp_ctx.depths[k];
    depth_ctx.tokens = shifted_tokens(tokens, depth);
    Tensor embedded = embedding.forward(store, depth_ctx.tokens);
    apply_dropout(embedded, hidden_p,
                  dropout_key(ctx.dropout_seed, layers_[k]->number(), kEmbeddingDropout),
                  row_offset * h);
    Tensor concatenated = Tensor::empty({rows_local, 2 * h}, hidden.dtype());
    copy_columns(d.enorm.forward(store, embedded, depth_ctx.enorm), 0, h, concatenated, 0);
    copy_columns(d.hnorm.forward(store, previous, depth_ctx.hnorm), 0, h, concatenated, h);
    depth_ctx.projection_input = enter_tp_region(concatenated, tp_);
    Tensor projected = gather_columns(d.eh_proj.forward(store, depth_ctx.projection_input),
                                      tp_);  // [rows_full, h]
    // Megatron scatters the gathered projection back to this rank's sequence block.
    if (tp_.sequence_parallel) projected = projected.rows(row_offset, row_offset + rows_local);
    Tensor layer_out = layers_[k]->forward(store, projected, shape, row_offset, ctx,
                                           depth_ctx.layer, &ctx.moe_losses);
    previous = d.final_norm.forward(store, layer_out, depth_ctx.final_norm);

    Tensor logits = output.forward(store, previous, depth_ctx.output);
    const std::vector<double> depth_labels = shifted_rows(labels, shape, depth);
    const std::vector<double> depth_mask = shifted_rows(mask, shape, depth);
    depth_ctx.labels = Tensor({shape.rows()}, DType::I64);
    for (int64_t r = 0; r < shape.rows(); ++r) {
      depth_ctx.labels.data<int64_t>()[r] = int64_t(depth_labels[size_t(r)]);
    }
    Tensor row_losses = vocab_parallel_cross_entropy(logits, depth_ctx.labels, output.vocab_start(),
                                                     tp_, depth_ctx.softmax)
                            .to(DType::F64);
    double tokens_counted = 0, weighted = 0;
    for (int64_t r = 0; r < shape.rows(); ++r) {
      tokens_counted += depth_mask[size_t(r)];
      weighted += depth_mask[size_t(r)] * row_losses.data<double>()[r];
    }
    // As Megatron's process_mtp_loss: divided by the token count clamped to at least 1.
    const double divisor = std::max(tokens_counted, 1.0);
    depth_ctx.loss_weights.resize(depth_mask.size());
    for (size_t r = 0; r < depth_mask.size(); ++r)
      depth_ctx.loss_weights[r] = depth_mask[r] / divisor;
    ctx.mtp_losses.push_back({depth, weighted / divisor, tokens_counted});
  }
}

Tensor MultiTokenPrediction::backward(const ParameterStore& store,
                                      const VocabParallelEmbedding& embedding,
                                      const OutputLayer& output, double loss_grad,
                                      const BatchShape& shape, int64_t row_offset,
                                      const GPTContext& ctx, Context& mtp_ctx) const {
  MOE_CHECK(mtp_ctx.depths.size() == depths_.size(),
            "multi-token prediction backward needs its forward first");
  const int64_t h = config_.hidden_size;
  const float hidden_p = ctx.training ? config_.hidden_dropout : 0.0f;
  const double depth_grad = loss_grad * config_.mtp_loss_scaling_factor / double(depths_.size());
  Tensor dnext;  // d(objective)/d(h_k) through depth k + 1
  for (size_t k = depths_.size(); k-- > 0;) {
    const Depth& d = depths_[k];
    DepthContext& depth_ctx = mtp_ctx.depths[k];
    Tensor dloss({shape.rows()}, DType::F64);
    for (int64_t r = 0; r < shape.rows(); ++r) {
      dloss.data<double>()[r] = depth_grad * depth_ctx.loss_weights[size_t(r)];
    }
    Tensor grad_logits = vocab_parallel_cross_entropy_backward(depth_ctx.softmax, depth_ctx.labels,
                                                               output.vocab_start(), dloss);
    depth_ctx.softmax = Tensor();
    Tensor doutput = output.backward(store, depth_ctx.output, grad_logits);
    if (dnext.defined()) add(doutput, dnext, doutput);
    Tensor dlayer_out = d.final_norm.backward(store, depth_ctx.final_norm, doutput);
    Tensor dprojected =
        layers_[k]->backward(store, dlayer_out, shape, row_offset, ctx, depth_ctx.layer);

    // eh_proj: this rank's output columns of the (sequence-gathered) gradient, then the
    // column-parallel backward, whose input gradient is partial over tp.
    Tensor dfull = leave_tp_region_backward(dprojected, tp_);
    const int64_t cols = d.eh_proj.out_local();
    Tensor dlocal = columns(dfull, tp_.rank() * cols, (tp_.rank() + 1) * cols);
    Tensor dconcatenated = enter_tp_region_backward(
        d.eh_proj.backward(store, depth_ctx.projection_input, dlocal), tp_);
    depth_ctx.projection_input = Tensor();

    Tensor dembedded = d.enorm.backward(store, depth_ctx.enorm, columns(dconcatenated, 0, h));
    apply_dropout(dembedded, hidden_p,
                  dropout_key(ctx.dropout_seed, layers_[k]->number(), kEmbeddingDropout),
                  row_offset * h);
    embedding.backward(store, depth_ctx.tokens, dembedded);
    dnext = d.hnorm.backward(store, depth_ctx.hnorm, columns(dconcatenated, h, 2 * h));
  }
  mtp_ctx.depths.clear();
  return dnext;
}

}  // namespace moe::model

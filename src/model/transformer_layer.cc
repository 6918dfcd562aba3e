#include "transformer_layer.h"

#include "moe/tensor/ops.h"

namespace moe::model {

void ParamRegistry::add_norm(const Norm& norm) {
  add(norm.weight(), InitKind::kOnes);
  add_sequence_parallel_partial(norm.weight());
  if (norm.bias().index >= 0) {
    add(norm.bias(), InitKind::kZeros);
    add_sequence_parallel_partial(norm.bias());
  }
}

void apply_hidden_dropout(Tensor& x, float p, uint64_t key, const BatchShape& shape,
                          int64_t row_offset, const ContextParallel& cp) {
  if (p == 0) return;
  const int64_t h = x.dim(1);
  auto global_row = [&](int64_t local_row) {
    return cp.global_position(local_row / shape.batch, shape.seq) * shape.batch +
           local_row % shape.batch;
  };
  // The runs of rows that are contiguous in the global tensor (one per cp chunk).
  for (int64_t begin = 0; begin < x.dim(0);) {
    int64_t end = begin + 1;
    while (end < x.dim(0) &&
           global_row(row_offset + end) == global_row(row_offset + begin) + (end - begin)) {
      ++end;
    }
    Tensor run = x.rows(begin, end);
    apply_dropout(run, p, key, global_row(row_offset + begin) * h);
    begin = end;
  }
}

TransformerLayer::TransformerLayer(ParameterStore& store, const TransformerConfig& config,
                                   int number, const TensorParallel& tp,
                                   const comm::ProcessGroup& stage_group,
                                   std::unique_ptr<TokenDispatcher> dispatcher,
                                   uint64_t jitter_seed, const std::string& prefix,
                                   const ContextParallel& cp)
    : number_(number),
      config_(config),
      cp_(cp),
      prefix_(prefix.empty() ? "decoder.layers." + std::to_string(number) : prefix),
      input_norm_(store, prefix_ + ".input_layernorm", config.hidden_size, config.normalization,
                  config.norm_epsilon),
      attention_(config.multi_latent_attention
                     ? std::nullopt
                     : std::optional<SelfAttention>(std::in_place, store,
                                                    prefix_ + ".self_attention", config, tp, cp)),
      latent_attention_(config.multi_latent_attention
                            ? std::optional<MultiLatentAttention>(
                                  std::in_place, store, prefix_ + ".self_attention", config, tp)
                            : std::nullopt),
      pre_mlp_norm_(store, prefix_ + ".pre_mlp_layernorm", config.hidden_size, config.normalization,
                    config.norm_epsilon) {
  if (config.is_moe_layer(number)) {
    moe_ = std::make_unique<MoELayer>(config.moe_config(), store, prefix_ + ".mlp",
                                      std::move(dispatcher), jitter_seed, tp, stage_group,
                                      cp.tp_cp_group);
    if (config.moe_shared_expert_intermediate_size > 0) {
      shared_experts_.emplace(store, prefix_ + ".mlp.shared_experts", config, tp);
    }
  } else {
    mlp_.emplace(store, prefix_ + ".mlp", config, tp);
  }
}

void TransformerLayer::register_params(ParamRegistry& registry) const {
  registry.add_norm(input_norm_);
  registry.add_norm(pre_mlp_norm_);
  // Column-parallel biases are split with their columns; row-parallel ones are replicated and
  // added to this rank's rows only.
  auto add_linear = [&](ParamHandle weight, ParamHandle bias, InitKind kind, bool row_parallel) {
    registry.add(weight, kind);
    if (bias.index < 0) return;
    registry.add(bias, InitKind::kZeros);
    if (row_parallel) registry.add_sequence_parallel_partial(bias);
  };
  if (attention_) {
    add_linear(attention_->linear_qkv().weight(), attention_->linear_qkv().bias(),
               InitKind::kNormal, false);
    for (const Norm* qk_norm : {attention_->q_layernorm(), attention_->k_layernorm()}) {
      if (qk_norm == nullptr) continue;
      registry.add(qk_norm->weight(), InitKind::kOnes);
      if (qk_norm->bias().index >= 0) registry.add(qk_norm->bias(), InitKind::kZeros);
    }
    for (ParamHandle handle : attention_->tensor_parallel_partial_params()) {
      registry.tensor_parallel_partial.push_back(handle);
    }
  } else {
    // Megatron: every projection init_method, the latent norms ones. The replicated down
    // projections and norms see only this rank's rows with sequence parallelism.
    const MultiLatentAttention& mla = *latent_attention_;
    for (const ColumnParallelLinear* up :
         {mla.linear_q_proj(), mla.linear_q_up_proj(), &mla.linear_kv_up_proj()}) {
      if (up != nullptr) add_linear(up->weight(), up->bias(), InitKind::kNormal, false);
    }
    for (const ColumnParallelLinear* down :
         {mla.linear_q_down_proj(), &mla.linear_kv_down_proj()}) {
      if (down == nullptr) continue;
      registry.add(down->weight(), InitKind::kNormal);
      registry.add_sequence_parallel_partial(down->weight());
    }
    for (const Norm* norm : {mla.q_layernorm(), mla.kv_layernorm()}) {
      if (norm != nullptr) registry.add_norm(*norm);
    }
  }
  const RowParallelLinear& proj =
      attention_ ? attention_->linear_proj() : latent_attention_->linear_proj();
  add_linear(proj.weight(), proj.bias(), InitKind::kScaledNormal, true);
  if (mlp_) {
    add_linear(mlp_->linear_fc1().weight(), mlp_->linear_fc1().bias(), InitKind::kNormal, false);
    add_linear(mlp_->linear_fc2().weight(), mlp_->linear_fc2().bias(), InitKind::kScaledNormal,
               true);
  } else {
    for (ParamHandle handle : moe_->tensor_parallel_partial_params()) {
      registry.tensor_parallel_partial.push_back(handle);
    }
    if (shared_experts_) {
      const MLP& shared = shared_experts_->mlp();
      add_linear(shared.linear_fc1().weight(), shared.linear_fc1().bias(), InitKind::kNormal,
                 false);
      add_linear(shared.linear_fc2().weight(), shared.linear_fc2().bias(), InitKind::kScaledNormal,
                 true);
      // Replicated over tp; applied to this rank's rows only with sequence parallelism.
      if (shared_experts_->gate_weight().index >= 0) {
        registry.add(shared_experts_->gate_weight(), InitKind::kNormal);
        registry.add_sequence_parallel_partial(shared_experts_->gate_weight());
      }
    }
  }
}

Tensor TransformerLayer::forward(const ParameterStore& store, const Tensor& x,
                                 const BatchShape& shape, int64_t row_offset, const GPTContext& ctx,
                                 TransformerLayerContext& layer_ctx,
                                 std::vector<MoELossReport>* losses) const {
  if (config_.recompute_granularity != "full") {
    Tensor out = run_forward(store, x, shape, row_offset, ctx, layer_ctx, losses);
    if (config_.recompute_granularity == "selective") release_recomputed(layer_ctx);
    return out;
  }
  TransformerLayerContext discarded;
  Tensor out = run_forward(store, x, shape, row_offset, ctx, discarded, losses);
  layer_ctx = TransformerLayerContext();
  layer_ctx.input = x;
  layer_ctx.moe_replay = discarded.moe.router.replay;
  return out;
}

Tensor TransformerLayer::backward(const ParameterStore& store, const Tensor& grad_output,
                                  const BatchShape& shape, int64_t row_offset,
                                  const GPTContext& ctx, TransformerLayerContext& layer_ctx) const {
  if (!layer_ctx.materialized) {  // full recomputation: the same dropout keys give the same masks
    Tensor input = layer_ctx.input;
    const RouterReplay replay = layer_ctx.moe_replay;
    run_forward(store, input, shape, row_offset, ctx, layer_ctx, nullptr, &replay);
  } else if (config_.recompute_granularity == "selective") {
    recompute_released(store, shape, ctx, layer_ctx);
  }
  float hidden_p = ctx.training ? config_.hidden_dropout : 0.0f;

  Tensor dmlp = grad_output.clone();
  apply_hidden_dropout(dmlp, hidden_p, dropout_key(ctx.dropout_seed, number_, kMlpOutput), shape,
                       row_offset, cp_);
  Tensor dmlp_in;
  if (moe_) {
    const int64_t local_seq = dmlp.dim(0) / shape.batch;
    dmlp_in = moe_->backward(layer_ctx.moe, dmlp.reshape({local_seq, shape.batch, dmlp.dim(1)}),
                             ctx.moe_aux_loss_grad_scale)
                  .reshape(dmlp.shape());
    if (shared_experts_) {
      add(dmlp_in, shared_experts_->backward(store, layer_ctx.shared_experts, dmlp), dmlp_in);
    }
  } else {
    dmlp_in = mlp_->backward(store, layer_ctx.mlp, dmlp);
  }
  Tensor dresidual = pre_mlp_norm_.backward(store, layer_ctx.pre_mlp_norm, dmlp_in);
  add(dresidual, grad_output, dresidual);

  Tensor dattention = dresidual.clone();
  apply_hidden_dropout(dattention, hidden_p,
                       dropout_key(ctx.dropout_seed, number_, kAttentionOutput), shape, row_offset,
                       cp_);
  Tensor dnormed = attention_
                       ? attention_->backward(store, layer_ctx.attention, dattention)
                       : latent_attention_->backward(store, layer_ctx.latent_attention, dattention);
  Tensor grad_input = input_norm_.backward(store, layer_ctx.input_norm, dnormed);
  add(grad_input, dresidual, grad_input);
  layer_ctx = TransformerLayerContext();  // the activations are no longer needed
  return grad_input;
}

Tensor& TransformerLayer::attention_input(TransformerLayerContext& layer_ctx) const {
  return attention_ ? layer_ctx.attention.input : layer_ctx.latent_attention.input;
}

void TransformerLayer::release_recomputed(TransformerLayerContext& layer_ctx) const {
  if (config_.recomputes("layernorm")) {
    // The norm outputs the layer's modules keep; the MoE layer's own copies (the router input,
    // the dispatched rows) are its to keep, unless "moe" recomputes it as a whole.
    attention_input(layer_ctx) = Tensor();
    layer_ctx.mlp.input = layer_ctx.shared_experts.mlp.input = layer_ctx.mlp_input = Tensor();
  }
  if (config_.recomputes("mlp")) layer_ctx.mlp = MLP::Context();
  if (config_.recomputes("shared_experts")) layer_ctx.shared_experts = SharedExperts::Context();
  if (config_.recomputes("moe")) {
    layer_ctx.moe_replay = layer_ctx.moe.router.replay;
    layer_ctx.moe = MoEContext();
  }
}

void TransformerLayer::recompute_released(const ParameterStore& store, const BatchShape& shape,
                                          const GPTContext& ctx,
                                          TransformerLayerContext& layer_ctx) const {
  Tensor mlp_in = layer_ctx.mlp_input;
  if (config_.recomputes("layernorm")) {
    attention_input(layer_ctx) = input_norm_.forward(store, layer_ctx.input, layer_ctx.input_norm);
    mlp_in = pre_mlp_norm_.forward(store, layer_ctx.pre_mlp_norm.input, layer_ctx.pre_mlp_norm);
    if (mlp_) layer_ctx.mlp.input = mlp_in;
    if (shared_experts_) layer_ctx.shared_experts.mlp.input = mlp_in;
  }
  if (mlp_ && config_.recomputes("mlp")) mlp_->forward(store, mlp_in, layer_ctx.mlp);
  if (shared_experts_ && config_.recomputes("shared_experts")) {
    shared_experts_->forward(store, mlp_in, layer_ctx.shared_experts);
  }
  if (moe_ && config_.recomputes("moe")) {
    const RouterReplay replay = layer_ctx.moe_replay;
    moe_->forward(mlp_in.reshape({mlp_in.dim(0) / shape.batch, shape.batch, mlp_in.dim(1)}),
                  layer_ctx.moe, ctx.training, &replay);
  }
}

Tensor TransformerLayer::run_forward(const ParameterStore& store, const Tensor& x,
                                     const BatchShape& shape, int64_t row_offset,
                                     const GPTContext& ctx, TransformerLayerContext& layer_ctx,
                                     std::vector<MoELossReport>* losses,
                                     const RouterReplay* moe_replay) const {
  layer_ctx.input = x;
  layer_ctx.materialized = true;
  float hidden_p = ctx.training ? config_.hidden_dropout : 0.0f;

  Tensor normed = input_norm_.forward(store, x, layer_ctx.input_norm);
  uint64_t probs_key = dropout_key(ctx.dropout_seed, number_, kAttentionProbs);
  Tensor attention_out =
      attention_
          ? attention_->forward(store, normed, shape, probs_key, ctx.training, layer_ctx.attention)
          : latent_attention_->forward(store, normed, shape, probs_key, ctx.training,
                                       layer_ctx.latent_attention);
  apply_hidden_dropout(attention_out, hidden_p,
                       dropout_key(ctx.dropout_seed, number_, kAttentionOutput), shape, row_offset,
                       cp_);
  Tensor residual = Tensor::empty(x.shape(), x.dtype());
  add(x, attention_out, residual);

  Tensor mlp_in = pre_mlp_norm_.forward(store, residual, layer_ctx.pre_mlp_norm);
  if (config_.recompute_granularity == "selective") layer_ctx.mlp_input = mlp_in;
  Tensor mlp_out;
  if (moe_) {
    // Megatron runs the shared experts before the router; their output joins the routed one.
    Tensor shared_out;
    if (shared_experts_)
      shared_out = shared_experts_->forward(store, mlp_in, layer_ctx.shared_experts);
    const int64_t local_seq = mlp_in.dim(0) / shape.batch;
    mlp_out = moe_->forward(mlp_in.reshape({local_seq, shape.batch, mlp_in.dim(1)}), layer_ctx.moe,
                            ctx.training, moe_replay)
                  .reshape(mlp_in.shape());
    if (losses != nullptr) losses->push_back({number_, MoELayer::losses(layer_ctx.moe)});
    if (shared_experts_) add(mlp_out, shared_out, mlp_out);
  } else {
    mlp_out = mlp_->forward(store, mlp_in, layer_ctx.mlp);
  }
  apply_hidden_dropout(mlp_out, hidden_p, dropout_key(ctx.dropout_seed, number_, kMlpOutput), shape,
                       row_offset, cp_);
  Tensor out = Tensor::empty(x.shape(), x.dtype());  // residual is saved by pre_mlp_norm
  add(residual, mlp_out, out);
  return out;
}

}  // namespace moe::model

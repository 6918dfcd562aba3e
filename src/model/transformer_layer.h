// Megatron's TransformerLayer (pre-norm): x + attention(norm(x)), then + mlp(norm(.)), each
// residual branch with hidden dropout. The MLP is dense or an MoE layer (with shared experts when
// configured, shared_experts.h); the MoE layer applies its own tensor-parallel policy
// (moe_layer.h). Private to src/model: GPTModel stacks these.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "moe/model/gpt_model.h"
#include "moe/model/layers.h"
#include "moe/model/mla.h"
#include "moe/model/shared_experts.h"
#include "moe/moe/moe_layer.h"

namespace moe::model {

// Dropout sites (the third component of dropout_key).
enum DropoutSite : int64_t { kEmbeddingDropout, kAttentionProbs, kAttentionOutput, kMlpOutput };
// The layer number the embedding's dropout key uses.
constexpr int64_t kEmbeddingLayer = -1;

// How init_parameters fills a parameter that is not an MoE layer's (those draw their own).
enum class InitKind { kNormal, kScaledNormal, kOnes, kZeros };

// What a model module declares besides its parameters: how each is initialised, and which
// gradients cover only this tp rank's rows and so are summed over tp once per step (Megatron's
// finalize_model_grads does this for sequence-parallel parameters).
struct ParamRegistry {
  std::vector<std::pair<ParamHandle, InitKind>> init;
  std::vector<ParamHandle> tensor_parallel_partial;
  bool sequence_parallel = false;

  void add(ParamHandle handle, InitKind kind) { init.push_back({handle, kind}); }
  // A parameter replicated over tp whose gradient covers only this rank's rows with sequence
  // parallelism (norms, row-parallel biases, position embeddings).
  void add_sequence_parallel_partial(ParamHandle handle) {
    if (sequence_parallel && handle.index >= 0) tensor_parallel_partial.push_back(handle);
  }
  // A norm: weight ones, bias (LayerNorm) zeros, both sequence-parallel partial.
  void add_norm(const Norm& norm);
};

// Hidden dropout of x, this rank's rows [row_offset, row_offset + x.dim(0)) of the micro-batch's
// [shape.seq * shape.batch, h] rows (shape.seq: this cp rank's positions). Each row is masked by
// its index in the global [seq * cp * batch, h] tensor, so the mask is the same in every tp,
// sequence- and context-parallel layout. Applying it to a gradient is the backward.
void apply_hidden_dropout(Tensor& x, float p, uint64_t key, const BatchShape& shape,
                          int64_t row_offset, const ContextParallel& cp);

// Everything one layer's forward saves for its backward.
struct TransformerLayerContext {
  Tensor input;               // [rows_local, h]: kept even when recomputing
  bool materialized = false;  // false: only `input` is kept (full recomputation)
  // [rows_local, h] pre_mlp_layernorm's output, kept with selective recomputation unless
  // "layernorm" recomputes it: the input the MLP, MoE layer and shared experts rerun from.
  Tensor mlp_input;
  RouterReplay moe_replay;  // full recomputation: what the MoE layer's rerun repeats
  Norm::Context input_norm, pre_mlp_norm;
  SelfAttention::Context attention;
  MultiLatentAttention::Context latent_attention;  // with multi_latent_attention
  MLP::Context mlp;
  MoEContext moe;
  SharedExperts::Context shared_experts;
};

class TransformerLayer {
 public:
  // dispatcher: the MoE layer's token dispatcher when config.is_moe_layer(number), else null.
  // stage_group: the ranks of this pipeline stage (tp x dp x cp; see MoELayer).
  // prefix: the parameter names' prefix; empty: "decoder.layers.<number>".
  // cp: context parallelism (the attention's K/V exchange, the MoE layer's tp x cp losses, the
  // hidden dropout's global rows).
  TransformerLayer(ParameterStore& store, const TransformerConfig& config, int number,
                   const TensorParallel& tp, const comm::ProcessGroup& stage_group,
                   std::unique_ptr<TokenDispatcher> dispatcher, uint64_t jitter_seed,
                   const std::string& prefix = "", const ContextParallel& cp = {});

  const std::string& prefix() const { return prefix_; }
  int number() const { return number_; }
  MoELayer* moe() const { return moe_.get(); }

  void register_params(ParamRegistry& registry) const;
  // The parameters that draw their own values rather than through the ParamRegistry (the MoE
  // layer's, placement-independent from `seed`).
  void init_own_parameters(uint64_t seed, float std, float output_std) const {
    if (moe_) moe_->init_parameters(seed, std, output_std);
  }
  // Once per step after the last backward (GPTModel::finalize_grads): the MoE layer's.
  void finish_step() const {
    if (moe_) moe_->finish_step();
  }

  // x [rows_local, h] -> [rows_local, h]. Saves what backward needs in `layer_ctx`, or, with full
  // recomputation, only the input. Appends the MoE layer's losses to `losses` when given.
  Tensor forward(const ParameterStore& store, const Tensor& x, const BatchShape& shape,
                 int64_t row_offset, const GPTContext& ctx, TransformerLayerContext& layer_ctx,
                 std::vector<MoELossReport>* losses) const;
  // grad_output [rows_local, h] -> grad_input; consumes `layer_ctx`.
  Tensor backward(const ParameterStore& store, const Tensor& grad_output, const BatchShape& shape,
                  int64_t row_offset, const GPTContext& ctx,
                  TransformerLayerContext& layer_ctx) const;

 private:
  // moe_replay: null for a first run, else the MoE layer's replay of the run it recomputes.
  Tensor run_forward(const ParameterStore& store, const Tensor& x, const BatchShape& shape,
                     int64_t row_offset, const GPTContext& ctx, TransformerLayerContext& layer_ctx,
                     std::vector<MoELossReport>* losses,
                     const RouterReplay* moe_replay = nullptr) const;
  // Selective recomputation: after forward, drops what the config's recompute_modules rebuild;
  // before backward, rebuilds it (the same kernels on the same inputs, so bit for bit).
  void release_recomputed(TransformerLayerContext& layer_ctx) const;
  void recompute_released(const ParameterStore& store, const BatchShape& shape,
                          const GPTContext& ctx, TransformerLayerContext& layer_ctx) const;
  Tensor& attention_input(TransformerLayerContext& layer_ctx) const;

  int number_;
  const TransformerConfig& config_;
  ContextParallel cp_;
  std::string prefix_;
  Norm input_norm_;
  // Exactly one of them: multi-latent attention with config.multi_latent_attention.
  std::optional<SelfAttention> attention_;
  std::optional<MultiLatentAttention> latent_attention_;
  Norm pre_mlp_norm_;
  std::optional<MLP> mlp_;
  std::unique_ptr<MoELayer> moe_;
  std::optional<SharedExperts> shared_experts_;  // MoE layers with shared experts only
};

}  // namespace moe::model

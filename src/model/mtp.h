// DeepSeek-V3 multi-token prediction (Megatron's MultiTokenPredictionBlock and process_mtp_loss).
// Private to src/model: GPTModel runs it on the last stage, after the decoder's final norm.
//
// Depth k = 1..D (D = mtp_num_layers) turns h_{k-1} (h_0: the decoder output after its final
// norm) into
//   h_k = final_layernorm(layer([enorm(emb(tokens shifted left by k)) | hnorm(h_{k-1})] eh_proj))
// where emb is the model's word embedding (with its hidden dropout), eh_proj a column-parallel
// [2h, h] linear without bias whose output is gathered over tp, and layer a TransformerLayer built
// as the last decoder layer (dense or MoE), numbered num_layers + k - 1 for its dropout keys and
// loss reports. The shared output layer turns h_k into logits; their cross-entropy against the
// labels shifted left by k, masked by the loss mask shifted left by k (shifted-in positions: token
// 0, mask 0), summed and divided by the shifted mask's token count (at least 1, as Megatron's
// process_mtp_loss), is depth k's loss. The objective adds mtp_loss_scaling_factor / D times each
// depth's loss (Megatron's MTPLossAutoScaler); the lm loss is unchanged.
//
// Parameters: "mtp.layers.<k-1>.enorm", ".hnorm", ".eh_proj.weight", ".transformer_layer.*",
// ".final_layernorm" (Megatron-Core 0.15's names).
#pragma once

#include <memory>
#include <vector>

#include "transformer_layer.h"

namespace moe::model {

class MultiTokenPrediction {
 public:
  // What one depth's forward saves for its backward.
  struct DepthContext {
    Tensor tokens;                     // [b, s] the input tokens shifted left by the depth
    Tensor labels;                     // [rows] I64: the labels shifted left by the depth
    std::vector<double> loss_weights;  // [rows] shifted mask / max(its sum, 1)
    Norm::Context enorm, hnorm, final_norm;
    Tensor projection_input;  // [rows_full, 2h]: eh_proj's input inside the tp region
    TransformerLayerContext layer;
    OutputLayer::Context output;
    Tensor softmax;  // [rows, V_local]
  };
  struct Context {
    std::vector<DepthContext> depths;
  };

  // Declares every depth's parameters; config.mtp_num_layers > 0.
  MultiTokenPrediction(ParameterStore& store, const TransformerConfig& config,
                       const TensorParallel& tp, const comm::ParallelState& parallel,
                       const DispatcherFactory& dispatcher_factory);

  void register_params(ParamRegistry& registry) const;
  const std::vector<std::unique_ptr<TransformerLayer>>& layers() const { return layers_; }

  // hidden: h_0 [rows_local, h]; tokens [b, s] (the model's input); labels and mask: [rows] in
  // row order (s * b + b_index). Appends one MTPLossReport per depth to ctx.mtp_losses and the
  // MoE layers' reports to ctx.moe_losses.
  void forward(const ParameterStore& store, const VocabParallelEmbedding& embedding,
               const OutputLayer& output, const Tensor& hidden, const Tensor& tokens,
               const std::vector<double>& labels, const std::vector<double>& mask,
               const BatchShape& shape, int64_t row_offset, GPTContext& ctx,
               Context& mtp_ctx) const;
  // loss_grad: d(objective)/d(lm loss). Returns d(objective)/d(h_0) [rows_local, h]; the
  // parameter gradients (embedding and output layer included) accumulate into the store.
  // Consumes `mtp_ctx`.
  Tensor backward(const ParameterStore& store, const VocabParallelEmbedding& embedding,
                  const OutputLayer& output, double loss_grad, const BatchShape& shape,
                  int64_t row_offset, const GPTContext& ctx, Context& mtp_ctx) const;

 private:
  struct Depth {
    Norm enorm, hnorm;
    ColumnParallelLinear eh_proj;
    Norm final_norm;
  };

  // The config the MTP layers are built from: the model's, with the MoE pattern extended so that
  // layer num_layers + k - 1 is what the last decoder layer is (Megatron builds the MTP layer
  // from the last decoder layer's spec).
  TransformerConfig config_;
  TensorParallel tp_;
  std::vector<Depth> depths_;
  std::vector<std::unique_ptr<TransformerLayer>> layers_;
};

}  // namespace moe::model

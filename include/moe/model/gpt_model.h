// The GPT model (Megatron's GPTModel with a TransformerBlock of pre-norm TransformerLayers):
// embedding -> layers (self-attention and a dense or MoE MLP, each a residual branch) -> final
// norm -> output layer -> vocabulary-parallel cross-entropy; with mtp_num_layers > 0, DeepSeek-V3's
// multi-token prediction modules after the final norm (src/model/mtp.h).
//
// Parameters are declared into a ParameterStore under Megatron's names ("embedding.word_embeddings
// .weight", "decoder.layers.3.self_attention.linear_qkv.weight", "decoder.final_layernorm.weight",
// "output_layer.weight", ...). Linear weights are stored [in, out] (Megatron stores [out, in]);
// each ParamSpec carries its global shape and this rank's offset in it. With pipeline stages and a
// tied output layer or multi-token prediction, the last stage holds a copy of
// "embedding.word_embeddings.weight" (ParamSpec::pipeline_copy; see finalize_grads).
//
// Typical use, one micro-batch:
//   ParameterStore store(DType::BF16);
//   GPTModel model(config, parallel_state, store);
//   store.allocate();
//   model.init_parameters(seed);
//   GPTContext ctx;  ctx.dropout_seed = derive(seed, iteration, micro_batch);
//   double loss = model.forward(tokens, labels, ctx);  // tokens, labels [b, s]
//   model.backward(ctx, 1.0f / num_micro_batches);      // gradients += into the store
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/model/config.h"
#include "moe/moe/token_dispatcher.h"
#include "moe/tensor/parameters.h"
#include "moe/tensor/tensor.h"

namespace moe {
class MoELayer;
}

namespace moe::model {

// Which part of the model this rank builds (pipeline parallelism): Megatron's pre_process
// (embedding), post_process (final norm, output layer, loss) and a range of layers.
struct GPTStage {
  bool pre_process = true;
  bool post_process = true;
  int first_layer = 0;
  int num_layers = -1;  // -1: all layers from first_layer on
};

// The router losses one MoE layer reports for logging (they do not enter the returned lm loss;
// their gradients are applied inside the MoE layers' backward): the micro-batch's values,
// summed over the tp ranks that share its tokens.
struct MoELossReport {
  int layer = 0;
  RouterLosses losses;
};

// One multi-token-prediction depth's loss for logging (Megatron's "mtp_<depth> loss"): the mean
// cross-entropy over its loss-mask tokens (the mask shifted by the depth), unscaled. The objective
// adds mtp_loss_scaling_factor / mtp_num_layers times it; its gradient is applied inside backward.
struct MTPLossReport {
  int depth = 1;  // 1-based: the module that predicts the token `depth` + 1 ahead
  double loss = 0;
  double tokens = 0;  // loss-mask tokens it averaged
};

// Builds the token dispatcher of each MoE layer.
using DispatcherFactory = std::function<std::unique_ptr<TokenDispatcher>(
    const MoEConfig& config, const comm::ParallelState& parallel, int layer)>;
// make_token_dispatcher (ep_dispatchers.h): all experts local when ep = etp = 1, else the
// config's all-to-all or all-gather dispatcher. What GPTModel uses when given none.
DispatcherFactory default_dispatcher_factory();

// Megatron's get_batch_on_this_cp_rank: this cp rank's part of a [b, S] micro-batch tensor
// (tokens, labels, loss mask) along the sequence, [b, S / cp]: of the 2 * cp chunks of S / (2 *
// cp) positions, rank r keeps chunks r and 2 * cp - 1 - r (ContextParallel). The tensor itself
// when cp is 1; S must divide by 2 * cp.
Tensor split_for_context_parallel(const Tensor& batch, const comm::ContextParallel& cp);

namespace detail {
struct GPTContextState;
}

// Everything one micro-batch's forward saves for its backward. Several may be alive at once.
class GPTContext {
 public:
  GPTContext();
  ~GPTContext();
  GPTContext(GPTContext&&) noexcept;
  GPTContext& operator=(GPTContext&&) noexcept;

  // Dropout masks are a function of this seed (set a new one per micro-batch and iteration).
  uint64_t dropout_seed = 0;
  // False: dropout is off (evaluation). Backward still works.
  bool training = true;
  // d(objective)/d(each MoE aux and z loss), Megatron's MoEAuxLossAutoScaler scale. backward()
  // sets it to its loss_grad; a pipeline calling backward_step on a middle stage sets it itself.
  double moe_aux_loss_grad_scale = 1.0;

  // Filled by the forward of the last stage: mean loss over loss-mask tokens, and their count
  // (with context parallelism: over the whole sequence, every cp rank's tokens).
  double lm_loss = 0;
  double loss_tokens = 0;
  std::vector<MoELossReport> moe_losses;
  std::vector<MTPLossReport> mtp_losses;  // one per MTP depth (last stage, mtp_num_layers > 0)
  // keep_logits: the last stage's forward also leaves its logits in `logits`, [s * b, V_local]
  // (row = position * b + sequence; fp32, fp64 for F64 activations), to compare the model's
  // output with another implementation's.
  bool keep_logits = false;
  Tensor logits;

  bool has_saved_state() const;
  void release();  // drops the saved activations

 private:
  friend class GPTModel;
  std::unique_ptr<detail::GPTContextState> state_;
};

class GPTModel {
 public:
  // Declares this rank's parameters into `store` (which must not be allocated yet). Checks the
  // configuration against the layout (config.validate and the parallel sizes) first.
  GPTModel(const TransformerConfig& config, const comm::ParallelState& parallel,
           ParameterStore& store, GPTStage stage = {},
           DispatcherFactory dispatcher_factory = nullptr);
  ~GPTModel();
  GPTModel(const GPTModel&) = delete;
  GPTModel& operator=(const GPTModel&) = delete;

  // Megatron's initialisation, after store.allocate(): normal(0, init_method_std) weights,
  // std / sqrt(2 * num_layers) for output projections, ones for norm weights, zeros for biases.
  // Every parameter is drawn as its full global tensor from (seed, name) and sliced, so every
  // parallel layout starts from the same global weights.
  void init_parameters(uint64_t seed);

  // Whole model on one pipeline stage: tokens, labels [b, s] (I32/I64), loss_mask [b, s] (any
  // float dtype; undefined = all ones). With context parallelism s = seq_length / cp: this cp
  // rank's two load-balanced chunks (split_for_context_parallel). Returns the mean loss over
  // masked-in tokens (the lm loss; the MTP losses go to ctx.mtp_losses).
  double forward(const Tensor& tokens, const Tensor& labels, GPTContext& ctx,
                 const Tensor& loss_mask = Tensor());
  // Backward of forward; d(loss) = loss_grad (1 / micro-batches, times a loss scale), and each
  // MTP loss gets loss_grad * mtp_loss_scaling_factor / mtp_num_layers.
  // Gradients accumulate (+=) into the store; call finalize_grads() after the step's last
  // backward.
  void backward(GPTContext& ctx, float loss_grad = 1.0f);

  // Once per step, after every micro-batch's backward (the pipeline schedule calls it), as
  // Megatron's finalize_model_grads: the gradients of parameters that are replicated over tp but
  // see only this rank's rows (norms, row-parallel biases and position embeddings with sequence
  // parallelism; the MoE layers' tensor_parallel_partial_params) are summed over tp, so every tp
  // rank holds the same full gradient. With pp > 1 and a tied output layer or multi-token
  // prediction, the word embedding's gradient is summed over the embedding group (first and last
  // stage, each holding the table: Megatron's _allreduce_word_embedding_grads), so both copies
  // get the same update. Reductions over dp (dense) and expert-dp (expert weights:
  // each rank's gradient covers the tokens its experts received) are the optimizer's. Then each
  // MoE layer's end of step: the expert-bias update (aux-loss-free balancing, loads summed over
  // the pipeline stage's tp x dp x cp ranks) and the global_aux_loss reset.
  void finalize_grads();

  // One pipeline stage. input: tokens [b, s] on the first stage, else the previous stage's output
  // [rows_local, h]; labels and loss_mask are read on the last stage only (pass batch_shape-sized
  // tensors, or undefined ones elsewhere). tokens [b, s]: read on a last stage that is not also
  // the first when mtp_num_layers > 0 (the MTP modules embed them shifted), else ignored. Returns
  // [rows_local, h] hidden states, or on the last stage the loss as a [1] F64 tensor.
  Tensor forward_step(const Tensor& input, const Tensor& labels, GPTContext& ctx,
                      const Tensor& loss_mask = Tensor(), int64_t micro_batch_size = 0,
                      const Tensor& tokens = Tensor());
  // output_grad: gradient of this stage's output ([1] with d(loss) on the last stage). Returns
  // the gradient of the stage's input hidden states (undefined on the first stage).
  Tensor backward_step(GPTContext& ctx, const Tensor& output_grad);

  // This stage's MoE layers (decoder, then MTP) with their layer numbers (MTP depth k is layer
  // num_layers + k - 1), e.g. for routing statistics.
  std::vector<std::pair<int, const MoELayer*>> moe_layers() const;

  const TransformerConfig& config() const { return config_; }
  const GPTStage& stage() const { return stage_; }
  ParameterStore& store() const { return store_; }
  // Rows of hidden states this rank holds for a [b, s] micro-batch (s * b, or s * b / tp with
  // sequence parallelism).
  int64_t local_rows(int64_t micro_batch_size) const;

  struct Impl;

 private:
  void sum_tensor_parallel_partial_grads();
  void all_reduce_word_embedding_grads();

  TransformerConfig config_;
  GPTStage stage_;
  ParameterStore& store_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe::model

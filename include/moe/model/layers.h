// The GPT model's layers, each with an explicit forward and backward. What backward needs is
// kept in the layer's Context struct, owned by the caller (one per micro-batch), so several
// micro-batches can be in flight. Layers hold only parameter handles and sizes.
//
// Shapes: activations are [rows, hidden] with rows ordered (sequence, batch) as Megatron's
// [s, b, h]; with sequence parallelism a rank holds rows_local = s * b / tp of them (see
// tensor_parallel.h). Activations have the parameter store's dtype (F32, BF16, F16, or F64 for
// gradient checks); softmax, norm statistics and the loss are computed in fp32 (fp64 for F64).
// Every backward overwrites and returns the input gradient and accumulates (+=) into the fp32
// parameter gradients of the store.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "moe/model/config.h"
#include "moe/model/tensor_parallel.h"
#include "moe/tensor/parameters.h"
#include "moe/tensor/tensor.h"

namespace moe::model {

// Sequence length and micro-batch size of the tokens being processed.
struct BatchShape {
  int64_t seq = 0;
  int64_t batch = 0;
  int64_t rows() const { return seq * batch; }
};

// ---------------------------------------------------------------------------------------------
// Dropout. The mask of element i is a pure function of (key, i), where i is the element's index
// in the full (unsplit) tensor, so the mask is the same in every parallel layout and again when a
// layer is recomputed. p = 0 leaves x untouched. Kept elements are scaled by 1 / (1 - p).
// Applying it to the output gradient with the same key is the backward.
void apply_dropout(Tensor& x, float p, uint64_t key, int64_t first_index);
// A key for one dropout site: (micro-batch seed, layer, site number) mixed into 64 bits.
uint64_t dropout_key(uint64_t seed, int64_t layer, int64_t site);

// ---------------------------------------------------------------------------------------------
// Vocabulary-parallel embedding: rank r holds rows [r * V / tp, (r + 1) * V / tp) of the [V, h]
// table. Tokens outside the local range contribute zeros; the partial lookups are summed over tp
// (all-reduce, or reduce-scatter to the rank's sequence block with sequence parallelism).
class VocabParallelEmbedding {
 public:
  // pipeline_copy: this stage's copy of the table the first pipeline stage owns
  // (ParamSpec::pipeline_copy).
  VocabParallelEmbedding(ParameterStore& store, const std::string& name, int64_t vocab,
                         int64_t hidden, const TensorParallel& tp, bool pipeline_copy = false);
  ParamHandle weight() const { return weight_; }
  int64_t vocab_start() const { return vocab_start_; }
  int64_t vocab_local() const { return vocab_local_; }

  // tokens [b, s] (I32 or I64, each in [0, vocab)) -> [rows_local, h] in the store's dtype.
  Tensor forward(const ParameterStore& store, const Tensor& tokens) const;
  // grad_output [rows_local, h]; accumulates the weight gradient of the local vocabulary rows.
  void backward(const ParameterStore& store, const Tensor& tokens, const Tensor& grad_output) const;

 private:
  TensorParallel tp_;
  int64_t vocab_, hidden_, vocab_start_, vocab_local_;
  ParamHandle weight_;
};

// ---------------------------------------------------------------------------------------------
// RMSNorm (weight) or LayerNorm (weight and bias) over the hidden dim; statistics in fp32.
class Norm {
 public:
  struct Context {
    Tensor input;    // [rows, h]
    Tensor mean;     // [rows] F32 (LayerNorm only)
    Tensor inv_std;  // [rows] F32: 1 / rms (RMSNorm) or 1 / std (LayerNorm)
  };
  // kind: "RMSNorm" or "LayerNorm".
  Norm(ParameterStore& store, const std::string& name, int64_t hidden, const std::string& kind,
       float eps);
  ParamHandle weight() const { return weight_; }
  ParamHandle bias() const { return bias_; }  // index -1 for RMSNorm

  Tensor forward(const ParameterStore& store, const Tensor& x, Context& ctx) const;
  Tensor backward(const ParameterStore& store, const Context& ctx, const Tensor& grad_output) const;

 private:
  bool rms_;
  float eps_;
  ParamHandle weight_, bias_;
};

// LayerNorm kernels (ops.h has RMSNorm): y = (x - mean) * inv_std * weight + bias over the last
// dim. mean and inv_std [rows] F32 are written for backward; grad_weight and grad_bias [h] F32
// accumulate.
void layernorm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, Tensor& y,
               Tensor& mean, Tensor& inv_std);
void layernorm_backward(const Tensor& x, const Tensor& weight, const Tensor& mean,
                        const Tensor& inv_std, const Tensor& grad_output, Tensor& grad_input,
                        Tensor& grad_weight, Tensor& grad_bias);
namespace reference {
void layernorm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, Tensor& y,
               Tensor& mean, Tensor& inv_std);
void layernorm_backward(const Tensor& x, const Tensor& weight, const Tensor& mean,
                        const Tensor& inv_std, const Tensor& grad_output, Tensor& grad_input,
                        Tensor& grad_weight, Tensor& grad_bias);
}  // namespace reference

// ---------------------------------------------------------------------------------------------
// Rotary position embedding as Megatron's (non-interleaved): for a head vector of size d, pair
// (i, i + d/2) rotates by angle pos * inv_freq[i], and both halves are multiplied by
// `concentration` (YaRN's attention factor, 1 for plain rope), so the scores of a rotated query
// and key carry its square. Plain rope: inv_freq[i] = base^(-2i/d).
struct RotaryFrequencies {
  std::vector<double> inv_freq;  // [d / 2]
  double concentration = 1.0;
};
RotaryFrequencies rope_frequencies(int64_t dim, double rotary_base);

// YaRN (Peng et al. 2023) as Megatron's YarnRotaryEmbedding and DeepSeek-V3's Hugging Face code
// compute it. Pair i of the original frequencies makes r_i = original_max_position_embeddings *
// inv_freq[i] / (2 pi) turns over the original context; its index for r turns is
// d * ln(L / (2 pi r)) / (2 ln base). Between low = index(beta_fast) and high = index(beta_slow)
// (floored / ceiled when correction_range_round_to_int, clamped to [0, d - 1]) the frequency
// blends linearly in i from the original one (i <= low) to the original one / scaling_factor
// (i >= high). concentration = yarn_get_mscale(s, mscale) / yarn_get_mscale(s, mscale_all_dim).
struct YarnScaling {
  double scaling_factor = 1.0;                      // --rotary-scaling-factor
  int64_t original_max_position_embeddings = 4096;  // --yarn-original-max-position-embeddings
  double beta_fast = 32.0;                          // --yarn-beta-fast
  double beta_slow = 1.0;                           // --yarn-beta-slow
  double mscale = 1.0;                              // --mscale
  double mscale_all_dim = 0.0;                      // --mscale-all-dim
  bool correction_range_round_to_int = true;        // --[no-]yarn-correction-range-round-to-int
};
RotaryFrequencies yarn_frequencies(int64_t dim, double rotary_base, const YarnScaling& yarn);
// 0.1 * mscale * ln(scale) + 1 for scale > 1, else 1. Multi-latent attention also scales its
// softmax by yarn_get_mscale(s, mscale_all_dim)^2 (Megatron, DeepSeek-V3).
double yarn_get_mscale(double scale, double mscale);

// x: [b, n, s, d] (F32 or F64), d == 2 * inv_freq.size(); index i along dim 2 is at position
// positions[i] (context parallelism: the global positions of this rank's chunks), or i when
// positions is empty. backward applies the transposed map (inverse rotation, same
// concentration) to a gradient.
void apply_rotary(Tensor& x, const RotaryFrequencies& frequencies, bool backward,
                  std::span<const int64_t> positions = {});
// apply_rotary with rope_frequencies(x.dim(3), rotary_base).
void apply_rope(Tensor& x, float rotary_base, bool backward);

// ---------------------------------------------------------------------------------------------
// Causal scaled-dot-product attention with grouped queries, in fp32 (fp64 for F64 inputs).
// q [b, n, s, d], k [b, g, s, d] and v [b, g, s, dv] with n % g == 0: query head i reads group
// i / (n / g). The value head size dv may differ from d (multi-latent attention). Scale
// 1 / sqrt(d). forward writes context [b, n, s, dv] and the row log-sum-exps of the scaled
// scores, logsumexp [b, n, s]; backward rebuilds the probabilities from them (two GEMMs more
// than keeping them, but O(s) memory per head instead of O(s^2)).
// Dropout index of probs element (b, i, q, k) is ((b * total_heads + head_offset + i) * s + q) * s
// + k, so tensor parallelism over heads keeps the global mask.
struct AttentionDropout {
  float p = 0.0f;
  uint64_t key = 0;
  int64_t head_offset = 0;
  int64_t total_heads = 0;  // 0: the local head count
};
// Context parallelism: q holds only some query rows, in chunks of `chunk` rows, chunk i at global
// positions [starts[i], starts[i] + chunk), while k and v hold the whole sequence [b, g, S, d];
// query position p reads keys [0, p]. With it the dropout index uses S and the global positions.
// Empty starts: q holds every position (s == S).
struct QueryPositions {
  int64_t chunk = 0;
  std::vector<int64_t> starts;
};
void causal_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                              const AttentionDropout& dropout, Tensor& logsumexp, Tensor& context,
                              const QueryPositions& positions = {});
// dcontext [b, n, s, dv]; dq [b, n, s, d], dk [b, g, S, d], dv [b, g, S, dv] are overwritten.
void causal_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& logsumexp, const AttentionDropout& dropout,
                               const Tensor& dcontext, Tensor& dq, Tensor& dk, Tensor& dv,
                               const QueryPositions& positions = {});
namespace reference {
void causal_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                              const AttentionDropout& dropout, Tensor& logsumexp, Tensor& context);
}  // namespace reference

// Self-attention block: linear_qkv (column-parallel, Megatron's per-group [q..., k, v] layout;
// a bias with add_bias_linear or add_qkv_bias), q_layernorm / k_layernorm (with qk_layernorm:
// the config's normalization over each head's d values, one [d] weight shared by all heads),
// rope or YaRN, core attention, linear_proj (row-parallel). Heads and query groups split over tp.
// Context parallelism (cp > 1): the rows are this cp rank's two load-balanced chunks
// (ContextParallel); rope rotates by their global positions, and the core attention all-gathers
// K and V over cp (Megatron's cp_comm_type "all_gather") so each query reads every earlier key;
// backward sums the full-sequence dK and dV over cp onto their owners (reduce-scatter).
// The q/k norm weights are replicated over tp but each rank's gradient covers only its own heads
// (all their rows, even with sequence parallelism), so the caller sums it over tp whenever
// tp > 1 (tensor_parallel_partial_params), as Megatron's finalize_model_grads does for
// q_layernorm / k_layernorm.
class SelfAttention {
 public:
  struct Context {
    Tensor input;  // [rows_local, h]: backward all-gathers it again with sequence parallelism
    Norm::Context q_norm,
        k_norm;      // over [b * n_local * s, d] / [b * g_local * s, d] (qk_layernorm)
    Tensor q, k, v;  // [b, n_local, s, d], [b, g_local, S, d] (after rope; S = s * cp, every
                     // cp rank's keys and values), compute dtype
    // Undefined after forward with recompute "core_attn": backward recomputes both from q, k, v.
    Tensor logsumexp;  // [b, n_local, s] of the scaled scores, compute dtype
    Tensor context;    // [rows_full, n_local * d] in the activation dtype
    BatchShape shape;
    uint64_t dropout_key = 0;
    float attention_dropout = 0;  // the probability forward used (0 when not training)
  };
  SelfAttention(ParameterStore& store, const std::string& prefix, const TransformerConfig& config,
                const TensorParallel& tp, const ContextParallel& cp = {});
  const ColumnParallelLinear& linear_qkv() const { return qkv_; }
  const RowParallelLinear& linear_proj() const { return proj_; }
  // q_layernorm and k_layernorm; nullptr without qk_layernorm.
  const Norm* q_layernorm() const { return q_norm_ ? &*q_norm_ : nullptr; }
  const Norm* k_layernorm() const { return k_norm_ ? &*k_norm_ : nullptr; }
  // The q/k norm parameters when tp > 1 (their gradients cover this rank's heads), else empty.
  std::vector<ParamHandle> tensor_parallel_partial_params() const;

  // x [rows_local, h] -> [rows_local, h] (reduced over tp, bias added; no hidden dropout).
  // attention_dropout_key is used when the config's attention_dropout > 0 and training.
  Tensor forward(const ParameterStore& store, const Tensor& x, BatchShape shape,
                 uint64_t attention_dropout_key, bool training, Context& ctx) const;
  Tensor backward(const ParameterStore& store, const Context& ctx, const Tensor& grad_output) const;

 private:
  // Where this rank's s query rows sit in the sequence (empty without context parallelism).
  QueryPositions query_positions(int64_t local_seq) const;
  // Core attention on ctx.q, k, v: the context rows [rows_full, n_local * d] in `dtype`, and the
  // row log-sum-exps.
  Tensor core_attention(const Context& ctx, DType dtype, Tensor& logsumexp) const;

  TensorParallel tp_;
  ContextParallel cp_;
  int64_t heads_local_, groups_local_, head_dim_;
  float attention_dropout_;
  bool recompute_core_attention_;
  std::optional<RotaryFrequencies> rotary_;  // empty without rope / YaRN
  ColumnParallelLinear qkv_;
  RowParallelLinear proj_;
  std::optional<Norm> q_norm_, k_norm_;
};

// ---------------------------------------------------------------------------------------------
// Dense MLP: linear_fc1 (column-parallel; [gate | up] with SwiGLU) -> SwiGLU or GeLU ->
// linear_fc2 (row-parallel).
class MLP {
 public:
  struct Context {
    Tensor input;       // [rows_local, h]: re-gathered in backward with sequence parallelism
    Tensor fc1_output;  // [rows_full, fc1_local]
    Tensor activation;  // [rows_full, ffn_local]
  };
  MLP(ParameterStore& store, const std::string& prefix, const TransformerConfig& config,
      const TensorParallel& tp);
  const ColumnParallelLinear& linear_fc1() const { return fc1_; }
  const RowParallelLinear& linear_fc2() const { return fc2_; }

  Tensor forward(const ParameterStore& store, const Tensor& x, Context& ctx) const;
  Tensor backward(const ParameterStore& store, const Context& ctx, const Tensor& grad_output) const;

 private:
  TensorParallel tp_;
  bool swiglu_;
  ColumnParallelLinear fc1_;
  RowParallelLinear fc2_;
};

// ---------------------------------------------------------------------------------------------
// Vocabulary-parallel cross-entropy (Megatron's cross_entropy.py): logits [rows, V_local] hold
// this rank's vocabulary columns [vocab_start, vocab_start + V_local); the max, the target logit
// and the sum of exponentials are reduced over tp, so no rank ever holds the full logits.
// targets [rows] (I32/I64). Returns the per-row loss [rows] (F32, or F64 for F64 logits) and
// writes softmax [rows, V_local] (same dtype as logits) for backward.
Tensor vocab_parallel_cross_entropy(const Tensor& logits, const Tensor& targets,
                                    int64_t vocab_start, const TensorParallel& tp, Tensor& softmax);
// grad_logits [rows, V_local] = (softmax - onehot(target)) * dloss[row]; dloss [rows] F32/F64.
Tensor vocab_parallel_cross_entropy_backward(const Tensor& softmax, const Tensor& targets,
                                             int64_t vocab_start, const Tensor& dloss);

// The output layer: column-parallel [h, V_local] (untied), or the embedding's [V_local, h] table
// used transposed (tied). Logits are fp32 (fp64 for F64 activations).
class OutputLayer {
 public:
  struct Context {
    Tensor input;  // [rows_local, h]: re-gathered in backward with sequence parallelism
  };
  // tied_embedding: the embedding weight when the output layer shares it, else nullptr.
  OutputLayer(ParameterStore& store, const std::string& name, int64_t hidden, int64_t vocab,
              const TensorParallel& tp, const VocabParallelEmbedding* tied_embedding);
  int64_t vocab_start() const { return vocab_start_; }
  ParamHandle weight() const { return weight_; }
  bool tied() const { return tied_; }

  // x [rows_local, h] -> logits [rows_full, V_local].
  Tensor forward(const ParameterStore& store, const Tensor& x, Context& ctx) const;
  // grad_logits [rows_full, V_local] -> grad_input [rows_local, h].
  Tensor backward(const ParameterStore& store, const Context& ctx, const Tensor& grad_logits) const;

 private:
  TensorParallel tp_;
  int64_t vocab_start_, vocab_local_;
  bool tied_;
  ParamHandle weight_;
};

// Counts of the tp split, with errors naming the flags when it does not divide.
int64_t divide_over_tp(int64_t value, int tp, const char* what);

}  // namespace moe::model

// Configurations, parameter set-up, whole-store finite-difference checks and the data-parallel
// gradient comparison shared by the model (and pipeline) tests.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/comm/process_group.h"
#include "moe/model/config.h"
#include "moe/model/gpt_model.h"
#include "moe/model/layers.h"
#include "moe/model/tensor_parallel.h"
#include "moe/tensor/ops.h"
#include "moe/tensor/parameters.h"
#include "moe/tensor/rng.h"
#include "moe/tensor/tensor.h"
#include "support/testing.h"

namespace moe::model::testing {

// A 2-layer dense GPT small enough for fp64 finite differences: GQA, RMSNorm, rope, SwiGLU,
// untied embeddings, dropout on.
inline TransformerConfig tiny_gpt_config() {
  TransformerConfig c;
  c.num_layers = 2;
  c.hidden_size = 16;
  c.num_attention_heads = 4;
  c.group_query_attention = true;
  c.num_query_groups = 2;
  c.ffn_hidden_size = 12;
  c.padded_vocab_size = 13;
  c.seq_length = 6;
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  c.swiglu = true;
  c.untie_embeddings_and_output_weights = true;
  c.hidden_dropout = 0.1f;
  c.attention_dropout = 0.1f;
  return c;
}

// tiny_gpt_config with 4 experts (top-2, aux and z losses, grouped GEMM) on the layers `pattern`
// marks.
inline TransformerConfig tiny_moe_gpt_config(std::vector<int> pattern = {1, 0}) {
  TransformerConfig c = tiny_gpt_config();
  c.num_experts = 4;
  c.moe_layer_pattern = std::move(pattern);
  c.moe.moe_router_topk = 2;
  c.moe.moe_aux_loss_coeff = 0.01;
  c.moe.moe_z_loss_coeff = 0.001;
  c.moe.moe_grouped_gemm = true;
  return c;
}

// Multi-latent attention with the MLA tests' head sizes: query/key heads of 3 + 4 (the rope part),
// value heads of 5 (differing on purpose), a kv down-projection of 6 and a query one of
// q_lora_rank (0: none).
inline void set_small_mla(TransformerConfig& c, int q_lora_rank) {
  c.multi_latent_attention = true;
  c.q_lora_rank = q_lora_rank;
  c.kv_lora_rank = 6;
  c.qk_head_dim = 3;
  c.qk_pos_emb_head_dim = 4;
  c.v_head_dim = 5;
}

// Every parameter random: norm weights in [0.5, 1.5), everything else N(0, std) (fp32 values).
inline void randomize(ParameterStore& store, uint64_t seed, float std = 0.3f) {
  for (int i = 0; i < store.count(); ++i) {
    Rng rng = Rng::derived(seed, uint64_t(i));
    Tensor p = store.param(ParamHandle{i});
    if (store.spec(ParamHandle{i}).name.find("norm") != std::string::npos) {
      rng.fill_uniform(p, 0.5f, 1.5f);
    } else {
      rng.fill_normal(p, 0.0f, std);
    }
  }
}

// Token ids [batch, seq] (I64) uniform in [0, vocab).
inline Tensor random_tokens(int64_t batch, int64_t seq, int64_t vocab, uint64_t seed) {
  Rng rng(seed);
  Tensor t({batch, seq}, DType::I64);
  for (int64_t i = 0; i < t.numel(); ++i) {
    t.data<int64_t>()[i] = int64_t(rng.below(uint64_t(vocab)));
  }
  return t;
}

struct Batch {
  Tensor tokens, labels, mask;
};

// Random tokens and labels [batch, seq], every token counted but (0, 1).
inline Batch make_batch(const TransformerConfig& c, int64_t batch, uint64_t seed) {
  Batch b{random_tokens(batch, c.seq_length, c.padded_vocab_size, seed),
          random_tokens(batch, c.seq_length, c.padded_vocab_size, seed + 1),
          Tensor::full({batch, c.seq_length}, 1.0f)};
  b.mask.set(1, 0.0f);
  return b;
}

// sum(out * probe) in double.
inline double dot(const Tensor& out, const Tensor& probe) {
  double total = 0;
  for (int64_t i = 0; i < out.numel(); ++i)
    total += moe::testing::value_at(out, i) * moe::testing::value_at(probe, i);
  return total;
}

// Checks every trainable parameter of the store (gradients already accumulated from one
// backward); buffers have no gradient.
inline ::testing::AssertionResult check_all_params(ParameterStore& store,
                                                   const std::function<double()>& objective,
                                                   double rtol = 1e-4) {
  for (int i = 0; i < store.count(); ++i) {
    ParamHandle h{i};
    if (!store.spec(h).trainable) continue;
    auto result =
        moe::testing::check_gradient(store.param(h), store.grad(h), objective, store.spec(h).name,
                                     moe::testing::kMinimumGradientSamples, rtol);
    if (!result) return result;
  }
  return ::testing::AssertionSuccess();
}

// Input and parameter gradients of `layer` against finite differences of probe . forward(saved),
// where `forward` runs the layer on x and fills its Context context.
template <class Layer, class Forward>
::testing::AssertionResult layer_gradients_match(const Layer& layer, ParameterStore& store,
                                                 Tensor x, const Tensor& probe, Forward forward,
                                                 const std::string& what) {
  auto objective = [&] {
    typename Layer::Context saved;
    return dot(forward(saved), probe);
  };
  typename Layer::Context saved;
  forward(saved);
  Tensor dx = layer.backward(store, saved, probe);
  ::testing::AssertionResult input = moe::testing::check_gradient(x, dx, objective, what);
  if (!input) return input;
  return check_all_params(store, objective);
}

// layer_gradients_match for an attention layer of hidden size 12 (SelfAttention,
// MultiLatentAttention) on random fp64 input [5 x 2 tokens, 12], dropout stream 3.
template <class Attention>
::testing::AssertionResult attention_gradients_match(const Attention& attention,
                                                     ParameterStore& store) {
  BatchShape shape{5, 2};
  Tensor x = moe::testing::random_normal({10, 12}, 9, 1.0f, DType::F64);
  Tensor probe = moe::testing::random_normal({10, 12}, 10, 1.0f, DType::F64);
  auto forward = [&](typename Attention::Context& saved) {
    return attention.forward(store, x, shape, 3, true, saved);
  };
  return layer_gradients_match(attention, store, x, probe, forward, "attention input");
}

// The objective the model's backward differentiates: the LM loss, the router losses and the
// scaled MTP losses.
inline double gpt_objective(const GPTContext& ctx, const TransformerConfig& config,
                            double lm_loss) {
  double total = lm_loss;
  for (const MoELossReport& r : ctx.moe_losses) {
    total += r.losses.load_balancing_loss + r.losses.z_loss;
  }
  for (const MTPLossReport& r : ctx.mtp_losses) {
    total += config.mtp_loss_scaling_factor / config.mtp_num_layers * r.loss;
  }
  return total;
}

// Every parameter gradient of `config`'s fp64 model (initialised with seed 3, randomised with 4,
// dropout stream 77) on `batch` against finite differences of gpt_objective; `check_forward`
// first sees the context of the forward that backward then runs on.
inline void check_model_gradients(
    const TransformerConfig& config, const Batch& batch,
    const std::function<void(const GPTContext&)>& check_forward = [](const GPTContext&) {}) {
  ParameterStore store(DType::F64);
  GPTModel model(config, comm::single_process_state(), store);
  store.allocate();
  model.init_parameters(3);
  randomize(store, 4, 0.3f);
  auto objective = [&] {
    GPTContext ctx;
    ctx.dropout_seed = 77;
    double loss = model.forward(batch.tokens, batch.labels, ctx, batch.mask);
    return gpt_objective(ctx, config, loss);
  };
  GPTContext ctx;
  ctx.dropout_seed = 77;
  model.forward(batch.tokens, batch.labels, ctx, batch.mask);
  check_forward(ctx);
  model.backward(ctx);
  // Norms save 1/rms (1/std) in fp32 even for fp64 inputs (ops.h), so gradients below a norm
  // carry ~2^-24 of their row's scale: at most 9e-9 absolute in these models (inside the 1e-8
  // atol floor), and up to 2e-4 relative on elements of ~1e-4.
  EXPECT_TRUE(check_all_params(store, objective, 2e-4));
}

// Sums this rank's gradients over data parallelism as the optimizer does (dense ones over dp x
// cp, expert ones over expert-dp, in place, both divided by cp: each cp rank's gradient carries
// cp times its share, as Megatron's), then hands compare each parameter's spec, its reduced
// gradient and the matching block of the single-process reference's gradient.
// Buffers (non-trainable state such as the router's expert bias) are compared by value, exactly.
inline void compare_reduced_gradients(const ParameterStore& store, const comm::ParallelState& state,
                                      const ParameterStore& reference,
                                      const std::function<void(const ParamSpec&, const Tensor& got,
                                                               const Tensor& expected)>& compare) {
  Tensor dense = store.flat_grads(ParamGroup::kDense);
  Tensor expert = store.flat_grads(ParamGroup::kExpert);
  comm::all_reduce(dense, state.dp_cp_group);
  comm::all_reduce(expert, state.expert_dp_group);
  if (state.sizes.cp > 1) {
    scale(dense, 1.0f / float(state.sizes.cp));
    scale(expert, 1.0f / float(state.sizes.cp));
  }
  for (int i = 0; i < store.count(); ++i) {
    const ParamSpec& spec = store.spec(ParamHandle{i});
    Tensor expected(spec.shape);
    if (!spec.trainable) {  // a buffer (the expert bias): its value after the step, exactly
      copy_global_block(reference.param(reference.find(spec.name)), spec, expected);
      EXPECT_TENSORS_CLOSE(store.param(ParamHandle{i}), expected, 0, 0) << spec.name;
      continue;
    }
    copy_global_block(reference.grad(reference.find(spec.name)), spec, expected);
    compare(spec, store.grad(ParamHandle{i}), expected);
  }
}

}  // namespace moe::model::testing

// Single-process tests of every layer: fp64 finite-difference gradient checks, kernels against
// their references on awkward shapes, GQA against multi-head attention, and error texts.
#include <gtest/gtest.h>

#include <cmath>

#include "model_testing.h"
#include "moe/model/layers.h"
#include "moe/tensor/ops.h"
#include "support/testing.h"

namespace moe::model {
namespace {

using moe::testing::check_gradient;
using moe::testing::random_normal;
using testing::check_all_params;
using testing::dot;
using testing::layer_gradients_match;

TransformerConfig small_config() {
  TransformerConfig c;
  c.hidden_size = 12;
  c.num_attention_heads = 4;
  c.ffn_hidden_size = 10;
  c.padded_vocab_size = 11;
  c.seq_length = 5;
  c.hidden_dropout = 0;
  c.attention_dropout = 0;
  return c;
}

TEST(Dropout, DeterministicScaledAndReversible) {
  Tensor x = Tensor::full({64, 32}, 1.0f);
  Tensor y = x.clone();
  apply_dropout(y, 0.25f, dropout_key(7, 3, 1), 100);
  Tensor again = x.clone();
  apply_dropout(again, 0.25f, dropout_key(7, 3, 1), 100);
  EXPECT_TENSORS_CLOSE(y, again, 0, 0);
  int64_t kept = 0;
  for (int64_t i = 0; i < y.numel(); ++i) {
    float v = y.get(i);
    ASSERT_TRUE(v == 0.0f || std::fabs(v - 1.0f / 0.75f) < 1e-6f) << v;
    kept += v != 0.0f;
  }
  EXPECT_NEAR(double(kept) / double(y.numel()), 0.75, 0.04);
  // A shifted index window gives the same mask on the overlap (layout independence).
  Tensor tail = Tensor::full({32, 32}, 1.0f);
  apply_dropout(tail, 0.25f, dropout_key(7, 3, 1), 100 + 32 * 32);
  EXPECT_TENSORS_CLOSE(tail, y.rows(32, 64), 0, 0);
  Tensor untouched = x.clone();
  apply_dropout(untouched, 0.0f, 1, 0);
  EXPECT_TENSORS_CLOSE(untouched, x, 0, 0);
  EXPECT_THROW(apply_dropout(untouched, 1.0f, 1, 0), Error);
}

TEST(LayerNormKernel, MatchesReferenceOnAwkwardShapes) {
  for (int64_t rows : {0, 1, 5, 17, 129}) {
    for (DType dtype : {DType::F32, DType::BF16, DType::F64}) {
      int64_t width = 7;
      Tensor x = random_normal({rows, width}, 1 + rows, 2.0f, dtype);
      Tensor w = random_normal({width}, 2, 1.0f, dtype), b = random_normal({width}, 3, 1.0f, dtype);
      Tensor dy = random_normal({rows, width}, 4 + rows, 1.0f, dtype);
      Tensor y(x.shape(), dtype), y_ref(x.shape(), dtype), mean({rows}), inv({rows}),
          mean_ref({rows}), inv_ref({rows});
      layernorm(x, w, b, 1e-5f, y, mean, inv);
      reference::layernorm(x, w, b, 1e-5f, y_ref, mean_ref, inv_ref);
      double tol = dtype == DType::BF16 ? 2e-2 : 1e-5;
      EXPECT_TENSORS_CLOSE(y, y_ref, tol, tol);
      EXPECT_TENSORS_CLOSE(inv, inv_ref, 1e-5, 1e-5);
      Tensor dx(x.shape(), dtype), dx_ref(x.shape(), dtype), dw({width}), db({width}),
          dw_ref({width}), db_ref({width});
      layernorm_backward(x, w, mean, inv, dy, dx, dw, db);
      reference::layernorm_backward(x, w, mean, inv, dy, dx_ref, dw_ref, db_ref);
      EXPECT_TENSORS_CLOSE(dx, dx_ref, tol, tol);
      EXPECT_TENSORS_CLOSE(dw, dw_ref, 1e-4, 1e-4);
      EXPECT_TENSORS_CLOSE(db, db_ref, 1e-4, 1e-4);
    }
  }
}

TEST(Norm, GradientsMatchFiniteDifferences) {
  for (const char* kind : {"RMSNorm", "LayerNorm"}) {
    ParameterStore store(DType::F64);
    Norm norm(store, "norm", 9, kind, 1e-5f);
    store.allocate();
    testing::randomize(store, 5);
    Tensor x = random_normal({6, 9}, 6, 1.5f, DType::F64);
    Tensor probe = random_normal({6, 9}, 7, 1.0f, DType::F64);
    auto forward = [&](Norm::Saved& saved) { return norm.forward(store, x, saved); };
    EXPECT_TRUE(
        layer_gradients_match(norm, store, x, probe, forward, std::string(kind) + " input", 54, 9));
  }
  ParameterStore store;
  EXPECT_EQ(moe::testing::error_text([&] { Norm(store, "n", 4, "BatchNorm", 1e-5f); }),
            "normalization 'BatchNorm' is not supported (LayerNorm or RMSNorm)");
}

TEST(Rope, RotatesPairsAndBackwardIsTheInverse) {
  Tensor x = random_normal({2, 3, 6, 8}, 11, 1.0f, DType::F64);
  Tensor y = x.clone();
  apply_rope(y, 10000.0f, false);
  // Position 0 is unrotated; at position p, pair (i, i + 4) turns by p * base^(-2i/8).
  for (int64_t i = 0; i < 8; ++i) EXPECT_DOUBLE_EQ(y.data<double>()[i], x.data<double>()[i]);
  int64_t p = 3, i = 1;
  double angle = double(p) * std::pow(10000.0, -2.0 * double(i) / 8.0);
  const double* xp = x.data<double>() + p * 8;
  const double* yp = y.data<double>() + p * 8;
  EXPECT_NEAR(yp[i], xp[i] * std::cos(angle) - xp[i + 4] * std::sin(angle), 1e-12);
  EXPECT_NEAR(yp[i + 4], xp[i + 4] * std::cos(angle) + xp[i] * std::sin(angle), 1e-12);
  apply_rope(y, 10000.0f, true);
  EXPECT_TENSORS_CLOSE(y, x, 1e-12, 1e-12);
  Tensor odd({1, 1, 2, 3}, DType::F64);
  EXPECT_THROW(apply_rope(odd, 10000.0f, false), Error);
}

TEST(CausalAttention, MatchesNaiveReference) {
  struct Case {
    int64_t batch, heads, groups, seq, dim, value_dim;
    float dropout;
  };
  // value_dim != dim: multi-latent attention's value heads.
  for (Case c :
       {Case{0, 2, 1, 3, 4, 4, 0}, Case{1, 2, 2, 0, 4, 4, 0}, Case{1, 1, 1, 1, 4, 4, 0},
        Case{2, 4, 2, 5, 3, 3, 0}, Case{1, 6, 1, 17, 8, 8, 0}, Case{1, 2, 1, 129, 4, 4, 0},
        Case{2, 4, 4, 7, 5, 5, 0.3f}, Case{2, 4, 4, 70, 6, 3, 0.3f}, Case{1, 2, 2, 9, 2, 7, 0}}) {
    Tensor q = random_normal({c.batch, c.heads, c.seq, c.dim}, 1, 1.0f);
    Tensor k = random_normal({c.batch, c.groups, c.seq, c.dim}, 2, 1.0f);
    Tensor v = random_normal({c.batch, c.groups, c.seq, c.value_dim}, 3, 1.0f);
    AttentionDropout dropout{c.dropout, 99, 0, 0};
    Tensor lse({c.batch, c.heads, c.seq}), context({c.batch, c.heads, c.seq, c.value_dim});
    Tensor lse_ref(lse.shape()), context_ref(context.shape());
    causal_attention_forward(q, k, v, dropout, lse, context);
    reference::causal_attention_forward(q, k, v, dropout, lse_ref, context_ref);
    EXPECT_TENSORS_CLOSE(lse, lse_ref, 1e-5, 1e-5);
    EXPECT_TENSORS_CLOSE(context, context_ref, 1e-5, 1e-5);
  }
}

TEST(CausalAttention, GradientsMatchFiniteDifferences) {
  // seq 70 spans two query blocks (64 + 6 rows), seq 6 one; value heads of 3 (as q and k) and
  // of 5 (multi-latent attention's own value size).
  for (int64_t seq : {6, 70}) {
    for (float p : {0.0f, 0.25f}) {
      int64_t value_dim = p == 0 ? 3 : 5;
      Tensor q = random_normal({2, 4, seq, 3}, 1, 1.0f, DType::F64);
      Tensor k = random_normal({2, 2, seq, 3}, 2, 1.0f, DType::F64);
      Tensor v = random_normal({2, 2, seq, value_dim}, 3, 1.0f, DType::F64);
      Shape context_shape{2, 4, seq, value_dim};
      Tensor probe = random_normal(context_shape, 4, 1.0f, DType::F64);
      AttentionDropout dropout{p, 5, 0, 0};
      int samples = seq > 64 ? 12 : 40;
      auto objective = [&] {
        Tensor lse({2, 4, seq}, DType::F64), context(context_shape, DType::F64);
        causal_attention_forward(q, k, v, dropout, lse, context);
        return dot(context, probe);
      };
      Tensor lse({2, 4, seq}, DType::F64), context(context_shape, DType::F64);
      causal_attention_forward(q, k, v, dropout, lse, context);
      Tensor dq(q.shape(), DType::F64), dk(k.shape(), DType::F64), dv(v.shape(), DType::F64);
      causal_attention_backward(q, k, v, lse, dropout, probe, dq, dk, dv);
      EXPECT_TRUE(check_gradient(q, dq, objective, "q", samples));
      EXPECT_TRUE(check_gradient(k, dk, objective, "k", samples));
      EXPECT_TRUE(check_gradient(v, dv, objective, "v", samples));
    }
  }
}

// Runs an attention block forward and backward; returns the output and input gradient.
struct BlockRun {
  Tensor out, dx;
};
BlockRun run_attention(const SelfAttention& attention, const ParameterStore& store, const Tensor& x,
                       const Tensor& probe, BatchShape shape) {
  SelfAttention::Saved saved;
  Tensor out = attention.forward(store, x, shape, 3, true, saved);
  return {out, attention.backward(store, saved, probe)};
}

TEST(SelfAttention, GradientsMatchFiniteDifferences) {
  for (bool gqa : {false, true}) {
    for (const char* position : {"rope", "none"}) {
      TransformerConfig c = small_config();
      c.group_query_attention = gqa;
      c.num_query_groups = 2;
      c.position_embedding_type = position;
      c.kv_channels = 4;  // rope needs an even head dimension
      c.attention_dropout = 0.2f;
      ParameterStore store(DType::F64);
      SelfAttention attention(store, "attn", c, TensorParallel{});
      store.allocate();
      testing::randomize(store, 8);
      BatchShape shape{5, 2};
      Tensor x = random_normal({10, 12}, 9, 1.0f, DType::F64);
      Tensor probe = random_normal({10, 12}, 10, 1.0f, DType::F64);
      auto forward = [&](SelfAttention::Saved& saved) {
        return attention.forward(store, x, shape, 3, true, saved);
      };
      EXPECT_TRUE(
          layer_gradients_match(attention, store, x, probe, forward, "attention input", 30, 10));
    }
  }
}

TEST(SelfAttention, GroupsEqualToHeadsIsMultiHead) {
  TransformerConfig mha = small_config();
  TransformerConfig gqa = mha;
  gqa.group_query_attention = true;
  gqa.num_query_groups = gqa.num_attention_heads;
  ParameterStore store_mha, store_gqa;
  SelfAttention a(store_mha, "attn", mha, TensorParallel{});
  SelfAttention b(store_gqa, "attn", gqa, TensorParallel{});
  store_mha.allocate();
  store_gqa.allocate();
  testing::randomize(store_mha, 12);
  testing::randomize(store_gqa, 12);
  Tensor x = random_normal({10, 12}, 13, 1.0f), probe = random_normal({10, 12}, 14, 1.0f);
  BlockRun ra = run_attention(a, store_mha, x, probe, {5, 2});
  BlockRun rb = run_attention(b, store_gqa, x, probe, {5, 2});
  EXPECT_TENSORS_CLOSE(rb.out, ra.out, 0, 0);
  EXPECT_TENSORS_CLOSE(rb.dx, ra.dx, 0, 0);
  EXPECT_TENSORS_CLOSE(store_gqa.flat_grads(ParamGroup::kDense),
                       store_mha.flat_grads(ParamGroup::kDense), 0, 0);
}

TEST(SelfAttention, SharedKeyValueGroupsEqualRepeatedMultiHead) {
  // GQA with 2 groups of 2 heads == MHA whose heads 2g and 2g+1 share group g's k and v.
  TransformerConfig gqa = small_config();
  gqa.group_query_attention = true;
  gqa.num_query_groups = 2;
  TransformerConfig mha = small_config();
  ParameterStore store_gqa, store_mha;
  SelfAttention a(store_gqa, "attn", gqa, TensorParallel{});
  SelfAttention b(store_mha, "attn", mha, TensorParallel{});
  store_gqa.allocate();
  store_mha.allocate();
  testing::randomize(store_gqa, 15);
  // GQA columns per group: [q, q, k, v] x 3; MHA per head: [q, k, v] x 3.
  Tensor wg = store_gqa.param(a.linear_qkv().weight()).reshape({12, 2, 4, 3});
  Tensor wm = store_mha.param(b.linear_qkv().weight()).reshape({12, 4, 3, 3});
  for (int64_t in = 0; in < 12; ++in) {
    for (int64_t head = 0; head < 4; ++head) {
      int64_t g = head / 2, j = head % 2;
      for (int64_t d = 0; d < 3; ++d) {
        wm.set(((in * 4 + head) * 3 + 0) * 3 + d, wg.get(((in * 2 + g) * 4 + j) * 3 + d));
        wm.set(((in * 4 + head) * 3 + 1) * 3 + d, wg.get(((in * 2 + g) * 4 + 2) * 3 + d));
        wm.set(((in * 4 + head) * 3 + 2) * 3 + d, wg.get(((in * 2 + g) * 4 + 3) * 3 + d));
      }
    }
  }
  store_mha.param(b.linear_qkv().bias()).zero();
  store_gqa.param(a.linear_qkv().bias()).zero();
  store_mha.param(b.linear_proj().weight()).copy_from(store_gqa.param(a.linear_proj().weight()));
  store_mha.param(b.linear_proj().bias()).copy_from(store_gqa.param(a.linear_proj().bias()));
  Tensor x = random_normal({10, 12}, 16, 1.0f), probe = random_normal({10, 12}, 17, 1.0f);
  BlockRun ra = run_attention(a, store_gqa, x, probe, {5, 2});
  BlockRun rb = run_attention(b, store_mha, x, probe, {5, 2});
  EXPECT_TENSORS_CLOSE(ra.out, rb.out, 1e-5, 1e-5);
  EXPECT_TENSORS_CLOSE(ra.dx, rb.dx, 1e-5, 1e-5);
}

TEST(MLP, GradientsMatchFiniteDifferences) {
  for (bool swiglu : {false, true}) {
    for (bool bias : {false, true}) {
      TransformerConfig c = small_config();
      c.swiglu = swiglu;
      c.add_bias_linear = bias;
      ParameterStore store(DType::F64);
      MLP mlp(store, "mlp", c, TensorParallel{});
      store.allocate();
      testing::randomize(store, 20);
      Tensor x = random_normal({7, 12}, 21, 1.0f, DType::F64);
      Tensor probe = random_normal({7, 12}, 22, 1.0f, DType::F64);
      auto forward = [&](MLP::Saved& saved) { return mlp.forward(store, x, saved); };
      EXPECT_TRUE(layer_gradients_match(mlp, store, x, probe, forward, "mlp input", 30, 10));
    }
  }
}

TEST(Embedding, LooksUpRowsAndAccumulatesGradients) {
  ParameterStore store(DType::F64);
  VocabParallelEmbedding embedding(store, "emb", 11, 4, TensorParallel{});
  store.allocate();
  testing::randomize(store, 30);
  Tensor tokens = Tensor::from_floats({3, 10, 3, 0, 7, 1}, {2, 3}, DType::I64);
  Tensor out = embedding.forward(store, tokens);
  // Row s * B + b holds token [b, s].
  Tensor table = store.param(embedding.weight());
  EXPECT_EQ(out.get(1 * 4 + 2), table.get(0 * 4 + 2));  // s 0, b 1 -> token 0
  EXPECT_EQ(out.get(4 * 4 + 1), table.get(3 * 4 + 1));  // s 2, b 0 -> token 3
  Tensor probe = random_normal({6, 4}, 31, 1.0f, DType::F64);
  embedding.backward(store, tokens, probe);
  auto objective = [&] { return dot(embedding.forward(store, tokens), probe); };
  EXPECT_TRUE(check_all_params(store, objective, 44));
  Tensor bad = Tensor::from_floats({3, 11}, {1, 2}, DType::I64);
  EXPECT_EQ(moe::testing::error_text([&] { embedding.forward(store, bad); }),
            "token id 11 at [0, 1] is outside the vocabulary [0, 11)");
}

TEST(CrossEntropy, MatchesLogSoftmaxAndFiniteDifferences) {
  Tensor logits = random_normal({6, 9}, 40, 2.0f, DType::F64);
  Tensor targets = Tensor::from_floats({0, 8, 3, 3, 5, 1}, {6}, DType::I64);
  Tensor softmax;
  Tensor loss = vocab_parallel_cross_entropy(logits, targets, 0, TensorParallel{}, softmax);
  Tensor log_probs(logits.shape(), DType::F64);
  moe::reference::log_softmax_rows(logits, log_probs);
  for (int64_t r = 0; r < 6; ++r) {
    int64_t t = int64_t(targets.get(r));
    EXPECT_NEAR(loss.data<double>()[r], -log_probs.data<double>()[r * 9 + t], 1e-12);
  }
  Tensor weights = random_normal({6}, 41, 1.0f, DType::F64);
  Tensor dlogits = vocab_parallel_cross_entropy_backward(softmax, targets, 0, weights);
  auto objective = [&] {
    Tensor s;
    return dot(vocab_parallel_cross_entropy(logits, targets, 0, TensorParallel{}, s), weights);
  };
  EXPECT_TRUE(check_gradient(logits, dlogits, objective, "logits", 54));
  Tensor bad = Tensor::from_floats({0, 9, 0, 0, 0, 0}, {6}, DType::I64);
  EXPECT_EQ(moe::testing::error_text(
                [&] { vocab_parallel_cross_entropy(logits, bad, 0, TensorParallel{}, softmax); }),
            "label 9 (row 1) is outside the vocabulary [0, 9)");
}

TEST(OutputLayer, TiedAndUntiedGradientsMatchFiniteDifferences) {
  for (bool tied : {false, true}) {
    ParameterStore store(DType::F64);
    VocabParallelEmbedding embedding(store, "emb", 11, 6, TensorParallel{});
    OutputLayer output(store, "out", 6, 11, TensorParallel{}, tied ? &embedding : nullptr);
    store.allocate();
    testing::randomize(store, 50);
    Tensor x = random_normal({5, 6}, 51, 1.0f, DType::F64);
    Tensor probe = random_normal({5, 11}, 52, 1.0f, DType::F64);
    auto forward = [&](OutputLayer::Saved& saved) { return output.forward(store, x, saved); };
    OutputLayer::Saved saved;
    EXPECT_EQ(forward(saved).dtype(), DType::F64);
    EXPECT_TRUE(layer_gradients_match(output, store, x, probe, forward, "output input", 30, 20));
  }
}

TEST(GlobalBlock, CopiesThisRanksBlockAndRefusesOneOutsideTheTensor) {
  Tensor global = random_normal({4, 6}, 3);
  ParamSpec spec{.name = "w", .shape = {2, 3}, .global_shape = {4, 6}, .global_offset = {2, 3}};
  Tensor local({2, 3});
  copy_global_block(global, spec, local);
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t c = 0; c < 3; ++c)
      EXPECT_EQ(local.data<float>()[r * 3 + c], global.data<float>()[(2 + r) * 6 + 3 + c]);
  spec.global_offset = {3, 3};
  EXPECT_EQ(moe::testing::error_text([&] { copy_global_block(global, spec, local); }),
            "local block of 'w' at offset [3, 3] lies partly outside the global tensor [4, 6]");
}

TEST(Config, RefusesWhatCannotBeSplit) {
  auto message = [](const TransformerConfig& c, int tp) {
    return moe::testing::error_text([&] { c.validate(tp); });
  };
  TransformerConfig c = small_config();
  EXPECT_EQ(message(c, 1), "(no error)");
  c.num_attention_heads = 6;
  EXPECT_EQ(message(c, 4),
            "num_attention_heads (6) must be divisible by tensor_model_parallel_size (4)");
  c = small_config();
  c.group_query_attention = true;
  c.num_query_groups = 2;
  EXPECT_EQ(message(c, 4),
            "num_query_groups (2) must be divisible by tensor_model_parallel_size (4)");
  c.num_query_groups = 3;
  EXPECT_EQ(message(c, 1), "num_attention_heads (4) must be divisible by num_query_groups (3)");
  c = small_config();
  c.padded_vocab_size = 11;
  EXPECT_EQ(message(c, 2),
            "padded_vocab_size (11) must be divisible by tensor_model_parallel_size (2)");
  c = small_config();
  c.normalization = "BatchNorm";
  EXPECT_EQ(message(c, 1), "normalization 'BatchNorm' is not supported (LayerNorm or RMSNorm)");
  c = small_config();
  c.recompute_granularity = "selective";
  EXPECT_EQ(message(c, 1),
            "recompute_granularity 'selective' is not supported (only 'full', or unset)");
  c = small_config();
  c.sequence_parallel = true;
  c.seq_length = 5;
  c.padded_vocab_size = 12;
  EXPECT_EQ(
      message(c, 2),
      "seq_length (5) must be divisible by tensor_model_parallel_size (2) with sequence_parallel");
  EXPECT_EQ(padded_vocab_size(50257, 128, 4), 50688);
}

}  // namespace
}  // namespace moe::model

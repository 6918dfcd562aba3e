// Single-process tests of every layer: fp64 finite-difference gradient checks, kernels against
// their references on awkward shapes, GQA against multi-head attention, and error texts.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>
#include <vector>

#include "model_testing.h"
#include "moe/model/layers.h"
#include "moe/model/shared_experts.h"
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
    auto forward = [&](Norm::Context& saved) { return norm.forward(store, x, saved); };
    EXPECT_TRUE(
        layer_gradients_match(norm, store, x, probe, forward, std::string(kind) + " input"));
  }
  ParameterStore store;
  EXPECT_EQ(moe::testing::error_text([&] { Norm(store, "n", 4, "BatchNorm", 1e-5f); }),
            "normalization 'BatchNorm' is not supported (LayerNorm or RMSNorm)");
}

// Context parallelism rotates a rank's rows by their global positions: the same values as the
// rows of the whole rotated sequence; a position list of the wrong length is refused.
TEST(Rope, ExplicitPositionsRotateAsTheirRowsOfTheWholeSequence) {
  Tensor full = random_normal({2, 3, 12, 8}, 11, 1.0f, DType::F64);
  const std::vector<int64_t> positions = {3, 4, 5, 6, 7, 8};  // cp 2, rank 1: chunks 1 and 2
  Tensor local({2, 3, 6, 8}, DType::F64);
  for (int64_t o = 0; o < 6; ++o) {
    for (int64_t i = 0; i < 6; ++i) {
      local.reshape({-1, 8})
          .rows(o * 6 + i, o * 6 + i + 1)
          .copy_from(full.reshape({-1, 8}).rows(o * 12 + positions[size_t(i)],
                                                o * 12 + positions[size_t(i)] + 1));
    }
  }
  RotaryFrequencies frequencies = rope_frequencies(8, 10000.0);
  apply_rotary(full, frequencies, false);
  apply_rotary(local, frequencies, false, positions);
  for (int64_t o = 0; o < 6; ++o) {
    for (int64_t i = 0; i < 6; ++i) {
      EXPECT_TENSORS_CLOSE(local.reshape({-1, 8}).rows(o * 6 + i, o * 6 + i + 1),
                           full.reshape({-1, 8}).rows(o * 12 + positions[size_t(i)],
                                                      o * 12 + positions[size_t(i)] + 1),
                           0, 0);
    }
  }
  EXPECT_EQ(moe::testing::error_text([&] {
              apply_rotary(local, frequencies, false, std::vector<int64_t>{0, 1});
            }),
            "rope got 2 positions for a sequence of 6");
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

// YaRN written out from its definition, independently of yarn_frequencies: pair i has the
// wavelength 2 pi base^(2i/d), so it turns r_i = L / wavelength times over the original context
// L; the boundaries are the (fractional) pair indices where r equals beta_fast and beta_slow,
// floored / ceiled, and the frequency moves linearly in i from theta_i to theta_i / s between
// them. The attention factor is 0.1 * m * ln(s) + 1 for each of mscale and mscale_all_dim.
struct YarnCase {
  int64_t dim;
  double base, factor;
  int64_t original;
  double beta_fast, beta_slow, mscale, mscale_all_dim;
  bool round;
};
std::vector<double> yarn_by_definition(const YarnCase& c, double& concentration) {
  int64_t half = c.dim / 2;
  auto index_of_turns = [&](double turns) {
    // r = L / (2 pi base^(2i/d))  <=>  i = (d / 2) log_base(L / (2 pi r)).
    return 0.5 * double(c.dim) * std::log(double(c.original) / (2 * std::numbers::pi * turns)) /
           std::log(c.base);
  };
  double low = index_of_turns(c.beta_fast), high = index_of_turns(c.beta_slow);
  if (c.round) low = std::floor(low), high = std::ceil(high);
  low = std::max(low, 0.0);
  high = std::min(high, double(c.dim - 1));
  if (low == high) high += 0.001;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    double theta = 1.0 / std::pow(c.base, double(2 * i) / double(c.dim));
    double blend = std::min(1.0, std::max(0.0, (double(i) - low) / (high - low)));
    inv_freq[size_t(i)] = (1 - blend) * theta + blend * theta / c.factor;
  }
  auto attention_factor = [&](double m) {
    return c.factor > 1 ? 1 + 0.1 * m * std::log(c.factor) : 1.0;
  };
  concentration = attention_factor(c.mscale) / attention_factor(c.mscale_all_dim);
  return inv_freq;
}

TEST(Yarn, FrequenciesAndAttentionFactorMatchTheDefinition) {
  // DeepSeek-V3 (d 64, s 40, mscale = mscale_all_dim), Megatron's defaults (mscale 1,
  // mscale_all_dim 0), no rounding, a factor below 1 (no attention factor) and a tiny head.
  for (YarnCase c : {YarnCase{64, 10000, 40, 4096, 32, 1, 0.707, 0.707, true},
                     YarnCase{64, 10000, 40, 4096, 32, 1, 1.0, 0.0, true},
                     YarnCase{128, 1e6, 4, 32768, 32, 1, 1.0, 0.8, false},
                     YarnCase{16, 500, 0.5, 64, 8, 2, 2.0, 0.0, true},
                     YarnCase{2, 10000, 8, 16, 32, 1, 1.0, 0.0, true}}) {
    SCOPED_TRACE("dim " + std::to_string(c.dim) + " factor " + std::to_string(c.factor));
    YarnScaling yarn{c.factor, c.original,       c.beta_fast, c.beta_slow,
                     c.mscale, c.mscale_all_dim, c.round};
    RotaryFrequencies got = yarn_frequencies(c.dim, c.base, yarn);
    double concentration = 0;
    std::vector<double> want = yarn_by_definition(c, concentration);
    ASSERT_EQ(got.inv_freq.size(), want.size());
    // Both are a few double operations from the same inputs: 1e-14 relative.
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(got.inv_freq[i], want[i], 1e-14 * want[i]) << "pair " << i;
    }
    EXPECT_NEAR(got.concentration, concentration, 1e-14);
  }
  // The paper's regimes, on DeepSeek-V3's sizes: a pair that turns more than beta_fast times over
  // the original context keeps its frequency; one that turns less than beta_slow times is
  // interpolated by the full factor. Known boundaries for these sizes: pairs 0..10 kept, 23..31
  // divided by 40.
  YarnScaling deepseek{40, 4096, 32, 1, 0.707, 0.707, true};
  RotaryFrequencies got = yarn_frequencies(64, 10000, deepseek);
  RotaryFrequencies plain = rope_frequencies(64, 10000);
  for (size_t i = 0; i < 32; ++i) {
    double turns = 4096 * plain.inv_freq[i] / (2 * std::numbers::pi);
    if (turns > 32 || i <= 10) {
      EXPECT_DOUBLE_EQ(got.inv_freq[i], plain.inv_freq[i]) << i;
    }
    if (turns < 1 || i >= 23) {
      EXPECT_DOUBLE_EQ(got.inv_freq[i], plain.inv_freq[i] / 40) << i;
    }
    if (i > 10 && i < 23) {
      EXPECT_LT(got.inv_freq[i], plain.inv_freq[i]) << i;
      EXPECT_GT(got.inv_freq[i], plain.inv_freq[i] / 40) << i;
    }
  }
  EXPECT_DOUBLE_EQ(got.concentration, 1.0);
  // DeepSeek-V3's mscale_all_dim factor (multi-latent attention squares it into the softmax
  // scale): 0.1 * 0.707 * ln 40 + 1, by hand.
  EXPECT_NEAR(yarn_get_mscale(40, 0.707), 1.2608037774, 1e-10);
  EXPECT_EQ(yarn_get_mscale(1, 5), 1.0);
  // A factor of 1 is plain rope.
  RotaryFrequencies unscaled = yarn_frequencies(8, 10000, YarnScaling{});
  EXPECT_EQ(unscaled.inv_freq, rope_frequencies(8, 10000).inv_freq);
  EXPECT_EQ(unscaled.concentration, 1.0);
  EXPECT_EQ(moe::testing::error_text([] { yarn_frequencies(8, 10000, YarnScaling{0.0}); }),
            "rotary_scaling_factor (0) must be > 0");
}

TEST(Rope, ConcentrationScalesAndBackwardIsTheTranspose) {
  // y = c R x, so <y, g> = <x, c R^T g>: backward applied to g gives the input gradient.
  RotaryFrequencies frequencies =
      yarn_frequencies(6, 100, YarnScaling{3.0, 8, 4, 1, 1.0, 0.0, true});
  ASSERT_GT(frequencies.concentration, 1.0);
  Tensor x = random_normal({2, 3, 5, 6}, 21, 1.0f, DType::F64);
  Tensor g = random_normal(x.shape(), 22, 1.0f, DType::F64);
  Tensor y = x.clone(), back = g.clone();
  apply_rotary(y, frequencies, false);
  apply_rotary(back, frequencies, true);
  EXPECT_NEAR(dot(y, g), dot(x, back), 1e-12 * std::abs(dot(y, g)) + 1e-12);
  // Position 0 is only scaled.
  for (int64_t i = 0; i < 6; ++i) {
    EXPECT_NEAR(y.data<double>()[i], frequencies.concentration * x.data<double>()[i], 1e-15);
  }
  Tensor wrong({1, 1, 2, 8}, DType::F64);
  EXPECT_EQ(moe::testing::error_text([&] { apply_rotary(wrong, frequencies, false); }),
            "rope input head dimension 8 does not match the 3 rotary frequencies");
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
      auto objective = [&] {
        Tensor lse({2, 4, seq}, DType::F64), context(context_shape, DType::F64);
        causal_attention_forward(q, k, v, dropout, lse, context);
        return dot(context, probe);
      };
      Tensor lse({2, 4, seq}, DType::F64), context(context_shape, DType::F64);
      causal_attention_forward(q, k, v, dropout, lse, context);
      Tensor dq(q.shape(), DType::F64), dk(k.shape(), DType::F64), dv(v.shape(), DType::F64);
      causal_attention_backward(q, k, v, lse, dropout, probe, dq, dk, dv);
      EXPECT_TRUE(check_gradient(q, dq, objective, "q"));
      EXPECT_TRUE(check_gradient(k, dk, objective, "k"));
      EXPECT_TRUE(check_gradient(v, dv, objective, "v"));
    }
  }
}

// Context parallelism's core attention: each cp rank's query chunks (r and 2 cp - 1 - r of 2 cp)
// against the whole sequence's keys give exactly the full causal attention's rows, and the ranks'
// key/value gradients sum to the full ones. Odd chunks (1, 5, 17) and a chunk of 70 rows (two
// query blocks) at positions that are no block multiple; dropout on.
TEST(CausalAttention, QueryChunksAtGlobalPositionsMatchTheFullSequence) {
  for (int64_t cp : {2, 3}) {
    for (int64_t chunk : {1, 5, 17, 70}) {
      SCOPED_TRACE("cp " + std::to_string(cp) + ", chunk " + std::to_string(chunk));
      const int64_t seq = 2 * cp * chunk, batch = 2, heads = 4, groups = 2, dim = 3;
      Tensor q = random_normal({batch, heads, seq, dim}, 1, 1.0f);
      Tensor k = random_normal({batch, groups, seq, dim}, 2, 1.0f);
      Tensor v = random_normal({batch, groups, seq, dim}, 3, 1.0f);
      Tensor probe = random_normal({batch, heads, seq, dim}, 4, 1.0f);
      AttentionDropout dropout{0.2f, 7, 0, 0};
      Tensor lse({batch, heads, seq}), context({batch, heads, seq, dim});
      causal_attention_forward(q, k, v, dropout, lse, context);
      Tensor dq(q.shape()), dk(k.shape()), dv(v.shape());
      causal_attention_backward(q, k, v, lse, dropout, probe, dq, dk, dv);

      // [b, n, seq, d] <-> this rank's [b, n, 2 * chunk, d] rows, either way.
      auto move_rows = [&](Tensor& full, Tensor& local, const QueryPositions& at, bool to_local) {
        for (int64_t bn = 0; bn < full.dim(0) * full.dim(1); ++bn) {
          for (size_t c = 0; c < at.starts.size(); ++c) {
            for (int64_t i = 0; i < chunk; ++i) {
              for (int64_t e = 0; e < full.dim(3); ++e) {
                int64_t global = (bn * seq + at.starts[c] + i) * full.dim(3) + e;
                int64_t own = (bn * 2 * chunk + int64_t(c) * chunk + i) * full.dim(3) + e;
                if (to_local) {
                  local.set(own, full.get(global));
                } else {
                  full.set(global, local.get(own));
                }
              }
            }
          }
        }
      };
      Tensor dk_sum = Tensor::zeros(k.shape()), dv_sum = Tensor::zeros(v.shape());
      Tensor context_cp = Tensor::zeros(context.shape()), dq_cp = Tensor::zeros(dq.shape());
      for (int64_t r = 0; r < cp; ++r) {
        QueryPositions at{chunk, {r * chunk, (2 * cp - 1 - r) * chunk}};
        Tensor q_local({batch, heads, 2 * chunk, dim}), probe_local(q_local.shape());
        move_rows(q, q_local, at, true);
        move_rows(probe, probe_local, at, true);
        Tensor lse_local({batch, heads, 2 * chunk}), context_local(q_local.shape());
        causal_attention_forward(q_local, k, v, dropout, lse_local, context_local, at);
        Tensor dq_local(q_local.shape()), dk_local(k.shape()), dv_local(v.shape());
        causal_attention_backward(q_local, k, v, lse_local, dropout, probe_local, dq_local,
                                  dk_local, dv_local, at);
        move_rows(context_cp, context_local, at, false);
        move_rows(dq_cp, dq_local, at, false);
        add(dk_sum, dk_local, dk_sum);
        add(dv_sum, dv_local, dv_sum);
      }
      // Every row's scores, softmax and products run over the same keys in the same order:
      // equal up to fp32 rounding of the GEMM's blocking (observed: bitwise).
      EXPECT_TENSORS_CLOSE(context_cp, context, 1e-6, 1e-6);
      EXPECT_TENSORS_CLOSE(dq_cp, dq, 1e-6, 1e-6);
      // dK and dV: the ranks' partial sums added in another order than one pass over all rows.
      EXPECT_TENSORS_CLOSE(dk_sum, dk, 1e-5, 1e-5);
      EXPECT_TENSORS_CLOSE(dv_sum, dv, 1e-5, 1e-5);
    }
  }
}

TEST(CausalAttention, RefusesQueryChunksThatDoNotFit) {
  Tensor q({1, 2, 4, 3}), k({1, 1, 8, 3}), v({1, 1, 8, 3});
  Tensor lse({1, 2, 4}), context({1, 2, 4, 3});
  EXPECT_EQ(moe::testing::error_text([&] { causal_attention_forward(q, k, v, {}, lse, context); }),
            "causal_attention_forward: 4 query rows but 8 key rows; a subset of the queries "
            "needs their QueryPositions");
  EXPECT_EQ(moe::testing::error_text([&] {
              causal_attention_forward(q, k, v, {}, lse, context, {3, {0, 5}});
            }),
            "causal_attention_forward: 2 query chunks of 3 rows but q has 4");
  EXPECT_EQ(moe::testing::error_text([&] {
              causal_attention_forward(q, k, v, {}, lse, context, {2, {0, 7}});
            }),
            "causal_attention_forward: query chunk 1 at positions [7, 9) is outside the 8 keys");
}

// Runs an attention block forward and backward; returns the output and input gradient.
struct BlockRun {
  Tensor out, dx;
};
BlockRun run_attention(const SelfAttention& attention, const ParameterStore& store, const Tensor& x,
                       const Tensor& probe, BatchShape shape) {
  SelfAttention::Context saved;
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
      EXPECT_TRUE(testing::attention_gradients_match(attention, store));
    }
  }
}

// Qwen's and DeepSeek's options, one at a time and together, with and without GQA.
TEST(SelfAttention, QkLayernormQkvBiasAndYarnGradientsMatchFiniteDifferences) {
  struct Option {
    const char* name;
    void (*apply)(TransformerConfig&);
  };
  const Option options[] = {
      {"qk_layernorm RMSNorm", [](TransformerConfig& c) { c.qk_layernorm = true; }},
      {"qk_layernorm LayerNorm",
       [](TransformerConfig& c) {
         c.qk_layernorm = true;
         c.normalization = "LayerNorm";
       }},
      {"add_qkv_bias", [](TransformerConfig& c) { c.add_qkv_bias = true; }},
      {"yarn",
       [](TransformerConfig& c) {
         c.position_embedding_type = "yarn";
         c.rotary_scaling_factor = 4;
         c.yarn_original_max_position_embeddings = 4;
         c.yarn_beta_fast = 2;
         c.mscale_all_dim = 0.5;
       }},
      {"all",
       [](TransformerConfig& c) {
         c.qk_layernorm = true;
         c.add_qkv_bias = true;
         c.position_embedding_type = "yarn";
         c.rotary_scaling_factor = 4;
         c.yarn_original_max_position_embeddings = 4;
       }},
  };
  for (const Option& option : options) {
    for (bool gqa : {false, true}) {
      SCOPED_TRACE(std::string(option.name) + (gqa ? ", gqa" : ""));
      TransformerConfig c = small_config();
      c.group_query_attention = gqa;
      c.num_query_groups = 2;
      c.kv_channels = 4;
      c.position_embedding_type = "rope";
      c.add_bias_linear = false;  // --disable-bias-linear, as Qwen2
      c.attention_dropout = 0.2f;
      option.apply(c);
      c.validate(1);
      ParameterStore store(DType::F64);
      SelfAttention attention(store, "attn", c, TensorParallel{});
      store.allocate();
      testing::randomize(store, 8);
      EXPECT_EQ(attention.linear_qkv().bias().index >= 0, c.add_qkv_bias);
      EXPECT_LT(attention.linear_proj().bias().index, 0);  // add_qkv_bias adds no other bias
      if (c.qk_layernorm) {
        for (const char* name : {"attn.q_layernorm.weight", "attn.k_layernorm.weight"}) {
          ParamHandle h = store.find(name);
          ASSERT_GE(h.index, 0) << name;
          EXPECT_EQ(store.spec(h).shape, Shape({4}));
          EXPECT_TRUE(store.spec(h).tensor_parallel_duplicate);
          EXPECT_FALSE(store.spec(h).weight_decay);
        }
        EXPECT_EQ(store.find("attn.q_layernorm.bias").index >= 0, c.normalization == "LayerNorm");
      } else {
        EXPECT_EQ(attention.q_layernorm(), nullptr);
      }
      EXPECT_TRUE(testing::attention_gradients_match(attention, store));
    }
  }
}

TEST(SelfAttention, QkLayernormNormalisesEachHeadOnItsOwn) {
  // With RMSNorm on q and k, scaling one query head's columns of linear_qkv (and one key
  // group's) leaves the output unchanged: each head vector is normalised over its own d values.
  TransformerConfig c = small_config();
  c.qk_layernorm = true;
  c.normalization = "RMSNorm";
  c.norm_epsilon = 1e-12f;  // eps is the only thing that makes RMSNorm scale-dependent
  c.add_bias_linear = false;
  c.group_query_attention = true;
  c.num_query_groups = 2;
  ParameterStore store(DType::F64);
  SelfAttention attention(store, "attn", c, TensorParallel{});
  store.allocate();
  testing::randomize(store, 31);
  Tensor x = random_normal({10, 12}, 32, 1.0f, DType::F64);
  SelfAttention::Context saved;
  Tensor before = attention.forward(store, x, {5, 2}, 3, false, saved);
  // Columns per group: [q, q, k, v] x d = 3; scale group 1's second query and its key.
  Tensor w = store.param(attention.linear_qkv().weight()).reshape({12, 2, 4, 3});
  for (int64_t in = 0; in < 12; ++in) {
    for (int64_t slot : {1, 2}) {
      for (int64_t d = 0; d < 3; ++d) {
        int64_t i = ((in * 2 + 1) * 4 + slot) * 3 + d;
        w.set(i, w.get(i) * (slot == 1 ? 7.0 : 0.25));
      }
    }
  }
  Tensor after = attention.forward(store, x, {5, 2}, 3, false, saved);
  // The norm keeps 1 / rms in fp32 even for fp64 inputs (6e-8 relative per head vector); eps =
  // 1e-12 adds ~1e-11. Outputs of order 1: 1e-7 absolute and relative.
  EXPECT_TENSORS_CLOSE(after, before, 1e-7, 1e-7);
  // Scaling a value column does change it (the check can fail).
  for (int64_t in = 0; in < 12; ++in)
    w.set(((in * 2 + 1) * 4 + 3) * 3, 3.0 * w.get(((in * 2 + 1) * 4 + 3) * 3));
  Tensor changed = attention.forward(store, x, {5, 2}, 3, false, saved);
  double difference = 0;
  for (int64_t i = 0; i < changed.numel(); ++i) {
    difference = std::max(difference, std::abs(double(changed.get(i)) - before.get(i)));
  }
  EXPECT_GT(difference, 1e-3);
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
      auto forward = [&](MLP::Context& saved) { return mlp.forward(store, x, saved); };
      EXPECT_TRUE(layer_gradients_match(mlp, store, x, probe, forward, "mlp input"));
    }
  }
}

TEST(SharedExperts, GradientsMatchFiniteDifferences) {
  for (bool gate : {false, true}) {
    for (bool swiglu : {false, true}) {
      TransformerConfig c = small_config();
      c.swiglu = swiglu;
      c.add_bias_linear = false;
      c.moe_shared_expert_intermediate_size = 6;
      c.moe_shared_expert_gate = gate;
      ParameterStore store(DType::F64);
      SharedExperts shared(store, "shared_experts", c, TensorParallel{});
      store.allocate();
      testing::randomize(store, 23);
      EXPECT_EQ(store.spec(store.find("shared_experts.linear_fc1.weight")).shape,
                swiglu ? Shape({12, 2, 6}) : Shape({12, 6}));
      EXPECT_EQ(store.find("shared_experts.gate_weight").index >= 0, gate);
      Tensor x = random_normal({5, 12}, 24, 1.0f, DType::F64);
      Tensor probe = random_normal({5, 12}, 25, 1.0f, DType::F64);
      auto forward = [&](SharedExperts::Context& saved) { return shared.forward(store, x, saved); };
      EXPECT_TRUE(layer_gradients_match(shared, store, x, probe, forward, "shared experts input"))
          << (gate ? "gated" : "ungated") << (swiglu ? " swiglu" : " gelu");
    }
  }
}

// The gate scales each token's MLP output by sigmoid(x . gate_weight), checked by hand per row
// on 0, 1 and 3 rows.
TEST(SharedExperts, GateScalesEachRowBySigmoidOfItsScore) {
  TransformerConfig c = small_config();
  c.add_bias_linear = false;
  c.moe_shared_expert_intermediate_size = 4;
  c.moe_shared_expert_gate = true;
  ParameterStore store(DType::F64);
  SharedExperts shared(store, "s", c, TensorParallel{});
  store.allocate();
  testing::randomize(store, 26);
  for (int64_t rows : {0, 1, 3}) {
    Tensor x = random_normal({rows, 12}, 27, 1.0f, DType::F64);
    SharedExperts::Context gated_saved;
    MLP::Context plain_saved;
    Tensor gated = shared.forward(store, x, gated_saved);
    Tensor plain = shared.mlp().forward(store, x, plain_saved);
    Tensor w = store.param(shared.gate_weight());
    for (int64_t r = 0; r < rows; ++r) {
      double logit = 0;
      for (int64_t k = 0; k < 12; ++k) logit += x.data<double>()[r * 12 + k] * w.data<double>()[k];
      double gate = 1 / (1 + std::exp(-logit));
      for (int64_t k = 0; k < 12; ++k) {
        EXPECT_NEAR(gated.data<double>()[r * 12 + k], plain.data<double>()[r * 12 + k] * gate,
                    1e-14)  // fp64 rounding of one dot product and one product
            << "row " << r;
      }
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
  EXPECT_TRUE(check_all_params(store, objective));
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
  EXPECT_TRUE(check_gradient(logits, dlogits, objective, "logits"));
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
    auto forward = [&](OutputLayer::Context& saved) { return output.forward(store, x, saved); };
    OutputLayer::Context saved;
    EXPECT_EQ(forward(saved).dtype(), DType::F64);
    EXPECT_TRUE(layer_gradients_match(output, store, x, probe, forward, "output input"));
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
  c.recompute_granularity = "partial";
  EXPECT_EQ(message(c, 1),
            "recompute_granularity 'partial' must be 'full' or 'selective' (or unset)");
  c = small_config();
  c.recompute_granularity = "selective";
  c.recompute_modules = {"core_attn", "attention"};
  EXPECT_EQ(message(c, 1),
            "invalid choice for recompute_modules: 'attention' (allowed: core_attn, moe_act, "
            "layernorm, mlp, moe, shared_experts)");
  c.recompute_modules = {"mla_up_proj"};
  EXPECT_EQ(message(c, 1),
            "recompute_modules 'mla_up_proj' is not supported by moecore (it recomputes "
            "core_attn, moe_act, layernorm, mlp, moe, shared_experts)");
  c.recompute_modules = {"moe_act"};
  c.num_experts = 4;
  c.moe.moe_router_topk = 2;
  c.moe.moe_grouped_gemm = false;
  EXPECT_EQ(message(c, 1), "moe_act in recompute_modules is only supported with moe_grouped_gemm");
  c = small_config();
  c.sequence_parallel = true;
  c.seq_length = 5;
  c.padded_vocab_size = 12;
  EXPECT_EQ(
      message(c, 2),
      "seq_length (5) must be divisible by tensor_model_parallel_size (2) with sequence_parallel");
  EXPECT_EQ(padded_vocab_size(50257, 128, 4), 50688);
}

TEST(Config, RefusesBadYarnValuesAndYarnRopeTypeOnCommonAttention) {
  auto message = [](const TransformerConfig& c) {
    return moe::testing::error_text([&] { c.validate(1); });
  };
  TransformerConfig c = small_config();
  c.position_embedding_type = "yarn";
  c.kv_channels = 4;
  EXPECT_EQ(message(c), "(no error)");
  for (double bad : {0.0, -2.0}) {
    c.rotary_scaling_factor = bad;
    EXPECT_EQ(message(c), "rotary_scaling_factor (" + moe::detail::concat(bad) + ") must be > 0");
  }
  c.rotary_scaling_factor = NAN;
  EXPECT_EQ(message(c), "rotary_scaling_factor (nan) must be a finite number");
  c = small_config();
  c.yarn_beta_slow = 0;
  EXPECT_EQ(message(c), "yarn_beta_fast (32) and yarn_beta_slow (0) must be > 0");
  c = small_config();
  c.yarn_original_max_position_embeddings = 0;
  EXPECT_EQ(message(c), "yarn_original_max_position_embeddings (0) must be >= 1");
  c = small_config();
  c.mscale = INFINITY;
  EXPECT_EQ(message(c), "mscale (inf) must be a finite number");
  c = small_config();
  c.position_embedding_type = "yarn";
  c.kv_channels = 3;
  EXPECT_EQ(message(c), "yarn needs an even head dimension (kv_channels = 3)");
  c = small_config();
  c.rope_type = "yarn";
  EXPECT_EQ(message(c),
            "rope_type 'yarn': common attention supports only rope_type 'rope' (Megatron); use "
            "position_embedding_type 'yarn' for YaRN");
  c.rope_type = "rope";
  EXPECT_EQ(message(c), "(no error)");
}

}  // namespace
}  // namespace moe::model

// Multi-latent attention on one process: fp64 finite differences for every variant (with and
// without q_lora_rank, qk_layernorm with RMSNorm and LayerNorm, attention dropout), the forward
// against a plain-loop fp64 reference written here from the DeepSeek-V2 equations, the
// parameter names and shapes, and the config errors.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "model_testing.h"
#include "moe/model/mla.h"
#include "support/testing.h"

namespace moe::model {
namespace {

using moe::testing::random_normal;

// Heads of 3 + 4 (query/key) and 5 (value): the value head size differs on purpose.
TransformerConfig mla_config(int q_lora_rank, bool qk_layernorm, const char* normalization,
                             bool yarn = false) {
  TransformerConfig c;
  c.hidden_size = 12;
  c.num_attention_heads = 4;
  c.ffn_hidden_size = 10;
  c.padded_vocab_size = 16;
  c.seq_length = 5;
  c.hidden_dropout = 0;
  c.attention_dropout = 0;
  testing::set_small_mla(c, q_lora_rank);
  c.qk_layernorm = qk_layernorm;
  c.normalization = normalization;
  // Unset rope_type is YaRN (Megatron's MLA default), with factor 1 plain rope. The YaRN case
  // has an attention factor on the rotated parts and a softmax factor m^2 other than 1.
  c.rope_type = yarn ? "yarn" : "rope";
  if (yarn) {
    c.rotary_scaling_factor = 4;
    c.mscale = 1.0;
    c.mscale_all_dim = 0.5;
  }
  return c;
}

struct Variant {
  int q_lora_rank;
  bool qk_layernorm;
  const char* normalization;
  bool yarn = false;
};
const Variant kVariants[] = {{0, false, "RMSNorm"},        {7, false, "RMSNorm"},
                             {7, true, "RMSNorm"},         {7, true, "LayerNorm"},
                             {0, true, "RMSNorm"},         {7, true, "RMSNorm", true},
                             {0, false, "LayerNorm", true}};

std::string describe(const Variant& v) {
  return "q_lora_rank " + std::to_string(v.q_lora_rank) +
         (v.qk_layernorm ? std::string(", qk_layernorm ") + v.normalization : "") +
         (v.yarn ? ", yarn" : "");
}

TEST(MultiLatentAttention, GradientsMatchFiniteDifferences) {
  for (const Variant& variant : kVariants) {
    SCOPED_TRACE(describe(variant));
    TransformerConfig c =
        mla_config(variant.q_lora_rank, variant.qk_layernorm, variant.normalization, variant.yarn);
    c.attention_dropout = 0.2f;
    ParameterStore store(DType::F64);
    MultiLatentAttention attention(store, "attn", c, TensorParallel{});
    store.allocate();
    testing::randomize(store, 8);
    EXPECT_TRUE(testing::attention_gradients_match(attention, store));
  }
}

// ---------------------------------------------------------------------------------------------
// The reference: every token's projections, norms and rotations written out with plain loops in
// double, straight from the DeepSeek-V2 equations (rope on adjacent pairs (2i, 2i + 1)).

// out [cols] = in [rows] . w, w stored [rows, cols] (moecore's [in, out] weights).
std::vector<double> times(const std::vector<double>& in, const Tensor& w) {
  int64_t rows = int64_t(in.size()), cols = w.numel() / rows;
  const double* weights = w.data<double>();
  std::vector<double> out(size_t(cols), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[size_t(c)] += in[size_t(r)] * weights[r * cols + c];
  }
  return out;
}

std::vector<double> normalized(std::vector<double> v, const TransformerConfig& c,
                               const ParameterStore& store, const std::string& name) {
  double n = double(v.size()), mean = 0, squares = 0;
  bool layer = c.normalization == "LayerNorm";
  if (layer) {
    for (double value : v) mean += value / n;
  }
  for (double value : v) squares += (value - mean) * (value - mean) / n;
  double inv = 1.0 / std::sqrt(squares + double(c.norm_epsilon));
  const double* weight = store.param(store.find(name + ".weight")).data<double>();
  for (size_t i = 0; i < v.size(); ++i) {
    v[i] = (v[i] - mean) * inv * weight[i];
    if (layer) v[i] += store.param(store.find(name + ".bias")).data<double>()[i];
  }
  return v;
}

// Rotates v[first : first + d] at position pos: pair (2i, 2i + 1) by pos * inv_freq[i], scaled
// by the concentration. Plain rope: inv_freq[i] = base^(-2i / d), concentration 1; YaRN's
// frequencies come from yarn_frequencies (tested against Megatron's formulas in layers_test).
void rotate_adjacent_pairs(std::vector<double>& v, size_t first, size_t d, int64_t pos,
                           const TransformerConfig& c) {
  RotaryFrequencies yarn;
  if (c.rope_type == "yarn") {
    YarnScaling scaling;
    scaling.scaling_factor = c.rotary_scaling_factor;
    scaling.mscale = c.mscale;
    scaling.mscale_all_dim = c.mscale_all_dim;
    yarn = yarn_frequencies(int64_t(d), c.rotary_base, scaling);
  }
  for (size_t i = 0; i < d / 2; ++i) {
    double inv_freq = c.rope_type == "yarn" ? yarn.inv_freq[i]
                                            : std::pow(c.rotary_base, -double(2 * i) / double(d));
    double concentration = c.rope_type == "yarn" ? yarn.concentration : 1.0;
    double angle = double(pos) * inv_freq;
    double a = v[first + 2 * i], b = v[first + 2 * i + 1];
    v[first + 2 * i] = (a * std::cos(angle) - b * std::sin(angle)) * concentration;
    v[first + 2 * i + 1] = (b * std::cos(angle) + a * std::sin(angle)) * concentration;
  }
}

// x [S * B, h] rows ordered (s, b) -> [S * B, h].
Tensor reference_forward(const TransformerConfig& c, const ParameterStore& store, const Tensor& x,
                         BatchShape shape) {
  const std::string p = "attn.";
  auto weight = [&](const std::string& name) { return store.param(store.find(p + name)); };
  size_t h = size_t(c.hidden_size), n = size_t(c.num_attention_heads), qk = size_t(c.qk_head_dim),
         pe = size_t(c.qk_pos_emb_head_dim), dv = size_t(c.v_head_dim),
         lora = size_t(c.kv_lora_rank);
  size_t q_dim = qk + pe;
  int64_t rows = shape.rows();
  std::vector<std::vector<double>> queries, keys_values, rotary_keys;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t pos = r / shape.batch;
    std::vector<double> token(x.data<double>() + r * int64_t(h),
                              x.data<double>() + (r + 1) * int64_t(h));
    std::vector<double> q;
    if (c.q_lora_rank > 0) {
      std::vector<double> latent = times(token, weight("linear_q_down_proj.weight"));
      if (c.qk_layernorm) latent = normalized(latent, c, store, p + "q_layernorm");
      q = times(latent, weight("linear_q_up_proj.weight"));
    } else {
      q = times(token, weight("linear_q_proj.weight"));
    }
    for (size_t head = 0; head < n; ++head) {
      rotate_adjacent_pairs(q, head * q_dim + qk, pe, pos, c);
    }
    std::vector<double> down = times(token, weight("linear_kv_down_proj.weight"));
    std::vector<double> latent(down.begin(), down.begin() + int64_t(lora));
    std::vector<double> k_pe(down.begin() + int64_t(lora), down.end());
    if (c.qk_layernorm) latent = normalized(latent, c, store, p + "kv_layernorm");
    rotate_adjacent_pairs(k_pe, 0, pe, pos, c);
    queries.push_back(q);
    keys_values.push_back(times(latent, weight("linear_kv_up_proj.weight")));
    rotary_keys.push_back(k_pe);
  }
  // Megatron's softmax scale m^2 / sqrt(qk + pe), m = 0.1 mscale_all_dim ln(factor) + 1 (1 for a
  // factor <= 1).
  double m = c.rotary_scaling_factor > 1
                 ? 0.1 * c.mscale_all_dim * std::log(c.rotary_scaling_factor) + 1
                 : 1.0;
  double scale = m * m / std::sqrt(double(q_dim));
  Tensor out = Tensor::zeros({rows, int64_t(h)}, DType::F64);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t pos = r / shape.batch, b = r % shape.batch;
    std::vector<double> context(n * dv, 0.0);
    for (size_t head = 0; head < n; ++head) {
      std::vector<double> scores;
      double largest = -INFINITY;
      for (int64_t j = 0; j <= pos; ++j) {  // causal: keys at positions 0..pos of the same b
        const std::vector<double>& kv = keys_values[size_t(j * shape.batch + b)];
        const std::vector<double>& k_pe = rotary_keys[size_t(j * shape.batch + b)];
        const std::vector<double>& q = queries[size_t(r)];
        double score = 0;
        for (size_t i = 0; i < qk; ++i) score += q[head * q_dim + i] * kv[head * (qk + dv) + i];
        for (size_t i = 0; i < pe; ++i) score += q[head * q_dim + qk + i] * k_pe[i];
        scores.push_back(score * scale);
        largest = std::max(largest, score * scale);
      }
      double total = 0;
      for (double& s : scores) total += (s = std::exp(s - largest));
      for (int64_t j = 0; j <= pos; ++j) {
        const std::vector<double>& kv = keys_values[size_t(j * shape.batch + b)];
        for (size_t i = 0; i < dv; ++i) {
          context[head * dv + i] += scores[size_t(j)] / total * kv[head * (qk + dv) + qk + i];
        }
      }
    }
    std::vector<double> projected = times(context, weight("linear_proj.weight"));
    for (size_t i = 0; i < h; ++i) {
      if (c.add_bias_linear) projected[i] += weight("linear_proj.bias").data<double>()[i];
      out.data<double>()[r * int64_t(h) + int64_t(i)] = projected[i];
    }
  }
  return out;
}

TEST(MultiLatentAttention, ForwardMatchesPlainLoopReference) {
  for (const Variant& variant : kVariants) {
    for (BatchShape shape : {BatchShape{5, 2}, BatchShape{1, 1}, BatchShape{17, 1}}) {
      SCOPED_TRACE(describe(variant) + ", seq " + std::to_string(shape.seq) + " x batch " +
                   std::to_string(shape.batch));
      TransformerConfig c = mla_config(variant.q_lora_rank, variant.qk_layernorm,
                                       variant.normalization, variant.yarn);
      ParameterStore store(DType::F64);
      MultiLatentAttention attention(store, "attn", c, TensorParallel{});
      store.allocate();
      testing::randomize(store, 21);
      Tensor x = random_normal({shape.rows(), 12}, 22, 1.0f, DType::F64);
      MultiLatentAttention::Context saved;
      Tensor out = attention.forward(store, x, shape, 0, false, saved);
      // fp64 throughout, outputs of order 1: only summation order differs.
      EXPECT_TENSORS_CLOSE(out, reference_forward(c, store, x, shape), 1e-12, 1e-10);
    }
  }
}

TEST(MultiLatentAttention, DeclaresMegatronNamesAndShapes) {
  TransformerConfig c = mla_config(7, true, "LayerNorm");
  ParameterStore store;
  MultiLatentAttention attention(store, "decoder.layers.0.self_attention", c, TensorParallel{});
  std::vector<std::pair<std::string, Shape>> expected = {
      {"linear_kv_down_proj.weight", {12, 6 + 4}},
      {"linear_kv_up_proj.weight", {6, 4, 3 + 5}},
      {"linear_proj.weight", {4 * 5, 12}},
      {"linear_proj.bias", {12}},
      {"linear_q_down_proj.weight", {12, 7}},
      {"q_layernorm.weight", {7}},
      {"q_layernorm.bias", {7}},
      {"linear_q_up_proj.weight", {7, 4, 3 + 4}},
      {"kv_layernorm.weight", {6}},
      {"kv_layernorm.bias", {6}}};
  ASSERT_EQ(store.count(), int(expected.size()));
  for (const auto& [name, shape] : expected) {
    ParamHandle handle = store.find("decoder.layers.0.self_attention." + name);
    ASSERT_GE(handle.index, 0) << name;
    EXPECT_EQ(store.spec(handle).global_shape, shape) << name;
  }
  EXPECT_EQ(attention.linear_q_proj(), nullptr);
  ParameterStore plain;
  MultiLatentAttention no_lora(plain, "a", mla_config(0, false, "RMSNorm"), TensorParallel{});
  EXPECT_EQ(plain.spec(plain.find("a.linear_q_proj.weight")).global_shape, (Shape{12, 4, 7}));
  EXPECT_EQ(no_lora.linear_q_down_proj(), nullptr);
  EXPECT_EQ(no_lora.kv_layernorm(), nullptr);
  EXPECT_EQ(plain.count(), 5);  // linear_q_proj, kv down and up, linear_proj weight and bias
}

TEST(MultiLatentAttention, ConfigErrorsNameTheField) {
  auto message = [](const TransformerConfig& c, int tp) {
    return moe::testing::error_text([&] { c.validate(tp); });
  };
  TransformerConfig c = mla_config(7, true, "RMSNorm");
  EXPECT_EQ(message(c, 1), "(no error)");
  TransformerConfig gqa = c;
  gqa.group_query_attention = true;
  gqa.num_query_groups = 2;
  EXPECT_EQ(message(gqa, 1),
            "multi_latent_attention and group_query_attention are mutually exclusive");
  TransformerConfig bad = c;
  bad.kv_lora_rank = 0;
  EXPECT_EQ(message(bad, 1), "kv_lora_rank (0) must be >= 1");
  bad = c;
  bad.q_lora_rank = -1;
  EXPECT_EQ(message(bad, 1), "q_lora_rank (-1) must be >= 1 (or unset)");
  bad = c;
  bad.qk_head_dim = 0;
  EXPECT_EQ(message(bad, 1), "qk_head_dim (0) must be >= 1");
  bad = c;
  bad.v_head_dim = 0;
  EXPECT_EQ(message(bad, 1), "v_head_dim (0) must be >= 1");
  bad = c;
  bad.qk_pos_emb_head_dim = 5;
  EXPECT_EQ(message(bad, 1), "qk_pos_emb_head_dim (5) must be even and >= 2 (rope rotates pairs)");
  EXPECT_EQ(message(c, 3),
            "num_attention_heads (4) must be divisible by tensor_model_parallel_size (3)");
  bad = c;
  bad.rope_type = "linear";
  EXPECT_EQ(message(bad, 1), "rope_type 'linear' is not supported (rope or yarn)");
  bad.rope_type = "yarn";
  EXPECT_EQ(message(bad, 1), "(no error)");
}

}  // namespace
}  // namespace moe::model

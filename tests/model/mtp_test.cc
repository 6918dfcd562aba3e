// Single-process tests of multi-token prediction (DeepSeek-V3's MTP modules, Megatron's
// --mtp-num-layers): fp64 finite differences of the whole model with one and two MTP depths (MoE
// layers in them), the lm loss and the decoder's gradients untouched by MTP, the MTP loss against
// a forward built by hand from the model's pieces, and the refusals.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "model/transformer_layer.h"
#include "model_testing.h"
#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "support/testing.h"

namespace moe::model {
namespace {

// MoE layers where `pattern` says; the MTP layers are built as the last one.
using testing::Batch;
using testing::tiny_moe_gpt_config;

// testing::make_batch's (the main loss masked at (0, 1), depth 1's at (0, 0)) with (1, 4) masked
// out too.
Batch make_mtp_batch(const TransformerConfig& c, int64_t batch, uint64_t seed) {
  Batch b = testing::make_batch(c, batch, seed);
  b.mask.set(c.seq_length + 4, 0.0f);
  return b;
}

void check_model_gradients(const TransformerConfig& config) {
  testing::check_model_gradients(config, make_mtp_batch(config, 2, 10), [&](const GPTContext& ctx) {
    ASSERT_EQ(ctx.mtp_losses.size(), size_t(config.mtp_num_layers));
    // One MoE report per MoE layer, the MTP layers' included.
    size_t moe_layers = 0;
    for (int i = 0; i < config.num_layers + config.mtp_num_layers; ++i) {
      moe_layers += config.is_moe_layer(std::min(i, config.num_layers - 1));
    }
    EXPECT_EQ(ctx.moe_losses.size(), moe_layers);
  });
}

TEST(MultiTokenPrediction, OneDepthWithMoELayersMatchesFiniteDifferences) {
  TransformerConfig config = tiny_moe_gpt_config({1, 1});
  config.mtp_num_layers = 1;
  config.mtp_loss_scaling_factor = 0.3;  // larger than Megatron's 0.1 so MTP terms weigh in
  check_model_gradients(config);
}

TEST(MultiTokenPrediction, TwoDepthsWithMoELayersMatchFiniteDifferences) {
  TransformerConfig config = tiny_moe_gpt_config({0, 1});
  config.mtp_num_layers = 2;
  config.mtp_loss_scaling_factor = 0.5;
  check_model_gradients(config);
  // The other switches: LayerNorm, GeLU, biases, no positions, the output layer tied to the
  // embedding (the MTP modules share both).
  config.normalization = "LayerNorm";
  config.swiglu = false;
  config.add_bias_linear = true;
  config.position_embedding_type = "none";
  config.untie_embeddings_and_output_weights = false;
  check_model_gradients(config);
}

// Copies every parameter of `from` into the parameter of the same name in `to`.
void copy_parameters_by_name(const ParameterStore& from, ParameterStore& to) {
  for (int i = 0; i < from.count(); ++i) {
    const ParamSpec& spec = from.spec(ParamHandle{i});
    to.param(to.find(spec.name)).copy_from(from.param(ParamHandle{i}));
  }
}

TEST(MultiTokenPrediction, LmLossUnchangedAndZeroScaleLeavesDecoderGradientsBitwiseEqual) {
  const TransformerConfig plain_config =
      testing::tiny_gpt_config();  // dense: no router losses in MTP layers
  ParameterStore plain_store(DType::F64);
  GPTModel plain(plain_config, comm::single_process_state(), plain_store);
  plain_store.allocate();
  testing::randomize(plain_store, 4, 0.3f);
  Batch batch = make_mtp_batch(plain_config, 3, 20);
  GPTContext plain_ctx;
  plain_ctx.dropout_seed = 9;
  const double plain_loss = plain.forward(batch.tokens, batch.labels, plain_ctx, batch.mask);
  plain.backward(plain_ctx);
  EXPECT_TRUE(plain_ctx.mtp_losses.empty());

  for (double scale : {0.0, 0.1}) {
    SCOPED_TRACE("mtp_loss_scaling_factor " + std::to_string(scale));
    TransformerConfig config = plain_config;
    config.mtp_num_layers = 2;
    config.mtp_loss_scaling_factor = scale;
    ParameterStore store(DType::F64);
    GPTModel model(config, comm::single_process_state(), store);
    store.allocate();
    testing::randomize(store, 5, 0.3f);
    copy_parameters_by_name(plain_store, store);
    GPTContext ctx;
    ctx.dropout_seed = 9;
    EXPECT_EQ(model.forward(batch.tokens, batch.labels, ctx, batch.mask), plain_loss);
    EXPECT_EQ(ctx.lm_loss, plain_ctx.lm_loss);
    EXPECT_EQ(ctx.loss_tokens, plain_ctx.loss_tokens);
    ASSERT_EQ(ctx.mtp_losses.size(), 2u);
    for (int depth = 1; depth <= 2; ++depth) {
      const MTPLossReport& report = ctx.mtp_losses[size_t(depth - 1)];
      EXPECT_EQ(report.depth, depth);
      // 3 sequences of 6 lose their last `depth` positions; the masked (1, 4) shifts to
      // (1, 4 - depth), and (0, 1) to (0, 1 - depth) while it stays inside.
      EXPECT_EQ(report.tokens, 3.0 * (6 - depth) - 1.0 - (depth == 1 ? 1.0 : 0.0));
      EXPECT_GT(report.loss, 0.0);
    }
    model.backward(ctx);
    if (scale != 0.0) continue;
    for (int i = 0; i < plain_store.count(); ++i) {
      const ParamSpec& spec = plain_store.spec(ParamHandle{i});
      EXPECT_TRUE(moe::testing::same_bytes(store.grad(store.find(spec.name)),
                                           plain_store.grad(ParamHandle{i})))
          << spec.name;
    }
  }
}

// Depth 1 of a dense model, rebuilt outside the model from its pieces (embedding, transformer
// layers, norms, output layer), with the shift, the concatenation, eh_proj and the masked
// cross-entropy written out here.
TEST(MultiTokenPrediction, LossEqualsAForwardBuiltByHand) {
  TransformerConfig config = testing::tiny_gpt_config();
  config.hidden_dropout = config.attention_dropout = 0.0f;
  config.mtp_num_layers = 1;
  const int64_t batch_size = 2, seq = config.seq_length, h = config.hidden_size;
  const int64_t vocab = config.padded_vocab_size, rows = seq * batch_size;
  ParameterStore store(DType::F64);
  GPTModel model(config, comm::single_process_state(), store);
  store.allocate();
  testing::randomize(store, 6, 0.3f);
  Batch batch = make_mtp_batch(config, batch_size, 30);
  GPTContext ctx;
  model.forward(batch.tokens, batch.labels, ctx, batch.mask);
  ASSERT_EQ(ctx.mtp_losses.size(), 1u);

  const TensorParallel tp{comm::single_process_state().tp_group, false};
  ParameterStore pieces(DType::F64);
  VocabParallelEmbedding embedding(pieces, "embedding.word_embeddings.weight", vocab, h, tp);
  TransformerLayer layer0(pieces, config, 0, tp, tp.group, nullptr, 0);
  TransformerLayer layer1(pieces, config, 1, tp, tp.group, nullptr, 1);
  Norm final_norm(pieces, "decoder.final_layernorm", h, config.normalization, config.norm_epsilon);
  OutputLayer output(pieces, "output_layer.weight", h, vocab, tp, nullptr);
  Norm enorm(pieces, "mtp.layers.0.enorm", h, config.normalization, config.norm_epsilon);
  Norm hnorm(pieces, "mtp.layers.0.hnorm", h, config.normalization, config.norm_epsilon);
  ParamSpec projection_spec;
  projection_spec.name = "mtp.layers.0.eh_proj.weight";
  projection_spec.shape = {2 * h, h};
  ParamHandle projection = pieces.declare(projection_spec);
  TransformerLayer mtp_layer(pieces, config, 2, tp, tp.group, nullptr, 2,
                             "mtp.layers.0.transformer_layer");
  Norm mtp_norm(pieces, "mtp.layers.0.final_layernorm", h, config.normalization,
                config.norm_epsilon);
  pieces.allocate();
  ASSERT_EQ(pieces.count(), store.count());
  copy_parameters_by_name(store, pieces);

  const BatchShape shape{seq, batch_size};
  GPTContext plain;
  TransformerLayerContext state0, state1, mtp_state;
  Norm::Context final_saved, enorm_saved, hnorm_saved, mtp_norm_saved;
  Tensor x = embedding.forward(pieces, batch.tokens);
  x = layer0.forward(pieces, x, shape, 0, plain, state0, nullptr);
  x = layer1.forward(pieces, x, shape, 0, plain, state1, nullptr);
  Tensor decoder_out = final_norm.forward(pieces, x, final_saved);

  Tensor next_tokens = Tensor::zeros({batch_size, seq}, DType::I64);
  for (int64_t b = 0; b < batch_size; ++b) {
    for (int64_t s = 0; s + 1 < seq; ++s) {
      next_tokens.data<int64_t>()[b * seq + s] = batch.tokens.data<int64_t>()[b * seq + s + 1];
    }
  }
  Tensor e = enorm.forward(pieces, embedding.forward(pieces, next_tokens), enorm_saved);
  Tensor hn = hnorm.forward(pieces, decoder_out, hnorm_saved);
  const Tensor w = pieces.param(projection);  // [2h, h]: rows 0..h-1 read the embedding half
  Tensor projected({rows, h}, DType::F64);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < h; ++j) {
      double sum = 0;
      for (int64_t i = 0; i < h; ++i) {
        sum += e.data<double>()[r * h + i] * w.data<double>()[i * h + j];
        sum += hn.data<double>()[r * h + i] * w.data<double>()[(h + i) * h + j];
      }
      projected.data<double>()[r * h + j] = sum;
    }
  }
  Tensor y = mtp_layer.forward(pieces, projected, shape, 0, plain, mtp_state, nullptr);
  OutputLayer::Context output_saved;
  Tensor logits = output.forward(pieces, mtp_norm.forward(pieces, y, mtp_norm_saved), output_saved);

  double weighted = 0, tokens = 0;
  for (int64_t s = 0; s + 1 < seq; ++s) {  // the last position has no token one further ahead
    for (int64_t b = 0; b < batch_size; ++b) {
      const double mask = batch.mask.get(b * seq + s + 1);
      const int64_t label = batch.labels.data<int64_t>()[b * seq + s + 1];
      const double* z = logits.data<double>() + (s * batch_size + b) * vocab;
      double max_z = z[0], sum_exp = 0;
      for (int64_t v = 0; v < vocab; ++v) max_z = std::max(max_z, z[v]);
      for (int64_t v = 0; v < vocab; ++v) sum_exp += std::exp(z[v] - max_z);
      weighted += mask * (std::log(sum_exp) + max_z - z[label]);
      tokens += mask;
    }
  }
  EXPECT_EQ(ctx.mtp_losses[0].tokens, tokens);
  // fp64 throughout; only the summation order of eh_proj and the softmax differ: 1e-12.
  EXPECT_NEAR(ctx.mtp_losses[0].loss, weighted / tokens, 1e-12 * weighted / tokens);
}

TEST(MultiTokenPrediction, BadValuesAreRefusedNamingTheField) {
  ParameterStore store;
  TransformerConfig negative = testing::tiny_gpt_config();
  negative.mtp_num_layers = -1;
  EXPECT_EQ(moe::testing::error_text(
                [&] { GPTModel model(negative, comm::single_process_state(), store); }),
            "mtp_num_layers (-1) must be >= 0");
  TransformerConfig bad_scale = testing::tiny_gpt_config();
  bad_scale.mtp_num_layers = 1;
  bad_scale.mtp_loss_scaling_factor = -0.1;
  EXPECT_EQ(moe::testing::error_text(
                [&] { GPTModel model(bad_scale, comm::single_process_state(), store); }),
            "mtp_loss_scaling_factor (-0.1) must be a finite number >= 0");
  TransformerConfig learned = testing::tiny_gpt_config();
  learned.mtp_num_layers = 1;
  learned.position_embedding_type = "learned_absolute";
  EXPECT_EQ(moe::testing::error_text(
                [&] { GPTModel model(learned, comm::single_process_state(), store); }),
            "multi-token prediction (mtp_num_layers = 1) needs position_embedding_type rope or "
            "none, not learned_absolute");
  // A last pipeline stage embeds the shifted tokens itself: it needs them.
  TransformerConfig config = testing::tiny_gpt_config();
  config.mtp_num_layers = 1;
  ParameterStore last_store;
  GPTModel last(config, comm::single_process_state(), last_store, GPTStage{false, true, 1, 1});
  last_store.allocate();
  last.init_parameters(1);
  const Tensor labels = testing::random_tokens(2, config.seq_length, config.padded_vocab_size, 3);
  const Tensor hidden({last.local_rows(2), config.hidden_size});
  GPTContext ctx;
  EXPECT_EQ(moe::testing::error_text([&] { last.forward_step(hidden, labels, ctx, Tensor(), 2); }),
            "forward_step on the last pipeline stage with mtp_num_layers (1) > 0 needs the "
            "micro-batch's tokens");
}

}  // namespace
}  // namespace moe::model

// Upcycling (Megatron's --moe-use-upcycling): a dense model's checkpoint loaded into an MoE model.
// With granularity 1 and top-k probabilities that sum to 1 the upcycled model computes the dense
// model's loss; with granularity 2 each expert is the right scaled slice of the dense MLP and the
// router columns repeat per group; shapes that do not fit and non-dense checkpoints are refused
// naming the flag.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>

#include "model/model_testing.h"
#include "moe/checkpoint/checkpoint.h"
#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "support/testing.h"

namespace moe::checkpoint {
namespace {

using model::GPTContext;
using model::GPTModel;
using model::TransformerConfig;
using moe::testing::ScratchDir;

TransformerConfig dense_config(bool swiglu) {
  TransformerConfig c;
  c.num_layers = 2;
  c.hidden_size = 16;
  c.num_attention_heads = 4;
  c.ffn_hidden_size = 12;
  c.padded_vocab_size = 13;
  c.seq_length = 6;
  c.normalization = swiglu ? "RMSNorm" : "LayerNorm";
  c.position_embedding_type = swiglu ? "rope" : "learned_absolute";
  c.swiglu = swiglu;
  c.add_bias_linear = !swiglu;  // the GeLU variant carries fc1 and fc2 biases
  c.untie_embeddings_and_output_weights = swiglu;
  return c;
}

TransformerConfig moe_config(TransformerConfig dense, int experts, int expert_ffn) {
  dense.num_experts = experts;
  dense.moe.moe_router_topk = 2;
  dense.moe.moe_ffn_hidden_size = expert_ffn;
  dense.moe.moe_aux_loss_coeff = 0.01;
  return dense;
}

// A dense model with random weights (std 0.3, so the MLPs matter), saved to `dir`.
struct DenseModel {
  ParameterStore store;
  std::unique_ptr<GPTModel> model;

  DenseModel(const TransformerConfig& config, const std::string& dir) {
    model = std::make_unique<GPTModel>(config, comm::single_process_state(), store);
    store.allocate();
    model::testing::randomize(store, 31, 0.3f);
    TrainingState state;
    state.iteration = 3;
    save_checkpoint(dir, state, store, nullptr, nullptr, comm::single_process_state());
  }
};

LoadOptions upcycling_options(const TransformerConfig& moe, int granularity) {
  LoadOptions options;
  options.load_optim = false;
  options.load_rng = false;
  options.upcycling = Upcycling{granularity, moe.num_experts, int(moe.moe.moe_router_topk),
                                moe.moe.moe_router_pre_softmax, moe.swiglu};
  return options;
}

double loss_of(GPTModel& model, uint64_t seed) {
  const TransformerConfig& c = model.config();
  Tensor tokens = model::testing::random_tokens(3, c.seq_length, c.padded_vocab_size, seed);
  Tensor labels = model::testing::random_tokens(3, c.seq_length, c.padded_vocab_size, seed + 1);
  GPTContext ctx;
  ctx.dropout_seed = 9;  // dropout on: the same keys mask the dense and the MoE MLP outputs alike
  return model.forward(tokens, labels, ctx);
}

// Every expert is the dense MLP and the top-k probabilities sum to 1 (softmax after top-k;
// sigmoid scores normalised over top-k > 1), so each token's MoE output is the dense output up to
// the rounding of sum_k p_k * y in fp32: a few ulps of y (2^-23 relative each), which the
// following layers carry to the loss. 1e-6 of the loss is 40x what that rounding gave here
// (2e-8 relative) while a wrong slice, scale or probability sum moves the loss by far more.
TEST(Upcycling, UpcycledModelComputesTheDenseLoss) {
  struct Case {
    bool swiglu;
    std::vector<int> pattern;  // empty: every layer MoE
    ScoreFunction score;
  };
  for (const Case& c :
       {Case{true, {}, ScoreFunction::kSoftmax}, Case{false, {0, 1}, ScoreFunction::kSoftmax},
        Case{true, {1, 0}, ScoreFunction::kSigmoid}}) {
    SCOPED_TRACE(std::string(c.swiglu ? "swiglu" : "gelu with biases") +
                 (c.score == ScoreFunction::kSigmoid ? ", sigmoid scores" : ""));
    ScratchDir scratch("upcycle_equal");
    TransformerConfig dense = dense_config(c.swiglu);
    DenseModel dense_model(dense, scratch.str());
    const double dense_loss = loss_of(*dense_model.model, 40);

    TransformerConfig moe = moe_config(dense, 4, dense.ffn_hidden_size);
    moe.moe_layer_pattern = c.pattern;
    moe.moe.moe_router_score_function = c.score;
    ParameterStore moe_store;
    GPTModel moe_model(moe, comm::single_process_state(), moe_store);
    moe_store.allocate();
    moe_model.init_parameters(5);
    TrainingState state = load_checkpoint(scratch.str(), moe_store, nullptr, nullptr,
                                          comm::single_process_state(), upcycling_options(moe, 1));
    EXPECT_EQ(state.iteration, 3);
    const double moe_loss = loss_of(moe_model, 40);
    EXPECT_NEAR(moe_loss, dense_loss, 1e-6 * dense_loss);
    EXPECT_NE(moe_loss, 0.0);
  }
}

// Granularity 2: dense ffn 12 -> experts of ffn 6; expert e holds slice e % 2 scaled by s, the
// router's column e is its initial column e / 2. s = cbrt(2) for SwiGLU after top-k, and
// sqrt(4 experts * 2 / top-2) = 2 for GeLU with softmax before top-k (Megatron's scales).
TEST(Upcycling, GranularitySlicesTheDenseMlpAndRepeatsRouterColumns) {
  for (bool swiglu : {true, false}) {
    SCOPED_TRACE(swiglu ? "swiglu" : "gelu, pre-softmax");
    ScratchDir scratch("upcycle_granular");
    TransformerConfig dense = dense_config(swiglu);
    DenseModel dense_model(dense, scratch.str());
    const ParameterStore& dense_store = dense_model.store;
    TransformerConfig moe = moe_config(dense, 4, 6);
    moe.moe.moe_router_pre_softmax = !swiglu;
    ParameterStore store;
    GPTModel moe_model(moe, comm::single_process_state(), store);
    store.allocate();
    moe_model.init_parameters(5);
    const std::string layer = "decoder.layers.1.mlp";
    const Tensor initial_router = store.param(store.find(layer + ".router.weight")).clone();
    load_checkpoint(scratch.str(), store, nullptr, nullptr, comm::single_process_state(),
                    upcycling_options(moe, 2));
    const double scale = swiglu ? std::cbrt(2.0) : 2.0;
    const int64_t H = 16, F = 6, halves = swiglu ? 2 : 1;
    Tensor dense_fc1 = dense_store.param(dense_store.find(layer + ".linear_fc1.weight"));
    Tensor dense_fc2 = dense_store.param(dense_store.find(layer + ".linear_fc2.weight"));
    Tensor fc1 = store.param(store.find(layer + ".experts.linear_fc1.weight"));
    Tensor fc2 = store.param(store.find(layer + ".experts.linear_fc2.weight"));
    Tensor router = store.param(store.find(layer + ".router.weight"));
    int mismatches = 0;
    for (int64_t e = 0; e < 4; ++e) {
      const int64_t slice = (e % 2) * F;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t half = 0; half < halves; ++half) {
          for (int64_t f = 0; f < F; ++f) {
            // One rounding of scale * w to fp32, as the loader does.
            float want = float(scale * dense_fc1.get((h * halves + half) * 2 * F + slice + f));
            mismatches += fc1.get(((e * H + h) * halves + half) * F + f) != want;
          }
        }
        EXPECT_EQ(router.get(h * 4 + e), initial_router.get(h * 4 + e / 2));
      }
      for (int64_t f = 0; f < F; ++f) {
        for (int64_t h = 0; h < H; ++h) {
          float want = float(scale * dense_fc2.get((slice + f) * H + h));
          mismatches += fc2.get((e * F + f) * H + h) != want;
        }
      }
      if (!swiglu) {  // biases: fc1's sliced and scaled, fc2's copied to every expert unscaled
        Tensor fc1_bias = store.param(store.find(layer + ".experts.linear_fc1.bias"));
        Tensor fc2_bias = store.param(store.find(layer + ".experts.linear_fc2.bias"));
        Tensor dense_b1 = dense_store.param(dense_store.find(layer + ".linear_fc1.bias"));
        Tensor dense_b2 = dense_store.param(dense_store.find(layer + ".linear_fc2.bias"));
        for (int64_t f = 0; f < F; ++f) {
          mismatches += fc1_bias.get(e * F + f) != float(scale * dense_b1.get(slice + f));
        }
        for (int64_t h = 0; h < H; ++h) mismatches += fc2_bias.get(e * H + h) != dense_b2.get(h);
      }
    }
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(Upcycling, ShapesThatDoNotFitAndNonDenseCheckpointsAreRefused) {
  ScratchDir scratch("upcycle_refused");
  TransformerConfig dense = dense_config(true);
  DenseModel dense_model(dense, scratch.str());
  TransformerConfig moe = moe_config(dense, 4, 12);  // granularity 2 needs experts of ffn 6
  ParameterStore store;
  GPTModel moe_model(moe, comm::single_process_state(), store);
  store.allocate();
  moe::testing::expect_error_containing(
      [&] {
        load_checkpoint(scratch.str(), store, nullptr, nullptr, comm::single_process_state(),
                        upcycling_options(moe, 2));
      },
      {"--moe-use-upcycling: the dense checkpoint's 'decoder.layers.0.mlp.linear_fc1.weight' is "
       "[16, 2, 12]",
       "with --moe-upcycling-granularity 2 need it [16, 2, 24]"});

  ScratchDir moe_dir("upcycle_from_moe");  // an MoE checkpoint has no dense MLP to upcycle
  save_checkpoint(moe_dir.str(), TrainingState{}, store, nullptr, nullptr,
                  comm::single_process_state());
  moe::testing::expect_error_containing(
      [&] {
        load_checkpoint(moe_dir.str(), store, nullptr, nullptr, comm::single_process_state(),
                        upcycling_options(moe, 1));
      },
      "has no 'decoder.layers.0.mlp.linear_fc1.weight' to make the experts "
      "'decoder.layers.0.mlp.experts.linear_fc1.weight' from (is it a dense model's checkpoint?)");
}

}  // namespace
}  // namespace moe::checkpoint

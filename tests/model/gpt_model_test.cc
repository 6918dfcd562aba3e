// Single-process tests of the whole GPT model: fp64 finite-difference checks of a 2-layer model
// (dense and MoE), recomputation, pipeline stages chained by hand, bf16, init, refusals.
#include <gtest/gtest.h>

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "model_testing.h"
#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "moe/moe/moe_layer.h"
#include "moe/tensor/ops.h"
#include "support/testing.h"

namespace moe::model {
namespace {

// tiny_moe_gpt_config(): the Mixtral-like variant, layer 0 MoE (4 experts, top-2), layer 1 dense.
using testing::Batch;
using testing::make_batch;
using testing::tiny_moe_gpt_config;

void check_model_gradients(const TransformerConfig& config) {
  testing::check_model_gradients(config, make_batch(config, 2, 10));
}

TEST(GPTModel, TwoLayerDenseGradientsMatchFiniteDifferences) {
  check_model_gradients(testing::tiny_gpt_config());
  TransformerConfig other = testing::tiny_gpt_config();  // the other choices of every switch
  other.normalization = "LayerNorm";
  other.position_embedding_type = "learned_absolute";
  other.swiglu = false;
  other.group_query_attention = false;
  other.untie_embeddings_and_output_weights = false;
  other.add_bias_linear = false;
  check_model_gradients(other);
}

TEST(GPTModel, TwoLayerMoEGradientsMatchFiniteDifferences) {
  check_model_gradients(tiny_moe_gpt_config());
}

// DeepSeek-style blocks: the first layer dense, then MoE layers with shared experts (gated as
// Qwen2-MoE, and not).
TEST(GPTModel, SharedExpertsAndFirstLayerDenseGradientsMatchFiniteDifferences) {
  for (bool gate : {false, true}) {
    TransformerConfig c = tiny_moe_gpt_config();
    c.num_layers = 3;
    c.moe_layer_pattern = {0, 1, 1};
    c.add_bias_linear = false;
    c.moe_shared_expert_intermediate_size = 8;
    c.moe_shared_expert_gate = gate;
    SCOPED_TRACE(gate ? "gated shared experts" : "shared experts");
    check_model_gradients(c);
  }
}

TEST(GPTModel, RefusesSharedExpertsThatCannotBeBuilt) {
  TransformerConfig c = tiny_moe_gpt_config();
  c.moe_shared_expert_intermediate_size = 8;
  ParameterStore store;
  EXPECT_EQ(
      moe::testing::error_text([&] { GPTModel model(c, comm::single_process_state(), store); }),
      "shared experts have no biases (as Megatron's): moe_shared_expert_intermediate_size "
      "needs add_bias_linear = false (--disable-bias-linear)");
  c.add_bias_linear = false;
  c.moe_shared_expert_intermediate_size = -2;
  EXPECT_EQ(moe::testing::error_text([&] { c.validate(1); }),
            "moe_shared_expert_intermediate_size (-2) must be >= 0");
  c.moe_shared_expert_intermediate_size = 9;
  c.padded_vocab_size = 14;
  EXPECT_EQ(moe::testing::error_text([&] { c.validate(2); }),
            "moe_shared_expert_intermediate_size (9) must be divisible by "
            "tensor_model_parallel_size (2)");
}

// DeepSeek-style attention in both layers: compressed queries with their norm, then
// uncompressed queries with LayerNorm (norm biases) and learned positions beside MLA's rope.
TransformerConfig tiny_mla_config() {
  TransformerConfig c = tiny_moe_gpt_config();
  c.group_query_attention = false;
  c.multi_latent_attention = true;
  c.q_lora_rank = 5;
  c.kv_lora_rank = 6;
  c.qk_head_dim = 3;
  c.qk_pos_emb_head_dim = 2;
  c.v_head_dim = 5;
  c.qk_layernorm = true;
  return c;
}

TEST(GPTModel, MultiLatentAttentionGradientsMatchFiniteDifferences) {
  check_model_gradients(tiny_mla_config());
  TransformerConfig other = tiny_mla_config();
  other.q_lora_rank = 0;
  other.normalization = "LayerNorm";
  other.position_embedding_type = "learned_absolute";
  check_model_gradients(other);
}

// Runs one forward and backward; returns the loss and a copy of every gradient.
struct Step {
  double loss;
  Tensor dense_grads, expert_grads;
};
Step run_step(GPTModel& model, const Batch& batch, uint64_t dropout_seed) {
  model.store().zero_grads();
  GPTContext ctx;
  ctx.dropout_seed = dropout_seed;
  double loss = model.forward(batch.tokens, batch.labels, ctx, batch.mask);
  model.backward(ctx);
  return {loss, model.store().flat_grads(ParamGroup::kDense).clone(),
          model.store().flat_grads(ParamGroup::kExpert).clone()};
}

TEST(GPTModel, FullRecomputationGivesBitwiseTheSameGradients) {
  TransformerConfig c = tiny_moe_gpt_config();
  Batch batch = make_batch(c, 2, 20);
  ParameterStore plain_store;
  GPTModel plain(c, comm::single_process_state(), plain_store);
  plain_store.allocate();
  plain.init_parameters(5);
  c.recompute_granularity = "full";
  ParameterStore recompute_store;
  GPTModel recompute(c, comm::single_process_state(), recompute_store);
  recompute_store.allocate();
  recompute.init_parameters(5);
  Step a = run_step(plain, batch, 9), b = run_step(recompute, batch, 9);
  EXPECT_EQ(a.loss, b.loss);
  EXPECT_TENSORS_CLOSE(b.dense_grads, a.dense_grads, 0, 0);
  EXPECT_TENSORS_CLOSE(b.expert_grads, a.expert_grads, 0, 0);
}

// Full recomputation, and selective recomputation of "moe", re-run each MoE router in backward;
// the router's state must still change once per micro-batch: over two steps of two micro-batches
// each (micro-batches forwarded together before their backwards, as a pipeline does), the expert
// biases, the global_aux_loss values, the jitter generator and the gradients are bitwise those
// without recomputation.
TEST(GPTModel, RecomputationChangesTheRouterStateOnce) {
  TransformerConfig c = tiny_moe_gpt_config({1, 1});
  c.moe.moe_router_score_function = ScoreFunction::kSigmoid;
  c.moe.moe_router_enable_expert_bias = true;
  c.moe.moe_router_bias_update_rate = 0.01;
  c.moe.moe_router_load_balancing_type = LoadBalancingType::kGlobalAuxLoss;
  c.moe.moe_aux_loss_coeff = 0.1;
  c.moe.moe_input_jitter_eps = 0.1;
  c.moe.moe_expert_capacity_factor = 0.75;  // the loads count kept slots only
  const Batch batches[2] = {make_batch(c, 2, 21), make_batch(c, 2, 22)};
  struct Run {
    std::vector<double> global_aux;
    std::vector<Tensor> state;  // per step: expert biases, jitter states, gradients
  };
  auto run = [&](const std::string& granularity, std::vector<std::string> modules = {}) {
    TransformerConfig config = c;
    config.recompute_granularity = granularity;
    config.recompute_modules = std::move(modules);
    ParameterStore store;
    GPTModel model(config, comm::single_process_state(), store);
    store.allocate();
    model.init_parameters(5);
    Run result;
    for (uint64_t step = 0; step < 2; ++step) {
      store.zero_grads();
      GPTContext ctx[2];
      for (int m = 0; m < 2; ++m) {
        ctx[m].dropout_seed = 10 * step + uint64_t(m);
        model.forward(batches[m].tokens, batches[m].labels, ctx[m], batches[m].mask);
        for (const MoELossReport& report : ctx[m].moe_losses) {
          result.global_aux.push_back(report.losses.global_aux_loss);
        }
      }
      for (int m = 1; m >= 0; --m) model.backward(ctx[m], 0.5f);
      model.finalize_grads();
      for (const auto& [number, layer] : model.moe_layers()) {
        result.state.push_back(layer->router().expert_bias().clone());
        Rng::State jitter = layer->router().jitter_rng().state();
        Tensor jitter_state({int64_t(jitter.size())}, DType::I64);
        std::copy(jitter.begin(), jitter.end(), jitter_state.data<int64_t>());
        result.state.push_back(jitter_state);
      }
      result.state.push_back(store.flat_grads(ParamGroup::kDense).clone());
      result.state.push_back(store.flat_grads(ParamGroup::kExpert).clone());
    }
    return result;
  };
  const Run plain = run("");
  for (const Run& recomputed : {run("full"), run("selective", {"moe"})}) {
    EXPECT_EQ(recomputed.global_aux, plain.global_aux);
    ASSERT_EQ(recomputed.state.size(), plain.state.size());
    for (size_t i = 0; i < plain.state.size(); ++i) {
      EXPECT_TRUE(moe::testing::same_bytes(recomputed.state[i], plain.state[i])) << "state " << i;
    }
  }
  EXPECT_GT(plain.global_aux.front(), 0.0);
  // The biases moved: the loads were counted.
  EXPECT_FALSE(moe::testing::same_bytes(plain.state[0], Tensor::zeros(plain.state[0].shape())));
}

// Selective recomputation: each of Megatron's recompute_modules that moecore implements, and all
// of them together, give the same loss and gradients bit for bit (dropout on: the recomputed
// masks are the same), and the micro-batch's context holds fewer bytes after forward. MoE layers
// 0 and 2 with shared experts, layer 1 dense; common attention and multi-latent attention.
TEST(GPTModel, SelectiveRecomputationGivesBitwiseTheSameGradientsAndHoldsLess) {
  struct Measured {
    Step step;
    size_t context_bytes = 0;  // tensor storage alive after forward that was not before
    size_t peak_bytes = 0;     // most tensor storage alive during forward and backward, same base
  };
  auto measure = [](const TransformerConfig& config, const Batch& batch) {
    ParameterStore store;
    GPTModel model(config, comm::single_process_state(), store);
    store.allocate();
    model.init_parameters(5);
    store.zero_grads();
    GPTContext ctx;
    ctx.dropout_seed = 9;
    const size_t before = tensor_memory_stats().live_bytes;
    reset_tensor_peak_bytes();
    Measured m;
    m.step.loss = model.forward(batch.tokens, batch.labels, ctx, batch.mask);
    m.context_bytes = tensor_memory_stats().live_bytes - before;
    model.backward(ctx);
    m.peak_bytes = tensor_memory_stats().peak_live_bytes - before;
    m.step.dense_grads = store.flat_grads(ParamGroup::kDense).clone();
    m.step.expert_grads = store.flat_grads(ParamGroup::kExpert).clone();
    return m;
  };
  for (bool latent : {false, true}) {
    TransformerConfig c = tiny_moe_gpt_config({1, 0, 1});
    c.num_layers = 3;
    c.add_bias_linear = false;
    c.moe_shared_expert_intermediate_size = 8;
    c.hidden_dropout = 0.2f;
    c.attention_dropout = 0.2f;
    if (latent) {
      c.group_query_attention = false;
      testing::set_small_mla(c, 5);
    }
    Batch batch = make_batch(c, 2, 40);
    const Measured plain = measure(c, batch);
    c.recompute_granularity = "selective";
    for (const std::vector<std::string>& modules : std::vector<std::vector<std::string>>{
             {"core_attn"},
             {"moe_act"},
             {"layernorm"},
             {"mlp"},
             {"moe"},
             {"shared_experts"},
             {"core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts"}}) {
      c.recompute_modules = modules;
      SCOPED_TRACE(std::string(latent ? "MLA, " : "") + "recompute_modules " + modules[0] +
                   (modules.size() > 1 ? " and the rest" : ""));
      const Measured selective = measure(c, batch);
      EXPECT_EQ(selective.step.loss, plain.step.loss);
      EXPECT_TENSORS_CLOSE(selective.step.dense_grads, plain.step.dense_grads, 0, 0);
      EXPECT_TENSORS_CLOSE(selective.step.expert_grads, plain.step.expert_grads, 0, 0);
      EXPECT_LT(selective.context_bytes, plain.context_bytes);
      EXPECT_LE(selective.peak_bytes, plain.peak_bytes);
    }
  }
}

TEST(GPTModel, ThreadCountDoesNotChangeAnyBit) {
  TransformerConfig c = tiny_moe_gpt_config();
  c.hidden_size = 64;  // large enough for the kernels' threaded paths
  c.ffn_hidden_size = 48;
  c.seq_length = 32;
  Batch batch = make_batch(c, 4, 50);
  ParameterStore store;
  GPTModel model(c, comm::single_process_state(), store);
  store.allocate();
  model.init_parameters(8);
  int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  Step one = run_step(model, batch, 3);
  omp_set_num_threads(2);
  Step two = run_step(model, batch, 3);
  omp_set_num_threads(threads);
  EXPECT_EQ(one.loss, two.loss);
  EXPECT_TENSORS_CLOSE(two.dense_grads, one.dense_grads, 0, 0);
  EXPECT_TENSORS_CLOSE(two.expert_grads, one.expert_grads, 0, 0);
}

// Two stages chained by hand in one process equal the whole model. With a tied output layer or
// multi-token prediction the last stage holds a copy of the word embedding (same initial values,
// marked pipeline_copy) and the whole model's embedding gradient is the two stages' sum (what
// finalize_grads forms over the embedding group under mpirun). Every other gradient is bitwise
// equal; the embedding's sum is reassociated (the whole model adds each token row's term onto the
// output-layer and MTP terms, the stages add the rows apart and the two sums once), so it is
// compared within |diff| <= 1e-7 + 1e-6 |reference| (observed: <= 3e-8, one or two fp32 ulps of
// values near 0.5).
TEST(GPTModel, TwoPipelineStagesChainedEqualTheWholeModel) {
  const std::string embedding = "embedding.word_embeddings.weight";
  for (int variant = 0; variant < 4; ++variant) {
    TransformerConfig c = tiny_moe_gpt_config();
    c.untie_embeddings_and_output_weights = variant % 2 == 0;
    c.mtp_num_layers = variant >= 2 ? 1 : 0;
    c.mtp_loss_scaling_factor = 0.3;
    SCOPED_TRACE(std::string(c.untie_embeddings_and_output_weights ? "untied" : "tied") +
                 (c.mtp_num_layers > 0 ? ", MTP" : ""));
    Batch batch = make_batch(c, 2, 30);
    ParameterStore whole_store;
    GPTModel whole(c, comm::single_process_state(), whole_store);
    whole_store.allocate();
    whole.init_parameters(6);
    Step reference = run_step(whole, batch, 4);

    ParameterStore first_store, last_store;
    GPTModel first(c, comm::single_process_state(), first_store, GPTStage{true, false, 0, 1});
    GPTModel last(c, comm::single_process_state(), last_store, GPTStage{false, true, 1, 1});
    first_store.allocate();
    last_store.allocate();
    first.init_parameters(6);
    last.init_parameters(6);
    const ParamHandle copy = last_store.find(embedding);
    const bool shares_embedding = !c.untie_embeddings_and_output_weights || c.mtp_num_layers > 0;
    ASSERT_EQ(copy.index >= 0, shares_embedding);
    if (shares_embedding) {
      EXPECT_TRUE(last_store.spec(copy).pipeline_copy);
      EXPECT_FALSE(first_store.spec(first_store.find(embedding)).pipeline_copy);
      EXPECT_TRUE(moe::testing::same_bytes(last_store.param(copy),
                                           first_store.param(first_store.find(embedding))));
    }
    GPTContext first_ctx, last_ctx;
    first_ctx.dropout_seed = last_ctx.dropout_seed = 4;
    Tensor hidden = first.forward_step(batch.tokens, Tensor(), first_ctx);
    Tensor loss = last.forward_step(hidden, batch.labels, last_ctx, batch.mask, 2, batch.tokens);
    EXPECT_EQ(loss.data<double>()[0] - reference.loss, 0.0);
    Tensor dhidden = last.backward_step(last_ctx, Tensor::full({1}, 1.0f, DType::F64));
    first_ctx.moe_aux_loss_grad_scale = 1.0;
    EXPECT_FALSE(first.backward_step(first_ctx, dhidden).defined());
    if (shares_embedding) {
      Tensor first_grad = first_store.grad(first_store.find(embedding));
      add(first_grad, last_store.grad(copy), first_grad);
      last_store.grad(copy).copy_from(first_grad);
    }
    // Each stage's gradients equal the whole model's gradients of the same names.
    for (ParameterStore* stage : {&first_store, &last_store}) {
      for (int i = 0; i < stage->count(); ++i) {
        const std::string& name = stage->spec(ParamHandle{i}).name;
        ParamHandle in_whole = whole_store.find(name);
        ASSERT_GE(in_whole.index, 0) << name;
        const bool reassociated = shares_embedding && name == embedding;
        EXPECT_TENSORS_CLOSE(stage->grad(ParamHandle{i}), whole_store.grad(in_whole),
                             reassociated ? 1e-7 : 0, reassociated ? 1e-6 : 0)
            << name;
      }
    }
  }
}

TEST(GPTModel, HalfPrecisionTracksFp32) {
  TransformerConfig c = tiny_moe_gpt_config();
  c.hidden_dropout = c.attention_dropout = 0;
  Batch batch = make_batch(c, 2, 40);
  for (DType half : {DType::BF16, DType::F16}) {
    SCOPED_TRACE(std::string(dtype_name(half)));
    ParameterStore fp32_store(DType::F32), half_store(half);
    GPTModel fp32(c, comm::single_process_state(), fp32_store);
    GPTModel low(c, comm::single_process_state(), half_store);
    fp32_store.allocate();
    half_store.allocate();
    low.init_parameters(7);
    for (ParamGroup group : {ParamGroup::kDense, ParamGroup::kExpert}) {
      fp32_store.flat_params(group).copy_from(half_store.flat_params(group));  // same weights
    }
    Step a = run_step(fp32, batch, 1), b = run_step(low, batch, 1);
    ASSERT_TRUE(std::isfinite(b.loss));
    EXPECT_NEAR(b.loss, a.loss, 0.01 * a.loss);
    // Gradients agree to a few percent of their norm (fp32 accumulation, half activations).
    std::vector<float> ga = a.dense_grads.to_floats(), gb = b.dense_grads.to_floats();
    double norm = 0, diff = 0;
    for (size_t i = 0; i < ga.size(); ++i) {
      norm += double(ga[i]) * ga[i];
      diff += double(ga[i] - gb[i]) * double(ga[i] - gb[i]);
    }
    EXPECT_LT(std::sqrt(diff), 0.05 * std::sqrt(norm));
  }
}

TEST(GPTModel, OneTokenAndOddLengthsRunForwardAndBackward) {
  for (int64_t seq : {1, 5}) {
    TransformerConfig c = tiny_moe_gpt_config();
    c.seq_length = int(seq);
    ParameterStore store;
    GPTModel model(c, comm::single_process_state(), store);
    store.allocate();
    model.init_parameters(2);
    Batch batch{testing::random_tokens(1, seq, c.padded_vocab_size, 60),
                testing::random_tokens(1, seq, c.padded_vocab_size, 61),
                Tensor::full({1, seq}, 1.0f)};
    Step step = run_step(model, batch, 1);
    EXPECT_TRUE(std::isfinite(step.loss)) << "seq " << seq;
    EXPECT_NE(moe::sum(step.dense_grads), 0.0) << "seq " << seq;
  }
}

// `c`'s model initialised with seed 1, as moe-train initialises it.
struct InitializedModel {
  explicit InitializedModel(const TransformerConfig& c)
      : model(c, comm::single_process_state(), store) {
    store.allocate();
    model.init_parameters(1);
  }
  // sqrt(mean(w^2)) of parameter `name`: its standard deviation when drawn with mean 0.
  double stddev(const std::string& name) const {
    std::vector<float> v = store.param(store.find(name)).to_floats();
    double total = 0;
    for (float x : v) total += double(x) * x;
    return std::sqrt(total / double(v.size()));
  }
  ParameterStore store;
  GPTModel model;
};

TEST(GPTModel, InitUsesScaledStdForOutputProjections) {
  TransformerConfig c = testing::tiny_gpt_config();
  c.num_layers = 8;
  c.hidden_size = 64;
  c.ffn_hidden_size = 256;
  c.num_attention_heads = 4;
  c.init_method_std = 0.02f;
  const InitializedModel initialized(c);
  const ParameterStore& store = initialized.store;
  auto stddev = [&](const std::string& name) { return initialized.stddev(name); };
  EXPECT_NEAR(stddev("decoder.layers.3.mlp.linear_fc1.weight"), 0.02, 0.001);
  EXPECT_NEAR(stddev("decoder.layers.3.mlp.linear_fc2.weight"), 0.005, 0.0003);
  EXPECT_NEAR(stddev("decoder.layers.0.self_attention.linear_proj.weight"), 0.005, 0.0005);
  EXPECT_EQ(store.param(store.find("decoder.final_layernorm.weight")).get(5), 1.0f);
}

TEST(GPTModel, MultiLatentAttentionInitAsMegatron) {
  TransformerConfig c = tiny_mla_config();
  c.num_layers = 8;
  c.moe_layer_pattern.assign(8, 0);
  c.hidden_size = 64;
  c.num_attention_heads = 4;
  c.q_lora_rank = 48;
  c.kv_lora_rank = 64;
  c.qk_head_dim = 16;
  c.qk_pos_emb_head_dim = 8;
  c.v_head_dim = 16;
  c.init_method_std = 0.02f;
  const InitializedModel initialized(c);
  const ParameterStore& store = initialized.store;
  auto stddev = [&](const std::string& name) { return initialized.stddev(name); };
  const std::string attention = "decoder.layers.2.self_attention.";
  // init_method_std for the projections, std / sqrt(2 * layers) for linear_proj (thousands of
  // samples: the estimates are within a few percent).
  for (const char* name :
       {"linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj"}) {
    EXPECT_NEAR(stddev(attention + name + ".weight"), 0.02, 0.001) << name;
  }
  EXPECT_NEAR(stddev(attention + "linear_proj.weight"), 0.005, 0.0003);
  for (const char* norm : {"q_layernorm", "kv_layernorm"}) {
    std::vector<float> weight = store.param(store.find(attention + norm + ".weight")).to_floats();
    EXPECT_TRUE(std::all_of(weight.begin(), weight.end(), [](float w) { return w == 1.0f; }))
        << norm;
  }
  EXPECT_LT(store.find(attention + "linear_qkv.weight").index, 0);
}

TEST(GPTModel, RefusesMoEWithExpertAndTensorParallelismWithoutSequenceParallelism) {
  comm::ParallelState layout = comm::single_process_state();
  layout.sizes.tp = 2;
  layout.sizes.ep = 2;
  TransformerConfig c = tiny_moe_gpt_config();
  c.padded_vocab_size = 14;
  ParameterStore store;
  EXPECT_EQ(moe::testing::error_text([&] { GPTModel model(c, layout, store); }),
            "MoE layers with expert parallelism (expert_model_parallel_size = 2) and tensor "
            "parallelism (tensor_model_parallel_size = 2) require sequence parallelism: add "
            "--sequence-parallel (as Megatron-Core does)");
  c.num_attention_heads = 6;
  c.num_query_groups = 3;
  c.kv_channels = 4;
  EXPECT_EQ(moe::testing::error_text([&] { GPTModel model(c, layout, store); }),
            "num_query_groups (3) must be divisible by tensor_model_parallel_size (2)");
}

TEST(GPTModel, BadTokensAndLabelsAreRefusedByValue) {
  TransformerConfig c = testing::tiny_gpt_config();
  ParameterStore store;
  GPTModel model(c, comm::single_process_state(), store);
  store.allocate();
  model.init_parameters(1);
  Batch batch = make_batch(c, 1, 3);
  batch.labels.data<int64_t>()[2] = 13;
  GPTContext ctx;
  EXPECT_EQ(moe::testing::error_text([&] { model.forward(batch.tokens, batch.labels, ctx); }),
            "label 13 (row 2) is outside the vocabulary [0, 13)");
  GPTContext empty;
  EXPECT_EQ(moe::testing::error_text([&] { model.backward(empty); }),
            "backward_step needs a forward_step on this context first");
}

}  // namespace
}  // namespace moe::model

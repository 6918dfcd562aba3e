#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>

#include <omp.h>

#include "moe/moe/moe_layer.h"
#include "moe/tensor/ops.h"
#include "moe_test_util.h"
#include "support/testing.h"
#include "torch_reference.h"

namespace moe {
namespace {

struct LayerFixture {
  LayerFixture(const MoEConfig& config, DType dtype, uint64_t seed = 1,
               DType grad_dtype = DType::F32)
      : store(dtype, grad_dtype), layer(config, store, "decoder.layers.0.mlp", nullptr, seed) {
    store.allocate();
    layer.init_parameters(seed, 0.5f, 0.4f);
    // Non-zero biases so their gradients are exercised.
    for (int i = 0; i < store.count(); ++i) {
      ParamHandle handle{i};
      if (store.spec(handle).name.ends_with(".bias")) {
        Tensor bias = store.param(handle);
        bias.copy_from(testing::random_normal(bias.shape(), seed + 100 + uint64_t(i), 0.2f));
      }
    }
  }
  ParameterStore store;
  MoELayer layer;
};

using LayerCase = testing::ConfigVariant;

std::vector<LayerCase> layer_cases() {
  return {
      {"swiglu_grouped_aux_z",
       [](MoEConfig& c) {
         c.activation = ExpertActivation::kSwiGLU;
         c.moe_grouped_gemm = true;
         c.moe_aux_loss_coeff = 0.2;
         c.moe_z_loss_coeff = 0.05;
       }},
      {"gelu_sequential_sigmoid_capacity_probs_padded",
       [](MoEConfig& c) {
         c.moe_router_score_function = ScoreFunction::kSigmoid;
         c.moe_router_topk_scaling_factor = 1.5;
         c.moe_expert_capacity_factor = 0.6;
         c.moe_pad_expert_input_to_capacity = true;
         c.moe_aux_loss_coeff = 0.1;
       }},
      {"swiglu_pre_softmax_capacity_position_seq_aux",
       [](MoEConfig& c) {
         c.activation = ExpertActivation::kSwiGLU;
         c.moe_router_pre_softmax = true;
         c.moe_expert_capacity_factor = 0.8;
         c.moe_token_drop_policy = TokenDropPolicy::kPosition;
         c.moe_router_load_balancing_type = LoadBalancingType::kSeqAuxLoss;
         c.moe_aux_loss_coeff = 0.3;
       }},
      {"sinkhorn_jitter_no_bias",
       [](MoEConfig& c) {
         c.moe_router_load_balancing_type = LoadBalancingType::kSinkhorn;
         c.moe_input_jitter_eps = 0.05;
         c.add_bias_linear = false;
         c.moe_grouped_gemm = true;
       }},
      {"sigmoid_expert_bias_groups_seq_and_global_aux",
       [](MoEConfig& c) {
         c.moe_router_score_function = ScoreFunction::kSigmoid;
         c.moe_router_enable_expert_bias = true;
         c.moe_router_num_groups = 2;
         c.moe_router_group_topk = 1;
         c.moe_router_load_balancing_type = {LoadBalancingType::kSeqAuxLoss,
                                             LoadBalancingType::kGlobalAuxLoss};
         c.moe_aux_loss_coeff = {0.2, 0.3};
       }},
  };
}

MoEConfig layer_config(const LayerCase& entry) {
  MoEConfig config = testing::small_config(6, 4, 2, 5);
  entry.change(config);
  config.validate();
  return config;
}

TEST(MoELayer, GradientsMatchFiniteDifferences) {
  for (const LayerCase& entry : layer_cases()) {
    SCOPED_TRACE(entry.name);
    MoEConfig config = layer_config(entry);
    LayerFixture fixture(config, DType::F64);
    MoELayer& layer = fixture.layer;
    Tensor hidden = testing::random_normal({4, 3, 6}, 2, 1.0f, DType::F64);
    Tensor probe = testing::random_normal({4, 3, 6}, 3, 1.0f, DType::F64);
    const Rng::State jitter_state = layer.router().jitter_rng().state();
    auto objective = [&] {
      layer.router().jitter_rng().set_state(jitter_state);
      layer.router().reset_global_aux_loss_tracker();  // global_aux_loss on this batch only
      MoEContext ctx;
      Tensor out = layer.forward(hidden, ctx);
      const RouterLosses& losses = MoELayer::losses(ctx);
      return testing::dot(out, probe) + losses.load_balancing_loss + losses.z_loss;
    };
    layer.router().jitter_rng().set_state(jitter_state);
    MoEContext ctx;
    layer.forward(hidden, ctx);
    Tensor grad_hidden = layer.backward(ctx, probe);
    EXPECT_TRUE(testing::check_moe_gradient(hidden, grad_hidden, objective, "input"));
    for (int i = 0; i < fixture.store.count(); ++i) {
      ParamHandle handle{i};
      if (!fixture.store.spec(handle).trainable) continue;  // the expert bias: no gradient
      EXPECT_TRUE(testing::check_moe_gradient(fixture.store.param(handle),
                                              fixture.store.grad(handle), objective,
                                              fixture.store.spec(handle).name));
    }
  }
}

// --moe-router-dtype fp64 under fp32 activations: the layer runs forward and backward with the
// router in fp64 and agrees with the fp32 router to fp32 rounding; the expert-bias update goes
// through the layer.
TEST(MoELayer, Fp64RouterUnderFp32Activations) {
  MoEConfig config = layer_config(layer_cases()[4]);
  Tensor hidden = testing::random_normal({4, 3, 6}, 2);
  Tensor probe = testing::random_normal({4, 3, 6}, 3);
  Tensor outputs[2], grads[2];
  for (int fp64 = 0; fp64 < 2; ++fp64) {
    if (fp64 == 1) config.moe_router_dtype = RouterDType::kFP64;
    LayerFixture fixture(config, DType::F32);
    MoEContext ctx;
    outputs[fp64] = fixture.layer.forward(hidden, ctx);
    EXPECT_EQ(ctx.router.logits.dtype(), fp64 == 1 ? DType::F64 : DType::F32);
    grads[fp64] = fixture.layer.backward(ctx, probe);
    Tensor before = fixture.layer.router().expert_bias().clone();
    fixture.layer.finish_step();
    EXPECT_FALSE(testing::same_bytes(fixture.layer.router().expert_bias(), before));
  }
  // The same routing; the probabilities differ by fp32 rounding of fp64 values (~1e-7 relative).
  EXPECT_TENSORS_CLOSE(outputs[1], outputs[0], 1e-5, 1e-5);
  EXPECT_TENSORS_CLOSE(grads[1], grads[0], 1e-5, 1e-5);
}

TEST(MoELayer, DroplessTokensPerExpertSumToTokensTimesTopk) {
  MoEConfig config = testing::small_config(8, 6, 3, 4);
  config.moe_aux_loss_coeff = 0.01;  // the losses must cope with empty batches too
  config.moe_z_loss_coeff = 0.001;
  LayerFixture fixture(config, DType::F32);
  for (int64_t T : {0, 1, 5, 17, 129}) {
    MoEContext ctx;
    Tensor out = fixture.layer.forward(testing::random_normal({T, 8}, uint64_t(T)), ctx);
    const auto& counts = ctx.dispatch.tokens_per_local_expert;
    EXPECT_EQ(std::accumulate(counts.begin(), counts.end(), int64_t(0)), T * 3) << "T " << T;
    Tensor grad = fixture.layer.backward(ctx, testing::random_normal({T, 8}, 1));
    EXPECT_EQ(grad.shape(), (Shape{T, 8}));
  }
}

TEST(MoELayer, CapacityIsRespected) {
  MoEConfig config = testing::small_config(8, 4, 2, 4);
  config.moe_expert_capacity_factor = 0.5;  // capacity ceil(40 * 2 / 4 * 0.5) = 10
  for (bool pad : {false, true}) {
    config.moe_pad_expert_input_to_capacity = pad;
    LayerFixture fixture(config, DType::F32);
    MoEContext ctx;
    fixture.layer.forward(testing::random_normal({40, 8}, 4), ctx);
    for (int64_t rows : ctx.dispatch.tokens_per_local_expert) {
      if (pad) {
        EXPECT_EQ(rows, 10);
      } else {
        EXPECT_LE(rows, 10);
      }
    }
    fixture.layer.backward(ctx, testing::random_normal({40, 8}, 5));
  }
}

TEST(MoELayer, ExpertWithoutTokensWorksForwardAndBackward) {
  MoEConfig config = testing::small_config(4, 4, 2, 3);
  config.add_bias_linear = false;
  LayerFixture fixture(config, DType::F32);
  Tensor weight = fixture.layer.router().weight();                // [H, E]
  for (int64_t h = 0; h < 4; ++h) weight.set(h * 4 + 2, -50.0f);  // nobody picks expert 2
  Tensor hidden = testing::random_uniform({9, 4}, 6, 0.5f, 1.0f);
  MoEContext ctx;
  fixture.layer.forward(hidden, ctx);
  EXPECT_EQ(ctx.dispatch.tokens_per_local_expert[2], 0);
  Tensor grad = fixture.layer.backward(ctx, testing::random_normal({9, 4}, 7));
  EXPECT_TRUE(std::isfinite(sum(grad)));
  const Experts& experts = fixture.layer.experts();
  EXPECT_EQ(sum(experts.fc1_weight_grad().rows(2, 3)), 0.0);
  EXPECT_EQ(sum(experts.fc2_weight_grad().rows(2, 3)), 0.0);
  EXPECT_NE(sum(experts.fc1_weight_grad().rows(0, 1)), 0.0);
}

void expect_bitwise_equal(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.nbytes(), b.nbytes()) << what;
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << what << " differs";
}

TEST(MoELayer, MicroBatchesInFlightMatchOneAtATime) {
  MoEConfig config = layer_config(layer_cases()[0]);
  Tensor first = testing::random_normal({7, 6}, 8), second = testing::random_normal({5, 2, 6}, 9);
  Tensor grad_first = testing::random_normal({7, 6}, 10);
  Tensor grad_second = testing::random_normal({5, 2, 6}, 11);

  LayerFixture serial(config, DType::F32);
  MoEContext ctx;
  Tensor out_first = serial.layer.forward(first, ctx);
  Tensor din_first = serial.layer.backward(ctx, grad_first);
  Tensor out_second = serial.layer.forward(second, ctx);
  Tensor din_second = serial.layer.backward(ctx, grad_second);

  LayerFixture interleaved(config, DType::F32);
  MoEContext ctx_first, ctx_second;
  Tensor out_first_i = interleaved.layer.forward(first, ctx_first);
  Tensor out_second_i = interleaved.layer.forward(second, ctx_second);
  Tensor din_second_i = interleaved.layer.backward(ctx_second, grad_second);
  Tensor din_first_i = interleaved.layer.backward(ctx_first, grad_first);

  expect_bitwise_equal(out_first, out_first_i, "first output");
  expect_bitwise_equal(out_second, out_second_i, "second output");
  expect_bitwise_equal(din_first, din_first_i, "first input gradient");
  expect_bitwise_equal(din_second, din_second_i, "second input gradient");
  // Parameter gradients accumulated over both micro-batches (summed in another order).
  for (ParamGroup group : {ParamGroup::kDense, ParamGroup::kExpert}) {
    EXPECT_TENSORS_CLOSE(interleaved.store.flat_grads(group), serial.store.flat_grads(group), 1e-6,
                         1e-5);
  }
}

TEST(MoELayer, SameSeedGivesBitwiseIdenticalResults) {
  MoEConfig config = layer_config(layer_cases()[3]);  // includes jitter noise
  Tensor hidden = testing::random_normal({33, 6}, 12), grad = testing::random_normal({33, 6}, 13);
  std::vector<Tensor> outputs, grads;
  for (int run = 0; run < 2; ++run) {
    LayerFixture fixture(config, DType::F32, 4);
    MoEContext ctx;
    outputs.push_back(fixture.layer.forward(hidden, ctx));
    grads.push_back(fixture.layer.backward(ctx, grad));
    grads.push_back(fixture.store.flat_grads(ParamGroup::kExpert).clone());
  }
  expect_bitwise_equal(outputs[0], outputs[1], "output");
  expect_bitwise_equal(grads[0], grads[2], "input gradient");
  expect_bitwise_equal(grads[1], grads[3], "expert gradients");
}

TEST(MoELayer, ThreadCountDoesNotChangeTheBits) {
  MoEConfig config = layer_config(layer_cases()[0]);
  config.hidden_size = 64;  // 4500 tokens: large enough for every kernel's parallel path
  config.ffn_hidden_size = 96;
  Tensor hidden = testing::random_normal({4500, 64}, 18),
         grad = testing::random_normal({4500, 64}, 19);
  std::vector<Tensor> results;
  const int threads_before = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    LayerFixture fixture(config, DType::F32);
    MoEContext ctx;
    results.push_back(fixture.layer.forward(hidden, ctx));
    results.push_back(fixture.layer.backward(ctx, grad));
    results.push_back(fixture.store.flat_grads(ParamGroup::kExpert).clone());
    results.push_back(fixture.store.flat_grads(ParamGroup::kDense).clone());
  }
  omp_set_num_threads(threads_before);
  const char* names[4] = {"output", "input gradient", "expert gradients", "router gradients"};
  for (size_t i = 4; i < results.size(); ++i) {
    expect_bitwise_equal(results[i % 4], results[i], names[i % 4]);
  }
}

TEST(MoELayer, HalfPrecisionTracksFp32) {
  MoEConfig config = layer_config(layer_cases()[0]);
  LayerFixture full(config, DType::F32);
  Tensor hidden = testing::random_normal({24, 6}, 14), grad = testing::random_normal({24, 6}, 15);
  MoEContext ctx;
  Tensor out32 = full.layer.forward(hidden, ctx);
  Tensor din32 = full.layer.backward(ctx, grad);
  for (DType dtype : {DType::BF16, DType::F16}) {
    SCOPED_TRACE(dtype_name(dtype));
    LayerFixture half(config, dtype);
    for (ParamGroup group : {ParamGroup::kDense, ParamGroup::kExpert}) {
      half.store.flat_params(group).copy_from(full.store.flat_params(group));
    }
    MoEContext half_ctx;
    Tensor out = half.layer.forward(hidden.to(dtype), half_ctx);
    EXPECT_EQ(out.dtype(), dtype);
    EXPECT_EQ(half_ctx.router.logits.dtype(), DType::F32);  // the router stays fp32
    Tensor din = half.layer.backward(half_ctx, grad.to(dtype));
    double tolerance = dtype == DType::BF16 ? 5e-2 : 1e-2;
    EXPECT_TENSORS_CLOSE(out.to(DType::F32), out32, tolerance, tolerance);
    EXPECT_TENSORS_CLOSE(din.to(DType::F32), din32, tolerance, tolerance);
    EXPECT_NEAR(MoELayer::losses(half_ctx).load_balancing_loss,
                MoELayer::losses(ctx).load_balancing_loss, 1e-2);
  }
}

TEST(MoELayer, GradientsAccumulateAcrossBackwardCalls) {
  MoEConfig config = layer_config(layer_cases()[1]);
  LayerFixture fixture(config, DType::F32);
  Tensor hidden = testing::random_normal({10, 6}, 16), grad = testing::random_normal({10, 6}, 17);
  MoEContext ctx;
  fixture.layer.forward(hidden, ctx);
  fixture.layer.backward(ctx, grad, 0.5);
  Tensor once = fixture.store.flat_grads(ParamGroup::kDense).clone();
  fixture.layer.forward(hidden, ctx);
  fixture.layer.backward(ctx, grad, 0.5);
  scale(once, 2.0f);
  EXPECT_TENSORS_CLOSE(fixture.store.flat_grads(ParamGroup::kDense), once, 1e-6, 1e-5);
}

// The reference cases: every router and dispatch variant (scores, pre-softmax, scaling, expert
// bias, group-limited routing, Sinkhorn, capacity with both drop policies and padding, every
// balancing loss, jitter, both expert activations, with and without biases), on [S, B, H]
// batches including one token.
struct ReferenceCase {
  std::string name;
  std::function<void(MoEConfig&)> change;
  Shape shape;  // [S, B, H]
};

std::vector<ReferenceCase> reference_cases() {
  return {
      {"dropless_swiglu_aux_z",
       [](MoEConfig& c) {
         c.activation = ExpertActivation::kSwiGLU;
         c.moe_aux_loss_coeff = 0.3;
         c.moe_z_loss_coeff = 0.02;
       },
       {11, 1, 6}},
      {"capacity_probs_gelu_aux_z_jitter",
       [](MoEConfig& c) {
         c.moe_expert_capacity_factor = 0.7;
         c.moe_aux_loss_coeff = 0.2;
         c.moe_z_loss_coeff = 0.01;
         c.moe_input_jitter_eps = 0.05;
       },
       {5, 3, 6}},
      {"capacity_position_padded_swiglu_seq_aux",
       [](MoEConfig& c) {
         c.activation = ExpertActivation::kSwiGLU;
         c.moe_grouped_gemm = true;
         c.moe_expert_capacity_factor = 0.8;
         c.moe_token_drop_policy = TokenDropPolicy::kPosition;
         c.moe_pad_expert_input_to_capacity = true;
         c.moe_router_load_balancing_type = LoadBalancingType::kSeqAuxLoss;
         c.moe_aux_loss_coeff = 0.3;
       },
       {4, 3, 6}},
      {"capacity_probs_padded_sigmoid_scaled_top3",
       [](MoEConfig& c) {
         c.moe_router_topk = 3;
         c.moe_router_score_function = ScoreFunction::kSigmoid;
         c.moe_router_topk_scaling_factor = 1.5;
         c.moe_expert_capacity_factor = 0.6;
         c.moe_pad_expert_input_to_capacity = true;
         c.moe_aux_loss_coeff = 0.1;
       },
       {7, 2, 6}},
      {"pre_softmax_scaled_groups_global_aux_z",
       [](MoEConfig& c) {
         c.num_experts = 8;
         c.moe_router_pre_softmax = true;
         c.moe_router_topk_scaling_factor = 2.0;
         c.moe_router_num_groups = 4;
         c.moe_router_group_topk = 2;
         c.moe_router_load_balancing_type = LoadBalancingType::kGlobalAuxLoss;
         c.moe_aux_loss_coeff = 0.2;
         c.moe_z_loss_coeff = 0.02;
       },
       {3, 2, 6}},
      {"sigmoid_expert_bias_groups_seq_and_global_aux_no_bias",
       [](MoEConfig& c) {
         c.num_experts = 8;
         c.moe_router_score_function = ScoreFunction::kSigmoid;
         c.moe_router_enable_expert_bias = true;
         c.moe_router_num_groups = 4;
         c.moe_router_group_topk = 2;
         c.moe_router_load_balancing_type = {LoadBalancingType::kSeqAuxLoss,
                                             LoadBalancingType::kGlobalAuxLoss};
         c.moe_aux_loss_coeff = {0.2, 0.3};
         c.add_bias_linear = false;
       },
       {5, 2, 6}},
      {"sinkhorn_top2_grouped_no_bias",
       [](MoEConfig& c) {
         c.moe_router_load_balancing_type = LoadBalancingType::kSinkhorn;
         c.moe_grouped_gemm = true;
         c.add_bias_linear = false;
       },
       {6, 2, 6}},
      {"sinkhorn_top1_sigmoid_swiglu",
       [](MoEConfig& c) {
         c.moe_router_topk = 1;
         c.moe_router_load_balancing_type = LoadBalancingType::kSinkhorn;
         c.activation = ExpertActivation::kSwiGLU;
       },
       {5, 1, 6}},
      {"one_token_capacity_probs",
       [](MoEConfig& c) {
         c.moe_expert_capacity_factor = 0.5;
         c.moe_aux_loss_coeff = 0.1;
       },
       {1, 1, 6}},
  };
}

// What the reference script needs to know about a config: Megatron's names and values.
nlohmann::json reference_settings(const MoEConfig& c) {
  nlohmann::json types = nlohmann::json::array(), coeffs = nlohmann::json::array();
  for (LoadBalancingType type : c.moe_router_load_balancing_type) {
    types.push_back(std::string(name_of(type)));
  }
  for (double coeff : c.moe_aux_loss_coeff) coeffs.push_back(coeff);
  auto optional = [](const auto& value) {
    return value ? nlohmann::json(*value) : nlohmann::json(nullptr);
  };
  return {{"E", c.num_experts},
          {"F", c.expert_ffn_hidden_size()},
          {"topk", c.moe_router_topk},
          {"activation", std::string(name_of(c.activation))},
          {"score_function", std::string(name_of(c.moe_router_score_function))},
          {"pre_softmax", c.moe_router_pre_softmax},
          {"scaling_factor", optional(c.moe_router_topk_scaling_factor)},
          {"num_groups", optional(c.moe_router_num_groups)},
          {"group_topk", optional(c.moe_router_group_topk)},
          {"load_balancing_type", types},
          {"aux_coeff", coeffs},
          {"z_coeff", optional(c.moe_z_loss_coeff)},
          {"capacity_factor", optional(c.moe_expert_capacity_factor)},
          {"drop_policy", std::string(name_of(c.moe_token_drop_policy))}};
}

// The whole layer against an independent PyTorch float64 implementation of Megatron's MoE layer
// for every reference case: output, losses, the kept slots, the input gradient and every
// parameter gradient (fp64 gradient buffers).
TEST(MoELayer, MatchesPyTorchReferenceForEveryVariant) {
  MOE_REQUIRE_PYTHON_PACKAGE("torch");
  const std::string prefix = "decoder.layers.0.mlp.";
  struct Ours {
    Tensor output, grad_hidden;
    RouterLosses losses;
    int64_t kept_slots = 0;
    std::map<std::string, Tensor> grads;
  };
  std::vector<Ours> ours;
  nlohmann::json input = nlohmann::json::array();
  uint64_t seed = 30;
  for (const ReferenceCase& entry : reference_cases()) {
    MoEConfig config = testing::small_config(6, 6, 2, 4);
    entry.change(config);
    config.validate();
    LayerFixture fixture(config, DType::F64, seed, DType::F64);
    if (fixture.layer.router().has_expert_bias()) {  // a bias that changes some choices
      fixture.layer.router().expert_bias().copy_from(
          testing::random_normal({config.num_experts}, seed + 1, 0.3f));
    }
    Tensor hidden = testing::random_normal(entry.shape, seed + 2, 1.0f, DType::F64);
    Tensor probe = testing::random_normal(entry.shape, seed + 3, 1.0f, DType::F64);
    seed += 10;
    MoEContext ctx;
    Ours result;
    result.output = fixture.layer.forward(hidden, ctx);
    result.losses = MoELayer::losses(ctx);
    for (int64_t row : ctx.dispatch.plan.row_of_slot) result.kept_slots += row >= 0;
    nlohmann::json jitter = ctx.router.jitter_noise.defined()
                                ? testing::json_values(ctx.router.jitter_noise)
                                : nlohmann::json(nullptr);
    result.grad_hidden = fixture.layer.backward(ctx, probe);

    nlohmann::json json_case = reference_settings(config);
    json_case["name"] = entry.name;
    json_case["shape"] = entry.shape;
    json_case["hidden"] = testing::json_values(hidden);
    json_case["probe"] = testing::json_values(probe);
    json_case["jitter_noise"] = jitter;
    json_case["expert_bias"] = fixture.layer.router().has_expert_bias()
                                   ? testing::json_values(fixture.layer.router().expert_bias())
                                   : nlohmann::json(nullptr);
    json_case["params"] = nlohmann::json::object();
    for (int i = 0; i < fixture.store.count(); ++i) {
      ParamHandle handle{i};
      if (!fixture.store.spec(handle).trainable) continue;  // the expert bias: no gradient
      const std::string name = fixture.store.spec(handle).name.substr(prefix.size());
      json_case["params"][name] = testing::json_values(fixture.store.param(handle));
      result.grads[name] = fixture.store.grad(handle).clone();
    }
    input.push_back(json_case);
    ours.push_back(std::move(result));
  }
  nlohmann::json expected = testing::run_torch_reference(MOE_LAYER_REFERENCE_SCRIPT, input);
  ASSERT_TRUE(expected.is_array());
  ASSERT_EQ(expected.size(), ours.size());
  // Both sides are fp64 evaluations of the same formulas in different orders. Inputs ~N(0, 1)
  // and weights ~N(0, 0.5) keep every element O(1) and every sum to a few dozen terms, so the
  // orders differ by a few units of 2^-53 times the summands (~1e-15); 1e-12 per element,
  // relative above 1 and absolute below, leaves a margin of ~100 and still catches any wrong
  // term (a dropped slot or a missing loss gradient moves elements by ~1e-3 or more).
  constexpr double kTolerance = 1e-12;
  auto expect_matches = [](const Tensor& mine, const nlohmann::json& theirs,
                           const std::string& what) {
    std::vector<double> values = theirs;
    ASSERT_EQ(int64_t(values.size()), mine.numel()) << what;
    ASSERT_EQ(mine.dtype(), DType::F64) << what;
    for (size_t i = 0; i < values.size(); ++i) {
      EXPECT_NEAR(mine.data<double>()[i], values[i],
                  kTolerance * std::max(1.0, std::abs(values[i])))
          << what << " element " << i;
    }
  };
  for (size_t c = 0; c < ours.size(); ++c) {
    SCOPED_TRACE(std::string(input[c]["name"]));
    const nlohmann::json& theirs = expected[c];
    EXPECT_EQ(ours[c].kept_slots, int64_t(theirs["kept_slots"]));
    expect_matches(ours[c].output, theirs["output"], "output");
    expect_matches(ours[c].grad_hidden, theirs["grad.hidden"], "input gradient");
    EXPECT_NEAR(ours[c].losses.load_balancing_loss, double(theirs["load_balancing_loss"]),
                kTolerance);
    EXPECT_NEAR(ours[c].losses.z_loss, double(theirs["z_loss"]), kTolerance);
    for (const auto& [name, grad] : ours[c].grads) {
      expect_matches(grad, theirs["grad." + name], name + " gradient");
    }
  }
  // The capacity cases drop slots, so the kept-slot comparison means something.
  EXPECT_LT(ours[1].kept_slots, 5 * 3 * 2);
}

TEST(MoELayer, BadUseNamesTheProblem) {
  MoEConfig config = testing::small_config(6, 4, 2, 5);
  LayerFixture fixture(config, DType::F32);
  MoEContext ctx;
  testing::expect_error_containing(
      [&] {
        fixture.layer.backward(ctx, Tensor({3, 6}));
      },
      "the context holds no forward state");
  testing::expect_error_containing(
      [&] {
        fixture.layer.forward(Tensor({3, 6}, DType::BF16), ctx);
      },
      "MoELayer: input is bf16 but the parameters are fp32");
  testing::expect_error_containing(
      [] { ParameterStore fp64_grads_of_fp32(DType::F32, DType::F64); },
      "ParameterStore: gradient dtype fp64 with parameter dtype fp32 (gradients are fp32, or fp64 "
      "for fp64 parameters)");
  config.moe_router_topk = 5;
  ParameterStore store;
  testing::expect_error_containing([&] { MoELayer bad(config, store, "bad"); },
                                   "moe_router_topk (5) must be <= num_experts (4)");
}

}  // namespace
}  // namespace moe

// For the same global batch and weights, the MoE layer with its experts spread over ep = 1, 2, 4,
// 8 ranks (all-to-all and all-gather dispatchers) gives bitwise the single-process layer's output,
// input gradient and expert-weight gradients on every rank's slice, and the single-process router
// gradient and aux loss once summed over the ranks (fp32 reduction order). Every rank builds the
// whole reference layer from the same seed and checks its own part.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>

#include "ep_test_util.h"
#include "moe/comm/process_group.h"
#include "moe/moe/ep_dispatchers.h"
#include "moe/moe/moe_layer.h"
#include "support/testing.h"

namespace moe {
namespace {

// fp32 and bf16: bitwise. fp64 (the gradient-check path) runs its GEMMs through OpenBLAS
// dgemm, whose result for a row depends on where the row sits in the call (edge-row kernels), so
// a token's numbers may differ in the last bits between the group's batch and a rank's slice.
// Gradient buffers are fp32 on every path: there the fp64 differences survive as one-ulp ones.
void expect_same(const Tensor& actual, const Tensor& expected, const std::string& what,
                 DType path) {
  if (path != DType::F64) {
    testing::expect_bitwise_equal(actual, expected, what);
  } else if (actual.dtype() == DType::F64) {
    EXPECT_TENSORS_CLOSE(actual, expected, 1e-13, 1e-12) << what;
  } else {
    EXPECT_TENSORS_CLOSE(actual, expected, 1e-7, 1e-6) << what;
  }
}

struct LayerCase {
  std::string name;
  std::function<void(MoEConfig&)> change;
  DType dtype = DType::F32;
  bool skewed = false;  // experts 2, 3, 6, 7 are never chosen
};

std::vector<LayerCase> layer_cases() {
  return {
      {"dropless_gelu_sequential", [](MoEConfig&) {}},
      {"dropless_swiglu_grouped_top3",
       [](MoEConfig& c) {
         c.moe_router_topk = 3;
         c.activation = ExpertActivation::kSwiGLU;
         c.moe_grouped_gemm = true;
       }},
      {"capacity_probs_padded_sigmoid",
       [](MoEConfig& c) {
         c.moe_router_score_function = ScoreFunction::kSigmoid;
         c.moe_expert_capacity_factor = 0.7;
         c.moe_pad_expert_input_to_capacity = true;
       }},
      {"capacity_position_swiglu",
       [](MoEConfig& c) {
         c.activation = ExpertActivation::kSwiGLU;
         c.moe_expert_capacity_factor = 0.9;
         c.moe_token_drop_policy = TokenDropPolicy::kPosition;
       }},
      {"skewed_dropless_grouped", [](MoEConfig& c) { c.moe_grouped_gemm = true; }, DType::F32,
       true},
      {"bf16_dropless_swiglu", [](MoEConfig& c) { c.activation = ExpertActivation::kSwiGLU; },
       DType::BF16},
      {"fp64_capacity_grouped",
       [](MoEConfig& c) {
         c.moe_grouped_gemm = true;
         c.moe_expert_capacity_factor = 0.8;
       },
       DType::F64},
  };
}

MoEConfig case_config(const LayerCase& entry, TokenDispatcherType type) {
  MoEConfig config;
  config.hidden_size = 20;
  config.num_experts = 8;
  config.ffn_hidden_size = 13;
  config.moe_router_topk = 2;
  config.moe_aux_loss_coeff = 0.1;
  config.moe_token_dispatcher_type = type;
  entry.change(config);
  config.validate();
  return config;
}

struct Layer {
  Layer(const MoEConfig& config, DType dtype, std::unique_ptr<TokenDispatcher> dispatcher)
      : store(dtype), layer(config, store, "decoder.layers.0.mlp", std::move(dispatcher)) {
    store.allocate();
  }
  Tensor param(const std::string& name) const { return store.param(store.find(name)); }
  Tensor grad(const std::string& name) const { return store.grad(store.find(name)); }
  ParameterStore store;
  MoELayer layer;
};

// This rank's part of a global parameter (expert parameters: rows [offset, offset + local)).
Tensor local_part(const Tensor& global, const ParamSpec& spec) {
  if (spec.global_offset.empty() || spec.global_shape == spec.shape) return global;
  return global.rows(spec.global_offset[0], spec.global_offset[0] + spec.shape[0]);
}

// The single-process reference layer (all experts, the group's whole batch) and the
// expert-parallel layer with the same weights, and this rank's slice of the batch.
struct LayerPair {
  LayerPair(const LayerCase& entry, TokenDispatcherType type, int ep)
      : parallel(testing::parallel_state(ep)),
        config(case_config(entry, type)),
        dtype(entry.dtype),
        reference(config, dtype, nullptr),
        distributed(config, dtype, make_token_dispatcher(config, parallel)) {
    const testing::GroupTokens tokens = testing::group_tokens(parallel.tp_ep);
    group_tokens = tokens.total;
    begin = tokens.first;
    end = tokens.first + testing::tokens_of_rank(parallel.world_rank);
    reference.layer.init_parameters(7, 0.5f, 0.4f);
    for (int i = 0; i < reference.store.count(); ++i) {
      const ParamSpec& spec = reference.store.spec(ParamHandle{i});
      if (!spec.name.ends_with(".bias")) continue;
      Tensor bias = reference.store.param(ParamHandle{i});
      bias.copy_from(testing::random_normal(bias.shape(), 100 + uint64_t(i), 0.2f));
    }
    if (entry.skewed) {
      Tensor router_bias = reference.param("decoder.layers.0.mlp.router.bias");
      for (int64_t e : {2, 3, 6, 7}) router_bias.set(e, -1e4f);
    }
    distributed.layer.router().set_aux_count_reducer(make_aux_count_reducer(parallel.tp_ep));
    for (int i = 0; i < distributed.store.count(); ++i) {
      const ParamSpec& spec = distributed.store.spec(ParamHandle{i});
      distributed.store.param(ParamHandle{i})
          .copy_from(local_part(reference.param(spec.name), spec));
    }
  }

  // A global [group tokens, H] tensor from a seed shared by the group.
  Tensor global_tensor(uint64_t stream) const {
    const uint64_t seed = 11 + stream + 1000 * uint64_t(parallel.tp_ep.world_ranks()[0]);
    return testing::random_normal({group_tokens, config.hidden_size}, seed, 1.0f, dtype);
  }
  Tensor mine(const Tensor& global) const { return global.rows(begin, end).clone(); }

  // Expert-weight gradients bitwise; router gradients summed over the group within fp32
  // rounding (each rank holds its tokens' share).
  void compare_gradients() const {
    for (int i = 0; i < distributed.store.count(); ++i) {
      const ParamSpec& spec = distributed.store.spec(ParamHandle{i});
      const Tensor expected = local_part(reference.grad(spec.name), spec);
      Tensor actual = distributed.store.grad(ParamHandle{i}).clone();
      if (spec.group == ParamGroup::kExpert) {
        expect_same(actual, expected, spec.name + " gradient", dtype);
      } else {
        comm::all_reduce(actual, parallel.tp_ep);
        EXPECT_TENSORS_CLOSE(actual, expected, 1e-5, 1e-4) << spec.name << " gradient";
      }
    }
  }

  const comm::ParallelState& parallel;
  const MoEConfig config;
  const DType dtype;
  int64_t group_tokens = 0, begin = 0, end = 0;
  Layer reference, distributed;
};

void run_case(const LayerCase& entry, TokenDispatcherType type, int ep) {
  LayerPair pair(entry, type, ep);
  const Tensor input = pair.global_tensor(0), grad_output = pair.global_tensor(1);

  MoEContext reference_ctx, ctx;
  const Tensor reference_out = pair.reference.layer.forward(input, reference_ctx);
  const Tensor out = pair.distributed.layer.forward(pair.mine(input), ctx);
  expect_same(out, reference_out.rows(pair.begin, pair.end), "output", pair.dtype);
  // Capacity cases must really drop slots (the seeded batches of two or more ranks do).
  if (pair.config.moe_expert_capacity_factor && ep > 1) {
    const std::vector<int64_t>& slots = reference_ctx.dispatch.plan.row_of_slot;
    EXPECT_GT(std::count(slots.begin(), slots.end(), -1), 0) << "no slot dropped";
  }
  if (entry.skewed) {
    const ExpertPlacement& placement = pair.distributed.layer.experts().placement();
    for (int64_t e = 0; e < placement.count; ++e) {
      const int64_t global = placement.first + e;
      if (global == 2 || global == 3 || global == 6 || global == 7) {
        EXPECT_EQ(ctx.dispatch.tokens_per_local_expert[size_t(e)], 0) << global;
      }
    }
  }

  const Tensor reference_grad_input = pair.reference.layer.backward(reference_ctx, grad_output);
  const Tensor grad_input = pair.distributed.layer.backward(ctx, pair.mine(grad_output));
  if (entry.dtype == DType::F64) {
    // The router's input gradient (dlogits x W^T) goes through OpenBLAS dgemm on the fp64 path,
    // whose result for a row depends on where the row sits in the call (edge-row kernels).
    EXPECT_TENSORS_CLOSE(grad_input, reference_grad_input.rows(pair.begin, pair.end), 1e-14, 1e-12);
  } else {
    expect_same(grad_input, reference_grad_input.rows(pair.begin, pair.end), "input gradient",
                pair.dtype);
  }
  pair.compare_gradients();

  Tensor loss = Tensor::full({1}, 0.0f, DType::F64);
  loss.data<double>()[0] = MoELayer::losses(ctx).load_balancing_loss;
  comm::all_reduce(loss, pair.parallel.tp_ep);
  const double expected_loss = MoELayer::losses(reference_ctx).load_balancing_loss;
  EXPECT_GT(expected_loss, 0.0);
  EXPECT_NEAR(loss.data<double>()[0], expected_loss, 1e-6 * expected_loss) << "aux loss";
}

// Two micro-batches in flight (forward A, forward B, backward B, backward A): each context keeps
// its own exchange plan.
void run_interleaved(TokenDispatcherType type, int ep) {
  LayerPair pair(layer_cases()[2], type, ep);  // capacity with padding: the richest state
  const Tensor input_a = pair.global_tensor(0), input_b = pair.global_tensor(2);
  const Tensor grad_a = pair.global_tensor(1), grad_b = pair.global_tensor(3);
  MoEContext reference_a, reference_b, ctx_a, ctx_b;
  const Tensor reference_out_a = pair.reference.layer.forward(input_a, reference_a);
  const Tensor reference_out_b = pair.reference.layer.forward(input_b, reference_b);
  const Tensor out_a = pair.distributed.layer.forward(pair.mine(input_a), ctx_a);
  const Tensor out_b = pair.distributed.layer.forward(pair.mine(input_b), ctx_b);
  expect_same(out_a, reference_out_a.rows(pair.begin, pair.end), "output A", pair.dtype);
  expect_same(out_b, reference_out_b.rows(pair.begin, pair.end), "output B", pair.dtype);
  const Tensor reference_din_b = pair.reference.layer.backward(reference_b, grad_b);
  const Tensor reference_din_a = pair.reference.layer.backward(reference_a, grad_a);
  const Tensor din_b = pair.distributed.layer.backward(ctx_b, pair.mine(grad_b));
  const Tensor din_a = pair.distributed.layer.backward(ctx_a, pair.mine(grad_a));
  expect_same(din_a, reference_din_a.rows(pair.begin, pair.end), "input gradient A", pair.dtype);
  expect_same(din_b, reference_din_b.rows(pair.begin, pair.end), "input gradient B", pair.dtype);
  pair.compare_gradients();
}

class ExpertParallelLayer : public ::testing::TestWithParam<TokenDispatcherType> {};

TEST_P(ExpertParallelLayer, MatchesTheSingleProcessLayerForEveryEpSize) {
  const int world_size = comm::ProcessGroup::world().size();
  for (int ep : testing::ep_sizes(world_size)) {
    for (const LayerCase& entry : layer_cases()) {
      SCOPED_TRACE(entry.name + " ep " + std::to_string(ep));
      run_case(entry, GetParam(), ep);
    }
  }
}

TEST_P(ExpertParallelLayer, MicroBatchesInFlightKeepTheirOwnExchanges) {
  const int world_size = comm::ProcessGroup::world().size();
  for (int ep : testing::ep_sizes(world_size)) {
    SCOPED_TRACE("ep " + std::to_string(ep));
    run_interleaved(GetParam(), ep);
  }
}

INSTANTIATE_TEST_SUITE_P(Dispatchers, ExpertParallelLayer,
                         ::testing::Values(TokenDispatcherType::kAllToAll,
                                           TokenDispatcherType::kAllGather),
                         [](const auto& info) { return std::string(name_of(info.param)); });

}  // namespace
}  // namespace moe

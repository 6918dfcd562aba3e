// For the same global batch and weights, the MoE layer with its experts spread over ep = 1, 2, 4,
// 8 ranks (all-to-all and all-gather dispatchers; top-k and expert-choice routers) gives bitwise
// the single-process layer's output, input gradient and expert-weight gradients on every rank's
// slice, and the single-process router gradient and aux loss once summed over the ranks (fp32
// reduction order). With expert tensor parallelism ((ep, etp) = (1, 2), (2, 2), (4, 2)) the same
// holds within the tolerances of etp_tolerance (the etp ranks' partial fc2 sums round apart), and
// the expert-weight gradients assembled from every rank's slice by the global offsets match the
// whole reference gradients. Every rank builds the whole reference layer from the same seed and
// checks its own part.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>

#include "ep_test_util.h"
#include "moe/comm/process_group.h"
#include "moe/moe/capacity.h"
#include "moe/moe/ep_dispatchers.h"
#include "moe/moe/expert_choice_router.h"
#include "moe/moe/moe_layer.h"
#include "support/testing.h"

namespace moe {
namespace {

// ||actual - expected|| / ||expected|| (2-norms over all elements).
double relative_norm_error(const Tensor& actual, const Tensor& expected) {
  double difference = 0, reference = 0;
  for (int64_t i = 0; i < expected.numel(); ++i) {
    const double a = actual.get(i), e = expected.get(i);
    difference += (a - e) * (a - e);
    reference += e * e;
  }
  return reference == 0 ? std::sqrt(difference) : std::sqrt(difference / reference);
}

// etp > 1: each etp rank's expert output is a partial sum over its ffn slice, rounded to the
// activation dtype before the reduce-scatter adds the slices, so outputs, input gradients and
// (through d probs) router gradients differ from one process's by a rounding of the partials.
// fp32 / fp64: elementwise within a few ulps. bf16: one bf16 ulp (2^-8 relative) of a partial
// can be a large part of a small element after cancellation, and the router gradients sum such
// errors over tokens, so bf16 is checked by the relative 2-norm error: at most 2^-6 (measured up to
// 0.0051).
void expect_etp_close(const Tensor& actual, const Tensor& expected, const std::string& what,
                      DType path) {
  if (path == DType::BF16) {
    ASSERT_EQ(actual.shape(), expected.shape()) << what;
    EXPECT_LE(relative_norm_error(actual, expected), 1.0 / 64) << what;
  } else if (path == DType::F64 && actual.dtype() == DType::F64) {
    EXPECT_TENSORS_CLOSE(actual, expected, 1e-12, 1e-12) << what;
  } else if (path == DType::F64) {
    EXPECT_TENSORS_CLOSE(actual, expected, 1e-6, 1e-5) << what;
  } else {
    EXPECT_TENSORS_CLOSE(actual, expected, 2e-5, 2e-5) << what;
  }
}

// etp = 1, fp32 and bf16: bitwise. fp64 (the gradient-check path) runs its GEMMs through OpenBLAS
// dgemm, whose result for a row depends on where the row sits in the call (edge-row kernels), so
// a token's numbers may differ in the last bits between the group's batch and a rank's slice.
// Gradient buffers are fp32 on every path: there the fp64 differences survive as one-ulp ones.
void expect_same(const Tensor& actual, const Tensor& expected, const std::string& what, DType path,
                 int etp) {
  if (etp > 1) {
    expect_etp_close(actual, expected, what, path);
  } else if (path != DType::F64) {
    EXPECT_TRUE(moe::testing::same_bytes(actual, expected)) << what;
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
      // Expert choice over the group's batch (ceil(tokens x 1.3 / 8) each, not integral for
      // the seeded token counts), so the experts' picks do not depend on ep.
      {"expert_choice_swiglu",
       [](MoEConfig& c) {
         c.moe_router_type = RouterType::kExpertChoice;
         c.moe_aux_loss_coeff = 0.0;
         c.moe_expert_capacity_factor = 1.3;
         c.activation = ExpertActivation::kSwiGLU;
       }},
      {"bf16_expert_choice_padded_grouped",
       [](MoEConfig& c) {
         c.moe_router_type = RouterType::kExpertChoice;
         c.moe_aux_loss_coeff = 0.0;
         c.moe_expert_capacity_factor = 0.7;
         c.moe_pad_expert_input_to_capacity = true;
         c.moe_grouped_gemm = true;
       },
       DType::BF16},
  };
}

// The layouts: (ep, etp) with ep * etp dividing the world size.
struct Layout {
  int ep = 1, etp = 1;
};
std::vector<Layout> layouts(int world_size) {
  std::vector<Layout> all;
  for (int ep : testing::ep_sizes(world_size)) all.push_back({ep, 1});
  for (int ep : {1, 2, 4}) {
    if (world_size % (2 * ep) == 0) all.push_back({ep, 2});
  }
  return all;
}
std::string name_of(const Layout& layout) {
  return detail::concat("ep ", layout.ep, " etp ", layout.etp);
}

MoEConfig case_config(const LayerCase& entry, TokenDispatcherType type, int etp) {
  MoEConfig config;
  config.hidden_size = 20;
  config.num_experts = 8;
  config.ffn_hidden_size = 13 * etp;  // an odd ffn slice on every etp rank
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

// Calls copy(local element, global element, count) for each run of a parameter's local block
// that is contiguous in both the local and the global tensor (one last-dimension row).
template <class Copy>
void for_each_block_run(const ParamSpec& spec, Copy copy) {
  const size_t dims = spec.shape.size();
  const int64_t row = spec.shape[dims - 1];
  const int64_t runs = row == 0 ? 0 : shape_numel(spec.shape) / row;
  for (int64_t run = 0; run < runs; ++run) {
    int64_t rest = run, global = 0, stride = 1;
    for (size_t d = dims; d-- > 0;) {
      const int64_t index = d == dims - 1 ? 0 : rest % spec.shape[d];
      if (d != dims - 1) rest /= spec.shape[d];
      global += (index + spec.global_offset[d]) * stride;
      stride *= spec.global_shape[d];
    }
    copy(run * row, global, row);
  }
}

void copy_elements(const Tensor& from, int64_t from_element, Tensor& to, int64_t to_element,
                   int64_t count) {
  const size_t bytes = dtype_size(from.dtype());
  std::memcpy(static_cast<char*>(to.raw()) + size_t(to_element) * bytes,
              static_cast<const char*>(from.raw()) + size_t(from_element) * bytes,
              size_t(count) * bytes);
}

// This rank's block of a global parameter (by the spec's global offsets).
Tensor local_part(const Tensor& global, const ParamSpec& spec) {
  if (spec.global_offset.empty() || spec.global_shape == spec.shape) return global;
  Tensor local = Tensor::empty(spec.shape, global.dtype());
  for_each_block_run(spec, [&](int64_t local_element, int64_t global_element, int64_t count) {
    copy_elements(global, global_element, local, local_element, count);
  });
  return local;
}

// The whole gradient assembled from the group's blocks: every rank places its block in zeros
// and the group sums (the blocks of the tp-ep group are disjoint and cover the tensor; an etp
// replica, tensor_parallel_duplicate, is placed by etp rank 0 only).
Tensor assemble(const Tensor& local, const ParamSpec& spec, const comm::ParallelState& parallel) {
  Tensor global = Tensor::zeros(spec.global_shape, local.dtype());
  if (!spec.tensor_parallel_duplicate || parallel.etp_group.rank() == 0) {
    for_each_block_run(spec, [&](int64_t local_element, int64_t global_element, int64_t count) {
      copy_elements(local, local_element, global, global_element, count);
    });
  }
  comm::all_reduce(global, parallel.tp_ep_group);
  return global;
}

// The single-process reference layer (all experts, the group's whole batch) and the
// expert-parallel layer with the same weights, and this rank's slice of the batch.
struct LayerPair {
  LayerPair(const LayerCase& entry, TokenDispatcherType type, const Layout& layout,
            testing::TokensOfRank tokens_of = testing::tokens_of_rank)
      : parallel(testing::parallel_state(layout.ep, layout.etp)),
        etp(layout.etp),
        config(case_config(entry, type, layout.etp)),
        dtype(entry.dtype),
        reference(config, dtype, nullptr),
        distributed(config, dtype, make_token_dispatcher(config, parallel)) {
    const testing::GroupTokens tokens = testing::group_tokens(parallel.tp_ep_group, tokens_of);
    group_tokens = tokens.total;
    begin = tokens.first;
    end = tokens.first + tokens_of(parallel.world_rank);
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
    distributed.layer.router().set_aux_count_reducer(make_aux_count_reducer(parallel.tp_ep_group));
    for (int i = 0; i < distributed.store.count(); ++i) {
      const ParamSpec& spec = distributed.store.spec(ParamHandle{i});
      distributed.store.param(ParamHandle{i})
          .copy_from(local_part(reference.param(spec.name), spec));
    }
  }

  // A global [group tokens, H] tensor from a seed shared by the group.
  Tensor global_tensor(uint64_t stream) const {
    const uint64_t seed = 11 + stream + 1000 * uint64_t(parallel.tp_ep_group.world_ranks()[0]);
    return testing::random_normal({group_tokens, config.hidden_size}, seed, 1.0f, dtype);
  }
  Tensor mine(const Tensor& global) const { return global.rows(begin, end).clone(); }

  // Expert-weight gradients bitwise (etp = 1) on every rank's block, and assembled whole with
  // etp > 1; router gradients summed over the group within fp32 rounding (each rank holds its
  // tokens' share).
  void compare_gradients() const {
    for (int i = 0; i < distributed.store.count(); ++i) {
      const ParamSpec& spec = distributed.store.spec(ParamHandle{i});
      const Tensor expected = local_part(reference.grad(spec.name), spec);
      Tensor actual = distributed.store.grad(ParamHandle{i}).clone();
      if (spec.group == ParamGroup::kExpert) {
        expect_same(actual, expected, spec.name + " gradient", dtype, etp);
        if (etp > 1) {
          expect_same(assemble(actual, spec, parallel), reference.grad(spec.name),
                      spec.name + " assembled gradient", dtype, etp);
        }
      } else {
        comm::all_reduce(actual, parallel.tp_ep_group);
        if (etp > 1) {
          expect_etp_close(actual, expected, spec.name + " gradient", dtype);
        } else {
          EXPECT_TENSORS_CLOSE(actual, expected, 1e-5, 1e-4) << spec.name << " gradient";
        }
      }
    }
  }

  const comm::ParallelState& parallel;
  const int etp;
  const MoEConfig config;
  const DType dtype;
  int64_t group_tokens = 0, begin = 0, end = 0;
  Layer reference, distributed;
};

void run_case(const LayerCase& entry, TokenDispatcherType type, const Layout& layout,
              testing::TokensOfRank tokens_of = testing::tokens_of_rank) {
  LayerPair pair(entry, type, layout, tokens_of);
  const Tensor input = pair.global_tensor(0), grad_output = pair.global_tensor(1);

  MoEContext reference_ctx, ctx;
  const Tensor reference_out = pair.reference.layer.forward(input, reference_ctx);
  const Tensor out = pair.distributed.layer.forward(pair.mine(input), ctx);
  expect_same(out, reference_out.rows(pair.begin, pair.end), "output", pair.dtype, pair.etp);
  // Capacity cases must really drop slots (the seeded batches of two or more ranks do).
  if (pair.config.moe_expert_capacity_factor && pair.parallel.tp_ep_group.size() > 1) {
    const std::vector<int64_t>& slots = reference_ctx.dispatch.plan.row_of_slot;
    EXPECT_GT(std::count(slots.begin(), slots.end(), -1), 0) << "no slot dropped";
  }
  if (pair.config.moe_router_type == RouterType::kExpertChoice) {
    const int64_t capacity = expert_choice_capacity(pair.group_tokens, pair.config.num_experts,
                                                    *pair.config.moe_expert_capacity_factor);
    EXPECT_EQ(
        ctx.dispatch.tokens_per_local_expert,
        std::vector<int64_t>(size_t(pair.distributed.layer.experts().placement().count), capacity));
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
  if (entry.dtype == DType::F64 && pair.etp == 1) {
    // The router's input gradient (dlogits x W^T) goes through OpenBLAS dgemm on the fp64 path,
    // whose result for a row depends on where the row sits in the call (edge-row kernels).
    EXPECT_TENSORS_CLOSE(grad_input, reference_grad_input.rows(pair.begin, pair.end), 1e-14, 1e-12);
  } else {
    expect_same(grad_input, reference_grad_input.rows(pair.begin, pair.end), "input gradient",
                pair.dtype, pair.etp);
  }
  pair.compare_gradients();

  Tensor loss = Tensor::full({1}, 0.0f, DType::F64);
  loss.data<double>()[0] = MoELayer::losses(ctx).load_balancing_loss;
  comm::all_reduce(loss, pair.parallel.tp_ep_group);
  const double expected_loss = MoELayer::losses(reference_ctx).load_balancing_loss;
  EXPECT_EQ(expected_loss > 0.0, pair.config.aux_loss_enabled());
  EXPECT_NEAR(loss.data<double>()[0], expected_loss, 1e-6 * expected_loss) << "aux loss";
}

// Two micro-batches in flight (forward A, forward B, backward B, backward A): each context keeps
// its own exchange plan.
void run_interleaved(TokenDispatcherType type, const Layout& layout) {
  LayerPair pair(layer_cases()[2], type, layout);  // capacity with padding: the richest state
  const Tensor input_a = pair.global_tensor(0), input_b = pair.global_tensor(2);
  const Tensor grad_a = pair.global_tensor(1), grad_b = pair.global_tensor(3);
  MoEContext reference_a, reference_b, ctx_a, ctx_b;
  const Tensor reference_out_a = pair.reference.layer.forward(input_a, reference_a);
  const Tensor reference_out_b = pair.reference.layer.forward(input_b, reference_b);
  const Tensor out_a = pair.distributed.layer.forward(pair.mine(input_a), ctx_a);
  const Tensor out_b = pair.distributed.layer.forward(pair.mine(input_b), ctx_b);
  expect_same(out_a, reference_out_a.rows(pair.begin, pair.end), "output A", pair.dtype, pair.etp);
  expect_same(out_b, reference_out_b.rows(pair.begin, pair.end), "output B", pair.dtype, pair.etp);
  const Tensor reference_din_b = pair.reference.layer.backward(reference_b, grad_b);
  const Tensor reference_din_a = pair.reference.layer.backward(reference_a, grad_a);
  const Tensor din_b = pair.distributed.layer.backward(ctx_b, pair.mine(grad_b));
  const Tensor din_a = pair.distributed.layer.backward(ctx_a, pair.mine(grad_a));
  expect_same(din_a, reference_din_a.rows(pair.begin, pair.end), "input gradient A", pair.dtype,
              pair.etp);
  expect_same(din_b, reference_din_b.rows(pair.begin, pair.end), "input gradient B", pair.dtype,
              pair.etp);
  pair.compare_gradients();
}

class ExpertParallelLayer : public ::testing::TestWithParam<TokenDispatcherType> {};

TEST_P(ExpertParallelLayer, MatchesTheSingleProcessLayerForEveryLayout) {
  for (const Layout& layout : layouts(comm::ProcessGroup::world().size())) {
    for (const LayerCase& entry : layer_cases()) {
      SCOPED_TRACE(entry.name + " " + name_of(layout));
      run_case(entry, GetParam(), layout);
    }
  }
}

TEST_P(ExpertParallelLayer, MicroBatchesInFlightKeepTheirOwnExchanges) {
  for (const Layout& layout : layouts(comm::ProcessGroup::world().size())) {
    SCOPED_TRACE(name_of(layout));
    run_interleaved(GetParam(), layout);
  }
}

// A rank with no tokens still joins the aux loss's count reduction (and every exchange), so its
// peers do not wait for it; a short collective timeout turns a regression into a quick failure.
// Every rank empty: no loss, no gradient, and no error.
struct CollectiveTimeout {
  explicit CollectiveTimeout(double seconds) { comm::set_collective_timeout(seconds); }
  ~CollectiveTimeout() { comm::set_collective_timeout(previous); }
  const double previous = comm::collective_timeout();
};

TEST_P(ExpertParallelLayer, RanksWithoutTokensJoinEveryCollective) {
  const CollectiveTimeout short_timeout(5.0);
  const int world_size = comm::ProcessGroup::world().size();
  const Layout layouts[] = {{world_size, 1}, {world_size / 2, 2}};
  const testing::TokensOfRank rank_1_empty = [](int world_rank) -> int64_t {
    return world_rank == 1 ? 0 : testing::tokens_of_rank(world_rank);
  };
  for (const Layout& layout : layouts) {
    for (const LayerCase& entry : {layer_cases()[0], layer_cases()[3]}) {
      SCOPED_TRACE(entry.name + " " + name_of(layout) + ", rank 1 without tokens");
      run_case(entry, GetParam(), layout, rank_1_empty);
    }
    SCOPED_TRACE(name_of(layout) + ", every rank without tokens");
    LayerPair pair(layer_cases()[0], GetParam(), layout, [](int) -> int64_t { return 0; });
    MoEContext ctx;
    const Tensor out = pair.distributed.layer.forward(pair.mine(pair.global_tensor(0)), ctx);
    EXPECT_EQ(out.shape(), (Shape{0, pair.config.hidden_size}));
    EXPECT_EQ(MoELayer::losses(ctx).load_balancing_loss, 0.0);
    pair.distributed.layer.backward(ctx, pair.mine(pair.global_tensor(1)));
    for (int i = 0; i < pair.distributed.store.count(); ++i) {
      const Tensor grad = pair.distributed.store.grad(ParamHandle{i});
      EXPECT_EQ(relative_norm_error(grad, Tensor::zeros(grad.shape())), 0.0)
          << pair.distributed.store.spec(ParamHandle{i}).name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dispatchers, ExpertParallelLayer,
                         ::testing::Values(TokenDispatcherType::kAllToAll,
                                           TokenDispatcherType::kAllGather),
                         [](const auto& info) { return std::string(name_of(info.param)); });

}  // namespace
}  // namespace moe

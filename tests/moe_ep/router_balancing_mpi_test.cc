// The router's cross-rank balancing state against one process holding the union of the ranks'
// tokens: the expert-bias update with loads summed over the world, and global_aux_loss with its
// counts reduced over the world (as over Megatron's tensor x data x context parallel group).
#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "ep_test_util.h"
#include "moe/checkpoint/checkpoint.h"
#include "moe/comm/process_group.h"
#include "moe/moe/ep_dispatchers.h"
#include "moe/moe/moe_layer.h"
#include "moe/moe/router.h"
#include "moe/moe_test_util.h"
#include "support/mpi_testing.h"
#include "support/testing.h"

namespace moe {
namespace {

// A router over its own store, initialised identically on every rank.
struct OwnRouter {
  OwnRouter(const MoEConfig& config, DType dtype) : store(dtype), router(config, store, "router") {
    store.allocate();
    router.init_parameters(41, 1.0f);
    if (router.has_bias())
      router.bias().copy_from(testing::random_normal({config.num_experts}, 42));
  }
  ParameterStore store;
  TopKRouter router;
};

// Round r's union batch (every rank builds it) and this rank's rows of it.
struct Batch {
  Tensor all, mine;
};
Batch batch(int64_t hidden, uint64_t seed, DType dtype) {
  const comm::ProcessGroup world = comm::ProcessGroup::world();
  testing::GroupTokens tokens = testing::group_tokens(world);
  Tensor all = testing::random_normal({tokens.total, hidden}, seed, 1.0f, dtype);
  int64_t count = testing::tokens_of_rank(world.rank());
  return {all, all.rows(tokens.first, tokens.first + count).clone()};
}

TEST(RouterBalancingMpi, ExpertBiasUpdateEqualsTheUpdateOnTheUnionOfTokens) {
  const int64_t H = 5, E = 8, K = 2;
  MoEConfig config = testing::small_config(H, E, K, 4);
  config.moe_router_score_function = ScoreFunction::kSigmoid;
  config.moe_router_enable_expert_bias = true;
  config.moe_router_load_balancing_type = LoadBalancingType::kNone;
  config.moe_router_bias_update_rate = 0.05;
  const comm::ProcessGroup world = comm::ProcessGroup::world();
  OwnRouter distributed(config, DType::F32), single(config, DType::F32);
  RouterContext ctx;
  for (uint64_t round = 0; round < 6; ++round) {
    SCOPED_TRACE(round);
    for (uint64_t micro_batch = 0; micro_batch < 2; ++micro_batch) {
      Batch b = batch(H, 100 + 2 * round + micro_batch, DType::F32);
      distributed.router.count_routed_tokens(distributed.router.forward(b.mine, ctx));
      single.router.count_routed_tokens(single.router.forward(b.all, ctx));
    }
    distributed.router.update_expert_bias(world);
    single.router.update_expert_bias(comm::ProcessGroup());
    EXPECT_TRUE(testing::same_bytes(distributed.router.expert_bias(), single.router.expert_bias()));
  }
  // The updates did something: some expert's bias moved.
  EXPECT_FALSE(testing::same_bytes(single.router.expert_bias(), Tensor::zeros({E})));
}

// A layer over its own store, weights from the same seed on every rank; dispatcher null: one
// process with every expert.
struct OwnLayer {
  OwnLayer(const MoEConfig& config, std::unique_ptr<TokenDispatcher> dispatcher)
      : layer(config, store, "layer", std::move(dispatcher)) {
    store.allocate();
    layer.init_parameters(45, 1.0f, 0.5f);
  }
  ParameterStore store;
  MoELayer layer;
};

// This rank's expert-bias loads summed over the world.
Tensor world_loads(const TopKRouter& router) {
  Tensor loads = router.tokens_per_expert().clone();
  comm::all_reduce(loads, comm::ProcessGroup::world());
  return loads;
}

// ep = world with a capacity factor (group scope): the loads the expert bias counts are the
// slots the group's capacity decision kept, so summed over the ranks they are the single
// process's loads on the union of the tokens (each rank deciding capacity on its own tokens
// would count other slots).
TEST(RouterBalancingMpi, ExpertBiasLoadsUnderCapacityEqualTheSingleProcessLoads) {
  const int64_t H = 5, E = 8, K = 2;
  MoEConfig config = testing::small_config(H, E, K, 4);
  config.moe_router_score_function = ScoreFunction::kSigmoid;
  config.moe_router_enable_expert_bias = true;
  config.moe_router_load_balancing_type = LoadBalancingType::kNone;
  config.moe_expert_capacity_factor = 0.6;
  const comm::ProcessGroup world = comm::ProcessGroup::world();
  const comm::ParallelState& layout = testing::parallel_state(world.size());
  for (TokenDispatcherType type :
       {TokenDispatcherType::kAllToAll, TokenDispatcherType::kAllGather}) {
    SCOPED_TRACE(name_of(type));
    config.moe_token_dispatcher_type = type;
    OwnLayer distributed(config, make_token_dispatcher(config, layout)), single(config, nullptr);
    for (uint64_t micro_batch = 0; micro_batch < 2; ++micro_batch) {
      Batch b = batch(H, 400 + micro_batch, DType::F32);
      MoEContext local_ctx, single_ctx;
      distributed.layer.forward(b.mine, local_ctx);
      single.layer.forward(b.all, single_ctx);
    }
    const Tensor loads = world_loads(distributed.layer.router());
    EXPECT_TRUE(testing::same_bytes(loads, single.layer.router().tokens_per_expert()));
    int64_t counted = 0;
    for (int64_t e = 0; e < E; ++e) counted += loads.data<int64_t>()[e];
    EXPECT_LT(counted, 2 * testing::group_tokens(world).total * K);  // some slot was dropped
  }
}

// --moe-capacity-scope rank with ep = world: every rank drops as Megatron does, on its own tokens
// alone, so its output and loads are the single process's on its tokens alone, also padded (each
// expert padded to the sum of the ranks' capacities with zero rows).
TEST(RouterBalancingMpi, RankCapacityScopeDecidesOnEachRanksOwnTokens) {
  const int64_t H = 5, E = 8, K = 2;
  MoEConfig config = testing::small_config(H, E, K, 4);
  config.moe_router_score_function = ScoreFunction::kSigmoid;
  config.moe_router_enable_expert_bias = true;
  config.moe_router_load_balancing_type = LoadBalancingType::kNone;
  config.moe_expert_capacity_factor = 0.6;
  config.moe_capacity_scope = CapacityScope::kRank;
  const comm::ProcessGroup world = comm::ProcessGroup::world();
  const comm::ParallelState& layout = testing::parallel_state(world.size());
  for (int variant = 0; variant < 4; ++variant) {
    config.moe_token_dispatcher_type =
        variant % 2 == 0 ? TokenDispatcherType::kAllToAll : TokenDispatcherType::kAllGather;
    // Padding (the expert bias refuses it: every load would be the capacity).
    config.moe_pad_expert_input_to_capacity = variant >= 2;
    config.moe_router_enable_expert_bias = variant < 2;
    SCOPED_TRACE(std::string(name_of(config.moe_token_dispatcher_type)) +
                 (config.moe_pad_expert_input_to_capacity ? " padded" : ""));
    OwnLayer distributed(config, make_token_dispatcher(config, layout)), single(config, nullptr);
    Batch b = batch(H, 500, DType::F32);
    MoEContext local_ctx, single_ctx;
    Tensor out = distributed.layer.forward(b.mine, local_ctx);
    Tensor expected = single.layer.forward(b.mine, single_ctx);
    EXPECT_TRUE(testing::same_bytes(out, expected));
    if (config.moe_router_enable_expert_bias) {
      EXPECT_TRUE(testing::same_bytes(distributed.layer.router().tokens_per_expert(),
                                      single.layer.router().tokens_per_expert()));
    }
    EXPECT_EQ(local_ctx.dispatch.plan.row_of_slot.size(),
              single_ctx.dispatch.plan.row_of_slot.size());
    for (size_t s = 0; s < local_ctx.dispatch.plan.row_of_slot.size(); ++s) {
      EXPECT_EQ(local_ctx.dispatch.plan.row_of_slot[s] < 0,
                single_ctx.dispatch.plan.row_of_slot[s] < 0)
          << "slot " << s;
    }
  }
}

// The expert bias saved by an expert-parallel layout (replicated: stored once) loads bitwise into
// the same layout and into one process.
TEST(RouterBalancingMpi, ExpertBiasCheckpointLoadsIntoAnotherLayout) {
  const int64_t H = 5, E = 8, K = 2;
  MoEConfig config = testing::small_config(H, E, K, 4);
  config.moe_router_score_function = ScoreFunction::kSigmoid;
  config.moe_router_enable_expert_bias = true;
  const comm::ProcessGroup world = comm::ProcessGroup::world();
  const comm::ParallelState& layout = testing::parallel_state(world.size());
  const std::string prefix = "decoder.layers.3.mlp.router";
  auto make = [&](ParameterStore& store) {
    auto router = std::make_unique<TopKRouter>(config, store, prefix);
    store.allocate();
    return router;
  };
  ParameterStore saved_store(DType::BF16);
  std::unique_ptr<TopKRouter> saved = make(saved_store);
  saved->init_parameters(43, 1.0f);
  // Values bf16 could not hold; the same on every rank, as the replicated update keeps them.
  saved->expert_bias().copy_from(testing::random_normal({E}, 44, 0.01f));
  testing::SharedScratchDir dir("expert_bias_layouts");
  checkpoint::TrainingState state;
  state.iteration = 2;
  checkpoint::save_checkpoint(dir.str(), state, saved_store, nullptr, nullptr, layout);

  ParameterStore same_store(DType::BF16);
  std::unique_ptr<TopKRouter> same = make(same_store);
  checkpoint::LoadOptions no_rng;
  no_rng.load_rng = false;
  checkpoint::load_checkpoint(dir.str(), same_store, nullptr, nullptr, layout, no_rng);
  EXPECT_TRUE(testing::same_bytes(same->expert_bias(), saved->expert_bias()));
  if (world.rank() == 0) {
    ParameterStore one_store(DType::F32);
    std::unique_ptr<TopKRouter> one = make(one_store);
    checkpoint::load_checkpoint(dir.str(), one_store, nullptr, nullptr,
                                comm::single_process_state(), no_rng);
    EXPECT_TRUE(testing::same_bytes(one->expert_bias(), saved->expert_bias()));
  }
}

// Over two micro-batches, the ranks' global_aux_loss values add up to the single process's and
// every token's input gradient is the single process's for that token.
TEST(RouterBalancingMpi, GlobalAuxLossEqualsTheSingleProcessValue) {
  const int64_t H = 5, E = 6, K = 2;
  MoEConfig config = testing::small_config(H, E, K, 4);
  config.moe_router_load_balancing_type = LoadBalancingType::kGlobalAuxLoss;
  config.moe_aux_loss_coeff = 0.1;
  const comm::ProcessGroup world = comm::ProcessGroup::world();
  OwnRouter distributed(config, DType::F64), single(config, DType::F64);
  distributed.router.set_global_aux_count_reducer(make_aux_count_reducer(world));
  testing::GroupTokens tokens = testing::group_tokens(world);
  const int64_t mine = testing::tokens_of_rank(world.rank());
  for (uint64_t micro_batch = 0; micro_batch < 2; ++micro_batch) {
    SCOPED_TRACE(micro_batch);
    Batch b = batch(H, 200 + micro_batch, DType::F64);
    Tensor probe = testing::random_normal({tokens.total, K}, 300 + micro_batch, 1.0f, DType::F64);
    RouterContext local_ctx, single_ctx;
    distributed.router.forward(b.mine, local_ctx);
    single.router.forward(b.all, single_ctx);
    Tensor summed({1}, DType::F64);
    summed.data<double>()[0] = local_ctx.losses.global_aux_loss;
    comm::all_reduce(summed, world);
    EXPECT_GT(single_ctx.losses.global_aux_loss, 0.0);
    // fp64 sums of a few ~1-sized terms in another order: agreement to ~1e-15 relative.
    EXPECT_NEAR(summed.data<double>()[0], single_ctx.losses.global_aux_loss, 1e-14);
    EXPECT_EQ(local_ctx.losses.load_balancing_loss, local_ctx.losses.global_aux_loss);

    Tensor local_grad({mine, H}, DType::F64), single_grad({tokens.total, H}, DType::F64);
    distributed.router.backward(local_ctx, probe.rows(tokens.first, tokens.first + mine).clone(),
                                local_grad);
    single.router.backward(single_ctx, probe, single_grad);
    // Same per-token fp64 arithmetic; the GEMM may block rows differently: 1e-12 per element.
    EXPECT_TENSORS_CLOSE(local_grad, single_grad.rows(tokens.first, tokens.first + mine), 1e-12,
                         1e-12);
  }
}

}  // namespace
}  // namespace moe

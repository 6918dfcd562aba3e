// Bad layouts and disagreeing ranks give a clear error on every rank, never a hang or mixed rows.
#include <gtest/gtest.h>

#include <string>

#include "ep_test_util.h"
#include "moe/comm/process_group.h"
#include "moe/moe/ep_dispatchers.h"
#include "support/testing.h"

namespace moe {
namespace {

using testing::error_text;

MoEConfig small_config(TokenDispatcherType type) {
  MoEConfig config;
  config.hidden_size = 4;
  config.num_experts = 8;
  config.ffn_hidden_size = 4;
  config.moe_router_topk = 2;
  config.moe_token_dispatcher_type = type;
  return config;
}

Routing simple_routing(int64_t tokens, int64_t topk) {
  Routing routing;
  routing.num_tokens = tokens;
  routing.topk = topk;
  routing.experts = Tensor::empty({tokens, topk}, DType::I32);
  routing.probs = Tensor::full({tokens, topk}, 0.5f);
  for (int64_t i = 0; i < tokens * topk; ++i) routing.experts.data<int32_t>()[i] = int32_t(i % 8);
  return routing;
}

int world_size() {
  return comm::ProcessGroup::world().size();
}

const TokenDispatcherType kTypes[] = {TokenDispatcherType::kAllToAll,
                                      TokenDispatcherType::kAllGather};

TEST(ExpertParallelFailures, RanksWithDifferentHiddenSizesFailOnEveryRank) {
  const comm::ParallelState& parallel = testing::parallel_state(world_size());
  for (TokenDispatcherType type : kTypes) {
    SCOPED_TRACE(std::string(name_of(type)));
    auto dispatcher = make_token_dispatcher(small_config(type), parallel);
    const int64_t width = parallel.world_rank == 1 ? 6 : 4;
    DispatchContext ctx;
    const std::string text = error_text([&] {
      dispatcher->dispatch(Tensor({3, width}), simple_routing(3, 2), ctx);
    });
    const std::string who = type == TokenDispatcherType::kAllToAll
                                ? "AllToAllTokenDispatcher::dispatch"
                                : "AllGatherTokenDispatcher::dispatch";
    EXPECT_CONTAINS(text, who + ": the ranks of group '");
    EXPECT_CONTAINS(text, "' disagree on the hidden size (rank 0: 4, rank 1: 6");
  }
}

TEST(ExpertParallelFailures, ABadArgumentOnOneRankFailsEveryRank) {
  const comm::ParallelState& parallel = testing::parallel_state(world_size());
  auto dispatcher = make_token_dispatcher(small_config(TokenDispatcherType::kAllToAll), parallel);
  const int64_t tokens = parallel.world_rank == 1 ? 5 : 3;  // rank 1's routing has 3 tokens
  DispatchContext ctx;
  const std::string text = error_text([&] {
    dispatcher->dispatch(Tensor({tokens, 4}), simple_routing(3, 2), ctx);
  });
  if (parallel.ep_group.rank() == 1) {
    EXPECT_EQ(text,
              "AllToAllTokenDispatcher::dispatch: hidden [5, 4] has 5 tokens but the "
              "routing has 3");
  } else {
    EXPECT_CONTAINS(text,
                    "AllToAllTokenDispatcher::dispatch: rank 1 of group 'tp_ep' (world rank 1) "
                    "rejected its arguments; see its error");
  }
  // Nothing is left pending: the next exchange works.
  EXPECT_NO_THROW(dispatcher->dispatch(Tensor({3, 4}), simple_routing(3, 2), ctx));
}

// The expert ids are checked with the agreement, so an id out of range on one rank fails every
// rank before the counts are used.
TEST(ExpertParallelFailures, AnExpertIdOutOfRangeOnOneRankFailsEveryRank) {
  const comm::ParallelState& parallel = testing::parallel_state(world_size());
  for (TokenDispatcherType type : kTypes) {
    SCOPED_TRACE(std::string(name_of(type)));
    auto dispatcher = make_token_dispatcher(small_config(type), parallel);
    Routing routing = simple_routing(3, 2);
    if (parallel.world_rank == 1) routing.experts.data<int32_t>()[3] = 9;  // token 1, slot 1
    DispatchContext ctx;
    const std::string text = error_text([&] {
      dispatcher->dispatch(Tensor({3, 4}), routing, ctx);
    });
    if (parallel.world_rank == 1) {
      EXPECT_CONTAINS(text, "dispatch: token 1 slot 1 names expert 9, outside [0, 8)");
    } else {
      EXPECT_CONTAINS(text, "rank 1 of group 'tp_ep' (world rank 1) rejected its arguments");
    }
    EXPECT_NO_THROW(dispatcher->dispatch(Tensor({3, 4}), simple_routing(3, 2), ctx));
  }
}

TEST(ExpertParallelFailures, RanksWithDifferentMoESettingsFailOnEveryRank) {
  const comm::ParallelState& parallel = testing::parallel_state(world_size());
  const bool odd = parallel.world_rank == 1;
  MoEConfig config =
      small_config(odd ? TokenDispatcherType::kAllGather : TokenDispatcherType::kAllToAll);
  DispatchContext ctx;
  std::string text = error_text([&] {
    make_token_dispatcher(config, parallel)->dispatch(Tensor({3, 4}), simple_routing(3, 2), ctx);
  });
  EXPECT_CONTAINS(text, "disagree on the token dispatcher (rank 0: alltoall, rank 1: allgather");

  config = small_config(TokenDispatcherType::kAllToAll);
  if (odd) config.moe_expert_capacity_factor = 1.5;
  text = error_text([&] {
    make_token_dispatcher(config, parallel)->dispatch(Tensor({3, 4}), simple_routing(3, 2), ctx);
  });
  EXPECT_CONTAINS(text,
                  "AllToAllTokenDispatcher::dispatch: the ranks of group 'tp_ep' disagree "
                  "on the moe_expert_capacity_factor (rank 0: none, rank 1: 1.5");

  // Rank 1 routes by expert choice (a slot per expert), the others by top-2.
  config.moe_expert_capacity_factor = 1.5;
  if (odd) config.moe_router_type = RouterType::kExpertChoice;
  text = error_text([&] {
    make_token_dispatcher(config, parallel)
        ->dispatch(Tensor({3, 4}), simple_routing(3, config.routing_slots()), ctx);
  });
  EXPECT_CONTAINS(text,
                  "AllToAllTokenDispatcher::dispatch: the ranks of group 'tp_ep' disagree "
                  "on the moe_router_type (rank 0: topk, rank 1: expert_choice");

  // The slots per expert travel with the agreement: different num_experts make exchanges of
  // different lengths, which the collectives layer refuses on every rank.
  config = small_config(TokenDispatcherType::kAllToAll);
  if (odd) config.num_experts = 16;
  text = error_text([&] {
    make_token_dispatcher(config, parallel)->dispatch(Tensor({3, 4}), simple_routing(3, 2), ctx);
  });
  EXPECT_CONTAINS(text, "ranks called different collectives or sizes");
}

// Ranks out of step (rank 0 combines while the others dispatch again): the collectives layer's
// announcement check raises the mismatch on every rank, and the group stays usable.
TEST(ExpertParallelFailures, RanksOutOfStepMeetTheCollectivesCheck) {
  const comm::ParallelState& parallel = testing::parallel_state(world_size());
  for (TokenDispatcherType type : kTypes) {
    SCOPED_TRACE(std::string(name_of(type)));
    auto dispatcher = make_token_dispatcher(small_config(type), parallel);
    DispatchContext ctx;
    const Tensor rows = dispatcher->dispatch(Tensor({3, 4}), simple_routing(3, 2), ctx);
    const std::string text = error_text([&] {
      if (parallel.world_rank == 0) {
        dispatcher->combine(rows, ctx);
      } else {
        DispatchContext other;
        dispatcher->dispatch(Tensor({3, 4}), simple_routing(3, 2), other);
      }
    });
    EXPECT_CONTAINS(text, "on group 'tp_ep'");
    EXPECT_CONTAINS(text, "ranks called different collectives or sizes");
    DispatchContext again;
    EXPECT_NO_THROW(dispatcher->dispatch(Tensor({3, 4}), simple_routing(3, 2), again));
  }
}

TEST(ExpertParallelFailures, LayoutsTheDispatchersCannotServe) {
  EXPECT_EQ(error_text([] { expert_parallel_placement(6, 4, 0); }),
            "num_experts (6) is not divisible by expert_model_parallel_size (4)");
  if (world_size() < 4) return;
  MoEConfig config = small_config(TokenDispatcherType::kAllToAll);
  config.num_experts = 6;
  EXPECT_EQ(error_text([&] { make_token_dispatcher(config, testing::parallel_state(4)); }),
            "num_experts (6) is not divisible by expert_model_parallel_size (4)");
  comm::ParallelSizes sizes;
  sizes.ep = 2;
  sizes.etp = 2;
  const comm::ParallelState with_etp = comm::initialize_model_parallel(sizes);
  MoEConfig odd_ffn = small_config(TokenDispatcherType::kAllGather);
  odd_ffn.ffn_hidden_size = 5;
  EXPECT_EQ(error_text([&] { make_token_dispatcher(odd_ffn, with_etp); }),
            "AllGatherTokenDispatcher: the expert ffn size (5) is not divisible by "
            "expert_tensor_parallel_size (2)");
  // A layout it serves: the placement names this rank's ffn slice from the etp group.
  for (TokenDispatcherType type : kTypes) {
    const ExpertPlacement placement =
        make_token_dispatcher(small_config(type), with_etp)->placement();
    EXPECT_EQ(placement.tp_rank, with_etp.etp_group.rank());
    EXPECT_EQ(placement.tp_size, 2);
    EXPECT_EQ(placement.first, 4 * with_etp.ep_group.rank());
    EXPECT_EQ(placement.count, 4);
  }
}

TEST(ExpertParallelFailures, CombineWithoutDispatchIsRefused) {
  const comm::ParallelState& parallel = testing::parallel_state(world_size());
  for (TokenDispatcherType type : kTypes) {
    auto dispatcher = make_token_dispatcher(small_config(type), parallel);
    DispatchContext ctx;
    EXPECT_CONTAINS(error_text([&] {
                      dispatcher->combine(Tensor({1, 4}), ctx);
                    }),
                    "the dispatch context holds no forward state of this dispatcher");
  }
}

}  // namespace
}  // namespace moe

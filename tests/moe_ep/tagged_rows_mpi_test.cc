// Rank-tagged rows: every token's values encode its source rank and index, so where each row
// lands after dispatch, what combine sums and where every gradient goes can be checked by
// arithmetic (all values are exact in fp32). Both dispatchers, every ep size, dropless and with
// capacity padding.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "ep_test_util.h"
#include "moe/comm/process_group.h"
#include "moe/moe/capacity.h"
#include "moe/moe/ep_dispatchers.h"

namespace moe {
namespace {

constexpr int64_t kHidden = 4, kExperts = 8, kTopk = 2;

// Token t of group rank g: its value in column h, and its routing (two distinct experts, probs
// 1/2 and 1/4 so that weighted sums stay exact).
float token_value(int64_t g, int64_t t, int64_t h) {
  return float(1000 * g + 10 * t + h);
}
int32_t expert_of(int64_t g, int64_t t, int64_t slot) {
  const int64_t first = (3 * g + 5 * t) % kExperts;
  return int32_t(slot == 0 ? first : (first + 1 + t % 3) % kExperts);
}
float prob_of(int64_t slot) {
  return slot == 0 ? 0.5f : 0.25f;
}
// What the fake experts add to a row of global expert e.
float expert_offset(int64_t e) {
  return float(10000 * (e + 1));
}
float grad_value(int64_t g, int64_t t, int64_t h) {
  return float(1 + g + t) + 0.5f * float(h);
}

struct Token {
  int64_t group_rank, index;
};

// The routing of a group rank's tokens (or the whole group's, in global token order).
Routing routing_of(const std::vector<Token>& tokens) {
  Routing routing;
  routing.num_tokens = int64_t(tokens.size());
  routing.topk = kTopk;
  routing.experts = Tensor::empty({routing.num_tokens, kTopk}, DType::I32);
  routing.probs = Tensor::empty({routing.num_tokens, kTopk}, DType::F32);
  for (size_t i = 0; i < tokens.size(); ++i) {
    for (int64_t j = 0; j < kTopk; ++j) {
      routing.experts.data<int32_t>()[int64_t(i) * kTopk + j] =
          expert_of(tokens[i].group_rank, tokens[i].index, j);
      routing.probs.data<float>()[int64_t(i) * kTopk + j] = prob_of(j);
    }
  }
  return routing;
}

// The dispatcher of `type` for a layout. The factory refuses etp > 1 until the experts are split,
// so expert tensor parallel layouts build the dispatchers directly.
std::unique_ptr<TokenDispatcher> dispatcher_for(const MoEConfig& config,
                                                const comm::ParallelState& parallel) {
  if (parallel.sizes.etp == 1) return make_token_dispatcher(config, parallel);
  if (config.moe_token_dispatcher_type == TokenDispatcherType::kAllToAll) {
    return std::make_unique<AllToAllTokenDispatcher>(config, parallel);
  }
  return std::make_unique<AllGatherTokenDispatcher>(config, parallel);
}

// empty_rank: world rank 1 brings no tokens at all. With etp > 1 every etp rank of an expert
// gets all its rows and the fake experts return 1/etp of their output and input gradient (what a
// split expert's partial is), which the dispatcher must sum back to the whole.
void run_tagged(TokenDispatcherType type, const comm::ParallelState& parallel, bool capacity,
                bool empty_rank) {
  const comm::ProcessGroup& group = parallel.tp_ep_group;
  MoEConfig config;
  config.hidden_size = kHidden;
  config.num_experts = kExperts;
  config.ffn_hidden_size = 4;
  config.moe_router_topk = kTopk;
  config.moe_token_dispatcher_type = type;
  if (capacity) {
    config.moe_expert_capacity_factor = 0.75;
    config.moe_pad_expert_input_to_capacity = true;
  }
  std::unique_ptr<TokenDispatcher> dispatcher = dispatcher_for(config, parallel);
  const float partial = 1.0f / float(parallel.sizes.etp);
  const ExpertPlacement placement = dispatcher->placement();

  std::vector<Token> all, mine;
  size_t my_first = 0;  // my first token's index in the group's batch
  for (int g = 0; g < group.size(); ++g) {
    const int world_rank = group.world_ranks()[size_t(g)];
    const int64_t tokens = empty_rank && world_rank == 1 ? 0 : testing::tokens_of_rank(world_rank);
    if (g == group.rank()) my_first = all.size();
    for (int64_t t = 0; t < tokens; ++t) {
      all.push_back({g, t});
      if (g == group.rank()) mine.push_back({g, t});
    }
  }
  const Routing group_routing = routing_of(all);
  const CapacityDecision decision = decide_capacity(config, group_routing);
  const auto kept = [&](size_t token, int64_t slot) {
    return decision.keep.empty() || decision.keep[token * kTopk + size_t(slot)] != 0;
  };

  const int64_t T = int64_t(mine.size());
  Tensor hidden({T, kHidden});
  Tensor grad_output({T, kHidden});
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < kHidden; ++h) {
      hidden.set(t * kHidden + h, token_value(group.rank(), t, h));
      grad_output.set(t * kHidden + h, grad_value(group.rank(), t, h));
    }
  }

  // Dispatch: each local expert's rows are its kept tokens in global order, then zero padding.
  DispatchContext ctx;
  const Tensor rows = dispatcher->dispatch(hidden, routing_of(mine), ctx);
  ASSERT_EQ(ctx.tokens_per_local_expert.size(), size_t(placement.count));
  std::vector<int64_t> expert_of_row;                     // global expert of each row
  std::vector<std::pair<size_t, int64_t>> source_of_row;  // (token in all, slot); slot -1: pad
  for (int64_t l = 0; l < placement.count; ++l) {
    const int64_t e = placement.first + l;
    int64_t count = 0;
    for (size_t i = 0; i < all.size(); ++i) {
      for (int64_t j = 0; j < kTopk; ++j) {
        if (expert_of(all[i].group_rank, all[i].index, j) != e || !kept(i, j)) continue;
        source_of_row.push_back({i, j});
        expert_of_row.push_back(e);
        ++count;
      }
    }
    for (; decision.pad_rows_to > 0 && count < decision.pad_rows_to; ++count) {
      source_of_row.push_back({0, -1});
      expert_of_row.push_back(e);
    }
    EXPECT_EQ(ctx.tokens_per_local_expert[size_t(l)], count) << "expert " << e;
  }
  ASSERT_EQ(rows.dim(0), int64_t(source_of_row.size()));
  for (size_t r = 0; r < source_of_row.size(); ++r) {
    const auto [i, slot] = source_of_row[r];
    for (int64_t h = 0; h < kHidden; ++h) {
      const float expected = slot < 0 ? 0.0f : token_value(all[i].group_rank, all[i].index, h);
      ASSERT_EQ(rows.get(int64_t(r) * kHidden + h), expected)
          << "row " << r << " of expert " << expert_of_row[r] << " column " << h;
    }
  }

  // Combine: fake experts add their offset; the home rank sums probs * rows over kept slots.
  Tensor expert_output = rows.clone();
  for (size_t r = 0; r < expert_of_row.size(); ++r) {
    for (int64_t h = 0; h < kHidden; ++h) {
      const int64_t at = int64_t(r) * kHidden + h;
      expert_output.set(at, (expert_output.get(at) + expert_offset(expert_of_row[r])) * partial);
    }
  }
  const Tensor out = dispatcher->combine(expert_output, ctx);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < kHidden; ++h) {
      float expected = 0.0f;
      for (int64_t j = 0; j < kTopk; ++j) {
        if (!kept(my_first + size_t(t), j)) continue;
        expected += prob_of(j) * (token_value(group.rank(), t, h) +
                                  expert_offset(expert_of(group.rank(), t, j)));
      }
      ASSERT_EQ(out.get(t * kHidden + h), expected) << "token " << t << " column " << h;
    }
  }

  // combine_backward: d row = prob * d out of its token; d prob = <row output, d out>.
  Tensor grad_probs({T, kTopk});
  const Tensor grad_rows = dispatcher->combine_backward(grad_output, ctx, grad_probs);
  ASSERT_EQ(grad_rows.shape(), rows.shape());
  for (size_t r = 0; r < source_of_row.size(); ++r) {
    const auto [i, slot] = source_of_row[r];
    for (int64_t h = 0; h < kHidden; ++h) {
      const float expected =
          slot < 0 ? 0.0f : prob_of(slot) * grad_value(all[i].group_rank, all[i].index, h);
      ASSERT_EQ(grad_rows.get(int64_t(r) * kHidden + h), expected) << "gradient row " << r;
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < kTopk; ++j) {
      float expected = 0.0f;
      for (int64_t h = 0; kept(my_first + size_t(t), j) && h < kHidden; ++h) {
        expected +=
            (token_value(group.rank(), t, h) + expert_offset(expert_of(group.rank(), t, j))) *
            grad_value(group.rank(), t, h);
      }
      ASSERT_EQ(grad_probs.get(t * kTopk + j), expected) << "d prob of token " << t;
    }
  }

  // dispatch_backward: each token gets the sum of its kept rows' gradients; tag each row's
  // gradient with its expert so the sum names which rows arrived.
  Tensor expert_grads(rows.shape());
  for (size_t r = 0; r < expert_of_row.size(); ++r) {
    for (int64_t h = 0; h < kHidden; ++h) {
      expert_grads.set(int64_t(r) * kHidden + h, float(100 * (expert_of_row[r] + 1) + h) * partial);
    }
  }
  const Tensor grad_hidden = dispatcher->dispatch_backward(expert_grads, ctx);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < kHidden; ++h) {
      float expected = 0.0f;
      for (int64_t j = 0; j < kTopk; ++j) {
        if (kept(my_first + size_t(t), j)) {
          expected += float(100 * (expert_of(group.rank(), t, j) + 1) + h);
        }
      }
      ASSERT_EQ(grad_hidden.get(t * kHidden + h), expected) << "d hidden of token " << t;
    }
  }
}

class TaggedRows : public ::testing::TestWithParam<TokenDispatcherType> {};

TEST_P(TaggedRows, EveryRowArrivesWhereItShouldForEveryEpSize) {
  const int world_size = comm::ProcessGroup::world().size();
  std::vector<std::pair<int, int>> layouts;  // (ep, etp)
  for (int ep : testing::ep_sizes(world_size)) layouts.push_back({ep, 1});
  for (int ep : {2, 4}) {
    if (world_size % (2 * ep) == 0) layouts.push_back({ep, 2});
  }
  for (const auto& [ep, etp] : layouts) {
    for (bool capacity : {false, true}) {
      for (bool empty_rank : {false, true}) {
        SCOPED_TRACE("ep " + std::to_string(ep) + " etp " + std::to_string(etp) +
                     (capacity ? " capacity" : " dropless") +
                     (empty_rank ? ", world rank 1 without tokens" : ""));
        run_tagged(GetParam(), testing::parallel_state(ep, etp), capacity, empty_rank);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dispatchers, TaggedRows,
                         ::testing::Values(TokenDispatcherType::kAllToAll,
                                           TokenDispatcherType::kAllGather),
                         [](const auto& info) { return std::string(name_of(info.param)); });

}  // namespace
}  // namespace moe

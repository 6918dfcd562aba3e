#include "moe/moe/token_dispatcher.h"

#include "moe/dispatcher_common.h"
#include "moe/moe/expert_choice_router.h"

namespace moe {

CapacityDecision decide_capacity(const MoEConfig& config, const Routing& routing) {
  CapacityDecision decision;
  if (!config.moe_expert_capacity_factor) return decision;
  if (config.moe_router_type == RouterType::kExpertChoice) {
    return decide_expert_choice(config, routing);
  }
  int64_t capacity = expert_capacity(routing.num_tokens, routing.topk, config.num_experts,
                                     *config.moe_expert_capacity_factor);
  decision.keep =
      select_within_capacity(routing, config.num_experts, capacity, config.moe_token_drop_policy);
  if (config.moe_pad_expert_input_to_capacity) decision.pad_rows_to = capacity;
  return decision;
}

void check_dispatch_rows(const Tensor& rows, const DispatchContext& ctx, const char* what) {
  MOE_CHECK(ctx.routing.experts.defined(), what, ": the dispatch context holds no forward state");
  check_shape(rows, {ctx.plan.num_rows(), ctx.hidden_size}, what);
  check_dtype(rows, ctx.dtype, what);
}

LocalTokenDispatcher::LocalTokenDispatcher(const MoEConfig& config)
    : config_(config), placement_(ExpertPlacement::all(config.num_experts)) {
  config_.validate();
}

Tensor LocalTokenDispatcher::dispatch(const Tensor& hidden, const Routing& routing,
                                      DispatchContext& ctx) {
  check_ndim(hidden, 2, "LocalTokenDispatcher::dispatch hidden");
  MOE_CHECK(hidden.dim(0) == routing.num_tokens, "LocalTokenDispatcher::dispatch: hidden ",
            shape_string(hidden.shape()), " has ", hidden.dim(0), " tokens but the routing has ",
            routing.num_tokens);
  check_shape(routing.experts, {routing.num_tokens, config_.routing_slots()},
              "LocalTokenDispatcher::dispatch routing experts");
  ctx = DispatchContext{};
  ctx.routing = routing;
  ctx.hidden_size = hidden.dim(1);
  ctx.dtype = hidden.dtype();
  CapacityDecision capacity = decide_capacity(config_, routing);
  ctx.plan = build_dispatch_plan(routing.experts, config_.num_experts, 0, config_.num_experts,
                                 capacity.keep, capacity.pad_rows_to);
  ctx.tokens_per_local_expert = ctx.plan.rows_per_expert;
  ctx.unpadded_tokens_per_local_expert = unpadded_rows_per_expert(ctx.plan);
  Tensor rows = Tensor::empty({ctx.plan.num_rows(), ctx.hidden_size}, hidden.dtype());
  permute_rows(hidden, ctx.plan, Tensor(), rows);
  return rows;
}

Tensor LocalTokenDispatcher::combine(const Tensor& expert_output, DispatchContext& ctx) {
  check_dispatch_rows(expert_output, ctx, "LocalTokenDispatcher::combine expert output");
  return ep_detail::combine_home_rows(expert_output, ctx);
}

Tensor LocalTokenDispatcher::combine_backward(const Tensor& grad_output, DispatchContext& ctx,
                                              Tensor& grad_probs) {
  check_dispatch_rows(ctx.combine_rows, ctx, "LocalTokenDispatcher::combine_backward saved rows");
  return ep_detail::combine_backward_home_rows("LocalTokenDispatcher::combine_backward",
                                               grad_output, ctx, grad_probs);
}

Tensor LocalTokenDispatcher::dispatch_backward(const Tensor& grad_expert_input,
                                               DispatchContext& ctx) {
  check_dispatch_rows(grad_expert_input, ctx, "LocalTokenDispatcher::dispatch_backward gradient");
  return ep_detail::home_rows_to_grad_hidden(grad_expert_input, ctx);
}

}  // namespace moe

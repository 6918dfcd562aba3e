#include "moe/moe/token_dispatcher.h"

#include "moe/home_rows.h"

namespace moe {
namespace {

// Checks that a combine/dispatch argument matches what dispatch saw.
void check_dispatch_rows(const Tensor& rows, const DispatchContext& ctx, const char* what) {
  MOE_CHECK(ctx.routing.experts.defined(), what, ": the dispatch context holds no forward state");
  check_shape(rows, {ctx.plan.num_rows(), ctx.hidden_size}, what);
  check_dtype(rows, ctx.dtype, what);
}

}  // namespace

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
  return internal::combine_home_rows(expert_output, ctx);
}

Tensor LocalTokenDispatcher::combine_backward(const Tensor& grad_output, DispatchContext& ctx,
                                              Tensor& grad_probs) {
  check_dispatch_rows(ctx.combine_rows, ctx, "LocalTokenDispatcher::combine_backward saved rows");
  return internal::combine_backward_home_rows("LocalTokenDispatcher::combine_backward", grad_output,
                                              ctx, grad_probs);
}

Tensor LocalTokenDispatcher::dispatch_backward(const Tensor& grad_expert_input,
                                               DispatchContext& ctx) {
  check_dispatch_rows(grad_expert_input, ctx, "LocalTokenDispatcher::dispatch_backward gradient");
  return internal::home_rows_to_grad_hidden(grad_expert_input, ctx);
}

}  // namespace moe

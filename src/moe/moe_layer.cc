#include "moe/moe/moe_layer.h"

#include <algorithm>
#include <array>

#include "moe/comm/process_group.h"
#include "moe/internal.h"
#include "moe/moe/ep_dispatchers.h"
#include "moe/moe/expert_choice_router.h"

namespace moe {
namespace {

std::unique_ptr<TokenDispatcher> local_if_null(std::unique_ptr<TokenDispatcher> dispatcher,
                                               const MoEConfig& config) {
  config.validate();
  if (dispatcher) return dispatcher;
  return std::make_unique<LocalTokenDispatcher>(config);
}

}  // namespace

MoELayer::MoELayer(const MoEConfig& config, ParameterStore& store, const std::string& prefix,
                   std::unique_ptr<TokenDispatcher> dispatcher, uint64_t jitter_seed,
                   comm::TensorParallel tp, comm::ProcessGroup stage_group,
                   comm::ProcessGroup tp_cp_group)
    : config_(config),
      tp_(std::move(tp)),
      stage_group_(std::move(stage_group)),
      loss_group_(tp_cp_group.size() > tp_.size() ? std::move(tp_cp_group) : tp_.group),
      dispatcher_(local_if_null(std::move(dispatcher), config)),
      router_(config.moe_router_type == RouterType::kExpertChoice
                  ? expert_choice_scoring_config(config)
                  : config,
              store, prefix + ".router", jitter_seed),
      experts_(make_experts(config, store, prefix + ".experts", dispatcher_->placement())) {
  if (loss_group_.size() > 1) {
    router_.set_aux_count_reducer(make_aux_count_reducer(loss_group_));
    router_.set_z_loss_group_size(loss_group_.size());
  }
  if (config_.uses(LoadBalancingType::kGlobalAuxLoss)) {
    router_.set_global_aux_count_reducer(make_aux_count_reducer(stage_group_));
  }
}

void MoELayer::finish_step() {
  if (config_.moe_router_enable_expert_bias) router_.update_expert_bias(stage_group_);
  router_.reset_global_aux_loss_tracker();
}

std::vector<ParamHandle> MoELayer::tensor_parallel_partial_params() const {
  if (tp_.size() == 1) return {};
  return router_.params();
}

Tensor MoELayer::own_block(const Tensor& full) const {
  if (!splits_tokens()) return full;
  MOE_CHECK(full.dim(0) % tp_.size() == 0, "MoE layers with tensor parallelism split the ",
            "sequence over tp ranks: sequence length ", full.dim(0),
            " must be divisible by tensor_model_parallel_size (", tp_.size(), ")");
  const int64_t block = full.dim(0) / tp_.size();
  return full.rows(tp_.rank() * block, (tp_.rank() + 1) * block);
}

Tensor MoELayer::gather_blocks(const Tensor& own) const {
  if (!splits_tokens()) return own;
  Shape shape = own.shape();
  shape[0] *= tp_.size();
  Tensor full = Tensor::empty(shape, own.dtype());
  comm::all_gather(own, full, tp_.group);
  return full;
}

void MoELayer::init_parameters(uint64_t seed, float std, float output_std) {
  router_.init_parameters(seed, std);
  experts_->init_parameters(seed, std, output_std);
}

Tensor MoELayer::forward(const Tensor& hidden, MoEContext& ctx, bool training,
                         const RouterReplay* replay) {
  MOE_CHECK(hidden.ndim() == 2 || hidden.ndim() == 3, "MoELayer: input must be [T, H] or ",
            "[S, B, H], got ", shape_string(hidden.shape()));
  MOE_CHECK(hidden.dim(-1) == config_.hidden_size, "MoELayer: input ", shape_string(hidden.shape()),
            " has hidden size ", hidden.dim(-1), " but hidden_size is ", config_.hidden_size);
  const DType param_dtype = router_.weight().dtype();
  MOE_CHECK(hidden.dtype() == param_dtype, "MoELayer: input is ", dtype_name(hidden.dtype()),
            " but the parameters are ", dtype_name(param_dtype));
  ctx = MoEContext{};
  ctx.input_shape = hidden.shape();
  ctx.dtype = hidden.dtype();
  ctx.training = training;
  const Tensor own = own_block(hidden);
  const Tensor tokens = own.reshape({-1, config_.hidden_size});
  Routing routing = router_.forward(own, ctx.router, training, replay);
  Tensor rows = dispatcher_->dispatch(tokens, routing, ctx.dispatch);
  // The loads are the slots the dispatcher kept: its capacity decision may span several ranks.
  if (training && replay == nullptr && router_.has_expert_bias()) {
    router_.count_routed_tokens(routing, ctx.dispatch.plan.row_of_slot);
  }
  Tensor expert_output = experts_->forward(rows, ctx.dispatch.tokens_per_local_expert, ctx.experts);
  Tensor output = dispatcher_->combine(expert_output, ctx.dispatch);
  ctx.losses = ctx.router.losses;
  if (loss_group_.size() > 1 &&
      training) {  // each tp x cp rank's losses are its tokens' share of the micro-batch's
    std::array<double, RouterLosses::kCount> values = ctx.losses.values();
    Tensor buffer({int64_t(values.size())}, DType::F64);
    std::copy(values.begin(), values.end(), buffer.data<double>());
    comm::all_reduce(buffer, loss_group_);
    std::copy_n(buffer.data<double>(), values.size(), values.begin());
    ctx.losses = RouterLosses::from_values(values);
  }
  ctx.has_saved_state = true;
  return gather_blocks(output.reshape(own.shape())).reshape(hidden.shape());
}

Tensor MoELayer::backward(MoEContext& ctx, const Tensor& grad_output, double aux_loss_grad_scale) {
  MOE_CHECK(ctx.has_saved_state,
            "MoELayer::backward: the context holds no forward state (forward not run, or "
            "backward already consumed it)");
  check_shape(grad_output, ctx.input_shape, "MoELayer::backward grad_output");
  check_dtype(grad_output, ctx.dtype, "MoELayer::backward grad_output");
  // Every tp rank holds the same grad_output when the layer splits tokens: its block is its share.
  const Tensor grad_own = own_block(grad_output);
  const Tensor grad_tokens = grad_own.reshape({-1, config_.hidden_size});
  Tensor grad_probs = Tensor::empty(ctx.router.routing.probs.shape(),
                                    internal::compute_dtype_for(grad_output.dtype()));
  Tensor grad_expert_output = dispatcher_->combine_backward(grad_tokens, ctx.dispatch, grad_probs);
  Tensor grad_rows = experts_->backward(ctx.experts, grad_expert_output);
  grad_expert_output = Tensor();
  Tensor grad_hidden =
      dispatcher_->dispatch_backward(grad_rows, ctx.dispatch).reshape(grad_own.shape());
  // With context parallelism the cp ranks' router gradients are averaged over dp x cp like
  // every dense gradient, so each carries cp times its share (Megatron scales the aux-loss
  // gradient by the cp size as it scales the lm loss).
  const double cp = double(loss_group_.size() / tp_.size());
  router_.backward(ctx.router, grad_probs, grad_hidden, aux_loss_grad_scale * cp);
  ctx.has_saved_state = false;
  return gather_blocks(grad_hidden).reshape(ctx.input_shape);
}

}  // namespace moe

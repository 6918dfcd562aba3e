// Layout equivalence under mpirun: the same 2-layer model (layer 0 MoE, layer 1 dense; with
// multi-token prediction, layer 1 and the MTP layers MoE; or 3 layers {dense, MoE, MoE}, with
// shared experts) and the same global batch give the same loss and
// the same (reduced) gradients in every (tp, sp, ep) layout as on one process. Each rank also runs
// the single-process model and compares its own parameter blocks. Data parallelism splits the
// global batch's sequences; dense gradients are summed over dp and expert gradients over expert-dp,
// as the optimizer does. The single process runs dp rank d's sequences as its micro-batch d, so
// hidden and attention dropout, the aux loss and the z-loss are on in every layout, dp > 1
// included; each rank's aux and z losses are compared with its micro-batch's.
//
// Tolerance (fp32, different reduction orders): loss |diff| <= 1e-5 * loss; every gradient
// element |diff| <= 1e-5 * max|block| + 1e-4 * |reference| (see check_layout); bf16 from u = 2^-8
// (see check_layout).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "model_testing.h"
#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "moe/model/tensor_parallel.h"
#include "support/testing.h"

namespace moe::model {
namespace {

struct Layout {
  int tp;
  bool sp;
  int ep;
  bool recompute = false;  // --recompute-granularity full
  // LayerNorm, learned absolute positions, GeLU, biases, tied embeddings: the parameters whose
  // gradients sequence parallelism must sum over tp (norm biases, row-parallel biases, position
  // embeddings) and the tied output layer.
  bool other_switches = false;
  DType dtype = DType::F32;  // BF16: compared to a bf16 single process, loosely (see below)
  // Qwen / DeepSeek attention: q_layernorm and k_layernorm (replicated, each tp rank's gradient
  // covers its own heads only), a linear_qkv bias without the other biases, and YaRN.
  bool qk_norm_qkv_bias_yarn = false;
  // Multi-token prediction depths; with MTP, layer 1 (and so every MTP layer) is the MoE one.
  int mtp_num_layers = 0;
  // Shared experts in the MoE layers (width 8, split over tp like the dense MLP), with or without
  // the sigmoid gate, and DeepSeek's first-k-dense pattern: 3 layers {dense, MoE, MoE}.
  enum SharedExperts { kNone, kUngated, kGated } shared_experts = kNone;
  bool first_layer_dense = false;
  // Multi-latent attention (compressed queries, qk_layernorm) instead of GQA: replicated down
  // projections and latent norms whose gradients sequence parallelism must sum over tp.
  bool mla = false;
  // Context parallelism: each sequence split over cp ranks in Megatron's 2 x cp load-balanced
  // chunks; attention all-gathers K/V over cp.
  int cp = 1;
  // seq_aux_loss instead of aux_loss: per-sequence counts, each sequence's shards being on the
  // tp x cp ranks.
  bool seq_aux_loss = false;
  // --recompute-granularity selective with every module moecore implements.
  bool selective_recompute = false;
};

std::string describe(const Layout& l) {
  return "(tp " + std::to_string(l.tp) + ", sp " + (l.sp ? "on" : "off") + ", ep " +
         std::to_string(l.ep) + (l.recompute ? ", full recomputation" : "") +
         (l.other_switches ? ", LayerNorm/learned/GeLU/bias/tied" : "") +
         (l.dtype != DType::F32 ? ", " + std::string(dtype_name(l.dtype)) : "") +
         (l.qk_norm_qkv_bias_yarn ? ", qk-layernorm/qkv-bias/yarn" : "") +
         (l.mtp_num_layers > 0 ? ", mtp " + std::to_string(l.mtp_num_layers) : "") +
         (l.shared_experts == Layout::kUngated ? ", shared experts"
          : l.shared_experts == Layout::kGated ? ", gated shared experts"
                                               : "") +
         (l.first_layer_dense ? ", layers {dense, MoE, MoE}" : "") +
         (l.mla ? ", multi-latent attention" : "") +
         (l.cp > 1 ? ", cp " + std::to_string(l.cp) : "") +
         (l.seq_aux_loss ? ", seq_aux_loss" : "") +
         (l.selective_recompute ? ", selective recomputation" : "") + ")";
}

TransformerConfig equivalence_config() {
  TransformerConfig c;
  c.num_layers = 2;
  c.hidden_size = 16;
  c.num_attention_heads = 8;
  c.kv_channels = 4;
  c.group_query_attention = true;
  c.num_query_groups = 4;
  c.ffn_hidden_size = 16;
  c.padded_vocab_size = 16;
  c.seq_length = 8;
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  c.swiglu = true;
  c.add_bias_linear = false;
  c.untie_embeddings_and_output_weights = true;
  c.num_experts = 4;
  c.moe_layer_pattern = {1, 0};
  c.moe.moe_router_topk = 2;
  c.moe.moe_grouped_gemm = true;
  return c;
}

void check_layout(const Layout& layout, TokenDispatcherType dispatcher) {
  comm::ParallelState state =
      comm::initialize_model_parallel({layout.tp, 1, layout.ep, 1, layout.cp});
  TransformerConfig config = equivalence_config();
  config.sequence_parallel = layout.sp;
  config.moe.moe_token_dispatcher_type = dispatcher;
  // With context parallelism: 2 x cp chunks of 3 positions, odd so a chunk is no power of two.
  if (layout.cp > 1) config.seq_length = 6 * layout.cp;
  if (layout.recompute) config.recompute_granularity = "full";
  if (layout.seq_aux_loss)
    config.moe.moe_router_load_balancing_type = LoadBalancingType::kSeqAuxLoss;
  if (layout.selective_recompute) {
    config.recompute_granularity = "selective";
    config.recompute_modules = {"core_attn", "moe_act", "layernorm",
                                "mlp",       "moe",     "shared_experts"};
  }
  if (layout.mtp_num_layers > 0) {
    config.mtp_num_layers = layout.mtp_num_layers;
    config.moe_layer_pattern = {0, 1};
  }
  if (layout.other_switches) {
    config.normalization = "LayerNorm";
    config.position_embedding_type = "learned_absolute";
    config.swiglu = false;
    config.add_bias_linear = true;
    config.untie_embeddings_and_output_weights = false;
  }
  if (layout.qk_norm_qkv_bias_yarn) {
    config.qk_layernorm = true;
    config.add_qkv_bias = true;  // matters when add_bias_linear is off (not other_switches)
    config.position_embedding_type = "yarn";
    config.rotary_scaling_factor = 4;
    config.yarn_original_max_position_embeddings = 4;  // shorter than seq_length 8
    config.mscale_all_dim = 0.5;                       // an attention factor other than 1
  }
  if (layout.shared_experts != Layout::kNone) {
    config.moe_shared_expert_intermediate_size = 8;
    config.moe_shared_expert_gate = layout.shared_experts == Layout::kGated;
  }
  if (layout.first_layer_dense) {
    config.num_layers = 3;
    config.moe_layer_pattern = {0, 1, 1};
  }
  if (layout.mla) {
    config.group_query_attention = false;
    config.multi_latent_attention = true;
    config.q_lora_rank = 6;
    config.kv_lora_rank = 5;
    config.qk_head_dim = 2;
    config.qk_pos_emb_head_dim = 2;
    config.v_head_dim = 3;
    config.qk_layernorm = true;
    config.rope_type = "yarn";  // Megatron's MLA default, here with an attention factor
    config.rotary_scaling_factor = 4;
    config.mscale_all_dim = 0.5;
  }
  // The single process runs the global batch as dp micro-batches, dp rank d's sequences in
  // micro-batch d, accumulating gradients with d(loss) = 1 / dp as the dp ranks' reduced
  // gradients do. Dropout masks follow a micro-batch's own (row, head) indices and the aux and
  // z losses are per micro-batch (as Megatron's), so dropout, aux and z losses are on in every
  // layout and each dp rank's losses are those of its micro-batch.
  config.hidden_dropout = config.attention_dropout = 0.1f;
  config.moe.moe_aux_loss_coeff = 0.01;
  config.moe.moe_z_loss_coeff = 0.001;
  if (layout.tp > config.num_query_groups) config.num_query_groups = layout.tp;  // tp 8
  const int64_t local_batch = 2, global_batch = local_batch * state.dp;
  Tensor tokens =
      testing::random_tokens(global_batch, config.seq_length, config.padded_vocab_size, 11);
  Tensor labels =
      testing::random_tokens(global_batch, config.seq_length, config.padded_vocab_size, 12);

  ParameterStore reference_store(layout.dtype);
  TransformerConfig single = config;
  single.sequence_parallel = false;
  GPTModel reference(single, comm::single_process_state(), reference_store);
  reference_store.allocate();
  reference.init_parameters(21);
  const int dp_rank = state.dp_group.rank();
  double reference_loss = 0;
  std::vector<MoELossReport> reference_ctx_losses;
  std::vector<MTPLossReport> reference_mtp_losses;
  for (int d = 0; d < state.dp; ++d) {
    GPTContext reference_ctx;
    reference_ctx.dropout_seed = 5;
    reference_loss +=
        reference.forward(tokens.rows(d * local_batch, (d + 1) * local_batch),
                          labels.rows(d * local_batch, (d + 1) * local_batch), reference_ctx) /
        state.dp;
    if (d == dp_rank) {
      reference_ctx_losses = reference_ctx.moe_losses;
      reference_mtp_losses = reference_ctx.mtp_losses;
    }
    reference.backward(reference_ctx, 1.0f / float(state.dp));
  }

  ParameterStore store(layout.dtype);
  auto model = std::make_unique<GPTModel>(config, state, store);
  store.allocate();
  // The same seed initialises every layout to the same global weights.
  model->init_parameters(21);
  for (int i = 0; i < store.count(); ++i) {
    const ParamSpec& spec = store.spec(ParamHandle{i});
    Tensor expected(spec.shape);
    copy_global_block(reference_store.param(reference_store.find(spec.name)), spec, expected);
    EXPECT_TENSORS_CLOSE(store.param(ParamHandle{i}), expected, 0, 0)
        << describe(layout) << " initial " << spec.name;
  }
  int64_t first = dp_rank * local_batch;
  GPTContext ctx;
  ctx.dropout_seed = 5;
  const comm::ContextParallel cp = state.context_parallel();
  double loss =
      model->forward(split_for_context_parallel(tokens.rows(first, first + local_batch), cp),
                     split_for_context_parallel(labels.rows(first, first + local_batch), cp), ctx);
  ASSERT_EQ(ctx.moe_losses.size(), reference_ctx_losses.size());
  for (size_t i = 0; i < ctx.moe_losses.size(); ++i) {
    const RouterLosses& got = ctx.moe_losses[i].losses;
    const RouterLosses& expected = reference_ctx_losses[i].losses;
    EXPECT_NEAR(got.load_balancing_loss, expected.load_balancing_loss,
                1e-6 + 1e-5 * std::abs(expected.load_balancing_loss))
        << "load_balancing_loss of layer " << ctx.moe_losses[i].layer;
    EXPECT_NEAR(got.z_loss, expected.z_loss, 1e-6 + 1e-5 * std::abs(expected.z_loss))
        << "z_loss of layer " << ctx.moe_losses[i].layer;
  }
  ASSERT_EQ(ctx.mtp_losses.size(), reference_mtp_losses.size());
  for (size_t i = 0; i < ctx.mtp_losses.size(); ++i) {
    EXPECT_NEAR(ctx.mtp_losses[i].loss, reference_mtp_losses[i].loss,
                1e-5 * reference_mtp_losses[i].loss)
        << describe(layout) << " mtp_" << ctx.mtp_losses[i].depth << " loss";
  }
  model->backward(ctx, 1.0f / float(state.dp));
  model->finalize_grads();

  Tensor mean_loss = Tensor::full({1}, 0.0f, DType::F64);
  mean_loss.data<double>()[0] = loss / state.dp;
  comm::all_reduce(mean_loss, state.dp_group);
  // bf16 (activations rounded to bf16 after every operation, sums in fp32): a layout changes
  // where partial sums are rounded to bf16: the tp partial sums of the row-parallel linears
  // (attention projection, dense fc2) in forward and of the column-parallel ones' input
  // gradients (qkv, fc1) in backward, S = 4 places per layer. Each rounding is a relative error
  // of at most u = 2^-8, uniform in [-u, u] (standard deviation u / sqrt(3)); independent ones
  // add in quadrature, so a value downstream of all S places carries a relative error of about
  // sigma = u * sqrt(S / 3) (0.64 % for 2 layers; measured up to 0.71 % on a gradient block).
  // Each gradient block's 2-norm error is checked against 4 sigma of its 2-norm; the loss is a
  // mean over the batch's N tokens whose errors are independent, so against 4 sigma / sqrt(N)
  // of the loss (measured 4e-6 relative).
  const bool half = layout.dtype != DType::F32;
  constexpr double kBf16UnitRoundoff = 1.0 / 256;  // 2^-8
  const double bf16_sigma = kBf16UnitRoundoff * std::sqrt(4.0 * config.num_layers / 3.0);
  const double loss_tokens = double(global_batch * config.seq_length);
  EXPECT_NEAR(mean_loss.data<double>()[0], reference_loss,
              (half ? 4 * bf16_sigma / std::sqrt(loss_tokens) : 1e-5) * reference_loss)
      << describe(layout);
  testing::compare_reduced_gradients(
      store, state, reference_store,
      [&](const ParamSpec& spec, const Tensor& got, const Tensor& expected) {
        std::vector<float> got_values = got.to_floats(), want = expected.to_floats();
        if (half) {
          double error = 0, norm = 0;
          for (size_t j = 0; j < got_values.size(); ++j) {
            error += double(got_values[j] - want[j]) * double(got_values[j] - want[j]);
            norm += double(want[j]) * double(want[j]);
          }
          EXPECT_LE(std::sqrt(error), 4 * bf16_sigma * std::sqrt(norm))
              << describe(layout) << " gradient of " << spec.name;
          return;
        }
        // fp32: the layouts add a gradient's per-token terms in other orders (tp and sp partial
        // sums, the dp reduction); reordering n <= 64 terms moves the sum by up to n * 2^-24
        // (4e-6) of the terms' size, for which the block's largest element stands: 1e-5 of it
        // absolute, beside 1e-4 relative.
        double largest = 0;
        for (float value : want) largest = std::max(largest, double(std::abs(value)));
        EXPECT_TENSORS_CLOSE(got, expected, 1e-5 * largest, 1e-4)
            << describe(layout) << " gradient of " << spec.name << " on world rank "
            << state.world_rank;
      });
}

// Each layout runs on the world size it was written for (the ctest entries np1, np2, np4, np8).
void run_on_world(int world, const Layout& layout) {
  if (comm::ProcessGroup::world().size() != world) {
    GTEST_SKIP() << describe(layout) << " runs on " << world << " ranks";
  }
  for (TokenDispatcherType dispatcher :
       {TokenDispatcherType::kAllGather, TokenDispatcherType::kAllToAll}) {
    SCOPED_TRACE(std::string(name_of(dispatcher)) + " dispatcher");
    check_layout(layout, dispatcher);
    if (layout.ep == 1) break;  // the dispatcher type matters only with expert parallelism
  }
}

TEST(ParallelEquivalence, Tp1SpOffEp1) {
  run_on_world(1, {1, false, 1});
}
TEST(ParallelEquivalence, Tp2SpOffEp1) {
  run_on_world(2, {2, false, 1});
}
TEST(ParallelEquivalence, Tp2SpOnEp1) {
  run_on_world(2, {2, true, 1});
}
TEST(ParallelEquivalence, Tp2SpOnEp1WithRecomputation) {
  run_on_world(2, {2, true, 1, true});
}
TEST(ParallelEquivalence, Tp2SpOnEp2WithSelectiveRecomputation) {
  Layout layout{2, true, 2};
  layout.shared_experts = Layout::kGated;
  layout.selective_recompute = true;
  run_on_world(4, layout);
}
TEST(ParallelEquivalence, Tp2SpOnEp1OtherSwitches) {
  run_on_world(2, {2, true, 1, false, true});
}
TEST(ParallelEquivalence, Tp2SpOnEp2OtherSwitches) {
  run_on_world(4, {2, true, 2, false, true});
}
TEST(ParallelEquivalence, Tp2SpOnEp2Bf16) {
  run_on_world(4, {2, true, 2, false, false, DType::BF16});
}
TEST(ParallelEquivalence, Tp1SpOffEp2Dp2) {
  run_on_world(2, {1, false, 2});
}
TEST(ParallelEquivalence, Tp2SpOnEp2) {
  run_on_world(4, {2, true, 2});
}
TEST(ParallelEquivalence, Tp1SpOffEp4) {
  run_on_world(4, {1, false, 4});
}
TEST(ParallelEquivalence, Tp4SpOnEp1) {
  run_on_world(4, {4, true, 1});
}
TEST(ParallelEquivalence, Tp2SpOffEp1Dp2) {
  run_on_world(4, {2, false, 1});
}
TEST(ParallelEquivalence, Tp4SpOnEp2) {
  run_on_world(8, {4, true, 2});
}
TEST(ParallelEquivalence, Tp8SpOnEp1) {
  run_on_world(8, {8, true, 1});
}
TEST(ParallelEquivalence, Tp2SpOnEp2Dp4) {
  run_on_world(8, {2, true, 2});
}
TEST(ParallelEquivalence, Tp1SpOffEp4Dp8WithRecomputation) {
  run_on_world(8, {1, false, 4, true});
}

TEST(ParallelEquivalence, Tp2SpOffEp1MultiLatentAttention) {
  run_on_world(2, {.tp = 2, .sp = false, .ep = 1, .mla = true});
}
TEST(ParallelEquivalence, Tp2SpOnEp1MultiLatentAttention) {
  run_on_world(2, {.tp = 2, .sp = true, .ep = 1, .mla = true});
}
TEST(ParallelEquivalence, Tp2SpOnEp2MultiLatentAttentionOtherSwitches) {
  run_on_world(4, {.tp = 2, .sp = true, .ep = 2, .other_switches = true, .mla = true});
}
TEST(ParallelEquivalence, Tp4SpOnEp2MultiLatentAttention) {
  run_on_world(8, {.tp = 4, .sp = true, .ep = 2, .mla = true});
}
TEST(ParallelEquivalence, Tp2SpOnEp1MultiLatentAttentionWithMtp) {  // DeepSeek-V3's shape
  run_on_world(2, {.tp = 2, .sp = true, .ep = 1, .mtp_num_layers = 1, .mla = true});
}
TEST(ParallelEquivalence, Tp2SpOffEp1QkNormQkvBiasYarn) {
  run_on_world(2, {2, false, 1, false, false, DType::F32, true});
}
TEST(ParallelEquivalence, Tp2SpOnEp1QkNormQkvBiasYarn) {
  run_on_world(2, {2, true, 1, false, false, DType::F32, true});
}
TEST(ParallelEquivalence, Tp2SpOnEp1OtherSwitchesQkNormYarn) {  // LayerNorm q/k norms with biases
  run_on_world(2, {2, true, 1, false, true, DType::F32, true});
}
TEST(ParallelEquivalence, Tp4SpOnEp1QkNormQkvBiasYarn) {
  run_on_world(4, {4, true, 1, false, false, DType::F32, true});
}
TEST(ParallelEquivalence, Tp2SpOffEp1Mtp2) {
  run_on_world(2, {2, false, 1, false, false, DType::F32, false, 2});
}
TEST(ParallelEquivalence, Tp2SpOnEp1Mtp2WithRecomputation) {
  run_on_world(2, {2, true, 1, true, false, DType::F32, false, 2});
}
TEST(ParallelEquivalence, Tp1SpOffEp2Dp2Mtp1) {
  run_on_world(2, {1, false, 2, false, false, DType::F32, false, 1});
}
TEST(ParallelEquivalence, Tp2SpOnEp2Mtp1) {
  run_on_world(4, {2, true, 2, false, false, DType::F32, false, 1});
}
TEST(ParallelEquivalence, Tp4SpOnEp1Mtp2) {
  run_on_world(4, {4, true, 1, false, false, DType::F32, false, 2});
}

// Shared experts: ungated and gated (the gate weight is replicated over tp; with sequence
// parallelism its gradient is summed over tp), with and without the first layer dense.
TEST(ParallelEquivalence, Tp1SpOffEp1GatedSharedExpertsFirstLayerDense) {
  run_on_world(
      1,
      {.tp = 1, .sp = false, .ep = 1, .shared_experts = Layout::kGated, .first_layer_dense = true});
}
TEST(ParallelEquivalence, Tp2SpOffEp1GatedSharedExperts) {
  run_on_world(2, {.tp = 2, .sp = false, .ep = 1, .shared_experts = Layout::kGated});
}
TEST(ParallelEquivalence, Tp2SpOnEp1GatedSharedExperts) {
  run_on_world(2, {.tp = 2, .sp = true, .ep = 1, .shared_experts = Layout::kGated});
}
TEST(ParallelEquivalence, Tp1SpOffEp2Dp2SharedExpertsFirstLayerDense) {
  run_on_world(2, {.tp = 1,
                   .sp = false,
                   .ep = 2,
                   .shared_experts = Layout::kUngated,
                   .first_layer_dense = true});
}
TEST(ParallelEquivalence, Tp2SpOnEp2GatedSharedExpertsFirstLayerDense) {
  run_on_world(
      4,
      {.tp = 2, .sp = true, .ep = 2, .shared_experts = Layout::kGated, .first_layer_dense = true});
}
TEST(ParallelEquivalence, Tp2SpOffEp1Dp2SharedExperts) {
  run_on_world(4, {.tp = 2, .sp = false, .ep = 1, .shared_experts = Layout::kUngated});
}
TEST(ParallelEquivalence, Tp4SpOnEp2GatedSharedExpertsFirstLayerDense) {
  run_on_world(
      8,
      {.tp = 4, .sp = true, .ep = 2, .shared_experts = Layout::kGated, .first_layer_dense = true});
}

// Context parallelism: the loss (mean over the whole sequence), the router losses (counts over
// tp x cp) and every gradient (averaged over dp x cp, each cp rank's scaled by cp) match one
// process; dropout is on whenever dp == 1, so the global-row masks are checked too.
TEST(ParallelEquivalence, Cp2) {
  run_on_world(2, {.tp = 1, .sp = false, .ep = 1, .cp = 2});
}
TEST(ParallelEquivalence, Cp2WithRecomputation) {
  run_on_world(2, {.tp = 1, .sp = false, .ep = 1, .recompute = true, .cp = 2});
}
TEST(ParallelEquivalence, Cp2OtherSwitches) {  // learned absolute positions at global positions
  run_on_world(2, {.tp = 1, .sp = false, .ep = 1, .other_switches = true, .cp = 2});
}
TEST(ParallelEquivalence, Cp2QkNormQkvBiasYarn) {
  run_on_world(2, {.tp = 1, .sp = false, .ep = 1, .qk_norm_qkv_bias_yarn = true, .cp = 2});
}
TEST(ParallelEquivalence, Cp2SeqAuxLoss) {
  run_on_world(2, {.tp = 1, .sp = false, .ep = 1, .cp = 2, .seq_aux_loss = true});
}
TEST(ParallelEquivalence, Tp2SpOnCp2SeqAuxLoss) {
  run_on_world(4, {.tp = 2, .sp = true, .ep = 1, .cp = 2, .seq_aux_loss = true});
}
TEST(ParallelEquivalence, Cp2Ep2) {  // expert data parallel 1: the cp ranks are the ep ranks
  run_on_world(2, {.tp = 1, .sp = false, .ep = 2, .cp = 2});
}
TEST(ParallelEquivalence, Cp2Ep2Dp2) {
  run_on_world(4, {.tp = 1, .sp = false, .ep = 2, .cp = 2});
}
TEST(ParallelEquivalence, Cp4) {
  run_on_world(4, {.tp = 1, .sp = false, .ep = 1, .cp = 4});
}
TEST(ParallelEquivalence, Tp2SpOnCp2) {
  run_on_world(4, {.tp = 2, .sp = true, .ep = 1, .cp = 2});
}
TEST(ParallelEquivalence, Tp2SpOffCp2) {
  run_on_world(4, {.tp = 2, .sp = false, .ep = 1, .cp = 2});
}
TEST(ParallelEquivalence, Tp2SpOnCp2Ep2) {
  run_on_world(4, {.tp = 2, .sp = true, .ep = 2, .cp = 2});
}
TEST(ParallelEquivalence, Tp2SpOnCp2Ep4) {
  run_on_world(8, {.tp = 2, .sp = true, .ep = 4, .cp = 2});
}

TEST(ParallelEquivalence, RefusesMultiLatentAttentionAndMtpWithContextParallelism) {
  if (comm::ProcessGroup::world().size() != 2) GTEST_SKIP() << "runs on 2 ranks";
  comm::ParallelState state = comm::initialize_model_parallel({.cp = 2});
  TransformerConfig mla = equivalence_config();
  mla.group_query_attention = false;
  mla.multi_latent_attention = true;
  mla.q_lora_rank = 6;
  mla.kv_lora_rank = 5;
  mla.qk_head_dim = 2;
  mla.qk_pos_emb_head_dim = 2;
  mla.v_head_dim = 3;
  ParameterStore store;
  EXPECT_EQ(moe::testing::error_text([&] { GPTModel model(mla, state, store); }),
            "--multi-latent-attention is not supported with --context-parallel-size (2) > 1");
  TransformerConfig mtp = equivalence_config();
  mtp.mtp_num_layers = 1;
  EXPECT_EQ(moe::testing::error_text([&] { GPTModel model(mtp, state, store); }),
            "--mtp-num-layers (1) is not supported with --context-parallel-size (2) > 1");
  TransformerConfig odd = equivalence_config();
  odd.seq_length = 10;
  EXPECT_EQ(moe::testing::error_text([&] { GPTModel model(odd, state, store); }),
            "--seq-length (10) must be divisible by 2 x --context-parallel-size (4): each cp rank "
            "holds two of the 2 x cp load-balanced chunks");
}

TEST(ParallelEquivalence, RefusesMoEWithExpertAndTensorParallelismWithoutSequenceParallelism) {
  int world = comm::ProcessGroup::world().size();
  if (world < 4) GTEST_SKIP() << "needs 4 ranks";
  comm::ParallelState state = comm::initialize_model_parallel({2, 1, 2, 1, 1});
  ParameterStore store;
  EXPECT_EQ(moe::testing::error_text([&] { GPTModel model(equivalence_config(), state, store); }),
            "MoE layers with expert parallelism (expert_model_parallel_size = 2) and tensor "
            "parallelism (tensor_model_parallel_size = 2) require sequence parallelism: add "
            "--sequence-parallel (as Megatron-Core does)");
}

}  // namespace
}  // namespace moe::model

#include "moe/train/layout_plan.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string_view>

#include "moe/data/tokenizer.h"
#include "moe/model/config.h"
#include "moe/pipeline/schedules.h"
#include "moe/tensor/error.h"
#include "moe/tensor/gemm.h"
#include "moe/tensor/tensor.h"
#include "moe/train/trainer.h"

namespace moe::train {
namespace {

using model::TransformerConfig;

// The sizes one rank sees, from the model configuration and the layout.
struct Shapes {
  const TransformerConfig& c;
  Layout layout;
  int64_t seq, batch, param_bytes;
  bool sequence_parallel;  // the model's: only with tp > 1
  int64_t rows_full() const { return seq * batch; }
  int64_t rows_local() const { return sequence_parallel ? rows_full() / layout.tp : rows_full(); }
  // Tokens each rank routes: the MoE layer splits them over tp with or without sequence
  // parallelism.
  int64_t moe_tokens() const { return rows_full() / layout.tp; }
  int64_t heads_local() const { return c.num_attention_heads / layout.tp; }
  int64_t groups_local() const { return c.query_groups() / layout.tp; }
  int64_t norm_params(int64_t width) const {
    return c.normalization == "LayerNorm" ? 2 * width : width;
  }
  int64_t norm_stat_bytes(int64_t rows) const {  // inv_std (and mean) [rows] F32
    return (c.normalization == "LayerNorm" ? 8 : 4) * rows;
  }
  int64_t compute_bytes() const { return param_bytes == 8 ? 8 : 4; }
  int64_t fc1_width(int64_t ffn) const { return c.swiglu ? 2 * ffn : ffn; }
  int64_t expert_ffn_local() const { return c.moe_config().expert_ffn_hidden_size() / layout.etp; }
  // Rows each rank's experts run: its share of the group's slots (balanced), all of them for
  // every etp rank of an expert.
  int64_t expert_rows() const { return moe_tokens() * c.moe.moe_router_topk * layout.etp; }
};

// ---- parameters (elements of this rank's dense and expert flat buffers)

int64_t attention_params(const Shapes& s) {
  const TransformerConfig& c = s.c;
  const int64_t h = c.hidden_size, tp = s.layout.tp, bias_h = c.add_bias_linear ? h : 0;
  if (c.multi_latent_attention) {
    const int64_t n = c.num_attention_heads, kv = c.kv_lora_rank, pe = c.qk_pos_emb_head_dim;
    int64_t count = h * (kv + pe) + kv * n * (c.qk_head_dim + c.v_head_dim) / tp +
                    n * c.v_head_dim / tp * h + bias_h;
    const int64_t query = n * (c.qk_head_dim + pe) / tp;
    if (c.q_lora_rank > 0) {
      count += h * c.q_lora_rank + c.q_lora_rank * query;
      if (c.qk_layernorm) count += s.norm_params(c.q_lora_rank);
    } else {
      count += h * query;
    }
    if (c.qk_layernorm) count += s.norm_params(kv);
    return count;
  }
  const int64_t d = c.head_dim(), qkv = (c.num_attention_heads + 2 * c.query_groups()) * d / tp;
  int64_t count = h * qkv + c.num_attention_heads * d / tp * h + bias_h;
  if (c.add_bias_linear || c.add_qkv_bias) count += qkv;
  if (c.qk_layernorm) count += 2 * s.norm_params(d);
  return count;
}

int64_t mlp_params(const Shapes& s, int64_t ffn) {
  const int64_t h = s.c.hidden_size, fc1 = s.fc1_width(ffn) / s.layout.tp;
  return h * fc1 + ffn / s.layout.tp * h + (s.c.add_bias_linear ? fc1 + h : 0);
}

void count_layer_params(const Shapes& s, int layer, int64_t& dense, int64_t& expert) {
  const TransformerConfig& c = s.c;
  const int64_t h = c.hidden_size;
  dense += 2 * s.norm_params(h) + attention_params(s);
  if (!c.is_moe_layer(layer)) {
    dense += mlp_params(s, c.ffn_size());
    return;
  }
  const int64_t E = c.num_experts, local = E / s.layout.ep, F = s.expert_ffn_local();
  dense += E * h + (c.add_bias_linear ? E : 0);  // the router
  expert += local * (h * s.fc1_width(F) + F * h);
  if (c.add_bias_linear) expert += local * (s.fc1_width(F) + h);
  if (c.moe_shared_expert_intermediate_size > 0) {
    dense += mlp_params(s, c.moe_shared_expert_intermediate_size);
    if (c.moe_shared_expert_gate) dense += h;
  }
}

// One flat buffer's share of StateMemory, as optim::Optimizer allocates it (rank 0 of the
// data-parallel group: even_split gives it the floor).
void add_group_memory(int64_t numel, int replicas, bool distributed, int64_t param_bytes,
                      const TrainingArguments& a, StateMemory& memory) {
  if (numel == 0) return;
  const bool sharded = distributed && replicas > 1;
  const int64_t shard = distributed ? numel / replicas : numel;
  memory.param_bytes += numel * param_bytes;
  memory.grad_bytes += numel * 4 + (sharded ? shard * 4 : 0);
  if (!(param_bytes == 4 && !sharded)) memory.main_param_bytes += shard * 4;
  if (a.optimizer == "adam") {
    memory.optimizer_state_bytes += 2 * shard * 4;
  } else if (a.sgd_momentum != 0.0) {
    memory.optimizer_state_bytes += shard * 4;
  }
}

// ---- activations: the bytes each module's Context keeps after forward

struct LayerActivations {
  int64_t kept = 0;        // saved after forward
  int64_t recomputed = 0;  // rebuilt in backward before the layer's backward runs
  // Backward's largest working set: attention backward's, or, when the experts recompute their
  // activation (freed again before attention backward runs), the experts' backward.
  int64_t backward = 0;
};

LayerActivations layer_activations(const Shapes& s, int layer, Recompute recompute) {
  const TransformerConfig& c = s.c;
  const int64_t a = s.param_bytes, cb = s.compute_bytes(), h = c.hidden_size;
  const int64_t rl = s.rows_local(), rf = s.rows_full(), b = s.batch, S = s.seq;
  // The selective column plans --recompute-modules whatever --recompute-granularity says.
  auto on = [&](std::string_view module) {
    return recompute == Recompute::kSelective &&
           std::find(c.recompute_modules.begin(), c.recompute_modules.end(), module) !=
               c.recompute_modules.end();
  };
  // The layer input (the previous layer's output) and the residual.
  int64_t always = 2 * rl * h * a + 2 * s.norm_stat_bytes(rl);
  int64_t attention_input = rl * h * a;
  int64_t qkv, core;  // q, k, v (and their norm inputs) | logsumexp and context
  if (c.multi_latent_attention) {
    const int64_t n = s.heads_local(), qd = c.qk_head_dim + c.qk_pos_emb_head_dim;
    qkv = b * n * S * (2 * qd + c.v_head_dim) * cb + rf * c.kv_lora_rank * a;
    if (c.q_lora_rank > 0) qkv += rf * c.q_lora_rank * a;
    if (c.qk_layernorm) qkv += s.norm_stat_bytes(rl) * 2;
    core = b * n * S * cb + rf * n * c.v_head_dim * a;
  } else {
    const int64_t d = c.head_dim(), n = s.heads_local(), g = s.groups_local();
    qkv = b * (n + 2 * g) * S * d * cb;
    if (c.qk_layernorm)
      qkv += b * (n + g) * S * (d * cb + (c.normalization == "LayerNorm" ? 8 : 4));
    core = b * n * S * cb + rf * n * d * a;
  }
  // Attention backward holds at once: the context gradient (rows, fp32 and head-major), the q, k,
  // v gradients and their rows (fp32 and activation dtype), the gathered input and its gradient.
  int64_t q_width, qkv_width;
  if (c.multi_latent_attention) {
    q_width = s.heads_local() * c.v_head_dim;
    qkv_width = s.heads_local() * (2 * (c.qk_head_dim + c.qk_pos_emb_head_dim) + c.v_head_dim);
  } else {
    q_width = s.heads_local() * c.head_dim();
    qkv_width = (s.heads_local() + 2 * s.groups_local()) * c.head_dim();
  }
  const int64_t attention_backward =
      rf * q_width * (a + 2 * cb) + rf * qkv_width * (2 * cb + a) + 2 * rf * h * a;
  int64_t mlp_input = rl * h * a;  // pre_mlp_layernorm's output
  int64_t mlp_inner = 0, moe_inner = 0, moe_act = 0, shared_inner = 0;
  if (!c.is_moe_layer(layer)) {
    const int64_t ffn = c.ffn_size() / s.layout.tp;
    mlp_inner = rf * (s.fc1_width(ffn) + ffn) * a;
  } else {
    const int64_t T = s.moe_tokens(), K = c.moe.moe_router_topk, E = c.num_experts;
    const int64_t R = s.expert_rows(), F = s.expert_ffn_local();
    // Router: its input in fp32 (a view of the layer's when that is fp32 without jitter), the
    // logits and the routing; dispatcher: the combined rows; experts: input, fc1 and activation.
    const bool router_copy = a != 4 || c.moe.moe_input_jitter_eps.has_value();
    moe_inner = (router_copy ? T * h * 4 : 0) + T * E * 4 + T * K * 8 + T * K * h * a +
                R * (h + s.fc1_width(F)) * a;
    moe_act = R * F * a;
    if (c.moe_shared_expert_intermediate_size > 0) {
      const int64_t ffn = c.moe_shared_expert_intermediate_size / s.layout.tp;
      shared_inner = rf * (s.fc1_width(ffn) + ffn) * a;
      if (c.moe_shared_expert_gate) shared_inner += rl * h * a + rl * 4;
    }
    // Without sequence parallelism (tp > 1) the MoE layer keeps its own rows of the input.
    if (!s.sequence_parallel && s.layout.tp > 1) moe_inner += T * h * a;
  }
  if (recompute == Recompute::kFull) {
    const int64_t everything = always + attention_input + qkv + core + mlp_input + mlp_inner +
                               moe_inner + moe_act + shared_inner;
    return {rl * h * a, everything, attention_backward};
  }
  LayerActivations out;
  out.backward = attention_backward;
  out.kept = always + qkv;
  auto keep_or_recompute = [&](int64_t bytes, bool recomputed) {
    (recomputed ? out.recomputed : out.kept) += bytes;
  };
  keep_or_recompute(core, on("core_attn"));
  keep_or_recompute(attention_input, on("layernorm"));
  // The MoE router keeps a view of the norm output when it is fp32 without jitter.
  const bool router_view =
      c.is_moe_layer(layer) && a == 4 && !c.moe.moe_input_jitter_eps && !on("moe");
  keep_or_recompute(mlp_input, on("layernorm") && !router_view);
  keep_or_recompute(mlp_inner, on("mlp"));
  keep_or_recompute(moe_inner, on("moe"));
  keep_or_recompute(shared_inner, on("shared_experts"));
  if (on("moe") || on("moe_act")) {
    // The experts rebuild their activation, then hold its gradient and fc1's beside it.
    const int64_t R = s.expert_rows(), F = s.expert_ffn_local();
    out.backward = std::max(out.backward, moe_act + R * (F + s.fc1_width(F)) * a - out.recomputed);
  } else {
    out.kept += moe_act;
  }
  return out;
}

// A stage's context and backward working set.
void plan_activations(const Shapes& s, int64_t padded_vocab, const model::GPTStage& stage,
                      StagePlan& plan) {
  const TransformerConfig& c = s.c;
  const int64_t a = s.param_bytes, h = c.hidden_size, rl = s.rows_local(), rf = s.rows_full();
  for (Recompute r : {Recompute::kNone, Recompute::kSelective, Recompute::kFull}) {
    int64_t kept = 0, transient = 0;
    for (int layer = stage.first_layer; layer < stage.first_layer + stage.num_layers; ++layer) {
      const LayerActivations layer_bytes = layer_activations(s, layer, r);
      kept += layer_bytes.kept;
      transient = std::max(transient, layer_bytes.recomputed + layer_bytes.backward);
    }
    if (stage.post_process) {
      // The final norm's input and output, the softmax [rows, V_local] F32 the loss keeps, and
      // in backward the logits' gradient beside it.
      const int64_t softmax = rf * (padded_vocab / s.layout.tp) * 4;
      kept += 2 * rl * h * a + s.norm_stat_bytes(rl) + softmax;
      transient = std::max(transient, softmax + rf * h * 4);
    }
    plan.context_bytes[int(r)] = kept;
    plan.transient_bytes[int(r)] = transient;
  }
}

// ---- work per step

// Forward FLOPs of one micro-batch on one rank of `stage` (backward: twice that).
double forward_flops(const Shapes& s, int64_t padded_vocab, const model::GPTStage& stage,
                     double& recomputed_flops) {
  const TransformerConfig& c = s.c;
  const double h = c.hidden_size, rf = double(s.rows_full()), tp = s.layout.tp;
  double total = 0;
  recomputed_flops = 0;
  for (int layer = stage.first_layer; layer < stage.first_layer + stage.num_layers; ++layer) {
    double head = c.multi_latent_attention ? c.qk_head_dim + c.qk_pos_emb_head_dim : c.head_dim();
    double attention_linear =
        2 * rf * h * (c.num_attention_heads + 2 * c.query_groups()) * head / tp +
        2 * rf * c.num_attention_heads * head * h / tp;
    // Causal scores and context: half of 2 * 2 * s^2 * d per head.
    double core =
        2.0 * double(s.batch) * double(s.heads_local()) * double(s.seq) * double(s.seq) * head;
    double mlp = 0, moe = 0;
    if (!c.is_moe_layer(layer)) {
      mlp = 2 * rf * h * (s.fc1_width(c.ffn_size()) + c.ffn_size()) / tp;
    } else {
      const double F = double(s.expert_ffn_local());
      moe = 2 * double(s.moe_tokens()) * h * c.num_experts +
            2 * double(s.expert_rows()) * h * (double(s.fc1_width(int64_t(F))) + F);
      if (c.moe_shared_expert_intermediate_size > 0) {
        const double shared = c.moe_shared_expert_intermediate_size;
        mlp = 2 * rf * h * (s.fc1_width(int64_t(shared)) + shared) / tp;
      }
    }
    total += attention_linear + core + mlp + moe;
    if (c.recompute_granularity == "full") {
      recomputed_flops += attention_linear + core + mlp + moe;
    } else if (c.recompute_granularity == "selective") {
      if (c.recomputes("core_attn")) recomputed_flops += core;
      if (c.recomputes("mlp") || c.recomputes("shared_experts")) recomputed_flops += mlp;
      if (c.recomputes("moe")) recomputed_flops += moe;
    }
  }
  if (stage.post_process) total += 2 * rf * h * double(padded_vocab) / tp;
  return total;
}

}  // namespace

MachineRates calibrate_machine() {
  using Clock = std::chrono::steady_clock;
  const int64_t n = 512;
  Tensor x({n, n}), w({n, n}), y({n, n});
  x.fill(0.5f);
  w.fill(0.25f);
  linear_forward(x, w, y);  // warm-up: packing buffers and threads
  double best = 1e30;
  for (int trial = 0; trial < 3; ++trial) {
    const auto start = Clock::now();
    linear_forward(x, w, y);
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
  }
  MachineRates rates;
  rates.gemm_flops_per_second = 2.0 * double(n * n * n) / best;
  const size_t bytes = size_t(64) << 20;
  Tensor source({int64_t(bytes / 4)}), target({int64_t(bytes / 4)});
  source.fill(1.0f);
  std::memcpy(target.raw(), source.raw(), bytes);  // fault the pages in
  double copy = 1e30;
  for (int trial = 0; trial < 3; ++trial) {
    const auto start = Clock::now();
    std::memcpy(target.raw(), source.raw(), bytes);
    copy = std::min(copy, std::chrono::duration<double>(Clock::now() - start).count());
  }
  rates.link_bytes_per_second = double(bytes) / copy;
  rates.source =
      "calibrated here: a 512^3 fp32 GEMM (moecore's kernel) and a 64 MiB memcpy as the link "
      "(ranks on one machine exchange through shared memory)";
  return rates;
}

LayoutPlan plan_layout(const TrainingArguments& a, int64_t padded_vocab,
                       const MachineRates& rates) {
  MOE_CHECK(!a.mtp_num_layers || *a.mtp_num_layers == 0,
            "moe-plan does not model multi-token prediction (--mtp-num-layers)");
  TransformerConfig config = model_config(a, padded_vocab);
  LayoutPlan plan;
  Layout& l = plan.layout;
  l.tp = a.tensor_model_parallel_size;
  l.pp = a.pipeline_model_parallel_size;
  l.ep = a.expert_model_parallel_size;
  l.etp = a.expert_tensor_parallel_size.value_or(l.tp);
  l.dp = a.data_parallel_size;
  config.validate(l.tp, l.ep);
  plan.num_micro_batches = a.num_micro_batches;
  const int64_t param_bytes = a.bf16 || a.fp16 ? 2 : 4;
  const Shapes shapes{config,
                      l,
                      int64_t(*a.seq_length),
                      int64_t(*a.micro_batch_size),
                      param_bytes,
                      config.sequence_parallel && l.tp > 1};
  const int M = plan.num_micro_batches;
  const int edp = a.expert_data_parallel_size;
  double busiest_stage_seconds = 0;
  for (int stage_rank = 0; stage_rank < l.pp; ++stage_rank) {
    const model::GPTStage stage = pipeline::pipeline_stage(config.num_layers, l.pp, stage_rank);
    StagePlan s;
    s.first_layer = stage.first_layer;
    s.num_layers = stage.num_layers;
    int64_t dense = 0, expert = 0;
    if (stage.pre_process) {
      dense += padded_vocab / l.tp * config.hidden_size;
      if (config.position_embedding_type == "learned_absolute") {
        const int64_t positions =
            config.max_position_embeddings > 0 ? config.max_position_embeddings : config.seq_length;
        dense += positions * config.hidden_size;
      }
    }
    for (int layer = stage.first_layer; layer < stage.first_layer + stage.num_layers; ++layer) {
      count_layer_params(shapes, layer, dense, expert);
    }
    if (stage.post_process) {
      dense += shapes.norm_params(config.hidden_size);
      if (config.untie_embeddings_and_output_weights) {
        dense += config.hidden_size * (padded_vocab / l.tp);
      }
    }
    s.dense_params = dense;
    s.expert_params = expert;
    for (bool distributed : {false, true}) {
      add_group_memory(dense, l.dp * l.cp, distributed, param_bytes, a, s.state[distributed]);
      add_group_memory(expert, edp, distributed, param_bytes, a, s.state[distributed]);
    }
    plan_activations(shapes, padded_vocab, stage, s);
    s.contexts_in_flight = std::min(l.pp - stage_rank, M);

    // Step time of this stage: its GEMMs and its exchanges, M micro-batches.
    double recomputed = 0;
    const double forward = forward_flops(shapes, padded_vocab, stage, recomputed);
    const double compute = double(M) * (3 * forward + recomputed) / rates.gemm_flops_per_second;
    double link_bytes = 0;
    const double row_bytes = double(config.hidden_size * param_bytes);
    if (shapes.sequence_parallel || l.tp > 1) {
      // Per layer: an all-gather and a reduce-scatter (or all-reduce) around attention and the
      // MLP, forward and backward; a rank moves (tp - 1) / tp of the full rows each time.
      link_bytes += double(M) * stage.num_layers * 8 * double(shapes.rows_full()) * row_bytes *
                    double(l.tp - 1) / double(l.tp);
    }
    if (l.pp > 1) link_bytes += double(M) * 2 * double(shapes.rows_local()) * row_bytes;
    // Gradient reduction over data-parallel replicas: an fp32 all-reduce (ring: 2 (r - 1) / r).
    auto reduction = [](int64_t numel, int replicas) {
      return replicas > 1 ? 2.0 * double(numel) * 4 * double(replicas - 1) / double(replicas) : 0;
    };
    link_bytes += reduction(dense, l.dp * l.cp) + reduction(expert, edp);
    int moe_layers = 0;
    for (int layer = stage.first_layer; layer < stage.first_layer + stage.num_layers; ++layer) {
      moe_layers += config.is_moe_layer(layer) ? 1 : 0;
    }
    if (moe_layers > 0 && l.ep * l.etp > 1) {
      // Exchanges per micro-batch: dispatch and combine, forward and backward, and the forward
      // again when the MoE layer recomputes. Each leaves the rank for (group - 1) / group.
      const bool moe_recomputes =
          config.recompute_granularity == "full" || config.recomputes("moe");
      const int64_t forwards = moe_recomputes ? 2 : 1;
      const int64_t T = shapes.moe_tokens(), K = config.moe.moe_router_topk;
      const int64_t token_bytes = T * config.hidden_size * param_bytes,
                    slot_bytes = K * token_bytes;
      const int64_t tp_ep = l.ep * l.etp;
      // alltoall: dispatch and combine_backward send this rank's T * K slot rows; combine and
      // dispatch_backward send back what its experts received (T * K on average over ep).
      plan.alltoall_exchange_bytes = M * (forwards * 2 + 2) * slot_bytes;
      // allgather: dispatch all-gathers the T tokens, combine reduce-scatters the group's
      // T * K * (etp x ep) kept rows; combine_backward all-gathers the T * K slot gradients and
      // dispatch_backward reduce-scatters the group's again.
      plan.allgather_exchange_bytes =
          M * (forwards * (token_bytes + tp_ep * slot_bytes) + slot_bytes + tp_ep * slot_bytes);
      const bool alltoall = config.moe.moe_token_dispatcher_type == TokenDispatcherType::kAllToAll;
      // What leaves the rank: (ep - 1) / ep of an all-to-all's buffer; its own rows to each of
      // the other tp x ep ranks in an all-gather; (tp x ep - 1) / (tp x ep) of a reduce-scatter's.
      const double group = double(tp_ep);
      const double gathered = double(M * (forwards * token_bytes + slot_bytes));
      const double scattered = double(M * (forwards + 1) * tp_ep * slot_bytes);
      // The alltoall dispatcher's etp all-gathers (the received rows) and reduce-scatters (etp
      // times them), one of each per all-to-all pair.
      const double over_etp = double(M * (forwards + 1) * slot_bytes) * 2 * (l.etp - 1);
      const double moved = alltoall
                               ? double(plan.alltoall_exchange_bytes) * (l.ep - 1) / l.ep + over_etp
                               : gathered * (group - 1) + scattered * (group - 1) / group;
      link_bytes += moe_layers * moved;
    }
    const double communication = link_bytes / rates.link_bytes_per_second;
    if (compute + communication > busiest_stage_seconds) {
      busiest_stage_seconds = compute + communication;
      plan.compute_seconds = compute;
      plan.communication_seconds = communication;
    }
    plan.stages.push_back(s);
  }
  plan.bubble_fraction = double(l.pp - 1) / double(M + l.pp - 1);
  plan.step_seconds = busiest_stage_seconds / (1.0 - plan.bubble_fraction);
  return plan;
}

std::vector<LayoutPlan> rank_layouts(const TrainingArguments& args, int world_size, int64_t vocab,
                                     const MachineRates& rates) {
  std::vector<LayoutPlan> plans;
  auto divisors = [](int n) {
    std::vector<int> out;
    for (int d = 1; d <= n; ++d) {
      if (n % d == 0) out.push_back(d);
    }
    return out;
  };
  for (int tp : divisors(world_size)) {
    for (int pp : divisors(world_size / tp)) {
      for (int ep : divisors(world_size / pp)) {
        for (int etp : divisors(world_size / pp / ep)) {
          if (!args.is_moe() && (ep > 1 || etp != tp)) continue;
          TrainingArguments candidate = args;
          candidate.tensor_model_parallel_size = tp;
          candidate.pipeline_model_parallel_size = pp;
          candidate.expert_model_parallel_size = ep;
          candidate.expert_tensor_parallel_size = etp;
          // Sequence parallelism as the arguments ask, and where Megatron requires it.
          candidate.sequence_parallel =
              tp > 1 && (args.sequence_parallel || (args.is_moe() && ep > 1));
          try {
            finalize_arguments(candidate, world_size);
            const int64_t padded =
                data::padded_vocab_size(vocab, candidate.make_vocab_size_divisible_by, tp);
            plans.push_back(plan_layout(candidate, padded, rates));
          } catch (const Error&) {
            continue;  // a layout moe-train refuses
          }
        }
      }
    }
  }
  std::stable_sort(plans.begin(), plans.end(), [](const LayoutPlan& x, const LayoutPlan& y) {
    return x.step_seconds < y.step_seconds;
  });
  return plans;
}

}  // namespace moe::train

#include "moe/train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <ostream>
#include <sstream>

#include "expert_load.h"
#include "mock_dataset.h"
#include "moe/checkpoint/checkpoint.h"
#include "moe/comm/fault_injection.h"
#include "moe/comm/parallel_state.h"
#include "moe/comm/process_group.h"
#include "moe/data/gpt_dataset.h"
#include "moe/data/tokenizer.h"
#include "moe/model/gpt_model.h"
#include "moe/moe/ep_dispatchers.h"
#include "moe/moe/moe_layer.h"
#include "moe/optim/lr_scheduler.h"
#include "moe/optim/optimizer.h"
#include "moe/pipeline/schedules.h"
#include "moe/tensor/gemm.h"
#include "moe/tensor/rng.h"
#include "moe/tensor/threads.h"
#include "moe/train/scalar_log.h"

namespace moe::train {
namespace {

using detail::concat;
using Clock = std::chrono::steady_clock;

}  // namespace

model::TransformerConfig model_config(const TrainingArguments& a, int64_t padded_vocab) {
  model::TransformerConfig c;
  c.num_layers = *a.num_layers;
  c.hidden_size = *a.hidden_size;
  c.ffn_hidden_size = *a.ffn_hidden_size;
  c.num_attention_heads = *a.num_attention_heads;
  c.kv_channels = *a.kv_channels;
  c.group_query_attention = a.group_query_attention;
  c.num_query_groups = a.num_query_groups;
  c.padded_vocab_size = padded_vocab;
  c.seq_length = *a.seq_length;
  c.max_position_embeddings = *a.max_position_embeddings;
  c.normalization = a.normalization;
  c.norm_epsilon = float(a.norm_epsilon);
  c.position_embedding_type = a.position_embedding_type;
  c.rotary_base = float(a.rotary_base);
  c.rotary_scaling_factor = a.rotary_scaling_factor;
  c.mscale = a.mscale;
  c.mscale_all_dim = a.mscale_all_dim;
  c.yarn_original_max_position_embeddings = a.yarn_original_max_position_embeddings.value_or(4096);
  c.yarn_beta_fast = a.yarn_beta_fast.value_or(32.0);
  c.yarn_beta_slow = a.yarn_beta_slow.value_or(1.0);
  c.yarn_correction_range_round_to_int = a.yarn_correction_range_round_to_int.value_or(true);
  c.rope_type = a.rope_type.value_or("");
  c.add_qkv_bias = a.add_qkv_bias;
  c.multi_latent_attention = a.multi_latent_attention;
  c.q_lora_rank = a.q_lora_rank.value_or(0);
  c.kv_lora_rank = a.kv_lora_rank;
  c.qk_head_dim = a.qk_head_dim;
  c.qk_pos_emb_head_dim = a.qk_pos_emb_head_dim;
  c.v_head_dim = a.v_head_dim;
  c.qk_layernorm = a.qk_layernorm;
  c.swiglu = a.swiglu;
  c.add_bias_linear = a.add_bias_linear;
  c.untie_embeddings_and_output_weights = a.untie_embeddings_and_output_weights;
  c.mtp_num_layers = a.mtp_num_layers.value_or(0);
  c.mtp_loss_scaling_factor = a.mtp_loss_scaling_factor;
  c.hidden_dropout = float(a.hidden_dropout);
  c.attention_dropout = float(a.attention_dropout);
  c.init_method_std = float(a.init_method_std);
  c.sequence_parallel = a.sequence_parallel;
  c.recompute_granularity = a.recompute_granularity.value_or("");
  c.recompute_modules = a.recompute_modules;
  if (a.is_moe()) {
    c.num_experts = *a.num_experts;
    c.moe_layer_pattern.assign(a.moe_layer_pattern.begin(), a.moe_layer_pattern.end());
    MoEConfig& m = c.moe;
    m.moe_ffn_hidden_size = *a.moe_ffn_hidden_size;
    m.moe_router_topk = a.moe_router_topk;
    std::vector<LoadBalancingType> balancing;
    for (const std::string& type : a.moe_router_load_balancing_type) {
      balancing.push_back(parse_load_balancing_type(type));
    }
    m.moe_router_load_balancing_type = OneOrMore<LoadBalancingType>(std::move(balancing));
    m.moe_aux_loss_coeff = OneOrMore<double>(a.moe_aux_loss_coeff);
    m.moe_router_enable_expert_bias = a.moe_router_enable_expert_bias;
    m.moe_router_bias_update_rate = a.moe_router_bias_update_rate;
    m.moe_router_num_groups = a.moe_router_num_groups;
    m.moe_router_group_topk = a.moe_router_group_topk;
    if (a.moe_router_dtype) m.moe_router_dtype = parse_router_dtype(*a.moe_router_dtype);
    m.moe_z_loss_coeff = a.moe_z_loss_coeff;
    m.moe_input_jitter_eps = a.moe_input_jitter_eps;
    m.moe_router_pre_softmax = a.moe_router_pre_softmax;
    m.moe_router_score_function = parse_score_function(a.moe_router_score_function);
    m.moe_router_topk_scaling_factor = a.moe_router_topk_scaling_factor;
    m.moe_expert_capacity_factor = a.moe_expert_capacity_factor;
    m.moe_pad_expert_input_to_capacity = a.moe_pad_expert_input_to_capacity;
    m.moe_token_drop_policy = parse_token_drop_policy(a.moe_token_drop_policy);
    m.moe_capacity_scope = parse_capacity_scope(a.moe_capacity_scope);
    m.moe_grouped_gemm = a.moe_grouped_gemm;
    m.moe_token_dispatcher_type = parse_token_dispatcher_type(a.moe_token_dispatcher_type);
    m.moe_router_type = parse_router_type(a.moe_router_type);
    c.moe_shared_expert_intermediate_size = a.moe_shared_expert_intermediate_size.value_or(0);
    c.moe_shared_expert_gate = a.moe_shared_expert_gate;
  }
  return c;
}

namespace {

optim::OptimizerConfig optimizer_config(const TrainingArguments& a) {
  optim::OptimizerConfig c;
  c.optimizer = a.optimizer;
  c.lr = *a.lr;
  c.min_lr = a.min_lr;
  c.weight_decay = a.weight_decay;
  c.adam_beta1 = a.adam_beta1;
  c.adam_beta2 = a.adam_beta2;
  c.adam_eps = a.adam_eps;
  c.sgd_momentum = a.sgd_momentum;
  c.clip_grad = a.clip_grad;
  c.use_distributed_optimizer = a.use_distributed_optimizer;
  c.check_grad_reduction = a.check_grad_reduction;
  c.bf16 = a.bf16;
  c.fp16 = a.fp16;
  c.loss_scale = a.fp16 ? a.loss_scale.value_or(0.0) : 0.0;
  c.initial_loss_scale = a.initial_loss_scale;
  c.min_loss_scale = a.min_loss_scale;
  c.loss_scale_window = int(a.loss_scale_window);
  c.hysteresis = a.hysteresis;
  return c;
}

optim::SchedulerConfig scheduler_config(const TrainingArguments& a) {
  optim::IterationScheduleArgs s;
  s.train_iters = *a.train_iters;
  s.global_batch_size = *a.global_batch_size;
  s.lr = *a.lr;
  s.min_lr = a.min_lr;
  s.lr_warmup_init = a.lr_warmup_init;
  s.lr_decay_iters = *a.lr_decay_iters;
  s.lr_warmup_iters = a.lr_warmup_iters;
  s.lr_warmup_fraction = a.lr_warmup_fraction;
  s.lr_decay_style = a.lr_decay_style;
  s.start_weight_decay = a.weight_decay;
  s.end_weight_decay = a.weight_decay;
  return optim::make_scheduler_config(s);
}

DType parameter_dtype(const TrainingArguments& a) {
  return a.bf16 ? DType::BF16 : a.fp16 ? DType::F16 : DType::F32;
}

nlohmann::json arguments_json(const TrainingArguments& a) {
  return {{"command_line", a.command_line},
          {"world_size", a.world_size},
          {"tensor_model_parallel_size", a.tensor_model_parallel_size},
          {"pipeline_model_parallel_size", a.pipeline_model_parallel_size},
          {"expert_model_parallel_size", a.expert_model_parallel_size},
          {"expert_tensor_parallel_size", *a.expert_tensor_parallel_size},
          {"data_parallel_size", a.data_parallel_size},
          {"num_layers", *a.num_layers},
          {"hidden_size", *a.hidden_size},
          {"num_attention_heads", *a.num_attention_heads},
          {"num_experts", a.num_experts.value_or(0)},
          {"seq_length", *a.seq_length},
          {"global_batch_size", *a.global_batch_size},
          {"micro_batch_size", *a.micro_batch_size},
          {"seed", a.seed},
          {"params_dtype", std::string(dtype_name(parameter_dtype(a)))}};
}

// The model, optimizer, schedule and data of one run, built in Megatron's order.
struct Job {
  const TrainingArguments& args;
  comm::ParallelState parallel;
  std::unique_ptr<data::Tokenizer> tokenizer;
  data::SampleOptions sample_options;
  int64_t padded_vocab = 0;
  std::unique_ptr<ParameterStore> store;
  // This rank's model chunks (one, or several with virtual pipeline stages), in one store.
  std::vector<std::unique_ptr<model::GPTModel>> chunks;
  std::shared_ptr<ExpertLoadCounter> expert_load;  // MoE models only
  std::unique_ptr<optim::Optimizer> optimizer;
  std::unique_ptr<optim::OptimizerParamScheduler> scheduler;
  std::array<std::shared_ptr<const data::SampleSource>, data::kSplitCount> datasets;
  // The base of every micro-batch's random streams: Rng(--seed)'s state, or the loaded
  // checkpoint's (Megatron restores its generators on load unless --no-load-rng).
  Rng::State random_streams{};
  int64_t iteration = 0;
  int64_t consumed_train_samples = 0;
  int64_t consumed_valid_samples = 0;
  bool is_logger = false;  // world rank 0
  std::ostream& log;

  Job(const TrainingArguments& a, std::ostream& out) : args(a), log(out) {}

  std::vector<model::GPTModel*> chunk_pointers() const {
    std::vector<model::GPTModel*> pointers;
    for (const auto& chunk : chunks) pointers.push_back(chunk.get());
    return pointers;
  }

  void say(const std::string& line) const {
    if (is_logger) log << line << '\n' << std::flush;
  }
};

void build_tokenizer(Job& job) {
  const TrainingArguments& a = job.args;
  data::TokenizerOptions options;
  options.type = *a.tokenizer_type;
  options.model = a.tokenizer_model.value_or("");
  options.vocab_file = a.vocab_file.value_or("");
  options.merge_file = a.merge_file.value_or("");
  options.vocab_size = a.vocab_size.value_or(0);
  job.tokenizer = data::make_tokenizer(options);
  job.sample_options.eod_token = job.tokenizer->eod();
  job.sample_options.pad_token = data::dataset_pad_token(*job.tokenizer);
  job.sample_options.eod_mask_loss = a.eod_mask_loss;
  const int64_t vocab = job.tokenizer->vocab_size();
  job.padded_vocab =
      data::padded_vocab_size(vocab, a.make_vocab_size_divisible_by, a.tensor_model_parallel_size);
  // Samples with ids the embedding has no row for are refused, naming the data file.
  job.sample_options.vocab_size = job.padded_vocab;
  job.say(concat("> building ", options.type, " tokenizer ... padded vocab (size: ", vocab,
                 ") with ", job.padded_vocab - vocab, " dummy tokens (new size: ", job.padded_vocab,
                 ")"));
}

void build_datasets(Job& job) {
  const TrainingArguments& a = job.args;
  const auto num_samples = data::train_valid_test_num_samples(*a.train_iters, *a.global_batch_size,
                                                              a.eval_interval, a.eval_iters);
  if (a.mock_data) {
    for (int split = 0; split < data::kSplitCount; ++split) {
      job.datasets[split] = std::make_shared<MockGPTDataset>(
          num_samples[split].value_or(0), *a.seq_length, job.tokenizer->vocab_size(),
          job.tokenizer->eod(), uint64_t(a.seed), data::Split(split));
    }
  } else {
    data::GPTDatasetConfig config;
    config.data_path = a.data_path;
    config.per_split_data_path = {a.train_data_path, a.valid_data_path, a.test_data_path};
    config.split = a.split;
    config.seq_length = *a.seq_length;
    config.seed = uint32_t(a.seed);
    config.num_samples = num_samples;
    config.sample = job.sample_options;
    job.datasets = data::build_gpt_datasets(config);
  }
  MOE_CHECK(job.datasets[0] != nullptr, "--split '", a.split,
            "' gives the training split no documents");
  for (int split = 0; split < data::kSplitCount; ++split) {
    const auto& dataset = job.datasets[split];
    job.say(concat(" > ", data::split_name(data::Split(split)),
                   " samples: ", dataset ? dataset->size() : 0, a.mock_data ? " (mock data)" : ""));
  }
}

void build_model_and_optimizer(Job& job) {
  const TrainingArguments& a = job.args;
  model::TransformerConfig config = model_config(a, job.padded_vocab);
  job.store = std::make_unique<ParameterStore>(parameter_dtype(a));
  model::DispatcherFactory dispatchers;
  if (a.is_moe()) {
    // MTP layers count after the decoder's (their dispatchers get numbers num_layers + k - 1).
    job.expert_load = std::make_shared<ExpertLoadCounter>(
        *a.num_layers + a.mtp_num_layers.value_or(0), *a.num_experts);
    dispatchers = counting_dispatcher_factory(job.expert_load, model::default_dispatcher_factory());
  }
  for (const model::GPTStage& stage :
       pipeline::pipeline_chunks(*a.num_layers, pipeline_layout(a), job.parallel)) {
    job.chunks.push_back(
        std::make_unique<model::GPTModel>(config, job.parallel, *job.store, stage, dispatchers));
  }
  job.store->allocate();
  for (const auto& chunk : job.chunks) chunk->init_parameters(uint64_t(a.seed));
  job.say(concat(" > number of parameters on (tensor, pipeline, expert) model parallel rank (",
                 job.parallel.tp_group.rank(), ", ", job.parallel.pp_group.rank(), ", ",
                 job.parallel.ep_group.rank(), "): dense ",
                 job.store->flat_params(ParamGroup::kDense).numel(), ", expert ",
                 job.store->flat_params(ParamGroup::kExpert).numel()));
  job.say(concat(" > compute: grouped GEMM kernel ",
                 grouped_gemm_kernel_name(grouped_gemm_auto_kernel(parameter_dtype(a))),
                 ", threads per rank: ", num_threads()));
  job.optimizer = std::make_unique<optim::Optimizer>(*job.store, job.parallel, optimizer_config(a));
  job.scheduler =
      std::make_unique<optim::OptimizerParamScheduler>(scheduler_config(a), job.optimizer.get());
  job.say(concat(" > ", job.optimizer->memory_summary(), " (world rank 0)"));
}

// The name of the trainer's one RNG state in a checkpoint's per-rank "rng" map.
constexpr const char* kRandomStreamsKey = "micro_batch_streams";

// After a load: warns (world rank 0's layers: all of them without pipeline parallelism) about
// MoE layers holding identical experts. Identical experts get identical gradients whenever the
// router sends them the same tokens, so a checkpoint built by copying one expert trains fewer
// experts than it claims; after upcycling this is the expected start. Each expert's fingerprint
// is the CRC-32 of its weights' bytes, summed over the expert-tensor-parallel slices.
void warn_identical_experts(Job& job, bool upcycled) {
  const int64_t experts = *job.args.num_experts;
  std::vector<std::string> layers;  // "decoder.layers.3.mlp", in declaration order
  std::map<std::string, std::vector<uint32_t>> local;  // layer -> running CRC per local expert
  std::map<std::string, int64_t> first_expert;
  for (int i = 0; i < job.store->count(); ++i) {
    const ParamSpec& spec = job.store->spec(ParamHandle{i});
    const size_t at = spec.name.find(".experts.");
    if (spec.group != ParamGroup::kExpert || at == std::string::npos) continue;
    const std::string layer = spec.name.substr(0, at);
    if (!local.count(layer)) layers.push_back(layer);
    const Tensor param = job.store->param(ParamHandle{i});
    const int64_t local_experts = param.dim(0);
    std::vector<uint32_t>& crcs = local[layer];
    crcs.resize(size_t(local_experts), 0);
    first_expert[layer] = spec.global_offset[0];
    const size_t row_bytes = param.nbytes() / size_t(local_experts);
    for (int64_t e = 0; e < local_experts; ++e) {
      crcs[size_t(e)] = crc32(static_cast<const char*>(param.raw()) + size_t(e) * row_bytes,
                              row_bytes, crcs[size_t(e)]);
    }
  }
  if (layers.empty()) return;
  Tensor fingerprints = Tensor::full({int64_t(layers.size()), experts}, 0.0f, DType::I64);
  for (size_t l = 0; l < layers.size(); ++l) {
    const std::vector<uint32_t>& crcs = local[layers[l]];
    for (size_t e = 0; e < crcs.size(); ++e) {
      fingerprints.data<int64_t>()[int64_t(l) * experts + first_expert[layers[l]] + int64_t(e)] =
          crcs[e];
    }
  }
  comm::all_reduce(fingerprints, job.parallel.ep_group);   // each expert from its one ep rank
  comm::all_reduce(fingerprints, job.parallel.etp_group);  // its slices together
  for (size_t l = 0; l < layers.size(); ++l) {
    const int64_t* row = fingerprints.data<int64_t>() + int64_t(l) * experts;
    std::map<int64_t, std::vector<int64_t>> alike;
    for (int64_t e = 0; e < experts; ++e) alike[row[e]].push_back(e);
    for (const auto& [fingerprint, group] : alike) {
      if (group.size() < 2) continue;
      std::string list;
      for (int64_t e : group) list += (list.empty() ? "" : ", ") + std::to_string(e);
      job.say(concat("warning: ", layers[l], ": experts ", list, " are identical",
                     upcycled ? " (expected after upcycling: they diverge as the router and "
                                "their gradients differ)"
                              : "; they train alike while routed alike (a checkpoint built by "
                                "copying one expert?)"));
    }
  }
}

void load_checkpoint_if_any(Job& job) {
  const TrainingArguments& a = job.args;
  if (!a.load) {
    job.say("> no --load given: training from scratch");
    return;
  }
  std::optional<int64_t> tracked = checkpoint::read_tracker(*a.load);
  MOE_CHECK(!a.moe_use_upcycling || tracked, "--moe-use-upcycling: --load '", *a.load,
            "' holds no checkpoint (no latest_checkpointed_iteration.txt) to upcycle");
  // As Megatron: upcycling is the first run of the MoE model; a later run resumes its checkpoint.
  MOE_CHECK(!a.moe_use_upcycling || !a.save || !checkpoint::read_tracker(*a.save),
            "--moe-use-upcycling: --save '", a.save.value_or(""),
            "' already holds a checkpoint; upcycling is only for the first run from the dense "
            "checkpoint (resume the MoE run without --moe-use-upcycling)");
  if (!tracked) {
    MOE_CHECK(!a.exit_on_missing_checkpoint, "--load '", *a.load,
              "' holds no checkpoint (no latest_checkpointed_iteration.txt) and "
              "--exit-on-missing-checkpoint is set");
    job.say(concat("> no checkpoint found in --load '", *a.load, "': training from scratch"));
    return;
  }
  checkpoint::LoadOptions options;
  options.load_optim = !a.no_load_optim && !a.finetune;
  // As Megatron, --finetune does not restore the random state either.
  options.load_rng = !a.no_load_rng && !a.finetune;
  if (a.moe_use_upcycling) {  // finalize_arguments set --no-load-optim and --no-load-rng
    options.upcycling =
        checkpoint::Upcycling{a.moe_upcycling_granularity, *a.num_experts, a.moe_router_topk,
                              a.moe_router_pre_softmax, a.swiglu};
  }
  checkpoint::TrainingState state = checkpoint::load_checkpoint(
      *a.load, *job.store, options.load_optim ? job.optimizer.get() : nullptr,
      options.load_optim ? job.scheduler.get() : nullptr, job.parallel, options);
  if (!options.load_optim) job.optimizer->reload_main_params();
  if (options.load_rng) {
    auto saved = state.rng.find(kRandomStreamsKey);
    MOE_CHECK(saved != state.rng.end(), "checkpoint '", *a.load, "' at iteration ", state.iteration,
              " holds no random state (saved with --no-save-rng, or converted); use "
              "--no-load-rng (random streams from --seed) or --finetune");
    job.random_streams = saved->second;
    if (state.rng_saved_world_size != job.parallel.world_size) {
      job.say(concat("> checkpoint saved by ", state.rng_saved_world_size, " ranks, this run has ",
                     job.parallel.world_size,
                     ": every rank takes saved rank 0's random streams (the same on every rank), "
                     "so the random choices continue as at the saved size"));
    }
  }
  // moe-convert --iteration without --global-batch-size, or a hand-edited checkpoint: resuming
  // would claim iteration N yet read the data from its start.
  MOE_CHECK(a.finetune || state.iteration == 0 || state.consumed_train_samples > 0, "checkpoint '",
            *a.load, "' is at iteration ", state.iteration,
            " but records 0 consumed training samples, so a resume would restart the data; use "
            "--finetune, or convert with moe-convert --iteration N --global-batch-size B");
  if (!a.finetune) {
    job.iteration = state.iteration;
    job.consumed_train_samples = state.consumed_train_samples;
    job.consumed_valid_samples = state.consumed_valid_samples;
  }
  if (a.is_moe()) warn_identical_experts(job, a.moe_use_upcycling);
  if (a.moe_use_upcycling) {
    job.say(concat("> upcycled the dense checkpoint into ", *a.num_experts,
                   " experts per MoE layer (--moe-upcycling-granularity ",
                   a.moe_upcycling_granularity, ")"));
  }
  job.say(concat("> loaded checkpoint from '", *a.load, "' at iteration ", state.iteration,
                 options.load_optim ? "" : " (model only: optimizer and schedule start fresh)",
                 a.finetune ? "; --finetune: starting at iteration 0" : ""));
}

void save(Job& job, TrainingReport& report) {
  const TrainingArguments& a = job.args;
  checkpoint::TrainingState state;
  state.iteration = job.iteration;
  state.consumed_train_samples = job.consumed_train_samples;
  state.consumed_valid_samples = job.consumed_valid_samples;
  state.args = arguments_json(a);
  if (!a.no_save_rng) state.rng[kRandomStreamsKey] = job.random_streams;
  auto start = Clock::now();
  checkpoint::save_checkpoint(*a.save, state, *job.store,
                              a.no_save_optim ? nullptr : job.optimizer.get(), job.scheduler.get(),
                              job.parallel);
  report.last_checkpoint =
      (std::filesystem::path(*a.save) / checkpoint::iteration_dir_name(job.iteration)).string();
  job.say(concat("  successfully saved checkpoint at iteration ", job.iteration, " to ",
                 *report.last_checkpoint, " (",
                 std::chrono::duration<double>(Clock::now() - start).count(), " s)"));
}

// Every random choice of one micro-batch (dropout masks, router jitter) derives from the run's
// random streams (from --seed or the checkpoint), the iteration and the global index of the
// micro-batch's first sample: the same in every layout and again after a resume.
uint64_t micro_batch_seed(const Rng::State& streams, int64_t iteration, int64_t first_sample) {
  Rng rng = Rng::derived(streams[0] ^ (uint64_t(iteration) * 0x9E3779B97F4A7C15ull),
                         uint64_t(first_sample));
  return rng.next_u64();
}

// Sums `values` over the data-parallel group and divides by its size.
void average_over_data_parallel(std::vector<double>& values, const comm::ParallelState& parallel) {
  Tensor buffer({int64_t(values.size())}, DType::F64);
  std::copy(values.begin(), values.end(), buffer.data<double>());
  comm::all_reduce(buffer, parallel.dp_group);
  for (size_t i = 0; i < values.size(); ++i) {
    values[i] = buffer.data<double>()[i] / parallel.dp_group.size();
  }
}

// Collective over `world`: throws InputError on every rank when any rank's `local_error` is
// non-empty, with the lowest failed rank's message (printed once, not once per rank) and, unless
// every rank failed, the failed ranks.
void agree_on_input(const comm::ProcessGroup& world, const std::string& local_error) {
  const comm::FailedRanks failed = comm::gather_failed_ranks(!local_error.empty(), world);
  if (failed.ranks.empty()) return;
  const int first = failed.ranks.front();
  const bool sender = world.rank() == first;
  Tensor length = Tensor::full({1}, 0.0f, DType::I64);
  if (sender) length.data<int64_t>()[0] = int64_t(local_error.size());
  comm::broadcast(length, first, world);
  Tensor text = Tensor::full({std::max<int64_t>(length.data<int64_t>()[0], 1)}, 0.0f, DType::I32);
  if (sender) std::copy(local_error.begin(), local_error.end(), text.data<int32_t>());
  comm::broadcast(text, first, world);
  std::string message(size_t(length.data<int64_t>()[0]), '\0');
  std::copy_n(text.data<int32_t>(), message.size(), message.begin());
  // Bad inputs usually fail every rank alike; otherwise say which ranks met it.
  throw InputError(
      int(failed.ranks.size()) == world.size()
          ? message
          : concat(message, " (failed on rank(s) ", failed.list(), " of ", world.size(), ")"));
}

// Feeds the pipeline schedule this data-parallel rank's micro-batches of one step, each with the
// dropout seed of its first sample. They are read up front and the ranks agree that every read
// succeeded, so a bad sample (a token outside the vocabulary, a corrupt file) is one InputError
// on every rank instead of one rank's abort while the others wait in a collective.
pipeline::MicroBatchProvider micro_batches_from(Job& job, data::PretrainingDataIterator& data) {
  auto batches = std::make_shared<std::vector<pipeline::MicroBatch>>();
  std::string error;
  try {
    // Context parallelism: this cp rank's two load-balanced chunks of each sequence.
    const comm::ContextParallel cp = job.parallel.context_parallel();
    for (int i = 0; i < job.args.num_micro_batches; ++i) {
      data::MicroBatch batch = data.next();
      pipeline::MicroBatch& micro = batches->emplace_back();
      micro.tokens = model::split_for_context_parallel(batch.tokens, cp);
      micro.labels = model::split_for_context_parallel(batch.labels, cp);
      if (batch.loss_mask.defined()) {
        micro.loss_mask = model::split_for_context_parallel(batch.loss_mask, cp);
      }
      micro.dropout_seed =
          micro_batch_seed(job.random_streams, job.iteration, batch.sample_indices[0]);
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  agree_on_input(job.parallel.world, error);
  return [batches](int index) { return (*batches)[size_t(index)]; };
}

pipeline::ScheduleOptions schedule_options(const TrainingArguments& a, double loss_scale) {
  pipeline::ScheduleOptions options;
  options.num_micro_batches = a.num_micro_batches;
  options.micro_batch_size = *a.micro_batch_size;
  options.loss_scale = loss_scale;
  return options;
}

// Every MoE layer's expert-bias range, gathered from all pipeline stages (one rank of each stage
// contributes its layers' values; the bias is the same on every rank of a stage). Collective over
// the world.
std::vector<IterationStats::BiasRange> expert_bias_ranges(const Job& job) {
  const int layers = *job.args.num_layers + job.args.mtp_num_layers.value_or(0);
  Tensor buffer = Tensor::full({3 * int64_t(layers)}, 0.0f, DType::F64);  // [layers][has, min, max]
  double* slots = buffer.data<double>();
  if (job.parallel.tp_dp_cp_group.rank() == 0) {
    for (const auto& chunk : job.chunks) {
      for (const auto& [layer, moe] : chunk->moe_layers()) {
        if (!moe->router().has_expert_bias()) continue;
        const std::vector<float> bias = moe->router().expert_bias().to_floats();
        const auto [low, high] = std::minmax_element(bias.begin(), bias.end());
        slots[3 * layer] = 1;
        slots[3 * layer + 1] = *low;
        slots[3 * layer + 2] = *high;
      }
    }
  }
  comm::all_reduce(buffer, job.parallel.world);
  std::vector<IterationStats::BiasRange> ranges;
  for (int layer = 0; layer < layers; ++layer) {
    if (slots[3 * layer] > 0) ranges.push_back({layer, slots[3 * layer + 1], slots[3 * layer + 2]});
  }
  return ranges;
}

// Megatron's --check-for-nan-in-loss-and-grad (on by default), before the gradients are reduced,
// so the error names the iteration, this rank and the first parameter whose local gradient is
// not finite. fp16 runs skip it: there an overflow skips the step and lowers the loss scale.
void check_for_nan_in_loss_and_grad(const Job& job, double loss) {
  const int64_t iteration = job.iteration + 1;
  MOE_CHECK(std::isfinite(loss), "iteration ", iteration, ": the loss is ", loss, " on rank ",
            job.parallel.world_rank, " (--no-check-for-nan-in-loss-and-grad disables this check)");
  for (int i = 0; i < job.store->count(); ++i) {
    const ParamSpec& spec = job.store->spec(ParamHandle{i});
    if (!spec.trainable) continue;
    const Tensor grad = job.store->grad(ParamHandle{i});
    const float* values = grad.data<float>();
    for (int64_t k = 0; k < grad.numel(); ++k) {
      MOE_CHECK(std::isfinite(values[k]), "iteration ", iteration, ": the gradient of '", spec.name,
                "' holds ", values[k], " (element ", k, ") on rank ", job.parallel.world_rank,
                " (--no-check-for-nan-in-loss-and-grad disables this check)");
    }
  }
}

IterationStats train_step(Job& job, data::PretrainingDataIterator& data) {
  const TrainingArguments& a = job.args;
  const auto start = Clock::now();
  comm::set_fault_iteration(job.iteration + 1);
  job.store->zero_grads();
  if (job.expert_load) job.expert_load->reset();
  // 1F1B over the pipeline stages (interleaved with virtual stages; plain forward-backward per
  // micro-batch with one stage); lm and MoE losses come back reduced over the stages.
  const size_t bytes_before_step = tensor_memory_stats().live_bytes;
  reset_tensor_peak_bytes();
  pipeline::StepResult result =
      pipeline::forward_backward(job.chunk_pointers(), job.parallel, micro_batches_from(job, data),
                                 schedule_options(a, job.optimizer->loss_scale()));
  Tensor stage_peaks({job.parallel.pp_group.size()}, DType::F64);
  stage_peaks.data<double>()[job.parallel.pp_group.rank()] =
      double(tensor_memory_stats().peak_live_bytes - bytes_before_step);
  comm::all_reduce(stage_peaks, job.parallel.world, comm::ReduceOp::kMax);
  if (comm::fault_requested("nan")) {  // MOE_FAULT_INJECT=nan:rank:iteration
    job.store->grad(ParamHandle{0}).data<float>()[0] = std::nanf("");
  }
  if (a.check_for_nan_in_loss_and_grad && !a.fp16) {
    check_for_nan_in_loss_and_grad(job, result.mean_lm_loss());
  }
  optim::StepResult step = job.optimizer->step();
  if (!step.grad_reduction_check.empty()) {
    job.say(concat("> --check-grad-reduction, iteration ", job.iteration + 1,
                   ", world rank 0: ", step.grad_reduction_check));
  }
  ++job.iteration;
  job.consumed_train_samples += *a.global_batch_size;
  if (!step.skipped) job.scheduler->step(*a.global_batch_size);

  const double loss_tokens =
      std::accumulate(result.loss_tokens.begin(), result.loss_tokens.end(), 0.0);
  std::vector<double> losses = {result.mean_lm_loss(), result.moe.load_balancing_loss(),
                                result.moe.z_loss(), loss_tokens};
  const std::vector<double> mtp_losses = result.mean_mtp_losses();
  losses.insert(losses.end(), mtp_losses.begin(), mtp_losses.end());
  average_over_data_parallel(losses, job.parallel);
  IterationStats stats;
  stats.iteration = job.iteration;
  stats.consumed_samples = job.consumed_train_samples;
  stats.lr = job.scheduler->lr();
  stats.lm_loss = losses[0];
  stats.load_balancing_loss = losses[1];
  stats.z_loss = losses[2];
  stats.loss_tokens = losses[3] * double(job.parallel.dp_group.size());
  stats.mtp_losses.assign(losses.begin() + 4, losses.end());
  stats.grad_norm = step.grad_norm;
  stats.stage_peak_activation_bytes.assign(stage_peaks.data<double>(),
                                           stage_peaks.data<double>() + stage_peaks.numel());
  stats.loss_scale = step.loss_scale;
  stats.skipped = step.skipped;
  if (job.expert_load) {
    ExpertLoadCounter::Loads loads = job.expert_load->relative_loads(job.parallel.world);
    stats.expert_load = std::move(loads.overall);
    stats.layer_expert_load = std::move(loads.per_layer);
  }
  if (a.moe_router_enable_expert_bias) stats.expert_bias_ranges = expert_bias_ranges(job);
  stats.elapsed_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  stats.tokens_per_second =
      double(*a.global_batch_size) * double(*a.seq_length) / (stats.elapsed_ms / 1000.0);
  return stats;
}

// Megatron's evaluate(): eval_iters global batches of `data`, forward only.
double evaluate(Job& job, data::PretrainingDataIterator& data) {
  const TrainingArguments& a = job.args;
  double total = 0;
  for (int step = 0; step < a.eval_iters; ++step) {
    pipeline::ScheduleOptions options = schedule_options(a, 1.0);
    options.forward_only = true;
    total += pipeline::forward_backward(job.chunk_pointers(), job.parallel,
                                        micro_batches_from(job, data), options)
                 .mean_lm_loss();
  }
  std::vector<double> mean = {total / a.eval_iters};
  average_over_data_parallel(mean, job.parallel);
  return mean[0];
}

// Megatron's evaluation banner; `what` says which split and when ("iteration 100 on validation
// data"). The scalars go under `tag` ("lm loss validation").
void log_evaluation(Job& job, ScalarLog* scalars, const std::string& what, const std::string& tag,
                    double loss) {
  const double perplexity = std::exp(std::min(loss, 20.0));
  const std::string line = concat(" validation loss at ", what, " | lm loss value: ", loss,
                                  " | lm loss PPL: ", perplexity, " |");
  const std::string rule(line.size() + 1, '-');
  job.say(rule + "\n" + line + "\n" + rule);
  if (scalars) {
    scalars->add(tag, loss, job.iteration);
    scalars->add(tag + " ppl", perplexity, job.iteration);
    scalars->flush();
  }
}

// One evaluation of the validation split at the current iteration, advancing its position.
void validate(Job& job, data::PretrainingDataIterator& data, ScalarLog* scalars,
              TrainingReport& report, const std::string& when) {
  double loss = evaluate(job, data);
  job.consumed_valid_samples += int64_t(job.args.eval_iters) * *job.args.global_batch_size;
  report.validation_losses.emplace_back(job.iteration, loss);
  log_evaluation(job, scalars, when + " on validation data", "lm loss validation", loss);
}

// Standard deviation over mean of relative loads (whose mean is 1): 0 for a perfectly even load.
double coefficient_of_variation(const std::vector<double>& load) {
  double squares = 0;
  for (double value : load) squares += (value - 1.0) * (value - 1.0);
  return std::sqrt(squares / double(load.size()));
}

// Megatron's name of depth k + 1's loss in the log and the scalars.
std::string mtp_loss_name(size_t k) {
  return concat("mtp_", k + 1, " loss");
}

void log_scalars(ScalarLog& scalars, const IterationStats& s, bool is_moe) {
  scalars.add("learning-rate", s.lr, s.iteration);
  scalars.add("lm loss", s.lm_loss, s.iteration);
  scalars.add("grad-norm", s.grad_norm, s.iteration);
  scalars.add("loss-scale", s.loss_scale, s.iteration);
  scalars.add("iteration-time-ms", s.elapsed_ms, s.iteration);
  scalars.add("tokens-per-second", s.tokens_per_second, s.iteration);
  scalars.add("consumed-samples", double(s.consumed_samples), s.iteration);
  if (is_moe) {
    scalars.add("load_balancing_loss", s.load_balancing_loss, s.iteration);
    scalars.add("z_loss", s.z_loss, s.iteration);
  }
  for (size_t k = 0; k < s.mtp_losses.size(); ++k) {
    scalars.add(mtp_loss_name(k), s.mtp_losses[k], s.iteration);
  }
  if (!s.expert_load.empty()) {
    auto [low, high] = std::minmax_element(s.expert_load.begin(), s.expert_load.end());
    scalars.add("expert-load-min", *low, s.iteration);
    scalars.add("expert-load-max", *high, s.iteration);
  }
  for (size_t layer = 0; layer < s.layer_expert_load.size(); ++layer) {
    const std::vector<double>& load = s.layer_expert_load[layer];
    if (load.empty()) continue;
    const std::string tag = "expert-load/layer-" + std::to_string(layer);
    auto [low, high] = std::minmax_element(load.begin(), load.end());
    scalars.add(tag + "-min", *low, s.iteration);
    scalars.add(tag + "-max", *high, s.iteration);
    scalars.add(tag + "-cv", coefficient_of_variation(load), s.iteration);
  }
  for (const IterationStats::BiasRange& range : s.expert_bias_ranges) {
    const std::string tag = "expert-bias/layer-" + std::to_string(range.layer);
    scalars.add(tag + "-min", range.min, s.iteration);
    scalars.add(tag + "-max", range.max, s.iteration);
  }
}

// Megatron's " [YYYY-MM-DD HH:MM:SS]" prefix of a log line (local time).
std::string timestamp() {
  std::time_t now = std::time(nullptr);
  std::tm local{};
  localtime_r(&now, &local);
  char text[32];
  std::strftime(text, sizeof(text), " [%Y-%m-%d %H:%M:%S]", &local);
  return text;
}

}  // namespace

std::string format_log_line(const std::vector<IterationStats>& window, int64_t train_iters,
                            int64_t global_batch_size) {
  MOE_CHECK(!window.empty(), "format_log_line needs at least one iteration");
  const IterationStats& last = window.back();
  double elapsed = 0, lm = 0, balance = 0, z = 0, tokens_per_second = 0;
  int skipped = 0, counted = 0, nan_iterations = 0;
  double load_min = 0, load_max = 0;
  bool has_load = false;
  std::vector<double> mtp(last.mtp_losses.size(), 0.0);
  for (const IterationStats& s : window) {
    elapsed += s.elapsed_ms;
    tokens_per_second += s.tokens_per_second;
    if (s.skipped) {
      ++skipped;
      continue;
    }
    if (!std::isfinite(s.lm_loss)) {
      ++nan_iterations;
      continue;
    }
    ++counted;
    lm += s.lm_loss;
    balance += s.load_balancing_loss;
    z += s.z_loss;
    for (size_t k = 0; k < mtp.size() && k < s.mtp_losses.size(); ++k) mtp[k] += s.mtp_losses[k];
    if (!s.expert_load.empty()) {
      auto [low, high] = std::minmax_element(s.expert_load.begin(), s.expert_load.end());
      load_min = has_load ? std::min(load_min, *low) : *low;
      load_max = has_load ? std::max(load_max, *high) : *high;
      has_load = true;
    }
  }
  const double n = double(window.size());
  char buffer[1024];
  std::string line;
  auto append = [&](const char* format, auto... values) {
    std::snprintf(buffer, sizeof(buffer), format, values...);
    line += buffer;
  };
  append(" iteration %8lld/%8lld |", static_cast<long long>(last.iteration),
         static_cast<long long>(train_iters));
  append(" consumed samples: %12lld |", static_cast<long long>(last.consumed_samples));
  append(" elapsed time per iteration (ms): %.1f |", elapsed / n);
  append(" tokens/s: %.0f |", tokens_per_second / n);
  append(" learning rate: %.6E |", last.lr);
  append(" global batch size: %5lld |", static_cast<long long>(global_batch_size));
  if (counted > 0) {
    append(" lm loss: %.6E |", lm / counted);
    if (has_load) {  // MoE model: its losses, as the routers report them
      append(" load_balancing_loss: %.6E |", balance / counted);
      if (z != 0) append(" z_loss: %.6E |", z / counted);
    }
    for (size_t k = 0; k < mtp.size(); ++k) {
      append(" %s: %.6E |", mtp_loss_name(k).c_str(), mtp[k] / counted);
    }
  }
  append(" loss scale: %.1f |", last.loss_scale);
  append(" grad norm: %.3f |", last.grad_norm);
  if (has_load) append(" expert load min/max: %.2f/%.2f |", load_min, load_max);
  if (!last.expert_bias_ranges.empty()) {  // the bias after the interval's last update
    double low = last.expert_bias_ranges.front().min, high = last.expert_bias_ranges.front().max;
    for (const IterationStats::BiasRange& range : last.expert_bias_ranges) {
      low = std::min(low, range.min);
      high = std::max(high, range.max);
    }
    append(" expert bias min/max: %.4f/%.4f |", low, high);
  }
  if (!last.stage_peak_activation_bytes.empty()) {
    line += " peak activation memory per stage (MiB):";
    for (size_t stage = 0; stage < last.stage_peak_activation_bytes.size(); ++stage) {
      append("%s%.1f", stage ? "/" : " ", last.stage_peak_activation_bytes[stage] / 1048576.0);
    }
    line += " |";
  }
  append(" number of skipped iterations: %3d |", skipped);
  if (skipped > 0) append(" (inf/NaN gradients: step skipped, loss scale lowered) |");
  append(" number of nan iterations: %3d |", nan_iterations);
  return line;
}

TrainingReport pretrain(const TrainingArguments& args, std::ostream& log) {
  comm::set_collective_timeout(60.0 * args.distributed_timeout_minutes);
  Job job(args, log);
  comm::ParallelSizes sizes;
  sizes.tp = args.tensor_model_parallel_size;
  sizes.pp = args.pipeline_model_parallel_size;
  sizes.ep = args.expert_model_parallel_size;
  sizes.etp = *args.expert_tensor_parallel_size;
  sizes.cp = args.context_parallel_size;
  job.parallel = comm::initialize_model_parallel(sizes);
  comm::fault_point("startup");
  MOE_CHECK(job.parallel.world_size == args.world_size, "the arguments were validated for ",
            args.world_size, " ranks but the job has ", job.parallel.world_size);
  job.is_logger = job.parallel.world_rank == 0;
  job.say(concat(
      "using world size: ", args.world_size, ", data-parallel size: ", args.data_parallel_size,
      ", context-parallel size: ", sizes.cp, ", tensor-model-parallel size: ", sizes.tp,
      ", pipeline-model-parallel size: ", sizes.pp, ", expert-model-parallel size: ", sizes.ep,
      ", expert-tensor-parallel size: ", sizes.etp,
      ", expert-data-parallel size: ", args.expert_data_parallel_size));
  for (const std::string& note : args.notes) job.say("note: " + note);
  job.say(concat("global batch size ", *args.global_batch_size, " = micro-batch size ",
                 *args.micro_batch_size, " x data-parallel size ", args.data_parallel_size, " x ",
                 args.num_micro_batches, " accumulated micro-batches"));

  job.random_streams = Rng(uint64_t(args.seed)).state();
  std::string setup_error;
  try {
    build_tokenizer(job);
    build_model_and_optimizer(job);
    load_checkpoint_if_any(job);
    build_datasets(job);
  } catch (const std::exception& error) {
    setup_error = error.what();
  }
  agree_on_input(job.parallel.world, setup_error);

  std::unique_ptr<ScalarLog> scalars;
  if (job.is_logger && (args.tensorboard_dir || args.log_file)) {
    // A resumed run continues the earlier run's --log-file instead of overwriting it.
    const bool resumed = job.iteration > 0;
    scalars = std::make_unique<ScalarLog>(args.tensorboard_dir, args.log_file, resumed);
    if (auto path = scalars->tensorboard_path()) job.say("> TensorBoard event file: " + *path);
  }

  const int64_t dp_rank = job.parallel.dp_group.rank(), dp = job.parallel.dp_group.size();
  data::PretrainingDataIterator train_data(job.datasets[0], job.consumed_train_samples,
                                           *args.micro_batch_size, dp_rank, dp, job.sample_options);
  std::optional<data::PretrainingDataIterator> valid_data;
  if (job.datasets[1] && args.eval_iters > 0) {
    valid_data.emplace(job.datasets[1], job.consumed_valid_samples, *args.micro_batch_size, dp_rank,
                       dp, job.sample_options);
  } else {
    job.say("> no validation: the validation split is empty or --eval-iters is 0");
  }

  TrainingReport report;
  report.start_iteration = job.iteration;
  std::vector<IterationStats> window;
  job.say(concat("> training from iteration ", job.iteration, " to ", *args.train_iters));
  bool saved_last = false;
  while (job.iteration < *args.train_iters) {
    IterationStats stats = train_step(job, train_data);
    report.iterations.push_back(stats);
    window.push_back(stats);
    saved_last = false;
    if (scalars && stats.iteration % args.tensorboard_log_interval == 0) {
      log_scalars(*scalars, stats, args.is_moe());
    }
    if (stats.iteration % args.log_interval == 0) {
      job.say(timestamp() + format_log_line(window, *args.train_iters, *args.global_batch_size));
      if (scalars) scalars->flush();
      window.clear();
    }
    if (valid_data && job.iteration % args.eval_interval == 0) {
      validate(job, *valid_data, scalars.get(), report, concat("iteration ", job.iteration));
    }
    if (args.save && job.iteration % *args.save_interval == 0) {
      save(job, report);
      saved_last = true;
    }
    if (args.exit_interval && job.iteration % *args.exit_interval == 0) {
      job.say(concat("exiting at iteration ", job.iteration, " (--exit-interval)"));
      break;
    }
  }
  if (!window.empty()) {
    job.say(timestamp() + format_log_line(window, *args.train_iters, *args.global_batch_size));
  }
  if (args.save && !saved_last && job.iteration > report.start_iteration) save(job, report);
  // As Megatron, a run that reaches --train-iters ends with the validation and test splits.
  if (job.iteration >= *args.train_iters && args.eval_iters > 0) {
    const std::string when = concat("the end of training (iteration ", job.iteration, ")");
    if (valid_data) validate(job, *valid_data, scalars.get(), report, when);
    if (job.datasets[2]) {
      data::PretrainingDataIterator test_data(job.datasets[2], 0, *args.micro_batch_size, dp_rank,
                                              dp, job.sample_options);
      report.test_loss = evaluate(job, test_data);
      log_evaluation(job, scalars.get(), when + " on test data", "lm loss test", *report.test_loss);
    }
  }
  if (scalars) scalars->flush();
  report.final_iteration = job.iteration;
  return report;
}

}  // namespace moe::train

// moe-train's command line: Megatron-LM's argument names, defaults and groups (taken from
// megatron/training/arguments.py at core_v0.15.0) for everything moecore supports.
//
//   parse_arguments   argv -> TrainingArguments, refusing Megatron arguments moecore does not
//                     support yet (by name) and unknown arguments (with the closest known name).
//   finalize_arguments fills Megatron's derived defaults (ffn size, global batch, ...) and checks
//                     every cross-flag constraint for a given world size, before any work starts.
//
// Both throw moe::Error with a message that names the flags involved. Field names are Megatron's
// `args.<dest>` names; std::optional marks arguments whose Megatron default is None.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "moe/pipeline/schedules.h"
#include "moe/tensor/error.h"

namespace moe::train {

struct TrainingArguments {
  // ---- network size
  std::optional<int> num_layers;
  std::optional<int> hidden_size;
  std::optional<int> ffn_hidden_size;  // default 4 * hidden, or the swiglu 8/3 rule (see .cc)
  std::optional<int> num_attention_heads;
  std::optional<int> kv_channels;  // default hidden / heads
  bool group_query_attention = false;
  int num_query_groups = 1;
  std::optional<int> max_position_embeddings;
  std::string position_embedding_type = "learned_absolute";  // learned_absolute|rope|yarn|none
  int rotary_base = 10000;
  bool add_position_embedding = true;  // --no-position-embedding clears it
  // YaRN (--position-embedding-type yarn); Megatron keeps the first three in its "mla" group.
  double rotary_scaling_factor = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  std::optional<int> yarn_original_max_position_embeddings;  // None: 4096
  std::optional<double> yarn_beta_fast;                      // None: 32
  std::optional<double> yarn_beta_slow;                      // None: 1
  std::optional<bool> yarn_correction_range_round_to_int;    // None: true
  std::optional<std::string> rope_type;  // rope | yarn; common attention accepts only rope
  bool add_qkv_bias = false;             // set by finalize_arguments with add_bias_linear
  bool qk_layernorm = false;
  int make_vocab_size_divisible_by = 128;
  std::string normalization = "LayerNorm";  // LayerNorm | RMSNorm
  double norm_epsilon = 1e-5;
  bool swiglu = false;
  bool untie_embeddings_and_output_weights = false;
  std::optional<int> mtp_num_layers;     // multi-token prediction depths (None or 0: off)
  double mtp_loss_scaling_factor = 0.1;  // the MTP losses' weight (their mean times this)

  // ---- multi-latent attention (Megatron's "mla" group)
  bool multi_latent_attention = false;
  std::optional<int> q_lora_rank;  // None: queries are not compressed (linear_q_proj)
  int kv_lora_rank = 32;
  int qk_head_dim = 128;
  int qk_pos_emb_head_dim = 64;
  int v_head_dim = 128;

  // ---- regularization
  double attention_dropout = 0.1;
  double hidden_dropout = 0.1;
  double weight_decay = 0.01;
  double clip_grad = 1.0;  // 0 disables clipping
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_eps = 1e-8;
  double sgd_momentum = 0.9;

  // ---- training
  std::optional<int> micro_batch_size;
  std::optional<int> global_batch_size;  // default micro_batch_size * data_parallel_size
  std::optional<std::string> recompute_granularity;  // full | selective
  std::vector<std::string> recompute_modules = {
      "core_attn"};  // with selective (Megatron's default)
  std::optional<long> train_iters;
  int log_interval = 100;
  std::optional<long> exit_interval;
  std::optional<std::string> tensorboard_dir;
  bool masked_softmax_fusion = true;  // --no-masked-softmax-fusion; no effect on CPU
  bool add_bias_linear = true;        // --disable-bias-linear clears it
  std::string optimizer = "adam";     // adam | sgd
  bool sequence_parallel = false;
  bool use_mcore_models = false;  // accepted: moecore has only the Megatron-Core model

  // ---- initialization
  int seed = 1234;
  double init_method_std = 0.02;

  // ---- learning rate
  std::optional<double> lr;
  std::string lr_decay_style = "linear";  // constant | linear | cosine | inverse-square-root
  std::optional<long> lr_decay_iters;     // default train_iters
  std::optional<double> lr_warmup_fraction;
  long lr_warmup_iters = 0;
  double lr_warmup_init = 0.0;
  double min_lr = 0.0;

  // ---- checkpointing
  std::optional<std::string> save;
  std::optional<long> save_interval;
  bool no_save_optim = false;
  bool no_save_rng = false;
  // Megatron's default: a NaN/inf loss or gradient stops the run (bf16/fp32; fp16 skips the step).
  bool check_for_nan_in_loss_and_grad = true;
  bool check_grad_reduction = false;  // moecore's own (OptimizerConfig::check_grad_reduction)
  std::optional<std::string> load;
  bool no_load_optim = false;
  bool no_load_rng = false;
  bool finetune = false;  // load model weights only, start at iteration 0
  bool exit_on_missing_checkpoint = false;

  // ---- mixed precision
  bool fp16 = false;
  bool bf16 = false;
  std::optional<double> loss_scale;          // static scale; dynamic scaling when unset (fp16)
  double initial_loss_scale = 4294967296.0;  // 2**32
  double min_loss_scale = 1.0;
  double loss_scale_window = 1000;
  int hysteresis = 2;

  // ---- distributed
  int tensor_model_parallel_size = 1;
  int pipeline_model_parallel_size = 1;
  // Virtual pipeline stages (the interleaved schedule; at most one of the two) and uneven first
  // and last pipeline stages.
  std::optional<int> num_layers_per_virtual_pipeline_stage;
  std::optional<int> num_virtual_stages_per_pipeline_rank;
  std::optional<int> decoder_first_pipeline_num_layers;
  std::optional<int> decoder_last_pipeline_num_layers;
  // Derived: model chunks per pipeline rank (Megatron's virtual_pipeline_model_parallel_size;
  // 1: no interleaving).
  int virtual_pipeline_model_parallel_size = 1;
  int context_parallel_size = 1;
  bool use_distributed_optimizer = false;
  int distributed_timeout_minutes = 10;  // collective timeout

  // ---- validation
  int eval_iters = 100;
  int eval_interval = 1000;

  // ---- tokenizer
  std::optional<int> vocab_size;  // NullTokenizer only
  std::optional<std::string> vocab_file;
  std::optional<std::string> merge_file;
  std::optional<std::string> tokenizer_type;
  std::optional<std::string> tokenizer_model;

  // ---- data and dataloader
  std::vector<std::string> data_path;  // "prefix ..." or "weight prefix ..." (a blend)
  std::string split = "969, 30, 1";    // train, valid, test weights of --data-path
  // A blend per split instead of --data-path + --split.
  std::vector<std::string> train_data_path, valid_data_path, test_data_path;
  bool mock_data = false;
  bool eod_mask_loss = false;  // exclude end-of-document targets from the loss
  std::optional<int> seq_length;

  // ---- logging
  std::string wandb_project, wandb_exp_name, wandb_entity, wandb_save_dir;  // accepted, unused
  int tensorboard_log_interval = 1;
  std::optional<std::string> log_file;  // moecore extension: CSV of the logged scalars

  // ---- moe
  int expert_model_parallel_size = 1;
  std::optional<int> expert_tensor_parallel_size;  // default tensor_model_parallel_size
  std::optional<int> num_experts;
  std::string moe_layer_freq = "1";  // N or a list expression such as "[0]+[1]*3" (layer_pattern.h)
  std::optional<int> moe_ffn_hidden_size;  // default ffn_hidden_size
  bool moe_grouped_gemm = false;
  // aux_loss | seq_aux_loss | global_aux_loss | sinkhorn | none, or several aux-loss types
  std::vector<std::string> moe_router_load_balancing_type = {"aux_loss"};
  std::string moe_router_score_function = "softmax";  // softmax | sigmoid
  int moe_router_topk = 2;
  bool moe_router_pre_softmax = false;
  std::optional<double> moe_router_topk_scaling_factor;
  std::vector<double> moe_aux_loss_coeff = {0.0};  // one per load-balancing type
  bool moe_router_enable_expert_bias = false;
  double moe_router_bias_update_rate = 1e-3;
  std::optional<int> moe_router_num_groups;
  std::optional<int> moe_router_group_topk;
  std::optional<std::string> moe_router_dtype;  // fp32 | fp64
  std::optional<double> moe_z_loss_coeff;
  std::optional<double> moe_input_jitter_eps;
  std::string moe_token_dispatcher_type = "allgather";  // allgather | alltoall
  std::optional<double> moe_expert_capacity_factor;
  bool moe_pad_expert_input_to_capacity = false;
  std::string moe_token_drop_policy = "probs";             // probs | position
  std::string moe_capacity_scope = "group";                // moecore's own: group | rank
  std::string moe_router_type = "topk";                    // moecore's own: topk | expert_choice
  std::optional<int> moe_shared_expert_intermediate_size;  // unset: no shared experts
  bool moe_shared_expert_gate = false;
  bool moe_shared_expert_overlap = false;  // accepted; nothing to overlap on this backend
  bool moe_use_upcycling = false;          // --load holds a dense checkpoint to upcycle
  int moe_upcycling_granularity = 1;       // dense ffn size / expert ffn size

  // ---- derived by finalize_arguments
  int world_size = 1;
  int data_parallel_size = 1;           // world / (tp * pp * cp)
  int expert_data_parallel_size = 1;    // world / (etp * ep * pp)
  int num_micro_batches = 1;            // global / (micro * dp)
  std::vector<bool> moe_layer_pattern;  // one entry per layer: true = MoE MLP
  std::vector<std::string> notes;       // things the user should know (ignored flags, adjustments)

  // The arguments as given, for checkpoint metadata.
  std::vector<std::string> command_line;

  bool is_moe() const { return num_experts.has_value(); }
};

struct ParseOutcome {
  TrainingArguments args;
  bool help_requested = false;
  std::string help_text;  // filled when help was requested
};

// Parses Megatron-style arguments (argv[0] excluded). Throws moe::Error for an unknown argument
// (naming the closest supported one), a Megatron argument moecore does not support yet, a bad
// value or choice, or a stray positional value.
ParseOutcome parse_arguments(const std::vector<std::string>& argv);

// Fills derived defaults and validates every constraint for `world_size` ranks. Idempotent.
void finalize_arguments(TrainingArguments& args, int world_size);

// The layer split over pipeline ranks and virtual stages the finalized arguments ask for
// (pipeline::pipeline_chunks).
pipeline::PipelineLayout pipeline_layout(const TrainingArguments& args);

// The full --help text (grouped as Megatron groups its arguments).
std::string help_text();

// Every argument name Megatron-LM defines ("--num-layers", ...), sorted; generated by
// scripts/megatron_argument_names.py from the release named in megatron_argument_names.cc.
const std::vector<std::string>& megatron_argument_names();
// The names moe-train accepts.
std::vector<std::string> supported_argument_names();

// Levenshtein distance, for "did you mean" suggestions.
int edit_distance(const std::string& a, const std::string& b);

}  // namespace moe::train

#include "moe/train/arguments.h"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <set>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "moe/data/gpt_dataset.h"
#include "moe/train/layer_pattern.h"

namespace moe::train {
namespace {

using detail::concat;

// Registers every supported argument on `app`, bound to the fields of `args`, under Megatron's
// group titles (so --help reads like Megatron's).
void register_arguments(CLI::App& app, TrainingArguments& a) {
  // As argparse: a repeated argument keeps its last value.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  auto group = [&](const char* title, auto&& add) {
    app.option_defaults()->group(title);
    add();
  };
  // Megatron's None-default arguments become std::optional; CLI11 sets them through a callback.
  auto optional_int = [&app](const char* name, std::optional<int>& field, const char* help) {
    app.add_option_function<int>(
        name, [&field](const int& v) { field = v; }, help);
  };
  auto optional_long = [&app](const char* name, std::optional<long>& field, const char* help) {
    app.add_option_function<long>(
        name, [&field](const long& v) { field = v; }, help);
  };
  auto optional_double = [&app](const char* name, std::optional<double>& field, const char* help) {
    app.add_option_function<double>(
        name, [&field](const double& v) { field = v; }, help);
  };
  auto optional_string = [&app](const char* name, std::optional<std::string>& field,
                                const char* help) {
    return app.add_option_function<std::string>(
        name, [&field](const std::string& v) { field = v; }, help);
  };
  // argparse's nargs='+': one or more values, and a repeated flag replaces the earlier list
  // (CLI11 would append to it).
  auto list_option = [&app](const char* name, auto& field, const char* help) {
    using List = std::decay_t<decltype(field)>;
    return app
        .add_option_function<List>(
            name, [&field](const List& values) { field = values; }, help)
        ->trigger_on_parse()
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  };
  auto clear_flag = [&app](const char* name, bool& field, const char* help) {
    app.add_flag_callback(
        name, [&field] { field = false; }, help);
  };

  group("network size", [&] {
    optional_int("--num-layers", a.num_layers, "Number of transformer layers.");
    optional_int("--hidden-size", a.hidden_size, "Transformer hidden size.");
    optional_int("--ffn-hidden-size", a.ffn_hidden_size,
                 "Transformer feed-forward hidden size (default 4 * hidden-size; with --swiglu "
                 "the largest multiple of 64 not above 8/3 * hidden-size).");
    optional_int("--num-attention-heads", a.num_attention_heads,
                 "Number of transformer attention heads.");
    optional_int("--kv-channels", a.kv_channels,
                 "Projection size of each attention head (default hidden-size / heads).");
    app.add_flag("--group-query-attention", a.group_query_attention, "Use group-query attention.");
    app.add_option("--num-query-groups", a.num_query_groups,
                   "Number of key/value groups with --group-query-attention.")
        ->capture_default_str();
    optional_int("--max-position-embeddings", a.max_position_embeddings,
                 "Maximum sequence length the position embedding covers.");
    app.add_option("--position-embedding-type", a.position_embedding_type,
                   "Position embedding type.")
        ->check(CLI::IsMember({"learned_absolute", "rope", "yarn", "none"}))
        ->capture_default_str();
    app.add_option("--rotary-base", a.rotary_base, "Base of the rotary position embedding.")
        ->capture_default_str();
    app.add_flag_callback(
        "--use-rotary-position-embeddings", [&a] { a.position_embedding_type = "rope"; },
        "Deprecated alias of --position-embedding-type rope.");
    clear_flag("--no-position-embedding", a.add_position_embedding,
               "Disable the learned position embedding (only with rope; deprecated in "
               "Megatron in favour of --position-embedding-type).");
    optional_int("--yarn-original-max-position-embeddings", a.yarn_original_max_position_embeddings,
                 "Context length the YaRN frequency correction starts from (default 4096).");
    optional_double("--yarn-beta-fast", a.yarn_beta_fast,
                    "YaRN: pairs turning more often than this keep their frequency (default 32).");
    optional_double("--yarn-beta-slow", a.yarn_beta_slow,
                    "YaRN: pairs turning less often than this are fully interpolated (default 1).");
    app.add_flag_callback(
        "--yarn-correction-range-round-to-int",
        [&a] { a.yarn_correction_range_round_to_int = true; },
        "Round the YaRN correction range to whole pairs (the default).");
    app.add_flag_callback(
        "--no-yarn-correction-range-round-to-int",
        [&a] { a.yarn_correction_range_round_to_int = false; },
        "Do not round the YaRN correction range.");
    app.add_option("--rotary-scaling-factor", a.rotary_scaling_factor,
                   "YaRN's context extension factor.")
        ->capture_default_str();
    app.add_option("--mscale", a.mscale, "YaRN attention-factor coefficient.")
        ->capture_default_str();
    app.add_option("--mscale-all-dim", a.mscale_all_dim,
                   "YaRN attention-factor coefficient the factor is divided by.")
        ->capture_default_str();
    optional_string("--rope-type", a.rope_type,
                    "Rotary kind of multi-latent attention; common attention takes only rope.")
        ->check(CLI::IsMember({"rope", "yarn"}));
    app.add_flag("--qk-layernorm", a.qk_layernorm,
                 "Normalise each query and key head (q_layernorm, k_layernorm); with "
                 "--multi-latent-attention the latents (q_layernorm, kv_layernorm).");
    app.add_flag("--add-qkv-bias", a.add_qkv_bias,
                 "A bias on linear_qkv even with --disable-bias-linear.");
    app.add_option("--make-vocab-size-divisible-by", a.make_vocab_size_divisible_by,
                   "Pad the vocabulary to a multiple of this value (times tensor parallel size).")
        ->capture_default_str();
    app.add_option("--normalization", a.normalization, "Normalization layer.")
        ->check(CLI::IsMember({"LayerNorm", "RMSNorm"}))
        ->capture_default_str();
    app.add_option("--norm-epsilon", a.norm_epsilon, "Epsilon of the normalization layers.")
        ->capture_default_str();
    app.add_flag("--swiglu", a.swiglu, "Use the SwiGLU (gated SiLU) MLP instead of GeLU.");
    app.add_flag("--untie-embeddings-and-output-weights", a.untie_embeddings_and_output_weights,
                 "Separate output-layer weights instead of reusing the word embedding.");
    app.add_flag("--multi-latent-attention", a.multi_latent_attention,
                 "Use DeepSeek's multi-latent attention (see the mla group).");
    optional_int("--mtp-num-layers", a.mtp_num_layers,
                 "Number of multi-token prediction (MTP) modules (DeepSeek-V3): module k predicts "
                 "the token k + 1 positions ahead.");
    app.add_option("--mtp-loss-scaling-factor", a.mtp_loss_scaling_factor,
                   "Weight of the MTP loss: the mean of the MTP modules' losses times this is "
                   "added to the training objective.")
        ->capture_default_str();
  });

  group("regularization", [&] {
    app.add_option("--attention-dropout", a.attention_dropout,
                   "Dropout probability on attention weights.")
        ->capture_default_str();
    app.add_option("--hidden-dropout", a.hidden_dropout,
                   "Dropout probability on transformer hidden states.")
        ->capture_default_str();
    app.add_option("--weight-decay", a.weight_decay,
                   "Decoupled weight decay (not applied to norms and biases).")
        ->capture_default_str();
    app.add_option("--clip-grad", a.clip_grad,
                   "Clip gradients to this global L2 norm (0 disables).")
        ->capture_default_str();
    app.add_option("--adam-beta1", a.adam_beta1, "Adam first-moment decay.")->capture_default_str();
    app.add_option("--adam-beta2", a.adam_beta2, "Adam second-moment decay.")
        ->capture_default_str();
    app.add_option("--adam-eps", a.adam_eps, "Adam denominator epsilon.")->capture_default_str();
    app.add_option("--sgd-momentum", a.sgd_momentum, "SGD momentum.")->capture_default_str();
  });

  group("training", [&] {
    optional_int("--micro-batch-size", a.micro_batch_size,
                 "Sequences per micro-batch per data-parallel rank.");
    optional_int("--global-batch-size", a.global_batch_size,
                 "Sequences per optimizer step over all ranks (default micro-batch-size * "
                 "data-parallel size); the rest is gradient accumulation.");
    optional_string("--recompute-granularity", a.recompute_granularity,
                    "Recompute activations in backward instead of storing them.")
        ->check(CLI::IsMember({"full", "selective"}));
    list_option("--recompute-modules", a.recompute_modules,
                "With --recompute-granularity selective, the modules recomputed in backward: "
                "core_attn, moe_act (needs --moe-grouped-gemm), layernorm, mlp, moe, "
                "shared_experts (default core_attn).");
    app.add_flag_callback(
        "--recompute-activations", [&a] { a.recompute_granularity = "selective"; },
        "Same as --recompute-granularity selective.");
    optional_long("--train-iters", a.train_iters, "Number of optimizer steps to train for.");
    app.add_option("--log-interval", a.log_interval, "Iterations between log lines.")
        ->capture_default_str();
    optional_long("--exit-interval", a.exit_interval,
                  "Stop (after saving when --save is set) once the iteration is a multiple of "
                  "this value.");
    optional_string("--tensorboard-dir", a.tensorboard_dir,
                    "Write TensorBoard event files of the logged scalars here.");
    clear_flag("--no-masked-softmax-fusion", a.masked_softmax_fusion,
               "Accepted; moecore has one softmax implementation on CPU.");
    clear_flag("--disable-bias-linear", a.add_bias_linear, "No biases in the linear layers.");
    clear_flag("--no-check-for-nan-in-loss-and-grad", a.check_for_nan_in_loss_and_grad,
               "Do not stop at a NaN or infinite loss or gradient (bf16/fp32 runs).");
    app.add_flag("--check-grad-reduction", a.check_grad_reduction,
                 "moecore: check the first step's gradient reductions (dense over dp x cp, "
                 "experts over expert-dp) against an fp64 sum, element by element.");
    app.add_option("--optimizer", a.optimizer, "Optimizer.")
        ->check(CLI::IsMember({"adam", "sgd"}))
        ->capture_default_str();
    app.add_flag("--sequence-parallel", a.sequence_parallel,
                 "Shard norms, dropout and residuals along the sequence over tensor-parallel "
                 "ranks.");
    app.add_flag("--use-mcore-models", a.use_mcore_models,
                 "Accepted; moecore only has the Megatron-Core model.");
  });

  group("initialization", [&] {
    app.add_option("--seed", a.seed, "Random seed.")->capture_default_str();
    app.add_option("--init-method-std", a.init_method_std,
                   "Standard deviation of the normal weight initialisation.")
        ->capture_default_str();
  });

  group("learning rate", [&] {
    optional_double("--lr", a.lr, "Peak learning rate (after warmup).");
    app.add_option("--lr-decay-style", a.lr_decay_style, "Learning-rate decay function.")
        ->check(CLI::IsMember({"constant", "linear", "cosine", "inverse-square-root"}))
        ->capture_default_str();
    optional_long("--lr-decay-iters", a.lr_decay_iters,
                  "Iterations to decay the learning rate over (default --train-iters).");
    optional_double("--lr-warmup-fraction", a.lr_warmup_fraction,
                    "Warmup length as a fraction of --lr-decay-iters.");
    app.add_option("--lr-warmup-iters", a.lr_warmup_iters,
                   "Iterations of linear learning-rate warmup.")
        ->capture_default_str();
    app.add_option("--lr-warmup-init", a.lr_warmup_init, "Learning rate at warmup start.")
        ->capture_default_str();
    app.add_option("--min-lr", a.min_lr, "Learning rate floor of the decay.")
        ->capture_default_str();
  });

  group("checkpointing", [&] {
    optional_string("--save", a.save, "Directory to save checkpoints to.");
    optional_long("--save-interval", a.save_interval, "Iterations between checkpoint saves.");
    app.add_flag("--no-save-optim", a.no_save_optim, "Do not save optimizer state.");
    app.add_flag("--no-save-rng", a.no_save_rng, "Do not save random-number-generator state.");
    optional_string("--load", a.load, "Directory to load a checkpoint from.");
    app.add_flag("--no-load-optim", a.no_load_optim,
                 "Do not load optimizer state (fresh optimizer).");
    app.add_flag("--no-load-rng", a.no_load_rng, "Do not load random-number-generator state.");
    app.add_flag("--finetune", a.finetune, "Load model weights only and start from iteration 0.");
    app.add_flag("--exit-on-missing-checkpoint", a.exit_on_missing_checkpoint,
                 "Fail when --load holds no checkpoint instead of starting from scratch.");
  });

  group("mixed precision", [&] {
    app.add_flag("--fp16", a.fp16, "fp16 parameters and activations, dynamic loss scaling.");
    app.add_flag("--bf16", a.bf16, "bf16 parameters and activations.");
    optional_double("--loss-scale", a.loss_scale,
                    "Static loss scale for fp16 (dynamic scaling when unset).");
    app.add_option("--initial-loss-scale", a.initial_loss_scale, "Starting dynamic loss scale.")
        ->capture_default_str();
    app.add_option("--min-loss-scale", a.min_loss_scale, "Lowest dynamic loss scale.")
        ->capture_default_str();
    app.add_option("--loss-scale-window", a.loss_scale_window,
                   "Overflow-free iterations before the dynamic scale doubles.")
        ->capture_default_str();
    app.add_option("--hysteresis", a.hysteresis,
                   "Overflows tolerated before the dynamic scale halves.")
        ->capture_default_str();
  });

  group("distributed", [&] {
    app.add_option("--tensor-model-parallel-size", a.tensor_model_parallel_size,
                   "Tensor model parallel degree.")
        ->capture_default_str();
    app.add_option("--pipeline-model-parallel-size", a.pipeline_model_parallel_size,
                   "Pipeline model parallel degree.")
        ->capture_default_str();
    app.add_option("--num-layers-per-virtual-pipeline-stage",
                   a.num_layers_per_virtual_pipeline_stage,
                   "Layers per virtual pipeline stage (interleaved schedule).");
    app.add_option("--num-virtual-stages-per-pipeline-rank", a.num_virtual_stages_per_pipeline_rank,
                   "Virtual pipeline stages (model chunks) per pipeline rank (interleaved "
                   "schedule).");
    app.add_option("--decoder-first-pipeline-num-layers", a.decoder_first_pipeline_num_layers,
                   "Layers of the first pipeline stage (the rest split over the others).");
    app.add_option("--decoder-last-pipeline-num-layers", a.decoder_last_pipeline_num_layers,
                   "Layers of the last pipeline stage (the rest split over the others).");
    app.add_option("--context-parallel-size", a.context_parallel_size,
                   "Context parallel degree: the sequence is split over cp ranks in 2 x cp "
                   "load-balanced chunks; attention all-gathers K/V over cp.")
        ->capture_default_str();
    app.add_flag("--use-distributed-optimizer", a.use_distributed_optimizer,
                 "Shard optimizer state over data-parallel ranks (ZeRO-1).");
    app.add_option("--distributed-timeout-minutes", a.distributed_timeout_minutes,
                   "Minutes a collective waits for its peers before every rank fails.")
        ->capture_default_str();
  });

  group("validation", [&] {
    app.add_option("--eval-iters", a.eval_iters, "Validation micro-batch rounds per evaluation.")
        ->capture_default_str();
    app.add_option("--eval-interval", a.eval_interval, "Iterations between evaluations.")
        ->capture_default_str();
  });

  group("data and dataloader", [&] {
    app.add_option("--data-path", a.data_path,
                   "Dataset prefix(es) of .bin/.idx pairs, optionally weighted: "
                   "'prefix' or 'w1 prefix1 w2 prefix2 ...'.")
        ->expected(1, -1)
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    for (auto [flag, field] : {std::pair{"--train-data-path", &a.train_data_path},
                               std::pair{"--valid-data-path", &a.valid_data_path},
                               std::pair{"--test-data-path", &a.test_data_path}}) {
      app.add_option(flag, *field, "Dataset prefix(es) of this split only, as --data-path.")
          ->expected(1, -1)
          ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    }
    app.add_option("--split", a.split, "Comma-separated train,valid,test weights of the documents.")
        ->capture_default_str();
    app.add_flag("--eod-mask-loss", a.eod_mask_loss,
                 "Leave end-of-document target tokens out of the loss.");
    app.add_flag("--mock-data", a.mock_data,
                 "Train on deterministic random tokens instead of --data-path.");
    optional_int("--seq-length", a.seq_length, "Tokens per training sequence.");
  });

  group("tokenizer", [&] {
    optional_int("--vocab-size", a.vocab_size, "Vocabulary size of the NullTokenizer.");
    optional_string("--vocab-file", a.vocab_file, "GPT-2 BPE vocabulary (vocab.json).");
    optional_string("--merge-file", a.merge_file, "GPT-2 BPE merges (merges.txt).");
    optional_string("--tokenizer-type", a.tokenizer_type, "Tokenizer.")
        ->check(CLI::IsMember({"GPT2BPETokenizer", "SentencePieceTokenizer",
                               "GPTSentencePieceTokenizer", "Llama2Tokenizer", "NullTokenizer",
                               "ByteTokenizer"}));
    optional_string("--tokenizer-model", a.tokenizer_model, "SentencePiece model file.");
  });

  group("moe", [&] {
    app.add_option("--expert-model-parallel-size", a.expert_model_parallel_size,
                   "Expert model parallel degree.")
        ->capture_default_str();
    optional_int("--expert-tensor-parallel-size", a.expert_tensor_parallel_size,
                 "Tensor parallel degree of the experts (default tensor-model-parallel-size).");
    optional_int("--num-experts", a.num_experts, "Experts per MoE layer (unset: dense model).");
    app.add_option("--moe-layer-freq", a.moe_layer_freq,
                   "MoE layer pattern: N (layer i is MoE when i % N == 0) or a Python-style "
                   "0/1 list expression such as '[0]*3+[1]*58' or '([1]*3+[0])*8'.")
        ->capture_default_str();
    optional_int("--moe-ffn-hidden-size", a.moe_ffn_hidden_size,
                 "Expert feed-forward size (default ffn-hidden-size).");
    app.add_flag("--moe-grouped-gemm", a.moe_grouped_gemm,
                 "Run a rank's local experts as one grouped GEMM.");
    list_option("--moe-router-load-balancing-type", a.moe_router_load_balancing_type,
                "Load-balancing strategy of the router (default aux_loss); several aux-loss "
                "types may be listed, each with its --moe-aux-loss-coeff.")
        ->check(CLI::IsMember({"aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"}));
    app.add_option("--moe-router-score-function", a.moe_router_score_function,
                   "Router score function.")
        ->check(CLI::IsMember({"softmax", "sigmoid"}))
        ->capture_default_str();
    app.add_option("--moe-router-topk", a.moe_router_topk, "Experts each token is routed to.")
        ->capture_default_str();
    app.add_flag("--moe-router-pre-softmax", a.moe_router_pre_softmax,
                 "Softmax over all experts before top-k (instead of after).");
    optional_double("--moe-router-topk-scaling-factor", a.moe_router_topk_scaling_factor,
                    "Scale applied to the top-k routing probabilities.");
    list_option("--moe-aux-loss-coeff", a.moe_aux_loss_coeff,
                "Coefficient of the load-balancing loss (default 0; 1e-2 is a good start), one "
                "per --moe-router-load-balancing-type.");
    app.add_flag("--moe-router-enable-expert-bias", a.moe_router_enable_expert_bias,
                 "Aux-loss-free balancing: a per-expert bias on the selection scores, updated "
                 "every step (needs --moe-router-score-function sigmoid).");
    app.add_option("--moe-router-bias-update-rate", a.moe_router_bias_update_rate,
                   "Step of the expert-bias update.")
        ->capture_default_str();
    optional_int("--moe-router-num-groups", a.moe_router_num_groups,
                 "Group-limited routing: the number of expert groups.");
    optional_int("--moe-router-group-topk", a.moe_router_group_topk,
                 "Group-limited routing: the groups each token may use.");
    optional_string("--moe-router-dtype", a.moe_router_dtype,
                    "Precision of the router's logits, scores and losses (default fp32).")
        ->check(CLI::IsMember({"fp32", "fp64"}));
    optional_double("--moe-z-loss-coeff", a.moe_z_loss_coeff,
                    "Coefficient of the router z-loss (1e-3 is a good start).");
    optional_double("--moe-input-jitter-eps", a.moe_input_jitter_eps,
                    "Multiplicative uniform jitter of the router input.");
    app.add_option("--moe-token-dispatcher-type", a.moe_token_dispatcher_type,
                   "How tokens reach their experts across expert-parallel ranks.")
        ->check(CLI::IsMember({"allgather", "alltoall"}))
        ->capture_default_str();
    optional_double("--moe-expert-capacity-factor", a.moe_expert_capacity_factor,
                    "Expert capacity as a multiple of the even share (unset: dropless).");
    app.add_flag("--moe-pad-expert-input-to-capacity", a.moe_pad_expert_input_to_capacity,
                 "Pad every expert's input to its capacity.");
    app.add_option("--moe-token-drop-policy", a.moe_token_drop_policy,
                   "Which tokens an over-capacity expert drops.")
        ->check(CLI::IsMember({"probs", "position"}))
        ->capture_default_str();
    app.add_option("--moe-capacity-scope", a.moe_capacity_scope,
                   "moecore's own: the tokens an expert's capacity is decided over: group (the "
                   "expert-parallel group's batch, the same drops in every layout) or rank "
                   "(each rank's own tokens, as Megatron does).")
        ->check(CLI::IsMember({"group", "rank"}))
        ->capture_default_str();
    app.add_option("--moe-router-type", a.moe_router_type,
                   "moecore's own: topk (Megatron's router) or expert_choice (each expert takes "
                   "its highest-scoring tokens; needs --moe-expert-capacity-factor).")
        ->check(CLI::IsMember({"topk", "expert_choice"}))
        ->capture_default_str();
    optional_int("--moe-shared-expert-intermediate-size", a.moe_shared_expert_intermediate_size,
                 "Width of the shared experts' MLP (number of shared experts x the ffn size of "
                 "each), which every token passes through beside the routed experts.");
    app.add_flag("--moe-shared-expert-gate", a.moe_shared_expert_gate,
                 "Scale the shared experts' output by sigmoid(x . gate_weight) (Qwen2-MoE).");
    app.add_flag("--moe-shared-expert-overlap", a.moe_shared_expert_overlap,
                 "Accepted; collectives block on this CPU backend, so there is nothing to "
                 "overlap the shared experts with.");
    app.add_flag("--moe-use-upcycling", a.moe_use_upcycling,
                 "--load holds a dense model's checkpoint: each expert starts as a copy of its "
                 "layer's dense MLP (docs/moe-train.md).");
    app.add_option("--moe-upcycling-granularity", a.moe_upcycling_granularity,
                   "How many times the dense ffn size is the expert ffn size: each expert takes "
                   "one of that many slices of the dense MLP.")
        ->capture_default_str();
  });

  group("mla", [&] {
    optional_int("--q-lora-rank", a.q_lora_rank,
                 "Rank of the query's low-rank projection (unset: no query compression).");
    app.add_option("--kv-lora-rank", a.kv_lora_rank,
                   "Rank of the keys' and values' low-rank projection.")
        ->capture_default_str();
    app.add_option("--qk-head-dim", a.qk_head_dim,
                   "Query/key head size without the rotary part (query head size = qk-head-dim + "
                   "qk-pos-emb-head-dim).")
        ->capture_default_str();
    app.add_option("--qk-pos-emb-head-dim", a.qk_pos_emb_head_dim,
                   "Size of the rotary part of each query/key head.")
        ->capture_default_str();
    app.add_option("--v-head-dim", a.v_head_dim, "Value head size.")->capture_default_str();
  });

  group("logging", [&] {
    app.add_option("--tensorboard-log-interval", a.tensorboard_log_interval,
                   "Iterations between TensorBoard scalar writes.")
        ->capture_default_str();
    app.add_option("--wandb-project", a.wandb_project,
                   "Accepted for script compatibility and ignored (moecore has no network "
                   "logging; use --tensorboard-dir or --log-file).");
    app.add_option("--wandb-exp-name", a.wandb_exp_name, "Accepted and ignored (see above).");
    app.add_option("--wandb-entity", a.wandb_entity, "Accepted and ignored (see above).");
    app.add_option("--wandb-save-dir", a.wandb_save_dir, "Accepted and ignored (see above).");
    optional_string("--log-file", a.log_file,
                    "moecore extension: write every logged scalar as CSV rows to this file.");
  });
  app.option_defaults()->group("Options");
}

std::string strip_dashes(const std::string& name) {
  size_t start = name.find_first_not_of('-');
  return start == std::string::npos ? name : name.substr(start);
}

// Refuses the first unparsed token: a Megatron argument we lack, a typo, or a stray value.
[[noreturn]] void refuse_extra(const std::vector<std::string>& extras) {
  const std::string& token = extras.front();
  if (token.rfind("--", 0) != 0) {
    throw Error(concat("unexpected value '", token,
                       "': moe-train takes no positional arguments (presence flags such as "
                       "--bf16 take no value)"));
  }
  std::string name = token.substr(0, token.find('='));
  const auto& megatron = megatron_argument_names();
  if (std::binary_search(megatron.begin(), megatron.end(), name)) {
    throw Error(
        concat("argument ", name, " is a Megatron-LM argument that moecore does not support yet"));
  }
  std::string best;
  int best_distance = 1 << 30;
  for (const std::string& candidate : supported_argument_names()) {
    int distance = edit_distance(strip_dashes(name), strip_dashes(candidate));
    if (distance < best_distance) {
      best_distance = distance;
      best = candidate;
    }
  }
  int tolerance = std::max<int>(3, int(strip_dashes(name).size()) / 3);
  if (best_distance <= tolerance) {
    throw Error(concat("unknown argument ", name, "; did you mean ", best, "?"));
  }
  throw Error(concat("unknown argument ", name, "; see moe-train --help for the arguments"));
}

void require(bool present, const char* flag) {
  MOE_CHECK(present, "argument ", flag, " is required");
}

void require_positive(long value, const char* flag) {
  MOE_CHECK(value > 0, "argument ", flag, " must be positive (got ", value, ")");
}

// Megatron's virtual pipeline size from --num-layers-per-virtual-pipeline-stage or
// --num-virtual-stages-per-pipeline-rank, and the layer split checked (pipeline_chunks gives
// Megatron's reasons).
void set_pipeline_layout(TrainingArguments& a) {
  const int pp = a.pipeline_model_parallel_size, layers = *a.num_layers;
  const auto& per_stage = a.num_layers_per_virtual_pipeline_stage;
  const auto& per_rank = a.num_virtual_stages_per_pipeline_rank;
  const auto& first = a.decoder_first_pipeline_num_layers;
  const auto& last = a.decoder_last_pipeline_num_layers;
  MOE_CHECK(!(per_stage && per_rank),
            "No more than one of the following arguments can be set at the same time: "
            "--num-layers-per-virtual-pipeline-stage (",
            per_stage.value_or(0), "), --num-virtual-stages-per-pipeline-rank (",
            per_rank.value_or(0), ")");
  if (first) require_positive(*first, "--decoder-first-pipeline-num-layers");
  if (last) require_positive(*last, "--decoder-last-pipeline-num-layers");
  a.virtual_pipeline_model_parallel_size = 1;
  if (per_stage) {
    require_positive(*per_stage, "--num-layers-per-virtual-pipeline-stage");
    MOE_CHECK(!first && !last,
              "please use --num-virtual-stages-per-pipeline-rank to specify virtual pipeline "
              "parallel degree when enable uneven pipeline parallelism");
    MOE_CHECK(layers % pp == 0, "--num-layers (", layers,
              ") is not divisible by --pipeline-model-parallel-size (", pp, ")");
    MOE_CHECK(layers / pp % *per_stage == 0, "number of layers per pipeline stage (", layers / pp,
              ") must be divisible by --num-layers-per-virtual-pipeline-stage (", *per_stage, ")");
    a.virtual_pipeline_model_parallel_size = layers / pp / *per_stage;
  } else if (per_rank) {
    require_positive(*per_rank, "--num-virtual-stages-per-pipeline-rank");
    a.virtual_pipeline_model_parallel_size = *per_rank;
  }
  MOE_CHECK(a.virtual_pipeline_model_parallel_size == 1 || pp > 1,
            "When interleaved schedule is used, pipeline-model-parallel size should be greater "
            "than 1 (--pipeline-model-parallel-size ",
            pp, ")");
  if (a.virtual_pipeline_model_parallel_size == 1 && !first && !last) {
    MOE_CHECK(layers % pp == 0, "--num-layers (", layers,
              ") is not divisible by --pipeline-model-parallel-size (", pp, ")");
  }
  pipeline::pipeline_chunks(layers, pipeline_layout(a), pp, 0);
}

// NaN and inf pass or fail the range checks by accident, so every real-valued flag is checked
// for finiteness first.
void require_finite(double value, const char* flag) {
  MOE_CHECK(std::isfinite(value), "argument ", flag, " must be a finite number (got ", value, ")");
}

void require_finite_positive(double value, const char* flag) {
  require_finite(value, flag);
  MOE_CHECK(value > 0, "argument ", flag, " must be positive (got ", value, ")");
}

// --moe-router-type expert_choice: each expert takes ceil(tokens x --moe-expert-capacity-factor
// / --num-experts) tokens, so the factor is required, and the per-token top-k settings and a
// load-balancing loss (the load is even by construction) are refused.
void check_expert_choice_flags(const TrainingArguments& a) {
  const char* with = " with --moe-router-type expert_choice";
  MOE_CHECK(a.moe_expert_capacity_factor,
            "--moe-router-type expert_choice needs --moe-expert-capacity-factor (each expert "
            "takes ceil(tokens x factor / --num-experts) tokens)");
  MOE_CHECK(a.moe_router_topk == 2, "--moe-router-topk (", a.moe_router_topk, ") has no meaning",
            with, " (experts pick their tokens; leave it at its default)");
  MOE_CHECK(a.moe_router_score_function == "softmax", "--moe-router-score-function ",
            a.moe_router_score_function, " is not supported", with, " (scores are a softmax)");
  MOE_CHECK(!a.moe_router_pre_softmax, "--moe-router-pre-softmax has no meaning", with);
  MOE_CHECK(!a.moe_router_num_groups && !a.moe_router_group_topk,
            "--moe-router-num-groups / --moe-router-group-topk have no meaning", with);
  MOE_CHECK(!a.moe_router_topk_scaling_factor, "--moe-router-topk-scaling-factor has no meaning",
            with);
  MOE_CHECK(a.moe_token_drop_policy == "probs", "--moe-token-drop-policy ", a.moe_token_drop_policy,
            " has no meaning", with, " (experts take their highest-scoring tokens)");
  for (double coeff : a.moe_aux_loss_coeff) {
    MOE_CHECK(coeff == 0, "--moe-aux-loss-coeff (", coeff, ") must be 0", with,
              " (every expert takes the same number of tokens)");
  }
}

bool uses_sinkhorn(const TrainingArguments& a) {
  const auto& types = a.moe_router_load_balancing_type;
  return std::find(types.begin(), types.end(), "sinkhorn") != types.end();
}

// The router's balancing, expert-bias and group-limited routing flags (Megatron's rules).
void check_router_arguments(const TrainingArguments& a, int experts) {
  const auto& types = a.moe_router_load_balancing_type;
  const auto& coeffs = a.moe_aux_loss_coeff;
  MOE_CHECK(coeffs.size() == types.size(), "--moe-aux-loss-coeff has ", coeffs.size(),
            " value(s) but --moe-router-load-balancing-type has ", types.size(),
            " (one coefficient per type)");
  for (double coeff : coeffs) {
    MOE_CHECK(coeff >= 0, "--moe-aux-loss-coeff (", coeff, ") must not be negative");
  }
  for (const std::string& type : types) {
    MOE_CHECK(types.size() == 1 || type.ends_with("aux_loss"), "--moe-router-load-balancing-type ",
              type,
              " cannot be listed with other types (only aux_loss, seq_aux_loss and "
              "global_aux_loss can)");
    MOE_CHECK(std::count(types.begin(), types.end(), type) == 1,
              "--moe-router-load-balancing-type lists ", type, " twice");
  }
  MOE_CHECK(!(uses_sinkhorn(a) && coeffs[0] > 0),
            "--moe-router-load-balancing-type sinkhorn "
            "does not support an aux loss (--moe-aux-loss-coeff is ",
            coeffs[0], ")");
  if (a.moe_router_enable_expert_bias) {
    MOE_CHECK(a.moe_router_score_function == "sigmoid",
              "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (got ",
              a.moe_router_score_function, ")");
    MOE_CHECK(!uses_sinkhorn(a),
              "--moe-router-enable-expert-bias does not work with "
              "--moe-router-load-balancing-type sinkhorn");
    MOE_CHECK(!a.moe_pad_expert_input_to_capacity,
              "--moe-router-enable-expert-bias does not work with "
              "--moe-pad-expert-input-to-capacity (every expert's load is its capacity)");
  }
  MOE_CHECK(a.moe_router_bias_update_rate >= 0, "--moe-router-bias-update-rate (",
            a.moe_router_bias_update_rate, ") must not be negative");
  const auto& groups = a.moe_router_num_groups;
  const auto& group_topk = a.moe_router_group_topk;
  MOE_CHECK(groups.has_value() == group_topk.has_value(),
            "group-limited routing needs both --moe-router-num-groups and "
            "--moe-router-group-topk");
  if (!groups) return;
  MOE_CHECK(*groups >= 1 && experts % *groups == 0, "--moe-router-num-groups (", *groups,
            ") must be positive and divide --num-experts (", experts, ")");
  MOE_CHECK(*group_topk >= 1 && *group_topk <= *groups, "--moe-router-group-topk (", *group_topk,
            ") must be between 1 and --moe-router-num-groups (", *groups, ")");
  MOE_CHECK(a.moe_router_topk % *group_topk == 0, "--moe-router-topk (", a.moe_router_topk,
            ") must be divisible by --moe-router-group-topk (", *group_topk, ")");
  MOE_CHECK(a.moe_router_topk / *group_topk <= experts / *groups,
            "--moe-router-topk / --moe-router-group-topk (", a.moe_router_topk / *group_topk,
            ") must not exceed the experts per group (--num-experts / --moe-router-num-groups = ",
            experts / *groups, ")");
  MOE_CHECK(!uses_sinkhorn(a),
            "--moe-router-num-groups does not work with "
            "--moe-router-load-balancing-type sinkhorn");
}

// Every real-valued argument, present or defaulted, with its flag.
void require_finite_reals(const TrainingArguments& a) {
  const std::pair<const char*, double> always[] = {
      {"--lr", *a.lr},
      {"--min-lr", a.min_lr},
      {"--lr-warmup-init", a.lr_warmup_init},
      {"--weight-decay", a.weight_decay},
      {"--clip-grad", a.clip_grad},
      {"--adam-beta1", a.adam_beta1},
      {"--adam-beta2", a.adam_beta2},
      {"--adam-eps", a.adam_eps},
      {"--sgd-momentum", a.sgd_momentum},
      {"--attention-dropout", a.attention_dropout},
      {"--hidden-dropout", a.hidden_dropout},
      {"--init-method-std", a.init_method_std},
      {"--norm-epsilon", a.norm_epsilon},
      {"--rotary-base", a.rotary_base},
      {"--initial-loss-scale", a.initial_loss_scale},
      {"--min-loss-scale", a.min_loss_scale},
      {"--moe-router-bias-update-rate", a.moe_router_bias_update_rate}};
  for (const auto& [flag, value] : always) require_finite(value, flag);
  for (double coeff : a.moe_aux_loss_coeff) require_finite(coeff, "--moe-aux-loss-coeff");
  const std::pair<const char*, const std::optional<double>*> optional[] = {
      {"--lr-warmup-fraction", &a.lr_warmup_fraction},
      {"--loss-scale", &a.loss_scale},
      {"--moe-router-topk-scaling-factor", &a.moe_router_topk_scaling_factor},
      {"--moe-z-loss-coeff", &a.moe_z_loss_coeff},
      {"--moe-input-jitter-eps", &a.moe_input_jitter_eps},
      {"--moe-expert-capacity-factor", &a.moe_expert_capacity_factor}};
  for (const auto& [flag, value] : optional) {
    if (*value) require_finite(**value, flag);
  }
}

// The one form of note every accepted flag that changes nothing here prints.
std::string no_effect_note(std::string_view flag, std::string_view reason) {
  return detail::concat(flag, " is accepted and has no effect: ", reason);
}

void check_shared_experts_and_upcycling(TrainingArguments& a, int experts) {
  const int tp = a.tensor_model_parallel_size;
  if (a.moe_shared_expert_intermediate_size) {
    const int shared = *a.moe_shared_expert_intermediate_size;
    MOE_CHECK(shared > 0,
              "--moe-shared-expert-intermediate-size must be the number of shared "
              "experts times the ffn size of each, a positive number (got ",
              shared, ")");
    MOE_CHECK(shared % tp == 0, "--moe-shared-expert-intermediate-size (", shared,
              ") is not divisible by --tensor-model-parallel-size (", tp, ")");
    MOE_CHECK(!a.add_bias_linear,
              "--moe-shared-expert-intermediate-size needs "
              "--disable-bias-linear (shared experts have no biases, as in Megatron-LM)");
    MOE_CHECK(!a.moe_shared_expert_overlap || a.moe_token_dispatcher_type == "alltoall",
              "--moe-shared-expert-overlap only works with --moe-token-dispatcher-type alltoall "
              "(as in Megatron-LM)");
    if (a.moe_shared_expert_overlap) {
      a.notes.push_back(no_effect_note("--moe-shared-expert-overlap",
                                       "collectives block on this CPU backend, so the shared "
                                       "experts run before the router as without it"));
    }
  } else if (a.moe_shared_expert_gate || a.moe_shared_expert_overlap) {
    a.notes.push_back(
        "--moe-shared-expert-gate and --moe-shared-expert-overlap are ignored without "
        "--moe-shared-expert-intermediate-size");
  }
  require_positive(a.moe_upcycling_granularity, "--moe-upcycling-granularity");
  if (!a.moe_use_upcycling) return;
  const int granularity = a.moe_upcycling_granularity;
  MOE_CHECK(experts % granularity == 0, "--num-experts (", experts,
            ") must be divisible by --moe-upcycling-granularity (", granularity,
            "): each group of that many experts holds one copy of the dense MLP");
  require(a.load.has_value(), "--load (the dense checkpoint, with --moe-use-upcycling)");
  // As Megatron: the dense run's optimizer state and random streams do not fit the MoE model.
  if (!a.no_load_optim) {
    a.no_load_optim = true;
    a.notes.push_back("enabling --no-load-optim for upcycling");
  }
  if (!a.no_load_rng) {
    a.no_load_rng = true;
    a.notes.push_back("enabling --no-load-rng for upcycling");
  }
}

}  // namespace

int edit_distance(const std::string& a, const std::string& b) {
  std::vector<int> previous(b.size() + 1), current(b.size() + 1);
  std::iota(previous.begin(), previous.end(), 0);
  for (size_t i = 1; i <= a.size(); ++i) {
    current[0] = int(i);
    for (size_t j = 1; j <= b.size(); ++j) {
      int substitution = previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      current[j] = std::min({previous[j] + 1, current[j - 1] + 1, substitution});
    }
    std::swap(previous, current);
  }
  return previous[b.size()];
}

std::vector<std::string> supported_argument_names() {
  TrainingArguments scratch;
  CLI::App app;
  register_arguments(app, scratch);
  std::vector<std::string> names;
  for (const CLI::Option* option : app.get_options()) {
    for (const std::string& long_name : option->get_lnames()) names.push_back("--" + long_name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::string help_text() {
  TrainingArguments scratch;
  CLI::App app(
      "moe-train: Megatron-style MoE GPT training on MPI.\n"
      "Launch: mpirun -np N moe-train <Megatron-LM arguments>",
      "moe-train");
  register_arguments(app, scratch);
  return app.help();
}

ParseOutcome parse_arguments(const std::vector<std::string>& argv) {
  ParseOutcome outcome;
  CLI::App app(
      "moe-train: Megatron-style MoE GPT training on MPI.\n"
      "Launch: mpirun -np N moe-train <Megatron-LM arguments>",
      "moe-train");
  app.allow_extras();
  register_arguments(app, outcome.args);
  // CLI11 parses a reversed vector (last element first).
  std::vector<std::string> reversed(argv.rbegin(), argv.rend());
  try {
    app.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    outcome.help_requested = true;
    outcome.help_text = app.help();
    return outcome;
  } catch (const CLI::ParseError& error) {
    throw Error(concat("bad argument: ", error.what()));
  }
  if (!app.remaining().empty()) refuse_extra(app.remaining());
  outcome.args.command_line = argv;
  return outcome;
}

pipeline::PipelineLayout pipeline_layout(const TrainingArguments& a) {
  return {a.virtual_pipeline_model_parallel_size, a.decoder_first_pipeline_num_layers.value_or(0),
          a.decoder_last_pipeline_num_layers.value_or(0)};
}

void finalize_arguments(TrainingArguments& a, int world_size) {
  MOE_CHECK(world_size >= 1, "world size must be positive (got ", world_size, ")");
  a.world_size = world_size;
  a.notes.clear();

  require(a.num_layers.has_value(), "--num-layers");
  require(a.hidden_size.has_value(), "--hidden-size");
  require(a.num_attention_heads.has_value(), "--num-attention-heads");
  require(a.seq_length.has_value(), "--seq-length");
  require(a.micro_batch_size.has_value(), "--micro-batch-size");
  require(a.train_iters.has_value(), "--train-iters");
  require(a.lr.has_value(), "--lr");
  require_positive(*a.num_layers, "--num-layers");
  require_positive(*a.hidden_size, "--hidden-size");
  require_positive(*a.num_attention_heads, "--num-attention-heads");
  require_positive(*a.seq_length, "--seq-length");
  require_positive(*a.micro_batch_size, "--micro-batch-size");
  require_positive(*a.train_iters, "--train-iters");
  require_positive(a.log_interval, "--log-interval");
  require_positive(a.eval_interval, "--eval-interval");
  MOE_CHECK(a.eval_iters >= 0, "argument --eval-iters must not be negative (got ", a.eval_iters,
            ")");
  require_positive(a.tensorboard_log_interval, "--tensorboard-log-interval");
  require_positive(a.tensor_model_parallel_size, "--tensor-model-parallel-size");
  require_positive(a.pipeline_model_parallel_size, "--pipeline-model-parallel-size");
  require_positive(a.context_parallel_size, "--context-parallel-size");
  require_positive(a.expert_model_parallel_size, "--expert-model-parallel-size");
  require_positive(a.make_vocab_size_divisible_by, "--make-vocab-size-divisible-by");
  require_positive(a.distributed_timeout_minutes, "--distributed-timeout-minutes");
  require_finite_reals(a);
  require_finite_positive(a.init_method_std, "--init-method-std");
  require_finite_positive(a.norm_epsilon, "--norm-epsilon");

  // ---- precision
  MOE_CHECK(!(a.fp16 && a.bf16), "--fp16 and --bf16 cannot be used together");
  if (a.loss_scale && !a.fp16) a.notes.push_back("--loss-scale only applies with --fp16; ignored");
  MOE_CHECK(!a.loss_scale || *a.loss_scale > 0, "--loss-scale must be positive (got ",
            a.loss_scale.value_or(0), ")");
  MOE_CHECK(a.initial_loss_scale >= a.min_loss_scale && a.min_loss_scale > 0,
            "--initial-loss-scale (", a.initial_loss_scale, ") must be >= --min-loss-scale (",
            a.min_loss_scale, ") > 0");
  require_positive(long(a.loss_scale_window), "--loss-scale-window");
  require_positive(a.hysteresis, "--hysteresis");

  // ---- parallel layout
  const int tp = a.tensor_model_parallel_size, pp = a.pipeline_model_parallel_size;
  const int cp = a.context_parallel_size;
  MOE_CHECK(world_size % (tp * pp * cp) == 0, "world size (", world_size,
            ") is not divisible by --tensor-model-parallel-size (", tp,
            ") x --pipeline-model-parallel-size (", pp, ")",
            cp > 1 ? concat(" x --context-parallel-size (", cp, ")") : std::string());
  a.data_parallel_size = world_size / (tp * pp * cp);
  MOE_CHECK(cp == 1 || *a.seq_length % (2 * cp) == 0, "--seq-length (", *a.seq_length,
            ") must be a multiple of 2 x --context-parallel-size (", 2 * cp,
            ") when --context-parallel-size > 1");
  if (a.sequence_parallel && tp == 1) {
    a.sequence_parallel = false;
    a.notes.push_back("--sequence-parallel disabled because --tensor-model-parallel-size is 1");
  }
  set_pipeline_layout(a);

  // ---- attention
  const int heads = *a.num_attention_heads;
  MOE_CHECK(heads % tp == 0, "--num-attention-heads (", heads,
            ") is not divisible by --tensor-model-parallel-size (", tp, ")");
  if (!a.kv_channels) {
    MOE_CHECK(*a.hidden_size % heads == 0, "--hidden-size (", *a.hidden_size,
              ") is not divisible by --num-attention-heads (", heads,
              "); set --kv-channels to choose the head size");
    a.kv_channels = *a.hidden_size / heads;
  }
  require_positive(*a.kv_channels, "--kv-channels");
  if (a.group_query_attention) {
    require_positive(a.num_query_groups, "--num-query-groups");
    MOE_CHECK(heads % a.num_query_groups == 0, "--num-attention-heads (", heads,
              ") is not divisible by --num-query-groups (", a.num_query_groups, ")");
    MOE_CHECK(a.num_query_groups % tp == 0, "--num-query-groups (", a.num_query_groups,
              ") is not divisible by --tensor-model-parallel-size (", tp, ")");
  } else {
    a.num_query_groups = heads;  // plain multi-head attention: one key/value head per head
  }

  // ---- multi-latent attention
  if (a.multi_latent_attention) {
    MOE_CHECK(!a.group_query_attention,
              "--group-query-attention and --multi-latent-attention are mutually exclusive");
    if (a.q_lora_rank) require_positive(*a.q_lora_rank, "--q-lora-rank");
    require_positive(a.kv_lora_rank, "--kv-lora-rank");
    require_positive(a.qk_head_dim, "--qk-head-dim");
    require_positive(a.v_head_dim, "--v-head-dim");
    MOE_CHECK(a.qk_pos_emb_head_dim >= 2 && a.qk_pos_emb_head_dim % 2 == 0,
              "--qk-pos-emb-head-dim (", a.qk_pos_emb_head_dim,
              ") must be even and >= 2 (rope rotates pairs)");
  }

  // ---- positions
  require_finite_positive(a.rotary_base, "--rotary-base");
  require_finite_positive(a.rotary_scaling_factor, "--rotary-scaling-factor");
  require_finite(a.mscale, "--mscale");
  require_finite(a.mscale_all_dim, "--mscale-all-dim");
  if (a.yarn_original_max_position_embeddings) {
    require_positive(*a.yarn_original_max_position_embeddings,
                     "--yarn-original-max-position-embeddings");
  }
  if (a.yarn_beta_fast) require_finite_positive(*a.yarn_beta_fast, "--yarn-beta-fast");
  if (a.yarn_beta_slow) require_finite_positive(*a.yarn_beta_slow, "--yarn-beta-slow");
  MOE_CHECK(!a.rope_type || *a.rope_type == "rope" || a.multi_latent_attention, "--rope-type ",
            a.rope_type.value_or(""),
            ": common attention supports only --rope-type rope (as Megatron); use "
            "--position-embedding-type yarn for YaRN");
  if (a.position_embedding_type == "rope" || a.position_embedding_type == "yarn") {
    MOE_CHECK(*a.kv_channels % 2 == 0, "--position-embedding-type ", a.position_embedding_type,
              " needs an even --kv-channels (got ", *a.kv_channels, ")");
  }
  if (a.add_bias_linear) a.add_qkv_bias = true;  // Megatron keeps the two in sync
  if (a.position_embedding_type == "learned_absolute" && a.add_position_embedding) {
    require(a.max_position_embeddings.has_value(), "--max-position-embeddings");
  }
  if (!a.add_position_embedding && a.position_embedding_type != "rope") {
    throw Error(
        "--no-position-embedding is only valid with --position-embedding-type rope; use "
        "--position-embedding-type none to train without position information");
  }
  if (a.max_position_embeddings) {
    MOE_CHECK(*a.max_position_embeddings >= *a.seq_length, "--max-position-embeddings (",
              *a.max_position_embeddings, ") must be >= --seq-length (", *a.seq_length, ")");
  } else {
    a.max_position_embeddings = *a.seq_length;
  }

  // ---- multi-token prediction
  if (a.mtp_num_layers) {
    MOE_CHECK(*a.mtp_num_layers >= 0, "argument --mtp-num-layers must not be negative (got ",
              *a.mtp_num_layers, ")");
    require_finite(a.mtp_loss_scaling_factor, "--mtp-loss-scaling-factor");
    MOE_CHECK(a.mtp_loss_scaling_factor >= 0,
              "argument --mtp-loss-scaling-factor must not be negative (got ",
              a.mtp_loss_scaling_factor, ")");
    MOE_CHECK(*a.mtp_num_layers == 0 || a.position_embedding_type != "learned_absolute",
              "--mtp-num-layers needs --position-embedding-type rope or none (Megatron supports "
              "multi-token prediction with those only), not learned_absolute");
  }

  // ---- MLP sizes
  if (!a.ffn_hidden_size) {
    a.ffn_hidden_size =
        a.swiglu ? int((4.0 * *a.hidden_size * 2 / 3) / 64) * 64 : 4 * *a.hidden_size;
    MOE_CHECK(*a.ffn_hidden_size > 0, "--swiglu with --hidden-size ", *a.hidden_size,
              " gives an ffn size of 0; set --ffn-hidden-size");
  }
  require_positive(*a.ffn_hidden_size, "--ffn-hidden-size");
  MOE_CHECK(*a.ffn_hidden_size % tp == 0, "--ffn-hidden-size (", *a.ffn_hidden_size,
            ") is not divisible by --tensor-model-parallel-size (", tp, ")");

  // ---- MoE
  if (a.num_experts && *a.num_experts == 0) a.num_experts.reset();  // Megatron: 0 means dense
  const int ep = a.expert_model_parallel_size;
  if (!a.num_experts) {
    MOE_CHECK(ep == 1, "--expert-model-parallel-size (", ep, ") needs --num-experts");
    MOE_CHECK(!a.expert_tensor_parallel_size || *a.expert_tensor_parallel_size == tp,
              "--expert-tensor-parallel-size needs --num-experts");
    a.expert_tensor_parallel_size = tp;
    a.expert_data_parallel_size = a.data_parallel_size;
    a.moe_layer_pattern.assign(*a.num_layers, false);
  } else {
    const int experts = *a.num_experts;
    require_positive(experts, "--num-experts");
    if (!a.expert_tensor_parallel_size) a.expert_tensor_parallel_size = tp;
    const int etp = *a.expert_tensor_parallel_size;
    require_positive(etp, "--expert-tensor-parallel-size");
    MOE_CHECK(experts % ep == 0, "--num-experts (", experts,
              ") is not divisible by --expert-model-parallel-size (", ep, ")");
    MOE_CHECK(world_size % (etp * ep * pp) == 0, "world size (", world_size,
              ") is not divisible by --expert-tensor-parallel-size (", etp,
              ") x --expert-model-parallel-size (", ep, ") x --pipeline-model-parallel-size (", pp,
              ")");
    a.expert_data_parallel_size = world_size / (etp * ep * pp);
    MOE_CHECK(!(ep > 1 && tp > 1 && !a.sequence_parallel), "--expert-model-parallel-size (", ep,
              ") with --tensor-model-parallel-size (", tp,
              ") requires --sequence-parallel (Megatron-Core: MoE with expert and tensor "
              "parallelism must use sequence parallelism)");
    MOE_CHECK(!(ep > 1 && a.fp16),
              "--expert-model-parallel-size > 1 is not supported with --fp16 (as in "
              "Megatron-LM); use --bf16");
    MOE_CHECK(a.moe_router_topk >= 1 && a.moe_router_topk <= experts, "--moe-router-topk (",
              a.moe_router_topk, ") must be between 1 and --num-experts (", experts, ")");
    // Megatron-Core's rule: the softmax of the one selected score is always 1, so the router would
    // get a zero gradient (sinkhorn trains the router through its own path).
    MOE_CHECK(a.moe_router_topk != 1 || a.moe_router_score_function != "softmax" ||
                  a.moe_router_pre_softmax || uses_sinkhorn(a),
              "--moe-router-topk 1 with --moe-router-score-function softmax after top-k gives "
              "the router a zero gradient; use --moe-router-pre-softmax (as Megatron-LM requires "
              "when topk is 1)");
    if (!a.moe_ffn_hidden_size) a.moe_ffn_hidden_size = *a.ffn_hidden_size;
    require_positive(*a.moe_ffn_hidden_size, "--moe-ffn-hidden-size");
    MOE_CHECK(*a.moe_ffn_hidden_size % etp == 0, "--moe-ffn-hidden-size (", *a.moe_ffn_hidden_size,
              ") is not divisible by --expert-tensor-parallel-size (", etp, ")");
    check_router_arguments(a, experts);
    MOE_CHECK(a.moe_z_loss_coeff.value_or(0) >= 0, "--moe-z-loss-coeff (",
              a.moe_z_loss_coeff.value_or(0), ") must not be negative");
    if (a.moe_input_jitter_eps) {
      MOE_CHECK(*a.moe_input_jitter_eps > 0 && *a.moe_input_jitter_eps < 1,
                "--moe-input-jitter-eps (", *a.moe_input_jitter_eps, ") must be in (0, 1)");
    }
    if (a.moe_router_topk_scaling_factor) {
      require_finite_positive(*a.moe_router_topk_scaling_factor,
                              "--moe-router-topk-scaling-factor");
    }
    if (a.moe_expert_capacity_factor) {
      MOE_CHECK(*a.moe_expert_capacity_factor > 0, "--moe-expert-capacity-factor (",
                *a.moe_expert_capacity_factor, ") must be positive");
      MOE_CHECK(!uses_sinkhorn(a),
                "--moe-expert-capacity-factor works only with "
                "--moe-router-load-balancing-type aux_loss, seq_aux_loss, global_aux_loss or "
                "none");
    }
    MOE_CHECK(!a.moe_pad_expert_input_to_capacity || a.moe_expert_capacity_factor,
              "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor");
    MOE_CHECK(a.moe_capacity_scope == "group" || a.moe_expert_capacity_factor,
              "--moe-capacity-scope rank needs --moe-expert-capacity-factor");
    if (a.moe_router_type == "expert_choice") check_expert_choice_flags(a);
    a.moe_layer_pattern = layer_pattern("--moe-layer-freq", a.moe_layer_freq, *a.num_layers);
    check_shared_experts_and_upcycling(a, experts);
  }
  MOE_CHECK(a.is_moe() || !a.moe_use_upcycling,
            "--moe-use-upcycling needs --num-experts (the MoE model to upcycle into)");
  MOE_CHECK(a.is_moe() || !a.moe_shared_expert_intermediate_size,
            "--moe-shared-expert-intermediate-size needs --num-experts");
  if (a.moe_grouped_gemm && !a.is_moe())
    a.notes.push_back("--moe-grouped-gemm ignored: no --num-experts");

  // ---- batch sizes
  const int micro_times_dp = *a.micro_batch_size * a.data_parallel_size;
  if (!a.global_batch_size) a.global_batch_size = micro_times_dp;
  require_positive(*a.global_batch_size, "--global-batch-size");
  MOE_CHECK(*a.global_batch_size % micro_times_dp == 0, "--global-batch-size (",
            *a.global_batch_size, ") is not divisible by --micro-batch-size (", *a.micro_batch_size,
            ") x data-parallel size (", a.data_parallel_size, " = world size ", world_size,
            " / (tp ", tp, " x pp ", pp, cp > 1 ? concat(" x cp ", cp) : std::string(), "))");
  a.num_micro_batches = *a.global_batch_size / micro_times_dp;
  MOE_CHECK(a.virtual_pipeline_model_parallel_size == 1 || a.num_micro_batches % pp == 0,
            "number of microbatches (", a.num_micro_batches,
            ") is not divisible by pipeline-model-parallel-size (", pp,
            ") when using interleaved schedule");

  // ---- learning rate
  MOE_CHECK(*a.lr >= 0 && a.min_lr >= 0, "--lr (", *a.lr, ") and --min-lr (", a.min_lr,
            ") must not be negative");
  MOE_CHECK(a.min_lr <= *a.lr, "--min-lr (", a.min_lr, ") must be <= --lr (", *a.lr, ")");
  MOE_CHECK(a.lr_warmup_init <= *a.lr, "--lr-warmup-init (", a.lr_warmup_init,
            ") must be <= --lr (", *a.lr, ")");
  if (!a.lr_decay_iters) a.lr_decay_iters = *a.train_iters;
  require_positive(*a.lr_decay_iters, "--lr-decay-iters");
  if (a.lr_warmup_fraction) {
    MOE_CHECK(a.lr_warmup_iters == 0,
              "only one of --lr-warmup-fraction and --lr-warmup-iters may be given");
    MOE_CHECK(*a.lr_warmup_fraction >= 0 && *a.lr_warmup_fraction < 1, "--lr-warmup-fraction (",
              *a.lr_warmup_fraction, ") must be in [0, 1)");
  }
  MOE_CHECK(a.lr_warmup_iters >= 0, "--lr-warmup-iters must not be negative");
  const long warmup = a.lr_warmup_fraction ? long(*a.lr_warmup_fraction * double(*a.lr_decay_iters))
                                           : a.lr_warmup_iters;
  MOE_CHECK(warmup < *a.lr_decay_iters, "learning-rate warmup (", warmup,
            " iterations from --lr-warmup-iters/--lr-warmup-fraction) must be shorter than "
            "--lr-decay-iters (",
            *a.lr_decay_iters, ")");
  MOE_CHECK(a.weight_decay >= 0, "--weight-decay must not be negative");
  MOE_CHECK(a.clip_grad >= 0, "--clip-grad must not be negative");
  MOE_CHECK(a.adam_beta1 >= 0 && a.adam_beta1 < 1 && a.adam_beta2 >= 0 && a.adam_beta2 < 1,
            "--adam-beta1 (", a.adam_beta1, ") and --adam-beta2 (", a.adam_beta2,
            ") must be in [0, 1)");
  MOE_CHECK(a.adam_eps > 0, "--adam-eps must be positive");
  MOE_CHECK(a.attention_dropout >= 0 && a.attention_dropout < 1 && a.hidden_dropout >= 0 &&
                a.hidden_dropout < 1,
            "--attention-dropout and --hidden-dropout must be in [0, 1)");

  // ---- checkpoints
  if (a.save) {
    require(a.save_interval.has_value(), "--save-interval (with --save)");
    require_positive(*a.save_interval, "--save-interval");
  } else {
    MOE_CHECK(!a.save_interval, "--save-interval needs --save (the directory to save to)");
  }
  if (a.exit_interval) require_positive(*a.exit_interval, "--exit-interval");

  // ---- data: exactly one source; blends and the split parsed as the data module will
  const bool per_split =
      !a.train_data_path.empty() || !a.valid_data_path.empty() || !a.test_data_path.empty();
  MOE_CHECK(int(a.mock_data) + int(!a.data_path.empty()) + int(per_split) == 1,
            "give exactly one data source: --data-path (with --split), "
            "--train-data-path/--valid-data-path/--test-data-path, or --mock-data");
  if (!a.data_path.empty()) {
    data::parse_blend(a.data_path);
    data::parse_split(a.split);
  }
  if (per_split) {
    MOE_CHECK(!a.train_data_path.empty(),
              "--valid-data-path/--test-data-path need --train-data-path");
    for (const auto* paths : {&a.train_data_path, &a.valid_data_path, &a.test_data_path}) {
      if (!paths->empty()) data::parse_blend(*paths);
    }
  }
  require(a.tokenizer_type.has_value(), "--tokenizer-type");
  const std::string& tokenizer = *a.tokenizer_type;
  if (tokenizer == "NullTokenizer") {
    require(a.vocab_size.has_value(), "--vocab-size (with --tokenizer-type NullTokenizer)");
    require_positive(*a.vocab_size, "--vocab-size");
  } else if (tokenizer == "GPT2BPETokenizer") {
    require(a.vocab_file.has_value(), "--vocab-file (with --tokenizer-type GPT2BPETokenizer)");
    require(a.merge_file.has_value(), "--merge-file (with --tokenizer-type GPT2BPETokenizer)");
  } else if (tokenizer != "ByteTokenizer") {  // ByteTokenizer needs no file or size
    MOE_CHECK(a.tokenizer_model.has_value(),
              "argument --tokenizer-model is required with "
              "--tokenizer-type ",
              tokenizer);
  }
  const std::string_view no_wandb =
      "moecore does not log to Weights & Biases (the scalars go to the log, --tensorboard-dir and "
      "--log-file)";
  const std::tuple<bool, std::string_view, std::string_view> inert_flags[] = {
      {!a.masked_softmax_fusion, "--no-masked-softmax-fusion",
       "moecore has one softmax implementation on CPU"},
      {a.use_mcore_models, "--use-mcore-models", "moecore only has the Megatron-Core model"},
      {!a.wandb_project.empty(), "--wandb-project", no_wandb},
      {!a.wandb_exp_name.empty(), "--wandb-exp-name", no_wandb},
      {!a.wandb_entity.empty(), "--wandb-entity", no_wandb},
      {!a.wandb_save_dir.empty(), "--wandb-save-dir", no_wandb}};
  for (const auto& [given, flag, reason] : inert_flags) {
    if (given) a.notes.push_back(no_effect_note(flag, reason));
  }
}

}  // namespace moe::train

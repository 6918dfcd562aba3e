// moe-train's argument parsing and validation: Megatron names and defaults, refusal of
// unsupported and unknown arguments, and every cross-flag check, at chosen world sizes.
#include "moe/train/arguments.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "support/testing.h"

namespace moe::train {
namespace {

using Args = std::vector<std::string>;

// The seed's Mixtral 8x7B script (16 ranks), flags unchanged, with its shell variables filled.
Args mixtral_seed_flags() {
  return {
      // MODEL_ARGS
      "--use-mcore-models", "--disable-bias-linear", "--seq-length", "2048",
      "--max-position-embeddings", "32768", "--num-layers", "32", "--hidden-size", "4096",
      "--ffn-hidden-size", "14336", "--num-attention-heads", "32", "--init-method-std", "0.01",
      "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--normalization", "RMSNorm",
      "--position-embedding-type", "rope", "--swiglu", "--untie-embeddings-and-output-weights",
      "--group-query-attention", "--num-query-groups", "8", "--no-masked-softmax-fusion",
      "--no-position-embedding",
      // MOE_ARGS
      "--num-experts", "8", "--expert-model-parallel-size", "4", "--moe-router-load-balancing-type",
      "aux_loss", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm",
      // DATA_ARGS
      "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "/ckpt/tokenizer.model",
      "--data-path", "/data/corpus_text_document", "--split", "99990,8,2",
      // TRAINING_ARGS
      "--micro-batch-size", "1", "--global-batch-size", "128", "--lr", "1e-4", "--train-iters",
      "500000", "--lr-decay-iters", "320000", "--lr-decay-style", "cosine", "--min-lr", "1.0e-5",
      "--weight-decay", "0.1", "--lr-warmup-iters", "500", "--clip-grad", "1.0", "--bf16",
      // MODEL_PARALLEL_ARGS
      "--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "1",
      "--sequence-parallel", "--use-distributed-optimizer",
      // LOGGING_ARGS
      "--log-interval", "1", "--save-interval", "10000", "--eval-interval", "1000", "--eval-iters",
      "10", "--save", "/ckpt", "--load", "/ckpt", "--tensorboard-dir", "/ckpt/tensorboard",
      "--no-load-optim", "--no-load-rng",
      // with WANDB_API_KEY set
      "--wandb-project", "Mixtral-Finetuning", "--wandb-exp-name", "Mixtral_8x7B"};
}

// A small valid job: 2 layers, hidden 64, 4 experts, mock data.
Args small_flags() {
  return {"--num-layers",
          "2",
          "--hidden-size",
          "64",
          "--num-attention-heads",
          "4",
          "--seq-length",
          "32",
          "--max-position-embeddings",
          "32",
          "--micro-batch-size",
          "2",
          "--train-iters",
          "10",
          "--lr",
          "1e-3",
          "--num-experts",
          "4",
          "--mock-data",
          "--tokenizer-type",
          "NullTokenizer",
          "--vocab-size",
          "100"};
}

Args with(Args base, const Args& extra) {
  base.insert(base.end(), extra.begin(), extra.end());
  return base;
}

TrainingArguments finalized(const Args& flags, int world_size) {
  TrainingArguments args = parse_arguments(flags).args;
  finalize_arguments(args, world_size);
  return args;
}

std::string parse_error(const Args& flags) {
  return moe::testing::error_text([&] { parse_arguments(flags); });
}
std::string validation_error(const Args& flags, int world_size) {
  return moe::testing::error_text([&] { finalized(flags, world_size); });
}

TEST(Arguments, MixtralSeedScriptValidatesAtSixteenRanks) {
  TrainingArguments a = finalized(mixtral_seed_flags(), 16);
  EXPECT_EQ(a.data_parallel_size, 4);  // 16 / (tp 4 x pp 1)
  EXPECT_EQ(*a.expert_tensor_parallel_size, 4);
  EXPECT_EQ(a.expert_data_parallel_size, 1);  // 16 / (etp 4 x ep 4 x pp 1)
  EXPECT_EQ(a.num_micro_batches, 32);         // 128 / (1 x 4)
  EXPECT_EQ(*a.kv_channels, 128);
  EXPECT_EQ(a.num_query_groups, 8);
  EXPECT_EQ(*a.moe_ffn_hidden_size, 14336);
  EXPECT_FALSE(a.add_bias_linear);
  EXPECT_FALSE(a.add_position_embedding);
  EXPECT_FALSE(a.masked_softmax_fusion);
  EXPECT_TRUE(a.sequence_parallel && a.use_distributed_optimizer && a.bf16 && a.moe_grouped_gemm);
  EXPECT_EQ(a.position_embedding_type, "rope");
  EXPECT_EQ(a.normalization, "RMSNorm");
  EXPECT_EQ(a.moe_layer_pattern, std::vector<bool>(32, true));
  EXPECT_EQ(a.moe_aux_loss_coeff, std::vector<double>{1e-2});
  EXPECT_EQ(*a.lr_decay_iters, 320000);
  EXPECT_EQ(a.lr_decay_style, "cosine");
  EXPECT_TRUE(a.no_load_optim && a.no_load_rng);
  EXPECT_EQ(*a.tensorboard_dir, "/ckpt/tensorboard");
  // The wandb flags are accepted and the user is told they do nothing.
  EXPECT_TRUE(std::any_of(a.notes.begin(), a.notes.end(),
                          [](const std::string& n) { return n.find("--wandb") == 0; }));
}

TEST(Arguments, MixtralSeedScriptRefusedAtWrongWorldSizes) {
  EXPECT_EQ(validation_error(mixtral_seed_flags(), 8),
            "world size (8) is not divisible by --expert-tensor-parallel-size (4) x "
            "--expert-model-parallel-size (4) x --pipeline-model-parallel-size (1)");
  EXPECT_EQ(validation_error(mixtral_seed_flags(), 6),
            "world size (6) is not divisible by --tensor-model-parallel-size (4) x "
            "--pipeline-model-parallel-size (1)");
  // 48 ranks: dp 12 does not divide the global batch 128.
  EXPECT_NE(validation_error(mixtral_seed_flags(), 48)
                .find("--global-batch-size (128) is not divisible by --micro-batch-size (1) x "
                      "data-parallel size (12"),
            std::string::npos);
}

TEST(Arguments, MegatronDefaults) {
  TrainingArguments a = finalized(small_flags(), 1);
  EXPECT_EQ(*a.ffn_hidden_size, 256);  // 4 * hidden
  EXPECT_EQ(*a.global_batch_size, 2);  // micro x dp
  EXPECT_EQ(a.moe_router_topk, 2);
  EXPECT_EQ(a.moe_router_load_balancing_type, std::vector<std::string>{"aux_loss"});
  EXPECT_EQ(a.moe_token_dispatcher_type, "allgather");
  EXPECT_EQ(a.moe_aux_loss_coeff, std::vector<double>{0.0});
  EXPECT_FALSE(a.moe_router_enable_expert_bias);
  EXPECT_DOUBLE_EQ(a.moe_router_bias_update_rate, 1e-3);
  EXPECT_FALSE(a.moe_router_num_groups || a.moe_router_group_topk || a.moe_router_dtype);
  EXPECT_DOUBLE_EQ(a.weight_decay, 0.01);
  EXPECT_DOUBLE_EQ(a.initial_loss_scale, 4294967296.0);
  EXPECT_DOUBLE_EQ(a.hidden_dropout, 0.1);
  EXPECT_EQ(a.seed, 1234);
  EXPECT_EQ(a.log_interval, 100);
  EXPECT_EQ(a.eval_interval, 1000);
  EXPECT_EQ(a.eval_iters, 100);
  EXPECT_EQ(a.lr_decay_style, "linear");
  EXPECT_EQ(*a.lr_decay_iters, 10);  // train-iters
  EXPECT_EQ(a.split, "969, 30, 1");
  // Megatron's swiglu rule: the largest multiple of 64 not above 8/3 * hidden.
  TrainingArguments swiglu = finalized(
      with(small_flags(), {"--swiglu", "--hidden-size", "4096", "--num-attention-heads", "32"}), 1);
  EXPECT_EQ(*swiglu.ffn_hidden_size, 10880);
}

// The expression language itself is tested in layer_pattern_test.cc; here, that the flag reaches
// it with --num-layers, and only for MoE models.
TEST(Arguments, MoeLayerFrequency) {
  TrainingArguments every_other =
      finalized(with(small_flags(), {"--num-layers", "4", "--moe-layer-freq", "2"}), 1);
  EXPECT_EQ(every_other.moe_layer_pattern, (std::vector<bool>{true, false, true, false}));
  TrainingArguments first_dense =
      finalized(with(small_flags(), {"--num-layers", "4", "--moe-layer-freq", "[0]+[1]*3"}), 1);
  EXPECT_EQ(first_dense.moe_layer_pattern, (std::vector<bool>{false, true, true, true}));
  EXPECT_EQ(validation_error(with(small_flags(), {"--moe-layer-freq", "[1,0,1]"}), 1),
            "--moe-layer-freq '[1,0,1]': the pattern has 3 entries but --num-layers is 2 (one "
            "0/1 entry per layer)");
  // A dense model has no MoE layer whatever the flag says (Megatron ignores it there too).
  Args dense = small_flags();
  auto experts = std::find(dense.begin(), dense.end(), "--num-experts");
  dense.erase(experts, experts + 2);
  EXPECT_EQ(finalized(with(dense, {"--moe-layer-freq", "[1,1]"}), 1).moe_layer_pattern,
            (std::vector<bool>{false, false}));
}

TEST(Arguments, UnsupportedMegatronArgumentIsNamed) {
  EXPECT_EQ(parse_error(with(small_flags(), {"--cp-comm-type", "p2p"})),
            "argument --cp-comm-type is a Megatron-LM argument that moecore does not support yet");
  EXPECT_EQ(parse_error(with(small_flags(), {"--fp8-format=hybrid"})),
            "argument --fp8-format is a Megatron-LM argument that moecore does not support yet");
  EXPECT_EQ(parse_error({"--overlap-grad-reduce"}),
            "argument --overlap-grad-reduce is a Megatron-LM argument that moecore does not "
            "support yet");
}

TEST(Arguments, UnknownArgumentSuggestsClosest) {
  EXPECT_EQ(parse_error(with(small_flags(), {"--num-layer", "2"})),
            "unknown argument --num-layer; did you mean --num-layers?");
  EXPECT_EQ(parse_error({"--moe-router-top-k", "2"}),
            "unknown argument --moe-router-top-k; did you mean --moe-router-topk?");
  EXPECT_EQ(parse_error({"--expert-model-parallel", "2"}),
            "unknown argument --expert-model-parallel; did you mean --expert-model-parallel-size?");
  EXPECT_EQ(parse_error({"--completely-unrelated-thing"}),
            "unknown argument --completely-unrelated-thing; see moe-train --help for the "
            "arguments");
}

// Megatron's list form and the DeepSeek-style router flags reach the model's MoE config.
TEST(Arguments, RouterFlagsParse) {
  TrainingArguments a =
      finalized(with(small_flags(),
                     {"--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss",
                      "global_aux_loss", "--moe-aux-loss-coeff", "1e-2", "1e-3", "1e-4",
                      "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                      "--moe-router-bias-update-rate", "2e-3", "--moe-router-num-groups", "2",
                      "--moe-router-group-topk", "1", "--moe-router-dtype", "fp64"}),
                1);
  EXPECT_EQ(a.moe_router_load_balancing_type,
            (std::vector<std::string>{"aux_loss", "seq_aux_loss", "global_aux_loss"}));
  EXPECT_EQ(a.moe_aux_loss_coeff, (std::vector<double>{1e-2, 1e-3, 1e-4}));
  EXPECT_TRUE(a.moe_router_enable_expert_bias);
  EXPECT_DOUBLE_EQ(a.moe_router_bias_update_rate, 2e-3);
  EXPECT_EQ(a.moe_router_num_groups, 2);
  EXPECT_EQ(a.moe_router_group_topk, 1);
  EXPECT_EQ(a.moe_router_dtype, "fp64");
  EXPECT_CONTAINS(parse_error({"--moe-router-dtype", "bf16"}), "--moe-router-dtype");
}

TEST(Arguments, BadValuesAndStrayTokens) {
  EXPECT_CONTAINS(parse_error({"--num-layers", "two"}), "--num-layers");
  EXPECT_CONTAINS(parse_error({"--normalization", "BatchNorm"}), "--normalization");
  EXPECT_CONTAINS(parse_error({"--moe-token-dispatcher-type", "flex"}), "flex");
  EXPECT_EQ(parse_error({"--bf16", "true"}),
            "unexpected value 'true': moe-train takes no positional arguments (presence flags "
            "such as --bf16 take no value)");
}

// Each case: extra flags (on top of small_flags() unless `alone`), world size, exact message.
struct ConflictCase {
  Args flags;
  int world_size;
  std::string message;
  bool alone = false;
};

TEST(Arguments, ConflictingAndNonDivisibleFlags) {
  const std::vector<ConflictCase> cases = {
      {{"--fp16", "--bf16"}, 1, "--fp16 and --bf16 cannot be used together"},
      {{"--tensor-model-parallel-size", "4", "--group-query-attention", "--num-query-groups", "2",
        "--sequence-parallel"},
       4,
       "--num-query-groups (2) is not divisible by --tensor-model-parallel-size (4)"},
      {{"--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"},
       1,
       "only one of --lr-warmup-fraction and --lr-warmup-iters may be given"},
      {{"--tensor-model-parallel-size", "2", "--num-attention-heads", "3", "--kv-channels", "16"},
       2,
       "--num-attention-heads (3) is not divisible by --tensor-model-parallel-size (2)"},
      {{"--group-query-attention", "--num-query-groups", "3"},
       1,
       "--num-attention-heads (4) is not divisible by --num-query-groups (3)"},
      {{"--expert-model-parallel-size", "3"},
       3,
       "--num-experts (4) is not divisible by --expert-model-parallel-size (3)"},
      {{"--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"},
       4,
       "--expert-model-parallel-size (2) with --tensor-model-parallel-size (2) requires "
       "--sequence-parallel (Megatron-Core: MoE with expert and tensor parallelism must use "
       "sequence parallelism)"},
      {{"--pipeline-model-parallel-size", "2"},
       3,
       "world size (3) is not divisible by --tensor-model-parallel-size (1) x "
       "--pipeline-model-parallel-size (2)"},
      {{"--pipeline-model-parallel-size", "4", "--untie-embeddings-and-output-weights"},
       4,
       "--num-layers (2) is not divisible by --pipeline-model-parallel-size (4)"},
      {{"--global-batch-size", "6"},
       2,
       "--global-batch-size (6) is not divisible by --micro-batch-size (2) x data-parallel "
       "size (2 = world size 2 / (tp 1 x pp 1))"},
      {{"--moe-router-topk", "5"},
       1,
       "--moe-router-topk (5) must be between 1 and --num-experts (4)"},
      {{"--moe-router-topk", "1"},
       1,
       "--moe-router-topk 1 with --moe-router-score-function softmax after top-k gives the "
       "router a zero gradient; use --moe-router-pre-softmax (as Megatron-LM requires when topk "
       "is 1)"},
      {{"--num-layers", "2"}, 1, "argument --hidden-size is required", true},
      {{"--lr-warmup-iters", "10"},
       1,
       "learning-rate warmup (10 iterations from --lr-warmup-iters/--lr-warmup-fraction) "
       "must be shorter than --lr-decay-iters (10)"},
      {{"--save", "/tmp/x"}, 1, "argument --save-interval (with --save) is required"},
      {{"--min-lr", "1"}, 1, "--min-lr (1) must be <= --lr (0.001)"},
      {{"--no-position-embedding"},
       1,
       "--no-position-embedding is only valid with --position-embedding-type rope; use "
       "--position-embedding-type none to train without position information"},
      {{"--max-position-embeddings", "16"},
       1,
       "--max-position-embeddings (16) must be >= --seq-length (32)"},
      {{"--moe-pad-expert-input-to-capacity"},
       1,
       "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"},
      // Router: several balancing types, expert bias, group-limited routing.
      {{"--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss", "--moe-aux-loss-coeff",
        "1e-2"},
       1,
       "--moe-aux-loss-coeff has 1 value(s) but --moe-router-load-balancing-type has 2 (one "
       "coefficient per type)"},
      {{"--moe-router-load-balancing-type", "aux_loss", "sinkhorn", "--moe-aux-loss-coeff", "0",
        "0"},
       1,
       "--moe-router-load-balancing-type sinkhorn cannot be listed with other types (only "
       "aux_loss, seq_aux_loss and global_aux_loss can)"},
      {{"--moe-aux-loss-coeff", "-1"}, 1, "--moe-aux-loss-coeff (-1) must not be negative"},
      {{"--moe-router-enable-expert-bias"},
       1,
       "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (got "
       "softmax)"},
      {{"--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
        "--moe-expert-capacity-factor", "1", "--moe-pad-expert-input-to-capacity"},
       1,
       "--moe-router-enable-expert-bias does not work with --moe-pad-expert-input-to-capacity "
       "(every expert's load is its capacity)"},
      {{"--moe-router-bias-update-rate", "-0.1"},
       1,
       "--moe-router-bias-update-rate (-0.1) must not be negative"},
      {{"--moe-router-bias-update-rate", "nan"},
       1,
       "argument --moe-router-bias-update-rate must be a finite number (got nan)"},
      {{"--moe-router-num-groups", "2"},
       1,
       "group-limited routing needs both --moe-router-num-groups and --moe-router-group-topk"},
      {{"--moe-router-num-groups", "3", "--moe-router-group-topk", "1"},
       1,
       "--moe-router-num-groups (3) must be positive and divide --num-experts (4)"},
      {{"--moe-router-num-groups", "2", "--moe-router-group-topk", "3"},
       1,
       "--moe-router-group-topk (3) must be between 1 and --moe-router-num-groups (2)"},
      {{"--moe-router-num-groups", "4", "--moe-router-group-topk", "2", "--moe-router-topk", "3"},
       1,
       "--moe-router-topk (3) must be divisible by --moe-router-group-topk (2)"},
      {{"--moe-router-num-groups", "4", "--moe-router-group-topk", "1"},
       1,
       "--moe-router-topk / --moe-router-group-topk (2) must not exceed the experts per group "
       "(--num-experts / --moe-router-num-groups = 1)"},
      {{"--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "8",
        "--micro-batch-size",
        "1",
        "--train-iters",
        "1",
        "--lr",
        "1",
        "--expert-model-parallel-size",
        "2",
        "--mock-data",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "10",
        "--position-embedding-type",
        "rope"},
       2,
       "--expert-model-parallel-size (2) needs --num-experts",
       true},
      {{"--tokenizer-type", "Llama2Tokenizer"},
       1,
       "argument --tokenizer-model is required with --tokenizer-type Llama2Tokenizer"},
      // Values the model, router and optimizer would refuse only after setup, and NaN/inf,
      // which would slip through (or be misnamed by) the range checks.
      {{"--init-method-std", "-1"}, 1, "argument --init-method-std must be positive (got -1)"},
      {{"--init-method-std", "0"}, 1, "argument --init-method-std must be positive (got 0)"},
      {{"--norm-epsilon", "-1"}, 1, "argument --norm-epsilon must be positive (got -1)"},
      {{"--rotary-base", "0", "--position-embedding-type", "rope"},
       1,
       "argument --rotary-base must be positive (got 0)"},
      {{"--moe-router-topk-scaling-factor", "-2"},
       1,
       "argument --moe-router-topk-scaling-factor must be positive (got -2)"},
      {{"--moe-input-jitter-eps", "5"}, 1, "--moe-input-jitter-eps (5) must be in (0, 1)"},
      {{"--moe-input-jitter-eps", "0"}, 1, "--moe-input-jitter-eps (0) must be in (0, 1)"},
      {{"--lr", "nan"}, 1, "argument --lr must be a finite number (got nan)"},
      {{"--lr", "inf"}, 1, "argument --lr must be a finite number (got inf)"},
      {{"--min-lr", "-inf"}, 1, "argument --min-lr must be a finite number (got -inf)"},
      {{"--adam-eps", "inf"}, 1, "argument --adam-eps must be a finite number (got inf)"},
      {{"--weight-decay", "nan"}, 1, "argument --weight-decay must be a finite number (got nan)"},
      {{"--clip-grad", "inf"}, 1, "argument --clip-grad must be a finite number (got inf)"},
      {{"--norm-epsilon", "nan"}, 1, "argument --norm-epsilon must be a finite number (got nan)"},
      {{"--init-method-std", "inf"},
       1,
       "argument --init-method-std must be a finite number (got inf)"},
      {{"--fp16", "--loss-scale", "inf"},
       1,
       "argument --loss-scale must be a finite number (got inf)"},
      {{"--moe-aux-loss-coeff", "nan"},
       1,
       "argument --moe-aux-loss-coeff must be a finite number (got nan)"},
      {{"--moe-router-topk-scaling-factor", "inf"},
       1,
       "argument --moe-router-topk-scaling-factor must be a finite number (got inf)"},
  };
  for (const ConflictCase& c : cases) {
    EXPECT_EQ(validation_error(c.alone ? c.flags : with(small_flags(), c.flags), c.world_size),
              c.message);
  }
}

// Top-1 is refused only where Megatron refuses it: softmax applied after the selection.
TEST(Arguments, TopOneNeedsPreSoftmaxWithSoftmaxScores) {
  for (const Args& accepted :
       {Args{"--moe-router-pre-softmax"}, Args{"--moe-router-score-function", "sigmoid"},
        Args{"--moe-router-load-balancing-type", "sinkhorn"}}) {
    TrainingArguments a =
        finalized(with(with(small_flags(), {"--moe-router-topk", "1"}), accepted), 1);
    EXPECT_EQ(a.moe_router_topk, 1) << accepted.front();
  }
  EXPECT_CONTAINS(
      validation_error(with(small_flags(), {"--moe-router-topk", "1",
                                            "--moe-router-load-balancing-type", "seq_aux_loss"}),
                       1),
      "use --moe-router-pre-softmax");
}

// moecore's --moe-router-type: expert_choice needs a capacity factor and refuses the per-token
// top-k settings and the load-balancing loss, naming the flag.
// Megatron's list flags (nargs='+') as argparse reads them: a repeated flag replaces the list.
TEST(Arguments, RepeatedListFlagReplacesTheList) {
  TrainingArguments a =
      finalized(with(small_flags(),
                     {"--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss",
                      "--moe-aux-loss-coeff", "1e-2", "1e-3", "--moe-router-load-balancing-type",
                      "aux_loss", "--moe-aux-loss-coeff", "0.5"}),
                1);
  EXPECT_EQ(a.moe_router_load_balancing_type, std::vector<std::string>{"aux_loss"});
  EXPECT_EQ(a.moe_aux_loss_coeff, std::vector<double>{0.5});
}

TEST(Arguments, ExpertChoiceRouterFlags) {
  EXPECT_EQ(finalized(small_flags(), 1).moe_router_type, "topk");
  const Args expert_choice = {"--moe-router-type", "expert_choice", "--moe-expert-capacity-factor",
                              "1.5"};
  EXPECT_EQ(finalized(with(small_flags(), expert_choice), 1).moe_router_type, "expert_choice");
  EXPECT_NO_THROW(finalized(with(small_flags(), with(expert_choice, {"--moe-z-loss-coeff", "1e-3",
                                                                     "--moe-router-topk", "2"})),
                            1));
  EXPECT_CONTAINS(parse_error({"--moe-router-type", "expert"}), "expert");
  const std::vector<ConflictCase> cases = {
      {{"--moe-router-type", "expert_choice"},
       1,
       "--moe-router-type expert_choice needs --moe-expert-capacity-factor (each expert takes "
       "ceil(tokens x factor / --num-experts) tokens)"},
      {with(expert_choice, {"--moe-router-topk", "3"}), 1,
       "--moe-router-topk (3) has no meaning with --moe-router-type expert_choice (experts pick "
       "their tokens; leave it at its default)"},
      {with(expert_choice, {"--moe-router-score-function", "sigmoid"}), 1,
       "--moe-router-score-function sigmoid is not supported with --moe-router-type "
       "expert_choice (scores are a softmax)"},
      {with(expert_choice, {"--moe-router-pre-softmax"}), 1,
       "--moe-router-pre-softmax has no meaning with --moe-router-type expert_choice"},
      {with(expert_choice, {"--moe-router-num-groups", "2", "--moe-router-group-topk", "1"}), 1,
       "--moe-router-num-groups / --moe-router-group-topk have no meaning with --moe-router-type "
       "expert_choice"},
      {with(expert_choice, {"--moe-router-topk-scaling-factor", "2"}), 1,
       "--moe-router-topk-scaling-factor has no meaning with --moe-router-type expert_choice"},
      {with(expert_choice, {"--moe-token-drop-policy", "position"}), 1,
       "--moe-token-drop-policy position has no meaning with --moe-router-type expert_choice "
       "(experts take their highest-scoring tokens)"},
      {with(expert_choice, {"--moe-aux-loss-coeff", "0.01"}), 1,
       "--moe-aux-loss-coeff (0.01) must be 0 with --moe-router-type expert_choice (every expert "
       "takes the same number of tokens)"},
      {with(expert_choice, {"--moe-router-load-balancing-type", "sinkhorn"}), 1,
       "--moe-expert-capacity-factor works only with --moe-router-load-balancing-type aux_loss, "
       "seq_aux_loss, global_aux_loss or none"},
  };
  for (const ConflictCase& c : cases) {
    EXPECT_EQ(validation_error(with(small_flags(), c.flags), c.world_size), c.message);
  }
}

// moecore's --moe-capacity-scope: group by default, rank on request, only with a capacity.
TEST(Arguments, CapacityScope) {
  EXPECT_EQ(finalized(small_flags(), 1).moe_capacity_scope, "group");
  const Args rank = {"--moe-capacity-scope", "rank", "--moe-expert-capacity-factor", "1.0"};
  EXPECT_EQ(finalized(with(small_flags(), rank), 1).moe_capacity_scope, "rank");
  EXPECT_CONTAINS(parse_error({"--moe-capacity-scope", "world"}), "world");
  EXPECT_EQ(validation_error(with(small_flags(), {"--moe-capacity-scope", "rank"}), 1),
            "--moe-capacity-scope rank needs --moe-expert-capacity-factor");
}

TEST(Arguments, MultiTokenPrediction) {
  const Args rope = with(small_flags(), {"--position-embedding-type", "rope"});
  TrainingArguments a = finalized(with(rope, {"--mtp-num-layers", "2"}), 1);
  EXPECT_EQ(a.mtp_num_layers, 2);
  EXPECT_DOUBLE_EQ(a.mtp_loss_scaling_factor, 0.1);  // Megatron's default
  EXPECT_FALSE(finalized(small_flags(), 1).mtp_num_layers.has_value());
  // 0 is off, as in Megatron, so learned positions stay allowed.
  EXPECT_EQ(finalized(with(small_flags(), {"--mtp-num-layers", "0"}), 1).mtp_num_layers, 0);
  EXPECT_EQ(validation_error(with(rope, {"--mtp-num-layers", "-1"}), 1),
            "argument --mtp-num-layers must not be negative (got -1)");
  EXPECT_EQ(validation_error(
                with(rope, {"--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "-0.5"}), 1),
            "argument --mtp-loss-scaling-factor must not be negative (got -0.5)");
  EXPECT_EQ(validation_error(
                with(rope, {"--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "nan"}), 1),
            "argument --mtp-loss-scaling-factor must be a finite number (got nan)");
  EXPECT_EQ(validation_error(with(small_flags(), {"--mtp-num-layers", "1"}), 1),
            "--mtp-num-layers needs --position-embedding-type rope or none (Megatron supports "
            "multi-token prediction with those only), not learned_absolute");
  // With pipeline parallelism the last stage holds a copy of the word embedding, as Megatron's.
  EXPECT_EQ(
      finalized(with(rope, {"--mtp-num-layers", "1", "--pipeline-model-parallel-size", "2"}), 2)
          .mtp_num_layers,
      1);
}

// Virtual pipeline stages and uneven first / last stages: Megatron's derived
// virtual_pipeline_model_parallel_size and its refusals.
TEST(Arguments, VirtualAndUnevenPipelineStages) {
  const Args four_layers = with(small_flags(), {"--num-layers", "4", "--global-batch-size", "8",
                                                "--pipeline-model-parallel-size", "2"});
  EXPECT_EQ(finalized(four_layers, 2).virtual_pipeline_model_parallel_size, 1);
  EXPECT_EQ(finalized(with(four_layers, {"--num-layers-per-virtual-pipeline-stage", "1"}), 2)
                .virtual_pipeline_model_parallel_size,
            2);
  const TrainingArguments uneven =
      finalized(with(four_layers, {"--num-virtual-stages-per-pipeline-rank", "2",
                                   "--decoder-first-pipeline-num-layers", "2"}),
                2);
  EXPECT_EQ(uneven.virtual_pipeline_model_parallel_size, 2);
  EXPECT_EQ(uneven.decoder_first_pipeline_num_layers, 2);
  EXPECT_EQ(pipeline_layout(uneven).first_stage_layers, 2);
  EXPECT_EQ(finalized(with(four_layers, {"--decoder-last-pipeline-num-layers", "3"}), 2)
                .decoder_last_pipeline_num_layers,
            3);
  EXPECT_EQ(validation_error(with(four_layers, {"--num-layers-per-virtual-pipeline-stage", "1",
                                                "--num-virtual-stages-per-pipeline-rank", "2"}),
                             2),
            "No more than one of the following arguments can be set at the same time: "
            "--num-layers-per-virtual-pipeline-stage (1), --num-virtual-stages-per-pipeline-rank "
            "(2)");
  EXPECT_EQ(validation_error(with(four_layers, {"--num-layers-per-virtual-pipeline-stage", "1",
                                                "--decoder-first-pipeline-num-layers", "2"}),
                             2),
            "please use --num-virtual-stages-per-pipeline-rank to specify virtual pipeline "
            "parallel degree when enable uneven pipeline parallelism");
  EXPECT_EQ(
      validation_error(with(four_layers, {"--num-layers-per-virtual-pipeline-stage", "3"}), 2),
      "number of layers per pipeline stage (2) must be divisible by "
      "--num-layers-per-virtual-pipeline-stage (3)");
  EXPECT_EQ(validation_error(with(four_layers, {"--num-virtual-stages-per-pipeline-rank", "4"}), 2),
            "number of layers per pipeline stage (2) must be divisible by the number of virtual "
            "stages per pipeline rank (4)");
  EXPECT_EQ(validation_error(with(four_layers, {"--decoder-first-pipeline-num-layers", "0"}), 2),
            "argument --decoder-first-pipeline-num-layers must be positive (got 0)");
  EXPECT_EQ(validation_error(with(four_layers, {"--num-virtual-stages-per-pipeline-rank", "2",
                                                "--decoder-last-pipeline-num-layers", "3"}),
                             2),
            "number of layers at last stage: 3 must be divisible by virtual pipeline parallel "
            "degree 2");
  EXPECT_EQ(
      validation_error(with(small_flags(), {"--num-virtual-stages-per-pipeline-rank", "2"}), 1),
      "When interleaved schedule is used, pipeline-model-parallel size should be greater "
      "than 1 (--pipeline-model-parallel-size 1)");
  EXPECT_EQ(validation_error(with(four_layers, {"--num-virtual-stages-per-pipeline-rank", "2",
                                                "--global-batch-size", "6"}),
                             2),
            "number of microbatches (3) is not divisible by pipeline-model-parallel-size (2) when "
            "using interleaved schedule");
}

// Tied embedding and output weights with pp > 1: the last stage holds a copy of the embedding.
TEST(Arguments, TiedEmbeddingsWithPipelineParallelism) {
  const TrainingArguments a =
      finalized(with(small_flags(), {"--pipeline-model-parallel-size", "2"}), 2);
  EXPECT_FALSE(a.untie_embeddings_and_output_weights);
  EXPECT_EQ(a.pipeline_model_parallel_size, 2);
}

// Every flag accepted for Megatron scripts that changes nothing here prints one note of the same
// form, and only when given.
TEST(Arguments, EveryInertFlagNotesThatItHasNoEffect) {
  const std::string no_wandb =
      " is accepted and has no effect: moecore does not log to Weights & Biases (the scalars go to "
      "the log, --tensorboard-dir and --log-file)";
  const std::vector<std::pair<Args, std::string>> cases = {
      {{"--no-masked-softmax-fusion"},
       "--no-masked-softmax-fusion is accepted and has no effect: moecore has one softmax "
       "implementation on CPU"},
      {{"--use-mcore-models"},
       "--use-mcore-models is accepted and has no effect: moecore only has the Megatron-Core "
       "model"},
      {{"--wandb-project", "p"}, "--wandb-project" + no_wandb},
      {{"--wandb-exp-name", "e"}, "--wandb-exp-name" + no_wandb},
      {{"--wandb-entity", "team"}, "--wandb-entity" + no_wandb},
      {{"--wandb-save-dir", "/tmp/wandb"}, "--wandb-save-dir" + no_wandb}};
  const TrainingArguments plain = finalized(small_flags(), 1);
  for (const std::string& note : plain.notes)
    EXPECT_EQ(note.find("has no effect"), std::string::npos) << note;
  for (const auto& [flags, note] : cases) {
    const TrainingArguments a = finalized(with(small_flags(), flags), 1);
    EXPECT_EQ(a.notes.size(), plain.notes.size() + 1) << flags[0];
    EXPECT_EQ(a.notes.back(), note);
  }
}

// Shared experts and upcycling: accepted values, the notes for flags that do nothing here, and an
// error naming the flag for every bad value or combination.
TEST(Arguments, SharedExpertsAndUpcycling) {
  const Args shared =
      with(small_flags(), {"--disable-bias-linear", "--moe-shared-expert-intermediate-size", "48",
                           "--moe-shared-expert-gate"});
  TrainingArguments a = finalized(with(shared, {"--tensor-model-parallel-size", "2"}), 2);
  EXPECT_EQ(*a.moe_shared_expert_intermediate_size, 48);
  EXPECT_TRUE(a.moe_shared_expert_gate);
  a = finalized(
      with(shared, {"--moe-shared-expert-overlap", "--moe-token-dispatcher-type", "alltoall"}), 1);
  EXPECT_TRUE(std::any_of(a.notes.begin(), a.notes.end(), [](const std::string& n) {
    return n.find("--moe-shared-expert-overlap is accepted and has no effect: collectives block") ==
           0;
  }));
  a = finalized(with(small_flags(), {"--moe-shared-expert-gate"}), 1);
  EXPECT_EQ(a.notes.back(),
            "--moe-shared-expert-gate and --moe-shared-expert-overlap are ignored without "
            "--moe-shared-expert-intermediate-size");

  a = finalized(with(small_flags(), {"--moe-use-upcycling", "--load", "dense",
                                     "--moe-upcycling-granularity", "2"}),
                1);
  EXPECT_TRUE(a.moe_use_upcycling && a.no_load_optim && a.no_load_rng);
  EXPECT_EQ(a.moe_upcycling_granularity, 2);
  EXPECT_CONTAINS(a.notes.back(), "enabling --no-load-rng for upcycling");

  struct Case {
    Args flags;
    std::string message;
  };
  const Case cases[] = {
      {with(shared, {"--moe-shared-expert-intermediate-size", "0"}),
       "--moe-shared-expert-intermediate-size must be the number of shared experts times the "
       "ffn size of each, a positive number (got 0)"},
      {with(shared,
            {"--tensor-model-parallel-size", "2", "--moe-shared-expert-intermediate-size", "33"}),
       "--moe-shared-expert-intermediate-size (33) is not divisible by "
       "--tensor-model-parallel-size (2)"},
      {with(small_flags(), {"--moe-shared-expert-intermediate-size", "48"}),
       "--moe-shared-expert-intermediate-size needs --disable-bias-linear (shared experts have "
       "no biases, as in Megatron-LM)"},
      {with(shared, {"--moe-shared-expert-overlap"}),
       "--moe-shared-expert-overlap only works with --moe-token-dispatcher-type alltoall (as in "
       "Megatron-LM)"},
      {with(small_flags(), {"--moe-use-upcycling"}),
       "argument --load (the dense checkpoint, with --moe-use-upcycling) is required"},
      {with(small_flags(), {"--moe-upcycling-granularity", "0"}),
       "argument --moe-upcycling-granularity must be positive (got 0)"},
      {with(small_flags(),
            {"--moe-use-upcycling", "--load", "d", "--moe-upcycling-granularity", "3"}),
       "--num-experts (4) must be divisible by --moe-upcycling-granularity (3): each group of "
       "that many experts holds one copy of the dense MLP"},
  };
  for (const Case& c : cases) EXPECT_EQ(validation_error(c.flags, 2), c.message);
  Args dense = small_flags();
  dense.erase(std::find(dense.begin(), dense.end(), "--num-experts"),
              std::find(dense.begin(), dense.end(), "--num-experts") + 2);
  EXPECT_EQ(validation_error(with(dense, {"--moe-use-upcycling", "--load", "d"}), 1),
            "--moe-use-upcycling needs --num-experts (the MoE model to upcycle into)");
  EXPECT_EQ(validation_error(with(dense, {"--moe-shared-expert-intermediate-size", "8"}), 1),
            "--moe-shared-expert-intermediate-size needs --num-experts");
}

// The data module's ByteTokenizer (ids = UTF-8 bytes, eod 256) needs neither a file nor a size.
TEST(Arguments, ByteTokenizerNeedsNoFile) {
  Args flags = small_flags();
  flags.erase(std::find(flags.begin(), flags.end(), "--vocab-size"), flags.end());
  EXPECT_NO_THROW(finalized(with(flags, {"--tokenizer-type", "ByteTokenizer"}), 1));
}

// With tp 2 and MoE, --expert-tensor-parallel-size defaults to tp (as in Megatron) and is
// accepted: the experts are split over the etp group (the seed layout).
TEST(Arguments, ContextParallelism) {
  TrainingArguments a = finalized(
      with(small_flags(), {"--context-parallel-size", "2", "--expert-model-parallel-size", "2"}),
      4);
  EXPECT_EQ(a.context_parallel_size, 2);
  EXPECT_EQ(a.data_parallel_size, 2);         // world / (tp x pp x cp)
  EXPECT_EQ(a.expert_data_parallel_size, 2);  // world / (etp x ep x pp): cp ranks are in it
  EXPECT_EQ(validation_error(with(small_flags(), {"--context-parallel-size", "3"}), 3),
            "--seq-length (32) must be a multiple of 2 x --context-parallel-size (6) when "
            "--context-parallel-size > 1");
  EXPECT_EQ(validation_error(with(small_flags(), {"--context-parallel-size", "2",
                                                  "--tensor-model-parallel-size", "2"}),
                             2),
            "world size (2) is not divisible by --tensor-model-parallel-size (2) x "
            "--pipeline-model-parallel-size (1) x --context-parallel-size (2)");
  EXPECT_EQ(validation_error(with(small_flags(), {"--context-parallel-size", "0"}), 1),
            "argument --context-parallel-size must be positive (got 0)");
}

TEST(Arguments, ExpertTensorParallelDefaultsToTensorParallel) {
  TrainingArguments a =
      finalized(with(small_flags(), {"--tensor-model-parallel-size", "2", "--sequence-parallel",
                                     "--expert-model-parallel-size", "2"}),
                4);
  EXPECT_EQ(*a.expert_tensor_parallel_size, 2);
  EXPECT_EQ(a.expert_data_parallel_size, 1);
}

TEST(Arguments, DataSources) {
  Args no_data = small_flags();
  no_data.erase(std::find(no_data.begin(), no_data.end(), "--mock-data"));
  EXPECT_NO_THROW(finalized(with(no_data, {"--data-path", "0.3", "a", "0.7", "b"}), 1));
  EXPECT_NO_THROW(
      finalized(with(no_data, {"--train-data-path", "a", "--valid-data-path", "b"}), 1));
  const std::string one_source =
      "give exactly one data source: --data-path (with --split), "
      "--train-data-path/--valid-data-path/--test-data-path, or --mock-data";
  EXPECT_EQ(validation_error(no_data, 1), one_source);
  EXPECT_EQ(validation_error(with(no_data, {"--data-path", "a", "--train-data-path", "b"}), 1),
            one_source);
  EXPECT_EQ(validation_error(with(no_data, {"--valid-data-path", "b"}), 1),
            "--valid-data-path/--test-data-path need --train-data-path");
  // Blends and splits are read by the data module's parsers, with their messages.
  EXPECT_CONTAINS(validation_error(with(no_data, {"--data-path", "0.3", "a", "b", "c"}), 1),
                  "--data-path mixes weights and prefixes");
  EXPECT_EQ(validation_error(with(no_data, {"--data-path", "a", "--split", "0,0"}), 1),
            "--split '0,0' gives every split zero weight");
}

TEST(Arguments, MultiLatentAttention) {
  TrainingArguments plain = finalized(small_flags(), 1);
  EXPECT_FALSE(plain.multi_latent_attention);
  // Megatron's defaults: no query compression, kv rank 32, heads of 128 + 64 and 128.
  TrainingArguments a = finalized(with(small_flags(), {"--multi-latent-attention"}), 1);
  EXPECT_TRUE(a.multi_latent_attention);
  EXPECT_FALSE(a.q_lora_rank.has_value());
  EXPECT_EQ(a.kv_lora_rank, 32);
  EXPECT_EQ(a.qk_head_dim, 128);
  EXPECT_EQ(a.qk_pos_emb_head_dim, 64);
  EXPECT_EQ(a.v_head_dim, 128);
  EXPECT_FALSE(a.qk_layernorm);
  TrainingArguments set = finalized(
      with(small_flags(), {"--multi-latent-attention", "--q-lora-rank", "24", "--kv-lora-rank",
                           "16", "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "4", "--v-head-dim",
                           "12", "--qk-layernorm"}),
      1);
  EXPECT_EQ(set.q_lora_rank, 24);
  EXPECT_EQ(set.kv_lora_rank, 16);
  EXPECT_EQ(set.qk_head_dim, 8);
  EXPECT_EQ(set.qk_pos_emb_head_dim, 4);
  EXPECT_EQ(set.v_head_dim, 12);
  EXPECT_TRUE(set.qk_layernorm);
  const Args mla = with(small_flags(), {"--multi-latent-attention"});
  EXPECT_EQ(validation_error(with(mla, {"--group-query-attention", "--num-query-groups", "2"}), 1),
            "--group-query-attention and --multi-latent-attention are mutually exclusive");
  EXPECT_EQ(validation_error(with(mla, {"--q-lora-rank", "0"}), 1),
            "argument --q-lora-rank must be positive (got 0)");
  EXPECT_EQ(validation_error(with(mla, {"--kv-lora-rank", "-1"}), 1),
            "argument --kv-lora-rank must be positive (got -1)");
  EXPECT_EQ(validation_error(with(mla, {"--qk-head-dim", "0"}), 1),
            "argument --qk-head-dim must be positive (got 0)");
  EXPECT_EQ(validation_error(with(mla, {"--v-head-dim", "0"}), 1),
            "argument --v-head-dim must be positive (got 0)");
  EXPECT_EQ(validation_error(with(mla, {"--qk-pos-emb-head-dim", "3"}), 1),
            "--qk-pos-emb-head-dim (3) must be even and >= 2 (rope rotates pairs)");
  EXPECT_EQ(validation_error(with(mla, {"--tensor-model-parallel-size", "2",
                                        "--num-attention-heads", "3", "--kv-channels", "16"}),
                             2),
            "--num-attention-heads (3) is not divisible by --tensor-model-parallel-size (2)");
  // Multi-latent attention reads --rope-type (common attention refuses yarn there).
  EXPECT_EQ(finalized(with(mla, {"--rope-type", "yarn"}), 1).rope_type, "yarn");
}

TEST(Arguments, HelpIsGroupedLikeMegatron) {
  ParseOutcome outcome = parse_arguments({"--help"});
  ASSERT_TRUE(outcome.help_requested);
  const std::string& help = outcome.help_text;
  size_t network = help.find("network size:"), moe = help.find("moe:"),
         layers = help.find("--num-layers"), topk = help.find("--moe-router-topk");
  ASSERT_NE(network, std::string::npos);
  ASSERT_NE(moe, std::string::npos);
  EXPECT_LT(network, layers);
  EXPECT_LT(moe, topk);
  EXPECT_LT(layers, moe);
  // Megatron's parse_args adds its groups in this order.
  size_t previous = 0;
  for (const char* title :
       {"network size:", "regularization:", "training:", "initialization:", "learning rate:",
        "checkpointing:", "mixed precision:", "distributed:", "validation:", "data and dataloader:",
        "tokenizer:", "moe:", "mla:", "logging:"}) {
    size_t at = help.find(std::string("\n") + title);
    ASSERT_NE(at, std::string::npos) << title;
    EXPECT_GT(at, previous) << title << " out of Megatron's order";
    previous = at;
  }
}

// The names moe-train accepts that Megatron-LM does not define (--help, which argparse adds
// without add_argument, included).
const std::set<std::string> kMoecoreOwnNames = {"--help", "--log-file", "--moe-capacity-scope",
                                                "--moe-router-type", "--check-grad-reduction"};

TEST(Arguments, SupportedNamesAreMegatronNames) {
  const auto& megatron = megatron_argument_names();
  EXPECT_TRUE(std::is_sorted(megatron.begin(), megatron.end()));
  for (const std::string& name : supported_argument_names()) {
    if (kMoecoreOwnNames.count(name)) continue;
    EXPECT_TRUE(std::binary_search(megatron.begin(), megatron.end(), name))
        << name << " is not a Megatron-LM argument name";
  }
}

// Qwen2/Qwen3 and YaRN attention flags: Megatron's names, defaults and None-defaults, and the
// values that are refused with the flag named.
TEST(Arguments, QwenAndYarnAttentionFlags) {
  TrainingArguments plain = finalized(small_flags(), 1);
  EXPECT_FALSE(plain.qk_layernorm);
  EXPECT_EQ(plain.rotary_scaling_factor, 1.0);
  EXPECT_EQ(plain.mscale, 1.0);
  EXPECT_EQ(plain.mscale_all_dim, 0.0);
  EXPECT_FALSE(plain.yarn_original_max_position_embeddings || plain.yarn_beta_fast ||
               plain.yarn_beta_slow || plain.yarn_correction_range_round_to_int || plain.rope_type);
  EXPECT_TRUE(plain.add_qkv_bias);  // Megatron: --add-bias-linear (the default) implies it
  TrainingArguments qwen = finalized(with(small_flags(), {"--disable-bias-linear",
                                                          "--add-qkv-bias",
                                                          "--qk-layernorm",
                                                          "--position-embedding-type",
                                                          "yarn",
                                                          "--rotary-scaling-factor",
                                                          "4",
                                                          "--mscale",
                                                          "0.707",
                                                          "--mscale-all-dim",
                                                          "0.707",
                                                          "--yarn-original-max-position-embeddings",
                                                          "32",
                                                          "--yarn-beta-fast",
                                                          "16",
                                                          "--yarn-beta-slow",
                                                          "2",
                                                          "--no-yarn-correction-range-round-to-int",
                                                          "--rope-type",
                                                          "rope"}),
                                     1);
  EXPECT_FALSE(qwen.add_bias_linear);
  EXPECT_TRUE(qwen.add_qkv_bias);
  EXPECT_TRUE(qwen.qk_layernorm);
  EXPECT_EQ(qwen.position_embedding_type, "yarn");
  EXPECT_EQ(qwen.rotary_scaling_factor, 4.0);
  EXPECT_EQ(qwen.mscale, 0.707);
  EXPECT_EQ(qwen.mscale_all_dim, 0.707);
  EXPECT_EQ(qwen.yarn_original_max_position_embeddings, 32);
  EXPECT_EQ(qwen.yarn_beta_fast, 16.0);
  EXPECT_EQ(qwen.yarn_beta_slow, 2.0);
  EXPECT_EQ(qwen.yarn_correction_range_round_to_int, false);
  EXPECT_EQ(qwen.rope_type, "rope");
  EXPECT_FALSE(finalized(with(small_flags(), {"--disable-bias-linear"}), 1).add_qkv_bias);

  const std::pair<Args, std::string> refused[] = {
      {{"--rotary-scaling-factor", "0"},
       "argument --rotary-scaling-factor must be positive (got 0)"},
      {{"--rotary-scaling-factor", "-1.5"},
       "argument --rotary-scaling-factor must be positive (got -1.5)"},
      {{"--mscale", "nan"}, "argument --mscale must be a finite number (got nan)"},
      {{"--mscale-all-dim", "inf"}, "argument --mscale-all-dim must be a finite number (got inf)"},
      {{"--yarn-original-max-position-embeddings", "0"},
       "argument --yarn-original-max-position-embeddings must be positive (got 0)"},
      {{"--yarn-beta-fast", "0"}, "argument --yarn-beta-fast must be positive (got 0)"},
      {{"--yarn-beta-slow", "-1"}, "argument --yarn-beta-slow must be positive (got -1)"},
      {{"--rope-type", "yarn"},
       "--rope-type yarn: common attention supports only --rope-type rope (as Megatron); use "
       "--position-embedding-type yarn for YaRN"},
      {{"--position-embedding-type", "yarn", "--kv-channels", "5"},
       "--position-embedding-type yarn needs an even --kv-channels (got 5)"},
  };
  for (const auto& [flags, message] : refused) {
    EXPECT_EQ(validation_error(with(small_flags(), flags), 1), message);
  }
}

// The Megatron-LM name list is generated (scripts/megatron_argument_names.py; the release is in
// src/train/megatron_argument_names.cc). Every name on it that moe-train does not accept is
// refused by name, never reported as unknown: the refused ones are the list minus the accepted.
TEST(Arguments, EveryUnacceptedMegatronNameIsRefusedByName) {
  const auto& megatron = megatron_argument_names();
  EXPECT_EQ(megatron.size(), 834u);  // core_v0.19.0; docs/moe-train.md states the number
  const std::vector<std::string> supported = supported_argument_names();
  size_t accepted = 0, refused = 0;
  for (const std::string& name : megatron) {
    const bool accepts = std::binary_search(supported.begin(), supported.end(), name);
    const std::string error = parse_error({name});
    const bool refused_by_name =
        error ==
        "argument " + name + " is a Megatron-LM argument that moecore does not support yet";
    EXPECT_NE(accepts, refused_by_name) << name << ": " << error;
    accepted += accepts;
    refused += refused_by_name;
  }
  EXPECT_EQ(refused, megatron.size() - accepted);
  // The counts docs/moe-train.md states (Refusals): of core_v0.19.0's 834 names.
  EXPECT_EQ(accepted, 141u);
  EXPECT_EQ(refused, 693u);
  // Only moecore's own names are not on the list, so every other accepted name was counted above.
  EXPECT_EQ(accepted, supported.size() - kMoecoreOwnNames.size());
}

TEST(Arguments, EditDistance) {
  EXPECT_EQ(edit_distance("", "abc"), 3);
  EXPECT_EQ(edit_distance("kitten", "sitting"), 3);
  EXPECT_EQ(edit_distance("same", "same"), 0);
}

}  // namespace
}  // namespace moe::train

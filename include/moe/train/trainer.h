// The training loop behind moe-train (Megatron's pretrain() for GPT): builds the parallel
// layout, the GPT model, the optimizer and learning-rate schedule, the datasets and the data
// iterator of this data-parallel rank; loads a checkpoint; trains --train-iters iterations of
// --global-batch-size samples (gradient accumulation over global / (micro x dp) micro-batches);
// logs, evaluates and saves at their intervals.
//
// Randomness is a pure function of (the run's random streams, iteration, sample index); the
// streams come from --seed and are the checkpoint's RNG state (unless --no-save-rng), so a run
// resumed from a checkpoint produces bitwise the same losses as one that never stopped.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <optional>
#include <string>
#include <vector>

#include "moe/model/config.h"
#include "moe/train/arguments.h"

namespace moe::train {

// What one training iteration did (identical on every rank).
struct IterationStats {
  int64_t iteration = 0;  // 1-based: the iteration just completed
  int64_t consumed_samples = 0;
  double lr = 0;
  double lm_loss = 0;              // mean over micro-batches and data-parallel ranks
  double load_balancing_loss = 0;  // mean over MoE layers (as the router computes it)
  double z_loss = 0;               // mean over MoE layers
  // Per multi-token-prediction depth: its loss (unscaled), mean over micro-batches and
  // data-parallel ranks (Megatron's "mtp_<depth> loss"). Empty without --mtp-num-layers.
  std::vector<double> mtp_losses;
  double loss_tokens = 0;  // loss-mask tokens the lm loss averaged, summed over the global batch
  double grad_norm = 0;
  double loss_scale = 1;
  bool skipped = false;  // inf/NaN gradients: no update
  double elapsed_ms = 0;
  double tokens_per_second = 0;
  // Tokens routed to each expert in this iteration, summed over MoE layers, micro-batches and
  // ranks, divided by the even share: 1.0 means perfectly balanced. Empty for dense models or
  // when the model does not report loads.
  std::vector<double> expert_load;
  // The same per layer ([num_layers][experts], each relative to its layer's even share); empty
  // for dense layers. Logged per layer as min, max and coefficient of variation.
  std::vector<std::vector<double>> layer_expert_load;
  // With --moe-router-enable-expert-bias: each MoE layer's bias range after the step's update.
  struct BiasRange {
    int layer = 0;
    double min = 0, max = 0;
  };
  std::vector<BiasRange> expert_bias_ranges;
  // Per pipeline stage: the most tensor storage (bytes) alive at once during the step's
  // forward and backward beyond what was alive before it (saved activations and their
  // temporaries), the maximum over the stage's ranks.
  std::vector<double> stage_peak_activation_bytes;
};

struct TrainingReport {
  int64_t start_iteration = 0;  // 0, or the loaded checkpoint's iteration
  int64_t final_iteration = 0;
  std::vector<IterationStats> iterations;  // every iteration this run trained
  // (iteration, lm loss) of every validation, the one at the end of training included.
  std::vector<std::pair<int64_t, double>> validation_losses;
  std::optional<double> test_loss;             // at the end of training, when there is a test split
  std::optional<std::string> last_checkpoint;  // directory of the latest save
};

// The model configuration moe-train builds from finalized arguments (moe-plan reuses it).
model::TransformerConfig model_config(const TrainingArguments& args, int64_t padded_vocab);
// A bad input (tokenizer, model, checkpoint or data file, or a sample read during training)
// found on some rank, thrown on every rank with the same text: the lowest failed rank's message
// and the failed ranks. The ranks agreed on it, so no collective is left pending: callers report
// it once and exit without aborting the job.
class InputError : public Error {
 public:
  using Error::Error;
};

// Runs the job on every rank of MPI_COMM_WORLD (collective). `args` must be finalized for the
// world size. Rank 0 writes the log to `log`. Throws InputError on bad input (missing or corrupt
// files, unsupported combinations, out-of-vocabulary samples), naming the file or flag, and
// moe::Error for other failures during training.
TrainingReport pretrain(const TrainingArguments& args, std::ostream& log);

// Megatron's log line for the iterations since the last one (averages over `window`).
std::string format_log_line(const std::vector<IterationStats>& window, int64_t train_iters,
                            int64_t global_batch_size);

}  // namespace moe::train

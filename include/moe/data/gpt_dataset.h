// Megatron's GPT pre-training data pipeline (megatron/core/datasets/): split parsing, GPTDataset
// (document, sample and shuffle indices built exactly as gpt_dataset.py and helpers.cpp do, with
// numpy's MT19937 shuffle, so the same seed selects the same samples as Megatron), BlendedDataset
// (build_blending_indices), the BlendedMegatronDatasetBuilder logic for --data-path/--split, and
// MegatronPretrainingSampler's per data-parallel-rank micro-batches.
//
// Every rank builds the same indices from the same config (no communication needed), so samples
// are identical on every run and every parallel layout. The data position is one number,
// consumed_samples, which a checkpoint saves and a resumed run passes back.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moe/data/indexed_dataset.h"
#include "moe/data/tokenizer.h"
#include "moe/tensor/tensor.h"

namespace moe::data {

enum class Split : int { Train = 0, Valid = 1, Test = 2 };
constexpr int kSplitCount = 3;
std::string_view split_name(Split split);  // "train", "valid", "test"

// --split: "99,1,0" (or "99/1/0") -> {0.99, 0.01, 0.0}. Each field is one whole number (as
// Python's float() reads it, "1e-3" included) and a finite weight >= 0; missing trailing entries
// are 0; the weights are normalised to sum 1. A bad field is an error naming the string and it.
std::array<double, kSplitCount> parse_split(std::string_view split);
// Megatron's convert_split_vector_to_split_matrix: [begin, end) fractions per split, or nullopt
// for a split with no share.
using SplitMatrix = std::array<std::optional<std::pair<double, double>>, kSplitCount>;
SplitMatrix split_matrix(const std::array<double, kSplitCount>& split);
// The [begin, end) sequence range of one split of a dataset of `count` sequences
// (round(fraction * count), rounding half to even like Python).
std::pair<int64_t, int64_t> split_sequence_range(const std::pair<double, double>& bookends,
                                                 int64_t count);

// --data-path: "prefix", "prefix1 prefix2 ..." (unweighted) or "w1 prefix1 w2 prefix2 ..."
// (Megatron's get_blend_from_list). Weights stay unnormalised here; empty when unweighted.
struct Blend {
  std::vector<std::string> prefixes;
  std::vector<double> weights;
};
Blend parse_blend(const std::vector<std::string>& data_path);

// Per-sample post-processing (GPTDataset.__getitem__ / _get_ltor_masks_and_position_ids).
struct SampleOptions {
  int64_t eod_token = kNoToken;  // tokenizer.eod
  // tokenizer.pad, or kNoToken when it is undefined or collides with eod (Megatron's fallback).
  int64_t pad_token = kNoToken;
  bool reset_position_ids = false;  // --reset-position-ids
  bool eod_mask_loss = false;       // --eod-mask-loss
  // The model's (padded) vocabulary size: a GPTDataset refuses a token id outside [0, vocab_size),
  // naming the data file, since such data was made with another tokenizer. 0 checks nothing.
  int64_t vocab_size = 0;
};
// Megatron's choice of pad id for a tokenizer: pad, unless undefined or equal to eod.
int64_t dataset_pad_token(const Tokenizer& tokenizer);

struct GPTDatasetConfig {
  std::vector<std::string> data_path = {};  // --data-path (see parse_blend)
  // --train-data-path, --valid-data-path, --test-data-path: a blend per split instead of
  // --data-path + --split (each split then uses every sequence of its datasets).
  std::array<std::vector<std::string>, kSplitCount> per_split_data_path = {};
  std::string split = "969, 30, 1";  // --split (Megatron's default)
  int64_t seq_length = 0;            // --seq-length
  uint32_t seed = 1234;              // --seed
  // Samples wanted per split (train, valid, test); nullopt builds exactly one epoch.
  std::array<std::optional<int64_t>, kSplitCount> num_samples = {};
  bool add_extra_token_to_sequence = true;            // samples hold seq_length + 1 tokens
  bool drop_last_partial_validation_sequence = true;  // otherwise valid pads its last sample
  double mid_level_dataset_surplus = 0.005;           // blend head-room, as Megatron
  SampleOptions sample = {};
};

// A dataset of GPT samples addressed by index; sample i is text_length() token ids.
class SampleSource {
 public:
  virtual ~SampleSource() = default;
  virtual int64_t size() const = 0;
  virtual int64_t seq_length() const = 0;
  virtual int64_t text_length() const = 0;  // seq_length + add_extra_token_to_sequence
  virtual Split split() const = 0;
  // Writes sample `index` (0 <= index < size()) into out[text_length()]; positions past the end
  // of the data (only a non-dropped last valid sample) hold the pad id.
  virtual void text(int64_t index, int64_t* out) const = 0;
};

// Megatron's GPTDataset over the sequences [sequence_begin, sequence_end) of one indexed dataset.
class GPTDataset final : public SampleSource {
 public:
  GPTDataset(std::shared_ptr<const IndexedDataset> dataset, int64_t sequence_begin,
             int64_t sequence_end, std::optional<int64_t> num_samples, Split split,
             const GPTDatasetConfig& config);

  int64_t size() const override { return int64_t(shuffle_index_.size()); }
  int64_t seq_length() const override { return seq_length_; }
  int64_t text_length() const override { return seq_length_ + extra_token_; }
  Split split() const override { return split_; }
  void text(int64_t index, int64_t* out) const override;

  int64_t num_epochs() const { return num_epochs_; }
  // The three indices, as Megatron would cache them in .npy files.
  std::span<const int32_t> document_index() const { return document_index_; }  // [epochs * docs]
  std::span<const int64_t> sample_index() const { return sample_index_; }      // [(size+1) * 2]
  std::span<const int64_t> shuffle_index() const { return shuffle_index_; }    // [size]
  const IndexedDataset& indexed_dataset() const { return *dataset_; }

 private:
  std::shared_ptr<const IndexedDataset> dataset_;
  Split split_;
  int64_t seq_length_;
  int64_t extra_token_;
  int64_t pad_token_;
  int64_t vocab_size_;
  int64_t num_epochs_ = 0;
  std::vector<int32_t> document_index_;
  std::vector<int64_t> sample_index_;
  std::vector<int64_t> shuffle_index_;
};

// Megatron's BlendedDataset: sample i comes from datasets[dataset_index[i]] at
// dataset_sample_index[i], chosen greedily so the running proportions track the weights.
class BlendedDataset final : public SampleSource {
 public:
  // With a size, weights are normalised and `size` samples are drawn (build_blending_indices);
  // without, weights are whole sample counts drawn exhaustively
  // (build_exhaustive_blending_indices). Throws if a dataset would be oversampled.
  BlendedDataset(std::vector<std::shared_ptr<const SampleSource>> datasets,
                 std::vector<double> weights, std::optional<int64_t> size);

  int64_t size() const override { return int64_t(dataset_index_.size()); }
  int64_t seq_length() const override { return datasets_.front()->seq_length(); }
  int64_t text_length() const override { return datasets_.front()->text_length(); }
  Split split() const override { return datasets_.front()->split(); }
  void text(int64_t index, int64_t* out) const override;

  std::span<const int16_t> dataset_index() const { return dataset_index_; }                // [size]
  std::span<const int64_t> dataset_sample_index() const { return dataset_sample_index_; }  // [size]

 private:
  std::vector<std::shared_ptr<const SampleSource>> datasets_;
  std::vector<int16_t> dataset_index_;
  std::vector<int64_t> dataset_sample_index_;
};

// BlendedMegatronDatasetBuilder.build: the train, valid and test datasets (null for a split with
// no share or no data) from --data-path and --split, or from the per-split paths, and the sample
// counts. Throws moe::Error on bad input.
std::array<std::shared_ptr<const SampleSource>, kSplitCount> build_gpt_datasets(
    const GPTDatasetConfig& config);

// Megatron's get_train_valid_test_num_samples for --train-iters runs.
std::array<std::optional<int64_t>, kSplitCount> train_valid_test_num_samples(
    int64_t train_iters, int64_t global_batch_size, int64_t eval_interval, int64_t eval_iters);

// One data-parallel rank's micro-batch.
struct MicroBatch {
  Tensor tokens;        // [micro_batch, seq_length] I64, model inputs
  Tensor labels;        // [micro_batch, seq_length] I64, next-token targets
  Tensor loss_mask;     // [micro_batch, seq_length] F32, 1 where the token counts in the loss
  Tensor position_ids;  // [micro_batch, seq_length] I64
  std::vector<int64_t> sample_indices;  // [micro_batch] indices into the dataset
};

// Builds the micro-batch for the given sample indices (tokens = text[:-1], labels = text[1:],
// masks and positions as Megatron's GPTDataset.__getitem__).
MicroBatch make_micro_batch(const SampleSource& dataset, std::span<const int64_t> sample_indices,
                            const SampleOptions& options);

// MegatronPretrainingSampler + data iterator: walks the dataset from consumed_samples in groups of
// micro_batch_size * data_parallel_size samples; rank r takes the r-th micro_batch_size slice of
// each group. Incomplete final groups are dropped, as Megatron does.
class PretrainingDataIterator {
 public:
  PretrainingDataIterator(std::shared_ptr<const SampleSource> dataset, int64_t consumed_samples,
                          int64_t micro_batch_size, int64_t data_parallel_rank,
                          int64_t data_parallel_size, SampleOptions options);

  bool has_next() const;  // a whole group remains
  MicroBatch next();      // throws moe::Error when the data is exhausted
  // Samples consumed by all data-parallel ranks together; what a checkpoint stores.
  int64_t consumed_samples() const { return consumed_samples_; }
  int64_t total_samples() const { return dataset_->size(); }

 private:
  std::shared_ptr<const SampleSource> dataset_;
  int64_t consumed_samples_;
  int64_t micro_batch_size_;
  int64_t data_parallel_rank_;
  int64_t data_parallel_size_;
  SampleOptions options_;
};

}  // namespace moe::data

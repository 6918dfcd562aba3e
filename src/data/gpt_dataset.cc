#include "moe/data/gpt_dataset.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <random>

#include "moe/tensor/error.h"

namespace moe::data {
namespace {

// numpy.random.RandomState(seed) for shuffling: MT19937 seeded by init_genrand (which is what
// std::mt19937 does) and the legacy bounded-integer draw used by RandomState.shuffle.
class NumpyRandomState {
 public:
  explicit NumpyRandomState(uint32_t seed) : engine_(seed) {}

  // numpy's random_interval: a uniform integer in [0, max] by masked rejection sampling.
  uint64_t interval(uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max;
    for (int shift = 1; shift <= 32; shift *= 2) mask |= mask >> shift;
    uint64_t value;
    if (max <= 0xFFFFFFFFull) {
      do value = engine_() & mask;
      while (value > max);
    } else {
      do value = ((uint64_t(engine_()) << 32) | engine_()) & mask;
      while (value > max);
    }
    return value;
  }

  // RandomState.shuffle on a 1-D array (Fisher-Yates from the back).
  template <class T>
  void shuffle(std::span<T> values) {
    for (size_t i = values.size(); i-- > 1;) std::swap(values[i], values[size_t(interval(i))]);
  }

 private:
  std::mt19937 engine_;
};

// _build_document_index: the documents repeated once per epoch and shuffled, optionally with the
// final epoch shuffled on its own.
std::vector<int32_t> build_document_index(int32_t first_document, int32_t document_count,
                                          int64_t num_epochs, NumpyRandomState& random,
                                          bool separate_final_epoch) {
  if (separate_final_epoch && num_epochs > 1) {
    std::vector<int32_t> index =
        build_document_index(first_document, document_count, num_epochs - 1, random, false);
    const std::vector<int32_t> last =
        build_document_index(first_document, document_count, 1, random, false);
    index.insert(index.end(), last.begin(), last.end());
    return index;
  }
  std::vector<int32_t> index(size_t(num_epochs) * size_t(document_count));
  for (size_t i = 0; i < index.size(); ++i) {
    index[i] = first_document + int32_t(i % size_t(document_count));
  }
  random.shuffle(std::span<int32_t>(index));
  return index;
}

// helpers.cpp build_sample_idx: sample s spans from (document_index position, token offset)
// sample_index[s] to sample_index[s + 1]; consecutive samples share one token (the label of the
// last input). Returns the flat [(num_samples + 1) * 2] array.
std::vector<int64_t> build_sample_index(std::span<const int32_t> sizes,
                                        std::span<const int32_t> document_index, int64_t seq_length,
                                        int64_t num_epochs, int64_t tokens_per_epoch,
                                        bool drop_last_partial, int64_t extra_token) {
  const int64_t total = num_epochs * tokens_per_epoch - extra_token;
  // Megatron rounds the partial case through a single-precision float; kept for identical sizes.
  const int64_t num_samples =
      drop_last_partial ? total / seq_length : int64_t(std::ceil(float(total) / float(seq_length)));
  std::vector<int64_t> sample_index;
  sample_index.reserve(size_t(num_samples + 1) * 2);
  int64_t position = 0;  // into document_index
  int64_t offset = 0;    // into that document
  sample_index.push_back(position);
  sample_index.push_back(offset);
  for (int64_t sample = 1; sample <= num_samples; ++sample) {
    int64_t remaining = seq_length + extra_token;
    while (remaining != 0) {
      const int64_t length = sizes[size_t(document_index[size_t(position)])] - offset;
      remaining -= length;
      if (remaining <= 0) {
        offset += remaining + length - extra_token;
        remaining = 0;
      } else if (position == int64_t(document_index.size()) - 1) {
        // Out of documents: only the last, partial sample gets here.
        offset = sizes[size_t(document_index[size_t(position)])] - extra_token;
        break;
      } else {
        ++position;
        offset = 0;
      }
    }
    sample_index.push_back(position);
    sample_index.push_back(offset);
  }
  return sample_index;
}

// _build_shuffle_index: [0, num_samples) shuffled, then [num_samples, total) shuffled apart.
std::vector<int64_t> build_shuffle_index(int64_t num_samples, int64_t total,
                                         NumpyRandomState& random) {
  std::vector<int64_t> index(static_cast<size_t>(total));
  std::iota(index.begin(), index.end(), int64_t(0));
  random.shuffle(std::span<int64_t>(index.data(), size_t(num_samples)));
  if (num_samples < total) {
    random.shuffle(std::span<int64_t>(index.data() + num_samples, size_t(total - num_samples)));
  }
  return index;
}

std::vector<double> normalize(const std::vector<double>& weights) {
  double sum = 0;
  for (double w : weights) sum += w;
  std::vector<double> result;
  for (double w : weights) result.push_back(w / sum);
  return result;
}

}  // namespace

std::string_view split_name(Split split) {
  switch (split) {
    case Split::Train:
      return "train";
    case Split::Valid:
      return "valid";
    case Split::Test:
      return "test";
  }
  return "unknown";
}

std::array<double, kSplitCount> parse_split(std::string_view split) {
  // Megatron reads the fields with Python's float(), separated by ',' or else '/'.
  const char separator = split.find(',') != std::string_view::npos ? ',' : '/';
  std::vector<double> values;
  for (size_t begin = 0;;) {
    const size_t end = std::min(split.find(separator, begin), split.size());
    std::string_view field = split.substr(begin, end - begin);
    const size_t first = field.find_first_not_of(" \t");
    field = first == std::string_view::npos
                ? std::string_view()
                : field.substr(first, field.find_last_not_of(" \t") - first + 1);
    double value = 0;
    const auto [parsed_end, error] =
        std::from_chars(field.data(), field.data() + field.size(), value);
    MOE_CHECK(!field.empty() && error == std::errc() && parsed_end == field.data() + field.size(),
              "--split '", split, "': field ", values.size() + 1, " ('", field,
              "') is not a number");
    MOE_CHECK(std::isfinite(value) && value >= 0, "--split '", split, "': field ",
              values.size() + 1, " (", field, ") must be a finite weight >= 0");
    values.push_back(value);
    if (end == split.size()) break;
    begin = end + 1;
  }
  MOE_CHECK(values.size() <= size_t(kSplitCount), "--split '", split, "' has ", values.size(),
            " weights; at most 3 (train, valid, test) are allowed");
  values.resize(kSplitCount, 0.0);
  const double sum = values[0] + values[1] + values[2];
  MOE_CHECK(sum > 0, "--split '", split, "' gives every split zero weight");
  const std::vector<double> normalized = normalize(values);
  return {normalized[0], normalized[1], normalized[2]};
}

SplitMatrix split_matrix(const std::array<double, kSplitCount>& split) {
  SplitMatrix matrix;
  double begin = 0;
  for (int i = 0; i < kSplitCount; ++i) {
    const double end = begin + split[size_t(i)];
    if (end > begin) matrix[size_t(i)] = std::make_pair(begin, end);
    begin = end;
  }
  return matrix;
}

std::pair<int64_t, int64_t> split_sequence_range(const std::pair<double, double>& bookends,
                                                 int64_t count) {
  // Python's round() rounds half to even, which nearbyint does in the default rounding mode.
  return {int64_t(std::nearbyint(bookends.first * double(count))),
          int64_t(std::nearbyint(bookends.second * double(count)))};
}

Blend parse_blend(const std::vector<std::string>& data_path) {
  const auto trim = [](const std::string& text) {
    const size_t begin = text.find_first_not_of(" \t\n");
    const size_t end = text.find_last_not_of(" \t\n");
    return begin == std::string::npos ? std::string() : text.substr(begin, end - begin + 1);
  };
  Blend blend;
  // An even-length list whose every other entry is a number is "weight prefix" pairs; a list
  // with no numbers there is all prefixes; a mixture is an error (Megatron asserts).
  size_t numbers = 0;
  if (data_path.size() % 2 == 0) {
    for (size_t i = 0; i < data_path.size(); i += 2) {
      const std::string text = trim(data_path[i]);
      double weight = 0;
      const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), weight);
      if (error == std::errc() && end == text.data() + text.size() && !text.empty()) {
        blend.weights.push_back(weight);
        ++numbers;
      }
    }
  }
  if (numbers == 0) {
    blend.weights.clear();
    for (const std::string& prefix : data_path) blend.prefixes.push_back(trim(prefix));
    return blend;
  }
  MOE_CHECK(numbers == data_path.size() / 2,
            "--data-path mixes weights and prefixes: give either prefixes only or "
            "\"weight prefix\" pairs (",
            numbers, " of ", data_path.size() / 2, " weight positions hold numbers)");
  for (size_t i = 1; i < data_path.size(); i += 2) blend.prefixes.push_back(trim(data_path[i]));
  for (double weight : blend.weights) {
    MOE_CHECK(std::isfinite(weight) && weight > 0, "--data-path: weight ", weight,
              " must be positive");
  }
  return blend;
}

int64_t dataset_pad_token(const Tokenizer& tokenizer) {
  const int64_t pad = tokenizer.pad();
  return pad == tokenizer.eod() ? kNoToken : pad;
}

// ------------------------------------------------------------------------------------------------
// GPTDataset

GPTDataset::GPTDataset(std::shared_ptr<const IndexedDataset> dataset, int64_t sequence_begin,
                       int64_t sequence_end, std::optional<int64_t> num_samples, Split split,
                       const GPTDatasetConfig& config)
    : dataset_(std::move(dataset)),
      split_(split),
      seq_length_(config.seq_length),
      extra_token_(config.add_extra_token_to_sequence ? 1 : 0),
      pad_token_(config.sample.pad_token),
      vocab_size_(config.sample.vocab_size) {
  const std::string& name = dataset_->path_prefix();
  MOE_CHECK(seq_length_ > 1, "--seq-length must be greater than 1, got ", seq_length_);
  MOE_CHECK(0 <= sequence_begin && sequence_begin <= sequence_end &&
                sequence_end <= dataset_->sequence_count(),
            name, ": sequence range [", sequence_begin, ", ", sequence_end,
            ") is outside the dataset's ", dataset_->sequence_count(), " sequences");
  MOE_CHECK(sequence_end <= int64_t(std::numeric_limits<int32_t>::max()), name,
            ": more sequences than Megatron's int32 document index holds");
  MOE_CHECK(!num_samples || *num_samples >= 0, name, ": negative sample count ", *num_samples);
  const auto sizes = dataset_->sequence_lengths();
  int64_t tokens_per_epoch = 0;
  for (int64_t s = sequence_begin; s < sequence_end; ++s) tokens_per_epoch += sizes[size_t(s)];

  const int64_t requested_tokens = num_samples ? *num_samples * seq_length_ + extra_token_ : 0;
  if (tokens_per_epoch <= 1) {  // Megatron's build_sample_idx requires more than one token
    MOE_CHECK(!num_samples || *num_samples == 0, name, ": the ", split_name(split),
              " split (sequences [", sequence_begin, ", ", sequence_end, ")) holds ",
              tokens_per_epoch, " tokens, too few to draw ", num_samples.value_or(0),
              " samples of ", seq_length_, " tokens");
    return;  // an empty dataset
  }
  num_epochs_ = 1;
  for (int64_t tokens = tokens_per_epoch; tokens < requested_tokens; tokens += tokens_per_epoch) {
    ++num_epochs_;
  }

  bool separate_final_epoch = false;
  int64_t samples_before_final_epoch = 0;
  if (num_epochs_ > 1) {
    samples_before_final_epoch =
        ((num_epochs_ - 1) * tokens_per_epoch - extra_token_) / seq_length_;
    const int64_t samples_from_final_epoch = *num_samples - samples_before_final_epoch;
    const int64_t samples_per_epoch = (tokens_per_epoch - extra_token_) / seq_length_;
    MOE_CHECK(samples_from_final_epoch >= 0 && samples_from_final_epoch <= samples_per_epoch + 1,
              name, ": inconsistent epoch arithmetic (", samples_from_final_epoch,
              " samples from the final epoch of ", samples_per_epoch, ")");
    // Megatron shuffles a final epoch used for less than 80% on its own.
    separate_final_epoch = samples_from_final_epoch < int64_t(0.80 * double(samples_per_epoch));
  }

  NumpyRandomState random(config.seed);
  document_index_ =
      build_document_index(int32_t(sequence_begin), int32_t(sequence_end - sequence_begin),
                           num_epochs_, random, separate_final_epoch);
  const bool drop_last_partial =
      split != Split::Valid || config.drop_last_partial_validation_sequence;
  sample_index_ = build_sample_index(sizes, document_index_, seq_length_, num_epochs_,
                                     tokens_per_epoch, drop_last_partial, extra_token_);
  const int64_t total = int64_t(sample_index_.size()) / 2 - 1;
  shuffle_index_ =
      build_shuffle_index(separate_final_epoch ? samples_before_final_epoch : total, total, random);
}

void GPTDataset::text(int64_t index, int64_t* out) const {
  MOE_CHECK(index >= 0 && index < size(), dataset_->path_prefix(), " (", split_name(split_),
            "): sample ", index, " out of range [0, ", size(), ")");
  const int64_t sample = shuffle_index_[size_t(index)];
  const int64_t first = sample_index_[size_t(2 * sample)];
  const int64_t first_offset = sample_index_[size_t(2 * sample + 1)];
  const int64_t last = sample_index_[size_t(2 * sample + 2)];
  const int64_t last_offset = sample_index_[size_t(2 * sample + 3)];
  const int64_t wanted = text_length();
  int64_t filled = 0;
  const auto copy = [&](int64_t position, int64_t offset, int64_t length) {
    MOE_CHECK(filled + length <= wanted, dataset_->path_prefix(), ": sample ", index,
              " would hold more than ", wanted, " tokens");
    const int64_t sequence = document_index_[size_t(position)];
    dataset_->read(sequence, offset, length, out + filled);
    for (int64_t t = 0; vocab_size_ > 0 && t < length; ++t) {
      const int64_t id = out[filled + t];
      MOE_CHECK(id >= 0 && id < vocab_size_, dataset_->path_prefix(), ": token id ", id,
                " (sequence ", sequence, ", token ", offset + t,
                ") is outside the model's vocabulary [0, ", vocab_size_,
                "); was the data made with another tokenizer or --vocab-size?");
    }
    filled += length;
  };
  if (first == last) {
    copy(first, first_offset, last_offset - first_offset + extra_token_);
  } else {
    for (int64_t position = first; position <= last; ++position) {
      const int64_t offset = position == first ? first_offset : 0;
      const int64_t length =
          position < last
              ? dataset_->sequence_lengths()[size_t(document_index_[size_t(position)])] - offset
              : last_offset + extra_token_;
      copy(position, offset, length);
    }
  }
  std::fill(out + filled, out + wanted, pad_token_);
}

// ------------------------------------------------------------------------------------------------
// BlendedDataset

BlendedDataset::BlendedDataset(std::vector<std::shared_ptr<const SampleSource>> datasets,
                               std::vector<double> weights, std::optional<int64_t> size)
    : datasets_(std::move(datasets)) {
  MOE_CHECK(!datasets_.empty() && datasets_.size() == weights.size(),
            "a blend needs one weight per dataset (", datasets_.size(), " datasets, ",
            weights.size(), " weights)");
  MOE_CHECK(datasets_.size() < 32767, "a blend holds at most 32766 datasets, got ",
            datasets_.size());
  for (size_t d = 0; d < datasets_.size(); ++d) {
    MOE_CHECK(weights[d] > 0, "blend weight ", d, " is ", weights[d], "; weights must be positive");
    MOE_CHECK(datasets_[d]->text_length() == datasets_.front()->text_length() &&
                  datasets_[d]->seq_length() == datasets_.front()->seq_length(),
              "blended datasets must share the sample length");
  }
  const size_t count = datasets_.size();
  std::vector<int64_t> drawn(count, 0);
  if (size) {
    MOE_CHECK(*size >= 0, "blend size ", *size, " is negative");
    weights = normalize(weights);
    // build_blending_indices: each sample goes to the dataset furthest behind its share.
    dataset_index_.resize(size_t(*size));
    dataset_sample_index_.resize(size_t(*size));
    for (int64_t sample = 0; sample < *size; ++sample) {
      const double position = std::max(double(sample), 1.0);
      size_t best = 0;
      double best_error = weights[0] * position - double(drawn[0]);
      for (size_t d = 1; d < count; ++d) {
        const double error = weights[d] * position - double(drawn[d]);
        if (error > best_error) best_error = error, best = d;
      }
      dataset_index_[size_t(sample)] = int16_t(best);
      dataset_sample_index_[size_t(sample)] = drawn[best]++;
    }
  } else {
    // build_exhaustive_blending_indices: exactly weights[d] samples from dataset d.
    std::vector<int64_t> wanted(count);
    int64_t total = 0;
    for (size_t d = 0; d < count; ++d) {
      MOE_CHECK(weights[d] == std::floor(weights[d]), "an exhaustive blend needs whole sample ",
                "counts as weights, got ", weights[d]);
      wanted[d] = int64_t(weights[d]);
      total += wanted[d];
    }
    std::vector<double> shares(count);
    for (size_t d = 0; d < count; ++d) shares[d] = double(wanted[d]) / double(total);
    std::vector<bool> spent(count, false);
    for (int64_t sample = 0; sample < total; ++sample) {
      const double position = std::max(double(sample), 1.0);
      size_t best = count;
      double best_error = std::numeric_limits<double>::lowest();
      for (size_t d = 0; d < count; ++d) {
        if (spent[d]) continue;
        const double error = shares[d] * position - double(drawn[d]);
        if (error > best_error) best_error = error, best = d;
      }
      dataset_index_.push_back(int16_t(best));
      dataset_sample_index_.push_back(drawn[best]++);
      if (drawn[best] == wanted[best]) spent[best] = true;
    }
  }
  for (size_t d = 0; d < count; ++d) {
    MOE_CHECK(drawn[d] <= datasets_[d]->size(), "the ", split_name(split()),
              " blend oversamples its datasets: it requests ", drawn[d], " samples from dataset ",
              d, ", which has ", datasets_[d]->size(),
              " (raise mid_level_dataset_surplus to build more head-room)");
  }
}

void BlendedDataset::text(int64_t index, int64_t* out) const {
  MOE_CHECK(index >= 0 && index < size(), "blended ", split_name(split()), " sample ", index,
            " out of range [0, ", size(), ")");
  datasets_[size_t(dataset_index_[size_t(index)])]->text(dataset_sample_index_[size_t(index)], out);
}

// ------------------------------------------------------------------------------------------------
// Builder

namespace {

// One split's dataset from a blend (BlendedMegatronDatasetBuilder): the GPTDataset itself when
// `direct` (a lone prefix), else a BlendedDataset of one GPTDataset per prefix, drawn by the given
// weights for `size` samples or, unweighted, by the datasets' lengths.
std::shared_ptr<const SampleSource> build_split_dataset(
    const Blend& blend, const std::vector<std::shared_ptr<const IndexedDataset>>& indexed,
    Split split, const std::pair<double, double>& bookends, std::optional<int64_t> size,
    bool direct, const GPTDatasetConfig& config, std::string_view flag) {
  const auto build_mid_level = [&](size_t d, std::optional<int64_t> samples) {
    const auto [begin, end] = split_sequence_range(bookends, indexed[d]->sequence_count());
    return std::make_shared<const GPTDataset>(indexed[d], begin, end, samples, split, config);
  };
  if (direct) return build_mid_level(0, size);

  const bool weighted = !blend.weights.empty();
  MOE_CHECK(!weighted || size, "a weighted ", flag, " needs a sample count for the ",
            split_name(split), " split");
  const std::vector<double> weights = weighted ? normalize(blend.weights) : std::vector<double>{};
  std::vector<std::shared_ptr<const SampleSource>> parts;
  int64_t blend_size = 0;
  for (size_t d = 0; d < blend.prefixes.size(); ++d) {
    std::optional<int64_t> samples;
    if (weighted) {
      // _get_size_per_split_per_dataset: the target share, plus the surplus to build.
      const double target = std::ceil(double(*size) * weights[d]);
      blend_size += int64_t(target);
      samples = int64_t(std::ceil(target * (1.0 + config.mid_level_dataset_surplus)));
    }
    parts.push_back(build_mid_level(d, samples));
  }
  if (weighted) return std::make_shared<const BlendedDataset>(parts, weights, blend_size);

  std::vector<double> lengths;
  int64_t total = 0;
  for (size_t d = 0; d < parts.size(); ++d) {
    MOE_CHECK(parts[d]->size() > 0, blend.prefixes[d], ": the ", split_name(split),
              " split has no samples, so it cannot take part in a blend");
    lengths.push_back(double(parts[d]->size()));
    total += parts[d]->size();
  }
  const std::optional<int64_t> capped =
      size ? std::optional<int64_t>(std::min(*size, total)) : std::nullopt;
  return std::make_shared<const BlendedDataset>(parts, lengths, capped);
}

}  // namespace

std::array<std::shared_ptr<const SampleSource>, kSplitCount> build_gpt_datasets(
    const GPTDatasetConfig& config) {
  static constexpr std::array<std::string_view, kSplitCount> kPerSplitFlags = {
      "--train-data-path", "--valid-data-path", "--test-data-path"};
  const bool per_split =
      std::any_of(config.per_split_data_path.begin(), config.per_split_data_path.end(),
                  [](const auto& paths) { return !paths.empty(); });
  MOE_CHECK(!per_split || config.data_path.empty(),
            "--data-path cannot be combined with --train-data-path, --valid-data-path or "
            "--test-data-path");
  MOE_CHECK(per_split || !config.data_path.empty(),
            "--data-path (or --train-data-path, --valid-data-path, --test-data-path) is required");

  // Each prefix is opened once, whichever splits use it.
  std::map<std::string, std::shared_ptr<const IndexedDataset>> opened;
  const auto open = [&](const Blend& blend) {
    std::vector<std::shared_ptr<const IndexedDataset>> indexed;
    for (const std::string& prefix : blend.prefixes) {
      auto& dataset = opened[prefix];
      if (!dataset) dataset = std::make_shared<const IndexedDataset>(prefix);
      indexed.push_back(dataset);
    }
    return indexed;
  };

  std::array<std::shared_ptr<const SampleSource>, kSplitCount> result;
  if (!per_split) {
    // All splits cut from the same blend by --split.
    const Blend blend = parse_blend(config.data_path);
    const auto indexed = open(blend);
    const SplitMatrix matrix = split_matrix(parse_split(config.split));
    const bool direct = blend.prefixes.size() == 1 && blend.weights.empty();
    for (int split = 0; split < kSplitCount; ++split) {
      if (!matrix[size_t(split)]) continue;
      result[size_t(split)] =
          build_split_dataset(blend, indexed, Split(split), *matrix[size_t(split)],
                              config.num_samples[size_t(split)], direct, config, "--data-path");
    }
    return result;
  }
  // Each split from its own blend, using every sequence of its datasets.
  for (int split = 0; split < kSplitCount; ++split) {
    const auto& paths = config.per_split_data_path[size_t(split)];
    if (paths.empty()) continue;
    const Blend blend = parse_blend(paths);
    result[size_t(split)] = build_split_dataset(
        blend, open(blend), Split(split), {0.0, 1.0}, config.num_samples[size_t(split)],
        blend.prefixes.size() == 1, config, kPerSplitFlags[size_t(split)]);
  }
  return result;
}

std::array<std::optional<int64_t>, kSplitCount> train_valid_test_num_samples(
    int64_t train_iters, int64_t global_batch_size, int64_t eval_interval, int64_t eval_iters) {
  MOE_CHECK(train_iters >= 0 && global_batch_size > 0 && eval_interval > 0 && eval_iters >= 0,
            "invalid sample-count arguments: train_iters ", train_iters, ", global_batch_size ",
            global_batch_size, ", eval_interval ", eval_interval, ", eval_iters ", eval_iters);
  const int64_t total_eval_iters = (train_iters / eval_interval + 1) * eval_iters;
  return {train_iters * global_batch_size, total_eval_iters * global_batch_size,
          eval_iters * global_batch_size};
}

// ------------------------------------------------------------------------------------------------
// Micro-batches

MicroBatch make_micro_batch(const SampleSource& dataset, std::span<const int64_t> sample_indices,
                            const SampleOptions& options) {
  const int64_t batch = int64_t(sample_indices.size());
  const int64_t text_length = dataset.text_length();
  const int64_t seq_length = dataset.seq_length();
  MicroBatch out;
  out.tokens = Tensor({batch, seq_length}, DType::I64);
  out.labels = Tensor({batch, seq_length}, DType::I64);
  out.loss_mask = Tensor({batch, seq_length}, DType::F32);
  out.position_ids = Tensor({batch, seq_length}, DType::I64);
  out.sample_indices.assign(sample_indices.begin(), sample_indices.end());
  std::vector<int64_t> text(static_cast<size_t>(text_length));
  for (int64_t b = 0; b < batch; ++b) {
    dataset.text(sample_indices[size_t(b)], text.data());
    int64_t* tokens = out.tokens.data<int64_t>() + b * seq_length;
    int64_t* labels = out.labels.data<int64_t>() + b * seq_length;
    float* loss_mask = out.loss_mask.data<float>() + b * seq_length;
    int64_t* positions = out.position_ids.data<int64_t>() + b * seq_length;
    int64_t document_start = 0;
    for (int64_t t = 0; t < seq_length; ++t) {
      tokens[t] = text[size_t(t)];
      // Without the extra token the labels wrap around, ending in the pad id.
      labels[t] = t + 1 < text_length ? text[size_t(t + 1)] : options.pad_token;
      const bool is_eod = tokens[t] == options.eod_token;
      loss_mask[t] = options.eod_mask_loss && is_eod ? 0.0f : 1.0f;
      positions[t] = t - document_start;
      if (options.reset_position_ids && is_eod) document_start = t + 1;
      // Padding: no loss on it, and id 0 so the embedding can look it up.
      if (labels[t] == options.pad_token) loss_mask[t] = 0.0f, labels[t] = 0;
      if (tokens[t] == options.pad_token) tokens[t] = 0;
    }
  }
  return out;
}

PretrainingDataIterator::PretrainingDataIterator(std::shared_ptr<const SampleSource> dataset,
                                                 int64_t consumed_samples, int64_t micro_batch_size,
                                                 int64_t data_parallel_rank,
                                                 int64_t data_parallel_size, SampleOptions options)
    : dataset_(std::move(dataset)),
      consumed_samples_(consumed_samples),
      micro_batch_size_(micro_batch_size),
      data_parallel_rank_(data_parallel_rank),
      data_parallel_size_(data_parallel_size),
      options_(options) {
  MOE_CHECK(dataset_ != nullptr, "data iterator: no dataset");
  MOE_CHECK(dataset_->size() > 0, "data iterator: the ", split_name(dataset_->split()),
            " dataset has no samples to consume");
  MOE_CHECK(consumed_samples_ >= 0 && consumed_samples_ <= dataset_->size(),
            "data iterator: consumed_samples ", consumed_samples_, " is outside [0, ",
            dataset_->size(), "] for the ", split_name(dataset_->split()), " dataset");
  MOE_CHECK(micro_batch_size_ > 0, "data iterator: micro batch size must be positive, got ",
            micro_batch_size_);
  MOE_CHECK(data_parallel_size_ > 0 && data_parallel_rank_ >= 0 &&
                data_parallel_rank_ < data_parallel_size_,
            "data iterator: data-parallel rank ", data_parallel_rank_, " is outside [0, ",
            data_parallel_size_, ")");
}

bool PretrainingDataIterator::has_next() const {
  return consumed_samples_ + micro_batch_size_ * data_parallel_size_ <= dataset_->size();
}

MicroBatch PretrainingDataIterator::next() {
  MOE_CHECK(has_next(), "data iterator: the ", split_name(dataset_->split()),
            " dataset is exhausted (", consumed_samples_, " of ", dataset_->size(),
            " samples consumed; a full group needs ", micro_batch_size_ * data_parallel_size_, ")");
  std::vector<int64_t> indices(static_cast<size_t>(micro_batch_size_));
  const int64_t first = consumed_samples_ + data_parallel_rank_ * micro_batch_size_;
  std::iota(indices.begin(), indices.end(), first);
  consumed_samples_ += micro_batch_size_ * data_parallel_size_;
  return make_micro_batch(*dataset_, indices, options_);
}

}  // namespace moe::data

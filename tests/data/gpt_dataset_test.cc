// GPT dataset: split parsing, index construction against an independent numpy statement of
// Megatron's algorithm, samples as windows of the shuffled document stream (nothing read past the
// data, empty documents skipped), determinism, blending proportions, the data-parallel sampler
// and resume, and micro-batch masks.
#include "moe/data/gpt_dataset.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <set>

#include "moe/tensor/error.h"
#include "support/testing.h"
#include "test_files.h"

namespace moe::data {
namespace {

using moe::testing::ScratchDir;

using Ids = std::vector<int64_t>;

using moe::testing::expect_error_containing;

// A dataset of `sequences` one-sequence documents with awkward lengths (zeros included) plus
// some zero-sequence documents; token values are distinct (first_token, first_token + 1, ...).
void write_dataset(const std::string& prefix, int64_t sequences, int64_t first_token = 1) {
  IndexedDatasetBuilder builder(prefix, TokenDType::I32);
  int64_t next = first_token;
  for (int64_t s = 0; s < sequences; ++s) {
    const int64_t length = s % 13 == 0 ? 0 : (s * 37) % 61;
    Ids tokens(static_cast<size_t>(length));
    for (auto& token : tokens) token = next++;
    builder.add_item(tokens);
    builder.end_document();
    if (s % 17 == 5) builder.end_document();  // a document with no sequences
  }
  builder.finalize();
}

GPTDatasetConfig config_for(const std::string& prefix, int64_t seq_length, uint32_t seed = 1234) {
  GPTDatasetConfig config;
  config.data_path = {prefix};
  config.seq_length = seq_length;
  config.seed = seed;
  return config;
}

// A fresh dataset of `sequences` sequences at `prefix`, all of it in the train split.
GPTDatasetConfig train_only_config(const std::string& prefix, int64_t sequences) {
  write_dataset(prefix, sequences);
  GPTDatasetConfig config = config_for(prefix, 8);
  config.split = "1";
  return config;
}

Ids values(const Tensor& tensor) {
  const int64_t* data = tensor.data<int64_t>();
  return Ids(data, data + tensor.numel());
}

Ids sample_text(const SampleSource& dataset, int64_t index) {
  Ids text(size_t(dataset.text_length()));
  dataset.text(index, text.data());
  return text;
}

// Every sample is the window [k * seq_length, k * seq_length + seq_length + 1) of the documents
// concatenated in document_index order, k = shuffle_index[i]; past the data only pad ids.
void expect_windows_of_stream(const GPTDataset& dataset, int64_t pad) {
  Ids stream;
  for (int32_t document : dataset.document_index()) {
    const Ids tokens = dataset.indexed_dataset().sequence(document);
    stream.insert(stream.end(), tokens.begin(), tokens.end());
  }
  const int64_t seq = dataset.seq_length();
  for (int64_t i = 0; i < dataset.size(); ++i) {
    const int64_t k = dataset.shuffle_index()[size_t(i)];
    Ids expected;
    for (int64_t t = k * seq; t < k * seq + seq + 1; ++t) {
      expected.push_back(t < int64_t(stream.size()) ? stream[size_t(t)] : pad);
    }
    ASSERT_EQ(sample_text(dataset, i), expected) << "sample " << i << " (window " << k << ")";
  }
}

TEST(Split, ParsesAndNormalizesLikeMegatron) {
  const auto split = parse_split("969, 30, 1");
  EXPECT_DOUBLE_EQ(split[0], 0.969);
  EXPECT_DOUBLE_EQ(split[1], 0.030);
  EXPECT_DOUBLE_EQ(split[2], 0.001);
  EXPECT_EQ(parse_split("99,1"), (std::array<double, 3>{0.99, 0.01, 0.0}));
  EXPECT_EQ(parse_split("1"), (std::array<double, 3>{1.0, 0.0, 0.0}));
  expect_error_containing([] { parse_split("1,2,3,4"); }, "has 4 weights; at most 3");
  expect_error_containing([] { parse_split("0,0,0"); }, "gives every split zero weight");
  expect_error_containing([] { parse_split("1.2.3,1"); },
                          "--split '1.2.3,1': field 1 ('1.2.3') is not a number");
}

TEST(Split, EveryFieldIsReadWholeAsANumber) {
  // Each field is one float, so exponents work and '/' separates as ',' does.
  const auto tiny = parse_split("1e-3,5,5");
  EXPECT_DOUBLE_EQ(tiny[0], 0.001 / 10.001);
  EXPECT_DOUBLE_EQ(tiny[1], 5 / 10.001);
  EXPECT_DOUBLE_EQ(tiny[2], 5 / 10.001);
  EXPECT_EQ(parse_split("98/2/0"), (std::array<double, 3>{0.98, 0.02, 0.0}));
  EXPECT_EQ(parse_split(" 3 , 1 "), (std::array<double, 3>{0.75, 0.25, 0.0}));
  expect_error_containing([] { parse_split("99,-1,2"); },
                          "--split '99,-1,2': field 2 (-1) must be a finite weight >= 0");
  expect_error_containing([] { parse_split("a,b,c"); },
                          "--split 'a,b,c': field 1 ('a') is not a number");
  expect_error_containing([] { parse_split("99,1x,0"); },
                          "--split '99,1x,0': field 2 ('1x') is not a number");
  expect_error_containing([] { parse_split("99,,1"); },
                          "--split '99,,1': field 2 ('') is not a number");
  expect_error_containing([] { parse_split(""); }, "--split '': field 1 ('') is not a number");
  expect_error_containing([] { parse_split("98/2,0"); },
                          "--split '98/2,0': field 1 ('98/2') is not a number");
  expect_error_containing([] { parse_split("inf,1"); },
                          "--split 'inf,1': field 1 (inf) must be a finite weight >= 0");
  expect_error_containing([] { parse_split("1,nan"); },
                          "--split '1,nan': field 2 (nan) must be a finite weight >= 0");
}

TEST(Split, SequenceRangesRoundHalfToEven) {
  const auto matrix = split_matrix(parse_split("969,30,1"));
  EXPECT_EQ(split_sequence_range(*matrix[0], 1000), std::make_pair(int64_t(0), int64_t(969)));
  EXPECT_EQ(split_sequence_range(*matrix[1], 1000), std::make_pair(int64_t(969), int64_t(999)));
  EXPECT_EQ(split_sequence_range(*matrix[2], 1000), std::make_pair(int64_t(999), int64_t(1000)));
  const auto quarters = split_matrix(parse_split("1,2,1"));  // 2.5 -> 2 and 7.5 -> 8
  EXPECT_EQ(split_sequence_range(*quarters[0], 10), std::make_pair(int64_t(0), int64_t(2)));
  EXPECT_EQ(split_sequence_range(*quarters[1], 10), std::make_pair(int64_t(2), int64_t(8)));
  const auto no_test = split_matrix(parse_split("9,1,0"));
  EXPECT_FALSE(no_test[2].has_value());
}

TEST(Blend, ParsesDataPathLikeMegatron) {
  const Blend single = parse_blend({"data/a"});
  EXPECT_EQ(single.prefixes, (std::vector<std::string>{"data/a"}));
  EXPECT_TRUE(single.weights.empty());
  const Blend weighted = parse_blend({"0.3", "data/a", "0.7", " data/b"});
  EXPECT_EQ(weighted.prefixes, (std::vector<std::string>{"data/a", "data/b"}));
  EXPECT_EQ(weighted.weights, (std::vector<double>{0.3, 0.7}));
  const Blend unweighted = parse_blend({"data/a", "data/b"});  // even count, but not weights
  EXPECT_EQ(unweighted.prefixes, (std::vector<std::string>{"data/a", "data/b"}));
  EXPECT_TRUE(unweighted.weights.empty());
  expect_error_containing([] { parse_blend({"-1", "data/a"}); }, "weight -1 must be positive");
  expect_error_containing(
      [] {
        parse_blend({"0.3", "data/a", "data/b", "data/c"});
      },
      "--data-path mixes weights and prefixes");
}

class GptIndices : public ::testing::Test {
 protected:
  void SetUp() override { write_dataset(prefix_, 200); }
  ScratchDir dir_{"data"};
  std::string prefix_ = dir_.file("corpus");
};

struct IndexCase {
  int64_t begin, end, seq_length;
  uint32_t seed;
  std::optional<int64_t> num_samples;
  Split split;
  bool drop_last_valid;
};

// Sequences [20, 180) hold 4436 tokens: with seq_length 32 an epoch is 138 samples, so 327
// samples take 3 epochs with 50 from the last (< 80% of an epoch: shuffled apart) and 400 take 3
// epochs with 123 from the last (shuffled together).
const std::vector<IndexCase> kIndexCases = {
    {0, 200, 32, 1234, std::nullopt, Split::Train, true},   // one epoch
    {20, 180, 32, 7, 327, Split::Train, true},              // 3 epochs, final one separate
    {20, 180, 32, 7, 400, Split::Train, true},              // 3 epochs, final one not separate
    {150, 200, 16, 99, std::nullopt, Split::Valid, false},  // partial last sample kept (padded)
    {0, 3, 50, 3, 7, Split::Train, true},                   // 50-token epochs: 8 of them
};

TEST_F(GptIndices, MatchMegatronAlgorithmRunWithNumpy) {
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");
  const auto indexed = std::make_shared<const IndexedDataset>(prefix_);
  for (const IndexCase& c : kIndexCases) {
    SCOPED_TRACE("case [" + std::to_string(c.begin) + ", " + std::to_string(c.end) + ") seed " +
                 std::to_string(c.seed));
    GPTDatasetConfig config = config_for(prefix_, c.seq_length, c.seed);
    config.drop_last_partial_validation_sequence = c.drop_last_valid;
    const GPTDataset dataset(indexed, c.begin, c.end, c.num_samples, c.split, config);
    const auto result = testing::run_command(
        "/usr/bin/python3 " + testing::megatron_format_script() + " gpt-indices " + prefix_ +
        ".idx " + std::to_string(c.begin) + " " + std::to_string(c.end) + " " +
        std::to_string(c.seq_length) + " " + std::to_string(c.seed) + " " +
        (c.num_samples ? std::to_string(*c.num_samples) : "none") + " " +
        (c.split != Split::Valid || c.drop_last_valid ? "1" : "0"));
    ASSERT_EQ(result.exit_code, 0) << result.output;
    const auto reference = nlohmann::json::parse(result.output);
    EXPECT_EQ(
        std::vector<int32_t>(dataset.document_index().begin(), dataset.document_index().end()),
        reference["document_index"].get<std::vector<int32_t>>());
    EXPECT_EQ(std::vector<int64_t>(dataset.sample_index().begin(), dataset.sample_index().end()),
              reference["sample_index"].get<std::vector<int64_t>>());
    EXPECT_EQ(std::vector<int64_t>(dataset.shuffle_index().begin(), dataset.shuffle_index().end()),
              reference["shuffle_index"].get<std::vector<int64_t>>());
    if (c.num_samples) {
      EXPECT_GE(dataset.size(), *c.num_samples);
    }
  }
}

TEST_F(GptIndices, SamplesAreWindowsOfTheDocumentStream) {
  const auto indexed = std::make_shared<const IndexedDataset>(prefix_);
  for (const IndexCase& c : kIndexCases) {
    GPTDatasetConfig config = config_for(prefix_, c.seq_length, c.seed);
    config.drop_last_partial_validation_sequence = c.drop_last_valid;
    config.sample.pad_token = -7;
    const GPTDataset dataset(indexed, c.begin, c.end, c.num_samples, c.split, config);
    SCOPED_TRACE("case seed " + std::to_string(c.seed) + ", " + std::to_string(dataset.size()) +
                 " samples, " + std::to_string(dataset.num_epochs()) + " epochs");
    expect_windows_of_stream(dataset, -7);
  }
}

TEST_F(GptIndices, EpochCountsAndSeparateFinalEpoch) {
  const auto indexed = std::make_shared<const IndexedDataset>(prefix_);
  const GPTDataset three_epochs(indexed, 20, 180, 327, Split::Train, config_for(prefix_, 32, 7));
  EXPECT_EQ(three_epochs.num_epochs(), 3);
  // The final, separately shuffled epoch keeps its documents after the first two epochs'.
  const int64_t documents = 160;
  std::multiset<int32_t> last_epoch(three_epochs.document_index().begin() + 2 * documents,
                                    three_epochs.document_index().end());
  for (int32_t d = 20; d < 180; ++d) EXPECT_EQ(last_epoch.count(d), 1u) << "document " << d;
}

TEST_F(GptIndices, SameSeedSameSamplesOtherSeedOtherOrder) {
  const auto indexed = std::make_shared<const IndexedDataset>(prefix_);
  const GPTDataset a(indexed, 0, 200, 300, Split::Train, config_for(prefix_, 24, 5));
  const GPTDataset b(std::make_shared<const IndexedDataset>(prefix_), 0, 200, 300, Split::Train,
                     config_for(prefix_, 24, 5));
  const GPTDataset c(indexed, 0, 200, 300, Split::Train, config_for(prefix_, 24, 6));
  ASSERT_EQ(a.size(), b.size());
  int differing = 0;
  for (int64_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(sample_text(a, i), sample_text(b, i));
    differing += sample_text(a, i) != sample_text(c, i);
  }
  EXPECT_GT(differing, a.size() / 2);
}

TEST_F(GptIndices, EmptySplitsAndBadConfigsAreClearErrors) {
  const auto indexed = std::make_shared<const IndexedDataset>(prefix_);
  expect_error_containing(
      [&] { GPTDataset(indexed, 0, 1, 10, Split::Valid, config_for(prefix_, 8)); },
      "the valid split (sequences [0, 1)) holds 0 tokens, too few to draw 10 samples");
  const GPTDataset empty(indexed, 0, 1, std::nullopt, Split::Test, config_for(prefix_, 8));
  EXPECT_EQ(empty.size(), 0);
  expect_error_containing(
      [&] { GPTDataset(indexed, 0, 300, 10, Split::Train, config_for(prefix_, 8)); },
      "sequence range [0, 300) is outside the dataset's 200 sequences");
  expect_error_containing(
      [&] { GPTDataset(indexed, 0, 10, 10, Split::Train, config_for(prefix_, 1)); },
      "--seq-length must be greater than 1");
  GPTDatasetConfig missing = config_for(dir_.file("absent"), 8);
  expect_error_containing([&] { build_gpt_datasets(missing); }, "cannot open index file");
  missing.data_path.clear();
  expect_error_containing(
      [&] { build_gpt_datasets(missing); },
      "--data-path (or --train-data-path, --valid-data-path, --test-data-path) is required");
}

// ------------------------------------------------------------------------------------------------
// Blending

TEST(Blending, ProportionsTrackWeightsAtEveryPrefix) {
  ScratchDir dir{"data"};
  write_dataset(dir.file("a"), 100, 1);
  write_dataset(dir.file("b"), 100, 1000000);
  GPTDatasetConfig config = config_for(dir.file("a"), 16);
  config.data_path = {"30", dir.file("a"), "70", dir.file("b")};
  config.split = "100,0,0";
  config.num_samples = {1000, std::nullopt, std::nullopt};
  const auto datasets = build_gpt_datasets(config);
  ASSERT_TRUE(datasets[0]);
  EXPECT_FALSE(datasets[1]);
  const auto& blend = dynamic_cast<const BlendedDataset&>(*datasets[0]);
  ASSERT_EQ(blend.size(), 1000);  // ceil(300) + ceil(700)
  // Tolerance: the greedy choice keeps every running count within one sample of its share.
  int64_t from_a = 0;
  for (int64_t i = 0; i < blend.size(); ++i) {
    from_a += blend.dataset_index()[size_t(i)] == 0;
    EXPECT_LE(std::abs(double(from_a) - 0.3 * double(i + 1)), 1.0) << "after " << i + 1;
    // Samples really come from the chosen dataset (its tokens are < 1000000).
    EXPECT_EQ(sample_text(blend, i)[0] < 1000000, blend.dataset_index()[size_t(i)] == 0);
  }
  EXPECT_EQ(from_a, 300);
}

TEST(Blending, UnweightedBlendUsesDatasetLengthsAndExhaustiveMode) {
  ScratchDir dir{"data"};
  write_dataset(dir.file("a"), 60, 1);
  write_dataset(dir.file("b"), 120, 1000000);
  GPTDatasetConfig config = config_for(dir.file("a"), 16);
  config.data_path = {dir.file("a"), dir.file("b")};
  config.split = "90,10";
  config.num_samples = {std::nullopt, 5, std::nullopt};
  const auto datasets = build_gpt_datasets(config);
  ASSERT_TRUE(datasets[0] && datasets[1]);
  const auto& train = dynamic_cast<const BlendedDataset&>(*datasets[0]);
  std::array<int64_t, 2> counts{};
  for (int16_t d : train.dataset_index()) ++counts[size_t(d)];
  // Exhaustive: every sample of both one-epoch datasets exactly once.
  std::set<std::pair<int16_t, int64_t>> seen;
  for (int64_t i = 0; i < train.size(); ++i) {
    seen.emplace(train.dataset_index()[size_t(i)], train.dataset_sample_index()[size_t(i)]);
  }
  EXPECT_EQ(int64_t(seen.size()), train.size());
  EXPECT_EQ(counts[0] + counts[1], train.size());
  EXPECT_GT(counts[1], counts[0]);
  EXPECT_EQ(datasets[1]->size(), 5);  // capped at the requested valid size
}

TEST(Blending, PerSplitDataPathsUseWholeDatasets) {
  ScratchDir dir{"data"};
  write_dataset(dir.file("a"), 100, 1);
  write_dataset(dir.file("b"), 50, 1000000);
  GPTDatasetConfig config = config_for(dir.file("a"), 16);
  config.data_path.clear();
  config.per_split_data_path = {
      std::vector<std::string>{dir.file("a")}, {"30", dir.file("a"), "70", dir.file("b")}, {}};
  config.num_samples = {std::nullopt, 40, 7};
  const auto datasets = build_gpt_datasets(config);
  const auto& train = dynamic_cast<const GPTDataset&>(*datasets[0]);
  const IndexedDataset a(dir.file("a"));
  EXPECT_EQ(train.size(), (a.total_tokens() - 1) / 16);  // one epoch of every sequence
  const auto& valid = dynamic_cast<const BlendedDataset&>(*datasets[1]);
  EXPECT_EQ(valid.size(), 12 + 28);  // ceil(40 * 0.3) + ceil(40 * 0.7)
  EXPECT_FALSE(datasets[2]);
  config.data_path = {dir.file("a")};
  expect_error_containing([&] { build_gpt_datasets(config); },
                          "--data-path cannot be combined with --train-data-path");
  config.data_path.clear();
  config.num_samples[1] = std::nullopt;
  expect_error_containing([&] { build_gpt_datasets(config); },
                          "a weighted --valid-data-path needs a sample count for the valid split");
}

TEST(Blending, OversamplingIsAClearError) {
  ScratchDir dir{"data"};
  write_dataset(dir.file("a"), 40);
  const auto indexed = std::make_shared<const IndexedDataset>(dir.file("a"));
  const auto small = std::make_shared<const GPTDataset>(indexed, 0, 40, std::nullopt, Split::Train,
                                                        config_for(dir.file("a"), 16));
  expect_error_containing(
      [&] {
        BlendedDataset({small, small}, {0.5, 0.5}, 4 * small->size());
      },
      "the train blend oversamples its datasets: it requests " + std::to_string(2 * small->size()));
  expect_error_containing([&] { BlendedDataset({small}, {0.0}, 4); }, "weights must be positive");
  GPTDatasetConfig config = config_for(dir.file("a"), 16);
  config.data_path = {"1", dir.file("a"), "1", dir.file("a")};
  expect_error_containing([&] { build_gpt_datasets(config); },
                          "a weighted --data-path needs a sample count for the train split");
}

// ------------------------------------------------------------------------------------------------
// Sampler and micro-batches

TEST(PretrainingDataIterator, EveryLayoutSeesTheSameGlobalBatches) {
  ScratchDir dir{"data"};
  GPTDatasetConfig config = train_only_config(dir.file("a"), 100);
  config.num_samples = {64, std::nullopt, std::nullopt};
  const auto train = build_gpt_datasets(config)[0];
  const int64_t global_batch = 8;
  std::vector<Ids> reference;  // per step: the sample indices of the whole global batch
  for (int64_t dp : {1, 2, 4, 8}) {
    std::vector<PretrainingDataIterator> ranks;
    for (int64_t r = 0; r < dp; ++r)
      ranks.emplace_back(train, 0, global_batch / dp, r, dp, config.sample);
    for (int64_t step = 0; step < 4; ++step) {
      Ids global;
      for (auto& rank : ranks) {
        const MicroBatch batch = rank.next();
        EXPECT_EQ(batch.tokens.shape(), (Shape{global_batch / dp, 8}));
        global.insert(global.end(), batch.sample_indices.begin(), batch.sample_indices.end());
      }
      if (dp == 1) {
        reference.push_back(global);
      } else {
        EXPECT_EQ(global, reference[size_t(step)]) << "dp " << dp << " step " << step;
      }
      EXPECT_EQ(ranks[0].consumed_samples(), (step + 1) * global_batch);
    }
  }
}

TEST(PretrainingDataIterator, ResumesWithTheNextSample) {
  ScratchDir dir{"data"};
  const GPTDatasetConfig config = train_only_config(dir.file("a"), 100);
  const auto train = build_gpt_datasets(config)[0];
  PretrainingDataIterator uninterrupted(train, 0, 2, 1, 3, config.sample);
  for (int step = 0; step < 3; ++step) uninterrupted.next();
  const int64_t checkpoint = uninterrupted.consumed_samples();
  EXPECT_EQ(checkpoint, 18);
  PretrainingDataIterator resumed(train, checkpoint, 2, 1, 3, config.sample);
  for (int step = 0; step < 3; ++step) {
    const MicroBatch expected = uninterrupted.next();
    const MicroBatch actual = resumed.next();
    EXPECT_EQ(actual.sample_indices, expected.sample_indices);
    EXPECT_EQ(values(actual.tokens), values(expected.tokens));
    EXPECT_EQ(values(actual.labels), values(expected.labels));
  }
}

TEST(PretrainingDataIterator, RejectsBadPositionsAndStopsAtTheEnd) {
  ScratchDir dir{"data"};
  const GPTDatasetConfig config = train_only_config(dir.file("a"), 30);
  const auto train = build_gpt_datasets(config)[0];
  const int64_t total = train->size();
  expect_error_containing(
      [&] { PretrainingDataIterator(train, total + 1, 1, 0, 1, config.sample); },
      "consumed_samples " + std::to_string(total + 1) + " is outside [0, " + std::to_string(total) +
          "]");
  expect_error_containing([&] { PretrainingDataIterator(train, 0, 1, 2, 2, config.sample); },
                          "data-parallel rank 2 is outside [0, 2)");
  expect_error_containing([&] { PretrainingDataIterator(train, 0, 0, 0, 1, config.sample); },
                          "micro batch size must be positive");
  PretrainingDataIterator tail(train, total - 3, 2, 0, 2, config.sample);
  EXPECT_FALSE(tail.has_next());  // 3 samples left, a group needs 4: dropped as Megatron does
  expect_error_containing([&] { tail.next(); }, "dataset is exhausted");
}

// A two-document stream [10 11 12 EOD 20 21 EOD 30 ...] read back through make_micro_batch.
TEST(MicroBatch, ShiftsLabelsAndAppliesMegatronMasks) {
  ScratchDir dir{"data"};
  {
    IndexedDatasetBuilder builder(dir.file("eod"), TokenDType::I32);
    builder.add_document(Ids{10, 11, 12, 2}, std::vector<int32_t>{4});
    builder.add_document(Ids{20, 21, 2}, std::vector<int32_t>{3});
    builder.add_document(Ids{30, 31, 32, 33, 34, 35, 36, 2}, std::vector<int32_t>{8});
    builder.finalize();
  }
  const auto indexed = std::make_shared<const IndexedDataset>(dir.file("eod"));
  GPTDatasetConfig config = config_for(dir.file("eod"), 6);
  config.drop_last_partial_validation_sequence = false;
  config.sample.pad_token = -1;
  const GPTDataset dataset(indexed, 0, 3, std::nullopt, Split::Valid, config);
  // 15 tokens: windows [0, 7) and [6, 13) are full, [12, 19) is padded.
  ASSERT_EQ(dataset.size(), 3);
  const auto shuffle = dataset.shuffle_index();
  const int64_t first = std::find(shuffle.begin(), shuffle.end(), 0) - shuffle.begin();
  const int64_t last = std::find(shuffle.begin(), shuffle.end(), 2) - shuffle.begin();
  const Ids text = sample_text(dataset, first);

  SampleOptions options{
      .eod_token = 2, .pad_token = -1, .reset_position_ids = true, .eod_mask_loss = true};
  const MicroBatch batch = make_micro_batch(dataset, Ids{first, last}, options);
  const Ids tokens = values(batch.tokens), labels = values(batch.labels);
  const Ids positions = values(batch.position_ids);
  const std::vector<float> mask = batch.loss_mask.to_floats();
  int64_t position = 0;
  for (int64_t t = 0; t < 6; ++t) {
    EXPECT_EQ(tokens[size_t(t)], text[size_t(t)]);
    EXPECT_EQ(labels[size_t(t)], text[size_t(t + 1)]);
    EXPECT_EQ(mask[size_t(t)], text[size_t(t)] == 2 ? 0.0f : 1.0f) << t;  // eod inputs masked
    EXPECT_EQ(positions[size_t(t)], position) << t;
    position = text[size_t(t)] == 2 ? 0 : position + 1;  // positions restart after eod
  }
  // The second window runs out of data: its padding has id 0 and no loss.
  const Ids padded = sample_text(dataset, last);
  EXPECT_EQ(std::count(padded.begin(), padded.end(), -1), 4);
  for (int64_t t = 0; t < 6; ++t) {
    const bool pad_label = padded[size_t(t + 1)] == -1;
    EXPECT_EQ(mask[size_t(6 + t)] == 0.0f, pad_label || padded[size_t(t)] == 2) << t;
    if (pad_label) {
      EXPECT_EQ(labels[size_t(6 + t)], 0) << t;
    }
    if (padded[size_t(t)] == -1) {
      EXPECT_EQ(tokens[size_t(6 + t)], 0) << t;
    }
  }
}

// Data made with a larger vocabulary than the model's: the id is refused naming the file.
TEST(GPTDataset, RefusesTokenIdsOutsideTheVocabularyNamingTheFile) {
  ScratchDir dir{"data"};
  {
    IndexedDatasetBuilder builder(dir.file("big_vocab"), TokenDType::I32);
    builder.add_document(Ids{10, 11, 12, 2, 20, 21, 152, 2}, std::vector<int32_t>{8});
    builder.finalize();
  }
  const auto indexed = std::make_shared<const IndexedDataset>(dir.file("big_vocab"));
  GPTDatasetConfig config = config_for(dir.file("big_vocab"), 6);
  const GPTDataset unchecked(indexed, 0, 1, std::nullopt, Split::Train, config);
  ASSERT_EQ(unchecked.size(), 1);
  EXPECT_EQ(sample_text(unchecked, 0), (Ids{10, 11, 12, 2, 20, 21, 152}));
  config.sample.vocab_size = 153;
  const GPTDataset fits(indexed, 0, 1, std::nullopt, Split::Train, config);
  EXPECT_EQ(sample_text(fits, 0), (Ids{10, 11, 12, 2, 20, 21, 152}));
  config.sample.vocab_size = 128;
  const GPTDataset too_small(indexed, 0, 1, std::nullopt, Split::Train, config);
  expect_error_containing(
      [&] { sample_text(too_small, 0); },
      dir.file("big_vocab") +
          ": token id 152 (sequence 0, token 6) is outside the model's vocabulary [0, "
          "128); was the data made with another tokenizer or --vocab-size?");
}

TEST(NumSamples, MatchesMegatronTrainValidTest) {
  const auto samples = train_valid_test_num_samples(1000, 32, 100, 10);
  EXPECT_EQ(samples[0], 32000);
  EXPECT_EQ(samples[1], (1000 / 100 + 1) * 10 * 32);
  EXPECT_EQ(samples[2], 320);
}

}  // namespace
}  // namespace moe::data

// Indexed dataset: write -> read round trips for every Megatron dtype and several document
// layouts, byte-identical output to an independent Python writer of Megatron's format, reading
// Megatron-format fixtures, and clear errors for missing, truncated and corrupt files.
#include "moe/data/indexed_dataset.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <source_location>
#include <string_view>

#include "moe/tensor/error.h"
#include "support/testing.h"
#include "test_files.h"

namespace moe::data {
namespace {

using moe::testing::read_bytes;
using moe::testing::ScratchDir;
using moe::testing::write_bytes;

// documents -> sequences -> token ids
using Layout = std::vector<std::vector<std::vector<int64_t>>>;

void write_dataset(const std::string& prefix, TokenDType dtype, const Layout& layout) {
  IndexedDatasetBuilder builder(prefix, dtype);
  for (const auto& document : layout) {
    for (const auto& sequence : document) builder.add_item(sequence);
    builder.end_document();
  }
  builder.finalize();
}

void expect_layout(const IndexedDataset& dataset, const Layout& layout) {
  std::vector<int64_t> expected_documents{0};
  std::vector<std::vector<int64_t>> sequences;
  for (const auto& document : layout) {
    for (const auto& sequence : document) sequences.push_back(sequence);
    expected_documents.push_back(int64_t(sequences.size()));
  }
  ASSERT_EQ(dataset.sequence_count(), int64_t(sequences.size()));
  ASSERT_EQ(dataset.document_count(), int64_t(layout.size()));
  EXPECT_EQ(
      std::vector<int64_t>(dataset.document_indices().begin(), dataset.document_indices().end()),
      expected_documents);
  int64_t pointer = 0, tokens = 0;
  for (size_t s = 0; s < sequences.size(); ++s) {
    EXPECT_EQ(dataset.sequence_lengths()[s], int32_t(sequences[s].size())) << "sequence " << s;
    EXPECT_EQ(dataset.sequence_pointers()[s], pointer) << "sequence " << s;
    EXPECT_EQ(dataset.sequence(int64_t(s)), sequences[s]) << "sequence " << s;
    pointer += int64_t(sequences[s].size() * token_dtype_size(dataset.dtype()));
    tokens += int64_t(sequences[s].size());
  }
  EXPECT_EQ(dataset.total_tokens(), tokens);
}

const std::vector<TokenDType> kAllDTypes = {TokenDType::U8,  TokenDType::I8,  TokenDType::I16,
                                            TokenDType::I32, TokenDType::I64, TokenDType::F64,
                                            TokenDType::F32, TokenDType::U16};

// Values every dtype holds exactly (int8's range is the limit).
const std::vector<Layout> kLayouts = {
    {{{1, 2, 3}}, {{4}}, {{5, 6, 7, 8, 9}}},            // one sequence per document
    {{{1, 2}, {3, 4, 5}}, {{6}, {7}, {8, 9, 10}}},      // sentence-split documents
    {{}, {{1, 2}}, {}, {{}, {3}}, {{}}},                // empty documents and sequences
    {},                                                 // no documents at all
    {{{0, 127, 100, 5}, {126}}, {{}}, {{1, 1, 1, 1}}},  // edge values, trailing empty document
};

TEST(IndexedDataset, RoundTripsEveryDTypeAndLayout) {
  ScratchDir dir{"data"};
  for (TokenDType dtype : kAllDTypes) {
    for (size_t l = 0; l < kLayouts.size(); ++l) {
      SCOPED_TRACE(std::string(token_dtype_name(dtype)) + " layout " + std::to_string(l));
      const std::string prefix = dir.file("roundtrip");
      write_dataset(prefix, dtype, kLayouts[l]);
      const IndexedDataset dataset(prefix);
      EXPECT_EQ(dataset.dtype(), dtype);
      expect_layout(dataset, kLayouts[l]);
      int64_t tokens = 0;
      for (const auto& document : kLayouts[l]) {
        for (const auto& sequence : document) tokens += int64_t(sequence.size());
      }
      EXPECT_EQ(std::filesystem::file_size(prefix + ".bin"),
                uint64_t(tokens) * token_dtype_size(dtype));
      EXPECT_FALSE(std::filesystem::exists(prefix + ".bin.tmp"));
    }
  }
}

TEST(IndexedDataset, PartialReadsAndFullRangeValues) {
  ScratchDir dir{"data"};
  const std::string prefix = dir.file("values");
  const Layout layout = {{{65535, 0, 1, 2, 65534}}, {{7, 8}}};
  write_dataset(prefix, TokenDType::U16, layout);
  const IndexedDataset dataset(prefix);
  std::vector<int64_t> out(3);
  dataset.read(0, 1, 3, out.data());
  EXPECT_EQ(out, (std::vector<int64_t>{0, 1, 2}));
  dataset.read(0, 4, 1, out.data());
  EXPECT_EQ(out[0], 65534);
  expect_layout(dataset, layout);
  EXPECT_CONTAINS(moe::testing::error_text([&] { dataset.read(1, 1, 2, out.data()); }),
                  "outside sequence 1 of length 2");
  EXPECT_THROW(dataset.read(2, 0, 0, out.data()), Error);
}

TEST(IndexedDataset, BuilderRejectsIdsOutsideTheDTypeAndLeavesNoFiles) {
  ScratchDir dir{"data"};
  const std::string prefix = dir.file("overflow");
  {
    IndexedDatasetBuilder builder(prefix, TokenDType::U16);
    builder.add_item(std::vector<int64_t>{1, 2});
    EXPECT_CONTAINS(
        moe::testing::error_text([&] { builder.add_item(std::vector<int64_t>{70000}); }),
        "token id 70000 does not fit the dataset dtype uint16");
    EXPECT_THROW(builder.add_item(std::vector<int64_t>{-1}), Error);
  }  // destroyed without finalize
  EXPECT_FALSE(std::filesystem::exists(prefix + ".bin"));
  EXPECT_FALSE(std::filesystem::exists(prefix + ".idx"));
  EXPECT_FALSE(std::filesystem::exists(prefix + ".bin.tmp"));
}

TEST(IndexedDataset, AddDocumentAndAddIndexConcatenate) {
  ScratchDir dir{"data"};
  const Layout first = {{{1, 2}, {3}}, {}, {{4, 5, 6}}};
  const Layout second = {{{7}}, {{8, 9}, {}}};
  write_dataset(dir.file("first"), TokenDType::I32, first);
  write_dataset(dir.file("second"), TokenDType::I32, second);
  IndexedDatasetBuilder merged(dir.file("merged"), TokenDType::I32);
  merged.add_index(dir.file("first"));
  merged.add_index(dir.file("second"));
  merged.add_document(std::vector<int64_t>{10, 11, 12}, std::vector<int32_t>{1, 2});
  merged.finalize();
  Layout expected = first;
  expected.insert(expected.end(), second.begin(), second.end());
  expected.push_back({{10}, {11, 12}});
  expect_layout(IndexedDataset(dir.file("merged")), expected);

  IndexedDatasetBuilder wrong(dir.file("wrong"), TokenDType::U16);
  EXPECT_CONTAINS(moe::testing::error_text([&] { wrong.add_index(dir.file("first")); }),
                  "(dtype int32)");
  EXPECT_THROW(wrong.add_document(std::vector<int64_t>{1, 2}, std::vector<int32_t>{3}), Error);
}

// The same documents written here and by the independent Python writer give identical bytes.
TEST(IndexedDataset, MatchesPythonMegatronWriterByteForByte) {
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");
  ScratchDir dir{"data"};
  const Layout layout = {{{1, 2, 3}, {4, 5}}, {}, {{120, 0, 7}}, {{9}}};
  for (TokenDType dtype : {TokenDType::U16, TokenDType::I32, TokenDType::I64, TokenDType::U8}) {
    SCOPED_TRACE(std::string(token_dtype_name(dtype)));
    write_dataset(dir.file("cpp"), dtype, layout);
    const auto result = testing::run_command(
        "/usr/bin/python3 " + testing::megatron_format_script() + " write-index " + dir.file("py") +
        " " + std::to_string(int(dtype)) + " '[[[1,2,3],[4,5]],[],[[120,0,7]],[[9]]]'");
    ASSERT_EQ(result.exit_code, 0) << result.output;
    EXPECT_EQ(read_bytes(dir.file("cpp.idx")), read_bytes(dir.file("py.idx")));
    EXPECT_EQ(read_bytes(dir.file("cpp.bin")), read_bytes(dir.file("py.bin")));
  }
}

// Fixtures written by tests/data/megatron_format.py (Megatron's layout) and committed.
TEST(IndexedDataset, ReadsMegatronWrittenFixtures) {
  const std::string fixtures = std::string(MOE_DATA_TEST_DIR) + "/fixtures/";
  const IndexedDataset small(fixtures + "megatron_uint16");
  EXPECT_EQ(small.dtype(), TokenDType::U16);
  expect_layout(small, {{{1, 2, 3}, {4, 5}}, {}, {{65535, 0, 7}}, {{9}}});
  EXPECT_TRUE(small.sequence_modes().empty());

  const IndexedDataset multimodal(fixtures + "megatron_int32_multimodal");
  EXPECT_EQ(multimodal.dtype(), TokenDType::I32);
  expect_layout(multimodal, {{{100000, -5}}, {{1, 2, 3, 4}}});
  EXPECT_EQ(
      std::vector<int8_t>(multimodal.sequence_modes().begin(), multimodal.sequence_modes().end()),
      (std::vector<int8_t>{1, 2}));
}

// ------------------------------------------------------------------------------------------------
// Damaged files: every case must throw moe::Error naming the file and the problem.

class DamagedIndex : public ::testing::Test {
 protected:
  void SetUp() override {
    prefix_ = dir_.file("damaged");
    write_dataset(prefix_, TokenDType::U16, {{{1, 2, 3}, {4}}, {{5, 6}}});
    index_ = read_bytes(prefix_ + ".idx");
    data_ = read_bytes(prefix_ + ".bin");
  }
  void expect_error(const std::string& idx, const std::string& bin,
                    std::initializer_list<std::string_view> fragments,
                    std::source_location caller = std::source_location::current()) {
    write_bytes(prefix_ + ".idx", idx);
    write_bytes(prefix_ + ".bin", bin);
    moe::testing::expect_error_containing([&] { IndexedDataset dataset(prefix_); }, fragments,
                                          caller);
  }
  template <class T>
  std::string patched(size_t offset, T value) const {
    std::string bytes = index_;
    std::memcpy(bytes.data() + offset, &value, sizeof(T));
    return bytes;
  }

  ScratchDir dir_{"data"};
  std::string prefix_, index_, data_;
};

TEST_F(DamagedIndex, IntactFileOpens) {
  EXPECT_NO_THROW(IndexedDataset dataset(prefix_));
}

TEST_F(DamagedIndex, MissingFiles) {
  EXPECT_CONTAINS(moe::testing::error_text([&] { IndexedDataset dataset(dir_.file("absent")); }),
                  "cannot open index file " + dir_.file("absent.idx"));
  std::filesystem::remove(prefix_ + ".bin");
  EXPECT_CONTAINS(moe::testing::error_text([&] { IndexedDataset dataset(prefix_); }),
                  "cannot open data file " + prefix_ + ".bin");
}

TEST_F(DamagedIndex, TruncatedHeader) {
  expect_error(index_.substr(0, 20), data_, {prefix_ + ".idx", "is truncated: 20 bytes"});
  expect_error("", data_, {prefix_ + ".idx", "is truncated: 0 bytes"});
}

TEST_F(DamagedIndex, TruncatedArrays) {
  expect_error(index_.substr(0, index_.size() - 5), data_,
               {prefix_ + ".idx", "is truncated", "3 sequences and 3 document indices"});
}

TEST_F(DamagedIndex, TrailingGarbage) {
  expect_error(index_ + "xyzw", data_, {prefix_ + ".idx", "4 unexpected trailing bytes"});
}

TEST_F(DamagedIndex, WrongMagic) {
  std::string bytes = index_;
  bytes[0] = 'X';
  expect_error(bytes, data_, {prefix_ + ".idx", "bad magic header"});
}

TEST_F(DamagedIndex, WrongVersion) {
  expect_error(patched<uint64_t>(9, 2), data_,
               {prefix_ + ".idx", "has version 2", "only version 1"});
}

TEST_F(DamagedIndex, UnknownDTypeCode) {
  expect_error(patched<uint8_t>(17, 9), data_, {prefix_ + ".idx", "unknown dtype code 9"});
}

TEST_F(DamagedIndex, HugeCounts) {
  expect_error(patched<uint64_t>(18, ~uint64_t(0)), data_, {prefix_ + ".idx", "implausible"});
  expect_error(patched<uint64_t>(18, 1000), data_, {prefix_ + ".idx", "is truncated"});
}

TEST_F(DamagedIndex, CorruptDocumentIndices) {
  const size_t documents_at = 34 + 3 * 4 + 3 * 8;
  expect_error(patched<int64_t>(documents_at, 1), data_, {"first document index is 1"});
  expect_error(patched<int64_t>(documents_at + 8, 4), data_,
               {"document index 2 (3) is smaller than the one before it (4)"});
  expect_error(patched<int64_t>(documents_at + 16, 2), data_,
               {"last document index is 2 but there are 3 sequences"});
}

TEST_F(DamagedIndex, NegativeLengthAndBadPointer) {
  expect_error(patched<int32_t>(34, -4), data_, {"sequence 0 has negative length -4"});
  expect_error(patched<int64_t>(34 + 12 + 16, 1000), data_,
               {prefix_ + ".bin", "sequence 2 spans bytes [1000, 1004)"});
}

TEST_F(DamagedIndex, TruncatedData) {
  expect_error(index_, data_.substr(0, data_.size() - 1),
               {"data file " + prefix_ + ".bin is truncated", "the file has 11 bytes"});
}

// Any single corrupted byte of the index either still describes a readable dataset or is
// rejected with moe::Error when opening; it never crashes (the sanitizer builds check this).
TEST_F(DamagedIndex, EveryCorruptedByteIsRejectedOrReadable) {
  int rejected = 0;
  for (size_t at = 0; at < index_.size(); ++at) {
    for (unsigned char value : {0x00, 0x01, 0x7F, 0x80, 0xFF}) {
      std::string bytes = index_;
      if (uint8_t(bytes[at]) == value) continue;
      bytes[at] = char(value);
      write_bytes(prefix_ + ".idx", bytes);
      try {
        const IndexedDataset dataset(prefix_);
        for (int64_t s = 0; s < dataset.sequence_count(); ++s) dataset.sequence(s);
      } catch (const Error&) {
        ++rejected;
      }
    }
  }
  EXPECT_GT(rejected, int(index_.size()));  // most corruptions are caught at open
}

TEST(TokenDTypes, NamesCodesAndOptimalChoice) {
  EXPECT_EQ(parse_token_dtype("uint16"), TokenDType::U16);
  EXPECT_EQ(parse_token_dtype("4"), TokenDType::I32);
  EXPECT_EQ(token_dtype_size(TokenDType::F64), 8u);
  EXPECT_EQ(optimal_token_dtype(65499), TokenDType::U16);
  EXPECT_EQ(optimal_token_dtype(65500), TokenDType::I32);
  EXPECT_THROW(parse_token_dtype("uint32"), Error);
}

}  // namespace
}  // namespace moe::data

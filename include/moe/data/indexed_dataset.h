// Megatron's indexed dataset: a `.bin` file of raw token ids and an `.idx` file that describes it,
// byte-compatible with megatron/core/datasets/indexed_dataset.py in both directions.
//
// .idx layout (little-endian):
//   9 bytes   magic "MMIDIDX\0\0"
//   u64       version (always 1)
//   u8        dtype code of the tokens in .bin (TokenDType)
//   u64       S, the number of sequences
//   u64       D, the number of document indices (documents + 1)
//   i32[S]    sequence lengths, in tokens
//   i64[S]    sequence pointers, byte offsets into .bin
//   i64[D]    document indices: document d is sequences [doc[d], doc[d+1]); doc[0] = 0
//   i8[S]     sequence modes (multimodal datasets only; optional)
// Without sentence splitting every document is one sequence.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moe::data {

// Megatron's numeric dtype codes (indexed_dataset.DType).
enum class TokenDType : uint8_t {
  U8 = 1,
  I8 = 2,
  I16 = 3,
  I32 = 4,
  I64 = 5,
  F64 = 6,
  F32 = 7,
  U16 = 8,
};

size_t token_dtype_size(TokenDType dtype);
std::string_view token_dtype_name(TokenDType dtype);  // numpy's name: "uint16", "int32", ...
bool is_valid_token_dtype_code(uint8_t code);
// Parses numpy names ("uint16") or codes ("8").
TokenDType parse_token_dtype(std::string_view name);
// Megatron's DType.optimal_dtype: uint16 when the vocabulary has fewer than 65500 entries.
TokenDType optimal_token_dtype(int64_t vocab_size);

std::string index_file_path(const std::string& path_prefix);  // prefix + ".idx"
std::string data_file_path(const std::string& path_prefix);   // prefix + ".bin"
bool indexed_dataset_exists(const std::string& path_prefix);

// A read-only dataset whose .bin is memory-mapped. Opening validates the whole index (magic,
// version, dtype, sizes, document indices, every sequence inside .bin), so reads afterwards cannot
// fault; any problem throws moe::Error naming the file and what is wrong.
class IndexedDataset {
 public:
  explicit IndexedDataset(std::string path_prefix);
  ~IndexedDataset();
  IndexedDataset(IndexedDataset&&) noexcept;
  IndexedDataset& operator=(IndexedDataset&&) noexcept;
  IndexedDataset(const IndexedDataset&) = delete;
  IndexedDataset& operator=(const IndexedDataset&) = delete;

  const std::string& path_prefix() const { return path_prefix_; }
  TokenDType dtype() const { return dtype_; }
  int64_t sequence_count() const { return int64_t(sequence_lengths_.size()); }
  int64_t document_count() const { return int64_t(document_indices_.size()) - 1; }
  int64_t total_tokens() const { return total_tokens_; }

  std::span<const int32_t> sequence_lengths() const { return sequence_lengths_; }    // [S]
  std::span<const int64_t> sequence_pointers() const { return sequence_pointers_; }  // [S]
  std::span<const int64_t> document_indices() const { return document_indices_; }    // [D]
  std::span<const int8_t> sequence_modes() const { return sequence_modes_; }         // [S] or empty

  // Tokens [offset, offset + length) of sequence `index`, widened to int64 into out[length].
  // Floating dtypes are converted by value.
  void read(int64_t index, int64_t offset, int64_t length, int64_t* out) const;
  std::vector<int64_t> sequence(int64_t index) const;  // the whole sequence

 private:
  struct Mapping;
  std::string path_prefix_;
  std::unique_ptr<Mapping> data_map_;  // the .bin file, mapped for the dataset's lifetime
  TokenDType dtype_ = TokenDType::I32;
  int64_t total_tokens_ = 0;
  // Copied out of the mapped .idx: its arrays start at byte 34, unaligned for direct use.
  std::vector<int32_t> sequence_lengths_;
  std::vector<int64_t> sequence_pointers_;
  std::vector<int64_t> document_indices_;
  std::vector<int8_t> sequence_modes_;
};

// Writes a dataset the way Megatron's IndexedDatasetBuilder does. Tokens go to `prefix.bin.tmp`
// while building; finalize() writes the index and renames both into place, so a failure part way
// never leaves a half-written dataset under the final names (the destructor removes the temps).
class IndexedDatasetBuilder {
 public:
  IndexedDatasetBuilder(std::string path_prefix, TokenDType dtype, bool multimodal = false);
  ~IndexedDatasetBuilder();
  IndexedDatasetBuilder(const IndexedDatasetBuilder&) = delete;
  IndexedDatasetBuilder& operator=(const IndexedDatasetBuilder&) = delete;

  // One sequence; ids must fit the dtype (checked). Megatron's add_item.
  void add_item(std::span<const int64_t> tokens, int8_t mode = 0);
  // Closes the current document (it may hold zero sequences). Megatron's end_document.
  void end_document();
  // A document of several sequences whose lengths sum to tokens.size(), then end_document().
  // An empty `lengths` writes an empty document, as preprocess_data.py does for empty text.
  void add_document(std::span<const int64_t> tokens, std::span<const int32_t> lengths);
  // Appends every sequence and document of an existing dataset of the same dtype.
  void add_index(const std::string& other_prefix);
  void finalize();

  TokenDType dtype() const { return dtype_; }
  int64_t sequence_count() const { return int64_t(sequence_lengths_.size()); }
  int64_t document_count() const { return int64_t(document_indices_.size()) - 1; }
  int64_t token_count() const { return token_count_; }

 private:
  void write_tokens(std::span<const int64_t> tokens);

  std::string path_prefix_;
  std::string data_temp_path_;  // prefix.bin.tmp, renamed to prefix.bin by finalize()
  TokenDType dtype_;
  bool multimodal_;
  std::FILE* data_file_ = nullptr;
  bool finalized_ = false;
  int64_t token_count_ = 0;
  std::vector<int32_t> sequence_lengths_;
  std::vector<int64_t> document_indices_{0};
  std::vector<int8_t> sequence_modes_;
  std::vector<unsigned char> staging_;  // reused conversion buffer
};

}  // namespace moe::data

#include "moe/data/indexed_dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>

#include "moe/tensor/error.h"

namespace moe::data {
namespace {

constexpr std::array<char, 9> kIndexMagic = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kIndexVersion = 1;
// magic + version + dtype code + sequence count + document count
constexpr size_t kIndexHeaderBytes = 9 + 8 + 1 + 8 + 8;

template <class T>
T load_le(const unsigned char* bytes) {
  T value;
  std::memcpy(&value, bytes, sizeof(T));  // the host is little-endian, as Megatron's format
  return value;
}

template <class T>
void copy_array(const unsigned char* bytes, uint64_t count, std::vector<T>& out) {
  out.resize(size_t(count));
  if (count > 0) std::memcpy(out.data(), bytes, size_t(count) * sizeof(T));
}

std::string errno_text() {
  return std::strerror(errno);
}

// Converts int64 ids to the dtype's bytes, checking each fits exactly.
template <class T>
void encode_tokens(std::span<const int64_t> tokens, unsigned char* out,
                   const std::string& path_prefix, TokenDType dtype) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int64_t id = tokens[i];
    const T value = static_cast<T>(id);
    MOE_CHECK(static_cast<int64_t>(value) == id, data_file_path(path_prefix), ": token id ", id,
              " does not fit the dataset dtype ", token_dtype_name(dtype));
    std::memcpy(out + i * sizeof(T), &value, sizeof(T));
  }
}

template <class T>
void decode_tokens(const unsigned char* bytes, int64_t count, int64_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = static_cast<int64_t>(load_le<T>(bytes + i * sizeof(T)));
  }
}

// Calls visit(T{}) with the C++ type that stores tokens of `dtype`.
template <class Visitor>
void visit_token_type(TokenDType dtype, Visitor&& visit) {
  switch (dtype) {
    case TokenDType::U8:
      return visit(uint8_t{});
    case TokenDType::I8:
      return visit(int8_t{});
    case TokenDType::I16:
      return visit(int16_t{});
    case TokenDType::I32:
      return visit(int32_t{});
    case TokenDType::I64:
      return visit(int64_t{});
    case TokenDType::F64:
      return visit(double{});
    case TokenDType::F32:
      return visit(float{});
    case TokenDType::U16:
      return visit(uint16_t{});
  }
  throw Error(detail::concat("unknown token dtype code ", int(dtype)));
}

}  // namespace

size_t token_dtype_size(TokenDType dtype) {
  size_t size = 0;
  visit_token_type(dtype, [&](auto tag) { size = sizeof(tag); });
  return size;
}

std::string_view token_dtype_name(TokenDType dtype) {
  switch (dtype) {
    case TokenDType::U8:
      return "uint8";
    case TokenDType::I8:
      return "int8";
    case TokenDType::I16:
      return "int16";
    case TokenDType::I32:
      return "int32";
    case TokenDType::I64:
      return "int64";
    case TokenDType::F64:
      return "float64";
    case TokenDType::F32:
      return "float32";
    case TokenDType::U16:
      return "uint16";
  }
  return "unknown";
}

bool is_valid_token_dtype_code(uint8_t code) {
  return code >= 1 && code <= 8;
}

TokenDType parse_token_dtype(std::string_view name) {
  for (uint8_t code = 1; code <= 8; ++code) {
    const auto dtype = static_cast<TokenDType>(code);
    if (name == token_dtype_name(dtype) || name == std::to_string(code)) return dtype;
  }
  throw Error(detail::concat("unknown token dtype '", name,
                             "' (expected uint8, int8, int16, int32, int64, float64, float32, "
                             "uint16 or Megatron's codes 1-8)"));
}

TokenDType optimal_token_dtype(int64_t vocab_size) {
  return vocab_size < 65500 ? TokenDType::U16 : TokenDType::I32;
}

std::string index_file_path(const std::string& path_prefix) {
  return path_prefix + ".idx";
}
std::string data_file_path(const std::string& path_prefix) {
  return path_prefix + ".bin";
}

bool indexed_dataset_exists(const std::string& path_prefix) {
  return std::filesystem::exists(index_file_path(path_prefix)) &&
         std::filesystem::exists(data_file_path(path_prefix));
}

// ------------------------------------------------------------------------------------------------
// Reader

// A read-only memory map of a whole file (an empty file maps nothing).
struct IndexedDataset::Mapping {
  const unsigned char* bytes = nullptr;
  size_t size = 0;

  explicit Mapping(const std::string& path, std::string_view role) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    MOE_CHECK(fd >= 0, "cannot open ", role, " file ", path, ": ", errno_text());
    struct stat info {};
    if (::fstat(fd, &info) != 0) {
      const std::string reason = errno_text();
      ::close(fd);
      throw Error(detail::concat("cannot stat ", role, " file ", path, ": ", reason));
    }
    if (!S_ISREG(info.st_mode)) {
      ::close(fd);
      throw Error(detail::concat(role, " file ", path, " is not a regular file"));
    }
    size = size_t(info.st_size);
    if (size > 0) {
      void* address = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
      if (address == MAP_FAILED) {
        const std::string reason = errno_text();
        ::close(fd);
        throw Error(detail::concat("cannot memory-map ", role, " file ", path, ": ", reason));
      }
      bytes = static_cast<const unsigned char*>(address);
    }
    ::close(fd);  // the mapping stays valid without the descriptor
  }
  ~Mapping() {
    if (bytes != nullptr) ::munmap(const_cast<unsigned char*>(bytes), size);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
};

IndexedDataset::IndexedDataset(std::string path_prefix) : path_prefix_(std::move(path_prefix)) {
  const std::string idx_path = index_file_path(path_prefix_);
  const std::string bin_path = data_file_path(path_prefix_);
  const Mapping index_map(idx_path, "index");
  data_map_ = std::make_unique<Mapping>(bin_path, "data");

  const unsigned char* idx = index_map.bytes;
  const size_t idx_size = index_map.size;
  MOE_CHECK(idx_size >= kIndexHeaderBytes, "index file ", idx_path, " is truncated: ", idx_size,
            " bytes, but the header alone needs ", kIndexHeaderBytes);
  MOE_CHECK(std::memcmp(idx, kIndexMagic.data(), kIndexMagic.size()) == 0, "index file ", idx_path,
            " is not a Megatron indexed dataset: bad magic header (expected MMIDIDX)");
  const auto version = load_le<uint64_t>(idx + 9);
  MOE_CHECK(version == kIndexVersion, "index file ", idx_path, " has version ", version,
            "; only version ", kIndexVersion, " is supported");
  const uint8_t code = idx[17];
  MOE_CHECK(is_valid_token_dtype_code(code), "index file ", idx_path, " has unknown dtype code ",
            int(code), " (Megatron's codes are 1-8)");
  dtype_ = static_cast<TokenDType>(code);
  const auto sequences = load_le<uint64_t>(idx + 18);
  const auto documents = load_le<uint64_t>(idx + 26);

  // Sizes in 128-bit-safe steps: counts from a corrupt header may be huge.
  constexpr uint64_t kMaxCount = uint64_t(1) << 56;
  MOE_CHECK(sequences < kMaxCount && documents < kMaxCount, "index file ", idx_path,
            " is corrupt: implausible sequence count ", sequences, " or document count ",
            documents);
  const uint64_t body = sequences * (4 + 8) + documents * 8;
  const uint64_t expected = kIndexHeaderBytes + body;
  const bool has_modes = idx_size == expected + sequences && sequences > 0;
  MOE_CHECK(idx_size >= expected, "index file ", idx_path, " is truncated: ", idx_size,
            " bytes, but ", sequences, " sequences and ", documents, " document indices need ",
            expected);
  MOE_CHECK(idx_size == expected || has_modes, "index file ", idx_path, " has ",
            idx_size - expected, " unexpected trailing bytes after ", sequences, " sequences and ",
            documents, " document indices (", expected, " bytes expected)");
  MOE_CHECK(documents >= 1, "index file ", idx_path,
            " is corrupt: it has no document indices (at least the leading 0 is required)");

  const unsigned char* lengths_at = idx + kIndexHeaderBytes;
  const unsigned char* pointers_at = lengths_at + sequences * 4;
  const unsigned char* documents_at = pointers_at + sequences * 8;
  const unsigned char* modes_at = documents_at + documents * 8;
  copy_array(lengths_at, sequences, sequence_lengths_);
  copy_array(pointers_at, sequences, sequence_pointers_);
  copy_array(documents_at, documents, document_indices_);
  if (has_modes) copy_array(modes_at, sequences, sequence_modes_);

  MOE_CHECK(document_indices_[0] == 0, "index file ", idx_path,
            " is corrupt: the first document index is ", document_indices_[0], ", not 0");
  for (size_t d = 1; d < document_indices_.size(); ++d) {
    MOE_CHECK(document_indices_[d] >= document_indices_[d - 1], "index file ", idx_path,
              " is corrupt: document index ", d, " (", document_indices_[d],
              ") is smaller than the one before it (", document_indices_[d - 1], ")");
  }
  MOE_CHECK(uint64_t(document_indices_.back()) == sequences, "index file ", idx_path,
            " is corrupt: the last document index is ", document_indices_.back(), " but there are ",
            sequences, " sequences");

  const uint64_t item = token_dtype_size(dtype_);
  const uint64_t bin_size = data_map_->size;
  for (size_t s = 0; s < sequences; ++s) {
    const int32_t length = sequence_lengths_[s];
    const int64_t pointer = sequence_pointers_[s];
    MOE_CHECK(length >= 0, "index file ", idx_path, " is corrupt: sequence ", s,
              " has negative length ", length);
    MOE_CHECK(pointer >= 0 && uint64_t(pointer) <= bin_size &&
                  uint64_t(length) * item <= bin_size - uint64_t(pointer),
              "data file ", bin_path, " is truncated or does not match its index: sequence ", s,
              " spans bytes [", pointer, ", ", uint64_t(pointer) + uint64_t(length) * item,
              ") but the file has ", bin_size, " bytes");
    total_tokens_ += length;
  }
}

IndexedDataset::~IndexedDataset() = default;
IndexedDataset::IndexedDataset(IndexedDataset&&) noexcept = default;
IndexedDataset& IndexedDataset::operator=(IndexedDataset&&) noexcept = default;

void IndexedDataset::read(int64_t index, int64_t offset, int64_t length, int64_t* out) const {
  MOE_CHECK(index >= 0 && index < sequence_count(), path_prefix_, ": sequence ", index,
            " out of range [0, ", sequence_count(), ")");
  const int64_t sequence_length = sequence_lengths_[size_t(index)];
  MOE_CHECK(offset >= 0 && length >= 0 && offset + length <= sequence_length, path_prefix_,
            ": tokens [", offset, ", ", offset + length, ") outside sequence ", index,
            " of length ", sequence_length);
  const size_t item = token_dtype_size(dtype_);
  const unsigned char* bytes =
      data_map_->bytes + sequence_pointers_[size_t(index)] + size_t(offset) * item;
  visit_token_type(dtype_, [&](auto tag) { decode_tokens<decltype(tag)>(bytes, length, out); });
}

std::vector<int64_t> IndexedDataset::sequence(int64_t index) const {
  MOE_CHECK(index >= 0 && index < sequence_count(), path_prefix_, ": sequence ", index,
            " out of range [0, ", sequence_count(), ")");
  std::vector<int64_t> tokens(size_t(sequence_lengths_[size_t(index)]));
  read(index, 0, int64_t(tokens.size()), tokens.data());
  return tokens;
}

// ------------------------------------------------------------------------------------------------
// Builder

namespace {

void write_all(std::FILE* file, const void* data, size_t bytes, const std::string& path) {
  if (bytes == 0) return;
  MOE_CHECK(std::fwrite(data, 1, bytes, file) == bytes, "cannot write ", path, ": ", errno_text());
}

template <class T>
void write_value(std::FILE* file, T value, const std::string& path) {
  write_all(file, &value, sizeof(T), path);
}

template <class T>
void write_array(std::FILE* file, const std::vector<T>& values, const std::string& path) {
  write_all(file, values.data(), values.size() * sizeof(T), path);
}

std::string temp_path(const std::string& path) {
  return path + ".tmp";
}

}  // namespace

IndexedDatasetBuilder::IndexedDatasetBuilder(std::string path_prefix, TokenDType dtype,
                                             bool multimodal)
    : path_prefix_(std::move(path_prefix)),
      data_temp_path_(temp_path(data_file_path(path_prefix_))),
      dtype_(dtype),
      multimodal_(multimodal) {
  MOE_CHECK(is_valid_token_dtype_code(uint8_t(dtype)), "unknown token dtype code ", int(dtype));
  data_file_ = std::fopen(data_temp_path_.c_str(), "wb");
  MOE_CHECK(data_file_ != nullptr, "cannot create data file ", data_temp_path_, ": ", errno_text());
}

IndexedDatasetBuilder::~IndexedDatasetBuilder() {
  if (data_file_ != nullptr) std::fclose(data_file_);
  if (!finalized_) {
    std::error_code ignored;
    std::filesystem::remove(data_temp_path_, ignored);
    std::filesystem::remove(temp_path(index_file_path(path_prefix_)), ignored);
  }
}

void IndexedDatasetBuilder::write_tokens(std::span<const int64_t> tokens) {
  MOE_CHECK(!finalized_, path_prefix_, ": dataset already finalized");
  const size_t item = token_dtype_size(dtype_);
  staging_.resize(tokens.size() * item);
  visit_token_type(dtype_, [&](auto tag) {
    encode_tokens<decltype(tag)>(tokens, staging_.data(), path_prefix_, dtype_);
  });
  write_all(data_file_, staging_.data(), staging_.size(), data_temp_path_);
  token_count_ += int64_t(tokens.size());
}

void IndexedDatasetBuilder::add_item(std::span<const int64_t> tokens, int8_t mode) {
  MOE_CHECK(tokens.size() <= size_t(std::numeric_limits<int32_t>::max()), path_prefix_,
            ": a sequence of ", tokens.size(), " tokens exceeds the int32 length field");
  write_tokens(tokens);
  sequence_lengths_.push_back(int32_t(tokens.size()));
  if (multimodal_) sequence_modes_.push_back(mode);
}

void IndexedDatasetBuilder::end_document() {
  document_indices_.push_back(int64_t(sequence_lengths_.size()));
}

void IndexedDatasetBuilder::add_document(std::span<const int64_t> tokens,
                                         std::span<const int32_t> lengths) {
  int64_t total = 0;
  for (int32_t length : lengths) {
    MOE_CHECK(length >= 0, path_prefix_, ": negative sequence length ", length);
    total += length;
  }
  MOE_CHECK(total == int64_t(tokens.size()), path_prefix_, ": sequence lengths sum to ", total,
            " but the document has ", tokens.size(), " tokens");
  size_t begin = 0;
  for (int32_t length : lengths) {
    add_item(tokens.subspan(begin, size_t(length)));
    begin += size_t(length);
  }
  end_document();
}

void IndexedDatasetBuilder::add_index(const std::string& other_prefix) {
  const IndexedDataset other(other_prefix);
  MOE_CHECK(other.dtype() == dtype_, "cannot append ", other_prefix, " (dtype ",
            token_dtype_name(other.dtype()), ") to ", path_prefix_, " (dtype ",
            token_dtype_name(dtype_), ")");
  const int64_t offset = sequence_count();
  std::vector<int64_t> tokens;  // reused for every sequence
  for (int64_t s = 0; s < other.sequence_count(); ++s) {
    tokens.resize(size_t(other.sequence_lengths()[size_t(s)]));
    other.read(s, 0, int64_t(tokens.size()), tokens.data());
    add_item(tokens, other.sequence_modes().empty() ? 0 : other.sequence_modes()[size_t(s)]);
  }
  const auto documents = other.document_indices();
  for (size_t d = 1; d < documents.size(); ++d) document_indices_.push_back(offset + documents[d]);
}

void IndexedDatasetBuilder::finalize() {
  MOE_CHECK(!finalized_, path_prefix_, ": dataset already finalized");
  const std::string bin_path = data_file_path(path_prefix_);
  const std::string idx_path = index_file_path(path_prefix_);
  const int closed = std::fclose(data_file_);
  data_file_ = nullptr;
  MOE_CHECK(closed == 0, "cannot write ", data_temp_path_, ": ", errno_text());

  std::vector<int64_t> pointers(sequence_lengths_.size());
  const int64_t item = int64_t(token_dtype_size(dtype_));
  int64_t position = 0;
  for (size_t s = 0; s < sequence_lengths_.size(); ++s) {
    pointers[s] = position;
    position += int64_t(sequence_lengths_[s]) * item;
  }

  const std::string idx_tmp = temp_path(idx_path);
  std::FILE* file = std::fopen(idx_tmp.c_str(), "wb");
  MOE_CHECK(file != nullptr, "cannot create index file ", idx_tmp, ": ", errno_text());
  try {
    write_all(file, kIndexMagic.data(), kIndexMagic.size(), idx_tmp);
    write_value<uint64_t>(file, kIndexVersion, idx_tmp);
    write_value<uint8_t>(file, uint8_t(dtype_), idx_tmp);
    write_value<uint64_t>(file, sequence_lengths_.size(), idx_tmp);
    write_value<uint64_t>(file, document_indices_.size(), idx_tmp);
    write_array(file, sequence_lengths_, idx_tmp);
    write_array(file, pointers, idx_tmp);
    write_array(file, document_indices_, idx_tmp);
    if (multimodal_) write_array(file, sequence_modes_, idx_tmp);
  } catch (...) {
    std::fclose(file);
    throw;
  }
  MOE_CHECK(std::fclose(file) == 0, "cannot write ", idx_tmp, ": ", errno_text());

  std::error_code error;
  std::filesystem::rename(data_temp_path_, bin_path, error);
  MOE_CHECK(!error, "cannot rename ", data_temp_path_, " to ", bin_path, ": ", error.message());
  std::filesystem::rename(idx_tmp, idx_path, error);
  MOE_CHECK(!error, "cannot rename ", idx_tmp, " to ", idx_path, ": ", error.message());
  finalized_ = true;
}

}  // namespace moe::data

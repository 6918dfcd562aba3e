#include "moe/convert/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>
#include <utility>

#include "moe/tensor/crc32.h"
#include "moe/tensor/error.h"

namespace moe::convert::safetensors {
namespace fs = std::filesystem;
namespace {

// The reference implementation refuses headers above 100 MB; so do we (a corrupt length would
// otherwise ask for an absurd allocation).
constexpr uint64_t kMaxHeaderBytes = uint64_t(100) << 20;
const char* const kIndexName = "model.safetensors.index.json";

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Reads exactly `size` bytes at `offset`; throws naming the file on a short read.
void read_exact(int fd, const std::string& path, void* out, uint64_t size, uint64_t offset,
                const std::string& what) {
  auto* bytes = static_cast<char*>(out);
  uint64_t done = 0;
  while (done < size) {
    ssize_t got = ::pread(fd, bytes + done, size - done, off_t(offset + done));
    MOE_CHECK(got >= 0, "safetensors: reading ", what, " of '", path,
              "' failed: ", std::strerror(errno));
    MOE_CHECK(got > 0, "safetensors: '", path, "' is truncated: ", what, " needs bytes [", offset,
              ", ", offset + size, ") but the file ends at ", offset + done);
    done += uint64_t(got);
  }
}

void write_all(std::ofstream& out, const std::string& path, const void* data, size_t size) {
  out.write(static_cast<const char*>(data), std::streamsize(size));
  MOE_CHECK(out.good(), "safetensors: writing '", path, "' failed");
}

// "0000abcd": fixed width, so the header can be written with placeholders and patched in place
// once the streamed tensors' checksums are known.
std::string crc_hex(uint32_t crc) {
  char text[9];
  std::snprintf(text, sizeof(text), "%08x", crc);
  return text;
}

// Each dtype and its safetensors name (the unsupported-dtype error lists them in this order).
constexpr std::pair<DType, std::string_view> kDTypeNames[] = {
    {DType::F32, "F32"}, {DType::BF16, "BF16"}, {DType::F16, "F16"},
    {DType::F64, "F64"}, {DType::I32, "I32"},   {DType::I64, "I64"}};
}  // namespace

DType parse_dtype(const std::string& name) {
  for (const auto& [dtype, text] : kDTypeNames) {
    if (text == name) return dtype;
  }
  std::string known;
  for (const auto& [dtype, text] : kDTypeNames)
    known += (known.empty() ? "" : ", ") + std::string(text);
  throw Error(moe::detail::concat("safetensors dtype '", name, "' is not supported (", known, ")"));
}

std::string dtype_string(DType dtype) {
  for (const auto& [known, text] : kDTypeNames) {
    if (known == dtype) return std::string(text);
  }
  throw Error(moe::detail::concat("safetensors: unknown dtype ", int(dtype)));
}

File::File(std::string path) : path_(std::move(path)) {
  Fd file{::open(path_.c_str(), O_RDONLY | O_CLOEXEC)};
  MOE_CHECK(file.fd >= 0, "safetensors: cannot open '", path_, "': ", std::strerror(errno));
  const uint64_t file_size = fs::file_size(path_);
  unsigned char length_bytes[8];
  read_exact(file.fd, path_, length_bytes, 8, 0, "the header length");
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | length_bytes[i];
  MOE_CHECK(header_length <= kMaxHeaderBytes, "safetensors: '", path_, "' declares a ",
            header_length, "-byte header (more than the 100 MB limit): not a safetensors file?");
  std::string header(header_length, '\0');
  read_exact(file.fd, path_, header.data(), header_length, 8, "the JSON header");
  data_start_ = 8 + header_length;
  const uint64_t data_size = file_size - data_start_;

  nlohmann::json json;
  try {
    json = nlohmann::json::parse(header);
  } catch (const nlohmann::json::exception& e) {
    MOE_CHECK(false, "safetensors: '", path_, "' has a malformed JSON header: ", e.what());
  }
  MOE_CHECK(json.is_object(), "safetensors: the header of '", path_, "' is not a JSON object");
  std::vector<std::pair<std::pair<uint64_t, uint64_t>, std::string>> ranges;
  for (const auto& [name, entry] : json.items()) {
    if (name == "__metadata__") {
      MOE_CHECK(entry.is_object(), "safetensors: __metadata__ of '", path_, "' is not an object");
      for (const auto& [key, value] : entry.items()) {
        MOE_CHECK(value.is_string(), "safetensors: __metadata__ '", key, "' of '", path_,
                  "' is not a string");
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "' in '" + path_ + "'";
    MOE_CHECK(entry.is_object() && entry.contains("dtype") && entry.contains("shape") &&
                  entry.contains("data_offsets"),
              "safetensors: ", where, " needs dtype, shape and data_offsets");
    TensorInfo info;
    try {
      info.dtype = parse_dtype(entry.at("dtype").get<std::string>());
      for (const auto& d : entry.at("shape")) {
        MOE_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0, "bad dimension ", d.dump());
        info.shape.push_back(d.get<int64_t>());
      }
      const auto& offsets = entry.at("data_offsets");
      MOE_CHECK(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                    offsets[1].is_number_unsigned(),
                "data_offsets must be two non-negative integers, got ", offsets.dump());
      info.begin = offsets[0].get<uint64_t>();
      info.end = offsets[1].get<uint64_t>();
    } catch (const std::exception& e) {
      MOE_CHECK(false, "safetensors: ", where, ": ", e.what());
    }
    MOE_CHECK(info.begin <= info.end && info.end <= data_size, "safetensors: ", where,
              " has data_offsets [", info.begin, ", ", info.end, ") outside the ", data_size,
              "-byte data section (file truncated?)");
    // The byte count of the non-zero extents must fit in int64 (then so does the element count,
    // whatever order the extents are multiplied in); a product that wrapped could match the
    // offsets of a small or empty tensor.
    int64_t bytes = int64_t(dtype_size(info.dtype));
    for (int64_t extent : info.shape) {
      MOE_CHECK(extent == 0 || !__builtin_mul_overflow(bytes, extent, &bytes),
                "safetensors: ", where, " has shape ", shape_string(info.shape), " of ",
                dtype_string(info.dtype), ", whose size in bytes overflows 64-bit integers");
    }
    const uint64_t expected = uint64_t(shape_numel(info.shape)) * dtype_size(info.dtype);
    MOE_CHECK(info.end - info.begin == expected, "safetensors: ", where, " has ",
              info.end - info.begin, " bytes but its shape ", shape_string(info.shape), " of ",
              dtype_string(info.dtype), " needs ", expected);
    ranges.push_back({{info.begin, info.end}, name});
    tensors_.emplace(name, std::move(info));
  }
  // Sorted by start, a tensor overlaps another exactly when it starts before the furthest end
  // seen so far (empty tensors hold no bytes and overlap nothing).
  std::sort(ranges.begin(), ranges.end());
  uint64_t furthest_end = 0;
  const std::string* furthest_name = nullptr;
  for (const auto& [range, name] : ranges) {
    if (range.first == range.second) continue;
    MOE_CHECK(furthest_name == nullptr || range.first >= furthest_end, "safetensors: tensors '",
              *furthest_name, "' and '", name, "' overlap in '", path_, "'");
    if (range.second > furthest_end) {
      furthest_end = range.second;
      furthest_name = &name;
    }
  }
}

const TensorInfo& File::info(const std::string& name) const {
  auto it = tensors_.find(name);
  MOE_CHECK(it != tensors_.end(), "safetensors: '", path_, "' has no tensor '", name, "'");
  return it->second;
}

Tensor File::read(const std::string& name) const {
  const TensorInfo& entry = info(name);
  Tensor tensor = Tensor::empty(entry.shape, entry.dtype);
  Fd file{::open(path_.c_str(), O_RDONLY | O_CLOEXEC)};
  MOE_CHECK(file.fd >= 0, "safetensors: cannot open '", path_, "': ", std::strerror(errno));
  read_exact(file.fd, path_, tensor.raw(), entry.end - entry.begin, data_start_ + entry.begin,
             "tensor '" + name + "'");
  auto recorded = metadata_.find(kChecksumPrefix + name);
  if (recorded != metadata_.end()) {
    const std::string actual = crc_hex(crc32(tensor.raw(), tensor.nbytes()));
    MOE_CHECK(actual == recorded->second, "safetensors: checksum mismatch for tensor '", name,
              "' in '", path_, "' (crc32 ", actual, ", __metadata__ says ", recorded->second,
              "): the file is corrupted");
  }
  return tensor;
}

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  MOE_CHECK(fs::is_directory(dir), "safetensors: '", dir, "' is not a directory");
  std::vector<std::string> shard_names;
  nlohmann::json weight_map;
  const fs::path index_path = fs::path(dir) / kIndexName;
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    try {
      weight_map = nlohmann::json::parse(in).at("weight_map");
    } catch (const nlohmann::json::exception& e) {
      MOE_CHECK(false, "safetensors: '", index_path.string(),
                "' is not a valid index (needs a weight_map object): ", e.what());
    }
    MOE_CHECK(weight_map.is_object(), "safetensors: weight_map in '", index_path.string(),
              "' is not an object");
    std::set<std::string> unique;
    for (const auto& [name, file] : weight_map.items()) {
      MOE_CHECK(file.is_string(), "safetensors: '", index_path.string(), "' maps '", name,
                "' to a non-string");
      unique.insert(file.get<std::string>());
    }
    shard_names.assign(unique.begin(), unique.end());
  } else {
    for (const auto& entry : fs::directory_iterator(dir)) {
      if (entry.path().extension() == ".safetensors") {
        shard_names.push_back(entry.path().filename().string());
      }
    }
    std::sort(shard_names.begin(), shard_names.end());
    MOE_CHECK(!shard_names.empty(), "safetensors: '", dir, "' has neither ", kIndexName,
              " nor any .safetensors file");
  }
  for (const std::string& shard : shard_names) {
    files_.emplace_back((fs::path(dir) / shard).string());
    for (const auto& [name, info] : files_.back().tensors()) {
      auto [it, inserted] = where_.emplace(name, files_.size() - 1);
      MOE_CHECK(inserted, "safetensors: tensor '", name, "' appears in both '",
                files_[it->second].path(), "' and '", files_.back().path(), "'");
    }
  }
  for (const auto& [name, file] : weight_map.items()) {
    auto it = where_.find(name);
    MOE_CHECK(it != where_.end() &&
                  files_[it->second].path() == (fs::path(dir) / file.get<std::string>()).string(),
              "safetensors: the index maps '", name, "' to '", file.get<std::string>(),
              "' but that file does not hold it");
  }
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> names;
  for (const auto& [name, file] : where_) names.push_back(name);
  return names;
}

const File& Checkpoint::shard_of(const std::string& name) const {
  auto it = where_.find(name);
  MOE_CHECK(it != where_.end(), "safetensors: no tensor '", name, "' in '", dir_, "'");
  return files_[it->second];
}

const std::string& Checkpoint::file_of(const std::string& name) const {
  return shard_of(name).path();
}

const TensorInfo& Checkpoint::info(const std::string& name) const {
  return shard_of(name).info(name);
}

Tensor Checkpoint::read(const std::string& name) const {
  return shard_of(name).read(name);
}

namespace {

uint64_t entry_bytes(const TensorEntry& entry) {
  return uint64_t(shape_numel(entry.shape)) * dtype_size(entry.dtype);
}

std::vector<TensorEntry> entries_of(const std::vector<NamedTensor>& tensors) {
  std::vector<TensorEntry> entries;
  for (const auto& [name, tensor] : tensors) {
    entries.push_back({name, tensor.defined() ? tensor.dtype() : DType::F32,
                       tensor.defined() ? tensor.shape() : Shape{}});
  }
  return entries;
}

// Serves stored tensors by name (the first of a repeated name; the header check rejects repeats).
TensorSource source_of(const std::vector<NamedTensor>& tensors) {
  return [&tensors](const std::string& name) {
    for (const auto& [stored_name, tensor] : tensors) {
      if (stored_name == name) return tensor;
    }
    return Tensor();
  };
}

}  // namespace

void write_file(const std::string& path, const std::vector<NamedTensor>& tensors,
                const std::map<std::string, std::string>& metadata) {
  for (const auto& [name, tensor] : tensors) {
    MOE_CHECK(tensor.defined(), "safetensors: cannot write '", path, "': tensor '", name,
              "' is undefined");
  }
  write_file(path, entries_of(tensors), source_of(tensors), metadata);
}

void write_checkpoint(const std::string& dir, const std::vector<NamedTensor>& tensors,
                      const std::map<std::string, std::string>& metadata,
                      uint64_t max_shard_bytes) {
  write_checkpoint(dir, entries_of(tensors), source_of(tensors), metadata, max_shard_bytes);
}

void write_file(const std::string& path, const std::vector<TensorEntry>& entries,
                const TensorSource& source, const std::map<std::string, std::string>& metadata) {
  // Widest elements first (stable), as the reference writer does: with the 8-byte aligned data
  // section every tensor then starts at a multiple of its element size, so readers can map it.
  std::vector<const TensorEntry*> order;
  for (const TensorEntry& entry : entries) order.push_back(&entry);
  std::stable_sort(order.begin(), order.end(), [](const TensorEntry* a, const TensorEntry* b) {
    return dtype_size(a->dtype) > dtype_size(b->dtype);
  });
  nlohmann::json header = nlohmann::json::object();
  std::map<std::string, std::string> header_metadata = metadata;
  for (const TensorEntry* entry : order) {
    header_metadata[kChecksumPrefix + entry->name] = crc_hex(0);  // patched after the data
  }
  if (!header_metadata.empty()) header["__metadata__"] = header_metadata;
  uint64_t offset = 0;
  for (const TensorEntry* entry : order) {
    MOE_CHECK(!entry->name.empty() && entry->name != "__metadata__", "safetensors: cannot write '",
              path, "': invalid tensor name '", entry->name, "'");
    MOE_CHECK(!header.contains(entry->name), "safetensors: cannot write '", path, "': tensor '",
              entry->name, "' appears twice");
    header[entry->name] = {{"dtype", dtype_string(entry->dtype)},
                           {"shape", entry->shape},
                           {"data_offsets", {offset, offset + entry_bytes(*entry)}}};
    offset += entry_bytes(*entry);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned
  unsigned char length_bytes[8];
  for (int i = 0; i < 8; ++i) length_bytes[i] = uint8_t(uint64_t(text.size()) >> (8 * i));

  const std::string temporary = path + ".tmp";
  try {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    MOE_CHECK(out.is_open(), "safetensors: cannot create '", temporary,
              "': ", std::strerror(errno));
    write_all(out, temporary, length_bytes, 8);
    write_all(out, temporary, text.data(), text.size());
    for (const TensorEntry* entry : order) {
      const Tensor tensor = source(entry->name);
      MOE_CHECK(
          tensor.defined() && tensor.dtype() == entry->dtype && tensor.shape() == entry->shape,
          "safetensors: cannot write '", path, "': tensor '", entry->name, "' should be ",
          dtype_string(entry->dtype), " ", shape_string(entry->shape), " but is ",
          tensor.defined() ? dtype_string(tensor.dtype()) + " " + shape_string(tensor.shape())
                           : std::string("undefined"));
      write_all(out, temporary, tensor.raw(), tensor.nbytes());
      header_metadata[kChecksumPrefix + entry->name] =
          crc_hex(crc32(tensor.raw(), tensor.nbytes()));
    }
    // The same keys and fixed-width values: the patched header has the same length.
    header["__metadata__"] = header_metadata;
    const std::string patched = header.dump();
    out.seekp(8);
    write_all(out, temporary, patched.data(), patched.size());
    out.close();
    MOE_CHECK(out.good(), "safetensors: closing '", temporary, "' failed");
    fs::rename(temporary, path);
  } catch (...) {
    std::error_code ignored;
    fs::remove(temporary, ignored);
    throw;
  }
}

void write_checkpoint(const std::string& dir, const std::vector<TensorEntry>& entries,
                      const TensorSource& source,
                      const std::map<std::string, std::string>& metadata,
                      uint64_t max_shard_bytes) {
  fs::create_directories(dir);
  std::vector<std::vector<TensorEntry>> shards(1);
  uint64_t shard_bytes = 0, total_bytes = 0;
  for (const TensorEntry& entry : entries) {
    const uint64_t bytes = entry_bytes(entry);
    if (!shards.back().empty() && shard_bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(entry);
    shard_bytes += bytes;
    total_bytes += bytes;
  }
  if (shards.size() == 1) {
    write_file((fs::path(dir) / "model.safetensors").string(), entries, source, metadata);
    return;
  }
  nlohmann::json weight_map = nlohmann::json::object();
  char shard_name[64];
  for (size_t i = 0; i < shards.size(); ++i) {
    std::snprintf(shard_name, sizeof(shard_name), "model-%05zu-of-%05zu.safetensors", i + 1,
                  shards.size());
    write_file((fs::path(dir) / shard_name).string(), shards[i], source, metadata);
    for (const TensorEntry& entry : shards[i]) weight_map[entry.name] = shard_name;
  }
  nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  const fs::path index_path = fs::path(dir) / kIndexName;
  const std::string temporary = index_path.string() + ".tmp";
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << index.dump(2) << "\n";
    MOE_CHECK(out.good(), "safetensors: writing '", temporary, "' failed");
  }
  fs::rename(temporary, index_path);
}

}  // namespace moe::convert::safetensors

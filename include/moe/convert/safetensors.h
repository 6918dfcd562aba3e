// Hugging Face's safetensors files: an 8-byte little-endian header length N, N bytes of JSON
// ({name: {"dtype", "shape", "data_offsets": [begin, end)}, "__metadata__": {string: string}}),
// then the tensors' bytes, offsets counted from the end of the header. A sharded checkpoint is a
// directory with model.safetensors.index.json ({"metadata": ..., "weight_map": {name: file}}).
//
// Reading validates the whole header up front (JSON, dtypes, shapes, offsets inside the file,
// sizes matching shapes, no two tensors overlapping) and names the file and tensor in every
// error. Tensors are read one at a time (pread), so a converter holds one copy of the model.
// Writing goes through a temporary file renamed into place: no half-written file is ever left
// under the final name. Every file moecore writes records each tensor's CRC-32 in __metadata__
// ("crc32:<name>": 8 hex digits); reading a tensor verifies it where recorded (files from
// elsewhere have none), so a flipped byte is an error naming the tensor. Supported dtypes: F32,
// BF16, F16, F64, I32, I64 (little-endian hosts).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moe/tensor/tensor.h"

namespace moe::convert::safetensors {

// The __metadata__ key prefix of a tensor's checksum.
inline constexpr const char* kChecksumPrefix = "crc32:";

struct TensorInfo {
  DType dtype = DType::F32;
  Shape shape;
  uint64_t begin = 0;  // byte range [begin, end) relative to the data section
  uint64_t end = 0;
};

// "F32" <-> DType::F32, ...; throws naming the string for dtypes moecore does not hold.
DType parse_dtype(const std::string& name);
std::string dtype_string(DType dtype);

// One .safetensors file; the header is parsed and validated on construction.
class File {
 public:
  explicit File(std::string path);
  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;  // throws naming file and tensor
  Tensor read(const std::string& name) const;             // a new tensor with the stored bytes

 private:
  std::string path_;
  uint64_t data_start_ = 0;  // 8 + header length
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint directory: model.safetensors.index.json and its shards when the index exists,
// else every *.safetensors file in it (names must not repeat across files).
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& dir);
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  Tensor read(const std::string& name) const;
  const std::string& file_of(const std::string& name) const;  // path of its shard

 private:
  const File& shard_of(const std::string& name) const;  // throws naming an absent tensor

  std::string dir_;
  std::vector<File> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index in files_
};

using NamedTensor = std::pair<std::string, Tensor>;

// What a tensor will be, for writers that produce tensors one at a time.
struct TensorEntry {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
};
// Returns the tensor of that name (called once per entry, in writing order).
using TensorSource = std::function<Tensor(const std::string& name)>;

// Writes one file atomically (path.tmp, then rename). Names must be unique and non-empty, and
// "__metadata__" is reserved.
void write_file(const std::string& path, const std::vector<NamedTensor>& tensors,
                const std::map<std::string, std::string>& metadata = {});

// Writes `tensors` into `dir` (created if needed) as model.safetensors, or, when they exceed
// max_shard_bytes, as model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json
// (written last). Tensors keep their order; a tensor larger than the limit gets its own shard.
void write_checkpoint(const std::string& dir, const std::vector<NamedTensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {},
                      uint64_t max_shard_bytes = uint64_t(5) << 30);

// The same, streaming: only one tensor from `source` is alive at a time. Each must match its
// entry's dtype and shape (an error names the tensor otherwise).
void write_file(const std::string& path, const std::vector<TensorEntry>& entries,
                const TensorSource& source,
                const std::map<std::string, std::string>& metadata = {});
void write_checkpoint(const std::string& dir, const std::vector<TensorEntry>& entries,
                      const TensorSource& source,
                      const std::map<std::string, std::string>& metadata = {},
                      uint64_t max_shard_bytes = uint64_t(5) << 30);

}  // namespace moe::convert::safetensors

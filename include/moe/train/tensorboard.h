// A TensorBoard event-file writer for scalars, with no protobuf or TensorFlow dependency.
//
// File format (what TensorBoard's EventFileLoader reads): a sequence of TFRecords
//   uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32
//   masked_crc32c(data)
// where each data block is a serialized tensorflow.Event protobuf: the first carries
// file_version "brain.Event:2", each later one a Summary with one scalar Value (tag,
// simple_value). The protobuf bytes are encoded by hand (field numbers from event.proto and
// summary.proto). Files are named events.out.tfevents.<unix seconds>.<host>.<pid> as TensorBoard
// expects.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace moe::train {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses.
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);
// TFRecord's masking: rotate right by 15 and add 0xa282ead8.
uint32_t masked_crc32c(const void* data, size_t size);

class TensorBoardWriter {
 public:
  // Creates `directory` (and parents) and a new event file in it. Throws moe::Error naming the
  // path when it cannot.
  explicit TensorBoardWriter(const std::string& directory);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // One scalar point; `wall_time` in seconds since the epoch (now when negative).
  void add_scalar(std::string_view tag, double value, int64_t step, double wall_time = -1);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& data);
  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace moe::train

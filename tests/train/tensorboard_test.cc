// The TensorBoard writer's files decoded by an independent reader written here from the format
// descriptions (TFRecord framing, masked CRC-32C, protobuf wire format of Event/Summary), and
// the CSV scalar log.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "moe/tensor/error.h"
#include "moe/train/scalar_log.h"
#include "moe/train/tensorboard.h"
#include "support/testing.h"

namespace moe::train {
namespace {

namespace fs = std::filesystem;
using moe::testing::ScratchDir;

// Bit-at-a-time CRC-32C, deliberately unlike the writer's table version.
uint32_t slow_crc32c(const std::string& bytes) {
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char byte : bytes) {
    crc ^= byte;
    for (int bit = 0; bit < 8; ++bit) crc = (crc & 1) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
  }
  return ~crc;
}
uint32_t slow_masked(const std::string& bytes) {
  uint32_t crc = slow_crc32c(bytes);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

template <class T>
T read_le(const std::string& bytes, size_t at) {
  T value;
  std::memcpy(&value, bytes.data() + at, sizeof(T));
  return value;
}

// A protobuf message as field number -> raw values (varints and fixed values as integers
// reinterpreted by the caller; length-delimited as bytes).
struct Field {
  uint32_t wire = 0;
  uint64_t number = 0;
  std::string bytes;
};
std::multimap<uint32_t, Field> decode_message(const std::string& message) {
  std::multimap<uint32_t, Field> fields;
  size_t at = 0;
  auto varint = [&] {
    uint64_t value = 0;
    for (int shift = 0;; shift += 7) {
      uint8_t byte = uint8_t(message.at(at++));
      value |= uint64_t(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return value;
    }
  };
  while (at < message.size()) {
    uint64_t key = varint();
    Field field;
    field.wire = uint32_t(key & 7);
    switch (field.wire) {
      case 0:
        field.number = varint();
        break;
      case 1:
        field.number = read_le<uint64_t>(message, at);
        at += 8;
        break;
      case 5:
        field.number = read_le<uint32_t>(message, at);
        at += 4;
        break;
      case 2: {
        uint64_t length = varint();
        field.bytes = message.substr(at, length);
        at += length;
        break;
      }
      default:
        ADD_FAILURE() << "unexpected wire type " << field.wire;
        return fields;
    }
    fields.emplace(uint32_t(key >> 3), field);
  }
  EXPECT_EQ(at, message.size());
  return fields;
}

struct Scalar {
  std::string tag;
  float value;
  int64_t step;
  double wall_time;
};

// Reads every record, checking both CRCs, and returns the file version and the scalars.
std::pair<std::string, std::vector<Scalar>> read_event_file(const std::string& path) {
  const std::string file = moe::testing::read_bytes(path);
  std::string version;
  std::vector<Scalar> scalars;
  size_t at = 0;
  while (at < file.size()) {
    std::string length_bytes = file.substr(at, 8);
    uint64_t length = read_le<uint64_t>(file, at);
    EXPECT_EQ(read_le<uint32_t>(file, at + 8), slow_masked(length_bytes)) << "length crc";
    std::string data = file.substr(at + 12, length);
    EXPECT_EQ(read_le<uint32_t>(file, at + 12 + length), slow_masked(data)) << "data crc";
    at += 12 + length + 4;
    auto event = decode_message(data);
    double wall_time = 0;
    uint64_t wall_bits = event.find(1)->second.number;
    std::memcpy(&wall_time, &wall_bits, 8);
    EXPECT_GT(wall_time, 1.6e9);
    int64_t step = int64_t(event.find(2)->second.number);
    if (auto v = event.find(3); v != event.end()) version = v->second.bytes;
    if (auto summary = event.find(5); summary != event.end()) {
      auto values = decode_message(summary->second.bytes);
      for (auto [it, end] = values.equal_range(1); it != end; ++it) {
        auto value = decode_message(it->second.bytes);
        uint32_t bits = uint32_t(value.find(2)->second.number);
        EXPECT_EQ(value.find(2)->second.wire, 5u);
        float simple;
        std::memcpy(&simple, &bits, 4);
        scalars.push_back({value.find(1)->second.bytes, simple, step, wall_time});
      }
    }
  }
  EXPECT_EQ(at, file.size()) << "trailing bytes";
  return {version, scalars};
}

TEST(TensorBoard, Crc32cKnownValue) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);  // the standard check value
  EXPECT_EQ(crc32c("", 0), 0u);
  std::string text = "moecore event";
  EXPECT_EQ(crc32c(text.data(), text.size()), slow_crc32c(text));
}

TEST(TensorBoard, EventFileDecodesToTheWrittenScalars) {
  ScratchDir dir("tb");
  std::string path;
  {
    TensorBoardWriter writer(dir.file("nested"));
    path = writer.path();
    writer.add_scalar("lm loss", 7.25, 1, 1.7e9);
    writer.add_scalar("learning-rate", 1e-4, 1, 1.7e9 + 1);
    writer.add_scalar("lm loss", 6.5, 300, 1.7e9 + 2);
    writer.add_scalar(std::string(200, 'x'), -3.0, 1LL << 40, 1.7e9 + 3);  // multi-byte varints
  }
  EXPECT_CONTAINS(fs::path(path).filename().string(), "events.out.tfevents.");
  auto [version, scalars] = read_event_file(path);
  EXPECT_EQ(version, "brain.Event:2");
  ASSERT_EQ(scalars.size(), 4u);
  EXPECT_EQ(scalars[0].tag, "lm loss");
  EXPECT_EQ(scalars[0].value, 7.25f);
  EXPECT_EQ(scalars[0].step, 1);
  EXPECT_EQ(scalars[1].value, 1e-4f);
  EXPECT_EQ(scalars[2].step, 300);
  EXPECT_EQ(scalars[3].tag, std::string(200, 'x'));
  EXPECT_EQ(scalars[3].step, 1LL << 40);
  EXPECT_DOUBLE_EQ(scalars[3].wall_time, 1.7e9 + 3);
}

TEST(TensorBoard, UnwritableDirectoryIsNamed) {
  ScratchDir dir("tb_file");
  const fs::path file = dir.path / "file";
  moe::testing::write_bytes(file, "a file, not a directory");
  EXPECT_CONTAINS(
      moe::testing::error_text([&] { TensorBoardWriter writer((file / "sub").string()); }),
      "--tensorboard-dir: cannot create directory '" + (file / "sub").string() + "'");
}

TEST(ScalarLog, CsvAndEventFileCarryTheSameScalars) {
  ScratchDir dir("scalars");
  std::string event_path;
  {
    ScalarLog log(dir.file("tb"), (dir.path / "logs" / "train.csv").string());
    event_path = *log.tensorboard_path();
    log.add("lm loss", 5.5, 10);
    log.add("grad-norm", 0.125, 10);
    log.flush();
  }
  EXPECT_EQ(moe::testing::read_bytes(dir.path / "logs" / "train.csv"),
            "iteration,tag,value\n10,lm loss,5.5\n10,grad-norm,0.125\n");
  auto [version, scalars] = read_event_file(event_path);
  ASSERT_EQ(scalars.size(), 2u);
  EXPECT_EQ(scalars[1].tag, "grad-norm");
  EXPECT_EQ(scalars[1].value, 0.125f);
}

}  // namespace
}  // namespace moe::train

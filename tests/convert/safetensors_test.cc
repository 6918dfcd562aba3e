#include "moe/convert/safetensors.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "support/testing.h"

namespace moe::convert::safetensors {
namespace {

using moe::testing::expect_error_containing;
using moe::testing::same_bytes;
using moe::testing::ScratchDir;
using moe::testing::write_bytes;

// One tensor of every supported dtype and some awkward shapes (empty, scalar-like, odd sizes).
std::vector<NamedTensor> sample_tensors() {
  std::vector<NamedTensor> tensors;
  tensors.push_back({"layers.0.weight", moe::testing::random_normal({17, 5}, 1)});
  tensors.push_back({"layers.0.bf16", moe::testing::random_normal({3, 1, 7}, 2).to(DType::BF16)});
  tensors.push_back({"f16", moe::testing::random_normal({129}, 3).to(DType::F16)});
  tensors.push_back({"f64", moe::testing::random_normal({1, 5}, 4).to(DType::F64)});
  tensors.push_back({"empty", Tensor({0, 4})});
  Tensor i32({5}, DType::I32), i64({2, 3}, DType::I64);
  for (int i = 0; i < 5; ++i) i32.data<int32_t>()[i] = -1000 * i + 7;
  for (int i = 0; i < 6; ++i) i64.data<int64_t>()[i] = (int64_t(1) << 50) - i;
  tensors.push_back({"ids32", i32});
  tensors.push_back({"ids64", i64});
  return tensors;
}

TEST(Safetensors, DTypeNamesRoundTripAndUnknownOnesAreNamed) {
  for (DType dtype : {DType::F32, DType::BF16, DType::F16, DType::F64, DType::I32, DType::I64}) {
    EXPECT_EQ(parse_dtype(dtype_string(dtype)), dtype) << dtype_name(dtype);
  }
  EXPECT_EQ(dtype_string(DType::BF16), "BF16");
  EXPECT_EQ(moe::testing::error_text([] { parse_dtype("F8_E4M3"); }),
            "safetensors dtype 'F8_E4M3' is not supported (F32, BF16, F16, F64, I32, I64)");
}

TEST(Safetensors, FileRoundTripIsBitwise) {
  ScratchDir dir("file_round_trip");
  auto tensors = sample_tensors();
  write_file(dir.file("x.safetensors"), tensors, {{"format", "pt"}});
  EXPECT_FALSE(std::filesystem::exists(dir.file("x.safetensors.tmp")));
  File file(dir.file("x.safetensors"));
  EXPECT_EQ(file.metadata().at("format"), "pt");
  ASSERT_EQ(file.tensors().size(), tensors.size());
  for (const auto& [name, tensor] : tensors) {
    EXPECT_TRUE(same_bytes(file.read(name), tensor)) << name;
    // 8-byte header padding plus widest-first order: every tensor aligned to its element size.
    EXPECT_EQ(file.info(name).begin % dtype_size(tensor.dtype()), 0u) << name;
  }
}

// Files moecore writes carry each tensor's CRC-32 in __metadata__; a flipped byte in a tensor's
// data is an error naming that tensor, and the other tensors still read.
TEST(Safetensors, ChecksumsCatchAFlippedByteNamingTheTensor) {
  ScratchDir dir("checksums");
  const std::string path = dir.file("x.safetensors");
  auto tensors = sample_tensors();
  write_file(path, tensors, {{"format", "pt"}});
  const File written(path);
  EXPECT_EQ(written.metadata().size(), tensors.size() + 1);  // one checksum per tensor + format
  EXPECT_EQ(written.metadata().at("crc32:f16").size(), 8u);
  const uint64_t flipped_at = written.info("f16").begin + 3;
  std::string bytes = moe::testing::read_bytes(path);
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | uint8_t(bytes[size_t(i)]);
  bytes[size_t(8 + header_length + flipped_at)] ^= 0x10;
  write_bytes(path, bytes);
  const File corrupted(path);
  expect_error_containing([&] { corrupted.read("f16"); },
                          {"checksum mismatch for tensor 'f16'", path, "corrupted"});
  EXPECT_TRUE(same_bytes(corrupted.read("layers.0.weight"), tensors[0].second));
}

TEST(Safetensors, ShardedCheckpointRoundTrip) {
  ScratchDir dir("sharded");
  auto tensors = sample_tensors();
  write_checkpoint(dir.path.string(), tensors, {}, /*max_shard_bytes=*/400);
  ASSERT_TRUE(std::filesystem::exists(dir.file("model.safetensors.index.json")));
  EXPECT_FALSE(std::filesystem::exists(dir.file("model.safetensors")));
  Checkpoint checkpoint(dir.path.string());
  EXPECT_EQ(checkpoint.names().size(), tensors.size());
  std::set<std::string> files;
  for (const auto& [name, tensor] : tensors) {
    EXPECT_TRUE(same_bytes(checkpoint.read(name), tensor)) << name;
    files.insert(checkpoint.file_of(name));
  }
  EXPECT_GT(files.size(), 1u);

  ScratchDir single("single");
  write_checkpoint(single.path.string(), tensors);
  EXPECT_TRUE(std::filesystem::exists(single.file("model.safetensors")));
  EXPECT_TRUE(same_bytes(Checkpoint(single.path.string()).read("f16"), tensors[2].second));
}

// A file written by an independent writer (tests/convert/write_fixture.py: numpy's bytes, the
// header JSON and layout written by hand) reads back with every dtype, shape and value bit-exact:
// signed zeros, subnormals, infinities and NaN included; the writer lists what it wrote.
TEST(Safetensors, ReadsFileWrittenByIndependentNumpyWriter) {
  MOE_REQUIRE_PYTHON_PACKAGE("numpy");
  ScratchDir dir("numpy_fixture");
  const std::string path = dir.file("fixture.safetensors"), listing = dir.file("expected.json");
  const std::string command = std::string("/usr/bin/python3 ") +
                              MOE_CONVERT_TEST_DIR "/write_fixture.py " + path + " " + listing;
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  const nlohmann::json expected = nlohmann::json::parse(moe::testing::read_bytes(listing));
  File file(path);
  EXPECT_EQ(file.metadata().at("writer"), "write_fixture.py (numpy)");
  ASSERT_EQ(file.tensors().size(), expected.size());
  for (const auto& [name, want] : expected.items()) {
    SCOPED_TRACE(name);
    const Tensor tensor = file.read(name);
    ASSERT_EQ(dtype_string(tensor.dtype()), want.at("dtype").get<std::string>());
    ASSERT_EQ(tensor.shape(), want.at("shape").get<Shape>());
    const nlohmann::json& values = want.at("values");
    ASSERT_EQ(size_t(tensor.numel()), values.size());
    for (int64_t i = 0; i < tensor.numel(); ++i) {
      if (tensor.dtype() == DType::I32) {
        EXPECT_EQ(tensor.data<int32_t>()[i], values[size_t(i)].get<int32_t>()) << i;
      } else if (tensor.dtype() == DType::I64) {
        EXPECT_EQ(tensor.data<int64_t>()[i], values[size_t(i)].get<int64_t>()) << i;
      } else {
        // float.hex() text: strtod reads it exactly, "inf" and "nan" included.
        const std::string text = values[size_t(i)].get<std::string>();
        const double value = std::strtod(text.c_str(), nullptr),
                     got = moe::testing::value_at(tensor, i);
        if (std::isnan(value)) {
          EXPECT_TRUE(std::isnan(got)) << i << ": " << got << " vs " << text;
        } else {
          EXPECT_EQ(got, value) << i << ": " << text;
          EXPECT_EQ(std::signbit(got), std::signbit(value)) << i << ": " << text;
        }
      }
    }
  }
}

TEST(Safetensors, StreamingWriterChecksEachTensorAndLeavesNothingOnError) {
  ScratchDir dir("streaming");
  std::vector<TensorEntry> entries = {{"a", DType::F32, {2, 3}}, {"b", DType::BF16, {5}}};
  int calls = 0;
  auto source = [&](const std::string& name) {
    ++calls;
    return name == "a" ? moe::testing::random_normal({2, 3}, 5) : Tensor({5}, DType::BF16);
  };
  write_checkpoint(dir.path.string(), entries, source);
  EXPECT_EQ(calls, 2);
  EXPECT_TRUE(same_bytes(File(dir.file("model.safetensors")).read("a"),
                         moe::testing::random_normal({2, 3}, 5)));

  ScratchDir bad("streaming_bad");
  auto wrong = [&](const std::string& name) {
    return name == "a" ? Tensor({3, 2}) : Tensor({5}, DType::BF16);
  };
  expect_error_containing([&] { write_file(bad.file("x.safetensors"), entries, wrong); },
                          {"tensor 'a' should be F32 [2, 3] but is F32 [3, 2]"});
  EXPECT_FALSE(std::filesystem::exists(bad.file("x.safetensors")));
  EXPECT_FALSE(std::filesystem::exists(bad.file("x.safetensors.tmp")));
}

// Writes an 8-byte length plus `header` plus `data_bytes` zero bytes.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[size_t(i)] = char(uint8_t(header.size() >> (8 * i)));
  bytes += header;
  bytes.append(data_bytes, '\0');
  write_bytes(path, bytes);
}

TEST(Safetensors, BadFilesNameFileAndTensor) {
  ScratchDir dir("bad");
  const std::string path = dir.file("bad.safetensors");
  write_raw(path, R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})", 10);
  expect_error_containing([&] { File{path}; }, {"'w'", path, "outside the 10-byte data section"});

  write_raw(path, R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]})", 16);
  expect_error_containing([&] { File{path}; }, {path, "malformed JSON header"});

  write_raw(path,
            R"({"u": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
            R"( "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
            12);
  expect_error_containing([&] { File{path}; }, {"'u' and 'v' overlap", path});

  write_raw(path, R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8);
  expect_error_containing([&] { File{path}; }, {"'w'", "has 8 bytes", "[3]", "needs 12"});

  write_raw(path, R"({"w": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}})", 3);
  expect_error_containing([&] { File{path}; }, {"'w'", "'U8' is not supported"});

  // 2^62 x 4 floats is 2^66 bytes, which wraps to 0 in 64 bits and would pass for an empty
  // tensor; a zero extent does not excuse the others' overflow either.
  write_raw(path,
            R"({"w": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}})",
            0);
  expect_error_containing([&] { File{path}; }, {"'w'", path, "[4611686018427387904, 4] of F32",
                                                "whose size in bytes overflows 64-bit integers"});
  write_raw(
      path,
      R"({"w": {"dtype": "BF16", "shape": [4294967296, 4294967296, 0], "data_offsets": [0, 0]}})",
      0);
  expect_error_containing([&] { File{path}; },
                          {"'w'", "[4294967296, 4294967296, 0] of BF16", "overflows"});

  write_bytes(path, std::string("\x40\0\0", 3));
  expect_error_containing([&] { File{path}; }, {path, "truncated", "header length"});

  write_raw(path, "{}", 0);
  std::string bytes(8, '\0');
  bytes[0] = char(200);  // claims a 200-byte header, has 2
  write_bytes(path, bytes + "{}");
  expect_error_containing([&] { File{path}; }, {path, "truncated", "JSON header"});

  write_raw(path, R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 4);
  expect_error_containing([&] { File(path).read("x"); }, {path, "no tensor 'x'"});
}

TEST(Safetensors, BadIndexIsReported) {
  ScratchDir dir("bad_index");
  write_file(dir.file("a.safetensors"), {{"w", Tensor({2})}});
  write_bytes(dir.file("model.safetensors.index.json"),
              R"({"weight_map": {"w": "a.safetensors", "missing": "a.safetensors"}})");
  expect_error_containing([&] { Checkpoint{dir.path.string()}; },
                          {"maps 'missing' to 'a.safetensors'", "does not hold it"});
  write_bytes(dir.file("model.safetensors.index.json"),
              R"({"weight_map": {"w": "b.safetensors"}})");
  expect_error_containing([&] { Checkpoint{dir.path.string()}; }, {"b.safetensors", "cannot open"});

  ScratchDir empty("empty");
  expect_error_containing([&] { Checkpoint{empty.path.string()}; }, {"nor any .safetensors file"});
  expect_error_containing(
      [&] {
        write_file(empty.file("x.safetensors"), {{"w", Tensor({1})}, {"w", Tensor({1})}});
      },
      {"'w' appears twice"});
  EXPECT_FALSE(std::filesystem::exists(empty.file("x.safetensors.tmp")));
}

}  // namespace
}  // namespace moe::convert::safetensors

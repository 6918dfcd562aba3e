// What the HF converters (hf_moe.cc, hf_deepseek.cc) share: how an HF tensor's blocks lie in
// moecore tensors and the copy both directions use, and config.json field readers. Internal to
// src/convert.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "moe/convert/safetensors.h"
#include "moe/tensor/error.h"
#include "moe/tensor/tensor.h"

namespace moe::convert::detail {

// A block of an HF tensor and where it lies in a moecore tensor. Transposed blocks are rows
// [row_begin, row_begin + rows) of an HF matrix [R, in]; HF element (row_begin + r, i) is moecore
// element offset + i * row_stride + r. Untransposed blocks copy rows [row_begin, row_begin +
// rows) of the HF tensor (rows 0: all of it) to [offset, offset + their elements).
struct Piece {
  std::string hf_name;
  bool transpose = true;
  int64_t row_begin = 0, rows = 0;
  int64_t offset = 0, row_stride = 0;
  // A copy HF keeps of a tensor moecore holds once (DeepSeek's MTP layers' embedding and head):
  // on import it must equal what the main tensor already put there.
  bool shared_copy = false;
};

// Copies `piece` between an HF tensor and a moecore tensor of the same dtype, in the direction
// `to_moecore`; only the elements' bytes matter.
void move_piece(const Piece& piece, Tensor& hf, Tensor& moe, bool to_moecore);

// Every tensor of `hf_shapes` from `source`, in that order (both converters' moecore_to_hf).
std::vector<safetensors::NamedTensor> read_all(
    const safetensors::TensorSource& source,
    const std::vector<std::pair<std::string, Shape>>& hf_shapes);

// config.json field readers: absent and null fields take `fallback`; `source` names the file in
// errors.
const nlohmann::json* field_of(const nlohmann::json& json, const char* field);  // null: absent
bool bool_field(const nlohmann::json& json, const char* field, const std::string& source,
                bool fallback);
double number_field(const nlohmann::json& json, const char* field, const std::string& source,
                    double fallback);

// `config` after its validate(), whose error is prefixed with `source` (the config.json read).
template <class Config>
Config validated(Config config, const std::string& source) {
  try {
    config.validate();
  } catch (const Error& e) {
    MOE_CHECK(false, source, ": ", e.what());
  }
  return config;
}

}  // namespace moe::convert::detail

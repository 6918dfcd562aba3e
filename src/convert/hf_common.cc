#include "hf_common.h"

#include <cstring>

#include "moe/tensor/error.h"

namespace moe::convert::detail {
namespace {

// move_piece on elements of type T (only their bytes matter).
template <class T>
void move_piece_typed(const Piece& piece, T* hf, T* moe, int64_t hf_columns, int64_t hf_numel,
                      bool to_moecore) {
  if (!piece.transpose) {
    const int64_t count = piece.rows > 0 ? piece.rows * hf_columns : hf_numel;
    T* hf_rows = hf + piece.row_begin * hf_columns;
    if (to_moecore) {
      std::memcpy(moe + piece.offset, hf_rows, size_t(count) * sizeof(T));
    } else {
      std::memcpy(hf_rows, moe + piece.offset, size_t(count) * sizeof(T));
    }
    return;
  }
#pragma omp parallel for schedule(static) if (piece.rows * hf_columns > 65536)
  for (int64_t r = 0; r < piece.rows; ++r) {
    T* hf_row = hf + (piece.row_begin + r) * hf_columns;
    T* moe_column = moe + piece.offset + r;
    for (int64_t i = 0; i < hf_columns; ++i) {
      if (to_moecore) {
        moe_column[i * piece.row_stride] = hf_row[i];
      } else {
        hf_row[i] = moe_column[i * piece.row_stride];
      }
    }
  }
}

}  // namespace

void move_piece(const Piece& piece, Tensor& hf, Tensor& moe, bool to_moecore) {
  const int64_t columns = hf.ndim() == 2 ? hf.dim(1) : 1;
  switch (dtype_size(hf.dtype())) {
    case 2:
      return move_piece_typed(piece, static_cast<uint16_t*>(hf.raw()),
                              static_cast<uint16_t*>(moe.raw()), columns, hf.numel(), to_moecore);
    case 4:
      return move_piece_typed(piece, static_cast<uint32_t*>(hf.raw()),
                              static_cast<uint32_t*>(moe.raw()), columns, hf.numel(), to_moecore);
    default:
      return move_piece_typed(piece, static_cast<uint64_t*>(hf.raw()),
                              static_cast<uint64_t*>(moe.raw()), columns, hf.numel(), to_moecore);
  }
}

std::vector<safetensors::NamedTensor> read_all(
    const safetensors::TensorSource& source,
    const std::vector<std::pair<std::string, Shape>>& hf_shapes) {
  std::vector<safetensors::NamedTensor> named;
  for (const auto& [name, shape] : hf_shapes) named.push_back({name, source(name)});
  return named;
}

const nlohmann::json* field_of(const nlohmann::json& json, const char* field) {
  return json.contains(field) && !json.at(field).is_null() ? &json.at(field) : nullptr;
}

bool bool_field(const nlohmann::json& json, const char* field, const std::string& source,
                bool fallback) {
  const nlohmann::json* value = field_of(json, field);
  if (!value) return fallback;
  MOE_CHECK(value->is_boolean(), source, ": config field '", field, "' must be true or false, got ",
            value->dump());
  return value->get<bool>();
}

double number_field(const nlohmann::json& json, const char* field, const std::string& source,
                    double fallback) {
  const nlohmann::json* value = field_of(json, field);
  if (!value) return fallback;
  MOE_CHECK(value->is_number(), source, ": config field '", field, "' must be a number, got ",
            value->dump());
  return value->get<double>();
}

}  // namespace moe::convert::detail

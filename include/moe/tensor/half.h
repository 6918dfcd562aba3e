// 16-bit floating-point storage types. Arithmetic is always done in fp32: these types only
// store values, and convert with round-to-nearest-even (NaN stays NaN).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace moe {

struct bf16 {
  uint16_t bits = 0;
};
struct f16 {
  uint16_t bits = 0;
};

inline float bf16_to_float(bf16 value) {
  uint32_t word = uint32_t(value.bits) << 16;
  float result;
  std::memcpy(&result, &word, sizeof(result));
  return result;
}

inline bf16 float_to_bf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if ((word & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN, keep the sign
    return bf16{uint16_t((word >> 16) | 0x0040u)};
  }
  uint32_t rounding_bias = 0x7fffu + ((word >> 16) & 1u);  // ties go to the even neighbour
  return bf16{uint16_t((word + rounding_bias) >> 16)};
}

// IEEE binary16 conversions in plain C++ (the reference, and the path without F16C).
float f16_to_float_portable(f16 value);
f16 float_to_f16_portable(float value);

inline float f16_to_float(f16 value) {
#if defined(__F16C__)
  return _cvtsh_ss(value.bits);
#else
  return f16_to_float_portable(value);
#endif
}

inline f16 float_to_f16(float value) {
#if defined(__F16C__)
  return f16{uint16_t(_cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT))};
#else
  return float_to_f16_portable(value);
#endif
}

// Bulk conversions (vectorised where the CPU allows). Sizes may be zero.
void convert_to_float(const bf16* source, float* target, size_t count);
void convert_to_float(const f16* source, float* target, size_t count);
void convert_from_float(const float* source, bf16* target, size_t count);
void convert_from_float(const float* source, f16* target, size_t count);

// Load/store used by kernels that are templated over the storage type.
inline float to_float(float value) {
  return value;
}
inline float to_float(double value) {
  return float(value);
}
inline float to_float(bf16 value) {
  return bf16_to_float(value);
}
inline float to_float(f16 value) {
  return f16_to_float(value);
}

template <class T>
T from_float(float value);
template <>
inline float from_float<float>(float value) {
  return value;
}
template <>
inline double from_float<double>(float value) {
  return value;
}
template <>
inline bf16 from_float<bf16>(float value) {
  return float_to_bf16(value);
}
template <>
inline f16 from_float<f16>(float value) {
  return float_to_f16(value);
}

}  // namespace moe

#include "moe/tensor/half.h"

#include <cmath>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

namespace moe {

float f16_to_float_portable(f16 value) {
  uint32_t sign = uint32_t(value.bits & 0x8000u) << 16;
  uint32_t exponent = (value.bits >> 10) & 0x1fu;
  uint32_t mantissa = value.bits & 0x3ffu;
  uint32_t word;
  if (exponent == 0x1f) {  // inf or NaN
    word = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent == 0) {
    if (mantissa == 0) {
      word = sign;
    } else {  // subnormal: exact in fp32
      float magnitude = std::ldexp(float(mantissa), -24);
      float result = sign ? -magnitude : magnitude;
      return result;
    }
  } else {
    word = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float result;
  std::memcpy(&result, &word, sizeof(result));
  return result;
}

f16 float_to_f16_portable(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  uint16_t sign = uint16_t((word >> 16) & 0x8000u);
  uint32_t magnitude = word & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};  // NaN stays NaN
  if (magnitude >= 0x47800000u) {  // >= 65536 before rounding: check against max finite below
    return f16{uint16_t(sign | 0x7c00u)};
  }
  if (magnitude < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    float absolute;
    std::memcpy(&absolute, &magnitude, sizeof(absolute));
    // Subnormal halves are multiples of 2^-24; nearbyint rounds half to even.
    float units = std::nearbyint(absolute * 16777216.0f);
    return f16{uint16_t(sign | uint16_t(units))};
  }
  uint32_t exponent = (magnitude >> 23) - 112;
  uint32_t mantissa = magnitude & 0x7fffffu;
  uint32_t half = (exponent << 10) | (mantissa >> 13);
  uint32_t remainder = mantissa & 0x1fffu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (half & 1u))) ++half;  // may carry into inf
  return f16{uint16_t(sign | half)};
}

void convert_to_float(const bf16* source, float* target, size_t count) {
  size_t i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= count; i += 8) {
    __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source + i));
    __m256i widened = _mm256_slli_epi32(_mm256_cvtepu16_epi32(packed), 16);
    _mm256_storeu_ps(target + i, _mm256_castsi256_ps(widened));
  }
#endif
  for (; i < count; ++i) target[i] = bf16_to_float(source[i]);
}

void convert_from_float(const float* source, bf16* target, size_t count) {
  for (size_t i = 0; i < count; ++i) target[i] = float_to_bf16(source[i]);
}

void convert_to_float(const f16* source, float* target, size_t count) {
  size_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= count; i += 8) {
    __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source + i));
    _mm256_storeu_ps(target + i, _mm256_cvtph_ps(packed));
  }
#endif
  for (; i < count; ++i) target[i] = f16_to_float(source[i]);
}

void convert_from_float(const float* source, f16* target, size_t count) {
  size_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= count; i += 8) {
    __m128i packed = _mm256_cvtps_ph(_mm256_loadu_ps(source + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(target + i), packed);
  }
#endif
  for (; i < count; ++i) target[i] = float_to_f16(source[i]);
}

}  // namespace moe

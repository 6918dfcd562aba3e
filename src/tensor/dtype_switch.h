// Runs a generic lambda with a value of the C++ type that stores a dtype, and converts between
// storage and math types for kernels templated over the storage type.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "moe/tensor/tensor.h"

namespace moe {

template <class Body>
decltype(auto) dispatch_floating(DType dtype, const char* what, Body&& body) {
  switch (dtype) {
    case DType::F32:
      return body(float{});
    case DType::BF16:
      return body(bf16{});
    case DType::F16:
      return body(f16{});
    case DType::F64:
      return body(double{});
    default:
      throw Error(detail::concat(what, ": dtype ", dtype_name(dtype),
                                 " is not a floating type (fp32, bf16, fp16, fp64)"));
  }
}

// Every dtype, the integer ones (int32, int64) included.
template <class Body>
decltype(auto) dispatch_any(DType dtype, const char* what, Body&& body) {
  switch (dtype) {
    case DType::I32:
      return body(int32_t{});
    case DType::I64:
      return body(int64_t{});
    default:
      return dispatch_floating(dtype, what, std::forward<Body>(body));
  }
}

// Math type for a storage type: double for fp64, int64 for integers, float otherwise.
template <class T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double,
                                     std::conditional_t<std::is_integral_v<T>, int64_t, float>>;

template <class T>
inline compute_t<T> load(T value) {
  if constexpr (std::is_same_v<T, double> || std::is_integral_v<T>) {
    return value;
  } else {
    return to_float(value);
  }
}

template <class T>
inline T store(compute_t<T> value) {
  if constexpr (std::is_same_v<T, double>) {
    return value;
  } else if constexpr (std::is_integral_v<T>) {
    return T(value);  // int64 -> int32 wraps modulo 2^32, as two's complement hardware does
  } else {
    return from_float<T>(value);
  }
}

}  // namespace moe

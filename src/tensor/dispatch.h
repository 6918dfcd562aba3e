// Runs a generic lambda with a value of the C++ type that stores a floating dtype.
#pragma once

#include <type_traits>

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

// Math type for a storage type: double for fp64 tensors, float otherwise.
template <class T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
inline compute_t<T> load(T value) {
  if constexpr (std::is_same_v<T, double>) {
    return value;
  } else {
    return to_float(value);
  }
}

template <class T>
inline T store(compute_t<T> value) {
  if constexpr (std::is_same_v<T, double>) {
    return value;
  } else {
    return from_float<T>(value);
  }
}

}  // namespace moe

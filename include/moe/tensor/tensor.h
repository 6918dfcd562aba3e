// Tensor: a dtype, a shape and contiguous row-major storage (64-byte aligned) that the tensor
// owns or views. Views share ownership of the allocation, so a view never outlives its memory.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "moe/tensor/error.h"
#include "moe/tensor/half.h"

namespace moe {

enum class DType : uint8_t { F32, BF16, F16, F64, I32, I64 };

size_t dtype_size(DType dtype);
std::string_view dtype_name(DType dtype);
// Parses "fp32"/"float32", "bf16"/"bfloat16", "fp16"/"float16", "fp64", "int32", "int64".
DType parse_dtype(std::string_view name);

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::F32;
}
template <>
constexpr DType dtype_of<bf16>() {
  return DType::BF16;
}
template <>
constexpr DType dtype_of<f16>() {
  return DType::F16;
}
template <>
constexpr DType dtype_of<double>() {
  return DType::F64;
}
template <>
constexpr DType dtype_of<int32_t>() {
  return DType::I32;
}
template <>
constexpr DType dtype_of<int64_t>() {
  return DType::I64;
}

using Shape = std::vector<int64_t>;
std::string shape_string(const Shape& shape);  // "[4, 17]"
int64_t shape_numel(const Shape& shape);

constexpr size_t kTensorAlignment = 64;

// Large tensor storage (kCachedStorageMinBytes and up) gets its own anonymous mapping, and a
// freed one is kept for the next tensor of its size class instead of being unmapped: a fresh
// mapping is faulted in page by page on first touch, which for a layer's 100 MiB activations costs
// more than the elementwise work on them. Size classes round a request up to an eighth of the
// largest power of two not above it (pages never touched never become resident), so sizes that
// differ a little from step to step share blocks. When no kept block fits, the oldest kept blocks
// are unmapped, as many bytes as the new mapping takes, so kept plus live storage never exceeds
// the most live storage there has been; kept blocks beyond the limit are unmapped too, oldest
// first. Thread-safe.
constexpr size_t kCachedStorageMinBytes = size_t(1) << 20;
struct TensorCacheStats {
  size_t cached_bytes = 0;  // freed blocks kept for reuse
  size_t limit_bytes = 0;
  int64_t reused = 0;  // large allocations served from the cache (since the process started)
  int64_t mapped = 0;  // large allocations that needed a new mapping
};
TensorCacheStats tensor_cache_stats();
// The most bytes of freed blocks kept (2 GiB to start with); lowering it unmaps the excess now.
void set_tensor_cache_limit(size_t bytes);
// Unmaps every kept block (e.g. before measuring memory); the limit stays.
void release_tensor_cache();

// Bytes of tensor storage (owned allocations, as requested; views and kept cache blocks not
// counted) alive now, and the most alive at once since the last reset_tensor_peak_bytes: what
// activation-memory accounting reads (e.g. a step's peak minus what was alive before it).
struct TensorMemoryStats {
  size_t live_bytes = 0;
  size_t peak_live_bytes = 0;
};
TensorMemoryStats tensor_memory_stats();
// Starts a new peak from the bytes alive now.
void reset_tensor_peak_bytes();

class Tensor {
 public:
  Tensor() = default;  // an undefined tensor: defined() is false
  // Owned, zero-filled storage.
  Tensor(Shape shape, DType dtype = DType::F32);
  // Owned storage left uninitialised (for outputs that are fully overwritten).
  static Tensor empty(Shape shape, DType dtype = DType::F32);
  static Tensor zeros(Shape shape, DType dtype = DType::F32) {
    return Tensor(std::move(shape), dtype);
  }
  static Tensor full(Shape shape, float value, DType dtype = DType::F32);
  // Copies float values into a new tensor of the given dtype (rounded for bf16/fp16).
  static Tensor from_floats(const std::vector<float>& values, Shape shape,
                            DType dtype = DType::F32);
  // A non-owning view of memory that the caller keeps alive.
  static Tensor view_of(void* data, Shape shape, DType dtype);

  bool defined() const { return defined_; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return int(shape_.size()); }
  int64_t dim(int axis) const;  // negative axes count from the end
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return size_t(numel_) * dtype_size(dtype_); }

  void* raw() { return data_; }
  const void* raw() const { return data_; }
  template <class T>
  T* data() {
    check_element_type(dtype_of<T>());
    return static_cast<T*>(data_);
  }
  template <class T>
  const T* data() const {
    check_element_type(dtype_of<T>());
    return static_cast<const T*>(data_);
  }

  // Element access through fp32, for tests and small bookkeeping (not for hot loops).
  float get(int64_t flat_index) const;
  void set(int64_t flat_index, float value);
  std::vector<float> to_floats() const;

  // Views sharing this tensor's storage.
  Tensor reshape(Shape shape) const;              // same numel; one dim may be -1
  Tensor rows(int64_t begin, int64_t end) const;  // rows [begin, end) of dim 0
  Tensor flatten_rows() const;                    // [prod(all but last), last]

  // New storage.
  Tensor clone() const;
  Tensor to(DType dtype) const;          // converted copy (a clone when the dtype is the same)
  void copy_from(const Tensor& source);  // same shape; converts dtype if they differ

  void zero();
  void fill(float value);

 private:
  void check_element_type(DType requested) const;
  // Owned storage; zero-filled when zero_filled (memory fresh from the system already is).
  static Tensor allocated(Shape shape, DType dtype, bool zero_filled);

  std::shared_ptr<void> owner_;  // keeps the allocation alive; null for foreign views
  void* data_ = nullptr;
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::F32;
  bool defined_ = false;
};

// Boundary checks. `what` names the argument in the message ("fc1 weight").
void check_shape(const Tensor& tensor, const Shape& expected, std::string_view what);
void check_dtype(const Tensor& tensor, DType expected, std::string_view what);
void check_same_shape(const Tensor& a, const Tensor& b, std::string_view what);
void check_ndim(const Tensor& tensor, int ndim, std::string_view what);

}  // namespace moe

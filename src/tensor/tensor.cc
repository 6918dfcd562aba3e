#include "moe/tensor/tensor.h"

#include <sys/mman.h>

#include <atomic>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>

namespace moe {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return 4;
    case DType::BF16:
      return 2;
    case DType::F16:
      return 2;
    case DType::F64:
      return 8;
    case DType::I32:
      return 4;
    case DType::I64:
      return 8;
  }
  throw Error(detail::concat("unknown dtype code ", int(dtype)));
}

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return "fp32";
    case DType::BF16:
      return "bf16";
    case DType::F16:
      return "fp16";
    case DType::F64:
      return "fp64";
    case DType::I32:
      return "int32";
    case DType::I64:
      return "int64";
  }
  return "unknown";
}

DType parse_dtype(std::string_view name) {
  if (name == "fp32" || name == "float32") return DType::F32;
  if (name == "bf16" || name == "bfloat16") return DType::BF16;
  if (name == "fp16" || name == "float16") return DType::F16;
  if (name == "fp64" || name == "float64") return DType::F64;
  if (name == "int32") return DType::I32;
  if (name == "int64") return DType::I64;
  throw Error(detail::concat("unknown dtype '", name,
                             "' (expected fp32, bf16, fp16, fp64, int32 or int64)"));
}

std::string shape_string(const Shape& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

int64_t shape_numel(const Shape& shape) {
  int64_t count = 1;
  for (int64_t extent : shape) {
    MOE_CHECK(extent >= 0, "negative dimension in shape ", shape_string(shape));
    count *= extent;
  }
  return count;
}

namespace {

// Freed large blocks by size class, oldest first (see kCachedStorageMinBytes in tensor.h).
class StorageCache {
 public:
  struct Block {
    void* memory = nullptr;
    size_t bytes = 0;  // the size class: the mapping's length
  };

  // A block of `bytes` (a size class): a kept one (fresh = false) or a new zero-filled mapping.
  // Before mapping, the oldest kept blocks are unmapped until as many bytes go as come: kept
  // plus live storage then never exceeds the most live storage there has been.
  Block take(size_t bytes, bool& fresh) {
    std::vector<Block> evicted;
    {
      std::lock_guard lock(mutex_);
      for (auto it = kept_.rbegin(); it != kept_.rend(); ++it) {  // the most recently freed
        if (it->bytes != bytes) continue;
        Block block = *it;
        kept_.erase(std::next(it).base());
        kept_bytes_ -= bytes;
        ++reused_;
        fresh = false;
        return block;
      }
      evict_oldest(kept_bytes_ > bytes ? kept_bytes_ - bytes : 0, evicted);
    }
    unmap(evicted);
    fresh = true;
    void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    MOE_CHECK(memory != MAP_FAILED, "out of memory mapping ", bytes, " bytes for a tensor");
    std::lock_guard lock(mutex_);
    ++mapped_;
    return {memory, bytes};
  }

  // Runs in a storage deleter, so it must not throw: a block it cannot keep goes back to the
  // system, and a failed eviction leaves the cache over its limit until the next call.
  void give(Block block) noexcept {
    std::vector<Block> evicted;
    try {
      std::lock_guard lock(mutex_);
      kept_.push_back(block);
      kept_bytes_ += block.bytes;
      try {
        evict_oldest(limit_, evicted);
      } catch (...) {
      }
    } catch (...) {
      munmap(block.memory, block.bytes);
      return;
    }
    unmap(evicted);
  }

  void set_limit(size_t bytes) {
    std::vector<Block> evicted;
    {
      std::lock_guard lock(mutex_);
      limit_ = bytes;
      evict_oldest(limit_, evicted);
    }
    unmap(evicted);
  }

  void release() {
    std::vector<Block> evicted;
    {
      std::lock_guard lock(mutex_);
      evicted.swap(kept_);
      kept_bytes_ = 0;
    }
    unmap(evicted);
  }

  TensorCacheStats stats() {
    std::lock_guard lock(mutex_);
    return {kept_bytes_, limit_, reused_, mapped_};
  }

 private:
  // Moves the oldest kept blocks to `evicted` until at most `keep_bytes` stay kept.
  // Changes nothing when it throws (only the copy into `evicted` can).
  void evict_oldest(size_t keep_bytes, std::vector<Block>& evicted) {
    size_t count = 0, bytes = kept_bytes_;
    while (bytes > keep_bytes) bytes -= kept_[count++].bytes;
    evicted.assign(kept_.begin(), kept_.begin() + std::ptrdiff_t(count));
    kept_.erase(kept_.begin(), kept_.begin() + std::ptrdiff_t(count));
    kept_bytes_ = bytes;
  }
  static void unmap(const std::vector<Block>& blocks) {
    for (const Block& block : blocks) munmap(block.memory, block.bytes);
  }

  std::mutex mutex_;
  std::vector<Block> kept_;  // oldest first
  size_t kept_bytes_ = 0;
  size_t limit_ = size_t(2) << 30;
  int64_t reused_ = 0, mapped_ = 0;
};

// Never destroyed: tensors held by other static objects may be freed after it would have been.
StorageCache& storage_cache() {
  static StorageCache* cache = new StorageCache;
  return *cache;
}

// Rounds up to an eighth of the largest power of two not above `bytes` (a page multiple, since
// bytes >= kCachedStorageMinBytes).
size_t size_class(size_t bytes) {
  size_t step = std::bit_floor(bytes) / 8;
  return (bytes + step - 1) / step * step;
}

std::atomic<size_t> live_storage_bytes{0}, peak_storage_bytes{0};

void count_allocation(size_t bytes) {
  const size_t live = live_storage_bytes.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  size_t peak = peak_storage_bytes.load(std::memory_order_relaxed);
  while (live > peak && !peak_storage_bytes.compare_exchange_weak(peak, live)) {
  }
}

// Storage for `bytes`; `fresh` tells whether it is known to be zero-filled.
std::shared_ptr<void> allocate(size_t bytes, bool& fresh) {
  fresh = false;
  if (bytes >= kCachedStorageMinBytes) {
    StorageCache::Block block = storage_cache().take(size_class(bytes), fresh);
    count_allocation(bytes);
    return std::shared_ptr<void>(block.memory, [block, bytes](void*) {
      live_storage_bytes.fetch_sub(bytes, std::memory_order_relaxed);
      storage_cache().give(block);
    });
  }
  size_t rounded = (bytes + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
  if (rounded == 0) return nullptr;
  void* memory = std::aligned_alloc(kTensorAlignment, rounded);
  MOE_CHECK(memory != nullptr, "out of memory allocating ", bytes, " bytes");
  count_allocation(bytes);
  return std::shared_ptr<void>(memory, [bytes](void* block) {
    live_storage_bytes.fetch_sub(bytes, std::memory_order_relaxed);
    std::free(block);
  });
}

}  // namespace

TensorMemoryStats tensor_memory_stats() {
  return {live_storage_bytes.load(), peak_storage_bytes.load()};
}

void reset_tensor_peak_bytes() {
  peak_storage_bytes.store(live_storage_bytes.load());
}

TensorCacheStats tensor_cache_stats() {
  return storage_cache().stats();
}

void set_tensor_cache_limit(size_t bytes) {
  storage_cache().set_limit(bytes);
}

void release_tensor_cache() {
  storage_cache().release();
}

Tensor Tensor::allocated(Shape shape, DType dtype, bool zero_filled) {
  Tensor tensor;
  tensor.numel_ = shape_numel(shape);
  tensor.shape_ = std::move(shape);
  tensor.dtype_ = dtype;
  bool fresh = false;
  tensor.owner_ = allocate(tensor.nbytes(), fresh);
  tensor.data_ = tensor.owner_.get();
  tensor.defined_ = true;
  if (zero_filled && !fresh) tensor.zero();
  return tensor;
}

Tensor Tensor::empty(Shape shape, DType dtype) {
  return allocated(std::move(shape), dtype, false);
}

Tensor::Tensor(Shape shape, DType dtype) : Tensor(allocated(std::move(shape), dtype, true)) {}

Tensor Tensor::full(Shape shape, float value, DType dtype) {
  Tensor tensor = empty(std::move(shape), dtype);
  tensor.fill(value);
  return tensor;
}

Tensor Tensor::from_floats(const std::vector<float>& values, Shape shape, DType dtype) {
  Tensor tensor = empty(std::move(shape), dtype);
  MOE_CHECK(int64_t(values.size()) == tensor.numel(), "from_floats: ", values.size(),
            " values do not fill shape ", shape_string(tensor.shape()));
  for (int64_t i = 0; i < tensor.numel(); ++i) tensor.set(i, values[i]);
  return tensor;
}

Tensor Tensor::view_of(void* data, Shape shape, DType dtype) {
  Tensor tensor;
  tensor.numel_ = shape_numel(shape);
  MOE_CHECK(data != nullptr || tensor.numel_ == 0, "view_of: null data for shape ",
            shape_string(shape));
  tensor.shape_ = std::move(shape);
  tensor.dtype_ = dtype;
  tensor.data_ = data;
  tensor.defined_ = true;
  return tensor;
}

int64_t Tensor::dim(int axis) const {
  int rank = ndim();
  int resolved = axis < 0 ? axis + rank : axis;
  MOE_CHECK(resolved >= 0 && resolved < rank, "axis ", axis, " out of range for shape ",
            shape_string(shape_));
  return shape_[resolved];
}

void Tensor::check_element_type(DType requested) const {
  MOE_CHECK(defined_, "access to an undefined tensor");
  MOE_CHECK(requested == dtype_, "tensor of shape ", shape_string(shape_), " holds ",
            dtype_name(dtype_), ", accessed as ", dtype_name(requested));
}

float Tensor::get(int64_t i) const {
  MOE_CHECK(i >= 0 && i < numel_, "index ", i, " out of range for shape ", shape_string(shape_));
  switch (dtype_) {
    case DType::F32:
      return static_cast<const float*>(data_)[i];
    case DType::BF16:
      return to_float(static_cast<const bf16*>(data_)[i]);
    case DType::F16:
      return to_float(static_cast<const f16*>(data_)[i]);
    case DType::F64:
      return float(static_cast<const double*>(data_)[i]);
    case DType::I32:
      return float(static_cast<const int32_t*>(data_)[i]);
    case DType::I64:
      return float(static_cast<const int64_t*>(data_)[i]);
  }
  return 0;
}

void Tensor::set(int64_t i, float value) {
  MOE_CHECK(i >= 0 && i < numel_, "index ", i, " out of range for shape ", shape_string(shape_));
  switch (dtype_) {
    case DType::F32:
      static_cast<float*>(data_)[i] = value;
      break;
    case DType::BF16:
      static_cast<bf16*>(data_)[i] = float_to_bf16(value);
      break;
    case DType::F16:
      static_cast<f16*>(data_)[i] = float_to_f16(value);
      break;
    case DType::F64:
      static_cast<double*>(data_)[i] = value;
      break;
    case DType::I32:
      static_cast<int32_t*>(data_)[i] = int32_t(value);
      break;
    case DType::I64:
      static_cast<int64_t*>(data_)[i] = int64_t(value);
      break;
  }
}

std::vector<float> Tensor::to_floats() const {
  std::vector<float> values(static_cast<size_t>(numel_));
  for (int64_t i = 0; i < numel_; ++i) values[i] = get(i);
  return values;
}

Tensor Tensor::reshape(Shape shape) const {
  MOE_CHECK(defined_, "reshape of an undefined tensor");
  int inferred = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      MOE_CHECK(inferred < 0, "reshape ", shape_string(shape), ": more than one -1");
      inferred = int(i);
    } else {
      known *= shape[i];
    }
  }
  if (inferred >= 0) {
    MOE_CHECK(known > 0 && numel_ % known == 0, "cannot reshape ", shape_string(shape_), " to ",
              shape_string(shape));
    shape[inferred] = numel_ / known;
  }
  MOE_CHECK(shape_numel(shape) == numel_, "cannot reshape ", shape_string(shape_), " (", numel_,
            " elements) to ", shape_string(shape));
  Tensor view = *this;
  view.shape_ = std::move(shape);
  return view;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  MOE_CHECK(ndim() >= 1, "rows() of a scalar tensor");
  MOE_CHECK(0 <= begin && begin <= end && end <= shape_[0], "rows [", begin, ", ", end,
            ") out of range for shape ", shape_string(shape_));
  Tensor view = *this;
  int64_t row_elements = shape_[0] == 0 ? 0 : numel_ / shape_[0];
  view.shape_[0] = end - begin;
  view.numel_ = (end - begin) * row_elements;
  view.data_ = static_cast<char*>(data_) + size_t(begin * row_elements) * dtype_size(dtype_);
  return view;
}

Tensor Tensor::flatten_rows() const {
  MOE_CHECK(ndim() >= 1, "flatten_rows() of a scalar tensor");
  return reshape({-1, shape_.back()});
}

Tensor Tensor::clone() const {
  return to(dtype_);
}

Tensor Tensor::to(DType dtype) const {
  Tensor result = empty(shape_, dtype);
  result.copy_from(*this);
  return result;
}

void Tensor::copy_from(const Tensor& source) {
  MOE_CHECK(source.shape_ == shape_, "copy_from: source shape ", shape_string(source.shape_),
            " differs from target shape ", shape_string(shape_));
  if (numel_ == 0) return;
  if (source.dtype_ == dtype_) {
    std::memmove(data_, source.data_, nbytes());
    return;
  }
  size_t count = size_t(numel_);
  if (source.dtype_ == DType::F32 && dtype_ == DType::BF16) {
    convert_from_float(source.data<float>(), data<bf16>(), count);
  } else if (source.dtype_ == DType::F32 && dtype_ == DType::F16) {
    convert_from_float(source.data<float>(), data<f16>(), count);
  } else if (source.dtype_ == DType::BF16 && dtype_ == DType::F32) {
    convert_to_float(source.data<bf16>(), data<float>(), count);
  } else if (source.dtype_ == DType::F16 && dtype_ == DType::F32) {
    convert_to_float(source.data<f16>(), data<float>(), count);
  } else if (source.dtype_ == DType::F64 && dtype_ == DType::F32) {
    const double* from = source.data<double>();
    float* into = data<float>();
    for (size_t i = 0; i < count; ++i) into[i] = float(from[i]);
  } else if (source.dtype_ == DType::F32 && dtype_ == DType::F64) {
    const float* from = source.data<float>();
    double* into = data<double>();
    for (size_t i = 0; i < count; ++i) into[i] = from[i];
  } else {
    for (int64_t i = 0; i < numel_; ++i) set(i, source.get(i));
  }
}

void Tensor::zero() {
  if (numel_ > 0) std::memset(data_, 0, nbytes());
}

void Tensor::fill(float value) {
  for (int64_t i = 0; i < numel_; ++i) set(i, value);
}

void check_shape(const Tensor& tensor, const Shape& expected, std::string_view what) {
  MOE_CHECK(tensor.defined(), what, ": tensor is undefined, expected shape ",
            shape_string(expected));
  MOE_CHECK(tensor.shape() == expected, what, ": expected shape ", shape_string(expected), ", got ",
            shape_string(tensor.shape()));
}

void check_dtype(const Tensor& tensor, DType expected, std::string_view what) {
  MOE_CHECK(tensor.dtype() == expected, what, ": expected dtype ", dtype_name(expected), ", got ",
            dtype_name(tensor.dtype()), " (shape ", shape_string(tensor.shape()), ")");
}

void check_same_shape(const Tensor& a, const Tensor& b, std::string_view what) {
  MOE_CHECK(a.shape() == b.shape(), what, ": shapes differ, ", shape_string(a.shape()), " vs ",
            shape_string(b.shape()));
}

void check_ndim(const Tensor& tensor, int ndim, std::string_view what) {
  MOE_CHECK(tensor.ndim() == ndim, what, ": expected a ", ndim, "-d tensor, got shape ",
            shape_string(tensor.shape()));
}

}  // namespace moe

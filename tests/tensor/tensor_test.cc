#include <cmath>
#include <limits>

#include "moe/tensor/tensor.h"
#include "moe/tensor/threads.h"
#include "support/testing.h"

namespace moe {
namespace {

TEST(Tensor, OwnsAlignedZeroedStorage) {
  Tensor t({3, 5}, DType::BF16);
  EXPECT_EQ(t.numel(), 15);
  EXPECT_EQ(t.nbytes(), 30u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % kTensorAlignment, 0u);
  for (int64_t i = 0; i < t.numel(); ++i) EXPECT_EQ(t.get(i), 0.0f);
}

TEST(Tensor, ZeroSizedTensorIsDefined) {
  Tensor t({0, 7});
  EXPECT_TRUE(t.defined());
  EXPECT_EQ(t.numel(), 0);
  EXPECT_EQ(t.rows(0, 0).numel(), 0);
}

TEST(Tensor, RowsViewSharesStorage) {
  Tensor t = Tensor::from_floats({1, 2, 3, 4, 5, 6}, {3, 2});
  Tensor middle = t.rows(1, 2);
  middle.set(0, 42.0f);
  EXPECT_EQ(t.get(2), 42.0f);
  EXPECT_EQ(middle.shape(), (Shape{1, 2}));
}

TEST(Tensor, ShapeMismatchMessageNamesBothShapes) {
  Tensor a({2, 3}), b({3, 2});
  try {
    check_same_shape(a, b, "adding a and b");
    FAIL() << "expected an exception";
  } catch (const Error& error) {
    EXPECT_STREQ(error.what(), "adding a and b: shapes differ, [2, 3] vs [3, 2]");
  }
  EXPECT_THROW(a.reshape({4, 2}), Error);
  EXPECT_THROW((void)a.data<bf16>(), Error);
}

TEST(Half, Bf16RoundsToNearestEvenAndKeepsNaN) {
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even mantissa (1.0).
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)).bits, float_to_bf16(1.0f).bits);
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8))),
            1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isinf(bf16_to_float(float_to_bf16(INFINITY))));
}

TEST(Half, F16FastAndPortableAgreeOnEveryBitPattern) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    f16 h{uint16_t(bits)};
    float fast = f16_to_float(h), portable = f16_to_float_portable(h);
    if (std::isnan(portable)) {
      ASSERT_TRUE(std::isnan(fast)) << bits;
      ASSERT_TRUE(std::isnan(f16_to_float(float_to_f16(portable))));
      continue;
    }
    ASSERT_EQ(fast, portable) << "bits " << bits;
    ASSERT_EQ(float_to_f16_portable(portable).bits, bits) << "round trip of " << portable;
  }
  // Rounding of values between halves, overflow and subnormals.
  Rng rng(7);
  for (int i = 0; i < 200000; ++i) {
    float value = std::ldexp(rng.uniform(-1.0f, 1.0f), int(rng.below(40)) - 26);
    ASSERT_EQ(float_to_f16(value).bits, float_to_f16_portable(value).bits) << value;
  }
  EXPECT_EQ(float_to_f16_portable(70000.0f).bits, 0x7c00);
  EXPECT_EQ(float_to_f16_portable(65519.0f).bits, 0x7bff);
}

TEST(Rng, SameSeedSameNumbersAndSaneMoments) {
  Rng a(123), b(123), c(124);
  double mean = 0, squares = 0;
  const int count = 100000;
  bool differs = false;
  for (int i = 0; i < count; ++i) {
    float x = a.normal();
    ASSERT_EQ(x, b.normal());
    differs |= x != c.normal();
    mean += x;
    squares += double(x) * x;
  }
  EXPECT_TRUE(differs);
  mean /= count;
  EXPECT_NEAR(mean, 0.0, 0.02);
  EXPECT_NEAR(squares / count - mean * mean, 1.0, 0.02);
  Rng::State saved = a.state();
  float next = a.uniform();
  a.set_state(saved);
  EXPECT_EQ(a.uniform(), next);
}

TEST(Tensor, ConversionsRoundTrip) {
  Tensor x = testing::random_normal({17, 5}, 3);
  Tensor back = x.to(DType::BF16).to(DType::F32);
  EXPECT_TENSORS_CLOSE(back, x, 0.0, 1.0 / 256);
  EXPECT_TENSORS_CLOSE(x.to(DType::F16).to(DType::F32), x, 1e-4, 1.0 / 2048);
  EXPECT_FALSE(testing::tensors_close(x.to(DType::BF16).to(DType::F32), x, 0.0, 1e-6));
}

// 2 MiB of fp32: large enough for the storage cache.
constexpr int64_t kCachedRows = 512, kRowFloats = 1024;

TEST(TensorStorageCache, FreedLargeBlockIsReusedAndZeroFilledWhenAskedFor) {
  release_tensor_cache();
  const TensorCacheStats before = tensor_cache_stats();
  EXPECT_EQ(before.cached_bytes, 0u);
  const void* first = nullptr;
  {
    Tensor t = Tensor::full({kCachedRows, kRowFloats}, 3.0f);
    first = t.raw();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % kTensorAlignment, 0u);
  }
  EXPECT_EQ(tensor_cache_stats().cached_bytes, size_t(2) << 20);
  // A slightly smaller request shares the size class (2 MiB rounds in steps of 256 KiB).
  Tensor again({kCachedRows - 12, kRowFloats});
  EXPECT_EQ(again.raw(), first);
  EXPECT_EQ(tensor_cache_stats().reused, before.reused + 1);
  EXPECT_EQ(tensor_cache_stats().mapped, before.mapped + 1);
  EXPECT_EQ(tensor_cache_stats().cached_bytes, 0u);
  for (int64_t i = 0; i < again.numel(); i += 1021) ASSERT_EQ(again.get(i), 0.0f) << i;
  EXPECT_EQ(again.get(again.numel() - 1), 0.0f);
}

TEST(TensorStorageCache, AMissUnmapsTheOldestKeptBlocksAsManyBytesAsItMaps) {
  release_tensor_cache();
  const void* newest = nullptr;
  {
    Tensor a = Tensor::empty({kCachedRows, kRowFloats});
    Tensor b = Tensor::empty({kCachedRows, kRowFloats});
    Tensor c = Tensor::empty({2 * kCachedRows, kRowFloats});
    newest = c.raw();
    a = Tensor();
    b = Tensor();
  }  // kept, oldest first: a (2 MiB), b (2 MiB), c (4 MiB)
  EXPECT_EQ(tensor_cache_stats().cached_bytes, size_t(8) << 20);
  {
    // 2.5 MiB is a size class of its own: a and b go, so kept plus live stays at 8 MiB or less.
    Tensor other = Tensor::empty({kCachedRows + kCachedRows / 4, kRowFloats});
    EXPECT_EQ(tensor_cache_stats().cached_bytes, size_t(4) << 20);
    EXPECT_EQ(Tensor::empty({2 * kCachedRows, kRowFloats}).raw(), newest);
  }
  { Tensor small({kCachedStorageMinBytes / 4 - 1}); }  // just under the cached size
  EXPECT_EQ(tensor_cache_stats().cached_bytes, (size_t(13) << 20) / 2);
  release_tensor_cache();
  EXPECT_EQ(tensor_cache_stats().cached_bytes, 0u);
}

TEST(TensorStorageCache, LimitUnmapsTheOldestBlocksFirst) {
  release_tensor_cache();
  const size_t limit = tensor_cache_stats().limit_bytes;
  set_tensor_cache_limit(size_t(3) << 20);  // room for one 2 MiB block
  const void* older = Tensor::empty({kCachedRows, kRowFloats}).raw();
  {
    Tensor held = Tensor::empty({kCachedRows, kRowFloats});  // takes the kept block
    EXPECT_EQ(held.raw(), older);
    Tensor other = Tensor::empty({kCachedRows, kRowFloats});
  }  // `other` is freed first, then `held`: the older entry, `other`, goes over the limit
  EXPECT_EQ(tensor_cache_stats().cached_bytes, size_t(2) << 20);
  EXPECT_EQ(Tensor::empty({kCachedRows, kRowFloats}).raw(), older);
  set_tensor_cache_limit(0);
  EXPECT_EQ(tensor_cache_stats().cached_bytes, 0u);
  { Tensor dropped = Tensor::empty({kCachedRows, kRowFloats}); }
  EXPECT_EQ(tensor_cache_stats().cached_bytes, 0u);
  set_tensor_cache_limit(limit);
  EXPECT_EQ(tensor_cache_stats().limit_bytes, limit);
}

TEST(TensorStorageCache, ConcurrentAllocationsGetDistinctBlocks) {
  release_tensor_cache();
  constexpr int kThreads = 4, kRounds = 20;
  bool overlapping = false;
#pragma omp parallel for num_threads(kThreads) schedule(static, 1) reduction(|| : overlapping)
  for (int thread = 0; thread < kThreads; ++thread) {
    for (int round = 0; round < kRounds; ++round) {
      Tensor t = Tensor::full({kCachedRows, kRowFloats}, float(thread));
      // Another thread writing into the same block would change these.
      for (int64_t i = 0; i < t.numel(); i += 4093) overlapping |= t.get(i) != float(thread);
    }
  }
  EXPECT_FALSE(overlapping);
  EXPECT_LE(tensor_cache_stats().cached_bytes, size_t(kThreads) * (size_t(2) << 20));
  release_tensor_cache();
}

TEST(Threads, SetNumThreadsIsReadBackAndRejectsZero) {
  int saved = num_threads();
  set_num_threads(1);
  EXPECT_EQ(num_threads(), 1);
  set_num_threads(3);
  EXPECT_EQ(num_threads(), 3);
  try {
    set_num_threads(0);
    FAIL() << "expected an exception";
  } catch (const Error& error) {
    EXPECT_STREQ(error.what(), "set_num_threads: thread count must be at least 1, got 0");
  }
  EXPECT_EQ(num_threads(), 3);
  set_num_threads(saved);
}

}  // namespace
}  // namespace moe

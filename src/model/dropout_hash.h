// Dropout's keep decision, shared by apply_dropout and the attention kernels so that both draw
// the same mask for the same (key, element index): keep an element when a 24-bit uniform from
// hash(key, index) is >= p.
#pragma once

#include <cstdint>

namespace moe::model {

inline uint64_t mix64(uint64_t value) {  // splitmix64's finaliser: a bijective 64-bit hash
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

inline uint32_t dropout_threshold(float p) {
  return uint32_t(double(p) * double(1u << 24));
}

inline bool dropout_keeps(uint64_t key, int64_t index, uint32_t threshold) {
  return uint32_t(mix64(key ^ mix64(uint64_t(index))) >> 40) >= threshold;
}

}  // namespace moe::model

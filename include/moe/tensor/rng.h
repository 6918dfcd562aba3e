// Deterministic random numbers: the same seed gives the same sequence on every rank, run and
// thread count. xoshiro256** seeded through splitmix64; normals by Box-Muller. The state is four
// words, so checkpoints can save and restore it exactly.
#pragma once

#include <array>
#include <cstdint>

#include "moe/tensor/tensor.h"

namespace moe {

class Rng {
 public:
  using State = std::array<uint64_t, 4>;

  explicit Rng(uint64_t seed = 0);
  // An independent generator for a named purpose (layer, rank, ...), derived from this seed.
  static Rng derived(uint64_t seed, uint64_t stream);

  uint64_t next_u64();
  float uniform();                       // [0, 1)
  float uniform(float low, float high);  // [low, high)
  float normal();                        // mean 0, std 1
  uint64_t below(uint64_t bound);        // [0, bound), unbiased

  // Fill any floating tensor (converted to its dtype).
  void fill_normal(Tensor& tensor, float mean, float std);
  void fill_uniform(Tensor& tensor, float low, float high);

  State state() const { return state_; }
  void set_state(const State& state) { state_ = state; }

 private:
  State state_{};
};

}  // namespace moe

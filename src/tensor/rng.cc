#include "moe/tensor/rng.h"

#include <cmath>

namespace moe {

namespace {
uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
uint64_t rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}
}  // namespace

Rng::Rng(uint64_t seed) {
  uint64_t mixer = seed;
  for (uint64_t& word : state_) word = splitmix64(mixer);
}

Rng Rng::derived(uint64_t seed, uint64_t stream) {
  uint64_t mixer = seed ^ (stream * 0xd1342543de82ef95ull + 0x2545f4914f6cdd1dull);
  return Rng(splitmix64(mixer));
}

uint64_t Rng::next_u64() {
  uint64_t result = rotl(state_[1] * 5, 7) * 9;
  uint64_t t = state_[1] << 17;
  state_[2] ^= state_[0];
  state_[3] ^= state_[1];
  state_[1] ^= state_[2];
  state_[0] ^= state_[3];
  state_[2] ^= t;
  state_[3] = rotl(state_[3], 45);
  return result;
}

float Rng::uniform() {
  return float(next_u64() >> 40) * (1.0f / 16777216.0f);
}

float Rng::uniform(float low, float high) {
  return low + (high - low) * uniform();
}

float Rng::normal() {
  // Box-Muller with the first uniform kept away from 0 so log() stays finite.
  double u1 = (double(next_u64() >> 11) + 1.0) * (1.0 / 9007199254740992.0);
  double u2 = double(next_u64() >> 11) * (1.0 / 9007199254740992.0);
  return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

uint64_t Rng::below(uint64_t bound) {
  MOE_CHECK(bound > 0, "Rng::below: bound must be positive");
  uint64_t limit = ~uint64_t(0) - (~uint64_t(0) % bound);
  uint64_t value;
  do value = next_u64();
  while (value >= limit);
  return value % bound;
}

void Rng::fill_normal(Tensor& tensor, float mean, float std) {
  for (int64_t i = 0; i < tensor.numel(); ++i) tensor.set(i, mean + std * normal());
}

void Rng::fill_uniform(Tensor& tensor, float low, float high) {
  for (int64_t i = 0; i < tensor.numel(); ++i) tensor.set(i, uniform(low, high));
}

}  // namespace moe

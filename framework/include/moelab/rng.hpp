// Deterministic, counter-based random numbers: the same seed gives the same stream on every
// machine and every kernel, so runs repeat exactly and CPU/GPU results can be compared.
#pragma once

#include <cmath>
#include <cstdint>

namespace moelab {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0, uint64_t stream = 0) : seed_(mix(seed ^ mix(stream + 0x9e37))) {}

  uint64_t next_u64() { return mix(seed_ + 0x9e3779b97f4a7c15ULL * ++counter_); }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Standard normal (Box-Muller; one value per call, so the stream position is easy to reason about).
  double normal() {
    const double u1 = 1.0 - uniform();  // (0, 1]
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  // Uniform integer in [0, n).
  uint64_t below(uint64_t n) { return n == 0 ? 0 : next_u64() % n; }
  // An independent generator for a named purpose (layer i's router noise, data shuffling, ...).
  Rng fork(uint64_t stream) const { return Rng(seed_, stream); }
  uint64_t counter() const { return counter_; }
  void set_counter(uint64_t counter) { counter_ = counter; }  // for resume

 private:
  static uint64_t mix(uint64_t z) {  // splitmix64 finaliser
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  uint64_t seed_;
  uint64_t counter_ = 0;
};

}  // namespace moelab

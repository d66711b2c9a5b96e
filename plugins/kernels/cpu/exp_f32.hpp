// The cpu kernel's vectorisable f32 exponential, shared by its loops (cpu.cpp) and its attention
// (attention.cpp).
#pragma once

#include <bit>
#include <cstdint>

namespace moelab::cpu {

// exp(y) for y <= 0 (NaN passes through) in f32, without branches or calls so that loops over it
// vectorise; libm's expf is a call per element (~8.5 ns), as long as the expert GEMMs in total.
// Cody-Waite reduction y = n ln2 + r, |r| <= ln2/2, and Cephes' degree-7 minimax polynomial for
// e^r; 2^n is built from exponent bits in two halves so that results down to the smallest
// subnormal come out right. Measured against exp in double: relative error below 2^-22 (2.4e-7)
// for y >= -87.3 (normal results); subnormal results are within 2^-149 absolute.
[[gnu::always_inline]] inline float exp_nonpositive(float y) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2High = 0.693359375f;  // ln 2 = kLn2High + kLn2Low, kLn2High exact in 9 bits
  constexpr float kLn2Low = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;         // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLowest = -103.972084f;            // below it e^y rounds to 0 in f32
  const float clamped = y >= kLowest ? y : kLowest;  // NaN goes to kLowest here, restored below
  const float n = (clamped * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (clamped - n * kLn2High) - n * kLn2Low;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const auto exponent = static_cast<int32_t>(n);  // in [-150, 0]
  const int32_t half = exponent / 2;              // both halves >= -75: normal powers of two
  const float scale_a = std::bit_cast<float>((half + 127) << 23);
  const float scale_b = std::bit_cast<float>((exponent - half + 127) << 23);
  const float result = p * scale_a * scale_b;
  return y == y ? result : y;
}

}  // namespace moelab::cpu

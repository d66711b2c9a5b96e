// bf16 GEMMs on the cpu kernel: c (f32) = alpha op(a) op(b) + beta c with a and b in bf16. Every
// product is exact in f32 (a bf16 holds 8 significant bits, a product at most 16) and the sums are
// accumulated in f32: the mixed-precision GEMM of Megatron-Core and DeepSpeed (bf16 operands, f32
// accumulation), and what cuBLAS's CUBLAS_COMPUTE_32F_FAST_16BF does for f32 matrices.
//
// Two paths, with the same maths up to the order of the f32 sums:
//  - onednn: oneDNN's matmul primitive (its gemm:jit implementation; on AVX-512 BF16 `vdpbf16ps`,
//    twice the f32 FMA rate). One primitive per layout (transposes, leading dimensions, beta) with
//    every size given at run time, so a new group size costs no JIT. Each block of c is one
//    single-threaded call on the kernel's threads (threads.hpp), never on oneDNN's OpenMP pool,
//    whose busy-waiting workers would share the cores with OpenBLAS's (measured here: 35% off
//    both when they alternate).
//  - widen: bf16 widened to f32 (exactly) and OpenBLAS's sgemm, where oneDNN is not in the build or
//    has no fast bf16 GEMM on this CPU.
// c is cut into blocks that depend on the shape only (kBlockRows rows, or kBlockCols columns of a
// short c), each computed by one call over the whole of k: results do not depend on the thread
// count.
#pragma once

#include <bit>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moelab::cpu {

// bf16 as stored: the upper half of an f32. Round to nearest even; a NaN stays a (quiet) NaN.
inline uint16_t bf16_from_f32(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float f32_from_bf16(uint16_t h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
}

// Element loops, vectorised where the CPU has AVX-512.
void round_to_bf16(const float* src, uint16_t* dst, int64_t n);
void widen_bf16(const uint16_t* src, float* dst, int64_t n);

// One GEMM in row-major storage: op(a) is [m, k] (a stored [k, m] when trans_a), op(b) [k, n].
struct Bf16GemmCall {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  float alpha = 1.0f;
  const uint16_t* a = nullptr;
  int64_t lda = 0;
  const uint16_t* b = nullptr;
  int64_t ldb = 0;
  float beta = 0.0f;  // 0: c is only written, never read
  float* c = nullptr;
  int64_t ldc = 0;
};

enum class Bf16Path { onednn, widen };

class Bf16Gemm {
 public:
  // want_onednn = false takes the widen path even where oneDNN could run (the tests compare them).
  explicit Bf16Gemm(bool want_onednn);
  ~Bf16Gemm();
  Bf16Gemm(const Bf16Gemm&) = delete;
  Bf16Gemm& operator=(const Bf16Gemm&) = delete;

  Bf16Path path() const { return path_; }
  // What runs, for `moelab version` and the benchmarks: "oneDNN 2.6.3 gemm:jit, ISA avx512_core_bf16".
  const std::string& description() const { return description_; }

  // Computes every call (no two may write the same c) on up to `threads` threads.
  void run(int threads, const std::vector<Bf16GemmCall>& calls);

 private:
  struct OneDnn;
  void run_widened(const Bf16GemmCall& call);
  std::unique_ptr<OneDnn> onednn_;
  Bf16Path path_ = Bf16Path::widen;
  std::string description_;
};

}  // namespace moelab::cpu

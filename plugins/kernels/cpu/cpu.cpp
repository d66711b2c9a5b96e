// The reference kernel: every op of the Ops API on host memory, templated on the scalar type (f32
// and f64, so that gradient checks run in double). GEMMs go to OpenBLAS; causal attention in f32
// runs in flash-attention-style tiles on OpenBLAS (attention.hpp; f64 keeps the Ops base's
// reference loops, which the tiles are tested against); everything else is a plain loop over
// contiguous rows. Every other kernel is checked against this one, so exactness
// comes first: stable formulas, row sums accumulated in double, inputs validated before anything
// is written.
#include <cblas.h>
#include <fmt/format.h>
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention.hpp"
#include "bf16_gemm.hpp"
#include "exp_f32.hpp"
#include "moelab/plugin.hpp"
#include "threads.hpp"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

namespace moelab {
namespace {

using cpu::blas_groups;
using cpu::exp_nonpositive;
using cpu::parallel_chunks;
using cpu::run_shares;

// --- operand checks ---------------------------------------------------------------------------

enum class Role {
  scalar,  // f32 or f64, the same dtype for every scalar operand of the op
  index,   // i32
  any,     // checked by the op itself (memory ops)
};

struct Operand {
  const char* name = nullptr;
  const Tensor* tensor = nullptr;
  Role role = Role::scalar;
};

// The operands of one op call. Checks that they are defined host tensors of the right dtypes and
// throws RuntimeError naming the op and every operand's shape when something does not fit.
// Messages are only formatted on failure, so a check costs a few comparisons.
class OpCheck {
 public:
  OpCheck(const char* op, std::initializer_list<Operand> operands) : op_(op) {
    for (const Operand& operand : operands) {
      if (operand.tensor == nullptr) continue;  // an optional operand left out
      if (count_ == operands_.size()) fail("internal error: too many operands to check");
      operands_[count_++] = operand;
    }
    bool have_scalar = false;
    const Operand* first_scalar = nullptr;
    for (size_t i = 0; i < count_; ++i) {
      const Operand& o = operands_[i];
      const Tensor& t = *o.tensor;
      if (!t.defined()) fail(fmt::format("{} is an undefined tensor", o.name));
      if (t.device() != DeviceKind::cpu)
        fail(fmt::format("{} is {}; the cpu kernel works on host tensors only", o.name, t.describe()));
      if (o.role == Role::index && t.dtype() != DType::i32)
        fail(fmt::format("{} has dtype {}, expected i32 indices", o.name, dtype_name(t.dtype())));
      if (o.role != Role::scalar) continue;
      if (!have_scalar) {
        have_scalar = true;
        first_scalar = &o;
        dtype_ = t.dtype();
        if (dtype_ == DType::bf16)
          fail(
              fmt::format("{} is bf16, which this op does not take (it computes in f32 and f64; bf16 goes to cast, "
                          "the memory ops and the GEMMs' inputs)",
                          o.name));
        if (dtype_ != DType::f32 && dtype_ != DType::f64)
          fail(fmt::format("{} has dtype {}, expected f32 or f64", o.name, dtype_name(dtype_)));
      } else if (t.dtype() != dtype_) {
        fail(fmt::format("dtypes differ: {} is {} but {} is {}", first_scalar->name, dtype_name(dtype_), o.name,
                         dtype_name(t.dtype())));
      }
    }
  }

  DType dtype() const { return dtype_; }

  void shape(const Tensor& t, const char* name, const Shape& expected) const {
    if (t.shape() != expected)
      fail(fmt::format("{} has shape {}, expected {}", name, shape_str(t.shape()), shape_str(expected)));
  }
  void rank(const Tensor& t, const char* name, int expected) const {
    if (t.rank() != expected)
      fail(fmt::format("{} has rank {} (shape {}), expected rank {}", name, t.rank(), shape_str(t.shape()), expected));
  }
  template <class... Args>
  void require(bool ok, fmt::format_string<Args...> format, Args&&... args) const {
    if (!ok) fail(fmt::format(format, std::forward<Args>(args)...));
  }
  // BLAS takes int sizes.
  blasint blas_size(int64_t value, const char* what) const {
    require(value >= 0 && value <= INT_MAX, "{} = {} does not fit OpenBLAS's 32-bit sizes", what, value);
    return static_cast<blasint>(value);
  }

  [[noreturn]] void fail(const std::string& problem) const {
    std::string operands;
    for (size_t i = 0; i < count_; ++i) {
      const Tensor& t = *operands_[i].tensor;
      operands += fmt::format(
          "{}{} {}", i ? ", " : "", operands_[i].name,
          t.defined() ? fmt::format("{}{}", dtype_name(t.dtype()), shape_str(t.shape())) : std::string("undefined"));
    }
    throw RuntimeError(fmt::format("cpu kernel: {}: {} ({})", op_, problem, operands));
  }

 private:
  const char* op_;
  std::array<Operand, 10> operands_{};
  size_t count_ = 0;
  DType dtype_ = DType::f32;
};

// Calls f.template operator()<T>() with T the C++ type of a checked scalar dtype.
template <class F>
void with_scalar(DType dtype, F&& f) {
  if (dtype == DType::f64)
    f.template operator()<double>();
  else
    f.template operator()<float>();
}

// --- scalar functions -------------------------------------------------------------------------

// 1 / (1 + exp(-x)) without overflow: exp only ever sees -|x|. The f64 version (gradient checks)
// calls libm; the f32 version below is the hot path of SiLU/GELU experts.
template <class T>
[[gnu::always_inline]] inline T stable_sigmoid(T x) {
  const T e = std::exp(-std::abs(x));
  return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

template <>
[[gnu::always_inline]] inline float stable_sigmoid<float>(float x) {
  const float e = exp_nonpositive(-std::abs(x));
  const float numerator = x >= 0.0f ? 1.0f : e;  // a select, not a branch: the loop vectorises
  return numerator / (1.0f + e);
}

// log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)): no overflow for large x, no loss for small.
template <class T>
T stable_softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

template <class T>
struct ValueAndDerivative {
  T value;
  T derivative;
};

// Each activation: value(x), and value_and_derivative(x) for backward passes (GLU needs both).
struct Identity {
  template <class T>
  [[gnu::always_inline]] static T value(T x) {
    return x;
  }
  template <class T>
  [[gnu::always_inline]] static ValueAndDerivative<T> value_and_derivative(T x) {
    return {x, T(1)};
  }
};

struct Relu {
  template <class T>
  [[gnu::always_inline]] static T value(T x) {
    return x > T(0) ? x : T(0);
  }
  // The derivative at 0 is taken as 0, as in PyTorch.
  template <class T>
  [[gnu::always_inline]] static ValueAndDerivative<T> value_and_derivative(T x) {
    return x > T(0) ? ValueAndDerivative<T>{x, T(1)} : ValueAndDerivative<T>{T(0), T(0)};
  }
};

// 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), evaluated as x * sigmoid(2u): the same
// function (1 + tanh(u) = 2 sigmoid(2u)) without the cancellation of 1 + tanh(u) for x << 0.
struct GeluTanh {
  static constexpr double kSqrt2OverPi = 0.7978845608028654;
  static constexpr double kCubic = 0.044715;
  template <class T>
  [[gnu::always_inline]] static T value(T x) {
    const T u = T(kSqrt2OverPi) * (x + T(kCubic) * x * x * x);
    return x * stable_sigmoid(T(2) * u);
  }
  template <class T>
  [[gnu::always_inline]] static ValueAndDerivative<T> value_and_derivative(T x) {
    const T u = T(kSqrt2OverPi) * (x + T(kCubic) * x * x * x);
    const T du = T(kSqrt2OverPi) * (T(1) + T(3 * kCubic) * x * x);
    const T s = stable_sigmoid(T(2) * u);
    return {x * s, s + x * s * (T(1) - s) * T(2) * du};
  }
};

// x Phi(x) with Phi(x) = 0.5 (1 + erf(x / sqrt 2)) = 0.5 erfc(-x / sqrt 2); erfc keeps the
// relative accuracy for x << 0 where 1 + erf cancels.
struct GeluErf {
  static constexpr double kInvSqrt2 = 0.7071067811865476;
  static constexpr double kInvSqrt2Pi = 0.3989422804014327;
  template <class T>
  [[gnu::always_inline]] static T value(T x) {
    return x * T(0.5) * std::erfc(-x * T(kInvSqrt2));
  }
  template <class T>
  [[gnu::always_inline]] static ValueAndDerivative<T> value_and_derivative(T x) {
    const T cdf = T(0.5) * std::erfc(-x * T(kInvSqrt2));
    const T pdf = T(kInvSqrt2Pi) * std::exp(T(-0.5) * x * x);
    return {x * cdf, cdf + x * pdf};
  }
};

// x sigmoid(x); derivative s (1 + x (1 - s)).
struct Silu {
  template <class T>
  [[gnu::always_inline]] static T value(T x) {
    return x * stable_sigmoid(x);
  }
  template <class T>
  [[gnu::always_inline]] static ValueAndDerivative<T> value_and_derivative(T x) {
    const T s = stable_sigmoid(x);
    return {x * s, s * (T(1) + x * (T(1) - s))};
  }
};

// Calls f.template operator()<Fn>() with the functor of `act`, so the element loop is compiled
// once per activation rather than switching per element.
template <class F>
void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::identity:
      f.template operator()<Identity>();
      return;
    case Activation::relu:
      f.template operator()<Relu>();
      return;
    case Activation::gelu_tanh:
      f.template operator()<GeluTanh>();
      return;
    case Activation::gelu_erf:
      f.template operator()<GeluErf>();
      return;
    case Activation::silu:
      f.template operator()<Silu>();
      return;
  }
  throw RuntimeError(fmt::format("cpu kernel: unknown activation {}", static_cast<int>(act)));
}

// --- hot elementwise loops: vectorised per instruction set, split over threads --------------

// The experts' elementwise passes (GLU and activations, forward and backward) touch every hidden
// unit of every routed row, so beside the GEMMs they are what the layer's time is made of. Their
// f32 loops are compiled three times, for AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and the
// baseline, and the widest the CPU supports is picked at run time: the binary stays portable (no
// -march flags). The builds differ only in vector width: ISO C++ mode does not contract a * b + c
// into FMA, so every level gives bit-identical results. f64 loops (gradient checks) run the plain
// baseline build.
// GCC on x86-64 only: Clang spells some of these target options differently, and other
// architectures have no such levels; they run the baseline build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOELAB_CPU_MULTIVERSION 1
#else
#define MOELAB_CPU_MULTIVERSION 0
#endif

enum class SimdLevel { baseline, avx2, avx512 };

SimdLevel simd_level() {
#if MOELAB_CPU_MULTIVERSION
  static const SimdLevel level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return SimdLevel::avx512;
    if (__builtin_cpu_supports("x86-64-v3")) return SimdLevel::avx2;
    return SimdLevel::baseline;
  }();
  return level;
#else
  return SimdLevel::baseline;
#endif
}

#if MOELAB_CPU_MULTIVERSION
template <class Loop, class... Args>
[[gnu::target("arch=x86-64-v4,prefer-vector-width=512")]] void run_avx512(Args... args) {
  Loop::run(args...);
}
template <class Loop, class... Args>
[[gnu::target("arch=x86-64-v3")]] void run_avx2(Args... args) {
  Loop::run(args...);
}
#endif

// Loop::run(args...) in the widest build the CPU runs (f32), or the baseline one (f64).
template <class T, class Loop, class... Args>
void run_vectorised(Args... args) {
#if MOELAB_CPU_MULTIVERSION
  if constexpr (std::is_same_v<T, float>) {
    switch (simd_level()) {
      case SimdLevel::avx512:
        return run_avx512<Loop>(args...);
      case SimdLevel::avx2:
        return run_avx2<Loop>(args...);
      case SimdLevel::baseline:
        break;
    }
  }
#endif
  Loop::run(args...);
}

// h [R, F] = act(gate) * up over rows [begin, end) of gate_up [R, 2F] = [gate | up].
template <class T, class Fn>
struct GluForwardLoop {
  [[gnu::always_inline]] static void run(const T* gate_up, T* h, int64_t begin, int64_t end, int64_t width) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * 2 * width;
      const T* up = gate + width;
      T* hr = h + r * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) hr[j] = Fn::value(gate[j]) * up[j];
    }
  }
};

// dgate = act'(gate) * up * dh, dup = act(gate) * dh over rows [begin, end).
template <class T, class Fn>
struct GluBackwardLoop {
  [[gnu::always_inline]] static void run(const T* gate_up, const T* dh, T* dgate_up, int64_t begin, int64_t end,
                                         int64_t width) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * 2 * width;
      const T* up = gate + width;
      const T* dhr = dh + r * width;
      T* dgate = dgate_up + r * 2 * width;
      T* dup = dgate + width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const auto act_gate = Fn::value_and_derivative(gate[j]);
        dgate[j] = act_gate.derivative * up[j] * dhr[j];
        dup[j] = act_gate.value * dhr[j];
      }
    }
  }
};

// y = act(x) over elements [begin, end).
template <class T, class Fn>
struct ActivationLoop {
  [[gnu::always_inline]] static void run(const T* x, T* y, int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) y[i] = Fn::value(x[i]);
  }
};

// dx (+)= act'(x) * dy over elements [begin, end).
template <class T, class Fn>
struct ActivationBackwardLoop {
  [[gnu::always_inline]] static void run(const T* x, const T* dy, T* dx, bool accumulate, int64_t begin, int64_t end) {
    if (accumulate) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) dx[i] += Fn::value_and_derivative(x[i]).derivative * dy[i];
    } else {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) dx[i] = Fn::value_and_derivative(x[i]).derivative * dy[i];
    }
  }
};

// AdamW with decoupled weight decay over elements [begin, end), in double whatever T is (f32
// moments and weights are rounded once each per step). Vectorised: sqrt and division in double
// lanes are the correctly rounded scalar operations.
struct AdamWStep {
  double beta1, beta2, eps, weight_decay, lr, correction1, correction2;
};
template <class T>
struct AdamWLoop {
  [[gnu::always_inline]] static void run(const T* pg, T* pp, T* pm, T* pv, AdamWStep h, int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const double g = pg[i];
      const double mi = h.beta1 * pm[i] + (1.0 - h.beta1) * g;
      const double vi = h.beta2 * pv[i] + (1.0 - h.beta2) * g * g;
      pm[i] = static_cast<T>(mi);
      pv[i] = static_cast<T>(vi);
      const double update = (mi / h.correction1) / (std::sqrt(vi / h.correction2) + h.eps) + h.weight_decay * pp[i];
      pp[i] = static_cast<T>(pp[i] - h.lr * update);
    }
  }
};

// --- building blocks --------------------------------------------------------------------------

// c[n] = beta * c with BLAS semantics: beta = 0 writes zeros without reading c (which may hold
// garbage from Ops::empty).
template <class T>
void scale_by_beta(T beta, T* c, int64_t n) {
  if (beta == T(0))
    std::fill(c, c + n, T(0));
  else if (beta != T(1))
    for (int64_t i = 0; i < n; ++i) c[i] *= beta;
}

// c[m,n] = alpha * op(a) * op(b) + beta * c, all row-major and contiguous; a is [m,k] ([k,m] when
// trans_a), b is [k,n] ([n,k] when trans_b). Sizes were checked to fit blasint by the caller.
template <class T>
void gemm_rows(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, const T* b, T beta,
               T* c) {
  if (m == 0 || n == 0) return;
  // An empty inner dimension is a sum of nothing; BLAS would also reject lda = 0 here.
  if (k == 0) return scale_by_beta(beta, c, m * n);
  const auto ta = trans_a ? CblasTrans : CblasNoTrans;
  const auto tb = trans_b ? CblasTrans : CblasNoTrans;
  const auto lda = static_cast<blasint>(trans_a ? m : k);
  const auto ldb = static_cast<blasint>(trans_b ? k : n);
  const auto M = static_cast<blasint>(m), N = static_cast<blasint>(n), K = static_cast<blasint>(k);
  if constexpr (std::is_same_v<T, float>)
    cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, c, N);
  else
    cblas_dgemm(CblasRowMajor, ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, c, N);
}

// out (+)= value
template <class T>
void store(bool accumulate, T* out, int64_t i, T value) {
  out[i] = accumulate ? out[i] + value : value;
}

// sum_i a[i] * b[i] in double, vectorised (the reduction order is the compiler's, fixed per build).
template <class T>
double dot_in_double(const T* a, const T* b, int64_t n) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return sum;
}

template <class T>
T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;  // NaNs are skipped here, then propagate
  return m;
}

// Checks grouped-op offsets: size groups+1, from 0 to rows, non-decreasing.
void check_offsets(const OpCheck& check, const std::vector<int64_t>& offsets, int64_t groups, int64_t rows) {
  check.require(static_cast<int64_t>(offsets.size()) == groups + 1, "{} groups need {} offsets, got {}", groups,
                groups + 1, offsets.size());
  check.require(offsets.front() == 0, "offsets must start at 0, got {}", offsets.front());
  check.require(offsets.back() == rows, "offsets must end at the row count {}, got {}", rows, offsets.back());
  for (size_t g = 0; g + 1 < offsets.size(); ++g)
    check.require(offsets[g] <= offsets[g + 1], "offsets must not decrease, got offsets[{}] = {} > offsets[{}] = {}", g,
                  offsets[g], g + 1, offsets[g + 1]);
}

// Every index in [0, bound) — checked before anything is written.
void check_indices(const OpCheck& check, const Tensor& index, const char* name, int64_t bound, const char* what) {
  const int32_t* p = index.data<int32_t>();
  const int64_t n = index.numel();
  for (int64_t i = 0; i < n; ++i)
    check.require(p[i] >= 0 && p[i] < bound, "{}[{}] = {} is not a valid {} (expected 0 <= {} < {})", name, i, p[i],
                  what, name, bound);
}

// --- grouped GEMMs of few rows per group (f32, AVX-512) ---------------------------------------

// With few routed rows per expert (64 experts, top-1: 64 rows each), OpenBLAS spends about as long
// packing each expert's weight (one pass over it in memory, writing a packed copy) as computing
// with it, and the two do not overlap: its grouped GEMMs ran at ~0.5 of a dense GEMM of the same
// FLOPs. The kernels below read each weight once per pass, in place, as part of the arithmetic, and
// rearrange only the few rows of activations. They take the groups of 1 to kSmallGroupMaxRows rows
// (more below; kSmallWeightGradMaxRows for weight gradients) of f32 grouped GEMMs where the CPU has
// AVX-512; OpenBLAS keeps the rest.
// Every output element is summed by one thread in a fixed order, so results do not depend on the
// thread count; they differ from OpenBLAS's in rounding only (another order of the same sums).
constexpr int64_t kSmallGroupMaxRows = 128;
// Groups of up to kSmallGroupL2MaxRows rows go to them too, in passes of kNtLargePassRows rows,
// when the group's weight fits in three quarters of L2: each pass after the first then reads it
// from there. Measured at (4096, 512, 352, 64, 8) (~512 rows a group, 1.4 MB weights, 2 MB L2):
// forward 0.79-0.80 -> 0.85-0.87 of the dense rate, forward+backward 0.83-0.85 -> 0.87-0.90. Passes
// of 128 rows were slower than OpenBLAS (0.75): 8 vectors of x rows make 3-row tiles.
constexpr int64_t kSmallGroupL2MaxRows = 1024;
[[maybe_unused]] constexpr int64_t kNtLargePassRows = 64;  // used only where MOELAB_CPU_MULTIVERSION

// Three quarters of the L2 cache, in floats (0 where the system does not say).
int64_t l2_weight_floats() {
  static const int64_t floats = [] {
    const long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return bytes > 0 ? static_cast<int64_t>(bytes) / 4 * 3 / 4 : int64_t{0};
  }();
  return floats;
}
// The weight-gradient kernel keeps its lead over OpenBLAS up to 512 rows (1.1 against 0.95 of the
// dense rate at 512 rows, d = 512, F = 352; behind at 1024) while the group's packed copy of x
// or dy (rows x q floats) stays in L2.
constexpr int64_t kSmallWeightGradMaxRows = 512;
constexpr int64_t kSmallWeightGradMaxFloats = int64_t{1} << 18;

#if MOELAB_CPU_MULTIVERSION
#define MOELAB_AVX512 gnu::target("arch=x86-64-v4")

constexpr int64_t kLanes = 16;  // floats per 512-bit vector

// Scratch floats of the calling thread, 64-byte aligned (aligned vector loads never straddle two
// cache lines), contents unspecified. Kept between calls and only ever grown: the kernels run on
// OpenBLAS's long-lived workers (see run_shares), so every training step reuses the same
// memory instead of mapping, faulting in and unmapping megabytes of fresh pages. `slot` tells
// apart the buffers one kernel needs at the same time.
float* thread_scratch(int slot, int64_t count) {
  struct Buffer {
    std::unique_ptr<float[]> storage;
    int64_t capacity = 0;
    float* data = nullptr;
  };
  thread_local std::array<Buffer, 4> buffers;
  Buffer& buffer = buffers.at(static_cast<size_t>(slot));
  if (count > buffer.capacity) {
    buffer.storage = std::make_unique_for_overwrite<float[]>(static_cast<size_t>(count + kLanes));
    const auto misalignment = reinterpret_cast<uintptr_t>(buffer.storage.get()) % 64;
    buffer.data = buffer.storage.get() + (misalignment == 0 ? 0 : (64 - misalignment) / sizeof(float));
    buffer.capacity = count;
  }
  return buffer.data;
}

// Lanes [0, count) of a vector, count in [1, 16].
inline __mmask16 lane_mask(int64_t count) {
  return static_cast<__mmask16>((uint32_t{1} << count) - 1);
}

// y = alpha * value + beta * y over the lanes in mask; beta = 0 does not read y.
[[MOELAB_AVX512]] inline void store_scaled(float* y, __m512 value, float alpha, float beta, __mmask16 mask) {
  __m512 result = _mm512_mul_ps(_mm512_set1_ps(alpha), value);
  if (beta != 0) result = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(mask, y), result);
  _mm512_mask_storeu_ps(y, mask, result);
}

// (The maskz forms with every lane set: GCC 12 warns that the plain forms' undefined pass-through
// operand may be used uninitialized.)
constexpr __mmask16 kAllLanes = 0xFFFF;

// out[i] = column i of the 16 x 16 block whose rows are in[0..15]: out[i][j] = in[j][i].
[[MOELAB_AVX512]] inline void transpose16(const __m512 in[16], __m512 out[16]) {
  __m512 pairs[16], quads[16];
  for (int i = 0; i < 8; ++i) {  // pairs[2i], lane l: a[4l] b[4l] a[4l+1] b[4l+1] of rows a, b = 2i, 2i+1
    const __m512 a = in[2 * i], b = in[2 * i + 1];
    pairs[2 * i] = _mm512_maskz_unpacklo_ps(kAllLanes, a, b);
    pairs[2 * i + 1] = _mm512_maskz_unpackhi_ps(kAllLanes, a, b);
  }
  for (int g = 0; g < 4; ++g) {  // quads[4g + c], 128-bit lane l: column 4l + c of rows 4g .. 4g+3
    const __m512d lo_ab = _mm512_castps_pd(pairs[4 * g]), hi_ab = _mm512_castps_pd(pairs[4 * g + 1]);
    const __m512d lo_cd = _mm512_castps_pd(pairs[4 * g + 2]), hi_cd = _mm512_castps_pd(pairs[4 * g + 3]);
    quads[4 * g] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, lo_ab, lo_cd));
    quads[4 * g + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, lo_ab, lo_cd));
    quads[4 * g + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, hi_ab, hi_cd));
    quads[4 * g + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, hi_ab, hi_cd));
  }
  for (int c = 0; c < 4; ++c) {  // lane l of the four row groups, in order: column 4l + c
    const __m512 even01 = _mm512_maskz_shuffle_f32x4(kAllLanes, quads[c], quads[4 + c], 0x88);
    const __m512 odd01 = _mm512_maskz_shuffle_f32x4(kAllLanes, quads[c], quads[4 + c], 0xdd);
    const __m512 even23 = _mm512_maskz_shuffle_f32x4(kAllLanes, quads[8 + c], quads[12 + c], 0x88);
    const __m512 odd23 = _mm512_maskz_shuffle_f32x4(kAllLanes, quads[8 + c], quads[12 + c], 0xdd);
    out[c] = _mm512_maskz_shuffle_f32x4(kAllLanes, even01, even23, 0x88);
    out[4 + c] = _mm512_maskz_shuffle_f32x4(kAllLanes, odd01, odd23, 0x88);
    out[8 + c] = _mm512_maskz_shuffle_f32x4(kAllLanes, even01, even23, 0xdd);
    out[12 + c] = _mm512_maskz_shuffle_f32x4(kAllLanes, odd01, odd23, 0xdd);
  }
}

// --- y = x w^T, w [n, k] (the forward GEMMs), and y = x w, w [k, n] (the input gradients) ---
// Computed transposed: ct[r][t] = sum_i w(r, i) * xt[i][t] for R output columns r and 16 NV rows
// t of x, x packed as xt [k][16 NV] and kept in L2. The weight is read in place, each element
// broadcast once and used for every row of x in the pass, so it needs no copy and no second read
// from memory:
// - y = x w^T: w(r, i) = w[r * ldw + i], R weight rows each read in order over up to kNtDepth
//   steps (R sequential streams);
// - y = x w: w(r, i) = w[i * ldw + r], R adjacent floats of each weight row. Each cache line of
//   the weight is shared by the ~3 tiles side by side that cover its 16 columns, so the tiles
//   sweep whole row segments (the group's piece of the columns) kKnDepth weight rows at a time,
//   with a prefetch a few tiles ahead; ct for the whole segment stays in L2 between the sweeps.
//   That reads the weight as kKnDepth sequential streams. Measured at shape 3's input gradients
//   (64 groups of ~64 rows, d = 768, F = 3072, 2 threads): 0.77 (dy w_out) and 0.83 (dpre w_in)
//   of the dense rate, against 0.61 / 0.75 for copying 64-column panels of w for row tiles of x;
//   deeper sweeps lose (0.5 at 64 rows of w_out's 12 KiB), so do shallower ones (0.7 at 16).
constexpr int64_t kKnDepth = 48;
// Prefetch distance in columns for y = x w: the line that the tile four to the right starts in.
constexpr int64_t kKnPrefetchColumns = 24;

// One step of an R x NV register tile: acc[r][v] += broadcast[r] * vectors[16v .. 16v+16]. Shared
// by the y = x w^T / y = x w tiles and the weight-gradient tiles, which differ only in where the
// broadcasts and the vectors come from.
template <int R, int NV>
[[MOELAB_AVX512]] [[gnu::always_inline]] inline void tile_step(const __m512 (&broadcast)[R], const float* vectors,
                                                               __m512 (&acc)[R][NV]) {
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const __m512 vector = _mm512_load_ps(vectors + v * kLanes);
#pragma GCC unroll 64
    for (int r = 0; r < R; ++r) acc[r][v] = _mm512_fmadd_ps(vector, broadcast[r], acc[r][v]);
  }
}

template <int R, int NV, bool kWeightKN>
[[MOELAB_AVX512]] inline void nt_tile(const float* xt, const float* w, int64_t ldw, int64_t depth, bool accumulate,
                                      float* ct) {
  constexpr int64_t width = NV * kLanes;
  __m512 acc[R][NV];
#pragma GCC unroll 64
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? _mm512_load_ps(ct + r * width + v * kLanes) : _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t i = 0; i < depth; ++i) {
    __m512 weight[R];
    if constexpr (kWeightKN) {
      _mm_prefetch(reinterpret_cast<const char*>(w + i * ldw + kKnPrefetchColumns), _MM_HINT_T0);
#pragma GCC unroll 64
      for (int r = 0; r < R; ++r) weight[r] = _mm512_set1_ps(w[i * ldw + r]);
    } else {
#pragma GCC unroll 64
      for (int r = 0; r < R; ++r) weight[r] = _mm512_set1_ps(w[r * ldw + i]);
    }
    tile_step<R, NV>(weight, xt + i * width, acc);
  }
#pragma GCC unroll 64
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) _mm512_store_ps(ct + r * width + v * kLanes, acc[r][v]);
}

// Weight rows per write-out block of y = x w^T: a multiple of 16 (written 16 x 16 at a time) and of
// every R. y = x w's row segments are multiples of it too, short of n.
constexpr int64_t kNtBlockRows = 48;
// Widest row segment of y = x w: ct for 64 rows of x is then 1 MiB, within L2.
constexpr int64_t kKnMaxColumns = 4096;
// Rows of xt per pass: 1024 x 128 floats (512 KiB) at most, so that xt stays in L2.
constexpr int64_t kNtDepth = 1024;
// Rows of x per pass over the weight (8 vectors).
constexpr int64_t kNtMaxRows = 128;

// Weight rows per tile for NV vectors of x rows: as many as the 32 vector registers hold (R * NV
// accumulators, R broadcasts, one x vector) that divide kNtBlockRows.
constexpr int nt_rows_per_tile(int nv) {
  return nv == 1 ? 12 : nv == 2 ? 8 : nv <= 4 ? 6 : nv <= 6 ? 4 : 3;
}

// --- the last few rows of a pass (the tail kernels) ---
// A pass of 16 NV + T rows of x with T = 1 .. kMaxTailRows would round up to NV + 1 vectors,
// computing 16 - T rows of zeros: at shape 3 (~64 +- 8 rows per expert) ~11% of the arithmetic.
// Instead the NV vectors go through the tiles above and the T rows through a tail kernel that runs
// right after them over the same stretch of weight, which is then still in L2: its reads cost
// little, its arithmetic is T rows' worth. Measured on 64 groups of the same row count (shape 3's
// GEMMs, 2 threads, GFLOP/s against rounding up): y = x w 240 -> 262 (dy w_out) and 245 -> 282
// (dpre w_in) at 72 rows; y = x w^T (dot products, slower per row) 241 -> 292 at 66 rows, 252 ->
// 270 at 68, but no gain at 72, hence the lower limit there.
constexpr int64_t kMaxTailRows = 8;    // y = x w
constexpr int64_t kMaxNtTailRows = 4;  // y = x w^T

// The sum of v's lanes, halving the vector each step. (Not _mm512_reduce_add_ps: GCC 12 warns, as
// for the plain forms below, that its undefined pass-through operand is used uninitialized.)
[[MOELAB_AVX512]] inline float horizontal_sum(__m512 v) {
  v = _mm512_maskz_add_ps(kAllLanes, v, _mm512_maskz_shuffle_f32x4(kAllLanes, v, v, 0x4E));  // 256-bit halves
  v = _mm512_maskz_add_ps(kAllLanes, v, _mm512_maskz_shuffle_f32x4(kAllLanes, v, v, 0xB1));  // 128-bit quarters
  v = _mm512_maskz_add_ps(kAllLanes, v, _mm512_maskz_permute_ps(kAllLanes, v, 0x4E));        // pairs of floats
  v = _mm512_maskz_add_ps(kAllLanes, v, _mm512_maskz_permute_ps(kAllLanes, v, 0xB1));        // floats
  return _mm512_cvtss_f32(v);
}

// y = x w^T's tail: out[r][t] (+)= sum_i w[r * ldw + i] * x[t * ldx + i] over `depth` steps for R
// weight rows and T rows of x, as dot products (vectors along i, one horizontal sum per output).
template <int R, int T>
[[MOELAB_AVX512]] inline void nt_tail_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t depth,
                                           bool accumulate, float* out) {
  __m512 acc[R][T];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < depth; i += kLanes) {
    const __mmask16 mask = lane_mask(std::min(kLanes, depth - i));
    __m512 xs[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) xs[t] = _mm512_maskz_loadu_ps(mask, x + t * ldx + i);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + r * ldw + i);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xs[t], acc[r][t]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const float sum = horizontal_sum(acc[r][t]);
      out[r * T + t] = accumulate ? out[r * T + t] + sum : sum;
    }
}

// y = x w's tail: out[t][c] (+)= sum_i xt[i][t] * w[i * ldw + c] over `depth` steps for T rows of x
// (xt = x^T [k][T]) and up to 48 columns c < columns (three vectors of w, masked).
template <int T>
[[MOELAB_AVX512]] inline void kn_tail_tile(const float* xt, const float* w, int64_t ldw, int64_t depth, int64_t columns,
                                           bool accumulate, float* out, int64_t ldo) {
  constexpr int NV = 3;
  __mmask16 masks[NV];
  for (int v = 0; v < NV; ++v) masks[v] = lane_mask(std::clamp<int64_t>(columns - v * kLanes, 0, kLanes));
  __m512 acc[T][NV];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v)
      acc[t][v] = accumulate ? _mm512_maskz_loadu_ps(masks[v], out + t * ldo + v * kLanes) : _mm512_setzero_ps();
  for (int64_t i = 0; i < depth; ++i) {
    __m512 xs[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) xs[t] = _mm512_set1_ps(xt[i * T + t]);
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) {
      const __m512 wv = _mm512_maskz_loadu_ps(masks[v], w + i * ldw + v * kLanes);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[t][v] = _mm512_fmadd_ps(xs[t], wv, acc[t][v]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(out + t * ldo + v * kLanes, masks[v], acc[t][v]);
}

// The tail rows of one pass: `rows` of them (0 = none); x: the rows themselves, ldx floats apart
// (y = x w^T), xt: x^T [k][rows] (y = x w); out: scratch of block * rows floats.
struct PassTail {
  int64_t rows = 0;
  const float* x = nullptr;
  int64_t ldx = 0;
  const float* xt = nullptr;
  float* out = nullptr;
};

// The tail kernel over columns [j_begin, j_begin + block) and weight rows/steps [i0, i0 + depth).
template <bool kWeightKN, int T>
[[MOELAB_AVX512]] void tail_sweep(const PassTail& tail, const float* w, int64_t ldw, int64_t i0, int64_t depth,
                                  int64_t j_begin, int64_t block) {
  if constexpr (kWeightKN) {
    for (int64_t c = 0; c < block; c += 48)
      kn_tail_tile<T>(tail.xt + i0 * T, w + i0 * ldw + j_begin + c, ldw, depth, std::min<int64_t>(48, block - c),
                      i0 > 0, tail.out + c, block);
  } else if constexpr (T > kMaxNtTailRows) {
    throw RuntimeError(fmt::format("cpu kernel: internal error: {} tail rows for y = x w^T", T));
  } else {
    constexpr int R = 3;
    int64_t r = 0;
    for (; r + R <= block; r += R)
      nt_tail_tile<R, T>(tail.x + i0, tail.ldx, w + (j_begin + r) * ldw + i0, ldw, depth, i0 > 0, tail.out + r * T);
    for (; r < block; ++r)
      nt_tail_tile<1, T>(tail.x + i0, tail.ldx, w + (j_begin + r) * ldw + i0, ldw, depth, i0 > 0, tail.out + r * T);
  }
}

template <bool kWeightKN>
void tail_sweep_for(const PassTail& tail, const float* w, int64_t ldw, int64_t i0, int64_t depth, int64_t j_begin,
                    int64_t block) {
  switch (tail.rows) {
#define MOELAB_TAIL_CASE(T) \
  case T:                   \
    return tail_sweep<kWeightKN, T>(tail, w, ldw, i0, depth, j_begin, block);
    MOELAB_TAIL_CASE(1)
    MOELAB_TAIL_CASE(2)
    MOELAB_TAIL_CASE(3)
    MOELAB_TAIL_CASE(4)
    MOELAB_TAIL_CASE(5)
    MOELAB_TAIL_CASE(6)
    MOELAB_TAIL_CASE(7)
    MOELAB_TAIL_CASE(8)
#undef MOELAB_TAIL_CASE
    default:
      throw RuntimeError(fmt::format("cpu kernel: internal error: {} tail rows in a small-group GEMM", tail.rows));
  }
}

// y[t][j] = alpha * sum_i x[t][i] w(j, i) + beta * y[t][j] for the rows t < rows (<= 16 NV) of one
// pass and the output columns j of [j_begin, j_begin + block); xt = x^T [k][16 NV], zero padded;
// ct: scratch of block * 16 NV floats, 64-byte aligned. The tail's rows, if any, follow row `rows`
// (= 16 NV then) in y.
template <int NV, bool kWeightKN>
[[MOELAB_AVX512]] void nt_block(const float* xt, int64_t rows, const PassTail& tail, int64_t k, const float* w,
                                int64_t ldw, int64_t j_begin, int64_t block, float alpha, float beta, float* y,
                                int64_t ldy, float* ct) {
  constexpr int R = nt_rows_per_tile(NV);
  constexpr int64_t width = NV * kLanes;
  constexpr int64_t max_depth = kWeightKN ? kKnDepth : kNtDepth;
  for (int64_t i0 = 0; i0 < k; i0 += max_depth) {
    const int64_t depth = std::min(max_depth, k - i0);
    const auto tile_weight = [&](int64_t r) {
      return kWeightKN ? w + i0 * ldw + j_begin + r : w + (j_begin + r) * ldw + i0;
    };
    int64_t r = 0;
    for (; r + R <= block; r += R)
      nt_tile<R, NV, kWeightKN>(xt + i0 * width, tile_weight(r), ldw, depth, i0 > 0, ct + r * width);
    for (; r < block; ++r)
      nt_tile<1, NV, kWeightKN>(xt + i0 * width, tile_weight(r), ldw, depth, i0 > 0, ct + r * width);
    if (tail.rows > 0) tail_sweep_for<kWeightKN>(tail, w, ldw, i0, depth, j_begin, block);
  }
  // ct [block][width] holds y^T: write it out 16 x 16 at a time, what is left element by element.
  int64_t j0 = 0;
  for (; j0 + kLanes <= block; j0 += kLanes)
    for (int64_t v = 0; v < NV && v * kLanes < rows; ++v) {
      __m512 block[16], columns[16];
      for (int64_t j = 0; j < kLanes; ++j) block[j] = _mm512_load_ps(ct + (j0 + j) * width + v * kLanes);
      transpose16(block, columns);
      for (int64_t i = 0; i < kLanes && v * kLanes + i < rows; ++i)
        store_scaled(y + (v * kLanes + i) * ldy + j_begin + j0, columns[i], alpha, beta, 0xFFFF);
    }
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t j = j0; j < block; ++j) {
      float* out = y + t * ldy + j_begin + j;
      *out = beta == 0 ? alpha * ct[j * width + t] : alpha * ct[j * width + t] + beta * *out;
    }
  // The tail's results: tail.out [block][T] (y = x w^T) or [T][block] (y = x w).
  for (int64_t t = 0; t < tail.rows; ++t)
    for (int64_t j = 0; j < block; ++j) {
      const float value = kWeightKN ? tail.out[t * block + j] : tail.out[j * tail.rows + t];
      float* out = y + (rows + t) * ldy + j_begin + j;
      *out = beta == 0 ? alpha * value : alpha * value + beta * *out;
    }
}

template <bool kWeightKN>
void nt_block_for(int64_t nv, const float* xt, int64_t rows, const PassTail& tail, int64_t k, const float* w,
                  int64_t ldw, int64_t j_begin, int64_t block, float alpha, float beta, float* y, int64_t ldy,
                  float* ct) {
  switch (nv) {
#define MOELAB_NT_CASE(NV) \
  case NV:                 \
    return nt_block<NV, kWeightKN>(xt, rows, tail, k, w, ldw, j_begin, block, alpha, beta, y, ldy, ct);
    MOELAB_NT_CASE(1)
    MOELAB_NT_CASE(2)
    MOELAB_NT_CASE(3)
    MOELAB_NT_CASE(4)
    MOELAB_NT_CASE(5)
    MOELAB_NT_CASE(6)
    MOELAB_NT_CASE(7)
    MOELAB_NT_CASE(8)
#undef MOELAB_NT_CASE
    default:
      throw RuntimeError(fmt::format("cpu kernel: internal error: {} vectors of rows in a small-group GEMM", nv));
  }
}

// xt [k][width] = x^T for x [rows, k] (width >= rows), 16 x 16 at a time; columns from `rows` to
// the next multiple of 16 (within width) are zero.
[[MOELAB_AVX512]] void pack_transposed(const float* x, int64_t rows, int64_t k, int64_t width, float* xt) {
  for (int64_t t0 = 0; t0 < rows; t0 += kLanes) {
    const int64_t block_rows = std::min(kLanes, rows - t0);
    const __mmask16 store_mask = lane_mask(std::min(kLanes, width - t0));
    for (int64_t i0 = 0; i0 < k; i0 += kLanes) {
      const int64_t block_columns = std::min(kLanes, k - i0);
      __m512 block[16], columns[16];
      for (int64_t j = 0; j < kLanes; ++j)
        block[j] = j < block_rows ? _mm512_maskz_loadu_ps(lane_mask(block_columns), x + (t0 + j) * k + i0)
                                  : _mm512_setzero_ps();
      transpose16(block, columns);
      for (int64_t c = 0; c < block_columns; ++c)
        _mm512_mask_storeu_ps(xt + (i0 + c) * width + t0, store_mask, columns[c]);
    }
  }
}

// --- out (+)= a^T b, a [rows, p], b [rows, q], out [p, q] (the weight gradients) ---
// acc[r][v] = sum_t at[r][t] * bp[t][16v .. 16v+16] for R rows of out (at = a^T, broadcast) and a
// panel of 64 columns of b (bp [rows][64]); out is read and written once, row block after row
// block. a and b are packed once per group (a^T [p][rows]; b in panels [q / 64][rows][64]): read in
// place, their rows would fall in the same few L1 sets (rows a multiple of 4 KiB apart).
constexpr int kTnRowsPerTile = 6;
constexpr int64_t kTnPanelColumns = 64;

template <int R, int NV>
[[MOELAB_AVX512]] inline void tn_tile(const float* at, int64_t rows, const float* bp, __mmask16 last, bool accumulate,
                                      float* out, int64_t ldo, const float* next_out) {
  __m512 acc[R][NV];
#pragma GCC unroll 64
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(v + 1 < NV ? kAllLanes : last, out + r * ldo + v * kLanes)
                             : _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t t = 0; t < rows; ++t) {
    // The next tile's rows of out, one cache line every other step, while this one computes.
    if (next_out != nullptr && (t & 1) == 0 && t < 8 * R)
      __builtin_prefetch(next_out + (t / 8) * ldo + (t / 2 % 4) * kLanes, 1);
    __m512 as[R];
#pragma GCC unroll 64
    for (int r = 0; r < R; ++r) as[r] = _mm512_set1_ps(at[r * rows + t]);
    tile_step<R, NV>(as, bp + t * kTnPanelColumns, acc);
  }
#pragma GCC unroll 64
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(out + r * ldo + v * kLanes, v + 1 < NV ? kAllLanes : last, acc[r][v]);
}

// bp [q / 64][rows][64] = b [rows, q] in panels of 64 columns, zero padded.
[[MOELAB_AVX512]] void pack_panels(const float* b, int64_t rows, int64_t q, float* bp) {
  for (int64_t c = 0; c < q; c += kTnPanelColumns) {
    const int64_t columns = std::min(kTnPanelColumns, q - c);
    float* panel = bp + c * rows;
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t v = 0; v < 4; ++v) {
        const int64_t lanes = std::clamp<int64_t>(columns - v * kLanes, 0, kLanes);
        _mm512_store_ps(
            panel + t * kTnPanelColumns + v * kLanes,
            lanes == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(lane_mask(lanes), b + t * q + c + v * kLanes));
      }
  }
}

template <int R>
[[MOELAB_AVX512]] void tn_row_tile(const float* at, int64_t rows, const float* bp, int64_t q, bool accumulate,
                                   float* out) {
  for (int64_t c = 0; c < q; c += kTnPanelColumns) {
    const int64_t columns = std::min(kTnPanelColumns, q - c);
    const int64_t nv = (columns + kLanes - 1) / kLanes;
    const __mmask16 last = lane_mask(columns - (nv - 1) * kLanes);
    const float* next = c + kTnPanelColumns < q ? out + c + kTnPanelColumns : nullptr;
    switch (nv) {
#define MOELAB_TN_CASE(NV)                                                       \
  case NV:                                                                       \
    tn_tile<R, NV>(at, rows, bp + c * rows, last, accumulate, out + c, q, next); \
    break;
      MOELAB_TN_CASE(1)
      MOELAB_TN_CASE(2)
      MOELAB_TN_CASE(3)
      MOELAB_TN_CASE(4)
#undef MOELAB_TN_CASE
    }
  }
}

// Rows [p_begin, p_end) of out [p, q] (+)= a^T b, given at = a^T [p][rows] and b packed as bp.
[[MOELAB_AVX512]] void tn_rows(const float* at, int64_t rows, const float* bp, int64_t q, bool accumulate,
                               int64_t p_begin, int64_t p_end, float* out) {
  int64_t r = p_begin;
  for (; r + kTnRowsPerTile <= p_end; r += kTnRowsPerTile)
    tn_row_tile<kTnRowsPerTile>(at + r * rows, rows, bp, q, accumulate, out + r * q);
  switch (p_end - r) {
#define MOELAB_TN_TAIL(R) \
  case R:                 \
    return tn_row_tile<R>(at + r * rows, rows, bp, q, accumulate, out + r * q);
    MOELAB_TN_TAIL(1)
    MOELAB_TN_TAIL(2)
    MOELAB_TN_TAIL(3)
    MOELAB_TN_TAIL(4)
    MOELAB_TN_TAIL(5)
#undef MOELAB_TN_TAIL
    default:
      return;
  }
}

// --- splitting the groups' work over threads ---

// One piece of a grouped GEMM: rows [begin, end) of the output dimension that is split (weight
// rows for y = x w^T, columns for y = x w, rows of out for the weight gradient) of one group.
struct GroupPiece {
  int64_t group, begin, end;
};

// Minimum FLOPs per thread: below it, starting a thread costs more than it saves.
constexpr double kMinFlopsPerThread = 1 << 23;

// Cuts every group's output dimension [0, extent) into pieces of `step` and runs
// body(pieces, first, last) on up to `threads` threads, each taking a contiguous run of pieces of
// about equal FLOPs (the caller runs the first run). flops_per_unit(group) prices one unit of the
// output dimension.
template <class Price, class Body>
void run_group_pieces(int threads, const std::vector<int64_t>& groups, int64_t extent, int64_t step,
                      const Price& flops_per_unit, const Body& body) {
  std::vector<GroupPiece> pieces;
  std::vector<double> cumulative{0.0};
  for (const int64_t g : groups)
    for (int64_t begin = 0; begin < extent; begin += step) {
      pieces.push_back({g, begin, std::min(extent, begin + step)});
      cumulative.push_back(cumulative.back() + flops_per_unit(g) * static_cast<double>(pieces.back().end - begin));
    }
  const double total = cumulative.back();
  const int64_t count = static_cast<int64_t>(pieces.size());
  const int64_t runs = std::min<int64_t>({threads, static_cast<int64_t>(total / kMinFlopsPerThread), count});
  if (runs <= 1) return body(pieces, int64_t{0}, count);
  // Run r starts at the first piece whose cumulative FLOPs reach r / runs of the total.
  std::vector<int64_t> starts(static_cast<size_t>(runs + 1), count);
  starts[0] = 0;
  for (int64_t r = 1; r < runs; ++r)
    starts[r] = std::lower_bound(cumulative.begin(), cumulative.end(), total * static_cast<double>(r) / runs) -
                cumulative.begin();
  run_shares(static_cast<int>(runs), [&](int r) { body(pieces, starts[r], starts[r + 1]); });
}

// y = alpha * x w^T (trans_w; w [groups, n, k]) or alpha * x w (w [groups, k, n]), + beta * y, over
// the rows of the listed groups (at least one row each); k, n > 0.
void small_grouped_gemm(int threads, const float* x, const float* w, bool trans_w, const std::vector<int64_t>& offsets,
                        const std::vector<int64_t>& groups, int64_t k, int64_t n, float alpha, float beta, float* y) {
  const auto rows_of = [&](int64_t g) { return offsets[g + 1] - offsets[g]; };
  // Passes over each group's weight, the rows split evenly: one for up to kNtMaxRows rows, passes
  // of at most kNtLargePassRows for more.
  struct Pass {
    int64_t group, begin, rows;
  };
  std::vector<Pass> passes;
  std::vector<int64_t> pass_ids;
  for (const int64_t g : groups) {
    const int64_t rows = rows_of(g), pass_rows = rows <= kNtMaxRows ? kNtMaxRows : kNtLargePassRows;
    const int64_t count = (rows + pass_rows - 1) / pass_rows;
    for (int64_t c = 0; c < count; ++c) {
      pass_ids.push_back(static_cast<int64_t>(passes.size()));
      passes.push_back({g, offsets[g] + rows * c / count, rows * (c + 1) / count - rows * c / count});
    }
  }
  // Rows in whole vectors and the tail's: a longer tail than the tail kernel's limit (or a pass of
  // fewer than 16 rows) is rounded up to a vector instead.
  const int64_t max_tail = trans_w ? kMaxNtTailRows : kMaxTailRows;
  const auto split_of = [&](int64_t pass) {
    const int64_t rows = passes[pass].rows, whole = rows / kLanes, tail = rows % kLanes;
    if (whole == 0 || tail > max_tail) return std::pair{(rows + kLanes - 1) / kLanes, int64_t{0}};
    return std::pair{whole, tail};
  };
  const auto price = [&](int64_t pass) {
    const auto [vectors, tail] = split_of(pass);
    return 2.0 * static_cast<double>((vectors * kLanes + tail) * k);
  };
  // y = x w: whole rows of w per piece, or a share of them (multiples of kNtBlockRows) where there
  // are too few passes to go round the threads or the rows are wider than kKnMaxColumns.
  const int64_t pieces_per_pass = std::max<int64_t>(
      1, (4 * threads + static_cast<int64_t>(passes.size()) - 1) / static_cast<int64_t>(passes.size()));
  const int64_t kn_step = std::min(kKnMaxColumns, (n + pieces_per_pass - 1) / pieces_per_pass);
  const int64_t step = trans_w ? kNtBlockRows : (kn_step + kNtBlockRows - 1) / kNtBlockRows * kNtBlockRows;
  run_group_pieces(
      threads, pass_ids, n, step, price, [&](const std::vector<GroupPiece>& pieces, int64_t first, int64_t last) {
        float* xt = thread_scratch(0, k * kNtMaxRows);
        float* ct = thread_scratch(1, step * kNtMaxRows);
        float* tail_xt = trans_w ? nullptr : thread_scratch(2, k * kMaxTailRows);
        float* tail_out = thread_scratch(3, step * kMaxTailRows);
        int64_t packed = -1;
        for (int64_t i = first; i < last; ++i) {
          const GroupPiece& piece = pieces[static_cast<size_t>(i)];
          const Pass& pass = passes[piece.group];
          const auto [vectors, tail_rows] = split_of(piece.group);
          const int64_t rows = std::min(pass.rows, vectors * kLanes);
          const float* tail_x = x + (pass.begin + rows) * k;
          if (piece.group != packed) {
            pack_transposed(x + pass.begin * k, rows, k, vectors * kLanes, xt);
            if (tail_rows > 0 && !trans_w) pack_transposed(tail_x, tail_rows, k, tail_rows, tail_xt);
          }
          packed = piece.group;
          const PassTail tail{tail_rows, tail_x, k, tail_xt, tail_out};
          const float* weight = w + pass.group * n * k;
          (trans_w ? nt_block_for<false> : nt_block_for<true>)(vectors, xt, rows, tail, k, weight, trans_w ? k : n,
                                                               piece.begin, piece.end - piece.begin, alpha, beta,
                                                               y + pass.begin * n, n, ct);
        }
      });
}

// dw[g] (+)= dy_g^T x_g (trans_w; dw [groups, n, k]) or x_g^T dy_g (dw [groups, k, n]) for the
// listed groups, each of 1 to kSmallWeightGradMaxRows rows; k, n > 0.
void small_grouped_weight_grad(int threads, const float* x, const float* dy, bool trans_w,
                               const std::vector<int64_t>& offsets, const std::vector<int64_t>& groups, int64_t k,
                               int64_t n, bool accumulate, float* dw) {
  const auto rows_of = [&](int64_t g) { return offsets[g + 1] - offsets[g]; };
  // out [p, q] (+)= a^T b
  const float* a = trans_w ? dy : x;
  const float* b = trans_w ? x : dy;
  const int64_t p = trans_w ? n : k, q = trans_w ? k : n;
  const int64_t padded_q = (q + kTnPanelColumns - 1) / kTnPanelColumns * kTnPanelColumns;
  const auto price = [&](int64_t g) { return 2.0 * static_cast<double>(rows_of(g) * q); };
  int64_t max_rows = 0;
  for (const int64_t g : groups) max_rows = std::max(max_rows, rows_of(g));
  run_group_pieces(threads, groups, p, 8 * kTnRowsPerTile, price,
                   [&](const std::vector<GroupPiece>& pieces, int64_t first, int64_t last) {
                     float* at = thread_scratch(0, p * max_rows);
                     float* bp = thread_scratch(1, max_rows * padded_q);
                     int64_t packed = -1;
                     for (int64_t i = first; i < last; ++i) {
                       const GroupPiece& piece = pieces[static_cast<size_t>(i)];
                       const int64_t g = piece.group, begin = offsets[g], rows = rows_of(g);
                       if (g != packed) {
                         pack_transposed(a + begin * p, rows, p, rows, at);
                         pack_panels(b + begin * q, rows, q, bp);
                         packed = g;
                       }
                       tn_rows(at, rows, bp, q, accumulate, piece.begin, piece.end, dw + g * p * q);
                     }
                   });
}
#endif  // MOELAB_CPU_MULTIVERSION

// Whether a group of `rows` rows of a grouped GEMM in T with inner size k and output size n goes
// to the AVX-512 small-group kernels rather than OpenBLAS.
template <class T>
bool small_group_kernel(int64_t rows, int64_t k, int64_t n, int64_t max_rows) {
  if constexpr (std::is_same_v<T, float>)
    return MOELAB_CPU_MULTIVERSION && simd_level() == SimdLevel::avx512 && rows > 0 && rows <= max_rows && k > 0 &&
           n > 0;
  else
    return false;
}

// The shapes of a causal attention's q [R, H*Dk], k [R, Hkv*Dk] and v [R, Hkv*Dv] (kernel.hpp).
cpu::AttentionDims attention_dims(const OpCheck& check, const Tensor& q, const Tensor& k, const Tensor& v,
                                  int64_t heads, int64_t kv_heads, int64_t seq_len, double scale) {
  check.rank(q, "q", 2);
  check.rank(k, "k", 2);
  check.rank(v, "v", 2);
  check.require(heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0,
                "{} query heads do not split into groups of {} kv heads", heads, kv_heads);
  check.require(seq_len >= 1 && q.dim(0) % seq_len == 0, "{} rows are not whole sequences of {}", q.dim(0), seq_len);
  check.require(q.dim(1) % heads == 0 && q.dim(1) > 0, "q's {} columns do not split into {} heads", q.dim(1), heads);
  check.require(v.dim(1) % kv_heads == 0 && v.dim(1) > 0, "v's {} columns do not split into {} kv heads", v.dim(1),
                kv_heads);
  check.require(std::isfinite(scale), "scale = {} must be finite", scale);
  const cpu::AttentionDims s{q.dim(0), heads, kv_heads, seq_len, q.dim(1) / heads, v.dim(1) / kv_heads};
  check.shape(k, "k", {s.rows, kv_heads * s.key_dim});
  check.shape(v, "v", {s.rows, kv_heads * s.value_dim});
  check.blas_size(s.rows * heads * std::max(s.key_dim, s.value_dim), "attention operand size");
  return s;
}

// --- host memory --------------------------------------------------------------------------------

// Host blocks for the kernel's tensors, kept when freed and handed out again for a request of the
// same size class. Without it, every training step's large activations (glibc maps each block
// over 32 MiB fresh and unmaps it on free) fault in new zeroed pages: about 0.65 ms per MB on a
// 2-core VM, 500+ MB per MoE layer step, 8-14% of the step. Small blocks go to malloc, whose bins
// already reuse memory. Tensors hold the cache through their buffers, so blocks stay valid after
// the kernel object is gone; the cache frees everything when the last of them goes.
class HostBlockCache : public std::enable_shared_from_this<HostBlockCache> {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;  // smallest cached block, and the size class step

  explicit HostBlockCache(size_t max_idle_bytes) : max_idle_bytes_(max_idle_bytes) {}
  HostBlockCache(const HostBlockCache&) = delete;
  HostBlockCache& operator=(const HostBlockCache&) = delete;
  ~HostBlockCache() {
    for (const auto& [capacity, data] : idle_) std::free(data);
  }

  // A host buffer of at least `bytes`, zero-filled when `zeroed`.
  std::shared_ptr<Buffer> acquire(size_t bytes, bool zeroed) {
    auto buffer = std::make_shared<Buffer>();
    buffer->device = DeviceKind::cpu;
    if (bytes < kMinBytes || max_idle_bytes_ == 0) {  // malloc's own business
      void* data = std::calloc(std::max<size_t>(bytes, 1), 1);
      if (data == nullptr) throw RuntimeError(fmt::format("cpu kernel: out of host memory allocating {} bytes", bytes));
      buffer->data = data;
      buffer->bytes = bytes;
      buffer->owner = std::shared_ptr<void>(data, [](void* p) { std::free(p); });
      return buffer;
    }
    const size_t capacity = (bytes + kMinBytes - 1) / kMinBytes * kMinBytes;
    void* data = take(capacity);
    if (data != nullptr) {
      if (zeroed) std::memset(data, 0, capacity);
    } else {
      data = std::calloc(capacity, 1);  // fresh pages come zeroed, touched only when written
      if (data == nullptr)
        throw RuntimeError(fmt::format("cpu kernel: out of host memory allocating {} bytes", capacity));
    }
    buffer->data = data;
    buffer->bytes = capacity;
    buffer->owner =
        std::shared_ptr<void>(data, [cache = shared_from_this(), capacity](void* p) { cache->release(p, capacity); });
    return buffer;
  }

 private:
  void* take(size_t capacity) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = idle_.find(capacity);
    if (it == idle_.end()) return nullptr;
    void* data = it->second;
    idle_.erase(it);
    idle_bytes_ -= capacity;
    return data;
  }

  void release(void* data, size_t capacity) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (idle_bytes_ + capacity <= max_idle_bytes_) {
        idle_.emplace(capacity, data);
        idle_bytes_ += capacity;
        return;
      }
    }
    std::free(data);  // over the limit: back to the system
  }

  const size_t max_idle_bytes_;
  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;  // capacity -> block
  size_t idle_bytes_ = 0;
};

// --- the kernel -------------------------------------------------------------------------------

// glibc returns every freed block of 128 KiB and more to the system (mmap'd, then munmap'd), so
// the next allocation of that size faults its pages in again, zeroed by the OS: OpenBLAS's,
// oneDNN's and the kernel's own scratch of a few MiB, allocated per call. With cache_mb > 0 the
// kernel keeps blocks up to 32 MiB in the heap and lets glibc keep cache_mb of free memory at its
// top (process-wide settings, as OpenBLAS's thread count is). Measured on the medium recipe's
// training step (moelab-bench --train-step): 12-14% faster in f32 and bf16. MALLOC_MMAP_THRESHOLD_
// and MALLOC_TRIM_THRESHOLD_ in the environment win.
void keep_freed_memory(int64_t cache_mb) {
  if (cache_mb <= 0) return;
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") == nullptr) mallopt(M_MMAP_THRESHOLD, 32 << 20);
  if (std::getenv("MALLOC_TRIM_THRESHOLD_") == nullptr)
    mallopt(M_TRIM_THRESHOLD, static_cast<int>(std::min<int64_t>(cache_mb, 1024) << 20));
}

class CpuOps final : public Ops {
 public:
  static ParamSchema schema() {
    return {param_int("threads", 0,
                      "OpenBLAS threads (process-wide) and the kernel's own loop threads; 0 keeps OpenBLAS's "
                      "default (OPENBLAS_NUM_THREADS or all cores) and gives the loops every core")
                .range(0, 1024),
            param_int("cache_mb", 2048,
                      "freed host blocks of 1 MiB and more kept for reuse, in MiB at most; 0 returns them at once")
                .range(0, 1 << 20),
            param_choice("bf16_gemm", "auto", {"auto", "widen"},
                         "bf16 GEMMs: auto runs oneDNN where it is built in and fast on this CPU; widen always "
                         "widens the operands to f32 for OpenBLAS (the same maths, slower)")};
  }

  explicit CpuOps(const ParamSet& params)
      : blocks_(std::make_shared<HostBlockCache>(static_cast<size_t>(params.get_int("cache_mb")) << 20)),
        threads_(loop_threads(params.get_int("threads"))),
        bf16_(params.get_string("bf16_gemm") == "auto") {
    const int64_t threads = params.get_int("threads");
    // Sets OpenBLAS's process-wide thread count: every cpu kernel in the process shares it.
    if (threads > 0) openblas_set_num_threads(static_cast<int>(threads));
    keep_freed_memory(params.get_int("cache_mb"));
  }

  DeviceKind device() const override { return DeviceKind::cpu; }
  std::string name() const override { return "cpu"; }

  // --- memory -----------------------------------------------------------------------------

  Tensor empty(DType dtype, const Shape& shape) override { return allocate("empty", dtype, shape, false); }
  Tensor zeros(DType dtype, const Shape& shape) override { return allocate("zeros", dtype, shape, true); }

  void fill(Tensor& dst, double value) override {
    const OpCheck check("fill", {{"dst", &dst, Role::any}});
    const int64_t size = dst.numel();
    switch (dst.dtype()) {
      case DType::f32:
        std::fill_n(dst.data<float>(), size, static_cast<float>(value));
        return;
      case DType::f64:
        std::fill_n(dst.data<double>(), size, value);
        return;
      case DType::i32:
        std::fill_n(dst.data<int32_t>(), size, integer_fill<int32_t>(check, value));
        return;
      case DType::i64:
        std::fill_n(dst.data<int64_t>(), size, integer_fill<int64_t>(check, value));
        return;
      case DType::u8:
        std::fill_n(dst.data<uint8_t>(), size, integer_fill<uint8_t>(check, value));
        return;
      case DType::bf16:
        std::fill_n(static_cast<uint16_t*>(dst.raw()), size, cpu::bf16_from_f32(static_cast<float>(value)));
        return;
    }
  }

  void copy(const Tensor& src, Tensor& dst) override {
    const OpCheck check("copy", {{"src", &src, Role::any}, {"dst", &dst, Role::any}});
    check.require(src.dtype() == dst.dtype(), "dtypes differ: src is {}, dst is {}", dtype_name(src.dtype()),
                  dtype_name(dst.dtype()));
    check.require(src.numel() == dst.numel(), "element counts differ: {} vs {}", src.numel(), dst.numel());
    if (src.bytes() != 0 && src.raw() != dst.raw()) std::memmove(dst.raw(), src.raw(), src.bytes());
  }

  // --- dense linear algebra ---------------------------------------------------------------

  void gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta,
            Tensor& c) override {
    const OpCheck check("gemm", {{"c", &c}, {"a", &a, Role::any}, {"b", &b, Role::any}});
    const bool bf16 = bf16_compute(check, {{"a", &a}, {"b", &b}});
    check.rank(a, "a", 2);
    check.rank(b, "b", 2);
    check.rank(c, "c", 2);
    const int64_t m = trans_a ? a.dim(1) : a.dim(0), k = trans_a ? a.dim(0) : a.dim(1);
    const int64_t kb = trans_b ? b.dim(1) : b.dim(0), n = trans_b ? b.dim(0) : b.dim(1);
    check.require(k == kb,
                  "inner dimensions differ: op(a) is [{}, {}] (trans_a = {}), op(b) is [{}, {}] (trans_b = {})", m, k,
                  trans_a, kb, n, trans_b);
    check.shape(c, "c", {m, n});
    check.blas_size(m, "M");
    check.blas_size(n, "N");
    check.blas_size(k, "K");
    if (bf16) {
      const uint16_t* pa = bf16_operand(a, 0);
      const uint16_t* pb = bf16_operand(b, 1);
      bf16_.run(threads_, {{trans_a, trans_b, m, n, k, static_cast<float>(alpha), pa, a.dim(1), pb, b.dim(1),
                            static_cast<float>(beta), c.data<float>(), n}});
      return;
    }
    with_scalar(check.dtype(), [&]<class T>() {
      gemm_rows<T>(trans_a, trans_b, m, n, k, T(alpha), a.data<T>(), b.data<T>(), T(beta), c.data<T>());
    });
  }

  void grouped_gemm(const Tensor& x, const Tensor& w, bool trans_w, const std::vector<int64_t>& offsets, double alpha,
                    double beta, Tensor& y) override {
    const OpCheck check("grouped_gemm", {{"y", &y}, {"x", &x, Role::any}, {"w", &w, Role::any}});
    const bool bf16 = bf16_compute(check, {{"x", &x}, {"w", &w}});
    check.rank(x, "x", 2);
    check.rank(w, "w", 3);
    const int64_t rows = x.dim(0), k = x.dim(1), groups = w.dim(0);
    const int64_t n = trans_w ? w.dim(1) : w.dim(2);
    check.shape(w, "w", trans_w ? Shape{groups, n, k} : Shape{groups, k, n});
    check.shape(y, "y", {rows, n});
    check_offsets(check, offsets, groups, rows);
    check.blas_size(rows, "rows");
    check.blas_size(n, "N");
    check.blas_size(k, "K");
    if (bf16) {
      const uint16_t* px = bf16_operand(x, 0);
      const uint16_t* pw = bf16_operand(w, 1);
      float* py = y.data<float>();
      std::vector<cpu::Bf16GemmCall> calls;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t begin = offsets[g], count = offsets[g + 1] - begin;
        if (count == 0) continue;  // a group without rows owns no rows of y
        calls.push_back({false, trans_w, count, n, k, static_cast<float>(alpha), px + begin * k, k, pw + g * k * n,
                         trans_w ? k : n, static_cast<float>(beta), py + begin * n, n});
      }
      bf16_.run(threads_, calls);
      return;
    }
    with_scalar(check.dtype(), [&]<class T>() {
      const T* px = x.data<T>();
      const T* pw = w.data<T>();
      T* py = y.data<T>();
      std::vector<int64_t> small_groups, openblas_groups;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t count = offsets[g + 1] - offsets[g];
        // A group without rows owns no rows of y, so there is nothing to overwrite or scale.
        if (count == 0) continue;
        const bool small = small_group_kernel<T>(count, k, n, kSmallGroupMaxRows) ||
                           (small_group_kernel<T>(count, k, n, kSmallGroupL2MaxRows) && n * k <= l2_weight_floats());
        (small ? small_groups : openblas_groups).push_back(g);
      }
      blas_groups(
          threads_, openblas_groups, [&](int64_t g) { return static_cast<double>(offsets[g + 1] - offsets[g]); },
          [&](int64_t g) {
            const int64_t begin = offsets[g], count = offsets[g + 1] - begin;
            gemm_rows<T>(false, trans_w, count, n, k, T(alpha), px + begin * k, pw + g * k * n, T(beta),
                         py + begin * n);
          });
#if MOELAB_CPU_MULTIVERSION
      if constexpr (std::is_same_v<T, float>)
        if (!small_groups.empty())
          small_grouped_gemm(threads_, px, pw, trans_w, offsets, small_groups, k, n, T(alpha), T(beta), py);
#endif
    });
  }

  void grouped_gemm_weight_grad(const Tensor& x, const Tensor& dy, bool trans_w, const std::vector<int64_t>& offsets,
                                bool accumulate, Tensor& dw) override {
    const OpCheck check("grouped_gemm_weight_grad", {{"dw", &dw}, {"x", &x, Role::any}, {"dy", &dy, Role::any}});
    const bool bf16 = bf16_compute(check, {{"x", &x}, {"dy", &dy}});
    check.rank(x, "x", 2);
    check.rank(dy, "dy", 2);
    check.rank(dw, "dw", 3);
    const int64_t rows = x.dim(0), k = x.dim(1), n = dy.dim(1), groups = dw.dim(0);
    check.shape(dy, "dy", {rows, n});
    check.shape(dw, "dw", trans_w ? Shape{groups, n, k} : Shape{groups, k, n});
    check_offsets(check, offsets, groups, rows);
    check.blas_size(rows, "rows");
    check.blas_size(n, "N");
    check.blas_size(k, "K");
    if (bf16) {
      const uint16_t* px = bf16_operand(x, 0);
      const uint16_t* pdy = bf16_operand(dy, 1);
      float* pdw = dw.data<float>();
      const float beta = accumulate ? 1.0f : 0.0f;
      std::vector<cpu::Bf16GemmCall> calls;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t begin = offsets[g], count = offsets[g + 1] - begin;
        // count = 0 is an empty sum: dw[g] is kept when accumulating, zeroed otherwise.
        if (trans_w)  // dw[g] [N,K] = dy_g^T x_g
          calls.push_back(
              {true, false, n, k, count, 1.0f, pdy + begin * n, n, px + begin * k, k, beta, pdw + g * n * k, k});
        else  // dw[g] [K,N] = x_g^T dy_g
          calls.push_back(
              {true, false, k, n, count, 1.0f, px + begin * k, k, pdy + begin * n, n, beta, pdw + g * k * n, n});
      }
      bf16_.run(threads_, calls);
      return;
    }
    with_scalar(check.dtype(), [&]<class T>() {
      const T* px = x.data<T>();
      const T* pdy = dy.data<T>();
      T* pdw = dw.data<T>();
      const T beta = accumulate ? T(1) : T(0);
      std::vector<int64_t> small_groups, openblas_groups;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t count = offsets[g + 1] - offsets[g];
        const int64_t packed_floats = count * (trans_w ? k : n);  // b of out (+)= a^T b
        const bool small =
            small_group_kernel<T>(count, k, n, kSmallWeightGradMaxRows) && packed_floats <= kSmallWeightGradMaxFloats;
        (small ? small_groups : openblas_groups).push_back(g);
      }
      blas_groups(
          threads_, openblas_groups, [&](int64_t g) { return static_cast<double>(offsets[g + 1] - offsets[g] + 1); },
          [&](int64_t g) {
            const int64_t begin = offsets[g], count = offsets[g + 1] - begin;
            // count = 0 is an empty sum: gemm_rows leaves dw[g] as is when accumulating, zeroes it otherwise.
            if (trans_w)  // dw[g] [N,K] = dy_g^T x_g
              gemm_rows<T>(true, false, n, k, count, T(1), pdy + begin * n, px + begin * k, beta, pdw + g * n * k);
            else  // dw[g] [K,N] = x_g^T dy_g
              gemm_rows<T>(true, false, k, n, count, T(1), px + begin * k, pdy + begin * n, beta, pdw + g * k * n);
          });
#if MOELAB_CPU_MULTIVERSION
      if constexpr (std::is_same_v<T, float>)
        if (!small_groups.empty())
          small_grouped_weight_grad(threads_, px, pdy, trans_w, offsets, small_groups, k, n, accumulate, pdw);
#endif
    });
  }

  // --- precision --------------------------------------------------------------------------

  void cast(const Tensor& src, Tensor& dst) override {
    const OpCheck check("cast", {{"src", &src, Role::any}, {"dst", &dst, Role::any}});
    check.require(src.numel() == dst.numel(), "element counts differ: {} vs {}", src.numel(), dst.numel());
    const int64_t size = src.numel();
    if (src.dtype() == DType::f32 && dst.dtype() == DType::bf16) {
      const float* from = src.data<float>();
      auto* to = static_cast<uint16_t*>(dst.raw());
      parallel_chunks(threads_, size, 1, [&](int64_t b, int64_t e) { cpu::round_to_bf16(from + b, to + b, e - b); });
    } else if (src.dtype() == DType::bf16 && dst.dtype() == DType::f32) {
      const auto* from = static_cast<const uint16_t*>(src.raw());
      float* to = dst.data<float>();
      parallel_chunks(threads_, size, 1, [&](int64_t b, int64_t e) { cpu::widen_bf16(from + b, to + b, e - b); });
    } else if (src.dtype() == dst.dtype()) {
      copy(src, dst);
    } else {
      Ops::cast(src, dst);  // f64 to or from a narrower dtype: rare, on the host loop
    }
  }

  DType set_matmul_precision(DType precision) override {
    if (precision != DType::f32 && precision != DType::bf16)
      throw RuntimeError(fmt::format("cpu kernel: set_matmul_precision: {} is not a GEMM precision (f32 or bf16)",
                                     dtype_name(precision)));
    return std::exchange(matmul_precision_, precision);
  }
  DType matmul_precision() const override {
    return matmul_precision_;
  }
  std::string bf16_gemm_path() const override {
    return bf16_.description();
  }

  // --- elementwise and row-wise -----------------------------------------------------------

  void activation(Activation act, const Tensor& x, Tensor& y) override {
    const OpCheck check("activation", {{"x", &x}, {"y", &y}});
    check.shape(y, "y", x.shape());
    with_scalar(check.dtype(), [&]<class T>() {
      with_activation(act, [&]<class Fn>() {
        const T* px = x.data<T>();
        T* py = y.data<T>();
        parallel_chunks(threads_, x.numel(), 1, [&](int64_t begin, int64_t end) {
          run_vectorised<T, ActivationLoop<T, Fn>>(px, py, begin, end);
        });
      });
    });
  }

  void activation_backward(Activation act, const Tensor& x, const Tensor& dy, bool accumulate, Tensor& dx) override {
    const OpCheck check("activation_backward", {{"x", &x}, {"dy", &dy}, {"dx", &dx}});
    check.shape(dy, "dy", x.shape());
    check.shape(dx, "dx", x.shape());
    with_scalar(check.dtype(), [&]<class T>() {
      with_activation(act, [&]<class Fn>() {
        const T* px = x.data<T>();
        const T* pdy = dy.data<T>();
        T* pdx = dx.data<T>();
        parallel_chunks(threads_, x.numel(), 1, [&](int64_t begin, int64_t end) {
          run_vectorised<T, ActivationBackwardLoop<T, Fn>>(px, pdy, pdx, accumulate, begin, end);
        });
      });
    });
  }

  // gate_up [R, 2F] = [gate | up] -> h [R, F] = act(gate) * up
  void glu(Activation act, const Tensor& gate_up, Tensor& h) override {
    const OpCheck check("glu", {{"gate_up", &gate_up}, {"h", &h}});
    check.rank(gate_up, "gate_up", 2);
    const int64_t rows = gate_up.dim(0), width = gate_up.dim(1) / 2;
    check.require(gate_up.dim(1) % 2 == 0, "gate_up needs an even number of columns [gate | up], got {}",
                  gate_up.dim(1));
    check.shape(h, "h", {rows, width});
    with_scalar(check.dtype(), [&]<class T>() {
      with_activation(act, [&]<class Fn>() {
        const T* pgu = gate_up.data<T>();
        T* ph = h.data<T>();
        parallel_chunks(threads_, rows, width, [&](int64_t begin, int64_t end) {
          run_vectorised<T, GluForwardLoop<T, Fn>>(pgu, ph, begin, end, width);
        });
      });
    });
  }

  // dgate = act'(gate) * up * dh, dup = act(gate) * dh; overwrites dgate_up [R, 2F].
  void glu_backward(Activation act, const Tensor& gate_up, const Tensor& dh, Tensor& dgate_up) override {
    const OpCheck check("glu_backward", {{"gate_up", &gate_up}, {"dh", &dh}, {"dgate_up", &dgate_up}});
    check.rank(gate_up, "gate_up", 2);
    const int64_t rows = gate_up.dim(0), width = gate_up.dim(1) / 2;
    check.require(gate_up.dim(1) % 2 == 0, "gate_up needs an even number of columns [gate | up], got {}",
                  gate_up.dim(1));
    check.shape(dh, "dh", {rows, width});
    check.shape(dgate_up, "dgate_up", gate_up.shape());
    with_scalar(check.dtype(), [&]<class T>() {
      with_activation(act, [&]<class Fn>() {
        const T* pgu = gate_up.data<T>();
        const T* pdh = dh.data<T>();
        T* pd = dgate_up.data<T>();
        parallel_chunks(threads_, rows, width, [&](int64_t begin, int64_t end) {
          run_vectorised<T, GluBackwardLoop<T, Fn>>(pgu, pdh, pd, begin, end, width);
        });
      });
    });
  }

  void axpy(double alpha, const Tensor& z, Tensor& y) override {
    const OpCheck check("axpy", {{"z", &z}, {"y", &y}});
    check.shape(z, "z", y.shape());
    with_scalar(check.dtype(), [&]<class T>() {
      const T* pz = z.data<T>();
      T* py = y.data<T>();
      const T a = T(alpha);
      const int64_t size = y.numel();
      for (int64_t i = 0; i < size; ++i) py[i] += a * pz[i];
    });
  }

  void scale(double alpha, Tensor& y) override {
    const OpCheck check("scale", {{"y", &y}});
    with_scalar(check.dtype(), [&]<class T>() {
      T* py = y.data<T>();
      const T a = T(alpha);
      const int64_t size = y.numel();
      for (int64_t i = 0; i < size; ++i) py[i] *= a;
    });
  }

  // y [R,N] *= s [R] row-wise
  void scale_rows(const Tensor& s, Tensor& y) override {
    const OpCheck check("scale_rows", {{"s", &s}, {"y", &y}});
    check.rank(y, "y", 2);
    const int64_t rows = y.dim(0), cols = y.dim(1);
    check.shape(s, "s", {rows});
    with_scalar(check.dtype(), [&]<class T>() {
      const T* ps = s.data<T>();
      T* py = y.data<T>();
      parallel_chunks(threads_, rows, cols, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const T factor = ps[r];
          T* row = py + r * cols;
          for (int64_t c = 0; c < cols; ++c) row[c] *= factor;
        }
      });
    });
  }

  // y [R,N] += b [N] on every row
  void add_row_vector(const Tensor& b, Tensor& y) override {
    const OpCheck check("add_row_vector", {{"b", &b}, {"y", &y}});
    check.rank(y, "y", 2);
    const int64_t rows = y.dim(0), cols = y.dim(1);
    check.shape(b, "b", {cols});
    with_scalar(check.dtype(), [&]<class T>() {
      const T* pb = b.data<T>();
      T* py = y.data<T>();
      for (int64_t r = 0; r < rows; ++r) {
        T* row = py + r * cols;
        for (int64_t c = 0; c < cols; ++c) row[c] += pb[c];
      }
    });
  }

  // out [N] (+)= column sums of x [R,N], accumulated in double so that f32 sums over many rows
  // stay accurate.
  void sum_rows(const Tensor& x, bool accumulate, Tensor& out) override {
    const OpCheck check("sum_rows", {{"x", &x}, {"out", &out}});
    check.rank(x, "x", 2);
    const int64_t rows = x.dim(0), cols = x.dim(1);
    check.shape(out, "out", {cols});
    with_scalar(check.dtype(), [&]<class T>() {
      const T* px = x.data<T>();
      T* po = out.data<T>();
      std::vector<double> sums(static_cast<size_t>(cols), 0.0);
      double* ps = sums.data();
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = px + r * cols;
        for (int64_t c = 0; c < cols; ++c) ps[c] += static_cast<double>(row[c]);
      }
      for (int64_t c = 0; c < cols; ++c) store(accumulate, po, c, static_cast<T>(ps[c]));
    });
  }

  // out [R] = <a[r,:], b[r,:]>
  void row_dot(const Tensor& a, const Tensor& b, Tensor& out) override {
    const OpCheck check("row_dot", {{"a", &a}, {"b", &b}, {"out", &out}});
    check.rank(a, "a", 2);
    const int64_t rows = a.dim(0), cols = a.dim(1);
    check.shape(b, "b", a.shape());
    check.shape(out, "out", {rows});
    with_scalar(check.dtype(), [&]<class T>() {
      const T* pa = a.data<T>();
      const T* pb = b.data<T>();
      T* po = out.data<T>();
      parallel_chunks(threads_, rows, cols, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) po[r] = static_cast<T>(dot_in_double(pa + r * cols, pb + r * cols, cols));
      });
    });
  }

  // out = a * b elementwise (out may alias a or b)
  void mul(const Tensor& a, const Tensor& b, Tensor& out) override {
    const OpCheck check("mul", {{"a", &a}, {"b", &b}, {"out", &out}});
    check.shape(b, "b", a.shape());
    check.shape(out, "out", a.shape());
    with_scalar(check.dtype(), [&]<class T>() {
      const T* pa = a.data<T>();
      const T* pb = b.data<T>();
      T* po = out.data<T>();
      const int64_t size = a.numel();
      for (int64_t i = 0; i < size; ++i) po[i] = pa[i] * pb[i];
    });
  }

  // y [R,C] = x / (row sum of x)
  void normalize_rows(const Tensor& x, Tensor& y) override {
    const OpCheck check("normalize_rows", {{"x", &x}, {"y", &y}});
    check.rank(x, "x", 2);
    check.shape(y, "y", x.shape());
    const int64_t rows = x.dim(0), cols = x.dim(1);
    with_scalar(check.dtype(), [&]<class T>() {
      const T* px = x.data<T>();
      T* py = y.data<T>();
      for (int64_t r = 0; r < rows; ++r) {
        const T* xr = px + r * cols;
        double sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += static_cast<double>(xr[c]);
        const T inverse = static_cast<T>(1.0 / sum);
        T* yr = py + r * cols;
        for (int64_t c = 0; c < cols; ++c) yr[c] = xr[c] * inverse;
      }
    });
  }

  // dx (+)= (dy - <dy, y>) / sum(x), row-wise
  void normalize_rows_backward(const Tensor& x, const Tensor& y, const Tensor& dy, bool accumulate,
                               Tensor& dx) override {
    const OpCheck check("normalize_rows_backward", {{"x", &x}, {"y", &y}, {"dy", &dy}, {"dx", &dx}});
    check.rank(x, "x", 2);
    check.shape(y, "y", x.shape());
    check.shape(dy, "dy", x.shape());
    check.shape(dx, "dx", x.shape());
    const int64_t rows = x.dim(0), cols = x.dim(1);
    with_scalar(check.dtype(), [&]<class T>() {
      const T* px = x.data<T>();
      const T* py = y.data<T>();
      const T* pdy = dy.data<T>();
      T* pdx = dx.data<T>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t base = r * cols;
        double sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += static_cast<double>(px[base + c]);
        const T dot = static_cast<T>(dot_in_double(pdy + base, py + base, cols));
        const T inverse = static_cast<T>(1.0 / sum);
        for (int64_t c = 0; c < cols; ++c) store(accumulate, pdx, base + c, (pdy[base + c] - dot) * inverse);
      }
    });
  }

  // sum_i x_i^2 in double
  double sum_squares(const Tensor& x) override {
    const OpCheck check("sum_squares", {{"x", &x}});
    double sum = 0;
    with_scalar(check.dtype(), [&]<class T>() {
      const T* px = x.data<T>();
      sum = dot_in_double(px, px, x.numel());
    });
    return sum;
  }

  // One AdamW step in place, each element in double (the formula is in kernel.hpp):
  // param, m, v, grad all the same shape.
  void adamw_update(const AdamW& hyper, const Tensor& grad, Tensor& param, Tensor& m, Tensor& v) override {
    const OpCheck check("adamw_update", {{"grad", &grad}, {"param", &param}, {"m", &m}, {"v", &v}});
    check.shape(param, "param", grad.shape());
    check.shape(m, "m", grad.shape());
    check.shape(v, "v", grad.shape());
    check.require(hyper.step >= 1, "step must be at least 1 (it is 1-based), got {}", hyper.step);
    const double correction1 = 1.0 - std::pow(hyper.beta1, static_cast<double>(hyper.step));
    const double correction2 = 1.0 - std::pow(hyper.beta2, static_cast<double>(hyper.step));
    const AdamWStep step{hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay, hyper.lr, correction1, correction2};
    with_scalar(check.dtype(), [&]<class T>() {
      const T* pg = grad.data<T>();
      T* pp = param.data<T>();
      T* pm = m.data<T>();
      T* pv = v.data<T>();
      // 4 loads and 3 stores an element: worth a thread from 2^15 elements on (kMinElementsPerThread).
      parallel_chunks(threads_, grad.numel(), 4, [&](int64_t begin, int64_t end) {
        run_vectorised<T, AdamWLoop<T>>(pg, pp, pm, pv, step, begin, end);
      });
    });
  }

  // --- probabilities ----------------------------------------------------------------------

  // y [R,E] = softmax(x / temperature) row-wise, shifted by the row max so exp never overflows.
  // A row of only -inf has no softmax and gives NaN.
  void softmax_rows(const Tensor& x, double temperature, Tensor& y) override {
    const OpCheck check("softmax_rows", {{"x", &x}, {"y", &y}});
    check.rank(x, "x", 2);
    check.shape(y, "y", x.shape());
    check.require(temperature > 0 && std::isfinite(temperature), "temperature must be positive and finite, got {}",
                  temperature);
    const int64_t rows = x.dim(0), cols = x.dim(1);
    with_scalar(check.dtype(), [&]<class T>() {
      const T* px = x.data<T>();
      T* py = y.data<T>();
      const T inverse_temperature = T(1.0 / temperature);
      for (int64_t r = 0; r < rows; ++r) {
        const T* xr = px + r * cols;
        T* yr = py + r * cols;
        const T shift = row_max(xr, cols);
        double sum = 0;
        for (int64_t c = 0; c < cols; ++c) {
          yr[c] = std::exp((xr[c] - shift) * inverse_temperature);
          sum += static_cast<double>(yr[c]);
        }
        const T inverse_sum = static_cast<T>(1.0 / sum);
        for (int64_t c = 0; c < cols; ++c) yr[c] *= inverse_sum;
      }
    });
  }

  // dx (+)= y * (dy - <dy, y>) / temperature
  void softmax_rows_backward(const Tensor& y, const Tensor& dy, double temperature, bool accumulate,
                             Tensor& dx) override {
    const OpCheck check("softmax_rows_backward", {{"y", &y}, {"dy", &dy}, {"dx", &dx}});
    check.rank(y, "y", 2);
    check.shape(dy, "dy", y.shape());
    check.shape(dx, "dx", y.shape());
    check.require(temperature > 0 && std::isfinite(temperature), "temperature must be positive and finite, got {}",
                  temperature);
    const int64_t rows = y.dim(0), cols = y.dim(1);
    with_scalar(check.dtype(), [&]<class T>() {
      const T* py = y.data<T>();
      const T* pdy = dy.data<T>();
      T* pdx = dx.data<T>();
      const T inverse_temperature = T(1.0 / temperature);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t base = r * cols;
        const T dot = static_cast<T>(dot_in_double(pdy + base, py + base, cols));
        for (int64_t c = 0; c < cols; ++c)
          store(accumulate, pdx, base + c, py[base + c] * (pdy[base + c] - dot) * inverse_temperature);
      }
    });
  }

  void sigmoid(const Tensor& x, Tensor& y) override {
    map_elements("sigmoid", x, y, [](auto v) { return stable_sigmoid(v); });
  }

  // dx (+)= y (1 - y) dy
  void sigmoid_backward(const Tensor& y, const Tensor& dy, bool accumulate, Tensor& dx) override {
    map_gradient("sigmoid_backward", "y", y, dy, accumulate, dx, [](auto v, auto g) { return v * (1 - v) * g; });
  }

  // out [R] = max + log sum exp(x - max); an empty or all -inf row gives -inf, a row with +inf
  // gives +inf.
  void logsumexp_rows(const Tensor& x, Tensor& out) override {
    const OpCheck check("logsumexp_rows", {{"x", &x}, {"out", &out}});
    check.rank(x, "x", 2);
    const int64_t rows = x.dim(0), cols = x.dim(1);
    check.shape(out, "out", {rows});
    with_scalar(check.dtype(), [&]<class T>() {
      const T* px = x.data<T>();
      T* po = out.data<T>();
      for (int64_t r = 0; r < rows; ++r) {
        const T* xr = px + r * cols;
        const T shift = row_max(xr, cols);
        if (std::isinf(shift)) {
          po[r] = shift;
          continue;
        }
        double sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += static_cast<double>(std::exp(xr[c] - shift));
        po[r] = shift + static_cast<T>(std::log(sum));
      }
    });
  }

  void softplus(const Tensor& x, Tensor& y) override {
    map_elements("softplus", x, y, [](auto v) { return stable_softplus(v); });
  }

  // dx (+)= sigmoid(x) dy
  void softplus_backward(const Tensor& x, const Tensor& dy, bool accumulate, Tensor& dx) override {
    map_gradient("softplus_backward", "x", x, dy, accumulate, dx, [](auto v, auto g) { return stable_sigmoid(v) * g; });
  }

  // --- selection and movement -------------------------------------------------------------

  // Per row of scores [R,E], the k best of scores + bias, best first, ties to the lower index;
  // values [R,k] hold the unbiased scores, indices [R,k] the expert numbers.
  void topk_rows(const Tensor& scores, int k, const Tensor* bias, Tensor& values, Tensor& indices) override {
    const OpCheck check("topk_rows",
                        {{"scores", &scores}, {"bias", bias}, {"values", &values}, {"indices", &indices, Role::index}});
    check.rank(scores, "scores", 2);
    const int64_t rows = scores.dim(0), experts = scores.dim(1);
    check.require(k >= 1 && k <= experts, "k = {} must be between 1 and the number of columns {}", k, experts);
    check.require(experts <= INT32_MAX, "{} columns do not fit i32 indices", experts);
    if (bias) check.shape(*bias, "bias", {experts});
    check.shape(values, "values", {rows, k});
    check.shape(indices, "indices", {rows, k});
    with_scalar(check.dtype(), [&]<class T>() {
      const T* ps = scores.data<T>();
      const T* pb = bias ? bias->data<T>() : nullptr;
      // NaN has no rank; refuse it before writing anything (it means the run diverged).
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t e = 0; e < experts; ++e) {
          const T key = pb ? ps[r * experts + e] + pb[e] : ps[r * experts + e];
          check.require(!std::isnan(key), "scores{} at row {}, column {} is NaN", pb ? " + bias" : "", r, e);
        }
      T* pv = values.data<T>();
      int32_t* pi = indices.data<int32_t>();
      std::vector<T> keys(static_cast<size_t>(experts));
      std::vector<int32_t> order(static_cast<size_t>(experts));
      const auto better = [&keys](int32_t i, int32_t j) { return keys[i] > keys[j] || (keys[i] == keys[j] && i < j); };
      for (int64_t r = 0; r < rows; ++r) {
        const T* sr = ps + r * experts;
        for (int64_t e = 0; e < experts; ++e) keys[e] = pb ? sr[e] + pb[e] : sr[e];
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
        for (int j = 0; j < k; ++j) {
          pv[r * k + j] = sr[order[j]];
          pi[r * k + j] = order[j];
        }
      }
    });
  }

  // dst [M,N] row i = src [S,N] row index[i]
  // f32: flash-attention-style tiles on sgemm (attention.hpp); f64 (gradient checks): the
  // reference loops of the Ops base, which the f32 path is tested against.
  void causal_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads, int64_t kv_heads,
                        int64_t seq_len, double scale, Tensor& out, Tensor& lse) override {
    if (!all_f32({&q, &k, &v, &out, &lse}))
      return Ops::causal_attention(q, k, v, heads, kv_heads, seq_len, scale, out, lse);
    const OpCheck check("causal_attention", {{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}});
    const cpu::AttentionDims s = attention_dims(check, q, k, v, heads, kv_heads, seq_len, scale);
    check.shape(out, "out", {s.rows, heads * s.value_dim});
    check.shape(lse, "lse", {s.rows, heads});
    cpu::flash_attention_forward(s, static_cast<float>(scale), q.data<float>(), k.data<float>(), v.data<float>(),
                                 out.data<float>(), lse.data<float>(), for_each_item(s));
  }
  void causal_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                 const Tensor& lse, const Tensor& dout, int64_t heads, int64_t kv_heads,
                                 int64_t seq_len, double scale, Tensor& dq, Tensor& dk, Tensor& dv) override {
    if (!all_f32({&q, &k, &v, &out, &lse, &dout, &dq, &dk, &dv}))
      return Ops::causal_attention_backward(q, k, v, out, lse, dout, heads, kv_heads, seq_len, scale, dq, dk, dv);
    const OpCheck check("causal_attention_backward", {{"q", &q},
                                                      {"k", &k},
                                                      {"v", &v},
                                                      {"out", &out},
                                                      {"lse", &lse},
                                                      {"dout", &dout},
                                                      {"dq", &dq},
                                                      {"dk", &dk},
                                                      {"dv", &dv}});
    const cpu::AttentionDims s = attention_dims(check, q, k, v, heads, kv_heads, seq_len, scale);
    check.shape(out, "out", {s.rows, heads * s.value_dim});
    check.shape(lse, "lse", {s.rows, heads});
    check.shape(dout, "dout", out.shape());
    check.shape(dq, "dq", q.shape());
    check.shape(dk, "dk", k.shape());
    check.shape(dv, "dv", v.shape());
    cpu::flash_attention_backward(s, static_cast<float>(scale), q.data<float>(), k.data<float>(), v.data<float>(),
                                  out.data<float>(), lse.data<float>(), dout.data<float>(), dq.data<float>(),
                                  dk.data<float>(), dv.data<float>(), for_each_item(s));
  }

  void gather_rows(const Tensor& src, const Tensor& index, Tensor& dst) override {
    const OpCheck check("gather_rows", {{"src", &src}, {"index", &index, Role::index}, {"dst", &dst}});
    check.rank(src, "src", 2);
    check.rank(index, "index", 1);
    const int64_t count = index.dim(0), cols = src.dim(1);
    check.shape(dst, "dst", {count, cols});
    check_indices(check, index, "index", src.dim(0), "row of src");
    with_scalar(check.dtype(), [&]<class T>() {
      const T* ps = src.data<T>();
      const int32_t* pi = index.data<int32_t>();
      T* pd = dst.data<T>();
      parallel_chunks(threads_, count, cols, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) std::copy_n(ps + static_cast<int64_t>(pi[i]) * cols, cols, pd + i * cols);
      });
    });
  }

  // dst [S,N] row index[i] += weight[i] * src [M,N] row i, in order of i (deterministic).
  void scatter_add_rows(const Tensor& src, const Tensor& index, const Tensor* weight, Tensor& dst) override {
    const OpCheck check("scatter_add_rows",
                        {{"src", &src}, {"index", &index, Role::index}, {"weight", weight}, {"dst", &dst}});
    check.rank(src, "src", 2);
    check.rank(dst, "dst", 2);
    const int64_t count = src.dim(0), cols = src.dim(1);
    check.shape(index, "index", {count});
    if (weight) check.shape(*weight, "weight", {count});
    check.require(dst.dim(1) == cols, "src and dst rows differ in width: {} vs {}", cols, dst.dim(1));
    check_indices(check, index, "index", dst.dim(0), "row of dst");
    with_scalar(check.dtype(), [&]<class T>() {
      const T* ps = src.data<T>();
      const int32_t* pi = index.data<int32_t>();
      const T* pw = weight ? weight->data<T>() : nullptr;
      T* pd = dst.data<T>();
      // Threads own disjoint ranges of destination rows and each walks all of src in order, so
      // every destination row receives its additions in the serial order: deterministic.
      const int64_t dst_rows = dst.dim(0);
      parallel_chunks(threads_, dst_rows, count * cols / std::max<int64_t>(dst_rows, 1),
                      [&](int64_t begin, int64_t end) {
                        for (int64_t i = 0; i < count; ++i) {
                          const int64_t target = pi[i];
                          if (target < begin || target >= end) continue;
                          const T* from = ps + i * cols;
                          T* to = pd + target * cols;
                          if (pw) {
                            const T w = pw[i];
                            for (int64_t c = 0; c < cols; ++c) to[c] += w * from[c];
                          } else {
                            for (int64_t c = 0; c < cols; ++c) to[c] += from[c];
                          }
                        }
                      });
    });
  }

  // out [n] = x [R,C] at (row[i], col[i])
  void gather_elements(const Tensor& x, const Tensor& row, const Tensor& col, Tensor& out) override {
    const OpCheck check("gather_elements",
                        {{"x", &x}, {"row", &row, Role::index}, {"col", &col, Role::index}, {"out", &out}});
    check.rank(x, "x", 2);
    check.rank(row, "row", 1);
    const int64_t count = row.dim(0), cols = x.dim(1);
    check.shape(col, "col", {count});
    check.shape(out, "out", {count});
    check_indices(check, row, "row", x.dim(0), "row of x");
    check_indices(check, col, "col", cols, "column of x");
    with_scalar(check.dtype(), [&]<class T>() {
      const T* px = x.data<T>();
      const int32_t* pr = row.data<int32_t>();
      const int32_t* pc = col.data<int32_t>();
      T* po = out.data<T>();
      for (int64_t i = 0; i < count; ++i) po[i] = px[static_cast<int64_t>(pr[i]) * cols + pc[i]];
    });
  }

  // dx [R,C] at (row[i], col[i]) += dout [n]
  void scatter_add_elements(const Tensor& dout, const Tensor& row, const Tensor& col, Tensor& dx) override {
    const OpCheck check("scatter_add_elements",
                        {{"dout", &dout}, {"row", &row, Role::index}, {"col", &col, Role::index}, {"dx", &dx}});
    check.rank(dx, "dx", 2);
    check.rank(dout, "dout", 1);
    const int64_t count = dout.dim(0), cols = dx.dim(1);
    check.shape(row, "row", {count});
    check.shape(col, "col", {count});
    check_indices(check, row, "row", dx.dim(0), "row of dx");
    check_indices(check, col, "col", cols, "column of dx");
    with_scalar(check.dtype(), [&]<class T>() {
      const T* pg = dout.data<T>();
      const int32_t* pr = row.data<int32_t>();
      const int32_t* pc = col.data<int32_t>();
      T* pd = dx.data<T>();
      for (int64_t i = 0; i < count; ++i) pd[static_cast<int64_t>(pr[i]) * cols + pc[i]] += pg[i];
    });
  }

 private:
  // Whether every operand is a defined host f32 tensor (the tiled path); anything else goes to the
  // reference, which also says what is wrong with it.
  static bool all_f32(std::initializer_list<const Tensor*> operands) {
    for (const Tensor* t : operands)
      if (!t->defined() || t->dtype() != DType::f32 || t->device() != DeviceKind::cpu) return false;
    return true;
  }
  // The attention's items (a sequence and a head) on the kernel's threads, each one's GEMMs
  // single-threaded (blas_groups), or one after the other when there are too few to share.
  cpu::ForEachItem for_each_item(const cpu::AttentionDims& s) const {
    const double flops = 2.0 * static_cast<double>(s.seq_len) * static_cast<double>(s.seq_len) *
                         static_cast<double>(s.key_dim + s.value_dim);
    return [this, flops](int64_t count, const std::function<void(int64_t)>& body) {
      std::vector<int64_t> items(static_cast<size_t>(count));
      std::iota(items.begin(), items.end(), int64_t{0});
      blas_groups(
          threads_, items, [flops](int64_t) { return flops; }, body);
    };
  }

  // Whether a GEMM with output check.dtype() computes in bf16, after checking the dtypes of its
  // inputs: f64 with an f64 output; f32 or bf16, each, with an f32 output.
  bool bf16_compute(const OpCheck& check, std::initializer_list<std::pair<const char*, const Tensor*>> inputs) const {
    const DType out = check.dtype();
    bool any_bf16 = false;
    for (const auto& [name, tensor] : inputs) {
      const DType dtype = tensor->dtype();
      check.require(dtype == out || (out == DType::f32 && dtype == DType::bf16),
                    "{} has dtype {}; with a {} output the inputs are {}", name, dtype_name(dtype), dtype_name(out),
                    out == DType::f32 ? "f32 or bf16" : "f64");
      any_bf16 = any_bf16 || dtype == DType::bf16;
    }
    return any_bf16 || (out == DType::f32 && matmul_precision_ == DType::bf16);
  }

  // A bf16 view of a GEMM operand: its own storage, or a copy rounded into scratch `slot`.
  const uint16_t* bf16_operand(const Tensor& t, int slot) {
    if (t.dtype() == DType::bf16) return static_cast<const uint16_t*>(t.raw());
    std::vector<uint16_t>& scratch = bf16_scratch_[slot];
    const int64_t size = t.numel();
    if (scratch.size() < static_cast<size_t>(size)) scratch.resize(static_cast<size_t>(size));
    const float* from = t.data<float>();
    uint16_t* to = scratch.data();
    parallel_chunks(threads_, size, 1, [&](int64_t b, int64_t e) { cpu::round_to_bf16(from + b, to + b, e - b); });
    return to;
  }

  Tensor allocate(const char* op, DType dtype, const Shape& shape, bool zeroed) {
    int64_t count = 1;
    for (int64_t d : shape) {
      if (d < 0)
        throw RuntimeError(fmt::format("cpu kernel: {}: negative dimension in shape {}", op, shape_str(shape)));
      if (d != 0 && count > std::numeric_limits<int64_t>::max() / d)
        throw RuntimeError(fmt::format("cpu kernel: {}: shape {} has too many elements", op, shape_str(shape)));
      count *= d;
    }
    if (count > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(dtype_size(dtype)))
      throw RuntimeError(fmt::format("cpu kernel: {}: shape {} has too many bytes", op, shape_str(shape)));
    return Tensor(blocks_->acquire(static_cast<size_t>(count) * dtype_size(dtype), zeroed), dtype, shape);
  }

  // y[i] = f(x[i]) for a y of x's shape.
  template <class F>
  static void map_elements(const char* op, const Tensor& x, Tensor& y, const F& f) {
    const OpCheck check(op, {{"x", &x}, {"y", &y}});
    check.shape(y, "y", x.shape());
    with_scalar(check.dtype(), [&]<class T>() {
      const T* px = x.data<T>();
      T* py = y.data<T>();
      const int64_t size = x.numel();
      for (int64_t i = 0; i < size; ++i) py[i] = f(px[i]);
    });
  }

  // dx[i] (+)= f(saved[i], dy[i]): the backward of an elementwise op from what its forward saved
  // (its input or its output, named `saved_name` in errors).
  template <class F>
  static void map_gradient(const char* op, const char* saved_name, const Tensor& saved, const Tensor& dy,
                           bool accumulate, Tensor& dx, const F& f) {
    const OpCheck check(op, {{saved_name, &saved}, {"dy", &dy}, {"dx", &dx}});
    check.shape(dy, "dy", saved.shape());
    check.shape(dx, "dx", saved.shape());
    with_scalar(check.dtype(), [&]<class T>() {
      const T* ps = saved.data<T>();
      const T* pdy = dy.data<T>();
      T* pdx = dx.data<T>();
      const int64_t size = saved.numel();
      for (int64_t i = 0; i < size; ++i) store(accumulate, pdx, i, static_cast<T>(f(ps[i], pdy[i])));
    });
  }

  // An integer dtype holds `value` only when it is a whole number in range.
  template <class I>
  static I integer_fill(const OpCheck& check, double value) {
    check.require(std::trunc(value) == value && value >= static_cast<double>(std::numeric_limits<I>::min()) &&
                      value < static_cast<double>(std::numeric_limits<I>::max()) + 1.0,
                  "{} cannot be stored exactly in an integer tensor", value);
    return static_cast<I>(value);
  }

  // The kernel's own loops use as many threads as OpenBLAS is given (they never run at the same
  // time as a GEMM), or every core when that is left to OpenBLAS's default.
  static int loop_threads(int64_t threads) {
    if (threads > 0) return static_cast<int>(threads);
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }

  std::shared_ptr<HostBlockCache> blocks_;
  int threads_ = 1;
  cpu::Bf16Gemm bf16_;
  DType matmul_precision_ = DType::f32;
  std::vector<uint16_t> bf16_scratch_[3];  // rounded copies of f32 GEMM operands, reused
};

}  // namespace
}  // namespace moelab

using moelab::CpuOps;
MOELAB_KERNEL_PLUGIN(CpuOps, "cpu", "1.0.0", "reference CPU kernels on OpenBLAS")

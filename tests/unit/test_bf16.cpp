// bf16 on the cpu kernel: casts, GEMMs with bf16 operands, and f32 GEMMs computed in bf16
// (Ops::set_matmul_precision), on both of its paths (oneDNN where it is built in, widened to f32
// on OpenBLAS), against f64 references on fresh random inputs.
//
// Tolerances. A bf16 keeps 8 significant bits: rounding to it is off by at most u = 2^-8 relative.
// A product of two bf16 values is exact in f32 (16 bits), so a bf16 GEMM against the f64 product
// of the same rounded operands carries only the f32 sums' error: gamma_k(2^-24) relative to
// sum |a b|, taken here as 2 k 2^-24 (+ alpha/beta's two roundings). Against the f64 product of
// the unrounded f32 operands, each term is off by up to 2u + u^2 relative to |a b|.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "moelab/kernel.hpp"
#include "moelab/rng.hpp"
#include "test_support.hpp"

using namespace moelab;
using namespace moelab::test;

namespace {

constexpr double kF32 = 1.0 / (1 << 24);
constexpr double kBf16Rounding = 1.0 / (1 << 8);  // u
constexpr double kBf16Product = 2 * kBf16Rounding + kBf16Rounding * kBf16Rounding;

uint16_t bits_of(const Tensor& bf16, int64_t i) {
  uint16_t out;
  std::memcpy(&out, static_cast<const char*>(bf16.raw()) + 2 * i, 2);
  return out;
}

Tensor to_dtype(Ops& ops, const Tensor& t, DType dtype) {
  Tensor out = host_tensor(dtype, t.shape());
  ops.cast(t, out);
  return out;
}

std::vector<double> doubles(const Tensor& t) {
  std::vector<double> out(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) out[static_cast<size_t>(i)] = host_value(t, i);
  return out;
}

// c = alpha op(a) op(b) + beta c in f64, and the bound of each element's error: `relative` times
// alpha sum_k |a b|, plus two f32 roundings of the result.
struct Expected {
  std::vector<double> value, bound;
};
Expected reference(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                   const std::vector<double>& a, const std::vector<double>& b, double beta,
                   const std::vector<double>& c, double relative) {
  Expected out{std::vector<double>(static_cast<size_t>(m * n)), std::vector<double>(static_cast<size_t>(m * n))};
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double sum = 0, magnitude = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double x = trans_a ? a[p * m + i] : a[i * k + p];
        const double y = trans_b ? b[j * k + p] : b[p * n + j];
        sum += x * y;
        magnitude += std::abs(x * y);
      }
      const double old = beta != 0 ? beta * c[i * n + j] : 0;
      const size_t e = static_cast<size_t>(i * n + j);
      out.value[e] = alpha * sum + old;
      out.bound[e] = relative * std::abs(alpha) * magnitude + 4 * kF32 * (std::abs(alpha * sum) + std::abs(old));
    }
  return out;
}

// The largest |actual - expected| / bound; at most 1 passes.
double worst_ratio(const Tensor& actual, const Expected& expected) {
  double worst = 0;
  for (int64_t i = 0; i < actual.numel(); ++i) {
    const double error = std::abs(host_value(actual, i) - expected.value[static_cast<size_t>(i)]);
    const double bound = expected.bound[static_cast<size_t>(i)] + 1e-30;
    if (!(error <= bound)) worst = std::max(worst, std::isnan(error) ? INFINITY : error / bound);
  }
  return worst;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.bytes() == b.bytes() && std::memcmp(a.raw(), b.raw(), a.bytes()) == 0;
}

std::vector<std::shared_ptr<Ops>> both_paths() {
  return {load_kernel("cpu", {{"bf16_gemm", std::string("auto")}}),
          load_kernel("cpu", {{"bf16_gemm", std::string("widen")}})};
}

}  // namespace

TEST_CASE("cast rounds f32 to the nearest bf16 (ties to even), keeps NaN and infinities, and widens exactly") {
  Ops& ops = cpu_kernel();
  const float tie_down = 1.0f + 1.0f / 256;       // halfway between 1 and 1 + 2^-7: to even (1)
  const float tie_up = 1.0f + 3.0f / 256;         // halfway between 1 + 2^-7 and 1 + 2^-6: to even (up)
  const float above = 1.0f + 1.0f / 256 + 1e-6f;  // past halfway: up
  const std::vector<float> values = {0.0f,
                                     -0.0f,
                                     1.0f,
                                     tie_down,
                                     tie_up,
                                     above,
                                     -above,
                                     std::numeric_limits<float>::infinity(),
                                     -std::numeric_limits<float>::infinity(),
                                     std::numeric_limits<float>::quiet_NaN(),
                                     3.0e38f,
                                     1e-40f};
  Tensor f32 = host_tensor(DType::f32, {static_cast<int64_t>(values.size())});
  std::copy(values.begin(), values.end(), f32.data<float>());
  const Tensor bf16 = to_dtype(ops, f32, DType::bf16);
  CHECK(bits_of(bf16, 0) == 0x0000);
  CHECK(bits_of(bf16, 1) == 0x8000);
  CHECK(bits_of(bf16, 2) == 0x3f80);
  CHECK(bits_of(bf16, 3) == 0x3f80);
  CHECK(bits_of(bf16, 4) == 0x3f82);
  CHECK(bits_of(bf16, 5) == 0x3f81);
  CHECK(bits_of(bf16, 6) == 0xbf81);
  CHECK(bits_of(bf16, 7) == 0x7f80);
  CHECK(bits_of(bf16, 8) == 0xff80);
  CHECK(std::isnan(host_value(bf16, 9)));
  CHECK(host_value(bf16, 10) == doctest::Approx(3.0e38).epsilon(kBf16Rounding));
  const Tensor back = to_dtype(ops, bf16, DType::f32);
  for (int64_t i = 0; i < back.numel(); ++i)
    if (i != 9) CHECK(host_value(back, i) == host_value(bf16, i));  // widening is exact

  // Large and random: within u = 2^-8 relative, and the host's set_host_value agrees bit for bit.
  Rng rng(41);
  const Tensor x = random_uniform(DType::f32, {4099}, rng, -3.0, 3.0);
  const Tensor r = to_dtype(ops, x, DType::bf16);
  Tensor host = host_tensor(DType::bf16, {4099});
  for (int64_t i = 0; i < x.numel(); ++i) {
    set_host_value(host, i, host_value(x, i));
    REQUIRE(std::abs(host_value(r, i) - host_value(x, i)) <= std::abs(host_value(x, i)) * kBf16Rounding);
  }
  CHECK(same_bits(r, host));
}

TEST_CASE("bf16 gemm: every transpose, alpha and beta, against f64 on the rounded operands, on both paths") {
  Rng rng(42);
  const int64_t m = 37, n = 300, k = 77;  // c split by columns (n > 256), and a K that is no multiple of 32
  for (const std::shared_ptr<Ops>& ops : both_paths()) {
    CAPTURE(ops->bf16_gemm_path());
    for (const bool trans_a : {false, true})
      for (const bool trans_b : {false, true})
        for (const auto& [alpha, beta] : std::vector<std::pair<double, double>>{{1.0, 0.0}, {0.5, 1.0}, {-2.0, 0.25}}) {
          CAPTURE(trans_a);
          CAPTURE(trans_b);
          CAPTURE(alpha);
          CAPTURE(beta);
          const Tensor a =
              to_dtype(*ops, random_uniform(DType::f32, trans_a ? Shape{k, m} : Shape{m, k}, rng), DType::bf16);
          const Tensor b =
              to_dtype(*ops, random_uniform(DType::f32, trans_b ? Shape{n, k} : Shape{k, n}, rng), DType::bf16);
          Tensor c = random_uniform(DType::f32, {m, n}, rng);
          if (beta == 0) std::fill_n(c.data<float>(), c.numel(), std::numeric_limits<float>::quiet_NaN());
          const Expected expected =
              reference(trans_a, trans_b, m, n, k, alpha, doubles(a), doubles(b), beta, doubles(c), 2 * k * kF32);
          ops->gemm(trans_a, trans_b, alpha, a, b, beta, c);
          CHECK(worst_ratio(c, expected) <= 1.0);
        }
  }
}

TEST_CASE("f32 GEMMs in bf16 precision round their operands: equal to the bf16-tensor GEMM, within 2^-7 of f64") {
  Rng rng(43);
  for (const std::shared_ptr<Ops>& ops : both_paths()) {
    CAPTURE(ops->bf16_gemm_path());
    const Tensor a = random_uniform(DType::f32, {300, 129}, rng), b = random_uniform(DType::f32, {129, 70}, rng);
    Tensor exact = host_tensor(DType::f32, {300, 70});
    ops->gemm(false, false, 1.0, a, b, 0.0, exact);
    CHECK(ops->matmul_precision() == DType::f32);
    CHECK(ops->set_matmul_precision(DType::bf16) == DType::f32);
    Tensor rounded = host_tensor(DType::f32, {300, 70});
    ops->gemm(false, false, 1.0, a, b, 0.0, rounded);
    CHECK(ops->set_matmul_precision(DType::f32) == DType::bf16);
    Tensor from_bf16 = host_tensor(DType::f32, {300, 70});
    ops->gemm(false, false, 1.0, to_dtype(*ops, a, DType::bf16), to_dtype(*ops, b, DType::bf16), 0.0, from_bf16);
    CHECK(same_bits(rounded, from_bf16));
    const Expected expected =
        reference(false, false, 300, 70, 129, 1.0, doubles(a), doubles(b), 0.0, {}, kBf16Product + 2 * 129 * kF32);
    CHECK(worst_ratio(rounded, expected) <= 1.0);
    // and the rounding is visible: bf16 precision is not the f32 GEMM
    CHECK_FALSE(same_bits(rounded, exact));
    // f64 GEMMs never change precision
    const Tensor a64 = random_uniform(DType::f64, {5, 4}, rng), b64 = random_uniform(DType::f64, {4, 3}, rng);
    Tensor c64 = host_tensor(DType::f64, {5, 3}), c64_bf16 = host_tensor(DType::f64, {5, 3});
    ops->gemm(false, false, 1.0, a64, b64, 0.0, c64);
    const MatmulPrecisionScope scope(*ops, DType::bf16);
    ops->gemm(false, false, 1.0, a64, b64, 0.0, c64_bf16);
    CHECK(same_bits(c64, c64_bf16));
  }
}

TEST_CASE("bf16 grouped_gemm and its weight gradient: uneven and empty groups, both layouts, both paths") {
  Rng rng(44);
  const std::vector<int64_t> rows = {0, 1, 300, 17, 0, 600, 64};  // 600 rows: several row blocks
  std::vector<int64_t> offsets{0};
  for (const int64_t r : rows) offsets.push_back(offsets.back() + r);
  const int64_t total = offsets.back(), groups = static_cast<int64_t>(rows.size()), k = 48, n = 40;
  for (const std::shared_ptr<Ops>& ops : both_paths()) {
    CAPTURE(ops->bf16_gemm_path());
    for (const bool trans_w : {false, true}) {
      CAPTURE(trans_w);
      const Tensor x = to_dtype(*ops, random_uniform(DType::f32, {total, k}, rng), DType::bf16);
      const Tensor w = to_dtype(
          *ops, random_uniform(DType::f32, trans_w ? Shape{groups, n, k} : Shape{groups, k, n}, rng), DType::bf16);
      Tensor y = random_uniform(DType::f32, {total, n}, rng);
      const std::vector<double> old_y = doubles(y);
      ops->grouped_gemm(x, w, trans_w, offsets, 0.5, 1.0, y);
      const std::vector<double> xd = doubles(x), wd = doubles(w);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t begin = offsets[g], count = rows[g];
        if (count == 0) continue;
        const std::vector<double> xg(xd.begin() + begin * k, xd.begin() + (begin + count) * k);
        const std::vector<double> wg(wd.begin() + g * k * n, wd.begin() + (g + 1) * k * n);
        const std::vector<double> yg(old_y.begin() + begin * n, old_y.begin() + (begin + count) * n);
        const Expected expected = reference(false, trans_w, count, n, k, 0.5, xg, wg, 1.0, yg, 2 * k * kF32);
        CAPTURE(g);
        CHECK(worst_ratio(y.rows(begin, begin + count), expected) <= 1.0);
      }

      const Tensor dy = to_dtype(*ops, random_uniform(DType::f32, {total, n}, rng), DType::bf16);
      for (const bool accumulate : {false, true}) {
        CAPTURE(accumulate);
        Tensor dw = random_uniform(DType::f32, trans_w ? Shape{groups, n, k} : Shape{groups, k, n}, rng);
        const std::vector<double> old_dw = doubles(dw);
        ops->grouped_gemm_weight_grad(x, dy, trans_w, offsets, accumulate, dw);
        const std::vector<double> dyd = doubles(dy);
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t begin = offsets[g], count = rows[g];
          const std::vector<double> xg(xd.begin() + begin * k, xd.begin() + (begin + count) * k);
          const std::vector<double> dyg(dyd.begin() + begin * n, dyd.begin() + (begin + count) * n);
          const std::vector<double> old(old_dw.begin() + g * k * n, old_dw.begin() + (g + 1) * k * n);
          // dw[g] = x_g^T dy_g ([K, N]) or dy_g^T x_g ([N, K]): a = the first, stored [count, .]
          const Expected expected =
              trans_w
                  ? reference(true, false, n, k, count, 1.0, dyg, xg, accumulate ? 1.0 : 0.0, old, 2 * count * kF32)
                  : reference(true, false, k, n, count, 1.0, xg, dyg, accumulate ? 1.0 : 0.0, old, 2 * count * kF32);
          CAPTURE(g);
          CHECK(worst_ratio(dw.rows(g, g + 1).reshaped(trans_w ? Shape{n, k} : Shape{k, n}), expected) <= 1.0);
        }
      }
    }
  }
}

TEST_CASE("bf16 GEMMs give bit-identical results on 1 and 2 threads") {
  Rng rng(45);
  const Tensor a = random_uniform(DType::f32, {1100, 96}, rng), b = random_uniform(DType::f32, {96, 300}, rng);
  const std::vector<int64_t> offsets = {0, 500, 520, 1100};
  const Tensor w = random_uniform(DType::f32, {3, 96, 300}, rng);
  const Tensor dy = random_uniform(DType::f32, {1100, 300}, rng);
  std::vector<Tensor> results;
  for (const int64_t threads : {1, 2}) {
    const std::shared_ptr<Ops> ops = load_kernel("cpu", {{"threads", threads}});
    const MatmulPrecisionScope scope(*ops, DType::bf16);
    Tensor c = host_tensor(DType::f32, {1100, 300}), y = host_tensor(DType::f32, {1100, 300});
    Tensor dw = host_tensor(DType::f32, {3, 96, 300});
    ops->gemm(false, false, 1.0, a, b, 0.0, c);
    ops->grouped_gemm(a, w, false, offsets, 1.0, 0.0, y);
    ops->grouped_gemm_weight_grad(a, dy, false, offsets, false, dw);
    results.insert(results.end(), {c, y, dw});
  }
  CHECK(same_bits(results[0], results[3]));
  CHECK(same_bits(results[1], results[4]));
  CHECK(same_bits(results[2], results[5]));
}

TEST_CASE("bf16 operands are refused where they do not fit, naming the op and what it takes") {
  Ops& ops = cpu_kernel();
  Rng rng(46);
  const Tensor a = to_dtype(ops, random_uniform(DType::f32, {3, 4}, rng), DType::bf16);
  const Tensor b = random_uniform(DType::f64, {4, 2}, rng);
  Tensor c64 = host_tensor(DType::f64, {3, 2}), c_bf16 = host_tensor(DType::bf16, {3, 2});
  const auto message = [](const std::function<void()>& call) {
    try {
      call();
    } catch (const RuntimeError& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  CHECK(message([&] { ops.gemm(false, false, 1, a, b, 0, c64); }).find("a has dtype bf16; with a f64 output") !=
        std::string::npos);
  CHECK(message([&] { ops.gemm(false, false, 1, a, a, 0, c_bf16); }).find("c is bf16, which this op does not take") !=
        std::string::npos);
  CHECK(message([&] { ops.set_matmul_precision(DType::f64); }).find("not a GEMM precision") != std::string::npos);
  CHECK(ops.matmul_precision() == DType::f32);
  CHECK_FALSE(ops.bf16_gemm_path().empty());
}

// The reference "cpu" kernel, loaded through the registry as a recipe loads it. Every op against a
// naive loop on fresh random inputs in f32 and f64; every backward op against central finite
// differences of its forward in f64; accumulate vs overwrite; grouped ops with empty and uneven
// groups; top-k ties and bias; and errors that name the op and the shapes.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numbers>
#include <numeric>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace moelab;
using namespace moelab::test;

namespace {

template <class T>
constexpr DType kDType = dtype_of<T>();

// Unit roundoff u: 2^-24 for f32, 2^-53 for f64.
template <class T>
constexpr double kUnitRoundoff = std::numeric_limits<T>::epsilon() / 2;

// Higham's gamma_n = n u / (1 - n u): the relative error bound of n rounded operations in any
// order (a dot product of n terms, FMA or not, blocked or not), relative to the sum of the
// magnitudes of the terms.
template <class T>
double gamma(double n) {
  return n * kUnitRoundoff<T> / (1 - n * kUnitRoundoff<T>);
}

// Tolerance for results compared with max_rel_error (floor 1 unless said otherwise, inputs O(1))
// after about `operations` rounded steps per element: gamma-style n u, times 4 for the libm
// functions' few ulps and the rounding of intermediate values up to a few times the result.
template <class T>
double tolerance(double operations) {
  return 4 * operations * kUnitRoundoff<T>;
}

// Gradient checks run in f64 with central differences of step 1e-6, accurate to about 1e-10
// relative for these smooth O(1) functions (see numeric_gradient); a wrong gradient is off by
// O(1). 1e-6 sits four orders of magnitude from both.
constexpr double kGradientTolerance = 1e-6;

template <class T>
Tensor uniform(const Shape& shape, Rng& rng, double lo = -1.0, double hi = 1.0) {
  return random_uniform(kDType<T>, shape, rng, lo, hi);
}

// An output whose old contents must not be read (overwrite semantics, beta = 0).
template <class T>
Tensor garbage(const Shape& shape) {
  Tensor t = host_tensor(kDType<T>, shape);
  std::fill_n(t.data<T>(), t.numel(), std::numeric_limits<T>::quiet_NaN());
  return t;
}

Tensor indices_of(const std::vector<int32_t>& values) {
  Tensor t = host_tensor(DType::i32, {static_cast<int64_t>(values.size())});
  std::copy(values.begin(), values.end(), t.data<int32_t>());
  return t;
}

// max_i |actual_i - expected_i| / bound_i: at most 1 when every element is within its bound.
double bounded_error(const Tensor& actual, const std::vector<double>& expected, const std::vector<double>& bound) {
  const std::vector<double> got = values_of(actual);
  if (got.size() != expected.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double error = std::abs(got[i] - expected[i]) / (bound[i] + std::numeric_limits<double>::min());
    if (std::isnan(error)) return INFINITY;
    worst = std::max(worst, error);
  }
  return worst;
}

// c[m,n] = alpha op(a) op(b) + beta c0 on row-major arrays (a [m,k] or [k,m] when trans_a, b [k,n]
// or [n,k] when trans_b), and the rounding-error bound of computing it in T in any order:
// gamma_{k+2} (|alpha| sum |a||b| + |beta c0|). beta = 0 does not read c0.
template <class T>
void reference_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                    const double* b, double beta, const double* c0, double* value, double* bound) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double sum = 0, magnitude = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double av = trans_a ? a[p * m + i] : a[i * k + p];
        const double bv = trans_b ? b[j * k + p] : b[p * n + j];
        sum += av * bv;
        magnitude += std::abs(av * bv);
      }
      const double old = beta == 0 ? 0.0 : beta * c0[i * n + j];
      value[i * n + j] = alpha * sum + old;
      bound[i * n + j] = gamma<T>(static_cast<double>(k + 2)) * (std::abs(alpha) * magnitude + std::abs(old));
    }
}

// --- elementwise reference formulas, in double, as the textbooks write them ---------------------

constexpr double kSqrt2OverPi = 0.7978845608028654;

double sigmoid_ref(double x) {
  return 1 / (1 + std::exp(-x));
}
double gelu_tanh_ref(double x) {
  return 0.5 * x * (1 + std::tanh(kSqrt2OverPi * (x + 0.044715 * x * x * x)));
}
double gelu_tanh_grad_ref(double x) {
  const double t = std::tanh(kSqrt2OverPi * (x + 0.044715 * x * x * x));
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * kSqrt2OverPi * (1 + 3 * 0.044715 * x * x);
}
double gelu_erf_ref(double x) {
  return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
}
double gelu_erf_grad_ref(double x) {
  return 0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * std::numbers::pi);
}
double silu_ref(double x) {
  return x * sigmoid_ref(x);
}
double silu_grad_ref(double x) {
  const double s = sigmoid_ref(x);
  return s * (1 + x * (1 - s));
}
double softplus_ref(double x) {
  return x > 30 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

// One elementwise op with its backward: forward(x) -> y and backward(x, dy) -> (+)dx, and the
// textbook value and derivative.
struct UnaryCase {
  std::string name;
  std::function<double(double)> value, derivative;
  std::function<void(Ops&, const Tensor&, Tensor&)> forward;
  std::function<void(Ops&, const Tensor&, const Tensor&, bool, Tensor&)> backward;
};

UnaryCase activation_case(Activation act, std::function<double(double)> value,
                          std::function<double(double)> derivative) {
  return {activation_name(act), std::move(value), std::move(derivative),
          [act](Ops& ops, const Tensor& x, Tensor& y) { ops.activation(act, x, y); },
          [act](Ops& ops, const Tensor& x, const Tensor& dy, bool accumulate, Tensor& dx) {
            ops.activation_backward(act, x, dy, accumulate, dx);
          }};
}

std::vector<UnaryCase> unary_cases() {
  return {
      activation_case(
          Activation::identity, [](double x) { return x; }, [](double) { return 1.0; }),
      activation_case(
          Activation::relu, [](double x) { return x > 0 ? x : 0.0; }, [](double x) { return x > 0 ? 1.0 : 0.0; }),
      activation_case(Activation::gelu_tanh, gelu_tanh_ref, gelu_tanh_grad_ref),
      activation_case(Activation::gelu_erf, gelu_erf_ref, gelu_erf_grad_ref),
      activation_case(Activation::silu, silu_ref, silu_grad_ref),
      // sigmoid's backward takes y = sigmoid(x), made here by the forward under test
      {"sigmoid", sigmoid_ref, [](double x) { return sigmoid_ref(x) * (1 - sigmoid_ref(x)); },
       [](Ops& ops, const Tensor& x, Tensor& y) { ops.sigmoid(x, y); },
       [](Ops& ops, const Tensor& x, const Tensor& dy, bool accumulate, Tensor& dx) {
         Tensor y = ops.empty(x.dtype(), x.shape());
         ops.sigmoid(x, y);
         ops.sigmoid_backward(y, dy, accumulate, dx);
       }},
      {"softplus", softplus_ref, sigmoid_ref, [](Ops& ops, const Tensor& x, Tensor& y) { ops.softplus(x, y); },
       [](Ops& ops, const Tensor& x, const Tensor& dy, bool accumulate, Tensor& dx) {
         ops.softplus_backward(x, dy, accumulate, dx);
       }},
  };
}

// Inputs for elementwise checks: O(1) values, kept 0.05 away from 0 (relu's kink; finite
// differences straddling it would be meaningless), then the extremes where naive formulas
// overflow or cancel.
template <class T>
Tensor unary_inputs(Rng& rng) {
  std::vector<double> values;
  for (int i = 0; i < 120; ++i) values.push_back((rng.uniform() < 0.5 ? -1 : 1) * rng.uniform(0.05, 6.0));
  for (double x : {-1000.0, -200.0, -40.0, -12.0, 12.0, 40.0, 200.0, 1000.0}) values.push_back(x);
  return tensor_of(kDType<T>, {16, static_cast<int64_t>(values.size()) / 16}, values);
}

}  // namespace

// --- loading and memory -------------------------------------------------------------------------

TEST_CASE("the cpu kernel loads through the registry with its declared schema") {
  const PluginInfo* info = registry().find(PluginKind::kernel, "cpu");
  REQUIRE(info != nullptr);
  CHECK(info->version == "1.0.0");
  CHECK(info->description == "reference CPU kernels on OpenBLAS");
  REQUIRE(info->schema.size() == 3);
  const ParamSpec& threads = info->schema[0];
  CHECK(threads.name == "threads");
  CHECK(threads.type == ParamType::integer);
  CHECK(std::get<int64_t>(*threads.default_value) == 0);
  CHECK(check_param_value(threads, ParamValue{int64_t{-1}}) != "");
  CHECK(check_param_value(threads, ParamValue{int64_t{2}}) == "");
  const ParamSpec& cache = info->schema[1];
  CHECK(cache.name == "cache_mb");
  CHECK(std::get<int64_t>(*cache.default_value) == 2048);
  CHECK(check_param_value(cache, ParamValue{int64_t{-1}}) != "");
  const ParamSpec& bf16_gemm = info->schema[2];
  CHECK(bf16_gemm.name == "bf16_gemm");
  CHECK(std::get<std::string>(*bf16_gemm.default_value) == "auto");
  CHECK(check_param_value(bf16_gemm, ParamValue{std::string("amx")}) != "");

  Ops& ops = cpu_kernel();
  CHECK(ops.name() == "cpu");
  CHECK(ops.device() == DeviceKind::cpu);
}

TEST_CASE("memory: empty, zeros, fill and copy on host tensors") {
  Ops& ops = cpu_kernel();
  Tensor z = ops.zeros(DType::f32, {3, 4});
  CHECK(z.device() == DeviceKind::cpu);
  CHECK(z.shape() == Shape{3, 4});
  for (double v : values_of(z)) CHECK(v == 0.0);
  Tensor e = ops.empty(DType::i32, {5});
  CHECK(e.dtype() == DType::i32);
  CHECK(e.numel() == 5);
  CHECK(ops.empty(DType::f64, {0, 7}).numel() == 0);
  CHECK(error_of([&] { ops.zeros(DType::f32, {2, -1}); }).find("zeros") != std::string::npos);

  ops.fill(z, 2.5);
  for (double v : values_of(z)) CHECK(v == 2.5);
  ops.fill(e, -7);
  for (double v : values_of(e)) CHECK(v == -7.0);
  CHECK(error_of([&] { ops.fill(e, 1.5); }).find("fill") != std::string::npos);
  Tensor bf16 = host_tensor(DType::bf16, {2});
  ops.fill(bf16, 1.5);  // exact in bf16
  for (double v : values_of(bf16)) CHECK(v == 1.5);

  // copy needs equal dtype and element count, not equal shape
  Rng rng(1);
  Tensor src = uniform<double>({2, 6}, rng);
  Tensor dst = ops.empty(DType::f64, {3, 4});
  ops.copy(src, dst);
  CHECK(values_of(dst) == values_of(src));
  CHECK(ops.to_host(dst).raw() == dst.raw());  // host tensors are their own host copy
  Tensor wrong_dtype = ops.empty(DType::f32, {12});
  const std::string dtype_error = error_of([&] { ops.copy(src, wrong_dtype); });
  CHECK(dtype_error.find("copy") != std::string::npos);
  CHECK(dtype_error.find("f32") != std::string::npos);
  Tensor wrong_size = ops.empty(DType::f64, {11});
  CHECK(error_of([&] { ops.copy(src, wrong_size); }).find("copy") != std::string::npos);
}

TEST_CASE("large host blocks are reused after release, zeroed again by zeros, and outlive the kernel") {
  std::shared_ptr<Ops> ops = load_kernel("cpu");  // its own block cache
  const Shape big{1024, 1024};                    // 4 MiB of f32, above the 1 MiB the cache starts at
  const void* first = nullptr;
  {
    Tensor t = ops->empty(DType::f32, big);
    first = t.raw();
    ops->fill(t, 7.0);
  }
  Tensor again = ops->zeros(DType::f32, big);
  CHECK(again.raw() == first);
  const float* p = again.data<float>();
  CHECK(std::all_of(p, p + again.numel(), [](float v) { return v == 0.0f; }));
  // A request rounding up to the same size class gets a released block back too.
  const void* second = again.raw();
  again = Tensor();
  Tensor smaller = ops->empty(DType::f32, {1024 * 1024 - 100});
  CHECK(smaller.raw() == second);

  // Blocks stay valid after the kernel object is gone (the sanitizer build checks the rest).
  Tensor survivor = ops->zeros(DType::f64, {700, 300});
  ops.reset();
  std::fill_n(survivor.data<double>(), survivor.numel(), 1.5);
  CHECK(survivor.data<double>()[survivor.numel() - 1] == 1.5);

  // cache_mb = 0 gives every block back at once; allocation still works and zeros still zero.
  const std::shared_ptr<Ops> uncached = load_kernel("cpu", {{"cache_mb", int64_t{0}}});
  Tensor z = uncached->zeros(DType::f32, big);
  CHECK(std::all_of(z.data<float>(), z.data<float>() + z.numel(), [](float v) { return v == 0.0f; }));
}

// --- dense and grouped GEMM ---------------------------------------------------------------------

TEST_CASE_TEMPLATE("gemm matches a naive triple loop for every transpose, alpha and beta", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(101);
  struct Size {
    int64_t m, n, k;
  };
  for (Size s : {Size{7, 5, 9}, Size{1, 1, 1}, Size{33, 65, 17}, Size{64, 48, 200}})
    for (bool trans_a : {false, true})
      for (bool trans_b : {false, true})
        for (double beta : {0.0, 0.3, 1.0}) {
          CAPTURE(s.m);
          CAPTURE(s.n);
          CAPTURE(s.k);
          CAPTURE(trans_a);
          CAPTURE(trans_b);
          CAPTURE(beta);
          const double alpha = -0.7;
          const Tensor a = uniform<T>(trans_a ? Shape{s.k, s.m} : Shape{s.m, s.k}, rng);
          const Tensor b = uniform<T>(trans_b ? Shape{s.n, s.k} : Shape{s.k, s.n}, rng);
          // beta = 0 must not read c: NaN there would leak into the result
          Tensor c = beta == 0 ? garbage<T>({s.m, s.n}) : uniform<T>({s.m, s.n}, rng);
          const std::vector<double> va = values_of(a), vb = values_of(b), vc = values_of(c);
          std::vector<double> expected(static_cast<size_t>(s.m * s.n)), bound(expected.size());
          reference_gemm<T>(trans_a, trans_b, s.m, s.n, s.k, alpha, va.data(), vb.data(), beta, vc.data(),
                            expected.data(), bound.data());
          ops.gemm(trans_a, trans_b, alpha, a, b, beta, c);
          CHECK(bounded_error(c, expected, bound) <= 1.0);
        }
}

TEST_CASE_TEMPLATE("gemm with an empty dimension", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(102);
  // K = 0: the product is an empty sum, so c = beta c, and beta = 0 gives zeros even over NaN.
  const Tensor a = uniform<T>({3, 0}, rng), b = uniform<T>({0, 4}, rng);
  Tensor c = uniform<T>({3, 4}, rng);
  const Tensor before = clone(c);
  ops.gemm(false, false, 1.0, a, b, 0.5, c);
  std::vector<double> expected = values_of(before);
  for (double& v : expected) v *= 0.5;
  CHECK(values_of(c) == expected);
  Tensor nan_c = garbage<T>({3, 4});
  ops.gemm(false, false, 1.0, a, b, 0.0, nan_c);
  for (double v : values_of(nan_c)) CHECK(v == 0.0);
  // M = 0: nothing to compute
  Tensor empty_c = host_tensor(kDType<T>, {0, 4});
  ops.gemm(false, false, 1.0, uniform<T>({0, 5}, rng), uniform<T>({5, 4}, rng), 0.0, empty_c);
}

TEST_CASE("gemm's transposed products are its gradients (finite differences, f64)") {
  Ops& ops = cpu_kernel();
  Rng rng(103);
  const int64_t m = 4, n = 3, k = 5;
  for (bool trans_a : {false, true})
    for (bool trans_b : {false, true}) {
      CAPTURE(trans_a);
      CAPTURE(trans_b);
      const Tensor a = uniform<double>(trans_a ? Shape{k, m} : Shape{m, k}, rng);
      const Tensor b = uniform<double>(trans_b ? Shape{n, k} : Shape{k, n}, rng);
      const Tensor dy = uniform<double>({m, n}, rng);
      const auto product = [&](const Tensor& lhs, const Tensor& rhs) {
        Tensor y = host_tensor(DType::f64, {m, n});
        ops.gemm(trans_a, trans_b, 1.0, lhs, rhs, 0.0, y);
        return y;
      };
      // y = op(a) op(b): d op(a) = dy op(b)^T, d op(b) = op(a)^T dy, stored back in a's and b's layout
      Tensor da = host_tensor(DType::f64, a.shape()), db = host_tensor(DType::f64, b.shape());
      if (trans_a)
        ops.gemm(trans_b, true, 1.0, b, dy, 0.0, da);
      else
        ops.gemm(false, !trans_b, 1.0, dy, b, 0.0, da);
      if (trans_b)
        ops.gemm(true, trans_a, 1.0, dy, a, 0.0, db);
      else
        ops.gemm(!trans_a, false, 1.0, a, dy, 0.0, db);
      CHECK(max_rel_error(da, numeric_gradient([&](const Tensor& x) { return product(x, b); }, a, dy)) <
            kGradientTolerance);
      CHECK(max_rel_error(db, numeric_gradient([&](const Tensor& x) { return product(a, x); }, b, dy)) <
            kGradientTolerance);
    }
}

namespace {
// Uneven segments with empty groups first, in the middle and last.
const std::vector<int64_t> kOffsets = {0, 0, 3, 4, 4, 11, 19, 19};
constexpr int64_t kGroups = 7, kRows = 19;
}  // namespace

TEST_CASE_TEMPLATE("grouped_gemm matches a per-group naive loop, empty and uneven groups", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(201);
  const int64_t k = 6, n = 5;
  for (bool trans_w : {false, true})
    for (double beta : {0.0, 0.5}) {
      CAPTURE(trans_w);
      CAPTURE(beta);
      const double alpha = 1.3;
      const Tensor x = uniform<T>({kRows, k}, rng);
      const Tensor w = uniform<T>(trans_w ? Shape{kGroups, n, k} : Shape{kGroups, k, n}, rng);
      Tensor y = beta == 0 ? garbage<T>({kRows, n}) : uniform<T>({kRows, n}, rng);
      const std::vector<double> vx = values_of(x), vw = values_of(w), vy = values_of(y);
      std::vector<double> expected(vy.size()), bound(vy.size());
      for (int64_t g = 0; g < kGroups; ++g) {
        const int64_t begin = kOffsets[g], count = kOffsets[g + 1] - begin;
        reference_gemm<T>(false, trans_w, count, n, k, alpha, vx.data() + begin * k, vw.data() + g * k * n, beta,
                          vy.data() + begin * n, expected.data() + begin * n, bound.data() + begin * n);
      }
      ops.grouped_gemm(x, w, trans_w, kOffsets, alpha, beta, y);
      CHECK(bounded_error(y, expected, bound) <= 1.0);
    }
}

TEST_CASE_TEMPLATE("grouped_gemm_weight_grad: naive loop, accumulate vs overwrite, empty groups", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(202);
  const int64_t k = 6, n = 5;
  for (bool trans_w : {false, true})
    for (bool accumulate : {false, true}) {
      CAPTURE(trans_w);
      CAPTURE(accumulate);
      const Tensor x = uniform<T>({kRows, k}, rng);
      const Tensor dy = uniform<T>({kRows, n}, rng);
      // Overwriting starts from NaN (never read); accumulating from random values (kept as is in
      // the empty groups).
      Tensor dw = accumulate ? uniform<T>(trans_w ? Shape{kGroups, n, k} : Shape{kGroups, k, n}, rng)
                             : garbage<T>(trans_w ? Shape{kGroups, n, k} : Shape{kGroups, k, n});
      const std::vector<double> vx = values_of(x), vdy = values_of(dy), vdw = values_of(dw);
      std::vector<double> expected(vdw.size()), bound(vdw.size());
      const double beta = accumulate ? 1.0 : 0.0;
      for (int64_t g = 0; g < kGroups; ++g) {
        const int64_t begin = kOffsets[g], count = kOffsets[g + 1] - begin;
        if (trans_w)  // dw[g] [n,k] = dy_g^T x_g
          reference_gemm<T>(true, false, n, k, count, 1.0, vdy.data() + begin * n, vx.data() + begin * k, beta,
                            vdw.data() + g * n * k, expected.data() + g * n * k, bound.data() + g * n * k);
        else  // dw[g] [k,n] = x_g^T dy_g
          reference_gemm<T>(true, false, k, n, count, 1.0, vx.data() + begin * k, vdy.data() + begin * n, beta,
                            vdw.data() + g * k * n, expected.data() + g * k * n, bound.data() + g * k * n);
      }
      ops.grouped_gemm_weight_grad(x, dy, trans_w, kOffsets, accumulate, dw);
      CHECK(bounded_error(dw, expected, bound) <= 1.0);
      // Group 0 has no rows: untouched when accumulating (bit for bit), zero when overwriting.
      const std::vector<double> got = values_of(dw);
      for (int64_t i = 0; i < k * n; ++i) CHECK(got[i] == (accumulate ? vdw[i] : 0.0));
    }
}

TEST_CASE("grouped_gemm's gradients are grouped_gemm_weight_grad and the transposed grouped_gemm (f64)") {
  Ops& ops = cpu_kernel();
  Rng rng(203);
  const int64_t k = 3, n = 4;
  for (bool trans_w : {false, true}) {
    CAPTURE(trans_w);
    const Tensor x = uniform<double>({kRows, k}, rng);
    const Tensor w = uniform<double>(trans_w ? Shape{kGroups, n, k} : Shape{kGroups, k, n}, rng);
    const Tensor dy = uniform<double>({kRows, n}, rng);
    const auto forward = [&](const Tensor& xs, const Tensor& ws) {
      Tensor y = host_tensor(DType::f64, {kRows, n});
      ops.grouped_gemm(xs, ws, trans_w, kOffsets, 1.0, 0.0, y);
      return y;
    };
    Tensor dw = garbage<double>(w.shape());
    ops.grouped_gemm_weight_grad(x, dy, trans_w, kOffsets, false, dw);
    CHECK(max_rel_error(dw, numeric_gradient([&](const Tensor& ws) { return forward(x, ws); }, w, dy)) <
          kGradientTolerance);
    Tensor dx = garbage<double>(x.shape());
    ops.grouped_gemm(dy, w, !trans_w, kOffsets, 1.0, 0.0, dx);
    CHECK(max_rel_error(dx, numeric_gradient([&](const Tensor& xs) { return forward(xs, w); }, x, dy)) <
          kGradientTolerance);
  }
}

// --- elementwise ops ----------------------------------------------------------------------------

TEST_CASE_TEMPLATE("activations, sigmoid and softplus match their textbook formulas, extremes included", T, float,
                   double) {
  Ops& ops = cpu_kernel();
  Rng rng(301);
  for (const UnaryCase& op : unary_cases()) {
    CAPTURE(op.name);
    const Tensor x = unary_inputs<T>(rng);
    const std::vector<double> vx = values_of(x);
    // forward: a libm call or two and a handful of products (tolerance: 16 rounded steps); the
    // extremes (|x| up to 1000) must come out finite and right where naive formulas overflow.
    Tensor y = garbage<T>(x.shape());
    op.forward(ops, x, y);
    std::vector<double> expected(vx.size());
    for (size_t i = 0; i < vx.size(); ++i) expected[i] = op.value(vx[i]);
    CHECK(max_rel_error(values_of(y), expected) <= tolerance<T>(16));

    // backward, both gradient modes: dx = f'(x) dy, or dx0 + f'(x) dy
    const Tensor dy = uniform<T>(x.shape(), rng);
    const std::vector<double> vdy = values_of(dy);
    for (bool accumulate : {false, true}) {
      CAPTURE(accumulate);
      Tensor dx = accumulate ? uniform<T>(x.shape(), rng) : garbage<T>(x.shape());
      const std::vector<double> vdx = values_of(dx);
      op.backward(ops, x, dy, accumulate, dx);
      for (size_t i = 0; i < vx.size(); ++i) expected[i] = op.derivative(vx[i]) * vdy[i] + (accumulate ? vdx[i] : 0);
      CHECK(max_rel_error(values_of(dx), expected) <= tolerance<T>(16));
    }
  }
}

TEST_CASE("elementwise backward ops against finite differences of their forward (f64)") {
  Ops& ops = cpu_kernel();
  Rng rng(302);
  for (const UnaryCase& op : unary_cases()) {
    CAPTURE(op.name);
    // O(1) inputs away from 0 (see unary_inputs); no extremes, where differences say nothing.
    std::vector<double> values;
    for (int i = 0; i < 40; ++i) values.push_back((rng.uniform() < 0.5 ? -1 : 1) * rng.uniform(0.05, 4.0));
    const Tensor x = tensor_of(DType::f64, {5, 8}, values);
    const Tensor dy = uniform<double>(x.shape(), rng);
    Tensor dx = garbage<double>(x.shape());
    op.backward(ops, x, dy, false, dx);
    const Tensor numeric = numeric_gradient(
        [&](const Tensor& xs) {
          Tensor y = host_tensor(DType::f64, xs.shape());
          op.forward(ops, xs, y);
          return y;
        },
        x, dy);
    CHECK(max_rel_error(dx, numeric) < kGradientTolerance);
  }
}

TEST_CASE_TEMPLATE("glu and glu_backward match the naive loop; glu_backward overwrites", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(303);
  const int64_t rows = 6, width = 7;
  for (Activation act :
       {Activation::silu, Activation::gelu_tanh, Activation::gelu_erf, Activation::relu, Activation::identity}) {
    CAPTURE(activation_name(act));
    const std::vector<UnaryCase> cases = unary_cases();
    const UnaryCase op =
        *std::find_if(cases.begin(), cases.end(), [&](const UnaryCase& c) { return c.name == activation_name(act); });
    const Tensor gate_up = uniform<T>({rows, 2 * width}, rng, -4, 4);
    const Tensor dh = uniform<T>({rows, width}, rng);
    Tensor h = garbage<T>({rows, width});
    Tensor dgate_up = garbage<T>({rows, 2 * width});
    ops.glu(act, gate_up, h);
    ops.glu_backward(act, gate_up, dh, dgate_up);
    const std::vector<double> gu = values_of(gate_up), vdh = values_of(dh);
    std::vector<double> expected_h(static_cast<size_t>(rows * width)), expected_d(gu.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < width; ++j) {
        const double gate = gu[r * 2 * width + j], up = gu[r * 2 * width + width + j], g = vdh[r * width + j];
        expected_h[r * width + j] = op.value(gate) * up;
        expected_d[r * 2 * width + j] = op.derivative(gate) * up * g;
        expected_d[r * 2 * width + width + j] = op.value(gate) * g;
      }
    CHECK(max_rel_error(values_of(h), expected_h) <= tolerance<T>(16));
    CHECK(max_rel_error(values_of(dgate_up), expected_d) <= tolerance<T>(16));
  }
}

TEST_CASE("glu_backward against finite differences of glu (f64)") {
  Ops& ops = cpu_kernel();
  Rng rng(304);
  for (Activation act : {Activation::silu, Activation::gelu_tanh, Activation::gelu_erf, Activation::identity}) {
    CAPTURE(activation_name(act));
    const Tensor gate_up = uniform<double>({3, 10}, rng, -3, 3);
    const Tensor dh = uniform<double>({3, 5}, rng);
    Tensor dgate_up = garbage<double>(gate_up.shape());
    ops.glu_backward(act, gate_up, dh, dgate_up);
    const Tensor numeric = numeric_gradient(
        [&](const Tensor& gu) {
          Tensor h = host_tensor(DType::f64, {3, 5});
          ops.glu(act, gu, h);
          return h;
        },
        gate_up, dh);
    CHECK(max_rel_error(dgate_up, numeric) < kGradientTolerance);
  }
}

TEST_CASE_TEMPLATE("axpy, scale, mul, scale_rows and add_row_vector match naive loops", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(305);
  const int64_t rows = 9, cols = 13;
  // Each element sees one or two roundings: tolerance 2 steps, relative (floor tiny).
  const double floor = 1e-30;
  const Tensor z = uniform<T>({rows, cols}, rng), b = uniform<T>({cols}, rng), s = uniform<T>({rows}, rng);
  const std::vector<double> vz = values_of(z), vb = values_of(b), vs = values_of(s);

  Tensor y = uniform<T>({rows, cols}, rng);
  std::vector<double> expected = values_of(y);
  ops.axpy(-0.6, z, y);
  for (size_t i = 0; i < expected.size(); ++i) expected[i] += -0.6 * vz[i];
  CHECK(max_rel_error(values_of(y), expected, 1.0) <= tolerance<T>(2));  // cancellation: absolute below 1

  expected = values_of(y);
  ops.scale(1.7, y);
  for (double& v : expected) v *= 1.7;
  CHECK(max_rel_error(values_of(y), expected, floor) <= tolerance<T>(2));

  expected = values_of(y);
  ops.mul(y, z, y);  // out aliases a
  for (size_t i = 0; i < expected.size(); ++i) expected[i] *= vz[i];
  CHECK(max_rel_error(values_of(y), expected, floor) <= tolerance<T>(1));

  expected = values_of(y);
  ops.scale_rows(s, y);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) expected[r * cols + c] *= vs[r];
  CHECK(max_rel_error(values_of(y), expected, floor) <= tolerance<T>(1));

  expected = values_of(y);
  ops.add_row_vector(b, y);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) expected[r * cols + c] += vb[c];
  CHECK(max_rel_error(values_of(y), expected, 1.0) <= tolerance<T>(1));
}

// --- row reductions -----------------------------------------------------------------------------

TEST_CASE_TEMPLATE("sum_rows, row_dot and sum_squares match naive sums", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(401);
  const int64_t rows = 37, cols = 11;
  const Tensor x = uniform<T>({rows, cols}, rng), other = uniform<T>({rows, cols}, rng);
  const std::vector<double> vx = values_of(x), vo = values_of(other);

  // Sums of n terms of size <= 1: gamma_n-style tolerance n + 2, absolute below 1.
  for (bool accumulate : {false, true}) {
    CAPTURE(accumulate);
    Tensor out = accumulate ? uniform<T>({cols}, rng) : garbage<T>({cols});
    std::vector<double> expected = accumulate ? values_of(out) : std::vector<double>(cols, 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) expected[c] += vx[r * cols + c];
    ops.sum_rows(x, accumulate, out);
    CHECK(max_rel_error(values_of(out), expected) <= tolerance<T>(rows + 2));
  }

  Tensor dots = garbage<T>({rows});
  ops.row_dot(x, other, dots);
  std::vector<double> expected(rows, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) expected[r] += vx[r * cols + c] * vo[r * cols + c];
  CHECK(max_rel_error(values_of(dots), expected) <= tolerance<T>(cols + 2));

  double squares = 0;
  for (double v : vx) squares += v * v;
  // accumulated in double whatever T is
  CHECK(std::abs(ops.sum_squares(x) - squares) <= tolerance<double>(static_cast<double>(vx.size())) * squares);
}

TEST_CASE_TEMPLATE("normalize_rows and its backward match the naive loop", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(402);
  const int64_t rows = 8, cols = 6;
  // Gate weights are positive; relative tolerance (floor tiny) of a row sum and a division.
  const Tensor x = uniform<T>({rows, cols}, rng, 0.1, 1.0);
  const std::vector<double> vx = values_of(x);
  Tensor y = garbage<T>(x.shape());
  ops.normalize_rows(x, y);
  std::vector<double> expected(vx.size()), sums(rows, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) sums[r] += vx[r * cols + c];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) expected[r * cols + c] = vx[r * cols + c] / sums[r];
  CHECK(max_rel_error(values_of(y), expected, 1e-30) <= tolerance<T>(cols + 2));

  const Tensor dy = uniform<T>(x.shape(), rng);
  const std::vector<double> vy = values_of(y), vdy = values_of(dy);
  for (bool accumulate : {false, true}) {
    CAPTURE(accumulate);
    Tensor dx = accumulate ? uniform<T>(x.shape(), rng) : garbage<T>(x.shape());
    std::vector<double> want = accumulate ? values_of(dx) : std::vector<double>(vx.size(), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      double dot = 0;
      for (int64_t c = 0; c < cols; ++c) dot += vdy[r * cols + c] * vy[r * cols + c];
      for (int64_t c = 0; c < cols; ++c) want[r * cols + c] += (vdy[r * cols + c] - dot) / sums[r];
    }
    ops.normalize_rows_backward(x, y, dy, accumulate, dx);
    // (dy - dot) / sum with |dy|, |dot| <= 1 and sum >= 0.6: absolute below 1, cols + 4 steps
    CHECK(max_rel_error(values_of(dx), want) <= tolerance<T>(cols + 4));
  }
}

TEST_CASE("normalize_rows_backward against finite differences (f64)") {
  Ops& ops = cpu_kernel();
  Rng rng(403);
  const Tensor x = uniform<double>({4, 5}, rng, 0.1, 1.0);
  const Tensor dy = uniform<double>(x.shape(), rng);
  Tensor y = host_tensor(DType::f64, x.shape());
  ops.normalize_rows(x, y);
  Tensor dx = garbage<double>(x.shape());
  ops.normalize_rows_backward(x, y, dy, false, dx);
  const auto forward = [&](const Tensor& xs) {
    Tensor out = host_tensor(DType::f64, xs.shape());
    ops.normalize_rows(xs, out);
    return out;
  };
  CHECK(max_rel_error(dx, numeric_gradient(forward, x, dy)) < kGradientTolerance);
}

// --- softmax and logsumexp ----------------------------------------------------------------------

TEST_CASE_TEMPLATE("softmax_rows matches the naive loop, and large logits do not overflow", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(501);
  const int64_t rows = 10, cols = 13;
  const double temperature = 0.7;
  const auto reference = [&](const std::vector<double>& vx) {
    std::vector<double> out(vx.size());
    for (int64_t r = 0; r < rows; ++r) {
      const double* xr = vx.data() + r * cols;
      const double shift = *std::max_element(xr, xr + cols);
      double sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += out[r * cols + c] = std::exp((xr[c] - shift) / temperature);
      for (int64_t c = 0; c < cols; ++c) out[r * cols + c] /= sum;
    }
    return out;
  };
  // Ordinary logits: every probability to relative accuracy (floor tiny). Arguments of exp up to
  // 8/0.7 ~ 11 carry an absolute error of ~11 u, which exp turns into relative error; plus the
  // sum of cols terms: cols + 16 steps.
  const Tensor x = uniform<T>({rows, cols}, rng, -4, 4);
  Tensor y = garbage<T>(x.shape());
  ops.softmax_rows(x, temperature, y);
  CHECK(max_rel_error(values_of(y), reference(values_of(x)), 1e-30) <= tolerance<T>(cols + 16));

  // Logits of +-300 (exp(300 / 0.7) overflows even f64 unshifted): finite, and right to an
  // absolute error of ~|x|/T u per entry (the exp argument's own rounding), so 512 steps.
  const Tensor big = uniform<T>({rows, cols}, rng, -300, 300);
  ops.softmax_rows(big, temperature, y);
  const std::vector<double> vy = values_of(y);
  for (double v : vy) CHECK(std::isfinite(v));
  CHECK(max_rel_error(vy, reference(values_of(big))) <= tolerance<T>(512));
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t c = 0; c < cols; ++c) sum += vy[r * cols + c];
    CHECK(std::abs(sum - 1) <= tolerance<T>(cols + 2));
  }
}

TEST_CASE_TEMPLATE("softmax_rows_backward matches the naive formula in both gradient modes", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(502);
  const int64_t rows = 5, cols = 9;
  const double temperature = 1.6;
  const Tensor x = uniform<T>({rows, cols}, rng, -3, 3);
  Tensor y = host_tensor(kDType<T>, x.shape());
  ops.softmax_rows(x, temperature, y);
  const Tensor dy = uniform<T>(x.shape(), rng);
  const std::vector<double> vy = values_of(y), vdy = values_of(dy);
  for (bool accumulate : {false, true}) {
    CAPTURE(accumulate);
    Tensor dx = accumulate ? uniform<T>(x.shape(), rng) : garbage<T>(x.shape());
    std::vector<double> want = accumulate ? values_of(dx) : std::vector<double>(vy.size(), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      double dot = 0;
      for (int64_t c = 0; c < cols; ++c) dot += vdy[r * cols + c] * vy[r * cols + c];
      for (int64_t c = 0; c < cols; ++c)
        want[r * cols + c] += vy[r * cols + c] * (vdy[r * cols + c] - dot) / temperature;
    }
    ops.softmax_rows_backward(y, dy, temperature, accumulate, dx);
    CHECK(max_rel_error(values_of(dx), want) <= tolerance<T>(cols + 4));
  }
}

TEST_CASE("softmax_rows_backward against finite differences of softmax_rows (f64)") {
  Ops& ops = cpu_kernel();
  Rng rng(503);
  for (double temperature : {1.0, 0.5, 2.5}) {
    CAPTURE(temperature);
    const Tensor x = uniform<double>({4, 7}, rng, -2, 2);
    const Tensor dy = uniform<double>(x.shape(), rng);
    const auto forward = [&](const Tensor& xs) {
      Tensor y = host_tensor(DType::f64, xs.shape());
      ops.softmax_rows(xs, temperature, y);
      return y;
    };
    const Tensor y = forward(x);
    Tensor dx = garbage<double>(x.shape());
    ops.softmax_rows_backward(y, dy, temperature, false, dx);
    CHECK(max_rel_error(dx, numeric_gradient(forward, x, dy)) < kGradientTolerance);
  }
}

TEST_CASE_TEMPLATE("logsumexp_rows matches the naive loop, including large and infinite rows", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(504);
  const int64_t rows = 12, cols = 10;
  for (double scale : {3.0, 500.0}) {
    CAPTURE(scale);
    const Tensor x = uniform<T>({rows, cols}, rng, -scale, scale);
    const std::vector<double> vx = values_of(x);
    std::vector<double> expected(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const double* xr = vx.data() + r * cols;
      const double shift = *std::max_element(xr, xr + cols);
      double sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += std::exp(xr[c] - shift);
      expected[r] = shift + std::log(sum);
    }
    Tensor out = garbage<T>({rows});
    ops.logsumexp_rows(x, out);
    // a sum of cols terms, a log and the shift added back: relative to max(|lse|, 1)
    CHECK(max_rel_error(values_of(out), expected) <= tolerance<T>(cols + 8));
  }
  const double inf = std::numeric_limits<double>::infinity();
  const Tensor special = tensor_of(kDType<T>, {3, 2}, {-inf, -inf, 1.0, inf, -inf, 2.0});
  Tensor out = garbage<T>({3});
  ops.logsumexp_rows(special, out);
  CHECK(values_of(out) == std::vector<double>{-inf, inf, 2.0});
  Tensor none = garbage<T>({2});
  ops.logsumexp_rows(host_tensor(kDType<T>, {2, 0}), none);
  CHECK(values_of(none) == std::vector<double>{-inf, -inf});
}

TEST_CASE("the gradient of logsumexp_rows is softmax_rows (finite differences, f64)") {
  // The router z-loss backpropagates through logsumexp with softmax; check that pairing.
  Ops& ops = cpu_kernel();
  Rng rng(505);
  const Tensor x = uniform<double>({5, 6}, rng, -3, 3);
  const Tensor dout = uniform<double>({5}, rng);
  Tensor softmax = host_tensor(DType::f64, x.shape());
  ops.softmax_rows(x, 1.0, softmax);
  ops.scale_rows(dout, softmax);  // d lse_r / dx_rc = softmax_rc, times the upstream gradient of row r
  const Tensor numeric = numeric_gradient(
      [&](const Tensor& xs) {
        Tensor out = host_tensor(DType::f64, {5});
        ops.logsumexp_rows(xs, out);
        return out;
      },
      x, dout);
  CHECK(max_rel_error(softmax, numeric) < kGradientTolerance);
}

// --- top-k --------------------------------------------------------------------------------------

namespace {
// Naive top-k in the scores' own dtype: rank every column by score + bias (as T computes it),
// stable-sorted so that ties keep the lower index first.
template <class T>
void reference_topk(const Tensor& scores, int k, const Tensor* bias, std::vector<double>& values,
                    std::vector<int32_t>& indices) {
  const int64_t rows = scores.dim(0), cols = scores.dim(1);
  const T* s = scores.data<T>();
  values.clear();
  indices.clear();
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int32_t> order(static_cast<size_t>(cols));
    std::iota(order.begin(), order.end(), 0);
    const auto key = [&](int32_t c) { return bias ? T(s[r * cols + c] + bias->data<T>()[c]) : s[r * cols + c]; };
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return key(a) > key(b); });
    for (int j = 0; j < k; ++j) {
      indices.push_back(order[j]);
      values.push_back(s[r * cols + order[j]]);
    }
  }
}

std::vector<int32_t> index_values(const Tensor& t) {
  return {t.data<int32_t>(), t.data<int32_t>() + t.numel()};
}
}  // namespace

TEST_CASE_TEMPLATE("topk_rows matches a stable sort, with and without bias, with many ties", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(601);
  const int64_t rows = 40, cols = 16;
  // Scores on a coarse grid (multiples of 0.25 in [-1, 1]) so that rows are full of exact ties.
  std::vector<double> grid(rows * cols);
  for (double& v : grid) v = 0.25 * static_cast<double>(rng.below(9)) - 1.0;
  const Tensor tied = tensor_of(kDType<T>, {rows, cols}, grid);
  const Tensor smooth = uniform<T>({rows, cols}, rng);
  const Tensor bias = tensor_of(kDType<T>, {cols}, [&] {
    std::vector<double> b(cols);
    for (double& v : b) v = 0.25 * static_cast<double>(rng.below(3));  // keeps ties possible
    return b;
  }());
  for (const Tensor* scores : {&tied, &smooth})
    for (const Tensor* b : {static_cast<const Tensor*>(nullptr), &bias})
      for (int k : {1, 2, 5, 16}) {
        CAPTURE(k);
        CAPTURE(b != nullptr);
        CAPTURE(scores == &tied);
        Tensor values = garbage<T>({rows, k});
        Tensor indices = host_tensor(DType::i32, {rows, k});
        ops.topk_rows(*scores, k, b, values, indices);
        std::vector<double> want_values;
        std::vector<int32_t> want_indices;
        reference_topk<T>(*scores, k, b, want_values, want_indices);
        CHECK(index_values(indices) == want_indices);
        CHECK(values_of(values) == want_values);  // copied, so exact
      }
}

TEST_CASE("topk_rows: ties go to the lower index, bias steers selection but values stay unbiased") {
  Ops& ops = cpu_kernel();
  Tensor values = host_tensor(DType::f64, {1, 3});
  Tensor indices = host_tensor(DType::i32, {1, 3});
  ops.topk_rows(tensor_of(DType::f64, {1, 5}, {1, 3, 3, 2, 3}), 3, nullptr, values, indices);
  CHECK(index_values(indices) == std::vector<int32_t>{1, 2, 4});
  CHECK(values_of(values) == std::vector<double>{3, 3, 3});

  Tensor values2 = host_tensor(DType::f64, {1, 2});
  Tensor indices2 = host_tensor(DType::i32, {1, 2});
  const Tensor bias = tensor_of(DType::f64, {4}, {0, 0, 0.5, 0});
  ops.topk_rows(tensor_of(DType::f64, {1, 4}, {0.5, 0.4, 0.3, 0.2}), 2, &bias, values2, indices2);
  CHECK(index_values(indices2) == std::vector<int32_t>{2, 0});
  CHECK(values_of(values2) == std::vector<double>{0.3, 0.5});

  // A bias that creates a tie: the lower index wins.
  Tensor values1 = host_tensor(DType::f64, {1, 1});
  Tensor indices1 = host_tensor(DType::i32, {1, 1});
  const Tensor tie_bias = tensor_of(DType::f64, {2}, {1, 0});
  ops.topk_rows(tensor_of(DType::f64, {1, 2}, {1, 2}), 1, &tie_bias, values1, indices1);
  CHECK(index_values(indices1) == std::vector<int32_t>{0});
  CHECK(values_of(values1) == std::vector<double>{1});

  // -inf is a valid (masked) score; NaN is refused before anything is written.
  const double inf = std::numeric_limits<double>::infinity();
  ops.topk_rows(tensor_of(DType::f64, {1, 2}, {-inf, -1}), 1, nullptr, values1, indices1);
  CHECK(index_values(indices1) == std::vector<int32_t>{1});
  const Tensor with_nan = tensor_of(DType::f64, {2, 2}, {1, 2, std::nan(""), 0});
  Tensor untouched = tensor_of(DType::f64, {2, 1}, {7, 7});
  Tensor untouched_indices = host_tensor(DType::i32, {2, 1});
  const std::string nan_error = error_of([&] { ops.topk_rows(with_nan, 1, nullptr, untouched, untouched_indices); });
  CHECK(nan_error.find("topk_rows") != std::string::npos);
  CHECK(nan_error.find("NaN") != std::string::npos);
  CHECK(values_of(untouched) == std::vector<double>{7, 7});
  CHECK(error_of([&] { ops.topk_rows(with_nan, 3, nullptr, untouched, untouched_indices); }).find("k = 3") !=
        std::string::npos);
}

// --- gather and scatter -------------------------------------------------------------------------

TEST_CASE_TEMPLATE("gather_rows and scatter_add_rows match naive loops, repeated indices included", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(701);
  const int64_t source_rows = 6, cols = 5;
  const Tensor index = indices_of({3, 0, 3, 5, 1, 3, 0});
  const int64_t count = index.numel();
  const std::vector<int32_t> idx = index_values(index);

  const Tensor src = uniform<T>({source_rows, cols}, rng);
  Tensor gathered = garbage<T>({count, cols});
  ops.gather_rows(src, index, gathered);
  const std::vector<double> vsrc = values_of(src);
  std::vector<double> expected;
  for (int32_t i : idx) expected.insert(expected.end(), vsrc.begin() + i * cols, vsrc.begin() + (i + 1) * cols);
  CHECK(values_of(gathered) == expected);  // a copy: exact

  const Tensor rows_in = uniform<T>({count, cols}, rng), weight = uniform<T>({count}, rng);
  const std::vector<double> vin = values_of(rows_in), vw = values_of(weight);
  for (bool weighted : {false, true}) {
    CAPTURE(weighted);
    Tensor dst = uniform<T>({source_rows, cols}, rng);
    std::vector<double> want = values_of(dst);
    for (int64_t i = 0; i < count; ++i)
      for (int64_t c = 0; c < cols; ++c) want[idx[i] * cols + c] += (weighted ? vw[i] : 1.0) * vin[i * cols + c];
    ops.scatter_add_rows(rows_in, index, weighted ? &weight : nullptr, dst);
    // up to 3 rows land on one destination row, 2 roundings each
    CHECK(max_rel_error(values_of(dst), want) <= tolerance<T>(8));
  }
}

TEST_CASE_TEMPLATE("gather_elements and scatter_add_elements match naive loops", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(702);
  const Tensor x = uniform<T>({4, 6}, rng);
  const Tensor row = indices_of({0, 3, 3, 1, 0, 2});
  const Tensor col = indices_of({5, 0, 0, 2, 5, 4});
  Tensor out = garbage<T>({6});
  ops.gather_elements(x, row, col, out);
  const std::vector<double> vx = values_of(x);
  const std::vector<int32_t> r = index_values(row), c = index_values(col);
  std::vector<double> expected;
  for (size_t i = 0; i < r.size(); ++i) expected.push_back(vx[r[i] * 6 + c[i]]);
  CHECK(values_of(out) == expected);

  const Tensor dout = uniform<T>({6}, rng);
  Tensor dx = uniform<T>({4, 6}, rng);
  std::vector<double> want = values_of(dx);
  const std::vector<double> vd = values_of(dout);
  for (size_t i = 0; i < r.size(); ++i) want[r[i] * 6 + c[i]] += vd[i];
  ops.scatter_add_elements(dout, row, col, dx);
  CHECK(max_rel_error(values_of(dx), want) <= tolerance<T>(3));
}

TEST_CASE("scatters are the gradients of gathers (finite differences, f64)") {
  Ops& ops = cpu_kernel();
  Rng rng(703);
  const Tensor index = indices_of({2, 0, 2, 3});
  const Tensor src = uniform<double>({4, 3}, rng);
  const Tensor dy = uniform<double>({4, 3}, rng);
  Tensor dsrc = host_tensor(DType::f64, src.shape());
  ops.scatter_add_rows(dy, index, nullptr, dsrc);
  const auto gather = [&](const Tensor& s) {
    Tensor out = host_tensor(DType::f64, {4, 3});
    ops.gather_rows(s, index, out);
    return out;
  };
  CHECK(max_rel_error(dsrc, numeric_gradient(gather, src, dy)) < kGradientTolerance);

  // scatter_add_rows with weights, by src and by weight
  const Tensor weight = uniform<double>({4}, rng);
  const Tensor dout = uniform<double>({5, 3}, rng);
  const auto scatter = [&](const Tensor& s, const Tensor& w) {
    Tensor out = host_tensor(DType::f64, {5, 3});
    ops.scatter_add_rows(s, index, &w, out);
    return out;
  };
  Tensor gathered = host_tensor(DType::f64, {4, 3});
  ops.gather_rows(dout, index, gathered);
  Tensor dweight = host_tensor(DType::f64, {4});
  ops.row_dot(gathered, src, dweight);  // d/dw_i = <dout[index_i], src_i>
  ops.scale_rows(weight, gathered);     // d/dsrc_i = w_i dout[index_i]
  CHECK(max_rel_error(gathered, numeric_gradient([&](const Tensor& s) { return scatter(s, weight); }, src, dout)) <
        kGradientTolerance);
  CHECK(max_rel_error(dweight, numeric_gradient([&](const Tensor& w) { return scatter(src, w); }, weight, dout)) <
        kGradientTolerance);

  const Tensor x = uniform<double>({3, 4}, rng);
  const Tensor row = indices_of({0, 2, 2, 1});
  const Tensor col = indices_of({3, 1, 1, 0});
  const Tensor dvals = uniform<double>({4}, rng);
  Tensor dx = host_tensor(DType::f64, x.shape());
  ops.scatter_add_elements(dvals, row, col, dx);
  const auto gather_elements = [&](const Tensor& xs) {
    Tensor out = host_tensor(DType::f64, {4});
    ops.gather_elements(xs, row, col, out);
    return out;
  };
  CHECK(max_rel_error(dx, numeric_gradient(gather_elements, x, dvals)) < kGradientTolerance);
}

TEST_CASE("out-of-range indices are refused before anything is written") {
  Ops& ops = cpu_kernel();
  Rng rng(704);
  const Tensor src = uniform<double>({3, 2}, rng);
  Tensor dst = tensor_of(DType::f64, {2, 2}, {1, 2, 3, 4});
  const std::string gather_error = error_of([&] { ops.gather_rows(src, indices_of({0, 3}), dst); });
  CHECK(gather_error.find("gather_rows") != std::string::npos);
  CHECK(gather_error.find("index[1] = 3") != std::string::npos);
  CHECK(values_of(dst) == std::vector<double>{1, 2, 3, 4});
  const std::string scatter_error = error_of([&] { ops.scatter_add_rows(src, indices_of({0, 1, -1}), nullptr, dst); });
  CHECK(scatter_error.find("scatter_add_rows") != std::string::npos);
  CHECK(values_of(dst) == std::vector<double>{1, 2, 3, 4});
  Tensor out = host_tensor(DType::f64, {1});
  CHECK(error_of([&] { ops.gather_elements(src, indices_of({0}), indices_of({2}), out); }).find("col[0] = 2") !=
        std::string::npos);
  CHECK(error_of([&] { ops.scatter_add_elements(out, indices_of({5}), indices_of({0}), dst); }).find("row[0] = 5") !=
        std::string::npos);
}

// --- AdamW --------------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("adamw_update matches the formula and the generic fallback", T, float, double) {
  Ops& ops = cpu_kernel();
  Rng rng(801);
  const Ops::AdamW hyper{1e-2, 0.9, 0.95, 1e-8, 0.1, 3};
  const Tensor grad = uniform<T>({4, 7}, rng);
  Tensor param = uniform<T>({4, 7}, rng), m = uniform<T>({4, 7}, rng, -0.1, 0.1), v = uniform<T>({4, 7}, rng, 0, 0.1);
  Tensor param2 = clone(param), m2 = clone(m), v2 = clone(v);
  std::vector<double> want_p = values_of(param), want_m = values_of(m), want_v = values_of(v);
  const std::vector<double> g = values_of(grad);
  for (size_t i = 0; i < g.size(); ++i) {
    want_m[i] = 0.9 * want_m[i] + 0.1 * g[i];
    want_v[i] = 0.95 * want_v[i] + 0.05 * g[i] * g[i];
    const double m_hat = want_m[i] / (1 - std::pow(0.9, 3)), v_hat = want_v[i] / (1 - std::pow(0.95, 3));
    want_p[i] -= 1e-2 * (m_hat / (std::sqrt(v_hat) + 1e-8) + 0.1 * want_p[i]);
  }
  ops.adamw_update(hyper, grad, param, m, v);
  // computed in double and stored in T: one rounding of each stored value, a few for p, which
  // reads m and v before they are rounded
  CHECK(max_rel_error(values_of(m), want_m) <= tolerance<T>(2));
  CHECK(max_rel_error(values_of(v), want_v) <= tolerance<T>(2));
  CHECK(max_rel_error(values_of(param), want_p) <= tolerance<T>(4));
  ops.Ops::adamw_update(hyper, grad, param2, m2, v2);  // the generic implementation every kernel inherits
  CHECK(values_of(param) == values_of(param2));
  CHECK(values_of(m) == values_of(m2));
  CHECK(values_of(v) == values_of(v2));
}

// --- errors -------------------------------------------------------------------------------------

TEST_CASE("shape and dtype mismatches throw RuntimeError naming the op and the shapes") {
  Ops& ops = cpu_kernel();
  Rng rng(901);
  const Tensor a = uniform<float>({3, 4}, rng), b = uniform<float>({5, 2}, rng), b64 = uniform<double>({4, 2}, rng);
  Tensor c = host_tensor(DType::f32, {3, 2});
  Tensor w = uniform<float>({2, 4, 2}, rng);
  Tensor y = host_tensor(DType::f32, {3, 2});
  Tensor bf16 = host_tensor(DType::bf16, {3, 4});
  Tensor bf16_out = host_tensor(DType::bf16, {3, 4});
  Tensor f32_index = host_tensor(DType::f32, {2});
  Tensor dst = host_tensor(DType::f32, {2, 4});
  Tensor values = host_tensor(DType::f32, {3, 2}), indices = host_tensor(DType::i32, {3, 2});
  Tensor wrong_indices = host_tensor(DType::i64, {3, 2});
  Tensor undefined;
  Tensor a_shaped = host_tensor(DType::f32, {3, 4});

  struct Case {
    std::string label;
    std::function<void()> call;
    std::vector<std::string> expected;  // substrings of the message
  };
  const std::vector<Case> cases = {
      {"gemm inner", [&] { ops.gemm(false, false, 1, a, b, 0, c); }, {"cpu kernel: gemm", "[3, 4]", "[5, 2]", "inner"}},
      {"gemm output",
       [&] {
         ops.gemm(false, true, 1, a, uniform<float>({2, 4}, rng), 0, dst);
       },
       {"gemm", "c has shape [2, 4], expected [3, 2]"}},
      {"gemm dtypes", [&] { ops.gemm(false, false, 1, a, b64, 0, c); }, {"gemm", "f32", "f64"}},
      {"gemm rank", [&] { ops.gemm(false, false, 1, a, w, 0, c); }, {"gemm", "rank"}},
      {"bf16", [&] { ops.activation(Activation::silu, bf16, bf16_out); }, {"activation", "bf16"}},
      {"grouped offsets count",
       [&] {
         ops.grouped_gemm(a, w, false, {0, 3}, 1, 0, y);
       },
       {"grouped_gemm", "2 groups need 3 offsets"}},
      {"grouped offsets end",
       [&] {
         ops.grouped_gemm(a, w, false, {0, 1, 2}, 1, 0, y);
       },
       {"grouped_gemm", "end at the row count 3"}},
      {"grouped offsets decrease",
       [&] {
         ops.grouped_gemm(a, uniform<float>({3, 4, 2}, rng), false, {0, 2, 1, 3}, 1, 0, y);
       },
       {"grouped_gemm", "must not decrease"}},
      {"grouped w",
       [&] {
         ops.grouped_gemm(a, w, true, {0, 1, 3}, 1, 0, y);
       },
       {"grouped_gemm", "w has shape [2, 4, 2]"}},
      {"weight grad",
       [&] {
         ops.grouped_gemm_weight_grad(a, c, false, {0, 1, 3}, true, y);
       },
       {"grouped_gemm_weight_grad", "dw", "rank"}},
      {"index dtype",
       [&] { ops.gather_rows(a, f32_index, dst); },
       {"gather_rows", "index has dtype f32, expected i32"}},
      {"topk indices dtype",
       [&] { ops.topk_rows(a, 2, nullptr, values, wrong_indices); },
       {"topk_rows", "indices has dtype i64"}},
      {"topk bias", [&] { ops.topk_rows(a, 2, &b64, values, indices); }, {"topk_rows", "dtypes differ"}},
      {"softmax shape", [&] { ops.softmax_rows(a, 1.0, c); }, {"softmax_rows", "y has shape [3, 2], expected [3, 4]"}},
      {"softmax temperature", [&] { ops.softmax_rows(a, 0.0, a_shaped); }, {"softmax_rows", "temperature"}},
      {"glu odd",
       [&] {
         ops.glu(Activation::silu, uniform<float>({3, 5}, rng), c);
       },
       {"glu", "even"}},
      {"sum_rows", [&] { ops.sum_rows(a, false, c); }, {"sum_rows", "out has shape [3, 2], expected [4]"}},
      {"scale_rows",
       [&] { ops.scale_rows(uniform<float>({4}, rng), dst); },
       {"scale_rows", "s has shape [4], expected [2]"}},
      {"axpy", [&] { ops.axpy(1.0, a, c); }, {"axpy", "z has shape [3, 4], expected [3, 2]"}},
      {"undefined", [&] { ops.scale(2.0, undefined); }, {"scale", "undefined"}},
      {"mul", [&] { ops.mul(a, b64, c); }, {"mul", "dtypes differ"}},
      {"adamw",
       [&] {
         ops.adamw_update({1e-3, 0.9, 0.99, 1e-8, 0, 1}, a, c, c, c);
       },
       {"adamw_update", "param"}},
  };
  for (const Case& test : cases) {
    CAPTURE(test.label);
    const std::string message = error_of(test.call);
    CAPTURE(message);
    CHECK(!message.empty());
    for (const std::string& part : test.expected) CHECK(message.find(part) != std::string::npos);
  }
}

// --- the fast f32 paths: vectorised exp/sigmoid, loops split over threads ----------------------

// f32 inputs for the vectorised sigmoid: O(1) to O(100) values both ways, the subnormal range of
// exp (x < -87.3), and the extremes. Large enough (> 2^18 elements) that the kernel's loops run on
// two threads where two cores exist.
Tensor wide_f32_inputs(Rng& rng, int64_t rows, int64_t cols) {
  std::vector<double> values(static_cast<size_t>(rows * cols));
  const double specials[] = {0.0,    -0.0,   1e-30,  -1e-30, 17.0, -17.0, 87.0, -87.0, -87.5,    -100.0,
                             -103.5, -104.0, -110.0, 110.0,  1e4,  -1e4,  1e30, -1e30, INFINITY, -INFINITY};
  for (size_t i = 0; i < values.size(); ++i) {
    const double pick = rng.uniform();
    if (i < std::size(specials))
      values[i] = specials[i];
    else if (pick < 0.5)
      values[i] = rng.uniform(-8.0, 8.0);
    else if (pick < 0.9)
      values[i] = rng.uniform(-110.0, 110.0);
    else
      values[i] = (rng.uniform() < 0.5 ? -1 : 1) * std::exp(rng.uniform(-20.0, 12.0));
  }
  return tensor_of(DType::f32, {rows, cols}, values);
}

// sigmoid in double without overflow, the reference for the f32 kernels.
double sigmoid_exact(double x) {
  return x >= 0 ? 1 / (1 + std::exp(-x)) : std::exp(x) / (1 + std::exp(x));
}

// The f32 sigmoid (sigmoid op, silu, gelu_tanh) uses a polynomial exp rather than libm's. Its
// stated accuracy: relative error at most 4e-7 (under 7 units of 2^-24; 1.8e-7 measured over 2e7
// samples) where the result is a normal float, and 2^-149 absolute where it is subnormal.
constexpr double kFastSigmoidRelative = 4e-7;
constexpr double kSubnormalUlp = 1.4012984643e-45;

TEST_CASE("f32 sigmoid and silu stay within the stated tolerance of double, large |x| included") {
  Ops& ops = cpu_kernel();
  Rng rng(2001);
  const Tensor x = wide_f32_inputs(rng, 64, 5000);
  const std::vector<double> vx = values_of(x);
  Tensor s = garbage<float>(x.shape()), silu = garbage<float>(x.shape());
  ops.sigmoid(x, s);
  ops.activation(Activation::silu, x, silu);
  const std::vector<double> vs = values_of(s), vsilu = values_of(silu);
  double worst_sigmoid = 0, worst_silu = 0;
  for (size_t i = 0; i < vx.size(); ++i) {
    const double ref = sigmoid_exact(vx[i]);
    worst_sigmoid = std::max(worst_sigmoid, std::abs(vs[i] - ref) / (kFastSigmoidRelative * ref + kSubnormalUlp));
    if (std::isinf(vx[i])) continue;  // silu(-inf) = -inf * 0 is NaN, as in libm's formula
    const double silu_ref_value = vx[i] * ref;
    // one more rounding (the product) and x times sigmoid's subnormal error
    worst_silu = std::max(
        worst_silu, std::abs(vsilu[i] - silu_ref_value) / ((kFastSigmoidRelative + 6e-8) * std::abs(silu_ref_value) +
                                                           std::abs(vx[i]) * kSubnormalUlp + kSubnormalUlp));
  }
  CHECK(worst_sigmoid <= 1.0);
  CHECK(worst_silu <= 1.0);
  CHECK(vs[static_cast<size_t>(std::find(vx.begin(), vx.end(), INFINITY) - vx.begin())] == 1.0);
  CHECK(vs[static_cast<size_t>(std::find(vx.begin(), vx.end(), -INFINITY) - vx.begin())] == 0.0);

  // NaN propagates
  const Tensor nan = tensor_of(DType::f32, {2}, {std::nan(""), 1.0});
  Tensor nan_out = garbage<float>({2});
  ops.sigmoid(nan, nan_out);
  CHECK(std::isnan(nan_out.data<float>()[0]));
  CHECK(nan_out.data<float>()[1] == doctest::Approx(sigmoid_exact(1.0)).epsilon(1e-6));
}

TEST_CASE("f32 SwiGLU forward and backward on a large block match double formulas") {
  Ops& ops = cpu_kernel();
  Rng rng(2002);
  const int64_t rows = 96, width = 1536;  // 147k hidden units: the loops run split over threads
  std::vector<double> gu_values(static_cast<size_t>(rows * 2 * width));
  for (double& v : gu_values) v = rng.uniform() < 0.95 ? rng.uniform(-6.0, 6.0) : rng.uniform(-120.0, 120.0);
  const Tensor gate_up = tensor_of(DType::f32, {rows, 2 * width}, gu_values);
  const Tensor dh = uniform<float>({rows, width}, rng);
  Tensor h = garbage<float>({rows, width});
  Tensor dgate_up = garbage<float>({rows, 2 * width});
  ops.glu(Activation::silu, gate_up, h);
  ops.glu_backward(Activation::silu, gate_up, dh, dgate_up);
  const std::vector<double> vh = values_of(h), vd = values_of(dgate_up), vdh = values_of(dh);
  gu_values = values_of(gate_up);  // the inputs as rounded to f32
  constexpr double u = kUnitRoundoff<float>;
  double worst_h = 0, worst_dgate = 0, worst_dup = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j) {
      const double gate = gu_values[r * 2 * width + j], up = gu_values[r * 2 * width + width + j];
      const double g = vdh[r * width + j], sig = sigmoid_exact(gate);
      const double silu = gate * sig, derivative = sig * (1 + gate * (1 - sig));
      // Bounds: sigmoid's stated error plus a few roundings, relative to the magnitude of the
      // terms; the derivative's 1 - s loses s's absolute error times |x| (as libm's would).
      // Where sigmoid is subnormal its absolute error (2^-149) is scaled by the factors after it.
      const double subnormal = (1 + std::abs(gate)) * kSubnormalUlp;
      const double h_bound = (kFastSigmoidRelative + 4 * u) * std::abs(silu * up) + subnormal * (1 + std::abs(up));
      const double d_bound = (kFastSigmoidRelative + 8 * u) * sig * (1 + std::abs(gate)) * std::abs(up * g) +
                             subnormal * (1 + std::abs(up * g));
      const double dup_bound = (kFastSigmoidRelative + 4 * u) * std::abs(silu * g) + subnormal * (1 + std::abs(g));
      worst_h = std::max(worst_h, std::abs(vh[r * width + j] - silu * up) / h_bound);
      worst_dgate = std::max(worst_dgate, std::abs(vd[r * 2 * width + j] - derivative * up * g) / d_bound);
      worst_dup = std::max(worst_dup, std::abs(vd[r * 2 * width + width + j] - silu * g) / dup_bound);
    }
  CHECK(worst_h <= 1.0);
  CHECK(worst_dgate <= 1.0);
  CHECK(worst_dup <= 1.0);
}

TEST_CASE_TEMPLATE("loops split over threads give bit-identical results to one thread", T, float, double) {
  // Kernels with 1 and 3 loop threads (and as many OpenBLAS threads, process-wide) on inputs large
  // enough to be split, scatter_add_rows with many rows landing on the same destination.
  const std::shared_ptr<Ops> serial = load_kernel("cpu", {{"threads", int64_t{1}}});
  const std::shared_ptr<Ops> split = load_kernel("cpu", {{"threads", int64_t{3}}});
  Rng rng(2003);
  const int64_t rows = 700, width = 600;
  const Tensor gate_up = uniform<T>({rows, 2 * width}, rng, -5, 5);
  const Tensor dh = uniform<T>({rows, width}, rng);
  const Tensor x = uniform<T>({rows, width}, rng, -5, 5);
  std::vector<int32_t> destinations(static_cast<size_t>(rows));
  for (int32_t& d : destinations) d = static_cast<int32_t>(rng.uniform() * 97) % 97;
  const Tensor index = indices_of(destinations);
  const Tensor weight = uniform<T>({rows}, rng);
  const auto run = [&](Ops& ops) {
    std::vector<std::vector<double>> out;
    Tensor h = garbage<T>({rows, width}), d = garbage<T>({rows, 2 * width}), y = garbage<T>({rows, width});
    ops.glu(Activation::silu, gate_up, h);
    ops.glu_backward(Activation::gelu_tanh, gate_up, dh, d);
    ops.activation(Activation::silu, x, y);
    Tensor dx = uniform<T>({rows, width}, rng);
    ops.activation_backward(Activation::silu, x, dh, true, dx);
    Tensor scattered = ops.zeros(kDType<T>, {97, width});
    ops.scatter_add_rows(x, index, &weight, scattered);
    Tensor gathered = garbage<T>({rows, width});
    ops.gather_rows(scattered, index, gathered);
    ops.scale_rows(weight, gathered);
    Tensor dots = garbage<T>({rows});
    ops.row_dot(x, dh, dots);
    for (const Tensor* t : {&h, &d, &y, &scattered, &gathered, &dots}) out.push_back(values_of(*t));
    out.push_back(values_of(dx));
    return out;
  };
  const Rng start = rng;
  const auto one = run(*serial);
  rng = start;  // the same accumulate-into values for activation_backward
  const auto many = run(*split);
  REQUIRE(one.size() == many.size());
  for (size_t i = 0; i < one.size(); ++i) {
    CAPTURE(i);
    CHECK(one[i] == many[i]);
  }
}

// Last, because OpenBLAS's thread count is process-wide.
TEST_CASE("the threads parameter sets OpenBLAS's thread count and results do not depend on it") {
  Rng rng(1001);
  const Tensor a = uniform<double>({300, 200}, rng), b = uniform<double>({200, 250}, rng);
  Tensor reference = host_tensor(DType::f64, {300, 250});
  cpu_kernel().gemm(false, false, 1.0, a, b, 0.0, reference);
  for (int64_t threads : {1, 2}) {
    CAPTURE(threads);
    const std::shared_ptr<Ops> ops = load_kernel("cpu", {{"threads", threads}});
    Tensor c = host_tensor(DType::f64, {300, 250});
    ops->gemm(false, false, 1.0, a, b, 0.0, c);
    // Same inputs, possibly another blocking: agreement within a dot product's rounding.
    CHECK(max_rel_error(c, reference) <= tolerance<double>(202));
  }
}

// --- grouped GEMMs of few rows per group ------------------------------------------------------

namespace {
// Groups of 1 to 128 rows (1 to 512 for weight gradients; up to 1024 in passes of 64 where the
// weight fits in L2, as these do) go to the cpu kernel's AVX-512 small-group kernels (f32, where
// the CPU has AVX-512; elsewhere OpenBLAS takes them and these cases still hold): row counts
// around the 16-row vectors and the 128-row limit, rows past a vector that go to the tail kernels
// (17, 100: 4 rows, 72: 8 rows; 25: 9 rows, rounded up), empty groups, 200 and 600 rows (passes
// of 50 and 60) and 1100 rows, which stay with OpenBLAS, in the same call.
const std::vector<int64_t> kSmallGroupRows = {17, 0, 1, 64, 5, 128, 48, 200, 63, 100, 600, 16, 72, 25, 1100};

std::vector<int64_t> offsets_of(const std::vector<int64_t>& rows) {
  std::vector<int64_t> offsets{0};
  for (const int64_t r : rows) offsets.push_back(offsets.back() + r);
  return offsets;
}
}  // namespace

TEST_CASE("small-group grouped_gemm matches the reference on fresh random inputs (f32)") {
  // k: one pass and several (the forward kernel takes 1024 at a time, y = x w 48 rows of w per
  // sweep); n: below a vector, between blocks, and wider than y = x w's 4096-column row segments.
  // Every element within the bound of any summation order (bounded_error <= 1).
  Ops& ops = cpu_kernel();
  Rng rng(2101);
  const std::vector<int64_t> offsets = offsets_of(kSmallGroupRows);
  const int64_t groups = static_cast<int64_t>(kSmallGroupRows.size()), rows = offsets.back();
  struct Size {
    int64_t k, n;
  };
  for (const Size s : {Size{7, 5}, Size{70, 200}, Size{1030, 53}, Size{300, 97}, Size{9, 4200}})
    for (bool trans_w : {false, true})
      for (const auto& [alpha, beta] : {std::pair{1.0, 0.0}, std::pair{1.3, 0.5}}) {
        CAPTURE(s.k);
        CAPTURE(s.n);
        CAPTURE(trans_w);
        CAPTURE(beta);
        const Tensor x = uniform<float>({rows, s.k}, rng);
        const Tensor w = uniform<float>(trans_w ? Shape{groups, s.n, s.k} : Shape{groups, s.k, s.n}, rng);
        Tensor y = beta == 0 ? garbage<float>({rows, s.n}) : uniform<float>({rows, s.n}, rng);
        const std::vector<double> vx = values_of(x), vw = values_of(w), vy = values_of(y);
        std::vector<double> expected(vy.size()), bound(vy.size());
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t begin = offsets[g], count = offsets[g + 1] - begin;
          reference_gemm<float>(false, trans_w, count, s.n, s.k, alpha, vx.data() + begin * s.k,
                                vw.data() + g * s.k * s.n, beta, vy.data() + begin * s.n, expected.data() + begin * s.n,
                                bound.data() + begin * s.n);
        }
        ops.grouped_gemm(x, w, trans_w, offsets, alpha, beta, y);
        CHECK(bounded_error(y, expected, bound) <= 1.0);
      }
}

TEST_CASE("small-group grouped_gemm_weight_grad matches the reference on fresh random inputs (f32)") {
  Ops& ops = cpu_kernel();
  Rng rng(2102);
  const std::vector<int64_t> offsets = offsets_of(kSmallGroupRows);
  const int64_t groups = static_cast<int64_t>(kSmallGroupRows.size()), rows = offsets.back();
  struct Size {
    int64_t k, n;
  };
  for (const Size s : {Size{7, 5}, Size{70, 200}, Size{131, 53}})
    for (bool trans_w : {false, true})
      for (bool accumulate : {false, true}) {
        CAPTURE(s.k);
        CAPTURE(s.n);
        CAPTURE(trans_w);
        CAPTURE(accumulate);
        const Tensor x = uniform<float>({rows, s.k}, rng);
        const Tensor dy = uniform<float>({rows, s.n}, rng);
        const Shape shape = trans_w ? Shape{groups, s.n, s.k} : Shape{groups, s.k, s.n};
        Tensor dw = accumulate ? uniform<float>(shape, rng) : garbage<float>(shape);
        const std::vector<double> vx = values_of(x), vdy = values_of(dy), vdw = values_of(dw);
        std::vector<double> expected(vdw.size()), bound(vdw.size());
        const int64_t size = s.k * s.n;
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t begin = offsets[g], count = offsets[g + 1] - begin;
          if (trans_w)
            reference_gemm<float>(true, false, s.n, s.k, count, 1.0, vdy.data() + begin * s.n, vx.data() + begin * s.k,
                                  accumulate ? 1.0 : 0.0, vdw.data() + g * size, expected.data() + g * size,
                                  bound.data() + g * size);
          else
            reference_gemm<float>(true, false, s.k, s.n, count, 1.0, vx.data() + begin * s.k, vdy.data() + begin * s.n,
                                  accumulate ? 1.0 : 0.0, vdw.data() + g * size, expected.data() + g * size,
                                  bound.data() + g * size);
        }
        ops.grouped_gemm_weight_grad(x, dy, trans_w, offsets, accumulate, dw);
        CHECK(bounded_error(dw, expected, bound) <= 1.0);
      }
}

// Last, with the test above it, because the threads parameter sets OpenBLAS's process-wide count.
TEST_CASE("small-group grouped GEMMs give bit-identical results on 1 and 3 threads") {
  // Enough work to be split (the kernels thread above ~8 MFLOP): every element is summed by one
  // thread in one order whatever the split. Only groups the small-group kernels take: OpenBLAS's
  // results may change with its thread count (another kernel for small single-threaded GEMMs).
  const std::shared_ptr<Ops> serial = load_kernel("cpu", {{"threads", int64_t{1}}});
  const std::shared_ptr<Ops> split = load_kernel("cpu", {{"threads", int64_t{3}}});
  Rng rng(2103);
  const std::vector<int64_t> small_rows = {17, 0, 1, 64, 5, 128, 48, 63, 100, 16, 72, 25, 300};
  const std::vector<int64_t> offsets = offsets_of(small_rows);
  const int64_t groups = static_cast<int64_t>(small_rows.size()), rows = offsets.back();
  const int64_t k = 96, n = 1000;
  const Tensor x = uniform<float>({rows, k}, rng), dy = uniform<float>({rows, n}, rng);
  const Tensor w_nk = uniform<float>({groups, n, k}, rng), w_kn = uniform<float>({groups, k, n}, rng);
  const Tensor dw_start = uniform<float>({groups, n, k}, rng);
  const auto run = [&](Ops& ops) {
    Tensor forward = garbage<float>({rows, n}), backward = garbage<float>({rows, k});
    ops.grouped_gemm(x, w_nk, true, offsets, 1.0, 0.0, forward);
    ops.grouped_gemm(dy, w_nk, false, offsets, 1.0, 0.0, backward);
    Tensor through_kn = garbage<float>({rows, n});
    ops.grouped_gemm(x, w_kn, false, offsets, 1.0, 0.0, through_kn);
    Tensor dw = host_tensor(DType::f32, dw_start.shape());
    ops.copy(dw_start, dw);
    ops.grouped_gemm_weight_grad(x, dy, true, offsets, true, dw);
    return std::vector<std::vector<double>>{values_of(forward), values_of(backward), values_of(through_kn),
                                            values_of(dw)};
  };
  const auto one = run(*serial), many = run(*split);
  for (size_t i = 0; i < one.size(); ++i) {
    CAPTURE(i);
    CHECK(one[i] == many[i]);
  }
}

// The transformer ops (copy_columns, RMSNorm, LayerNorm, RoPE, causal grouped-query attention,
// cross-entropy) on the cpu kernel, where they run as Ops' generic host implementations. Every
// forward against a reference written out from its definition on fresh random inputs; every
// backward against central finite differences in f64 for every input; overwrite vs accumulate;
// f32 against f64; attention's causality and sequence isolation; and errors that name the op.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "test_support.hpp"

using namespace moelab;
using namespace moelab::test;

namespace {

// Central differences in f64 with step 1e-6 (numeric_gradient) are accurate to about 1e-9
// absolute here: rounding of <dy, forward(x)>, a sum of up to 150 O(1) terms, divided by the step.
// Errors are measured relative to max(|expected|, 1e-2), so small gradient entries are checked
// too; measured errors are below 1e-7 and a wrong gradient is off by O(1), so 1e-6 sits between.
constexpr double kGradientTolerance = 1e-6;
constexpr double kGradientFloor = 1e-2;

// The same op in f32 and f64 on the same (f32-representable) inputs: f32 rounds at 6e-8 per
// operation and these results pass through a few tens of operations (sums of up to 24 terms, exp,
// log, rotations), so 2e-6 relative (absolute below 1); measured errors are below 2.5e-7.
constexpr double kFloatTolerance = 2e-6;

// f64 results against references computed in a different order in double.
constexpr double kDoubleTolerance = 1e-12;

Tensor uniform(DType dtype, const Shape& shape, Rng& rng, double lo = -1.0, double hi = 1.0) {
  return random_uniform(dtype, shape, rng, lo, hi);
}

// An output whose old contents must not be read (overwrite semantics).
Tensor garbage(DType dtype, const Shape& shape) {
  Tensor t = host_tensor(dtype, shape);
  for (int64_t i = 0; i < t.numel(); ++i) set_host_value(t, i, std::numeric_limits<double>::quiet_NaN());
  return t;
}

Tensor indices_of(const std::vector<int32_t>& values) {
  Tensor t = host_tensor(DType::i32, {static_cast<int64_t>(values.size())});
  std::copy(values.begin(), values.end(), t.data<int32_t>());
  return t;
}

// f64 values rounded to f32 and back: inputs both precisions represent exactly.
Tensor f32_representable(const Tensor& host) {
  return converted(converted(host, DType::f32), DType::f64);
}

// d/dx <dy, forward(x)> by finite differences against the backward's `analytic` gradient.
void check_gradient(const std::string& what, const std::function<Tensor(const Tensor&)>& forward, const Tensor& x,
                    const Tensor& dy, const Tensor& analytic) {
  const Tensor numeric = numeric_gradient(forward, x, dy);
  const double error = max_rel_error(analytic, numeric, kGradientFloor);
  INFO(what, ": relative error ", error);
  CHECK(error < kGradientTolerance);
}

// dst - before, elementwise: what an accumulating op added.
Tensor difference(const Tensor& after, const Tensor& before) {
  std::vector<double> a = values_of(after);
  const std::vector<double> b = values_of(before);
  for (size_t i = 0; i < a.size(); ++i) a[i] -= b[i];
  return tensor_of(after.dtype(), after.shape(), a);
}

// --- norms ---

struct RmsNormResult {
  Tensor y, rstd;
};
RmsNormResult run_rms_norm(Ops& ops, const Tensor& x, const Tensor& weight, double eps) {
  RmsNormResult r{garbage(x.dtype(), x.shape()), garbage(x.dtype(), {x.dim(0)})};
  ops.rms_norm(x, weight, eps, r.y, r.rstd);
  return r;
}

struct LayerNormResult {
  Tensor y, mean, rstd;
};
LayerNormResult run_layer_norm(Ops& ops, const Tensor& x, const Tensor& weight, const Tensor* bias, double eps) {
  LayerNormResult r{garbage(x.dtype(), x.shape()), garbage(x.dtype(), {x.dim(0)}), garbage(x.dtype(), {x.dim(0)})};
  ops.layer_norm(x, weight, bias, eps, r.y, r.mean, r.rstd);
  return r;
}

// --- rope ---

Tensor run_rope(Ops& ops, const Tensor& x, int64_t heads, int64_t seq_len, double theta, bool inverse) {
  Tensor y = garbage(x.dtype(), x.shape());
  ops.rope(x, heads, seq_len, theta, inverse, y);
  return y;
}

// --- attention ---

struct AttentionCase {
  std::string name;
  int64_t heads, kv_heads, seq_len, sequences, key_dim, value_dim;
  double scale;
  int64_t rows() const { return seq_len * sequences; }
  Shape q_shape() const { return {rows(), heads * key_dim}; }
  Shape k_shape() const { return {rows(), kv_heads * key_dim}; }
  Shape v_shape() const { return {rows(), kv_heads * value_dim}; }
  Shape out_shape() const { return {rows(), heads * value_dim}; }
};

// Multi-head, grouped-query and multi-query, with key width != value width and three sequences.
std::vector<AttentionCase> attention_cases() {
  return {{"MHA", 3, 3, 4, 3, 5, 3, 0.45}, {"GQA", 4, 2, 4, 3, 4, 6, 0.5}, {"MQA", 4, 1, 5, 3, 3, 2, 0.6}};
}

struct AttentionInputs {
  Tensor q, k, v;
};
AttentionInputs random_attention_inputs(const AttentionCase& c, DType dtype, Rng& rng) {
  // |scale q.k| reaches a few units, so the softmax is far from uniform
  return {uniform(dtype, c.q_shape(), rng, -1.5, 1.5), uniform(dtype, c.k_shape(), rng, -1.5, 1.5),
          uniform(dtype, c.v_shape(), rng)};
}

struct AttentionResult {
  Tensor out, lse;
};
AttentionResult run_attention(Ops& ops, const AttentionCase& c, const AttentionInputs& in) {
  AttentionResult r{garbage(in.q.dtype(), c.out_shape()), garbage(in.q.dtype(), {c.rows(), c.heads})};
  ops.causal_attention(in.q, in.k, in.v, c.heads, c.kv_heads, c.seq_len, c.scale, r.out, r.lse);
  return r;
}

struct AttentionGrads {
  Tensor dq, dk, dv;
};
AttentionGrads run_attention_backward(Ops& ops, const AttentionCase& c, const AttentionInputs& in, const Tensor& dout) {
  const AttentionResult forward = run_attention(ops, c, in);
  const DType dtype = in.q.dtype();
  AttentionGrads g{garbage(dtype, c.q_shape()), garbage(dtype, c.k_shape()), garbage(dtype, c.v_shape())};
  ops.causal_attention_backward(in.q, in.k, in.v, forward.out, forward.lse, dout, c.heads, c.kv_heads, c.seq_len,
                                c.scale, g.dq, g.dk, g.dv);
  return g;
}

// The textbook form, in double: per sequence and query head, the full S x S score matrix
// scale Q K^T with -inf above the diagonal, a row softmax, times V.
struct ReferenceAttention {
  std::vector<double> out, lse;
};
ReferenceAttention reference_attention(const AttentionCase& c, const AttentionInputs& in) {
  const std::vector<double> q = values_of(in.q), k = values_of(in.k), v = values_of(in.v);
  const int64_t S = c.seq_len, group = c.heads / c.kv_heads;
  ReferenceAttention ref{std::vector<double>(static_cast<size_t>(c.rows() * c.heads * c.value_dim)),
                         std::vector<double>(static_cast<size_t>(c.rows() * c.heads))};
  std::vector<double> scores(static_cast<size_t>(S * S));
  for (int64_t seq = 0; seq < c.sequences; ++seq)
    for (int64_t h = 0; h < c.heads; ++h) {
      const int64_t g = h / group;
      for (int64_t i = 0; i < S; ++i)
        for (int64_t j = 0; j < S; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < c.key_dim; ++d)
            dot +=
                q[((seq * S + i) * c.heads + h) * c.key_dim + d] * k[((seq * S + j) * c.kv_heads + g) * c.key_dim + d];
          scores[i * S + j] = j <= i ? c.scale * dot : -INFINITY;
        }
      for (int64_t i = 0; i < S; ++i) {
        double max = -INFINITY, sum = 0;
        for (int64_t j = 0; j < S; ++j) max = std::max(max, scores[i * S + j]);
        for (int64_t j = 0; j < S; ++j) sum += std::exp(scores[i * S + j] - max);
        const int64_t row = seq * S + i;
        ref.lse[row * c.heads + h] = max + std::log(sum);
        for (int64_t d = 0; d < c.value_dim; ++d) {
          double value = 0;
          for (int64_t j = 0; j < S; ++j)
            value += std::exp(scores[i * S + j] - max) / sum * v[((seq * S + j) * c.kv_heads + g) * c.value_dim + d];
          ref.out[(row * c.heads + h) * c.value_dim + d] = value;
        }
      }
    }
  return ref;
}

// The same inputs with each kv head repeated for the query heads that read it: multi-head.
AttentionInputs repeat_kv_heads(const AttentionCase& c, const AttentionInputs& in) {
  const int64_t group = c.heads / c.kv_heads;
  const auto repeat = [&](const Tensor& t, int64_t width) {
    const std::vector<double> values = values_of(t);
    std::vector<double> out;
    for (int64_t r = 0; r < c.rows(); ++r)
      for (int64_t h = 0; h < c.heads; ++h)
        for (int64_t d = 0; d < width; ++d) out.push_back(values[(r * c.kv_heads + h / group) * width + d]);
    return tensor_of(t.dtype(), {c.rows(), c.heads * width}, out);
  };
  return {in.q, repeat(in.k, c.key_dim), repeat(in.v, c.value_dim)};
}

// Multi-head gradients of repeated kv heads, summed back per kv head.
Tensor sum_repeated_heads(const AttentionCase& c, const Tensor& repeated, int64_t width) {
  const int64_t group = c.heads / c.kv_heads;
  const std::vector<double> values = values_of(repeated);
  std::vector<double> out(static_cast<size_t>(c.rows() * c.kv_heads * width), 0.0);
  for (int64_t r = 0; r < c.rows(); ++r)
    for (int64_t h = 0; h < c.heads; ++h)
      for (int64_t d = 0; d < width; ++d)
        out[(r * c.kv_heads + h / group) * width + d] += values[(r * c.heads + h) * width + d];
  return tensor_of(repeated.dtype(), {c.rows(), c.kv_heads * width}, out);
}

// Whether rows [begin, end) of two tensors hold the same bits.
bool same_rows(const Tensor& a, const Tensor& b, int64_t begin, int64_t end) {
  const int64_t width = a.numel() / a.dim(0);
  for (int64_t i = begin * width; i < end * width; ++i)
    if (host_value(a, i) != host_value(b, i)) return false;
  return true;
}

// --- cross-entropy ---

struct CrossEntropyResult {
  Tensor loss, lse;
};
CrossEntropyResult run_cross_entropy(Ops& ops, const Tensor& logits, const Tensor& targets) {
  CrossEntropyResult r{garbage(logits.dtype(), {logits.dim(0)}), garbage(logits.dtype(), {logits.dim(0)})};
  ops.cross_entropy(logits, targets, r.loss, r.lse);
  return r;
}
Tensor run_cross_entropy_backward(Ops& ops, const Tensor& logits, const Tensor& targets, double scale) {
  const CrossEntropyResult forward = run_cross_entropy(ops, logits, targets);
  Tensor dlogits = garbage(logits.dtype(), logits.shape());
  ops.cross_entropy_backward(logits, targets, forward.lse, scale, dlogits);
  return dlogits;
}

}  // namespace

// --- copy_columns -------------------------------------------------------------------------------

TEST_CASE("copy_columns overwrites or adds a block of columns and leaves the other columns alone") {
  Ops& ops = cpu_kernel();
  Rng rng(1);
  for (DType dtype : {DType::f32, DType::f64}) {
    CAPTURE(dtype_name(dtype));
    const Tensor src = uniform(dtype, {4, 7}, rng);
    const Tensor original = uniform(dtype, {4, 9}, rng);
    for (bool accumulate : {false, true}) {
      CAPTURE(accumulate);
      Tensor dst = clone(original);
      ops.copy_columns(src, 2, dst, 5, 3, accumulate);
      for (int64_t r = 0; r < 4; ++r)
        for (int64_t c = 0; c < 9; ++c) {
          const double old = host_value(original, r * 9 + c);
          const bool inside = c >= 5 && c < 8;
          const double copied = inside ? host_value(src, r * 7 + c - 3) : 0.0;
          double expected = inside ? copied : old;
          if (accumulate && inside) expected = dtype == DType::f32 ? double(float(old) + float(copied)) : old + copied;
          CHECK(host_value(dst, r * 9 + c) == expected);
        }
    }
  }
  // Overwriting moves any dtype (an index tensor split by columns); width 0 touches nothing.
  Tensor indices = tensor_of(DType::i32, {2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor dst = tensor_of(DType::i32, {2, 2}, {0, 0, 0, 0});
  ops.copy_columns(indices, 1, dst, 0, 2, false);
  CHECK(values_of(dst) == std::vector<double>{2, 3, 5, 6});
  ops.copy_columns(indices, 3, dst, 2, 0, false);
  CHECK(values_of(dst) == std::vector<double>{2, 3, 5, 6});
  // A concatenation and its split are inverse: [a | b] then columns back out.
  const Tensor a = uniform(DType::f64, {3, 2}, rng), b = uniform(DType::f64, {3, 4}, rng);
  Tensor joined = garbage(DType::f64, {3, 6});
  ops.copy_columns(a, 0, joined, 0, 2, false);
  ops.copy_columns(b, 0, joined, 2, 4, false);
  Tensor b_again = garbage(DType::f64, {3, 4});
  ops.copy_columns(joined, 2, b_again, 0, 4, false);
  CHECK(values_of(b_again) == values_of(b));
}

// --- RMSNorm ------------------------------------------------------------------------------------

TEST_CASE("rms_norm is x / sqrt(mean x^2 + eps) * weight and saves rstd") {
  Ops& ops = cpu_kernel();
  Rng rng(2);
  const int64_t rows = 6, cols = 11;
  const double eps = 1e-5;
  const Tensor x = uniform(DType::f64, {rows, cols}, rng, -2, 2);
  const Tensor weight = uniform(DType::f64, {cols}, rng, 0.5, 1.5);
  const RmsNormResult result = run_rms_norm(ops, x, weight, eps);
  std::vector<double> y(static_cast<size_t>(rows * cols)), rstd(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    double squares = 0;
    for (int64_t c = 0; c < cols; ++c) squares += std::pow(host_value(x, r * cols + c), 2);
    rstd[r] = 1 / std::sqrt(squares / cols + eps);
    for (int64_t c = 0; c < cols; ++c) y[r * cols + c] = host_value(x, r * cols + c) * rstd[r] * host_value(weight, c);
  }
  CHECK(max_rel_error(values_of(result.y), y) < kDoubleTolerance);
  CHECK(max_rel_error(values_of(result.rstd), rstd) < kDoubleTolerance);
}

TEST_CASE("rms_norm backward matches finite differences in x and weight, overwrites dx, adds to dweight") {
  Ops& ops = cpu_kernel();
  Rng rng(3);
  const int64_t rows = 5, cols = 7;
  const double eps = 1e-3;
  const Tensor x = uniform(DType::f64, {rows, cols}, rng, -2, 2);
  const Tensor weight = uniform(DType::f64, {cols}, rng, 0.5, 1.5);
  const Tensor dy = uniform(DType::f64, {rows, cols}, rng);
  const RmsNormResult forward = run_rms_norm(ops, x, weight, eps);
  Tensor dx = garbage(DType::f64, {rows, cols});
  const Tensor dweight_before = uniform(DType::f64, {cols}, rng);
  Tensor dweight = clone(dweight_before);
  ops.rms_norm_backward(x, weight, forward.rstd, dy, dx, dweight);
  check_gradient(
      "dx", [&](const Tensor& probe) { return run_rms_norm(ops, probe, weight, eps).y; }, x, dy, dx);
  check_gradient(
      "dweight", [&](const Tensor& probe) { return run_rms_norm(ops, x, probe, eps).y; }, weight, dy,
      difference(dweight, dweight_before));
}

// --- LayerNorm ----------------------------------------------------------------------------------

TEST_CASE("layer_norm is (x - mean) / sqrt(var + eps) * weight + bias and saves mean and rstd") {
  Ops& ops = cpu_kernel();
  Rng rng(4);
  const int64_t rows = 6, cols = 9;
  const double eps = 1e-5;
  // an offset of 3 makes a one-pass E[x^2] - E[x]^2 lose digits; the reference is two-pass
  const Tensor x = uniform(DType::f64, {rows, cols}, rng, 2, 4);
  const Tensor weight = uniform(DType::f64, {cols}, rng, 0.5, 1.5);
  const Tensor bias = uniform(DType::f64, {cols}, rng);
  for (bool with_bias : {true, false}) {
    CAPTURE(with_bias);
    const LayerNormResult result = run_layer_norm(ops, x, weight, with_bias ? &bias : nullptr, eps);
    std::vector<double> y(static_cast<size_t>(rows * cols)), mean(static_cast<size_t>(rows)),
        rstd(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      double sum = 0, squares = 0;
      for (int64_t c = 0; c < cols; ++c) sum += host_value(x, r * cols + c);
      mean[r] = sum / cols;
      for (int64_t c = 0; c < cols; ++c) squares += std::pow(host_value(x, r * cols + c) - mean[r], 2);
      rstd[r] = 1 / std::sqrt(squares / cols + eps);
      for (int64_t c = 0; c < cols; ++c)
        y[r * cols + c] = (host_value(x, r * cols + c) - mean[r]) * rstd[r] * host_value(weight, c) +
                          (with_bias ? host_value(bias, c) : 0.0);
    }
    CHECK(max_rel_error(values_of(result.y), y) < kDoubleTolerance);
    CHECK(max_rel_error(values_of(result.mean), mean) < kDoubleTolerance);
    CHECK(max_rel_error(values_of(result.rstd), rstd) < kDoubleTolerance);
  }
}

TEST_CASE("layer_norm backward matches finite differences in x, weight and bias") {
  Ops& ops = cpu_kernel();
  Rng rng(5);
  const int64_t rows = 5, cols = 8;
  const double eps = 1e-3;
  const Tensor x = uniform(DType::f64, {rows, cols}, rng, -2, 2);
  const Tensor weight = uniform(DType::f64, {cols}, rng, 0.5, 1.5);
  const Tensor bias = uniform(DType::f64, {cols}, rng);
  const Tensor dy = uniform(DType::f64, {rows, cols}, rng);
  const LayerNormResult forward = run_layer_norm(ops, x, weight, &bias, eps);
  Tensor dx = garbage(DType::f64, {rows, cols});
  const Tensor dweight_before = uniform(DType::f64, {cols}, rng), dbias_before = uniform(DType::f64, {cols}, rng);
  Tensor dweight = clone(dweight_before), dbias = clone(dbias_before);
  ops.layer_norm_backward(x, weight, forward.mean, forward.rstd, dy, dx, dweight, &dbias);
  check_gradient(
      "dx", [&](const Tensor& p) { return run_layer_norm(ops, p, weight, &bias, eps).y; }, x, dy, dx);
  check_gradient(
      "dweight", [&](const Tensor& p) { return run_layer_norm(ops, x, p, &bias, eps).y; }, weight, dy,
      difference(dweight, dweight_before));
  check_gradient(
      "dbias", [&](const Tensor& p) { return run_layer_norm(ops, x, weight, &p, eps).y; }, bias, dy,
      difference(dbias, dbias_before));

  // Without a bias, dbias = null: dx and dweight are the same.
  const LayerNormResult no_bias = run_layer_norm(ops, x, weight, nullptr, eps);
  Tensor dx_no_bias = garbage(DType::f64, {rows, cols});
  Tensor dweight_no_bias = clone(dweight_before);
  ops.layer_norm_backward(x, weight, no_bias.mean, no_bias.rstd, dy, dx_no_bias, dweight_no_bias, nullptr);
  CHECK(max_rel_error(dx_no_bias, dx) < kDoubleTolerance);
  CHECK(max_rel_error(dweight_no_bias, dweight) < kDoubleTolerance);
}

// --- RoPE ---------------------------------------------------------------------------------------

TEST_CASE("rope rotates each (i, i + D/2) pair by pos * theta^(-2i/D)") {
  Ops& ops = cpu_kernel();
  Rng rng(6);
  const int64_t heads = 3, head_dim = 8, seq_len = 5, rows = 2 * seq_len, half = head_dim / 2;
  const double theta = 100;  // small, so that every pair turns by a visible angle within 5 positions
  const Tensor x = uniform(DType::f64, {rows, heads * head_dim}, rng);
  const Tensor y = run_rope(ops, x, heads, seq_len, theta, false);
  std::vector<double> expected = values_of(x);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        const int64_t at = r * heads * head_dim + h * head_dim + i;
        const double angle = static_cast<double>(r % seq_len) * std::pow(theta, -2.0 * i / head_dim);
        const double a = host_value(x, at), b = host_value(x, at + half);
        expected[at] = a * std::cos(angle) - b * std::sin(angle);
        expected[at + half] = a * std::sin(angle) + b * std::cos(angle);
        // a rotation keeps the pair's length
        const double before = std::hypot(a, b), after = std::hypot(host_value(y, at), host_value(y, at + half));
        CHECK(std::abs(after - before) <= 1e-15 * 4 * before);
      }
  CHECK(max_rel_error(values_of(y), expected) < kDoubleTolerance);
  // Position 0 (the first row of each sequence) is not rotated at all.
  CHECK(same_rows(y, x, 0, 1));
  CHECK(same_rows(y, x, seq_len, seq_len + 1));
  CHECK_FALSE(same_rows(y, x, 1, 2));
  // The inverse undoes it, and works in place (y aliasing x).
  Tensor back = clone(y);
  ops.rope(back, heads, seq_len, theta, true, back);
  CHECK(max_rel_error(back, x) < kDoubleTolerance);
  Tensor in_place = clone(x);
  ops.rope(in_place, heads, seq_len, theta, false, in_place);
  CHECK(values_of(in_place) == values_of(y));
  // Rows past a whole number of sequences keep counting positions modulo seq_len.
  const Tensor partial = run_rope(ops, x.rows(0, seq_len + 2), heads, seq_len, theta, false);
  CHECK(same_rows(partial, y, 0, seq_len + 2));
}

TEST_CASE("rope backward (the inverse rotation) is the gradient of rope") {
  Ops& ops = cpu_kernel();
  Rng rng(7);
  const int64_t heads = 2, head_dim = 6, seq_len = 4, rows = 3 * seq_len;
  const double theta = 50;
  const Tensor x = uniform(DType::f64, {rows, heads * head_dim}, rng);
  const Tensor dy = uniform(DType::f64, {rows, heads * head_dim}, rng);
  const Tensor dx = run_rope(ops, dy, heads, seq_len, theta, true);
  check_gradient(
      "dx", [&](const Tensor& p) { return run_rope(ops, p, heads, seq_len, theta, false); }, x, dy, dx);
  // the adjoint identity <rope(x), dy> = <x, rope^-1(dy)>
  CHECK(std::abs(dot(run_rope(ops, x, heads, seq_len, theta, false), dy) - dot(x, dx)) < 1e-12);
}

// --- causal attention ---------------------------------------------------------------------------

TEST_CASE("causal_attention equals softmax(scale Q K^T + causal mask) V per head, with its log-sum-exp") {
  Ops& ops = cpu_kernel();
  Rng rng(8);
  for (const AttentionCase& c : attention_cases()) {
    CAPTURE(c.name);
    const AttentionInputs in = random_attention_inputs(c, DType::f64, rng);
    const AttentionResult result = run_attention(ops, c, in);
    const ReferenceAttention ref = reference_attention(c, in);
    CHECK(max_rel_error(values_of(result.out), ref.out) < kDoubleTolerance);
    CHECK(max_rel_error(values_of(result.lse), ref.lse) < kDoubleTolerance);
  }
}

TEST_CASE("causal_attention backward matches finite differences in q, k and v for MHA, GQA and MQA") {
  Ops& ops = cpu_kernel();
  Rng rng(9);
  for (const AttentionCase& c : attention_cases()) {
    CAPTURE(c.name);
    const AttentionInputs in = random_attention_inputs(c, DType::f64, rng);
    const Tensor dout = uniform(DType::f64, c.out_shape(), rng);
    const AttentionGrads g = run_attention_backward(ops, c, in, dout);
    check_gradient(
        c.name + " dq",
        [&](const Tensor& p) {
          return run_attention(ops, c, {p, in.k, in.v}).out;
        },
        in.q, dout, g.dq);
    check_gradient(
        c.name + " dk",
        [&](const Tensor& p) {
          return run_attention(ops, c, {in.q, p, in.v}).out;
        },
        in.k, dout, g.dk);
    check_gradient(
        c.name + " dv",
        [&](const Tensor& p) {
          return run_attention(ops, c, {in.q, in.k, p}).out;
        },
        in.v, dout, g.dv);
  }
}

TEST_CASE("grouped-query attention is multi-head attention with the kv heads repeated") {
  Ops& ops = cpu_kernel();
  Rng rng(10);
  for (const AttentionCase& c : attention_cases()) {
    if (c.kv_heads == c.heads) continue;
    CAPTURE(c.name);
    const AttentionCase mha{c.name + " as MHA", c.heads,   c.heads,     c.seq_len,
                            c.sequences,        c.key_dim, c.value_dim, c.scale};
    const AttentionInputs in = random_attention_inputs(c, DType::f64, rng);
    const AttentionInputs repeated = repeat_kv_heads(c, in);
    const AttentionResult grouped = run_attention(ops, c, in), multi = run_attention(ops, mha, repeated);
    CHECK(max_rel_error(grouped.out, multi.out) < kDoubleTolerance);
    CHECK(max_rel_error(grouped.lse, multi.lse) < kDoubleTolerance);
    // A shared kv head's gradient is the sum of its copies' gradients.
    const Tensor dout = uniform(DType::f64, c.out_shape(), rng);
    const AttentionGrads g = run_attention_backward(ops, c, in, dout),
                         m = run_attention_backward(ops, mha, repeated, dout);
    CHECK(max_rel_error(g.dq, m.dq) < kDoubleTolerance);
    CHECK(max_rel_error(g.dk, sum_repeated_heads(c, m.dk, c.key_dim)) < kDoubleTolerance);
    CHECK(max_rel_error(g.dv, sum_repeated_heads(c, m.dv, c.value_dim)) < kDoubleTolerance);
  }
}

TEST_CASE("attention never reads a later position or another sequence") {
  Ops& ops = cpu_kernel();
  Rng rng(11);
  for (const AttentionCase& c : attention_cases()) {
    CAPTURE(c.name);
    const AttentionInputs in = random_attention_inputs(c, DType::f64, rng);
    const AttentionResult base = run_attention(ops, c, in);
    const int64_t S = c.seq_len;
    // New keys and values for the whole last sequence: the earlier sequences' outputs keep their bits.
    AttentionInputs changed = {in.q, clone(in.k), clone(in.v)};
    for (int64_t i = (c.sequences - 1) * S * c.k_shape()[1]; i < changed.k.numel(); ++i)
      set_host_value(changed.k, i, rng.uniform(-1.5, 1.5));
    for (int64_t i = (c.sequences - 1) * S * c.v_shape()[1]; i < changed.v.numel(); ++i)
      set_host_value(changed.v, i, rng.uniform(-1, 1));
    const AttentionResult other = run_attention(ops, c, changed);
    CHECK(same_rows(other.out, base.out, 0, (c.sequences - 1) * S));
    CHECK(same_rows(other.lse, base.lse, 0, (c.sequences - 1) * S));
    CHECK_FALSE(same_rows(other.out, base.out, (c.sequences - 1) * S, c.rows()));
    // New key and value at position j of the middle sequence: positions before j keep their bits,
    // position j and after change, the other sequences do not.
    for (int64_t j = 1; j < S; ++j) {
      CAPTURE(j);
      AttentionInputs later = {in.q, clone(in.k), clone(in.v)};
      const int64_t row = S + j;
      for (int64_t d = 0; d < c.k_shape()[1]; ++d)
        set_host_value(later.k, row * c.k_shape()[1] + d, rng.uniform(-1.5, 1.5));
      for (int64_t d = 0; d < c.v_shape()[1]; ++d)
        set_host_value(later.v, row * c.v_shape()[1] + d, rng.uniform(-1, 1));
      const AttentionResult moved = run_attention(ops, c, later);
      CHECK(same_rows(moved.out, base.out, 0, row));
      CHECK(same_rows(moved.lse, base.lse, 0, row));
      for (int64_t r = row; r < 2 * S; ++r) CHECK_FALSE(same_rows(moved.out, base.out, r, r + 1));
      CHECK(same_rows(moved.out, base.out, 2 * S, c.rows()));
    }
  }
}

TEST_CASE("attention backward overwrites dq, dk and dv and ignores a later position's upstream gradient") {
  Ops& ops = cpu_kernel();
  Rng rng(12);
  const AttentionCase c = attention_cases()[1];
  const AttentionInputs in = random_attention_inputs(c, DType::f64, rng);
  const Tensor dout = uniform(DType::f64, c.out_shape(), rng);
  // run_attention_backward starts from NaN outputs: any read of them would show
  const AttentionGrads g = run_attention_backward(ops, c, in, dout);
  for (const Tensor* t : {&g.dq, &g.dk, &g.dv})
    for (double value : values_of(*t)) REQUIRE(std::isfinite(value));
  // Upstream gradient on position 2 of each sequence only: it reaches that query and the keys
  // and values at positions 0..2, never position 3 or another sequence.
  const int64_t position = 2;
  Tensor one_position = host_tensor(DType::f64, c.out_shape());
  const int64_t width = c.out_shape()[1];
  for (int64_t seq = 0; seq < c.sequences; ++seq)
    for (int64_t d = 0; d < width; ++d) {
      const int64_t at = (seq * c.seq_len + position) * width + d;
      set_host_value(one_position, at, host_value(dout, at));
    }
  const AttentionGrads f = run_attention_backward(ops, c, in, one_position);
  const Tensor zero_q = host_tensor(DType::f64, c.q_shape()), zero_k = host_tensor(DType::f64, c.k_shape()),
               zero_v = host_tensor(DType::f64, c.v_shape());
  for (int64_t seq = 0; seq < c.sequences; ++seq) {
    const int64_t first = seq * c.seq_len, row = first + position;
    CHECK(same_rows(f.dq, zero_q, first, row));
    CHECK_FALSE(same_rows(f.dq, zero_q, row, row + 1));
    CHECK(same_rows(f.dq, zero_q, row + 1, first + c.seq_len));
    for (int64_t j = first; j <= row; ++j) {
      CHECK_FALSE(same_rows(f.dk, zero_k, j, j + 1));
      CHECK_FALSE(same_rows(f.dv, zero_v, j, j + 1));
    }
    CHECK(same_rows(f.dk, zero_k, row + 1, first + c.seq_len));
    CHECK(same_rows(f.dv, zero_v, row + 1, first + c.seq_len));
  }
}

TEST_CASE("large attention on threads matches the reference and is deterministic") {
  Ops& ops = cpu_kernel();
  Rng rng(13);
  // 4 sequences of 128, 4 query heads on 2 kv heads, width 32: about 8e6 multiply-adds, enough to
  // run on every hardware thread.
  const AttentionCase c{"large GQA", 4, 2, 128, 4, 32, 32, 1 / std::sqrt(32.0)};
  const AttentionInputs in = random_attention_inputs(c, DType::f64, rng);
  const AttentionResult result = run_attention(ops, c, in);
  const ReferenceAttention ref = reference_attention(c, in);
  CHECK(max_rel_error(values_of(result.out), ref.out) < kDoubleTolerance);
  CHECK(max_rel_error(values_of(result.lse), ref.lse) < kDoubleTolerance);
  // Gradients against the small cases' finite-difference-checked path taken one sequence at a
  // time (a quarter of the work, different blocks), and the same bits on a second run.
  const Tensor dout = uniform(DType::f64, c.out_shape(), rng);
  const AttentionGrads g = run_attention_backward(ops, c, in, dout);
  const AttentionGrads again = run_attention_backward(ops, c, in, dout);
  CHECK(values_of(again.dq) == values_of(g.dq));
  CHECK(values_of(again.dk) == values_of(g.dk));
  CHECK(values_of(again.dv) == values_of(g.dv));
  AttentionCase one = c;
  one.sequences = 1;
  for (int64_t seq = 0; seq < c.sequences; ++seq) {
    const int64_t begin = seq * c.seq_len, end = begin + c.seq_len;
    const AttentionInputs part{clone(in.q.rows(begin, end)), clone(in.k.rows(begin, end)),
                               clone(in.v.rows(begin, end))};
    const AttentionGrads p = run_attention_backward(ops, one, part, clone(dout.rows(begin, end)));
    CHECK(max_rel_error(p.dq, clone(g.dq.rows(begin, end))) < kDoubleTolerance);
    CHECK(max_rel_error(p.dk, clone(g.dk.rows(begin, end))) < kDoubleTolerance);
    CHECK(max_rel_error(p.dv, clone(g.dv.rows(begin, end))) < kDoubleTolerance);
  }
}

// The cpu kernel's f32 attention runs in tiles of 128 queries x 128 keys with an online softmax
// (plugins/kernels/cpu/attention.hpp); these sequences span two tiles, the second one partial.
// Against the f64 reference on the same f32-representable inputs, relative to max(|expected|, 1):
// f32 rounds at 6e-8 per operation, the scores are dot products of up to 48 terms, each softmax
// sums up to 150 exponentials (the kernel's exp: 2.4e-7 relative) rescaled once per tile, and the
// backward's dK and dV sum up to 150 products per entry (measured at most 9e-7), so 5e-6.
constexpr double kFlashTolerance = 5e-6;

TEST_CASE("f32 attention in tiles (flash) agrees with the f64 reference: MHA, GQA, MQA and MLA's widths") {
  Ops& ops = cpu_kernel();
  Rng rng(31);
  const std::vector<AttentionCase> cases = {{"MHA", 4, 4, 150, 2, 32, 32, 1 / std::sqrt(32.0)},
                                            {"GQA", 4, 2, 150, 2, 16, 24, 0.25},
                                            {"MQA", 3, 1, 129, 2, 24, 16, 0.2},
                                            {"MLA widths", 2, 2, 150, 1, 48, 32, 1 / std::sqrt(48.0)}};
  for (const AttentionCase& c : cases) {
    CAPTURE(c.name);
    const AttentionInputs in = random_attention_inputs(c, DType::f64, rng);
    const AttentionInputs exact{f32_representable(in.q), f32_representable(in.k), f32_representable(in.v)};
    const AttentionInputs in32{converted(exact.q, DType::f32), converted(exact.k, DType::f32),
                               converted(exact.v, DType::f32)};
    const Tensor dout = f32_representable(uniform(DType::f64, c.out_shape(), rng));
    const AttentionResult r64 = run_attention(ops, c, exact), r32 = run_attention(ops, c, in32);
    const double out_error = max_rel_error(values_of(r32.out), values_of(r64.out));
    const double lse_error = max_rel_error(values_of(r32.lse), values_of(r64.lse));
    const AttentionGrads g64 = run_attention_backward(ops, c, exact, dout);
    const AttentionGrads g32 = run_attention_backward(ops, c, in32, converted(dout, DType::f32));
    const double dq_error = max_rel_error(values_of(g32.dq), values_of(g64.dq));
    const double dk_error = max_rel_error(values_of(g32.dk), values_of(g64.dk));
    const double dv_error = max_rel_error(values_of(g32.dv), values_of(g64.dv));
    MESSAGE(c.name, ": out ", out_error, ", lse ", lse_error, ", dq ", dq_error, ", dk ", dk_error, ", dv ", dv_error);
    CHECK(out_error < kFlashTolerance);
    CHECK(lse_error < kFlashTolerance);
    CHECK(dq_error < kFlashTolerance);
    CHECK(dk_error < kFlashTolerance);
    CHECK(dv_error < kFlashTolerance);
  }
}

TEST_CASE("f32 attention in tiles gives the same bits on 1 and 2 threads") {
  // 8 sequences of 130 on 4 query heads and 2 kv heads: 32 forward items, 16 backward ones, enough
  // for the kernel to share them between two threads.
  const AttentionCase c{"GQA", 4, 2, 130, 8, 32, 32, 1 / std::sqrt(32.0)};
  Rng rng(32);
  const AttentionInputs in = random_attention_inputs(c, DType::f32, rng);
  const Tensor dout = uniform(DType::f32, c.out_shape(), rng);
  std::vector<std::vector<double>> runs;
  for (int64_t threads : {int64_t{1}, int64_t{2}}) {
    const std::shared_ptr<Ops> ops = load_kernel("cpu", {{"threads", threads}});
    const AttentionResult r = run_attention(*ops, c, in);
    const AttentionGrads g = run_attention_backward(*ops, c, in, dout);
    std::vector<double> all = values_of(r.out);
    for (const Tensor* t : {&r.lse, &g.dq, &g.dk, &g.dv}) {
      const std::vector<double> more = values_of(*t);
      all.insert(all.end(), more.begin(), more.end());
    }
    runs.push_back(std::move(all));
  }
  CHECK(runs[0] == runs[1]);
}

TEST_CASE("attention timing, f32: 8 sequences of 128, 4 heads of width 32 (reported, not asserted)") {
  Ops& ops = cpu_kernel();
  Rng rng(14);
  const AttentionCase c{"timing", 4, 4, 128, 8, 32, 32, 1 / std::sqrt(32.0)};
  const AttentionInputs in = random_attention_inputs(c, DType::f32, rng);
  const Tensor dout = uniform(DType::f32, c.out_shape(), rng);
  AttentionResult result{host_tensor(DType::f32, c.out_shape()), host_tensor(DType::f32, {c.rows(), c.heads})};
  AttentionGrads g{host_tensor(DType::f32, c.q_shape()), host_tensor(DType::f32, c.k_shape()),
                   host_tensor(DType::f32, c.v_shape())};
  const int repeats = 5;
  double forward_s = 0, backward_s = 0;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    ops.causal_attention(in.q, in.k, in.v, c.heads, c.kv_heads, c.seq_len, c.scale, result.out, result.lse);
    const auto middle = std::chrono::steady_clock::now();
    ops.causal_attention_backward(in.q, in.k, in.v, result.out, result.lse, dout, c.heads, c.kv_heads, c.seq_len,
                                  c.scale, g.dq, g.dk, g.dv);
    const auto end = std::chrono::steady_clock::now();
    forward_s += std::chrono::duration<double>(middle - start).count();
    backward_s += std::chrono::duration<double>(end - middle).count();
  }
  MESSAGE("causal_attention f32 R=1024 H=4 D=32: forward ", forward_s / repeats * 1e3, " ms, backward ",
          backward_s / repeats * 1e3, " ms (mean of ", repeats, ")");
  for (double value : values_of(g.dq)) REQUIRE(std::isfinite(value));
}

// --- cross-entropy ------------------------------------------------------------------------------

TEST_CASE("cross_entropy is log-sum-exp minus the target logit, zero on ignored rows") {
  Ops& ops = cpu_kernel();
  const Tensor logits = tensor_of(DType::f64, {4, 3}, {1, 2, 3, 0, 0, 0, 5, -1, 2, 1000, 1001, 999});
  const Tensor targets = indices_of({2, -100, 0, 1});
  const CrossEntropyResult result = run_cross_entropy(ops, logits, targets);
  // by hand: log(e + e^2 + e^3) = 3 + log(1 + e^-1 + e^-2) = 3.40760596444438; log 3 = 1.09861228866811;
  // log(e^5 + e^-1 + e^2) = 5 + log(1 + e^-6 + e^-3) = 5.05094576352300;
  // log(e^1000 + e^1001 + e^999) = 1001 + log(1 + e^-1 + e^-2) = 1001.40760596444 (no overflow)
  const std::vector<double> lse{3.40760596444438, 1.09861228866811, 5.05094576352300, 1001.40760596444438};
  const std::vector<double> loss{3.40760596444438 - 3, 0, 5.05094576352300 - 5, 1001.40760596444438 - 1001};
  CHECK(max_rel_error(values_of(result.lse), lse) < 1e-13);
  CHECK(max_rel_error(values_of(result.loss), loss) < 1e-12);
  // dlogits = scale (softmax - onehot), zero on the ignored row
  const double scale = 0.25;
  const Tensor dlogits = run_cross_entropy_backward(ops, logits, targets, scale);
  std::vector<double> expected(12, 0.0);
  for (int64_t r : {0, 2, 3})
    for (int64_t c = 0; c < 3; ++c)
      expected[r * 3 + c] =
          scale * (std::exp(host_value(logits, r * 3 + c) - lse[r]) - (c == host_value(targets, r) ? 1.0 : 0.0));
  CHECK(max_rel_error(values_of(dlogits), expected) < 1e-13);
  CHECK(values_of(dlogits)[3] == 0.0);
}

TEST_CASE("cross_entropy backward matches finite differences of scale * sum(loss)") {
  Ops& ops = cpu_kernel();
  Rng rng(15);
  const int64_t rows = 7, vocab = 11;
  const Tensor logits = uniform(DType::f64, {rows, vocab}, rng, -3, 3);
  const Tensor targets = indices_of({3, -1, 0, 10, -100, 7, 3});
  const double scale = 1.0 / 5;  // the mean over the 5 counted rows
  const Tensor dlogits = run_cross_entropy_backward(ops, logits, targets, scale);
  Tensor dloss = host_tensor(DType::f64, {rows});
  for (int64_t r = 0; r < rows; ++r) set_host_value(dloss, r, scale);
  check_gradient(
      "dlogits", [&](const Tensor& p) { return run_cross_entropy(ops, p, targets).loss; }, logits, dloss, dlogits);
  // ignored rows: no loss, no gradient
  CHECK(host_value(run_cross_entropy(ops, logits, targets).loss, 1) == 0.0);
  for (int64_t c = 0; c < vocab; ++c) CHECK(host_value(dlogits, 4 * vocab + c) == 0.0);
}

TEST_CASE("cross_entropy on many rows runs on threads with the same results as row by row") {
  Ops& ops = cpu_kernel();
  Rng rng(16);
  const int64_t rows = 64, vocab = 20000;  // 1.3e6 exponentials: threaded
  const Tensor logits = uniform(DType::f32, {rows, vocab}, rng, -8, 8);
  std::vector<int32_t> target_values;
  for (int64_t r = 0; r < rows; ++r) target_values.push_back(r % 9 == 4 ? -1 : static_cast<int32_t>(rng.below(vocab)));
  const Tensor targets = indices_of(target_values);
  const CrossEntropyResult all = run_cross_entropy(ops, logits, targets);
  const Tensor dall = run_cross_entropy_backward(ops, logits, targets, 0.5);
  for (int64_t r = 0; r < rows; r += 13) {
    CAPTURE(r);
    const Tensor row = logits.rows(r, r + 1);
    const Tensor row_target = indices_of({target_values[r]});
    const CrossEntropyResult one = run_cross_entropy(ops, row, row_target);
    CHECK(host_value(one.loss, 0) == host_value(all.loss, r));
    CHECK(host_value(one.lse, 0) == host_value(all.lse, r));
    CHECK(same_rows(run_cross_entropy_backward(ops, row, row_target, 0.5), clone(dall.rows(r, r + 1)), 0, 1));
  }
}

// --- f32 against f64 ----------------------------------------------------------------------------

TEST_CASE("every transformer op in f32 agrees with f64 on the same inputs") {
  Ops& ops = cpu_kernel();
  Rng rng(17);
  const auto agree = [](const std::string& what, const Tensor& f32, const Tensor& f64) {
    const double error = max_rel_error(values_of(f32), values_of(f64));
    INFO(what, ": relative error ", error);
    CHECK(error < kFloatTolerance);
  };
  const auto both = [](const Tensor& f64_input) {
    const Tensor exact = f32_representable(f64_input);
    return std::pair{exact, converted(exact, DType::f32)};
  };
  const int64_t rows = 8, cols = 24;
  const auto [x64, x32] = both(uniform(DType::f64, {rows, cols}, rng, -2, 2));
  const auto [w64, w32] = both(uniform(DType::f64, {cols}, rng, 0.5, 1.5));
  const auto [b64, b32] = both(uniform(DType::f64, {cols}, rng));
  const auto [dy64, dy32] = both(uniform(DType::f64, {rows, cols}, rng));

  {
    const RmsNormResult r64 = run_rms_norm(ops, x64, w64, 1e-5), r32 = run_rms_norm(ops, x32, w32, 1e-5);
    agree("rms_norm y", r32.y, r64.y);
    Tensor dx64 = garbage(DType::f64, {rows, cols}), dx32 = garbage(DType::f32, {rows, cols});
    Tensor dw64 = host_tensor(DType::f64, {cols}), dw32 = host_tensor(DType::f32, {cols});
    ops.rms_norm_backward(x64, w64, r64.rstd, dy64, dx64, dw64);
    ops.rms_norm_backward(x32, w32, r32.rstd, dy32, dx32, dw32);
    agree("rms_norm dx", dx32, dx64);
    agree("rms_norm dweight", dw32, dw64);
  }
  {
    const LayerNormResult r64 = run_layer_norm(ops, x64, w64, &b64, 1e-5),
                          r32 = run_layer_norm(ops, x32, w32, &b32, 1e-5);
    agree("layer_norm y", r32.y, r64.y);
    Tensor dx64 = garbage(DType::f64, {rows, cols}), dx32 = garbage(DType::f32, {rows, cols});
    Tensor dw64 = host_tensor(DType::f64, {cols}), dw32 = host_tensor(DType::f32, {cols});
    Tensor db64 = host_tensor(DType::f64, {cols}), db32 = host_tensor(DType::f32, {cols});
    ops.layer_norm_backward(x64, w64, r64.mean, r64.rstd, dy64, dx64, dw64, &db64);
    ops.layer_norm_backward(x32, w32, r32.mean, r32.rstd, dy32, dx32, dw32, &db32);
    agree("layer_norm dx", dx32, dx64);
    agree("layer_norm dweight", dw32, dw64);
    agree("layer_norm dbias", db32, db64);
  }
  {
    // positions up to 7 and theta 10000: angles up to 7 radians
    agree("rope", run_rope(ops, x32, 3, 8, 10000, false), run_rope(ops, x64, 3, 8, 10000, false));
    agree("rope inverse", run_rope(ops, x32, 3, 8, 10000, true), run_rope(ops, x64, 3, 8, 10000, true));
  }
  for (const AttentionCase& c : attention_cases()) {
    CAPTURE(c.name);
    const AttentionInputs in = random_attention_inputs(c, DType::f64, rng);
    const auto [q64, q32] = both(in.q);
    const auto [k64, k32] = both(in.k);
    const auto [v64, v32] = both(in.v);
    const auto [do64, do32] = both(uniform(DType::f64, c.out_shape(), rng));
    const AttentionResult r64 = run_attention(ops, c, {q64, k64, v64}), r32 = run_attention(ops, c, {q32, k32, v32});
    agree(c.name + " out", r32.out, r64.out);
    agree(c.name + " lse", r32.lse, r64.lse);
    const AttentionGrads g64 = run_attention_backward(ops, c, {q64, k64, v64}, do64);
    const AttentionGrads g32 = run_attention_backward(ops, c, {q32, k32, v32}, do32);
    agree(c.name + " dq", g32.dq, g64.dq);
    agree(c.name + " dk", g32.dk, g64.dk);
    agree(c.name + " dv", g32.dv, g64.dv);
  }
  {
    const auto [l64, l32] = both(uniform(DType::f64, {6, 50}, rng, -4, 4));
    const Tensor targets = indices_of({0, 49, -1, 17, 3, 25});
    const CrossEntropyResult r64 = run_cross_entropy(ops, l64, targets), r32 = run_cross_entropy(ops, l32, targets);
    agree("cross_entropy loss", r32.loss, r64.loss);
    agree("cross_entropy lse", r32.lse, r64.lse);
    agree("cross_entropy dlogits", run_cross_entropy_backward(ops, l32, targets, 0.2),
          run_cross_entropy_backward(ops, l64, targets, 0.2));
  }
}

// --- bad input ----------------------------------------------------------------------------------

TEST_CASE("bad shapes, head counts, widths and targets throw RuntimeError naming the op") {
  Ops& ops = cpu_kernel();
  Rng rng(18);
  const DType f64 = DType::f64;
  {
    const Tensor src = uniform(f64, {3, 4}, rng);
    Tensor dst = host_tensor(f64, {3, 5});
    Tensor short_dst = host_tensor(f64, {2, 5});
    Tensor f32_dst = host_tensor(DType::f32, {3, 5});
    const std::string range = error_of([&] { ops.copy_columns(src, 2, dst, 0, 3, false); });
    CHECK(contains(range, "copy_columns"));
    CHECK(contains(range, "[2, 5)"));
    CHECK(contains(error_of([&] { ops.copy_columns(src, 0, dst, 3, 3, true); }), "outside dst"));
    CHECK(contains(error_of([&] { ops.copy_columns(src, -1, dst, 0, 1, false); }), "copy_columns"));
    CHECK(contains(error_of([&] { ops.copy_columns(src, 0, dst, 0, -1, false); }), "copy_columns"));
    CHECK(contains(error_of([&] { ops.copy_columns(src, 0, short_dst, 0, 1, false); }), "copy_columns"));
    CHECK(contains(error_of([&] { ops.copy_columns(src, 0, f32_dst, 0, 1, false); }), "copy_columns"));
    Tensor index_dst = host_tensor(DType::i32, {3, 5});
    const Tensor index_src = host_tensor(DType::i32, {3, 4});
    CHECK(contains(error_of([&] { ops.copy_columns(index_src, 0, index_dst, 0, 1, true); }), "i32"));
  }
  {
    const Tensor x = uniform(f64, {4, 6}, rng), weight = uniform(f64, {6}, rng), short_weight = uniform(f64, {5}, rng);
    Tensor y = host_tensor(f64, {4, 6}), rstd = host_tensor(f64, {4}), mean = host_tensor(f64, {4});
    Tensor f32_rstd = host_tensor(DType::f32, {4});
    const std::string message = error_of([&] { ops.rms_norm(x, short_weight, 1e-5, y, rstd); });
    CHECK(contains(message, "rms_norm"));
    CHECK(contains(message, "weight must be f64[6]"));
    CHECK(contains(message, "f64[5]"));
    CHECK(contains(error_of([&] { ops.rms_norm(x, weight, 1e-5, y, f32_rstd); }), "rms_norm: rstd"));
    CHECK(contains(error_of([&] { ops.rms_norm(x, weight, -1, y, rstd); }), "rms_norm: eps"));
    Tensor dx = host_tensor(f64, {4, 5}), dweight = host_tensor(f64, {6});
    CHECK(contains(error_of([&] { ops.rms_norm_backward(x, weight, rstd, y, dx, dweight); }), "rms_norm_backward: dx"));
    CHECK(
        contains(error_of([&] { ops.layer_norm(x, weight, &short_weight, 1e-5, y, mean, rstd); }), "layer_norm: bias"));
    Tensor good_dx = host_tensor(f64, {4, 6}), short_dbias = host_tensor(f64, {2});
    CHECK(contains(error_of([&] { ops.layer_norm_backward(x, weight, mean, rstd, y, good_dx, dweight, &short_dbias); }),
                   "layer_norm_backward: dbias"));
    const Tensor vector = uniform(f64, {6}, rng);
    CHECK(contains(error_of([&] { ops.layer_norm(vector, weight, nullptr, 1e-5, y, mean, rstd); }),
                   "layer_norm: x must be a matrix"));
  }
  {
    Tensor x = uniform(f64, {4, 12}, rng);
    Tensor y = host_tensor(f64, {4, 12});
    const std::string odd = error_of([&] { ops.rope(x, 4, 4, 10000, false, y); });  // heads of width 3
    CHECK(contains(odd, "rope"));
    CHECK(contains(odd, "even"));
    CHECK(contains(error_of([&] { ops.rope(x, 5, 4, 10000, false, y); }), "rope: x f64[4, 12] on cpu does not split"));
    CHECK(contains(error_of([&] { ops.rope(x, 2, 0, 10000, false, y); }), "rope: seq_len"));
    CHECK(contains(error_of([&] { ops.rope(x, 2, 4, 0, false, y); }), "rope: theta"));
    Tensor wrong_y = host_tensor(f64, {4, 6});
    CHECK(contains(error_of([&] { ops.rope(x, 2, 4, 10000, false, wrong_y); }), "rope: y"));
  }
  {
    const int64_t rows = 6;
    const Tensor q = uniform(f64, {rows, 4 * 3}, rng), k = uniform(f64, {rows, 2 * 3}, rng),
                 v = uniform(f64, {rows, 2 * 5}, rng);
    Tensor out = host_tensor(f64, {rows, 4 * 5}), lse = host_tensor(f64, {rows, 4});
    const std::string heads = error_of([&] { ops.causal_attention(q, k, v, 4, 3, 3, 1.0, out, lse); });
    CHECK(contains(heads, "causal_attention"));
    CHECK(contains(heads, "kv_heads = 3"));
    const Tensor wide_k = uniform(f64, {rows, 2 * 4}, rng);
    const std::string k_shape = error_of([&] { ops.causal_attention(q, wide_k, v, 4, 2, 3, 1.0, out, lse); });
    CHECK(contains(k_shape, "causal_attention: k must be f64[6, 6]"));
    CHECK(contains(k_shape, "f64[6, 8]"));
    CHECK(contains(error_of([&] { ops.causal_attention(q, k, v, 4, 2, 4, 1.0, out, lse); }),
                   "do not split into sequences of 4"));
    Tensor wrong_out = host_tensor(f64, {rows, 4 * 3});
    CHECK(contains(error_of([&] { ops.causal_attention(q, k, v, 4, 2, 3, 1.0, wrong_out, lse); }),
                   "causal_attention: out must be f64[6, 20]"));
    Tensor wrong_lse = host_tensor(f64, {rows, 2});
    CHECK(contains(error_of([&] { ops.causal_attention(q, k, v, 4, 2, 3, 1.0, out, wrong_lse); }),
                   "causal_attention: lse"));
    const Tensor f32_v = uniform(DType::f32, {rows, 2 * 5}, rng);
    CHECK(contains(error_of([&] { ops.causal_attention(q, k, f32_v, 4, 2, 3, 1.0, out, lse); }),
                   "causal_attention: v must be f64"));
    Tensor dq = host_tensor(f64, q.shape()), dk = host_tensor(f64, {rows, 2 * 5}), dv = host_tensor(f64, v.shape());
    CHECK(contains(error_of([&] { ops.causal_attention_backward(q, k, v, out, lse, out, 4, 2, 3, 1.0, dq, dk, dv); }),
                   "causal_attention_backward: dk"));
    CHECK(contains(error_of([&] { ops.causal_attention_backward(q, k, v, out, lse, out, 0, 2, 3, 1.0, dq, dk, dv); }),
                   "causal_attention_backward"));
  }
  {
    const Tensor logits = uniform(f64, {3, 5}, rng);
    Tensor loss = host_tensor(f64, {3}), lse = host_tensor(f64, {3}), dlogits = host_tensor(f64, {3, 5});
    const std::string past = error_of([&] { ops.cross_entropy(logits, indices_of({0, 5, 1}), loss, lse); });
    CHECK(contains(past, "cross_entropy"));
    CHECK(contains(past, "targets[1] = 5"));
    CHECK(contains(error_of([&] {
                     ops.cross_entropy_backward(logits, indices_of({0, 1, 7}), lse, 1.0, dlogits);
                   }),
                   "cross_entropy_backward: targets[2] = 7"));
    CHECK(contains(error_of([&] {
                     ops.cross_entropy(logits, indices_of({0, 1}), loss, lse);
                   }),
                   "cross_entropy: targets must be i32[3]"));
    const Tensor float_targets = host_tensor(DType::f32, {3});
    CHECK(contains(error_of([&] { ops.cross_entropy(logits, float_targets, loss, lse); }), "cross_entropy: targets"));
    const Tensor int_logits = host_tensor(DType::i32, {3, 5});
    Tensor int_loss = host_tensor(DType::i32, {3}), int_lse = host_tensor(DType::i32, {3});
    CHECK(contains(error_of([&] {
                     ops.cross_entropy(int_logits, indices_of({0, 1, 2}), int_loss, int_lse);
                   }),
                   "cross_entropy: dtype i32 is not supported"));
  }
}

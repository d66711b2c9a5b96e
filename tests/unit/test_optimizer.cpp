// AdamW (decoupled weight decay) and global-norm clipping against the published update rule,
// written out here step by step in double.
#include <doctest/doctest.h>

#include <cmath>

#include "moelab/config.hpp"
#include "moelab/optimizer.hpp"
#include "test_support.hpp"

using namespace moelab;
using namespace moelab::test;

TEST_CASE("AdamW follows Loshchilov & Hutter's decoupled update, decay only where asked") {
  Ops& ops = cpu_kernel();
  Rng rng(7);
  Parameter decayed = make_parameter(ops, "w", DType::f64, {5}, rng, 1.0, true);
  Parameter plain = make_parameter(ops, "b", DType::f64, {3}, rng, 1.0, false);
  const AdamWOptions options{0.9, 0.95, 1e-8, 0.1};
  AdamWOptimizer optimizer(ops, {&decayed, &plain}, options);

  // The reference: the same three steps by the formula.
  auto reference = [&](std::vector<double> p, const std::vector<std::vector<double>>& grads, double decay) {
    std::vector<double> m(p.size(), 0.0), v(p.size(), 0.0);
    for (size_t t = 1; t <= grads.size(); ++t) {
      const double lr = 0.01 * static_cast<double>(t);
      for (size_t i = 0; i < p.size(); ++i) {
        const double g = grads[t - 1][i];
        m[i] = 0.9 * m[i] + 0.1 * g;
        v[i] = 0.95 * v[i] + 0.05 * g * g;
        const double m_hat = m[i] / (1 - std::pow(0.9, static_cast<double>(t)));
        const double v_hat = v[i] / (1 - std::pow(0.95, static_cast<double>(t)));
        p[i] -= lr * (m_hat / (std::sqrt(v_hat) + 1e-8) + decay * p[i]);
      }
    }
    return p;
  };
  const std::vector<double> start_w = values_of(ops.to_host(decayed.value)),
                            start_b = values_of(ops.to_host(plain.value));
  std::vector<std::vector<double>> grads_w, grads_b;
  for (int step = 1; step <= 3; ++step) {
    const Tensor gw = random_normal(DType::f64, {5}, rng), gb = random_normal(DType::f64, {3}, rng);
    grads_w.push_back(values_of(gw));
    grads_b.push_back(values_of(gb));
    ops.copy(gw, decayed.grad);
    ops.copy(gb, plain.grad);
    optimizer.step(0.01 * step);
  }
  CHECK(optimizer.steps_taken() == 3);
  const std::vector<double> want_w = reference(start_w, grads_w, 0.1), want_b = reference(start_b, grads_b, 0.0);
  const std::vector<double> got_w = values_of(ops.to_host(decayed.value)), got_b = values_of(ops.to_host(plain.value));
  for (size_t i = 0; i < want_w.size(); ++i) CHECK(got_w[i] == doctest::Approx(want_w[i]).epsilon(1e-14));
  for (size_t i = 0; i < want_b.size(); ++i) CHECK(got_b[i] == doctest::Approx(want_b[i]).epsilon(1e-14));
}

TEST_CASE("gradient clipping scales every gradient to the global norm and reports the norm before") {
  Ops& ops = cpu_kernel();
  Rng rng(8);
  Parameter a = make_parameter(ops, "a", DType::f64, {2}, rng, 1.0);
  Parameter b = make_parameter(ops, "b", DType::f64, {1}, rng, 1.0);
  ops.copy(tensor_of(DType::f64, {2}, {3.0, 0.0}), a.grad);
  ops.copy(tensor_of(DType::f64, {1}, {4.0}), b.grad);
  AdamWOptimizer optimizer(ops, {&a, &b}, AdamWOptions{});
  CHECK(optimizer.clip_grad_norm(10.0) == doctest::Approx(5.0));  // under the limit: untouched
  CHECK(values_of(ops.to_host(a.grad))[0] == 3.0);
  CHECK(optimizer.clip_grad_norm(1.0) == doctest::Approx(5.0));
  CHECK(values_of(ops.to_host(a.grad))[0] == doctest::Approx(0.6).epsilon(1e-6));
  CHECK(values_of(ops.to_host(b.grad))[0] == doctest::Approx(0.8).epsilon(1e-6));
  optimizer.zero_grad();
  CHECK(values_of(ops.to_host(b.grad))[0] == 0.0);
}

TEST_CASE("the learning-rate schedule: linear warmup, then cosine or linear decay to lr * min_lr_ratio") {
  TrainConfig t;
  t.steps = 110;
  t.lr = 1e-3;
  t.warmup_steps = 10;
  t.min_lr_ratio = 0.1;
  t.schedule = LrSchedule::cosine;
  CHECK(t.lr_at(1) == doctest::Approx(1e-4));
  CHECK(t.lr_at(5) == doctest::Approx(5e-4));
  CHECK(t.lr_at(10) == doctest::Approx(1e-3));
  // Half way through the decay the cosine is at the midpoint of lr and the floor.
  CHECK(t.lr_at(60) == doctest::Approx(0.5 * (1e-3 + 1e-4)));
  CHECK(t.lr_at(110) == doctest::Approx(1e-4));
  for (int64_t s = 11; s < 110; ++s) CHECK(t.lr_at(s + 1) <= t.lr_at(s));
  t.schedule = LrSchedule::linear;
  CHECK(t.lr_at(35) == doctest::Approx(1e-3 - 0.25 * 9e-4));
  CHECK(t.lr_at(110) == doctest::Approx(1e-4));
  t.schedule = LrSchedule::constant;
  CHECK(t.lr_at(3) == doctest::Approx(3e-4));  // warmup applies to every schedule
  CHECK(t.lr_at(100) == doctest::Approx(1e-3));
  t.warmup_steps = 0;
  t.schedule = LrSchedule::cosine;
  CHECK(t.lr_at(1) < 1e-3);
  CHECK(t.lr_at(1) > 0.999e-3);
}

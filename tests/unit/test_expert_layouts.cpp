// The fine_grained and shared_routed expert layouts: their layer adjustment and cross-field rules,
// values against a naive per-expert GLU on the host, and finite-difference gradients in double of
// the routed and the shared path w.r.t. the input and every parameter.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <map>

#include "moelab/experts.hpp"
#include "test_support.hpp"

using namespace moelab;
using namespace moelab::test;

namespace {

// Weights normal(0, 0.5) rather than the default 0.02, so that every term of the FFN is O(1) and a
// wrong gradient term cannot hide under the finite-difference noise.
std::shared_ptr<Experts> make_experts(const std::string& name, const LayerSpec& spec, const Overrides& overrides) {
  Rng rng(3);
  Overrides all{{"init_std", 0.5}};
  all.insert(all.end(), overrides.begin(), overrides.end());
  return registry().make_experts(name, plugin_params(PluginKind::experts, name, all), spec, cpu_kernel(), rng);
}

std::map<std::string, Parameter*> by_name(Experts& experts) {
  std::map<std::string, Parameter*> out;
  for (Parameter* p : experts.parameters()) out[p->name] = p;
  return out;
}

double silu(double v) {
  return v / (1.0 + std::exp(-v));
}

// One GLU expert on the host, from rows [gate_row, gate_row + width) of the gate block and the
// same rows of the up block of w_in [., 2F, d] (F = full_width), and columns [gate_row, +width)
// of w_out [., d, F]: y = W_down (silu(W_gate x) * W_up x). Biases are not modelled here.
std::vector<double> naive_glu(const Tensor& w_in, const Tensor& w_out, int64_t group, int64_t gate_row, int64_t width,
                              const std::vector<double>& x) {
  const int64_t f = w_out.dim(2), d = w_out.dim(1);
  std::vector<double> y(static_cast<size_t>(d), 0.0);
  for (int64_t j = gate_row; j < gate_row + width; ++j) {
    double gate = 0, up = 0;
    for (int64_t c = 0; c < d; ++c) {
      gate += host_value(w_in, (group * 2 * f + j) * d + c) * x[static_cast<size_t>(c)];
      up += host_value(w_in, (group * 2 * f + f + j) * d + c) * x[static_cast<size_t>(c)];
    }
    const double h = silu(gate) * up;
    for (int64_t c = 0; c < d; ++c) y[static_cast<size_t>(c)] += host_value(w_out, (group * d + c) * f + j) * h;
  }
  return y;
}

std::vector<double> row_of(const Tensor& t, int64_t r) {
  std::vector<double> out(static_cast<size_t>(t.dim(1)));
  for (int64_t c = 0; c < t.dim(1); ++c) out[static_cast<size_t>(c)] = host_value(t, r * t.dim(1) + c);
  return out;
}

// Central differences of `loss` w.r.t. every element of `values` (a cpu-kernel tensor, so host
// memory) against `analytic`. In double with step 1e-5: ~1e-10 relative error for these O(1)
// smooth functions; 1e-6 leaves a margin.
void check_against_differences(Tensor& values, const std::vector<double>& analytic, const std::function<double()>& loss,
                               const std::string& what) {
  CAPTURE(what);
  std::vector<double> numeric(analytic.size());
  const double step = 1e-5;
  for (int64_t i = 0; i < values.numel(); ++i) {
    const double original = host_value(values, i);
    set_host_value(values, i, original + step);
    const double plus = loss();
    set_host_value(values, i, original - step);
    const double minus = loss();
    set_host_value(values, i, original);
    numeric[static_cast<size_t>(i)] = (plus - minus) / (2 * step);
  }
  CHECK(max_rel_error(analytic, numeric, 1e-3) < 1e-6);
}

// The routed path: x [R, d] in groups `offsets`, loss = <r, y>. Checks dx and every parameter's
// gradient, and that the backward leaves the shared parameters alone.
void check_routed_gradients(Experts& experts, const std::vector<int64_t>& offsets, int64_t d) {
  Ops& ops = cpu_kernel();
  const int64_t rows = offsets.back();
  Rng rng(21);
  Tensor x = ops.to_device(random_normal(DType::f64, {rows, d}, rng));
  const Tensor r = ops.to_device(random_normal(DType::f64, {rows, d}, rng));
  auto loss = [&] {
    Tensor y = ops.empty(DType::f64, {rows, d});
    experts.forward(ops, x, offsets, y);
    return dot(r, y);
  };
  zero_grads(ops, experts);
  Tensor y = ops.empty(DType::f64, {rows, d});
  const auto saved = experts.forward(ops, x, offsets, y);
  Tensor dx = ops.empty(DType::f64, {rows, d});
  experts.backward(ops, x, offsets, *saved, r, dx);
  check_against_differences(x, values_of(ops.to_host(dx)), loss, "routed: x");
  for (Parameter* p : experts.parameters()) {
    const std::vector<double> grad = values_of(ops.to_host(p->grad));
    if (p->name.rfind("shared.", 0) == 0) {
      CAPTURE(p->name);
      CHECK(grad == std::vector<double>(grad.size(), 0.0));
      continue;
    }
    check_against_differences(p->value, grad, loss, "routed: " + p->name);
  }
}

// The shared path: y [T, d] += shared(x), loss = <r, y>; dx starts non-zero to check that the
// backward adds into it. Routed parameters must be left alone.
void check_shared_gradients(Experts& experts, int64_t tokens, int64_t d) {
  Ops& ops = cpu_kernel();
  Rng rng(22);
  Tensor x = ops.to_device(random_normal(DType::f64, {tokens, d}, rng));
  const Tensor r = ops.to_device(random_normal(DType::f64, {tokens, d}, rng));
  const Tensor y_before = random_normal(DType::f64, {tokens, d}, rng);
  auto loss = [&] {
    Tensor y = ops.to_device(clone(y_before));
    experts.shared_forward(ops, x, y);
    return dot(r, y);
  };
  zero_grads(ops, experts);
  Tensor y = ops.to_device(clone(y_before));
  const auto saved = experts.shared_forward(ops, x, y);
  const Tensor dx_before = random_normal(DType::f64, {tokens, d}, rng);
  Tensor dx = ops.to_device(clone(dx_before));
  experts.shared_backward(ops, x, *saved, r, dx);
  std::vector<double> dx_added = values_of(ops.to_host(dx));
  for (size_t i = 0; i < dx_added.size(); ++i) dx_added[i] -= host_value(dx_before, static_cast<int64_t>(i));
  check_against_differences(x, dx_added, loss, "shared: x");
  for (Parameter* p : experts.parameters()) {
    const std::vector<double> grad = values_of(ops.to_host(p->grad));
    if (p->name.rfind("shared.", 0) != 0) {
      CAPTURE(p->name);
      CHECK(grad == std::vector<double>(grad.size(), 0.0));
      continue;
    }
    check_against_differences(p->value, grad, loss, "shared: " + p->name);
  }
}

const PluginInfo& info_of(const std::string& name) {
  return registry().require(PluginKind::experts, name);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
TEST_CASE("fine_grained multiplies num_experts and top_k by segments and keeps the active FLOPs") {
  const PluginInfo& info = info_of("fine_grained");
  REQUIRE(static_cast<bool>(info.manifest->adjust_layer));
  const int64_t d = 32, d_ff = 128;
  for (const bool gated : {true, false}) {
    CAPTURE(gated);
    const ParamSet params = plugin_params(PluginKind::experts, "fine_grained",
                                          {{"segments", int64_t{4}}, {"d_ff", d_ff}, {"gated", gated}});
    LayerSpec spec = layer_spec(16, 2, d);  // the recipe's coarse layout: 16 experts, top-2
    info.manifest->adjust_layer(params, spec);
    CHECK(spec.num_experts == 64);
    CHECK(spec.top_k == 8);
    Rng rng(1);
    auto fine = registry().make_experts("fine_grained", params, spec, cpu_kernel(), rng);
    // The coarse layout: 16 glu (or full) experts of width d_ff, top-2.
    const std::string coarse_name = gated ? "glu" : "full";
    auto coarse =
        registry().make_experts(coarse_name, plugin_params(PluginKind::experts, coarse_name, {{"d_ff", d_ff}}),
                                layer_spec(16, 2, d), cpu_kernel(), rng);
    CHECK(fine->flops_per_routed_token() * static_cast<double>(spec.top_k) ==
          doctest::Approx(coarse->flops_per_routed_token() * 2.0));
    CHECK(fine->flops_per_routed_token() * 4.0 == doctest::Approx(coarse->flops_per_routed_token()));
    const auto params_by_name = by_name(*fine);
    CHECK(params_by_name.at("w_in")->value.shape() == Shape{64, gated ? 2 * d_ff / 4 : d_ff / 4, d});
    CHECK(params_by_name.at("w_out")->value.shape() == Shape{64, d, d_ff / 4});
  }
}

TEST_CASE("fine_grained rejects a d_ff that segments does not divide, naming d_ff") {
  const PluginInfo& info = info_of("fine_grained");
  REQUIRE(static_cast<bool>(info.manifest->check));
  ParamProblems problems;
  info.manifest->check(
      plugin_params(PluginKind::experts, "fine_grained", {{"d_ff", int64_t{258}}, {"segments", int64_t{4}}}),
      layer_spec(8, 2), problems);
  REQUIRE(problems.size() == 1);
  CHECK(problems[0].param == "d_ff");
  CHECK(problems[0].message.find("divisible by segments (4)") != std::string::npos);
  CHECK(problems[0].message.find("258") != std::string::npos);
  problems.clear();
  info.manifest->check(
      plugin_params(PluginKind::experts, "fine_grained", {{"d_ff", int64_t{256}}, {"segments", int64_t{4}}}),
      layer_spec(8, 2), problems);
  CHECK(problems.empty());
}

TEST_CASE("fine_grained experts equal a naive GLU of width d_ff / segments and their gradients are exact") {
  Ops& ops = cpu_kernel();
  const int64_t d = 5;
  const ParamSet params =
      plugin_params(PluginKind::experts, "fine_grained", {{"d_ff", int64_t{6}}, {"segments", int64_t{2}}});
  LayerSpec spec = layer_spec(3, 1, d);
  info_of("fine_grained").manifest->adjust_layer(params, spec);  // 6 experts of width 3, top-2
  auto experts = make_experts("fine_grained", spec, {{"d_ff", int64_t{6}}, {"segments", int64_t{2}}});
  const std::vector<int64_t> offsets{0, 2, 2, 5, 6, 9, 10};  // expert 1 gets no row
  Rng rng(4);
  const Tensor x = ops.to_device(random_normal(DType::f64, {10, d}, rng));
  Tensor y = ops.empty(DType::f64, {10, d});
  experts->forward(ops, x, offsets, y);
  const auto params_by_name = by_name(*experts);
  const Tensor w_in = ops.to_host(params_by_name.at("w_in")->value),
               w_out = ops.to_host(params_by_name.at("w_out")->value);
  for (int64_t e = 0; e < 6; ++e)
    for (int64_t row = offsets[static_cast<size_t>(e)]; row < offsets[static_cast<size_t>(e) + 1]; ++row)
      CHECK(max_rel_error(row_of(ops.to_host(y), row), naive_glu(w_in, w_out, e, 0, 3, row_of(ops.to_host(x), row))) <
            1e-12);
  check_routed_gradients(*experts, offsets, d);
  auto ungated = make_experts("fine_grained", spec,
                              {{"d_ff", int64_t{6}},
                               {"segments", int64_t{2}},
                               {"gated", false},
                               {"activation", std::string("gelu")},
                               {"bias", true}});
  check_routed_gradients(*ungated, offsets, d);
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("shared_routed names routed and shared parameters apart and sizes the fused shared GLU") {
  const int64_t d = 4;
  auto plain = make_experts("shared_routed", layer_spec(3, 1, d), {{"d_ff", int64_t{5}}});
  CHECK(plain->has_shared());
  auto names = by_name(*plain);
  CHECK(names.size() == 4);
  CHECK(names.at("w_in")->value.shape() == Shape{3, 10, d});
  CHECK(names.at("w_out")->value.shape() == Shape{3, d, 5});
  CHECK(names.at("shared.w_in")->value.shape() == Shape{1, 10, d});  // shared_d_ff defaults to d_ff
  CHECK(names.at("shared.w_out")->value.shape() == Shape{1, d, 5});

  auto gated = make_experts("shared_routed", layer_spec(3, 1, d),
                            {{"d_ff", int64_t{5}},
                             {"num_shared", int64_t{2}},
                             {"shared_d_ff", int64_t{3}},
                             {"shared_gate", std::string("sigmoid")}});
  names = by_name(*gated);
  CHECK(names.size() == 5);
  CHECK(names.at("shared.w_in")->value.shape() == Shape{1, 12, d});  // 2 experts x [gate | up] of 3
  CHECK(names.at("shared.w_out")->value.shape() == Shape{1, d, 6});
  CHECK(names.at("shared.gate")->value.shape() == Shape{1, d});
  // FLOPs describe one routed expert only.
  Rng rng(1);
  auto glu = registry().make_experts("glu", plugin_params(PluginKind::experts, "glu", {{"d_ff", int64_t{5}}}),
                                     layer_spec(3, 1, d), cpu_kernel(), rng);
  CHECK(gated->flops_per_routed_token() == doctest::Approx(glu->flops_per_routed_token()));
}

TEST_CASE("shared_routed's fused shared GLU is the sum of its separate shared experts, times the gate") {
  Ops& ops = cpu_kernel();
  const int64_t d = 4, tokens = 5, shared_width = 3, num_shared = 2;
  for (const std::string gate : {"none", "sigmoid"}) {
    CAPTURE(gate);
    auto experts = make_experts(
        "shared_routed", layer_spec(3, 1, d),
        {{"d_ff", int64_t{5}}, {"num_shared", num_shared}, {"shared_d_ff", shared_width}, {"shared_gate", gate}});
    Rng rng(5);
    const Tensor x = ops.to_device(random_normal(DType::f64, {tokens, d}, rng));
    const Tensor y_before = random_normal(DType::f64, {tokens, d}, rng);
    Tensor y = ops.to_device(clone(y_before));
    experts->shared_forward(ops, x, y);
    const auto names = by_name(*experts);
    const Tensor w_in = ops.to_host(names.at("shared.w_in")->value),
                 w_out = ops.to_host(names.at("shared.w_out")->value);
    for (int64_t t = 0; t < tokens; ++t) {
      const std::vector<double> xt = row_of(ops.to_host(x), t);
      std::vector<double> expected = row_of(y_before, t);
      double g = 1.0;
      if (gate == "sigmoid") {
        const Tensor w_gate = ops.to_host(names.at("shared.gate")->value);
        double logit = 0;
        for (int64_t c = 0; c < d; ++c) logit += host_value(w_gate, c) * xt[static_cast<size_t>(c)];
        g = 1.0 / (1.0 + std::exp(-logit));
      }
      for (int64_t j = 0; j < num_shared; ++j) {  // shared expert j: hidden units [j*3, j*3 + 3)
        const std::vector<double> part = naive_glu(w_in, w_out, 0, j * shared_width, shared_width, xt);
        for (int64_t c = 0; c < d; ++c) expected[static_cast<size_t>(c)] += g * part[static_cast<size_t>(c)];
      }
      CHECK(max_rel_error(row_of(ops.to_host(y), t), expected) < 1e-12);
    }
  }
}

TEST_CASE("shared_routed gradients of the routed and the shared path are exact") {
  const int64_t d = 5;
  const std::vector<int64_t> offsets{0, 3, 3, 7};
  for (const std::string gate : {"none", "sigmoid"})
    for (const bool bias : {false, true}) {
      CAPTURE(gate);
      CAPTURE(bias);
      auto experts = make_experts("shared_routed", layer_spec(3, 1, d),
                                  {{"d_ff", int64_t{4}},
                                   {"num_shared", int64_t{2}},
                                   {"shared_d_ff", int64_t{3}},
                                   {"shared_gate", gate},
                                   {"bias", bias},
                                   {"activation", std::string("gelu")}});
      // Biases start at zero; make them count.
      for (Parameter* p : experts->parameters())
        if (p->name.find("b_") != std::string::npos) {
          Rng rng(6);
          cpu_kernel().copy(random_normal(DType::f64, p->value.shape(), rng, 0.5), p->value);
        }
      check_routed_gradients(*experts, offsets, d);
      check_shared_gradients(*experts, 6, d);
    }
}

TEST_CASE("layouts without shared experts say so") {
  auto fine = make_experts("fine_grained", layer_spec(4, 2), {{"d_ff", int64_t{8}}, {"segments", int64_t{2}}});
  CHECK_FALSE(fine->has_shared());
  Tensor x = cpu_kernel().zeros(DType::f64, {2, 6}), y = cpu_kernel().zeros(DType::f64, {2, 6});
  CHECK_THROWS_AS(fine->shared_forward(cpu_kernel(), x, y), RuntimeError);
}

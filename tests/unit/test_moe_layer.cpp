// The MoE layer end to end, and a conformance check driven by the registry: every router, expert
// layout and balancer that is registered gets a finite-difference gradient check through the
// whole layer in double, just by existing.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>

#include "moelab/moe_layer.hpp"
#include "moelab/registry.hpp"

using namespace moelab;

namespace {

struct Fixture {
  PluginRegistry registry = PluginRegistry::with_default_path();
  std::shared_ptr<Ops> ops =
      registry.make_kernel("cpu", defaults_of(registry.require(PluginKind::kernel, "cpu").schema));
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

PluginChoice choice(PluginKind kind, const std::string& name,
                    const std::vector<std::pair<std::string, ParamValue>>& overrides = {}) {
  PluginChoice c;
  c.type = name;
  c.params = defaults_of(fixture().registry.require(kind, name).schema);
  for (const auto& [key, value] : overrides) c.params.set(key, value);
  return c;
}

Tensor random_tensor(DType dtype, const Shape& shape, Rng& rng, double scale = 1.0) {
  Tensor t = host_tensor(dtype, shape);
  fill_normal(t, scale, rng);
  return t;
}

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += host_value(a, i) * host_value(b, i);
  return s;
}

struct Case {
  MoeConfig moe;
  LayerSpec spec;
  std::string label;
};

// Per-plugin settings a plugin needs to be testable at these tiny shapes.
std::vector<std::pair<std::string, ParamValue>> router_settings(const std::string& name) {
  if (name == "sigmoid_grouped") return {{"n_group", int64_t{2}}, {"topk_group", int64_t{2}}};
  return {};
}

LayerSpec small_spec(int64_t experts = 4, int64_t k = 2) {
  LayerSpec s;
  s.d_model = 6;
  s.num_experts = experts;
  s.top_k = k;
  s.dtype = DType::f64;
  return s;
}

MoeConfig small_moe(const std::string& router, const std::string& experts, std::vector<PluginChoice> balancers,
                    Overflow overflow, double capacity_factor) {
  MoeConfig m;
  m.num_experts = 4;
  m.top_k = 2;
  m.capacity_factor = capacity_factor;
  m.eval_capacity_factor = capacity_factor;
  m.overflow = overflow;
  m.router = choice(PluginKind::router, router, router_settings(router));
  m.experts = choice(PluginKind::experts, experts, {{"d_ff", int64_t{5}}});
  m.balancers = std::move(balancers);
  return m;
}

// L = sum(y * R) + aux. Checks dL/dx and dL/dparam for every parameter element against central
// differences. In double with h = 1e-6 the truncation error is ~h^2 and the rounding error
// ~1e-16 |L| / h ~ 1e-10, so a relative tolerance of 1e-6 has three orders of margin.
void check_layer_gradients(const MoeConfig& moe, const LayerSpec& spec, const std::string& label,
                           MicroBatchScopes scopes = {}) {
  CAPTURE(label);
  Ops& ops = *fixture().ops;
  Rng rng(1234);
  MoeLayer layer(moe, spec, fixture().registry, ops, rng, single_process(), scopes);
  const int64_t tokens = 12;
  Rng data(99);
  Tensor x = random_tensor(DType::f64, {tokens, spec.d_model}, data);
  const Tensor r = random_tensor(DType::f64, {tokens, spec.d_model}, data);
  Tensor ids = host_tensor(DType::i32, {tokens});
  for (int64_t t = 0; t < tokens; ++t) ids.data<int32_t>()[t] = static_cast<int32_t>((t * 7) % 50);
  const LayerInput input{true, 3, 2, tokens / 2, &ids};

  auto loss = [&] {
    const Tensor y = layer.forward(x, input);
    return dot(y, r) + layer.stats().aux_loss;
  };
  zero_grads(ops, layer);
  loss();
  const Tensor dx = layer.backward(r);

  auto check = [&](Tensor& values, const Tensor& analytic, const std::string& what) {
    double worst = 0;
    for (int64_t i = 0; i < values.numel(); ++i) {
      const double saved = host_value(values, i);
      const double h = 1e-6;
      set_host_value(values, i, saved + h);
      const double up = loss();
      set_host_value(values, i, saved - h);
      const double down = loss();
      set_host_value(values, i, saved);
      const double numeric = (up - down) / (2 * h);
      const double a = host_value(analytic, i);
      worst = std::max(worst, std::abs(a - numeric) / std::max(1e-3, std::abs(a) + std::abs(numeric)));
    }
    CAPTURE(what);
    CHECK(worst < 1e-6);
  };
  check(x, dx, "x");
  for (const auto& [name, p] : layer.named_parameters()) {
    Tensor grad = host_tensor(p->grad.dtype(), p->grad.shape());
    ops.copy(p->grad, grad);
    check(p->value, grad, name);
  }
}

}  // namespace

TEST_CASE("every registered router passes the layer gradient check in double") {
  for (const auto& name : fixture().registry.names(PluginKind::router)) {
    for (Overflow overflow : {Overflow::dropless, Overflow::drop, Overflow::reroute}) {
      const MoeConfig moe = small_moe(name, "glu", {}, overflow, 1.0);
      check_layer_gradients(moe, small_spec(), name + " / " + overflow_name(overflow));
    }
  }
}

TEST_CASE("every registered expert layout passes the layer gradient check in double") {
  for (const auto& name : fixture().registry.names(PluginKind::experts)) {
    MoeConfig moe = small_moe("softmax_topk", name, {}, Overflow::drop, 1.25);
    LayerSpec spec = small_spec();
    const PluginInfo& info = fixture().registry.require(PluginKind::experts, name);
    if (name == "fine_grained") {
      moe.experts.params.set("d_ff", int64_t{4});
      moe.experts.params.set("segments", int64_t{2});
    }
    if (info.manifest->adjust_layer) info.manifest->adjust_layer(moe.experts.params, spec);
    check_layer_gradients(moe, spec, name);
  }
}

TEST_CASE("every registered balancer passes the layer gradient check in double") {
  for (const auto& name : fixture().registry.names(PluginKind::balancer)) {
    const std::vector<PluginChoice> balancers{choice(PluginKind::balancer, name)};
    check_layer_gradients(small_moe("softmax_topk", "glu", balancers, Overflow::dropless, 1.0), small_spec(), name);
  }
  // Several at once add up.
  const std::vector<PluginChoice> all{choice(PluginKind::balancer, "switch_aux"),
                                      choice(PluginKind::balancer, "z_loss")};
  check_layer_gradients(small_moe("softmax_topk", "full", all, Overflow::drop, 1.0), small_spec(), "switch_aux+z_loss");
}

// [parallel] capacity / balance = "local", one micro-batch per sequence of the check's two.
MicroBatchScopes per_sequence() {
  MicroBatchScopes s;
  s.capacity = true;
  s.balance = true;
  s.sequences = 1;
  return s;
}

TEST_CASE("micro-batch-local capacity and balancing pass the layer gradient check in double") {
  // Every balancer on each micro-batch; cv_squared on noisy_topk reads the noisy-gating context
  // cut to the micro-batch's rows; expert choice's assignments are not contiguous by token.
  for (const auto& name : fixture().registry.names(PluginKind::balancer)) {
    const std::vector<PluginChoice> balancers{choice(PluginKind::balancer, name)};
    check_layer_gradients(small_moe("softmax_topk", "glu", balancers, Overflow::drop, 1.0), small_spec(),
                          name + " per micro-batch", per_sequence());
  }
  const std::vector<PluginChoice> cv{choice(PluginKind::balancer, "cv_squared")};
  check_layer_gradients(small_moe("noisy_topk", "glu", cv, Overflow::drop, 1.0), small_spec(),
                        "noisy_topk + cv_squared per micro-batch", per_sequence());
  const std::vector<PluginChoice> aux{choice(PluginKind::balancer, "switch_aux"),
                                      choice(PluginKind::balancer, "z_loss")};
  for (const char* router : {"expert_choice", "sigmoid_grouped", "gshard_top2"})
    check_layer_gradients(small_moe(router, "glu", aux, Overflow::reroute, 1.0), small_spec(),
                          std::string(router) + " + switch_aux + z_loss per micro-batch", per_sequence());
}

TEST_CASE("micro-batch-local capacity and balancing count what each micro-batch alone counts") {
  // Two sequences of 6 tokens in one forward with local scopes against each sequence in a layer of
  // its own (the same weights): the balancers' loss is the mean of the two, the load and the
  // drops their sum. The global forms differ: switch_aux's f_i P_i is not linear in the batch.
  Ops& ops = *fixture().ops;
  const std::vector<PluginChoice> balancers{choice(PluginKind::balancer, "switch_aux"),
                                            choice(PluginKind::balancer, "z_loss")};
  const MoeConfig moe = small_moe("softmax_topk", "glu", balancers, Overflow::drop, 0.75);
  Rng data(21);
  const Tensor x = random_tensor(DType::f64, {12, 6}, data, 2.0);
  Rng rng(3);
  MoeLayer local(moe, small_spec(), fixture().registry, ops, rng, single_process(), per_sequence());
  local.forward(x, LayerInput{true, 1, 2, 6, nullptr});
  double mean_aux = 0;
  int64_t dropped = 0;
  std::vector<int64_t> load(4, 0);
  for (int64_t s = 0; s < 2; ++s) {
    Rng same(3);
    MoeLayer alone(moe, small_spec(), fixture().registry, ops, same);
    alone.forward(x.rows(6 * s, 6 * s + 6), LayerInput{true, 1, 1, 6, nullptr});
    mean_aux += alone.stats().aux_loss / 2;
    dropped += alone.stats().dropped;
    for (size_t e = 0; e < load.size(); ++e) load[e] += alone.stats().tokens_per_expert[e];
    CHECK(alone.stats().capacity == local.stats().capacity);  // ceil(6 * 2 / 4 * 0.75) = 3
  }
  CHECK(local.stats().aux_loss == doctest::Approx(mean_aux).epsilon(1e-12));
  CHECK(local.stats().tokens_per_expert == load);
  CHECK(local.stats().dropped == dropped);
  CHECK(dropped > 0);
  Rng again(3);
  MoeLayer global(moe, small_spec(), fixture().registry, ops, again);
  global.forward(x, LayerInput{true, 1, 2, 6, nullptr});
  CHECK(global.stats().aux_loss != doctest::Approx(mean_aux).epsilon(1e-9));
  CHECK(global.stats().capacity == 5);  // ceil(12 * 2 / 4 * 0.75)
}

TEST_CASE("a one-expert top-1 layer equals a dense FFN") {
  Ops& ops = *fixture().ops;
  MoeConfig moe = small_moe("softmax_topk", "glu", {}, Overflow::dropless, 1.0);
  moe.num_experts = 1;
  moe.top_k = 1;
  const LayerSpec spec = small_spec(1, 1);
  Rng rng(5);
  MoeLayer layer(moe, spec, fixture().registry, ops, rng);
  Rng data(6);
  const int64_t tokens = 9;
  const Tensor x = random_tensor(DType::f64, {tokens, spec.d_model}, data);
  const Tensor y = layer.forward(x, LayerInput{});
  // The dense SwiGLU with the same weights: softmax over one expert gives weight exactly 1.
  Tensor w_in, w_out;
  for (const auto& [name, p] : layer.named_parameters()) {
    if (name == "experts.w_in") w_in = p->value;
    if (name == "experts.w_out") w_out = p->value;
  }
  REQUIRE(w_in.defined());
  const int64_t f = w_out.dim(2), d = spec.d_model;
  double worst = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<double> h(static_cast<size_t>(f));
    for (int64_t j = 0; j < f; ++j) {
      double gate = 0, up = 0;
      for (int64_t i = 0; i < d; ++i) {
        gate += host_value(w_in, j * d + i) * host_value(x, t * d + i);
        up += host_value(w_in, (f + j) * d + i) * host_value(x, t * d + i);
      }
      h[static_cast<size_t>(j)] = gate / (1 + std::exp(-gate)) * up;
    }
    for (int64_t i = 0; i < d; ++i) {
      double out = 0;
      for (int64_t j = 0; j < f; ++j) out += host_value(w_out, i * f + j) * h[static_cast<size_t>(j)];
      worst = std::max(worst, std::abs(out - host_value(y, t * d + i)));
    }
  }
  CHECK(worst < 1e-12);
  CHECK(layer.stats().dropped == 0);
  CHECK(layer.stats().tokens_per_expert == std::vector<int64_t>{tokens});
}

TEST_CASE("capacity: first choices are served before second choices and drops are counted") {
  Ops& ops = *fixture().ops;
  // capacity = ceil(T*k/E * cf) = ceil(8*2/4 * 0.5) = 2 per expert: 8 of 16 assignments fit.
  MoeConfig moe = small_moe("softmax_topk", "glu", {}, Overflow::drop, 0.5);
  Rng rng(7);
  MoeLayer layer(moe, small_spec(), fixture().registry, ops, rng);
  Rng data(8);
  const Tensor x = random_tensor(DType::f64, {8, 6}, data);
  layer.forward(x, LayerInput{});
  const LayerStats& s = layer.stats();
  CHECK(s.capacity == 2);
  CHECK(s.assignments == 16);
  int64_t processed = 0;
  for (size_t e = 0; e < s.tokens_per_expert.size(); ++e) {
    CHECK(s.tokens_per_expert[e] <= 2);
    CHECK(s.tokens_per_expert[e] ==
          std::min<int64_t>(2, s.routed_per_expert[e]) + 0);  // drop: an expert processes min(capacity, routed)
    processed += s.tokens_per_expert[e];
  }
  CHECK(s.dropped == s.assignments - processed);
  CHECK(s.drop_fraction == doctest::Approx(static_cast<double>(s.dropped) / 16.0));
  // MaxVio twice: on the served load (capped at capacity 2 against a served mean of
  // processed / 4) and on the routed load (16 / 4 = 4 a expert on average), counted by hand.
  const int64_t max_routed = *std::max_element(s.routed_per_expert.begin(), s.routed_per_expert.end());
  const int64_t max_served = *std::max_element(s.tokens_per_expert.begin(), s.tokens_per_expert.end());
  CHECK(s.routed_max_violation == doctest::Approx(static_cast<double>(max_routed) / 4.0 - 1.0));
  CHECK(s.max_violation ==
        doctest::Approx(static_cast<double>(max_served) / (static_cast<double>(processed) / 4.0) - 1.0));
  CHECK(max_routed > 2);  // this input overflows an expert, so the two figures differ
  CHECK(s.routed_max_violation != doctest::Approx(s.max_violation));

  // Dropless processes everything; reroute drops no more than drop does.
  MoeConfig dropless = moe;
  dropless.overflow = Overflow::dropless;
  Rng rng2(7);
  MoeLayer all(dropless, small_spec(), fixture().registry, ops, rng2);
  all.forward(x, LayerInput{});
  CHECK(all.stats().dropped == 0);
  CHECK(all.stats().tokens_per_expert == all.stats().routed_per_expert);
  CHECK(all.stats().routed_max_violation == doctest::Approx(all.stats().max_violation));
  MoeConfig reroute = moe;
  reroute.overflow = Overflow::reroute;
  Rng rng3(7);
  MoeLayer moved(reroute, small_spec(), fixture().registry, ops, rng3);
  moved.forward(x, LayerInput{});
  // Rerouting moves assignments, so it can change which later ones overflow: what holds is that
  // every assignment is either processed once or counted as dropped, within capacity.
  int64_t moved_processed = 0;
  for (int64_t n : moved.stats().tokens_per_expert) {
    CHECK(n <= moved.stats().capacity);
    moved_processed += n;
  }
  CHECK(moved_processed + moved.stats().dropped == moved.stats().assignments);
  CHECK(moved.stats().rerouted > 0);
}

TEST_CASE("dispatch serves first choices before second choices, then overflows by policy") {
  // 4 tokens, k = 2, 2 experts, capacity 2. Every token's first choice is expert 0 for tokens 0-1
  // and expert 1 for tokens 2-3; second choices are the other expert. Capacity 2 fits exactly the
  // first choices: all four second choices overflow, whatever their position in the list.
  const std::vector<int32_t> token{0, 0, 1, 1, 2, 2, 3, 3};
  const std::vector<int32_t> expert{0, 1, 0, 1, 1, 0, 1, 0};
  const std::vector<int32_t> rank{0, 1, 0, 1, 0, 1, 0, 1};
  const Dispatch drop = plan_dispatch(token, expert, rank, 2, 2, Overflow::drop, Tensor{});
  CHECK(drop.dropped == 4);
  CHECK(drop.final_expert == std::vector<int32_t>{0, -1, 0, -1, 1, -1, 1, -1});
  CHECK(drop.offsets == std::vector<int64_t>{0, 2, 4});
  CHECK(drop.order == std::vector<int32_t>{0, 2, 4, 6});
  CHECK(drop.source_token == std::vector<int32_t>{0, 1, 2, 3});

  const Dispatch dropless = plan_dispatch(token, expert, rank, 2, 2, Overflow::dropless, Tensor{});
  CHECK(dropless.dropped == 0);
  CHECK(dropless.tokens_per_expert == std::vector<int64_t>{4, 4});

  // Reroute: 3 experts, capacity 1; token 0's first choice is expert 0 and token 1's too. Token
  // 1 moves to its most probable expert with room that it does not already use.
  const std::vector<int32_t> t2{0, 1};
  const std::vector<int32_t> e2{0, 0};
  const std::vector<int32_t> r2{0, 0};
  Tensor probs = host_tensor(DType::f64, {2, 3});
  const double p[] = {0.6, 0.3, 0.1, 0.5, 0.1, 0.4};
  for (int i = 0; i < 6; ++i) set_host_value(probs, i, p[i]);
  const Dispatch moved = plan_dispatch(t2, e2, r2, 3, 1, Overflow::reroute, probs);
  CHECK(moved.final_expert == std::vector<int32_t>{0, 2});
  CHECK(moved.rerouted == 1);
  CHECK(moved.dropped == 0);
  CHECK(expert_capacity(8, 2, 4, 1.25) == 5);
  CHECK(expert_capacity(10, 1, 4, 1.0) == 3);
}

TEST_CASE("dead experts are those without a token over the window") {
  DeadExpertTracker tracker(3, 100);
  tracker.record({10, 0, 5}, 40);
  CHECK(tracker.dead().empty());  // fewer than 100 tokens seen
  tracker.record({10, 0, 0}, 40);
  tracker.record({10, 0, 0}, 40);
  CHECK(tracker.dead() == std::vector<int64_t>{1});
  tracker.record({10, 0, 0}, 40);
  CHECK(tracker.dead() == std::vector<int64_t>{1, 2});
  tracker.record({0, 3, 0}, 40);
  CHECK(tracker.dead() == std::vector<int64_t>{2});
}

TEST_CASE("bad shapes give clear errors") {
  Ops& ops = *fixture().ops;
  Rng rng(1);
  MoeLayer layer(small_moe("softmax_topk", "glu", {}, Overflow::drop, 1.0), small_spec(), fixture().registry, ops, rng);
  Rng data(2);
  const Tensor wrong = random_tensor(DType::f64, {4, 5}, data);
  CHECK_THROWS_WITH_AS(layer.forward(wrong, LayerInput{}), doctest::Contains("MoE layer input: expected shape [4, 6]"),
                       RuntimeError);
  CHECK_THROWS_AS(layer.backward(wrong), RuntimeError);
}

// The router plugins on their own, loaded through the registry as a recipe loads them: every
// router's backward against central differences in double (w.r.t. x and every parameter, for a
// loss that reads plan.weight, plan.probs, plan.logits and, for noisy_topk, the load estimator's
// inputs), then each router's own semantics, the Ops slots the routers added, and the errors a
// bad setting gives.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <sstream>

#include "moelab/noisy_gating.hpp"
#include "moelab/plugin.hpp"
#include "test_support.hpp"

using namespace moelab;
using namespace moelab::test;

namespace {

// The router's cross-field problems for these settings (what the recipe engine reports).
ParamProblems check_router(const std::string& name, const LayerSpec& spec, const Overrides& overrides) {
  const PluginInfo& info = registry().require(PluginKind::router, name);
  ParamProblems problems;
  if (info.manifest->check) info.manifest->check(plugin_params(PluginKind::router, name, overrides), spec, problems);
  return problems;
}

std::shared_ptr<Router> make_router(const std::string& name, const LayerSpec& spec, const Overrides& overrides = {},
                                    uint64_t seed = 7) {
  REQUIRE(check_router(name, spec, overrides).empty());
  Rng rng(seed);
  return registry().make_router(name, plugin_params(PluginKind::router, name, overrides), spec, cpu_kernel(), rng);
}

// What a layer hands the router besides x.
struct Setting {
  bool training = true;
  uint64_t noise_seed = 11;  // the routing stream is re-created from this for every forward
  double capacity_factor = 1.0;
  const Tensor* expert_bias = nullptr;
  const Tensor* token_ids = nullptr;
};

RoutingPlan route(Router& router, const Tensor& x, const Setting& s) {
  Rng rng(s.noise_seed);
  const RouterContext ctx{cpu_kernel(), rng, s.training, 0, 1, x.dim(0), s.token_ids, s.expert_bias, s.capacity_factor};
  return router.forward(x, ctx);
}

std::vector<int32_t> ints(const Tensor& t) {
  const Tensor host = cpu_kernel().to_host(t);
  return {host.data<int32_t>(), host.data<int32_t>() + host.numel()};
}

// L = <weight, R1> + <probs, R2> + <logits, R3> (+ <noise_std, R4> + <threshold, R5> when the
// plan offers noisy_topk's load-estimator inputs, standing in for cv_squared's load loss).
struct Probe {
  Tensor r_weight, r_probs, r_logits, r_noise_std, r_threshold;

  Probe(int64_t assignments, int64_t tokens, int64_t experts, Rng& rng)
      : r_weight(random_normal(DType::f64, {assignments}, rng)),
        r_probs(random_normal(DType::f64, {tokens, experts}, rng)),
        r_logits(random_normal(DType::f64, {tokens, experts}, rng)),
        r_noise_std(random_normal(DType::f64, {tokens, experts}, rng)),
        r_threshold(random_normal(DType::f64, {tokens, experts}, rng)) {}

  static const NoisyGatingContext* noisy(const RoutingPlan& plan) {
    const auto* context = dynamic_cast<const NoisyGatingContext*>(plan.context.get());
    return context != nullptr && context->smooth_load() ? context : nullptr;
  }

  double loss(const RoutingPlan& plan) const {
    double sum = dot(plan.weight, r_weight) + dot(plan.probs, r_probs) + dot(plan.logits, r_logits);
    if (const auto* context = noisy(plan))
      sum += dot(context->noise_std, r_noise_std) + dot(context->threshold, r_threshold);
    return sum;
  }

  RouterGrad grad(const RoutingPlan& plan) const {
    Ops& ops = cpu_kernel();
    if (const auto* context = noisy(plan)) {
      ops.axpy(1.0, r_noise_std, context->grad_noise_std(ops));
      ops.axpy(1.0, r_threshold, context->grad_threshold(ops));
    }
    return RouterGrad{clone(r_weight), clone(r_logits), clone(r_probs)};
  }
};

// Central differences of Probe::loss w.r.t. every element of x and of every parameter, against
// the router's backward. Every perturbed forward must make the same routing decision as the
// unperturbed one (else the loss is not differentiable there and the inputs must change).
// In double with step 1e-6, truncation ~1e-12 and rounding ~1e-10 relative: 1e-6 has margin.
void check_gradients(const std::string& name, const LayerSpec& spec, const Overrides& overrides, const Setting& s,
                     int64_t tokens = 9, uint64_t data_seed = 3) {
  CAPTURE(name);
  CAPTURE(s.training);
  Ops& ops = cpu_kernel();
  const std::shared_ptr<Router> router = make_router(name, spec, overrides);
  Rng data(data_seed);
  Tensor x = random_normal(DType::f64, {tokens, spec.d_model}, data);
  const RoutingPlan base = route(*router, x, s);
  const std::vector<int32_t> base_expert = ints(base.expert), base_token = ints(base.token);
  const Probe probe(base.weight.numel(), tokens, spec.num_experts, data);

  zero_grads(ops, *router);
  Tensor grad_x = ops.zeros(DType::f64, x.shape());
  {
    Rng rng(s.noise_seed);
    const RouterContext ctx{ops, rng, s.training, 0, 1, tokens, s.token_ids, s.expert_bias, s.capacity_factor};
    router->backward(x, base, probe.grad(base), ctx, grad_x);
  }

  auto numeric = [&](Tensor& values) {
    Tensor out = host_tensor(DType::f64, values.shape());
    const double step = 1e-6;
    for (int64_t i = 0; i < values.numel(); ++i) {
      const double saved = host_value(values, i);
      double side[2];
      for (int j = 0; j < 2; ++j) {
        set_host_value(values, i, saved + (j == 0 ? step : -step));
        const RoutingPlan plan = route(*router, x, s);
        REQUIRE(ints(plan.expert) == base_expert);
        REQUIRE(ints(plan.token) == base_token);
        side[j] = probe.loss(plan);
      }
      set_host_value(values, i, saved);
      set_host_value(out, i, (side[0] - side[1]) / (2 * step));
    }
    return out;
  };
  CHECK(max_rel_error(grad_x, numeric(x), 1e-2) < 1e-6);
  for (Parameter* p : router->parameters()) {
    CAPTURE(p->name);
    const Tensor analytic = clone(p->grad);
    CHECK(max_rel_error(analytic, numeric(p->value), 1e-2) < 1e-6);
  }
}

Tensor iota_ids(int64_t n, int64_t modulo) {
  Tensor ids = host_tensor(DType::i32, {n});
  for (int64_t i = 0; i < n; ++i) ids.data<int32_t>()[i] = static_cast<int32_t>(i % modulo);
  return ids;
}

// The k largest of row (descending, ties lower index first), as topk_rows orders them.
std::vector<int32_t> top_indices(const std::vector<double>& row, int64_t k) {
  std::vector<int32_t> order(row.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
  order.resize(static_cast<size_t>(k));
  return order;
}

std::vector<double> row_of(const Tensor& host, int64_t r) {
  const int64_t cols = host.dim(1);
  std::vector<double> out(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) out[static_cast<size_t>(c)] = host_value(host, r * cols + c);
  return out;
}

// Logits x W^T on the host, from the router's parameter named "weight".
Tensor host_logits(Router& router, const Tensor& x) {
  for (Parameter* p : router.parameters())
    if (p->name == "weight") {
      Tensor logits = host_tensor(DType::f64, {x.dim(0), p->value.dim(0)});
      cpu_kernel().gemm(false, true, 1.0, x, p->value, 0.0, logits);
      return logits;
    }
  FAIL("router has no parameter named 'weight'");
  return {};
}

}  // namespace

TEST_CASE("the router plugins are registered") {
  const std::vector<std::string> names = registry().names(PluginKind::router);
  for (const char* name : {"noisy_topk", "gshard_top2", "sigmoid_grouped", "expert_choice", "hash"}) {
    CAPTURE(name);
    CHECK(std::find(names.begin(), names.end(), name) != names.end());
  }
}

// --- gradients -------------------------------------------------------------------------------

TEST_CASE("noisy_topk: backward matches finite differences, with and without noise") {
  const Overrides init{{"init_std", 0.7}};
  Setting training;
  check_gradients("noisy_topk", layer_spec(6, 2), init, training);
  check_gradients("noisy_topk", layer_spec(5, 1), init, training, 7, 5);
  Setting eval;
  eval.training = false;
  check_gradients("noisy_topk", layer_spec(6, 2), init, eval);
  // k = E: nothing is left out, so there are no thresholds; noise still reaches both weights.
  check_gradients("noisy_topk", layer_spec(3, 3), init, training);
}

TEST_CASE("gshard_top2: backward matches finite differences, with undispatched second choices") {
  const Overrides init{{"init_std", 0.7}};
  Setting training;
  check_gradients("gshard_top2", layer_spec(5, 2), init, training, 12);
  // The plan really has undispatched second choices for this check to mean something.
  const auto router = make_router("gshard_top2", layer_spec(5, 2), init);
  Rng data(3);
  const RoutingPlan plan = route(*router, random_normal(DType::f64, {12, 6}, data), training);
  const std::vector<int32_t> expert = ints(plan.expert);
  CHECK(std::count(expert.begin(), expert.end(), -1) > 0);

  Setting eval;
  eval.training = false;
  check_gradients("gshard_top2", layer_spec(5, 2), init, eval);
  const Tensor bias = tensor_of(DType::f64, {5}, {0.3, -0.2, 0.0, 0.5, -0.4});
  training.expert_bias = &bias;
  check_gradients("gshard_top2", layer_spec(5, 2), init, training);
}

TEST_CASE("sigmoid_grouped: backward matches finite differences (V3 and V2 forms)") {
  const Tensor bias = tensor_of(DType::f64, {8}, {0.1, -0.3, 0.2, 0.0, 0.4, -0.1, 0.0, 0.25});
  Setting s;
  s.expert_bias = &bias;
  check_gradients("sigmoid_grouped", layer_spec(8, 3),
                  {{"init_std", 0.7}, {"n_group", int64_t{4}}, {"topk_group", int64_t{2}}}, s);
  check_gradients("sigmoid_grouped", layer_spec(8, 3),
                  {{"init_std", 0.7},
                   {"score", std::string("softmax")},
                   {"group_score", std::string("max")},
                   {"n_group", int64_t{4}},
                   {"topk_group", int64_t{3}},
                   {"normalize", false},
                   {"routed_scaling_factor", 16.0}},
                  Setting{});
  check_gradients("sigmoid_grouped", layer_spec(6, 2), {{"init_std", 0.7}}, Setting{});
}

TEST_CASE("expert_choice: backward matches finite differences") {
  Setting s;
  check_gradients("expert_choice", layer_spec(4, 1), {{"init_std", 0.7}}, s, 10);
  s.capacity_factor = 2.0;
  check_gradients("expert_choice", layer_spec(3, 1), {{"init_std", 0.7}}, s, 7);
}

TEST_CASE("hash: no parameters and no gradient to x, which finite differences confirm") {
  const Tensor ids = iota_ids(9, 5);
  Setting s;
  s.token_ids = &ids;
  check_gradients("hash", layer_spec(4, 2), {{"vocab_size", int64_t{5}}}, s);
  CHECK(make_router("hash", layer_spec(4, 2))->parameters().empty());
}

// --- semantics -------------------------------------------------------------------------------

TEST_CASE("noisy_topk: evaluation is a plain softmax over the top k clean logits") {
  const LayerSpec spec = layer_spec(7, 3);
  const auto router = make_router("noisy_topk", spec, {{"init_std", 0.5}});
  Rng data(21);
  const Tensor x = random_normal(DType::f64, {20, spec.d_model}, data);
  Setting eval;
  eval.training = false;
  const RoutingPlan plan = route(*router, x, eval);
  const Tensor logits = host_logits(*router, x);
  CHECK(max_rel_error(plan.logits, logits) < 1e-14);
  const std::vector<int32_t> expert = ints(plan.expert);
  for (int64_t t = 0; t < 20; ++t) {
    const std::vector<double> row = row_of(logits, t);
    const std::vector<int32_t> top = top_indices(row, 3);
    double norm = 0;
    for (int32_t e : top) norm += std::exp(row[e]);
    for (int64_t j = 0; j < 3; ++j) {
      CHECK(expert[t * 3 + j] == top[j]);
      CHECK(host_value(plan.weight, t * 3 + j) == doctest::Approx(std::exp(row[top[j]]) / norm).epsilon(1e-13));
    }
  }
  // No noise in evaluation: nothing for a load estimator; repeated forwards agree.
  const auto* context = dynamic_cast<const NoisyGatingContext*>(plan.context.get());
  REQUIRE(context != nullptr);
  CHECK_FALSE(context->smooth_load());
  eval.noise_seed = 12;
  CHECK(max_rel_error(route(*router, x, eval).weight, plan.weight) == 0.0);

  // Training adds noise: the decisions or weights move, and different streams differ.
  Setting training;
  const RoutingPlan noisy = route(*router, x, training);
  CHECK(max_rel_error(noisy.weight, plan.weight) > 1e-3);
  training.noise_seed = 12;
  CHECK(max_rel_error(route(*router, x, training).weight, noisy.weight) > 1e-3);
  // noisy = false turns the noise off in training too.
  const auto quiet = make_router("noisy_topk", spec, {{"init_std", 0.5}, {"noisy", false}});
  CHECK(max_rel_error(route(*quiet, x, Setting{}).weight, plan.weight) == 0.0);
}

TEST_CASE("noisy_topk: the load estimator's thresholds are kth_excluding(H) and the noise std is softplus + min") {
  const LayerSpec spec = layer_spec(6, 2);
  const auto router = make_router("noisy_topk", spec, {{"init_std", 0.5}});
  Rng data(22);
  const Tensor x = random_normal(DType::f64, {15, spec.d_model}, data);
  const RoutingPlan plan = route(*router, x, Setting{});
  const auto& context = dynamic_cast<const NoisyGatingContext&>(*plan.context);
  REQUIRE(context.smooth_load());
  CHECK(context.clean_logits.raw() == plan.logits.raw());
  Tensor noise_input = host_tensor(DType::f64, {15, 6});
  cpu_kernel().gemm(false, true, 1.0, x, router->parameters()[1]->value, 0.0, noise_input);
  const std::vector<int32_t> expert = ints(plan.expert);
  for (int64_t t = 0; t < 15; ++t) {
    for (int64_t e = 0; e < 6; ++e) {
      const double z = host_value(noise_input, t * 6 + e);
      CHECK(host_value(context.noise_std, t * 6 + e) == doctest::Approx(std::log1p(std::exp(z)) + 1e-2).epsilon(1e-13));
    }
    // H = log(probs) + c_t; the threshold is an entry of H: the 3rd largest for the two kept
    // experts, the 2nd largest for the other four.
    std::vector<double> log_probs = row_of(plan.probs, t);
    for (double& v : log_probs) v = std::log(v);
    const std::vector<int32_t> order = top_indices(log_probs, 3);
    CHECK(order[0] == expert[t * 2]);
    CHECK(order[1] == expert[t * 2 + 1]);
    const double offset = host_value(context.threshold, t * 6 + order[0]) - log_probs[order[2]];
    for (int64_t e = 0; e < 6; ++e) {
      const bool kept = e == order[0] || e == order[1];
      const double h = log_probs[kept ? order[2] : order[1]] + offset;
      CHECK(host_value(context.threshold, t * 6 + e) == doctest::Approx(h).epsilon(1e-12));
    }
  }
}

TEST_CASE("gshard_top2: pair-normalised gates and a second expert dispatched with probability min(1, 2 g2)") {
  const LayerSpec spec = layer_spec(6, 2);
  const auto router = make_router("gshard_top2", spec, {{"init_std", 0.4}});
  Rng data(31);
  const int64_t tokens = 4000;
  const Tensor x = random_normal(DType::f64, {tokens, spec.d_model}, data);
  const RoutingPlan plan = route(*router, x, Setting{});
  const std::vector<int32_t> expert = ints(plan.expert);
  double expected = 0, variance = 0;
  int64_t dispatched = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    const std::vector<double> probs = row_of(plan.probs, t);
    const std::vector<int32_t> top = top_indices(probs, 2);
    const double g1 = probs[top[0]], g2 = probs[top[1]];
    CHECK(expert[2 * t] == top[0]);  // the first choice is always dispatched
    CHECK(host_value(plan.weight, 2 * t) == doctest::Approx(g1 / (g1 + g2)).epsilon(1e-13));
    CHECK(host_value(plan.weight, 2 * t + 1) == doctest::Approx(g2 / (g1 + g2)).epsilon(1e-13));
    REQUIRE((expert[2 * t + 1] == top[1] || expert[2 * t + 1] == -1));
    const double p = std::min(1.0, 2 * g2 / (g1 + g2));
    expected += p;
    variance += p * (1 - p);
    dispatched += expert[2 * t + 1] >= 0;
  }
  // A sum of independent Bernoulli draws: within 5 standard deviations of its mean.
  CAPTURE(expected);
  CAPTURE(dispatched);
  CHECK(std::abs(static_cast<double>(dispatched) - expected) < 5 * std::sqrt(variance));
  CHECK(dispatched < tokens);  // some were really dropped at these gates

  // Evaluation dispatches both by default; "all" in training too.
  Setting eval;
  eval.training = false;
  std::vector<int32_t> all = ints(route(*router, x, eval).expert);
  CHECK(std::count(all.begin(), all.end(), -1) == 0);
  const auto always = make_router("gshard_top2", spec, {{"init_std", 0.4}, {"second_policy", std::string("all")}});
  all = ints(route(*always, x, Setting{}).expert);
  CHECK(std::count(all.begin(), all.end(), -1) == 0);
}

TEST_CASE("sigmoid_grouped: only kept groups are used, and the bias moves the selection but not the weights") {
  const LayerSpec spec = layer_spec(12, 4);
  const Overrides settings{{"init_std", 0.5}, {"n_group", int64_t{4}}, {"topk_group", int64_t{2}}};
  const auto router = make_router("sigmoid_grouped", spec, settings);
  Rng data(41);
  const int64_t tokens = 60;
  const Tensor x = random_normal(DType::f64, {tokens, spec.d_model}, data);
  const Tensor logits = host_logits(*router, x);
  const Tensor bias = tensor_of(DType::f64, {12}, {0.0, 0.3, 0.0, -0.2, 0.6, 0.0, 0.0, 0.0, -0.5, 0.1, 0.2, 0.0});

  for (const Tensor* b : {static_cast<const Tensor*>(nullptr), &bias}) {
    CAPTURE(b != nullptr);
    Setting s;
    s.expert_bias = b;
    const RoutingPlan plan = route(*router, x, s);
    const std::vector<int32_t> expert = ints(plan.expert);
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<double> score = row_of(logits, t), key(12);
      for (double& v : score) v = 1 / (1 + std::exp(-v));
      for (int64_t e = 0; e < 12; ++e) key[e] = score[e] + (b ? host_value(*b, e) : 0.0);
      // Group scores: the sum of each group's two best keys; keep the best two groups.
      std::vector<double> group_score(4);
      for (int g = 0; g < 4; ++g) {
        std::vector<double> members(key.begin() + 3 * g, key.begin() + 3 * g + 3);
        std::sort(members.rbegin(), members.rend());
        group_score[g] = members[0] + members[1];
      }
      const std::vector<int32_t> kept = top_indices(group_score, 2);
      std::vector<double> eligible(12, -INFINITY);
      for (int32_t g : kept)
        for (int e = 3 * g; e < 3 * g + 3; ++e) eligible[e] = key[e];
      const std::vector<int32_t> top = top_indices(eligible, 4);
      double sum = 0;
      for (int32_t e : top) sum += score[e];
      for (int64_t j = 0; j < 4; ++j) {
        const int32_t e = expert[t * 4 + j];
        CHECK((e / 3 == kept[0] || e / 3 == kept[1]));
        CHECK(e == top[j]);
        // Unbiased scores, normalised over the k, times V3's 2.5.
        CHECK(host_value(plan.weight, t * 4 + j) == doctest::Approx(2.5 * score[e] / sum).epsilon(1e-13));
      }
      // probs: s / sum(s), what the sequence-wise balance loss reads.
      double total = 0;
      for (double v : score) total += v;
      for (int64_t e = 0; e < 12; ++e)
        CHECK(host_value(plan.probs, t * 12 + e) == doctest::Approx(score[e] / total).epsilon(1e-13));
    }
  }
  Setting biased;
  biased.expert_bias = &bias;
  CHECK(ints(route(*router, x, biased).expert) != ints(route(*router, x, Setting{}).expert));
}

TEST_CASE("expert_choice: every expert takes exactly c = ceil(T * cf / E) tokens, its most affine ones") {
  const LayerSpec spec = layer_spec(5, 1);
  const auto router = make_router("expert_choice", spec, {{"init_std", 0.5}});
  for (const auto& [tokens, cf] : std::vector<std::pair<int64_t, double>>{{20, 1.0}, {23, 1.0}, {17, 2.0}, {6, 8.0}}) {
    CAPTURE(tokens);
    CAPTURE(cf);
    Rng data(51 + static_cast<uint64_t>(tokens));
    const Tensor x = random_normal(DType::f64, {tokens, spec.d_model}, data);
    Setting s;
    s.capacity_factor = cf;
    const RoutingPlan plan = route(*router, x, s);
    const int64_t c = std::min<int64_t>(tokens, static_cast<int64_t>(std::ceil(static_cast<double>(tokens) * cf / 5)));
    CHECK(plan.top_k == 0);
    REQUIRE(plan.weight.numel() == 5 * c);
    const std::vector<int32_t> expert = ints(plan.expert), token = ints(plan.token), rank = ints(plan.rank);
    for (int32_t e = 0; e < 5; ++e) {
      std::set<int32_t> taken;
      std::vector<double> column(static_cast<size_t>(tokens));
      for (int64_t t = 0; t < tokens; ++t) column[t] = host_value(plan.probs, t * 5 + e);
      const std::vector<int32_t> best = top_indices(column, c);
      for (int64_t j = 0; j < c; ++j) {
        const int64_t a = e * c + j;
        CHECK(expert[a] == e);
        CHECK(rank[a] == 0);
        CHECK(token[a] == best[j]);
        CHECK(host_value(plan.weight, a) == host_value(plan.probs, token[a] * 5 + e));
        taken.insert(token[a]);
      }
      CHECK(static_cast<int64_t>(taken.size()) == c);
    }
  }
}

TEST_CASE("hash: deterministic tables; the balanced table balances a skewed vocabulary better than random") {
  const int64_t vocab = 512, experts = 4;
  const LayerSpec spec = layer_spec(experts, 1);
  const Tensor ids = iota_ids(vocab, vocab);
  Setting s;
  s.token_ids = &ids;
  const Tensor x = host_tensor(DType::f64, {vocab, spec.d_model});
  auto table = [&](const Overrides& overrides) {
    const auto router = make_router("hash", spec, overrides);
    const RoutingPlan plan = route(*router, x, s);
    for (int64_t a = 0; a < plan.weight.numel(); ++a) CHECK(host_value(plan.weight, a) == 1.0);
    return ints(plan.expert);
  };
  const Overrides random{{"vocab_size", vocab}, {"seed", int64_t{5}}};
  const std::vector<int32_t> random_table = table(random);
  CHECK(table(random) == random_table);  // the same seed gives the same table
  CHECK(table({{"vocab_size", vocab}, {"seed", int64_t{6}}}) != random_table);

  // The same id always goes to the same expert, wherever it appears.
  const auto router = make_router("hash", spec, random);
  const Tensor repeated = iota_ids(40, 7);
  Setting repeated_setting;
  repeated_setting.token_ids = &repeated;
  const std::vector<int32_t> routed = ints(route(*router, host_tensor(DType::f64, {40, 6}), repeated_setting).expert);
  for (int64_t t = 0; t < 40; ++t) CHECK(routed[t] == random_table[t % 7]);

  const std::string counts_file = std::string(MOELAB_TESTS_DIR) + "/data/hash_token_counts.txt";
  const std::vector<int32_t> balanced_table =
      table({{"vocab_size", vocab}, {"mode", std::string("balanced")}, {"counts_file", counts_file}});
  std::vector<int64_t> counts(static_cast<size_t>(vocab), 0);
  std::ifstream in(counts_file);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    int64_t id = 0, count = 0;
    std::istringstream(line) >> id >> count;
    counts[static_cast<size_t>(id)] = count;
  }
  auto imbalance = [&](const std::vector<int32_t>& assignment) {  // max load / mean load
    std::vector<double> load(experts, 0.0);
    for (int64_t id = 0; id < vocab; ++id) load[assignment[id]] += static_cast<double>(counts[id]);
    const double mean = std::accumulate(load.begin(), load.end(), 0.0) / experts;
    return *std::max_element(load.begin(), load.end()) / mean;
  };
  CAPTURE(imbalance(random_table));
  CAPTURE(imbalance(balanced_table));
  CHECK(imbalance(balanced_table) < imbalance(random_table));
  CHECK(imbalance(balanced_table) < 1.01);
  // Ids absent from the file (400 and up) carry no load; they fill up the experts holding the
  // fewest ids (water-filling), rather than all landing on the least-loaded one.
  std::vector<int64_t> held(experts, 0), absent(experts, 0);
  for (int64_t id = 0; id < vocab; ++id) {
    ++held[balanced_table[id]];
    if (counts[id] == 0) ++absent[balanced_table[id]];
  }
  const int64_t fewest = *std::min_element(held.begin(), held.end());
  CHECK(std::count(absent.begin(), absent.end(), 0) < experts - 1);
  for (int64_t e = 0; e < experts; ++e)
    if (absent[e] > 0) CHECK(held[e] <= fewest + 1);

  // top_k = 2: two distinct experts per id, each weighted 1/2.
  const auto two = make_router("hash", layer_spec(experts, 2), random);
  const RoutingPlan plan = route(*two, x, s);
  const std::vector<int32_t> pairs = ints(plan.expert);
  for (int64_t id = 0; id < vocab; ++id) CHECK(pairs[2 * id] != pairs[2 * id + 1]);
  CHECK(host_value(plan.weight, 0) == 0.5);
  CHECK(host_value(plan.probs, pairs[0]) == 0.5);
}

// --- the Ops slots the routers added -----------------------------------------------------------

TEST_CASE("Ops::transpose and Ops::grouped_topk_rows") {
  Ops& ops = cpu_kernel();
  Rng rng(61);
  const Tensor x = random_normal(DType::f64, {3, 5}, rng);
  Tensor y = host_tensor(DType::f64, {5, 3});
  ops.transpose(x, y);
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t c = 0; c < 5; ++c) CHECK(host_value(y, c * 3 + r) == host_value(x, r * 5 + c));

  // One group, all kept: exactly topk_rows, bias included.
  const Tensor scores = random_normal(DType::f32, {7, 8}, rng);
  const Tensor bias = random_normal(DType::f32, {8}, rng);
  Tensor v1 = host_tensor(DType::f32, {7, 3}), v2 = host_tensor(DType::f32, {7, 3});
  Tensor i1 = host_tensor(DType::i32, {7, 3}), i2 = host_tensor(DType::i32, {7, 3});
  ops.topk_rows(scores, 3, &bias, v1, i1);
  ops.grouped_topk_rows(scores, 3, &bias, 1, 1, 2, v2, i2);
  CHECK(values_of(v1) == values_of(v2));
  CHECK(values_of(i1) == values_of(i2));

  // Group "max" (group_top = 1): row [0 0 9 | 5 5 0 | 1 1 1 | 4 0 0] keeps groups 0 (9) and 1 (5)
  // although group 3's 4 beats their 0s; group_top = 2 ranks sums 9, 10, 2, 4 the same way.
  const Tensor row = tensor_of(DType::f64, {1, 12}, {0, 0, 9, 5, 5, 0, 1, 1, 1, 4, 0, 0});
  Tensor values = host_tensor(DType::f64, {1, 4}), index = host_tensor(DType::i32, {1, 4});
  ops.grouped_topk_rows(row, 4, nullptr, 4, 2, 1, values, index);
  CHECK(values_of(index) == std::vector<double>{2, 3, 4, 0});
  CHECK(values_of(values) == std::vector<double>{9, 5, 5, 0});
  // Ties between groups go to the lower group; a NaN is refused.
  const Tensor tied = tensor_of(DType::f64, {1, 4}, {1, 2, 2, 1});
  Tensor tv = host_tensor(DType::f64, {1, 1}), ti = host_tensor(DType::i32, {1, 1});
  ops.grouped_topk_rows(tied, 1, nullptr, 2, 1, 2, tv, ti);
  CHECK(host_value(ti, 0) == 1);
  const Tensor nan = tensor_of(DType::f64, {1, 4}, {1, NAN, 2, 1});
  CHECK_THROWS_AS(ops.grouped_topk_rows(nan, 1, nullptr, 2, 1, 2, tv, ti), RuntimeError);
  CHECK(contains(error_of([&] { ops.grouped_topk_rows(row, 9, nullptr, 4, 2, 1, values, index); }), "k = 9"));
}

// --- bad settings ----------------------------------------------------------------------------

TEST_CASE("routers reject bad settings with a message that names the parameter") {
  auto only_problem = [](const ParamProblems& problems, const std::string& param, const std::string& part) {
    REQUIRE(problems.size() == 1);
    CHECK(problems[0].param == param);
    CAPTURE(problems[0].message);
    CHECK(contains(problems[0].message, part));
  };
  only_problem(check_router("sigmoid_grouped", layer_spec(10, 2), {{"n_group", int64_t{4}}}), "n_group", "divisible");
  only_problem(check_router("sigmoid_grouped", layer_spec(8, 2), {{"n_group", int64_t{4}}, {"topk_group", int64_t{5}}}),
               "topk_group", "at most n_group (4)");
  only_problem(check_router("sigmoid_grouped", layer_spec(8, 5), {{"n_group", int64_t{4}}, {"topk_group", int64_t{2}}}),
               "topk_group", "top_k (5) must be at most");
  only_problem(check_router("sigmoid_grouped", layer_spec(8, 2), {{"n_group", int64_t{8}}, {"topk_group", int64_t{2}}}),
               "group_score", "at least 2 experts per group");
  CHECK(check_router("sigmoid_grouped", layer_spec(8, 2),
                     {{"n_group", int64_t{8}}, {"topk_group", int64_t{2}}, {"group_score", std::string("max")}})
            .empty());
  only_problem(check_router("gshard_top2", layer_spec(8, 3), {}), "top_k", "top_k must be 2");
  only_problem(check_router("noisy_topk", layer_spec(4, 5), {}), "top_k", "at most num_experts (4)");
  only_problem(check_router("hash", layer_spec(4, 1), {{"mode", std::string("balanced")}}), "counts_file",
               "needs a token-count file");
  only_problem(check_router("hash", layer_spec(4, 1), {{"counts_file", std::string("counts.txt")}}), "counts_file",
               "only read when mode");

  // Hash routing without token ids, or with ids outside the vocabulary: a UsageError that says so.
  const auto hash = make_router("hash", layer_spec(4, 1), {{"vocab_size", int64_t{10}}});
  const Tensor x = host_tensor(DType::f64, {3, 6});
  CHECK_THROWS_AS(route(*hash, x, Setting{}), UsageError);
  CHECK(contains(error_of<UsageError>([&] { route(*hash, x, Setting{}); }), "no token ids"));
  const Tensor bad_ids = tensor_of(DType::i32, {3}, {1, 10, 2});
  Setting s;
  s.token_ids = &bad_ids;
  CHECK_THROWS_AS(route(*hash, x, s), UsageError);
  CHECK(contains(error_of<UsageError>([&] { route(*hash, x, s); }), "token 1 has id 10, outside"));

  // A malformed counts file: every bad line, by file:line:column.
  const std::filesystem::path file = std::filesystem::path(MOELAB_BINARY_DIR) / "test_routers_bad_counts.txt";
  {
    std::ofstream out(file);
    out << "# comment\n3 10\n  12 4\n3 1\nseven 2\n5 -1\n";
  }
  const std::string message = error_of<UsageError>([&] {
    make_router("hash", layer_spec(4, 1),
                {{"vocab_size", int64_t{10}}, {"mode", std::string("balanced")}, {"counts_file", file.string()}});
  });
  CAPTURE(message);
  CHECK(contains(message, file.string() + ":3:3: error: counts_file: token id 12 is outside [0, vocab_size = 10)"));
  CHECK(contains(message, ":4:1: error: counts_file: token id 3 is listed twice (first on line 2)"));
  CHECK(contains(message, ":5:1: error: counts_file: expected \"token_id count\""));
  CHECK(contains(message, ":6:1: error: counts_file: count of token 5 must be non-negative"));
  std::filesystem::remove(file);
  CHECK_THROWS_AS(
      make_router("hash", layer_spec(4, 1),
                  {{"mode", std::string("balanced")}, {"counts_file", std::string("/nonexistent/counts.txt")}}),
      UsageError);
}

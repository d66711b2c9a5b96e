// The balancer plugins on their own: each loss against a naive re-computation of its published
// formula, each backward against central differences in double (w.r.t. whichever of plan.logits,
// plan.probs and plan.weight it differentiates), and each plugin's own behaviour (seq_aux's
// per-sequence split, entropy's sign convention, aux_free_bias steering the load).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>

#include "moelab/balancer.hpp"
#include "moelab/noisy_gating.hpp"
#include "test_support.hpp"

using namespace moelab;
using namespace moelab::test;

namespace {

std::shared_ptr<Balancer> make_balancer(const std::string& name, const LayerSpec& spec,
                                        const Overrides& overrides = {}) {
  Rng rng(7);
  return registry().make_balancer(name, plugin_params(PluginKind::balancer, name, overrides), spec, cpu_kernel(), rng);
}

// A token-choice plan as softmax_topk builds it, in double: logits normal(0, 1.5), probs their
// softmax, the k most probable experts per token with their probabilities as combine weights.
RoutingPlan random_plan(int64_t tokens, int64_t experts, int64_t k, Rng& rng) {
  Ops& ops = cpu_kernel();
  RoutingPlan plan;
  plan.top_k = k;
  plan.logits = ops.to_device(random_normal(DType::f64, {tokens, experts}, rng, 1.5));
  plan.probs = ops.empty(DType::f64, {tokens, experts});
  ops.softmax_rows(plan.logits, 1.0, plan.probs);
  Tensor values = ops.empty(DType::f64, {tokens, k});
  Tensor index = ops.empty(DType::i32, {tokens, k});
  ops.topk_rows(plan.probs, static_cast<int>(k), nullptr, values, index);
  plan.weight = values.reshaped({tokens * k});
  plan.expert = index.reshaped({tokens * k});
  set_token_major_assignments(ops, tokens, k, plan);
  return plan;
}

// What the layer would measure for `plan` with no capacity limit.
LayerLoad load_of(const RoutingPlan& plan, int64_t experts) {
  LayerLoad load;
  load.routed_per_expert.assign(static_cast<size_t>(experts), 0);
  const Tensor expert = cpu_kernel().to_host(plan.expert);
  for (int64_t a = 0; a < expert.numel(); ++a)
    if (expert.data<int32_t>()[a] >= 0) ++load.routed_per_expert[static_cast<size_t>(expert.data<int32_t>()[a])];
  load.tokens_per_expert = load.routed_per_expert;
  load.tokens = plan.probs.dim(0);
  load.top_k = plan.top_k;
  return load;
}

int32_t expert_at(const RoutingPlan& plan, int64_t a) {
  return cpu_kernel().to_host(plan.expert).data<int32_t>()[a];
}

// The router's gradient as the layer hands it to the balancers: grad.weight allocated (here with
// a random "gradient from the layer output" that a balancer must add to, not overwrite),
// logits/probs undefined.
RouterGrad layer_grad(const RoutingPlan& plan, Rng& rng) {
  RouterGrad grad;
  grad.weight = cpu_kernel().to_device(random_normal(DType::f64, {plan.weight.numel()}, rng));
  return grad;
}

std::vector<double> slot_values(const Tensor& t, int64_t numel) {
  if (!t.defined()) return std::vector<double>(static_cast<size_t>(numel), 0.0);
  return values_of(cpu_kernel().to_host(t));
}

// Checks the balancer's backward (scaled by grad_loss) against central differences of its forward
// w.r.t. plan.logits, plan.probs and plan.weight: all three, so that a slot a balancer must leave
// alone is checked to be left alone. In double with step 1e-6 the error is ~1e-10 relative for
// these smooth O(1) losses (rounding: ~1e-16 |loss| / step = 1e-10); 1e-6 leaves a margin and still
// catches any wrong term.
void check_balancer_gradients(Balancer& balancer, RoutingPlan& plan, const LayerLoad& load, const RouterContext& ctx) {
  Rng rng(11);
  const double grad_loss = 1.7;
  RouterGrad grad = layer_grad(plan, rng);
  const std::vector<double> upstream_weight = values_of(cpu_kernel().to_host(grad.weight));
  balancer.backward(plan, load, ctx, grad_loss, grad);

  auto check_slot = [&](Tensor& field, const Tensor& analytic_slot, const std::vector<double>& upstream,
                        const char* what) {
    CAPTURE(what);
    std::vector<double> analytic = slot_values(analytic_slot, field.numel());
    for (size_t i = 0; i < analytic.size(); ++i) analytic[i] -= upstream.empty() ? 0.0 : upstream[i];
    std::vector<double> numeric(analytic.size());
    const double step = 1e-6;
    for (int64_t i = 0; i < field.numel(); ++i) {
      const double original = host_value(field, i);
      set_host_value(field, i, original + step);
      const double plus = balancer.forward(plan, load, ctx);
      set_host_value(field, i, original - step);
      const double minus = balancer.forward(plan, load, ctx);
      set_host_value(field, i, original);
      numeric[static_cast<size_t>(i)] = grad_loss * (plus - minus) / (2 * step);
    }
    CHECK(max_rel_error(analytic, numeric, 1e-3) < 1e-6);
  };
  check_slot(plan.logits, grad.logits, {}, "d loss / d logits");
  check_slot(plan.probs, grad.probs, {}, "d loss / d probs");
  check_slot(plan.weight, grad.weight, upstream_weight, "d loss / d weight");
}

RouterContext context(Rng& rng, int64_t batch, int64_t seq_len) {
  RouterContext ctx{cpu_kernel(), rng};
  ctx.batch = batch;
  ctx.seq_len = seq_len;
  return ctx;
}

// --- naive re-computations of the published formulas ---------------------------------------------

// DeepSeek-V3 eq. 17-20, averaged over sequences.
double naive_seq_aux(const RoutingPlan& plan, int64_t experts, int64_t k, int64_t seq_len, double alpha) {
  const Tensor probs = cpu_kernel().to_host(plan.probs);
  const int64_t tokens = probs.dim(0), sequences = tokens / seq_len;
  double total = 0;
  for (int64_t s = 0; s < sequences; ++s) {
    double sequence_loss = 0;
    for (int64_t i = 0; i < experts; ++i) {
      double chosen = 0, prob = 0;
      for (int64_t t = s * seq_len; t < (s + 1) * seq_len; ++t) {
        for (int64_t j = 0; j < k; ++j) chosen += expert_at(plan, t * k + j) == i ? 1.0 : 0.0;
        prob += host_value(probs, t * experts + i);
      }
      const double f = static_cast<double>(experts) / static_cast<double>(k * seq_len) * chosen;
      sequence_loss += f * prob / static_cast<double>(seq_len);
    }
    total += alpha * sequence_loss;
  }
  return total / static_cast<double>(sequences);
}

double naive_cv_squared(const std::vector<double>& v, bool sample) {
  const double n = static_cast<double>(v.size());
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / n;
  double variance = 0;
  for (double x : v) variance += (x - mean) * (x - mean);
  variance /= sample ? n - 1 : n;
  return variance / (mean * mean + 1e-10);
}

double mean_entropy(const Tensor& probs_host) {
  const int64_t tokens = probs_host.dim(0), experts = probs_host.dim(1);
  double h = 0;
  for (int64_t i = 0; i < tokens * experts; ++i) {
    const double p = host_value(probs_host, i);
    if (p > 0) h -= p * std::log(p);
  }
  return h / static_cast<double>(tokens);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
TEST_CASE("seq_aux equals DeepSeek-V3 eq. 17-20 per sequence and its gradient is exact") {
  const int64_t tokens = 12, experts = 5, k = 2;
  const LayerSpec spec = layer_spec(experts, k);
  Rng rng(1);
  RoutingPlan plan = random_plan(tokens, experts, k, rng);
  const LayerLoad load = load_of(plan, experts);
  auto balancer = make_balancer("seq_aux", spec, {{"coef", 0.3}});
  for (int64_t seq_len : {int64_t{0}, int64_t{4}, int64_t{6}, int64_t{12}}) {
    CAPTURE(seq_len);
    Rng ctx_rng(2);
    const RouterContext ctx = context(ctx_rng, seq_len == 0 ? 1 : tokens / seq_len, seq_len);
    const double expected = naive_seq_aux(plan, experts, k, seq_len == 0 ? tokens : seq_len, 0.3);
    CHECK(balancer->forward(plan, load, ctx) == doctest::Approx(expected).epsilon(1e-12));
    check_balancer_gradients(*balancer, plan, load, ctx);
  }
}

TEST_CASE("seq_aux scores each sequence on its own: opposite skews do not cancel") {
  // Two sequences of 4 tokens, 2 experts, k = 1: the first sequence all picks expert 0 with
  // probability 0.9, the second all expert 1. Per sequence f = (2, 0), P = (0.9, 0.1) (and mirrored):
  // alpha * 1.8 each. Their union is balanced: f = (1, 1), P = (0.5, 0.5): alpha * 1.0.
  Ops& ops = cpu_kernel();
  const int64_t tokens = 8, experts = 2;
  RoutingPlan plan;
  plan.top_k = 1;
  std::vector<double> probs, weights;
  Tensor expert = host_tensor(DType::i32, {tokens});
  for (int64_t t = 0; t < tokens; ++t) {
    const bool first = t < 4;
    probs.insert(probs.end(), {first ? 0.9 : 0.1, first ? 0.1 : 0.9});
    weights.push_back(0.9);
    expert.data<int32_t>()[t] = first ? 0 : 1;
  }
  plan.probs = ops.to_device(tensor_of(DType::f64, {tokens, experts}, probs));
  plan.logits = ops.zeros(DType::f64, {tokens, experts});
  plan.weight = ops.to_device(tensor_of(DType::f64, {tokens}, weights));
  plan.expert = ops.to_device(expert);
  set_token_major_assignments(ops, tokens, 1, plan);
  const LayerLoad load = load_of(plan, experts);
  auto balancer = make_balancer("seq_aux", layer_spec(experts, 1), {{"coef", 0.5}});
  Rng rng(3);
  CHECK(balancer->forward(plan, load, context(rng, 2, 4)) == doctest::Approx(0.5 * 1.8).epsilon(1e-12));
  CHECK(balancer->forward(plan, load, context(rng, 1, 0)) == doctest::Approx(0.5 * 1.0).epsilon(1e-12));
  CHECK(balancer->forward(plan, load, context(rng, 1, 8)) == doctest::Approx(0.5 * 1.0).epsilon(1e-12));
}

TEST_CASE("seq_aux skips undispatched assignments and rejects a sequence length that does not divide T") {
  const int64_t tokens = 6, experts = 3, k = 2;
  Rng rng(4);
  RoutingPlan plan = random_plan(tokens, experts, k, rng);
  auto balancer = make_balancer("seq_aux", layer_spec(experts, k), {{"coef", 1.0}});
  Rng ctx_rng(5);
  // Dropping the second choice of every token halves f: the loss halves.
  const double full = balancer->forward(plan, load_of(plan, experts), context(ctx_rng, 2, 3));
  Tensor expert = cpu_kernel().to_host(plan.expert);
  for (int64_t t = 0; t < tokens; ++t) expert.data<int32_t>()[t * k + 1] = -1;
  cpu_kernel().copy(expert, plan.expert);
  const LayerLoad load = load_of(plan, experts);
  CHECK(balancer->forward(plan, load, context(ctx_rng, 2, 3)) < full);
  check_balancer_gradients(*balancer, plan, load, context(ctx_rng, 2, 3));
  CHECK_THROWS_AS(balancer->forward(plan, load, context(ctx_rng, 1, 4)), RuntimeError);
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("cv_squared equals w_imp CV(importance)^2 + w_load CV(load)^2 and its gradient is exact") {
  const int64_t tokens = 10, experts = 4, k = 2;
  const LayerSpec spec = layer_spec(experts, k);
  for (const std::string variance : {"population", "sample"}) {
    CAPTURE(variance);
    Rng rng(6);
    RoutingPlan plan = random_plan(tokens, experts, k, rng);
    const LayerLoad load = load_of(plan, experts);
    auto balancer =
        make_balancer("cv_squared", spec, {{"w_importance", 0.4}, {"w_load", 0.25}, {"variance", variance}});
    std::vector<double> importance(static_cast<size_t>(experts), 0.0), hard_load(static_cast<size_t>(experts), 0.0);
    const Tensor weight = cpu_kernel().to_host(plan.weight);
    for (int64_t a = 0; a < tokens * k; ++a) {
      importance[static_cast<size_t>(expert_at(plan, a))] += host_value(weight, a);
      hard_load[static_cast<size_t>(expert_at(plan, a))] += 1.0;
    }
    const bool sample = variance == "sample";
    const double expected = 0.4 * naive_cv_squared(importance, sample) + 0.25 * naive_cv_squared(hard_load, sample);
    Rng ctx_rng(7);
    const RouterContext ctx = context(ctx_rng, 1, 0);
    CHECK(balancer->forward(plan, load, ctx) == doctest::Approx(expected).epsilon(1e-12));
    // The hard load is a count: only the importance term reaches the combine weights, and the
    // logits and probs get nothing.
    check_balancer_gradients(*balancer, plan, load, ctx);
  }
}

TEST_CASE("cv_squared ignores undispatched assignments") {
  const int64_t tokens = 8, experts = 4, k = 2;
  Rng rng(8);
  RoutingPlan plan = random_plan(tokens, experts, k, rng);
  Tensor expert = cpu_kernel().to_host(plan.expert);
  for (int64_t a : {1, 6, 11}) expert.data<int32_t>()[a] = -1;
  cpu_kernel().copy(expert, plan.expert);
  const LayerLoad load = load_of(plan, experts);
  auto balancer = make_balancer("cv_squared", layer_spec(experts, k), {{"w_importance", 1.0}, {"w_load", 0.0}});
  std::vector<double> importance(static_cast<size_t>(experts), 0.0);
  const Tensor weight = cpu_kernel().to_host(plan.weight);
  for (int64_t a = 0; a < tokens * k; ++a)
    if (expert_at(plan, a) >= 0) importance[static_cast<size_t>(expert_at(plan, a))] += host_value(weight, a);
  Rng ctx_rng(9);
  const RouterContext ctx = context(ctx_rng, 1, 0);
  CHECK(balancer->forward(plan, load, ctx) == doctest::Approx(naive_cv_squared(importance, false)).epsilon(1e-12));
  check_balancer_gradients(*balancer, plan, load, ctx);  // includes: 0 for the undispatched weights
}

TEST_CASE("cv_squared of a balanced routing is 0, and CV^2 does not depend on the scale") {
  // 4 tokens, 2 experts, k = 1, weights 0.5 on each expert twice.
  Ops& ops = cpu_kernel();
  RoutingPlan plan;
  plan.top_k = 1;
  plan.logits = ops.zeros(DType::f64, {4, 2});
  plan.probs = ops.to_device(tensor_of(DType::f64, {4, 2}, {0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5}));
  plan.weight = ops.to_device(tensor_of(DType::f64, {4}, {0.5, 0.5, 0.5, 0.5}));
  Tensor expert = host_tensor(DType::i32, {4});
  for (int t = 0; t < 4; ++t) expert.data<int32_t>()[t] = t % 2;
  plan.expert = ops.to_device(expert);
  set_token_major_assignments(ops, 4, 1, plan);
  auto balancer = make_balancer("cv_squared", layer_spec(2, 1));
  Rng rng(10);
  CHECK(balancer->forward(plan, load_of(plan, 2), context(rng, 1, 0)) == doctest::Approx(0.0));
  ops.copy(tensor_of(DType::f64, {4}, {0.9, 0.1, 0.9, 0.1}), plan.weight);
  const double skewed = balancer->forward(plan, load_of(plan, 2), context(rng, 1, 0));
  ops.copy(tensor_of(DType::f64, {4}, {9.0, 1.0, 9.0, 1.0}), plan.weight);
  CHECK(balancer->forward(plan, load_of(plan, 2), context(rng, 1, 0)) == doctest::Approx(skewed).epsilon(1e-9));
  // importance (1.8, 0.2): mean 1, population variance 0.64 -> 0.1 * 0.64.
  CHECK(skewed == doctest::Approx(0.1 * 0.64).epsilon(1e-9));
}

TEST_CASE("cv_squared with noisy_topk uses Shazeer's smooth load (eq. 8-10), exact through the router") {
  Ops& ops = cpu_kernel();
  const int64_t tokens = 9, experts = 5, k = 2, d = 4;
  const LayerSpec spec = layer_spec(experts, k, d);
  Rng init(23);
  auto router = registry().make_router(
      "noisy_topk", plugin_params(PluginKind::router, "noisy_topk", {{"init_std", 0.5}}), spec, ops, init);
  auto balancer = make_balancer("cv_squared", spec, {{"w_importance", 0.3}, {"w_load", 0.6}});
  Rng data(24);
  Tensor x = ops.to_device(random_normal(DType::f64, {tokens, d}, data));
  // The same noise draws on every forward, so that finite differences see one function.
  auto routed = [&](bool training) {
    Rng noise(25);
    RouterContext ctx = context(noise, 1, 0);
    ctx.training = training;
    return router->forward(x, ctx);
  };
  Rng ctx_rng(26);
  RouterContext ctx = context(ctx_rng, 1, 0);

  RoutingPlan plan = routed(true);
  auto* noisy = dynamic_cast<NoisyGatingContext*>(plan.context.get());
  REQUIRE(noisy != nullptr);
  REQUIRE(noisy->smooth_load());
  const LayerLoad load = load_of(plan, experts);

  // The published formula, recomputed: Importance from the gates, Load_i = sum_t Phi(z_{t,i}).
  std::vector<double> importance(static_cast<size_t>(experts), 0.0), smooth(static_cast<size_t>(experts), 0.0);
  const Tensor weight = ops.to_host(plan.weight);
  for (int64_t a = 0; a < tokens * k; ++a) importance[static_cast<size_t>(expert_at(plan, a))] += host_value(weight, a);
  const Tensor clean = ops.to_host(noisy->clean_logits), noise_std = ops.to_host(noisy->noise_std);
  const Tensor threshold = ops.to_host(noisy->threshold);
  for (int64_t i = 0; i < tokens * experts; ++i) {
    const double z = (host_value(clean, i) - host_value(threshold, i)) / host_value(noise_std, i);
    smooth[static_cast<size_t>(i % experts)] += 0.5 * std::erfc(-z / std::sqrt(2.0));
  }
  CHECK(balancer->forward(plan, load, ctx) ==
        doctest::Approx(0.3 * naive_cv_squared(importance, false) + 0.6 * naive_cv_squared(smooth, false))
            .epsilon(1e-12));

  // w.r.t. the plan's clean logits and gates, then the context's noise std and thresholds.
  check_balancer_gradients(*balancer, plan, load, ctx);
  noisy->clear_added_grads();
  const double grad_loss = 1.7;
  RouterGrad grad = layer_grad(plan, data);
  balancer->backward(plan, load, ctx, grad_loss, grad);
  auto check_context_slot = [&](Tensor& field, const Tensor& analytic, const char* what) {
    CAPTURE(what);
    REQUIRE(analytic.defined());
    std::vector<double> numeric(static_cast<size_t>(field.numel()));
    for (int64_t i = 0; i < field.numel(); ++i) {
      const double original = host_value(field, i), step = 1e-6;
      set_host_value(field, i, original + step);
      const double plus = balancer->forward(plan, load, ctx);
      set_host_value(field, i, original - step);
      const double minus = balancer->forward(plan, load, ctx);
      set_host_value(field, i, original);
      numeric[static_cast<size_t>(i)] = grad_loss * (plus - minus) / (2 * step);
    }
    CHECK(max_rel_error(values_of(ops.to_host(analytic)), numeric, 1e-3) < 1e-6);
  };
  check_context_slot(noisy->noise_std, noisy->added_grad_noise_std(), "d loss / d noise_std");
  check_context_slot(noisy->threshold, noisy->added_grad_threshold(), "d loss / d threshold");
  noisy->clear_added_grads();

  // End to end: the loss as a function of x and the router's weights, through noisy_topk's backward.
  auto loss_of_router = [&] {
    const RoutingPlan p = routed(true);
    return balancer->forward(p, load_of(p, experts), ctx);
  };
  zero_grads(ops, *router);
  const RoutingPlan fresh = routed(true);
  RouterGrad router_grad;
  router_grad.weight = ops.zeros(DType::f64, {tokens * k});
  balancer->backward(fresh, load_of(fresh, experts), ctx, 1.0, router_grad);
  Tensor grad_x = ops.zeros(DType::f64, {tokens, d});
  router->backward(x, fresh, router_grad, ctx, grad_x);
  auto check_input = [&](Tensor& values, const Tensor& analytic, const std::string& what) {
    CAPTURE(what);
    std::vector<double> numeric(static_cast<size_t>(values.numel()));
    for (int64_t i = 0; i < values.numel(); ++i) {
      const double original = host_value(values, i), step = 1e-6;
      set_host_value(values, i, original + step);
      const double plus = loss_of_router();
      set_host_value(values, i, original - step);
      const double minus = loss_of_router();
      set_host_value(values, i, original);
      numeric[static_cast<size_t>(i)] = (plus - minus) / (2 * step);
    }
    CHECK(max_rel_error(values_of(ops.to_host(analytic)), numeric, 1e-3) < 1e-6);
  };
  check_input(x, grad_x, "x");
  for (Parameter* p : router->parameters()) check_input(p->value, p->grad, "router." + p->name);

  // In evaluation there is no noise to smooth over: the hard count, as for any other router.
  const RoutingPlan eval = routed(false);
  const LayerLoad eval_load = load_of(eval, experts);
  std::vector<double> eval_importance(static_cast<size_t>(experts), 0.0);
  const Tensor eval_weight = ops.to_host(eval.weight);
  for (int64_t a = 0; a < tokens * k; ++a)
    eval_importance[static_cast<size_t>(expert_at(eval, a))] += host_value(eval_weight, a);
  const std::vector<double> hard(eval_load.routed_per_expert.begin(), eval_load.routed_per_expert.end());
  CHECK(balancer->forward(eval, eval_load, ctx) ==
        doctest::Approx(0.3 * naive_cv_squared(eval_importance, false) + 0.6 * naive_cv_squared(hard, false))
            .epsilon(1e-12));
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("entropy is +/- coef * mean_t H(p_t) and its gradient is exact") {
  const int64_t tokens = 7, experts = 5, k = 2;
  const LayerSpec spec = layer_spec(experts, k);
  Rng rng(12);
  RoutingPlan plan = random_plan(tokens, experts, k, rng);
  const LayerLoad load = load_of(plan, experts);
  const double h = mean_entropy(cpu_kernel().to_host(plan.probs));
  Rng ctx_rng(13);
  const RouterContext ctx = context(ctx_rng, 1, 0);
  auto minimize = make_balancer("entropy", spec, {{"coef", 0.2}, {"mode", std::string("minimize")}});
  auto maximize = make_balancer("entropy", spec, {{"coef", 0.2}, {"mode", std::string("maximize")}});
  CHECK(minimize->forward(plan, load, ctx) == doctest::Approx(0.2 * h).epsilon(1e-12));
  CHECK(maximize->forward(plan, load, ctx) == doctest::Approx(-0.2 * h).epsilon(1e-12));
  check_balancer_gradients(*minimize, plan, load, ctx);
  check_balancer_gradients(*maximize, plan, load, ctx);
}

TEST_CASE("entropy: a descent step on its loss lowers the entropy in minimize mode and raises it in maximize") {
  Ops& ops = cpu_kernel();
  const int64_t tokens = 6, experts = 4, k = 1;
  const LayerSpec spec = layer_spec(experts, k);
  for (const std::string mode : {"minimize", "maximize"}) {
    CAPTURE(mode);
    Rng rng(14);
    RoutingPlan plan = random_plan(tokens, experts, k, rng);
    const LayerLoad load = load_of(plan, experts);
    auto balancer = make_balancer("entropy", spec, {{"coef", 1.0}, {"mode", mode}});
    Rng ctx_rng(15);
    const RouterContext ctx = context(ctx_rng, 1, 0);
    const double before = mean_entropy(ops.to_host(plan.probs));
    RouterGrad grad = layer_grad(plan, rng);
    balancer->backward(plan, load, ctx, 1.0, grad);
    // Through the softmax to the logits, one small step against the gradient, and back.
    Tensor dlogits = ops.zeros(DType::f64, {tokens, experts});
    ops.softmax_rows_backward(plan.probs, grad.probs, 1.0, false, dlogits);
    ops.axpy(-0.1, dlogits, plan.logits);
    ops.softmax_rows(plan.logits, 1.0, plan.probs);
    const double after = mean_entropy(ops.to_host(plan.probs));
    if (mode == "minimize")
      CHECK(after < before);
    else
      CHECK(after > before);
  }
}

TEST_CASE("entropy treats p = 0 as contributing 0 to the loss and to the gradient") {
  Ops& ops = cpu_kernel();
  RoutingPlan plan;
  plan.top_k = 1;
  plan.probs = ops.to_device(tensor_of(DType::f64, {2, 3}, {0.0, 0.25, 0.75, 0.5, 0.5, 0.0}));
  plan.logits = ops.zeros(DType::f64, {2, 3});
  plan.weight = ops.to_device(tensor_of(DType::f64, {2}, {0.75, 0.5}));
  plan.expert = ops.to_device(tensor_of(DType::i32, {2}, {2, 0}));
  set_token_major_assignments(ops, 2, 1, plan);
  auto balancer = make_balancer("entropy", layer_spec(3, 1), {{"coef", 1.0}});
  Rng rng(16);
  const RouterContext ctx = context(rng, 1, 0);
  const double h0 = -(0.25 * std::log(0.25) + 0.75 * std::log(0.75)), h1 = std::log(2.0);
  CHECK(balancer->forward(plan, load_of(plan, 3), ctx) == doctest::Approx((h0 + h1) / 2).epsilon(1e-12));
  RouterGrad grad = layer_grad(plan, rng);
  balancer->backward(plan, load_of(plan, 3), ctx, 1.0, grad);
  const std::vector<double> dprobs = values_of(ops.to_host(grad.probs));
  CHECK(dprobs[0] == 0.0);
  CHECK(dprobs[5] == 0.0);
  CHECK(dprobs[1] == doctest::Approx(-(std::log(0.25) + 1.0) / 2).epsilon(1e-12));
  for (double g : dprobs) CHECK(std::isfinite(g));
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("aux_free_bias adds no loss and moves the bias by gamma towards balance") {
  Ops& ops = cpu_kernel();
  const int64_t experts = 4;
  auto balancer = make_balancer("aux_free_bias", layer_spec(experts, 1), {{"gamma", 0.01}});
  CHECK(balancer->uses_expert_bias());
  Rng rng(17);
  RoutingPlan plan = random_plan(8, experts, 1, rng);
  LayerLoad load = load_of(plan, experts);
  const RouterContext ctx = context(rng, 1, 0);
  CHECK(balancer->forward(plan, load, ctx) == 0.0);
  RouterGrad grad;
  grad.weight = ops.zeros(DType::f64, {8});
  balancer->backward(plan, load, ctx, 1.0, grad);
  CHECK_FALSE(grad.logits.defined());
  CHECK_FALSE(grad.probs.defined());
  CHECK(values_of(ops.to_host(grad.weight)) == std::vector<double>(8, 0.0));

  // Loads (5, 2, 1, 0): mean 2 -> signs (-, 0, +, +).
  load.routed_per_expert = {5, 2, 1, 0};
  Tensor bias = ops.to_device(tensor_of(DType::f64, {experts}, {0.1, 0.0, 0.0, -0.2}));
  balancer->after_step(ops, load, bias);
  const std::vector<double> moved = values_of(ops.to_host(bias));
  CHECK(moved[0] == doctest::Approx(0.09));
  CHECK(moved[1] == doctest::Approx(0.0));
  CHECK(moved[2] == doctest::Approx(0.01));
  CHECK(moved[3] == doctest::Approx(-0.19));
}

TEST_CASE("aux_free_bias with update_every = 2 sums two steps' loads and moves once") {
  Ops& ops = cpu_kernel();
  auto balancer = make_balancer("aux_free_bias", layer_spec(2, 1), {{"gamma", 0.5}, {"update_every", int64_t{2}}});
  LayerLoad load;
  load.tokens = 4;
  load.top_k = 1;
  Tensor bias = ops.zeros(DType::f64, {2});
  load.routed_per_expert = {4, 0};
  balancer->after_step(ops, load, bias);
  CHECK(values_of(ops.to_host(bias)) == std::vector<double>{0.0, 0.0});
  load.routed_per_expert = {0, 3};  // window total (4, 3): expert 0 is over the mean
  balancer->after_step(ops, load, bias);
  CHECK(values_of(ops.to_host(bias)) == std::vector<double>{-0.5, 0.5});
}

TEST_CASE("aux_free_bias steers a softmax_topk router on a skewed input towards balance") {
  // Every token is one shared direction plus noise, so without a bias nearly every token picks the
  // same two experts (MaxVio near its maximum 8 / 2 - 1 = 3). The bias alone (no training) must
  // spread them: the router's logits have std ~1 so that a bias of a few gamma can move a choice
  // (with near one-hot probabilities no bias short of ~1 moves anything, and then it moves all).
  Ops& ops = cpu_kernel();
  const int64_t tokens = 64, experts = 8, k = 2, d = 16;
  const LayerSpec spec = layer_spec(experts, k, d);
  Rng init(18);
  auto router = registry().make_router(
      "softmax_topk", plugin_params(PluginKind::router, "softmax_topk", {{"init_std", 0.25}}), spec, ops, init);
  auto balancer = make_balancer("aux_free_bias", spec, {{"gamma", 0.002}});
  Rng data(19);
  const Tensor direction = random_normal(DType::f64, {1, d}, data);
  Tensor x_host = random_normal(DType::f64, {tokens, d}, data, 0.5);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < d; ++j)
      set_host_value(x_host, t * d + j, host_value(x_host, t * d + j) + host_value(direction, j));
  const Tensor x = ops.to_device(x_host);
  Tensor bias = ops.zeros(DType::f64, {experts});

  auto max_violation = [&](const LayerLoad& load) {
    const double mean = static_cast<double>(tokens * k) / static_cast<double>(experts);
    return static_cast<double>(*std::max_element(load.routed_per_expert.begin(), load.routed_per_expert.end())) / mean -
           1.0;
  };
  std::vector<double> violations;
  for (int step = 0; step < 300; ++step) {
    Rng step_rng(20);
    RouterContext ctx = context(step_rng, 1, 0);
    ctx.expert_bias = &bias;
    const RoutingPlan plan = router->forward(x, ctx);
    const LayerLoad load = load_of(plan, experts);
    violations.push_back(max_violation(load));
    balancer->after_step(ops, load, bias);
  }
  CAPTURE(violations.front());
  CHECK(violations.front() > 2.5);
  const double late = std::accumulate(violations.end() - 50, violations.end(), 0.0) / 50.0;
  CAPTURE(late);
  CHECK(late < 0.6);
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("these balancers' gradients are exact on the plans of every registered router") {
  // Plans as the routers make them: expert-choice (top_k = 0, tokens taken by several experts or
  // none), GShard's undispatched second choices (expert = -1), the sigmoid router's normalised
  // affinities in probs, noisy gating's context. Two sequences of 6 tokens.
  Ops& ops = cpu_kernel();
  const int64_t tokens = 12, experts = 4, k = 2, d = 5;
  const LayerSpec spec = layer_spec(experts, k, d);
  Rng data(27);
  const Tensor x = ops.to_device(random_normal(DType::f64, {tokens, d}, data));
  for (const std::string& router_name : registry().names(PluginKind::router)) {
    Overrides settings{{"init_std", 0.5}};
    if (router_name == "sigmoid_grouped")
      settings.insert(settings.end(), {{"n_group", int64_t{2}}, {"topk_group", int64_t{2}}});
    const ParamSchema& schema = registry().require(PluginKind::router, router_name).schema;
    const bool has_init_std =
        std::any_of(schema.begin(), schema.end(), [](const ParamSpec& p) { return p.name == "init_std"; });
    if (!has_init_std) settings.erase(settings.begin());
    Rng init(28);
    auto router =
        registry().make_router(router_name, plugin_params(PluginKind::router, router_name, settings), spec, ops, init);
    Rng noise(29);
    RouterContext ctx = context(noise, 2, 6);
    Tensor token_ids = host_tensor(DType::i32, {tokens});  // for the hash router
    for (int64_t t = 0; t < tokens; ++t) token_ids.data<int32_t>()[t] = static_cast<int32_t>(t * 11 % 97);
    ctx.token_ids = &token_ids;
    RoutingPlan plan = router->forward(x, ctx);
    const LayerLoad load = load_of(plan, experts);
    for (const auto& [balancer_name, overrides] :
         std::vector<std::pair<std::string, Overrides>>{{"seq_aux", {{"coef", 0.5}}},
                                                        {"cv_squared", {{"w_importance", 0.5}, {"w_load", 0.5}}},
                                                        {"entropy", {{"coef", 0.5}}},
                                                        {"aux_free_bias", {}}}) {
      CAPTURE(router_name);
      CAPTURE(balancer_name);
      // The hash router's probabilities are one-hot: the entropy's derivative -log p - 1 does not
      // exist at p = 0, so a finite difference there has nothing to agree with.
      if (router_name == "hash" && balancer_name == "entropy") continue;
      auto balancer = make_balancer(balancer_name, spec, overrides);
      CHECK(std::isfinite(balancer->forward(plan, load, ctx)));
      check_balancer_gradients(*balancer, plan, load, ctx);
      if (auto* noisy = dynamic_cast<NoisyGatingContext*>(plan.context.get())) noisy->clear_added_grads();
    }
  }
}

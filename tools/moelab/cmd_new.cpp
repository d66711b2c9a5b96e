// moelab new KIND NAME [DIR]: scaffolds an out-of-tree plugin project (a working plugin, its
// CMakeLists.txt on find_package(moelab), a doctest test and a README). The templates live here as
// raw strings so an installed moelab needs no data files; @NAME@, @CLASS@ and @KIND@ are filled in.
// tests/sdk builds and runs every kind's project against an installed moelab, so they cannot rot.
#include <fmt/format.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <system_error>
#include <vector>

#include "cli_util.hpp"
#include "commands.hpp"
#include "moelab/registry.hpp"

namespace moelab::cli {
namespace {

namespace fs = std::filesystem;

// ------------------------------------------------------------------------------------------------
// router: a linear gate, a softmax, top-k with renormalisation.
constexpr const char* kRouterSource =
    R"tmpl(// @NAME@: a token-choice router. Each token's hidden state goes through a linear gate and a softmax
// over the experts; the token goes to its top_k most probable experts, and their probabilities
// (renormalised to sum to 1 when `renormalize`) are the weights that combine the experts' outputs.
//   logits = x W^T                x [T, d], W [E, d]
//   probs  = softmax(logits)      [T, E]
//   weight = top-k of probs, / their sum when renormalize     [T, k]
#include <fmt/format.h>

#include <memory>
#include <moelab/plugin.hpp>
#include <vector>

namespace {

using namespace moelab;

// What the forward hands to its backward.
struct @CLASS@Saved : ForwardContext {
  Tensor selected;  // [T, k]: the chosen probabilities, before renormalisation
};

class @CLASS@ final : public Router {
 public:
  // What a recipe may set in this router's table; moelab validates the table against it (types,
  // ranges, unknown keys) before the constructor runs.
  static ParamSchema schema() {
    return {
        param_int("top_k", 0, "experts per token; 0 takes the layer's moe.top_k").range(0, 256),
        param_bool("renormalize", true, "rescale the k chosen probabilities to sum to 1"),
        param_float("init_std", 0.02, "standard deviation of the gate's initial weights").at_least(0),
    };
  }

  // Rules across fields and the layer; moelab reports them with the recipe's file:line:column.
  static void check(const ParamSet& params, const LayerSpec& spec, ParamProblems& problems) {
    const int64_t k = params.get_int("top_k");
    if (k > spec.num_experts)
      problems.push_back({"top_k", fmt::format("must be at most num_experts ({}), got {}", spec.num_experts, k)});
  }

  @CLASS@(const ParamSet& params, const LayerSpec& spec, Ops& ops, Rng& rng)
      : spec_(spec),
        top_k_(params.get_int("top_k") > 0 ? params.get_int("top_k") : spec.top_k),
        renormalize_(params.get_bool("renormalize")),
        gate_(make_parameter(ops, "weight", spec.dtype, {spec.num_experts, spec.d_model}, rng,
                             params.get_float("init_std"))) {}

  std::vector<Parameter*> parameters() override { return {&gate_}; }

  RoutingPlan forward(const Tensor& x, const RouterContext& ctx) override {
    Ops& ops = ctx.ops;
    const int64_t tokens = x.dim(0), experts = spec_.num_experts, k = top_k_;
    expect_shape(x, {tokens, spec_.d_model}, "@NAME@ router input");
    RoutingPlan plan;
    plan.top_k = k;
    plan.logits = ops.empty(x.dtype(), {tokens, experts});
    ops.gemm(false, true, 1.0, x, gate_.value, 0.0, plan.logits);
    plan.probs = ops.empty(x.dtype(), {tokens, experts});
    ops.softmax_rows(plan.logits, 1.0, plan.probs);

    auto saved = std::make_unique<@CLASS@Saved>();
    saved->selected = ops.empty(x.dtype(), {tokens, k});
    Tensor index = ops.empty(DType::i32, {tokens, k});
    // expert_bias (set when an aux-loss-free balancer is on) steers the choice, not the weights.
    ops.topk_rows(plan.probs, static_cast<int>(k), ctx.expert_bias, saved->selected, index);
    Tensor weight = ops.empty(x.dtype(), {tokens, k});
    if (renormalize_)
      ops.normalize_rows(saved->selected, weight);
    else
      ops.copy(saved->selected, weight);

    plan.expert = index.reshaped({tokens * k});
    plan.weight = weight.reshaped({tokens * k});
    set_token_major_assignments(ops, tokens, k, plan);  // plan.token, plan.rank
    plan.context = std::move(saved);
    return plan;
  }

  void backward(const Tensor& x, const RoutingPlan& plan, const RouterGrad& grad, const RouterContext& ctx,
                Tensor& grad_x) override {
    Ops& ops = ctx.ops;
    const auto& saved = dynamic_cast<const @CLASS@Saved&>(*plan.context);
    const int64_t tokens = x.dim(0), experts = spec_.num_experts, k = top_k_;

    // weight -> the selected probabilities [T, k]
    Tensor dselected = ops.empty(x.dtype(), {tokens, k});
    if (renormalize_)
      ops.normalize_rows_backward(saved.selected, plan.weight.reshaped({tokens, k}), grad.weight.reshaped({tokens, k}),
                                  /*accumulate=*/false, dselected);
    else
      ops.copy(grad.weight, dselected);
    // selected -> probs [T, E]: each selected value is probs[token, expert]; balancers add theirs.
    Tensor dprobs = ops.zeros(x.dtype(), {tokens, experts});
    if (grad.probs.defined()) ops.axpy(1.0, grad.probs, dprobs);
    ops.scatter_add_elements(dselected.reshaped({tokens * k}), plan.token, plan.expert, dprobs);
    // probs -> logits [T, E]; a z-loss adds its gradient on the logits directly.
    Tensor dlogits = ops.zeros(x.dtype(), {tokens, experts});
    if (grad.logits.defined()) ops.axpy(1.0, grad.logits, dlogits);
    ops.softmax_rows_backward(plan.probs, dprobs, 1.0, /*accumulate=*/true, dlogits);
    // logits = x W^T: dW [E, d] += dlogits^T x;  dx [T, d] += dlogits W
    ops.gemm(true, false, 1.0, dlogits, x, 1.0, gate_.grad);
    ops.gemm(false, false, 1.0, dlogits, gate_.value, 1.0, grad_x);
  }

 private:
  LayerSpec spec_;
  int64_t top_k_;
  bool renormalize_;
  Parameter gate_;  // W [E, d]
};

}  // namespace

MOELAB_ROUTER_PLUGIN(@CLASS@, "@NAME@", "0.1.0", "linear gate, softmax, top-k (optionally renormalised)")
)tmpl";

constexpr const char* kRouterTest =
    R"tmpl(// @NAME@'s test: it routes each token to its k most probable experts with weights that sum to 1,
// its backward matches finite differences in double, and a top_k larger than the layer is refused.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <moelab/registry.hpp>
#include <numeric>
#include <vector>

using namespace moelab;

namespace {

// The installation's plugins (the cpu kernel) and this project's build folder (the plugin).
PluginRegistry plugins() {
  PluginRegistry registry = PluginRegistry::with_default_path();
  registry.scan({PLUGIN_DIR});
  for (const PluginProblem& problem : registry.problems())
    MESSAGE("plugin problem: " << problem.file.string() << ": " << problem.reason);
  return registry;
}

LayerSpec small_layer() {
  LayerSpec spec;
  spec.d_model = 6;
  spec.num_experts = 5;
  spec.top_k = 2;
  spec.dtype = DType::f64;  // double, so finite differences are exact enough to compare
  return spec;
}

}  // namespace

TEST_CASE("@NAME@ sends each token to its k most probable experts, and its gradients are right") {
  const PluginRegistry registry = plugins();
  const PluginInfo& info = registry.require(PluginKind::router, "@NAME@");
  std::shared_ptr<Ops> ops =
      registry.make_kernel("cpu", defaults_of(registry.require(PluginKind::kernel, "cpu").schema));
  const LayerSpec spec = small_layer();
  ParamSet params = defaults_of(info.schema);
  params.set("init_std", 0.5);  // large enough that the experts' probabilities differ clearly
  Rng rng(1);
  std::shared_ptr<Router> router = registry.make_router("@NAME@", params, spec, *ops, rng);

  const int64_t tokens = 7, experts = spec.num_experts, k = spec.top_k;
  Tensor x = host_tensor<double>({tokens, spec.d_model});
  for (int64_t i = 0; i < x.numel(); ++i) x.data<double>()[i] = rng.normal();
  RouterContext ctx{*ops, rng};
  ctx.seq_len = tokens;

  RoutingPlan plan = router->forward(x, ctx);
  REQUIRE(plan.top_k == k);
  const Tensor probs = ops->to_host(plan.probs), expert = ops->to_host(plan.expert), weight = ops->to_host(plan.weight);
  for (int64_t t = 0; t < tokens; ++t) {
    const double* p = probs.data<double>() + t * experts;
    std::vector<int> order(static_cast<size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    const int32_t* chosen = expert.data<int32_t>() + t * k;
    const double* w = weight.data<double>() + t * k;
    CHECK(chosen[0] == order[0]);
    CHECK(chosen[1] == order[1]);
    CHECK(w[0] + w[1] == doctest::Approx(1.0));
    CHECK(w[0] == doctest::Approx(p[chosen[0]] / (p[chosen[0]] + p[chosen[1]])));
  }

  // L = <c, weight> + <r, probs> + <q, logits> with random c, r, q: the layer's gradient and what
  // balancers send on probs and logits all reach W and x.
  std::vector<double> c(static_cast<size_t>(tokens * k)), r(static_cast<size_t>(tokens * experts)), q(r.size());
  for (double& v : c) v = rng.normal();
  for (double& v : r) v = rng.normal();
  for (double& v : q) v = rng.normal();
  auto loss = [&] {
    const RoutingPlan p = router->forward(x, ctx);
    const Tensor w = ops->to_host(p.weight), pr = ops->to_host(p.probs), lg = ops->to_host(p.logits);
    double sum = 0;
    for (size_t i = 0; i < c.size(); ++i) sum += c[i] * w.data<double>()[i];
    for (size_t i = 0; i < r.size(); ++i) sum += r[i] * pr.data<double>()[i] + q[i] * lg.data<double>()[i];
    return sum;
  };
  RouterGrad grad;
  grad.weight = host_tensor<double>({tokens * k});
  grad.probs = host_tensor<double>({tokens, experts});
  grad.logits = host_tensor<double>({tokens, experts});
  std::copy(c.begin(), c.end(), grad.weight.data<double>());
  std::copy(r.begin(), r.end(), grad.probs.data<double>());
  std::copy(q.begin(), q.end(), grad.logits.data<double>());
  grad.weight = ops->to_device(grad.weight);
  grad.probs = ops->to_device(grad.probs);
  grad.logits = ops->to_device(grad.logits);
  Tensor grad_x = ops->zeros(DType::f64, {tokens, spec.d_model});
  zero_grads(*ops, *router);
  router->backward(x, plan, grad, ctx, grad_x);

  auto numeric = [&](double& value) {
    const double saved = value, step = 1e-6;
    value = saved + step;
    const double up = loss();
    value = saved - step;
    const double down = loss();
    value = saved;
    return (up - down) / (2 * step);
  };
  Parameter& gate = *router->parameters().at(0);
  const Tensor gate_grad = ops->to_host(gate.grad), input_grad = ops->to_host(grad_x);
  for (int64_t i = 0; i < gate.value.numel(); ++i)
    CHECK(gate_grad.data<double>()[i] == doctest::Approx(numeric(gate.value.data<double>()[i])).epsilon(1e-6));
  for (int64_t i = 0; i < x.numel(); ++i)
    CHECK(input_grad.data<double>()[i] == doctest::Approx(numeric(x.data<double>()[i])).epsilon(1e-6));
}

TEST_CASE("@NAME@ refuses more experts per token than the layer has") {
  const PluginRegistry registry = plugins();
  const PluginInfo& info = registry.require(PluginKind::router, "@NAME@");
  REQUIRE(static_cast<bool>(info.manifest->check));
  ParamSet params = defaults_of(info.schema);
  params.set("top_k", int64_t{9});
  ParamProblems problems;
  info.manifest->check(params, small_layer(), problems);
  REQUIRE(problems.size() == 1);
  CHECK(problems[0].param == "top_k");
  CHECK(problems[0].message == "must be at most num_experts (5), got 9");
}
)tmpl";

// ------------------------------------------------------------------------------------------------
// experts: each expert a two-layer MLP.
constexpr const char* kExpertsSource =
    R"tmpl(// @NAME@: routed experts, each a two-layer MLP   y = act(x W_in^T) W_out^T
//   W_in [E, F, d], W_out [E, d, F]   (torch.nn.Linear's [out, in] layout, so HF weights map directly)
// The layer hands over the dispatched rows grouped by expert: rows offsets[e]..offsets[e+1] of x
// belong to expert e, and one grouped GEMM runs every expert at once.
#include <memory>
#include <moelab/plugin.hpp>
#include <vector>

namespace {

using namespace moelab;

// What the forward hands to its backward.
struct @CLASS@Saved : ForwardContext {
  Tensor pre;     // [R, F]  x W_in^T, before the activation
  Tensor hidden;  // [R, F]  act(pre)
};

class @CLASS@ final : public Experts {
 public:
  static ParamSchema schema() {
    return {
        param_int("d_ff", 64, "hidden width of one expert").at_least(1),
        param_choice("activation", "gelu", {"relu", "gelu", "silu"}, "the MLP's nonlinearity"),
        param_float("init_std", 0.02, "standard deviation of the initial weights").at_least(0),
    };
  }

  @CLASS@(const ParamSet& params, const LayerSpec& spec, Ops& ops, Rng& rng)
      : d_model_(spec.d_model),
        d_ff_(params.get_int("d_ff")),
        activation_(parse_activation(params.get_string("activation"))),
        w_in_(make_parameter(ops, "w_in", spec.dtype, {spec.num_experts, d_ff_, d_model_}, rng,
                             params.get_float("init_std"))),
        w_out_(make_parameter(ops, "w_out", spec.dtype, {spec.num_experts, d_model_, d_ff_}, rng,
                              params.get_float("init_std"))) {}

  std::vector<Parameter*> parameters() override { return {&w_in_, &w_out_}; }

  // x [R, d] grouped by expert -> y [R, d]
  std::unique_ptr<ForwardContext> forward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets,
                                          Tensor& y) override {
    const int64_t rows = x.dim(0);
    auto saved = std::make_unique<@CLASS@Saved>();
    saved->pre = ops.empty(x.dtype(), {rows, d_ff_});
    ops.grouped_gemm(x, w_in_.value, /*trans_w=*/true, offsets, 1.0, 0.0, saved->pre);
    saved->hidden = ops.empty(x.dtype(), {rows, d_ff_});
    ops.activation(activation_, saved->pre, saved->hidden);
    ops.grouped_gemm(saved->hidden, w_out_.value, /*trans_w=*/true, offsets, 1.0, 0.0, y);
    return saved;
  }

  void backward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets, const ForwardContext& context,
                const Tensor& dy, Tensor& dx) override {
    const auto& saved = dynamic_cast<const @CLASS@Saved&>(context);
    const int64_t rows = x.dim(0);
    // y = hidden W_out^T:  dW_out [E, d, F] += dy^T hidden;  dhidden [R, F] = dy W_out
    ops.grouped_gemm_weight_grad(saved.hidden, dy, /*trans_w=*/true, offsets, /*accumulate=*/true, w_out_.grad);
    Tensor dhidden = ops.empty(x.dtype(), {rows, d_ff_});
    ops.grouped_gemm(dy, w_out_.value, /*trans_w=*/false, offsets, 1.0, 0.0, dhidden);
    // hidden = act(pre)
    Tensor dpre = ops.empty(x.dtype(), {rows, d_ff_});
    ops.activation_backward(activation_, saved.pre, dhidden, /*accumulate=*/false, dpre);
    // pre = x W_in^T:  dW_in [E, F, d] += dpre^T x;  dx [R, d] = dpre W_in
    ops.grouped_gemm_weight_grad(x, dpre, /*trans_w=*/true, offsets, /*accumulate=*/true, w_in_.grad);
    ops.grouped_gemm(dpre, w_in_.value, /*trans_w=*/false, offsets, 1.0, 0.0, dx);
  }

  // Two matrix products of d x F, two FLOPs per multiply-add.
  double flops_per_routed_token() const override { return 4.0 * static_cast<double>(d_model_ * d_ff_); }

 private:
  int64_t d_model_, d_ff_;
  Activation activation_;
  Parameter w_in_, w_out_;
};

}  // namespace

MOELAB_EXPERTS_PLUGIN(@CLASS@, "@NAME@", "0.1.0", "experts as two-layer MLPs, y = act(x W_in^T) W_out^T")
)tmpl";

constexpr const char* kExpertsTest =
    R"tmpl(// @NAME@'s test: each expert computes its own MLP on its own rows (an expert with no rows is fine),
// and the backward matches finite differences in double.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <moelab/registry.hpp>
#include <vector>

using namespace moelab;

namespace {

PluginRegistry plugins() {
  PluginRegistry registry = PluginRegistry::with_default_path();
  registry.scan({PLUGIN_DIR});
  for (const PluginProblem& problem : registry.problems())
    MESSAGE("plugin problem: " << problem.file.string() << ": " << problem.reason);
  return registry;
}

struct Setup {
  PluginRegistry registry = plugins();
  std::shared_ptr<Ops> ops =
      registry.make_kernel("cpu", defaults_of(registry.require(PluginKind::kernel, "cpu").schema));
  LayerSpec spec;
  std::vector<int64_t> offsets{0, 2, 2, 5};  // expert 0: rows 0-1, expert 1: none, expert 2: rows 2-4
  Rng rng{3};

  Setup() {
    spec.d_model = 4;
    spec.num_experts = 3;
    spec.dtype = DType::f64;  // double, so finite differences are exact enough to compare
  }
  std::shared_ptr<Experts> make(const std::string& activation) {
    ParamSet params = defaults_of(registry.require(PluginKind::experts, "@NAME@").schema);
    params.set("d_ff", int64_t{5});
    params.set("activation", activation);
    params.set("init_std", 0.5);
    return registry.make_experts("@NAME@", params, spec, *ops, rng);
  }
  Tensor random(Shape shape) {
    Tensor t = host_tensor<double>(std::move(shape));
    for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = rng.normal();
    return t;
  }
};

}  // namespace

TEST_CASE("@NAME@: each row goes through its own expert's MLP") {
  Setup s;
  std::shared_ptr<Experts> experts = s.make("relu");
  const int64_t rows = 5, d = 4, f = 5;
  Tensor x = s.random({rows, d});
  Tensor y = s.ops->zeros(DType::f64, {rows, d});
  experts->forward(*s.ops, x, s.offsets, y);
  const Tensor w_in = s.ops->to_host(experts->parameters().at(0)->value);   // [E, F, d]
  const Tensor w_out = s.ops->to_host(experts->parameters().at(1)->value);  // [E, d, F]
  const Tensor out = s.ops->to_host(y);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t e = row < 2 ? 0 : 2;
    for (int64_t i = 0; i < d; ++i) {
      double expected = 0;
      for (int64_t j = 0; j < f; ++j) {
        double pre = 0;
        for (int64_t m = 0; m < d; ++m) pre += x.data<double>()[row * d + m] * w_in.data<double>()[(e * f + j) * d + m];
        expected += std::max(pre, 0.0) * w_out.data<double>()[(e * d + i) * f + j];
      }
      CHECK(out.data<double>()[row * d + i] == doctest::Approx(expected).epsilon(1e-12));
    }
  }
  CHECK(experts->flops_per_routed_token() == 4.0 * d * f);
}

TEST_CASE("@NAME@: the backward matches finite differences") {
  Setup s;
  std::shared_ptr<Experts> experts = s.make("gelu");
  const int64_t rows = 5, d = 4;
  Tensor x = s.random({rows, d});
  const Tensor r = s.random({rows, d});  // L = <r, y>
  auto loss = [&] {
    Tensor y = s.ops->zeros(DType::f64, {rows, d});
    experts->forward(*s.ops, x, s.offsets, y);
    const Tensor out = s.ops->to_host(y);
    double sum = 0;
    for (int64_t i = 0; i < out.numel(); ++i) sum += r.data<double>()[i] * out.data<double>()[i];
    return sum;
  };
  Tensor y = s.ops->zeros(DType::f64, {rows, d});
  const auto saved = experts->forward(*s.ops, x, s.offsets, y);
  zero_grads(*s.ops, *experts);
  Tensor dx = s.ops->zeros(DType::f64, {rows, d});
  experts->backward(*s.ops, x, s.offsets, *saved, s.ops->to_device(r), dx);

  auto numeric = [&](double& value) {
    const double original = value, step = 1e-6;
    value = original + step;
    const double up = loss();
    value = original - step;
    const double down = loss();
    value = original;
    return (up - down) / (2 * step);
  };
  for (Parameter* p : experts->parameters()) {
    CAPTURE(p->name);
    const Tensor grad = s.ops->to_host(p->grad);
    for (int64_t i = 0; i < p->value.numel(); ++i)
      CHECK(grad.data<double>()[i] == doctest::Approx(numeric(p->value.data<double>()[i])).epsilon(1e-6));
  }
  const Tensor input_grad = s.ops->to_host(dx);
  for (int64_t i = 0; i < x.numel(); ++i)
    CHECK(input_grad.data<double>()[i] == doctest::Approx(numeric(x.data<double>()[i])).epsilon(1e-6));
}
)tmpl";

// ------------------------------------------------------------------------------------------------
// balancer: the importance loss (Shazeer et al., 2017).
constexpr const char* kBalancerSource =
    R"tmpl(// @NAME@: the importance loss of Shazeer et al. (2017), "Outrageously Large Neural Networks":
//   importance_i = sum_t probs[t, i]     (the router probability mass expert i receives)
//   loss = coef * CV(importance)^2 = coef * var(importance) / mean(importance)^2
// Zero when every expert receives the same mass; it grows as the router favours a few experts.
#include <moelab/plugin.hpp>
#include <vector>

namespace {

using namespace moelab;

class @CLASS@ final : public Balancer {
 public:
  static ParamSchema schema() {
    return {param_float("coef", 0.01, "loss coefficient (Shazeer et al. used 0.1)").at_least(0)};
  }

  @CLASS@(const ParamSet& params, const LayerSpec& spec, Ops&, Rng&)
      : coef_(params.get_float("coef")), experts_(spec.num_experts) {}

  double forward(const RoutingPlan& plan, const LayerLoad&, const RouterContext& ctx) override {
    const Importance s = importance(plan, ctx.ops);
    return s.mean > 0 ? coef_ * s.variance / (s.mean * s.mean) : 0.0;
  }

  void backward(const RoutingPlan& plan, const LayerLoad&, const RouterContext& ctx, double grad_loss,
                RouterGrad& grad) override {
    const Importance s = importance(plan, ctx.ops);
    if (s.mean <= 0) return;
    // d(var / mean^2) / d importance_i = 2 (importance_i - mean) / (E mean^2) - 2 var / (E mean^3),
    // and d importance_i / d probs[t, i] = 1 for every token t: one row, added to every row.
    const double e = static_cast<double>(experts_), m = s.mean;
    Tensor row = host_tensor(plan.probs.dtype(), {experts_});
    for (int64_t i = 0; i < experts_; ++i) {
      const double d_importance =
          2 * (s.values[static_cast<size_t>(i)] - m) / (e * m * m) - 2 * s.variance / (e * m * m * m);
      set_host_value(row, i, grad_loss * coef_ * d_importance);
    }
    if (!grad.probs.defined()) grad.probs = ctx.ops.zeros(plan.probs.dtype(), plan.probs.shape());
    ctx.ops.add_row_vector(ctx.ops.to_device(row), grad.probs);
  }

 private:
  struct Importance {
    std::vector<double> values;  // [E]
    double mean = 0, variance = 0;
  };
  Importance importance(const RoutingPlan& plan, Ops& ops) const {
    Tensor sums = ops.zeros(plan.probs.dtype(), {experts_});
    ops.sum_rows(plan.probs, /*accumulate=*/false, sums);  // [E] = column sums of probs [T, E]
    const Tensor host = ops.to_host(sums);
    Importance s;
    for (int64_t i = 0; i < experts_; ++i) s.values.push_back(host_value(host, i));
    for (double v : s.values) s.mean += v / static_cast<double>(experts_);
    for (double v : s.values) s.variance += (v - s.mean) * (v - s.mean) / static_cast<double>(experts_);
    return s;
  }

  double coef_;
  int64_t experts_;
};

}  // namespace

MOELAB_BALANCER_PLUGIN(@CLASS@, "@NAME@", "0.1.0",
                       "importance loss coef * CV(sum_t probs)^2 (Shazeer et al. 2017)")
)tmpl";

constexpr const char* kBalancerTest =
    R"tmpl(// @NAME@'s test: no loss for a perfectly balanced router, a positive one for a lopsided router, and a
// backward that matches finite differences in double.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cmath>
#include <moelab/registry.hpp>
#include <vector>

using namespace moelab;

namespace {

PluginRegistry plugins() {
  PluginRegistry registry = PluginRegistry::with_default_path();
  registry.scan({PLUGIN_DIR});
  for (const PluginProblem& problem : registry.problems())
    MESSAGE("plugin problem: " << problem.file.string() << ": " << problem.reason);
  return registry;
}

// A plan holding only what the balancer reads: probs [T, E], each row a softmax of `logits`.
RoutingPlan plan_with_probs(int64_t tokens, int64_t experts, const std::vector<double>& logits) {
  RoutingPlan plan;
  plan.probs = host_tensor<double>({tokens, experts});
  for (int64_t t = 0; t < tokens; ++t) {
    double sum = 0;
    for (int64_t e = 0; e < experts; ++e) sum += std::exp(logits[static_cast<size_t>(t * experts + e)]);
    for (int64_t e = 0; e < experts; ++e)
      plan.probs.data<double>()[t * experts + e] = std::exp(logits[static_cast<size_t>(t * experts + e)]) / sum;
  }
  return plan;
}

}  // namespace

TEST_CASE("@NAME@: zero when balanced, positive when not, and the gradient is right") {
  const PluginRegistry registry = plugins();
  std::shared_ptr<Ops> ops =
      registry.make_kernel("cpu", defaults_of(registry.require(PluginKind::kernel, "cpu").schema));
  LayerSpec spec;
  spec.d_model = 8;
  spec.num_experts = 4;
  spec.dtype = DType::f64;
  ParamSet params = defaults_of(registry.require(PluginKind::balancer, "@NAME@").schema);
  params.set("coef", 0.5);
  Rng rng(5);
  std::shared_ptr<Balancer> balancer = registry.make_balancer("@NAME@", params, spec, *ops, rng);
  RouterContext ctx{*ops, rng};
  const int64_t tokens = 6, experts = spec.num_experts;

  const RoutingPlan balanced = plan_with_probs(tokens, experts, std::vector<double>(tokens * experts, 0.0));
  CHECK(balancer->forward(balanced, LayerLoad{}, ctx) == doctest::Approx(0.0));

  std::vector<double> logits(static_cast<size_t>(tokens * experts));
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = rng.normal() + (i % experts == 0 ? 2.0 : 0.0);
  RoutingPlan lopsided = plan_with_probs(tokens, experts, logits);
  CHECK(balancer->forward(lopsided, LayerLoad{}, ctx) > 0.01);

  RouterGrad grad;
  balancer->backward(lopsided, LayerLoad{}, ctx, /*grad_loss=*/1.0, grad);
  REQUIRE(grad.probs.defined());
  const Tensor dprobs = ops->to_host(grad.probs);
  for (int64_t i = 0; i < lopsided.probs.numel(); ++i) {
    double& p = lopsided.probs.data<double>()[i];
    const double original = p, step = 1e-6;
    p = original + step;
    const double up = balancer->forward(lopsided, LayerLoad{}, ctx);
    p = original - step;
    const double down = balancer->forward(lopsided, LayerLoad{}, ctx);
    p = original;
    CHECK(dprobs.data<double>()[i] == doctest::Approx((up - down) / (2 * step)).epsilon(1e-6));
  }
}
)tmpl";

// ------------------------------------------------------------------------------------------------
// kernel: runs every op on another kernel and stops at the first non-finite result.
constexpr const char* kKernelSource =
    R"tmpl(// @NAME@: a kernel that runs every op on another kernel (`inner`, the cpu kernel by default) and then
// checks that what the op wrote is finite. It throws the moment a NaN or an infinity appears,
// naming the op that made it: slower, for finding where a diverging run first goes wrong.
// The inner kernel is found on the default plugin search path (moelab's own plugins, then
// MOELAB_PLUGIN_PATH).
#include <fmt/format.h>

#include <cmath>
#include <memory>
#include <moelab/plugin.hpp>
#include <moelab/registry.hpp>
#include <string>
#include <vector>

namespace {

using namespace moelab;

class @CLASS@ final : public Ops {
 public:
  static ParamSchema schema() {
    return {param_string("inner", "cpu", "the kernel that computes; every op it runs is checked")};
  }

  explicit @CLASS@(const ParamSet& params) : inner_(make_inner(params.get_string("inner"))) {}

  DeviceKind device() const override { return inner_->device(); }
  std::string name() const override { return "@NAME@"; }

  // memory (empty() is uninitialised on purpose: nothing to check)
  Tensor empty(DType dtype, const Shape& shape) override { return inner_->empty(dtype, shape); }
  Tensor zeros(DType dtype, const Shape& shape) override { return inner_->zeros(dtype, shape); }
  void fill(Tensor& dst, double value) override {
    inner_->fill(dst, value);
    checked("fill", dst);
  }
  void copy(const Tensor& src, Tensor& dst) override {
    inner_->copy(src, dst);
    checked("copy", dst);
  }
  void synchronize() override { inner_->synchronize(); }

  // dense linear algebra
  void gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta,
            Tensor& c) override {
    inner_->gemm(trans_a, trans_b, alpha, a, b, beta, c);
    checked("gemm", c);
  }
  void grouped_gemm(const Tensor& x, const Tensor& w, bool trans_w, const std::vector<int64_t>& offsets, double alpha,
                    double beta, Tensor& y) override {
    inner_->grouped_gemm(x, w, trans_w, offsets, alpha, beta, y);
    checked("grouped_gemm", y);
  }
  void grouped_gemm_weight_grad(const Tensor& x, const Tensor& dy, bool trans_w, const std::vector<int64_t>& offsets,
                                bool accumulate, Tensor& dw) override {
    inner_->grouped_gemm_weight_grad(x, dy, trans_w, offsets, accumulate, dw);
    checked("grouped_gemm_weight_grad", dw);
  }

  // elementwise and row-wise
  void activation(Activation act, const Tensor& x, Tensor& y) override {
    inner_->activation(act, x, y);
    checked("activation", y);
  }
  void activation_backward(Activation act, const Tensor& x, const Tensor& dy, bool accumulate, Tensor& dx) override {
    inner_->activation_backward(act, x, dy, accumulate, dx);
    checked("activation_backward", dx);
  }
  void glu(Activation act, const Tensor& gate_up, Tensor& h) override {
    inner_->glu(act, gate_up, h);
    checked("glu", h);
  }
  void glu_backward(Activation act, const Tensor& gate_up, const Tensor& dh, Tensor& dgate_up) override {
    inner_->glu_backward(act, gate_up, dh, dgate_up);
    checked("glu_backward", dgate_up);
  }
  void axpy(double alpha, const Tensor& z, Tensor& y) override {
    inner_->axpy(alpha, z, y);
    checked("axpy", y);
  }
  void scale(double alpha, Tensor& y) override {
    inner_->scale(alpha, y);
    checked("scale", y);
  }
  void scale_rows(const Tensor& s, Tensor& y) override {
    inner_->scale_rows(s, y);
    checked("scale_rows", y);
  }
  void add_row_vector(const Tensor& b, Tensor& y) override {
    inner_->add_row_vector(b, y);
    checked("add_row_vector", y);
  }
  void sum_rows(const Tensor& x, bool accumulate, Tensor& out) override {
    inner_->sum_rows(x, accumulate, out);
    checked("sum_rows", out);
  }
  void row_dot(const Tensor& a, const Tensor& b, Tensor& out) override {
    inner_->row_dot(a, b, out);
    checked("row_dot", out);
  }

  // probabilities
  void softmax_rows(const Tensor& x, double temperature, Tensor& y) override {
    inner_->softmax_rows(x, temperature, y);
    checked("softmax_rows", y);
  }
  void softmax_rows_backward(const Tensor& y, const Tensor& dy, double temperature, bool accumulate,
                             Tensor& dx) override {
    inner_->softmax_rows_backward(y, dy, temperature, accumulate, dx);
    checked("softmax_rows_backward", dx);
  }
  void sigmoid(const Tensor& x, Tensor& y) override {
    inner_->sigmoid(x, y);
    checked("sigmoid", y);
  }
  void sigmoid_backward(const Tensor& y, const Tensor& dy, bool accumulate, Tensor& dx) override {
    inner_->sigmoid_backward(y, dy, accumulate, dx);
    checked("sigmoid_backward", dx);
  }
  void logsumexp_rows(const Tensor& x, Tensor& out) override {
    inner_->logsumexp_rows(x, out);
    checked("logsumexp_rows", out);
  }
  void softplus(const Tensor& x, Tensor& y) override {
    inner_->softplus(x, y);
    checked("softplus", y);
  }
  void softplus_backward(const Tensor& x, const Tensor& dy, bool accumulate, Tensor& dx) override {
    inner_->softplus_backward(x, dy, accumulate, dx);
    checked("softplus_backward", dx);
  }

  // selection and movement
  void topk_rows(const Tensor& scores, int k, const Tensor* bias, Tensor& values, Tensor& indices) override {
    inner_->topk_rows(scores, k, bias, values, indices);
    checked("topk_rows", values);
  }
  void gather_rows(const Tensor& src, const Tensor& index, Tensor& dst) override {
    inner_->gather_rows(src, index, dst);
    checked("gather_rows", dst);
  }
  void scatter_add_rows(const Tensor& src, const Tensor& index, const Tensor* weight, Tensor& dst) override {
    inner_->scatter_add_rows(src, index, weight, dst);
    checked("scatter_add_rows", dst);
  }
  void gather_elements(const Tensor& x, const Tensor& row, const Tensor& col, Tensor& out) override {
    inner_->gather_elements(x, row, col, out);
    checked("gather_elements", out);
  }
  void scatter_add_elements(const Tensor& dout, const Tensor& row, const Tensor& col, Tensor& dx) override {
    inner_->scatter_add_elements(dout, row, col, dx);
    checked("scatter_add_elements", dx);
  }

  // the optional slots, so the inner kernel's fast versions run (and are checked)
  void mul(const Tensor& a, const Tensor& b, Tensor& out) override {
    inner_->mul(a, b, out);
    checked("mul", out);
  }
  void normalize_rows(const Tensor& x, Tensor& y) override {
    inner_->normalize_rows(x, y);
    checked("normalize_rows", y);
  }
  void normalize_rows_backward(const Tensor& x, const Tensor& y, const Tensor& dy, bool accumulate,
                               Tensor& dx) override {
    inner_->normalize_rows_backward(x, y, dy, accumulate, dx);
    checked("normalize_rows_backward", dx);
  }
  double sum_squares(const Tensor& x) override {
    const double sum = inner_->sum_squares(x);
    if (!std::isfinite(sum)) throw RuntimeError(fmt::format("@NAME@: sum_squares of {} is {}", x.describe(), sum));
    return sum;
  }
  void adamw_update(const AdamW& hyper, const Tensor& grad, Tensor& param, Tensor& m, Tensor& v) override {
    inner_->adamw_update(hyper, grad, param, m, v);
    checked("adamw_update", param);
    checked("adamw_update", m);
    checked("adamw_update", v);
  }
  void cast(const Tensor& src, Tensor& dst) override {
    inner_->cast(src, dst);
    checked("cast", dst);
  }
  DType set_matmul_precision(DType precision) override { return inner_->set_matmul_precision(precision); }
  DType matmul_precision() const override { return inner_->matmul_precision(); }
  std::string bf16_gemm_path() const override { return inner_->bf16_gemm_path(); }

 private:
  static std::shared_ptr<Ops> make_inner(const std::string& inner) {
    if (inner == "@NAME@")
      throw UsageError(
          "@NAME@: inner = \"@NAME@\" would make the kernel wrap itself; name another kernel, e.g. \"cpu\"");
    const PluginRegistry registry = PluginRegistry::with_default_path();
    return registry.make_kernel(inner, defaults_of(registry.require(PluginKind::kernel, inner).schema));
  }

  // Throws at the first non-finite element of a float tensor an op wrote; index tensors pass.
  void checked(const char* op, const Tensor& out) {
    if (out.dtype() != DType::f32 && out.dtype() != DType::f64 && out.dtype() != DType::bf16) return;
    const Tensor host = inner_->to_host(out);
    for (int64_t i = 0; i < host.numel(); ++i) {
      const double value = host_value(host, i);
      if (!std::isfinite(value))
        throw RuntimeError(
            fmt::format("@NAME@: {} wrote {} at element {} of its output {}", op, value, i, out.describe()));
    }
  }

  std::shared_ptr<Ops> inner_;  // holds the inner kernel's library too
};

}  // namespace

MOELAB_KERNEL_PLUGIN(@CLASS@, "@NAME@", "0.1.0",
                     "runs another kernel and stops at the first NaN or infinity an op writes")
)tmpl";

constexpr const char* kKernelTest =
    R"tmpl(// @NAME@'s test: results are the inner kernel's, bit for bit; a NaN is caught at the op that made
// it; a kernel cannot wrap itself.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <limits>
#include <moelab/registry.hpp>
#include <string>

using namespace moelab;

namespace {

PluginRegistry plugins() {
  PluginRegistry registry = PluginRegistry::with_default_path();
  registry.scan({PLUGIN_DIR});
  for (const PluginProblem& problem : registry.problems())
    MESSAGE("plugin problem: " << problem.file.string() << ": " << problem.reason);
  return registry;
}

Tensor random(Shape shape, Rng& rng) {
  Tensor t = host_tensor<double>(std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = rng.normal();
  return t;
}

}  // namespace

TEST_CASE("@NAME@ computes what the inner kernel computes and stops at a NaN") {
  const PluginRegistry registry = plugins();
  std::shared_ptr<Ops> checked =
      registry.make_kernel("@NAME@", defaults_of(registry.require(PluginKind::kernel, "@NAME@").schema));
  std::shared_ptr<Ops> cpu =
      registry.make_kernel("cpu", defaults_of(registry.require(PluginKind::kernel, "cpu").schema));
  CHECK(checked->name() == "@NAME@");
  CHECK(checked->device() == cpu->device());

  Rng rng(9);
  const Tensor a = random({3, 4}, rng), b = random({4, 2}, rng);
  Tensor via_checked = checked->zeros(DType::f64, {3, 2}), via_cpu = cpu->zeros(DType::f64, {3, 2});
  checked->gemm(false, false, 1.0, checked->to_device(a), checked->to_device(b), 0.0, via_checked);
  cpu->gemm(false, false, 1.0, cpu->to_device(a), cpu->to_device(b), 0.0, via_cpu);
  const Tensor got = checked->to_host(via_checked), want = cpu->to_host(via_cpu);
  for (int64_t i = 0; i < got.numel(); ++i) CHECK(got.data<double>()[i] == want.data<double>()[i]);

  Tensor x = random({2, 3}, rng);
  x.data<double>()[4] = std::numeric_limits<double>::quiet_NaN();
  Tensor y = checked->zeros(DType::f64, {2, 3});
  try {
    checked->softmax_rows(x, 1.0, y);
    FAIL("a NaN went through unnoticed");
  } catch (const RuntimeError& e) {
    CHECK(std::string(e.what()).find("@NAME@: softmax_rows wrote nan") != std::string::npos);
  }
}

TEST_CASE("@NAME@ refuses to wrap itself") {
  const PluginRegistry registry = plugins();
  ParamSet params = defaults_of(registry.require(PluginKind::kernel, "@NAME@").schema);
  params.set("inner", std::string("@NAME@"));
  CHECK_THROWS_AS(registry.make_kernel("@NAME@", params), UsageError);
}
)tmpl";

// ------------------------------------------------------------------------------------------------
// What every kind shares.
constexpr const char* kCMakeLists = R"tmpl(# @NAME@: an out-of-tree moelab @KIND@ plugin.
#   cmake -S . -B build -DCMAKE_PREFIX_PATH=<where moelab is installed>
#   cmake --build build && ctest --test-dir build --output-on-failure
cmake_minimum_required(VERSION 3.25)
project(@NAME@ LANGUAGES CXX)

# moelab::moelab (the public headers and libmoelab) and moelab_add_plugin().
find_package(moelab REQUIRED)

# Builds libmoelab_@KIND@_@NAME@.so in this build folder.
moelab_add_plugin(@NAME@ @KIND@ SOURCES @NAME@.cpp)

include(CTest)
if(BUILD_TESTING)
  find_package(doctest REQUIRED)
  add_executable(test_@NAME@ test_@NAME@.cpp)
  target_link_libraries(test_@NAME@ PRIVATE moelab::moelab doctest::doctest)
  # The test loads the plugin from where it was built, and the cpu kernel from moelab's own folder.
  target_compile_definitions(test_@NAME@ PRIVATE PLUGIN_DIR="$<TARGET_FILE_DIR:moelab_@KIND@_@NAME@>")
  add_dependencies(test_@NAME@ moelab_@KIND@_@NAME@)
  moelab_warnings(test_@NAME@)
  add_test(NAME test_@NAME@ COMMAND test_@NAME@)
  # moelab's conformance kit on the plugin: every check the in-tree plugins pass (moelab test-plugin).
  moelab_add_conformance_test(@NAME@ @KIND@)
endif()
)tmpl";

constexpr const char* kReadme = R"tmpl(# @NAME@

A moelab @KIND@ plugin (@SUMMARY@), scaffolded by `moelab new @KIND@ @NAME@`.

| file | what it is |
|---|---|
| `@NAME@.cpp` | the plugin: its parameter schema, forward and backward, and the registration line |
| `test_@NAME@.cpp` | its test (doctest), loading the plugin the way moelab does |
| `CMakeLists.txt` | builds both against an installed moelab |

## Build and test

    cmake -S . -B build -DCMAKE_PREFIX_PATH=/path/to/moelab/prefix
    cmake --build build
    ctest --test-dir build --output-on-failure

`/path/to/moelab/prefix` is where moelab was installed (`cmake --install <moelab build> --prefix ...`).
The build makes `build/libmoelab_@KIND@_@NAME@.so`.

## Use it

moelab looks for plugins in its own plugin folder, then in each folder of `MOELAB_PLUGIN_PATH`
(':'-separated), then in a recipe's `[plugins] paths`. Check that it is found and see its
parameters:

    MOELAB_PLUGIN_PATH=$PWD/build moelab plugins --describe @NAME@

and name it in a recipe (paths are relative to the recipe file):

    [plugins]
    paths = ["path/to/@NAME@/build"]

@RECIPE@
## Change it

- Parameters live in `schema()`. moelab validates a recipe's table against it (types, ranges,
  choices, unknown keys with a "did you mean") before the constructor runs, and
  `moelab plugins --describe @NAME@` shows it.
- Every forward has a backward; the test checks it against finite differences in double. Keep it
  passing when you change the maths.
- `ctest` also runs moelab's conformance kit on the plugin (`conformance_@NAME@`, which is
  `moelab test-plugin @NAME@ --kind @KIND@ --path build`): the checks every in-tree plugin passes
  (gradients under each capacity policy, for settings drawn from your schema; the routing plan's
  contract; determinism; for a kernel, every Ops slot against the cpu kernel). Run it by hand with
  `--set key=value` to fix a parameter and `--settings N` for more drawn settings.
- The plugin is built for moelab's plugin ABI (`moelab version` prints it). When moelab's ABI major
  changes, moelab refuses this library and says so: rebuild it against the new SDK.
)tmpl";

struct KindTemplate {
  const char* kind;
  const char* class_suffix;  // the plugin class is CamelCase(NAME) + this, unless it ends with it
  const char* source;
  const char* test;
  const char* summary;
  const char* recipe;  // the README's recipe snippet
};

const KindTemplate kKinds[] = {
    {"router", "Router", kRouterSource, kRouterTest, "a linear gate, a softmax and top-k",
     "    [moe.router]\n    type = \"@NAME@\"\n    top_k = 2\n    renormalize = true\n"},
    {"experts", "Experts", kExpertsSource, kExpertsTest, "experts as two-layer MLPs",
     "    [moe.experts]\n    type = \"@NAME@\"\n    d_ff = 128\n    activation = \"gelu\"\n"},
    {"balancer", "Balancer", kBalancerSource, kBalancerTest, "the importance loss of Shazeer et al. 2017",
     "    [[moe.balancers]]\n    type = \"@NAME@\"\n    coef = 0.01\n"},
    {"kernel", "Kernel", kKernelSource, kKernelTest, "a kernel that checks every op's output for NaN and infinity",
     "    [kernel]\n    type = \"@NAME@\"\n    inner = \"cpu\"\n"},
};

std::string fill(std::string text, const std::map<std::string, std::string>& values) {
  for (const auto& [key, value] : values) {
    const std::string marker = "@" + key + "@";
    for (size_t at = text.find(marker); at != std::string::npos; at = text.find(marker, at + value.size()))
      text.replace(at, marker.size(), value);
  }
  return text;
}

bool is_c_identifier(const std::string& name) {
  if (name.empty() || !(std::isalpha(static_cast<unsigned char>(name[0])) || name[0] == '_')) return false;
  for (char c : name)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
  return true;
}

// my_router -> MyRouter; noisy -> NoisyRouter (router kind). The suffix keeps the class from being
// any of moelab's own names and says what it is.
std::string class_name(const std::string& name, const std::string& suffix) {
  std::string out;
  bool upper = true;
  for (char c : name) {
    if (c == '_') {
      upper = true;
      continue;
    }
    out += upper ? static_cast<char>(std::toupper(static_cast<unsigned char>(c))) : c;
    upper = false;
  }
  if (out.empty() || std::isdigit(static_cast<unsigned char>(out[0]))) out = "Plugin" + out;
  const bool has_suffix =
      out.size() > suffix.size() && out.compare(out.size() - suffix.size(), suffix.size(), suffix) == 0;
  return has_suffix ? out : out + suffix;
}

void write_file(const fs::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::binary);
  out << text;
  out.close();
  if (!out) throw RuntimeError(fmt::format("cannot write {}", file.string()));
}

// What to pass to cmake so find_package(moelab) finds this installation, when it is one.
std::string cmake_package_hint() {
  const auto search = PluginRegistry::default_search_path();
  if (!search.empty()) {
    // <libdir>/moelab/plugins -> <libdir>/cmake/moelab
    const fs::path config_dir = search[0].parent_path().parent_path() / "cmake" / "moelab";
    std::error_code ec;
    if (fs::exists(config_dir / "moelabConfig.cmake", ec)) return fmt::format("-Dmoelab_DIR={}", config_dir.string());
  }
  return "-DCMAKE_PREFIX_PATH=<where moelab is installed: cmake --install <build> --prefix <prefix>>";
}

}  // namespace

int cmd_new(const Args& args) {
  const ArgSpec spec{
      .usage = "moelab new KIND NAME [DIR]",
      .description =
          "Scaffolds an out-of-tree plugin project in DIR (default: ./NAME): a small but working plugin of\n"
          "that KIND (router, experts, balancer or kernel) written against moelab's public headers, a\n"
          "CMakeLists.txt using find_package(moelab), a doctest test with a finite-difference gradient\n"
          "check, and a README saying how to build and use it. NAME must be a C identifier; it is the\n"
          "name recipes use. DIR must not exist, or be empty: nothing is ever overwritten.",
      .options = {},
      .flags = {},
      .min_positional = 2,
      .max_positional = 3,
  };
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  const std::string& kind = parsed.positional[0];
  const std::string& name = parsed.positional[1];

  const KindTemplate* chosen = nullptr;
  for (const KindTemplate& k : kKinds)
    if (kind == k.kind) chosen = &k;
  if (!chosen) {
    std::string message =
        fmt::format("unknown plugin kind '{}'; KIND is one of: router, experts, balancer, kernel", kind);
    if (std::string near = nearest_name(kind, {"router", "experts", "balancer", "kernel"}); !near.empty())
      message += fmt::format("; did you mean '{}'?", near);
    throw UsageError(message);
  }
  if (!is_c_identifier(name)) {
    std::string suggestion;
    for (char c : name) suggestion += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
    if (suggestion.empty() || std::isdigit(static_cast<unsigned char>(suggestion[0]))) suggestion = "my_" + suggestion;
    throw UsageError(
        fmt::format("plugin name '{}' is not a C identifier (letters, digits and '_', not starting "
                    "with a digit); it becomes a file name, a CMake target and the recipe's type = "
                    "\"...\"; did you mean '{}'?",
                    name, suggestion));
  }

  const fs::path dir = parsed.positional.size() > 2 ? fs::path(parsed.positional[2]) : fs::path(name);
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    if (!fs::is_directory(dir, ec))
      throw UsageError(fmt::format(
          "{} already exists and is not a folder; moelab new writes into a new or empty folder", dir.string()));
    if (!fs::is_empty(dir, ec))
      throw UsageError(
          fmt::format("{} already exists and is not empty; moelab new never overwrites: choose another "
                      "DIR or remove that folder",
                      dir.string()));
  }

  const std::map<std::string, std::string> values{
      {"NAME", name},
      {"CLASS", class_name(name, chosen->class_suffix)},
      {"KIND", chosen->kind},
      {"SUMMARY", chosen->summary},
      {"RECIPE", fill(chosen->recipe, {{"NAME", name}})},
  };
  const std::vector<std::pair<std::string, std::string>> files{
      {name + ".cpp", fill(chosen->source, values)},
      {"test_" + name + ".cpp", fill(chosen->test, values)},
      {"CMakeLists.txt", fill(kCMakeLists, values)},
      {"README.md", fill(kReadme, values)},
  };

  // Written into a staging folder beside DIR, then renamed into place in one step, so a failure
  // halfway leaves nothing behind.
  const fs::path target = fs::absolute(dir, ec).lexically_normal();
  const fs::path parent = target.parent_path();
  fs::create_directories(parent, ec);
  if (ec) throw RuntimeError(fmt::format("cannot create {}: {}", parent.string(), ec.message()));
  const fs::path staging = parent / fmt::format(".{}.moelab-new-{}", target.filename().string(), ::getpid());
  try {
    fs::create_directory(staging);
    for (const auto& [file, text] : files) write_file(staging / file, text);
    fs::rename(staging, target);  // replaces an empty DIR, atomically
  } catch (const std::exception& e) {
    std::error_code cleanup;
    fs::remove_all(staging, cleanup);
    throw RuntimeError(fmt::format("cannot create {}: {}", dir.string(), e.what()));
  }

  std::printf("created %s plugin '%s' in %s:\n", chosen->kind, name.c_str(), dir.string().c_str());
  for (const auto& [file, text] : files) std::printf("  %s\n", (dir / file).string().c_str());
  std::printf(
      "\nbuild and test it:\n  cmake -S %s -B %s %s\n  cmake --build %s\n  ctest --test-dir %s --output-on-failure\n",
      dir.string().c_str(), (dir / "build").string().c_str(), cmake_package_hint().c_str(),
      (dir / "build").string().c_str(), (dir / "build").string().c_str());
  std::printf("then: MOELAB_PLUGIN_PATH=%s moelab plugins --describe %s\n",
              fs::absolute(dir / "build", ec).string().c_str(), name.c_str());
  return kExitOk;
}

}  // namespace moelab::cli

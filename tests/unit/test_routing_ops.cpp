// The routing-maths slots of Ops (ABI 4.0: exp, log, divide, scale_columns, row_sums, max_rows,
// threshold_rows) against their formulas, each backward against central differences in double;
// the Sinkhorn router built on them; and plugin metrics reaching metrics.jsonl.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "cli_support.hpp"
#include "moelab/moe_layer.hpp"
#include "test_files.hpp"
#include "test_support.hpp"

using namespace moelab;
using namespace moelab::test;

namespace {

Tensor positive(const Shape& shape, Rng& rng) {
  return random_uniform(DType::f64, shape, rng, 0.5, 2.0);
}

// max |backward - central differences| (relative, floor 1) for y = f(x), dL/dx with L = <dy, y>.
double gradient_error(const std::function<Tensor(const Tensor&)>& forward, const Tensor& x, const Tensor& dy,
                      const Tensor& analytic) {
  return max_rel_error(analytic, numeric_gradient(forward, x, dy));
}

}  // namespace

TEST_CASE("exp, log, divide: values and backward, overwrite and accumulate") {
  Ops& ops = cpu_kernel();
  Rng rng(21);
  const Tensor x = random_normal(DType::f64, {5, 4}, rng), p = positive({5, 4}, rng),
               dy = random_normal(DType::f64, {5, 4}, rng);
  Tensor y = host_tensor(DType::f64, x.shape());
  ops.exp(x, y);
  for (int64_t i = 0; i < x.numel(); ++i)
    CHECK(host_value(y, i) == doctest::Approx(std::exp(host_value(x, i))).epsilon(1e-15));
  ops.log(p, y);
  for (int64_t i = 0; i < p.numel(); ++i)
    CHECK(host_value(y, i) == doctest::Approx(std::log(host_value(p, i))).epsilon(1e-15));

  const auto exp_of = [&](const Tensor& in) {
    Tensor out = host_tensor(DType::f64, in.shape());
    ops.exp(in, out);
    return out;
  };
  const auto log_of = [&](const Tensor& in) {
    Tensor out = host_tensor(DType::f64, in.shape());
    ops.log(in, out);
    return out;
  };
  Tensor dx = host_tensor(DType::f64, x.shape());
  ops.exp_backward(exp_of(x), dy, false, dx);
  CHECK(gradient_error(exp_of, x, dy, dx) < 1e-8);
  ops.log_backward(p, dy, false, dx);
  CHECK(gradient_error(log_of, p, dy, dx) < 1e-8);
  // accumulate adds to what is there
  Tensor twice = clone(dx);
  ops.log_backward(p, dy, true, twice);
  for (int64_t i = 0; i < dx.numel(); ++i) CHECK(host_value(twice, i) == doctest::Approx(2 * host_value(dx, i)));

  const Tensor a = random_normal(DType::f64, {5, 4}, rng);
  Tensor da = host_tensor(DType::f64, a.shape()), db = host_tensor(DType::f64, a.shape());
  ops.divide_backward(a, p, dy, false, &da, &db);
  const auto divide_by_p = [&](const Tensor& in) {
    Tensor out = host_tensor(DType::f64, in.shape());
    ops.divide(in, p, out);
    return out;
  };
  const auto a_divided_by = [&](const Tensor& in) {
    Tensor out = host_tensor(DType::f64, in.shape());
    ops.divide(a, in, out);
    return out;
  };
  CHECK(gradient_error(divide_by_p, a, dy, da) < 1e-8);
  CHECK(gradient_error(a_divided_by, p, dy, db) < 1e-8);
  ops.divide_backward(a, p, dy, false, nullptr, &db);  // either gradient may be skipped
  CHECK(gradient_error(a_divided_by, p, dy, db) < 1e-8);
}

TEST_CASE("scale_columns and its backward; row_sums; max_rows; threshold_rows") {
  Ops& ops = cpu_kernel();
  Rng rng(22);
  const Tensor x = random_normal(DType::f64, {6, 3}, rng), s = random_normal(DType::f64, {3}, rng);
  const Tensor dy = random_normal(DType::f64, {6, 3}, rng);
  Tensor y = clone(x);
  ops.scale_columns(s, y);
  for (int64_t r = 0; r < 6; ++r)
    for (int64_t c = 0; c < 3; ++c) CHECK(host_value(y, r * 3 + c) == host_value(x, r * 3 + c) * host_value(s, c));
  Tensor dx = host_tensor(DType::f64, x.shape()), ds = host_tensor(DType::f64, {3});
  ops.scale_columns_backward(x, s, dy, false, dx, ds);
  const auto scaled_x = [&](const Tensor& in) {
    Tensor out = clone(in);
    ops.scale_columns(s, out);
    return out;
  };
  const auto scaled_by = [&](const Tensor& in) {
    Tensor out = clone(x);
    ops.scale_columns(in, out);
    return out;
  };
  CHECK(gradient_error(scaled_x, x, dy, dx) < 1e-8);
  CHECK(gradient_error(scaled_by, s, dy, ds) < 1e-8);

  Tensor sums = host_tensor(DType::f64, {6});
  ops.row_sums(x, false, sums);
  for (int64_t r = 0; r < 6; ++r)
    CHECK(host_value(sums, r) ==
          doctest::Approx(host_value(x, r * 3) + host_value(x, r * 3 + 1) + host_value(x, r * 3 + 2)));

  // max_rows: the largest entry and its column, the lower column on a tie.
  const Tensor m = tensor_of(DType::f64, {3, 4}, {1, 5, 5, 2, -3, -1, -2, -7, 0, 0, 0, 0});
  Tensor values = host_tensor(DType::f64, {3}), indices = host_tensor(DType::i32, {3});
  ops.max_rows(m, values, indices);
  CHECK(values_of(values) == std::vector<double>{5, -1, 0});
  CHECK(std::vector<int32_t>(indices.data<int32_t>(), indices.data<int32_t>() + 3) == std::vector<int32_t>{1, 1, 0});

  const Tensor threshold = tensor_of(DType::f64, {3}, {2, -2, 0});
  Tensor mask = host_tensor(DType::f64, {3, 4});
  ops.threshold_rows(m, threshold, mask);
  CHECK(values_of(mask) == std::vector<double>{0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1});

  // Shapes are checked, naming the op.
  Tensor wrong = host_tensor(DType::f64, {4});
  CHECK_THROWS_WITH_AS(ops.row_sums(x, false, wrong), doctest::Contains("row_sums: expected out f64[6]"), RuntimeError);
}

TEST_CASE("sinkhorn: training selection balances the experts that softmax top-k overloads; metrics report it") {
  const PluginRegistry& plugins = registry();
  Ops& ops = cpu_kernel();
  const LayerSpec spec = layer_spec(4, 1, 6);
  const int64_t tokens = 64;
  const auto make = [&](const std::string& name, const Overrides& overrides) {
    Rng init(3);  // both routers draw their gate W [4, 6] first from this stream: the same gate
    return plugins.make_router(name, plugin_params(PluginKind::router, name, overrides), spec, ops, init);
  };
  const auto sinkhorn = make("sinkhorn", {{"init_std", 1.0}, {"iterations", int64_t{50}}});
  const auto softmax = make("softmax_topk", {{"init_std", 1.0}});
  // Every token leans towards expert 0: x = 2 W[0, :] + small noise.
  const Tensor& w = sinkhorn->parameters().front()->value;
  Rng rng(5);
  Tensor x = random_normal(DType::f64, {tokens, 6}, rng, 0.3);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < 6; ++i) set_host_value(x, t * 6 + i, host_value(x, t * 6 + i) + 2 * host_value(w, i));
  const auto max_load = [&](Router& router, bool training) {
    Rng noise(1);
    const RouterContext ctx{ops, noise, training, 0, 1, tokens, nullptr, nullptr, 1.0};
    const RoutingPlan plan = router.forward(x, ctx);
    std::vector<int64_t> load(4, 0);
    for (int64_t a = 0; a < plan.expert.numel(); ++a) ++load[static_cast<size_t>(plan.expert.data<int32_t>()[a])];
    return *std::max_element(load.begin(), load.end());
  };
  const int64_t softmax_max = max_load(*softmax, true);
  const int64_t sinkhorn_max = max_load(*sinkhorn, true);
  std::map<std::string, double> figures;
  for (const auto& [name, value] : sinkhorn->metrics()) figures[name] = value;
  const int64_t eval_max = max_load(*sinkhorn, false);
  CAPTURE(sinkhorn_max);
  CAPTURE(softmax_max);
  CHECK(softmax_max > 40);         // most tokens pick expert 0
  CHECK(sinkhorn_max <= 20);       // balanced: near T / E = 16
  CHECK(eval_max == softmax_max);  // evaluation routes by probs alone, as softmax top-k does
  CHECK(figures.at("iterations") >= 1);
  CHECK(figures.at("residual") < 1e-3);  // stopped at the tolerance, within 50 passes
}

TEST_CASE("plugin metrics reach metrics.jsonl under router.<name>. and balancers.<name>.") {
  ScratchFolder dir("plugin_metrics");
  const std::filesystem::path recipe = dir / "r.toml";
  write_bytes(recipe, "name = \"m\"\nextends = \"" MOELAB_SOURCE_DIR
                      "/recipes/default.toml\"\n"
                      "[model]\nd_model = 16\nvocab_size = 16\n[moe.experts]\nd_ff = 16\n"
                      "[moe.router]\ntype = \"sinkhorn\"\n[[moe.balancers]]\ntype = \"aux_free_bias\"\n"
                      "[train]\nsteps = 4\nbatch_size = 2\nseq_len = 8\nlog_every = 2\neval_every = 0\n"
                      "eval_batches = 1\n");
  const CommandResult r = run_moelab("run " + quoted(recipe) + " --out " + quoted(dir / "runs"));
  CAPTURE(r.output);
  REQUIRE(r.status == 0);
  std::ifstream in(dir / "runs" / "m" / "metrics.jsonl");
  std::stringstream text;
  text << in.rdbuf();
  CHECK(contains(text.str(), "\"plugin_metrics\":{"));
  CHECK(contains(text.str(), "\"router.sinkhorn.iterations\":"));
  CHECK(contains(text.str(), "\"router.sinkhorn.residual\":"));
  CHECK(contains(text.str(), "\"balancers.aux_free_bias.bias_abs_max\":"));
}

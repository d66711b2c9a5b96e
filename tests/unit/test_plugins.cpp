// The plugin loader: the build's own plugins, the search path, and every way a file can fail to be
// a usable plugin (the fixtures in tests/fixtures), each with the message a user would read.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "moelab/registry.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
using namespace moelab;
using moelab::test::contains;

namespace {

const fs::path kBuildPluginDir = fs::path(MOELAB_BINARY_DIR) / "lib" / "moelab" / "plugins";

fs::path canonical_path(const fs::path& p) {
  return fs::weakly_canonical(fs::absolute(p));
}

std::string problems_text(const PluginRegistry& registry) {
  std::string out;
  for (const PluginProblem& p : registry.problems()) out += p.file.string() + ": " + p.reason + "\n";
  return out;
}

// The problem recorded for the file whose name is `filename`, if any.
std::optional<PluginProblem> problem_for(const PluginRegistry& registry, const std::string& filename) {
  for (const PluginProblem& p : registry.problems())
    if (p.file.filename() == filename) return p;
  return std::nullopt;
}

// Sets MOELAB_PLUGIN_PATH for one scope and restores what was there.
class PluginPathOverride {
 public:
  explicit PluginPathOverride(const std::string& value) {
    if (const char* old = std::getenv("MOELAB_PLUGIN_PATH")) saved_ = old;
    ::setenv("MOELAB_PLUGIN_PATH", value.c_str(), 1);
  }
  ~PluginPathOverride() {
    if (saved_)
      ::setenv("MOELAB_PLUGIN_PATH", saved_->c_str(), 1);
    else
      ::unsetenv("MOELAB_PLUGIN_PATH");
  }
  PluginPathOverride(const PluginPathOverride&) = delete;
  PluginPathOverride& operator=(const PluginPathOverride&) = delete;

 private:
  std::optional<std::string> saved_;
};

}  // namespace

TEST_CASE("the build's plugin folder has a working plugin of every kind") {
  PluginRegistry registry;
  registry.scan({kBuildPluginDir});
  INFO("problems:\n" << problems_text(registry));
  CHECK(registry.problems().empty());

  for (PluginKind kind : {PluginKind::router, PluginKind::experts, PluginKind::balancer, PluginKind::kernel}) {
    CAPTURE(plugin_kind_name(kind));
    CHECK_FALSE(registry.list(kind).empty());
  }
  CHECK(registry.find(PluginKind::kernel, "cpu") != nullptr);
  CHECK(registry.find(PluginKind::router, "softmax_topk") != nullptr);
  CHECK(registry.find(PluginKind::experts, "glu") != nullptr);
  CHECK(registry.find(PluginKind::balancer, "switch_aux") != nullptr);

  for (const PluginInfo* p : registry.all()) {
    CAPTURE(p->name);
    CHECK(p->abi_major == kAbiMajor);
    CHECK(p->abi_minor <= kAbiMinor);
    CHECK(p->file.parent_path() == canonical_path(kBuildPluginDir));
    CHECK_FALSE(p->version.empty());
    CHECK_FALSE(p->description.empty());
    CHECK(p->manifest != nullptr);
    CHECK(p->library != nullptr);
    // Every default a plugin declares must pass its own schema's checks.
    for (const ParamSpec& spec : p->schema) {
      CAPTURE(spec.name);
      CHECK_FALSE(spec.doc.empty());
      if (spec.default_value) CHECK(check_param_value(spec, *spec.default_value) == "");
    }
  }

  // all() is sorted by kind, then name.
  const auto all = registry.all();
  for (size_t i = 1; i < all.size(); ++i) {
    const auto a = static_cast<uint32_t>(all[i - 1]->kind), b = static_cast<uint32_t>(all[i]->kind);
    CHECK((a < b || (a == b && all[i - 1]->name < all[i]->name)));
  }
}

TEST_CASE("the default search path: libmoelab's own folder, then MOELAB_PLUGIN_PATH in order") {
  {
    PluginPathOverride env("");
    const auto path = PluginRegistry::default_search_path();
    REQUIRE(path.size() == 1);
    CHECK(canonical_path(path[0]) == canonical_path(kBuildPluginDir));
  }
  {
    // Empty entries are ignored; the order is kept.
    PluginPathOverride env(":/first/folder::/second/folder:");
    const auto path = PluginRegistry::default_search_path();
    REQUIRE(path.size() == 3);
    CHECK(canonical_path(path[0]) == canonical_path(kBuildPluginDir));
    CHECK(path[1] == fs::path("/first/folder"));
    CHECK(path[2] == fs::path("/second/folder"));
  }
  {
    PluginPathOverride env(std::string(MOELAB_FIXTURE_GOOD_DIR));
    const PluginRegistry registry = PluginRegistry::with_default_path();
    INFO("problems:\n" << problems_text(registry));
    CHECK(registry.problems().empty());
    REQUIRE(registry.searched().size() == 2);
    CHECK(registry.searched()[0] == canonical_path(kBuildPluginDir));
    CHECK(registry.searched()[1] == canonical_path(MOELAB_FIXTURE_GOOD_DIR));
    CHECK(registry.find(PluginKind::router, "fixture_top1") != nullptr);
    CHECK(registry.find(PluginKind::kernel, "cpu") != nullptr);
  }
  {
    // A folder named twice is searched once; a folder that does not exist is reported.
    PluginPathOverride env(std::string(MOELAB_FIXTURE_GOOD_DIR) + ":" + MOELAB_FIXTURE_GOOD_DIR +
                           ":/no/such/moelab/folder");
    const PluginRegistry registry = PluginRegistry::with_default_path();
    CHECK(registry.searched().size() == 3);
    REQUIRE(registry.problems().size() == 1);
    CHECK(registry.problems()[0].file == fs::path("/no/such/moelab/folder"));
    CHECK(registry.problems()[0].reason == "plugin folder does not exist");
  }
}

TEST_CASE("a plugin built for another ABI is refused before anything in it runs") {
  PluginRegistry registry;
  registry.scan({MOELAB_FIXTURE_ABI_DIR});
  CHECK(registry.all().empty());
  REQUIRE(registry.problems().size() == 2);

  const auto major = problem_for(registry, "libmoelab_router_abi_major99.so");
  REQUIRE(major);
  const std::string file = (canonical_path(MOELAB_FIXTURE_ABI_DIR) / "libmoelab_router_abi_major99.so").string();
  // The fixture's schema() throws, so this message proves the check ran before it.
  CHECK(major->reason == file + " was built for plugin ABI 99.0; this moelab speaks ABI " + std::to_string(kAbiMajor) +
                             "." + std::to_string(kAbiMinor) + ": rebuild it against this SDK");
  CHECK_FALSE(major->duplicate);

  const auto minor = problem_for(registry, "libmoelab_router_abi_newer_minor.so");
  REQUIRE(minor);
  const std::string newer = std::to_string(kAbiMajor) + "." + std::to_string(kAbiMinor + 1);
  const std::string ours = std::to_string(kAbiMajor) + "." + std::to_string(kAbiMinor);
  CHECK(contains(minor->reason, "libmoelab_router_abi_newer_minor.so"));
  CHECK(contains(minor->reason, "plugin ABI " + newer + ", newer than this moelab's ABI " + ours));
}

TEST_CASE("two plugins of one kind and name: the first stays, the error names both files") {
  const std::string good = (canonical_path(MOELAB_FIXTURE_GOOD_DIR) / "libmoelab_router_fixture_top1.so").string();
  const std::string again =
      (canonical_path(MOELAB_FIXTURE_DUPLICATE_DIR) / "libmoelab_router_fixture_top1_again.so").string();

  PluginRegistry registry;
  registry.scan({MOELAB_FIXTURE_GOOD_DIR, MOELAB_FIXTURE_DUPLICATE_DIR});
  REQUIRE(registry.problems().size() == 1);
  const PluginProblem& problem = registry.problems()[0];
  CHECK(problem.duplicate);
  CHECK(problem.file.string() == again);
  CHECK(problem.reason == "duplicate router 'fixture_top1': defined by both " + good + " and " + again +
                              "; keeping the first (found first in the search path), ignoring the second");
  REQUIRE(registry.find(PluginKind::router, "fixture_top1") != nullptr);
  CHECK(registry.find(PluginKind::router, "fixture_top1")->file.string() == good);

  // The search order decides which one stays.
  PluginRegistry reversed;
  reversed.scan({MOELAB_FIXTURE_DUPLICATE_DIR, MOELAB_FIXTURE_GOOD_DIR});
  REQUIRE(reversed.problems().size() == 1);
  CHECK(reversed.problems()[0].file.string() == good);
  CHECK(reversed.find(PluginKind::router, "fixture_top1")->file.string() == again);

  // The same file reached twice is one plugin, not a duplicate.
  PluginRegistry twice;
  CHECK(twice.load_file(good));
  CHECK(twice.load_file(fs::path(MOELAB_FIXTURE_GOOD_DIR) / ".." / "good" / "libmoelab_router_fixture_top1.so"));
  CHECK(twice.problems().empty());
  CHECK(twice.all().size() == 1);
}

TEST_CASE("broken files are reported with the reason, and the plugins beside them still load") {
  PluginRegistry registry;
  registry.scan({MOELAB_FIXTURE_BROKEN_DIR});
  INFO("problems:\n" << problems_text(registry));
  CHECK(registry.problems().size() == 3);

  const auto corrupt = problem_for(registry, "libmoelab_router_corrupt.so");
  REQUIRE(corrupt);
  CHECK(contains(corrupt->reason, "not a shared library"));
  CHECK(contains(corrupt->reason, "ELF header"));

  const auto no_entry = problem_for(registry, "libmoelab_router_no_entry.so");
  REQUIRE(no_entry);
  CHECK(contains(no_entry->reason, "exports no 'moelab_plugin' entry point"));

  // The dynamic loader's own words, naming the library it could not find.
  const auto missing = problem_for(registry, "libmoelab_router_missing_dep.so");
  REQUIRE(missing);
  CHECK(contains(missing->reason, "cannot be loaded"));
  CHECK(contains(missing->reason, "libmoelab_fixture_dependency.so"));
  // Only the loader's reason: none of Boost.DLL's wrapping around it.
  CHECK(missing->reason.rfind("cannot be loaded: libmoelab_fixture_dependency.so", 0) == 0);
  CHECK_FALSE(contains(missing->reason, "dlerror system message"));
  CHECK_FALSE(contains(missing->reason, "generic:"));

  for (const PluginProblem& p : registry.problems()) CHECK_FALSE(p.duplicate);
  CHECK(registry.find(PluginKind::router, "survivor") != nullptr);
  CHECK(registry.all().size() == 1);

  // load_file on its own says no, and records why.
  PluginRegistry single;
  CHECK_FALSE(single.load_file(fs::path(MOELAB_FIXTURE_BROKEN_DIR) / "libmoelab_router_corrupt.so"));
  CHECK(single.problems().size() == 1);
  CHECK_FALSE(single.load_file(fs::path(MOELAB_FIXTURE_BROKEN_DIR) / "no_such_plugin.so"));
  CHECK(contains(single.problems().back().reason, "cannot read the file"));
}

TEST_CASE("an unknown name is a usage error listing the known names, with a suggestion") {
  PluginRegistry registry;
  registry.scan({MOELAB_FIXTURE_GOOD_DIR, MOELAB_FIXTURE_BROKEN_DIR});
  try {
    registry.require(PluginKind::router, "fixture_topp1");
    FAIL("require() accepted an unknown name");
  } catch (const UsageError& e) {
    CHECK(std::string(e.what()) ==
          "unknown router 'fixture_topp1'; known routers: fixture_top1, survivor; did you mean 'fixture_top1'?");
  }
  try {
    registry.require(PluginKind::balancer, "fixture_top1");
    FAIL("require() accepted a router as a balancer");
  } catch (const UsageError& e) {
    CHECK(contains(e.what(), "unknown balancer 'fixture_top1'; no balancers were found (searched: "));
    CHECK(contains(e.what(), "('fixture_top1' is a router plugin)"));
  }
  CHECK(registry.find_any("survivor") == registry.find(PluginKind::router, "survivor"));
  CHECK(registry.find_any("nothing") == nullptr);
  CHECK(registry.names(PluginKind::router) == std::vector<std::string>{"fixture_top1", "survivor"});
}

namespace {

// The fixture router's loss for finite differences: L = sum_a c[a] weight[a] + <r, probs> + <q, logits>.
struct FixtureLoss {
  std::vector<double> c, r, q;
  double operator()(const RoutingPlan& plan) const {
    double loss = 0;
    for (size_t a = 0; a < c.size(); ++a) loss += c[a] * plan.weight.data<double>()[a];
    for (size_t i = 0; i < r.size(); ++i)
      loss += r[i] * plan.probs.data<double>()[i] + q[i] * plan.logits.data<double>()[i];
    return loss;
  }
};

}  // namespace

TEST_CASE("a fixture router made through the registry routes and differentiates correctly") {
  PluginRegistry registry;
  registry.scan({kBuildPluginDir, MOELAB_FIXTURE_GOOD_DIR});
  REQUIRE(registry.find(PluginKind::kernel, "cpu") != nullptr);
  const PluginInfo& kernel_info = registry.require(PluginKind::kernel, "cpu");
  std::shared_ptr<Ops> ops = registry.make_kernel("cpu", defaults_of(kernel_info.schema));

  const PluginInfo& info = registry.require(PluginKind::router, "fixture_top1");
  const long library_holders = info.library.use_count();
  LayerSpec spec;
  spec.d_model = 4;
  spec.num_experts = 3;
  spec.top_k = 1;
  spec.dtype = DType::f64;
  ParamSet params = defaults_of(info.schema);
  params.set("init_std", 0.5);
  Rng rng(7);
  std::shared_ptr<Router> router = registry.make_router("fixture_top1", params, spec, *ops, rng);
  // The object holds its library.
  CHECK(info.library.use_count() == library_holders + 1);

  const int64_t tokens = 5;
  Tensor x = host_tensor<double>({tokens, spec.d_model});
  Rng data_rng(11);
  for (int64_t i = 0; i < x.numel(); ++i) x.data<double>()[i] = data_rng.normal();
  RouterContext ctx{*ops, rng};
  ctx.seq_len = tokens;

  RoutingPlan plan = router->forward(x, ctx);
  REQUIRE(plan.top_k == 1);
  REQUIRE(plan.expert.numel() == tokens);
  for (int64_t t = 0; t < tokens; ++t) {
    const double* probs = plan.probs.data<double>() + t * spec.num_experts;
    int best = 0;
    for (int e = 1; e < spec.num_experts; ++e)
      if (probs[e] > probs[best]) best = e;
    CHECK(plan.token.data<int32_t>()[t] == t);
    CHECK(plan.expert.data<int32_t>()[t] == best);
    CHECK(plan.weight.data<double>()[t] == doctest::Approx(probs[best]).epsilon(1e-15));
  }

  FixtureLoss loss;
  for (int64_t a = 0; a < tokens; ++a) loss.c.push_back(data_rng.normal());
  for (int64_t i = 0; i < tokens * spec.num_experts; ++i) {
    loss.r.push_back(data_rng.normal());
    loss.q.push_back(data_rng.normal());
  }
  RouterGrad grad;
  grad.weight = host_tensor<double>({tokens});
  grad.probs = host_tensor<double>({tokens, spec.num_experts});
  grad.logits = host_tensor<double>({tokens, spec.num_experts});
  for (int64_t a = 0; a < tokens; ++a) grad.weight.data<double>()[a] = loss.c[a];
  for (size_t i = 0; i < loss.r.size(); ++i) {
    grad.probs.data<double>()[i] = loss.r[i];
    grad.logits.data<double>()[i] = loss.q[i];
  }
  Tensor grad_x = host_tensor<double>({tokens, spec.d_model});
  zero_grads(*ops, *router);
  router->backward(x, plan, grad, ctx, grad_x);

  // Central differences in double; the top-1 choice does not flip at this step for these inputs.
  const double step = 1e-6, tolerance = 1e-7;
  auto numeric = [&](double* value) {
    const double saved = *value;
    *value = saved + step;
    const double up = loss(router->forward(x, ctx));
    *value = saved - step;
    const double down = loss(router->forward(x, ctx));
    *value = saved;
    return (up - down) / (2 * step);
  };
  REQUIRE(router->parameters().size() == 1);
  Parameter& gate = *router->parameters()[0];
  for (int64_t i = 0; i < gate.value.numel(); ++i) {
    CAPTURE(i);
    CHECK(gate.grad.data<double>()[i] == doctest::Approx(numeric(gate.value.data<double>() + i)).epsilon(tolerance));
  }
  for (int64_t i = 0; i < x.numel(); ++i) {
    CAPTURE(i);
    CHECK(grad_x.data<double>()[i] == doctest::Approx(numeric(x.data<double>() + i)).epsilon(tolerance));
  }

  router.reset();
  CHECK(info.library.use_count() == library_holders);
}

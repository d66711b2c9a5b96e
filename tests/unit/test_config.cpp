// build_config: the core schema and the real plugins' schemas applied to recipes. Every kind of
// mistake is checked for its exact place (line:column), its dotted key and its message.
#include <doctest/doctest.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include "moelab/config.hpp"
#include "moelab/registry.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
using namespace moelab;
using moelab::test::contains;

namespace {

const char* const kPluginDir = MOELAB_BINARY_DIR "/lib/moelab/plugins";

// The build's real plugins, loaded once for the whole file.
PluginRegistry& registry() {
  static PluginRegistry r = [] {
    PluginRegistry loaded;
    loaded.scan({kPluginDir});
    return loaded;
  }();
  return r;
}

void require_plugins() {
  for (auto [kind, name] : {std::pair{PluginKind::router, "softmax_topk"}, std::pair{PluginKind::experts, "glu"},
                            std::pair{PluginKind::experts, "full"}, std::pair{PluginKind::balancer, "switch_aux"},
                            std::pair{PluginKind::balancer, "z_loss"}, std::pair{PluginKind::kernel, "cpu"}})
    REQUIRE_MESSAGE(registry().find(kind, name) != nullptr,
                    "plugin " << name << " is not built in " << kPluginDir << "; build the plugins first");
}

// The smallest valid recipe: what every test starts from (line 1 is this header).
const std::string kMinimal = R"(# minimal
[moe.router]
type = "softmax_topk"
[moe.experts]
type = "glu"
)";

RunConfig config_of(const std::string& text, const std::string& name = "recipe.toml") {
  require_plugins();
  Recipe recipe = Recipe::parse(text, name);
  return build_config(recipe, registry());
}

Diagnostics errors_of(const std::string& text, const std::string& name = "recipe.toml") {
  require_plugins();
  Recipe recipe = Recipe::parse(text, name);
  try {
    build_config(recipe, registry());
  } catch (const UsageError& e) {
    REQUIRE_MESSAGE(!e.diagnostics().empty(), e.what());
    return e.diagnostics();
  }
  FAIL("expected build_config to reject:\n" << text);
  return {};
}

// The one diagnostic for `key`; fails when there is none or several.
Diagnostic only(const Diagnostics& diagnostics, const std::string& key) {
  const Diagnostic* found = nullptr;
  int count = 0;
  for (const auto& d : diagnostics.items())
    if (d.key == key) {
      found = &d;
      ++count;
    }
  INFO(diagnostics.format());
  REQUIRE_MESSAGE(count == 1, "expected one diagnostic for " << key);
  return *found;
}

}  // namespace

TEST_CASE("defaults: every core and plugin default is in RunConfig and written into the recipe") {
  require_plugins();
  Recipe recipe = Recipe::parse(kMinimal, "some/dir/my_run.toml");
  const RunConfig c = build_config(recipe, registry());
  CHECK(c.name == "my_run");
  CHECK(c.description.empty());
  CHECK(c.seed == 1);
  CHECK(c.device == "cpu");
  CHECK(c.kernel.type == "cpu");
  CHECK(c.kernel.key == "kernel");
  CHECK(c.plugin_paths.empty());
  CHECK(c.model.d_model == 64);
  CHECK(c.model.dtype == DType::f32);
  CHECK(c.moe.num_experts == 8);
  CHECK(c.moe.top_k == 2);
  CHECK(c.moe.capacity_factor == 1.25);
  CHECK(c.moe.eval_capacity_factor == 2.0);
  CHECK(c.moe.overflow == Overflow::drop);
  CHECK(c.moe.dead_expert_window == 10000);
  CHECK(c.moe.router.type == "softmax_topk");
  CHECK(c.moe.router.key == "moe.router");
  CHECK(c.moe.router.params.get_float("temperature") == 1.0);
  CHECK(c.moe.experts.type == "glu");
  CHECK(c.moe.experts.params.get_int("d_ff") == 256);
  CHECK(c.moe.balancers.empty());
  CHECK(c.train.steps == 200);
  CHECK(c.train.batch_size == 8);
  CHECK(c.train.seq_len == 64);
  CHECK(c.train.lr == 1e-3);
  CHECK(c.train.weight_decay == 0.0);
  CHECK(c.train.grad_clip == 1.0);
  CHECK(c.train.log_every == 10);
  CHECK(c.train.eval_every == 50);
  CHECK(c.train.eval_batches == 4);
  CHECK(c.task.kind == "regression");
  CHECK(c.task.clusters == 8);
  CHECK(c.task.noise == 0.01);
  CHECK(c.output_dir == "runs");
  CHECK(c.layer.d_model == 64);
  CHECK(c.layer.num_experts == 8);
  CHECK(c.layer.top_k == 2);
  CHECK(c.layer.dtype == DType::f32);

  // The recipe now prints complete, plugin parameters included...
  const toml::table& t = recipe.table();
  CHECK(t.at_path("name").value<std::string>() == "my_run");
  CHECK(t.at_path("kernel.type").value<std::string>() == "cpu");
  CHECK(t.at_path("kernel.threads").value<int64_t>() == 0);
  CHECK(t.at_path("moe.router.temperature").value<double>() == 1.0);
  CHECK(t.at_path("moe.experts.activation").value<std::string>() == "silu");
  CHECK(t.at_path("moe.balancers").as_array() != nullptr);
  CHECK(t.at_path("train.lr").value<double>() == 1e-3);
  CHECK(t.at_path("output.dir").value<std::string>() == "runs");
  // ...and validates again to the same thing.
  Recipe again = Recipe::parse(recipe.to_toml(), "elsewhere.toml");
  const RunConfig c2 = build_config(again, registry());
  CHECK(c2.name == "my_run");
  CHECK(again.to_toml() == recipe.to_toml());
  // Defaulted values have no place in the file.
  CHECK(!recipe.where("moe.top_k").known());
}

TEST_CASE("values: every section is read into RunConfig; integers widen where floats are declared") {
  const RunConfig c = config_of(R"(
name = "full"
description = "everything set"
seed = 42
[model]
d_model = 32
dtype = "f64"
[moe]
num_experts = 16
top_k = 4
capacity_factor = 1
eval_capacity_factor = 3
overflow = "dropless"
dead_expert_window = 500
[moe.router]
type = "softmax_topk"
temperature = 2
[moe.experts]
type = "full"
d_ff = 48
activation = "gelu"
[[moe.balancers]]
type = "switch_aux"
coef = 0.02
[[moe.balancers]]
type = "z_loss"
[train]
steps = 5
lr = 1
weight_decay = 0.1
eval_every = 0
[task]
clusters = 3
noise = 0
[output]
dir = "elsewhere"
)");
  CHECK(c.name == "full");
  CHECK(c.description == "everything set");
  CHECK(c.seed == 42);
  CHECK(c.model.dtype == DType::f64);
  CHECK(c.moe.num_experts == 16);
  CHECK(c.moe.top_k == 4);
  CHECK(c.moe.capacity_factor == 1.0);
  CHECK(c.moe.eval_capacity_factor == 3.0);
  CHECK(c.moe.overflow == Overflow::dropless);
  CHECK(c.moe.dead_expert_window == 500);
  CHECK(c.moe.router.params.get_float("temperature") == 2.0);
  CHECK(c.moe.router.params.where("temperature").str() == "recipe.toml:17:15");
  CHECK(c.moe.experts.type == "full");
  CHECK(c.moe.experts.params.get_string("activation") == "gelu");
  REQUIRE(c.moe.balancers.size() == 2);
  CHECK(c.moe.balancers[0].type == "switch_aux");
  CHECK(c.moe.balancers[0].key == "moe.balancers[0]");
  CHECK(c.moe.balancers[0].params.get_float("coef") == 0.02);
  CHECK(c.moe.balancers[1].type == "z_loss");
  CHECK(c.moe.balancers[1].params.get_float("coef") == 0.001);
  CHECK(c.train.lr == 1.0);
  CHECK(c.train.eval_every == 0);
  CHECK(c.task.noise == 0.0);
  CHECK(c.output_dir == "elsewhere");
  CHECK(c.layer.dtype == DType::f64);
  CHECK(c.layer.d_model == 32);
  CHECK(std::string(overflow_name(c.moe.overflow)) == "dropless");
}

TEST_CASE("unknown keys: at the key, with the nearest valid name or the list of valid keys") {
  const Diagnostics e = errors_of(R"(# unknown keys
[moe]
topk = 1
completely_unrelated = 3
[modle]
d_model = 3
[moe.router]
type = "softmax_topk"
temprature = 2.0
[moe.experts]
type = "glu"
)");
  CHECK(e.size() == 4);
  const Diagnostic topk = only(e, "moe.topk");
  CHECK(topk.where.str() == "recipe.toml:3:1");
  CHECK(topk.message == "unknown key 'topk' in [moe]");
  CHECK(topk.hint == "did you mean 'top_k'?");
  const Diagnostic unrelated = only(e, "moe.completely_unrelated");
  CHECK(unrelated.where.str() == "recipe.toml:4:1");
  CHECK(contains(unrelated.hint, "valid keys: balancers, capacity_factor, dead_expert_window"));
  const Diagnostic modle = only(e, "modle");
  CHECK(modle.where.str() == "recipe.toml:5:2");
  CHECK(modle.hint == "did you mean 'model'?");
  const Diagnostic temp = only(e, "moe.router.temprature");
  CHECK(temp.where.str() == "recipe.toml:9:1");
  CHECK(temp.hint == "did you mean 'temperature'?");
}

TEST_CASE("wrong types and tables where values belong, and the reverse") {
  const Diagnostics e = errors_of(R"(seed = "one"
[model]
dtype = 32
d_model = 1.5
[moe]
top_k = "two"
num_experts = { n = 4 }
[train]
lr = [0.1]
)" + kMinimal);
  CHECK(e.size() == 6);
  CHECK(only(e, "seed").where.str() == "recipe.toml:1:8");
  CHECK(only(e, "seed").message == "expected integer, got string \"one\"");
  CHECK(only(e, "model.dtype").message == "expected string, got integer 32");
  CHECK(only(e, "model.d_model").message == "expected integer, got float 1.5");
  CHECK(only(e, "moe.top_k").where.str() == "recipe.toml:6:9");
  CHECK(only(e, "moe.num_experts").message == "expected integer, got a table");
  CHECK(only(e, "moe.num_experts").where.str() == "recipe.toml:7:15");
  CHECK(only(e, "train.lr").message == "expected float, got array [0.1]");

  const Diagnostics sections = errors_of("moe = 3\ntrain = \"fast\"\n");
  CHECK(only(sections, "moe").where.str() == "recipe.toml:1:7");
  CHECK(only(sections, "moe").message == "expected a table, got integer 3");
  CHECK(only(sections, "train").message == "expected a table, got string \"fast\"");

  const Diagnostics plugin_as_string = errors_of("[moe]\nrouter = \"softmax_topk\"\nexperts.type = \"glu\"\n");
  const Diagnostic router = only(plugin_as_string, "moe.router");
  CHECK(router.where.str() == "recipe.toml:2:10");
  CHECK(router.hint == "write [moe.router] with type = \"softmax_topk\"");
}

TEST_CASE("ranges and choices") {
  const Diagnostics e = errors_of(R"(seed = -1
device = "tpu"
[moe]
num_experts = 0
capacity_factor = 0.0
overflow = "dorp"
[moe.router]
type = "softmax_topk"
jitter_eps = 2.0
[moe.experts]
type = "glu"
[train]
steps = 0
lr = -0.5
)");
  CHECK(e.size() == 8);
  CHECK(only(e, "seed").message == "must be at least 0, got -1");
  CHECK(only(e, "device").message == "must be one of \"cpu\", \"cuda\", got \"tpu\"");
  CHECK(only(e, "moe.num_experts").where.str() == "recipe.toml:4:15");
  CHECK(only(e, "moe.capacity_factor").message == "must be greater than 0, got 0.0");
  CHECK(only(e, "moe.overflow").hint == "did you mean \"drop\"?");
  CHECK(only(e, "moe.router.jitter_eps").message == "must be in [0, 1], got 2.0");
  CHECK(only(e, "moe.router.jitter_eps").where.str() == "recipe.toml:9:14");
  CHECK(only(e, "train.steps").where.str() == "recipe.toml:13:9");
  CHECK(only(e, "train.lr").message == "must be greater than 0, got -0.5");
}

TEST_CASE("unknown plugins list the known ones of that kind") {
  const Diagnostics e = errors_of(R"(
[moe.router]
type = "softmax_topq"
[moe.experts]
type = "softmax_topk"
[[moe.balancers]]
type = "zloss"
[kernel]
type = 3
)");
  CHECK(e.size() == 4);
  const Diagnostic router = only(e, "moe.router.type");
  CHECK(router.where.str() == "recipe.toml:3:8");
  CHECK(router.message == "unknown router plugin 'softmax_topq'");
  CHECK(contains(router.hint, "did you mean 'softmax_topk'?"));
  CHECK(contains(router.hint, "known router plugins: "));
  const Diagnostic experts = only(e, "moe.experts.type");
  CHECK(contains(experts.hint, "known expert layout plugins: "));
  CHECK(contains(experts.hint, "glu"));
  CHECK(contains(experts.hint, "'softmax_topk' is a router plugin"));
  const Diagnostic balancer = only(e, "moe.balancers[0].type");
  CHECK(balancer.where.str() == "recipe.toml:7:8");
  CHECK(contains(balancer.hint, "did you mean 'z_loss'?"));
  CHECK(only(e, "kernel.type").message == "expected a kernel plugin name (string), got integer 3");
}

TEST_CASE("missing required keys: at the enclosing table") {
  const Diagnostics e = errors_of(R"(name = "x"
[moe]
top_k = 1

[moe.experts]
d_ff = 8
)");
  CHECK(e.size() == 2);
  const Diagnostic router = only(e, "moe.router.type");
  CHECK(router.where.str() == "recipe.toml:2:1");  // no [moe.router] at all: the [moe] table
  CHECK(router.message == "missing required key 'type': the router plugin to use");
  CHECK(contains(router.hint, "softmax_topk"));
  const Diagnostic experts = only(e, "moe.experts.type");
  CHECK(experts.where.str() == "recipe.toml:5:1");

  // Nothing at all: the file itself.
  const Diagnostics empty = errors_of("");
  CHECK(only(empty, "moe.router.type").where.str() == "recipe.toml");
}

TEST_CASE("[[moe.balancers]] must be an array of tables") {
  const Diagnostics single = errors_of(kMinimal + "[moe.balancers]\ntype = \"z_loss\"\n");
  CHECK(only(single, "moe.balancers").where.str() == "recipe.toml:6:1");
  CHECK(contains(only(single, "moe.balancers").hint, "[[moe.balancers]]"));
  const Diagnostics element = errors_of(kMinimal + "[moe]\nbalancers = [\"z_loss\", { type = \"z_loss\" }]\n");
  CHECK(only(element, "moe.balancers[0]").message == "expected a table, got string \"z_loss\"");
  CHECK(only(element, "moe.balancers[0]").where.str() == "recipe.toml:7:14");
  CHECK(element.size() == 1);
  const Diagnostics bad_param = errors_of(
      kMinimal + "[[moe.balancers]]\ntype = \"z_loss\"\n[[moe.balancers]]\ntype = \"switch_aux\"\ncoef = -1.0\n");
  CHECK(only(bad_param, "moe.balancers[1].coef").where.str() == "recipe.toml:10:8");
}

TEST_CASE("cross-field: top_k <= num_experts, at top_k's place") {
  const Diagnostics e = errors_of(kMinimal + "[moe]\nnum_experts = 4\ntop_k = 5\n");
  CHECK(e.size() == 1);
  const Diagnostic d = only(e, "moe.top_k");
  CHECK(d.where.str() == "recipe.toml:8:9");
  CHECK(d.message == "top_k (5) must be at most num_experts (4)");
  // With top_k left at its default (2), the place is num_experts.
  const Diagnostics defaulted = errors_of(kMinimal + "[moe]\nnum_experts = 1\n");
  CHECK(only(defaulted, "moe.num_experts").where.str() == "recipe.toml:7:15");
  CHECK(contains(only(defaulted, "moe.num_experts").hint, "top_k defaults to 2"));
  // Equal is fine.
  CHECK(config_of(kMinimal + "[moe]\nnum_experts = 3\ntop_k = 3\n").layer.top_k == 3);
}

TEST_CASE("plugin hooks: check problems at the parameter, adjust_layer gives the layer") {
  require_plugins();
  if (!registry().find(PluginKind::experts, "fine_grained")) {
    FAIL("the fine_grained experts plugin (the one with check and adjust_layer hooks) is not built in " << kPluginDir);
  }
  const std::string fine = R"(# fine-grained
[moe]
num_experts = 4
top_k = 2
[moe.router]
type = "softmax_topk"
[moe.experts]
type = "fine_grained"
segments = 4
d_ff = 30
)";
  const Diagnostics e = errors_of(fine);
  CHECK(e.size() == 1);
  const Diagnostic d = only(e, "moe.experts.d_ff");
  CHECK(d.where.str() == "recipe.toml:10:8");
  CHECK(contains(d.message, "must be divisible by segments (4)"));
  CHECK(d.hint == "reported by the expert layout plugin 'fine_grained'");

  std::string fixed = fine;
  fixed.replace(fixed.find("d_ff = 30"), 9, "d_ff = 32");
  const RunConfig c = config_of(fixed + "[model]\nd_model = 8\n", "fine.toml");
  // The recipe states 4 experts top-2; the layer has 16 experts top-8 ...
  CHECK(c.moe.num_experts == 4);
  CHECK(c.moe.top_k == 2);
  CHECK(c.layer.num_experts == 16);
  CHECK(c.layer.top_k == 8);
  CHECK(c.layer.d_model == 8);
}

TEST_CASE("all errors at once, across sections and files, with notes for inherited values") {
  const fs::path dir = fs::temp_directory_path() / ("moelab_test_config_" + std::to_string(::getpid()));
  fs::create_directories(dir / "configs");
  std::ofstream(dir / "configs/base.toml") << "[train]\nsteps = -3\n[moe.router]\ntype = \"softmax_topk\"\n";
  const fs::path recipe_file = dir / "x.toml";
  std::ofstream(recipe_file) << "extends = \"configs/base.toml\"\nseed = \"s\"\n[moe]\ntop_k = 0\n[moe.experts]\n"
                                "type = \"glu\"\nd_ff = 0\n[task]\nkind = \"lm\"\n";
  require_plugins();
  Recipe recipe = Recipe::load(recipe_file);
  Diagnostics e;
  try {
    build_config(recipe, registry());
    FAIL("expected errors");
  } catch (const UsageError& error) {
    e = error.diagnostics();
  }
  fs::remove_all(dir);
  CHECK(e.size() == 5);
  const Diagnostic steps = only(e, "train.steps");
  CHECK(steps.where.str() == (dir / "configs/base.toml").string() + ":2:9");
  CHECK(steps.note == "set in " + (dir / "configs/base.toml").string() + ", extended by " + recipe_file.string());
  CHECK(only(e, "seed").where.str() == recipe_file.string() + ":2:8");
  CHECK(only(e, "seed").note.empty());
  CHECK(only(e, "moe.top_k").where.line == 4);
  CHECK(only(e, "moe.experts.d_ff").where.line == 7);
  CHECK(only(e, "task.kind").where.line == 9);
}

TEST_CASE("[plugins] paths: relative to the file that sets them, must exist, written back absolute") {
  const fs::path dir = fs::temp_directory_path() / ("moelab_test_config_paths_" + std::to_string(::getpid()));
  fs::create_directories(dir / "recipes/my_plugins");
  const fs::path file = dir / "recipes/r.toml";
  std::ofstream(file) << kMinimal << "[plugins]\npaths = [\"my_plugins\", \"missing\"]\n";
  require_plugins();
  Recipe recipe = Recipe::load(file);
  Diagnostics e;
  try {
    build_config(recipe, registry());
  } catch (const UsageError& error) {
    e = error.diagnostics();
  }
  const Diagnostic missing = only(e, "plugins.paths[1]");
  CHECK(missing.where.str() == file.string() + ":7:24");
  CHECK(contains(missing.message, (dir / "recipes/missing").string()));
  CHECK(e.size() == 1);

  std::ofstream(file) << kMinimal << "[plugins]\npaths = [\"my_plugins\"]\n";
  Recipe good = Recipe::load(file);
  PluginRegistry local = PluginRegistry();
  local.scan({kPluginDir});
  const RunConfig c = build_config(good, local);
  REQUIRE(c.plugin_paths.size() == 1);
  CHECK(c.plugin_paths[0] == fs::absolute(dir / "recipes/my_plugins").lexically_normal());
  CHECK(good.table().at_path("plugins.paths[0]").value<std::string>() == c.plugin_paths[0].string());
  // The folder was scanned into the registry before the plugin tables were checked.
  bool searched = false;
  for (const auto& f : local.searched()) searched |= fs::equivalent(f, dir / "recipes/my_plugins");
  CHECK(searched);
  fs::remove_all(dir);
}

TEST_CASE("device and kernel: the kernel defaults to the device's name") {
  const Diagnostics e = errors_of(kMinimal + "[kernel]\nthreads = -1\n");
  CHECK(only(e, "kernel.threads").where.str() == "recipe.toml:7:11");
  if (!registry().find(PluginKind::kernel, "cuda")) {
    const Diagnostics cuda = errors_of("device = \"cuda\"\n" + kMinimal);
    const Diagnostic d = only(cuda, "device");
    CHECK(d.where.str() == "recipe.toml:1:10");
    CHECK(d.message == "no kernel plugin 'cuda' for device \"cuda\"");
  }
  const RunConfig explicit_cpu = config_of("device = \"cuda\"\n" + kMinimal + "[kernel]\ntype = \"cpu\"\n");
  CHECK(explicit_cpu.kernel.type == "cpu");
  CHECK(explicit_cpu.device == "cuda");
}

TEST_CASE("a recipe with [sweep] is expanded first; each point validates on its own") {
  const Diagnostics e = errors_of(kMinimal + "[sweep]\nmoe.top_k = [1, 2]\n");
  CHECK(only(e, "sweep").where.line == 6);
  require_plugins();
  const Recipe recipe = Recipe::parse(kMinimal + "[moe]\nnum_experts = 2\n[sweep]\nmoe.top_k = [1, 3]\n", "s.toml");
  const auto points = recipe.expand_sweep();
  REQUIRE(points.size() == 2);
  CHECK(build_config(*points[0].recipe, registry()).moe.top_k == 1);
  Diagnostics second;
  try {
    build_config(*points[1].recipe, registry());
  } catch (const UsageError& error) {
    second = error.diagnostics();
  }
  CHECK(only(second, "moe.top_k").where.str() == "s.toml:9:17");
}

TEST_CASE("core_schema: every section has its documented keys with defaults") {
  const auto sections = core_schema();
  auto find = [&](const std::string& key) -> const SectionSchema* {
    for (const auto& s : sections)
      if (s.key == key) return &s;
    return nullptr;
  };
  for (const char* key : {"", "plugins", "kernel", "model", "moe", "moe.router", "moe.experts", "moe.balancers",
                          "train", "task", "output"})
    CHECK_MESSAGE(find(key) != nullptr, key);
  const ParamSet train = defaults_of(find("train")->params);
  CHECK(train.get_int("steps") == 200);
  CHECK(train.get_float("lr") == 1e-3);
  CHECK(!find("moe.router")->params[0].default_value.has_value());
}

TEST_CASE("[train] and [data] of the language-model trainer are typed, defaulted and checked") {
  const RunConfig config = config_of(kMinimal + R"(
[train]
schedule = "linear"
warmup_steps = 5
no_decay = ["embed"]
checkpoint_every = 10
[data]
seed = 7
kind = "text"
paths = ["corpus/*.txt"]
)",
                                     "some/dir/run.toml");
  CHECK(config.train.schedule == LrSchedule::linear);
  CHECK(config.train.warmup_steps == 5);
  CHECK(config.train.no_decay == std::vector<std::string>{"embed"});
  CHECK(config.train.checkpoint_every == 10);
  CHECK(config.data.seed == 7);
  CHECK(config.data.paths.size() == 1);
  CHECK(config.data.paths[0].is_absolute());
  CHECK(config.data.paths[0].filename() == "*.txt");
  CHECK(config.data.paths[0].parent_path().parent_path().filename() == "dir");  // relative to the recipe

  const Diagnostics bad =
      errors_of(kMinimal + "[data]\nkind = \"tokens\"\n[train]\nschedule = \"step\"\nmin_lr_ratio = 2.0\n");
  std::string all;
  for (const auto& d : bad.items()) all += d.key + ": " + d.message + "\n";
  CAPTURE(all);
  CHECK(all.find("data.paths") != std::string::npos);
  CHECK(all.find("train.schedule") != std::string::npos);
  CHECK(all.find("train.min_lr_ratio") != std::string::npos);
}

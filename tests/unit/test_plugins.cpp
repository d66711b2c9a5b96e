// The plugin loader: the build's own plugins, the search path, and every way a file can fail to be
// a usable plugin (the fixtures in tests/fixtures), each with the message a user would read.
#include <dlfcn.h>
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "moelab/registry.hpp"
#include "moelab/sha256.hpp"
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
    // A folder named twice is searched once; a folder that does not exist is reported as a
    // folder, not as a plugin file.
    PluginPathOverride env(std::string(MOELAB_FIXTURE_GOOD_DIR) + ":" + MOELAB_FIXTURE_GOOD_DIR +
                           ":/no/such/moelab/folder");
    const PluginRegistry registry = PluginRegistry::with_default_path();
    CHECK(registry.searched().size() == 3);
    CHECK(registry.problems().empty());
    REQUIRE(registry.missing_folders().size() == 1);
    CHECK(registry.missing_folders()[0].file == fs::path("/no/such/moelab/folder"));
    CHECK(registry.missing_folders()[0].reason == "plugin folder does not exist");
  }
}

TEST_CASE("a plugin built for another ABI is refused by its stamp, before its library is opened") {
  const fs::path marker = fs::temp_directory_path() / ("moelab_abi_marker_" + std::to_string(::getpid()));
  fs::remove(marker);
  ::setenv("MOELAB_FIXTURE_MARKER", marker.c_str(), 1);
  PluginRegistry registry;
  registry.scan({MOELAB_FIXTURE_ABI_DIR});
  CHECK(registry.all().empty());
  REQUIRE(registry.problems().size() == 2);

  const auto major = problem_for(registry, "libmoelab_router_abi_major99.so");
  REQUIRE(major);
  const std::string file = (canonical_path(MOELAB_FIXTURE_ABI_DIR) / "libmoelab_router_abi_major99.so").string();
  CHECK(major->reason == file + " was built for plugin ABI 99.0; this moelab speaks ABI " + std::to_string(kAbiMajor) +
                             "." + std::to_string(kAbiMinor) + ": rebuild it against this SDK");
  CHECK_FALSE(major->duplicate);

  const auto minor = problem_for(registry, "libmoelab_router_abi_newer_minor.so");
  REQUIRE(minor);
  const std::string newer = std::to_string(kAbiMajor) + "." + std::to_string(kAbiMinor + 1);
  const std::string ours = std::to_string(kAbiMajor) + "." + std::to_string(kAbiMinor);
  CHECK(contains(minor->reason, "libmoelab_router_abi_newer_minor.so"));
  CHECK(contains(minor->reason, "plugin ABI " + newer + ", newer than this moelab's ABI " + ours));

  // Not one line of the refused libraries ran: their static initialiser and constructor function
  // write the marker when they do (the no-stamp fixture proves the marker works: see below).
  CHECK_FALSE(fs::exists(marker));
  // Nor is a refused library mapped into the process.
  CHECK(dlopen(file.c_str(), RTLD_NOLOAD | RTLD_LAZY) == nullptr);
  ::unsetenv("MOELAB_FIXTURE_MARKER");
}

TEST_CASE("a library without a stamp is refused before it is opened, with how to rebuild it") {
  const fs::path marker = fs::temp_directory_path() / ("moelab_stamp_marker_" + std::to_string(::getpid()));
  fs::remove(marker);
  ::setenv("MOELAB_FIXTURE_MARKER", marker.c_str(), 1);
  PluginRegistry registry;
  const fs::path file = fs::path(MOELAB_FIXTURE_BROKEN_DIR) / "libmoelab_router_no_stamp.so";
  CHECK_FALSE(registry.load_file(file));
  REQUIRE(registry.problems().size() == 1);
  CHECK(contains(registry.problems()[0].reason, "carries no moelab stamp (ELF section .moelab_plugin)"));
  CHECK(contains(registry.problems()[0].reason, "rebuild it against this moelab's SDK"));
  CHECK_FALSE(fs::exists(marker));
  // The marker works: opening the library by hand runs its initialisers.
  void* handle = dlopen(canonical_path(file).c_str(), RTLD_NOW | RTLD_LOCAL);
  REQUIRE(handle != nullptr);
  CHECK(fs::exists(marker));
  fs::remove(marker);
  ::unsetenv("MOELAB_FIXTURE_MARKER");
}

TEST_CASE("SHA-256: the FIPS 180-4 test vectors, in one piece and in uneven pieces") {
  CHECK(sha256_hex("", 0) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abc", 3) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  CHECK(sha256_hex(two_blocks.data(), two_blocks.size()) ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  const std::string million(1000000, 'a');
  Sha256 pieces;
  for (size_t at = 0, step = 1; at < million.size(); at += step, step = step % 97 + 1)
    pieces.update(million.data() + at, std::min(step, million.size() - at));
  CHECK(pieces.hex() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("the stamp reader refuses malformed files without reading past them") {
  const fs::path dir = fs::temp_directory_path() / ("moelab_stamp_files_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path good = canonical_path(MOELAB_FIXTURE_GOOD_DIR) / "libmoelab_router_fixture_top1.so";
  std::string bytes;
  {
    std::ifstream in(good, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const StampResult ok = read_plugin_stamp(good);
  REQUIRE(ok.stamp);
  CHECK(std::string(ok.stamp->name) == "fixture_top1");
  CHECK(ok.stamp->abi_major == kAbiMajor);
  // Every truncation and a flipped byte in the section table: a reason, never a crash.
  for (size_t cut : {size_t{4}, size_t{20}, size_t{63}, size_t{64}, bytes.size() / 2, bytes.size() - 1}) {
    const fs::path file = dir / "cut.so";
    { std::ofstream(file, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(cut)); }
    CAPTURE(cut);
    CHECK_FALSE(read_plugin_stamp(file).problem.empty());
  }
  std::string flipped = bytes;
  flipped[0x3c] = static_cast<char>(0xff);  // e_shnum
  flipped[0x3d] = static_cast<char>(0xff);
  const fs::path file = dir / "flipped.so";
  { std::ofstream(file, std::ios::binary).write(flipped.data(), static_cast<std::streamsize>(flipped.size())); }
  CHECK(contains(read_plugin_stamp(file).problem, "section table"));
  fs::remove_all(dir);
}

TEST_CASE("two plugins of one kind and name: neither is used, in every lookup, and the error names both files") {
  const std::string good = (canonical_path(MOELAB_FIXTURE_GOOD_DIR) / "libmoelab_router_fixture_top1.so").string();
  const std::string again =
      (canonical_path(MOELAB_FIXTURE_DUPLICATE_DIR) / "libmoelab_router_fixture_top1_again.so").string();

  PluginRegistry registry;
  registry.scan({MOELAB_FIXTURE_GOOD_DIR, MOELAB_FIXTURE_DUPLICATE_DIR});
  REQUIRE(registry.problems().size() == 1);
  const PluginProblem& problem = registry.problems()[0];
  CHECK(problem.duplicate);
  CHECK(problem.file.string() == again);
  const std::string expected = "duplicate router 'fixture_top1': defined by both " + good + " and " + again +
                               "; neither is used until one is removed from the search path";
  CHECK(problem.reason == expected);
  CHECK(registry.find(PluginKind::router, "fixture_top1") == nullptr);
  CHECK(registry.duplicate(PluginKind::router, "fixture_top1") == expected);
  CHECK(registry.all().empty());
  CHECK(registry.names(PluginKind::router).empty());
  try {
    registry.require(PluginKind::router, "fixture_top1");
    FAIL("require() accepted a duplicated name");
  } catch (const UsageError& e) {
    CHECK(std::string(e.what()) == expected);
  }

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
  // The stamps refuse three files at scan; the missing dependency shows when the library is opened.
  CHECK(registry.problems().size() == 3);
  CHECK(registry.all().size() == 1);
  INFO("problems:\n" << problems_text(registry));
  CHECK(registry.problems().size() == 4);

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
  // Before the libraries are opened, the names are the stamps'; missing_dep's library fails to
  // open, and once all() has tried, it is no longer among the known names.
  CHECK(registry.names(PluginKind::router) == std::vector<std::string>{"fixture_top1", "missing_dep", "survivor"});
  (void)registry.all();
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

// `env ENV moelab ARGUMENTS` (ENV: assignments, e.g. "MOELAB_PLUGIN_PATH=/x"): exit status and
// output (stdout and stderr).
static std::pair<int, std::string> moelab_cli(const std::string& env, const std::string& arguments) {
  const std::string command =
      "env " + env + " '" + (fs::path(MOELAB_BINARY_DIR) / "bin" / "moelab").string() + "' " + arguments + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::string output;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof buffer, pipe)) > 0) output.append(buffer, n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

TEST_CASE("CLI: no command runs a refused plugin's code; duplicates and missing folders are named in check") {
  const fs::path dir = fs::temp_directory_path() / ("moelab_cli_plugins_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path marker = dir / "marker";
  const std::string env = "MOELAB_FIXTURE_MARKER=" + marker.string() + " MOELAB_PLUGIN_PATH=";
  const std::string recipe = std::string(MOELAB_SOURCE_DIR) + "/recipes/default.toml";
  auto moelab = [&](const std::string& path, const std::string& arguments) {
    return moelab_cli(env + path, arguments);
  };
  const std::string abi = std::string(MOELAB_FIXTURE_ABI_DIR) + ":" + MOELAB_FIXTURE_BROKEN_DIR;
  for (const std::string& command :
       {std::string("plugins"), "check '" + recipe + "'",
        "run '" + recipe + "' --set train.steps=2 --out '" + (dir / "run").string() + "'"}) {
    const auto [status, output] = moelab(abi, command);
    CAPTURE(command);
    CAPTURE(output);
    CHECK(status == 0);
  }
  CHECK_FALSE(fs::exists(marker));
  // The run folder says which file served each plugin, with its SHA-256.
  std::ifstream provenance(dir / "run" / "default" / "plugins.json");
  const std::string plugins_json((std::istreambuf_iterator<char>(provenance)), {});
  const fs::path cpu = canonical_path(kBuildPluginDir) / "libmoelab_kernel_cpu.so";
  CHECK(contains(plugins_json, "\"file\":\"" + cpu.string() + "\""));
  CHECK(contains(plugins_json, "\"sha256\":\"" + file_sha256(cpu) + "\""));
  CHECK(contains(plugins_json, "\"key\":\"moe.router\",\"kind\":\"router\",\"name\":\"softmax_topk\""));

  // A recipe naming a duplicated plugin is refused by check, naming both files.
  const fs::path duplicated = dir / "duplicated.toml";
  {
    std::ofstream out(duplicated);
    out << "extends = \"" << recipe << "\"\n[moe.router]\ntype = \"fixture_top1\"\n";
  }
  const auto [status, output] = moelab(std::string(MOELAB_FIXTURE_GOOD_DIR) + ":" + MOELAB_FIXTURE_DUPLICATE_DIR,
                                       "check '" + duplicated.string() + "'");
  CAPTURE(output);
  CHECK(status == 2);
  CHECK(contains(output,
                 "duplicated.toml:3:8: error: moe.router.type: duplicate router 'fixture_top1': defined by both"));
  CHECK(contains(output, "libmoelab_router_fixture_top1_again.so"));

  // An unknown plugin's error says why files could not be used and which folders do not exist.
  const fs::path unknown = dir / "unknown.toml";
  {
    std::ofstream out(unknown);
    out << "extends = \"" << recipe << "\"\n[moe.router]\ntype = \"no_such_router\"\n";
  }
  const auto [status2, output2] = moelab(abi + ":/no/such/moelab/folder", "check '" + unknown.string() + "'");
  CAPTURE(output2);
  CHECK(status2 == 2);
  CHECK(contains(output2, "libmoelab_router_abi_major99.so could not be used"));
  CHECK(contains(output2, "plugin folder does not exist: /no/such/moelab/folder"));

  // A plugin's own failure names the plugin, its file, the layer and the call.
  const fs::path throwing = dir / "throwing.toml";
  {
    std::ofstream out(throwing);
    out << "extends = \"" << recipe << "\"\n[plugins]\npaths = [\"" << MOELAB_FIXTURE_THROWS_DIR
        << "\"]\n[moe.router]\ntype = \"thrower\"\n[train]\nsteps = 3\n";
  }
  const auto [status4, output4] =
      moelab("", "run '" + throwing.string() + "' --out '" + (dir / "throws").string() + "'");
  CAPTURE(output4);
  CHECK(status4 == 1);
  CHECK(contains(output4, "error: step 1: forward: layer "));
  CHECK(contains(output4, ", router 'thrower' ("));
  CHECK(contains(output4, "libmoelab_router_thrower.so), forward: vector::_M_range_check"));
  CHECK_FALSE(contains(output4, "unexpected failure"));

  // plugins --recipe sees a recipe's [plugins] paths.
  const fs::path with_paths = dir / "with_paths.toml";
  {
    std::ofstream out(with_paths);
    out << "extends = \"" << recipe << "\"\n[plugins]\npaths = [\"" << MOELAB_FIXTURE_GOOD_DIR << "\"]\n";
  }
  const auto [status3, output3] = moelab("", "plugins --recipe '" + with_paths.string() + "'");
  CHECK(status3 == 0);
  CHECK(contains(output3, "fixture_top1"));
  fs::remove_all(dir);
}

// Issue 11, point 11: the conformance kit, as an out-of-tree author runs it.
TEST_CASE("moelab test-plugin: a correct router passes every check, a wrong gradient fails by name") {
  auto run = [](const std::string& arguments) { return moelab_cli("MOELAB_PLUGIN_PATH=", arguments); };
  const auto [good, good_output] = run("test-plugin fixture_top1 --path " MOELAB_FIXTURE_GOOD_DIR " --settings 1");
  CAPTURE(good_output);
  CHECK(good == 0);
  CHECK(contains(good_output, "pass  plan"));
  CHECK(contains(good_output, "pass  gradients   [defaults] reroute, evaluation: max relative error"));
  CHECK(contains(good_output, "pass  gradients   [drawn 1: init_std="));
  CHECK(contains(good_output,
                 "router 'fixture_top1' (" MOELAB_FIXTURE_GOOD_DIR "/libmoelab_router_fixture_top1.so): 17 "
                 "checks, 0 failed"));

  const auto [wrong, wrong_output] = run("test-plugin wrong_gradient --path " MOELAB_FIXTURE_WRONG_DIR " --settings 0");
  CAPTURE(wrong_output);
  CHECK(wrong == 1);
  CHECK(contains(wrong_output, "FAIL  gradients   [defaults] dropless, training: max relative error"));
  CHECK(contains(wrong_output, "worst router.weight["));
  CHECK(contains(wrong_output, "6 failed"));

  // Usage mistakes exit 2 with what to do.
  const auto [unknown, unknown_output] = run("test-plugin no_such_plugin");
  CHECK(unknown == 2);
  const auto [bad_key, bad_key_output] = run("test-plugin softmax_topk --set tmperature=2");
  CAPTURE(bad_key_output);
  CHECK(bad_key == 2);
  CHECK(contains(bad_key_output, "did you mean 'temperature'?"));
  const auto [bad_value, bad_value_output] = run("test-plugin softmax_topk --set temperature=x");
  CHECK(bad_value == 2);
}

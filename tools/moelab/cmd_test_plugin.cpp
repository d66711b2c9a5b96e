// moelab test-plugin: the conformance kit (moelab/conformance.hpp) on one plugin, as the in-tree
// plugins pass it: gradients against finite differences in double under every capacity policy,
// the routing plan's contract, determinism, and for a kernel every Ops slot against the cpu kernel.
#include <fmt/format.h>

#include <boost/json.hpp>
#include <cstdio>
#include <filesystem>
#include <string>

#include "cli_util.hpp"
#include "moelab/conformance.hpp"
#include "moelab/registry.hpp"

namespace moelab::cli {
namespace {

std::optional<PluginKind> kind_named(const std::string& text) {
  for (PluginKind kind :
       {PluginKind::router, PluginKind::experts, PluginKind::balancer, PluginKind::kernel, PluginKind::comm})
    if (text == plugin_kind_name(kind)) return kind;
  return std::nullopt;
}

}  // namespace

int cmd_test_plugin(const Args& args) {
  const ArgSpec spec{
      "moelab test-plugin NAME [--kind KIND] [--path DIR]... [--set KEY=VALUE]... [--settings N] [--seed S] [--json]",
      "Runs the conformance kit on the plugin NAME: every check the in-tree plugins pass.\n"
      "Router, expert layout, balancer: inside a small MoE layer in double on the cpu kernel, for its\n"
      "defaults (with --set) and N settings drawn from its schema (default 3): gradients w.r.t. the\n"
      "input and every parameter against central differences under each capacity policy (dropless,\n"
      "drop, reroute), in training and evaluation; the routing plan's contract (routers); bit-identical\n"
      "outputs from one seed. Kernel: every Ops slot against the cpu kernel on fresh random inputs, f32\n"
      "and f64. Comm: every collective on values each rank can predict, zero-byte blocks included, on\n"
      "the world it runs in (one process, or each rank under mpirun -np N moelab test-plugin mpi).\n"
      "Prints one line per check and exits 0 when all pass, 1 when one fails.\n"
      "The plugin is looked for in the build's plugin folder, MOELAB_PLUGIN_PATH and each --path DIR.",
      {{"--kind", "router, experts, balancer, kernel or comm: needed when NAME is a plugin of several kinds"},
       {"--path", "also search DIR for plugins (repeatable): your plugin's build folder"},
       {"--set", "fix a parameter of the plugin, VALUE parsed as TOML (repeatable): --set top_k=2"},
       {"--settings", "settings drawn from the schema besides the defaults (default 3; 0: defaults only)"},
       {"--seed", "seed of the drawn settings and the inputs (default 1)"}},
      {{"--json", "print the report as JSON"}},
      1,
      1};
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  const std::string& name = parsed.positional[0];
  PluginRegistry registry = PluginRegistry::with_default_path();
  std::vector<std::filesystem::path> folders;
  for (const auto& dir : parsed.all("--path")) {
    if (!std::filesystem::is_directory(dir)) throw UsageError(fmt::format("--path {}: not a folder", dir));
    folders.push_back(std::filesystem::absolute(dir));
  }
  registry.scan(folders);

  std::optional<PluginKind> kind;
  if (const auto text = parsed.option("--kind")) {
    kind = kind_named(*text);
    if (!kind)
      throw UsageError(fmt::format("--kind: expected router, experts, balancer, kernel or comm, got '{}'", *text));
  } else {
    std::vector<PluginKind> kinds;
    for (PluginKind k :
         {PluginKind::router, PluginKind::experts, PluginKind::balancer, PluginKind::kernel, PluginKind::comm})
      if (registry.find(k, name) != nullptr) kinds.push_back(k);
    if (kinds.size() > 1)
      throw UsageError(fmt::format("'{}' names plugins of {} kinds; choose one with --kind", name, kinds.size()));
    if (kinds.empty()) registry.require(PluginKind::router, name);  // the unknown-plugin error, with its hints
    kind = kinds.front();
  }

  ConformanceOptions options;
  for (const auto& assignment : parsed.all("--set")) {
    const size_t eq = assignment.find('=');
    if (eq == std::string::npos || eq == 0)
      throw UsageError(fmt::format("--set: expected KEY=VALUE, got '{}'", assignment));
    options.overrides.emplace_back(assignment.substr(0, eq), assignment.substr(eq + 1));
  }
  options.random_settings = static_cast<int>(integer_option(parsed, "--settings", 3, 0));
  options.seed = static_cast<uint64_t>(integer_option(parsed, "--seed", 1, 0));
  const bool json = parsed.flag("--json");

  const ConformanceReport report = run_conformance(registry, *kind, name, options, [&](const ConformanceResult& r) {
    if (json) return;
    std::printf("%s  %-11s [%s] %s\n", r.passed ? "pass" : "FAIL", r.check.c_str(), r.setting.c_str(),
                r.detail.c_str());
    std::fflush(stdout);
  });
  const size_t failures = report.failures();
  if (json) {
    boost::json::array results;
    for (const auto& r : report.results)
      results.push_back({{"check", r.check}, {"setting", r.setting}, {"detail", r.detail}, {"passed", r.passed}});
    const boost::json::object o{{"plugin", report.name}, {"kind", plugin_kind_name(report.kind)},
                                {"file", report.file},   {"checks", report.results.size()},
                                {"failures", failures},  {"results", std::move(results)}};
    std::printf("%s\n", boost::json::serialize(o).c_str());
  } else {
    std::printf("%s '%s' (%s): %zu checks, %zu failed\n", plugin_kind_name(report.kind), report.name.c_str(),
                report.file.c_str(), report.results.size(), failures);
  }
  return failures == 0 ? kExitOk : kExitFailure;
}

}  // namespace moelab::cli

// moelab inspect: what the model a recipe describes is — parameters, active parameters per token,
// forward FLOPs per token — counted from the plugins' real parameter tensors.
#include <boost/json.hpp>
#include <fmt/format.h>

#include <cstdio>

#include "cli_util.hpp"
#include "moelab/moe_layer.hpp"
#include "moelab/recipe.hpp"
#include "moelab/registry.hpp"

namespace moelab::cli {
namespace {

struct Breakdown {
  int64_t router = 0, routed_experts = 0, shared_experts = 0, balancers = 0;
  double flops_per_token = 0;
  int64_t total() const { return router + routed_experts + shared_experts + balancers; }
};

std::string human(double n) {
  if (n >= 1e9) return fmt::format("{:.2f}B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.2f}M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.2f}K", n / 1e3);
  return fmt::format("{:.0f}", n);
}

}  // namespace

int cmd_inspect(const Args& args) {
  const ArgSpec spec{
      "moelab inspect RECIPE [--set KEY=VALUE]... [--json]",
      "Describes the MoE layer a recipe builds: total parameters, parameters active per token\n"
      "(router, top-k of the routed experts, shared experts) and forward FLOPs per token\n"
      "(2 per multiply-add). Counts come from the plugins' real parameter tensors.",
      {{"--set", "override a recipe key, VALUE parsed as TOML (repeatable)"}},
      {{"--json", "print the figures as JSON"}},
      1,
      1};
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  Recipe recipe = Recipe::load(parsed.positional[0], LoadOptions{parsed.all("--set")});
  PluginRegistry registry = PluginRegistry::with_default_path();
  const RunConfig config = build_config(recipe, registry);
  // Parameters are counted on the cpu kernel whatever the recipe's device: no GPU is needed.
  std::shared_ptr<Ops> ops = registry.make_kernel("cpu", defaults_of(registry.require(PluginKind::kernel, "cpu").schema));
  Rng rng(config.seed);
  MoeLayer layer(config.moe, config.layer, registry, *ops, rng);

  Breakdown b;
  for (const auto& [name, p] : layer.named_parameters()) {
    const int64_t n = p->value.numel();
    if (name.rfind("router.", 0) == 0) b.router += n;
    else if (name.rfind("experts.shared", 0) == 0) b.shared_experts += n;
    else if (name.rfind("experts.", 0) == 0) b.routed_experts += n;
    else b.balancers += n;
  }
  const LayerSpec& s = config.layer;
  const double k = static_cast<double>(s.top_k), experts = static_cast<double>(s.num_experts);
  const double active = static_cast<double>(b.router + b.shared_experts) + static_cast<double>(b.routed_experts) * k / experts;
  // Router GEMM, k routed experts, and the shared experts (2 FLOPs per weight they apply).
  b.flops_per_token = 2.0 * static_cast<double>(b.router) + k * layer.experts().flops_per_routed_token() +
                      2.0 * static_cast<double>(b.shared_experts);

  if (parsed.flag("--json")) {
    boost::json::object o;
    o["name"] = config.name;
    o["d_model"] = s.d_model;
    o["num_experts"] = s.num_experts;
    o["top_k"] = s.top_k;
    o["parameters"] = {{"total", b.total()}, {"router", b.router}, {"routed_experts", b.routed_experts},
                       {"shared_experts", b.shared_experts}, {"balancers", b.balancers}};
    o["active_parameters_per_token"] = active;
    o["forward_flops_per_token"] = b.flops_per_token;
    std::printf("%s\n", boost::json::serialize(o).c_str());
    return kExitOk;
  }
  std::printf("%s: one MoE layer, d_model %lld, %lld experts (%s), top-%lld, router %s\n", config.name.c_str(),
              static_cast<long long>(s.d_model), static_cast<long long>(s.num_experts), config.moe.experts.type.c_str(),
              static_cast<long long>(s.top_k), config.moe.router.type.c_str());
  std::printf("  %-28s %14s\n", "parameters", "count");
  std::printf("  %-28s %14lld  (%s)\n", "router", static_cast<long long>(b.router), human(static_cast<double>(b.router)).c_str());
  std::printf("  %-28s %14lld  (%s)\n", "routed experts", static_cast<long long>(b.routed_experts), human(static_cast<double>(b.routed_experts)).c_str());
  std::printf("  %-28s %14lld  (%s)\n", "shared experts", static_cast<long long>(b.shared_experts), human(static_cast<double>(b.shared_experts)).c_str());
  if (b.balancers) std::printf("  %-28s %14lld\n", "balancers", static_cast<long long>(b.balancers));
  std::printf("  %-28s %14lld  (%s)\n", "total", static_cast<long long>(b.total()), human(static_cast<double>(b.total())).c_str());
  std::printf("  %-28s %14.0f  (%s)\n", "active per token", active, human(active).c_str());
  std::printf("  %-28s %14.0f  (%s)\n", "forward FLOPs per token", b.flops_per_token, human(b.flops_per_token).c_str());
  return kExitOk;
}

}  // namespace moelab::cli

// moelab inspect: what the model a recipe describes is — parameters by part, active parameters per
// token, forward FLOPs per token and parameter memory — without allocating a weight: the MoE layer
// is built from its real plugins on the meta kernel, the transformer around it is counted by the
// formulas of model_shape.cpp. Works on a 671B-parameter recipe.
#include <fmt/format.h>

#include <boost/json.hpp>
#include <cmath>
#include <cstdio>
#include <optional>
#include <vector>

#include "cli_util.hpp"
#include "moelab/model_shape.hpp"
#include "moelab/recipe.hpp"
#include "moelab/registry.hpp"
#include "moelab/run_check.hpp"

namespace moelab::cli {
namespace {

constexpr int64_t kDefaultSeqLen = 4096;

std::string human(double n) {
  if (n >= 1e12) return fmt::format("{:.2f}T", n / 1e12);
  if (n >= 1e9) return fmt::format("{:.2f}B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.2f}M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.2f}K", n / 1e3);
  return fmt::format("{:.0f}", n);
}

std::string bytes(double n) {
  if (n >= 1024.0 * 1024 * 1024) return fmt::format("{:.2f} GiB", n / (1024.0 * 1024 * 1024));
  if (n >= 1024.0 * 1024) return fmt::format("{:.2f} MiB", n / (1024.0 * 1024));
  return fmt::format("{:.2f} KiB", n / 1024.0);
}

// The parts in report order, with their JSON names.
const std::vector<std::pair<const char*, double PartCounts::*>>& parts() {
  static const std::vector<std::pair<const char*, double PartCounts::*>> list{
      {"embeddings", &PartCounts::embeddings},
      {"attention", &PartCounts::attention},
      {"dense_ffn", &PartCounts::dense_ffn},
      {"routed_experts", &PartCounts::routed_experts},
      {"shared_experts", &PartCounts::shared_experts},
      {"routers", &PartCounts::routers},
      {"norms", &PartCounts::norms},
      {"head", &PartCounts::head},
      {"balancers", &PartCounts::balancers}};
  return list;
}

// Totals are whole numbers (and exact in a double up to 2^53): written as integers. Active
// counts are averages over tokens and may have a fraction (expert choice).
boost::json::value count_json(double n, bool whole) {
  if (whole) return static_cast<int64_t>(std::llround(n));
  return n;
}

boost::json::object parts_json(const PartCounts& counts, bool whole) {
  boost::json::object o;
  for (const auto& [name, part] : parts()) o[name] = count_json(counts.*part, whole);
  o["total"] = count_json(counts.sum(), whole);
  return o;
}

boost::json::object memory_json(double params) {
  return {
      {"f32", count_json(params * 4, true)}, {"bf16", count_json(params * 2, true)}, {"fp8", count_json(params, true)}};
}

}  // namespace

int cmd_inspect(const Args& args) {
  const ArgSpec spec{
      "moelab inspect RECIPE [--set KEY=VALUE]... [--point N] [--seq-len N] [--nproc N] [--json]",
      "Describes the model a recipe builds, without allocating it: total parameters, parameters\n"
      "active per token (all but the routed experts a token is not sent to), forward FLOPs per token\n"
      "(2 per multiply-add; attention scores with each query over N keys, default 4096) and parameter\n"
      "memory in f32, bf16 and fp8, broken down by embeddings, attention, dense FFN, routed experts,\n"
      "shared experts, routers, norms and head. The MoE layer's counts come from its real plugins built\n"
      "on the meta kernel; multi-token prediction modules are reported apart from the total. For a\n"
      "recipe with a [sweep], --point N describes its N-th run (the order `moelab show` lists).\n"
      "On several ranks ([parallel], or --nproc N) it checks the layout and adds what one rank\n"
      "holds: its parameters (its share of the routed experts) and a lower bound of its training\n"
      "memory (weights, gradients, AdamW state, saved activations, logits, corpus).",
      {{"--set", "override a recipe key, VALUE parsed as TOML (repeatable)"},
       {"--point", "describe the N-th run of a sweep (1-based)"},
       {"--seq-len", "keys each query attends to, for the attention-score FLOPs (default 4096)"},
       {"--nproc", "describe one of N ranks (mpirun -np N); default: the recipe's expert x data"}},
      {{"--json", "print the figures as JSON"}},
      1,
      1};
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  const int64_t seq_len = integer_option(parsed, "--seq-len", kDefaultSeqLen, 1);
  Recipe loaded = Recipe::load(parsed.positional[0], LoadOptions{parsed.all("--set")});
  std::vector<Recipe::SweepPoint> points = loaded.expand_sweep();
  const std::optional<size_t> point = sweep_point(parsed, points.size());
  if (!point && points.size() > 1)
    throw UsageError(
        fmt::format("{}: the recipe's [sweep] describes {} runs; name one with --point N (1 to {}; "
                    "moelab show lists them)",
                    parsed.positional[0], points.size(), points.size()));
  Recipe& recipe = *points[point.value_or(0)].recipe;
  PluginRegistry registry = PluginRegistry::with_default_path();
  const RunConfig config = build_config(recipe, registry);
  const MoeLayerCounts moe = count_moe_layer(config, registry);
  const ModelCounts counts = count_model(config.model, moe, seq_len);
  const ModelConfig& m = config.model;
  const LayerSpec& s = config.layer;
  const double total = counts.total.sum(), active = counts.active.sum();
  const double mtp_total = counts.mtp_total.sum(), mtp_active = counts.mtp_active.sum();
  const int64_t world = run_world(config.parallel, integer_option(parsed, "--nproc", 0, 1));
  check_parallel_layout(config, recipe, world);
  // The corpus is left out: inspect describes the model, and does not read the data.
  const MemoryEstimate rank = estimate_memory(config, registry, 0, world);
  const int64_t data_ranks = world / config.parallel.expert;

  if (parsed.flag("--json")) {
    boost::json::object o;
    o["name"] = config.name;
    if (point) o["sweep_point"] = {{"index", *point + 1}, {"of", points.size()}, {"label", points[*point].label}};
    o["architecture"] = architecture_name(m.architecture);
    o["attention"] = attention_name(m.attention);
    o["d_model"] = s.d_model;
    o["layers"] = {{"decoder", m.n_layers},
                   {"encoder", m.n_encoder_layers},
                   {"moe", counts.moe_layers},
                   {"dense", counts.dense_layers}};
    o["num_experts"] = s.num_experts;
    o["top_k"] = s.top_k;
    o["experts_per_token"] = moe.experts_per_token;
    o["seq_len"] = seq_len;
    o["parameters"] = parts_json(counts.total, true);
    o["active_parameters"] = parts_json(counts.active, false);
    o["total_parameters"] = count_json(total, true);
    o["active_parameters_per_token"] = active;
    // Published active counts differ on whether the input embedding (a lookup, no FLOPs) counts.
    o["active_parameters_without_embedding"] = active - counts.active.embeddings;
    o["forward_flops_per_token"] = counts.forward_flops_per_token;
    o["attention_score_flops_per_token"] = counts.attention_score_flops_per_token;
    o["memory_bytes"] = memory_json(total);
    o["per_rank"] = {{"ranks", world},
                     {"expert", config.parallel.expert},
                     {"data", data_ranks},
                     {"parameters", count_json(rank.parameters, true)},
                     {"training_memory_bytes",
                      {{"weights", count_json(rank.weights, true)},
                       {"gradients", count_json(rank.gradients, true)},
                       {"optimizer", count_json(rank.optimizer, true)},
                       {"gemm_copies", count_json(rank.gemm_copies, true)},
                       {"activations", count_json(rank.activations, true)},
                       {"logits", count_json(rank.logits, true)},
                       {"total", count_json(rank.total(), true)}}}};
    o["mtp"] = {{"modules", m.mtp_modules},
                {"parameters", parts_json(counts.mtp_total, true)},
                {"active_parameters", parts_json(counts.mtp_active, false)}};
    boost::json::object moe_layer{{"router", moe.router},
                                  {"routed_experts", moe.routed_experts},
                                  {"shared_experts", moe.shared_experts},
                                  {"balancers", moe.balancers}};
    boost::json::object names;
    for (const auto& [name, n] : moe.by_name) names[name] = n;
    moe_layer["by_name"] = std::move(names);
    o["moe_layer"] = std::move(moe_layer);
    if (config.reference.published_total_params > 0 || config.reference.published_active_params > 0)
      o["reference"] = {{"published_total_params", config.reference.published_total_params},
                        {"published_active_params", config.reference.published_active_params},
                        {"published_precision", config.reference.published_precision},
                        {"source", config.reference.source},
                        {"counts", config.reference.counts},
                        {"known_deviation", config.reference.known_deviation}};
    std::printf("%s\n", boost::json::serialize(o).c_str());
    return kExitOk;
  }

  std::printf(
      "%s: %s, %lld decoder%s layers (%lld MoE, %lld dense), d_model %lld, attention %s\n", config.name.c_str(),
      architecture_name(m.architecture), static_cast<long long>(m.n_layers),
      m.architecture == Architecture::encoder_decoder ? fmt::format(" + {} encoder", m.n_encoder_layers).c_str() : "",
      static_cast<long long>(counts.moe_layers), static_cast<long long>(counts.dense_layers),
      static_cast<long long>(s.d_model), attention_name(m.attention));
  if (point) std::printf("  sweep point %zu/%zu: %s\n", *point + 1, points.size(), points[*point].label.c_str());
  std::printf("  MoE: %lld experts (%s), top-%lld, router %s\n", static_cast<long long>(s.num_experts),
              config.moe.experts.type.c_str(), static_cast<long long>(s.top_k), config.moe.router.type.c_str());
  std::printf("  %-18s %18s %10s %18s %10s\n", "parameters", "total", "", "active per token", "");
  for (const auto& [name, part] : parts()) {
    if (counts.total.*part == 0 && counts.active.*part == 0) continue;
    std::printf("  %-18s %18.0f %10s %18.0f %10s\n", name, counts.total.*part, human(counts.total.*part).c_str(),
                counts.active.*part, human(counts.active.*part).c_str());
  }
  std::printf("  %-18s %18.0f %10s %18.0f %10s\n", "total", total, human(total).c_str(), active, human(active).c_str());
  if (m.mtp_modules > 0)
    std::printf("  %-18s %18.0f %10s %18.0f %10s  (not in the total above)\n",
                fmt::format("mtp x{}", m.mtp_modules).c_str(), mtp_total, human(mtp_total).c_str(), mtp_active,
                human(mtp_active).c_str());
  std::printf("  forward FLOPs per token: %.4g (%s), of which attention scores %.4g at %lld keys\n",
              counts.forward_flops_per_token, human(counts.forward_flops_per_token).c_str(),
              counts.attention_score_flops_per_token, static_cast<long long>(seq_len));
  std::printf("  parameter memory: f32 %s, bf16 %s, fp8 %s\n", bytes(total * 4).c_str(), bytes(total * 2).c_str(),
              bytes(total).c_str());
  std::printf(
      "  %s: %s parameters (%s), training memory at least %s (%s; corpus not counted)\n",
      world > 1 ? fmt::format("per rank of {} (expert {} x data {})", world, config.parallel.expert, data_ranks).c_str()
                : "one process",
      human(rank.parameters).c_str(),
      world > 1 && config.parallel.expert > 1
          ? fmt::format("1/{} of the routed experts", config.parallel.expert).c_str()
          : "every parameter",
      bytes(rank.total()).c_str(), rank.describe().c_str());
  if (config.reference.published_total_params > 0) {
    const double published = static_cast<double>(config.reference.published_total_params);
    std::printf("  published total %s: inspect %+.2f%%\n", human(published).c_str(), 100.0 * (total / published - 1));
  }
  if (config.reference.published_active_params > 0) {
    const double published = static_cast<double>(config.reference.published_active_params);
    std::printf("  published active %s: inspect %+.2f%%\n", human(published).c_str(), 100.0 * (active / published - 1));
  }
  return kExitOk;
}

}  // namespace moelab::cli

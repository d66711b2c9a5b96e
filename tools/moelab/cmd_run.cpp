// moelab run: validate every run of a recipe (sweeps expand to several), then train each into its
// own run folder, with a progress bar on a terminal and plain lines otherwise.
#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "cli_util.hpp"
#include "moelab/config.hpp"
#include "moelab/experiment.hpp"
#include "moelab/recipe.hpp"
#include "moelab/registry.hpp"

namespace moelab::cli {
namespace {

namespace fs = std::filesystem;

std::string clock_str(double seconds) {
  const auto s = static_cast<int64_t>(seconds + 0.5);
  return s >= 3600 ? fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60) : fmt::format("{}:{:02}", s / 60, s % 60);
}

struct PlannedRun {
  RunConfig config;
  std::string resolved;
  fs::path dir;
  std::string label;
};

// `moelab run` trains what experiment.cpp implements: one MoE layer on the built-in regression
// task. A recipe that describes a whole transformer (the published models, their companions)
// validates and inspects, but running it would silently train something else: refuse, and say why.
void refuse_untrainable(const RunConfig& config, const Recipe& recipe) {
  const ModelConfig& m = config.model;
  std::vector<std::string> parts;
  if (m.vocab_size > 0) parts.push_back(fmt::format("model.vocab_size = {}", m.vocab_size));
  if (m.n_layers != 1) parts.push_back(fmt::format("model.n_layers = {}", m.n_layers));
  if (m.n_encoder_layers > 0) parts.push_back(fmt::format("model.n_encoder_layers = {}", m.n_encoder_layers));
  if (m.attention != AttentionKind::none) parts.push_back("attention");
  if (m.d_ff > 0) parts.push_back(fmt::format("a dense FFN (model.d_ff = {})", m.d_ff));
  if (m.norm != NormKind::none) parts.push_back("norms");
  if (m.mtp_modules > 0) parts.push_back("multi-token prediction");
  if (parts.empty()) return;
  Diagnostics diagnostics;
  diagnostics.add(recipe.where("model"), "model",
                  fmt::format("this recipe describes a transformer ({}); `moelab run` trains one MoE layer on the "
                              "built-in regression task until the language-model trainer lands",
                              fmt::join(parts, ", ")),
                  "`moelab inspect` and `moelab check` work on it; to run the MoE layer alone, remove those keys");
  diagnostics.throw_if_any();
}

}  // namespace

int cmd_run(const Args& args) {
  const ArgSpec spec{
      "moelab run RECIPE [--set KEY=VALUE]... [--out DIR] [--overwrite]",
      "Trains what RECIPE describes and writes a run folder per run: OUT/NAME (or OUT/NAME/SWEEP_POINT\n"
      "for a [sweep]) holding recipe.toml (the resolved recipe, rerunnable as is), metrics.jsonl,\n"
      "summary.json and report.md. Every run of a sweep is validated before the first one starts.\n"
      "A run that fails leaves no folder behind.",
      {{"--set", "override a recipe key, VALUE parsed as TOML (repeatable): --set moe.top_k=1"},
       {"--out", "parent folder of the run folders (default: the recipe's output.dir, \"runs\")"}},
      {{"--overwrite", "replace existing run folders instead of refusing"}},
      1,
      1};
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  const Recipe recipe = Recipe::load(parsed.positional[0], LoadOptions{parsed.all("--set")});
  std::vector<PlannedRun> runs;
  Diagnostics all;
  for (const auto& point : recipe.expand_sweep()) {
    try {
      PluginRegistry registry = PluginRegistry::with_default_path();
      PlannedRun run;
      run.config = build_config(*point.recipe, registry);
      refuse_untrainable(run.config, *point.recipe);
      run.resolved = point.recipe->to_toml();
      const fs::path parent = parsed.option("--out") ? fs::path(*parsed.option("--out")) : run.config.output_dir;
      run.dir = parent / run.config.name;
      if (!point.slug.empty()) run.dir /= point.slug;
      run.label = point.label;
      runs.push_back(std::move(run));
    } catch (const UsageError& e) {
      if (e.diagnostics().empty()) throw;
      all.append(e.diagnostics());
    }
  }
  all.throw_if_any();
  for (const auto& run : runs) {
    if (fs::exists(run.dir) && !fs::is_empty(run.dir) && !parsed.flag("--overwrite"))
      throw UsageError(fmt::format("run folder {} exists and is not empty; pass --overwrite to replace it, or "
                                   "--out DIR to write elsewhere",
                                   run.dir.string()));
  }

  const bool tty = isatty(fileno(stderr)) != 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    const PlannedRun& run = runs[i];
    PluginRegistry registry = PluginRegistry::with_default_path();
    registry.scan(run.config.plugin_paths);
    std::fprintf(stderr, "run %zu/%zu: %s%s -> %s\n", i + 1, runs.size(), run.config.name.c_str(),
                 run.label.empty() ? "" : (" [" + run.label + "]").c_str(), run.dir.string().c_str());
    // Written beside the final folder and renamed into place, so a failure leaves nothing behind.
    const fs::path staging = run.dir.parent_path() / (run.dir.filename().string() + ".incomplete");
    fs::remove_all(staging);
    fs::create_directories(staging);
    RunResult result;
    try {
      const int64_t log_every = run.config.train.log_every;
      result = run_experiment(run.config, run.resolved, registry, staging, [&](const ProgressUpdate& u) {
        if (tty) {
          const double done = static_cast<double>(u.step) / static_cast<double>(u.steps);
          const int width = 30, filled = static_cast<int>(done * width);
          std::fprintf(stderr, "\r  [%s%s] step %lld/%lld  loss %.5f  %.0f tok/s  %s left   ",
                       std::string(static_cast<size_t>(filled), '#').c_str(),
                       std::string(static_cast<size_t>(width - filled), '.').c_str(), static_cast<long long>(u.step),
                       static_cast<long long>(u.steps), u.loss, u.tokens_per_second, clock_str(u.seconds_left).c_str());
          if (u.step == u.steps) std::fputc('\n', stderr);
        } else if (u.step % log_every == 0 || u.step == u.steps) {
          std::fprintf(stderr, "  step %lld/%lld  loss %.5f  %.0f tok/s  %s left\n", static_cast<long long>(u.step),
                       static_cast<long long>(u.steps), u.loss, u.tokens_per_second, clock_str(u.seconds_left).c_str());
        }
      });
    } catch (...) {
      std::error_code ignored;
      fs::remove_all(staging, ignored);
      throw;
    }
    fs::remove_all(run.dir);
    fs::rename(staging, run.dir);
    std::printf("%s: eval loss %.5f (floor %.5f), dropped %.2f%% in training / %.2f%% in eval, MaxVio %.3f, "
                "dead experts %lld, %.1f s\n",
                run.dir.string().c_str(), result.final_eval_loss, result.loss_floor,
                100.0 * result.train_drop_fraction, 100.0 * result.drop_fraction,
                result.max_violation, static_cast<long long>(result.dead_experts), result.seconds);
  }
  return kExitOk;
}

}  // namespace moelab::cli

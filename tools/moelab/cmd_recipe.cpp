// moelab check / moelab show: load a recipe, expand its sweep, validate every point.
#include <fmt/format.h>

#include <algorithm>
#include <boost/json.hpp>
#include <cmath>
#include <cstdio>
#include <string>
#include <unordered_map>

#include "cli_util.hpp"
#include "moelab/config.hpp"
#include "moelab/recipe.hpp"
#include "moelab/registry.hpp"
#include "moelab/run_check.hpp"

namespace moelab::cli {

namespace {

const std::pair<std::string, std::string> kSetOption{
    "--set", "override a recipe key, VALUE parsed as TOML; a bare word is a string (repeatable): --set moe.top_k=4"};

struct Validation {
  std::vector<Recipe::SweepPoint> points;  // each point's recipe has its defaults filled in
  Diagnostics diagnostics;
};

// Loads `file`, expands its sweep and validates every point: its schema (build_config), then, when
// `run_check` is given, what a run needs beyond it (check_run: a trainable model, its data,
// memory). A problem shared by every point is reported once; one that only some points have names
// them in its note.
Validation validate(const std::string& file, const std::vector<std::string>& overrides, const CheckOptions* run_check) {
  Validation out;
  try {
    const Recipe recipe = Recipe::load(file, LoadOptions{overrides});
    out.points = recipe.expand_sweep();
  } catch (const UsageError& e) {
    if (e.diagnostics().empty()) throw;
    out.diagnostics = e.diagnostics();
    return out;
  }
  // One registry for all points: build_config scans a recipe's [plugins] paths into it, and a
  // folder already scanned is not scanned again.
  PluginRegistry registry = PluginRegistry::with_default_path();
  std::vector<std::pair<Diagnostic, std::vector<std::string>>> found;  // (problem, labels of its points)
  std::unordered_map<std::string, size_t> index;                       // formatted problem -> its place in found
  for (auto& point : out.points) {
    try {
      const RunConfig config = build_config(*point.recipe, registry);
      if (run_check) check_run(config, *point.recipe, registry, *run_check);
    } catch (const UsageError& e) {
      if (e.diagnostics().empty()) throw;
      for (const auto& d : e.diagnostics().items()) {
        const auto [at, fresh] = index.try_emplace(d.format(), found.size());
        if (fresh)
          found.push_back({d, {point.label}});
        else
          found[at->second].second.push_back(point.label);
      }
    }
  }
  for (auto& [d, labels] : found) {
    Diagnostic shown = d;
    if (out.points.size() > 1 && labels.size() < out.points.size()) {
      std::string which = labels.size() == 1 ? fmt::format("in sweep point {}", labels[0])
                                             : fmt::format("in {} of {} sweep points, first {}", labels.size(),
                                                           out.points.size(), labels[0]);
      shown.note = shown.note.empty() ? which : shown.note + "; " + which;
    }
    out.diagnostics.add(std::move(shown));
  }
  return out;
}

std::string json_string(const std::string& text) {
  return boost::json::serialize(boost::json::string(text));
}

std::string json_report(const Validation& v) {
  // runs: how many runs the recipe describes (0 when it could not even be loaded).
  std::string out =
      fmt::format("{{\"ok\":{},\"runs\":{},\"errors\":[", v.diagnostics.empty() ? "true" : "false", v.points.size());
  bool first = true;
  for (const auto& d : v.diagnostics.items()) {
    out += fmt::format("{}{{\"file\":{},\"line\":{},\"column\":{},\"key\":{},\"message\":{},\"hint\":{},\"note\":{}}}",
                       first ? "" : ",", json_string(d.where.file), d.where.line, d.where.column, json_string(d.key),
                       json_string(d.message), json_string(d.hint), json_string(d.note));
    first = false;
  }
  return out + "]}\n";
}

}  // namespace

int cmd_check(const Args& args) {
  const ArgSpec spec{
      "moelab check RECIPE [--set KEY=VALUE]... [--memory-gib N] [--nproc N] [--json]",
      "Loads RECIPE (its extends, overrides and references), expands its [sweep] and validates every\n"
      "run against the core schema and the schemas of the plugins it names, then what `run` needs\n"
      "beyond them: a model the trainer supports, data files that exist, match their globs and fit the\n"
      "vocabulary, and memory: a lower bound of what the run allocates (weights, gradients, AdamW state,\n"
      "one step's saved activations and logits, the corpus) must fit this machine's memory; and the\n"
      "[parallel] layout against the ranks (--nproc N, or expert x data), the experts and the batch.\n"
      "Prints 'RECIPE: ok (N runs)' and exits 0, or prints every problem as\n"
      "file:line:column: error: key: message and exits 2.",
      {kSetOption,
       {"--memory-gib", "check the memory estimate against N GiB instead of this machine's memory"},
       {"--nproc", "check the run on N ranks (mpirun -np N); default: the recipe's expert x data"}},
      {{"--json", "print {\"ok\", \"runs\", \"errors\": [{file, line, column, key, message, hint, note}]}"}},
      1,
      1};
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  const std::string& file = parsed.positional[0];
  CheckOptions options;
  if (const auto gib = parsed.option("--memory-gib")) {
    size_t used = 0;
    double value = 0;
    try {
      value = std::stod(*gib, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != gib->size() || !(value > 0) || !std::isfinite(value))
      throw UsageError(fmt::format("--memory-gib: expected a positive number of GiB, got '{}'", *gib));
    options.memory_bytes = value * 1024 * 1024 * 1024;
  }
  options.world = integer_option(parsed, "--nproc", 0, 1);
  const Validation v = validate(file, parsed.all("--set"), &options);
  if (parsed.flag("--json")) {
    std::fputs(json_report(v).c_str(), stdout);
    return v.diagnostics.empty() ? kExitOk : kExitUsage;
  }
  v.diagnostics.throw_if_any();
  std::printf("%s: ok (%zu run%s)\n", file.c_str(), v.points.size(), v.points.size() == 1 ? "" : "s");
  return kExitOk;
}

int cmd_show(const Args& args) {
  const ArgSpec spec{"moelab show RECIPE [--set KEY=VALUE]... [--point N]",
                     "Prints the recipe as it will run: extends merged, overrides applied, references resolved and\n"
                     "every default filled in, plugin parameters included. For a [sweep], prints each run under a\n"
                     "comment naming its swept values; --point N prints only the N-th (from 1).",
                     {kSetOption, {"--point", "print only the N-th run of a sweep (1-based)"}},
                     {},
                     1,
                     1};
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  // show prints any recipe the schema accepts, a model too large to train here included.
  const Validation v = validate(parsed.positional[0], parsed.all("--set"), nullptr);
  v.diagnostics.throw_if_any();

  size_t first = 0, last = v.points.size();
  if (const auto point = sweep_point(parsed, v.points.size())) {
    first = *point;
    last = *point + 1;
  }
  const bool sweep = v.points.size() > 1 || !v.points.front().label.empty();
  std::string out;
  for (size_t i = first; i < last; ++i) {
    if (sweep)
      out += fmt::format("{}# point {}/{}: {} (folder {})\n", i == first ? "" : "\n", i + 1, v.points.size(),
                         v.points[i].label, v.points[i].slug);
    out += v.points[i].recipe->to_toml();
  }
  std::fputs(out.c_str(), stdout);
  return kExitOk;
}

}  // namespace moelab::cli

// moelab plugins [--describe NAME] [--json]: what the search path holds, each plugin's parameters
// from its own schema, and every file that could not be used (as warnings, and in the JSON).
#include <fmt/format.h>

#include <boost/json.hpp>
#include <cmath>
#include <cstdio>
#include <string>
#include <variant>
#include <vector>

#include "cli_util.hpp"
#include "commands.hpp"
#include "moelab/config.hpp"
#include "moelab/recipe.hpp"
#include "moelab/registry.hpp"

namespace moelab::cli {
namespace {

std::string number_str(double value) {
  if (std::isfinite(value) && value == std::floor(value) && std::fabs(value) < 1e15)
    return fmt::format("{}", static_cast<int64_t>(value));
  return fmt::format("{}", value);
}

// "[1, 256]", ">= 0", "<= 1", "one of: drop, reroute", or "" when the type alone constrains it.
std::string constraint_str(const ParamSpec& spec) {
  std::string out;
  if (spec.min && spec.max)
    out = fmt::format("{}{}, {}]", spec.min_exclusive ? "(" : "[", number_str(*spec.min), number_str(*spec.max));
  else if (spec.min)
    out = fmt::format("{} {}", spec.min_exclusive ? ">" : ">=", number_str(*spec.min));
  else if (spec.max)
    out = fmt::format("<= {}", number_str(*spec.max));
  if (!spec.choices.empty()) {
    if (!out.empty()) out += ", ";
    out += fmt::format("one of: {}", fmt::join(spec.choices, ", "));
  }
  return out;
}

std::string default_str(const ParamSpec& spec) {
  return spec.default_value ? param_value_str(*spec.default_value) : std::string("(required)");
}

// Where a recipe names a plugin of this kind.
const char* recipe_table(PluginKind kind) {
  switch (kind) {
    case PluginKind::router:
      return "[moe.router]";
    case PluginKind::experts:
      return "[moe.experts]";
    case PluginKind::balancer:
      return "[[moe.balancers]]";
    case PluginKind::kernel:
      return "[kernel]";
    case PluginKind::comm:
      return "[parallel] comm";
  }
  return "";
}

boost::json::value param_value_json(const ParamValue& value) {
  return std::visit(
      [](const auto& v) -> boost::json::value {
        using V = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<V, std::string>) {
          return boost::json::value(v);
        } else if constexpr (std::is_same_v<V, bool> || std::is_same_v<V, int64_t> || std::is_same_v<V, double>) {
          return boost::json::value(v);
        } else {
          boost::json::array items;
          for (const auto& item : v) {
            if constexpr (std::is_same_v<std::decay_t<decltype(item)>, std::string>)
              items.emplace_back(boost::json::string(item));
            else
              items.emplace_back(item);
          }
          return items;
        }
      },
      value);
}

boost::json::object plugin_json(const PluginInfo& p) {
  boost::json::array params;
  for (const ParamSpec& spec : p.schema) {
    boost::json::object param{
        {"name", spec.name},
        {"type", param_type_name(spec.type)},
        {"required", !spec.default_value.has_value()},
        {"default", spec.default_value ? param_value_json(*spec.default_value) : boost::json::value(nullptr)},
        {"min", spec.min ? boost::json::value(*spec.min) : boost::json::value(nullptr)},
        {"min_exclusive", spec.min_exclusive},
        {"max", spec.max ? boost::json::value(*spec.max) : boost::json::value(nullptr)},
        {"doc", spec.doc},
    };
    boost::json::array choices;
    for (const std::string& c : spec.choices) choices.emplace_back(boost::json::string(c));
    param["choices"] = std::move(choices);
    params.emplace_back(std::move(param));
  }
  return boost::json::object{
      {"kind", plugin_kind_name(p.kind)},
      {"name", p.name},
      {"version", p.version},
      {"description", p.description},
      {"abi", fmt::format("{}.{}", p.abi_major, p.abi_minor)},
      {"file", p.file.string()},
      {"params", std::move(params)},
  };
}

std::string registry_json(const PluginRegistry& registry, const std::vector<const PluginInfo*>& shown) {
  boost::json::array search_path, plugins, problems, missing;
  for (const auto& folder : registry.searched()) search_path.emplace_back(boost::json::string(folder.string()));
  for (const PluginProblem& folder : registry.missing_folders())
    missing.emplace_back(boost::json::object{{"folder", folder.file.string()}, {"reason", folder.reason}});
  for (const PluginInfo* p : shown) plugins.emplace_back(plugin_json(*p));
  for (const PluginProblem& problem : registry.problems())
    problems.emplace_back(boost::json::object{
        {"file", problem.file.string()}, {"reason", problem.reason}, {"duplicate", problem.duplicate}});
  boost::json::object root{{"abi", fmt::format("{}.{}", kAbiMajor, kAbiMinor)},
                           {"search_path", std::move(search_path)},
                           {"plugins", std::move(plugins)},
                           {"problems", std::move(problems)},
                           {"missing_folders", std::move(missing)}};
  return boost::json::serialize(root);
}

// The listing: one block per plugin, its parameters beneath it as a small table.
std::string listing_text(const PluginRegistry& registry) {
  std::string out;
  const auto plugins = registry.all();
  if (plugins.empty()) out += "no plugins found\n";
  for (const PluginInfo* p : plugins) {
    out += fmt::format("{:<9} {} {}  {}\n", plugin_kind_name(p->kind), p->name, p->version, p->description);
    out += fmt::format("          {}\n", p->file.string());
    size_t name_width = 4, type_width = 4, default_width = 7;
    for (const ParamSpec& spec : p->schema) {
      name_width = std::max(name_width, spec.name.size());
      type_width = std::max(type_width, std::string(param_type_name(spec.type)).size());
      default_width = std::max(default_width, default_str(spec).size());
    }
    for (const ParamSpec& spec : p->schema) {
      std::string line =
          fmt::format("          {:<{}}  {:<{}}  {:<{}}  {}", spec.name, name_width, param_type_name(spec.type),
                      type_width, default_str(spec), default_width, spec.doc);
      if (std::string c = constraint_str(spec); !c.empty()) line += fmt::format(" ({})", c);
      out += line + "\n";
    }
  }
  out += "\nsearched:\n";
  for (const auto& folder : registry.searched()) out += fmt::format("  {}\n", folder.string());
  return out;
}

std::string describe_text(const PluginInfo& p) {
  std::string out = fmt::format("{} {} {}\n  {}\n\n", plugin_kind_name(p.kind), p.name, p.version, p.description);
  out += fmt::format("file: {}\nABI:  {}.{}\n\n", p.file.string(), p.abi_major, p.abi_minor);
  if (p.schema.empty()) {
    out += "parameters: none\n";
  } else {
    out += "parameters:\n";
    for (const ParamSpec& spec : p.schema) {
      out += fmt::format("  {} ({}, {}", spec.name, param_type_name(spec.type),
                         spec.default_value ? "default " + param_value_str(*spec.default_value) : "required");
      if (std::string c = constraint_str(spec); !c.empty()) out += ", " + c;
      out += fmt::format(")\n      {}\n", spec.doc);
    }
  }
  out += fmt::format("\nin a recipe:\n  {}\n  type = \"{}\"\n", recipe_table(p.kind), p.name);
  for (const ParamSpec& spec : p.schema)
    out += spec.default_value ? fmt::format("  {} = {}\n", spec.name, param_value_str(*spec.default_value))
                              : fmt::format("  {} = ...  # required\n", spec.name);
  return out;
}

}  // namespace

int cmd_plugins(const Args& args) {
  const ArgSpec spec{
      .usage = "moelab plugins [--recipe RECIPE] [--describe NAME] [--json]",
      .description =
          "Lists every plugin in the search path (this installation's plugin folder, then each folder in\n"
          "MOELAB_PLUGIN_PATH, ':'-separated, then with --recipe the recipe's [plugins] paths): kind, name,\n"
          "version, file, description and parameters. Files that could not be used, and folders that do\n"
          "not exist, are reported as warnings on stderr.",
      .options = {{"--describe", "show the plugin named VALUE in full (every kind with that name)"},
                  {"--recipe", "also search the [plugins] paths of the recipe VALUE (its first run, for a sweep)"}},
      .flags = {{"--json", "print JSON: search_path, plugins (with params) and problems"}},
      .min_positional = 0,
      .max_positional = 0,
  };
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }

  PluginRegistry registry = PluginRegistry::with_default_path();
  if (const auto recipe_file = parsed.option("--recipe")) {
    // build_config scans the recipe's [plugins] paths before it checks anything else; what else is
    // wrong with the recipe is `moelab check`'s to say, not this listing's.
    auto points = Recipe::load(*recipe_file).expand_sweep();
    try {
      build_config(*points.front().recipe, registry);
    } catch (const UsageError&) {
    }
  }
  std::vector<const PluginInfo*> shown = registry.all();  // opens every library: their problems show now
  for (const PluginProblem& folder : registry.missing_folders())
    std::fprintf(stderr, "moelab: warning: %s: %s\n", folder.reason.c_str(), folder.file.string().c_str());
  for (const PluginProblem& problem : registry.problems()) {
    // Reasons that already name the file (ABI mismatches, duplicates) are not prefixed with it again.
    const std::string file = problem.file.string();
    if (problem.reason.find(file) != std::string::npos)
      std::fprintf(stderr, "moelab: warning: %s\n", problem.reason.c_str());
    else
      std::fprintf(stderr, "moelab: warning: %s: %s\n", file.c_str(), problem.reason.c_str());
  }

  const auto describe = parsed.option("--describe");
  if (describe) {
    std::vector<const PluginInfo*> matches;
    std::vector<std::string> known;
    for (const PluginInfo* p : shown) {
      if (p->name == *describe) matches.push_back(p);
      known.push_back(p->name);
    }
    if (matches.empty()) {
      std::string message = fmt::format("no plugin named '{}'", *describe);
      message += known.empty() ? std::string("; no plugins were found")
                               : fmt::format("; known plugins: {}", fmt::join(known, ", "));
      if (std::string near = nearest_name(*describe, known); !near.empty())
        message += fmt::format("; did you mean '{}'?", near);
      throw UsageError(message);
    }
    shown = std::move(matches);
  }

  if (parsed.flag("--json")) {
    std::printf("%s\n", registry_json(registry, shown).c_str());
  } else if (describe) {
    for (size_t i = 0; i < shown.size(); ++i) std::printf("%s%s", i ? "\n" : "", describe_text(*shown[i]).c_str());
  } else {
    std::fputs(listing_text(registry).c_str(), stdout);
  }
  return kExitOk;
}

}  // namespace moelab::cli

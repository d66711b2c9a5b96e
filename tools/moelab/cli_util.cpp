#include "cli_util.hpp"

#include <fmt/format.h>

#include <cstdio>
#include <exception>

#include "cli_parallel.hpp"
#include "moelab/error.hpp"

namespace moelab::cli {

std::optional<std::string> ParsedArgs::option(const std::string& name) const {
  auto it = options.find(name);
  if (it == options.end() || it->second.empty()) return std::nullopt;
  return it->second.back();
}

std::vector<std::string> ParsedArgs::all(const std::string& name) const {
  auto it = options.find(name);
  return it == options.end() ? std::vector<std::string>{} : it->second;
}

ParsedArgs parse_args(const ArgSpec& spec, const Args& args) {
  ParsedArgs out;
  auto is_option = [&](const std::string& n) {
    for (const auto& [name, doc] : spec.options)
      if (name == n) return true;
    return false;
  };
  auto is_flag = [&](const std::string& n) {
    for (const auto& [name, doc] : spec.flags)
      if (name == n) return true;
    return false;
  };
  const std::string usage_hint = fmt::format("usage: {}  (see --help)", spec.usage);
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      out.help = true;
      continue;
    }
    if (a.size() > 1 && a[0] == '-') {
      std::string name = a, value;
      bool has_value = false;
      if (auto eq = a.find('='); eq != std::string::npos && a.rfind("--", 0) == 0) {
        name = a.substr(0, eq);
        value = a.substr(eq + 1);
        has_value = true;
      }
      if (is_flag(name) && !has_value) {
        out.flags[name] = true;
        continue;
      }
      if (is_option(name)) {
        if (!has_value) {
          if (i + 1 >= args.size()) throw UsageError(fmt::format("option {} needs a value; {}", name, usage_hint));
          value = args[++i];
        }
        out.options[name].push_back(value);
        continue;
      }
      throw UsageError(fmt::format("unknown option '{}'; {}", a, usage_hint));
    }
    out.positional.push_back(a);
  }
  if (!out.help) {
    if (out.positional.size() < spec.min_positional) throw UsageError(fmt::format("missing argument; {}", usage_hint));
    if (out.positional.size() > spec.max_positional)
      throw UsageError(fmt::format("unexpected argument '{}'; {}", out.positional[spec.max_positional], usage_hint));
  }
  return out;
}

std::string help_text(const ArgSpec& spec) {
  std::string out = fmt::format("usage: {}\n\n{}\n", spec.usage, spec.description);
  if (!spec.options.empty() || !spec.flags.empty()) out += "\noptions:\n";
  for (const auto& [name, doc] : spec.options) out += fmt::format("  {:<22} {}\n", name + " VALUE", doc);
  for (const auto& [name, doc] : spec.flags) out += fmt::format("  {:<22} {}\n", name, doc);
  out += fmt::format("  {:<22} {}\n", "--help", "show this help");
  return out;
}

std::optional<size_t> sweep_point(const ParsedArgs& parsed, size_t points) {
  const auto text = parsed.option("--point");
  if (!text) return std::nullopt;
  size_t n = 0, used = 0;
  try {
    n = std::stoul(*text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text->size() || n < 1 || n > points)
    throw UsageError(fmt::format("--point expects a number from 1 to {} (the recipe has {} run{}), got '{}'", points,
                                 points, points == 1 ? "" : "s", *text));
  return n - 1;
}

void print_error(const std::string& message) {
  std::string text = message;
  while (!text.empty() && text.back() == '\n') text.pop_back();
  if (Comm* world = abort_world(); world != nullptr && world->size() > 1)
    std::fprintf(stderr, "moelab: rank %d of %d: error: %s\n", world->rank(), world->size(), text.c_str());
  else
    std::fprintf(stderr, "moelab: error: %s\n", text.c_str());
}

constexpr size_t kShownErrors = 50;

namespace {

// Runs body; an exception is printed and becomes the exit code, with `threw` set.
int reported(const std::function<int()>& body, bool& threw) {
  threw = true;
  try {
    const int code = body();
    threw = false;
    return code;
  } catch (const UsageError& e) {
    if (!e.diagnostics().empty()) {
      // The first kShownErrors, then a count: thousands of lines help nobody, and the first few
      // usually explain the rest (`moelab check --json` lists them all).
      const auto& items = e.diagnostics().items();
      for (size_t i = 0; i < items.size() && i < kShownErrors; ++i)
        std::fprintf(stderr, "%s\n", items[i].format().c_str());
      if (items.size() > kShownErrors)
        std::fprintf(stderr, "moelab: %zu more errors not shown (moelab check --json lists every one)\n",
                     items.size() - kShownErrors);
      std::fprintf(stderr, "moelab: %zu error%s\n", items.size(), items.size() == 1 ? "" : "s");
    } else {
      print_error(e.what());
    }
    return kExitUsage;
  } catch (const RuntimeError& e) {
    print_error(e.what());
    return kExitFailure;
  } catch (const std::exception& e) {
    print_error(fmt::format("unexpected failure: {}", e.what()));
    return kExitFailure;
  }
}

}  // namespace

int guarded(const std::function<int()>& body) {
  bool threw = false;
  const int code = reported(body, threw);
  // A rank of a parallel run that failed while training ends every rank: the others would wait
  // for it in their next collective forever.
  if (Comm* world = abort_world(); threw && world != nullptr && world->size() > 1) {
    std::fflush(stderr);
    world->abort(code);
  }
  return code;
}

int64_t integer_option(const ParsedArgs& parsed, const std::string& option, int64_t fallback, int64_t low) {
  const auto text = parsed.option(option);
  if (!text) return fallback;
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(*text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text->size() || value < low)
    throw UsageError(fmt::format("{}: expected an integer >= {}, got '{}'", option, low, *text));
  return value;
}

}  // namespace moelab::cli

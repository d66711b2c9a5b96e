// Small helpers every subcommand shares: argument parsing, error reporting, exit codes.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "commands.hpp"

namespace moelab::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // a failure while running
inline constexpr int kExitUsage = 2;    // bad usage or a bad recipe

// Declares what a subcommand accepts. Options take a value ("--set a=1", "--set=a=1"); flags do
// not ("--json"). Repeated options accumulate.
struct ArgSpec {
  std::string usage;                                         // "moelab check RECIPE [--set KEY=VALUE]... [--json]"
  std::string description;                                   // a paragraph for --help
  std::vector<std::pair<std::string, std::string>> options;  // ("--set", "KEY=VALUE  override ...")
  std::vector<std::pair<std::string, std::string>> flags;    // ("--json", "machine-readable output")
  size_t min_positional = 0, max_positional = 0;
};

struct ParsedArgs {
  std::vector<std::string> positional;
  std::map<std::string, std::vector<std::string>> options;
  std::map<std::string, bool> flags;
  bool help = false;

  bool flag(const std::string& name) const {
    auto it = flags.find(name);
    return it != flags.end() && it->second;
  }
  std::optional<std::string> option(const std::string& name) const;  // the last value given
  std::vector<std::string> all(const std::string& name) const;
};

// Parses or throws UsageError naming the bad argument and pointing at --help.
ParsedArgs parse_args(const ArgSpec& spec, const Args& args);
std::string help_text(const ArgSpec& spec);

// Runs `body`, turning UsageError into a message and exit 2, RuntimeError and other exceptions
// into a message and exit 1. Nothing escapes as an abort.
int guarded(const std::function<int()>& body);

// The 0-based index of the sweep point `--point N` names (N from 1 to `points`), or nullopt when
// the option is absent; throws UsageError for anything else.
std::optional<size_t> sweep_point(const ParsedArgs& parsed, size_t points);

// Prints "moelab: error: ..." lines to stderr.
void print_error(const std::string& message);

// The integer value of `option` (fallback when absent); UsageError "OPTION: expected an integer
// >= LOW, got 'TEXT'" for text that is not one.
int64_t integer_option(const ParsedArgs& parsed, const std::string& option, int64_t fallback, int64_t low);

}  // namespace moelab::cli

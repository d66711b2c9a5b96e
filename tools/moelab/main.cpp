// moelab: the command line. Each subcommand lives in its own cmd_*.cpp.
#include <fmt/format.h>

#include <cstdio>
#include <string>

#include "cli_util.hpp"
#include "commands.hpp"

namespace {

struct Subcommand {
  const char* name;
  int (*run)(const moelab::cli::Args&);
  const char* summary;
};

const Subcommand kSubcommands[] = {
    {"run", moelab::cli::cmd_run, "train or evaluate what a recipe describes"},
    {"reshard", moelab::cli::cmd_reshard, "convert a run's checkpoint to another split of its experts"},
    {"check", moelab::cli::cmd_check, "validate a recipe (every error, with file:line:column)"},
    {"show", moelab::cli::cmd_show, "print the fully resolved recipe"},
    {"inspect", moelab::cli::cmd_inspect, "what the model is: parameters, active parameters, FLOPs"},
    {"layer", moelab::cli::cmd_layer, "run one MoE layer on a tensor file, weights from safetensors"},
    {"plugins", moelab::cli::cmd_plugins, "list the plugins found, or describe one"},
    {"new", moelab::cli::cmd_new, "scaffold an out-of-tree plugin project"},
    {"test-plugin", moelab::cli::cmd_test_plugin, "run the conformance kit (gradients, contracts) on a plugin"},
    {"version", moelab::cli::cmd_version, "print the version and plugin ABI"},
};

void print_usage(std::FILE* to) {
  std::fprintf(to,
               "usage: moelab <command> [arguments] [--help]\n\n"
               "moelab: a framework for Mixture-of-Experts research.\n\ncommands:\n");
  for (const auto& s : kSubcommands) std::fprintf(to, "  %-10s %s\n", s.name, s.summary);
  std::fprintf(to, "\n'moelab <command> --help' describes each command.\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(stderr);
    return moelab::cli::kExitUsage;
  }
  const std::string command = argv[1];
  if (command == "--help" || command == "-h" || command == "help") {
    print_usage(stdout);
    return moelab::cli::kExitOk;
  }
  if (command == "--version") return moelab::cli::cmd_version({});
  moelab::cli::Args args(argv + 2, argv + argc);
  for (const auto& s : kSubcommands)
    if (command == s.name) return moelab::cli::guarded([&] { return s.run(args); });
  moelab::cli::print_error(fmt::format("unknown command '{}'; run 'moelab --help' for the list", command));
  return moelab::cli::kExitUsage;
}

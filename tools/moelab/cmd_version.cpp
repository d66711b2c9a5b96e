#include <cstdio>

#include "cli_util.hpp"
#include "moelab/plugin.hpp"

namespace moelab::cli {

int cmd_version(const Args& args) {
  const ArgSpec spec{"moelab version", "Prints moelab's version and the plugin ABI it speaks.", {}, {}, 0, 0};
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  std::printf("moelab %s (plugin ABI %u.%u)\n", MOELAB_VERSION, kAbiMajor, kAbiMinor);
  return kExitOk;
}

}  // namespace moelab::cli

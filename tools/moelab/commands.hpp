// The `moelab` subcommands. Each returns the process exit status: 0 success, 2 bad usage or a bad
// recipe, 1 a failure while running. Each handles --help itself.
#pragma once

#include <string>
#include <vector>

namespace moelab::cli {

using Args = std::vector<std::string>;  // the arguments after the subcommand's name

int cmd_run(const Args& args);
int cmd_reshard(const Args& args);
int cmd_check(const Args& args);
int cmd_show(const Args& args);
int cmd_inspect(const Args& args);
int cmd_plugins(const Args& args);
int cmd_new(const Args& args);
int cmd_layer(const Args& args);
int cmd_test_plugin(const Args& args);
int cmd_version(const Args& args);

}  // namespace moelab::cli

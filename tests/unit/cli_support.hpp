// Running the built `moelab` binary from a test, as a user would.
#pragma once

#include <doctest/doctest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <string>

namespace moelab::test {

inline const std::filesystem::path kMoelab = std::filesystem::path(MOELAB_BINARY_DIR) / "bin" / "moelab";

struct CommandResult {
  int status = -1;
  std::string output;
};

// Runs a shell command line as given; its stdout, and its exit status (-1 when killed).
inline CommandResult run_shell(const std::string& command) {
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  CommandResult result;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof buffer, pipe)) > 0) result.output.append(buffer, n);
  const int status = pclose(pipe);
  result.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

// Runs `moelab ARGUMENTS` with stderr folded into stdout (or discarded, for --json).
inline CommandResult run_moelab(const std::string& arguments, bool with_stderr = true) {
  REQUIRE_MESSAGE(std::filesystem::exists(kMoelab), kMoelab << " is not built");
  return run_shell("'" + kMoelab.string() + "' " + arguments + (with_stderr ? " 2>&1" : " 2>/dev/null"));
}

inline std::string quoted(const std::filesystem::path& path) {
  return "'" + path.string() + "'";
}

}  // namespace moelab::test

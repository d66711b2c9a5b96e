// Errors and diagnostics. Every user mistake becomes a Diagnostic with a place and a key; the CLI
// prints them all and exits 2. Failures while running (I/O, numerics) are RuntimeError, exit 1.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace moelab {

// Where a value came from: a file position, or a pseudo-file such as "<--set>".
struct SourceLocation {
  std::string file;  // empty when unknown
  int line = 0;      // 1-based; 0 when unknown
  int column = 0;    // 1-based; 0 when unknown

  bool known() const { return !file.empty(); }
  std::string str() const;  // "file:line:column", "file" or "<unknown>"
};

struct Diagnostic {
  SourceLocation where;
  std::string key;      // dotted key, e.g. "moe.router.top_k"; empty for file-level problems
  std::string message;  // what is wrong and what was expected
  std::string hint;     // optional: "did you mean 'top_k'?", "known routers: ..."
  std::string note;     // optional: e.g. "set in configs/base.toml, merged into recipes/a.toml"

  // "file:line:col: error: key: message (hint) [note]" on one line.
  std::string format() const;
};

class Diagnostics {
 public:
  void add(Diagnostic d) { items_.push_back(std::move(d)); }
  void add(SourceLocation where, std::string key, std::string message, std::string hint = {});
  bool empty() const { return items_.empty(); }
  size_t size() const { return items_.size(); }
  const std::vector<Diagnostic>& items() const { return items_; }
  void append(const Diagnostics& other);
  std::string format() const;  // one line per diagnostic
  // Throws UsageError carrying every diagnostic when any were added.
  void throw_if_any() const;

 private:
  std::vector<Diagnostic> items_;
};

// A mistake of the user's: bad recipe, bad flag, unknown plugin, malformed input file. Exit 2.
class UsageError : public std::runtime_error {
 public:
  explicit UsageError(const std::string& message) : std::runtime_error(message) {}
  explicit UsageError(Diagnostics diagnostics);
  const Diagnostics& diagnostics() const { return diagnostics_; }

 private:
  Diagnostics diagnostics_;
};

// A failure while running (I/O error, a kernel's failure, a plugin that misbehaves). Exit 1.
class RuntimeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Checks an internal or API precondition; throws RuntimeError with the message and location.
#define MOELAB_CHECK(cond, ...)                                                                         \
  do {                                                                                                  \
    if (!(cond)) ::moelab::detail::check_failed(#cond, __FILE__, __LINE__, ::fmt::format(__VA_ARGS__)); \
  } while (0)

namespace detail {
[[noreturn]] void check_failed(const char* condition, const char* file, int line, const std::string& message);
}  // namespace detail

}  // namespace moelab

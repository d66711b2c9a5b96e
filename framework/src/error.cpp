#include "moelab/error.hpp"

#include <fmt/format.h>

namespace moelab {

std::string SourceLocation::str() const {
  if (file.empty()) return "<unknown>";
  if (line <= 0) return file;
  if (column <= 0) return fmt::format("{}:{}", file, line);
  return fmt::format("{}:{}:{}", file, line, column);
}

std::string Diagnostic::format() const {
  std::string out = fmt::format("{}: error: ", where.str());
  if (!key.empty()) out += key + ": ";
  out += message;
  if (!hint.empty()) out += fmt::format(" ({})", hint);
  if (!note.empty()) out += fmt::format(" [{}]", note);
  return out;
}

void Diagnostics::add(SourceLocation where, std::string key, std::string message, std::string hint) {
  items_.push_back(Diagnostic{std::move(where), std::move(key), std::move(message), std::move(hint), {}});
}

void Diagnostics::append(const Diagnostics& other) {
  items_.insert(items_.end(), other.items_.begin(), other.items_.end());
}

std::string Diagnostics::format() const {
  std::string out;
  for (const auto& d : items_) out += d.format() + "\n";
  return out;
}

void Diagnostics::throw_if_any() const {
  if (!items_.empty()) throw UsageError(*this);
}

UsageError::UsageError(Diagnostics diagnostics)
    : std::runtime_error(diagnostics.format()), diagnostics_(std::move(diagnostics)) {}

namespace detail {
void check_failed(const char* condition, const char* file, int line, const std::string& message) {
  throw RuntimeError(fmt::format("{} (check '{}' failed at {}:{})", message, condition, file, line));
}
}  // namespace detail

}  // namespace moelab

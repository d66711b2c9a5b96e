// Recipe loading: parse, merge `extends` depth first, apply `--set` overrides, resolve ${...}
// references, expand [sweep]. toml++ does not copy a node's source position when a node is
// copied, so positions are recorded once, right after parsing, in Recipe::origins_ (by dotted key)
// and carried along by every merge, override, reference and sweep step.
#include "moelab/recipe.hpp"

#include <fmt/format.h>
#include <toml++/toml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "moelab/params.hpp"

namespace moelab {

namespace fs = std::filesystem;
using Origins = std::map<std::string, Recipe::Origin>;

namespace {

constexpr toml::format_flags kFormatFlags = toml::format_flags::allow_unicode_strings;

// ---------------------------------------------------------------------------------------------
// Dotted keys

bool is_bare_key(std::string_view key) {
  if (key.empty()) return false;
  for (char c : key)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-')) return false;
  return true;
}

// One step of a dotted key: a table key or an array index.
struct PathPart {
  std::string key;
  bool is_index = false;
  size_t index = 0;
};
using KeyPath = std::vector<PathPart>;

// A dotted key has at most this many parts (recipes nest a few levels; see kMaxNesting).
constexpr size_t kMaxKeyParts = 32;

// Parses "a.b", "a.\"x.y\"", "moe.balancers[1].type". Nothing on malformed input or past
// kMaxKeyParts parts.
std::optional<KeyPath> parse_path(std::string_view text) {
  KeyPath parts;
  size_t i = 0;
  auto skip_space = [&] {
    while (i < text.size() && (text[i] == ' ' || text[i] == '\t')) ++i;
  };
  bool need_key = true;
  while (true) {
    skip_space();
    if (need_key) {
      if (i >= text.size()) return std::nullopt;
      PathPart part;
      if (text[i] == '"') {
        ++i;
        while (i < text.size() && text[i] != '"') {
          if (text[i] == '\\' && i + 1 < text.size()) {
            ++i;
            const char escaped = text[i] == 'n' ? '\n' : text[i] == 't' ? '\t' : text[i] == 'r' ? '\r' : text[i];
            part.key += escaped;
            ++i;
            continue;
          }
          part.key += text[i++];
        }
        if (i >= text.size()) return std::nullopt;
        ++i;
      } else {
        while (i < text.size() &&
               (std::isalnum(static_cast<unsigned char>(text[i])) || text[i] == '_' || text[i] == '-'))
          part.key += text[i++];
        if (part.key.empty()) return std::nullopt;
      }
      parts.push_back(std::move(part));
      if (parts.size() > kMaxKeyParts) return std::nullopt;
      need_key = false;
      continue;
    }
    if (i >= text.size()) break;
    if (text[i] == '.') {
      ++i;
      need_key = true;
      continue;
    }
    if (text[i] == '[') {
      ++i;
      size_t start = i;
      while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
      // At most 9 digits: an index no recipe reaches, and no overflow converting it.
      if (i == start || i - start > 9 || i >= text.size() || text[i] != ']') return std::nullopt;
      PathPart part;
      part.is_index = true;
      part.index = std::stoul(std::string(text.substr(start, i - start)));
      parts.push_back(std::move(part));
      ++i;
      continue;
    }
    return std::nullopt;
  }
  return parts;
}

std::string path_string(const KeyPath& parts, size_t count) {
  std::string out;
  for (size_t i = 0; i < count && i < parts.size(); ++i)
    out = parts[i].is_index ? Recipe::index_path(out, parts[i].index) : Recipe::key_path(out, parts[i].key);
  return out;
}
std::string path_string(const KeyPath& parts) {
  return path_string(parts, parts.size());
}

// The canonical spelling of a dotted key as the user wrote it (falls back to the text itself).
std::string canonical(const std::string& dotted) {
  auto parts = parse_path(dotted);
  return parts ? path_string(*parts) : dotted;
}

// `path` is `prefix` or lies below it.
bool is_under(const std::string& path, const std::string& prefix) {
  if (prefix.empty()) return true;
  if (path.compare(0, prefix.size(), prefix) != 0) return false;
  return path.size() == prefix.size() || path[prefix.size()] == '.' || path[prefix.size()] == '[';
}

// ---------------------------------------------------------------------------------------------
// Origins

void erase_subtree(Origins& origins, const std::string& path) {
  for (auto it = origins.lower_bound(path); it != origins.end() && it->first.compare(0, path.size(), path) == 0;)
    it = is_under(it->first, path) ? origins.erase(it) : std::next(it);
}

// Copies the entries at and below `from` in `source` to the same places below `to` in `target`.
void graft(Origins& target, const std::string& to, const Origins& source, const std::string& from, bool include_root) {
  std::vector<std::pair<std::string, Recipe::Origin>> found;
  for (auto it = source.lower_bound(from); it != source.end() && it->first.compare(0, from.size(), from) == 0; ++it) {
    if (!is_under(it->first, from)) continue;
    if (it->first.size() == from.size() && !include_root) continue;
    found.emplace_back(to + it->first.substr(from.size()), it->second);
  }
  for (auto& [path, origin] : found) target[path] = std::move(origin);
}

SourceLocation location_of(const toml::source_region& region) {
  SourceLocation loc;
  if (region.path) loc.file = *region.path;
  loc.line = static_cast<int>(region.begin.line);
  loc.column = static_cast<int>(region.begin.column);
  return loc;
}

// Tables and arrays may nest at most this deep (a dotted key a.b.c is three levels). Every later
// step (origins, merging, references, printing) walks the tree recursively; this bound keeps
// them far from the stack's end, whatever a file holds.
constexpr size_t kMaxNesting = 64;

// The first node nested deeper than kMaxNesting, found without recursion; nullptr when none is.
const toml::node* too_deep(const toml::node& root) {
  std::vector<std::pair<const toml::node*, size_t>> stack{{&root, 0}};
  while (!stack.empty()) {
    auto [node, depth] = stack.back();
    stack.pop_back();
    if (depth > kMaxNesting) return node;
    if (const auto* table = node->as_table())
      for (auto&& [key, child] : *table) stack.emplace_back(&child, depth + 1);
    else if (const auto* array = node->as_array())
      for (const auto& child : *array) stack.emplace_back(&child, depth + 1);
  }
  return nullptr;
}

// Empties a table without recursion, so that destroying a pathologically deep one cannot
// overflow the stack (toml++'s destructors recurse).
void dismantle(toml::table&& root) {
  std::vector<toml::table> tables;
  std::vector<toml::array> arrays;
  tables.push_back(std::move(root));
  while (!tables.empty() || !arrays.empty()) {
    auto take = [&](toml::node& child) {
      if (auto* t = child.as_table())
        tables.push_back(std::move(*t));
      else if (auto* a = child.as_array())
        arrays.push_back(std::move(*a));
    };
    if (!tables.empty()) {
      toml::table table = std::move(tables.back());
      tables.pop_back();
      for (auto&& [key, child] : table) take(child);
    } else {
      toml::array array = std::move(arrays.back());
      arrays.pop_back();
      for (auto& child : array) take(child);
    }
  }
}

// Records where every value below `node` was written. With `fixed`, every entry gets that place
// instead (values from a --set override).
void record_origins(const toml::node& node, const std::string& path, const SourceLocation& key_loc, Origins& out,
                    const SourceLocation* fixed) {
  if (!path.empty()) {
    Recipe::Origin& o = out[path];
    o.value = fixed ? *fixed : location_of(node.source());
    o.key = fixed ? *fixed : key_loc;
  }
  if (const auto* table = node.as_table()) {
    for (auto&& [key, child] : *table)
      record_origins(child, Recipe::key_path(path, std::string(key.str())), location_of(key.source()), out, fixed);
  } else if (const auto* array = node.as_array()) {
    for (size_t i = 0; i < array->size(); ++i) {
      const toml::node& child = *array->get(i);
      record_origins(child, Recipe::index_path(path, i), location_of(child.source()), out, fixed);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tree edits

// A plugin table names its plugin with `type`. When a later file names another plugin, the
// earlier table's parameters belong to the old plugin and would only be unknown keys to the new
// one, so the table is replaced whole instead of merged.
bool names_another_plugin(const toml::table& before, const toml::table& after) {
  const auto* old_type = before.get_as<std::string>("type");
  const auto* new_type = after.get_as<std::string>("type");
  return old_type && new_type && old_type->get() != new_type->get();
}

// Deep merge: tables merge key by key (unless they name different plugins), anything else
// (arrays included) is replaced by `from`.
void merge_into(toml::table& into, Origins& into_origins, const toml::table& from, const Origins& from_origins,
                const std::string& prefix) {
  for (auto&& [key, node] : from) {
    const std::string name(key.str());
    const std::string path = Recipe::key_path(prefix, name);
    toml::node* existing = into.get(name);
    if (existing && existing->is_table() && node.is_table() &&
        !names_another_plugin(*existing->as_table(), *node.as_table())) {
      if (auto it = from_origins.find(path); it != from_origins.end()) into_origins[path] = it->second;
      merge_into(*existing->as_table(), into_origins, *node.as_table(), from_origins, path);
    } else {
      into.insert_or_assign(name, node);
      erase_subtree(into_origins, path);
      graft(into_origins, path, from_origins, path, true);
    }
  }
}

std::string node_kind(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::table:
      return "a table";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a float";
    case toml::node_type::boolean:
      return "a boolean";
    case toml::node_type::date:
      return "a date";
    case toml::node_type::time:
      return "a time";
    case toml::node_type::date_time:
      return "a date-time";
    default:
      return "nothing";
  }
}

// Replaces the value at `parts` with a copy of `value`, creating missing tables on the way (their
// origin is `created_at`). Returns what went wrong, or an empty string.
std::string set_at(toml::table& root, const KeyPath& parts, const toml::node& value, Origins& origins,
                   const SourceLocation& created_at) {
  toml::node* current = &root;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    const PathPart& part = parts[i];
    const std::string here = path_string(parts, i + 1);
    toml::node* next = nullptr;
    if (part.is_index) {
      auto* array = current->as_array();
      if (!array) return fmt::format("'{}' is {}, not an array", path_string(parts, i), node_kind(*current));
      if (part.index >= array->size())
        return fmt::format("'{}' has {} elements, no index {}", path_string(parts, i), array->size(), part.index);
      next = array->get(part.index);
    } else {
      auto* table = current->as_table();
      if (!table) return fmt::format("'{}' is {}, not a table", path_string(parts, i), node_kind(*current));
      next = table->get(part.key);
      if (!next) {
        table->insert(part.key, toml::table{});
        next = table->get(part.key);
        origins[here] = Recipe::Origin{created_at, created_at, {}};
      }
    }
    current = next;
  }
  const PathPart& last = parts.back();
  if (last.is_index) {
    auto* array = current->as_array();
    const std::string parent = path_string(parts, parts.size() - 1);
    if (!array) return fmt::format("'{}' is {}, not an array", parent, node_kind(*current));
    if (last.index >= array->size())
      return fmt::format("'{}' has {} elements, no index {}", parent, array->size(), last.index);
    array->replace(array->cbegin() + static_cast<std::ptrdiff_t>(last.index), value);
  } else {
    auto* table = current->as_table();
    if (!table)
      return fmt::format("'{}' is {}, not a table", path_string(parts, parts.size() - 1), node_kind(*current));
    table->insert_or_assign(last.key, value);
  }
  return {};
}

const toml::node* find_at(const toml::node& root, const KeyPath& parts) {
  const toml::node* current = &root;
  for (const auto& part : parts) {
    if (part.is_index) {
      const auto* array = current->as_array();
      current = array ? array->get(part.index) : nullptr;
    } else {
      const auto* table = current->as_table();
      current = table ? table->get(part.key) : nullptr;
    }
    if (!current) return nullptr;
  }
  return current;
}

// ---------------------------------------------------------------------------------------------
// Printing. toml++'s formatter prints floats with 17 significant digits (0.1 becomes
// 0.10000000000000001); these print the shortest text that reads back to the same double.

std::string quoted_string(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20 || c == 0x7f)
          out += fmt::format("\\u{:04X}", static_cast<unsigned>(c));
        else
          out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string float_text(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value < 0 ? "-inf" : "inf";
  std::string text = fmt::format("{}", value);
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

bool is_array_of_tables(const toml::node& node) {
  const auto* array = node.as_array();
  return array && !array->empty() && array->is_array_of_tables();
}

void print_table(std::string& out, const toml::table& table, const std::string& path, bool header);

}  // namespace

std::string toml_value_text(const toml::node& node) {
  if (const auto* s = node.as_string()) return quoted_string(s->get());
  if (const auto* i = node.as_integer()) return std::to_string(i->get());
  if (const auto* f = node.as_floating_point()) return float_text(f->get());
  if (const auto* b = node.as_boolean()) return b->get() ? "true" : "false";
  if (const auto* array = node.as_array()) {
    std::string out = "[";
    for (size_t i = 0; i < array->size(); ++i) out += (i ? ", " : "") + toml_value_text(*array->get(i));
    return out + "]";
  }
  if (const auto* table = node.as_table()) {
    std::string out = "{";
    bool first = true;
    for (auto&& [key, child] : *table) {
      out += (first ? " " : ", ") + Recipe::key_path("", std::string(key.str())) + " = " + toml_value_text(child);
      first = false;
    }
    return out + (first ? "}" : " }");
  }
  // Dates and times: toml++ prints them as TOML.
  std::ostringstream out;
  out << toml::toml_formatter{node, kFormatFlags};
  return out.str();
}

namespace {

// Values first, then sub-tables as [a.b] and arrays of tables as [[a.b]], keys in sorted order.
void print_table(std::string& out, const toml::table& table, const std::string& path, bool header) {
  bool has_values = false;
  for (auto&& [key, child] : table)
    if (!child.is_table() && !is_array_of_tables(child)) has_values = true;
  // A table holding only sub-tables needs no header of its own, unless it is empty.
  if (header && (has_values || table.empty())) out += fmt::format("{}[{}]\n", out.empty() ? "" : "\n", path);
  for (auto&& [key, child] : table)
    if (!child.is_table() && !is_array_of_tables(child))
      out += Recipe::key_path("", std::string(key.str())) + " = " + toml_value_text(child) + "\n";
  for (auto&& [key, child] : table) {
    const std::string child_path = Recipe::key_path(path, std::string(key.str()));
    if (const auto* sub = child.as_table()) {
      print_table(out, *sub, child_path, true);
    } else if (is_array_of_tables(child)) {
      for (const auto& element : *child.as_array()) {
        out += fmt::format("{}[[{}]]\n", out.empty() ? "" : "\n", child_path);
        print_table(out, *element.as_table(), child_path, false);
      }
    }
  }
}

// How a value reads inside a string or a folder name: strings raw, everything else as TOML.
std::string plain_text(const toml::node& node) {
  if (const auto* s = node.as_string()) return s->get();
  return toml_value_text(node);
}

// ---------------------------------------------------------------------------------------------
// ${...} references

class Resolver {
 public:
  // `deferred`: swept keys. A reference to one that the recipe lacks stays as written (each
  // sweep point resolves it again with its value in place).
  Resolver(const toml::table& root, Origins& origins, Diagnostics& diagnostics, std::vector<std::string> deferred)
      : root_(root), origins_(origins), diagnostics_(diagnostics), deferred_(std::move(deferred)) {}

  std::unique_ptr<toml::table> run() {
    const toml::node* resolved_root = resolved("", root_);
    const toml::node* source = resolved_root ? resolved_root : done_.at("").get();
    return std::make_unique<toml::table>(*source->as_table());
  }

 private:
  struct Lookup {
    const toml::node* node = nullptr;  // resolved target, when found
    std::string path;                  // its dotted key
    bool deferred = false;             // a swept key: leave the reference as written
  };

  void error(const std::string& referrer, std::string message, std::string hint = {}) {
    Diagnostic d;
    auto it = origins_.find(referrer);
    if (it != origins_.end()) {
      d.where = it->second.value;
      if (!it->second.extended_by.empty()) {
        d.note = "set in " + it->second.value.file;
        for (const auto& f : it->second.extended_by) d.note += ", extended by " + f;
      }
    }
    d.key = referrer;
    d.message = std::move(message);
    d.hint = std::move(hint);
    diagnostics_.add(std::move(d));
  }

  bool is_deferred(const std::string& path) const {
    for (const auto& swept : deferred_)
      if (is_under(path, swept) || is_under(swept, path)) return true;
    return false;
  }

  // Resolves the original node at `path` unless that would close a cycle (reported at `referrer`).
  const toml::node* follow(const std::string& path, const toml::node& original, const std::string& referrer) {
    auto on_stack = std::find(stack_.begin(), stack_.end(), path);
    if (on_stack != stack_.end()) {
      std::string chain;
      for (auto it = on_stack; it != stack_.end(); ++it) chain += *it + " -> ";
      error(referrer, fmt::format("reference cycle: {}{}", chain, path),
            "a value cannot depend on itself; replace one reference by a value");
      return nullptr;
    }
    return resolved(path, original);
  }

  Lookup lookup(const std::string& referrer, const std::string& reference) {
    Lookup out;
    auto parts = parse_path(reference);
    if (!parts || parts->empty()) {
      error(referrer, fmt::format("invalid reference '${{{}}}'", reference),
            "write ${section.key}, e.g. ${moe.num_experts}; $${ is a literal ${");
      return out;
    }
    const toml::node* current = &root_;
    bool resolved_already = false;  // `current` lies in a resolved copy
    std::string current_path;
    for (size_t i = 0; i < parts->size(); ++i) {
      if (!resolved_already && current->is_string() && current->as_string()->get().find('$') != std::string::npos) {
        current = follow(current_path, *current, referrer);
        if (!current) return out;
        resolved_already = true;
      }
      const PathPart& part = (*parts)[i];
      const toml::node* next = nullptr;
      std::vector<std::string> siblings;
      if (part.is_index) {
        if (const auto* array = current->as_array()) next = array->get(part.index);
      } else if (const auto* table = current->as_table()) {
        next = table->get(part.key);
        for (auto&& [key, child] : *table) siblings.emplace_back(key.str());
      }
      const std::string next_path = path_string(*parts, i + 1);
      if (!next) {
        if (is_deferred(path_string(*parts))) {
          out.deferred = true;
          return out;
        }
        std::string hint;
        if (!part.is_index) {
          if (auto near = nearest_name(part.key, siblings); !near.empty())
            hint = fmt::format("did you mean '{}'?", Recipe::key_path(current_path, near));
        }
        error(referrer, fmt::format("reference '${{{}}}': the recipe has no key '{}'", reference, next_path), hint);
        return out;
      }
      current = next;
      current_path = next_path;
    }
    if (!resolved_already) current = follow(current_path, *current, referrer);
    out.node = current;
    out.path = current_path;
    return out;
  }

  // A string with references: exactly one reference takes the referenced value with its type,
  // otherwise each reference is replaced by the value's text; "$${" is a literal "${".
  std::unique_ptr<toml::node> resolve_string(const std::string& path, const std::string& text, bool& ok) {
    auto keep = [&] { return std::make_unique<toml::value<std::string>>(text); };
    if (text.size() > 3 && text.compare(0, 2, "${") == 0 && text.find('}') == text.size() - 1) {
      Lookup target = lookup(path, text.substr(2, text.size() - 3));
      if (target.deferred) return keep();
      if (!target.node) {
        ok = false;
        return keep();
      }
      if (target.node->is_table() || target.node->is_array()) graft(origins_, path, origins_, target.path, false);
      return std::unique_ptr<toml::node>(
          target.node->visit([](const auto& n) -> toml::node* { return new std::decay_t<decltype(n)>(n); }));
    }
    std::string out;
    for (size_t i = 0; i < text.size();) {
      if (text.compare(i, 3, "$${") == 0) {
        out += "${";
        i += 3;
      } else if (text.compare(i, 2, "${") == 0) {
        const size_t close = text.find('}', i + 2);
        if (close == std::string::npos) {
          error(path, fmt::format("unterminated reference in \"{}\"", text),
                "close it with '}', or write $${ for a literal ${");
          ok = false;
          return keep();
        }
        const std::string reference = text.substr(i + 2, close - i - 2);
        Lookup target = lookup(path, reference);
        if (target.deferred) return keep();
        if (!target.node) {
          ok = false;
        } else if (target.node->is_table()) {
          error(path, fmt::format("'${{{}}}' is a table and cannot be part of a string", reference),
                "a string that is exactly one reference takes a table as it is");
          ok = false;
        } else {
          out += plain_text(*target.node);
        }
        i = close + 1;
      } else {
        out += text[i++];
      }
    }
    return std::make_unique<toml::value<std::string>>(std::move(out));
  }

  // The fully resolved copy of the original node at `path`; nullptr when it could not be
  // resolved (the problem is already reported).
  const toml::node* resolved(const std::string& path, const toml::node& original) {
    if (auto it = done_.find(path); it != done_.end()) return failed_.count(path) ? nullptr : it->second.get();
    stack_.push_back(path);
    bool ok = true;
    std::unique_ptr<toml::node> out;
    if (const auto* table = original.as_table()) {
      auto copy = std::make_unique<toml::table>();
      for (auto&& [key, child] : *table) {
        const toml::node* r = resolved(Recipe::key_path(path, std::string(key.str())), child);
        if (!r) ok = false;
        copy->insert(key.str(), r ? *r : child);
      }
      out = std::move(copy);
    } else if (const auto* array = original.as_array()) {
      auto copy = std::make_unique<toml::array>();
      for (size_t i = 0; i < array->size(); ++i) {
        const toml::node& child = *array->get(i);
        const toml::node* r = resolved(Recipe::index_path(path, i), child);
        if (!r) ok = false;
        copy->push_back(r ? *r : child);
      }
      out = std::move(copy);
    } else if (const auto* s = original.as_string(); s && s->get().find('$') != std::string::npos) {
      out = resolve_string(path, s->get(), ok);
    } else {
      out.reset(original.visit([](const auto& n) -> toml::node* { return new std::decay_t<decltype(n)>(n); }));
    }
    stack_.pop_back();
    if (!ok) failed_.insert(path);
    const toml::node* result = out.get();
    done_[path] = std::move(out);
    return ok ? result : nullptr;
  }

  const toml::table& root_;
  Origins& origins_;
  Diagnostics& diagnostics_;
  std::vector<std::string> deferred_;
  std::map<std::string, std::unique_ptr<toml::node>> done_;
  std::set<std::string> failed_;
  std::vector<std::string> stack_;
};

// ---------------------------------------------------------------------------------------------
// [sweep]

struct SweepAxis {
  KeyPath parts;            // the swept key
  std::string key;          // its dotted spelling
  std::string origin_path;  // where its list is: sweep.moe.top_k
  const toml::array* values = nullptr;
  SourceLocation where;
};

void add_error(Diagnostics& diagnostics, const Origins& origins, const std::string& key, std::string message,
               std::string hint = {}) {
  Diagnostic d;
  if (auto it = origins.find(key); it != origins.end()) d.where = it->second.value;
  d.key = key;
  d.message = std::move(message);
  d.hint = std::move(hint);
  diagnostics.add(std::move(d));
}

void collect_axes(const toml::table& table, const KeyPath& prefix, const std::string& origin_prefix,
                  const Origins& origins, std::vector<SweepAxis>& axes, Diagnostics& diagnostics) {
  for (auto&& [key, node] : table) {
    const std::string name(key.str());
    const std::string origin_path = Recipe::key_path(origin_prefix, name);
    KeyPath parts = prefix;
    // A quoted key "moe.top_k" names a dotted key, as a nested one would.
    auto key_parts = parse_path(name);
    if (!key_parts) {
      add_error(diagnostics, origins, origin_path, fmt::format("'{}' is not a valid dotted key to sweep", name),
                "write moe.top_k = [1, 2] or \"moe.top_k\" = [1, 2] inside [sweep]");
      continue;
    }
    parts.insert(parts.end(), key_parts->begin(), key_parts->end());
    if (const auto* sub = node.as_table()) {
      collect_axes(*sub, parts, origin_path, origins, axes, diagnostics);
    } else if (const auto* array = node.as_array()) {
      if (array->empty()) {
        add_error(diagnostics, origins, origin_path, "a swept key needs a non-empty array of values",
                  "write e.g. moe.top_k = [1, 2]");
        continue;
      }
      SweepAxis axis{parts, path_string(parts), origin_path, array, {}};
      if (auto it = origins.find(origin_path); it != origins.end()) axis.where = it->second.value;
      auto same = std::find_if(axes.begin(), axes.end(), [&](const SweepAxis& a) { return a.key == axis.key; });
      if (same != axes.end()) {
        add_error(diagnostics, origins, origin_path, fmt::format("'{}' is swept twice", axis.key),
                  fmt::format("also swept at {}", same->where.str()));
        continue;
      }
      axes.push_back(std::move(axis));
    } else {
      add_error(
          diagnostics, origins, origin_path,
          fmt::format("expected an array of values to sweep over, got {} {}", node_kind(node), toml_value_text(node)),
          fmt::format("write {} = [{}]", name, toml_value_text(node)));
    }
  }
}

// The swept keys, in the order they were written (files in merge order, then overrides).
std::vector<SweepAxis> sweep_axes(const toml::table& root, const Origins& origins, const std::vector<fs::path>& sources,
                                  Diagnostics& diagnostics) {
  std::vector<SweepAxis> axes;
  const toml::node* sweep = root.get("sweep");
  if (!sweep) return axes;
  if (!sweep->is_table()) {
    add_error(diagnostics, origins, "sweep",
              fmt::format("expected a table of key = [values], got {}", node_kind(*sweep)),
              "write [sweep] followed by lines such as moe.top_k = [1, 2]");
    return axes;
  }
  collect_axes(*sweep->as_table(), {}, "sweep", origins, axes, diagnostics);
  auto rank = [&](const SweepAxis& a) {
    size_t file = sources.size();
    for (size_t i = 0; i < sources.size(); ++i)
      if (sources[i].string() == a.where.file) file = i;
    return std::make_tuple(file, a.where.line, a.where.column);
  };
  std::stable_sort(axes.begin(), axes.end(), [&](const SweepAxis& a, const SweepAxis& b) { return rank(a) < rank(b); });
  return axes;
}

// A folder-name-safe rendering: runs of anything but [A-Za-z0-9._+-] become one '-'.
std::string slug_text(const std::string& text) {
  std::string out;
  for (char c : text) {
    const bool safe = std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '+' || c == '-';
    if (safe)
      out += c;
    else if (!out.empty() && out.back() != '-')
      out += '-';
  }
  while (!out.empty() && (out.back() == '-' || out.back() == '.')) out.pop_back();
  size_t start = 0;
  while (start < out.size() && (out[start] == '-' || out[start] == '.')) ++start;
  out = out.substr(start);
  return out.empty() ? "empty" : out;
}

// The shortest tail of each swept key that tells it apart from the others ("top_k", or
// "router.type" beside "experts.type").
std::vector<std::string> short_names(const std::vector<SweepAxis>& axes) {
  auto tail = [](const KeyPath& parts, size_t count) {
    std::string out;
    for (size_t i = parts.size() - std::min(count, parts.size()); i < parts.size(); ++i) {
      if (!out.empty()) out += '.';
      out += parts[i].is_index ? std::to_string(parts[i].index) : parts[i].key;
    }
    return out;
  };
  std::vector<std::string> names;
  for (const auto& axis : axes) {
    size_t count = 1;
    for (; count < axis.parts.size(); ++count) {
      bool unique = true;
      for (const auto& other : axes)
        if (&other != &axis && tail(other.parts, count) == tail(axis.parts, count)) unique = false;
      if (unique) break;
    }
    names.push_back(tail(axis.parts, count));
  }
  return names;
}

// ---------------------------------------------------------------------------------------------

// Recipes are a few KiB; anything far larger is not one (and is not read whole into memory).
constexpr uintmax_t kMaxRecipeBytes = 4u << 20;

std::string read_file(const fs::path& file, std::string& error) {
  std::error_code ec;
  if (!fs::exists(file, ec)) {
    error = "no such file";
    return {};
  }
  if (fs::is_directory(file, ec)) {
    error = "is a directory, not a file";
    return {};
  }
  if (!fs::is_regular_file(file, ec)) {
    error = "is not a regular file (a device, a FIFO or a socket?)";
    return {};
  }
  if (const auto size = fs::file_size(file, ec); !ec && size > kMaxRecipeBytes) {
    error = fmt::format("is {} bytes; a recipe file is at most {} MiB", size, kMaxRecipeBytes >> 20);
    return {};
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    error = std::strerror(errno);
    return {};
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) {
    error = "read error";
    return {};
  }
  return text.str();
}

std::string identity_of(const fs::path& file) {
  std::error_code ec;
  fs::path id = fs::weakly_canonical(fs::absolute(file), ec);
  return ec ? fs::absolute(file).lexically_normal().string() : id.string();
}

// Escapes "${" as "$${" in every string, so that printed text loads back to the same values.
void escape_references(toml::node& node) {
  if (auto* table = node.as_table()) {
    for (auto&& [key, child] : *table) escape_references(child);
  } else if (auto* array = node.as_array()) {
    for (auto& child : *array) escape_references(child);
  } else if (auto* s = node.as_string()) {
    std::string& text = s->get();
    for (size_t at = text.find("${"); at != std::string::npos; at = text.find("${", at + 3)) text.insert(at, "$");
  }
}

std::unique_ptr<toml::table> copy_table(const std::unique_ptr<toml::table>& table) {
  return table ? std::make_unique<toml::table>(*table) : std::make_unique<toml::table>();
}

}  // namespace

// ---------------------------------------------------------------------------------------------

struct RecipeLoader {
  Diagnostics diagnostics;
  std::vector<fs::path> sources;
  std::vector<std::string> chain_ids, chain_names;  // the files being loaded, outermost first

  struct Loaded {
    toml::table table;
    Origins origins;
  };

  std::optional<toml::table> parse_text(const std::string& text, const std::string& display) {
    toml::table parsed;
    try {
      parsed = toml::parse(text, std::string(display));
    } catch (const toml::parse_error& e) {
      SourceLocation where = location_of(e.source());
      where.file = display;
      diagnostics.add(where, {}, fmt::format("malformed TOML: {}", e.description()));
      return std::nullopt;
    }
    if (const toml::node* deep = too_deep(parsed)) {
      SourceLocation where = location_of(deep->source());
      where.file = display;
      diagnostics.add(where, {}, fmt::format("tables and arrays nested more than {} deep", kMaxNesting),
                      "a recipe's keys nest a few levels, as in moe.router.type");
      dismantle(std::move(parsed));
      return std::nullopt;
    }
    return parsed;
  }

  Loaded load_file(const std::string& text, const std::string& display, const std::string& id) {
    Loaded result;
    auto parsed = parse_text(text, display);
    if (!parsed) return result;
    toml::table& own = *parsed;
    Origins own_origins;
    record_origins(own, "", {}, own_origins, nullptr);

    chain_ids.push_back(id);
    chain_names.push_back(display);
    if (const toml::node* extends = own.get("extends")) {
      std::vector<std::pair<std::string, std::string>> bases;  // (path as written, its dotted key)
      if (const auto* s = extends->as_string()) {
        bases.emplace_back(s->get(), "extends");
      } else if (const auto* array = extends->as_array()) {
        for (size_t i = 0; i < array->size(); ++i) {
          const std::string key = Recipe::index_path("extends", i);
          if (const auto* item = array->get(i)->as_string())
            bases.emplace_back(item->get(), key);
          else
            add_error(diagnostics, own_origins, key,
                      fmt::format("expected a file path (string), got {}", node_kind(*array->get(i))));
        }
      } else {
        add_error(diagnostics, own_origins, "extends",
                  fmt::format("expected a file path or an array of file paths, got {}", node_kind(*extends)),
                  "write extends = \"base.toml\" or extends = [\"a.toml\", \"b.toml\"]");
      }
      for (const auto& [written, key] : bases) {
        const fs::path base = fs::path(written).is_absolute()
                                  ? fs::path(written).lexically_normal()
                                  : (fs::path(display).parent_path() / written).lexically_normal();
        const std::string base_id = identity_of(base);
        if (std::find(chain_ids.begin(), chain_ids.end(), base_id) != chain_ids.end()) {
          std::string chain;
          for (size_t i = std::find(chain_ids.begin(), chain_ids.end(), base_id) - chain_ids.begin();
               i < chain_names.size(); ++i)
            chain += chain_names[i] + " -> ";
          add_error(diagnostics, own_origins, key, fmt::format("extends cycle: {}{}", chain, base.string()),
                    "a recipe cannot extend itself, directly or through other files");
          continue;
        }
        if (base.extension() != ".toml") {
          add_error(diagnostics, own_origins, key, fmt::format("extends '{}', which is not a .toml file", written),
                    "a recipe extends other recipes: files whose names end in .toml");
          continue;
        }
        std::string error;
        const std::string base_text = read_file(base, error);
        if (!error.empty()) {
          add_error(
              diagnostics, own_origins, key, fmt::format("cannot read extended file '{}': {}", base.string(), error),
              written == base.string() ? std::string{}
                                       : fmt::format("'{}' is resolved against the folder of {}", written, display));
          continue;
        }
        Loaded loaded = load_file(base_text, base.string(), base_id);
        for (auto& [path, origin] : loaded.origins) origin.extended_by.push_back(display);
        merge_into(result.table, result.origins, loaded.table, loaded.origins, "");
      }
      own.erase("extends");
      erase_subtree(own_origins, "extends");
    }
    chain_ids.pop_back();
    chain_names.pop_back();

    if (std::find(sources.begin(), sources.end(), fs::path(display)) == sources.end()) sources.emplace_back(display);
    merge_into(result.table, result.origins, own, own_origins, "");
    return result;
  }

  // "a.b.c=VALUE": VALUE is TOML; a bare word that is not TOML is a string.
  void apply_override(const std::string& text, toml::table& table, Origins& origins) {
    const SourceLocation where{fmt::format("<--set {}>", text), 0, 0};
    const size_t eq = text.find('=');
    auto trim = [](std::string s) {
      const auto first = s.find_first_not_of(" \t");
      const auto last = s.find_last_not_of(" \t");
      return first == std::string::npos ? std::string{} : s.substr(first, last - first + 1);
    };
    if (eq == std::string::npos) {
      diagnostics.add(where, {}, "expected KEY=VALUE", "e.g. --set moe.top_k=4");
      return;
    }
    const std::string key = trim(text.substr(0, eq));
    const std::string value = trim(text.substr(eq + 1));
    auto parts = parse_path(key);
    if (!parts && std::count(key.begin(), key.end(), '.') >= static_cast<std::ptrdiff_t>(kMaxKeyParts)) {
      diagnostics.add(where, key.substr(0, 60) + "...", fmt::format("the key has more than {} parts", kMaxKeyParts),
                      "a recipe's keys nest a few levels, as in moe.router.type");
      return;
    }
    if (!parts) {
      diagnostics.add(where, key, fmt::format("'{}' is not a dotted key", key),
                      "e.g. --set moe.router.type=softmax_topk or --set moe.balancers[0].coef=0.1");
      return;
    }
    const std::string dotted = path_string(*parts);
    if ((*parts)[0].key == "extends") {
      diagnostics.add(where, dotted, "'extends' cannot be overridden; it is read before any override applies");
      return;
    }
    std::optional<toml::table> parsed;
    std::string problem;
    try {
      parsed = toml::parse("value = " + value, std::string(where.file));
    } catch (const toml::parse_error& e) {
      problem = std::string(e.description());
    }
    if (!parsed) {
      const bool bare_word = !value.empty() && std::all_of(value.begin(), value.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || std::strchr("_-.:/+@%~", c) != nullptr;
      });
      if (!bare_word) {
        diagnostics.add(where, dotted, fmt::format("cannot parse '{}' as a TOML value: {}", value, problem),
                        "quote strings that contain spaces or punctuation: --set 'key=\"a b\"'");
        return;
      }
      parsed = toml::table{};
      parsed->insert("value", value);
    } else if (parsed->size() != 1) {
      diagnostics.add(where, dotted, fmt::format("'{}' is more than one TOML value", value));
      return;
    }
    const toml::node& node = *parsed->get("value");
    // `--set moe.router.type=hash` switches plugins: the old plugin's parameters go with it (the
    // same rule as for merging), and later --set options may set the new plugin's.
    if (parts->size() >= 2 && !parts->back().is_index && parts->back().key == "type" && node.is_string()) {
      const KeyPath parent_path(parts->begin(), parts->end() - 1);
      if (auto* parent = const_cast<toml::node*>(find_at(table, parent_path)); parent && parent->is_table()) {
        const auto* old_type = parent->as_table()->get_as<std::string>("type");
        if (old_type && old_type->get() != *node.value<std::string>()) {
          parent->as_table()->clear();
          const std::string parent_key = path_string(parent_path);
          const auto kept = origins.find(parent_key);
          const std::optional<Recipe::Origin> parent_origin =
              kept == origins.end() ? std::nullopt : std::optional<Recipe::Origin>(kept->second);
          erase_subtree(origins, parent_key);
          if (parent_origin) origins[parent_key] = *parent_origin;
        }
      }
    }
    const std::string problem_setting = set_at(table, *parts, node, origins, where);
    if (!problem_setting.empty()) {
      diagnostics.add(where, dotted, fmt::format("cannot set '{}': {}", dotted, problem_setting));
      return;
    }
    erase_subtree(origins, dotted);
    record_origins(node, dotted, where, origins, &where);
  }

  Recipe build(const std::string& text, const fs::path& file, const LoadOptions& options) {
    const std::string display = file.lexically_normal().string();
    Loaded loaded = load_file(text, display, identity_of(file));
    for (const auto& override_text : options.overrides) apply_override(override_text, loaded.table, loaded.origins);

    Recipe recipe;
    recipe.path_ = file;
    recipe.sources_ = sources;
    std::vector<SweepAxis> axes = sweep_axes(loaded.table, loaded.origins, sources, diagnostics);
    std::vector<std::string> swept;
    for (const auto& axis : axes) swept.push_back(axis.key);
    Resolver resolver(loaded.table, loaded.origins, diagnostics, swept);
    recipe.table_ = resolver.run();
    recipe.unresolved_ = std::make_unique<toml::table>(std::move(loaded.table));
    recipe.origins_ = std::move(loaded.origins);
    diagnostics.throw_if_any();
    return recipe;
  }
};

// ---------------------------------------------------------------------------------------------

Recipe::Recipe() : table_(std::make_unique<toml::table>()), unresolved_(std::make_unique<toml::table>()) {}
Recipe::Recipe(const Recipe& other)
    : path_(other.path_),
      table_(copy_table(other.table_)),
      unresolved_(copy_table(other.unresolved_)),
      sources_(other.sources_),
      origins_(other.origins_) {}
Recipe& Recipe::operator=(const Recipe& other) {
  if (this != &other) *this = Recipe(other);
  return *this;
}
Recipe::Recipe(Recipe&&) noexcept = default;
Recipe& Recipe::operator=(Recipe&&) noexcept = default;
Recipe::~Recipe() = default;

Recipe Recipe::load(const fs::path& file, const LoadOptions& options) {
  std::string error;
  const std::string text = read_file(file, error);
  if (!error.empty()) {
    Diagnostics diagnostics;
    diagnostics.add(SourceLocation{file.string(), 0, 0}, {}, fmt::format("cannot read recipe: {}", error));
    throw UsageError(std::move(diagnostics));
  }
  return RecipeLoader{}.build(text, file, options);
}

Recipe Recipe::parse(const std::string& text, const fs::path& name, const LoadOptions& options) {
  return RecipeLoader{}.build(text, name, options);
}

std::string Recipe::key_path(const std::string& prefix, const std::string& key) {
  // Spelled as TOML would accept it, so the printed recipe can use the same text for its keys.
  const std::string part = is_bare_key(key) ? key : quoted_string(key);
  return prefix.empty() ? part : prefix + "." + part;
}

std::string Recipe::index_path(const std::string& prefix, size_t index) {
  return fmt::format("{}[{}]", prefix, index);
}

SourceLocation Recipe::where(const std::string& dotted_key) const {
  auto it = origins_.find(canonical(dotted_key));
  return it == origins_.end() ? SourceLocation{} : it->second.value;
}

SourceLocation Recipe::where_key(const std::string& dotted_key) const {
  auto it = origins_.find(canonical(dotted_key));
  return it == origins_.end() ? SourceLocation{} : it->second.key;
}

std::string Recipe::note(const std::string& dotted_key) const {
  auto it = origins_.find(canonical(dotted_key));
  if (it == origins_.end() || it->second.extended_by.empty()) return {};
  std::string out = "set in " + it->second.value.file;
  for (const auto& file : it->second.extended_by) out += ", extended by " + file;
  return out;
}

std::string Recipe::to_toml() const {
  toml::table printed = *table_;
  escape_references(printed);
  std::string out;
  print_table(out, printed, "", false);
  return out;
}

std::vector<Recipe::SweepPoint> Recipe::expand_sweep() const {
  Diagnostics diagnostics;
  const std::vector<SweepAxis> axes = sweep_axes(*unresolved_, origins_, sources_, diagnostics);
  diagnostics.throw_if_any();

  // Every point starts from the merged, unresolved recipe without [sweep].
  Recipe base(*this);
  base.unresolved_->erase("sweep");
  base.table_->erase("sweep");
  erase_subtree(base.origins_, "sweep");
  if (axes.empty()) return {SweepPoint{{}, {}, {}, std::make_shared<Recipe>(std::move(base))}};

  const std::vector<std::string> names = short_names(axes);
  // A product that large is a typo (a list pasted into the wrong key), not a plan.
  constexpr size_t kMaxSweepRuns = 10000;
  size_t total = 1;
  for (const auto& axis : axes) total = std::min(total * axis.values->size(), kMaxSweepRuns + 1);
  if (total > kMaxSweepRuns) {
    std::string sizes;
    for (const auto& axis : axes)
      sizes += fmt::format("{}{} ({})", sizes.empty() ? "" : " x ", axis.key, axis.values->size());
    add_error(diagnostics, origins_, "sweep",
              fmt::format("the sweep expands to more than {} runs: {}", kMaxSweepRuns, sizes));
    diagnostics.throw_if_any();
  }

  std::vector<SweepPoint> points;
  std::set<std::string> reported, slugs;
  for (size_t index = 0; index < total; ++index) {
    // Mixed radix, the last key varying fastest.
    std::vector<size_t> choice(axes.size());
    for (size_t rest = index, a = axes.size(); a-- > 0;) {
      choice[a] = rest % axes[a].values->size();
      rest /= axes[a].values->size();
    }
    auto point = std::make_shared<Recipe>(base);
    Diagnostics point_problems;
    for (size_t a = 0; a < axes.size(); ++a) {
      const SweepAxis& axis = axes[a];
      const std::string element = index_path(axis.origin_path, choice[a]);
      const Origin element_origin = origins_.count(element) ? origins_.at(element) : Origin{axis.where, axis.where, {}};
      const std::string problem =
          set_at(*point->unresolved_, axis.parts, *axis.values->get(choice[a]), point->origins_, element_origin.value);
      if (!problem.empty()) {
        add_error(point_problems, origins_, axis.origin_path, fmt::format("cannot sweep '{}': {}", axis.key, problem));
        continue;
      }
      erase_subtree(point->origins_, axis.key);
      graft(point->origins_, axis.key, origins_, element, true);
      point->origins_[axis.key].key = origins_.count(axis.origin_path) ? origins_.at(axis.origin_path).key : axis.where;
    }
    if (point_problems.empty()) {
      Resolver resolver(*point->unresolved_, point->origins_, point_problems, {});
      point->table_ = resolver.run();
    }
    for (const auto& d : point_problems.items())
      if (reported.insert(d.format()).second) diagnostics.add(d);
    if (!point_problems.empty()) continue;

    SweepPoint sweep_point;
    std::string slug;
    for (size_t a = 0; a < axes.size(); ++a) {
      const toml::node* value = find_at(*point->table_, axes[a].parts);
      const std::string text = value ? toml_value_text(*value) : toml_value_text(*axes[a].values->get(choice[a]));
      sweep_point.values.emplace_back(axes[a].key, text);
      sweep_point.label += (a ? "," : "") + axes[a].key + "=" + text;
      slug += (a ? "_" : "") + slug_text(names[a]) + "-" +
              slug_text(value ? plain_text(*value) : plain_text(*axes[a].values->get(choice[a])));
    }
    // Folder names stay short and unique: a long or clashing slug gets the point's number.
    if (slug.size() > 120 || slugs.count(slug)) slug = fmt::format("{}_{}", slug.substr(0, 100), index + 1);
    slugs.insert(slug);
    sweep_point.slug = std::move(slug);
    sweep_point.recipe = std::move(point);
    points.push_back(std::move(sweep_point));
  }
  diagnostics.throw_if_any();
  return points;
}

}  // namespace moelab

// Typed parameter schemas. A plugin declares what it accepts once (name, type, default, range or
// choices, doc); the recipe engine validates a recipe table against it and hands the plugin a
// ParamSet of checked values. The same schema drives `moelab plugins --describe` and the docs.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "moelab/error.hpp"

namespace moelab {

enum class ParamType { boolean, integer, real, string, integer_list, real_list, string_list };
const char* param_type_name(ParamType type);  // "boolean", "integer", "float", "string", ...

using ParamValue = std::variant<bool, int64_t, double, std::string, std::vector<int64_t>, std::vector<double>,
                                std::vector<std::string>>;
std::string param_value_str(const ParamValue& value);  // TOML spelling: 2, 0.5, "silu", [1, 2]

struct ParamSpec {
  std::string name;
  ParamType type = ParamType::real;
  std::optional<ParamValue> default_value;  // none: the key is required
  std::optional<double> min, max;           // inclusive bounds, for numbers and list elements...
  std::vector<std::string> choices;         // allowed strings, when non-empty
  std::string doc;
  bool min_exclusive = false;  // ...except min when this is set: x > min

  // Fluent refinements, so a schema reads as a table.
  ParamSpec& range(double lo, double hi) {
    min = lo;
    max = hi;
    return *this;
  }
  ParamSpec& at_least(double lo) {
    min = lo;
    return *this;
  }
  ParamSpec& above(double lo) {  // strictly: x > lo
    min = lo;
    min_exclusive = true;
    return *this;
  }
  ParamSpec& one_of(std::vector<std::string> allowed) {
    choices = std::move(allowed);
    return *this;
  }
  ParamSpec& required() {
    default_value.reset();
    return *this;
  }
};

using ParamSchema = std::vector<ParamSpec>;

// Constructors for schema entries: param_int("top_k", 2, "experts per token").range(1, 256)
ParamSpec param_bool(std::string name, bool default_value, std::string doc);
ParamSpec param_int(std::string name, int64_t default_value, std::string doc);
ParamSpec param_float(std::string name, double default_value, std::string doc);
ParamSpec param_string(std::string name, std::string default_value, std::string doc);
ParamSpec param_choice(std::string name, std::string default_value, std::vector<std::string> choices, std::string doc);
ParamSpec param_int_list(std::string name, std::vector<int64_t> default_value, std::string doc);
ParamSpec param_float_list(std::string name, std::vector<double> default_value, std::string doc);
ParamSpec param_string_list(std::string name, std::vector<std::string> default_value, std::string doc);

// Validated values, every key of the schema present (defaults filled in). Getters throw
// RuntimeError on a name the schema does not have or a type that does not match: that is a bug in
// the plugin, not a user mistake, since the recipe was validated before the plugin saw it.
class ParamSet {
 public:
  void set(const std::string& name, ParamValue value, SourceLocation where = {});
  bool has(const std::string& name) const { return values_.count(name) != 0; }

  bool get_bool(const std::string& name) const;
  int64_t get_int(const std::string& name) const;
  double get_float(const std::string& name) const;  // integers are accepted and widened
  const std::string& get_string(const std::string& name) const;
  const std::vector<int64_t>& get_int_list(const std::string& name) const;
  std::vector<double> get_float_list(const std::string& name) const;
  const std::vector<std::string>& get_string_list(const std::string& name) const;

  // Where the user set a value (for cross-field errors a plugin reports); unknown when defaulted.
  SourceLocation where(const std::string& name) const;
  const std::map<std::string, ParamValue>& values() const { return values_; }

 private:
  const ParamValue& at(const std::string& name) const;
  std::map<std::string, ParamValue> values_;
  std::map<std::string, SourceLocation> where_;
};

// Checks one value against its spec; returns an empty string when valid, else the problem
// ("expected integer, got string \"two\"", "must be at most 64, got 100", ...).
std::string check_param_value(const ParamSpec& spec, const ParamValue& value);

// The schema with every default, as a ParamSet (for tests and for defaults-only construction).
ParamSet defaults_of(const ParamSchema& schema);

// Closest candidate by edit distance for "did you mean"; empty when none is close enough.
std::string nearest_name(const std::string& name, const std::vector<std::string>& candidates);

}  // namespace moelab

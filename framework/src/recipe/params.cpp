#include "moelab/params.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace moelab {

const char* param_type_name(ParamType type) {
  switch (type) {
    case ParamType::boolean:
      return "boolean";
    case ParamType::integer:
      return "integer";
    case ParamType::real:
      return "float";
    case ParamType::string:
      return "string";
    case ParamType::integer_list:
      return "array of integers";
    case ParamType::real_list:
      return "array of floats";
    case ParamType::string_list:
      return "array of strings";
  }
  return "?";
}

namespace {
std::string real_str(double v) {
  std::string s = fmt::format("{}", v);
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // TOML floats need a point
  return s;
}
template <class T, class F>
std::string list_str(const std::vector<T>& v, F&& one) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + one(v[i]);
  return out + "]";
}
std::string quoted(const std::string& s) {
  return fmt::format("\"{}\"", s);
}
}  // namespace

std::string param_value_str(const ParamValue& value) {
  return std::visit(
      [](const auto& v) -> std::string {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, bool>)
          return v ? "true" : "false";
        else if constexpr (std::is_same_v<T, int64_t>)
          return std::to_string(v);
        else if constexpr (std::is_same_v<T, double>)
          return real_str(v);
        else if constexpr (std::is_same_v<T, std::string>)
          return quoted(v);
        else if constexpr (std::is_same_v<T, std::vector<int64_t>>)
          return list_str(v, [](int64_t x) { return std::to_string(x); });
        else if constexpr (std::is_same_v<T, std::vector<double>>)
          return list_str(v, real_str);
        else
          return list_str(v, quoted);
      },
      value);
}

ParamSpec param_bool(std::string name, bool d, std::string doc) {
  return ParamSpec{std::move(name), ParamType::boolean, ParamValue{d}, {}, {}, {}, std::move(doc)};
}
ParamSpec param_int(std::string name, int64_t d, std::string doc) {
  return ParamSpec{std::move(name), ParamType::integer, ParamValue{d}, {}, {}, {}, std::move(doc)};
}
ParamSpec param_float(std::string name, double d, std::string doc) {
  return ParamSpec{std::move(name), ParamType::real, ParamValue{d}, {}, {}, {}, std::move(doc)};
}
ParamSpec param_string(std::string name, std::string d, std::string doc) {
  return ParamSpec{std::move(name), ParamType::string, ParamValue{std::move(d)}, {}, {}, {}, std::move(doc)};
}
ParamSpec param_choice(std::string name, std::string d, std::vector<std::string> choices, std::string doc) {
  return ParamSpec{std::move(name),    ParamType::string, ParamValue{std::move(d)}, {}, {},
                   std::move(choices), std::move(doc)};
}
ParamSpec param_int_list(std::string name, std::vector<int64_t> d, std::string doc) {
  return ParamSpec{std::move(name), ParamType::integer_list, ParamValue{std::move(d)}, {}, {}, {}, std::move(doc)};
}
ParamSpec param_float_list(std::string name, std::vector<double> d, std::string doc) {
  return ParamSpec{std::move(name), ParamType::real_list, ParamValue{std::move(d)}, {}, {}, {}, std::move(doc)};
}
ParamSpec param_string_list(std::string name, std::vector<std::string> d, std::string doc) {
  return ParamSpec{std::move(name), ParamType::string_list, ParamValue{std::move(d)}, {}, {}, {}, std::move(doc)};
}

void ParamSet::set(const std::string& name, ParamValue value, SourceLocation where) {
  values_[name] = std::move(value);
  where_[name] = std::move(where);
}

const ParamValue& ParamSet::at(const std::string& name) const {
  auto it = values_.find(name);
  MOELAB_CHECK(it != values_.end(), "parameter '{}' is not in this plugin's schema", name);
  return it->second;
}

template <class T>
static const T& get_as(const ParamValue& v, const std::string& name, const char* type) {
  const T* p = std::get_if<T>(&v);
  MOELAB_CHECK(p != nullptr, "parameter '{}' read as {} but holds {}", name, type, param_value_str(v));
  return *p;
}

bool ParamSet::get_bool(const std::string& n) const {
  return get_as<bool>(at(n), n, "boolean");
}
int64_t ParamSet::get_int(const std::string& n) const {
  return get_as<int64_t>(at(n), n, "integer");
}
double ParamSet::get_float(const std::string& n) const {
  const ParamValue& v = at(n);
  if (const auto* i = std::get_if<int64_t>(&v)) return static_cast<double>(*i);
  return get_as<double>(v, n, "float");
}
const std::string& ParamSet::get_string(const std::string& n) const {
  return get_as<std::string>(at(n), n, "string");
}
const std::vector<int64_t>& ParamSet::get_int_list(const std::string& n) const {
  return get_as<std::vector<int64_t>>(at(n), n, "array of integers");
}
std::vector<double> ParamSet::get_float_list(const std::string& n) const {
  const ParamValue& v = at(n);
  if (const auto* i = std::get_if<std::vector<int64_t>>(&v)) return {i->begin(), i->end()};
  return get_as<std::vector<double>>(v, n, "array of floats");
}
const std::vector<std::string>& ParamSet::get_string_list(const std::string& n) const {
  return get_as<std::vector<std::string>>(at(n), n, "array of strings");
}

SourceLocation ParamSet::where(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? SourceLocation{} : it->second;
}

namespace {
std::string value_kind(const ParamValue& v) {
  switch (v.index()) {
    case 0:
      return "boolean";
    case 1:
      return "integer";
    case 2:
      return "float";
    case 3:
      return "string";
    default:
      return "array";
  }
}
std::string check_number(const ParamSpec& spec, double x, const std::string& shown) {
  if (!std::isfinite(x)) return fmt::format("must be a finite number, got {}", shown);
  const bool below = spec.min && (spec.min_exclusive ? x <= *spec.min : x < *spec.min);
  if (below || (spec.max && x > *spec.max)) {
    const char* open = spec.min_exclusive ? "(" : "[";
    if (spec.min && spec.max) return fmt::format("must be in {}{}, {}], got {}", open, *spec.min, *spec.max, shown);
    if (spec.min && spec.min_exclusive) return fmt::format("must be greater than {}, got {}", *spec.min, shown);
    if (spec.min) return fmt::format("must be at least {}, got {}", *spec.min, shown);
    return fmt::format("must be at most {}, got {}", *spec.max, shown);
  }
  return {};
}
std::string check_choice(const ParamSpec& spec, const std::string& s) {
  if (spec.choices.empty() || std::find(spec.choices.begin(), spec.choices.end(), s) != spec.choices.end()) return {};
  std::string list;
  for (const auto& c : spec.choices) list += (list.empty() ? "" : ", ") + quoted(c);
  return fmt::format("must be one of {}, got \"{}\"", list, s);
}
}  // namespace

std::string check_param_value(const ParamSpec& spec, const ParamValue& value) {
  auto mismatch = [&] {
    return fmt::format("expected {}, got {} {}", param_type_name(spec.type), value_kind(value), param_value_str(value));
  };
  switch (spec.type) {
    case ParamType::boolean:
      return std::holds_alternative<bool>(value) ? std::string{} : mismatch();
    case ParamType::integer:
      if (const auto* i = std::get_if<int64_t>(&value))
        return check_number(spec, static_cast<double>(*i), std::to_string(*i));
      return mismatch();
    case ParamType::real:
      if (const auto* i = std::get_if<int64_t>(&value))
        return check_number(spec, static_cast<double>(*i), std::to_string(*i));
      if (const auto* d = std::get_if<double>(&value)) return check_number(spec, *d, real_str(*d));
      return mismatch();
    case ParamType::string:
      if (const auto* s = std::get_if<std::string>(&value)) return check_choice(spec, *s);
      return mismatch();
    case ParamType::integer_list:
      if (const auto* v = std::get_if<std::vector<int64_t>>(&value)) {
        for (int64_t x : *v)
          if (auto e = check_number(spec, static_cast<double>(x), std::to_string(x)); !e.empty())
            return "each element " + e;
        return {};
      }
      return mismatch();
    case ParamType::real_list: {
      std::vector<double> xs;
      if (const auto* v = std::get_if<std::vector<int64_t>>(&value))
        xs.assign(v->begin(), v->end());
      else if (const auto* d = std::get_if<std::vector<double>>(&value))
        xs = *d;
      else
        return mismatch();
      for (double x : xs)
        if (auto e = check_number(spec, x, real_str(x)); !e.empty()) return "each element " + e;
      return {};
    }
    case ParamType::string_list:
      if (const auto* v = std::get_if<std::vector<std::string>>(&value)) {
        for (const auto& s : *v)
          if (auto e = check_choice(spec, s); !e.empty()) return "each element " + e;
        return {};
      }
      return mismatch();
  }
  return mismatch();
}

ParamSet defaults_of(const ParamSchema& schema) {
  ParamSet set;
  for (const auto& spec : schema)
    if (spec.default_value) set.set(spec.name, *spec.default_value);
  return set;
}

std::string nearest_name(const std::string& name, const std::vector<std::string>& candidates) {
  auto distance = [](const std::string& a, const std::string& b) {
    std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
      cur[0] = i;
      for (size_t j = 1; j <= b.size(); ++j)
        cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      std::swap(prev, cur);
    }
    return prev[b.size()];
  };
  std::string best;
  size_t best_d = std::max<size_t>(2, name.size() / 3) + 1;
  for (const auto& c : candidates) {
    const size_t d = distance(name, c);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  return best;
}

}  // namespace moelab

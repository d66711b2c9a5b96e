// Helpers the unit tests share: kernels loaded through the registry (as a recipe loads them),
// random host tensors, conversions, error measures and central finite differences.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moelab/error.hpp"
#include "moelab/kernel.hpp"
#include "moelab/module.hpp"
#include "moelab/registry.hpp"
#include "moelab/rng.hpp"
#include "moelab/tensor.hpp"

namespace moelab::test {

// The build's plugins (the default search path), scanned once per test process.
// The message of the Error (RuntimeError by default; UsageError for bad settings and files) `f`
// throws; "" when it throws nothing. Another exception type escapes and fails the test.
template <class Error = RuntimeError>
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

inline const PluginRegistry& registry() {
  static const PluginRegistry instance = PluginRegistry::with_default_path();
  return instance;
}

// A kernel plugin made with its schema's defaults, then `overrides`. Throws RuntimeError listing
// the folders searched and every problem when the plugin is not there (say, not built yet).
inline std::shared_ptr<Ops> load_kernel(const std::string& name,
                                        const std::vector<std::pair<std::string, ParamValue>>& overrides = {}) {
  const PluginRegistry& plugins = registry();
  const PluginInfo* info = plugins.find(PluginKind::kernel, name);
  if (info == nullptr) {
    std::string why = fmt::format("kernel plugin '{}' not found; searched:", name);
    for (const auto& folder : plugins.searched()) why += fmt::format(" {}", folder.string());
    for (const auto& problem : plugins.problems())
      why += fmt::format("; {}: {}", problem.file.string(), problem.reason);
    throw RuntimeError(why);
  }
  ParamSet params = defaults_of(info->schema);
  for (const auto& [key, value] : overrides) params.set(key, value);
  return plugins.make_kernel(name, params);
}

// The reference "cpu" kernel with default settings, one per test process.
inline Ops& cpu_kernel() {
  static const std::shared_ptr<Ops> ops = load_kernel("cpu");
  return *ops;
}

using Overrides = std::vector<std::pair<std::string, ParamValue>>;

// A plugin's parameters: its schema's defaults, then `overrides` (validated as a recipe would be:
// a test that sets a parameter the schema lacks fails here, not silently).
inline ParamSet plugin_params(PluginKind kind, const std::string& name, const Overrides& overrides = {}) {
  const PluginInfo& info = registry().require(kind, name);
  ParamSet params = defaults_of(info.schema);
  for (const auto& [key, value] : overrides) {
    const auto spec =
        std::find_if(info.schema.begin(), info.schema.end(), [&](const ParamSpec& p) { return p.name == key; });
    if (spec == info.schema.end()) throw RuntimeError(fmt::format("{} has no parameter '{}'", name, key));
    if (auto problem = check_param_value(*spec, value); !problem.empty())
      throw RuntimeError(fmt::format("{}.{}: {}", name, key, problem));
    params.set(key, value);
  }
  return params;
}

// The layer shape the unit tests use: double precision, so gradient checks are tight.
inline LayerSpec layer_spec(int64_t experts, int64_t k, int64_t d_model = 6) {
  LayerSpec spec;
  spec.d_model = d_model;
  spec.num_experts = experts;
  spec.top_k = k;
  spec.dtype = DType::f64;
  return spec;
}

// A host f32/f64 tensor, uniform in [lo, hi) or normal(0, std).
inline Tensor random_uniform(DType dtype, const Shape& shape, Rng& rng, double lo = -1.0, double hi = 1.0) {
  Tensor t = host_tensor(dtype, shape);
  fill_uniform(t, lo, hi, rng);
  return t;
}
inline Tensor random_normal(DType dtype, const Shape& shape, Rng& rng, double std = 1.0) {
  Tensor t = host_tensor(dtype, shape);
  fill_normal(t, std, rng);
  return t;
}

// Every element of a host tensor (any numeric dtype) as a double, and back.
inline std::vector<double> values_of(const Tensor& host) {
  std::vector<double> out(static_cast<size_t>(host.numel()));
  for (int64_t i = 0; i < host.numel(); ++i) out[static_cast<size_t>(i)] = host_value(host, i);
  return out;
}
inline Tensor tensor_of(DType dtype, const Shape& shape, const std::vector<double>& values) {
  Tensor t = host_tensor(dtype, shape);
  if (static_cast<int64_t>(values.size()) != t.numel())
    throw RuntimeError(fmt::format("tensor_of: {} values for shape {}", values.size(), shape_str(shape)));
  for (int64_t i = 0; i < t.numel(); ++i) set_host_value(t, i, values[static_cast<size_t>(i)]);
  return t;
}
// A host copy converted to `dtype` (f64 -> f32 rounds to nearest).
inline Tensor converted(const Tensor& host, DType dtype) {
  return tensor_of(dtype, host.shape(), values_of(host));
}
// An independent host copy (for "before" snapshots of in-place ops).
inline Tensor clone(const Tensor& host) {
  return converted(host, host.dtype());
}

// max_i |actual_i - expected_i| / max(|expected_i|, floor): relative error, absolute below
// `floor` so that entries near zero do not dominate. NaN anywhere (or a size mismatch) gives inf.
inline double max_rel_error(const std::vector<double>& actual, const std::vector<double>& expected,
                            double floor = 1.0) {
  if (actual.size() != expected.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double error = std::abs(actual[i] - expected[i]) / std::max(std::abs(expected[i]), floor);
    if (std::isnan(error)) return INFINITY;
    worst = std::max(worst, error);
  }
  return worst;
}
inline double max_rel_error(const Tensor& actual, const Tensor& expected, double floor = 1.0) {
  if (actual.shape() != expected.shape()) return INFINITY;
  return max_rel_error(values_of(actual), values_of(expected), floor);
}

// <a, b> over all elements, in double.
inline double dot(const Tensor& a, const Tensor& b) {
  double sum = 0;
  for (int64_t i = 0; i < a.numel(); ++i) sum += host_value(a, i) * host_value(b, i);
  return sum;
}

// d/dx <dy, forward(x)> by central differences, one element of x at a time: the gradient a
// backward op must produce for upstream gradient dy. `forward` must not keep x. Truncation error
// is O(step^2 f'''), rounding error O(u |f| / step); step = 1e-6 in double balances them near
// 1e-10 relative for smooth functions of O(1) inputs.
inline Tensor numeric_gradient(const std::function<Tensor(const Tensor&)>& forward, const Tensor& x, const Tensor& dy,
                               double step = 1e-6) {
  Tensor probe = clone(x);
  Tensor gradient = host_tensor(x.dtype(), x.shape());
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double original = host_value(x, i);
    set_host_value(probe, i, original + step);
    const double plus = dot(dy, forward(probe));
    set_host_value(probe, i, original - step);
    const double minus = dot(dy, forward(probe));
    set_host_value(probe, i, original);
    set_host_value(gradient, i, (plus - minus) / (2 * step));
  }
  return gradient;
}

}  // namespace moelab::test

// The conformance kit (conformance.hpp): settings drawn from a plugin's schema, the layer-level
// gradient, plan and determinism checks for routers, expert layouts and balancers, and the kernel
// slot comparison (conformance_kernel.cpp).
#include "moelab/conformance.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <set>

#include "conformance_detail.hpp"
#include "moelab/config.hpp"
#include "moelab/meta_ops.hpp"
#include "moelab/moe_layer.hpp"
#include "moelab/registry.hpp"
#include "moelab/router.hpp"

namespace moelab {

size_t ConformanceReport::failures() const {
  return static_cast<size_t>(std::count_if(results.begin(), results.end(), [](const auto& r) { return !r.passed; }));
}

namespace {

// The kit's layer: small enough that a finite-difference pass over every element takes seconds.
constexpr int64_t kModel = 8, kExperts = 8, kTopK = 2, kTokens = 16, kSequences = 2;
// Five-point central differences in double, f' = (-f(+2h) + 8 f(+h) - 8 f(-h) + f(-2h)) / 12h:
// truncation ~h^4 f^(5) ~ 1e-16, rounding ~1e-16 |L| / h ~ 1e-12 |L|, so large drawn weights (a
// loss of 10^3) still leave three orders of margin under the tolerance.
constexpr double kStep = 1e-4;
constexpr double kTolerance = 1e-6;               // relative, with a floor of 1e-3 on the scale
constexpr double kMaxSkipped = 0.25;              // elements whose perturbation changes the routing
constexpr int64_t kKitWidth = 8;                  // d_ff of the expert layout under test, unless --set
constexpr int64_t kMaxDrawnInt = 16;              // drawn integers stay small: the layer stays small
constexpr int64_t kMaxDrawnParameters = 1 << 14;  // a drawn setting with a larger layer is drawn again
constexpr int64_t kMaxCheckedPerTensor = 384;     // elements of one tensor checked (evenly spread)

struct Setting {
  std::string label;
  ParamSet params;
};

LayerSpec kit_spec() {
  LayerSpec s;
  s.d_model = kModel;
  s.num_experts = kExperts;
  s.top_k = kTopK;
  s.dtype = DType::f64;
  return s;
}

bool has_param(const ParamSchema& schema, const std::string& name) {
  return std::any_of(schema.begin(), schema.end(), [&](const ParamSpec& p) { return p.name == name; });
}

// A companion plugin with its defaults; an expert width small enough for the kit.
PluginChoice companion(const PluginRegistry& registry, PluginKind kind, const std::string& name) {
  const PluginInfo& info = registry.require(kind, name);
  PluginChoice c;
  c.type = name;
  c.params = defaults_of(info.schema);
  if (kind == PluginKind::experts && has_param(info.schema, "d_ff")) c.params.set("d_ff", int64_t{6});
  return c;
}

// A value for `spec` drawn within its bounds and choices; none for what the kit leaves at its
// default (free strings, lists).
std::optional<ParamValue> draw(const ParamSpec& spec, Rng& rng) {
  const double lo = spec.min.value_or(-1e300), hi = spec.max.value_or(1e300);
  switch (spec.type) {
    case ParamType::boolean:
      return ParamValue{rng.below(2) == 1};
    case ParamType::integer: {
      const int64_t fallback = spec.default_value ? std::get<int64_t>(*spec.default_value) : 1;
      const int64_t first = spec.min ? static_cast<int64_t>(std::ceil(lo + (spec.min_exclusive ? 0.5 : 0))) : 0;
      const int64_t last = std::min<int64_t>(spec.max ? static_cast<int64_t>(hi) : first + kMaxDrawnInt,
                                             std::max(first, fallback) + kMaxDrawnInt);
      if (last < first) return std::nullopt;
      return ParamValue{first + static_cast<int64_t>(rng.below(static_cast<uint64_t>(last - first + 1)))};
    }
    case ParamType::real: {
      // Around the default (a quarter to four times it), or in [0, 1] for a default of 0; within
      // the bounds. Far from the default lie settings no one trains with (a gate initialised at
      // std 0.9), where double rounding of a large loss, not the backward, decides the check.
      const double fallback = spec.default_value ? std::get<double>(*spec.default_value) : 1.0;
      double x =
          fallback == 0 ? rng.uniform(0.0, 1.0) : fallback * std::exp(rng.uniform(std::log(0.25), std::log(4.0)));
      x = std::stod(fmt::format("{:.3g}", x));  // three significant digits: a setting a reader types back
      if (x < lo || x > hi || (spec.min_exclusive && x <= lo)) return std::nullopt;
      return ParamValue{x};
    }
    case ParamType::string:
      if (spec.choices.empty()) return std::nullopt;
      return ParamValue{spec.choices[rng.below(spec.choices.size())]};
    default:
      return std::nullopt;
  }
}

// Why a setting cannot be checked ("" when it can): the plugin's check() refuses it at the kit's
// shapes, or its layer is too large to check every element.
using Refusal = std::function<std::string(const ParamSet&)>;

struct Settings {
  std::vector<Setting> list;  // the defaults (with --set) first, then the drawn ones
  std::string summary;        // how many were drawn, and why some were not kept
  bool defaults_usable = true;
  std::string defaults_problem;
};

// The defaults with the caller's overrides, then options.random_settings drawn settings that
// `refusal` accepts (up to 20 draws each).
Settings settings_of(const PluginInfo& info, const ConformanceOptions& options, const Refusal& refusal) {
  ParamSet base = defaults_of(info.schema);
  std::set<std::string> fixed;
  std::string fixed_label;
  for (const auto& entry : options.overrides) {
    const std::string &key = entry.first, &text = entry.second;  // named: clang 14 lambdas cannot capture bindings
    const auto it =
        std::find_if(info.schema.begin(), info.schema.end(), [&](const ParamSpec& p) { return p.name == key; });
    if (it == info.schema.end()) {
      std::vector<std::string> names;
      for (const auto& p : info.schema) names.push_back(p.name);
      const std::string near = nearest_name(key, names);
      throw UsageError(fmt::format("--set {}: {} '{}' has no parameter '{}'{}", key, plugin_kind_name(info.kind),
                                   info.name, key, near.empty() ? "" : fmt::format(" (did you mean '{}'?)", near)));
    }
    base.set(key, parse_param_text(*it, text));
    fixed.insert(key);
    fixed_label += fmt::format("{}{}={}", fixed_label.empty() ? "" : ", ", key, text);
  }
  // An expert layout's width is the kit's (8) unless the caller sets it: the defaults are sized for
  // real models, which would make every element's finite difference take minutes.
  if (info.kind == PluginKind::experts && has_param(info.schema, "d_ff") && !fixed.count("d_ff")) {
    base.set("d_ff", kKitWidth);
    fixed.insert("d_ff");
    fixed_label += fmt::format("{}d_ff={} (the kit's width)", fixed_label.empty() ? "" : ", ", kKitWidth);
  }
  Settings out;
  out.defaults_problem = refusal(base);
  out.defaults_usable = out.defaults_problem.empty();
  if (out.defaults_usable) out.list.push_back({fixed_label.empty() ? "defaults" : "defaults, " + fixed_label, base});
  Rng rng(options.seed, 0xc0f0);
  int drawn = 0, tries = 0, refused = 0;
  std::string first_refusal;
  for (; drawn < options.random_settings && tries < 20 * options.random_settings; ++tries) {
    ParamSet params = base;
    std::string label;
    for (const ParamSpec& p : info.schema) {
      if (fixed.count(p.name) || rng.below(2) == 0) continue;
      if (auto value = draw(p, rng)) {
        if (!check_param_value(p, *value).empty()) continue;
        params.set(p.name, *value);
        label += fmt::format("{}{}={}", label.empty() ? "" : ", ", p.name, param_value_str(*value));
      }
    }
    if (label.empty()) continue;
    if (const std::string why = refusal(params); !why.empty()) {
      if (first_refusal.empty()) first_refusal = fmt::format("{} ({})", label, why);
      ++refused;
      continue;
    }
    out.list.push_back({fmt::format("drawn {}: {}", ++drawn, label), params});
  }
  out.summary = fmt::format("defaults{} and {} of {} drawn settings ({} draws, {} refused{})",
                            out.defaults_usable ? "" : " (refused)", drawn, options.random_settings, tries, refused,
                            first_refusal.empty() ? "" : "; first refused: " + first_refusal);
  return out;
}

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += host_value(a, i) * host_value(b, i);
  return s;
}

Tensor host_copy(Ops& ops, const Tensor& t) {
  Tensor out = host_tensor(t.dtype(), t.shape());
  ops.copy(t, out);
  return out;
}

std::vector<int32_t> ints_of(Ops& ops, const Tensor& t) {
  if (!t.defined()) return {};
  const Tensor host = host_copy(ops, t);
  return {host.data<int32_t>(), host.data<int32_t>() + host.numel()};
}

// The routing a forward chose: each assignment's expert and the expert that served it.
std::vector<int32_t> routing_of(Ops& ops, const MoeLayer& layer) {
  std::vector<int32_t> out = ints_of(ops, layer.last_plan().expert);
  const auto& served = layer.last_final_expert();
  out.insert(out.end(), served.begin(), served.end());
  return out;
}

struct KitData {
  Tensor x, r, ids;
};

// Token ids (for hash routing) are below 50, or below the plugin's own vocab_size when it has one.
int64_t token_id_limit(const MoeConfig& moe) {
  int64_t limit = 50;
  for (const ParamSet* params : {&moe.router.params, &moe.experts.params})
    if (params->values().count("vocab_size")) {
      if (const auto* v = std::get_if<int64_t>(&params->values().at("vocab_size")); v && *v > 0)
        limit = std::min(limit, *v);
    }
  return limit;
}

KitData kit_data(uint64_t seed, int64_t id_limit) {
  Rng rng(seed, 0xda7a);
  KitData d{host_tensor(DType::f64, {kTokens, kModel}), host_tensor(DType::f64, {kTokens, kModel}),
            host_tensor(DType::i32, {kTokens})};
  fill_normal(d.x, 1.0, rng);
  fill_normal(d.r, 1.0, rng);
  for (int64_t t = 0; t < kTokens; ++t)
    d.ids.data<int32_t>()[t] = static_cast<int32_t>(rng.below(static_cast<uint64_t>(id_limit)));
  return d;
}

// dL/dx and dL/dparameter against central differences, L = <y, R> + aux.
ConformanceResult gradient_check(const PluginRegistry& registry, Ops& ops, const MoeConfig& moe, const LayerSpec& spec,
                                 bool training, uint64_t seed) {
  ConformanceResult result{"gradients", "", "", false};
  const std::string where = fmt::format("{}, {}", overflow_name(moe.overflow), training ? "training" : "evaluation");
  Rng rng(seed);
  MoeLayer layer(moe, spec, registry, ops, rng);
  KitData data = kit_data(seed, token_id_limit(moe));
  const LayerInput input{training, 3, kSequences, kTokens / kSequences, &data.ids};
  const auto loss = [&] {
    const Tensor y = layer.forward(data.x, input);
    return dot(host_copy(ops, y), data.r) + layer.stats().aux_loss;
  };
  zero_grads(ops, layer);
  const double base = loss();
  if (!std::isfinite(base)) {
    result.detail = fmt::format("{}: the loss is {}", where, base);
    return result;
  }
  const std::vector<int32_t> routing = routing_of(ops, layer);
  const Tensor dx = host_copy(ops, layer.backward(data.r));
  double worst = 0;
  std::string worst_at;
  int64_t elements = 0, skipped = 0;
  const auto check = [&](Tensor& values, const Tensor& analytic, const std::string& what) {
    const int64_t n = values.numel(), stride = std::max<int64_t>(1, n / kMaxCheckedPerTensor);
    for (int64_t i = (stride > 1 ? static_cast<int64_t>(seed % static_cast<uint64_t>(stride)) : 0); i < n;
         i += stride) {
      const double saved = host_value(values, i);
      double side[4];  // f(+2h), f(+h), f(-h), f(-2h)
      bool same = true;
      const double offsets[4] = {2 * kStep, kStep, -kStep, -2 * kStep};
      for (int j = 0; j < 4; ++j) {
        set_host_value(values, i, saved + offsets[j]);
        side[j] = loss();
        same = same && routing_of(ops, layer) == routing;
      }
      set_host_value(values, i, saved);
      ++elements;
      if (!same) {
        ++skipped;
        continue;
      }
      const double numeric = (-side[0] + 8 * side[1] - 8 * side[2] + side[3]) / (12 * kStep);
      const double a = host_value(analytic, i);
      const double error = std::abs(a - numeric) / std::max(1e-3, std::abs(a) + std::abs(numeric));
      if (error > worst || !std::isfinite(a)) {
        worst = std::isfinite(a) ? error : INFINITY;
        worst_at = fmt::format("{}[{}]: backward {:.9g}, differences {:.9g}", what, i, a, numeric);
      }
    }
  };
  check(data.x, dx, "x");
  // The kit's layer runs on the reference (cpu) kernel, so parameters are host tensors perturbed in place.
  for (const auto& [name, p] : layer.named_parameters()) check(p->value, host_copy(ops, p->grad), name);
  const double skipped_share = elements > 0 ? static_cast<double>(skipped) / static_cast<double>(elements) : 0;
  result.passed = worst < kTolerance && skipped_share <= kMaxSkipped;
  result.detail = fmt::format("{}: max relative error {:.2g} over {} elements ({} skipped: routing changed){}", where,
                              worst, elements, skipped, worst_at.empty() ? "" : "; worst " + worst_at);
  if (skipped_share > kMaxSkipped)
    result.detail += fmt::format("; more than {:.0f}% skipped, so the check says little", 100 * kMaxSkipped);
  return result;
}

// The routing plan's contract, read from a training forward.
ConformanceResult plan_check(const PluginRegistry& registry, Ops& ops, const MoeConfig& moe, const LayerSpec& spec,
                             uint64_t seed) {
  ConformanceResult result{"plan", "", "", false};
  Rng rng(seed);
  MoeLayer layer(moe, spec, registry, ops, rng);
  KitData data = kit_data(seed, token_id_limit(moe));
  layer.forward(data.x, LayerInput{true, 1, kSequences, kTokens / kSequences, &data.ids});
  const RoutingPlan& plan = layer.last_plan();
  const int64_t experts = layer.spec().num_experts;
  std::vector<std::string> problems;
  const int64_t a = plan.expert.defined() ? plan.expert.numel() : -1;
  for (const auto& [tensor, what] : {std::pair{&plan.token, "token"}, {&plan.weight, "weight"}, {&plan.rank, "rank"}})
    if (!tensor->defined() || tensor->numel() != a)
      problems.push_back(
          fmt::format("plan.{} has {} entries, plan.expert {}", what, tensor->defined() ? tensor->numel() : -1, a));
  const std::vector<int32_t> token = ints_of(ops, plan.token), expert = ints_of(ops, plan.expert);
  if (plan.top_k > 0) {
    if (a != kTokens * plan.top_k)
      problems.push_back(fmt::format("token choice with top_k {} must give T * k = {} assignments, got {}", plan.top_k,
                                     kTokens * plan.top_k, a));
    for (size_t i = 0; i < token.size(); ++i)
      if (token[i] != static_cast<int32_t>(static_cast<int64_t>(i) / plan.top_k)) {
        problems.push_back(fmt::format("not token-major: assignment {} has token {}", i, token[i]));
        break;
      }
  }
  for (size_t i = 0; i < token.size(); ++i)
    if (token[i] < 0 || token[i] >= kTokens) {
      problems.push_back(fmt::format("assignment {} has token {}, outside [0, {})", i, token[i], kTokens));
      break;
    }
  for (size_t i = 0; i < expert.size(); ++i)
    if (expert[i] < -1 || expert[i] >= experts) {
      problems.push_back(fmt::format("assignment {} has expert {}, outside [0, {}) and not -1", i, expert[i], experts));
      break;
    }
  const auto finite = [&](const Tensor& t, const char* what) {
    if (!t.defined()) return;
    const Tensor host = host_copy(ops, t);
    for (int64_t i = 0; i < host.numel(); ++i)
      if (!std::isfinite(host_value(host, i))) {
        problems.push_back(fmt::format("plan.{}[{}] is {}", what, i, host_value(host, i)));
        return;
      }
  };
  finite(plan.weight, "weight");
  finite(plan.probs, "probs");
  finite(plan.logits, "logits");
  for (const auto& [tensor, what] : {std::pair{&plan.probs, "probs"}, {&plan.logits, "logits"}})
    if (tensor->defined() && tensor->shape() != Shape{kTokens, experts})
      problems.push_back(
          fmt::format("plan.{} is {}, expected [{}, {}]", what, shape_str(tensor->shape()), kTokens, experts));
  const int64_t undispatched = std::count(expert.begin(), expert.end(), -1);
  result.passed = problems.empty();
  result.detail = problems.empty() ? fmt::format("{} assignments, {} not dispatched", a, undispatched)
                                   : fmt::format("{}", fmt::join(problems, "; "));
  return result;
}

// Two layers from one seed, one input: bit-identical outputs, in training and evaluation.
ConformanceResult determinism_check(const PluginRegistry& registry, Ops& ops, const MoeConfig& moe,
                                    const LayerSpec& spec, uint64_t seed) {
  ConformanceResult result{"determinism", "", "", true};
  KitData data = kit_data(seed, token_id_limit(moe));
  for (bool training : {true, false}) {
    std::vector<double> outputs[2];
    for (auto& out : outputs) {
      Rng rng(seed);
      MoeLayer layer(moe, spec, registry, ops, rng);
      const Tensor y =
          host_copy(ops, layer.forward(data.x, LayerInput{training, 5, kSequences, kTokens / kSequences, &data.ids}));
      for (int64_t i = 0; i < y.numel(); ++i) out.push_back(host_value(y, i));
      out.push_back(layer.stats().aux_loss);
    }
    if (outputs[0] != outputs[1]) {
      result.passed = false;
      result.detail = fmt::format("{}: two layers made from seed {} give different outputs",
                                  training ? "training" : "evaluation", seed);
      return result;
    }
  }
  result.detail = "training and evaluation: bit-identical";
  return result;
}

// Runs `check`, turning an exception into a failed result that says what was thrown.
template <class F>
ConformanceResult guarded(const char* check, F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return ConformanceResult{check, "", fmt::format("threw: {}", e.what()), false};
  }
}

// The layer the kit checks a setting in: the plugin under test beside default companions.
struct KitLayer {
  MoeConfig moe;
  LayerSpec spec;
};

KitLayer kit_layer(const PluginRegistry& registry, const PluginInfo& info, const ParamSet& params) {
  KitLayer k;
  k.spec = kit_spec();
  MoeConfig& moe = k.moe;
  moe.num_experts = kExperts;
  moe.top_k = kTopK;
  moe.capacity_factor = moe.eval_capacity_factor = 1.0;
  moe.dead_expert_window = 1 << 20;
  moe.overflow = Overflow::dropless;
  moe.router = companion(registry, PluginKind::router, "softmax_topk");
  moe.experts = companion(registry, PluginKind::experts, "glu");
  const PluginChoice tested{info.name, params, "conformance"};
  if (info.kind == PluginKind::router) moe.router = tested;
  if (info.kind == PluginKind::experts) {
    moe.experts = tested;
    if (info.manifest->adjust_layer) info.manifest->adjust_layer(params, k.spec);
  }
  if (info.kind == PluginKind::balancer) moe.balancers = {tested};
  return k;
}

void layer_checks(const PluginRegistry& registry, const PluginInfo& info, const ConformanceOptions& options,
                  const std::function<void(ConformanceResult)>& emit) {
  ParamSet reference_params = defaults_of(registry.require(PluginKind::kernel, options.reference_kernel).schema);
  const std::shared_ptr<Ops> ops = registry.make_kernel(options.reference_kernel, reference_params);
  const Refusal refusal = [&](const ParamSet& params) -> std::string {
    const KitLayer k = kit_layer(registry, info, params);
    if (info.manifest->check) {
      ParamProblems problems;
      info.manifest->check(params, k.spec, problems);
      if (!problems.empty())
        return fmt::format("its check() refuses it at d_model {}, {} experts, top-{}: {}", k.spec.d_model,
                           k.spec.num_experts, k.spec.top_k, problems.front().message);
    }
    try {
      Rng meta_rng(options.seed);
      const std::shared_ptr<Ops> meta = make_meta_ops();
      MoeLayer counted(k.moe, k.spec, registry, *meta, meta_rng);
      int64_t parameters = 0;
      for (Parameter* p : counted.parameters()) parameters += p->value.numel();
      if (parameters > kMaxDrawnParameters)
        return fmt::format("its layer has {} parameters, more than the kit's {}", parameters, kMaxDrawnParameters);
    } catch (const std::exception& e) {
      return fmt::format("its layer cannot be made: {}", e.what());
    }
    return "";
  };
  const Settings settings = settings_of(info, options, refusal);
  emit({"settings", "", settings.summary, settings.defaults_usable});
  if (!settings.defaults_usable)
    emit({"settings", "defaults", fmt::format("{}; fix parameters with --set KEY=VALUE", settings.defaults_problem),
          false});
  for (const Setting& setting : settings.list) {
    KitLayer k = kit_layer(registry, info, setting.params);
    const auto labelled = [&](ConformanceResult r) {
      r.setting = setting.label;
      emit(std::move(r));
    };
    if (info.kind == PluginKind::router)
      labelled(guarded("plan", [&] { return plan_check(registry, *ops, k.moe, k.spec, options.seed); }));
    labelled(guarded("determinism", [&] { return determinism_check(registry, *ops, k.moe, k.spec, options.seed); }));
    for (Overflow overflow : {Overflow::dropless, Overflow::drop, Overflow::reroute})
      for (bool training : {true, false}) {
        k.moe.overflow = overflow;
        labelled(guarded("gradients",
                         [&] { return gradient_check(registry, *ops, k.moe, k.spec, training, options.seed); }));
      }
  }
}

void kernel_checks(const PluginRegistry& registry, const PluginInfo& info, const ConformanceOptions& options,
                   const std::function<void(ConformanceResult)>& emit) {
  ParamSet params = defaults_of(info.schema);
  for (const auto& entry : options.overrides) {
    const std::string &key = entry.first, &text = entry.second;  // named: clang 14 lambdas cannot capture bindings
    const auto it =
        std::find_if(info.schema.begin(), info.schema.end(), [&](const ParamSpec& p) { return p.name == key; });
    if (it == info.schema.end())
      throw UsageError(fmt::format("--set {}: kernel '{}' has no parameter '{}'", key, info.name, key));
    params.set(key, parse_param_text(*it, text));
  }
  const std::shared_ptr<Ops> kernel = registry.make_kernel(info.name, params);
  const std::shared_ptr<Ops> reference = registry.make_kernel(
      options.reference_kernel, defaults_of(registry.require(PluginKind::kernel, options.reference_kernel).schema));
  for (const conformance_detail::SlotResult& slot :
       conformance_detail::compare_kernel_slots(*kernel, *reference, options.seed)) {
    ConformanceResult r{"slot", fmt::format("{} {}", slot.dtype, slot.slot), "", slot.passed()};
    r.detail = slot.failure.empty()
                   ? fmt::format("max relative error {:.2g} (tolerance {:.0e})", slot.error, slot.tolerance)
                   : slot.failure;
    emit(std::move(r));
  }
}

}  // namespace

ConformanceReport run_conformance(const PluginRegistry& registry, PluginKind kind, const std::string& name,
                                  const ConformanceOptions& options,
                                  const std::function<void(const ConformanceResult&)>& on_result) {
  const PluginInfo& info = registry.require(kind, name);
  ConformanceReport report;
  report.kind = kind;
  report.name = name;
  report.file = info.file.string();
  const auto emit = [&](ConformanceResult r) {
    if (on_result) on_result(r);
    report.results.push_back(std::move(r));
  };
  if (kind == PluginKind::kernel)
    kernel_checks(registry, info, options, emit);
  else if (kind == PluginKind::comm)
    conformance_detail::comm_checks(registry, info, emit);
  else
    layer_checks(registry, info, options, emit);
  return report;
}

}  // namespace moelab

// The conformance kit (`moelab test-plugin`): every check the in-tree plugins pass, run on any
// plugin the registry finds, so an out-of-tree author gets the framework's own verdict.
//
// Router, expert layout, balancer: the plugin inside a small MoE layer in double on the reference
// (cpu) kernel — d_model 8, 8 experts, top-2, 16 tokens in 2 sequences; a router is paired with
// the `glu` layout, a layout or a balancer with `softmax_topk` — for its defaults (with the
// caller's --set values) and for settings drawn at random from its schema that its check()
// accepts (token ids for hash routing are drawn below 50, or below the plugin's own vocab_size):
//   gradients     dL/dx and dL/dparameter for every element, against central differences
//                 (L = <y, R> + aux loss, h = 1e-6, relative error < 1e-6), under each capacity
//                 policy (dropless, drop, reroute; factor 1.0), in training and in evaluation.
//                 An element whose perturbation changes the routing (the loss is not
//                 differentiable there) is skipped; more than a quarter skipped is a failure.
//   plan          (routers) the routing plan's contract: token, expert, weight and rank of one
//                 length A; token choice token-major with A = T * top_k; experts in [0, E) or -1
//                 (not dispatched); weights, probs and logits finite; probs and logits [T, E].
//   determinism   two layers made from one seed give bit-identical outputs on one input.
// Kernel: every Ops slot against the cpu kernel on fresh random inputs, f32 and f64
// (conformance_kernel.cpp states the tolerances).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "moelab/params.hpp"
#include "moelab/plugin.hpp"

namespace moelab {

class PluginRegistry;

struct ConformanceOptions {
  std::vector<std::pair<std::string, std::string>> overrides;  // key, value as TOML text (--set)
  int random_settings = 3;                                     // settings drawn besides the defaults
  uint64_t seed = 1;
  std::string reference_kernel = "cpu";
};

struct ConformanceResult {
  std::string check;    // "gradients", "plan", "determinism", "slot"
  std::string setting;  // "defaults", "drawn 2: capacity_factor=1.5, ...", "f32 gemm (trans_b)"
  std::string detail;   // "dropless, training: max error 3.1e-09 over 212 elements (0 skipped)"
  bool passed = false;
};

struct ConformanceReport {
  PluginKind kind{};
  std::string name, file;
  std::vector<ConformanceResult> results;
  size_t failures() const;
};

// Runs every check on the plugin `name` of `kind`. UsageError for an unknown plugin or a bad
// --set (unknown key, wrong type); a check that fails is a result, not an exception.
ConformanceReport run_conformance(const PluginRegistry& registry, PluginKind kind, const std::string& name,
                                  const ConformanceOptions& options,
                                  const std::function<void(const ConformanceResult&)>& on_result = {});

}  // namespace moelab

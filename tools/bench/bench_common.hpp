// What moelab-bench's two benchmarks share: the shape of a layer, round-robin timing, a plugin's
// defaults.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "moelab/config.hpp"
#include "moelab/moe_layer.hpp"
#include "moelab/registry.hpp"

namespace moelab::bench {

using Clock = std::chrono::steady_clock;

struct BenchShape {
  int64_t tokens, d_model, d_ff, experts, top_k;
};

// Median seconds of each body over `repeats` rounds, after one warm-up run of each (first-touch
// allocation, OpenBLAS thread start). Each round runs every body once, back to back, so that the
// dense reference and the layer are timed in the same minutes: on a shared machine the load
// drifts, and timing one after the other's repeats would compare different machines.
inline std::vector<double> median_seconds(int repeats, const std::vector<std::function<void()>>& bodies) {
  for (const auto& body : bodies) body();
  std::vector<std::vector<double>> times(bodies.size());
  for (int round = 0; round < repeats; ++round)
    for (size_t b = 0; b < bodies.size(); ++b) {
      const auto start = Clock::now();
      bodies[b]();
      times[b].push_back(std::chrono::duration<double>(Clock::now() - start).count());
    }
  std::vector<double> medians;
  for (auto& t : times) {
    std::sort(t.begin(), t.end());
    medians.push_back(t[t.size() / 2]);
  }
  return medians;
}

inline PluginChoice defaults(const PluginRegistry& registry, PluginKind kind, const std::string& name) {
  PluginChoice c;
  c.type = name;
  c.params = defaults_of(registry.require(kind, name).schema);
  return c;
}

// The benchmarked layer with `experts` experts: softmax_topk router, glu experts of the shape's
// d_ff, dropless, f32 (the one-process reference of --parallel has fewer experts).
MoeConfig layer_config(const PluginRegistry& registry, const BenchShape& s, int64_t experts);
LayerSpec layer_spec(const BenchShape& s, int64_t experts);
// Fresh N(0, 1) rows [rows, d] on the kernel's device.
Tensor random_rows(Ops& ops, int64_t rows, int64_t d, Rng& rng);
// The kernel plugin `name` with its default parameters.
std::shared_ptr<Ops> default_kernel(const PluginRegistry& registry, const std::string& name);

// Parses T,d,F,E,k; false when it is not five positive integers with k <= E.
bool parse_shape(const char* text, BenchShape& s);

// moelab-bench --parallel (parallel_bench.cpp): the MoE layer on the ranks mpirun started.
// moelab-bench --attention (op_bench.cpp).
int attention_bench(int repeats, const std::string& kernel);
// moelab-bench --optimizer (op_bench.cpp).
int optimizer_bench(int repeats, const std::string& kernel);
int parallel_bench(const std::vector<BenchShape>& shapes, int repeats, const std::string& kernel);
// moelab-bench --train-step RECIPE (train_bench.cpp): a training step in f32 and bf16, with MFU.
int train_step_bench(const std::string& recipe, int repeats, const std::string& kernel);

}  // namespace moelab::bench

// The typed, validated form of a recipe: built once, at construction, from the resolved recipe
// and the schemas of the core sections and of every plugin it names. Nothing downstream reads
// TOML; everything reads these structs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "moelab/module.hpp"
#include "moelab/params.hpp"
#include "moelab/plugin.hpp"
#include "moelab/recipe.hpp"

namespace moelab {

class PluginRegistry;

// A plugin a recipe names, with its validated parameters.
struct PluginChoice {
  std::string type;  // the plugin's name
  ParamSet params;   // validated, defaults filled in
  std::string key;   // where in the recipe: "moe.router", "moe.balancers[1]"
};

enum class Overflow { drop, reroute, dropless };
const char* overflow_name(Overflow overflow);

struct MoeConfig {
  int64_t num_experts = 8;            // routed experts, as the recipe states them
  int64_t top_k = 2;                  // as the recipe states it
  double capacity_factor = 1.25;      // training
  double eval_capacity_factor = 2.0;  // evaluation
  Overflow overflow = Overflow::drop;
  int64_t dead_expert_window = 10000;  // tokens: an expert idle this long is reported dead
  PluginChoice router, experts;
  std::vector<PluginChoice> balancers;
};

struct ModelConfig {
  int64_t d_model = 64;
  DType dtype = DType::f32;
};

struct TrainConfig {
  int64_t steps = 200;
  int64_t batch_size = 8;  // sequences per step
  int64_t seq_len = 64;    // tokens per sequence
  double lr = 1e-3;
  double weight_decay = 0.0;
  double grad_clip = 1.0;  // global norm; 0 disables
  int64_t log_every = 10;
  int64_t eval_every = 50;  // 0 disables
  int64_t eval_batches = 4;
};

// The built-in synthetic task until the language-model trainer lands: tokens drawn from a
// mixture of clusters, each cluster with its own random teacher map, so experts have real
// structure to specialise on and routing quality shows in the loss.
struct TaskConfig {
  std::string kind = "regression";
  int64_t clusters = 8;
  double noise = 0.01;
};

struct RunConfig {
  std::string name;
  std::string description;
  uint64_t seed = 1;
  std::string device = "cpu";
  PluginChoice kernel;  // [kernel]: type defaults to the device's name
  std::vector<std::filesystem::path> plugin_paths;  // [plugins] paths, absolute
  ModelConfig model;
  MoeConfig moe;
  TrainConfig train;
  TaskConfig task;
  std::filesystem::path output_dir = "runs";  // [output] dir, relative to the working directory

  // The MoE layer as the router and balancers see it: d_model, dtype, and num_experts/top_k after
  // the expert layout's adjust_layer (a fine-grained layout multiplies both).
  LayerSpec layer;
};

// Scans recipe [plugins] paths into `registry`, validates every section and plugin table, fills
// every default into `recipe` (so the printed recipe is complete) and returns the typed config.
// Throws UsageError with all diagnostics (unknown keys with suggestions, wrong types, ranges,
// unknown plugins with the known names, cross-field rules), each at file:line:column.
RunConfig build_config(Recipe& recipe, PluginRegistry& registry);

// The core sections' schemas (for docs and `moelab plugins --describe core`).
struct SectionSchema {
  std::string key;  // "", "model", "moe", "train", ...
  ParamSchema params;
};
std::vector<SectionSchema> core_schema();

}  // namespace moelab

// Running what a recipe describes and leaving a run folder behind:
//   recipe.toml     the fully resolved recipe (rerun it with `moelab run RUN_DIR/recipe.toml`)
//   metrics.jsonl   one JSON object per logged step, and one per evaluation ("kind": "eval")
//   summary.json    final figures
//   report.md       what a person reads: loss against its floor, expert load, drops, dead experts
// Until the language-model trainer lands, the task is TaskConfig's synthetic regression.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include "moelab/config.hpp"

namespace moelab {

class PluginRegistry;

struct ProgressUpdate {
  int64_t step = 0, steps = 0;
  double loss = 0;
  double tokens_per_second = 0;
  double seconds_left = 0;
};

struct RunResult {
  double final_train_loss = 0;
  double final_eval_loss = 0;
  double loss_floor = 0;       // the task's irreducible loss (noise variance)
  double drop_fraction = 0;    // over the last evaluation (evaluation capacity factor)
  double train_drop_fraction = 0;  // mean over every training step (training capacity factor)
  double max_violation = 0;    // over the last evaluation
  int64_t dead_experts = 0;    // at the end of training
  double seconds = 0;
  double tokens_per_second = 0;
};

// Trains and evaluates; writes the run folder's files (the folder must exist and be empty).
// `progress` is called after every step.
RunResult run_experiment(const RunConfig& config, const std::string& resolved_recipe, const PluginRegistry& registry,
                         const std::filesystem::path& run_dir,
                         const std::function<void(const ProgressUpdate&)>& progress);

}  // namespace moelab

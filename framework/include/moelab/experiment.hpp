// Running what a recipe describes and leaving a run folder behind:
//   recipe.toml              the fully resolved recipe (rerun it with `moelab run RUN_DIR/recipe.toml`)
//   metrics.jsonl            one JSON object per logged step, and one per evaluation ("kind": "eval")
//   checkpoint.safetensors   weights, optimizer and balancer state (language models; `--resume`)
//   summary.json             final figures (written last: a folder without it is unfinished)
//   report.md                what a person reads: loss against its floor, expert load, drops, dead experts
// A recipe whose model has a vocabulary trains the MoE transformer (transformer.hpp) on [data];
// one without trains its single MoE layer on TaskConfig's synthetic regression.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include "moelab/config.hpp"

namespace moelab {

class PluginRegistry;
class Parallel;

struct ProgressUpdate {
  int64_t step = 0, steps = 0;
  double loss = 0;
  double tokens_per_second = 0;
  double seconds_left = 0;
  std::string warning;  // when set, this update only carries it ("step 40: the loss jumped ...")
};

struct RunOptions {
  bool resume = false;                           // continue the run in run_dir from its checkpoint
  int64_t stop_at = 0;                           // > 0: checkpoint after this step and stop; the folder stays resumable
  const std::atomic<bool>* interrupt = nullptr;  // when set (Ctrl-C): checkpoint after the current step, stop
  // Several ranks (language models): every rank calls run_experiment with its Parallel, and
  // rank 0 writes the run folder. Null: one process.
  const Parallel* parallel = nullptr;
};

struct RunResult {
  bool finished = true;  // false: stopped early (stop_at, interrupt) with a checkpoint to resume from
  int64_t steps_done = 0;
  double final_train_loss = 0;
  double final_eval_loss = 0;
  double loss_floor = 0;               // the task's irreducible loss: noise variance, or the data's optimal loss
  double entropy_rate = std::nan("");  // language models on the Markov corpus: the asymptotic floor
  double drop_fraction = 0;            // over the last evaluation (evaluation capacity factor)
  double train_drop_fraction = 0;      // mean over every training step (training capacity factor)
  double max_violation = 0;            // over the last evaluation
  int64_t dead_experts = 0;            // at the end of training
  double seconds = 0;
  double tokens_per_second = 0;
};

// Trains and evaluates; writes the run folder's files (the folder must exist, and be empty unless
// resuming). `progress` is called after every step.
RunResult run_experiment(const RunConfig& config, const std::string& resolved_recipe, const PluginRegistry& registry,
                         const std::filesystem::path& run_dir,
                         const std::function<void(const ProgressUpdate&)>& progress, const RunOptions& options = {});

// `moelab reshard`: converts the checkpoint of the unfinished run in run_dir to its experts split
// over `expert` ranks (1: one process), and sets its recipe.toml's [parallel] to that split, so
// that `mpirun -np N moelab run --resume run_dir` continues it there. The new slices are written
// beside the old and committed by checkpoint.safetensors, renamed into place last, as a run does.
struct ReshardResult {
  int64_t from = 1, to = 1, step = 0;
  size_t tensors_split = 0;  // per-expert tensors (weights and AdamW moments) joined and cut again
};
ReshardResult reshard_run(const std::filesystem::path& run_dir, int64_t expert);

// The language-model trainer behind run_experiment (lm_trainer.cpp).
RunResult train_language_model(const RunConfig& config, const std::string& resolved_recipe,
                               const PluginRegistry& registry, const std::filesystem::path& run_dir,
                               const std::function<void(const ProgressUpdate&)>& progress, const RunOptions& options);

}  // namespace moelab

// The parts of the language-model trainer (lm_trainer.cpp runs the loop), one job each:
//   data_feed.cpp     the step's global batch and this rank's share of it
//   gradients.cpp     the data-parallel gradient sums and the global-norm clip
//   evaluation.cpp    the held-out loss and expert load
//   metrics_log.cpp   metrics.jsonl: train, eval, warning and error lines (rank 0 writes)
//   checkpoint.cpp    the checkpoint files of every layout, and resuming from them
//   report.cpp        summary.json and report.md
// Each part that depends on the parallel layout asks the Parallel it is given; the others do not
// know there are ranks.
#pragma once

#include <boost/json.hpp>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "moelab/data.hpp"
#include "moelab/experiment.hpp"
#include "moelab/model_shape.hpp"
#include "moelab/optimizer.hpp"
#include "moelab/parallel.hpp"
#include "moelab/transformer.hpp"

namespace moelab::training {

using NamedParameters = std::vector<std::pair<std::string, Parameter*>>;

// --- data_feed.cpp -----------------------------------------------------------------------------
// Inputs are the first seq_len tokens of each window, targets the next ones; on several ranks,
// rank r takes windows [r * B / world, (r + 1) * B / world) of the global batch of B.
struct StepInput {
  std::vector<int32_t> inputs, targets;
  int64_t batch = 0;  // windows on this rank
};
StepInput rank_share(const TokenBatch& batch, const Parallel& parallel);

// --- gradients.cpp -----------------------------------------------------------------------------
// Sums each gradient over the ranks that share the parameter (GradReduce), then clips them all to
// the global norm over every parameter of every rank; returns that norm (before clipping).
double synchronise_and_clip(Transformer& model, const NamedParameters& params, const Parallel& parallel, Ops& ops,
                            double max_norm);
// "the gradient of 'layers.1.moe.experts.w_in' is not finite (...)", the first in model order.
std::string first_non_finite_gradient(const NamedParameters& params, Ops& ops);

// --- evaluation.cpp ----------------------------------------------------------------------------
// Per MoE layer, figures accumulated over several forwards (an evaluation's batches, the run).
struct LayerTotals {
  std::vector<int64_t> tokens_per_expert, routed_per_expert;
  int64_t assignments = 0, dropped = 0, forwards = 0;
  double max_violation = 0, routed_max_violation = 0, router_entropy = 0;
  void add(const LayerStats& s);
  double drop_fraction() const;
  double mean_max_violation() const;
  double mean_routed_max_violation() const;
  double mean_router_entropy() const;
};
struct Evaluation {
  double loss = 0;
  std::vector<LayerTotals> layers;
};
Evaluation evaluate(Transformer& model, const std::vector<TokenBatch>& batches, const Parallel& parallel, int64_t step);

// --- metrics_log.cpp ---------------------------------------------------------------------------
// metrics.jsonl, appended line by line and flushed after each. Only rank 0 writes; the other
// ranks' MetricsLog is silent.
class MetricsLog {
 public:
  MetricsLog(const std::filesystem::path& file, bool writer);
  void write(const boost::json::object& line);
  void train(int64_t step, double loss, double lr, double grad_norm, double tokens_per_second, Transformer& model,
             bool mtp);
  void eval(int64_t step, const Evaluation& e, double optimal_loss, double entropy_rate, Transformer& model);
  void message(const char* kind, int64_t step, const std::string& text);  // "warning", "error"
  void close();

 private:
  std::filesystem::path file_;
  bool writer_;
  std::ofstream out_;
};
// Keeps the metric lines of steps <= `step` (a resumed run rewrites what came after).
void truncate_metrics(const std::filesystem::path& file, int64_t step);
boost::json::value number_or_null(double v);

// --- checkpoint.cpp ----------------------------------------------------------------------------
// The run's running figures that a checkpoint must carry for the summary to come out the same.
struct Running {
  double train_dropped = 0, train_assignments = 0;
  std::vector<double> recent_loss;  // the last log_every training losses
};
constexpr const char* kCheckpoint = "checkpoint.safetensors";
// One process, or a run whose experts are not split: checkpoint.safetensors holds everything.
// Experts split over E ranks: checkpoint.safetensors (rank 0) holds every replicated tensor and
// expert slice 0, and checkpoint.expert<i>.step<N>.safetensors slice i (written by the first
// replica's rank i); checkpoint.safetensors, renamed into place last, names the step of its
// slices, so a run that dies while writing keeps its previous checkpoint whole.
void save_checkpoint(const std::filesystem::path& run_dir, int64_t step, Transformer& model, AdamWOptimizer& optimizer,
                     const NamedParameters& params, Ops& ops, const Running& running, const Parallel& parallel);
// Restores everything save_checkpoint wrote; returns the step it was taken after. UsageError
// when the checkpoint's experts are split over another number of ranks than this run's
// (`moelab reshard` converts it).
int64_t load_checkpoint(const std::filesystem::path& run_dir, Transformer& model, AdamWOptimizer& optimizer,
                        const NamedParameters& params, Ops& ops, Running& running, const Parallel& parallel);

// --- report.cpp --------------------------------------------------------------------------------
struct ReportInputs {
  const RunConfig& config;
  const TokenData& data;
  Transformer& model;
  const Evaluation& last_eval;
  const Running& running;
  MoeLayerCounts layer_counts;  // count_moe_layer's, for the summary's parameter counts
  int64_t first_step = 1;
  double eval_optimal = 0;
  int64_t ranks = 1;
};
// Fills the result's final figures from the last evaluation and the running figures; writes
// summary.json and report.md when `write` (rank 0).
void finish_run(const ReportInputs& in, const std::filesystem::path& run_dir, RunResult& result, bool write);

}  // namespace moelab::training

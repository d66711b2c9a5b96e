// The end of a run (training.hpp): the result's final figures, summary.json (written last of
// the figures: a folder without it is unfinished) and report.md, what a researcher reads first.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "moelab/model_shape.hpp"
#include "run_files.hpp"
#include "training.hpp"

namespace moelab::training {
namespace {

namespace json = boost::json;

std::string report_text(const ReportInputs& in, const RunResult& result, double eval_routed_max_violation,
                        const ModelCounts& counts) {
  const RunConfig& config = in.config;
  const TrainConfig& train = config.train;
  std::vector<MoeLayer*> moe_layers = in.model.moe_layers();
  const int64_t tokens_per_step = train.batch_size * train.seq_len;
  std::string report =
      fmt::format("# {}\n\n{}\n\n", config.name, config.description.empty() ? "moelab run" : config.description);
  report += fmt::format("Data: {}.\n\n", in.data.describe());
  report += fmt::format(
      "Model: {} layers ({} MoE), d_model {}, {} attention, {:.3g} parameters ({:.3g} active per token). "
      "Router `{}`, experts `{}` ({} experts, top-{}), overflow `{}`, balancers: {}.\n\n",
      config.model.n_layers, moe_layers.size(), config.model.d_model, attention_name(config.model.attention),
      counts.total.sum(), counts.active.sum(), config.moe.router.type, config.moe.experts.type,
      config.layer.num_experts, config.layer.top_k, overflow_name(config.moe.overflow), balancer_list(config.moe));
  report += "| figure | value |\n|---|---|\n";
  report += fmt::format("| steps | {} ({} tokens) |\n", train.steps, train.steps * tokens_per_step);
  report += fmt::format("| final train loss (mean of last {} steps) | {:.4f} nats |\n", in.running.recent_loss.size(),
                        result.final_train_loss);
  report += fmt::format("| eval loss | {:.4f} nats |\n", result.final_eval_loss);
  if (std::isfinite(in.eval_optimal))
    report += fmt::format("| optimal loss on the eval windows (the floor) | {:.4f} nats (gap {:.4f}) |\n",
                          in.eval_optimal, result.final_eval_loss - in.eval_optimal);
  if (std::isfinite(result.entropy_rate))
    report += fmt::format("| entropy rate of the source | {:.4f} nats/token |\n", result.entropy_rate);
  report += drop_rows(config.moe, result);
  report += fmt::format("| eval MaxVio (worst layer) | {:.3f} |\n", result.max_violation);
  report += fmt::format("| eval MaxVio of the routed load, before capacity (worst layer) | {:.3f} |\n",
                        eval_routed_max_violation);
  report += fmt::format("| dead experts (no token in {} tokens), all layers | {} |\n", config.moe.dead_expert_window,
                        result.dead_experts);
  report += fmt::format("| time | {:.1f} s ({:.0f} tokens/s) |\n\n", result.seconds, result.tokens_per_second);
  for (size_t l = 0; l < moe_layers.size(); ++l) {
    const LayerTotals& t = in.last_eval.layers[l];
    report += fmt::format("## Layer {}: expert load over the evaluation\n\n```\n", moe_layers[l]->spec().layer_index);
    int64_t max_tokens = 1;
    for (int64_t v : t.tokens_per_expert) max_tokens = std::max(max_tokens, v);
    for (size_t e = 0; e < t.tokens_per_expert.size(); ++e)
      report += fmt::format("expert {:>3}  {}  {:>7} tokens  (routed {:>7})\n", e,
                            bar(static_cast<double>(t.tokens_per_expert[e]) / static_cast<double>(max_tokens), 30),
                            t.tokens_per_expert[e], t.routed_per_expert[e]);
    report += "```\n\n";
  }
  return report;
}

}  // namespace

void finish_run(const ReportInputs& in, const std::filesystem::path& run_dir, RunResult& result, bool write) {
  const RunConfig& config = in.config;
  const TrainConfig& train = config.train;
  const Running& running = in.running;
  std::vector<MoeLayer*> moe_layers = in.model.moe_layers();
  for (double l : running.recent_loss) result.final_train_loss += l / static_cast<double>(running.recent_loss.size());
  result.final_eval_loss = in.last_eval.loss;
  result.train_drop_fraction = running.train_assignments > 0 ? running.train_dropped / running.train_assignments : 0;
  int64_t eval_assignments = 0, eval_dropped = 0;
  double eval_routed_max_violation = 0;
  for (const LayerTotals& t : in.last_eval.layers) {
    eval_routed_max_violation = std::max(eval_routed_max_violation, t.mean_routed_max_violation());
    eval_assignments += t.assignments;
    eval_dropped += t.dropped;
    result.max_violation = std::max(result.max_violation, t.mean_max_violation());
  }
  result.drop_fraction =
      eval_assignments > 0 ? static_cast<double>(eval_dropped) / static_cast<double>(eval_assignments) : 0;
  json::array layer_summary;
  for (size_t l = 0; l < moe_layers.size(); ++l) {
    const std::vector<int64_t> dead = moe_layers[l]->dead_experts().dead();
    result.dead_experts += static_cast<int64_t>(dead.size());
    json::object o;
    o["layer"] = moe_layers[l]->spec().layer_index;
    o["eval_drop_fraction"] = in.last_eval.layers[l].drop_fraction();
    o["eval_max_violation"] = in.last_eval.layers[l].mean_max_violation();
    o["eval_routed_max_violation"] = in.last_eval.layers[l].mean_routed_max_violation();
    o["eval_router_entropy"] = in.last_eval.layers[l].mean_router_entropy();
    o["dead_experts"] = json::array(dead.begin(), dead.end());
    layer_summary.push_back(std::move(o));
  }
  const int64_t tokens_per_step = train.batch_size * train.seq_len;
  const int64_t steps_run = train.steps - in.first_step + 1;
  result.tokens_per_second = static_cast<double>(steps_run * tokens_per_step) / std::max(result.seconds, 1e-9);
  if (!write) return;

  const ModelCounts counts = count_model(config.model, in.layer_counts, train.seq_len);
  json::object summary;
  summary["name"] = config.name;
  summary["data"] = in.data.describe();
  summary["steps"] = train.steps;
  summary["tokens"] = train.steps * tokens_per_step;
  summary["total_params"] = counts.total.sum();
  summary["active_params"] = counts.active.sum();
  summary["forward_flops_per_token"] = counts.forward_flops_per_token;
  summary["final_train_loss"] = result.final_train_loss;
  summary["final_eval_loss"] = result.final_eval_loss;
  summary["eval_optimal_loss"] = number_or_null(in.eval_optimal);
  summary["entropy_rate"] = number_or_null(result.entropy_rate);
  summary["eval_loss_above_optimal"] = number_or_null(result.final_eval_loss - in.eval_optimal);
  summary["train_drop_fraction"] = result.train_drop_fraction;
  summary["eval_drop_fraction"] = result.drop_fraction;
  summary["eval_max_violation"] = result.max_violation;
  summary["eval_routed_max_violation"] = eval_routed_max_violation;
  summary["dead_experts"] = result.dead_experts;
  summary["moe_layers"] = std::move(layer_summary);
  summary["seconds"] = result.seconds;
  summary["tokens_per_second"] = result.tokens_per_second;
  if (in.first_step > 1) summary["resumed_after_step"] = in.first_step - 1;
  const MicroBatchScopes scopes = config.parallel.scopes(config.train.batch_size, in.ranks);
  if (config.parallel.expert > 1 || config.parallel.data > 1 || in.ranks > 1 || scopes.any()) {
    json::object p;
    p["ranks"] = in.ranks;
    p["expert"] = config.parallel.expert;
    p["data"] = in.ranks / config.parallel.expert;
    p["capacity"] = batch_scope_name(config.parallel.capacity);
    p["balance"] = batch_scope_name(config.parallel.balance);
    if (scopes.any()) p["micro_batch"] = scopes.sequences;
    summary["parallel"] = std::move(p);
  }
  write_text(run_dir / "summary.json", json::serialize(summary) + "\n");
  write_text(run_dir / "report.md", report_text(in, result, eval_routed_max_violation, counts));
}

}  // namespace moelab::training

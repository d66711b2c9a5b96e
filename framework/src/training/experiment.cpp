#include "moelab/experiment.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <boost/json.hpp>
#include <chrono>
#include <cmath>
#include <fstream>

#include "moelab/moe_layer.hpp"
#include "moelab/optimizer.hpp"
#include "moelab/registry.hpp"
#include "moelab/sha256.hpp"
#include "run_files.hpp"

namespace moelab {
namespace {

namespace json = boost::json;

// Tokens from a mixture of clusters; each cluster has its own random two-layer teacher, so a
// router that sends each cluster to its own expert can reach the noise floor.
class RegressionTask {
 public:
  RegressionTask(const TaskConfig& task, int64_t d_model, uint64_t seed)
      : clusters_(task.clusters), d_(d_model), hidden_(32), noise_(task.noise) {
    Rng rng(seed, 0x7a5c);
    centers_ = draw(rng, clusters_ * d_, 1.0);
    w1_ = draw(rng, clusters_ * hidden_ * d_, 1.0 / std::sqrt(static_cast<double>(d_)));
    w2_ = draw(rng, clusters_ * d_ * hidden_, 1.0 / std::sqrt(static_cast<double>(hidden_)));
  }

  // Fills x [T, d] and y [T, d] (host) from `rng`.
  void batch(Rng& rng, Tensor& x, Tensor& y) const {
    const int64_t tokens = x.dim(0);
    std::vector<double> h(static_cast<size_t>(hidden_));
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t c = static_cast<int64_t>(rng.below(static_cast<uint64_t>(clusters_)));
      std::vector<double> xt(static_cast<size_t>(d_));
      for (int64_t i = 0; i < d_; ++i) {
        xt[static_cast<size_t>(i)] = centers_[static_cast<size_t>(c * d_ + i)] + 0.5 * rng.normal();
        set_host_value(x, t * d_ + i, xt[static_cast<size_t>(i)]);
      }
      for (int64_t j = 0; j < hidden_; ++j) {
        double s = 0;
        for (int64_t i = 0; i < d_; ++i)
          s += w1_[static_cast<size_t>((c * hidden_ + j) * d_ + i)] * xt[static_cast<size_t>(i)];
        h[static_cast<size_t>(j)] = std::max(0.0, s);
      }
      for (int64_t i = 0; i < d_; ++i) {
        double s = 0;
        for (int64_t j = 0; j < hidden_; ++j)
          s += w2_[static_cast<size_t>((c * d_ + i) * hidden_ + j)] * h[static_cast<size_t>(j)];
        set_host_value(y, t * d_ + i, s + noise_ * rng.normal());
      }
    }
  }

  double loss_floor() const { return noise_ * noise_; }

 private:
  static std::vector<double> draw(Rng& rng, int64_t n, double std) {
    std::vector<double> v(static_cast<size_t>(n));
    for (auto& x : v) x = std * rng.normal();
    return v;
  }
  int64_t clusters_, d_, hidden_;
  double noise_;
  std::vector<double> centers_, w1_, w2_;
};

json::array to_json(const std::vector<int64_t>& v) {
  return json::array(v.begin(), v.end());
}

}  // namespace

json::object layer_json(const LayerStats& s, const std::vector<int64_t>& dead) {
  json::object o;
  o["tokens_per_expert"] = to_json(s.tokens_per_expert);
  o["routed_per_expert"] = to_json(s.routed_per_expert);
  o["drop_fraction"] = s.drop_fraction;
  o["dropped"] = s.dropped;
  o["rerouted"] = s.rerouted;
  o["tokens_without_expert"] = s.tokens_without_expert;
  o["capacity"] = s.capacity;
  o["load_fraction"] = json::array(s.load_fraction.begin(), s.load_fraction.end());  // f_i
  o["mean_prob"] = json::array(s.mean_prob.begin(), s.mean_prob.end());              // P_i
  o["max_violation"] = s.max_violation;
  o["routed_max_violation"] = s.routed_max_violation;
  o["router_entropy"] = s.router_entropy;
  o["dead_experts"] = to_json(dead);
  json::object losses;
  for (const auto& [name, value] : s.balancer_losses) losses[name] = value;
  o["balancer_losses"] = std::move(losses);
  if (!s.plugin_metrics.empty()) {
    json::object figures;
    for (const auto& [name, value] : s.plugin_metrics) figures[name] = value;
    o["plugin_metrics"] = std::move(figures);
  }
  return o;
}

namespace {

struct Evaluation {
  double loss = 0, drop_fraction = 0, max_violation = 0;
  LayerStats last;
};

// Mean squared error of y_hat against y: returns the loss and writes dL/dy_hat into `grad`.
double mse(Ops& ops, const Tensor& y_hat, const Tensor& y, Tensor* grad) {
  Tensor diff = ops.empty(y_hat.dtype(), y_hat.shape());
  ops.copy(y_hat, diff);
  ops.axpy(-1.0, y, diff);
  const double n = static_cast<double>(y_hat.numel());
  const double loss = ops.sum_squares(diff) / n;
  if (grad) {
    ops.scale(2.0 / n, diff);
    *grad = diff;
  }
  return loss;
}

}  // namespace

std::string balancer_list(const MoeConfig& moe) {
  std::string list;
  for (const auto& choice : moe.balancers) list += (list.empty() ? "`" : ", `") + choice.type + "`";
  return list.empty() ? std::string("none") : list;
}

std::string drop_rows(const MoeConfig& moe, const RunResult& result) {
  return fmt::format("| dropped assignments, training (capacity factor {}) | {:.2f}% |\n", moe.capacity_factor,
                     100.0 * result.train_drop_fraction) +
         fmt::format("| dropped assignments, evaluation (capacity factor {}) | {:.2f}% |\n", moe.eval_capacity_factor,
                     100.0 * result.drop_fraction);
}

std::string bar(double fraction, int width) {
  const int filled = static_cast<int>(std::lround(std::clamp(fraction, 0.0, 1.0) * width));
  return std::string(static_cast<size_t>(filled), '#') + std::string(static_cast<size_t>(width - filled), '.');
}

void write_text(const std::filesystem::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out) throw RuntimeError(fmt::format("cannot write {}", file.string()));
}

void write_plugin_provenance(const std::filesystem::path& run_dir, const RunConfig& config,
                             const PluginRegistry& registry) {
  boost::json::array plugins;
  auto add = [&](PluginKind kind, const PluginChoice& choice) {
    const PluginInfo& info = registry.require(kind, choice.type);
    plugins.emplace_back(boost::json::object{{"key", choice.key.empty() ? "kernel" : choice.key},
                                             {"kind", plugin_kind_name(kind)},
                                             {"name", info.name},
                                             {"version", info.version},
                                             {"abi", fmt::format("{}.{}", info.abi_major, info.abi_minor)},
                                             {"file", info.file.string()},
                                             {"size", info.file_size},
                                             {"sha256", file_sha256(info.file)}});
  };
  add(PluginKind::kernel, config.kernel);
  add(PluginKind::router, config.moe.router);
  add(PluginKind::experts, config.moe.experts);
  for (const PluginChoice& balancer : config.moe.balancers) add(PluginKind::balancer, balancer);
  write_text(run_dir / "plugins.json",
             boost::json::serialize(boost::json::object{{"plugins", std::move(plugins)}}) + "\n");
}

RunResult run_experiment(const RunConfig& config, const std::string& resolved_recipe, const PluginRegistry& registry,
                         const std::filesystem::path& run_dir,
                         const std::function<void(const ProgressUpdate&)>& progress, const RunOptions& options) {
  if (config.model.vocab_size > 0)
    return train_language_model(config, resolved_recipe, registry, run_dir, progress, options);
  if (options.resume || options.stop_at > 0)
    throw UsageError(
        "--resume and --stop-at need a language-model run (model.vocab_size > 0); the layer-only "
        "regression task trains in seconds and keeps no checkpoint");
  write_text(run_dir / "recipe.toml", resolved_recipe);
  write_plugin_provenance(run_dir, config, registry);
  std::shared_ptr<Ops> ops = registry.make_kernel(config.kernel.type, config.kernel.params);
  ops->set_matmul_precision(config.train.precision);  // train.precision: the GEMMs in f32 or bf16
  Rng root(config.seed);
  MoeLayer layer(config.moe, config.layer, registry, *ops, root, single_process(),
                 config.parallel.scopes(config.train.batch_size, 1));
  AdamWOptimizer optimizer(
      *ops, layer.parameters(),
      AdamWOptions{config.train.beta1, config.train.beta2, config.train.eps, config.train.weight_decay});
  const RegressionTask task(config.task, config.layer.d_model, config.seed);
  const int64_t tokens = config.train.batch_size * config.train.seq_len, d = config.layer.d_model;
  const DType dtype = config.layer.dtype;

  auto evaluate = [&](int64_t step) {
    Evaluation e;
    Rng eval_rng(config.seed, 0xe7a1);  // the same held-out batches at every evaluation
    for (int64_t b = 0; b < config.train.eval_batches; ++b) {
      Tensor x = host_tensor(dtype, {tokens, d}), y = host_tensor(dtype, {tokens, d});
      task.batch(eval_rng, x, y);
      LayerInput input{false, step, config.train.batch_size, config.train.seq_len, nullptr};
      Tensor y_hat = layer.forward(ops->to_device(x), input);
      e.loss += mse(*ops, y_hat, ops->to_device(y), nullptr) / static_cast<double>(config.train.eval_batches);
      e.drop_fraction += layer.stats().drop_fraction / static_cast<double>(config.train.eval_batches);
      e.max_violation += layer.stats().max_violation / static_cast<double>(config.train.eval_batches);
      e.last = layer.stats();
    }
    return e;
  };

  std::ofstream metrics(run_dir / "metrics.jsonl", std::ios::trunc);
  if (!metrics) throw RuntimeError(fmt::format("cannot write {}", (run_dir / "metrics.jsonl").string()));
  Rng data_rng(config.seed, 0xda7a);
  const auto start = std::chrono::steady_clock::now();
  RunResult result;
  result.loss_floor = task.loss_floor();
  Evaluation last_eval;
  std::vector<double> recent_loss;
  for (int64_t step = 1; step <= config.train.steps; ++step) {
    Tensor x = host_tensor(dtype, {tokens, d}), y = host_tensor(dtype, {tokens, d});
    task.batch(data_rng, x, y);
    optimizer.zero_grad();
    LayerInput input{true, step, config.train.batch_size, config.train.seq_len, nullptr};
    Tensor y_hat = layer.forward(ops->to_device(x), input);
    Tensor grad;
    const double loss = mse(*ops, y_hat, ops->to_device(y), &grad);
    layer.backward(grad);
    const double grad_norm = optimizer.clip_grad_norm(config.train.grad_clip);
    optimizer.step(config.train.lr_at(step));
    layer.after_step();
    recent_loss.push_back(loss);
    result.train_drop_fraction += layer.stats().drop_fraction / static_cast<double>(config.train.steps);

    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double tokens_per_second = static_cast<double>(step * tokens) / std::max(seconds, 1e-9);
    if (step % config.train.log_every == 0 || step == config.train.steps) {
      json::object m;
      m["kind"] = "train";
      m["step"] = step;
      m["loss"] = loss;
      m["aux_loss"] = layer.stats().aux_loss;
      m["lr"] = config.train.lr_at(step);
      m["grad_norm"] = grad_norm;
      m["tokens_per_second"] = tokens_per_second;
      m["layers"] = json::array{layer_json(layer.stats(), layer.dead_experts().dead())};
      metrics << json::serialize(m) << "\n";
    }
    if ((config.train.eval_every > 0 && step % config.train.eval_every == 0) || step == config.train.steps) {
      last_eval = evaluate(step);
      json::object m;
      m["kind"] = "eval";
      m["step"] = step;
      m["loss"] = last_eval.loss;
      m["loss_floor"] = result.loss_floor;
      m["drop_fraction"] = last_eval.drop_fraction;
      m["max_violation"] = last_eval.max_violation;
      m["layers"] = json::array{layer_json(last_eval.last, layer.dead_experts().dead())};
      metrics << json::serialize(m) << "\n";
    }
    if (progress) {
      ProgressUpdate u{step,
                       config.train.steps,
                       loss,
                       tokens_per_second,
                       seconds / static_cast<double>(step) * static_cast<double>(config.train.steps - step),
                       {}};
      progress(u);
    }
  }
  metrics.close();
  if (!metrics) throw RuntimeError(fmt::format("cannot write {}", (run_dir / "metrics.jsonl").string()));

  const size_t tail = std::min<size_t>(recent_loss.size(), static_cast<size_t>(config.train.log_every));
  for (size_t i = recent_loss.size() - tail; i < recent_loss.size(); ++i)
    result.final_train_loss += recent_loss[i] / static_cast<double>(tail);
  result.final_eval_loss = last_eval.loss;
  result.drop_fraction = last_eval.drop_fraction;
  result.max_violation = last_eval.max_violation;
  const std::vector<int64_t> dead = layer.dead_experts().dead();
  result.dead_experts = static_cast<int64_t>(dead.size());
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.tokens_per_second = static_cast<double>(config.train.steps * tokens) / std::max(result.seconds, 1e-9);

  json::object summary;
  summary["name"] = config.name;
  summary["task"] = config.task.kind;
  summary["steps"] = config.train.steps;
  summary["tokens"] = config.train.steps * tokens;
  summary["final_train_loss"] = result.final_train_loss;
  summary["final_eval_loss"] = result.final_eval_loss;
  summary["loss_floor"] = result.loss_floor;
  summary["eval_drop_fraction"] = result.drop_fraction;
  summary["train_drop_fraction"] = result.train_drop_fraction;
  summary["eval_max_violation"] = result.max_violation;
  summary["dead_experts"] = to_json(dead);
  summary["seconds"] = result.seconds;
  summary["tokens_per_second"] = result.tokens_per_second;
  summary["num_experts"] = config.layer.num_experts;
  summary["top_k"] = config.layer.top_k;
  write_text(run_dir / "summary.json", json::serialize(summary) + "\n");

  // The report: what a researcher looks at first.
  const LayerStats& s = last_eval.last;
  std::string report =
      fmt::format("# {}\n\n{}\n\n", config.name, config.description.empty() ? "moelab run" : config.description);
  report += fmt::format("Router `{}`, experts `{}` ({} experts, top-{}), overflow `{}`, balancers: {}.\n\n",
                        config.moe.router.type, config.moe.experts.type, config.layer.num_experts, config.layer.top_k,
                        overflow_name(config.moe.overflow), balancer_list(config.moe));
  report += "| figure | value |\n|---|---|\n";
  report += fmt::format("| steps | {} ({} tokens) |\n", config.train.steps, config.train.steps * tokens);
  report += fmt::format("| final train loss (mean of last {} steps) | {:.6f} |\n", tail, result.final_train_loss);
  report += fmt::format("| eval loss | {:.6f} |\n", result.final_eval_loss);
  report += fmt::format("| loss floor (noise variance) | {:.6f} |\n", result.loss_floor);
  report += drop_rows(config.moe, result);
  report += fmt::format("| eval MaxVio | {:.3f} |\n", result.max_violation);
  report += fmt::format("| dead experts (no token in {} tokens) | {} |\n", config.moe.dead_expert_window,
                        dead.empty() ? std::string("none") : fmt::format("{}", fmt::join(dead, ", ")));
  report += fmt::format("| time | {:.1f} s ({:.0f} tokens/s) |\n\n", result.seconds, result.tokens_per_second);
  report += "## Expert load at the last evaluation batch\n\n```\n";
  int64_t max_tokens = 1;
  for (int64_t v : s.tokens_per_expert) max_tokens = std::max(max_tokens, v);
  for (size_t e = 0; e < s.tokens_per_expert.size(); ++e)
    report += fmt::format("expert {:>3}  {}  {:>6} tokens  (routed {:>6}, mean p {:.3f})\n", e,
                          bar(static_cast<double>(s.tokens_per_expert[e]) / static_cast<double>(max_tokens), 30),
                          s.tokens_per_expert[e], s.routed_per_expert[e], s.mean_prob[e]);
  report += "```\n";
  write_text(run_dir / "report.md", report);
  return result;
}

}  // namespace moelab

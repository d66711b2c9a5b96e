// The language-model trainer: the MoE transformer on [data], AdamW with warmup and a decaying
// schedule, evaluation on held-out windows against the data's exact floor, checkpoints that a
// resumed run continues from bit for bit.
//
// Determinism: a training batch is a function of (seed, step), routing noise of (seed, layer,
// step), and the checkpoint holds every other piece of state (weights, AdamW moments and step,
// the expert biases, the dead-expert trackers, the running figures of the summary), so a run
// resumed from step s repeats the metrics of an uninterrupted run exactly.
#include <fmt/format.h>

#include <algorithm>
#include <boost/json.hpp>
#include <chrono>
#include <cmath>
#include <fstream>
#include <map>

#include "moelab/data.hpp"
#include "moelab/experiment.hpp"
#include "moelab/model_shape.hpp"
#include "moelab/optimizer.hpp"
#include "moelab/registry.hpp"
#include "moelab/safetensors.hpp"
#include "moelab/sha256.hpp"
#include "moelab/transformer.hpp"
#include "run_files.hpp"

namespace moelab {
namespace {

namespace json = boost::json;
namespace fs = std::filesystem;

constexpr const char* kCheckpoint = "checkpoint.safetensors";

// Inputs are the first seq_len tokens of each window, targets the next ones.
void split_window(const TokenBatch& batch, std::vector<int32_t>& inputs, std::vector<int32_t>& targets) {
  const int64_t seq_len = batch.window - 1;
  inputs.resize(static_cast<size_t>(batch.batch * seq_len));
  targets.resize(inputs.size());
  for (int64_t b = 0; b < batch.batch; ++b)
    for (int64_t t = 0; t < seq_len; ++t) {
      const size_t at = static_cast<size_t>(b * batch.window + t);
      inputs[static_cast<size_t>(b * seq_len + t)] = batch.tokens[at];
      targets[static_cast<size_t>(b * seq_len + t)] = batch.tokens[at + 1];
    }
}

// Per MoE layer, figures accumulated over several forwards (an evaluation's batches, the run).
struct LayerTotals {
  std::vector<int64_t> tokens_per_expert, routed_per_expert;
  int64_t assignments = 0, dropped = 0, forwards = 0;
  double max_violation = 0, routed_max_violation = 0, router_entropy = 0;

  void add(const LayerStats& s) {
    if (tokens_per_expert.empty()) {
      tokens_per_expert.assign(s.tokens_per_expert.size(), 0);
      routed_per_expert.assign(s.routed_per_expert.size(), 0);
    }
    for (size_t e = 0; e < s.tokens_per_expert.size(); ++e) {
      tokens_per_expert[e] += s.tokens_per_expert[e];
      routed_per_expert[e] += s.routed_per_expert[e];
    }
    assignments += s.assignments;
    dropped += s.dropped;
    max_violation += s.max_violation;
    routed_max_violation += s.routed_max_violation;
    router_entropy += s.router_entropy;
    ++forwards;
  }
  double drop_fraction() const {
    return assignments > 0 ? static_cast<double>(dropped) / static_cast<double>(assignments) : 0.0;
  }
  double mean_max_violation() const { return forwards > 0 ? max_violation / static_cast<double>(forwards) : 0.0; }
  double mean_routed_max_violation() const {
    return forwards > 0 ? routed_max_violation / static_cast<double>(forwards) : 0.0;
  }
  double mean_router_entropy() const { return forwards > 0 ? router_entropy / static_cast<double>(forwards) : 0.0; }
};

struct Evaluation {
  double loss = 0;
  std::vector<LayerTotals> layers;
};

// Summed balancer losses by balancer name over the MoE layers.
json::object balancer_losses(std::vector<MoeLayer*>& layers) {
  std::map<std::string, double> sums;
  for (MoeLayer* layer : layers)
    for (const auto& [name, value] : layer->stats().balancer_losses) sums[name] += value;
  json::object o;
  for (const auto& [name, value] : sums) o[name] = value;
  return o;
}

json::value number_or_null(double v) {
  return std::isfinite(v) ? json::value(v) : json::value(nullptr);
}

// The run's running figures that a checkpoint must carry for the summary to come out the same.
struct Running {
  double train_dropped = 0, train_assignments = 0;
  std::vector<double> recent_loss;  // the last log_every training losses
};

void save_checkpoint(const fs::path& run_dir, int64_t step, Transformer& model, AdamWOptimizer& optimizer,
                     const std::vector<std::pair<std::string, Parameter*>>& params, Ops& ops, const Running& running) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    tensors.emplace_back("param/" + params[i].first, ops.to_host(params[i].second->value));
    tensors.emplace_back("adam_m/" + params[i].first, ops.to_host(optimizer.first_moment(i)));
    tensors.emplace_back("adam_v/" + params[i].first, ops.to_host(optimizer.second_moment(i)));
  }
  for (auto& [name, buffer] : model.named_buffers()) tensors.emplace_back("buffer/" + name, ops.to_host(*buffer));
  std::vector<MoeLayer*> layers = model.moe_layers();
  for (size_t l = 0; l < layers.size(); ++l) {
    const std::vector<int64_t>& last_seen = layers[l]->dead_experts().last_seen();
    Tensor t = host_tensor<int64_t>({static_cast<int64_t>(last_seen.size())});
    std::copy(last_seen.begin(), last_seen.end(), t.data<int64_t>());
    tensors.emplace_back(fmt::format("dead/{}.last_seen", l), t);
    Tensor seen = host_tensor<int64_t>({1});
    seen.data<int64_t>()[0] = layers[l]->dead_experts().tokens_seen();
    tensors.emplace_back(fmt::format("dead/{}.tokens_seen", l), seen);
  }
  Tensor recent = host_tensor<double>({static_cast<int64_t>(running.recent_loss.size())});
  std::copy(running.recent_loss.begin(), running.recent_loss.end(), recent.data<double>());
  tensors.emplace_back("running/recent_loss", recent);
  Tensor drops = host_tensor<double>({2});
  drops.data<double>()[0] = running.train_dropped;
  drops.data<double>()[1] = running.train_assignments;
  tensors.emplace_back("running/train_drops", drops);
  std::map<std::string, std::string> metadata = {{"format", "moelab-checkpoint-2"},
                                                 {"step", std::to_string(step)},
                                                 {"optimizer_steps", std::to_string(optimizer.steps_taken())}};
  // One SHA-256 per tensor: a changed byte anywhere in the data region is refused by name.
  for (const auto& [name, t] : tensors) metadata["sha256/" + name] = sha256_hex(t.raw(), t.bytes());
  write_safetensors(run_dir / kCheckpoint, tensors, metadata);
}

// Format 2 carries a SHA-256 of every tensor ("sha256/NAME" in the metadata); each must match.
// Format 1 (before checksums) has none to check.
void verify_checksums(const SafetensorsFile& ckpt) {
  const auto format = ckpt.metadata.find("format");
  if (format != ckpt.metadata.end() && format->second == "moelab-checkpoint-1") return;
  for (const std::string& name : ckpt.names) {
    const auto stored = ckpt.metadata.find("sha256/" + name);
    if (stored == ckpt.metadata.end())
      throw UsageError(
          fmt::format("{}: tensor '{}' has no checksum (metadata 'sha256/{}'); the file was not "
                      "written whole by moelab",
                      ckpt.path.string(), name, name));
    const Tensor& t = ckpt.at(name);
    if (const std::string actual = sha256_hex(t.raw(), t.bytes()); actual != stored->second)
      throw UsageError(
          fmt::format("{}: tensor '{}' does not match its checksum (stored {}, its bytes give {}): "
                      "the file changed after it was written. Resume from an earlier checkpoint "
                      "(train.keep_checkpoints keeps them in checkpoints/) or start again",
                      ckpt.path.string(), name, stored->second.substr(0, 16), actual.substr(0, 16)));
  }
}

// Restores everything save_checkpoint wrote; returns the step it was taken after.
int64_t load_checkpoint(const fs::path& run_dir, Transformer& model, AdamWOptimizer& optimizer,
                        const std::vector<std::pair<std::string, Parameter*>>& params, Ops& ops, Running& running) {
  const fs::path file = run_dir / kCheckpoint;
  if (!fs::exists(file))
    throw UsageError(
        fmt::format("{} has no {}: it was not written by a language-model run, or the run stopped "
                    "before its first checkpoint; start it again without --resume",
                    run_dir.string(), kCheckpoint));
  const SafetensorsFile ckpt = read_safetensors(file);
  verify_checksums(ckpt);
  auto meta = [&](const std::string& key) -> int64_t {
    auto it = ckpt.metadata.find(key);
    if (it == ckpt.metadata.end())
      throw UsageError(fmt::format("{}: metadata has no '{}'; this is not a moelab checkpoint", file.string(), key));
    try {
      return std::stoll(it->second);
    } catch (const std::exception&) {
      throw UsageError(fmt::format("{}: metadata '{}' = '{}' is not an integer", file.string(), key, it->second));
    }
  };
  auto restore = [&](const std::string& name, Tensor& into) {
    const Tensor& t = ckpt.at(name);
    if (t.shape() != into.shape() || t.dtype() != into.dtype())
      throw UsageError(
          fmt::format("{}: '{}' is {}[{}], the recipe's model needs {}[{}]; the checkpoint belongs to "
                      "another model",
                      file.string(), name, dtype_name(t.dtype()), shape_str(t.shape()), dtype_name(into.dtype()),
                      shape_str(into.shape())));
    ops.copy(t, into);
  };
  for (size_t i = 0; i < params.size(); ++i) {
    restore("param/" + params[i].first, params[i].second->value);
    restore("adam_m/" + params[i].first, optimizer.first_moment(i));
    restore("adam_v/" + params[i].first, optimizer.second_moment(i));
  }
  for (auto& [name, buffer] : model.named_buffers()) restore("buffer/" + name, *buffer);
  std::vector<MoeLayer*> layers = model.moe_layers();
  for (size_t l = 0; l < layers.size(); ++l) {
    const Tensor& last_seen = ckpt.at(fmt::format("dead/{}.last_seen", l));
    const Tensor& seen = ckpt.at(fmt::format("dead/{}.tokens_seen", l));
    if (last_seen.dtype() != DType::i64 || seen.dtype() != DType::i64 || seen.numel() != 1)
      throw UsageError(fmt::format("{}: dead-expert state of layer {} is malformed", file.string(), l));
    const int64_t* p = last_seen.data<int64_t>();
    layers[l]->dead_experts().restore(std::vector<int64_t>(p, p + last_seen.numel()), seen.data<int64_t>()[0]);
  }
  const Tensor& recent = ckpt.at("running/recent_loss");
  const Tensor& drops = ckpt.at("running/train_drops");
  if (recent.dtype() != DType::f64 || drops.dtype() != DType::f64 || drops.numel() != 2)
    throw UsageError(fmt::format("{}: running figures are malformed", file.string()));
  running.recent_loss.assign(recent.data<double>(), recent.data<double>() + recent.numel());
  running.train_dropped = drops.data<double>()[0];
  running.train_assignments = drops.data<double>()[1];
  optimizer.set_steps_taken(meta("optimizer_steps"));
  return meta("step");
}

// ---------------------------------------------------------------------------------------------
// Divergence: a non-finite loss or gradient stops the run before the weights are touched, naming
// the step and the first parameter whose gradient is not finite; a jump of the loss is a warning.

// Runs one part of a step; a RuntimeError from inside it (a kernel refusing NaN scores, say)
// is rethrown with the step and the part.
template <class F>
double guarded_step(int64_t step, const char* part, F&& body) {
  try {
    return body();
  } catch (const RuntimeError& e) {
    throw RuntimeError(fmt::format("step {}: {}: {}", step, part, e.what()));
  }
}

std::string recent_loss_note(const std::vector<double>& recent) {
  if (recent.empty()) return "";
  return fmt::format(" (the previous step's loss was {:.6g})", recent.back());
}

// "the gradient of 'layers.1.moe.experts.w_in' is not finite (...)", the first in model order.
std::string first_non_finite_gradient(const std::vector<std::pair<std::string, Parameter*>>& params, Ops& ops) {
  for (const auto& [name, p] : params) {
    const double squares = ops.sum_squares(p->grad);
    if (!std::isfinite(squares))
      return fmt::format("the gradient of '{}' is not finite (its sum of squares is {})", name, squares);
  }
  return "the gradient norm is not finite, though each parameter's sum of squares is (their sum overflowed)";
}

// A loss more than three times the mean of the recent ones (and more than 1 nat above it) is
// worth a warning: it usually comes steps before a divergence. At most one per `window` steps.
std::string loss_jump(int64_t step, double loss, const std::vector<double>& recent, int64_t window,
                      int64_t last_warning) {
  if (static_cast<int64_t>(recent.size()) < std::min<int64_t>(window, 5) || step - last_warning < window) return "";
  double mean = 0;
  for (double x : recent) mean += x / static_cast<double>(recent.size());
  if (!(loss > 3 * mean && loss > mean + 1.0)) return "";
  return fmt::format(
      "step {}: the training loss jumped to {:.6g}, {:.1f}x the mean {:.6g} of the last {} steps; "
      "a divergence often starts so (lower train.lr, or raise train.warmup_steps)",
      step, loss, loss / mean, mean, recent.size());
}

// Keeps the metric lines of steps <= `step` (a resumed run rewrites what came after).
void truncate_metrics(const fs::path& file, int64_t step) {
  std::ifstream in(file, std::ios::binary);
  std::string kept, line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    boost::system::error_code ec;
    const json::value v = json::parse(line, ec);
    if (ec || !v.is_object() || !v.as_object().contains("step")) continue;  // a torn last line
    if (v.as_object().at("step").to_number<int64_t>() <= step) kept += line + "\n";
  }
  in.close();
  write_text(file, kept);
}

}  // namespace

RunResult train_language_model(const RunConfig& config, const std::string& resolved_recipe,
                               const PluginRegistry& registry, const fs::path& run_dir,
                               const std::function<void(const ProgressUpdate&)>& progress, const RunOptions& options) {
  const TrainConfig& train = config.train;
  const std::vector<Unsupported> problems = transformer_unsupported(config);
  if (!problems.empty())
    throw UsageError(fmt::format("{}: {}; {}", problems[0].key, problems[0].message, problems[0].hint));
  const std::unique_ptr<TokenData> data =
      make_token_data(config.data, config.model.vocab_size, train.seq_len + 1,
                      config.data.seed >= 0 ? static_cast<uint64_t>(config.data.seed) : config.seed);
  std::shared_ptr<Ops> ops = registry.make_kernel(config.kernel.type, config.kernel.params);
  Rng root(config.seed);
  Transformer model(config, registry, *ops, root);
  std::vector<std::pair<std::string, Parameter*>> params = model.named_parameters();
  std::vector<Parameter*> param_list;
  for (auto& [name, p] : params) {
    for (const std::string& group : train.no_decay)
      if (name.find(group) != std::string::npos) p->weight_decay = false;
    param_list.push_back(p);
  }
  AdamWOptimizer optimizer(*ops, param_list, AdamWOptions{train.beta1, train.beta2, train.eps, train.weight_decay});
  std::vector<MoeLayer*> moe_layers = model.moe_layers();

  // The held-out windows, and the loss a predictor that knows the sources reaches on them.
  std::vector<TokenBatch> eval_batches;
  double eval_optimal = 0;
  for (int64_t b = 0; b < train.eval_batches; ++b) {
    eval_batches.push_back(data->batch(Split::eval, b, train.batch_size, train.seq_len + 1));
    eval_optimal += data->optimal_loss(eval_batches.back()) / static_cast<double>(train.eval_batches);
  }
  auto evaluate = [&](int64_t step) {
    Evaluation e;
    e.layers.resize(moe_layers.size());
    std::vector<int32_t> inputs, targets;
    for (const TokenBatch& batch : eval_batches) {
      split_window(batch, inputs, targets);
      e.loss += model.forward(inputs, targets, batch.batch, false, step) / static_cast<double>(eval_batches.size());
      for (size_t l = 0; l < moe_layers.size(); ++l) e.layers[l].add(moe_layers[l]->stats());
    }
    return e;
  };

  Running running;
  int64_t first_step = 1;
  const fs::path metrics_file = run_dir / "metrics.jsonl";
  if (options.resume) {
    first_step = load_checkpoint(run_dir, model, optimizer, params, *ops, running) + 1;
    truncate_metrics(metrics_file, first_step - 1);
  } else {
    write_text(run_dir / "recipe.toml", resolved_recipe);
    write_plugin_provenance(run_dir, config, registry);
    write_text(metrics_file, "");
  }
  std::ofstream metrics(metrics_file, std::ios::binary | std::ios::app);
  if (!metrics) throw RuntimeError(fmt::format("cannot write {}", metrics_file.string()));

  const int64_t tokens_per_step = train.batch_size * train.seq_len;
  const auto start = std::chrono::steady_clock::now();
  RunResult result;
  result.loss_floor = eval_optimal;
  result.entropy_rate = data->entropy_rate();
  Evaluation last_eval;
  bool evaluated = false;
  int64_t step = first_step;
  std::vector<int32_t> inputs, targets;
  int64_t last_warning = 0;
  for (; step <= train.steps; ++step) {
    const TokenBatch batch = data->batch(Split::train, step, train.batch_size, train.seq_len + 1);
    split_window(batch, inputs, targets);
    optimizer.zero_grad();
    // A failure of the step is the metrics' last line, so the folder kept says what happened.
    auto fail = [&](const std::string& message) {
      json::object m;
      m["kind"] = "error";
      m["step"] = step;
      m["message"] = message;
      metrics << json::serialize(m) << "\n";
      metrics.flush();
      throw RuntimeError(message);
    };
    const double loss =
        guarded_step(step, "forward", [&] { return model.forward(inputs, targets, batch.batch, true, step); });
    if (!std::isfinite(loss))
      fail(
          fmt::format("step {}: the training loss is {}{}; the weights were not updated. Lower train.lr "
                      "(now {}) or raise train.warmup_steps",
                      step, loss, recent_loss_note(running.recent_loss), train.lr));
    guarded_step(step, "backward", [&] {
      model.backward();
      return 0.0;
    });
    const double grad_norm = optimizer.clip_grad_norm(train.grad_clip);
    if (!std::isfinite(grad_norm))
      fail(
          fmt::format("step {}: {} (gradient norm {}, loss {}); the weights were not updated. Lower "
                      "train.lr (now {}) or raise train.warmup_steps",
                      step, first_non_finite_gradient(params, *ops), grad_norm, loss, train.lr));
    if (const std::string jump = loss_jump(step, loss, running.recent_loss, train.log_every, last_warning);
        !jump.empty()) {
      ProgressUpdate warning;
      warning.step = step;
      warning.steps = train.steps;
      warning.loss = loss;
      warning.warning = jump;
      progress(warning);
      json::object m;
      m["kind"] = "warning";
      m["step"] = step;
      m["message"] = jump;
      metrics << json::serialize(m) << "\n";
      metrics.flush();
      last_warning = step;
    }
    const double lr = train.lr_at(step);
    optimizer.step(lr);
    model.after_step();
    running.recent_loss.push_back(loss);
    if (static_cast<int64_t>(running.recent_loss.size()) > train.log_every)
      running.recent_loss.erase(running.recent_loss.begin());
    for (MoeLayer* layer : moe_layers) {
      running.train_dropped += static_cast<double>(layer->stats().dropped);
      running.train_assignments += static_cast<double>(layer->stats().assignments);
    }

    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double tokens_per_second =
        static_cast<double>((step - first_step + 1) * tokens_per_step) / std::max(seconds, 1e-9);
    if (step % train.log_every == 0 || step == train.steps) {
      json::object m;
      m["kind"] = "train";
      m["step"] = step;
      m["loss"] = loss;
      m["aux_loss"] = model.aux_loss();
      if (config.model.mtp_modules > 0) m["mtp_loss"] = model.mtp_loss();
      m["balancer_losses"] = balancer_losses(moe_layers);
      m["lr"] = lr;
      m["grad_norm"] = grad_norm;
      m["tokens_per_second"] = tokens_per_second;
      json::array layers;
      for (size_t l = 0; l < moe_layers.size(); ++l) {
        json::object o = layer_json(moe_layers[l]->stats(), moe_layers[l]->dead_experts().dead());
        o["layer"] = moe_layers[l]->spec().layer_index;
        layers.push_back(std::move(o));
      }
      m["layers"] = std::move(layers);
      metrics << json::serialize(m) << "\n";
      metrics.flush();
    }
    const bool stop_now = (options.stop_at > 0 && step >= options.stop_at && step < train.steps) ||
                          (options.interrupt && options.interrupt->load() && step < train.steps);
    if ((train.eval_every > 0 && step % train.eval_every == 0) || step == train.steps) {
      last_eval = evaluate(step);
      evaluated = true;
      json::object m;
      m["kind"] = "eval";
      m["step"] = step;
      m["loss"] = last_eval.loss;
      m["optimal_loss"] = number_or_null(eval_optimal);
      m["entropy_rate"] = number_or_null(result.entropy_rate);
      json::array layers;
      for (size_t l = 0; l < moe_layers.size(); ++l) {
        const LayerTotals& t = last_eval.layers[l];
        json::object o;
        o["layer"] = moe_layers[l]->spec().layer_index;
        o["tokens_per_expert"] = json::array(t.tokens_per_expert.begin(), t.tokens_per_expert.end());
        o["routed_per_expert"] = json::array(t.routed_per_expert.begin(), t.routed_per_expert.end());
        o["drop_fraction"] = t.drop_fraction();
        o["max_violation"] = t.mean_max_violation();
        o["routed_max_violation"] = t.mean_routed_max_violation();
        o["router_entropy"] = t.mean_router_entropy();
        const std::vector<int64_t> dead = moe_layers[l]->dead_experts().dead();
        o["dead_experts"] = json::array(dead.begin(), dead.end());
        layers.push_back(std::move(o));
      }
      m["layers"] = std::move(layers);
      metrics << json::serialize(m) << "\n";
      metrics.flush();
    }
    if ((train.checkpoint_every > 0 && step % train.checkpoint_every == 0) || step == train.steps || stop_now) {
      save_checkpoint(run_dir, step, model, optimizer, params, *ops, running);
      if (train.keep_checkpoints) {
        // A copy of the file just written (and renamed into place), so it is complete too.
        fs::create_directories(run_dir / "checkpoints");
        fs::copy_file(run_dir / kCheckpoint, run_dir / "checkpoints" / fmt::format("step_{:08}.safetensors", step),
                      fs::copy_options::overwrite_existing);
      }
    }
    if (progress) {
      const double steps_left = static_cast<double>(train.steps - step);
      progress(ProgressUpdate{step,
                              train.steps,
                              loss,
                              tokens_per_second,
                              seconds / static_cast<double>(step - first_step + 1) * steps_left,
                              {}});
    }
    if (stop_now) {
      result.finished = false;
      result.steps_done = step;
      return result;
    }
  }
  metrics.close();
  if (!metrics) throw RuntimeError(fmt::format("cannot write {}", metrics_file.string()));
  result.steps_done = train.steps;
  if (!evaluated) last_eval = evaluate(train.steps);  // resumed at the very end

  for (double l : running.recent_loss) result.final_train_loss += l / static_cast<double>(running.recent_loss.size());
  result.final_eval_loss = last_eval.loss;
  result.train_drop_fraction = running.train_assignments > 0 ? running.train_dropped / running.train_assignments : 0;
  int64_t eval_assignments = 0, eval_dropped = 0;
  double eval_routed_max_violation = 0;
  for (const LayerTotals& t : last_eval.layers) {
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
    o["eval_drop_fraction"] = last_eval.layers[l].drop_fraction();
    o["eval_max_violation"] = last_eval.layers[l].mean_max_violation();
    o["eval_routed_max_violation"] = last_eval.layers[l].mean_routed_max_violation();
    o["eval_router_entropy"] = last_eval.layers[l].mean_router_entropy();
    o["dead_experts"] = json::array(dead.begin(), dead.end());
    layer_summary.push_back(std::move(o));
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const int64_t steps_run = train.steps - first_step + 1;
  result.tokens_per_second = static_cast<double>(steps_run * tokens_per_step) / std::max(result.seconds, 1e-9);

  const ModelCounts counts = count_model(config.model, count_moe_layer(config, registry), train.seq_len);
  json::object summary;
  summary["name"] = config.name;
  summary["data"] = data->describe();
  summary["steps"] = train.steps;
  summary["tokens"] = train.steps * tokens_per_step;
  summary["total_params"] = counts.total.sum();
  summary["active_params"] = counts.active.sum();
  summary["forward_flops_per_token"] = counts.forward_flops_per_token;
  summary["final_train_loss"] = result.final_train_loss;
  summary["final_eval_loss"] = result.final_eval_loss;
  summary["eval_optimal_loss"] = number_or_null(eval_optimal);
  summary["entropy_rate"] = number_or_null(result.entropy_rate);
  summary["eval_loss_above_optimal"] = number_or_null(result.final_eval_loss - eval_optimal);
  summary["train_drop_fraction"] = result.train_drop_fraction;
  summary["eval_drop_fraction"] = result.drop_fraction;
  summary["eval_max_violation"] = result.max_violation;
  summary["eval_routed_max_violation"] = eval_routed_max_violation;
  summary["dead_experts"] = result.dead_experts;
  summary["moe_layers"] = std::move(layer_summary);
  summary["seconds"] = result.seconds;
  summary["tokens_per_second"] = result.tokens_per_second;
  if (first_step > 1) summary["resumed_after_step"] = first_step - 1;
  write_text(run_dir / "summary.json", json::serialize(summary) + "\n");

  // The report: what a researcher reads first.
  std::string report =
      fmt::format("# {}\n\n{}\n\n", config.name, config.description.empty() ? "moelab run" : config.description);
  report += fmt::format("Data: {}.\n\n", data->describe());
  report += fmt::format(
      "Model: {} layers ({} MoE), d_model {}, {} attention, {:.3g} parameters ({:.3g} active per token). "
      "Router `{}`, experts `{}` ({} experts, top-{}), overflow `{}`, balancers: {}.\n\n",
      config.model.n_layers, moe_layers.size(), config.model.d_model, attention_name(config.model.attention),
      counts.total.sum(), counts.active.sum(), config.moe.router.type, config.moe.experts.type,
      config.layer.num_experts, config.layer.top_k, overflow_name(config.moe.overflow), balancer_list(config.moe));
  report += "| figure | value |\n|---|---|\n";
  report += fmt::format("| steps | {} ({} tokens) |\n", train.steps, train.steps * tokens_per_step);
  report += fmt::format("| final train loss (mean of last {} steps) | {:.4f} nats |\n", running.recent_loss.size(),
                        result.final_train_loss);
  report += fmt::format("| eval loss | {:.4f} nats |\n", result.final_eval_loss);
  if (std::isfinite(eval_optimal))
    report += fmt::format("| optimal loss on the eval windows (the floor) | {:.4f} nats (gap {:.4f}) |\n", eval_optimal,
                          result.final_eval_loss - eval_optimal);
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
    const LayerTotals& t = last_eval.layers[l];
    report += fmt::format("## Layer {}: expert load over the evaluation\n\n```\n", moe_layers[l]->spec().layer_index);
    int64_t max_tokens = 1;
    for (int64_t v : t.tokens_per_expert) max_tokens = std::max(max_tokens, v);
    for (size_t e = 0; e < t.tokens_per_expert.size(); ++e)
      report += fmt::format("expert {:>3}  {}  {:>7} tokens  (routed {:>7})\n", e,
                            bar(static_cast<double>(t.tokens_per_expert[e]) / static_cast<double>(max_tokens), 30),
                            t.tokens_per_expert[e], t.routed_per_expert[e]);
    report += "```\n\n";
  }
  write_text(run_dir / "report.md", report);
  return result;
}

}  // namespace moelab

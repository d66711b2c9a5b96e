// The language-model trainer: the MoE transformer on [data], AdamW with warmup and a decaying
// schedule, evaluation on held-out windows against the data's exact floor, checkpoints that a
// resumed run continues from bit for bit. This file is the loop; its parts (data, gradients,
// evaluation, metrics, checkpoints, the report) are in training/, each with one job.
//
// Determinism: a training batch is a function of (seed, step), routing noise of (seed, layer,
// step), and the checkpoint holds every other piece of state (weights, AdamW moments and step,
// the expert biases, the dead-expert trackers, the running figures of the summary), so a run
// resumed from step s repeats the metrics of an uninterrupted run exactly.
//
// On several ranks (RunOptions::parallel) every rank runs this loop in lockstep on its share of
// each batch; rank 0 alone writes the run folder's files (the checkpoint's expert slices aside).
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>

#include "moelab/registry.hpp"
#include "run_files.hpp"
#include "training.hpp"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using namespace training;

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

// The fault tests' hook (tests/parallel, docs/parallel.md): MOELAB_FAULT="STEP:RANK:raise" makes
// rank RANK throw at the start of step STEP, and "STEP:RANK:kill" kill itself there (SIGKILL), as
// a rank the machine takes away does.
void injected_fault(int64_t step, int rank) {
  static const std::string fault = [] {
    const char* text = std::getenv("MOELAB_FAULT");
    return std::string(text ? text : "");
  }();
  if (fault.empty()) return;
  long long at_step = 0;
  int at_rank = 0;
  char kind[16] = {0};
  if (std::sscanf(fault.c_str(), "%lld:%d:%15s", &at_step, &at_rank, kind) != 3 || at_step != step || at_rank != rank)
    return;
  if (std::string(kind) == "kill") std::raise(SIGKILL);
  throw RuntimeError(fmt::format("step {}: the fault MOELAB_FAULT={} asked for", step, fault));
}

}  // namespace

RunResult train_language_model(const RunConfig& config, const std::string& resolved_recipe,
                               const PluginRegistry& registry, const fs::path& run_dir,
                               const std::function<void(const ProgressUpdate&)>& progress, const RunOptions& options) {
  const TrainConfig& train = config.train;
  const Parallel& parallel = options.parallel ? *options.parallel : single_process();
  const bool writer = parallel.rank() == 0;
  const std::vector<Unsupported> problems = transformer_unsupported(config);
  if (!problems.empty())
    throw UsageError(fmt::format("{}: {}; {}", problems[0].key, problems[0].message, problems[0].hint));
  const std::unique_ptr<TokenData> data =
      make_token_data(config.data, config.model.vocab_size, train.seq_len + 1,
                      config.data.seed >= 0 ? static_cast<uint64_t>(config.data.seed) : config.seed);
  std::shared_ptr<Ops> ops = registry.make_kernel(config.kernel.type, config.kernel.params);
  ops->set_matmul_precision(config.train.precision);  // train.precision: the GEMMs in f32 or bf16
  Rng root(config.seed);
  Transformer model(config, registry, *ops, root, parallel);
  NamedParameters params = model.named_parameters();
  std::vector<Parameter*> param_list;
  for (auto& [name, p] : params) {
    for (const std::string& group : train.no_decay)
      if (name.find(group) != std::string::npos) p->weight_decay = false;
    param_list.push_back(p);
  }
  AdamWOptimizer optimizer(*ops, param_list, AdamWOptions{train.beta1, train.beta2, train.eps, train.weight_decay});
  // bf16 precision: the matrices the model's GEMMs read, rounded once per step (routers keep f32).
  std::vector<Parameter*> gemm_params;
  for (auto& [name, p] : params)
    if (name.find("router") == std::string::npos) gemm_params.push_back(p);
  std::vector<MoeLayer*> moe_layers = model.moe_layers();

  // The held-out windows, and the loss a predictor that knows the sources reaches on them.
  std::vector<TokenBatch> eval_batches;
  double eval_optimal = 0;
  for (int64_t b = 0; b < train.eval_batches; ++b) {
    eval_batches.push_back(data->batch(Split::eval, b, train.batch_size, train.seq_len + 1));
    eval_optimal += data->optimal_loss(eval_batches.back()) / static_cast<double>(train.eval_batches);
  }

  Running running;
  int64_t first_step = 1;
  const fs::path metrics_file = run_dir / "metrics.jsonl";
  if (options.resume) {
    first_step = load_checkpoint(run_dir, model, optimizer, params, *ops, running, parallel) + 1;
    if (writer) truncate_metrics(metrics_file, first_step - 1);
  } else if (writer) {
    write_text(run_dir / "recipe.toml", resolved_recipe);
    write_plugin_provenance(run_dir, config, registry);
    write_text(metrics_file, "");
  }
  make_gemm_copies(*ops, gemm_params, train.precision);    // after the values are final (a resume loaded them)
  if (parallel.distributed()) parallel.world().barrier();  // metrics.jsonl is ready before any step
  MetricsLog metrics(metrics_file, writer);

  const int64_t tokens_per_step = train.batch_size * train.seq_len;
  const auto start = std::chrono::steady_clock::now();
  RunResult result;
  result.loss_floor = eval_optimal;
  result.entropy_rate = data->entropy_rate();
  Evaluation last_eval;
  bool evaluated = false;
  int64_t step = first_step;
  int64_t last_warning = 0;
  for (; step <= train.steps; ++step) {
    injected_fault(step, parallel.rank());
    const StepInput input = rank_share(data->batch(Split::train, step, train.batch_size, train.seq_len + 1), parallel);
    optimizer.zero_grad();
    // A failure of the step is the metrics' last line, so the folder kept says what happened.
    auto fail = [&](const std::string& message) {
      metrics.message("error", step, message);
      throw RuntimeError(message);
    };
    const double loss = guarded_step(
        step, "forward", [&] { return model.forward(input.inputs, input.targets, input.batch, true, step); });
    if (!std::isfinite(loss))
      fail(
          fmt::format("step {}: the training loss is {}{}; the weights were not updated. Lower train.lr "
                      "(now {}) or raise train.warmup_steps",
                      step, loss, recent_loss_note(running.recent_loss), train.lr));
    guarded_step(step, "backward", [&] {
      model.backward();
      return 0.0;
    });
    const double grad_norm = synchronise_and_clip(model, params, parallel, *ops, train.grad_clip);
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
      if (writer && progress) progress(warning);
      metrics.message("warning", step, jump);
      last_warning = step;
    }
    const double lr = train.lr_at(step);
    optimizer.step(lr);
    model.after_step();
    refresh_gemm_copies(*ops, gemm_params);
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
    if (step % train.log_every == 0 || step == train.steps)
      metrics.train(step, loss, lr, grad_norm, tokens_per_second, model, config.model.mtp_modules > 0);
    bool stop_now = (options.stop_at > 0 && step >= options.stop_at && step < train.steps) ||
                    (options.interrupt && options.interrupt->load() && step < train.steps);
    if (parallel.distributed()) {  // every rank stops after the same step, or none does
      int32_t stopping = stop_now ? 1 : 0;
      parallel.world().allreduce_sum(&stopping, 1, DType::i32);
      stop_now = stopping > 0;
    }
    if ((train.eval_every > 0 && step % train.eval_every == 0) || step == train.steps) {
      last_eval = evaluate(model, eval_batches, parallel, step);
      evaluated = true;
      metrics.eval(step, last_eval, eval_optimal, result.entropy_rate, model);
    }
    if ((train.checkpoint_every > 0 && step % train.checkpoint_every == 0) || step == train.steps || stop_now) {
      save_checkpoint(run_dir, step, model, optimizer, params, *ops, running, parallel);
      if (train.keep_checkpoints && writer) {
        // A copy of the file just written (and renamed into place), so it is complete too.
        fs::create_directories(run_dir / "checkpoints");
        fs::copy_file(run_dir / kCheckpoint, run_dir / "checkpoints" / fmt::format("step_{:08}.safetensors", step),
                      fs::copy_options::overwrite_existing);
      }
    }
    if (progress && writer) {
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
  result.steps_done = train.steps;
  if (!evaluated) last_eval = evaluate(model, eval_batches, parallel, train.steps);  // resumed at the very end
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const ReportInputs report{config,     *data,        model,
                            last_eval,  running,      count_moe_layer(config, registry),
                            first_step, eval_optimal, parallel.size()};
  finish_run(report, run_dir, result, writer);
  return result;
}

}  // namespace moelab

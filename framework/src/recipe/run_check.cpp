// check_run: what `moelab check` and `moelab run` refuse beyond the schema (run_check.hpp).
#include "moelab/run_check.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "moelab/data.hpp"
#include "moelab/model_shape.hpp"
#include "moelab/recipe.hpp"
#include "moelab/registry.hpp"
#include "moelab/transformer.hpp"

namespace moelab {

namespace {

// The location of the first of `keys` the recipe sets; the recipe's file when it sets none.
SourceLocation first_set(const Recipe& recipe, std::initializer_list<const char*> keys) {
  for (const char* key : keys) {
    const SourceLocation where = recipe.where(key);
    if (where.known()) return where;
  }
  return SourceLocation{recipe.path().string(), 0, 0};
}

// The term of the estimate that dominates, as the recipe key to change.
const char* dominant_key(const MemoryEstimate& m) {
  const double state = m.weights + m.gradients + m.optimizer + m.gemm_copies;
  const double largest = std::max({state, m.activations, m.logits, m.corpus});
  if (largest == m.corpus) return "data";
  if (largest == m.logits) return "model.vocab_size";
  if (largest == m.activations) return "train.batch_size";
  return "model";
}

void check_trainable(const RunConfig& config, const Recipe& recipe, Diagnostics& out) {
  if (config.model.vocab_size == 0) return;  // the layer-only regression task trains any layer
  for (const Unsupported& u : transformer_unsupported(config))
    out.add(first_set(recipe, {u.key.c_str(), "model"}), u.key, u.message, u.hint);
}

// The data: its size (for the estimate), and when asked its content. A problem becomes a
// diagnostic at the recipe's data key; the corpus size is 0 then.
double check_data(const RunConfig& config, const Recipe& recipe, const CheckOptions& options, Diagnostics& out) {
  if (config.model.vocab_size == 0) return 0;
  const DataConfig& data = config.data;
  const char* key = data.kind == "markov" ? "data.kind" : "data.paths";
  try {
    const double bytes = token_data_bytes(data, config.model.vocab_size);
    if (options.read_data) validate_token_data(data, config.model.vocab_size, config.train.seq_len + 1);
    return bytes;
  } catch (const UsageError& e) {
    std::string message = e.what();
    const std::string prefix = std::string(key) + ": ";
    if (message.rfind(prefix, 0) == 0) message.erase(0, prefix.size());  // the diagnostic names the key
    out.add(first_set(recipe, {key, "data"}), key, message);
    return 0;
  }
}

// [parallel] against the ranks, the model and the batch (num_experts % expert is build_config's).
void check_parallel(const RunConfig& config, const Recipe& recipe, int64_t world, Diagnostics& out) {
  const ParallelConfig& p = config.parallel;
  if (p.data > 0 && world != p.expert * p.data) {
    out.add(first_set(recipe, {"parallel.data", "parallel"}), "parallel.data",
            fmt::format("expert x data = {} x {} = {} ranks, but the run has {}", p.expert, p.data, p.expert * p.data,
                        world),
            fmt::format("start {} ranks (mpirun -np {}), or set parallel.data = 0 to follow the ranks started",
                        p.expert * p.data, p.expert * p.data));
    return;
  }
  if (world % p.expert != 0) {
    out.add(first_set(recipe, {"parallel.expert", "parallel"}), "parallel.expert",
            fmt::format("parallel.expert = {} does not divide the {} ranks of the run", p.expert, world),
            fmt::format("start a multiple of {} ranks (mpirun -np {}); to resume a run's checkpoint on other "
                        "ranks, change its layout first with: moelab reshard RUN_DIR --expert N",
                        p.expert, p.expert));
    return;
  }
  if (world == 1) return;
  if (config.model.vocab_size == 0) {
    out.add(first_set(recipe, {"parallel", "model"}), "parallel",
            fmt::format("a run on {} ranks trains a language model; this recipe's model has no vocabulary (the "
                        "layer-only task runs in one process)",
                        world),
            "set model.vocab_size, or run it in one process");
    return;
  }
  if (config.train.batch_size % world != 0)
    out.add(first_set(recipe, {"train.batch_size", "train"}), "train.batch_size",
            fmt::format("{} sequences cannot be split evenly over {} ranks", config.train.batch_size, world),
            fmt::format("make train.batch_size a multiple of {}", world));
}

}  // namespace

void check_parallel_layout(const RunConfig& config, const Recipe& recipe, int64_t world) {
  Diagnostics out;
  check_parallel(config, recipe, world, out);
  out.throw_if_any();
}

int64_t run_world(const ParallelConfig& parallel, int64_t world) {
  if (world > 0) return world;
  return parallel.data > 0 ? parallel.expert * parallel.data : parallel.expert;
}

std::string format_bytes(double bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  size_t unit = 0;
  while (bytes >= 1024 && unit + 1 < std::size(units)) {
    bytes /= 1024;
    ++unit;
  }
  return unit == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.2f} {}", bytes, units[unit]);
}

std::string MemoryEstimate::describe() const {
  std::vector<std::string> parts;
  const auto add = [&](const char* what, double bytes) {
    if (bytes > 0) parts.push_back(fmt::format("{} {}", what, format_bytes(bytes)));
  };
  add("weights", weights);
  add("gradients", gradients);
  add("AdamW state", optimizer);
  add("bf16 GEMM copies", gemm_copies);
  add("saved activations", activations);
  add("logits", logits);
  add("corpus", corpus);
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? ", " : "") + parts[i];
  return out;
}

MemoryEstimate estimate_memory(const RunConfig& config, const PluginRegistry& registry, double corpus_bytes,
                               int64_t world) {
  const MoeLayerCounts moe = count_moe_layer(config, registry);
  const bool language_model = config.model.vocab_size > 0;
  const double element = static_cast<double>(dtype_size(language_model ? config.model.dtype : config.layer.dtype));
  const double batch_tokens = static_cast<double>(config.train.batch_size) * static_cast<double>(config.train.seq_len);
  const double ranks = static_cast<double>(std::max<int64_t>(1, world));
  const double tokens = batch_tokens / ranks;  // this rank's share
  const double d = static_cast<double>(config.layer.d_model);
  const double expert_split = ranks > 1 ? static_cast<double>(std::max<int64_t>(1, config.parallel.expert)) : 1.0;
  MemoryEstimate m;
  m.ranks = std::max<int64_t>(1, world);
  double routed = 0, routers = 0;
  if (language_model) {
    const ModelCounts counts = count_model(config.model, moe, config.train.seq_len);
    routers = static_cast<double>(moe.router) * static_cast<double>(counts.moe_layers + config.model.mtp_modules);
    m.model_parameters = counts.total.sum() + counts.mtp_total.sum();  // MTP modules train with the model
    routed = counts.total.routed_experts + counts.mtp_total.routed_experts;
    // Each block saves its input, the attention's normed input, the residual after attention
    // and the FFN's normed input: 4 rows of d_model per token, at least.
    m.activations = 4 * tokens * d * static_cast<double>(config.model.n_layers) * element;
    // On several ranks every MoE layer also keeps the gathered input of the whole batch (routing).
    if (ranks > 1)
      m.activations += batch_tokens * d * static_cast<double>(counts.moe_layers + config.model.mtp_modules) * element;
    m.logits = tokens * static_cast<double>(config.model.vocab_size) * element;
  } else {
    m.model_parameters = static_cast<double>(moe.router + moe.routed_experts + moe.shared_experts + moe.balancers);
    routed = static_cast<double>(moe.routed_experts);
    m.activations = 3 * tokens * d * element;  // the batch's inputs, targets and outputs
  }
  m.parameters = m.model_parameters - routed + routed / expert_split;
  m.weights = m.parameters * element;
  m.gradients = m.weights;
  m.optimizer = 2 * m.weights;
  if (language_model && config.train.precision == DType::bf16)
    m.gemm_copies = (m.parameters - routers) * static_cast<double>(dtype_size(DType::bf16));
  m.corpus = corpus_bytes;
  return m;
}

double machine_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  double bytes = pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page) : 0;
  // A container's limit (cgroup v2, then v1) when it is lower than the machine's memory.
  for (const char* file : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream in(file);
    double limit = 0;
    if (in >> limit && limit > 0 && (bytes == 0 || limit < bytes)) bytes = limit;
  }
  return bytes;
}

void check_run(const RunConfig& config, const Recipe& recipe, const PluginRegistry& registry,
               const CheckOptions& options) {
  Diagnostics out;
  check_trainable(config, recipe, out);
  const int64_t world = run_world(config.parallel, options.world);
  check_parallel(config, recipe, world, out);
  const double corpus = check_data(config, recipe, options, out);
  const MemoryEstimate memory = estimate_memory(config, registry, corpus, world);
  const double available = options.memory_bytes > 0 ? options.memory_bytes : machine_memory_bytes();
  if (available > 0 && memory.all_ranks() > available) {
    const char* key = dominant_key(memory);
    const std::string need =
        world > 1 ? fmt::format(
                        "its {} ranks, all on this machine, need at least {} of memory, {} each ({}; {:.4g} "
                        "parameters per rank)",
                        world, format_bytes(memory.all_ranks()), format_bytes(memory.total()), memory.describe(),
                        memory.parameters)
                  : fmt::format("this run needs at least {} of memory ({}; {:.4g} parameters)",
                                format_bytes(memory.total()), memory.describe(), memory.parameters);
    out.add(first_set(recipe, {key, "model", "train"}), key,
            fmt::format("{}, but {} has {}", need, options.memory_bytes > 0 ? "--memory-gib gives" : "this machine",
                        format_bytes(available)),
            "make the model, train.batch_size x train.seq_len or the corpus smaller; `moelab inspect` describes a "
            "model of any size without allocating it");
  }
  out.throw_if_any();
}

}  // namespace moelab

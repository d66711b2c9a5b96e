// What `moelab check` proves of a run beyond its recipe's schema, so that it refuses what `run`
// cannot do: that the trainer supports the model, that the run's data is there and fits the
// vocabulary, and that a lower bound of the memory the run allocates fits the machine. `run`
// calls the same check for every point of a sweep before the first one starts.
#pragma once

#include <cstdint>
#include <string>

#include "moelab/config.hpp"

namespace moelab {

class PluginRegistry;
class Recipe;

// A lower bound of what one run allocates, in bytes: every term is memory the trainer certainly
// holds at once (no workspace, allocator slack or thread stacks are counted).
// Per rank: on several ranks each holds its share of the routed experts and of the batch (and,
// for routing, the MoE layers' inputs of the whole batch); everything else is replicated.
struct MemoryEstimate {
  int64_t ranks = 1;
  double model_parameters = 0;  // the model's (or the layer's) parameters, once, MTP modules included
  double parameters = 0;        // those a rank holds: the routed experts split over parallel.expert
  double weights = 0;           // parameters x element size
  double gradients = 0;         // one gradient per parameter
  double optimizer = 0;         // AdamW's two moments per parameter
  double gemm_copies = 0;       // train.precision = "bf16": a bf16 copy of every parameter but the routers' (the
                                // matrices' Parameter::gemm_copy; vectors counted too, an upper bound)
  double activations = 0;       // what one step's forward saves for its backward: 4 rows of d_model per token and
                                // layer, and on several ranks each MoE layer's gathered input
  double logits = 0;            // the LM head's logits of one step: tokens x vocab_size
  double corpus = 0;            // the token data held in memory (files as read, or the Markov tables)
  double total() const {        // one rank
    return weights + gradients + optimizer + gemm_copies + activations + logits + corpus;
  }
  double all_ranks() const { return total() * static_cast<double>(ranks); }
  // "weights 1.2 GiB, gradients 1.2 GiB, AdamW state 2.4 GiB, ..."
  std::string describe() const;
};

// The estimate for `config` on `world` ranks (its [parallel] layout); `corpus_bytes` from
// token_data_bytes (0 for the layer-only task). Builds the MoE layer on the meta kernel to count
// its parameters (no weight is allocated).
MemoryEstimate estimate_memory(const RunConfig& config, const PluginRegistry& registry, double corpus_bytes,
                               int64_t world = 1);

// The memory a run may use: this machine's physical memory, or the cgroup limit when lower.
double machine_memory_bytes();

// "1.50 GiB", "12.0 TiB".
std::string format_bytes(double bytes);

struct CheckOptions {
  bool read_data = true;    // read the data files (UTF-8, token ids); false: only globs and sizes
  double memory_bytes = 0;  // the memory to fit in; 0: machine_memory_bytes()
  int64_t world = 0;        // ranks the run has; 0: the [parallel] layout's expert x data (expert when data = 0)
};

// The ranks a run of `config` has when `world` (0: not known) ranks are started.
int64_t run_world(const ParallelConfig& parallel, int64_t world);
// The [parallel] layout against `world` ranks, the model and the batch; UsageError with every
// problem at its recipe key.
void check_parallel_layout(const RunConfig& config, const Recipe& recipe, int64_t world);

// Throws UsageError carrying a diagnostic at the recipe's key for every reason `config` cannot
// run: a model the trainer does not support, data that is missing or does not fit the
// vocabulary, a parallel layout that does not fit the ranks, the experts or the batch, or a
// memory estimate above the memory available.
void check_run(const RunConfig& config, const Recipe& recipe, const PluginRegistry& registry,
               const CheckOptions& options = {});

}  // namespace moelab

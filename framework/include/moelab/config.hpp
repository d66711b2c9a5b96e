// The typed, validated form of a recipe: built once, at construction, from the resolved recipe
// and the schemas of the core sections and of every plugin it names. Nothing downstream reads
// TOML; everything reads these structs.
#pragma once

#include <algorithm>
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
  // The router's GEMMs: in f32 whatever train.precision says (Megatron-Core's moe_router_dtype =
  // "fp32"), or in train.precision like the rest of the model.
  bool router_in_train_precision = false;
  PluginChoice router, experts;
  std::vector<PluginChoice> balancers;
};

enum class Architecture { decoder, encoder_decoder };
enum class AttentionKind { none, mha, gqa, mla };
enum class NormKind { none, rmsnorm, layernorm };
enum class QkNorm { none, head, full };
const char* architecture_name(Architecture architecture);
const char* attention_name(AttentionKind attention);
const char* norm_name(NormKind norm);

// The transformer the MoE layers sit in. The defaults describe what `moelab run` trains today:
// one MoE layer and nothing around it (no embeddings, attention or norms), so recipes that only
// state an MoE layer keep their meaning. framework/src/model/model_shape.cpp counts it.
struct ModelConfig {
  int64_t d_model = 64;
  DType dtype = DType::f32;
  Architecture architecture = Architecture::decoder;
  int64_t vocab_size = 0;        // 0: no token embedding or LM head
  int64_t n_layers = 1;          // decoder layers (the only stack of a decoder-only model)
  int64_t n_encoder_layers = 0;  // encoder layers; encoder_decoder only
  AttentionKind attention = AttentionKind::none;
  int64_t n_heads = 1;
  int64_t n_kv_heads = 1;       // resolved: n_heads unless the recipe sets it (GQA)
  int64_t head_dim = 64;        // resolved: d_model / n_heads unless the recipe sets it
  bool attention_bias = false;  // biases on q, k, v and the output projection
  bool qkv_bias = false;        // biases on q, k, v only (Qwen1.5/Qwen2)
  QkNorm qk_norm = QkNorm::none;
  // Multi-head latent attention (DeepSeek-V2, sec. 2.1): q_lora_rank 0 projects q directly.
  int64_t q_lora_rank = 0, kv_lora_rank = 512, qk_nope_head_dim = 128, qk_rope_head_dim = 64, v_head_dim = 128;
  int64_t relative_attention_buckets = 0;  // T5's relative position bias, [buckets, n_heads] per stack
  int64_t d_ff = 0;                        // dense FFN width; 0: no dense FFN layer
  bool dense_ffn_glu = true;               // dense_ffn = "glu" (gate, up, down) or "full" (in, out)
  std::string dense_activation = "silu";
  int64_t first_dense_layers = 0;  // k: the first k layers of each stack have a dense FFN
  int64_t moe_every = 1;           // n: after those, every n-th layer's FFN is MoE, the others dense
  NormKind norm = NormKind::none;
  bool norm_bias = false;  // layernorm with a bias (2d per norm instead of d)
  bool tied_embeddings = false;
  int64_t mtp_modules = 0;       // DeepSeek-V3 multi-token prediction modules, counted apart
  double mtp_loss_weight = 0.3;  // lambda: loss = CE + lambda / D * sum of the D modules' CE (V3: 0.3, later 0.1)
  double rope_theta = 10000.0;
  double norm_eps = 1e-6;
  double init_std = 0.02;  // normal init of every projection and embedding

  // Whether layer `index` (0-based, within its stack) has an MoE FFN.
  bool is_moe_layer(int64_t index) const {
    return index >= first_dense_layers && (index - first_dense_layers + 1) % moe_every == 0;
  }
};

// [reference]: published figures a recipe reproduces (0: not published), checked by the tests.
struct ReferenceConfig {
  int64_t published_total_params = 0;
  int64_t published_active_params = 0;
  int64_t published_precision = 0;  // the unit the figures are rounded to ("26B": 1e9); 0: as written
  std::string source;               // where the architecture and the figures were published
  std::string counts;               // what the published figures include or leave out
  std::string known_deviation;      // why inspect misses a figure by more than the tolerance (tested to be real)
};

enum class LrSchedule { constant, cosine, linear };
const char* lr_schedule_name(LrSchedule schedule);

struct TrainConfig {
  int64_t steps = 200;
  int64_t batch_size = 8;  // sequences per step
  int64_t seq_len = 64;    // tokens per sequence
  double lr = 1e-3;        // peak learning rate
  LrSchedule schedule = LrSchedule::cosine;
  int64_t warmup_steps = 0;   // linear warmup from 0 to lr over these steps
  double min_lr_ratio = 0.1;  // the schedule decays to lr * min_lr_ratio at the last step
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.0;          // decoupled; never applied to biases and norms
  std::vector<std::string> no_decay;  // parameter groups also exempt: names containing one of these
  double grad_clip = 1.0;             // global norm; 0 disables
  DType precision = DType::f32;       // the GEMMs' compute precision (Ops::set_matmul_precision): f32 | bf16
  int64_t log_every = 10;
  int64_t eval_every = 50;  // 0 disables (the last step is always evaluated)
  int64_t eval_batches = 4;
  int64_t checkpoint_every = 0;   // 0: only at the end
  bool keep_checkpoints = false;  // also keep each as checkpoints/step_NNNNNNNN.safetensors
  // The learning rate at `step` (1-based): warmup, then the schedule down to lr * min_lr_ratio.
  double lr_at(int64_t step) const;
};

// [data]: what the language model reads. Token windows are drawn deterministically from
// (seed, split, batch index), so a resumed run sees exactly the batches of an uninterrupted one.
struct DataConfig {
  std::string kind = "markov";  // markov | text | tokens
  int64_t seed = -1;            // seed of the corpus tables and of the batches; -1: the run's seed
  // markov: `domains` random order-`order` Markov sources over the model's vocabulary; from each
  // context a source moves to one of `branching` successors, with probabilities drawn from a
  // symmetric Dirichlet(`concentration`). Each sequence comes from one domain.
  int64_t domains = 4;
  int64_t order = 1;
  int64_t branching = 4;
  double concentration = 1.0;
  // text / tokens: files or globs (absolute after build_config), read in sorted order and
  // concatenated; the last eval_fraction of the tokens is held out for evaluation.
  std::vector<std::filesystem::path> paths;
  std::string token_dtype = "u16";  // tokens: u16 | u32, little-endian, no header (nanoGPT's .bin)
  double eval_fraction = 0.1;
};

// The built-in synthetic task until the language-model trainer lands: tokens drawn from a
// mixture of clusters, each cluster with its own random teacher map, so experts have real
// structure to specialise on and routing quality shows in the loss.
struct TaskConfig {
  std::string kind = "regression";
  int64_t clusters = 8;
  double noise = 0.01;
};

// [parallel]: how a run started by mpirun splits its work (moelab/parallel.hpp, docs/parallel.md).
// world = expert x data ranks; each holds global batch / world sequences.
// A scope says over which tokens a quantity is counted: the global batch (as one process counts
// it), or each micro-batch on its own (micro_batch sequences: by default each rank's share).
enum class BatchScope { global, local };
const char* batch_scope_name(BatchScope scope);

// What the MoE layers count per micro-batch: capacity, balancer statistics, or neither; and the
// micro-batch, in sequences of the forward's batch (consecutive; the last may be shorter).
struct MicroBatchScopes {
  bool capacity = false;
  bool balance = false;
  int64_t sequences = 0;  // 0: the forward's whole batch
  bool any() const { return capacity || balance; }
};

struct ParallelConfig {
  int64_t expert = 1;         // ranks the routed experts are split over (expert parallelism)
  int64_t data = 0;           // replicas of each expert (data parallelism); 0: the world's ranks / expert
  std::string comm = "auto";  // comm plugin; auto: mpi when started by mpirun, local otherwise
  // global: capacity of the global batch, decided as one process would (results equal to one
  // process); local: each micro-batch's capacity over its own tokens (Megatron-Core's per-rank form).
  BatchScope capacity = BatchScope::global;
  // global: balancer statistics (f_i, P_i, ...) of the global batch (Qwen's global-batch
  // balancing, arXiv 2501.11873); local: each balancer's loss on each micro-batch, averaged (the
  // per-micro-batch form of most codebases).
  BatchScope balance = BatchScope::global;
  // Sequences per micro-batch of the local scopes; 0: train.batch_size / the ranks of the run.
  int64_t micro_batch = 0;
  // Ranks this layout needs, once `data` is known (0 while it follows the world).
  int64_t world() const { return data > 0 ? expert * data : 0; }
  // The local scopes of a run on `world` ranks training batches of `batch_size` sequences.
  MicroBatchScopes scopes(int64_t batch_size, int64_t world) const {
    MicroBatchScopes s;
    s.capacity = capacity == BatchScope::local;
    s.balance = balance == BatchScope::local;
    if (s.any()) s.sequences = micro_batch > 0 ? micro_batch : batch_size / std::max<int64_t>(1, world);
    return s;
  }
};

struct RunConfig {
  std::string name;
  std::string description;
  uint64_t seed = 1;
  std::string device = "cpu";
  PluginChoice kernel;                              // [kernel]: type defaults to the device's name
  std::vector<std::filesystem::path> plugin_paths;  // [plugins] paths, absolute
  ModelConfig model;
  MoeConfig moe;
  ReferenceConfig reference;
  TrainConfig train;
  TaskConfig task;                            // the layer-only regression task (model without vocabulary)
  DataConfig data;                            // the language model's data (model with a vocabulary)
  std::filesystem::path output_dir = "runs";  // [output] dir, relative to the working directory
  ParallelConfig parallel;

  // The MoE layer as the router and balancers see it: d_model, dtype, and num_experts/top_k after
  // the expert layout's adjust_layer (a fine-grained layout multiplies both).
  LayerSpec layer;
};

// Scans recipe [plugins] paths into `registry`, validates every section and plugin table, fills
// every default into `recipe` (so the printed recipe is complete) and returns the typed config.
// Throws UsageError with all diagnostics (unknown keys with suggestions, wrong types, ranges,
// unknown plugins with the known names, cross-field rules), each at file:line:column.
// The recipe a run folder keeps (recipe.toml) for a run on `world` ranks. With a local scope and
// parallel.micro_batch = 0, the micro-batch the run resolves it to (each rank's share) is set in
// config and written in, so that eval, sample and a resume on another layout (after moelab
// reshard) count over the same micro-batches.
std::string run_folder_recipe(const Recipe& recipe, RunConfig& config, int64_t world);

RunConfig build_config(Recipe& recipe, PluginRegistry& registry);

// A plugin parameter's value from its text as TOML (a bare word is a string), checked against its
// spec as a recipe's value is: UsageError naming the key otherwise. For `--set key=value` outside
// recipes (moelab test-plugin).
ParamValue parse_param_text(const ParamSpec& spec, const std::string& text);

// The core sections' schemas (for docs and `moelab plugins --describe core`).
struct SectionSchema {
  std::string key;  // "", "model", "moe", "train", ...
  ParamSchema params;
};
std::vector<SectionSchema> core_schema();

}  // namespace moelab

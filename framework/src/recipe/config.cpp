// Recipe -> RunConfig: every core section and plugin table checked against its schema, every
// problem collected with its place, defaults filled into the recipe so that it prints complete.
#include "moelab/config.hpp"

#include <fmt/format.h>
#include <toml++/toml.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "moelab/registry.hpp"

namespace moelab {

namespace fs = std::filesystem;

const char* architecture_name(Architecture architecture) {
  return architecture == Architecture::encoder_decoder ? "encoder_decoder" : "decoder";
}

const char* attention_name(AttentionKind attention) {
  switch (attention) {
    case AttentionKind::none:
      return "none";
    case AttentionKind::mha:
      return "mha";
    case AttentionKind::gqa:
      return "gqa";
    case AttentionKind::mla:
      return "mla";
  }
  return "?";
}

const char* norm_name(NormKind norm) {
  switch (norm) {
    case NormKind::none:
      return "none";
    case NormKind::rmsnorm:
      return "rmsnorm";
    case NormKind::layernorm:
      return "layernorm";
  }
  return "?";
}

const char* batch_scope_name(BatchScope scope) {
  return scope == BatchScope::local ? "local" : "global";
}

const char* overflow_name(Overflow overflow) {
  switch (overflow) {
    case Overflow::drop:
      return "drop";
    case Overflow::reroute:
      return "reroute";
    case Overflow::dropless:
      return "dropless";
  }
  return "?";
}

const char* lr_schedule_name(LrSchedule schedule) {
  switch (schedule) {
    case LrSchedule::constant:
      return "constant";
    case LrSchedule::cosine:
      return "cosine";
    case LrSchedule::linear:
      return "linear";
  }
  return "?";
}

double TrainConfig::lr_at(int64_t step) const {
  if (warmup_steps > 0 && step <= warmup_steps)
    return lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
  const double decay_steps = static_cast<double>(std::max<int64_t>(steps - warmup_steps, 1));
  const double progress = std::clamp(static_cast<double>(step - warmup_steps) / decay_steps, 0.0, 1.0);
  const double min_lr = lr * min_lr_ratio;
  switch (schedule) {
    case LrSchedule::constant:
      return lr;
    case LrSchedule::linear:
      return lr - (lr - min_lr) * progress;
    case LrSchedule::cosine:
      return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(3.141592653589793 * progress));
  }
  return lr;
}

// Upper bounds of the sizes a recipe states: each far beyond any published model (DeepSeek-V3:
// d_model 7168, 256 experts, 61 layers, vocabulary 129280), low enough that products of a few of
// them stay exact in int64 and that `check` never loops over an absurd count. What a run would
// allocate is checked separately, against the machine's memory.
constexpr double kMaxWidth = 1 << 16;        // d_model, MLA ranks
constexpr double kMaxFfn = 1 << 20;          // dense FFN width
constexpr double kMaxVocab = 1 << 24;        // vocabulary, Markov branching
constexpr double kMaxLayers = 1024;          // layers per stack
constexpr double kMaxHeads = 1024;           // attention heads
constexpr double kMaxHeadDim = 4096;         // per-head widths, T5 buckets
constexpr double kMaxMtp = 64;               // multi-token prediction modules
constexpr double kMaxExperts = 1 << 16;      // routed experts
constexpr double kMaxTopK = 1024;            // experts per token
constexpr double kMaxSteps = 1e9;            // steps and step intervals
constexpr double kMaxBatch = 1 << 20;        // sequences per step
constexpr double kMaxSeqLen = 1 << 20;       // tokens per sequence
constexpr double kMaxEvalBatches = 1 << 20;  // batches per evaluation
constexpr double kMaxDomains = 1 << 16;      // Markov sources, task clusters
constexpr double kMaxOrder = 16;             // Markov context length
constexpr double kMaxCount = 1e15;           // token counts

std::vector<SectionSchema> core_schema() {
  return {
      {"",
       {param_string("name", "", "run name; default: the recipe file's name without extension"),
        param_string("description", "", "free text, kept in the run folder"),
        param_int("seed", 1, "seed of every random stream of the run").at_least(0),
        param_choice("device", "cpu", {"cpu", "cuda"}, "where tensors live; also the default kernel plugin")}},
      {"plugins",
       {param_string_list("paths", {},
                          "extra plugin folders, relative to the file that sets them; scanned before "
                          "the plugin tables are checked")}},
      {"kernel", {param_string("type", "", "kernel plugin; default: the device's name. Its parameters follow")}},
      {"model",
       {param_int("d_model", 64, "hidden size of the tokens the MoE layer sees").range(1, kMaxWidth),
        param_choice("dtype", "f32", {"f32", "f64"}, "parameter and activation dtype"),
        param_choice("architecture", "decoder", {"decoder", "encoder_decoder"},
                     "decoder-only, or a T5-style encoder-decoder (Switch, GShard, ST-MoE)"),
        param_int("vocab_size", 0, "token vocabulary; 0: no embedding or LM head (the built-in task feeds vectors)")
            .range(0, kMaxVocab),
        param_int("n_layers", 1, "transformer layers of the decoder (the only stack of a decoder-only model)")
            .range(1, kMaxLayers),
        param_int("n_encoder_layers", 0, "encoder layers; encoder_decoder only").range(0, kMaxLayers),
        param_choice("attention", "none", {"none", "mha", "gqa", "mla"},
                     "self-attention: none (the bare MoE layer), multi-head, grouped-query, or DeepSeek's "
                     "multi-head latent attention"),
        param_int("n_heads", 1, "attention heads").range(1, kMaxHeads),
        param_int("n_kv_heads", 0, "key/value heads (GQA); 0: n_heads").range(0, kMaxHeads),
        param_int("head_dim", 0, "width of one head; 0: d_model / n_heads").range(0, kMaxHeadDim),
        param_bool("attention_bias", false, "biases on the q, k, v and output projections"),
        param_bool("qkv_bias", false, "biases on the q, k and v projections only (Qwen1.5, Qwen2)"),
        param_choice("qk_norm", "none", {"none", "head", "full"},
                     "RMSNorm on queries and keys: per head (Qwen3, width head_dim) or over the whole "
                     "projection (OLMoE)"),
        param_int("q_lora_rank", 0, "MLA: rank of the query compression; 0 projects queries directly")
            .range(0, kMaxWidth),
        param_int("kv_lora_rank", 512, "MLA: rank of the joint key/value compression").range(1, kMaxWidth),
        param_int("qk_nope_head_dim", 128, "MLA: per-head query/key width without RoPE").range(1, kMaxHeadDim),
        param_int("qk_rope_head_dim", 64, "MLA: per-head query/key width carrying RoPE (the key part shared)")
            .range(0, kMaxHeadDim),
        param_int("v_head_dim", 128, "MLA: per-head value width").range(1, kMaxHeadDim),
        param_int("relative_attention_buckets", 0,
                  "T5 relative position bias buckets ([buckets, n_heads] per stack); 0: none")
            .range(0, kMaxHeadDim),
        param_int("d_ff", 0, "hidden width of the dense FFN layers; 0: there are none").range(0, kMaxFfn),
        param_choice("dense_ffn", "glu", {"glu", "full"}, "dense FFN: gated (gate, up, down) or two-layer (in, out)"),
        param_choice("dense_activation", "silu", {"relu", "gelu", "gelu_erf", "silu"}, "dense FFN activation"),
        param_int("first_dense_layers", 0, "k: the first k layers of each stack have a dense FFN").range(0, kMaxLayers),
        param_int("moe_every", 1, "n: after the first k, layers k+n-1, k+2n-1, ... are MoE, the rest dense")
            .range(1, kMaxLayers),
        param_choice("norm", "none", {"none", "rmsnorm", "layernorm"},
                     "normalisation before each sub-layer and at the end of each stack"),
        param_bool("norm_bias", false, "layernorm with a bias"),
        param_bool("tied_embeddings", false, "the LM head reuses the token embedding"),
        param_float("rope_theta", 10000.0, "RoPE base: head pair i turns at theta^(-2i/head_dim) per position")
            .above(0),
        param_float("norm_eps", 1e-6, "epsilon inside every RMSNorm / LayerNorm").above(0),
        param_float("init_std", 0.02, "standard deviation of the normal init of projections and embeddings")
            .at_least(0),
        param_float("mtp_loss_weight", 0.3,
                    "lambda of the multi-token prediction loss (DeepSeek-V3 eq. 25: 0.3, then 0.1)")
            .at_least(0),
        param_int("mtp_modules", 0,
                  "DeepSeek-V3 multi-token prediction modules (each: two norms, a [d, 2d] projection, one "
                  "layer; embedding and head shared); counted apart from the model")
            .range(0, kMaxMtp)}},
      {"reference",
       {param_int("published_total_params", 0, "total parameters as published; 0: none published").at_least(0),
        param_int("published_active_params", 0, "active parameters per token as published; 0: none published")
            .at_least(0),
        param_int("published_precision", 0,
                  "the unit the published figures are rounded to (26B: 1000000000); 0: exact as written")
            .at_least(0),
        param_string("source", "", "where the architecture and the figures were published"),
        param_string("counts", "", "what the published figures include or leave out"),
        param_string("known_deviation", "",
                     "why inspect misses a published figure by more than the tolerance; the test then "
                     "checks that the miss is real")}},
      {"moe",
       {param_int("num_experts", 8, "routed experts, as the recipe states them").range(1, kMaxExperts),
        param_int("top_k", 2, "experts per token; at most num_experts").range(1, kMaxTopK),
        param_float("capacity_factor", 1.25, "expert capacity in training, times tokens*k/experts").above(0),
        param_float("eval_capacity_factor", 2.0, "expert capacity in evaluation").above(0),
        param_choice("overflow", "drop", {"drop", "reroute", "dropless"},
                     "what happens to a token beyond an expert's capacity"),
        param_int("dead_expert_window", 10000, "tokens an expert may go unused before it is reported dead")
            .range(1, kMaxCount),
        param_choice("router_precision", "f32", {"f32", "train"},
                     "the router's GEMMs: f32 whatever train.precision says (Megatron-Core's moe_router_dtype), "
                     "or train.precision like the rest of the model")}},
      {"moe.router", {param_string("type", "", "router plugin. Its parameters follow").required()}},
      {"moe.experts", {param_string("type", "", "expert layout plugin. Its parameters follow").required()}},
      {"moe.balancers",
       {param_string("type", "",
                     "[[moe.balancers]]: one table per balancer plugin, each with its parameters; "
                     "none by default")
            .required()}},
      {"train",
       {param_int("steps", 200, "optimiser steps").range(1, kMaxSteps),
        param_int("batch_size", 8, "sequences per step").range(1, kMaxBatch),
        param_int("seq_len", 64, "tokens per sequence").range(1, kMaxSeqLen),
        param_float("lr", 1e-3, "peak learning rate").above(0),
        param_choice("schedule", "cosine", {"constant", "cosine", "linear"},
                     "after warmup: constant, cosine or linear decay to lr * min_lr_ratio at the last step"),
        param_int("warmup_steps", 0, "linear warmup from 0 to lr over these steps").range(0, kMaxSteps),
        param_float("min_lr_ratio", 0.1, "final learning rate as a fraction of lr").range(0, 1),
        param_float("beta1", 0.9, "AdamW first-moment decay").range(0, 0.999999),
        param_float("beta2", 0.95, "AdamW second-moment decay").range(0, 0.999999),
        param_float("eps", 1e-8, "AdamW epsilon").above(0),
        param_float("weight_decay", 0.0, "decoupled weight decay; never applied to biases, norms or the expert bias")
            .at_least(0),
        param_string_list("no_decay", {},
                          "parameter groups exempt from weight decay besides biases and norms: names containing "
                          "one of these (\"embed\", \"head\", \"router\", ...)"),
        param_float("grad_clip", 1.0, "global gradient norm clip; 0 disables").at_least(0),
        param_choice("precision", "f32", {"f32", "bf16"},
                     "what the model's GEMMs compute in: f32, or bf16 (operands rounded to bf16, products and "
                     "sums in f32; weights, optimiser state and everything else stay f32; routers stay f32)"),
        param_int("log_every", 10, "steps between metric lines").range(1, kMaxSteps),
        param_int("eval_every", 50, "steps between evaluations; 0: only after the last step").range(0, kMaxSteps),
        param_int("eval_batches", 4, "batches per evaluation").range(1, kMaxEvalBatches),
        param_int("checkpoint_every", 0, "steps between checkpoints (moelab run --resume); 0: only at the end")
            .range(0, kMaxSteps),
        param_bool("keep_checkpoints", false,
                   "keep every checkpoint as checkpoints/step_NNNNNNNN.safetensors beside the latest")}},
      {"data",
       {param_choice("kind", "markov", {"markov", "text", "tokens"},
                     "what a model with a vocabulary reads: the built-in multi-domain Markov corpus, UTF-8 text "
                     "files (byte tokens), or pre-tokenized uint16/uint32 token files"),
        param_int("seed", -1,
                  "seed of the corpus and the batches; -1: the run's seed (set it to vary only the model's "
                  "initialisation and routing noise across seeds)")
            .at_least(-1),
        param_int("domains", 4, "markov: sources, each its own random Markov chain; a sequence comes from one")
            .range(1, kMaxDomains),
        param_int("order", 1, "markov: tokens of context each source conditions on").range(1, kMaxOrder),
        param_int("branching", 4, "markov: successors of each context").range(1, kMaxVocab),
        param_float("concentration", 1.0, "markov: Dirichlet concentration of the successor probabilities").above(0),
        param_string_list("paths", {}, "text / tokens: files or globs, relative to the file that sets them"),
        param_choice("token_dtype", "u16", {"u16", "u32"}, "tokens: little-endian token width, no header"),
        param_float("eval_fraction", 0.1, "text / tokens: share of the tokens held out for evaluation")
            .range(0.0001, 0.9)}},
      {"task",
       {param_choice("kind", "regression", {"regression"}, "the synthetic task"),
        param_int("clusters", 8, "clusters of the token mixture, each with its own teacher").range(1, kMaxDomains),
        param_float("noise", 0.01, "standard deviation of the target noise").at_least(0)}},
      {"output", {param_string("dir", "runs", "parent folder of run folders, relative to the working directory")}},
      {"parallel",
       {param_int("expert", 1, "ranks the routed experts are split over (expert parallelism); divides num_experts")
            .range(1, kMaxCount),
        param_int("data", 0,
                  "replicas of each expert (data parallelism); expert x data = the ranks mpirun starts; 0: "
                  "ranks / expert")
            .range(0, kMaxCount),
        param_string("comm", "auto", "communicator plugin: mpi, local, or auto (mpi when started by mpirun)"),
        param_choice("capacity", "global", {"global", "local"},
                     "expert capacity over the global batch (as one process) or over each micro-batch's tokens"),
        param_choice("balance", "global", {"global", "local"},
                     "balancer statistics over the global batch (as one process) or each micro-batch's, averaged"),
        param_int("micro_batch", 0,
                  "sequences per micro-batch of the local scopes; 0: train.batch_size / ranks (each rank's share)")
            .range(0, kMaxCount)}},
  };
}

namespace {

// field = the recipe's value of `key` when the recipe sets it; the struct's default stays
// otherwise. The field's type picks the typed getter (the schema has already checked the value).
template <class Field>
void read_value(const ParamSet& values, const std::string& key, Field& field) {
  if (!values.has(key)) return;
  if constexpr (std::is_same_v<Field, bool>)
    field = values.get_bool(key);
  else if constexpr (std::is_integral_v<Field>)
    field = static_cast<Field>(values.get_int(key));
  else if constexpr (std::is_floating_point_v<Field>)
    field = values.get_float(key);
  else if constexpr (std::is_constructible_v<Field, std::string>)  // strings, paths
    field = Field(values.get_string(key));
  else
    field = values.get_string_list(key);
}

const ParamSchema& schema_of(const std::vector<SectionSchema>& sections, const std::string& key) {
  for (const auto& s : sections)
    if (s.key == key) return s.params;
  MOELAB_CHECK(false, "no core section '{}'", key);
  static const ParamSchema none;
  return none;
}

std::vector<std::string> names_of(const ParamSchema& schema) {
  std::vector<std::string> names;
  for (const auto& spec : schema) names.push_back(spec.name);
  return names;
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ", ") + item;
  return out;
}

std::string node_kind(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::table:
      return "table";
    case toml::node_type::array:
      return "array";
    case toml::node_type::string:
      return "string";
    case toml::node_type::integer:
      return "integer";
    case toml::node_type::floating_point:
      return "float";
    case toml::node_type::boolean:
      return "boolean";
    case toml::node_type::date:
      return "date";
    case toml::node_type::time:
      return "time";
    case toml::node_type::date_time:
      return "date-time";
    default:
      return "nothing";
  }
}

// What a value is, for messages: 'a table', 'string "glu"', 'array [1, 2]'.
std::string describe(const toml::node& node) {
  if (node.is_table()) return "a table";
  std::string text = toml_value_text(node);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return node_kind(node) + " " + text;
}

// A TOML value as the ParamValue closest to `expected`; nothing for tables, dates and arrays of
// mixed or nested types.
std::optional<ParamValue> to_param_value(const toml::node& node, ParamType expected) {
  if (const auto* v = node.as_boolean()) return ParamValue{v->get()};
  if (const auto* v = node.as_integer()) return ParamValue{v->get()};
  if (const auto* v = node.as_floating_point()) return ParamValue{v->get()};
  if (const auto* v = node.as_string()) return ParamValue{v->get()};
  const auto* array = node.as_array();
  if (!array) return std::nullopt;
  if (array->empty()) {
    switch (expected) {
      case ParamType::integer_list:
        return ParamValue{std::vector<int64_t>{}};
      case ParamType::real_list:
        return ParamValue{std::vector<double>{}};
      default:
        return ParamValue{std::vector<std::string>{}};
    }
  }
  std::vector<int64_t> ints;
  std::vector<double> reals;
  std::vector<std::string> strings;
  for (const auto& element : *array) {
    if (const auto* i = element.as_integer()) {
      ints.push_back(i->get());
      reals.push_back(static_cast<double>(i->get()));
    } else if (const auto* r = element.as_floating_point()) {
      reals.push_back(r->get());
    } else if (const auto* s = element.as_string()) {
      strings.push_back(s->get());
    } else {
      return std::nullopt;
    }
  }
  if (strings.size() == array->size()) return ParamValue{std::move(strings)};
  if (ints.size() == array->size() && expected != ParamType::real_list) return ParamValue{std::move(ints)};
  if (reals.size() == array->size()) return ParamValue{std::move(reals)};
  return std::nullopt;
}

// Widens integers where the schema wants floats, so the value (and the printed recipe) has the
// declared type.
ParamValue as_declared(const ParamSpec& spec, ParamValue value) {
  if (spec.type == ParamType::real)
    if (const auto* i = std::get_if<int64_t>(&value)) return static_cast<double>(*i);
  if (spec.type == ParamType::real_list)
    if (const auto* v = std::get_if<std::vector<int64_t>>(&value)) return std::vector<double>(v->begin(), v->end());
  return value;
}

void put(toml::table& table, const std::string& name, const ParamValue& value) {
  std::visit(
      [&](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, bool> || std::is_same_v<T, int64_t> || std::is_same_v<T, double> ||
                      std::is_same_v<T, std::string>) {
          table.insert_or_assign(name, v);
        } else {
          toml::array array;
          for (const auto& element : v) array.push_back(element);
          table.insert_or_assign(name, std::move(array));
        }
      },
      value);
}

// The dotted key one level up ("moe.router.type" -> "moe.router", "moe.balancers[1]" ->
// "moe.balancers"), respecting quoted keys.
std::string parent_key(const std::string& key) {
  size_t cut = 0;
  bool quoted = false;
  for (size_t i = 0; i < key.size(); ++i) {
    if (key[i] == '\\' && quoted) {
      ++i;
      continue;
    }
    if (key[i] == '"')
      quoted = !quoted;
    else if (!quoted && (key[i] == '.' || key[i] == '['))
      cut = i;
  }
  return key.substr(0, cut);
}

std::string plural(PluginKind kind) {
  return kind == PluginKind::experts ? "expert layout" : plugin_kind_name(kind);
}

class Validator {
 public:
  Validator(Recipe& recipe, PluginRegistry& registry, Diagnostics& diagnostics)
      : recipe_(recipe), registry_(registry), diagnostics_(diagnostics) {}

  // A diagnostic at the key's value (or the key itself), or, for a key the recipe does not
  // have, at the nearest enclosing table the recipe does have.
  void error(const std::string& key, std::string message, std::string hint = {}, bool at_key = false) {
    Diagnostic d;
    d.where = at_key ? recipe_.where_key(key) : recipe_.where(key);
    std::string located = key;
    while (!d.where.known() && !located.empty()) {
      located = parent_key(located);
      d.where = recipe_.where(located);
    }
    if (!d.where.known()) d.where = SourceLocation{recipe_.path().string(), 0, 0};
    d.key = key;
    d.message = std::move(message);
    d.hint = std::move(hint);
    d.note = recipe_.note(located);
    diagnostics_.add(std::move(d));
  }

  size_t errors() const { return diagnostics_.size(); }

  // The table at `parent`.`name`, created empty when absent; nullptr (reported) when it is not a table.
  toml::table* section(toml::table& parent, const std::string& parent_path, const std::string& name) {
    const std::string path = Recipe::key_path(parent_path, name);
    toml::node* node = parent.get(name);
    if (!node) {
      parent.insert(name, toml::table{});
      return parent.get(name)->as_table();
    }
    if (auto* table = node->as_table()) return table;
    error(path, fmt::format("expected a table, got {}", describe(*node)),
          node->is_string() && (name == "router" || name == "experts" || name == "kernel")
              ? fmt::format("write [{}] with type = \"{}\"", path, node->as_string()->get())
              : fmt::format("write [{}] followed by its keys", path));
    return nullptr;
  }

  // Checks `table` against `schema` (plus `other_keys`, handled by the caller), fills defaults
  // into it and returns the values.
  ParamSet params(toml::table& table, const std::string& path, const ParamSchema& schema,
                  const std::vector<std::string>& other_keys) {
    std::vector<std::string> valid = names_of(schema);
    valid.insert(valid.end(), other_keys.begin(), other_keys.end());
    for (auto&& [key, node] : table) {
      const std::string name(key.str());
      if (std::find(valid.begin(), valid.end(), name) != valid.end()) continue;
      const std::string near = nearest_name(name, valid);
      std::vector<std::string> sorted = valid;
      std::sort(sorted.begin(), sorted.end());
      error(Recipe::key_path(path, name),
            path.empty() ? fmt::format("unknown key '{}'", name) : fmt::format("unknown key '{}' in [{}]", name, path),
            near.empty() ? fmt::format("valid keys: {}", join(sorted)) : fmt::format("did you mean '{}'?", near), true);
    }
    ParamSet set;
    for (const auto& spec : schema) {
      const std::string key = Recipe::key_path(path, spec.name);
      const toml::node* node = table.get(spec.name);
      if (!node) {
        if (spec.default_value) {
          put(table, spec.name, *spec.default_value);
          set.set(spec.name, *spec.default_value);
        } else {
          error(key, fmt::format("missing required key '{}' ({})", spec.name, param_type_name(spec.type)));
        }
        continue;
      }
      std::optional<ParamValue> value = to_param_value(*node, spec.type);
      if (!value) {
        error(key, fmt::format("expected {}, got {}", param_type_name(spec.type), describe(*node)),
              node->is_table() ? fmt::format("'{}' is a value, not a table", spec.name) : std::string{});
        continue;
      }
      if (std::string problem = check_param_value(spec, *value); !problem.empty()) {
        std::string hint;
        if (!spec.choices.empty())
          if (const auto* s = std::get_if<std::string>(&*value))
            if (auto near = nearest_name(*s, spec.choices); !near.empty())
              hint = fmt::format("did you mean \"{}\"?", near);
        error(key, std::move(problem), std::move(hint));
        continue;
      }
      ParamValue declared = as_declared(spec, std::move(*value));
      if (declared.index() != to_param_value(*node, spec.type)->index()) put(table, spec.name, declared);
      set.set(spec.name, std::move(declared), recipe_.where(key));
    }
    return set;
  }

  // A plugin table: `type` names a plugin of `kind`, the other keys are its parameters.
  // `default_type`: the type when the table has none (the kernel's is the device name).
  std::optional<PluginChoice> plugin(toml::table& table, const std::string& path, PluginKind kind,
                                     const std::optional<std::string>& default_type, const PluginInfo** found) {
    const std::string type_key = Recipe::key_path(path, "type");
    const std::vector<std::string> known = registry_.names(kind);
    auto known_hint = [&](const std::string& near) {
      std::string hint = near.empty() ? "" : fmt::format("did you mean '{}'? ", near);
      if (known.empty()) {
        std::vector<std::string> folders;
        for (const auto& f : registry_.searched()) folders.push_back(f.string());
        hint += fmt::format("no {} plugins were found (searched: {})", plural(kind),
                            folders.empty() ? std::string("nothing") : join(folders));
      } else {
        hint += fmt::format("known {} plugins: {}", plural(kind), join(known));
      }
      return hint;
    };
    const toml::node* type_node = table.get("type");
    std::string type;
    bool defaulted = false;
    if (!type_node) {
      if (!default_type) {
        error(type_key, fmt::format("missing required key 'type': the {} plugin to use", plural(kind)), known_hint(""));
        return std::nullopt;
      }
      type = *default_type;
      defaulted = true;
      table.insert("type", type);
    } else if (const auto* s = type_node->as_string()) {
      type = s->get();
    } else {
      error(type_key, fmt::format("expected a {} plugin name (string), got {}", plural(kind), describe(*type_node)),
            known_hint(""));
      return std::nullopt;
    }
    if (std::string twice = registry_.duplicate(kind, type); !twice.empty()) {
      error(type_key, twice, "remove one of the two files, or its folder from the plugin search path");
      return std::nullopt;
    }
    const PluginInfo* info = registry_.find(kind, type);
    if (!info) {
      std::string hint = known_hint(nearest_name(type, known));
      if (const PluginInfo* other = registry_.find_any(type))
        hint += fmt::format("; '{}' is a {} plugin", type, plugin_kind_name(other->kind));
      // Why files of the search path were not usable, here rather than behind another command.
      const auto& problems = registry_.problems();
      for (size_t i = 0; i < problems.size() && i < 3; ++i)
        hint += fmt::format("; {} could not be used: {}", problems[i].file.string(), problems[i].reason);
      if (problems.size() > 3) hint += fmt::format("; {} more unusable plugin files", problems.size() - 3);
      for (const auto& folder : registry_.missing_folders())
        hint += fmt::format("; {}: {}", folder.reason, folder.file.string());
      if (defaulted)
        error("device", fmt::format("no kernel plugin '{}' for device \"{}\"", type, type), std::move(hint));
      else
        error(type_key, fmt::format("unknown {} plugin '{}'", plural(kind), type), std::move(hint));
      return std::nullopt;
    }
    *found = info;
    const size_t before = errors();
    ParamSet params = this->params(table, path, info->schema, {"type"});
    if (errors() != before) return std::nullopt;
    return PluginChoice{type, std::move(params), path};
  }

  // Runs a plugin's own cross-field check, each problem at the parameter it names.
  void plugin_check(const PluginInfo& info, const PluginChoice& choice, const LayerSpec& layer) {
    if (!info.manifest || !info.manifest->check) return;
    ParamProblems problems;
    info.manifest->check(choice.params, layer, problems);
    for (const auto& problem : problems)
      error(problem.param.empty() ? choice.key : Recipe::key_path(choice.key, problem.param), problem.message,
            fmt::format("reported by the {} plugin '{}'", plural(info.kind), info.name));
  }

 private:
  Recipe& recipe_;
  PluginRegistry& registry_;
  Diagnostics& diagnostics_;
};

// Element i of the path list `list_key`, resolved against the folder of the file that set it (an
// override's pseudo-file: the working directory). `base_name` receives that file's name.
fs::path resolve_recipe_path(const Recipe& recipe, const std::string& list_key, size_t i, const std::string& value,
                             std::string* base_name) {
  SourceLocation set_in = recipe.where(Recipe::index_path(list_key, i));
  if (!set_in.known()) set_in = recipe.where(list_key);
  const bool from_file = set_in.known() && set_in.file.front() != '<';
  if (base_name) *base_name = from_file ? set_in.file : "the working directory";
  const fs::path base = from_file ? fs::absolute(fs::path(set_in.file)).parent_path() : fs::current_path();
  return (base / value).lexically_normal();
}

// [model] beyond d_model and dtype: the transformer around the MoE layers, and its cross-field rules.
void read_model(Validator& check, const Recipe& recipe, const ParamSet& values, ModelConfig& m) {
  auto set = [&](const char* key) { return recipe.where(std::string("model.") + key).known(); };
  // Rules about keys that do not apply look at values, not at whether a key is written: a
  // resolved recipe (moelab show, a run folder's recipe.toml) writes every default.
  const ParamSchema schema = schema_of(core_schema(), "model");  // a copy: core_schema() is a temporary
  auto non_default = [&](const char* key) {
    for (const auto& spec : schema)
      if (spec.name == key) return !(spec.default_value && *spec.default_value == values.values().at(key));
    return false;
  };
  m.architecture =
      values.get_string("architecture") == "encoder_decoder" ? Architecture::encoder_decoder : Architecture::decoder;
  m.vocab_size = values.get_int("vocab_size");
  m.n_layers = values.get_int("n_layers");
  m.n_encoder_layers = values.get_int("n_encoder_layers");
  const std::string& attention = values.get_string("attention");
  m.attention = attention == "mha"   ? AttentionKind::mha
                : attention == "gqa" ? AttentionKind::gqa
                : attention == "mla" ? AttentionKind::mla
                                     : AttentionKind::none;
  m.n_heads = values.get_int("n_heads");
  m.n_kv_heads = values.get_int("n_kv_heads") > 0 ? values.get_int("n_kv_heads") : m.n_heads;
  m.head_dim = values.get_int("head_dim") > 0 ? values.get_int("head_dim") : m.d_model / m.n_heads;
  m.attention_bias = values.get_bool("attention_bias");
  m.qkv_bias = values.get_bool("qkv_bias");
  const std::string& qk_norm = values.get_string("qk_norm");
  m.qk_norm = qk_norm == "head" ? QkNorm::head : qk_norm == "full" ? QkNorm::full : QkNorm::none;
  m.q_lora_rank = values.get_int("q_lora_rank");
  m.kv_lora_rank = values.get_int("kv_lora_rank");
  m.qk_nope_head_dim = values.get_int("qk_nope_head_dim");
  m.qk_rope_head_dim = values.get_int("qk_rope_head_dim");
  m.v_head_dim = values.get_int("v_head_dim");
  m.relative_attention_buckets = values.get_int("relative_attention_buckets");
  m.d_ff = values.get_int("d_ff");
  m.dense_ffn_glu = values.get_string("dense_ffn") == "glu";
  m.dense_activation = values.get_string("dense_activation");
  m.first_dense_layers = values.get_int("first_dense_layers");
  m.moe_every = values.get_int("moe_every");
  const std::string& norm = values.get_string("norm");
  m.norm = norm == "rmsnorm" ? NormKind::rmsnorm : norm == "layernorm" ? NormKind::layernorm : NormKind::none;
  m.norm_bias = values.get_bool("norm_bias");
  m.tied_embeddings = values.get_bool("tied_embeddings");
  m.mtp_modules = values.get_int("mtp_modules");
  m.mtp_loss_weight = values.get_float("mtp_loss_weight");
  m.rope_theta = values.get_float("rope_theta");
  m.norm_eps = values.get_float("norm_eps");
  m.init_std = values.get_float("init_std");

  const bool encoder_decoder = m.architecture == Architecture::encoder_decoder;
  if (encoder_decoder && m.n_encoder_layers < 1)
    check.error("model.n_encoder_layers",
                fmt::format("an encoder_decoder model needs n_encoder_layers >= 1, got {}", m.n_encoder_layers),
                "set model.n_encoder_layers to the encoder's depth");
  if (!encoder_decoder && m.n_encoder_layers != 0)
    check.error("model.n_encoder_layers", "is only read when architecture = \"encoder_decoder\"",
                "remove it, or set model.architecture = \"encoder_decoder\"");
  if (m.attention == AttentionKind::mha && set("n_kv_heads") && m.n_kv_heads != m.n_heads)
    check.error("model.n_kv_heads",
                fmt::format("multi-head attention has one key/value head per query head: n_kv_heads ({}) must "
                            "equal n_heads ({})",
                            m.n_kv_heads, m.n_heads),
                "use attention = \"gqa\" for fewer key/value heads");
  if (m.n_kv_heads > m.n_heads || m.n_heads % m.n_kv_heads != 0)
    check.error(set("n_kv_heads") ? "model.n_kv_heads" : "model.n_heads",
                fmt::format("n_heads ({}) must be a multiple of n_kv_heads ({})", m.n_heads, m.n_kv_heads),
                "each key/value head serves n_heads / n_kv_heads query heads");
  if (m.attention != AttentionKind::none && m.attention != AttentionKind::mla && values.get_int("head_dim") == 0 &&
      m.d_model % m.n_heads != 0)
    check.error(
        "model.n_heads",
        fmt::format("d_model ({}) is not divisible by n_heads ({}), so head_dim has no default", m.d_model, m.n_heads),
        "set model.head_dim");
  if (m.attention != AttentionKind::mla)
    for (const char* key : {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"})
      if (non_default(key))
        check.error(std::string("model.") + key, "is only read when attention = \"mla\"",
                    fmt::format("attention is \"{}\"", attention));
  if (m.attention == AttentionKind::mla && (non_default("n_kv_heads") || non_default("head_dim")))
    check.error(non_default("n_kv_heads") ? "model.n_kv_heads" : "model.head_dim",
                "multi-head latent attention sizes its heads with qk_nope_head_dim, qk_rope_head_dim and v_head_dim",
                "remove it");
  if (m.attention == AttentionKind::mla && (m.attention_bias || m.qkv_bias))
    check.error(m.attention_bias ? "model.attention_bias" : "model.qkv_bias",
                "multi-head latent attention has no projection biases here (DeepSeek-V2/V3 have none)");
  if (m.qk_norm != QkNorm::none && (m.attention == AttentionKind::none || m.attention == AttentionKind::mla))
    check.error("model.qk_norm", fmt::format("needs attention = \"mha\" or \"gqa\", got \"{}\"", attention));
  if (m.attention_bias && m.qkv_bias)
    check.error("model.qkv_bias", "attention_bias already puts biases on q, k and v", "set only one of them");
  if (m.norm_bias && m.norm != NormKind::layernorm)
    check.error("model.norm_bias", fmt::format("needs norm = \"layernorm\", got \"{}\"", norm));
  if (m.tied_embeddings && m.vocab_size == 0)
    check.error("model.tied_embeddings", "needs a vocabulary to tie: vocab_size is 0", "set model.vocab_size");
  const int64_t deepest = std::max(m.n_layers, m.n_encoder_layers);
  if (m.first_dense_layers >= deepest && set("first_dense_layers"))
    check.error("model.first_dense_layers",
                fmt::format("{} dense layers leave no MoE layer in a stack of {}", m.first_dense_layers, deepest),
                "the model would have no MoE layer");
  bool any_dense = false;
  for (int64_t i = 0; i < deepest && !any_dense; ++i) any_dense = !m.is_moe_layer(i);
  if (any_dense && m.d_ff == 0)
    check.error(set("first_dense_layers") ? "model.first_dense_layers" : "model.moe_every",
                "some layers have a dense FFN, but model.d_ff is 0", "set model.d_ff, the dense FFN width");
  if (m.mtp_modules > 0 && (encoder_decoder || m.vocab_size == 0))
    check.error("model.mtp_modules", "multi-token prediction needs a decoder-only model with a vocabulary");
}

}  // namespace

ParamValue parse_param_text(const ParamSpec& spec, const std::string& text) {
  toml::table parsed;
  try {
    parsed = toml::parse("value = " + text);
  } catch (const toml::parse_error&) {
    parsed = toml::table{{"value", text}};  // a bare word is a string, as in --set
  }
  const toml::node* node = parsed.get("value");
  std::optional<ParamValue> value = node ? to_param_value(*node, spec.type) : std::nullopt;
  if (!value) throw UsageError(fmt::format("{}: expected {}, got '{}'", spec.name, param_type_name(spec.type), text));
  ParamValue declared = as_declared(spec, std::move(*value));
  if (const std::string problem = check_param_value(spec, declared); !problem.empty())
    throw UsageError(fmt::format("{}: {}", spec.name, problem));
  return declared;
}

RunConfig build_config(Recipe& recipe, PluginRegistry& registry) {
  Diagnostics diagnostics;
  Validator check(recipe, registry, diagnostics);
  toml::table& root = recipe.table();
  const std::vector<SectionSchema> sections = core_schema();
  RunConfig config;

  if (root.contains("sweep")) {
    check.error("sweep", "[sweep] describes several runs and this takes one",
                "moelab check and moelab run expand the sweep; to look at one run, use moelab show --point N or "
                "moelab inspect --point N");
    diagnostics.throw_if_any();
  }

  // --- top level -----------------------------------------------------------------------------
  ParamSchema top = schema_of(sections, "");
  for (auto& spec : top)
    if (spec.name == "name") spec.default_value = ParamValue{recipe.path().stem().string()};
  std::vector<std::string> section_names;
  for (const auto& s : sections)
    if (!s.key.empty() && s.key.find('.') == std::string::npos) section_names.push_back(s.key);
  const ParamSet top_values = check.params(root, "", top, section_names);
  if (top_values.has("name")) config.name = top_values.get_string("name");
  if (top_values.has("description")) config.description = top_values.get_string("description");
  if (top_values.has("seed")) config.seed = static_cast<uint64_t>(top_values.get_int("seed"));
  if (top_values.has("device")) config.device = top_values.get_string("device");

  // --- [plugins]: scanned before any plugin table is checked ------------------------------------
  if (toml::table* plugins = check.section(root, "", "plugins")) {
    const ParamSet values = check.params(*plugins, "plugins", schema_of(sections, "plugins"), {});
    if (values.has("paths")) {
      // Relative to the file that set them (an override's pseudo-file: the working directory).
      const std::vector<std::string>& paths = values.get_string_list("paths");
      toml::array absolute_paths;
      for (size_t i = 0; i < paths.size(); ++i) {
        const std::string key = Recipe::index_path("plugins.paths", i);
        std::string base_name;
        const fs::path folder = resolve_recipe_path(recipe, "plugins.paths", i, paths[i], &base_name);
        std::error_code ec;
        if (!fs::is_directory(folder, ec))
          check.error(key, fmt::format("plugin folder '{}' does not exist", folder.string()),
                      fmt::format("'{}' is resolved against the folder of {}", paths[i], base_name));
        config.plugin_paths.push_back(folder);
        absolute_paths.push_back(folder.string());
      }
      plugins->insert_or_assign("paths", std::move(absolute_paths));
      registry.scan(config.plugin_paths);
    }
  }

  // --- [kernel] ----------------------------------------------------------------------------------
  const PluginInfo* kernel_info = nullptr;
  if (toml::table* kernel = check.section(root, "", "kernel")) {
    if (auto choice = check.plugin(*kernel, "kernel", PluginKind::kernel, config.device, &kernel_info))
      config.kernel = std::move(*choice);
  }

  // --- [model] -----------------------------------------------------------------------------------
  const size_t before_layer = check.errors();
  if (toml::table* model = check.section(root, "", "model")) {
    const size_t before_model = check.errors();
    const ParamSet values = check.params(*model, "model", schema_of(sections, "model"), {});
    read_value(values, "d_model", config.model.d_model);
    if (values.has("dtype")) config.model.dtype = values.get_string("dtype") == "f64" ? DType::f64 : DType::f32;
    // Its cross-field rules read every key: only when each has a valid value (else it is reported).
    if (check.errors() == before_model) read_model(check, recipe, values, config.model);
  }
  if (toml::table* reference = check.section(root, "", "reference")) {
    const ParamSet values = check.params(*reference, "reference", schema_of(sections, "reference"), {});
    ReferenceConfig& r = config.reference;
    read_value(values, "published_total_params", r.published_total_params);
    read_value(values, "published_active_params", r.published_active_params);
    read_value(values, "published_precision", r.published_precision);
    read_value(values, "source", r.source);
    read_value(values, "counts", r.counts);
    read_value(values, "known_deviation", r.known_deviation);
  }

  // --- [moe] -------------------------------------------------------------------------------------
  const PluginInfo* router_info = nullptr;
  const PluginInfo* experts_info = nullptr;
  std::vector<const PluginInfo*> balancer_infos;
  bool plugins_ok = false;
  if (toml::table* moe = check.section(root, "", "moe")) {
    const ParamSet values = check.params(*moe, "moe", schema_of(sections, "moe"), {"router", "experts", "balancers"});
    MoeConfig& m = config.moe;
    read_value(values, "num_experts", m.num_experts);
    read_value(values, "top_k", m.top_k);
    read_value(values, "capacity_factor", m.capacity_factor);
    read_value(values, "eval_capacity_factor", m.eval_capacity_factor);
    if (values.has("overflow")) {
      const std::string& o = values.get_string("overflow");
      m.overflow = o == "reroute" ? Overflow::reroute : o == "dropless" ? Overflow::dropless : Overflow::drop;
    }
    read_value(values, "dead_expert_window", m.dead_expert_window);
    if (values.has("router_precision")) m.router_in_train_precision = values.get_string("router_precision") == "train";
    if (values.has("top_k") && values.has("num_experts") && m.top_k > m.num_experts) {
      const bool top_k_set = recipe.where("moe.top_k").known();
      check.error(top_k_set ? "moe.top_k" : "moe.num_experts",
                  fmt::format("top_k ({}) must be at most num_experts ({})", m.top_k, m.num_experts),
                  top_k_set ? "each token picks top_k distinct experts"
                            : fmt::format("top_k defaults to {}; set moe.top_k, or use more experts", m.top_k));
    }

    bool ok = true;
    if (toml::table* router = check.section(*moe, "moe", "router")) {
      if (auto choice = check.plugin(*router, "moe.router", PluginKind::router, std::nullopt, &router_info))
        m.router = std::move(*choice);
      else
        ok = false;
    } else
      ok = false;
    if (toml::table* experts = check.section(*moe, "moe", "experts")) {
      if (auto choice = check.plugin(*experts, "moe.experts", PluginKind::experts, std::nullopt, &experts_info))
        m.experts = std::move(*choice);
      else
        ok = false;
    } else
      ok = false;

    toml::node* balancers = moe->get("balancers");
    if (!balancers) {
      moe->insert("balancers", toml::array{});
    } else if (auto* array = balancers->as_array()) {
      for (size_t i = 0; i < array->size(); ++i) {
        const std::string key = Recipe::index_path("moe.balancers", i);
        auto* table = array->get(i)->as_table();
        if (!table) {
          check.error(key, fmt::format("expected a table, got {}", describe(*array->get(i))),
                      "write [[moe.balancers]] with type = \"...\" for each balancer");
          ok = false;
          continue;
        }
        const PluginInfo* info = nullptr;
        if (auto choice = check.plugin(*table, key, PluginKind::balancer, std::nullopt, &info)) {
          m.balancers.push_back(std::move(*choice));
          balancer_infos.push_back(info);
        } else
          ok = false;
      }
    } else {
      check.error("moe.balancers", fmt::format("expected an array of tables, got {}", describe(*balancers)),
                  "write [[moe.balancers]] (double brackets) with type = \"...\" for each balancer");
      ok = false;
    }
    plugins_ok = ok;
  }

  // --- [train], [task], [output] -------------------------------------------------------------------
  if (toml::table* train = check.section(root, "", "train")) {
    const ParamSet values = check.params(*train, "train", schema_of(sections, "train"), {});
    TrainConfig& t = config.train;
    read_value(values, "steps", t.steps);
    read_value(values, "batch_size", t.batch_size);
    read_value(values, "seq_len", t.seq_len);
    read_value(values, "lr", t.lr);
    if (values.has("schedule")) {
      const std::string& schedule = values.get_string("schedule");
      t.schedule = schedule == "constant" ? LrSchedule::constant
                   : schedule == "linear" ? LrSchedule::linear
                                          : LrSchedule::cosine;
    }
    read_value(values, "warmup_steps", t.warmup_steps);
    read_value(values, "min_lr_ratio", t.min_lr_ratio);
    read_value(values, "beta1", t.beta1);
    read_value(values, "beta2", t.beta2);
    read_value(values, "eps", t.eps);
    read_value(values, "checkpoint_every", t.checkpoint_every);
    read_value(values, "keep_checkpoints", t.keep_checkpoints);
    read_value(values, "no_decay", t.no_decay);
    read_value(values, "weight_decay", t.weight_decay);
    read_value(values, "grad_clip", t.grad_clip);
    if (values.has("precision")) t.precision = values.get_string("precision") == "bf16" ? DType::bf16 : DType::f32;
    if (t.precision == DType::bf16 && config.model.dtype == DType::f64)
      check.error("train.precision", "bf16 GEMMs are for f32 models; model.dtype is f64",
                  "remove train.precision, or set model.dtype = \"f32\"");
    read_value(values, "log_every", t.log_every);
    read_value(values, "eval_every", t.eval_every);
    read_value(values, "eval_batches", t.eval_batches);
  }
  if (toml::table* task = check.section(root, "", "task")) {
    const ParamSet values = check.params(*task, "task", schema_of(sections, "task"), {});
    read_value(values, "kind", config.task.kind);
    read_value(values, "clusters", config.task.clusters);
    read_value(values, "noise", config.task.noise);
  }
  if (toml::table* data = check.section(root, "", "data")) {
    const ParamSet values = check.params(*data, "data", schema_of(sections, "data"), {});
    DataConfig& d = config.data;
    read_value(values, "kind", d.kind);
    read_value(values, "seed", d.seed);
    read_value(values, "domains", d.domains);
    read_value(values, "order", d.order);
    read_value(values, "branching", d.branching);
    read_value(values, "concentration", d.concentration);
    read_value(values, "token_dtype", d.token_dtype);
    read_value(values, "eval_fraction", d.eval_fraction);
    if (values.has("paths")) {
      // Relative to the file that set them, like [plugins] paths; globs are expanded by the reader.
      const std::vector<std::string>& paths = values.get_string_list("paths");
      toml::array absolute_paths;
      for (size_t i = 0; i < paths.size(); ++i) {
        const fs::path path = resolve_recipe_path(recipe, "data.paths", i, paths[i], nullptr);
        d.paths.push_back(path);
        absolute_paths.push_back(path.string());
      }
      data->insert_or_assign("paths", std::move(absolute_paths));
    }
    if (d.kind != "markov" && d.paths.empty())
      check.error("data.paths", fmt::format("data.kind = \"{}\" reads files, and no paths are set", d.kind),
                  "set data.paths = [\"corpus/*.txt\"] (files or globs, relative to the recipe)");
  }
  if (toml::table* output = check.section(root, "", "output")) {
    const ParamSet values = check.params(*output, "output", schema_of(sections, "output"), {});
    read_value(values, "dir", config.output_dir);
  }
  if (toml::table* parallel = check.section(root, "", "parallel")) {
    const ParamSet values = check.params(*parallel, "parallel", schema_of(sections, "parallel"), {});
    ParallelConfig& p = config.parallel;
    read_value(values, "expert", p.expert);
    read_value(values, "data", p.data);
    read_value(values, "comm", p.comm);
    if (values.has("capacity"))
      p.capacity = values.get_string("capacity") == "local" ? BatchScope::local : BatchScope::global;
    if (values.has("balance"))
      p.balance = values.get_string("balance") == "local" ? BatchScope::local : BatchScope::global;
    read_value(values, "micro_batch", p.micro_batch);
    if (p.micro_batch > 0 && p.capacity == BatchScope::global && p.balance == BatchScope::global)
      check.error("parallel.micro_batch",
                  "sets the micro-batch of the local scopes, but capacity and balance are both \"global\": it "
                  "would change nothing",
                  "set parallel.capacity = \"local\" and/or parallel.balance = \"local\", or remove micro_batch");
    else if (p.micro_batch > 0 && config.train.batch_size % p.micro_batch != 0)
      check.error("parallel.micro_batch",
                  fmt::format("{} sequences per micro-batch do not divide train.batch_size = {}", p.micro_batch,
                              config.train.batch_size),
                  fmt::format("choose a divisor of {}", config.train.batch_size));
    if (p.comm != "auto" && registry.find(PluginKind::comm, p.comm) == nullptr) {
      try {
        registry.require(PluginKind::comm, p.comm);
      } catch (const UsageError& e) {
        check.error("parallel.comm", e.what(),
                    p.comm == "mpi" ? "install Open MPI (tools/setup-deps) and rebuild, or use comm = \"local\""
                                    : "use \"auto\", \"mpi\" or \"local\"");
      }
    }
  }

  // --- the layer as the plugins see it, and their own cross-field rules ------------------------------
  // Only when the values they would read are valid: a check on a bad value repeats its error.
  if (plugins_ok && check.errors() == before_layer) {
    LayerSpec stated;
    stated.d_model = config.model.d_model;
    stated.num_experts = config.moe.num_experts;
    stated.top_k = config.moe.top_k;
    stated.dtype = config.model.dtype;
    check.plugin_check(*experts_info, config.moe.experts, stated);
    LayerSpec layer = stated;
    if (experts_info->manifest && experts_info->manifest->adjust_layer)
      experts_info->manifest->adjust_layer(config.moe.experts.params, layer);
    if (layer.num_experts < 1 || layer.top_k < 1 || layer.top_k > layer.num_experts)
      check.error(
          "moe.experts.type",
          fmt::format("the '{}' layout turns num_experts = {}, top_k = {} into {} experts, top_k {}, which "
                      "is not a valid layer (1 <= top_k <= num_experts)",
                      config.moe.experts.type, stated.num_experts, stated.top_k, layer.num_experts, layer.top_k));
    if (layer.num_experts % config.parallel.expert != 0)
      check.error(
          "parallel.expert",
          fmt::format("{} experts cannot be split evenly over {} ranks", layer.num_experts, config.parallel.expert),
          fmt::format("choose parallel.expert among the divisors of {}", layer.num_experts));
    check.plugin_check(*router_info, config.moe.router, layer);
    for (size_t i = 0; i < balancer_infos.size(); ++i)
      check.plugin_check(*balancer_infos[i], config.moe.balancers[i], layer);
    config.layer = layer;
  }

  diagnostics.throw_if_any();
  return config;
}

}  // namespace moelab

namespace moelab {

std::string run_folder_recipe(const Recipe& recipe, RunConfig& config, int64_t world) {
  ParallelConfig& p = config.parallel;
  const MicroBatchScopes scopes = p.scopes(config.train.batch_size, world);
  if (!scopes.any() || p.micro_batch > 0) return recipe.to_toml();
  p.micro_batch = scopes.sequences;
  Recipe out(recipe);
  toml::table& root = out.table();
  if (!root.contains("parallel")) root.insert("parallel", toml::table{});
  root["parallel"].as_table()->insert_or_assign("micro_batch", p.micro_batch);
  return out.to_toml();
}

}  // namespace moelab

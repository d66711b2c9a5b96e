// Checkpoints (training.hpp): everything a resumed run needs to repeat an uninterrupted one bit
// for bit — weights, AdamW moments and step, expert biases, dead-expert trackers, the summary's
// running figures — with a SHA-256 of every tensor.
//
// Experts split over E ranks (parallel.expert = E > 1): rank 0 writes checkpoint.safetensors
// with every replicated tensor and expert slice 0; rank i of the first replica writes slice i
// as checkpoint.expert<i>.step<N>.safetensors first. checkpoint.safetensors is renamed into
// place last (after a barrier) and names the step of its slices, so a run that dies while
// writing still has its previous checkpoint whole; older slices are removed after it.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>

#include "moelab/recipe.hpp"
#include "moelab/registry.hpp"
#include "moelab/safetensors.hpp"
#include "moelab/sha256.hpp"
#include "run_files.hpp"
#include "training.hpp"

namespace moelab::training {
namespace {

namespace fs = std::filesystem;
using TensorList = std::vector<std::pair<std::string, Tensor>>;

// Slice `index` of `count`: the split is in the name, so that a reshard writes its slices beside
// the old ones and commits them with checkpoint.safetensors, as a run does.
std::string slice_file(int64_t index, int64_t count, int64_t step) {
  return fmt::format("checkpoint.expert{}of{}.step{:08}.safetensors", index, count, step);
}

bool is_slice_file(const std::string& name) {
  return name.rfind("checkpoint.expert", 0) == 0 && name.size() > 12 &&
         name.compare(name.size() - 12, 12, ".safetensors") == 0;
}

// Every slice file in run_dir but `keep`.
void remove_slices_but(const fs::path& run_dir, const std::vector<std::string>& keep) {
  for (const auto& entry : fs::directory_iterator(run_dir)) {
    const std::string name = entry.path().filename().string();
    if (is_slice_file(name) && std::find(keep.begin(), keep.end(), name) == keep.end()) {
      std::error_code ignored;
      fs::remove(entry.path(), ignored);
    }
  }
}

void write_with_checksums(const fs::path& file, const TensorList& tensors,
                          std::map<std::string, std::string> metadata) {
  // One SHA-256 per tensor: a changed byte anywhere in the data region is refused by name.
  for (const auto& [name, t] : tensors) metadata["sha256/" + name] = sha256_hex(t.raw(), t.bytes());
  write_safetensors(file, tensors, metadata);
}

// Format 2 and later carry a SHA-256 of every tensor ("sha256/NAME" in the metadata); each must
// match. Format 1 (before checksums) has none to check.
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

int64_t metadata_int(const SafetensorsFile& ckpt, const std::string& key, std::optional<int64_t> fallback = {}) {
  auto it = ckpt.metadata.find(key);
  if (it == ckpt.metadata.end()) {
    if (fallback) return *fallback;
    throw UsageError(fmt::format("{}: metadata has no '{}'; this is not a moelab checkpoint", ckpt.path.string(), key));
  }
  try {
    return std::stoll(it->second);
  } catch (const std::exception&) {
    throw UsageError(fmt::format("{}: metadata '{}' = '{}' is not an integer", ckpt.path.string(), key, it->second));
  }
}

void restore(const SafetensorsFile& ckpt, const std::string& name, Tensor& into, Ops& ops) {
  const Tensor& t = ckpt.at(name);
  if (t.shape() != into.shape() || t.dtype() != into.dtype())
    throw UsageError(
        fmt::format("{}: '{}' is {}[{}], the recipe's model needs {}[{}]; the checkpoint belongs to "
                    "another model",
                    ckpt.path.string(), name, dtype_name(t.dtype()), shape_str(t.shape()), dtype_name(into.dtype()),
                    shape_str(into.shape())));
  ops.copy(t, into);
}

}  // namespace

void save_checkpoint(const fs::path& run_dir, int64_t step, Transformer& model, AdamWOptimizer& optimizer,
                     const NamedParameters& params, Ops& ops, const Running& running, const Parallel& parallel) {
  TensorList replicated, slice;
  for (size_t i = 0; i < params.size(); ++i) {
    TensorList& into = model.is_sharded(params[i].second) ? slice : replicated;
    into.emplace_back("param/" + params[i].first, ops.to_host(params[i].second->value));
    into.emplace_back("adam_m/" + params[i].first, ops.to_host(optimizer.first_moment(i)));
    into.emplace_back("adam_v/" + params[i].first, ops.to_host(optimizer.second_moment(i)));
  }
  const int64_t experts_split = parallel.expert_size();
  const bool slice_writer = parallel.replica_index() == 0 && parallel.expert_index() > 0;
  if (slice_writer)
    write_with_checksums(run_dir / slice_file(parallel.expert_index(), experts_split, step), slice,
                         {{"format", "moelab-checkpoint-2"},
                          {"step", std::to_string(step)},
                          {"expert_slice", std::to_string(parallel.expert_index())},
                          {"parallel.expert", std::to_string(experts_split)}});
  if (parallel.distributed()) parallel.world().barrier();  // every slice is on disk before the commit
  if (parallel.rank() == 0) {
    for (auto& [name, buffer] : model.named_buffers()) replicated.emplace_back("buffer/" + name, ops.to_host(*buffer));
    std::vector<MoeLayer*> layers = model.moe_layers();
    for (size_t l = 0; l < layers.size(); ++l) {
      const std::vector<int64_t>& last_seen = layers[l]->dead_experts().last_seen();
      Tensor t = host_tensor<int64_t>({static_cast<int64_t>(last_seen.size())});
      std::copy(last_seen.begin(), last_seen.end(), t.data<int64_t>());
      replicated.emplace_back(fmt::format("dead/{}.last_seen", l), t);
      Tensor seen = host_tensor<int64_t>({1});
      seen.data<int64_t>()[0] = layers[l]->dead_experts().tokens_seen();
      replicated.emplace_back(fmt::format("dead/{}.tokens_seen", l), seen);
    }
    Tensor recent = host_tensor<double>({static_cast<int64_t>(running.recent_loss.size())});
    std::copy(running.recent_loss.begin(), running.recent_loss.end(), recent.data<double>());
    replicated.emplace_back("running/recent_loss", recent);
    Tensor drops = host_tensor<double>({2});
    drops.data<double>()[0] = running.train_dropped;
    drops.data<double>()[1] = running.train_assignments;
    replicated.emplace_back("running/train_drops", drops);
    for (auto& entry : slice) replicated.push_back(std::move(entry));
    write_with_checksums(run_dir / kCheckpoint, replicated,
                         {{"format", "moelab-checkpoint-2"},
                          {"step", std::to_string(step)},
                          {"optimizer_steps", std::to_string(optimizer.steps_taken())},
                          {"parallel.expert", std::to_string(experts_split)}});
  }
  if (parallel.distributed()) parallel.world().barrier();  // committed: older slices can go
  if (parallel.rank() == 0) {
    std::vector<std::string> current;
    for (int64_t i = 1; i < experts_split; ++i) current.push_back(slice_file(i, experts_split, step));
    remove_slices_but(run_dir, current);
  }
}

int64_t load_checkpoint(const fs::path& run_dir, Transformer& model, AdamWOptimizer& optimizer,
                        const NamedParameters& params, Ops& ops, Running& running, const Parallel& parallel) {
  const fs::path file = run_dir / kCheckpoint;
  if (!fs::exists(file))
    throw UsageError(
        fmt::format("{} has no {}: it was not written by a language-model run, or the run stopped "
                    "before its first checkpoint; start it again without --resume",
                    run_dir.string(), kCheckpoint));
  const SafetensorsFile ckpt = read_safetensors(file);
  verify_checksums(ckpt);
  const int64_t step = metadata_int(ckpt, "step");
  const int64_t split = metadata_int(ckpt, "parallel.expert", 1);
  if (split != parallel.expert_size())
    throw UsageError(fmt::format(
        "{}: its experts are split over {} rank{} (parallel.expert = {}), this run splits them over {}; resume "
        "with parallel.expert = {}, or convert the checkpoint first: moelab reshard {} --expert {}",
        file.string(), split, split == 1 ? "" : "s", split, parallel.expert_size(), split, run_dir.string(),
        parallel.expert_size()));
  std::optional<SafetensorsFile> own_slice;
  if (parallel.expert_index() > 0) {
    own_slice = read_safetensors(run_dir / slice_file(parallel.expert_index(), split, step));
    verify_checksums(*own_slice);
    if (metadata_int(*own_slice, "step") != step)
      throw UsageError(fmt::format("{}: holds step {}, checkpoint.safetensors step {}", own_slice->path.string(),
                                   metadata_int(*own_slice, "step"), step));
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const SafetensorsFile& from = model.is_sharded(params[i].second) && own_slice ? *own_slice : ckpt;
    restore(from, "param/" + params[i].first, params[i].second->value, ops);
    restore(from, "adam_m/" + params[i].first, optimizer.first_moment(i), ops);
    restore(from, "adam_v/" + params[i].first, optimizer.second_moment(i), ops);
  }
  for (auto& [name, buffer] : model.named_buffers()) restore(ckpt, "buffer/" + name, *buffer, ops);
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
  optimizer.set_steps_taken(metadata_int(ckpt, "optimizer_steps"));
  return step;
}

}  // namespace moelab::training

namespace moelab {

ReshardResult reshard_run(const std::filesystem::path& run_dir, int64_t expert) {
  namespace fs = std::filesystem;
  using namespace training;
  const fs::path recipe_file = run_dir / "recipe.toml", file = run_dir / kCheckpoint;
  if (!fs::exists(recipe_file) || !fs::exists(file))
    throw UsageError(
        fmt::format("{} is not a run folder with a checkpoint (recipe.toml and {})", run_dir.string(), kCheckpoint));
  Recipe recipe = Recipe::load(recipe_file);
  PluginRegistry registry = PluginRegistry::with_default_path();
  const RunConfig config = build_config(recipe, registry);
  if (config.layer.num_experts % expert != 0)
    throw UsageError(fmt::format("--expert {}: the run's {} experts cannot be split evenly over {} ranks", expert,
                                 config.layer.num_experts, expert));
  const SafetensorsFile main = read_safetensors(file);
  verify_checksums(main);
  ReshardResult result;
  result.step = metadata_int(main, "step");
  result.from = metadata_int(main, "parallel.expert", 1);
  result.to = expert;
  std::vector<SafetensorsFile> slices;
  for (int64_t i = 1; i < result.from; ++i) {
    slices.push_back(read_safetensors(run_dir / slice_file(i, result.from, result.step)));
    verify_checksums(slices.back());
  }

  // Which tensors are per-expert: "param/layers.3.moe.experts.w_in" and its moments.
  const std::vector<std::string> per_expert = per_expert_parameters(config.moe, config.layer, registry);
  const auto split_tensor = [&](const std::string& name) {
    const size_t slash = name.find('/'), moe = name.find(".moe.");
    if (slash == std::string::npos || moe == std::string::npos) return false;
    const std::string kind = name.substr(0, slash), inner = name.substr(moe + 5);
    return (kind == "param" || kind == "adam_m" || kind == "adam_v") &&
           std::find(per_expert.begin(), per_expert.end(), inner) != per_expert.end();
  };
  const int64_t experts = config.layer.num_experts;
  TensorList kept;
  std::vector<TensorList> parts(static_cast<size_t>(expert));
  for (const std::string& name : main.names) {
    if (!split_tensor(name)) {
      kept.emplace_back(name, main.at(name));
      continue;
    }
    // The whole tensor, slices in expert order, then cut again.
    std::vector<const Tensor*> pieces = {&main.at(name)};
    for (const SafetensorsFile& slice : slices) pieces.push_back(&slice.at(name));
    Shape shape = pieces[0]->shape();
    int64_t rows = 0;
    for (const Tensor* piece : pieces) rows += piece->dim(0);
    if (rows != experts)
      throw UsageError(fmt::format("{}: '{}' holds {} experts over its {} slices, the model has {}", file.string(),
                                   name, rows, pieces.size(), experts));
    shape[0] = experts;
    Tensor whole = host_tensor(pieces[0]->dtype(), shape);
    size_t at = 0;
    for (const Tensor* piece : pieces) {
      std::memcpy(static_cast<char*>(whole.raw()) + at, piece->raw(), piece->bytes());
      at += piece->bytes();
    }
    const int64_t local = experts / expert;
    for (int64_t j = 0; j < expert; ++j) {
      const Tensor view = whole.rows(j * local, (j + 1) * local);
      Shape part_shape = shape;
      part_shape[0] = local;
      Tensor part = host_tensor(whole.dtype(), part_shape);
      std::memcpy(part.raw(), view.raw(), part.bytes());
      parts[static_cast<size_t>(j)].emplace_back(name, part);
    }
    ++result.tensors_split;
  }

  // New slices beside the old (the split is in their names), then the commit, then the recipe.
  std::vector<std::string> written;
  for (int64_t j = 1; j < expert; ++j) {
    written.push_back(slice_file(j, expert, result.step));
    write_with_checksums(run_dir / written.back(), parts[static_cast<size_t>(j)],
                         {{"format", "moelab-checkpoint-2"},
                          {"step", std::to_string(result.step)},
                          {"expert_slice", std::to_string(j)},
                          {"parallel.expert", std::to_string(expert)}});
  }
  for (auto& entry : parts[0]) kept.push_back(std::move(entry));
  std::map<std::string, std::string> metadata;
  for (const auto& [key, value] : main.metadata)
    if (key.rfind("sha256/", 0) != 0) metadata[key] = value;
  metadata["parallel.expert"] = std::to_string(expert);
  write_with_checksums(file, kept, metadata);
  const Recipe updated = Recipe::load(
      recipe_file, LoadOptions{{fmt::format("parallel.expert={}", expert), std::string("parallel.data=0")}});
  write_text(recipe_file, updated.to_toml());
  remove_slices_but(run_dir, written);
  return result;
}

}  // namespace moelab

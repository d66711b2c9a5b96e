#include "moelab/weight_names.hpp"

#include <fmt/format.h>

#include <map>
#include <set>

#include "moelab/safetensors.hpp"

namespace moelab {
namespace {

const std::vector<std::pair<std::string, WeightNames>>& formats() {
  static const std::vector<std::pair<std::string, WeightNames>> table{
      {"moelab", WeightNames::moelab},       {"mixtral", WeightNames::mixtral},
      {"qwen2_moe", WeightNames::qwen2_moe}, {"deepseek_v3", WeightNames::deepseek_v3},
      {"olmoe", WeightNames::olmoe},         {"switch", WeightNames::switch_transformers}};
  return table;
}

// Where a moelab parameter lives in a format: a list of source tensors stacked along rows, per
// expert when `per_group` ("{e}" in the name is the expert index).
struct Mapping {
  std::vector<std::string> pieces;
  bool per_group = false;
};

std::map<std::string, Mapping> mapping_for(WeightNames format) {
  const auto w = [](std::initializer_list<const char*> names) {
    std::vector<std::string> v;
    for (const char* n : names) v.push_back(std::string(n) + ".weight");
    return v;
  };
  switch (format) {
    case WeightNames::moelab:
      return {};
    case WeightNames::mixtral:
      return {{"router.weight", {w({"gate"}), false}},
              {"experts.w_in", {w({"experts.{e}.w1", "experts.{e}.w3"}), true}},
              {"experts.w_out", {w({"experts.{e}.w2"}), true}}};
    case WeightNames::qwen2_moe:
      return {{"router.weight", {w({"gate"}), false}},
              {"experts.w_in", {w({"experts.{e}.gate_proj", "experts.{e}.up_proj"}), true}},
              {"experts.w_out", {w({"experts.{e}.down_proj"}), true}},
              {"experts.shared.w_in", {w({"shared_expert.gate_proj", "shared_expert.up_proj"}), true}},
              {"experts.shared.w_out", {w({"shared_expert.down_proj"}), true}},
              {"experts.shared.gate", {w({"shared_expert_gate"}), false}}};
    case WeightNames::deepseek_v3:
      return {{"router.weight", {w({"gate"}), false}},
              {"experts.w_in", {w({"experts.{e}.gate_proj", "experts.{e}.up_proj"}), true}},
              {"experts.w_out", {w({"experts.{e}.down_proj"}), true}},
              {"experts.shared.w_in", {w({"shared_experts.gate_proj", "shared_experts.up_proj"}), true}},
              {"experts.shared.w_out", {w({"shared_experts.down_proj"}), true}}};
    case WeightNames::olmoe:
      return {{"router.weight", {w({"gate"}), false}},
              {"experts.w_in", {w({"experts.{e}.gate_proj", "experts.{e}.up_proj"}), true}},
              {"experts.w_out", {w({"experts.{e}.down_proj"}), true}}};
    case WeightNames::switch_transformers:
      return {{"router.weight", {w({"router.classifier"}), false}},
              {"experts.w_in", {w({"experts.expert_{e}.wi"}), true}},
              {"experts.w_out", {w({"experts.expert_{e}.wo"}), true}}};
  }
  return {};
}

const char* kBiasName = "gate.e_score_correction_bias";

std::string expand(const std::string& pattern, int64_t group) {
  std::string out = pattern;
  if (auto at = out.find("{e}"); at != std::string::npos) out.replace(at, 3, std::to_string(group));
  return out;
}

// Copies `count` elements between host tensors of any float dtypes.
void convert(const Tensor& src, int64_t src_offset, Tensor& dst, int64_t dst_offset, int64_t count) {
  for (int64_t i = 0; i < count; ++i) set_host_value(dst, dst_offset + i, host_value(src, src_offset + i));
}

// Walks the source tensors a parameter of `shape` is stacked from: each piece's name, the element
// offset of its first row inside the parameter, and its shape [rows, cols].
template <class Visit>
void for_each_piece(const Mapping& m, const Shape& shape, Visit&& visit) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const int64_t groups = m.per_group ? shape[0] : 1;
  const int64_t group_rows = m.per_group ? shape[1] : shape[0];
  const int64_t cols = numel / (groups * group_rows);
  const int64_t piece_rows = group_rows / static_cast<int64_t>(m.pieces.size());
  for (int64_t g = 0; g < groups; ++g)
    for (size_t p = 0; p < m.pieces.size(); ++p)
      visit(expand(m.pieces[p], g), (g * group_rows + static_cast<int64_t>(p) * piece_rows) * cols,
            Shape{piece_rows, cols});
}

const Mapping& require_mapping(const std::map<std::string, Mapping>& table, const std::string& param,
                               WeightNames format) {
  auto it = table.find(param);
  if (it == table.end()) {
    std::string name;
    for (const auto& [n, f] : formats())
      if (f == format) name = n;
    throw UsageError(fmt::format(
        "the layer's parameter '{}' has no name in the '{}' weight format (use --names moelab)", param, name));
  }
  return it->second;
}

}  // namespace

WeightNames parse_weight_names(const std::string& name) {
  std::vector<std::string> known;
  for (const auto& [n, f] : formats()) {
    if (n == name) return f;
    known.push_back(n);
  }
  throw UsageError(fmt::format("unknown weight-name format '{}'; known: {}", name, fmt::join(known, ", ")));
}

std::vector<std::string> weight_name_formats() {
  std::vector<std::string> out;
  for (const auto& [n, f] : formats()) out.push_back(n);
  return out;
}

void load_layer_weights(MoeLayer& layer, Ops& ops, const SafetensorsFile& file, const std::string& label,
                        WeightNames format, const std::string& prefix, bool allow_unused) {
  const auto table = mapping_for(format);
  std::set<std::string> used;
  auto fetch = [&](const std::string& name) -> const Tensor& {
    auto it = file.tensors.find(prefix + name);
    if (it == file.tensors.end())
      throw UsageError(fmt::format("{}: no tensor '{}' (expected for this layer's weights)", label, prefix + name));
    const DType dtype = it->second.dtype();
    if (dtype != DType::f32 && dtype != DType::f64 && dtype != DType::bf16)
      throw UsageError(
          fmt::format("{}: tensor '{}' is {}; weights are floats (F32, F64 or BF16), and an integer "
                      "tensor is not converted (were its bytes labelled with the wrong dtype?)",
                      label, prefix + name, dtype_name(dtype)));
    used.insert(prefix + name);
    return it->second;
  };
  auto expect = [&](const std::string& name, const Tensor& t, const Shape& shape) {
    if (t.shape() != shape)
      throw UsageError(fmt::format("{}: tensor '{}' has shape {}, the layer needs {}", label, prefix + name,
                                   shape_str(t.shape()), shape_str(shape)));
  };
  for (const auto& [param_name, param] : layer.named_parameters()) {
    Tensor host = host_tensor(param->value.dtype(), param->value.shape());
    if (format == WeightNames::moelab) {
      const Tensor& t = fetch(param_name);
      expect(param_name, t, param->value.shape());
      convert(t, 0, host, 0, host.numel());
    } else {
      const Mapping& m = require_mapping(table, param_name, format);
      for_each_piece(m, param->value.shape(), [&](const std::string& name, int64_t offset, const Shape& shape) {
        const Tensor& t = fetch(name);
        expect(name, t, shape);
        convert(t, 0, host, offset, t.numel());
      });
    }
    ops.copy(host, param->value);
  }
  if (format == WeightNames::deepseek_v3 && file.tensors.count(prefix + kBiasName)) {
    Tensor& bias = layer.expert_bias();
    if (!bias.defined())
      throw UsageError(
          fmt::format("{}: '{}' holds a selection bias, but the recipe has no balancer that uses one "
                      "(add [[moe.balancers]] type = \"aux_free_bias\")",
                      label, prefix + kBiasName));
    const Tensor& t = fetch(kBiasName);
    expect(kBiasName, t, bias.shape());
    Tensor host = host_tensor(bias.dtype(), bias.shape());
    convert(t, 0, host, 0, host.numel());
    ops.copy(host, bias);
  }
  // A tensor the layer does not read usually means the wrong recipe or format (a Qwen2-MoE file
  // read without its shared expert); it is an error, not a silent skip.
  std::vector<std::string> unused;
  for (const auto& [name, tensor] : file.tensors)
    if (name.rfind(prefix, 0) == 0 && !used.count(name)) unused.push_back(name);
  if (!unused.empty() && !allow_unused) {
    std::string listed;
    for (size_t i = 0; i < unused.size() && i < 8; ++i) listed += (i ? ", " : "") + unused[i];
    if (unused.size() > 8) listed += fmt::format(" and {} more", unused.size() - 8);
    throw UsageError(
        fmt::format("{}: {} tensor{} the layer does not use: {} (check the recipe and --names; "
                    "--allow-unused ignores them)",
                    label, unused.size(), unused.size() == 1 ? "" : "s", listed));
  }
}

std::vector<std::pair<std::string, Tensor>> export_layer_weights(MoeLayer& layer, Ops& ops, WeightNames format,
                                                                 const std::string& prefix) {
  const auto table = mapping_for(format);
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& [param_name, param] : layer.named_parameters()) {
    Tensor host = host_tensor(param->value.dtype(), param->value.shape());
    ops.copy(param->value, host);
    if (format == WeightNames::moelab) {
      out.emplace_back(prefix + param_name, host);
      continue;
    }
    const Mapping& m = require_mapping(table, param_name, format);
    for_each_piece(m, param->value.shape(), [&](const std::string& name, int64_t offset, const Shape& shape) {
      Tensor piece = host_tensor(host.dtype(), shape);
      convert(host, offset, piece, 0, piece.numel());
      out.emplace_back(prefix + name, piece);
    });
  }
  if (format == WeightNames::deepseek_v3 && layer.expert_bias().defined())
    out.emplace_back(prefix + kBiasName, ops.to_host(layer.expert_bias()));
  return out;
}

}  // namespace moelab

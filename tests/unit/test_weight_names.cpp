// Weights move between moelab's names and HF transformers' names without loss.
#include <doctest/doctest.h>

#include "moelab/registry.hpp"
#include "moelab/safetensors.hpp"
#include "moelab/weight_names.hpp"

using namespace moelab;

namespace {

PluginRegistry& registry() {
  static PluginRegistry r = PluginRegistry::with_default_path();
  return r;
}

Ops& cpu() {
  static std::shared_ptr<Ops> ops =
      registry().make_kernel("cpu", defaults_of(registry().require(PluginKind::kernel, "cpu").schema));
  return *ops;
}

PluginChoice choice(PluginKind kind, const std::string& name) {
  return PluginChoice{name, defaults_of(registry().require(kind, name).schema), ""};
}

MoeConfig config(const std::string& experts) {
  MoeConfig m;
  m.num_experts = 4;
  m.top_k = 2;
  m.overflow = Overflow::dropless;
  m.router = choice(PluginKind::router, "softmax_topk");
  m.experts = choice(PluginKind::experts, experts);
  m.experts.params.set("d_ff", int64_t{6});
  return m;
}

LayerSpec spec() {
  LayerSpec s;
  s.d_model = 5;
  s.num_experts = 4;
  s.top_k = 2;
  return s;
}

Tensor output(MoeLayer& layer, const Tensor& x) {
  return cpu().to_host(layer.forward(x, LayerInput{false, 0, 1, 0, nullptr}));
}

void check_round_trip(const std::string& experts, const std::string& format, const std::string& sample_name) {
  CAPTURE(format);
  Rng a_rng(1), b_rng(2), data(3);
  MoeLayer a(config(experts), spec(), registry(), cpu(), a_rng);
  MoeLayer b(config(experts), spec(), registry(), cpu(), b_rng);
  Tensor x = host_tensor(DType::f32, {7, 5});
  fill_normal(x, 1.0, data);
  const Tensor ya = output(a, x);
  const Tensor yb_before = output(b, x);
  CHECK(host_value(ya, 0) != host_value(yb_before, 0));  // different seeds, different layers

  SafetensorsFile file;
  for (auto& [name, tensor] : export_layer_weights(a, cpu(), parse_weight_names(format), "model.layers.0.mlp.")) {
    file.names.push_back(name);
    file.tensors[name] = tensor;
  }
  CHECK(file.tensors.count("model.layers.0.mlp." + sample_name) == 1);
  load_layer_weights(b, cpu(), file, "memory", parse_weight_names(format), "model.layers.0.mlp.");
  const Tensor yb = output(b, x);
  for (int64_t i = 0; i < ya.numel(); ++i) REQUIRE(host_value(ya, i) == host_value(yb, i));
}

}  // namespace

TEST_CASE("layer weights round-trip through every weight-name format") {
  check_round_trip("glu", "moelab", "experts.w_in");
  check_round_trip("glu", "mixtral", "experts.3.w3.weight");
  check_round_trip("glu", "olmoe", "experts.0.up_proj.weight");
  check_round_trip("glu", "qwen2_moe", "experts.1.down_proj.weight");
  check_round_trip("glu", "deepseek_v3", "gate.weight");
  check_round_trip("full", "switch", "experts.expert_2.wi.weight");
}

TEST_CASE("HF names split the fused gate/up projection in the right order") {
  Rng rng(4);
  MoeLayer layer(config("glu"), spec(), registry(), cpu(), rng);
  const auto exported = export_layer_weights(layer, cpu(), WeightNames::mixtral);
  Tensor w_in;
  for (const auto& [name, p] : layer.named_parameters())
    if (name == "experts.w_in") w_in = p->value;
  for (const auto& [name, t] : exported) {
    if (name == "experts.1.w1.weight") CHECK(host_value(t, 0) == host_value(w_in, 1 * 12 * 5));  // gate rows first
    if (name == "experts.1.w3.weight") CHECK(host_value(t, 0) == host_value(w_in, 1 * 12 * 5 + 6 * 5));  // then up
  }
}

TEST_CASE("missing or misshapen weights are clear errors") {
  Rng rng(5);
  MoeLayer layer(config("glu"), spec(), registry(), cpu(), rng);
  SafetensorsFile file;
  for (auto& [name, tensor] : export_layer_weights(layer, cpu(), WeightNames::mixtral)) file.tensors[name] = tensor;
  file.tensors.erase("experts.2.w2.weight");
  CHECK_THROWS_WITH_AS(load_layer_weights(layer, cpu(), file, "w.safetensors", WeightNames::mixtral),
                       doctest::Contains("w.safetensors: no tensor 'experts.2.w2.weight'"), UsageError);
  file.tensors["experts.2.w2.weight"] = host_tensor(DType::f32, {6, 5});
  CHECK_THROWS_WITH_AS(load_layer_weights(layer, cpu(), file, "w.safetensors", WeightNames::mixtral),
                       doctest::Contains("has shape [6, 5], the layer needs [5, 6]"), UsageError);
  CHECK_THROWS_WITH_AS(parse_weight_names("llama"), doctest::Contains("known: moelab, mixtral"), UsageError);
  // An integer tensor (F32 bytes labelled I32, say) is refused, not converted as integers.
  file.tensors["experts.2.w2.weight"] = host_tensor(DType::i32, {5, 6});
  CHECK_THROWS_WITH_AS(load_layer_weights(layer, cpu(), file, "w.safetensors", WeightNames::mixtral),
                       doctest::Contains("tensor 'experts.2.w2.weight' is i32; weights are floats"), UsageError);
  file.tensors["experts.2.w2.weight"] = host_tensor(DType::f32, {5, 6});
  CHECK_NOTHROW(load_layer_weights(layer, cpu(), file, "w.safetensors", WeightNames::mixtral));
  // A tensor the layer does not use is an error listing it, unless allowed.
  file.tensors["shared_expert_gate.weight"] = host_tensor(DType::f32, {1, 5});
  CHECK_THROWS_WITH_AS(load_layer_weights(layer, cpu(), file, "w.safetensors", WeightNames::mixtral),
                       doctest::Contains("1 tensor the layer does not use: shared_expert_gate.weight"), UsageError);
  CHECK_NOTHROW(load_layer_weights(layer, cpu(), file, "w.safetensors", WeightNames::mixtral, "", true));
  // Under a prefix, only the tensors of that prefix count.
  SafetensorsFile model_file;
  for (auto& [name, tensor] : export_layer_weights(layer, cpu(), WeightNames::mixtral, "model.layers.0."))
    model_file.tensors[name] = tensor;
  model_file.tensors["model.layers.1.attn.weight"] = host_tensor(DType::f32, {1});
  CHECK_NOTHROW(load_layer_weights(layer, cpu(), model_file, "m.safetensors", WeightNames::mixtral, "model.layers.0."));
  // A format without a name for a parameter says so instead of guessing.
  MoeLayer full(config("full"), spec(), registry(), cpu(), rng);
  CHECK_NOTHROW(export_layer_weights(full, cpu(), WeightNames::switch_transformers));
}

// moelab layer: one MoE layer, as a recipe describes it, on an input tensor file — the harness for
// comparing moelab against a reference implementation with the same weights.
#include <fmt/format.h>

#include <cstdio>

#include "cli_util.hpp"
#include "moelab/moe_layer.hpp"
#include "moelab/recipe.hpp"
#include "moelab/registry.hpp"
#include "moelab/safetensors.hpp"
#include "moelab/weight_names.hpp"

namespace moelab::cli {
namespace {

Tensor converted(const Tensor& src, DType dtype) {
  Tensor out = host_tensor(dtype, src.shape());
  for (int64_t i = 0; i < src.numel(); ++i) set_host_value(out, i, host_value(src, i));
  return out;
}

Tensor scalar(double value) {
  Tensor t = host_tensor(DType::f64, {1});
  set_host_value(t, 0, value);
  return t;
}

Tensor ints(const std::vector<int32_t>& values) {
  Tensor t = host_tensor(DType::i32, {static_cast<int64_t>(values.size())});
  std::copy(values.begin(), values.end(), t.data<int32_t>());
  return t;
}

}  // namespace

int cmd_layer(const Args& args) {
  const std::string formats = fmt::format("{}", fmt::join(weight_name_formats(), ", "));
  const ArgSpec spec{
      "moelab layer RECIPE --input IN.safetensors --output OUT.safetensors [--weights W.safetensors]\n"
      "                    [--names FORMAT] [--prefix P] [--grad DY.safetensors] [--save-weights FILE] [--eval]",
      "Runs the MoE layer RECIPE describes on the tensor 'x' [T, d] of IN (and 'token_ids' [T], i32,\n"
      "when the router needs them). Weights come from W (under moelab's names, or HF transformers'\n"
      "names with --names " +
          formats +
          "; --prefix is prepended to each name),\n"
          "else from the recipe's seed. OUT receives: 'y' [T, d]; 'routing.token', 'routing.expert',\n"
          "'routing.weight', 'routing.rank' [A] (the router's assignments), 'routing.final_expert' [A]\n"
          "(after capacity, -1 when dropped), 'routing.logits' and 'routing.probs' [T, E]; 'aux.NAME' for\n"
          "each balancer's loss and 'aux.total'. Given --grad (a file with 'dy' [T, d]) it also holds\n"
          "'grad.x' and 'grad.PARAM' for every parameter, in moelab's names. --save-weights writes the\n"
          "layer's weights in the --names format (a round trip through HF names). --eval runs in\n"
          "evaluation mode (no noise or jitter, the evaluation capacity factor).",
      {{"--input", "safetensors file holding 'x' (and optionally 'token_ids')"},
       {"--output", "safetensors file to write (written whole or not at all)"},
       {"--weights", "safetensors file with the layer's weights"},
       {"--names", "weight-name format: " + formats + " (default moelab)"},
       {"--prefix", "prefix of every weight name in the file, e.g. model.layers.0.mlp."},
       {"--grad", "safetensors file holding 'dy' [T, d]: run the backward too"},
       {"--save-weights", "write the layer's weights to this file in the --names format"},
       {"--set", "override a recipe key, VALUE parsed as TOML (repeatable)"}},
      {{"--eval", "evaluation mode"},
       {"--allow-unused", "accept a --weights file with tensors (under --prefix) that the layer does not use"}},
      1,
      1};
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  if (!parsed.option("--input") || !parsed.option("--output"))
    throw UsageError("moelab layer needs --input and --output (see --help)");
  Recipe recipe = Recipe::load(parsed.positional[0], LoadOptions{parsed.all("--set")});
  PluginRegistry registry = PluginRegistry::with_default_path();
  const RunConfig config = build_config(recipe, registry);
  const WeightNames names = parse_weight_names(parsed.option("--names").value_or("moelab"));
  const std::string prefix = parsed.option("--prefix").value_or("");

  std::shared_ptr<Ops> ops = registry.make_kernel(config.kernel.type, config.kernel.params);
  Rng rng(config.seed);
  MoeLayer layer(config.moe, config.layer, registry, *ops, rng);
  if (auto file = parsed.option("--weights"))
    load_layer_weights(layer, *ops, read_safetensors(*file), *file, names, prefix, parsed.flag("--allow-unused"));

  const std::string input_file = *parsed.option("--input");
  const SafetensorsFile input = read_safetensors(input_file);
  const Tensor& x_file = input.at("x");
  const int64_t d = config.layer.d_model;
  if (x_file.rank() != 2 || x_file.dim(1) != d)
    throw UsageError(fmt::format("{}: 'x' has shape {}, expected [T, {}] (the recipe's model.d_model)", input_file,
                                 shape_str(x_file.shape()), d));
  const int64_t tokens = x_file.dim(0);
  if (tokens == 0)
    throw UsageError(fmt::format("{}: 'x' has no tokens (shape {})", input_file, shape_str(x_file.shape())));
  if (x_file.dtype() != DType::f32 && x_file.dtype() != DType::f64 && x_file.dtype() != DType::bf16)
    throw UsageError(
        fmt::format("{}: 'x' is {}; the input is floats (F32, F64 or BF16)", input_file, dtype_name(x_file.dtype())));
  Tensor token_ids;
  if (auto it = input.tensors.find("token_ids"); it != input.tensors.end()) {
    if (it->second.shape() != Shape{tokens})
      throw UsageError(fmt::format("{}: 'token_ids' has shape {}, expected [{}]", input_file,
                                   shape_str(it->second.shape()), tokens));
    token_ids = converted(it->second, DType::i32);
  }

  const Tensor x = ops->to_device(converted(x_file, config.layer.dtype));
  LayerInput in{!parsed.flag("--eval"), 1, 1, 0, token_ids.defined() ? &token_ids : nullptr};
  const Tensor y = layer.forward(x, in);
  const RoutingPlan& plan = layer.last_plan();

  std::vector<std::pair<std::string, Tensor>> out;
  out.emplace_back("y", ops->to_host(y));
  out.emplace_back("routing.token", ops->to_host(plan.token));
  out.emplace_back("routing.expert", ops->to_host(plan.expert));
  out.emplace_back("routing.weight", ops->to_host(plan.weight));
  out.emplace_back("routing.rank", ops->to_host(plan.rank));
  out.emplace_back("routing.final_expert", ints(layer.last_final_expert()));
  out.emplace_back("routing.logits", ops->to_host(plan.logits));
  out.emplace_back("routing.probs", ops->to_host(plan.probs));
  for (const auto& [name, loss] : layer.stats().balancer_losses) out.emplace_back("aux." + name, scalar(loss));
  out.emplace_back("aux.total", scalar(layer.stats().aux_loss));

  if (auto grad_file = parsed.option("--grad")) {
    const SafetensorsFile grads = read_safetensors(*grad_file);
    const Tensor& dy_file = grads.at("dy");
    if (dy_file.shape() != Shape{tokens, d})
      throw UsageError(fmt::format("{}: 'dy' has shape {}, expected {}", *grad_file, shape_str(dy_file.shape()),
                                   shape_str({tokens, d})));
    zero_grads(*ops, layer);
    const Tensor dx = layer.backward(ops->to_device(converted(dy_file, config.layer.dtype)));
    out.emplace_back("grad.x", ops->to_host(dx));
    for (const auto& [name, p] : layer.named_parameters()) {
      Tensor g = host_tensor(p->grad.dtype(), p->grad.shape());
      ops->copy(p->grad, g);
      out.emplace_back("grad." + name, g);
    }
  }
  std::map<std::string, std::string> metadata{{"recipe", parsed.positional[0]},
                                              {"dropped", std::to_string(layer.stats().dropped)},
                                              {"capacity", std::to_string(layer.stats().capacity)}};
  write_safetensors(*parsed.option("--output"), out, metadata);
  if (auto file = parsed.option("--save-weights"))
    write_safetensors(*file, export_layer_weights(layer, *ops, names, prefix));
  std::printf("%s: %lld tokens, %lld assignments, %lld dropped, aux loss %.6g\n", parsed.option("--output")->c_str(),
              static_cast<long long>(tokens), static_cast<long long>(layer.stats().assignments),
              static_cast<long long>(layer.stats().dropped), layer.stats().aux_loss);
  return kExitOk;
}

}  // namespace moelab::cli

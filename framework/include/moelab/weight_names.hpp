// An MoE layer's weights under moelab's own names or under the names HF transformers gives the
// MoE blocks it implements, so checkpoints move both ways without conversion scripts.
//
//   format        block (HF transformers)            router                expert e (gate / up / down)
//   mixtral       MixtralSparseMoeBlock              gate.weight           experts.e.w1 / w3 / w2
//   qwen2_moe     Qwen2MoeSparseMoeBlock             gate.weight           experts.e.gate_proj / up_proj / down_proj
//                 + shared_expert.{gate,up,down}_proj, shared_expert_gate
//   deepseek_v3   DeepseekV3MoE                      gate.weight (+ gate.e_score_correction_bias -> the
//                 + shared_experts.{gate,up,down}_proj                      aux_free_bias selection bias)
//   olmoe         OlmoeSparseMoeBlock                gate.weight           experts.e.gate_proj / up_proj / down_proj
//   switch        SwitchTransformersSparseMLP        router.classifier.weight   experts.expert_e.wi / wo
// (each name ends in ".weight"; HF stores Linear weights [out, in], as moelab does). Names are per
// expert, as in the transformers releases before the fused-experts refactor.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "moelab/moe_layer.hpp"

namespace moelab {

struct SafetensorsFile;

enum class WeightNames { moelab, mixtral, qwen2_moe, deepseek_v3, olmoe, switch_transformers };
WeightNames parse_weight_names(const std::string& name);  // UsageError listing the known formats
std::vector<std::string> weight_name_formats();

// Copies every parameter of `layer` from `file` (tensor names prefixed by `prefix`, e.g.
// "model.layers.0.block_sparse_moe."). Missing tensors, wrong shapes, parameters the format has
// no name for, tensors of a non-float dtype, and (unless `allow_unused`) tensors under `prefix`
// that the layer does not use are UsageErrors naming the file and the tensors; float dtypes
// (f32, f64, bf16) are converted to the layer's.
void load_layer_weights(MoeLayer& layer, Ops& ops, const SafetensorsFile& file, const std::string& file_label,
                        WeightNames format, const std::string& prefix = "", bool allow_unused = false);
// The layer's weights as host tensors under the format's names.
std::vector<std::pair<std::string, Tensor>> export_layer_weights(MoeLayer& layer, Ops& ops, WeightNames format,
                                                                 const std::string& prefix = "");

}  // namespace moelab

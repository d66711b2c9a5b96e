// What a transformer described by [model] and [moe] is, counted from the recipe alone: parameters
// by part, active parameters per token and forward FLOPs per token. The MoE layer's own counts come
// from the real plugins built on the meta kernel (build_meta_moe_layer: exact for any plugin); the
// transformer around it (embeddings, attention, dense FFN, norms, head) is counted here by formula,
// written once, each formula beside its code in model_shape.cpp.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "moelab/config.hpp"

namespace moelab {

class PluginRegistry;

// One MoE layer's parameters as its plugins create them, split by owner.
struct MoeLayerCounts {
  int64_t router = 0;              // "router.*"
  int64_t routed_experts = 0;      // "experts.*" except shared
  int64_t shared_experts = 0;      // "experts.shared*"
  int64_t balancers = 0;           // "balancers.*"
  int64_t num_experts = 1;         // routed experts after the layout's adjust_layer
  double experts_per_token = 1;    // routed experts each token uses on average (top_k; expert choice: capacity factor)
  double routed_expert_flops = 0;  // forward FLOPs of one token through one routed expert
  std::map<std::string, int64_t> by_name;  // numel of every named parameter
};

// Builds the recipe's MoE layer (router, expert layout, balancers from the registry) on the meta
// kernel and counts its parameters: no weight is allocated, whatever the layer's size.
MoeLayerCounts count_moe_layer(const RunConfig& config, const PluginRegistry& registry);

// Parameters of a model by part. Totals are integers; active counts are averages over tokens.
struct PartCounts {
  double embeddings = 0, attention = 0, dense_ffn = 0, routed_experts = 0, shared_experts = 0, routers = 0, norms = 0,
         head = 0, balancers = 0;
  double sum() const {
    return embeddings + attention + dense_ffn + routed_experts + shared_experts + routers + norms + head + balancers;
  }
};

struct ModelCounts {
  PartCounts total;                            // every parameter once (a tied head counts 0: it is the embedding)
  PartCounts active;                           // what one token uses: all but the routed experts it is not sent to
  double forward_flops_per_token = 0;          // 2 per multiply-add; attention over `seq_len` keys
  double attention_score_flops_per_token = 0;  // the QK^T and AV part of the above
  int64_t moe_layers = 0, dense_layers = 0;
  // Multi-token prediction modules (DeepSeek-V3), reported apart: not part of `total`.
  PartCounts mtp_total, mtp_active;
  int64_t seq_len = 0;
};

// The formulas, per block (d = d_model, H = n_heads, H_kv = n_kv_heads, h = head_dim).
// Self- or cross-attention projections, biases included (norms inside MLA and qk-norms excluded).
int64_t attention_params(const ModelConfig& model);
// Norm parameters inside one attention block: qk-norms, MLA's latent norms.
int64_t attention_norm_params(const ModelConfig& model);
// One norm (rmsnorm d, layernorm d or 2d with bias, none 0).
int64_t norm_params(const ModelConfig& model);
// One dense FFN layer of width d_ff (GLU 3 d F, full 2 d F).
int64_t dense_ffn_params(const ModelConfig& model);
// FLOPs per token of one attention block's QK^T and AV at `context` keys.
double attention_score_flops(const ModelConfig& model, int64_t context);

// The whole model: `moe` is one MoE layer's counts (every MoE layer is the same).
ModelCounts count_model(const ModelConfig& model, const MoeLayerCounts& moe, int64_t seq_len);

}  // namespace moelab

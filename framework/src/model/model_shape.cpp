// Counting a transformer from its recipe (model_shape.hpp). Notation: d = d_model, H = n_heads,
// H_kv = n_kv_heads, h = head_dim, F = d_ff, V = vocab_size, L = seq_len (keys each query sees).
#include "moelab/model_shape.hpp"

#include "moelab/meta_ops.hpp"
#include "moelab/moe_layer.hpp"
#include "moelab/registry.hpp"

namespace moelab {

MoeLayerCounts count_moe_layer(const RunConfig& config, const PluginRegistry& registry) {
  std::shared_ptr<Ops> meta = make_meta_ops();
  Rng rng(config.seed);
  MoeLayer layer(config.moe, config.layer, registry, *meta, rng);
  MoeLayerCounts counts;
  for (const auto& [name, p] : layer.named_parameters()) {
    const int64_t n = p->value.numel();
    counts.by_name[name] += n;
    if (name.rfind("router.", 0) == 0)
      counts.router += n;
    else if (name.rfind("experts.shared", 0) == 0)
      counts.shared_experts += n;
    else if (name.rfind("experts.", 0) == 0)
      counts.routed_experts += n;
    else
      counts.balancers += n;
  }
  counts.num_experts = config.layer.num_experts;
  // Expert choice (Zhou et al. 2022) lets each expert take T * capacity_factor / E tokens, so a
  // token is processed by capacity_factor experts on average; token-choice routers use top_k.
  counts.experts_per_token =
      config.moe.router.type == "expert_choice" ? config.moe.capacity_factor : static_cast<double>(config.layer.top_k);
  counts.routed_expert_flops = layer.experts().flops_per_routed_token();
  return counts;
}

int64_t attention_params(const ModelConfig& m) {
  const int64_t d = m.d_model, heads = m.n_heads;
  switch (m.attention) {
    case AttentionKind::none:
      return 0;
    case AttentionKind::mha:
    case AttentionKind::gqa: {
      // W_q [H h, d], W_k and W_v [H_kv h, d], W_o [d, H h]; biases [H h], 2 x [H_kv h] (and [d]).
      const int64_t q = heads * m.head_dim, kv = m.n_kv_heads * m.head_dim;
      int64_t n = d * q + 2 * d * kv + q * d;
      if (m.attention_bias || m.qkv_bias) n += q + 2 * kv;
      if (m.attention_bias) n += d;
      return n;
    }
    case AttentionKind::mla: {
      // DeepSeek-V2 sec. 2.1.2-2.1.3, as in its HF modelling code:
      //   queries: W_q [H (n+r), d], or W_qa [r_q, d] then W_qb [H (n+r), r_q] when q_lora_rank = r_q > 0
      //   keys/values: W_kva [r_kv + r, d] (the latent and the shared RoPE key), W_kvb [H (n+v), r_kv]
      //   output: W_o [d, H v]            n = qk_nope_head_dim, r = qk_rope_head_dim, v = v_head_dim
      const int64_t qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
      const int64_t q = m.q_lora_rank > 0 ? d * m.q_lora_rank + m.q_lora_rank * heads * qk : d * heads * qk;
      const int64_t kv =
          d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim);
      return q + kv + heads * m.v_head_dim * d;
    }
  }
  return 0;
}

int64_t norm_params(const ModelConfig& m) {
  switch (m.norm) {
    case NormKind::none:
      return 0;
    case NormKind::rmsnorm:
      return m.d_model;  // scale [d]
    case NormKind::layernorm:
      return m.norm_bias ? 2 * m.d_model : m.d_model;  // scale [d] (+ bias [d])
  }
  return 0;
}

int64_t attention_norm_params(const ModelConfig& m) {
  if (m.attention == AttentionKind::mla)  // RMSNorm on the query latent [r_q] and the kv latent [r_kv]
    return (m.q_lora_rank > 0 ? m.q_lora_rank : 0) + m.kv_lora_rank;
  switch (m.qk_norm) {
    case QkNorm::none:
      return 0;
    case QkNorm::head:
      return 2 * m.head_dim;  // one [h] scale for all query heads, one for all key heads
    case QkNorm::full:
      return (m.n_heads + m.n_kv_heads) * m.head_dim;  // over the whole q and k projections
  }
  return 0;
}

int64_t dense_ffn_params(const ModelConfig& m) {
  // GLU: W_gate and W_up [F, d], W_down [d, F]; full: W_in [F, d], W_out [d, F].
  return (m.dense_ffn_glu ? 3 : 2) * m.d_model * m.d_ff;
}

double attention_score_flops(const ModelConfig& m, int64_t context) {
  // Per query: q.k over `context` keys (H x qk width MACs each) and the weighted sum of as many
  // values (H x v width MACs each); 2 FLOPs per multiply-add.
  const double keys = static_cast<double>(context), heads = static_cast<double>(m.n_heads);
  switch (m.attention) {
    case AttentionKind::none:
      return 0;
    case AttentionKind::mha:
    case AttentionKind::gqa:
      return 2.0 * heads * keys * 2.0 * static_cast<double>(m.head_dim);
    case AttentionKind::mla:
      return 2.0 * heads * keys * static_cast<double>(m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim);
  }
  return 0;
}

namespace {

// Adds one MoE FFN's parameters; the active share of the routed experts is k / E.
void add_moe_ffn(const MoeLayerCounts& moe, PartCounts& total, PartCounts& active) {
  const double routed = static_cast<double>(moe.routed_experts);
  total.routed_experts += routed;
  active.routed_experts += routed * moe.experts_per_token / static_cast<double>(moe.num_experts);
  for (PartCounts* parts : {&total, &active}) {
    parts->shared_experts += static_cast<double>(moe.shared_experts);
    parts->routers += static_cast<double>(moe.router);
    parts->balancers += static_cast<double>(moe.balancers);
  }
}

void add_everywhere(PartCounts& total, PartCounts& active, double PartCounts::*part, double n) {
  total.*part += n;
  active.*part += n;
}

}  // namespace

ModelCounts count_model(const ModelConfig& m, const MoeLayerCounts& moe, int64_t seq_len) {
  ModelCounts out;
  out.seq_len = seq_len;
  const double attention = static_cast<double>(attention_params(m));
  const double attention_norms = static_cast<double>(attention_norm_params(m));
  const double norm = static_cast<double>(norm_params(m));
  const double dense = static_cast<double>(dense_ffn_params(m));
  const double scores = attention_score_flops(m, seq_len);
  PartCounts& total = out.total;
  PartCounts& active = out.active;

  // A stack: per layer a norm and self-attention, (decoder of an encoder-decoder: a norm and
  // cross-attention,) a norm and the FFN; a final norm; T5's relative position bias once.
  auto add_stack = [&](int64_t layers, bool cross_attention) {
    // No attention (the bare MoE layer of `moelab run`): no attention block, and no norm before it.
    const double attention_blocks = m.attention == AttentionKind::none ? 0.0 : cross_attention ? 2.0 : 1.0;
    for (int64_t i = 0; i < layers; ++i) {
      add_everywhere(total, active, &PartCounts::attention, attention_blocks * attention);
      add_everywhere(total, active, &PartCounts::norms, attention_blocks * (norm + attention_norms) + norm);
      out.attention_score_flops_per_token += attention_blocks * scores;
      if (m.is_moe_layer(i)) {
        add_moe_ffn(moe, total, active);
        ++out.moe_layers;
      } else {
        add_everywhere(total, active, &PartCounts::dense_ffn, dense);
        ++out.dense_layers;
      }
    }
    if (m.attention != AttentionKind::none)
      add_everywhere(total, active, &PartCounts::attention,
                     static_cast<double>(m.relative_attention_buckets * m.n_heads));
    add_everywhere(total, active, &PartCounts::norms, norm);
  };
  add_stack(m.n_layers, m.architecture == Architecture::encoder_decoder);
  if (m.architecture == Architecture::encoder_decoder) add_stack(m.n_encoder_layers, false);

  // Token embedding E [V, d], shared by encoder and decoder (T5); the LM head [V, d] unless tied.
  const double vocab_params = static_cast<double>(m.vocab_size * m.d_model);
  add_everywhere(total, active, &PartCounts::embeddings, vocab_params);
  if (!m.tied_embeddings) add_everywhere(total, active, &PartCounts::head, vocab_params);

  // Multi-token prediction (DeepSeek-V3 sec. 2.2): per module two input norms and the module's
  // output norm, the projection M [d, 2d] (counted under head), and one MoE transformer layer;
  // the embedding and the output head are the main model's.
  for (int64_t i = 0; i < m.mtp_modules; ++i) {
    add_everywhere(out.mtp_total, out.mtp_active, &PartCounts::norms, 3 * norm + 2 * norm + attention_norms);
    add_everywhere(out.mtp_total, out.mtp_active, &PartCounts::head, static_cast<double>(2 * m.d_model * m.d_model));
    add_everywhere(out.mtp_total, out.mtp_active, &PartCounts::attention, attention);
    add_moe_ffn(moe, out.mtp_total, out.mtp_active);
  }

  // FLOPs: 2 per active weight applied — attention projections, dense FFNs, shared experts, routers
  // and the head (a tied head still multiplies) — plus the routed experts' own FLOPs (from the
  // layout) and the attention scores. Embedding lookups and norms are not multiplies by weights.
  const double moe_layer_flops = static_cast<double>(out.moe_layers) * moe.experts_per_token * moe.routed_expert_flops;
  out.forward_flops_per_token = 2.0 * (active.attention + active.dense_ffn + active.shared_experts + active.routers) +
                                2.0 * vocab_params + moe_layer_flops + out.attention_score_flops_per_token;
  return out;
}

}  // namespace moelab

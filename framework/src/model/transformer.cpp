#include "moelab/transformer.hpp"

#include <fmt/format.h>

#include <cmath>

#include "moelab/ffn.hpp"
#include "moelab/registry.hpp"

namespace moelab {

// --- Linear ---------------------------------------------------------------------------------------

Linear::Linear(Ops& ops, const std::string& name, int64_t in, int64_t out, bool has_bias, DType dtype, Rng& rng,
               double init_std) {
  weight = make_parameter(ops, name + ".weight", dtype, {out, in}, rng, init_std);
  if (has_bias) bias = make_parameter(ops, name + ".bias", dtype, {out}, rng, 0.0, false);
}

Tensor Linear::forward(Ops& ops, const Tensor& x) const {
  Tensor y = ops.empty(x.dtype(), {x.dim(0), weight.value.dim(0)});
  ops.gemm(false, true, 1.0, x, weight.gemm_value(), 0.0, y);
  if (bias.value.defined()) ops.add_row_vector(bias.value, y);
  return y;
}

void Linear::backward(Ops& ops, const Tensor& x, const Tensor& dy, Tensor* dx, bool accumulate_dx) {
  ops.gemm(true, false, 1.0, dy, x, 1.0, weight.grad);  // dW [out, in] += dy^T x
  if (bias.value.defined()) ops.sum_rows(dy, true, bias.grad);
  if (dx) ops.gemm(false, false, 1.0, dy, weight.gemm_value(), accumulate_dx ? 1.0 : 0.0, *dx);
}

void Linear::collect(std::vector<Parameter*>& out) {
  if (weight.value.defined()) out.push_back(&weight);
  if (bias.value.defined()) out.push_back(&bias);
}

// --- Norm -----------------------------------------------------------------------------------------

Norm::Norm(Ops& ops, const std::string& name, NormKind norm_kind, int64_t width, bool has_bias, double epsilon,
           DType dtype)
    : kind(norm_kind), eps(epsilon) {
  if (kind == NormKind::none) return;
  Rng unused;
  weight = make_parameter(ops, name + ".weight", dtype, {width}, unused, 0.0, false);
  ops.fill(weight.value, 1.0);
  if (has_bias && kind == NormKind::layernorm)
    bias = make_parameter(ops, name + ".bias", dtype, {width}, unused, 0.0, false);
}

Tensor Norm::forward(Ops& ops, const Tensor& x) {
  if (kind == NormKind::none) return x;
  Tensor y = ops.empty(x.dtype(), x.shape());
  rstd = ops.empty(x.dtype(), {x.dim(0)});
  if (kind == NormKind::rmsnorm) {
    ops.rms_norm(x, weight.value, eps, y, rstd);
  } else {
    mean = ops.empty(x.dtype(), {x.dim(0)});
    ops.layer_norm(x, weight.value, bias.value.defined() ? &bias.value : nullptr, eps, y, mean, rstd);
  }
  return y;
}

Tensor Norm::backward(Ops& ops, const Tensor& x, const Tensor& dy) {
  if (kind == NormKind::none) return dy;
  Tensor dx = ops.empty(x.dtype(), x.shape());
  if (kind == NormKind::rmsnorm)
    ops.rms_norm_backward(x, weight.value, rstd, dy, dx, weight.grad);
  else
    ops.layer_norm_backward(x, weight.value, mean, rstd, dy, dx, weight.grad,
                            bias.value.defined() ? &bias.grad : nullptr);
  return dx;
}

void Norm::collect(std::vector<Parameter*>& out) {
  if (weight.value.defined()) out.push_back(&weight);
  if (bias.value.defined()) out.push_back(&bias);
}

// --- Attention ------------------------------------------------------------------------------------

namespace {

// Views [R, H*D] as [R*H, D] so a per-head norm is a row norm.
Tensor per_head(const Tensor& t, int64_t width) {
  return t.reshaped({t.numel() / width, width});
}

}  // namespace

Attention::Attention(const ModelConfig& model, int64_t layer, Ops& ops, Rng& rng)
    : model_(model), mla_(model.attention == AttentionKind::mla), heads_(model.n_heads), kv_heads_(model.n_kv_heads) {
  const std::string p = fmt::format("layers.{}.attn.", layer);
  const int64_t d = model.d_model;
  const DType dtype = model.dtype;
  const double std = model.init_std;
  if (!mla_) {
    qk_dim_ = v_dim_ = model.head_dim;
    const bool qkv_bias = model.attention_bias || model.qkv_bias;
    q_proj_ = Linear(ops, p + "q", d, heads_ * qk_dim_, qkv_bias, dtype, rng, std);
    k_proj_ = Linear(ops, p + "k", d, kv_heads_ * qk_dim_, qkv_bias, dtype, rng, std);
    v_proj_ = Linear(ops, p + "v", d, kv_heads_ * v_dim_, qkv_bias, dtype, rng, std);
    o_proj_ = Linear(ops, p + "o", heads_ * v_dim_, d, model.attention_bias, dtype, rng, std);
    if (model.qk_norm == QkNorm::head) {
      q_norm_ = Norm(ops, p + "q_norm", NormKind::rmsnorm, qk_dim_, false, model.norm_eps, dtype);
      k_norm_ = Norm(ops, p + "k_norm", NormKind::rmsnorm, qk_dim_, false, model.norm_eps, dtype);
    } else if (model.qk_norm == QkNorm::full) {
      q_norm_ = Norm(ops, p + "q_norm", NormKind::rmsnorm, heads_ * qk_dim_, false, model.norm_eps, dtype);
      k_norm_ = Norm(ops, p + "k_norm", NormKind::rmsnorm, kv_heads_ * qk_dim_, false, model.norm_eps, dtype);
    }
  } else {
    // DeepSeek-V2 (arXiv 2405.04434) sec. 2.1: queries and a joint key/value latent are low-rank
    // compressed; a decoupled RoPE key of qk_rope_head_dim is shared by all heads.
    kv_heads_ = heads_;
    qk_dim_ = model.qk_nope_head_dim + model.qk_rope_head_dim;
    v_dim_ = model.v_head_dim;
    if (model.q_lora_rank > 0) {
      q_a_ = Linear(ops, p + "q_a", d, model.q_lora_rank, false, dtype, rng, std);
      q_a_norm_ = Norm(ops, p + "q_a_norm", NormKind::rmsnorm, model.q_lora_rank, false, model.norm_eps, dtype);
      q_b_ = Linear(ops, p + "q_b", model.q_lora_rank, heads_ * qk_dim_, false, dtype, rng, std);
    } else {
      q_proj_ = Linear(ops, p + "q", d, heads_ * qk_dim_, false, dtype, rng, std);
    }
    kv_a_ = Linear(ops, p + "kv_a", d, model.kv_lora_rank + model.qk_rope_head_dim, false, dtype, rng, std);
    kv_a_norm_ = Norm(ops, p + "kv_a_norm", NormKind::rmsnorm, model.kv_lora_rank, false, model.norm_eps, dtype);
    kv_b_ =
        Linear(ops, p + "kv_b", model.kv_lora_rank, heads_ * (model.qk_nope_head_dim + v_dim_), false, dtype, rng, std);
    o_proj_ = Linear(ops, p + "o", heads_ * v_dim_, d, false, dtype, rng, std);
  }
  scale_ = 1.0 / std::sqrt(static_cast<double>(qk_dim_));
}

void Attention::collect(std::vector<Parameter*>& out) {
  for (Linear* l : {&q_proj_, &k_proj_, &v_proj_, &q_a_, &q_b_, &kv_a_, &kv_b_, &o_proj_}) l->collect(out);
  for (Norm* n : {&q_norm_, &k_norm_, &q_a_norm_, &kv_a_norm_}) n->collect(out);
}

Tensor Attention::forward(Ops& ops, const Tensor& x, int64_t seq_len) {
  x_ = x;
  seq_len_ = seq_len;
  const int64_t rows = x.dim(0);
  if (mla_) {
    forward_mla(ops, x);
  } else {
    q_raw_ = q_proj_.forward(ops, x);
    k_raw_ = k_proj_.forward(ops, x);
    v_ = v_proj_.forward(ops, x);
    // Query/key norms come before RoPE (Qwen3, OLMoE).
    Tensor q = q_raw_, k = k_raw_;
    if (model_.qk_norm == QkNorm::head) {
      q = q_norm_.forward(ops, per_head(q_raw_, qk_dim_)).reshaped(q_raw_.shape());
      k = k_norm_.forward(ops, per_head(k_raw_, qk_dim_)).reshaped(k_raw_.shape());
    } else if (model_.qk_norm == QkNorm::full) {
      q = q_norm_.forward(ops, q_raw_);
      k = k_norm_.forward(ops, k_raw_);
    }
    q_ = ops.empty(x.dtype(), q.shape());
    k_ = ops.empty(x.dtype(), k.shape());
    ops.rope(q, heads_, seq_len, model_.rope_theta, false, q_);
    ops.rope(k, kv_heads_, seq_len, model_.rope_theta, false, k_);
  }
  out_ = ops.empty(x.dtype(), {rows, heads_ * v_dim_});
  lse_ = ops.empty(x.dtype(), {rows, heads_});
  ops.causal_attention(q_, k_, v_, heads_, kv_heads_, seq_len, scale_, out_, lse_);
  return o_proj_.forward(ops, out_);
}

Tensor Attention::backward(Ops& ops, const Tensor& dy) {
  const int64_t rows = x_.dim(0);
  Tensor dout = ops.empty(dy.dtype(), out_.shape());
  o_proj_.backward(ops, out_, dy, &dout, false);
  Tensor dq = ops.empty(dy.dtype(), q_.shape()), dk = ops.empty(dy.dtype(), k_.shape()),
         dv = ops.empty(dy.dtype(), v_.shape());
  ops.causal_attention_backward(q_, k_, v_, out_, lse_, dout, heads_, kv_heads_, seq_len_, scale_, dq, dk, dv);
  if (mla_) return backward_mla(ops, dq, dk, dv);
  // RoPE is a rotation: its backward rotates back.
  ops.rope(dq, heads_, seq_len_, model_.rope_theta, true, dq);
  ops.rope(dk, kv_heads_, seq_len_, model_.rope_theta, true, dk);
  Tensor dq_raw = dq, dk_raw = dk;
  if (model_.qk_norm == QkNorm::head) {
    dq_raw = q_norm_.backward(ops, per_head(q_raw_, qk_dim_), per_head(dq, qk_dim_)).reshaped(q_raw_.shape());
    dk_raw = k_norm_.backward(ops, per_head(k_raw_, qk_dim_), per_head(dk, qk_dim_)).reshaped(k_raw_.shape());
  } else if (model_.qk_norm == QkNorm::full) {
    dq_raw = q_norm_.backward(ops, q_raw_, dq);
    dk_raw = k_norm_.backward(ops, k_raw_, dk);
  }
  Tensor dx = ops.empty(dy.dtype(), {rows, x_.dim(1)});
  q_proj_.backward(ops, x_, dq_raw, &dx, false);
  k_proj_.backward(ops, x_, dk_raw, &dx, true);
  v_proj_.backward(ops, x_, dv, &dx, true);
  return dx;
}

Tensor Attention::forward_mla(Ops& ops, const Tensor& x) {
  const int64_t rows = x.dim(0), nope = model_.qk_nope_head_dim, rope = model_.qk_rope_head_dim;
  const int64_t rank = model_.kv_lora_rank;
  const DType dtype = x.dtype();
  // Queries: [R, H * (nope + rope)], each head [nope | rope].
  if (model_.q_lora_rank > 0) {
    q_a_out_ = q_a_.forward(ops, x);
    q_a_normed_ = q_a_norm_.forward(ops, q_a_out_);
    q_raw_ = q_b_.forward(ops, q_a_normed_);
  } else {
    q_raw_ = q_proj_.forward(ops, x);
  }
  // The joint latent [R, rank + rope]: the compressed key/value, then the shared RoPE key.
  kv_a_out_ = kv_a_.forward(ops, x);
  ckv_ = ops.empty(dtype, {rows, rank});
  ops.copy_columns(kv_a_out_, 0, ckv_, 0, rank, false);
  Tensor k_rope = ops.empty(dtype, {rows, rope});
  ops.copy_columns(kv_a_out_, rank, k_rope, 0, rope, false);
  ops.rope(k_rope, 1, seq_len_, model_.rope_theta, false, k_rope);
  ckv_normed_ = kv_a_norm_.forward(ops, ckv_);
  kv_up_ = kv_b_.forward(ops, ckv_normed_);  // [R, H * (nope + v)], each head [k_nope | v]

  q_ = ops.empty(dtype, q_raw_.shape());
  ops.copy(q_raw_, q_);
  Tensor q_rope = ops.empty(dtype, {rows, heads_ * rope});
  k_ = ops.empty(dtype, {rows, heads_ * qk_dim_});
  v_ = ops.empty(dtype, {rows, heads_ * v_dim_});
  for (int64_t h = 0; h < heads_; ++h) {
    ops.copy_columns(q_raw_, h * qk_dim_ + nope, q_rope, h * rope, rope, false);
    ops.copy_columns(kv_up_, h * (nope + v_dim_), k_, h * qk_dim_, nope, false);
    ops.copy_columns(k_rope, 0, k_, h * qk_dim_ + nope, rope, false);
    ops.copy_columns(kv_up_, h * (nope + v_dim_) + nope, v_, h * v_dim_, v_dim_, false);
  }
  ops.rope(q_rope, heads_, seq_len_, model_.rope_theta, false, q_rope);
  for (int64_t h = 0; h < heads_; ++h) ops.copy_columns(q_rope, h * rope, q_, h * qk_dim_ + nope, rope, false);
  return {};
}

Tensor Attention::backward_mla(Ops& ops, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  const int64_t rows = x_.dim(0), nope = model_.qk_nope_head_dim, rope = model_.qk_rope_head_dim;
  const int64_t rank = model_.kv_lora_rank;
  const DType dtype = dq.dtype();
  // Keys and values back into the up-projection's output and the shared RoPE key.
  Tensor dkv_up = ops.empty(dtype, kv_up_.shape());
  Tensor dk_rope = ops.zeros(dtype, {rows, rope});
  Tensor dq_rope = ops.empty(dtype, {rows, heads_ * rope});
  Tensor dq_raw = ops.empty(dtype, dq.shape());
  ops.copy(dq, dq_raw);
  for (int64_t h = 0; h < heads_; ++h) {
    ops.copy_columns(dk, h * qk_dim_, dkv_up, h * (nope + v_dim_), nope, false);
    ops.copy_columns(dv, h * v_dim_, dkv_up, h * (nope + v_dim_) + nope, v_dim_, false);
    ops.copy_columns(dk, h * qk_dim_ + nope, dk_rope, 0, rope, true);
    ops.copy_columns(dq, h * qk_dim_ + nope, dq_rope, h * rope, rope, false);
  }
  ops.rope(dq_rope, heads_, seq_len_, model_.rope_theta, true, dq_rope);
  for (int64_t h = 0; h < heads_; ++h) ops.copy_columns(dq_rope, h * rope, dq_raw, h * qk_dim_ + nope, rope, false);
  ops.rope(dk_rope, 1, seq_len_, model_.rope_theta, true, dk_rope);

  Tensor dckv_normed = ops.empty(dtype, ckv_normed_.shape());
  kv_b_.backward(ops, ckv_normed_, dkv_up, &dckv_normed, false);
  Tensor dckv = kv_a_norm_.backward(ops, ckv_, dckv_normed);
  Tensor dkv_a = ops.empty(dtype, kv_a_out_.shape());
  ops.copy_columns(dckv, 0, dkv_a, 0, rank, false);
  ops.copy_columns(dk_rope, 0, dkv_a, rank, rope, false);
  Tensor dx = ops.empty(dtype, x_.shape());
  kv_a_.backward(ops, x_, dkv_a, &dx, false);
  if (model_.q_lora_rank > 0) {
    Tensor dq_a_normed = ops.empty(dtype, q_a_normed_.shape());
    q_b_.backward(ops, q_a_normed_, dq_raw, &dq_a_normed, false);
    Tensor dq_a = q_a_norm_.backward(ops, q_a_out_, dq_a_normed);
    q_a_.backward(ops, x_, dq_a, &dx, true);
  } else {
    q_proj_.backward(ops, x_, dq_raw, &dx, true);
  }
  return dx;
}

// --- Block ----------------------------------------------------------------------------------------

Block::Block(const RunConfig& config, int64_t index, const PluginRegistry& registry, Ops& ops, Rng& rng,
             const Parallel& parallel, bool force_moe)
    : attn_norm_(ops, fmt::format("layers.{}.attn_norm", index), config.model.norm, config.model.d_model,
                 config.model.norm_bias, config.model.norm_eps, config.model.dtype),
      ffn_norm_(ops, fmt::format("layers.{}.ffn_norm", index), config.model.norm, config.model.d_model,
                config.model.norm_bias, config.model.norm_eps, config.model.dtype),
      attention_(config.model, index, ops, rng) {
  const ModelConfig& m = config.model;
  if (force_moe || m.is_moe_layer(index)) {
    LayerSpec spec = config.layer;
    spec.layer_index = static_cast<int>(index);
    moe_ = std::make_unique<MoeLayer>(config.moe, spec, registry, ops, rng, parallel,
                                      config.parallel.scopes(config.train.batch_size, parallel.size()));
  } else {
    FfnOptions o;
    o.groups = 1;
    o.d_model = m.d_model;
    o.d_ff = m.d_ff;
    o.activation = parse_activation(m.dense_activation);
    o.gated = m.dense_ffn_glu;
    o.init_std = m.init_std;
    o.dtype = m.dtype;
    dense_ = std::make_unique<GroupedFfn>(o, ops, rng, fmt::format("layers.{}.ffn.", index));
  }
}

Tensor Block::forward(Ops& ops, const Tensor& x, const LayerInput& input) {
  x_ = x;
  attn_in_ = attn_norm_.forward(ops, x);
  h_ = attention_.forward(ops, attn_in_, input.seq_len);
  ops.axpy(1.0, x, h_);  // h = x + attention(norm(x))
  ffn_in_ = ffn_norm_.forward(ops, h_);
  Tensor y;
  if (moe_) {
    y = moe_->forward(ffn_in_, input);
  } else {
    y = ops.empty(x.dtype(), x.shape());
    dense_ctx_ = dense_->forward(ops, ffn_in_, {0, x.dim(0)}, y);
  }
  ops.axpy(1.0, h_, y);
  return y;
}

Tensor Block::backward(Ops& ops, const Tensor& dy) {
  Tensor dffn_in;
  if (moe_) {
    dffn_in = moe_->backward(dy);
  } else {
    dffn_in = ops.empty(dy.dtype(), dy.shape());
    dense_->backward(ops, ffn_in_, {0, dy.dim(0)}, *dense_ctx_, dy, dffn_in);
  }
  Tensor dh = ffn_norm_.backward(ops, h_, dffn_in);
  if (dh.raw() == dffn_in.raw()) {  // identity norm: dh is dffn_in itself, so add into a copy
    Tensor copy = ops.empty(dy.dtype(), dy.shape());
    ops.copy(dh, copy);
    dh = copy;
  }
  ops.axpy(1.0, dy, dh);
  Tensor dattn_in = attention_.backward(ops, dh);
  Tensor dx = attn_norm_.backward(ops, x_, dattn_in);  // dattn_in itself for an identity norm: ours to add into
  ops.axpy(1.0, dh, dx);
  return dx;
}

void Block::collect(const std::string& prefix, std::vector<std::pair<std::string, Parameter*>>& out) {
  std::vector<Parameter*> params;
  attn_norm_.collect(params);
  attention_.collect(params);
  ffn_norm_.collect(params);
  if (dense_)
    for (Parameter* p : dense_->parameters()) params.push_back(p);
  for (Parameter* p : params) out.emplace_back(p->name, p);
  if (moe_)
    for (auto& [name, p] : moe_->named_parameters()) out.emplace_back(prefix + "moe." + name, p);
}

// --- Multi-token prediction -----------------------------------------------------------------------

MtpModule::MtpModule(const RunConfig& config, int64_t depth, const PluginRegistry& registry, Ops& ops, Rng& rng,
                     const Parallel& parallel)
    : d_model_(config.model.d_model),
      index_(config.model.n_layers + depth),
      h_norm_(ops, fmt::format("layers.{}.mtp.h_norm", config.model.n_layers + depth), NormKind::rmsnorm,
              config.model.d_model, false, config.model.norm_eps, config.model.dtype),
      e_norm_(ops, fmt::format("layers.{}.mtp.e_norm", config.model.n_layers + depth), NormKind::rmsnorm,
              config.model.d_model, false, config.model.norm_eps, config.model.dtype),
      out_norm_(ops, fmt::format("layers.{}.mtp.out_norm", config.model.n_layers + depth), NormKind::rmsnorm,
                config.model.d_model, false, config.model.norm_eps, config.model.dtype),
      proj_(ops, fmt::format("layers.{}.mtp.proj", config.model.n_layers + depth), 2 * config.model.d_model,
            config.model.d_model, false, config.model.dtype, rng, config.model.init_std),
      block_(config, config.model.n_layers + depth, registry, ops, rng, parallel, true) {}

Tensor MtpModule::forward(Ops& ops, const Tensor& h, const Tensor& e, const LayerInput& input) {
  h_ = h;
  e_ = e;
  const Tensor h_normed = h_norm_.forward(ops, h), e_normed = e_norm_.forward(ops, e);
  // [norm(embedding) | norm(hidden)], the order of DeepSeek-V3's reference code (eh_proj).
  joined_ = ops.empty(h.dtype(), {h.dim(0), 2 * d_model_});
  ops.copy_columns(e_normed, 0, joined_, 0, d_model_, false);
  ops.copy_columns(h_normed, 0, joined_, d_model_, d_model_, false);
  projected_ = proj_.forward(ops, joined_);
  return block_.forward(ops, projected_, input);
}

std::pair<Tensor, Tensor> MtpModule::backward(Ops& ops, const Tensor& dy) {
  const Tensor dprojected = block_.backward(ops, dy);
  Tensor djoined = ops.empty(dy.dtype(), joined_.shape());
  proj_.backward(ops, joined_, dprojected, &djoined, false);
  Tensor de_normed = ops.empty(dy.dtype(), e_.shape()), dh_normed = ops.empty(dy.dtype(), h_.shape());
  ops.copy_columns(djoined, 0, de_normed, 0, d_model_, false);
  ops.copy_columns(djoined, d_model_, dh_normed, 0, d_model_, false);
  return {h_norm_.backward(ops, h_, dh_normed), e_norm_.backward(ops, e_, de_normed)};
}

void MtpModule::collect(std::vector<std::pair<std::string, Parameter*>>& out) {
  std::vector<Parameter*> params;
  h_norm_.collect(params);
  e_norm_.collect(params);
  proj_.collect(params);
  out_norm_.collect(params);
  for (Parameter* p : params) out.emplace_back(p->name, p);
  block_.collect(fmt::format("layers.{}.", index_), out);
}

// --- Transformer ----------------------------------------------------------------------------------

std::vector<Unsupported> transformer_unsupported(const RunConfig& config) {
  const ModelConfig& m = config.model;
  std::vector<Unsupported> out;
  if (m.vocab_size == 0)
    out.push_back({"model.vocab_size", "a language model needs a vocabulary; vocab_size is 0",
                   "set model.vocab_size (256 for byte-level text)"});
  if (m.attention == AttentionKind::none)
    out.push_back({"model.attention", "a language model needs attention; attention is \"none\"",
                   "set model.attention = \"mha\", \"gqa\" or \"mla\""});
  if (m.architecture == Architecture::encoder_decoder)
    out.push_back({"model.architecture",
                   "moelab trains decoder-only language models; encoder_decoder (T5, Switch, GShard, ST-MoE) is "
                   "counted by inspect but not trained",
                   "set model.architecture = \"decoder\" and model.n_encoder_layers = 0"});
  if (m.relative_attention_buckets > 0)
    out.push_back({"model.relative_attention_buckets", "T5's relative position bias is not trained; moelab uses RoPE",
                   "set model.relative_attention_buckets = 0"});
  if (m.attention != AttentionKind::mla && m.head_dim % 2 != 0)
    out.push_back({"model.head_dim", fmt::format("RoPE rotates pairs, so head_dim must be even, got {}", m.head_dim),
                   "choose an even head_dim (or d_model / n_heads)"});
  if (m.attention == AttentionKind::mla && m.qk_rope_head_dim % 2 != 0)
    out.push_back({"model.qk_rope_head_dim",
                   fmt::format("RoPE rotates pairs, so qk_rope_head_dim must be even, got {}", m.qk_rope_head_dim),
                   "choose an even qk_rope_head_dim"});
  if (m.attention == AttentionKind::mla && m.qk_rope_head_dim == 0)
    out.push_back({"model.qk_rope_head_dim", "MLA without a RoPE part has no position information here",
                   "set qk_rope_head_dim >= 2"});
  return out;
}

Transformer::Transformer(const RunConfig& config, const PluginRegistry& registry, Ops& ops, Rng& rng,
                         const Parallel& parallel)
    : config_(config), ops_(ops), parallel_(&parallel) {
  const std::vector<Unsupported> problems = transformer_unsupported(config);
  if (!problems.empty())
    throw UsageError(fmt::format("{}: {} ({})", problems[0].key, problems[0].message, problems[0].hint));
  const ModelConfig& m = config.model;
  MOELAB_CHECK(config.layer.d_model == m.d_model && config.layer.dtype == m.dtype,
               "the MoE layer spec (d_model {}) does not match the model (d_model {})", config.layer.d_model,
               m.d_model);
  Rng init = rng.fork(0x7f0);
  embed_ = make_parameter(ops, "embed.weight", m.dtype, {m.vocab_size, m.d_model}, init, m.init_std);
  for (int64_t i = 0; i < m.n_layers; ++i)
    blocks_.push_back(std::make_unique<Block>(config, i, registry, ops, init, parallel));
  final_norm_ = Norm(ops, "final_norm", m.norm, m.d_model, m.norm_bias, m.norm_eps, m.dtype);
  if (!m.tied_embeddings) head_ = Linear(ops, "head", m.d_model, m.vocab_size, false, m.dtype, init, m.init_std);
  for (int64_t k = 0; k < m.mtp_modules; ++k)
    mtp_.push_back(std::make_unique<MtpModule>(config, k, registry, ops, init, parallel));
}

double Transformer::head_forward(const Tensor& x, const Tensor& targets, Tensor& logits, Tensor& lse) {
  const ModelConfig& m = config_.model;
  const int64_t rows = x.dim(0);
  logits = ops_.empty(m.dtype, {rows, m.vocab_size});
  ops_.gemm(false, true, 1.0, x, m.tied_embeddings ? embed_.gemm_value() : head_.weight.gemm_value(), 0.0, logits);
  Tensor loss = ops_.empty(m.dtype, {rows});
  lse = ops_.empty(m.dtype, {rows});
  ops_.cross_entropy(logits, ops_.to_device(targets), loss, lse);
  Tensor host_loss = ops_.to_host(loss);
  double total = 0;
  for (int64_t i = 0; i < rows; ++i) total += host_value(host_loss, i);
  return total;
}

Tensor Transformer::head_backward(const Tensor& x, const Tensor& targets, const Tensor& logits, const Tensor& lse,
                                  double scale) {
  const ModelConfig& m = config_.model;
  Tensor dlogits = ops_.empty(m.dtype, logits.shape());
  ops_.cross_entropy_backward(logits, ops_.to_device(targets), lse, scale, dlogits);
  Parameter& head_weight = m.tied_embeddings ? embed_ : head_.weight;
  ops_.gemm(true, false, 1.0, dlogits, x, 1.0, head_weight.grad);  // dW [V, d] += dlogits^T x
  Tensor dx = ops_.empty(m.dtype, x.shape());
  ops_.gemm(false, false, 1.0, dlogits, head_weight.gemm_value(), 0.0, dx);
  return dx;
}

Transformer::~Transformer() = default;

// On several ranks the loss is the mean over the global batch: counts and sums over every rank.
int64_t Transformer::global_count(int64_t local) const {
  if (parallel_->distributed()) parallel_->world().allreduce_sum(&local, 1, DType::i64);
  return local;
}

double Transformer::global_sum(double local) const {
  if (parallel_->distributed()) parallel_->world().allreduce_sum(&local, 1, DType::f64);
  return local;
}

double Transformer::forward(const std::vector<int32_t>& inputs, const std::vector<int32_t>& targets, int64_t batch,
                            bool training, int64_t step) {
  const int64_t rows = static_cast<int64_t>(inputs.size());
  MOELAB_CHECK(batch >= 1 && rows % batch == 0 && targets.size() == inputs.size(),
               "transformer forward: {} inputs, {} targets, batch {}", inputs.size(), targets.size(), batch);
  batch_ = batch;
  seq_len_ = rows / batch;
  const ModelConfig& m = config_.model;
  input_ids_ = host_tensor<int32_t>({rows});
  target_ids_ = host_tensor<int32_t>({rows});
  scored_ = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int32_t token = inputs[static_cast<size_t>(i)];
    if (token < 0 || token >= m.vocab_size)
      throw UsageError(
          fmt::format("token {} at position {} is outside the vocabulary [0, {})", token, i, m.vocab_size));
    input_ids_.data<int32_t>()[i] = token;
    target_ids_.data<int32_t>()[i] = targets[static_cast<size_t>(i)];
    scored_ += targets[static_cast<size_t>(i)] >= 0 ? 1 : 0;
  }
  scored_ = global_count(scored_);
  Tensor ids = ops_.to_device(input_ids_);
  x0_ = ops_.empty(m.dtype, {rows, m.d_model});
  ops_.gather_rows(embed_.value, ids, x0_);
  LayerInput input{training, step, batch, seq_len_, &input_ids_};
  Tensor x = x0_;
  for (auto& block : blocks_) x = block->forward(ops_, x, input);
  final_in_ = x;
  final_out_ = final_norm_.forward(ops_, x);
  const double total = global_sum(head_forward(final_out_, target_ids_, logits_, lse_));

  // Module k (1-based) sees token i+k at position i and predicts token i+k+1; both come from the
  // targets (the inputs shifted by one), and positions past the window's end are not scored.
  mtp_saved_.assign(mtp_.size(), MtpSaved{});
  mtp_loss_ = 0;
  Tensor hidden = final_in_;
  for (size_t k = 0; k < mtp_.size(); ++k) {
    MtpSaved& saved = mtp_saved_[k];
    saved.token_ids = host_tensor<int32_t>({rows});
    saved.target_ids = host_tensor<int32_t>({rows});
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < seq_len_; ++i) {
        const int64_t shifted = i + static_cast<int64_t>(k);  // targets[shifted] is token i+k+1
        const int32_t token = shifted < seq_len_ ? targets[static_cast<size_t>(b * seq_len_ + shifted)] : -1;
        const int32_t target = shifted + 1 < seq_len_ ? targets[static_cast<size_t>(b * seq_len_ + shifted + 1)] : -1;
        saved.token_ids.data<int32_t>()[b * seq_len_ + i] = token >= 0 ? token : 0;
        saved.target_ids.data<int32_t>()[b * seq_len_ + i] = token >= 0 ? target : -1;
        saved.scored += token >= 0 && target >= 0 ? 1 : 0;
      }
    Tensor e = ops_.empty(m.dtype, {rows, m.d_model});
    ops_.gather_rows(embed_.value, ops_.to_device(saved.token_ids), e);
    saved.hidden = mtp_[k]->forward(ops_, hidden, e, input);
    saved.normed = mtp_[k]->out_norm().forward(ops_, saved.hidden);
    saved.scored = global_count(saved.scored);
    const double module_total = global_sum(head_forward(saved.normed, saved.target_ids, saved.logits, saved.lse));
    mtp_loss_ +=
        (saved.scored > 0 ? module_total / static_cast<double>(saved.scored) : 0.0) / static_cast<double>(mtp_.size());
    hidden = saved.hidden;
  }
  return scored_ > 0 ? total / static_cast<double>(scored_) : 0.0;
}

void Transformer::backward() {
  const ModelConfig& m = config_.model;
  // Multi-token prediction first, deepest module first: each hands the gradient of its input
  // hidden state to the module before it, and the first one to the main model's last layer.
  Tensor dhidden;
  for (size_t k = mtp_.size(); k-- > 0;) {
    MtpSaved& saved = mtp_saved_[k];
    const double scale = saved.scored > 0
                             ? m.mtp_loss_weight / static_cast<double>(mtp_.size()) / static_cast<double>(saved.scored)
                             : 0.0;
    const Tensor dnormed = head_backward(saved.normed, saved.target_ids, saved.logits, saved.lse, scale);
    Tensor dout = mtp_[k]->out_norm().backward(ops_, saved.hidden, dnormed);
    if (dhidden.defined()) ops_.axpy(1.0, dhidden, dout);
    auto [dprev, de] = mtp_[k]->backward(ops_, dout);
    ops_.scatter_add_rows(de, ops_.to_device(saved.token_ids), nullptr, embed_.grad);
    dhidden = dprev;
  }
  const Tensor dfinal_out =
      head_backward(final_out_, target_ids_, logits_, lse_, scored_ > 0 ? 1.0 / static_cast<double>(scored_) : 0.0);
  Tensor dx = final_norm_.backward(ops_, final_in_, dfinal_out);
  if (dhidden.defined()) ops_.axpy(1.0, dhidden, dx);
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) dx = (*it)->backward(ops_, dx);
  ops_.scatter_add_rows(dx, ops_.to_device(input_ids_), nullptr, embed_.grad);
}

void Transformer::after_step() {  // every MoE layer, the MTP modules' included
  for (MoeLayer* layer : moe_layers()) layer->after_step();
}

double Transformer::aux_loss() const {
  double total = 0;
  for (const auto& block : blocks_)
    if (block->moe()) total += block->moe()->stats().aux_loss;
  for (const auto& module : mtp_) total += module->moe()->stats().aux_loss;
  return total;
}

std::vector<MoeLayer*> Transformer::moe_layers() {
  std::vector<MoeLayer*> out;
  for (auto& block : blocks_)
    if (block->moe()) out.push_back(block->moe());
  for (auto& module : mtp_) out.push_back(module->moe());
  return out;
}

std::vector<std::pair<std::string, Parameter*>> Transformer::named_parameters() {
  std::vector<std::pair<std::string, Parameter*>> out;
  out.emplace_back("embed.weight", &embed_);
  for (size_t i = 0; i < blocks_.size(); ++i) blocks_[i]->collect(fmt::format("layers.{}.", i), out);
  std::vector<Parameter*> rest;
  final_norm_.collect(rest);
  head_.collect(rest);
  for (Parameter* p : rest) out.emplace_back(p->name, p);
  for (auto& module : mtp_) module->collect(out);
  return out;
}

GradReduce Transformer::grad_reduce(const Parameter* p) {
  for (MoeLayer* moe : moe_layers())
    for (auto& [name, q] : moe->named_parameters())
      if (q == p) return moe->grad_reduce(p);
  return GradReduce::world;
}

bool Transformer::is_sharded(const Parameter* p) {
  for (MoeLayer* moe : moe_layers())
    if (moe->is_sharded(p)) return true;
  return false;
}

std::vector<Parameter*> Transformer::parameters() {
  std::vector<Parameter*> out;
  for (auto& [name, p] : named_parameters()) out.push_back(p);
  return out;
}

std::vector<std::pair<std::string, Tensor*>> Transformer::named_buffers() {
  std::vector<std::pair<std::string, Tensor*>> out;
  for (MoeLayer* moe : moe_layers())
    if (moe->expert_bias().defined())
      out.emplace_back(fmt::format("layers.{}.moe.expert_bias", moe->spec().layer_index), &moe->expert_bias());
  return out;
}

}  // namespace moelab

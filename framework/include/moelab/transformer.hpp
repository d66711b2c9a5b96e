// The decoder-only MoE transformer `moelab run` trains: token embedding, N blocks of
//   h = x + attention(norm(x));  y = h + ffn(norm(h))
// (pre-norm, as Mixtral, DeepSeek, Qwen and OLMoE), a final norm and the LM head, tied or not.
// Each block's FFN is dense or an MoE layer by the recipe's pattern (ModelConfig::is_moe_layer).
// Attention is multi-head / grouped-query with RoPE (optionally with query/key norms), or
// DeepSeek's multi-head latent attention. Every part pairs an explicit forward with its backward
// (llm.c's style): a forward saves what its backward reads, and one backward follows one forward.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moelab/config.hpp"
#include "moelab/ffn.hpp"
#include "moelab/module.hpp"
#include "moelab/moe_layer.hpp"

namespace moelab {

class PluginRegistry;

// y = x W^T (+ b) with W [out, in], the torch.nn.Linear layout.
struct Linear {
  Parameter weight, bias;
  Linear() = default;
  Linear(Ops& ops, const std::string& name, int64_t in, int64_t out, bool has_bias, DType dtype, Rng& rng,
         double init_std);
  Tensor forward(Ops& ops, const Tensor& x) const;
  // Accumulates dW (and db); dx is overwritten (accumulate_dx = false) or added to, or skipped when null.
  void backward(Ops& ops, const Tensor& x, const Tensor& dy, Tensor* dx, bool accumulate_dx);
  void collect(std::vector<Parameter*>& out);
};

// RMSNorm or LayerNorm over the last dimension (width), or the identity for NormKind::none.
struct Norm {
  NormKind kind = NormKind::none;
  double eps = 1e-6;
  Parameter weight, bias;
  Tensor mean, rstd;  // saved by forward
  Norm() = default;
  Norm(Ops& ops, const std::string& name, NormKind kind, int64_t width, bool has_bias, double eps, DType dtype);
  Tensor forward(Ops& ops, const Tensor& x);
  Tensor backward(Ops& ops, const Tensor& x, const Tensor& dy);
  void collect(std::vector<Parameter*>& out);
};

// Self-attention of one block: MHA / GQA with RoPE, or MLA.
class Attention {
 public:
  Attention(const ModelConfig& model, int64_t layer, Ops& ops, Rng& rng);
  Tensor forward(Ops& ops, const Tensor& x, int64_t seq_len);
  Tensor backward(Ops& ops, const Tensor& dy);
  void collect(std::vector<Parameter*>& out);

 private:
  Tensor forward_mla(Ops& ops, const Tensor& x);
  Tensor backward_mla(Ops& ops, const Tensor& dattn_q, const Tensor& dattn_k, const Tensor& dattn_v);
  ModelConfig model_;
  bool mla_;
  int64_t heads_, kv_heads_, qk_dim_, v_dim_;
  double scale_;
  Linear q_proj_, k_proj_, v_proj_, o_proj_;  // MHA / GQA (q_proj_ is also MLA's direct query projection)
  Norm q_norm_, k_norm_;                      // qk_norm: per head or over the projection
  Linear q_a_, q_b_, kv_a_, kv_b_;            // MLA down / up projections
  Norm q_a_norm_, kv_a_norm_;
  // Saved by forward.
  int64_t seq_len_ = 0;
  Tensor x_, q_raw_, k_raw_, q_, k_, v_, out_, lse_;  // q_, k_: after norms and RoPE
  Tensor q_a_out_, q_a_normed_, kv_a_out_, ckv_, ckv_normed_, kv_up_;
};

// One pre-norm block.
class Block {
 public:
  // `force_moe`: an MoE FFN whatever the layer pattern says (DeepSeek-V3's MTP layers).
  Block(const RunConfig& config, int64_t index, const PluginRegistry& registry, Ops& ops, Rng& rng,
        const Parallel& parallel, bool force_moe = false);
  Tensor forward(Ops& ops, const Tensor& x, const LayerInput& input);
  Tensor backward(Ops& ops, const Tensor& dy);
  void collect(const std::string& prefix, std::vector<std::pair<std::string, Parameter*>>& out);
  MoeLayer* moe() { return moe_.get(); }

 private:
  Norm attn_norm_, ffn_norm_;
  Attention attention_;
  std::unique_ptr<GroupedFfn> dense_;
  std::unique_ptr<MoeLayer> moe_;
  Tensor x_, h_, attn_in_, ffn_in_;
  std::unique_ptr<ForwardContext> dense_ctx_;
};

// One DeepSeek-V3 multi-token prediction module (arXiv 2412.19437, sec. 2.2, eqs. 21-25): module
// k combines the previous depth's hidden state at position i with the embedding of token i+k,
//   h' = M [norm(h); norm(embed(t_{i+k}))],   h^k = Block(h'),
// and predicts token i+k+1 through its own output norm and the main model's (shared) head.
class MtpModule {
 public:
  MtpModule(const RunConfig& config, int64_t depth, const PluginRegistry& registry, Ops& ops, Rng& rng,
            const Parallel& parallel);
  // h [R, d]: the previous depth's hidden states; e [R, d]: the shifted tokens' embeddings.
  Tensor forward(Ops& ops, const Tensor& h, const Tensor& e, const LayerInput& input);
  // dy [R, d] -> (dh, de).
  std::pair<Tensor, Tensor> backward(Ops& ops, const Tensor& dy);
  void collect(std::vector<std::pair<std::string, Parameter*>>& out);
  Norm& out_norm() { return out_norm_; }
  MoeLayer* moe() { return block_.moe(); }

 private:
  int64_t d_model_;
  int64_t index_;  // the layer index it is saved under: after the main layers, as HF DeepSeek-V3 stores it
  Norm h_norm_, e_norm_, out_norm_;
  Linear proj_;
  Block block_;
  Tensor h_, e_, joined_, projected_;
};

class Transformer : public Module {
 public:
  // config.model must describe a decoder with a vocabulary and attention; throws UsageError
  // naming the recipe key otherwise (use transformer_unsupported() to ask first). On several
  // ranks every rank constructs it together, and a forward takes this rank's share of the
  // global batch: the loss it returns, and the gradients backward() accumulates, are those of
  // the mean over the global batch (this rank's share of them, for the replicated parameters).
  Transformer(const RunConfig& config, const PluginRegistry& registry, Ops& ops, Rng& rng,
              const Parallel& parallel = single_process());
  ~Transformer() override;

  // inputs and targets: host i32 [batch * seq_len]; a negative target is not scored. Returns the
  // mean cross-entropy over scored targets (of every rank); aux_loss() holds the balancers' sum.
  double forward(const std::vector<int32_t>& inputs, const std::vector<int32_t>& targets, int64_t batch, bool training,
                 int64_t step);
  // Gradients of (cross-entropy + every balancer loss) of the last forward, accumulated.
  void backward();
  void after_step();  // balancers' between-step updates (aux_free_bias)

  double aux_loss() const;
  // Multi-token prediction: the modules' mean cross-entropy in the last forward (0 without MTP);
  // backward() adds mtp_loss_weight times its gradient.
  double mtp_loss() const { return mtp_loss_; }
  std::vector<MoeLayer*> moe_layers();
  std::vector<Parameter*> parameters() override;
  // Parameters by their name in checkpoints: "embed.weight", "layers.3.attn.q.weight", ...
  std::vector<std::pair<std::string, Parameter*>> named_parameters();
  // How a parallel run combines the gradient of `p` (a parameter of this model), and whether it
  // is one rank's slice of the routed experts.
  GradReduce grad_reduce(const Parameter* p);
  bool is_sharded(const Parameter* p);
  // Non-trainable state a checkpoint must carry: each MoE layer's expert bias.
  std::vector<std::pair<std::string, Tensor*>> named_buffers();

 private:
  RunConfig config_;
  Ops& ops_;
  const Parallel* parallel_;
  Parameter embed_;
  std::vector<std::unique_ptr<Block>> blocks_;
  Norm final_norm_;
  Linear head_;  // unused when tied
  std::vector<std::unique_ptr<MtpModule>> mtp_;
  // Saved by forward.
  int64_t batch_ = 0, seq_len_ = 0;
  Tensor input_ids_, target_ids_, x0_, final_in_, final_out_, logits_, lse_;
  int64_t scored_ = 0;
  struct MtpSaved {
    Tensor token_ids, target_ids, hidden, normed, logits, lse;
    int64_t scored = 0;
  };
  std::vector<MtpSaved> mtp_saved_;
  double mtp_loss_ = 0;
  // logits = x head^T and the cross-entropy of `targets`: returns the summed loss.
  double head_forward(const Tensor& x, const Tensor& targets, Tensor& logits, Tensor& lse);
  int64_t global_count(int64_t local) const;
  double global_sum(double local) const;
  // dlogits = scale (softmax - onehot); accumulates the head's gradient, returns dx.
  Tensor head_backward(const Tensor& x, const Tensor& targets, const Tensor& logits, const Tensor& lse, double scale);
};

// Why `config` cannot be trained as a language model (empty when it can): for each reason, the
// recipe key, what is wrong and what to change.
struct Unsupported {
  std::string key, message, hint;
};
std::vector<Unsupported> transformer_unsupported(const RunConfig& config);

}  // namespace moelab

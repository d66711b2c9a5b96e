// DeepSeek-V3's complementary sequence-wise balance loss (DeepSeek-V3 technical report, sec.
// 2.1.2, eq. 17-20; Megatron-Core's sequence_load_balancing_loss_func). For each sequence of T
// tokens (N_r routed experts, K_r of them per token):
//   f_i = N_r / (K_r T) * sum_t 1(expert i is among token t's selected experts)      (eq. 18)
//   P_i = (1/T) sum_t s'_{i,t},   s'_{i,t} = s_{i,t} / sum_j s_{j,t}                   (eq. 19-20)
//   L_seq = alpha * sum_i f_i P_i                                                      (eq. 17)
// and the loss is the mean of L_seq over the batch's sequences (Megatron-Core averages over the
// batch the same way). A balanced sequence scores alpha.
//
// Contract with the router: plan.probs must hold s', the per-token normalised affinities (rows
// summing to 1). Softmax routers' probabilities already are; the sigmoid_grouped router (V3)
// puts s / sum_j s_j there, not the raw sigmoid scores. f is counted from the plan's assignment
// list (plan.token / plan.expert) before capacity, so it is constant: the gradient flows through
// P only, d loss / d probs[t, i] = alpha / S * f_{seq(t), i} / T.
//
// Sequences are contiguous runs of RouterContext::seq_len tokens (seq_len 0: all tokens are one
// sequence). Expert-choice plans (top_k = 0) have no K_r; the mean number of experts per token,
// A / T, takes its place, so that f still averages to 1.
#include <fmt/format.h>

#include <moelab/plugin.hpp>

namespace {

using namespace moelab;

class SeqAux final : public Balancer {
 public:
  static ParamSchema schema() {
    return {param_float("coef", 0.0001, "loss coefficient alpha (DeepSeek-V3: 0.0001)").at_least(0)};
  }

  SeqAux(const ParamSet& p, const LayerSpec& spec, Ops&, Rng&)
      : coef_(p.get_float("coef")), experts_(spec.num_experts) {}

  double forward(const RoutingPlan& plan, const LayerLoad&, const RouterContext& ctx) override {
    Ops& ops = ctx.ops;
    const Split split = split_of(plan, ctx);
    if (split.sequences == 0) return 0.0;
    const std::vector<double> f = selection_fraction(plan, split, ops);
    // prob_sums [S, E]: sum over each sequence's tokens of probs.
    Tensor prob_sums = ops.zeros(plan.probs.dtype(), {split.sequences, experts_});
    for (int64_t s = 0; s < split.sequences; ++s) {
      Tensor sums = prob_sums.rows(s, s + 1).reshaped({experts_});
      ops.sum_rows(plan.probs.rows(s * split.seq_len, (s + 1) * split.seq_len), false, sums);
    }
    const Tensor sums_host = ops.to_host(prob_sums);
    double total = 0;
    for (int64_t i = 0; i < split.sequences * experts_; ++i)
      total += f[static_cast<size_t>(i)] * host_value(sums_host, i) / static_cast<double>(split.seq_len);
    return coef_ * total / static_cast<double>(split.sequences);
  }

  void backward(const RoutingPlan& plan, const LayerLoad&, const RouterContext& ctx, double grad_loss,
                RouterGrad& grad) override {
    Ops& ops = ctx.ops;
    const Split split = split_of(plan, ctx);
    if (!grad.probs.defined()) grad.probs = ops.zeros(plan.probs.dtype(), plan.probs.shape());
    if (split.sequences == 0) return;
    const std::vector<double> f = selection_fraction(plan, split, ops);
    // row_grad [S, E]: d loss / d probs[t, :] for every token t of sequence s.
    Tensor row_grad = host_tensor(plan.probs.dtype(), {split.sequences, experts_});
    const double scale = grad_loss * coef_ / static_cast<double>(split.sequences * split.seq_len);
    for (int64_t i = 0; i < split.sequences * experts_; ++i)
      set_host_value(row_grad, i, scale * f[static_cast<size_t>(i)]);
    const Tensor row_grad_device = ops.to_device(row_grad);
    for (int64_t s = 0; s < split.sequences; ++s) {
      Tensor rows = grad.probs.rows(s * split.seq_len, (s + 1) * split.seq_len);
      ops.add_row_vector(row_grad_device.rows(s, s + 1).reshaped({experts_}), rows);
    }
  }

 private:
  struct Split {
    int64_t sequences = 0, seq_len = 0;
  };

  Split split_of(const RoutingPlan& plan, const RouterContext& ctx) const {
    expect_shape(plan.probs, {plan.probs.dim(0), experts_}, "seq_aux: router probabilities");
    const int64_t tokens = plan.probs.dim(0);
    if (tokens == 0) return {};
    const int64_t seq_len = ctx.seq_len > 0 ? ctx.seq_len : tokens;
    MOELAB_CHECK(tokens % seq_len == 0, "seq_aux: {} tokens do not split into sequences of {} tokens", tokens, seq_len);
    return {tokens / seq_len, seq_len};
  }

  // f [S*E], row-major: f_{s,i} = E / (k * seq_len) * (assignments of sequence s to expert i).
  std::vector<double> selection_fraction(const RoutingPlan& plan, const Split& split, Ops& ops) const {
    const Tensor token = ops.to_host(plan.token);
    const Tensor expert = ops.to_host(plan.expert);
    const int32_t* token_of = token.data<int32_t>();
    const int32_t* expert_of = expert.data<int32_t>();
    const int64_t tokens = split.sequences * split.seq_len;
    std::vector<double> f(static_cast<size_t>(split.sequences * experts_), 0.0);
    int64_t dispatched = 0;
    for (int64_t a = 0; a < expert.numel(); ++a) {
      if (expert_of[a] < 0) continue;  // the router chose not to dispatch (GShard's random routing)
      MOELAB_CHECK(token_of[a] >= 0 && token_of[a] < tokens && expert_of[a] < experts_,
                   "seq_aux: assignment {} = (token {}, expert {}) is outside [{} tokens, {} experts]", a, token_of[a],
                   expert_of[a], tokens, experts_);
      f[static_cast<size_t>((token_of[a] / split.seq_len) * experts_ + expert_of[a])] += 1.0;
      ++dispatched;
    }
    const double per_token = plan.top_k > 0 ? static_cast<double>(plan.top_k)
                                            : static_cast<double>(dispatched) / static_cast<double>(tokens);
    if (per_token <= 0) return f;  // nothing dispatched: every f_i is 0
    const double scale = static_cast<double>(experts_) / (per_token * static_cast<double>(split.seq_len));
    for (double& value : f) value *= scale;
    return f;
  }

  double coef_;
  int64_t experts_;
};

}  // namespace

MOELAB_BALANCER_PLUGIN(SeqAux, "seq_aux", "1.0.0",
                       "DeepSeek-V3 sequence-wise balance loss alpha * mean_seq sum_i f_i P_i")

// Balanced token-choice routing by Sinkhorn-Knopp: the selection of S-BASE (Clark et al. 2022,
// "Unified Scaling Laws for Routed Language Models", arXiv 2202.01169, section 2.2: BASE layers'
// balanced assignment approximated by Sinkhorn iterations), with softmax combine weights.
//   logits = x W^T                        x [T, d], W [E, d] (as softmax_topk's gate.weight)
//   probs  = softmax(logits)              the combine weights and what balancers read
//   training: K = softmax(logits), then repeat
//               K[:, e] *= (T / E) / sum_t K[t, e]     every expert's column sums to T / E
//               K[t, :] /= sum_e K[t, e]               every token's row sums to 1
//             until the columns' RMS relative deviation from T / E is below `tolerance` or
//             `iterations` passes ran; the top-k of each row of K selects the experts.
//   evaluation: the top-k of probs (no balancing: routing stays a function of the token alone).
//   weights = probs at the selected experts (renormalised over the k when `renormalize`).
// The selection is not differentiable; gradients reach W and x through the weights and through
// whatever balancers add to probs and logits, as for softmax_topk. Every step runs on the kernel
// (ops only, no host copies); metrics(): the iterations and the final residual of the last
// training forward, reported in metrics.jsonl as router.sinkhorn.iterations / .residual.
#include <cmath>
#include <moelab/plugin.hpp>

namespace {

using namespace moelab;

struct Saved : ForwardContext {
  Tensor selected;  // [T, k]: the probs at the selected experts
};

class Sinkhorn final : public Router {
 public:
  static ParamSchema schema() {
    return {
        param_int("iterations", 10, "at most this many Sinkhorn passes (columns, then rows) per training forward")
            .range(1, 1000),
        param_float("tolerance", 1e-3, "stop once the columns' RMS relative deviation from T / E is below this")
            .range(0.0, 1.0),
        param_bool("renormalize", false, "renormalise the k selected probabilities to sum to 1"),
        param_float("init_std", 0.02, "standard deviation of the router weight's initialisation").at_least(0),
    };
  }

  Sinkhorn(const ParamSet& p, const LayerSpec& spec, Ops& ops, Rng& rng)
      : spec_(spec),
        iterations_(p.get_int("iterations")),
        tolerance_(p.get_float("tolerance")),
        renormalize_(p.get_bool("renormalize")),
        weight_(make_parameter(ops, "weight", spec.dtype, {spec.num_experts, spec.d_model}, rng,
                               p.get_float("init_std"))) {}

  std::vector<Parameter*> parameters() override { return {&weight_}; }

  std::vector<std::pair<std::string, double>> metrics() const override {
    return {{"iterations", static_cast<double>(last_iterations_)}, {"residual", last_residual_}};
  }

  RoutingPlan forward(const Tensor& x, const RouterContext& ctx) override {
    Ops& ops = ctx.ops;
    const int64_t tokens = x.dim(0), experts = spec_.num_experts, k = spec_.top_k;
    expect_shape(x, {tokens, spec_.d_model}, "sinkhorn router input");
    RoutingPlan plan;
    plan.top_k = k;
    plan.logits = ops.empty(x.dtype(), {tokens, experts});
    ops.gemm(false, true, 1.0, x, weight_.value, 0.0, plan.logits);
    plan.probs = ops.empty(x.dtype(), {tokens, experts});
    ops.softmax_rows(plan.logits, 1.0, plan.probs);

    Tensor scores = plan.probs;
    if (ctx.training) scores = balance(ops, plan.probs);
    Tensor picked = ops.empty(x.dtype(), {tokens, k});
    Tensor index = ops.empty(DType::i32, {tokens, k});
    ops.topk_rows(scores, static_cast<int>(k), ctx.expert_bias, picked, index);
    plan.expert = index.reshaped({tokens * k});
    set_token_major_assignments(ops, tokens, k, plan);

    auto saved = std::make_unique<Saved>();
    saved->selected = ops.empty(x.dtype(), {tokens * k});
    ops.gather_elements(plan.probs, plan.token, plan.expert, saved->selected);
    saved->selected = saved->selected.reshaped({tokens, k});
    Tensor weight = ops.empty(x.dtype(), {tokens, k});
    if (renormalize_)
      ops.normalize_rows(saved->selected, weight);
    else
      ops.copy(saved->selected, weight);
    plan.weight = weight.reshaped({tokens * k});
    plan.context = std::move(saved);
    return plan;
  }

  void backward(const Tensor& x, const RoutingPlan& plan, const RouterGrad& grad, const RouterContext& ctx,
                Tensor& grad_x) override {
    Ops& ops = ctx.ops;
    const auto& saved = dynamic_cast<const Saved&>(*plan.context);
    const int64_t tokens = x.dim(0), experts = spec_.num_experts, k = spec_.top_k;
    Tensor dselected = ops.empty(x.dtype(), {tokens, k});
    const Tensor dweight = grad.weight.reshaped({tokens, k});
    if (renormalize_)
      ops.normalize_rows_backward(saved.selected, plan.weight.reshaped({tokens, k}), dweight, false, dselected);
    else
      ops.copy(dweight, dselected);
    Tensor dprobs = gradient_from(ops, grad.probs, x.dtype(), {tokens, experts});
    ops.scatter_add_elements(dselected.reshaped({tokens * k}), plan.token, plan.expert, dprobs);
    Tensor dlogits = gradient_from(ops, grad.logits, x.dtype(), {tokens, experts});
    ops.softmax_rows_backward(plan.probs, dprobs, 1.0, true, dlogits);
    ops.gemm(true, false, 1.0, dlogits, x, 1.0, weight_.grad);         // dW [E, d] += dlogits^T x
    ops.gemm(false, false, 1.0, dlogits, weight_.value, 1.0, grad_x);  // dx [T, d] += dlogits W
  }

 private:
  // The Sinkhorn-Knopp passes on a copy of probs (rows already sum to 1); returns the balanced K.
  Tensor balance(Ops& ops, const Tensor& probs) {
    const int64_t tokens = probs.dim(0), experts = probs.dim(1);
    const DType dtype = probs.dtype();
    const double target = static_cast<double>(tokens) / static_cast<double>(experts);
    Tensor k = ops.empty(dtype, probs.shape());
    ops.copy(probs, k);
    Tensor target_columns = ops.empty(dtype, {experts}), ones = ops.empty(dtype, {tokens});
    ops.fill(target_columns, target);
    ops.fill(ones, 1.0);
    Tensor columns = ops.empty(dtype, {experts}), column_scale = ops.empty(dtype, {experts});
    Tensor rows = ops.empty(dtype, {tokens}), row_scale = ops.empty(dtype, {tokens});
    last_iterations_ = 0;
    last_residual_ = residual(ops, k, columns, target_columns, target);
    while (last_iterations_ < iterations_ && last_residual_ > tolerance_) {
      ops.sum_rows(k, false, columns);  // column sums
      ops.divide(target_columns, columns, column_scale);
      ops.scale_columns(column_scale, k);
      ops.row_sums(k, false, rows);
      ops.divide(ones, rows, row_scale);
      ops.scale_rows(row_scale, k);
      ++last_iterations_;
      last_residual_ = residual(ops, k, columns, target_columns, target);
    }
    return k;
  }

  // sqrt(mean_e ((sum_t K[t, e] - T/E) / (T/E))^2): one scalar back from the kernel.
  static double residual(Ops& ops, const Tensor& k, Tensor& columns, const Tensor& target_columns, double target) {
    ops.sum_rows(k, false, columns);
    ops.axpy(-1.0, target_columns, columns);
    return std::sqrt(ops.sum_squares(columns) / static_cast<double>(columns.numel())) / target;
  }

  LayerSpec spec_;
  int64_t iterations_;
  double tolerance_;
  bool renormalize_;
  Parameter weight_;
  int64_t last_iterations_ = 0;
  double last_residual_ = 0;
};

}  // namespace

MOELAB_ROUTER_PLUGIN(Sinkhorn, "sinkhorn", "1.0.0",
                     "balanced token-choice top-k: Sinkhorn-Knopp selection (S-BASE), softmax combine weights")

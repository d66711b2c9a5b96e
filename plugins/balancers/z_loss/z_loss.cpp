// ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): penalises large router logits, which keeps
// the router's softmax numerically stable in low precision.
//   loss = coef * (1/T) * sum_t (logsumexp_e logits[t, e])^2
//   d loss / d logits[t, e] = coef * (2/T) * lse_t * softmax(logits_t)_e
#include <moelab/plugin.hpp>

namespace {

using namespace moelab;

class ZLoss final : public Balancer {
 public:
  static ParamSchema schema() { return {param_float("coef", 0.001, "loss coefficient (ST-MoE: 0.001)").at_least(0)}; }

  ZLoss(const ParamSet& p, const LayerSpec&, Ops&, Rng&) : coef_(p.get_float("coef")) {}

  double forward(const RoutingPlan& plan, const LayerLoad&, const RouterContext& ctx) override {
    const Tensor lse = log_sum_exp(plan, ctx.ops);
    const int64_t tokens = lse.numel();
    double sum = 0;
    for (int64_t t = 0; t < tokens; ++t) sum += host_value(lse, t) * host_value(lse, t);
    return coef_ * sum / static_cast<double>(tokens);
  }

  void backward(const RoutingPlan& plan, const LayerLoad&, const RouterContext& ctx, double grad_loss,
                RouterGrad& grad) override {
    Ops& ops = ctx.ops;
    const Tensor lse = log_sum_exp(plan, ops);
    const int64_t tokens = lse.numel();
    Tensor row_scale = host_tensor(plan.logits.dtype(), {tokens});
    for (int64_t t = 0; t < tokens; ++t)
      set_host_value(row_scale, t, grad_loss * coef_ * 2.0 * host_value(lse, t) / static_cast<double>(tokens));
    Tensor softmax = ops.empty(plan.logits.dtype(), plan.logits.shape());
    ops.softmax_rows(plan.logits, 1.0, softmax);
    ops.scale_rows(ops.to_device(row_scale), softmax);
    if (!grad.logits.defined()) grad.logits = ops.zeros(plan.logits.dtype(), plan.logits.shape());
    ops.axpy(1.0, softmax, grad.logits);
  }

 private:
  static Tensor log_sum_exp(const RoutingPlan& plan, Ops& ops) {
    Tensor lse = ops.empty(plan.logits.dtype(), {plan.logits.dim(0)});
    ops.logsumexp_rows(plan.logits, lse);
    return ops.to_host(lse);
  }
  double coef_;
};

}  // namespace

MOELAB_BALANCER_PLUGIN(ZLoss, "z_loss", "1.0.0", "ST-MoE router z-loss: coef * mean(logsumexp(logits)^2)")

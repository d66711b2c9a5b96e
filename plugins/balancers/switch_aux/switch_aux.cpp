// The Switch Transformer / GShard / Mixtral load-balancing loss:
//   loss = coef * E * sum_i f_i * P_i
// f_i: the share of routed assignments that chose expert i, counted over all k choices and before
// capacity (not differentiable); P_i: the mean router probability of expert i over the T tokens.
// f's denominator: "assignments" (T*k; f sums to 1 and a balanced router scores coef — Switch
// eq. 4 for k=1, Megatron-Core's switch_load_balancing_loss_func) or "tokens" (T; f sums to k —
// HF transformers' load_balancing_loss_func for Mixtral/Qwen-MoE, which is k times larger).
#include <fmt/format.h>

#include <moelab/plugin.hpp>
#include <numeric>

namespace {

using namespace moelab;

class SwitchAux final : public Balancer {
 public:
  static ParamSchema schema() {
    return {
        param_float("coef", 0.01, "loss coefficient alpha (Switch: 0.01)").at_least(0),
        param_choice("f_denominator", "assignments", {"assignments", "tokens"},
                     "divide expert counts by T*k (Megatron-Core) or by T (HF transformers)"),
    };
  }

  SwitchAux(const ParamSet& p, const LayerSpec& spec, Ops&, Rng&)
      : coef_(p.get_float("coef")), per_token_(p.get_string("f_denominator") == "tokens"), experts_(spec.num_experts) {}

  double forward(const RoutingPlan& plan, const LayerLoad& load, const RouterContext& ctx) override {
    const std::vector<double> f = load_fraction(load);
    Tensor mean_prob = ctx.ops.zeros(plan.probs.dtype(), {experts_});
    ctx.ops.sum_rows(plan.probs, false, mean_prob);
    const Tensor p = ctx.ops.to_host(mean_prob);
    double sum = 0;
    for (int64_t i = 0; i < experts_; ++i)
      sum += f[static_cast<size_t>(i)] * host_value(p, i) / static_cast<double>(load.tokens);
    return coef_ * static_cast<double>(experts_) * sum;
  }

  void backward(const RoutingPlan& plan, const LayerLoad& load, const RouterContext& ctx, double grad_loss,
                RouterGrad& grad) override {
    // d loss / d probs[t, i] = coef * E * f_i / T, the same for every token.
    const std::vector<double> f = load_fraction(load);
    Tensor row = host_tensor(plan.probs.dtype(), {experts_});
    for (int64_t i = 0; i < experts_; ++i)
      set_host_value(row, i,
                     grad_loss * coef_ * static_cast<double>(experts_) * f[static_cast<size_t>(i)] /
                         static_cast<double>(load.tokens));
    if (!grad.probs.defined()) grad.probs = ctx.ops.zeros(plan.probs.dtype(), plan.probs.shape());
    ctx.ops.add_row_vector(ctx.ops.to_device(row), grad.probs);
  }

 private:
  std::vector<double> load_fraction(const LayerLoad& load) const {
    const double routed =
        static_cast<double>(std::accumulate(load.routed_per_expert.begin(), load.routed_per_expert.end(), int64_t{0}));
    const double denominator = per_token_ ? static_cast<double>(load.tokens) : routed;
    std::vector<double> f(static_cast<size_t>(experts_), 0.0);
    if (denominator > 0)
      for (int64_t i = 0; i < experts_; ++i)
        f[static_cast<size_t>(i)] = static_cast<double>(load.routed_per_expert[static_cast<size_t>(i)]) / denominator;
    return f;
  }

  double coef_;
  bool per_token_;
  int64_t experts_;
};

}  // namespace

MOELAB_BALANCER_PLUGIN(SwitchAux, "switch_aux", "1.0.0",
                       "load-balancing loss coef*E*sum f_i P_i (Switch, GShard, Mixtral)")

// Router-entropy regulariser on the per-token routing distribution:
//   H_t = -sum_e p[t, e] log p[t, e]               (p = plan.probs, nats)
//   mode "minimize": loss = +coef * mean_t H_t     pushes each token towards a confident choice
//   mode "maximize": loss = -coef * mean_t H_t     keeps routing spread out (exploration)
//   d loss / d p[t, e] = -/+ coef / T * (log p[t, e] + 1)
// p = 0 contributes 0 to H (the limit of p log p) and 0 to the gradient: the limit of the logit
// gradient through a softmax, p * (g - <g, p>) with g ~ log p, is 0 as p -> 0, and a zero
// probability can only come from underflow there.
//
// Ops has no elementwise logarithm, so the sum over [T, E] runs on the host; the layer copies
// plan.probs to the host for its own statistics anyway, and for the cpu kernel it is a view.
#include <fmt/format.h>

#include <cmath>
#include <moelab/plugin.hpp>
#include <type_traits>

namespace {

using namespace moelab;

class RouterEntropy final : public Balancer {
 public:
  static ParamSchema schema() {
    return {
        param_float("coef", 0.001, "loss coefficient (the sign comes from mode)").at_least(0),
        param_choice("mode", "minimize", {"minimize", "maximize"},
                     "minimize the routing entropy (confident routing) or maximize it (spread-out routing)"),
    };
  }

  RouterEntropy(const ParamSet& p, const LayerSpec& spec, Ops&, Rng&)
      : signed_coef_(p.get_string("mode") == "minimize" ? p.get_float("coef") : -p.get_float("coef")),
        experts_(spec.num_experts) {}

  double forward(const RoutingPlan& plan, const LayerLoad&, const RouterContext& ctx) override {
    const Tensor probs = host_probs(plan, ctx.ops);
    const int64_t tokens = probs.dim(0);
    if (tokens == 0) return 0.0;
    double entropy = 0;
    with_values(probs, [&](auto* p) {
      for (int64_t i = 0; i < probs.numel(); ++i) {
        const double value = static_cast<double>(p[i]);
        check_probability(value, i);
        if (value > 0) entropy -= value * std::log(value);
      }
    });
    return signed_coef_ * entropy / static_cast<double>(tokens);
  }

  void backward(const RoutingPlan& plan, const LayerLoad&, const RouterContext& ctx, double grad_loss,
                RouterGrad& grad) override {
    Ops& ops = ctx.ops;
    const Tensor probs = host_probs(plan, ops);
    const int64_t tokens = probs.dim(0);
    if (!grad.probs.defined()) grad.probs = ops.zeros(plan.probs.dtype(), plan.probs.shape());
    if (tokens == 0) return;
    const double scale = -grad_loss * signed_coef_ / static_cast<double>(tokens);
    Tensor dprobs = host_tensor(probs.dtype(), probs.shape());  // [T, E]
    with_values(probs, [&](auto* p) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(p)>>;
      T* d = dprobs.data<T>();
      for (int64_t i = 0; i < probs.numel(); ++i) {
        const double value = static_cast<double>(p[i]);
        check_probability(value, i);
        d[i] = value > 0 ? static_cast<T>(scale * (std::log(value) + 1.0)) : T(0);
      }
    });
    ops.axpy(1.0, ops.to_device(dprobs), grad.probs);
  }

 private:
  Tensor host_probs(const RoutingPlan& plan, Ops& ops) const {
    expect_shape(plan.probs, {plan.probs.dim(0), experts_}, "entropy: router probabilities");
    return ops.to_host(plan.probs);
  }

  void check_probability(double value, int64_t index) const {
    MOELAB_CHECK(value >= 0 && value <= 1.0 + 1e-6,
                 "entropy: router probability of token {}, expert {} is {}, outside [0, 1]", index / experts_,
                 index % experts_, value);
  }

  template <class F>
  static void with_values(const Tensor& host, F&& f) {
    if (host.dtype() == DType::f32)
      f(host.data<float>());
    else if (host.dtype() == DType::f64)
      f(host.data<double>());
    else
      throw RuntimeError(fmt::format("entropy: probabilities of dtype {} are not supported", dtype_name(host.dtype())));
  }

  double signed_coef_;  // +coef to minimize the entropy, -coef to maximize it
  int64_t experts_;
};

}  // namespace

MOELAB_BALANCER_PLUGIN(RouterEntropy, "entropy", "1.0.0",
                       "router-entropy regulariser +/- coef * mean_t H(p_t) (mode minimize/maximize)")

// Shazeer et al. 2017 ("Outrageously Large Neural Networks", sec. 4 and appendix A), the
// importance and load losses of noisy top-k gating:
//   Importance_i = sum_t G(x_t)_i           the combine weights routed to expert i (eq. 6)
//   L_importance = w_importance * CV(Importance)^2
//   Load_i       = sum_t P(x_t, i)          expected tokens of expert i (eq. 8-10)
//   L_load       = w_load * CV(Load)^2      (eq. 11)
//   CV(v)^2      = var(v) / (mean(v)^2 + eps),  eps = 1e-10
// var is the population variance (divide by E), as in the authors' reference code
// (tensor2tensor's expert_utils.cv_squared); "sample" divides by E - 1 as torch's var() does in the
// common PyTorch ports. With one expert CV^2 is 0.
//
// G(x_t)_i is plan.weight, so the importance gradient flows into RouterGrad::weight.
// The load is Shazeer's smooth estimator when the router's plan.context is a NoisyGatingContext
// with smooth_load() (moelab/noisy_gating.hpp: noisy_topk in training, k < E):
//   P(x_t, i) = Phi(z),  z = (clean_{t,i} - threshold_{t,i}) / noise_std_{t,i}
//   dP/d clean = phi(z) / noise_std = -dP/d threshold,   dP/d noise_std = -phi(z) z / noise_std
// with the gradients added into RouterGrad::logits (plan.logits is clean) and the context's
// grad_noise_std / grad_threshold accumulators, which the router's backward consumes. Otherwise
// (any other router, evaluation, k = E) the load is the hard count of assignments routed to each
// expert, tensor2tensor's _gates_to_load: a count, with no gradient. Ops has no normal CDF, so P
// and its derivatives are evaluated on the host over [T, E] (a view for the cpu kernel).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <moelab/noisy_gating.hpp>
#include <moelab/plugin.hpp>
#include <numbers>
#include <numeric>

namespace {

using namespace moelab;

constexpr double kEpsilon = 1e-10;  // tensor2tensor's, guards an all-zero vector

struct CvSquared {
  double value = 0;
  std::vector<double> gradient;  // d CV^2 / d v_j
};

// CV^2 of v [n] and its gradient: with m = mean, s = sum (v - m)^2, var = s / n (or / (n - 1)),
// D = m^2 + eps:  d var / d v_j = 2 (v_j - m) / (n or n - 1),  d D / d v_j = 2 m / n.
CvSquared cv_squared(const std::vector<double>& v, bool sample_variance) {
  const size_t n = v.size();
  CvSquared out;
  out.gradient.assign(n, 0.0);
  if (n < 2) return out;
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(n);
  double squares = 0;
  for (double value : v) squares += (value - mean) * (value - mean);
  const double divisor = sample_variance ? static_cast<double>(n - 1) : static_cast<double>(n);
  const double variance = squares / divisor;
  const double denominator = mean * mean + kEpsilon;
  out.value = variance / denominator;
  for (size_t j = 0; j < n; ++j)
    out.gradient[j] = 2.0 * (v[j] - mean) / divisor / denominator -
                      variance * 2.0 * mean / static_cast<double>(n) / (denominator * denominator);
  return out;
}

class CvSquaredLoss final : public Balancer {
 public:
  static ParamSchema schema() {
    return {
        param_float("w_importance", 0.1, "coefficient of the importance loss CV(sum of gates)^2").at_least(0),
        param_float("w_load", 0.1, "coefficient of the load loss CV(load)^2").at_least(0),
        param_choice("variance", "population", {"population", "sample"},
                     "variance in CV^2: divide by E (the authors' tensor2tensor code) or by E - 1"),
    };
  }

  CvSquaredLoss(const ParamSet& p, const LayerSpec& spec, Ops&, Rng&)
      : w_importance_(p.get_float("w_importance")),
        w_load_(p.get_float("w_load")),
        sample_variance_(p.get_string("variance") == "sample"),
        experts_(spec.num_experts) {}

  double forward(const RoutingPlan& plan, const LayerLoad& load, const RouterContext& ctx) override {
    double loss = 0;
    if (w_importance_ != 0) {
      const Assignments valid = valid_assignments(plan, ctx.ops);
      loss += w_importance_ * cv_squared(importance(plan, valid, ctx.ops), sample_variance_).value;
    }
    if (w_load_ != 0) {
      const NoisyGatingContext* noisy = smooth_gating(plan);
      const std::vector<double> expert_load = noisy ? smooth_load(*noisy, ctx.ops, nullptr) : hard_load(load);
      loss += w_load_ * cv_squared(expert_load, sample_variance_).value;
    }
    return loss;
  }

  void backward(const RoutingPlan& plan, const LayerLoad&, const RouterContext& ctx, double grad_loss,
                RouterGrad& grad) override {
    // The hard load is a count: only the smooth one has a gradient.
    if (w_load_ != 0) {
      if (const NoisyGatingContext* noisy = smooth_gating(plan)) load_backward(plan, *noisy, ctx.ops, grad_loss, grad);
    }
    if (w_importance_ == 0) return;
    Ops& ops = ctx.ops;
    const int64_t assignments = plan.weight.numel();
    MOELAB_CHECK(grad.weight.defined() && grad.weight.numel() == assignments,
                 "cv_squared: the layer must allocate the combine-weight gradient [{}] before balancers run, got {}",
                 assignments, grad.weight.defined() ? grad.weight.describe() : std::string("none"));
    const Assignments valid = valid_assignments(plan, ops);
    const CvSquared cv = cv_squared(importance(plan, valid, ops), sample_variance_);
    // d loss / d weight[a] = w_importance * d CV^2 / d Importance_{expert[a]}
    Tensor per_expert = host_tensor(plan.weight.dtype(), {1, experts_});
    for (int64_t i = 0; i < experts_; ++i)
      set_host_value(per_expert, i, grad_loss * w_importance_ * cv.gradient[static_cast<size_t>(i)]);
    const Tensor per_expert_device = ops.to_device(per_expert);
    Tensor per_assignment = ops.empty(plan.weight.dtype(), {valid.count});
    ops.gather_elements(per_expert_device, valid.zeros, valid.expert, per_assignment);
    if (valid.all) {
      Tensor dweight = grad.weight.reshaped({assignments});
      ops.axpy(1.0, per_assignment, dweight);
    } else {
      Tensor dweight = grad.weight.reshaped({assignments, 1});
      ops.scatter_add_elements(per_assignment, valid.assignment, valid.zeros, dweight);
    }
  }

 private:
  // The dispatched assignments (expert >= 0) as device index lists of length count.
  struct Assignments {
    int64_t count = 0;
    bool all = true;    // every assignment is dispatched: `assignment` is 0..A-1 and unused
    Tensor assignment;  // [count] i32: index into plan.weight (only when !all)
    Tensor expert;      // [count] i32
    Tensor zeros;       // [count] i32 zeros: the row (or column) index of a [1, E] or [A, 1] view
  };

  Assignments valid_assignments(const RoutingPlan& plan, Ops& ops) const {
    const Tensor expert = ops.to_host(plan.expert);
    const int32_t* expert_of = expert.data<int32_t>();
    const int64_t assignments = expert.numel();
    MOELAB_CHECK(plan.weight.numel() == assignments, "cv_squared: {} combine weights for {} assignments",
                 plan.weight.numel(), assignments);
    std::vector<int32_t> kept_assignment, kept_expert;
    kept_assignment.reserve(static_cast<size_t>(assignments));
    kept_expert.reserve(static_cast<size_t>(assignments));
    for (int64_t a = 0; a < assignments; ++a) {
      if (expert_of[a] < 0) continue;  // not dispatched (GShard's random routing): gate 0
      MOELAB_CHECK(expert_of[a] < experts_, "cv_squared: assignment {} names expert {} of {}", a, expert_of[a],
                   experts_);
      kept_assignment.push_back(static_cast<int32_t>(a));
      kept_expert.push_back(expert_of[a]);
    }
    Assignments out;
    out.count = static_cast<int64_t>(kept_expert.size());
    out.all = out.count == assignments;
    out.expert = upload(ops, kept_expert);
    out.zeros = upload(ops, std::vector<int32_t>(kept_expert.size(), 0));
    if (!out.all) out.assignment = upload(ops, kept_assignment);
    return out;
  }

  // Importance [E]: the combine weights scattered to their experts.
  std::vector<double> importance(const RoutingPlan& plan, const Assignments& valid, Ops& ops) const {
    Tensor gates = plan.weight.reshaped({plan.weight.numel()});
    if (!valid.all) {
      gates = ops.empty(plan.weight.dtype(), {valid.count});
      ops.gather_elements(plan.weight.reshaped({plan.weight.numel(), 1}), valid.assignment, valid.zeros, gates);
    }
    Tensor sums = ops.zeros(plan.weight.dtype(), {1, experts_});
    ops.scatter_add_elements(gates, valid.zeros, valid.expert, sums);
    const Tensor host = ops.to_host(sums);
    std::vector<double> out(static_cast<size_t>(experts_));
    for (int64_t i = 0; i < experts_; ++i) out[static_cast<size_t>(i)] = host_value(host, i);
    return out;
  }

  static const NoisyGatingContext* smooth_gating(const RoutingPlan& plan) {
    const auto* noisy = dynamic_cast<const NoisyGatingContext*>(plan.context.get());
    return noisy != nullptr && noisy->smooth_load() ? noisy : nullptr;
  }

  // The host copies P's pieces come from, [T, E] each.
  struct Estimator {
    Tensor clean, noise_std, threshold;
    int64_t tokens = 0;
  };
  Estimator estimator_of(const NoisyGatingContext& noisy, Ops& ops) const {
    Estimator e{ops.to_host(noisy.clean_logits), ops.to_host(noisy.noise_std), ops.to_host(noisy.threshold), 0};
    e.tokens = e.clean.dim(0);
    expect_shape(e.clean, {e.tokens, experts_}, "cv_squared: noisy gating clean logits");
    expect_shape(e.noise_std, {e.tokens, experts_}, "cv_squared: noisy gating noise std");
    expect_shape(e.threshold, {e.tokens, experts_}, "cv_squared: noisy gating thresholds");
    return e;
  }

  // Load_i = sum_t Phi(z_{t,i}) [E]. When `density` is given it receives phi(z) / noise_std and z
  // per entry (for the backward), [T*E] each, row-major.
  struct Density {
    std::vector<double> phi_over_std, z;
  };
  std::vector<double> smooth_load(const NoisyGatingContext& noisy, Ops& ops, Density* density) const {
    const Estimator e = estimator_of(noisy, ops);
    std::vector<double> out(static_cast<size_t>(experts_), 0.0);
    if (density) {
      density->phi_over_std.assign(static_cast<size_t>(e.tokens * experts_), 0.0);
      density->z.assign(static_cast<size_t>(e.tokens * experts_), 0.0);
    }
    for (int64_t i = 0; i < e.tokens * experts_; ++i) {
      const double std_dev = host_value(e.noise_std, i);
      MOELAB_CHECK(std_dev > 0, "cv_squared: noise std of token {}, expert {} is {}, not positive", i / experts_,
                   i % experts_, std_dev);
      const double z = (host_value(e.clean, i) - host_value(e.threshold, i)) / std_dev;
      out[static_cast<size_t>(i % experts_)] += 0.5 * std::erfc(-z / std::sqrt(2.0));  // Phi(z)
      if (density) {
        density->phi_over_std[static_cast<size_t>(i)] =
            std::exp(-0.5 * z * z) / std::sqrt(2.0 * std::numbers::pi) / std_dev;
        density->z[static_cast<size_t>(i)] = z;
      }
    }
    return out;
  }

  // d (w_load CV^2(Load)) / d clean, noise_std, threshold, scaled by grad_loss, into the router's slots.
  void load_backward(const RoutingPlan& plan, const NoisyGatingContext& noisy, Ops& ops, double grad_loss,
                     RouterGrad& grad) const {
    Density density;
    const CvSquared cv = cv_squared(smooth_load(noisy, ops, &density), sample_variance_);
    const int64_t tokens = noisy.clean_logits.dim(0);
    const DType dtype = noisy.clean_logits.dtype();
    Tensor dclean = host_tensor(dtype, {tokens, experts_}), dthreshold = host_tensor(dtype, {tokens, experts_});
    Tensor dstd = host_tensor(dtype, {tokens, experts_});
    for (int64_t i = 0; i < tokens * experts_; ++i) {
      const double dload = grad_loss * w_load_ * cv.gradient[static_cast<size_t>(i % experts_)];
      const double dz = dload * density.phi_over_std[static_cast<size_t>(i)];  // d loss / d (clean - threshold)
      set_host_value(dclean, i, dz);
      set_host_value(dthreshold, i, -dz);
      set_host_value(dstd, i, -dz * density.z[static_cast<size_t>(i)]);
    }
    if (!grad.logits.defined()) grad.logits = ops.zeros(plan.logits.dtype(), plan.logits.shape());
    ops.axpy(1.0, ops.to_device(dclean), grad.logits);
    ops.axpy(1.0, ops.to_device(dstd), noisy.grad_noise_std(ops));
    ops.axpy(1.0, ops.to_device(dthreshold), noisy.grad_threshold(ops));
  }

  std::vector<double> hard_load(const LayerLoad& load) const {
    MOELAB_CHECK(static_cast<int64_t>(load.routed_per_expert.size()) == experts_,
                 "cv_squared: load of {} experts for a layer of {}", load.routed_per_expert.size(), experts_);
    return std::vector<double>(load.routed_per_expert.begin(), load.routed_per_expert.end());
  }

  static Tensor upload(Ops& ops, const std::vector<int32_t>& values) {
    Tensor host = host_tensor(DType::i32, {static_cast<int64_t>(values.size())});
    std::copy(values.begin(), values.end(), host.data<int32_t>());
    return ops.to_device(host);
  }

  double w_importance_, w_load_;
  bool sample_variance_;
  int64_t experts_;
};

}  // namespace

MOELAB_BALANCER_PLUGIN(CvSquaredLoss, "cv_squared", "1.0.0",
                       "Shazeer 2017 importance and load losses w * CV^2 (noisy top-k gating)")

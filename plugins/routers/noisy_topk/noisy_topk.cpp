// Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", sec. 2.1, eq. 3-5):
//   clean     = x W_gate^T                                   x [T, d], W_gate, W_noise [E, d]
//   noise_std = softplus(x W_noise^T) + min_noise_std        [T, E]
//   H         = clean + StandardNormal() * noise_std         training only; H = clean in evaluation
//   G         = softmax(KeepTopK(H, k))                      -inf outside the top k, so the softmax
//                                                            runs over the k kept entries only
// min_noise_std is the authors' tensor2tensor code's noise_epsilon (expert_utils.noisy_top_k_gating,
// 1e-2): it keeps the load estimator's division by noise_std finite. The paper initialises W_gate
// and W_noise to zero ("no signal and some noise"); init_std = 0 reproduces that.
//
// What the plan holds:
//   plan.logits = clean (what a z-loss should penalise: the noise is not the router's output)
//   plan.probs  = softmax(H) over all E experts (the gate distribution the noise acts on; balancers
//                 in the Switch family read it; in evaluation it is softmax(clean))
//   plan.weight = G at the k kept experts, in descending H order (rank = position)
// plan.context is a NoisyGatingContext (moelab/noisy_gating.hpp): the clean logits, noise std and
// kth_excluding thresholds of the smooth load estimator P(x, i) (eq. 8-10), plus the gradient
// buffers through which a balancer's load loss reaches this router's backward.
#include <moelab/noisy_gating.hpp>
#include <moelab/plugin.hpp>

namespace {

using namespace moelab;

struct Saved : NoisyGatingContext {
  Tensor noise_input;     // [T, E] x W_noise^T, the softplus's argument
  Tensor noise;           // [T, E] the standard normal draws
  Tensor noisy_logits;    // [T, E] H (aliases clean_logits when !noisy)
  Tensor selected;        // [T, k] H at the kept experts
  Tensor rows;            // [T] i32 0..T-1
  Tensor extended_index;  // [T, k+1] i32 the k+1 largest H (thresholds); undefined when k = E
  Tensor in_top_k;        // [T, E] 1 at the kept experts, 0 elsewhere; undefined when k = E
};

// An i32 device tensor filled on the host by f(i).
template <class F>
Tensor index_tensor(Ops& ops, const Shape& shape, F&& f) {
  Tensor host = host_tensor(DType::i32, shape);
  int32_t* p = host.data<int32_t>();
  for (int64_t i = 0; i < host.numel(); ++i) p[i] = static_cast<int32_t>(f(i));
  return ops.to_device(host);
}

class NoisyTopK final : public Router {
 public:
  static ParamSchema schema() {
    return {
        param_bool("noisy", true, "add the learned Gaussian noise in training (false: plain top-k of clean logits)"),
        param_float("min_noise_std", 1e-2, "added to softplus(x W_noise) (tensor2tensor's noise_epsilon)").at_least(0),
        param_float("init_std", 0.0,
                    "standard deviation of W_gate's and W_noise's initialisation (the paper: 0, all zeros)")
            .at_least(0),
    };
  }

  static void check(const ParamSet&, const LayerSpec& spec, ParamProblems& problems) {
    if (spec.top_k > spec.num_experts)
      problems.push_back(
          {"top_k", fmt::format("must be at most num_experts ({}), got {}", spec.num_experts, spec.top_k)});
  }

  NoisyTopK(const ParamSet& p, const LayerSpec& spec, Ops& ops, Rng& rng)
      : spec_(spec),
        noisy_(p.get_bool("noisy")),
        min_noise_std_(p.get_float("min_noise_std")),
        gate_(
            make_parameter(ops, "weight", spec.dtype, {spec.num_experts, spec.d_model}, rng, p.get_float("init_std"))),
        noise_(make_parameter(ops, "noise_weight", spec.dtype, {spec.num_experts, spec.d_model}, rng,
                              p.get_float("init_std"))) {}

  std::vector<Parameter*> parameters() override { return {&gate_, &noise_}; }

  RoutingPlan forward(const Tensor& x, const RouterContext& ctx) override {
    Ops& ops = ctx.ops;
    const int64_t tokens = x.dim(0), experts = spec_.num_experts, k = spec_.top_k;
    expect_shape(x, {tokens, spec_.d_model}, "noisy_topk router input");
    auto saved = std::make_unique<Saved>();
    saved->top_k = k;
    saved->noisy = ctx.training && noisy_;

    RoutingPlan plan;
    plan.top_k = k;
    plan.logits = ops.empty(x.dtype(), {tokens, experts});
    linear_gate_forward(ops, x, gate_, plan.logits);
    saved->clean_logits = plan.logits;
    saved->noisy_logits = plan.logits;
    if (saved->noisy) {
      saved->noise_input = ops.empty(x.dtype(), {tokens, experts});
      ops.gemm(false, true, 1.0, x, noise_.value, 0.0, saved->noise_input);
      saved->noise_std = ops.empty(x.dtype(), {tokens, experts});
      ops.softplus(saved->noise_input, saved->noise_std);
      Tensor min_std = ops.empty(x.dtype(), {experts});
      ops.fill(min_std, min_noise_std_);
      ops.add_row_vector(min_std, saved->noise_std);
      // Drawn token-major on the host from the layer's stream: the same on every kernel.
      Tensor draws = host_tensor(x.dtype(), {tokens, experts});
      fill_normal(draws, 1.0, ctx.rng);
      saved->noise = ops.to_device(draws);
      saved->noisy_logits = ops.empty(x.dtype(), {tokens, experts});
      ops.mul(saved->noise, saved->noise_std, saved->noisy_logits);
      ops.axpy(1.0, plan.logits, saved->noisy_logits);
    }
    plan.probs = ops.empty(x.dtype(), {tokens, experts});
    ops.softmax_rows(saved->noisy_logits, 1.0, plan.probs);

    saved->selected = ops.empty(x.dtype(), {tokens, k});
    Tensor index = ops.empty(DType::i32, {tokens, k});
    ops.topk_rows(saved->noisy_logits, static_cast<int>(k), nullptr, saved->selected, index);
    Tensor weight = ops.empty(x.dtype(), {tokens, k});
    ops.softmax_rows(saved->selected, 1.0, weight);
    plan.expert = index.reshaped({tokens * k});
    plan.weight = weight.reshaped({tokens * k});
    set_token_major_assignments(ops, tokens, k, plan);
    if (saved->noisy && k < experts) set_thresholds(ops, plan, *saved);
    plan.context = std::move(saved);
    return plan;
  }

  void backward(const Tensor& x, const RoutingPlan& plan, const RouterGrad& grad, const RouterContext& ctx,
                Tensor& grad_x) override {
    Ops& ops = ctx.ops;
    const auto& saved = dynamic_cast<const Saved&>(*plan.context);
    const int64_t tokens = x.dim(0), experts = spec_.num_experts, k = spec_.top_k;

    // dH [T, E]: from the softmax over the kept k, from probs = softmax(H), and from the thresholds.
    Tensor dselected = ops.empty(x.dtype(), {tokens, k});
    ops.softmax_rows_backward(plan.weight.reshaped({tokens, k}), grad.weight.reshaped({tokens, k}), 1.0, false,
                              dselected);
    Tensor dnoisy = ops.zeros(x.dtype(), {tokens, experts});
    ops.scatter_add_elements(dselected.reshaped({tokens * k}), plan.token, plan.expert, dnoisy);
    if (grad.probs.defined()) ops.softmax_rows_backward(plan.probs, grad.probs, 1.0, true, dnoisy);
    if (saved.added_grad_threshold().defined()) {
      MOELAB_CHECK(saved.threshold.defined(),
                   "noisy_topk: a balancer added a threshold gradient to a plan without thresholds");
      threshold_backward(ops, saved, saved.added_grad_threshold(), dnoisy);
    }

    // H = clean + noise * noise_std:  d clean = dH (+ balancers' dL/d logits), d noise_std = noise * dH.
    Tensor dclean = ops.empty(x.dtype(), {tokens, experts});
    ops.copy(dnoisy, dclean);
    if (grad.logits.defined()) ops.axpy(1.0, grad.logits, dclean);
    linear_gate_backward(ops, x, dclean, gate_, grad_x);
    if (saved.noisy) {
      Tensor dstd = ops.empty(x.dtype(), {tokens, experts});
      ops.mul(saved.noise, dnoisy, dstd);
      if (saved.added_grad_noise_std().defined()) ops.axpy(1.0, saved.added_grad_noise_std(), dstd);
      Tensor dnoise_input = ops.empty(x.dtype(), {tokens, experts});
      ops.softplus_backward(saved.noise_input, dstd, false, dnoise_input);
      linear_gate_backward(ops, x, dnoise_input, noise_, grad_x);
    } else {
      MOELAB_CHECK(!saved.added_grad_noise_std().defined(),
                   "noisy_topk: a balancer added a noise-std gradient to a plan made without noise");
    }
    saved.clear_added_grads();
  }

 private:
  // threshold[t, i] = kth_excluding(H_t, k, i): H_t's (k+1)-th largest when i is kept, its k-th
  // largest otherwise (Shazeer et al. eq. 9; tensor2tensor's _prob_in_top_k). topk_rows with k+1
  // breaks ties as the selection's topk_rows did, so its first k are the kept experts.
  void set_thresholds(Ops& ops, const RoutingPlan& plan, Saved& saved) const {
    const int64_t tokens = plan.logits.dim(0), experts = spec_.num_experts, k = spec_.top_k;
    Tensor extended_values = ops.empty(plan.logits.dtype(), {tokens, k + 1});
    saved.extended_index = ops.empty(DType::i32, {tokens, k + 1});
    ops.topk_rows(saved.noisy_logits, static_cast<int>(k + 1), nullptr, extended_values, saved.extended_index);
    saved.rows = index_tensor(ops, {tokens}, [](int64_t t) { return t; });
    Tensor kth = ops.empty(plan.logits.dtype(), {tokens});
    Tensor next = ops.empty(plan.logits.dtype(), {tokens});
    ops.gather_elements(extended_values, saved.rows, column(ops, tokens, k - 1), kth);
    ops.gather_elements(extended_values, saved.rows, column(ops, tokens, k), next);

    saved.in_top_k = ops.zeros(plan.logits.dtype(), {tokens, experts});
    Tensor ones = ops.empty(plan.logits.dtype(), {tokens * k});
    ops.fill(ones, 1.0);
    ops.scatter_add_elements(ones, plan.token, plan.expert, saved.in_top_k);
    // threshold = in_top_k * next[t] + (1 - in_top_k) * kth[t]
    saved.threshold = ops.empty(plan.logits.dtype(), {tokens, experts});
    ops.fill(saved.threshold, 1.0);
    ops.axpy(-1.0, saved.in_top_k, saved.threshold);
    ops.scale_rows(kth, saved.threshold);
    Tensor kept = ops.empty(plan.logits.dtype(), {tokens, experts});
    ops.copy(saved.in_top_k, kept);
    ops.scale_rows(next, kept);
    ops.axpy(1.0, kept, saved.threshold);
  }

  // dL/d threshold [T, E] summed per row over the kept entries (-> the (k+1)-th largest H) and
  // the others (-> the k-th largest H), added into dH at those entries.
  void threshold_backward(Ops& ops, const Saved& saved, const Tensor& dthreshold, Tensor& dnoisy) const {
    const int64_t tokens = dthreshold.dim(0), experts = spec_.num_experts, k = spec_.top_k;
    Tensor out_of_top_k = ops.empty(dthreshold.dtype(), {tokens, experts});
    ops.fill(out_of_top_k, 1.0);
    ops.axpy(-1.0, saved.in_top_k, out_of_top_k);
    Tensor dkth = ops.empty(dthreshold.dtype(), {tokens});
    Tensor dnext = ops.empty(dthreshold.dtype(), {tokens});
    ops.row_dot(dthreshold, out_of_top_k, dkth);
    ops.row_dot(dthreshold, saved.in_top_k, dnext);
    Tensor dextended = ops.zeros(dthreshold.dtype(), {tokens, k + 1});
    ops.scatter_add_elements(dkth, saved.rows, column(ops, tokens, k - 1), dextended);
    ops.scatter_add_elements(dnext, saved.rows, column(ops, tokens, k), dextended);
    const Tensor extended_rows = index_tensor(ops, {tokens * (k + 1)}, [k](int64_t i) { return i / (k + 1); });
    ops.scatter_add_elements(dextended.reshaped({tokens * (k + 1)}), extended_rows,
                             saved.extended_index.reshaped({tokens * (k + 1)}), dnoisy);
  }

  // [T] i32 filled with `j`: column j of every row, for gather/scatter_add_elements.
  static Tensor column(Ops& ops, int64_t tokens, int64_t j) {
    return index_tensor(ops, {tokens}, [j](int64_t) { return j; });
  }

  LayerSpec spec_;
  bool noisy_;
  double min_noise_std_;
  Parameter gate_, noise_;
};

}  // namespace

MOELAB_ROUTER_PLUGIN(NoisyTopK, "noisy_topk", "1.0.0",
                     "Shazeer 2017 noisy top-k gating: learned Gaussian noise on the logits, softmax over the kept k")

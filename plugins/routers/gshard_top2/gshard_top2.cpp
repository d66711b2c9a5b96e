// GShard top-2 gating (Lepikhin et al. 2020, "GShard", Algorithm 1; Mesh-TensorFlow's
// moe._top_2_gating):
//   gates  = softmax(x W^T)                         x [T, d], W [E, d]          (plan.probs)
//   e1     = argmax gates, e2 = argmax of the rest (ties: lower index)
//   g1, g2 = gates[e1], gates[e2] normalised over the pair: g / (g1 + g2)      (the combine weights)
//   the second expert is dispatched only when rnd < g2 / second_threshold, rnd ~ U[0, 1)
// With second_threshold = 0.5 that is the paper's "2 * g2 > rnd": probability min(1, 2 g2) of the
// normalised g2. An undispatched second choice keeps its assignment with expert = -1 (its weight
// stays in the plan, so the first gate is still g1 / (g1 + g2), as in the paper). Policies, as
// Mesh-TF's second_policy_train / second_policy_eval: "random" (the rule above) or "all" (always
// dispatch). A selection bias (ctx.expert_bias, from aux_free_bias) ranks gates + bias and leaves
// the weights unbiased, as in softmax_topk. The capacity limit and the auxiliary loss are the layer's and the
// switch_aux balancer's business.
#include <moelab/plugin.hpp>

namespace {

using namespace moelab;

struct Saved : ForwardContext {
  Tensor selected;  // [T, 2] gates[e1], gates[e2]
  Tensor chosen;    // [2T] i32 e1, e2 per token (plan.expert before random dispatch set some to -1)
};

class GShardTop2 final : public Router {
 public:
  static ParamSchema schema() {
    return {
        param_choice("second_policy", "random", {"random", "all"},
                     "training: dispatch the second expert with probability min(1, g2 / second_threshold), or always"),
        param_choice("eval_second_policy", "all", {"random", "all"}, "the same choice in evaluation"),
        param_float("second_threshold", 0.5, "g2 at which the second expert is always dispatched (GShard: 0.5)")
            .range(1e-9, 1.0),
        param_float("init_std", 0.02, "standard deviation of the router weight's initialisation").at_least(0),
    };
  }

  static void check(const ParamSet&, const LayerSpec& spec, ParamProblems& problems) {
    if (spec.top_k != 2)
      problems.push_back(
          {"top_k", fmt::format("gshard_top2 routes every token to 2 experts; top_k must be 2, got {}", spec.top_k)});
    if (spec.num_experts < 2)
      problems.push_back(
          {"num_experts", fmt::format("gshard_top2 needs at least 2 experts, got {}", spec.num_experts)});
  }

  GShardTop2(const ParamSet& p, const LayerSpec& spec, Ops& ops, Rng& rng)
      : spec_(spec),
        random_in_training_(p.get_string("second_policy") == "random"),
        random_in_eval_(p.get_string("eval_second_policy") == "random"),
        second_threshold_(p.get_float("second_threshold")),
        weight_(
            make_parameter(ops, "weight", spec.dtype, {spec.num_experts, spec.d_model}, rng, p.get_float("init_std"))) {
    MOELAB_CHECK(spec.top_k == 2, "gshard_top2 built for top_k = {} (its check requires 2)", spec.top_k);
  }

  std::vector<Parameter*> parameters() override { return {&weight_}; }

  RoutingPlan forward(const Tensor& x, const RouterContext& ctx) override {
    Ops& ops = ctx.ops;
    const int64_t tokens = x.dim(0), experts = spec_.num_experts;
    expect_shape(x, {tokens, spec_.d_model}, "gshard_top2 router input");
    auto saved = std::make_unique<Saved>();
    RoutingPlan plan;
    plan.top_k = 2;
    plan.logits = ops.empty(x.dtype(), {tokens, experts});
    linear_gate_forward(ops, x, weight_, plan.logits);
    plan.probs = ops.empty(x.dtype(), {tokens, experts});
    ops.softmax_rows(plan.logits, 1.0, plan.probs);

    saved->selected = ops.empty(x.dtype(), {tokens, 2});
    Tensor index = ops.empty(DType::i32, {tokens, 2});
    ops.topk_rows(plan.probs, 2, ctx.expert_bias, saved->selected, index);
    Tensor weight = ops.empty(x.dtype(), {tokens, 2});
    ops.normalize_rows(saved->selected, weight);
    plan.weight = weight.reshaped({tokens * 2});
    saved->chosen = index.reshaped({tokens * 2});
    plan.expert = saved->chosen;
    if (ctx.training ? random_in_training_ : random_in_eval_) plan.expert = random_second(ops, plan, ctx.rng);
    set_token_major_assignments(ops, tokens, 2, plan);
    plan.context = std::move(saved);
    return plan;
  }

  void backward(const Tensor& x, const RoutingPlan& plan, const RouterGrad& grad, const RouterContext& ctx,
                Tensor& grad_x) override {
    Ops& ops = ctx.ops;
    const auto& saved = dynamic_cast<const Saved&>(*plan.context);
    const int64_t tokens = x.dim(0), experts = spec_.num_experts;
    // weight = normalize(selected); selected = probs at (e1, e2), whether or not e2 was dispatched:
    // the scatter goes to the chosen expert, which plan.expert no longer names when it is -1, so
    // the top-2 indices are recovered from the forward's record.
    Tensor dselected = ops.empty(x.dtype(), {tokens, 2});
    ops.normalize_rows_backward(saved.selected, plan.weight.reshaped({tokens, 2}), grad.weight.reshaped({tokens, 2}),
                                false, dselected);
    Tensor dprobs = gradient_from(ops, grad.probs, x.dtype(), {tokens, experts});
    ops.scatter_add_elements(dselected.reshaped({tokens * 2}), plan.token, saved.chosen, dprobs);
    Tensor dlogits = gradient_from(ops, grad.logits, x.dtype(), {tokens, experts});
    ops.softmax_rows_backward(plan.probs, dprobs, 1.0, true, dlogits);
    linear_gate_backward(ops, x, dlogits, weight_, grad_x);
  }

 private:
  // plan.expert with the second choice set to -1 where rnd >= g2 / second_threshold. One uniform
  // per token, drawn in token order from the layer's stream (host bookkeeping on [T, 2]).
  Tensor random_second(Ops& ops, const RoutingPlan& plan, Rng& rng) const {
    Tensor expert = ops.to_host(plan.expert);
    const Tensor weight = ops.to_host(plan.weight);
    Tensor out = host_tensor(DType::i32, expert.shape());
    int32_t* dst = out.data<int32_t>();
    std::copy_n(expert.data<int32_t>(), expert.numel(), dst);
    for (int64_t t = 0; t < expert.numel() / 2; ++t) {
      const double rnd = rng.uniform();
      if (!(rnd < host_value(weight, 2 * t + 1) / second_threshold_)) dst[2 * t + 1] = -1;
    }
    return ops.to_device(out);
  }

  LayerSpec spec_;
  bool random_in_training_, random_in_eval_;
  double second_threshold_;
  Parameter weight_;
};

}  // namespace

MOELAB_ROUTER_PLUGIN(
    GShardTop2, "gshard_top2", "1.0.0",
    "GShard top-2 gating: pair-normalised gates, second expert dispatched with probability min(1, 2 g2)")

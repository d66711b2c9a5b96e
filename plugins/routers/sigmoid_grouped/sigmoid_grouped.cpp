// DeepSeek-style group-limited routing: V3's sigmoid gate (DeepSeek-V3 report, sec. 2.1.2, eq.
// 12-16; HF transformers' DeepseekV3TopkRouter) and, with score = "softmax", V2's (HF's
// DeepseekV2 MoEGate, topk_method = "group_limited_greedy").
//   logits = x W^T                          x [T, d], W [E, d] (HF: gate.weight)
//   s      = sigmoid(logits)  (V3)  or  softmax(logits)  (V2)            [T, E]
//   keys   = s + b, b = ctx.expert_bias (aux_free_bias; V3's e_score_correction_bias): b only
//            ranks, it never enters a weight
//   groups: E experts in n_group contiguous groups; a group's score is the sum of its top-2 keys
//            (V3, group_score = "top2_sum") or its largest key (V2, "max"); the topk_group best
//            groups stay eligible, the k best keys among them are chosen (Ops::grouped_topk_rows)
//   weight = s at the chosen experts, divided by their sum when normalize (V3 and V2 with
//            norm_topk_prob), times routed_scaling_factor
// HF's reference masks dropped groups with 0.0 (so, with a negative bias, a dropped expert can win);
// DeepSeek's own inference code masks with -inf, as we do: dropped groups are never chosen.
// Settings of the released models:
//   DeepSeek-V3:  score sigmoid, top2_sum, n_group 8, topk_group 4, k 8 of 256, normalize, 2.5
//   DeepSeek-V2:  score softmax, max, n_group 8, topk_group 3, k 6 of 160, normalize false, 16.0
//   V2-Lite:      score softmax, n_group 1, topk_group 1 (no group limit), k 6 of 64, false, 1.0
// (V2's code scales only when it does not normalise; V3's does both; both are this formula.)
//
// plan.probs, what seq_aux / switch_aux read: the scores normalised per token, s / sum_e s (V3's
// sequence-wise balance loss, eq. 17-20, uses exactly this); for softmax scores that is s itself.
#include <moelab/plugin.hpp>

namespace {

using namespace moelab;

struct Saved : ForwardContext {
  Tensor scores;      // [T, E] s
  Tensor selected;    // [T, k] s at the chosen experts
  Tensor normalized;  // [T, k] selected / its row sum (when normalize)
};

class SigmoidGrouped final : public Router {
 public:
  static ParamSchema schema() {
    return {
        param_choice("score", "sigmoid", {"sigmoid", "softmax"}, "the gate: sigmoid (DeepSeek-V3) or softmax (V2)"),
        param_int("n_group", 1, "expert groups (V3: 8); 1 disables group limiting").at_least(1),
        param_int("topk_group", 1, "groups each token may use (V3: 4)").at_least(1),
        param_choice("group_score", "top2_sum", {"top2_sum", "max"},
                     "a group's score: the sum of its two best biased scores (V3) or its best (V2)"),
        param_bool("normalize", true, "divide the k selected scores by their sum (V3: true; V2: false)"),
        param_float("routed_scaling_factor", 2.5, "multiplies the combine weights (V3: 2.5; V2: 16.0)").at_least(0),
        param_float("init_std", 0.006, "standard deviation of the router weight's initialisation (V3: 0.006)")
            .at_least(0),
    };
  }

  static void check(const ParamSet& p, const LayerSpec& spec, ParamProblems& problems) {
    const int64_t experts = spec.num_experts, groups = p.get_int("n_group"), keep = p.get_int("topk_group");
    if (experts % groups != 0) {
      problems.push_back(
          {"n_group", fmt::format("num_experts ({}) must be divisible by n_group, got {}", experts, groups)});
      return;
    }
    if (keep > groups) {
      problems.push_back({"topk_group", fmt::format("must be at most n_group ({}), got {}", groups, keep)});
      return;
    }
    const int64_t group_size = experts / groups;
    if (p.get_string("group_score") == "top2_sum" && group_size < 2)
      problems.push_back({"group_score", fmt::format("\"top2_sum\" needs at least 2 experts per group; num_experts {} "
                                                     "/ n_group {} = {}; use \"max\" or fewer groups",
                                                     experts, groups, group_size)});
    if (spec.top_k > keep * group_size)
      problems.push_back({"topk_group", fmt::format("top_k ({}) must be at most topk_group * num_experts / n_group "
                                                    "= {} * {} = {}",
                                                    spec.top_k, keep, group_size, keep * group_size)});
  }

  SigmoidGrouped(const ParamSet& p, const LayerSpec& spec, Ops& ops, Rng& rng)
      : spec_(spec),
        sigmoid_(p.get_string("score") == "sigmoid"),
        groups_(static_cast<int>(p.get_int("n_group"))),
        keep_groups_(static_cast<int>(p.get_int("topk_group"))),
        group_top_(p.get_string("group_score") == "top2_sum" ? 2 : 1),
        normalize_(p.get_bool("normalize")),
        scaling_(p.get_float("routed_scaling_factor")),
        weight_(make_parameter(ops, "weight", spec.dtype, {spec.num_experts, spec.d_model}, rng,
                               p.get_float("init_std"))) {}

  std::vector<Parameter*> parameters() override { return {&weight_}; }

  RoutingPlan forward(const Tensor& x, const RouterContext& ctx) override {
    Ops& ops = ctx.ops;
    const int64_t tokens = x.dim(0), experts = spec_.num_experts, k = spec_.top_k;
    expect_shape(x, {tokens, spec_.d_model}, "sigmoid_grouped router input");
    auto saved = std::make_unique<Saved>();
    RoutingPlan plan;
    plan.top_k = k;
    plan.logits = ops.empty(x.dtype(), {tokens, experts});
    linear_gate_forward(ops, x, weight_, plan.logits);
    saved->scores = ops.empty(x.dtype(), {tokens, experts});
    if (sigmoid_) {
      ops.sigmoid(plan.logits, saved->scores);
      plan.probs = ops.empty(x.dtype(), {tokens, experts});
      ops.normalize_rows(saved->scores, plan.probs);
    } else {
      ops.softmax_rows(plan.logits, 1.0, saved->scores);
      plan.probs = saved->scores;
    }

    saved->selected = ops.empty(x.dtype(), {tokens, k});
    Tensor index = ops.empty(DType::i32, {tokens, k});
    ops.grouped_topk_rows(saved->scores, static_cast<int>(k), ctx.expert_bias, groups_, keep_groups_, group_top_,
                          saved->selected, index);
    Tensor weight = ops.empty(x.dtype(), {tokens, k});
    if (normalize_) {
      saved->normalized = ops.empty(x.dtype(), {tokens, k});
      ops.normalize_rows(saved->selected, saved->normalized);
      ops.copy(saved->normalized, weight);
    } else {
      ops.copy(saved->selected, weight);
    }
    ops.scale(scaling_, weight);
    plan.expert = index.reshaped({tokens * k});
    plan.weight = weight.reshaped({tokens * k});
    set_token_major_assignments(ops, tokens, k, plan);
    plan.context = std::move(saved);
    return plan;
  }

  void backward(const Tensor& x, const RoutingPlan& plan, const RouterGrad& grad, const RouterContext& ctx,
                Tensor& grad_x) override {
    Ops& ops = ctx.ops;
    const auto& saved = dynamic_cast<const Saved&>(*plan.context);
    const int64_t tokens = x.dim(0), experts = spec_.num_experts, k = spec_.top_k;
    // weight = scaling * (normalize ? normalized(selected) : selected)
    Tensor dweight = ops.empty(x.dtype(), {tokens, k});
    ops.copy(grad.weight.reshaped({tokens, k}), dweight);
    ops.scale(scaling_, dweight);
    Tensor dselected = dweight;
    if (normalize_) {
      dselected = ops.empty(x.dtype(), {tokens, k});
      ops.normalize_rows_backward(saved.selected, saved.normalized, dweight, false, dselected);
    }
    Tensor dscores = ops.zeros(x.dtype(), {tokens, experts});
    ops.scatter_add_elements(dselected.reshaped({tokens * k}), plan.token, plan.expert, dscores);
    if (grad.probs.defined()) {
      if (sigmoid_)
        ops.normalize_rows_backward(saved.scores, plan.probs, grad.probs, true, dscores);
      else
        ops.axpy(1.0, grad.probs, dscores);
    }
    Tensor dlogits = gradient_from(ops, grad.logits, x.dtype(), {tokens, experts});
    if (sigmoid_)
      ops.sigmoid_backward(saved.scores, dscores, true, dlogits);
    else
      ops.softmax_rows_backward(saved.scores, dscores, 1.0, true, dlogits);
    linear_gate_backward(ops, x, dlogits, weight_, grad_x);
  }

 private:
  LayerSpec spec_;
  bool sigmoid_;
  int groups_, keep_groups_, group_top_;
  bool normalize_;
  double scaling_;
  Parameter weight_;
};

}  // namespace

MOELAB_ROUTER_PLUGIN(SigmoidGrouped, "sigmoid_grouped", "1.0.0",
                     "DeepSeek-V3 sigmoid (or V2 softmax) gating with group-limited top-k and a selection-only bias")

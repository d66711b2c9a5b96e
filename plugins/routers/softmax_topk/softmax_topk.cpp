// Token-choice top-k over a softmax of linear router logits: Switch (k=1), GShard-style top-2
// without random routing, Mixtral, OLMoE, Qwen-MoE, DeepSeekMoE.
//   logits = x W^T                       x [T, d], W [E, d] (HF: gate.weight)
//   probs  = softmax(logits / temperature)
//   order "softmax_topk": weights = top-k of probs, optionally renormalised over the k
//                         (Mixtral, OLMoE, Qwen3: renormalize = true; Qwen1.5-MoE, DeepSeekMoE: false)
//   order "topk_softmax": weights = softmax over the k selected logits (Mistral's reference
//                         Mixtral code); identical to "softmax_topk" with renormalize = true.
// Switch's multiplicative jitter multiplies x by U(1 - eps, 1 + eps) elementwise, in training only.
#include <moelab/plugin.hpp>

namespace {

using namespace moelab;

struct Saved : ForwardContext {
  Tensor router_input;  // [T, d]: x, or x * jitter
  Tensor jitter;        // [T, d] or undefined
  Tensor selected;      // [T, k]: the k probs ("softmax_topk") or logits ("topk_softmax") chosen
};

class SoftmaxTopK final : public Router {
 public:
  static ParamSchema schema() {
    return {
        param_bool("renormalize", false, "renormalise the k selected probabilities to sum to 1"),
        param_choice("order", "softmax_topk", {"softmax_topk", "topk_softmax"},
                     "softmax over all experts then top-k, or top-k of the logits then softmax over those k"),
        param_float("jitter_eps", 0.0, "Switch's multiplicative input jitter: x * U(1-eps, 1+eps) in training")
            .range(0.0, 1.0),
        param_float("temperature", 1.0, "softmax temperature (logits are divided by it)").at_least(1e-6),
        param_float("init_std", 0.02, "standard deviation of the router weight's initialisation").at_least(0),
    };
  }

  SoftmaxTopK(const ParamSet& p, const LayerSpec& spec, Ops& ops, Rng& rng)
      : spec_(spec),
        renormalize_(p.get_bool("renormalize")),
        softmax_first_(p.get_string("order") == "softmax_topk"),
        jitter_eps_(p.get_float("jitter_eps")),
        temperature_(p.get_float("temperature")),
        weight_(make_parameter(ops, "weight", spec.dtype, {spec.num_experts, spec.d_model}, rng,
                               p.get_float("init_std"))) {}

  std::vector<Parameter*> parameters() override { return {&weight_}; }

  RoutingPlan forward(const Tensor& x, const RouterContext& ctx) override {
    Ops& ops = ctx.ops;
    const int64_t tokens = x.dim(0), experts = spec_.num_experts, k = spec_.top_k;
    expect_shape(x, {tokens, spec_.d_model}, "softmax_topk router input");
    auto saved = std::make_unique<Saved>();
    saved->router_input = x;
    if (ctx.training && jitter_eps_ > 0) {
      Tensor noise = host_tensor(x.dtype(), x.shape());
      fill_uniform(noise, 1.0 - jitter_eps_, 1.0 + jitter_eps_, ctx.rng);
      saved->jitter = ops.to_device(noise);
      saved->router_input = ops.empty(x.dtype(), x.shape());
      ops.mul(x, saved->jitter, saved->router_input);
    }
    RoutingPlan plan;
    plan.top_k = k;
    plan.logits = ops.empty(x.dtype(), {tokens, experts});
    ops.gemm(false, true, 1.0, saved->router_input, weight_.value, 0.0, plan.logits);
    plan.probs = ops.empty(x.dtype(), {tokens, experts});
    ops.softmax_rows(plan.logits, temperature_, plan.probs);

    saved->selected = ops.empty(x.dtype(), {tokens, k});
    Tensor index = ops.empty(DType::i32, {tokens, k});
    ops.topk_rows(softmax_first_ ? plan.probs : plan.logits, static_cast<int>(k), ctx.expert_bias, saved->selected,
                  index);
    Tensor weight = ops.empty(x.dtype(), {tokens, k});
    if (!softmax_first_)
      ops.softmax_rows(saved->selected, temperature_, weight);
    else if (renormalize_)
      ops.normalize_rows(saved->selected, weight);
    else
      ops.copy(saved->selected, weight);

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
    const Tensor weight = plan.weight.reshaped({tokens, k});
    const Tensor dweight = grad.weight.reshaped({tokens, k});

    // d(selected) from d(weight), then scattered back to the full [T, E] matrix it came from.
    Tensor dselected = ops.empty(x.dtype(), {tokens, k});
    if (!softmax_first_)
      ops.softmax_rows_backward(weight, dweight, temperature_, false, dselected);
    else if (renormalize_)
      ops.normalize_rows_backward(saved.selected, weight, dweight, false, dselected);
    else
      ops.copy(dweight, dselected);

    Tensor dlogits = gradient_from(ops, grad.logits, x.dtype(), {tokens, experts});
    Tensor dprobs = gradient_from(ops, grad.probs, x.dtype(), {tokens, experts});
    const Tensor flat_dselected = dselected.reshaped({tokens * k});
    ops.scatter_add_elements(flat_dselected, plan.token, plan.expert, softmax_first_ ? dprobs : dlogits);
    ops.softmax_rows_backward(plan.probs, dprobs, temperature_, true, dlogits);

    // logits = input W^T: dW += dlogits^T input, d(input) = dlogits W.
    ops.gemm(true, false, 1.0, dlogits, saved.router_input, 1.0, weight_.grad);
    if (saved.jitter.defined()) {
      Tensor dinput = ops.empty(x.dtype(), x.shape());
      ops.gemm(false, false, 1.0, dlogits, weight_.value, 0.0, dinput);
      ops.mul(dinput, saved.jitter, dinput);
      ops.axpy(1.0, dinput, grad_x);
    } else {
      ops.gemm(false, false, 1.0, dlogits, weight_.value, 1.0, grad_x);
    }
  }

 private:
  LayerSpec spec_;
  bool renormalize_, softmax_first_;
  double jitter_eps_, temperature_;
  Parameter weight_;
};

}  // namespace

MOELAB_ROUTER_PLUGIN(SoftmaxTopK, "softmax_topk", "1.0.0",
                     "token-choice top-k over softmax router probabilities (Switch, Mixtral, OLMoE, Qwen, DeepSeekMoE)")

// Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", sec. 3.1):
//   S = softmax(x W^T) over experts          x [T, d], W [E, d]; S [T, E] (plan.probs)
//   every expert e takes the c tokens with the largest S[:, e]: G, I = TopK(S^T, c), weight = S[t, e]
// The paper sets c = n * capacity_factor / E for n tokens; we use c = ceil(T * capacity_factor / E)
// (ctx.capacity_factor, the layer's current factor), clipped to [1, T], so that c * E covers T * cf
// tokens even when it does not divide evenly. A token may be taken by several experts or by none
// (it then keeps only its residual). Assignments are expert-major: assignment e*c + j is expert
// e's j-th best token; rank is 0 for all (capacity priority does not apply: the layer does not
// limit expert-choice plans) and plan.top_k = 0.
#include <algorithm>
#include <cmath>
#include <moelab/plugin.hpp>

namespace {

using namespace moelab;

class ExpertChoice final : public Router {
 public:
  static ParamSchema schema() {
    return {
        param_float("init_std", 0.02, "standard deviation of the router weight's initialisation").at_least(0),
    };
  }

  ExpertChoice(const ParamSet& p, const LayerSpec& spec, Ops& ops, Rng& rng)
      : spec_(spec),
        weight_(make_parameter(ops, "weight", spec.dtype, {spec.num_experts, spec.d_model}, rng,
                               p.get_float("init_std"))) {}

  std::vector<Parameter*> parameters() override { return {&weight_}; }

  // Tokens per expert for T tokens at capacity factor cf.
  static int64_t tokens_per_expert(int64_t tokens, int64_t experts, double capacity_factor) {
    const double wanted = std::ceil(static_cast<double>(tokens) * capacity_factor / static_cast<double>(experts));
    return std::clamp<int64_t>(static_cast<int64_t>(wanted), std::min<int64_t>(1, tokens), tokens);
  }

  RoutingPlan forward(const Tensor& x, const RouterContext& ctx) override {
    Ops& ops = ctx.ops;
    const int64_t tokens = x.dim(0), experts = spec_.num_experts;
    expect_shape(x, {tokens, spec_.d_model}, "expert_choice router input");
    MOELAB_CHECK(std::isfinite(ctx.capacity_factor) && ctx.capacity_factor > 0,
                 "expert_choice: the capacity factor must be positive, got {}", ctx.capacity_factor);
    const int64_t capacity = tokens_per_expert(tokens, experts, ctx.capacity_factor);
    RoutingPlan plan;
    plan.top_k = 0;
    plan.logits = ops.empty(x.dtype(), {tokens, experts});
    linear_gate_forward(ops, x, weight_, plan.logits);
    plan.probs = ops.empty(x.dtype(), {tokens, experts});
    ops.softmax_rows(plan.logits, 1.0, plan.probs);

    const int64_t assignments = experts * capacity;
    Tensor expert = host_tensor(DType::i32, {assignments});
    for (int64_t a = 0; a < assignments; ++a)
      expert.data<int32_t>()[a] = static_cast<int32_t>(a / std::max<int64_t>(capacity, 1));
    plan.expert = ops.to_device(expert);
    plan.rank = ops.zeros(DType::i32, {assignments});
    if (capacity == 0) {  // no tokens
      plan.token = ops.empty(DType::i32, {0});
      plan.weight = ops.empty(x.dtype(), {0});
      return plan;
    }
    Tensor by_expert = ops.empty(x.dtype(), {experts, tokens});
    ops.transpose(plan.probs, by_expert);
    Tensor weight = ops.empty(x.dtype(), {experts, capacity});
    Tensor token = ops.empty(DType::i32, {experts, capacity});
    ops.topk_rows(by_expert, static_cast<int>(capacity), nullptr, weight, token);
    plan.token = token.reshaped({assignments});
    plan.weight = weight.reshaped({assignments});
    return plan;
  }

  void backward(const Tensor& x, const RoutingPlan& plan, const RouterGrad& grad, const RouterContext& ctx,
                Tensor& grad_x) override {
    Ops& ops = ctx.ops;
    const int64_t tokens = x.dim(0), experts = spec_.num_experts;
    // weight[a] = S[token[a], expert[a]]
    Tensor dprobs = gradient_from(ops, grad.probs, x.dtype(), {tokens, experts});
    if (plan.weight.numel() > 0) ops.scatter_add_elements(grad.weight, plan.token, plan.expert, dprobs);
    Tensor dlogits = gradient_from(ops, grad.logits, x.dtype(), {tokens, experts});
    ops.softmax_rows_backward(plan.probs, dprobs, 1.0, true, dlogits);
    linear_gate_backward(ops, x, dlogits, weight_, grad_x);
  }

 private:
  LayerSpec spec_;
  Parameter weight_;
};

}  // namespace

MOELAB_ROUTER_PLUGIN(ExpertChoice, "expert_choice", "1.0.0",
                     "Zhou 2022 expert-choice routing: each expert takes its top-c tokens by softmax affinity")

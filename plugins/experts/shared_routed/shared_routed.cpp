// Routed GLU experts plus always-on shared experts (DeepSeekMoE, Dai et al. 2024, sec. 3.2, and
// DeepSeek-V2/V3; Qwen2-MoE):
//   y_t = sum_{routed i} g_{t,i} FFN_i(x_t) + gate_t * sum_{j < num_shared} FFN^shared_j(x_t)
//   gate_t = 1                         shared_gate = "none"     (DeepSeek)
//   gate_t = sigmoid(x_t . w_gate)     shared_gate = "sigmoid"  (Qwen2-MoE: shared_expert_gate, [1, d])
// The num_shared shared GLU experts of width shared_d_ff are stored as ONE GLU of width
// num_shared * shared_d_ff. That is the same function, not an approximation: a GLU's hidden units
// are independent, so concatenating the experts' gate/up rows and down columns gives
// sum_j W_down_j (act(W_gate_j x) * W_up_j x). DeepSeek's HF modelling code builds its shared
// experts the same way (one MLP of intermediate_size moe_intermediate_size * n_shared_experts).
// With bias = true the fused output bias is the sum of the separate experts' output biases.
//
// Parameters (the names keep routed and shared apart):
//   w_in [E, 2F, d], w_out [E, d, F]                         routed experts (F = d_ff)
//   shared.w_in [1, 2 S F_s, d], shared.w_out [1, d, S F_s]  fused shared experts (F_s = shared_d_ff)
//   shared.gate [1, d]                                       only with shared_gate = "sigmoid"
#include <fmt/format.h>

#include <moelab/ffn.hpp>
#include <moelab/plugin.hpp>

namespace {

using namespace moelab;

struct SharedSaved : ForwardContext {
  std::unique_ptr<ForwardContext> ffn;  // the fused shared FFN's own context
  Tensor shared_out;                    // [T, d]: shared FFN output before the gate
  Tensor gate;                          // [T, 1]: sigmoid(x w_gate^T), or undefined without a gate
};

class SharedRoutedExperts final : public FfnExperts {
 public:
  static ParamSchema schema() {
    ParamSchema schema = ffn_schema(256, "silu");
    schema.push_back(
        param_int("num_shared", 1, "always-on shared experts (DeepSeek-V3: 1, DeepSeekMoE 16B: 2)").at_least(1));
    schema.push_back(param_int("shared_d_ff", 0, "hidden width of one shared expert; 0 takes d_ff").at_least(0));
    schema.push_back(param_choice("shared_gate", "none", {"none", "sigmoid"},
                                  "scale the shared output by sigmoid(x . w_gate) per token (Qwen2-MoE) or not "
                                  "(DeepSeek)"));
    return schema;
  }

  SharedRoutedExperts(const ParamSet& p, const LayerSpec& spec, Ops& ops, Rng& rng)
      : FfnExperts(p, spec, ops, rng, /*gated=*/true),
        shared_(options_from(p, spec, /*gated=*/true, p.get_int("num_shared") * shared_width(p), /*groups=*/1), ops,
                rng, "shared."),
        gated_output_(p.get_string("shared_gate") == "sigmoid") {
    if (gated_output_)
      shared_gate_ = make_parameter(ops, "shared.gate", spec.dtype, {1, spec.d_model}, rng, p.get_float("init_std"));
  }

  std::vector<Parameter*> parameters() override {
    std::vector<Parameter*> out = routed_.parameters();
    for (Parameter* p : shared_.parameters()) out.push_back(p);
    if (gated_output_) out.push_back(&shared_gate_);
    return out;
  }

  bool has_shared() const override { return true; }

  // y [T, d] += gate * shared(x [T, d])
  std::unique_ptr<ForwardContext> shared_forward(Ops& ops, const Tensor& x, Tensor& y) override {
    const int64_t tokens = x.dim(0), d = shared_.options().d_model;
    expect_shape(x, {tokens, d}, "shared experts input");
    expect_shape(y, {tokens, d}, "shared experts output");
    auto saved = std::make_unique<SharedSaved>();
    saved->shared_out = ops.empty(x.dtype(), {tokens, d});
    saved->ffn = shared_.forward(ops, x, {0, tokens}, saved->shared_out);
    if (!gated_output_) {
      ops.axpy(1.0, saved->shared_out, y);
      return saved;
    }
    Tensor gate_logit = ops.empty(x.dtype(), {tokens, 1});
    ops.gemm(false, true, 1.0, x, shared_gate_.value, 0.0, gate_logit);
    saved->gate = ops.empty(x.dtype(), {tokens, 1});
    ops.sigmoid(gate_logit, saved->gate);
    Tensor gated = ops.empty(x.dtype(), {tokens, d});
    ops.copy(saved->shared_out, gated);
    ops.scale_rows(saved->gate.reshaped({tokens}), gated);
    ops.axpy(1.0, gated, y);
    return saved;
  }

  // Accumulates the shared parameters' gradients; dx [T, d] += d loss / dx through the shared path.
  void shared_backward(Ops& ops, const Tensor& x, const ForwardContext& context, const Tensor& dy,
                       Tensor& dx) override {
    const auto& saved = dynamic_cast<const SharedSaved&>(context);
    const int64_t tokens = x.dim(0), d = shared_.options().d_model;
    expect_shape(dy, {tokens, d}, "shared experts output gradient");
    expect_shape(dx, {tokens, d}, "shared experts input gradient");
    Tensor dshared = dy;  // d loss / d shared_out [T, d]
    if (gated_output_) {
      // y += g * s: d s = g * dy, d g = <dy, s> per token, d logit = g (1 - g) d g.
      dshared = ops.empty(x.dtype(), {tokens, d});
      ops.copy(dy, dshared);
      ops.scale_rows(saved.gate.reshaped({tokens}), dshared);
      Tensor dgate = ops.empty(x.dtype(), {tokens});
      ops.row_dot(dy, saved.shared_out, dgate);
      Tensor dlogit = ops.empty(x.dtype(), {tokens, 1});
      ops.sigmoid_backward(saved.gate, dgate.reshaped({tokens, 1}), false, dlogit);
      // logit = x w_gate^T: d w_gate += dlogit^T x, dx += dlogit w_gate.
      ops.gemm(true, false, 1.0, dlogit, x, 1.0, shared_gate_.grad);
      ops.gemm(false, false, 1.0, dlogit, shared_gate_.value, 1.0, dx);
    }
    Tensor dx_shared = ops.empty(x.dtype(), {tokens, d});
    shared_.backward(ops, x, {0, tokens}, *saved.ffn, dshared, dx_shared);
    ops.axpy(1.0, dx_shared, dx);
  }

 private:
  static int64_t shared_width(const ParamSet& p) {
    const int64_t width = p.get_int("shared_d_ff");
    return width > 0 ? width : p.get_int("d_ff");
  }

  GroupedFfn shared_;
  bool gated_output_;
  Parameter shared_gate_;
};

}  // namespace

MOELAB_EXPERTS_PLUGIN(
    SharedRoutedExperts, "shared_routed", "1.0.0",
    "routed GLU experts plus always-on shared experts, optionally sigmoid-gated (DeepSeekMoE, Qwen2-MoE)")

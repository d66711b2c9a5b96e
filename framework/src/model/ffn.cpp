#include "moelab/ffn.hpp"

#include <fmt/format.h>

namespace moelab {

namespace {
struct FfnSaved : ForwardContext {
  Tensor pre;     // [R, F_in]: x W_in^T + b_in, the activation's input
  Tensor hidden;  // [R, F]: act(pre) (or act(gate) * up)
};

void add_bias_per_segment(Ops& ops, const Tensor& bias, const std::vector<int64_t>& offsets, Tensor& y) {
  for (size_t g = 0; g + 1 < offsets.size(); ++g) {
    if (offsets[g + 1] == offsets[g]) continue;
    Tensor rows = y.rows(offsets[g], offsets[g + 1]);
    ops.add_row_vector(bias.rows(static_cast<int64_t>(g), static_cast<int64_t>(g) + 1).reshaped({y.dim(1)}), rows);
  }
}

void bias_grad_per_segment(Ops& ops, const Tensor& dy, const std::vector<int64_t>& offsets, Tensor& dbias) {
  for (size_t g = 0; g + 1 < offsets.size(); ++g) {
    if (offsets[g + 1] == offsets[g]) continue;
    Tensor db = dbias.rows(static_cast<int64_t>(g), static_cast<int64_t>(g) + 1).reshaped({dy.dim(1)});
    ops.sum_rows(dy.rows(offsets[g], offsets[g + 1]), true, db);
  }
}
}  // namespace

GroupedFfn::GroupedFfn(const FfnOptions& o, Ops& ops, Rng& rng, const std::string& prefix) : options_(o) {
  MOELAB_CHECK(o.groups >= 1 && o.d_model >= 1 && o.d_ff >= 1, "FFN bank needs positive sizes, got G={} d={} F={}",
               o.groups, o.d_model, o.d_ff);
  const int64_t f_in = o.gated ? 2 * o.d_ff : o.d_ff;
  w_in_ = make_parameter(ops, prefix + "w_in", o.dtype, {o.groups, f_in, o.d_model}, rng, o.init_std);
  w_out_ = make_parameter(ops, prefix + "w_out", o.dtype, {o.groups, o.d_model, o.d_ff}, rng, o.init_std);
  if (o.bias) {
    b_in_ = make_parameter(ops, prefix + "b_in", o.dtype, {o.groups, f_in}, rng, 0.0, false);
    b_out_ = make_parameter(ops, prefix + "b_out", o.dtype, {o.groups, o.d_model}, rng, 0.0, false);
  }
}

std::vector<Parameter*> GroupedFfn::parameters() {
  std::vector<Parameter*> out{&w_in_, &w_out_};
  if (options_.bias) {
    out.push_back(&b_in_);
    out.push_back(&b_out_);
  }
  return out;
}

double GroupedFfn::flops_per_token() const {
  const double f_in = options_.gated ? 2.0 * options_.d_ff : options_.d_ff;
  return 2.0 * options_.d_model * (f_in + options_.d_ff);
}

std::unique_ptr<ForwardContext> GroupedFfn::forward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets,
                                                    Tensor& y) {
  const int64_t rows = x.dim(0), d = options_.d_model, f = options_.d_ff;
  const int64_t f_in = options_.gated ? 2 * f : f;
  expect_shape(x, {rows, d}, "FFN input");
  expect_shape(y, {rows, d}, "FFN output");
  MOELAB_CHECK(static_cast<int64_t>(offsets.size()) == options_.groups + 1 && offsets.back() == rows,
               "FFN bank of {} groups got {} offsets ending at {} for {} rows", options_.groups, offsets.size(),
               offsets.empty() ? 0 : offsets.back(), rows);
  auto saved = std::make_unique<FfnSaved>();
  saved->pre = ops.empty(x.dtype(), {rows, f_in});
  ops.grouped_gemm(x, w_in_.gemm_value(), true, offsets, 1.0, 0.0, saved->pre);
  if (options_.bias) add_bias_per_segment(ops, b_in_.value, offsets, saved->pre);
  saved->hidden = ops.empty(x.dtype(), {rows, f});
  if (options_.gated)
    ops.glu(options_.activation, saved->pre, saved->hidden);
  else
    ops.activation(options_.activation, saved->pre, saved->hidden);
  ops.grouped_gemm(saved->hidden, w_out_.gemm_value(), true, offsets, 1.0, 0.0, y);
  if (options_.bias) add_bias_per_segment(ops, b_out_.value, offsets, y);
  return saved;
}

void GroupedFfn::backward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets, const ForwardContext& context,
                          const Tensor& dy, Tensor& dx) {
  const auto& saved = dynamic_cast<const FfnSaved&>(context);
  const int64_t rows = x.dim(0), f = options_.d_ff;
  const int64_t f_in = options_.gated ? 2 * f : f;
  expect_shape(dy, {rows, options_.d_model}, "FFN output gradient");
  expect_shape(dx, {rows, options_.d_model}, "FFN input gradient");
  // y = h W_out^T: dW_out[g] += dy_g^T h_g, dh = dy W_out
  ops.grouped_gemm_weight_grad(saved.hidden, dy, true, offsets, true, w_out_.grad);
  if (options_.bias) bias_grad_per_segment(ops, dy, offsets, b_out_.grad);
  Tensor dhidden = ops.empty(x.dtype(), {rows, f});
  ops.grouped_gemm(dy, w_out_.gemm_value(), false, offsets, 1.0, 0.0, dhidden);
  Tensor dpre = ops.empty(x.dtype(), {rows, f_in});
  if (options_.gated)
    ops.glu_backward(options_.activation, saved.pre, dhidden, dpre);
  else
    ops.activation_backward(options_.activation, saved.pre, dhidden, false, dpre);
  if (options_.bias) bias_grad_per_segment(ops, dpre, offsets, b_in_.grad);
  // pre = x W_in^T: dW_in[g] += dpre_g^T x_g, dx = dpre W_in
  ops.grouped_gemm_weight_grad(x, dpre, true, offsets, true, w_in_.grad);
  ops.grouped_gemm(dpre, w_in_.gemm_value(), false, offsets, 1.0, 0.0, dx);
}

FfnOptions FfnExperts::options_from(const ParamSet& p, const LayerSpec& spec, bool gated, int64_t d_ff,
                                    int64_t groups) {
  FfnOptions o;
  o.groups = groups;
  o.d_model = spec.d_model;
  o.d_ff = d_ff < 0 ? p.get_int("d_ff") : d_ff;
  o.activation = parse_activation(p.get_string("activation"));
  o.gated = gated;
  o.bias = p.get_bool("bias");
  o.init_std = p.get_float("init_std");
  o.dtype = spec.dtype;
  return o;
}

FfnExperts::FfnExperts(const ParamSet& p, const LayerSpec& spec, Ops& ops, Rng& rng, bool gated, int64_t d_ff)
    : routed_(options_from(p, spec, gated, d_ff, spec.num_experts), ops, rng) {}

std::unique_ptr<ForwardContext> FfnExperts::forward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets,
                                                    Tensor& y) {
  return routed_.forward(ops, x, offsets, y);
}

void FfnExperts::backward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets, const ForwardContext& saved,
                          const Tensor& dy, Tensor& dx) {
  routed_.backward(ops, x, offsets, saved, dy, dx);
}

ParamSchema ffn_schema(int64_t default_d_ff, const std::string& default_activation) {
  return {
      param_int("d_ff", default_d_ff, "hidden width of one expert").at_least(1),
      param_choice("activation", default_activation, {"relu", "gelu", "gelu_erf", "silu", "identity"},
                   "activation (of the gate, for gated units)"),
      param_bool("bias", false, "add biases to both projections (Switch/GShard FFNs have none)"),
      param_float("init_std", 0.02, "standard deviation of the normal weight initialisation").at_least(0),
  };
}

}  // namespace moelab

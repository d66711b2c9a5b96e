#include "moelab/module.hpp"

#include <fmt/format.h>

#include "moelab/experts.hpp"
#include "moelab/plugin.hpp"

namespace moelab {

namespace {
template <class Draw>
void fill_host(Tensor& host, Draw&& draw) {
  MOELAB_CHECK(host.device() == DeviceKind::cpu, "fill: {} is not a host tensor", host.describe());
  const int64_t n = host.numel();
  if (host.dtype() == DType::f32) {
    float* p = host.data<float>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(draw());
  } else if (host.dtype() == DType::f64) {
    double* p = host.data<double>();
    for (int64_t i = 0; i < n; ++i) p[i] = draw();
  } else {
    throw RuntimeError(fmt::format("fill: dtype {} is not supported", dtype_name(host.dtype())));
  }
}
}  // namespace

void fill_uniform(Tensor& host, double lo, double hi, Rng& rng) {
  fill_host(host, [&] { return rng.uniform(lo, hi); });
}

void fill_normal(Tensor& host, double std, Rng& rng) {
  fill_host(host, [&] { return std * rng.normal(); });
}

Parameter make_parameter(Ops& ops, std::string name, DType dtype, const Shape& shape, Rng& rng, double std,
                         bool weight_decay) {
  Parameter p;
  p.name = std::move(name);
  if (ops.device() == DeviceKind::meta) {
    // No storage to initialise: the shape is all a meta model is for (and a host buffer of a
    // 671B-parameter model's weights is exactly what it avoids).
    p.value = ops.empty(dtype, shape);
  } else {
    Tensor host = host_tensor(dtype, shape);
    if (std != 0.0) fill_normal(host, std, rng);
    p.value = ops.to_device(host);
  }
  p.grad = ops.zeros(dtype, shape);
  p.weight_decay = weight_decay;
  return p;
}

void zero_grads(Ops& ops, Module& module) {
  for (Parameter* p : module.parameters()) ops.fill(p->grad, 0.0);
}

std::unique_ptr<ForwardContext> Experts::shared_forward(Ops&, const Tensor&, Tensor&) {
  throw RuntimeError("this expert layout has no shared experts");
}
void Experts::shared_backward(Ops&, const Tensor&, const ForwardContext&, const Tensor&, Tensor&) {
  throw RuntimeError("this expert layout has no shared experts");
}

void set_token_major_assignments(Ops& ops, int64_t tokens, int64_t k, RoutingPlan& plan) {
  Tensor token = host_tensor(DType::i32, {tokens * k});
  Tensor rank = host_tensor(DType::i32, {tokens * k});
  int32_t* t = token.data<int32_t>();
  int32_t* r = rank.data<int32_t>();
  for (int64_t i = 0; i < tokens * k; ++i) {
    t[i] = static_cast<int32_t>(i / k);
    r[i] = static_cast<int32_t>(i % k);
  }
  plan.token = ops.to_device(token);
  plan.rank = ops.to_device(rank);
}

void linear_gate_forward(Ops& ops, const Tensor& x, const Parameter& weight, Tensor& logits) {
  ops.gemm(false, true, 1.0, x, weight.value, 0.0, logits);
}

void linear_gate_backward(Ops& ops, const Tensor& x, const Tensor& dlogits, Parameter& weight, Tensor& grad_x) {
  ops.gemm(true, false, 1.0, dlogits, x, 1.0, weight.grad);
  ops.gemm(false, false, 1.0, dlogits, weight.value, 1.0, grad_x);
}

Tensor gradient_from(Ops& ops, const Tensor& incoming, DType dtype, const Shape& shape) {
  Tensor out = ops.zeros(dtype, shape);
  if (incoming.defined()) ops.axpy(1.0, incoming, out);
  return out;
}

const char* plugin_kind_name(PluginKind kind) {
  switch (kind) {
    case PluginKind::router:
      return "router";
    case PluginKind::experts:
      return "experts";
    case PluginKind::balancer:
      return "balancer";
    case PluginKind::kernel:
      return "kernel";
    case PluginKind::comm:
      return "comm";
  }
  return "unknown";
}

Activation parse_activation(const std::string& name) {
  if (name == "identity") return Activation::identity;
  if (name == "relu") return Activation::relu;
  if (name == "gelu" || name == "gelu_tanh") return Activation::gelu_tanh;
  if (name == "gelu_erf") return Activation::gelu_erf;
  if (name == "silu" || name == "swish") return Activation::silu;
  throw UsageError(fmt::format("unknown activation '{}'; known: identity, relu, gelu, gelu_erf, silu", name));
}

const char* activation_name(Activation activation) {
  switch (activation) {
    case Activation::identity:
      return "identity";
    case Activation::relu:
      return "relu";
    case Activation::gelu_tanh:
      return "gelu";
    case Activation::gelu_erf:
      return "gelu_erf";
    case Activation::silu:
      return "silu";
  }
  return "?";
}

Tensor Ops::to_host(const Tensor& src) {
  if (src.device() == DeviceKind::cpu) return src;
  Tensor dst = host_tensor(src.dtype(), src.shape());
  copy(src, dst);
  return dst;
}

Tensor Ops::to_device(const Tensor& host) {
  if (device() == DeviceKind::cpu && host.device() == DeviceKind::cpu) return host;
  Tensor dst = empty(host.dtype(), host.shape());
  copy(host, dst);
  return dst;
}

void make_gemm_copies(Ops& ops, const std::vector<Parameter*>& params, DType precision) {
  for (Parameter* p : params)
    p->gemm_copy =
        precision == DType::bf16 && p->value.rank() >= 2 ? ops.empty(DType::bf16, p->value.shape()) : Tensor();
  refresh_gemm_copies(ops, params);
}

void refresh_gemm_copies(Ops& ops, const std::vector<Parameter*>& params) {
  for (Parameter* p : params)
    if (p->gemm_copy.defined()) ops.cast(p->value, p->gemm_copy);
}

}  // namespace moelab

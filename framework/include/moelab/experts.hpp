// Expert-layout plugins: the experts' FFNs, applied to tokens already grouped by expert, plus any
// always-on shared experts.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "moelab/module.hpp"

namespace moelab {

class Experts : public Module {
 public:
  // Routed experts. x [R, d]: dispatched rows grouped by expert, rows [offsets[e], offsets[e+1])
  // for expert e (offsets on the host, size E+1). Writes y [R, d]. x stays as it is until the
  // backward; y is the caller's (on several ranks it is sent away and its memory reused before
  // the backward), so keep in the context whatever the backward needs.
  virtual std::unique_ptr<ForwardContext> forward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets,
                                                  Tensor& y) = 0;
  // Accumulates parameter gradients; overwrites dx [R, d].
  virtual void backward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets, const ForwardContext& saved,
                        const Tensor& dy, Tensor& dx) = 0;

  // Shared experts (DeepSeekMoE, Qwen2-MoE) see every token: y [T, d] += shared(x [T, d]).
  virtual bool has_shared() const { return false; }
  virtual std::unique_ptr<ForwardContext> shared_forward(Ops& ops, const Tensor& x, Tensor& y);
  // Accumulates parameter gradients and adds into dx [T, d].
  virtual void shared_backward(Ops& ops, const Tensor& x, const ForwardContext& saved, const Tensor& dy, Tensor& dx);

  // FLOPs per token of one routed expert's forward (2 per multiply-add), for reports and benchmarks.
  virtual double flops_per_routed_token() const = 0;
};

}  // namespace moelab

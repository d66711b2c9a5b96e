// What noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 3-5 and
// appendix A) exposes to balancers: the pieces of the smooth load estimator (eq. 8-10)
//
//   P(x_t, i) = Phi((clean_{t,i} - threshold_{t,i}) / noise_std_{t,i})
//
// the probability that expert i stays in token t's top k when only its own noise is redrawn, and
// a way for the gradient of a loss on P to flow back into the router.
//
// The router (plugins/routers/noisy_topk) computes
//   clean     = x W_gate^T                               [T, E]   (this is plan.logits)
//   noise_std = softplus(x W_noise^T) + min_noise_std    [T, E]
//   H         = clean + eps * noise_std, eps ~ N(0, 1)   [T, E]   (training only; H = clean in eval)
// keeps the k largest H per token and softmaxes them into the combine weights.
// threshold_{t,i} is "the k-th largest of H_t excluding i" (eq. 9's kth_excluding): the (k+1)-th
// largest H_t when i is among the kept k, the k-th largest otherwise. It is a copy of one entry of
// H_t, so it depends on x (and both weights) through that entry; the router's backward takes care
// of it.
//
// Protocol for a balancer (cv_squared does this):
//   1. In forward and backward, `dynamic_cast<const NoisyGatingContext*>(plan.context.get())`; when
//      it is null, or `smooth_load()` is false (evaluation, or k = E), use the hard count instead.
//   2. In backward, add
//        dL/d clean      into RouterGrad::logits (plan.logits *is* clean; allocate zeros if undefined)
//        dL/d noise_std  into context.grad_noise_std(ops)   [T, E]
//        dL/d threshold  into context.grad_threshold(ops)   [T, E] (per entry, as `threshold` is laid out)
//      with ops.axpy, always accumulating: several balancers may add.
//   3. The router's backward, which runs after every balancer's, consumes both tensors and resets
//      them to undefined, so that a plan backpropagated twice does not count them twice.
// The gradient fields are `mutable` because balancers only ever see the plan as const; they are
// gradient buffers attached to the forward's record, not part of the routing decision.
#pragma once

#include "moelab/kernel.hpp"
#include "moelab/module.hpp"

namespace moelab {

struct NoisyGatingContext : ForwardContext {
  bool noisy = false;   // noise was added in this forward (training with noise enabled)
  int64_t top_k = 0;    // k
  Tensor clean_logits;  // [T, E] x W_gate^T, the same tensor as plan.logits
  Tensor noise_std;     // [T, E] softplus(x W_noise^T) + min_noise_std; undefined when !noisy
  Tensor threshold;     // [T, E] kth_excluding(H_t, k, i); undefined when !smooth_load()

  // P(x, i) is defined when there was noise to smooth over and something is left out of the top k.
  bool smooth_load() const { return noisy && threshold.defined(); }

  // Accumulators a balancer adds its gradients into (zeros of the right shape on first use).
  Tensor& grad_noise_std(Ops& ops) const { return zeros_if_undefined(ops, grad_noise_std_); }
  Tensor& grad_threshold(Ops& ops) const { return zeros_if_undefined(ops, grad_threshold_); }

  // For the router's backward: what balancers added (undefined when none did), and the reset.
  const Tensor& added_grad_noise_std() const { return grad_noise_std_; }
  const Tensor& added_grad_threshold() const { return grad_threshold_; }
  void clear_added_grads() const {
    grad_noise_std_ = Tensor{};
    grad_threshold_ = Tensor{};
  }

 private:
  Tensor& zeros_if_undefined(Ops& ops, Tensor& grad) const {
    MOELAB_CHECK(clean_logits.defined(), "noisy gating context without clean logits");
    if (!grad.defined()) grad = ops.zeros(clean_logits.dtype(), clean_logits.shape());
    return grad;
  }
  mutable Tensor grad_noise_std_;
  mutable Tensor grad_threshold_;
};

}  // namespace moelab

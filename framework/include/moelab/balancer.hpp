// Balancer plugins: auxiliary losses on the routing (Switch aux, z-loss, ...) and step-wise
// corrections (DeepSeek-V3's aux-loss-free bias). A recipe may combine several.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "moelab/router.hpp"

namespace moelab {

// What the layer measured in this forward, on the host.
struct LayerLoad {
  std::vector<int64_t> routed_per_expert;  // assignments each expert was chosen for, before capacity
  std::vector<int64_t> tokens_per_expert;  // assignments each expert actually processed
  int64_t tokens = 0;                      // T
  int64_t top_k = 0;                       // k (0 for expert choice)
};

// With [parallel] balance = "local" the layer calls forward on every micro-batch, and later
// backward on every micro-batch, each time on that micro-batch's part of the plan (its tokens renumbered from 0, its
// assignments, its load) with grad_loss = 1/M: keep nothing from forward for backward beyond plan and load.
class Balancer : public Module {
 public:
  // The loss this balancer adds to the objective, coefficient included. Balancers that add no
  // loss return 0. Called in training and evaluation (evaluation reports it, adds no gradient).
  virtual double forward(const RoutingPlan& plan, const LayerLoad& load, const RouterContext& ctx) = 0;
  // Adds d(loss)/d plan.logits and/or d(loss)/d plan.probs, scaled by grad_loss, into `grad`
  // (allocating grad.logits / grad.probs with zeros where undefined). A loss that depends on the
  // combine weights (cv_squared's importance) adds into grad.weight [A]: the layer allocates it,
  // holding the gradient from the layer output, before any balancer's backward runs.
  virtual void backward(const RoutingPlan& plan, const LayerLoad& load, const RouterContext& ctx, double grad_loss,
                        RouterGrad& grad) = 0;

  // Balancers that steer selection through a per-expert bias (aux_free_bias) say so; the layer
  // then keeps a bias [E] and hands it to the router as RouterContext::expert_bias.
  virtual bool uses_expert_bias() const { return false; }
  // After each optimiser step, with the load of that step: update the bias (host or device).
  virtual void after_step(Ops& /*ops*/, const LayerLoad& /*load*/, Tensor& /*expert_bias*/) {}
};

}  // namespace moelab

// Router plugins: decide which experts see which tokens, and with what combine weight.
//
// A router maps hidden states x [T, d] to a RoutingPlan: a list of A assignments
// (token, expert, weight, rank). Token-choice routers emit k per token, token-major (A = T*k);
// expert-choice routers emit c per expert. The MoE layer applies capacity and dispatch to the
// plan, so a router never drops tokens itself. The plan also carries the router's logits and
// per-expert probabilities, which balancers read and differentiate.
#pragma once

#include <cstdint>
#include <memory>

#include "moelab/module.hpp"

namespace moelab {

struct RouterContext {
  Ops& ops;
  Rng& rng;              // this layer's own stream: noise, jitter, random routing
  bool training = true;  // noise and jitter only in training
  int64_t step = 0;
  int64_t batch = 1;  // tokens T = batch * seq_len; sequences are contiguous
  int64_t seq_len = 0;
  const Tensor* token_ids = nullptr;    // host i32 [T], for hash routing; may be null
  const Tensor* expert_bias = nullptr;  // device [E]: selection-only bias (aux_free_bias); may be null
  double capacity_factor = 1.0;         // the layer's current factor (expert choice sizes c from it)
};

struct RoutingPlan {
  Tensor logits;      // [T, E] raw router scores before any normalisation (z-loss reads these)
  Tensor probs;       // [T, E] per-expert probabilities/affinities the balancers read
  Tensor token;       // [A] i32: the token of each assignment
  Tensor expert;      // [A] i32: its expert, or -1 when the router chose not to dispatch (GShard)
  Tensor weight;      // [A] combine weight, differentiable
  Tensor rank;        // [A] i32: 0 for a token's first choice, 1 for its second... (capacity priority)
  int64_t top_k = 0;  // k for token choice (A = T*k, token-major); 0 for expert choice
  std::unique_ptr<ForwardContext> context;  // whatever the router's backward needs
};

// Gradients that reach the router from the layer output and the balancers.
struct RouterGrad {
  Tensor weight;  // dL/d plan.weight [A]
  Tensor logits;  // dL/d plan.logits [T, E], or undefined when nothing depends on it
  Tensor probs;   // dL/d plan.probs [T, E], or undefined
};

// Fills plan.token and plan.rank for token-major assignments (A = T*k): the j-th choice of token
// t is assignment t*k + j, with token t and rank j.
void set_token_major_assignments(Ops& ops, int64_t tokens, int64_t k, RoutingPlan& plan);

// The linear gate most routers share: logits [T, E] = x [T, d] W^T, with W [E, d] (HF's
// gate.weight). The backward accumulates dW += dlogits^T x and adds grad_x += dlogits W.
void linear_gate_forward(Ops& ops, const Tensor& x, const Parameter& weight, Tensor& logits);
void linear_gate_backward(Ops& ops, const Tensor& x, const Tensor& dlogits, Parameter& weight, Tensor& grad_x);

// A [T, E] gradient to add to: zeros, plus what the balancers already put in `incoming` (which may
// be undefined).
Tensor gradient_from(Ops& ops, const Tensor& incoming, DType dtype, const Shape& shape);

class Router : public Module {
 public:
  // x [T, d] -> plan.
  virtual RoutingPlan forward(const Tensor& x, const RouterContext& ctx) = 0;
  // Accumulates parameter gradients and adds dL/dx into grad_x [T, d].
  virtual void backward(const Tensor& x, const RoutingPlan& plan, const RouterGrad& grad, const RouterContext& ctx,
                        Tensor& grad_x) = 0;
};

}  // namespace moelab

// Data-parallel gradients (training.hpp): each parameter's gradient summed over the ranks that
// share it, then one global-norm clip over every parameter of every rank.
//
// Every rank's backward gives the gradient of the global batch's mean loss restricted to its own
// tokens, so the sums below are the one-process gradients (up to the order of the additions):
//   replicated parameters    summed over every rank
//   routed experts (split)   summed over the ranks holding the same experts
//   router and balancers     already whole on every rank (they see the global batch): untouched
// The norm: the replicated and routing parts are the same on every rank after the sums and are
// counted once; the experts' squares are summed over the expert group, whose ranks hold
// different experts.
#include <fmt/format.h>

#include <cmath>

#include "training.hpp"

namespace moelab::training {

double synchronise_and_clip(Transformer& model, const NamedParameters& params, const Parallel& parallel, Ops& ops,
                            double max_norm) {
  double shared_squares = 0, expert_squares = 0;
  for (const auto& [name, p] : params) {
    const GradReduce reduce = parallel.distributed() ? model.grad_reduce(p) : GradReduce::none;
    if (reduce != GradReduce::none) {
      Tensor g = ops.to_host(p->grad);
      allreduce_sum(reduce == GradReduce::world ? parallel.world() : parallel.expert_replicas(), g);
      if (p->grad.device() != DeviceKind::cpu) ops.copy(g, p->grad);
    }
    const double squares = ops.sum_squares(p->grad);
    (model.is_sharded(p) ? expert_squares : shared_squares) += squares;
  }
  if (parallel.distributed()) parallel.expert_group().allreduce_sum(&expert_squares, 1, DType::f64);
  const double norm = std::sqrt(shared_squares + expert_squares);
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (const auto& [name, p] : params) ops.scale(scale, p->grad);
  }
  return norm;
}

std::string first_non_finite_gradient(const NamedParameters& params, Ops& ops) {
  for (const auto& [name, p] : params) {
    const double squares = ops.sum_squares(p->grad);
    if (!std::isfinite(squares))
      return fmt::format("the gradient of '{}' is not finite (its sum of squares is {})", name, squares);
  }
  return "the gradient norm is not finite, though each parameter's sum of squares is (their sum overflowed)";
}

}  // namespace moelab::training

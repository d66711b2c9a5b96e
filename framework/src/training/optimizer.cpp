#include "moelab/optimizer.hpp"

#include <cmath>

namespace moelab {

AdamWOptimizer::AdamWOptimizer(Ops& ops, std::vector<Parameter*> parameters, AdamWOptions options)
    : ops_(ops), parameters_(std::move(parameters)), options_(options) {
  for (Parameter* p : parameters_) {
    m_.push_back(ops_.zeros(p->value.dtype(), p->value.shape()));
    v_.push_back(ops_.zeros(p->value.dtype(), p->value.shape()));
  }
}

double AdamWOptimizer::clip_grad_norm(double max_norm) {
  double sum = 0;
  for (Parameter* p : parameters_) sum += ops_.sum_squares(p->grad);
  const double norm = std::sqrt(sum);
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (Parameter* p : parameters_) ops_.scale(scale, p->grad);
  }
  return norm;
}

void AdamWOptimizer::step(double lr) {
  ++steps_;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    Parameter* p = parameters_[i];
    Ops::AdamW hyper{lr,    options_.beta1, options_.beta2, options_.eps, p->weight_decay ? options_.weight_decay : 0.0,
                     steps_};
    ops_.adamw_update(hyper, p->grad, p->value, m_[i], v_[i]);
  }
}

void AdamWOptimizer::zero_grad() {
  for (Parameter* p : parameters_) ops_.fill(p->grad, 0.0);
}

}  // namespace moelab

// AdamW with decoupled weight decay (Loshchilov & Hutter 2019) over a module's parameters, with
// global-norm gradient clipping. The update itself is Ops::adamw_update, so it runs on the device.
#pragma once

#include <cstdint>
#include <vector>

#include "moelab/module.hpp"

namespace moelab {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // applied only to parameters with Parameter::weight_decay
};

class AdamWOptimizer {
 public:
  AdamWOptimizer(Ops& ops, std::vector<Parameter*> parameters, AdamWOptions options);

  // The global L2 norm of all gradients; when it exceeds max_norm > 0 every gradient is scaled
  // down to that norm (as torch.nn.utils.clip_grad_norm_).
  double clip_grad_norm(double max_norm);
  void step(double lr);
  void zero_grad();
  int64_t steps_taken() const { return steps_; }
  // Checkpoint state: the moments of parameter i (in the constructor's order) and the step count.
  Tensor& first_moment(size_t i) { return m_.at(i); }
  Tensor& second_moment(size_t i) { return v_.at(i); }
  void set_steps_taken(int64_t steps) { steps_ = steps; }

 private:
  Ops& ops_;
  std::vector<Parameter*> parameters_;
  AdamWOptions options_;
  std::vector<Tensor> m_, v_;
  int64_t steps_ = 0;
};

}  // namespace moelab

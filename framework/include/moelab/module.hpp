// What every trainable plugin object shares: named parameters with gradients, and the shape of
// the MoE layer it is part of.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moelab/kernel.hpp"
#include "moelab/rng.hpp"
#include "moelab/tensor.hpp"

namespace moelab {

// The layer a router, expert layout or balancer is built for, after the expert layout had its say
// (a fine-grained layout multiplies num_experts and top_k by its segment count).
struct LayerSpec {
  int64_t d_model = 0;
  int64_t num_experts = 0;  // routed experts
  int64_t top_k = 1;        // experts per token, for token-choice routers
  int layer_index = 0;
  DType dtype = DType::f32;  // parameter and activation dtype (f64 in gradient checks)
};

// A trainable tensor and its gradient (same shape, dtype and device). `name` is the key it is
// saved under in safetensors, relative to its module ("weight", "w_gate_up", ...).
struct Parameter {
  std::string name;
  Tensor value;
  Tensor grad;
  bool weight_decay = true;  // optimisers skip decay when false (biases, norms)
  // In bf16 precision (train.precision = "bf16"): value rounded to bf16, for GEMMs to read, so a
  // weight is rounded once per step rather than at every GEMM (refresh_gemm_copies); undefined in
  // f32. GEMMs with this parameter as an operand read gemm_value(); everything else reads value.
  Tensor gemm_copy;
  const Tensor& gemm_value() const { return gemm_copy.defined() ? gemm_copy : value; }
};

// Opaque state a forward hands to its backward (tiny-cuda-nn's context): each module derives its
// own and the backward takes exactly what its forward saved.
struct ForwardContext {
  virtual ~ForwardContext() = default;
};

class Module {
 public:
  virtual ~Module() = default;
  // Every trainable parameter, in a stable order. Non-trainable state is not listed here.
  virtual std::vector<Parameter*> parameters() { return {}; }
  // Figures a plugin reports about its last forward (Sinkhorn's iterations and residual, the norm
  // of a bias): the MoE layer writes each to metrics.jsonl as "<role>.<plugin>.<name>", e.g.
  // "router.sinkhorn.iterations", in every train line's layer entry. Finite numbers; none by default.
  virtual std::vector<std::pair<std::string, double>> metrics() const { return {}; }
};

// Allocates a parameter on `ops`'s device with its gradient zeroed, initialised on the host from
// `rng` as normal(0, std) (std = 0 gives zeros).
Parameter make_parameter(Ops& ops, std::string name, DType dtype, const Shape& shape, Rng& rng, double std,
                         bool weight_decay = true);
// Fill a host f32/f64 tensor from `rng`: uniform in [lo, hi), or normal(0, std).
void fill_uniform(Tensor& host, double lo, double hi, Rng& rng);
void fill_normal(Tensor& host, double std, Rng& rng);

// Gives each of `params` that is a matrix (rank >= 2) a bf16 gemm_copy (precision bf16), or
// drops every copy (f32); then refreshes them. refresh_gemm_copies rounds value into every copy
// there is: call it after values change (an optimiser step, a checkpoint loaded) and before the
// next forward.
void make_gemm_copies(Ops& ops, const std::vector<Parameter*>& params, DType precision);
void refresh_gemm_copies(Ops& ops, const std::vector<Parameter*>& params);

// Zeroes every gradient of `module`.
void zero_grads(Ops& ops, Module& module);

}  // namespace moelab

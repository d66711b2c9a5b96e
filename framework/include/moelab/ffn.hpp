// A bank of G feed-forward networks applied to row segments (one segment per expert): the
// building block every expert layout shares. Weights use the [out, in] layout of torch.nn.Linear
// so that HF checkpoints map without transposes:
//   w_in  [G, F_in, d]  F_in = 2F for gated units ([gate | up] fused), F otherwise
//   w_out [G, d, F]
//   b_in  [G, F_in], b_out [G, d]  (optional)
// Forward on segment g: h = act(x W_in^T + b_in) (gated: act(gate) * up), y = h W_out^T + b_out.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moelab/experts.hpp"
#include "moelab/module.hpp"
#include "moelab/params.hpp"

namespace moelab {

struct FfnOptions {
  int64_t groups = 1;   // G: experts in this bank
  int64_t d_model = 0;  // d
  int64_t d_ff = 0;     // F: hidden width of one expert
  Activation activation = Activation::silu;
  bool gated = true;  // GLU (SwiGLU / GeGLU) when true
  bool bias = false;
  double init_std = 0.02;
  DType dtype = DType::f32;
};

class GroupedFfn : public Module {
 public:
  GroupedFfn(const FfnOptions& options, Ops& ops, Rng& rng, const std::string& name_prefix = "");

  // x [R, d] with rows [offsets[g], offsets[g+1]) for group g -> y [R, d] (overwritten).
  std::unique_ptr<ForwardContext> forward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets, Tensor& y);
  // Accumulates parameter gradients; dx [R, d] is overwritten.
  void backward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets, const ForwardContext& saved,
                const Tensor& dy, Tensor& dx);

  std::vector<Parameter*> parameters() override;
  const FfnOptions& options() const { return options_; }
  // 2 FLOPs per multiply-add, one token through one group.
  double flops_per_token() const;
  Parameter& w_in() { return w_in_; }
  Parameter& w_out() { return w_out_; }

 private:
  FfnOptions options_;
  Parameter w_in_, w_out_, b_in_, b_out_;
};

// Routed experts that are one GroupedFfn bank, configured from the ffn_schema() params: the
// `full` and `glu` layouts, and the base of the fine-grained and shared layouts.
class FfnExperts : public Experts {
 public:
  // d_ff < 0 takes the "d_ff" param.
  FfnExperts(const ParamSet& params, const LayerSpec& spec, Ops& ops, Rng& rng, bool gated, int64_t d_ff = -1);

  std::unique_ptr<ForwardContext> forward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets,
                                          Tensor& y) override;
  void backward(Ops& ops, const Tensor& x, const std::vector<int64_t>& offsets, const ForwardContext& saved,
                const Tensor& dy, Tensor& dx) override;
  std::vector<Parameter*> parameters() override { return routed_.parameters(); }
  double flops_per_routed_token() const override { return routed_.flops_per_token(); }

 protected:
  static FfnOptions options_from(const ParamSet& params, const LayerSpec& spec, bool gated, int64_t d_ff,
                                 int64_t groups);
  GroupedFfn routed_;
};

// The schema entries every FFN-based layout shares (d_ff, activation, bias, init_std), so they
// are spelled and documented once.
ParamSchema ffn_schema(int64_t default_d_ff, const std::string& default_activation);

}  // namespace moelab

// DeepSeek-V3's auxiliary-loss-free load balancing (DeepSeek-V3 technical report, sec. 2.1.2,
// eq. 16; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts";
// Megatron-Core's get_updated_expert_bias). Each expert i has a bias b_i that is added to its
// affinity for top-k selection only (the combine weights stay unbiased); after every step
//   b_i += gamma * sign(mean_j load_j - load_i)
// so an overloaded expert becomes less likely to be chosen and an underloaded one more. load_i is
// the number of assignments routed to expert i before capacity (the router's choice, which is
// what the bias steers). The loss is 0 and there is no gradient: the bias is not trained.
//
// The layer owns the bias [E] (saved with the layer's state) and hands it to the router as
// RouterContext::expert_bias. With update_every = n > 1 the loads of n steps are summed and the
// bias moves once; the partial window is not part of a checkpoint, so resume at a multiple of n
// for a bit-exact continuation.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <moelab/plugin.hpp>
#include <numeric>

namespace {

using namespace moelab;

class AuxFreeBias final : public Balancer {
 public:
  static ParamSchema schema() {
    return {
        param_float("gamma", 0.001, "bias update speed gamma (DeepSeek-V3: 0.001)").at_least(0),
        param_int("update_every", 1, "steps whose loads are summed before each bias update").at_least(1),
    };
  }

  AuxFreeBias(const ParamSet& p, const LayerSpec& spec, Ops&, Rng&)
      : gamma_(p.get_float("gamma")),
        update_every_(p.get_int("update_every")),
        experts_(spec.num_experts),
        window_load_(static_cast<size_t>(spec.num_experts), 0) {}

  bool uses_expert_bias() const override { return true; }

  double forward(const RoutingPlan&, const LayerLoad&, const RouterContext&) override { return 0.0; }

  void backward(const RoutingPlan&, const LayerLoad&, const RouterContext&, double, RouterGrad&) override {}

  void after_step(Ops& ops, const LayerLoad& load, Tensor& expert_bias) override {
    MOELAB_CHECK(expert_bias.defined() && expert_bias.numel() == experts_,
                 "aux_free_bias: the layer must hand over a bias of {} experts, got {}", experts_,
                 expert_bias.defined() ? expert_bias.describe() : std::string("none"));
    MOELAB_CHECK(static_cast<int64_t>(load.routed_per_expert.size()) == experts_,
                 "aux_free_bias: load of {} experts for a layer of {}", load.routed_per_expert.size(), experts_);
    for (size_t i = 0; i < window_load_.size(); ++i) window_load_[i] += load.routed_per_expert[i];
    if (++steps_in_window_ < update_every_) return;

    const double mean_load =
        static_cast<double>(std::accumulate(window_load_.begin(), window_load_.end(), int64_t{0})) /
        static_cast<double>(experts_);
    Tensor bias = host_tensor(expert_bias.dtype(), {experts_});
    ops.copy(expert_bias, bias);
    for (int64_t i = 0; i < experts_; ++i) {
      const double gap = mean_load - static_cast<double>(window_load_[static_cast<size_t>(i)]);
      const double sign = gap > 0 ? 1.0 : (gap < 0 ? -1.0 : 0.0);
      set_host_value(bias, i, host_value(bias, i) + gamma_ * sign);
    }
    bias_abs_max_ = 0;
    for (int64_t i = 0; i < experts_; ++i) bias_abs_max_ = std::max(bias_abs_max_, std::abs(host_value(bias, i)));
    ops.copy(bias, expert_bias);
    std::fill(window_load_.begin(), window_load_.end(), 0);
    steps_in_window_ = 0;
  }

  // The bias after the last update: metrics.jsonl's balancers.aux_free_bias.bias_abs_max.
  std::vector<std::pair<std::string, double>> metrics() const override { return {{"bias_abs_max", bias_abs_max_}}; }

 private:
  double bias_abs_max_ = 0;
  double gamma_;
  int64_t update_every_;
  int64_t experts_;
  std::vector<int64_t> window_load_;  // [E]: assignments routed to each expert since the last update
  int64_t steps_in_window_ = 0;
};

}  // namespace

MOELAB_BALANCER_PLUGIN(
    AuxFreeBias, "aux_free_bias", "1.0.0",
    "DeepSeek-V3 auxiliary-loss-free balancing: selection bias b_i += gamma*sign(mean load - load_i)")

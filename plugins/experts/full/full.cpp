// Classic FFN experts: Switch Transformer and GShard (ReLU), or GELU/SiLU.
//   expert(x) = act(x W_in^T + b_in) W_out^T + b_out      (biases optional)
// Stored as w_in [E, F, d] (wi in T5/Switch) and w_out [E, d, F] (wo).
#include <moelab/ffn.hpp>
#include <moelab/plugin.hpp>

namespace {

class FullExperts final : public moelab::FfnExperts {
 public:
  static moelab::ParamSchema schema() { return moelab::ffn_schema(256, "relu"); }
  FullExperts(const moelab::ParamSet& p, const moelab::LayerSpec& spec, moelab::Ops& ops, moelab::Rng& rng)
      : FfnExperts(p, spec, ops, rng, /*gated=*/false) {}
};

}  // namespace

MOELAB_EXPERTS_PLUGIN(FullExperts, "full", "1.0.0",
                      "classic two-layer FFN experts (ReLU/GELU/SiLU), as in Switch and GShard")

// GLU experts (SwiGLU, GeGLU): Mixtral, DeepSeek, Qwen, OLMoE.
//   expert(x) = (act(x W_gate^T) * (x W_up^T)) W_down^T
// Stored fused as w_in [E, 2F, d] = [W_gate ; W_up] and w_out [E, d, F] = W_down.
#include <moelab/ffn.hpp>
#include <moelab/plugin.hpp>

namespace {

class GluExperts final : public moelab::FfnExperts {
 public:
  static moelab::ParamSchema schema() { return moelab::ffn_schema(256, "silu"); }
  GluExperts(const moelab::ParamSet& p, const moelab::LayerSpec& spec, moelab::Ops& ops, moelab::Rng& rng)
      : FfnExperts(p, spec, ops, rng, /*gated=*/true) {}
};

}  // namespace

MOELAB_EXPERTS_PLUGIN(GluExperts, "glu", "1.0.0",
                      "gated-linear-unit experts (SwiGLU/GeGLU), as in Mixtral and DeepSeek")

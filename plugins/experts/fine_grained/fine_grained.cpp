// Fine-grained expert segmentation (DeepSeekMoE, Dai et al. 2024, sec. 3.1): each of the N
// experts the recipe states is split into m experts of width d_ff / m, and each token picks m
// times as many, so the active computation per token stays that of the coarse layout while the
// router can combine experts far more flexibly:
//   recipe: num_experts = N, top_k = K, d_ff = F (the ORIGINAL dense expert width), segments = m
//   layer:  num_experts = m N, top_k = m K, experts of width F / m
// e.g. 16 experts top-2 of width 1024 with m = 4 -> 64 experts top-8 of width 256.
// The experts are ordinary FFN experts (GLU by default, as in DeepSeekMoE), stored like the glu or
// full layout with the fine-grained count: w_in [mN, 2F/m or F/m, d], w_out [mN, d, F/m].
#include <fmt/format.h>

#include <moelab/ffn.hpp>
#include <moelab/plugin.hpp>

namespace {

using namespace moelab;

class FineGrainedExperts final : public FfnExperts {
 public:
  static ParamSchema schema() {
    ParamSchema schema = ffn_schema(1024, "silu");
    for (ParamSpec& spec : schema)
      if (spec.name == "d_ff")
        spec.doc = "width of one ORIGINAL (coarse) expert; each fine-grained expert gets d_ff / segments";
    schema.push_back(param_int("segments", 4,
                               "m: experts each coarse expert is split into (num_experts and "
                               "top_k are multiplied by m)")
                         .at_least(1));
    schema.push_back(param_bool("gated", true, "gated linear units (SwiGLU/GeGLU) as in DeepSeekMoE"));
    return schema;
  }

  static void check(const ParamSet& p, const LayerSpec&, ParamProblems& problems) {
    const int64_t d_ff = p.get_int("d_ff"), segments = p.get_int("segments");
    if (d_ff % segments != 0)
      problems.push_back({"d_ff", fmt::format("must be divisible by segments ({}) so that every fine-grained "
                                              "expert has the same width, got {}",
                                              segments, d_ff)});
  }

  static void adjust_layer(const ParamSet& p, LayerSpec& spec) {
    const int64_t segments = p.get_int("segments");
    spec.num_experts *= segments;
    spec.top_k *= segments;
  }

  FineGrainedExperts(const ParamSet& p, const LayerSpec& spec, Ops& ops, Rng& rng)
      : FfnExperts(p, spec, ops, rng, p.get_bool("gated"), segment_width(p)) {}

 private:
  static int64_t segment_width(const ParamSet& p) {
    const int64_t d_ff = p.get_int("d_ff"), segments = p.get_int("segments");
    MOELAB_CHECK(segments >= 1 && d_ff % segments == 0, "fine_grained: d_ff ({}) must be divisible by segments ({})",
                 d_ff, segments);
    return d_ff / segments;
  }
};

}  // namespace

MOELAB_EXPERTS_PLUGIN(FineGrainedExperts, "fine_grained", "1.0.0",
                      "DeepSeekMoE fine-grained experts: m times the experts and top_k, each 1/m as wide")

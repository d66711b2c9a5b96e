// The held-out evaluation (training.hpp): the mean loss over the eval windows and each MoE
// layer's load over them. On several ranks each rank evaluates its share of every batch; the
// loss and the layers' figures are already global (the model reduces them).
#include "training.hpp"

namespace moelab::training {

void LayerTotals::add(const LayerStats& s) {
  if (tokens_per_expert.empty()) {
    tokens_per_expert.assign(s.tokens_per_expert.size(), 0);
    routed_per_expert.assign(s.routed_per_expert.size(), 0);
  }
  for (size_t e = 0; e < s.tokens_per_expert.size(); ++e) {
    tokens_per_expert[e] += s.tokens_per_expert[e];
    routed_per_expert[e] += s.routed_per_expert[e];
  }
  assignments += s.assignments;
  dropped += s.dropped;
  max_violation += s.max_violation;
  routed_max_violation += s.routed_max_violation;
  router_entropy += s.router_entropy;
  ++forwards;
}

double LayerTotals::drop_fraction() const {
  return assignments > 0 ? static_cast<double>(dropped) / static_cast<double>(assignments) : 0.0;
}
double LayerTotals::mean_max_violation() const {
  return forwards > 0 ? max_violation / static_cast<double>(forwards) : 0.0;
}
double LayerTotals::mean_routed_max_violation() const {
  return forwards > 0 ? routed_max_violation / static_cast<double>(forwards) : 0.0;
}
double LayerTotals::mean_router_entropy() const {
  return forwards > 0 ? router_entropy / static_cast<double>(forwards) : 0.0;
}

Evaluation evaluate(Transformer& model, const std::vector<TokenBatch>& batches, const Parallel& parallel,
                    int64_t step) {
  std::vector<MoeLayer*> layers = model.moe_layers();
  Evaluation e;
  e.layers.resize(layers.size());
  for (const TokenBatch& batch : batches) {
    const StepInput share = rank_share(batch, parallel);
    e.loss +=
        model.forward(share.inputs, share.targets, share.batch, false, step) / static_cast<double>(batches.size());
    for (size_t l = 0; l < layers.size(); ++l) e.layers[l].add(layers[l]->stats());
  }
  return e;
}

}  // namespace moelab::training

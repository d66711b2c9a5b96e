// The step's batch: windows of seq_len + 1 tokens, split into inputs and next-token targets, and
// on several ranks each rank's contiguous share of the windows (training.hpp).
#include <fmt/format.h>

#include "training.hpp"

namespace moelab::training {

StepInput rank_share(const TokenBatch& batch, const Parallel& parallel) {
  const int64_t ranks = parallel.size();
  MOELAB_CHECK(batch.batch % ranks == 0, "a batch of {} windows on {} ranks", batch.batch, ranks);
  StepInput out;
  out.batch = batch.batch / ranks;
  const int64_t first = parallel.rank() * out.batch;
  const int64_t seq_len = batch.window - 1;
  out.inputs.resize(static_cast<size_t>(out.batch * seq_len));
  out.targets.resize(out.inputs.size());
  for (int64_t b = 0; b < out.batch; ++b)
    for (int64_t t = 0; t < seq_len; ++t) {
      const size_t at = static_cast<size_t>((first + b) * batch.window + t);
      out.inputs[static_cast<size_t>(b * seq_len + t)] = batch.tokens[at];
      out.targets[static_cast<size_t>(b * seq_len + t)] = batch.tokens[at + 1];
    }
  return out;
}

}  // namespace moelab::training

// What the language model reads: token windows from the built-in multi-domain Markov corpus, from
// UTF-8 text files (byte-level tokens) or from pre-tokenized uint16/uint32 token files.
//
// A batch is a pure function of (seed, split, batch index): the trainer asks for training batch
// `step` and evaluation batches 0..n-1, so a resumed run reads exactly what an uninterrupted run
// reads, and every evaluation sees the same held-out windows.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "moelab/config.hpp"

namespace moelab {

enum class Split { train, eval };

// `batch` windows of `window` consecutive tokens each (the trainer uses window = seq_len + 1:
// inputs are the first seq_len tokens, targets the last seq_len), row-major.
struct TokenBatch {
  int64_t batch = 0, window = 0;
  std::vector<int32_t> tokens;   // [batch * window]
  std::vector<int32_t> domains;  // [batch]: the domain each window came from; -1 when unknown
};

class TokenData {
 public:
  virtual ~TokenData() = default;
  // Every token is in [0, vocab_size()).
  virtual int64_t vocab_size() const = 0;
  virtual TokenBatch batch(Split split, int64_t index, int64_t batch, int64_t window) const = 0;
  // The source's entropy rate in nats per token, the loss floor a model of unbounded context
  // approaches; NaN when unknown (text and token files).
  virtual double entropy_rate() const { return std::numeric_limits<double>::quiet_NaN(); }
  // The loss of the Bayes-optimal predictor that knows the generating process (but not the
  // domain) on these windows: the mean over predicted positions 1..window-1 of
  // -log p(token | every earlier token of its window), in nats. The exact floor for the model on
  // the same windows. NaN when unknown.
  virtual double optimal_loss(const TokenBatch& batch) const {
    (void)batch;
    return std::numeric_limits<double>::quiet_NaN();
  }
  // One line for the log and the report: "markov: 4 domains, order 1, ..., entropy rate 1.23 nats".
  virtual std::string describe() const = 0;
};

// Builds the source a [data] section describes for a model with `vocab_size` tokens. Throws
// UsageError (the message names the file, and the byte offset where one is at fault) for: a glob
// matching nothing, an unreadable or empty file, a token file whose size is not a multiple of its
// token width, a token >= vocab_size, text that is not UTF-8, a split too short for one window
// of `window` tokens, a vocabulary below 256 for text.
std::unique_ptr<TokenData> make_token_data(const DataConfig& config, int64_t vocab_size, int64_t window, uint64_t seed);

// What make_token_data will hold in memory, in bytes, found without reading a token: the files'
// sizes (globs expanded, each file checked to be there, regular, non-empty and a whole number of
// tokens) or the Markov tables' size. Throws the UsageError make_token_data would for those.
double token_data_bytes(const DataConfig& config, int64_t vocab_size);

// Every refusal of make_token_data without keeping the tokens or building the Markov tables: the
// files are read (text checked to be UTF-8, token ids below vocab_size) and both splits must hold
// a window. Throws UsageError.
void validate_token_data(const DataConfig& config, int64_t vocab_size, int64_t window);

}  // namespace moelab

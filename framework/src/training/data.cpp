// The language model's data: the built-in multi-domain Markov corpus (with its exact entropy rate
// and Bayes-optimal loss, so a run can be judged against the floor), byte-level UTF-8 text, and
// pre-tokenized uint16/uint32 files (nanoGPT's .bin layout).
#include "moelab/data.hpp"

#include <fmt/format.h>
#include <glob.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <optional>
#include <span>
#include <string_view>
#include <system_error>
#include <thread>

#include "../formats/utf8.hpp"
#include "moelab/error.hpp"
#include "moelab/rng.hpp"

namespace moelab {
namespace {

namespace fs = std::filesystem;

// Token files are read into memory as they are; their format is little-endian.
static_assert(std::endian::native == std::endian::little,
              "token files are little-endian; a big-endian host would need byte swapping");

// ---------------------------------------------------------------------------------------------
// Random streams. Rng(seed, stream) gives distinct generators for distinct streams (its mixing is
// a bijection), so every purpose gets its own tagged stream, far from the small stream numbers
// the model's initialisation and routing noise use.

constexpr uint64_t data_stream_tag = 0xda7aULL << 48;
constexpr uint64_t max_batch_index = (1ULL << 40) - 1;

uint64_t batch_stream(Split split, int64_t index) {
  MOELAB_CHECK(index >= 0 && static_cast<uint64_t>(index) <= max_batch_index, "batch index {} out of range", index);
  const uint64_t split_code = split == Split::train ? 1 : 2;
  return data_stream_tag | (split_code << 40) | static_cast<uint64_t>(index);
}

uint64_t markov_table_stream(int64_t domain) {
  return data_stream_tag | (3ULL << 40) | static_cast<uint64_t>(domain);
}

const char* split_name(Split split) {
  return split == Split::train ? "train" : "eval";
}

void check_batch_shape(int64_t index, int64_t batch, int64_t window) {
  MOELAB_CHECK(index >= 0, "batch index {} is negative", index);
  MOELAB_CHECK(batch >= 0 && window >= 1, "a batch needs batch >= 0 and window >= 1, got {} and {}", batch, window);
}

// ---------------------------------------------------------------------------------------------
// Sampling helpers for the Markov tables

// log of a Gamma(shape, 1) draw. Marsaglia & Tsang, "A simple method for generating gamma
// variables" (2000), sec. 2 for shape >= 1; for shape < 1 their boost (sec. 6) Gamma(shape + 1) *
// U^(1/shape), kept in log space because U^(1/shape) underflows for small shapes.
double log_gamma_variate(Rng& rng, double shape) {
  if (shape < 1.0) {
    const double uniform = 1.0 - rng.uniform();  // (0, 1]
    return log_gamma_variate(rng, shape + 1.0) + std::log(uniform) / shape;
  }
  const double d = shape - 1.0 / 3.0;
  const double c = 1.0 / std::sqrt(9.0 * d);
  for (;;) {
    const double x = rng.normal();
    double v = 1.0 + c * x;
    if (v <= 0.0) continue;
    v = v * v * v;
    const double u = 1.0 - rng.uniform();  // (0, 1]
    if (u < 1.0 - 0.0331 * x * x * x * x || std::log(u) < 0.5 * x * x + d * (1.0 - v + std::log(v)))
      return std::log(d) + std::log(v);
  }
}

// A draw from the symmetric Dirichlet(concentration) over out.size() outcomes: normalised gamma
// draws. Very small concentrations may give exact zeros; those successors are then never taken.
void dirichlet(Rng& rng, double concentration, std::span<double> out) {
  double largest = -std::numeric_limits<double>::infinity();
  for (double& value : out) {
    value = log_gamma_variate(rng, concentration);
    largest = std::max(largest, value);
  }
  double total = 0.0;
  for (double& value : out) total += (value = std::exp(value - largest));
  for (double& value : out) value /= total;
}

// out.size() distinct tokens from [0, vocab), sorted. Floyd's algorithm (Bentley & Floyd, "A
// sample of brilliance", CACM 1987): O(out.size()) draws whatever the vocabulary. `taken` is
// a vocab-sized scratch of zeros and is left that way.
void distinct_tokens(Rng& rng, int64_t vocab, std::span<int32_t> out, std::vector<char>& taken) {
  const auto count = static_cast<int64_t>(out.size());
  size_t filled = 0;
  for (int64_t limit = vocab - count; limit < vocab; ++limit) {
    auto token = static_cast<int64_t>(rng.below(static_cast<uint64_t>(limit + 1)));
    if (taken[static_cast<size_t>(token)]) token = limit;
    taken[static_cast<size_t>(token)] = 1;
    out[filled++] = static_cast<int32_t>(token);
  }
  for (int32_t token : out) taken[static_cast<size_t>(token)] = 0;
  std::sort(out.begin(), out.end());
}

double entropy_of(std::span<const double> probabilities) {
  double entropy = 0.0;
  for (double p : probabilities)
    if (p > 0.0) entropy -= p * std::log(p);
  return entropy;
}

double log_sum_exp(std::span<const double> values) {
  const double largest = *std::max_element(values.begin(), values.end());
  if (largest == -std::numeric_limits<double>::infinity()) return largest;
  double total = 0.0;
  for (double value : values) total += std::exp(value - largest);
  return largest + std::log(total);
}

// Runs task(i) for every i in [0, tasks) on up to hardware_concurrency threads, each taking the
// next unclaimed index (domains may differ a lot in cost), when `work` (about a nanosecond a unit)
// pays for starting threads. Tasks write only their own results, so the outcome does not depend
// on the number of threads.
template <class Task>
void run_in_parallel(int64_t tasks, double work, const Task& task) {
  constexpr double min_parallel_work = 1e6;
  const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t threads = work < min_parallel_work ? 1 : std::min(tasks, hardware);
  std::atomic<int64_t> next{0};
  std::vector<std::exception_ptr> errors(static_cast<size_t>(tasks));
  const auto worker = [&] {
    for (int64_t i = next++; i < tasks; i = next++) {
      try {
        task(i);
      } catch (...) {
        errors[static_cast<size_t>(i)] = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(worker);
    } catch (const std::system_error&) {
      break;  // no more threads to be had: the others and this one share the work
    }
  }
  worker();
  for (auto& thread : pool) thread.join();
  for (const auto& error : errors)
    if (error) std::rethrow_exception(error);
}

// ---------------------------------------------------------------------------------------------
// Markov corpus

// Above this many table entries (domains * contexts * branching) the tables and the stationary
// distributions stop being cheap: about 12 bytes an entry, and every power iteration visits each.
constexpr int64_t max_markov_entries = int64_t{1} << 26;
constexpr double markov_bytes_per_entry = 12;  // a successor token (i32) and its probability (f64)
// Stationary distributions: stop when the estimated L1 distance to the limit is below this.
constexpr double stationary_tolerance = 1e-12;
// A step that moves the distribution less than this (L1) only reshuffles rounding errors.
constexpr double stationary_rounding_floor = 1e-15;
// ... or after this much work (entries visited), but never fewer than min_stationary_iterations.
constexpr double stationary_work_budget = 0x1.0p32;
constexpr int64_t min_stationary_iterations = 2000, max_stationary_iterations = 1'000'000;

struct MarkovShape {
  int64_t vocab = 0, order = 0, branching = 0, domains = 0;
  int64_t contexts = 1;       // vocab^order
  int64_t shift_modulus = 1;  // vocab^(order-1): dropping the oldest token of a context
};

MarkovShape markov_shape(const DataConfig& config, int64_t vocab_size) {
  if (vocab_size < 1)
    throw UsageError(
        fmt::format("the markov corpus draws tokens from the model's vocabulary, but model.vocab_size "
                    "is {}; set model.vocab_size (for example 256)",
                    vocab_size));
  if (config.domains < 1) throw UsageError(fmt::format("data.domains must be at least 1, got {}", config.domains));
  if (config.order < 0) throw UsageError(fmt::format("data.order must be at least 0, got {}", config.order));
  if (config.branching < 1 || config.branching > vocab_size)
    throw UsageError(
        fmt::format("data.branching must be between 1 and model.vocab_size ({}): a context has at "
                    "most that many distinct successors; got {}",
                    vocab_size, config.branching));
  if (!(config.concentration > 0.0) || !std::isfinite(config.concentration))
    throw UsageError(fmt::format("data.concentration must be a positive finite number, got {}", config.concentration));

  MarkovShape shape{vocab_size, config.order, config.branching, config.domains};
  const auto too_big = [&] {
    return UsageError(fmt::format(
        "the markov corpus would need model.vocab_size^data.order * data.branching * data.domains = {}^{} * {} * {} "
        "table entries, more than the limit of {}; reduce data.order, data.branching, data.domains or "
        "model.vocab_size",
        vocab_size, config.order, config.branching, config.domains, max_markov_entries));
  };
  // Divisions, not products, so that no count overflows on the way to the refusal.
  if (config.domains > max_markov_entries / config.branching) throw too_big();
  const int64_t per_context = config.domains * config.branching;
  for (int64_t i = 0; i < config.order; ++i) {
    if (shape.contexts > max_markov_entries / per_context / vocab_size) throw too_big();
    shape.shift_modulus = shape.contexts;
    shape.contexts *= vocab_size;
  }
  return shape;
}

class MarkovCorpus final : public TokenData {
 public:
  MarkovCorpus(const DataConfig& config, int64_t vocab_size, uint64_t seed)
      : shape_(markov_shape(config, vocab_size)), concentration_(config.concentration), seed_(seed) {
    build_tables();
    compute_entropy_rate();
  }

  int64_t vocab_size() const override { return shape_.vocab; }

  TokenBatch batch(Split split, int64_t index, int64_t batch, int64_t window) const override {
    check_batch_shape(index, batch, window);
    TokenBatch out{batch, window, std::vector<int32_t>(static_cast<size_t>(batch * window)),
                   std::vector<int32_t>(static_cast<size_t>(batch))};
    Rng rng(seed_, batch_stream(split, index));
    for (int64_t row = 0; row < batch; ++row) {
      const auto domain = static_cast<int64_t>(rng.below(static_cast<uint64_t>(shape_.domains)));
      out.domains[static_cast<size_t>(row)] = static_cast<int32_t>(domain);
      int32_t* tokens = out.tokens.data() + row * window;
      int64_t context = 0;
      for (int64_t t = 0; t < window; ++t) {
        // The first `order` tokens are uniform, so the optimal predictor for them is exactly 1/V.
        const int32_t token = t < shape_.order ? static_cast<int32_t>(rng.below(static_cast<uint64_t>(shape_.vocab)))
                                               : next_token(domain, context, rng);
        tokens[t] = token;
        context = next_context(context, token);
      }
    }
    return out;
  }

  double entropy_rate() const override { return entropy_rate_; }

  double optimal_loss(const TokenBatch& batch) const override {
    MOELAB_CHECK(
        batch.batch >= 0 && batch.window >= 1 && batch.tokens.size() == static_cast<size_t>(batch.batch * batch.window),
        "a batch of {} windows of {} tokens holds {} tokens", batch.batch, batch.window, batch.tokens.size());
    const int64_t predicted = batch.batch * (batch.window - 1);
    if (predicted == 0) return std::numeric_limits<double>::quiet_NaN();
    double total = 0.0;
    for (int64_t row = 0; row < batch.batch; ++row) {
      total += window_loss(std::span<const int32_t>(batch.tokens)
                               .subspan(static_cast<size_t>(row * batch.window), static_cast<size_t>(batch.window)));
      if (std::isinf(total)) return total;
    }
    return total / static_cast<double>(predicted);
  }

  std::string describe() const override {
    std::string text = fmt::format(
        "markov: {} domains, order {}, vocabulary {}, branching {}, concentration {}, entropy rate {:.6f} nats/token",
        shape_.domains, shape_.order, shape_.vocab, shape_.branching, concentration_, entropy_rate_);
    if (stationary_residual_ > stationary_tolerance)
      text += fmt::format(" (stationary distributions not converged: L1 distance about {:.2e} after {} iterations)",
                          stationary_residual_, stationary_iterations_);
    return text;
  }

 private:
  size_t row_offset(int64_t domain, int64_t context) const {
    return static_cast<size_t>((domain * shape_.contexts + context) * shape_.branching);
  }
  std::span<const int32_t> successors(int64_t domain, int64_t context) const {
    return {successors_.data() + row_offset(domain, context), static_cast<size_t>(shape_.branching)};
  }
  std::span<const double> probabilities(int64_t domain, int64_t context) const {
    return {probabilities_.data() + row_offset(domain, context), static_cast<size_t>(shape_.branching)};
  }

  int64_t next_context(int64_t context, int32_t token) const {
    if (shape_.order == 0) return 0;
    return (context % shape_.shift_modulus) * shape_.vocab + token;
  }

  int32_t next_token(int64_t domain, int64_t context, Rng& rng) const {
    const auto next = successors(domain, context);
    const auto p = probabilities(domain, context);
    const double target = rng.uniform();
    double cumulative = 0.0;
    for (size_t j = 0; j < p.size(); ++j) {
      cumulative += p[j];
      if (target < cumulative) return next[j];
    }
    // Rounding left the target just above the sum: take the last successor that can occur.
    for (size_t j = p.size(); j-- > 0;)
      if (p[j] > 0.0) return next[j];
    MOELAB_CHECK(false, "markov context {} of domain {} has no successor with positive probability", context, domain);
    return 0;
  }

  // log p(token | context) in `domain`; -inf when the token is not one of the context's successors.
  double log_probability(int64_t domain, int64_t context, int32_t token) const {
    const auto next = successors(domain, context);
    const auto found = std::lower_bound(next.begin(), next.end(), token);
    if (found == next.end() || *found != token) return -std::numeric_limits<double>::infinity();
    return std::log(probabilities(domain, context)[static_cast<size_t>(found - next.begin())]);
  }

  // Sum over positions 1..window-1 of -log p(token | earlier tokens), the domain unknown: a
  // mixture over domains weighted by the posterior, kept normalised in log space.
  double window_loss(std::span<const int32_t> tokens) const {
    const auto domains = static_cast<size_t>(shape_.domains);
    std::vector<double> log_posterior(domains, -std::log(static_cast<double>(shape_.domains)));
    std::vector<double> log_joint(domains);
    const double log_vocab = std::log(static_cast<double>(shape_.vocab));
    double loss = 0.0;
    int64_t context = 0;
    for (size_t t = 0; t < tokens.size(); ++t) {
      const int32_t token = tokens[t];
      MOELAB_CHECK(token >= 0 && token < shape_.vocab, "token {} is outside the vocabulary of {}", token, shape_.vocab);
      if (t >= 1 && static_cast<int64_t>(t) < shape_.order) {
        loss += log_vocab;  // uniform and independent of the domain: no evidence
      } else if (t >= 1) {
        for (size_t d = 0; d < domains; ++d)
          log_joint[d] = log_posterior[d] + log_probability(static_cast<int64_t>(d), context, token);
        const double log_predictive = log_sum_exp(log_joint);
        if (log_predictive == -std::numeric_limits<double>::infinity()) return std::numeric_limits<double>::infinity();
        loss -= log_predictive;
        for (size_t d = 0; d < domains; ++d) log_posterior[d] = log_joint[d] - log_predictive;
      }
      context = next_context(context, token);
    }
    return loss;
  }

  // Every domain's successors and transition probabilities, from the seed alone (one stream per
  // domain, contexts in order).
  void build_tables() {
    const auto entries = static_cast<size_t>(shape_.domains * shape_.contexts * shape_.branching);
    successors_.resize(entries);
    probabilities_.resize(entries);
    run_in_parallel(shape_.domains, 30.0 * static_cast<double>(entries), [&](int64_t domain) {
      Rng rng(seed_, markov_table_stream(domain));
      std::vector<char> taken(static_cast<size_t>(shape_.vocab), 0);
      const auto width = static_cast<size_t>(shape_.branching);
      for (int64_t context = 0; context < shape_.contexts; ++context) {
        const size_t offset = row_offset(domain, context);
        distinct_tokens(rng, shape_.vocab, std::span<int32_t>(successors_.data() + offset, width), taken);
        dirichlet(rng, concentration_, std::span<double>(probabilities_.data() + offset, width));
      }
    });
  }

  // The rate is lim (1/n) H(X_1..X_n) = the mean over domains of sum_ctx pi_d(ctx) H(next | ctx),
  // where pi_d is the Cesaro limit of the context distribution started, as windows start, from the
  // uniform one. That limit is the projection onto the chain's eigenvalue-1 eigenspace; the lazy
  // chain (I + P) / 2 has the same eigenspace and no other eigenvalue on the unit circle, so its
  // plain power iteration converges to the same limit geometrically, periodic and reducible
  // chains included, where the Cesaro mean itself would converge only as 1/n.
  void compute_entropy_rate() {
    std::vector<StationaryRate> rates(static_cast<size_t>(shape_.domains));
    run_in_parallel(shape_.domains, 1e3 * static_cast<double>(successors_.size()),
                    [&](int64_t domain) { rates[static_cast<size_t>(domain)] = domain_entropy_rate(domain); });
    double total = 0.0;
    for (const StationaryRate& rate : rates) {
      total += rate.rate;
      stationary_iterations_ = std::max(stationary_iterations_, rate.iterations);
      stationary_residual_ = std::max(stationary_residual_, rate.distance_left);
    }
    entropy_rate_ = total / static_cast<double>(shape_.domains);
  }

  // distribution <- distribution (I + P) / 2 for `domain`'s chain; returns the L1 change.
  // `stepped` is scratch of the same size. Contexts are visited as (oldest token, the rest), so the
  // context they move to, (the rest) * V + next, needs no division.
  double lazy_step(int64_t domain, std::vector<double>& distribution, std::vector<double>& stepped) const {
    std::fill(stepped.begin(), stepped.end(), 0.0);
    const int64_t oldest_tokens = shape_.order == 0 ? 1 : shape_.vocab;
    const int64_t rests = shape_.order == 0 ? 1 : shape_.shift_modulus;
    const int64_t rest_stride = shape_.order == 0 ? 0 : shape_.vocab;
    int64_t context = 0;
    for (int64_t oldest = 0; oldest < oldest_tokens; ++oldest) {
      for (int64_t rest = 0; rest < rests; ++rest, ++context) {
        const double mass = distribution[static_cast<size_t>(context)];
        if (mass == 0.0) continue;
        const int32_t* next = successors_.data() + row_offset(domain, context);
        const double* p = probabilities_.data() + row_offset(domain, context);
        double* target = stepped.data() + rest * rest_stride;
        for (int64_t j = 0; j < shape_.branching; ++j) target[next[j]] += mass * p[j];
      }
    }
    double change = 0.0;
    for (size_t c = 0; c < distribution.size(); ++c) {
      const double lazy = 0.5 * (distribution[c] + stepped[c]);
      change += std::abs(lazy - distribution[c]);
      distribution[c] = lazy;
    }
    return change;
  }

  struct StationaryRate {
    double rate = 0.0;
    int64_t iterations = 0;
    double distance_left = 0.0;  // estimated L1 distance of the distribution used to the limit
  };

  StationaryRate domain_entropy_rate(int64_t domain) const {
    const auto contexts = static_cast<size_t>(shape_.contexts);
    std::vector<double> context_entropy(contexts);
    for (size_t c = 0; c < contexts; ++c)
      context_entropy[c] = entropy_of(probabilities(domain, static_cast<int64_t>(c)));
    // Every context equally uncertain (branching 1, say): the distribution does not matter.
    if (std::all_of(context_entropy.begin(), context_entropy.end(), [&](double h) { return h == context_entropy[0]; }))
      return {context_entropy[0], 0, 0.0};

    const auto max_iterations = static_cast<int64_t>(
        std::clamp(stationary_work_budget / static_cast<double>(shape_.contexts * shape_.branching),
                   static_cast<double>(min_stationary_iterations), static_cast<double>(max_stationary_iterations)));
    std::vector<double> distribution(contexts, 1.0 / static_cast<double>(contexts));
    std::vector<double> stepped(contexts);
    // The distance left to the limit, estimated from the recent contraction: with ratio r per step
    // it is at most change / (1 - r). A small change alone can hide slow mixing (a state left with
    // probability 0.004 per step, say); the ratio is taken over several steps because the lazy
    // chain's complex eigenvalues make single steps oscillate.
    constexpr int64_t ratio_span = 8;
    std::vector<double> changes;
    double distance_left = std::numeric_limits<double>::infinity();
    int64_t iteration = 0;
    while (distance_left >= stationary_tolerance && iteration < max_iterations) {
      const double change = lazy_step(domain, distribution, stepped);
      ++iteration;
      changes.push_back(change);
      if (change < stationary_rounding_floor) {
        distance_left = change;  // what is left is rounding, not mixing
      } else if (changes.size() > static_cast<size_t>(ratio_span)) {
        const double ratio = std::pow(change / changes[changes.size() - 1 - ratio_span], 1.0 / ratio_span);
        distance_left = ratio < 1.0 ? change / (1.0 - ratio) : std::numeric_limits<double>::infinity();
      }
    }
    double rate = 0.0;
    for (size_t c = 0; c < contexts; ++c) rate += distribution[c] * context_entropy[c];
    return {rate, iteration, distance_left};
  }

  MarkovShape shape_;
  double concentration_;
  uint64_t seed_;
  std::vector<int32_t> successors_;    // [domain][context][branching], sorted within a context
  std::vector<double> probabilities_;  // same layout
  double entropy_rate_ = 0.0;
  int64_t stationary_iterations_ = 0;  // the most any domain needed
  double stationary_residual_ = 0.0;   // the largest estimated L1 distance to the limit of any domain
};

// ---------------------------------------------------------------------------------------------
// Files

template <class... Args>
[[noreturn]] void fail_file(const fs::path& file, fmt::format_string<Args...> format, Args&&... args) {
  throw UsageError(fmt::format("{}: {}", file.string(), fmt::format(format, std::forward<Args>(args)...)));
}

bool has_glob_characters(const std::string& pattern) {
  return pattern.find_first_of("*?[") != std::string::npos;
}

// The files data.paths names, every glob expanded (POSIX glob(3)), sorted, each once.
std::vector<fs::path> matched_files(const std::vector<fs::path>& patterns, const std::string& kind) {
  if (patterns.empty())
    throw UsageError(
        fmt::format("data.kind = \"{}\" reads files, but data.paths is empty; list the files or globs "
                    "to read",
                    kind));
  std::vector<fs::path> files;
  for (const fs::path& pattern : patterns) {
    glob_t matches{};
    const int status = ::glob(pattern.c_str(), 0, nullptr, &matches);
    std::vector<fs::path> found(matches.gl_pathv, matches.gl_pathv + (status == 0 ? matches.gl_pathc : 0));
    ::globfree(&matches);
    if (status == GLOB_NOMATCH) {
      if (has_glob_characters(pattern.string()))
        throw UsageError(fmt::format("data.paths: the glob '{}' matches no file", pattern.string()));
      fail_file(pattern, "no such file (named in data.paths)");
    }
    if (status != 0)
      throw UsageError(
          fmt::format("data.paths: could not expand '{}' (a folder on the way is unreadable)", pattern.string()));
    files.insert(files.end(), found.begin(), found.end());
  }
  std::sort(files.begin(), files.end());
  files.erase(std::unique(files.begin(), files.end()), files.end());
  return files;
}

// A readable, non-empty regular file's size in bytes.
uint64_t regular_file_size(const fs::path& file) {
  std::error_code error;
  const fs::file_status status = fs::status(file, error);
  if (error) fail_file(file, "cannot read: {}", error.message());
  if (fs::is_directory(status)) fail_file(file, "is a folder; name the files in it (for example {}/*)", file.string());
  if (!fs::is_regular_file(status)) fail_file(file, "is not a regular file");
  const uint64_t size = fs::file_size(file, error);
  if (error) fail_file(file, "cannot read its size: {}", error.message());
  if (size == 0) fail_file(file, "is empty");
  return size;
}

void read_exactly(const fs::path& file, char* destination, uint64_t bytes) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail_file(file, "cannot open: {}", std::generic_category().message(errno));
  in.read(destination, static_cast<std::streamsize>(bytes));
  if (static_cast<uint64_t>(in.gcount()) != bytes)
    fail_file(file, "could read only {} of its {} bytes (did it change while being read?)", in.gcount(), bytes);
}

// Every file's tokens, concatenated into one vector (read straight into place), with where each
// file's tokens start, for messages.
template <class Token>
struct ConcatenatedTokens {
  std::vector<Token> tokens;
  std::vector<fs::path> files;
  std::vector<size_t> starts;  // token index where each file begins
};

template <class Token>
ConcatenatedTokens<Token> read_token_files(const std::vector<fs::path>& files, const std::string& dtype_name) {
  ConcatenatedTokens<Token> out;
  out.files = files;
  uint64_t total = 0;
  for (const fs::path& file : files) {
    const uint64_t size = regular_file_size(file);
    if (size % sizeof(Token) != 0)
      fail_file(file, "holds {} bytes, not a multiple of {} (the width of a {} token); is data.token_dtype right?",
                size, sizeof(Token), dtype_name);
    out.starts.push_back(static_cast<size_t>(total));
    total += size / sizeof(Token);
  }
  out.tokens.resize(static_cast<size_t>(total));
  for (size_t i = 0; i < files.size(); ++i) {
    const size_t end = i + 1 < files.size() ? out.starts[i + 1] : out.tokens.size();
    read_exactly(files[i], reinterpret_cast<char*>(out.tokens.data() + out.starts[i]),
                 (end - out.starts[i]) * sizeof(Token));
  }
  return out;
}

// Windows at random offsets of one stored token sequence, split into train and eval at a fixed
// point: the same class serves text (bytes) and token files.
template <class Token>
class StoredTokens final : public TokenData {
 public:
  StoredTokens(std::vector<Token> tokens, int64_t eval_size, int64_t vocab, std::string summary, uint64_t seed)
      : tokens_(std::move(tokens)),
        train_size_(static_cast<int64_t>(tokens_.size()) - eval_size),
        vocab_(vocab),
        summary_(std::move(summary)),
        seed_(seed) {}

  int64_t vocab_size() const override { return vocab_; }

  int64_t split_size(Split split) const {
    return split == Split::train ? train_size_ : static_cast<int64_t>(tokens_.size()) - train_size_;
  }

  // Throws the UsageError for a split too short for one window.
  void require_window(Split split, int64_t window) const {
    const int64_t size = split_size(split);
    if (size >= window) return;
    throw UsageError(fmt::format(
        "{}: the {} split holds {} tokens but a window needs {} (train.seq_len + 1); use a shorter train.seq_len, "
        "more data{}",
        summary_, split_name(split), size, window,
        split == Split::eval ? " or a larger data.eval_fraction" : " or a smaller data.eval_fraction"));
  }

  TokenBatch batch(Split split, int64_t index, int64_t batch, int64_t window) const override {
    check_batch_shape(index, batch, window);
    require_window(split, window);
    TokenBatch out{batch, window, std::vector<int32_t>(static_cast<size_t>(batch * window)),
                   std::vector<int32_t>(static_cast<size_t>(batch), -1)};
    const int64_t split_start = split == Split::train ? 0 : train_size_;
    const auto starts = static_cast<uint64_t>(split_size(split) - window + 1);
    Rng rng(seed_, batch_stream(split, index));
    for (int64_t row = 0; row < batch; ++row) {
      const Token* source = tokens_.data() + split_start + static_cast<int64_t>(rng.below(starts));
      std::copy(source, source + window, out.tokens.begin() + row * window);
    }
    return out;
  }

  std::string describe() const override {
    return fmt::format("{}: {} tokens, train {} and eval {}, vocabulary {}", summary_, tokens_.size(), train_size_,
                       split_size(Split::eval), vocab_);
  }

 private:
  std::vector<Token> tokens_;
  int64_t train_size_;
  int64_t vocab_;
  std::string summary_;  // "text: 3 files" / "tokens (u16): 2 files"
  uint64_t seed_;
};

void check_eval_fraction(double eval_fraction) {
  if (!(eval_fraction > 0.0 && eval_fraction < 1.0))
    throw UsageError(fmt::format("data.eval_fraction must be between 0 and 1 (exclusive), got {}", eval_fraction));
}

// The last eval_fraction of the tokens, rounded to the nearest token.
int64_t eval_size_of(size_t tokens, double eval_fraction) {
  return static_cast<int64_t>(std::llround(static_cast<double>(tokens) * eval_fraction));
}

template <class Token>
std::unique_ptr<TokenData> finish(std::vector<Token> tokens, const DataConfig& config, int64_t vocab,
                                  std::string summary, int64_t window, uint64_t seed) {
  const int64_t eval_size = eval_size_of(tokens.size(), config.eval_fraction);
  auto data = std::make_unique<StoredTokens<Token>>(std::move(tokens), eval_size, vocab, std::move(summary), seed);
  data->require_window(Split::train, window);
  data->require_window(Split::eval, window);
  return data;
}

std::string files_summary(const std::string& kind, size_t files) {
  return fmt::format("{}: {} file{}", kind, files, files == 1 ? "" : "s");
}

std::unique_ptr<TokenData> make_text_data(const DataConfig& config, int64_t vocab_size, int64_t window, uint64_t seed) {
  constexpr int64_t byte_vocab = 256;
  if (vocab_size < byte_vocab)
    throw UsageError(
        fmt::format("data.kind = \"text\" reads byte-level tokens (256 of them) but model.vocab_size is "
                    "{}; set model.vocab_size = 256",
                    vocab_size));
  check_eval_fraction(config.eval_fraction);
  const std::vector<fs::path> files = matched_files(config.paths, "text");
  ConcatenatedTokens<uint8_t> text = read_token_files<uint8_t>(files, "byte");
  for (size_t i = 0; i < files.size(); ++i) {
    const size_t end = i + 1 < files.size() ? text.starts[i + 1] : text.tokens.size();
    const std::string_view bytes(reinterpret_cast<const char*>(text.tokens.data() + text.starts[i]),
                                 end - text.starts[i]);
    if (const auto offset = invalid_utf8_at(bytes))
      fail_file(files[i], "is not UTF-8: invalid sequence at byte offset {} (byte 0x{:02x})", *offset,
                static_cast<unsigned char>(bytes[*offset]));
  }
  return finish(std::move(text.tokens), config, byte_vocab, files_summary("text", files.size()), window, seed);
}

template <class Token>
std::unique_ptr<TokenData> make_token_file_data(const DataConfig& config, int64_t vocab_size, int64_t window,
                                                uint64_t seed) {
  const std::vector<fs::path> files = matched_files(config.paths, "tokens");
  ConcatenatedTokens<Token> read = read_token_files<Token>(files, config.token_dtype);
  for (size_t i = 0; i < files.size(); ++i) {
    const size_t end = i + 1 < files.size() ? read.starts[i + 1] : read.tokens.size();
    for (size_t k = read.starts[i]; k < end; ++k) {
      if (static_cast<int64_t>(read.tokens[k]) < vocab_size) continue;
      const size_t in_file = k - read.starts[i];
      fail_file(files[i],
                "token {} (byte offset {}) is {}, not below model.vocab_size = {}; raise model.vocab_size to the "
                "tokenizer's vocabulary or check data.token_dtype",
                in_file, in_file * sizeof(Token), read.tokens[k], vocab_size);
    }
  }
  return finish(std::move(read.tokens), config, vocab_size,
                files_summary(fmt::format("tokens ({})", config.token_dtype), files.size()), window, seed);
}

std::unique_ptr<TokenData> make_tokens_data(const DataConfig& config, int64_t vocab_size, int64_t window,
                                            uint64_t seed) {
  if (vocab_size < 1)
    throw UsageError(
        fmt::format("data.kind = \"tokens\" needs model.vocab_size (the tokenizer's vocabulary), got {}", vocab_size));
  check_eval_fraction(config.eval_fraction);
  if (config.token_dtype == "u16") return make_token_file_data<uint16_t>(config, vocab_size, window, seed);
  if (config.token_dtype == "u32") return make_token_file_data<uint32_t>(config, vocab_size, window, seed);
  throw UsageError(fmt::format("data.token_dtype must be \"u16\" or \"u32\", got \"{}\"", config.token_dtype));
}

}  // namespace

std::unique_ptr<TokenData> make_token_data(const DataConfig& config, int64_t vocab_size, int64_t window,
                                           uint64_t seed) {
  MOELAB_CHECK(window >= 1, "a window holds at least one token, got {}", window);
  if (config.kind == "markov") return std::make_unique<MarkovCorpus>(config, vocab_size, seed);
  if (config.kind == "text") return make_text_data(config, vocab_size, window, seed);
  if (config.kind == "tokens") return make_tokens_data(config, vocab_size, window, seed);
  throw UsageError(fmt::format("data.kind must be \"markov\", \"text\" or \"tokens\", got \"{}\"", config.kind));
}

double token_data_bytes(const DataConfig& config, int64_t vocab_size) {
  if (config.kind == "markov") {
    const MarkovShape shape = markov_shape(config, vocab_size);
    return static_cast<double>(shape.contexts) * static_cast<double>(shape.branching * shape.domains) *
           markov_bytes_per_entry;
  }
  if (config.kind != "text" && config.kind != "tokens")
    throw UsageError(fmt::format("data.kind must be \"markov\", \"text\" or \"tokens\", got \"{}\"", config.kind));
  const uint64_t width = config.kind == "text" ? 1 : config.token_dtype == "u32" ? 4 : 2;
  double bytes = 0;
  for (const fs::path& file : matched_files(config.paths, config.kind)) {
    const uint64_t size = regular_file_size(file);
    if (size % width != 0)
      fail_file(file, "holds {} bytes, not a multiple of {} (the width of a {} token); is data.token_dtype right?",
                size, width, config.token_dtype);
    bytes += static_cast<double>(size);  // text (u8) and token files are held as read
  }
  return bytes;
}

void validate_token_data(const DataConfig& config, int64_t vocab_size, int64_t window) {
  if (config.kind == "markov") {
    markov_shape(config, vocab_size);  // the tables themselves are the run's to build
    return;
  }
  // The file corpora: read and checked exactly as a run reads them, then let go.
  make_token_data(config, vocab_size, window, 0);
}

}  // namespace moelab

// The language model's data sources: batches are a pure function of (seed, split, index); the
// Markov corpus's entropy rate and optimal loss are checked against hand-computed chains and
// against the windows it generates; text and token files round trip, and every malformed input
// is a UsageError that names the file and says what to change.
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>

#include "moelab/data.hpp"
#include "moelab/error.hpp"
#include "moelab/rng.hpp"
#include "test_files.hpp"

namespace fs = std::filesystem;
using namespace moelab;

using test::ScratchFolder;
using test::usage_error;
using test::write_bytes;

namespace {

#define CHECK_CONTAINS(text, part) CHECK_MESSAGE((text).find(part) != std::string::npos, (text))

template <class Token>
void write_tokens(const fs::path& path, const std::vector<Token>& tokens) {
  std::string bytes(tokens.size() * sizeof(Token), '\0');
  std::memcpy(bytes.data(), tokens.data(), bytes.size());  // the host is little-endian, as the format
  write_bytes(path, bytes);
}

DataConfig markov(int64_t domains, int64_t order, int64_t branching, double concentration = 1.0) {
  DataConfig config;
  config.kind = "markov";
  config.domains = domains;
  config.order = order;
  config.branching = branching;
  config.concentration = concentration;
  return config;
}

DataConfig files(const std::string& kind, std::vector<fs::path> paths, double eval_fraction = 0.1) {
  DataConfig config;
  config.kind = kind;
  config.paths = std::move(paths);
  config.eval_fraction = eval_fraction;
  return config;
}

std::unique_ptr<TokenData> make(const DataConfig& config, int64_t vocab, int64_t window = 65, uint64_t seed = 7) {
  return make_token_data(config, vocab, window, seed);
}

// A single window, as optimal_loss reads it.
TokenBatch one_window(std::vector<int32_t> tokens) {
  TokenBatch batch;
  batch.batch = 1;
  batch.window = static_cast<int64_t>(tokens.size());
  batch.tokens = std::move(tokens);
  batch.domains = {-1};
  return batch;
}

// -log p(x_1 .. x_{w-1} | x_0) under the optimal predictor: the window's summed loss.
double sequence_loss(const TokenData& data, std::vector<int32_t> tokens) {
  const auto predicted = static_cast<double>(tokens.size() - 1);
  return data.optimal_loss(one_window(std::move(tokens))) * predicted;
}

// p(next | previous) of a one-domain, order-1 corpus, read back through optimal_loss.
double transition(const TokenData& data, int32_t previous, int32_t next) {
  return std::exp(-sequence_loss(data, {previous, next}));
}

double binary_entropy(double p) {
  double h = 0.0;
  for (double q : {p, 1.0 - p})
    if (q > 0.0) h -= q * std::log(q);
  return h;
}

void check_batches_are_pure(const TokenData& data, int64_t window) {
  const TokenBatch first = data.batch(Split::train, 3, 4, window);
  const TokenBatch again = data.batch(Split::train, 3, 4, window);
  REQUIRE(first.tokens.size() == static_cast<size_t>(4 * window));
  REQUIRE(first.domains.size() == 4);
  CHECK(first.batch == 4);
  CHECK(first.window == window);
  CHECK(first.tokens == again.tokens);
  CHECK(first.domains == again.domains);
  CHECK(data.batch(Split::train, 4, 4, window).tokens != first.tokens);
  CHECK(data.batch(Split::eval, 3, 4, window).tokens != first.tokens);
  for (Split split : {Split::train, Split::eval})
    for (int64_t index = 0; index < 20; ++index)
      for (int32_t token : data.batch(split, index, 4, window).tokens) {
        REQUIRE(token >= 0);
        REQUIRE(token < data.vocab_size());
      }
}

// Plug-in estimate of the entropy rate of windows from an order-`order` source whose domain each
// window records: each domain's rate from counts of (context, next) after `burn_in` positions (so
// the context distribution is close to the long-run one), then the plain mean over domains, as
// each window's domain is uniform (the sample's domain counts are not exactly equal).
double plug_in_entropy(const TokenBatch& batch, int64_t vocab, int64_t order, int64_t domains, int64_t burn_in) {
  int64_t contexts = 1;
  for (int64_t i = 0; i < order; ++i) contexts *= vocab;
  std::vector<int64_t> pair_counts(static_cast<size_t>(domains * contexts * vocab), 0);
  for (int64_t row = 0; row < batch.batch; ++row) {
    const int32_t* tokens = batch.tokens.data() + row * batch.window;
    const int64_t domain = batch.domains[static_cast<size_t>(row)];
    for (int64_t t = std::max(order, burn_in); t < batch.window; ++t) {
      int64_t context = 0;
      for (int64_t k = t - order; k < t; ++k) context = context * vocab + tokens[k];
      ++pair_counts[static_cast<size_t>((domain * contexts + context) * vocab + tokens[t])];
    }
  }
  double mean = 0.0;
  for (int64_t domain = 0; domain < domains; ++domain) {
    double entropy = 0.0;
    int64_t total = 0;
    for (int64_t context = 0; context < contexts; ++context) {
      const auto row = static_cast<size_t>((domain * contexts + context) * vocab);
      int64_t context_count = 0;
      for (int64_t next = 0; next < vocab; ++next) context_count += pair_counts[row + static_cast<size_t>(next)];
      for (int64_t next = 0; next < vocab; ++next) {
        const auto count = static_cast<double>(pair_counts[row + static_cast<size_t>(next)]);
        if (count > 0) entropy -= count * std::log(count / static_cast<double>(context_count));
      }
      total += context_count;
    }
    REQUIRE(total > 0);
    mean += entropy / static_cast<double>(total) / static_cast<double>(domains);
  }
  return mean;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Markov corpus

TEST_CASE("markov batches are a pure function of seed, split and index") {
  const auto data = make(markov(4, 2, 3), 12);
  CHECK(data->vocab_size() == 12);
  check_batches_are_pure(*data, 33);

  // Tables and windows come from the seed alone: a second corpus from the same seed reads the
  // same batches, one from another seed does not.
  const TokenBatch batch = data->batch(Split::eval, 5, 8, 40);
  const TokenBatch rebuilt = make(markov(4, 2, 3), 12)->batch(Split::eval, 5, 8, 40);
  CHECK(batch.tokens == rebuilt.tokens);
  CHECK(batch.domains == rebuilt.domains);
  CHECK(make(markov(4, 2, 3), 12, 65, 8)->batch(Split::eval, 5, 8, 40).tokens != batch.tokens);
  CHECK(make(markov(4, 2, 3), 12, 65, 8)->entropy_rate() != data->entropy_rate());

  // Every domain occurs and is recorded.
  std::set<int32_t> domains;
  for (int64_t index = 0; index < 10; ++index)
    for (int32_t domain : data->batch(Split::train, index, 8, 5).domains) domains.insert(domain);
  CHECK(domains == std::set<int32_t>{0, 1, 2, 3});
}

TEST_CASE("markov windows move from each context only to its branching successors") {
  const int64_t vocab = 10, branching = 3, domains = 2;
  // A large concentration makes every successor about equally likely, so all of them show up.
  const auto data = make(markov(domains, 1, branching, 1000.0), vocab);
  const TokenBatch batch = data->batch(Split::train, 0, 200, 200);
  std::vector<std::set<int32_t>> seen(static_cast<size_t>(domains * vocab));
  std::vector<int64_t> visits(seen.size(), 0);
  for (int64_t row = 0; row < batch.batch; ++row) {
    const int64_t domain = batch.domains[static_cast<size_t>(row)];
    for (int64_t t = 1; t < batch.window; ++t) {
      const auto context =
          static_cast<size_t>(domain * vocab + batch.tokens[static_cast<size_t>(row * batch.window + t - 1)]);
      seen[context].insert(batch.tokens[static_cast<size_t>(row * batch.window + t)]);
      ++visits[context];
    }
  }
  int64_t well_visited = 0;
  for (size_t context = 0; context < seen.size(); ++context) {
    CHECK(seen[context].size() <= static_cast<size_t>(branching));
    if (visits[context] >= 200) {
      ++well_visited;
      CHECK(seen[context].size() == static_cast<size_t>(branching));
    }
  }
  CHECK(well_visited >= 5);
  // The optimal predictor never meets a transition its domains rule out.
  const double loss = data->optimal_loss(batch);
  CHECK(std::isfinite(loss));
  CHECK(loss > 0.0);
  CHECK(loss < std::log(static_cast<double>(branching)) + 0.05);
  // A transition no domain allows costs infinitely much.
  bool found_impossible = false;
  for (int32_t a = 0; a < vocab && !found_impossible; ++a)
    for (int32_t b = 0; b < vocab && !found_impossible; ++b)
      if (std::isinf(sequence_loss(*data, {a, b}))) found_impossible = true;
  CHECK(found_impossible);
}

TEST_CASE("entropy rate of a two-token chain, computed by hand") {
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    CAPTURE(seed);
    const auto data = make(markov(1, 1, 2), 2, 65, seed);
    const double leave_0 = transition(*data, 0, 1), leave_1 = transition(*data, 1, 0);
    CHECK(transition(*data, 0, 0) + leave_0 == doctest::Approx(1.0).epsilon(1e-12));
    CHECK(transition(*data, 1, 1) + leave_1 == doctest::Approx(1.0).epsilon(1e-12));
    // Balance: pi_0 * leave_0 = pi_1 * leave_1.
    const double pi_0 = leave_1 / (leave_0 + leave_1);
    const double rate = pi_0 * binary_entropy(leave_0) + (1.0 - pi_0) * binary_entropy(leave_1);
    CHECK(data->entropy_rate() == doctest::Approx(rate).epsilon(1e-10));
  }
}

TEST_CASE("entropy rate of a three-token chain with two successors each, transient states included") {
  int transient_cases = 0;
  for (uint64_t seed = 1; seed <= 30; ++seed) {
    CAPTURE(seed);
    const auto data = make(markov(1, 1, 2), 3, 65, seed);
    double p[3][3];
    for (int32_t a = 0; a < 3; ++a) {
      double row = 0.0;
      int zeros = 0;
      for (int32_t b = 0; b < 3; ++b) {
        p[a][b] = transition(*data, a, b);
        row += p[a][b];
        zeros += p[a][b] == 0.0;
      }
      CHECK(row == doctest::Approx(1.0).epsilon(1e-12));
      CHECK(zeros == 1);
    }
    // Two distinct successors each leave one closed class, so pi P = pi, sum pi = 1 has one
    // solution, and the windows' long-run context distribution is it. Cramer's rule on
    // [(P^T - I) rows 0 and 1; ones] pi = (0, 0, 1).
    const double m[3][3] = {{p[0][0] - 1.0, p[1][0], p[2][0]}, {p[0][1], p[1][1] - 1.0, p[2][1]}, {1.0, 1.0, 1.0}};
    const auto det = [](const double a[3][3]) {
      return a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0]) +
             a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
    };
    double pi[3];
    for (int column = 0; column < 3; ++column) {
      double replaced[3][3];
      for (int r = 0; r < 3; ++r)
        for (int c = 0; c < 3; ++c) replaced[r][c] = c == column ? (r == 2 ? 1.0 : 0.0) : m[r][c];
      pi[column] = det(replaced) / det(m);
    }
    double rate = 0.0;
    for (int a = 0; a < 3; ++a) {
      CHECK(pi[a] > -1e-12);
      if (pi[a] < 1e-12) ++transient_cases;
      for (int b = 0; b < 3; ++b)
        if (p[a][b] > 0.0) rate -= pi[a] * p[a][b] * std::log(p[a][b]);
    }
    CHECK(data->entropy_rate() == doctest::Approx(rate).epsilon(1e-10));
  }
  // Some seeds make a token that no other token leads to: the uniform start puts mass on it, and
  // the limit must not.
  CHECK(transient_cases > 0);
}

TEST_CASE("entropy rate matches the empirical rate of generated windows") {
  struct Case {
    int64_t vocab, order, branching, domains;
    double concentration;
  };
  for (const Case c : {Case{16, 1, 4, 3, 1.0}, Case{8, 2, 3, 3, 1.0}, Case{6, 2, 6, 2, 0.5}}) {
    CAPTURE(c.vocab);
    CAPTURE(c.order);
    const auto data = make(markov(c.domains, c.order, c.branching, c.concentration), c.vocab);
    const TokenBatch batch = data->batch(Split::train, 0, 500, 2000);
    const double empirical = plug_in_entropy(batch, c.vocab, c.order, c.domains, 200);
    INFO(fmt::format("V={} order={} branching={} domains={}: empirical {:.5f}, entropy_rate {:.5f} nats", c.vocab,
                     c.order, c.branching, c.domains, empirical, data->entropy_rate()));
    CHECK(data->entropy_rate() > 0.0);
    CHECK(empirical == doctest::Approx(data->entropy_rate()).epsilon(0.01));

    // One domain: the optimal predictor is the true chain, so on long windows its loss (less
    // the uniform first tokens) is the empirical NLL, which approaches the rate too.
    const auto single = make(markov(1, c.order, c.branching, c.concentration), c.vocab);
    const TokenBatch windows = single->batch(Split::train, 0, 200, 2000);
    const double predicted = 2000 - 1;
    const double nll = (single->optimal_loss(windows) * predicted -
                        static_cast<double>(c.order - 1) * std::log(static_cast<double>(c.vocab))) /
                       (predicted - static_cast<double>(c.order - 1));
    INFO(fmt::format("one domain: NLL under the true chain {:.5f}, entropy_rate {:.5f} nats", nll,
                     single->entropy_rate()));
    CHECK(nll == doctest::Approx(single->entropy_rate()).epsilon(0.01));
  }
}

TEST_CASE("deterministic and near-uniform corpora have rates 0 and log V") {
  // Branching 1: every window is determined by its first `order` tokens.
  for (int64_t order : {1, 2}) {
    const auto deterministic = make(markov(1, order, 1), 16);
    CHECK(deterministic->entropy_rate() == 0.0);
    const TokenBatch batch = deterministic->batch(Split::train, 0, 8, 50);
    const double uniform_part = static_cast<double>(order - 1) * std::log(16.0) / 49.0;
    CHECK(deterministic->optimal_loss(batch) == doctest::Approx(uniform_part).epsilon(1e-12));
  }
  // Several deterministic domains: a Bayes mixture of D deterministic sources pays at most log D
  // per window in all, however long the window.
  const auto mixture = make(markov(4, 1, 1), 16);
  CHECK(mixture->entropy_rate() == 0.0);
  const TokenBatch batch = mixture->batch(Split::train, 0, 64, 100);
  double most = 0.0;
  for (int64_t row = 0; row < batch.batch; ++row) {
    const std::vector<int32_t> window(batch.tokens.begin() + row * 100, batch.tokens.begin() + (row + 1) * 100);
    const double loss = sequence_loss(*mixture, window);
    CHECK(loss <= std::log(4.0) + 1e-12);
    most = std::max(most, loss);
  }
  CHECK(most > 0.0);  // some windows did have to tell domains apart

  // Branching V with a huge concentration: every successor about equally likely.
  const auto uniform = make(markov(2, 1, 32, 1e6), 32);
  CHECK(uniform->entropy_rate() == doctest::Approx(std::log(32.0)).epsilon(1e-4));
  CHECK(uniform->entropy_rate() <= std::log(32.0));
}

TEST_CASE("order 0: each domain is a unigram distribution") {
  const auto data = make(markov(3, 0, 5), 7);
  // With one context the rate is the mean entropy of the domains' unigram distributions; the
  // first position of every window is already predicted by the mixture.
  const TokenBatch batch = data->batch(Split::train, 0, 400, 400);
  CHECK(plug_in_entropy(batch, 7, 0, 3, 0) == doctest::Approx(data->entropy_rate()).epsilon(0.02));
  CHECK(data->optimal_loss(batch) == doctest::Approx(data->entropy_rate()).epsilon(0.03));
}

TEST_CASE("optimal loss approaches the entropy rate from above; short windows pay for the domain") {
  const auto data = make(markov(4, 1, 4), 16);
  const double rate = data->entropy_rate();
  const double long_loss = data->optimal_loss(data->batch(Split::eval, 0, 400, 2000));
  const double medium_loss = data->optimal_loss(data->batch(Split::eval, 0, 4000, 50));
  const double short_loss = data->optimal_loss(data->batch(Split::eval, 0, 20000, 4));
  INFO(fmt::format("entropy rate {:.5f}; optimal loss: window 2000 {:.5f}, 50 {:.5f}, 4 {:.5f} nats", rate, long_loss,
                   medium_loss, short_loss));
  // Sampling noise on 8e5 predicted tokens is about 1e-3 nats.
  CHECK(long_loss > rate - 3e-3);
  CHECK(long_loss < rate * 1.02);
  CHECK(medium_loss > long_loss);
  CHECK(short_loss > medium_loss + 0.05);
  CHECK(short_loss < std::log(16.0));
}

TEST_CASE("the optimal predictor is a proper distribution over every continuation") {
  // For each first token (order 1) or first two tokens (order 2), the probabilities the optimal
  // predictor gives all continuations of a window sum to 1: its per-position predictions are
  // normalised and its posterior over domains is consistent.
  for (int64_t order : {1, 2}) {
    CAPTURE(order);
    const auto data = make(markov(3, order, 2, 0.7), 3);
    for (int32_t first = 0; first < 3; ++first) {
      double total = 0.0;
      for (int32_t a = 0; a < 3; ++a)
        for (int32_t b = 0; b < 3; ++b)
          for (int32_t c = 0; c < 3; ++c)
            for (int32_t d = 0; d < 3; ++d) total += std::exp(-sequence_loss(*data, {first, a, b, c, d}));
      CHECK(total == doctest::Approx(1.0).epsilon(1e-12));
    }
  }
}

TEST_CASE("the default-sized corpus builds quickly and its stationary distributions converge") {
  const auto data = make(markov(4, 2, 4), 256);
  CHECK(data->describe().find("not converged") == std::string::npos);
  CHECK_CONTAINS(data->describe(), "markov: 4 domains, order 2, vocabulary 256, branching 4");
  CHECK(data->entropy_rate() > 0.0);
  CHECK(data->entropy_rate() < std::log(4.0));
  const double long_loss = data->optimal_loss(data->batch(Split::train, 0, 100, 2000));
  CHECK(long_loss > data->entropy_rate() - 0.01);
  CHECK(long_loss < data->entropy_rate() * 1.03);
}

TEST_CASE("markov configuration errors say which key to change") {
  CHECK_CONTAINS(usage_error([] { make(markov(4, 4, 4), 256); }), "reduce data.order, data.branching, data.domains");
  CHECK_CONTAINS(usage_error([] { make(markov(1, 9, 2), 1024); }), "reduce data.order");  // V^order overflows int64
  CHECK_CONTAINS(usage_error([] { make(markov(4, 1, 17), 16); }), "data.branching must be between 1 and");
  CHECK_CONTAINS(usage_error([] { make(markov(4, 1, 0), 16); }), "data.branching");
  CHECK_CONTAINS(usage_error([] { make(markov(0, 1, 2), 16); }), "data.domains must be at least 1");
  CHECK_CONTAINS(usage_error([] { make(markov(2, -1, 2), 16); }), "data.order must be at least 0");
  CHECK_CONTAINS(usage_error([] { make(markov(2, 1, 2, 0.0), 16); }), "data.concentration");
  CHECK_CONTAINS(usage_error([] { make(markov(2, 1, 2, NAN), 16); }), "data.concentration");
  CHECK_CONTAINS(usage_error([] { make(markov(2, 1, 2), 0); }), "set model.vocab_size");
  DataConfig unknown = markov(2, 1, 2);
  unknown.kind = "parquet";
  CHECK_CONTAINS(usage_error([&] { make(unknown, 16); }), "data.kind must be \"markov\", \"text\" or \"tokens\"");
}

// ---------------------------------------------------------------------------------------------
// Text files

TEST_CASE("text: globs and files read in sorted order, byte tokens, split at the last eval_fraction") {
  ScratchFolder scratch("data");
  const std::string a = "h\xc3\xa9llo, ";                  // "héllo, ": 8 bytes
  const std::string b = "w\xc3\xb6rld o\xf0\x9f\x98\x80";  // "wörld o😀": 12 bytes
  write_bytes(scratch / "a.txt", a);
  write_bytes(scratch / "b.txt", b);
  write_bytes(scratch / "notes.md", "not read");
  const std::string all = a + b;
  REQUIRE(all.size() == 20);
  std::vector<int32_t> expected;
  for (char c : all) expected.push_back(static_cast<unsigned char>(c));

  // 0.25 of 20 bytes: eval is the last 5, train the first 15.
  for (const auto& paths :
       {std::vector<fs::path>{scratch / "*.txt"}, std::vector<fs::path>{scratch / "b.txt", scratch / "a.txt"},
        std::vector<fs::path>{scratch / "?.txt", scratch / "a.txt"}}) {
    const auto data = make(files("text", paths, 0.25), 256, 5);
    CHECK(data->vocab_size() == 256);
    CHECK_CONTAINS(data->describe(), "text: 2 files: 20 tokens, train 15 and eval 5");
    CHECK(std::isnan(data->entropy_rate()));
    const TokenBatch train = data->batch(Split::train, 2, 3, 15);
    for (int64_t row = 0; row < 3; ++row)
      CHECK(std::vector<int32_t>(train.tokens.begin() + row * 15, train.tokens.begin() + (row + 1) * 15) ==
            std::vector<int32_t>(expected.begin(), expected.begin() + 15));
    CHECK(train.domains == std::vector<int32_t>{-1, -1, -1});
    CHECK(std::isnan(data->optimal_loss(train)));
    CHECK(data->batch(Split::eval, 0, 1, 5).tokens == std::vector<int32_t>(expected.begin() + 15, expected.end()));
    CHECK_CONTAINS(usage_error([&] { data->batch(Split::eval, 0, 1, 6); }), "the eval split holds 5 tokens");
  }

  // A model vocabulary above 256 is fine; the tokens stay bytes.
  CHECK(make(files("text", {scratch / "*.txt"}, 0.25), 50257, 5)->vocab_size() == 256);

  // Window starts are random and cover the split: 15 train bytes, window 14 has starts 0 and 1.
  const auto data = make(files("text", {scratch / "*.txt"}, 0.25), 256, 5);
  std::set<int32_t> first_tokens;
  for (int64_t index = 0; index < 40; ++index) first_tokens.insert(data->batch(Split::train, index, 1, 14).tokens[0]);
  CHECK(first_tokens == std::set<int32_t>{expected[0], expected[1]});
}

TEST_CASE("text batches are a pure function of seed, split and index") {
  ScratchFolder scratch("data");
  Rng rng(3);
  std::string text;
  for (int i = 0; i < 5000; ++i) text += static_cast<char>('a' + rng.below(26));
  write_bytes(scratch / "corpus.txt", text);
  const auto data = make(files("text", {scratch / "corpus.txt"}), 256, 33);
  check_batches_are_pure(*data, 33);
  CHECK(make(files("text", {scratch / "corpus.txt"}), 256, 33, 8)->batch(Split::train, 3, 4, 33).tokens !=
        data->batch(Split::train, 3, 4, 33).tokens);
}

TEST_CASE("text errors name the file and say what to do") {
  ScratchFolder scratch("data");
  write_bytes(scratch / "good.txt", "plenty of perfectly valid text for a window or two");

  const std::string no_match = usage_error([&] { make(files("text", {scratch / "*.md"}), 256); });
  CHECK_CONTAINS(no_match, (scratch / "*.md").string());
  CHECK_CONTAINS(no_match, "matches no file");
  CHECK_CONTAINS(usage_error([&] { make(files("text", {scratch / "missing.txt"}), 256); }),
                 (scratch / "missing.txt").string() + ": no such file");
  CHECK_CONTAINS(usage_error([&] { make(files("text", {}), 256); }), "data.paths is empty");

  struct Invalid {
    std::string bytes;
    size_t offset;
  };
  for (const Invalid& invalid : {Invalid{"ok\xff and more", 2}, Invalid{"abc\xc3", 3}, Invalid{"\xc0\x80 overlong", 0},
                                 Invalid{"x \xed\xa0\x80 surrogate", 2}, Invalid{"ab \xc3\xa9\xe2\x82", 5}}) {
    write_bytes(scratch / "bad.txt", invalid.bytes);
    const std::string message = usage_error([&] {
      make(files("text", {scratch / "good.txt", scratch / "bad.txt"}), 256, 2);
    });
    CHECK_CONTAINS(message, (scratch / "bad.txt").string());
    CHECK_CONTAINS(message, fmt::format("byte offset {} ", invalid.offset));
  }

  write_bytes(scratch / "empty.txt", "");
  const std::string empty = usage_error([&] {
    make(files("text", {scratch / "good.txt", scratch / "empty.txt"}), 256);
  });
  CHECK_CONTAINS(empty, (scratch / "empty.txt").string() + ": is empty");

  CHECK_CONTAINS(usage_error([&] { make(files("text", {scratch / "good.txt"}), 255); }), "set model.vocab_size = 256");

  fs::create_directories(scratch / "folder");
  CHECK_CONTAINS(usage_error([&] { make(files("text", {scratch / "folder"}), 256); }), "is a folder");

  // 50 bytes, eval_fraction 0.1: eval holds 5, train 45.
  const std::string short_eval = usage_error([&] { make(files("text", {scratch / "good.txt"}), 256, 6); });
  CHECK_CONTAINS(short_eval, "the eval split holds 5 tokens but a window needs 6");
  CHECK_CONTAINS(short_eval, "use a shorter train.seq_len");
  CHECK_CONTAINS(usage_error([&] { make(files("text", {scratch / "good.txt"}), 256, 46); }),
                 "the train split holds 45 tokens but a window needs 46");
  CHECK_CONTAINS(usage_error([&] { make(files("text", {scratch / "good.txt"}, 0.0), 256, 2); }),
                 "data.eval_fraction must be between 0 and 1");
}

// ---------------------------------------------------------------------------------------------
// Token files

TEST_CASE("tokens: u16 and u32 files round trip") {
  ScratchFolder scratch("data");
  const std::vector<uint16_t> first = {0, 1, 65535, 300, 7, 9, 11, 60000};
  const std::vector<uint16_t> second = {5, 4, 3, 2, 1, 0, 42, 65534, 8, 8, 8, 8};  // 20 tokens in all
  write_tokens(scratch / "shard_000.bin", first);
  write_tokens(scratch / "shard_001.bin", second);
  std::vector<int32_t> expected(first.begin(), first.end());
  expected.insert(expected.end(), second.begin(), second.end());

  DataConfig u16 = files("tokens", {scratch / "shard_*.bin"}, 0.25);
  u16.token_dtype = "u16";
  const auto data = make(u16, 65536, 5);
  CHECK(data->vocab_size() == 65536);
  CHECK_CONTAINS(data->describe(), "tokens (u16): 2 files: 20 tokens, train 15 and eval 5");
  CHECK(data->batch(Split::train, 0, 2, 15).tokens == [&] {
    std::vector<int32_t> twice(expected.begin(), expected.begin() + 15);
    twice.insert(twice.end(), expected.begin(), expected.begin() + 15);
    return twice;
  }());
  CHECK(data->batch(Split::eval, 9, 1, 5).tokens == std::vector<int32_t>(expected.begin() + 15, expected.end()));

  const std::vector<uint32_t> wide = {0, 100000, 65536, 99999, 1, 70000, 3, 4, 5, 6};
  write_tokens(scratch / "wide.bin", wide);
  DataConfig u32 = files("tokens", {scratch / "wide.bin"}, 0.2);
  u32.token_dtype = "u32";
  const auto wide_data = make(u32, 100001, 2);
  CHECK(wide_data->batch(Split::train, 0, 1, 8).tokens == std::vector<int32_t>(wide.begin(), wide.begin() + 8));
  CHECK(wide_data->batch(Split::eval, 0, 1, 2).tokens == std::vector<int32_t>(wide.begin() + 8, wide.end()));
}

TEST_CASE("token batches are a pure function of seed, split and index") {
  ScratchFolder scratch("data");
  Rng rng(4);
  std::vector<uint16_t> tokens(6000);
  for (auto& token : tokens) token = static_cast<uint16_t>(rng.below(1000));
  write_tokens(scratch / "train.bin", tokens);
  const auto data = make(files("tokens", {scratch / "train.bin"}), 1000, 65);
  check_batches_are_pure(*data, 65);
}

TEST_CASE("token file errors name the file, the offset and the value") {
  ScratchFolder scratch("data");
  write_bytes(scratch / "odd.bin", std::string(3, '\x01'));
  const std::string odd = usage_error([&] { make(files("tokens", {scratch / "odd.bin"}), 1000, 1); });
  CHECK_CONTAINS(odd, (scratch / "odd.bin").string());
  CHECK_CONTAINS(odd, "holds 3 bytes, not a multiple of 2");

  DataConfig u32 = files("tokens", {scratch / "six.bin"});
  u32.token_dtype = "u32";
  write_bytes(scratch / "six.bin", std::string(6, '\0'));
  CHECK_CONTAINS(usage_error([&] { make(u32, 1000, 1); }), "holds 6 bytes, not a multiple of 4");

  write_tokens(scratch / "big.bin", std::vector<uint16_t>{1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12,
                                                          13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 50});
  const std::string big = usage_error([&] { make(files("tokens", {scratch / "big.bin"}), 50, 2); });
  CHECK_CONTAINS(big, (scratch / "big.bin").string());
  CHECK_CONTAINS(big, "token 22 (byte offset 44) is 50, not below model.vocab_size = 50");

  write_bytes(scratch / "empty.bin", "");
  CHECK_CONTAINS(usage_error([&] { make(files("tokens", {scratch / "empty.bin"}), 50, 2); }),
                 (scratch / "empty.bin").string() + ": is empty");

  DataConfig wrong_dtype = files("tokens", {scratch / "big.bin"});
  wrong_dtype.token_dtype = "u8";
  CHECK_CONTAINS(usage_error([&] { make(wrong_dtype, 100, 2); }), "data.token_dtype must be \"u16\" or \"u32\"");
  CHECK_CONTAINS(usage_error([&] { make(files("tokens", {scratch / "big.bin"}), 100, 23); }),
                 "the train split holds 21 tokens but a window needs 23");
}

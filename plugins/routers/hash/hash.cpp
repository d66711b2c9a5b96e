// Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): no learned router; a
// fixed table maps each token id (ctx.token_ids, host i32 [T]) to its expert(s).
//   mode "random":   a seeded random table (the paper's "Random Hash"): expert = table[id]
//   mode "balanced": the paper's "Balanced assignment": tokens sorted by descending frequency
//                    (counts_file) go, one by one, to the expert with the least total count so
//                    far (ties: fewer token ids held, then the lower index). Ids with count 0
//                    (absent from the file) carry no load, so by that rule all would go to one
//                    expert; they go instead, in id order, to the expert holding the fewest ids
//                    (ties: less load, then the lower index), so unseen tokens are spread too.
// top_k > 1 gives each token id k distinct experts (the random table draws k distinct, the
// balanced table takes the k least-loaded), each with weight 1/k: the k experts' outputs are
// averaged, so that k = 1, the paper's setting, has weight 1. (The paper's MultiHash instead splits
// the hidden state into k chunks; that is not a routing decision and is not done here.)
//
// What the plan holds: plan.logits = 0 [T, E] (no learned scores), plan.probs = the routing itself
// (1/k on each of a token's experts): balancers see the real load and have nothing to train.
// Backward: there are no router parameters and the routing does not depend on x, so nothing is
// added to dL/dx and the incoming gradients are, correctly, dropped.
//
// counts_file format: UTF-8 text, one "token_id count" pair per line (two non-negative integers
// separated by spaces or a tab); blank lines and lines starting with '#' are ignored; each id at
// most once; ids not listed count 0. A relative path is taken from the recipe's folder.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <moelab/plugin.hpp>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <tuple>

namespace {

using namespace moelab;

// Token counts from a counts file; every problem is a UsageError naming file:line.
std::vector<int64_t> read_token_counts(const std::filesystem::path& file, int64_t vocab_size,
                                       const SourceLocation& set_at) {
  std::ifstream in(file);
  if (!in) {
    Diagnostics d;
    d.add(set_at, "counts_file", fmt::format("cannot open token-count file '{}'", file.string()),
          "relative paths are taken from the recipe's folder");
    d.throw_if_any();
  }
  std::vector<int64_t> counts(static_cast<size_t>(vocab_size), 0);
  std::vector<int> seen_on(static_cast<size_t>(vocab_size), 0);
  Diagnostics problems;
  std::string line;
  for (int line_number = 1; std::getline(in, line); ++line_number) {
    const size_t first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos || line[first] == '#') continue;
    const SourceLocation where{file.string(), line_number, static_cast<int>(first) + 1};
    std::istringstream fields(line);
    int64_t id = 0, count = 0;
    std::string extra;
    if (!(fields >> id >> count) || (fields >> extra)) {
      problems.add(where, "counts_file", fmt::format("expected \"token_id count\" (two integers), got \"{}\"", line));
      continue;
    }
    if (id < 0 || id >= vocab_size) {
      problems.add(where, "counts_file", fmt::format("token id {} is outside [0, vocab_size = {})", id, vocab_size),
                   "raise the router's vocab_size to the tokenizer's");
      continue;
    }
    if (count < 0) {
      problems.add(where, "counts_file", fmt::format("count of token {} must be non-negative, got {}", id, count));
      continue;
    }
    if (seen_on[static_cast<size_t>(id)] != 0) {
      problems.add(where, "counts_file",
                   fmt::format("token id {} is listed twice (first on line {})", id, seen_on[static_cast<size_t>(id)]));
      continue;
    }
    seen_on[static_cast<size_t>(id)] = line_number;
    counts[static_cast<size_t>(id)] = count;
  }
  problems.throw_if_any();
  return counts;
}

class HashRouter final : public Router {
 public:
  static ParamSchema schema() {
    return {
        param_choice("mode", "random", {"random", "balanced"},
                     "random: a seeded random table; balanced: frequency-balanced from counts_file"),
        param_int("seed", 0, "seed of the random table (mode = \"random\")").at_least(0),
        param_string("counts_file", "",
                     "token-count file for mode = \"balanced\": lines of \"token_id count\", '#' comments"),
        param_int("vocab_size", 50257, "token ids must be in [0, vocab_size)").at_least(1),
    };
  }

  static void check(const ParamSet& p, const LayerSpec& spec, ParamProblems& problems) {
    const bool balanced = p.get_string("mode") == "balanced";
    if (balanced && p.get_string("counts_file").empty())
      problems.push_back({"counts_file", "mode = \"balanced\" needs a token-count file"});
    if (!balanced && !p.get_string("counts_file").empty())
      problems.push_back({"counts_file", "is only read when mode = \"balanced\" (mode is \"random\")"});
    if (spec.top_k > spec.num_experts)
      problems.push_back({"top_k", fmt::format("hash routing gives each token top_k distinct experts; top_k ({}) "
                                               "must be at most num_experts ({})",
                                               spec.top_k, spec.num_experts)});
  }

  HashRouter(const ParamSet& p, const LayerSpec& spec, Ops&, Rng&) : spec_(spec), vocab_size_(p.get_int("vocab_size")) {
    MOELAB_CHECK(spec.top_k >= 1 && spec.top_k <= spec.num_experts, "hash router: top_k = {} for {} experts",
                 spec.top_k, spec.num_experts);
    table_.resize(static_cast<size_t>(vocab_size_ * spec.top_k));
    if (p.get_string("mode") == "balanced") {
      std::filesystem::path file = p.get_string("counts_file");
      const SourceLocation set_at = p.where("counts_file");
      if (file.is_relative() && set_at.known()) file = std::filesystem::path(set_at.file).parent_path() / file;
      build_balanced(read_token_counts(file, vocab_size_, set_at));
    } else {
      build_random(static_cast<uint64_t>(p.get_int("seed")));
    }
  }

  RoutingPlan forward(const Tensor& x, const RouterContext& ctx) override {
    Ops& ops = ctx.ops;
    const int64_t tokens = x.dim(0), experts = spec_.num_experts, k = spec_.top_k;
    expect_shape(x, {tokens, spec_.d_model}, "hash router input");
    if (ctx.token_ids == nullptr)
      throw UsageError(
          "the hash router routes by token id, but this layer input carries no token ids (give the "
          "layer token_ids [T], i32, or choose a learned router)");
    const Tensor& ids = *ctx.token_ids;
    if (ids.dtype() != DType::i32 || ids.device() != DeviceKind::cpu || ids.shape() != Shape{tokens})
      throw UsageError(
          fmt::format("the hash router needs token ids as a host i32 [{}] tensor, got {}", tokens, ids.describe()));
    Tensor expert = host_tensor(DType::i32, {tokens * k});
    for (int64_t t = 0; t < tokens; ++t) {
      const int32_t id = ids.data<int32_t>()[t];
      if (id < 0 || id >= vocab_size_)
        throw UsageError(
            fmt::format("token {} has id {}, outside the hash router's vocabulary [0, {}) (set the "
                        "router's vocab_size to the tokenizer's)",
                        t, id, vocab_size_));
      std::copy_n(table_.begin() + id * k, k, expert.data<int32_t>() + t * k);
    }
    RoutingPlan plan;
    plan.top_k = k;
    plan.expert = ops.to_device(expert);
    set_token_major_assignments(ops, tokens, k, plan);
    plan.weight = ops.empty(x.dtype(), {tokens * k});
    ops.fill(plan.weight, 1.0 / static_cast<double>(k));
    plan.logits = ops.zeros(x.dtype(), {tokens, experts});
    plan.probs = ops.zeros(x.dtype(), {tokens, experts});
    ops.scatter_add_elements(plan.weight, plan.token, plan.expert, plan.probs);
    return plan;
  }

  void backward(const Tensor&, const RoutingPlan&, const RouterGrad&, const RouterContext&, Tensor&) override {}

 private:
  // k distinct experts per id, drawn in id order from one stream: the table for a larger
  // vocabulary extends the one for a smaller.
  void build_random(uint64_t seed) {
    const int64_t k = spec_.top_k;
    Rng rng(seed, /*stream=*/0x4a5);
    for (int64_t id = 0; id < vocab_size_; ++id) {
      int32_t* row = table_.data() + id * k;
      for (int64_t j = 0; j < k; ++j) {
        int32_t e;
        do e = static_cast<int32_t>(rng.below(static_cast<uint64_t>(spec_.num_experts)));
        while (std::find(row, row + j, e) != row + j);
        row[j] = e;
      }
    }
  }

  void build_balanced(const std::vector<int64_t>& counts) {
    const int64_t k = spec_.top_k;
    std::vector<int32_t> order(static_cast<size_t>(vocab_size_));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return counts[a] > counts[b]; });
    // (total count, token ids held, expert): the least-loaded expert is the set's first. The
    // stable sort keeps the zero-count ids last, in id order.
    std::set<std::tuple<int64_t, int64_t, int32_t>> load;
    for (int32_t e = 0; e < spec_.num_experts; ++e) load.emplace(0, 0, e);
    std::vector<std::tuple<int64_t, int64_t, int32_t>> taken(static_cast<size_t>(k));
    auto assign = [&](int32_t id) {
      for (int64_t j = 0; j < k; ++j) {
        taken[j] = *load.begin();
        load.erase(load.begin());
        table_[id * k + j] = std::get<2>(taken[j]);
      }
    };
    size_t next = 0;
    for (; next < order.size() && counts[order[next]] > 0; ++next) {
      const int32_t id = order[next];
      assign(id);
      for (const auto& [total, held, e] : taken) load.emplace(total + counts[id], held + 1, e);
    }
    // The rest have count 0: ordered by ids held first.
    std::set<std::tuple<int64_t, int64_t, int32_t>> held_first;
    for (const auto& [total, held, e] : load) held_first.emplace(held, total, e);
    load.swap(held_first);
    for (; next < order.size(); ++next) {
      assign(order[next]);
      for (const auto& [held, total, e] : taken) load.emplace(held + 1, total, e);
    }
  }

  LayerSpec spec_;
  int64_t vocab_size_;
  std::vector<int32_t> table_;  // [vocab_size, k]: the experts of each token id
};

}  // namespace

MOELAB_ROUTER_PLUGIN(HashRouter, "hash", "1.0.0",
                     "Roller 2021 hash layers: token id -> expert by a fixed random or frequency-balanced table")

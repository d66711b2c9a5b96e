#include "moelab/moe_layer.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "moe_layer_internal.hpp"
#include "moelab/registry.hpp"

namespace moelab {

// ---------------------------------------------------------------------------------------------
// Dead experts

DeadExpertTracker::DeadExpertTracker(int64_t num_experts, int64_t window_tokens)
    : window_(window_tokens), last_seen_(static_cast<size_t>(num_experts), 0) {}

void DeadExpertTracker::record(const std::vector<int64_t>& tokens_per_expert, int64_t tokens) {
  tokens_seen_ += tokens;
  for (size_t e = 0; e < last_seen_.size() && e < tokens_per_expert.size(); ++e)
    if (tokens_per_expert[e] > 0) last_seen_[e] = tokens_seen_;
}

void DeadExpertTracker::restore(std::vector<int64_t> last_seen, int64_t tokens_seen) {
  MOELAB_CHECK(last_seen.size() == last_seen_.size(), "dead-expert state of {} experts for a layer of {}",
               last_seen.size(), last_seen_.size());
  last_seen_ = std::move(last_seen);
  tokens_seen_ = tokens_seen;
}

std::vector<int64_t> DeadExpertTracker::dead() const {
  std::vector<int64_t> out;
  if (tokens_seen_ < window_) return out;
  for (size_t e = 0; e < last_seen_.size(); ++e)
    if (tokens_seen_ - last_seen_[e] >= window_) out.push_back(static_cast<int64_t>(e));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Capacity and dispatch: host bookkeeping on the A assignments of a plan.

int64_t expert_capacity(int64_t tokens, int64_t k, int64_t experts, double factor) {
  return static_cast<int64_t>(
      std::ceil(static_cast<double>(tokens) * static_cast<double>(k) / static_cast<double>(experts) * factor));
}

namespace {

// From d.final_expert: the load, offsets and rows of the dispatch, grouped by expert, the rows of
// an expert in assignment order (stable).
void group_rows(const std::vector<int32_t>& token, int64_t experts, Dispatch& d) {
  d.tokens_per_expert.assign(static_cast<size_t>(experts), 0);
  for (int32_t e : d.final_expert)
    if (e >= 0) ++d.tokens_per_expert[static_cast<size_t>(e)];
  d.offsets.assign(static_cast<size_t>(experts) + 1, 0);
  for (int64_t e = 0; e < experts; ++e)
    d.offsets[static_cast<size_t>(e) + 1] =
        d.offsets[static_cast<size_t>(e)] + d.tokens_per_expert[static_cast<size_t>(e)];
  d.order.assign(static_cast<size_t>(d.offsets.back()), 0);
  d.source_token.assign(d.order.size(), 0);
  std::vector<int64_t> cursor(d.offsets.begin(), d.offsets.end() - 1);
  for (size_t a = 0; a < token.size(); ++a) {
    const int32_t e = d.final_expert[a];
    if (e < 0) continue;
    const int64_t row = cursor[static_cast<size_t>(e)]++;
    d.order[static_cast<size_t>(row)] = static_cast<int32_t>(a);
    d.source_token[static_cast<size_t>(row)] = token[a];
  }
}

}  // namespace

Dispatch plan_dispatch(const std::vector<int32_t>& token, const std::vector<int32_t>& expert,
                       const std::vector<int32_t>& rank, int64_t experts, int64_t capacity, Overflow overflow,
                       const Tensor& probs_host) {
  const size_t count = token.size();
  Dispatch d;
  d.final_expert.assign(count, -1);
  std::vector<int32_t> priority(count);
  std::iota(priority.begin(), priority.end(), 0);
  std::stable_sort(priority.begin(), priority.end(), [&](int32_t a, int32_t b) { return rank[a] < rank[b]; });

  std::vector<int64_t> load(static_cast<size_t>(experts), 0);
  const bool limited = overflow != Overflow::dropless && capacity >= 0;
  const int64_t tokens = probs_host.defined() ? probs_host.dim(0) : 0;
  std::vector<std::vector<int32_t>> taken;  // experts already serving each token (for reroute)
  if (overflow == Overflow::reroute) {
    taken.resize(static_cast<size_t>(tokens));
    for (size_t a = 0; a < count; ++a)
      if (expert[a] >= 0) taken[static_cast<size_t>(token[a])].push_back(expert[a]);
  }
  for (int32_t a : priority) {
    const int32_t e = expert[a];
    if (e < 0) continue;
    if (!limited || load[static_cast<size_t>(e)] < capacity) {
      d.final_expert[a] = e;
      ++load[static_cast<size_t>(e)];
      continue;
    }
    if (overflow == Overflow::reroute) {
      // Next-best expert by router probability with room that this token does not use already.
      const int32_t t = token[a];
      int32_t best = -1;
      double best_p = -1;
      for (int64_t j = 0; j < experts; ++j) {
        if (load[static_cast<size_t>(j)] >= capacity) continue;
        auto& used = taken[static_cast<size_t>(t)];
        if (std::find(used.begin(), used.end(), static_cast<int32_t>(j)) != used.end()) continue;
        const double p = host_value(probs_host, t * experts + j);
        if (p > best_p) {
          best_p = p;
          best = static_cast<int32_t>(j);
        }
      }
      if (best >= 0) {
        d.final_expert[a] = best;
        ++load[static_cast<size_t>(best)];
        taken[static_cast<size_t>(t)].push_back(best);
        ++d.rerouted;
        continue;
      }
    }
    ++d.dropped;
  }

  group_rows(token, experts, d);
  return d;
}

Dispatch plan_dispatch_per_rank(const std::vector<int32_t>& token, const std::vector<int32_t>& expert,
                                const std::vector<int32_t>& rank, int64_t experts, int64_t capacity, Overflow overflow,
                                const Tensor& probs_host, int64_t tokens_per_rank) {
  MOELAB_CHECK(tokens_per_rank > 0, "per-rank dispatch of {} tokens per rank", tokens_per_rank);
  int64_t ranks = 0;
  for (int32_t t : token) ranks = std::max<int64_t>(ranks, t / tokens_per_rank + 1);
  std::vector<std::vector<int32_t>> members(static_cast<size_t>(ranks));  // the assignments of each rank
  for (size_t a = 0; a < token.size(); ++a)
    members[static_cast<size_t>(token[a] / tokens_per_rank)].push_back(static_cast<int32_t>(a));
  Dispatch out;
  out.final_expert.assign(token.size(), -1);
  for (const std::vector<int32_t>& part : members) {
    std::vector<int32_t> t, e, r;
    for (int32_t a : part) {
      t.push_back(token[static_cast<size_t>(a)]);
      e.push_back(expert[static_cast<size_t>(a)]);
      r.push_back(rank[static_cast<size_t>(a)]);
    }
    const Dispatch d = plan_dispatch(t, e, r, experts, capacity, overflow, probs_host);
    for (size_t i = 0; i < part.size(); ++i) out.final_expert[static_cast<size_t>(part[i])] = d.final_expert[i];
    out.dropped += d.dropped;
    out.rerouted += d.rerouted;
  }
  group_rows(token, experts, out);  // the plans put together
  return out;
}

namespace {
using namespace moe_detail;

// mean_prob[e] += probs[t, e] / T over probs_host [T, E]; returns the mean entropy of the rows.
// Reads f32/f64 through a typed pointer: this visits every router probability of the step, and
// host_value's per-element call and dtype switch cost milliseconds at T*E = 262k.
template <class Read>
double prob_stats(int64_t tokens, int64_t experts, std::vector<double>& mean_prob, const Read& read) {
  double entropy = 0;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t e = 0; e < experts; ++e) {
      const double p = read(t * experts + e);
      mean_prob[static_cast<size_t>(e)] += p / static_cast<double>(tokens);
      if (p > 0) entropy -= p * std::log(p);
    }
  return tokens > 0 ? entropy / static_cast<double>(tokens) : 0.0;
}

double accumulate_prob_stats(const Tensor& probs_host, int64_t tokens, int64_t experts,
                             std::vector<double>& mean_prob) {
  if (probs_host.dtype() == DType::f32) {
    const float* p = probs_host.data<float>();
    return prob_stats(tokens, experts, mean_prob, [p](int64_t i) { return static_cast<double>(p[i]); });
  }
  if (probs_host.dtype() == DType::f64) {
    const double* p = probs_host.data<double>();
    return prob_stats(tokens, experts, mean_prob, [p](int64_t i) { return p[i]; });
  }
  return prob_stats(tokens, experts, mean_prob, [&probs_host](int64_t i) { return host_value(probs_host, i); });
}

}  // namespace

// ---------------------------------------------------------------------------------------------

namespace {
using namespace moe_detail;

std::string plugin_tag(const PluginRegistry& registry, PluginKind kind, const std::string& name, int64_t layer) {
  const PluginInfo& info = registry.require(kind, name);
  return fmt::format("layer {}, {} '{}' ({})", layer,
                     kind == PluginKind::experts ? "expert layout" : plugin_kind_name(kind), name, info.file.string());
}

}  // namespace

MoeLayer::MoeLayer(const MoeConfig& config, const LayerSpec& spec, const PluginRegistry& registry, Ops& ops, Rng& rng,
                   const Parallel& parallel, MicroBatchScopes scopes)
    : config_(config),
      spec_(spec),
      ops_(ops),
      rng_(rng.fork(0x4d6f45ULL + static_cast<uint64_t>(spec.layer_index))),
      dead_(spec.num_experts, config.dead_expert_window),
      parallel_(&parallel),
      scopes_(scopes) {
  Rng init = rng_.fork(1);
  experts_tag_ = plugin_tag(registry, PluginKind::experts, config.experts.type, spec_.layer_index);
  router_tag_ = plugin_tag(registry, PluginKind::router, config.router.type, spec_.layer_index);
  experts_ = in_plugin(experts_tag_, "constructor", [&] {
    return registry.make_experts(config.experts.type, config.experts.params, spec_, ops, init);
  });
  if (parallel.expert_size() > 1) shard_experts(registry, ops);
  router_ = in_plugin(router_tag_, "constructor",
                      [&] { return registry.make_router(config.router.type, config.router.params, spec_, ops, init); });
  bool bias = false;
  for (const auto& choice : config.balancers) {
    balancer_tags_.push_back(plugin_tag(registry, PluginKind::balancer, choice.type, spec_.layer_index));
    balancers_.push_back(in_plugin(balancer_tags_.back(), "constructor", [&] {
      return registry.make_balancer(choice.type, choice.params, spec_, ops, init);
    }));
    balancer_names_.push_back(choice.type);
    bias = bias || balancers_.back()->uses_expert_bias();
  }
  if (bias) expert_bias_ = ops.zeros(spec_.dtype, {spec_.num_experts});
}

MoeLayer::~MoeLayer() = default;

bool MoeLayer::is_sharded(const Parameter* p) const {
  return std::find(sharded_.begin(), sharded_.end(), p) != sharded_.end();
}

GradReduce MoeLayer::grad_reduce(const Parameter* p) const {
  if (is_sharded(p)) return GradReduce::expert_replicas;
  for (Parameter* q : router_->parameters())
    if (q == p) return GradReduce::none;
  for (const auto& b : balancers_)
    for (Parameter* q : b->parameters())
      if (q == p) return GradReduce::none;
  return GradReduce::world;  // the layout's own: routed experts unsplit (one expert rank), shared experts
}

std::vector<Parameter*> MoeLayer::parameters() {
  std::vector<Parameter*> out = router_->parameters();
  for (Parameter* p : experts_->parameters()) out.push_back(p);
  for (auto& b : balancers_)
    for (Parameter* p : b->parameters()) out.push_back(p);
  return out;
}

std::vector<std::pair<std::string, Parameter*>> MoeLayer::named_parameters() {
  std::vector<std::pair<std::string, Parameter*>> out;
  for (Parameter* p : router_->parameters()) out.emplace_back("router." + p->name, p);
  for (Parameter* p : experts_->parameters()) out.emplace_back("experts." + p->name, p);
  for (size_t i = 0; i < balancers_.size(); ++i)
    for (Parameter* p : balancers_[i]->parameters()) out.emplace_back(fmt::format("balancers.{}.{}", i, p->name), p);
  return out;
}

RouterContext MoeLayer::context(Rng& step_rng, bool training, int64_t step, int64_t batch, int64_t seq_len,
                                const Tensor* token_ids, double capacity_factor) {
  return RouterContext{ops_,           step_rng, training,  step,
                       batch,          seq_len,  token_ids, expert_bias_.defined() ? &expert_bias_ : nullptr,
                       capacity_factor};
}

void MoeLayer::route(const Tensor& x, const RouterContext& ctx, Saved& saved, std::vector<int32_t>& token,
                     std::vector<int32_t>& expert, std::vector<int32_t>& rank) {
  const int64_t tokens = x.dim(0), experts = spec_.num_experts;
  saved.plan = in_plugin(router_tag_, "forward", [&] {
    const MatmulPrecisionScope scope(ops_, router_precision());  // router logits in f32
    return router_->forward(x, ctx);
  });
  RoutingPlan& plan = saved.plan;
  expect_shape(plan.logits, {tokens, experts}, "router logits");
  expect_shape(plan.probs, {tokens, experts}, "router probabilities");

  token = host_ints(ops_, plan.token);
  expert = host_ints(ops_, plan.expert);
  rank = host_ints(ops_, plan.rank);
  MOELAB_CHECK(token.size() == expert.size() && token.size() == rank.size() &&
                   plan.weight.numel() == static_cast<int64_t>(token.size()),
               "router '{}' returned inconsistent assignment lists", config_.router.type);

  stats_ = LayerStats{};
  stats_.tokens = tokens;
  stats_.routed_per_expert.assign(static_cast<size_t>(experts), 0);
  for (size_t a = 0; a < token.size(); ++a) {
    MOELAB_CHECK(token[a] >= 0 && token[a] < tokens && expert[a] < experts,
                 "router '{}' produced assignment {} = (token {}, expert {}) outside [{} tokens, {} experts]",
                 config_.router.type, a, token[a], expert[a], tokens, experts);
    if (expert[a] >= 0) {
      ++stats_.routed_per_expert[static_cast<size_t>(expert[a])];
      ++stats_.assignments;
    }
  }
}

Dispatch MoeLayer::dispatch(const Saved& saved, const std::vector<int32_t>& token, const std::vector<int32_t>& expert,
                            const std::vector<int32_t>& rank, const Tensor& probs_host, int64_t part_tokens) {
  const int64_t tokens = stats_.tokens, experts = spec_.num_experts;
  const RoutingPlan& plan = saved.plan;
  // Expert-choice routers size their own buckets: capacity does not apply to them.
  const bool token_choice = plan.top_k > 0;
  const Overflow overflow = token_choice ? config_.overflow : Overflow::dropless;
  const Tensor& reroute_probs = overflow == Overflow::reroute ? probs_host : Tensor{};
  if (part_tokens < tokens) {  // capacity scope local: each micro-batch on its own
    stats_.capacity =
        overflow == Overflow::dropless ? 0 : expert_capacity(part_tokens, plan.top_k, experts, saved.capacity_factor);
    return plan_dispatch_per_rank(token, expert, rank, experts, stats_.capacity, overflow, reroute_probs, part_tokens);
  }
  stats_.capacity =
      overflow == Overflow::dropless ? 0 : expert_capacity(tokens, plan.top_k, experts, saved.capacity_factor);
  return plan_dispatch(token, expert, rank, experts, stats_.capacity, overflow, reroute_probs);
}

void MoeLayer::finish_stats(const Dispatch& dispatch, const Tensor& probs_host, int64_t tokens) {
  const int64_t experts = spec_.num_experts;
  const int64_t rows = dispatch.offsets.back();
  stats_.tokens_per_expert = dispatch.tokens_per_expert;
  stats_.dropped = dispatch.dropped;
  stats_.rerouted = dispatch.rerouted;
  std::vector<char> served(static_cast<size_t>(tokens), 0);
  for (int32_t t : dispatch.source_token) served[static_cast<size_t>(t)] = 1;
  stats_.tokens_without_expert = std::count(served.begin(), served.end(), 0);
  stats_.drop_fraction =
      stats_.assignments > 0 ? static_cast<double>(stats_.dropped) / static_cast<double>(stats_.assignments) : 0.0;
  stats_.load_fraction.assign(static_cast<size_t>(experts), 0.0);
  stats_.mean_prob.assign(static_cast<size_t>(experts), 0.0);
  stats_.router_entropy = accumulate_prob_stats(probs_host, tokens, experts, stats_.mean_prob);
  int64_t max_load = 0, max_routed = 0;
  for (int64_t e = 0; e < experts; ++e) {
    max_routed = std::max(max_routed, stats_.routed_per_expert[static_cast<size_t>(e)]);
    if (stats_.assignments > 0)
      stats_.load_fraction[static_cast<size_t>(e)] =
          static_cast<double>(stats_.routed_per_expert[static_cast<size_t>(e)]) /
          static_cast<double>(stats_.assignments);
    max_load = std::max(max_load, stats_.tokens_per_expert[static_cast<size_t>(e)]);
  }
  const double mean_load = static_cast<double>(rows) / static_cast<double>(experts);
  stats_.max_violation = mean_load > 0 ? static_cast<double>(max_load) / mean_load - 1.0 : 0.0;
  const double mean_routed = static_cast<double>(stats_.assignments) / static_cast<double>(experts);
  stats_.routed_max_violation = mean_routed > 0 ? static_cast<double>(max_routed) / mean_routed - 1.0 : 0.0;
}

int64_t MoeLayer::micro_tokens(int64_t tokens, int64_t seq_len) const {
  if (!scopes_.any() || scopes_.sequences <= 0) return tokens;
  return std::min(tokens, scopes_.sequences * std::max<int64_t>(1, seq_len));
}

void MoeLayer::balancers_forward(Saved& saved, const RouterContext& ctx, const std::vector<int32_t>& token,
                                 const std::vector<int32_t>& expert, const std::vector<int32_t>& rank) {
  saved.load.routed_per_expert = stats_.routed_per_expert;
  saved.load.tokens_per_expert = stats_.tokens_per_expert;
  saved.load.tokens = stats_.tokens;
  saved.load.top_k = saved.plan.top_k;
  const int64_t part_tokens = micro_tokens(stats_.tokens, saved.seq_len);
  if (scopes_.balance && part_tokens < stats_.tokens && !balancers_.empty())
    saved.micro_batches =
        split_micro_batches(ops_, saved.plan, token, expert, rank, saved.final_expert, saved.token_ids, part_tokens);
  for (size_t i = 0; i < balancers_.size(); ++i) {
    double loss = 0;
    if (saved.micro_batches.empty()) {
      loss =
          in_plugin(balancer_tags_[i], "forward", [&] { return balancers_[i]->forward(saved.plan, saved.load, ctx); });
    } else {
      for (const MicroBatch& part : saved.micro_batches) {
        const RouterContext part_ctx = part_context(ctx, part);
        loss += in_plugin(balancer_tags_[i], "forward",
                          [&] { return balancers_[i]->forward(part.plan, part.load, part_ctx); });
      }
      loss /= static_cast<double>(saved.micro_batches.size());
    }
    stats_.balancer_losses.emplace_back(balancer_names_[i], loss);
    stats_.aux_loss += loss;
  }
  // The load that steers the bias and finds dead experts is the batch's (the micro-batches' sum).
  if (saved.training) dead_.record(stats_.tokens_per_expert, stats_.tokens);
  collect_plugin_metrics();
}

void MoeLayer::balancers_backward(Saved& s, const RouterContext& ctx, RouterGrad& grad) {
  if (s.micro_batches.empty()) {
    for (size_t i = 0; i < balancers_.size(); ++i)
      in_plugin(balancer_tags_[i], "backward", [&] { balancers_[i]->backward(s.plan, s.load, ctx, 1.0, grad); });
    return;
  }
  const double share = 1.0 / static_cast<double>(s.micro_batches.size());
  for (const MicroBatch& part : s.micro_batches) {
    const RouterContext part_ctx = part_context(ctx, part);
    RouterGrad part_grad;
    part_grad.weight = ops_.zeros(s.plan.weight.dtype(), {part.assignments.numel()});
    for (size_t i = 0; i < balancers_.size(); ++i)
      in_plugin(balancer_tags_[i], "backward",
                [&] { balancers_[i]->backward(part.plan, part.load, part_ctx, share, part_grad); });
    add_part_gradient(ops_, part, s.plan, part_grad, grad);
  }
}

Tensor MoeLayer::forward(const Tensor& x, const LayerInput& input) {
  if (parallel_->distributed()) return forward_parallel(x, input);
  const int64_t tokens = x.dim(0), d = spec_.d_model;
  expect_shape(x, {tokens, d}, "MoE layer input");
  Laps laps(profile_);
  auto saved = std::make_unique<Saved>();
  saved->x = x;
  saved->training = input.training;
  saved->step = input.step;
  saved->batch = input.batch;
  saved->seq_len = input.seq_len > 0 ? input.seq_len : tokens;
  saved->token_ids = input.token_ids;
  saved->capacity_factor = input.training ? config_.capacity_factor : config_.eval_capacity_factor;

  // The routing noise of a step is a function of (seed, layer, step, training): a forward can be
  // repeated exactly (gradient checks, resume).
  Rng step_rng = rng_.fork(2 + 2 * static_cast<uint64_t>(input.step) + (input.training ? 1 : 0));
  const RouterContext ctx = context(step_rng, input.training, input.step, input.batch, saved->seq_len, input.token_ids,
                                    saved->capacity_factor);
  std::vector<int32_t> token, expert, rank;
  route(x, ctx, *saved, token, expert, rank);
  const RoutingPlan& plan = saved->plan;
  const Tensor probs_host = ops_.to_host(plan.probs);
  const Dispatch dispatch = this->dispatch(*saved, token, expert, rank, probs_host,
                                           scopes_.capacity ? micro_tokens(tokens, saved->seq_len) : tokens);
  saved->offsets = dispatch.offsets;
  saved->final_expert = dispatch.final_expert;
  const int64_t rows = dispatch.offsets.back();
  laps.charge(&ExchangeProfile::route_seconds);

  // Dispatch: gather token rows into expert order; run the experts; combine with the weights.
  saved->order = upload_ints(ops_, dispatch.order);
  saved->source_token = upload_ints(ops_, dispatch.source_token);
  saved->x_sorted = ops_.empty(x.dtype(), {rows, d});
  if (rows > 0) ops_.gather_rows(x, saved->source_token, saved->x_sorted);
  saved->y_sorted = ops_.empty(x.dtype(), {rows, d});
  laps.charge(&ExchangeProfile::permute_seconds);
  saved->experts_context = in_plugin(experts_tag_, "forward", [&] {
    return experts_->forward(ops_, saved->x_sorted, saved->offsets, saved->y_sorted);
  });
  laps.charge(&ExchangeProfile::experts_seconds);
  saved->row_weight = ops_.empty(x.dtype(), {rows, 1});
  if (rows > 0) ops_.gather_rows(plan.weight.reshaped({plan.weight.numel(), 1}), saved->order, saved->row_weight);
  saved->row_weight = saved->row_weight.reshaped({rows});
  Tensor y = ops_.zeros(x.dtype(), {tokens, d});
  if (rows > 0) ops_.scatter_add_rows(saved->y_sorted, saved->source_token, &saved->row_weight, y);
  laps.charge(&ExchangeProfile::permute_seconds);
  if (experts_->has_shared())
    saved->shared_context =
        in_plugin(experts_tag_, "shared_forward", [&] { return experts_->shared_forward(ops_, x, y); });
  laps.charge(&ExchangeProfile::experts_seconds);

  finish_stats(dispatch, probs_host, tokens);
  balancers_forward(*saved, ctx, token, expert, rank);
  laps.charge(&ExchangeProfile::route_seconds);
  saved_ = std::move(saved);
  return y;
}

void MoeLayer::collect_plugin_metrics() {
  stats_.plugin_metrics.clear();
  const auto add = [&](const std::string& tag, const std::string& prefix, const Module& plugin) {
    const auto figures = in_plugin(tag, "metrics", [&] { return plugin.metrics(); });
    for (const auto& [name, value] : figures) {
      MOELAB_CHECK(std::isfinite(value), "{}: metrics: '{}' is {}, not a finite number", tag, name, value);
      stats_.plugin_metrics.emplace_back(prefix + name, value);
    }
  };
  add(router_tag_, "router." + config_.router.type + ".", *router_);
  add(experts_tag_, "experts." + config_.experts.type + ".", *experts_);
  for (size_t i = 0; i < balancers_.size(); ++i)
    add(balancer_tags_[i], "balancers." + balancer_names_[i] + ".", *balancers_[i]);
}

Tensor MoeLayer::backward(const Tensor& dy) {
  MOELAB_CHECK(saved_ != nullptr, "MoE layer backward called without a forward");
  if (parallel_->distributed()) return backward_parallel(dy);
  Saved& s = *saved_;
  const int64_t tokens = s.x.dim(0), d = spec_.d_model;
  expect_shape(dy, {tokens, d}, "MoE layer output gradient");
  const int64_t rows = s.offsets.back();
  const int64_t assignments = s.plan.weight.numel();
  Laps laps(profile_);

  Tensor dx = ops_.zeros(s.x.dtype(), {tokens, d});
  if (experts_->has_shared())
    in_plugin(experts_tag_, "shared_backward",
              [&] { experts_->shared_backward(ops_, s.x, *s.shared_context, dy, dx); });
  laps.charge(&ExchangeProfile::experts_seconds);

  // y[t] = sum_rows w_r * expert(x_sorted)_r:  dL/dw_r = <dy[t_r], y_sorted_r>,
  // dL/d expert output_r = w_r * dy[t_r].
  RouterGrad grad;
  grad.weight = ops_.zeros(s.plan.weight.dtype(), {assignments});
  if (rows > 0) {
    Tensor dy_sorted = ops_.empty(dy.dtype(), {rows, d});
    ops_.gather_rows(dy, s.source_token, dy_sorted);
    Tensor drow_weight = ops_.empty(dy.dtype(), {rows});
    ops_.row_dot(dy_sorted, s.y_sorted, drow_weight);
    Tensor dweight = grad.weight.reshaped({assignments, 1});
    ops_.scatter_add_rows(drow_weight.reshaped({rows, 1}), s.order, nullptr, dweight);
    ops_.scale_rows(s.row_weight, dy_sorted);
    Tensor dx_sorted = ops_.empty(dy.dtype(), {rows, d});
    laps.charge(&ExchangeProfile::permute_seconds);
    in_plugin(experts_tag_, "backward",
              [&] { experts_->backward(ops_, s.x_sorted, s.offsets, *s.experts_context, dy_sorted, dx_sorted); });
    laps.charge(&ExchangeProfile::experts_seconds);
    ops_.scatter_add_rows(dx_sorted, s.source_token, nullptr, dx);
    laps.charge(&ExchangeProfile::permute_seconds);
  } else {
    Tensor none = ops_.empty(dy.dtype(), {0, d});
    in_plugin(experts_tag_, "backward",
              [&] { experts_->backward(ops_, s.x_sorted, s.offsets, *s.experts_context, none, none); });
  }

  Rng step_rng = rng_.fork(2 + 2 * static_cast<uint64_t>(s.step) + (s.training ? 1 : 0));
  const RouterContext ctx = context(step_rng, s.training, s.step, s.batch, s.seq_len, s.token_ids, s.capacity_factor);
  balancers_backward(s, ctx, grad);
  in_plugin(router_tag_, "backward", [&] {
    const MatmulPrecisionScope scope(ops_, router_precision());
    router_->backward(s.x, s.plan, grad, ctx, dx);
  });
  laps.charge(&ExchangeProfile::route_seconds);
  return dx;
}

const RoutingPlan& MoeLayer::last_plan() const {
  MOELAB_CHECK(saved_ != nullptr, "the MoE layer has not run a forward yet");
  return saved_->plan;
}

const std::vector<int32_t>& MoeLayer::last_final_expert() const {
  MOELAB_CHECK(saved_ != nullptr, "the MoE layer has not run a forward yet");
  return saved_->final_expert;
}

void MoeLayer::after_step() {
  if (!saved_) return;
  for (size_t i = 0; i < balancers_.size(); ++i)
    in_plugin(balancer_tags_[i], "after_step", [&] { balancers_[i]->after_step(ops_, saved_->load, expert_bias_); });
}

}  // namespace moelab

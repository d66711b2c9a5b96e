// The MoE layer: router -> capacity -> dispatch -> experts -> combine, plus balancers, with an
// explicit backward. Device-agnostic: all tensor work goes through Ops; only the small per-step
// index bookkeeping (capacity, expert offsets) is done on the host.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moelab/balancer.hpp"
#include "moelab/config.hpp"
#include "moelab/experts.hpp"
#include "moelab/parallel.hpp"
#include "moelab/router.hpp"

namespace moelab {

class PluginRegistry;

// Per forward: how the experts were used. Host values.
struct LayerStats {
  std::vector<int64_t> routed_per_expert;  // assignments routed to each expert, before capacity
  std::vector<int64_t> tokens_per_expert;  // assignments each expert processed
  int64_t tokens = 0;
  int64_t assignments = 0;            // A, routed assignments (expert >= 0)
  int64_t dropped = 0;                // assignments lost to capacity
  int64_t rerouted = 0;               // assignments moved to another expert (overflow = reroute)
  int64_t tokens_without_expert = 0;  // tokens left with only their residual
  int64_t capacity = 0;               // per expert; 0 when dropless
  double drop_fraction = 0;           // dropped / assignments
  std::vector<double> load_fraction;  // f_i: share of assignments routed to expert i
  std::vector<double> mean_prob;      // P_i: mean router probability of expert i
  double router_entropy = 0;          // mean over tokens of -sum_e p log p
  double max_violation = 0;           // MaxVio: max load / mean load - 1 (processed load)
  // The same on the routed load, before capacity: Wang et al. 2024's MaxVio (DeepSeek's
  // auxiliary-loss-free balancing), which capacity drops cannot hide. Equal to max_violation
  // when nothing is dropped or rerouted.
  double routed_max_violation = 0;
  std::vector<std::pair<std::string, double>> balancer_losses;  // (balancer name, loss)
  // What the router, the expert layout and the balancers report through Module::metrics():
  // ("router.sinkhorn.iterations", 7), ("balancers.aux_free_bias.bias_abs_max", 0.02), ...
  std::vector<std::pair<std::string, double>> plugin_metrics;
  double aux_loss = 0;  // sum of balancer losses
};

// Counts, over a sliding window of tokens, which experts received none: the dead experts.
class DeadExpertTracker {
 public:
  DeadExpertTracker(int64_t num_experts, int64_t window_tokens);
  void record(const std::vector<int64_t>& tokens_per_expert, int64_t tokens);
  // Experts that processed no token within the last `window` tokens (only once that many were seen).
  std::vector<int64_t> dead() const;
  int64_t tokens_seen() const { return tokens_seen_; }
  // Checkpoint state: the token count at which each expert last got a token, and the total.
  const std::vector<int64_t>& last_seen() const { return last_seen_; }
  void restore(std::vector<int64_t> last_seen, int64_t tokens_seen);

 private:
  int64_t window_;
  int64_t tokens_seen_ = 0;
  std::vector<int64_t> last_seen_;  // token count at which each expert last got a token
};

// Capacity and dispatch of a plan's A assignments (host bookkeeping). Assignments are served in
// priority order — every token's first choice before any second choice (GShard), tokens in order
// within a rank — and an expert past `capacity` overflows by `overflow`: drop (the token keeps its
// residual), reroute (to its most probable expert with room that it does not use already; the
// combine weight stays the one the router gave the original choice) or dropless (no capacity).
struct Dispatch {
  std::vector<int32_t> order;              // [R]: the assignment behind each dispatched row, grouped by expert
  std::vector<int32_t> source_token;       // [R]: token of each dispatched row
  std::vector<int64_t> offsets;            // [E+1]: rows of expert e are [offsets[e], offsets[e+1])
  std::vector<int32_t> final_expert;       // [A]: expert that processes each assignment, -1 if none
  std::vector<int64_t> tokens_per_expert;  // [E]
  int64_t dropped = 0, rerouted = 0;
};
// probs_host [T, E] is read only for reroute (may be undefined otherwise).
Dispatch plan_dispatch(const std::vector<int32_t>& token, const std::vector<int32_t>& expert,
                       const std::vector<int32_t>& rank, int64_t num_experts, int64_t capacity, Overflow overflow,
                       const Tensor& probs_host);
// capacity = ceil(tokens * k / experts * factor) (GShard, Switch).
int64_t expert_capacity(int64_t tokens, int64_t k, int64_t experts, double factor);
// Capacity scope local: the assignments of each micro-batch of `tokens_per_rank` consecutive tokens
// (each rank's share by default, [parallel] micro_batch) are dispatched on their own, against the
// capacity of that many tokens; the plans put together.
Dispatch plan_dispatch_per_rank(const std::vector<int32_t>& token, const std::vector<int32_t>& expert,
                                const std::vector<int32_t>& rank, int64_t num_experts, int64_t capacity,
                                Overflow overflow, const Tensor& probs_host, int64_t tokens_per_rank);

// How a data-parallel run combines a parameter's gradient over the ranks: summed over every rank
// (the replicated parameters), over the ranks holding the same experts (the routed experts), or
// not at all (the router's and balancers', which every rank computes whole from the global batch).
enum class GradReduce { world, expert_replicas, none };

// The expert layout's parameters that hold one row block per routed expert (leading dimension
// num_experts), named as in the layer ("experts.w_in"): what a parallel run splits over its
// expert ranks, and `moelab reshard` joins and splits again. Counted on the meta kernel.
std::vector<std::string> per_expert_parameters(const MoeConfig& moe, const LayerSpec& spec,
                                               const PluginRegistry& registry);

struct LayerInput {
  bool training = true;
  int64_t step = 0;
  int64_t batch = 1;
  int64_t seq_len = 0;                // 0: the whole input is one sequence
  const Tensor* token_ids = nullptr;  // host i32 [T], for hash routing
};

namespace moe_detail {
struct ExchangeBuffers;  // moe_layer_internal.hpp
}

// Where a layer's forwards and backwards on several ranks spent their time, summed since the
// last reset (host wall clock: a device kernel's asynchronous work is charged where it is next
// waited for). moelab-bench --parallel reads it; one process fills all but transfer and wait.
struct ExchangeProfile {
  double route_seconds = 0;  // gathering the global batch, the router, capacity, balancers
  // Dispatch and combine, on this rank: counting, gathering the rows into send (one process:
  // expert) order, the weighted combine, and the backward's same steps.
  double permute_seconds = 0;
  double transfer_seconds = 0;  // dispatch and combine, between ranks: the counts and the four row exchanges
  double wait_seconds = 0;      // with separate_waits: waiting for slower ranks before an exchange
  double experts_seconds = 0;   // the local (and shared) experts, forward and backward
  // A barrier before each exchange, so that a slower rank's expert work (load imbalance) is
  // charged to wait_seconds, not to the transfer. Costs a barrier's latency; off in training.
  bool separate_waits = false;
  // The last forward's dispatch alltoallv, bytes per rank of the expert group (the combine
  // sends them back; the backward repeats both).
  std::vector<int64_t> send_bytes, recv_bytes;
};

class MoeLayer : public Module {
 public:
  // On several ranks (parallel.distributed()), every rank constructs the layer together: the
  // routed experts are split over parallel.expert_group(), each rank keeping its slice of the
  // values one process would have drawn. `scopes` says what is counted per micro-batch
  // ([parallel] capacity / balance = "local"); the default counts everything over the batch.
  MoeLayer(const MoeConfig& config, const LayerSpec& spec, const PluginRegistry& registry, Ops& ops, Rng& rng,
           const Parallel& parallel = single_process(), MicroBatchScopes scopes = {});
  ~MoeLayer() override;

  // x [T, d] -> y [T, d]. Saves what backward needs; stats() describes this forward.
  Tensor forward(const Tensor& x, const LayerInput& input);
  // dy [T, d] -> dx [T, d]. Accumulates every parameter gradient, the balancers' included.
  Tensor backward(const Tensor& dy);
  // After the optimiser step: balancers that adjust state between steps (aux_free_bias) run here.
  void after_step();

  const LayerStats& stats() const { return stats_; }
  DeadExpertTracker& dead_experts() { return dead_; }
  const LayerSpec& spec() const { return spec_; }
  Router& router() { return *router_; }
  Experts& experts() { return *experts_; }
  // The selection-only bias [E] of aux-loss-free balancing; undefined unless a balancer uses it.
  Tensor& expert_bias() { return expert_bias_; }
  // The last forward's routing plan, and the expert that processed each of its assignments after
  // capacity (-1: dropped or not dispatched). Valid until the next forward.
  const RoutingPlan& last_plan() const;
  const std::vector<int32_t>& last_final_expert() const;
  std::vector<Parameter*> parameters() override;
  // Every parameter with its name in weights files: "router.weight", "experts.w_in", ...
  std::vector<std::pair<std::string, Parameter*>> named_parameters();
  GradReduce grad_reduce(const Parameter* p) const;
  // Parameters split over the expert group: this rank holds experts [first, first + count) of
  // their leading dimension (empty in one process).
  bool is_sharded(const Parameter* p) const;
  ExchangeProfile& exchange_profile() { return profile_; }

 private:
  struct Saved;
  struct Exchange;  // what a parallel forward saves: the expert group's token exchange
  RouterContext context(Rng& step_rng, bool training, int64_t step, int64_t batch, int64_t seq_len,
                        const Tensor* token_ids, double capacity_factor);
  // The router's plan for x, checked, with the routed load in stats_ (reset here).
  void route(const Tensor& x, const RouterContext& ctx, Saved& saved, std::vector<int32_t>& token,
             std::vector<int32_t>& expert, std::vector<int32_t>& rank);
  // Capacity (over micro-batches of `part_tokens` when fewer than the forward's), then the figures
  // of stats_ that follow from the dispatch and the probabilities.
  Dispatch dispatch(const Saved& saved, const std::vector<int32_t>& token, const std::vector<int32_t>& expert,
                    const std::vector<int32_t>& rank, const Tensor& probs_host, int64_t part_tokens);
  void finish_stats(const Dispatch& dispatch, const Tensor& probs_host, int64_t tokens);
  // Tokens per micro-batch of a forward of `tokens` rows in sequences of seq_len (all of them
  // unless a scope is local).
  int64_t micro_tokens(int64_t tokens, int64_t seq_len) const;
  // The balancers' losses on the plan (or, with balance local, on each micro-batch's part of it).
  void balancers_forward(Saved& saved, const RouterContext& ctx, const std::vector<int32_t>& token,
                         const std::vector<int32_t>& expert, const std::vector<int32_t>& rank);
  void balancers_backward(Saved& saved, const RouterContext& ctx, RouterGrad& grad);
  Tensor forward_parallel(const Tensor& x, const LayerInput& input);
  Tensor backward_parallel(const Tensor& dy);
  void shard_experts(const PluginRegistry& registry, Ops& ops);
  void collect_plugin_metrics();  // stats_.plugin_metrics from every plugin's metrics()
  MoeConfig config_;
  // What the router's GEMMs compute in: f32, or the kernel's present precision with
  // moe.router_precision = "train".
  DType router_precision() const { return config_.router_in_train_precision ? ops_.matmul_precision() : DType::f32; }
  LayerSpec spec_;
  Ops& ops_;
  Rng rng_;
  std::shared_ptr<Router> router_;
  std::shared_ptr<Experts> experts_;
  std::vector<std::shared_ptr<Balancer>> balancers_;
  // "layer 2, router 'softmax_topk' (/path/libmoelab_router_softmax_topk.so)": what a failure
  // inside that plugin's code is prefixed with.
  std::string router_tag_, experts_tag_;
  std::vector<std::string> balancer_tags_;
  std::vector<std::string> balancer_names_;
  Tensor expert_bias_;
  LayerStats stats_;
  DeadExpertTracker dead_;
  std::unique_ptr<Saved> saved_;
  const Parallel* parallel_;
  MicroBatchScopes scopes_;
  std::vector<const Parameter*> sharded_;
  std::unique_ptr<Exchange> exchange_;
  std::unique_ptr<moe_detail::ExchangeBuffers> buffers_;
  ExchangeProfile profile_;
};

}  // namespace moelab

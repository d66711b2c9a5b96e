// A forward's routing plan cut into micro-batches, for balancers with [parallel] balance = "local"
// (moe_layer_internal.hpp). The layer then runs each balancer on each part and averages:
//   loss = (1/M) sum_m loss(part m),   d loss / d part m = 1/M,
// which is what M data-parallel ranks that each balance their own micro-batch and average their
// gradients compute (most codebases' per-micro-batch statistics; arXiv 2501.11873 compares it
// with the global-batch form).
#include <algorithm>

#include "moe_layer_internal.hpp"
#include "moelab/noisy_gating.hpp"

namespace moelab::moe_detail {

namespace {

Tensor part_rows(const Tensor& t, const MicroBatch& part) {
  return t.defined() ? t.rows(part.first, part.first + part.tokens) : Tensor{};
}

// The noisy-gating context of the part's rows, or null for any other context.
std::unique_ptr<ForwardContext> part_router_context(const RoutingPlan& plan, const MicroBatch& part) {
  const auto* noisy = dynamic_cast<const NoisyGatingContext*>(plan.context.get());
  if (noisy == nullptr) return nullptr;
  auto out = std::make_unique<NoisyGatingContext>();
  out->noisy = noisy->noisy;
  out->top_k = noisy->top_k;
  out->clean_logits = part_rows(noisy->clean_logits, part);
  out->noise_std = part_rows(noisy->noise_std, part);
  out->threshold = part_rows(noisy->threshold, part);
  return out;
}

void add_rows(Ops& ops, const MicroBatch& part, const Tensor& from, const Tensor& like, Tensor& into) {
  if (!from.defined()) return;
  if (!into.defined()) into = ops.zeros(like.dtype(), like.shape());
  Tensor rows = into.rows(part.first, part.first + part.tokens);
  ops.axpy(1.0, from, rows);
}

}  // namespace

std::vector<MicroBatch> split_micro_batches(Ops& ops, const RoutingPlan& plan, const std::vector<int32_t>& token,
                                            const std::vector<int32_t>& expert, const std::vector<int32_t>& rank,
                                            const std::vector<int32_t>& final_expert, const Tensor* token_ids,
                                            int64_t part_tokens) {
  const int64_t tokens = plan.probs.dim(0), experts = plan.probs.dim(1);
  MOELAB_CHECK(part_tokens > 0, "micro-batches of {} tokens", part_tokens);
  std::vector<MicroBatch> parts;
  for (int64_t first = 0; first < tokens; first += part_tokens) {
    MicroBatch& part = parts.emplace_back();
    part.first = first;
    part.tokens = std::min(part_tokens, tokens - first);
  }
  std::vector<std::vector<int32_t>> members(parts.size());  // the assignments of each part
  for (size_t a = 0; a < token.size(); ++a)
    members[static_cast<size_t>(token[a] / part_tokens)].push_back(static_cast<int32_t>(a));
  for (size_t m = 0; m < parts.size(); ++m) {
    MicroBatch& part = parts[m];
    const std::vector<int32_t>& mine = members[m];
    const int64_t count = static_cast<int64_t>(mine.size());
    std::vector<int32_t> part_token(mine.size()), part_expert(mine.size()), part_rank(mine.size());
    part.load.routed_per_expert.assign(static_cast<size_t>(experts), 0);
    part.load.tokens_per_expert.assign(static_cast<size_t>(experts), 0);
    for (size_t i = 0; i < mine.size(); ++i) {
      const auto a = static_cast<size_t>(mine[i]);
      part_token[i] = static_cast<int32_t>(token[a] - part.first);
      part_expert[i] = expert[a];
      part_rank[i] = rank[a];
      if (expert[a] >= 0) ++part.load.routed_per_expert[static_cast<size_t>(expert[a])];
      if (final_expert[a] >= 0) ++part.load.tokens_per_expert[static_cast<size_t>(final_expert[a])];
    }
    part.load.tokens = part.tokens;
    part.load.top_k = plan.top_k;
    part.assignments = upload_ints(ops, mine);
    part.plan.logits = part_rows(plan.logits, part);
    part.plan.probs = part_rows(plan.probs, part);
    part.plan.token = upload_ints(ops, part_token);
    part.plan.expert = upload_ints(ops, part_expert);
    part.plan.rank = upload_ints(ops, part_rank);
    part.plan.weight = ops.empty(plan.weight.dtype(), {count, 1});
    if (count > 0) ops.gather_rows(plan.weight.reshaped({plan.weight.numel(), 1}), part.assignments, part.plan.weight);
    part.plan.weight = part.plan.weight.reshaped({count});
    part.plan.top_k = plan.top_k;
    part.plan.context = part_router_context(plan, part);
    if (token_ids != nullptr && token_ids->defined()) part.token_ids = part_rows(*token_ids, part);
  }
  return parts;
}

RouterContext part_context(const RouterContext& ctx, const MicroBatch& part) {
  const int64_t seq_len = ctx.seq_len > 0 ? ctx.seq_len : part.tokens;
  return RouterContext{ctx.ops,
                       ctx.rng,
                       ctx.training,
                       ctx.step,
                       std::max<int64_t>(1, part.tokens / seq_len),
                       seq_len,
                       part.token_ids.defined() ? &part.token_ids : nullptr,
                       ctx.expert_bias,
                       ctx.capacity_factor};
}

void add_part_gradient(Ops& ops, const MicroBatch& part, const RoutingPlan& plan, const RouterGrad& from,
                       RouterGrad& into) {
  add_rows(ops, part, from.probs, plan.probs, into.probs);
  add_rows(ops, part, from.logits, plan.logits, into.logits);
  const int64_t count = part.assignments.numel();
  if (count > 0) {
    Tensor weight = into.weight.reshaped({into.weight.numel(), 1});
    ops.scatter_add_rows(from.weight.reshaped({count, 1}), part.assignments, nullptr, weight);
  }
  const auto* mine = dynamic_cast<const NoisyGatingContext*>(part.plan.context.get());
  const auto* whole = dynamic_cast<const NoisyGatingContext*>(plan.context.get());
  if (mine == nullptr || whole == nullptr) return;
  if (mine->added_grad_noise_std().defined()) {
    Tensor rows = whole->grad_noise_std(ops).rows(part.first, part.first + part.tokens);
    ops.axpy(1.0, mine->added_grad_noise_std(), rows);
  }
  if (mine->added_grad_threshold().defined()) {
    Tensor rows = whole->grad_threshold(ops).rows(part.first, part.first + part.tokens);
    ops.axpy(1.0, mine->added_grad_threshold(), rows);
  }
  mine->clear_added_grads();
}

}  // namespace moelab::moe_detail

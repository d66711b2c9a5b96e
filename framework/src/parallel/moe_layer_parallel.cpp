// The MoE layer on several ranks (moe_layer.hpp; docs/parallel.md draws one step).
//
// Routing is decided once for the global batch, identically on every rank: each rank gathers
// every rank's hidden rows (and token ids), runs the router on them with the step's own random
// stream, and applies capacity and the balancers to the global plan. Every rank so reaches the
// decisions, the losses and the statistics one process would. The experts' work is what is
// split: a rank sends each of its own tokens' dispatched rows to the rank of its expert group
// that holds that expert, in five steps,
//   1. count its rows per (destination rank, expert) and exchange the counts (alltoall),
//   2. order its rows by (local expert index, destination rank, assignment), deterministically,
//   3. exchange the rows (Comm::exchange, a block per (local expert, rank)): the received rows
//      land in (expert, source rank) order, the order the experts read, so no row is moved
//      again on arrival,
//   4. run its local experts on them (one grouped call), writing straight into the send buffer,
//   5. send the outputs back (the same alltoallvs inverted) and combine them with the router's
//      weights,
// and the backward runs the same exchanges in reverse. One alltoallv ordered by destination would
// need the received rows re-sorted into expert order, and the outputs sorted back before the
// return trip: two more passes over every row each way, which cost more here than the transfers
// themselves; one alltoallv per local expert would pay a collective's latency L times
// (docs/parallel.md measures the three). Every rank enters every collective,
// whether it sends or receives rows or not, so a rank without tokens for anyone cannot hang.
//
// Gradients: the router's and balancers' come out whole on every rank (they see the global
// batch, and the combine weights' gradients are summed over the ranks first), so data
// parallelism leaves them alone; the experts' are this rank's share, summed over the expert
// replicas by the trainer.
#include <fmt/format.h>

#include <numeric>

#include "../model/moe_layer_internal.hpp"
#include "moelab/meta_ops.hpp"
#include "moelab/registry.hpp"

namespace moelab {

using namespace moe_detail;

Tensor ExchangeBuffers::rows(int role, DType dtype, int64_t count, int64_t d) {
  Tensor& buffer = host[role];
  if (!buffer.defined() || buffer.dtype() != dtype || buffer.dim(1) != d || buffer.dim(0) < count)
    buffer = host_tensor(dtype, {std::max<int64_t>(1, count + count / 4), d});  // room for the next steps' jitter
  return buffer.rows(0, count);
}

namespace {

// The exchange buffers' roles (ExchangeBuffers): forward dispatch out and in (the experts' input,
// kept until the backward), the experts' outputs out (and the backward's dx), the combine in (the
// outputs back, kept until the backward's combine, then dx back), the backward's dy out and in.
constexpr int kDispatchSend = 0, kExpertsIn = 1, kExpertsOut = 2, kCombineIn = 3, kGradSend = 4, kGradIn = 5;

// A [count, d] tensor for the experts to write rows into that leave this rank next: on the cpu
// kernel the kExpertsOut buffer itself, elsewhere a device tensor (copied by exchange_blocks).
Tensor expert_rows(Ops& ops, ExchangeBuffers& buffers, DType dtype, int64_t count, int64_t d) {
  return ops.device() == DeviceKind::cpu ? buffers.rows(kExpertsOut, dtype, count, d) : ops.empty(dtype, {count, d});
}

// The rows `index` of src [*, d] that this rank sends, in role's send buffer (on the cpu kernel
// the buffer itself; elsewhere a device tensor, copied to the buffer by exchange_blocks).
Tensor rows_to_send(Ops& ops, ExchangeBuffers& buffers, int role, const Tensor& src, const Tensor& index,
                    int64_t count) {
  const int64_t d = src.dim(1);
  Tensor out = ops.device() == DeviceKind::cpu && src.device() == DeviceKind::cpu
                   ? buffers.rows(role, src.dtype(), count, d)
                   : ops.empty(src.dtype(), {count, d});
  if (count > 0) ops.gather_rows(src, index, out);
  return out;
}

// The rows of an exchange in blocks per (local expert e, rank m): `rows` [R, d] in send buffer
// `send_role` holds, e-major, send[m * L + e] rows of the e-th expert for each rank m in turn; the
// rows received land in buffer `recv_role` the same way, e-major, recv[m * L + e] from each rank
// m. One Comm::exchange of L x ranks blocks (a rank with no rows lists empty blocks). The
// inverse exchange swaps the two count lists.
Tensor exchange_blocks(Ops& ops, Comm& comm, ExchangeBuffers& buffers, int send_role, int recv_role, const Tensor& rows,
                       const std::vector<int64_t>& send, const std::vector<int64_t>& recv, int64_t local_experts,
                       Laps& laps) {
  const int64_t d = rows.dim(1), members = comm.size();
  Tensor out = buffers.rows(send_role, rows.dtype(), rows.dim(0), d);
  if (rows.raw() != out.raw() && rows.numel() > 0) ops.copy(rows, out);
  const int64_t row_bytes = d * static_cast<int64_t>(dtype_size(rows.dtype()));
  const int64_t received = std::accumulate(recv.begin(), recv.end(), int64_t{0});
  Tensor in = buffers.rows(recv_role, rows.dtype(), received, d);
  std::vector<CommBlock> sends, recvs;
  sends.reserve(send.size());
  recvs.reserve(recv.size());
  int64_t sent_at = 0, got_at = 0;
  for (int64_t e = 0; e < local_experts; ++e)
    for (int64_t m = 0; m < members; ++m) {
      const auto i = static_cast<size_t>(m * local_experts + e);
      sends.push_back(CommBlock{static_cast<int>(m), sent_at, send[i] * row_bytes});
      recvs.push_back(CommBlock{static_cast<int>(m), got_at, recv[i] * row_bytes});
      sent_at += send[i] * row_bytes;
      got_at += recv[i] * row_bytes;
    }
  laps.transfer(comm, [&] { comm.exchange(out.raw(), sends, in.raw(), recvs); });
  return ops.to_device(in);
}

// Whether a parameter of shape `full` with `experts` experts and `part` with `local` is one row
// block per expert: its leading dimension counts the experts and the rest is the same.
bool sliced_by_expert(const Shape& full, const Shape& part, int64_t experts, int64_t local) {
  return !full.empty() && full.size() == part.size() && full[0] == experts && part[0] == local &&
         std::equal(full.begin() + 1, full.end(), part.begin() + 1);
}

}  // namespace

void MoeLayer::shard_experts(const PluginRegistry& registry, Ops& ops) {
  const int64_t experts = spec_.num_experts;
  const int64_t local = parallel_->local_experts(experts), first = parallel_->first_expert(experts);
  LayerSpec local_spec = spec_;
  local_spec.num_experts = local;
  Rng scratch(0);  // its draws are overwritten by the slice of the full layout's
  std::shared_ptr<Experts> mine = in_plugin(experts_tag_, "constructor", [&] {
    return registry.make_experts(config_.experts.type, config_.experts.params, local_spec, ops, scratch);
  });
  const std::vector<Parameter*> full = experts_->parameters(), part = mine->parameters();
  if (full.size() != part.size())
    throw UsageError(
        fmt::format("{}: it has {} parameters with {} experts and {} with {}, so it cannot be split "
                    "over parallel.expert = {} ranks",
                    experts_tag_, full.size(), experts, part.size(), local, parallel_->expert_size()));
  for (size_t i = 0; i < full.size(); ++i) {
    const Tensor &f = full[i]->value, &p = part[i]->value;
    if (f.shape() == p.shape()) {  // not per expert (shared experts): replicated
      ops.copy(f, part[i]->value);
      continue;
    }
    if (!sliced_by_expert(f.shape(), p.shape(), experts, local))
      throw UsageError(
          fmt::format("{}: parameter '{}' is {} with {} experts and {} with {}: its leading "
                      "dimension is not the expert, so it cannot be split over parallel.expert = "
                      "{} ranks",
                      experts_tag_, full[i]->name, shape_str(f.shape()), experts, shape_str(p.shape()), local,
                      parallel_->expert_size()));
    ops.copy(f.rows(first, first + local), part[i]->value);
    sharded_.push_back(part[i]);
  }
  experts_ = std::move(mine);
}

std::vector<std::string> per_expert_parameters(const MoeConfig& moe, const LayerSpec& spec,
                                               const PluginRegistry& registry) {
  const std::shared_ptr<Ops> meta = make_meta_ops();
  LayerSpec one = spec;
  one.num_experts = 1;
  one.top_k = 1;
  Rng rng(0);
  const std::shared_ptr<Experts> full = registry.make_experts(moe.experts.type, moe.experts.params, spec, *meta, rng);
  const std::shared_ptr<Experts> single = registry.make_experts(moe.experts.type, moe.experts.params, one, *meta, rng);
  const std::vector<Parameter*> a = full->parameters(), b = single->parameters();
  std::vector<std::string> out;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    if (a[i]->value.shape() != b[i]->value.shape() &&
        sliced_by_expert(a[i]->value.shape(), b[i]->value.shape(), spec.num_experts, 1))
      out.push_back("experts." + a[i]->name);
  return out;
}

Tensor MoeLayer::forward_parallel(const Tensor& x, const LayerInput& input) {
  Comm& world = parallel_->world();
  Comm& group = parallel_->expert_group();
  const int64_t local_tokens = x.dim(0), d = spec_.d_model, experts = spec_.num_experts;
  expect_shape(x, {local_tokens, d}, "MoE layer input");
  const int64_t ranks = world.size(), offset = world.rank() * local_tokens, tokens = local_tokens * ranks;
  Laps laps(profile_);
  auto saved = std::make_unique<Saved>();
  saved->x = x;
  saved->x_global = ops_.to_device(allgather_rows(world, ops_.to_host(x)));
  if (input.token_ids) {
    saved->token_ids_global = allgather_rows(world, *input.token_ids);
    saved->token_ids = &saved->token_ids_global;
  }
  saved->training = input.training;
  saved->step = input.step;
  saved->seq_len = input.seq_len > 0 ? input.seq_len : local_tokens;
  saved->batch = tokens / saved->seq_len;
  saved->capacity_factor = input.training ? config_.capacity_factor : config_.eval_capacity_factor;

  // 0. The global plan, as one process makes it.
  Rng step_rng = rng_.fork(2 + 2 * static_cast<uint64_t>(input.step) + (input.training ? 1 : 0));
  const RouterContext ctx = context(step_rng, saved->training, saved->step, saved->batch, saved->seq_len,
                                    saved->token_ids, saved->capacity_factor);
  std::vector<int32_t> token, expert, rank;
  route(saved->x_global, ctx, *saved, token, expert, rank);
  const RoutingPlan& plan = saved->plan;
  const Tensor probs_host = ops_.to_host(plan.probs);
  const Dispatch dispatch = this->dispatch(*saved, token, expert, rank, probs_host,
                                           scopes_.capacity ? micro_tokens(tokens, saved->seq_len) : tokens);
  saved->offsets = dispatch.offsets;
  saved->final_expert = dispatch.final_expert;
  laps.charge(&ExchangeProfile::route_seconds);

  // 1-2. This rank's rows in (local expert, destination rank, assignment) order, and their counts.
  const int64_t local_experts = parallel_->local_experts(experts), members = group.size();
  auto ex = std::make_unique<Exchange>();
  ex->local_experts = local_experts;
  std::vector<int32_t> send_token, send_assignment;
  ex->send_counts.assign(static_cast<size_t>(experts), 0);  // [members, local experts]
  for (int64_t e = 0; e < local_experts; ++e)
    for (int64_t m = 0; m < members; ++m) {
      const auto g = static_cast<size_t>(m * local_experts + e);  // the global expert
      for (int64_t row = dispatch.offsets[g]; row < dispatch.offsets[g + 1]; ++row) {
        const int32_t t = dispatch.source_token[static_cast<size_t>(row)];
        if (t < offset || t >= offset + local_tokens) continue;
        send_token.push_back(static_cast<int32_t>(t - offset));
        send_assignment.push_back(dispatch.order[static_cast<size_t>(row)]);
        ++ex->send_counts[g];
      }
    }
  ex->recv_counts.assign(static_cast<size_t>(experts), 0);  // [source, local expert]
  laps.transfer(group, [&] {
    group.alltoall(ex->send_counts.data(), local_experts * static_cast<int64_t>(sizeof(int64_t)),
                   ex->recv_counts.data());
  });
  ex->offsets.assign(static_cast<size_t>(local_experts) + 1, 0);
  for (int64_t e = 0; e < local_experts; ++e) {
    int64_t rows = 0;
    for (int64_t m = 0; m < members; ++m) rows += ex->recv_counts[static_cast<size_t>(m * local_experts + e)];
    ex->offsets[static_cast<size_t>(e) + 1] = ex->offsets[static_cast<size_t>(e)] + rows;
  }
  const int64_t sent = static_cast<int64_t>(send_token.size()), received = ex->offsets.back();
  ex->send_token = upload_ints(ops_, send_token);
  ex->send_assignment = upload_ints(ops_, send_assignment);
  const int64_t row_bytes = d * static_cast<int64_t>(dtype_size(x.dtype()));
  profile_.send_bytes.assign(static_cast<size_t>(members), 0);
  profile_.recv_bytes.assign(static_cast<size_t>(members), 0);
  for (int64_t m = 0; m < members; ++m)
    for (int64_t e = 0; e < local_experts; ++e) {
      profile_.send_bytes[static_cast<size_t>(m)] +=
          ex->send_counts[static_cast<size_t>(m * local_experts + e)] * row_bytes;
      profile_.recv_bytes[static_cast<size_t>(m)] +=
          ex->recv_counts[static_cast<size_t>(m * local_experts + e)] * row_bytes;
    }

  // 3. The rows out; they arrive in (expert, source rank) order, the experts' input.
  if (!buffers_) buffers_ = std::make_unique<ExchangeBuffers>();
  ExchangeBuffers& buffers = *buffers_;
  const Tensor send_x = rows_to_send(ops_, buffers, kDispatchSend, x, ex->send_token, sent);
  ex->x_sorted = exchange_blocks(ops_, group, buffers, kDispatchSend, kExpertsIn, send_x, ex->send_counts,
                                 ex->recv_counts, local_experts, laps);
  laps.charge(&ExchangeProfile::permute_seconds);

  // 4. The local experts, in one grouped call, into the buffer their outputs leave from.
  Tensor y_sorted = expert_rows(ops_, buffers, x.dtype(), received, d);
  ex->experts_context =
      in_plugin(experts_tag_, "forward", [&] { return experts_->forward(ops_, ex->x_sorted, ex->offsets, y_sorted); });
  laps.charge(&ExchangeProfile::experts_seconds);

  // 5. The outputs back, in send order, and the weighted combine.
  ex->y_back = exchange_blocks(ops_, group, buffers, kExpertsOut, kCombineIn, y_sorted, ex->recv_counts,
                               ex->send_counts, local_experts, laps);
  ex->send_weight = ops_.empty(x.dtype(), {sent, 1});
  if (sent > 0) ops_.gather_rows(plan.weight.reshaped({plan.weight.numel(), 1}), ex->send_assignment, ex->send_weight);
  ex->send_weight = ex->send_weight.reshaped({sent});
  Tensor y = ops_.zeros(x.dtype(), {local_tokens, d});
  if (sent > 0) ops_.scatter_add_rows(ex->y_back, ex->send_token, &ex->send_weight, y);
  laps.charge(&ExchangeProfile::permute_seconds);
  if (experts_->has_shared())
    saved->shared_context =
        in_plugin(experts_tag_, "shared_forward", [&] { return experts_->shared_forward(ops_, x, y); });
  laps.charge(&ExchangeProfile::experts_seconds);

  finish_stats(dispatch, probs_host, tokens);
  balancers_forward(*saved, ctx, token, expert, rank);
  laps.charge(&ExchangeProfile::route_seconds);
  saved_ = std::move(saved);
  exchange_ = std::move(ex);
  return y;
}

Tensor MoeLayer::backward_parallel(const Tensor& dy) {
  Saved& s = *saved_;
  Exchange& ex = *exchange_;
  Comm& world = parallel_->world();
  Comm& group = parallel_->expert_group();
  const int64_t local_tokens = s.x.dim(0), d = spec_.d_model;
  expect_shape(dy, {local_tokens, d}, "MoE layer output gradient");
  const int64_t offset = world.rank() * local_tokens;
  const int64_t sent = ex.send_token.numel(), received = ex.x_sorted.dim(0);
  const int64_t assignments = s.plan.weight.numel();
  Laps laps(profile_);

  Tensor dx = ops_.zeros(s.x.dtype(), {local_tokens, d});
  if (experts_->has_shared())
    in_plugin(experts_tag_, "shared_backward",
              [&] { experts_->shared_backward(ops_, s.x, *s.shared_context, dy, dx); });
  laps.charge(&ExchangeProfile::experts_seconds);

  // The combine: dL/dw of each row sent, and w * dy to its expert's rank.
  RouterGrad grad;
  grad.weight = ops_.zeros(s.plan.weight.dtype(), {assignments});
  ExchangeBuffers& buffers = *buffers_;  // x_sorted and y_back are still in theirs
  Tensor dy_send = rows_to_send(ops_, buffers, kGradSend, dy, ex.send_token, sent);
  if (sent > 0) {
    Tensor drow_weight = ops_.empty(dy.dtype(), {sent});
    ops_.row_dot(dy_send, ex.y_back, drow_weight);
    Tensor dweight = grad.weight.reshaped({assignments, 1});
    ops_.scatter_add_rows(drow_weight.reshaped({sent, 1}), ex.send_assignment, nullptr, dweight);
    ops_.scale_rows(ex.send_weight, dy_send);
  }
  const Tensor dy_sorted = exchange_blocks(ops_, group, buffers, kGradSend, kGradIn, dy_send, ex.send_counts,
                                           ex.recv_counts, ex.local_experts, laps);
  Tensor dx_sorted = expert_rows(ops_, buffers, dy.dtype(), received, d);  // the outputs are sent already
  laps.charge(&ExchangeProfile::permute_seconds);
  in_plugin(experts_tag_, "backward",
            [&] { experts_->backward(ops_, ex.x_sorted, ex.offsets, *ex.experts_context, dy_sorted, dx_sorted); });
  laps.charge(&ExchangeProfile::experts_seconds);
  // Into the combine's receive buffer: y_back was last read above.
  const Tensor dx_send = exchange_blocks(ops_, group, buffers, kExpertsOut, kCombineIn, dx_sorted, ex.recv_counts,
                                         ex.send_counts, ex.local_experts, laps);
  if (sent > 0) ops_.scatter_add_rows(dx_send, ex.send_token, nullptr, dx);
  laps.charge(&ExchangeProfile::permute_seconds);

  // The router and balancers on the global plan, with every rank's combine-weight gradients.
  Tensor weight_host = ops_.to_host(grad.weight);
  allreduce_sum(world, weight_host);
  grad.weight = ops_.to_device(weight_host);
  Rng step_rng = rng_.fork(2 + 2 * static_cast<uint64_t>(s.step) + (s.training ? 1 : 0));
  const RouterContext ctx = context(step_rng, s.training, s.step, s.batch, s.seq_len, s.token_ids, s.capacity_factor);
  balancers_backward(s, ctx, grad);
  Tensor dx_global = ops_.zeros(s.x.dtype(), {s.x_global.dim(0), d});
  in_plugin(router_tag_, "backward", [&] {
    const MatmulPrecisionScope scope(ops_, router_precision());
    router_->backward(s.x_global, s.plan, grad, ctx, dx_global);
  });
  ops_.axpy(1.0, dx_global.rows(offset, offset + local_tokens), dx);
  laps.charge(&ExchangeProfile::route_seconds);
  return dx;
}

}  // namespace moelab

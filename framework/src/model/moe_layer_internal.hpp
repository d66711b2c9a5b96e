// What moe_layer.cpp and ../parallel/moe_layer_parallel.cpp share: the state a forward saves for its
// backward, and the helpers around calls into plugin code.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "moelab/moe_layer.hpp"

namespace moelab {

namespace moe_detail {

// One micro-batch's part of a forward's routing plan, as balancers with [parallel] balance =
// "local" see it (micro_batches.cpp): token rows [first, first + tokens) renumbered from 0, the
// assignments of those tokens, the load they make, and the router's noisy-gating context cut to
// those rows (any other router context is not passed on: balancers know only that protocol).
struct MicroBatch {
  int64_t first = 0, tokens = 0;
  Tensor assignments;  // [A_m] i32: the whole plan's index of each of the part's assignments
  RoutingPlan plan;
  LayerLoad load;
  Tensor token_ids;  // host i32 [tokens], a view; undefined when the forward has no token ids
};

// Cuts a plan of T tokens into parts of part_tokens rows (the last may be shorter). token, expert
// and rank are the plan's assignment lists on the host; final_expert the expert after capacity
// (-1: dropped).
std::vector<MicroBatch> split_micro_batches(Ops& ops, const RoutingPlan& plan, const std::vector<int32_t>& token,
                                            const std::vector<int32_t>& expert, const std::vector<int32_t>& rank,
                                            const std::vector<int32_t>& final_expert, const Tensor* token_ids,
                                            int64_t part_tokens);

// The context a balancer sees on `part`: ctx with the part's batch and token ids.
RouterContext part_context(const RouterContext& ctx, const MicroBatch& part);

// Adds what the balancers put into a part's gradient (`from`, its weight [A_m] allocated) to the
// whole plan's (`into`): probs and logits rows, the combine weights by assignment, and the
// noisy-gating context's accumulators.
void add_part_gradient(Ops& ops, const MicroBatch& part, const RoutingPlan& plan, const RouterGrad& from,
                       RouterGrad& into);

}  // namespace moe_detail

struct MoeLayer::Saved {
  Tensor x;
  RoutingPlan plan;
  LayerLoad load;
  bool training = true;
  int64_t step = 0, batch = 1, seq_len = 0;
  const Tensor* token_ids = nullptr;
  double capacity_factor = 1.0;
  std::vector<int64_t> offsets;
  std::vector<int32_t> final_expert;
  Tensor order;         // [R] i32: assignment of each dispatched row
  Tensor source_token;  // [R] i32
  Tensor row_weight;    // [R]: combine weight of each dispatched row
  Tensor x_sorted, y_sorted;
  std::unique_ptr<ForwardContext> experts_context, shared_context;
  // Parallel runs: the global batch the router saw (every rank's rows, in rank order).
  Tensor x_global, token_ids_global;
  // With balance local: the plan's micro-batches the balancers saw.
  std::vector<moe_detail::MicroBatch> micro_batches;
};

struct MoeLayer::Exchange {
  int64_t local_experts = 0;  // L: experts on each rank of the group
  // The rows this rank sends, in send order (local expert index, destination rank, assignment).
  Tensor send_token;       // [Rs] i32: the local token of each
  Tensor send_assignment;  // [Rs] i32: its assignment in the global plan
  Tensor send_weight;      // [Rs]: its combine weight
  // Rows per (rank m, local expert e) at m * L + e: sent to rank m for its e-th expert, and
  // received from rank m for this rank's e-th expert.
  std::vector<int64_t> send_counts, recv_counts;
  // The rows received, in (local expert, source rank) order: the experts' input, grouped by
  // expert with offsets [L + 1]. A view of an exchange buffer on the cpu kernel.
  std::vector<int64_t> offsets;
  Tensor x_sorted;  // [Rr, d]
  Tensor y_back;    // [Rs, d]: the expert outputs of the rows sent, in send order
  std::unique_ptr<ForwardContext> experts_context;
};

namespace moe_detail {

// Host memory the expert group's row exchanges send from and receive into, kept from step to
// step (grown, never shrunk): Open MPI's shared-memory transport moves a buffer it has seen
// before several times faster than a fresh one (an 8 MB MPI_Alltoallv on 2 ranks here: 1.6 ms
// reused, 7.7 ms freshly allocated), and on the cpu kernel rows are gathered straight into them,
// the experts read their input where it arrived and write their output where it leaves from.
// Roles (moe_layer_parallel.cpp): 0 the rows out; 1 the rows in, the experts' input, kept until
// the backward's experts; 2 the experts' outputs out, then the backward's dx out; 3 the outputs
// back, kept until the backward's combine, then dx back; 4 the backward's dy out; 5 dy in. So a
// layer's forward must be followed by its backward (or by another forward, which discards it)
// before its next forward: what the trainer does.
struct ExchangeBuffers {
  Tensor host[6];
  // A [count, d] view of host[role], regrown when it is too small.
  Tensor rows(int role, DType dtype, int64_t count, int64_t d);
};

// Charges the wall time since the last charge to one of the profile's figures.
class Laps {
 public:
  explicit Laps(ExchangeProfile& profile) : profile_(profile) {}
  void charge(double ExchangeProfile::*figure) {
    const auto now = std::chrono::steady_clock::now();
    profile_.*figure += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }
  // A collective of the expert exchange: what came before it was row ordering; with
  // separate_waits, a barrier first takes the wait for slower ranks out of the transfer.
  template <class F>
  void transfer(Comm& comm, F&& collective) {
    charge(&ExchangeProfile::permute_seconds);
    if (profile_.separate_waits) {
      comm.barrier();
      charge(&ExchangeProfile::wait_seconds);
    }
    collective();
    charge(&ExchangeProfile::transfer_seconds);
  }

 private:
  ExchangeProfile& profile_;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

// Runs a call into plugin code. Whatever it throws comes back naming the plugin, its file, the
// layer and the call: a UsageError stays one (its diagnostics, when it has any, pass unchanged),
// anything else becomes a RuntimeError.
template <class F>
decltype(auto) in_plugin(const std::string& tag, const char* call, F&& body) {
  try {
    return body();
  } catch (const UsageError& e) {
    if (!e.diagnostics().empty()) throw;
    throw UsageError(fmt::format("{}, {}: {}", tag, call, e.what()));
  } catch (const std::exception& e) {
    throw RuntimeError(fmt::format("{}, {}: {}", tag, call, e.what()));
  } catch (...) {
    throw RuntimeError(fmt::format("{}, {}: threw something that is not a std::exception", tag, call));
  }
}

inline std::vector<int32_t> host_ints(Ops& ops, const Tensor& t) {
  const Tensor h = ops.to_host(t);
  const int32_t* p = h.data<int32_t>();
  return std::vector<int32_t>(p, p + h.numel());
}

inline Tensor upload_ints(Ops& ops, const std::vector<int32_t>& values) {
  Tensor h = host_tensor(DType::i32, {static_cast<int64_t>(values.size())});
  std::copy(values.begin(), values.end(), h.data<int32_t>());
  return ops.to_device(h);
}

}  // namespace moe_detail
}  // namespace moelab

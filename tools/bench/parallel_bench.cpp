// moelab-bench --parallel, under mpirun -np N: the MoE layer with its experts split over the N
// ranks (expert parallelism, global capacity, dropless), against two references measured in the
// same run, on the same ranks:
//   - the transport: the mpi comm plugin's alltoallv (one MPI_Alltoallv of MPI_BYTE) of the very
//     byte counts the layer's four row exchanges sent (dispatch and combine, forward and
//     backward), on buffers allocated once. Three ratios: raw / the layer's transfers (the counts
//     alltoall and the four row exchanges, as the layer makes them through Comm::exchange),
//     raw / its whole dispatch + combine (the transfers, plus counting, gathering the rows into
//     send order and the weighted combine), and raw / what of that one process does not do
//     (dispatch + combine less the 1/N one-process layer's own gather and combine of as many
//     rows). The layer runs with ExchangeProfile::separate_waits: a barrier before each exchange
//     charges the wait for a slower rank (load imbalance) apart;
//   - the compute: one process doing 1/N of the work (T/N tokens on E/N experts, top-k the same,
//     each rank running it at once on its own core). Ratio = that / the layer's step on N ranks.
// Every round runs the three back to back after a barrier; a round's time is its slowest rank's,
// and the figure printed is the median over rounds.
#include <fmt/format.h>

#include <cinttypes>
#include <cstdio>
#include <numeric>

#include "bench_common.hpp"
#include "moelab/error.hpp"
#include "moelab/moe_layer.hpp"
#include "moelab/parallel.hpp"

namespace moelab::bench {
namespace {

// The slowest rank's value.
double slowest(Comm& world, double seconds) {
  std::vector<double> all(static_cast<size_t>(world.size()));
  world.allgather(&seconds, sizeof(double), all.data());
  return *std::max_element(all.begin(), all.end());
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Figures {
  double raw = 0, transfer = 0, exchange = 0, wait = 0, route = 0, experts = 0, step = 0, reference = 0;
  double reference_permute = 0;  // the 1/N one-process layer's gather and combine
  double send_mb = 0;            // rank 0's rows out, per exchange
};

Figures measure(const PluginRegistry& registry, Ops& ops, const Parallel& parallel, const BenchShape& s, int repeats) {
  Comm& world = parallel.world();
  const int64_t n = world.size(), local_tokens = s.tokens / n;
  Rng init(1);  // the same on every rank: the layer's experts are drawn whole, then sliced
  MoeLayer layer(layer_config(registry, s, s.experts), layer_spec(s, s.experts), registry, ops, init, parallel);
  Rng mine(100 + static_cast<uint64_t>(world.rank()));
  const Tensor x = random_rows(ops, local_tokens, s.d_model, mine);
  const Tensor dy = random_rows(ops, local_tokens, s.d_model, mine);
  MoeLayer reference(layer_config(registry, s, s.experts / n), layer_spec(s, s.experts / n), registry, ops, mine);
  const Tensor x_ref = random_rows(ops, local_tokens, s.d_model, mine);
  const Tensor dy_ref = random_rows(ops, local_tokens, s.d_model, mine);
  const LayerInput input{true, 1, 1, 0, nullptr};

  ExchangeProfile& profile = layer.exchange_profile();
  std::vector<uint8_t> send, recv;
  std::vector<double> raw, transfer, exchange, wait, route, experts, step, ref, ref_permute;
  for (int round = -1; round < repeats; ++round) {  // round -1 warms up
    world.barrier();
    reference.exchange_profile() = ExchangeProfile{};
    auto start = Clock::now();
    reference.forward(x_ref, input);
    reference.backward(dy_ref);
    ops.synchronize();
    const double ref_s = std::chrono::duration<double>(Clock::now() - start).count();

    world.barrier();
    profile = ExchangeProfile{};
    profile.separate_waits = true;
    start = Clock::now();
    layer.forward(x, input);
    layer.backward(dy);
    ops.synchronize();
    const double step_s = std::chrono::duration<double>(Clock::now() - start).count();

    const int64_t out = std::accumulate(profile.send_bytes.begin(), profile.send_bytes.end(), int64_t{0});
    const int64_t in = std::accumulate(profile.recv_bytes.begin(), profile.recv_bytes.end(), int64_t{0});
    if (send.size() < static_cast<size_t>(std::max(out, in)) + 1) {
      send.assign(static_cast<size_t>(std::max(out, in)) + 1, 0);
      recv.assign(send.size(), 0);
      for (size_t i = 0; i < send.size(); ++i) send[i] = static_cast<uint8_t>(i * 31 + 7);
    }
    world.barrier();
    start = Clock::now();
    for (int pass = 0; pass < 2; ++pass) {  // forward and backward: dispatch out, combine back
      world.alltoallv(send.data(), profile.send_bytes, recv.data(), profile.recv_bytes);
      world.alltoallv(recv.data(), profile.recv_bytes, send.data(), profile.send_bytes);
    }
    const double raw_s = std::chrono::duration<double>(Clock::now() - start).count();

    if (round < 0) continue;
    raw.push_back(slowest(world, raw_s));
    transfer.push_back(slowest(world, profile.transfer_seconds));
    exchange.push_back(slowest(world, profile.transfer_seconds + profile.permute_seconds));
    wait.push_back(slowest(world, profile.wait_seconds));
    route.push_back(slowest(world, profile.route_seconds));
    experts.push_back(slowest(world, profile.experts_seconds));
    step.push_back(slowest(world, step_s));
    ref.push_back(slowest(world, ref_s));
    ref_permute.push_back(slowest(world, reference.exchange_profile().permute_seconds));
  }
  Figures f;
  f.raw = median(raw);
  f.transfer = median(transfer);
  f.exchange = median(exchange);
  f.wait = median(wait);
  f.route = median(route);
  f.experts = median(experts);
  f.step = median(step);
  f.reference = median(ref);
  f.reference_permute = median(ref_permute);
  f.send_mb =
      static_cast<double>(std::accumulate(profile.send_bytes.begin(), profile.send_bytes.end(), int64_t{0})) / 1e6;
  return f;
}

}  // namespace

int parallel_bench(const std::vector<BenchShape>& shapes, int repeats, const std::string& kernel) {
  PluginRegistry registry = PluginRegistry::with_default_path();
  const std::shared_ptr<Comm> world = join_launched_world(registry);
  if (world == nullptr)
    throw UsageError(
        "--parallel measures the layer on the ranks mpirun starts: run it as mpirun -np 2 moelab-bench --parallel "
        "(as root add --allow-run-as-root; more ranks than cores need --oversubscribe)");
  const int64_t n = world->size();
  for (const BenchShape& s : shapes)
    if (s.tokens % n != 0 || s.experts % n != 0 || s.top_k > s.experts / n)
      throw UsageError(
          fmt::format("shape {},{},{},{},{} on {} ranks: T and E must be multiples of {}, and k at most "
                      "E/{} (the one-process reference runs E/{} experts)",
                      s.tokens, s.d_model, s.d_ff, s.experts, s.top_k, n, n, n, n));
  const Parallel parallel(world, n);
  std::shared_ptr<Ops> ops = default_kernel(registry, kernel);
  const bool lead = world->rank() == 0;
  if (lead) {
    const char* threads = std::getenv("OPENBLAS_NUM_THREADS");
    std::printf("%" PRId64
                " ranks, experts split over all of them; kernel %s, OPENBLAS_NUM_THREADS=%s; median of %d "
                "rounds, each round's slowest rank\n\n",
                n, kernel.c_str(), threads ? threads : "(unset)", repeats);
    std::printf(
        "| T | d | F | E | k | MB out of rank 0 per exchange | raw alltoallv ms | transfers ms | raw / transfers | "
        "dispatch+combine ms | raw / dispatch+combine | 1/N permute ms | raw / (dispatch+combine - 1/N permute) | "
        "waits ms | route ms | experts ms | layer step ms | 1/N in one "
        "process ms | one process / layer step |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  }
  for (const BenchShape& s : shapes) {
    const Figures f = measure(registry, *ops, parallel, s, repeats);
    if (lead)
      std::printf(
          "| %" PRId64 " | %" PRId64 " | %" PRId64 " | %" PRId64 " | %" PRId64
          " | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n",
          s.tokens, s.d_model, s.d_ff, s.experts, s.top_k, f.send_mb, f.raw * 1e3, f.transfer * 1e3, f.raw / f.transfer,
          f.exchange * 1e3, f.raw / f.exchange, f.reference_permute * 1e3,
          f.raw / std::max(1e-9, f.exchange - f.reference_permute), f.wait * 1e3, f.route * 1e3, f.experts * 1e3,
          f.step * 1e3, f.reference * 1e3, f.reference / f.step);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace moelab::bench

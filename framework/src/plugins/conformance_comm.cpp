// The conformance kit for comm plugins: every collective of comm.hpp on values each rank can
// predict, on whatever world the kit runs in (one process, or every rank under mpirun), blocks
// of zero bytes included: a rank that sends or receives nothing still takes part.
#include <fmt/format.h>

#include <numeric>

#include "conformance_detail.hpp"
#include "moelab/comm.hpp"
#include "moelab/registry.hpp"

namespace moelab::conformance_detail {
namespace {

ConformanceResult outcome(const char* collective, int size, bool passed, const std::string& detail) {
  return ConformanceResult{"collective", fmt::format("{} on {} rank{}", collective, size, size == 1 ? "" : "s"), detail,
                           passed};
}

// The bytes rank `from` sends rank `to` in the alltoallv check: (from + 2 to) mod 3 values, so
// some pairs exchange nothing.
int64_t pair_count(int from, int to) {
  return (from + 2 * to) % 3;
}

}  // namespace

void comm_checks(const PluginRegistry& registry, const PluginInfo& info,
                 const std::function<void(ConformanceResult)>& emit) {
  const std::shared_ptr<Comm> comm = registry.make_comm(info.name, defaults_of(info.schema));
  const int rank = comm->rank(), size = comm->size();
  emit(outcome("rank and size", size, size >= 1 && rank >= 0 && rank < size, fmt::format("rank {} of {}", rank, size)));

  std::vector<int64_t> ints = {rank + 1, -rank};
  comm->allreduce_sum(ints.data(), 2, DType::i64);
  const int64_t expected = static_cast<int64_t>(size) * (size + 1) / 2;
  emit(outcome("allreduce_sum i64", size, ints[0] == expected && ints[1] == -(expected - size),
               fmt::format("sum of rank + 1 is {} (expected {})", ints[0], expected)));
  std::vector<double> reals = {0.5 * rank, 1.0};
  comm->allreduce_sum(reals.data(), 2, DType::f64);
  emit(outcome("allreduce_sum f64", size, reals[1] == size, fmt::format("sum of ones is {}", reals[1])));
  std::vector<float> floats = {1.0f};
  comm->allreduce_sum(floats.data(), 1, DType::f32);
  emit(outcome("allreduce_sum f32", size, floats[0] == static_cast<float>(size), fmt::format("{}", floats[0])));

  std::vector<int32_t> gathered(static_cast<size_t>(size), -1);
  const int32_t mine = 100 + rank;
  comm->allgather(&mine, sizeof mine, gathered.data());
  bool ok = true;
  for (int r = 0; r < size; ++r) ok = ok && gathered[static_cast<size_t>(r)] == 100 + r;
  emit(outcome("allgather", size, ok, ok ? "every rank's value in rank order" : "values out of order"));

  std::vector<int32_t> send(static_cast<size_t>(size)), recv(static_cast<size_t>(size), -1);
  for (int r = 0; r < size; ++r) send[static_cast<size_t>(r)] = rank * 1000 + r;
  comm->alltoall(send.data(), sizeof(int32_t), recv.data());
  ok = true;
  for (int r = 0; r < size; ++r) ok = ok && recv[static_cast<size_t>(r)] == r * 1000 + rank;
  emit(outcome("alltoall", size, ok, ok ? "block r came from rank r" : "a block came from the wrong rank"));

  std::vector<int64_t> send_bytes(static_cast<size_t>(size)), recv_bytes(static_cast<size_t>(size));
  std::vector<int32_t> packed;
  for (int r = 0; r < size; ++r) {
    send_bytes[static_cast<size_t>(r)] = pair_count(rank, r) * 4;
    recv_bytes[static_cast<size_t>(r)] = pair_count(r, rank) * 4;
    for (int64_t i = 0; i < pair_count(rank, r); ++i) packed.push_back(rank * 100 + r * 10 + static_cast<int>(i));
  }
  std::vector<int32_t> unpacked(
      static_cast<size_t>(std::accumulate(recv_bytes.begin(), recv_bytes.end(), int64_t{0}) / 4), -1);
  comm->alltoallv(packed.data(), send_bytes, unpacked.data(), recv_bytes);
  ok = true;
  size_t at = 0;
  for (int r = 0; r < size; ++r)
    for (int64_t i = 0; i < pair_count(r, rank); ++i)
      ok = ok && unpacked[at++] == r * 100 + rank * 10 + static_cast<int>(i);
  emit(outcome("alltoallv", size, ok,
               fmt::format("{} values received in blocks of 0 to 2, empty blocks included", unpacked.size())));

  int64_t token = rank == size - 1 ? 4242 : 0;
  comm->broadcast(&token, sizeof token, size - 1);
  emit(outcome("broadcast", size, token == 4242, fmt::format("received {} from the last rank", token)));
  comm->barrier();

  const std::unique_ptr<Comm> halves = comm->split(rank % 2, rank);
  int64_t members = 1;
  halves->allreduce_sum(&members, 1, DType::i64);
  const int64_t same_parity = (size + (rank % 2 == 0 ? 1 : 0)) / 2;
  emit(outcome("split", size, members == same_parity && halves->rank() == rank / 2,
               fmt::format("the group of ranks with this rank's parity has {} ranks (expected {}); this rank is "
                           "its rank {}",
                           members, same_parity, halves->rank())));
}

}  // namespace moelab::conformance_detail

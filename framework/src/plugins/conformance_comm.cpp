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

  // exchange: to every rank r two blocks, pair_count(rank, r) values then one, listed second
  // blocks first in reverse rank order, sent from and received into scattered offsets (the
  // receiver lays its blocks out backwards), so that pairing, offsets and empty blocks all show.
  std::vector<CommBlock> sends, recvs;
  std::vector<int32_t> source, target;
  for (int r = 0; r < size; ++r)
    for (int64_t i = 0; i <= pair_count(rank, r); ++i) source.push_back(rank * 100 + r * 10 + static_cast<int>(i));
  int64_t total_in = 0;
  for (int r = 0; r < size; ++r) total_in += pair_count(r, rank) + 1;
  target.assign(static_cast<size_t>(total_in), -1);
  std::vector<int64_t> first_at(static_cast<size_t>(size));  // where rank r's values start in source
  for (int r = 0, at = 0; r < size; ++r) {
    first_at[static_cast<size_t>(r)] = at;
    at += static_cast<int>(pair_count(rank, r)) + 1;
  }
  int64_t in_at = total_in;                                  // received blocks fill target from its end
  std::vector<std::pair<int64_t, int32_t>> expected_values;  // (index in target, value)
  for (int k = 0; k < 2; ++k)
    for (int r = size - 1; r >= 0; --r) {
      const int64_t n_out = k == 0 ? pair_count(rank, r) : 1, n_in = k == 0 ? pair_count(r, rank) : 1;
      const int64_t out_first = first_at[static_cast<size_t>(r)] + (k == 0 ? 0 : pair_count(rank, r));
      sends.push_back(CommBlock{r, out_first * 4, n_out * 4});
      in_at -= n_in;
      recvs.push_back(CommBlock{r, in_at * 4, n_in * 4});
      const int64_t value_first = k == 0 ? 0 : pair_count(r, rank);
      for (int64_t i = 0; i < n_in; ++i)
        expected_values.emplace_back(in_at + i, r * 100 + rank * 10 + static_cast<int>(value_first + i));
    }
  comm->exchange(source.data(), sends, target.data(), recvs);
  ok = true;
  for (const auto& [index, value] : expected_values) ok = ok && target[static_cast<size_t>(index)] == value;
  emit(outcome("exchange", size, ok,
               fmt::format("{} blocks in, to scattered offsets, empty ones included", recvs.size())));

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

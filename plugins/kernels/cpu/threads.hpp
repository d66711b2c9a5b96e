// The cpu kernel's threads: work split over OpenBLAS's own pthreads workers, so that the kernel's
// loops, its own GEMM kernels and OpenBLAS never run threads of their own beside each other (each
// library's idle workers busy-wait for a while, and on few cores a spinning worker costs ~25%).
// Every helper hands each item to exactly one call with the arithmetic of a serial loop, so
// results never depend on the thread count.
#pragma once

#include <cblas.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

// OpenBLAS's pthreads server runs function(args + i * stride) for i < threads on its own workers
// (the caller taking i = 0). Exported by OpenBLAS but declared in no public header; weak, so that
// the kernel loads, and falls back to plain threads, where it is missing.
extern "C" int gotoblas_pthread(int threads, void* function, void* args, int stride) __attribute__((weak));

namespace moelab::cpu {

// Below this many elements of work per thread, starting a thread (~20-50 us) costs more than it
// saves.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 17;

// Calls share(i) for i < count, each on its own thread, share(0) on the calling one, and rethrows
// the first exception one of them threw. OpenBLAS's workers busy-wait (sched_yield) for up to
// ~0.1 s after each threaded GEMM before they sleep, so threads of our own started after one share
// the cores with a spinning worker: ~25% slower on 2 cores, measured. Where OpenBLAS is a pthreads
// build with workers enough, the shares run on those workers instead (gotoblas_pthread); on plain
// threads otherwise.
template <class Share>
void run_shares(int count, const Share& share, int openblas_workers = openblas_get_num_threads()) {
  struct Call {
    const Share* share;
    int index;
    std::exception_ptr error;
    static void run(void* self) {
      auto& call = *static_cast<Call*>(self);
      try {
        (*call.share)(call.index);
      } catch (...) {
        call.error = std::current_exception();
      }
    }
  };
  std::vector<Call> calls;
  for (int i = 0; i < count; ++i) calls.push_back({&share, i, nullptr});
  if (count > 1 && gotoblas_pthread != nullptr && count <= openblas_workers) {
    gotoblas_pthread(count, reinterpret_cast<void*>(&Call::run), calls.data(), static_cast<int>(sizeof(Call)));
  } else {
    std::vector<std::thread> workers;
    workers.reserve(calls.size());
    size_t next = 1;
    try {
      for (; next < calls.size(); ++next) workers.emplace_back(&Call::run, &calls[next]);
    } catch (const std::system_error&) {  // no thread to be had: the caller does the rest
      for (size_t i = next; i < calls.size(); ++i) Call::run(&calls[i]);
    }
    if (!calls.empty()) Call::run(&calls[0]);
    for (std::thread& worker : workers) worker.join();
  }
  for (const Call& call : calls)
    if (call.error) std::rethrow_exception(call.error);
}

// Calls body(begin, end) on contiguous chunks that cover [0, count), on up to `threads` threads
// (the caller runs the first chunk), when count * elements_per_item is worth it. Every item is
// handled by exactly one call, with the same arithmetic as a serial loop, so results do not depend
// on the thread count. The chunks run on OpenBLAS's own workers (run_shares) rather than on an
// OpenMP pool or threads of our own: either would spin or be started beside OpenBLAS's workers,
// which busy-wait for a while after each GEMM.
template <class Body>
void parallel_chunks(int threads, int64_t count, int64_t elements_per_item, const Body& body) {
  const int64_t work = count * std::max<int64_t>(elements_per_item, 1);
  const int64_t chunks = std::min<int64_t>({static_cast<int64_t>(threads), work / kMinElementsPerThread, count});
  if (chunks <= 1) return body(int64_t{0}, count);
  const auto bound = [&](int64_t chunk) { return count * chunk / chunks; };
  run_shares(static_cast<int>(chunks), [&](int chunk) { body(bound(chunk), bound(chunk + 1)); });
}

// Calls call(g) for every listed group: one OpenBLAS GEMM each, on OpenBLAS's threads. With groups
// enough (kMinGroupsPerThread a thread), they run side by side, one single-threaded GEMM per
// worker, rather than one after the other on every worker: each GEMM then needs no fork and join of its own, and its
// threads no share of one group's rows. Measured with 64 groups of 512 rows (d = 512, F = 352):
// 272 GFLOP/s against 244 one after the other, and 258 for the dense GEMM of the same FLOPs; no
// change at 8 groups of 1024 rows. OpenBLAS's thread count is process-wide: it is set to 1 for the
// duration (another thread's GEMM in that window runs single-threaded) and put back. Nothing may
// raise it meanwhile: a threaded GEMM started on one of OpenBLAS's workers would wait on itself.
template <class Price, class Call>
void blas_groups(int threads, const std::vector<int64_t>& groups, const Price& flops_of, const Call& call) {
  // At least 8 groups a thread, or the threads' shares cannot be balanced (8 groups of about 1024
  // rows on 2 threads ran ~15% slower side by side than one after the other).
  constexpr int64_t kMinGroupsPerThread = 8;
  const int workers = openblas_get_num_threads();
  const int64_t runs = std::min<int64_t>({threads, workers, static_cast<int64_t>(groups.size()) / kMinGroupsPerThread});
  if (runs <= 1 || gotoblas_pthread == nullptr) {
    for (const int64_t g : groups) call(g);
    return;
  }
  std::vector<double> cumulative{0.0};
  for (const int64_t g : groups) cumulative.push_back(cumulative.back() + flops_of(g));
  std::vector<size_t> starts{0};
  for (int64_t r = 1; r < runs; ++r)
    starts.push_back(static_cast<size_t>(
        std::lower_bound(cumulative.begin(), cumulative.end(), cumulative.back() * static_cast<double>(r) / runs) -
        cumulative.begin()));
  starts.push_back(groups.size());
  openblas_set_num_threads(1);
  try {
    run_shares(
        static_cast<int>(runs),
        [&](int r) {
          for (size_t i = starts[r]; i < starts[r + 1]; ++i) call(groups[i]);
        },
        workers);
  } catch (...) {
    openblas_set_num_threads(workers);
    throw;
  }
  openblas_set_num_threads(workers);
}

}  // namespace moelab::cpu

// Parts of the conformance kit (conformance.hpp) shared between its files.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "moelab/conformance.hpp"
#include "moelab/kernel.hpp"
#include "moelab/registry.hpp"

namespace moelab::conformance_detail {

// One Ops slot run on the kernel under test and on the reference kernel with the same fresh
// random inputs, in one dtype: the largest relative error over its outputs
// (|a - r| / max(floor, |r|)), the tolerance it must stay under, and what went wrong when the
// slot threw on one side only or an output is not finite.
struct SlotResult {
  std::string slot;   // "gemm (trans_b)", "softmax_rows_backward (accumulate)", ...
  std::string dtype;  // "f32" / "f64"
  double error = 0;
  double tolerance = 0;
  std::string failure;  // empty when it ran on both
  bool passed() const { return failure.empty() && error <= tolerance; }
};

// Every slot of Ops, on f32 and f64 inputs drawn from Rng(seed), `kernel` against `reference`.
std::vector<SlotResult> compare_kernel_slots(Ops& kernel, Ops& reference, uint64_t seed);

// Every collective of a comm plugin, on the world the kit runs in (conformance_comm.cpp).
void comm_checks(const PluginRegistry& registry, const PluginInfo& info,
                 const std::function<void(ConformanceResult)>& emit);

}  // namespace moelab::conformance_detail

// The CLI's side of many-process runs: whether mpirun started this process, the world
// communicator it joins, `moelab run --nproc N` (which starts mpirun itself), and what a rank
// does with an error once training has started (prints it with its rank and ends every rank).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moelab/comm.hpp"

namespace moelab {
class PluginRegistry;
}

namespace moelab::cli {

// join_launched_world (parallel.hpp), kept alive until the process exits.
std::shared_ptr<Comm> join_world(const PluginRegistry& registry);
// Replaces this process with `mpirun -np N <this moelab> run ARGS`, adding --allow-run-as-root
// for root and --oversubscribe for more ranks than cores. UsageError when mpirun is missing.
[[noreturn]] void exec_mpirun(int64_t ranks, const std::vector<std::string>& run_args);

// Once every rank has agreed to train, an error on one rank is printed with its rank and ends
// all of them (Comm::abort): without it the others would wait in a collective forever.
void set_abort_world(Comm* world);
Comm* abort_world();

}  // namespace moelab::cli

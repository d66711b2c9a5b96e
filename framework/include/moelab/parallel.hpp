// The parallel layout of a run: world = expert x data ranks ([parallel] expert, data).
//   rank = replica * expert + expert_index
// Every rank holds its own share of the global batch (global batch / world sequences) and a
// replica of every dense parameter (attention, embeddings, norms, dense FFNs, shared experts).
// The routed experts are split over the `expert` ranks of an expert group, which exchange token
// rows; the `data` expert groups hold the same experts (expert replicas). docs/parallel.md
// draws it.
#pragma once

#include <cstdint>
#include <memory>

#include "moelab/comm.hpp"

namespace moelab {

class PluginRegistry;

// The world size mpirun (Open MPI, or a PMI launcher) gave this process; 0 when it did not start it.
int64_t launcher_world_size();
// The `mpi` comm plugin's world when mpirun started this process, or null (one process).
// UsageError when mpirun started it and there is no mpi plugin.
std::shared_ptr<Comm> join_launched_world(const PluginRegistry& registry);

// One process: a LocalComm world; every group is that one rank.
std::unique_ptr<Comm> make_local_comm();

class Parallel {
 public:
  Parallel();  // one process
  // Splits `world` (every rank calls this together). `expert` must divide world->size().
  Parallel(std::shared_ptr<Comm> world, int64_t expert);

  bool distributed() const { return world_->size() > 1; }
  int rank() const { return world_->rank(); }
  int size() const { return world_->size(); }
  int64_t expert_size() const { return expert_; }                 // ranks that split the experts
  int64_t data_size() const { return world_->size() / expert_; }  // replicas of each expert
  int expert_index() const { return expert_group_->rank(); }      // which slice of the experts
  int replica_index() const { return expert_replicas_->rank(); }

  Comm& world() const { return *world_; }
  Comm& expert_group() const { return *expert_group_; }        // ranks holding different experts
  Comm& expert_replicas() const { return *expert_replicas_; }  // ranks holding the same experts

  // This rank's experts out of `num_experts` (a multiple of expert_size()): [first, first + count).
  int64_t local_experts(int64_t num_experts) const { return num_experts / expert_; }
  int64_t first_expert(int64_t num_experts) const { return expert_index() * local_experts(num_experts); }

 private:
  std::shared_ptr<Comm> world_;  // declared first: destroyed after the groups split from it
  std::shared_ptr<Comm> expert_group_, expert_replicas_;
  int64_t expert_ = 1;
};

// The one-process layout, for modules constructed without one.
const Parallel& single_process();

}  // namespace moelab

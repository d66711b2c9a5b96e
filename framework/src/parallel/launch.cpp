// Joining the world mpirun started (parallel.hpp).
#include <fmt/format.h>

#include <cstdlib>

#include "moelab/error.hpp"
#include "moelab/parallel.hpp"
#include "moelab/registry.hpp"

namespace moelab {
namespace {

int64_t env_int(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return 0;
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  return end != nullptr && *end == '\0' && parsed > 0 ? parsed : 0;
}

}  // namespace

int64_t launcher_world_size() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (const int64_t size = env_int(name); size > 0) return size;
  return 0;
}

std::shared_ptr<Comm> join_launched_world(const PluginRegistry& registry) {
  const int64_t size = launcher_world_size();
  if (size == 0) return nullptr;
  if (registry.find(PluginKind::comm, "mpi") == nullptr)
    throw UsageError(
        fmt::format("mpirun started this process as one of {} ranks, but this build has no 'mpi' comm plugin "
                    "(it is built where Open MPI is installed: tools/setup-deps, then rebuild)",
                    size));
  return registry.make_comm("mpi", defaults_of(registry.require(PluginKind::comm, "mpi").schema));
}

}  // namespace moelab

// Many-process runs from the command line (cli_parallel.hpp).
#include "cli_parallel.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>

#include "moelab/error.hpp"
#include "moelab/parallel.hpp"
#include "moelab/registry.hpp"

namespace moelab::cli {
namespace {

Comm* g_abort_world = nullptr;
// The world outlives the command that joined it, so that an error unwinding out of the command
// can still end every rank (guarded() aborts after the command returned or threw); MPI is
// finalised when the process exits.
std::shared_ptr<Comm> g_world;

bool on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) return false;
  std::string folders = path;
  size_t start = 0;
  while (start <= folders.size()) {
    const size_t end = folders.find(':', start);
    const std::string folder = folders.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!folder.empty() && ::access((folder + "/" + program).c_str(), X_OK) == 0) return true;
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return false;
}

}  // namespace

std::shared_ptr<Comm> join_world(const PluginRegistry& registry) {
  g_world = join_launched_world(registry);
  return g_world;
}

void exec_mpirun(int64_t ranks, const std::vector<std::string>& run_args) {
  if (!on_path("mpirun"))
    throw UsageError(
        "--nproc starts the ranks with mpirun, which is not installed: install openmpi-bin (tools/setup-deps), or "
        "start them yourself with mpirun -np N moelab run ...");
  std::vector<std::string> argv = {"mpirun"};
  if (::geteuid() == 0) argv.push_back("--allow-run-as-root");
  const auto cores = static_cast<int64_t>(std::thread::hardware_concurrency());
  if (cores == 0 || ranks > cores) argv.push_back("--oversubscribe");
  // Each rank's GEMMs on its share of the cores, unless the caller chose.
  if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr)
    argv.insert(argv.end(), {"-x", fmt::format("OPENBLAS_NUM_THREADS={}",
                                               std::max<int64_t>(1, cores / std::max<int64_t>(ranks, 1)))});
  // This program by its real path: "/proc/self/exe" would name mpirun's own launcher on each rank.
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) throw RuntimeError(fmt::format("cannot find this program's path (/proc/self/exe): {}", ec.message()));
  argv.insert(argv.end(), {"-np", std::to_string(ranks), self.string(), "run"});
  argv.insert(argv.end(), run_args.begin(), run_args.end());
  std::vector<char*> raw;
  for (std::string& a : argv) raw.push_back(a.data());
  raw.push_back(nullptr);
  ::execvp("mpirun", raw.data());
  throw RuntimeError(fmt::format("could not start mpirun: {}", std::strerror(errno)));
}

void set_abort_world(Comm* world) {
  g_abort_world = world;
}
Comm* abort_world() {
  return g_abort_world;
}

}  // namespace moelab::cli

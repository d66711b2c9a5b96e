// Finding and loading plugins. Search order: the build's (or install's) own plugin folder, then
// each folder in MOELAB_PLUGIN_PATH (':'-separated), then the recipe's [plugins] paths. A recipe
// names plugins by name; nothing outside the search path is ever loaded.
//
// Loaded libraries stay loaded until the process exits, and every object a plugin creates also
// holds its library, so no plugin code can be unmapped while it may still run.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "moelab/plugin.hpp"

namespace moelab {

struct PluginInfo {
  PluginKind kind;
  std::string name, version, description;
  uint32_t abi_major = 0, abi_minor = 0;
  std::filesystem::path file;
  ParamSchema schema;
  const PluginManifest* manifest = nullptr;
  std::shared_ptr<void> library;  // the loaded boost::dll::shared_library
};

// A file in the search path that could not be used, and why (the loader's own reason, an ABI
// mismatch naming both versions, a duplicate name naming both files).
struct PluginProblem {
  std::filesystem::path file;
  std::string reason;
  bool duplicate = false;
};

class PluginRegistry {
 public:
  PluginRegistry() = default;

  // The build's plugin folder (found relative to libmoelab itself) followed by MOELAB_PLUGIN_PATH.
  static std::vector<std::filesystem::path> default_search_path();
  // A registry that has scanned default_search_path().
  static PluginRegistry with_default_path();

  // Loads every shared library (*.so) directly inside each folder, in order. A file that fails is
  // recorded in problems() and the rest keep loading. Missing folders are recorded too.
  void scan(const std::vector<std::filesystem::path>& folders);
  // Loads one file; returns false (and records a problem) when it cannot be used.
  bool load_file(const std::filesystem::path& file);

  const std::vector<PluginProblem>& problems() const { return problems_; }
  const std::vector<std::filesystem::path>& searched() const { return searched_; }

  const PluginInfo* find(PluginKind kind, const std::string& name) const;
  const PluginInfo* find_any(const std::string& name) const;   // any kind
  std::vector<const PluginInfo*> list(PluginKind kind) const;  // sorted by name
  std::vector<const PluginInfo*> all() const;                  // sorted by kind, then name
  std::vector<std::string> names(PluginKind kind) const;

  // Factories. Throw UsageError ("unknown router 'x'; known routers: a, b") for a missing name.
  // Params must already be validated against the plugin's schema.
  std::shared_ptr<Router> make_router(const std::string& name, const ParamSet& params, const LayerSpec& spec, Ops& ops,
                                      Rng& rng) const;
  std::shared_ptr<Experts> make_experts(const std::string& name, const ParamSet& params, const LayerSpec& spec,
                                        Ops& ops, Rng& rng) const;
  std::shared_ptr<Balancer> make_balancer(const std::string& name, const ParamSet& params, const LayerSpec& spec,
                                          Ops& ops, Rng& rng) const;
  std::shared_ptr<Ops> make_kernel(const std::string& name, const ParamSet& params) const;

  const PluginInfo& require(PluginKind kind, const std::string& name) const;

 private:
  std::vector<PluginInfo> plugins_;
  std::vector<PluginProblem> problems_;
  std::vector<std::filesystem::path> searched_;
};

}  // namespace moelab

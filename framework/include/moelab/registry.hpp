// Finding and loading plugins. Search order: the build's (or install's) own plugin folder, then
// each folder in MOELAB_PLUGIN_PATH (':'-separated), then the recipe's [plugins] paths. A recipe
// names plugins by name; nothing outside the search path is ever loaded.
//
// Scanning reads each file's stamp (plugin.hpp) and opens nothing: the ABI check, the names for
// "did you mean" and duplicate detection need no plugin code. A library is opened the first time
// one of its plugins is looked up with find(), list() or all() (which opens every one), so
// `moelab check` opens only the plugins its recipe names, and a refused file is never opened.
//
// Loaded libraries stay loaded until the process exits, and every object a plugin creates also
// holds its library, so no plugin code can be unmapped while it may still run.
#pragma once

#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moelab/plugin.hpp"

namespace moelab {

struct PluginInfo {
  PluginKind kind;
  std::string name, version, description;  // from the stamp
  uint32_t abi_major = 0, abi_minor = 0;
  std::filesystem::path file;
  uintmax_t file_size = 0;
  // Set once the library is open (always, for what find(), list() and all() return).
  bool loaded = false;
  bool refused = false;  // its library failed to open (the reason is in problems()); never used
  ParamSchema schema;
  const PluginManifest* manifest = nullptr;
  std::shared_ptr<void> library;  // the loaded boost::dll::shared_library
};

// The stamp of a plugin file, read without opening it; the reason it cannot be read otherwise.
struct StampResult {
  std::optional<PluginStamp> stamp;
  std::string problem;
};
StampResult read_plugin_stamp(const std::filesystem::path& file);

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

  // Registers every shared library (*.so) directly inside each folder, in order, by its stamp. A
  // file that cannot be used is recorded in problems() and the rest go on. Missing folders are
  // recorded in missing_folders(), not as plugin files.
  void scan(const std::vector<std::filesystem::path>& folders);
  // Registers one file; returns false (and records a problem) when its stamp refuses it.
  bool load_file(const std::filesystem::path& file);

  // Every file refused so far: by its stamp at scan, or when its library was opened.
  const std::vector<PluginProblem>& problems() const { return problems_; }
  const std::vector<std::filesystem::path>& searched() const { return searched_; }
  // Folders of the search path that do not exist or are not folders, with the reason.
  const std::vector<PluginProblem>& missing_folders() const { return missing_folders_; }

  // The plugin of that kind and name, its library opened; nullptr when there is none, when its
  // library fails to open (recorded in problems()) or when two files define it (see duplicate()).
  const PluginInfo* find(PluginKind kind, const std::string& name) const;
  // "duplicate router 'x': defined by both A and B ..." when two files define it; "" otherwise.
  std::string duplicate(PluginKind kind, const std::string& name) const;
  const PluginInfo* find_any(const std::string& name) const;   // any kind, by its stamp: not opened
  std::vector<const PluginInfo*> list(PluginKind kind) const;  // sorted by name; opens each
  std::vector<const PluginInfo*> all() const;                  // sorted by kind, then name; opens each
  std::vector<std::string> names(PluginKind kind) const;       // by the stamps: opens nothing

  // Factories. Throw UsageError ("unknown router 'x'; known routers: a, b") for a missing name.
  // Params must already be validated against the plugin's schema.
  std::shared_ptr<Router> make_router(const std::string& name, const ParamSet& params, const LayerSpec& spec, Ops& ops,
                                      Rng& rng) const;
  std::shared_ptr<Experts> make_experts(const std::string& name, const ParamSet& params, const LayerSpec& spec,
                                        Ops& ops, Rng& rng) const;
  std::shared_ptr<Balancer> make_balancer(const std::string& name, const ParamSet& params, const LayerSpec& spec,
                                          Ops& ops, Rng& rng) const;
  std::shared_ptr<Ops> make_kernel(const std::string& name, const ParamSet& params) const;
  std::shared_ptr<Comm> make_comm(const std::string& name, const ParamSet& params) const;

  const PluginInfo& require(PluginKind kind, const std::string& name) const;

 private:
  bool open(PluginInfo& info) const;  // opens its library once; false (recorded) when it fails

  // Registered by stamp; opened lazily by the const lookups, hence mutable. A std::deque keeps
  // the addresses handed out stable as plugins are added.
  mutable std::deque<PluginInfo> plugins_;
  mutable std::vector<PluginProblem> problems_;
  std::vector<PluginProblem> missing_folders_;
  std::map<std::pair<PluginKind, std::string>, std::string> duplicates_;  // (kind, name) -> the first reason
  std::vector<std::filesystem::path> searched_;
};

}  // namespace moelab

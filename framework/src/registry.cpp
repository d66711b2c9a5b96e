// Finding, checking and loading plugins (see registry.hpp and plugin.hpp).
//
// A file goes through these gates, in order, and the first that fails becomes its PluginProblem:
//   1. it is an ELF shared object (read from its header, nothing of it is run);
//   2. its symbol table exports `moelab_plugin` (still nothing run);
//   3. dlopen succeeds (the dynamic loader's own reason otherwise: a missing dependency, an
//      unresolved symbol);
//   4. the manifest's abi_major/abi_minor match ours: read before anything else in it is called;
//   5. the manifest is complete and its schema() can be built;
//   6. no plugin of the same kind and name was loaded before.
#include "moelab/registry.hpp"

#include <dlfcn.h>
#include <fmt/format.h>

#include <algorithm>
#include <boost/dll/library_info.hpp>
#include <boost/dll/shared_library.hpp>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string_view>
#include <system_error>

namespace moelab {
namespace {

namespace fs = std::filesystem;

constexpr const char* kEntryName = "moelab_plugin";

// Libraries are never unloaded. A plugin's code can still be needed after every registry and every
// object it made are gone: a kernel plugin's tensors carry deleters that live in its library and may
// be released by whoever holds the last Tensor, at any time up to static destruction. So every
// handle we open is parked here, in a list that is deliberately never destroyed (no dlclose at exit
// either, where destruction order across libraries is not ours to choose).
void keep_loaded_forever(std::shared_ptr<boost::dll::shared_library> library) {
  static std::mutex mutex;
  static auto* loaded = new std::vector<std::shared_ptr<boost::dll::shared_library>>();
  std::lock_guard<std::mutex> lock(mutex);
  loaded->push_back(std::move(library));
}

const char* kind_plural(PluginKind kind) {
  switch (kind) {
    case PluginKind::router:
      return "routers";
    case PluginKind::experts:
      return "expert layouts";
    case PluginKind::balancer:
      return "balancers";
    case PluginKind::kernel:
      return "kernels";
  }
  return "plugins";
}

bool valid_kind(PluginKind kind) {
  const auto value = static_cast<uint32_t>(kind);
  return value >= static_cast<uint32_t>(PluginKind::router) && value <= static_cast<uint32_t>(PluginKind::kernel);
}

// Boost.DLL wraps dlerror() as "...load() failed (dlerror system message: REASON): Bad file
// descriptor [generic:9]"; REASON is what the user needs, so keep only that when it is there.
std::string loader_reason(const std::string& what) {
  constexpr std::string_view marker = "(dlerror system message: ";
  const auto at = what.find(marker);
  if (at == std::string::npos) return what;
  std::string reason = what.substr(at + marker.size());
  if (const auto end = reason.rfind("): "); end != std::string::npos)
    reason.erase(end);
  else if (!reason.empty() && reason.back() == ')')
    reason.pop_back();
  return reason;
}

// Gates 1 and 2: what the file is, judged from its bytes alone. Empty string when it may be loaded.
std::string inspect_without_loading(const fs::path& file) {
  std::error_code ec;
  const auto size = fs::file_size(file, ec);
  if (ec) return fmt::format("cannot read the file: {}", ec.message());
  if (size == 0) return "not a shared library: the file is empty";
  {
    std::ifstream in(file, std::ios::binary);
    char magic[4] = {};
    if (!in.read(magic, sizeof magic) || std::string_view(magic, 4) != std::string_view("\x7f"
                                                                                        "ELF",
                                                                                        4))
      return "not a shared library: the file does not start with an ELF header "
             "(a text file, or a copy that went wrong?)";
  }
  try {
    boost::dll::library_info info(boost::dll::fs::path(file.string()));
    const std::vector<std::string> symbols = info.symbols();
    if (std::find(symbols.begin(), symbols.end(), kEntryName) == symbols.end())
      return fmt::format(
          "not a moelab plugin: it exports no '{}' entry point (a plugin's source ends with one "
          "MOELAB_ROUTER_PLUGIN / MOELAB_EXPERTS_PLUGIN / MOELAB_BALANCER_PLUGIN / "
          "MOELAB_KERNEL_PLUGIN line and is built with moelab_add_plugin)",
          kEntryName);
  } catch (const std::exception& e) {
    return fmt::format("not a usable shared library: {}", e.what());
  }
  return {};
}

// Gate 5: everything the engine relies on later is present.
std::string check_manifest(const PluginManifest& m) {
  if (!valid_kind(m.kind)) return fmt::format("its manifest has an unknown kind ({})", static_cast<uint32_t>(m.kind));
  if (m.name == nullptr || *m.name == '\0') return "its manifest has no name";
  if (m.schema == nullptr)
    return fmt::format("{} '{}' declares no schema() function", plugin_kind_name(m.kind), m.name);
  const bool has_factory =
      (m.kind == PluginKind::router && m.make_router) || (m.kind == PluginKind::experts && m.make_experts) ||
      (m.kind == PluginKind::balancer && m.make_balancer) || (m.kind == PluginKind::kernel && m.make_kernel);
  if (!has_factory)
    return fmt::format("{} '{}' has no {} factory", plugin_kind_name(m.kind), m.name, plugin_kind_name(m.kind));
  return {};
}

// An object made by a plugin holds its library, so the code of its virtual functions and of its
// destructor stays mapped for as long as the object exists, whatever happens to the registry.
template <class T>
std::shared_ptr<T> holding_library(std::unique_ptr<T> object, const PluginInfo& info) {
  if (!object)
    throw RuntimeError(fmt::format("{} '{}' ({}) returned no object from its factory", plugin_kind_name(info.kind),
                                   info.name, info.file.string()));
  std::shared_ptr<void> library = info.library;
  return std::shared_ptr<T>(object.release(), [library](T* p) { delete p; });
}

// Anything with an address inside libmoelab, to ask the dynamic loader where libmoelab lives.
void libmoelab_anchor() {}

}  // namespace

std::vector<fs::path> PluginRegistry::default_search_path() {
  std::vector<fs::path> folders;
  Dl_info where{};
  if (dladdr(reinterpret_cast<void*>(&libmoelab_anchor), &where) != 0 && where.dli_fname != nullptr) {
    std::error_code ec;
    fs::path library = fs::weakly_canonical(fs::absolute(where.dli_fname, ec), ec);
    if (ec) library = where.dli_fname;
    folders.push_back(library.parent_path() / MOELAB_PLUGIN_RELDIR);
  }
  if (const char* env = std::getenv("MOELAB_PLUGIN_PATH")) {
    const std::string_view list(env);
    size_t start = 0;
    while (start <= list.size()) {
      size_t end = list.find(':', start);
      if (end == std::string_view::npos) end = list.size();
      if (end > start) folders.emplace_back(std::string(list.substr(start, end - start)));
      start = end + 1;
    }
  }
  return folders;
}

PluginRegistry PluginRegistry::with_default_path() {
  PluginRegistry registry;
  registry.scan(default_search_path());
  return registry;
}

void PluginRegistry::scan(const std::vector<fs::path>& folders) {
  for (const fs::path& folder : folders) {
    std::error_code ec;
    const fs::path canonical = fs::weakly_canonical(fs::absolute(folder, ec), ec);
    const fs::path key = ec ? folder : canonical;
    // A folder named twice (say, the build's own folder also in MOELAB_PLUGIN_PATH) is scanned once.
    if (std::find(searched_.begin(), searched_.end(), key) != searched_.end()) continue;
    searched_.push_back(key);

    if (!fs::is_directory(key, ec)) {
      problems_.push_back(
          {folder, fs::exists(key, ec) ? "plugin search path entry is not a folder" : "plugin folder does not exist"});
      continue;
    }
    std::vector<fs::path> files;
    for (fs::directory_iterator it(key, ec), end; !ec && it != end; it.increment(ec)) {
      std::error_code type_ec;
      if (it->path().extension() == ".so" && it->is_regular_file(type_ec)) files.push_back(it->path());
    }
    if (ec) {
      problems_.push_back({folder, fmt::format("cannot list the plugin folder: {}", ec.message())});
      continue;
    }
    std::sort(files.begin(), files.end());  // the same order on every machine: duplicates resolve alike
    for (const fs::path& file : files) load_file(file);
  }
}

bool PluginRegistry::load_file(const fs::path& given) {
  std::error_code ec;
  fs::path file = fs::weakly_canonical(fs::absolute(given, ec), ec);
  if (ec) file = given;
  for (const PluginInfo& loaded : plugins_)
    if (loaded.file == file) return true;  // the same file reached twice is one plugin, not a duplicate

  auto refuse = [&](std::string reason) {
    problems_.push_back({file, std::move(reason)});
    return false;
  };

  if (std::string reason = inspect_without_loading(file); !reason.empty()) return refuse(std::move(reason));

  std::shared_ptr<boost::dll::shared_library> library;
  const PluginManifest* manifest = nullptr;
  try {
    // rtld_now: an unresolved symbol is reported here, with its name, not as a crash mid-training.
    library = std::make_shared<boost::dll::shared_library>(
        boost::dll::fs::path(file.string()), boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local);
    keep_loaded_forever(library);
    PluginEntry& entry = library->get_alias<PluginEntry>(kEntryName);
    manifest = entry();
  } catch (const std::exception& e) {
    return refuse(fmt::format("cannot be loaded: {}", loader_reason(e.what())));
  } catch (...) {
    return refuse("cannot be loaded: its entry point threw something that is not a std::exception");
  }
  if (manifest == nullptr) return refuse(fmt::format("its '{}' entry point returned no manifest", kEntryName));

  // Gate 4, before anything else in the manifest is trusted or called: only the two leading fields
  // are laid out alike in every ABI version.
  const uint32_t abi_major = manifest->abi_major;
  const uint32_t abi_minor = manifest->abi_minor;
  if (abi_major != kAbiMajor)
    return refuse(
        fmt::format("{} was built for plugin ABI {}.{}; this moelab speaks ABI {}.{}: rebuild it "
                    "against this SDK",
                    file.string(), abi_major, abi_minor, kAbiMajor, kAbiMinor));
  if (abi_minor > kAbiMinor)
    return refuse(
        fmt::format("{} was built for plugin ABI {}.{}, newer than this moelab's ABI {}.{}: "
                    "upgrade moelab, or rebuild the plugin against this SDK",
                    file.string(), abi_major, abi_minor, kAbiMajor, kAbiMinor));

  if (std::string reason = check_manifest(*manifest); !reason.empty()) return refuse(std::move(reason));

  PluginInfo info;
  info.kind = manifest->kind;
  info.name = manifest->name;
  info.version = manifest->version ? manifest->version : "";
  info.description = manifest->description ? manifest->description : "";
  info.abi_major = abi_major;
  info.abi_minor = abi_minor;
  info.file = file;
  info.manifest = manifest;
  info.library = library;
  try {
    info.schema = manifest->schema();
  } catch (const std::exception& e) {
    return refuse(fmt::format("{} '{}': its schema() threw: {}", plugin_kind_name(info.kind), info.name, e.what()));
  } catch (...) {
    return refuse(fmt::format("{} '{}': its schema() threw something that is not a std::exception",
                              plugin_kind_name(info.kind), info.name));
  }

  if (const PluginInfo* first = find(info.kind, info.name)) {
    problems_.push_back({file,
                         fmt::format("duplicate {} '{}': defined by both {} and {}; keeping the first "
                                     "(found first in the search path), ignoring the second",
                                     plugin_kind_name(info.kind), info.name, first->file.string(), file.string()),
                         /*duplicate=*/true});
    return false;
  }
  plugins_.push_back(std::move(info));
  return true;
}

const PluginInfo* PluginRegistry::find(PluginKind kind, const std::string& name) const {
  for (const PluginInfo& p : plugins_)
    if (p.kind == kind && p.name == name) return &p;
  return nullptr;
}

const PluginInfo* PluginRegistry::find_any(const std::string& name) const {
  for (const PluginInfo* p : all())
    if (p->name == name) return p;
  return nullptr;
}

std::vector<const PluginInfo*> PluginRegistry::list(PluginKind kind) const {
  std::vector<const PluginInfo*> out;
  for (const PluginInfo& p : plugins_)
    if (p.kind == kind) out.push_back(&p);
  std::sort(out.begin(), out.end(), [](const PluginInfo* a, const PluginInfo* b) { return a->name < b->name; });
  return out;
}

std::vector<const PluginInfo*> PluginRegistry::all() const {
  std::vector<const PluginInfo*> out;
  for (const PluginInfo& p : plugins_) out.push_back(&p);
  std::sort(out.begin(), out.end(), [](const PluginInfo* a, const PluginInfo* b) {
    if (a->kind != b->kind) return static_cast<uint32_t>(a->kind) < static_cast<uint32_t>(b->kind);
    return a->name < b->name;
  });
  return out;
}

std::vector<std::string> PluginRegistry::names(PluginKind kind) const {
  std::vector<std::string> out;
  for (const PluginInfo* p : list(kind)) out.push_back(p->name);
  return out;
}

const PluginInfo& PluginRegistry::require(PluginKind kind, const std::string& name) const {
  if (const PluginInfo* p = find(kind, name)) return *p;
  const std::vector<std::string> known = names(kind);
  std::string message = fmt::format("unknown {} '{}'", plugin_kind_name(kind), name);
  if (known.empty()) {
    std::vector<std::string> folders;
    for (const fs::path& f : searched_) folders.push_back(f.string());
    message += fmt::format("; no {} were found (searched: {})", kind_plural(kind),
                           folders.empty() ? std::string("nothing") : fmt::format("{}", fmt::join(folders, ", ")));
  } else {
    message += fmt::format("; known {}: {}", kind_plural(kind), fmt::join(known, ", "));
    if (std::string near = nearest_name(name, known); !near.empty())
      message += fmt::format("; did you mean '{}'?", near);
  }
  if (const PluginInfo* other = find_any(name))
    message += fmt::format(" ('{}' is a {} plugin)", name, plugin_kind_name(other->kind));
  throw UsageError(message);
}

std::shared_ptr<Router> PluginRegistry::make_router(const std::string& name, const ParamSet& params,
                                                    const LayerSpec& spec, Ops& ops, Rng& rng) const {
  const PluginInfo& info = require(PluginKind::router, name);
  return holding_library(info.manifest->make_router(params, spec, ops, rng), info);
}

std::shared_ptr<Experts> PluginRegistry::make_experts(const std::string& name, const ParamSet& params,
                                                      const LayerSpec& spec, Ops& ops, Rng& rng) const {
  const PluginInfo& info = require(PluginKind::experts, name);
  return holding_library(info.manifest->make_experts(params, spec, ops, rng), info);
}

std::shared_ptr<Balancer> PluginRegistry::make_balancer(const std::string& name, const ParamSet& params,
                                                        const LayerSpec& spec, Ops& ops, Rng& rng) const {
  const PluginInfo& info = require(PluginKind::balancer, name);
  return holding_library(info.manifest->make_balancer(params, spec, ops, rng), info);
}

std::shared_ptr<Ops> PluginRegistry::make_kernel(const std::string& name, const ParamSet& params) const {
  const PluginInfo& info = require(PluginKind::kernel, name);
  return holding_library(info.manifest->make_kernel(params), info);
}

}  // namespace moelab

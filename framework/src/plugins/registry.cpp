// Finding, checking and loading plugins (see registry.hpp and plugin.hpp).
//
// At scan, a file goes through these gates, reading its bytes only (nothing of it runs):
//   1. it is an ELF shared object of this machine's class, byte order and architecture;
//   2. it carries a stamp (section .moelab_plugin) of a known kind and a name;
//   3. the stamp's abi_major/abi_minor match ours;
//   4. its symbol table exports `moelab_plugin`;
//   5. no other file of the search path stamps the same kind and name (both are then refused).
// When a plugin is first looked up, its library is opened:
//   6. dlopen succeeds (the dynamic loader's own reason otherwise: a missing dependency, an
//      unresolved symbol);
//   7. the manifest agrees with the stamp, is complete, and its schema() can be built.
#include "moelab/registry.hpp"

#include <dlfcn.h>
#include <elf.h>
#include <fmt/format.h>

#include <algorithm>
#include <boost/dll/library_info.hpp>
#include <boost/dll/shared_library.hpp>
#include <cstdlib>
#include <cstring>
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
    case PluginKind::comm:
      return "communicators";
  }
  return "plugins";
}

bool valid_kind(PluginKind kind) {
  const auto value = static_cast<uint32_t>(kind);
  return value >= static_cast<uint32_t>(PluginKind::router) && value <= static_cast<uint32_t>(PluginKind::comm);
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

// A fixed-size string field of the stamp, up to its NUL; nothing when it has none.
std::optional<std::string> stamp_string(const char* field, size_t size) {
  const void* end = std::memchr(field, '\0', size);
  if (end == nullptr) return std::nullopt;
  return std::string(field, static_cast<const char*>(end));
}

// Gate 4: the entry point is exported (read from the symbol table, nothing run).
std::string check_entry_symbol(const fs::path& file) {
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

// Gate 7: everything the engine relies on later is present.
std::string check_manifest(const PluginManifest& m) {
  if (!valid_kind(m.kind)) return fmt::format("its manifest has an unknown kind ({})", static_cast<uint32_t>(m.kind));
  if (m.name == nullptr || *m.name == '\0') return "its manifest has no name";
  if (m.schema == nullptr)
    return fmt::format("{} '{}' declares no schema() function", plugin_kind_name(m.kind), m.name);
  const bool has_factory =
      (m.kind == PluginKind::router && m.make_router) || (m.kind == PluginKind::experts && m.make_experts) ||
      (m.kind == PluginKind::balancer && m.make_balancer) || (m.kind == PluginKind::kernel && m.make_kernel) ||
      (m.kind == PluginKind::comm && m.make_comm);
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

StampResult read_plugin_stamp(const fs::path& file) {
  StampResult out;
  auto fail = [&](std::string why) {
    out.problem = std::move(why);
    return out;
  };
  std::error_code ec;
  const uintmax_t size = fs::file_size(file, ec);
  if (ec) return fail(fmt::format("cannot read the file: {}", ec.message()));
  if (size == 0) return fail("not a shared library: the file is empty");
  std::ifstream in(file, std::ios::binary);
  if (!in) return fail("cannot read the file: it cannot be opened");
  auto read_at = [&](uint64_t offset, void* into, uint64_t bytes) {
    if (offset > size || bytes > size - offset) return false;
    in.seekg(static_cast<std::streamoff>(offset));
    return static_cast<bool>(in.read(static_cast<char*>(into), static_cast<std::streamsize>(bytes)));
  };
  Elf64_Ehdr header{};
  if (!read_at(0, header.e_ident, EI_NIDENT) || std::memcmp(header.e_ident, ELFMAG, SELFMAG) != 0)
    return fail(
        "not a shared library: the file does not start with an ELF header (a text file, or a copy that went "
        "wrong?)");
  if (header.e_ident[EI_CLASS] != ELFCLASS64 || header.e_ident[EI_DATA] != ELFDATA2LSB)
    return fail("not a shared library for this machine: it is not a 64-bit little-endian ELF file");
  if (!read_at(0, &header, sizeof header)) return fail("not a usable shared library: its ELF header is cut short");
#if defined(__x86_64__)
  constexpr uint16_t kMachine = EM_X86_64;
#elif defined(__aarch64__)
  constexpr uint16_t kMachine = EM_AARCH64;
#else
  constexpr uint16_t kMachine = 0;
#endif
  if (kMachine != 0 && header.e_machine != kMachine)
    return fail(fmt::format("built for another processor (ELF machine {}, this one is {}): rebuild it here",
                            header.e_machine, kMachine));
  if (header.e_type != ET_DYN) return fail("not a shared library: the ELF file is not a shared object");
  if (header.e_shentsize != sizeof(Elf64_Shdr) || header.e_shnum == 0 || header.e_shstrndx >= header.e_shnum ||
      header.e_shnum > 65280)
    return fail("not a usable shared library: its section table is missing or malformed");
  std::vector<Elf64_Shdr> sections(header.e_shnum);
  if (!read_at(header.e_shoff, sections.data(), sizeof(Elf64_Shdr) * sections.size()))
    return fail("not a usable shared library: its section table lies outside the file");
  const Elf64_Shdr& names = sections[header.e_shstrndx];
  if (names.sh_size > (1u << 24)) return fail("not a usable shared library: its section names are malformed");
  std::string name_table(names.sh_size, '\0');
  if (!read_at(names.sh_offset, name_table.data(), names.sh_size))
    return fail("not a usable shared library: its section names lie outside the file");
  // A section's name: the NUL-terminated string at sh_name in the name table.
  const std::string wanted = std::string(kStampSection) + '\0';
  const Elf64_Shdr* found = nullptr;
  for (const Elf64_Shdr& section : sections)
    if (section.sh_name < name_table.size() && name_table.compare(section.sh_name, wanted.size(), wanted) == 0) {
      found = &section;
      break;
    }
  const std::string rebuild =
      "rebuild it against this moelab's SDK (its registration macro, MOELAB_ROUTER_PLUGIN and the like, writes "
      "the stamp)";
  if (found == nullptr)
    return fail(
        fmt::format("carries no moelab stamp (ELF section {}): it was built against an SDK older than "
                    "plugin ABI 3, or without a registration macro; {}",
                    kStampSection, rebuild));
  if (found->sh_size < sizeof(PluginStamp) || found->sh_type == SHT_NOBITS)
    return fail(fmt::format("its stamp (section {}) is {} bytes, not the {} of a stamp; {}", kStampSection,
                            found->sh_size, sizeof(PluginStamp), rebuild));
  if (found->sh_size != sizeof(PluginStamp))
    return fail(fmt::format("its section {} holds {} bytes: one plugin per library, and one stamp of {} bytes",
                            kStampSection, found->sh_size, sizeof(PluginStamp)));
  PluginStamp stamp{};
  if (!read_at(found->sh_offset, &stamp, sizeof stamp))
    return fail(fmt::format("its stamp (section {}) lies outside the file", kStampSection));
  if (std::memcmp(stamp.magic, kStampMagic, sizeof kStampMagic) != 0 || stamp.stamp_version != 1)
    return fail(fmt::format("its section {} is not a moelab stamp this version reads; {}", kStampSection, rebuild));
  if (!stamp_string(stamp.name, sizeof stamp.name) || !stamp_string(stamp.version, sizeof stamp.version) ||
      !stamp_string(stamp.description, sizeof stamp.description) || stamp.name[0] == '\0')
    return fail(fmt::format("its stamp has a name, version or description without an end; {}", rebuild));
  out.stamp = stamp;
  return out;
}

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
      missing_folders_.push_back(
          {folder, fs::exists(key, ec) ? "plugin search path entry is not a folder" : "plugin folder does not exist"});
      continue;
    }
    std::vector<fs::path> files;
    for (fs::directory_iterator it(key, ec), end; !ec && it != end; it.increment(ec)) {
      std::error_code type_ec;
      if (it->path().extension() == ".so" && it->is_regular_file(type_ec)) files.push_back(it->path());
    }
    if (ec) {
      missing_folders_.push_back({folder, fmt::format("cannot list the plugin folder: {}", ec.message())});
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
  for (const PluginInfo& known : plugins_)
    if (known.file == file) return true;  // the same file reached twice is one plugin, not a duplicate

  auto refuse = [&](std::string reason) {
    problems_.push_back({file, std::move(reason)});
    return false;
  };
  // Gates 1-3: the stamp, read from the file.
  StampResult read = read_plugin_stamp(file);
  if (!read.stamp) return refuse(std::move(read.problem));
  const PluginStamp& stamp = *read.stamp;
  if (!valid_kind(static_cast<PluginKind>(stamp.kind)))
    return refuse(fmt::format("its stamp has an unknown kind ({})", stamp.kind));
  if (stamp.abi_major != kAbiMajor)
    return refuse(
        fmt::format("{} was built for plugin ABI {}.{}; this moelab speaks ABI {}.{}: rebuild it "
                    "against this SDK",
                    file.string(), stamp.abi_major, stamp.abi_minor, kAbiMajor, kAbiMinor));
  if (stamp.abi_minor > kAbiMinor)
    return refuse(
        fmt::format("{} was built for plugin ABI {}.{}, newer than this moelab's ABI {}.{}: "
                    "upgrade moelab, or rebuild the plugin against this SDK",
                    file.string(), stamp.abi_major, stamp.abi_minor, kAbiMajor, kAbiMinor));
  // Gate 4.
  if (std::string reason = check_entry_symbol(file); !reason.empty()) return refuse(std::move(reason));

  PluginInfo info;
  info.kind = static_cast<PluginKind>(stamp.kind);
  info.name = stamp.name;
  info.version = stamp.version;
  info.description = stamp.description;
  info.abi_major = stamp.abi_major;
  info.abi_minor = stamp.abi_minor;
  info.file = file;
  info.file_size = fs::file_size(file, ec);

  // Gate 5: a second file of the same kind and name makes the name unusable, in every command.
  for (const PluginInfo& first : plugins_)
    if (first.kind == info.kind && first.name == info.name) {
      std::string reason = fmt::format(
          "duplicate {} '{}': defined by both {} and {}; neither is used until one is removed from the search path",
          plugin_kind_name(info.kind), info.name, first.file.string(), file.string());
      duplicates_.try_emplace({info.kind, info.name}, reason);
      problems_.push_back({file, std::move(reason), /*duplicate=*/true});
      return false;
    }
  plugins_.push_back(std::move(info));
  return true;
}

bool PluginRegistry::open(PluginInfo& info) const {
  if (info.loaded) return true;
  if (info.refused) return false;
  auto refuse = [&](std::string reason) {
    problems_.push_back({info.file, std::move(reason)});
    info.refused = true;  // kept in place: the addresses of the others stay valid
    return false;
  };
  std::shared_ptr<boost::dll::shared_library> library;
  const PluginManifest* manifest = nullptr;
  try {
    // rtld_now: an unresolved symbol is reported here, with its name, not as a crash mid-training.
    library = std::make_shared<boost::dll::shared_library>(
        boost::dll::fs::path(info.file.string()), boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local);
    keep_loaded_forever(library);
    PluginEntry& entry = library->get_alias<PluginEntry>(kEntryName);
    manifest = entry();
  } catch (const std::exception& e) {
    return refuse(fmt::format("cannot be loaded: {}", loader_reason(e.what())));
  } catch (...) {
    return refuse("cannot be loaded: its entry point threw something that is not a std::exception");
  }
  if (manifest == nullptr) return refuse(fmt::format("its '{}' entry point returned no manifest", kEntryName));
  // Gate 7: the manifest says what the stamp said (only its two leading fields are laid out alike
  // in every ABI version, so they are compared first).
  if (manifest->abi_major != info.abi_major || manifest->abi_minor != info.abi_minor)
    return refuse(fmt::format("its manifest says plugin ABI {}.{} but its stamp {}.{}: rebuild it against this SDK",
                              manifest->abi_major, manifest->abi_minor, info.abi_major, info.abi_minor));
  if (std::string reason = check_manifest(*manifest); !reason.empty()) return refuse(std::move(reason));
  if (manifest->kind != info.kind || info.name != manifest->name)
    return refuse(fmt::format("its manifest registers {} '{}' but its stamp {} '{}': rebuild it against this SDK",
                              plugin_kind_name(manifest->kind), manifest->name, plugin_kind_name(info.kind),
                              info.name));
  ParamSchema schema;
  try {
    schema = manifest->schema();
  } catch (const std::exception& e) {
    return refuse(fmt::format("{} '{}': its schema() threw: {}", plugin_kind_name(info.kind), info.name, e.what()));
  } catch (...) {
    return refuse(fmt::format("{} '{}': its schema() threw something that is not a std::exception",
                              plugin_kind_name(info.kind), info.name));
  }
  info.schema = std::move(schema);
  info.manifest = manifest;
  info.library = library;
  if (manifest->version) info.version = manifest->version;
  if (manifest->description) info.description = manifest->description;
  info.loaded = true;
  return true;
}

std::string PluginRegistry::duplicate(PluginKind kind, const std::string& name) const {
  const auto it = duplicates_.find({kind, name});
  return it == duplicates_.end() ? std::string{} : it->second;
}

const PluginInfo* PluginRegistry::find(PluginKind kind, const std::string& name) const {
  if (!duplicate(kind, name).empty()) return nullptr;
  for (PluginInfo& p : plugins_)
    if (!p.refused && p.kind == kind && p.name == name) return open(p) ? &p : nullptr;
  return nullptr;
}

const PluginInfo* PluginRegistry::find_any(const std::string& name) const {
  for (const PluginInfo& p : plugins_)
    if (!p.refused && p.name == name) return &p;
  return nullptr;
}

namespace {
std::vector<const PluginInfo*> sorted(const std::deque<PluginInfo>& plugins, std::optional<PluginKind> kind) {
  std::vector<const PluginInfo*> out;
  for (const PluginInfo& p : plugins)
    if (!p.refused && (!kind || p.kind == *kind)) out.push_back(&p);
  std::sort(out.begin(), out.end(), [](const PluginInfo* a, const PluginInfo* b) {
    if (a->kind != b->kind) return static_cast<uint32_t>(a->kind) < static_cast<uint32_t>(b->kind);
    return a->name < b->name;
  });
  return out;
}
}  // namespace

std::vector<const PluginInfo*> PluginRegistry::list(PluginKind kind) const {
  std::vector<const PluginInfo*> out;
  for (const PluginInfo* p : sorted(plugins_, kind))
    if (duplicate(p->kind, p->name).empty() && open(const_cast<PluginInfo&>(*p))) out.push_back(p);
  return out;
}

std::vector<const PluginInfo*> PluginRegistry::all() const {
  std::vector<const PluginInfo*> out;
  for (PluginKind kind :
       {PluginKind::router, PluginKind::experts, PluginKind::balancer, PluginKind::kernel, PluginKind::comm})
    for (const PluginInfo* p : list(kind)) out.push_back(p);
  return out;
}

std::vector<std::string> PluginRegistry::names(PluginKind kind) const {
  std::vector<std::string> out;
  for (const PluginInfo* p : sorted(plugins_, kind))
    if (duplicate(p->kind, p->name).empty()) out.push_back(p->name);
  return out;
}

const PluginInfo& PluginRegistry::require(PluginKind kind, const std::string& name) const {
  if (const PluginInfo* p = find(kind, name)) return *p;
  if (std::string twice = duplicate(kind, name); !twice.empty()) throw UsageError(twice);
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

std::shared_ptr<Comm> PluginRegistry::make_comm(const std::string& name, const ParamSet& params) const {
  const PluginInfo& info = require(PluginKind::comm, name);
  return holding_library(info.manifest->make_comm(params), info);
}

}  // namespace moelab

// The plugin ABI. A plugin is a shared library with two parts: a stamp (PluginStamp: constant data
// in its ELF section ".moelab_plugin", giving its ABI version, kind, name, version and description)
// and one entry point, `moelab_plugin` (a Boost.DLL alias), that returns a PluginManifest. The
// engine reads the stamp from the file and refuses an ABI mismatch, a duplicate name or a missing
// stamp before the library is opened, so none of a refused plugin's code (static initialisers
// included) ever runs; it opens a library only when a plugin of it is used. See CONTRIBUTING.md,
// "ABI policy".
//
// A plugin source file ends with one registration macro:
//   MOELAB_ROUTER_PLUGIN(SoftmaxTopK, "softmax_topk", "1.0.0", "softmax over experts, then top-k")
// where the class provides
//   static ParamSchema schema();
//   SoftmaxTopK(const ParamSet&, const LayerSpec&, Ops&, Rng&);   // kernels, comms: Class(const ParamSet&)
// and optionally
//   static void check(const ParamSet&, const LayerSpec&, ParamProblems&);  // cross-field rules
//   static void adjust_layer(const ParamSet&, LayerSpec&);                 // expert layouts only
#pragma once

#include <boost/dll/alias.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moelab/balancer.hpp"
#include "moelab/comm.hpp"
#include "moelab/experts.hpp"
#include "moelab/kernel.hpp"
#include "moelab/params.hpp"
#include "moelab/router.hpp"

namespace moelab {

// Major: any change to the layout of PluginManifest or to a plugin interface's virtual functions.
// Minor: additions that old plugins need not know about.
// 2: transformer ops slots in Ops; 3: the stamp, ParamSpec::min_exclusive; 4: routing-maths slots
// in Ops (exp, log, divide, column scaling, row sums and maxima, thresholds), and metrics() on
// Router and Balancer; 5: the fifth kind, comm (communicators, moelab/comm.hpp), and its factory
// in PluginManifest; 6: Comm::exchange (blocks to and from any ranks, in one step); 7: the precision
// slots in Ops (cast, set_matmul_precision, matmul_precision, bf16_gemm_path)
inline constexpr uint32_t kAbiMajor = 7;
inline constexpr uint32_t kAbiMinor = 0;

enum class PluginKind : uint32_t { router = 1, experts = 2, balancer = 3, kernel = 4, comm = 5 };
const char* plugin_kind_name(PluginKind kind);  // "router", "experts", "balancer", "kernel", "comm"

// A problem a plugin's cross-field check found in its own parameters.
struct ParamProblem {
  std::string param;    // the parameter's name in the plugin's table
  std::string message;  // "must be at most num_experts (8), got 10"
};
using ParamProblems = std::vector<ParamProblem>;

// What the loader reads from the file before opening it: constant data, placed in the ELF section
// kStampSection by the registration macros. Its layout is fixed for every ABI version (magic and
// stamp_version first); fields are NUL-terminated strings within their arrays.
inline constexpr const char* kStampSection = ".moelab_plugin";
inline constexpr char kStampMagic[16] = "moelab-plugin";
struct PluginStamp {
  char magic[16];          // kStampMagic
  uint32_t stamp_version;  // 1
  uint32_t abi_major, abi_minor;
  uint32_t kind;  // PluginKind
  char name[64];  // at most 63 bytes: the registration macro refuses longer ones at compile time
  char version[32];
  char description[512];
};
static_assert(sizeof(PluginStamp) == 16 + 16 + 64 + 32 + 512, "PluginStamp has no padding");

struct PluginManifest {
  // These two stay the first members in every ABI version: the loader reads them first.
  uint32_t abi_major;
  uint32_t abi_minor;

  PluginKind kind;
  const char* name;         // what a recipe writes: type = "softmax_topk"
  const char* version;      // the plugin's own version, "1.0.0"
  const char* description;  // one line

  ParamSchema (*schema)();
  void (*check)(const ParamSet&, const LayerSpec&, ParamProblems&);  // may be null
  void (*adjust_layer)(const ParamSet&, LayerSpec&);                 // experts only; may be null

  // Exactly one factory is set, the one matching `kind`.
  std::unique_ptr<Router> (*make_router)(const ParamSet&, const LayerSpec&, Ops&, Rng&);
  std::unique_ptr<Experts> (*make_experts)(const ParamSet&, const LayerSpec&, Ops&, Rng&);
  std::unique_ptr<Balancer> (*make_balancer)(const ParamSet&, const LayerSpec&, Ops&, Rng&);
  std::unique_ptr<Ops> (*make_kernel)(const ParamSet&);
  std::unique_ptr<Comm> (*make_comm)(const ParamSet&);
};

using PluginEntry = const PluginManifest*();

namespace detail {

template <class C>
constexpr void (*check_of())(const ParamSet&, const LayerSpec&, ParamProblems&) {
  if constexpr (requires(const ParamSet& p, const LayerSpec& s, ParamProblems& e) { C::check(p, s, e); })
    return &C::check;
  else
    return nullptr;
}
template <class C>
constexpr void (*adjust_of())(const ParamSet&, LayerSpec&) {
  if constexpr (requires(const ParamSet& p, LayerSpec& s) { C::adjust_layer(p, s); })
    return &C::adjust_layer;
  else
    return nullptr;
}

template <class C, class Base>
std::unique_ptr<Base> make_module(const ParamSet& p, const LayerSpec& s, Ops& o, Rng& r) {
  return std::make_unique<C>(p, s, o, r);
}
template <class C, class Base>
std::unique_ptr<Base> make_from_params(const ParamSet& p) {
  return std::make_unique<C>(p);
}

template <class C>
PluginManifest manifest_for(PluginKind kind, const char* name, const char* version, const char* description) {
  PluginManifest m{};
#ifdef MOELAB_TEST_ABI_MAJOR  // lets the loader tests build a plugin for another ABI
  m.abi_major = MOELAB_TEST_ABI_MAJOR;
#else
  m.abi_major = kAbiMajor;
#endif
  m.abi_minor = kAbiMinor;
  m.kind = kind;
  m.name = name;
  m.version = version;
  m.description = description;
  m.schema = &C::schema;
  if constexpr (std::is_base_of_v<Router, C>) {
    m.check = check_of<C>();
    m.make_router = &make_module<C, Router>;
  } else if constexpr (std::is_base_of_v<Experts, C>) {
    m.check = check_of<C>();
    m.adjust_layer = adjust_of<C>();
    m.make_experts = &make_module<C, Experts>;
  } else if constexpr (std::is_base_of_v<Balancer, C>) {
    m.check = check_of<C>();
    m.make_balancer = &make_module<C, Balancer>;
  } else if constexpr (std::is_base_of_v<Comm, C>) {
    m.make_comm = &make_from_params<C, Comm>;
  } else {
    static_assert(std::is_base_of_v<Ops, C>, "a plugin class derives from Router, Experts, Balancer, Ops or Comm");
    m.make_kernel = &make_from_params<C, Ops>;
  }
  return m;
}

}  // namespace detail
}  // namespace moelab

#ifdef MOELAB_TEST_ABI_MAJOR  // lets the loader tests build a plugin for another ABI
#define MOELAB_STAMP_ABI_MAJOR_ MOELAB_TEST_ABI_MAJOR
#else
#define MOELAB_STAMP_ABI_MAJOR_ ::moelab::kAbiMajor
#endif

// The stamp alone (the registration macros write it; a fixture that registers by hand may too).
// A name, version or description longer than its field is a compile-time error.
#define MOELAB_PLUGIN_STAMP_(KIND, NAME, VERSION, DESCRIPTION, ABI_MINOR)                            \
  namespace {                                                                                        \
  [[gnu::used, gnu::section(".moelab_plugin")]] const ::moelab::PluginStamp moelab_plugin_stamp_ = { \
      "moelab-plugin",                                                                               \
      1,                                                                                             \
      MOELAB_STAMP_ABI_MAJOR_,                                                                       \
      ABI_MINOR,                                                                                     \
      static_cast<uint32_t>(::moelab::PluginKind::KIND),                                             \
      NAME,                                                                                          \
      VERSION,                                                                                       \
      DESCRIPTION};                                                                                  \
  }

#define MOELAB_DEFINE_PLUGIN_(KIND, CLASS, NAME, VERSION, DESCRIPTION)                                 \
  MOELAB_PLUGIN_STAMP_(KIND, NAME, VERSION, DESCRIPTION, ::moelab::kAbiMinor)                          \
  namespace {                                                                                          \
  const ::moelab::PluginManifest* moelab_plugin_manifest_() {                                          \
    static const ::moelab::PluginManifest manifest =                                                   \
        ::moelab::detail::manifest_for<CLASS>(::moelab::PluginKind::KIND, NAME, VERSION, DESCRIPTION); \
    return &manifest;                                                                                  \
  }                                                                                                    \
  }                                                                                                    \
  BOOST_DLL_ALIAS(moelab_plugin_manifest_, moelab_plugin)

#define MOELAB_ROUTER_PLUGIN(CLASS, NAME, VERSION, DESCRIPTION) \
  MOELAB_DEFINE_PLUGIN_(router, CLASS, NAME, VERSION, DESCRIPTION)
#define MOELAB_EXPERTS_PLUGIN(CLASS, NAME, VERSION, DESCRIPTION) \
  MOELAB_DEFINE_PLUGIN_(experts, CLASS, NAME, VERSION, DESCRIPTION)
#define MOELAB_BALANCER_PLUGIN(CLASS, NAME, VERSION, DESCRIPTION) \
  MOELAB_DEFINE_PLUGIN_(balancer, CLASS, NAME, VERSION, DESCRIPTION)
#define MOELAB_KERNEL_PLUGIN(CLASS, NAME, VERSION, DESCRIPTION) \
  MOELAB_DEFINE_PLUGIN_(kernel, CLASS, NAME, VERSION, DESCRIPTION)
#define MOELAB_COMM_PLUGIN(CLASS, NAME, VERSION, DESCRIPTION) \
  MOELAB_DEFINE_PLUGIN_(comm, CLASS, NAME, VERSION, DESCRIPTION)

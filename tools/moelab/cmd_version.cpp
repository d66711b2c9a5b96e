#include <cstdio>
#include <string>

#include "cli_util.hpp"
#include "moelab/plugin.hpp"
#include "moelab/registry.hpp"

namespace moelab::cli {

namespace {

// The instruction sets the cpu kernel's paths look for, as this CPU reports them.
std::string cpu_features() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  std::string out;
  const auto add = [&](bool present, const char* name) {
    out += out.empty() ? "" : ", ";
    out += name;
    out += present ? " yes" : " no";
  };
  add(__builtin_cpu_supports("avx2"), "AVX2");
  add(__builtin_cpu_supports("avx512f"), "AVX-512");
  add(__builtin_cpu_supports("avx512bf16"), "AVX-512 BF16");
  add(__builtin_cpu_supports("amx-bf16"), "AMX-BF16");
  return out;
#else
  return "not an x86-64 build: the portable loops only";
#endif
}

}  // namespace

int cmd_version(const Args& args) {
  const ArgSpec spec{"moelab version",
                     "Prints moelab's version, the plugin ABI it speaks, the CPU features the cpu kernel can use "
                     "and what its bf16 GEMMs run on.",
                     {},
                     {},
                     0,
                     0};
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  std::printf("moelab %s (plugin ABI %u.%u)\n", MOELAB_VERSION, kAbiMajor, kAbiMinor);
  std::printf("cpu: %s\n", cpu_features().c_str());
  try {
    const PluginRegistry registry = PluginRegistry::with_default_path();
    const PluginInfo& cpu = registry.require(PluginKind::kernel, "cpu");
    const std::shared_ptr<Ops> ops = registry.make_kernel("cpu", defaults_of(cpu.schema));
    std::printf("cpu kernel bf16 GEMMs: %s\n", ops->bf16_gemm_path().c_str());
  } catch (const std::exception& error) {
    std::printf("cpu kernel: not loaded (%s)\n", error.what());
  }
  return kExitOk;
}

}  // namespace moelab::cli

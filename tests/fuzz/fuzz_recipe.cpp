// libFuzzer harness for the recipe engine: the input is a recipe's text. It is parsed (extends
// resolve against the source tree's recipes/ folder, so the seed corpus's recipes load their
// bases), its references resolved, its [sweep] expanded, and the first points validated into a
// RunConfig against a registry holding the build's plugins, then checked as `moelab check` does
// (memory, data, what the trainer supports). Each point's resolved text must load again to the
// same text (the promise Recipe::to_toml makes).
//
// A UsageError is the engine refusing bad input, as it should. Any other exception — above all a
// RuntimeError from MOELAB_CHECK, an internal assertion — is a finding: the harness prints it and
// aborts, so libFuzzer saves the input. (Point 1 of issue 11 hid from a fuzzer that accepted every
// exception.) MOELAB_FUZZ_INJECT_INTERNAL=1 makes build_config's stage throw a RuntimeError, so
// a test can prove that such an error is a finding.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "moelab/config.hpp"
#include "moelab/recipe.hpp"
#include "moelab/registry.hpp"
#include "moelab/run_check.hpp"

namespace {

constexpr size_t kMaxInput = 1 << 16;  // longer recipes add nothing but time
constexpr size_t kMaxPoints = 4;       // sweep points validated per input

[[noreturn]] void finding(const char* stage, const std::string& what) {
  std::fprintf(stderr, "fuzz_recipe: finding: %s threw a non-usage error: %s\n", stage, what.c_str());
  std::abort();
}

template <class F>
bool usage_step(const char* stage, F&& f) {
  try {
    f();
    return true;
  } catch (const moelab::UsageError&) {
    return false;
  } catch (const std::exception& e) {
    finding(stage, e.what());
  } catch (...) {
    finding(stage, "an exception that is not a std::exception");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > kMaxInput) return -1;  // not added to the corpus
  const std::string text(reinterpret_cast<const char*>(data), size);
  const std::string name = MOELAB_SOURCE_DIR "/recipes/fuzz_input.toml";
  std::vector<moelab::Recipe::SweepPoint> points;
  if (!usage_step("Recipe::parse / expand_sweep", [&] { points = moelab::Recipe::parse(text, name).expand_sweep(); }))
    return 0;
  moelab::PluginRegistry registry = moelab::PluginRegistry::with_default_path();
  for (size_t i = 0; i < points.size() && i < kMaxPoints; ++i) {
    moelab::Recipe& recipe = *points[i].recipe;
    usage_step("to_toml round trip", [&] {
      const std::string once = recipe.to_toml();
      const std::string twice = moelab::Recipe::parse(once, name).to_toml();
      if (once != twice)
        finding("to_toml round trip", "the resolved text does not load to itself:\n" + once + "\n---\n" + twice);
    });
    moelab::RunConfig config;
    if (!usage_step("build_config", [&] {
          if (std::getenv("MOELAB_FUZZ_INJECT_INTERNAL") != nullptr)
            throw moelab::RuntimeError("injected internal error (MOELAB_FUZZ_INJECT_INTERNAL)");
          config = moelab::build_config(recipe, registry);
        }))
      continue;
    moelab::CheckOptions options;
    options.read_data = false;  // the data files a fuzzed recipe names are not the harness's to read
    usage_step("check_run", [&] { moelab::check_run(config, recipe, registry, options); });
  }
  return 0;
}

// `moelab run`, `inspect`, `layer` and `version` as a user runs them: a run folder with every file,
// exact repetition from the saved recipe, sweeps, and failures that leave nothing behind.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <unistd.h>

#include "cli_support.hpp"
#include "moelab/module.hpp"
#include "moelab/safetensors.hpp"

namespace fs = std::filesystem;
using namespace moelab::test;

namespace {

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("moelab-test-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string slurp(const fs::path& file) {
  std::ifstream in(file);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A tiny recipe extending the default one: a run takes well under a second.
fs::path tiny_recipe(const fs::path& dir, const std::string& extra = "") {
  const fs::path recipe = dir / "tiny.toml";
  std::ofstream(recipe) << "name = \"tiny\"\nextends = \"" << (fs::path(MOELAB_SOURCE_DIR) / "recipes/default.toml").string()
                        << "\"\n[train]\nsteps = 20\nlog_every = 5\neval_every = 10\neval_batches = 1\n"
                        << extra;
  return recipe;
}

std::string field(const std::string& json, const std::string& key) {
  std::string pattern = "\"";  // built piecewise: GCC 12 warns falsely (-Wrestrict) on "x" + s + "y"
  pattern += key;
  pattern += "\":";
  const auto at = json.find(pattern);
  REQUIRE(at != std::string::npos);
  const auto begin = at + pattern.size();
  return json.substr(begin, json.find_first_of(",}", begin) - begin);
}

}  // namespace

TEST_CASE("run writes a complete run folder that repeats exactly from its own recipe") {
  const fs::path dir = fresh_dir("run");
  const CommandResult first = run_moelab("run " + quoted(tiny_recipe(dir)) + " --out " + quoted(dir / "runs"));
  CAPTURE(first.output);
  REQUIRE(first.status == 0);
  const fs::path run_dir = dir / "runs" / "tiny";
  for (const char* file : {"recipe.toml", "metrics.jsonl", "summary.json", "report.md"})
    CHECK(fs::exists(run_dir / file));
  CHECK(!fs::exists(dir / "runs" / "tiny.incomplete"));
  const std::string metrics = slurp(run_dir / "metrics.jsonl");
  CHECK(metrics.find("\"tokens_per_expert\"") != std::string::npos);
  CHECK(metrics.find("\"kind\":\"eval\"") != std::string::npos);
  CHECK(slurp(run_dir / "report.md").find("dead experts") != std::string::npos);

  // The saved recipe is complete: running it again gives the same figures.
  const CommandResult again = run_moelab("run " + quoted(run_dir / "recipe.toml") + " --out " + quoted(dir / "again"));
  REQUIRE(again.status == 0);
  const std::string a = slurp(run_dir / "summary.json"), b = slurp(dir / "again" / "tiny" / "summary.json");
  CHECK(field(a, "final_eval_loss") == field(b, "final_eval_loss"));
  CHECK(field(a, "final_train_loss") == field(b, "final_train_loss"));

  // An existing folder is not overwritten without --overwrite.
  const CommandResult refused = run_moelab("run " + quoted(tiny_recipe(dir)) + " --out " + quoted(dir / "runs"));
  CHECK(refused.status == 2);
  CHECK(refused.output.find("--overwrite") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("a sweep runs every point into its own folder; a bad recipe runs nothing") {
  const fs::path dir = fresh_dir("sweep");
  const fs::path recipe = tiny_recipe(dir, "[sweep]\n\"moe.top_k\" = [1, 2]\n");
  const CommandResult swept = run_moelab("run " + quoted(recipe) + " --out " + quoted(dir / "runs"));
  CAPTURE(swept.output);
  REQUIRE(swept.status == 0);
  CHECK(fs::exists(dir / "runs" / "tiny" / "top_k-1" / "summary.json"));
  CHECK(fs::exists(dir / "runs" / "tiny" / "top_k-2" / "summary.json"));

  // One bad point fails validation before any run starts.
  const CommandResult bad = run_moelab("run " + quoted(tiny_recipe(dir, "[sweep]\n\"moe.top_k\" = [1, 20]\n")) +
                                       " --out " + quoted(dir / "bad"));
  CHECK(bad.status == 2);
  CHECK(bad.output.find("moe.top_k") != std::string::npos);
  CHECK(!fs::exists(dir / "bad"));
  fs::remove_all(dir);
}

TEST_CASE("inspect counts the layer's parameters") {
  const fs::path dir = fresh_dir("inspect");
  const CommandResult r = run_moelab("inspect " + quoted(tiny_recipe(dir)) + " --json", false);
  REQUIRE(r.status == 0);
  // default: d_model 32, 8 SwiGLU experts of width 64, top-2: router 8*32, experts 8*(2*64*32 + 32*64).
  CHECK(field(r.output, "router") == "256");
  CHECK(field(r.output, "routed_experts") == "49152");
  CHECK(field(r.output, "active_parameters_per_token") == "1.2544E4");
  fs::remove_all(dir);
}

TEST_CASE("layer runs one MoE layer on a tensor file and writes outputs and gradients") {
  const fs::path dir = fresh_dir("layer");
  moelab::Rng rng(3);
  moelab::Tensor x = moelab::host_tensor(moelab::DType::f32, {10, 32});
  moelab::fill_normal(x, 1.0, rng);
  moelab::write_safetensors(dir / "in.safetensors", {{"x", x}});
  moelab::write_safetensors(dir / "dy.safetensors", {{"dy", x}});
  const std::string recipe = quoted(tiny_recipe(dir));
  const CommandResult r = run_moelab("layer " + recipe + " --input " + quoted(dir / "in.safetensors") + " --output " +
                                     quoted(dir / "out.safetensors") + " --grad " + quoted(dir / "dy.safetensors") +
                                     " --names mixtral --save-weights " + quoted(dir / "w.safetensors"));
  CAPTURE(r.output);
  REQUIRE(r.status == 0);
  const moelab::SafetensorsFile out = moelab::read_safetensors(dir / "out.safetensors");
  CHECK(out.at("y").shape() == moelab::Shape{10, 32});
  CHECK(out.at("routing.expert").shape() == moelab::Shape{20});
  CHECK(out.at("grad.x").shape() == moelab::Shape{10, 32});
  CHECK(out.contains("grad.experts.w_in"));
  CHECK(out.contains("aux.switch_aux"));
  CHECK(moelab::read_safetensors(dir / "w.safetensors").contains("experts.7.w3.weight"));

  // The weights saved under HF names load back and give the same output.
  const CommandResult again = run_moelab("layer " + recipe + " --set seed=99 --input " + quoted(dir / "in.safetensors") +
                                         " --output " + quoted(dir / "out2.safetensors") + " --names mixtral --weights " +
                                         quoted(dir / "w.safetensors"));
  REQUIRE(again.status == 0);
  const moelab::Tensor y1 = out.at("y"), y2 = moelab::read_safetensors(dir / "out2.safetensors").at("y");
  for (int64_t i = 0; i < y1.numel(); ++i) REQUIRE(moelab::host_value(y1, i) == moelab::host_value(y2, i));

  // Bad input: a wrong shape names the file and what was expected; nothing is written.
  moelab::write_safetensors(dir / "bad.safetensors", {{"x", moelab::host_tensor(moelab::DType::f32, {10, 7})}});
  const CommandResult bad = run_moelab("layer " + recipe + " --input " + quoted(dir / "bad.safetensors") + " --output " +
                                       quoted(dir / "never.safetensors"));
  CHECK(bad.status == 2);
  CHECK(bad.output.find("'x' has shape [10, 7], expected [T, 32]") != std::string::npos);
  CHECK(!fs::exists(dir / "never.safetensors"));
  fs::remove_all(dir);
}

TEST_CASE("every command answers --help, and usage mistakes exit 2") {
  for (const char* command : {"run", "check", "show", "inspect", "layer", "plugins", "new", "version"}) {
    CAPTURE(command);
    const CommandResult r = run_moelab(std::string(command) + " --help");
    CHECK(r.status == 0);
    CHECK(r.output.find("usage: moelab") != std::string::npos);
  }
  CHECK(run_moelab("").status == 2);
  CHECK(run_moelab("frobnicate").status == 2);
  CHECK(run_moelab("run").status == 2);
  CHECK(run_moelab("run a.toml --no-such-flag").status == 2);
  CHECK(run_moelab("version").output.find("plugin ABI 1.0") != std::string::npos);
}

TEST_CASE("run refuses a recipe describing a whole transformer instead of training something else") {
  const fs::path recipe = fs::path(MOELAB_SOURCE_DIR) / "recipes/published/small/mixtral_8x7b.toml";
  REQUIRE(fs::exists(recipe));
  const CommandResult r = run_moelab("run " + quoted(recipe) + " --out " + quoted(fs::temp_directory_path() / "never"));
  CHECK(r.status == 2);
  CHECK(r.output.find("describes a transformer") != std::string::npos);
  CHECK(run_moelab("inspect " + quoted(recipe)).status == 0);
}

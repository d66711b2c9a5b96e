// `moelab run`, `inspect`, `layer` and `version` as a user runs them: a run folder with every file,
// exact repetition from the saved recipe, sweeps, failures that leave nothing behind, and a
// language-model run that stops and resumes to exactly the metrics of an uninterrupted one.
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

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

// A tiny recipe extending the layer-only example: a run takes well under a second.
fs::path tiny_recipe(const fs::path& dir, const std::string& extra = "") {
  const fs::path recipe = dir / "tiny.toml";
  std::ofstream(recipe) << "name = \"tiny\"\nextends = \""
                        << (fs::path(MOELAB_SOURCE_DIR) / "recipes/examples/layer_regression.toml").string()
                        << "\"\n[train]\nsteps = 20\nlog_every = 5\neval_every = 10\neval_batches = 1\n"
                        << extra;
  return recipe;
}

// The default recipe (the MoE transformer on the Markov corpus), shrunk to a second of training.
fs::path tiny_lm_recipe(const fs::path& dir, const std::string& extra = "") {
  const fs::path recipe = dir / "lm.toml";
  std::ofstream(recipe) << "name = \"lm\"\nextends = \""
                        << (fs::path(MOELAB_SOURCE_DIR) / "recipes/default.toml").string()
                        << "\"\n[model]\nd_model = 16\nvocab_size = 16\n[moe.experts]\nd_ff = 16\n"
                        << "[train]\nsteps = 24\nbatch_size = 4\nseq_len = 16\nwarmup_steps = 4\nlog_every = 4\n"
                        << "eval_every = 8\neval_batches = 2\ncheckpoint_every = 8\n"
                        << extra;
  return recipe;
}

// metrics.jsonl without the wall-clock figure, which is the one thing allowed to differ.
std::string metrics_without_speed(const fs::path& file) {
  std::string out, line;
  std::ifstream in(file);
  while (std::getline(in, line)) {
    const auto at = line.find("\"tokens_per_second\":");
    if (at != std::string::npos) line.erase(at, line.find_first_of(",}", at) - at);
    out += line + "\n";
  }
  return out;
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
  // layer_regression: d_model 32, 8 SwiGLU experts of width 64, top-2: router 8*32, experts 8*(2*64*32 + 32*64).
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
  const CommandResult again =
      run_moelab("layer " + recipe + " --set seed=99 --input " + quoted(dir / "in.safetensors") + " --output " +
                 quoted(dir / "out2.safetensors") + " --names mixtral --weights " + quoted(dir / "w.safetensors"));
  REQUIRE(again.status == 0);
  const moelab::Tensor y1 = out.at("y"), y2 = moelab::read_safetensors(dir / "out2.safetensors").at("y");
  for (int64_t i = 0; i < y1.numel(); ++i) REQUIRE(moelab::host_value(y1, i) == moelab::host_value(y2, i));

  // Bad input: a wrong shape names the file and what was expected; nothing is written.
  moelab::write_safetensors(dir / "bad.safetensors", {{"x", moelab::host_tensor(moelab::DType::f32, {10, 7})}});
  const CommandResult bad = run_moelab("layer " + recipe + " --input " + quoted(dir / "bad.safetensors") +
                                       " --output " + quoted(dir / "never.safetensors"));
  CHECK(bad.status == 2);
  CHECK(bad.output.find("'x' has shape [10, 7], expected [T, 32]") != std::string::npos);
  CHECK(!fs::exists(dir / "never.safetensors"));
  // No tokens (it printed "aux loss -nan" and exited 0) and integer inputs are refused too.
  moelab::write_safetensors(dir / "empty.safetensors", {{"x", moelab::host_tensor(moelab::DType::f32, {0, 32})}});
  const CommandResult empty = run_moelab("layer " + recipe + " --input " + quoted(dir / "empty.safetensors") +
                                         " --output " + quoted(dir / "never.safetensors"));
  CHECK(empty.status == 2);
  CHECK(empty.output.find("'x' has no tokens") != std::string::npos);
  moelab::write_safetensors(dir / "ints.safetensors", {{"x", moelab::host_tensor(moelab::DType::i32, {4, 32})}});
  const CommandResult ints = run_moelab("layer " + recipe + " --input " + quoted(dir / "ints.safetensors") +
                                        " --output " + quoted(dir / "never.safetensors"));
  CHECK(ints.status == 2);
  CHECK(ints.output.find("'x' is i32") != std::string::npos);
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
  CHECK(run_moelab("version").output.find("plugin ABI 7.0") != std::string::npos);
}

TEST_CASE("run refuses what the trainer cannot train, at the recipe's key, before anything is written") {
  const fs::path recipe = fs::path(MOELAB_SOURCE_DIR) / "recipes/published/switch_base_8.toml";
  REQUIRE(fs::exists(recipe));
  const fs::path out = fs::temp_directory_path() / ("moelab-never-" + std::to_string(::getpid()));
  const CommandResult r = run_moelab("run " + quoted(recipe) + " --out " + quoted(out));
  CAPTURE(r.output);
  CHECK(r.status == 2);
  CHECK(r.output.find("model.architecture") != std::string::npos);
  CHECK(r.output.find("encoder_decoder") != std::string::npos);
  CHECK(!fs::exists(out));
  CHECK(run_moelab("inspect " + quoted(recipe)).status == 0);
}

TEST_CASE("a language-model run writes its folder and checkpoint, and reports the corpus floor") {
  const fs::path dir = fresh_dir("lm");
  const CommandResult r = run_moelab("run " + quoted(tiny_lm_recipe(dir)) + " --out " + quoted(dir / "runs") +
                                     " --set train.keep_checkpoints=true");
  CAPTURE(r.output);
  REQUIRE(r.status == 0);
  const fs::path run_dir = dir / "runs" / "lm";
  for (const char* kept : {"step_00000008.safetensors", "step_00000016.safetensors", "step_00000024.safetensors"})
    CHECK(fs::exists(run_dir / "checkpoints" / kept));
  for (const char* file : {"recipe.toml", "metrics.jsonl", "summary.json", "report.md", "checkpoint.safetensors"})
    CHECK(fs::exists(run_dir / file));
  const std::string summary = slurp(run_dir / "summary.json");
  CHECK(std::stod(field(summary, "eval_optimal_loss")) > 0);
  CHECK(std::stod(field(summary, "entropy_rate")) > 0);
  CHECK(std::stod(field(summary, "final_eval_loss")) > std::stod(field(summary, "eval_optimal_loss")));
  const std::string metrics = slurp(run_dir / "metrics.jsonl");
  for (const char* key : {"\"optimal_loss\"", "\"grad_norm\"", "\"lr\"", "\"balancer_losses\"", "\"max_violation\"",
                          "\"routed_max_violation\"", "\"router_entropy\"", "\"dead_experts\"", "\"drop_fraction\""})
    CHECK(metrics.find(key) != std::string::npos);
  CHECK(slurp(run_dir / "report.md").find("optimal loss on the eval windows") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("a stopped language-model run resumes to exactly the uninterrupted run's metrics") {
  const fs::path dir = fresh_dir("resume");
  const fs::path recipe = tiny_lm_recipe(dir);
  REQUIRE(run_moelab("run " + quoted(recipe) + " --out " + quoted(dir / "whole")).status == 0);

  // Stop after step 13: between checkpoints, so the resumed run redoes nothing twice.
  const CommandResult stopped =
      run_moelab("run " + quoted(recipe) + " --out " + quoted(dir / "split") + " --stop-at 13");
  CAPTURE(stopped.output);
  REQUIRE(stopped.status == 0);
  const fs::path split = dir / "split" / "lm";
  CHECK(stopped.output.find("--resume") != std::string::npos);
  CHECK(!fs::exists(split / "summary.json"));
  CHECK(fs::exists(split / "checkpoint.safetensors"));

  // Starting it again over the unfinished folder is refused with the way to continue it.
  const CommandResult again = run_moelab("run " + quoted(recipe) + " --out " + quoted(dir / "split"));
  CHECK(again.status == 2);
  CHECK(again.output.find("moelab run --resume") != std::string::npos);
  CHECK(run_moelab("run --resume " + quoted(split) + " --set train.steps=5").status == 2);

  const CommandResult resumed = run_moelab("run --resume " + quoted(split));
  CAPTURE(resumed.output);
  REQUIRE(resumed.status == 0);
  CHECK(metrics_without_speed(split / "metrics.jsonl") ==
        metrics_without_speed(dir / "whole" / "lm" / "metrics.jsonl"));
  const std::string a = slurp(dir / "whole" / "lm" / "summary.json"), b = slurp(split / "summary.json");
  CHECK(field(a, "final_eval_loss") == field(b, "final_eval_loss"));
  CHECK(field(a, "final_train_loss") == field(b, "final_train_loss"));
  CHECK(field(a, "train_drop_fraction") == field(b, "train_drop_fraction"));
  CHECK(field(b, "resumed_after_step") == "13");

  // A finished run has nothing to resume; a folder without a checkpoint cannot be resumed.
  const CommandResult finished = run_moelab("run --resume " + quoted(split));
  CHECK(finished.status == 2);
  CHECK(finished.output.find("has finished") != std::string::npos);
  fs::create_directories(dir / "empty");
  std::ofstream(dir / "empty" / "recipe.toml") << "name = \"x\"\n";
  CHECK(run_moelab("run --resume " + quoted(dir / "empty")).status == 2);
  CHECK(run_moelab("run --resume " + quoted(dir / "nowhere")).status == 2);
  CHECK(run_moelab("run " + quoted(recipe) + " --stop-at zero").status == 2);

  // A checkpoint that is cut short, or that belongs to another model, is a clear error.
  REQUIRE(run_moelab("run " + quoted(recipe) + " --out " + quoted(dir / "bad") + " --stop-at 8").status == 0);
  const fs::path bad = dir / "bad" / "lm";
  std::string recipe_text = slurp(bad / "recipe.toml");
  const auto at = recipe_text.find("d_model = 16");
  REQUIRE(at != std::string::npos);
  std::ofstream(bad / "recipe.toml") << recipe_text.replace(at, 12, "d_model = 24");
  const CommandResult other = run_moelab("run --resume " + quoted(bad));
  CAPTURE(other.output);
  CHECK(other.status == 2);
  CHECK(other.output.find("belongs to another model") != std::string::npos);
  fs::resize_file(bad / "checkpoint.safetensors", fs::file_size(bad / "checkpoint.safetensors") / 2);
  const CommandResult cut = run_moelab("run --resume " + quoted(bad));
  CAPTURE(cut.output);
  CHECK(cut.status == 2);
  CHECK(cut.output.find("checkpoint.safetensors") != std::string::npos);
  CHECK(fs::exists(bad / "checkpoint.safetensors"));  // a failed resume keeps the folder to try again
  // ... and does not advise resuming the checkpoint it has just refused.
  CHECK(cut.output.find("moelab run --resume") == std::string::npos);

  // One flipped byte in the data region is refused by the tensor's checksum, by name.
  REQUIRE(run_moelab("run " + quoted(recipe) + " --out " + quoted(dir / "flip") + " --stop-at 8").status == 0);
  const fs::path flip = dir / "flip" / "lm" / "checkpoint.safetensors";
  {
    std::fstream f(flip, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-3, std::ios::end);
    char byte = 0;
    f.read(&byte, 1);
    byte = static_cast<char>(byte ^ 0x10);
    f.seekp(-3, std::ios::end);
    f.write(&byte, 1);
  }
  const CommandResult flipped = run_moelab("run --resume " + quoted(dir / "flip" / "lm"));
  CAPTURE(flipped.output);
  CHECK(flipped.status == 2);
  CHECK(flipped.output.find("does not match its checksum") != std::string::npos);
  CHECK(flipped.output.find("tensor '") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("a language model trains on text files and on token files; a malformed file is a clear error") {
  const fs::path dir = fresh_dir("textdata");
  {
    std::ofstream text(dir / "corpus.txt");
    for (int i = 0; i < 400; ++i) text << "the expert " << i % 7 << " takes token " << i << "; the router decides.\n";
  }
  const CommandResult text =
      run_moelab("run " + quoted(tiny_lm_recipe(dir, "[data]\nkind = \"text\"\npaths = [\"corpus.txt\"]\n")) +
                 " --out " + quoted(dir / "runs") + " --set model.vocab_size=256");
  CAPTURE(text.output);
  REQUIRE(text.status == 0);
  CHECK(field(slurp(dir / "runs" / "lm" / "summary.json"), "eval_optimal_loss") == "null");
  CHECK(field(slurp(dir / "runs" / "lm" / "summary.json"), "data").find("text") != std::string::npos);

  {
    std::ofstream tokens(dir / "tokens.bin", std::ios::binary);
    for (uint16_t i = 0; i < 3000; ++i) {
      const uint16_t token = static_cast<uint16_t>((i * 7) % 16);
      tokens.write(reinterpret_cast<const char*>(&token), 2);
    }
  }
  const CommandResult tokens =
      run_moelab("run " + quoted(tiny_lm_recipe(dir, "[data]\nkind = \"tokens\"\npaths = [\"tokens.bin\"]\n")) +
                 " --out " + quoted(dir / "tok"));
  CAPTURE(tokens.output);
  CHECK(tokens.status == 0);

  std::ofstream(dir / "odd.bin", std::ios::binary) << "abc";  // 3 bytes: not a whole number of u16 tokens
  const CommandResult odd =
      run_moelab("run " + quoted(tiny_lm_recipe(dir, "[data]\nkind = \"tokens\"\npaths = [\"odd.bin\"]\n")) +
                 " --out " + quoted(dir / "odd"));
  CAPTURE(odd.output);
  CHECK(odd.status == 2);
  CHECK(odd.output.find("odd.bin") != std::string::npos);
  CHECK(!fs::exists(dir / "odd" / "lm"));

  const CommandResult missing =
      run_moelab("run " + quoted(tiny_lm_recipe(dir, "[data]\nkind = \"text\"\npaths = [\"nothing/*.txt\"]\n")) +
                 " --out " + quoted(dir / "missing") + " --set model.vocab_size=256");
  CHECK(missing.status == 2);
  CHECK(missing.output.find("nothing/*.txt") != std::string::npos);
  CHECK(!fs::exists(dir / "missing" / "lm"));
  fs::remove_all(dir);
}

TEST_CASE("run: an --out that cannot hold folders and a run name too long for a folder are clear errors") {
  const fs::path dir = fresh_dir("run-paths");
  // A parent that is a file (the tests run as root, for whom a read-only folder is still writable).
  std::ofstream(dir / "a-file") << "not a folder\n";
  const CommandResult blocked = run_moelab("run " + quoted(tiny_recipe(dir)) + " --out " + quoted(dir / "a-file"));
  CAPTURE(blocked.output);
  CHECK(blocked.status == 1);
  CHECK(blocked.output.find("cannot create the run folder") != std::string::npos);
  CHECK(blocked.output.find("choose another parent with --out DIR") != std::string::npos);
  CHECK(blocked.output.find("unexpected failure") == std::string::npos);

  const CommandResult long_name = run_moelab("run " + quoted(tiny_recipe(dir)) +
                                             " --set name=" + std::string(300, 'n') + " --out " + quoted(dir / "runs"));
  CAPTURE(long_name.output);
  CHECK(long_name.status == 2);
  CHECK(long_name.output.find("is 300 bytes; a folder name is at most 255 bytes") != std::string::npos);
  CHECK_FALSE(fs::exists(dir / "runs"));
  fs::remove_all(dir);
}

TEST_CASE("a diverging run stops at the first non-finite loss or gradient, naming the step and the tensor") {
  const fs::path dir = fresh_dir("diverge");
  const CommandResult r = run_moelab("run " + quoted(tiny_lm_recipe(dir)) + " --out " + quoted(dir / "runs") +
                                     " --set train.lr=1e6 --set train.grad_clip=0 --set train.warmup_steps=0");
  CAPTURE(r.output);
  CHECK(r.status == 1);
  CHECK(r.output.find("error: step ") != std::string::npos);
  CHECK((r.output.find("the gradient of '") != std::string::npos ||
         r.output.find("the training loss is ") != std::string::npos));
  CHECK(r.output.find("the weights were not updated") != std::string::npos);
  CHECK(r.output.find("check '") == std::string::npos);  // no internal assertion
  // The folder stays, with what was logged and the failure as the last line of the metrics.
  const std::string metrics = slurp(dir / "runs" / "lm" / "metrics.jsonl");
  CHECK(metrics.find("\"kind\":\"error\"") != std::string::npos);
  CHECK(r.output.find("its metrics are kept in") != std::string::npos);
  fs::remove_all(dir);
}

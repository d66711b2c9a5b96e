// `moelab check` and `moelab show` as a user runs them. The broken corpus, tests/recipes/broken/*.toml:
// each file starts with one or more lines
//   # expect: <name relative to tests/recipes/broken>:<line>:<column> [<dotted.key>]
// and `moelab check FILE` must exit 2 with a diagnostic line holding that place and that key.
#include <doctest/doctest.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <algorithm>
#include <boost/json.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cli_support.hpp"
#include "test_files.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kRecipes = fs::path(MOELAB_TESTS_DIR) / "recipes";

using Result = moelab::test::CommandResult;
using moelab::test::quoted;
Result run(const std::string& arguments, bool with_stderr = true) {
  return moelab::test::run_moelab(arguments, with_stderr);
}

struct Expectation {
  std::string place;  // "name.toml:3:11"
  std::string key;    // may be empty
};

std::vector<Expectation> expectations_of(const fs::path& file) {
  std::ifstream in(file);
  std::vector<Expectation> out;
  std::string line;
  while (std::getline(in, line) && line.rfind("#", 0) == 0) {
    const std::string tag = "# expect: ";
    if (line.rfind(tag, 0) != 0) continue;
    std::istringstream fields(line.substr(tag.size()));
    Expectation e;
    fields >> e.place >> e.key;
    out.push_back(e);
  }
  return out;
}

}  // namespace

TEST_CASE("moelab check: every broken recipe exits 2 naming the place and the key") {
  std::vector<fs::path> corpus;
  for (const auto& entry : fs::directory_iterator(kRecipes / "broken"))
    if (entry.is_regular_file() && entry.path().extension() == ".toml") corpus.push_back(entry.path());
  std::sort(corpus.begin(), corpus.end());
  REQUIRE(corpus.size() >= 10);

  for (const fs::path& file : corpus) {
    CAPTURE(file.filename().string());
    const std::vector<Expectation> expected = expectations_of(file);
    REQUIRE_MESSAGE(!expected.empty(), file << " has no '# expect:' line");
    const Result r = run("check " + quoted(file));
    CAPTURE(r.output);
    CHECK(r.status == 2);
    for (const Expectation& e : expected) {
      // The same line of output names the place, and the key right after "error: ".
      bool found = false;
      std::istringstream lines(r.output);
      for (std::string line; std::getline(lines, line);) {
        if (line.find("/" + e.place + ": error: ") == std::string::npos) continue;
        if (e.key.empty() || line.find(": error: " + e.key + ": ") != std::string::npos) found = true;
      }
      CHECK_MESSAGE(found, "no diagnostic at " << e.place << " for key '" << e.key << "'");
    }
  }
}

TEST_CASE("moelab check: a diagnostic inherited through extends carries a note") {
  const Result r = run("check " + quoted(kRecipes / "broken/inherited_bad_value.toml"));
  CHECK(r.status == 2);
  CHECK(r.output.find("[set in ") != std::string::npos);
  CHECK(r.output.find("bad_overflow_base.toml, extended by ") != std::string::npos);
}

TEST_CASE("moelab check: a problem in one sweep point names it") {
  const Result r = run("check " + quoted(kRecipes / "broken/sweep_point_error.toml"));
  CHECK(r.status == 2);
  CHECK(r.output.find("[in sweep point moe.top_k=8]") != std::string::npos);
  CHECK(r.output.find("moelab: 1 error") != std::string::npos);
}

TEST_CASE("moelab check: valid recipes, sweeps and overrides") {
  const Result base = run("check " + quoted(kRecipes / "base.toml"));
  CHECK(base.status == 0);
  CHECK(base.output == (kRecipes / "base.toml").string() + ": ok (1 run)\n");

  const Result sweep = run("check " + quoted(kRecipes / "sweep.toml"));
  CHECK(sweep.status == 0);
  CHECK(sweep.output.find(": ok (6 runs)") != std::string::npos);

  const Result bad_set = run("check " + quoted(kRecipes / "base.toml") + " --set moe.top_k=9 --set 'train.lr=[1'");
  CHECK(bad_set.status == 2);
  CAPTURE(bad_set.output);
  CHECK(bad_set.output.find("<--set train.lr=[1>: error: train.lr: cannot parse") != std::string::npos);

  const Result range = run("check " + quoted(kRecipes / "base.toml") + " --set moe.top_k=9 --set moe.router.type=nope");
  CAPTURE(range.output);
  CHECK(range.status == 2);
  CHECK(range.output.find("<--set moe.top_k=9>: error: moe.top_k: top_k (9) must be at most num_experts (4)") !=
        std::string::npos);
  CHECK(range.output.find("<--set moe.router.type=nope>: error: moe.router.type: unknown router plugin 'nope'") !=
        std::string::npos);
  CHECK(range.output.find("moelab: 2 errors") != std::string::npos);

  CHECK(run("check").status == 2);
  CHECK(run("check " + quoted(kRecipes / "no_such_recipe.toml")).status == 2);
  const Result help = run("check --help");
  CHECK(help.status == 0);
  CHECK(help.output.find("usage: moelab check RECIPE") != std::string::npos);
}

TEST_CASE("moelab check --json") {
  const Result ok = run("check --json " + quoted(kRecipes / "sweep.toml"), false);
  CHECK(ok.status == 0);
  CHECK(ok.output == "{\"ok\":true,\"runs\":6,\"errors\":[]}\n");

  const Result bad = run("check --json " + quoted(kRecipes / "broken/out_of_range.toml"), false);
  CHECK(bad.status == 2);
  CAPTURE(bad.output);
  CHECK(bad.output.rfind("{\"ok\":false,\"runs\":1,\"errors\":[{\"file\":\"", 0) == 0);
  CHECK(bad.output.find("out_of_range.toml\",\"line\":7,\"column\":15,\"key\":\"moe.num_experts\",\"message\":"
                        "\"must be in [1, 65536], got 0\",\"hint\":\"\",\"note\":\"\"}") != std::string::npos);
  CHECK(bad.output.find("\"key\":\"train.lr\"") != std::string::npos);

  const Result unloadable = run("check --json " + quoted(kRecipes / "broken/malformed.toml"), false);
  CHECK(unloadable.status == 2);
  CHECK(unloadable.output.rfind("{\"ok\":false,\"runs\":0,", 0) == 0);
  CHECK(unloadable.output.find("\"line\":6,\"column\":9,\"key\":\"\",\"message\":\"malformed TOML: ") !=
        std::string::npos);
}

TEST_CASE("moelab show: the complete resolved recipe, which loads back the same") {
  const Result r = run("show " + quoted(kRecipes / "base.toml"), false);
  REQUIRE(r.status == 0);
  const toml::table shown = toml::parse(r.output);
  CHECK(shown.at_path("name").value<std::string>() == "base");
  CHECK(shown.at_path("moe.router.temperature").value<double>() == 1.0);  // a plugin default
  CHECK(shown.at_path("moe.balancers[0].f_denominator").value<std::string>() == "assignments");
  CHECK(shown.at_path("train.lr").value<double>() == 1e-3);
  CHECK(shown.at_path("kernel.type").value<std::string>() == "cpu");

  // Saved and shown again, it is the same text.
  const fs::path copy = fs::temp_directory_path() / ("moelab_show_" + std::to_string(::getpid()) + ".toml");
  std::ofstream(copy) << r.output;
  const Result again = run("show " + quoted(copy), false);
  fs::remove(copy);
  CHECK(again.status == 0);
  CHECK(again.output == r.output);
}

TEST_CASE("moelab show: a sweep prints each point under a header; --point picks one") {
  const Result all = run("show " + quoted(kRecipes / "sweep.toml"), false);
  REQUIRE(all.status == 0);
  CHECK(all.output.rfind("# point 1/6: moe.top_k=1,moe.experts.d_ff=16 (folder top_k-1_d_ff-16)\n", 0) == 0);
  CHECK(all.output.find("# point 6/6: moe.top_k=2,moe.experts.d_ff=64") != std::string::npos);
  CHECK(all.output.find("description = \"top_k=2, d_ff=64\"") != std::string::npos);

  const Result one = run("show --point 5 " + quoted(kRecipes / "sweep.toml"), false);
  REQUIRE(one.status == 0);
  const toml::table point = toml::parse(one.output);
  CHECK(point.at_path("moe.top_k").value<int64_t>() == 2);
  CHECK(point.at_path("moe.experts.d_ff").value<int64_t>() == 32);
  CHECK(!point.contains("sweep"));

  const Result out_of_range = run("show --point 7 " + quoted(kRecipes / "sweep.toml"));
  CHECK(out_of_range.status == 2);
  CHECK(out_of_range.output.find("--point expects a number from 1 to 6") != std::string::npos);

  const Result broken = run("show " + quoted(kRecipes / "broken/wrong_type.toml"));
  CHECK(broken.status == 2);
  CHECK(broken.output.find("wrong_type.toml:6:9: error: moe.top_k:") != std::string::npos);
}

TEST_CASE("moelab check: 20,000 diagnostics are found in linear time and the first 50 shown with a count") {
  const fs::path dir = fs::temp_directory_path() / ("moelab_check_many_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path recipe = dir / "many.toml";
  {
    std::ofstream out(recipe);
    out << "extends = \"" << (fs::path(MOELAB_SOURCE_DIR) / "recipes/default.toml").string() << "\"\n";
    for (int i = 0; i < 20000; ++i) out << "unknown_key_" << i << " = 1\n";
  }
  // Before: each diagnostic was compared with every earlier one (343 s for this file).
  const Result text = run("check " + quoted(recipe));
  CHECK(text.status == 2);
  CHECK(std::count(text.output.begin(), text.output.end(), '\n') == 52);
  CHECK(text.output.find("19950 more errors not shown") != std::string::npos);
  CHECK(text.output.find("moelab: 20000 errors") != std::string::npos);
  const Result json = run("check --json " + quoted(recipe), false);
  CHECK(json.status == 2);
  CHECK(json.output.find("unknown_key_19999") != std::string::npos);
  fs::remove_all(dir);
}

// Issue 11, point 4: check refuses what run cannot do, at the recipe's key.
TEST_CASE("moelab check: a run too large for this machine's memory is refused with the figures") {
  moelab::test::ScratchFolder dir("check_memory");
  const fs::path recipe = dir / "huge.toml";
  moelab::test::write_bytes(
      recipe, "extends = \"" MOELAB_SOURCE_DIR "/recipes/default.toml\"\n[model]\nd_model = 16384\nn_layers = 512\n");
  const Result r = run("check " + quoted(recipe));
  CAPTURE(r.output);
  CHECK(r.status == 2);
  CHECK(r.output.find("huge.toml:2:1: error: model: this run needs at least") != std::string::npos);
  CHECK(r.output.find("AdamW state") != std::string::npos);
  CHECK(r.output.find("but this machine has") != std::string::npos);
  // The same recipe checked against a machine with enough memory (a cluster node, say) passes.
  CHECK(run("check " + quoted(recipe) + " --memory-gib 100000").status == 0);
  CHECK(run("check " + quoted(recipe) + " --memory-gib -1").status == 2);
  // Too many tokens per step: the activations dominate, and the key named is the batch.
  const Result batch = run("check " MOELAB_SOURCE_DIR "/recipes/default.toml --set train.batch_size=1048576");
  CHECK(batch.status == 2);
  CHECK(batch.output.find("error: train.batch_size: this run needs at least") != std::string::npos);
  // `run` refuses it the same way, before any folder is written.
  const Result ran = run("run " + quoted(recipe) + " --out " + quoted(dir / "runs"));
  CHECK(ran.status == 2);
  CHECK(!fs::exists(dir / "runs"));
  // show and inspect still describe it.
  CHECK(run("show " + quoted(recipe), false).status == 0);
  CHECK(run("inspect " + quoted(recipe), false).status == 0);
}

TEST_CASE("moelab inspect and check: a [parallel] layout, per rank") {
  const std::string recipe = MOELAB_SOURCE_DIR "/recipes/default.toml";
  const Result one = run("inspect " + recipe + " --json", false);
  const Result four = run("inspect " + recipe + " --set parallel.expert=2 --nproc 4 --json", false);
  REQUIRE(one.status == 0);
  REQUIRE(four.status == 0);
  const boost::json::object whole = boost::json::parse(one.output).as_object();
  const boost::json::object split = boost::json::parse(four.output).as_object();
  const int64_t total = whole.at("total_parameters").as_int64();
  const int64_t routed = whole.at("parameters").at("routed_experts").as_int64();
  CHECK(whole.at("per_rank").at("parameters").as_int64() == total);
  const boost::json::object& rank = split.at("per_rank").as_object();
  CHECK(rank.at("ranks").as_int64() == 4);
  CHECK(rank.at("expert").as_int64() == 2);
  CHECK(rank.at("data").as_int64() == 2);
  CHECK(rank.at("parameters").as_int64() == total - routed / 2);
  // Each rank's share of the batch: a quarter of the activations one process saves, plus the
  // gathered MoE inputs.
  CHECK(rank.at("training_memory_bytes").at("logits").as_int64() * 4 ==
        whole.at("per_rank").at("training_memory_bytes").at("logits").as_int64());
  const Result text = run("inspect " + recipe + " --set parallel.expert=2 --nproc 4", false);
  CHECK(text.output.find("per rank of 4 (expert 2 x data 2)") != std::string::npos);
  CHECK(text.output.find("1/2 of the routed experts") != std::string::npos);

  // Layouts the run could not start are refused by both, at the key.
  const Result uneven = run("inspect " + recipe + " --set parallel.expert=3");
  CHECK(uneven.status == 2);
  CHECK(uneven.output.find("parallel.expert: 8 experts cannot be split evenly over 3 ranks") != std::string::npos);
  for (const std::string command : {"inspect", "check"}) {
    const Result odd = run(command + " " + recipe + " --set parallel.expert=2 --nproc 3");
    CAPTURE(odd.output);
    CHECK(odd.status == 2);
    CHECK(odd.output.find("parallel.expert = 2 does not divide the 3 ranks") != std::string::npos);
    const Result batch = run(command + " " + recipe + " --set parallel.expert=2 --nproc 32");
    CHECK(batch.status == 2);
    CHECK(batch.output.find("train.batch_size: 16 sequences cannot be split evenly over 32 ranks") !=
          std::string::npos);
  }
  // A micro-batch that does not divide the batch, or that nothing reads, is refused at its key.
  const Result uneven_micro = run("check " + recipe + " --set parallel.balance=local --set parallel.micro_batch=3");
  CAPTURE(uneven_micro.output);
  CHECK(uneven_micro.status == 2);
  CHECK(uneven_micro.output.find("parallel.micro_batch: 3 sequences per micro-batch do not divide "
                                 "train.batch_size = 16") != std::string::npos);
  const Result unused_micro = run("check " + recipe + " --set parallel.micro_batch=4");
  CHECK(unused_micro.status == 2);
  CHECK(unused_micro.output.find("capacity and balance are both \"global\": it would change nothing") !=
        std::string::npos);
  CHECK(run("check " + recipe + " --set parallel.capacity=local --set parallel.micro_batch=4").status == 0);
  // bf16 GEMMs are for f32 models; an unknown precision names the choices.
  CHECK(run("check " + recipe + " --set 'train.precision=\"bf16\"'").status == 0);
  const Result f64_bf16 = run("check " + recipe + " --set 'train.precision=\"bf16\"' --set 'model.dtype=\"f64\"'");
  CAPTURE(f64_bf16.output);
  CHECK(f64_bf16.status == 2);
  CHECK(f64_bf16.output.find("train.precision: bf16 GEMMs are for f32 models; model.dtype is f64") !=
        std::string::npos);
  const Result fp16 = run("check " + recipe + " --set 'train.precision=\"fp16\"'");
  CHECK(fp16.status == 2);
  CHECK(fp16.output.find("bf16") != std::string::npos);
  // The memory check adds up the ranks sharing this machine.
  const Result crowded = run("check " + recipe + " --set parallel.expert=2 --nproc 16 --memory-gib 0.01");
  CAPTURE(crowded.output);
  CHECK(crowded.status == 2);
  CHECK(crowded.output.find("its 16 ranks, all on this machine, need at least") != std::string::npos);
}

TEST_CASE("moelab check: the data files are checked — globs, existence, UTF-8, token ids, length") {
  moelab::test::ScratchFolder dir("check_data");
  const auto recipe_with = [&](const std::string& name, const std::string& data) {
    const fs::path file = dir / name;
    moelab::test::write_bytes(file, "extends = \"" MOELAB_SOURCE_DIR
                                    "/recipes/default.toml\"\n[model]\nvocab_size = "
                                    "256\n[data]\n" +
                                        data);
    return file;
  };
  std::string tokens(4000 * 2, '\0');
  tokens[7998] = 0x2c;  // token 3999 is 300 (little-endian u16 0x012c)
  tokens[7999] = 0x01;
  moelab::test::write_bytes(dir / "tokens.bin", tokens);
  moelab::test::write_bytes(dir / "latin1.txt", std::string(200, 'a') + "\xff\xfe");
  moelab::test::write_bytes(dir / "short.txt", "hello");
  const std::string d = dir.path().string();
  const struct {
    std::string name, data, expected;
  } cases[] = {
      {"missing.toml", "kind = \"text\"\npaths = [\"" + d + "/nothere.txt\"]\n",
       "missing.toml:6:9: error: data.paths: " + d + "/nothere.txt: no such file"},
      {"glob.toml", "kind = \"text\"\npaths = [\"" + d + "/*.md\"]\n", "error: data.paths: the glob"},
      {"utf8.toml", "kind = \"text\"\npaths = [\"" + d + "/latin1.txt\"]\n",
       "is not UTF-8: invalid sequence at byte offset 200"},
      {"short.toml", "kind = \"text\"\npaths = [\"" + d + "/short.txt\"]\n", "the train split holds 4 tokens"},
      {"ids.toml", "kind = \"tokens\"\npaths = [\"" + d + "/tokens.bin\"]\n",
       "token 3999 (byte offset 7998) is 300, not below model.vocab_size = 256"},
  };
  for (const auto& c : cases) {
    const Result r = run("check " + quoted(recipe_with(c.name, c.data)));
    CAPTURE(c.name);
    CAPTURE(r.output);
    CHECK(r.status == 2);
    CHECK(r.output.find(c.expected) != std::string::npos);
  }
  // A sweep whose second point names a missing file: check refuses it, and run trains nothing.
  const fs::path sweep = recipe_with("sweep.toml", "kind = \"text\"\n[sweep]\n\"data.paths\" = [[\"" + d +
                                                       "/latin1.txt\"], [\"" + d + "/gone.txt\"]]\n");
  moelab::test::write_bytes(dir / "latin1.txt", std::string(20000, 'a'));
  const Result checked = run("check " + quoted(sweep));
  CAPTURE(checked.output);
  CHECK(checked.status == 2);
  CHECK(checked.output.find("gone.txt: no such file") != std::string::npos);
  CHECK(checked.output.find("in sweep point") != std::string::npos);
  CHECK(run("run " + quoted(sweep) + " --out " + quoted(dir / "runs")).status == 2);
  CHECK(!fs::exists(dir / "runs"));
}

TEST_CASE("moelab check: a model the trainer does not train is refused as run refuses it") {
  const Result r = run("check " MOELAB_SOURCE_DIR "/recipes/published/switch_base_8.toml");
  CAPTURE(r.output);
  CHECK(r.status == 2);
  CHECK(r.output.find("error: model.architecture: moelab trains decoder-only language models") != std::string::npos);
}

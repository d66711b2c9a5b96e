// The recipe language: extends, --set overrides, ${...} references, [sweep], source locations,
// printing. No plugins are needed here; validation against schemas is test_config.cpp.
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>

#include "moelab/recipe.hpp"

namespace fs = std::filesystem;
using moelab::Diagnostic;
using moelab::Diagnostics;
using moelab::LoadOptions;
using moelab::Recipe;
using moelab::UsageError;

namespace {

// A fresh folder per test, removed afterwards; files are written relative to it.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    root_ = fs::temp_directory_path() /
            ("moelab_test_recipe_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }
  fs::path write(const std::string& name, const std::string& text) const {
    const fs::path file = root_ / name;
    fs::create_directories(file.parent_path());
    std::ofstream(file) << text;
    return file;
  }
  const fs::path& root() const { return root_; }

 private:
  fs::path root_;
};

// The diagnostics a failing call throws; fails the test when it does not throw.
Diagnostics errors_of(const std::function<void()>& body) {
  try {
    body();
  } catch (const UsageError& e) {
    REQUIRE_MESSAGE(!e.diagnostics().empty(), "UsageError without diagnostics: " << e.what());
    return e.diagnostics();
  }
  FAIL("expected a UsageError");
  return {};
}

const Diagnostic* find_key(const Diagnostics& diagnostics, const std::string& key) {
  for (const auto& d : diagnostics.items())
    if (d.key == key) return &d;
  return nullptr;
}

int64_t int_at(const Recipe& r, const std::string& path) {
  auto v = r.table().at_path(path).value<int64_t>();
  REQUIRE_MESSAGE(v.has_value(), path << " is not an integer in\n" << r.to_toml());
  return *v;
}
std::string string_at(const Recipe& r, const std::string& path) {
  auto v = r.table().at_path(path).value<std::string>();
  REQUIRE_MESSAGE(v.has_value(), path << " is not a string in\n" << r.to_toml());
  return *v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
TEST_CASE("extends: one base, deep merge (tables merge, arrays and values replace)") {
  TempDir dir;
  dir.write("base.toml", R"(
name = "base"
list = [1, 2, 3]
[moe]
num_experts = 8
top_k = 2
[moe.router]
type = "softmax_topk"
jitter_eps = 0.1
)");
  const fs::path child = dir.write("child.toml", R"(
extends = "base.toml"
list = [9]
[moe]
top_k = 1
[moe.router]
temperature = 2.0
)");
  const Recipe r = Recipe::load(child);
  CHECK(string_at(r, "name") == "base");
  CHECK(int_at(r, "moe.num_experts") == 8);
  CHECK(int_at(r, "moe.top_k") == 1);
  CHECK(string_at(r, "moe.router.type") == "softmax_topk");
  CHECK(r.table().at_path("moe.router.jitter_eps").value<double>() == 0.1);
  CHECK(r.table().at_path("moe.router.temperature").value<double>() == 2.0);
  const auto* list = r.table().at_path("list").as_array();
  REQUIRE(list != nullptr);
  CHECK(list->size() == 1);
  CHECK(!r.table().contains("extends"));  // consumed by loading
  REQUIRE(r.sources().size() == 2);
  CHECK(r.sources()[0].filename() == "base.toml");
  CHECK(r.sources()[1].filename() == "child.toml");
}

TEST_CASE("extends: a list merges in order, the recipe itself last") {
  TempDir dir;
  dir.write("a.toml", "x = 1\ny = 1\nz = 1\n[t]\na = 1\n");
  dir.write("b.toml", "y = 2\nz = 2\n[t]\nb = 2\n");
  const fs::path recipe = dir.write("r.toml", "extends = [\"a.toml\", \"b.toml\"]\nz = 3\n");
  const Recipe r = Recipe::load(recipe);
  CHECK(int_at(r, "x") == 1);
  CHECK(int_at(r, "y") == 2);
  CHECK(int_at(r, "z") == 3);
  CHECK(int_at(r, "t.a") == 1);
  CHECK(int_at(r, "t.b") == 2);
  REQUIRE(r.sources().size() == 3);
  CHECK(r.sources()[0].filename() == "a.toml");
  CHECK(r.sources()[1].filename() == "b.toml");
  CHECK(r.sources()[2].filename() == "r.toml");
}

TEST_CASE("extends: nested, each relative path against the file that names it") {
  TempDir dir;
  dir.write("configs/base/root.toml", "depth = 0\nroot_only = true\n");
  dir.write("configs/mid.toml", "extends = \"base/root.toml\"\ndepth = 1\n");
  const fs::path leaf = dir.write("recipes/deep/leaf.toml", "extends = \"../../configs/mid.toml\"\n");
  const Recipe r = Recipe::load(leaf);
  CHECK(int_at(r, "depth") == 1);
  CHECK(r.table().at_path("root_only").value<bool>() == true);
  REQUIRE(r.sources().size() == 3);
  CHECK(r.sources()[0] == (dir.root() / "configs/base/root.toml").lexically_normal());
  // The note names the whole chain, nearest first.
  CHECK(r.note("root_only") == fmt::format("set in {}, extended by {}, extended by {}",
                                           (dir.root() / "configs/base/root.toml").string(),
                                           (dir.root() / "configs/mid.toml").string(), leaf.string()));
  CHECK(r.note("depth") ==
        fmt::format("set in {}, extended by {}", (dir.root() / "configs/mid.toml").string(), leaf.string()));
}

TEST_CASE("extends: the same base reached twice (a diamond) is not a cycle") {
  TempDir dir;
  dir.write("common.toml", "c = 1\n");
  dir.write("left.toml", "extends = \"common.toml\"\nl = 1\n");
  dir.write("right.toml", "extends = \"common.toml\"\nr = 1\n");
  const Recipe r = Recipe::load(dir.write("top.toml", "extends = [\"left.toml\", \"right.toml\"]\n"));
  CHECK(int_at(r, "c") == 1);
  CHECK(int_at(r, "l") == 1);
  CHECK(int_at(r, "r") == 1);
}

TEST_CASE("extends: cycles are errors naming the chain, at the extends entry that closes them") {
  TempDir dir;
  dir.write("a.toml", "extends = \"b.toml\"\n");
  const fs::path b = dir.write("b.toml", "x = 1\nextends = [\"c.toml\", \"a.toml\"]\n");
  dir.write("c.toml", "y = 1\n");
  const Diagnostics errors = errors_of([&] { Recipe::load(dir.root() / "a.toml"); });
  REQUIRE(errors.size() == 1);
  const Diagnostic& d = errors.items()[0];
  CHECK(d.key == "extends[1]");
  CHECK(d.where.file == b.string());
  CHECK(d.where.line == 2);
  CHECK(d.where.column == 22);
  CHECK(d.message.find("a.toml -> " + b.string() + " -> " + (dir.root() / "a.toml").string()) != std::string::npos);

  SUBCASE("a file extending itself") {
    const fs::path self = dir.write("self.toml", "extends = \"self.toml\"\n");
    const Diagnostics self_errors = errors_of([&] { Recipe::load(self); });
    CHECK(self_errors.items()[0].message.find("extends cycle") != std::string::npos);
    CHECK(self_errors.items()[0].where.line == 1);
    CHECK(self_errors.items()[0].where.column == 11);
  }
}

TEST_CASE("extends: a missing file is an error at the extends line; a bad extends value too") {
  TempDir dir;
  const fs::path r = dir.write("r.toml", "# comment\nextends = [\"ok.toml\", \"missing.toml\"]\n");
  dir.write("ok.toml", "a = 1\n");
  const Diagnostics errors = errors_of([&] { Recipe::load(r); });
  REQUIRE(errors.size() == 1);
  CHECK(errors.items()[0].where.str() == r.string() + ":2:23");
  CHECK(errors.items()[0].key == "extends[1]");
  CHECK(errors.items()[0].message.find("missing.toml") != std::string::npos);

  const Diagnostics typed = errors_of([&] { Recipe::parse("extends = 3\n", dir.root() / "t.toml"); });
  CHECK(typed.items()[0].key == "extends");
  CHECK(typed.items()[0].message.find("expected a file path") != std::string::npos);

  const Diagnostics unreadable = errors_of([&] { Recipe::load(dir.root() / "nope.toml"); });
  CHECK(unreadable.items()[0].where.file == (dir.root() / "nope.toml").string());
  CHECK(unreadable.items()[0].message.find("cannot read recipe") != std::string::npos);
}

TEST_CASE("extends: only regular .toml files of bounded size are read, and the error names the extends line") {
  TempDir dir;
  for (const char* target : {"/dev/zero", "/etc/passwd", "/dev/stdin"}) {
    const Diagnostics errors =
        errors_of([&] { Recipe::parse(fmt::format("extends = \"{}\"\n", target), dir.root() / "r.toml"); });
    REQUIRE(errors.size() == 1);
    CHECK(errors.items()[0].key == "extends");
    CHECK(errors.items()[0].where.str() == (dir.root() / "r.toml").string() + ":1:11");
    CHECK(errors.items()[0].message.find("not a .toml file") != std::string::npos);
  }
  // A name ending in .toml that is a device or a FIFO is not read either.
  const fs::path fifo = dir.root() / "fifo.toml";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  const Diagnostics fifo_errors = errors_of([&] { Recipe::parse("extends = \"fifo.toml\"\n", dir.root() / "r.toml"); });
  CHECK(fifo_errors.items()[0].message.find("not a regular file") != std::string::npos);
  const fs::path link = dir.root() / "zero.toml";
  fs::create_symlink("/dev/zero", link);
  const Diagnostics link_errors = errors_of([&] { Recipe::parse("extends = \"zero.toml\"\n", dir.root() / "r.toml"); });
  CHECK(link_errors.items()[0].message.find("not a regular file") != std::string::npos);
  // Past the size limit: refused by its size, not read.
  const fs::path big = dir.root() / "big.toml";
  { std::ofstream(big) << std::string(5u << 20, '#'); }
  const Diagnostics big_errors = errors_of([&] { Recipe::parse("extends = \"big.toml\"\n", dir.root() / "r.toml"); });
  CHECK(big_errors.items()[0].message.find("at most 4 MiB") != std::string::npos);
}

TEST_CASE("nesting: a dotted key thousands of levels deep is an error, not a stack overflow") {
  TempDir dir;
  std::string deep = "a";
  for (int i = 0; i < 30000; ++i) deep += ".a";
  const fs::path r = dir.write("deep.toml", "x = 1\n" + deep + " = 1\n");
  const Diagnostics errors = errors_of([&] { Recipe::load(r); });
  REQUIRE(errors.size() == 1);
  CHECK(errors.items()[0].where.file == r.string());
  CHECK(errors.items()[0].where.line == 2);
  CHECK(errors.items()[0].message.find("nested more than 64 deep") != std::string::npos);
  // Arrays count too; 64 levels of tables are still fine.
  std::string ok = "a";
  for (int i = 0; i < 62; ++i) ok += ".a";
  CHECK_NOTHROW(Recipe::parse(ok + " = 1\n", dir.root() / "ok.toml"));
  // An override's key is bounded too.
  const Diagnostics set =
      errors_of([&] { Recipe::parse("", dir.root() / "s.toml", LoadOptions{{deep.substr(0, 401) + "=1"}}); });
  CHECK(set.items()[0].message.find("more than 32 parts") != std::string::npos);
}

TEST_CASE("malformed TOML: file:line:column from the parser, in every file of the chain") {
  TempDir dir;
  dir.write("bad_base.toml", "ok = 1\n[moe\n");
  const fs::path r = dir.write("r.toml", "extends = \"bad_base.toml\"\nx = [1, 2\n");
  const Diagnostics errors = errors_of([&] { Recipe::load(r); });
  // The recipe's own syntax error stops it from being read at all, so only its error shows.
  REQUIRE(errors.size() == 1);
  CHECK(errors.items()[0].where.file == r.string());
  CHECK(errors.items()[0].where.line == 2);  // the unclosed array
  CHECK(errors.items()[0].message.find("malformed TOML") != std::string::npos);

  const fs::path good = dir.write("good.toml", "extends = \"bad_base.toml\"\n");
  const Diagnostics base_errors = errors_of([&] { Recipe::load(good); });
  REQUIRE(base_errors.size() == 1);
  CHECK(base_errors.items()[0].where.str() == (dir.root() / "bad_base.toml").string() + ":2:5");
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("overrides: values are TOML, bare words are strings, new keys are allowed") {
  TempDir dir;
  const fs::path file =
      dir.write("r.toml", "[moe]\ntop_k = 2\n[moe.router]\ntype = \"softmax_topk\"\njitter_eps = 0.1\n");
  LoadOptions options;
  options.overrides = {
      "moe.top_k=4",
      "moe.capacity_factor = 1.5",
      "train.use_bias=true",
      "moe.router.type=softmax_topk",  // bare word -> string; the same plugin, so its table is kept
      "output.dir=runs/exp-1",         // a path is a bare word too
      "name=\"quoted name\"",
      "moe.list=[1, 2, 3]",
      "moe.experts={type = \"glu\", d_ff = 64}",
      "\"odd key\".x = 1",
  };
  const Recipe r = Recipe::load(file, options);
  CHECK(int_at(r, "moe.top_k") == 4);
  CHECK(r.table().at_path("moe.capacity_factor").value<double>() == 1.5);
  CHECK(r.table().at_path("train.use_bias").value<bool>() == true);
  CHECK(string_at(r, "moe.router.type") == "softmax_topk");
  CHECK(r.table().at_path("moe.router.jitter_eps").value<double>() == 0.1);  // the table keeps its other keys
  CHECK(string_at(r, "output.dir") == "runs/exp-1");
  CHECK(string_at(r, "name") == "quoted name");
  CHECK(r.table().at_path("moe.list").as_array()->size() == 3);
  CHECK(string_at(r, "moe.experts.type") == "glu");
  CHECK(int_at(r, "moe.experts.d_ff") == 64);
  CHECK(r.table()["odd key"]["x"].value<int64_t>() == 1);

  // An override's place is the pseudo-file naming it.
  CHECK(r.where("moe.top_k").str() == "<--set moe.top_k=4>");
  CHECK(r.where("moe.experts.d_ff").str() == "<--set moe.experts={type = \"glu\", d_ff = 64}>");
  CHECK(r.note("moe.top_k").empty());
  // Untouched values keep their file position.
  CHECK(r.where("moe.router.jitter_eps").str() == file.string() + ":5:14");
}

TEST_CASE("overrides: a later override wins; an inline table replaces the table") {
  LoadOptions options;
  options.overrides = {"a.b=1", "a.b=2", "t={y = 2}"};
  const Recipe r = Recipe::parse("[t]\nx = 1\n", "mem.toml", options);
  CHECK(int_at(r, "a.b") == 2);
  CHECK(!r.table().at_path("t.x"));
  CHECK(int_at(r, "t.y") == 2);
}

TEST_CASE("overrides: an element of an array of tables, by index") {
  LoadOptions options;
  options.overrides = {"moe.balancers[1].coef=0.5"};
  const Recipe r = Recipe::parse("[[moe.balancers]]\ntype = \"a\"\n[[moe.balancers]]\ntype = \"b\"\ncoef = 0.1\n",
                                 "mem.toml", options);
  CHECK(r.table().at_path("moe.balancers[1].coef").value<double>() == 0.5);
  CHECK(r.where("moe.balancers[1].coef").str() == "<--set moe.balancers[1].coef=0.5>");
  CHECK(r.where("moe.balancers[1].type").str() == "mem.toml:4:8");

  options.overrides = {"moe.balancers[2].coef=0.5"};
  const Diagnostics errors =
      errors_of([&] { Recipe::parse("[[moe.balancers]]\ntype = \"a\"\n", "mem.toml", options); });
  CHECK(errors.items()[0].message == "cannot set 'moe.balancers[2].coef': 'moe.balancers' has 1 elements, no index 2");
}

TEST_CASE("overrides: unparsable values, bad keys and keys through values are errors naming the override") {
  LoadOptions options;
  options.overrides = {"moe.top_k=[1, 2",    "no_equals_sign",         "a..b=1",     "x.y=\"unterminated",
                       "moe.top_k.deeper=1", "extends=\"other.toml\"", "s=two words"};
  const Diagnostics errors = errors_of([&] { Recipe::parse("[moe]\ntop_k = 2\n", "mem.toml", options); });
  REQUIRE(errors.size() == 7);
  CHECK(errors.items()[0].where.file == "<--set moe.top_k=[1, 2>");
  CHECK(errors.items()[0].key == "moe.top_k");
  CHECK(errors.items()[0].message.find("cannot parse '[1, 2' as a TOML value") != std::string::npos);
  CHECK(errors.items()[1].where.file == "<--set no_equals_sign>");
  CHECK(errors.items()[1].message == "expected KEY=VALUE");
  CHECK(errors.items()[2].message.find("not a dotted key") != std::string::npos);
  CHECK(errors.items()[3].where.file == "<--set x.y=\"unterminated>");
  CHECK(errors.items()[4].message.find("'moe.top_k' is an integer, not a table") != std::string::npos);
  CHECK(errors.items()[5].key == "extends");
  CHECK(errors.items()[6].key == "s");  // spaces make it not a bare word
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("references: exact ones keep the type, longer strings interpolate, $${ is literal") {
  const Recipe r = Recipe::parse(R"(
name = "exp"
[moe]
num_experts = 8
top_k = "${moe.half}"
half = 4
ratio = 0.5
gated = true
list = [1, 2]
[copy]
experts = "${moe.num_experts}"
ratio = "${moe.ratio}"
gated = "${moe.gated}"
list = "${moe.list}"
table = "${moe}"
label = "${name}-e${moe.num_experts}-r${moe.ratio}-${moe.gated} ${moe.list}"
literal = "cost: $${name} and ${name}"
dollar = "a $ b $$ c"
)",
                                 "mem.toml");
  CHECK(int_at(r, "moe.top_k") == 4);  // a reference to a plain value
  CHECK(int_at(r, "copy.experts") == 8);
  CHECK(r.table().at_path("copy.ratio").value<double>() == 0.5);
  CHECK(r.table().at_path("copy.gated").value<bool>() == true);
  CHECK(r.table().at_path("copy.list").as_array()->size() == 2);
  // A whole table, itself resolved (its top_k was a reference).
  CHECK(int_at(r, "copy.table.top_k") == 4);
  CHECK(int_at(r, "copy.table.num_experts") == 8);
  CHECK(string_at(r, "copy.label") == "exp-e8-r0.5-true [1, 2]");
  CHECK(string_at(r, "copy.literal") == "cost: ${name} and exp");
  CHECK(string_at(r, "copy.dollar") == "a $ b $$ c");
  // A copied table's values point where they were written.
  CHECK(r.where("copy.table.num_experts").line == 4);
  CHECK(r.where("copy.table").line == 15);
}

TEST_CASE("references: chains resolve, through arrays and through other references") {
  const Recipe r = Recipe::parse(R"(
a = "${b}"
b = "${c.d}"
c = { d = 3 }
e = "${alias.d}"
alias = "${c}"
arr = [10, 20]
f = "${arr[1]}"
)",
                                 "mem.toml");
  CHECK(int_at(r, "a") == 3);
  CHECK(int_at(r, "b") == 3);
  CHECK(int_at(r, "e") == 3);
  CHECK(int_at(r, "f") == 20);
}

TEST_CASE("references: resolved after merging and overrides") {
  TempDir dir;
  dir.write("base.toml", "[train]\nsteps = 100\nlog_every = \"${train.steps}\"\n");
  const fs::path r = dir.write("r.toml", "extends = \"base.toml\"\n[train]\nsteps = 300\n");
  CHECK(int_at(Recipe::load(r), "train.log_every") == 300);
  CHECK(int_at(Recipe::load(r, LoadOptions{{"train.steps=7"}}), "train.log_every") == 7);
}

TEST_CASE("references: unknown keys and cycles are errors at the referencing value") {
  const Diagnostics errors = errors_of([] {
    Recipe::parse(R"(
[moe]
num_experts = 8
top_k = "${moe.num_expert}"
[train]
steps = "${train.log_every}"
log_every = "${train.eval_every}"
eval_every = "${train.steps}"
note = "x ${unterminated"
bad = "${a..b}"
table_in_string = "x ${ok}"
[ok]
a = 1
)",
                  "mem.toml");
  });
  REQUIRE(errors.size() == 5);
  const Diagnostic* unknown = find_key(errors, "moe.top_k");
  REQUIRE(unknown != nullptr);
  CHECK(unknown->where.str() == "mem.toml:4:9");
  CHECK(unknown->message.find("no key 'moe.num_expert'") != std::string::npos);
  CHECK(unknown->hint == "did you mean 'moe.num_experts'?");

  // One error per cycle, naming every step of it.
  int cycles = 0;
  for (const auto& d : errors.items()) {
    if (d.message.find("reference cycle") == std::string::npos) continue;
    ++cycles;
    // Keys resolve in sorted order: eval_every -> steps -> log_every, which closes the cycle.
    CHECK(d.key == "train.log_every");
    CHECK(d.where.str() == "mem.toml:7:13");
    CHECK(d.message == "reference cycle: train.eval_every -> train.steps -> train.log_every -> train.eval_every");
  }
  CHECK(cycles == 1);
  CHECK(find_key(errors, "train.note")->message.find("unterminated") != std::string::npos);
  CHECK(find_key(errors, "train.bad")->message.find("invalid reference") != std::string::npos);
  CHECK(find_key(errors, "train.table_in_string")->message.find("is a table") != std::string::npos);
}

TEST_CASE("references: a value referring to its own table is a cycle") {
  const Diagnostics errors = errors_of([] { Recipe::parse("[t]\nself = \"${t}\"\n", "mem.toml"); });
  REQUIRE(errors.size() == 1);
  CHECK(errors.items()[0].message == "reference cycle: t -> t.self -> t");
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("sweep: the cartesian product, first key slowest, with labels, values and unique slugs") {
  TempDir dir;
  dir.write("base.toml", "[moe]\ntop_k = 2\n[train]\nlr = 1e-3\n");
  const fs::path file = dir.write("s.toml", R"(
extends = "base.toml"
name = "k${moe.top_k}"
[sweep]
moe.top_k = [1, 2]
"train.lr" = [0.001, 0.01, 0.1]
moe.router.type = ["softmax_topk", "noisy topk"]
)");
  const Recipe r = Recipe::load(file);
  CHECK(r.table().contains("sweep"));  // kept until expanded
  CHECK(string_at(r, "name") == "k2");
  const auto points = r.expand_sweep();
  REQUIRE(points.size() == 12);
  CHECK(points[0].label == "moe.top_k=1,train.lr=0.001,moe.router.type=\"softmax_topk\"");
  CHECK(points[1].label == "moe.top_k=1,train.lr=0.001,moe.router.type=\"noisy topk\"");
  CHECK(points[2].label == "moe.top_k=1,train.lr=0.01,moe.router.type=\"softmax_topk\"");
  CHECK(points[11].label == "moe.top_k=2,train.lr=0.1,moe.router.type=\"noisy topk\"");
  CHECK(points[0].slug == "top_k-1_lr-0.001_type-softmax_topk");
  CHECK(points[1].slug == "top_k-1_lr-0.001_type-noisy-topk");
  REQUIRE(points[5].values.size() == 3);
  CHECK(points[5].values[0] == std::pair<std::string, std::string>{"moe.top_k", "1"});
  CHECK(points[5].values[1] == std::pair<std::string, std::string>{"train.lr", "0.1"});

  std::set<std::string> slugs;
  for (const auto& p : points) {
    slugs.insert(p.slug);
    for (char c : p.slug)
      CHECK((std::isalnum(static_cast<unsigned char>(c)) || std::string("._+-").find(c) != std::string::npos));
    CHECK(!p.recipe->table().contains("sweep"));
  }
  CHECK(slugs.size() == points.size());

  // References are resolved again for each point.
  CHECK(string_at(*points[0].recipe, "name") == "k1");
  CHECK(string_at(*points[11].recipe, "name") == "k2");
  CHECK(int_at(*points[11].recipe, "moe.top_k") == 2);
  CHECK(points[4].recipe->table().at_path("train.lr").value<double>() == 0.1);
  // A swept value's place is its element in [sweep].
  CHECK(points[1].recipe->where("moe.router.type").str() == file.string() + ":7:36");
}

TEST_CASE("sweep: slugs tell apart keys with the same leaf name, and clashing values") {
  const Recipe r = Recipe::parse(R"(
[sweep]
moe.router.type = ["a", "b"]
moe.experts.type = ["x/y", "x y"]
)",
                                 "mem.toml");
  const auto points = r.expand_sweep();
  REQUIRE(points.size() == 4);
  CHECK(points[0].slug == "router.type-a_experts.type-x-y");
  CHECK(points[1].slug == "router.type-a_experts.type-x-y_2");
  std::set<std::string> slugs;
  for (const auto& p : points) slugs.insert(p.slug);
  CHECK(slugs.size() == 4);
}

TEST_CASE("sweep: a reference to a key that only the sweep sets resolves per point") {
  const Recipe r = Recipe::parse("name = \"d${model.d_model}\"\n[sweep]\nmodel.d_model = [32, 64]\n", "mem.toml");
  CHECK(string_at(r, "name") == "d${model.d_model}");  // not resolvable until a point sets it
  const auto points = r.expand_sweep();
  REQUIRE(points.size() == 2);
  CHECK(string_at(*points[0].recipe, "name") == "d32");
  CHECK(string_at(*points[1].recipe, "name") == "d64");
}

TEST_CASE("sweep: an absurdly large product is refused before anything is built") {
  std::string text = "[sweep]\n";
  for (const char* key : {"a", "b", "c", "d", "e"}) text += std::string(key) + " = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n";
  const Recipe r = Recipe::parse(text, "mem.toml");
  const Diagnostics errors = errors_of([&] { r.expand_sweep(); });
  CHECK(errors.items()[0].key == "sweep");
  CHECK(errors.items()[0].message.find("more than 10000 runs: a (10) x b (10)") != std::string::npos);
}

TEST_CASE("sweep: no [sweep] gives one point with an empty label") {
  const Recipe r = Recipe::parse("a = 1\n", "mem.toml");
  const auto points = r.expand_sweep();
  REQUIRE(points.size() == 1);
  CHECK(points[0].label.empty());
  CHECK(points[0].slug.empty());
  CHECK(int_at(*points[0].recipe, "a") == 1);
}

TEST_CASE("sweep: values must be non-empty arrays; keys must lead through tables") {
  const Diagnostics errors =
      errors_of([] { Recipe::parse("[sweep]\nmoe.top_k = []\ntrain.steps = 100\n", "mem.toml"); });
  REQUIRE(errors.size() == 2);
  CHECK(errors.items()[0].key == "sweep.moe.top_k");
  CHECK(errors.items()[0].where.str() == "mem.toml:2:13");
  CHECK(errors.items()[1].key == "sweep.train.steps");
  CHECK(errors.items()[1].message.find("expected an array") != std::string::npos);

  const Recipe through_value = Recipe::parse("[moe]\ntop_k = 2\n[sweep]\n\"moe.top_k.x\" = [1]\n", "mem.toml");
  const Diagnostics point_errors = errors_of([&] { through_value.expand_sweep(); });
  CHECK(point_errors.items()[0].message.find("'moe.top_k' is an integer, not a table") != std::string::npos);
  CHECK(point_errors.items()[0].where.str() == "mem.toml:4:17");
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("where(): value and key positions, notes for inherited values, unknown for absent keys") {
  TempDir dir;
  const fs::path base =
      dir.write("configs/base.toml", "[moe]\nnum_experts = 16\n\n[[moe.balancers]]\ntype = \"z_loss\"\n");
  const fs::path r = dir.write("recipes/x.toml", "extends = \"../configs/base.toml\"\n[moe]\n  top_k   = 4\n");
  const Recipe recipe = Recipe::load(r);
  CHECK(recipe.where("moe.top_k").str() == r.string() + ":3:13");
  CHECK(recipe.where_key("moe.top_k").str() == r.string() + ":3:3");
  CHECK(recipe.note("moe.top_k").empty());
  const std::string base_name = (dir.root() / "recipes/../configs/base.toml").lexically_normal().string();
  CHECK(recipe.where("moe.num_experts").str() == base_name + ":2:15");
  CHECK(recipe.note("moe.num_experts") == "set in " + base_name + ", extended by " + r.string());
  CHECK(recipe.where("moe.balancers[0].type").str() == base_name + ":5:8");
  CHECK(recipe.where("moe").line == 2);  // the recipe's own [moe] header: the later file
  CHECK(!recipe.where("moe.capacity_factor").known());
  CHECK(!recipe.where("not.a.key").known());
}

TEST_CASE("to_toml: the printed recipe parses back to the same table") {
  const Recipe r = Recipe::parse(R"(
name = "round trip"
description = "a literal $${x} and ${name}"
seed = 3
ratio = 1e-3
big = 1e300
flags = [true, false]
"odd key" = "quote \" and backslash \\ and newline \n"
"key\twith \"tab\"" = 2
[moe]
num_experts = 8
[moe.router]
type = "softmax_topk"
[[moe.balancers]]
type = "switch_aux"
coef = 0.01
[[moe.balancers]]
type = "z_loss"
[sweep]
moe.top_k = [1, 2]
)",
                                 "mem.toml");
  const std::string text = r.to_toml();
  const Recipe again = Recipe::parse(text, "again.toml");
  CHECK(again.table() == r.table());
  CHECK(again.to_toml() == text);
  CHECK(string_at(again, "description") == "a literal ${x} and round trip");
  // toml++ itself reads the text (escape included) the same way.
  const toml::table raw = toml::parse(text);
  CHECK(raw.at_path("description").value<std::string>() == "a literal $${x} and round trip");
  CHECK(raw.at_path("big").value<double>() == 1e300);
  // A key that needs quoting is spelt as TOML spells it, escapes included.
  CHECK(r.where("\"key\\twith \\\"tab\\\"\"").str() == "mem.toml:9:23");
}

TEST_CASE("copies are independent and keep their places") {
  const Recipe original = Recipe::parse("a = 1\n[t]\nb = 2\n", "mem.toml");
  Recipe copy = original;
  copy.table().insert_or_assign("a", 5);
  CHECK(int_at(original, "a") == 1);
  CHECK(int_at(copy, "a") == 5);
  CHECK(copy.where("t.b").str() == "mem.toml:3:5");
  Recipe assigned = Recipe::parse("z = 0\n", "other.toml");
  assigned = original;
  CHECK(assigned.where("t.b").str() == "mem.toml:3:5");
  CHECK(assigned.path() == "mem.toml");
}

TEST_CASE("a later file or --set naming another plugin replaces the plugin table instead of merging it") {
  const fs::path dir = fs::temp_directory_path() / ("moelab-plugin-switch-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "base.toml") << "[moe.router]\ntype = \"softmax_topk\"\nrenormalize = true\njitter_eps = 0.1\n";
  std::ofstream(dir / "same.toml")
      << "extends = \"base.toml\"\n[moe.router]\ntype = \"softmax_topk\"\ntemperature = 2.0\n";
  std::ofstream(dir / "other.toml") << "extends = \"base.toml\"\n[moe.router]\ntype = \"hash\"\nmode = \"random\"\n";
  // The same plugin merges key by key.
  const moelab::Recipe same = moelab::Recipe::load(dir / "same.toml");
  CHECK(same.table().at_path("moe.router.renormalize").value<bool>() == true);
  CHECK(same.table().at_path("moe.router.temperature").value<double>() == 2.0);
  // Another plugin starts from its own table.
  const moelab::Recipe other = moelab::Recipe::load(dir / "other.toml");
  CHECK(!other.table().at_path("moe.router.renormalize"));
  CHECK(other.table().at_path("moe.router.mode").value<std::string>() == "random");
  // --set does the same, and later --set options apply to the new plugin.
  const moelab::Recipe set =
      moelab::Recipe::load(dir / "base.toml", moelab::LoadOptions{{"moe.router.type=hash", "moe.router.seed=3"}});
  CHECK(!set.table().at_path("moe.router.jitter_eps"));
  CHECK(set.table().at_path("moe.router.seed").value<int64_t>() == 3);
  CHECK(set.where("moe.router.type").file == "<--set moe.router.type=hash>");
  // Setting the same type keeps the parameters.
  const moelab::Recipe kept =
      moelab::Recipe::load(dir / "base.toml", moelab::LoadOptions{{"moe.router.type=softmax_topk"}});
  CHECK(kept.table().at_path("moe.router.jitter_eps").value<double>() == doctest::Approx(0.1));
  fs::remove_all(dir);
}

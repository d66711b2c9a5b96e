// Recipes: TOML files with inheritance (`extends`), command-line overrides (`--set a.b=V`),
// references (`${a.b}`) and sweeps (`[sweep]`). Loading gives one merged, resolved document that
// remembers where every value came from, so that validation can point at file:line:column.
//
//   extends = "base.toml"            # or a list; paths relative to this file; tables merge key by
//                                    # key, anything else (arrays too) is replaced; later wins
//   name = "k${moe.top_k}"           # a reference inside a string: interpolated ("k2")
//   [train]
//   log_every = "${train.steps}"     # exactly one reference: the value itself, with its type
//   note = "costs $${x}"             # $${ is a literal ${
//   [sweep]                          # one run per combination, the first key varying slowest
//   moe.top_k = [1, 2]
//   "train.lr" = [1e-3, 3e-3]        # a quoted dotted key works as a nested one
//
// Order: extends are merged, then overrides applied, then references resolved (again for each
// sweep point, so a reference to a swept key sees that point's value).
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moelab/error.hpp"

namespace toml {
inline namespace v3 {
class node;
class table;
}  // namespace v3
}  // namespace toml

namespace moelab {

struct LoadOptions {
  // "a.b.c=VALUE", applied in order after merging, each replacing the value at its key. VALUE is
  // parsed as TOML (4, 1e-3, true, "s", [1, 2], {type = "x"}); a bare word that is not valid TOML
  // (noisy_topk, runs/exp1) is taken as a string. Such a value's location is "<--set a.b.c=VALUE>".
  std::vector<std::string> overrides;
};

// The TOML text of one value as written after '=': 2, 0.1 (the shortest text that reads back
// to the same double), "silu", [1, 2], { type = "glu" }.
std::string toml_value_text(const toml::node& value);

class Recipe {
 public:
  // Reads `file`, merges everything it extends (depth first, later files and the recipe itself
  // overriding earlier ones; relative paths resolve against the naming file; cycles are an
  // error), applies overrides, then resolves ${...} references. The [sweep] table is kept, not
  // expanded. Throws UsageError carrying every problem found.
  static Recipe load(const std::filesystem::path& file, const LoadOptions& options = {});
  // The same from text (tests); `name` stands for the file in messages and resolves relative paths.
  static Recipe parse(const std::string& text, const std::filesystem::path& name, const LoadOptions& options = {});

  Recipe(const Recipe&);
  Recipe& operator=(const Recipe&);
  Recipe(Recipe&&) noexcept;
  Recipe& operator=(Recipe&&) noexcept;
  ~Recipe();

  const std::filesystem::path& path() const { return path_; }
  toml::table& table() { return *table_; }
  const toml::table& table() const { return *table_; }

  // Where a dotted key's value was set (the file that set it, after merging); unknown if absent.
  // Keys are written as in the recipe: "moe.top_k", "moe.balancers[1].type", 'sweep."train.lr"'.
  SourceLocation where(const std::string& dotted_key) const;
  // Where the key itself was written (for "unknown key" errors); unknown if absent.
  SourceLocation where_key(const std::string& dotted_key) const;
  // For a value that came through `extends`: "set in configs/base.toml, extended by recipes/x.toml";
  // empty for values set by the recipe itself or by an override.
  std::string note(const std::string& dotted_key) const;

  // Dotted-key spelling shared by messages and where(): key_path("moe", "top_k") is "moe.top_k",
  // a key that is not a bare TOML key is quoted; index_path("moe.balancers", 1) is "moe.balancers[1]".
  static std::string key_path(const std::string& prefix, const std::string& key);
  static std::string index_path(const std::string& prefix, size_t index);

  // The files merged into this recipe, in merge order (the recipe itself last).
  const std::vector<std::filesystem::path>& sources() const { return sources_; }

  // The resolved recipe as TOML text (what `moelab show` prints and a run saves). Keys are in
  // sorted order; a literal "${" in a string is written back as "$${", so the text loads again
  // into the same recipe.
  std::string to_toml() const;

  // One run of a sweep: the recipe with the sweep's values applied and [sweep] removed.
  struct SweepPoint {
    std::string label;  // "moe.top_k=2,moe.capacity_factor=1.25", safe as a folder name once slugged
    std::string slug;   // "top_k-2_capacity_factor-1.25": the run folder's name
    std::vector<std::pair<std::string, std::string>> values;  // (dotted key, TOML value text)
    std::shared_ptr<Recipe> recipe;
  };
  // The cartesian product of every list in [sweep] (dotted keys, nested or quoted), in the order
  // the keys appear (the first key varies slowest); a recipe without [sweep] gives one point with
  // an empty label and slug. Each point's value replaces the key's value, then ${...} references
  // are resolved again, so a reference to a swept key sees that point's value. Throws UsageError.
  std::vector<SweepPoint> expand_sweep() const;

  // Where a value came from: its position, the key's position, and the files that extended the
  // file that set it (nearest first), for Diagnostic::note.
  struct Origin {
    SourceLocation value, key;
    std::vector<std::string> extended_by;
  };

 private:
  Recipe();
  std::filesystem::path path_;
  std::unique_ptr<toml::table> table_;       // merged, overridden, references resolved
  std::unique_ptr<toml::table> unresolved_;  // merged and overridden; sweep points resolve from it
  std::vector<std::filesystem::path> sources_;
  std::map<std::string, Origin> origins_;  // by dotted key (key_path/index_path spelling)
  friend struct RecipeLoader;
};

}  // namespace moelab

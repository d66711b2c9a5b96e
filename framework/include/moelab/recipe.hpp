// Recipes: TOML files with inheritance (`extends`), command-line overrides (`--set a.b=V`),
// references (`${a.b}`) and sweeps (`[sweep]`). Loading gives one merged, resolved document that
// remembers where every value came from, so that validation can point at file:line:column.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "moelab/error.hpp"

namespace toml {
inline namespace v3 {
class table;
}
}  // namespace toml

namespace moelab {

struct LoadOptions {
  std::vector<std::string> overrides;  // "a.b.c=VALUE", VALUE parsed as TOML, applied in order
};

class Recipe {
 public:
  // Reads `file`, merges everything it extends (depth first, later files and the recipe itself
  // overriding earlier ones; relative paths resolve against the naming file; cycles are an
  // error), applies overrides, then resolves ${...} references. The [sweep] table is kept, not
  // expanded. Throws UsageError carrying every problem found.
  static Recipe load(const std::filesystem::path& file, const LoadOptions& options = {});
  // The same from text (tests); `name` stands for the file in messages and resolves relative paths.
  static Recipe parse(const std::string& text, const std::filesystem::path& name,
                      const LoadOptions& options = {});

  Recipe(const Recipe&);
  Recipe& operator=(const Recipe&);
  Recipe(Recipe&&) noexcept;
  Recipe& operator=(Recipe&&) noexcept;
  ~Recipe();

  const std::filesystem::path& path() const { return path_; }
  toml::table& table() { return *table_; }
  const toml::table& table() const { return *table_; }

  // Where a dotted key's value was set (the file that set it, after merging); unknown if absent.
  SourceLocation where(const std::string& dotted_key) const;
  // The files merged into this recipe, in merge order (the recipe itself last).
  const std::vector<std::filesystem::path>& sources() const { return sources_; }

  // The resolved recipe as TOML text (what `moelab show` prints and a run saves).
  std::string to_toml() const;

  // One run of a sweep: the recipe with the sweep's values applied and [sweep] removed.
  struct SweepPoint {
    std::string label;  // "moe.top_k=2,moe.capacity_factor=1.25", safe as a folder name once slugged
    std::string slug;   // "top_k-2_capacity_factor-1.25": the run folder's name
    std::vector<std::pair<std::string, std::string>> values;  // (dotted key, TOML value text)
    std::shared_ptr<Recipe> recipe;
  };
  // The cartesian product of every list in [sweep] (dotted keys, nested or quoted), in the order
  // the keys appear; a recipe without [sweep] gives one point with an empty label.
  std::vector<SweepPoint> expand_sweep() const;

 private:
  Recipe();
  std::filesystem::path path_;
  std::unique_ptr<toml::table> table_;
  std::vector<std::filesystem::path> sources_;
  friend struct RecipeLoader;
};

}  // namespace moelab

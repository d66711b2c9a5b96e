// moelab reshard: converts an unfinished run's checkpoint to another split of its experts.
#include <fmt/format.h>

#include <cstdio>
#include <filesystem>

#include "cli_util.hpp"
#include "moelab/experiment.hpp"

namespace moelab::cli {

int cmd_reshard(const Args& args) {
  const ArgSpec spec{"moelab reshard RUN_DIR --expert N",
                     "Converts the checkpoint of the unfinished run in RUN_DIR to its routed experts split over N\n"
                     "ranks (N = 1: one process), weights and AdamW moments alike, and sets the run's recipe.toml\n"
                     "to parallel.expert = N (parallel.data = 0: as many replicas as the ranks started allow), so\n"
                     "that it resumes on the new layout:\n"
                     "  moelab reshard runs/x --expert 2 && mpirun -np 2 moelab run --resume runs/x\n"
                     "The new files are written beside the old ones and committed by checkpoint.safetensors,\n"
                     "renamed into place last: an interrupted reshard leaves the old checkpoint usable.",
                     {{"--expert", "ranks to split the experts over (a divisor of the layer's experts)"}},
                     {},
                     1,
                     1};
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  if (!parsed.option("--expert")) throw UsageError("missing --expert N; see moelab reshard --help");
  const int64_t expert = integer_option(parsed, "--expert", 1, 1);
  const std::filesystem::path dir(parsed.positional[0]);
  if (!std::filesystem::is_directory(dir)) throw UsageError(fmt::format("{} is not a run folder", dir.string()));
  if (std::filesystem::exists(dir / "summary.json"))
    throw UsageError(
        fmt::format("the run in {} has finished (summary.json is there); there is nothing to resume", dir.string()));
  const ReshardResult r = reshard_run(dir, expert);
  std::printf(
      "%s: checkpoint of step %lld resharded from %lld to %lld expert rank%s (%zu per-expert tensors); "
      "resume with: %smoelab run --resume %s\n",
      dir.string().c_str(), static_cast<long long>(r.step), static_cast<long long>(r.from),
      static_cast<long long>(r.to), r.to == 1 ? "" : "s", r.tensors_split,
      r.to == 1 ? "" : fmt::format("mpirun -np {} ", r.to).c_str(), dir.string().c_str());
  return kExitOk;
}

}  // namespace moelab::cli

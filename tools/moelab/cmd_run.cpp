// moelab run: validate every run of a recipe (sweeps expand to several), then train each into its
// own run folder, with a progress bar on a terminal and plain lines otherwise.
#include <fmt/format.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>

#include "cli_parallel.hpp"
#include "cli_util.hpp"
#include "moelab/config.hpp"
#include "moelab/experiment.hpp"
#include "moelab/parallel.hpp"
#include "moelab/recipe.hpp"
#include "moelab/registry.hpp"
#include "moelab/run_check.hpp"

namespace moelab::cli {
namespace {

namespace fs = std::filesystem;

std::string clock_str(double seconds) {
  const auto s = static_cast<int64_t>(seconds + 0.5);
  return s >= 3600 ? fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
                   : fmt::format("{}:{:02}", s / 60, s % 60);
}

struct PlannedRun {
  RunConfig config;
  std::string resolved;
  fs::path dir;
  std::string label;
};

std::atomic<int> g_interrupts{0};
std::atomic<bool> g_interrupt{false};

// The first Ctrl-C asks the trainer to checkpoint and stop after the current step; a second one
// falls back to the default action and ends the process.
void on_interrupt(int) {
  g_interrupt.store(true);
  if (++g_interrupts >= 2) {
    std::signal(SIGINT, SIG_DFL);
    std::raise(SIGINT);
  }
}

bool has_checkpoint(const fs::path& dir) {
  return fs::exists(dir / "checkpoint.safetensors");
}

// The arguments without --nproc N (or --nproc=N), for the ranks mpirun starts.
std::vector<std::string> without_nproc(const Args& args) {
  std::vector<std::string> out;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--nproc") {
      ++i;
      continue;
    }
    if (args[i].rfind("--nproc=", 0) == 0) continue;
    out.push_back(args[i]);
  }
  return out;
}

// Every rank validates the same recipe; they agree before anything trains, so that a rank whose
// validation failed does not leave the others waiting in a collective. The first failing rank
// reports its error; the others exit with the same code, silently.
// Returns kExitOk when every rank may go on, or the exit code of a rank that stays silent.
int agree_or_throw(Comm* world, const std::exception_ptr& failure) {
  if (world == nullptr || world->size() == 1) {
    if (failure) std::rethrow_exception(failure);
    return kExitOk;
  }
  std::vector<int32_t> failed(static_cast<size_t>(world->size()), 0);
  const int32_t mine = failure ? 1 : 0;
  world->allgather(&mine, sizeof mine, failed.data());
  for (int r = 0; r < world->size(); ++r) {
    if (!failed[static_cast<size_t>(r)]) continue;
    if (r == world->rank()) std::rethrow_exception(failure);
    return kExitUsage;
  }
  return kExitOk;
}

struct RunPlan {
  std::vector<PlannedRun> runs;
  std::optional<std::string> resume;
  RunOptions options;
};

const ArgSpec& run_spec() {
  static const ArgSpec spec{
      "moelab run RECIPE [--set KEY=VALUE]... [--out DIR] [--overwrite] [--stop-at STEP]\n"
      "       moelab run --resume RUN_DIR [--stop-at STEP]\n"
      "       moelab run --nproc N RECIPE ...      (or: mpirun -np N moelab run RECIPE ...)",
      "Trains what RECIPE describes and writes a run folder per run: OUT/NAME (or OUT/NAME/SWEEP_POINT\n"
      "for a [sweep]) holding recipe.toml (the resolved recipe, rerunnable as is), metrics.jsonl,\n"
      "summary.json and report.md, and for a language model checkpoint.safetensors. Every run of a\n"
      "sweep is validated before the first one starts. A run that fails before its first checkpoint\n"
      "leaves no folder behind. Ctrl-C checkpoints after the current step and stops; --resume RUN_DIR\n"
      "continues from the checkpoint to the same result as an uninterrupted run.\n"
      "Under mpirun (or with --nproc N) every rank trains its share of each batch, with the experts\n"
      "split over [parallel] expert ranks; rank 0 writes the run folder (docs/parallel.md).",
      {{"--set", "override a recipe key, VALUE parsed as TOML (repeatable): --set moe.top_k=1"},
       {"--out", "parent folder of the run folders (default: the recipe's output.dir, \"runs\")"},
       {"--resume", "continue the unfinished language-model run in RUN_DIR from its checkpoint"},
       {"--stop-at", "checkpoint after step STEP and stop, leaving the run resumable (split long runs)"},
       {"--nproc", "start N ranks with mpirun (with --allow-run-as-root as root, --oversubscribe past the cores)"}},
      {{"--overwrite", "replace existing run folders instead of refusing"}},
      0,
      1};
  return spec;
}

}  // namespace

namespace {

// Validates every run of the recipe (every sweep point) for a run on `world_size` ranks.
RunPlan plan_runs(const ParsedArgs& parsed, int64_t world_size) {
  RunPlan plan;
  std::optional<std::string>& resume = plan.resume;
  RunOptions& options = plan.options;
  resume = parsed.option("--resume");
  if (resume.has_value() == !parsed.positional.empty())
    throw UsageError(resume ? "give either RECIPE or --resume RUN_DIR, not both"
                            : "missing RECIPE (or --resume RUN_DIR); see moelab run --help");
  if (resume && (!parsed.all("--set").empty() || parsed.option("--out") || parsed.flag("--overwrite")))
    throw UsageError(
        "--resume continues a run exactly as its recipe.toml says: --set, --out and --overwrite do "
        "not apply");
  if (auto stop_at = parsed.option("--stop-at")) {
    try {
      size_t used = 0;
      options.stop_at = std::stoll(*stop_at, &used);
      if (used != stop_at->size() || options.stop_at < 1) throw std::invalid_argument("");
    } catch (const std::exception&) {
      throw UsageError(fmt::format("--stop-at expects a step >= 1, got '{}'", *stop_at));
    }
  }
  options.interrupt = &g_interrupt;
  const fs::path recipe_file = resume ? fs::path(*resume) / "recipe.toml" : fs::path(parsed.positional[0]);
  if (resume) {
    const fs::path dir(*resume);
    if (!fs::is_directory(dir)) throw UsageError(fmt::format("--resume: {} is not a run folder", dir.string()));
    if (!fs::exists(recipe_file))
      throw UsageError(fmt::format("--resume: {} has no recipe.toml; it is not a moelab run folder", dir.string()));
    if (fs::exists(dir / "summary.json"))
      throw UsageError(
          fmt::format("--resume: the run in {} has finished (summary.json is there); nothing to resume", dir.string()));
    if (!has_checkpoint(dir))
      throw UsageError(
          fmt::format("--resume: {} has no checkpoint.safetensors: the run stopped before its first "
                      "checkpoint; start it again with moelab run {}",
                      dir.string(), recipe_file.string()));
    options.resume = true;
  }
  const Recipe recipe = Recipe::load(recipe_file.string(), LoadOptions{parsed.all("--set")});
  std::vector<PlannedRun>& runs = plan.runs;
  Diagnostics all;
  for (const auto& point : recipe.expand_sweep()) {
    try {
      PluginRegistry registry = PluginRegistry::with_default_path();
      PlannedRun run;
      run.config = build_config(*point.recipe, registry);
      // What run cannot do (an untrainable model, missing data, too little memory) is refused for
      // every point before the first one trains.
      CheckOptions check;
      check.world = world_size;
      check_run(run.config, *point.recipe, registry, check);
      if (world_size > 1 && run.config.parallel.comm != "auto" && run.config.parallel.comm != "mpi")
        throw UsageError(fmt::format("parallel.comm = \"{}\", but mpirun started this run: use \"mpi\" or \"auto\"",
                                     run.config.parallel.comm));
      if (world_size == 1 && run.config.parallel.comm == "mpi")
        throw UsageError(
            "parallel.comm = \"mpi\", but this process was not started by mpirun: run it with mpirun -np N "
            "moelab run ..., or moelab run --nproc N ...");
      run.resolved = run_folder_recipe(*point.recipe, run.config, world_size);
      const fs::path parent = parsed.option("--out") ? fs::path(*parsed.option("--out")) : run.config.output_dir;
      run.dir = parent / run.config.name;
      if (!point.slug.empty()) run.dir /= point.slug;
      if (resume) run.dir = fs::path(*resume);
      run.label = point.label;
      runs.push_back(std::move(run));
    } catch (const UsageError& e) {
      if (e.diagnostics().empty()) throw;
      all.append(e.diagnostics());
    }
  }
  all.throw_if_any();
  for (const auto& run : runs) {
    // A folder name the file system cannot hold is the recipe's mistake, said before anything runs.
    for (const auto& part : run.dir)
      if (part.string().size() > 255)
        throw UsageError(
            fmt::format("run folder name '{}...' is {} bytes; a folder name is at most 255 bytes: "
                        "set a shorter name (the recipe's name key, or --set name=...)",
                        part.string().substr(0, 40), part.string().size()));
  }
  for (const auto& run : runs) {
    if (resume || !fs::exists(run.dir) || fs::is_empty(run.dir) || parsed.flag("--overwrite")) continue;
    if (has_checkpoint(run.dir) && !fs::exists(run.dir / "summary.json"))
      throw UsageError(
          fmt::format("run folder {} holds an unfinished run; continue it with moelab run --resume {}, "
                      "or pass --overwrite to start again",
                      run.dir.string(), run.dir.string()));
    throw UsageError(
        fmt::format("run folder {} exists and is not empty; pass --overwrite to replace it, or "
                    "--out DIR to write elsewhere",
                    run.dir.string()));
  }
  return plan;
}

// Trains the planned runs one after the other; on several ranks every rank calls this together.
int train_runs(const ParsedArgs& parsed, RunPlan& plan, const std::shared_ptr<Comm>& world) {
  const std::vector<PlannedRun>& runs = plan.runs;
  const std::optional<std::string>& resume = plan.resume;
  const RunOptions& options = plan.options;
  const bool writer = world == nullptr || world->rank() == 0;
  (void)parsed;
  std::signal(SIGINT, on_interrupt);

  const bool tty = isatty(fileno(stderr)) != 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    const PlannedRun& run = runs[i];
    PluginRegistry registry = PluginRegistry::with_default_path();
    registry.scan(run.config.plugin_paths);
    if (writer)
      std::fprintf(
          stderr, "run %zu/%zu: %s%s -> %s%s\n", i + 1, runs.size(), run.config.name.c_str(),
          run.label.empty() ? "" : (" [" + run.label + "]").c_str(), run.dir.string().c_str(),
          world ? fmt::format(" ({} ranks, experts split over {})", world->size(), run.config.parallel.expert).c_str()
                : "");
    // A layer-only run is written beside its final folder and renamed into place, so a failure
    // leaves nothing behind. A language model trains in its folder, which keeps its checkpoint
    // when the run stops; it is removed only when it fails before any checkpoint.
    const bool language_model = run.config.model.vocab_size > 0;
    const fs::path work_dir =
        language_model ? run.dir : run.dir.parent_path() / (run.dir.filename().string() + ".incomplete");
    if (!resume && writer) {
      std::error_code ec;
      fs::remove_all(work_dir, ec);
      if (language_model && !ec) fs::remove_all(run.dir, ec);
      if (!ec) fs::create_directories(work_dir, ec);
      if (ec)
        throw RuntimeError(fmt::format("cannot create the run folder {}: {}; choose another parent with --out DIR",
                                       work_dir.string(), ec.message()));
    }
    // The layout's groups, split from the world by every rank together; an error from here on
    // ends every rank (cli_parallel.hpp).
    std::unique_ptr<Parallel> parallel;
    if (world) {
      set_abort_world(world.get());
      parallel = std::make_unique<Parallel>(world, run.config.parallel.expert);
      world->barrier();  // rank 0 has made the folder
    }
    RunOptions run_options = options;
    run_options.parallel = parallel.get();
    RunResult result;
    try {
      const int64_t log_every = run.config.train.log_every;
      result = run_experiment(
          run.config, run.resolved, registry, work_dir,
          [&](const ProgressUpdate& u) {
            if (!u.warning.empty()) {
              std::fprintf(stderr, "%smoelab: warning: %s\n", tty ? "\n" : "", u.warning.c_str());
              return;
            }
            if (tty) {
              const double done = static_cast<double>(u.step) / static_cast<double>(u.steps);
              const int width = 30, filled = static_cast<int>(done * width);
              std::fprintf(stderr, "\r  [%s%s] step %lld/%lld  loss %.5f  %.0f tok/s  %s left   ",
                           std::string(static_cast<size_t>(filled), '#').c_str(),
                           std::string(static_cast<size_t>(width - filled), '.').c_str(),
                           static_cast<long long>(u.step), static_cast<long long>(u.steps), u.loss, u.tokens_per_second,
                           clock_str(u.seconds_left).c_str());
              if (u.step == u.steps) std::fputc('\n', stderr);
            } else if (u.step % log_every == 0 || u.step == u.steps) {
              std::fprintf(stderr, "  step %lld/%lld  loss %.5f  %.0f tok/s  %s left\n", static_cast<long long>(u.step),
                           static_cast<long long>(u.steps), u.loss, u.tokens_per_second,
                           clock_str(u.seconds_left).c_str());
            }
          },
          run_options);
    } catch (...) {
      if (!writer) throw;
      // A checkpoint refused on --resume is a usage error: resuming it again would fail again.
      bool refused = false;
      try {
        throw;
      } catch (const UsageError&) {
        refused = resume.has_value();
      } catch (...) {
      }
      std::error_code ignored;
      const bool checkpoint = language_model && has_checkpoint(work_dir);
      const bool metrics = language_model && fs::exists(work_dir / "metrics.jsonl", ignored);
      if (refused) {
        std::fprintf(stderr, "the run folder %s is kept as it was\n", work_dir.string().c_str());
      } else if (checkpoint) {
        std::fprintf(stderr, "\nthe run stopped; its last checkpoint is in %s: moelab run --resume %s\n",
                     work_dir.string().c_str(), work_dir.string().c_str());
      } else if (metrics && !resume) {
        // What it logged before failing (and the failure, its last line) explains it: kept, for a look.
        std::fprintf(stderr,
                     "\nthe run failed before its first checkpoint; its metrics are kept in %s "
                     "(moelab run --overwrite starts it again)\n",
                     work_dir.string().c_str());
      } else if (!resume) {
        fs::remove_all(work_dir, ignored);
      }
      throw;
    }
    if (!writer) {
      if (!result.finished) return g_interrupt.load() ? 130 : kExitOk;
      continue;
    }
    if (!result.finished) {
      if (tty) std::fputc('\n', stderr);
      std::printf("%s: stopped after step %lld of %lld with a checkpoint; continue with: moelab run --resume %s\n",
                  run.dir.string().c_str(), static_cast<long long>(result.steps_done),
                  static_cast<long long>(run.config.train.steps), run.dir.string().c_str());
      return g_interrupt.load() ? 130 : kExitOk;
    }
    if (!language_model) {
      fs::remove_all(run.dir);
      fs::rename(work_dir, run.dir);
    }
    std::printf(
        "%s: eval loss %.5f (floor %.5f), dropped %.2f%% in training / %.2f%% in eval, MaxVio %.3f, "
        "dead experts %lld, %.1f s\n",
        run.dir.string().c_str(), result.final_eval_loss, result.loss_floor, 100.0 * result.train_drop_fraction,
        100.0 * result.drop_fraction, result.max_violation, static_cast<long long>(result.dead_experts),
        result.seconds);
  }
  return kExitOk;
}

}  // namespace

int cmd_run(const Args& args) {
  const ArgSpec& spec = run_spec();
  const ParsedArgs parsed = parse_args(spec, args);
  if (parsed.help) {
    std::fputs(help_text(spec).c_str(), stdout);
    return kExitOk;
  }
  if (parsed.option("--nproc")) {
    const int64_t ranks = integer_option(parsed, "--nproc", 1, 1);
    if (launcher_world_size() > 0) throw UsageError("--nproc starts the ranks itself; under mpirun, leave it out");
    exec_mpirun(ranks, without_nproc(args));
  }
  // The ranks mpirun started join before anything else, so that they can agree on failures.
  const std::shared_ptr<Comm> world = join_world(PluginRegistry::with_default_path());
  std::exception_ptr failure;
  RunPlan plan;
  try {
    plan = plan_runs(parsed, world ? world->size() : 1);
  } catch (...) {
    failure = std::current_exception();
  }
  if (const int code = agree_or_throw(world.get(), failure); code != kExitOk) return code;
  return train_runs(parsed, plan, world);
}

}  // namespace moelab::cli

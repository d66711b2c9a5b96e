// The same recipe and seed on one process and on 2 and 4 ranks (experts split over 2 and 4,
// data parallel over 2, both at once), with the same global batch, must train the same model:
//   losses        every step's, within 1e-6 relative
//   routing       every step's tokens per expert of every layer, exactly
//   parameters    after 20 steps, every tensor within 1e-4 of its largest |value| (the AdamW update
//                 normalises each gradient, so the summation-order rounding of fp32 sums over ranks,
//                 ~1e-7, reaches ~1e-5 in parameters whose gradients are near zero; measured at most
//                 1e-5 over these cases)
// for dropless, drop and reroute, token and expert choice, and the aux-loss-free bias, with
// global capacity; local capacity and balancing against one process counting the same
// micro-batches; a rank that sends and receives nothing; a rank that raises or is killed
// (every rank stops, resume equals the uninterrupted run bit for bit); reshard 4 -> 1 -> 2.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <boost/json.hpp>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>

#include "cli_support.hpp"
#include "moelab/safetensors.hpp"
#include "test_files.hpp"

namespace {

namespace fs = std::filesystem;
std::string q(const fs::path& p) {
  return moelab::test::quoted(p);
}

const std::string kRecipe = std::string(MOELAB_PARALLEL_RECIPES) + "/lm.toml";

// One run's figures: each step's loss and each layer's tokens per expert, and the final weights.
struct Trained {
  std::map<int64_t, double> loss;
  std::map<int64_t, std::vector<std::vector<int64_t>>> load;
  std::map<std::string, moelab::Tensor> params;
  int status = -1;
  std::string output;
};

std::string mpirun(int ranks) {
  return std::string("'") + MOELAB_MPIRUN + "' --allow-run-as-root --oversubscribe -x OPENBLAS_NUM_THREADS=1 -np " +
         std::to_string(ranks) + " ";
}

// A command line with its stderr folded into its stdout.
moelab::test::CommandResult shell(const std::string& command) {
  return moelab::test::run_shell(command + " 2>&1");
}

// Every weight of the run's checkpoint, its expert slices joined.
std::map<std::string, moelab::Tensor> checkpoint_params(const fs::path& dir) {
  const moelab::SafetensorsFile main = moelab::read_safetensors(dir / "checkpoint.safetensors");
  const int64_t split = std::stoll(main.metadata.at("parallel.expert"));
  const int64_t step = std::stoll(main.metadata.at("step"));
  std::vector<moelab::SafetensorsFile> slices;
  for (int64_t i = 1; i < split; ++i) {
    char name[96];
    std::snprintf(name, sizeof name, "checkpoint.expert%lldof%lld.step%08lld.safetensors", static_cast<long long>(i),
                  static_cast<long long>(split), static_cast<long long>(step));
    slices.push_back(moelab::read_safetensors(dir / name));
  }
  std::map<std::string, moelab::Tensor> out;
  for (const std::string& name : main.names) {
    if (name.rfind("param/", 0) != 0) continue;
    std::vector<const moelab::Tensor*> pieces = {&main.at(name)};
    for (const auto& s : slices)
      if (std::find(s.names.begin(), s.names.end(), name) != s.names.end()) pieces.push_back(&s.at(name));
    moelab::Shape shape = pieces[0]->shape();
    shape[0] = 0;
    for (const auto* p : pieces) shape[0] += p->dim(0);
    moelab::Tensor whole = moelab::host_tensor(pieces[0]->dtype(), shape);
    size_t at = 0;
    for (const auto* p : pieces) {
      std::memcpy(static_cast<char*>(whole.raw()) + at, p->raw(), p->bytes());
      at += p->bytes();
    }
    out.emplace(name, whole);
  }
  return out;
}

Trained read_run(const fs::path& dir) {
  Trained t;
  std::ifstream in(dir / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const boost::json::object m = boost::json::parse(line).as_object();
    if (m.at("kind").as_string() != "train") continue;
    const int64_t step = m.at("step").to_number<int64_t>();
    t.loss[step] = m.at("loss").to_number<double>();
    for (const auto& layer : m.at("layers").as_array()) {
      std::vector<int64_t> tokens;
      for (const auto& v : layer.as_object().at("tokens_per_expert").as_array())
        tokens.push_back(v.to_number<int64_t>());
      t.load[step].push_back(tokens);
    }
  }
  t.params = checkpoint_params(dir);
  return t;
}

// Trains the test recipe with `sets` on `ranks` processes (0: one process, no mpirun), experts
// split over `expert`.
Trained train(const moelab::test::ScratchFolder& scratch, const std::string& label, int ranks, int expert,
              const std::string& sets) {
  const fs::path out = scratch / label;
  const std::string command = (ranks > 0 ? mpirun(ranks) : std::string()) + q(moelab::test::kMoelab) + " run " +
                              q(kRecipe) + " " + sets + " --set parallel.expert=" + std::to_string(expert) + " --out " +
                              q(out);
  const auto result = shell(command);
  INFO(command << "\n" << result.output);
  REQUIRE(result.status == 0);
  Trained t = read_run(out / "parallel_lm");
  t.output = result.output;
  return t;
}

double worst_param_error(const Trained& one, const Trained& many, std::string& where) {
  double worst = 0;
  for (const auto& [name, a] : one.params) {
    const auto it = many.params.find(name);
    REQUIRE_MESSAGE(it != many.params.end(), name << " is missing");
    const moelab::Tensor& b = it->second;
    REQUIRE(a.shape() == b.shape());
    double scale = 0, diff = 0;
    for (int64_t i = 0; i < a.numel(); ++i) {
      scale = std::max(scale, std::abs(static_cast<double>(a.data<float>()[i])));
      diff = std::max(diff, std::abs(static_cast<double>(a.data<float>()[i]) - b.data<float>()[i]));
    }
    const double error = diff / std::max(scale, 1e-30);
    if (error > worst) {
      worst = error;
      where = name;
    }
  }
  return worst;
}

void expect_same_training(const Trained& one, const Trained& many, const std::string& what) {
  INFO(what);
  REQUIRE(one.loss.size() == 20);
  REQUIRE(many.loss.size() == one.loss.size());
  for (const auto& [step, loss] : one.loss) {
    INFO("step " << step);
    CHECK(std::abs(many.loss.at(step) - loss) <= 1e-6 * std::abs(loss));
    CHECK(many.load.at(step) == one.load.at(step));
  }
  std::string where;
  const double error = worst_param_error(one, many, where);
  MESSAGE(what << ": parameters within " << error << " of their largest |value| (worst: " << where << ")");
  CHECK(error <= 1e-4);
}

struct Layout {
  int ranks, expert;
  const char* name;
};
const Layout kLayouts[] = {{2, 2, "EP 2"}, {4, 4, "EP 4"}, {2, 1, "DP 2"}, {4, 2, "EP 2 x DP 2"}};

void check_case(const std::string& label, const std::string& sets) {
  moelab::test::ScratchFolder scratch("parallel_" + label);
  const Trained one = train(scratch, "one", 0, 1, sets);
  for (const Layout& layout : kLayouts) {
    const Trained many = train(scratch, std::to_string(layout.ranks) + "_" + std::to_string(layout.expert),
                               layout.ranks, layout.expert, sets);
    expect_same_training(one, many, label + " on " + layout.name);
  }
}

}  // namespace

TEST_CASE("dropless token choice on 2 and 4 ranks trains as one process") {
  check_case("dropless", "");
}
TEST_CASE("capacity drop") {
  check_case("drop", "--set moe.overflow=drop");
}
TEST_CASE("capacity reroute") {
  check_case("reroute", "--set moe.overflow=reroute");
}
TEST_CASE("expert choice") {
  check_case("expert_choice", "--set moe.router.type=expert_choice");
}
TEST_CASE("aux-loss-free bias balancing") {
  check_case("aux_free_bias", "--set 'moe.balancers=[{type = \"aux_free_bias\"}]'");
}

TEST_CASE("micro-batch-local capacity and balancing on 2 and 4 ranks train as one process with those micro-batches") {
  // [parallel] capacity = balance = "local": each rank's capacity over its own 4 (2) sequences and
  // each rank's switch_aux on its own micro-batch, averaged; one process given micro_batch = 4 (2)
  // counts the same micro-batches.
  const std::string sets = "--set parallel.capacity=local --set parallel.balance=local --set moe.overflow=drop";
  moelab::test::ScratchFolder scratch("parallel_local");
  const Trained global = train(scratch, "global", 0, 1, "--set moe.overflow=drop");
  for (int ranks : {2, 4}) {
    const int sequences = 8 / ranks;
    const Trained one = train(scratch, "one_" + std::to_string(ranks), 0, 1,
                              sets + " --set parallel.micro_batch=" + std::to_string(sequences));
    CHECK(one.loss.at(20) != global.loss.at(20));  // the local forms change the training
    for (const Layout& layout : kLayouts) {
      if (layout.ranks != ranks) continue;
      const std::string label = "local_" + std::to_string(layout.ranks) + "_" + std::to_string(layout.expert);
      const Trained many = train(scratch, label, layout.ranks, layout.expert, sets);
      expect_same_training(one, many, std::string("local capacity and balance on ") + layout.name);
      // The run folder keeps the micro-batch it resolved, for eval, sample and a resharded resume.
      std::ifstream recipe(scratch / label / "parallel_lm" / "recipe.toml");
      const std::string text((std::istreambuf_iterator<char>(recipe)), std::istreambuf_iterator<char>());
      CHECK(text.find("micro_batch = " + std::to_string(sequences)) != std::string::npos);
    }
  }
}

TEST_CASE("a rank that sends and receives no rows still takes part, and the run equals one process") {
  // A zero router (every logit 0: every token picks experts 0 and 1) and a capacity of 2 rows per
  // expert: at step 1 only rank 0's first tokens are dispatched, to experts 0 and 1 on rank 0,
  // so ranks 1-3 send nothing and receive nothing.
  const std::string sets = "--set moe.router.init_std=0 --set moe.overflow=drop --set moe.capacity_factor=0.05";
  moelab::test::ScratchFolder scratch("parallel_zero");
  const Trained one = train(scratch, "one", 0, 1, sets);
  const Trained many = train(scratch, "ep4", 4, 4, sets);
  REQUIRE(!one.load.at(1).empty());
  const std::vector<int64_t>& first = one.load.at(1)[0];
  REQUIRE(first.size() == 8);
  CHECK(first[0] == 2);
  CHECK(first[1] == 2);
  for (size_t e = 2; e < first.size(); ++e) CHECK(first[e] == 0);
  expect_same_training(one, many, "no rows for ranks 1-3 at step 1, EP 4");
}

TEST_CASE("check refuses a split that the experts, the batch or the ranks do not allow") {
  const auto experts = moelab::test::run_moelab("check " + q(kRecipe) + " --set parallel.expert=3");
  INFO(experts.output);
  CHECK(experts.status == 2);
  CHECK(experts.output.find("parallel.expert: 8 experts cannot be split evenly over 3 ranks") != std::string::npos);
  const auto batch = moelab::test::run_moelab("check " + q(kRecipe) + " --nproc 3");
  INFO(batch.output);
  CHECK(batch.status == 2);
  CHECK(batch.output.find("train.batch_size: 8 sequences cannot be split evenly over 3 ranks") != std::string::npos);
  const auto layout =
      moelab::test::run_moelab("check " + q(kRecipe) + " --set parallel.expert=2 --set parallel.data=2 --nproc 2");
  INFO(layout.output);
  CHECK(layout.status == 2);
  CHECK(layout.output.find("expert x data = 2 x 2 = 4 ranks, but the run has 2") != std::string::npos);
  CHECK(moelab::test::run_moelab("check " + q(kRecipe) + " --set parallel.expert=4 --nproc 4").status == 0);
  // The same refusal under mpirun: reported once, by the first rank, and every rank exits 2.
  const auto ranks = shell(mpirun(2) + q(moelab::test::kMoelab) + " run " + q(kRecipe) +
                           " --set parallel.expert=3 --out /nonexistent/never");
  INFO(ranks.output);
  CHECK(ranks.status == 2);
  const std::string message = "8 experts cannot be split evenly over 3 ranks";
  const size_t at = ranks.output.find(message);
  CHECK(at != std::string::npos);
  CHECK(ranks.output.find(message, at + 1) == std::string::npos);
}

TEST_CASE("a rank that raises or is killed stops every rank; resume gives the uninterrupted run") {
  moelab::test::ScratchFolder scratch("parallel_fault");
  const std::string base = q(moelab::test::kMoelab) + " run " + q(kRecipe) +
                           " --set parallel.expert=2 --set train.checkpoint_every=5 --out ";
  const auto whole = shell(mpirun(2) + base + q(scratch / "whole"));
  REQUIRE(whole.status == 0);
  const Trained uninterrupted = read_run(scratch / "whole" / "parallel_lm");
  for (const char* fault : {"13:1:raise", "13:0:kill"}) {
    INFO(fault);
    const fs::path dir = scratch / (std::string("fault_") + fault[5]);
    const auto failed = shell(std::string("MOELAB_FAULT=") + fault + " timeout 120 " + mpirun(2) + base +
                              q(dir.parent_path() / dir.filename()));
    INFO(failed.output);
    CHECK(failed.status != 0);
    CHECK(failed.status != 124);  // not a hang ended by timeout
    const fs::path run = dir / "parallel_lm";
    REQUIRE(fs::exists(run / "checkpoint.safetensors"));
    CHECK(!fs::exists(run / "summary.json"));
    const auto resumed = shell("timeout 120 " + mpirun(2) + q(moelab::test::kMoelab) + " run --resume " + q(run));
    INFO(resumed.output);
    REQUIRE(resumed.status == 0);
    const Trained again = read_run(run);
    CHECK(again.loss == uninterrupted.loss);  // bit for bit
    CHECK(again.load == uninterrupted.load);
    std::string where;
    CHECK(worst_param_error(uninterrupted, again, where) == 0.0);
  }
}

TEST_CASE("reshard 4 -> 1 -> 2, continued, equals the uninterrupted one-process run") {
  moelab::test::ScratchFolder scratch("parallel_reshard");
  const Trained one = train(scratch, "one", 0, 1, "");
  const fs::path run = scratch / "moved" / "parallel_lm";
  const std::string moelab = q(moelab::test::kMoelab);
  REQUIRE(shell(mpirun(4) + moelab + " run " + q(kRecipe) + " --set parallel.expert=4 --stop-at 10 --out " +
                q(scratch / "moved"))
              .status == 0);
  const auto refused = moelab::test::run_moelab("run --resume " + q(run));
  INFO(refused.output);
  CHECK(refused.status == 2);
  CHECK(refused.output.find("moelab reshard") != std::string::npos);
  const auto to_one = moelab::test::run_moelab("reshard " + q(run) + " --expert 1");
  INFO(to_one.output);
  REQUIRE(to_one.status == 0);
  CHECK(to_one.output.find("from 4 to 1") != std::string::npos);
  REQUIRE(moelab::test::run_moelab("run --resume " + q(run) + " --stop-at 15").status == 0);
  REQUIRE(moelab::test::run_moelab("reshard " + q(run) + " --expert 2").status == 0);
  const auto last = shell(mpirun(2) + moelab + " run --resume " + q(run));
  INFO(last.output);
  REQUIRE(last.status == 0);
  expect_same_training(one, read_run(run), "4 ranks to step 10, 1 to 15, 2 to 20");
}

TEST_CASE("the mpi comm plugin passes the comm conformance kit on 3 ranks") {
  // Three ranks: uneven block sizes, empty blocks and pairs of ranks that exchange nothing.
  const auto kit = shell("timeout 120 " + mpirun(3) + q(moelab::test::kMoelab) + " test-plugin mpi");
  INFO(kit.output);
  CHECK(kit.status == 0);
  CHECK(kit.output.find("pass  collective  [exchange on 3 ranks]") != std::string::npos);
  CHECK(kit.output.find("pass  collective  [alltoallv on 3 ranks]") != std::string::npos);
  CHECK(kit.output.find("FAIL") == std::string::npos);
}

TEST_CASE("run --nproc N starts mpirun itself and gives what mpirun -np N gives") {
  moelab::test::ScratchFolder scratch("parallel_nproc");
  const std::string moelab = q(moelab::test::kMoelab);
  const std::string args = " run " + q(kRecipe) + " --set parallel.expert=2 --out ";
  REQUIRE(shell(mpirun(2) + moelab + args + q(scratch / "a")).status == 0);
  const auto started = shell("OPENBLAS_NUM_THREADS=1 " + moelab + args + q(scratch / "b") + " --nproc 2");
  INFO(started.output);
  REQUIRE(started.status == 0);
  CHECK(started.output.find("2 ranks, experts split over 2") != std::string::npos);
  CHECK(read_run(scratch / "a" / "parallel_lm").loss == read_run(scratch / "b" / "parallel_lm").loss);
}

int main(int argc, char** argv) {
  if (std::string(MOELAB_MPIRUN).empty() || std::string(MOELAB_MPIRUN).find("NOTFOUND") != std::string::npos) {
    std::printf(
        "SKIPPED: mpirun was not found when this build was configured; tools/setup-deps --tests installs "
        "Open MPI (openmpi-bin, libopenmpi-dev), then reconfigure\n");
    return 77;
  }
  if (!fs::exists(fs::path(MOELAB_BINARY_DIR) / "lib/moelab/plugins/libmoelab_comm_mpi.so")) {
    std::printf("SKIPPED: the mpi comm plugin is not built (libopenmpi-dev was missing at configure time)\n");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}

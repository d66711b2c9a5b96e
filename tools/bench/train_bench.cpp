// moelab-bench --train-step RECIPE: one training step of a recipe's transformer (forward, backward,
// AdamW, and in bf16 the rounding of the weights' GEMM copies) in f32 and in bf16, against a dense
// GEMM of the same precision measured in the same rounds.
//
// Model FLOPs per step = 3 x (forward FLOPs per token) x tokens: the forward's 2 per multiply-add
// over the active parameters plus the attention scores at the recipe's seq_len (count_model, as
// `moelab inspect` prints them), and a backward of twice the forward; 6 x active parameters x
// tokens + attention, as PaLM's MFU (Chowdhery et al. 2022, appendix B) counts it. MFU here is
// that rate over the dense GEMM's rate, [tokens, d_model] x [d_model, 4 d_model], in the same
// precision and on the same kernel: the rate the CPU reaches on the model's own shapes.
#include <fmt/format.h>

#include <cstdio>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "moelab/model_shape.hpp"
#include "moelab/optimizer.hpp"
#include "moelab/recipe.hpp"
#include "moelab/transformer.hpp"

namespace moelab::bench {

namespace {

struct Timed {
  DType precision;
  std::shared_ptr<Ops> ops;
  std::unique_ptr<Transformer> model;
  std::unique_ptr<AdamWOptimizer> optimizer;
  std::vector<Parameter*> gemm_params;
  Tensor a, w, c;  // the dense reference
};

}  // namespace

int train_step_bench(const std::string& recipe_path, int repeats, const std::string& kernel) {
  PluginRegistry registry = PluginRegistry::with_default_path();
  Recipe recipe = Recipe::load(recipe_path);
  const RunConfig config = build_config(recipe, registry);
  if (config.model.vocab_size <= 0)
    throw UsageError(fmt::format("{}: --train-step needs a language model (model.vocab_size > 0)", recipe_path));
  const TrainConfig& train = config.train;
  const int64_t tokens = train.batch_size * train.seq_len, d = config.model.d_model;
  const ModelCounts counts = count_model(config.model, count_moe_layer(config, registry), train.seq_len);
  const double step_flops = 3.0 * counts.forward_flops_per_token * static_cast<double>(tokens);
  const double dense_flops = 2.0 * static_cast<double>(tokens) * static_cast<double>(d) * static_cast<double>(4 * d);

  Rng data(5);
  std::vector<int32_t> inputs, targets;
  for (int64_t i = 0; i < tokens; ++i) {
    inputs.push_back(static_cast<int32_t>(data.below(static_cast<uint64_t>(config.model.vocab_size))));
    targets.push_back(static_cast<int32_t>(data.below(static_cast<uint64_t>(config.model.vocab_size))));
  }

  std::vector<Timed> runs;
  for (const DType precision : {DType::f32, DType::bf16}) {
    Timed t;
    t.precision = precision;
    t.ops = registry.make_kernel(kernel, config.kernel.params);
    t.ops->set_matmul_precision(precision);
    Rng rng(config.seed);
    t.model = std::make_unique<Transformer>(config, registry, *t.ops, rng);
    std::vector<Parameter*> params;
    for (auto& [name, p] : t.model->named_parameters()) {
      params.push_back(p);
      if (name.find("router") == std::string::npos) t.gemm_params.push_back(p);
    }
    make_gemm_copies(*t.ops, t.gemm_params, precision);
    t.optimizer = std::make_unique<AdamWOptimizer>(
        *t.ops, params, AdamWOptions{train.beta1, train.beta2, train.eps, train.weight_decay});
    t.a = random_rows(*t.ops, tokens, d, rng);
    t.w = random_rows(*t.ops, d, 4 * d, rng);
    t.c = t.ops->empty(DType::f32, {tokens, 4 * d});
    runs.push_back(std::move(t));
  }
  std::vector<std::function<void()>> bodies;
  for (Timed& t : runs) {
    bodies.push_back([&t] {
      t.ops->gemm(false, false, 1.0, t.a, t.w, 0.0, t.c);
      t.ops->synchronize();
    });
    bodies.push_back([&t, &inputs, &targets, &train] {
      t.optimizer->zero_grad();
      t.model->forward(inputs, targets, train.batch_size, true, 1);
      t.model->backward();
      t.optimizer->step(train.lr * 1e-3);  // small: the weights stay where they started
      t.model->after_step();
      refresh_gemm_copies(*t.ops, t.gemm_params);
      t.ops->synchronize();
    });
  }
  std::printf("%s: %.2fM parameters, %.2fM active per token, %lld tokens a step (batch %lld x seq %lld)\n",
              recipe_path.c_str(), counts.total.sum() / 1e6, counts.active.sum() / 1e6, static_cast<long long>(tokens),
              static_cast<long long>(train.batch_size), static_cast<long long>(train.seq_len));
  std::printf("model FLOPs a step %.3g (3 x %.4g a token); dense reference [%lld, %lld] x [%lld, %lld]\n", step_flops,
              counts.forward_flops_per_token, static_cast<long long>(tokens), static_cast<long long>(d),
              static_cast<long long>(d), static_cast<long long>(4 * d));
  std::printf(
      "kernel %s; bf16 GEMMs: %s; median of %d rounds (each: dense and step, f32 then bf16) after a warm-up\n\n",
      kernel.c_str(), runs[1].ops->bf16_gemm_path().c_str(), repeats);
  const std::vector<double> seconds = median_seconds(repeats, bodies);
  std::printf("| precision | step s | tokens/s | model GFLOP/s | dense GFLOP/s | MFU |\n|---|---|---|---|---|---|\n");
  for (size_t i = 0; i < runs.size(); ++i) {
    const double dense_rate = dense_flops / seconds[2 * i], step = seconds[2 * i + 1];
    std::printf("| %s | %.3f | %.0f | %.1f | %.1f | %.2f |\n", dtype_name(runs[i].precision), step,
                static_cast<double>(tokens) / step, step_flops / step / 1e9, dense_rate / 1e9,
                step_flops / step / dense_rate);
  }
  std::printf("\nbf16 / f32 tokens/s: %.2f\n", seconds[1] / seconds[3]);
  return 0;
}

}  // namespace moelab::bench

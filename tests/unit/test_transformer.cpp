// The MoE transformer: every parameter's gradient against central finite differences in double,
// for each attention kind (MHA, GQA, qk-norms, MLA with and without query compression), norm
// kind, tied and untied heads, dense and MoE blocks; its parameter count against inspect's
// formulas; determinism.
#include <doctest/doctest.h>

#include <cmath>
#include <map>

#include "moelab/config.hpp"
#include "moelab/model_shape.hpp"
#include "moelab/recipe.hpp"
#include "moelab/transformer.hpp"
#include "test_support.hpp"

using namespace moelab;
using namespace moelab::test;

namespace {

// A two-layer model, the first block dense and the second MoE (dropless, so a tiny weight change
// never moves a token across a capacity boundary), softmax top-2 routing with both loss balancers.
std::string recipe_text(const std::string& model_extra, const std::string& dtype = "f64") {
  return R"(
[model]
d_model = 8
dtype = ")" +
         dtype + R"("
vocab_size = 13
n_layers = 2
n_heads = 2
d_ff = 12
first_dense_layers = 1
init_std = )" +
         std::string(dtype == "f64" ? "0.3" : "0.02") + R"(
)" + model_extra +
         R"(
[moe]
num_experts = 4
top_k = 2
overflow = "dropless"
[moe.router]
type = "softmax_topk"
[moe.experts]
type = "glu"
d_ff = 6
init_std = 0.3
[[moe.balancers]]
type = "switch_aux"
coef = 0.1
[[moe.balancers]]
type = "z_loss"
coef = 0.01
)";
}

RunConfig config_of(const std::string& text) {
  Recipe recipe = Recipe::parse(text, "recipe.toml");
  PluginRegistry plugins = PluginRegistry::with_default_path();
  return build_config(recipe, plugins);
}

struct Batch {
  std::vector<int32_t> inputs, targets;
  int64_t batch = 2;
};

Batch random_batch(int64_t batch, int64_t seq_len, int64_t vocab, Rng& rng) {
  Batch b;
  b.batch = batch;
  for (int64_t i = 0; i < batch * seq_len; ++i) {
    b.inputs.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
    b.targets.push_back(i % 5 == 3 ? -1 : static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
  }
  return b;
}

// What backward differentiates: cross-entropy, balancer losses and the weighted MTP loss.
double total_loss(Transformer& model, const Batch& b, double mtp_weight = 0.3) {
  const double ce = model.forward(b.inputs, b.targets, b.batch, true, 1);
  return ce + model.aux_loss() + mtp_weight * model.mtp_loss();
}

// Central differences on up to `samples` entries of every parameter (entries i * stride mod n);
// returns the worst relative error against the analytic gradient. Gradients here are ~1e-2;
// below the 1e-4 floor the differences' own rounding (~1e-10 absolute) would dominate.
double worst_gradient_error(Transformer& model, const Batch& b, int64_t samples, int64_t stride,
                            std::string* worst_name) {
  Ops& ops = cpu_kernel();
  zero_grads(ops, model);
  total_loss(model, b);
  model.backward();
  double worst = 0;
  const double eps = 1e-6;
  for (auto& [name, p] : model.named_parameters()) {
    const int64_t n = p->value.numel();
    for (int64_t s = 0; s < std::min<int64_t>(n, samples); ++s) {
      const int64_t i = (s * stride) % n;
      double* w = p->value.data<double>();
      const double saved = w[i];
      w[i] = saved + eps;
      const double plus = total_loss(model, b);
      w[i] = saved - eps;
      const double minus = total_loss(model, b);
      w[i] = saved;
      const double numeric = (plus - minus) / (2 * eps);
      const double analytic = p->grad.data<double>()[i];
      const double err = std::abs(numeric - analytic) / std::max(1e-4, std::max(std::abs(numeric), std::abs(analytic)));
      if (err > worst) {
        worst = err;
        if (worst_name) *worst_name = name + fmt::format("[{}] analytic {} numeric {}", i, analytic, numeric);
      }
    }
  }
  return worst;
}

double worst_gradient_error(const std::string& model_extra, std::string* worst_name) {
  const RunConfig config = config_of(recipe_text(model_extra));
  Rng rng(7);
  Transformer model(config, registry(), cpu_kernel(), rng);
  Rng data_rng(11);
  return worst_gradient_error(model, random_batch(2, 5, config.model.vocab_size, data_rng), 6, 7919, worst_name);
}

}  // namespace

TEST_CASE("transformer gradients match finite differences in double, for every model variant") {
  // Tolerance: central differences with eps 1e-6 in double are accurate to ~1e-9 absolute on these
  // smooth losses (dropless routing: no capacity edge to cross), so 1e-5 relative (floor 1e-4).
  const std::vector<std::pair<const char*, std::string>> variants = {
      {"mha + rmsnorm", "attention = \"mha\"\nnorm = \"rmsnorm\"\n"},
      {"gqa + rmsnorm, untied", "attention = \"gqa\"\nn_kv_heads = 1\nnorm = \"rmsnorm\"\n"},
      {"mha + layernorm with bias, tied",
       "attention = \"mha\"\nnorm = \"layernorm\"\nnorm_bias = true\ntied_embeddings = true\n"},
      {"mha, no norms, attention biases", "attention = \"mha\"\nattention_bias = true\n"},
      {"qkv biases + per-head qk norm (Qwen3)",
       "attention = \"gqa\"\nn_kv_heads = 1\nqkv_bias = true\nqk_norm = \"head\"\nnorm = \"rmsnorm\"\n"},
      {"full qk norm (OLMoE)", "attention = \"mha\"\nqk_norm = \"full\"\nnorm = \"rmsnorm\"\n"},
      {"MLA with query compression (DeepSeek-V2/V3)",
       "attention = \"mla\"\nq_lora_rank = 6\nkv_lora_rank = 5\nqk_nope_head_dim = 4\nqk_rope_head_dim = 2\nv_head_dim "
       "= 3\nnorm = \"rmsnorm\"\n"},
      {"MLA without query compression (V2-Lite)",
       "attention = \"mla\"\nkv_lora_rank = 5\nqk_nope_head_dim = 3\nqk_rope_head_dim = 4\nv_head_dim = 2\nnorm = "
       "\"rmsnorm\"\n"},
      {"two multi-token prediction modules over MLA (DeepSeek-V3)",
       "attention = \"mla\"\nkv_lora_rank = 5\nqk_nope_head_dim = 3\nqk_rope_head_dim = 4\nv_head_dim = 2\nnorm = "
       "\"rmsnorm\"\n"
       "mtp_modules = 2\n"},
      {"dense FFN 'full' with gelu",
       "attention = \"mha\"\nnorm = \"rmsnorm\"\ndense_ffn = \"full\"\ndense_activation = \"gelu\"\n"},
  };
  for (const auto& [label, extra] : variants) {
    CAPTURE(label);
    std::string worst_name;
    const double worst = worst_gradient_error(extra, &worst_name);
    CAPTURE(worst_name);
    CHECK(worst < 1e-5);
  }
}

TEST_CASE("transformer gradients with shared experts and DeepSeek-V3 routing") {
  std::string text = recipe_text("attention = \"gqa\"\nn_kv_heads = 1\nnorm = \"rmsnorm\"\n");
  text.replace(text.find("type = \"softmax_topk\""), std::string("type = \"softmax_topk\"").size(),
               "type = \"sigmoid_grouped\"\nn_group = 2\ntopk_group = 1\nrouted_scaling_factor = 2.5");
  text.replace(text.find("type = \"glu\""), std::string("type = \"glu\"").size(),
               "type = \"shared_routed\"\nnum_shared = 1");
  const RunConfig config = config_of(text);
  Rng rng(3);
  Transformer model(config, registry(), cpu_kernel(), rng);
  Rng data_rng(5);
  std::string worst_name;
  const double worst =
      worst_gradient_error(model, random_batch(2, 4, config.model.vocab_size, data_rng), 4, 104729, &worst_name);
  CAPTURE(worst_name);
  CHECK(worst < 1e-5);
}

TEST_CASE("the transformer's parameters are what inspect counts") {
  for (const std::string extra :
       {"attention = \"gqa\"\nn_kv_heads = 1\nnorm = \"rmsnorm\"\n",
        "attention = \"mha\"\nnorm = \"layernorm\"\nnorm_bias = true\ntied_embeddings = true\nattention_bias = true\n",
        "attention = \"gqa\"\nn_kv_heads = 1\nqk_norm = \"head\"\nqkv_bias = true\nnorm = \"rmsnorm\"\n",
        "attention = \"mla\"\nq_lora_rank = 6\nkv_lora_rank = 5\nqk_nope_head_dim = 4\nqk_rope_head_dim = "
        "2\nv_head_dim = 3\nnorm = \"rmsnorm\"\n",
        "attention = \"mla\"\nkv_lora_rank = 5\nqk_nope_head_dim = 4\nqk_rope_head_dim = 2\nv_head_dim = 3\nnorm = "
        "\"rmsnorm\"\nmtp_modules = 1\n"}) {
    CAPTURE(extra);
    const RunConfig config = config_of(recipe_text(extra, "f32"));
    Rng rng(1);
    Transformer model(config, registry(), cpu_kernel(), rng);
    double allocated = 0;
    for (Parameter* p : model.parameters()) allocated += static_cast<double>(p->value.numel());
    const ModelCounts counts = count_model(config.model, count_moe_layer(config, registry()), 16);
    CHECK(allocated == counts.total.sum() + counts.mtp_total.sum());
  }
}

TEST_CASE("the same seed gives the same model and loss; the loss starts near log(vocab)") {
  const RunConfig config = config_of(recipe_text("attention = \"gqa\"\nn_kv_heads = 1\nnorm = \"rmsnorm\"\n", "f32"));
  Rng data_rng(2);
  const Batch b = random_batch(3, 7, config.model.vocab_size, data_rng);
  Rng rng_a(9), rng_b(9);
  Transformer a(config, registry(), cpu_kernel(), rng_a), b_model(config, registry(), cpu_kernel(), rng_b);
  const double la = a.forward(b.inputs, b.targets, b.batch, true, 1);
  const double lb = b_model.forward(b.inputs, b.targets, b.batch, true, 1);
  CHECK(la == lb);
  CHECK(std::abs(la - std::log(13.0)) < 0.05);
}

TEST_CASE("the transformer refuses what it cannot train, naming the key") {
  RunConfig config = config_of(recipe_text("attention = \"mha\"\n", "f32"));
  config.model.relative_attention_buckets = 32;
  Rng rng(1);
  CHECK_THROWS_WITH_AS(Transformer(config, registry(), cpu_kernel(), rng),
                       doctest::Contains("model.relative_attention_buckets"), UsageError);
  config.model.relative_attention_buckets = 0;
  config.model.attention = AttentionKind::none;
  CHECK_THROWS_WITH_AS(Transformer(config, registry(), cpu_kernel(), rng), doctest::Contains("model.attention"),
                       UsageError);
  std::vector<int32_t> inputs{1, 2, 99}, targets{1, 2, 3};
  config.model.attention = AttentionKind::mha;
  Transformer model(config, registry(), cpu_kernel(), rng);
  CHECK_THROWS_WITH_AS(model.forward(inputs, targets, 1, true, 1), doctest::Contains("outside the vocabulary"),
                       UsageError);
}

TEST_CASE("multi-token prediction: module k scores token i+k+1, and its loss does not change the main loss") {
  const std::string base = "attention = \"gqa\"\nn_kv_heads = 1\nnorm = \"rmsnorm\"\n";
  const RunConfig plain = config_of(recipe_text(base));
  const RunConfig with_mtp = config_of(recipe_text(base + "mtp_modules = 1\n"));
  Rng data_rng(4);
  const Batch b = random_batch(2, 6, plain.model.vocab_size, data_rng);
  Rng rng_a(5), rng_b(5);
  Transformer a(plain, registry(), cpu_kernel(), rng_a), m(with_mtp, registry(), cpu_kernel(), rng_b);
  // The main model is initialised first, from the same stream, so the main losses agree exactly.
  CHECK(a.forward(b.inputs, b.targets, b.batch, true, 1) == m.forward(b.inputs, b.targets, b.batch, true, 1));
  CHECK(a.mtp_loss() == 0);
  CHECK(m.mtp_loss() > 0);
  CHECK(std::abs(m.mtp_loss() - std::log(13.0)) < 1.5);
}

TEST_CASE("the transformer with bf16 GEMMs against f32: loss and every gradient within bf16 bounds") {
  // Each GEMM operand rounded to bf16 is off by up to u = 2^-8 relative, so a product by 2u and a
  // forward of a few GEMMs by about 4-10 u (~2-4%) relative to the magnitudes; the differences of
  // the whole loss (~log 13) and of each parameter's gradient (as a vector) stay far smaller than
  // that, and far from 0: the rounding must show (bf16 ran) without changing what is learned.
  const RunConfig config = config_of(recipe_text("attention = \"gqa\"\nn_kv_heads = 1\nnorm = \"rmsnorm\"\n", "f32"));
  Rng data_rng(3);
  const Batch b = random_batch(4, 9, config.model.vocab_size, data_rng);
  struct Result {
    double loss;
    std::map<std::string, std::vector<double>> grads;
  };
  const auto run = [&](DType precision, bool router_in_bf16 = false) {
    const std::shared_ptr<Ops> ops = load_kernel("cpu");
    ops->set_matmul_precision(precision);
    Rng rng(9);
    RunConfig changed = config;
    changed.moe.router_in_train_precision = router_in_bf16;  // moe.router_precision = "train"
    Transformer model(changed, registry(), *ops, rng);
    std::vector<Parameter*> gemm_params;
    for (auto& [name, p] : model.named_parameters())
      if (name.find("router") == std::string::npos) gemm_params.push_back(p);
    make_gemm_copies(*ops, gemm_params, precision);
    CHECK((precision == DType::bf16) == gemm_params[0]->gemm_copy.defined());
    zero_grads(*ops, model);
    Result result{total_loss(model, b), {}};
    model.backward();
    for (auto& [name, p] : model.named_parameters()) result.grads[name] = values_of(p->grad);
    return result;
  };
  const Result f32 = run(DType::f32), bf16 = run(DType::bf16);
  const double loss_difference = std::abs(bf16.loss - f32.loss) / f32.loss;
  CAPTURE(loss_difference);
  CHECK(loss_difference > 0);
  CHECK(loss_difference < 4.0 / 256);
  // The router stays f32 unless moe.router_precision = "train" says otherwise.
  const Result bf16_router = run(DType::bf16, true);
  CHECK(bf16_router.loss != bf16.loss);
  CHECK(std::abs(bf16_router.loss - f32.loss) / f32.loss < 4.0 / 256);
  for (const auto& [name, g] : f32.grads) {
    const std::vector<double>& h = bf16.grads.at(name);
    double difference = 0, norm = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      difference += (h[i] - g[i]) * (h[i] - g[i]);
      norm += g[i] * g[i];
    }
    CAPTURE(name);
    const double relative = std::sqrt(difference / std::max(norm, 1e-30));
    CAPTURE(relative);
    CHECK(relative < 10.0 / 256);
  }
}

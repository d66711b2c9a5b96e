// moelab-bench: the MoE layer's forward and forward+backward against a dense GEMM of the same
// FLOPs, measured in the same run on the same kernel. Prints achieved GFLOP/s and the ratio.
//
//   build/bin/moelab-bench                       # the three CPU shapes, balanced routing
//   build/bin/moelab-bench --shape 4096,512,1408,8,2 --repeats 7
//   build/bin/moelab-bench --precision bf16      # every GEMM, the dense reference's too, in bf16
//   mpirun -np 2 build/bin/moelab-bench --parallel   # expert parallelism (parallel_bench.cpp)
//   build/bin/moelab-bench --attention            # causal attention (op_bench.cpp)
//   build/bin/moelab-bench --optimizer            # the AdamW step (op_bench.cpp)
//   build/bin/moelab-bench --train-step recipes/examples/medium.toml   # MFU (train_bench.cpp)
//
// FLOPs counted (2 per multiply-add): forward = router (2·T·d·E) + experts (per processed row:
// 2·d·2F + 2·F·d for SwiGLU); backward = 2 × forward (input and weight gradients).
// The dense reference is the same expert FLOPs as one dense FFN over all T·k routed rows: GEMMs
// [T·k, d] × [d, 2F] and [T·k, F] × [F, d], timed forward only; its rate is the ceiling a grouped
// expert GEMM can approach. OPENBLAS_CORETYPE, when set, is printed: it decides OpenBLAS's speed.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "moelab/error.hpp"
#include "moelab/moe_layer.hpp"
#include "moelab/registry.hpp"

namespace moelab::bench {

bool parse_shape(const char* text, BenchShape& s) {
  return std::sscanf(text, "%" SCNd64 ",%" SCNd64 ",%" SCNd64 ",%" SCNd64 ",%" SCNd64, &s.tokens, &s.d_model, &s.d_ff,
                     &s.experts, &s.top_k) == 5 &&
         s.tokens >= 1 && s.d_model >= 1 && s.d_ff >= 1 && s.experts >= 1 && s.top_k >= 1 && s.top_k <= s.experts;
}

MoeConfig layer_config(const PluginRegistry& registry, const BenchShape& s, int64_t experts) {
  MoeConfig moe;
  moe.num_experts = experts;
  moe.top_k = s.top_k;
  moe.overflow = Overflow::dropless;
  moe.router = defaults(registry, PluginKind::router, "softmax_topk");
  moe.experts = defaults(registry, PluginKind::experts, "glu");
  moe.experts.params.set("d_ff", s.d_ff);
  return moe;
}

LayerSpec layer_spec(const BenchShape& s, int64_t experts) {
  LayerSpec spec;
  spec.d_model = s.d_model;
  spec.num_experts = experts;
  spec.top_k = s.top_k;
  spec.dtype = DType::f32;
  return spec;
}

Tensor random_rows(Ops& ops, int64_t rows, int64_t d, Rng& rng) {
  Tensor host = host_tensor(DType::f32, {rows, d});
  fill_normal(host, 1.0, rng);
  return ops.to_device(host);
}

std::shared_ptr<Ops> default_kernel(const PluginRegistry& registry, const std::string& name) {
  return registry.make_kernel(name, defaults_of(registry.require(PluginKind::kernel, name).schema));
}

}  // namespace moelab::bench

namespace {

using namespace moelab;
using namespace moelab::bench;

int usage(int status) {
  std::fprintf(status == 0 ? stdout : stderr,
               "usage: moelab-bench [--shape T,d,F,E,k]... [--repeats N] [--kernel NAME] [--precision f32|bf16]\n"
               "       mpirun -np N moelab-bench --parallel [--shape T,d,F,E,k]... [--repeats N]\n"
               "       moelab-bench --attention [--repeats N] [--kernel NAME]\n"
               "       moelab-bench --optimizer [--repeats N] [--kernel NAME]\n"
               "       moelab-bench --train-step RECIPE [--repeats N] [--kernel NAME]\n\n"
               "Times one MoE layer (softmax_topk router, glu experts, dropless) forward and\n"
               "forward+backward against a dense GEMM of the same FLOPs on the same kernel, and\n"
               "prints GFLOP/s and the ratio. Default shapes: 4096,512,1408,8,2  4096,512,352,64,8\n"
               "4096,768,3072,64,1.\n\n"
               "--parallel, under mpirun: the layer with its experts split over the N ranks (T is\n"
               "the global batch), against the same bytes through a plain MPI_Alltoallv and against\n"
               "one process doing 1/N of the work (T/N tokens, E/N experts). Default shapes:\n"
               "4096,512,1408,8,2  4096,512,352,64,8.\n\n"
               "--attention: causal attention in f32 (the default recipe's shape, MHA, GQA, MQA, MLA\n"
               "widths), forward and forward+backward, against a GEMM of the same FLOPs and against\n"
               "the previous version (the reference loops) in the same rounds.\n\n"
               "--optimizer: the AdamW step on 1M and 4M f32 parameters against the previous version\n"
               "(the scalar reference loop) in the same rounds.\n\n"
               "--precision bf16: every GEMM of the layer but the router's, and the dense reference's, computes\n"
               "in bf16 (operands rounded, f32 sums: Ops::set_matmul_precision); f32 by default.\n\n"
               "--train-step RECIPE: one training step of the recipe's transformer (forward, backward,\n"
               "AdamW) in f32 and in bf16, with model FLOPs utilisation against a dense GEMM of the\n"
               "same precision in the same rounds.\n");
  return status;
}

// A benchmark's exit status: its own, 2 for a usage mistake it found (a recipe that does not
// load, a layout mpirun cannot give), 1 for any other failure, each with its message.
int reported(const std::function<int()>& bench) {
  try {
    return bench();
  } catch (const UsageError& e) {
    std::fprintf(stderr, "moelab-bench: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moelab-bench: error: %s\n", e.what());
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<BenchShape> shapes;
  int repeats = 5;
  std::string kernel = "cpu";
  DType precision = DType::f32;
  bool parallel = false, attention = false, optimizer = false;
  std::string train_recipe;
  bool precision_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") return usage(0);
    if (a == "--parallel") {
      parallel = true;
      continue;
    }
    if (a == "--attention") {
      attention = true;
      continue;
    }
    if (a == "--optimizer") {
      optimizer = true;
      continue;
    }
    if ((a == "--shape" || a == "--repeats" || a == "--kernel" || a == "--precision" || a == "--train-step") &&
        i + 1 >= argc)
      return usage(2);
    if (a == "--train-step") {
      train_recipe = argv[++i];
      continue;
    }
    if (a == "--shape") {
      BenchShape s{};
      if (!parse_shape(argv[++i], s)) {
        std::fprintf(stderr, "moelab-bench: error: --shape wants T,d,F,E,k with 1 <= k <= E, got '%s'\n", argv[i]);
        return 2;
      }
      shapes.push_back(s);
    } else if (a == "--repeats") {
      repeats = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--kernel") {
      kernel = argv[++i];
    } else if (a == "--precision") {
      const std::string value = argv[++i];
      if (value != "f32" && value != "bf16") {
        std::fprintf(stderr, "moelab-bench: error: --precision is f32 or bf16, got '%s'\n", value.c_str());
        return 2;
      }
      precision = value == "bf16" ? DType::bf16 : DType::f32;
      precision_given = true;
    } else {
      std::fprintf(stderr, "moelab-bench: error: unknown argument '%s'\n", a.c_str());
      return usage(2);
    }
  }
  if ((attention || optimizer) && (parallel || !shapes.empty() || (attention && optimizer))) {
    std::fprintf(stderr,
                 "moelab-bench: error: --attention and --optimizer run their own shapes: each goes alone, without "
                 "--shape or --parallel\n");
    return 2;
  }
  if (precision_given && (attention || optimizer || parallel || !train_recipe.empty())) {
    std::fprintf(stderr,
                 "moelab-bench: error: --precision goes with the layer benchmark only (--train-step runs both "
                 "precisions itself; --attention, --optimizer and --parallel run in f32)\n");
    return 2;
  }
  if (!train_recipe.empty()) {
    if (attention || optimizer || parallel || !shapes.empty()) {
      std::fprintf(stderr, "moelab-bench: error: --train-step goes alone (with --repeats and --kernel)\n");
      return 2;
    }
    return reported([&] { return train_step_bench(train_recipe, repeats, kernel); });
  }
  if (optimizer) return reported([&] { return optimizer_bench(repeats, kernel); });
  if (attention) return reported([&] { return attention_bench(repeats, kernel); });
  if (parallel) {
    if (shapes.empty()) shapes = {{4096, 512, 1408, 8, 2}, {4096, 512, 352, 64, 8}};
    return reported([&] { return parallel_bench(shapes, repeats, kernel); });
  }
  if (shapes.empty()) shapes = {{4096, 512, 1408, 8, 2}, {4096, 512, 352, 64, 8}, {4096, 768, 3072, 64, 1}};

  try {
    PluginRegistry registry = PluginRegistry::with_default_path();
    std::shared_ptr<Ops> ops = default_kernel(registry, kernel);
    ops->set_matmul_precision(precision);  // the router's GEMM stays f32 (the layer's own scope)
    const char* coretype = std::getenv("OPENBLAS_CORETYPE");
    std::printf(
        "kernel %s, OPENBLAS_CORETYPE=%s, GEMMs in %s%s, median of %d rounds (dense, forward, forward+backward "
        "back to back) after one warm-up\n\n",
        kernel.c_str(), coretype ? coretype : "(unset)", dtype_name(precision),
        precision == DType::bf16 ? fmt::format(" ({})", ops->bf16_gemm_path()).c_str() : "", repeats);
    std::printf("| T | d | F | E | k | dense GFLOP/s | fwd GFLOP/s | fwd/dense | fwd+bwd GFLOP/s | fwd+bwd/dense |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
    for (const BenchShape& s : shapes) {
      Rng rng(1);
      MoeLayer layer(layer_config(registry, s, s.experts), layer_spec(s, s.experts), registry, *ops, rng);
      const Tensor x = random_rows(*ops, s.tokens, s.d_model, rng);
      const Tensor dy = random_rows(*ops, s.tokens, s.d_model, rng);
      // bf16: the experts' weights rounded once per step, as the trainer does (timed with forward+backward)
      std::vector<Parameter*> gemm_params;
      for (auto& [name, p] : layer.named_parameters())
        if (name.find("router") == std::string::npos) gemm_params.push_back(p);
      make_gemm_copies(*ops, gemm_params, precision);

      const double expert_flops = static_cast<double>(s.tokens * s.top_k) * layer.experts().flops_per_routed_token();
      const double router_flops = 2.0 * static_cast<double>(s.tokens * s.d_model * s.experts);
      const double forward_flops = expert_flops + router_flops;

      // The dense reference: one dense SwiGLU FFN of the experts' shape over all T*k routed rows,
      // i.e. the same expert FLOPs as two plain GEMMs [T*k, d] x [d, 2F] and [T*k, F] x [F, d].
      const int64_t rows = s.tokens * s.top_k;
      const Tensor a = random_rows(*ops, rows, s.d_model, rng);
      Tensor w_up_host = host_tensor(DType::f32, {s.d_model, 2 * s.d_ff});
      fill_normal(w_up_host, 0.02, rng);
      const Tensor w_up = ops->to_device(w_up_host);
      const Tensor h = random_rows(*ops, rows, s.d_ff, rng);
      Tensor w_down_host = host_tensor(DType::f32, {s.d_ff, s.d_model});
      fill_normal(w_down_host, 0.02, rng);
      const Tensor w_down = ops->to_device(w_down_host);
      Tensor up = ops->empty(DType::f32, {rows, 2 * s.d_ff});
      Tensor down = ops->empty(DType::f32, {rows, s.d_model});
      const LayerInput input{true, 1, 1, 0, nullptr};
      const std::vector<double> seconds = median_seconds(repeats, {[&] {
                                                                     ops->gemm(false, false, 1.0, a, w_up, 0.0, up);
                                                                     ops->gemm(false, false, 1.0, h, w_down, 0.0, down);
                                                                     ops->synchronize();
                                                                   },
                                                                   [&] {
                                                                     layer.forward(x, input);
                                                                     ops->synchronize();
                                                                   },
                                                                   [&] {
                                                                     refresh_gemm_copies(*ops, gemm_params);
                                                                     layer.forward(x, input);
                                                                     layer.backward(dy);
                                                                     ops->synchronize();
                                                                   }});
      const double dense_rate = expert_flops / seconds[0];
      const double forward_rate = forward_flops / seconds[1];
      const double both_rate = 3.0 * forward_flops / seconds[2];
      std::printf("| %" PRId64 " | %" PRId64 " | %" PRId64 " | %" PRId64 " | %" PRId64
                  " | %.1f | %.1f | %.2f | %.1f | %.2f |\n",
                  s.tokens, s.d_model, s.d_ff, s.experts, s.top_k, dense_rate / 1e9, forward_rate / 1e9,
                  forward_rate / dense_rate, both_rate / 1e9, both_rate / dense_rate);
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moelab-bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}

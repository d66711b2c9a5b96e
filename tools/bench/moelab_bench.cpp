// moelab-bench: the MoE layer's forward and forward+backward against a dense GEMM of the same
// FLOPs, measured in the same run on the same kernel. Prints achieved GFLOP/s and the ratio.
//
//   build/bin/moelab-bench                       # the three CPU shapes, balanced routing
//   build/bin/moelab-bench --shape 4096,512,1408,8,2 --repeats 7
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

#include "moelab/moe_layer.hpp"
#include "moelab/registry.hpp"

namespace {

using namespace moelab;
using Clock = std::chrono::steady_clock;

struct BenchShape {
  int64_t tokens, d_model, d_ff, experts, top_k;
};

// Median seconds of each body over `repeats` rounds, after one warm-up run of each (first-touch
// allocation, OpenBLAS thread start). Each round runs every body once, back to back, so that the
// dense reference and the layer are timed in the same minutes: on a shared machine the load
// drifts, and timing one after the other's repeats would compare different machines.
std::vector<double> median_seconds(int repeats, const std::vector<std::function<void()>>& bodies) {
  for (const auto& body : bodies) body();
  std::vector<std::vector<double>> times(bodies.size());
  for (int round = 0; round < repeats; ++round)
    for (size_t b = 0; b < bodies.size(); ++b) {
      const auto start = Clock::now();
      bodies[b]();
      times[b].push_back(std::chrono::duration<double>(Clock::now() - start).count());
    }
  std::vector<double> medians;
  for (auto& t : times) {
    std::sort(t.begin(), t.end());
    medians.push_back(t[t.size() / 2]);
  }
  return medians;
}

PluginChoice defaults(const PluginRegistry& registry, PluginKind kind, const std::string& name) {
  PluginChoice c;
  c.type = name;
  c.params = defaults_of(registry.require(kind, name).schema);
  return c;
}

int usage(int status) {
  std::fprintf(status == 0 ? stdout : stderr,
               "usage: moelab-bench [--shape T,d,F,E,k]... [--repeats N] [--kernel NAME]\n\n"
               "Times one MoE layer (softmax_topk router, glu experts, dropless) forward and\n"
               "forward+backward against a dense GEMM of the same FLOPs on the same kernel, and\n"
               "prints GFLOP/s and the ratio. Default shapes: 4096,512,1408,8,2  4096,512,352,64,8\n"
               "4096,768,3072,64,1.\n");
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<BenchShape> shapes;
  int repeats = 5;
  std::string kernel = "cpu";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") return usage(0);
    if ((a == "--shape" || a == "--repeats" || a == "--kernel") && i + 1 >= argc) return usage(2);
    if (a == "--shape") {
      BenchShape s{};
      if (std::sscanf(argv[++i], "%" SCNd64 ",%" SCNd64 ",%" SCNd64 ",%" SCNd64 ",%" SCNd64, &s.tokens, &s.d_model,
                      &s.d_ff, &s.experts, &s.top_k) != 5 ||
          s.tokens < 1 || s.d_model < 1 || s.d_ff < 1 || s.experts < 1 || s.top_k < 1 || s.top_k > s.experts) {
        std::fprintf(stderr, "moelab-bench: error: --shape wants T,d,F,E,k with 1 <= k <= E, got '%s'\n", argv[i]);
        return 2;
      }
      shapes.push_back(s);
    } else if (a == "--repeats") {
      repeats = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--kernel") {
      kernel = argv[++i];
    } else {
      std::fprintf(stderr, "moelab-bench: error: unknown argument '%s'\n", a.c_str());
      return usage(2);
    }
  }
  if (shapes.empty()) shapes = {{4096, 512, 1408, 8, 2}, {4096, 512, 352, 64, 8}, {4096, 768, 3072, 64, 1}};

  try {
    PluginRegistry registry = PluginRegistry::with_default_path();
    std::shared_ptr<Ops> ops =
        registry.make_kernel(kernel, defaults_of(registry.require(PluginKind::kernel, kernel).schema));
    const char* coretype = std::getenv("OPENBLAS_CORETYPE");
    std::printf(
        "kernel %s, OPENBLAS_CORETYPE=%s, median of %d rounds (dense, forward, forward+backward "
        "back to back) after one warm-up\n\n",
        kernel.c_str(), coretype ? coretype : "(unset)", repeats);
    std::printf("| T | d | F | E | k | dense GFLOP/s | fwd GFLOP/s | fwd/dense | fwd+bwd GFLOP/s | fwd+bwd/dense |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
    for (const BenchShape& s : shapes) {
      MoeConfig moe;
      moe.num_experts = s.experts;
      moe.top_k = s.top_k;
      moe.overflow = Overflow::dropless;
      moe.router = defaults(registry, PluginKind::router, "softmax_topk");
      moe.experts = defaults(registry, PluginKind::experts, "glu");
      moe.experts.params.set("d_ff", s.d_ff);
      LayerSpec spec;
      spec.d_model = s.d_model;
      spec.num_experts = s.experts;
      spec.top_k = s.top_k;
      spec.dtype = DType::f32;
      Rng rng(1);
      MoeLayer layer(moe, spec, registry, *ops, rng);
      Tensor x_host = host_tensor(DType::f32, {s.tokens, s.d_model});
      fill_normal(x_host, 1.0, rng);
      const Tensor x = ops->to_device(x_host);
      Tensor dy_host = host_tensor(DType::f32, {s.tokens, s.d_model});
      fill_normal(dy_host, 1.0, rng);
      const Tensor dy = ops->to_device(dy_host);

      const double expert_flops = static_cast<double>(s.tokens * s.top_k) * layer.experts().flops_per_routed_token();
      const double router_flops = 2.0 * static_cast<double>(s.tokens * s.d_model * s.experts);
      const double forward_flops = expert_flops + router_flops;

      // The dense reference: one dense SwiGLU FFN of the experts' shape over all T*k routed rows,
      // i.e. the same expert FLOPs as two plain GEMMs [T*k, d] x [d, 2F] and [T*k, F] x [F, d].
      const int64_t rows = s.tokens * s.top_k;
      Tensor a_host = host_tensor(DType::f32, {rows, s.d_model});
      fill_normal(a_host, 1.0, rng);
      const Tensor a = ops->to_device(a_host);
      Tensor w_up_host = host_tensor(DType::f32, {s.d_model, 2 * s.d_ff});
      fill_normal(w_up_host, 0.02, rng);
      const Tensor w_up = ops->to_device(w_up_host);
      Tensor h_host = host_tensor(DType::f32, {rows, s.d_ff});
      fill_normal(h_host, 1.0, rng);
      const Tensor h = ops->to_device(h_host);
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

// moelab-bench --attention: the kernel's causal attention (and --optimizer, its AdamW step, below), forward and forward
// + backward, against two references measured in the same rounds (median_seconds):
//   - a dense GEMM of the same FLOPs through the kernel (m = n = k, 2 m^3 = the attention's
//     FLOPs), the rate attention as GEMMs can at best approach;
//   - the previous version: the Ops base's reference loops (what the cpu kernel ran before its
//     tiled f32 path), called past the kernel's override.
// FLOPs count the causal half only: per sequence and head, S (S + 1) / 2 score entries, 2 (Dk + Dv)
// each forward (Q K^T and P V) and 2 (3 Dk + 2 Dv) more backward (P again, dV, dP, dQ, dK).
#include <fmt/format.h>

#include <cinttypes>
#include <cmath>
#include <cstdio>

#include "bench_common.hpp"

namespace moelab::bench {
namespace {

struct AttentionBenchShape {
  const char* name;
  int64_t sequences, seq_len, heads, kv_heads, key_dim, value_dim;
};

Tensor random_matrix(Ops& ops, int64_t rows, int64_t cols, Rng& rng) {
  return random_rows(ops, rows, cols, rng);
}

}  // namespace

int attention_bench(int repeats, const std::string& kernel) {
  PluginRegistry registry = PluginRegistry::with_default_path();
  std::shared_ptr<Ops> ops = default_kernel(registry, kernel);
  const AttentionBenchShape shapes[] = {
      {"default recipe (GQA 4/2 x 16)", 16, 64, 4, 2, 16, 16},
      {"MHA 8 x 64, seq 1024", 2, 1024, 8, 8, 64, 64},
      {"GQA 8/2 x 64, seq 512", 4, 512, 8, 2, 64, 64},
      {"MQA 8/1 x 64, seq 512", 4, 512, 8, 1, 64, 64},
      {"MLA widths 8 x (192, 128), seq 512", 2, 512, 8, 8, 192, 128},
  };
  std::printf("kernel %s, median of %d rounds (GEMM, attention, previous version, back to back) after one warm-up\n\n",
              kernel.c_str(), repeats);
  std::printf(
      "| shape | B x S | GEMM GFLOP/s | fwd GFLOP/s | fwd / GEMM | fwd+bwd GFLOP/s | fwd+bwd / GEMM | previous "
      "fwd+bwd ms | this fwd+bwd ms | speed-up |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (const AttentionBenchShape& s : shapes) {
    Rng rng(7);
    const int64_t rows = s.sequences * s.seq_len;
    const Tensor q = random_matrix(*ops, rows, s.heads * s.key_dim, rng);
    const Tensor k = random_matrix(*ops, rows, s.kv_heads * s.key_dim, rng);
    const Tensor v = random_matrix(*ops, rows, s.kv_heads * s.value_dim, rng);
    const Tensor dout = random_matrix(*ops, rows, s.heads * s.value_dim, rng);
    Tensor out = ops->empty(DType::f32, {rows, s.heads * s.value_dim});
    Tensor lse = ops->empty(DType::f32, {rows, s.heads});
    Tensor dq = ops->empty(DType::f32, q.shape()), dk = ops->empty(DType::f32, k.shape());
    Tensor dv = ops->empty(DType::f32, v.shape());
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.key_dim));
    const double entries = static_cast<double>(s.sequences * s.heads) * static_cast<double>(s.seq_len) *
                           static_cast<double>(s.seq_len + 1) / 2.0;
    const double forward_flops = entries * 2.0 * static_cast<double>(s.key_dim + s.value_dim);
    const double backward_flops = entries * 2.0 * static_cast<double>(3 * s.key_dim + 2 * s.value_dim);
    const auto n = std::max<int64_t>(16, std::llround(std::cbrt((forward_flops + backward_flops) / 2.0)));
    const Tensor a = random_matrix(*ops, n, n, rng), b = random_matrix(*ops, n, n, rng);
    Tensor c = ops->empty(DType::f32, {n, n});
    const double gemm_flops = 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
    const std::vector<double> seconds =
        median_seconds(repeats, {[&] {
                                   ops->gemm(false, false, 1.0, a, b, 0.0, c);
                                   ops->synchronize();
                                 },
                                 [&] {
                                   ops->causal_attention(q, k, v, s.heads, s.kv_heads, s.seq_len, scale, out, lse);
                                   ops->synchronize();
                                 },
                                 [&] {
                                   ops->causal_attention(q, k, v, s.heads, s.kv_heads, s.seq_len, scale, out, lse);
                                   ops->causal_attention_backward(q, k, v, out, lse, dout, s.heads, s.kv_heads,
                                                                  s.seq_len, scale, dq, dk, dv);
                                   ops->synchronize();
                                 },
                                 [&] {
                                   ops->Ops::causal_attention(q, k, v, s.heads, s.kv_heads, s.seq_len, scale, out, lse);
                                   ops->Ops::causal_attention_backward(q, k, v, out, lse, dout, s.heads, s.kv_heads,
                                                                       s.seq_len, scale, dq, dk, dv);
                                   ops->synchronize();
                                 }});
    const double gemm_rate = gemm_flops / seconds[0], forward_rate = forward_flops / seconds[1];
    const double both_rate = (forward_flops + backward_flops) / seconds[2];
    std::printf("| %s | %" PRId64 " x %" PRId64 " | %.1f | %.1f | %.2f | %.1f | %.2f | %.2f | %.2f | %.1f |\n", s.name,
                s.sequences, s.seq_len, gemm_rate / 1e9, forward_rate / 1e9, forward_rate / gemm_rate, both_rate / 1e9,
                both_rate / gemm_rate, seconds[3] * 1e3, seconds[2] * 1e3, seconds[3] / seconds[2]);
    std::fflush(stdout);
  }
  return 0;
}

// moelab-bench --optimizer: the kernel's AdamW step against the previous version (the Ops base's
// scalar loop, called past the kernel's override), on 1M and 4M f32 parameters, same rounds.
int optimizer_bench(int repeats, const std::string& kernel) {
  PluginRegistry registry = PluginRegistry::with_default_path();
  std::shared_ptr<Ops> ops = default_kernel(registry, kernel);
  std::printf("kernel %s, median of %d rounds (this version, previous version, back to back) after one warm-up\n\n",
              kernel.c_str(), repeats);
  std::printf(
      "| parameters | previous ms | this ms | speed-up | this GB/s (7 x 4 bytes a parameter) "
      "|\n|---|---|---|---|---|\n");
  for (const int64_t n : {int64_t{1} << 20, int64_t{1} << 22}) {
    Rng rng(5);
    const Tensor grad = random_rows(*ops, n, 1, rng);
    Tensor param = random_rows(*ops, n, 1, rng), m = ops->zeros(DType::f32, {n, 1}), v = ops->zeros(DType::f32, {n, 1});
    Ops::AdamW hyper{1e-3, 0.9, 0.95, 1e-8, 0.1, 1};
    const std::vector<double> seconds = median_seconds(repeats, {[&] {
                                                                   ops->adamw_update(hyper, grad, param, m, v);
                                                                   ops->synchronize();
                                                                 },
                                                                 [&] {
                                                                   ops->Ops::adamw_update(hyper, grad, param, m, v);
                                                                   ops->synchronize();
                                                                 }});
    std::printf("| %" PRId64 " | %.2f | %.2f | %.1f | %.1f |\n", n, seconds[1] * 1e3, seconds[0] * 1e3,
                seconds[1] / seconds[0], 28.0 * static_cast<double>(n) / seconds[0] / 1e9);
  }
  return 0;
}

}  // namespace moelab::bench

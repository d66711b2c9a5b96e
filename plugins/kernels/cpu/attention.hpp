// Causal attention on the cpu kernel in f32 as GEMMs: flash-attention-style tiles (Dao et al.
// 2022, "FlashAttention", algorithm 1; the backward as in FlashAttention-2, Dao 2023, algorithm
// 2). The layout and meaning are Ops::causal_attention's (moelab/kernel.hpp): q [R, H*Dk],
// k [R, Hkv*Dk], v [R, Hkv*Dv], out [R, H*Dv], lse [R, H], sequences of seq_len consecutive rows,
// query head h reading kv head h / (H / Hkv) (MHA, GQA, MQA; Dk != Dv for MLA's shapes).
//
// Forward, per (sequence, head), per tile of kBlock queries: for each tile of kBlock keys at or
// before them, S = scale Q K^T (sgemm), the causal mask on the diagonal tile, then the online
// softmax: m' = max(m, rowmax S), P = exp(S - m'), l = l e^(m - m') + rowsum P,
// O = O e^(m - m') + P V (sgemm); at the end out = O / l and lse = m + log l. Memory: one tile
// of scores per thread, never the [seq, seq] matrix.
// Backward, per (sequence, head), per key tile, per query tile that sees those keys:
// P = exp(scale Q K^T - lse) recomputed, dV += P^T dO, dP = dO V^T, dS = P (dP - D) with
// D = rowsum(dO * out), dQ += scale dS K, dK += scale dS^T Q (five sgemms).
// A (sequence, head) owns its rows of dQ and, under grouped heads, a part of dK and dV of its
// own, which a second pass sums over the group in head order; so the items run on any number of
// threads with the same arithmetic: results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <functional>

namespace moelab::cpu {

struct AttentionDims {
  int64_t rows, heads, kv_heads, seq_len, key_dim, value_dim;
};

// Runs body(i) for every i < count, on whatever threads the kernel has (each i exactly once).
using ForEachItem = std::function<void(int64_t count, const std::function<void(int64_t)>& body)>;

void flash_attention_forward(const AttentionDims& s, float scale, const float* q, const float* k, const float* v,
                             float* out, float* lse, const ForEachItem& for_each);
void flash_attention_backward(const AttentionDims& s, float scale, const float* q, const float* k, const float* v,
                              const float* out, const float* lse, const float* dout, float* dq, float* dk, float* dv,
                              const ForEachItem& for_each);

}  // namespace moelab::cpu

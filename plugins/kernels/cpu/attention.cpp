// Flash-attention-style causal attention in f32 on OpenBLAS sgemm tiles (attention.hpp).
#include "attention.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "exp_f32.hpp"

namespace moelab::cpu {
namespace {

// Queries and keys per tile: 128 x 128 scores (64 KB) stay in L2 with the tiles of Q, K and V;
// 128 ran at 0.49-0.57 of a GEMM's rate (fwd+bwd) against 0.42-0.56 for 64 (moelab-bench
// --attention).
constexpr int64_t kBlock = 128;

// C [m, n] (ldc) = alpha op(A) op(B) + beta C, row-major.
void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b,
              static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

struct Strides {
  int64_t q, k, v, out;
  explicit Strides(const AttentionDims& s)
      : q(s.heads * s.key_dim), k(s.kv_heads * s.key_dim), v(s.kv_heads * s.value_dim), out(s.heads * s.value_dim) {}
};

// Zeroes the scores of keys after their query: score (r, c) is query first_q + r, key first_k + c.
void mask_future(float* scores, int64_t nq, int64_t nk, int64_t first_q, int64_t first_k, float value) {
  for (int64_t r = 0; r < nq; ++r)
    for (int64_t c = std::max<int64_t>(0, first_q + r - first_k + 1); c < nk; ++c) scores[r * kBlock + c] = value;
}

}  // namespace

void flash_attention_forward(const AttentionDims& s, float scale, const float* q, const float* k, const float* v,
                             float* out, float* lse, const ForEachItem& for_each) {
  const Strides ld(s);
  const int64_t sequences = s.rows / s.seq_len, group = s.heads / s.kv_heads, dv = s.value_dim;
  for_each(sequences * s.heads, [&](int64_t item) {
    const int64_t b = item / s.heads, h = item % s.heads, g = h / group, first_row = b * s.seq_len;
    std::vector<float> scores(static_cast<size_t>(kBlock * kBlock)), acc(static_cast<size_t>(kBlock * dv));
    std::vector<float> row_max(kBlock), row_sum(kBlock);
    const float* kh = k + first_row * ld.k + g * s.key_dim;
    const float* vh = v + first_row * ld.v + g * dv;
    for (int64_t q0 = 0; q0 < s.seq_len; q0 += kBlock) {
      const int64_t nq = std::min(kBlock, s.seq_len - q0);
      const float* qh = q + (first_row + q0) * ld.q + h * s.key_dim;
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      for (int64_t k0 = 0; k0 < q0 + nq; k0 += kBlock) {
        const int64_t nk = std::min(kBlock, q0 + nq - k0);
        sgemm(false, true, nq, nk, s.key_dim, scale, qh, ld.q, kh + k0 * ld.k, ld.k, 0.0f, scores.data(), kBlock);
        const bool diagonal = k0 + nk > q0;
        if (diagonal) mask_future(scores.data(), nq, nk, q0, k0, -std::numeric_limits<float>::infinity());
        for (int64_t r = 0; r < nq; ++r) {
          float* sr = scores.data() + r * kBlock;
          float m = row_max[r];
          for (int64_t c = 0; c < nk; ++c) m = std::max(m, sr[c]);  // every row has key <= query
          const float rescale = exp_nonpositive(row_max[r] - m);    // 0 on the first tile (-inf)
          float sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < nk; ++c) {
            sr[c] = exp_nonpositive(sr[c] - m);
            sum += sr[c];
          }
          row_sum[r] = row_sum[r] * rescale + sum;
          row_max[r] = m;
          float* ar = acc.data() + r * dv;
          if (k0 == 0) {
            std::fill(ar, ar + dv, 0.0f);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < dv; ++c) ar[c] *= rescale;
          }
        }
        sgemm(false, false, nq, dv, nk, 1.0f, scores.data(), kBlock, vh + k0 * ld.v, ld.v, 1.0f, acc.data(), dv);
      }
      for (int64_t r = 0; r < nq; ++r) {
        const float inverse = 1.0f / row_sum[r];
        float* o = out + (first_row + q0 + r) * ld.out + h * dv;
        const float* ar = acc.data() + r * dv;
#pragma omp simd
        for (int64_t c = 0; c < dv; ++c) o[c] = ar[c] * inverse;
        lse[(first_row + q0 + r) * s.heads + h] = row_max[r] + std::log(row_sum[r]);
      }
    }
  });
}

void flash_attention_backward(const AttentionDims& s, float scale, const float* q, const float* k, const float* v,
                              const float* out, const float* lse, const float* dout, float* dq, float* dk, float* dv,
                              const ForEachItem& for_each) {
  const Strides ld(s);
  const int64_t sequences = s.rows / s.seq_len, group = s.heads / s.kv_heads, dk_w = s.key_dim, dv_w = s.value_dim;
  // With groups (GQA, MQA) each query head's share of dK and dV goes to a part of its own, summed
  // over the group afterwards in head order; with MHA straight into dk and dv.
  std::vector<float> dk_parts, dv_parts;
  if (group > 1) {
    dk_parts.resize(static_cast<size_t>(sequences * s.heads * s.seq_len * dk_w));
    dv_parts.resize(static_cast<size_t>(sequences * s.heads * s.seq_len * dv_w));
  }
  for_each(sequences * s.heads, [&](int64_t item) {
    const int64_t b = item / s.heads, h = item % s.heads, g = h / group, first_row = b * s.seq_len;
    std::vector<float> p(static_cast<size_t>(kBlock * kBlock)), dp(static_cast<size_t>(kBlock * kBlock));
    std::vector<float> delta(static_cast<size_t>(s.seq_len));  // D = rowsum(dO * out)
    const float* kg = k + first_row * ld.k + g * dk_w;
    const float* vg = v + first_row * ld.v + g * dv_w;
    float* dkh = group > 1 ? dk_parts.data() + item * s.seq_len * dk_w : dk + first_row * ld.k + g * dk_w;
    float* dvh = group > 1 ? dv_parts.data() + item * s.seq_len * dv_w : dv + first_row * ld.v + g * dv_w;
    const int64_t ld_dk = group > 1 ? dk_w : ld.k, ld_dv = group > 1 ? dv_w : ld.v;
    for (int64_t i = 0; i < s.seq_len; ++i) {
      std::fill(dkh + i * ld_dk, dkh + i * ld_dk + dk_w, 0.0f);
      std::fill(dvh + i * ld_dv, dvh + i * ld_dv + dv_w, 0.0f);
      const float* o = out + (first_row + i) * ld.out + h * dv_w;
      const float* d_o = dout + (first_row + i) * ld.out + h * dv_w;
      float sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < dv_w; ++c) sum += o[c] * d_o[c];
      delta[static_cast<size_t>(i)] = sum;
      float* dqr = dq + (first_row + i) * ld.q + h * dk_w;
      std::fill(dqr, dqr + dk_w, 0.0f);
    }
    for (int64_t k0 = 0; k0 < s.seq_len; k0 += kBlock) {
      const int64_t nk = std::min(kBlock, s.seq_len - k0);
      for (int64_t q0 = k0; q0 < s.seq_len; q0 += kBlock) {  // the tiles with a query >= k0
        const int64_t nq = std::min(kBlock, s.seq_len - q0);
        const float* qh = q + (first_row + q0) * ld.q + h * dk_w;
        const float* doh = dout + (first_row + q0) * ld.out + h * dv_w;
        float* dqh = dq + (first_row + q0) * ld.q + h * dk_w;
        sgemm(false, true, nq, nk, dk_w, scale, qh, ld.q, kg + k0 * ld.k, ld.k, 0.0f, p.data(), kBlock);
        for (int64_t r = 0; r < nq; ++r) {
          const float row_lse = lse[(first_row + q0 + r) * s.heads + h];
          float* pr = p.data() + r * kBlock;
#pragma omp simd
          for (int64_t c = 0; c < nk; ++c) pr[c] = exp_nonpositive(std::min(pr[c] - row_lse, 0.0f));
        }
        if (k0 + nk > q0) mask_future(p.data(), nq, nk, q0, k0, 0.0f);
        sgemm(true, false, nk, dv_w, nq, 1.0f, p.data(), kBlock, doh, ld.out, 1.0f, dvh + k0 * ld_dv, ld_dv);
        sgemm(false, true, nq, nk, dv_w, 1.0f, doh, ld.out, vg + k0 * ld.v, ld.v, 0.0f, dp.data(), kBlock);
        for (int64_t r = 0; r < nq; ++r) {
          const float d = delta[static_cast<size_t>(q0 + r)];
          float* pr = p.data() + r * kBlock;
          const float* dpr = dp.data() + r * kBlock;
#pragma omp simd
          for (int64_t c = 0; c < nk; ++c) pr[c] *= dpr[c] - d;  // dS, in place of P
        }
        sgemm(false, false, nq, dk_w, nk, scale, p.data(), kBlock, kg + k0 * ld.k, ld.k, 1.0f, dqh, ld.q);
        sgemm(true, false, nk, dk_w, nq, scale, p.data(), kBlock, qh, ld.q, 1.0f, dkh + k0 * ld_dk, ld_dk);
      }
    }
  });
  if (group == 1) return;
  for_each(sequences * s.kv_heads, [&](int64_t item) {
    const int64_t b = item / s.kv_heads, g = item % s.kv_heads, first_row = b * s.seq_len;
    for (int64_t i = 0; i < s.seq_len; ++i) {
      float* dkr = dk + (first_row + i) * ld.k + g * dk_w;
      float* dvr = dv + (first_row + i) * ld.v + g * dv_w;
      for (int64_t j = 0; j < group; ++j) {
        const int64_t part = b * s.heads + g * group + j;
        const float* pk = dk_parts.data() + (part * s.seq_len + i) * dk_w;
        const float* pv = dv_parts.data() + (part * s.seq_len + i) * dv_w;
        if (j == 0) {
          std::copy(pk, pk + dk_w, dkr);
          std::copy(pv, pv + dv_w, dvr);
          continue;
        }
#pragma omp simd
        for (int64_t c = 0; c < dk_w; ++c) dkr[c] += pk[c];
#pragma omp simd
        for (int64_t c = 0; c < dv_w; ++c) dvr[c] += pv[c];
      }
    }
  });
}

}  // namespace moelab::cpu

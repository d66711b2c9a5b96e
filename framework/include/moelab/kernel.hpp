// The device-agnostic ops API: the one interface a kernel plugin implements ("cpu" on OpenBLAS,
// "cuda" on cuBLAS). Routers, expert layouts and balancers are written against Ops only, so a
// router written once runs on every device.
//
// Conventions for every op:
//  - Tensors are contiguous row-major and live on this kernel's device; float ops accept f32 and
//    f64 (the reference CPU kernel is templated on the scalar type so gradient checks run in
//    double), index tensors are i32. The GEMMs also take bf16 operands with an f32 result, and
//    memory ops and cast take bf16 (see "precision" below).
//  - Outputs are preallocated by the caller with the shape written beside each op; an op checks
//    shapes and dtypes and throws RuntimeError naming the op and both shapes on a mismatch.
//  - `beta`/`accumulate` say explicitly whether an output is overwritten or added to, as
//    tiny-cuda-nn's gradient modes do; backward ops accumulate into parameter gradients.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moelab/params.hpp"
#include "moelab/tensor.hpp"

namespace moelab {

enum class Activation { identity, relu, gelu_tanh, gelu_erf, silu };
Activation parse_activation(const std::string& name);  // "identity","relu","gelu","gelu_erf","silu"
const char* activation_name(Activation activation);

class Ops {
 public:
  virtual ~Ops() = default;
  virtual DeviceKind device() const = 0;
  virtual std::string name() const = 0;

  // --- memory -------------------------------------------------------------------------------
  virtual Tensor empty(DType dtype, const Shape& shape) = 0;  // contents unspecified
  virtual Tensor zeros(DType dtype, const Shape& shape) = 0;
  virtual void fill(Tensor& dst, double value) = 0;
  // Copies between any two tensors of equal dtype and numel, host or this device.
  virtual void copy(const Tensor& src, Tensor& dst) = 0;
  Tensor to_host(const Tensor& src);     // a host copy (a no-op view for the cpu kernel's tensors)
  Tensor to_device(const Tensor& host);  // a device copy of a host tensor
  virtual void synchronize() {}

  // --- dense linear algebra -----------------------------------------------------------------
  // c[M,N] = alpha * op(a) * op(b) + beta * c, op(x) = x or x^T; a is [M,K] or [K,M] when trans_a.
  virtual void gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta,
                    Tensor& c) = 0;

  // Grouped GEMM over row segments, the expert FFN's workhorse. Rows [offsets[g], offsets[g+1])
  // of x belong to group g (offsets on the host, size groups+1, offsets[0] = 0):
  //   y[rows_g] = alpha * x[rows_g] * op(w[g]) + beta * y[rows_g]
  // x [R,K]; w [G,K,N] (trans_w = false) or [G,N,K] (trans_w = true); y [R,N].
  virtual void grouped_gemm(const Tensor& x, const Tensor& w, bool trans_w, const std::vector<int64_t>& offsets,
                            double alpha, double beta, Tensor& y) = 0;
  // Weight gradient of grouped_gemm: dw[g] (+)= x[rows_g]^T * dy[rows_g]  (dw [G,K,N]), or its
  // transpose dy^T * x when trans_w (dw [G,N,K]). accumulate = false overwrites.
  virtual void grouped_gemm_weight_grad(const Tensor& x, const Tensor& dy, bool trans_w,
                                        const std::vector<int64_t>& offsets, bool accumulate, Tensor& dw) = 0;

  // --- elementwise and row-wise -------------------------------------------------------------
  // y = act(x); dx (+)= act'(x) * dy.
  virtual void activation(Activation act, const Tensor& x, Tensor& y) = 0;
  virtual void activation_backward(Activation act, const Tensor& x, const Tensor& dy, bool accumulate, Tensor& dx) = 0;
  // Gated linear unit on a fused [R, 2F] input laid out [gate | up]: h[R,F] = act(gate) * up.
  virtual void glu(Activation act, const Tensor& gate_up, Tensor& h) = 0;
  virtual void glu_backward(Activation act, const Tensor& gate_up, const Tensor& dh,
                            Tensor& dgate_up) = 0;  // overwrites dgate_up [R, 2F]

  // y = x + alpha * z elementwise (y may alias x).
  virtual void axpy(double alpha, const Tensor& z, Tensor& y) = 0;
  // y *= alpha
  virtual void scale(double alpha, Tensor& y) = 0;
  // y[r, :] *= s[r]   (y [R,N], s [R])
  virtual void scale_rows(const Tensor& s, Tensor& y) = 0;
  // y[r, :] += b   (y [R,N], b [N])
  virtual void add_row_vector(const Tensor& b, Tensor& y) = 0;
  // out[n] (+)= sum_r x[r, n]     (column sums; bias gradients, balancers' mean probabilities)
  virtual void sum_rows(const Tensor& x, bool accumulate, Tensor& out) = 0;
  // out[r] = <a[r,:], b[r,:]>
  virtual void row_dot(const Tensor& a, const Tensor& b, Tensor& out) = 0;

  // --- probabilities ------------------------------------------------------------------------
  // Row-wise softmax of x / temperature: y[R,E].  Backward: dx (+)= (y*(dy - <dy,y>)) / temperature.
  virtual void softmax_rows(const Tensor& x, double temperature, Tensor& y) = 0;
  virtual void softmax_rows_backward(const Tensor& y, const Tensor& dy, double temperature, bool accumulate,
                                     Tensor& dx) = 0;
  // y = 1 / (1 + exp(-x)); dx (+)= y (1 - y) dy.
  virtual void sigmoid(const Tensor& x, Tensor& y) = 0;
  virtual void sigmoid_backward(const Tensor& y, const Tensor& dy, bool accumulate, Tensor& dx) = 0;
  // out[r] = log sum_e exp(x[r,e])  (router z-loss)
  virtual void logsumexp_rows(const Tensor& x, Tensor& out) = 0;
  // softplus(x) = log(1 + exp(x)) and its backward dx (+)= sigmoid(x) * dy (noisy top-k gating).
  virtual void softplus(const Tensor& x, Tensor& y) = 0;
  virtual void softplus_backward(const Tensor& x, const Tensor& dy, bool accumulate, Tensor& dx) = 0;

  // --- selection and movement ---------------------------------------------------------------
  // Per row, the k largest entries of scores[R,E] in descending order (ties: lower index first):
  // values[R,k] (same dtype as scores), indices[R,k] i32. When `bias` [E] is given, selection
  // ranks scores + bias but `values` holds the unbiased scores (DeepSeek-V3 aux-free balancing).
  virtual void topk_rows(const Tensor& scores, int k, const Tensor* bias, Tensor& values, Tensor& indices) = 0;
  // dst[i, :] = src[index[i], :]    (dispatch: tokens into expert order)
  virtual void gather_rows(const Tensor& src, const Tensor& index, Tensor& dst) = 0;
  // dst[index[i], :] += weight[i] * src[i, :]  (combine; weight may be null for 1)
  virtual void scatter_add_rows(const Tensor& src, const Tensor& index, const Tensor* weight, Tensor& dst) = 0;
  // out[i] = x[row[i], col[i]]  and its backward dx[row[i], col[i]] += dout[i].
  virtual void gather_elements(const Tensor& x, const Tensor& row, const Tensor& col, Tensor& out) = 0;
  virtual void scatter_add_elements(const Tensor& dout, const Tensor& row, const Tensor& col, Tensor& dx) = 0;

  // --- precision (optional slots, ABI 7.0) -------------------------------------------------
  // bf16 (DType::bf16) is a storage dtype: the ops below and the GEMMs take it; every sum, norm,
  // softmax and loss computes in f32.
  // dst = src converted between f32, f64 and bf16 (equal numel; to bf16: round to nearest even).
  virtual void cast(const Tensor& src, Tensor& dst);
  // The precision f32 GEMMs (gemm, grouped_gemm and its weight gradient) compute in: DType::f32,
  // or DType::bf16: each operand rounded to bf16 (nearest even), products exact in f32, sums in
  // f32, an f32 result (cuBLAS's CUBLAS_COMPUTE_32F_FAST_16BF, PyTorch's
  // set_float32_matmul_precision("medium")). A GEMM whose a or b is a bf16 tensor computes in bf16
  // whatever this says; f64 GEMMs never change. Returns the previous precision; a kernel without
  // a bf16 GEMM throws for bf16. Routers keep f32: the MoE layer sets it around them.
  virtual DType set_matmul_precision(DType precision);
  virtual DType matmul_precision() const { return DType::f32; }
  // What a bf16 GEMM runs on, for `moelab version` ("oneDNN 2.6.3 matmul ... AVX-512 BF16"), or
  // "" where the kernel has none.
  virtual std::string bf16_gemm_path() const { return ""; }

  // --- optional slots ----------------------------------------------------------------------
  // These have a generic implementation (on the host, through to_host/copy) so that a new kernel
  // works before it specialises them, and a fast kernel overrides only what it needs. Adding a
  // slot still changes the vtable, so it is an ABI major change (a kernel built before it would
  // lack the slot): the fallback saves kernel authors work, not recompiles.

  // out = a * b elementwise (out may alias a or b).
  virtual void mul(const Tensor& a, const Tensor& b, Tensor& out);
  // y[r, :] = x[r, :] / sum(x[r, :])  (renormalising the k selected gates).
  // Backward: dx[r, :] (+)= (dy[r, :] - <dy[r, :], y[r, :]>) / sum(x[r, :]).
  virtual void normalize_rows(const Tensor& x, Tensor& y);
  virtual void normalize_rows_backward(const Tensor& x, const Tensor& y, const Tensor& dy, bool accumulate, Tensor& dx);
  // sum_i x_i^2 (gradient-norm clipping), accumulated in double.
  virtual double sum_squares(const Tensor& x);
  // One AdamW step (Loshchilov & Hutter 2019, decoupled weight decay) on a parameter, in place:
  //   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  m^ = m/(1-b1^t);  v^ = v/(1-b2^t)
  //   p -= lr (m^ / (sqrt(v^) + eps) + wd p)
  struct AdamW {
    double lr, beta1, beta2, eps, weight_decay;
    int64_t step;  // t, 1-based
  };
  virtual void adamw_update(const AdamW& hyper, const Tensor& grad, Tensor& param, Tensor& m, Tensor& v);
  // y[C, R] = x[R, C]^T  (expert-choice routing ranks the tokens of each expert along a row).
  virtual void transpose(const Tensor& x, Tensor& y);
  // Group-limited top-k (DeepSeek-V2's group-limited greedy and V3's node-limited routing). The E
  // columns of scores[R,E] form `groups` contiguous groups of E/groups. Per row, with keys =
  // scores (+ bias [E] when given): a group's score is the sum of its `group_top` largest keys
  // (V3: 2, V2's max: 1); the `keep_groups` best groups stay eligible (ties: lower group first);
  // the k largest eligible keys are returned as topk_rows returns them: values[R,k] the unbiased
  // scores in descending key order (ties: lower index first), indices[R,k] i32. Entries of dropped
  // groups are never selected. groups = keep_groups = 1 is topk_rows.
  virtual void grouped_topk_rows(const Tensor& scores, int k, const Tensor* bias, int groups, int keep_groups,
                                 int group_top, Tensor& values, Tensor& indices);

  // --- routing maths (optional slots, ABI 4.0) ---------------------------------------------
  // What routers from the literature compute beyond top-k: Sinkhorn / BASE balancing (iterated
  // row and column scaling of exp(logits)), soft MoE's dispatch and combine weights (softmax over
  // tokens and over slots, with transpose and gemm), threshold routing (a mask, per-row counts).
  // Every differentiable op has its backward beside it. Shapes match elementwise unless stated;
  // y may alias x.
  // y = exp(x);  dx (+)= y * dy.
  virtual void exp(const Tensor& x, Tensor& y);
  virtual void exp_backward(const Tensor& y, const Tensor& dy, bool accumulate, Tensor& dx);
  // y = log(x) (x > 0);  dx (+)= dy / x.
  virtual void log(const Tensor& x, Tensor& y);
  virtual void log_backward(const Tensor& x, const Tensor& dy, bool accumulate, Tensor& dx);
  // out = a / b;  da (+)= dy / b,  db (+)= -dy * a / b^2  (either gradient may be null).
  virtual void divide(const Tensor& a, const Tensor& b, Tensor& out);
  virtual void divide_backward(const Tensor& a, const Tensor& b, const Tensor& dy, bool accumulate, Tensor* da,
                               Tensor* db);
  // y[:, c] *= s[c]  (y [R, C], s [C]): column scaling, as scale_rows scales rows. Its backward,
  // for y = x * s: dx (+)= dy * s (column-wise), ds (+)= sum_r dy[r, c] x[r, c].
  virtual void scale_columns(const Tensor& s, Tensor& y);
  virtual void scale_columns_backward(const Tensor& x, const Tensor& s, const Tensor& dy, bool accumulate, Tensor& dx,
                                      Tensor& ds);
  // out[r] = sum_c x[r, c]  (x [R, C], out [R]): row sums (sum_rows gives column sums).
  virtual void row_sums(const Tensor& x, bool accumulate, Tensor& out);
  // Per row, the largest entry and its column (ties: lower column): values [R] (x's dtype) and
  // indices i32 [R]. Backward: dx[r, indices[r]] += dvalues[r] (scatter_add_elements).
  virtual void max_rows(const Tensor& x, Tensor& values, Tensor& indices);
  // mask = 1 where x >= threshold[r] of its row (threshold [R]), else 0 (x's dtype). A selection:
  // it has no gradient.
  virtual void threshold_rows(const Tensor& x, const Tensor& threshold, Tensor& mask);

  // --- transformer ops (optional slots; the language-model trainer's building blocks) -------
  // dst[:, dst_col + j] (+)= src[:, src_col + j] for j < width; src [R, Cs], dst [R, Cd]. Splits
  // and concatenations along columns (fused projections, MLA's nope/rope halves) and their backward.
  virtual void copy_columns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t width,
                            bool accumulate);
  // RMSNorm (Zhang & Sennrich 2019) over rows of x [R, C]: rstd[r] = 1 / sqrt(mean_c x[r,c]^2 + eps),
  // y = x * rstd * weight (weight [C]); rstd [R] is saved for the backward, which overwrites dx
  // and accumulates dweight.
  virtual void rms_norm(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rstd);
  virtual void rms_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy,
                                 Tensor& dx, Tensor& dweight);
  // LayerNorm (Ba et al. 2016): y = (x - mean) * rstd * weight + bias (bias may be null); mean and
  // rstd [R] are saved. Backward overwrites dx and accumulates dweight and dbias (when given).
  virtual void layer_norm(const Tensor& x, const Tensor& weight, const Tensor* bias, double eps, Tensor& y,
                          Tensor& mean, Tensor& rstd);
  virtual void layer_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                                   const Tensor& dy, Tensor& dx, Tensor& dweight, Tensor* dbias);
  // Rotary position embedding (Su et al. 2021) in the rotate-half layout HF Llama/Mixtral/Qwen
  // use: x [R, H*D] holds H heads of width D (D even); row r is position r % seq_len; for
  // i < D/2, angle = pos * theta^(-2i/D), (a, b) = (x[i], x[i + D/2]) becomes
  // (a cos - b sin, a sin + b cos). inverse = true rotates by -angle: the backward. y may alias x.
  virtual void rope(const Tensor& x, int64_t heads, int64_t seq_len, double theta, bool inverse, Tensor& y);
  // Causal scaled-dot-product attention over independent sequences of seq_len consecutive rows,
  // grouped-query: q [R, H*Dk], k [R, Hkv*Dk], v [R, Hkv*Dv], H % Hkv == 0, query head h reads
  // kv head h / (H / Hkv) (Hkv = H: multi-head, Hkv = 1: multi-query). Position i attends to
  // positions <= i of its own sequence with softmax(scale * q.k). out [R, H*Dv]; lse [R, H] (the
  // log-sum-exp of each softmax) is saved for the backward, which overwrites dq, dk and dv.
  virtual void causal_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads, int64_t kv_heads,
                                int64_t seq_len, double scale, Tensor& out, Tensor& lse);
  virtual void causal_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                         const Tensor& lse, const Tensor& dout, int64_t heads, int64_t kv_heads,
                                         int64_t seq_len, double scale, Tensor& dq, Tensor& dk, Tensor& dv);
  // Cross-entropy of logits [R, V] against targets i32 [R]: loss[r] = lse[r] - logits[r, target[r]]
  // with lse[r] = logsumexp(logits[r, :]); rows whose target is negative are ignored (loss 0).
  // A target >= V throws. Backward overwrites dlogits = scale * (softmax(logits) - onehot(target)),
  // zero on ignored rows.
  virtual void cross_entropy(const Tensor& logits, const Tensor& targets, Tensor& loss, Tensor& lse);
  virtual void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, double scale,
                                      Tensor& dlogits);
};

// Sets the GEMM precision of `ops` for a scope and puts the previous one back: the MoE layer keeps
// its router in f32 this way (Megatron-Core's moe_router_dtype = "fp32").
class MatmulPrecisionScope {
 public:
  MatmulPrecisionScope(Ops& ops, DType precision) : ops_(ops), previous_(ops.set_matmul_precision(precision)) {}
  ~MatmulPrecisionScope() {
    try {
      ops_.set_matmul_precision(previous_);
    } catch (...) {  // previous_ was accepted once; a kernel that now refuses it keeps the scope's
    }
  }
  MatmulPrecisionScope(const MatmulPrecisionScope&) = delete;
  MatmulPrecisionScope& operator=(const MatmulPrecisionScope&) = delete;

 private:
  Ops& ops_;
  DType previous_;
};

}  // namespace moelab

// Generic implementations of Ops' optional slots: copy to the host, compute, copy back. For the
// cpu kernel the copies are views, so these are as fast as a plain loop there.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <numeric>
#include <system_error>
#include <thread>
#include <vector>

#include "moelab/kernel.hpp"
#include "ops_host.hpp"

namespace moelab {

using host_ops::check_same;
using host_ops::store;
using host_ops::with_float_type;

void Ops::mul(const Tensor& a, const Tensor& b, Tensor& out) {
  check_same(a, b, "mul");
  check_same(a, out, "mul");
  Tensor ha = to_host(a), hb = to_host(b);
  Tensor ho = out.device() == DeviceKind::cpu ? out : host_tensor(out.dtype(), out.shape());
  with_float_type(a.dtype(), "mul", [&](auto zero) {
    using T = decltype(zero);
    const T* pa = ha.data<T>();
    const T* pb = hb.data<T>();
    T* po = ho.data<T>();
    for (int64_t i = 0; i < ho.numel(); ++i) po[i] = pa[i] * pb[i];
  });
  store(*this, ho, out);
}

void Ops::normalize_rows(const Tensor& x, Tensor& y) {
  check_same(x, y, "normalize_rows");
  MOELAB_CHECK(x.rank() == 2, "normalize_rows: expected a matrix, got {}", x.describe());
  Tensor hx = to_host(x);
  Tensor hy = y.device() == DeviceKind::cpu ? y : host_tensor(y.dtype(), y.shape());
  const int64_t rows = x.dim(0), cols = x.dim(1);
  with_float_type(x.dtype(), "normalize_rows", [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    T* py = hy.data<T>();
    for (int64_t r = 0; r < rows; ++r) {
      T sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += px[r * cols + c];
      for (int64_t c = 0; c < cols; ++c) py[r * cols + c] = px[r * cols + c] / sum;
    }
  });
  store(*this, hy, y);
}

void Ops::normalize_rows_backward(const Tensor& x, const Tensor& y, const Tensor& dy, bool accumulate, Tensor& dx) {
  check_same(x, y, "normalize_rows_backward");
  check_same(x, dy, "normalize_rows_backward");
  check_same(x, dx, "normalize_rows_backward");
  Tensor hx = to_host(x), hy = to_host(y), hdy = to_host(dy);
  Tensor hdx = dx.device() == DeviceKind::cpu ? dx : to_host(dx);
  const int64_t rows = x.dim(0), cols = x.dim(1);
  with_float_type(x.dtype(), "normalize_rows_backward", [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    const T* py = hy.data<T>();
    const T* pdy = hdy.data<T>();
    T* pdx = hdx.data<T>();
    for (int64_t r = 0; r < rows; ++r) {
      T sum = 0, dot = 0;
      for (int64_t c = 0; c < cols; ++c) {
        sum += px[r * cols + c];
        dot += pdy[r * cols + c] * py[r * cols + c];
      }
      for (int64_t c = 0; c < cols; ++c) {
        const T g = (pdy[r * cols + c] - dot) / sum;
        pdx[r * cols + c] = accumulate ? pdx[r * cols + c] + g : g;
      }
    }
  });
  store(*this, hdx, dx);
}

double Ops::sum_squares(const Tensor& x) {
  const Tensor hx = to_host(x);
  double sum = 0;
  with_float_type(x.dtype(), "sum_squares", [&](auto zero) {
    using T = decltype(zero);
    const T* p = hx.data<T>();
    for (int64_t i = 0; i < hx.numel(); ++i) sum += static_cast<double>(p[i]) * static_cast<double>(p[i]);
  });
  return sum;
}

void Ops::adamw_update(const AdamW& h, const Tensor& grad, Tensor& param, Tensor& m, Tensor& v) {
  check_same(grad, param, "adamw_update");
  check_same(grad, m, "adamw_update");
  check_same(grad, v, "adamw_update");
  const Tensor hg = to_host(grad);
  Tensor hp = param.device() == DeviceKind::cpu ? param : to_host(param);
  Tensor hm = m.device() == DeviceKind::cpu ? m : to_host(m);
  Tensor hv = v.device() == DeviceKind::cpu ? v : to_host(v);
  const double correction1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double correction2 = 1.0 - std::pow(h.beta2, static_cast<double>(h.step));
  with_float_type(grad.dtype(), "adamw_update", [&](auto zero) {
    using T = decltype(zero);
    const T* g = hg.data<T>();
    T* p = hp.data<T>();
    T* pm = hm.data<T>();
    T* pv = hv.data<T>();
    for (int64_t i = 0; i < hg.numel(); ++i) {
      const double gi = g[i];
      const double mi = h.beta1 * pm[i] + (1.0 - h.beta1) * gi;
      const double vi = h.beta2 * pv[i] + (1.0 - h.beta2) * gi * gi;
      pm[i] = static_cast<T>(mi);
      pv[i] = static_cast<T>(vi);
      const double update = (mi / correction1) / (std::sqrt(vi / correction2) + h.eps) + h.weight_decay * p[i];
      p[i] = static_cast<T>(p[i] - h.lr * update);
    }
  });
  store(*this, hp, param);
  store(*this, hm, m);
  store(*this, hv, v);
}

void Ops::transpose(const Tensor& x, Tensor& y) {
  MOELAB_CHECK(x.rank() == 2 && y.rank() == 2 && x.dtype() == y.dtype() && y.dim(0) == x.dim(1) && y.dim(1) == x.dim(0),
               "transpose: expected y [{}, {}] of {} for x {}, got {}", x.rank() == 2 ? x.dim(1) : -1,
               x.rank() == 2 ? x.dim(0) : -1, dtype_name(x.dtype()), x.describe(), y.describe());
  const Tensor hx = to_host(x);
  Tensor hy = y.device() == DeviceKind::cpu ? y : host_tensor(y.dtype(), y.shape());
  const int64_t rows = x.dim(0), cols = x.dim(1);
  const size_t element = dtype_size(x.dtype());
  const char* px = static_cast<const char*>(hx.raw());
  char* py = static_cast<char*>(hy.raw());
  // Byte copies: any dtype (indices included) transposes the same way.
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      std::copy_n(px + static_cast<size_t>(r * cols + c) * element, element,
                  py + static_cast<size_t>(c * rows + r) * element);
  store(*this, hy, y);
}

void Ops::grouped_topk_rows(const Tensor& scores, int k, const Tensor* bias, int groups, int keep_groups, int group_top,
                            Tensor& values, Tensor& indices) {
  MOELAB_CHECK(scores.rank() == 2, "grouped_topk_rows: expected a matrix of scores, got {}", scores.describe());
  const int64_t rows = scores.dim(0), experts = scores.dim(1);
  MOELAB_CHECK(groups >= 1 && experts % groups == 0, "grouped_topk_rows: {} columns do not split into {} groups",
               experts, groups);
  const int64_t group_size = experts / groups;
  MOELAB_CHECK(keep_groups >= 1 && keep_groups <= groups, "grouped_topk_rows: keep_groups = {} of {} groups",
               keep_groups, groups);
  MOELAB_CHECK(group_top >= 1 && group_top <= group_size,
               "grouped_topk_rows: group_top = {} must be between 1 and the group size {}", group_top, group_size);
  MOELAB_CHECK(k >= 1 && k <= keep_groups * group_size,
               "grouped_topk_rows: k = {} must be between 1 and the {} columns of the {} kept groups", k,
               keep_groups * group_size, keep_groups);
  MOELAB_CHECK(values.dtype() == scores.dtype() && values.shape() == Shape({rows, k}),
               "grouped_topk_rows: values must be {}[{}, {}], got {}", dtype_name(scores.dtype()), rows, k,
               values.describe());
  MOELAB_CHECK(indices.dtype() == DType::i32 && indices.shape() == Shape({rows, k}),
               "grouped_topk_rows: indices must be i32[{}, {}], got {}", rows, k, indices.describe());
  if (bias != nullptr)
    MOELAB_CHECK(bias->dtype() == scores.dtype() && bias->shape() == Shape({experts}),
                 "grouped_topk_rows: bias must be {}[{}], got {}", dtype_name(scores.dtype()), experts,
                 bias->describe());
  const Tensor hs = to_host(scores);
  const Tensor hb = bias != nullptr ? to_host(*bias) : Tensor{};
  Tensor hv = values.device() == DeviceKind::cpu ? values : host_tensor(values.dtype(), values.shape());
  Tensor hi = indices.device() == DeviceKind::cpu ? indices : host_tensor(DType::i32, indices.shape());
  with_float_type(scores.dtype(), "grouped_topk_rows", [&](auto zero) {
    using T = decltype(zero);
    const T* ps = hs.data<T>();
    const T* pb = bias != nullptr ? hb.data<T>() : nullptr;
    T* pv = hv.data<T>();
    int32_t* pi = hi.data<int32_t>();
    std::vector<T> keys(static_cast<size_t>(experts));
    std::vector<T> group_score(static_cast<size_t>(groups));
    std::vector<int32_t> order(static_cast<size_t>(experts)), group_order(static_cast<size_t>(groups));
    std::vector<int32_t> eligible;
    const auto descending = [](const std::vector<T>& key) {
      return [&key](int32_t i, int32_t j) { return key[i] > key[j] || (key[i] == key[j] && i < j); };
    };
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = ps + r * experts;
      for (int64_t e = 0; e < experts; ++e) {
        keys[e] = pb ? row[e] + pb[e] : row[e];
        // NaN has no rank; refuse it (it means the run diverged), as topk_rows does.
        MOELAB_CHECK(!std::isnan(keys[e]), "grouped_topk_rows: scores{} at row {}, column {} is NaN",
                     pb ? " + bias" : "", r, e);
      }
      // Group scores: the sum of each group's group_top largest keys.
      for (int g = 0; g < groups; ++g) {
        int32_t* begin = order.data() + g * group_size;
        std::iota(begin, begin + group_size, static_cast<int32_t>(g * group_size));
        std::partial_sort(begin, begin + group_top, begin + group_size, descending(keys));
        T sum = 0;
        for (int j = 0; j < group_top; ++j) sum += keys[begin[j]];
        group_score[g] = sum;
      }
      std::iota(group_order.begin(), group_order.end(), 0);
      std::partial_sort(group_order.begin(), group_order.begin() + keep_groups, group_order.end(),
                        descending(group_score));
      eligible.clear();
      for (int j = 0; j < keep_groups; ++j)
        for (int64_t e = group_order[j] * group_size; e < (group_order[j] + 1) * group_size; ++e)
          eligible.push_back(static_cast<int32_t>(e));
      std::partial_sort(eligible.begin(), eligible.begin() + k, eligible.end(), descending(keys));
      for (int j = 0; j < k; ++j) {
        pv[r * k + j] = row[eligible[j]];
        pi[r * k + j] = eligible[j];
      }
    }
  });
  store(*this, hv, values);
  store(*this, hi, indices);
}

// --- transformer ops -----------------------------------------------------------------------------

namespace {

// Below this many multiply-adds in all, starting threads costs more than it saves.
constexpr double kParallelWork = 1e6;

// Runs body(begin, end) over contiguous blocks of the tasks [0, tasks), on up to
// hardware_concurrency threads when `work` pays for them. Each task writes its own outputs in a
// fixed order, so results are the same bits for any number of threads.
template <class Body>
void parallel_blocks(int64_t tasks, double work, const Body& body) {
  const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t threads = work < kParallelWork ? 1 : std::min(tasks, hardware);
  if (threads <= 1) {
    if (tasks > 0) body(int64_t{0}, tasks);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  const auto run_block = [&](int64_t t) {
    try {
      body(tasks * t / threads, tasks * (t + 1) / threads);
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  for (int64_t t = 0; t < threads; ++t) {
    try {
      pool.emplace_back(run_block, t);
    } catch (const std::system_error&) {
      run_block(t);  // no thread to be had: the caller does this block itself
    }
  }
  for (auto& thread : pool) thread.join();
  for (const auto& error : errors)
    if (error) std::rethrow_exception(error);
}

void expect_matrix(const Tensor& t, const char* op, const char* what) {
  if (t.rank() != 2) throw RuntimeError(fmt::format("{}: {} must be a matrix, got {}", op, what, t.describe()));
}

void expect_tensor(const Tensor& t, DType dtype, const Shape& shape, const char* op, const char* what) {
  if (t.dtype() != dtype || t.shape() != shape)
    throw RuntimeError(
        fmt::format("{}: {} must be {}{}, got {}", op, what, dtype_name(dtype), shape_str(shape), t.describe()));
}

// Host memory for an output the op overwrites entirely: the tensor itself on the host.
Tensor host_output(const Tensor& t) {
  return t.device() == DeviceKind::cpu ? t : host_tensor(t.dtype(), t.shape());
}

// Adds a row-wise reduction kept in double to an accumulated gradient.
template <class T>
void add_to(const std::vector<double>& sum, T* gradient) {
  for (size_t c = 0; c < sum.size(); ++c) gradient[c] = static_cast<T>(gradient[c] + sum[c]);
}

// --- attention ---

struct AttentionShape {
  int64_t rows, heads, kv_heads, seq_len, key_dim, value_dim;
  int64_t sequences() const { return rows / seq_len; }
  int64_t group() const { return heads / kv_heads; }  // query heads per kv head
  // multiply-adds of the causal score and value products, the forward's cost
  double pair_work() const {
    return static_cast<double>(sequences() * heads) * static_cast<double>(seq_len) * static_cast<double>(seq_len + 1) /
           2 * static_cast<double>(key_dim + value_dim);
  }
};

AttentionShape check_attention_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads,
                                      int64_t kv_heads, int64_t seq_len) {
  expect_matrix(q, op, "q");
  expect_matrix(k, op, "k");
  expect_matrix(v, op, "v");
  MOELAB_CHECK(heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0,
               "{}: heads = {} must be a positive multiple of kv_heads = {}", op, heads, kv_heads);
  const int64_t rows = q.dim(0);
  MOELAB_CHECK(seq_len >= 1 && rows % seq_len == 0, "{}: the {} rows of q {} do not split into sequences of {}", op,
               rows, q.describe(), seq_len);
  MOELAB_CHECK(q.dim(1) >= heads && q.dim(1) % heads == 0, "{}: q {} does not split into {} heads", op, q.describe(),
               heads);
  MOELAB_CHECK(v.dim(1) >= kv_heads && v.dim(1) % kv_heads == 0, "{}: v {} does not split into {} kv heads", op,
               v.describe(), kv_heads);
  const AttentionShape shape{rows, heads, kv_heads, seq_len, q.dim(1) / heads, v.dim(1) / kv_heads};
  expect_tensor(k, q.dtype(), {rows, kv_heads * shape.key_dim}, op, "k");
  expect_tensor(v, q.dtype(), {rows, kv_heads * shape.value_dim}, op, "v");
  return shape;
}

// Rows [first, first + count) of `columns` consecutive columns from column `offset` of a matrix with
// `stride` columns, transposed into out[columns, count]: score and value products then run along
// positions, contiguous.
template <class T>
void transpose_block(const T* matrix, int64_t stride, int64_t first, int64_t count, int64_t offset, int64_t columns,
                     T* out) {
  for (int64_t j = 0; j < count; ++j) {
    const T* row = matrix + (first + j) * stride + offset;
    for (int64_t d = 0; d < columns; ++d) out[d * count + j] = row[d];
  }
}

// scores[j] = alpha * <vector, column j of transposed[dim, count]> for j <= last.
template <class T>
void transposed_products(const T* vector, const T* transposed, int64_t dim, int64_t count, int64_t last, T alpha,
                         T* scores) {
  std::fill_n(scores, last + 1, T{0});
  for (int64_t d = 0; d < dim; ++d) {
    const T weight = alpha * vector[d];
    const T* column = transposed + d * count;
    for (int64_t j = 0; j <= last; ++j) scores[j] += weight * column[j];
  }
}

template <class T>
void axpy_row(T alpha, const T* x, int64_t n, T* y) {
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

// One task per (sequence, query head): scores of each position against its causal prefix,
// softmax with the row maximum subtracted (normaliser in double), then the weighted values.
template <class T>
void attention_forward(const AttentionShape& s, double scale, const T* q, const T* k, const T* v, T* out, T* lse) {
  const int64_t q_cols = s.heads * s.key_dim, k_cols = s.kv_heads * s.key_dim;
  const int64_t v_cols = s.kv_heads * s.value_dim, out_cols = s.heads * s.value_dim;
  const T scale_t = static_cast<T>(scale);
  parallel_blocks(s.sequences() * s.heads, s.pair_work(), [&](int64_t begin, int64_t end) {
    std::vector<T> keys(static_cast<size_t>(s.key_dim * s.seq_len)), scores(static_cast<size_t>(s.seq_len));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = task / s.heads * s.seq_len, head = task % s.heads, kv_head = head / s.group();
      transpose_block(k, k_cols, first, s.seq_len, kv_head * s.key_dim, s.key_dim, keys.data());
      for (int64_t i = 0; i < s.seq_len; ++i) {
        const int64_t row = first + i;
        transposed_products(q + row * q_cols + head * s.key_dim, keys.data(), s.key_dim, s.seq_len, i, scale_t,
                            scores.data());
        const T max = *std::max_element(scores.begin(), scores.begin() + i + 1);
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          scores[j] = std::exp(scores[j] - max);
          sum += scores[j];
        }
        lse[row * s.heads + head] = static_cast<T>(max + std::log(sum));
        const T inverse_sum = static_cast<T>(1 / sum);
        T* out_row = out + row * out_cols + head * s.value_dim;
        std::fill_n(out_row, s.value_dim, T{0});
        for (int64_t j = 0; j <= i; ++j)
          axpy_row(scores[j] * inverse_sum, v + (first + j) * v_cols + kv_head * s.value_dim, s.value_dim, out_row);
      }
    }
  });
}

// One task per (sequence, kv head): it owns dk and dv of that kv head and dq of the query heads
// that read it, and sums over those heads and positions in a fixed order (deterministic GQA).
// With P = exp(scale q.k - lse) and dP_ij = <dout_i, v_j>: dS = P (dP - <dout_i, out_i>),
// dq_i = scale sum_j dS_ij k_j, dk_j = scale sum_i dS_ij q_i, dv_j = sum_i P_ij dout_i.
template <class T>
void attention_backward(const AttentionShape& s, double scale, const T* q, const T* k, const T* v, const T* out,
                        const T* lse, const T* dout, T* dq, T* dk, T* dv) {
  const int64_t q_cols = s.heads * s.key_dim, k_cols = s.kv_heads * s.key_dim;
  const int64_t v_cols = s.kv_heads * s.value_dim, out_cols = s.heads * s.value_dim;
  const T scale_t = static_cast<T>(scale);
  const double work = s.pair_work() * static_cast<double>(3 * s.key_dim + 2 * s.value_dim) /
                      static_cast<double>(s.key_dim + s.value_dim);
  parallel_blocks(s.sequences() * s.kv_heads, work, [&](int64_t begin, int64_t end) {
    std::vector<T> keys(static_cast<size_t>(s.key_dim * s.seq_len)),
        values(static_cast<size_t>(s.value_dim * s.seq_len));
    std::vector<T> probs(static_cast<size_t>(s.seq_len)), dscores(static_cast<size_t>(s.seq_len));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = task / s.kv_heads * s.seq_len, kv_head = task % s.kv_heads;
      transpose_block(k, k_cols, first, s.seq_len, kv_head * s.key_dim, s.key_dim, keys.data());
      transpose_block(v, v_cols, first, s.seq_len, kv_head * s.value_dim, s.value_dim, values.data());
      for (int64_t j = 0; j < s.seq_len; ++j) {
        std::fill_n(dk + (first + j) * k_cols + kv_head * s.key_dim, s.key_dim, T{0});
        std::fill_n(dv + (first + j) * v_cols + kv_head * s.value_dim, s.value_dim, T{0});
      }
      for (int64_t head = kv_head * s.group(); head < (kv_head + 1) * s.group(); ++head) {
        for (int64_t i = 0; i < s.seq_len; ++i) {
          const int64_t row = first + i;
          const T* q_row = q + row * q_cols + head * s.key_dim;
          const T* dout_row = dout + row * out_cols + head * s.value_dim;
          const T* out_row = out + row * out_cols + head * s.value_dim;
          transposed_products(q_row, keys.data(), s.key_dim, s.seq_len, i, scale_t, probs.data());
          const T row_lse = lse[row * s.heads + head];
          for (int64_t j = 0; j <= i; ++j) probs[j] = std::exp(probs[j] - row_lse);
          transposed_products(dout_row, values.data(), s.value_dim, s.seq_len, i, T{1}, dscores.data());
          double dout_dot_out = 0;
          for (int64_t d = 0; d < s.value_dim; ++d)
            dout_dot_out += static_cast<double>(dout_row[d]) * static_cast<double>(out_row[d]);
          const T delta = static_cast<T>(dout_dot_out);
          for (int64_t j = 0; j <= i; ++j) dscores[j] = scale_t * probs[j] * (dscores[j] - delta);
          T* dq_row = dq + row * q_cols + head * s.key_dim;
          std::fill_n(dq_row, s.key_dim, T{0});
          for (int64_t j = 0; j <= i; ++j) {
            const int64_t key_row = first + j;
            axpy_row(dscores[j], k + key_row * k_cols + kv_head * s.key_dim, s.key_dim, dq_row);
            axpy_row(dscores[j], q_row, s.key_dim, dk + key_row * k_cols + kv_head * s.key_dim);
            axpy_row(probs[j], dout_row, s.value_dim, dv + key_row * v_cols + kv_head * s.value_dim);
          }
        }
      }
    }
  });
}

// --- cross-entropy ---

// Targets below 0 are ignored rows; a target at or past the vocabulary is a caller's bug.
void check_targets(const char* op, const Tensor& host_targets, int64_t vocab) {
  const int32_t* targets = host_targets.data<int32_t>();
  for (int64_t r = 0; r < host_targets.numel(); ++r)
    MOELAB_CHECK(targets[r] < vocab, "{}: targets[{}] = {} is outside the vocabulary of {} logits", op, r, targets[r],
                 vocab);
}

}  // namespace

void Ops::copy_columns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t width,
                       bool accumulate) {
  constexpr const char* op = "copy_columns";
  expect_matrix(src, op, "src");
  expect_matrix(dst, op, "dst");
  MOELAB_CHECK(src.dtype() == dst.dtype() && src.dim(0) == dst.dim(0),
               "copy_columns: src {} and dst {} must have the same dtype and number of rows", src.describe(),
               dst.describe());
  MOELAB_CHECK(width >= 0, "copy_columns: width = {} is negative", width);
  MOELAB_CHECK(src_col >= 0 && src_col + width <= src.dim(1), "copy_columns: columns [{}, {}) are outside src {}",
               src_col, src_col + width, src.describe());
  MOELAB_CHECK(dst_col >= 0 && dst_col + width <= dst.dim(1), "copy_columns: columns [{}, {}) are outside dst {}",
               dst_col, dst_col + width, dst.describe());
  const int64_t rows = src.dim(0), src_cols = src.dim(1), dst_cols = dst.dim(1);
  if (rows == 0 || width == 0) return;
  const Tensor hs = to_host(src);
  Tensor hd = to_host(dst);  // the columns outside the range are kept
  if (!accumulate) {
    // Byte copies: any dtype (indices included) moves the same way.
    const size_t element = dtype_size(src.dtype());
    const char* ps = static_cast<const char*>(hs.raw());
    char* pd = static_cast<char*>(hd.raw());
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(pd + static_cast<size_t>(r * dst_cols + dst_col) * element,
                  ps + static_cast<size_t>(r * src_cols + src_col) * element, static_cast<size_t>(width) * element);
  } else {
    with_float_type(src.dtype(), op, [&](auto zero) {
      using T = decltype(zero);
      const T* ps = hs.data<T>();
      T* pd = hd.data<T>();
      for (int64_t r = 0; r < rows; ++r)
        axpy_row(T{1}, ps + r * src_cols + src_col, width, pd + r * dst_cols + dst_col);
    });
  }
  store(*this, hd, dst);
}

void Ops::rms_norm(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rstd) {
  constexpr const char* op = "rms_norm";
  expect_matrix(x, op, "x");
  const int64_t rows = x.dim(0), cols = x.dim(1);
  MOELAB_CHECK(cols >= 1, "rms_norm: x {} has no columns to normalise", x.describe());
  MOELAB_CHECK(std::isfinite(eps) && eps >= 0, "rms_norm: eps = {} must be finite and non-negative", eps);
  expect_tensor(weight, x.dtype(), {cols}, op, "weight");
  expect_tensor(y, x.dtype(), x.shape(), op, "y");
  expect_tensor(rstd, x.dtype(), {rows}, op, "rstd");
  const Tensor hx = to_host(x), hw = to_host(weight);
  Tensor hy = host_output(y), hr = host_output(rstd);
  with_float_type(x.dtype(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    const T* pw = hw.data<T>();
    T* py = hy.data<T>();
    T* pr = hr.data<T>();
    for (int64_t r = 0; r < rows; ++r) {
      const T* x_row = px + r * cols;
      double squares = 0;
      for (int64_t c = 0; c < cols; ++c) squares += static_cast<double>(x_row[c]) * static_cast<double>(x_row[c]);
      // y uses the rstd as saved, so the backward differentiates exactly what ran
      const T row_rstd = static_cast<T>(1 / std::sqrt(squares / static_cast<double>(cols) + eps));
      pr[r] = row_rstd;
      for (int64_t c = 0; c < cols; ++c) py[r * cols + c] = x_row[c] * row_rstd * pw[c];
    }
  });
  store(*this, hy, y);
  store(*this, hr, rstd);
}

// y_c = x_c r w_c with r = (mean x^2 + eps)^(-1/2), dr/dx_j = -r^3 x_j / C:
// dx_j = r w_j dy_j - x_j r^3 / C sum_c dy_c w_c x_c;  dw_c += sum_rows dy_c x_c r.
void Ops::rms_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                            Tensor& dweight) {
  constexpr const char* op = "rms_norm_backward";
  expect_matrix(x, op, "x");
  const int64_t rows = x.dim(0), cols = x.dim(1);
  expect_tensor(weight, x.dtype(), {cols}, op, "weight");
  expect_tensor(rstd, x.dtype(), {rows}, op, "rstd");
  expect_tensor(dy, x.dtype(), x.shape(), op, "dy");
  expect_tensor(dx, x.dtype(), x.shape(), op, "dx");
  expect_tensor(dweight, x.dtype(), {cols}, op, "dweight");
  const Tensor hx = to_host(x), hw = to_host(weight), hr = to_host(rstd), hdy = to_host(dy);
  Tensor hdx = host_output(dx), hdw = to_host(dweight);
  with_float_type(x.dtype(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    const T* pw = hw.data<T>();
    const T* pr = hr.data<T>();
    const T* pdy = hdy.data<T>();
    T* pdx = hdx.data<T>();
    std::vector<double> weight_grad(static_cast<size_t>(cols), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* x_row = px + r * cols;
      const T* dy_row = pdy + r * cols;
      const double row_rstd = pr[r];
      double dot = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double dy_x = static_cast<double>(dy_row[c]) * static_cast<double>(x_row[c]);
        dot += dy_x * static_cast<double>(pw[c]);
        weight_grad[c] += dy_x * row_rstd;
      }
      const T scale = static_cast<T>(row_rstd);
      const T correction = static_cast<T>(row_rstd * row_rstd * row_rstd * dot / static_cast<double>(cols));
      for (int64_t c = 0; c < cols; ++c) pdx[r * cols + c] = scale * pw[c] * dy_row[c] - correction * x_row[c];
    }
    add_to(weight_grad, hdw.data<T>());
  });
  store(*this, hdx, dx);
  store(*this, hdw, dweight);
}

void Ops::layer_norm(const Tensor& x, const Tensor& weight, const Tensor* bias, double eps, Tensor& y, Tensor& mean,
                     Tensor& rstd) {
  constexpr const char* op = "layer_norm";
  expect_matrix(x, op, "x");
  const int64_t rows = x.dim(0), cols = x.dim(1);
  MOELAB_CHECK(cols >= 1, "layer_norm: x {} has no columns to normalise", x.describe());
  MOELAB_CHECK(std::isfinite(eps) && eps >= 0, "layer_norm: eps = {} must be finite and non-negative", eps);
  expect_tensor(weight, x.dtype(), {cols}, op, "weight");
  if (bias != nullptr) expect_tensor(*bias, x.dtype(), {cols}, op, "bias");
  expect_tensor(y, x.dtype(), x.shape(), op, "y");
  expect_tensor(mean, x.dtype(), {rows}, op, "mean");
  expect_tensor(rstd, x.dtype(), {rows}, op, "rstd");
  const Tensor hx = to_host(x), hw = to_host(weight);
  const Tensor hb = bias != nullptr ? to_host(*bias) : Tensor{};
  Tensor hy = host_output(y), hm = host_output(mean), hr = host_output(rstd);
  with_float_type(x.dtype(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    const T* pw = hw.data<T>();
    const T* pb = bias != nullptr ? hb.data<T>() : nullptr;
    T* py = hy.data<T>();
    for (int64_t r = 0; r < rows; ++r) {
      const T* x_row = px + r * cols;
      // two passes: the variance of the centred values does not cancel as E[x^2] - E[x]^2 does
      double sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += x_row[c];
      const double row_mean = sum / static_cast<double>(cols);
      double squares = 0;
      for (int64_t c = 0; c < cols; ++c) squares += (x_row[c] - row_mean) * (x_row[c] - row_mean);
      const T mean_t = static_cast<T>(row_mean);
      const T rstd_t = static_cast<T>(1 / std::sqrt(squares / static_cast<double>(cols) + eps));
      hm.data<T>()[r] = mean_t;
      hr.data<T>()[r] = rstd_t;
      T* y_row = py + r * cols;
      for (int64_t c = 0; c < cols; ++c) y_row[c] = (x_row[c] - mean_t) * rstd_t * pw[c];
      if (pb != nullptr)
        for (int64_t c = 0; c < cols; ++c) y_row[c] += pb[c];
    }
  });
  store(*this, hy, y);
  store(*this, hm, mean);
  store(*this, hr, rstd);
}

// With xhat = (x - mean) r and g = dy w: dx = r (g - mean(g) - xhat mean(g xhat));
// dw += sum_rows dy xhat; db += sum_rows dy.
void Ops::layer_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                              const Tensor& dy, Tensor& dx, Tensor& dweight, Tensor* dbias) {
  constexpr const char* op = "layer_norm_backward";
  expect_matrix(x, op, "x");
  const int64_t rows = x.dim(0), cols = x.dim(1);
  expect_tensor(weight, x.dtype(), {cols}, op, "weight");
  expect_tensor(mean, x.dtype(), {rows}, op, "mean");
  expect_tensor(rstd, x.dtype(), {rows}, op, "rstd");
  expect_tensor(dy, x.dtype(), x.shape(), op, "dy");
  expect_tensor(dx, x.dtype(), x.shape(), op, "dx");
  expect_tensor(dweight, x.dtype(), {cols}, op, "dweight");
  if (dbias != nullptr) expect_tensor(*dbias, x.dtype(), {cols}, op, "dbias");
  const Tensor hx = to_host(x), hw = to_host(weight), hm = to_host(mean), hr = to_host(rstd), hdy = to_host(dy);
  Tensor hdx = host_output(dx), hdw = to_host(dweight);
  Tensor hdb = dbias != nullptr ? to_host(*dbias) : Tensor{};
  with_float_type(x.dtype(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    const T* pw = hw.data<T>();
    const T* pdy = hdy.data<T>();
    T* pdx = hdx.data<T>();
    std::vector<double> weight_grad(static_cast<size_t>(cols), 0.0), bias_grad(static_cast<size_t>(cols), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* x_row = px + r * cols;
      const T* dy_row = pdy + r * cols;
      const double row_mean = hm.data<T>()[r], row_rstd = hr.data<T>()[r];
      double sum_g = 0, sum_g_xhat = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double xhat = (x_row[c] - row_mean) * row_rstd;
        const double g = static_cast<double>(dy_row[c]) * static_cast<double>(pw[c]);
        sum_g += g;
        sum_g_xhat += g * xhat;
        weight_grad[c] += dy_row[c] * xhat;
        bias_grad[c] += dy_row[c];
      }
      const double mean_g = sum_g / static_cast<double>(cols), mean_g_xhat = sum_g_xhat / static_cast<double>(cols);
      for (int64_t c = 0; c < cols; ++c) {
        const double xhat = (x_row[c] - row_mean) * row_rstd;
        pdx[r * cols + c] = static_cast<T>(
            row_rstd * (static_cast<double>(dy_row[c]) * static_cast<double>(pw[c]) - mean_g - xhat * mean_g_xhat));
      }
    }
    add_to(weight_grad, hdw.data<T>());
    if (dbias != nullptr) add_to(bias_grad, hdb.data<T>());
  });
  store(*this, hdx, dx);
  store(*this, hdw, dweight);
  if (dbias != nullptr) store(*this, hdb, *dbias);
}

void Ops::rope(const Tensor& x, int64_t heads, int64_t seq_len, double theta, bool inverse, Tensor& y) {
  constexpr const char* op = "rope";
  expect_matrix(x, op, "x");
  const int64_t rows = x.dim(0), cols = x.dim(1);
  MOELAB_CHECK(heads >= 1 && cols % heads == 0, "rope: x {} does not split into {} heads", x.describe(), heads);
  const int64_t head_dim = cols / heads, half = head_dim / 2;
  MOELAB_CHECK(head_dim >= 2 && head_dim % 2 == 0,
               "rope: the head width {} of x {} with {} heads must be even and positive (rotated in pairs)", head_dim,
               x.describe(), heads);
  MOELAB_CHECK(seq_len >= 1, "rope: seq_len = {} must be positive", seq_len);
  MOELAB_CHECK(std::isfinite(theta) && theta > 0, "rope: theta = {} must be finite and positive", theta);
  expect_tensor(y, x.dtype(), x.shape(), op, "y");
  const Tensor hx = to_host(x);
  Tensor hy = host_output(y);
  // Angles in double; only the positions that occur are tabulated.
  const int64_t positions = std::min(rows, seq_len);
  std::vector<double> cosines(static_cast<size_t>(positions * half)), sines(static_cast<size_t>(positions * half));
  for (int64_t i = 0; i < half; ++i) {
    const double frequency = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    for (int64_t p = 0; p < positions; ++p) {
      const double angle = static_cast<double>(p) * frequency;
      cosines[p * half + i] = std::cos(angle);
      sines[p * half + i] = inverse ? -std::sin(angle) : std::sin(angle);
    }
  }
  with_float_type(x.dtype(), op, [&](auto zero) {
    using T = decltype(zero);
    const std::vector<T> cos_t(cosines.begin(), cosines.end()), sin_t(sines.begin(), sines.end());
    const T* px = hx.data<T>();
    T* py = hy.data<T>();
    for (int64_t r = 0; r < rows; ++r) {
      const T* cos_row = cos_t.data() + (r % seq_len) * half;
      const T* sin_row = sin_t.data() + (r % seq_len) * half;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t base = r * cols + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          // both read before either is written: y may alias x
          const T a = px[base + i], b = px[base + half + i];
          py[base + i] = a * cos_row[i] - b * sin_row[i];
          py[base + half + i] = a * sin_row[i] + b * cos_row[i];
        }
      }
    }
  });
  store(*this, hy, y);
}

void Ops::causal_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads, int64_t kv_heads,
                           int64_t seq_len, double scale, Tensor& out, Tensor& lse) {
  constexpr const char* op = "causal_attention";
  const AttentionShape s = check_attention_inputs(op, q, k, v, heads, kv_heads, seq_len);
  MOELAB_CHECK(std::isfinite(scale), "causal_attention: scale = {} must be finite", scale);
  expect_tensor(out, q.dtype(), {s.rows, heads * s.value_dim}, op, "out");
  expect_tensor(lse, q.dtype(), {s.rows, heads}, op, "lse");
  const Tensor hq = to_host(q), hk = to_host(k), hv = to_host(v);
  Tensor ho = host_output(out), hl = host_output(lse);
  with_float_type(q.dtype(), op, [&](auto zero) {
    using T = decltype(zero);
    attention_forward<T>(s, scale, hq.data<T>(), hk.data<T>(), hv.data<T>(), ho.data<T>(), hl.data<T>());
  });
  store(*this, ho, out);
  store(*this, hl, lse);
}

void Ops::causal_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                    const Tensor& lse, const Tensor& dout, int64_t heads, int64_t kv_heads,
                                    int64_t seq_len, double scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  constexpr const char* op = "causal_attention_backward";
  const AttentionShape s = check_attention_inputs(op, q, k, v, heads, kv_heads, seq_len);
  MOELAB_CHECK(std::isfinite(scale), "causal_attention_backward: scale = {} must be finite", scale);
  expect_tensor(out, q.dtype(), {s.rows, heads * s.value_dim}, op, "out");
  expect_tensor(lse, q.dtype(), {s.rows, heads}, op, "lse");
  expect_tensor(dout, q.dtype(), out.shape(), op, "dout");
  expect_tensor(dq, q.dtype(), q.shape(), op, "dq");
  expect_tensor(dk, q.dtype(), k.shape(), op, "dk");
  expect_tensor(dv, q.dtype(), v.shape(), op, "dv");
  const Tensor hq = to_host(q), hk = to_host(k), hv = to_host(v), ho = to_host(out), hl = to_host(lse),
               hdo = to_host(dout);
  Tensor hdq = host_output(dq), hdk = host_output(dk), hdv = host_output(dv);
  with_float_type(q.dtype(), op, [&](auto zero) {
    using T = decltype(zero);
    attention_backward<T>(s, scale, hq.data<T>(), hk.data<T>(), hv.data<T>(), ho.data<T>(), hl.data<T>(), hdo.data<T>(),
                          hdq.data<T>(), hdk.data<T>(), hdv.data<T>());
  });
  store(*this, hdq, dq);
  store(*this, hdk, dk);
  store(*this, hdv, dv);
}

void Ops::cross_entropy(const Tensor& logits, const Tensor& targets, Tensor& loss, Tensor& lse) {
  constexpr const char* op = "cross_entropy";
  expect_matrix(logits, op, "logits");
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  MOELAB_CHECK(vocab >= 1, "cross_entropy: logits {} have no columns", logits.describe());
  expect_tensor(targets, DType::i32, {rows}, op, "targets");
  expect_tensor(loss, logits.dtype(), {rows}, op, "loss");
  expect_tensor(lse, logits.dtype(), {rows}, op, "lse");
  const Tensor hx = to_host(logits), ht = to_host(targets);
  check_targets(op, ht, vocab);
  Tensor hloss = host_output(loss), hl = host_output(lse);
  with_float_type(logits.dtype(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    const int32_t* pt = ht.data<int32_t>();
    T* ploss = hloss.data<T>();
    T* pl = hl.data<T>();
    parallel_blocks(rows, static_cast<double>(rows * vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* row = px + r * vocab;
        const T max = *std::max_element(row, row + vocab);
        double sum = 0;
        for (int64_t c = 0; c < vocab; ++c) sum += std::exp(row[c] - max);
        const double row_lse = max + std::log(sum);
        pl[r] = static_cast<T>(row_lse);
        ploss[r] = pt[r] < 0 ? T{0} : static_cast<T>(row_lse - row[pt[r]]);
      }
    });
  });
  store(*this, hloss, loss);
  store(*this, hl, lse);
}

void Ops::cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, double scale,
                                 Tensor& dlogits) {
  constexpr const char* op = "cross_entropy_backward";
  expect_matrix(logits, op, "logits");
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  expect_tensor(targets, DType::i32, {rows}, op, "targets");
  expect_tensor(lse, logits.dtype(), {rows}, op, "lse");
  expect_tensor(dlogits, logits.dtype(), logits.shape(), op, "dlogits");
  const Tensor hx = to_host(logits), ht = to_host(targets), hl = to_host(lse);
  check_targets(op, ht, vocab);
  Tensor hd = host_output(dlogits);
  with_float_type(logits.dtype(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    const int32_t* pt = ht.data<int32_t>();
    const T* pl = hl.data<T>();
    T* pd = hd.data<T>();
    const T scale_t = static_cast<T>(scale);
    parallel_blocks(rows, static_cast<double>(rows * vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* d_row = pd + r * vocab;
        if (pt[r] < 0) {
          std::fill_n(d_row, vocab, T{0});
          continue;
        }
        const T* row = px + r * vocab;
        for (int64_t c = 0; c < vocab; ++c) d_row[c] = scale_t * std::exp(row[c] - pl[r]);
        d_row[pt[r]] -= scale_t;
      }
    });
  });
  store(*this, hd, dlogits);
}

// --- precision ---------------------------------------------------------------------------------

void Ops::cast(const Tensor& src, Tensor& dst) {
  const auto is_float = [](DType dtype) { return dtype == DType::f32 || dtype == DType::f64 || dtype == DType::bf16; };
  if (!is_float(src.dtype()) || !is_float(dst.dtype()) || src.numel() != dst.numel())
    throw RuntimeError(fmt::format("cast: expected f32, f64 or bf16 tensors of equal size, got {} and {}",
                                   src.describe(), dst.describe()));
  Tensor hs = to_host(src);
  Tensor hd = host_tensor(dst.dtype(), dst.shape());
  for (int64_t i = 0; i < hs.numel(); ++i) set_host_value(hd, i, host_value(hs, i));
  copy(hd, dst);
}

DType Ops::set_matmul_precision(DType precision) {
  if (precision != DType::f32)
    throw RuntimeError(
        fmt::format("kernel '{}' computes f32 GEMMs in f32 only; it has no {} GEMM", name(), dtype_name(precision)));
  return DType::f32;
}

}  // namespace moelab

// Generic implementations of Ops' optional slots: copy to the host, compute, copy back. For the
// cpu kernel the copies are views, so these are as fast as a plain loop there.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "moelab/kernel.hpp"

namespace moelab {
namespace {

template <class F>
void with_float_type(DType dtype, const char* op, F&& f) {
  if (dtype == DType::f32) f(float{});
  else if (dtype == DType::f64) f(double{});
  else throw RuntimeError(fmt::format("{}: dtype {} is not supported", op, dtype_name(dtype)));
}

void check_same(const Tensor& a, const Tensor& b, const char* op) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype())
    throw RuntimeError(fmt::format("{}: operands differ: {} vs {}", op, a.describe(), b.describe()));
}

// Writes a host result back into `dst`, which may live on the device.
void store(Ops& ops, const Tensor& host, Tensor& dst) {
  if (dst.device() == DeviceKind::cpu && host.raw() == dst.raw()) return;
  ops.copy(host, dst);
}

}  // namespace

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

void Ops::normalize_rows_backward(const Tensor& x, const Tensor& y, const Tensor& dy, bool accumulate,
                                  Tensor& dx) {
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

}  // namespace moelab
